//! The hub: this instance's rooms and their members, and the background work that keeps
//! their messages coming.
//!
//! `rooms` holds the registry (rooms with local members, joined and left by clients) and each
//! [`rooms::Room`]: its members' queues (`fanout`), its history (`store`) and its `inlet`, the
//! one place both delivery paths hand the room's messages to. [`Hub`] ties them to Redis when
//! it is configured: [`Hub::start`] runs the subscriber (`redis::subscriber`) over the
//! registry. See ARCHITECTURE.md, "The message path".

pub mod fanout;
pub mod inlet;
pub mod rooms;
pub mod store;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::rooms::Rooms;
use crate::config::Config;
use crate::redis::{LinkError, RedisLink, subscriber};

/// The rooms and, with Redis, the connection they share; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    rooms: Arc<Rooms>,
    redis: Option<Arc<RedisLink>>,
}

impl Hub {
    /// Redis when `config` names one, in-process otherwise. Connects lazily: Redis need not be
    /// up. Must run inside a Tokio runtime.
    pub fn new(config: &Config) -> Result<Hub, LinkError> {
        let redis = match &config.redis {
            Some(redis) => Some(Arc::new(RedisLink::new(redis)?)),
            None => None,
        };
        Ok(Hub {
            rooms: Rooms::new(config, redis.clone()),
            redis,
        })
    }

    /// The rooms of this instance.
    pub fn rooms(&self) -> &Arc<Rooms> {
        &self.rooms
    }

    /// The Redis link every room shares, when there is Redis.
    pub fn redis(&self) -> Option<&Arc<RedisLink>> {
        self.redis.as_ref()
    }

    /// Starts the background work the hub needs (the Redis subscriber) on `tracker`; it stops
    /// when `stop` is cancelled.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if let Some(link) = &self.redis {
            tracker.spawn(subscriber::run(
                Arc::clone(link),
                Arc::clone(&self.rooms),
                stop,
            ));
        }
    }

    /// Whether messages can flow: always in process, while subscribed with Redis.
    pub fn is_up(&self) -> bool {
        self.redis
            .as_ref()
            .is_none_or(|link| link.subscribed.load(Ordering::Acquire))
    }

    /// Whether clients may join: always in process; with Redis, once the subscriber has
    /// subscribed to the default room for the first time (and stays so through later outages,
    /// which the subscriber catches up on for every client).
    pub fn accepts_clients(&self) -> bool {
        self.rooms.default_room().is_ready()
    }
}
