//! TLS session tickets sealed with keys lb holds, so that a ticket outlives a reload and a
//! binary upgrade.
//!
//! How it works: [`Tickets`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use rustls::server::ProducesTickets;

use crate::config::MAX_TICKET_ROTATION;

/// Bytes of a key's name, which starts every ticket it seals.
const NAME_LEN: usize = 8;
/// Bytes of an AES-256-GCM key.
const SECRET_LEN: usize = 32;
/// Bytes of one exported key: name, creation time (ms since the epoch, big-endian), secret.
const EXPORTED_KEY_LEN: usize = NAME_LEN + 8 + SECRET_LEN;
/// Bytes of the authentication tag.
const TAG_LEN: usize = 16;

/// Why ticket keys could not be made or taken over.
#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    /// The system's random source failed (or ring refused a key).
    #[error("could not generate a TLS session ticket key (the system random source failed)")]
    Random,
    /// Keys handed over by the previous process are not in the expected form.
    #[error("the handed-over session ticket keys are malformed ({0} bytes)")]
    Malformed(usize),
}

/// One ticket key.
struct Key {
    name: [u8; NAME_LEN],
    /// When it was made, in ms since the UNIX epoch.
    created_ms: u64,
    secret: [u8; SECRET_LEN],
    aead: LessSafeKey,
}

impl Key {
    /// `None` only if ring refuses the key (it checks the length, which the type fixes).
    fn new(name: [u8; NAME_LEN], created_ms: u64, secret: [u8; SECRET_LEN]) -> Option<Key> {
        let aead = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &secret).ok()?);
        Some(Key {
            name,
            created_ms,
            secret,
            aead,
        })
    }

    fn random(rng: &SystemRandom, created_ms: u64) -> Result<Key, TicketError> {
        let mut name = [0u8; NAME_LEN];
        let mut secret = [0u8; SECRET_LEN];
        rng.fill(&mut name).map_err(|_| TicketError::Random)?;
        rng.fill(&mut secret).map_err(|_| TicketError::Random)?;
        Key::new(name, created_ms, secret).ok_or(TicketError::Random)
    }

    fn age_ms(&self, now_ms: u64) -> u64 {
        now_ms.saturating_sub(self.created_ms)
    }
}

/// The live keys: the current one seals, both open.
struct KeySet {
    current: Key,
    previous: Option<Key>,
}

/// The process's ticket keys and their rotation.
///
/// rustls asks [`Tickets`] (its `ProducesTickets`) to seal a session's resumption state into a
/// ticket and to open the tickets returning clients present. A ticket is `key name (8 bytes) ‖
/// nonce (12) ‖ AES-256-GCM ciphertext and tag`, the key name also authenticated as associated
/// data. Two keys are live: the current one seals, and the current or the previous one opens.
/// Keys rotate lazily, on the first use after `tls.ticket_rotation` has passed since the current
/// key was made: the current key becomes the previous one and a fresh random key the current
/// one. A ticket therefore opens for at least one rotation period and never after two (a key
/// more than two periods old opens nothing), and rustls is told the first as the ticket
/// lifetime. The keys live in one `Tickets` per process, shared by every TLS configuration
/// generation (a SIGHUP keeps them) and handed to the next process on a binary upgrade
/// ([`Tickets::export`] / [`Tickets::import`], over `ops::handover`'s Unix socket). They are never
/// logged (the `Debug` form leaves them out) nor written to disk.
///
/// The clock is the wall clock (keys carry their creation time to the next process); a clock
/// that steps back only makes keys look younger.
pub struct Tickets {
    keys: ArcSwap<KeySet>,
    rotation_ms: AtomicU64,
    rng: SystemRandom,
    /// Milliseconds since the UNIX epoch.
    clock: fn() -> u64,
}

impl fmt::Debug for Tickets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tickets")
            .field("rotation_ms", &self.rotation_ms.load(Relaxed))
            .finish_non_exhaustive()
    }
}

/// The wall clock in ms since the UNIX epoch.
fn wall_clock_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Tickets {
    /// Fresh random keys rotating every `rotation`.
    pub fn new(rotation: Duration) -> Result<Arc<Tickets>, TicketError> {
        Self::with_clock(rotation, wall_clock_ms)
    }

    fn with_clock(rotation: Duration, clock: fn() -> u64) -> Result<Arc<Tickets>, TicketError> {
        let rng = SystemRandom::new();
        let current = Key::random(&rng, clock())?;
        Ok(Self::from_keys(
            KeySet {
                current,
                previous: None,
            },
            rotation,
            rng,
            clock,
        ))
    }

    fn from_keys(
        keys: KeySet,
        rotation: Duration,
        rng: SystemRandom,
        clock: fn() -> u64,
    ) -> Arc<Tickets> {
        Arc::new(Tickets {
            keys: ArcSwap::from_pointee(keys),
            rotation_ms: AtomicU64::new(rotation_ms(rotation)),
            rng,
            clock,
        })
    }

    /// The keys a previous process handed over ([`Tickets::export`]), rotating every
    /// `rotation` from their own creation times.
    pub fn import(bytes: &[u8], rotation: Duration) -> Result<Arc<Tickets>, TicketError> {
        let malformed = || TicketError::Malformed(bytes.len());
        if bytes.len() != EXPORTED_KEY_LEN && bytes.len() != 2 * EXPORTED_KEY_LEN {
            return Err(malformed());
        }
        let mut keys = bytes.chunks_exact(EXPORTED_KEY_LEN).map(|k| {
            let (name, rest) = k.split_at(NAME_LEN);
            let (created, secret) = rest.split_at(8);
            Key::new(
                name.try_into().ok()?,
                u64::from_be_bytes(created.try_into().ok()?),
                secret.try_into().ok()?,
            )
        });
        let current = keys.next().flatten().ok_or_else(malformed)?;
        let previous = match keys.next() {
            None => None,
            Some(key) => Some(key.ok_or_else(malformed)?),
        };
        Ok(Self::from_keys(
            KeySet { current, previous },
            rotation,
            SystemRandom::new(),
            wall_clock_ms,
        ))
    }

    /// The live keys, current first, for the next process. Secret: it goes over the handover
    /// socket only.
    pub fn export(&self) -> Vec<u8> {
        let set = self.keys.load();
        let mut out = Vec::with_capacity(2 * EXPORTED_KEY_LEN);
        for key in std::iter::once(&set.current).chain(set.previous.as_ref()) {
            out.extend_from_slice(&key.name);
            out.extend_from_slice(&key.created_ms.to_be_bytes());
            out.extend_from_slice(&key.secret);
        }
        out
    }

    /// Changes the rotation period (a reload); the keys stay.
    pub fn set_rotation(&self, rotation: Duration) {
        self.rotation_ms.store(rotation_ms(rotation), Relaxed);
    }

    /// The live keys at `now_ms`, rotated first if the current key is a period old.
    fn keys_at(&self, now_ms: u64) -> Arc<KeySet> {
        let rotation = self.rotation_ms.load(Relaxed);
        let set = self.keys.load_full();
        if set.current.age_ms(now_ms) < rotation {
            return set;
        }
        let Ok(fresh) = Key::random(&self.rng, now_ms) else {
            return set;
        };
        // The current key becomes the previous one, unless it is already two periods old.
        let c = &set.current;
        let previous = if c.age_ms(now_ms) < 2 * rotation {
            Key::new(c.name, c.created_ms, c.secret)
        } else {
            None
        };
        let next = Arc::new(KeySet {
            current: fresh,
            previous,
        });
        let seen = self.keys.compare_and_swap(&set, Arc::clone(&next));
        if Arc::ptr_eq(&seen, &set) {
            next
        } else {
            // Another handshake rotated first: use its keys.
            self.keys.load_full()
        }
    }

    fn seal_at(&self, plain: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        let set = self.keys_at(now_ms);
        let key = &set.current;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut ticket = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
        ticket.extend_from_slice(&key.name);
        ticket.extend_from_slice(&nonce);
        ticket.extend_from_slice(plain);
        let tag = key
            .aead
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(key.name),
                &mut ticket[NAME_LEN + NONCE_LEN..],
            )
            .ok()?;
        ticket.extend_from_slice(tag.as_ref());
        Some(ticket)
    }

    fn open_at(&self, ticket: &[u8], now_ms: u64) -> Option<Vec<u8>> {
        if ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let set = self.keys_at(now_ms);
        let rotation = self.rotation_ms.load(Relaxed);
        let key = std::iter::once(&set.current)
            .chain(set.previous.as_ref())
            .find(|k| k.name == name && k.age_ms(now_ms) < 2 * rotation)?;
        let mut in_out = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce).ok()?,
                Aad::from(key.name),
                &mut in_out,
            )
            .ok()?;
        let len = plain.len();
        in_out.truncate(len);
        Some(in_out)
    }
}

/// A rotation period in milliseconds, at most [`MAX_TICKET_ROTATION`] (so twice it, a ticket's
/// longest life, is far from overflowing, and the lifetime in seconds fits rustls' `u32`).
fn rotation_ms(rotation: Duration) -> u64 {
    rotation.min(MAX_TICKET_ROTATION).as_millis() as u64
}

impl ProducesTickets for Tickets {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        (self.rotation_ms.load(Relaxed) / 1000).max(1) as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(plain, (self.clock)())
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(cipher, (self.clock)())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);
    const HOUR_MS: u64 = 3_600_000;
    const T0: u64 = 1_000_000_000_000;

    fn at_t0() -> u64 {
        T0
    }

    #[test]
    fn a_ticket_opens_for_two_periods_of_its_key_and_not_after() {
        let tickets = Tickets::with_clock(HOUR, at_t0).unwrap();
        let ticket = tickets.seal_at(b"session state", T0).unwrap();
        assert_ne!(&ticket[NAME_LEN + NONCE_LEN..], b"session state");
        assert_eq!(tickets.open_at(&ticket, T0).unwrap(), b"session state");
        // One rotation later its key is the previous one: still opens, new tickets differ.
        let later = tickets.seal_at(b"x", T0 + HOUR_MS + 1).unwrap();
        assert_ne!(later[..NAME_LEN], ticket[..NAME_LEN]);
        assert_eq!(
            tickets.open_at(&ticket, T0 + 2 * HOUR_MS - 1).unwrap(),
            b"session state"
        );
        // Two periods after its key was made: refused, though the key is still "previous".
        assert_eq!(tickets.open_at(&ticket, T0 + 2 * HOUR_MS), None);
        assert_eq!(tickets.open_at(&later, T0 + 2 * HOUR_MS).unwrap(), b"x");
    }

    #[test]
    fn an_idle_gap_of_two_periods_drops_both_keys() {
        let tickets = Tickets::with_clock(HOUR, at_t0).unwrap();
        let ticket = tickets.seal_at(b"s", T0).unwrap();
        let fresh = tickets.seal_at(b"t", T0 + 3 * HOUR_MS).unwrap();
        assert!(tickets.keys.load().previous.is_none());
        assert_eq!(tickets.open_at(&ticket, T0 + 3 * HOUR_MS), None);
        assert_eq!(tickets.open_at(&fresh, T0 + 3 * HOUR_MS).unwrap(), b"t");
    }

    #[test]
    fn exported_keys_open_the_tickets_of_the_exporter() {
        let old = Tickets::with_clock(HOUR, at_t0).unwrap();
        let before = old.seal_at(b"before", T0).unwrap();
        let after = old.seal_at(b"after", T0 + HOUR_MS).unwrap();
        let bytes = old.export();
        assert_eq!(bytes.len(), 2 * EXPORTED_KEY_LEN);
        let new = Tickets::import(&bytes, HOUR).unwrap();
        assert_eq!(new.open_at(&before, T0 + HOUR_MS).unwrap(), b"before");
        assert_eq!(new.open_at(&after, T0 + HOUR_MS).unwrap(), b"after");
        assert!(matches!(
            Tickets::import(&bytes[1..], HOUR),
            Err(TicketError::Malformed(_))
        ));
        assert!(Tickets::import(&[], HOUR).is_err());
    }

    #[test]
    fn tampered_or_short_tickets_and_strangers_keys_are_refused() {
        let tickets = Tickets::with_clock(HOUR, at_t0).unwrap();
        let stranger = Tickets::with_clock(HOUR, at_t0).unwrap();
        let mut ticket = tickets.seal_at(b"state", T0).unwrap();
        assert_eq!(stranger.open_at(&ticket, T0), None);
        for cut in 0..ticket.len() {
            assert_eq!(tickets.open_at(&ticket[..cut], T0), None, "{cut}");
        }
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(tickets.open_at(&ticket, T0), None);
    }

    #[test]
    fn lifetime_is_one_period_capped_at_seven_days_and_keys_stay_out_of_debug() {
        let tickets = Tickets::with_clock(HOUR, at_t0).unwrap();
        assert_eq!(tickets.lifetime(), 3600);
        tickets.set_rotation(Duration::from_secs(30 * 24 * 3600));
        assert_eq!(tickets.lifetime(), 7 * 24 * 3600);
        tickets.set_rotation(Duration::from_millis(200));
        assert_eq!(tickets.lifetime(), 1);
        let debug = format!("{tickets:?}");
        let secret = &tickets.export()[NAME_LEN + 8..EXPORTED_KEY_LEN];
        assert!(!debug.contains(&format!("{secret:?}")), "{debug}");
        assert!(!debug.contains("secret"), "{debug}");
    }
}
