//! ACME on one lb host, against a real ACME CA (Pebble, validating every challenge for real):
//! issuance over tls-alpn-01 and over http-01 with the chain verified against Pebble's root, a
//! restart that reuses the stored account and certificate, renewal under open WebSocket
//! tunnels, a CA that is down at start, a CA answering garbage or a problem document, the
//! configuration errors `lb check` reports, and the pair's validations answered by the host
//! that is not ordering (the pair itself, with keepalived, is `ha_pair_acme.rs`).

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::Command;
use tokio_tungstenite::tungstenite::Message;

use testkit::http::http_get;
use testkit::process::{Proc, Ready, workspace_bin};
use testkit::redis::free_port;
use testkit::wait::eventually;
use tests::pebble::{Pebble, PebbleOptions, client_trusting, handshake};
use tests::stack::{generate_certs, lb_acme_orders, lb_metric};

/// The certificate lb orders in these tests: two names, both resolving to 127.0.0.1.
const NAMES: [&str; 2] = ["chat.acme.test", "www.acme.test"];

/// How long an issuance may take (Pebble validates at once; lb retries after 2 s, 4 s, ...).
const ISSUED_WITHIN: Duration = Duration::from_secs(60);

/// One lb host: its ports (fixed before start: Pebble's config names them), a fallback
/// certificate and a WebSocket echo backend.
struct Site {
    dir: TempDir,
    https: u16,
    redirect: u16,
    backend: SocketAddr,
}

impl Site {
    async fn new() -> Result<Site> {
        let dir = tempfile::tempdir()?;
        // The fallback covers the names too: a client verifying it against its own CA proves
        // that the fallback, not a Pebble certificate, answered.
        let fallback = ["fallback.test", NAMES[0], NAMES[1], "127.0.0.1"];
        generate_certs(&dir.path().join("fallback"), &fallback).await?;
        let backend = echo_backend().await?;
        Ok(Site {
            dir,
            https: free_port()?,
            redirect: free_port()?,
            backend,
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn storage(&self) -> PathBuf {
        self.path("acme")
    }

    /// Pebble validating on this site's ports.
    async fn pebble(&self, listen: u16, validity: Option<u64>) -> Result<Pebble> {
        let options = PebbleOptions::local(listen, self.redirect, self.https, validity);
        Pebble::start(self.dir.path(), options).await
    }

    /// lb's configuration with `[acme]` lines `acme`.
    fn config(&self, acme: &str) -> Result<PathBuf> {
        let text = format!(
            r#"[listen]
https = "127.0.0.1:{https}"
redirect = "127.0.0.1:{redirect}"
admin = "127.0.0.1:0"

[[certificates]]
pem = "fallback/server.pem"

[[backends]]
addr = "{backend}"

[health]
enabled = false

[acme]
{acme}
"#,
            https = self.https,
            redirect = self.redirect,
            backend = self.backend,
        );
        let path = self.path("lb.toml");
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The `[acme]` lines for `pebble` (or a CA at `directory` trusting `ca_file`).
    fn acme(&self, directory: &str, ca_file: &Path, challenge: &str, extra: &str) -> String {
        format!(
            "directory = \"{directory}\"\ncontact = [\"mailto:ops@acme.test\"]\n\
             domains = [[\"{}\", \"{}\"]]\nchallenge = \"{challenge}\"\nstorage = \"acme\"\n\
             ca_file = \"{}\"\n{extra}",
            NAMES[0],
            NAMES[1],
            ca_file.display()
        )
    }

    async fn start_lb(&self, config: &Path) -> Result<Proc> {
        let mut cmd = Command::new(workspace_bin("lb")?);
        cmd.arg("run").arg("--config").arg(config);
        Proc::spawn("lb", cmd, Ready::Listening(&["https", "admin"])).await
    }
}

/// A WebSocket echo server standing in for the chat backend.
async fn echo_backend() -> Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() && ws.send(msg).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    Ok(addr)
}

/// Waits until lb has `n` successful orders.
async fn issued(admin: SocketAddr, n: f64) -> Result<()> {
    eventually(
        &format!("{n} ACME orders to succeed"),
        ISSUED_WITHIN,
        || async move { Ok(lb_acme_orders(admin, "ok").await? >= n) },
    )
    .await
}

/// lb's loopback address on `port`.
fn at(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The fallback certificate lb serves before ACME: `[[certificates]]`, trusted through its CA.
async fn fallback_config(site: &Site) -> Result<Arc<rustls::ClientConfig>> {
    let ca = CertificateDer::from_pem_file(site.path("fallback/ca.crt"))?;
    client_trusting(ca)
}

/// A WebSocket tunnel through lb over a verified TLS connection for `name`.
async fn tunnel(
    port: u16,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>> {
    let (_, tls) = handshake(at(port), name, config).await?;
    let (ws, _) = tokio_tungstenite::client_async(format!("wss://{name}/ws"), tls).await?;
    Ok(ws)
}

async fn echo<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>, text: &str) -> Result<()>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await?;
    let answer = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .map_err(|_| anyhow!("no echo of {text:?}"))?
        .ok_or_else(|| anyhow!("tunnel closed"))??;
    if answer.to_text()? != text {
        bail!("echo of {text:?} was {answer:?}");
    }
    Ok(())
}

#[tokio::test]
async fn tls_alpn_01_issues_a_chain_pebble_verifies_and_a_restart_reuses_it() -> Result<()> {
    let site = Site::new().await?;
    let pebble = site.pebble(free_port()?, None).await?;
    let config = site.config(&site.acme(&pebble.directory, &pebble.ca_file, "tls-alpn-01", ""))?;
    let mut lb = site.start_lb(&config).await?;
    let admin = lb.addr("admin");
    issued(admin, 1.0).await?;

    let trusting_pebble = client_trusting(pebble.root().await?)?;
    let mut served = Vec::new();
    for name in NAMES {
        let (chain, _) = handshake(at(site.https), name, Arc::clone(&trusting_pebble)).await?;
        assert!(chain.len() >= 2, "the chain includes Pebble's intermediate");
        served.push(chain[0].clone());
    }
    assert_eq!(served[0], served[1], "one certificate for both names");
    let expiry = lb_metric(
        admin,
        &format!(
            "lb_certificate_not_after_seconds{{name=\"{}\",source=\"acme\"}}",
            NAMES[0]
        ),
    )
    .await?;
    assert!(expiry > 0.0, "the issued certificate's expiry is exported");
    let account = std::fs::read(site.storage().join("account.json"))?;
    let mode = std::fs::metadata(site.storage())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    let cert_file = site.storage().join(format!("{}.pem", NAMES[0]));
    let mode = std::fs::metadata(&cert_file)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);

    // Restart: the stored account and certificate are used, nothing is ordered.
    lb.terminate(Duration::from_secs(15)).await?;
    let lb = site.start_lb(&config).await?;
    let admin = lb.addr("admin");
    let (chain, _) = handshake(at(site.https), NAMES[0], Arc::clone(&trusting_pebble)).await?;
    assert_eq!(
        chain[0], served[0],
        "the stored certificate is served at once"
    );
    assert_eq!(lb_acme_orders(admin, "ok").await?, 0.0);
    assert_eq!(lb_acme_orders(admin, "failed").await?, 0.0);
    assert_eq!(std::fs::read(site.storage().join("account.json"))?, account);
    Ok(())
}

#[tokio::test]
async fn http_01_issues_through_the_redirect_listener() -> Result<()> {
    let site = Site::new().await?;
    let pebble = site.pebble(free_port()?, None).await?;
    let config = site.config(&site.acme(&pebble.directory, &pebble.ca_file, "http-01", ""))?;
    let lb = site.start_lb(&config).await?;
    let admin = lb.addr("admin");

    // Before issuance the fallback answers the name.
    let (chain, _) = handshake(at(site.https), NAMES[0], fallback_config(&site).await?)
        .await
        .or_else(|_| -> Result<_> { bail!("the fallback must serve before issuance") })?;
    assert!(!chain.is_empty());

    issued(admin, 1.0).await?;
    let trusting_pebble = client_trusting(pebble.root().await?)?;
    let mut ws = tunnel(site.https, NAMES[1], trusting_pebble).await?;
    echo(&mut ws, "over a Pebble certificate").await?;
    // Other paths on the redirect listener still redirect; unknown tokens are 404.
    let redirect = SocketAddr::from(([127, 0, 0, 1], site.redirect));
    assert_eq!(http_get(redirect, "/").await?.status, 301);
    assert_eq!(
        http_get(redirect, "/.well-known/acme-challenge/unknown")
            .await?
            .status,
        404
    );
    Ok(())
}

#[tokio::test]
async fn renewal_swaps_the_certificate_under_open_tunnels() -> Result<()> {
    const TUNNELS: usize = 20;
    let site = Site::new().await?;
    // 30-second certificates: renewed when a third of the lifetime is left, every 20 s.
    let pebble = site.pebble(free_port()?, Some(30)).await?;
    let config = site.config(&site.acme(&pebble.directory, &pebble.ca_file, "tls-alpn-01", ""))?;
    let lb = site.start_lb(&config).await?;
    let admin = lb.addr("admin");
    issued(admin, 1.0).await?;
    let trusting_pebble = client_trusting(pebble.root().await?)?;
    let (first, _) = handshake(at(site.https), NAMES[0], Arc::clone(&trusting_pebble)).await?;

    let mut tunnels = Vec::new();
    for _ in 0..TUNNELS {
        tunnels.push(tunnel(site.https, NAMES[0], Arc::clone(&trusting_pebble)).await?);
    }
    issued(admin, 2.0).await?;
    let (second, _) = handshake(at(site.https), NAMES[0], Arc::clone(&trusting_pebble)).await?;
    assert_ne!(
        first[0], second[0],
        "a renewed certificate is served to new handshakes"
    );
    for (i, ws) in tunnels.iter_mut().enumerate() {
        echo(ws, &format!("tunnel {i} after the renewal")).await?;
    }
    assert_eq!(
        lb_metric(admin, "lb_tunnels_active").await?,
        TUNNELS as f64,
        "no tunnel was dropped"
    );
    Ok(())
}

#[tokio::test]
async fn a_ca_down_at_start_leaves_the_fallback_until_it_is_back() -> Result<()> {
    let site = Site::new().await?;
    let listen = free_port()?;
    // The CA's files exist (ca_file) but nothing listens on its port yet.
    let certs = site.path("pebble-certs");
    generate_certs(&certs, &["localhost", "127.0.0.1"]).await?;
    let directory = format!("https://127.0.0.1:{listen}/dir");
    let config = site.config(&site.acme(&directory, &certs.join("ca.crt"), "tls-alpn-01", ""))?;
    let lb = site.start_lb(&config).await?;
    let admin = lb.addr("admin");

    let (chain, _) = handshake(at(site.https), NAMES[0], fallback_config(&site).await?).await?;
    assert!(
        !chain.is_empty(),
        "the fallback serves while the CA is down"
    );
    eventually("an order to fail", ISSUED_WITHIN, || async move {
        Ok(lb_acme_orders(admin, "failed").await? >= 1.0)
    })
    .await?;

    let pebble = site.pebble(listen, None).await?;
    issued(admin, 1.0).await?;
    handshake(
        at(site.https),
        NAMES[0],
        client_trusting(pebble.root().await?)?,
    )
    .await?;
    Ok(())
}

/// The pair's `[acme.peer]` lines for `site`: its peer listener on loopback port `listen`, the
/// other's on `address`, `virtual_address`, and the shared secret in a 0600 file.
fn peer_section(site: &Site, listen: u16, address: u16, virtual_address: &str) -> Result<String> {
    let secret = site.path("peer.secret");
    std::fs::write(&secret, "the secret the two lb hosts share, 32+ bytes\n")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
    Ok(format!(
        "[acme.peer]\nlisten = \"127.0.0.1:{listen}\"\naddress = \"127.0.0.1:{address}\"\n\
         virtual_address = \"{virtual_address}\"\nsecret_file = \"peer.secret\"\n"
    ))
}

/// Two lb hosts on loopback as a pair with `challenge`: A's peer listener on `ports[0]`, B's on
/// `ports[1]`, their virtual addresses `vips`, Pebble validating on B's ports when
/// `validated_on_b` (else A's), A started first. A is issued the certificate with no failed
/// order; B adopts it without ordering and serves the same leaf; both report `holders`.
async fn pair_orders_once(
    challenge: &str,
    ports: [u16; 2],
    vips: [&str; 2],
    validated_on_b: bool,
    holders: [f64; 2],
) -> Result<()> {
    let (a, b) = (Site::new().await?, Site::new().await?);
    let validated = if validated_on_b { &b } else { &a };
    let pebble = validated.pebble(free_port()?, None).await?;
    let acme =
        |site: &Site, peer: String| site.acme(&pebble.directory, &pebble.ca_file, challenge, &peer);
    let config_a = a.config(&acme(&a, peer_section(&a, ports[0], ports[1], vips[0])?))?;
    let config_b = b.config(&acme(&b, peer_section(&b, ports[1], ports[0], vips[1])?))?;
    let lb_a = a.start_lb(&config_a).await?;
    let lb_b = b.start_lb(&config_b).await?;
    let (admin_a, admin_b) = (lb_a.addr("admin"), lb_b.addr("admin"));
    issued(admin_a, 1.0).await?;
    eventually("B to adopt A's certificate", ISSUED_WITHIN, || async move {
        Ok(lb_metric(admin_b, "lb_acme_peer_adopted_total").await? >= 1.0)
    })
    .await?;
    let trusting_pebble = client_trusting(pebble.root().await?)?;
    let (on_a, _) = handshake(at(a.https), NAMES[1], Arc::clone(&trusting_pebble)).await?;
    let (on_b, _) = handshake(at(b.https), NAMES[1], Arc::clone(&trusting_pebble)).await?;
    assert_eq!(on_a[0], on_b[0], "{challenge}: B serves A's certificate");
    assert_eq!(lb_acme_orders(admin_a, "failed").await?, 0.0, "{challenge}");
    assert_eq!(
        lb_acme_orders(admin_b, "ok").await?,
        0.0,
        "{challenge}: B ordered"
    );
    assert_eq!(
        lb_acme_orders(admin_b, "failed").await?,
        0.0,
        "{challenge}: B ordered"
    );
    assert_eq!(lb_metric(admin_a, "lb_acme_holder").await?, holders[0]);
    assert_eq!(lb_metric(admin_b, "lb_acme_holder").await?, holders[1]);
    Ok(())
}

/// A pair on loopback: lb A holds the virtual address (127.0.0.1, one of this host's) and
/// orders; lb B's (192.0.2.1) is elsewhere, so it does not. Pebble's validation connections
/// go to B, as when the address moved to B while A was validating: B answers an http-01 token
/// by asking A, and a tls-alpn-01 handshake with the answer A handed it in advance.
#[tokio::test]
async fn a_validation_reaching_the_pairs_other_host_is_answered() -> Result<()> {
    for challenge in ["http-01", "tls-alpn-01"] {
        let ports = [free_port()?, free_port()?];
        pair_orders_once(
            challenge,
            ports,
            ["127.0.0.1", "192.0.2.1"],
            true,
            [1.0, 0.0],
        )
        .await?;
    }
    Ok(())
}

/// A split brain in which the hosts still talk: both hold the virtual address (127.0.0.1). B
/// sees in A's answer that A holds it too, and A's peer address is the lower, so only A
/// orders; B adopts its certificate.
#[tokio::test]
async fn in_a_split_brain_only_the_lower_peer_address_orders() -> Result<()> {
    let (x, y) = (free_port()?, free_port()?);
    let ports = [x.min(y), x.max(y)];
    pair_orders_once(
        "http-01",
        ports,
        ["127.0.0.1", "127.0.0.1"],
        false,
        [1.0, 1.0],
    )
    .await
}

/// A CA at `addr` that answers every request with `answer` (status line, headers and body).
async fn fake_ca(certs: &Path, answer: &'static str) -> Result<SocketAddr> {
    let pem = std::fs::read(certs.join("server.pem"))?;
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<_, _>>()?;
    let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&pem)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    Ok(addr)
}

#[tokio::test]
async fn a_ca_answering_garbage_or_a_problem_document_fails_and_keeps_the_fallback() -> Result<()> {
    const GARBAGE: &str =
        "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\nconnection: close\r\n\r\n<html>nope";
    const PROBLEM: &str = "HTTP/1.1 503 Service Unavailable\r\n\
        content-type: application/problem+json\r\nconnection: close\r\n\r\n\
        {\"type\":\"urn:ietf:params:acme:error:serverInternal\",\"detail\":\"the CA is down for maintenance\",\"status\":503}";
    for answer in [GARBAGE, PROBLEM] {
        let site = Site::new().await?;
        let certs = site.path("ca-certs");
        generate_certs(&certs, &["localhost", "127.0.0.1"]).await?;
        let ca = fake_ca(&certs, answer).await?;
        let directory = format!("https://127.0.0.1:{}/dir", ca.port());
        let config =
            site.config(&site.acme(&directory, &certs.join("ca.crt"), "tls-alpn-01", ""))?;
        let lb = site.start_lb(&config).await?;
        let admin = lb.addr("admin");
        eventually("an order to fail", ISSUED_WITHIN, || async move {
            Ok(lb_acme_orders(admin, "failed").await? >= 1.0)
        })
        .await?;
        assert_eq!(lb_acme_orders(admin, "ok").await?, 0.0);
        let (chain, _) = handshake(at(site.https), NAMES[0], fallback_config(&site).await?).await?;
        assert!(!chain.is_empty(), "the fallback keeps serving");
    }
    Ok(())
}

/// `lb check` on `[acme]` lines: its exit status and stderr.
async fn check(site: &Site, acme: &str) -> Result<(i32, String)> {
    let config = site.config(acme)?;
    let out = Command::new(workspace_bin("lb")?)
        .arg("check")
        .arg("--config")
        .arg(&config)
        .output()
        .await?;
    Ok((
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

#[tokio::test]
async fn lb_check_names_the_key_of_bad_acme_input() -> Result<()> {
    let site = Site::new().await?;
    let certs = site.path("ca-certs");
    generate_certs(&certs, &["localhost"]).await?;
    let ca = certs.join("ca.crt");
    let good = site.acme("https://ca.test/dir", &ca, "tls-alpn-01", "");
    let (status, err) = check(&site, &good).await?;
    assert_eq!(status, 0, "a good [acme] passes: {err}");

    let not_a_file = site.path("lb.toml");
    let cases = [
        (
            site.acme("ftp://ca.test/dir", &ca, "tls-alpn-01", ""),
            "acme.directory: \"ftp://ca.test/dir\" is not an https:// URL",
        ),
        (
            good.replace(
                "storage = \"acme\"",
                &format!("storage = \"{}/acme\"", not_a_file.display()),
            ),
            "acme.storage:",
        ),
        (
            good.replace("www.acme.test", "not a name!"),
            "acme.domains[0][1]: \"not a name!\" is not a DNS name",
        ),
        (
            good.replace("www.acme.test", "10.0.0.1"),
            "acme.domains[0][1]: \"10.0.0.1\" is an IP address",
        ),
        (
            site.acme("https://ca.test/dir", &ca, "http-01", "")
                .replace("www.acme.test", "*.acme.test"),
            "acme.domains[0][1]: \"*.acme.test\" is a wildcard: http-01 cannot prove",
        ),
        (
            good.replace("tls-alpn-01", "dns-01"),
            "acme.challenge: \"dns-01\" is not supported",
        ),
    ];
    for (acme, expected) in cases {
        let (status, err) = check(&site, &acme).await?;
        assert_eq!(status, 64, "{expected}: {err}");
        assert!(err.contains(expected), "expected {expected:?} in {err:?}");
        assert!(err.contains("lb.toml"), "the file is named: {err}");
    }

    // The pair's section: the shared secret must be the owner's only.
    let secret = site.path("peer.secret");
    std::fs::write(&secret, "a secret both lb hosts share, 32+ bytes\n")?;
    let peer = format!(
        "{good}[acme.peer]\nlisten = \"127.0.0.1:{}\"\naddress = \"127.0.0.2:9443\"\n\
         virtual_address = \"127.0.0.1\"\nsecret_file = \"peer.secret\"\n",
        free_port()?
    );
    for (mode, expected) in [
        (0o600, None),
        (0o640, Some("acme.peer.secret_file: ")),
        (0o604, Some("acme.peer.secret_file: ")),
    ] {
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(mode))?;
        let (status, err) = check(&site, &peer).await?;
        match expected {
            None => assert_eq!(status, 0, "a good [acme.peer] passes: {err}"),
            Some(expected) => {
                assert_eq!(status, 64, "mode {mode:o}: {err}");
                assert!(
                    err.contains(expected) && err.contains(&format!("has mode {mode:03o}")),
                    "{err}"
                );
            }
        }
    }
    let (status, err) = check(&site, &peer.replace("127.0.0.2:9443", "127.0.0.2")).await?;
    assert_eq!(status, 64, "{err}");
    assert!(
        err.contains("acme.peer.address: \"127.0.0.2\" is not an IP:port address"),
        "{err}"
    );

    // Loose permissions: refused by `lb check` and by `lb run`, naming the key.
    std::fs::create_dir(site.storage())?;
    std::fs::set_permissions(site.storage(), std::fs::Permissions::from_mode(0o755))?;
    let (status, err) = check(&site, &good).await?;
    assert_eq!(status, 64, "{err}");
    assert!(
        err.contains("acme.storage:") && err.contains("mode 755"),
        "{err}"
    );
    std::fs::set_permissions(site.storage(), std::fs::Permissions::from_mode(0o700))?;
    std::fs::write(site.storage().join("chat.acme.test.pem"), "x")?;
    std::fs::set_permissions(
        site.storage().join("chat.acme.test.pem"),
        std::fs::Permissions::from_mode(0o644),
    )?;
    let config = site.config(&good)?;
    let run = Command::new(workspace_bin("lb")?)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .map_err(|_| anyhow!("lb run started despite loose permissions"))??;
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("acme.storage") && err.contains("chat.acme.test.pem has mode 644"),
        "{err}"
    );
    Ok(())
}
