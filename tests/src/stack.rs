//! The whole product on loopback: certificates from `lb certs generate`, one `redis-server`, two
//! (or more) `app` processes and one `lb` in front of them with fast health checks, all real
//! processes on ephemeral ports. Tests drive it through `wss://` with [`crate::client`] and
//! read `lb`'s view of the backends from its admin `/stats`. The faults of the chaos driver are
//! methods here: an app killed or drained and started again on its port, `lb` reloaded with a
//! new configuration or restarted on its ports, Redis (in [`Stack::redis`]) stopped and started.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use tempfile::TempDir;
use tokio::process::Command;
use tokio_rustls::TlsConnector;

use crate::client::{ChatClient, tls_connector};
use crate::cluster::RedisCluster;
use testkit::http::http_get;
use testkit::process::{Proc, Ready, workspace_bin};
use testkit::redis::{self, Persistence, Redis};
use testkit::wait::eventually;

/// The Redis channel the apps share (the app's default `redis_channel`).
pub const CHANNEL: &str = "simple-chat";
/// How long an app or `lb` may take to drain and exit after SIGTERM.
const EXIT_WITHIN: Duration = Duration::from_secs(15);
/// How long a (re)started part may take to become ready, as the others see it.
const READY_WITHIN: Duration = Duration::from_secs(10);

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
    start_app_on(name, config, redis_url, "127.0.0.1:0").await
}

/// Starts an `app` process listening on `listen` (`127.0.0.1:0` for an ephemeral port, or the
/// port an earlier instance had).
pub async fn start_app_on(
    name: &str,
    config: &Path,
    redis_url: &str,
    listen: &str,
) -> Result<Proc> {
    let mut cmd = Command::new(workspace_bin("app")?);
    cmd.arg("--config")
        .arg(config)
        .args(["--listen", listen, "--redis", redis_url]);
    Proc::spawn(name, cmd, Ready::Listening(&["http"])).await
}

/// `lb`'s configuration for a test: TLS on `https` (an ephemeral port: `127.0.0.1:0`), admin on
/// an ephemeral loopback port, the given backends, round-robin, health checks every 100 ms
/// (down after 2 failures, up after 1 pass).
pub fn lb_config(https: &str, pem: &Path, backends: &[(String, SocketAddr)]) -> String {
    let weighted: Vec<(String, SocketAddr, u32)> = backends
        .iter()
        .map(|(name, addr)| (name.clone(), *addr, 1))
        .collect();
    lb_config_weighted(https, "127.0.0.1:0", pem, &weighted)
}

/// Like [`lb_config`], with the admin address and each backend's weight given.
pub fn lb_config_weighted(
    https: &str,
    admin: &str,
    pem: &Path,
    backends: &[(String, SocketAddr, u32)],
) -> String {
    let mut text = format!(
        "[listen]\nhttps = \"{https}\"\nadmin = \"{admin}\"\n\n\
         [[certificates]]\npem = {pem:?}\n\n\
         [balance]\npolicy = \"round-robin\"\n\n\
         [health]\ninterval = \"100ms\"\ntimeout = \"500ms\"\nrise = 1\nfall = 2\n\n\
         [timeouts]\ndrain_grace = \"1s\"\n",
        pem = pem.display().to_string()
    );
    for (name, addr, weight) in backends {
        text.push_str(&format!(
            "\n[[backends]]\nname = \"{name}\"\naddr = \"{addr}\"\nweight = {weight}\n"
        ));
    }
    text
}

/// Starts `lb` with the configuration file `config`.
async fn start_lb(config: &Path) -> Result<Proc> {
    let mut cmd = Command::new(workspace_bin("lb")?);
    cmd.arg("run").arg("--config").arg(config);
    Proc::spawn("lb", cmd, Ready::Listening(&["https", "admin"])).await
}

/// One backend as `lb` reports it on `/stats`.
#[derive(Debug, Deserialize)]
pub struct BackendView {
    /// Its configured name.
    pub name: String,
    /// Whether health checks currently pass.
    pub up: bool,
    /// Its weight in the balancing.
    pub weight: u32,
    /// WebSocket tunnels open through it now.
    pub tunnels_active: u64,
    /// Failed connects from the proxy.
    pub connect_failures: u64,
}

#[derive(Deserialize)]
struct StatsView {
    backends: Vec<BackendView>,
}

/// Fetches `lb`'s `/stats` from its admin listener.
pub async fn lb_backends(admin: SocketAddr) -> Result<Vec<BackendView>> {
    let body = http_get(admin, "/stats").await?.text();
    let stats: StatsView = serde_json::from_str(&body).context("bad /stats JSON")?;
    Ok(stats.backends)
}

/// The value of `lb`'s `/metrics` sample `series` (name and labels as printed) from its admin
/// listener `admin`; 0 when absent.
pub async fn lb_metric(admin: SocketAddr, series: &str) -> Result<f64> {
    let body = http_get(admin, "/metrics").await?.text();
    for line in body.lines() {
        if let Some(value) = line
            .strip_prefix(series)
            .and_then(|rest| rest.strip_prefix(' '))
        {
            return value.trim().parse().context("bad metric value");
        }
    }
    Ok(0.0)
}

/// `lb`'s ACME orders with `result` (`ok`, `failed`): `lb_acme_orders_total{result}`.
pub async fn lb_acme_orders(admin: SocketAddr, result: &str) -> Result<f64> {
    let series = format!("lb_acme_orders_total{{result=\"{result}\"}}");
    lb_metric(admin, &series).await
}

/// Waits until the app at `addr` answers 200 on `/healthz`: it has subscribed to Redis and takes
/// clients (until then it refuses WebSockets with 503).
pub async fn wait_healthy(addr: SocketAddr) -> Result<()> {
    eventually(
        &format!("{addr}/healthz to answer 200"),
        READY_WITHIN,
        || async move { Ok(http_get(addr, "/healthz").await?.status == 200) },
    )
    .await
}

/// What a [`Stack`] is made of.
#[derive(Debug, Clone)]
pub struct Options {
    /// How many apps behind `lb`.
    pub apps: usize,
    /// Lines appended to the apps' test configuration ([`app_config`]), e.g.
    /// `history_messages = 5`.
    pub app_config: String,
    /// How Redis keeps its data (a single server).
    pub redis: Persistence,
    /// A Redis Cluster instead of a single server: this many primaries, each with this many
    /// replicas.
    pub cluster: Option<(usize, usize)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            apps: 2,
            app_config: String::new(),
            redis: Persistence::default(),
            cluster: None,
        }
    }
}

/// The Redis behind the apps.
pub enum Backing {
    /// One server.
    One(Box<Redis>),
    /// A cluster.
    Cluster(RedisCluster),
}

impl Backing {
    /// One server keeping its data as `persistence` says, or, with `cluster` (primaries,
    /// replicas each), a cluster.
    pub async fn start(
        persistence: Persistence,
        cluster: Option<(usize, usize)>,
    ) -> Result<Backing> {
        Ok(match cluster {
            None => Backing::One(Box::new(
                Redis::start_with(redis::Options {
                    persistence,
                    ..redis::Options::default()
                })
                .await?,
            )),
            Some((masters, replicas)) => {
                Backing::Cluster(RedisCluster::start(masters, replicas).await?)
            }
        })
    }

    /// The process ids of the running server or nodes.
    pub fn pids(&self) -> Vec<u32> {
        match self {
            Backing::One(redis) => redis.pid().into_iter().collect(),
            Backing::Cluster(cluster) => cluster.pids(),
        }
    }

    /// The URL the apps are given.
    pub fn url(&self) -> String {
        match self {
            Backing::One(redis) => redis.url(),
            Backing::Cluster(cluster) => cluster.url(),
        }
    }

    /// The single server; an error for a cluster.
    pub fn one(&mut self) -> Result<&mut Redis> {
        match self {
            Backing::One(redis) => Ok(redis),
            Backing::Cluster(_) => bail!("this stack runs a Redis Cluster, not one server"),
        }
    }

    /// The cluster; an error for a single server.
    pub fn cluster(&mut self) -> Result<&mut RedisCluster> {
        match self {
            Backing::Cluster(cluster) => Ok(cluster),
            Backing::One(_) => bail!("this stack runs one Redis server, not a cluster"),
        }
    }
}

/// The running stack.
pub struct Stack {
    /// Holds certificates and configs; removed at the end.
    pub dir: TempDir,
    /// The shared Redis.
    pub redis: Backing,
    /// The app processes, `app1`, `app2`, ...
    pub apps: Vec<Proc>,
    /// The load balancer.
    pub lb: Proc,
    /// Trusts the generated CA.
    pub tls: TlsConnector,
    /// Each app's weight in `lb`'s configuration, in the order of `apps`.
    weights: Vec<u32>,
}

impl Stack {
    /// Starts Redis, `n_apps` apps and `lb` in front of them.
    pub async fn start(n_apps: usize) -> Result<Stack> {
        Self::start_with(&Options {
            apps: n_apps,
            ..Options::default()
        })
        .await
    }

    /// Starts the stack `options` describe.
    pub async fn start_with(options: &Options) -> Result<Stack> {
        let dir = tempfile::tempdir()?;
        generate_certs(&dir.path().join("certs"), &["localhost", "127.0.0.1"]).await?;
        let redis = Backing::start(options.redis, options.cluster).await?;
        let app_toml = dir.path().join("app.toml");
        std::fs::write(
            &app_toml,
            format!("{}{}\n", app_config(), options.app_config),
        )?;
        let mut apps = Vec::new();
        for i in 1..=options.apps {
            apps.push(start_app(&format!("app{i}"), &app_toml, &redis.url()).await?);
        }
        for app in &apps {
            wait_healthy(app.addr("http")).await?;
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
        let lb = start_lb(&lb_toml).await?;
        let tls = tls_connector(&dir.path().join("certs/ca.crt"))?;
        Ok(Stack {
            dir,
            redis,
            weights: vec![1; apps.len()],
            apps,
            lb,
            tls,
        })
    }

    /// The configured name of app `i` (0-based): `app1`, `app2`, ...
    pub fn app_name(i: usize) -> String {
        format!("app{}", i + 1)
    }

    /// Kills app `i` (SIGKILL: no drain, its clients' connections just end).
    pub async fn kill_app(&mut self, i: usize) {
        self.apps[i].kill().await;
    }

    /// Drains app `i` (SIGTERM) and waits until it has exited.
    pub async fn drain_app(&mut self, i: usize) -> Result<()> {
        self.apps[i].terminate(EXIT_WITHIN).await?;
        Ok(())
    }

    /// Starts app `i`, which has exited, again on its port, and waits until it is healthy and
    /// `lb` counts it up.
    pub async fn restart_app(&mut self, i: usize) -> Result<()> {
        let name = Self::app_name(i);
        let addr = self.apps[i].addr("http");
        let app_toml = self.dir.path().join("app.toml");
        self.apps[i] = start_app_on(&name, &app_toml, &self.redis.url(), &addr.to_string()).await?;
        wait_healthy(addr).await?;
        self.wait_backend(&name, true).await
    }

    /// Rewrites `lb`'s configuration with these backend weights (one per app) and its own
    /// listener addresses, sends it SIGHUP, and waits until `/stats` shows the new weights.
    pub async fn reload_lb(&mut self, weights: &[u32]) -> Result<()> {
        if weights.len() != self.apps.len() {
            bail!("{} weights for {} apps", weights.len(), self.apps.len());
        }
        self.weights = weights.to_vec();
        self.write_lb_config()?;
        self.lb.signal("HUP")?;
        let admin = self.lb.addr("admin");
        eventually("lb to apply the new weights", READY_WITHIN, || async move {
            let shown: Vec<u32> = lb_backends(admin).await?.iter().map(|b| b.weight).collect();
            Ok(shown == weights)
        })
        .await
    }

    /// Drains `lb` (SIGTERM), waits until it has exited, and starts it again on the same ports.
    pub async fn restart_lb(&mut self) -> Result<()> {
        self.write_lb_config()?;
        self.lb.terminate(EXIT_WITHIN).await?;
        let (https, admin) = (self.lb.addr("https"), self.lb.addr("admin"));
        self.lb = start_lb(&self.dir.path().join("lb.toml")).await?;
        if (self.lb.addr("https"), self.lb.addr("admin")) != (https, admin) {
            bail!("lb came back on other ports");
        }
        Ok(())
    }

    /// Writes `lb.toml` with the listeners `lb` has bound and the current weights, so that a
    /// reload or a restart keeps the same ports.
    fn write_lb_config(&self) -> Result<()> {
        let backends: Vec<(String, SocketAddr, u32)> = self
            .apps
            .iter()
            .zip(&self.weights)
            .enumerate()
            .map(|(i, (app, weight))| (Self::app_name(i), app.addr("http"), *weight))
            .collect();
        let text = lb_config_weighted(
            &self.lb.addr("https").to_string(),
            &self.lb.addr("admin").to_string(),
            &self.dir.path().join("certs/server.pem"),
            &backends,
        );
        std::fs::write(self.dir.path().join("lb.toml"), text).context("cannot write lb.toml")
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
