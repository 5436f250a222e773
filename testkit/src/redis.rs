//! A real `redis-server` on an ephemeral loopback port, in its own temporary directory. It keeps
//! its data in an append-only file ([`Persistence`]) or in memory only, and can be killed, shut
//! down cleanly and started again on the same port to test reconnection and recovery.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio::process::Command;

use crate::process::{Proc, Ready, system_bin};

/// How long a clean shutdown may take.
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(10);

/// Extra server settings (TLS, password) for a managed-Redis-like server.
#[derive(Clone, Default)]
pub struct RedisTls {
    /// Server certificate, key and the CA that signed them, as PEM files.
    pub cert: std::path::PathBuf,
    /// Server private key.
    pub key: std::path::PathBuf,
    /// CA certificate.
    pub ca: std::path::PathBuf,
}

/// How a server keeps its data across restarts (never with RDB snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Append-only file, fsync after every write: even a kill loses nothing (the tests' default).
    #[default]
    Always,
    /// Append-only file, fsync once a second, as deployments run it: a clean shutdown loses
    /// nothing, a crash up to a second.
    EverySec,
    /// Memory only: every restart starts empty (a managed Redis replaced, a node that lost its
    /// data).
    Off,
}

/// A running `redis-server` on a fixed loopback port.
pub struct Redis {
    proc: Option<Proc>,
    port: u16,
    dir: TempDir,
    tls: Option<RedisTls>,
    password: Option<String>,
    persistence: Persistence,
}

impl Redis {
    /// Starts a plain `redis-server` on a free loopback port.
    pub async fn start() -> Result<Redis> {
        Self::start_with(None, None).await
    }

    /// Starts `redis-server`, with TLS only (no plain port) and `requirepass` when given.
    pub async fn start_with(tls: Option<RedisTls>, password: Option<&str>) -> Result<Redis> {
        Self::start_full(tls, password, Persistence::default()).await
    }

    /// Starts a plain `redis-server` that keeps its data as `persistence` says.
    pub async fn start_persisting(persistence: Persistence) -> Result<Redis> {
        Self::start_full(None, None, persistence).await
    }

    async fn start_full(
        tls: Option<RedisTls>,
        password: Option<&str>,
        persistence: Persistence,
    ) -> Result<Redis> {
        let port = free_port()?;
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut redis = Redis {
            proc: None,
            port,
            dir,
            tls,
            password: password.map(str::to_string),
            persistence,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(system_bin("redis-server", "redis-server")?);
        cmd.current_dir(self.dir.path())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--dir", &path_str(self.dir.path())]);
        match self.persistence {
            Persistence::Always => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
            Persistence::EverySec => cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]),
            Persistence::Off => cmd.args(["--appendonly", "no"]),
        };
        match &self.tls {
            None => {
                cmd.args(["--port", &self.port.to_string()]);
            }
            Some(tls) => {
                cmd.args(["--port", "0", "--tls-port", &self.port.to_string()])
                    .args(["--tls-cert-file", &path_str(&tls.cert)])
                    .args(["--tls-key-file", &path_str(&tls.key)])
                    .args(["--tls-ca-cert-file", &path_str(&tls.ca)])
                    .args(["--tls-auth-clients", "no"]);
            }
        }
        if let Some(password) = &self.password {
            cmd.args(["--requirepass", password]);
        }
        self.proc = Some(
            Proc::spawn(
                "redis-server",
                cmd,
                Ready::Line("Ready to accept connections"),
            )
            .await?,
        );
        Ok(())
    }

    /// The URL an app uses to reach this server (`redis://` or `rediss://`, with the password).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.password {
            Some(p) => format!("{scheme}://:{p}@127.0.0.1:{}", self.port),
            None => format!("{scheme}://127.0.0.1:{}", self.port),
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.as_ref().and_then(Proc::pid)
    }

    /// Kills the server (as a crash would).
    pub async fn stop(&mut self) {
        if let Some(mut proc) = self.proc.take() {
            proc.kill().await;
        }
    }

    /// Shuts the server down cleanly (SIGTERM: it writes out its append-only file) and waits
    /// until it has exited.
    pub async fn shutdown(&mut self) -> Result<()> {
        if let Some(mut proc) = self.proc.take() {
            proc.terminate(SHUTDOWN_WITHIN).await?;
        }
        Ok(())
    }

    /// Starts a stopped server again on the same port (a running one is killed first).
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        self.spawn().await
    }
}

/// A port that was free a moment ago (bind 127.0.0.1:0, read the port, release it).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
