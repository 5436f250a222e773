//! Balancing, health checks and the admin listener with real backends on loopback.
//!
//! First the parts on their own: the checker takes a backend whose `/healthz` fails out after
//! `fall` checks and back after `rise`, and the admin listener's `/metrics` over real TCP parses
//! as Prometheus text and shows each backend. Then through the real load balancer (TLS, the
//! proxy, WebSocket tunnels): round-robin spreads connections evenly and by weight,
//! least-connections sends new tunnels to the less loaded backend, and a stopped backend
//! costs no request: it is marked down after `fall` checks, comes back after `rise` once
//! restarted, and `/metrics` counts exactly what the test did.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use crate::support::{
    Pki, TestBackend, TestConfig, https_get, start_lb, wait_until, within, ws_connect, ws_echo,
};
use arc_swap::ArcSwap;
use futures_util::StreamExt;
use lb::backends::balance::{Backend, Policy, Pool};
use lb::backends::health::{self, HealthConfig};
use lb::metrics::Metrics;
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Fast checks so the tests finish quickly: HAProxy's semantics on a shorter clock.
fn fast_checks() -> HealthConfig {
    HealthConfig {
        interval: Duration::from_millis(50),
        timeout: Duration::from_millis(500),
        rise: 2,
        fall: 3,
        ..HealthConfig::default()
    }
}

/// The same checks as an lb.toml `[health]` table body.
const FAST_CHECKS_TOML: &str = "interval = \"50ms\"\ntimeout = \"500ms\"\nrise = 2\nfall = 3\n";

fn pool_of(backends: &[&TestBackend], policy: Policy) -> Arc<Pool> {
    let backends = backends
        .iter()
        .map(|b| Arc::new(Backend::new(b.name().into(), b.addr(), 1)))
        .collect();
    Arc::new(Pool::new(backends, policy))
}

/// Health checkers on a pool, stopped (and awaited) by [`Checks::stop`].
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
        within("health checkers stop when cancelled", self.tracker.wait()).await;
    }
}

/// `GET path` on the admin listener at `addr`: status and body.
async fn admin_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let response = testkit::http::http_get(addr, path).await.unwrap();
    (response.status, response.text())
}

/// `/metrics` from the admin listener at `addr`, checked to be valid exposition text.
async fn scrape(addr: SocketAddr) -> Scrape {
    let (status, text) = admin_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    let samples = prometheus::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    Scrape { text, samples }
}

struct Scrape {
    text: String,
    samples: Vec<prometheus::Sample>,
}

impl Scrape {
    /// The value of the series `name{labels}`; panics if there is no such series.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == labels)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{}", self.text))
            .value
    }

    /// The value of a per-backend series, with `extra` labels after `backend` and `addr`.
    fn backend(&self, name: &str, backend: &TestBackend, extra: &[(&str, &str)]) -> f64 {
        let addr = backend.addr().to_string();
        let mut labels = vec![("backend", backend.name()), ("addr", addr.as_str())];
        labels.extend_from_slice(extra);
        self.value(name, &labels)
    }
}

#[tokio::test]
async fn failing_health_endpoint_takes_a_backend_out_and_back() {
    let app1 = TestBackend::start("app1").await;
    let app2 = TestBackend::start("app2").await;
    let pool = pool_of(&[&app1, &app2], Policy::RoundRobin);
    let (b1, b2) = (&pool.backends()[0], &pool.backends()[1]);
    let checks = Checks::start(&pool, fast_checks());
    wait_until("checks of both backends", || {
        app1.health_checks() >= 3 && app2.health_checks() >= 3
    })
    .await;
    assert!(b1.is_up() && b2.is_up());

    // Draining, as the app does on SIGTERM: /healthz answers 503.
    app1.set_health_status(503);
    let answered_before = app1.health_checks();
    wait_until("app1 marked down", || !b1.is_up()).await;
    assert!(
        app1.health_checks() - answered_before >= 3,
        "down only after `fall` failed checks"
    );
    assert!(b2.is_up());
    for _ in 0..10 {
        assert_eq!(pool.pick(&[]).expect("app2 is up").name(), "app2");
    }

    app1.set_health_status(200);
    let answered_before = app1.health_checks();
    wait_until("app1 marked up again", || b1.is_up()).await;
    assert!(
        app1.health_checks() - answered_before >= 2,
        "up only after `rise` passed checks"
    );
    assert_eq!(b1.stats().transitions_down.load(Relaxed), 1);
    assert_eq!(b1.stats().transitions_up.load(Relaxed), 1);
    assert_eq!(b2.stats().transitions_down.load(Relaxed), 0);
    checks.stop().await;
}

#[tokio::test]
async fn admin_metrics_parse_and_show_each_backend() {
    let app1 = TestBackend::start("app1").await;
    let app2 = TestBackend::start("app2").await;
    let pool = pool_of(&[&app1, &app2], Policy::LeastConnections);
    let (b1, b2) = (&pool.backends()[0], &pool.backends()[1]);
    b1.stats().requests.fetch_add(5, Relaxed);
    b1.stats().bytes_to_client.fetch_add(1234, Relaxed);
    let _tunnel = b1.lease();
    let metrics = Arc::new(Metrics::default());
    metrics.connections_total.fetch_add(3, Relaxed);
    metrics.record_response(200);

    let checks = Checks::start(&pool, fast_checks());
    app2.stop();
    wait_until("app2 marked down", || !b2.is_up()).await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_addr = listener.local_addr().unwrap();
    let token = CancellationToken::new();
    let admin = tokio::spawn(lb::ops::admin::serve(
        listener,
        Arc::clone(&metrics),
        Arc::new(ArcSwap::from(Arc::clone(&pool))),
        token.clone(),
    ));

    let m = scrape(admin_addr).await;
    assert_eq!(m.value("lb_connections_total", &[]), 3.0);
    assert_eq!(m.value("lb_responses_total", &[("class", "2xx")]), 1.0);
    assert_eq!(m.backend("lb_backend_up", &app1, &[]), 1.0);
    assert_eq!(m.backend("lb_backend_up", &app2, &[]), 0.0);
    assert_eq!(m.backend("lb_backend_requests_total", &app1, &[]), 5.0);
    assert_eq!(m.backend("lb_backend_active_connections", &app1, &[]), 1.0);
    assert_eq!(m.backend("lb_backend_active_connections", &app2, &[]), 0.0);
    let to_client = [("direction", "to_client")];
    assert_eq!(
        m.backend("lb_backend_bytes_total", &app1, &to_client),
        1234.0
    );
    let to_down = [("to", "down")];
    assert_eq!(
        m.backend("lb_backend_health_transitions_total", &app2, &to_down),
        1.0
    );

    let (status, json) = admin_get(admin_addr, "/stats").await;
    assert_eq!(status, 200);
    let app2_json = format!(
        "{{\"name\":\"app2\",\"addr\":\"{}\",\"up\":false,",
        app2.addr()
    );
    assert!(json.contains(&app2_json), "{json}");
    let (status, html) = admin_get(admin_addr, "/").await;
    assert_eq!(status, 200);
    assert!(html.contains("<td>app2</td>"));
    assert_eq!(admin_get(admin_addr, "/nope").await.0, 404);

    token.cancel();
    within("admin stops when cancelled", admin).await.unwrap();
    checks.stop().await;
}

/// Which of `backends` answered `GET /` on a fresh client connection through lb at `addr`
/// (its index), asserting the request succeeded.
async fn served_by(pki: &Pki, addr: SocketAddr, backends: &[TestBackend]) -> usize {
    let response = https_get(pki, addr, "/").await;
    assert_eq!(response.status, 200, "{}", response.text());
    let name = response.backend().expect("x-backend header");
    backends
        .iter()
        .position(|b| b.name() == name)
        .expect("a known backend")
}

/// `config` as lb.toml with a `weight` for each backend.
fn with_weights(config: &TestConfig, weights: &[u32]) -> lb::Config {
    let mut toml = config.toml();
    for ((_, addr), weight) in config.backends.iter().zip(weights) {
        let line = format!("addr = \"{addr}\"\n");
        toml = toml.replace(&line, &format!("{line}weight = {weight}\n"));
    }
    lb::Config::parse(&toml, "test.toml", &config.base, &lb::Overrides::default())
        .expect("valid weighted config")
}

#[tokio::test]
async fn round_robin_spreads_connections_evenly() {
    let backends = TestBackend::start_many(2).await;
    let pki = Pki::local();
    let lb = start_lb(&TestConfig::new(&pki, &[&backends[0], &backends[1]])).await;
    let mut served = [0; 2];
    for _ in 0..20 {
        served[served_by(&pki, lb.addrs().https, &backends).await] += 1;
    }
    assert_eq!(served, [10, 10]);
    within("lb shutdown", lb.shutdown()).await;
}

#[tokio::test]
async fn weighted_round_robin_follows_the_weights() {
    let backends = TestBackend::start_many(2).await;
    let pki = Pki::local();
    let config = TestConfig::new(&pki, &[&backends[0], &backends[1]]);
    let lb = lb::Lb::start(with_weights(&config, &[3, 1]))
        .await
        .expect("lb starts");
    let mut served = [0; 2];
    for _ in 0..40 {
        served[served_by(&pki, lb.addrs().https, &backends).await] += 1;
    }
    assert_eq!(served, [30, 10]);
    within("lb shutdown", lb.shutdown()).await;
}

/// Closes a tunnel and waits for the close handshake to finish.
async fn close(mut ws: crate::support::WsClient) {
    within("close a tunnel", ws.close(None))
        .await
        .expect("send close");
    within("close handshake", async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

#[tokio::test]
async fn least_connections_sends_new_tunnels_to_the_less_loaded_backend() {
    let backends = TestBackend::start_many(2).await;
    let pki = Pki::local();
    let mut config = TestConfig::new(&pki, &[&backends[0], &backends[1]]);
    config.policy = "least-connections".into();
    let lb = start_lb(&config).await;
    let addr = lb.addrs().https;

    // Opens a tunnel and returns it with the index of the backend it reached.
    let open = async || {
        let before: Vec<usize> = backends.iter().map(TestBackend::ws_total).collect();
        let mut ws = ws_connect(&pki, addr, "/ws").await;
        // The echo proves the backend's session is running (and counted).
        ws_echo(&mut ws, Message::text("hello")).await;
        let landed = (0..backends.len())
            .find(|&i| backends[i].ws_total() > before[i])
            .expect("the tunnel reached a backend");
        (ws, landed)
    };

    let mut tunnels = Vec::new();
    for _ in 0..4 {
        tunnels.push(open().await);
    }
    let on = |tunnels: &[(crate::support::WsClient, usize)], i| {
        tunnels.iter().filter(|t| t.1 == i).count()
    };
    assert_eq!(
        (on(&tunnels, 0), on(&tunnels, 1)),
        (2, 2),
        "equal load alternates"
    );

    // Close both tunnels on backend 1: now backend 0 carries 2, backend 1 none.
    let (closing, mut tunnels): (Vec<_>, Vec<_>) = tunnels.into_iter().partition(|t| t.1 == 1);
    for (ws, _) in closing {
        close(ws).await;
    }
    let pool = lb.pool();
    wait_until("backend 1's leases released", || {
        pool.backends()[1].active() == 0 && backends[1].ws_open() == 0
    })
    .await;
    assert_eq!(pool.backends()[0].active(), 2);

    // Round-robin would split these; least-connections fills backend 1 first.
    for _ in 0..2 {
        let (ws, landed) = open().await;
        assert_eq!(landed, 1, "a new tunnel goes to the less loaded backend");
        tunnels.push((ws, landed));
    }
    assert_eq!((backends[0].ws_open(), backends[1].ws_open()), (2, 2));
    for (ws, _) in tunnels {
        close(ws).await;
    }
    within("lb shutdown", lb.shutdown()).await;
}

#[tokio::test]
async fn stopped_backend_costs_no_request_and_metrics_count_it() {
    let backends = TestBackend::start_many(2).await;
    let pki = Pki::local();
    let mut config = TestConfig::new(&pki, &[&backends[0], &backends[1]]);
    config.health = FAST_CHECKS_TOML.into();
    config.admin = true;
    let lb = start_lb(&config).await;
    let (https, admin) = (lb.addrs().https, lb.addrs().admin.expect("admin listener"));
    let pool = lb.pool();
    let (b0, b1) = (&pool.backends()[0], &pool.backends()[1]);
    assert_eq!(b0.addr(), backends[0].addr());

    let mut served = [0usize; 2];
    let mut sent = 0;
    wait_until("both backends checked", || {
        backends[0].health_checks() >= 2 && backends[1].health_checks() >= 2
    })
    .await;
    for _ in 0..10 {
        served[served_by(&pki, https, &backends).await] += 1;
        sent += 1;
    }
    assert_eq!(served, [5, 5]);

    // Stop backend 0 (listener and connections) and keep the requests coming while lb
    // notices: each must still succeed, served by backend 1.
    backends[0].stop();
    within("backend 0 marked down", async {
        while b0.is_up() {
            assert_eq!(served_by(&pki, https, &backends).await, 1);
            sent += 1;
        }
    })
    .await;
    assert!(b1.is_up());
    assert_eq!(b0.stats().transitions_down.load(Relaxed), 1);
    for _ in 0..10 {
        assert_eq!(served_by(&pki, https, &backends).await, 1);
        sent += 1;
    }

    // Restart it: back in rotation after `rise` passed checks, requests succeeding throughout.
    let answered_before = backends[0].health_checks();
    backends[0].restart().await;
    within("backend 0 marked up", async {
        while !b0.is_up() {
            // Either may answer: backend 0 can come up between the check and the pick.
            served_by(&pki, https, &backends).await;
            sent += 1;
        }
    })
    .await;
    assert!(backends[0].health_checks() - answered_before >= 2);
    assert_eq!(b0.stats().transitions_up.load(Relaxed), 1);
    let mut after = [0usize; 2];
    for _ in 0..10 {
        after[served_by(&pki, https, &backends).await] += 1;
        sent += 1;
    }
    assert_eq!(after, [5, 5], "both backends in rotation again");

    let m = scrape(admin).await;
    let total = sent as f64;
    assert_eq!(m.value("lb_requests_total", &[]), total);
    assert_eq!(m.value("lb_responses_total", &[("class", "2xx")]), total);
    assert_eq!(m.value("lb_responses_total", &[("class", "5xx")]), 0.0);
    assert_eq!(m.value("lb_connections_total", &[]), total);
    for (i, backend) in backends.iter().enumerate() {
        assert_eq!(m.backend("lb_backend_up", backend, &[]), 1.0);
        let transitions = f64::from(u8::from(i == 0));
        let down = m.backend(
            "lb_backend_health_transitions_total",
            backend,
            &[("to", "down")],
        );
        let up = m.backend(
            "lb_backend_health_transitions_total",
            backend,
            &[("to", "up")],
        );
        assert_eq!((down, up), (transitions, transitions), "{}", backend.name());
        let to_client = m.backend(
            "lb_backend_bytes_total",
            backend,
            &[("direction", "to_client")],
        );
        assert!(to_client > 0.0, "{}", backend.name());
    }
    let forwarded = m.backend("lb_backend_requests_total", &backends[0], &[])
        + m.backend("lb_backend_requests_total", &backends[1], &[]);
    // A request replayed after a pooled connection turned out closed counts twice.
    assert!(forwarded >= total, "{forwarded} forwarded for {total} sent");
    assert_eq!(
        m.backend("lb_backend_connect_failures_total", &backends[0], &[]),
        b0.stats().connect_failures.load(Relaxed) as f64
    );
    assert_eq!(
        m.backend("lb_backend_connect_failures_total", &backends[1], &[]),
        0.0
    );
    within("lb shutdown", lb.shutdown()).await;
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
