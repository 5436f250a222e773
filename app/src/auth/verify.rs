//! Token verification: a JWT and the key ring in, an [`Identity`] or a [`Refusal`] out.
//!
//! The order of checks keeps hostile tokens cheap: the length first, then the header (its
//! algorithm must be allowed by the config and be the one its key is bound to, so no `none`
//! and no HMAC keyed with a public key's bytes), then the signature, then the claims (`exp`
//! required, `nbf`, `iat`, `iss`, `aud` within the leeway; `sub` 1–128 characters).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::MAX_TOKEN_BYTES;
use super::grants::{GrantError, Grants};
use super::keys::KeyRing;

/// The longest `sub` and `name`, in characters.
pub(crate) const MAX_ID_CHARS: usize = 128;

/// What the config asks of every token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rules {
    /// The algorithms a token's header may name.
    pub algorithms: Vec<Algorithm>,
    /// The `iss` a token must carry, if any.
    pub issuer: Option<String>,
    /// The `aud` a token must carry, if any.
    pub audience: Option<String>,
    /// How far `exp`, `nbf` and `iat` may be off, for clocks that differ.
    pub leeway: Duration,
}

/// Who a verified token says its holder is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user id (`sub`).
    pub user: String,
    /// The display name (`name`, else `sub`).
    pub name: String,
    /// The rooms beyond the public ones it may join (`rooms`).
    pub grants: Grants,
    /// Its own connection limit (`max_conns`), overriding the configured one.
    pub max_conns: Option<u32>,
    /// When it expires (`exp`, Unix seconds).
    pub expires_at: u64,
    /// When it was issued (`iat`, Unix seconds), if it says.
    pub issued_at: Option<u64>,
}

/// Why a token was refused; the text is safe to send to its holder (it never quotes the
/// token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Longer than [`MAX_TOKEN_BYTES`].
    #[error("token longer than {MAX_TOKEN_BYTES} bytes")]
    TooLong,
    /// Not three base64url parts of JSON.
    #[error("token malformed")]
    Malformed,
    /// Its header names an algorithm the config does not allow or its key is not bound to.
    #[error("token algorithm not allowed")]
    Algorithm,
    /// No key has its `kid` (or it has none and every key has one).
    #[error("token key unknown")]
    UnknownKey,
    /// The signature does not verify.
    #[error("token signature invalid")]
    Signature,
    /// Past its `exp`.
    #[error("token expired")]
    Expired,
    /// Before its `nbf`.
    #[error("token not yet valid")]
    NotYetValid,
    /// Its `iat` is in the future.
    #[error("token issued in the future")]
    IssuedInFuture,
    /// Its `iss` is not the configured one.
    #[error("token issuer not accepted")]
    Issuer,
    /// Its `aud` is not the configured one.
    #[error("token audience not accepted")]
    Audience,
    /// A claim is missing or unusable.
    #[error("token claim {0}")]
    Claim(String),
}

/// The claims scaleout reads; others are ignored.
#[derive(Deserialize)]
struct Claims {
    // Optional here so that a missing one is reported as missing by the validation, which
    // requires both, rather than as malformed JSON.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
    #[serde(default)]
    max_conns: Option<u32>,
}

/// Verifies tokens against the current key ring, which a reload swaps without a lock.
pub struct Verifier {
    ring: ArcSwap<KeyRing>,
    rules: Rules,
}

impl Verifier {
    /// A verifier over `ring` with `rules`.
    pub fn new(ring: KeyRing, rules: Rules) -> Verifier {
        Verifier {
            ring: ArcSwap::from_pointee(ring),
            rules,
        }
    }

    /// Swaps in a reloaded key ring; tokens verified from now on use it.
    pub fn reload(&self, ring: KeyRing) {
        self.ring.store(Arc::new(ring));
    }

    /// Checks `token` at `now` (Unix seconds) and says who it identifies.
    pub fn verify(&self, token: &str, now: u64) -> Result<Identity, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Refusal::TooLong);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| Refusal::Malformed)?;
        if !self.rules.algorithms.contains(&header.alg) {
            return Err(Refusal::Algorithm);
        }
        let ring = self.ring.load();
        let key = ring
            .find(header.kid.as_deref())
            .ok_or(Refusal::UnknownKey)?;
        if key.algorithm != header.alg {
            return Err(Refusal::Algorithm);
        }
        let claims = jsonwebtoken::decode::<Claims>(token, &key.decoding, &self.validation(key))
            .map_err(|e| refusal(e.kind()))?
            .claims;
        let leeway = self.rules.leeway.as_secs();
        if claims
            .iat
            .is_some_and(|iat| iat > now.saturating_add(leeway))
        {
            return Err(Refusal::IssuedInFuture);
        }
        identity(claims)
    }

    fn validation(&self, key: &super::keys::Key) -> Validation {
        let mut validation = Validation::new(key.algorithm);
        validation.leeway = self.rules.leeway.as_secs();
        validation.validate_nbf = true;
        validation.required_spec_claims = ["exp", "sub"]
            .into_iter()
            .chain(self.rules.issuer.as_ref().map(|_| "iss"))
            .chain(self.rules.audience.as_ref().map(|_| "aud"))
            .map(String::from)
            .collect();
        validation.validate_aud = self.rules.audience.is_some();
        validation.aud = self
            .rules
            .audience
            .as_ref()
            .map(|aud| HashSet::from([aud.clone()]));
        validation.iss = self
            .rules
            .issuer
            .as_ref()
            .map(|iss| HashSet::from([iss.clone()]));
        validation
    }
}

fn refusal(kind: &ErrorKind) -> Refusal {
    match kind {
        ErrorKind::InvalidSignature
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey
        | ErrorKind::InvalidRsaKey(_)
        | ErrorKind::InvalidKeyFormat => Refusal::Signature,
        ErrorKind::ExpiredSignature => Refusal::Expired,
        ErrorKind::ImmatureSignature => Refusal::NotYetValid,
        ErrorKind::InvalidIssuer => Refusal::Issuer,
        ErrorKind::InvalidAudience => Refusal::Audience,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Refusal::Algorithm,
        ErrorKind::MissingRequiredClaim(claim) => Refusal::Claim(format!("{claim} missing")),
        ErrorKind::InvalidClaimFormat(claim) => Refusal::Claim(format!("{claim} malformed")),
        _ => Refusal::Malformed,
    }
}

fn identity(claims: Claims) -> Result<Identity, Refusal> {
    let chars = |s: &str| s.chars().count();
    let (Some(sub), Some(exp)) = (claims.sub, claims.exp) else {
        return Err(Refusal::Claim("sub or exp missing".into()));
    };
    if sub.is_empty() || chars(&sub) > MAX_ID_CHARS {
        return Err(Refusal::Claim(format!(
            "sub must have 1 to {MAX_ID_CHARS} characters"
        )));
    }
    let name = match claims.name {
        Some(name) if name.is_empty() || chars(&name) > MAX_ID_CHARS => {
            return Err(Refusal::Claim(format!(
                "name must have 1 to {MAX_ID_CHARS} characters"
            )));
        }
        Some(name) => name,
        None => sub.clone(),
    };
    let grants = Grants::from_claim(claims.rooms.as_deref()).map_err(|e| match e {
        GrantError::TooMany { .. } => Refusal::Claim(format!("rooms: {e}")),
        GrantError::Entry { .. } => Refusal::Claim(
            "rooms has an entry that is not a room name or a prefix ending in *".into(),
        ),
    })?;
    Ok(Identity {
        user: sub,
        name,
        grants,
        max_conns: claims.max_conns,
        expires_at: exp,
        issued_at: claims.iat,
    })
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use jsonwebtoken::{EncodingKey, Header};
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519};
    use serde_json::{Value, json};

    use super::*;
    use crate::auth::keys::tests::write;
    use crate::auth::{KeyFiles, KeySource, KeySpec};

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        verifier: Verifier,
        es256: EncodingKey,
        es256_public: Vec<u8>,
        ed25519: EncodingKey,
    }

    fn fixture(rules: impl FnOnce(&mut Rules)) -> Fixture {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = write(dir.path(), "secret", SECRET, 0o600);
        let es = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap_or_else(|e| panic!("{e}"));
        let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap_or_else(|e| panic!("{e}"));
        let es_pub = write(dir.path(), "es.pem", es.public_key_pem().as_bytes(), 0o644);
        let ed_pub = write(dir.path(), "ed.pem", ed.public_key_pem().as_bytes(), 0o644);
        let spec = |kid: Option<&str>, algorithm, source| KeySpec {
            kid: kid.map(str::to_owned),
            algorithm,
            source,
        };
        let ring = KeyRing::load(&KeyFiles {
            keys: vec![
                spec(None, Algorithm::HS256, KeySource::Secret(secret)),
                spec(Some("es"), Algorithm::ES256, KeySource::PublicPem(es_pub)),
                spec(Some("ed"), Algorithm::EdDSA, KeySource::PublicPem(ed_pub)),
            ],
            jwks_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let mut r = Rules {
            algorithms: vec![Algorithm::HS256, Algorithm::ES256, Algorithm::EdDSA],
            issuer: None,
            audience: None,
            leeway: Duration::from_secs(30),
        };
        rules(&mut r);
        let pem = |k: &KeyPair| k.serialize_pem().into_bytes();
        Fixture {
            verifier: Verifier::new(ring, r),
            es256: EncodingKey::from_ec_pem(&pem(&es)).unwrap_or_else(|e| panic!("{e}")),
            es256_public: es.public_key_pem().into_bytes(),
            ed25519: EncodingKey::from_ed_pem(&pem(&ed)).unwrap_or_else(|e| panic!("{e}")),
            _dir: dir,
        }
    }

    fn claims(extra: Value) -> Value {
        let mut base = json!({"sub": "alice", "exp": now() + 600, "iat": now()});
        if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in extra {
                if v.is_null() {
                    base.remove(k);
                } else {
                    base.insert(k.clone(), v.clone());
                }
            }
        }
        base
    }

    fn sign(alg: Algorithm, kid: Option<&str>, claims: &Value, key: &EncodingKey) -> String {
        let mut header = Header::new(alg);
        header.kid = kid.map(str::to_owned);
        jsonwebtoken::encode(&header, claims, key).unwrap_or_else(|e| panic!("{e}"))
    }

    fn hs256(claims: &Value) -> String {
        let key = EncodingKey::from_secret(SECRET).unwrap_or_else(|e| panic!("{e}"));
        sign(Algorithm::HS256, None, claims, &key)
    }

    /// A token assembled by hand: a header and claims of our choosing, any signature bytes.
    fn forged(header: &Value, claims: &Value, signature: &[u8]) -> String {
        let part = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
        format!(
            "{}.{}.{}",
            part(header),
            part(claims),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    fn verified(f: &Fixture, token: &str) -> Identity {
        f.verifier
            .verify(token, now())
            .unwrap_or_else(|e| panic!("refused: {e}"))
    }

    #[test]
    fn every_key_kind_verifies_its_own_tokens() {
        let f = fixture(|_| {});
        let c = claims(json!({"name": "Alice", "rooms": ["team-*"], "max_conns": 3}));
        let id = verified(&f, &hs256(&c));
        assert_eq!(id.user, "alice");
        assert_eq!(id.name, "Alice");
        assert!(id.grants.allows("team-x") && !id.grants.allows("lobby"));
        assert_eq!(id.max_conns, Some(3));
        verified(&f, &sign(Algorithm::ES256, Some("es"), &c, &f.es256));
        verified(&f, &sign(Algorithm::EdDSA, Some("ed"), &c, &f.ed25519));
        let plain = verified(&f, &hs256(&claims(json!({}))));
        assert_eq!(plain.name, "alice", "name falls back to sub");
        assert_eq!(plain.grants, Grants::default());
    }

    #[test]
    fn the_none_algorithm_is_refused() {
        let f = fixture(|_| {});
        let token = forged(
            &json!({"alg": "none", "typ": "JWT"}),
            &claims(json!({})),
            b"",
        );
        assert_eq!(f.verifier.verify(&token, now()), Err(Refusal::Malformed));
        let token = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#),
            URL_SAFE_NO_PAD.encode(claims(json!({})).to_string())
        );
        assert!(f.verifier.verify(&token, now()).is_err());
    }

    #[test]
    fn hmac_keyed_with_a_public_key_is_refused() {
        // The classic confusion: sign HS256 with the ES256 public key's PEM bytes and name
        // that key's kid.
        let f = fixture(|_| {});
        let key = EncodingKey::from_secret(&f.es256_public).unwrap_or_else(|e| panic!("{e}"));
        let token = sign(Algorithm::HS256, Some("es"), &claims(json!({})), &key);
        assert_eq!(f.verifier.verify(&token, now()), Err(Refusal::Algorithm));
    }

    #[test]
    fn an_algorithm_outside_the_allow_list_is_refused_even_with_a_good_key() {
        let f = fixture(|r| r.algorithms = vec![Algorithm::ES256]);
        assert_eq!(
            f.verifier.verify(&hs256(&claims(json!({}))), now()),
            Err(Refusal::Algorithm)
        );
    }

    #[test]
    fn unknown_or_injected_kids_are_refused() {
        let f = fixture(|_| {});
        let key = EncodingKey::from_secret(SECRET).unwrap_or_else(|e| panic!("{e}"));
        for kid in ["nope", "../../etc/passwd", "es\u{0}"] {
            let token = sign(Algorithm::HS256, Some(kid), &claims(json!({})), &key);
            assert_eq!(
                f.verifier.verify(&token, now()),
                Err(Refusal::UnknownKey),
                "{kid:?}"
            );
        }
    }

    #[test]
    fn a_bad_signature_is_refused() {
        let f = fixture(|_| {});
        let other = EncodingKey::from_secret(b"another secret, also thirty-two bytes")
            .unwrap_or_else(|e| panic!("{e}"));
        let token = sign(Algorithm::HS256, None, &claims(json!({})), &other);
        assert_eq!(f.verifier.verify(&token, now()), Err(Refusal::Signature));
        let good = hs256(&claims(json!({})));
        let tampered = good.replacen(".", ".x", 1);
        assert!(f.verifier.verify(&tampered, now()).is_err());
    }

    #[test]
    fn time_claims_are_checked_within_the_leeway() {
        let f = fixture(|_| {});
        let t = now();
        let refused = |c: Value| f.verifier.verify(&hs256(&c), t);
        assert_eq!(
            refused(claims(json!({"exp": t - 31}))),
            Err(Refusal::Expired)
        );
        assert!(
            refused(claims(json!({"exp": t - 10}))).is_ok(),
            "within leeway"
        );
        assert_eq!(
            refused(claims(json!({"nbf": t + 60}))),
            Err(Refusal::NotYetValid)
        );
        assert_eq!(
            refused(claims(json!({"iat": t + 60}))),
            Err(Refusal::IssuedInFuture)
        );
        assert_eq!(
            refused(claims(json!({"exp": null}))),
            Err(Refusal::Claim("exp missing".into()))
        );
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let f = fixture(|r| {
            r.issuer = Some("https://login.example".into());
            r.audience = Some("chat".into());
        });
        let good = claims(json!({"iss": "https://login.example", "aud": "chat"}));
        verified(&f, &hs256(&good));
        let wrong_iss = claims(json!({"iss": "https://evil.example", "aud": "chat"}));
        assert_eq!(
            f.verifier.verify(&hs256(&wrong_iss), now()),
            Err(Refusal::Issuer)
        );
        let wrong_aud = claims(json!({"iss": "https://login.example", "aud": "mail"}));
        assert_eq!(
            f.verifier.verify(&hs256(&wrong_aud), now()),
            Err(Refusal::Audience)
        );
        let none = claims(json!({}));
        assert!(f.verifier.verify(&hs256(&none), now()).is_err());
    }

    #[test]
    fn garbage_truncated_and_oversized_tokens_are_refused() {
        let f = fixture(|_| {});
        let good = hs256(&claims(json!({})));
        for bad in [
            "",
            "garbage",
            "a.b.c",
            "....",
            &good[..good.len() / 2],
            &good[..good.rfind('.').unwrap_or(0)],
        ] {
            assert!(f.verifier.verify(bad, now()).is_err(), "{bad:?} accepted");
        }
        let huge = format!("{good}{}", "A".repeat(64 * 1024));
        assert_eq!(f.verifier.verify(&huge, now()), Err(Refusal::TooLong));
    }

    #[test]
    fn sub_and_name_are_bounded_and_sub_required() {
        let f = fixture(|_| {});
        let refused = |c: Value| f.verifier.verify(&hs256(&c), now());
        assert_eq!(
            refused(claims(json!({"sub": null}))),
            Err(Refusal::Claim("sub missing".into()))
        );
        assert!(matches!(
            refused(claims(json!({"sub": ""}))),
            Err(Refusal::Claim(_))
        ));
        assert!(matches!(
            refused(claims(json!({"sub": "x".repeat(129)}))),
            Err(Refusal::Claim(_))
        ));
        assert!(refused(claims(json!({"sub": "x".repeat(128)}))).is_ok());
        assert!(matches!(
            refused(claims(json!({"name": ""}))),
            Err(Refusal::Claim(_))
        ));
        assert!(matches!(
            refused(claims(json!({"rooms": ["a*b"]}))),
            Err(Refusal::Claim(_))
        ));
    }

    #[test]
    fn a_reloaded_ring_verifies_new_keys_and_forgets_removed_ones() {
        let f = fixture(|_| {});
        let old = hs256(&claims(json!({})));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let new_secret = b"a brand new secret of thirty-two+ bytes";
        let path = write(dir.path(), "new", new_secret, 0o600);
        let ring = KeyRing::load(&KeyFiles {
            keys: vec![KeySpec {
                kid: Some("2027".into()),
                algorithm: Algorithm::HS256,
                source: KeySource::Secret(path),
            }],
            jwks_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        f.verifier.reload(ring);
        assert_eq!(f.verifier.verify(&old, now()), Err(Refusal::UnknownKey));
        let key = EncodingKey::from_secret(new_secret).unwrap_or_else(|e| panic!("{e}"));
        verified(
            &f,
            &sign(Algorithm::HS256, Some("2027"), &claims(json!({})), &key),
        );
    }
}
