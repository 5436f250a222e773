//! The chat wire format, compatible with the original simple-chat.
//!
//! A client's text frame `{"name": "...", "content": "..."}` is checked by [`parse_incoming`]
//! (JSON object, both fields strings within their limits; other fields are ignored), stamped
//! with the server's local time by [`ChatMessage::stamp`] and serialised once by
//! [`ChatMessage::to_json`] into exactly `{"time":"YYYY/MM/DD HH:MM:SS","name":…,"content":…}`:
//! that string is what goes to Redis and, unchanged, to every client. What comes back from
//! Redis is checked by [`is_chat_payload`] only (a JSON object) and forwarded byte for byte, so
//! fields another instance adds pass through. Problems become [`InputError`], which the sender
//! alone receives as [`error_json`].

use chrono::{DateTime, TimeZone};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `strftime` format of the `time` field, as the original writes it.
pub const TIME_FORMAT: &str = "%Y/%m/%d %H:%M:%S";

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
    /// A binary frame: the protocol is JSON text.
    #[error("binary frames are not accepted; send JSON text")]
    Binary,
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
    /// Message text (shown as text, never as HTML).
    pub content: String,
}

/// The message every instance publishes and every client receives.
///
/// Field order is the wire order: `time`, `name`, `content`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `YYYY/MM/DD HH:MM:SS`, server local time of the receiving instance.
    pub time: String,
    /// Author's name.
    pub name: String,
    /// Message text.
    pub content: String,
}

/// Checks a client's text frame against the protocol and the length limits (in characters).
pub fn parse_incoming(
    text: &str,
    max_name_chars: usize,
    max_content_chars: usize,
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
    let name = field("name", max_name_chars)?;
    let content = field("content", max_content_chars)?;
    Ok(Incoming { name, content })
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
        }
    }

    /// The one serialisation shared by Redis and every client.
    pub fn to_json(&self) -> String {
        // Serialising three strings cannot fail; fall back to an empty object rather than panic.
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_owned())
    }
}

/// Whether a payload received from the channel may be shown to clients: a JSON object.
pub fn is_chat_payload(payload: &str) -> bool {
    payload.trim_start().starts_with('{')
        && serde_json::from_str::<serde::de::IgnoredAny>(payload).is_ok()
}

/// `{"error": "<reason>"}`, the answer the sender alone receives.
pub fn error_json(reason: &str) -> String {
    serde_json::json!({ "error": reason }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, Local};

    fn parse(text: &str) -> Result<Incoming, InputError> {
        parse_incoming(text, 8, 16)
    }

    #[test]
    fn accepts_a_valid_message() {
        assert_eq!(
            parse(r#"{"name": "ann", "content": "hello"}"#),
            Ok(Incoming {
                name: "ann".into(),
                content: "hello".into()
            })
        );
    }

    #[test]
    fn ignores_additional_fields() {
        assert_eq!(
            parse(r#"{"id": 7, "name": "ann", "content": "hi", "time": "forged", "x": {"y": 1}}"#),
            Ok(Incoming {
                name: "ann".into(),
                content: "hi".into()
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
                content: "line\nnext".into(),
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
                content: String::new(),
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
    fn recognises_chat_payloads_from_the_channel() {
        assert!(is_chat_payload(
            r#"{"time": "2024/01/01 00:00:00", "name": "py", "content": "hi"}"#
        ));
        assert!(is_chat_payload(
            r#"{"time":"t","name":"n","content":"c","id":"x1"}"#
        ));
        assert!(!is_chat_payload("not json"));
        assert!(!is_chat_payload("[1, 2]"));
        assert!(!is_chat_payload("{\"a\": 1} trailing"));
    }

    #[test]
    fn error_json_escapes_the_reason() {
        assert_eq!(error_json("bad \"x\""), r#"{"error":"bad \"x\""}"#);
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
                    let _ = is_chat_payload(prefix);
                    let _ = parse(&format!("{prefix}\u{0}}}"));
                }
            }
        }
    }
}
