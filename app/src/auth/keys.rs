//! The key ring: every key a valid token may be signed with, loaded from files the config
//! names, each bound to one algorithm and found by the token's `kid`.
//!
//! HMAC secrets come from files readable by their owner only (a secret inline in the TOML, or
//! in a file others can read, is refused); public keys from PEM files (RS256, ES256, EdDSA)
//! or a JWKS file. Reloading builds a new ring from the same files (SIGHUP), so a key is
//! rotated by adding the new one, reloading, and removing the old one once its tokens expire.

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

/// The shortest HMAC secret accepted: RFC 7518 asks for at least the hash's size.
const MIN_SECRET_BYTES: usize = 32;

/// Where one key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// An HMAC secret: the file's bytes, a trailing newline dropped.
    Secret(PathBuf),
    /// A PEM public key (`PUBLIC KEY`, or `RSA PUBLIC KEY`).
    PublicPem(PathBuf),
}

/// One configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    /// The `kid` tokens signed with it name; `None` for the one key used by tokens with no
    /// `kid`.
    pub kid: Option<String>,
    /// The only algorithm it verifies.
    pub algorithm: Algorithm,
    /// Its file.
    pub source: KeySource,
}

/// The files the key ring is loaded from (the `[auth]` keys of the config).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFiles {
    /// Secret and PEM keys.
    pub keys: Vec<KeySpec>,
    /// A JWKS document of public keys, each with a `kid`.
    pub jwks_file: Option<PathBuf>,
}

/// A key ready to verify: its one algorithm and the decoding key.
pub(crate) struct Key {
    pub(crate) algorithm: Algorithm,
    pub(crate) decoding: DecodingKey,
}

/// Every key a token may be signed with, by `kid`.
pub struct KeyRing {
    by_kid: HashMap<String, Key>,
    unnamed: Option<Key>,
}

/// Why the key ring could not be loaded: the file and what is wrong with it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub reason: String,
}

impl KeyError {
    pub(crate) fn new(path: &Path, reason: impl Into<String>) -> KeyError {
        KeyError {
            path: path.to_owned(),
            reason: reason.into(),
        }
    }
}

impl KeyRing {
    /// Loads every key the files name; any unusable file refuses the whole ring, so a reload
    /// with a broken file keeps the previous ring.
    pub fn load(files: &KeyFiles) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing {
            by_kid: HashMap::new(),
            unnamed: None,
        };
        for spec in &files.keys {
            let (path, key) = match &spec.source {
                KeySource::Secret(path) => (path, secret_key(path, spec.algorithm)?),
                KeySource::PublicPem(path) => (path, pem_key(path, spec.algorithm)?),
            };
            ring.insert(spec.kid.clone(), key, path)?;
        }
        if let Some(path) = &files.jwks_file {
            for (kid, key) in jwks_keys(path)? {
                ring.insert(Some(kid), key, path)?;
            }
        }
        Ok(ring)
    }

    fn insert(&mut self, kid: Option<String>, key: Key, path: &Path) -> Result<(), KeyError> {
        match kid {
            None if self.unnamed.is_some() => Err(KeyError::new(
                path,
                "a second key without a kid: give every key but one a kid",
            )),
            None => {
                self.unnamed = Some(key);
                Ok(())
            }
            Some(kid) if self.by_kid.contains_key(&kid) => {
                Err(KeyError::new(path, format!("kid {kid:?} is used twice")))
            }
            Some(kid) => {
                self.by_kid.insert(kid, key);
                Ok(())
            }
        }
    }

    /// The key a token's `kid` names (the unnamed key when it names none).
    pub(crate) fn find(&self, kid: Option<&str>) -> Option<&Key> {
        match kid {
            Some(kid) => self.by_kid.get(kid),
            None => self.unnamed.as_ref(),
        }
    }

    /// The algorithms of the ring's keys, for the allow-list check at start.
    pub fn algorithms(&self) -> impl Iterator<Item = Algorithm> + '_ {
        self.by_kid
            .values()
            .chain(self.unnamed.as_ref())
            .map(|key| key.algorithm)
    }
}

fn secret_key(path: &Path, algorithm: Algorithm) -> Result<Key, KeyError> {
    if !is_hmac(algorithm) {
        return Err(KeyError::new(
            path,
            format!("a secret verifies HS256, HS384 or HS512, not {algorithm:?}"),
        ));
    }
    let secret = read_secret(path)?;
    let decoding = DecodingKey::from_secret(&secret)
        .map_err(|e| KeyError::new(path, format!("unusable secret: {e}")))?;
    Ok(Key {
        algorithm,
        decoding,
    })
}

/// Whether `algorithm` is one of the HMAC ones a secret signs and verifies.
pub(crate) fn is_hmac(algorithm: Algorithm) -> bool {
    matches!(
        algorithm,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    )
}

/// An HMAC secret from a file only its owner can read, without a trailing newline, at least
/// [`MIN_SECRET_BYTES`] long.
pub(crate) fn read_secret(path: &Path) -> Result<Vec<u8>, KeyError> {
    let meta =
        std::fs::metadata(path).map_err(|e| KeyError::new(path, format!("could not read: {e}")))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::new(
            path,
            format!("the secret is readable by others (mode {mode:04o}); chmod 600 it"),
        ));
    }
    let mut secret = read(path)?;
    while secret.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        secret.pop();
    }
    if secret.len() < MIN_SECRET_BYTES {
        return Err(KeyError::new(
            path,
            format!(
                "the secret has {} bytes, fewer than {MIN_SECRET_BYTES}",
                secret.len()
            ),
        ));
    }
    Ok(secret)
}

/// A file's bytes, the error naming it.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    std::fs::read(path).map_err(|e| KeyError::new(path, format!("could not read: {e}")))
}

fn pem_key(path: &Path, algorithm: Algorithm) -> Result<Key, KeyError> {
    let pem = read(path)?;
    let decoding = match algorithm {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => DecodingKey::from_rsa_pem(&pem),
        Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
        Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
        other => {
            return Err(KeyError::new(
                path,
                format!("a public key verifies RS*, ES256/ES384 or EdDSA, not {other:?}"),
            ));
        }
    }
    .map_err(|e| KeyError::new(path, format!("not a {algorithm:?} public key in PEM: {e}")))?;
    Ok(Key {
        algorithm,
        decoding,
    })
}

/// The public keys of a JWKS document, each with its `kid` and the algorithm it names (or
/// the one its curve implies: P-256 → ES256, Ed25519 → EdDSA, RSA → RS256).
fn jwks_keys(path: &Path) -> Result<Vec<(String, Key)>, KeyError> {
    let text = read(path)?;
    let set: JwkSet = serde_json::from_slice(&text)
        .map_err(|e| KeyError::new(path, format!("not a JWKS document: {e}")))?;
    if set.keys.is_empty() {
        return Err(KeyError::new(path, "the JWKS holds no key"));
    }
    set.keys
        .iter()
        .enumerate()
        .map(|(i, jwk)| {
            let at = |reason: String| KeyError::new(path, format!("keys[{i}]: {reason}"));
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or_else(|| at("no kid".into()))?;
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (_, AlgorithmParameters::OctetKey(_)) => {
                    return Err(at(
                        "a secret key has no place in a JWKS of public keys".into()
                    ));
                }
                (Some(alg), _) => jwk_algorithm(*alg).ok_or_else(|| at(format!("alg {alg:?}")))?,
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P256 => {
                    Algorithm::ES256
                }
                (None, AlgorithmParameters::EllipticCurve(p)) if p.curve == EllipticCurve::P384 => {
                    Algorithm::ES384
                }
                (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                (None, _) => return Err(at("a key type without an alg".into())),
            };
            let decoding = DecodingKey::from_jwk(jwk).map_err(|e| at(format!("{e}")))?;
            Ok((
                kid,
                Key {
                    algorithm,
                    decoding,
                },
            ))
        })
        .collect()
}

fn jwk_algorithm(alg: KeyAlgorithm) -> Option<Algorithm> {
    Some(match alg {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes `bytes` to `name` in `dir` with `mode`.
    pub(crate) fn write(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        if let Err(e) = std::fs::write(&path, bytes)
            .and_then(|()| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)))
        {
            panic!("could not write {}: {e}", path.display());
        }
        path
    }

    fn secret(kid: Option<&str>, path: PathBuf) -> KeySpec {
        KeySpec {
            kid: kid.map(str::to_owned),
            algorithm: Algorithm::HS256,
            source: KeySource::Secret(path),
        }
    }

    fn refusal(files: &KeyFiles) -> String {
        match KeyRing::load(files) {
            Ok(_) => panic!("{files:?} accepted"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn a_secret_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = write(dir.path(), "s", &[b'k'; 40], 0o640);
        let files = KeyFiles {
            keys: vec![secret(None, path)],
            jwks_file: None,
        };
        let err = refusal(&files);
        assert!(err.contains("readable by others (mode 0640)"), "{err}");
    }

    #[test]
    fn a_short_secret_is_refused_and_a_trailing_newline_dropped() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let short = write(dir.path(), "short", &[b'k'; 31], 0o600);
        let err = refusal(&KeyFiles {
            keys: vec![secret(None, short)],
            jwks_file: None,
        });
        assert!(err.contains("31 bytes, fewer than 32"), "{err}");
        let mut padded = vec![b'k'; 31];
        padded.push(b'\n');
        let newline = write(dir.path(), "newline", &padded, 0o600);
        let err = refusal(&KeyFiles {
            keys: vec![secret(None, newline)],
            jwks_file: None,
        });
        assert!(err.contains("31 bytes"), "{err}");
    }

    #[test]
    fn kids_are_unique_and_one_key_at_most_goes_without() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let a = write(dir.path(), "a", &[b'a'; 32], 0o600);
        let b = write(dir.path(), "b", &[b'b'; 32], 0o600);
        let err = refusal(&KeyFiles {
            keys: vec![secret(None, a.clone()), secret(None, b.clone())],
            jwks_file: None,
        });
        assert!(err.contains("a second key without a kid"), "{err}");
        let err = refusal(&KeyFiles {
            keys: vec![secret(Some("k"), a.clone()), secret(Some("k"), b.clone())],
            jwks_file: None,
        });
        assert!(err.contains("kid \"k\" is used twice"), "{err}");
        let ring = KeyRing::load(&KeyFiles {
            keys: vec![secret(Some("k1"), a), secret(None, b)],
            jwks_file: None,
        })
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(ring.find(Some("k1")).is_some());
        assert!(ring.find(None).is_some());
        assert!(ring.find(Some("k2")).is_none());
    }

    #[test]
    fn a_jwks_with_a_secret_key_or_no_kid_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let octet = write(
            dir.path(),
            "octet.json",
            br#"{"keys":[{"kty":"oct","kid":"x","k":"c2VjcmV0"}]}"#,
            0o644,
        );
        let err = refusal(&KeyFiles {
            keys: vec![],
            jwks_file: Some(octet),
        });
        assert!(err.contains("keys[0]: a secret key"), "{err}");
        let garbage = write(dir.path(), "garbage.json", b"{", 0o644);
        let err = refusal(&KeyFiles {
            keys: vec![],
            jwks_file: Some(garbage),
        });
        assert!(err.contains("not a JWKS document"), "{err}");
    }

    #[test]
    fn a_pem_of_the_wrong_kind_is_refused() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let not_pem = write(dir.path(), "k.pem", b"not a key", 0o644);
        let err = refusal(&KeyFiles {
            keys: vec![KeySpec {
                kid: None,
                algorithm: Algorithm::ES256,
                source: KeySource::PublicPem(not_pem.clone()),
            }],
            jwks_file: None,
        });
        assert!(err.contains("not a ES256 public key in PEM"), "{err}");
        let err = refusal(&KeyFiles {
            keys: vec![KeySpec {
                kid: None,
                algorithm: Algorithm::HS256,
                source: KeySource::PublicPem(not_pem),
            }],
            jwks_file: None,
        });
        assert!(err.contains("not HS256"), "{err}");
    }
}
