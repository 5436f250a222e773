//! One client connection on the https listener: TLS handshake, then HTTP/1.1 until the client
//! leaves, the connection upgrades to a tunnel, or shutdown.
//!
//! The socket comes from the accept loop with its [`ConnSlot`]. The handshake runs under
//! `timeouts.tls_handshake` with the TLS configuration current at that moment; bytes that are
//! not a TLS ClientHello fail it and close just this connection. hyper then serves requests
//! through `proxy::handle` with the limits of the configuration generation current at accept:
//! head size (431), header read timeout. When the header timeout strikes with part of a request
//! already received, the client gets a `408 Request Timeout` before the close (hyper itself
//! would only close); an idle keep-alive connection is closed silently. On shutdown the
//! connection finishes its current request and closes (after a binary upgrade, also its
//! handshake and first request); after the drain grace it is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use crate::acme::challenge::ACME_TLS_ALPN;
use crate::config::{Config, MIN_MAX_HEADER_BYTES};
use crate::front::listener::ConnSlot;
use crate::front::state::State;
use crate::front::tls_stream;
use crate::http::context::ClientConn;
use crate::http::proxy;

/// The answer to a client that was too slow sending its request head.
const REQUEST_TIMEOUT: &[u8] = b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 20\r\n\r\n408 Request Timeout\n";

/// How long writing the 408 may take.
const REQUEST_TIMEOUT_WRITE: Duration = Duration::from_secs(1);

/// hyper's HTTP/1.1 server with the client-side limits of `config`: the header read timeout
/// and the head size. The https and redirect listeners both use it.
pub fn http1_server(config: &Config) -> hyper::server::conn::http1::Builder {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(config.timeouts.client_header)
        .max_buf_size(config.limits.max_header_bytes.max(MIN_MAX_HEADER_BYTES))
        .max_header_size(config.limits.max_header_bytes);
    builder
}

/// Serves one accepted https connection to its end.
pub async fn serve(state: Arc<State>, stream: TcpStream, peer: SocketAddr, slot: ConnSlot) {
    let config = state.config.load_full();
    let engine = Arc::clone(&state.engine);
    let handshake = tokio::time::timeout(
        config.timeouts.tls_handshake,
        tls_stream::accept(state.tls.load_full(), stream),
    );
    let tls = tokio::select! {
        result = handshake => match result {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                engine.metrics.tls_handshake_failures.fetch_add(1, Relaxed);
                debug!(peer = %peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                engine.metrics.tls_handshake_failures.fetch_add(1, Relaxed);
                debug!(peer = %peer, "TLS handshake timed out");
                return;
            }
        },
        () = state.handshake_cut() => return,
    };

    if tls.alpn_protocol() == Some(ACME_TLS_ALPN) {
        // A CA's tls-alpn-01 validation: the handshake was the whole exchange (RFC 8737, 3).
        debug!(peer = %peer, "tls-alpn-01 validation handshake answered");
        let mut tls = tls;
        let _ = tokio::time::timeout(REQUEST_TIMEOUT_WRITE, tls.shutdown()).await;
        return;
    }
    let server = http1_server(&config);
    let client = Arc::new(ClientConn {
        peer,
        config,
        engine,
        slot,
    });
    let requested = Arc::new(Notify::new());
    let seen = Arc::clone(&requested);
    let service = service_fn(move |req| {
        seen.notify_one();
        proxy::handle(Arc::clone(&client), req)
    });
    let mut connection = server
        .serve_connection(TokioIo::new(tls), service)
        .with_upgrades();

    let Some(result) = state
        .serve_until_drained(&mut connection, requested.notified(), |c| {
            c.graceful_shutdown()
        })
        .await
    else {
        return;
    };
    let Err(e) = result else { return };
    if e.is_timeout() {
        if let Some(parts) = connection.into_parts()
            && !parts.read_buf.is_empty()
        {
            debug!(peer = %peer, "request head not received in time; answering 408");
            let mut tls = parts.io.into_inner();
            let _ = tokio::time::timeout(REQUEST_TIMEOUT_WRITE, async {
                tls.write_all(REQUEST_TIMEOUT).await?;
                tls.shutdown().await
            })
            .await;
        }
    } else {
        debug!(peer = %peer, error = %e, "client connection ended with an error");
    }
}
