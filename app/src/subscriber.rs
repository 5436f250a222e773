//! The Redis subscriber: the channel's messages into this instance's fan-out, surviving Redis
//! going away without losing any.
//!
//! One task loops: connect, `SUBSCRIBE` the channel, check that the publishing connection
//! answers, then catch up: read from the channel's history (`stream`) everything after the
//! last message this instance delivered, and deliver it, before raising the `subscribed` flag
//! (which makes `/healthz` 200). Then it forwards every payload that is a JSON object, byte for
//! byte, to [`Fanout::deliver`], skipping what the catch-up already delivered (ids only grow).
//! At the very first start the position is read before subscribing, so nothing published in
//! between is missed. A `PING` every [`PING_INTERVAL`] catches a connection that died without
//! closing; a publish that reached no subscriber makes the loop start over at once. When the
//! connection ends the flag drops (503) and the loop waits a capped, doubling [`Backoff`]
//! before the next try. It ends only when `stop` is cancelled; Redis going away never ends the
//! process.
//!
//! When the history cannot fill this instance's gap (Redis lost it: a new epoch; or it was
//! trimmed), every local client is let go ([`Eviction::Gap`]): each reconnects, resumes, and is
//! told through its own resume what it cannot recover, instead of missing messages silently.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::fanout::{Delivery, Eviction, Fanout};
use crate::history::{self, Snapshot};
use crate::position::Position;
use crate::protocol;
use crate::stream::Stream;

/// How often an idle subscription is checked with `PING`.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long connecting, subscribing, catching up or a `PING` may take before the connection
/// counts as lost.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the subscriber task works with.
pub struct Subscriber {
    /// Where Redis is and how to back off.
    pub config: RedisConfig,
    /// The shared publishing connection, also used to read the history.
    pub publisher: ConnectionManager,
    /// The channel's history.
    pub stream: Arc<Stream>,
    /// This instance's clients.
    pub fanout: Arc<Fanout>,
    /// Raised while subscribed and caught up.
    pub subscribed: Arc<AtomicBool>,
    /// Raised at the first subscription, never lowered.
    pub positioned: Arc<AtomicBool>,
    /// Notified when the subscription is known to be gone at Redis.
    pub resubscribe: Arc<Notify>,
}

/// Runs the subscription until `stop` is cancelled.
pub async fn run(mut sub: Subscriber, stop: CancellationToken) {
    let mut backoff = Backoff::new(sub.config.reconnect_min, sub.config.reconnect_max);
    let mut seen = Seen::default();
    let server = sub.config.display.clone();
    let channel = sub.config.channel.clone();
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            attempt = tokio::time::timeout(REDIS_TIMEOUT, subscribe(&mut sub, &seen)) => attempt,
        };
        match attempt {
            Ok(Ok((pubsub, snapshot))) => {
                let caught_up = seen.catch_up(snapshot, &sub.fanout);
                sub.subscribed.store(true, Ordering::Release);
                sub.positioned.store(true, Ordering::Release);
                backoff.reset();
                tracing::info!(%server, %channel, caught_up, "subscribed to Redis channel");
                let reason = pump(pubsub, &sub, &mut seen, &stop).await;
                sub.subscribed.store(false, Ordering::Release);
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!(%server, %channel, %reason, "Redis subscription lost; /healthz is 503 until it is back");
            }
            Ok(Err(e)) => {
                tracing::warn!(%server, %channel, error = %e, "could not subscribe to Redis");
            }
            Err(_) => {
                tracing::warn!(%server, %channel, timeout = ?REDIS_TIMEOUT, "subscribing to Redis timed out");
            }
        }
        let delay = backoff.next_delay();
        tracing::info!(%server, delay = ?delay, "resubscribing after a delay");
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Subscribes, checks the publishing connection (so that once `/healthz` says 200 the first
/// message a client sends goes through: after an outage the publisher still holds its dead
/// connection, and only a failed command makes it reconnect), then reads what was published
/// since `seen`'s position.
async fn subscribe(
    sub: &mut Subscriber,
    seen: &Seen,
) -> redis::RedisResult<(redis::aio::PubSub, Snapshot)> {
    let mut pubsub = sub.config.client.get_async_pubsub().await?;
    let ping = redis::cmd("PING");
    if let Err(e) = ping.query_async::<String>(&mut sub.publisher).await {
        if !(e.is_connection_dropped() || e.is_io_error()) {
            return Err(e);
        }
        // That was the connection from before; the manager has reconnected for this one.
        ping.query_async::<String>(&mut sub.publisher).await?;
    }
    // The first time, learn where the channel stands before subscribing: whatever is published
    // from then on is either caught up below or arrives on the subscription.
    let from = match &seen.last {
        Some(last) => last.clone(),
        None => {
            let now = sub.stream.read(&mut sub.publisher, None).await?;
            Position {
                epoch: now.epoch,
                last: now.last_added,
            }
        }
    };
    pubsub.subscribe(&sub.config.channel).await?;
    let snapshot = sub.stream.read(&mut sub.publisher, Some(&from)).await?;
    Ok((pubsub, snapshot))
}

/// Forwards messages until the connection is lost (the reason is returned) or `stop`.
async fn pump(
    pubsub: redis::aio::PubSub,
    sub: &Subscriber,
    seen: &mut Seen,
    stop: &CancellationToken,
) -> String {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return "stopping".to_owned(),
            () = sub.resubscribe.notified() => {
                return "a publish reached no subscriber: the subscription is gone at Redis".to_owned();
            }
            message = stream.next() => {
                let Some(message) = message else {
                    return "connection closed".to_owned();
                };
                seen.forward(message.get_payload_bytes(), &sub.fanout);
            }
            _ = ping.tick() => {
                match tokio::time::timeout(REDIS_TIMEOUT, sink.ping::<redis::Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("PING failed: {e}"),
                    Err(_) => return "PING timed out".to_owned(),
                }
            }
        }
    }
}

/// How far this instance has delivered the channel: the position of the last message with an
/// id handed to the fan-out.
#[derive(Debug, Default)]
struct Seen {
    last: Option<Position>,
}

impl Seen {
    /// Delivers what a history read after the current position holds; returns how many. When
    /// the gap cannot be filled, every local client is let go (see the module doc).
    fn catch_up(&mut self, snapshot: Snapshot, fanout: &Fanout) -> usize {
        let resume = history::resume(snapshot, self.last.as_ref());
        if !resume.recovered {
            let clients = fanout.evict_all(Eviction::Gap);
            tracing::warn!(
                reason = resume.reason.unwrap_or("-"),
                clients,
                "this instance missed messages it cannot recover; its clients reconnect and resume"
            );
        }
        let count = resume.missed.len();
        for delivery in &resume.missed {
            fanout.deliver(delivery);
        }
        self.last = Some(Position {
            epoch: resume.epoch,
            last: resume.last,
        });
        count
    }

    /// Hands a channel payload to the fan-out unchanged if it is a JSON object in UTF-8 and not
    /// already delivered.
    fn forward(&mut self, payload: &[u8], fanout: &Fanout) {
        let Ok(text) = std::str::from_utf8(payload) else {
            tracing::warn!(
                bytes = payload.len(),
                "dropped a channel message that is not UTF-8"
            );
            return;
        };
        let Some(stamp) = protocol::read_channel_payload(text) else {
            tracing::warn!(
                bytes = payload.len(),
                "dropped a channel message that is not a JSON object"
            );
            return;
        };
        if let (Some(id), Some(epoch)) = (stamp.id, stamp.epoch) {
            match &mut self.last {
                Some(last) if last.epoch == epoch => {
                    if id <= last.last {
                        tracing::trace!(%id, "skipped a message the catch-up delivered");
                        return;
                    }
                    last.last = id;
                }
                last => {
                    if last.is_some() {
                        let clients = fanout.evict_all(Eviction::Gap);
                        tracing::warn!(%epoch, clients, "the channel's history was reset (new epoch); clients reconnect and resume");
                    }
                    *last = Some(Position { epoch, last: id });
                }
            }
        }
        let delivered = fanout.deliver(&Delivery {
            id: stamp.id,
            text: Utf8Bytes::from(text),
        });
        tracing::trace!(
            delivered,
            bytes = payload.len(),
            "delivered a channel message"
        );
    }
}

#[cfg(test)]
mod tests {
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::position::MessageId;

    fn id(ms: u64) -> MessageId {
        MessageId { ms, seq: 0 }
    }

    fn payload(ms: u64, epoch: &str) -> String {
        protocol::with_position(r#"{"content":"x"}"#, id(ms), epoch)
    }

    fn snapshot(epoch: &str, last_added: u64, after: &[u64]) -> Snapshot {
        Snapshot {
            epoch: epoch.into(),
            last_added: id(last_added),
            max_trimmed: MessageId::ZERO,
            after: after
                .iter()
                .map(|&ms| Delivery {
                    id: Some(id(ms)),
                    text: Utf8Bytes::from(payload(ms, epoch)),
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn what_the_catch_up_delivered_is_not_delivered_again() {
        let fanout = Fanout::new(16);
        let mut member = fanout.join(CancellationToken::new());
        let mut seen = Seen {
            last: Some(Position {
                epoch: "e".into(),
                last: id(1),
            }),
        };
        assert_eq!(seen.catch_up(snapshot("e", 3, &[2, 3]), &fanout), 2);
        // The subscription brings 2 and 3 again (published between SUBSCRIBE and the read),
        // then 4, and a message of the original app, which has no id.
        for ms in [2, 3, 4] {
            seen.forward(payload(ms, "e").as_bytes(), &fanout);
        }
        seen.forward(br#"{"name":"py","content":"hi"}"#, &fanout);
        let mut got = Vec::new();
        while let Ok(d) = member.rx.try_recv() {
            got.push(d.id.map(|i| i.ms));
        }
        assert_eq!(got, [Some(2), Some(3), Some(4), None]);
        assert!(!member.stop.is_cancelled());
    }

    #[tokio::test]
    async fn a_gap_the_history_cannot_fill_lets_every_client_go() {
        let fanout = Fanout::new(16);
        let member = fanout.join(CancellationToken::new());
        let mut seen = Seen {
            last: Some(Position {
                epoch: "old".into(),
                last: id(7),
            }),
        };
        seen.catch_up(snapshot("new", 2, &[]), &fanout);
        assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
        assert_eq!(
            seen.last,
            Some(Position {
                epoch: "new".into(),
                last: id(2)
            })
        );
    }

    #[tokio::test]
    async fn a_new_epoch_on_the_subscription_lets_every_client_go() {
        let fanout = Fanout::new(16);
        let member = fanout.join(CancellationToken::new());
        let mut seen = Seen::default();
        seen.forward(payload(5, "a").as_bytes(), &fanout);
        assert!(
            !member.stop.is_cancelled(),
            "the first epoch seen is no change"
        );
        seen.forward(payload(1, "b").as_bytes(), &fanout);
        assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
    }
}
