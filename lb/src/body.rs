//! The HTTP bodies that flow through the proxy, each counting its bytes into the backend's
//! statistics as they pass.
//!
//! A client's request body travels to the backend as a [`RequestBody`]. The answer travels back
//! as a [`ResponseBody`]: either a short body the load balancer wrote itself (400, 503, a
//! redirect), or the backend's body wrapped in an [`UpstreamBody`], which also holds what the
//! exchange borrowed: the backend lease (least-connections counts it until the last byte) and
//! the pooled backend connection, handed back to the pool for the next request once the body
//! has been read to its end, and closed instead if the client went away midway.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::balance::{Backend, Lease};
use crate::upstream::Upstreams;

/// Adds the length of `frame`'s data, when it carries data, to `counter`.
fn count_data(frame: &Option<Result<Frame<Bytes>, hyper::Error>>, counter: &AtomicU64) {
    if let Some(Ok(f)) = frame
        && let Some(data) = f.data_ref()
    {
        counter.fetch_add(data.len() as u64, Relaxed);
    }
}

/// A client's request body on its way to `backend`; `None` for a request without a body.
#[derive(Debug)]
pub struct RequestBody {
    inner: Option<Incoming>,
    backend: Arc<Backend>,
}

impl RequestBody {
    /// Counts `inner`'s bytes as sent to `backend`.
    pub fn new(inner: Option<Incoming>, backend: Arc<Backend>) -> Self {
        RequestBody { inner, backend }
    }

    /// The body, to send it elsewhere after a failed attempt.
    pub fn into_inner(self) -> Option<Incoming> {
        self.inner
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = ready!(Pin::new(inner).poll_frame(cx));
        count_data(&frame, &self.backend.stats().bytes_to_backend);
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Incoming::size_hint)
    }
}

/// A pooled backend connection lent to one request.
pub type PooledSender = hyper::client::conn::http1::SendRequest<RequestBody>;

/// A backend's response body on its way to the client.
#[derive(Debug)]
pub struct UpstreamBody {
    inner: Incoming,
    lease: Lease,
    /// The connection the response came on and where to return it.
    conn: Option<(PooledSender, Arc<Upstreams>)>,
    /// The inner body reported its end.
    finished: bool,
}

impl UpstreamBody {
    /// Wraps `inner`, received over `conn` while holding `lease`.
    pub fn new(inner: Incoming, lease: Lease, conn: PooledSender, pool: Arc<Upstreams>) -> Self {
        UpstreamBody {
            inner,
            lease,
            conn: Some((conn, pool)),
            finished: false,
        }
    }

    /// Wraps `inner`, received over a connection that is not pooled (an upgrade attempt).
    pub fn unpooled(inner: Incoming, lease: Lease) -> Self {
        UpstreamBody {
            inner,
            lease,
            conn: None,
            finished: false,
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        let stats = self.lease.backend().stats();
        count_data(&frame, &stats.bytes_to_client);
        match &frame {
            None => self.finished = true,
            Some(Ok(_)) => {}
            Some(Err(_)) => {
                stats.errors.fetch_add(1, Relaxed);
                // A broken response leaves the connection unusable.
                self.conn = None;
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if let Some((conn, pool)) = self.conn.take() {
            if self.finished || self.inner.is_end_stream() {
                pool.put(self.lease.backend().addr(), conn);
            }
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
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
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
