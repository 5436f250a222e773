//! Backend answers of every HTTP/1.1 framing through lb, from scripted raw-socket backends:
//! chunked (split across writes, with extensions and trailers), close-delimited, HEAD, interim
//! 1xx, malformed and truncated answers, a pooled connection the backend closed meanwhile, and
//! large bodies both ways.

// The scripted backend's helpers panic on setup failures, as test code does.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use crate::support::*;
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// What the scripted backend does with one request.
struct Reply {
    /// Written one after the other, each with its own write.
    pieces: Vec<Vec<u8>>,
    /// Close the connection after the last piece.
    close: bool,
    /// Keep the connection open after the last piece without reading from it again.
    hold: bool,
}

fn reply(pieces: &[&str], close: bool) -> Reply {
    Reply {
        pieces: pieces.iter().map(|p| p.as_bytes().to_vec()).collect(),
        close,
        hold: false,
    }
}

type Script = Arc<dyn Fn(&str) -> Reply + Send + Sync>;

/// A backend on a raw socket that answers each request head (requests carry no body here) with
/// what `script` returns for its request line.
struct RawBackend {
    addr: SocketAddr,
    accepts: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<String>>>,
    token: CancellationToken,
}

impl RawBackend {
    async fn start(script: impl Fn(&str) -> Reply + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepts = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let token = CancellationToken::new();
        let script: Script = Arc::new(script);
        let (a, s, t) = (Arc::clone(&accepts), Arc::clone(&seen), token.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = t.cancelled() => return,
                    accepted = listener.accept() => accepted.unwrap().0,
                };
                a.fetch_add(1, Relaxed);
                let (script, seen, t) = (Arc::clone(&script), Arc::clone(&s), t.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve(stream, script, seen) => {}
                        () = t.cancelled() => {}
                    }
                });
            }
        });
        RawBackend {
            addr,
            accepts,
            seen,
            token,
        }
    }

    fn accepts(&self) -> usize {
        self.accepts.load(Relaxed)
    }

    fn config(&self, pki: &Pki) -> TestConfig {
        let mut config = TestConfig::new(pki, &[]);
        config.backends = vec![("raw".into(), self.addr)];
        config
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn serve(mut stream: TcpStream, script: Script, seen: Arc<Mutex<Vec<String>>>) {
    let mut buf = Vec::new();
    loop {
        let head_end = loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        buf.drain(..head_end);
        seen.lock().unwrap().push(head.clone());
        let reply = script(head.lines().next().unwrap_or_default());
        for piece in &reply.pieces {
            if stream.write_all(piece).await.is_err() {
                return;
            }
            stream.flush().await.ok();
            tokio::task::yield_now().await;
        }
        if reply.close {
            return;
        }
        if reply.hold {
            std::future::pending::<()>().await;
        }
    }
}

/// POSTs `size` bytes to `addr` and returns everything the client received until the close.
/// The upload may be cut midway once an answer is out, so writing and reading go side by side.
async fn upload(pki: &Pki, addr: SocketAddr, size: usize) -> String {
    let tls = tls_connect(pki, addr).await;
    let (mut read, mut write) = tokio::io::split(tls);
    let writer = tokio::spawn(async move {
        let head =
            format!("POST /upload HTTP/1.1\r\nhost: localhost\r\ncontent-length: {size}\r\n\r\n");
        let _ = write.write_all(head.as_bytes()).await;
        let _ = write.write_all(&vec![b'u'; size]).await;
    });
    let mut out = Vec::new();
    let _ = within("the answer to an upload", read.read_to_end(&mut out)).await;
    writer.abort();
    String::from_utf8_lossy(&out).into_owned()
}

fn request(method: Method, path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test]
async fn chunked_answers_arrive_whole_and_the_connection_is_reused() {
    let pki = Pki::local();
    let backend = RawBackend::start(|_| {
        reply(
            &[
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nx-raw: 1\r\n\r\n",
                "5;ext=1\r\nhel",
                "lo\r\n",
                "7\r\n, world\r\n0\r\nx-trailer: dropped\r\n",
                "\r\n",
            ],
            false,
        )
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    for _ in 0..3 {
        let res = conn.get("/chunked").await;
        assert_eq!(res.status, StatusCode::OK);
        assert_eq!(res.text(), "hello, world");
        assert_eq!(res.headers["x-raw"], "1");
        assert!(!res.headers.contains_key("x-trailer"));
    }
    assert_eq!(
        backend.accepts(),
        1,
        "the backend connection was not reused"
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn close_delimited_and_head_answers_are_framed_for_the_client() {
    let pki = Pki::local();
    let backend = RawBackend::start(|line| {
        if line.starts_with("HEAD") {
            reply(&["HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\n"], false)
        } else {
            reply(&["HTTP/1.1 200 OK\r\n\r\nuntil ", "the close"], true)
        }
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    let res = conn.get("/close").await;
    assert_eq!(res.text(), "until the close");
    let res = conn.send(request(Method::HEAD, "/head")).await;
    assert_eq!(res.status, StatusCode::OK);
    assert_eq!(res.headers["content-length"], "12");
    assert!(res.body.is_empty());
    // The client's connection is still good after both.
    assert_eq!(conn.get("/again").await.text(), "until the close");
    assert_eq!(
        backend.accepts(),
        2,
        "HEAD reused the connection; the closes did not"
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn interim_answers_are_dropped_and_the_final_one_delivered() {
    let pki = Pki::local();
    let backend = RawBackend::start(|_| {
        reply(
            &[
                "HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\n",
                "HTTP/1.1 201 Created\r\ncontent-length: 2\r\n\r\nok",
            ],
            false,
        )
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let res = https_get(&pki, lb.addrs().https, "/").await;
    assert_eq!(res.status, StatusCode::CREATED);
    assert_eq!(res.text(), "ok");
    lb.shutdown().await;
}

#[tokio::test]
async fn invalid_answers_get_502_and_count_as_backend_errors() {
    let pki = Pki::local();
    let backend = RawBackend::start(|line| {
        if line.contains("/garbage") {
            reply(&["SSH-2.0-OpenSSH\r\n\r\n"], true)
        } else if line.contains("/two-lengths") {
            reply(
                &["HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"],
                true,
            )
        } else {
            reply(
                &["HTTP/1.1 101 Switching Protocols\r\nupgrade: x\r\n\r\n"],
                true,
            )
        }
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    for path in ["/garbage", "/two-lengths", "/unasked-101"] {
        let res = https_get(&pki, lb.addrs().https, path).await;
        assert_eq!(res.status, StatusCode::BAD_GATEWAY, "{path}");
    }
    let pool = lb.pool();
    assert_eq!(pool.backends()[0].stats().errors.load(Relaxed), 3);
    lb.shutdown().await;
}

#[tokio::test]
async fn a_truncated_body_cuts_the_client_connection() {
    let pki = Pki::local();
    let backend = RawBackend::start(|_| {
        reply(
            &["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello"],
            true,
        )
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let mut tls = tls_connect(&pki, lb.addrs().https).await;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = within("the cut connection", tls.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out);
    let (head, body) = text.split_once("\r\n\r\n").expect("a response head");
    assert!(head.contains("content-length: 10"), "{head}");
    assert_eq!(
        body, "hello",
        "the client must see a short body, then the close"
    );
    lb.shutdown().await;
}

#[tokio::test]
async fn a_pooled_connection_closed_by_the_backend_is_replaced_without_an_error() {
    let pki = Pki::local();
    let answered = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&answered);
    // Keep-alive announced, yet every connection is closed right after its answer.
    let backend = RawBackend::start(move |_| {
        count.fetch_add(1, Relaxed);
        reply(&["HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"], true)
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    for i in 0..5 {
        let res = conn.send(request(Method::GET, &format!("/{i}"))).await;
        assert_eq!(res.status, StatusCode::OK, "request {i}");
        assert_eq!(res.text(), "ok");
    }
    assert_eq!(answered.load(Relaxed), 5);
    assert_eq!(backend.accepts(), 5);
    assert_eq!(backend.seen.lock().unwrap().len(), 5);
    lb.shutdown().await;
}

#[tokio::test]
async fn large_bodies_cross_intact_both_ways_with_either_request_framing() {
    let pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&backend])).await;
    let body: Vec<u8> = (0..1_048_576u32).map(|i| (i % 251) as u8).collect();
    let mut conn = HttpsConn::open(&pki, lb.addrs().https).await;
    let req = Request::post("/echo")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(body.clone())))
        .unwrap();
    let res = conn.send(req).await;
    assert_eq!(res.status, StatusCode::OK);
    assert!(res.body == body, "length-framed body changed");

    // The same body in chunks of the client's choosing.
    let mut tls = tls_connect(&pki, lb.addrs().https).await;
    let mut request =
        b"POST /echo HTTP/1.1\r\nhost: localhost\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
            .to_vec();
    for part in body.chunks(100_000) {
        request.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
        request.extend_from_slice(part);
        request.extend_from_slice(b"\r\n");
    }
    request.extend_from_slice(b"0\r\n\r\n");
    tls.write_all(&request).await.unwrap();
    let mut out = Vec::new();
    within("the echoed chunked body", tls.read_to_end(&mut out))
        .await
        .unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(out.starts_with(b"HTTP/1.1 200"));
    assert!(out[split..] == body[..], "chunked body changed");
    let seen = backend.requests();
    assert_eq!(seen[1].headers["transfer-encoding"], "chunked");
    assert_eq!(seen[1].body.len(), body.len());
    lb.shutdown().await;
}

#[tokio::test]
async fn an_answer_sent_before_the_backend_stopped_reading_the_body_reaches_the_client() {
    let pki = Pki::local();
    // Refuses the upload after its head and closes with the body unread (the kernel resets).
    let backend = RawBackend::start(|_| {
        reply(
            &["HTTP/1.1 413 Content Too Large\r\ncontent-length: 9\r\n\r\ntoo large"],
            true,
        )
    })
    .await;
    let lb = start_lb(&backend.config(&pki)).await;
    let text = upload(&pki, lb.addrs().https, 4 << 20).await;
    assert!(text.starts_with("HTTP/1.1 413"), "{text:?}");
    assert!(text.ends_with("too large"), "{text:?}");
    lb.shutdown().await;
}

#[tokio::test]
async fn an_early_answer_reaches_the_client_even_when_the_backend_holds_the_upload() {
    let pki = Pki::local();
    // Answers after the head, then neither reads the body nor closes.
    let backend = RawBackend::start(|_| Reply {
        hold: true,
        ..reply(
            &["HTTP/1.1 401 Unauthorized\r\ncontent-length: 7\r\n\r\nsign in"],
            false,
        )
    })
    .await;
    let mut config = backend.config(&pki);
    config.timeouts = "backend_response = \"1s\"\n".into();
    let lb = start_lb(&config).await;
    let text = upload(&pki, lb.addrs().https, 8 << 20).await;
    assert!(text.starts_with("HTTP/1.1 401"), "{text:?}");
    assert!(text.ends_with("sign in"), "{text:?}");
    lb.shutdown().await;
}
