//! The response bodies the proxy answers with: a short body the load balancer wrote itself
//! (400, 503, a redirect), or a backend's body read straight from its connection
//! ([`UpstreamBody`]).
//!
//! An [`UpstreamBody`] decodes the backend's framing (`exchange::Framing`) as the client's
//! connection asks for data: a length counted down, chunks (sizes parsed with `httparse`,
//! extensions and trailers dropped), or everything until the backend closes. Each piece goes out
//! as received, counted into the backend's statistics, without a copy: it is a view of the read
//! buffer. The body also holds what the exchange borrowed: the backend lease (least-connections
//! counts it until the last byte) and the connection, handed back to the keep-alive pool the
//! moment the body ends cleanly, and closed instead if the backend broke the framing or the
//! client went away midway.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::balance::Lease;
use crate::exchange::{Framing, READ_CHUNK};
use crate::upstream::{BackendConn, Upstreams};

/// Longest chunk-size line accepted (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 4096;

/// Most trailer bytes read (and dropped) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// What polling a body for its next frame gives.
type PollFrame = Poll<Option<Result<Frame<Bytes>, io::Error>>>;

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decode {
    /// This many bytes of a `Content-Length` body are still to come.
    Length(u64),
    /// A chunk-size line is next.
    ChunkSize,
    /// This many bytes of the current chunk are still to come.
    ChunkData(u64),
    /// The CRLF after a chunk's data is next.
    ChunkEnd,
    /// The trailer section after the last chunk is next.
    Trailers,
    /// Everything up to the close.
    UntilClose,
    /// The body has ended.
    Done,
}

/// A backend's response body on its way to the client.
#[derive(Debug)]
pub struct UpstreamBody {
    /// The connection the body arrives on; `None` once handed back or dropped.
    conn: Option<BackendConn>,
    state: Decode,
    /// Holds the backend's least-connections count until the body ends.
    lease: Option<Lease>,
    /// Where the connection goes back once the body has ended, when it may be reused.
    pool: Option<Arc<Upstreams>>,
}

impl UpstreamBody {
    /// The body that follows a response head on `conn`, framed as `framing`. The connection
    /// returns to `pool` at the end of the body when one is given.
    pub fn new(
        conn: BackendConn,
        framing: Framing,
        lease: Lease,
        pool: Option<Arc<Upstreams>>,
    ) -> Self {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::ChunkSize,
            Framing::UntilClose => Decode::UntilClose,
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            state,
            lease: Some(lease),
            pool,
        };
        if state == Decode::Done {
            body.finish();
        }
        body
    }

    /// The body ended cleanly: the connection goes back to the pool (when allowed and nothing
    /// unasked-for follows), the lease ends.
    fn finish(&mut self) {
        self.state = Decode::Done;
        if let (Some(conn), Some(pool)) = (self.conn.take(), self.pool.take()) {
            pool.put(conn);
        }
        self.lease = None;
    }

    /// The body broke: the connection is closed and the backend's error count goes up.
    fn fail(&mut self, why: &'static str) -> PollFrame {
        if let Some(lease) = self.lease.take() {
            lease.backend().stats().errors.fetch_add(1, Relaxed);
        }
        self.conn = None;
        self.state = Decode::Done;
        Poll::Ready(Some(Err(io::Error::new(io::ErrorKind::InvalidData, why))))
    }

    /// Hands out up to `limit` buffered bytes as a data frame, counting them.
    fn data(&mut self, limit: u64) -> Option<Bytes> {
        let conn = self.conn.as_mut()?;
        let n = usize::try_from(limit)
            .unwrap_or(usize::MAX)
            .min(conn.buf.len());
        if n == 0 {
            return None;
        }
        let data = conn.buf.split_to(n).freeze();
        if let Some(lease) = &self.lease {
            lease
                .backend()
                .stats()
                .bytes_to_client
                .fetch_add(n as u64, Relaxed);
        }
        Some(data)
    }

    /// Decodes what is buffered: a data frame, the end (`Ready(None)`), an error, or `None`
    /// when more bytes are needed.
    fn decode(&mut self) -> Option<PollFrame> {
        loop {
            let buf = &mut self.conn.as_mut()?.buf;
            match self.state {
                Decode::Done => return Some(Poll::Ready(None)),
                Decode::Length(left) => {
                    let data = self.data(left)?;
                    let left = left - data.len() as u64;
                    self.state = Decode::Length(left);
                    if left == 0 {
                        self.finish();
                    }
                    return Some(Poll::Ready(Some(Ok(Frame::data(data)))));
                }
                Decode::UntilClose => {
                    let data = self.data(u64::MAX)?;
                    return Some(Poll::Ready(Some(Ok(Frame::data(data)))));
                }
                Decode::ChunkData(left) => {
                    let data = self.data(left)?;
                    let left = left - data.len() as u64;
                    self.state = if left == 0 {
                        Decode::ChunkEnd
                    } else {
                        Decode::ChunkData(left)
                    };
                    return Some(Poll::Ready(Some(Ok(Frame::data(data)))));
                }
                Decode::ChunkSize => match httparse::parse_chunk_size(buf) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        let _ = buf.split_to(used);
                        self.state = if size == 0 {
                            Decode::Trailers
                        } else {
                            Decode::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => return None,
                    _ => return Some(self.fail("invalid chunk size line from the backend")),
                },
                Decode::ChunkEnd => {
                    if buf.len() < 2 {
                        return None;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Some(self.fail("chunk data not followed by CRLF"));
                    }
                    let _ = buf.split_to(2);
                    self.state = Decode::ChunkSize;
                }
                Decode::Trailers => {
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
                    };
                    match end {
                        Some(end) => {
                            let _ = buf.split_to(end);
                            self.finish();
                            return Some(Poll::Ready(None));
                        }
                        None if buf.len() < MAX_TRAILERS => return None,
                        None => return Some(self.fail("trailer section too large")),
                    }
                }
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        let this = &mut *self;
        loop {
            if let Some(ready) = this.decode() {
                return ready;
            }
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_CHUNK);
            match ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut conn.stream),
                cx,
                &mut conn.buf
            )) {
                Ok(0) if this.state == Decode::UntilClose => {
                    // The close ends this body; the connection cannot be reused.
                    this.pool = None;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => return this.fail("the backend closed the connection mid-body"),
                Ok(_) => {}
                Err(e) => {
                    if let Some(lease) = this.lease.take() {
                        lease.backend().stats().errors.fetch_add(1, Relaxed);
                    }
                    this.conn = None;
                    this.state = Decode::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.state == Decode::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.state {
            Decode::Done => SizeHint::with_exact(0),
            Decode::Length(left) => SizeHint::with_exact(left),
            _ => SizeHint::default(),
        }
    }
}

/// What the proxy answers a client with.
#[derive(Debug)]
pub enum ResponseBody {
    /// A body the load balancer wrote (possibly empty).
    Local(Option<Bytes>),
    /// A backend's body.
    Upstream(UpstreamBody),
}

impl ResponseBody {
    /// A body holding `text`.
    pub fn text(text: impl Into<Bytes>) -> Self {
        ResponseBody::Local(Some(text.into()))
    }

    /// No body.
    pub fn empty() -> Self {
        ResponseBody::Local(None)
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        match self.get_mut() {
            ResponseBody::Local(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Local(data) => data.is_none(),
            ResponseBody::Upstream(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Local(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ResponseBody::Upstream(body) => body.size_hint(),
        }
    }
}
