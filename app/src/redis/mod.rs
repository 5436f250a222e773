//! Redis: where it is (`server`: [`RedisConfig`], [`RedisServer`]; `cluster` for a cluster's
//! seed list), the connections to it (`connections`), and the link every room's store shares
//! ([`RedisLink`]): the publishing connection and the state of the subscription, which
//! `subscriber` keeps up, with a capped doubling delay (`backoff`) after losing it.

pub mod backoff;
pub mod cluster;
pub mod connections;
pub mod server;
pub mod subscriber;

use std::sync::atomic::AtomicBool;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::Notify;

use self::connections::Publisher;
use self::server::{RedisConfig, RedisServer};

/// Publishing a response to Redis must not stall a sender for long.
const PUBLISH_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Each connection attempt of the publishing connection.
const PUBLISH_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An error setting up the connection to Redis.
#[derive(Debug, thiserror::Error)]
#[error("could not set up the Redis connection to {server}")]
pub struct LinkError {
    server: String,
    #[source]
    source: redis::RedisError,
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

impl RedisLink {
    /// The link to `config`'s server; connects lazily (Redis need not be up). Must run inside
    /// a Tokio runtime.
    pub fn new(config: &RedisConfig) -> Result<RedisLink, LinkError> {
        // The redis crate builds its rustls configuration (rediss://) from the process-wide
        // crypto provider; make it ring, the one this workspace builds. An error only means a
        // provider is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let publisher = match &config.server {
            RedisServer::Single(client) => {
                let manager_config = ConnectionManagerConfig::new()
                    .set_number_of_retries(1)
                    .set_max_delay(config.reconnect_max)
                    .set_connection_timeout(Some(PUBLISH_CONNECT_TIMEOUT))
                    .set_response_timeout(Some(PUBLISH_RESPONSE_TIMEOUT));
                ConnectionManager::new_lazy_with_config(client.clone(), manager_config)
                    .map(Publisher::Single)
            }
            RedisServer::Cluster(seeds) => seeds.publisher().map(Publisher::Cluster),
        }
        .map_err(|source| LinkError {
            server: config.display.clone(),
            source,
        })?;
        Ok(RedisLink {
            publisher,
            config: config.clone(),
            subscribed: AtomicBool::new(false),
            resubscribe: Notify::new(),
        })
    }
}
