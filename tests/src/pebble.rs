//! A real ACME CA for tests: Debian's Pebble (Let's Encrypt's test CA) validating challenges
//! for real, with `pebble-challtestsrv` as its DNS server answering 127.0.0.1 for every name.
//!
//! [`Pebble::start`] writes Pebble's config (its HTTPS certificate from `lb certs generate`,
//! ports picked free on loopback: Pebble needs fixed numbers in its JSON), starts the DNS
//! server and then Pebble, and waits for their readiness lines. Validation connects to the
//! names' address (127.0.0.1) on the `http_port`/`tls_port` given, where the test's lb
//! listens. Random validation sleeps are off, every nonce is honoured and no authorization is
//! reused, so each order validates every name anew. [`Pebble::root`] fetches the (per-run)
//! root of the chains Pebble issues from its management interface.
//!
//! For the keepalived pair's test, Pebble and its DNS server run on a namespace host instead
//! ([`PebbleOptions::netns`]), listening on that host's address, and the names resolve to the
//! pair's virtual address ([`PebbleOptions::names_at`]). [`handshake`] and [`client_trusting`]
//! check what an lb host serves.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::stack::generate_certs;
use testkit::process::{Proc, Ready, system_bin};
use testkit::redis::free_port;

/// What a Pebble is started with.
#[derive(Debug, Clone)]
pub struct PebbleOptions {
    /// Port of Pebble's ACME listener (the directory is `https://127.0.0.1:PORT/dir`).
    pub listen: u16,
    /// Where http-01 validation connects (lb's redirect listener).
    pub http_port: u16,
    /// Where tls-alpn-01 validation connects (lb's https listener).
    pub tls_port: u16,
    /// Lifetime of issued certificates in seconds (Pebble's default: five years).
    pub validity: Option<u64>,
    /// The network namespace (a `netns::Lab` host) Pebble runs in; `None`: this one.
    pub netns: Option<String>,
    /// Where Pebble's listeners bind (127.0.0.1, or the namespace host's address).
    pub address: IpAddr,
    /// The address every name resolves to, where validation connects.
    pub names_at: IpAddr,
}

impl PebbleOptions {
    /// Pebble on this host's loopback, validating on loopback ports `http_port`, `tls_port`.
    pub fn local(listen: u16, http_port: u16, tls_port: u16, validity: Option<u64>) -> Self {
        PebbleOptions {
            listen,
            http_port,
            tls_port,
            validity,
            netns: None,
            address: Ipv4Addr::LOCALHOST.into(),
            names_at: Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// A command running `program` where Pebble runs.
    fn command(&self, program: &Path) -> Command {
        match &self.netns {
            Some(ns) => crate::netns::Lab::command(ns, program),
            None => Command::new(program),
        }
    }
}

/// A running Pebble and its DNS server, stopped when dropped.
pub struct Pebble {
    _ca: Proc,
    _dns: Proc,
    /// The ACME directory URL.
    pub directory: String,
    /// The management interface (roots, certificate status).
    pub management: SocketAddr,
    /// The CA certificate that Pebble's own HTTPS certificate chains to (`ca_file`).
    pub ca_file: PathBuf,
}

impl Pebble {
    /// Starts the DNS server and Pebble with `options`, its files in `dir`.
    pub async fn start(dir: &Path, options: PebbleOptions) -> Result<Pebble> {
        let pebble = system_bin("pebble", "pebble")?;
        let challtestsrv = system_bin("pebble-challtestsrv", "pebble")?;
        let certs = dir.join("pebble-certs");
        if !certs.join("server.crt").exists() {
            let address = options.address.to_string();
            generate_certs(&certs, &["localhost", "127.0.0.1", &address]).await?;
        }
        let dns_port = free_port()?;
        let management = SocketAddr::new(options.address, free_port()?);
        let mut validity = String::new();
        if let Some(secs) = options.validity {
            validity = format!(",\n    \"certificateValidityPeriod\": {secs}");
        }
        let config = format!(
            r#"{{
  "pebble": {{
    "listenAddress": "{address}",
    "managementListenAddress": "{management}",
    "certificate": "{cert}",
    "privateKey": "{key}",
    "httpPort": {http},
    "tlsPort": {tls},
    "ocspResponderURL": "",
    "externalAccountBindingRequired": false{validity}
  }}
}}
"#,
            address = SocketAddr::new(options.address, options.listen),
            cert = certs.join("server.crt").display(),
            key = certs.join("server.key").display(),
            http = options.http_port,
            tls = options.tls_port,
        );
        let config_file = dir.join(format!("pebble-{}.json", options.listen));
        std::fs::write(&config_file, config)?;

        let mut dns = options.command(&challtestsrv);
        dns.args(["-dns01", &format!("127.0.0.1:{dns_port}")])
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""])
            .args(["-management", &format!("127.0.0.1:{}", free_port()?)])
            .args([
                "-defaultIPv4",
                &options.names_at.to_string(),
                "-defaultIPv6",
                "",
            ]);
        let dns = Proc::spawn(
            "pebble-challtestsrv",
            dns,
            Ready::Line("Starting challenge servers"),
        )
        .await?;

        let mut ca = options.command(&pebble);
        ca.arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &format!("127.0.0.1:{dns_port}")])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        let ca = Proc::spawn("pebble", ca, Ready::Line("ACME directory available at")).await?;
        Ok(Pebble {
            _ca: ca,
            _dns: dns,
            directory: format!(
                "https://{}/dir",
                SocketAddr::new(options.address, options.listen)
            ),
            management,
            ca_file: certs.join("ca.crt"),
        })
    }

    /// The root certificate of the chains this Pebble issues.
    pub async fn root(&self) -> Result<CertificateDer<'static>> {
        let body = https_get(self.management, &self.ca_file, "/roots/0").await?;
        CertificateDer::from_pem_slice(body.as_bytes()).context("no root certificate from Pebble")
    }
}

/// `GET path` over HTTPS (HTTP/1.0, so the body is not chunked) from `addr`, trusting
/// `ca_file`: the body.
async fn https_get(addr: SocketAddr, ca_file: &Path, path: &str) -> Result<String> {
    let connector = crate::client::tls_connector(ca_file)?;
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost")?;
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow!("GET {path} on {addr} timed out"))??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad answer to GET {path}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {head}");
    }
    Ok(body.to_owned())
}

/// A TLS handshake with the lb at `addr` for `name`, verifying the chain against `config`'s
/// roots: the chain it presented, and the connection.
pub async fn handshake(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<(
    Vec<CertificateDer<'static>>,
    tokio_rustls::client::TlsStream<TcpStream>,
)> {
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from(name.to_owned())?, tcp)
        .await
        .with_context(|| format!("TLS handshake with {addr} for {name}"))?;
    let chain = tls
        .get_ref()
        .1
        .peer_certificates()
        .ok_or_else(|| anyhow!("no certificate from {addr}"))?
        .to_vec();
    Ok((chain, tls))
}

/// A TLS client configuration trusting only `root`, for checking what lb serves: every
/// handshake is a full one (a resumed session would report the certificate of the session it
/// resumes, not the one served now).
pub fn client_trusting(root: CertificateDer<'static>) -> Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let mut config = config;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
