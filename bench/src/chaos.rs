//! `bench chaos`: the fault-injection runs of [`tests::chaos`] from the command line.
//!
//! Each scenario (all of them unless `--scenario` names some) runs on a fresh stack (Redis with
//! its append-only file, or a Redis Cluster for the cluster faults, two apps, `lb`, all started from the binaries next to this one), with
//! resume unless `--no-resume`, or both ways with `--compare`; one table row per run.

use std::time::Duration;

use ::tests::chaos::{self, Config, Runs, Scenario};

/// Options of `bench chaos`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Scenario to run (none, kill-app, drain-app, redis-restart, lb-reload, rolling-restart,
    /// lb-restart, shard-failover and slot-migration on a Redis Cluster); repeat for several;
    /// every one when not given.
    #[arg(long = "scenario")]
    scenarios: Vec<Scenario>,
    /// Clients and senders speak the original protocol: plain /ws, no cid, no retries.
    #[arg(long, conflicts_with = "compare")]
    no_resume: bool,
    /// Run each scenario with resume, then without.
    #[arg(long)]
    compare: bool,
    /// Connected clients, all receiving.
    #[arg(long, default_value_t = 200)]
    clients: usize,
    /// How many of the clients also send.
    #[arg(long, default_value_t = 10)]
    senders: usize,
    /// Total messages per second over all senders.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    /// Sending window.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// When the fault is injected, from the start of the sending window.
    #[arg(long, default_value = "8s", value_parser = humantime::parse_duration)]
    fault_at: Duration,
    /// After sending, wait at most this long after the last publication for the last deliveries.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Token mode: the apps verify tokens, each client signs in with one lasting this long and
    /// refreshes it on the same socket when asked (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    token_ttl: Option<Duration>,
}

/// Runs the scenarios one after the other.
pub async fn run(args: Args) -> anyhow::Result<Runs> {
    let scenarios = if args.scenarios.is_empty() {
        Scenario::ALL.to_vec()
    } else {
        args.scenarios.clone()
    };
    let modes: &[bool] = match (args.compare, args.no_resume) {
        (true, _) => &[true, false],
        (false, true) => &[false],
        (false, false) => &[true],
    };
    let mut runs = Vec::new();
    for scenario in scenarios {
        for &resume in modes {
            let config = Config {
                resume,
                clients: args.clients,
                senders: args.senders,
                rate: args.rate,
                duration: args.duration,
                fault_at: args.fault_at,
                drain: args.drain,
                token_ttl: args.token_ttl,
                ..Config::new(scenario)
            };
            eprintln!("chaos: {scenario}, resume {resume}");
            runs.push(chaos::run(&config).await?);
        }
    }
    Ok(Runs { runs })
}
