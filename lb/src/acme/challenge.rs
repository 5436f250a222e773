//! Challenge answers while an order is being validated: the http-01 key authorizations the
//! redirect listener serves and the tls-alpn-01 certificates the SNI resolver presents.
//!
//! The order task puts an answer in before telling the CA it is ready and takes it out when
//! the order ends; listeners only read. The maps are touched only by the CA's validation
//! requests (a `/.well-known/acme-challenge/` path, a ClientHello offering only `acme-tls/1`),
//! never by client traffic, so a mutex costs the hot path nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use rcgen::{CertificateParams, CustomExtension, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::CertifiedKey;

/// The ALPN protocol of tls-alpn-01 validation handshakes (RFC 8737).
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";

/// The path prefix of http-01 requests.
pub const HTTP_PREFIX: &str = "/.well-known/acme-challenge/";

/// Answers to the challenges under way.
#[derive(Debug, Default)]
pub struct Challenges {
    /// http-01 token → key authorization.
    http: Mutex<HashMap<String, String>>,
    /// Lower-case DNS name → its tls-alpn-01 certificate.
    tls: Mutex<HashMap<String, Arc<CertifiedKey>>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Challenges {
    /// The key authorization for http-01 `token`.
    pub fn http_answer(&self, token: &str) -> Option<String> {
        locked(&self.http).get(token).cloned()
    }

    /// The tls-alpn-01 certificate for `name`.
    pub fn tls_certificate(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        locked(&self.tls).get(&name.to_ascii_lowercase()).cloned()
    }

    /// Serves `key_authorization` for http-01 `token`.
    pub fn put_http(&self, token: &str, key_authorization: &str) {
        locked(&self.http).insert(token.to_owned(), key_authorization.to_owned());
    }

    /// Presents `certificate` to tls-alpn-01 handshakes for `name`.
    pub fn put_tls(&self, name: &str, certificate: Arc<CertifiedKey>) {
        locked(&self.tls).insert(name.to_ascii_lowercase(), certificate);
    }

    /// Stops answering for http-01 `token` and tls-alpn-01 `name`.
    pub fn remove(&self, token: &str, name: &str) {
        locked(&self.http).remove(token);
        self.remove_tls(name);
    }

    /// Stops answering tls-alpn-01 for `name`.
    pub fn remove_tls(&self, name: &str) {
        locked(&self.tls).remove(&name.to_ascii_lowercase());
    }

    /// Whether a ClientHello offering `alpn` is a tls-alpn-01 validation: it offers
    /// `acme-tls/1` and nothing else (RFC 8737, 3).
    pub fn is_validation<'a>(alpn: Option<impl Iterator<Item = &'a [u8]>>) -> bool {
        let Some(mut offered) = alpn else {
            return false;
        };
        offered.next() == Some(ACME_TLS_ALPN) && offered.next().is_none()
    }
}

/// The tls-alpn-01 certificate for `name`: self-signed, for `name` only, carrying the SHA-256
/// digest of the key authorization in the critical `acmeIdentifier` extension.
pub fn alpn_certificate(name: &str, digest: &[u8]) -> Result<Arc<CertifiedKey>, String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(der)
        .map_err(|e| e.to_string())?;
    // Not `from_der`: its key check parses the certificate with webpki, which (rightly, for a
    // served certificate) refuses the critical acmeIdentifier extension.
    Ok(Arc::new(CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_lone_acme_tls_offer_is_a_validation() {
        let v = |offer: &[&[u8]]| Challenges::is_validation(Some(offer.iter().copied()));
        assert!(v(&[ACME_TLS_ALPN]));
        assert!(!v(&[b"http/1.1"]));
        assert!(!v(&[ACME_TLS_ALPN, b"http/1.1"]));
        assert!(!v(&[b"http/1.1", ACME_TLS_ALPN]));
        assert!(!v(&[]));
        assert!(!Challenges::is_validation(None::<std::iter::Empty<&[u8]>>));
    }

    #[test]
    fn answers_are_served_until_removed() {
        let c = Challenges::default();
        c.put_http("tok", "tok.thumb");
        let cert = alpn_certificate("a.test", &[7; 32]).unwrap();
        c.put_tls("A.test", cert);
        assert_eq!(c.http_answer("tok").as_deref(), Some("tok.thumb"));
        assert!(c.tls_certificate("a.TEST").is_some());
        assert!(c.http_answer("other").is_none());
        c.remove("tok", "a.test");
        assert!(c.http_answer("tok").is_none());
        assert!(c.tls_certificate("a.test").is_none());
    }

    #[test]
    fn alpn_certificate_carries_the_digest_critically() {
        let cert = alpn_certificate("a.test", &[0xab; 32]).unwrap();
        let (_, parsed) = x509_parser::parse_x509_certificate(&cert.cert[0]).unwrap();
        // id-pe-acmeIdentifier, 1.3.6.1.5.5.7.1.31
        let ext = parsed
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == "1.3.6.1.5.5.7.1.31")
            .unwrap();
        assert!(ext.critical);
        // An OCTET STRING of the 32-byte digest.
        assert_eq!(ext.value[..2], [0x04, 0x20]);
        assert_eq!(ext.value[2..], [0xab; 32]);
    }
}
