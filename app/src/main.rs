//! `app`: command-line entry point of the chat server.
//!
//! Parses the flags, loads and validates the config (exit 64 with the file, key and reason if
//! it is unusable), sets up logging to stderr (`RUST_LOG`), raises the open-file limit, binds
//! the listener, prints `listening http <addr>` on stdout, and runs [`app::run`] until SIGTERM
//! or SIGINT (exit 1 if serving fails).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use confkit::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

/// Exit status for a failure while running.
const EXIT_RUNTIME: u8 = 1;

/// The scaleout chat server: the chat page and WebSocket, shared across instances through
/// Redis pub/sub.
#[derive(Debug, Parser)]
#[command(name = "app", version)]
struct Cli {
    /// TOML config file (see config/app.toml); without it every key takes its default.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (ip:port), overriding `listen`; port 0 picks a free port.
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Redis URL (redis://[:password@]host[:port] or rediss://…), overriding `redis_url`.
    /// Without one, messages stay inside this instance.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let overrides = app::config::Overrides {
        listen: cli.listen,
        redis_url: cli.redis,
    };
    let config = match app::config::load(cli.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("app: configuration error: {:#}", anyhow::Error::new(err));
            return ExitCode::from(EXIT_CONFIG);
        }
    };

    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
        .and_then(|runtime| runtime.block_on(serve(config)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("app: {err:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn serve(config: app::config::Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let local = listener
        .local_addr()
        .context("could not read the listener's address")?;
    announce(&format!("listening http {local}")).context("could not write to stdout")?;

    let shutdown = CancellationToken::new();
    let signal = app::shutdown::signal();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        match signal.await {
            Ok(signal) => tracing::info!(?signal, "shutdown requested"),
            Err(e) => tracing::error!(error = %e, "could not listen for SIGTERM/SIGINT; stopping"),
        }
        trigger.cancel();
    });
    app::run(config, listener, shutdown)
        .await
        .context("the chat server failed")
}

/// The readiness line scripts and tests wait for: one line on stdout, flushed.
fn announce(line: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}")?;
    stdout.flush()
}

/// Raises the soft open-file limit to the hard one: every WebSocket is a descriptor.
fn raise_open_file_limit() {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => tracing::info!(limit, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
}
