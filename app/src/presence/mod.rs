//! Who is here: each room's members on every instance, told to the members who asked for it
//! (`/ws?presence`) as a state on joining and then as diffs coalesced per `presence_interval`.
//!
//! A connection is counted with [`Presence::enter`] (its [`Here`] leaves when dropped; an
//! anonymous one [`Here::rename`]s itself with each message's name). That only touches this
//! instance's [`view::Tally`] of the room and marks it changed; nothing is sent then. Every
//! interval the task of [`Presence::start`] writes the changed tallies to Redis (`shared`),
//! heartbeats, reads every other instance's tally, merges them into a [`view::View`] and, if it
//! differs from the last one shown, queues one diff frame for each of the room's [`Watch`]ers (a
//! queue of its own, so that waiting for it costs a connection no lock shared with the room's
//! other members): a join and a leave within one interval send nothing, and a storm of joins
//! costs each member one frame per interval. A room new to the instance is read from Redis once
//! before its first member's state, however many members arrive meanwhile. Without Redis the
//! tallies are this instance's alone. An instance that vanished from Redis (Redis restarted)
//! keeps its members until its last heartbeat's deadline, by which time a live one has written
//! itself again; a dead one's members leave then, `presence_ttl` after its last heartbeat.

pub mod shared;
pub mod view;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use axum::extract::ws::Utf8Bytes;
use futures_util::future::join_all;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::shared::{Mode, Shared, Synced};
use self::view::{Tally, View, Who};
use crate::config::PresenceConfig;
use crate::redis::RedisLink;

/// Frames kept for a watcher that has not sent the previous ones yet; one further behind gets
/// the whole state instead.
const WATCH_BACKLOG: usize = 16;

/// Presence of every room this instance has members in; cheap to clone.
#[derive(Clone)]
pub struct Presence(Arc<Inner>);

struct Inner {
    config: PresenceConfig,
    redis: Option<(Arc<RedisLink>, Shared)>,
    rooms: Mutex<HashMap<String, RoomPresence>>,
}

/// One room's presence as this instance knows it.
struct RoomPresence {
    /// This instance's connections in the room.
    local: Tally,
    /// `local` changed since it was last written to Redis.
    dirty: bool,
    /// Synced with Redis at least once (or no Redis).
    synced: bool,
    /// While a member's first read of the room from Redis is in flight: the other members
    /// arriving meanwhile wait for it (the sender is dropped when it ends) instead of each
    /// running a read of its own.
    first_sync: Option<watch::Sender<()>>,
    /// The other instances' tallies and when each expires (Redis' clock, ms).
    remote: HashMap<String, (Tally, u64)>,
    /// The view the last frame told the watchers.
    shown: View,
    /// Each watcher's queue of frames.
    watchers: Vec<mpsc::Sender<Utf8Bytes>>,
}

impl RoomPresence {
    fn new() -> RoomPresence {
        RoomPresence {
            local: Tally::default(),
            dirty: true,
            synced: false,
            first_sync: None,
            remote: HashMap::new(),
            shown: View::default(),
            watchers: Vec::new(),
        }
    }

    fn view(&self) -> View {
        View::merge(std::iter::once(&self.local).chain(self.remote.values().map(|(t, _)| t)))
    }

    /// Computes the view; if it changed since the last frame, tells the watchers.
    fn publish_diff(&mut self) {
        let view = self.view();
        if let Some(diff) = self.shown.diff(&view) {
            let frame = Utf8Bytes::from(diff.to_json());
            // A watcher whose queue is full fell behind: its queue is closed, and once it has
            // sent what the queue holds it starts again from the state (`Watch::next`). One
            // that is gone is dropped too.
            self.watchers
                .retain(|tx| tx.try_send(frame.clone()).is_ok());
            self.shown = view;
        }
    }

    /// Whether this instance has nothing more to say or keep about the room (watchers that
    /// are gone are forgotten first).
    fn is_idle(&mut self) -> bool {
        self.watchers.retain(|tx| !tx.is_closed());
        self.local.is_empty() && !self.dirty && self.watchers.is_empty()
    }

    /// A new watcher: the room's state frame now, and the queue of the diffs that follow it.
    fn subscribe(&mut self) -> (Utf8Bytes, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(WATCH_BACKLOG);
        self.watchers.push(tx);
        (Utf8Bytes::from(self.view().state_json()), rx)
    }
}

/// The member running a room's first read: when it ends, however it ends (a member that
/// leaves mid-read drops it), the members waiting for it go on.
struct FirstSync<'a> {
    presence: &'a Presence,
    channel: &'a str,
}

impl Drop for FirstSync<'_> {
    fn drop(&mut self) {
        if let Some(room) = self.presence.lock().get_mut(self.channel) {
            room.first_sync = None;
        }
    }
}

/// A connection counted in its room's presence; uncounted when dropped.
pub struct Here {
    presence: Option<Presence>,
    channel: String,
    who: Who,
}

/// A member's subscription to its room's presence frames.
pub struct Watch {
    /// `None` when presence is off or the member did not ask: never yields.
    inner: Option<(Presence, String, mpsc::Receiver<Utf8Bytes>)>,
}

impl Presence {
    /// Presence as `config` says, shared through `redis` when given; `base` is the default
    /// room's channel.
    pub fn new(config: PresenceConfig, redis: Option<Arc<RedisLink>>, base: &str) -> Presence {
        // This instance's id in Redis, new at every start.
        let instance = crate::position::new_epoch();
        let ttl_ms = u64::try_from(config.ttl.as_millis()).unwrap_or(u64::MAX);
        let redis = redis.map(|link| (link, Shared::new(&instance, ttl_ms, base)));
        Presence(Arc::new(Inner {
            config,
            redis,
            rooms: Mutex::new(HashMap::new()),
        }))
    }

    /// Whether presence is kept at all (`presence = true`).
    pub fn is_on(&self) -> bool {
        self.0.config.enabled
    }

    /// Counts a connection in the room of `channel` as `user` (token mode) with `name` (the
    /// token's, or none yet for an anonymous connection).
    pub fn enter(&self, channel: &str, user: Option<&str>, name: Option<&str>) -> Here {
        let who = Who {
            user: user.map(str::to_owned),
            name: name.map(str::to_owned),
        };
        if !self.is_on() {
            return Here {
                presence: None,
                channel: channel.to_owned(),
                who,
            };
        }
        {
            let mut rooms = self.lock();
            let room = rooms
                .entry(channel.to_owned())
                .or_insert_with(RoomPresence::new);
            room.local.add(&who);
            room.dirty = true;
        }
        Here {
            presence: Some(self.clone()),
            channel: channel.to_owned(),
            who,
        }
    }

    /// Subscribes a member that asked for presence to the room of `channel` and returns the
    /// room's state frame to send it first; an inactive watch when presence is off or
    /// `wanted` is false. A room new to this instance is read from Redis first.
    pub async fn watch(&self, channel: &str, wanted: bool) -> (Option<Utf8Bytes>, Watch) {
        if !wanted || !self.is_on() {
            return (None, Watch { inner: None });
        }
        self.first_sync(channel).await;
        let (state, rx) = self.subscribe(channel);
        (
            Some(state),
            Watch {
                inner: Some((self.clone(), channel.to_owned(), rx)),
            },
        )
    }

    /// Reads a room new to this instance from Redis once, however many of its members arrive
    /// at once: the first one runs the read, the others wait for it to end (done, failed or
    /// abandoned by a member that left) and then see the room as that read left it.
    async fn first_sync(&self, channel: &str) {
        let wait = {
            let mut rooms = self.lock();
            let Some(room) = rooms.get_mut(channel) else {
                return;
            };
            if room.synced {
                return;
            }
            match &room.first_sync {
                Some(running) => Some(running.subscribe()),
                None => {
                    room.first_sync = Some(watch::channel(()).0);
                    None
                }
            }
        };
        match wait {
            // Ends when the running read drops its sender; nothing is ever sent.
            Some(mut done) => while done.changed().await.is_ok() {},
            None => {
                let _running = FirstSync {
                    presence: self,
                    channel,
                };
                self.sync(channel).await;
            }
        }
    }

    /// Runs the interval task on `tracker` until `stop`; on stop, this instance's members
    /// leave every room in Redis at once.
    pub fn start(&self, tracker: &TaskTracker, stop: CancellationToken) {
        if !self.is_on() {
            return;
        }
        let presence = self.clone();
        tracker.spawn(async move {
            let mut ticks = tokio::time::interval(presence.0.config.interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = stop.cancelled() => break,
                    _ = ticks.tick() => presence.tick().await,
                }
            }
            presence.farewell().await;
        });
    }

    /// One interval: every room synced and its watchers told what changed.
    async fn tick(&self) {
        let channels: Vec<String> = self.lock().keys().cloned().collect();
        join_all(channels.iter().map(|channel| self.sync(channel))).await;
        let mut occupied = Vec::new();
        self.lock().retain(|channel, room| {
            if !room.local.is_empty() {
                occupied.push(channel.clone());
            }
            !room.is_idle()
        });
        if let Some((link, shared)) = &self.0.redis {
            let mut connection = link.publisher.clone();
            if let Err(e) = shared.rooms(&mut connection, &occupied).await {
                tracing::debug!(error = %e, "presence: the rooms index was not refreshed");
            }
        }
    }

    /// Syncs the room of `channel` with Redis (writing this instance's tally if it changed)
    /// and tells its watchers what changed.
    async fn sync(&self, channel: &str) {
        let Some((link, shared)) = &self.0.redis else {
            if let Some(room) = self.lock().get_mut(channel) {
                room.dirty = false;
                room.synced = true;
                room.publish_diff();
            }
            return;
        };
        let mut connection = link.publisher.clone();
        // At most twice: a heartbeat that finds this instance's entry gone writes it again.
        let mut rewrite = false;
        let synced = loop {
            let (tally, count) = {
                let mut rooms = self.lock();
                let Some(room) = rooms.get_mut(channel) else {
                    return;
                };
                let write = room.dirty || rewrite;
                room.dirty = false;
                (write.then(|| room.local.clone()), room.local.connections())
            };
            let mode = match &tally {
                Some(tally) => Mode::Write(tally),
                None => Mode::Keep(count),
            };
            match shared.sync(&mut connection, channel, mode).await {
                Ok(Synced::Missing) if !rewrite => rewrite = true,
                Ok(Synced::Missing) => break None,
                Ok(Synced::Read { now_ms, entries }) => break Some((now_ms, entries)),
                Err(e) => {
                    tracing::debug!(%channel, error = %e, "presence not synced with Redis");
                    break None;
                }
            }
        };
        let mut rooms = self.lock();
        let Some(room) = rooms.get_mut(channel) else {
            return;
        };
        let Some((now_ms, entries)) = synced else {
            // Written next time; the view keeps what it had, local changes included.
            room.dirty = true;
            room.publish_diff();
            return;
        };
        let mut remote: HashMap<String, (Tally, u64)> = entries
            .into_iter()
            .map(|e| (e.instance, (e.tally, e.deadline_ms)))
            .collect();
        // An instance missing from Redis before its deadline was lost by Redis, not dead: it
        // writes itself again within an interval of Redis being back.
        for (instance, (tally, deadline)) in room.remote.drain() {
            if deadline > now_ms && !remote.contains_key(&instance) {
                remote.insert(instance, (tally, deadline));
            }
        }
        room.remote = remote;
        room.synced = true;
        room.publish_diff();
    }

    /// On stop: this instance's members leave every room in Redis now rather than at the TTL.
    async fn farewell(&self) {
        let Some((link, shared)) = &self.0.redis else {
            return;
        };
        let channels: Vec<String> = self.lock().keys().cloned().collect();
        let empty = Tally::default();
        join_all(channels.iter().map(|channel| {
            let mut connection = link.publisher.clone();
            let empty = &empty;
            async move {
                let _ = shared
                    .sync(&mut connection, channel, Mode::Write(empty))
                    .await;
            }
        }))
        .await;
    }

    /// The presence of the room of `channel` on every instance, read now (for the API).
    pub async fn room(&self, channel: &str) -> Result<View, redis::RedisError> {
        let Some((link, shared)) = &self.0.redis else {
            return Ok(self
                .lock()
                .get(channel)
                .map(RoomPresence::view)
                .unwrap_or_default());
        };
        let mut connection = link.publisher.clone();
        let local = self
            .lock()
            .get(channel)
            .map(|room| room.local.clone())
            .unwrap_or_default();
        match shared.sync(&mut connection, channel, Mode::Read).await? {
            Synced::Read { entries, .. } => Ok(View::merge(
                std::iter::once(&local).chain(entries.iter().map(|e| &e.tally)),
            )),
            Synced::Missing => Ok(View::merge([&local])),
        }
    }

    /// The channels of every room with members on some instance (for the API).
    pub async fn channels(&self) -> Result<Vec<String>, redis::RedisError> {
        let local: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, room)| !room.local.is_empty())
            .map(|(channel, _)| channel.clone())
            .collect();
        let Some((link, shared)) = &self.0.redis else {
            return Ok(local);
        };
        let mut connection = link.publisher.clone();
        let mut channels = shared.rooms(&mut connection, &[]).await?;
        for channel in local {
            if !channels.contains(&channel) {
                channels.push(channel);
            }
        }
        channels.sort();
        Ok(channels)
    }

    /// Subscribes a watcher to the room of `channel`: the state frame now and the queue of
    /// the diffs after it, taken together so that none is missed or told twice.
    fn subscribe(&self, channel: &str) -> (Utf8Bytes, mpsc::Receiver<Utf8Bytes>) {
        self.lock()
            .entry(channel.to_owned())
            .or_insert_with(RoomPresence::new)
            .subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, RoomPresence>> {
        // Every operation leaves the map consistent in one step, even if a holder panicked.
        self.0.rooms.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Here {
    /// An anonymous connection's message was published under `name`: it now shows that name.
    /// A signed-in connection's name is its token's and stays.
    pub fn rename(&mut self, name: &str) {
        let Some(presence) = &self.presence else {
            return;
        };
        if self.who.user.is_some() || self.who.name.as_deref() == Some(name) {
            return;
        }
        let mut rooms = presence.lock();
        let Some(room) = rooms.get_mut(&self.channel) else {
            return;
        };
        room.local.remove(&self.who);
        self.who.name = Some(name.to_owned());
        room.local.add(&self.who);
        room.dirty = true;
    }
}

impl Drop for Here {
    fn drop(&mut self) {
        let Some(presence) = &self.presence else {
            return;
        };
        if let Some(room) = presence.lock().get_mut(&self.channel) {
            room.local.remove(&self.who);
            room.dirty = true;
        }
    }
}

impl Watch {
    /// The next frame for this member; never returns for an inactive watch. A member that
    /// fell behind gets the whole state instead of the diffs it missed.
    pub async fn next(&mut self) -> Utf8Bytes {
        let Some((presence, channel, rx)) = &mut self.inner else {
            return std::future::pending().await;
        };
        match rx.recv().await {
            Some(frame) => frame,
            // The queue was closed when it was full: start again from the state.
            None => {
                let (state, fresh) = presence.subscribe(channel);
                *rx = fresh;
                state
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn presence(interval_ms: u64) -> Presence {
        Presence::new(
            PresenceConfig {
                enabled: true,
                interval: Duration::from_millis(interval_ms),
                ttl: Duration::from_secs(15),
            },
            None,
            "simple-chat",
        )
    }

    #[tokio::test(start_paused = true)]
    async fn joins_within_an_interval_make_one_diff_and_a_join_and_leave_none() {
        let presence = presence(1000);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let _first = presence.enter("c", None, Some("first"));
        let (state, mut watch) = presence.watch("c", true).await;
        assert_eq!(
            state.unwrap().as_str(),
            r#"{"presence":"state","members":[{"name":"first","conns":1}],"count":1}"#
        );
        presence.start(&tracker, stop.clone());
        // A thousand joins and one join-and-leave within one interval.
        let many: Vec<Here> = (0..1000).map(|_| presence.enter("c", None, None)).collect();
        drop(presence.enter("c", Some("u9"), Some("Gone")));
        let frame = watch.next().await;
        assert_eq!(
            frame.as_str(),
            r#"{"presence":"diff","joins":[],"leaves":[],"count":1001}"#
        );
        drop(many);
        let mut named = presence.enter("c", None, None);
        named.rename("ann");
        named.rename("ann");
        assert_eq!(
            watch.next().await.as_str(),
            r#"{"presence":"diff","joins":[{"name":"ann","conns":1}],"leaves":[],"count":2}"#
        );
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_watcher_that_fell_behind_gets_the_whole_state_after_what_its_queue_held() {
        let presence = presence(1000);
        let tracker = TaskTracker::new();
        let stop = CancellationToken::new();
        let (_, mut watch) = presence.watch("c", true).await;
        presence.start(&tracker, stop.clone());
        // A change every interval, twice as many as the queue holds, none of them read.
        let joined = 2 * WATCH_BACKLOG;
        let mut here = Vec::new();
        for i in 0..joined {
            here.push(presence.enter("c", None, Some(&format!("n{i}"))));
            tokio::time::sleep(Duration::from_millis(1000)).await;
        }
        let mut diffs = 0;
        let state = loop {
            let frame = tokio::time::timeout(Duration::from_secs(60), watch.next())
                .await
                .expect("a watcher that fell behind is given the state");
            if frame.as_str().starts_with(r#"{"presence":"diff""#) {
                diffs += 1;
                assert!(diffs <= WATCH_BACKLOG, "more diffs than the queue holds");
            } else {
                break frame;
            }
        };
        assert_eq!(diffs, WATCH_BACKLOG);
        assert!(state.as_str().starts_with(r#"{"presence":"state""#));
        assert!(state.as_str().ends_with(&format!(r#""count":{joined}}}"#)));
        // Then diffs again, from that state on.
        drop(here.pop());
        let frame = watch.next().await;
        assert_eq!(
            frame.as_str(),
            format!(
                r#"{{"presence":"diff","joins":[],"leaves":[{{"name":"n{}"}}],"count":{}}}"#,
                joined - 1,
                joined - 1
            )
        );
        stop.cancel();
    }

    #[tokio::test]
    async fn off_counts_nothing_and_watches_nothing() {
        let presence = Presence::new(
            PresenceConfig {
                enabled: false,
                ..PresenceConfig::default()
            },
            None,
            "simple-chat",
        );
        let _here = presence.enter("c", None, Some("a"));
        let (state, _watch) = presence.watch("c", true).await;
        assert!(state.is_none());
        assert_eq!(presence.room("c").await.unwrap().count(), 0);
    }
}
