//! Where Redis is and how to reach it again: [`RedisConfig`] (built by `config` from
//! `redis_url`, `redis_ca_file`, `redis_channel` and the reconnect delays) and [`RedisServer`],
//! one server or a cluster's seed nodes.

use std::time::Duration;

use super::cluster::Seeds;

/// How to reach Redis and what to do when it goes away.
#[derive(Clone)]
pub struct RedisConfig {
    /// The server or cluster, from the URL (and CA file), ready to connect; it holds the
    /// password.
    pub server: RedisServer,
    /// Host and port only, for logs (never the password).
    pub display: String,
    /// Pub/sub channel.
    pub channel: String,
    /// First resubscription delay.
    pub reconnect_min: Duration,
    /// Resubscription delay cap.
    pub reconnect_max: Duration,
}

impl std::fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisConfig")
            .field("server", &self.display)
            .field("channel", &self.channel)
            .field("reconnect_min", &self.reconnect_min)
            .field("reconnect_max", &self.reconnect_max)
            .finish_non_exhaustive()
    }
}

/// One Redis server, or the seed nodes of a cluster.
#[derive(Clone)]
pub enum RedisServer {
    /// `redis://` or `rediss://`.
    Single(redis::Client),
    /// `redis+cluster://` or `rediss+cluster://`.
    Cluster(Seeds),
}

impl RedisServer {
    /// Whether this is a cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self, RedisServer::Cluster(_))
    }
}
