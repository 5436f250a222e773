//! Graceful shutdown: from SIGTERM/SIGINT to an exited process without cutting anyone off
//! mid-message.
//!
//! [`signal`] resolves on the first SIGTERM or SIGINT; the binary turns that into cancelling
//! the root token handed to [`crate::run`]. `run` then calls [`drain`]: `/healthz` turns 503
//! and new WebSockets are refused at once, the load balancer has `shutdown_grace` to notice,
//! then every open WebSocket is closed with 1001 (the page reconnects, to another instance).

use std::time::Duration;

use crate::state::AppState;

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM (systemd, container runtimes, `kill`).
    Term,
    /// SIGINT (Ctrl-C).
    Interrupt,
}

/// Waits for SIGTERM or SIGINT. Fails only if the handlers cannot be installed.
pub async fn signal() -> std::io::Result<Signal> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => Signal::Term,
        _ = interrupt.recv() => Signal::Interrupt,
    })
}

/// Turns the instance unhealthy and refusing, waits `grace`, then closes every WebSocket.
pub(crate) async fn drain(state: &AppState, grace: Duration) {
    state.start_draining();
    tracing::info!(
        grace = ?grace,
        clients = state.connections().load(std::sync::atomic::Ordering::Acquire),
        "draining: /healthz is 503 and new WebSockets are refused"
    );
    tokio::time::sleep(grace).await;
    tracing::info!(
        clients = state
            .connections()
            .load(std::sync::atomic::Ordering::Acquire),
        "closing open WebSockets with 1001"
    );
    state.close_all().cancel();
}
