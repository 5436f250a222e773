//! The running load balancer: start, reload, shut down.
//!
//! How it works: [`Lb`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::acme::Acme;
use crate::acme::peer::Peer;
use crate::acme::renew::Renewer;
use crate::backends::balance::{Backend, Pool};
use crate::backends::health;
use crate::backends::upstream::Upstreams;
use crate::config::{Config, ConfigError};
use crate::front::listener::{self, ConnLimit, ConnSlot};
use crate::front::state::State;
use crate::front::tickets::{TicketError, Tickets};
use crate::front::{conn, redirect, tls};
use crate::http::context::Engine;
use crate::metrics::Metrics;
use crate::ops::{admin, fdlimit};

/// How often idle keep-alive connections are checked for age.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// How long shutdown waits for connections to close after the drain grace is over.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The addresses the listeners actually bound (useful with port 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Addrs {
    /// The TLS listener.
    pub https: SocketAddr,
    /// The plain-HTTP redirect listener, if configured.
    pub redirect: Option<SocketAddr>,
    /// The admin listener, if configured.
    pub admin: Option<SocketAddr>,
}

/// What a listener is for; its name in the handover and its configuration key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerKind {
    /// `listen.https`.
    Https,
    /// `listen.redirect`.
    Redirect,
    /// `listen.admin`.
    Admin,
    /// `acme.peer.listen`.
    Peer,
}

impl ListenerKind {
    /// Every kind.
    pub const ALL: [ListenerKind; 4] = [Self::Https, Self::Redirect, Self::Admin, Self::Peer];

    /// Its name: `https`, `redirect` or `admin` (readiness lines, the handover).
    pub fn name(self) -> &'static str {
        match self {
            Self::Https => "https",
            Self::Redirect => "redirect",
            Self::Admin => "admin",
            Self::Peer => "peer",
        }
    }

    /// Its configuration key.
    pub fn key(self) -> &'static str {
        match self {
            Self::Https => "listen.https",
            Self::Redirect => "listen.redirect",
            Self::Admin => "listen.admin",
            Self::Peer => "acme.peer.listen",
        }
    }
}

/// One listening socket, with its kind and the address the configuration gave it (which may
/// have port 0; the socket knows where it is bound).
#[derive(Debug)]
pub struct ListeningSocket {
    /// What it is for.
    pub kind: ListenerKind,
    /// The configured address.
    pub configured: SocketAddr,
    /// The socket.
    pub fd: OwnedFd,
}

/// What a previous process handed over on a binary upgrade.
#[derive(Default)]
pub struct Inherited {
    /// Its listening sockets.
    pub sockets: Vec<ListeningSocket>,
    /// Its session ticket keys (`Tickets::export`); secret.
    pub ticket_keys: Option<Vec<u8>>,
}

impl fmt::Debug for Inherited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inherited")
            .field("sockets", &self.sockets)
            .field(
                "ticket_keys",
                &self.ticket_keys.as_ref().map(|_| "<secret>"),
            )
            .finish()
    }
}

/// Why the load balancer could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration (or a certificate it names) is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not be bound.
    #[error("could not listen on {addr} ({key}): {source}")]
    Bind {
        /// The configuration key of the listener.
        key: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Session ticket keys could not be made or taken over.
    #[error(transparent)]
    Tickets(#[from] TicketError),
}

/// A running load balancer. Dropping it stops everything at once; [`Lb::shutdown`] drains.
///
/// [`Lb::start`] takes a validated [`Config`], loads its certificates, raises the open-file
/// limit, binds the listeners (https, and optionally redirect and admin) and spawns their
/// accept loops, the health checkers and the keep-alive pool sweeper, all on one
/// `TaskTracker` and under one root `CancellationToken` with a child token per job.
/// [`Lb::start_with`] does the same with what a previous process handed over on a binary
/// upgrade ([`Inherited`], see `handover`): a listening socket of the same kind and configured
/// address is taken over instead of bound, so no connection is refused, and the session ticket
/// keys continue. The process keeps a duplicate of each listening socket for its own successor;
/// after a handover, [`Lb::stop_accepting`] ends the accept loops and [`Lb::drain`] lets
/// established connections and tunnels finish within `timeouts.upgrade_grace`.
/// [`Lb::reload`] swaps in a new generation (TLS configuration, backend pool, limits) atomically:
/// connections already established keep what they started with, backends that remain keep their
/// state and counters, and a configuration that fails to load changes nothing.
/// [`Lb::shutdown`] stops accepting, lets in-flight requests finish and tunnels run for up to
/// `timeouts.drain_grace`, then closes whatever is left.
#[derive(Debug)]
pub struct Lb {
    state: Arc<State>,
    addrs: Addrs,
    /// The open-file limit, for recomputing the connection limit on reload.
    nofile: u64,
    /// Cancels the health checkers of the current pool.
    health: Mutex<CancellationToken>,
    /// Serialises reloads.
    reloading: Mutex<()>,
    /// Session ticket keys, shared by every TLS generation and handed to a successor.
    tickets: Arc<Tickets>,
    /// Duplicates of the listening sockets, for a successor; emptied once handed over.
    sockets: Mutex<Vec<ListeningSocket>>,
    /// Cancelled when the listeners stop accepting (a handover, or shutdown).
    accepting: CancellationToken,
    /// The accept loops, to know when they have ended.
    acceptors: TaskTracker,
}

impl Lb {
    /// Starts serving `config` (see the module docs). Must be called within a Tokio runtime.
    pub async fn start(config: Config) -> Result<Lb, StartError> {
        Self::start_with(config, Inherited::default()).await
    }

    /// Starts serving `config`, taking over what a previous process handed over: its
    /// listening sockets where kind and configured address match, and its ticket keys.
    /// Sockets not taken over are closed here (the previous process closes its own).
    pub async fn start_with(config: Config, inherited: Inherited) -> Result<Lb, StartError> {
        let rotation = config.tls.ticket_rotation;
        let tickets = match &inherited.ticket_keys {
            Some(keys) => Tickets::import(keys, rotation)?,
            None => Tickets::new(rotation)?,
        };
        let metrics = Arc::new(Metrics::default());
        let acme = match &config.acme {
            Some(a) => {
                let acme = match &a.peer {
                    Some(p) => {
                        let names = a.domains.iter().flatten().cloned().collect();
                        let peer = Peer::new(p.clone(), names, Arc::clone(&metrics))
                            .map_err(|e| config.error("acme.peer.secret_file", e))?;
                        Arc::new(Acme::paired(Arc::new(peer)))
                    }
                    None => Arc::new(Acme::default()),
                };
                let renewer = Renewer::start(Arc::clone(&acme), a.clone(), Arc::clone(&metrics))
                    .map_err(|e| config.error("acme.storage", e))?;
                Some((acme, renewer))
            }
            None => None,
        };
        let tls = tls::server_config(&config, &tickets, acme.as_ref().map(|(a, _)| a), &metrics)?;
        let nofile = fdlimit::raise();
        let limit_n = connection_limit(&config, nofile);
        fdlimit::log(nofile, limit_n);

        let mut handed = inherited.sockets;
        let mut sockets = Vec::new();
        let mut listen = |kind: ListenerKind, addr: SocketAddr| {
            let key = kind.key();
            let err = |source| StartError::Bind { key, addr, source };
            let listener = match handed
                .iter()
                .position(|s| s.kind == kind && s.configured == addr)
            {
                Some(i) => listener::adopt(handed.swap_remove(i).fd).map_err(err)?,
                None => listener::bind(addr).map_err(err)?,
            };
            let fd = listener.as_fd().try_clone_to_owned().map_err(err)?;
            sockets.push(ListeningSocket {
                kind,
                configured: addr,
                fd,
            });
            Ok::<_, StartError>(listener)
        };
        let https = listen(ListenerKind::Https, config.listen.https)?;
        let redirect = config
            .listen
            .redirect
            .map(|a| listen(ListenerKind::Redirect, a))
            .transpose()?;
        let admin = config
            .listen
            .admin
            .map(|a| listen(ListenerKind::Admin, a))
            .transpose()?;
        let peer = config
            .acme
            .as_ref()
            .and_then(|a| a.peer.as_ref())
            .map(|p| listen(ListenerKind::Peer, p.listen))
            .transpose()?;
        let local = |l: &tokio::net::TcpListener, key, fallback| {
            l.local_addr().map_err(|source| StartError::Bind {
                key,
                addr: fallback,
                source,
            })
        };
        let addrs = Addrs {
            https: local(&https, "listen.https", config.listen.https)?,
            redirect: match (&redirect, config.listen.redirect) {
                (Some(l), Some(a)) => Some(local(l, "listen.redirect", a)?),
                _ => None,
            },
            admin: match (&admin, config.listen.admin) {
                (Some(l), Some(a)) => Some(local(l, "listen.admin", a)?),
                _ => None,
            },
        };

        let tracker = TaskTracker::new();
        let root = CancellationToken::new();
        let kill = CancellationToken::new();
        let pool = Arc::new(Pool::new(
            config
                .backends
                .iter()
                .map(|b| Arc::new(Backend::new(b.name.clone(), b.addr, b.weight)))
                .collect(),
            config.policy,
        ));
        let engine = Arc::new(Engine {
            pool: Arc::new(ArcSwap::new(Arc::clone(&pool))),
            metrics: Arc::clone(&metrics),
            upstreams: Arc::new(Upstreams::new(config.limits.backend_idle_connections)),
            tracker: tracker.clone(),
            kill,
        });
        let health_token = root.child_token();
        health::spawn(pool, config.health.clone(), health_token.clone(), &tracker);
        let state = Arc::new(State {
            engine,
            config: ArcSwap::from_pointee(config),
            tls: ArcSwap::new(tls),
            root: root.clone(),
            limit: ConnLimit::new(metrics, limit_n),
            https_port: addrs.https.port(),
            acme: acme.as_ref().map(|(a, _)| Arc::clone(a)),
            handed_over: AtomicBool::new(false),
        });

        let accepting = root.child_token();
        let acceptors = TaskTracker::new();
        tracker.spawn(acceptors.track_future(listener_loop(
            &state,
            https,
            "https",
            &accepting,
            conn::serve,
        )));
        if let Some(l) = redirect {
            tracker.spawn(acceptors.track_future(listener_loop(
                &state,
                l,
                "redirect",
                &accepting,
                redirect::serve,
            )));
        }
        if let Some(l) = admin {
            tracker.spawn(acceptors.track_future(admin::serve(
                l,
                Arc::clone(&state.engine.metrics),
                Arc::clone(&state.engine.pool),
                accepting.child_token(),
            )));
        }
        if let (Some(l), Some((acme, _))) = (peer, &acme)
            && let Some(p) = &acme.peer
        {
            tracker.spawn(acceptors.track_future(Arc::clone(p).serve(
                Arc::clone(acme),
                l,
                accepting.child_token(),
            )));
        }
        acceptors.close();
        tracker.spawn(sweep_idle(Arc::clone(&state), root.child_token()));
        if let Some((_, renewer)) = acme {
            tracker.spawn(renewer.run(root.child_token()));
        }

        info!(
            https = %addrs.https,
            redirect = ?addrs.redirect,
            admin = ?addrs.admin,
            backends = state.engine.pool.load().backends().len(),
            "load balancer started"
        );
        Ok(Lb {
            state,
            addrs,
            nofile,
            health: Mutex::new(health_token),
            reloading: Mutex::new(()),
            tickets,
            sockets: Mutex::new(sockets),
            accepting,
            acceptors,
        })
    }

    /// The session ticket keys.
    pub fn tickets(&self) -> &Arc<Tickets> {
        &self.tickets
    }

    /// Runs `f` over the listening sockets a successor would take over (none once they have
    /// been handed over).
    pub fn with_sockets<R>(&self, f: impl FnOnce(&[ListeningSocket]) -> R) -> R {
        f(&self
            .sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()))
    }

    /// After a successful handover: stops accepting on every listener and returns once the
    /// accept loops have ended; this process's copies of the listening sockets are closed
    /// (the successor's stay open: no connection is refused). Established connections and
    /// tunnels carry on until [`Lb::drain`].
    pub async fn stop_accepting(&self) {
        self.state.handed_over.store(true, Relaxed);
        self.close_listeners().await;
    }

    /// Ends the accept loops and closes this process's copies of the listening sockets.
    async fn close_listeners(&self) {
        self.accepting.cancel();
        self.acceptors.wait().await;
        self.sockets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clear();
    }

    /// The bound listener addresses.
    pub fn addrs(&self) -> Addrs {
        self.addrs
    }

    /// The global counters.
    pub fn metrics(&self) -> Arc<Metrics> {
        Arc::clone(&self.state.engine.metrics)
    }

    /// The current backend pool.
    pub fn pool(&self) -> Arc<Pool> {
        self.state.engine.pool.load_full()
    }

    /// The current configuration.
    pub fn config(&self) -> Arc<Config> {
        self.state.config.load_full()
    }

    /// The connection limit in force.
    pub fn connection_limit(&self) -> usize {
        self.state.limit.limit()
    }

    /// Switches to `config` (see the module docs). On error nothing changes.
    pub fn reload(&self, config: Config) -> Result<(), ConfigError> {
        self.reload_with(|| Ok(config))
    }

    /// Loads a configuration with `load` and switches to it; a failure to load or apply it is
    /// counted, and nothing changes.
    pub fn reload_with(
        &self,
        load: impl FnOnce() -> Result<Config, ConfigError>,
    ) -> Result<(), ConfigError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let metrics = &self.state.engine.metrics;
        match load().and_then(|config| self.apply(config)) {
            Ok(()) => {
                metrics.reloads_ok.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(e) => {
                metrics.reloads_failed.fetch_add(1, Relaxed);
                Err(e)
            }
        }
    }

    fn apply(&self, mut config: Config) -> Result<(), ConfigError> {
        let state = &self.state;
        let old = state.config.load_full();
        if config.acme != old.acme {
            warn!(file = %config.source, "[acme] changed; it takes effect only after a restart");
            config.acme.clone_from(&old.acme);
        }
        let tls = tls::server_config(
            &config,
            &self.tickets,
            state.acme.as_ref(),
            &state.engine.metrics,
        )?;
        if config.listen != old.listen {
            warn!(file = %config.source,
                  "listener addresses changed; they take effect only after a restart");
            // What is stored describes what is bound.
            config.listen = old.listen;
        }
        let old_pool = state.engine.pool.load_full();
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| {
                match old_pool
                    .backends()
                    .iter()
                    .find(|o| o.addr() == b.addr && o.name() == b.name)
                {
                    Some(kept) => {
                        kept.set_weight(b.weight);
                        Arc::clone(kept)
                    }
                    None => Arc::new(Backend::new(b.name.clone(), b.addr, b.weight)),
                }
            })
            .collect();
        let kept = backends
            .iter()
            .filter(|b| old_pool.backends().iter().any(|o| Arc::ptr_eq(o, b)))
            .count();
        let pool = Arc::new(Pool::new(backends, config.policy));

        state.tls.store(tls);
        self.tickets.set_rotation(config.tls.ticket_rotation);
        state.engine.pool.store(Arc::clone(&pool));
        state
            .limit
            .set_limit(connection_limit(&config, self.nofile));
        state
            .engine
            .upstreams
            .set_max_idle(config.limits.backend_idle_connections);
        let health_token = state.root.child_token();
        let old_health = std::mem::replace(
            &mut *self
                .health
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            health_token.clone(),
        );
        old_health.cancel();
        health::spawn(
            Arc::clone(&pool),
            config.health.clone(),
            health_token,
            &state.engine.tracker,
        );
        let idle = config.timeouts.backend_idle;
        state.engine.upstreams.sweep(idle, |addr| {
            pool.backends().iter().any(|b| b.addr() == addr)
        });
        info!(
            file = %config.source,
            backends = pool.backends().len(),
            kept,
            policy = %pool.policy(),
            "configuration reloaded"
        );
        state.config.store(Arc::new(config));
        Ok(())
    }

    /// Stops accepting, waits up to the drain grace for requests and tunnels to finish, then
    /// closes the rest and returns once every task has ended.
    pub async fn shutdown(&self) {
        self.drain(self.state.config.load().timeouts.drain_grace)
            .await;
    }

    /// Stops accepting (if not already stopped), lets requests under way finish and tunnels
    /// run for up to `grace`, then closes the rest and returns once every task has ended.
    pub async fn drain(&self, grace: Duration) {
        let state = &self.state;
        let engine = &state.engine;
        info!(
            connections = engine.metrics.connections_active.load(Relaxed),
            tunnels = engine.metrics.tunnels_active.load(Relaxed),
            grace = %humantime::format_duration(grace),
            "shutting down: no new connections; draining"
        );
        state.root.cancel();
        self.close_listeners().await;
        engine.upstreams.close();
        engine.tracker.close();
        if tokio::time::timeout(grace, engine.tracker.wait())
            .await
            .is_err()
        {
            warn!(
                tunnels = engine.metrics.tunnels_active.load(Relaxed),
                connections = engine.metrics.connections_active.load(Relaxed),
                "drain grace over; closing what is left"
            );
        }
        engine.kill.cancel();
        if tokio::time::timeout(KILL_WAIT, engine.tracker.wait())
            .await
            .is_err()
        {
            warn!("some tasks did not end after the drain");
        }
        info!("shut down");
    }
}

impl Drop for Lb {
    fn drop(&mut self) {
        self.state.root.cancel();
        self.state.engine.kill.cancel();
    }
}

/// The accept loop of a client-facing listener: each connection takes a slot of the
/// connection limit and is served by `serve` as a task the drain waits for.
fn listener_loop<F>(
    state: &Arc<State>,
    listener: TcpListener,
    kind: &'static str,
    accepting: &CancellationToken,
    serve: fn(Arc<State>, TcpStream, SocketAddr, ConnSlot) -> F,
) -> impl Future<Output = ()> + Send + 'static
where
    F: Future<Output = ()> + Send + 'static,
{
    let s = Arc::clone(state);
    let limit = Arc::clone(&state.limit);
    listener::accept_loop(
        listener,
        kind,
        accepting.child_token(),
        move || limit.try_acquire(),
        move |stream, peer, slot| {
            s.engine
                .tracker
                .spawn(serve(Arc::clone(&s), stream, peer, slot));
        },
    )
}

/// The connection limit for `config` within `nofile` descriptors.
fn connection_limit(config: &Config, nofile: u64) -> usize {
    let pooled = (config.limits.backend_idle_connections * config.backends.len()) as u64;
    fdlimit::effective_limit(config.limits.max_client_connections, nofile, pooled)
}

/// Periodically closes idle keep-alive connections that have aged out.
async fn sweep_idle(state: Arc<State>, token: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = token.cancelled() => return,
            _ = tick.tick() => {}
        }
        let idle = state.config.load().timeouts.backend_idle;
        let pool = state.engine.pool.load();
        state.engine.upstreams.sweep(idle, |addr| {
            pool.backends().iter().any(|b| b.addr() == addr)
        });
    }
}
