//! The Redis subscriber: the messages of every room with local members, over one pub/sub
//! connection, handed to each room's [`Outlet`] (the same interface the in-process ring
//! delivers through), surviving Redis going away without losing any.
//!
//! One task loops: connect, check that the publishing connection answers, then attach every
//! room ([`Channel`]) of the registry ([`Channels`]) at once: learn where each stands, `SUBSCRIBE`
//! all their channels in one command, let each catch up from its history, and raise the
//! `subscribed` flag (`/healthz` 200). Then it hands every payload that is a JSON object to its
//! room's outlet, follows the registry's changes (attaching new rooms, unsubscribing removed
//! ones), and pings; when the connection is lost ([`Lost`] says why) the flag drops (503) and
//! the loop waits a capped, doubling [`Backoff`] before the next try. It ends only when `stop`
//! is cancelled. See ARCHITECTURE.md, "The message path".

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::future::try_join_all;
use tokio_util::sync::CancellationToken;

use super::RedisLink;
use super::backoff::Backoff;
use super::connections::{self, Event, Inbox, Subscriptions};
use crate::history::{Delivery, Outlet};
use crate::position::Position;
use crate::protocol;

/// How often an idle subscription is checked with `PING`.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long connecting, subscribing, catching up, following the registry or a `PING` may take
/// before the connection counts as lost.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// A room as the subscriber serves it: its channel, where its delivery stands, its catch-up
/// from the history, and its outlet.
pub trait Channel: Send + Sync + 'static {
    /// The pub/sub channel.
    fn name(&self) -> &str;
    /// Where this instance's delivery of the channel stands, read before subscribing: where it
    /// stopped, or for a room new to it, its start (read before its first member joined), or
    /// else the history's newest id, read now.
    fn position(&self) -> impl Future<Output = redis::RedisResult<Position>> + Send;
    /// After subscribing: delivers what the history holds after `from` and marks the room
    /// ready; returns how many messages that was.
    fn catch_up(&self, from: Position) -> impl Future<Output = redis::RedisResult<usize>> + Send;
    /// Where the channel's messages go.
    fn outlet(&self) -> &dyn Outlet;
}

/// The rooms with local members: what the subscriber subscribes to.
pub trait Channels: Send + Sync + 'static {
    /// One room.
    type Channel: Channel;
    /// Resolves when rooms were created or removed since the last [`Channels::take_changes`].
    fn changed(&self) -> impl Future<Output = ()> + Send;
    /// The channels whose room was created, replaced or removed since the last call, each with
    /// its room now (`None`: removed).
    fn take_changes(&self) -> Vec<(String, Option<Arc<Self::Channel>>)>;
    /// Every room now.
    fn all(&self) -> Vec<Arc<Self::Channel>>;
}

/// Why a subscription ended.
#[derive(Debug, thiserror::Error)]
pub enum Lost {
    /// `stop` was cancelled.
    #[error("stopping")]
    Stopping,
    /// A publish reached no subscriber: the subscription is gone at Redis.
    #[error("a publish reached no subscriber: the subscription is gone at Redis")]
    NoReceiver,
    /// Subscribing to new rooms or unsubscribing from removed ones failed.
    #[error("following the rooms failed: {0}")]
    Follow(#[source] redis::RedisError),
    /// Following the rooms took longer than [`REDIS_TIMEOUT`].
    #[error("following the rooms timed out")]
    FollowTimeout,
    /// The connection closed.
    #[error("connection closed")]
    Closed,
    /// A cluster node's connection was lost.
    #[error("a cluster node's connection was lost")]
    NodeDown,
    /// Subscribing again to a shard channel whose slot moved failed.
    #[error("resubscribing to {channel} failed: {source}")]
    Resubscribe {
        /// The channel.
        channel: String,
        /// Why.
        source: redis::RedisError,
    },
    /// Subscribing again to a shard channel whose slot moved took too long.
    #[error("resubscribing to {0} timed out")]
    ResubscribeTimeout(String),
    /// `PING` failed.
    #[error("PING failed: {0}")]
    Ping(#[source] redis::RedisError),
    /// `PING` took longer than [`REDIS_TIMEOUT`].
    #[error("PING timed out")]
    PingTimeout,
}

/// The attached rooms by channel.
type Attachments<C> = HashMap<String, Arc<C>>;

/// Runs the subscription for `channels` until `stop` is cancelled.
pub async fn run<C: Channels>(link: Arc<RedisLink>, channels: Arc<C>, stop: CancellationToken) {
    let config = &link.config;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut attached = Attachments::new();
    let server = &config.display;
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            attempt = tokio::time::timeout(REDIS_TIMEOUT, connect(&link, &*channels, &mut attached)) => attempt,
        };
        match attempt {
            Ok(Ok((sink, inbox, caught_up))) => {
                link.subscribed.store(true, Ordering::Release);
                backoff.reset();
                tracing::info!(%server, rooms = attached.len(), caught_up, "subscribed to Redis channels");
                let reason = pump(sink, inbox, &link, &*channels, &mut attached, &stop).await;
                link.subscribed.store(false, Ordering::Release);
                if stop.is_cancelled() {
                    return;
                }
                tracing::warn!(%server, %reason, "Redis subscription lost; /healthz is 503 until it is back");
            }
            Ok(Err(e)) => {
                tracing::warn!(%server, error = %e, "could not subscribe to Redis");
            }
            Err(_) => {
                tracing::warn!(%server, timeout = ?REDIS_TIMEOUT, "subscribing to Redis timed out");
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

/// Connects, checks the publishing connection (so that once `/healthz` says 200 the first
/// message a client sends goes through: after an outage the publisher still holds its dead
/// connection, and only a failed command makes it reconnect), then attaches every room of the
/// registry; returns the connection's two halves and how many messages the catch-up delivered.
async fn connect<C: Channels>(
    link: &RedisLink,
    channels: &C,
    attached: &mut Attachments<C::Channel>,
) -> redis::RedisResult<(Subscriptions, Inbox, usize)> {
    let (mut sink, inbox) = connections::open(&link.config.server).await?;
    let mut publisher = link.publisher.clone();
    let ping = redis::cmd("PING");
    if let Err(e) = ping.query_async::<String>(&mut publisher).await {
        if !(e.is_connection_dropped() || e.is_io_error()) {
            return Err(e);
        }
        // That was the connection from before; the manager has reconnected for this one.
        ping.query_async::<String>(&mut publisher).await?;
    }
    // Every room there is now is attached below, so the changes so far are taken care of.
    channels.take_changes();
    let rooms = channels.all();
    let current: HashSet<&str> = rooms.iter().map(|room| room.name()).collect();
    attached.retain(|channel, _| current.contains(channel.as_str()));
    let caught_up = attach(&mut sink, attached, rooms).await?;
    Ok((sink, inbox, caught_up))
}

/// Subscribes to the channels of `rooms` and catches each room up, in three steps each taken
/// for all of them at once: where each room stands ([`Channel::position`]), always before
/// subscribing, so that whatever is published from then on is either read by the catch-up or
/// arrives on the subscription; one `SUBSCRIBE`; and each room's catch-up
/// ([`Channel::catch_up`]). Returns how many messages were delivered.
async fn attach<R: Channel>(
    sink: &mut Subscriptions,
    attached: &mut Attachments<R>,
    rooms: Vec<Arc<R>>,
) -> redis::RedisResult<usize> {
    if rooms.is_empty() {
        return Ok(0);
    }
    let positions = try_join_all(rooms.iter().map(|room| room.position())).await?;
    let channels: Vec<&str> = rooms.iter().map(|room| room.name()).collect();
    sink.subscribe(&channels).await?;
    let counts = try_join_all(
        rooms
            .iter()
            .zip(positions)
            .map(|(room, from)| room.catch_up(from)),
    )
    .await?;
    for room in rooms {
        attached.insert(room.name().to_owned(), room);
    }
    Ok(counts.into_iter().sum())
}

/// Applies the registry's changes: unsubscribes from the channels of removed rooms, attaches
/// created (or replaced) ones.
async fn follow<C: Channels>(
    sink: &mut Subscriptions,
    attached: &mut Attachments<C::Channel>,
    channels: &C,
) -> redis::RedisResult<()> {
    let mut gone = Vec::new();
    let mut new = Vec::new();
    for (channel, room) in channels.take_changes() {
        match room {
            Some(room)
                if attached
                    .get(&channel)
                    .is_some_and(|a| Arc::ptr_eq(a, &room)) => {}
            Some(room) => new.push(room),
            None => {
                if attached.remove(&channel).is_some() {
                    gone.push(channel);
                }
            }
        }
    }
    if !gone.is_empty() {
        sink.unsubscribe(&gone).await?;
        tracing::debug!(channels = ?gone, "unsubscribed from rooms without local members");
    }
    if !new.is_empty() {
        let count = new.len();
        let caught_up = attach(sink, attached, new).await?;
        tracing::debug!(
            rooms = count,
            caught_up,
            "subscribed to rooms with new local members"
        );
    }
    Ok(())
}

/// Forwards messages and follows the registry until the connection is lost or `stop`; says
/// why it ended.
async fn pump<C: Channels>(
    mut sink: Subscriptions,
    mut inbox: Inbox,
    link: &RedisLink,
    channels: &C,
    attached: &mut Attachments<C::Channel>,
    stop: &CancellationToken,
) -> Lost {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Lost::Stopping,
            () = link.resubscribe.notified() => return Lost::NoReceiver,
            () = channels.changed() => {
                match tokio::time::timeout(REDIS_TIMEOUT, follow(&mut sink, attached, channels)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return Lost::Follow(e),
                    Err(_) => return Lost::FollowTimeout,
                }
            }
            event = inbox.next() => match event {
                None => return Lost::Closed,
                Some(Event::Lost) => return Lost::NodeDown,
                Some(Event::Message(message)) => {
                    let channel = message.get_channel_name();
                    match attached.get(channel) {
                        Some(room) => forward(message.get_payload_bytes(), channel, room.outlet()),
                        None => tracing::trace!(%channel, "skipped a message of a room no longer subscribed"),
                    }
                }
                Some(Event::Dropped(channel)) => {
                    let Some(room) = attached.get(&channel).map(Arc::clone) else {
                        continue;
                    };
                    // Its slot moved: subscribe where it lives now, and catch up on what was
                    // published in between.
                    match tokio::time::timeout(REDIS_TIMEOUT, attach(&mut sink, attached, vec![room])).await {
                        Ok(Ok(caught_up)) => tracing::info!(%channel, caught_up, "resubscribed to a room whose slot moved"),
                        Ok(Err(source)) => return Lost::Resubscribe { channel, source },
                        Err(_) => return Lost::ResubscribeTimeout(channel),
                    }
                }
            },
            _ = ping.tick() => {
                match tokio::time::timeout(REDIS_TIMEOUT, sink.ping()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Lost::Ping(e),
                    Err(_) => return Lost::PingTimeout,
                }
            }
        }
    }
}

/// Hands a channel payload to `outlet` unchanged if it is a JSON object in UTF-8.
fn forward(payload: &[u8], channel: &str, outlet: &dyn Outlet) {
    let Ok(text) = std::str::from_utf8(payload) else {
        tracing::warn!(
            %channel,
            bytes = payload.len(),
            "dropped a channel message that is not UTF-8"
        );
        return;
    };
    let Some(stamp) = protocol::read_channel_payload(text) else {
        tracing::warn!(
            %channel,
            bytes = payload.len(),
            "dropped a channel message that is not a JSON object"
        );
        return;
    };
    let message = Delivery {
        id: stamp.id,
        text: Utf8Bytes::from(text),
    };
    outlet.deliver(message, stamp.epoch.as_deref());
}
