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
}

impl State {
    /// Drives a hyper server `connection` to its end. At shutdown it is asked (`graceful`) to
    /// finish the request under way and close; `None` if the drain grace ran out first.
    pub async fn serve_until_drained<C: Future + Unpin>(
        &self,
        connection: &mut C,
        graceful: impl FnOnce(Pin<&mut C>),
    ) -> Option<C::Output> {
        tokio::select! {
            result = &mut *connection => Some(result),
            () = self.root.cancelled() => {
                graceful(Pin::new(&mut *connection));
                tokio::select! {
                    result = connection => Some(result),
                    () = self.engine.kill.cancelled() => None,
                }
            }
        }
    }
}
