//! `bench`: load generator (fan-out, echo, idle, storm, the presence join storm, the server API's
//! publish rate), fault injection (chaos), Redis layouts (shards) and neutral backend.
//!
//! Each subcommand runs one measurement and prints its report: human-readable by default, one
//! JSON object with `--json` (what `bench/run` parses). Progress and errors go to stderr.

mod api;
mod backend;
mod chaos;
mod client;
mod echo;
mod fanout;
mod floor;
mod http;
mod idle;
mod presence;
mod procstat;
mod protocol;
mod pusher;
mod shards;
mod storm;
mod summary;
#[cfg(test)]
mod test_server;
mod tokens;

use std::net::SocketAddr;
use std::process::ExitCode;

use ::tests::latency;
use clap::{Parser, Subcommand};

/// Load generator and neutral backend for measuring lb, HAProxy, nginx and the chat stack.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Print the report as one JSON object.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The server API's publish rate (POST .../messages), or the same publishes over WebSocket.
    Api(api::Args),
    /// Faults injected into the whole stack under chat load: loss, duplicates, reconnects.
    Chaos(chaos::Args),
    /// Chat fan-out: N clients, S senders at a total rate; loss, duplicates, latency.
    Fanout(fanout::Args),
    /// WebSocket ping-pong through a URL: round trips/s and RTT percentiles.
    Echo(echo::Args),
    /// What one loopback TCP hop (a send and a receive) costs this machine: the stack's floor.
    Floor(floor::Args),
    /// HTTP(S) small-response load over keep-alive, run with wrk: requests/s and latency.
    Http(http::Args),
    /// Hold N idle WebSocket connections and report memory per connection of watched processes.
    Idle(idle::Args),
    /// A join storm into one room watching presence: frames per member, final views, CPU per join.
    Presence(presence::Args),
    /// The chat over many rooms on one Redis and on Redis Clusters, and per-room subscriptions.
    Shards(shards::Args),
    /// Reconnect storm: N TLS WebSocket clients at once, then all again resuming their sessions.
    Storm(storm::Args),
    /// Markdown tables (medians, ratios) from the results file of bench/run.
    Summary(summary::Args),
    /// The neutral backend: WebSocket echo on any upgrade, 200 "Hello, world!" otherwise.
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        match cli.command {
            Command::Api(args) => emit(cli.json, &api::run(args).await?),
            Command::Chaos(args) => emit(cli.json, &chaos::run(args).await?),
            Command::Fanout(args) => emit(cli.json, &fanout::run(args).await?),
            Command::Echo(args) => emit(cli.json, &echo::run(args).await?),
            Command::Floor(args) => emit(cli.json, &floor::run(args).await?),
            Command::Idle(args) => emit(cli.json, &idle::run(args).await?),
            Command::Http(args) => emit(cli.json, &http::run(args).await?),
            Command::Presence(args) => emit(cli.json, &presence::run(args).await?),
            Command::Shards(args) => emit(cli.json, &shards::run(args).await?),
            Command::Storm(args) => emit(cli.json, &storm::run(args).await?),
            Command::Summary(args) => {
                print!("{}", summary::run(&args)?);
                Ok(())
            }
            Command::Backend { listen } => backend::run(listen).await,
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints a report on stdout, as text or as one JSON line.
fn emit<R: serde::Serialize + std::fmt::Display>(json: bool, report: &R) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(report)?);
    } else {
        println!("{report}");
    }
    Ok(())
}
