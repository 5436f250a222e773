//! The neutral backend every proxy is measured against.
//!
//! One hyper HTTP/1.1 server: a request that asks for a WebSocket upgrade (any path) is answered
//! `101` and the upgraded connection echoes every text and binary message back; any other request
//! gets `200` with a 13-byte body (so it also serves the proxies' health checks). Keep-alive is on
//! and every accepted socket has TCP_NODELAY. Once bound it prints `listening http ADDR` on stdout.

use std::io::Write;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    CONNECTION, CONTENT_TYPE, HeaderValue, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::client::ws_config;

/// The body of every plain HTTP answer.
const BODY: &[u8] = b"Hello, world!";
/// Pause after a failed accept (EMFILE and friends) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves on `listen` until the process is stopped.
pub async fn run(listen: SocketAddr) -> anyhow::Result<()> {
    if let Err(e) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("backend: could not raise the open-file limit: {e}");
    }
    let listener = TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let local = listener.local_addr().context("reading the bound address")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening http {local}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")?;
    drop(stdout);
    serve(listener).await;
    Ok(())
}

/// Accepts forever; an accept error is reported and retried after a short pause.
pub async fn serve(listener: TcpListener) {
    loop {
        let (stream, _peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                eprintln!("backend: accept failed: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        // Best effort: a socket that refuses NODELAY still works, only slower.
        let _ = stream.set_nodelay(true);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|req| async move {
                Ok::<_, std::convert::Infallible>(answer(req))
            });
            // Connection errors (a client going away mid-request) end only that connection.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades()
                .await;
        });
    }
}

/// The response to one request: `101` and an echo task for a WebSocket upgrade, `200` otherwise.
fn answer(mut req: Request<Incoming>) -> Response<Full<Bytes>> {
    let wants_ws = req
        .headers()
        .get(UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let key = req
        .headers()
        .get(SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()));
    match (wants_ws, key) {
        (true, Some(accept)) => {
            let upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                if let Ok(upgraded) = upgrade.await {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(ws_config()),
                    )
                    .await;
                    echo(ws).await;
                }
            });
            let mut response = Response::new(Full::new(Bytes::new()));
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let headers = response.headers_mut();
            headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(accept) = HeaderValue::from_str(&accept) {
                headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
            }
            response
        }
        (true, None) => {
            let mut response =
                Response::new(Full::new(Bytes::from_static(b"missing Sec-WebSocket-Key")));
            *response.status_mut() = StatusCode::BAD_REQUEST;
            response
        }
        (false, _) => {
            let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            response
        }
    }
}

/// Sends every data message back until the peer closes or the connection fails.
async fn echo<S>(mut ws: WebSocketStream<S>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    while let Some(Ok(msg)) = ws.next().await {
        let reply = match msg {
            Message::Text(_) | Message::Binary(_) => msg,
            // Reading on after a Close lets tungstenite flush its Close reply; the stream then ends.
            Message::Close(_) | Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
        };
        if ws.send(reply).await.is_err() {
            break;
        }
    }
}
