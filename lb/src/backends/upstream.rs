//! Connections to backends: connecting (with timeout and TCP_NODELAY) and a keep-alive pool of
//! idle HTTP/1.1 connections per backend address.
//!
//! How it works: [`Upstreams`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Opens a TCP connection to `addr` within `timeout`, with TCP_NODELAY set.
async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Opens a new HTTP/1.1 connection to `addr` within `timeout`.
pub async fn open(addr: SocketAddr, timeout: Duration) -> io::Result<BackendConn> {
    Ok(BackendConn {
        stream: connect(addr, timeout).await?,
        buf: BytesMut::new(),
        addr,
    })
}

/// One HTTP/1.1 connection to a backend.
#[derive(Debug)]
pub struct BackendConn {
    /// The socket.
    pub stream: TcpStream,
    /// Bytes received and not yet consumed; empty while the connection is idle.
    pub buf: BytesMut,
    /// Where it leads.
    pub addr: SocketAddr,
}

impl BackendConn {
    /// Whether an idle connection can carry another request: the backend has neither closed
    /// it nor sent anything unasked. Answers from the readiness the runtime already knows when
    /// the socket is marked not readable (no system call); otherwise one `recv` finds out.
    fn is_usable(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// An idle pooled connection.
#[derive(Debug)]
struct Idle {
    conn: BackendConn,
    since: Instant,
}

/// The pool of idle keep-alive connections, per backend address.
///
/// A request first asks [`Upstreams::take`] for an idle connection to the chosen backend (most
/// recently used first, so a few stay warm and the rest age out); if there is none it opens a
/// new one with [`open`]. A connection is a plain socket with the bytes read from it
/// and not yet consumed ([`BackendConn`]); the request's own task writes to it and reads from
/// it (`exchange`), so no task runs per connection. When the response body has been read to its
/// end, `body::UpstreamBody` hands the connection back with [`Upstreams::put`]. An idle
/// connection that the backend has closed (or that has sent bytes nobody asked for) is dropped
/// when it is next taken. Connections idle longer than `timeouts.backend_idle`, beyond
/// `limits.backend_idle_connections` per backend, to a backend no longer configured, or after
/// shutdown began are dropped, which closes them. WebSocket tunnels use a connection of their
/// own from [`open`] that is never pooled.
#[derive(Debug)]
pub struct Upstreams {
    idle: Mutex<HashMap<SocketAddr, Vec<Idle>>>,
    /// Idle connections kept per backend.
    max_idle: AtomicUsize,
    /// Shutdown began: nothing is pooled any more.
    closed: AtomicBool,
}

impl Upstreams {
    /// An empty pool keeping at most `max_idle` idle connections per backend.
    pub fn new(max_idle: usize) -> Self {
        Upstreams {
            idle: Mutex::new(HashMap::new()),
            max_idle: max_idle.into(),
            closed: AtomicBool::new(false),
        }
    }

    /// Changes how many idle connections are kept per backend (on reload).
    pub fn set_max_idle(&self, max_idle: usize) {
        self.max_idle.store(max_idle, Ordering::Relaxed);
    }

    /// Takes the most recently used idle connection to `addr` that is still usable and has
    /// been idle less than `max_age`. The lock is held only to pop; checking a connection and
    /// closing a dead one happen outside it.
    pub fn take(&self, addr: SocketAddr, max_age: Duration) -> Option<BackendConn> {
        loop {
            let entry = self.lock().get_mut(&addr)?.pop()?;
            if entry.since.elapsed() < max_age && entry.conn.is_usable() {
                return Some(entry.conn);
            }
        }
    }

    /// Returns a connection whose exchange finished cleanly (dropped, which closes it, when
    /// the pool is closed or full).
    pub fn put(&self, conn: BackendConn) {
        if self.closed.load(Ordering::Relaxed) || !conn.buf.is_empty() {
            return;
        }
        let max_idle = self.max_idle.load(Ordering::Relaxed);
        let mut idle = self.lock();
        let list = idle.entry(conn.addr).or_default();
        if list.len() < max_idle {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        } else {
            drop(idle);
            drop(conn);
        }
    }

    /// Drops idle connections older than `max_age`, closed by their backend, or to backends
    /// `keep` rejects. They are taken out under the lock and closed after it.
    pub fn sweep(&self, max_age: Duration, keep: impl Fn(SocketAddr) -> bool) {
        let all = std::mem::take(&mut *self.lock());
        let mut kept: HashMap<SocketAddr, Vec<Idle>> = HashMap::new();
        for (addr, list) in all.into_iter().filter(|(addr, _)| keep(*addr)) {
            let live: Vec<Idle> = list
                .into_iter()
                .filter(|c| c.since.elapsed() < max_age && c.conn.is_usable())
                .collect();
            if !live.is_empty() {
                kept.insert(addr, live);
            }
        }
        let mut idle = self.lock();
        for (addr, mut list) in kept {
            // Connections put back meanwhile are the more recent: they stay on top.
            let newer = idle.remove(&addr).unwrap_or_default();
            list.extend(newer);
            idle.insert(addr, list);
        }
    }

    /// Drops every idle connection and pools nothing from now on (shutdown).
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Vec<Idle>>> {
        // The map is valid whatever a panicking holder did: recover it.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
