//! Presence in Redis (7.0: no hash-field TTL), so every instance sees every member; all keys of
//! a room are hash-tagged on its channel and so live on its shard in a cluster.
//!
//! Per room `C`: a hash per instance, `{C}:presence:<instance>` (field: who, as
//! [`Who::to_field`]; value: that instance's connections as who), expiring `presence_ttl` after
//! its instance's last heartbeat, and a sorted set `{C}:presence` of the instances present with
//! the time (Redis' clock, ms) their entry expires. [`SYNC`] is one atomic step per room per
//! interval: write this instance's hash if it changed, heartbeat, drop expired instances, and
//! read every other live instance's hash with its deadline. An instance that dies stops
//! heartbeating and its members leave within the TTL. Beside them, `{<base>}:presence:rooms`
//! lists the rooms with members (for `GET /api/rooms`), each until its last heartbeat's TTL.

use redis::aio::ConnectionLike;
use redis::{RedisError, Script, Value};

use super::view::{Tally, Who};

/// KEYS: the room's set of instances, this instance's hash (absent for a read). ARGV: instance
/// id, TTL in ms, the hash key prefix, mode (`write`: replace the hash with the pairs from
/// ARGV[6]; `keep`: heartbeat only; `read`: nothing of ours), this instance's connection count
/// (`keep` answers `missing` when it is not 0 and the hash is gone: Redis lost it), then field,
/// value pairs. Answers {now ms, 'ok' | 'missing', instance, deadline, {field, value, ...}, ...}.
const SYNC: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local mode = ARGV[4]
if mode == 'write' then
  redis.call('DEL', KEYS[2])
  for i = 6, #ARGV, 2 do
    redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  end
elseif mode == 'keep' and tonumber(ARGV[5]) > 0 and redis.call('EXISTS', KEYS[2]) == 0 then
  return {now, 'missing'}
end
if mode ~= 'read' then
  redis.call('PEXPIRE', KEYS[2], ttl)
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local out = {now, 'ok'}
local live = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #live, 2 do
  if live[i] ~= ARGV[1] then
    out[#out + 1] = live[i]
    out[#out + 1] = live[i + 1]
    out[#out + 1] = redis.call('HGETALL', ARGV[3] .. live[i])
  end
end
return out
"#;

/// KEYS: the rooms index. ARGV: TTL in ms, then the channels this instance has members in.
/// Refreshes them, drops expired ones, answers every room listed.
const ROOMS: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[i])
end
if #ARGV > 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"#;

/// What one sync step does with this instance's own entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode<'a> {
    /// Replace it with this tally.
    Write(&'a Tally),
    /// Heartbeat; this many local connections (to find out that Redis lost the entry).
    Keep(usize),
    /// Leave it alone: only read (the API, or an instance without members there).
    Read,
}

/// Another instance's entry, as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its id.
    pub instance: String,
    /// When it expires unless renewed, in Redis' clock (ms).
    pub deadline_ms: u64,
    /// Its connections.
    pub tally: Tally,
}

/// The answer to a sync step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Synced {
    /// Redis' clock (ms) and every other live instance's entry.
    Read {
        /// Redis' clock.
        now_ms: u64,
        /// The other instances.
        entries: Vec<Entry>,
    },
    /// This instance's entry was gone (Redis restarted, or lost it): write it again.
    Missing,
}

/// The scripts and key names of presence in Redis.
pub struct Shared {
    instance: String,
    ttl_ms: u64,
    index_key: String,
    sync: Script,
    rooms: Script,
}

impl Shared {
    /// Presence as `instance`, entries expiring `ttl_ms` after a heartbeat; `base` is the
    /// default room's channel, which the rooms index is tagged on.
    pub fn new(instance: &str, ttl_ms: u64, base: &str) -> Shared {
        Shared {
            instance: instance.to_owned(),
            ttl_ms,
            index_key: format!("{{{base}}}:presence:rooms"),
            sync: Script::new(SYNC),
            rooms: Script::new(ROOMS),
        }
    }

    /// One sync step for the room of `channel`.
    pub async fn sync<C: ConnectionLike>(
        &self,
        connection: &mut C,
        channel: &str,
        mode: Mode<'_>,
    ) -> Result<Synced, RedisError> {
        let prefix = format!("{{{channel}}}:presence:");
        let mut invocation = self.sync.key(format!("{{{channel}}}:presence"));
        invocation.key(format!("{prefix}{}", self.instance));
        invocation.arg(&self.instance).arg(self.ttl_ms).arg(&prefix);
        match mode {
            Mode::Write(tally) => {
                invocation.arg("write").arg(tally.connections());
                for (who, n) in tally.entries() {
                    invocation.arg(who.to_field()).arg(n);
                }
            }
            Mode::Keep(n) => {
                invocation.arg("keep").arg(n);
            }
            Mode::Read => {
                invocation.arg("read").arg(0);
            }
        }
        let reply: Vec<Value> = invocation.invoke_async(connection).await?;
        parse_sync(reply)
    }

    /// Marks `channels` as having members here (may be empty), and lists every room that has
    /// members on some instance.
    pub async fn rooms<C: ConnectionLike>(
        &self,
        connection: &mut C,
        channels: &[String],
    ) -> Result<Vec<String>, RedisError> {
        let mut invocation = self.rooms.key(&self.index_key);
        invocation.arg(self.ttl_ms);
        for channel in channels {
            invocation.arg(channel);
        }
        invocation.invoke_async(connection).await
    }
}

fn parse_sync(reply: Vec<Value>) -> Result<Synced, RedisError> {
    let mut reply = reply.into_iter();
    let now_ms: u64 = match reply.next() {
        Some(v) => redis::from_redis_value(v)?,
        None => return Err(malformed("an empty presence reply")),
    };
    let status: String = match reply.next() {
        Some(v) => redis::from_redis_value(v)?,
        None => return Err(malformed("a presence reply without a status")),
    };
    if status == "missing" {
        return Ok(Synced::Missing);
    }
    let mut entries = Vec::new();
    while let (Some(instance), Some(deadline), Some(fields)) =
        (reply.next(), reply.next(), reply.next())
    {
        let instance: String = redis::from_redis_value(instance)?;
        // A sorted set's score comes back as text, possibly with a fraction.
        let deadline: String = redis::from_redis_value(deadline)?;
        let deadline_ms = deadline
            .parse::<f64>()
            .map_err(|_| malformed("a presence deadline that is not a number"))?
            as u64;
        let fields: Vec<String> = redis::from_redis_value(fields)?;
        let tally = Tally::from_entries(fields.chunks_exact(2).filter_map(|pair| {
            let who = Who::from_field(&pair[0])?;
            Some((who, pair[1].parse().ok()?))
        }));
        entries.push(Entry {
            instance,
            deadline_ms,
            tally,
        });
    }
    Ok(Synced::Read { now_ms, entries })
}

fn malformed(what: &str) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected presence reply",
        what.to_owned(),
    ))
}
