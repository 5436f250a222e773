//! A room's inlet: where both delivery paths hand the room's messages ([`Outlet`], called by
//! the in-process ring as it publishes and by the Redis subscriber as messages arrive), and
//! where the subscriber's catch-up delivers what the history holds.
//!
//! The inlet remembers the position of the last message with an id it queued ([`Inlet::last`])
//! and skips what is not newer (a catch-up and the subscription may both bring a message).
//! When the channel's history starts a new epoch, or a catch-up finds a gap the history cannot
//! fill, every local member is let go ([`Eviction::Gap`]): each reconnects, resumes, and is told
//! through its own resume what it cannot recover, instead of missing messages silently.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::fanout::{Eviction, Fanout};
use crate::history::{self, Delivery, Outlet, Snapshot};
use crate::position::Position;

/// The entry of a room's messages into its fan-out.
#[derive(Debug)]
pub struct Inlet {
    /// The room's channel, for logs.
    channel: String,
    fanout: Arc<Fanout>,
    /// The position of the last message with an id queued.
    last: Mutex<Option<Position>>,
}

impl Inlet {
    /// The inlet of `channel`'s room, queuing into `fanout`.
    pub fn new(channel: &str, fanout: Arc<Fanout>) -> Inlet {
        Inlet {
            channel: channel.to_owned(),
            fanout,
            last: Mutex::new(None),
        }
    }

    /// The position of the last message with an id queued, if any.
    pub fn last(&self) -> Option<Position> {
        self.lock().clone()
    }

    /// Delivers what a history read made for `from` holds after it; returns how many. When the
    /// gap cannot be filled, every local member is let go (see the module doc).
    pub fn catch_up(&self, snapshot: Snapshot, from: &Position) -> usize {
        let resume = history::resume(snapshot, Some(from));
        if !resume.recovered {
            let clients = self.fanout.evict_all(Eviction::Gap);
            tracing::warn!(
                channel = %self.channel,
                reason = resume.reason.unwrap_or("-"),
                clients,
                "this instance missed messages it cannot recover; its clients reconnect and resume"
            );
        }
        let count = resume.missed.len();
        for delivery in &resume.missed {
            self.fanout.deliver(delivery);
        }
        *self.lock() = Some(Position {
            epoch: resume.epoch,
            last: resume.last,
        });
        count
    }

    fn lock(&self) -> MutexGuard<'_, Option<Position>> {
        // One assignment per operation: consistent even if a holder panicked.
        self.last.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Outlet for Inlet {
    fn deliver(&self, message: Delivery, epoch: Option<&str>) {
        if let (Some(id), Some(epoch)) = (message.id, epoch) {
            let mut last = self.lock();
            match &mut *last {
                Some(last) if last.epoch == epoch => {
                    if id <= last.last {
                        tracing::trace!(%id, "skipped a message the catch-up delivered");
                        return;
                    }
                    last.last = id;
                }
                last => {
                    if last.is_some() {
                        let clients = self.fanout.evict_all(Eviction::Gap);
                        tracing::warn!(channel = %self.channel, %epoch, clients, "the channel's history was reset (new epoch); clients reconnect and resume");
                    }
                    *last = Some(Position {
                        epoch: epoch.to_owned(),
                        last: id,
                    });
                }
            }
        }
        let bytes = message.text.len();
        let delivered = self.fanout.deliver(&message);
        tracing::trace!(delivered, bytes, "delivered a channel message");
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::ws::Utf8Bytes;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::position::MessageId;
    use crate::protocol;

    fn id(ms: u64) -> MessageId {
        MessageId { ms, seq: 0 }
    }

    fn message(ms: u64, epoch: &str) -> Delivery {
        Delivery {
            id: Some(id(ms)),
            text: Utf8Bytes::from(protocol::with_position(r#"{"content":"x"}"#, id(ms), epoch)),
        }
    }

    fn snapshot(epoch: &str, last_added: u64, after: &[u64]) -> Snapshot {
        Snapshot {
            epoch: epoch.into(),
            last_added: id(last_added),
            max_trimmed: MessageId::ZERO,
            after: after.iter().map(|&ms| message(ms, epoch)).collect(),
        }
    }

    fn at(epoch: &str, ms: u64) -> Position {
        Position {
            epoch: epoch.into(),
            last: id(ms),
        }
    }

    #[tokio::test]
    async fn what_the_catch_up_delivered_is_not_delivered_again() {
        let fanout = Fanout::new(16);
        let mut member = fanout.join(CancellationToken::new());
        let inlet = Inlet::new("c", Arc::clone(&fanout));
        assert_eq!(inlet.catch_up(snapshot("e", 3, &[2, 3]), &at("e", 1)), 2);
        // The subscription brings 2 and 3 again (published between SUBSCRIBE and the read),
        // then 4, and a message of the original app, which has no id.
        for ms in [2, 3, 4] {
            inlet.deliver(message(ms, "e"), Some("e"));
        }
        let original = Delivery {
            id: None,
            text: Utf8Bytes::from_static(r#"{"name":"py","content":"hi"}"#),
        };
        inlet.deliver(original, None);
        let mut got = Vec::new();
        while let Ok(d) = member.rx.try_recv() {
            got.push(d.id.map(|i| i.ms));
        }
        assert_eq!(got, [Some(2), Some(3), Some(4), None]);
        assert!(!member.stop.is_cancelled());
        assert_eq!(inlet.last(), Some(at("e", 4)));
    }

    #[tokio::test]
    async fn a_gap_the_history_cannot_fill_lets_every_client_go() {
        let fanout = Fanout::new(16);
        let member = fanout.join(CancellationToken::new());
        let inlet = Inlet::new("c", Arc::clone(&fanout));
        inlet.catch_up(snapshot("new", 2, &[]), &at("old", 7));
        assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
        assert_eq!(inlet.last(), Some(at("new", 2)));
    }

    #[tokio::test]
    async fn a_new_epoch_on_the_subscription_lets_every_client_go() {
        let fanout = Fanout::new(16);
        let member = fanout.join(CancellationToken::new());
        let inlet = Inlet::new("c", Arc::clone(&fanout));
        inlet.deliver(message(5, "a"), Some("a"));
        assert!(
            !member.stop.is_cancelled(),
            "the first epoch seen is no change"
        );
        inlet.deliver(message(1, "b"), Some("b"));
        assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
    }
}
