//! TLS termination with certificates from the `certs` crate: the handshake succeeds for clients
//! trusting the generated CA (TLS 1.3 and 1.2, ALPN http/1.1), a TLS 1.1 ClientHello is refused,
//! SNI selects among several certificates (combined PEM and separate files), and a client that
//! sends no SNI gets the first one. A returning client resumes its session (tickets, TLS 1.3 and
//! 1.2), also after a reload (the ticket keys outlive it), but not with a ticket older than two
//! key rotations. (Resumption across a binary upgrade is in `upgrade.rs`.)

use std::sync::Arc;

use crate::support::*;
use rustls::time_provider::TimeProvider;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;

/// The end-entity certificate the server presented.
fn peer_leaf(
    tls: &tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> CertificateDer<'static> {
    tls.get_ref()
        .1
        .peer_certificates()
        .expect("server certificates")[0]
        .clone()
}

#[tokio::test]
async fn handshake_with_the_generated_ca_negotiates_tls13_and_http11() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let tls = tls_connect(&pki, lb.addrs().https).await;
    let (_, session) = tls.get_ref();
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(session.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(peer_leaf(&tls), pki.bundle.server_chain().unwrap().certs[0]);
    lb.shutdown().await;
}

#[tokio::test]
async fn a_tls12_client_gets_an_ecdhe_aead_suite() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.bundle.ca_der().unwrap()[0].clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tls = within(
        "TLS 1.2 handshake",
        tls_connect_with(Arc::new(config), lb.addrs().https, "localhost"),
    )
    .await
    .expect("TLS 1.2 handshake");
    let session = tls.get_ref().1;
    assert_eq!(
        session.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let suite = format!("{:?}", session.negotiated_cipher_suite().unwrap().suite());
    assert!(
        suite.starts_with("TLS_ECDHE_") && suite.contains("GCM"),
        "{suite}"
    );
    lb.shutdown().await;
}

/// A minimal TLS 1.1 ClientHello as an old client sends it: version 3.2, no
/// supported_versions extension, two CBC suites of that era.
fn tls11_client_hello() -> Vec<u8> {
    let mut body = vec![0x03, 0x02];
    body.extend_from_slice(&[0x42; 32]); // random
    body.push(0); // session id
    body.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // cipher suites
    body.extend_from_slice(&[0x01, 0x00]); // compression: null
    let mut handshake = vec![0x01, 0x00];
    handshake.extend_from_slice(&(body.len() as u16).to_be_bytes());
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn a_tls11_client_hello_is_refused_with_a_protocol_version_alert() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(&tls11_client_hello()).await.unwrap();
    let mut answer = Vec::new();
    within("server answers and closes", async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    // A fatal alert record (type 21, level 2) and no handshake record: protocol_version (70),
    // or handshake_failure (40) since none of TLS 1.1's suites is acceptable either.
    assert_eq!(answer.first(), Some(&0x15), "answer: {answer:02x?}");
    assert_eq!(answer.get(5), Some(&0x02), "answer: {answer:02x?}");
    assert!(
        matches!(answer.get(6), Some(0x46 | 0x28)),
        "answer: {answer:02x?}"
    );
    assert!(
        !answer.contains(&0x16),
        "a handshake record was sent: {answer:02x?}"
    );
    // The lb keeps serving.
    assert_eq!(https_get(&pki, addr, "/").await.status, 200);
    lb.shutdown().await;
}

#[tokio::test]
async fn sni_selects_the_certificate_and_no_sni_gets_the_first() {
    let first = Pki::new(&["localhost", "127.0.0.1"]);
    let second = Pki::new(&["chat.example.test"]);
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&first, &[&backend]);
    // The first as a combined PEM, the second as separate certificate and key files.
    config.certificates = format!(
        "[[certificates]]\npem = {:?}\n[[certificates]]\ncert = {:?}\nkey = {:?}\n",
        first.pem, second.cert, second.key
    );
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;
    let trust_both = client_config(&[&first, &second]);
    let first_leaf = first.bundle.server_chain().unwrap().certs[0].clone();
    let second_leaf = second.bundle.server_chain().unwrap().certs[0].clone();

    let tls = tls_connect_with(Arc::clone(&trust_both), addr, "chat.example.test")
        .await
        .expect("handshake for chat.example.test");
    assert_eq!(peer_leaf(&tls), second_leaf);

    let tls = tls_connect_with(Arc::clone(&trust_both), addr, "localhost")
        .await
        .expect("handshake for localhost");
    assert_eq!(peer_leaf(&tls), first_leaf);

    // An IP address: rustls sends no SNI, lb presents the first certificate, which names the
    // address.
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let ip = ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let tls = within(
        "handshake without SNI",
        TlsConnector::from(trust_both).connect(ip, tcp),
    )
    .await
    .expect("handshake without SNI");
    assert_eq!(peer_leaf(&tls), first_leaf);
    lb.shutdown().await;
}

#[tokio::test]
async fn a_returning_client_resumes_its_session_with_tls13_and_tls12() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let config = resuming_client(&pki, version);
        let first = handshake_kind_of_one_request(Arc::clone(&config), lb.addrs().https).await;
        assert_eq!(first, Some(rustls::HandshakeKind::Full), "{version:?}");
        let again = handshake_kind_of_one_request(config, lb.addrs().https).await;
        assert_eq!(again, Some(rustls::HandshakeKind::Resumed), "{version:?}");
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn a_ticket_issued_before_a_reload_resumes_after_it() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let other = TestBackend::start("app2").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let clients =
        [&rustls::version::TLS13, &rustls::version::TLS12].map(|v| resuming_client(&pki, v));
    for config in &clients {
        let first = handshake_kind_of_one_request(Arc::clone(config), addr).await;
        assert_eq!(first, Some(rustls::HandshakeKind::Full));
    }
    // A new TLS configuration (new session cache too: only a ticket can resume).
    lb.reload(TestConfig::new(&pki, &[&backend, &other]).config())
        .expect("reload");
    for config in clients {
        let again = handshake_kind_of_one_request(config, addr).await;
        assert_eq!(again, Some(rustls::HandshakeKind::Resumed));
    }
    lb.shutdown().await;
}

/// A client clock that stands still: the client keeps offering its tickets whatever their
/// lifetime, so only lb's key rotation can refuse them.
#[derive(Debug)]
struct StoppedClock(UnixTime);

impl TimeProvider for StoppedClock {
    fn current_time(&self) -> Option<UnixTime> {
        Some(self.0)
    }
}

#[tokio::test]
async fn a_ticket_older_than_two_rotations_gets_a_full_handshake() {
    // A ticket sealed with a key at most one rotation old opens for at least one more: two
    // seconds for the second handshake, plenty on a loaded machine.
    const ROTATION: std::time::Duration = std::time::Duration::from_secs(2);
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.tls = format!("ticket_rotation = \"{}s\"\n", ROTATION.as_secs());
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;
    // rustls' client drops a ticket after the lifetime lb announces (one rotation): with its
    // clock stopped it offers the ticket anyway, and the full handshake at the end is lb's doing.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.bundle.ca_der().unwrap()[0].clone()).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_details(
            Arc::new(rustls::crypto::ring::default_provider()),
            Arc::new(StoppedClock(UnixTime::now())),
        )
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let first = handshake_kind_of_one_request(Arc::clone(&client), addr).await;
    assert_eq!(first, Some(rustls::HandshakeKind::Full));
    let again = handshake_kind_of_one_request(Arc::clone(&client), addr).await;
    assert_eq!(again, Some(rustls::HandshakeKind::Resumed));
    // The client now holds tickets from that resumption; two rotations after the newest was
    // issued, its key opens nothing.
    let newest = std::time::Instant::now();
    tokio::time::sleep_until((newest + 2 * ROTATION).into()).await;
    let late = handshake_kind_of_one_request(client, addr).await;
    assert_eq!(late, Some(rustls::HandshakeKind::Full));
    lb.shutdown().await;
}
