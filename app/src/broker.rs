//! The broker: how a message accepted by this instance reaches every instance's clients in its
//! room, and how a reconnecting client gets what it missed.
//!
//! Each room (see `rooms`) has a [`Store`], its history. With Redis configured,
//! [`Store::publish`] runs the history script of `stream`: the message is added to the room's
//! Stream (its id assigned there) and published on the room's channel in one step; the
//! subscriber task (see `subscriber`), which [`Broker::start`] spawns, brings every message of
//! every room with local members, this instance's own included, back into that room's local
//! [`Fanout`], and catches up from the Streams after losing Redis for a while. Without Redis,
//! the in-process `ring` of the room assigns ids and keeps the history, and publishing is
//! delivering to the room's fan-out directly, so a single instance needs nothing else. Either
//! way a message the broker cannot take is an error the sender is told about, never a silent
//! drop, and [`Store::resume`] reads the history for a client coming back with its last
//! position.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, HistoryConfig, RedisConfig, RedisServer};
use crate::connection::Publisher;
use crate::fanout::Fanout;
use crate::history::{self, Published, Resume, Snapshot};
use crate::position::Position;
use crate::ring::Ring;
use crate::rooms::Rooms;
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

/// The rooms and, with Redis, the connection they share; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    rooms: Arc<Rooms>,
    redis: Option<Arc<RedisLink>>,
}

/// What every room's history in Redis shares: an auto-reconnecting connection for publishing
/// and reading history, and the subscription's state.
pub struct RedisLink {
    /// Publishes and reads every room's history (one multiplexed connection, or a cluster
    /// connection routing each room to its shard).
    pub publisher: Publisher,
    /// Where Redis is and how to back off.
    pub config: RedisConfig,
    /// Raised while subscribed and caught up (`/healthz` 200).
    pub subscribed: AtomicBool,
    /// Told when a publish reached no subscriber at all: this instance's subscription is gone
    /// at Redis even though its connection looks alive, so the subscriber starts over at once.
    pub resubscribe: Notify,
}

/// One room's history: a Stream in Redis shared by every instance, or in process.
pub enum Store {
    /// No Redis: a published message goes straight to this instance's clients of the room.
    Ring(Ring),
    /// The room's Stream and channel in Redis.
    Redis {
        /// The room's Stream.
        stream: Stream,
        /// The shared connection.
        link: Arc<RedisLink>,
    },
}

impl Broker {
    /// Redis when `config` names one, in-process otherwise. Connects lazily: Redis need not be
    /// up. Must run inside a Tokio runtime.
    pub fn new(config: &Config) -> Result<Broker, BrokerError> {
        let Some(redis) = &config.redis else {
            return Ok(Broker {
                rooms: Rooms::new(config, None),
                redis: None,
            });
        };
        // The redis crate builds its rustls configuration (rediss://) from the process-wide
        // crypto provider; make it ring, the one this workspace builds. An error only means a
        // provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let publisher = match &redis.server {
            RedisServer::Single(client) => {
                let manager_config = ConnectionManagerConfig::new()
                    .set_number_of_retries(1)
                    .set_max_delay(redis.reconnect_max)
                    .set_connection_timeout(Some(PUBLISH_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(PUBLISH_RESPONSE_TIMEOUT));
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                    .map(Publisher::Single)
            }
            RedisServer::Cluster(seeds) => seeds.publisher().map(Publisher::Cluster),
        }
        .map_err(|source| BrokerError {
            server: redis.display.clone(),
            source,
        })?;
        let link = Arc::new(RedisLink {
            publisher,
            config: redis.clone(),
            subscribed: AtomicBool::new(false),
            resubscribe: Notify::new(),
        });
        Ok(Broker {
            rooms: Rooms::new(config, Some(Arc::clone(&link))),
            redis: Some(link),
        })
    }

    /// The rooms of this instance.
    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }

    /// Starts the background work the broker needs (the Redis subscriber) on `tracker`; it
    /// stops when `stop` is cancelled.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if let Some(link) = &self.redis {
            let task = subscriber::run(
                subscriber::Subscriber {
                    link: Arc::clone(link),
                    rooms: Arc::clone(&self.rooms),
                },
                stop,
            );
            tracker.spawn(task);
        }
    }

    /// Whether messages can flow: always for the in-process broker, while subscribed for Redis.
    pub fn is_up(&self) -> bool {
        self.redis
            .as_ref()
            .is_none_or(|link| link.subscribed.load(Ordering::Acquire))
    }

    /// Whether clients may join: always for the in-process broker; with Redis, once the
    /// subscriber has subscribed to the default room for the first time (and stays so through
    /// later outages, which the subscriber catches up on for every client).
    pub fn accepts_clients(&self) -> bool {
        self.rooms.default_room().is_ready()
    }
}

impl Store {
    /// The history of `channel`: in Redis when `redis` is given, in process otherwise.
    pub fn new(channel: &str, history: HistoryConfig, redis: Option<&Arc<RedisLink>>) -> Store {
        match redis {
            None => Store::Ring(Ring::new(history)),
            Some(link) => Store::Redis {
                stream: Stream::new(channel, history, link.config.server.is_cluster()),
                link: Arc::clone(link),
            },
        }
    }

    /// Adds one serialised chat message (`body`) to the history and sends it to every
    /// instance's members of the room (`fanout`: this instance's, for the in-process history),
    /// unless `cid` was published already; says where it is.
    pub async fn publish(
        &self,
        fanout: &Fanout,
        body: &str,
        cid: Option<&str>,
    ) -> Result<Published, PublishError> {
        match self {
            Store::Ring(ring) => {
                let (published, delivery) = ring.publish(body, cid);
                if let Some(delivery) = delivery {
                    fanout.deliver(&delivery);
                }
                Ok(published)
            }
            Store::Redis { stream, link } => {
                let mut connection = link.publisher.clone();
                let (published, receivers) = stream
                    .publish(&mut connection, body, cid)
                    .await
                    .map_err(|e| {
                        tracing::warn!(server = %link.config.display, channel = %stream.channel(), error = %e, "publish failed");
                        PublishError::Redis(e)
                    })?;
                if receivers == Receivers::None {
                    // This instance is subscribed to a room whenever one of its members
                    // publishes, so no receiver means its subscription is gone at Redis. The
                    // message is in the history; the subscriber starts over and delivers it
                    // from there.
                    tracing::warn!(
                        server = %link.config.display,
                        channel = %stream.channel(),
                        "published to no subscriber, not even this instance: resubscribing"
                    );
                    link.resubscribe.notify_one();
                }
                Ok(published)
            }
        }
    }

    /// Reads the history for a reader at `from` (a client resuming, or this instance's
    /// subscriber catching up); `None` reads only where the history stands.
    pub async fn read(&self, from: Option<&Position>) -> Result<Snapshot, redis::RedisError> {
        match self {
            Store::Ring(ring) => Ok(ring.read(from)),
            Store::Redis { stream, link } => {
                let mut connection = link.publisher.clone();
                stream.read(&mut connection, from).await
            }
        }
    }

    /// What a client at `from` missed (`None`: a fresh client, which only learns where the
    /// history stands).
    pub async fn resume(&self, from: Option<&Position>) -> Result<Resume, ResumeError> {
        let snapshot = self.read(from).await.map_err(|e| {
            if let Store::Redis { stream, link } = self {
                tracing::warn!(server = %link.config.display, channel = %stream.channel(), error = %e, "history read failed");
            }
            ResumeError(e)
        })?;
        Ok(history::resume(snapshot, from))
    }
}
