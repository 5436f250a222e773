//! The attack catalogue: what lb meets on the internet in HAProxy's place, each case with the
//! answer the attacker gets, what reached the backend (a strict raw backend records every
//! request as framed on the wire: nothing smuggled, exactly the requests the client framed), and
//! proof that lb keeps serving afterwards.
//!
//! Covered: request smuggling (CL.TE and TE.CL, obs-fold, `Transfer-Encoding: chunked,
//! identity` and other codings, bad chunk sizes, bare LF and bare CR line endings, bad lengths),
//! oversized heads and request lines (431, 414), 200 small headers, 100 pipelined requests in one
//! write, absolute-form targets (user information refused), upgrade requests carrying a body (a
//! WebSocket one on POST, h2c on POST, a GET handshake refused or accepted by the backend: the
//! body never becomes a request or tunnel bytes), slowloris (408 while others are served),
//! half-open TLS floods, garbage and plain HTTP instead of a ClientHello, TLS 1.2 clients
//! offering only CBC suites, an unknown SNI name, and a WebSocket client that never reads while
//! its backend floods it (lb's memory stays bounded: the real binary's RSS is measured).
//!
//! Timeouts are configured short (1 s) so the timeout cases stay fast; everything else waits on
//! answers, closes and counters, never on sleeps.

// Test code: an unwrap that fails is a failing test, with its location.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::raw::{After, RawBackend, Received, Reply, ResponseReader, echo_body};
use crate::support::*;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// The short timeouts the timeout cases run with.
const SHORT_TIMEOUTS: &str = "client_header = \"1s\"\ntls_handshake = \"1s\"\n";

/// lb in front of an echoing [`RawBackend`], with `timeouts` as its `[timeouts]` table: what
/// most attacks are tried against. Returns the CA, the backend, lb and its https address.
async fn echo_behind_lb(timeouts: &str) -> (Pki, RawBackend, lb::Lb, SocketAddr) {
    let pki = Pki::local();
    let backend = RawBackend::echo().await;
    let mut config = backend.config(&pki);
    config.timeouts = timeouts.into();
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;
    (pki, backend, lb, addr)
}

/// A raw connection to lb over TLS, reading responses.
type Conn = ResponseReader<TlsStream<TcpStream>>;

/// Opens a TLS connection to lb at `addr`.
async fn open(pki: &Pki, addr: SocketAddr) -> Conn {
    ResponseReader::new(tls_connect(pki, addr).await)
}

/// Writes `bytes` on `conn` in one write.
async fn send(conn: &mut Conn, bytes: &[u8]) {
    within("write to lb", conn.get_mut().write_all(bytes))
        .await
        .unwrap();
    within("flush to lb", conn.get_mut().flush()).await.unwrap();
}

/// lb still answers a fresh client, through `backend`.
async fn assert_serves(pki: &Pki, addr: SocketAddr, backend: &RawBackend) {
    let res = https_get(pki, addr, "/still-serving").await;
    assert_eq!(res.status, 200, "lb stopped serving");
    assert_eq!(res.text(), "GET /still-serving\n");
    let last = backend.take_received().pop().unwrap();
    assert_eq!(last.target, "/still-serving");
}

// ---------------------------------------------------------------------------------------------
// The request catalogue: raw requests, their answers, what reaches the backend.

/// What happens to the connection after the answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    /// lb closes it: nothing the client sent after the answered part is ever parsed.
    Closes,
    /// It stays usable: a next request on it is answered.
    Serves,
}

/// One attack: raw bytes in one write, and what must come of them.
struct Case {
    name: &'static str,
    request: Vec<u8>,
    /// The statuses of the answers, in order.
    answers: Vec<u16>,
    /// `(method, target, body)` of each request the backend must receive, in order.
    reaches: Vec<(&'static str, &'static str, &'static str)>,
    then: Then,
}

fn case(
    name: &'static str,
    request: &str,
    answers: &[u16],
    reaches: &[(&'static str, &'static str, &'static str)],
    then: Then,
) -> Case {
    Case {
        name,
        request: request.as_bytes().to_vec(),
        answers: answers.to_vec(),
        reaches: reaches.to_vec(),
        then,
    }
}

/// Runs every case on its own connection to lb at `addr`, in front of the echo `backend`, and
/// fails with the list of every case that went otherwise.
async fn run_cases(pki: &Pki, addr: SocketAddr, backend: &RawBackend, cases: Vec<Case>) {
    let mut failures = Vec::new();
    for case in cases {
        let mut conn = open(pki, addr).await;
        send(&mut conn, &case.request).await;
        let mut answers = Vec::new();
        for _ in 0..case.answers.len() {
            match conn.next().await {
                Some(res) => answers.push(res.status),
                None => break,
            }
        }
        let mut reaches: Vec<(String, String, Vec<u8>)> = case
            .reaches
            .iter()
            .map(|(m, t, b)| (m.to_string(), t.to_string(), b.as_bytes().to_vec()))
            .collect();
        let then = match case.then {
            Then::Closes => {
                let rest = conn.rest().await;
                if rest.is_empty() {
                    Then::Closes
                } else {
                    failures.push(format!(
                        "{}: more after the answers: {:?}",
                        case.name,
                        String::from_utf8_lossy(&rest)
                    ));
                    Then::Serves
                }
            }
            Then::Serves => {
                send(&mut conn, b"GET /next HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
                reaches.push(("GET".into(), "/next".into(), Vec::new()));
                match conn.next().await {
                    Some(res) if res.status == 200 && res.text() == "GET /next\n" => Then::Serves,
                    other => {
                        failures.push(format!(
                            "{}: the next request on the connection got {other:?}",
                            case.name
                        ));
                        Then::Closes
                    }
                }
            }
        };
        if answers != case.answers {
            failures.push(format!(
                "{}: answers {answers:?}, expected {:?}",
                case.name, case.answers
            ));
        }
        let got: Vec<_> = backend.take_received().iter().map(Received::line).collect();
        if got != reaches {
            let show = |v: &[(String, String, Vec<u8>)]| {
                v.iter()
                    .map(|(m, t, b)| format!("{m} {t} {:?}", String::from_utf8_lossy(b)))
                    .collect::<Vec<_>>()
            };
            failures.push(format!(
                "{}: the backend received {:?}, expected {:?} (then {then:?})",
                case.name,
                show(&got),
                show(&reaches)
            ));
        }
    }
    backend.assert_clean();
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// A request smuggled behind the first one: it must never reach the backend.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nhost: localhost\r\n\r\n";

#[tokio::test]
async fn smuggling_attempts_reach_the_backend_as_exactly_what_the_client_framed() {
    let (pki, backend, lb, _) = echo_behind_lb("").await;
    let post = "POST /p HTTP/1.1\r\nhost: localhost\r\n";
    use Then::*;
    let cases = vec![
        // Both framings: the transfer coding wins (RFC 9112 §6.3), the length is dropped, and the
        // connection closes after the answer, so what follows the chunked body is never parsed.
        case(
            "CL.TE: Content-Length first",
            &format!(
                "{post}content-length: 6\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[200],
            &[("POST", "/p", "")],
            Closes,
        ),
        case(
            "TE.CL: Transfer-Encoding first",
            &format!(
                "{post}transfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[200],
            &[("POST", "/p", "hello")],
            Closes,
        ),
        case(
            "TE.CL with the smuggled request inside the chunk",
            &format!(
                "{post}content-length: 4\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{SMUGGLED}\r\n0\r\n\r\n",
                SMUGGLED.len()
            ),
            &[200],
            &[("POST", "/p", SMUGGLED)],
            Closes,
        ),
        case(
            "obs-fold in an ordinary field",
            &format!("{post}x-folded: a\r\n b\r\ncontent-length: 0\r\n\r\n"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "obs-fold hiding the transfer coding",
            &format!("{post}transfer-encoding:\r\n chunked\r\ncontent-length: 3\r\n\r\nabc"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Transfer-Encoding: chunked, identity",
            &format!("{post}transfer-encoding: chunked, identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Transfer-Encoding: chunked, then a second field with identity",
            &format!(
                "{post}transfer-encoding: chunked\r\ntransfer-encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            ),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Transfer-Encoding: xchunked",
            &format!("{post}transfer-encoding: xchunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "space before the colon of Transfer-Encoding",
            &format!("{post}transfer-encoding : chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Transfer-Encoding on HTTP/1.0",
            "POST /p HTTP/1.0\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            &[400],
            &[],
            Closes,
        ),
        case(
            "Transfer-Encoding: identity, chunked (normalised to chunked)",
            &format!("{post}transfer-encoding: identity, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"),
            &[200],
            &[("POST", "/p", "abc")],
            Serves,
        ),
        case(
            "chunk extensions and trailers are not passed on",
            &format!(
                "{post}transfer-encoding: chunked\r\n\r\n3;x=\"a;b\"\r\nabc\r\n0\r\nx-trailer: 1\r\n\r\n"
            ),
            &[200],
            &[("POST", "/p", "abc")],
            Serves,
        ),
        case(
            "a line break inside a quoted chunk extension",
            &format!(
                "{post}transfer-encoding: chunked\r\n\r\n3;x=\"a\r\n\"\r\nabc\r\n0\r\n\r\n{SMUGGLED}"
            ),
            &[400],
            &[],
            Closes,
        ),
        case(
            "differing duplicate Content-Length",
            &format!("{post}content-length: 3\r\ncontent-length: 4\r\n\r\nabcd"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "equal duplicate Content-Length (one length)",
            &format!("{post}content-length: 3\r\ncontent-length: 3\r\n\r\nabc"),
            &[200],
            &[("POST", "/p", "abc")],
            Serves,
        ),
        case(
            "Content-Length list in one field",
            &format!("{post}content-length: 3, 3\r\n\r\nabc"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Content-Length with a sign",
            &format!("{post}content-length: +3\r\n\r\nabc"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "Content-Length past u64",
            &format!("{post}content-length: 99999999999999999999999\r\n\r\nabc"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "bare LF line endings (accepted, re-framed with CRLF)",
            "GET /lf HTTP/1.1\nhost: localhost\nx-a: 1\n\n",
            &[200],
            &[("GET", "/lf", "")],
            Serves,
        ),
        case(
            "CRLF and bare LF mixed",
            "GET /mixed HTTP/1.1\r\nhost: localhost\nx-a: 1\r\n\r\n",
            &[200],
            &[("GET", "/mixed", "")],
            Serves,
        ),
        case(
            "bare CR line endings",
            &format!("GET /cr HTTP/1.1\rhost: localhost\r\r{SMUGGLED}"),
            &[400],
            &[],
            Closes,
        ),
        case(
            "NUL in a field value",
            "GET /nul HTTP/1.1\r\nhost: localhost\r\nx-a: a\0b\r\n\r\n",
            &[400],
            &[],
            Closes,
        ),
        case(
            "two Host fields",
            "GET /hosts HTTP/1.1\r\nhost: localhost\r\nhost: evil.example\r\n\r\n",
            &[400],
            &[],
            Serves,
        ),
        case(
            "HTTP/2 preface on the HTTP/1.1 connection",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            &[],
            &[],
            Closes,
        ),
    ];
    run_cases(&pki, lb.addrs().https, &backend, cases).await;
    assert_serves(&pki, lb.addrs().https, &backend).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn bad_chunks_get_400_end_the_connection_and_never_complete_a_request() {
    let (pki, backend, lb, addr) = echo_behind_lb("").await;
    // Each body starts with a good chunk, so the backend may already have the head and part of
    // the body when the bad one arrives; a request hides behind each.
    let bodies = [
        ("a size that is not hex", "zz\r\nabc\r\n0\r\n\r\n"),
        ("a negative size", "-1\r\nabc\r\n0\r\n\r\n"),
        ("a 0x prefix", "0x3\r\nabc\r\n0\r\n\r\n"),
        ("a space before the size", " 3\r\nabc\r\n0\r\n\r\n"),
        ("two sizes", "3 3\r\nabc\r\n0\r\n\r\n"),
        (
            "a size past u64",
            "fffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        ),
        ("an empty size line", "\r\nabc\r\n0\r\n\r\n"),
        ("bare LF chunk lines", "3\nabc\n0\n\n"),
        ("more data than the size", "3\r\nabcdef\r\n0\r\n\r\n"),
        ("less data than the size", "3\r\nab\r\n0\r\n\r\n"),
    ];
    let mut failures = Vec::new();
    for (what, bad) in bodies {
        let request = format!(
            "POST /chunks HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\n\r\n\
             2\r\nok\r\n{bad}{SMUGGLED}"
        );
        let mut conn = open(&pki, addr).await;
        send(&mut conn, request.as_bytes()).await;
        let answer = conn.next().await.map(|r| r.status);
        let rest = conn.rest().await;
        if answer != Some(400) || !rest.is_empty() {
            failures.push(format!("{what}: answer {answer:?}, then {rest:?}"));
        }
        let got = backend.take_received();
        if !got.is_empty() {
            failures.push(format!("{what}: the backend received {got:?}"));
        }
    }
    backend.assert_clean();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn oversized_heads_and_request_lines_get_431_and_414() {
    let (pki, backend, lb, addr) = echo_behind_lb("").await;
    let many = |n: usize, size: usize| -> String {
        (0..n)
            .map(|i| format!("x-h{i}: {}\r\n", "v".repeat(size)))
            .collect()
    };
    use Then::*;
    let cases = vec![
        case(
            "one 64 KiB field",
            &format!(
                "GET /big HTTP/1.1\r\nhost: localhost\r\n{}\r\n",
                many(1, 64 << 10)
            ),
            &[431],
            &[],
            Closes,
        ),
        case(
            "a head over 16 KiB in 100 fields",
            &format!(
                "GET /big HTTP/1.1\r\nhost: localhost\r\n{}\r\n",
                many(100, 200)
            ),
            &[431],
            &[],
            Closes,
        ),
        // Browsers send a few dozen; HAProxy refuses more than 101 by default.
        case(
            "200 small fields",
            &format!(
                "GET /many HTTP/1.1\r\nhost: localhost\r\n{}\r\n",
                many(200, 1)
            ),
            &[431],
            &[],
            Closes,
        ),
        case(
            "a 12 KiB target (within the head limit, over max_uri_bytes)",
            &format!(
                "GET /{} HTTP/1.1\r\nhost: localhost\r\n\r\n",
                "u".repeat(12 << 10)
            ),
            &[414],
            &[],
            Serves,
        ),
        case(
            "a 100 KiB request line (over the head limit)",
            &format!(
                "GET /{} HTTP/1.1\r\nhost: localhost\r\n\r\n",
                "u".repeat(100 << 10)
            ),
            &[431],
            &[],
            Closes,
        ),
    ];
    run_cases(&pki, addr, &backend, cases).await;

    // 90 small fields pass, every one of them intact.
    let mut conn = open(&pki, addr).await;
    send(
        &mut conn,
        format!(
            "GET /ninety HTTP/1.1\r\nhost: localhost\r\n{}\r\n",
            many(90, 1)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(conn.next().await.unwrap().status, 200);
    let got = backend.take_received();
    assert_eq!(got.len(), 1);
    for i in 0..90 {
        assert_eq!(got[0].all(&format!("x-h{i}")), ["v"], "field {i}");
    }
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn a_hundred_pipelined_requests_in_one_write_are_answered_in_order() {
    let (pki, backend, lb, _) = echo_behind_lb("").await;
    // GETs, length-framed POSTs and chunked POSTs, interleaved.
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    for i in 0..100 {
        let target = format!("/p/{i}");
        let (method, body) = match i % 3 {
            0 => ("GET", String::new()),
            _ => ("POST", format!("body {i}")),
        };
        wire.extend_from_slice(
            format!("{method} {target} HTTP/1.1\r\nhost: localhost\r\n").as_bytes(),
        );
        match i % 3 {
            0 => wire.extend_from_slice(b"\r\n"),
            1 => wire.extend_from_slice(
                format!("content-length: {}\r\n\r\n{body}", body.len()).as_bytes(),
            ),
            _ => {
                let (a, b) = body.split_at(3);
                wire.extend_from_slice(
                    format!(
                        "transfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                        a.len(),
                        b.len()
                    )
                    .as_bytes(),
                );
            }
        }
        expected.push((method.to_owned(), target, body.into_bytes()));
    }
    let mut conn = open(&pki, lb.addrs().https).await;
    send(&mut conn, &wire).await;
    for (i, (method, target, body)) in expected.iter().enumerate() {
        let res = conn.next().await.unwrap_or_else(|| panic!("no answer {i}"));
        assert_eq!(res.status, 200, "answer {i}");
        let want = echo_body(&Received {
            method: method.clone(),
            target: target.clone(),
            headers: Vec::new(),
            body: body.clone(),
        });
        assert_eq!(res.body, want, "answer {i} out of order or changed");
    }
    let got: Vec<_> = backend.take_received().iter().map(Received::line).collect();
    assert_eq!(got, expected, "the backend received other requests");
    backend.assert_clean();
    assert_serves(&pki, lb.addrs().https, &backend).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn absolute_form_targets_reach_the_backend_in_origin_form_with_their_host() {
    let (pki, backend, lb, addr) = echo_behind_lb("").await;
    // (request target, Host field, target and Host the backend must see)
    let cases = [
        (
            "https://localhost/abs?q=1",
            "localhost",
            "/abs?q=1",
            "localhost",
        ),
        ("https://localhost", "localhost", "/", "localhost"),
        // RFC 9112 §3.2.2: the target's authority replaces the Host field.
        (
            "http://other.example:8080/x",
            "localhost",
            "/x",
            "other.example:8080",
        ),
    ];
    for (target, host, want_target, want_host) in cases {
        let mut conn = open(&pki, addr).await;
        send(
            &mut conn,
            format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(conn.next().await.unwrap().status, 200, "{target}");
        let got = backend.take_received();
        assert_eq!(got.len(), 1, "{target}: {got:?}");
        assert_eq!(got[0].target, want_target);
        assert_eq!(got[0].all("host"), [want_host], "{target}");
        assert_eq!(got[0].all("x-forwarded-host"), [want_host], "{target}");
    }
    // User information in the target is an error (RFC 9110 §4.2.4), and no Host made of it
    // reaches the backend.
    let mut conn = open(&pki, addr).await;
    send(
        &mut conn,
        b"GET https://user:pw@localhost/x HTTP/1.1\r\nhost: localhost\r\n\r\n",
    )
    .await;
    assert_eq!(conn.next().await.unwrap().status, 400);
    assert!(backend.take_received().is_empty());
    backend.assert_clean();
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

/// A WebSocket handshake on `method` for `target` with `SMUGGLED` as its body.
fn handshake_with_body(method: &str, target: &str) -> String {
    format!(
        "{method} {target} HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\n\
         upgrade: websocket\r\nsec-websocket-version: 13\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\ncontent-length: {}\r\n\r\n{SMUGGLED}",
        SMUGGLED.len()
    )
}

#[tokio::test]
async fn upgrade_requests_with_bodies_never_leak_the_body_to_the_backend() {
    let pki = Pki::local();
    let tunnel = Arc::new(Mutex::new(Vec::new()));
    let into_tunnel = Arc::clone(&tunnel);
    // `/ws` is accepted and its tunnel recorded until the client ends it; `/refused` gets 403.
    let backend = RawBackend::start(move |req| match req.target.as_str() {
        "/ws" => {
            let into_tunnel = Arc::clone(&into_tunnel);
            Reply {
                bytes: b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\n\
                         upgrade: websocket\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                    .to_vec(),
                after: After::Takeover(Box::new(move |mut stream, early| {
                    Box::pin(async move {
                        into_tunnel.lock().unwrap().extend_from_slice(&early);
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = stream.read(&mut buf).await {
                            into_tunnel.lock().unwrap().extend_from_slice(&buf[..n]);
                        }
                    })
                })),
            }
        }
        "/refused" => Reply {
            bytes: b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n".to_vec(),
            after: After::KeepAlive,
        },
        _ => Reply::ok(&echo_body(req)),
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let addr = lb.addrs().https;
    // Another protocol on POST: forwarded as a plain request, upgrade headers removed.
    let h2c = "POST /h2c HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade, http2-settings\r\n\
               upgrade: h2c\r\nhttp2-settings: AAMAAABkAAQAAP__\r\ncontent-length: 3\r\n\r\nx=1";
    use Then::*;
    let cases = vec![
        // Not a valid handshake: 400 from lb, the body read and dropped, never a request.
        case(
            "WebSocket upgrade on POST",
            &handshake_with_body("POST", "/ws"),
            &[400],
            &[],
            Serves,
        ),
        // Forwarded without its body; the backend's refusal comes back and the body, already
        // read as a body, is never parsed as the next request.
        case(
            "a GET handshake with a body, refused by the backend",
            &handshake_with_body("GET", "/refused"),
            &[403],
            &[("GET", "/refused", "")],
            Serves,
        ),
        case(
            "h2c upgrade on POST",
            h2c,
            &[200],
            &[("POST", "/h2c", "x=1")],
            Serves,
        ),
    ];
    run_cases(&pki, addr, &backend, cases).await;
    let mut conn = open(&pki, addr).await;
    send(&mut conn, h2c.as_bytes()).await;
    assert_eq!(conn.next().await.unwrap().status, 200);
    let got = backend.take_received();
    for name in ["upgrade", "connection", "http2-settings"] {
        assert!(
            got[0].all(name).is_empty(),
            "{name} reached the backend: {got:?}"
        );
    }

    // Accepted: the tunnel carries what the client sent after the body, not the body.
    let mut conn = open(&pki, addr).await;
    send(&mut conn, handshake_with_body("GET", "/ws").as_bytes()).await;
    assert_eq!(conn.next().await.unwrap().status, 101);
    send(&mut conn, b"after the body").await;
    within("close the tunnel", conn.get_mut().shutdown())
        .await
        .unwrap();
    assert!(conn.rest().await.is_empty());
    // The backend recorded the tunnel before it closed its side, which closed the client's.
    assert_eq!(tunnel.lock().unwrap().as_slice(), b"after the body");
    let got = backend.take_received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].line(), ("GET".into(), "/ws".into(), Vec::new()));
    backend.assert_clean();
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// Slow and half-open clients.

#[tokio::test]
async fn slowloris_clients_get_408_while_others_are_served() {
    let (pki, backend, lb, addr) = echo_behind_lb(SHORT_TIMEOUTS).await;

    // Each sends a head one byte at a time, 10 bytes a second, never finishing it.
    let mut slow = Vec::new();
    for _ in 0..20 {
        let tls = tls_connect(&pki, addr).await;
        let started = Instant::now();
        let (read, mut write) = tokio::io::split(tls);
        let trickle = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            let head = b"GET /slow HTTP/1.1\r\nhost: localhost\r\nx-slow: ";
            for byte in head.iter().chain([b'a'; 64].iter()) {
                tick.tick().await;
                if write.write_all(&[*byte]).await.is_err() || write.flush().await.is_err() {
                    return;
                }
            }
        });
        slow.push((started, ResponseReader::new(read), trickle));
    }
    // And these finished their handshakes and send nothing at all.
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(open(&pki, addr).await);
    }

    // Meanwhile a normal client is served.
    let mut conn = HttpsConn::open(&pki, addr).await;
    for i in 0..20 {
        let res = conn.get(&format!("/normal/{i}")).await;
        assert_eq!(res.status, 200);
    }

    for (started, mut reader, trickle) in slow {
        let res = reader.next().await.expect("an answer before the close");
        assert_eq!(res.status, 408);
        assert!(reader.rest().await.is_empty());
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(900),
            "408 after {waited:?}, before the 1 s header timeout"
        );
        trickle.abort();
    }
    for mut conn in idle {
        assert!(
            conn.rest().await.is_empty(),
            "an idle connection is closed silently"
        );
    }
    let targets: Vec<_> = backend
        .take_received()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(targets.len(), 20, "{targets:?}");
    assert!(targets.iter().all(|t| t.starts_with("/normal/")));
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

/// The first bytes of a ClientHello: a record header announcing 512 bytes, and 5 of them.
const PARTIAL_HELLO: &[u8] = &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03];

#[tokio::test]
async fn a_half_open_tls_flood_is_timed_out_while_others_are_served() {
    const FLOOD: usize = 400;
    // Long enough that the whole flood is connected, and the normal requests served, before
    // the first flooding connection times out, even on a loaded machine.
    let (pki, backend, lb, addr) = echo_behind_lb("tls_handshake = \"5s\"\n").await;
    let metrics = lb.metrics();

    // Half connect and stay silent, half send the start of a ClientHello and stop there.
    let mut flood = Vec::with_capacity(FLOOD);
    for i in 0..FLOOD {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            tcp.write_all(PARTIAL_HELLO).await.unwrap();
        }
        flood.push(tcp);
    }
    wait_until("lb holds every flooding connection", || {
        metrics.connections_active.load(Relaxed) >= FLOOD as u64
    })
    .await;

    // Complete handshakes and requests go through meanwhile.
    for i in 0..10 {
        let res = https_get(&pki, addr, &format!("/normal/{i}")).await;
        assert_eq!(res.status, 200);
    }

    // Every flooding connection is closed by lb at the handshake timeout, with nothing sent but
    // perhaps an alert.
    let closes = flood.into_iter().map(|mut tcp| async move {
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        out
    });
    let answers = within(
        "lb closes the flood",
        futures_util::future::join_all(closes),
    )
    .await;
    for answer in answers {
        assert!(
            answer.is_empty() || answer[0] == 0x15,
            "not an alert: {answer:02x?}"
        );
    }
    wait_until("the flood's connections are released", || {
        metrics.connections_active.load(Relaxed) == 0
    })
    .await;
    assert!(metrics.tls_handshake_failures.load(Relaxed) >= FLOOD as u64);
    let targets: Vec<_> = backend
        .take_received()
        .into_iter()
        .map(|r| r.target)
        .collect();
    assert_eq!(targets.len(), 10, "{targets:?}");
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

#[tokio::test]
async fn garbage_and_plain_http_instead_of_a_client_hello_are_dropped() {
    let (pki, backend, lb, addr) = echo_behind_lb(SHORT_TIMEOUTS).await;
    let mut sslv2_hello = vec![
        0x80, 0x2e, 0x01, 0x00, 0x02, 0x00, 0x15, 0x00, 0x00, 0x00, 0x10,
    ];
    sslv2_hello.extend_from_slice(&[0x01, 0x00, 0x80].repeat(7));
    sslv2_hello.extend_from_slice(&[0x42; 16]);
    let inputs: Vec<(&str, Vec<u8>)> = vec![
        (
            "plain HTTP",
            b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n".to_vec(),
        ),
        (
            "an HTTP/2 preface",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(),
        ),
        ("an SSH banner", b"SSH-2.0-OpenSSH_9.2p1\r\n".to_vec()),
        ("zeros", vec![0; 4096]),
        ("an SSLv2 ClientHello", sslv2_hello),
        (
            "a handshake record of garbage",
            [&[0x16, 0x03, 0x01, 0x00, 0x40][..], &[0xee; 0x40]].concat(),
        ),
        (
            "a record announcing 64 KiB",
            vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01],
        ),
        (
            "an alert instead of a hello",
            vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x28],
        ),
    ];
    let failures_before = lb.metrics().tls_handshake_failures.load(Relaxed);
    for (what, bytes) in &inputs {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(bytes).await.unwrap();
        let mut out = Vec::new();
        let _ = within(what, tcp.read_to_end(&mut out)).await;
        // At most one alert record, then the close; never an HTTP answer.
        let alert_only = out.is_empty() || (out[0] == 0x15 && out.len() == 7);
        assert!(alert_only, "{what}: answered {out:02x?}");
    }
    let failures = lb.metrics().tls_handshake_failures.load(Relaxed) - failures_before;
    assert_eq!(failures, inputs.len() as u64);
    assert!(backend.received().is_empty());
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// TLS policy as an attacker meets it.

/// A TLS 1.2 ClientHello for `localhost` offering `suites`, with what a modern client sends
/// beside them (groups, point formats, signature algorithms, extended master secret), so that
/// the suites are the only thing that can make it fail.
fn tls12_client_hello(suites: &[u16]) -> Vec<u8> {
    fn put16(out: &mut Vec<u8>, n: usize) {
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    let mut ext = Vec::new();
    let mut extension = |kind: u16, data: &[u8]| {
        ext.extend_from_slice(&kind.to_be_bytes());
        put16(&mut ext, data.len());
        ext.extend_from_slice(data);
    };
    let name = b"localhost";
    let mut sni = Vec::new();
    put16(&mut sni, name.len() + 3);
    sni.push(0);
    put16(&mut sni, name.len());
    sni.extend_from_slice(name);
    extension(0x0000, &sni);
    extension(0x000a, &[0x00, 0x06, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18]);
    extension(0x000b, &[0x01, 0x00]);
    extension(
        0x000d,
        &[
            0x00, 0x0c, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01, 0x05, 0x03, 0x08, 0x05, 0x05, 0x01,
        ],
    );
    extension(0x0017, &[]);
    extension(0xff01, &[0x00]);

    let mut body = vec![0x03, 0x03];
    body.extend_from_slice(&[0x42; 32]);
    body.push(0);
    put16(&mut body, suites.len() * 2);
    for suite in suites {
        body.extend_from_slice(&suite.to_be_bytes());
    }
    body.extend_from_slice(&[0x01, 0x00]);
    put16(&mut body, ext.len());
    body.extend_from_slice(&ext);
    let mut record = vec![0x16, 0x03, 0x01];
    put16(&mut record, body.len() + 4);
    record.extend_from_slice(&[0x01, 0x00]);
    put16(&mut record, body.len());
    record.extend_from_slice(&body);
    record
}

/// Sends `hello` and returns the first record of the answer: its type and payload.
async fn first_record(addr: SocketAddr, hello: &[u8]) -> (u8, Vec<u8>) {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(hello).await.unwrap();
    within("the server's first record", async {
        let mut header = [0u8; 5];
        tcp.read_exact(&mut header).await.unwrap();
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        let mut payload = vec![0; len];
        tcp.read_exact(&mut payload).await.unwrap();
        (header[0], payload)
    })
    .await
}

#[tokio::test]
async fn tls12_clients_offering_only_cbc_suites_are_refused() {
    let (pki, backend, lb, addr) = echo_behind_lb("").await;
    // ECDHE and RSA key exchange, AES-CBC with SHA-1 and SHA-2 MACs: what TLS 1.2-era clients
    // fall back to.
    let cbc = [
        0xc009, 0xc00a, 0xc023, 0xc024, 0xc013, 0xc014, 0xc027, 0xc028, 0x002f, 0x0035, 0x003c,
        0x003d, 0x000a,
    ];
    let (kind, payload) = first_record(addr, &tls12_client_hello(&cbc)).await;
    assert_eq!(
        (kind, payload.as_slice()),
        (0x15, &[0x02, 0x28][..]),
        "expected a fatal handshake_failure alert"
    );
    // The same hello with one AEAD suite added is answered with a ServerHello.
    let with_gcm: Vec<u16> = cbc.iter().copied().chain([0xc02b]).collect();
    let (kind, payload) = first_record(addr, &tls12_client_hello(&with_gcm)).await;
    assert_eq!(kind, 0x16, "a handshake record");
    assert_eq!(payload[0], 0x02, "a ServerHello");
    // It chose the AEAD suite: session id length at 38, the suite right after the id.
    let at = 39 + payload[38] as usize;
    assert_eq!(&payload[at..at + 2], &[0xc0, 0x2b]);
    assert!(backend.received().is_empty());
    assert_serves(&pki, addr, &backend).await;
    lb.shutdown().await;
}

/// Verifies the server's certificate chain as valid for one fixed name, whatever name the
/// client asked for in its SNI.
#[derive(Debug)]
struct VerifyAs {
    inner: Arc<WebPkiServerVerifier>,
    name: ServerName<'static>,
}

impl ServerCertVerifier for VerifyAs {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _asked_for: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, &self.name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[tokio::test]
async fn an_unknown_sni_name_gets_the_default_certificate() {
    let first = Pki::local();
    let second = Pki::new(&["chat.example.test"]);
    let backend = RawBackend::echo().await;
    let mut config = backend.config(&first);
    config.certificates = format!(
        "[[certificates]]\npem = {:?}\n[[certificates]]\npem = {:?}\n",
        first.pem, second.pem
    );
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(first.bundle.ca_der().unwrap()[0].clone())
        .unwrap();
    let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), Arc::clone(&provider))
        .build()
        .unwrap();
    let verifier = Arc::new(VerifyAs {
        inner,
        name: ServerName::try_from("localhost").unwrap(),
    });
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let tls = within(
        "handshake with an unknown name",
        tls_connect_with(Arc::new(client), addr, "unknown.example.test"),
    )
    .await
    .expect("the handshake succeeds with the default certificate");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(leaf, first.bundle.server_chain().unwrap().certs[0]);
    let mut conn = ResponseReader::new(tls);
    send(
        &mut conn,
        b"GET /sni HTTP/1.1\r\nhost: unknown.example.test\r\n\r\n",
    )
    .await;
    let res = conn.next().await.unwrap();
    assert_eq!((res.status, res.text().as_str()), (200, "GET /sni\n"));

    // The second certificate is chosen by its own name: SNI selection is at work.
    let tls = tls_connect_with(second.client_config(), addr, "chat.example.test")
        .await
        .expect("handshake for the second name");
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(leaf, second.bundle.server_chain().unwrap().certs[0]);
    lb.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// A WebSocket client that never reads.

/// What the flooding backend managed to write.
#[derive(Debug, Clone, Copy)]
struct Flooded {
    /// Bytes written before a write made no progress for [`STALL`].
    written: u64,
    /// A write stalled (lb stopped reading) before [`FLOOD_LIMIT`] was written.
    stalled: bool,
}

/// How long a write may make no progress before the backend counts lb as pushing back.
const STALL: Duration = Duration::from_secs(1);

/// The most the backend tries to write.
const FLOOD_LIMIT: u64 = 512 << 20;

/// lb's resident memory, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test]
async fn a_websocket_client_that_never_reads_cannot_grow_lb_memory() {
    let pki = Pki::local();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<Flooded>();
    let done_tx = Arc::new(Mutex::new(Some(done_tx)));
    let progress = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&progress);
    // Answers the upgrade, then writes 64 KiB binary frames as fast as lb takes them.
    let backend = RawBackend::start(move |req| {
        if req.all("upgrade") != ["websocket"] {
            return Reply::ok(&echo_body(req));
        }
        let (done, counter) = (done_tx.lock().unwrap().take(), Arc::clone(&counter));
        Reply {
            bytes:
                b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
                     sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                    .to_vec(),
            after: After::Takeover(Box::new(move |mut stream, _| {
                Box::pin(async move {
                    let mut frame = vec![0x82, 127];
                    frame.extend_from_slice(&(64u64 << 10).to_be_bytes());
                    frame.resize(frame.len() + (64 << 10), 0x5a);
                    let stalled = loop {
                        if counter.load(Relaxed) >= FLOOD_LIMIT {
                            break false;
                        }
                        match tokio::time::timeout(STALL, stream.write_all(&frame)).await {
                            Ok(Ok(())) => counter.fetch_add(frame.len() as u64, Relaxed),
                            Ok(Err(_)) => break false,
                            Err(_) => break true,
                        };
                    };
                    if let Some(done) = done {
                        let written = counter.load(Relaxed);
                        let _ = done.send(Flooded { written, stalled });
                    }
                    // Hold the connection (and lb's tunnel) open until the test ends.
                    std::future::pending::<()>().await;
                })
            })),
        }
    })
    .await;
    let dir = TempDir::new("flood");
    let path = dir.path().join("lb.toml");
    backend.config(&pki).write(&path);
    let lb = LbProcess::start(&["--config", path.to_str().unwrap()], 1).await;
    let addr = lb.addr("https");
    let pid = lb.child.id().unwrap();

    // A client with a small receive buffer, so the kernel holds little of the flood for it.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 << 10).unwrap();
    let tcp = socket.connect(addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client_config())
        .connect(name, tcp)
        .await
        .unwrap();
    let mut conn = ResponseReader::new(tls);
    // Warm lb up with a plain request first, so the baseline includes its first-use
    // allocations.
    send(&mut conn, b"GET /warm HTTP/1.1\r\nhost: localhost\r\n\r\n").await;
    assert_eq!(conn.next().await.unwrap().status, 200);
    let before = rss(pid);
    send(
        &mut conn,
        b"GET /ws HTTP/1.1\r\nhost: localhost\r\nconnection: upgrade\r\nupgrade: websocket\r\n\
          sec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    .await;
    assert_eq!(conn.next().await.unwrap().status, 101);
    // From here on the client reads nothing.
    let flooded = within("the backend's flood stalls or ends", done_rx)
        .await
        .unwrap();
    let after = rss(pid);
    let growth = after.saturating_sub(before);
    eprintln!(
        "backend wrote {} KiB; lb RSS {} KiB -> {} KiB",
        flooded.written >> 10,
        before >> 10,
        after >> 10
    );
    assert!(
        flooded.stalled,
        "lb took all {} MiB from the backend without the client reading: unbounded buffering",
        flooded.written >> 20
    );
    // lb's own buffers per tunnel direction are bounded (a 32 KiB spill, 64 KiB of TLS records);
    // the rest of what the backend wrote sits in kernel socket buffers.
    const BOUND: u64 = 2 << 20;
    assert!(
        growth < BOUND,
        "lb grew by {} KiB while its client read nothing",
        growth >> 10
    );
    assert!(
        flooded.written > 2 * BOUND,
        "the flood was too small to show anything: {} KiB",
        flooded.written >> 10
    );

    // Another client is served meanwhile.
    let res = https_get(&pki, addr, "/other").await;
    assert_eq!(
        (res.status.as_u16(), res.text().as_str()),
        (200, "GET /other\n")
    );
    drop(conn);
    drop(lb);
    drop(dir);
}
