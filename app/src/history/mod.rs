//! A room's history and how its messages leave it: what both stores keep and return
//! (`resume`: [`Snapshot`], [`Published`], and the one decision every resume takes), the two
//! stores (`ring` in process, `redis_stream` in Redis), what they keep ([`HistoryConfig`]), and
//! the one interface through which messages reach the hub ([`Outlet`]).
//!
//! The in-process ring hands each message to its room's outlet as it publishes it; with Redis,
//! the script of `redis_stream` publishes it on the room's channel and the subscriber
//! (`redis::subscriber`) hands it to the same outlet as it arrives, on every instance. See
//! ARCHITECTURE.md, "The message path".

pub mod redis_stream;
pub mod resume;
pub mod ring;

use std::time::Duration;

use axum::extract::ws::Utf8Bytes;

pub use resume::{Published, Resume, Snapshot, resume};

use crate::position::MessageId;

/// How much of a channel's history is kept for resuming clients, and how long a client
/// message id is remembered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryConfig {
    /// Messages kept (approximately, with Redis: trimming works in whole stream nodes).
    pub messages: usize,
    /// Age beyond which messages are trimmed.
    pub max_age: Duration,
    /// How long a `cid` is remembered for deduplication.
    pub dedupe_window: Duration,
}

/// One message on its way to clients: the exact text they receive and its id, when it has one
/// (messages from the original app have none).
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The message's id in the channel's history.
    pub id: Option<MessageId>,
    /// The frame's text, shared by every client.
    pub text: Utf8Bytes,
}

/// Where a store hands the messages of its channel: the hub's room, which queues each for its
/// local members. Both delivery paths end here: the in-process ring calls it as it publishes,
/// the Redis subscriber as a message arrives on the channel.
pub trait Outlet: Send + Sync {
    /// Hands on `message`, whose id (if any) belongs to `epoch`. A message with an id not
    /// newer than one handed on already in the same epoch is skipped.
    fn deliver(&self, message: Delivery, epoch: Option<&str>);
}
