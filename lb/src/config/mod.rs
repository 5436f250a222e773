//! Configuration: `lb.toml` and command-line overrides → one validated [`Config`].
//!
//! Data flows in three steps. The TOML text is deserialised into raw structs that mirror the
//! file exactly (`deny_unknown_fields`, so a misspelt key is an error, not a silent default);
//! [`Overrides`] from the command line (quick mode) replace keys of that raw form; then
//! `validate` checks every key and every cross-key rule and produces the typed [`Config`] the
//! engine runs on (socket addresses, durations, resolved paths). Every error names the file, the
//! key and what is wrong. Certificate files are read later, by `tls`, so that `lb check` and a
//! reload report unreadable certificates with the same file-and-key naming
//! ([`Config::load_certificates`]).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::backends::balance::{MAX_WEIGHT, Policy};
use crate::backends::health::HealthConfig;

/// Where the https listener binds when the file does not say.
pub const DEFAULT_HTTPS_LISTEN: &str = "0.0.0.0:443";
/// Where the admin listener binds when a config file does not say (loopback only).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:9100";
/// Client header read timeout (slowloris protection; HAProxy `timeout http-request`).
pub const DEFAULT_CLIENT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshake timeout.
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Backend connect timeout (HAProxy `timeout connect`).
pub const DEFAULT_BACKEND_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a backend has to start answering a request (HAProxy `timeout server`).
pub const DEFAULT_BACKEND_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an unused pooled backend connection is kept open.
pub const DEFAULT_BACKEND_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Tunnel idle timeout (HAProxy `timeout tunnel`).
pub const DEFAULT_TUNNEL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// How long a shutdown waits for requests and tunnels to finish.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(10);
/// Largest request head (request line plus headers) accepted, in bytes.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Smallest `max_header_bytes` accepted (hyper's minimum read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Longest request target (path and query) accepted, in bytes.
pub const DEFAULT_MAX_URI_BYTES: usize = 8 * 1024;
/// Idle keep-alive connections kept per backend.
pub const DEFAULT_BACKEND_IDLE_CONNECTIONS: usize = 32;

/// The validated configuration the engine runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`<command line>` in quick mode), for messages.
    pub source: String,
    /// Addresses to listen on.
    pub listen: Listen,
    /// Certificates; the first is the default for clients that send no (or an unknown) SNI.
    pub certificates: Vec<CertificateSource>,
    /// Upstream servers, in configuration order.
    pub backends: Vec<BackendConfig>,
    /// How a backend is chosen.
    pub policy: Policy,
    /// Active health checks.
    pub health: HealthConfig,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Size and count limits.
    pub limits: Limits,
}

/// Listener addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listen {
    /// TLS listener.
    pub https: SocketAddr,
    /// Plain-HTTP listener that redirects to https, if any.
    pub redirect: Option<SocketAddr>,
    /// Admin listener (`/metrics`, `/stats`), if any.
    pub admin: Option<SocketAddr>,
}

/// Where one certificate and its key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateSource {
    /// Certificate chain and key in separate PEM files.
    Pair {
        /// Certificate chain, leaf first.
        cert: PathBuf,
        /// Private key.
        key: PathBuf,
    },
    /// Chain and key in one PEM file (HAProxy `crt`).
    Combined {
        /// The file.
        pem: PathBuf,
    },
}

/// One upstream server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Name in logs and stats.
    pub name: String,
    /// Resolved address.
    pub addr: SocketAddr,
    /// Relative share of new connections (0 = none).
    pub weight: u32,
}

/// Timeouts, all non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Time a client has to send a complete request head; also the keep-alive idle limit.
    pub client_header: Duration,
    /// Time a client has to complete the TLS handshake.
    pub tls_handshake: Duration,
    /// Time to establish a TCP connection to a backend.
    pub backend_connect: Duration,
    /// Time a backend has to send the response head once a request is sent; also the longest
    /// pause allowed in forwarding a request body (a backend not reading, a client not
    /// sending).
    pub backend_response: Duration,
    /// How long an unused pooled backend connection stays open.
    pub backend_idle: Duration,
    /// A tunnel with no bytes in either direction for this long is closed.
    pub tunnel_idle: Duration,
    /// How long a shutdown waits for requests and tunnels before closing them.
    pub drain_grace: Duration,
}

/// Size and count limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head in bytes; larger gets 431.
    pub max_header_bytes: usize,
    /// Longest request target in bytes; longer gets 414.
    pub max_uri_bytes: usize,
    /// Concurrent client connections; `None` = derived from the open-file limit at start.
    pub max_client_connections: Option<usize>,
    /// Idle keep-alive connections kept per backend.
    pub backend_idle_connections: usize,
}

/// Command-line values that replace keys of the file (or, without a file, make the whole
/// configuration: quick mode). They are `lb run`'s flags as they are.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Overrides {
    /// `listen.https`.
    #[arg(
        long,
        value_name = "ADDR",
        help = "HTTPS listen address (listen.https), e.g. 0.0.0.0:443"
    )]
    pub listen: Option<String>,
    /// `backends` (each `host:port`), replacing the file's list when non-empty.
    #[arg(
        long = "backend",
        value_name = "ADDR",
        help = "Backend host:port (repeatable; replaces the file's backends)"
    )]
    pub backends: Vec<String>,
    /// Certificate file (with `key`), replacing the file's `certificates`.
    #[arg(
        long,
        value_name = "FILE",
        requires = "key",
        conflicts_with = "pem",
        help = "Certificate chain PEM file (with --key)"
    )]
    pub cert: Option<PathBuf>,
    /// Key file (with `cert`).
    #[arg(
        long,
        value_name = "FILE",
        requires = "cert",
        help = "Private key PEM file (with --cert)"
    )]
    pub key: Option<PathBuf>,
    /// Combined PEM, replacing the file's `certificates`.
    #[arg(
        long,
        value_name = "FILE",
        help = "Combined certificate and key PEM file (HAProxy `crt` style)"
    )]
    pub pem: Option<PathBuf>,
    /// `listen.admin` (`off` disables it).
    #[arg(
        long,
        value_name = "ADDR",
        help = "Admin listen address (listen.admin), or \"off\""
    )]
    pub admin: Option<String>,
    /// `listen.redirect`.
    #[arg(
        long,
        value_name = "ADDR",
        help = "Plain-HTTP redirect listen address (listen.redirect)"
    )]
    pub redirect: Option<String>,
    /// `balance.policy`.
    #[arg(
        long,
        value_name = "POLICY",
        help = "Balancing policy: round-robin or least-connections"
    )]
    pub policy: Option<String>,
}

/// Why a configuration was rejected. The display form is `FILE: KEY: REASON`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{file}: could not read the file: {source}")]
    Read {
        /// The file.
        file: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the expected shape (an unknown key, a
    /// string where a number belongs); the parser's message names the key and line.
    #[error("{file}: {message}")]
    Parse {
        /// The file.
        file: String,
        /// The parser's message.
        message: String,
    },
    /// A key has a value that is not acceptable.
    #[error("{file}: {key}: {reason}")]
    Invalid {
        /// The file.
        file: String,
        /// The key, like `backends[1].addr`.
        key: String,
        /// What is wrong and, where useful, what would be right.
        reason: String,
    },
}

impl ConfigError {
    /// `key` of `file` is wrong for `reason`.
    pub fn invalid(file: &str, key: impl Into<String>, reason: impl fmt::Display) -> Self {
        ConfigError::Invalid {
            file: file.to_owned(),
            key: key.into(),
            reason: reason.to_string(),
        }
    }
}

/// The file name used in messages when there is no file.
pub const COMMAND_LINE: &str = "<command line>";

impl Config {
    /// Reads, parses and validates `path`, applying `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            file: file.clone(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::parse(&text, &file, &base, overrides)
    }

    /// Quick mode: a configuration made of defaults and `overrides` alone. Relative paths are
    /// taken from the working directory; there is no admin listener unless asked for.
    pub fn from_overrides(overrides: &Overrides) -> Result<Config, ConfigError> {
        let mut raw = RawConfig::default();
        raw.listen.get_or_insert_with(RawListen::default).admin = Some("off".into());
        raw.apply(overrides);
        raw.validate(COMMAND_LINE, Path::new(""))
    }

    /// Parses and validates TOML `text`; `file` names it in errors and relative certificate
    /// paths are taken from `base` (the file's directory).
    pub fn parse(
        text: &str,
        file: &str,
        base: &Path,
        overrides: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            file: file.to_owned(),
            message: parse_message(text, &e),
        })?;
        raw.apply(overrides);
        raw.validate(file, base)
    }

    /// Loads every configured certificate, naming the file and key of the first that fails.
    pub fn load_certificates(&self) -> Result<Vec<certs::CertChain>, ConfigError> {
        self.certificates
            .iter()
            .enumerate()
            .map(|(i, source)| {
                let (field, result) = match source {
                    CertificateSource::Pair { cert, key } => {
                        let result = certs::load_pair(cert, key);
                        // Name the field whose file failed (the certificate is read first).
                        let field = match &result {
                            Err(
                                certs::CertError::NoPrivateKey { .. }
                                | certs::CertError::KeyMismatch { .. },
                            ) => "key",
                            Err(certs::CertError::Read { path, .. }) if path != cert => "key",
                            _ => "cert",
                        };
                        (field, result)
                    }
                    CertificateSource::Combined { pem } => ("pem", certs::load_combined(pem)),
                };
                result.map_err(|e| self.error(format!("certificates[{i}].{field}"), e))
            })
            .collect()
    }

    /// An error about `key` of this configuration.
    pub fn error(&self, key: impl Into<String>, reason: impl fmt::Display) -> ConfigError {
        ConfigError::invalid(&self.source, key, reason)
    }
}

// ---------------------------------------------------------------------------------------------
// The file's shape.

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<RawListen>,
    #[serde(default)]
    certificates: Vec<RawCertificate>,
    #[serde(default)]
    backends: Vec<RawBackend>,
    balance: Option<RawBalance>,
    health: Option<RawHealth>,
    timeouts: Option<RawTimeouts>,
    limits: Option<RawLimits>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListen {
    https: Option<String>,
    redirect: Option<String>,
    admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCertificate {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    pem: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    name: Option<String>,
    addr: Option<String>,
    weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBalance {
    policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    enabled: Option<bool>,
    path: Option<String>,
    expect_status: Option<i64>,
    interval: Option<String>,
    timeout: Option<String>,
    rise: Option<i64>,
    fall: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeouts {
    client_header: Option<String>,
    tls_handshake: Option<String>,
    backend_connect: Option<String>,
    backend_response: Option<String>,
    backend_idle: Option<String>,
    tunnel_idle: Option<String>,
    drain_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_header_bytes: Option<i64>,
    max_uri_bytes: Option<i64>,
    max_client_connections: Option<i64>,
    backend_idle_connections: Option<i64>,
}

impl RawConfig {
    fn apply(&mut self, o: &Overrides) {
        let listen = self.listen.get_or_insert_with(RawListen::default);
        if let Some(addr) = &o.listen {
            listen.https = Some(addr.clone());
        }
        if let Some(addr) = &o.admin {
            listen.admin = Some(addr.clone());
        }
        if let Some(addr) = &o.redirect {
            listen.redirect = Some(addr.clone());
        }
        if !o.backends.is_empty() {
            self.backends = o
                .backends
                .iter()
                .map(|addr| RawBackend {
                    name: None,
                    addr: Some(addr.clone()),
                    weight: None,
                })
                .collect();
        }
        if o.cert.is_some() || o.key.is_some() || o.pem.is_some() {
            self.certificates = vec![RawCertificate {
                cert: o.cert.clone(),
                key: o.key.clone(),
                pem: o.pem.clone(),
            }];
        }
        if let Some(policy) = &o.policy {
            self.balance.get_or_insert_with(RawBalance::default).policy = Some(policy.clone());
        }
    }

    fn validate(self, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let v = Validator { file };
        let listen = self.listen.unwrap_or_default();
        let https = v.addr(
            "listen.https",
            listen.https.as_deref().unwrap_or(DEFAULT_HTTPS_LISTEN),
        )?;
        let redirect = listen
            .redirect
            .as_deref()
            .map(|a| v.optional_addr("listen.redirect", a))
            .transpose()?
            .flatten();
        let admin = v.optional_addr(
            "listen.admin",
            listen.admin.as_deref().unwrap_or(DEFAULT_ADMIN_LISTEN),
        )?;
        let mut bound = vec![("listen.https", https)];
        bound.extend(redirect.map(|a| ("listen.redirect", a)));
        bound.extend(admin.map(|a| ("listen.admin", a)));
        for (i, (key, addr)) in bound.iter().enumerate() {
            if let Some((other, _)) = bound[..i]
                .iter()
                .find(|(_, a)| *a == *addr && addr.port() != 0)
            {
                return Err(v.err(*key, format!("{addr} is already used by {other}")));
            }
        }

        if self.certificates.is_empty() {
            return Err(v.err(
                "certificates",
                "at least one certificate is required: add a [[certificates]] table with \
                 `pem = \"server.pem\"` or `cert` and `key` (or pass --cert and --key); \
                 `lb certs generate` makes one",
            ));
        }
        let certificates = self
            .certificates
            .into_iter()
            .enumerate()
            .map(|(i, c)| v.certificate(i, c, base))
            .collect::<Result<Vec<_>, _>>()?;

        if self.backends.is_empty() {
            return Err(v.err(
                "backends",
                "at least one backend is required: add a [[backends]] table with \
                 `addr = \"host:port\"` (or pass --backend)",
            ));
        }
        let mut backends: Vec<BackendConfig> = Vec::with_capacity(self.backends.len());
        for (i, b) in self.backends.into_iter().enumerate() {
            let backend = v.backend(i, b)?;
            if let Some(j) = backends.iter().position(|o| o.addr == backend.addr) {
                return Err(v.err(
                    format!("backends[{i}].addr"),
                    format!("{} is already backends[{j}]", backend.addr),
                ));
            }
            if let Some(j) = backends.iter().position(|o| o.name == backend.name) {
                return Err(v.err(
                    format!("backends[{i}].name"),
                    format!("{:?} is already the name of backends[{j}]", backend.name),
                ));
            }
            backends.push(backend);
        }

        let policy = match self.balance.and_then(|b| b.policy) {
            None => Policy::default(),
            Some(p) => p
                .parse()
                .map_err(|e: crate::backends::balance::UnknownPolicy| v.err("balance.policy", e))?,
        };

        let health = v.health(self.health.unwrap_or_default())?;
        let timeouts = v.timeouts(self.timeouts.unwrap_or_default())?;
        let limits = v.limits(self.limits.unwrap_or_default())?;

        Ok(Config {
            source: file.to_owned(),
            listen: Listen {
                https,
                redirect,
                admin,
            },
            certificates,
            backends,
            policy,
            health,
            timeouts,
            limits,
        })
    }
}

/// Per-key checks, each producing a [`ConfigError::Invalid`] that names `file` and the key.
struct Validator<'a> {
    file: &'a str,
}

impl Validator<'_> {
    fn err(&self, key: impl Into<String>, reason: impl fmt::Display) -> ConfigError {
        ConfigError::invalid(self.file, key, reason)
    }

    fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!(
                    "{value:?} is not an IP:port address (examples: \"0.0.0.0:443\", \
                     \"127.0.0.1:8443\", \"[::]:443\")"
                ),
            )
        })
    }

    /// An address, or `off` for none.
    fn optional_addr(&self, key: &str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
        if value == "off" {
            return Ok(None);
        }
        self.addr(key, value).map(Some).map_err(|e| match e {
            ConfigError::Invalid { file, key, reason } => ConfigError::Invalid {
                file,
                key,
                reason: format!("{reason}, or \"off\""),
            },
            other => other,
        })
    }

    fn certificate(
        &self,
        i: usize,
        c: RawCertificate,
        base: &Path,
    ) -> Result<CertificateSource, ConfigError> {
        let key = format!("certificates[{i}]");
        match (c.pem, c.cert, c.key) {
            (Some(pem), None, None) => Ok(CertificateSource::Combined {
                pem: base.join(pem),
            }),
            (None, Some(cert), Some(key)) => Ok(CertificateSource::Pair {
                cert: base.join(cert),
                key: base.join(key),
            }),
            (Some(_), _, _) => Err(self.err(
                key,
                "give either `pem` (certificate and key in one file) or `cert` and `key`, not both",
            )),
            (None, Some(_), None) => Err(self.err(
                format!("{key}.key"),
                "missing: `cert` needs its `key` (or use `pem` for a combined file)",
            )),
            (None, None, Some(_)) => Err(self.err(
                format!("{key}.cert"),
                "missing: `key` needs its `cert` (or use `pem` for a combined file)",
            )),
            (None, None, None) => Err(self.err(key, "empty: set `pem`, or `cert` and `key`")),
        }
    }

    fn backend(&self, i: usize, b: RawBackend) -> Result<BackendConfig, ConfigError> {
        let key = |k: &str| format!("backends[{i}].{k}");
        let addr_text = b
            .addr
            .ok_or_else(|| self.err(key("addr"), "missing: set `addr = \"host:port\"`"))?;
        let addr = resolve(&addr_text).map_err(|reason| self.err(key("addr"), reason))?;
        let weight = match b.weight {
            None => 1,
            Some(w) if (0..=i64::from(MAX_WEIGHT)).contains(&w) => w as u32,
            Some(w) => {
                return Err(self.err(
                    key("weight"),
                    format!("{w} is out of range 0..={MAX_WEIGHT}"),
                ));
            }
        };
        let name = match b.name {
            Some(n) if n.trim().is_empty() => {
                return Err(self.err(key("name"), "must not be empty"));
            }
            Some(n) => n,
            None => addr_text,
        };
        Ok(BackendConfig { name, addr, weight })
    }

    fn health(&self, h: RawHealth) -> Result<HealthConfig, ConfigError> {
        let d = HealthConfig::default();
        let path = h.path.unwrap_or(d.path);
        if !path.starts_with('/') || path.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(self.err(
                "health.path",
                format!("{path:?} must start with '/' and contain no spaces"),
            ));
        }
        let expect_status = match h.expect_status {
            None => d.expect_status,
            Some(s) if (100..=599).contains(&s) => s as u16,
            Some(s) => {
                return Err(self.err(
                    "health.expect_status",
                    format!("{s} is not an HTTP status (100..=599)"),
                ));
            }
        };
        let interval = self.duration("health.interval", h.interval, d.interval)?;
        let timeout = self.duration("health.timeout", h.timeout, d.timeout)?;
        let rise = self.count("health.rise", h.rise, d.rise, 1, 1000)?;
        let fall = self.count("health.fall", h.fall, d.fall, 1, 1000)?;
        Ok(HealthConfig {
            enabled: h.enabled.unwrap_or(d.enabled),
            path,
            expect_status,
            interval,
            timeout,
            rise,
            fall,
        })
    }

    fn timeouts(&self, t: RawTimeouts) -> Result<Timeouts, ConfigError> {
        Ok(Timeouts {
            client_header: self.duration(
                "timeouts.client_header",
                t.client_header,
                DEFAULT_CLIENT_HEADER_TIMEOUT,
            )?,
            tls_handshake: self.duration(
                "timeouts.tls_handshake",
                t.tls_handshake,
                DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            )?,
            backend_connect: self.duration(
                "timeouts.backend_connect",
                t.backend_connect,
                DEFAULT_BACKEND_CONNECT_TIMEOUT,
            )?,
            backend_response: self.duration(
                "timeouts.backend_response",
                t.backend_response,
                DEFAULT_BACKEND_RESPONSE_TIMEOUT,
            )?,
            backend_idle: self.duration(
                "timeouts.backend_idle",
                t.backend_idle,
                DEFAULT_BACKEND_IDLE_TIMEOUT,
            )?,
            tunnel_idle: self.duration(
                "timeouts.tunnel_idle",
                t.tunnel_idle,
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
            drain_grace: self.duration(
                "timeouts.drain_grace",
                t.drain_grace,
                DEFAULT_DRAIN_GRACE,
            )?,
        })
    }

    fn limits(&self, l: RawLimits) -> Result<Limits, ConfigError> {
        let max_header_bytes = self.count(
            "limits.max_header_bytes",
            l.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES as u32,
            MIN_MAX_HEADER_BYTES as u32,
            1024 * 1024,
        )? as usize;
        let max_uri_bytes = self.count(
            "limits.max_uri_bytes",
            l.max_uri_bytes,
            DEFAULT_MAX_URI_BYTES as u32,
            16,
            u32::from(u16::MAX) - 1,
        )? as usize;
        let max_client_connections = l
            .max_client_connections
            .map(|n| {
                self.count("limits.max_client_connections", Some(n), 0, 1, 10_000_000)
                    .map(|n| n as usize)
            })
            .transpose()?;
        let backend_idle_connections = self.count(
            "limits.backend_idle_connections",
            l.backend_idle_connections,
            DEFAULT_BACKEND_IDLE_CONNECTIONS as u32,
            0,
            100_000,
        )? as usize;
        Ok(Limits {
            max_header_bytes,
            max_uri_bytes,
            max_client_connections,
            backend_idle_connections,
        })
    }

    /// A humantime duration (`"2s"`, `"1h 30m"`, `"500ms"`), non-zero.
    fn duration(
        &self,
        key: &str,
        value: Option<String>,
        default: Duration,
    ) -> Result<Duration, ConfigError> {
        let Some(text) = value else {
            return Ok(default);
        };
        match humantime::parse_duration(&text) {
            Ok(d) if d.is_zero() => Err(self.err(key, "must be greater than zero")),
            Ok(d) => Ok(d),
            Err(e) => Err(self.err(
                key,
                format!("{text:?} is not a duration ({e}); examples: \"500ms\", \"2s\", \"1h\""),
            )),
        }
    }

    /// An integer within `min..=max`.
    fn count(
        &self,
        key: &str,
        value: Option<i64>,
        default: u32,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        match value {
            None => Ok(default),
            Some(n) if (i64::from(min)..=i64::from(max)).contains(&n) => Ok(n as u32),
            Some(n) => Err(self.err(key, format!("{n} is out of range {min}..={max}"))),
        }
    }
}

/// The parser's message on one line, prefixed with the line it points at (number and text, so
/// the key is named even when the message itself does not name it).
fn parse_message(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(span) = e.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or("");
    let number = before.matches('\n').count() + 1;
    let start = before.rfind('\n').map_or(0, |i| i + 1);
    let line: String = text[start..]
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(80)
        .collect();
    format!("line {number} `{line}`: {message}")
}

/// Resolves `host:port` (an IP address or a DNS name) to its first socket address.
fn resolve(addr: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    if !addr.contains(':') {
        return Err(format!("{addr:?} has no port; write \"host:port\""));
    }
    let mut addrs = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr:?} does not resolve: {e}"))?;
    addrs
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [[certificates]]
        pem = "site.pem"

        [[backends]]
        addr = "127.0.0.1:8081"
    "#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, "lb.toml", Path::new("/etc/lb"), &Overrides::default())
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn minimal_file_gets_documented_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.listen.https, DEFAULT_HTTPS_LISTEN.parse().unwrap());
        assert_eq!(c.listen.admin, Some(DEFAULT_ADMIN_LISTEN.parse().unwrap()));
        assert_eq!(c.listen.redirect, None);
        assert_eq!(
            c.certificates,
            vec![CertificateSource::Combined {
                pem: "/etc/lb/site.pem".into()
            }]
        );
        assert_eq!(c.backends[0].name, "127.0.0.1:8081");
        assert_eq!(c.backends[0].weight, 1);
        assert_eq!(c.policy, Policy::RoundRobin);
        let h = HealthConfig::default();
        assert_eq!(
            (c.health.interval, c.health.rise, c.health.fall),
            (h.interval, h.rise, h.fall)
        );
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(3600));
        assert_eq!(c.limits.max_header_bytes, DEFAULT_MAX_HEADER_BYTES);
        assert_eq!(c.limits.max_client_connections, None);
    }

    #[test]
    fn full_file_parses_every_key() {
        let c = parse(
            r#"
            [listen]
            https = "127.0.0.1:8443"
            redirect = "127.0.0.1:8080"
            admin = "off"

            [[certificates]]
            cert = "/abs/a.crt"
            key = "a.key"

            [[backends]]
            name = "app1"
            addr = "127.0.0.1:8081"
            weight = 3

            [[backends]]
            name = "app2"
            addr = "localhost:8082"
            weight = 0

            [balance]
            policy = "leastconn"

            [health]
            enabled = false
            path = "/ready"
            expect_status = 204
            interval = "500ms"
            timeout = "250ms"
            rise = 1
            fall = 5

            [timeouts]
            client_header = "3s"
            tls_handshake = "4s"
            backend_connect = "1s"
            backend_response = "30s"
            backend_idle = "20s"
            tunnel_idle = "2h"
            drain_grace = "7s"

            [limits]
            max_header_bytes = 32768
            max_uri_bytes = 4096
            max_client_connections = 500
            backend_idle_connections = 4
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.admin, None);
        assert_eq!(c.listen.redirect, Some("127.0.0.1:8080".parse().unwrap()));
        assert_eq!(
            c.certificates,
            vec![CertificateSource::Pair {
                cert: "/abs/a.crt".into(),
                key: "/etc/lb/a.key".into()
            }]
        );
        assert_eq!(c.backends[1].addr.port(), 8082);
        assert_eq!((c.backends[0].weight, c.backends[1].weight), (3, 0));
        assert_eq!(c.policy, Policy::LeastConnections);
        assert!(!c.health.enabled);
        assert_eq!(c.health.path, "/ready");
        assert_eq!(c.health.expect_status, 204);
        assert_eq!(c.health.interval, Duration::from_millis(500));
        assert_eq!((c.health.rise, c.health.fall), (1, 5));
        assert_eq!(c.timeouts.tunnel_idle, Duration::from_secs(7200));
        assert_eq!(c.timeouts.drain_grace, Duration::from_secs(7));
        assert_eq!(c.limits.max_client_connections, Some(500));
        assert_eq!(c.limits.backend_idle_connections, 4);
    }

    #[test]
    fn errors_name_file_key_and_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "[listen]\nhttps = \"443\"\n",
                "lb.toml: listen.https: \"443\" is not",
            ),
            ("[listen]\nadmin = \"x\"\n", "lb.toml: listen.admin:"),
            (
                "[listen]\nhttps = \"127.0.0.1:9\"\nredirect = \"127.0.0.1:9\"\n",
                "lb.toml: listen.redirect: 127.0.0.1:9 is already used by listen.https",
            ),
            (
                "[timeouts]\ntunnel_idle = \"1x\"\n",
                "lb.toml: timeouts.tunnel_idle: \"1x\"",
            ),
            (
                "[timeouts]\ndrain_grace = \"0s\"\n",
                "timeouts.drain_grace: must be greater",
            ),
            (
                "[health]\nrise = 0\n",
                "lb.toml: health.rise: 0 is out of range",
            ),
            ("[health]\npath = \"healthz\"\n", "lb.toml: health.path:"),
            ("[health]\nexpect_status = 42\n", "health.expect_status: 42"),
            (
                "[balance]\npolicy = \"random\"\n",
                "lb.toml: balance.policy: unknown",
            ),
            (
                "[limits]\nmax_header_bytes = 100\n",
                "limits.max_header_bytes: 100",
            ),
            (
                "[limits]\nmax_client_connections = -1\n",
                "limits.max_client_connections",
            ),
        ];
        for (extra, expected) in cases {
            let text = format!("{MINIMAL}\n{extra}");
            let e = err(&text);
            assert!(e.contains(expected), "{extra:?}: got {e:?}");
        }
    }

    #[test]
    fn backend_and_certificate_errors_name_the_entry() {
        let e = err(
            "[[certificates]]\npem = \"a\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n\
             [[backends]]\naddr = \"127.0.0.1:1\"\n",
        );
        assert!(
            e.contains("backends[1].addr: 127.0.0.1:1 is already backends[0]"),
            "{e}"
        );
        let e = err("[[certificates]]\npem = \"a\"\n[[backends]]\naddr = \"nohost\"\n");
        assert!(
            e.contains("backends[0].addr: \"nohost\" has no port"),
            "{e}"
        );
        let e = err("[[certificates]]\npem = \"a\"\n[[backends]]\nname = \"x\"\n");
        assert!(e.contains("backends[0].addr: missing"), "{e}");
        let e = err(
            "[[certificates]]\npem = \"a\"\n[[backends]]\naddr = \"127.0.0.1:1\"\nweight = 999\n",
        );
        assert!(e.contains("backends[0].weight: 999 is out of range"), "{e}");
        let e = err("[[certificates]]\ncert = \"a\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n");
        assert!(e.contains("certificates[0].key: missing"), "{e}");
        let e = err(
            "[[certificates]]\npem = \"a\"\ncert = \"b\"\n[[backends]]\naddr = \"127.0.0.1:1\"\n",
        );
        assert!(e.contains("certificates[0]: give either"), "{e}");
        assert!(err("[[backends]]\naddr = \"127.0.0.1:1\"\n").contains("lb.toml: certificates:"));
        assert!(err("[[certificates]]\npem = \"a\"\n").contains("lb.toml: backends:"));
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_rejected_with_the_key() {
        let e = err(&format!("{MINIMAL}\n[timeouts]\ntunel_idle = \"1h\"\n"));
        assert!(
            e.starts_with("lb.toml: ") && e.contains("tunel_idle"),
            "{e}"
        );
        let e = err(&format!("{MINIMAL}\n[health]\nrise = \"two\"\n"));
        assert!(e.starts_with("lb.toml: ") && e.contains("rise"), "{e}");
        let e = err("listen = 3\n");
        assert!(e.starts_with("lb.toml: "), "{e}");
    }

    #[test]
    fn overrides_replace_file_keys() {
        let o = Overrides {
            listen: Some("127.0.0.1:0".into()),
            backends: vec!["127.0.0.1:7001".into(), "127.0.0.1:7002".into()],
            cert: Some("c.crt".into()),
            key: Some("c.key".into()),
            admin: Some("off".into()),
            policy: Some("least-connections".into()),
            ..Overrides::default()
        };
        let c = Config::parse(MINIMAL, "lb.toml", Path::new("/etc/lb"), &o).unwrap();
        assert_eq!(c.listen.https.port(), 0);
        assert_eq!(c.listen.admin, None);
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.backends[1].name, "127.0.0.1:7002");
        assert_eq!(
            c.certificates,
            vec![CertificateSource::Pair {
                cert: "/etc/lb/c.crt".into(),
                key: "/etc/lb/c.key".into()
            }]
        );
        assert_eq!(c.policy, Policy::LeastConnections);
    }

    #[test]
    fn quick_mode_needs_backends_and_certificate_and_has_no_admin() {
        let o = Overrides {
            listen: Some("127.0.0.1:8443".into()),
            backends: vec!["127.0.0.1:7001".into()],
            pem: Some("site.pem".into()),
            ..Overrides::default()
        };
        let c = Config::from_overrides(&o).unwrap();
        assert_eq!(c.listen.admin, None);
        assert_eq!(c.source, COMMAND_LINE);
        assert_eq!(
            c.certificates,
            vec![CertificateSource::Combined {
                pem: "site.pem".into()
            }]
        );
        let e = Config::from_overrides(&Overrides {
            backends: vec![],
            ..o.clone()
        })
        .unwrap_err();
        assert!(
            e.to_string().starts_with("<command line>: backends:"),
            "{e}"
        );
        let e = Config::from_overrides(&Overrides { pem: None, ..o }).unwrap_err();
        assert!(e.to_string().contains("certificates"), "{e}");
    }

    #[test]
    fn shipped_example_is_valid() {
        let text = include_str!("../../../config/lb.toml");
        let c = Config::parse(
            text,
            "config/lb.toml",
            Path::new("config"),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.listen.admin, Some("127.0.0.1:9100".parse().unwrap()));
        assert_eq!(
            c.certificates,
            vec![CertificateSource::Combined {
                pem: "config/../run/certs/server.pem".into()
            }]
        );
    }

    #[test]
    fn mutated_files_never_panic() {
        // Deterministic xorshift mutations of the shipped example: every result is Ok or a
        // ConfigError, never a panic. The backend list is overridden so that no mutated host
        // name is ever looked up in DNS.
        let original = include_str!("../../../config/lb.toml");
        let alphabet = b"[]=\"'#.:,0123456789abcdefhs \n\\{}-_*";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..2000 {
            let mut bytes = original.as_bytes().to_vec();
            for _ in 0..(next() % 8 + 1) {
                let at = (next() as usize) % bytes.len();
                let c = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 => bytes[at] = c,
                    1 => bytes.insert(at, c),
                    _ => {
                        bytes.remove(at);
                    }
                }
            }
            let text = String::from_utf8_lossy(&bytes);
            let overrides = Overrides {
                backends: vec!["127.0.0.1:1".into()],
                ..Overrides::default()
            };
            let _ = Config::parse(&text, "fuzz.toml", Path::new("/x"), &overrides);
        }
    }

    #[test]
    fn unreadable_certificates_name_file_and_key() {
        let c = parse(MINIMAL).unwrap();
        let e = c.load_certificates().unwrap_err().to_string();
        assert!(e.starts_with("lb.toml: certificates[0].pem: "), "{e}");
        assert!(e.contains("/etc/lb/site.pem"), "{e}");
    }
}
