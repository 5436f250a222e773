//! A WebSocket server on 127.0.0.1 for the load tools' own tests: every connection it accepts
//! is handed, once its handshake is done, to the test's handler.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;

/// Listens on an ephemeral port and runs `each` on every accepted WebSocket, each in a task of
/// its own; returns the address.
pub async fn ws_server<F, Fut>(each: F) -> SocketAddr
where
    F: Fn(WebSocketStream<TcpStream>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let each = Arc::new(each);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let each = Arc::clone(&each);
            tokio::spawn(async move {
                if let Ok(ws) = tokio_tungstenite::accept_async(stream).await {
                    each(ws).await;
                }
            });
        }
    });
    addr
}
