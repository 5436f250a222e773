//! The HTTP/1.1 reverse proxy: one call of [`handle`] per client request.
//!
//! A request arrives from hyper's server side (`conn`), already framed: hyper has rejected
//! malformed heads (400), oversized heads (431) and ambiguous framing (differing duplicate
//! `Content-Length`, a `Transfer-Encoding` whose last coding is not chunked); with both
//! `Content-Length` and `Transfer-Encoding: chunked` it drops the length and reads chunks.
//! [`handle`] refuses over-long targets (414), sends WebSocket upgrades to `upgrade`, and
//! forwards everything else: rewrite the head (`headers`), pick a backend from the live pool,
//! borrow a pooled keep-alive connection or open one, run the exchange in this task
//! (`exchange`), and stream the response back (`body`). A backend that cannot be connected to
//! is reported to its health state and the request moves to another backend; nothing has been
//! sent to the client at that point, so a dead backend costs the client nothing. A bodiless
//! request whose pooled connection turns out to have been closed by the backend is sent again
//! on another connection. Only when no backend is left does the client get a 503; an invalid
//! answer gets 502, none within `timeouts.backend_response` 504. Each request ends with one log
//! line.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backends::balance::{Backend, Lease, Pool};
use crate::backends::exchange::{self, ExchangeError};
use crate::backends::upstream::{self, BackendConn, Upstreams};
use crate::config::Config;
use crate::front::listener::ConnSlot;
use crate::http::body::{ResponseBody, UpstreamBody};
use crate::http::headers;
use crate::http::upgrade;
use crate::ops::metrics::Metrics;

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

/// Serves one client request (hyper service function).
pub async fn handle(
    conn: Arc<ClientConn>,
    req: Request<Incoming>,
) -> Result<Response<ResponseBody>, Infallible> {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let metrics = &conn.engine.metrics;
    metrics.requests_total.fetch_add(1, Relaxed);

    let target_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len());
    let outcome = if method == Method::CONNECT {
        // A reverse proxy does not open tunnels to arbitrary hosts.
        Outcome::local(local_response(
            StatusCode::METHOD_NOT_ALLOWED,
            "405 Method Not Allowed\n",
        ))
    } else if target_len > conn.config.limits.max_uri_bytes {
        Outcome::local(local_response(
            StatusCode::URI_TOO_LONG,
            "414 URI Too Long\n",
        ))
    } else if upgrade::is_websocket(&req) {
        upgrade::handle(&conn, req).await
    } else {
        forward(&conn, req).await
    };

    let status = outcome.response.status();
    metrics.record_response(status.as_u16());
    info!(
        peer = %conn.peer,
        method = %method,
        uri = %uri,
        status = status.as_u16(),
        backend = outcome.backend.as_deref().map_or("-", Backend::name),
        duration_ms = started.elapsed().as_millis() as u64,
        "request"
    );
    Ok(outcome.response)
}

/// Forwards a plain HTTP request (see the module docs).
async fn forward(conn: &Arc<ClientConn>, req: Request<Incoming>) -> Outcome {
    let (mut head, body) = req.into_parts();
    if let Err(e) = headers::prepare_request(&mut head, conn.peer.ip().to_canonical(), false) {
        return Outcome::local(local_response(StatusCode::BAD_REQUEST, e.message()));
    }
    let mut body = (!body.is_end_stream()).then_some(body);
    let engine = &conn.engine;
    let mut exclude: Vec<SocketAddr> = Vec::new();

    loop {
        let found = match connect_any(conn, &mut exclude, Reuse::Pooled).await {
            Ok(found) => found,
            Err(outcome) => return outcome,
        };
        let Connected {
            backend,
            lease,
            mut upstream,
            reused,
        } = found;
        // A bodiless idempotent request sent over a reused connection can be sent again if
        // that connection turns out to have been closed by the backend meanwhile (RFC 9110
        // §9.2.2: the backend may have acted on a POST before closing).
        let replayable = reused && body.is_none() && head.method.is_idempotent();
        let stats = backend.stats();
        stats.requests.fetch_add(1, Relaxed);
        let step = conn.config.timeouts.backend_response;
        let error = match exchange::round_trip(
            &mut upstream,
            &head,
            body.take(),
            &stats.bytes_to_backend,
            step,
        )
        .await
        {
            Ok(answer) if answer.status != StatusCode::SWITCHING_PROTOCOLS => {
                let mut response = Response::new(ResponseBody::Upstream(UpstreamBody::new(
                    upstream,
                    answer.framing,
                    lease,
                    answer.keep_alive.then(|| Arc::clone(&engine.upstreams)),
                )));
                *response.status_mut() = answer.status;
                *response.headers_mut() = answer.headers;
                headers::prepare_response(response.headers_mut(), false);
                return Outcome::backend(response, backend);
            }
            Ok(_) => ExchangeError::BadResponse("101 to a request that asked for no upgrade"),
            Err(ExchangeError::Closed(_)) if replayable => continue,
            Err(e) => e,
        };
        return failed(conn, backend, error);
    }
}

/// Whether a request may use a pooled keep-alive connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// A pooled connection when one is usable, else a new one.
    Pooled,
    /// Always a new connection (an upgrade: it becomes a tunnel).
    Fresh,
}

/// A backend chosen and connected for one request.
#[derive(Debug)]
pub struct Connected {
    /// The backend.
    pub backend: Arc<Backend>,
    /// Its least-connections count for this request.
    pub lease: Lease,
    /// The connection.
    pub upstream: BackendConn,
    /// It came from the keep-alive pool.
    pub reused: bool,
}

/// Picks a backend (skipping `exclude`) and connects to it; a backend that cannot be connected
/// to is reported to its health state, added to `exclude`, and the next one is tried. With no
/// backend left the error is the client's 503.
pub async fn connect_any(
    conn: &ClientConn,
    exclude: &mut Vec<SocketAddr>,
    reuse: Reuse,
) -> Result<Connected, Outcome> {
    let engine = &conn.engine;
    let timeouts = conn.config.timeouts;
    let pool = engine.pool.load_full();
    loop {
        let Some(backend) = pool.pick(exclude) else {
            return Err(Outcome::local(no_backend()));
        };
        let lease = backend.lease();
        let addr = backend.addr();
        let pooled = match reuse {
            Reuse::Pooled => engine.upstreams.take(addr, timeouts.backend_idle),
            Reuse::Fresh => None,
        };
        let reused = pooled.is_some();
        let upstream = match pooled {
            Some(upstream) => upstream,
            None => match upstream::open(addr, timeouts.backend_connect).await {
                Ok(upstream) => upstream,
                Err(e) => {
                    warn!(peer = %conn.peer, backend = backend.name(), error = %e,
                          "backend connect failed; trying another backend");
                    backend.report_connect_failure();
                    exclude.push(addr);
                    continue;
                }
            },
        };
        return Ok(Connected {
            backend,
            lease,
            upstream,
            reused,
        });
    }
}

/// The client's answer when an exchange with `backend` failed, logged: 400 when the client's
/// own body broke off, 504 when the backend did not answer in time, 502 otherwise (both of
/// those counted as backend errors).
pub fn failed(conn: &ClientConn, backend: Arc<Backend>, error: ExchangeError) -> Outcome {
    let (status, text) = match &error {
        ExchangeError::ClientBody(e) => {
            debug!(peer = %conn.peer, backend = backend.name(), error = %e,
                   "client request body ended early");
            return Outcome::backend(
                local_response(
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: incomplete body\n",
                ),
                backend,
            );
        }
        ExchangeError::Timeout => (StatusCode::GATEWAY_TIMEOUT, "504 Gateway Timeout\n"),
        _ => (StatusCode::BAD_GATEWAY, "502 Bad Gateway\n"),
    };
    backend.stats().errors.fetch_add(1, Relaxed);
    warn!(peer = %conn.peer, backend = backend.name(), error = %error,
          status = status.as_u16(), "backend failed the request");
    Outcome::backend(local_response(status, text), backend)
}
