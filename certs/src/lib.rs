//! Certificates for scaleout: generate a local CA and server certificates, and load PEM files
//! (separate or HAProxy-style combined) into rustls types. This crate never touches the network.
//!
//! Data flows one way per job: [`generate`] turns a list of host names into a [`Bundle`] of PEM
//! text, which [`Bundle::write_to`] stores in a directory (key files mode 0600); [`load_pair`]
//! and [`load_combined`] read PEM files back into a [`CertChain`] (DER certificates plus key),
//! which [`CertChain::certified_key`] turns into what a rustls server presents.

mod error;
mod generate;
mod load;
mod write;

pub use error::CertError;
pub use generate::{Bundle, DEFAULT_HOSTS, SERVER_VALIDITY_DAYS, generate};
pub use load::{CertChain, load_ca, load_combined, load_pair};
pub use write::{FileNames, Written};
