//! Configuration: `lb.toml` and command-line overrides → one validated [`Config`].
//!
//! Data flows in three steps. `raw` deserialises the TOML text into raw structs that mirror the
//! file exactly (`deny_unknown_fields`, so a misspelt key is an error, not a silent default);
//! [`Overrides`] from the command line (quick mode) replace keys of that raw form; then
//! `validate` checks every key and every cross-key rule and produces the typed [`Config`] the
//! engine runs on (socket addresses, durations, resolved paths). This module holds the typed
//! configuration, its documented defaults and errors, and the entry points ([`Config::load`],
//! [`Config::parse`], [`Config::from_overrides`]). Every error names the file, the
//! key and what is wrong. Certificate files are read later, by `tls`, so that `lb check` and a
//! reload report unreadable certificates with the same file-and-key naming
//! ([`Config::load_certificates`]).

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backends::balance::Policy;
use crate::backends::health::HealthConfig;

mod acme;
mod acme_peer;
mod raw;
mod validate;

pub use acme::{AcmeChallenge, AcmeConfig, check_storage};
pub use acme_peer::{AcmePeerConfig, MIN_SECRET_BYTES, read_secret};

pub use confkit::ConfigError;
pub use raw::Overrides;
use raw::{RawConfig, RawListen};

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
/// How long the old process keeps its connections and tunnels after a binary upgrade.
pub const DEFAULT_UPGRADE_GRACE: Duration = Duration::from_secs(300);
/// How often the TLS session ticket key rotates (a ticket resumes for one to two periods).
pub const DEFAULT_TICKET_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// The longest ticket rotation period: a ticket lives one period, and TLS 1.3 allows no more
/// than 7 days (RFC 8446, 4.6.1).
pub const MAX_TICKET_ROTATION: Duration = Duration::from_secs(7 * 24 * 3600);
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
    /// TLS settings beyond the certificates.
    pub tls: TlsSettings,
    /// Certificates ordered from an ACME CA (`[acme]`), if any.
    pub acme: Option<AcmeConfig>,
}

/// TLS settings beyond the certificates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlsSettings {
    /// How often the session ticket key rotates; a ticket resumes for at least one period and
    /// never after two.
    pub ticket_rotation: Duration,
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
    /// How long the old process keeps its connections and tunnels after handing its
    /// listeners to a new one (binary upgrade) before closing them.
    pub upgrade_grace: Duration,
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

/// The file name used in messages when there is no file.
pub const COMMAND_LINE: &str = "<command line>";

impl Config {
    /// Reads, parses and validates `path`, applying `overrides`.
    pub fn load(path: &Path, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = confkit::read(path)?;
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
        let mut raw = RawConfig::from_toml(text, file)?;
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
        assert_eq!(c.timeouts.upgrade_grace, DEFAULT_UPGRADE_GRACE);
        assert_eq!(c.tls.ticket_rotation, DEFAULT_TICKET_ROTATION);
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
            upgrade_grace = "30m"

            [limits]
            max_header_bytes = 32768
            max_uri_bytes = 4096
            max_client_connections = 500
            backend_idle_connections = 4

            [tls]
            ticket_rotation = "6h"
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
        assert_eq!(c.timeouts.upgrade_grace, Duration::from_secs(1800));
        assert_eq!(c.tls.ticket_rotation, Duration::from_secs(6 * 3600));
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
                "[timeouts]\nupgrade_grace = \"soon\"\n",
                "lb.toml: timeouts.upgrade_grace: \"soon\" is not a duration",
            ),
            (
                "[tls]\nticket_rotation = \"0s\"\n",
                "lb.toml: tls.ticket_rotation: must be greater than zero",
            ),
            (
                "[tls]\nticket_rotation = \"30d\"\n",
                "lb.toml: tls.ticket_rotation: 30days is longer than 7 days",
            ),
            ("[tls]\nrotation = \"1h\"\n", "unknown field `rotation`"),
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
