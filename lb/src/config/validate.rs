//! Raw configuration → the typed [`Config`]: every key checked, defaults filled in, and the
//! rules across keys (listeners on distinct addresses, at least one certificate and one
//! backend, unique backend names and addresses).
//!
//! [`RawConfig::validate`] walks the raw structs in file order with a [`Validator`] that knows
//! the file's name, so each error names the file and the key (`backends[1].addr`) and says
//! what would be right. Backend host names are resolved here; certificate paths are joined to
//! the file's directory but read later (`Config::load_certificates`).

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::Path;

use confkit::Checker;

use super::raw::{
    RawBackend, RawCertificate, RawConfig, RawHealth, RawLimits, RawTimeouts, RawTls,
};
use super::{
    BackendConfig, CertificateSource, Config, ConfigError, DEFAULT_ADMIN_LISTEN,
    DEFAULT_BACKEND_CONNECT_TIMEOUT, DEFAULT_BACKEND_IDLE_CONNECTIONS,
    DEFAULT_BACKEND_IDLE_TIMEOUT, DEFAULT_BACKEND_RESPONSE_TIMEOUT, DEFAULT_CLIENT_HEADER_TIMEOUT,
    DEFAULT_DRAIN_GRACE, DEFAULT_HTTPS_LISTEN, DEFAULT_MAX_HEADER_BYTES, DEFAULT_MAX_URI_BYTES,
    DEFAULT_TICKET_ROTATION, DEFAULT_TLS_HANDSHAKE_TIMEOUT, DEFAULT_TUNNEL_IDLE_TIMEOUT,
    DEFAULT_UPGRADE_GRACE, Limits, Listen, MAX_TICKET_ROTATION, MIN_MAX_HEADER_BYTES, Timeouts,
    TlsSettings,
};
use crate::backends::balance::{MAX_WEIGHT, Policy, UnknownPolicy};
use crate::backends::health::HealthConfig;

impl RawConfig {
    /// Checks every key and produces the typed configuration; `file` names it in errors and
    /// relative certificate paths are taken from `base`.
    pub(super) fn validate(self, file: &str, base: &Path) -> Result<Config, ConfigError> {
        let v = Validator {
            check: Checker::new(file),
        };
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
                .map_err(|e: UnknownPolicy| v.err("balance.policy", e))?,
        };

        let health = v.health(self.health.unwrap_or_default())?;
        let timeouts = v.timeouts(self.timeouts.unwrap_or_default())?;
        let limits = v.limits(self.limits.unwrap_or_default())?;
        let tls = v.tls(self.tls.unwrap_or_default())?;
        let acme = self.acme.map(|a| v.acme(a, base, &bound)).transpose()?;

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
            tls,
            acme,
        })
    }
}

/// Per-key checks, each producing a [`ConfigError::Invalid`] that names `file` and the key:
/// the shared ones of [`Checker`], and lb's own.
pub(super) struct Validator<'a> {
    pub(super) check: Checker<'a>,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: impl Into<String>, reason: impl fmt::Display) -> ConfigError {
        self.check.err(key, reason)
    }

    pub(super) fn addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        self.check.addr(key, value)
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
        let interval = self
            .check
            .duration("health.interval", h.interval.as_deref(), d.interval)?;
        let timeout = self
            .check
            .duration("health.timeout", h.timeout.as_deref(), d.timeout)?;
        let rise = self.check.count("health.rise", h.rise, d.rise, 1, 1000)?;
        let fall = self.check.count("health.fall", h.fall, d.fall, 1, 1000)?;
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
            client_header: self.check.duration(
                "timeouts.client_header",
                t.client_header.as_deref(),
                DEFAULT_CLIENT_HEADER_TIMEOUT,
            )?,
            tls_handshake: self.check.duration(
                "timeouts.tls_handshake",
                t.tls_handshake.as_deref(),
                DEFAULT_TLS_HANDSHAKE_TIMEOUT,
            )?,
            backend_connect: self.check.duration(
                "timeouts.backend_connect",
                t.backend_connect.as_deref(),
                DEFAULT_BACKEND_CONNECT_TIMEOUT,
            )?,
            backend_response: self.check.duration(
                "timeouts.backend_response",
                t.backend_response.as_deref(),
                DEFAULT_BACKEND_RESPONSE_TIMEOUT,
            )?,
            backend_idle: self.check.duration(
                "timeouts.backend_idle",
                t.backend_idle.as_deref(),
                DEFAULT_BACKEND_IDLE_TIMEOUT,
            )?,
            tunnel_idle: self.check.duration(
                "timeouts.tunnel_idle",
                t.tunnel_idle.as_deref(),
                DEFAULT_TUNNEL_IDLE_TIMEOUT,
            )?,
            drain_grace: self.check.duration(
                "timeouts.drain_grace",
                t.drain_grace.as_deref(),
                DEFAULT_DRAIN_GRACE,
            )?,
            upgrade_grace: self.check.duration(
                "timeouts.upgrade_grace",
                t.upgrade_grace.as_deref(),
                DEFAULT_UPGRADE_GRACE,
            )?,
        })
    }

    fn tls(&self, t: RawTls) -> Result<TlsSettings, ConfigError> {
        let key = "tls.ticket_rotation";
        let ticket_rotation =
            self.check
                .duration(key, t.ticket_rotation.as_deref(), DEFAULT_TICKET_ROTATION)?;
        if ticket_rotation > MAX_TICKET_ROTATION {
            return Err(self.err(
                key,
                format!(
                    "{} is longer than 7 days, the longest a TLS 1.3 ticket may live",
                    confkit::show(ticket_rotation)
                ),
            ));
        }
        Ok(TlsSettings { ticket_rotation })
    }

    fn limits(&self, l: RawLimits) -> Result<Limits, ConfigError> {
        let max_header_bytes = self.check.count(
            "limits.max_header_bytes",
            l.max_header_bytes,
            DEFAULT_MAX_HEADER_BYTES as u32,
            MIN_MAX_HEADER_BYTES as u32,
            1024 * 1024,
        )? as usize;
        let max_uri_bytes = self.check.count(
            "limits.max_uri_bytes",
            l.max_uri_bytes,
            DEFAULT_MAX_URI_BYTES as u32,
            16,
            u32::from(u16::MAX) - 1,
        )? as usize;
        let max_client_connections = l
            .max_client_connections
            .map(|n| {
                self.check
                    .count("limits.max_client_connections", Some(n), 0, 1, 10_000_000)
                    .map(|n| n as usize)
            })
            .transpose()?;
        let backend_idle_connections = self.check.count(
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
