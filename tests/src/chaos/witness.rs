//! The witness: what was really published. A connection straight to Redis, subscribed to the
//! chat channel (no app, no `lb` in between), records every message of the run in the order
//! Redis published it, with the time it saw it. On a Redis Cluster (a `redis+cluster://` URL)
//! it subscribes to the channel as a shard channel (`SSUBSCRIBE`) and starts over when a
//! node's connection is lost or the server drops the subscription (its slot moved).
//!
//! When Redis goes away the witness reconnects every [`RETRY`] and, once subscribed again, reads
//! the channel's history Stream after the last id it holds (`XRANGE`), so a message published
//! between Redis coming back and the witness resubscribing is still counted. The same message
//! seen twice under one id (subscription and history overlap) counts once; the same content
//! under two ids was published twice, a duplicate the server should have refused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};
use tokio_util::sync::CancellationToken;

use super::{Key, parse_content};
use crate::stack::CHANNEL;

/// Pause between two attempts to reach Redis.
const RETRY: Duration = Duration::from_millis(20);
/// Longest wait for the first subscription.
const SUBSCRIBE_WITHIN: Duration = Duration::from_secs(10);

/// One message of the run as Redis published it.
#[derive(Debug, Clone, Copy)]
pub struct Published {
    /// Which message (sender and sequence number).
    pub key: Key,
    /// When the witness saw it.
    pub at: Instant,
}

/// Everything the witness saw.
#[derive(Debug, Default)]
pub struct Seen {
    /// The run's messages in publication order, each once.
    pub messages: Vec<Published>,
    /// Messages published again under another id.
    pub duplicates: u64,
    /// Messages read from the history after a reconnect rather than from the subscription.
    pub caught_up: u64,
    /// The id each message got.
    ids: HashMap<Key, String>,
    /// The newest id seen.
    last_id: Option<String>,
}

impl Seen {
    pub(super) fn record(&mut self, key: Key, id: Option<String>, count: &AtomicUsize) -> bool {
        match (self.ids.get(&key), &id) {
            (Some(known), Some(id)) if known == id => return false,
            (Some(_), _) => {
                self.duplicates += 1;
                return false;
            }
            (None, _) => {}
        }
        if let Some(id) = id {
            self.last_id = Some(id.clone());
            self.ids.insert(key, id);
        }
        self.messages.push(Published {
            key,
            at: Instant::now(),
        });
        count.store(self.messages.len(), Ordering::Release);
        true
    }
}

/// Where the witness looks: one server, or a cluster's seed nodes.
#[derive(Clone)]
enum Target {
    One(Box<::redis::Client>),
    Cluster(Vec<String>),
}

impl Target {
    fn new(url: &str) -> Result<Target> {
        Ok(match url.strip_prefix("redis+cluster://") {
            Some(seeds) => Target::Cluster(
                seeds
                    .split(',')
                    .map(|seed| format!("redis://{seed}/?protocol=resp3"))
                    .collect(),
            ),
            None => Target::One(Box::new(
                ::redis::Client::open(url).with_context(|| format!("bad Redis URL {url}"))?,
            )),
        })
    }

    fn cluster(
        seeds: &[String],
        push: Option<mpsc::UnboundedSender<::redis::PushInfo>>,
    ) -> ::redis::RedisResult<::redis::cluster::ClusterClient> {
        let mut builder = ::redis::cluster::ClusterClientBuilder::new(seeds.to_vec())
            .use_protocol(::redis::ProtocolVersion::RESP3);
        if let Some(push) = push {
            builder = builder.push_sender(push);
        }
        builder.build()
    }

    /// Subscribes to the chat channel; the payloads arrive on the returned stream until the
    /// subscription is lost.
    async fn subscribe(&self) -> ::redis::RedisResult<Payloads> {
        match self {
            Target::One(client) => {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe(CHANNEL).await?;
                Ok(Payloads::One(Box::pin(pubsub.into_on_message())))
            }
            Target::Cluster(seeds) => {
                let (tx, rx) = mpsc::unbounded_channel();
                let mut conn = Self::cluster(seeds, Some(tx))?
                    .get_async_connection()
                    .await?;
                conn.ssubscribe(CHANNEL).await?;
                Ok(Payloads::Cluster { _conn: conn, rx })
            }
        }
    }

    /// `XRANGE` of the chat channel's history from `start`.
    async fn history(&self, start: &str) -> Result<Vec<(String, Vec<String>)>> {
        let mut xrange = ::redis::cmd("XRANGE");
        xrange
            .arg(format!("{{{CHANNEL}}}:history"))
            .arg(start)
            .arg("+");
        Ok(match self {
            Target::One(client) => {
                xrange
                    .query_async(&mut client.get_multiplexed_async_connection().await?)
                    .await?
            }
            Target::Cluster(seeds) => {
                xrange
                    .query_async(&mut Self::cluster(seeds, None)?.get_async_connection().await?)
                    .await?
            }
        })
    }
}

/// The chat channel's payloads while subscribed.
enum Payloads {
    One(std::pin::Pin<Box<dyn futures_util::Stream<Item = ::redis::Msg> + Send>>),
    /// The connection's push messages; the connection is kept open while they are read.
    Cluster {
        _conn: ::redis::cluster_async::ClusterConnection,
        rx: mpsc::UnboundedReceiver<::redis::PushInfo>,
    },
}

impl Payloads {
    /// The next payload; `None` once the subscription is lost.
    async fn next(&mut self) -> Option<Vec<u8>> {
        match self {
            Payloads::One(messages) => messages
                .next()
                .await
                .map(|m| m.get_payload_bytes().to_vec()),
            Payloads::Cluster { rx, .. } => loop {
                let push = rx.recv().await?;
                match push.kind {
                    ::redis::PushKind::SMessage => {
                        if let Some(m) = ::redis::Msg::from_push_info(push) {
                            return Some(m.get_payload_bytes().to_vec());
                        }
                    }
                    ::redis::PushKind::SUnsubscribe | ::redis::PushKind::Disconnection => {
                        return None;
                    }
                    _ => {}
                }
            },
        }
    }
}

/// The running witness.
pub struct Witness {
    client: Target,
    run: u32,
    seen: Arc<Mutex<Seen>>,
    count: Arc<AtomicUsize>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Witness {
    /// Subscribes to the chat channel of the Redis at `url` and returns once subscribed.
    pub async fn start(url: &str, run: u32) -> Result<Witness> {
        let client = Target::new(url)?;
        let seen = Arc::new(Mutex::new(Seen::default()));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (subscribed, first) = oneshot::channel();
        let task = tokio::spawn(watch(
            client.clone(),
            run,
            Arc::clone(&seen),
            Arc::clone(&count),
            stop.clone(),
            subscribed,
        ));
        timeout(SUBSCRIBE_WITHIN, first)
            .await
            .map_err(|_| {
                anyhow!("the witness could not subscribe to {url} within {SUBSCRIBE_WITHIN:?}")
            })?
            .context("the witness stopped")?;
        Ok(Witness {
            client,
            run,
            seen,
            count,
            stop,
            task,
        })
    }

    /// How many of the run's messages were published so far, as a shared counter.
    pub fn counter(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.count)
    }

    /// A shared view of what the witness saw.
    pub fn seen(&self) -> &Mutex<Seen> {
        &self.seen
    }

    /// When the newest message was published.
    pub fn last_at(&self) -> Option<Instant> {
        lock(&self.seen).messages.last().map(|m| m.at)
    }

    /// Stops watching and hands over what was seen, after one last read of the whole history:
    /// a catch-up after a Redis restart can fail (Redis still loading its append-only file)
    /// while later messages arrive live, and a message published in between would otherwise
    /// go uncounted.
    pub async fn finish(self) -> Seen {
        self.stop.cancel();
        let _ = self.task.await;
        if let Err(e) = catch_up(&self.client, self.run, &self.seen, &self.count, true).await {
            eprintln!("chaos: the witness's final read of the history failed: {e:#}");
        }
        std::mem::take(&mut *lock(&self.seen))
    }
}

/// Locks a mutex, accepting one a panicking holder poisoned (the data is counters).
pub(super) fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A payload on the channel or in the history: only the content matters.
#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    id: Option<String>,
}

async fn watch(
    client: Target,
    run: u32,
    seen: Arc<Mutex<Seen>>,
    count: Arc<AtomicUsize>,
    stop: CancellationToken,
    subscribed: oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    while !stop.is_cancelled() {
        let payloads = tokio::select! {
            attempt = client.subscribe() => attempt,
            () = stop.cancelled() => return,
        };
        let Ok(mut payloads) = payloads else {
            tokio::select! {
                () = tokio::time::sleep(RETRY) => continue,
                () = stop.cancelled() => return,
            }
        };
        match subscribed.take() {
            Some(first) => {
                let _ = first.send(());
            }
            // Subscribed again: what was published while the witness was away is in the
            // history. A failure here only means Redis went away again.
            None => {
                let _ = catch_up(&client, run, &seen, &count, false).await;
            }
        }
        loop {
            tokio::select! {
                payload = payloads.next() => {
                    let Some(payload) = payload else { break };
                    let Ok(body) = serde_json::from_slice::<Body>(&payload) else { continue };
                    if let Some(key) = body.content.as_deref().and_then(|c| parse_content(c, run)) {
                        lock(&seen).record(key.key, body.id, &count);
                    }
                }
                () = stop.cancelled() => return,
            }
        }
    }
}

/// Records the history's entries after the newest id the witness holds (or all of them).
async fn catch_up(
    client: &Target,
    run: u32,
    seen: &Mutex<Seen>,
    count: &AtomicUsize,
    whole: bool,
) -> Result<()> {
    let after = if whole {
        None
    } else {
        lock(seen).last_id.clone()
    };
    let start = after.map_or_else(|| "-".to_owned(), |id| format!("({id}"));
    let entries = client.history(&start).await?;
    let mut seen = lock(seen);
    for (id, fields) in entries {
        // Fields come as name, value, ...; the body is in `p`.
        let body = fields
            .chunks(2)
            .find(|pair| pair[0] == "p")
            .and_then(|pair| pair.get(1));
        let Some(Ok(body)) = body.map(|b| serde_json::from_str::<Body>(b)) else {
            continue;
        };
        let Some(key) = body.content.as_deref().and_then(|c| parse_content(c, run)) else {
            continue;
        };
        if seen.record(key.key, Some(id), count) {
            seen.caught_up += 1;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_id_counts_once_and_a_second_id_is_a_duplicate() {
        let count = AtomicUsize::new(0);
        let mut seen = Seen::default();
        let key = Key { sender: 1, seq: 2 };
        assert!(seen.record(key, Some("5-0".into()), &count));
        assert!(!seen.record(key, Some("5-0".into()), &count));
        assert_eq!((seen.messages.len(), seen.duplicates), (1, 0));
        assert!(!seen.record(key, Some("6-0".into()), &count));
        assert_eq!((seen.messages.len(), seen.duplicates), (1, 1));
        assert_eq!(count.load(Ordering::Acquire), 1);
        assert_eq!(seen.last_id.as_deref(), Some("5-0"));
    }
}
