//! The peer channel's messages, sealed: AES-256-GCM (ring) under a key derived from the pair's
//! shared secret, so only a host holding the secret can read or write one.
//!
//! Secret → HKDF-SHA256 ([`SALT`], [`INFO`]) → one AES-256-GCM key per process. A message is
//! `VERSION ‖ nonce (12 random bytes) ‖ ciphertext ‖ tag`, the version and its [`Direction`]
//! authenticated as associated data (a request cannot be passed off as an answer). Its
//! plaintext is JSON: when it was sent (Unix seconds), the request's id (an answer repeats
//! it) and the body. [`Key::open`] refuses anything the key did not seal (a wrong secret, one
//! altered byte), a message sent more than [`MAX_SKEW`] away from now (a recording played back
//! later), and an answer to another request. Requests read, nudge a pull, or present or
//! withdraw a tls-alpn-01 answer of a configured name: one played back within the skew gets an
//! answer its sender cannot open, and at worst re-presents or withdraws a validation answer of
//! the last minute, which makes no certificate for anyone (dropping the packets would do as
//! much).

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{HKDF_SHA256, Salt};
use ring::rand::{SecureRandom, SystemRandom};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The format version, first byte of every message.
pub const VERSION: u8 = 1;

/// HKDF salt: keys derived for the peer channel are lb's and this channel's only.
pub const SALT: &[u8] = b"scaleout lb acme peer";

/// HKDF info: what the derived key is for.
pub const INFO: &[u8] = b"aes-256-gcm v1";

/// Largest clock difference (seconds) between the two hosts that a message survives.
pub const MAX_SKEW: i64 = 60;

/// Which way a message goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the asking host.
    Request,
    /// Back from the answering host.
    Answer,
}

impl Direction {
    fn byte(self) -> u8 {
        match self {
            Direction::Request => b'Q',
            Direction::Answer => b'A',
        }
    }
}

/// Why a message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// Not sealed with this key: the other host has another secret, or the bytes were altered.
    #[error(
        "not sealed with the shared secret (the hosts' secret files differ, or it was altered)"
    )]
    Unauthentic,
    /// Sealed, but sent too long ago or ahead (a replay, or clocks apart).
    #[error(
        "sent {skew} s away from this host's clock (more than {MAX_SKEW} s: a replay, or unsynchronised clocks)"
    )]
    Stale {
        /// Sent time minus now, seconds.
        skew: i64,
    },
    /// Sealed, but an answer to another request.
    #[error("an answer to another request")]
    NotOurs,
    /// Sealed, but not a message this version understands.
    #[error("malformed: {0}")]
    Malformed(String),
}

/// What a sealed message holds.
#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    /// Unix seconds at sealing.
    sent: i64,
    /// The request's id (an answer repeats it).
    id: String,
    body: T,
}

/// The pair's channel key.
pub struct Key {
    key: LessSafeKey,
    random: SystemRandom,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// The key derived from the shared `secret`.
    pub fn derive(secret: &[u8]) -> Key {
        let okm = Salt::new(HKDF_SHA256, SALT).extract(secret);
        // 32 bytes from HKDF-SHA256 (at most 255 × 32): expand cannot fail.
        let unbound = okm
            .expand(&[INFO], &AES_256_GCM)
            .map(UnboundKey::from)
            .unwrap_or_else(|_| unreachable!("HKDF-SHA256 yields 32 bytes"));
        Key {
            key: LessSafeKey::new(unbound),
            random: SystemRandom::new(),
        }
    }

    /// A fresh request id (16 random bytes, hex).
    pub fn new_id(&self) -> String {
        let mut bytes = [0u8; 16];
        let _ = self.random.fill(&mut bytes);
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Seals `body` going `direction` with request id `id`, sent at `now`.
    pub fn seal<T: Serialize>(
        &self,
        direction: Direction,
        id: &str,
        body: &T,
        now: i64,
    ) -> Result<Vec<u8>, Refused> {
        let envelope = Envelope {
            sent: now,
            id: id.to_owned(),
            body,
        };
        let mut text =
            serde_json::to_vec(&envelope).map_err(|e| Refused::Malformed(e.to_string()))?;
        let mut nonce = [0u8; NONCE_LEN];
        self.random
            .fill(&mut nonce)
            .map_err(|_| Refused::Malformed("no random nonce".into()))?;
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from([VERSION, direction.byte()]),
                &mut text,
            )
            .map_err(|_| Refused::Malformed("message too long to seal".into()))?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + text.len());
        sealed.push(VERSION);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&text);
        Ok(sealed)
    }

    /// Opens a message going `direction` at `now`: its id and body (see the module docs).
    pub fn open<T: DeserializeOwned>(
        &self,
        direction: Direction,
        sealed: &[u8],
        now: i64,
    ) -> Result<(String, T), Refused> {
        let (&version, rest) = sealed.split_first().ok_or(Refused::Unauthentic)?;
        if version != VERSION || rest.len() < NONCE_LEN {
            return Err(Refused::Unauthentic);
        }
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| Refused::Unauthentic)?;
        let mut buffer = ciphertext.to_vec();
        let text = self
            .key
            .open_in_place(nonce, Aad::from([VERSION, direction.byte()]), &mut buffer)
            .map_err(|_| Refused::Unauthentic)?;
        let envelope: Envelope<T> =
            serde_json::from_slice(text).map_err(|e| Refused::Malformed(e.to_string()))?;
        let skew = envelope.sent.saturating_sub(now);
        if skew.abs() > MAX_SKEW {
            return Err(Refused::Stale { skew });
        }
        Ok((envelope.id, envelope.body))
    }

    /// Opens the answer to request `id` at `now`.
    pub fn open_answer<T: DeserializeOwned>(
        &self,
        sealed: &[u8],
        id: &str,
        now: i64,
    ) -> Result<T, Refused> {
        let (answered, body) = self.open(Direction::Answer, sealed, now)?;
        if answered != id {
            return Err(Refused::NotOurs);
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn key(secret: &str) -> Key {
        Key::derive(secret.as_bytes())
    }

    #[test]
    fn a_sealed_message_opens_with_the_same_secret_only() {
        let (a, b) = (
            key("one shared secret of 32 bytes!!"),
            key("one shared secret of 32 bytes!!"),
        );
        let sealed = a
            .seal(Direction::Request, "id1", &"get certificates", NOW)
            .unwrap();
        assert!(
            !sealed.windows(16).any(|w| w == b"get certificates"),
            "the body travels encrypted"
        );
        let (id, body): (String, String) = b.open(Direction::Request, &sealed, NOW).unwrap();
        assert_eq!((id.as_str(), body.as_str()), ("id1", "get certificates"));
        let wrong = key("another secret, also of 32 bytes");
        assert_eq!(
            wrong
                .open::<String>(Direction::Request, &sealed, NOW)
                .unwrap_err(),
            Refused::Unauthentic
        );
    }

    #[test]
    fn any_altered_byte_is_refused() {
        let k = key("one shared secret of 32 bytes!!");
        let sealed = k
            .seal(Direction::Answer, "id", &vec![1, 2, 3], NOW)
            .unwrap();
        for i in 0..sealed.len() {
            let mut tampered = sealed.clone();
            tampered[i] ^= 0x01;
            assert_eq!(
                k.open::<Vec<u8>>(Direction::Answer, &tampered, NOW)
                    .unwrap_err(),
                Refused::Unauthentic,
                "byte {i} flipped"
            );
        }
        let mut cut = sealed.clone();
        cut.pop();
        assert!(k.open::<Vec<u8>>(Direction::Answer, &cut, NOW).is_err());
        assert!(k.open::<Vec<u8>>(Direction::Answer, &[], NOW).is_err());
        assert!(
            k.open::<Vec<u8>>(Direction::Answer, &[VERSION], NOW)
                .is_err()
        );
    }

    #[test]
    fn a_request_is_not_an_answer_and_an_answer_belongs_to_its_request() {
        let k = key("one shared secret of 32 bytes!!");
        let request = k.seal(Direction::Request, "id", &0u8, NOW).unwrap();
        assert_eq!(
            k.open_answer::<u8>(&request, "id", NOW).unwrap_err(),
            Refused::Unauthentic
        );
        let answer = k.seal(Direction::Answer, "id", &7u8, NOW).unwrap();
        assert_eq!(k.open_answer::<u8>(&answer, "id", NOW).unwrap(), 7);
        assert_eq!(
            k.open_answer::<u8>(&answer, "other", NOW).unwrap_err(),
            Refused::NotOurs
        );
    }

    #[test]
    fn old_or_future_messages_are_refused() {
        let k = key("one shared secret of 32 bytes!!");
        let sealed = k.seal(Direction::Request, "id", &0u8, NOW).unwrap();
        assert!(
            k.open::<u8>(Direction::Request, &sealed, NOW + MAX_SKEW)
                .is_ok()
        );
        assert_eq!(
            k.open::<u8>(Direction::Request, &sealed, NOW + MAX_SKEW + 1)
                .unwrap_err(),
            Refused::Stale {
                skew: -MAX_SKEW - 1
            }
        );
        assert!(matches!(
            k.open::<u8>(Direction::Request, &sealed, NOW - MAX_SKEW - 5),
            Err(Refused::Stale { skew: 65 })
        ));
    }

    #[test]
    fn a_body_of_another_shape_is_malformed_not_a_panic() {
        let k = key("one shared secret of 32 bytes!!");
        let sealed = k.seal(Direction::Request, "id", &"text", NOW).unwrap();
        assert!(matches!(
            k.open::<Vec<u64>>(Direction::Request, &sealed, NOW),
            Err(Refused::Malformed(_))
        ));
        let ids: Vec<String> = (0..4).map(|_| k.new_id()).collect();
        assert!(ids.iter().all(|id| id.len() == 32));
        assert_ne!(ids[0], ids[1]);
    }
}
