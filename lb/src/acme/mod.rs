//! ACME (RFC 8555): certificates ordered from a CA, stored, served and renewed by lb itself.
//!
//! Sits beside the SNI resolver (`front::tls`): [`Acme`] is what the two share. The resolver
//! asks it first for a name's issued certificate (an `ArcSwap`ed map, read without a lock) and,
//! for a handshake offering only `acme-tls/1`, for the tls-alpn-01 challenge certificate; the
//! redirect listener asks it for http-01 answers. The task in `renew` fills it: at start the
//! stored certificates are installed before any listener accepts (serving never waits for the
//! CA: a name without a valid stored certificate is served the `[[certificates]]` fallback),
//! then each certificate is ordered (`order`) when missing or due, stored (`storage`) and
//! swapped in; connections already open keep the certificate they shook hands with.
//!
//! On a keepalived pair (`[acme.peer]`) the two hosts talk over `peer` (messages sealed by
//! `seal`): only the host holding the virtual address orders, the other adopts what it
//! issued, and an http-01 token a host does not know is asked of the other (README, "The
//! keepalived pair").

pub mod challenge;
pub mod order;
pub mod peer;
pub mod renew;
pub mod seal;
pub mod storage;

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

use crate::metrics::Metrics;
use challenge::Challenges;
use peer::{Peer, SharedCertificate};

/// One issued certificate as served.
#[derive(Debug)]
pub struct Served {
    /// Its configured names, the first naming it.
    pub names: Vec<String>,
    /// Chain and key for rustls.
    pub key: Arc<CertifiedKey>,
    /// Its combined PEM (chain, then key), as stored.
    pub pem: String,
    /// Validity, Unix seconds.
    pub not_before: i64,
    /// Expiry, Unix seconds.
    pub not_after: i64,
}

/// What the ACME task shares with the listeners (see the module docs).
#[derive(Debug, Default)]
pub struct Acme {
    /// Challenge answers under way.
    pub challenges: Challenges,
    /// Lower-case name → the issued certificate naming it.
    by_name: ArcSwap<HashMap<String, Arc<Served>>>,
    /// The other host of the pair, if this host is one of two.
    pub peer: Option<Arc<Peer>>,
}

impl Acme {
    /// The shared state of one host of a pair, which talks to the other through `peer`.
    pub fn paired(peer: Arc<Peer>) -> Acme {
        Acme {
            peer: Some(peer),
            ..Acme::default()
        }
    }

    /// Every issued certificate served, once each, for the peer.
    pub fn shared(&self) -> Vec<SharedCertificate> {
        let map = self.by_name.load();
        let mut shared: Vec<SharedCertificate> = Vec::new();
        for s in map.values() {
            if !shared.iter().any(|c| c.names == s.names) {
                shared.push(SharedCertificate {
                    names: s.names.clone(),
                    pem: s.pem.clone(),
                });
            }
        }
        shared
    }

    /// The issued certificate for `name`, if one names it.
    pub fn select(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        let map = self.by_name.load();
        if map.is_empty() {
            return None;
        }
        if name.bytes().any(|b| b.is_ascii_uppercase()) {
            return map
                .get(&name.to_ascii_lowercase())
                .map(|s| Arc::clone(&s.key));
        }
        map.get(name).map(|s| Arc::clone(&s.key))
    }

    /// The certificate served for the certificate set whose first name is `first`.
    pub fn served(&self, first: &str) -> Option<Arc<Served>> {
        self.by_name
            .load()
            .get(&first.to_ascii_lowercase())
            .cloned()
    }

    /// Serves `served` for its names from the next handshake on, and publishes its expiry.
    pub fn install(&self, served: Arc<Served>, metrics: &Metrics) {
        let mut map: HashMap<String, Arc<Served>> = (**self.by_name.load()).clone();
        for name in &served.names {
            map.insert(name.to_ascii_lowercase(), Arc::clone(&served));
        }
        let mut expiry: Vec<(String, i64)> = Vec::new();
        for s in map.values() {
            if let Some(first) = s.names.first()
                && !expiry.iter().any(|(n, _)| n == first)
            {
                expiry.push((first.clone(), s.not_after));
            }
        }
        self.by_name.store(Arc::new(map));
        metrics.set_certificate_expiry("acme", expiry);
    }
}

/// Validity of a DER certificate: (not before, not after) in Unix seconds.
pub fn validity(der: &CertificateDer<'_>) -> Option<(i64, i64)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = cert.validity();
    Some((v.not_before.timestamp(), v.not_after.timestamp()))
}

/// The DNS names (subject alternative names) of a DER certificate.
fn dns_names(der: &CertificateDer<'_>) -> Vec<String> {
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::DNSName(name) => Some((*name).to_owned()),
            _ => None,
        })
        .collect()
}

/// Reads a combined PEM (chain, key) into what is served, checking the key matches the leaf.
pub fn served_from_pem(names: &[String], pem: &str) -> Result<Served, String> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM: {e}"))?;
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| format!("bad key PEM: {e}"))?;
    let leaf = certs.first().ok_or("no certificate")?;
    let (not_before, not_after) = validity(leaf).ok_or("unreadable certificate")?;
    let covered = dns_names(leaf);
    if let Some(missing) = names
        .iter()
        .find(|n| !covered.iter().any(|c| c.eq_ignore_ascii_case(n)))
    {
        return Err(format!(
            "the certificate names {covered:?}, not {missing:?} (the configured domains changed)"
        ));
    }
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(certs, key, &provider).map_err(|e| e.to_string())?;
    Ok(Served {
        names: names.to_vec(),
        key: Arc::new(key),
        pem: pem.to_owned(),
        not_before,
        not_after,
    })
}
