//! WebSocket upgrades: check the handshake, forward it, and turn the connection into a tunnel.
//!
//! A request with `Upgrade: websocket` is checked here first ([`validate`]): GET, HTTP/1.1,
//! `Connection: upgrade`, `Sec-WebSocket-Version: 13` and a `Sec-WebSocket-Key` that is 16
//! bytes in base64. A request failing any of these gets 400 from the load balancer and never
//! reaches a backend. A valid one is sent over a fresh backend connection (upgraded connections
//! are never pooled; a failed connect moves on to another backend, as for plain requests). If
//! the backend answers `101`, that answer goes to the client and a tracked task waits for the
//! client's side to finish switching protocols, then splices it with the backend socket
//! (`splice`), bytes the backend sent right after its `101` first, until either side closes,
//! the tunnel idles out, or shutdown's drain grace runs out; any other answer (a 403 from an
//! origin check, say) is passed to the client as a normal response.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use base64::Engine as _;
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::upgrade::{OnUpgrade, Upgraded};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::{debug, info};

use crate::backends::balance::{Backend, Lease};
use crate::backends::exchange;
use crate::front::tls_stream::TlsStream;
use crate::http::body::{ResponseBody, UpstreamBody};
use crate::http::connect::{Connected, Reuse, connect_any, failed};
use crate::http::context::{ClientConn, Outcome, local_response};
use crate::http::headers;
use crate::tunnel::splice::splice;

/// `Sec-WebSocket-Key`.
const SEC_WEBSOCKET_KEY: &str = "sec-websocket-key";
/// `Sec-WebSocket-Version`.
const SEC_WEBSOCKET_VERSION: &str = "sec-websocket-version";

/// Whether the request asks for a WebSocket upgrade (`Upgrade: websocket`). Other upgrade
/// protocols are not supported and are forwarded as plain requests, upgrade headers removed.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    exchange::list_has(req.headers(), &header::UPGRADE, "websocket")
}

/// Checks a WebSocket opening handshake (RFC 6455 §4.2.1); the error says what is wrong.
pub fn validate<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.method() != Method::GET {
        return Err("a WebSocket handshake must be a GET request");
    }
    if req.version() != Version::HTTP_11 {
        return Err("a WebSocket handshake must use HTTP/1.1");
    }
    if !exchange::connection_has(req.headers(), "upgrade") {
        return Err("a WebSocket handshake needs \"Connection: Upgrade\"");
    }
    let mut versions = req.headers().get_all(SEC_WEBSOCKET_VERSION).iter();
    match (versions.next(), versions.next()) {
        (Some(v), None) if v.as_bytes().trim_ascii() == b"13" => {}
        _ => return Err("unsupported or missing Sec-WebSocket-Version (only 13 is supported)"),
    }
    let mut keys = req.headers().get_all(SEC_WEBSOCKET_KEY).iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.as_bytes().trim_ascii(),
        _ => return Err("missing or repeated Sec-WebSocket-Key"),
    };
    match base64::engine::general_purpose::STANDARD.decode(key) {
        Ok(nonce) if nonce.len() == 16 => Ok(()),
        _ => Err("Sec-WebSocket-Key must be 16 bytes in base64"),
    }
}

/// Handles a WebSocket upgrade request end to end.
pub async fn handle(conn: &Arc<ClientConn>, mut req: Request<Incoming>) -> Outcome {
    if let Err(reason) = validate(&req) {
        let mut response = local_response(StatusCode::BAD_REQUEST, reason);
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return Outcome::local(response);
    }
    let client_upgrade = hyper::upgrade::on(&mut req);
    let (mut head, _empty) = req.into_parts();
    if let Err(e) = headers::prepare_request(&mut head, conn.peer.ip().to_canonical(), true) {
        return Outcome::local(local_response(StatusCode::BAD_REQUEST, e.message()));
    }

    let engine = &conn.engine;
    let Connected {
        backend,
        lease,
        mut upstream,
        ..
    } = match connect_any(conn, &mut Vec::new(), Reuse::Fresh).await {
        Ok(found) => found,
        Err(outcome) => return outcome,
    };
    let stats = backend.stats();
    stats.requests.fetch_add(1, Relaxed);
    let step = conn.config.timeouts.backend_response;
    let answer =
        match exchange::round_trip(&mut upstream, &head, None, &stats.bytes_to_backend, step).await
        {
            Ok(answer) => answer,
            Err(e) => return failed(conn, backend, e),
        };

    let switching = answer.status == StatusCode::SWITCHING_PROTOCOLS;
    let mut headers = answer.headers;
    headers::prepare_response(&mut headers, switching);
    if !switching {
        // Not pooled: this connection was opened for an upgrade.
        let body = UpstreamBody::new(upstream, answer.framing, lease, None);
        let mut response = Response::new(ResponseBody::Upstream(body));
        *response.status_mut() = answer.status;
        *response.headers_mut() = headers;
        return Outcome::backend(response, backend);
    }

    // Bytes the backend sent right after its 101 belong to the tunnel.
    let backend_early = upstream.buf.split().freeze();
    let tunnel_conn = Arc::clone(conn);
    let tunnel_backend = Arc::clone(&backend);
    engine.tracker.spawn(async move {
        tunnel(
            tunnel_conn,
            tunnel_backend,
            lease,
            client_upgrade,
            upstream.stream,
            backend_early,
        )
        .await;
    });
    let mut response = Response::new(ResponseBody::empty());
    *response.status_mut() = answer.status;
    *response.headers_mut() = headers;
    Outcome::backend(response, backend)
}

/// Waits for the client's side to switch protocols, then splices it with the backend until
/// the tunnel ends.
async fn tunnel(
    conn: Arc<ClientConn>,
    backend: Arc<Backend>,
    lease: Lease,
    client: OnUpgrade,
    mut upstream: TcpStream,
    backend_early: Bytes,
) {
    let client = match client.await {
        Ok(client) => client,
        Err(e) => {
            debug!(peer = %conn.peer, backend = backend.name(), error = %e, "upgrade did not complete");
            return;
        }
    };
    let metrics = &conn.engine.metrics;
    let stats = backend.stats();
    metrics.tunnels_active.fetch_add(1, Relaxed);
    metrics.tunnels_total.fetch_add(1, Relaxed);
    stats.tunnels_active.fetch_add(1, Relaxed);
    stats.tunnels_total.fetch_add(1, Relaxed);
    let started = Instant::now();

    let (mut client, client_early) = unwrap_io::<TlsStream>(client);
    // Lent, not moved: a stream moved into the splice future would also keep its place in this
    // one, and an idle tunnel would carry the TLS connection's state twice.
    let report = splice(
        &mut client,
        client_early,
        &mut upstream,
        backend_early,
        conn.config.timeouts.tunnel_idle,
        &conn.engine.kill,
        |up, down| {
            stats.bytes_to_backend.fetch_add(up, Relaxed);
            stats.bytes_to_client.fetch_add(down, Relaxed);
        },
    )
    .await;

    metrics.tunnels_active.fetch_sub(1, Relaxed);
    stats.tunnels_active.fetch_sub(1, Relaxed);
    if matches!(report.end, crate::tunnel::splice::SpliceEnd::BackendError) {
        stats.errors.fetch_add(1, Relaxed);
    }
    info!(
        peer = %conn.peer,
        backend = backend.name(),
        duration_ms = started.elapsed().as_millis() as u64,
        to_backend = report.to_backend,
        to_client = report.to_client,
        end = report.end.as_str(),
        error = report.error.as_deref().unwrap_or("-"),
        "tunnel"
    );
    drop(lease);
}

/// The connection under an upgrade, unwrapped to the concrete stream `T` when it is one (no
/// extra indirection on the hot path), with the bytes read ahead of the switch.
fn unwrap_io<T>(upgraded: Upgraded) -> (Io<T>, Bytes)
where
    T: AsyncRead + AsyncWrite + Unpin + 'static,
{
    match upgraded.downcast::<TokioIo<T>>() {
        Ok(parts) => (Io::Direct(parts.io.into_inner()), parts.read_buf),
        Err(upgraded) => (Io::Upgraded(TokioIo::new(upgraded)), Bytes::new()),
    }
}

/// A tunnel endpoint: the concrete stream, or hyper's type-erased one as a fallback.
enum Io<T> {
    Direct(T),
    Upgraded(TokioIo<Upgraded>),
}

impl<T: AsyncRead + Unpin> AsyncRead for Io<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Direct(io) => std::pin::Pin::new(io).poll_read(cx, buf),
            Io::Upgraded(io) => std::pin::Pin::new(io).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Io<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Direct(io) => std::pin::Pin::new(io).poll_write(cx, buf),
            Io::Upgraded(io) => std::pin::Pin::new(io).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Direct(io) => std::pin::Pin::new(io).poll_flush(cx),
            Io::Upgraded(io) => std::pin::Pin::new(io).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Direct(io) => std::pin::Pin::new(io).poll_shutdown(cx),
            Io::Upgraded(io) => std::pin::Pin::new(io).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(
        edit: impl FnOnce(hyper::http::request::Builder) -> hyper::http::request::Builder,
    ) -> Request<()> {
        edit(
            Request::builder()
                .uri("/ws")
                .header("host", "h")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-version", "13")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        )
        .body(())
        .unwrap()
    }

    #[test]
    fn accepts_a_valid_handshake() {
        let req = handshake(|b| b);
        assert!(is_websocket(&req));
        assert_eq!(validate(&req), Ok(()));
    }

    #[test]
    fn rejects_each_malformed_part() {
        let bad: Vec<Request<()>> = vec![
            handshake(|b| b.method("POST")),
            handshake(|b| b.version(Version::HTTP_10)),
            {
                let mut r = handshake(|b| b);
                r.headers_mut().remove("connection");
                r
            },
            {
                let mut r = handshake(|b| b);
                r.headers_mut()
                    .insert("sec-websocket-version", HeaderValue::from_static("8"));
                r
            },
            {
                let mut r = handshake(|b| b);
                r.headers_mut().remove("sec-websocket-version");
                r
            },
            {
                let mut r = handshake(|b| b);
                r.headers_mut().remove("sec-websocket-key");
                r
            },
            {
                let mut r = handshake(|b| b);
                // 15 bytes.
                r.headers_mut().insert(
                    "sec-websocket-key",
                    HeaderValue::from_static("AAAAAAAAAAAAAAAAAAAA"),
                );
                r
            },
            {
                let mut r = handshake(|b| b);
                r.headers_mut().insert(
                    "sec-websocket-key",
                    HeaderValue::from_static("not base64!!"),
                );
                r
            },
            handshake(|b| b.header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")),
        ];
        for (i, req) in bad.iter().enumerate() {
            assert!(validate(req).is_err(), "case {i} accepted");
        }
    }

    #[test]
    fn other_upgrades_are_not_websocket() {
        let mut r = handshake(|b| b);
        r.headers_mut()
            .insert("upgrade", HeaderValue::from_static("h2c"));
        assert!(!is_websocket(&r));
    }
}
