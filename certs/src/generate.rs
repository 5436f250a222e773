//! Generation of a local certificate authority and one server certificate signed by it.
//!
//! Host names go in; a [`Bundle`] of PEM text comes out: the CA certificate and key (what an
//! operator trusts once), and a server certificate whose subject alternative names cover every
//! host (DNS names and IP addresses) with its key. Keys are ECDSA P-256, which every browser and
//! TLS library accepts. Nothing is written anywhere; see `write` for that.

use std::net::IpAddr;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls_pki_types::DnsName;
use time::{Duration, OffsetDateTime};

use crate::CertError;
use crate::load::{CertChain, parse_certs, parse_chain};

/// Hosts a certificate covers when none are given: the local machine by name and by address.
pub const DEFAULT_HOSTS: &[&str] = &["localhost", "127.0.0.1"];

/// How long the local CA stays valid.
const CA_VALIDITY: Duration = Duration::days(3650);

/// How long a server certificate stays valid, in days, counted from its backdated
/// `not_before`: 825, the longest validity period that Apple platforms accept for a certificate
/// under a locally trusted CA.
pub const SERVER_VALIDITY_DAYS: i64 = 825;

/// [`SERVER_VALIDITY_DAYS`] as a duration.
const SERVER_VALIDITY: Duration = Duration::days(SERVER_VALIDITY_DAYS);

/// Backdating of `not_before`, so that a client whose clock runs slightly behind accepts it.
const CLOCK_SKEW: Duration = Duration::days(1);

/// A freshly generated CA and server certificate, as PEM text.
#[derive(Clone)]
pub struct Bundle {
    /// The CA certificate: what clients trust (`ca.crt`).
    pub ca_cert_pem: String,
    /// The CA private key (`ca.key`); only needed to sign more certificates.
    pub ca_key_pem: String,
    /// The server certificate (`server.crt`).
    pub server_cert_pem: String,
    /// The server private key (`server.key`).
    pub server_key_pem: String,
    /// The hosts the server certificate covers, in the order given.
    pub hosts: Vec<String>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Keys stay out of logs and panic messages.
        f.debug_struct("Bundle")
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

impl Bundle {
    /// The server certificate followed by its key: HAProxy's `crt` file format (`server.pem`).
    pub fn combined_pem(&self) -> String {
        format!("{}{}", self.server_cert_pem, self.server_key_pem)
    }

    /// The server certificate and key parsed into rustls types, as a server presents them.
    pub fn server_chain(&self) -> Result<CertChain, CertError> {
        parse_chain(
            self.combined_pem().as_bytes(),
            "<generated server.pem>".as_ref(),
        )
    }

    /// The CA certificate parsed into a rustls type, as a client trusts it.
    pub fn ca_der(&self) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, CertError> {
        parse_certs(self.ca_cert_pem.as_bytes(), "<generated ca.crt>".as_ref())
    }
}

/// Generates a new local CA and a server certificate for `hosts` signed by it.
///
/// Each host is an IP address (v4 or v6) or a DNS name (wildcards like `*.example.test` are
/// allowed). The first host also becomes the certificate's common name.
pub fn generate(hosts: &[String]) -> Result<Bundle, CertError> {
    let first = hosts.first().ok_or(CertError::NoHosts)?;
    let now = OffsetDateTime::now_utc();

    let ca_key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "CA key",
        source,
    })?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = rcgen::DistinguishedName::new();
    ca_params
        .distinguished_name
        .push(DnType::OrganizationName, "scaleout local CA");
    ca_params.distinguished_name.push(
        DnType::CommonName,
        format!(
            "scaleout local CA {:04}-{:02}-{:02} {:02}:{:02}:{:02}",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        ),
    );
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca_params.not_before = now - CLOCK_SKEW;
    ca_params.not_after = now + CA_VALIDITY;
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| CertError::Generate {
            what: "CA certificate",
            source,
        })?;
    let ca_cert_pem = ca_cert.pem();
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca_params, ca_key);

    let mut params = server_params(hosts)?;
    params
        .distinguished_name
        .push(DnType::CommonName, first.as_str());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - CLOCK_SKEW;
    params.not_after = params.not_before + SERVER_VALIDITY;
    let server_key = KeyPair::generate().map_err(|source| CertError::Generate {
        what: "server key",
        source,
    })?;
    let server_cert =
        params
            .signed_by(&server_key, &issuer)
            .map_err(|source| CertError::Generate {
                what: "server certificate",
                source,
            })?;

    Ok(Bundle {
        ca_cert_pem,
        ca_key_pem,
        server_cert_pem: server_cert.pem(),
        server_key_pem: server_key.serialize_pem(),
        hosts: hosts.to_vec(),
    })
}

/// Certificate parameters with one subject alternative name per host: an IP address SAN for an
/// address, a DNS SAN for a valid (possibly wildcard) DNS name, an error naming anything else.
fn server_params(hosts: &[String]) -> Result<CertificateParams, CertError> {
    let mut params = CertificateParams::default();
    for host in hosts {
        let san = if let Ok(ip) = host.parse::<IpAddr>() {
            SanType::IpAddress(ip)
        } else {
            let base = host.strip_prefix("*.").unwrap_or(host);
            DnsName::try_from(base).map_err(|_| CertError::InvalidHost { host: host.clone() })?;
            let name = Ia5String::try_from(host.as_str())
                .map_err(|_| CertError::InvalidHost { host: host.clone() })?;
            SanType::DnsName(name)
        };
        params.subject_alt_names.push(san);
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn server_certificate_covers_every_dns_host() {
        let bundle = generate(&hosts(&[
            "localhost",
            "chat.example.test",
            "127.0.0.1",
            "::1",
        ]))
        .unwrap();
        let chain = bundle.server_chain().unwrap();
        assert_eq!(chain.dns_names(), vec!["localhost", "chat.example.test"]);
        assert_eq!(bundle.hosts.len(), 4);
    }

    #[test]
    fn server_certificate_verifies_against_the_ca_for_names_and_addresses() {
        use rustls::client::danger::ServerCertVerifier;
        use rustls_pki_types::{ServerName, UnixTime};
        use std::sync::Arc;

        let bundle = generate(&hosts(&["localhost", "127.0.0.1"])).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for ca in bundle.ca_der().unwrap() {
            roots.add(ca).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        let chain = bundle.server_chain().unwrap();
        let verify = |name: &str| {
            let name = ServerName::try_from(name.to_string()).unwrap();
            verifier.verify_server_cert(&chain.certs[0], &[], &name, &[], UnixTime::now())
        };
        verify("localhost").unwrap();
        verify("127.0.0.1").unwrap();
        assert!(verify("example.com").is_err());
    }

    #[test]
    fn invalid_host_is_named() {
        for bad in ["bad host!", "-", "a..b", "*.*.x"] {
            let err = generate(&hosts(&["localhost", bad])).unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        generate(&hosts(&["*.example.test", "::1"])).unwrap();
    }

    #[test]
    fn no_hosts_is_an_error() {
        assert!(matches!(generate(&[]), Err(CertError::NoHosts)));
    }

    #[test]
    fn debug_output_hides_keys() {
        let bundle = generate(&hosts(&["localhost"])).unwrap();
        assert!(!format!("{bundle:?}").contains("PRIVATE KEY"));
    }
}
