//! Process signals: SIGHUP reloads, SIGTERM and SIGINT shut down.
//!
//! [`run`] waits on all three. Each SIGHUP calls the reload function (the binary re-reads its
//! configuration file with the same command-line overrides) and hands the result to
//! [`Lb::reload_with`]; a rejected configuration is logged and the running one keeps serving.
//! The first SIGTERM or SIGINT returns, and the caller drains with [`Lb::shutdown`]. Needs the
//! multi-threaded runtime (the reload runs in `block_in_place`).

use std::io;

use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info};

use crate::config::{Config, ConfigError};
use crate::ops::server::Lb;

/// Serves signals for `lb` until SIGTERM or SIGINT; `load` produces the configuration to
/// reload on SIGHUP.
pub async fn run(lb: &Lb, mut load: impl FnMut() -> Result<Config, ConfigError>) -> io::Result<()> {
    let mut hangup = signal(SignalKind::hangup())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    loop {
        tokio::select! {
            _ = hangup.recv() => {
                info!("SIGHUP: reloading configuration and certificates");
                // Reading files and resolving backend names blocks: keep it off the workers.
                let result = tokio::task::block_in_place(|| lb.reload_with(&mut load));
                if let Err(e) = result {
                    error!(error = %e, "reload rejected; the running configuration keeps serving");
                }
            }
            _ = terminate.recv() => {
                info!("SIGTERM received");
                return Ok(());
            }
            _ = interrupt.recv() => {
                info!("SIGINT received");
                return Ok(());
            }
        }
    }
}
