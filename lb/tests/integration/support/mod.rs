//! Shared support for lb's integration tests: real parts only.
//!
//! - [`Pki`]: a fresh CA and server certificate from the `certs` crate, written to a temporary
//!   directory, plus a rustls client configuration that trusts the CA.
//! - [`TestBackend`]: an HTTP/1.1 + WebSocket server on `127.0.0.1:0` that counts accepted
//!   connections, records every request (method, target, headers, body), answers with its name
//!   (or echoes the request body), serves `/healthz` with a settable status, and echoes WebSocket
//!   frames. It can be stopped (listener and every connection closed) and restarted on the same
//!   address.
//! - [`TestConfig`]: builds an `lb.toml` text for a set of backends; [`start_lb`] runs the load
//!   balancer in-process on ephemeral ports; [`LbProcess`] runs the real binary and reads its
//!   readiness lines.
//! - Clients: [`https_get`] (one request on a fresh connection), [`HttpsConn`] (keep-alive),
//!   [`ws_connect`] (WebSocket over TLS through lb), [`tls_connect`] (raw TLS stream).
//!
//! Every wait is bounded by [`DEADLINE`]; nothing sleeps to synchronise.
#![allow(dead_code, unreachable_pub, clippy::unwrap_used)]

/// Raw-socket backend and response reader (see its module docs).
pub mod raw;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;

pub use testkit::wait::{DEADLINE, within};

/// Polls `cond` until it holds ([`testkit::wait::eventually`]), failing after [`DEADLINE`]. For
/// state that changes in the background (health flips, counters), where no event can be
/// awaited directly.
pub async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let polled =
        testkit::wait::eventually(what, DEADLINE, || std::future::ready(anyhow::Ok(cond())));
    if let Err(e) = polled.await {
        panic!("{e:#}");
    }
}

// ---------------------------------------------------------------------------------------------
// Certificates.

/// A temporary directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new empty directory under the system temp dir.
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A CA and a server certificate on disk.
pub struct Pki {
    pub dir: TempDir,
    pub bundle: certs::Bundle,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub pem: PathBuf,
}

impl Pki {
    /// A CA and a server certificate for `hosts`, written to a temporary directory.
    pub fn new(hosts: &[&str]) -> Pki {
        let dir = TempDir::new("pki");
        Self::new_in(dir, hosts)
    }

    /// Like [`Pki::new`], writing into `dir`.
    pub fn new_in(dir: TempDir, hosts: &[&str]) -> Pki {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        let bundle = certs::generate(&hosts).expect("generate certificates");
        let w = bundle
            .write_to(dir.path(), false)
            .expect("write certificates");
        Pki {
            dir,
            bundle,
            ca: w.ca_cert,
            cert: w.server_cert,
            key: w.server_key,
            pem: w.combined,
        }
    }

    /// The default: `localhost` and `127.0.0.1`.
    pub fn local() -> Pki {
        Pki::new(&["localhost", "127.0.0.1"])
    }

    /// A client configuration trusting this CA (TLS 1.2 and 1.3, ALPN http/1.1).
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        client_config(&[self])
    }
}

/// A client configuration trusting the CAs of every `pki`.
pub fn client_config(pkis: &[&Pki]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for pki in pkis {
        for ca in pki.bundle.ca_der().expect("CA DER") {
            roots.add(ca).expect("add CA");
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

// ---------------------------------------------------------------------------------------------
// Backends.

/// One request as a [`TestBackend`] received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// It was a WebSocket upgrade.
    pub upgrade: bool,
}

#[derive(Debug)]
struct BackendShared {
    name: String,
    accepts: AtomicUsize,
    health_checks: AtomicUsize,
    health_status: AtomicU16,
    requests: Mutex<Vec<Recorded>>,
    ws_open: AtomicUsize,
    ws_total: AtomicUsize,
    close_codes: Mutex<Vec<u16>>,
    /// Permits for the answers held by `hold=1` (see [`TestBackend::release_held`]).
    held: tokio::sync::Semaphore,
}

/// An HTTP/1.1 and WebSocket backend on loopback (see the module docs for its behaviour).
///
/// HTTP answers: `GET /healthz` → the health status (default 200) with body `ok`; any other
/// request → `x-backend: NAME` and, if it had a body, that body echoed, else
/// `backend NAME\n`. Query parameters: `status=NNN` sets the status, `hold=1` holds the answer
/// until [`TestBackend::release_held`], `hop=1` adds hop-by-hop headers (`Connection:
/// x-backend-hop`, `X-Backend-Hop`, `Keep-Alive`) to the response. WebSocket: every text and binary message is echoed; the text
/// `close:CODE` makes the backend close with CODE; close codes received are recorded.
pub struct TestBackend {
    shared: Arc<BackendShared>,
    addr: SocketAddr,
    running: Mutex<CancellationToken>,
}

impl TestBackend {
    /// Starts a backend named `name` on `127.0.0.1:0`.
    pub async fn start(name: &str) -> TestBackend {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind backend");
        let addr = listener.local_addr().expect("backend addr");
        let shared = Arc::new(BackendShared {
            name: name.to_owned(),
            accepts: AtomicUsize::new(0),
            health_checks: AtomicUsize::new(0),
            health_status: AtomicU16::new(200),
            requests: Mutex::new(Vec::new()),
            ws_open: AtomicUsize::new(0),
            ws_total: AtomicUsize::new(0),
            close_codes: Mutex::new(Vec::new()),
            held: tokio::sync::Semaphore::new(0),
        });
        let token = CancellationToken::new();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), token.clone()));
        TestBackend {
            shared,
            addr,
            running: Mutex::new(token),
        }
    }

    /// Starts `n` backends named `b0`, `b1`, ...
    pub async fn start_many(n: usize) -> Vec<TestBackend> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            v.push(TestBackend::start(&format!("b{i}")).await);
        }
        v
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// TCP connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.shared.accepts.load(Relaxed)
    }

    /// `/healthz` requests answered so far.
    pub fn health_checks(&self) -> usize {
        self.shared.health_checks.load(Relaxed)
    }

    /// Requests received (health checks excluded), oldest first.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.requests.lock().unwrap().clone()
    }

    /// WebSocket sessions open now.
    pub fn ws_open(&self) -> usize {
        self.shared.ws_open.load(Relaxed)
    }

    /// WebSocket sessions opened so far.
    pub fn ws_total(&self) -> usize {
        self.shared.ws_total.load(Relaxed)
    }

    /// Close codes received from WebSocket clients.
    pub fn close_codes(&self) -> Vec<u16> {
        self.shared.close_codes.lock().unwrap().clone()
    }

    /// Lets `n` answers held by `hold=1` go out.
    pub fn release_held(&self, n: usize) {
        self.shared.held.add_permits(n);
    }

    /// Sets the status `/healthz` answers.
    pub fn set_health_status(&self, status: u16) {
        self.shared.health_status.store(status, Relaxed);
    }

    /// Closes the listener and every open connection.
    pub fn stop(&self) {
        self.running.lock().unwrap().cancel();
    }

    /// Listens again on the same address after [`TestBackend::stop`].
    pub async fn restart(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind backend");
        let token = CancellationToken::new();
        *self.running.lock().unwrap() = token.clone();
        tokio::spawn(accept_loop(listener, Arc::clone(&self.shared), token));
    }
}

impl Drop for TestBackend {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<BackendShared>, token: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        shared.accepts.fetch_add(1, Relaxed);
        let _ = stream.set_nodelay(true);
        let shared = Arc::clone(&shared);
        let token = token.clone();
        tokio::spawn(async move {
            let conn_token = token.clone();
            let service = service_fn(move |req| {
                backend_request(Arc::clone(&shared), conn_token.clone(), req)
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                _ = conn => {}
                () = token.cancelled() => {}
            }
        });
    }
}

fn query_param<'a>(uri: &'a Uri, key: &str) -> Option<&'a str> {
    uri.query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

async fn backend_request(
    shared: Arc<BackendShared>,
    token: CancellationToken,
    mut req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if req.uri().path() == "/healthz" {
        shared.health_checks.fetch_add(1, Relaxed);
        let status = StatusCode::from_u16(shared.health_status.load(Relaxed))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        return Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from_static(b"ok")))
            .unwrap());
    }
    let upgrade = req
        .headers()
        .get("upgrade")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"));
    if upgrade {
        shared.requests.lock().unwrap().push(Recorded {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            body: Bytes::new(),
            upgrade: true,
        });
        let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
            return Ok(Response::builder()
                .status(400)
                .body(Full::new(Bytes::from_static(b"no key")))
                .unwrap());
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let session = Arc::clone(&shared);
        tokio::spawn(async move {
            let shared = session;
            if let Ok(upgraded) = on_upgrade.await {
                let ws =
                    WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None)
                        .await;
                shared.ws_open.fetch_add(1, Relaxed);
                shared.ws_total.fetch_add(1, Relaxed);
                tokio::select! {
                    () = echo_session(ws, &shared) => {}
                    () = token.cancelled() => {}
                }
                shared.ws_open.fetch_sub(1, Relaxed);
            }
        });
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        return Ok(Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .header("x-backend", shared.name.as_str())
            .body(Full::new(Bytes::new()))
            .unwrap());
    }

    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    shared.requests.lock().unwrap().push(Recorded {
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        headers: parts.headers.clone(),
        body: body.clone(),
        upgrade: false,
    });
    if query_param(&parts.uri, "hold") == Some("1") {
        if let Ok(permit) = shared.held.acquire().await {
            permit.forget();
        }
    }
    let status = query_param(&parts.uri, "status")
        .and_then(|v| v.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK);
    let reply = if body.is_empty() {
        Bytes::from(format!("backend {}\n", shared.name))
    } else {
        body
    };
    let mut builder = Response::builder()
        .status(status)
        .header("x-backend", shared.name.as_str())
        .header("content-type", "text/plain");
    if query_param(&parts.uri, "hop") == Some("1") {
        builder = builder
            .header("connection", "x-backend-hop")
            .header("x-backend-hop", "1")
            .header("keep-alive", "timeout=30");
    }
    Ok(builder.body(Full::new(reply)).unwrap())
}

async fn echo_session(
    mut ws: WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>,
    shared: &BackendShared,
) {
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(ref text) if text.as_str().starts_with("close:") => {
                let code: u16 = text.as_str()["close:".len()..].parse().unwrap_or(1000);
                let _ = ws
                    .send(Message::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: "backend closing".into(),
                    })))
                    .await;
                // Drain until the client's close answer ends the session.
                while let Some(Ok(_)) = ws.next().await {}
                return;
            }
            Message::Text(_) | Message::Binary(_) => msg,
            Message::Close(Some(frame)) => {
                // tungstenite answers the close; keep polling until the stream ends.
                shared.close_codes.lock().unwrap().push(frame.code.into());
                continue;
            }
            _ => continue,
        };
        if ws.send(reply).await.is_err() {
            return;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The load balancer.

/// An `lb.toml` for tests: loopback listeners on port 0, the [`Pki`] certificate, the given
/// backends, health checks off unless set.
#[derive(Debug, Clone)]
pub struct TestConfig {
    /// `[[certificates]]` tables, as TOML text.
    pub certificates: String,
    /// `(name, addr)` of each backend.
    pub backends: Vec<(String, SocketAddr)>,
    /// `balance.policy`.
    pub policy: String,
    /// Body of the `[health]` table.
    pub health: String,
    /// Body of the `[timeouts]` table.
    pub timeouts: String,
    /// Body of the `[limits]` table.
    pub limits: String,
    /// Body of the `[tls]` table.
    pub tls: String,
    /// Start the redirect listener.
    pub redirect: bool,
    /// Start the admin listener.
    pub admin: bool,
    /// Directory relative paths are taken from.
    pub base: PathBuf,
}

impl TestConfig {
    /// A configuration serving `pki`'s certificate (combined PEM) in front of `backends`.
    pub fn new(pki: &Pki, backends: &[&TestBackend]) -> TestConfig {
        TestConfig {
            certificates: format!("[[certificates]]\npem = {:?}\n", pki.pem),
            backends: backends
                .iter()
                .map(|b| (b.name().to_owned(), b.addr()))
                .collect(),
            policy: "round-robin".into(),
            health: "enabled = false\n".into(),
            timeouts: String::new(),
            limits: String::new(),
            tls: String::new(),
            redirect: false,
            admin: false,
            base: pki.dir.path().to_path_buf(),
        }
    }

    /// The TOML text.
    pub fn toml(&self) -> String {
        let mut t = String::from("[listen]\nhttps = \"127.0.0.1:0\"\n");
        if self.redirect {
            t.push_str("redirect = \"127.0.0.1:0\"\n");
        }
        t.push_str(if self.admin {
            "admin = \"127.0.0.1:0\"\n"
        } else {
            "admin = \"off\"\n"
        });
        t.push_str(&self.certificates);
        for (name, addr) in &self.backends {
            t.push_str(&format!(
                "[[backends]]\nname = {name:?}\naddr = \"{addr}\"\n"
            ));
        }
        t.push_str(&format!("[balance]\npolicy = {:?}\n", self.policy));
        t.push_str(&format!("[health]\n{}\n", self.health));
        t.push_str(&format!("[timeouts]\n{}\n", self.timeouts));
        t.push_str(&format!("[limits]\n{}\n", self.limits));
        t.push_str(&format!("[tls]\n{}\n", self.tls));
        t
    }

    /// The validated configuration.
    pub fn config(&self) -> lb::Config {
        lb::Config::parse(
            &self.toml(),
            "test.toml",
            &self.base,
            &lb::Overrides::default(),
        )
        .expect("valid test config")
    }

    /// Writes the TOML to `path` (for the real binary).
    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.toml()).expect("write config");
    }
}

/// Starts the load balancer in-process; its listeners are bound when this returns.
pub async fn start_lb(config: &TestConfig) -> lb::Lb {
    lb::Lb::start(config.config()).await.expect("lb starts")
}

/// The real `lb` binary, started with `args`, killed on drop.
pub struct LbProcess {
    pub child: Child,
    /// `(kind, addr)` of every readiness line read.
    pub listening: Vec<(String, SocketAddr)>,
    /// What it logs (stderr); a successor after a binary upgrade inherits the pipe and logs
    /// here too.
    pub log: testkit::logs::Log,
}

impl LbProcess {
    /// Starts `lb ARGS` and waits for `expect` readiness lines (`listening KIND ADDR`).
    pub async fn start(args: &[&str], expect: usize) -> LbProcess {
        Self::start_with_env(args, expect, &[]).await
    }

    /// Like [`LbProcess::start`], with extra environment variables.
    pub async fn start_with_env(args: &[&str], expect: usize, env: &[(&str, &Path)]) -> LbProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_lb"))
            .args(args)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn lb");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut listening = Vec::new();
        while listening.len() < expect {
            let line = within("lb readiness line", lines.next_line())
                .await
                .expect("read stdout")
                .unwrap_or_else(|| panic!("lb exited before printing {expect} readiness lines"));
            let mut parts = line.split_whitespace();
            if let (Some("listening"), Some(kind), Some(addr)) =
                (parts.next(), parts.next(), parts.next())
            {
                listening.push((kind.to_owned(), addr.parse().expect("readiness address")));
            }
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let log = testkit::logs::Log::capture("lb", child.stderr.take().expect("stderr"));
        LbProcess {
            child,
            listening,
            log,
        }
    }

    /// The address of the `kind` listener.
    pub fn addr(&self, kind: &str) -> SocketAddr {
        self.listening
            .iter()
            .find(|(k, _)| k == kind)
            .map(|(_, a)| *a)
            .unwrap_or_else(|| panic!("no {kind} listener"))
    }

    /// Sends `signal` (e.g. `"HUP"`, `"TERM"`) to the child.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("child running");
        let status = std::process::Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }
}

// ---------------------------------------------------------------------------------------------
// Clients.

/// A response read in full.
#[derive(Debug)]
pub struct TestResponse {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl TestResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `x-backend` header: which backend answered.
    pub fn backend(&self) -> Option<&str> {
        self.headers.get("x-backend").and_then(|v| v.to_str().ok())
    }
}

/// A TLS connection to `addr` with SNI `sni`, trusting `config`'s roots.
pub async fn tls_connect_with(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    sni: &str,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// A TLS connection to lb at `addr` for `localhost`.
pub async fn tls_connect(pki: &Pki, addr: SocketAddr) -> TlsStream<TcpStream> {
    within(
        "TLS connect",
        tls_connect_with(pki.client_config(), addr, "localhost"),
    )
    .await
    .expect("TLS handshake with lb")
}

/// One keep-alive HTTPS connection.
pub struct HttpsConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
}

impl HttpsConn {
    /// Opens a connection to lb at `addr`.
    pub async fn open(pki: &Pki, addr: SocketAddr) -> HttpsConn {
        let tls = tls_connect(pki, addr).await;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .expect("HTTP handshake");
        tokio::spawn(conn);
        HttpsConn { sender }
    }

    /// Sends `req` and reads the whole response.
    pub async fn send(&mut self, req: Request<Full<Bytes>>) -> TestResponse {
        within("HTTPS request", async {
            self.sender.ready().await.expect("connection ready");
            let res = self.sender.send_request(req).await.expect("response");
            let (parts, body) = res.into_parts();
            let body = body.collect().await.expect("body").to_bytes();
            TestResponse {
                status: parts.status,
                headers: parts.headers,
                body,
            }
        })
        .await
    }

    /// `GET path` with `Host: localhost`.
    pub async fn get(&mut self, path: &str) -> TestResponse {
        self.send(get_request(path)).await
    }
}

/// A `GET path` request with `Host: localhost`.
pub fn get_request(path: &str) -> Request<Full<Bytes>> {
    Request::get(path)
        .header("host", "localhost")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// `GET path` on a fresh connection.
pub async fn https_get(pki: &Pki, addr: SocketAddr, path: &str) -> TestResponse {
    HttpsConn::open(pki, addr).await.get(path).await
}

/// A WebSocket client connected through lb.
pub type WsClient = WebSocketStream<TlsStream<TcpStream>>;

/// How a WebSocket through lb ended, as its client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum WsEnd {
    /// A close frame with this code (1005 when the frame carried none).
    Closed(u16),
    /// The connection ended without a close frame: lb cut the tunnel (a browser reports 1006).
    Cut,
}

/// Reads `ws` until it ends, skipping data frames, within [`DEADLINE`]; how it ended.
pub async fn ws_end(ws: &mut WsClient) -> WsEnd {
    within("the WebSocket to end", async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return WsEnd::Cut,
                Some(Ok(Message::Close(frame))) => {
                    return WsEnd::Closed(frame.map_or(1005, |f| f.code.into()));
                }
                Some(Ok(_)) => continue,
            }
        }
    })
    .await
}

/// Opens `wss://localhost/path` through lb at `addr`.
pub async fn ws_connect(pki: &Pki, addr: SocketAddr, path: &str) -> WsClient {
    let tls = tls_connect(pki, addr).await;
    let url = format!("wss://localhost{path}");
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(16 << 20))
        .max_frame_size(Some(16 << 20));
    let (ws, _) = within(
        "WebSocket handshake",
        tokio_tungstenite::client_async_with_config(url, tls, Some(config)),
    )
    .await
    .expect("WebSocket handshake through lb");
    ws
}

/// The next data message (text or binary) from `ws`, skipping pings and pongs.
pub async fn ws_next(ws: &mut WsClient) -> Message {
    within("WebSocket message", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(m)) => return m,
                Some(Err(e)) => panic!("WebSocket error: {e}"),
                None => panic!("WebSocket ended"),
            }
        }
    })
    .await
}

/// Sends `msg` and expects it back unchanged.
pub async fn ws_echo(ws: &mut WsClient, msg: Message) {
    within("WebSocket send", ws.send(msg.clone()))
        .await
        .expect("send");
    let back = ws_next(ws).await;
    assert_eq!(back, msg, "echo differs");
}

/// A rustls client configuration trusting `pki` that speaks only `version`; its default
/// session store keeps the tickets servers give it, so a second connection can resume.
pub fn resuming_client(
    pki: &Pki,
    version: &'static rustls::SupportedProtocolVersion,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.bundle.ca_der().unwrap()[0].clone()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[version])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// A connection with `config`: its handshake kind, after one request read to the end (a TLS
/// 1.3 server sends its session tickets after the handshake, with the first data).
pub async fn handshake_kind_of_one_request(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Option<rustls::HandshakeKind> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = within("TLS connect", tls_connect_with(config, addr, "localhost"))
        .await
        .expect("TLS handshake with lb");
    let kind = tls.get_ref().1.handshake_kind();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("send a request");
    let mut answer = Vec::new();
    within("the answer", tls.read_to_end(&mut answer))
        .await
        .expect("read the answer");
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    kind
}

/// A header value from a static string.
pub fn hv(s: &'static str) -> HeaderValue {
    HeaderValue::from_static(s)
}
