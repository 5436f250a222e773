//! The one error type of this crate: every variant names the file or host it is about, so a
//! message reaching an operator says what to fix.

use std::io;
use std::path::PathBuf;

/// Why generating, writing or loading certificates failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A `--host` value is neither an IP address nor a valid DNS name.
    #[error("host {host:?} is not a valid DNS name or IP address")]
    InvalidHost {
        /// The host as given.
        host: String,
    },
    /// No host names were given at all.
    #[error("no host names given: a certificate needs at least one")]
    NoHosts,
    /// Key generation or signing failed inside rcgen.
    #[error("could not generate the {what}: {source}")]
    Generate {
        /// Which item was being generated ("CA certificate", "server key", ...).
        what: &'static str,
        /// The underlying error.
        source: rcgen::Error,
    },
    /// A file could not be read or its PEM could not be parsed.
    #[error("could not read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The PEM or I/O error.
        source: rustls_pki_types::pem::Error,
    },
    /// The file holds no `CERTIFICATE` section.
    #[error("{path}: no certificate found (expected a PEM \"BEGIN CERTIFICATE\" section)")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key section.
    #[error(
        "{path}: no private key found (expected a PEM \"BEGIN PRIVATE KEY\", \
         \"BEGIN EC PRIVATE KEY\" or \"BEGIN RSA PRIVATE KEY\" section)"
    )]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// The key is not usable by rustls, or does not belong to the certificate.
    #[error("{path}: the private key does not match the certificate or is unsupported: {source}")]
    KeyMismatch {
        /// The key file (or combined PEM).
        path: PathBuf,
        /// What rustls said.
        source: rustls::Error,
    },
    /// Key files already exist and overwriting them was not allowed.
    #[error("refusing to overwrite existing key files ({}); pass --force to replace them", paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    WouldOverwrite {
        /// The files that exist.
        paths: Vec<PathBuf>,
    },
    /// Creating the directory or writing a file failed.
    #[error("could not write {path}: {source}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
}
