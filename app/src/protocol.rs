//! The chat wire format, compatible with the original simple-chat.
//!
//! A client's frame `{"name": "...", "content": "..."}` (optionally `"cid"`, its own id for a
//! safe retry) is checked by [`parse_incoming`], stamped by [`ChatMessage::stamp`] and
//! serialised once by [`ChatMessage::to_json`] into exactly
//! `{"time":"YYYY/MM/DD HH:MM:SS","name":…,"content":…}`, the body a history keeps;
//! [`with_position`] appends `"id"` and `"epoch"` as the Redis script does. What comes back from
//! Redis is only checked by [`read_channel_payload`] and forwarded byte for byte, so the
//! original app's messages still reach every client. The sender alone gets [`ack_json`] or
//! [`error_json`] ([`InputError`]); a resuming client first gets [`ResumeNotice`].

use chrono::{DateTime, TimeZone};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::position::MessageId;

/// `strftime` format of the `time` field, as the original writes it.
pub const TIME_FORMAT: &str = "%Y/%m/%d %H:%M:%S";
/// Longest client message id (`cid`).
pub const MAX_CID_CHARS: usize = 64;

/// Why a client's frame was not accepted; the text is what the client reads in `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// The frame is not JSON.
    #[error("message is not valid JSON; send {{\"name\": \"...\", \"content\": \"...\"}}")]
    NotJson,
    /// The frame is JSON but not an object.
    #[error("message must be a JSON object with \"name\" and \"content\"")]
    NotObject,
    /// A required field is absent.
    #[error("field \"{0}\" is missing")]
    Missing(&'static str),
    /// A required field is not a string.
    #[error("field \"{0}\" must be a string")]
    NotString(&'static str),
    /// A field is longer than its configured limit.
    #[error("field \"{field}\" is {len} characters long; the limit is {limit}")]
    TooLong {
        /// `name` or `content`.
        field: &'static str,
        /// Its length in characters.
        len: usize,
        /// The limit in characters.
        limit: usize,
    },
    /// A client message id that is not 1 to 64 characters of `A-Z a-z 0-9 _ -`.
    #[error("field \"cid\" must be 1 to 64 characters of A-Z, a-z, 0-9, _ and -")]
    BadCid,
    /// A binary frame: the protocol is JSON text.
    #[error("binary frames are not accepted; send JSON text")]
    Binary,
    /// A signed-in client sent a `name` other than its token's: the token names the author.
    #[error("field \"name\" must be your signed-in name {0:?} or left out")]
    NotYourName(String),
    /// The connection sends faster than its rate limit.
    #[error("too many messages: at most {per_second} per second (burst {burst})")]
    RateLimited {
        /// Sustained rate.
        per_second: u32,
        /// Burst.
        burst: u32,
    },
}

/// A client's message after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Author's name.
    pub name: String,
    /// Author's user id, for a signed-in client (from its token, never from the frame).
    pub user: Option<String>,
    /// Message text (shown as text, never as HTML).
    pub content: String,
    /// The client's own id for this message: a retried send with the same `cid` is published
    /// once, and the sender is told the id the message got.
    pub cid: Option<String>,
}

/// The message every instance publishes and every client receives.
///
/// Field order is the wire order: `time`, `name`, `content`, then `user` for a signed-in
/// author only (a message without it was written by an anonymous client or the original app).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `YYYY/MM/DD HH:MM:SS`, server local time of the receiving instance.
    pub time: String,
    /// Author's name.
    pub name: String,
    /// Message text.
    pub content: String,
    /// Author's user id (a token's `sub`), for a signed-in author.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Who a signed-in connection is, as its token says: the author of what it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signer<'a> {
    /// The user id (`sub`).
    pub user: &'a str,
    /// The display name.
    pub name: &'a str,
}

/// Longest room name.
pub const MAX_ROOM_CHARS: usize = 64;

/// A room name a client may not use; the text is the answer of the refused handshake.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid room name: a room is 1 to 64 characters of A-Z, a-z, 0-9, _, - and .")]
pub struct BadRoom;

/// The room a client asked for in `?room=`: `None` (absent or empty) is the default room.
pub fn parse_room(room: Option<&str>) -> Result<Option<&str>, BadRoom> {
    match room {
        None | Some("") => Ok(None),
        Some(name)
            if name.len() <= MAX_ROOM_CHARS
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')) =>
        {
            Ok(Some(name))
        }
        Some(_) => Err(BadRoom),
    }
}

/// Checks a client's text frame against the protocol and the length limits (in characters).
pub fn parse_incoming(
    text: &str,
    max_name_chars: usize,
    max_content_chars: usize,
) -> Result<Incoming, InputError> {
    parse_frame(text, max_name_chars, max_content_chars, None)
}

/// Checks a signed-in client's text frame: like [`parse_incoming`], but the author is
/// `signer`; a `name` may be left out and, when given, must be the signer's.
pub fn parse_signed(
    text: &str,
    max_content_chars: usize,
    signer: Signer<'_>,
) -> Result<Incoming, InputError> {
    parse_frame(text, usize::MAX, max_content_chars, Some(signer))
}

fn parse_frame(
    text: &str,
    max_name_chars: usize,
    max_content_chars: usize,
    signer: Option<Signer<'_>>,
) -> Result<Incoming, InputError> {
    let value: Value = serde_json::from_str(text).map_err(|_| InputError::NotJson)?;
    let Value::Object(mut object) = value else {
        return Err(InputError::NotObject);
    };
    let mut field = |key: &'static str, limit: usize| match object.remove(key) {
        None => Err(InputError::Missing(key)),
        Some(Value::String(s)) => {
            let len = s.chars().count();
            if len > limit {
                Err(InputError::TooLong {
                    field: key,
                    len,
                    limit,
                })
            } else {
                Ok(s)
            }
        }
        Some(_) => Err(InputError::NotString(key)),
    };
    let (name, user) = match signer {
        None => (field("name", max_name_chars)?, None),
        Some(signer) => match field("name", max_name_chars) {
            Err(InputError::Missing(_)) => (signer.name.to_owned(), Some(signer.user.to_owned())),
            Ok(name) if name == signer.name => (name, Some(signer.user.to_owned())),
            Ok(_) | Err(_) => return Err(InputError::NotYourName(signer.name.to_owned())),
        },
    };
    let content = field("content", max_content_chars)?;
    let cid = match object.remove("cid") {
        None | Some(Value::Null) => None,
        Some(Value::String(cid)) if is_cid(&cid) => Some(cid),
        Some(_) => return Err(InputError::BadCid),
    };
    Ok(Incoming {
        name,
        user,
        content,
        cid,
    })
}

/// Whether `cid` is a usable client message id: it becomes part of a Redis key.
pub fn is_cid(cid: &str) -> bool {
    (1..=MAX_CID_CHARS).contains(&cid.len())
        && cid
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl ChatMessage {
    /// Stamps an accepted message with `now` (the server's local time in production).
    pub fn stamp<Tz: TimeZone>(incoming: Incoming, now: &DateTime<Tz>) -> ChatMessage
    where
        Tz::Offset: std::fmt::Display,
    {
        ChatMessage {
            time: now.format(TIME_FORMAT).to_string(),
            name: incoming.name,
            content: incoming.content,
            user: incoming.user,
        }
    }

    /// The one serialisation shared by Redis and every client.
    pub fn to_json(&self) -> String {
        // Serialising three strings cannot fail; fall back to an empty object rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Token mode: what a connection hears when its token is accepted (at the start and at each
/// refresh): `{"auth":"ok","user":…,"name":…,"expires_in":<seconds>}`.
pub fn signed_in_json(user: &str, name: &str, expires_in: u64) -> String {
    serde_json::json!({ "auth": "ok", "user": user, "name": name, "expires_in": expires_in })
        .to_string()
}

/// Token mode: the notice that the token expires in `seconds`:
/// `{"refresh":true,"in":<seconds>}`; the client sends a new `{"token": …}` on the same socket.
pub fn refresh_json(seconds: u64) -> String {
    serde_json::json!({ "refresh": true, "in": seconds }).to_string()
}

/// `body` (a serialised [`ChatMessage`], a JSON object) with `"id"` and `"epoch"` appended:
/// what clients receive. The history's Redis script builds the same text.
pub fn with_position(body: &str, id: MessageId, epoch: &str) -> String {
    let open = body.trim_end().strip_suffix('}').unwrap_or("{");
    let separator = if open.trim_end().ends_with('{') {
        ""
    } else {
        ","
    };
    format!("{open}{separator}\"id\":\"{id}\",\"epoch\":\"{epoch}\"}}")
}

/// What a payload from the channel says about its place in the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// Its id, when it has one (messages from the original app have none).
    pub id: Option<MessageId>,
    /// The epoch of that id.
    pub epoch: Option<String>,
}

/// Reads a payload from the channel: `None` unless it is a JSON object (which may be shown to
/// clients), otherwise its optional `id` and `epoch`. A malformed `id` counts as none.
pub fn read_channel_payload(payload: &str) -> Option<Stamp> {
    /// Any JSON value is accepted in these fields (the original app's clients may put a number
    /// in `id`); only strings in our format count.
    #[derive(Deserialize)]
    struct Fields {
        #[serde(default)]
        id: Option<Value>,
        #[serde(default)]
        epoch: Option<Value>,
    }
    if !payload.trim_start().starts_with('{') {
        return None;
    }
    let fields: Fields = serde_json::from_str(payload).ok()?;
    let text = |v: Option<Value>| match v {
        Some(Value::String(s)) => Some(s),
        _ => None,
    };
    let epoch = text(fields.epoch);
    let id = text(fields.id).and_then(|id| id.parse().ok());
    Some(match (id, epoch) {
        (Some(id), Some(epoch)) => Stamp {
            id: Some(id),
            epoch: Some(epoch),
        },
        // Half a position is none.
        _ => Stamp {
            id: None,
            epoch: None,
        },
    })
}

/// `{"error": "<reason>"}`, the answer the sender alone receives; with the message's `cid` when
/// it had one, so the client knows which send failed, and `"retry": true` when the same send
/// may succeed later (Redis unreachable, too fast) rather than never (bad input).
pub fn error_json(reason: &str, cid: Option<&str>, retry: bool) -> String {
    let mut object = serde_json::Map::new();
    object.insert("error".to_owned(), reason.into());
    if let Some(cid) = cid {
        object.insert("cid".to_owned(), cid.into());
    }
    if retry {
        object.insert("retry".to_owned(), true.into());
    }
    Value::Object(object).to_string()
}

/// `{"ack": "<cid>", "id": "<id>", "epoch": "<epoch>"}`: the sender's message with this `cid` is
/// in the history under `id` (sent now, or by an earlier try).
pub fn ack_json(cid: &str, id: MessageId, epoch: &str) -> String {
    serde_json::json!({ "ack": cid, "id": id.to_string(), "epoch": epoch }).to_string()
}

/// The first frame a client that asked to resume receives: whether its gap was filled, the
/// epoch and position it now holds, and how many missed messages follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ResumeNotice {
    /// `true`: the `missed` messages that follow are exactly what the client missed (none for a
    /// fresh client). `false`: what it missed cannot be recovered (`reason` says why).
    pub recovered: bool,
    /// The history's current epoch.
    pub epoch: String,
    /// The greatest id the client holds once the missed messages are delivered.
    pub last: String,
    /// How many missed messages follow this frame.
    pub missed: usize,
    /// Why nothing could be recovered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl ResumeNotice {
    /// The frame's text.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Local};

    #[test]
    fn room_names_are_checked() {
        assert_eq!(parse_room(None), Ok(None));
        assert_eq!(parse_room(Some("")), Ok(None));
        let longest = "a".repeat(MAX_ROOM_CHARS);
        for good in ["lobby", "A-z_0.9", "...", longest.as_str()] {
            assert_eq!(parse_room(Some(good)), Ok(Some(good)));
        }
        let too_long = "a".repeat(MAX_ROOM_CHARS + 1);
        for bad in [
            "a b",
            "a:b",
            "a/b",
            "{x}",
            "café",
            "a\u{0}",
            " ",
            too_long.as_str(),
        ] {
            assert_eq!(parse_room(Some(bad)), Err(BadRoom), "{bad:?}");
        }
    }
    fn parse(text: &str) -> Result<Incoming, InputError> {
        parse_incoming(text, 8, 16)
    }

    #[test]
    fn a_signed_in_author_is_the_tokens_and_another_name_is_refused() {
        let signer = Signer {
            user: "u1",
            name: "Ann",
        };
        let signed = |text| parse_signed(text, 16, signer);
        let expected = Incoming {
            name: "Ann".into(),
            user: Some("u1".into()),
            content: "hi".into(),
            cid: None,
        };
        assert_eq!(signed(r#"{"content": "hi"}"#), Ok(expected.clone()));
        assert_eq!(signed(r#"{"name": "Ann", "content": "hi"}"#), Ok(expected));
        for other in [
            r#"{"name": "Bob", "content": "hi"}"#,
            r#"{"name": 5, "content": "hi"}"#,
        ] {
            assert_eq!(signed(other), Err(InputError::NotYourName("Ann".into())));
        }
        assert_eq!(
            signed(r#"{"name": "Ann"}"#),
            Err(InputError::Missing("content"))
        );
        let message = ChatMessage::stamp(signed(r#"{"content": "x"}"#).unwrap(), &Local::now());
        let json = message.to_json();
        assert!(
            json.ends_with(r#","name":"Ann","content":"x","user":"u1"}"#),
            "{json}"
        );
    }

    #[test]
    fn accepts_a_valid_message() {
        assert_eq!(
            parse(r#"{"name": "ann", "content": "hello"}"#),
            Ok(Incoming {
                name: "ann".into(),
                user: None,
                content: "hello".into(),
                cid: None,
            })
        );
    }

    #[test]
    fn ignores_additional_fields() {
        assert_eq!(
            parse(r#"{"id": 7, "name": "ann", "content": "hi", "time": "forged", "x": {"y": 1}}"#),
            Ok(Incoming {
                name: "ann".into(),
                user: None,
                content: "hi".into(),
                cid: None,
            })
        );
    }

    #[test]
    fn rejects_bad_input_with_a_reason() {
        assert_eq!(parse("hello"), Err(InputError::NotJson));
        assert_eq!(parse(""), Err(InputError::NotJson));
        assert_eq!(parse(r#"{"name": "a""#), Err(InputError::NotJson));
        assert_eq!(parse(r#"["a", "b"]"#), Err(InputError::NotObject));
        assert_eq!(parse(r#""text""#), Err(InputError::NotObject));
        assert_eq!(
            parse(r#"{"content": "x"}"#),
            Err(InputError::Missing("name"))
        );
        assert_eq!(
            parse(r#"{"name": "x"}"#),
            Err(InputError::Missing("content"))
        );
        assert_eq!(
            parse(r#"{"name": 5, "content": "x"}"#),
            Err(InputError::NotString("name"))
        );
        assert_eq!(
            parse(r#"{"name": "a", "content": null}"#),
            Err(InputError::NotString("content"))
        );
        assert_eq!(
            parse(r#"{"name": "123456789", "content": "x"}"#),
            Err(InputError::TooLong {
                field: "name",
                len: 9,
                limit: 8
            })
        );
    }

    #[test]
    fn limits_count_characters_not_bytes() {
        // Eight two-byte characters fit a limit of eight characters.
        assert!(parse(r#"{"name": "éééééééé", "content": "x"}"#).is_ok());
        assert_eq!(
            parse(r#"{"name": "a", "content": "ééééééééééééééééé"}"#),
            Err(InputError::TooLong {
                field: "content",
                len: 17,
                limit: 16
            })
        );
    }

    #[test]
    fn serialises_in_the_original_shape() {
        let now = FixedOffset::east_opt(3600)
            .unwrap()
            .with_ymd_and_hms(2024, 3, 5, 7, 8, 9)
            .unwrap();
        let message = ChatMessage::stamp(
            Incoming {
                name: "ann \"the\" <b>".into(),
                user: None,
                content: "line\nnext".into(),
                cid: None,
            },
            &now,
        );
        assert_eq!(
            message.to_json(),
            r#"{"time":"2024/03/05 07:08:09","name":"ann \"the\" <b>","content":"line\nnext"}"#
        );
        let back: ChatMessage = serde_json::from_str(&message.to_json()).unwrap();
        assert_eq!(back, message);
    }

    #[test]
    fn time_is_stamped_in_local_time_with_the_exact_format() {
        let now = Local::now();
        let message = ChatMessage::stamp(
            Incoming {
                name: String::new(),
                user: None,
                content: String::new(),
                cid: None,
            },
            &now,
        );
        let t = message.time.as_bytes();
        assert_eq!(t.len(), 19, "{}", message.time);
        for (i, b) in t.iter().enumerate() {
            match i {
                4 | 7 => assert_eq!(*b, b'/'),
                10 => assert_eq!(*b, b' '),
                13 | 16 => assert_eq!(*b, b':'),
                _ => assert!(b.is_ascii_digit(), "{}", message.time),
            }
        }
        assert_eq!(message.time, now.format("%Y/%m/%d %H:%M:%S").to_string());
    }

    #[test]
    fn reads_chat_payloads_and_their_place_from_the_channel() {
        assert_eq!(
            read_channel_payload(
                r#"{"time": "2024/01/01 00:00:00", "name": "py", "content": "hi"}"#
            ),
            Some(Stamp {
                id: None,
                epoch: None
            })
        );
        assert_eq!(
            read_channel_payload(
                r#"{"time":"t","name":"n","content":"c","id":"17-3","epoch":"ab"}"#
            ),
            Some(Stamp {
                id: Some(MessageId { ms: 17, seq: 3 }),
                epoch: Some("ab".into())
            })
        );
        // Escaped text in other fields does not disturb reading the id.
        assert_eq!(
            read_channel_payload(r#"{"content":"\"id\":\"9-9\"","id":"1-2","epoch":"e"}"#)
                .and_then(|s| s.id),
            Some(MessageId { ms: 1, seq: 2 })
        );
        for odd in [
            r#"{"id":"not-an-id","epoch":"e"}"#,
            r#"{"id":7,"epoch":"e"}"#,
            r#"{"id":"1-2"}"#,
            r#"{"id":"1-2","epoch":{"x":1}}"#,
        ] {
            assert_eq!(
                read_channel_payload(odd),
                Some(Stamp {
                    id: None,
                    epoch: None
                }),
                "{odd}"
            );
        }
        assert_eq!(read_channel_payload("not json"), None);
        assert_eq!(read_channel_payload("[1, 2]"), None);
        assert_eq!(read_channel_payload("{\"a\": 1} trailing"), None);
    }

    #[test]
    fn the_position_is_appended_to_the_body() {
        let body = r#"{"time":"t","name":"n","content":"c"}"#;
        let id = MessageId { ms: 5, seq: 1 };
        let full = with_position(body, id, "e1");
        assert_eq!(
            full,
            r#"{"time":"t","name":"n","content":"c","id":"5-1","epoch":"e1"}"#
        );
        assert_eq!(
            read_channel_payload(&full),
            Some(Stamp {
                id: Some(id),
                epoch: Some("e1".into())
            })
        );
        assert_eq!(with_position("{}", id, "e"), r#"{"id":"5-1","epoch":"e"}"#);
    }

    #[test]
    fn client_message_ids_are_checked() {
        let with = |cid: &str| parse(&format!(r#"{{"name": "a", "content": "b", "cid": {cid}}}"#));
        assert_eq!(
            with(r#""abc-_09XZ""#).unwrap().cid.as_deref(),
            Some("abc-_09XZ")
        );
        assert_eq!(with("null").unwrap().cid, None);
        let longest = "x".repeat(MAX_CID_CHARS);
        assert!(with(&format!("\"{longest}\"")).is_ok());
        for bad in [r#""""#, r#""a b""#, r#""a:b""#, r#""é""#, "7", "[]"] {
            assert_eq!(with(bad), Err(InputError::BadCid), "{bad}");
        }
        assert_eq!(with(&format!("\"{longest}x\"")), Err(InputError::BadCid));
    }

    #[test]
    fn acks_errors_and_notices_are_json() {
        let ack: Value =
            serde_json::from_str(&ack_json("c1", MessageId { ms: 2, seq: 0 }, "e")).unwrap();
        assert_eq!(
            ack,
            serde_json::json!({"ack": "c1", "id": "2-0", "epoch": "e"})
        );
        let notice = ResumeNotice {
            recovered: false,
            epoch: "e".into(),
            last: "0-0".into(),
            missed: 0,
            reason: Some("why".into()),
        };
        let value: Value = serde_json::from_str(&notice.to_json()).unwrap();
        assert_eq!(value["recovered"], false);
        assert_eq!(value["reason"], "why");
    }

    #[test]
    fn never_panics_on_arbitrary_input() {
        // A small deterministic fuzz: every prefix of valid and invalid frames, plus bytes
        // sprinkled in, must produce Ok or Err, never a panic.
        let seeds = [
            r#"{"name": "ann", "content": "hello \u00e9 \ud83d\ude00"}"#,
            r#"{"name": ["x"], "content": {"a": [1, 2, {"b": null}]}}"#,
            r#"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["#,
        ];
        for seed in seeds {
            for end in 0..=seed.len() {
                if let Some(prefix) = seed.get(..end) {
                    let _ = parse(prefix);
                    let _ = read_channel_payload(prefix);
                    let _ = parse(&format!("{prefix}\u{0}}}"));
                }
            }
        }
    }
}
