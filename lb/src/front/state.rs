//! What the listeners and client connections of one load balancer share.
//!
//! `ops::server` builds one [`State`] at start and swaps its configuration and TLS generations
//! on reload; each listener's accept loop hands an `Arc` of it to every connection it accepts
//! (`conn`, `redirect`), which loads the generation current at accept and drives its hyper
//! connection through [`State::serve_until_drained`], so shutdown reaches every connection
//! the same way.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::front::listener::ConnLimit;
use crate::http::context::Engine;

/// State shared by the listeners and connections of one load balancer.
#[derive(Debug)]
pub struct State {
    /// Request handling machinery.
    pub engine: Arc<Engine>,
    /// The current configuration generation.
    pub config: ArcSwap<Config>,
    /// The current TLS configuration.
    pub tls: ArcSwap<rustls::ServerConfig>,
    /// Cancelled at shutdown: listeners stop, connections finish their current request.
    pub root: CancellationToken,
    /// The client connection limit.
    pub limit: Arc<ConnLimit>,
    /// The https listener's port, for redirects.
    pub https_port: u16,
    /// Issued ACME certificates and challenge answers (`[acme]`), if configured.
    pub acme: Option<Arc<crate::acme::Acme>>,
    /// Set when the listeners were handed to a new process (binary upgrade): the drain then
    /// answers every connection this process accepted at least once, as its client did connect
    /// and has nowhere else to go. A plain shutdown closes such connections at once.
    pub handed_over: AtomicBool,
}

impl State {
    /// Completes when a connection still in its TLS handshake must be dropped: at once on
    /// shutdown, but only at the end of the grace after a handover (its client is answered).
    pub async fn handshake_cut(&self) {
        self.root.cancelled().await;
        if self.handed_over.load(Relaxed) {
            self.engine.kill.cancelled().await;
        }
    }

    /// Drives a hyper server `connection` to its end. At shutdown it is asked (`graceful`) to
    /// finish the request under way and close; after a handover, not before its first request
    /// has arrived (`first_request` completes), so a client whose connection this process
    /// accepted gets an answer even if it was still sending when the drain began (hyper's
    /// header timeout bounds the wait). `None` if the drain grace ran out first.
    pub async fn serve_until_drained<C: Future + Unpin>(
        &self,
        connection: &mut C,
        first_request: impl Future<Output = ()>,
        graceful: impl FnOnce(Pin<&mut C>),
    ) -> Option<C::Output> {
        tokio::select! {
            result = &mut *connection => Some(result),
            () = self.root.cancelled() => {
                if self.handed_over.load(Relaxed) {
                    tokio::select! {
                        result = &mut *connection => return Some(result),
                        () = first_request => {}
                        () = self.engine.kill.cancelled() => return None,
                    }
                }
                graceful(Pin::new(&mut *connection));
                tokio::select! {
                    result = connection => Some(result),
                    () = self.engine.kill.cancelled() => None,
                }
            }
        }
    }
}
