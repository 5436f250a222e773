//! HTTP/1.1 through lb over real TLS to real loopback backends: round trips, forwarded and
//! hop-by-hop headers, keep-alive reuse towards the backends, failover on connect failure, the
//! 503 when nothing is left, request-smuggling framing, head limits and timeouts, invalid
//! WebSocket handshakes, the redirect listener and the connection limit.

use std::sync::atomic::Ordering::Relaxed;

use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Writes `request` on a fresh TLS connection and reads until the server closes it.
async fn raw_exchange(pki: &Pki, addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut tls = tls_connect(pki, addr).await;
    tls.write_all(request).await.expect("write request");
    read_until_closed(&mut tls).await
}

/// Reads everything until EOF (or a reset, which ends the stream just the same).
async fn read_until_closed(stream: &mut (impl AsyncReadExt + Unpin)) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    within("server closes the connection", async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn status_headers_and_body_round_trip_with_forwarded_headers() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;

    let mut conn = HttpsConn::open(&pki, addr).await;
    let req = Request::post("/echo?status=201")
        .header("host", "localhost")
        .header("x-custom", "kept")
        .header("x-forwarded-for", "203.0.113.9")
        .body(Full::new(Bytes::from_static(b"hello backend")))
        .unwrap();
    let res = conn.send(req).await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert_eq!(res.text(), "hello backend");
    assert_eq!(res.backend(), Some("app1"));
    assert_eq!(res.headers["content-type"], "text/plain");

    let seen = backend.requests();
    assert_eq!(seen.len(), 1);
    let h = &seen[0].headers;
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].uri, "/echo?status=201");
    assert_eq!(h["host"], "localhost");
    assert_eq!(h["x-custom"], "kept");
    assert_eq!(h["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(h["x-forwarded-host"], "localhost");
    assert_eq!(h["content-length"], "13");

    let res = conn.get("/plain").await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.text(), "backend app1\n");
    assert_eq!(
        backend.requests()[1].headers["x-forwarded-for"],
        "127.0.0.1"
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn hop_by_hop_headers_are_removed_both_ways() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    let req = Request::get("/x?hop=1")
        .header("host", "localhost")
        .header("connection", "x-client-hop")
        .header("x-client-hop", "secret")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("proxy-authorization", "Basic Zm9vOmJhcg==")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let res = conn.send(req).await;
    assert_eq!(res.status, StatusCode::OK);
    for gone in ["x-backend-hop", "keep-alive"] {
        assert!(!res.headers.contains_key(gone), "response kept {gone}");
    }
    let seen = &backend.requests()[0].headers;
    for gone in [
        "x-client-hop",
        "keep-alive",
        "te",
        "proxy-authorization",
        "connection",
    ] {
        assert!(!seen.contains_key(gone), "backend saw {gone}");
    }
    assert_eq!(seen["host"], "localhost");
    lb.shutdown().await;
}

#[tokio::test]
async fn backend_connections_are_reused_across_requests_and_clients() {
    let pki = Pki::local();
    let backends = TestBackend::start_many(2).await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backends[0], &backends[1]])).await;
    let addr = lb.addrs().https;

    let mut conn = HttpsConn::open(&pki, addr).await;
    for _ in 0..20 {
        assert_eq!(conn.get("/").await.status, StatusCode::OK);
    }
    for _ in 0..10 {
        assert_eq!(https_get(&pki, addr, "/").await.status, StatusCode::OK);
    }
    let requests: Vec<usize> = backends.iter().map(|b| b.requests().len()).collect();
    assert_eq!(requests, vec![15, 15], "round-robin spreads requests");
    for b in &backends {
        assert_eq!(b.accepts(), 1, "{} saw more than one connection", b.name());
    }
    lb.shutdown().await;
}

#[tokio::test]
async fn a_dead_backend_costs_no_request_and_none_left_gives_503() {
    let pki = Pki::local();
    let live = TestBackend::start("live").await;
    let dead = TestBackend::start("dead").await;
    dead.stop();
    let lb = start_lb(&TestConfig::new(&pki, &[&dead, &live])).await;
    let addr = lb.addrs().https;
    for _ in 0..6 {
        let res = https_get(&pki, addr, "/").await;
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(res.backend(), Some("live"));
    }
    let pool = lb.pool();
    let dead_stats = &pool.backends()[0];
    assert_eq!(dead_stats.name(), "dead");
    assert!(dead_stats.stats().connect_failures.load(Relaxed) >= 1);

    live.stop();
    let res = https_get(&pki, addr, "/").await;
    assert_eq!(res.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(res.text().contains("no backend"), "{}", res.text());
    assert_eq!(res.headers["content-type"], "text/plain; charset=utf-8");
    lb.shutdown().await;
}

#[tokio::test]
async fn te_cl_smuggling_reaches_the_backend_as_one_chunked_request() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let smuggled = "GPOST /smuggled HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nx=1";
    let request = format!(
        "POST /first HTTP/1.1\r\nHost: localhost\r\nContent-Length: 4\r\n\
         Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{smuggled}\r\n0\r\n\r\n",
        smuggled.len()
    );
    let response = raw_exchange(&pki, lb.addrs().https, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    // One response, whose body is the backend echoing exactly the chunked body.
    let (_, body) = response.split_once("\r\n\r\n").expect("response head");
    assert_eq!(body, smuggled);

    let seen = backend.requests();
    assert_eq!(seen.len(), 1, "backend saw {seen:?}");
    assert_eq!(seen[0].uri, "/first");
    assert_eq!(seen[0].body, smuggled.as_bytes());
    assert!(!seen[0].headers.contains_key("content-length"));
    lb.shutdown().await;
}

#[tokio::test]
async fn ambiguous_framing_is_rejected_before_any_backend() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let cases = [
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        "POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\
         Transfer-Encoding: identity\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        "POST / HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    ];
    for case in cases {
        let response = raw_exchange(&pki, addr, case.as_bytes()).await;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{case:?} got {response:?}"
        );
    }
    // An invalid chunk size: the backend never receives a complete request.
    let response = raw_exchange(
        &pki,
        addr,
        b"POST /bad-chunk HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(
        backend
            .requests()
            .iter()
            .all(|r| r.uri != "/bad-chunk" || r.body.is_empty()),
        "a malformed chunked body was delivered"
    );
    assert!(backend.requests().iter().all(|r| r.uri != "/"));
    lb.shutdown().await;
}

#[tokio::test]
async fn oversized_head_gets_431_and_long_target_gets_414() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;

    let big = "a".repeat(64 * 1024);
    let request = format!("GET / HTTP/1.1\r\nHost: localhost\r\nX-Big: {big}\r\n\r\n");
    let response = raw_exchange(&pki, addr, request.as_bytes()).await;
    assert!(response.starts_with("HTTP/1.1 431"), "{:.80}", response);

    let path = format!("/{}", "p".repeat(9000));
    let res = https_get(&pki, addr, &path).await;
    assert_eq!(res.status, StatusCode::URI_TOO_LONG);
    assert!(backend.requests().is_empty());
    // And the lb still serves.
    assert_eq!(https_get(&pki, addr, "/").await.status, StatusCode::OK);
    lb.shutdown().await;
}

#[tokio::test]
async fn slow_request_head_is_cut_with_408() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.timeouts = "client_header = \"1s\"\n".into();
    let lb = start_lb(&config).await;
    let mut tls = tls_connect(&pki, lb.addrs().https).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: 1")
        .await
        .unwrap();
    let response = read_until_closed(&mut tls).await;
    assert!(response.starts_with("HTTP/1.1 408"), "{response:?}");
    assert!(backend.requests().is_empty());
    lb.shutdown().await;
}

#[tokio::test]
async fn bytes_that_are_not_tls_close_only_that_connection() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let mut plain = tokio::net::TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut plain).await;
    assert!(!answer.contains("HTTP/1.1 200"), "{answer:?}");
    assert_eq!(https_get(&pki, addr, "/").await.status, StatusCode::OK);
    assert!(lb.metrics().tls_handshake_failures.load(Relaxed) >= 1);
    lb.shutdown().await;
}

#[tokio::test]
async fn invalid_websocket_handshakes_get_400_and_never_reach_a_backend() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    let base = || {
        Request::get("/ws")
            .header("host", "localhost")
            .header("connection", "Upgrade")
            .header("upgrade", "websocket")
    };
    let bad = [
        base()
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "c2hvcnQ="),
        base().header("sec-websocket-version", "13"),
        base()
            .header("sec-websocket-version", "8")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        base()
            .header("sec-websocket-version", "13")
            .header("sec-websocket-key", "!!!!!!!!!!!!!!!!!!!!!!!!"),
    ];
    for req in bad {
        let res = conn.send(req.body(Full::new(Bytes::new())).unwrap()).await;
        assert_eq!(res.status, StatusCode::BAD_REQUEST);
        assert_eq!(res.headers["sec-websocket-version"], "13");
    }
    assert!(backend.requests().is_empty(), "{:?}", backend.requests());
    assert_eq!(backend.accepts(), 0);
    lb.shutdown().await;
}

#[tokio::test]
async fn redirect_listener_sends_301_to_https() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.redirect = true;
    let lb = start_lb(&config).await;
    let https_port = lb.addrs().https.port();
    let redirect = lb.addrs().redirect.expect("redirect listener");
    let mut tcp = tokio::net::TcpStream::connect(redirect).await.unwrap();
    tcp.write_all(
        b"GET /chat?room=1 HTTP/1.1\r\nHost: localhost:8080\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let response = read_until_closed(&mut tcp).await;
    assert!(response.starts_with("HTTP/1.1 301"), "{response}");
    assert!(
        response.contains(&format!(
            "location: https://localhost:{https_port}/chat?room=1"
        )),
        "{response}"
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_and_the_rest_keep_working() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let mut config = TestConfig::new(&pki, &[&backend]);
    config.limits = "max_client_connections = 2\n".into();
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;
    assert_eq!(lb.connection_limit(), 2);
    let mut a = HttpsConn::open(&pki, addr).await;
    let mut b = HttpsConn::open(&pki, addr).await;
    let refused = within(
        "third connection",
        tls_connect_with(pki.client_config(), addr, "localhost"),
    )
    .await;
    assert!(refused.is_err(), "a third connection was served");
    assert_eq!(lb.metrics().connections_rejected.load(Relaxed), 1);
    assert_eq!(a.get("/").await.status, StatusCode::OK);
    assert_eq!(b.get("/").await.status, StatusCode::OK);
    drop(a);
    let metrics = lb.metrics();
    wait_until("a slot is freed", || {
        metrics.connections_active.load(Relaxed) < 2
    })
    .await;
    assert_eq!(https_get(&pki, addr, "/").await.status, StatusCode::OK);
    lb.shutdown().await;
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_and_stops_accepting() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let mut conn = HttpsConn::open(&pki, addr).await;
    let in_flight = tokio::spawn(async move { conn.get("/slow?hold=1").await });
    wait_until("the request reached the backend", || {
        !backend.requests().is_empty()
    })
    .await;
    // The answer is held until lb has stopped accepting: it is in flight during the shutdown.
    let ((), res) = tokio::join!(lb.shutdown(), async {
        wait_until("lb stops accepting", || {
            std::net::TcpStream::connect(addr).is_err()
        })
        .await;
        backend.release_held(1);
        in_flight.await.unwrap()
    });
    assert_eq!(res.status, StatusCode::OK);
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn connect_is_refused_without_reaching_a_backend() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let response = raw_exchange(
        &pki,
        lb.addrs().https,
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(response.starts_with("HTTP/1.1 405"), "{response}");
    assert_eq!(backend.accepts(), 0);
    lb.shutdown().await;
}
