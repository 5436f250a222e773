//! Splicing a tunnel: copy bytes both ways between the client and the backend until both
//! directions have ended, one side fails, the tunnel has been idle too long, or shutdown cuts it.
//!
//! How it works: [`splice()`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::future::poll_fn;
use std::mem::MaybeUninit;
use std::pin::{Pin, pin};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

/// Bytes read per read call: two maximal TLS records of plaintext, so a 16 KiB WebSocket
/// message with its frame header (16 KiB + a few bytes) moves with one read and one write.
const READ_CHUNK: usize = 32 * 1024;

/// Once one side has closed and its close has been passed on, how long the other side may take
/// to close too before the tunnel is cut (HAProxy's `timeout client-fin`). A WebSocket peer
/// closes right after the close handshake, so this only ends tunnels whose peer lingers.
pub const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Why a tunnel ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpliceEnd {
    /// Both sides closed their streams.
    Closed,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// Reading from or writing to the client failed (reset, TLS error).
    ClientError,
    /// Reading from or writing to the backend failed.
    BackendError,
    /// The load balancer is shutting down and the drain grace has passed.
    Shutdown,
}

impl SpliceEnd {
    /// A short label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            SpliceEnd::Closed => "closed",
            SpliceEnd::IdleTimeout => "idle timeout",
            SpliceEnd::ClientError => "client error",
            SpliceEnd::BackendError => "backend error",
            SpliceEnd::Shutdown => "shutdown",
        }
    }
}

/// What a finished tunnel did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpliceReport {
    /// Bytes copied from the client to the backend.
    pub to_backend: u64,
    /// Bytes copied from the backend to the client.
    pub to_client: u64,
    /// Why it ended.
    pub end: SpliceEnd,
    /// The read or write error behind a `ClientError` or `BackendError`.
    pub error: Option<String>,
}

/// Copies between `client` and `backend` until the tunnel ends.
///
/// `client_early` are bytes the client already sent that must reach the backend first (read
/// ahead while parsing the upgrade request); `backend_early` likewise towards the client. Both
/// are released before copying starts.
/// `on_bytes` is called with `(to_backend, to_client)` byte counts as they move, for live
/// statistics.
///
/// One task drives both directions with one hand-written copy loop each, instead of
/// `tokio::io::copy_bidirectional`, for two reasons. The idle timeout needs to see activity,
/// which `copy_bidirectional` hides. And memory: `copy_bidirectional` keeps an 8 KiB heap buffer
/// per direction for the whole life of a tunnel, while here each read lands in a buffer on the
/// stack of the poll call, and is written straight to the other side. Only when that side
/// cannot take it all (backpressure) do the leftover bytes move to a per-direction spill buffer,
/// allocated when needed and released once drained. An idle tunnel therefore holds no copy
/// buffers at all, and no frame ever causes an allocation of its own.
///
/// When one side ends its stream (EOF), the other side's write half is shut down after
/// everything read has been delivered (for the TLS client that sends `close_notify`), so each
/// side's close reaches the other; the tunnel is over once both directions have ended, or
/// [`HALF_CLOSE_GRACE`] after the first did if the other side never closes. A side that fails
/// (reset, TLS error) ends its directions the same way: what it sent before failing is still
/// delivered and flushed, so a backend's close frame survives the reset that may follow it.
pub async fn splice<C, B>(
    mut client: C,
    client_early: Bytes,
    mut backend: B,
    backend_early: Bytes,
    idle: Duration,
    stop: &CancellationToken,
    mut on_bytes: impl FnMut(u64, u64),
) -> SpliceReport
where
    C: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = Direction::with_early(client_early);
    let mut down = Direction::with_early(backend_early);
    let mut last_activity = Instant::now();
    let mut half_closed: Option<Instant> = None;
    let mut timer: Pin<&mut Sleep> = pin!(tokio::time::sleep(idle));
    // The first failure; the tunnel ends with it once the other direction is over too.
    let mut failed: Option<(SpliceEnd, String)> = None;

    let copy = poll_fn(|cx| {
        let (before_up, before_down) = (up.bytes, down.bytes);
        let mut up_state = up.poll_copy(cx, &mut client, &mut backend);
        let mut down_state = down.poll_copy(cx, &mut backend, &mut client);
        let (moved_up, moved_down) = (up.bytes - before_up, down.bytes - before_down);
        if moved_up + moved_down > 0 {
            on_bytes(moved_up, moved_down);
            last_activity = Instant::now();
        }
        for (state, direction, read_side_is_client) in [
            (&mut up_state, &mut up, true),
            (&mut down_state, &mut down, false),
        ] {
            if let Poll::Ready(Err(failure)) = state {
                // A side that failed may have sent something first (a backend's WebSocket
                // close frame, then a reset because the client's message was left unread):
                // what was read is still delivered, and the other direction runs to its end.
                let (client_failed, error, source_failed) = match failure {
                    Failure::Read(e) => (read_side_is_client, e, true),
                    Failure::Write(e) => (!read_side_is_client, e, false),
                };
                let end = if client_failed {
                    SpliceEnd::ClientError
                } else {
                    SpliceEnd::BackendError
                };
                failed.get_or_insert_with(|| (end, error.to_string()));
                if source_failed {
                    // Pass the end on like an EOF: flush, then shut the destination down.
                    direction.eof = true;
                    cx.waker().wake_by_ref();
                    *state = Poll::Pending;
                } else {
                    direction.done = true;
                    *state = Poll::Ready(Ok(()));
                }
            }
        }
        let mut ended = || match failed.take() {
            Some((end, error)) => (end, Some(error)),
            None => (SpliceEnd::Closed, None),
        };
        if up_state.is_ready() && down_state.is_ready() {
            return Poll::Ready(ended());
        }
        if (up_state.is_ready() || down_state.is_ready()) && half_closed.is_none() {
            let now = Instant::now();
            half_closed = Some(now);
            let deadline = timer.deadline().min(now + HALF_CLOSE_GRACE);
            timer.as_mut().reset(deadline);
        }
        loop {
            ready!(timer.as_mut().poll(cx));
            let now = Instant::now();
            let lingering = half_closed.map(|at| at + HALF_CLOSE_GRACE);
            if lingering.is_some_and(|deadline| deadline <= now) {
                return Poll::Ready(ended());
            }
            let idle_deadline = last_activity + idle;
            if idle_deadline <= now {
                return Poll::Ready((SpliceEnd::IdleTimeout, None));
            }
            timer
                .as_mut()
                .reset(lingering.map_or(idle_deadline, |l| l.min(idle_deadline)));
        }
    });

    let (end, error) = tokio::select! {
        ended = copy => ended,
        () = stop.cancelled() => (SpliceEnd::Shutdown, None),
    };
    SpliceReport {
        to_backend: up.bytes,
        to_client: down.bytes,
        end,
        error,
    }
}

/// Which half of a direction failed.
#[derive(Debug)]
enum Failure {
    /// Reading from the source.
    Read(std::io::Error),
    /// Writing to (or flushing, or shutting down) the destination.
    Write(std::io::Error),
}

/// One direction of the tunnel: reads from a source, writes to a destination.
#[derive(Debug, Default)]
struct Direction {
    /// Bytes read but not yet written; empty (and unallocated) unless the destination pushed
    /// back or early bytes were handed in.
    spill: Vec<u8>,
    /// How much of `spill` has been written.
    spill_pos: usize,
    /// Written bytes may sit in the destination's buffers (TLS records) until flushed.
    need_flush: bool,
    /// The source reached EOF.
    eof: bool,
    /// The destination's write half has been shut down: this direction is over.
    done: bool,
    /// Bytes moved in total.
    bytes: u64,
}

impl Direction {
    /// A direction that first delivers `early`. The bytes are copied out so that the buffer
    /// they were read into (hyper's, often several KiB) is freed now rather than kept for the
    /// life of the tunnel.
    fn with_early(early: Bytes) -> Self {
        Direction {
            spill: early.to_vec(),
            ..Direction::default()
        }
    }

    /// Copies until the source has nothing more right now (Pending) or has ended and the end
    /// has been passed on (Ready(Ok)).
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut R,
        dst: &mut W,
    ) -> Poll<Result<(), Failure>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.spill_pos < self.spill.len() {
                let n = ready!(poll_write_some(cx, dst, &self.spill[self.spill_pos..]))?;
                self.spill_pos += n;
                self.wrote(n);
            }
            self.spill_pos = 0;
            if self.spill.capacity() != 0 {
                // Drained: release it, so a tunnel that once met backpressure idles without it.
                self.spill = Vec::new();
            }

            if self.eof {
                ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(Failure::Write)?;
                ready!(Pin::new(&mut *dst).poll_shutdown(cx)).map_err(Failure::Write)?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }

            let mut storage = [MaybeUninit::<u8>::uninit(); READ_CHUNK];
            let mut buf = ReadBuf::uninit(&mut storage);
            match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                Poll::Pending => {
                    if self.need_flush {
                        ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(Failure::Write)?;
                        self.need_flush = false;
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Failure::Read(e))),
                Poll::Ready(Ok(())) => {}
            }
            let data = buf.filled();
            if data.is_empty() {
                self.eof = true;
                continue;
            }
            let mut written = 0;
            while written < data.len() {
                match poll_write_some(cx, dst, &data[written..]) {
                    Poll::Ready(Ok(n)) => {
                        written += n;
                        self.wrote(n);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // The destination is full: keep the rest until it drains.
                        self.spill.extend_from_slice(&data[written..]);
                        return Poll::Pending;
                    }
                }
            }
        }
    }

    /// Accounts for `n` bytes handed to the destination.
    fn wrote(&mut self, n: usize) {
        self.bytes += n as u64;
        self.need_flush = true;
    }
}

/// One write of (part of) `data` to `dst`; a zero-length write is a failure.
fn poll_write_some<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    dst: &mut W,
    data: &[u8],
) -> Poll<Result<usize, Failure>> {
    match ready!(Pin::new(dst).poll_write(cx, data)) {
        Ok(0) => Poll::Ready(Err(Failure::Write(std::io::ErrorKind::WriteZero.into()))),
        Err(e) => Poll::Ready(Err(Failure::Write(e))),
        Ok(n) => Poll::Ready(Ok(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, duplex};

    /// Runs a splice between two in-memory pipes and returns the far ends and the task.
    fn start(
        idle: Duration,
        client_early: &'static [u8],
    ) -> (
        tokio::io::DuplexStream,
        tokio::io::DuplexStream,
        CancellationToken,
        tokio::task::JoinHandle<SpliceReport>,
    ) {
        let (client_far, client_near) = duplex(64);
        let (backend_near, backend_far) = duplex(64);
        let stop = CancellationToken::new();
        let token = stop.clone();
        let task = tokio::spawn(async move {
            splice(
                client_near,
                Bytes::from_static(client_early),
                backend_near,
                Bytes::new(),
                idle,
                &token,
                |_, _| {},
            )
            .await
        });
        (client_far, backend_far, stop, task)
    }

    #[tokio::test]
    async fn copies_both_ways_through_backpressure_and_passes_eof() {
        let (mut client, mut backend, _stop, task) = start(Duration::from_secs(60), b"early:");
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..6], b"early:");
        assert_eq!(&got[6..], &payload[..]);
        backend.write_all(b"reply").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        let report = task.await.unwrap();
        assert_eq!(report.end, SpliceEnd::Closed);
        assert_eq!(report.to_backend, payload.len() as u64 + 6);
        assert_eq!(report.to_client, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_tunnel_ends_at_the_timeout_and_activity_extends_it() {
        let (mut client, mut backend, _stop, task) = start(Duration::from_secs(10), b"");
        tokio::time::sleep(Duration::from_secs(8)).await;
        client.write_all(b"x").await.unwrap();
        let mut one = [0u8; 1];
        backend.read_exact(&mut one).await.unwrap();
        tokio::time::sleep(Duration::from_secs(8)).await;
        assert!(!task.is_finished());
        let report = task.await.unwrap();
        assert_eq!(report.end, SpliceEnd::IdleTimeout);
        assert_eq!(report.to_backend, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_side_that_never_closes_is_cut_after_the_half_close_grace() {
        let (client, mut backend, _stop, task) = start(Duration::from_secs(3600), b"");
        backend.shutdown().await.unwrap();
        // The client side keeps its end open and silent.
        let report = task.await.unwrap();
        assert_eq!(report.end, SpliceEnd::Closed);
        drop(client);
    }

    #[tokio::test]
    async fn stop_token_ends_the_tunnel() {
        let (_client, _backend, stop, task) = start(Duration::from_secs(60), b"");
        stop.cancel();
        let report = task.await.unwrap();
        assert_eq!((report.end, report.error), (SpliceEnd::Shutdown, None));
    }

    /// A backend that sent `sent` and then reset the connection: a read gives those bytes,
    /// the next one `ConnectionReset`; every write fails.
    struct ResetBackend(Option<&'static [u8]>);

    impl AsyncRead for ResetBackend {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            match self.0.take() {
                Some(sent) => {
                    buf.put_slice(sent);
                    Poll::Ready(Ok(()))
                }
                None => Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into())),
            }
        }
    }

    impl AsyncWrite for ResetBackend {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            Poll::Ready(Err(std::io::ErrorKind::ConnectionReset.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn what_a_backend_sent_before_its_reset_reaches_the_client() {
        // Found by the Autobahn test (tests/tests/autobahn.rs, case 1.1.6 through lb): app
        // answers a too-large message with a 1009 close frame and closes with the message
        // unread, which resets the connection; the client got neither frame nor code.
        const CLOSE_1009: &[u8] = b"\x88\x02\x03\xf1";
        let (mut client_far, client_near) = duplex(64);
        client_far
            .write_all(b"part of a large message")
            .await
            .unwrap();
        // Like the TLS stream, written bytes leave at the flush.
        let client_near = tokio::io::BufWriter::new(client_near);
        let report = splice(
            client_near,
            Bytes::new(),
            ResetBackend(Some(CLOSE_1009)),
            Bytes::new(),
            Duration::from_secs(60),
            &CancellationToken::new(),
            |_, _| {},
        )
        .await;
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, CLOSE_1009);
        assert_eq!(report.end, SpliceEnd::BackendError);
        assert_eq!(report.to_client, CLOSE_1009.len() as u64);
    }

    #[tokio::test]
    async fn a_failing_side_is_named() {
        let (client, backend, _stop, task) = start(Duration::from_secs(60), b"");
        drop(backend);
        let mut client = client;
        // Writing towards a vanished backend fails that side.
        let _ = client.write_all(b"hello").await;
        let report = task.await.unwrap();
        assert_eq!(report.end, SpliceEnd::BackendError);
        assert!(report.error.is_some(), "the cause is kept for the log line");
    }
}
