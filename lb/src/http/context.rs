//! What every request handler shares: the engine, the client connection, and the outcome.
//!
//! `front::conn` builds one [`ClientConn`] per client connection from the [`Engine`] (the live
//! backend pool, counters, keep-alive pool, tunnel tracker) and hands it to `proxy::handle` for
//! each request. Every handler ends in an [`Outcome`]: a response for the client, made by a
//! backend or by the load balancer itself ([`local_response`]), and the backend for the log
//! line.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backends::balance::{Backend, Pool};
use crate::backends::upstream::Upstreams;
use crate::config::Config;
use crate::front::listener::ConnSlot;
use crate::http::body::ResponseBody;
use crate::metrics::Metrics;

/// What every connection shares: the live backend pool and the means to reach it.
#[derive(Debug)]
pub struct Engine {
    /// The current backend pool; replaced whole on reload.
    pub pool: Arc<ArcSwap<Pool>>,
    /// Global counters.
    pub metrics: Arc<Metrics>,
    /// Idle keep-alive connections to backends.
    pub upstreams: Arc<Upstreams>,
    /// Tunnels run here, so shutdown can wait for them.
    pub tracker: TaskTracker,
    /// Cancelled when the drain grace is over: tunnels close.
    pub kill: CancellationToken,
}

/// One client connection, shared by its requests and its tunnel (if it becomes one).
#[derive(Debug)]
pub struct ClientConn {
    /// The client's address.
    pub peer: SocketAddr,
    /// The configuration generation the connection was accepted under.
    pub config: Arc<Config>,
    /// Shared machinery.
    pub engine: Arc<Engine>,
    /// Counts against the connection limit until the connection and its tunnel are gone.
    pub slot: ConnSlot,
}

/// A response and the backend that produced it, if one did.
#[derive(Debug)]
pub struct Outcome {
    /// The response for the client.
    pub response: Response<ResponseBody>,
    /// The backend that answered (for the log line).
    pub backend: Option<Arc<Backend>>,
}

impl Outcome {
    /// A response made by the load balancer itself.
    pub fn local(response: Response<ResponseBody>) -> Self {
        Outcome {
            response,
            backend: None,
        }
    }

    /// A response that involved `backend`.
    pub fn backend(response: Response<ResponseBody>, backend: Arc<Backend>) -> Self {
        Outcome {
            response,
            backend: Some(backend),
        }
    }
}

/// A short plain-text response written by the load balancer.
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ResponseBody> {
    let mut response = Response::new(ResponseBody::text(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The answer when no backend can take a request.
pub fn no_backend() -> Response<ResponseBody> {
    local_response(
        StatusCode::SERVICE_UNAVAILABLE,
        "503 Service Unavailable: no backend is available\n",
    )
}
