//! `bench idle`: hold N idle WebSocket connections to measure what each costs whatever is in front.
//!
//! The watched processes are sampled, then N connections are opened (at most `--concurrency`
//! handshakes in flight; source addresses 127.0.0.1, .2, ... each carrying at most
//! `--per-source` connections so a single address never runs out of ports). Once all are up and
//! `--settle` has passed, the watched processes are sampled again: the resident-memory growth
//! divided by N is the memory per idle connection. The connections are then held for `--hold`
//! and closed.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::client::{self, Target};
use crate::procstat::{Measured, Watch, Window};

/// Options of `bench idle`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// ws:// or wss:// URL.
    #[arg(long)]
    url: String,
    /// CA certificate (PEM) to trust for wss://.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 9000)]
    connections: usize,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 100)]
    concurrency: usize,
    /// Connections per loopback source address (127.0.0.1, then .2, ...).
    #[arg(long, default_value_t = 20_000)]
    per_source: usize,
    /// Wait after the last connection is up before measuring memory.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    settle: Duration,
    /// Time to keep the connections open after measuring.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Give up on opening connections after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Processes whose memory to report: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    watch: Vec<Watch>,
}

/// What `bench idle` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The URL measured.
    pub url: String,
    /// Connections asked for.
    pub requested: usize,
    /// Connections that were up when memory was measured.
    pub established: usize,
    /// Connections that failed to open.
    pub failed: usize,
    /// Seconds to open them all.
    pub connect_s: f64,
    /// Resident-memory growth per established connection, KiB, per watched group (same order).
    pub kib_per_connection: Vec<f64>,
    /// The watched groups, the generator and the machine from before the first connect to the
    /// measurement.
    #[serde(flatten)]
    pub measured: Measured,
}

/// Opens, measures, holds and closes.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.concurrency == 0 || args.per_source == 0 {
        bail!("--concurrency and --per-source must be at least 1");
    }
    client::room_for(args.connections)?;
    let target = Target::resolve(&args.url, args.ca.as_deref()).await?;
    let window = Window::open(&args.watch)?;
    let start = Instant::now();

    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(args.concurrency));
    let (up_tx, mut up_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    let mut tasks = Vec::with_capacity(args.connections);
    for i in 0..args.connections {
        let source = source_address(i / args.per_source)?;
        let (target, stop, gate, up_tx) = (
            target.clone(),
            stop.clone(),
            Arc::clone(&gate),
            up_tx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let opened = {
                let Ok(_permit) = gate.acquire().await else {
                    return;
                };
                target.connect(source).await
            };
            match opened {
                Ok(mut ws) => {
                    let _ = up_tx.send(Ok(()));
                    hold(&mut ws, &stop).await;
                    // Best effort: the figure is already taken.
                    let _ = ws.close(None).await;
                }
                Err(e) => {
                    let _ = up_tx.send(Err(e));
                }
            }
        }));
    }
    drop(up_tx);

    let (mut established, mut failed) = (0, 0);
    let deadline = tokio::time::sleep(args.connect_timeout);
    tokio::pin!(deadline);
    while established + failed < args.connections {
        tokio::select! {
            outcome = up_rx.recv() => match outcome {
                Some(Ok(())) => established += 1,
                Some(Err(e)) => {
                    if failed == 0 {
                        eprintln!("idle: first failed connection: {e:#}");
                    }
                    failed += 1;
                }
                None => break,
            },
            () = &mut deadline => {
                eprintln!("idle: gave up waiting after {:?}", args.connect_timeout);
                break;
            }
        }
    }
    let connect_s = start.elapsed().as_secs_f64();
    eprintln!("idle: {established} up, {failed} failed in {connect_s:.1} s");
    tokio::time::sleep(args.settle).await;
    let measured = window.close()?;
    tokio::time::sleep(args.hold).await;
    stop.cancel();
    for task in tasks {
        // A task that panicked changes no figure; the others still close.
        let _ = task.await;
    }

    let kib_per_connection = measured
        .watched
        .iter()
        .map(|u| u.rss_growth_kib / established.max(1) as f64)
        .collect();
    Ok(Report {
        url: target.url().to_string(),
        requested: args.connections,
        established,
        failed,
        connect_s,
        kib_per_connection,
        measured,
    })
}

/// Keeps a connection open (answering pings) until `stop`, or until the peer closes it.
async fn hold(ws: &mut crate::client::Ws, stop: &CancellationToken) {
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            msg = ws.next() => match msg {
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return,
            },
        }
    }
}

/// The n-th loopback source address: `None` (kernel's choice) for the first, then 127.0.0.2...
fn source_address(n: usize) -> anyhow::Result<Option<IpAddr>> {
    if n == 0 {
        return Ok(None);
    }
    let host = u32::try_from(n + 1)
        .ok()
        .filter(|h| *h < 1 << 24)
        .context("too many source addresses")?;
    Ok(Some(IpAddr::V4(Ipv4Addr::from(0x7f00_0000 | host))))
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "idle {}", self.url)?;
        writeln!(
            f,
            "  established    {} of {} ({} failed) in {:.1} s",
            self.established, self.requested, self.failed, self.connect_s
        )?;
        for (u, per) in self.measured.watched.iter().zip(&self.kib_per_connection) {
            writeln!(
                f,
                "  {:<13}  {:.1} KiB per connection (RSS {:.1} MiB)",
                u.name, per, u.rss_mib
            )?;
        }
        write!(
            f,
            "  generator      {:.2} cores, RSS {:.1} MiB",
            self.measured.generator.cores, self.measured.generator.rss_mib
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_addresses_walk_loopback() {
        assert_eq!(source_address(0).unwrap(), None);
        assert_eq!(
            source_address(1).unwrap(),
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(
            source_address(300).unwrap(),
            Some("127.0.1.45".parse().unwrap())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_connections_from_several_source_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(crate::backend::serve(listener));
        let report = run(Args {
            url: format!("ws://{addr}/"),
            ca: None,
            connections: 30,
            concurrency: 8,
            per_source: 10,
            settle: Duration::ZERO,
            hold: Duration::ZERO,
            connect_timeout: Duration::from_secs(60),
            watch: vec![Watch::this_process()],
        })
        .await
        .unwrap();
        server.abort();
        assert_eq!((report.established, report.failed), (30, 0));
        assert_eq!(report.kib_per_connection.len(), 1);
    }
}
