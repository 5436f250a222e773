//! Arbitrary text as a chat frame from a client (`app::protocol::parse_incoming`, with small
//! limits so that both sides of each limit are reached) and as a payload from the Redis channel
//! (`app::protocol::read_channel_payload`). Checks that an accepted message respects the limits,
//! that what app publishes for it (`ChatMessage::stamp` + `to_json`) is itself a chat payload
//! that reads back as the same message, and that `read_channel_payload` never contradicts a JSON
//! parser on what a parsed value is.

#![no_main]

use app::protocol::{ChatMessage, InputError, parse_incoming, read_channel_payload};

/// Whether app would show `text` from the channel to clients.
fn is_chat_payload(text: &str) -> bool {
    read_channel_payload(text).is_some()
}
use chrono::{FixedOffset, TimeZone as _};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Limits small enough for the fuzzer to cross.
const MAX_NAME: usize = 8;
const MAX_CONTENT: usize = 32;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_incoming(text, MAX_NAME, MAX_CONTENT) {
        Ok(incoming) => {
            assert!(incoming.name.chars().count() <= MAX_NAME);
            assert!(incoming.content.chars().count() <= MAX_CONTENT);
            assert!(
                is_chat_payload(text),
                "accepted {text:?}, which is no chat payload"
            );
            let now = FixedOffset::east_opt(3600)
                .and_then(|tz| tz.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).single())
                .unwrap_or_else(|| panic!("fixed time out of range"));
            let message = ChatMessage::stamp(incoming, &now);
            let json = message.to_json();
            assert!(is_chat_payload(&json), "published {json:?}");
            let back: ChatMessage = serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("published {json:?} does not read back: {e}"));
            assert_eq!(back, message);
        }
        Err(InputError::TooLong { len, limit, .. }) => assert!(len > limit),
        Err(_) => {}
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => assert!(is_chat_payload(text), "{text:?} is an object"),
        Ok(other) => assert!(!is_chat_payload(text), "{other:?} is no object"),
        Err(_) => {}
    }
});
