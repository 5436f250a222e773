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

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, SizeHint};

use crate::backends::balance::Lease;
use crate::backends::exchange::{Framing, READ_CHUNK};
use crate::backends::upstream::{BackendConn, Upstreams};

/// Longest chunk-size line accepted (size, extensions, CRLF).
const MAX_CHUNK_LINE: usize = 4096;

/// Most trailer bytes read (and dropped) after the last chunk.
const MAX_TRAILERS: usize = 16 * 1024;

/// What polling a body for its next frame gives.
type PollFrame = Poll<Option<Result<Frame<Bytes>, io::Error>>>;

/// Where the decoder is in the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decode {
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
        let state = Decode::new(framing);
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
    fn fail(&mut self, error: io::Error) -> PollFrame {
        if let Some(lease) = self.lease.take() {
            lease.backend().stats().errors.fetch_add(1, Relaxed);
        }
        self.conn = None;
        self.state = Decode::Done;
        Poll::Ready(Some(Err(error)))
    }

    /// Decodes what is buffered: a data frame, the end (`Ready(None)`), an error, or `None`
    /// when more bytes are needed.
    fn decode(&mut self) -> Option<PollFrame> {
        let conn = self.conn.as_mut()?;
        match self.state.step(&mut conn.buf) {
            Step::Data(data) => {
                if let Some(lease) = &self.lease {
                    let stats = lease.backend().stats();
                    stats.bytes_to_client.fetch_add(data.len() as u64, Relaxed);
                }
                if self.state == Decode::Done {
                    self.finish();
                }
                Some(Poll::Ready(Some(Ok(Frame::data(data)))))
            }
            Step::End => {
                self.finish();
                Some(Poll::Ready(None))
            }
            Step::More => None,
            Step::Invalid(why) => Some(self.fail(io::Error::new(io::ErrorKind::InvalidData, why))),
        }
    }
}

/// One step of decoding a body from the bytes buffered so far.
#[derive(Debug, PartialEq)]
pub enum Step {
    /// The next piece of the body (a view of the buffer, not a copy).
    Data(Bytes),
    /// The body has ended; what follows it stays in the buffer.
    End,
    /// More bytes are needed.
    More,
    /// The backend broke the framing.
    Invalid(&'static str),
}

impl Decode {
    /// The state at the start of a body framed as `framing`.
    pub fn new(framing: Framing) -> Decode {
        match framing {
            Framing::Empty | Framing::Length(0) => Decode::Done,
            Framing::Length(n) => Decode::Length(n),
            Framing::Chunked => Decode::ChunkSize,
            Framing::UntilClose => Decode::UntilClose,
        }
    }

    /// Takes what it can from the front of `buf`.
    pub fn step(&mut self, buf: &mut BytesMut) -> Step {
        loop {
            match *self {
                Decode::Done => return Step::End,
                Decode::Length(left) => {
                    return self.counted(buf, left, Decode::Done, Decode::Length);
                }
                Decode::UntilClose => {
                    return take(buf, u64::MAX).map_or(Step::More, Step::Data);
                }
                Decode::ChunkData(left) => {
                    return self.counted(buf, left, Decode::ChunkEnd, Decode::ChunkData);
                }
                Decode::ChunkSize => match httparse::parse_chunk_size(buf) {
                    // The limit holds however the line arrived, in one read or in pieces.
                    Ok(httparse::Status::Complete((used, size))) if used <= MAX_CHUNK_LINE => {
                        let _ = buf.split_to(used);
                        *self = if size == 0 {
                            Decode::Trailers
                        } else {
                            Decode::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() < MAX_CHUNK_LINE => {
                        return Step::More;
                    }
                    _ => return Step::Invalid("invalid chunk size line from the backend"),
                },
                Decode::ChunkEnd => {
                    if buf.len() < 2 {
                        return Step::More;
                    }
                    if &buf[..2] != b"\r\n" {
                        return Step::Invalid("chunk data not followed by CRLF");
                    }
                    let _ = buf.split_to(2);
                    *self = Decode::ChunkSize;
                }
                Decode::Trailers => {
                    let end = if buf.starts_with(b"\r\n") {
                        Some(2)
                    } else {
                        buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
                    };
                    match end {
                        Some(end) if end <= MAX_TRAILERS => {
                            let _ = buf.split_to(end);
                            *self = Decode::Done;
                            return Step::End;
                        }
                        None if buf.len() < MAX_TRAILERS => return Step::More,
                        _ => return Step::Invalid("trailer section too large"),
                    }
                }
            }
        }
    }

    /// Takes up to `left` bytes of a counted stretch: the state becomes `after` once all have
    /// come, `rest(still left)` until then.
    fn counted(
        &mut self,
        buf: &mut BytesMut,
        left: u64,
        after: Decode,
        rest: fn(u64) -> Decode,
    ) -> Step {
        let Some(data) = take(buf, left) else {
            return Step::More;
        };
        let left = left - data.len() as u64;
        *self = if left == 0 { after } else { rest(left) };
        Step::Data(data)
    }
}

/// Up to `limit` bytes from the front of `buf`, `None` when it is empty.
fn take(buf: &mut BytesMut, limit: u64) -> Option<Bytes> {
    let n = usize::try_from(limit).unwrap_or(usize::MAX).min(buf.len());
    (n > 0).then(|| buf.split_to(n).freeze())
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
                Ok(0) => {
                    return this.fail(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the backend closed the connection mid-body",
                    ));
                }
                Ok(_) => {}
                Err(e) => return this.fail(e),
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `wire` to a decoder starting in `state`, cut at `cuts`, as reads would deliver it;
    /// returns the body, whether it ended, and what was left in the buffer.
    fn feed(
        state: Decode,
        wire: &[u8],
        cuts: &[usize],
    ) -> (Vec<u8>, Result<bool, &'static str>, Vec<u8>) {
        let mut decode = state;
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut edges: Vec<usize> = cuts.iter().copied().filter(|&c| c < wire.len()).collect();
        edges.sort_unstable();
        edges.push(wire.len());
        let mut from = 0;
        for to in edges {
            buf.extend_from_slice(&wire[from..to]);
            from = to;
            loop {
                match decode.step(&mut buf) {
                    Step::Data(data) => body.extend_from_slice(&data),
                    Step::End => {
                        // What the backend sent after the body, in later reads too.
                        buf.extend_from_slice(&wire[from..]);
                        return (body, Ok(true), buf.to_vec());
                    }
                    Step::More => break,
                    Step::Invalid(why) => return (body, Err(why), buf.to_vec()),
                }
            }
        }
        (body, Ok(false), buf.to_vec())
    }

    /// Deterministic pseudo-random cut points.
    fn cuts(seed: u64, len: usize, n: usize) -> Vec<usize> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 33) as usize % (len + 1)
            })
            .collect()
    }

    const CHUNKED: &[u8] =
        b"5;ext=\"a b\"\r\nhello\r\n7\r\n, world\r\n0\r\nx-trailer: 1\r\nx-other: 2\r\n\r\nNEXT";

    #[test]
    fn chunked_bodies_decode_the_same_however_the_reads_fall() {
        let expect = (b"hello, world".to_vec(), Ok(true), b"NEXT".to_vec());
        for cut in 0..=CHUNKED.len() {
            assert_eq!(
                feed(Decode::ChunkSize, CHUNKED, &[cut]),
                expect,
                "cut at {cut}"
            );
        }
        for seed in 0..500 {
            let cuts = cuts(seed, CHUNKED.len(), 1 + seed as usize % 8);
            assert_eq!(
                feed(Decode::ChunkSize, CHUNKED, &cuts),
                expect,
                "cuts {cuts:?}"
            );
        }
        let bare = b"3\r\nabc\r\n0\r\n\r\n";
        for cut in 0..=bare.len() {
            assert_eq!(
                feed(Decode::ChunkSize, bare, &[cut]),
                (b"abc".to_vec(), Ok(true), Vec::new()),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn length_bodies_stop_at_their_length() {
        let wire = b"0123456789NEXT";
        for seed in 0..100 {
            let cuts = cuts(seed, wire.len(), 3);
            let (body, ended, rest) = feed(Decode::Length(10), wire, &cuts);
            assert_eq!(body, b"0123456789", "cuts {cuts:?}");
            assert_eq!(ended, Ok(true));
            assert_eq!(rest, b"NEXT");
        }
        // Short of its length it waits for more.
        assert_eq!(feed(Decode::Length(10), b"01234", &[2]).1, Ok(false));
    }

    #[test]
    fn broken_chunked_framing_is_refused() {
        assert_eq!(
            feed(Decode::ChunkSize, b"zz\r\nabc\r\n0\r\n\r\n", &[]).1,
            Err("invalid chunk size line from the backend")
        );
        assert_eq!(
            feed(Decode::ChunkSize, b"3\r\nabcX\r\n0\r\n\r\n", &[]).1,
            Err("chunk data not followed by CRLF")
        );
        assert_eq!(
            feed(Decode::ChunkSize, &[b'1'; MAX_CHUNK_LINE + 1], &[]).1,
            Err("invalid chunk size line from the backend")
        );
        // Found by the response_body fuzz target: a line or trailer section over its limit
        // was accepted when it came in one read and refused when it came in pieces.
        let mut long_line = b"3;x=".to_vec();
        long_line.extend(std::iter::repeat_n(b'a', MAX_CHUNK_LINE));
        long_line.extend_from_slice(b"\r\nabc\r\n0\r\n\r\n");
        let mut long_trailers = b"0\r\nx: ".to_vec();
        long_trailers.extend(std::iter::repeat_n(b'a', MAX_TRAILERS));
        long_trailers.extend_from_slice(b"\r\n\r\n");
        for (wire, why) in [
            (&long_line, "invalid chunk size line from the backend"),
            (&long_trailers, "trailer section too large"),
        ] {
            for cuts in [vec![], vec![64], cuts(7, wire.len(), 5)] {
                assert_eq!(feed(Decode::ChunkSize, wire, &cuts).1, Err(why), "{cuts:?}");
            }
        }
        let mut endless = b"0\r\n".to_vec();
        endless.extend(std::iter::repeat_n(b'x', MAX_TRAILERS + 1));
        assert_eq!(
            feed(Decode::ChunkSize, &endless, &[]).1,
            Err("trailer section too large")
        );
    }
}
