//! The broker: how a message accepted by this instance reaches every instance's clients, and
//! how a reconnecting client gets what it missed.
//!
//! With Redis configured, [`Broker::publish`] runs the history script of `stream`: the message
//! is added to the channel's Stream (its id assigned there) and published on the channel in one
//! step; the subscriber task (see `subscriber`) brings every message of the channel, this
//! instance's own included, back into the local [`Fanout`], and catches up from the Stream after
//! losing Redis for a while. Without Redis, the in-process `ring` assigns ids and keeps the
//! history, and publishing is delivering to the local fan-out directly, so a single instance
//! needs nothing else. Either way a message the broker cannot take is an error the sender is
//! told about, never a silent drop, and [`Broker::resume`] reads the history for a client
//! coming back with its last position.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{HistoryConfig, RedisConfig};
use crate::fanout::Fanout;
use crate::history::{self, Published, Resume};
use crate::position::Position;
use crate::ring::Ring;
use crate::stream::{Receivers, Stream};
use crate::subscriber;

/// Publishing a response to Redis must not stall a sender for long.
const PUBLISH_RESPONSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);
/// Each connection attempt of the publishing connection.
const PUBLISH_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a message was not published; the text is what the sender reads in `error`.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// Redis refused or did not answer.
    #[error("message not sent: Redis is unreachable; try again shortly")]
    Redis(#[source] redis::RedisError),
}

/// Why the history could not be read for a resuming client: it should try again shortly.
#[derive(Debug, thiserror::Error)]
#[error("the message history is unreachable")]
pub struct ResumeError(#[source] redis::RedisError);

/// An error setting up the broker.
#[derive(Debug, thiserror::Error)]
#[error("could not set up the Redis connection to {server}")]
pub struct BrokerError {
    server: String,
    #[source]
    source: redis::RedisError,
}

/// Redis pub/sub with its Stream history, or the in-process broker; cheap to clone.
#[derive(Clone)]
pub enum Broker {
    /// No Redis: a published message goes straight to this instance's clients.
    Local(Arc<LocalBroker>),
    /// Redis pub/sub and history across instances.
    Redis(Arc<RedisBroker>),
}

/// The in-process side: the history and the clients.
pub struct LocalBroker {
    ring: Ring,
    fanout: Arc<Fanout>,
}

/// The Redis side: an auto-reconnecting connection for publishing and reading history, and the
/// subscription's state.
pub struct RedisBroker {
    publisher: ConnectionManager,
    config: RedisConfig,
    stream: Arc<Stream>,
    fanout: Arc<Fanout>,
    subscribed: Arc<AtomicBool>,
    /// Raised once the subscriber knows where the channel stands (its first subscription):
    /// before that, a client could miss a message published before that position was read.
    positioned: Arc<AtomicBool>,
    /// Told when a publish reached no subscriber at all: this instance's subscription is gone
    /// at Redis even though its connection looks alive, so the subscriber starts over at once.
    resubscribe: Arc<Notify>,
}

impl Broker {
    /// Redis when `redis` is set, in-process otherwise. Connects lazily: Redis need not be up.
    /// Must run inside a Tokio runtime.
    pub fn new(
        redis: Option<&RedisConfig>,
        history: HistoryConfig,
        fanout: Arc<Fanout>,
    ) -> Result<Broker, BrokerError> {
        let Some(config) = redis else {
            return Ok(Broker::Local(Arc::new(LocalBroker {
                ring: Ring::new(history),
                fanout,
            })));
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
            stream: Arc::new(Stream::new(&config.channel, history)),
            config: config.clone(),
            fanout,
            subscribed: Arc::new(AtomicBool::new(false)),
            positioned: Arc::new(AtomicBool::new(false)),
            resubscribe: Arc::new(Notify::new()),
        })))
    }

    /// Starts the background work the broker needs (the Redis subscriber) on `tracker`; it
    /// stops when `stop` is cancelled.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if let Broker::Redis(redis) = self {
            let task = subscriber::run(
                subscriber::Subscriber {
                    config: redis.config.clone(),
                    publisher: redis.publisher.clone(),
                    stream: Arc::clone(&redis.stream),
                    fanout: Arc::clone(&redis.fanout),
                    subscribed: Arc::clone(&redis.subscribed),
                    positioned: Arc::clone(&redis.positioned),
                    resubscribe: Arc::clone(&redis.resubscribe),
                },
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

    /// Whether clients may join: always for the in-process broker; with Redis, once the
    /// subscriber has subscribed for the first time (and stays so through later outages, which
    /// the subscriber catches up on for every client).
    pub fn accepts_clients(&self) -> bool {
        match self {
            Broker::Local(_) => true,
            Broker::Redis(redis) => redis.positioned.load(Ordering::Acquire),
        }
    }

    /// Adds one serialised chat message (`body`) to the history and sends it to every
    /// instance, unless `cid` was published already; says where it is.
    pub async fn publish(&self, body: &str, cid: Option<&str>) -> Result<Published, PublishError> {
        match self {
            Broker::Local(local) => {
                let (published, delivery) = local.ring.publish(body, cid);
                if let Some(delivery) = delivery {
                    local.fanout.deliver(&delivery);
                }
                Ok(published)
            }
            Broker::Redis(redis) => {
                let mut connection = redis.publisher.clone();
                let (published, receivers) = redis
                    .stream
                    .publish(&mut connection, body, cid)
                    .await
                    .map_err(|e| {
                        tracing::warn!(server = %redis.config.display, error = %e, "publish failed");
                        PublishError::Redis(e)
                    })?;
                if receivers == Receivers::None {
                    // This instance is subscribed whenever it publishes, so no receiver means
                    // its subscription is gone at Redis. The message is in the history; the
                    // subscriber starts over and delivers it from there.
                    tracing::warn!(
                        server = %redis.config.display,
                        channel = %redis.config.channel,
                        "published to no subscriber, not even this instance: resubscribing"
                    );
                    redis.resubscribe.notify_one();
                }
                Ok(published)
            }
        }
    }

    /// What a client at `from` missed (`None`: a fresh client, which only learns where the
    /// history stands).
    pub async fn resume(&self, from: Option<&Position>) -> Result<Resume, ResumeError> {
        let snapshot = match self {
            Broker::Local(local) => local.ring.read(from),
            Broker::Redis(redis) => {
                let mut connection = redis.publisher.clone();
                redis
                    .stream
                    .read(&mut connection, from)
                    .await
                    .map_err(|e| {
                        tracing::warn!(server = %redis.config.display, error = %e, "history read failed");
                        ResumeError(e)
                    })?
            }
        };
        Ok(history::resume(snapshot, from))
    }
}
