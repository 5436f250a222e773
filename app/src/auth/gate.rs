//! The gate a token connection passes: its first frame carries the token, the token must
//! verify and grant the room asked for, and a later token frame may only refresh the same
//! user. What the connection is told when refused, and when it must refresh, is decided here;
//! the WebSocket task only carries it out.

use std::time::Duration;

use serde::Deserialize;

use super::verify::{Identity, Refusal, Verifier};

/// Close code: no token, a token that does not verify, or one that expired (RFC 6455 leaves
/// 4000–4999 to applications; 4401 mirrors HTTP 401).
pub const CLOSE_UNAUTHORIZED: u16 = 4401;
/// Close code: a valid token that does not grant this (the room, or another user's refresh).
pub const CLOSE_FORBIDDEN: u16 = 4403;

/// Why the gate turned a connection away, with the close code and reason it is told.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No token frame within the deadline.
    #[error("token required within {0:?}")]
    NoToken(Duration),
    /// The first frame is not `{"token": "..."}`.
    #[error("first frame must be {{\"token\": \"...\"}}")]
    NotATokenFrame,
    /// The token does not verify.
    #[error(transparent)]
    Token(#[from] Refusal),
    /// The token does not grant the room.
    #[error("room not granted")]
    Room,
    /// A refresh carried another user's token.
    #[error("refresh for another user")]
    OtherUser,
}

impl Denied {
    /// The close code the connection is closed with.
    pub fn close_code(&self) -> u16 {
        match self {
            Denied::Room | Denied::OtherUser => CLOSE_FORBIDDEN,
            Denied::NoToken(_) | Denied::NotATokenFrame | Denied::Token(_) => CLOSE_UNAUTHORIZED,
        }
    }
}

/// A client frame that carries a token (the first one, or a refresh).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenFrame {
    token: String,
}

/// The token a frame carries, if it is a token frame (`{"token": "..."}` and nothing else).
pub fn token_of(frame: &str) -> Option<String> {
    serde_json::from_str::<TokenFrame>(frame)
        .ok()
        .map(|f| f.token)
}

/// When a connection must hear about its token's end, and when it ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// From now until the refresh notice (`{"refresh": true, "in": N}`) is sent.
    pub notice_in: Duration,
    /// From now until the connection is closed unless a new token arrived.
    pub close_in: Duration,
}

impl Deadlines {
    /// The deadlines of a token expiring at `expires_at` (Unix seconds) seen at `now`, with
    /// the notice `refresh_before` ahead of the end (at once if that is already past).
    pub fn of(expires_at: u64, now: u64, refresh_before: Duration) -> Deadlines {
        let close_in = Duration::from_secs(expires_at.saturating_sub(now));
        Deadlines {
            notice_in: close_in.saturating_sub(refresh_before),
            close_in,
        }
    }
}

/// The decisions of token mode, shared by every connection of the instance.
pub struct Gate {
    verifier: Verifier,
    public_rooms: Vec<String>,
}

impl Gate {
    /// A gate that verifies with `verifier` and lets any valid token into `public_rooms`.
    pub fn new(verifier: Verifier, public_rooms: Vec<String>) -> Gate {
        Gate {
            verifier,
            public_rooms,
        }
    }

    /// The verifier, whose key ring a reload swaps.
    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    /// Admits the holder of the token in `frame` to `room` (`None`: the main room), or says
    /// why not.
    pub fn admit(&self, frame: &str, room: Option<&str>, now: u64) -> Result<Identity, Denied> {
        let token = token_of(frame).ok_or(Denied::NotATokenFrame)?;
        let identity = self.verifier.verify(&token, now)?;
        if !self.may_join(&identity, room) {
            return Err(Denied::Room);
        }
        Ok(identity)
    }

    /// Whether `identity` may join `room`: the main room (`None`), a public room, or one its
    /// grants name.
    pub fn may_join(&self, identity: &Identity, room: Option<&str>) -> bool {
        room.is_none_or(|room| {
            self.public_rooms.iter().any(|public| public == room) || identity.grants.allows(room)
        })
    }

    /// A refresh of `current` in `room` with the token `token`: the same user, still allowed
    /// in the room.
    pub fn refresh(
        &self,
        current: &Identity,
        token: &str,
        room: Option<&str>,
        now: u64,
    ) -> Result<Identity, Denied> {
        let identity = self.verifier.verify(token, now)?;
        if identity.user != current.user {
            return Err(Denied::OtherUser);
        }
        if !self.may_join(&identity, room) {
            return Err(Denied::Room);
        }
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::Algorithm;

    use super::*;
    use crate::auth::keys::tests::write;
    use crate::auth::{KeyFiles, KeyRing, KeySource, KeySpec, Rules, SigningKey, TokenRequest};

    struct Fixture {
        _dir: tempfile::TempDir,
        gate: Gate,
        key: SigningKey,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = write(dir.path(), "secret", &[b's'; 40], 0o600);
        let ring = KeyRing::load(&KeyFiles {
            keys: vec![KeySpec {
                kid: None,
                algorithm: Algorithm::HS256,
                source: KeySource::Secret(secret.clone()),
            }],
            jwks_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let rules = Rules {
            algorithms: vec![Algorithm::HS256],
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        };
        let key =
            SigningKey::secret(&secret, Algorithm::HS256, None).unwrap_or_else(|e| panic!("{e}"));
        Fixture {
            gate: Gate::new(Verifier::new(ring, rules), vec!["lobby".into()]),
            key,
            _dir: dir,
        }
    }

    fn token(f: &Fixture, sub: &str, rooms: &[&str]) -> String {
        let request = TokenRequest {
            sub: sub.into(),
            name: None,
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            ttl: Duration::from_secs(600),
            max_conns: None,
        };
        let now = jsonwebtoken::get_current_timestamp();
        f.key
            .mint(&request, now)
            .unwrap_or_else(|e| panic!("{e}"))
            .token
    }

    fn frame(token: &str) -> String {
        serde_json::json!({ "token": token }).to_string()
    }

    #[test]
    fn public_rooms_take_any_valid_token_and_others_need_a_grant() {
        let f = fixture();
        let now = jsonwebtoken::get_current_timestamp();
        let plain = frame(&token(&f, "alice", &[]));
        assert!(f.gate.admit(&plain, None, now).is_ok(), "the main room");
        assert!(f.gate.admit(&plain, Some("lobby"), now).is_ok());
        assert_eq!(f.gate.admit(&plain, Some("staff"), now), Err(Denied::Room));
        let staff = frame(&token(&f, "bob", &["staff"]));
        assert!(f.gate.admit(&staff, Some("staff"), now).is_ok());
    }

    #[test]
    fn only_a_lone_token_field_is_a_token_frame() {
        let f = fixture();
        let now = jsonwebtoken::get_current_timestamp();
        let t = token(&f, "alice", &[]);
        for bad in [
            String::new(),
            t.clone(),
            serde_json::json!({"name": "a", "content": "b"}).to_string(),
            serde_json::json!({"token": t, "name": "x"}).to_string(),
            serde_json::json!({"token": 5}).to_string(),
        ] {
            assert_eq!(
                f.gate.admit(&bad, None, now),
                Err(Denied::NotATokenFrame),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_refresh_keeps_the_user_and_the_room() {
        let f = fixture();
        let now = jsonwebtoken::get_current_timestamp();
        let alice = f
            .gate
            .admit(&frame(&token(&f, "alice", &["staff"])), Some("staff"), now)
            .unwrap_or_else(|e| panic!("{e}"));
        let again = token(&f, "alice", &["staff"]);
        assert!(f.gate.refresh(&alice, &again, Some("staff"), now).is_ok());
        let mallory = token(&f, "mallory", &["staff"]);
        assert_eq!(
            f.gate.refresh(&alice, &mallory, Some("staff"), now),
            Err(Denied::OtherUser)
        );
        let demoted = token(&f, "alice", &[]);
        assert_eq!(
            f.gate.refresh(&alice, &demoted, Some("staff"), now),
            Err(Denied::Room)
        );
        assert_eq!(Denied::OtherUser.close_code(), CLOSE_FORBIDDEN);
        assert_eq!(
            Denied::Token(Refusal::Expired).close_code(),
            CLOSE_UNAUTHORIZED
        );
    }

    #[test]
    fn deadlines_put_the_notice_ahead_of_the_end() {
        let d = Deadlines::of(1_000, 900, Duration::from_secs(30));
        assert_eq!(d.close_in, Duration::from_secs(100));
        assert_eq!(d.notice_in, Duration::from_secs(70));
        let late = Deadlines::of(1_000, 990, Duration::from_secs(30));
        assert_eq!(late.notice_in, Duration::ZERO, "notice at once");
        let past = Deadlines::of(1_000, 1_010, Duration::from_secs(30));
        assert_eq!(past.close_in, Duration::ZERO);
    }
}
