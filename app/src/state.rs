//! What every request handler shares ([`AppState`]): the configuration, the hub, presence, in
//! token mode the gate and the signed-in users, and the instance's own state (draining, open
//! connections, the shutdown token, the connection tasks).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::{Gate, KeyError, KeyRing, Verifier};
use crate::config::{AuthConfig, Config};
use crate::hub::Hub;
use crate::hub::rooms::Rooms;
use crate::presence::Presence;
use crate::redis::LinkError;
use crate::users::Users;

/// Why the instance's state could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The connection to Redis could not be set up.
    #[error(transparent)]
    Redis(#[from] LinkError),
    /// A token key file could not be loaded.
    #[error("token key {0}")]
    Keys(#[from] KeyError),
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

struct Shared {
    config: Config,
    hub: Hub,
    /// Token mode's decisions; `None` in anonymous mode.
    gate: Option<Gate>,
    /// Signed-in users' connections, here and (with Redis) everywhere.
    users: Arc<Users>,
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
    pub fn new(config: Config) -> Result<AppState, StartError> {
        let hub = Hub::new(&config)?;
        let (gate, per_user) = match &config.auth {
            AuthConfig::Anonymous => (None, 0),
            AuthConfig::Token(token) => {
                let ring = KeyRing::load(&token.keys)?;
                let verifier = Verifier::new(ring, token.rules.clone());
                let gate = Gate::new(verifier, token.public_rooms.clone());
                (Some(gate), token.max_connections_per_user)
            }
        };
        // Anonymous connections have no user: nothing to count or follow in Redis.
        let shared = if gate.is_some() {
            hub.redis().cloned()
        } else {
            None
        };
        let users = Users::new(per_user, shared);
        let presence = Presence::new(
            config.presence,
            hub.redis().cloned(),
            hub.rooms().default_room().channel(),
        );
        Ok(AppState(Arc::new(Shared {
            config,
            hub,
            gate,
            users,
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

    /// Token mode's gate; `None` in anonymous mode.
    pub(crate) fn gate(&self) -> Option<&Gate> {
        self.0.gate.as_ref()
    }

    pub(crate) fn users(&self) -> &Arc<Users> {
        &self.0.users
    }

    /// Reloads the token keys from their files (SIGHUP); on failure the old keys stay and the
    /// error says which file. Nothing to do in anonymous mode.
    pub fn reload_keys(&self) -> Result<(), KeyError> {
        if let (Some(gate), AuthConfig::Token(token)) = (self.gate(), &self.config().auth) {
            gate.verifier().reload(KeyRing::load(&token.keys)?);
        }
        Ok(())
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
