//! The scaleout chat server: serves the chat page and WebSocket, and shares every message
//! through Redis pub/sub (or in process when no Redis is configured).
//!
//! `ws` admits a client into its room in the `hub` and runs its connection; a frame is checked
//! by `protocol` and published through the room's store into its `history`; the in-process ring,
//! or with Redis the `redis` subscriber, hands it to the room's inlet, which queues it for every
//! local member (ARCHITECTURE.md, "The message path"). `config` turns `app.toml` and the flags
//! into [`config::Config`]; `presence` counts each room's members on every instance and tells
//! those who ask; `api` is the server API on its own listener (posting through the room's store
//! like a client); `health`, `page` and `shutdown` serve the rest; `main.rs` calls [`run`].
//!
//! `issuer` is the demo token issuer of `app demo-issuer`, apart from the server.
//!
//! Dependencies point one way, each module using only those after it: `lib` → `health`, `page`,
//! `shutdown`, `issuer`, `api` → `ws` → `state` → `users`, `presence` → `hub` → `config` →
//! `redis` → `history` → `protocol` → `position`, `origin`, `auth`. The subscriber reaches the hub's rooms only through its own traits
//! (`redis::subscriber::Channels`, `Channel`) and `history::Outlet`, which the rooms implement.

pub mod api;
pub mod auth;
pub mod config;
mod health;
mod history;
mod hub;
pub mod issuer;
mod origin;
mod page;
pub mod position;
mod presence;
pub mod protocol;
mod redis;
pub mod shutdown;
mod state;
pub mod users;
mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use axum::serve::ListenerExt;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::keys::{ApiKeys, KeysError};
use crate::config::Config;
pub use crate::redis::LinkError;
pub use crate::state::{AppState, StartError};
pub use crate::ws::close::{CLOSE_DISCONNECTED, CLOSE_TOO_SLOW, CLOSE_USER_LIMIT};

/// After the WebSockets are told to close, how long `run` waits for them and for in-flight
/// HTTP requests before returning anyway.
const FINISH_TIMEOUT: Duration = Duration::from_secs(3);

/// A failure that stops the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The instance could not be set up (Redis, token keys).
    #[error(transparent)]
    Start(#[from] StartError),
    /// The listener handed in is unusable.
    #[error("the listener has no local address")]
    Listener(#[source] std::io::Error),
    /// The HTTP server stopped on its own.
    #[error("the HTTP server stopped unexpectedly")]
    Serve(#[source] std::io::Error),
    /// The API's keys file is unusable.
    #[error("api_keys_file: {0}")]
    ApiKeys(#[from] KeysError),
    /// The API's listener could not be bound or served.
    #[error("the API listener failed")]
    Api(#[source] std::io::Error),
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

/// Reloads the token keys on every SIGHUP until `stop` (token mode only): the old keys stay
/// when the new files are unusable, and the log says which file and why.
fn reload_keys_on_sighup(state: &AppState, stop: CancellationToken) {
    if state.config().auth == config::AuthConfig::Anonymous {
        return;
    }
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: token keys reload only on restart");
            return;
        }
    };
    let state = state.clone();
    let tracker = state.tracker().clone();
    tracker.spawn(async move {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                hangup = hangups.recv() => if hangup.is_none() { return },
            }
            match state.reload_keys() {
                Ok(()) => tracing::info!("token keys reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "token keys not reloaded; the previous keys stay")
                }
            }
        }
    });
}

/// Serves `config` on `listener` until `shutdown` is cancelled, then drains (see
/// [`shutdown`]) and returns. Redis being down is not an error: the instance reports 503 on
/// `/healthz` and keeps trying.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    run_with(config, listener, None, shutdown).await
}

/// [`run`], with the server API on `api_listener` (bound by the caller), or on `api_listen`
/// bound here when none is given and the config has the API on.
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    api_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let local = listener.local_addr().map_err(Error::Listener)?;
    let grace = config.shutdown_grace;
    let api = match &config.api {
        None => None,
        Some(api) => {
            let keys = ApiKeys::load(&api.keys_file)?;
            let listener = match api_listener {
                Some(listener) => listener,
                None => TcpListener::bind(api.listen).await.map_err(Error::Api)?,
            };
            Some((keys, listener))
        }
    };
    let state = AppState::new(config)?;
    let background = CancellationToken::new();
    state.hub().start(state.tracker(), background.clone());
    state.users().start(state.tracker(), background.clone());
    reload_keys_on_sighup(&state, background.clone());
    state.presence().start(state.tracker(), background.clone());
    match &state.config().redis {
        Some(redis) => {
            tracing::info!(%local, redis = %redis.display, channel = %redis.channel, max_rooms = state.config().rooms.max_rooms, "chat server up, broker: Redis")
        }
        None => tracing::info!(%local, "chat server up, broker: in-process (single instance)"),
    }

    let stop_serving = CancellationToken::new();
    if let Some((keys, listener)) = api {
        let api = api::Api {
            app: state.clone(),
            keys,
            metrics: api::metrics::ApiMetrics::new(),
        };
        let addr = listener.local_addr().map_err(Error::Api)?;
        tracing::info!(%addr, "server API up");
        let stop = stop_serving.clone();
        state.tracker().spawn(async move {
            if let Err(e) = api::serve(api, listener, stop).await {
                tracing::error!(error = %e, "the server API stopped");
            }
        });
    }
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
