//! The HTTP/1.1 reverse proxy: one call of [`handle`] per client request.
//!
//! How it works: [`handle()`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use hyper::body::{Body as _, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use tracing::info;

use crate::backends::balance::Backend;
use crate::backends::exchange::{self, ExchangeError};
use crate::http::body::{ResponseBody, UpstreamBody};
use crate::http::connect::{Connected, Reuse, connect_any, failed};
use crate::http::context::{ClientConn, Outcome, local_response};
use crate::http::headers;
use crate::http::upgrade;

/// Serves one client request (hyper service function).
///
/// A request arrives from hyper's server side (`conn`), already framed: hyper has rejected
/// malformed heads (400), oversized heads (431) and ambiguous framing (differing duplicate
/// `Content-Length`, a `Transfer-Encoding` whose last coding is not chunked); with both
/// `Content-Length` and `Transfer-Encoding: chunked` it drops the length and reads chunks.
/// [`handle`] refuses over-long targets (414), sends WebSocket upgrades to `upgrade`, and
/// forwards everything else: rewrite the head (`headers`), pick a backend from the live pool,
/// borrow a pooled keep-alive connection or open one, run the exchange in this task
/// (`exchange`), and stream the response back (`body`). A backend that cannot be connected to
/// is reported to its health state and the request moves to another backend; nothing has been
/// sent to the client at that point, so a dead backend costs the client nothing. A bodiless
/// request whose pooled connection turns out to have been closed by the backend is sent again
/// on another connection. Only when no backend is left does the client get a 503; an invalid
/// answer gets 502, none within `timeouts.backend_response` 504. Each request ends with one log
/// line.
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
