//! What every request handler shares ([`AppState`]): the configuration, the hub, presence, and the
//! instance's own state (draining, open connections, the shutdown token, the connection tasks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::hub::rooms::Rooms;
use crate::presence::Presence;
use crate::redis::LinkError;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    config: Config,
    hub: Hub,
    /// Who is in each room, on every instance.
    presence: Presence,
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
    /// State for `config`: the hub and its rooms (Redis connects lazily, in the background,
    /// once [`crate::run`] starts). Must be called inside a Tokio runtime.
    pub fn new(config: Config) -> Result<AppState, LinkError> {
        let hub = Hub::new(&config)?;
        let presence = Presence::new(
            config.presence,
            hub.redis().cloned(),
            hub.rooms().default_room().channel(),
        );
        Ok(AppState(Arc::new(Shared {
            config,
            hub,
            presence,
            draining: AtomicBool::new(false),
            connections: AtomicUsize::new(0),
            close_all: CancellationToken::new(),
            tracker: TaskTracker::new(),
        })))
    }

    pub(crate) fn config(&self) -> &Config {
        &self.0.config
    }

    pub(crate) fn rooms(&self) -> &Arc<Rooms> {
        self.0.hub.rooms()
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.0.hub
    }

    pub(crate) fn presence(&self) -> &Presence {
        &self.0.presence
    }

    pub(crate) fn is_draining(&self) -> bool {
        self.0.draining.load(Ordering::Acquire)
    }

    pub(crate) fn start_draining(&self) {
        self.0.draining.store(true, Ordering::Release);
    }

    pub(crate) fn connections(&self) -> &AtomicUsize {
        &self.0.connections
    }

    pub(crate) fn close_all(&self) -> &CancellationToken {
        &self.0.close_all
    }

    pub(crate) fn tracker(&self) -> &TaskTracker {
        &self.0.tracker
    }
}
