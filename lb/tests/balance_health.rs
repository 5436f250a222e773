//! Balancing, health checks and the admin listener against real HTTP backends on loopback:
//! the checker takes a stopped backend out after `fall` failed checks and brings it back after
//! `rise` passes, and `/metrics` over real TCP parses as Prometheus text and shows the
//! per-backend values.

use std::collections::{BTreeMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use lb::balance::{Backend, Policy, Pool};
use lb::health::{self, HealthConfig};
use lb::metrics::Metrics;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bound on every wait for a state change; generous, since CI machines can be slow.
const DEADLINE: Duration = Duration::from_secs(20);

/// Fast checks so the tests finish quickly: HAProxy semantics, shorter clock.
fn fast_checks() -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
        ..HealthConfig::default()
    }
}

/// An HTTP/1.1 backend on loopback: `/healthz` answers 200 `ok`, every other path answers its
/// name. Stopping it closes the listener and every open connection.
struct FakeBackend {
    addr: SocketAddr,
    health_checks: Arc<AtomicU64>,
    token: CancellationToken,
    accept_loop: JoinHandle<()>,
}

impl FakeBackend {
    async fn start(name: &'static str, addr: SocketAddr) -> FakeBackend {
        let listener = TcpListener::bind(addr).await.expect("bind backend");
        let addr = listener.local_addr().expect("backend address");
        let health_checks = Arc::new(AtomicU64::new(0));
        let token = CancellationToken::new();
        let accept_loop = tokio::spawn(serve_backend(
            name,
            listener,
            Arc::clone(&health_checks),
            token.clone(),
        ));
        FakeBackend {
            addr,
            health_checks,
            token,
            accept_loop,
        }
    }

    /// Closes the listener and all connections; returns once the port is closed.
    async fn stop(mut self) -> SocketAddr {
        self.token.cancel();
        (&mut self.accept_loop).await.expect("backend accept loop");
        self.addr
    }
}

impl Drop for FakeBackend {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

async fn serve_backend(
    name: &'static str,
    listener: TcpListener,
    health_checks: Arc<AtomicU64>,
    token: CancellationToken,
) {
    loop {
        let stream = tokio::select! {
            () = token.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let health_checks = Arc::clone(&health_checks);
        let service = service_fn(move |request: Request<Incoming>| {
            let body = if request.uri().path() == "/healthz" {
                health_checks.fetch_add(1, Relaxed);
                "ok"
            } else {
                name
            };
            async move { Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body)))) }
        });
        let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
        let token = token.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = connection => {}
                () = token.cancelled() => {}
            }
        });
    }
}

fn pool_of(backends: &[(&str, SocketAddr)], policy: Policy) -> Arc<Pool> {
    let backends = backends
        .iter()
        .map(|&(name, addr)| Arc::new(Backend::new(name.into(), addr, 1)))
        .collect();
    Arc::new(Pool::new(backends, policy))
}

/// Polls `cond` until it holds; panics naming `what` after [`DEADLINE`].
async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts health checks on `pool`; the returned guard stops them.
struct Checks {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Checks {
    fn start(pool: &Arc<Pool>, cfg: HealthConfig) -> Checks {
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        health::spawn(Arc::clone(pool), cfg, token.clone(), &tracker);
        tracker.close();
        Checks { token, tracker }
    }

    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(DEADLINE, self.tracker.wait())
            .await
            .expect("health checkers stop when cancelled");
    }
}

#[tokio::test]
async fn stopped_backend_goes_down_after_fall_and_returns_after_rise() {
    let app1 = FakeBackend::start("app1", "127.0.0.1:0".parse().unwrap()).await;
    let app2 = FakeBackend::start("app2", "127.0.0.1:0".parse().unwrap()).await;
    let pool = pool_of(
        &[("app1", app1.addr), ("app2", app2.addr)],
        Policy::RoundRobin,
    );
    let (b1, b2) = (
        Arc::clone(&pool.backends()[0]),
        Arc::clone(&pool.backends()[1]),
    );
    let checks = Checks::start(&pool, fast_checks());

    // Both pass checks and stay up.
    wait_for("checks of both backends", || {
        app1.health_checks.load(Relaxed) >= 3 && app2.health_checks.load(Relaxed) >= 3
    })
    .await;
    assert!(b1.is_up() && b2.is_up());

    let addr1 = app1.stop().await;
    wait_for("app1 marked down", || !b1.is_up()).await;
    assert!(b2.is_up());
    assert_eq!(b1.stats().transitions_down.load(Relaxed), 1);
    for _ in 0..10 {
        assert_eq!(pool.pick(&[]).unwrap().name(), "app2");
    }

    let app1 = FakeBackend::start("app1", addr1).await;
    wait_for("app1 marked up again", || b1.is_up()).await;
    assert!(
        app1.health_checks.load(Relaxed) >= 2,
        "up only after `rise` passed checks"
    );
    assert_eq!(b1.stats().transitions_up.load(Relaxed), 1);
    assert_eq!(b1.stats().transitions_down.load(Relaxed), 1);
    assert_eq!(b2.stats().transitions_down.load(Relaxed), 0);
    let picked: HashSet<String> = (0..4)
        .map(|_| pool.pick(&[]).unwrap().name().to_owned())
        .collect();
    assert_eq!(picked.len(), 2, "both backends back in rotation");

    checks.stop().await;
}

#[tokio::test]
async fn wrong_status_counts_as_failure() {
    let app1 = FakeBackend::start("app1", "127.0.0.1:0".parse().unwrap()).await;
    let pool = pool_of(&[("app1", app1.addr)], Policy::RoundRobin);
    // The backend answers /healthz with 200; expecting 204 makes every check fail.
    let checks = Checks::start(
        &pool,
        HealthConfig {
            expect_status: 204,
            ..fast_checks()
        },
    );
    let backend = &pool.backends()[0];
    wait_for("app1 marked down", || !backend.is_up()).await;
    assert!(
        app1.health_checks.load(Relaxed) >= 3,
        "down after `fall` answered checks"
    );
    assert!(pool.pick(&[]).is_none());
    checks.stop().await;
}

/// `GET path` over a fresh connection; returns the status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send request");
    let mut response = String::new();
    tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
        .await
        .expect("admin answers")
        .expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("a response head");
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok());
    let status = status.expect("a status code");
    (status, body.to_owned())
}

#[tokio::test]
async fn admin_metrics_parse_and_show_each_backend() {
    let app1 = FakeBackend::start("app1", "127.0.0.1:0".parse().unwrap()).await;
    let app2 = FakeBackend::start("app2", "127.0.0.1:0".parse().unwrap()).await;
    let pool = pool_of(
        &[("app1", app1.addr), ("app2", app2.addr)],
        Policy::LeastConnections,
    );
    let b1 = Arc::clone(&pool.backends()[0]);
    let b2 = Arc::clone(&pool.backends()[1]);
    b1.stats().requests.fetch_add(5, Relaxed);
    b1.stats().bytes_to_client.fetch_add(1234, Relaxed);
    let _tunnel = b1.lease();
    let metrics = Arc::new(Metrics::default());
    metrics.connections_total.fetch_add(3, Relaxed);
    metrics.record_response(200);

    let checks = Checks::start(&pool, fast_checks());
    app2.stop().await;
    wait_for("app2 marked down", || !b2.is_up()).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let admin = tokio::spawn(lb::admin::serve(
        listener,
        Arc::clone(&metrics),
        Arc::new(ArcSwap::from(Arc::clone(&pool))),
        token.clone(),
    ));

    let (status, text) = get(admin_addr, "/metrics").await;
    assert_eq!(status, 200);
    let samples = prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let value = |name: &str, labels: &[(&str, &str)]| -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        samples
            .iter()
            .find(|s| s.name == name && s.labels == labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{text}"))
            .value
    };
    let a1 = app1.addr.to_string();
    let a2 = b2.addr().to_string();
    let app1_labels = [("backend", "app1"), ("addr", a1.as_str())];
    let app2_labels = [("backend", "app2"), ("addr", a2.as_str())];
    assert_eq!(value("lb_connections_total", &[]), 3.0);
    assert_eq!(value("lb_responses_total", &[("class", "2xx")]), 1.0);
    assert_eq!(value("lb_backend_up", &app1_labels), 1.0);
    assert_eq!(value("lb_backend_up", &app2_labels), 0.0);
    assert_eq!(value("lb_backend_requests_total", &app1_labels), 5.0);
    assert_eq!(value("lb_backend_active_connections", &app1_labels), 1.0);
    assert_eq!(value("lb_backend_active_connections", &app2_labels), 0.0);
    let to_client = [app1_labels[0], app1_labels[1], ("direction", "to_client")];
    assert_eq!(value("lb_backend_bytes_total", &to_client), 1234.0);
    let down = [app2_labels[0], app2_labels[1], ("to", "down")];
    assert_eq!(value("lb_backend_health_transitions_total", &down), 1.0);

    let (status, json) = get(admin_addr, "/stats").await;
    assert_eq!(status, 200);
    assert!(json.contains(&format!(
        "{{\"name\":\"app2\",\"addr\":\"{a2}\",\"up\":false,"
    )));
    let (status, html) = get(admin_addr, "/").await;
    assert_eq!(status, 200);
    assert!(html.contains("<td>app2</td>"));
    assert_eq!(get(admin_addr, "/nope").await.0, 404);

    token.cancel();
    tokio::time::timeout(DEADLINE, admin)
        .await
        .expect("admin stops when cancelled")
        .unwrap();
    checks.stop().await;
}

/// A checker for the Prometheus text exposition format (0.0.4), strict enough to catch what
/// a scraper would reject: bad names, bad label syntax or escapes, unparsable values, a TYPE
/// after its samples or twice, a family's samples split apart, duplicate series.
mod prometheus {
    use std::collections::{BTreeMap, HashSet};

    #[derive(Debug)]
    pub struct Sample {
        pub name: String,
        pub labels: BTreeMap<String, String>,
        pub value: f64,
    }

    fn is_name(s: &str, colons: bool) -> bool {
        let mut chars = s.chars();
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '_' || (colons && c == ':');
        matches!(chars.next(), Some(c) if ok(c) && !c.is_ascii_digit()) && chars.all(ok)
    }

    /// The family a sample belongs to (histogram and summary suffixes are not used by lb).
    pub fn parse(text: &str) -> Result<Vec<Sample>, String> {
        let mut typed: HashSet<String> = HashSet::new();
        let mut finished: HashSet<String> = HashSet::new();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        let mut samples = Vec::new();
        if !text.ends_with('\n') {
            return Err("exposition must end with a newline".into());
        }
        for (n, line) in text.lines().enumerate() {
            let err = |what: &str| format!("line {}: {what}: {line:?}", n + 1);
            if let Some(comment) = line.strip_prefix('#') {
                let mut words = comment.trim_start().splitn(3, ' ');
                match (words.next(), words.next(), words.next()) {
                    (Some("TYPE"), Some(name), Some(kind)) => {
                        if !is_name(name, true) {
                            return Err(err("bad metric name"));
                        }
                        if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind)
                        {
                            return Err(err("unknown type"));
                        }
                        if !typed.insert(name.to_owned()) || finished.contains(name) {
                            return Err(err("TYPE repeated or after its samples"));
                        }
                    }
                    (Some("HELP"), Some(name), _) if !is_name(name, true) => {
                        return Err(err("bad metric name"));
                    }
                    _ => {}
                }
                continue;
            }
            if line.trim().is_empty() {
                continue;
            }
            let (name, rest) = match line.find(['{', ' ']) {
                Some(i) => line.split_at(i),
                None => return Err(err("sample without value")),
            };
            if !is_name(name, true) {
                return Err(err("bad metric name"));
            }
            let (labels, rest) = if let Some(rest) = rest.strip_prefix('{') {
                parse_labels(rest).map_err(|e| err(&e))?
            } else {
                (BTreeMap::new(), rest)
            };
            let mut fields = rest.split_whitespace();
            let value = match fields.next() {
                Some("+Inf") => f64::INFINITY,
                Some("-Inf") => f64::NEG_INFINITY,
                Some(v) => v.parse::<f64>().map_err(|_| err("bad value"))?,
                None => return Err(err("missing value")),
            };
            if let Some(ts) = fields.next() {
                ts.parse::<i64>().map_err(|_| err("bad timestamp"))?;
            }
            if fields.next().is_some() {
                return Err(err("trailing fields"));
            }
            if current.as_deref() != Some(name) {
                if finished.contains(name) {
                    return Err(err("family samples split apart"));
                }
                if let Some(previous) = current.replace(name.to_owned()) {
                    finished.insert(previous);
                }
            }
            if !typed.contains(name) {
                return Err(err("sample without a TYPE line"));
            }
            if !series.insert((name.to_owned(), format!("{labels:?}"))) {
                return Err(err("duplicate series"));
            }
            samples.push(Sample {
                name: name.to_owned(),
                labels,
                value,
            });
        }
        Ok(samples)
    }

    /// Parses `a="x",b="y"}` and returns the labels and what follows the `}`.
    fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
        let mut labels = BTreeMap::new();
        loop {
            if let Some(after) = rest.strip_prefix('}') {
                return Ok((labels, after));
            }
            let (name, after) = rest.split_once("=\"").ok_or("label without =\"")?;
            if !is_name(name, false) || name.starts_with("__") {
                return Err(format!("bad label name {name:?}"));
            }
            let mut value = String::new();
            let mut chars = after.char_indices();
            let end = loop {
                match chars.next().ok_or("unterminated label value")? {
                    (i, '"') => break i,
                    (_, '\\') => match chars.next().ok_or("dangling escape")?.1 {
                        '\\' => value.push('\\'),
                        '"' => value.push('"'),
                        'n' => value.push('\n'),
                        c => return Err(format!("bad escape \\{c}")),
                    },
                    (_, '\n') => return Err("newline in label value".into()),
                    (_, c) => value.push(c),
                }
            };
            if labels.insert(name.to_owned(), value).is_some() {
                return Err(format!("label {name} repeated"));
            }
            rest = &after[end + 1..];
            if let Some(after) = rest.strip_prefix(',') {
                rest = after;
            } else if !rest.starts_with('}') {
                return Err("expected , or } after a label".into());
            }
        }
    }

    #[test]
    fn the_checker_rejects_what_scrapers_reject() {
        let ok = "# HELP a_total x\n# TYPE a_total counter\na_total{k=\"v\\\"\\n\"} 1\n";
        assert_eq!(parse(ok).unwrap()[0].labels["k"], "v\"\n");
        for bad in [
            "a 1\n",                                                    // no TYPE
            "# TYPE a gauge\na{k=\"v} 1\n",                             // unterminated
            "# TYPE a gauge\na{k=\"\\x\"} 1\n",                         // bad escape
            "# TYPE a gauge\na one\n",                                  // bad value
            "# TYPE a gauge\n# TYPE b gauge\na 1\nb 1\na{x=\"1\"} 1\n", // split family
            "# TYPE a gauge\na 1\na 1\n",                               // duplicate series
            "# TYPE a gauge\na 1",                                      // no final newline
            "# TYPE 1a gauge\n",                                        // bad name
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
