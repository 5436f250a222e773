//! Connections to backends: connecting (with timeout and TCP_NODELAY) and a keep-alive pool of
//! idle HTTP/1.1 connections per backend address.
//!
//! A request first asks [`Upstreams::take`] for an idle connection to the chosen backend (most
//! recently used first, so a few stay warm and the rest age out); if there is none it opens a
//! new one with [`open`]. A connection is a plain socket with the bytes read from it
//! and not yet consumed ([`BackendConn`]); the request's own task writes to it and reads from
//! it (`exchange`), so no task runs per connection. When the response body has been read to its
//! end, `body::UpstreamBody` hands the connection back with [`Upstreams::put`]. An idle
//! connection that the backend has closed (or that has sent bytes nobody asked for) is dropped
//! when it is next taken. Connections idle longer than `timeouts.backend_idle`, beyond
//! `limits.backend_idle_connections` per backend, to a backend no longer configured, or after
//! shutdown began are dropped, which closes them. WebSocket tunnels use a connection of their
//! own from [`open`] that is never pooled.

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
pub async fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
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
    /// it nor sent anything unasked. Answers from the readiness the runtime already knows, so
    /// it costs no system call while the connection is quiet.
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
    /// been idle less than `max_age`.
    pub fn take(&self, addr: SocketAddr, max_age: Duration) -> Option<BackendConn> {
        let mut idle = self.lock();
        let list = idle.get_mut(&addr)?;
        let now = Instant::now();
        while let Some(entry) = list.pop() {
            if now.duration_since(entry.since) < max_age && entry.conn.is_usable() {
                return Some(entry.conn);
            }
        }
        None
    }

    /// Returns a connection whose exchange finished cleanly.
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
        }
    }

    /// Drops idle connections older than `max_age`, closed by their backend, or to backends
    /// `keep` rejects.
    pub fn sweep(&self, max_age: Duration, keep: impl Fn(SocketAddr) -> bool) {
        let now = Instant::now();
        let mut idle = self.lock();
        idle.retain(|addr, list| {
            list.retain(|c| now.duration_since(c.since) < max_age && c.conn.is_usable());
            keep(*addr) && !list.is_empty()
        });
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
