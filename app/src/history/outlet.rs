//! What a store hands on ([`Delivery`]) and to whom ([`Outlet`]): the one interface through
//! which both delivery paths reach the hub.

use axum::extract::ws::Utf8Bytes;

use crate::position::MessageId;

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
