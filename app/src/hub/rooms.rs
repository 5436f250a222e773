//! Rooms: `/ws?room=NAME` puts a client in a room with a channel and a history of its own; no
//! room (or an empty one) is the default room, the configured `redis_channel` itself.
//!
//! A name (`protocol::parse_room`) is 1 to 64 characters of `A-Z a-z 0-9 _ - .`; room `R` is channel
//! `<redis_channel>:R`. The registry ([`Rooms`]) holds the rooms with local members: a
//! handshake [`Rooms::join`]s (a new room first reads where its history stands, its start;
//! beyond `max_rooms` it is refused) and the [`Membership`] leaves when dropped; an empty room
//! lingers `room_linger`, the default room stays. A [`Room`] holds its [`Fanout`], its
//! [`Inlet`], its [`Store`] and whether it is ready (with Redis, once subscribed and caught up;
//! a joining client waits for it). The subscriber follows the registry as [`Channels`] and
//! serves each room as a [`Channel`]. See ARCHITECTURE.md, "The message path".

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::fanout::Fanout;
use super::inlet::Inlet;
use super::store::{PublishError, ResumeError, Store};
use crate::config::{Config, DEFAULT_REDIS_CHANNEL};
use crate::history::{HistoryConfig, Outlet, Page, Published, Range, Resume};
use crate::position::Position;
use crate::redis::RedisLink;
use crate::redis::subscriber::{Channel, Channels};

/// Why a client could not join its room; the text is the answer of the refused handshake.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// This instance holds `max_rooms` rooms already.
    #[error("too many rooms on this instance (max_rooms = {0}); try again later")]
    Full(usize),
    /// The room is new to this instance and where its history stands could not be read.
    #[error("room not available: the message history is unreachable; try again shortly")]
    Unavailable(#[source] redis::RedisError),
}

/// The pub/sub channel of `room` in `base`: `base` itself for the default room, `base:room`
/// otherwise.
pub fn channel_of(base: &str, room: Option<&str>) -> String {
    match room {
        None => base.to_owned(),
        Some(room) => format!("{base}:{room}"),
    }
}

/// One room: its channel, its local clients, its history and whether it is ready.
pub struct Room {
    channel: String,
    fanout: Arc<Fanout>,
    /// Where both delivery paths hand the room's messages.
    inlet: Arc<Inlet>,
    store: Store,
    /// Where the history stood before the room's first member joined (`None` for the default
    /// room, which takes no client before it is ready).
    start: Option<Position>,
    /// `true` once messages published from now on reach `fanout` (never lowered).
    ready: watch::Sender<bool>,
}

impl std::fmt::Debug for Room {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Room")
            .field("channel", &self.channel)
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Room {
    /// The room of `channel`, its history where `redis` says, ready at once without Redis.
    fn new(
        channel: String,
        queue: usize,
        history: HistoryConfig,
        redis: Option<&Arc<RedisLink>>,
        start: Option<Position>,
    ) -> Room {
        let fanout = Fanout::new(queue);
        let inlet = Arc::new(Inlet::new(&channel, Arc::clone(&fanout)));
        Room {
            store: Store::new(
                &channel,
                history,
                redis,
                Arc::clone(&inlet) as Arc<dyn Outlet>,
            ),
            channel,
            fanout,
            inlet,
            start,
            ready: watch::Sender::new(redis.is_none()),
        }
    }

    /// The room's pub/sub channel, the key of everything about it.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The room's local clients.
    pub fn fanout(&self) -> &Arc<Fanout> {
        &self.fanout
    }

    /// Whether every message published from now on reaches this room's local clients.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until the room is ready, at most `within`; whether it is.
    pub async fn ready_within(&self, within: Duration) -> bool {
        let mut ready = self.ready.subscribe();
        matches!(
            tokio::time::timeout(within, ready.wait_for(|ready| *ready)).await,
            Ok(Ok(_))
        )
    }

    /// Adds a serialised chat message to the room's history and sends it to the room's
    /// members on every instance, unless `cid` was published already; says where it is.
    pub async fn publish(&self, body: &str, cid: Option<&str>) -> Result<Published, PublishError> {
        self.store.publish(body, cid).await
    }

    /// The page of the room's history `range` names.
    pub async fn page(&self, range: &Range) -> Result<Page, ResumeError> {
        self.store.page(range).await
    }

    /// What a client of this room at `from` missed (`None`: a fresh client).
    pub async fn resume(&self, from: Option<&Position>) -> Result<Resume, ResumeError> {
        self.store.resume(from).await
    }
}

/// The rooms of this instance: those with local members, lingering ones, and the default room.
pub struct Rooms {
    /// The default room's channel; room `R` is `<base>:R`.
    base: String,
    max_rooms: usize,
    linger: Duration,
    queue: usize,
    history: HistoryConfig,
    redis: Option<Arc<RedisLink>>,
    default: Arc<Room>,
    state: Mutex<State>,
    /// Told when `state.changes` gained a channel.
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// Every room by channel, the default room included.
    rooms: HashMap<String, Entry>,
    /// Channels whose room was created, replaced or removed since the last
    /// [`Channels::take_changes`].
    changes: HashSet<String>,
}

struct Entry {
    room: Arc<Room>,
    members: usize,
    /// When the last member left; the room is removed once it has been empty for the linger.
    emptied: Option<Instant>,
}

/// A client's place in a room; leaves it when dropped.
pub struct Membership {
    rooms: Arc<Rooms>,
    room: Arc<Room>,
}

impl Membership {
    /// The room.
    pub fn room(&self) -> &Arc<Room> {
        &self.room
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.rooms.leave(&self.room);
    }
}

impl Rooms {
    /// The registry for `config`, holding the default room; with `redis`, rooms keep their
    /// history in Redis and become ready once subscribed.
    pub fn new(config: &Config, redis: Option<Arc<RedisLink>>) -> Arc<Rooms> {
        let base = config
            .redis
            .as_ref()
            .map_or(DEFAULT_REDIS_CHANNEL, |r| r.channel.as_str())
            .to_owned();
        let default = Arc::new(Room::new(
            base.clone(),
            config.client_queue,
            config.history,
            redis.as_ref(),
            None,
        ));
        let mut state = State::default();
        state.rooms.insert(
            base.clone(),
            Entry {
                room: Arc::clone(&default),
                members: 0,
                emptied: None,
            },
        );
        Arc::new(Rooms {
            base,
            max_rooms: config.rooms.max_rooms,
            linger: config.rooms.linger,
            queue: config.client_queue,
            history: config.history,
            redis,
            default,
            state: Mutex::new(state),
            changed: Notify::new(),
        })
    }

    /// The channel of `room` (`None`: the default room).
    pub fn channel(&self, room: Option<&str>) -> String {
        channel_of(&self.base, room)
    }

    /// The default room (`redis_channel`), always there.
    pub fn default_room(&self) -> &Arc<Room> {
        &self.default
    }

    /// Puts a client in `room` (`None`: the default room). A room with no local member yet is
    /// created, unless that would make more than `max_rooms`, once where its history stands
    /// is read.
    pub async fn join(self: &Arc<Self>, room: Option<&str>) -> Result<Membership, JoinError> {
        let channel = channel_of(&self.base, room);
        if let Some(membership) = self.join_existing(&channel)? {
            return Ok(membership);
        }
        let mut room = Room::new(
            channel.clone(),
            self.queue,
            self.history,
            self.redis.as_ref(),
            None,
        );
        let now = room
            .store
            .read(None)
            .await
            .map_err(JoinError::Unavailable)?;
        room.start = Some(Position {
            epoch: now.epoch,
            last: now.last_added,
        });
        let mut state = self.lock();
        if let Some(entry) = state.rooms.get_mut(&channel) {
            // Created by another client meanwhile, from a position read before it joined,
            // which was before this one did.
            return Ok(self.enter(entry));
        }
        // The default room is in the map and does not count.
        if state.rooms.len() > self.max_rooms {
            return Err(JoinError::Full(self.max_rooms));
        }
        let room = Arc::new(room);
        state.rooms.insert(
            channel.clone(),
            Entry {
                room: Arc::clone(&room),
                members: 1,
                emptied: None,
            },
        );
        state.changes.insert(channel);
        drop(state);
        tracing::debug!(channel = %room.channel(), "room created");
        self.changed.notify_one();
        Ok(Membership {
            rooms: Arc::clone(self),
            room,
        })
    }

    /// Joins the room of `channel` if this instance has it; refuses if it has not and is full.
    fn join_existing(self: &Arc<Self>, channel: &str) -> Result<Option<Membership>, JoinError> {
        let mut state = self.lock();
        if let Some(entry) = state.rooms.get_mut(channel) {
            return Ok(Some(self.enter(entry)));
        }
        if state.rooms.len() > self.max_rooms {
            return Err(JoinError::Full(self.max_rooms));
        }
        Ok(None)
    }

    /// One more member of the room of `entry`.
    fn enter(self: &Arc<Self>, entry: &mut Entry) -> Membership {
        entry.members += 1;
        entry.emptied = None;
        Membership {
            rooms: Arc::clone(self),
            room: Arc::clone(&entry.room),
        }
    }

    /// A member of `room` left; the last one starts the linger.
    fn leave(self: &Arc<Self>, room: &Arc<Room>) {
        let now = Instant::now();
        {
            let mut state = self.lock();
            let Some(entry) = state
                .rooms
                .get_mut(room.channel())
                .filter(|entry| Arc::ptr_eq(&entry.room, room))
            else {
                return;
            };
            entry.members = entry.members.saturating_sub(1);
            if entry.members > 0 || Arc::ptr_eq(room, &self.default) {
                return;
            }
            entry.emptied = Some(now);
        }
        let channel = room.channel().to_owned();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                let rooms = Arc::clone(self);
                runtime.spawn(async move {
                    tokio::time::sleep_until(now + rooms.linger).await;
                    rooms.expire(&channel, Instant::now());
                });
            }
            // No runtime to wait in (only when the process is ending): the room goes now.
            Err(_) => {
                self.expire(&channel, now + self.linger);
            }
        }
    }

    /// Removes the room of `channel` if it has been empty for the linger at `now`; whether it
    /// did.
    fn expire(&self, channel: &str, now: Instant) -> bool {
        let mut state = self.lock();
        let due = channel != self.default.channel()
            && state.rooms.get(channel).is_some_and(|entry| {
                entry.members == 0
                    && entry
                        .emptied
                        .is_some_and(|emptied| emptied + self.linger <= now)
            });
        if due {
            state.rooms.remove(channel);
            state.changes.insert(channel.to_owned());
            drop(state);
            tracing::debug!(%channel, "room removed: no local member");
            self.changed.notify_one();
        }
        due
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the map consistent in one step, even if a holder panicked.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Channels for Rooms {
    type Channel = Room;

    async fn changed(&self) {
        self.changed.notified().await;
    }

    fn take_changes(&self) -> Vec<(String, Option<Arc<Room>>)> {
        let mut state = self.lock();
        let changes = std::mem::take(&mut state.changes);
        changes
            .into_iter()
            .map(|channel| {
                let room = state.rooms.get(&channel).map(|e| Arc::clone(&e.room));
                (channel, room)
            })
            .collect()
    }

    fn all(&self) -> Vec<Arc<Room>> {
        self.lock()
            .rooms
            .values()
            .map(|e| Arc::clone(&e.room))
            .collect()
    }
}

impl Channel for Room {
    fn name(&self) -> &str {
        &self.channel
    }

    async fn position(&self) -> redis::RedisResult<Position> {
        if let Some(position) = self.inlet.last().or_else(|| self.start.clone()) {
            return Ok(position);
        }
        let now = self.store.read(None).await?;
        Ok(Position {
            epoch: now.epoch,
            last: now.last_added,
        })
    }

    async fn catch_up(&self, from: Position) -> redis::RedisResult<usize> {
        let snapshot = self.store.read(Some(&from)).await?;
        let count = self.inlet.catch_up(snapshot, &from);
        self.ready.send_replace(true);
        Ok(count)
    }

    fn outlet(&self) -> &dyn Outlet {
        &*self.inlet
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rooms(extra: &str) -> Arc<Rooms> {
        let config = Config::from_toml(extra, "test").unwrap();
        Rooms::new(&config, None)
    }

    fn channels(rooms: &Rooms) -> Vec<String> {
        let mut channels: Vec<String> =
            rooms.all().iter().map(|r| r.channel().to_owned()).collect();
        channels.sort();
        channels
    }

    #[test]
    fn the_default_room_is_the_channel_itself_and_rooms_extend_it() {
        assert_eq!(channel_of("simple-chat", None), "simple-chat");
        assert_eq!(
            channel_of("simple-chat", Some("lobby")),
            "simple-chat:lobby"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_room_lives_while_it_has_members_and_for_the_linger_after() {
        let rooms = rooms("room_linger = \"5s\"");
        let default = rooms.join(None).await.unwrap();
        assert!(Arc::ptr_eq(default.room(), rooms.default_room()));
        let a = rooms.join(Some("lobby")).await.unwrap();
        let b = rooms.join(Some("lobby")).await.unwrap();
        assert!(Arc::ptr_eq(a.room(), b.room()));
        assert!(a.room().is_ready(), "in-process rooms are ready at once");
        assert_eq!(channels(&rooms), ["simple-chat", "simple-chat:lobby"]);
        let lobby = Arc::clone(a.room());
        drop(a);
        drop(b);
        drop(default);
        // Lingering: still there, and a member coming back gets the same room.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(channels(&rooms), ["simple-chat", "simple-chat:lobby"]);
        let back = rooms.join(Some("lobby")).await.unwrap();
        assert!(Arc::ptr_eq(back.room(), &lobby));
        // The linger started by the first leave does not remove it under the new member.
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(channels(&rooms), ["simple-chat", "simple-chat:lobby"]);
        drop(back);
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(channels(&rooms), ["simple-chat"], "the default room stays");
        // Joining again creates a new room.
        let again = rooms.join(Some("lobby")).await.unwrap();
        assert!(!Arc::ptr_eq(again.room(), &lobby));
    }

    #[tokio::test(start_paused = true)]
    async fn joins_beyond_max_rooms_are_refused_until_one_is_gone() {
        let rooms = rooms("max_rooms = 1\nroom_linger = \"1s\"");
        let one = rooms.join(Some("one")).await.unwrap();
        assert!(matches!(
            rooms.join(Some("two")).await,
            Err(JoinError::Full(1))
        ));
        // The room that exists and the default room still take members.
        let same = rooms.join(Some("one")).await.unwrap();
        let _default = rooms.join(None).await.unwrap();
        drop(one);
        drop(same);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(rooms.join(Some("two")).await.is_ok());
        let err = rooms.join(Some("three")).await.err().unwrap();
        assert_eq!(
            err.to_string(),
            "too many rooms on this instance (max_rooms = 1); try again later"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn changes_name_each_created_and_removed_channel_once() {
        let rooms = rooms("room_linger = \"1s\"");
        assert!(rooms.take_changes().is_empty());
        let a = rooms.join(Some("a")).await.unwrap();
        let _a2 = rooms.join(Some("a")).await.unwrap();
        let b = rooms.join(Some("b")).await.unwrap();
        // The notification is kept until someone waits for it.
        rooms.changed().await;
        let mut changes = rooms.take_changes();
        changes.sort_by(|x, y| x.0.cmp(&y.0));
        assert_eq!(changes.len(), 2);
        assert_eq!(changes[0].0, "simple-chat:a");
        assert!(Arc::ptr_eq(changes[0].1.as_ref().unwrap(), a.room()));
        assert_eq!(changes[1].0, "simple-chat:b");
        assert!(rooms.take_changes().is_empty());
        drop(b);
        rooms.changed().await;
        let changes = rooms.take_changes();
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].0, "simple-chat:b");
        assert!(changes[0].1.is_none(), "removed");
    }
}
