//! Loading PEM files into rustls types.
//!
//! A server needs a [`CertChain`]: the certificate chain (leaf first) and its private key. They
//! come either from two files ([`load_pair`]: `cert` + `key`, as nginx and Caddy take them) or
//! from one combined file ([`load_combined`]: certificates and key concatenated, HAProxy's `crt`
//! format). Clients need only the CA certificates ([`load_ca`]). Parsing is done by
//! `rustls_pki_types::pem`, which skips sections it does not need (a key in a certificate file,
//! a certificate in a key file), so any of these files may also be a combined one.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::CertError;

/// A certificate chain (leaf first) and the private key of its leaf.
pub struct CertChain {
    /// The chain as presented to clients, end-entity certificate first.
    pub certs: Vec<CertificateDer<'static>>,
    /// The end-entity certificate's private key.
    pub key: PrivateKeyDer<'static>,
    /// Where the key came from, for error messages.
    pub key_origin: PathBuf,
}

impl std::fmt::Debug for CertChain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertChain")
            .field("certs", &self.certs.len())
            .field("key_origin", &self.key_origin)
            .finish_non_exhaustive()
    }
}

impl CertChain {
    /// The DNS names (subject alternative names, wildcards included) of the leaf certificate,
    /// in certificate order: what SNI selection matches against.
    pub fn dns_names(&self) -> Vec<String> {
        let Some(leaf) = self.certs.first() else {
            return Vec::new();
        };
        match webpki::EndEntityCert::try_from(leaf) {
            Ok(cert) => cert.valid_dns_names().map(str::to_owned).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The chain and key as a rustls server presents them, checking that the key is usable by
    /// `provider` and belongs to the leaf certificate.
    pub fn certified_key(
        &self,
        provider: &rustls::crypto::CryptoProvider,
    ) -> Result<Arc<CertifiedKey>, CertError> {
        CertifiedKey::from_der(self.certs.clone(), self.key.clone_key(), provider)
            .map(Arc::new)
            .map_err(|source| CertError::KeyMismatch {
                path: self.key_origin.clone(),
                source,
            })
    }
}

/// Loads a certificate chain from `cert` and its private key from `key`.
pub fn load_pair(cert: &Path, key: &Path) -> Result<CertChain, CertError> {
    let certs = parse_certs(&read(cert)?, cert)?;
    let key_der = parse_key(&read(key)?, key)?;
    Ok(CertChain {
        certs,
        key: key_der,
        key_origin: key.to_path_buf(),
    })
}

/// Loads a certificate chain and its private key from one combined PEM file (HAProxy `crt`).
pub fn load_combined(pem: &Path) -> Result<CertChain, CertError> {
    parse_chain(&read(pem)?, pem)
}

/// Loads every certificate in a PEM file, typically a CA a client should trust.
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certs(&read(path)?, path)
}

/// Parses certificates and key from one PEM text; `origin` names it in errors.
pub(crate) fn parse_chain(pem: &[u8], origin: &Path) -> Result<CertChain, CertError> {
    Ok(CertChain {
        certs: parse_certs(pem, origin)?,
        key: parse_key(pem, origin)?,
        key_origin: origin.to_path_buf(),
    })
}

/// Parses every `CERTIFICATE` section of a PEM text, in order.
pub(crate) fn parse_certs(
    pem: &[u8],
    origin: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Read {
            path: origin.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: origin.to_path_buf(),
        });
    }
    Ok(certs)
}

/// Parses the first private key (PKCS#8, SEC1 or PKCS#1) of a PEM text.
fn parse_key(pem: &[u8], origin: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| match source {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPrivateKey {
            path: origin.to_path_buf(),
        },
        source => CertError::Read {
            path: origin.to_path_buf(),
            source,
        },
    })
}

/// Reads a whole file, naming it on failure.
fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|e| CertError::Read {
        path: path.to_path_buf(),
        source: rustls_pki_types::pem::Error::Io(e),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generate;

    fn provider() -> rustls::crypto::CryptoProvider {
        rustls::crypto::ring::default_provider()
    }

    #[test]
    fn combined_pem_in_either_order_loads_and_matches() {
        let bundle = generate(&["localhost".to_string()]).unwrap();
        let key_first = format!("{}{}", bundle.server_key_pem, bundle.server_cert_pem);
        for text in [bundle.combined_pem(), key_first] {
            let chain = parse_chain(text.as_bytes(), "x.pem".as_ref()).unwrap();
            assert_eq!(chain.certs.len(), 1);
            chain.certified_key(&provider()).unwrap();
        }
    }

    #[test]
    fn chain_with_intermediate_keeps_order() {
        let bundle = generate(&["localhost".to_string()]).unwrap();
        let text = format!(
            "{}{}{}",
            bundle.server_cert_pem, bundle.ca_cert_pem, bundle.server_key_pem
        );
        let chain = parse_chain(text.as_bytes(), "x.pem".as_ref()).unwrap();
        assert_eq!(chain.certs.len(), 2);
        assert_eq!(chain.certs[1], bundle.ca_der().unwrap()[0]);
    }

    #[test]
    fn missing_key_and_missing_certificate_are_named() {
        let bundle = generate(&["localhost".to_string()]).unwrap();
        let err =
            parse_chain(bundle.server_cert_pem.as_bytes(), "only-cert.pem".as_ref()).unwrap_err();
        assert!(matches!(err, CertError::NoPrivateKey { .. }));
        assert!(err.to_string().contains("only-cert.pem"), "{err}");
        let err =
            parse_chain(bundle.server_key_pem.as_bytes(), "only-key.pem".as_ref()).unwrap_err();
        assert!(matches!(err, CertError::NoCertificate { .. }));
        assert!(err.to_string().contains("only-key.pem"), "{err}");
    }

    #[test]
    fn key_of_another_certificate_is_rejected() {
        let a = generate(&["localhost".to_string()]).unwrap();
        let b = generate(&["localhost".to_string()]).unwrap();
        let text = format!("{}{}", a.server_cert_pem, b.server_key_pem);
        let chain = parse_chain(text.as_bytes(), "mixed.pem".as_ref()).unwrap();
        let err = chain.certified_key(&provider()).unwrap_err();
        assert!(matches!(err, CertError::KeyMismatch { .. }), "{err}");
    }

    #[test]
    fn garbage_and_missing_files_are_errors_not_panics() {
        let err = parse_chain(b"-----BEGIN CERTIFICATE-----\n!!!\n", "bad.pem".as_ref());
        assert!(err.is_err());
        let err = load_combined("/nonexistent/scaleout/server.pem".as_ref()).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/scaleout/server.pem"),
            "{err}"
        );
    }
}
