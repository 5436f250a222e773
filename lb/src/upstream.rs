//! Connections to backends: connecting (with timeout and TCP_NODELAY) and a keep-alive pool of
//! idle HTTP/1.1 connections per backend address.
//!
//! A request first asks [`Upstreams::take`] for an idle connection to the chosen backend (most
//! recently used first, so a few stay warm and the rest age out); if there is none it opens a
//! new one with [`Upstreams::open`], whose connection driver runs as a tracked task. When the
//! response body has been read to its end, `body::UpstreamBody` hands the connection back with
//! [`Upstreams::put`]. Connections idle longer than `timeouts.backend_idle`, beyond
//! `limits.backend_idle_connections` per backend, to a backend no longer configured, or after
//! shutdown began are dropped, which closes them. WebSocket tunnels use [`connect`] alone: an
//! upgraded connection is never pooled.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use crate::body::PooledSender;

/// Opens a TCP connection to `addr` within `timeout`, with TCP_NODELAY set.
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// An idle pooled connection.
#[derive(Debug)]
struct Idle {
    sender: PooledSender,
    since: Instant,
}

/// The pool of idle keep-alive connections, per backend address.
#[derive(Debug)]
pub struct Upstreams {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Idle connections kept per backend.
    max_idle: std::sync::atomic::AtomicUsize,
    /// Shutdown began: nothing is pooled any more.
    closed: AtomicBool,
    tracker: TaskTracker,
    /// Cut connection drivers still running when the drain grace is over.
    kill: CancellationToken,
}

impl Upstreams {
    /// An empty pool keeping at most `max_idle` idle connections per backend; connection
    /// drivers run on `tracker` and stop at `kill`.
    pub fn new(max_idle: usize, tracker: TaskTracker, kill: CancellationToken) -> Self {
        Upstreams {
            idle: Mutex::new(HashMap::new()),
            max_idle: max_idle.into(),
            closed: AtomicBool::new(false),
            tracker,
            kill,
        }
    }

    /// Changes how many idle connections are kept per backend (on reload).
    pub fn set_max_idle(&self, max_idle: usize) {
        self.max_idle.store(max_idle, Ordering::Relaxed);
    }

    /// Takes the most recently used idle connection to `addr` that is still open and has been
    /// idle less than `max_age`.
    pub fn take(&self, addr: SocketAddr, max_age: Duration) -> Option<PooledSender> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(conn) = list.pop() {
            if !conn.sender.is_closed() && now.duration_since(conn.since) < max_age {
                return Some(conn.sender);
            }
        }
        None
    }

    /// Returns a connection whose exchange finished cleanly.
    pub fn put(&self, addr: SocketAddr, sender: PooledSender) {
        if self.closed.load(Ordering::Relaxed) || sender.is_closed() {
            return;
        }
        let max_idle = self.max_idle.load(Ordering::Relaxed);
        let mut idle = self.lock();
        let list = idle.entry(addr).or_default();
        if list.len() < max_idle {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Drops idle connections older than `max_age` or to backends `keep` rejects.
    pub fn sweep(&self, max_age: Duration, keep: impl Fn(SocketAddr) -> bool) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.retain(|addr, list| {
            list.retain(|c| !c.sender.is_closed() && now.duration_since(c.since) < max_age);
            keep(*addr) && !list.is_empty()
        });
    }

    /// Drops every idle connection and pools nothing from now on (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.lock().clear();
    }

    /// Opens a new HTTP/1.1 connection to `addr` and starts its driver.
    pub async fn open(
        &self,
        addr: SocketAddr,
        connect_timeout: Duration,
    ) -> io::Result<PooledSender> {
        let stream = connect(addr, connect_timeout).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        let kill = self.kill.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                result = conn => {
                    if let Err(e) = result {
                        debug!(backend = %addr, error = %e, "backend connection ended");
                    }
                }
                () = kill.cancelled() => {}
            }
        });
        Ok(sender)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // The map is valid whatever a panicking holder did: recover it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
