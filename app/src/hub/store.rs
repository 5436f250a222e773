//! A room's store: the in-process [`Ring`], or the room's Redis Stream
//! ([`RedisHistory`]) on the connection every room shares ([`RedisLink`]).
//!
//! [`Store::publish`] adds a message to the history and sends it on its way: the ring hands it
//! to the room's inlet itself; the Redis script publishes it on the room's channel, from which
//! the subscriber hands it to the same inlet on every instance. Either way a message the store
//! cannot take is an error the sender is told about, never a silent drop. [`Store::resume`]
//! reads the history for a client coming back with its last position.

use std::sync::Arc;

use crate::history::redis_stream::{Receivers, RedisHistory};
use crate::history::ring::Ring;
use crate::history::{self, HistoryConfig, Outlet, Page, Published, Range, Resume, Snapshot};
use crate::position::Position;
use crate::redis::RedisLink;

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

/// One room's history: a Stream in Redis shared by every instance, or in process.
pub enum Store {
    /// No Redis: a published message goes straight to this instance's members of the room.
    Ring(Ring),
    /// The room's Stream and channel in Redis.
    Redis {
        /// The room's Stream.
        history: RedisHistory,
        /// The shared connection.
        link: Arc<RedisLink>,
    },
}

impl Store {
    /// The history of `channel`: in Redis when `redis` is given, in process otherwise, handing
    /// its messages to `outlet`.
    pub fn new(
        channel: &str,
        config: HistoryConfig,
        redis: Option<&Arc<RedisLink>>,
        outlet: Arc<dyn Outlet>,
    ) -> Store {
        match redis {
            None => Store::Ring(Ring::new(config, outlet)),
            Some(link) => Store::Redis {
                history: RedisHistory::new(channel, config, link.config.server.is_cluster()),
                link: Arc::clone(link),
            },
        }
    }

    /// Adds one serialised chat message (`body`) to the history and sends it to every
    /// instance's members of the room, unless `cid` was published already; says where it is.
    pub async fn publish(&self, body: &str, cid: Option<&str>) -> Result<Published, PublishError> {
        match self {
            Store::Ring(ring) => Ok(ring.publish(body, cid)),
            Store::Redis { history, link } => {
                let mut connection = link.publisher.clone();
                let (published, receivers) = history
                    .publish(&mut connection, body, cid)
                    .await
                    .map_err(|e| {
                        tracing::warn!(server = %link.config.display, channel = %history.channel(), error = %e, "publish failed");
                        PublishError::Redis(e)
                    })?;
                if receivers == Receivers::None {
                    // This instance is subscribed to a room whenever one of its members
                    // publishes, so no receiver means its subscription is gone at Redis. The
                    // message is in the history; the subscriber starts over and delivers it
                    // from there.
                    tracing::warn!(
                        server = %link.config.display,
                        channel = %history.channel(),
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
            Store::Redis { history, link } => {
                let mut connection = link.publisher.clone();
                history.read(&mut connection, from).await
            }
        }
    }

    /// The page of the history `range` names (the server API's history).
    pub async fn page(&self, range: &Range) -> Result<Page, ResumeError> {
        match self {
            Store::Ring(ring) => Ok(ring.page(range)),
            Store::Redis { history, link } => {
                let mut connection = link.publisher.clone();
                history.page(&mut connection, range).await.map_err(|e| {
                    tracing::warn!(server = %link.config.display, channel = %history.channel(), error = %e, "history page read failed");
                    ResumeError(e)
                })
            }
        }
    }

    /// What a client at `from` missed (`None`: a fresh client, which only learns where the
    /// history stands).
    pub async fn resume(&self, from: Option<&Position>) -> Result<Resume, ResumeError> {
        let snapshot = self.read(from).await.map_err(|e| {
            if let Store::Redis { history, link } = self {
                tracing::warn!(server = %link.config.display, channel = %history.channel(), error = %e, "history read failed");
            }
            ResumeError(e)
        })?;
        Ok(history::resume(snapshot, from))
    }
}
