//! Where a message sits in a channel's history: its [`MessageId`] (a Redis Stream entry id,
//! `<ms>-<seq>`) within an [`Epoch`] (one life of the history).
//!
//! Ids are assigned once, by Redis `XADD` (or by the in-process history without Redis), so every
//! instance and every client sees the same id for a message, and ids grow with the channel's
//! order. A client's position is the greatest id it holds plus the epoch it came from; resuming
//! from it is only exact while the epoch is the same (see `history`).

use std::fmt;
use std::str::FromStr;

/// A message's id in its channel: a Redis Stream entry id, ordered by `ms` then `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MessageId {
    /// Milliseconds since the Unix epoch when the entry was added (Redis' clock).
    pub ms: u64,
    /// Sequence number among entries of the same millisecond.
    pub seq: u64,
}

impl MessageId {
    /// The position before any message: `0-0`.
    pub const ZERO: MessageId = MessageId { ms: 0, seq: 0 };
}

/// Why a text is not a message id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a message id (expected <ms>-<seq>, e.g. 1733312345678-0)")]
pub struct BadId(pub String);

impl FromStr for MessageId {
    type Err = BadId;

    fn from_str(text: &str) -> Result<MessageId, BadId> {
        let bad = || BadId(text.chars().take(48).collect());
        let (ms, seq) = text.split_once('-').ok_or_else(bad)?;
        let digits =
            |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(ms) || !digits(seq) {
            return Err(bad());
        }
        Ok(MessageId {
            ms: ms.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// Longest epoch a client may send back; ours are 16 hex digits.
pub const MAX_EPOCH_CHARS: usize = 64;

/// A fresh epoch: 16 random hex digits (64 bits), so two lives of a history never share one.
pub fn new_epoch() -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 8];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // No system randomness: the clock still tells two lives apart.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes = (nanos as u64 ^ u64::from(std::process::id())).to_be_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client's position: the epoch and the greatest id it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    /// The history's life the id belongs to.
    pub epoch: String,
    /// The greatest id the client holds (`0-0` when it holds none).
    pub last: MessageId,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_parse_print_and_order_numerically() {
        let a: MessageId = "1733312345678-0".parse().unwrap();
        let b: MessageId = "1733312345678-10".parse().unwrap();
        let c: MessageId = "1733312345679-2".parse().unwrap();
        assert!(a < b && b < c);
        assert_eq!(b.to_string(), "1733312345678-10");
        // 9 < 10 numerically even though "9" > "10" as text.
        assert!("5-9".parse::<MessageId>().unwrap() < "5-10".parse().unwrap());
        assert_eq!("0-0".parse::<MessageId>().unwrap(), MessageId::ZERO);
    }

    #[test]
    fn malformed_ids_are_refused() {
        for bad in [
            "",
            "1",
            "-1",
            "1-",
            "a-1",
            "1-b",
            "1-2-3",
            " 1-2",
            "1-+2",
            "1.5-2",
            "123456789012345678901-0",
            "99999999999999999999-0",
        ] {
            assert!(bad.parse::<MessageId>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn epochs_are_sixteen_hex_digits_and_differ() {
        let a = new_epoch();
        let b = new_epoch();
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
