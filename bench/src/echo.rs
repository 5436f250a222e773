//! `bench echo`: ping-pong round trips through whatever is in front of an echo backend.
//!
//! C connections are opened first; then each one sends a B-byte binary message, waits for it to
//! come back, and repeats until the deadline. Only round trips that start and end inside the
//! measured window (after the warm-up) count; the watched processes and the generator itself are
//! sampled at the window's edges so CPU per round trip can be reported. A connection whose echo
//! has not come back by the end of the window plus `--grace` counts as stalled and is dropped, so a
//! lost echo never holds up the run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Target, Ws};
use crate::latency::Percentiles;
use crate::procstat::{Load, Measured, Watch, Window};

/// Options of `bench echo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ws:// or wss:// URL of the echo endpoint.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Concurrent connections, each with one message in flight.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Message size in bytes (binary frames).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Measured time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured time before the window opens.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Longest wait past the window's end for a round trip to finish; a connection still waiting
    /// then counts as stalled (and failed) and is dropped.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Processes whose CPU to report over the window: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    watch: Vec<Watch>,
}

/// What `bench echo` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The URL measured.
    pub url: String,
    /// Connections.
    pub connections: usize,
    /// Message size in bytes.
    pub size: usize,
    /// Length of the measured window, seconds.
    pub window_s: f64,
    /// Round trips completed inside the window.
    pub round_trips: u64,
    /// Round trips per second.
    pub round_trips_per_s: f64,
    /// Round-trip time percentiles.
    pub rtt: Percentiles,
    /// Connections that failed during the run, the stalled ones included.
    pub failed_connections: usize,
    /// Connections dropped because a round trip had not finished by the window's end plus the grace.
    pub stalled_connections: usize,
    /// Microseconds of CPU per round trip for each watched group, in `--watch` order.
    pub cpu_us_per_round_trip: Vec<f64>,
    /// CPU and memory of the watched groups, the generator and the machine over the window.
    #[serde(flatten)]
    pub measured: Measured,
}

/// Runs the echo load and reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.connections == 0 {
        bail!("--connections must be at least 1");
    }
    let target = Target::resolve(&args.url, args.ca.as_deref()).await?;
    let mut conns = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        conns.push(target.connect(None).await?);
    }
    let payload = Bytes::from(vec![b'x'; args.size]);
    let start = Instant::now();
    let window_start = start + args.warmup;
    let window_end = window_start + args.duration;
    let give_up = window_end + args.grace;
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|ws| {
            tokio::spawn(ping_pong(
                ws,
                payload.clone(),
                window_start,
                window_end,
                give_up,
            ))
        })
        .collect();

    tokio::time::sleep_until(window_start.into()).await;
    let window = Window::open(&args.watch)?;
    tokio::time::sleep_until(window_end.into()).await;
    let measured = window.close()?;

    let mut samples = Vec::new();
    let (mut failed, mut stalled) = (0, 0);
    for task in tasks {
        match task.await.context("echo task panicked")? {
            Ok(rtts) => samples.extend(rtts),
            Err(Failure::Stalled) => {
                failed += 1;
                stalled += 1;
            }
            Err(Failure::Broken(e)) => {
                failed += 1;
                eprintln!("echo: connection failed: {e:#}");
            }
        }
    }
    if stalled > 0 {
        eprintln!(
            "echo: {stalled} connections stalled (no echo {} s after the window)",
            args.grace.as_secs_f64()
        );
    }
    let round_trips = samples.len() as u64;
    Ok(Report {
        url: target.url().to_string(),
        connections: args.connections,
        size: args.size,
        window_s: args.duration.as_secs_f64(),
        round_trips,
        round_trips_per_s: round_trips as f64 / args.duration.as_secs_f64(),
        rtt: Percentiles::of(samples),
        failed_connections: failed,
        stalled_connections: stalled,
        cpu_us_per_round_trip: measured.cpu_us_per(round_trips),
        measured,
    })
}

/// Why a connection's loop ended before the window did.
enum Failure {
    /// A round trip had not finished by the give-up time: the echo (or the send) is stuck.
    Stalled,
    /// The connection broke or echoed something else.
    Broken(anyhow::Error),
}

/// One connection's loop: returns the RTTs (ns) of round trips wholly inside the window. A round
/// trip still unfinished at `give_up` ends the connection as [`Failure::Stalled`].
async fn ping_pong(
    mut ws: Ws,
    payload: Bytes,
    window_start: Instant,
    window_end: Instant,
    give_up: Instant,
) -> Result<Vec<u64>, Failure> {
    let mut rtts = Vec::new();
    loop {
        let sent = Instant::now();
        if sent >= window_end {
            break;
        }
        tokio::time::timeout_at(give_up.into(), round_trip(&mut ws, &payload))
            .await
            .map_err(|_| Failure::Stalled)?
            .map_err(Failure::Broken)?;
        let done = Instant::now();
        if sent >= window_start && done <= window_end {
            rtts.push(done.duration_since(sent).as_nanos() as u64);
        }
    }
    // Best effort: the run is over, a failed close changes no figure.
    let _ = ws.close(None).await;
    Ok(rtts)
}

/// Sends `payload` and waits for its echo.
async fn round_trip(ws: &mut Ws, payload: &Bytes) -> anyhow::Result<()> {
    ws.send(Message::Binary(payload.clone()))
        .await
        .context("sending")?;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) if b.len() == payload.len() => return Ok(()),
            Some(Ok(Message::Binary(b))) => {
                bail!("echo of {} bytes came back as {}", payload.len(), b.len())
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(other)) => bail!("unexpected message {other:?}"),
            Some(Err(e)) => return Err(e).context("receiving"),
            None => bail!("connection closed by peer"),
        }
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "echo {} ({} connections, {} B)",
            self.url, self.connections, self.size
        )?;
        writeln!(
            f,
            "  round trips/s  {:.0} ({} in {:.1} s)",
            self.round_trips_per_s, self.round_trips, self.window_s
        )?;
        writeln!(f, "  rtt            {}", self.rtt)?;
        if self.failed_connections > 0 {
            write!(f, "  FAILED connections: {}", self.failed_connections)?;
            if self.stalled_connections > 0 {
                write!(f, " ({} stalled)", self.stalled_connections)?;
            }
            writeln!(f)?;
        }
        self.measured.write_cpu_rows(
            f,
            &self.cpu_us_per_round_trip,
            "round trip",
            None,
            Load::Generator,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn round_trips_through_the_neutral_backend() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::backend::serve(listener));
        let report = run(Args {
            url: format!("ws://{addr}/ws"),
            ca: None,
            connections: 4,
            size: 16 * 1024,
            duration: Duration::from_millis(300),
            warmup: Duration::ZERO,
            grace: Duration::from_secs(3),
            watch: vec![Watch::this_process()],
        })
        .await
        .unwrap();
        server.abort();
        assert_eq!(report.failed_connections, 0);
        assert_eq!(report.stalled_connections, 0);
        assert!(report.round_trips > 0);
        assert_eq!(report.rtt.count as u64, report.round_trips);
        assert_eq!(report.cpu_us_per_round_trip.len(), 1);
    }

    /// A WebSocket server that takes every message and never answers.
    async fn silent_server() -> std::net::SocketAddr {
        crate::test_server::ws_server(
            |mut ws| async move { while let Some(Ok(_)) = ws.next().await {} },
        )
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_lost_echo_counts_the_connection_as_stalled_and_the_run_ends() {
        let addr = silent_server().await;
        let report = run(Args {
            url: format!("ws://{addr}/ws"),
            ca: None,
            connections: 3,
            size: 64,
            duration: Duration::from_millis(100),
            warmup: Duration::ZERO,
            grace: Duration::from_millis(100),
            watch: vec![],
        })
        .await
        .unwrap();
        assert_eq!(report.round_trips, 0);
        assert_eq!(report.stalled_connections, 3);
        assert_eq!(report.failed_connections, 3);
        assert!(
            report
                .to_string()
                .contains("FAILED connections: 3 (3 stalled)")
        );
    }
}
