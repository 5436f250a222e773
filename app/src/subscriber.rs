//! The Redis subscriber: the messages of every room with local members into that room's
//! fan-out, over one pub/sub connection, surviving Redis going away without losing any.
//!
//! One task loops: connect, check that the publishing connection answers, then attach every
//! room of the registry (`rooms`) at once ([`attach`]): learn where each room's channel stands
//! (where this instance's delivery of it stopped, or, for a room new to it, its start, read
//! before its first member joined), `SUBSCRIBE` all their channels in one command, read
//! each room's history after its position and deliver that, mark each room ready, and raise
//! the `subscribed` flag (which makes `/healthz` 200). Then it forwards every payload that is a
//! JSON object, byte for byte, to the fan-out of its channel's room (one map lookup), skipping
//! what a catch-up already delivered (ids only grow). When the registry changes, a room with
//! its first local member is attached the same way, and one removed after its linger is
//! unsubscribed; these steps run inside the loop, so this instance's delivery pauses for the
//! few round trips they take (messages wait in the connection's buffer, none is lost), and the
//! order of `SUBSCRIBE` and `UNSUBSCRIBE` of one channel is the order of the changes. A `PING`
//! every [`PING_INTERVAL`] catches a connection that died without closing; a publish that
//! reached no subscriber makes the loop start over at once. When the connection ends the flag
//! drops (503) and the loop waits a capped, doubling [`Backoff`] before the next try, which
//! attaches every room again and catches each up. It ends only when `stop` is cancelled;
//! Redis going away never ends the process.
//!
//! When the history cannot fill this instance's gap in a room (Redis lost it: a new epoch; or
//! it was trimmed), every local client of that room is let go ([`Eviction::Gap`]): each
//! reconnects, resumes, and is told through its own resume what it cannot recover, instead of
//! missing messages silently.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures_util::future::try_join_all;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::broker::RedisLink;
use crate::connection::{self, Event, Sink, Source};
use crate::fanout::{Delivery, Eviction, Fanout};
use crate::history::{self, Snapshot};
use crate::position::Position;
use crate::protocol;
use crate::rooms::{Room, Rooms};

/// How often an idle subscription is checked with `PING`.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long connecting, subscribing, catching up, following the registry or a `PING` may take
/// before the connection counts as lost.
pub const REDIS_TIMEOUT: Duration = Duration::from_secs(3);

/// What the subscriber task works with.
pub struct Subscriber {
    /// The connection every room shares, the flags and the Redis settings.
    pub link: Arc<RedisLink>,
    /// The rooms to subscribe to.
    pub rooms: Arc<Rooms>,
}

/// A room this instance subscribes to, and how far it has delivered the room's channel.
struct Attached {
    room: Arc<Room>,
    seen: Seen,
}

/// The attached rooms by channel. Kept across connections: after a reconnect, each room is
/// caught up from where its delivery stopped.
type Attachments = HashMap<String, Attached>;

/// Runs the subscription until `stop` is cancelled.
pub async fn run(sub: Subscriber, stop: CancellationToken) {
    let config = &sub.link.config;
    let mut backoff = Backoff::new(config.reconnect_min, config.reconnect_max);
    let mut attached = Attachments::new();
    let server = &config.display;
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return,
            attempt = tokio::time::timeout(REDIS_TIMEOUT, connect(&sub, &mut attached)) => attempt,
        };
        match attempt {
            Ok(Ok((sink, stream, caught_up))) => {
                sub.link.subscribed.store(true, Ordering::Release);
                backoff.reset();
                tracing::info!(%server, rooms = attached.len(), caught_up, "subscribed to Redis channels");
                let reason = pump(sink, stream, &sub, &mut attached, &stop).await;
                sub.link.subscribed.store(false, Ordering::Release);
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
async fn connect(
    sub: &Subscriber,
    attached: &mut Attachments,
) -> redis::RedisResult<(Sink, Source, usize)> {
    let (mut sink, stream) = connection::open(&sub.link.config.server).await?;
    let mut publisher = sub.link.publisher.clone();
    let ping = redis::cmd("PING");
    if let Err(e) = ping.query_async::<String>(&mut publisher).await {
        if !(e.is_connection_dropped() || e.is_io_error()) {
            return Err(e);
        }
        // That was the connection from before; the manager has reconnected for this one.
        ping.query_async::<String>(&mut publisher).await?;
    }
    // Every room there is now is attached below, so the changes so far are taken care of.
    sub.rooms.take_changes();
    let rooms = sub.rooms.all();
    let current: HashSet<&str> = rooms.iter().map(|room| room.channel()).collect();
    attached.retain(|channel, _| current.contains(channel.as_str()));
    let caught_up = attach(&mut sink, attached, rooms).await?;
    Ok((sink, stream, caught_up))
}

/// Subscribes to the channels of `rooms` and catches each room up, in three steps each taken
/// for all of them at once: where each room stands (where this instance's delivery of it
/// stopped; for a room new to it, its start, read before its first member joined; for the
/// default room at the first start, the history's newest id, read now), always before
/// subscribing, so that whatever is published from then on is either read below or arrives on
/// the subscription; one `SUBSCRIBE`; and a read of each room's history after its position,
/// delivered to the room's clients before the room is marked ready. Returns how many messages
/// were delivered.
async fn attach(
    sink: &mut Sink,
    attached: &mut Attachments,
    rooms: Vec<Arc<Room>>,
) -> redis::RedisResult<usize> {
    if rooms.is_empty() {
        return Ok(0);
    }
    let positions = try_join_all(rooms.iter().map(|room| {
        let known = attached
            .get(room.channel())
            .filter(|a| Arc::ptr_eq(&a.room, room))
            .and_then(|a| a.seen.last.clone())
            .or_else(|| room.start().cloned());
        async move {
            match known {
                Some(position) => Ok(position),
                None => room.store().read(None).await.map(|now| Position {
                    epoch: now.epoch,
                    last: now.last_added,
                }),
            }
        }
    }))
    .await?;
    let channels: Vec<&str> = rooms.iter().map(|room| room.channel()).collect();
    sink.subscribe(&channels).await?;
    let snapshots = try_join_all(
        rooms
            .iter()
            .zip(&positions)
            .map(|(room, from)| room.store().read(Some(from))),
    )
    .await?;
    let mut caught_up = 0;
    for ((room, from), snapshot) in rooms.into_iter().zip(positions).zip(snapshots) {
        let mut seen = Seen { last: Some(from) };
        caught_up += seen.catch_up(snapshot, room.channel(), room.fanout());
        room.set_ready();
        attached.insert(room.channel().to_owned(), Attached { room, seen });
    }
    Ok(caught_up)
}

/// Applies the registry's changes: unsubscribes from the channels of removed rooms, attaches
/// created (or replaced) ones.
async fn follow(
    sink: &mut Sink,
    attached: &mut Attachments,
    rooms: &Rooms,
) -> redis::RedisResult<()> {
    let mut gone = Vec::new();
    let mut new = Vec::new();
    for (channel, room) in rooms.take_changes() {
        match room {
            Some(room)
                if attached
                    .get(&channel)
                    .is_some_and(|a| Arc::ptr_eq(&a.room, &room)) => {}
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

/// Forwards messages and follows the registry until the connection is lost (the reason is
/// returned) or `stop`.
async fn pump(
    mut sink: Sink,
    mut stream: Source,
    sub: &Subscriber,
    attached: &mut Attachments,
    stop: &CancellationToken,
) -> String {
    let mut ping =
        tokio::time::interval_at(tokio::time::Instant::now() + PING_INTERVAL, PING_INTERVAL);
    loop {
        tokio::select! {
            () = stop.cancelled() => return "stopping".to_owned(),
            () = sub.link.resubscribe.notified() => {
                return "a publish reached no subscriber: the subscription is gone at Redis".to_owned();
            }
            () = sub.rooms.changed() => {
                match tokio::time::timeout(REDIS_TIMEOUT, follow(&mut sink, attached, &sub.rooms)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => return format!("following the rooms failed: {e}"),
                    Err(_) => return "following the rooms timed out".to_owned(),
                }
            }
            event = stream.next() => match event {
                None => return "connection closed".to_owned(),
                Some(Event::Lost) => return "a cluster node's connection was lost".to_owned(),
                Some(Event::Message(message)) => {
                    let channel = message.get_channel_name();
                    match attached.get_mut(channel) {
                        Some(a) => a.seen.forward(message.get_payload_bytes(), channel, a.room.fanout()),
                        None => tracing::trace!(%channel, "skipped a message of a room no longer subscribed"),
                    }
                }
                Some(Event::Dropped(channel)) => {
                    let Some(room) = attached.get(&channel).map(|a| Arc::clone(&a.room)) else {
                        continue;
                    };
                    // Its slot moved: subscribe where it lives now, and catch up on what was
                    // published in between.
                    match tokio::time::timeout(REDIS_TIMEOUT, attach(&mut sink, attached, vec![room])).await {
                        Ok(Ok(caught_up)) => tracing::info!(%channel, caught_up, "resubscribed to a room whose slot moved"),
                        Ok(Err(e)) => return format!("resubscribing to {channel} failed: {e}"),
                        Err(_) => return format!("resubscribing to {channel} timed out"),
                    }
                }
            },
            _ = ping.tick() => {
                match tokio::time::timeout(REDIS_TIMEOUT, sink.ping()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return format!("PING failed: {e}"),
                    Err(_) => return "PING timed out".to_owned(),
                }
            }
        }
    }
}

/// How far this instance has delivered a room's channel: the position of the last message with an
/// id handed to the fan-out.
#[derive(Debug, Default)]
struct Seen {
    last: Option<Position>,
}

impl Seen {
    /// Delivers what a history read after the current position holds; returns how many. When
    /// the gap cannot be filled, every local client is let go (see the module doc).
    fn catch_up(&mut self, snapshot: Snapshot, channel: &str, fanout: &Fanout) -> usize {
        let resume = history::resume(snapshot, self.last.as_ref());
        if !resume.recovered {
            let clients = fanout.evict_all(Eviction::Gap);
            tracing::warn!(
                %channel,
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
    fn forward(&mut self, payload: &[u8], channel: &str, fanout: &Fanout) {
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
                        tracing::warn!(%channel, %epoch, clients, "the channel's history was reset (new epoch); clients reconnect and resume");
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
        assert_eq!(seen.catch_up(snapshot("e", 3, &[2, 3]), "c", &fanout), 2);
        // The subscription brings 2 and 3 again (published between SUBSCRIBE and the read),
        // then 4, and a message of the original app, which has no id.
        for ms in [2, 3, 4] {
            seen.forward(payload(ms, "e").as_bytes(), "c", &fanout);
        }
        seen.forward(br#"{"name":"py","content":"hi"}"#, "c", &fanout);
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
        seen.catch_up(snapshot("new", 2, &[]), "c", &fanout);
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
        seen.forward(payload(5, "a").as_bytes(), "c", &fanout);
        assert!(
            !member.stop.is_cancelled(),
            "the first epoch seen is no change"
        );
        seen.forward(payload(1, "b").as_bytes(), "c", &fanout);
        assert_eq!(member.evicted.get(), Some(&Eviction::Gap));
    }
}
