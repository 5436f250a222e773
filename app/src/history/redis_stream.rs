//! The channel's history in Redis: a Stream beside the pub/sub channel, written and read by two
//! Lua scripts so that each step is atomic on the server.
//!
//! Keys, all hash-tagged on the channel so they live on one slot: `{<channel>}:history` (the
//! Stream), `{<channel>}:epoch` (the history's current life) and `{<channel>}:cid:<cid>` (the
//! dedupe window). [`RedisHistory::publish`] adds, trims, remembers the `cid` and `PUBLISH`es
//! (`SPUBLISH` on a cluster) in one script, so the channel's order is the Stream's;
//! [`RedisHistory::read`] returns the epoch, the newest id, the greatest id that may have been
//! trimmed (the oldest kept entry's `prev` field) and the entries after a position. Both start
//! a fresh epoch with an empty Stream when either key is missing, so a client holding the old
//! epoch is told its gap cannot be filled. See ARCHITECTURE.md (`history/`).

use std::sync::{Mutex, PoisonError};

use axum::extract::ws::Utf8Bytes;
use redis::aio::ConnectionLike;
use redis::{RedisError, Script};

use super::{Delivery, HistoryConfig, Page, Published, Range, Snapshot};
use crate::position::{MessageId, Position, new_epoch};
use crate::protocol;

/// Makes sure the history has a life (epoch key and Stream both present) and returns its epoch.
/// KEYS[1] Stream, KEYS[2] epoch key; `fresh` is the epoch to start if there is none.
const LIFE: &str = r#"
local function life(stream, epoch_key, fresh)
  local epoch = redis.call('GET', epoch_key)
  if epoch and redis.call('EXISTS', stream) == 1 then
    return epoch
  end
  redis.call('DEL', stream)
  redis.call('XGROUP', 'CREATE', stream, 'scaleout-life', '$', 'MKSTREAM')
  redis.call('XGROUP', 'DESTROY', stream, 'scaleout-life')
  redis.call('SET', epoch_key, fresh)
  return fresh
end
"#;

/// KEYS: Stream, epoch key, [cid key]. ARGV: body, max messages, max age ms, fresh epoch,
/// dedupe seconds, channel, publish command (`PUBLISH`, or `SPUBLISH` for a cluster's shard
/// channel, whose slot is the keys' one). Returns {epoch, id, duplicate (0/1), receivers of
/// the publish}.
const PUBLISH: &str = r#"
local epoch = life(KEYS[1], KEYS[2], ARGV[4])
if KEYS[3] then
  local seen = redis.call('GET', KEYS[3])
  if seen then
    return {epoch, seen, 1, -1}
  end
end
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local prev = '0-0'
if newest[1] then
  prev = newest[1][1]
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[2], '*', 'p', ARGV[1], 'prev', prev)
local now = redis.call('TIME')
local oldest = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - tonumber(ARGV[3])
if oldest > 0 then
  redis.call('XTRIM', KEYS[1], 'MINID', '~', string.format('%.0f', oldest))
end
if KEYS[3] then
  redis.call('SET', KEYS[3], id, 'EX', ARGV[5])
end
local open = string.sub(ARGV[1], 1, -2)
local separator = ','
if string.sub(open, -1) == '{' then
  separator = ''
end
local receivers = redis.call(ARGV[7], ARGV[6], open .. separator .. '"id":"' .. id .. '","epoch":"' .. epoch .. '"}')
return {epoch, id, 0, receivers}
"#;

/// Appends each Stream entry's id and body (its `p` field) to `out`.
const ENTRIES: &str = r#"
local function append_entries(out, entries)
  for _, entry in ipairs(entries) do
    local fields = entry[2]
    for i = 1, #fields, 2 do
      if fields[i] == 'p' then
        out[#out + 1] = entry[1]
        out[#out + 1] = fields[i + 1]
      end
    end
  end
end
"#;

/// KEYS: Stream, epoch key. ARGV: fresh epoch, the reader's epoch ('' for none), the reader's
/// last id ('' for none). Returns {epoch, last added, max trimmed, id1, body1, id2, body2, ...};
/// entries only when the reader's epoch is the current one.
const READ: &str = r#"
local epoch = life(KEYS[1], KEYS[2], ARGV[1])
local newest = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
local last_added, max_trimmed = '0-0', '0-0'
if newest[1] then
  last_added = newest[1][1]
end
if oldest[1] then
  local fields = oldest[1][2]
  for i = 1, #fields, 2 do
    if fields[i] == 'prev' then
      max_trimmed = fields[i + 1]
    end
  end
end
local out = {epoch, last_added, max_trimmed}
if ARGV[3] ~= '' and ARGV[2] == epoch then
  append_entries(out, redis.call('XRANGE', KEYS[1], '(' .. ARGV[3], '+'))
end
return out
"#;

/// KEYS: Stream, epoch key. ARGV: fresh epoch, start (`-` or `(ID`), end (`+` or `(ID`), count,
/// `1` to take the newest entries of the range (then answered newest first). Returns {epoch,
/// id1, body1, ...}.
const PAGE: &str = r#"
local epoch = life(KEYS[1], KEYS[2], ARGV[1])
local entries
if ARGV[5] == '1' then
  entries = redis.call('XREVRANGE', KEYS[1], ARGV[3], ARGV[2], 'COUNT', ARGV[4])
else
  entries = redis.call('XRANGE', KEYS[1], ARGV[2], ARGV[3], 'COUNT', ARGV[4])
end
local out = {epoch}
append_entries(out, entries)
return out
"#;

/// Who the channel's `PUBLISH` reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receivers {
    /// At least one subscription (this instance's own, when it is alive).
    Some,
    /// Nobody: not even this instance's subscription exists at Redis any more.
    None,
    /// Nothing was published (a repeated `cid`).
    NotPublished,
}

/// One channel's history in Redis.
pub struct RedisHistory {
    channel: String,
    stream_key: String,
    epoch_key: String,
    config: HistoryConfig,
    /// `PUBLISH`, or `SPUBLISH` on a cluster.
    publish_command: &'static str,
    publish: Script,
    read: Script,
    page: Script,
    /// The epoch this instance starts if it finds no life; replaced once used, so one value
    /// never names two lives.
    fresh: Mutex<String>,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory")
            .field("stream_key", &self.stream_key)
            .finish_non_exhaustive()
    }
}

impl RedisHistory {
    /// The history of `channel`; `sharded` on a cluster (the channel is a shard channel).
    pub fn new(channel: &str, config: HistoryConfig, sharded: bool) -> RedisHistory {
        RedisHistory {
            publish_command: if sharded { "SPUBLISH" } else { "PUBLISH" },
            channel: channel.to_owned(),
            stream_key: format!("{{{channel}}}:history"),
            epoch_key: format!("{{{channel}}}:epoch"),
            config,
            publish: Script::new(&format!("{LIFE}{PUBLISH}")),
            read: Script::new(&format!("{LIFE}{ENTRIES}{READ}")),
            page: Script::new(&format!("{LIFE}{ENTRIES}{PAGE}")),
            fresh: Mutex::new(new_epoch()),
        }
    }

    /// The channel this history belongs to.
    pub fn channel(&self) -> &str {
        &self.channel
    }

    fn fresh(&self) -> String {
        self.fresh
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// After a script answered with `epoch`: if that is our fresh one, we started a life with it.
    fn used(&self, epoch: &str) {
        let mut fresh = self.fresh.lock().unwrap_or_else(PoisonError::into_inner);
        if *fresh == epoch {
            *fresh = new_epoch();
        }
    }

    /// Adds `body` to the history and publishes it on the channel, unless `cid` was published
    /// within the dedupe window.
    pub async fn publish<C: ConnectionLike>(
        &self,
        connection: &mut C,
        body: &str,
        cid: Option<&str>,
    ) -> Result<(Published, Receivers), RedisError> {
        let mut invocation = self.publish.key(&self.stream_key);
        invocation.key(&self.epoch_key);
        if let Some(cid) = cid {
            invocation.key(format!("{{{}}}:cid:{cid}", self.channel));
        }
        invocation
            .arg(body)
            .arg(self.config.messages)
            .arg(u64::try_from(self.config.max_age.as_millis()).unwrap_or(u64::MAX))
            .arg(self.fresh())
            .arg(self.config.dedupe_window.as_secs().max(1))
            .arg(&self.channel)
            .arg(self.publish_command);
        let (epoch, id, duplicate, receivers): (String, String, i64, i64) =
            invocation.invoke_async(connection).await?;
        self.used(&epoch);
        let published = Published {
            id: parse_id(&id)?,
            epoch,
            duplicate: duplicate == 1,
        };
        let receivers = match receivers {
            n if n > 0 => Receivers::Some,
            0 => Receivers::None,
            _ => Receivers::NotPublished,
        };
        Ok((published, receivers))
    }

    /// Reads the history for a reader at `from` (a client resuming, or this instance's
    /// subscriber catching up); `None` reads only where the history stands.
    pub async fn read<C: ConnectionLike>(
        &self,
        connection: &mut C,
        from: Option<&Position>,
    ) -> Result<Snapshot, RedisError> {
        let (epoch, last) = match from {
            Some(p) => (p.epoch.clone(), p.last.to_string()),
            None => (String::new(), String::new()),
        };
        let reply: Vec<String> = self
            .read
            .key(&self.stream_key)
            .key(&self.epoch_key)
            .arg(self.fresh())
            .arg(epoch)
            .arg(last)
            .invoke_async(connection)
            .await?;
        let mut reply = reply.into_iter();
        let (Some(epoch), Some(last_added), Some(max_trimmed)) =
            (reply.next(), reply.next(), reply.next())
        else {
            return Err(malformed("a history read answered fewer than three values"));
        };
        self.used(&epoch);
        let after = deliveries(reply, &epoch)?;
        Ok(Snapshot {
            last_added: parse_id(&last_added)?,
            max_trimmed: parse_id(&max_trimmed)?,
            epoch,
            after,
        })
    }
}

impl RedisHistory {
    /// The page of the history `range` names.
    pub async fn page<C: ConnectionLike>(
        &self,
        connection: &mut C,
        range: &Range,
    ) -> Result<Page, RedisError> {
        let bound =
            |id: Option<MessageId>, open: &str| id.map_or(open.to_owned(), |id| format!("({id}"));
        let reply: Vec<String> = self
            .page
            .key(&self.stream_key)
            .key(&self.epoch_key)
            .arg(self.fresh())
            .arg(bound(range.after, "-"))
            .arg(bound(range.before, "+"))
            .arg(range.limit)
            .arg(if range.takes_newest() { "1" } else { "0" })
            .invoke_async(connection)
            .await?;
        let mut reply = reply.into_iter();
        let Some(epoch) = reply.next() else {
            return Err(malformed("a history page answered no epoch"));
        };
        self.used(&epoch);
        let mut messages = deliveries(reply, &epoch)?;
        if range.takes_newest() {
            messages.reverse();
        }
        Ok(Page { epoch, messages })
    }
}

/// The deliveries of a reply's `id, body` pairs, as clients receive them.
fn deliveries(
    mut reply: impl Iterator<Item = String>,
    epoch: &str,
) -> Result<Vec<Delivery>, RedisError> {
    let mut out = Vec::new();
    while let (Some(id), Some(body)) = (reply.next(), reply.next()) {
        let id = parse_id(&id)?;
        out.push(Delivery {
            id: Some(id),
            text: Utf8Bytes::from(protocol::with_position(&body, id, epoch)),
        });
    }
    Ok(out)
}

fn parse_id(text: &str) -> Result<MessageId, RedisError> {
    text.parse::<MessageId>()
        .map_err(|e| malformed(e.to_string()))
}

fn malformed(what: impl Into<String>) -> RedisError {
    RedisError::from((
        redis::ErrorKind::Parse,
        "unexpected history reply",
        what.into(),
    ))
}
