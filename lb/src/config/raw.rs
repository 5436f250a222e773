//! The file's shape and the command line's: raw structs that mirror `lb.toml` exactly, the
//! [`Overrides`] that `lb run`'s flags put over them, and the TOML parser's errors on one line.
//!
//! TOML text → [`RawConfig`] (`deny_unknown_fields`, so a misspelt key is an error, not a
//! silent default; every key optional, so `validate` decides the defaults) → [`RawConfig::apply`]
//! with the flags → `validate`. Nothing here judges a value.

use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

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

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) listen: Option<RawListen>,
    #[serde(default)]
    pub(super) certificates: Vec<RawCertificate>,
    #[serde(default)]
    pub(super) backends: Vec<RawBackend>,
    pub(super) balance: Option<RawBalance>,
    pub(super) health: Option<RawHealth>,
    pub(super) timeouts: Option<RawTimeouts>,
    pub(super) limits: Option<RawLimits>,
    pub(super) tls: Option<RawTls>,
    pub(super) acme: Option<RawAcme>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawListen {
    pub(super) https: Option<String>,
    pub(super) redirect: Option<String>,
    pub(super) admin: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCertificate {
    pub(super) cert: Option<PathBuf>,
    pub(super) key: Option<PathBuf>,
    pub(super) pem: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackend {
    pub(super) name: Option<String>,
    pub(super) addr: Option<String>,
    pub(super) weight: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBalance {
    pub(super) policy: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHealth {
    pub(super) enabled: Option<bool>,
    pub(super) path: Option<String>,
    pub(super) expect_status: Option<i64>,
    pub(super) interval: Option<String>,
    pub(super) timeout: Option<String>,
    pub(super) rise: Option<i64>,
    pub(super) fall: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTimeouts {
    pub(super) client_header: Option<String>,
    pub(super) tls_handshake: Option<String>,
    pub(super) backend_connect: Option<String>,
    pub(super) backend_response: Option<String>,
    pub(super) backend_idle: Option<String>,
    pub(super) tunnel_idle: Option<String>,
    pub(super) drain_grace: Option<String>,
    pub(super) upgrade_grace: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub(super) max_header_bytes: Option<i64>,
    pub(super) max_uri_bytes: Option<i64>,
    pub(super) max_client_connections: Option<i64>,
    pub(super) backend_idle_connections: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTls {
    pub(super) ticket_rotation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcme {
    pub(super) directory: Option<String>,
    #[serde(default)]
    pub(super) contact: Vec<String>,
    #[serde(default)]
    pub(super) domains: Vec<Vec<String>>,
    pub(super) challenge: Option<String>,
    pub(super) storage: Option<PathBuf>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) renew_before: Option<String>,
    pub(super) peer: Option<RawAcmePeer>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAcmePeer {
    pub(super) listen: Option<String>,
    pub(super) address: Option<String>,
    pub(super) secret_file: Option<PathBuf>,
    pub(super) virtual_address: Option<String>,
}

impl RawConfig {
    /// Deserialises TOML `text`; `file` names it in errors.
    pub(super) fn from_toml(text: &str, file: &str) -> Result<RawConfig, ConfigError> {
        confkit::parse(text, file)
    }

    /// Replaces the keys `o` gives.
    pub(super) fn apply(&mut self, o: &Overrides) {
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
}
