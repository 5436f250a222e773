//! Process signals: SIGHUP reloads, SIGUSR2 upgrades the binary, SIGTERM and SIGINT shut down.
//!
//! [`Signals::install`] registers the handlers (before the readiness lines, so a signal sent
//! right after them is never fatal); [`Signals::run`] serves them. Each SIGHUP calls the reload
//! function (the binary re-reads its configuration file with the same command-line overrides)
//! and hands the result to [`Lb::reload_with`]; a rejected configuration is logged and the
//! running one keeps serving. Each SIGUSR2 starts the [`Successor`] and hands the listeners
//! over (`handover`); a failed handover is logged and this process keeps serving, a successful
//! one returns [`Exit::Upgraded`], and the caller drains with [`Signals::drain_after_upgrade`].
//! The first SIGTERM or SIGINT returns [`Exit::Terminate`], and the caller drains with
//! [`Lb::shutdown`]. Needs the multi-threaded runtime (the reload runs in `block_in_place`).

use std::io;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use crate::config::{Config, ConfigError};
use crate::ops::handover::{self, Successor};
use crate::ops::server::Lb;

/// Why [`Signals::run`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// SIGTERM or SIGINT: drain and exit.
    Terminate,
    /// A new process took the listeners over (its id): drain within `upgrade_grace`.
    Upgraded(u32),
}

/// The signal handlers of a running `lb`.
#[derive(Debug)]
pub struct Signals {
    hangup: Signal,
    upgrade: Signal,
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    /// Registers the handlers; from here on these signals no longer end the process.
    pub fn install() -> io::Result<Signals> {
        Ok(Signals {
            hangup: signal(SignalKind::hangup())?,
            upgrade: signal(SignalKind::user_defined2())?,
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
        })
    }

    /// Serves signals for `lb` until SIGTERM or SIGINT or a successful upgrade; `load`
    /// produces the configuration to reload on SIGHUP, `successor` is started on SIGUSR2
    /// (`None`: the binary's path is unknown and upgrades are refused).
    pub async fn run(
        &mut self,
        lb: &Lb,
        mut load: impl FnMut() -> Result<Config, ConfigError>,
        successor: Option<&Successor>,
    ) -> Exit {
        loop {
            tokio::select! {
                _ = self.hangup.recv() => {
                    info!("SIGHUP: reloading configuration and certificates");
                    // Reading files and resolving backend names blocks: keep it off the workers.
                    let result = tokio::task::block_in_place(|| lb.reload_with(&mut load));
                    if let Err(e) = result {
                        error!(error = %e,
                               "reload rejected; the running configuration keeps serving");
                    }
                }
                _ = self.upgrade.recv() => {
                    let Some(successor) = successor else {
                        error!("SIGUSR2: upgrade refused: the path of lb's binary is unknown");
                        continue;
                    };
                    info!(program = %successor.program.display(),
                          "SIGUSR2: starting the new binary and handing the listeners over");
                    match handover::upgrade(lb, successor).await {
                        Ok(pid) => return Exit::Upgraded(pid),
                        Err(e) => error!(error = %e,
                                         "upgrade failed; this process keeps serving"),
                    }
                }
                _ = self.terminate.recv() => {
                    info!("SIGTERM received");
                    return Exit::Terminate;
                }
                _ = self.interrupt.recv() => {
                    info!("SIGINT received");
                    return Exit::Terminate;
                }
            }
        }
    }

    /// After a handover to process `pid`: stops accepting, then lets connections and tunnels
    /// run for up to `timeouts.upgrade_grace` before closing them. A SIGTERM or SIGINT
    /// meanwhile closes them at once (`systemctl stop` reaches every process of the unit).
    pub async fn drain_after_upgrade(&mut self, lb: &Lb, pid: u32) {
        lb.stop_accepting().await;
        let grace = lb.config().timeouts.upgrade_grace;
        info!(new_pid = pid, grace = %humantime::format_duration(grace),
              "upgrade complete: the new process accepts every connection; \
               this one keeps its connections and tunnels until they end or the grace passes");
        tokio::select! {
            () = lb.drain(grace) => return,
            _ = self.terminate.recv() => warn!("SIGTERM while draining after an upgrade"),
            _ = self.interrupt.recv() => warn!("SIGINT while draining after an upgrade"),
        }
        lb.drain(std::time::Duration::ZERO).await;
    }
}
