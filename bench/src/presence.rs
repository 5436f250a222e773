//! `bench presence`: a join storm into one room with every member watching who is here, and what
//! the presence frames it causes cost against telling every member of every join.
//!
//! N clients open `/ws?presence` (spread round-robin over the `--url`s; `presence` is added to a
//! URL that lacks it) all at once, like `bench storm` (one task per client, all spawned at once,
//! `--concurrency` bounds the connects in flight when given; a connect not finished
//! `--connect-timeout` after the storm began fails). Each client then reads until the run ends,
//! `--settle` after the last connect ended: every text frame is sorted by [`ClientView::apply`]
//! into a presence state, a presence diff or anything else, and the client keeps its own view of
//! the room (the state's `count` and listed members, then each diff's joins, leaves and `count`,
//! applied in order). At the end each client's view must count every client that joined: a view
//! that does not is the coalescing losing a change, and is counted, not fatal.
//!
//! Reported: clients joined, presence frames (state and diff, and the entries the diffs listed),
//! frames per member (median, max), against the naive count N×(N−1)/2 (one notice per join to
//! every member already present), the wrong final views, when the last view settled, and the
//! CPU of every watched group (`--watch`, `/proc`) per join: over the connects alone and over the
//! whole run (the connects and the presence work they caused, up to the end of the settle time).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Target};
use crate::procstat::{Load, Measured, Watch, Window};

/// Longest wait for a client's close handshake at the end.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How many wrong final counts the report lists (their number is always given in full).
const WRONG_LISTED: usize = 10;

/// Options of `bench presence`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ws:// or wss:// URL of the chat WebSocket (`presence` is added to its query when
    /// missing); repeat to spread the clients over several instances.
    #[arg(long, required = true)]
    pub(crate) url: Vec<String>,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    pub(crate) ca: Option<PathBuf>,
    /// Clients in the storm, all in one room.
    #[arg(long, default_value_t = 1000)]
    pub(crate) clients: usize,
    /// Connects in flight at once; all clients at once when not given.
    #[arg(long)]
    pub(crate) concurrency: Option<usize>,
    /// A connect not finished this long after the storm began fails.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub(crate) connect_timeout: Duration,
    /// How long every client keeps reading after the last connect ended (at least twice
    /// `--presence-interval`, so the last changes reach everyone).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub(crate) settle: Duration,
    /// The apps' `presence_interval`: only checks that `--settle` is long enough.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub(crate) presence_interval: Duration,
    /// Processes whose CPU to report: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    pub(crate) watch: Vec<Watch>,
}

/// What `bench presence` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Clients in the storm.
    pub clients: usize,
    /// Clients whose connect completed.
    pub joined: usize,
    /// Connects that failed or did not finish in time.
    pub failed: usize,
    /// The first failure, when there was one.
    pub first_error: Option<String>,
    /// Clients whose connection ended before the run did.
    pub disconnects: usize,
    /// Seconds from the start of the storm until the last connect ended.
    pub all_joined_s: f64,
    /// Presence frames received by all clients (state and diff).
    pub presence_frames: u64,
    /// Of which state frames (one per member on joining, or after falling behind).
    pub state_frames: u64,
    /// Of which diff frames.
    pub diff_frames: u64,
    /// Entries (joins and leaves) the diff frames listed, all clients together.
    pub diff_entries: u64,
    /// Presence frames per member: median.
    pub frames_per_member_p50: u64,
    /// Presence frames per member: most any member received.
    pub frames_per_member_max: u64,
    /// Presence frames over joins.
    pub frames_per_join: f64,
    /// One notice per join to every member present: joined × (joined − 1) / 2.
    pub naive_join_notices: u64,
    /// The naive count over the presence frames received.
    pub naive_over_frames: f64,
    /// Clients that received a state frame, whose final view was checked.
    pub views_checked: usize,
    /// Of those, views whose final count is not `joined`: a change lost.
    pub views_wrong: usize,
    /// Some of the wrong final counts (at most ten).
    pub wrong_counts: Vec<i64>,
    /// The most members a final view listed (signed-in users, or anonymous members by the
    /// name they last used; an anonymous member that sent nothing is counted, not listed).
    pub members_listed_max: usize,
    /// Clients that received no state frame (all of them with presence off).
    pub no_state: usize,
    /// Seconds from the start of the storm until the last view reached its final count.
    pub views_settled_s: f64,
    /// Members that received two diffs less than half a `--presence-interval` apart (the
    /// README promises at most one per interval).
    pub close_diffs: usize,
    /// The shortest time between two diffs to one member, ms (`None`: no member had two).
    pub min_diff_gap_ms: Option<f64>,
    /// CPU microseconds per join of each watched group over the whole run, in `--watch` order.
    pub cpu_us_per_join: Vec<f64>,
    /// Sum of the watched groups' CPU per join over the whole run: the connects and the
    /// presence work they caused.
    pub server_cpu_us_per_join: f64,
    /// Sum of the watched groups' CPU per join from the start of the storm until the last
    /// connect ended.
    pub server_cpu_us_per_connect: f64,
    /// The watched groups, the generator and the machine over the whole run.
    #[serde(flatten)]
    pub measured: Measured,
}

/// What one client saw.
#[derive(Debug, Default)]
struct Tally {
    view: ClientView,
    disconnected: bool,
}

/// A client's view of its room, built from the presence frames it received, in order.
#[derive(Debug, Default, PartialEq)]
pub struct ClientView {
    /// The last `count`; `None` before the state frame.
    count: Option<i64>,
    /// Listed members by user (or name, anonymous) and their connections.
    members: HashMap<String, u64>,
    state_frames: u64,
    diff_frames: u64,
    diff_entries: u64,
    /// When `count` last changed (since the start of the storm).
    changed: Duration,
    /// When the last diff came.
    last_diff: Option<Duration>,
    /// The shortest time between two diffs.
    min_diff_gap: Option<Duration>,
}

/// What a frame was to a client's view.
#[derive(Debug, PartialEq)]
pub enum Kind {
    /// `{"presence":"state",...}`.
    State,
    /// `{"presence":"diff",...}`.
    Diff,
    /// Anything else: a chat message, a notice, text that is not JSON.
    Other,
}

/// The fields of a presence frame this benchmark reads; everything else is ignored.
#[derive(Deserialize)]
struct Frame {
    presence: Option<String>,
    count: Option<i64>,
    #[serde(default)]
    members: Vec<Member>,
    #[serde(default)]
    joins: Vec<Member>,
    #[serde(default)]
    leaves: Vec<Member>,
}

/// A listed member: `user` in token mode, else its `name`.
#[derive(Deserialize)]
struct Member {
    user: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    conns: u64,
}

impl Member {
    fn id(&self) -> String {
        match &self.user {
            Some(user) => format!("u:{user}"),
            None => format!("n:{}", self.name),
        }
    }
}

impl ClientView {
    /// Applies one text frame received `at` (since the start of the storm); says what it was.
    pub fn apply(&mut self, text: &str, at: Duration) -> Kind {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return Kind::Other;
        };
        let kind = match frame.presence.as_deref() {
            Some("state") => {
                self.state_frames += 1;
                self.members = frame.members.iter().map(|m| (m.id(), m.conns)).collect();
                Kind::State
            }
            Some("diff") => {
                self.diff_frames += 1;
                if let Some(last) = self.last_diff {
                    let gap = at.saturating_sub(last);
                    self.min_diff_gap = Some(self.min_diff_gap.map_or(gap, |min| min.min(gap)));
                }
                self.last_diff = Some(at);
                self.diff_entries += (frame.joins.len() + frame.leaves.len()) as u64;
                for gone in &frame.leaves {
                    self.members.remove(&gone.id());
                }
                for join in &frame.joins {
                    self.members.insert(join.id(), join.conns);
                }
                Kind::Diff
            }
            _ => return Kind::Other,
        };
        if let Some(count) = frame.count
            && self.count != Some(count)
        {
            self.count = Some(count);
            self.changed = at;
        }
        kind
    }

    /// Presence frames received.
    fn frames(&self) -> u64 {
        self.state_frames + self.diff_frames
    }
}

/// Runs the storm, lets presence settle, reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let concurrency = args.concurrency.unwrap_or(args.clients);
    if args.clients == 0 || concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    if args.settle < args.presence_interval * 2 {
        bail!(
            "--settle {:?} is shorter than twice --presence-interval {:?}",
            args.settle,
            args.presence_interval
        );
    }
    client::room_for(args.clients)?;
    let mut targets = Vec::new();
    for url in &args.url {
        targets.push(Target::resolve(&with_presence(url), args.ca.as_deref()).await?);
    }

    let gate = Arc::new(Semaphore::new(concurrency));
    let stop = CancellationToken::new();
    let (connects, mut connected) = mpsc::channel::<Result<Duration, String>>(args.clients);
    let whole = Window::open(&args.watch)?;
    let connecting = Window::open(&args.watch)?;
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + args.connect_timeout);
    let tasks: Vec<_> = (0..args.clients)
        .map(|i| {
            let target = targets[i % targets.len()].clone();
            let (gate, stop, connects) = (Arc::clone(&gate), stop.clone(), connects.clone());
            tokio::spawn(client(target, gate, deadline, start, stop, connects))
        })
        .collect();
    drop(connects);

    // Every client reports its connect once; each connect is bounded by the deadline.
    let (mut joined, mut failed, mut first_error, mut last) = (0, 0, None, Duration::ZERO);
    let wait_until = deadline + Duration::from_secs(1);
    for _ in 0..args.clients {
        match tokio::time::timeout_at(wait_until, connected.recv()).await {
            Ok(Some(Ok(at))) => {
                joined += 1;
                last = last.max(at);
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
            Ok(None) | Err(_) => break,
        }
    }
    let connect_measured = connecting.close()?;
    eprintln!(
        "presence: {joined} of {} joined in {:.2} s; settling for {:?}",
        args.clients,
        last.as_secs_f64(),
        args.settle
    );
    tokio::time::sleep(args.settle).await;
    let measured = whole.close()?;
    stop.cancel();

    let mut tallies = Vec::with_capacity(tasks.len());
    for task in tasks {
        if let Some(tally) = task.await.context("client task panicked")? {
            tallies.push(tally);
        }
    }
    let expected = joined as i64;
    let mut per_member: Vec<u64> = tallies.iter().map(|t| t.view.frames()).collect();
    per_member.sort_unstable();
    let checked: Vec<&ClientView> = tallies
        .iter()
        .map(|t| &t.view)
        .filter(|v| v.state_frames > 0)
        .collect();
    let wrong: Vec<i64> = checked
        .iter()
        .filter_map(|v| v.count.filter(|&c| c != expected))
        .collect();
    let sum = |f: fn(&ClientView) -> u64| tallies.iter().map(|t| f(&t.view)).sum::<u64>();
    let presence_frames = sum(ClientView::frames);
    let naive = (joined as u64) * (joined as u64).saturating_sub(1) / 2;
    let cpu_us_per_join = measured.cpu_us_per(joined as u64);
    Ok(Report {
        clients: args.clients,
        joined,
        failed,
        first_error,
        disconnects: tallies.iter().filter(|t| t.disconnected).count(),
        all_joined_s: last.as_secs_f64(),
        presence_frames,
        state_frames: sum(|v| v.state_frames),
        diff_frames: sum(|v| v.diff_frames),
        diff_entries: sum(|v| v.diff_entries),
        frames_per_member_p50: per_member.get(per_member.len() / 2).copied().unwrap_or(0),
        frames_per_member_max: per_member.last().copied().unwrap_or(0),
        frames_per_join: presence_frames as f64 / joined.max(1) as f64,
        naive_join_notices: naive,
        naive_over_frames: if presence_frames == 0 {
            0.0
        } else {
            naive as f64 / presence_frames as f64
        },
        views_checked: checked.len(),
        views_wrong: wrong.len(),
        wrong_counts: wrong.iter().take(WRONG_LISTED).copied().collect(),
        members_listed_max: checked.iter().map(|v| v.members.len()).max().unwrap_or(0),
        no_state: tallies.len() - checked.len(),
        views_settled_s: checked
            .iter()
            .map(|v| v.changed.as_secs_f64())
            .fold(0.0, f64::max),
        close_diffs: tallies
            .iter()
            .filter(|t| {
                t.view
                    .min_diff_gap
                    .is_some_and(|gap| gap < args.presence_interval / 2)
            })
            .count(),
        min_diff_gap_ms: tallies
            .iter()
            .filter_map(|t| t.view.min_diff_gap)
            .min()
            .map(|gap| gap.as_secs_f64() * 1e3),
        server_cpu_us_per_join: cpu_us_per_join.iter().sum(),
        server_cpu_us_per_connect: connect_measured.cpu_us_per(joined as u64).iter().sum(),
        cpu_us_per_join,
        measured,
    })
}

/// `url` with `presence` in its query.
fn with_presence(url: &str) -> String {
    match url.split_once('?') {
        Some((_, query)) if query.split('&').any(|p| p == "presence") => url.to_owned(),
        Some(_) => format!("{url}&presence"),
        None => format!("{url}?presence"),
    }
}

/// One client: connects (within the gate and by `deadline`), says how it went on `connects`,
/// then reads every frame into its view until `stop`. `None` when it never connected.
async fn client(
    target: Target,
    gate: Arc<Semaphore>,
    deadline: tokio::time::Instant,
    start: Instant,
    stop: CancellationToken,
    connects: mpsc::Sender<Result<Duration, String>>,
) -> Option<Tally> {
    let connected = async {
        let _permit = gate
            .acquire()
            .await
            .map_err(|_| anyhow!("the connect gate closed"))?;
        tokio::time::timeout_at(deadline, target.connect(None))
            .await
            .map_err(|_| anyhow!("not connected within the connect timeout"))?
    }
    .await;
    let mut ws = match connected {
        Ok(ws) => {
            // The receiver waits for every client; it is gone only if the run failed.
            let _ = connects.send(Ok(start.elapsed())).await;
            ws
        }
        Err(e) => {
            let _ = connects.send(Err(format!("{e:#}"))).await;
            return None;
        }
    };
    drop(connects);
    let mut tally = Tally::default();
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => break,
            msg = ws.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    tally.view.apply(text.as_str(), start.elapsed());
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => {
                    tally.disconnected = true;
                    break;
                }
            },
        }
    }
    if !tally.disconnected {
        // Best effort: the figures are taken.
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.close(None)).await;
    }
    Some(tally)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "presence join storm: {} clients, {} joined in {:.2} s, {} failed, {} disconnected",
            self.clients, self.joined, self.all_joined_s, self.failed, self.disconnects
        )?;
        if let Some(e) = &self.first_error {
            writeln!(f, "  first failure: {e}")?;
        }
        writeln!(
            f,
            "  presence frames {} ({} state, {} diff listing {} entries): {:.2} per join",
            self.presence_frames,
            self.state_frames,
            self.diff_frames,
            self.diff_entries,
            self.frames_per_join
        )?;
        writeln!(
            f,
            "  per member: median {}, max {}",
            self.frames_per_member_p50, self.frames_per_member_max
        )?;
        writeln!(
            f,
            "  naive one notice per join per member: {} ({:.0}x the frames received)",
            self.naive_join_notices, self.naive_over_frames
        )?;
        writeln!(
            f,
            "  final views: {} checked, {} wrong {:?}, {} without a state frame, at most {} members listed; last settled at {:.2} s",
            self.views_checked,
            self.views_wrong,
            self.wrong_counts,
            self.members_listed_max,
            self.no_state,
            self.views_settled_s
        )?;
        writeln!(
            f,
            "  members with two diffs within half an interval: {}; shortest gap between diffs {}",
            self.close_diffs,
            self.min_diff_gap_ms
                .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms"))
        )?;
        writeln!(
            f,
            "  server CPU per join: {:.0} us over the connects, {:.0} us with the settle time",
            self.server_cpu_us_per_connect, self.server_cpu_us_per_join
        )?;
        self.measured.write_cpu_rows(
            f,
            &self.cpu_us_per_join,
            "join",
            Some(self.server_cpu_us_per_join),
            Load::Generator,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Duration = Duration::from_millis(5);

    #[test]
    fn adds_presence_to_a_url_once() {
        assert_eq!(with_presence("ws://h/ws"), "ws://h/ws?presence");
        assert_eq!(
            with_presence("ws://h/ws?room=a"),
            "ws://h/ws?room=a&presence"
        );
        assert_eq!(with_presence("ws://h/ws?presence"), "ws://h/ws?presence");
        assert_eq!(
            with_presence("ws://h/ws?room=a&presence"),
            "ws://h/ws?room=a&presence"
        );
    }

    #[test]
    fn applies_a_state_then_diffs_in_order() {
        let mut view = ClientView::default();
        let state = r#"{"presence":"state","members":[{"name":"ann","conns":2}],"count":3}"#;
        assert_eq!(view.apply(state, AT), Kind::State);
        let diff = r#"{"presence":"diff","joins":[{"name":"bob","conns":1}],"leaves":[{"name":"ann"}],"count":2}"#;
        assert_eq!(view.apply(diff, AT * 2), Kind::Diff);
        let diff = r#"{"presence":"diff","joins":[],"leaves":[],"count":1000}"#;
        assert_eq!(view.apply(diff, AT * 3), Kind::Diff);
        assert_eq!(view.count, Some(1000));
        assert_eq!(view.members, HashMap::from([("n:bob".to_owned(), 1)]));
        assert_eq!(
            (view.state_frames, view.diff_frames, view.diff_entries),
            (1, 2, 2)
        );
        assert_eq!(view.frames(), 3);
        assert_eq!(view.changed, AT * 3);
        assert_eq!(view.min_diff_gap, Some(AT));
    }

    #[test]
    fn a_users_entry_is_replaced_and_other_frames_are_not_presence() {
        let mut view = ClientView::default();
        let state =
            r#"{"presence":"state","members":[{"user":"u1","name":"A","conns":1}],"count":1}"#;
        view.apply(state, AT);
        let diff = r#"{"presence":"diff","joins":[{"user":"u1","name":"A","conns":2}],"leaves":[],"count":2}"#;
        view.apply(diff, AT);
        assert_eq!(view.members, HashMap::from([("u:u1".to_owned(), 2)]));
        for other in [
            r#"{"time":"t","name":"n","content":"c"}"#,
            r#"{"presence":"gossip","count":9}"#,
            r#"{"presence":7}"#,
            "not json",
            "",
        ] {
            assert_eq!(view.apply(other, AT * 9), Kind::Other, "{other}");
        }
        assert_eq!((view.count, view.changed), (Some(2), AT));
    }

    /// A presence server in miniature: a state on connect with the count so far, then every
    /// 50 ms a diff with the new count if it changed.
    async fn presence_server() -> std::net::SocketAddr {
        use futures_util::SinkExt;
        use std::sync::atomic::{AtomicI64, Ordering};
        let count = Arc::new(AtomicI64::new(0));
        crate::test_server::ws_server(move |mut ws| {
            let count = Arc::clone(&count);
            async move {
                let mut shown = count.fetch_add(1, Ordering::SeqCst) + 1;
                let state = format!(r#"{{"presence":"state","members":[],"count":{shown}}}"#);
                if ws.send(Message::text(state)).await.is_err() {
                    return;
                }
                let mut ticks = tokio::time::interval(Duration::from_millis(50));
                loop {
                    tokio::select! {
                        _ = ticks.tick() => {
                            let now = count.load(Ordering::SeqCst);
                            if now != shown {
                                shown = now;
                                let diff = format!(r#"{{"presence":"diff","joins":[],"leaves":[],"count":{now}}}"#);
                                if ws.send(Message::text(diff)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        msg = ws.next() => if !matches!(msg, Some(Ok(_))) { return },
                    }
                }
            }
        })
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_view_ends_with_every_client() {
        let addr = presence_server().await;
        let report = run(Args {
            url: vec![format!("ws://{addr}/ws"), format!("ws://{addr}/ws?room=r")],
            ca: None,
            clients: 30,
            concurrency: None,
            connect_timeout: Duration::from_secs(10),
            settle: Duration::from_millis(300),
            presence_interval: Duration::from_millis(50),
            watch: vec![Watch::this_process()],
        })
        .await
        .unwrap();
        assert_eq!(
            (report.joined, report.failed, report.disconnects),
            (30, 0, 0)
        );
        assert_eq!(
            (report.views_checked, report.views_wrong, report.no_state),
            (30, 0, 0)
        );
        assert_eq!(report.state_frames, 30);
        assert!(report.frames_per_member_max >= 1);
        assert_eq!(report.naive_join_notices, 435);
        // This server lists nobody: every member is counted only.
        assert_eq!(report.members_listed_max, 0);
        assert_eq!(
            report.presence_frames,
            report.state_frames + report.diff_frames
        );
    }
}
