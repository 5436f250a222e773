//! The users' counts and disconnects in Redis, shared by every instance.
//!
//! Keys, hash-tagged per user so a user's two keys share a slot in a cluster:
//! `{<channel>:user:<id>}:conns`, a hash of `<instance>` → `<count>:<deadline ms>` (Redis
//! time), and `{<channel>:user:<id>}:revoked`, the Unix time a disconnect with `--until` ends
//! (it expires then). A count whose deadline passed is its instance's last word before it died:
//! the claim script drops it. Every instance rewrites its own counts every [`HEARTBEAT`], and
//! each count lives [`COUNT_TTL`]. Disconnects travel on the stream `{<channel>}:disconnects`,
//! which every instance polls every [`POLL`].

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::{Script, Value};
use tokio_util::sync::CancellationToken;

use super::{Refused, Users};
use crate::config::Config;
use crate::redis::RedisLink;

/// How long an instance's count of a user lasts without a heartbeat: within this, a dead
/// instance's connections stop counting.
pub const COUNT_TTL: Duration = Duration::from_secs(30);
/// How often each instance rewrites its users' counts.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often each instance reads the disconnect stream.
const POLL: Duration = Duration::from_millis(250);
/// Disconnects the stream keeps, for instances that were briefly away.
const STREAM_LENGTH: usize = 1000;
/// Heartbeat writes in flight at once.
const BEAT_CONCURRENCY: usize = 16;

/// Claims a place: refused (`{-1, until}`) while the user is disconnected and the token is
/// older, refused (`{-2, total}`) at the limit, else counted (`{total, 0}`). Counts whose
/// deadline passed are dropped first.
const CLAIM: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local revoked = tonumber(redis.call('GET', KEYS[2]) or '0') or 0
if revoked * 1000 > now and tonumber(ARGV[3]) < revoked then return {-1, revoked} end
local fields = redis.call('HGETALL', KEYS[1])
local total, mine = 0, 0
for i = 1, #fields, 2 do
  local count, deadline = string.match(fields[i + 1], '^(%d+):(%d+)$')
  if count and tonumber(deadline) > now then
    total = total + tonumber(count)
    if fields[i] == ARGV[1] then mine = tonumber(count) end
  else
    redis.call('HDEL', KEYS[1], fields[i])
  end
end
if total >= tonumber(ARGV[2]) then return {-2, total} end
local ttl = tonumber(ARGV[4])
redis.call('HSET', KEYS[1], ARGV[1], (mine + 1) .. ':' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return {total + 1, 0}
";

/// Gives one place back.
const RELEASE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local value = redis.call('HGET', KEYS[1], ARGV[1])
if not value then return 0 end
local count = tonumber(string.match(value, '^(%d+):')) or 0
if count <= 1 then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], (count - 1) .. ':' .. (now + tonumber(ARGV[2])))
return count - 1
";

/// Sets this instance's count of a user, with a fresh deadline.
const BEAT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. (now + ttl))
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
";

/// Why a disconnect did not reach every instance.
#[derive(Debug, thiserror::Error)]
pub enum DisconnectError {
    /// No Redis is configured: the instances cannot be reached through it.
    #[error(
        "no Redis configured (redis_url, --redis or REDIS_URL): the instances share nothing to reach them through"
    )]
    NoRedis,
    /// The connection to Redis could not be set up.
    #[error(transparent)]
    Link(#[from] crate::redis::LinkError),
    /// Redis refused or did not answer.
    #[error("the disconnect did not reach Redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// An instance's side of the shared counts.
pub(super) struct Shared {
    link: Arc<RedisLink>,
    /// This instance's field in every user's hash.
    instance: String,
    claim: Script,
    release: Script,
    beat: Script,
}

fn conns_key(channel: &str, user: &str) -> String {
    format!("{{{channel}:user:{user}}}:conns")
}

fn revoked_key(channel: &str, user: &str) -> String {
    format!("{{{channel}:user:{user}}}:revoked")
}

fn stream_key(channel: &str) -> String {
    format!("{{{channel}}}:disconnects")
}

fn ttl_ms() -> u64 {
    u64::try_from(COUNT_TTL.as_millis()).unwrap_or(u64::MAX)
}

/// A name for this instance, unique among the instances sharing a Redis.
fn instance_name() -> String {
    let mut bytes = [0u8; 12];
    let random = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let suffix: String = match random {
        Ok(()) => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        // No randomness: the process id and the start time are unique enough on one Redis.
        Err(_) => format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ),
    };
    format!("app-{suffix}")
}

impl Shared {
    pub(super) fn new(link: Arc<RedisLink>) -> Shared {
        Shared {
            link,
            instance: instance_name(),
            claim: Script::new(CLAIM),
            release: Script::new(RELEASE),
            beat: Script::new(BEAT),
        }
    }

    fn channel(&self) -> &str {
        &self.link.config.channel
    }

    pub(super) async fn claim(
        &self,
        user: &str,
        limit: u32,
        issued_at: u64,
    ) -> Result<(), Refused> {
        let mut connection = self.link.publisher.clone();
        let answer: Result<(i64, i64), _> = self
            .claim
            .key(conns_key(self.channel(), user))
            .key(revoked_key(self.channel(), user))
            .arg(&self.instance)
            .arg(limit)
            .arg(issued_at)
            .arg(ttl_ms())
            .invoke_async(&mut connection)
            .await;
        match answer {
            Ok((-1, until)) => Err(Refused::Revoked(u64::try_from(until).unwrap_or(0))),
            Ok((-2, _)) => Err(Refused::TooMany(limit)),
            Ok(_) => Ok(()),
            Err(e) => {
                tracing::warn!(server = %self.link.config.display, error = %e, "could not count a user's connections");
                Err(Refused::Unavailable)
            }
        }
    }

    /// Gives a place of `user` back, in the background (a seat is dropped in sync code). If
    /// Redis misses it, the next heartbeat writes the right count, or the count expires.
    pub(super) fn release(&self, user: String) {
        let mut connection = self.link.publisher.clone();
        let script = self.release.clone();
        let key = conns_key(self.channel(), &user);
        let instance = self.instance.clone();
        tokio::spawn(async move {
            let released = script
                .key(key)
                .arg(instance)
                .arg(ttl_ms())
                .invoke_async::<i64>(&mut connection)
                .await;
            if let Err(e) = released {
                tracing::debug!(error = %e, "could not give back a user's connection; the heartbeat will");
            }
        });
    }

    pub(super) async fn disconnect(
        &self,
        user: &str,
        until: Option<u64>,
    ) -> Result<(), DisconnectError> {
        let mut connection = self.link.publisher.clone();
        disconnect_on(&mut connection, self.channel(), user, until).await
    }

    /// Rewrites this instance's count of every local user.
    async fn beat(&self, counts: Vec<(String, usize)>) {
        let failed = futures_util::stream::iter(counts)
            .map(|(user, count)| {
                let mut connection = self.link.publisher.clone();
                async move {
                    self.beat
                        .key(conns_key(self.channel(), &user))
                        .arg(&self.instance)
                        .arg(count)
                        .arg(ttl_ms())
                        .invoke_async::<i64>(&mut connection)
                        .await
                }
            })
            .buffer_unordered(BEAT_CONCURRENCY)
            .filter(|beat| std::future::ready(beat.is_err()))
            .count()
            .await;
        if failed > 0 {
            tracing::warn!(
                failed,
                "could not refresh some users' connection counts in Redis"
            );
        }
    }
}

/// Sets the revocation (when `until` is in the future) and announces the disconnect.
async fn disconnect_on<C: redis::aio::ConnectionLike + Send>(
    connection: &mut C,
    channel: &str,
    user: &str,
    until: Option<u64>,
) -> Result<(), DisconnectError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if let Some(until) = until.filter(|&until| until > now) {
        let () = redis::cmd("SET")
            .arg(revoked_key(channel, user))
            .arg(until)
            .arg("EXAT")
            .arg(until)
            .query_async(connection)
            .await?;
    }
    let _: Value = redis::cmd("XADD")
        .arg(stream_key(channel))
        .arg("MAXLEN")
        .arg("~")
        .arg(STREAM_LENGTH)
        .arg("*")
        .arg("user")
        .arg(user)
        .query_async(connection)
        .await?;
    Ok(())
}

/// `app disconnect`: disconnects `user` on every instance sharing `config`'s Redis and, with
/// `until` (Unix seconds) in the future, refuses its tokens issued before then until then.
pub async fn disconnect_everywhere(
    config: &Config,
    user: &str,
    until: Option<u64>,
) -> Result<(), DisconnectError> {
    let redis = config.redis.as_ref().ok_or(DisconnectError::NoRedis)?;
    let link = RedisLink::new(redis)?;
    let mut connection = link.publisher.clone();
    disconnect_on(&mut connection, &link.config.channel, user, until).await
}

/// Rewrites the instance's counts every [`HEARTBEAT`] until `stop`.
pub(super) async fn heartbeat(users: Arc<Users>, stop: CancellationToken) {
    let Some(shared) = &users.shared else { return };
    let mut ticks = tokio::time::interval(HEARTBEAT);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => shared.beat(users.local_counts()).await,
        }
    }
}

/// Reads the disconnect stream every [`POLL`] from where it stood at start, and disconnects
/// the local connections of each user named, until `stop`.
pub(super) async fn follow_disconnects(users: Arc<Users>, stop: CancellationToken) {
    let Some(shared) = &users.shared else { return };
    let key = stream_key(shared.channel());
    let mut connection = shared.link.publisher.clone();
    let mut ticks = tokio::time::interval(POLL);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Where the stream stood when this instance started: earlier disconnects are not its.
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let read = match &last {
            None => stream_end(&mut connection, &key).await.map(|end| {
                last = Some(end);
                Vec::new()
            }),
            Some(after) => read_after(&mut connection, &key, after).await,
        };
        match read {
            Ok(entries) => {
                for (id, user) in entries {
                    let closed = users.disconnect_here(&user);
                    tracing::info!(user, closed, "user disconnected");
                    last = Some(id);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "could not read the disconnect stream; trying again")
            }
        }
    }
}

/// The id of the stream's last entry (`0-0` when empty).
async fn stream_end<C: redis::aio::ConnectionLike + Send>(
    connection: &mut C,
    key: &str,
) -> redis::RedisResult<String> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(connection)
        .await?;
    Ok(entries
        .into_iter()
        .next()
        .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
}

/// The disconnects after `after`: their ids and users.
async fn read_after<C: redis::aio::ConnectionLike + Send>(
    connection: &mut C,
    key: &str,
    after: &str,
) -> redis::RedisResult<Vec<(String, String)>> {
    let entries: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
        .arg(key)
        .arg(format!("({after}"))
        .arg("+")
        .arg("COUNT")
        .arg(100)
        .query_async(connection)
        .await?;
    Ok(entries
        .into_iter()
        .map(|(id, fields)| {
            // Fields and values alternate; an entry without a user names nobody.
            let user = fields
                .chunks(2)
                .find(|pair| pair.first().is_some_and(|f| f == "user"))
                .and_then(|pair| pair.get(1).cloned())
                .unwrap_or_default();
            (id, user)
        })
        .collect())
}
