//! `bench shards`: the chat spread over many rooms, on one Redis server and on Redis Clusters
//! of more primaries, and what an instance saves by subscribing only to the rooms it has
//! members in.
//!
//! Each run starts its own Redis (one `redis-server`, or a cluster of N primaries without
//! replicas, from the test harness), two `app` instances (the binary next to this one) and a
//! [`fanout`] load of `--clients` clients over `--rooms` rooms (`/ws?room=rK`), one sender per
//! room, `--rate` messages per second in all. Layouts are interleaved within each repetition
//! and every figure is the median over the repetitions.
//!
//! - **Shards**: every room has members on both instances. Per layout: deliveries per second,
//!   loss, latency, Redis CPU per message over all nodes, the busiest node's share of a core
//!   (what limits the layout: one primary runs one room's scripts and publishes), and the
//!   instances' CPU per delivery.
//! - **Subscriptions**: one Redis server; the first half of the rooms has its members on the
//!   first instance, the second half on the second. "Per room" is the product as built: each
//!   instance subscribes to its own rooms only. "Every room" is the single-channel design's
//!   cost: before the load, one client joins each of the other instance's rooms and leaves
//!   again, and with `room_linger` long the instance stays subscribed, so it receives, parses
//!   and routes every message of every room and delivers the foreign ones to nobody. The
//!   difference is the CPU an instance saves.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use ::tests::client::ChatClient;
use ::tests::stack::{Backing, app_config, start_app, wait_healthy};
use anyhow::Context;
use serde::Serialize;
use testkit::process::Proc;
use testkit::redis::Persistence;

use crate::fanout;
use crate::procstat::Watch;
use crate::summary;
use crate::tokens;

/// Options of `bench shards`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Primaries of each layout; 1 is one plain redis-server (no cluster).
    #[arg(long, value_delimiter = ',', default_value = "1,3,6")]
    shards: Vec<usize>,
    /// Connected clients, spread evenly over the rooms.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Rooms, each with one sender.
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    /// Total messages per second over all rooms.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Sending time of each run.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Repetitions (each layout once per repetition, interleaved).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

/// One layout's medians.
#[derive(Debug, Serialize)]
pub struct ShardRow {
    /// Primaries (1: one plain server).
    pub shards: usize,
    /// Deliveries per second.
    pub deliveries_per_s: f64,
    /// Deliveries expected but not received, summed over the repetitions.
    pub lost: u64,
    /// Median delivery latency, ms.
    pub p50_ms: f64,
    /// 99th percentile delivery latency, ms.
    pub p99_ms: f64,
    /// Redis CPU (all nodes) per message, µs.
    pub redis_us_per_message: f64,
    /// The busiest node's CPU, in cores.
    pub busiest_node_cores: f64,
    /// The instances' CPU per delivery, µs.
    pub app_us_per_delivery: f64,
    /// Cores busy on the whole machine.
    pub machine_cores: f64,
}

/// One subscription mode's medians.
#[derive(Debug, Serialize)]
pub struct SubscriptionRow {
    /// `per room` or `every room`.
    pub mode: &'static str,
    /// Messages each instance receives from Redis per second, by construction (the rate over
    /// the rooms it subscribes to), not measured.
    pub received_per_s: f64,
    /// Both instances' CPU, in cores.
    pub app_cores: f64,
    /// The instances' CPU per delivery, µs.
    pub app_us_per_delivery: f64,
    /// Deliveries expected but not received, summed over the repetitions.
    pub lost: u64,
}

/// What `bench shards` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Clients, rooms, rate and duration of every run.
    pub clients: usize,
    /// Rooms.
    pub rooms: usize,
    /// Messages per second.
    pub rate: f64,
    /// Seconds of sending per run.
    pub duration_s: f64,
    /// Repetitions.
    pub reps: usize,
    /// One row per layout.
    pub shards: Vec<ShardRow>,
    /// Per-room subscriptions against every room.
    pub subscriptions: Vec<SubscriptionRow>,
}

/// One plain server for 1 shard (append-only file fsynced every second, as deployed), a
/// cluster of `shards` primaries without replicas otherwise.
async fn start_backing(shards: usize) -> anyhow::Result<Backing> {
    Backing::start(Persistence::EverySec, (shards > 1).then_some((shards, 0))).await
}

/// Two instances on `backing`, healthy.
async fn start_apps(dir: &Path, backing: &Backing) -> anyhow::Result<[Proc; 2]> {
    let toml = dir.join("app.toml");
    std::fs::write(
        &toml,
        format!("{}max_rooms = 10000\nroom_linger = \"1h\"\n", app_config()),
    )?;
    let apps = [
        start_app("app1", &toml, &backing.url()).await?,
        start_app("app2", &toml, &backing.url()).await?,
    ];
    for app in &apps {
        wait_healthy(app.addr("http")).await?;
    }
    Ok(apps)
}

fn room_url(app: &Proc, room: usize) -> String {
    format!("ws://{}/ws?room=r{room}", app.addr("http"))
}

fn watch(name: &str, pids: &[u32]) -> anyhow::Result<Watch> {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    Watch::from_str(&format!("{name}={}", pids.join(",")))
}

fn pid(app: &Proc) -> anyhow::Result<u32> {
    app.pid().context("an app exited")
}

impl Args {
    fn load(&self, urls: Vec<String>, watches: Vec<Watch>) -> fanout::Args {
        fanout::Args {
            url: urls,
            ca: None,
            clients: self.clients,
            senders: self.rooms,
            rate: self.rate,
            duration: self.duration,
            drain: Duration::from_secs(3),
            settle: Duration::from_millis(500),
            concurrency: 100,
            watch: watches,
            protocol: crate::protocol::Protocol::Chat,
            pusher_app: None,
            reconnect: false,
            tokens: tokens::TokenArgs::default(),
            fault_point: None,
        }
    }
}

/// One run of the shards figure.
async fn shard_run(args: &Args, shards: usize) -> anyhow::Result<fanout::Report> {
    let dir = tempfile::tempdir()?;
    let backing = start_backing(shards).await?;
    let apps = start_apps(dir.path(), &backing).await?;
    // The senders are the first clients: one per room, on the first instance.
    let urls: Vec<String> = apps
        .iter()
        .flat_map(|app| (0..args.rooms).map(|k| room_url(app, k)))
        .collect();
    let mut watches = vec![
        watch("redis", &backing.pids())?,
        watch("app", &[pid(&apps[0])?, pid(&apps[1])?])?,
    ];
    for (i, node) in backing.pids().iter().enumerate() {
        watches.push(watch(&format!("node{i}"), &[*node])?);
    }
    fanout::run(args.load(urls, watches)).await
}

/// One run of the subscriptions figure; `every_room`: each instance also subscribed to the
/// other's rooms.
async fn subscription_run(args: &Args, every_room: bool) -> anyhow::Result<fanout::Report> {
    let dir = tempfile::tempdir()?;
    let backing = start_backing(1).await?;
    let apps = start_apps(dir.path(), &backing).await?;
    let half = args.rooms / 2;
    let own = |i: usize| if i == 0 { 0..half } else { half..args.rooms };
    if every_room {
        for (i, app) in apps.iter().enumerate() {
            for room in own(1 - i) {
                // The resume notice comes once the room is subscribed and caught up.
                let mut visitor =
                    ChatClient::connect(&format!("{}&resume", room_url(app, room)), None).await?;
                visitor.recv().await?;
            }
        }
    }
    let urls: Vec<String> = (0..args.rooms)
        .map(|k| room_url(&apps[usize::from(k >= half)], k))
        .collect();
    let watches = vec![watch("app", &[pid(&apps[0])?, pid(&apps[1])?])?];
    fanout::run(args.load(urls, watches)).await
}

fn median(values: Vec<f64>) -> f64 {
    summary::median(values).unwrap_or(f64::NAN)
}

/// Runs every layout and both subscription modes `--reps` times, interleaved.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    if args.rooms < 2 || args.clients < args.rooms || args.reps == 0 || args.shards.is_empty() {
        anyhow::bail!("need --rooms >= 2, --clients >= --rooms, --reps >= 1 and some --shards");
    }
    let mut shard_runs: Vec<Vec<fanout::Report>> = args.shards.iter().map(|_| Vec::new()).collect();
    let mut sub_runs: [Vec<fanout::Report>; 2] = [Vec::new(), Vec::new()];
    for rep in 0..args.reps {
        for (i, &shards) in args.shards.iter().enumerate() {
            eprintln!("shards: rep {}/{}: {shards} shard(s)", rep + 1, args.reps);
            shard_runs[i].push(shard_run(&args, shards).await?);
        }
        for (i, every_room) in [false, true].into_iter().enumerate() {
            eprintln!(
                "shards: rep {}/{}: subscriptions, {}",
                rep + 1,
                args.reps,
                if every_room { "every room" } else { "per room" }
            );
            sub_runs[i].push(subscription_run(&args, every_room).await?);
        }
    }
    let shards = args
        .shards
        .iter()
        .zip(&shard_runs)
        .map(|(&shards, runs)| ShardRow {
            shards,
            deliveries_per_s: median(runs.iter().map(|r| r.deliveries_per_s).collect()),
            lost: runs.iter().map(|r| r.lost).sum(),
            p50_ms: median(runs.iter().map(|r| r.latency.p50_ms).collect()),
            p99_ms: median(runs.iter().map(|r| r.latency.p99_ms).collect()),
            redis_us_per_message: median(
                runs.iter()
                    .map(|r| r.measured.watched[0].cpu_seconds * 1e6 / r.sent.max(1) as f64)
                    .collect(),
            ),
            busiest_node_cores: median(
                runs.iter()
                    .map(|r| {
                        r.measured.watched[2..]
                            .iter()
                            .map(|u| u.cores)
                            .fold(0.0, f64::max)
                    })
                    .collect(),
            ),
            app_us_per_delivery: median(runs.iter().map(|r| r.cpu_us_per_delivery[1]).collect()),
            machine_cores: median(runs.iter().map(|r| r.measured.machine_cores).collect()),
        })
        .collect();
    let subscriptions = ["per room", "every room"]
        .into_iter()
        .zip(&sub_runs)
        .map(|(mode, runs)| SubscriptionRow {
            mode,
            received_per_s: if mode == "per room" {
                args.rate / 2.0
            } else {
                args.rate
            },
            app_cores: median(runs.iter().map(|r| r.measured.watched[0].cores).collect()),
            app_us_per_delivery: median(runs.iter().map(|r| r.cpu_us_per_delivery[0]).collect()),
            lost: runs.iter().map(|r| r.lost).sum(),
        })
        .collect();
    Ok(Report {
        clients: args.clients,
        rooms: args.rooms,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        reps: args.reps,
        shards,
        subscriptions,
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "{} clients over {} rooms (one sender each), {} msg/s for {:.0} s, two apps; medians of {}",
            self.clients, self.rooms, self.rate, self.duration_s, self.reps
        )?;
        writeln!(f)?;
        writeln!(
            f,
            "| Redis | deliveries/s | lost | p50 / p99 ms | Redis CPU µs per message (all nodes) | busiest node (cores) | apps µs per delivery | machine cores |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|")?;
        for row in &self.shards {
            let layout = if row.shards <= 1 {
                "1 server".to_owned()
            } else {
                format!("cluster, {} primaries", row.shards)
            };
            writeln!(
                f,
                "| {layout} | {:.0} | {} | {:.1} / {:.1} | {:.1} | {:.3} | {:.2} | {:.2} |",
                row.deliveries_per_s,
                row.lost,
                row.p50_ms,
                row.p99_ms,
                row.redis_us_per_message,
                row.busiest_node_cores,
                row.app_us_per_delivery,
                row.machine_cores
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "| subscriptions (each instance has members in half the rooms) | messages received per instance/s (nominal) | apps (cores) | apps µs per delivery | lost |"
        )?;
        writeln!(f, "|---|---|---|---|---|")?;
        for row in &self.subscriptions {
            writeln!(
                f,
                "| {} | {:.0} | {:.3} | {:.2} | {} |",
                row.mode, row.received_per_s, row.app_cores, row.app_us_per_delivery, row.lost
            )?;
        }
        if let [per_room, every_room] = &self.subscriptions[..] {
            write!(
                f,
                "\nPer-room subscriptions save {:.0} % of the instances' CPU ({:.3} cores) against every instance receiving every room.",
                (1.0 - per_room.app_cores / every_room.app_cores.max(1e-9)) * 100.0,
                every_room.app_cores - per_room.app_cores
            )?;
        }
        Ok(())
    }
}
