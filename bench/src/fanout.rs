//! `bench fanout`: chat fan-out load, N clients of which S send at a total rate R for D seconds.
//!
//! Every client connects first (spread round-robin over the URLs) and joins as its `--protocol`
//! asks ([`crate::protocol`]: the chat JSON, Socket.IO, Pusher channels). A URL's `room` query parameter
//! names the room its clients join (none: the main room); a message is expected by every
//! connected client of its sender's room. Then each sender sends the chat
//! JSON `{"name": ..., "content": "RUN:SENDER:SEQ:UNIX_NANOS"}` (framed by the protocol; for
//! Pusher triggered through the HTTP events API, [`crate::pusher`]) on its own staggered ticker while
//! every client reads: each delivery is parsed, checked against a per-client bitset of
//! (sender, seq) to count duplicates, and its latency (receive time minus the send timestamp) kept.
//! After the sending window the run waits (up to `--drain`) for the expected deliveries
//! (each message × the connected clients of its room, the sender included), samples CPU of the watched processes
//! and of the generator, and reports loss, duplicates, rate, latency percentiles and CPU per
//! delivery.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ::tests::chaos::{self, Key, parse_content, unix_nanos};
use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Target, Ws};
use crate::latency::Percentiles;
use crate::procstat::{Load, Measured, Watch, Window};
use crate::protocol::{Incoming, Protocol, Session};
use crate::pusher::{self, Trigger};
use crate::tokens;

/// How often the main task checks whether every expected delivery has arrived.
const DRAIN_POLL: Duration = Duration::from_millis(5);
/// Longest wait for a client's close handshake at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause before each attempt to reconnect (`--reconnect`).
const RECONNECT_DELAY: Duration = Duration::from_millis(200);
/// How often the fault point (`--fault-point`) checks that deliveries are arriving.
const FAULT_POINT_POLL: Duration = Duration::from_millis(50);

/// Options of `bench fanout`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ws:// or wss:// URL of the chat WebSocket; repeat to spread clients over several.
    #[arg(long, required = true)]
    pub(crate) url: Vec<String>,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Connected clients, all receiving.
    #[arg(long, default_value_t = 1000)]
    pub(crate) clients: usize,
    /// How many of the clients also send.
    #[arg(long, default_value_t = 50)]
    pub(crate) senders: usize,
    /// Total messages per second over all senders.
    #[arg(long, default_value_t = 25.0)]
    pub(crate) rate: f64,
    /// Sending time.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub(crate) duration: Duration,
    /// Longest wait after sending for the last deliveries.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) drain: Duration,
    /// Pause between the last connection and the first message (the server registers clients).
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    pub(crate) settle: Duration,
    /// Handshakes in flight at once while connecting.
    #[arg(long, default_value_t = 100)]
    pub(crate) concurrency: usize,
    /// Processes whose CPU to report over the window: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    pub(crate) watch: Vec<Watch>,
    /// The protocol the clients speak.
    #[arg(long, value_enum, default_value_t)]
    pub(crate) protocol: Protocol,
    /// Pusher app credentials, ID:KEY:SECRET, to sign the senders' HTTP API requests.
    #[arg(long, required_if_eq("protocol", "pusher"))]
    pub(crate) pusher_app: Option<pusher::App>,
    /// A client whose connection ends opens a new one and joins again, recovering what it missed
    /// where the protocol can (Socket.IO's connection state recovery).
    #[arg(long)]
    pub(crate) reconnect: bool,
    /// Token mode: how each client gets the token it signs in with.
    #[command(flatten)]
    pub(crate) tokens: tokens::TokenArgs,
    /// Once sending has run this long, print `fanout: fault point` on stderr as soon as
    /// deliveries are seen arriving: the moment a fault injected from outside is due (bench/run's
    /// faults wait for that line).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub(crate) fault_point: Option<Duration>,
}

/// What `bench fanout` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Clients asked for.
    pub clients: usize,
    /// Clients that connected.
    pub connected: usize,
    /// Sending clients.
    pub senders: usize,
    /// Target total send rate, msg/s.
    pub rate: f64,
    /// Sending time, seconds.
    pub duration_s: f64,
    /// Messages sent.
    pub sent: u64,
    /// Deliveries expected: each message × the connected clients of its room.
    pub expected: u64,
    /// Distinct deliveries received.
    pub delivered: u64,
    /// Expected but never received.
    pub lost: u64,
    /// Deliveries received more than once.
    pub duplicates: u64,
    /// `{"error": ...}` answers received.
    pub errors: u64,
    /// Clients whose connection ended during the run (and did not reconnect).
    pub disconnects: usize,
    /// New connections opened after one ended (`--reconnect`).
    pub reconnects: u64,
    /// Deliveries per second over the sending time.
    pub deliveries_per_s: f64,
    /// Delivery latency (send timestamp to receipt).
    pub latency: Percentiles,
    /// Seconds from the first send to the last delivery (or the drain timeout).
    pub window_s: f64,
    /// Seconds into sending when the fault point was printed (`--fault-point`; none when
    /// deliveries had stopped arriving by then).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_point_s: Option<f64>,
    /// CPU microseconds per delivery of each watched group, in `--watch` order.
    pub cpu_us_per_delivery: Vec<f64>,
    /// Sum of the watched groups' CPU per delivery.
    pub server_cpu_us_per_delivery: f64,
    /// Sum of the watched groups' CPU per connected client while the clients connected (the
    /// handshake, and in token mode the token's verification and the user's count).
    pub server_cpu_us_per_connect: f64,
    /// CPU and memory of the watched groups, the generator and the machine over the window.
    #[serde(flatten)]
    pub measured: Measured,
}

/// State shared by the client tasks and the main task.
struct Shared {
    /// Run identifier inside every content, so stray messages from other runs are ignored.
    run: u32,
    senders: usize,
    /// Highest sequence number (exclusive) a sender may use: sizes the duplicate bitsets.
    per_sender: usize,
    sent: AtomicU64,
    /// Deliveries the messages sent so far call for.
    expected: AtomicU64,
    delivered: AtomicU64,
    /// Senders still within their sending time.
    sending: AtomicUsize,
    /// End of the sending time.
    end: Instant,
}

/// What one client saw.
#[derive(Default)]
struct Tally {
    latencies: Vec<u64>,
    duplicates: u64,
    errors: u64,
    disconnected: bool,
    reconnects: u64,
}

/// Connects, loads, drains, reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.clients == 0 || args.senders == 0 || args.senders > args.clients {
        bail!("need 1 <= --senders <= --clients");
    }
    if !args.rate.is_finite() || args.rate <= 0.0 || args.concurrency == 0 {
        bail!("--rate and --concurrency must be positive");
    }
    client::room_for(args.clients)?;
    let mut targets = Vec::new();
    for url in &args.url {
        targets.push(Target::resolve(url, args.ca.as_deref()).await?);
    }
    // Tokens are signed before the connections open: the generator's signing is not measured.
    let tokens = match args.tokens.signer()? {
        Some(signer) => (0..args.clients)
            .map(|i| signer.mint(&format!("bench-{i}")).map(Some))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => vec![None; args.clients],
    };
    let connecting = Window::open(&args.watch)?;
    let conns = connect_all(&targets, args.protocol, tokens, args.concurrency).await;
    let connect_cpu = connecting.close()?;
    // Each client's room, and the connected members of each room.
    let rooms: Vec<usize> = {
        let mut names: Vec<Option<String>> = Vec::new();
        targets
            .iter()
            .map(|t| {
                let name = room_of(t.url());
                names.iter().position(|n| *n == name).unwrap_or_else(|| {
                    names.push(name);
                    names.len() - 1
                })
            })
            .collect()
    };
    let mut members = vec![0u64; targets.len()];
    for (i, conn) in conns.iter().enumerate() {
        if conn.is_some() {
            members[rooms[i % targets.len()]] += 1;
        }
    }
    let failed_connects = conns.iter().filter(|c| c.is_none()).count();
    if failed_connects > 0 {
        eprintln!(
            "fanout: {failed_connects} of {} clients failed to connect",
            args.clients
        );
    }
    tokio::time::sleep(args.settle).await;

    let start = Instant::now() + Duration::from_millis(20);
    let period = Duration::from_secs_f64(args.senders as f64 / args.rate);
    let shared = Arc::new(Shared {
        run: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default(),
        senders: args.senders,
        per_sender: (args.duration.as_secs_f64() * args.rate / args.senders as f64).ceil() as usize
            + 2,
        sent: AtomicU64::new(0),
        expected: AtomicU64::new(0),
        delivered: AtomicU64::new(0),
        sending: AtomicUsize::new(0),
        end: start + args.duration,
    });
    let stop = CancellationToken::new();
    let pusher_app = args.pusher_app.map(Arc::new);
    let mut tasks = Vec::new();
    let mut triggers = Vec::new();
    for (i, conn) in conns.into_iter().enumerate() {
        let Some((ws, session)) = conn else { continue };
        let trigger = match (&pusher_app, i < args.senders) {
            (Some(app), true) if args.protocol == Protocol::Pusher => {
                let (trigger, task) =
                    Trigger::spawn(targets[i % targets.len()].clone(), Arc::clone(app));
                triggers.push(task);
                Some(trigger)
            }
            _ => None,
        };
        let ticker = (i < args.senders).then(|| {
            shared.sending.fetch_add(1, Ordering::Relaxed);
            // Stagger the senders evenly over one period so the total rate is smooth.
            let first = start + period.mul_f64(i as f64 / args.senders as f64);
            let mut t = tokio::time::interval_at(first.into(), period);
            t.set_missed_tick_behavior(MissedTickBehavior::Burst);
            (i, t)
        });
        tasks.push(tokio::spawn(client(
            ws,
            session,
            Sending {
                protocol: args.protocol,
                ticker,
                trigger,
                reconnect: args.reconnect.then(|| targets[i % targets.len()].clone()),
            },
            members[rooms[i % targets.len()]],
            Arc::clone(&shared),
            stop.clone(),
        )));
    }
    let connected = tasks.len();

    tokio::time::sleep_until(start.into()).await;
    let window = Window::open(&args.watch)?;
    let fault_point = args
        .fault_point
        .map(|at| tokio::spawn(fault_point(Arc::clone(&shared), start, at)));
    tokio::time::sleep_until(shared.end.into()).await;
    let drain_deadline = Instant::now() + args.drain;
    loop {
        let done_sending = shared.sending.load(Ordering::Acquire) == 0;
        let expected = shared.expected.load(Ordering::Acquire);
        if (done_sending && shared.delivered.load(Ordering::Acquire) >= expected)
            || Instant::now() >= drain_deadline
        {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    let measured = window.close()?;
    stop.cancel();
    let fault_point_s = match fault_point {
        Some(task) => task.await.context("fault point task panicked")?,
        None => None,
    };

    let mut latencies = Vec::new();
    let (mut duplicates, mut errors, mut disconnects, mut reconnects) = (0, 0, failed_connects, 0);
    for task in tasks {
        let tally = task.await.context("client task panicked")?;
        latencies.extend(tally.latencies);
        duplicates += tally.duplicates;
        errors += tally.errors;
        disconnects += usize::from(tally.disconnected);
        reconnects += tally.reconnects;
    }
    for task in triggers {
        errors += task.await.context("trigger task panicked")?;
    }
    let sent = shared.sent.load(Ordering::Acquire);
    let expected = shared.expected.load(Ordering::Acquire);
    let delivered = latencies.len() as u64;
    let cpu_us_per_delivery = measured.cpu_us_per(delivered);
    Ok(Report {
        clients: args.clients,
        connected,
        senders: args.senders,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        sent,
        expected,
        delivered,
        lost: expected.saturating_sub(delivered),
        duplicates,
        errors,
        disconnects,
        reconnects,
        deliveries_per_s: delivered as f64 / args.duration.as_secs_f64(),
        latency: Percentiles::of(latencies),
        window_s: measured.wall_s,
        fault_point_s,
        server_cpu_us_per_delivery: cpu_us_per_delivery.iter().sum(),
        server_cpu_us_per_connect: connect_cpu.cpu_us_per(connected as u64).iter().sum(),
        cpu_us_per_delivery,
        measured,
    })
}

/// Waits until sending (begun at `start`) has run `at`, then until a delivery is counted, and says
/// so on stderr: the load is seen running when a fault is injected. Gives up when sending ends
/// first. Returns the seconds into sending of the mark.
async fn fault_point(shared: Arc<Shared>, start: Instant, at: Duration) -> Option<f64> {
    tokio::time::sleep_until((start + at).into()).await;
    let mut before = shared.delivered.load(Ordering::Acquire);
    while Instant::now() < shared.end {
        tokio::time::sleep(FAULT_POINT_POLL).await;
        let now = shared.delivered.load(Ordering::Acquire);
        if now > before {
            let into = start.elapsed().as_secs_f64();
            eprintln!("fanout: fault point, {into:.1} s into sending, {now} deliveries counted");
            return Some(into);
        }
        before = now;
    }
    eprintln!("fanout: no deliveries arriving at the fault point");
    None
}

/// Opens `n` connections spread round-robin over `targets` and joins each as `protocol` says;
/// `None` where one failed.
async fn connect_all(
    targets: &[Target],
    protocol: Protocol,
    tokens: Vec<Option<String>>,
    concurrency: usize,
) -> Vec<Option<(Ws, Session)>> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let n = tokens.len();
    let tasks: Vec<_> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, token)| {
            let target = targets[i % targets.len()].clone();
            let gate = Arc::clone(&gate);
            tokio::spawn(async move {
                let _permit = gate.acquire().await.ok()?;
                let joined = async {
                    let mut ws = target.connect(None).await?;
                    let mut session = Session::default();
                    session.token = token;
                    protocol.join(&mut ws, &mut session).await?;
                    anyhow::Ok((ws, session))
                };
                match joined.await {
                    Ok(joined) => Some(joined),
                    Err(e) => {
                        eprintln!("fanout: client {i}: {e:#}");
                        None
                    }
                }
            })
        })
        .collect();
    let mut conns = Vec::with_capacity(n);
    for task in tasks {
        conns.push(task.await.ok().flatten());
    }
    conns
}

/// How a client sends: its protocol, and for a sender its ticker (with its sender number) and,
/// under Pusher, its way to the HTTP events API; with `reconnect`, the target to open a new
/// connection to when the one it has ends.
struct Sending {
    protocol: Protocol,
    ticker: Option<(usize, Interval)>,
    trigger: Option<Trigger>,
    reconnect: Option<Target>,
}

/// Opens a new connection after one ended, every [`RECONNECT_DELAY`] until one joins (with the
/// session's recovery state) or the run stops.
async fn rejoin(
    target: &Target,
    protocol: Protocol,
    session: &mut Session,
    stop: &CancellationToken,
) -> Option<Ws> {
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            () = tokio::time::sleep(RECONNECT_DELAY) => {}
        }
        if let Ok(mut ws) = target.connect(None).await
            && protocol.join(&mut ws, session).await.is_ok()
        {
            return Some(ws);
        }
    }
}

/// One client: sends on its ticker (if a sender; each message is expected by `room_members`
/// clients) and records every delivery until `stop`.
async fn client(
    mut ws: Ws,
    mut session: Session,
    Sending {
        protocol,
        mut ticker,
        trigger,
        reconnect,
    }: Sending,
    room_members: u64,
    shared: Arc<Shared>,
    stop: CancellationToken,
) -> Tally {
    let mut tally = Tally::default();
    let mut seen = vec![0u64; (shared.senders * shared.per_sender).div_ceil(64)];
    let mut seq = 0usize;
    let end = tokio::time::sleep_until(shared.end.into());
    tokio::pin!(end);
    loop {
        // Set where the connection turned out dead: the client reconnects (with `--reconnect`)
        // or leaves.
        let mut dead = false;
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            () = &mut end, if ticker.is_some() => {
                ticker = None;
                shared.sending.fetch_sub(1, Ordering::Release);
            }
            () = tick(&mut ticker) => {
                let Some((sender, _)) = ticker else { continue };
                if seq >= shared.per_sender {
                    continue;
                }
                let content = chaos::content(
                    shared.run,
                    Key { sender: sender as u32, seq: seq as u32 },
                    unix_nanos(),
                );
                let name = format!("bench-{sender}");
                let sent = match (protocol.frame(&name, &content), &trigger) {
                    (Some(frame), _) => ws.send(Message::text(frame)).await.is_ok(),
                    (None, Some(trigger)) => {
                        trigger.send(Protocol::Chat.frame(&name, &content).unwrap_or_default())
                    }
                    (None, None) => false,
                };
                if sent {
                    seq += 1;
                    shared.expected.fetch_add(room_members, Ordering::Release);
                    shared.sent.fetch_add(1, Ordering::Release);
                } else {
                    dead = true;
                }
            }
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => match parse(
                    session.note(protocol.decode(&text), reconnect.is_some()),
                    &shared,
                ) {
                    Parsed::Delivery { index, sent_at } => {
                        let (word, bit) = (index / 64, 1u64 << (index % 64));
                        if seen[word] & bit != 0 {
                            tally.duplicates += 1;
                        } else {
                            seen[word] |= bit;
                            tally.latencies.push(unix_nanos().saturating_sub(sent_at));
                            shared.delivered.fetch_add(1, Ordering::Release);
                        }
                    }
                    Parsed::Error => tally.errors += 1,
                    Parsed::Reply(answer) => {
                        dead = ws.send(Message::text(answer)).await.is_err();
                    }
                    Parsed::Other => {}
                },
                Some(Ok(_)) => {}
                Some(Err(_)) | None => dead = true,
            },
        }
        if dead {
            match &reconnect {
                Some(target) => match rejoin(target, protocol, &mut session, &stop).await {
                    Some(fresh) => {
                        ws = fresh;
                        tally.reconnects += 1;
                    }
                    None => break,
                },
                None => {
                    tally.disconnected = true;
                    break;
                }
            }
        }
    }
    if ticker.is_some() {
        shared.sending.fetch_sub(1, Ordering::Release);
    }
    if !tally.disconnected {
        // Best effort: the figures are taken.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    }
    tally
}

/// The `room` query parameter of a chat URL (`None`: the main room).
fn room_of(url: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query
        .split('&')
        .find_map(|pair| pair.strip_prefix("room="))
        .filter(|room| !room.is_empty())
        .map(str::to_owned)
}

/// Waits for the next tick of a sender's ticker; never completes for a pure receiver.
async fn tick(ticker: &mut Option<(usize, Interval)>) {
    match ticker {
        Some((_, t)) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// What a text frame turned out to be.
#[derive(Debug, PartialEq)]
enum Parsed {
    /// One of this run's messages: its bit in the duplicate set and its send time.
    Delivery { index: usize, sent_at: u64 },
    /// An error answer.
    Error,
    /// A keep-alive to answer with this text frame.
    Reply(&'static str),
    /// Anything else (another run's or another client's message, unparsable text).
    Other,
}

/// What a decoded frame means to this run.
fn parse(incoming: Incoming<'_>, shared: &Shared) -> Parsed {
    let content = match incoming {
        Incoming::Message { content, .. } => content,
        Incoming::Error => return Parsed::Error,
        Incoming::Reply(answer) => return Parsed::Reply(answer),
        Incoming::Other => return Parsed::Other,
    };
    let Some(content) = parse_content(&content, shared.run) else {
        return Parsed::Other;
    };
    let (sender, seq) = (content.key.sender as usize, content.key.seq as usize);
    if sender >= shared.senders || seq >= shared.per_sender {
        return Parsed::Other;
    }
    Parsed::Delivery {
        index: sender * shared.per_sender + seq,
        sent_at: content.created_ns,
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fanout {} clients ({} connected), {} senders, {} msg/s for {:.1} s",
            self.clients, self.connected, self.senders, self.rate, self.duration_s
        )?;
        writeln!(
            f,
            "  sent {}, expected {}, delivered {}, lost {}, duplicates {}, errors {}, disconnects {}, reconnects {}",
            self.sent,
            self.expected,
            self.delivered,
            self.lost,
            self.duplicates,
            self.errors,
            self.disconnects,
            self.reconnects
        )?;
        writeln!(f, "  deliveries/s   {:.0}", self.deliveries_per_s)?;
        writeln!(
            f,
            "  server CPU per connect {:.0} us",
            self.server_cpu_us_per_connect
        )?;
        writeln!(f, "  latency        {}", self.latency)?;
        self.measured.write_cpu_rows(
            f,
            &self.cpu_us_per_delivery,
            "delivery",
            Some(self.server_cpu_us_per_delivery),
            Load::Generator,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> Shared {
        let now = Instant::now();
        Shared {
            run: 7,
            senders: 3,
            per_sender: 10,
            sent: AtomicU64::new(0),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            sending: AtomicUsize::new(0),
            end: now,
        }
    }

    #[test]
    fn a_url_names_its_room() {
        assert_eq!(room_of("ws://h/ws?room=r7"), Some("r7".to_owned()));
        assert_eq!(room_of("ws://h/ws?resume&room=a.b"), Some("a.b".to_owned()));
        assert_eq!(room_of("ws://h/ws?room="), None);
        assert_eq!(room_of("ws://h/ws"), None);
    }

    #[test]
    fn parses_this_runs_messages() {
        let s = shared();
        let text = r#"{"time":"2024/01/01 00:00:00","name":"bench-2","content":"7:2:4:1234"}"#;
        assert_eq!(
            parse(Protocol::Chat.decode(text), &s),
            Parsed::Delivery {
                index: 24,
                sent_at: 1234
            }
        );
    }

    #[test]
    fn ignores_other_runs_bad_ranges_and_junk() {
        let s = shared();
        for text in [
            r#"{"content":"8:2:4:1234"}"#,
            r#"{"content":"7:3:4:1234"}"#,
            r#"{"content":"7:2:10:1234"}"#,
            r#"{"content":"7:2:4"}"#,
            r#"{"content":"7:2:4:1:5"}"#,
            r#"{"content":"hello"}"#,
            "not json",
        ] {
            assert_eq!(
                parse(Protocol::Chat.decode(text), &s),
                Parsed::Other,
                "{text}"
            );
        }
        assert_eq!(
            parse(Protocol::Chat.decode(r#"{"error":"too fast"}"#), &s),
            Parsed::Error
        );
        assert_eq!(
            parse(Protocol::SocketIo.decode("2"), &s),
            Parsed::Reply("3")
        );
    }

    /// A minimal chat server: every text frame any client sends goes to every client.
    async fn broadcast_server() -> std::net::SocketAddr {
        let (tx, _) = tokio::sync::broadcast::channel::<String>(100_000);
        crate::test_server::ws_server(move |ws| {
            let (tx, mut rx) = (tx.clone(), tx.subscribe());
            async move {
                let (mut sink, mut stream) = ws.split();
                tokio::spawn(async move {
                    while let Ok(text) = rx.recv().await {
                        if sink.send(Message::text(text)).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(Message::Text(text))) = stream.next().await {
                    let _ = tx.send(text.as_str().to_string());
                }
            }
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn counts_every_delivery_to_every_client() {
        let addr = broadcast_server().await;
        let report = run(Args {
            url: vec![format!("ws://{addr}/ws"), format!("ws://{addr}/other")],
            ca: None,
            clients: 20,
            senders: 4,
            rate: 200.0,
            duration: Duration::from_millis(300),
            drain: Duration::from_secs(10),
            settle: Duration::from_millis(50),
            concurrency: 5,
            watch: vec![Watch::this_process()],
            protocol: Protocol::Chat,
            pusher_app: None,
            reconnect: false,
            tokens: tokens::TokenArgs::default(),
            fault_point: Some(Duration::from_millis(100)),
        })
        .await
        .unwrap();
        assert_eq!(report.connected, 20);
        assert!(report.sent > 0);
        assert_eq!(report.expected, report.sent * 20);
        assert_eq!(report.delivered, report.expected);
        assert_eq!(
            (
                report.lost,
                report.duplicates,
                report.errors,
                report.disconnects
            ),
            (0, 0, 0, 0)
        );
        assert_eq!(report.latency.count as u64, report.delivered);
        // Deliveries were arriving 100 ms into the 300 ms of sending.
        let mark = report.fault_point_s.unwrap();
        assert!((0.1..0.3).contains(&mark), "{mark}");
    }
}
