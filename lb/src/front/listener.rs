//! Accepting client connections: the accept loop and the connection limit.
//!
//! Each listener runs one [`accept_loop`]: accept, admit (https and redirect take a
//! [`ConnSlot`] from the shared [`ConnLimit`], or close the connection at once when the limit is
//! reached, so the process never runs out of file descriptors mid-connection; the admin
//! listener admits everyone), set TCP_NODELAY, and hand the socket to the listener's
//! connection handler. Accept errors never end the loop: running out
//! of descriptors or memory backs off briefly (the condition clears as connections close), any
//! other error (a connection reset before it was accepted) is skipped. The loop ends when its
//! cancellation token fires, which closes the listening socket.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::Metrics;

/// Pause after an accept failure caused by resource exhaustion.
const EXHAUSTED_BACKOFF: Duration = Duration::from_millis(100);

/// Pending-connection queue length of each listening socket.
const LISTEN_BACKLOG: u32 = 4096;

/// Binds a listening socket on `addr` (SO_REUSEADDR set, so a restart can rebind at once).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// Takes over a listening socket handed over by a previous process (a binary upgrade): the
/// same socket, so connections waiting in its queue are not lost.
pub fn adopt(fd: std::os::fd::OwnedFd) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::from(fd);
    // Fails unless it is a bound socket.
    listener.local_addr()?;
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// The limit on concurrent client connections, counted in `Metrics::connections_active`.
#[derive(Debug)]
pub struct ConnLimit {
    metrics: Arc<Metrics>,
    limit: AtomicUsize,
    /// Connections are currently being refused (for logging the change only).
    refusing: AtomicBool,
}

impl ConnLimit {
    /// A limit of `limit` connections.
    pub fn new(metrics: Arc<Metrics>, limit: usize) -> Arc<Self> {
        Arc::new(ConnLimit {
            metrics,
            limit: AtomicUsize::new(limit),
            refusing: AtomicBool::new(false),
        })
    }

    /// Changes the limit; connections over a lowered limit are not closed.
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit, Relaxed);
    }

    /// The current limit.
    pub fn limit(&self) -> usize {
        self.limit.load(Relaxed)
    }

    /// A slot for one more connection, unless the limit is reached.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnSlot> {
        let limit = self.limit.load(Relaxed) as u64;
        let active = &self.metrics.connections_active;
        if active.fetch_add(1, Relaxed) >= limit {
            active.fetch_sub(1, Relaxed);
            self.metrics.connections_rejected.fetch_add(1, Relaxed);
            if !self.refusing.swap(true, Relaxed) {
                warn!(limit, "connection limit reached; refusing new connections");
            }
            return None;
        }
        if self.refusing.swap(false, Relaxed) {
            info!(
                limit,
                "below the connection limit again; accepting connections"
            );
        }
        self.metrics.connections_total.fetch_add(1, Relaxed);
        Some(ConnSlot {
            limit: Arc::clone(self),
        })
    }
}

/// One connection counted against the [`ConnLimit`]; dropping it frees the slot.
#[derive(Debug)]
pub struct ConnSlot {
    limit: Arc<ConnLimit>,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.limit.metrics.connections_active.fetch_sub(1, Relaxed);
    }
}

/// Accepts connections on `listener` until `token` fires. Each one is first admitted by
/// `admit` (the connection limit hands out a [`ConnSlot`]; `None` closes the connection at
/// once), gets TCP_NODELAY, and goes to `serve` with what `admit` gave.
pub async fn accept_loop<T>(
    listener: TcpListener,
    kind: &'static str,
    token: CancellationToken,
    mut admit: impl FnMut() -> Option<T>,
    mut serve: impl FnMut(TcpStream, SocketAddr, T),
) {
    loop {
        let accepted = tokio::select! {
            () = token.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let Some(admitted) = admit() else {
                    drop(stream);
                    continue;
                };
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(listener = kind, peer = %peer, error = %e, "could not set TCP_NODELAY");
                }
                serve(stream, peer, admitted);
            }
            Err(e) if is_exhaustion(&e) => {
                warn!(listener = kind, error = %e, "accept failed: out of resources; backing off");
                tokio::select! {
                    () = token.cancelled() => break,
                    () = tokio::time::sleep(EXHAUSTED_BACKOFF) => {}
                }
            }
            Err(e) => debug!(listener = kind, error = %e, "accept failed"),
        }
    }
    debug!(listener = kind, "listener closed");
}

/// Whether an accept error means the process or system ran out of descriptors or memory.
fn is_exhaustion(e: &io::Error) -> bool {
    const EMFILE: i32 = 24;
    const ENFILE: i32 = 23;
    const ENOBUFS: i32 = 105;
    const ENOMEM: i32 = 12;
    matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS | ENOMEM))
        || e.kind() == io::ErrorKind::OutOfMemory
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_refused_at_the_limit_and_freed_on_drop() {
        let metrics = Arc::new(Metrics::default());
        let limit = ConnLimit::new(Arc::clone(&metrics), 2);
        let a = limit.try_acquire().unwrap();
        let _b = limit.try_acquire().unwrap();
        assert!(limit.try_acquire().is_none());
        assert_eq!(metrics.connections_rejected.load(Relaxed), 1);
        drop(a);
        assert!(limit.try_acquire().is_some());
        assert_eq!(metrics.connections_active.load(Relaxed), 1);
        assert_eq!(metrics.connections_total.load(Relaxed), 3);
    }

    #[test]
    fn descriptor_exhaustion_is_recognised() {
        assert!(is_exhaustion(&io::Error::from_raw_os_error(24)));
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(104)));
    }
}
