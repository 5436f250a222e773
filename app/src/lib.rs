//! The scaleout chat server: serves the chat page and WebSocket, and shares every message
//! through Redis pub/sub (or an in-process broker when no Redis is configured).
//!
//! Data flow: a client joins a room (`rooms`; the default room is the configured channel
//! itself); its frame arrives in `ws`, is checked and stamped by `protocol`, and is published
//! by `broker` into the room's history (`stream`: a Redis Stream, or `ring` in-process), which
//! gives it its id (`position`); the `subscriber` (Redis, one subscription for every room with
//! local members) or the in-process broker hands every message of the room, serialised once,
//! to the room's `fanout`, which queues it for each local member; each connection task in `ws`
//! writes its queue to its socket. A client that reconnects with its last position in its room
//! gets what it missed from the history first (`history` decides whether the gap can be
//! filled). `health` reports whether the instance can serve, `page` serves the embedded page,
//! `shutdown` drains on SIGTERM.
//!
//! The binary (`main.rs`) parses the command line, loads [`config::Config`], binds the
//! listener and calls [`run`]; tests call [`run`] or [`router`] directly.

pub mod auth;
mod backoff;
mod broker;
mod cluster;
pub mod config;
mod connection;
mod fanout;
mod health;
mod history;
mod origin;
mod page;
pub mod position;
pub mod protocol;
mod rate_limit;
mod ring;
mod rooms;
pub mod shutdown;
mod stream;
mod subscriber;
mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::Broker;
pub use crate::broker::BrokerError;
use crate::config::Config;
use crate::rooms::Rooms;
pub use crate::ws::CLOSE_TOO_SLOW;

/// After the WebSockets are told to close, how long `run` waits for them and for in-flight
/// HTTP requests before returning anyway.
const FINISH_TIMEOUT: Duration = Duration::from_secs(3);

/// A failure that stops the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The broker could not be set up.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The listener handed in is unusable.
    #[error("the listener has no local address")]
    Listener(#[source] std::io::Error),
    /// The HTTP server stopped on its own.
    #[error("the HTTP server stopped unexpectedly")]
    Serve(#[source] std::io::Error),
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    config: Config,
    broker: Broker,
    /// Set on shutdown: `/healthz` 503, new WebSockets refused.
    draining: AtomicBool,
    /// Open WebSockets, against `max_connections`.
    connections: AtomicUsize,
    /// Cancelled after the grace: every connection closes with 1001.
    close_all: CancellationToken,
    /// Every connection task, so shutdown can wait for their close handshakes.
    tracker: TaskTracker,
}

impl AppState {
    /// State for `config`: the broker and its rooms (Redis connects lazily, in the
    /// background, once [`run`] starts). Must be called inside a Tokio runtime.
    pub fn new(config: Config) -> Result<AppState, Error> {
        let broker = Broker::new(&config)?;
        Ok(AppState(Arc::new(Shared {
            config,
            broker,
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            close_all: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })))
    }

    fn config(&self) -> &Config {
        &self.0.config
    }

    fn rooms(&self) -> &Arc<Rooms> {
        self.0.broker.rooms()
    }

    fn broker(&self) -> &Broker {
        &self.0.broker
    }

    fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    fn connections(&self) -> &AtomicUsize {
        &self.0.connections
    }

    fn close_all(&self) -> &CancellationToken {
        &self.0.close_all
    }

    fn tracker(&self) -> &TaskTracker {
        &self.0.tracker
    }
}

/// The HTTP routes: `/` (page), `/favicon.ico`, `/ws` (WebSocket), `/healthz`.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/favicon.ico", get(page::favicon))
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(health::healthz))
        .with_state(state)
}

/// Serves `config` on `listener` until `shutdown` is cancelled, then drains (see
/// [`shutdown`]) and returns. Redis being down is not an error: the instance reports 503 on
/// `/healthz` and keeps trying.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = listener.local_addr().map_err(Error::Listener)?;
    let grace = config.shutdown_grace;
    let state = AppState::new(config)?;
    let background = CancellationToken::new();
    state.broker().start(state.tracker(), background.clone());
    match &state.config().redis {
        Some(redis) => {
            tracing::info!(%local, redis = %redis.display, channel = %redis.channel, max_rooms = state.config().rooms.max_rooms, "chat server up, broker: Redis")
        }
        None => tracing::info!(%local, "chat server up, broker: in-process (single instance)"),
    }

    let stop_serving = CancellationToken::new();
    let listener = listener.tap_io(|socket| {
        if let Err(e) = socket.set_nodelay(true) {
            tracing::warn!(error = %e, "could not set TCP_NODELAY");
        }
    });
    let app = router(state.clone()).into_make_service_with_connect_info::<SocketAddr>();
    // The server runs as its own task so that it keeps answering (503 on /healthz, refusals
    // on /ws) while this one drains.
    let mut server = tokio::spawn(
        axum::serve(listener, app)
            .with_graceful_shutdown(stop_serving.clone().cancelled_owned())
            .into_future(),
    );

    tokio::select! {
        () = shutdown.cancelled() => {}
        result = &mut server => {
            background.cancel();
            let error = match result {
                Ok(Ok(())) => std::io::Error::other("the server returned"),
                Ok(Err(e)) => e,
                Err(e) => std::io::Error::other(e),
            };
            return Err(Error::Serve(error));
        }
    }

    shutdown::drain(&state, grace).await;
    stop_serving.cancel();
    background.cancel();
    state.tracker().close();
    let finished = async {
        state.tracker().wait().await;
        (&mut server).await
    };
    match tokio::time::timeout(FINISH_TIMEOUT, finished).await {
        Ok(Ok(Ok(()))) => tracing::info!("shut down"),
        Ok(Ok(Err(e))) => {
            tracing::warn!(error = %e, "HTTP server ended with an error while shutting down")
        }
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task failed while shutting down"),
        Err(_) => {
            server.abort();
            tracing::warn!(timeout = ?FINISH_TIMEOUT, "shut down with connections still closing");
        }
    }
    Ok(())
}
