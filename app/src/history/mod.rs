//! A room's history and how its messages leave it: what both stores keep and return
//! (`resume`: [`Snapshot`], [`Published`], and the one decision every resume takes), the two
//! stores (`ring` in process, `redis_stream` in Redis), what they keep ([`HistoryConfig`]), and
//! the one interface through which messages reach the hub ([`Outlet`]), and the pages of it the
//! server API reads (`page`).
//!
//! The in-process ring hands each message to its room's outlet as it publishes it; with Redis,
//! the script of `redis_stream` publishes it on the room's channel and the subscriber
//! (`redis::subscriber`) hands it to the same outlet as it arrives, on every instance. See
//! ARCHITECTURE.md, "The message path".

pub mod outlet;
pub mod page;
pub mod redis_stream;
pub mod resume;
pub mod ring;

use std::time::Duration;

pub use outlet::{Delivery, Outlet};
pub use page::{Page, Range};
pub use resume::{Published, Resume, Snapshot, resume};

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
