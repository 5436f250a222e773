//! The chaos driver: the whole stack on loopback under chat load, one fault injected, and an
//! account of every message.
//!
//! [`run`] starts a [`Stack`] (Redis with its append-only file, two apps, `lb`), a [`Witness`]
//! subscribed straight to Redis, and [`Config::clients`] reconnecting clients through `lb` over
//! `wss://`, the first [`Config::senders`] of which also send, together
//! [`Config::rate`] messages per second for [`Config::duration`]. At [`Config::fault_at`] the
//! [`Scenario`]'s fault is injected. After the sending window the run waits (bounded by
//! [`Config::drain`] after the last publication) until every client holds every message
//! published after it first connected and every send is acknowledged, then counts (see
//! [`report`]). Each message's content is `RUN:SENDER:SEQ:CREATED_NS`, which identifies it
//! everywhere: in the witness, in each client, in the senders' retries.
//!
//! [`drive`] is the same load and account against any [`Target`] (a chat URL, the CA to trust,
//! the Redis to watch) with any fault: the HA pair test runs it through a virtual IP in network
//! namespaces and fails an lb host over.
//!
//! With resume (the default) clients follow the zero-loss protocol (`/ws?resume`, then
//! `/ws?epoch=E&last=ID` on every reconnect) and senders retry every unacknowledged send with its
//! `cid`; without it they speak the original protocol (plain `/ws`, no `cid`, no retries).

mod client;
pub mod report;
pub mod witness;

use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;

use crate::stack::{CHANNEL, Options, Stack};
use client::{ClientLog, Outbox, Plan};
pub use report::{Report, Runs};
use testkit::redis::Persistence;
use witness::{Witness, lock};

/// How often the drain checks whether everything arrived.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// The drain never lasts longer than this after the sending window, whatever happens.
const DRAIN_CAP: Duration = Duration::from_secs(30);
/// How long Redis stays down in [`Scenario::RedisRestart`].
const REDIS_DOWN: Duration = Duration::from_secs(2);
/// Longest wait for every client's first connection.
const CONNECT_ALL_WITHIN: Duration = Duration::from_secs(60);
/// What an app logs when it followed a room's channel to the slot's new owner.
const RESUBSCRIBED: &str = "resubscribed to a room whose slot moved";
/// Longest wait for that line after the slot moved.
const RESUBSCRIBED_WITHIN: Duration = Duration::from_secs(15);

/// One fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scenario {
    /// No fault: the baseline.
    None,
    /// `app1` killed (SIGKILL) and started again on its port.
    KillApp,
    /// `app1` drained (SIGTERM: 503, then 1001 to its clients after the grace), exited, and
    /// started again on its port.
    DrainApp,
    /// Redis shut down (its append-only file written), started again [`REDIS_DOWN`] later.
    RedisRestart,
    /// `lb`'s configuration rewritten (`app1`'s weight 1 → 3) and applied with SIGHUP.
    LbReload,
    /// Both apps drained and restarted, one after the other.
    RollingRestart,
    /// `lb` drained (SIGTERM), exited, and started again on its ports.
    LbRestart,
    /// On a Redis Cluster (three primaries, one replica each): the primary owning the chat
    /// channel's slot killed (SIGKILL); its replica takes over.
    ShardFailover,
    /// On a Redis Cluster: the chat channel's slot, with its history, moved to another primary
    /// under load.
    SlotMigration,
}

impl Scenario {
    /// Every scenario, in report order.
    pub const ALL: [Scenario; 9] = [
        Scenario::None,
        Scenario::KillApp,
        Scenario::DrainApp,
        Scenario::RedisRestart,
        Scenario::LbReload,
        Scenario::RollingRestart,
        Scenario::LbRestart,
        Scenario::ShardFailover,
        Scenario::SlotMigration,
    ];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Scenario::None => "none",
            Scenario::KillApp => "kill-app",
            Scenario::DrainApp => "drain-app",
            Scenario::RedisRestart => "redis-restart",
            Scenario::LbReload => "lb-reload",
            Scenario::RollingRestart => "rolling-restart",
            Scenario::LbRestart => "lb-restart",
            Scenario::ShardFailover => "shard-failover",
            Scenario::SlotMigration => "slot-migration",
        }
    }

    /// The cluster shape (primaries, replicas each) the scenario runs on; `None`: one server.
    pub fn cluster(self) -> Option<(usize, usize)> {
        match self {
            Scenario::ShardFailover => Some((3, 1)),
            Scenario::SlotMigration => Some((3, 0)),
            _ => None,
        }
    }

    /// Injects the fault into `stack` and waits until the stack is whole again; says what
    /// was done.
    async fn inject(self, stack: &mut Stack) -> Result<String> {
        Ok(match self {
            Scenario::None => "nothing".to_owned(),
            Scenario::KillApp => {
                stack.kill_app(0).await;
                stack.restart_app(0).await?;
                "app1 SIGKILL, restarted on its port".to_owned()
            }
            Scenario::DrainApp => {
                stack.drain_app(0).await?;
                stack.restart_app(0).await?;
                "app1 SIGTERM (drained, exited), restarted on its port".to_owned()
            }
            Scenario::RedisRestart => {
                stack.redis.one()?.shutdown().await?;
                tokio::time::sleep(REDIS_DOWN).await;
                stack.redis.one()?.restart().await?;
                format!("Redis shut down, restarted {REDIS_DOWN:?} later (AOF everysec)")
            }
            Scenario::LbReload => {
                stack.reload_lb(&[3, 1]).await?;
                "lb.toml rewritten (app1 weight 3), SIGHUP".to_owned()
            }
            Scenario::RollingRestart => {
                for i in 0..stack.apps.len() {
                    stack.drain_app(i).await?;
                    stack.restart_app(i).await?;
                }
                "app1 then app2: SIGTERM, exited, restarted on its port".to_owned()
            }
            Scenario::LbRestart => {
                stack.restart_lb().await?;
                "lb SIGTERM (drained, exited), restarted on its ports".to_owned()
            }
            Scenario::ShardFailover => {
                let cluster = stack.redis.cluster()?;
                let slot = cluster.slot(CHANNEL).await?;
                let owner = cluster.owner(slot).await?;
                cluster.kill(owner).await;
                let replica = cluster.wait_failover(slot, owner).await?;
                format!(
                    "primary of slot {slot} (node {owner}) SIGKILL; replica node {replica} took over"
                )
            }
            Scenario::SlotMigration => {
                let cluster = stack.redis.cluster()?;
                let slot = cluster.slot(CHANNEL).await?;
                let owner = cluster.owner(slot).await?;
                let to = cluster
                    .masters()
                    .await?
                    .into_iter()
                    .find(|&m| m != owner)
                    .context("no other primary")?;
                cluster.migrate(slot, to).await?;
                // The fault happened to the apps too: each was subscribed on the old owner,
                // was dropped from the channel there, and subscribed again on the new one.
                for app in &stack.apps {
                    app.log()
                        .wait_for(RESUBSCRIBED, RESUBSCRIBED_WITHIN)
                        .await
                        .context("an app did not resubscribe after the slot moved")?;
                }
                format!(
                    "slot {slot} with its keys moved from node {owner} to node {to}; \
                     every app resubscribed"
                )
            }
        })
    }
}

impl FromStr for Scenario {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scenario::ALL
            .into_iter()
            .find(|s| s.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Scenario::ALL.iter().map(|s| s.name()).collect();
                format!("unknown scenario {text:?}; one of {}", names.join(", "))
            })
    }
}

impl std::fmt::Display for Scenario {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One run.
#[derive(Debug, Clone)]
pub struct Config {
    /// The fault.
    pub scenario: Scenario,
    /// Clients and senders use the zero-loss protocol (resume, `cid`, retries).
    pub resume: bool,
    /// Receiving clients (senders included).
    pub clients: usize,
    /// How many of the clients also send.
    pub senders: usize,
    /// Messages per second over all senders.
    pub rate: f64,
    /// Sending window.
    pub duration: Duration,
    /// When the fault is injected, from the start of the sending window.
    pub fault_at: Duration,
    /// After the sending window, wait at most this long after the last publication for the
    /// last deliveries and acknowledgements.
    pub drain: Duration,
    /// With resume, each client sends a heartbeat (an empty frame) this often, as the page does
    /// every 15 s: how a client that only receives finds out that its path is gone.
    pub heartbeat: Duration,
    /// Token mode: the apps verify tokens and every client signs in with one that lasts this
    /// long, refreshing it on the same socket when the server asks (a third of it ahead).
    pub token_ttl: Option<Duration>,
}

impl Config {
    /// The defaults for `scenario`: 200 clients, 10 senders, 50 msg/s, 20 s, fault at 8 s,
    /// drain 3 s, with resume.
    pub fn new(scenario: Scenario) -> Config {
        Config {
            scenario,
            resume: true,
            clients: 200,
            senders: 10,
            rate: 50.0,
            duration: Duration::from_secs(20),
            fault_at: Duration::from_secs(8),
            drain: Duration::from_secs(3),
            heartbeat: Duration::from_secs(15),
            token_ttl: None,
        }
    }

    fn check(&self) -> Result<()> {
        if self.senders == 0 || self.senders > self.clients {
            bail!("need 1 <= senders <= clients");
        }
        if !self.rate.is_finite() || self.rate <= 0.0 {
            bail!("the rate must be positive");
        }
        if self.fault_at > self.duration {
            bail!("the fault must come within the sending window");
        }
        if self
            .token_ttl
            .is_some_and(|ttl| ttl < Duration::from_secs(3))
        {
            bail!("tokens must last at least 3 s (the refresh comes a third of it ahead)");
        }
        Ok(())
    }
}

/// Which message: its sender and its sequence number there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key {
    /// The sending client (0-based).
    pub sender: u32,
    /// Its sequence number at that sender (0-based).
    pub seq: u32,
}

/// A message content of this run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Content {
    /// Which message.
    pub key: Key,
    /// When the sender made it, nanoseconds since the Unix epoch.
    pub created_ns: u64,
}

/// The content of message `key` made at `created_ns` in run `run` (read back by
/// [`parse_content`]).
pub fn content(run: u32, key: Key, created_ns: u64) -> String {
    format!("{run}:{}:{}:{created_ns}", key.sender, key.seq)
}

/// Reads a content of run `run`; `None` for anything else.
pub fn parse_content(text: &str, run: u32) -> Option<Content> {
    let mut parts = text.split(':');
    let (Some(r), Some(sender), Some(seq), Some(created), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    if r.parse::<u32>().ok()? != run {
        return None;
    }
    Some(Content {
        key: Key {
            sender: sender.parse().ok()?,
            seq: seq.parse().ok()?,
        },
        created_ns: created.parse().ok()?,
    })
}

/// Nanoseconds since the Unix epoch.
pub fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or_default()
}

/// Where a run's load goes.
#[derive(Clone)]
pub struct Target {
    /// The chat's `wss://.../ws` URL.
    pub url: String,
    /// Trusts the certificate behind `url`.
    pub tls: TlsConnector,
    /// The Redis the apps share, for the witness.
    pub redis_url: String,
    /// Token mode: what the clients sign in with.
    pub tokens: Option<Arc<Tokens>>,
}

/// Token mode's keys: an HS256 secret in a file the apps read, and the tokens clients get.
pub struct Tokens {
    dir: tempfile::TempDir,
    secret: Vec<u8>,
    ttl: Duration,
}

impl Tokens {
    /// A fresh secret; tokens last `ttl`.
    pub fn new(ttl: Duration) -> Result<Tokens> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir()?;
        let mut secret = vec![0u8; 48];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
            .map_err(|_| anyhow::anyhow!("no randomness for the token secret"))?;
        let path = dir.path().join("token.secret");
        std::fs::write(&path, &secret)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Tokens { dir, secret, ttl })
    }

    /// The apps' `[auth]`: token mode with this secret, the refresh a third of the lifetime
    /// ahead of expiry.
    pub fn app_config(&self) -> String {
        format!(
            "[auth]\nmode = \"token\"\nsecret_file = \"{}\"\nrefresh_before = \"{}s\"\n",
            self.dir.path().join("token.secret").display(),
            (self.ttl.as_secs() / 3).max(1),
        )
    }

    /// A token for user `name` (also its display name), valid from now for the lifetime.
    pub fn mint(&self, name: &str) -> Result<String> {
        let now = unix_nanos() / 1_000_000_000;
        let claims = serde_json::json!({
            "sub": name, "name": name, "iat": now, "exp": now + self.ttl.as_secs(),
        });
        let key = jsonwebtoken::EncodingKey::from_secret(&self.secret)?;
        Ok(jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &key,
        )?)
    }
}

/// Runs one scenario on a [`Stack`] of its own and reports.
pub async fn run(config: &Config) -> Result<Report> {
    config.check()?;
    let tokens = config.token_ttl.map(Tokens::new).transpose()?;
    let mut stack = Stack::start_with(&Options {
        redis: Persistence::EverySec,
        cluster: config.scenario.cluster(),
        app_config: tokens.as_ref().map(Tokens::app_config).unwrap_or_default(),
        ..Options::default()
    })
    .await?;
    let target = Target {
        url: stack.url(),
        tls: stack.tls.clone(),
        redis_url: stack.redis.url(),
        tokens: tokens.map(Arc::new),
    };
    let scenario = config.scenario;
    drive(
        config,
        scenario.name(),
        &target,
        scenario.inject(&mut stack),
    )
    .await
}

/// Runs the load of `config` against `target` (`config.scenario` is not used), starts `fault`
/// at `config.fault_at`, and reports under the name `scenario`. `fault` does its harm, waits
/// until the system is whole again and says what it did.
pub async fn drive(
    config: &Config,
    scenario: &str,
    target: &Target,
    fault: impl Future<Output = Result<String>>,
) -> Result<Report> {
    config.check()?;
    let run = (unix_nanos() % u64::from(u32::MAX)) as u32;
    let witness = Witness::start(&target.redis_url, run).await?;
    let plan = Arc::new(Plan {
        url: target.url.clone(),
        tls: target.tls.clone(),
        resume: config.resume,
        run,
        senders: config.senders,
        per_sender: (config.duration.as_secs_f64() * config.rate / config.senders as f64).ceil()
            as usize
            + 2,
        heartbeat: config.resume.then_some(config.heartbeat),
        tokens: target.tokens.clone(),
    });

    // Every client connects first.
    let stop = CancellationToken::new();
    let mut logs = Vec::with_capacity(config.clients);
    let mut clocks = Vec::new();
    let mut tasks = Vec::with_capacity(config.clients);
    for i in 0..config.clients {
        let log = Arc::new(Mutex::new(ClientLog::new(plan.senders, plan.per_sender)));
        let outbox = (i < config.senders).then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            clocks.push(tx);
            Outbox::new(i as u32, rx)
        });
        tasks.push(tokio::spawn(client::run(
            i,
            Arc::clone(&plan),
            Arc::clone(&log),
            witness.counter(),
            outbox,
            stop.clone(),
        )));
        logs.push(log);
    }
    let connect_deadline = Instant::now() + CONNECT_ALL_WITHIN;
    // A client is ready once the app serves it: its resume notice came, or (original protocol)
    // the app answered its ping.
    while logs.iter().any(|l| lock(l).first.is_none()) && Instant::now() < connect_deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }

    // The sending window, with the fault.
    let start = Instant::now();
    let end = start + config.duration;
    let period = Duration::from_secs_f64(config.senders as f64 / config.rate);
    for (i, tx) in clocks.into_iter().enumerate() {
        // Senders evenly staggered over one period so the total rate is smooth.
        let first = start + period.mul_f64(i as f64 / config.senders as f64);
        tokio::spawn(clock(
            Key {
                sender: i as u32,
                seq: 0,
            },
            run,
            first,
            period,
            end,
            plan.per_sender,
            tx,
        ));
    }
    let fault_at = start + config.fault_at;
    let fault = async {
        tokio::time::sleep_until(fault_at).await;
        let began = Instant::now();
        fault.await.map(|what| (what, began.elapsed()))
    };
    let (fault, ()) = tokio::join!(fault, tokio::time::sleep_until(end));
    let (fault, fault_took) = fault.with_context(|| format!("injecting {scenario}"))?;

    // The drain: until everything arrived, or `drain` after the last publication.
    let cap = Instant::now().max(end) + DRAIN_CAP;
    loop {
        let last = witness.last_at().unwrap_or(end).max(end);
        if Instant::now() >= (last + config.drain).min(cap)
            || complete(&witness, &logs, config.resume)
        {
            break;
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
    stop.cancel();
    for task in tasks {
        task.await.context("a client task panicked")?;
    }
    let seen = witness.finish().await;
    let logs: Vec<ClientLog> = logs.iter().map(|l| std::mem::take(&mut *lock(l))).collect();
    Ok(report::tally(
        config, scenario, fault, fault_took, &seen, &logs,
    ))
}

/// True when every send was acknowledged (with resume) and every client holds every message
/// published after its first connection. With resume, every acknowledged message is published,
/// so the witness must have seen them all first: when a fault took the witness's subscription
/// too (a cluster failover), what it has seen so far is not yet everything.
fn complete(witness: &Witness, logs: &[Arc<Mutex<ClientLog>>], resume: bool) -> bool {
    let seen = lock(witness.seen());
    if resume {
        let acked: u64 = logs.iter().map(|log| lock(log).sent).sum();
        if (seen.messages.len() as u64) < acked {
            return false;
        }
    }
    logs.iter().all(|log| {
        let log = lock(log);
        log.pending == 0
            && log.first.is_none_or(|first| {
                seen.messages
                    .get(first..)
                    .unwrap_or_default()
                    .iter()
                    .all(|m| log.has(m.key))
            })
    })
}

/// A sender's clock: makes message `seq` = 0, 1, ... every `period` from `first` until `end`.
async fn clock(
    mut key: Key,
    run: u32,
    first: Instant,
    period: Duration,
    end: Instant,
    limit: usize,
    tx: mpsc::UnboundedSender<(Key, String)>,
) {
    let mut ticks = tokio::time::interval_at(first, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Burst);
    while (key.seq as usize) < limit {
        if ticks.tick().await >= end {
            break;
        }
        if tx.send((key, content(run, key, unix_nanos()))).is_err() {
            break;
        }
        key.seq += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn contents_of_this_run_only() {
        let key = Key { sender: 3, seq: 41 };
        let text = content(7, key, 123);
        assert_eq!(text, "7:3:41:123");
        assert_eq!(
            parse_content(&text, 7),
            Some(Content {
                key,
                created_ns: 123
            })
        );
        for other in [
            "8:3:41:123",
            "7:3:41",
            "7:3:41:123:9",
            "7:x:41:123",
            "hello",
            "",
        ] {
            assert_eq!(parse_content(other, 7), None, "{other}");
        }
    }

    #[test]
    fn scenarios_by_name() {
        for scenario in Scenario::ALL {
            assert_eq!(scenario.name().parse::<Scenario>(), Ok(scenario));
        }
        let err = "kill".parse::<Scenario>().unwrap_err();
        assert!(err.contains("kill-app"), "{err}");
    }
}
