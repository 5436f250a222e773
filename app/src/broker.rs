//! The broker: how a message accepted by this instance reaches every instance's clients.
//!
//! With Redis configured, [`Broker::publish`] sends the serialised message to the channel and
//! the subscriber task (see `subscriber`) brings every message of the channel, this instance's
//! own included, back into the local [`Fanout`]. Without Redis, publishing is delivering to the
//! local fan-out directly, so a single instance needs nothing else. Either way a message the
//! broker cannot take is an error the sender is told about, never a silent drop; with Redis,
//! that includes a `PUBLISH` no subscriber received, not even this instance's own subscription.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::ws::Utf8Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RedisConfig;
use crate::fanout::Fanout;
use crate::subscriber;

/// Publishing a response to Redis must not stall a sender for long.
const PUBLISH_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Each connection attempt of the publishing connection.
const PUBLISH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a message was not published; the text is what the sender reads in `error`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The subscription is down: other instances might get the message, this one would not.
    #[error("message not sent: the server is reconnecting to Redis; try again shortly")]
    SubscriptionDown,
    /// Redis refused or did not answer the `PUBLISH`.
    #[error("message not sent: Redis is unreachable; try again shortly")]
    Redis(#[source] redis::RedisError),
}

/// An error setting up the broker.
#[derive(Debug, thiserror::Error)]
#[error("could not set up the Redis connection to {server}")]
pub struct BrokerError {
    server: String,
    #[source]
    source: redis::RedisError,
}

/// Redis pub/sub or the in-process broker; cheap to clone.
#[derive(Clone)]
pub enum Broker {
    /// No Redis: a published message goes straight to this instance's clients.
    Local(Arc<Fanout>),
    /// Redis pub/sub across instances.
    Redis(Arc<RedisBroker>),
}

/// The Redis side: an auto-reconnecting publishing connection and the subscription's state.
pub struct RedisBroker {
    publisher: ConnectionManager,
    config: RedisConfig,
    fanout: Arc<Fanout>,
    subscribed: Arc<AtomicBool>,
}

impl Broker {
    /// Redis when `redis` is set, in-process otherwise. Connects lazily: Redis need not be up.
    /// Must run inside a Tokio runtime.
    pub fn new(redis: Option<&RedisConfig>, fanout: Arc<Fanout>) -> Result<Broker, BrokerError> {
        let Some(config) = redis else {
            return Ok(Broker::Local(fanout));
        };
        // The redis crate builds its rustls configuration (rediss://) from the process-wide
        // crypto provider; make it ring, the one this workspace builds. An error only means a
        // provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let manager_config = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(config.reconnect_max)
            .set_connection_timeout(Some(PUBLISH_CONNECT_TIMEOUT))
            .set_response_timeout(Some(PUBLISH_RESPONSE_TIMEOUT));
        let publisher =
            ConnectionManager::new_lazy_with_config(config.client.clone(), manager_config)
                .map_err(|source| BrokerError {
                    server: config.display.clone(),
                    source,
                })?;
        Ok(Broker::Redis(Arc::new(RedisBroker {
            publisher,
            config: config.clone(),
            fanout,
            subscribed: Arc::new(AtomicBool::new(false)),
        })))
    }

    /// Starts the background work the broker needs (the Redis subscriber) on `tracker`; it
    /// stops when `stop` is cancelled.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if let Broker::Redis(redis) = self {
            let task = subscriber::run(
                redis.config.clone(),
                redis.publisher.clone(),
                Arc::clone(&redis.fanout),
                Arc::clone(&redis.subscribed),
                stop,
            );
            tracker.spawn(task);
        }
    }

    /// Whether messages can flow: always for the in-process broker, while subscribed for Redis.
    pub fn is_up(&self) -> bool {
        match self {
            Broker::Local(_) => true,
            Broker::Redis(redis) => redis.subscribed.load(Ordering::Acquire),
        }
    }

    /// Sends one serialised chat message to every instance.
    pub async fn publish(&self, payload: String) -> Result<(), PublishError> {
        match self {
            Broker::Local(fanout) => {
                fanout.deliver(&Utf8Bytes::from(payload));
                Ok(())
            }
            Broker::Redis(redis) => {
                if !redis.subscribed.load(Ordering::Acquire) {
                    return Err(PublishError::SubscriptionDown);
                }
                let mut connection = redis.publisher.clone();
                let receivers = redis::cmd("PUBLISH")
                    .arg(&redis.config.channel)
                    .arg(payload)
                    .query_async::<i64>(&mut connection)
                    .await
                    .map_err(|e| {
                        tracing::warn!(server = %redis.config.display, error = %e, "publish failed");
                        PublishError::Redis(e)
                    })?;
                delivered(receivers).inspect_err(|_| {
                    tracing::warn!(
                        server = %redis.config.display,
                        channel = %redis.config.channel,
                        "published to no subscriber, not even this instance: its subscription \
                         is gone at Redis; the sender is told to retry"
                    );
                })
            }
        }
    }
}

/// What `PUBLISH` answering `receivers` means. This instance is subscribed to the channel
/// whenever it publishes, so no receiver at all means its own subscription is gone at the Redis
/// end (Redis restarted, the connection was cut) before the subscriber noticed: its clients
/// would never see the message.
fn delivered(receivers: i64) -> Result<(), PublishError> {
    if receivers > 0 {
        Ok(())
    } else {
        Err(PublishError::SubscriptionDown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_receiver_means_the_subscription_is_down() {
        assert!(matches!(delivered(0), Err(PublishError::SubscriptionDown)));
        assert!(delivered(1).is_ok());
        assert!(delivered(3).is_ok());
    }
}
