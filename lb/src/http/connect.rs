//! Reaching a backend for one request, and the client's answer when that fails.
//!
//! [`connect_any`] picks a backend from the live pool and connects to it, a pooled keep-alive
//! connection first when the request allows ([`Reuse`]); a backend that cannot be connected to
//! is reported to its health state and skipped, so the request moves on to the next one, and
//! only with none left does the client get a 503. Once an exchange with the chosen backend
//! fails, [`failed`] turns the error into the client's 400, 502 or 504 and counts it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use hyper::StatusCode;
use tracing::{debug, warn};

use crate::backends::balance::{Backend, Lease};
use crate::backends::exchange::ExchangeError;
use crate::backends::upstream::{self, BackendConn};
use crate::http::context::{ClientConn, Outcome, local_response, no_backend};

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
