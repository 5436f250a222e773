//! Minting tokens, for operators (`app token`, like `centrifugo gentoken`) and tests: the
//! same claims the verifier reads, signed with an HMAC secret file or a private key in PEM.

use std::path::Path;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::grants::Grants;
use super::keys::{KeyError, is_hmac, read, read_secret};
use super::verify::MAX_ID_CHARS;

/// A key to sign with, bound to one algorithm and optionally named by a `kid`.
pub struct SigningKey {
    algorithm: Algorithm,
    kid: Option<String>,
    key: EncodingKey,
}

/// What a token should say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRequest {
    /// The user id (`sub`).
    pub sub: String,
    /// The display name (`name`), if other than `sub`.
    pub name: Option<String>,
    /// Rooms granted beyond the public ones (`rooms`; names or prefixes ending in `*`).
    pub rooms: Vec<String>,
    /// How long it is valid from now.
    pub ttl: Duration,
    /// Its own connection limit (`max_conns`).
    pub max_conns: Option<u32>,
}

/// A signed token and when it expires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Minted {
    /// The JWT.
    pub token: String,
    /// Its `exp` (Unix seconds).
    pub expires_at: u64,
}

/// Why no token could be minted.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    /// The key file is unusable.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// The request asks for claims the verifier would refuse.
    #[error("{0}")]
    Claims(String),
    /// Signing failed.
    #[error("could not sign the token: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iat: u64,
    exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    rooms: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    max_conns: Option<u32>,
}

impl SigningKey {
    /// An HMAC key from a secret file (owner-only, at least 32 bytes, as the verifier wants).
    pub fn secret(
        path: &Path,
        algorithm: Algorithm,
        kid: Option<String>,
    ) -> Result<SigningKey, KeyError> {
        if !is_hmac(algorithm) {
            return Err(KeyError::new(
                path,
                format!("a secret signs HS256, HS384 or HS512, not {algorithm:?}"),
            ));
        }
        let key = EncodingKey::from_secret(&read_secret(path)?)
            .map_err(|e| KeyError::new(path, format!("unusable secret: {e}")))?;
        Ok(SigningKey {
            algorithm,
            kid,
            key,
        })
    }

    /// A private key in PEM (PKCS#8; RSA also PKCS#1) for RS*, ES256/ES384 or EdDSA.
    pub fn private_pem(
        path: &Path,
        algorithm: Algorithm,
        kid: Option<String>,
    ) -> Result<SigningKey, KeyError> {
        let pem = read(path)?;
        let key = match algorithm {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => {
                EncodingKey::from_rsa_pem(&pem)
            }
            Algorithm::ES256 | Algorithm::ES384 => EncodingKey::from_ec_pem(&pem),
            Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem),
            other => {
                return Err(KeyError::new(
                    path,
                    format!("a private key signs RS*, ES256/ES384 or EdDSA, not {other:?}"),
                ));
            }
        }
        .map_err(|e| KeyError::new(path, format!("not a {algorithm:?} private key: {e}")))?;
        Ok(SigningKey {
            algorithm,
            kid,
            key,
        })
    }

    /// Signs `request` as issued at `now` (Unix seconds).
    pub fn mint(&self, request: &TokenRequest, now: u64) -> Result<Minted, MintError> {
        let chars = |s: &str| s.chars().count();
        if !(1..=MAX_ID_CHARS).contains(&chars(&request.sub)) {
            return Err(MintError::Claims(format!(
                "the user id must have 1 to {MAX_ID_CHARS} characters"
            )));
        }
        if request
            .name
            .as_deref()
            .is_some_and(|name| !(1..=MAX_ID_CHARS).contains(&chars(name)))
        {
            return Err(MintError::Claims(format!(
                "the name must have 1 to {MAX_ID_CHARS} characters"
            )));
        }
        Grants::from_claim(Some(&request.rooms)).map_err(|e| MintError::Claims(e.to_string()))?;
        if request.ttl.is_zero() {
            return Err(MintError::Claims(
                "the lifetime must be more than zero".into(),
            ));
        }
        let expires_at = now.saturating_add(request.ttl.as_secs());
        let claims = Claims {
            sub: &request.sub,
            iat: now,
            exp: expires_at,
            name: request.name.as_deref(),
            rooms: &request.rooms,
            max_conns: request.max_conns,
        };
        let mut header = Header::new(self.algorithm);
        header.kid.clone_from(&self.kid);
        let token = jsonwebtoken::encode(&header, &claims, &self.key).map_err(MintError::Sign)?;
        Ok(Minted { token, expires_at })
    }
}

#[cfg(test)]
mod tests {
    use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};

    use super::*;
    use crate::auth::keys::tests::write;
    use crate::auth::{KeyFiles, KeyRing, KeySource, KeySpec, Rules, Verifier};

    #[test]
    fn minted_tokens_verify_with_the_matching_key() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = write(dir.path(), "secret", &[b's'; 48], 0o600);
        let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap_or_else(|e| panic!("{e}"));
        let private = write(dir.path(), "es.key", pair.serialize_pem().as_bytes(), 0o600);
        let public = write(
            dir.path(),
            "es.pem",
            pair.public_key_pem().as_bytes(),
            0o644,
        );
        let ring = KeyRing::load(&KeyFiles {
            keys: vec![
                KeySpec {
                    kid: None,
                    algorithm: Algorithm::HS256,
                    source: KeySource::Secret(secret.clone()),
                },
                KeySpec {
                    kid: Some("es".into()),
                    algorithm: Algorithm::ES256,
                    source: KeySource::PublicPem(public),
                },
            ],
            jwks_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        let verifier = Verifier::new(
            ring,
            Rules {
                algorithms: vec![Algorithm::HS256, Algorithm::ES256],
                issuer: None,
                audience: None,
                leeway: Duration::from_secs(30),
            },
        );
        let request = TokenRequest {
            sub: "alice".into(),
            name: Some("Alice".into()),
            rooms: vec!["lobby".into(), "team-*".into()],
            ttl: Duration::from_secs(3600),
            max_conns: Some(2),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let keys = [
            SigningKey::secret(&secret, Algorithm::HS256, None),
            SigningKey::private_pem(&private, Algorithm::ES256, Some("es".into())),
        ];
        for key in keys {
            let key = key.unwrap_or_else(|e| panic!("{e}"));
            let minted = key.mint(&request, now).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(minted.expires_at, now + 3600);
            let id = verifier
                .verify(&minted.token, now)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((id.user.as_str(), id.name.as_str()), ("alice", "Alice"));
            assert!(id.grants.allows("lobby") && id.grants.allows("team-b"));
            assert_eq!(id.max_conns, Some(2));
            assert_eq!(id.issued_at, Some(now));
        }
    }

    #[test]
    fn claims_the_verifier_would_refuse_are_not_signed() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = write(dir.path(), "secret", &[b's'; 48], 0o600);
        let key =
            SigningKey::secret(&secret, Algorithm::HS256, None).unwrap_or_else(|e| panic!("{e}"));
        let good = TokenRequest {
            sub: "alice".into(),
            name: None,
            rooms: vec![],
            ttl: Duration::from_secs(60),
            max_conns: None,
        };
        let bad = [
            TokenRequest {
                sub: String::new(),
                ..good.clone()
            },
            TokenRequest {
                name: Some("n".repeat(129)),
                ..good.clone()
            },
            TokenRequest {
                rooms: vec!["a*b".into()],
                ..good.clone()
            },
            TokenRequest {
                ttl: Duration::ZERO,
                ..good.clone()
            },
        ];
        for request in bad {
            assert!(
                matches!(key.mint(&request, 1), Err(MintError::Claims(_))),
                "{request:?} was signed"
            );
        }
        assert!(key.mint(&good, 1).is_ok());
    }

    #[test]
    fn a_secret_cannot_sign_an_asymmetric_algorithm() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let secret = write(dir.path(), "secret", &[b's'; 48], 0o600);
        let err = SigningKey::secret(&secret, Algorithm::ES256, None).err();
        assert!(
            err.is_some_and(|e| e.to_string().contains("not ES256")),
            "a secret was bound to ES256"
        );
    }
}
