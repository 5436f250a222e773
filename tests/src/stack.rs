//! The whole product on loopback: certificates from `lb certs generate`, one `redis-server`, two
//! (or more) `app` processes and one `lb` in front of them with fast health checks, all real
//! processes on ephemeral ports. Tests drive it through `wss://` with [`crate::client`] and
//! read `lb`'s view of the backends from its admin `/stats`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde::Deserialize;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;

use crate::client::{ChatClient, tls_connector};
use crate::process::{Proc, Ready, workspace_bin};
use crate::redis::Redis;

/// Generates a CA and a server certificate for `hosts` into `dir` with `lb certs generate`.
pub async fn generate_certs(dir: &Path, hosts: &[&str]) -> Result<()> {
    let mut cmd = Command::new(workspace_bin("lb")?);
    cmd.args(["certs", "generate", "--out"]).arg(dir);
    for host in hosts {
        cmd.args(["--host", host]);
    }
    let out = cmd.output().await.context("cannot run lb certs generate")?;
    if !out.status.success() {
        bail!(
            "lb certs generate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The test configuration of an `app`: quick shutdown, generous per-client limits.
pub fn app_config() -> &'static str {
    "shutdown_grace = \"1s\"\nmessages_per_second = 1000\nmessages_burst = 1000\n"
}

/// Starts an `app` process on an ephemeral port, sharing messages through `redis_url`.
pub async fn start_app(name: &str, config: &Path, redis_url: &str) -> Result<Proc> {
    let mut cmd = Command::new(workspace_bin("app")?);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", "127.0.0.1:0", "--redis", redis_url]);
    Proc::spawn(name, cmd, Ready::Listening(&["http"])).await
}

/// `lb`'s configuration for a test: TLS on `https` (an ephemeral port: `127.0.0.1:0`), admin on
/// an ephemeral loopback port, the given backends, round-robin, health checks every 100 ms
/// (down after 2 failures, up after 1 pass).
pub fn lb_config(https: &str, pem: &Path, backends: &[(String, SocketAddr)]) -> String {
    let mut text = format!(
        "[listen]\nhttps = \"{https}\"\nadmin = \"127.0.0.1:0\"\n\n\
         [[certificates]]\npem = {pem:?}\n\n\
         [balance]\npolicy = \"round-robin\"\n\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n\n\
         [timeouts]\ndrain_grace = \"1s\"\n",
        pem = pem.display().to_string()
    );
    for (name, addr) in backends {
        text.push_str(&format!(
            "\n[[backends]]\nname = \"{name}\"\naddr = \"{addr}\"\n"
        ));
    }
    text
}

/// One backend as `lb` reports it on `/stats`.
#[derive(Debug, Deserialize)]
pub struct BackendView {
    /// Its configured name.
    pub name: String,
    /// Whether health checks currently pass.
    pub up: bool,
    /// WebSocket tunnels open through it now.
    pub tunnels_active: u64,
    /// Failed connects from the proxy.
    pub connect_failures: u64,
}

#[derive(Deserialize)]
struct StatsView {
    backends: Vec<BackendView>,
}

/// `GET path` over plain HTTP/1.1 on a fresh connection: the status code and the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    tcp.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    timeout(Duration::from_secs(5), tcp.read_to_end(&mut raw))
        .await
        .map_err(|_| anyhow!("GET {path} on {addr} timed out"))??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("bad answer to GET {path}: {text}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {head}"))?;
    Ok((status, body.to_string()))
}

/// Fetches `lb`'s `/stats` from its admin listener.
pub async fn lb_backends(admin: SocketAddr) -> Result<Vec<BackendView>> {
    let (_, body) = http_get(admin, "/stats").await?;
    let stats: StatsView = serde_json::from_str(&body).context("bad /stats JSON")?;
    Ok(stats.backends)
}

/// Polls `check` every 20 ms until it returns `Ok(true)`, at most `within`.
pub async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        let last = check().await;
        if let Ok(true) = last {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{what}: not reached within {within:?} (last check: {last:?})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The running stack.
pub struct Stack {
    /// Holds certificates and configs; removed at the end.
    pub dir: TempDir,
    /// The shared Redis.
    pub redis: Redis,
    /// The app processes, `app1`, `app2`, ...
    pub apps: Vec<Proc>,
    /// The load balancer.
    pub lb: Proc,
    /// Trusts the generated CA.
    pub tls: TlsConnector,
}

impl Stack {
    /// Starts Redis, `n_apps` apps and `lb` in front of them.
    pub async fn start(n_apps: usize) -> Result<Stack> {
        let dir = tempfile::tempdir()?;
        generate_certs(&dir.path().join("certs"), &["localhost", "127.0.0.1"]).await?;
        let redis = Redis::start().await?;
        let app_toml = dir.path().join("app.toml");
        std::fs::write(&app_toml, app_config())?;
        let mut apps = Vec::new();
        for i in 1..=n_apps {
            apps.push(start_app(&format!("app{i}"), &app_toml, &redis.url()).await?);
        }
        // An app takes clients once it has subscribed to Redis (/healthz 200); until then it
        // refuses WebSockets with 503.
        for app in &apps {
            let addr = app.addr("http");
            eventually(
                &format!("{addr}/healthz to answer 200"),
                Duration::from_secs(10),
                || async move { Ok(http_get(addr, "/healthz").await?.0 == 200) },
            )
            .await?;
        }
        let backends: Vec<(String, SocketAddr)> = apps
            .iter()
            .enumerate()
            .map(|(i, app)| (format!("app{}", i + 1), app.addr("http")))
            .collect();
        let lb_toml = dir.path().join("lb.toml");
        std::fs::write(
            &lb_toml,
            lb_config(
                "127.0.0.1:0",
                &dir.path().join("certs/server.pem"),
                &backends,
            ),
        )?;
        let mut cmd = Command::new(workspace_bin("lb")?);
        cmd.arg("run").arg("--config").arg(&lb_toml);
        let lb = Proc::spawn("lb", cmd, Ready::Listening(&["https", "admin"])).await?;
        let tls = tls_connector(&dir.path().join("certs/ca.crt"))?;
        Ok(Stack {
            dir,
            redis,
            apps,
            lb,
            tls,
        })
    }

    /// The chat WebSocket URL through `lb`.
    pub fn url(&self) -> String {
        format!("wss://{}/ws", self.lb.addr("https"))
    }

    /// The CA certificate clients trust.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("certs/ca.crt")
    }

    /// A new chat client through `lb`.
    pub async fn client(&self) -> Result<ChatClient> {
        ChatClient::connect(&self.url(), Some(&self.tls)).await
    }

    /// `lb`'s current view of the backends.
    pub async fn backends(&self) -> Result<Vec<BackendView>> {
        lb_backends(self.lb.addr("admin")).await
    }

    /// Waits until `lb` reports `total` open WebSocket tunnels over all backends (its counts
    /// change just after a client's handshake completes or its connection ends) and returns
    /// how many each backend holds, in configuration order.
    pub async fn tunnels(&self, total: u64) -> Result<Vec<u64>> {
        let last = Mutex::new(Vec::new());
        let counted = eventually(
            &format!("{total} tunnels"),
            Duration::from_secs(10),
            || async {
                let counts: Vec<u64> = self
                    .backends()
                    .await?
                    .iter()
                    .map(|b| b.tunnels_active)
                    .collect();
                let reached = counts.iter().sum::<u64>() == total;
                *last.lock().unwrap_or_else(PoisonError::into_inner) = counts;
                Ok(reached)
            },
        )
        .await;
        let counts = last.into_inner().unwrap_or_else(PoisonError::into_inner);
        counted.with_context(|| format!("lb holds tunnels {counts:?}, expected {total} in all"))?;
        Ok(counts)
    }

    /// Waits until `lb` reports backend `name` up (`true`) or down (`false`).
    pub async fn wait_backend(&self, name: &str, up: bool) -> Result<()> {
        let admin = self.lb.addr("admin");
        eventually(
            &format!("{name} up={up}"),
            Duration::from_secs(10),
            || async move {
                let backends = lb_backends(admin).await?;
                Ok(backends.iter().any(|b| b.name == name && b.up == up))
            },
        )
        .await
    }
}
