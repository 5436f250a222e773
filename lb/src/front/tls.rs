//! TLS termination policy: the rustls server configuration and certificate selection by SNI.
//!
//! Loaded certificate chains (from `certs`) go in; an `Arc<ServerConfig>` comes out, which the
//! listener hands to each new connection's acceptor. The configuration allows TLS 1.2 and 1.3
//! only, with AEAD cipher suites over ephemeral ECDHE key exchange only (forward secrecy),
//! and offers ALPN `http/1.1`. [`SniResolver`] picks the certificate for each handshake: an
//! exact DNS-name match on the client's SNI first, then a wildcard match, and otherwise (no SNI,
//! as with an `https://10.0.0.5/` URL, or an unknown name) the first configured certificate, as
//! HAProxy does. Session tickets let returning clients resume without a full handshake; they
//! are sealed by the process's [`Tickets`] (see `tickets`), which every generation shares, so a
//! ticket survives a reload and a binary upgrade. A reload builds a whole new `ServerConfig`;
//! handshakes already under way keep the one they started with.
//!
//! With `[acme]`, the resolver asks [`Acme`] first: a name with an issued certificate gets it
//! (swapped in by the ACME task without a new generation, so open connections are untouched),
//! and a handshake offering only ALPN `acme-tls/1` (a CA's tls-alpn-01 validation) gets the
//! challenge certificate for its SNI name, or no certificate at all. `acme-tls/1` is offered
//! only when tls-alpn-01 is configured, and such a connection is closed after its handshake.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::crypto::ring::cipher_suite as suites;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SupportedCipherSuite};

use crate::acme::Acme;
use crate::acme::challenge::{ACME_TLS_ALPN, Challenges};
use crate::config::{AcmeChallenge, Config, ConfigError};
use crate::front::tickets::Tickets;
use crate::metrics::Metrics;

/// The only application protocol offered: HTTP/1.1 (WebSocket upgrades ride on it).
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Cipher suites offered, strongest first: AEAD ciphers with ECDHE key exchange only.
const CIPHER_SUITES: &[SupportedCipherSuite] = &[
    suites::TLS13_AES_128_GCM_SHA256,
    suites::TLS13_AES_256_GCM_SHA384,
    suites::TLS13_CHACHA20_POLY1305_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
    suites::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
    suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    suites::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
    suites::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
    suites::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
];

/// The crypto provider: *ring* with [`CIPHER_SUITES`] and its default (ECDHE) groups.
fn provider() -> CryptoProvider {
    CryptoProvider {
        cipher_suites: CIPHER_SUITES.to_vec(),
        ..rustls::crypto::ring::default_provider()
    }
}

/// Loads the certificates of `config` and builds the server configuration, sealing session
/// tickets with `tickets` and serving `acme`'s certificates first; the files' expiry goes to
/// `metrics`.
pub fn server_config(
    config: &Config,
    tickets: &Arc<Tickets>,
    acme: Option<&Arc<Acme>>,
    metrics: &Metrics,
) -> Result<Arc<ServerConfig>, ConfigError> {
    let chains = config.load_certificates()?;
    let provider = Arc::new(provider());
    let mut resolver = SniResolver {
        acme: acme.cloned(),
        ..SniResolver::default()
    };
    let mut expiry = Vec::new();
    for (i, chain) in chains.iter().enumerate() {
        let key = chain
            .certified_key(&provider)
            .map_err(|e| config.error(format!("certificates[{i}]"), e))?;
        let names = chain.dns_names();
        if let Some((_, not_after)) = chain.certs.first().and_then(crate::acme::validity) {
            let name = names
                .first()
                .cloned()
                .unwrap_or_else(|| format!("certificates[{i}]"));
            expiry.push((name, not_after));
        }
        resolver.add(key, &names);
    }
    metrics.set_certificate_expiry("file", expiry);
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| config.error("certificates", e))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![ALPN_HTTP11.to_vec()];
    if config
        .acme
        .as_ref()
        .is_some_and(|a| a.challenge == AcmeChallenge::TlsAlpn01)
    {
        server.alpn_protocols.push(ACME_TLS_ALPN.to_vec());
    }
    // Resumption without server-side state: returning clients (a reconnecting chat page) skip
    // the full handshake, across reloads and upgrades too (the keys outlive this config).
    server.ticketer = Arc::clone(tickets) as Arc<dyn rustls::server::ProducesTickets>;
    Ok(Arc::new(server))
}

/// Chooses a certificate by the SNI name of the ClientHello.
#[derive(Debug, Default)]
pub struct SniResolver {
    /// Certificates in configuration order; the first is the default.
    keys: Vec<Arc<CertifiedKey>>,
    /// Lower-case DNS name → index into `keys`; the first certificate naming it wins.
    exact: HashMap<String, usize>,
    /// Lower-case parent domain of a wildcard name (`*.example.com` → `example.com`) → index.
    wildcard: HashMap<String, usize>,
    /// Issued ACME certificates and challenge answers, asked first.
    acme: Option<Arc<Acme>>,
}

impl SniResolver {
    /// Adds a certificate presented for `names` (its SAN DNS names, wildcards included).
    pub fn add(&mut self, key: Arc<CertifiedKey>, names: &[String]) {
        let index = self.keys.len();
        self.keys.push(key);
        for name in names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_owned()).or_insert(index),
                None => self.exact.entry(name).or_insert(index),
            };
        }
    }

    /// The certificate for `server_name`, or the default one.
    pub fn select(&self, server_name: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        let index = server_name
            .and_then(|name| {
                let lower;
                let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
                    lower = name.to_ascii_lowercase();
                    lower.as_str()
                } else {
                    name
                };
                self.exact.get(name).copied().or_else(|| {
                    let (_, parent) = name.split_once('.')?;
                    self.wildcard.get(parent).copied()
                })
            })
            .unwrap_or(0);
        self.keys.get(index)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name();
        if Challenges::is_validation(client_hello.alpn()) {
            return self.acme.as_ref()?.challenges.tls_certificate(name?);
        }
        if let (Some(acme), Some(name)) = (&self.acme, name)
            && let Some(key) = acme.select(name)
        {
            return Some(key);
        }
        self.select(name).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(hosts: &[&str]) -> (Arc<CertifiedKey>, Vec<String>) {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let chain = certs::generate(&hosts).unwrap().server_chain().unwrap();
        let names = chain.dns_names();
        (chain.certified_key(&provider()).unwrap(), names)
    }

    #[test]
    fn selects_exact_then_wildcard_then_default() {
        let mut r = SniResolver::default();
        let (a, a_names) = key(&["default.test", "127.0.0.1"]);
        let (b, b_names) = key(&["chat.example.test"]);
        let (c, c_names) = key(&["*.example.test"]);
        r.add(a.clone(), &a_names);
        r.add(b.clone(), &b_names);
        r.add(c.clone(), &c_names);
        let pick = |name: Option<&str>| r.select(name).unwrap().clone();
        assert!(Arc::ptr_eq(&pick(Some("chat.example.test")), &b));
        assert!(Arc::ptr_eq(&pick(Some("CHAT.Example.test")), &b));
        assert!(Arc::ptr_eq(&pick(Some("other.example.test")), &c));
        assert!(Arc::ptr_eq(&pick(Some("a.b.example.test")), &a));
        assert!(Arc::ptr_eq(&pick(Some("unknown.test")), &a));
        assert!(Arc::ptr_eq(&pick(None), &a));
    }

    #[test]
    fn first_certificate_naming_a_host_wins() {
        let mut r = SniResolver::default();
        let (a, a_names) = key(&["x.test"]);
        let (b, b_names) = key(&["x.test"]);
        r.add(a.clone(), &a_names);
        r.add(b, &b_names);
        assert!(Arc::ptr_eq(r.select(Some("x.test")).unwrap(), &a));
    }

    #[test]
    fn only_aead_suites_with_forward_secrecy() {
        for suite in CIPHER_SUITES {
            let name = format!("{:?}", suite.suite());
            let tls13 = name.starts_with("TLS13_");
            let ecdhe = name.starts_with("TLS_ECDHE_");
            let aead = name.contains("_GCM_") || name.contains("CHACHA20_POLY1305");
            assert!((tls13 || ecdhe) && aead, "{name}");
        }
    }
}
