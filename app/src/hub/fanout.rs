//! Local fan-out of chat messages to this instance's WebSocket clients.
//!
//! The room's inlet hands every message of the channel to [`Fanout::deliver`] once, already
//! serialised as [`Utf8Bytes`] with its id read once ([`Delivery`]); cloning it only bumps a
//! reference count, so a thousand clients share one buffer. Each client registered with
//! [`Fanout::join`] owns a bounded queue ([`Member`]). A client whose queue is full is not
//! skipped silently and does not slow the others: it is removed and its `stop` token cancelled,
//! and its connection task closes it with 1013 (try again later), after which the page
//! reconnects and resumes from its last id. [`Fanout::evict_all`] does the same to every client
//! when this instance itself has lost track of the channel (a gap it cannot fill), so that each
//! client learns it through its own resume instead of missing messages silently.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::history::Delivery;

/// Why the fan-out let a client go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its queue was full: it cannot keep up.
    TooSlow,
    /// This instance missed part of the channel and cannot fill the gap itself; the client's
    /// resume tells it what it can recover.
    Gap,
}

/// Every local client's queue, keyed by a per-instance id.
#[derive(Debug)]
pub struct Fanout {
    clients: Mutex<HashMap<u64, Client>>,
    next_id: AtomicU64,
    queue: usize,
}

#[derive(Debug)]
struct Client {
    tx: mpsc::Sender<Delivery>,
    stop: CancellationToken,
    evicted: Arc<OnceLock<Eviction>>,
}

/// One client's end: its queue of messages to send and the token that ends it.
#[derive(Debug)]
pub struct Member {
    id: u64,
    /// Messages to write to this client, in channel order.
    pub rx: mpsc::Receiver<Delivery>,
    /// Cancelled when this client is evicted, or when `stop`'s parent is.
    pub stop: CancellationToken,
    /// Why the fan-out let this client go, once it did.
    pub evicted: Arc<OnceLock<Eviction>>,
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
        let evicted = Arc::new(OnceLock::new());
        self.lock().insert(
            id,
            Client {
                tx,
                stop: stop.clone(),
                evicted: Arc::clone(&evicted),
            },
        );
        Member {
            id,
            rx,
            stop,
            evicted,
            fanout: Arc::clone(self),
        }
    }

    /// Queues `message` for every client; evicts those whose queue is full. Returns how many
    /// clients it was queued for.
    pub fn deliver(&self, message: &Delivery) -> usize {
        let mut clients = self.lock();
        let before = clients.len();
        clients.retain(|id, client| match client.tx.try_send(message.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(client = id, "client queue full: disconnecting slow client");
                client.evict(Eviction::TooSlow);
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

    /// Lets every client go with `reason`; returns how many there were.
    pub fn evict_all(&self, reason: Eviction) -> usize {
        let mut clients = self.lock();
        let count = clients.len();
        for client in clients.values() {
            client.evict(reason);
        }
        clients.clear();
        count
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

impl Client {
    fn evict(&self, reason: Eviction) {
        // The first reason wins; a client is let go once.
        let _ = self.evicted.set(reason);
        self.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use axum::extract::ws::Utf8Bytes;

    use super::*;

    fn text(text: &str) -> Delivery {
        Delivery {
            id: None,
            text: Utf8Bytes::from(text),
        }
    }

    #[tokio::test]
    async fn every_member_gets_the_same_bytes_in_order() {
        let fanout = Fanout::new(4);
        let mut a = fanout.join(CancellationToken::new());
        let mut b = fanout.join(CancellationToken::new());
        assert_eq!(fanout.deliver(&text("one")), 2);
        assert_eq!(fanout.deliver(&text("two")), 2);
        for member in [&mut a, &mut b] {
            assert_eq!(member.rx.recv().await.unwrap().text.as_str(), "one");
            assert_eq!(member.rx.recv().await.unwrap().text.as_str(), "two");
        }
    }

    #[tokio::test]
    async fn a_full_queue_evicts_only_that_member() {
        let fanout = Fanout::new(2);
        let slow = fanout.join(CancellationToken::new());
        let mut fast = fanout.join(CancellationToken::new());
        for i in 0..3 {
            fanout.deliver(&text(&i.to_string()));
            // The fast member keeps up.
            assert_eq!(fast.rx.recv().await.unwrap().text.as_str(), i.to_string());
        }
        assert!(slow.stop.is_cancelled());
        assert_eq!(slow.evicted.get(), Some(&Eviction::TooSlow));
        assert!(!fast.stop.is_cancelled());
        assert_eq!(fanout.len(), 1);
        assert_eq!(fanout.deliver(&text("next")), 1);
    }

    #[tokio::test]
    async fn dropping_a_member_unregisters_it() {
        let fanout = Fanout::new(2);
        let member = fanout.join(CancellationToken::new());
        assert_eq!(fanout.len(), 1);
        drop(member);
        assert_eq!(fanout.len(), 0);
        assert_eq!(fanout.deliver(&text("x")), 0);
    }

    #[tokio::test]
    async fn evicting_everyone_stops_each_member_with_the_reason() {
        let fanout = Fanout::new(2);
        let a = fanout.join(CancellationToken::new());
        let b = fanout.join(CancellationToken::new());
        assert_eq!(fanout.evict_all(Eviction::Gap), 2);
        for member in [&a, &b] {
            assert!(member.stop.is_cancelled());
            assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
        }
        assert_eq!(fanout.len(), 0);
    }
}
