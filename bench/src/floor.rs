//! `bench floor`: what one loopback TCP hop costs on this machine, the floor under the whole
//! stack's CPU per delivery.
//!
//! C connection pairs inside this process, TCP_NODELAY on both ends. Each round writes one
//! B-byte message to every connection, and a task at the other end of each reads it, before the
//! next round starts: one write and one read per message, nothing batched, as in a chat fan-out
//! at low rates where each client's socket carries one frame at a time. The process's CPU time
//! over the measured rounds divided by the messages is the cost of one hop (a send and a receive
//! through the kernel, with the runtime's polling as a server has it). A delivery through the
//! stack needs at least the app's send, lb's receive and lb's send: one and a half hops.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use anyhow::Context;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

use crate::procstat::Window;

/// Options of `bench floor`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Connection pairs, each carrying one message per round.
    #[arg(long, default_value_t = 500)]
    connections: usize,
    /// Message size in bytes (a chat delivery is about 150).
    #[arg(long, default_value_t = 150)]
    size: usize,
    /// Measured rounds (one message per connection each).
    #[arg(long, default_value_t = 200)]
    rounds: u64,
}

/// What `bench floor` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Connection pairs.
    pub connections: usize,
    /// Message size in bytes.
    pub size: usize,
    /// Messages sent and received in the measured rounds.
    pub messages: u64,
    /// CPU microseconds per message: one send plus one receive.
    pub cpu_us_per_hop: f64,
    /// Length of the measured rounds, seconds.
    pub window_s: f64,
    /// Cores busy on the whole machine meanwhile.
    pub machine_cores: f64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "floor {} loopback connections, {} B messages, one at a time per connection",
            self.connections, self.size
        )?;
        writeln!(
            f,
            "  {} messages in {:.2} s: {:.2} µs CPU per hop (one send + one receive)",
            self.messages, self.window_s, self.cpu_us_per_hop
        )?;
        write!(f, "  machine {:.2} cores busy", self.machine_cores)
    }
}

/// Counts received messages and wakes the sender once a round is complete.
struct Rounds {
    received: AtomicU64,
    target: AtomicU64,
    done: Notify,
}

/// Runs the measurement.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    anyhow::ensure!(
        args.connections > 0 && args.size > 0 && args.rounds > 0,
        "--connections, --size and --rounds must be at least 1"
    );
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback listener")?;
    let addr = listener.local_addr()?;
    let rounds = Arc::new(Rounds {
        received: AtomicU64::new(0),
        target: AtomicU64::new(u64::MAX),
        done: Notify::new(),
    });
    let mut senders = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        let client = TcpStream::connect(addr)
            .await
            .context("connecting over loopback")?;
        let (server, _) = listener.accept().await.context("accepting")?;
        client.set_nodelay(true)?;
        server.set_nodelay(true)?;
        senders.push(client);
        tokio::spawn(receive(server, args.size, Arc::clone(&rounds)));
    }

    let message = vec![b'x'; args.size];
    let per_round = args.connections as u64;
    // One unmeasured round warms up every socket and task.
    round(&mut senders, &message, &rounds, per_round).await?;
    let window = Window::open(&[])?;
    for _ in 0..args.rounds {
        round(&mut senders, &message, &rounds, per_round).await?;
    }
    let measured = window.close()?;
    let messages = args.rounds * per_round;
    Ok(Report {
        connections: args.connections,
        size: args.size,
        messages,
        cpu_us_per_hop: measured.generator.cpu_seconds * 1e6 / messages as f64,
        window_s: measured.wall_s,
        machine_cores: measured.machine_cores,
    })
}

/// Writes one message to every connection and waits until all have been read.
async fn round(
    senders: &mut [TcpStream],
    message: &[u8],
    rounds: &Rounds,
    per_round: u64,
) -> anyhow::Result<()> {
    let target = rounds.received.load(SeqCst) + per_round;
    rounds.target.store(target, SeqCst);
    for sender in senders.iter_mut() {
        sender.write_all(message).await.context("sending")?;
    }
    loop {
        let done = rounds.done.notified();
        if rounds.received.load(SeqCst) >= target {
            return Ok(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(10), done)
            .await
            .context("messages did not arrive within 10 s")?;
    }
}

/// Reads messages of `size` bytes until the connection closes, counting each.
async fn receive(mut stream: TcpStream, size: usize, rounds: Arc<Rounds>) {
    let mut buf = vec![0u8; size];
    while stream.read_exact(&mut buf).await.is_ok() {
        let received = rounds.received.fetch_add(1, SeqCst) + 1;
        if received == rounds.target.load(SeqCst) {
            rounds.done.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(connections: usize, size: usize, rounds: u64) -> Args {
        Args {
            connections,
            size,
            rounds,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_message_of_every_round_is_counted() {
        let report = run(args(7, 33, 9)).await.unwrap();
        assert_eq!(report.messages, 63);
        assert!(report.cpu_us_per_hop.is_finite() && report.cpu_us_per_hop >= 0.0);
        assert!(report.window_s > 0.0);
    }

    #[tokio::test]
    async fn empty_runs_are_refused() {
        let err = run(args(0, 150, 1)).await.unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
}
