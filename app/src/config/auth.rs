//! `[auth]` of `app.toml`: anonymous (the default, the original protocol) or token mode, the
//! key files tokens are verified with, the rules they must meet, and what the page is told.
//! The keys are loaded once here so that a bad key file stops the start (exit 64) naming it.

use std::path::PathBuf;
use std::time::Duration;

use confkit::Checker;
use jsonwebtoken::Algorithm;
use serde::Deserialize;

use super::ConfigError;
use crate::auth::{KeyFiles, KeyRing, KeySource, KeySpec, Rules};
use crate::protocol::parse_room;

/// How long a new connection has to send its token frame.
pub const DEFAULT_TOKEN_TIMEOUT: Duration = Duration::from_secs(5);
/// How far `exp`, `nbf` and `iat` may be off.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);
/// How long before its token expires a connection is asked for a new one.
pub const DEFAULT_REFRESH_BEFORE: Duration = Duration::from_secs(60);
/// Open connections one user may hold across every instance (a token's `max_conns` overrides).
pub const DEFAULT_MAX_CONNECTIONS_PER_USER: u32 = 10;
/// Where the page fetches its token unless `token_url` says.
pub const DEFAULT_TOKEN_URL: &str = "/token";

/// `[auth]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAuth {
    /// `"anonymous"` or `"token"`.
    pub mode: Option<String>,
    /// An HMAC secret (HS256) for tokens without a `kid`.
    pub secret_file: Option<PathBuf>,
    /// Keys chosen by `kid`.
    pub keys: Option<Vec<RawKey>>,
    /// A JWKS document of public keys.
    pub jwks_file: Option<PathBuf>,
    /// The algorithms a token may name (default: those of the configured keys).
    pub algorithms: Option<Vec<String>>,
    /// The `iss` every token must carry.
    pub issuer: Option<String>,
    /// The `aud` every token must carry.
    pub audience: Option<String>,
    /// Clock difference allowed on `exp`, `nbf`, `iat`.
    #[serde(default, with = "humantime_serde")]
    pub leeway: Option<Duration>,
    /// Deadline for the first frame, the token.
    #[serde(default, with = "humantime_serde")]
    pub token_timeout: Option<Duration>,
    /// How long before expiry the refresh notice goes out.
    #[serde(default, with = "humantime_serde")]
    pub refresh_before: Option<Duration>,
    /// Rooms any valid token may join, besides the main room.
    pub public_rooms: Option<Vec<String>>,
    /// Where the page fetches its token (a GET answering `{"token": "..."}`).
    pub token_url: Option<String>,
    /// Open connections per user across every instance.
    pub max_connections_per_user: Option<u32>,
}

/// One `[[auth.keys]]` entry.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKey {
    /// The `kid` tokens signed with it name.
    pub kid: Option<String>,
    /// Its algorithm (`HS256`, `RS256`, `ES256`, `EdDSA`, ...).
    pub algorithm: String,
    /// An HMAC secret file.
    pub secret_file: Option<PathBuf>,
    /// A PEM public key file.
    pub public_key_file: Option<PathBuf>,
}

/// Who may connect.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum AuthConfig {
    /// Anyone, under any name (the original simple-chat).
    #[default]
    Anonymous,
    /// Only holders of a valid token, under the token's identity.
    Token(Box<TokenConfig>),
}

/// The settings of token mode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenConfig {
    /// The files the key ring is (re)loaded from.
    pub keys: KeyFiles,
    /// What every token must meet.
    pub rules: Rules,
    /// Deadline for the token frame.
    pub token_timeout: Duration,
    /// Lead of the refresh notice.
    pub refresh_before: Duration,
    /// Named rooms open to every valid token (the main room always is).
    pub public_rooms: Vec<String>,
    /// Where the page gets its token.
    pub token_url: String,
    /// Open connections per user across every instance, unless the token says.
    pub max_connections_per_user: u32,
}

impl RawAuth {
    /// Validates `[auth]` of `file`.
    pub fn validate(self, file: &str) -> Result<AuthConfig, ConfigError> {
        let check = Checker::new(file);
        match self.mode.as_deref().unwrap_or("anonymous") {
            "anonymous" => {
                let set = [
                    ("secret_file", self.secret_file.is_some()),
                    ("keys", self.keys.is_some()),
                    ("jwks_file", self.jwks_file.is_some()),
                    ("token_url", self.token_url.is_some()),
                    (
                        "max_connections_per_user",
                        self.max_connections_per_user.is_some(),
                    ),
                ];
                match set.iter().find(|(_, set)| *set) {
                    Some((key, _)) => Err(check.err(
                        format!("auth.{key}"),
                        "is only used with mode = \"token\"; set the mode or remove the key",
                    )),
                    None => Ok(AuthConfig::Anonymous),
                }
            }
            "token" => self
                .token(&check)
                .map(|token| AuthConfig::Token(Box::new(token))),
            other => Err(check.err(
                "auth.mode",
                format!("{other:?} is not \"anonymous\" or \"token\""),
            )),
        }
    }

    fn token(self, check: &Checker<'_>) -> Result<TokenConfig, ConfigError> {
        let mut specs = Vec::new();
        if let Some(path) = self.secret_file {
            specs.push(KeySpec {
                kid: None,
                algorithm: Algorithm::HS256,
                source: KeySource::Secret(path),
            });
        }
        for (i, key) in self.keys.unwrap_or_default().into_iter().enumerate() {
            let at = format!("auth.keys[{i}]");
            let algorithm = algorithm(check, &format!("{at}.algorithm"), &key.algorithm)?;
            let source = match (key.secret_file, key.public_key_file) {
                (Some(path), None) => KeySource::Secret(path),
                (None, Some(path)) => KeySource::PublicPem(path),
                _ => {
                    return Err(
                        check.err(at, "needs exactly one of secret_file and public_key_file")
                    );
                }
            };
            if key.kid.as_deref() == Some("") {
                return Err(check.err(format!("{at}.kid"), "is empty"));
            }
            specs.push(KeySpec {
                kid: key.kid,
                algorithm,
                source,
            });
        }
        let keys = KeyFiles {
            keys: specs,
            jwks_file: self.jwks_file,
        };
        if keys.keys.is_empty() && keys.jwks_file.is_none() {
            return Err(check.err(
                "auth",
                "token mode needs a key: secret_file, [[auth.keys]] or jwks_file",
            ));
        }
        let ring = KeyRing::load(&keys).map_err(|e| {
            check.err(
                "auth",
                format!("key file {}: {}", e.path.display(), e.reason),
            )
        })?;
        let algorithms = match self.algorithms {
            Some(names) if names.is_empty() => {
                return Err(check.err("auth.algorithms", "is empty: no token could pass"));
            }
            Some(names) => names
                .iter()
                .map(|name| algorithm(check, "auth.algorithms", name))
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let mut algorithms: Vec<Algorithm> = ring.algorithms().collect();
                algorithms.sort_by_key(|a| format!("{a:?}"));
                algorithms.dedup();
                algorithms
            }
        };
        let public_rooms = self.public_rooms.unwrap_or_default();
        for room in &public_rooms {
            if !matches!(parse_room(Some(room)), Ok(Some(_))) {
                return Err(check.err(
                    "auth.public_rooms",
                    format!("{room:?} is not a room name (1-64 of A-Z a-z 0-9 _ - .)"),
                ));
            }
        }
        let refresh_before = check.duration_at_least(
            "auth.refresh_before",
            self.refresh_before,
            DEFAULT_REFRESH_BEFORE,
            Duration::from_secs(1),
        )?;
        Ok(TokenConfig {
            keys,
            rules: Rules {
                algorithms,
                issuer: self.issuer,
                audience: self.audience,
                leeway: self.leeway.unwrap_or(DEFAULT_LEEWAY),
            },
            token_timeout: check.duration_at_least(
                "auth.token_timeout",
                self.token_timeout,
                DEFAULT_TOKEN_TIMEOUT,
                Duration::from_millis(100),
            )?,
            refresh_before,
            public_rooms,
            token_url: token_url(check, self.token_url)?,
            max_connections_per_user: check.at_least(
                "auth.max_connections_per_user",
                self.max_connections_per_user,
                DEFAULT_MAX_CONNECTIONS_PER_USER,
                1,
            )?,
        })
    }
}

/// An algorithm name the verifier supports; HMAC and the public-key ones, never `none`.
fn algorithm(check: &Checker<'_>, key: &str, name: &str) -> Result<Algorithm, ConfigError> {
    name.parse::<Algorithm>().map_err(|_| {
        check.err(
            key,
            format!("{name:?} is not one of HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384, EdDSA"),
        )
    })
}

/// The page's token URL: a path on the page's own site, or an `http(s)://` URL.
fn token_url(check: &Checker<'_>, url: Option<String>) -> Result<String, ConfigError> {
    let url = url.unwrap_or_else(|| DEFAULT_TOKEN_URL.to_owned());
    let usable = url.starts_with('/') || url.starts_with("https://") || url.starts_with("http://");
    if !usable || url.chars().any(|c| c.is_control() || c == '"' || c == '<') {
        return Err(check.err(
            "auth.token_url",
            format!("{url:?} is not a path (/token) or an http(s):// URL"),
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::Config;
    use super::*;

    fn error(toml: &str) -> String {
        match Config::from_toml(toml, "app.toml") {
            Err(e) => e.to_string(),
            Ok(config) => panic!("accepted: {:?}", config.auth),
        }
    }

    fn secret(dir: &std::path::Path, name: &str, mode: u32) -> String {
        let path = dir.join(name);
        std::fs::write(&path, [b'k'; 40]).unwrap_or_else(|e| panic!("{e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("{e}"));
        path.display().to_string()
    }

    #[test]
    fn anonymous_is_the_default_and_takes_no_token_keys() {
        let config = Config::from_toml("", "app.toml").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.auth, AuthConfig::Anonymous);
        assert_eq!(
            error("[auth]\nsecret_file = \"/x\"\n"),
            "app.toml: auth.secret_file: is only used with mode = \"token\"; set the mode or remove the key"
        );
        assert!(error("[auth]\nmode = \"jwt\"\n").starts_with("app.toml: auth.mode: \"jwt\""));
    }

    #[test]
    fn token_mode_names_the_key_and_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let good = secret(dir.path(), "good", 0o600);
        let mode = "[auth]\nmode = \"token\"\n";
        assert!(error(mode).starts_with("app.toml: auth: token mode needs a key"));
        let config = Config::from_toml(
            &format!("{mode}secret_file = \"{good}\"\npublic_rooms = [\"lobby\"]\n"),
            "app.toml",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let AuthConfig::Token(token) = config.auth else {
            panic!("not token mode")
        };
        assert_eq!(token.rules.algorithms, vec![Algorithm::HS256]);
        assert_eq!(token.token_timeout, DEFAULT_TOKEN_TIMEOUT);
        assert_eq!(
            token.max_connections_per_user,
            DEFAULT_MAX_CONNECTIONS_PER_USER
        );
        assert_eq!(token.token_url, DEFAULT_TOKEN_URL);
        for (extra, expected) in [
            (
                "public_rooms = [\"a b\"]",
                "app.toml: auth.public_rooms: \"a b\"",
            ),
            (
                "algorithms = [\"none\"]",
                "app.toml: auth.algorithms: \"none\"",
            ),
            ("algorithms = []", "app.toml: auth.algorithms: is empty"),
            (
                "token_timeout = \"1ms\"",
                "app.toml: auth.token_timeout: 1ms is too small",
            ),
            (
                "max_connections_per_user = 0",
                "app.toml: auth.max_connections_per_user: 0",
            ),
            (
                "token_url = \"javascript:x\"",
                "app.toml: auth.token_url: \"javascript:x\"",
            ),
        ] {
            let text = format!("{mode}secret_file = \"{good}\"\n{extra}\n");
            let e = error(&text);
            assert!(e.starts_with(expected), "{extra}: {e}");
        }
        // A secret others may read is refused, naming the file.
        let loose = secret(dir.path(), "loose", 0o644);
        let e = error(&format!("{mode}secret_file = \"{loose}\"\n"));
        assert!(e.starts_with("app.toml: auth: key file "), "{e}");
        assert!(e.contains(&loose), "{e}");
        let e = error(&format!(
            "{mode}[[auth.keys]]\nkid = \"k\"\nalgorithm = \"ES256\"\n"
        ));
        assert!(
            e.starts_with("app.toml: auth.keys[0]: needs exactly one of"),
            "{e}"
        );
    }
}
