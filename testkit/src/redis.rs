//! A real `redis-server` on a loopback port, in its own temporary directory, ready when it says
//! so (`Ready to accept connections` on its output: another test's server on the same port
//! cannot answer for it). It keeps its data in an append-only file ([`Persistence`]) or in
//! memory only, speaks TLS with a password when asked ([`Options`]), and can be killed, shut
//! down cleanly and started again on the same port to test reconnection and recovery.
//!
//! `redis-server` cannot bind port 0 and report it, so it gets a port that was free a moment
//! ago ([`free_port`]); when another process took that port meanwhile, the server exits
//! before it is ready and is started again on a new one.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;
use tokio::process::Command;

use crate::process::{Proc, Ready, system_bin};

/// How long a clean shutdown may take.
const SHUTDOWN_WITHIN: Duration = Duration::from_secs(10);
/// How many ports a first start tries (each one free a moment before).
const PORT_ATTEMPTS: usize = 5;

/// A TLS-only server's certificate, key and the CA that signed them, as PEM files.
#[derive(Debug, Clone)]
pub struct RedisTls {
    /// Server certificate.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// CA certificate.
    pub ca: PathBuf,
}

/// How a server keeps its data across restarts (never with RDB snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Append-only file, fsync after every write: even a kill loses nothing (the default).
    #[default]
    Always,
    /// Append-only file, fsync once a second, as deployments run it: a clean shutdown loses
    /// nothing, a crash up to a second.
    EverySec,
    /// Memory only: every restart starts empty (a managed Redis replaced, a node that lost its
    /// data).
    Off,
}

/// What kind of server to start.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// TLS only (no plain port), as a managed Redis with in-transit encryption.
    pub tls: Option<RedisTls>,
    /// `requirepass`.
    pub password: Option<String>,
    /// How it keeps its data.
    pub persistence: Persistence,
}

/// A running `redis-server` on a loopback port.
pub struct Redis {
    proc: Option<Proc>,
    port: u16,
    dir: TempDir,
    options: Options,
}

impl Redis {
    /// Starts a plain `redis-server` that keeps its data in an append-only file.
    pub async fn start() -> Result<Redis> {
        Self::start_with(Options::default()).await
    }

    /// Starts a `redis-server` as `options` say.
    pub async fn start_with(options: Options) -> Result<Redis> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut redis = Redis {
            proc: None,
            port: 0,
            dir,
            options,
        };
        let mut attempt = 1;
        loop {
            redis.port = free_port()?;
            match redis.spawn().await {
                Ok(()) => return Ok(redis),
                // Another process took the port between its release and the server's bind.
                Err(e) if attempt < PORT_ATTEMPTS && format!("{e:#}").contains("in use") => {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Starts a `redis-server` as `options` say on `port`, taken from [`free_port`] by a test
    /// that needs to know it before the server runs.
    pub async fn start_on(port: u16, options: Options) -> Result<Redis> {
        let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
        let mut redis = Redis {
            proc: None,
            port,
            dir,
            options,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    async fn spawn(&mut self) -> Result<()> {
        let mut cmd = Command::new(system_bin("redis-server", "redis-server")?);
        cmd.current_dir(self.dir.path())
            .args(["--bind", "127.0.0.1", "--save", ""])
            .args(["--dir", &path_str(self.dir.path())]);
        match self.options.persistence {
            Persistence::Always => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
            Persistence::EverySec => cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]),
            Persistence::Off => cmd.args(["--appendonly", "no"]),
        };
        match &self.options.tls {
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
        if let Some(password) = &self.options.password {
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

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The URL a client uses to reach this server (`redis://` or `rediss://`, with the
    /// password, percent-encoded).
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        match &self.options.password {
            Some(p) => format!("{scheme}://:{}@127.0.0.1:{}", encode(p), self.port),
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

/// A port that was free a moment ago (bind 127.0.0.1:0, read the port, release it), for a
/// server that cannot bind port 0 and report it.
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// `text` with every byte outside the URL's unreserved set percent-encoded.
fn encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_server_is_ready_when_it_says_so_and_comes_back_on_its_port() {
        let mut redis = Redis::start_with(Options {
            password: Some("p@ss/word".to_owned()),
            persistence: Persistence::Off,
            ..Options::default()
        })
        .await
        .unwrap();
        let port = redis.port();
        assert_eq!(
            redis.url(),
            format!("redis://:p%40ss%2Fword@127.0.0.1:{port}")
        );
        let first = redis.pid();
        redis.restart().await.unwrap();
        assert_eq!(redis.port(), port);
        assert_ne!(redis.pid(), first);
        redis.shutdown().await.unwrap();
        assert_eq!(redis.pid(), None);
    }
}
