//! Local fan-out of chat messages to this instance's WebSocket clients.
//!
//! The broker hands every message from the channel to [`Fanout::deliver`] once, already
//! serialised as [`Utf8Bytes`]; cloning it only bumps a reference count, so a thousand clients
//! share one buffer. Each client registered with [`Fanout::join`] owns a bounded queue
//! ([`Member`]). A client whose queue is full is not skipped silently and does not slow the
//! others: it is removed and its `stop` token cancelled, and its connection task closes it with
//! 1013 (try again later), after which the page reconnects.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::ws::Utf8Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Every local client's queue, keyed by a per-instance id.
#[derive(Debug)]
pub struct Fanout {
    clients: Mutex<HashMap<u64, Client>>,
    next_id: AtomicU64,
    queue: usize,
}

#[derive(Debug)]
struct Client {
    tx: mpsc::Sender<Utf8Bytes>,
    stop: CancellationToken,
}

/// One client's end: its queue of messages to send and the token that ends it.
#[derive(Debug)]
pub struct Member {
    id: u64,
    /// Messages to write to this client, in channel order.
    pub rx: mpsc::Receiver<Utf8Bytes>,
    /// Cancelled when this client is evicted for a full queue, or when `stop`'s parent is.
    pub stop: CancellationToken,
    fanout: Arc<Fanout>,
}

impl Drop for Member {
    fn drop(&mut self) {
        self.fanout.remove(self.id);
    }
}

impl Fanout {
    /// A fan-out whose clients each queue up to `queue` messages.
    pub fn new(queue: usize) -> Arc<Fanout> {
        Arc::new(Fanout {
            clients: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            queue: queue.max(1),
        })
    }

    /// Registers a client; `stop` is cancelled if it falls behind. Dropping the [`Member`]
    /// unregisters it.
    pub fn join(self: &Arc<Self>, stop: CancellationToken) -> Member {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(self.queue);
        self.lock().insert(
            id,
            Client {
                tx,
                stop: stop.clone(),
            },
        );
        Member {
            id,
            rx,
            stop,
            fanout: Arc::clone(self),
        }
    }

    /// Queues `message` for every client; evicts those whose queue is full. Returns how many
    /// clients it was queued for.
    pub fn deliver(&self, message: &Utf8Bytes) -> usize {
        let mut clients = self.lock();
        let before = clients.len();
        clients.retain(|id, client| match client.tx.try_send(message.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(client = id, "client queue full: disconnecting slow client");
                client.stop.cancel();
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        let delivered = clients.len();
        if delivered < before {
            tracing::debug!(removed = before - delivered, "clients removed from fan-out");
        }
        delivered
    }

    /// Number of registered clients.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Client>> {
        // The map stays consistent even if a holder panicked: every operation is one call.
        self.clients.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_member_gets_the_same_bytes_in_order() {
        let fanout = Fanout::new(4);
        let mut a = fanout.join(CancellationToken::new());
        let mut b = fanout.join(CancellationToken::new());
        let first = Utf8Bytes::from("one");
        assert_eq!(fanout.deliver(&first), 2);
        assert_eq!(fanout.deliver(&Utf8Bytes::from("two")), 2);
        for member in [&mut a, &mut b] {
            assert_eq!(member.rx.recv().await.unwrap().as_str(), "one");
            assert_eq!(member.rx.recv().await.unwrap().as_str(), "two");
        }
    }

    #[tokio::test]
    async fn a_full_queue_evicts_only_that_member() {
        let fanout = Fanout::new(2);
        let slow = fanout.join(CancellationToken::new());
        let mut fast = fanout.join(CancellationToken::new());
        for i in 0..3 {
            fanout.deliver(&Utf8Bytes::from(i.to_string()));
            // The fast member keeps up.
            assert_eq!(fast.rx.recv().await.unwrap().as_str(), i.to_string());
        }
        assert!(slow.stop.is_cancelled());
        assert!(!fast.stop.is_cancelled());
        assert_eq!(fanout.len(), 1);
        assert_eq!(fanout.deliver(&Utf8Bytes::from("next")), 1);
    }

    #[tokio::test]
    async fn dropping_a_member_unregisters_it() {
        let fanout = Fanout::new(2);
        let member = fanout.join(CancellationToken::new());
        assert_eq!(fanout.len(), 1);
        drop(member);
        assert_eq!(fanout.len(), 0);
        assert_eq!(fanout.deliver(&Utf8Bytes::from("x")), 0);
    }
}
