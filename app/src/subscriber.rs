//! The Redis subscriber: the channel's messages into this instance's fan-out, surviving Redis
//! going away.
//!
//! One task loops: connect, `SUBSCRIBE` the channel, check that the publishing connection
//! answers, raise the `subscribed` flag (which makes `/healthz` 200 and lets senders
//! publish), then forward every payload that is a JSON object,
//! byte for byte, to [`Fanout::deliver`]. A `PING` every [`PING_INTERVAL`] catches a connection
//! that died without closing. When the connection ends the flag drops (503, senders get an
//! error) and the loop waits a capped, doubling [`Backoff`] before resubscribing. It ends only
//! when `stop` is cancelled; Redis going away never ends the process.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::RedisConfig;
use crate::fanout::Fanout;
use crate::protocol;

/// How often an idle subscription is checked with `PING`.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long connecting, subscribing or a `PING` may take before the connection counts as lost.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the subscription until `stop` is cancelled.
pub async fn run(
    config: RedisConfig,
    mut publisher: ConnectionManager,
    fanout: Arc<Fanout>,
    subscribed: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let RedisConfig {
        client,
        display: server,
        channel,
        reconnect_min,
        reconnect_max,
    } = config;
    let mut backoff = Backoff::new(reconnect_min, reconnect_max);
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            attempt = tokio::time::timeout(
                REDIS_TIMEOUT,
                subscribe(&client, &channel, &mut publisher),
            ) => attempt,
        };
        match attempt {
            Ok(Ok(pubsub)) => {
                subscribed.store(true, Ordering::Release);
                backoff.reset();
                tracing::info!(%server, %channel, "subscribed to Redis channel");
                let reason = pump(pubsub, &fanout, &stop).await;
                subscribed.store(false, Ordering::Release);
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

/// Subscribes, then checks the publishing connection too, so that once `/healthz` says 200
/// the first message a client sends goes through: after an outage the publisher still holds
/// its dead connection, and only a failed command makes it reconnect.
async fn subscribe(
    client: &redis::Client,
    channel: &str,
    publisher: &mut ConnectionManager,
) -> redis::RedisResult<redis::aio::PubSub> {
    let mut pubsub = client.get_async_pubsub().await?;
    pubsub.subscribe(channel).await?;
    let ping = redis::cmd("PING");
    if let Err(e) = ping.query_async::<String>(publisher).await {
        if !(e.is_connection_dropped() || e.is_io_error()) {
            return Err(e);
        }
        // That was the connection from before; the manager has reconnected for this one.
        ping.query_async::<String>(publisher).await?;
    }
    Ok(pubsub)
}

/// Forwards messages until the connection is lost (the reason is returned) or `stop`.
async fn pump(pubsub: redis::aio::PubSub, fanout: &Fanout, stop: &CancellationToken) -> String {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return "stopping".to_owned(),
            message = stream.next() => {
                let Some(message) = message else {
                    return "connection closed".to_owned();
                };
                forward(message.get_payload_bytes(), fanout);
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

/// Hands a channel payload to the fan-out unchanged if it is a JSON object in UTF-8.
fn forward(payload: &[u8], fanout: &Fanout) {
    let Ok(text) = std::str::from_utf8(payload) else {
        tracing::warn!(
            bytes = payload.len(),
            "dropped a channel message that is not UTF-8"
        );
        return;
    };
    if !protocol::is_chat_payload(text) {
        tracing::warn!(
            bytes = payload.len(),
            "dropped a channel message that is not a JSON object"
        );
        return;
    }
    let delivered = fanout.deliver(&Utf8Bytes::from(text));
    tracing::trace!(
        delivered,
        bytes = payload.len(),
        "delivered a channel message"
    );
}
