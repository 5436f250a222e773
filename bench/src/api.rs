//! `bench api`: how fast the server API publishes (`POST /api/rooms/{room}/messages`), and the
//! same publishes over WebSocket (`--ws`) for comparison.
//!
//! C publishers (`--concurrency`), spread round-robin over the `--url`s (or the `--ws` URLs),
//! each on a connection of its own, kept alive, with one message in flight: a publisher sends
//! the next message when the answer to the last one came. Over the API a message is
//! `{"name","content","cid"}` with `Authorization: Bearer KEY` (the first key of
//! `--api-key-file`), answered `201 {"id","epoch","duplicate"}` once it is in the history; over
//! WebSocket it is the same JSON as a text frame, answered `{"ack":"<cid>","id","epoch"}` at the
//! same point (or `{"error",...,"cid"}`). Every message carries a fresh `cid`, so both paths pay
//! the same dedupe. Publisher i posts into room `{--room}-i`, so over WebSocket the only member
//! of its room is the publisher itself: the message comes back to it once (the protocol sends
//! every message to its sender), and no other delivery is paid.
//!
//! Each publisher first opens its connection and publishes one message (subscribing its room on
//! the instance), unmeasured; then all start together, for `--duration` or until `--requests`
//! have been sent in all. Reported: publishes per second, the answers by status (any non-2xx
//! counted and shown) and transport failures, answer latency p50/p99, and CPU per publish of
//! every watched group (`--watch`, `/proc`).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Target, Ws, address_of};
use crate::latency::Percentiles;
use crate::procstat::{Load, Measured, Watch, Window};

/// Pause before a publisher opens a new connection after its last one failed.
const RECONNECT_DELAY: Duration = Duration::from_millis(100);
/// Longest wait for every publisher to have connected and published its first message.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of `bench api`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// http://ADDR of an app's API listener (`api_listen`); repeat to spread the publishers.
    #[arg(long, required_unless_present = "ws", conflicts_with = "ws")]
    pub(crate) url: Vec<String>,
    /// Publish over WebSocket instead: ws:// or wss:// URL of an app's chat socket (without
    /// `room`); repeat to spread the publishers.
    #[arg(long)]
    pub(crate) ws: Vec<String>,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// File of API keys (the app's `api_keys_file`); its first key is used.
    #[arg(long, required_unless_present = "ws")]
    pub(crate) api_key_file: Option<PathBuf>,
    /// Publisher i posts into room NAME-i.
    #[arg(long, default_value = "bench-publish")]
    pub(crate) room: String,
    /// Publishers, each with a keep-alive connection and one message in flight.
    #[arg(long, default_value_t = 16)]
    pub(crate) concurrency: usize,
    /// Publishing time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Stop after this many publishes in all (or at `--duration`, whichever comes first).
    #[arg(long)]
    pub(crate) requests: Option<u64>,
    /// Longest wait for one answer; a publish not answered by then fails.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Processes whose CPU to report over the window: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    pub(crate) watch: Vec<Watch>,
}

/// What `bench api` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// `api` (HTTP POST) or `ws` (WebSocket frames).
    pub path: &'static str,
    /// Publishers asked for.
    pub concurrency: usize,
    /// Publishers that connected and published their first message.
    pub publishers: usize,
    /// Publishes sent in the window.
    pub requests: u64,
    /// Of which answered with success: 2xx, or an ack.
    pub ok: u64,
    /// Of which answered otherwise, or not at all.
    pub failed: u64,
    /// Answers by status: the HTTP status code, or `ack` / `error` over WebSocket.
    pub answers: BTreeMap<String, u64>,
    /// Publishes with no answer: the connection failed or the answer timed out.
    pub transport_errors: u64,
    /// The first failure, when there was one: a non-2xx answer's body, or the transport error.
    pub first_error: Option<String>,
    /// Successful publishes per second over the window.
    pub requests_per_s: f64,
    /// From sending a message to its successful answer.
    pub latency: Percentiles,
    /// CPU microseconds per successful publish of each watched group, in `--watch` order.
    pub cpu_us_per_request: Vec<f64>,
    /// Sum of the watched groups' CPU per successful publish.
    pub server_cpu_us_per_request: f64,
    /// CPU and memory of the watched groups, the generator and the machine over the window.
    #[serde(flatten)]
    pub measured: Measured,
}

/// Where a publisher publishes.
#[derive(Clone)]
enum Endpoint {
    /// The API at this address (`Host` header `authority`), with this bearer key.
    Api {
        addr: SocketAddr,
        authority: String,
        key: Arc<str>,
    },
    /// The chat socket.
    Ws(Target),
}

/// An open connection of a publisher.
enum Conn {
    Api(SendRequest<Full<Bytes>>),
    Ws(Box<Ws>),
}

/// The answer to one publish.
#[derive(Debug, PartialEq)]
struct Answer {
    /// What it is counted under: the HTTP status, or `ack` / `error`.
    label: String,
    /// A success: 2xx, or an ack.
    ok: bool,
    /// What a failure said (the start of the HTTP body, or the error's reason).
    body: Option<String>,
}

/// What one publisher counted in the window.
#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    answers: HashMap<String, u64>,
    sent: u64,
    failed: u64,
    transport_errors: u64,
    first_error: Option<String>,
}

/// The publishers' common state.
struct Shared {
    /// Publishes started in the window, all publishers together.
    issued: AtomicU64,
    /// At most this many (`--requests`).
    limit: u64,
    /// Distinguishes this run's `cid`s from any earlier run's within the dedupe window.
    run: u32,
    timeout: Duration,
}

/// Connects the publishers, publishes for the window, reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    let endpoints = endpoints(&args).await?;
    let room = |i: usize| format!("{}-{i}", args.room);
    let path = if args.ws.is_empty() { "api" } else { "ws" };
    let shared = Arc::new(Shared {
        issued: AtomicU64::new(0),
        limit: args.requests.unwrap_or(u64::MAX),
        run: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default(),
        timeout: args.timeout,
    });
    let (ready_tx, mut ready_rx) = mpsc::channel::<Result<(), String>>(args.concurrency);
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|i| {
            tokio::spawn(publisher(
                i,
                endpoints[i].clone(),
                room(i),
                Arc::clone(&shared),
                ready_tx.clone(),
                start_rx.clone(),
            ))
        })
        .collect();
    drop(ready_tx);

    let mut publishers = 0;
    let ready_deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    for _ in 0..args.concurrency {
        match tokio::time::timeout_at(ready_deadline, ready_rx.recv()).await {
            Ok(Some(Ok(()))) => publishers += 1,
            Ok(Some(Err(e))) => eprintln!("api: a publisher did not start: {e}"),
            Ok(None) | Err(_) => break,
        }
    }
    if publishers == 0 {
        // Dropping the start sender ends every publisher.
        drop(start_tx);
        bail!("no publisher could connect and publish");
    }
    let window = Window::open(&args.watch)?;
    // Receivers are gone only if every publisher ended, which the join below shows.
    let _ = start_tx.send(Some(Instant::now() + args.duration));

    let mut total = Tally::default();
    for task in tasks {
        let tally = task.await.context("publisher task panicked")?;
        total.latencies.extend(tally.latencies);
        for (label, n) in tally.answers {
            *total.answers.entry(label).or_default() += n;
        }
        total.sent += tally.sent;
        total.failed += tally.failed;
        total.transport_errors += tally.transport_errors;
        if total.first_error.is_none() {
            total.first_error = tally.first_error;
        }
    }
    let measured = window.close()?;
    let ok = total.latencies.len() as u64;
    let cpu_us_per_request = measured.cpu_us_per(ok);
    Ok(Report {
        path,
        concurrency: args.concurrency,
        publishers,
        requests: total.sent,
        ok,
        failed: total.failed,
        answers: total.answers.into_iter().collect(),
        transport_errors: total.transport_errors,
        first_error: total.first_error,
        requests_per_s: ok as f64 / measured.wall_s.max(1e-9),
        latency: Percentiles::of(total.latencies),
        server_cpu_us_per_request: cpu_us_per_request.iter().sum(),
        cpu_us_per_request,
        measured,
    })
}

/// Each publisher's endpoint: the URLs round-robin; over WebSocket, the URL of its room.
async fn endpoints(args: &Args) -> anyhow::Result<Vec<Endpoint>> {
    if !args.ws.is_empty() {
        let mut targets = Vec::new();
        for i in 0..args.concurrency {
            let url = &args.ws[i % args.ws.len()];
            if url.contains("room=") {
                bail!("--ws {url}: leave room= out; --room names the rooms");
            }
            let sep = if url.contains('?') { '&' } else { '?' };
            let url = format!("{url}{sep}room={}-{i}", args.room);
            targets.push(Endpoint::Ws(
                Target::resolve(&url, args.ca.as_deref()).await?,
            ));
        }
        return Ok(targets);
    }
    let file = args
        .api_key_file
        .as_ref()
        .context("--api-key-file is required with --url")?;
    let key: Arc<str> = first_key(
        &std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?,
    )
    .with_context(|| format!("{} holds no key", file.display()))?
    .into();
    let mut endpoints = Vec::new();
    for url in &args.url {
        let uri: hyper::Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("--url {url}: the API is plain http://ADDR");
        }
        let authority = uri
            .authority()
            .with_context(|| format!("URL {url} has no host"))?
            .to_string();
        let (_, addr) = address_of(url, &uri, uri.port_u16().unwrap_or(80)).await?;
        endpoints.push(Endpoint::Api {
            addr,
            authority,
            key: Arc::clone(&key),
        });
    }
    Ok((0..args.concurrency)
        .map(|i| endpoints[i % endpoints.len()].clone())
        .collect())
}

/// The first key of an API keys file (blank lines and `#` comments skipped, as the app reads it).
fn first_key(text: &str) -> Option<&str> {
    text.lines()
        .map(str::trim)
        .find(|line| !line.is_empty() && !line.starts_with('#'))
}

/// One publisher: connects, publishes one unmeasured message into `room`, says it is ready,
/// waits for the start, then publishes one message at a time until the window ends.
async fn publisher(
    index: usize,
    endpoint: Endpoint,
    room: String,
    shared: Arc<Shared>,
    ready: mpsc::Sender<Result<(), String>>,
    mut start: watch::Receiver<Option<Instant>>,
) -> Tally {
    let mut tally = Tally::default();
    let mut seq = 0u64;
    let warm = async {
        let mut conn = endpoint.connect(shared.timeout).await?;
        match conn
            .publish(
                &endpoint,
                &room,
                &message(&shared, index, seq),
                shared.timeout,
            )
            .await?
        {
            Answer { ok: true, .. } => anyhow::Ok(conn),
            Answer { label, body, .. } => bail!(
                "first publish answered {label}: {}",
                body.unwrap_or_default()
            ),
        }
    };
    let mut conn = match warm.await {
        Ok(conn) => {
            let _ = ready.send(Ok(())).await;
            Some(conn)
        }
        Err(e) => {
            let _ = ready.send(Err(format!("{e:#}"))).await;
            return tally;
        }
    };
    drop(ready);
    let end = loop {
        if let Some(end) = *start.borrow_and_update() {
            break end;
        }
        if start.changed().await.is_err() {
            return tally;
        }
    };
    while Instant::now() < end && shared.issued.fetch_add(1, Ordering::Relaxed) < shared.limit {
        seq += 1;
        let open = match conn.take() {
            Some(open) => Ok(open),
            None => {
                tokio::time::sleep(RECONNECT_DELAY).await;
                endpoint.connect(shared.timeout).await
            }
        };
        tally.sent += 1;
        let mut open = match open {
            Ok(open) => open,
            Err(e) => {
                tally.transport_errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{e:#}"));
                continue;
            }
        };
        let frame = message(&shared, index, seq);
        let began = Instant::now();
        match open.publish(&endpoint, &room, &frame, shared.timeout).await {
            Ok(Answer { label, ok, body }) => {
                if ok {
                    tally.latencies.push(began.elapsed().as_nanos() as u64);
                } else {
                    tally.failed += 1;
                    tally
                        .first_error
                        .get_or_insert_with(|| format!("{label}: {}", body.unwrap_or_default()));
                }
                *tally.answers.entry(label).or_default() += 1;
                conn = Some(open);
            }
            Err(e) => {
                tally.failed += 1;
                tally.transport_errors += 1;
                tally.first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    if let Some(Conn::Ws(ws)) = conn {
        let mut ws = *ws;
        // Best effort: the figures are taken.
        let _ = tokio::time::timeout(shared.timeout, ws.close(None)).await;
    }
    tally
}

/// The JSON of publisher `index`'s message number `seq`, with a `cid` of its own.
fn message(shared: &Shared, index: usize, seq: u64) -> String {
    serde_json::json!({
        "name": format!("bench-{index}"),
        "content": format!("publish {} {index} {seq}", shared.run),
        "cid": format!("b{}x{index}x{seq}", shared.run),
    })
    .to_string()
}

impl Endpoint {
    /// Opens a connection, within `timeout`.
    async fn connect(&self, timeout: Duration) -> anyhow::Result<Conn> {
        tokio::time::timeout(timeout, self.open())
            .await
            .context("not connected in time")?
    }

    /// Opens a connection; [`Endpoint::connect`] bounds it in time.
    async fn open(&self) -> anyhow::Result<Conn> {
        match self {
            Endpoint::Api { addr, .. } => {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .with_context(|| format!("connecting to {addr}"))?;
                tcp.set_nodelay(true).context("setting TCP_NODELAY")?;
                let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
                    .await
                    .context("HTTP handshake with the API")?;
                tokio::spawn(async move {
                    // Ends with the connection; a failure shows in the next publish.
                    let _ = connection.await;
                });
                Ok(Conn::Api(sender))
            }
            Endpoint::Ws(target) => Ok(Conn::Ws(Box::new(target.connect(None).await?))),
        }
    }
}

impl Conn {
    /// Publishes one message (`frame`, the JSON) into `room` and waits (at most `timeout`) for
    /// its answer.
    async fn publish(
        &mut self,
        endpoint: &Endpoint,
        room: &str,
        frame: &str,
        timeout: Duration,
    ) -> anyhow::Result<Answer> {
        tokio::time::timeout(timeout, self.exchange(endpoint, room, frame))
            .await
            .context("no answer in time")?
    }

    async fn exchange(
        &mut self,
        endpoint: &Endpoint,
        room: &str,
        frame: &str,
    ) -> anyhow::Result<Answer> {
        match (self, endpoint) {
            (Conn::Api(sender), Endpoint::Api { authority, key, .. }) => {
                let request = hyper::Request::post(format!("/api/rooms/{room}/messages"))
                    .header(hyper::header::HOST, authority.as_str())
                    .header(hyper::header::AUTHORIZATION, format!("Bearer {key}"))
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(Bytes::from(frame.to_owned())))
                    .context("building the request")?;
                sender.ready().await.context("API connection")?;
                let response = sender
                    .send_request(request)
                    .await
                    .context("posting a message")?;
                let status = response.status();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .context("reading the answer")?
                    .to_bytes();
                Ok(Answer {
                    label: status.as_u16().to_string(),
                    ok: status.is_success(),
                    body: (!status.is_success())
                        .then(|| String::from_utf8_lossy(&body).chars().take(200).collect()),
                })
            }
            (Conn::Ws(ws), Endpoint::Ws(_)) => {
                let cid = cid_of(frame).context("the frame has no cid")?;
                ws.send(Message::text(frame.to_owned()))
                    .await
                    .context("sending a message")?;
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Text(text))) => {
                            if let Some(answer) = answer_to(text.as_str(), &cid) {
                                return Ok(answer);
                            }
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => return Err(e).context("reading the answer"),
                        None => bail!("the server closed the connection"),
                    }
                }
            }
            _ => bail!("a connection of the wrong kind"),
        }
    }
}

/// The `cid` of one of our frames.
fn cid_of(frame: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct WithCid {
        cid: String,
    }
    serde_json::from_str::<WithCid>(frame).ok().map(|f| f.cid)
}

/// Whether a text frame is the answer to the message with `cid`, and which: `{"ack":cid,...}`
/// or `{"error":...,"cid":cid}`. Anything else (the message coming back, a notice) is not.
fn answer_to(text: &str, cid: &str) -> Option<Answer> {
    #[derive(Deserialize)]
    struct Reply {
        ack: Option<String>,
        error: Option<String>,
        cid: Option<String>,
    }
    let reply: Reply = serde_json::from_str(text).ok()?;
    if reply.ack.as_deref() == Some(cid) {
        return Some(Answer {
            label: "ack".to_owned(),
            ok: true,
            body: None,
        });
    }
    match (reply.error, reply.cid.as_deref()) {
        (Some(error), Some(c)) if c == cid => Some(Answer {
            label: "error".to_owned(),
            ok: false,
            body: Some(error),
        }),
        _ => None,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let over = if self.path == "api" {
            "the server API"
        } else {
            "WebSocket"
        };
        writeln!(
            f,
            "publish over {over}: {} of {} publishers, one message in flight each",
            self.publishers, self.concurrency
        )?;
        writeln!(
            f,
            "  sent {}, ok {}, failed {} ({} without an answer); answers {:?}",
            self.requests, self.ok, self.failed, self.transport_errors, self.answers
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "  first failure: {e}")?;
        }
        writeln!(f, "  publishes/s    {:.0}", self.requests_per_s)?;
        writeln!(f, "  latency        {}", self.latency)?;
        self.measured.write_cpu_rows(
            f,
            &self.cpu_us_per_request,
            "publish",
            Some(self.server_cpu_us_per_request),
            Load::Generator,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use http_body_util::Full;
    use hyper::service::service_fn;

    #[test]
    fn the_first_key_skips_blanks_and_comments() {
        assert_eq!(first_key("# keys\n\n  k1 \nk2\n"), Some("k1"));
        assert_eq!(first_key("# none\n\n"), None);
    }

    #[test]
    fn only_the_answer_to_this_cid_counts() {
        assert_eq!(
            answer_to(r#"{"ack":"c1","id":"1-0","epoch":"e"}"#, "c1"),
            Some(Answer {
                label: "ack".into(),
                ok: true,
                body: None
            })
        );
        assert_eq!(
            answer_to(r#"{"error":"too fast","cid":"c1","retry":true}"#, "c1"),
            Some(Answer {
                label: "error".into(),
                ok: false,
                body: Some("too fast".into())
            })
        );
        for other in [
            r#"{"ack":"c0","id":"1-0","epoch":"e"}"#,
            r#"{"error":"too fast","cid":"c0"}"#,
            r#"{"error":"not JSON"}"#,
            r#"{"time":"t","name":"n","content":"c","id":"1-0"}"#,
            "not json",
        ] {
            assert_eq!(answer_to(other, "c1"), None, "{other}");
        }
        assert_eq!(cid_of(r#"{"name":"n","cid":"x1"}"#).as_deref(), Some("x1"));
    }

    /// An API in miniature: 201 for a POST to a room's messages with key `k`, 401 without it,
    /// and 400 for every tenth request it answers.
    async fn api_server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let answered = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let answered = Arc::clone(&answered);
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let answered = Arc::clone(&answered);
                            async move {
                                let keyed = request
                                    .headers()
                                    .get(hyper::header::AUTHORIZATION)
                                    .is_some_and(|v| v == "Bearer k");
                                let room_path = request.uri().path().starts_with("/api/rooms/r-")
                                    && request.uri().path().ends_with("/messages");
                                let body = request.into_body().collect().await.unwrap().to_bytes();
                                let text = String::from_utf8_lossy(&body).to_string();
                                let status = if !keyed {
                                    401
                                } else if !room_path || cid_of(&text).is_none() {
                                    404
                                } else if (answered.fetch_add(1, Ordering::SeqCst) + 1) % 10 == 0 {
                                    400
                                } else {
                                    201
                                };
                                hyper::Response::builder()
                                    .status(status)
                                    .body(Full::new(Bytes::from_static(b"{\"error\":\"no\"}")))
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    fn args(url: Vec<String>, ws: Vec<String>, key_file: Option<PathBuf>) -> Args {
        Args {
            url,
            ws,
            ca: None,
            api_key_file: key_file,
            room: "r".into(),
            concurrency: 3,
            duration: Duration::from_secs(10),
            requests: Some(60),
            timeout: Duration::from_secs(5),
            watch: vec![Watch::this_process()],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn posts_until_the_budget_and_counts_every_status() {
        let addr = api_server().await;
        let dir = tempfile::tempdir().unwrap();
        let keys = dir.path().join("keys");
        std::fs::write(&keys, "# the key\nk\n").unwrap();
        let report = run(args(vec![format!("http://{addr}")], vec![], Some(keys)))
            .await
            .unwrap();
        assert_eq!((report.publishers, report.requests), (3, 60));
        assert_eq!(report.ok + report.failed, 60);
        // Requests 1 to 3 were the publishers' first, 4 to 63 the window's: 10, 20 .. 60 fail.
        assert_eq!(report.answers.get("400"), Some(&6));
        assert_eq!(report.answers.get("201"), Some(&54));
        assert_eq!(report.transport_errors, 0);
        assert!(report.first_error.unwrap().starts_with("400"));
        assert_eq!(report.latency.count, 54);

        let wrong = dir.path().join("wrong");
        std::fs::write(&wrong, "nope\n").unwrap();
        let err = run(args(vec![format!("http://{addr}")], vec![], Some(wrong)))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("no publisher"), "{err:#}");
    }

    /// A chat socket in miniature: every frame comes back, then its ack.
    async fn ws_server() -> SocketAddr {
        crate::test_server::ws_server(|mut ws| async move {
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                let cid = cid_of(text.as_str()).unwrap();
                let ack = format!(r#"{{"ack":"{cid}","id":"1-0","epoch":"e"}}"#);
                if ws.send(Message::Text(text)).await.is_err()
                    || ws.send(Message::text(ack)).await.is_err()
                {
                    return;
                }
            }
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn publishes_over_websocket_paced_on_the_acks() {
        let addr = ws_server().await;
        let report = run(args(vec![], vec![format!("ws://{addr}/ws")], None))
            .await
            .unwrap();
        assert_eq!((report.path, report.publishers), ("ws", 3));
        assert_eq!((report.requests, report.ok, report.failed), (60, 60, 0));
        assert_eq!(report.answers.get("ack"), Some(&60));
        let err = run(args(vec![], vec![format!("ws://{addr}/ws?room=x")], None))
            .await
            .unwrap_err();
        assert!(format!("{err:#}").contains("leave room= out"), "{err:#}");
    }
}
