//! `app`: command-line entry point of the chat server.
//!
//! `app [run]` parses the flags, loads and validates the config (exit 64 with the file, key and
//! reason if it is unusable), sets up logging to stderr (`RUST_LOG`), raises the open-file
//! limit, binds the listener (and the API's when `api_listen` is set), prints `listening http
//! <addr>` (then `listening api <addr>`) on stdout, and runs [`app::run_with`]
//! until SIGTERM or SIGINT (exit 1 if serving fails). `app token` prints a signed token for a
//! user (exit 64 if the key or a flag is unusable). `app disconnect` closes a user's
//! connections on every instance through Redis, and with `--until` keeps the user out until
//! then (exit 64 for an unusable config or flag, 1 if Redis cannot be reached).

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use confkit::EXIT_CONFIG;
use tokio_util::sync::CancellationToken;

/// Exit status for a failure while running.
const EXIT_RUNTIME: u8 = 1;

/// The scaleout chat server: the chat page and WebSocket, shared across instances through
/// Redis pub/sub.
#[derive(Debug, Parser)]
#[command(name = "app", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the chat server (the default command).
    Run(RunArgs),
    /// Print a signed token for a user, for operators and trials (like `centrifugo gentoken`).
    Token(TokenArgs),
    /// Close a signed-in user's connections on every instance (through Redis) and, with
    /// --until, refuse the user's tokens issued before then until then.
    Disconnect(DisconnectArgs),
    /// For trials on one machine only: serve GET /token?name=NAME, signing a token for ANY name
    /// without a login (loopback addresses only).
    DemoIssuer(DemoIssuerArgs),
}

/// Options of `app demo-issuer`.
#[derive(Debug, Args)]
struct DemoIssuerArgs {
    /// HMAC secret file to sign with: the app's `[auth] secret_file`.
    #[arg(long, value_name = "FILE")]
    secret_file: PathBuf,
    /// Loopback address to listen on; port 0 picks a free port.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// A room granted to a name beyond the public rooms, as NAME=ROOM (repeatable).
    #[arg(long = "grant", value_name = "NAME=ROOM", value_parser = parse_grant)]
    grants: Vec<(String, String)>,
    /// How long each token is valid.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10m")]
    ttl: Duration,
}

/// `--grant NAME=ROOM`.
fn parse_grant(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, room)) if !name.is_empty() && !room.is_empty() => {
            Ok((name.to_lowercase(), room.to_owned()))
        }
        _ => Err(format!("{text:?} is not NAME=ROOM")),
    }
}

/// Options of `app disconnect`.
#[derive(Debug, Args)]
struct DisconnectArgs {
    /// The app's config file, for its Redis (redis_url, redis_channel).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Redis URL, overriding `redis_url`.
    #[arg(long, value_name = "URL", env = "REDIS_URL", hide_env_values = true)]
    redis: Option<String>,
    /// The user id (a token's `sub`).
    #[arg(long)]
    user: String,
    /// Keep the user out until then: a time (RFC 3339, e.g. 2026-12-24T18:00:00Z) or a
    /// duration from now (e.g. 30m, 1d).
    #[arg(long, value_name = "TIME", value_parser = parse_until)]
    until: Option<u64>,
}

/// `--until`: an RFC 3339 time or a duration from now, as Unix seconds.
fn parse_until(text: &str) -> Result<u64, String> {
    let at = match humantime::parse_rfc3339_weak(text) {
        Ok(at) => at,
        Err(_) => {
            let after = humantime::parse_duration(text).map_err(|_| {
                format!("{text:?} is neither a time (2026-12-24T18:00:00Z) nor a duration (30m)")
            })?;
            std::time::SystemTime::now() + after
        }
    };
    at.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .map_err(|_| format!("{text:?} is before 1970"))
}

/// Options of `app run`.
#[derive(Debug, Args, Clone, Default)]
struct RunArgs {
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

/// Options of `app token`.
#[derive(Debug, Args)]
struct TokenArgs {
    /// HMAC secret file to sign with (owner-only, at least 32 bytes).
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with = "key",
        required_unless_present = "key"
    )]
    secret_file: Option<PathBuf>,
    /// Private key (PEM) to sign with; name its algorithm with --alg.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// Signature algorithm: HS256 (default with --secret-file), HS384, HS512, RS256, ES256,
    /// EdDSA.
    #[arg(long, value_name = "ALG")]
    alg: Option<jsonwebtoken::Algorithm>,
    /// The key's id, when the app's config names keys by kid.
    #[arg(long)]
    kid: Option<String>,
    /// The user id (`sub`).
    #[arg(long)]
    sub: String,
    /// The display name (default: the user id).
    #[arg(long)]
    name: Option<String>,
    /// A room granted beyond the public ones, or a prefix ending in * (repeatable).
    #[arg(long = "room", value_name = "ROOM")]
    rooms: Vec<String>,
    /// How long the token is valid (e.g. 10m, 1h, 7d).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "1h")]
    ttl: Duration,
    /// The user's own connection limit across every instance.
    #[arg(long)]
    max_conns: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let run = match cli.command {
        Some(Command::Token(args)) => return token(&args),
        Some(Command::Disconnect(args)) => return disconnect(args),
        Some(Command::DemoIssuer(args)) => return demo_issuer(args),
        Some(Command::Run(run)) => run,
        None => cli.run,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let overrides = app::config::Overrides {
        listen: run.listen,
        redis_url: run.redis,
    };
    let config = match app::config::load(run.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("app: configuration error: {:#}", anyhow::Error::new(err));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Some(api) = &config.api {
        if let Err(err) = app::api::keys::ApiKeys::load(&api.keys_file) {
            let file = run
                .config
                .as_deref()
                .map_or_else(|| "defaults".to_owned(), |p| p.display().to_string());
            eprintln!("app: configuration error: {file}: api_keys_file: {err}");
            return ExitCode::from(EXIT_CONFIG);
        }
    }

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

/// `app token`: signs the requested claims and prints the token alone on stdout.
fn token(args: &TokenArgs) -> ExitCode {
    match mint(args) {
        Ok(minted) => {
            println!("{}", minted.token);
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("app token: {err:#}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `app demo-issuer`: serves demo tokens until SIGTERM or SIGINT.
fn demo_issuer(args: DemoIssuerArgs) -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if !app::issuer::may_listen_on(args.listen) {
        eprintln!(
            "app demo-issuer: --listen {}: the demo issuer signs tokens for anyone; it listens on loopback addresses only",
            args.listen
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    let key = match app::auth::SigningKey::secret(
        &args.secret_file,
        jsonwebtoken::Algorithm::HS256,
        None,
    ) {
        Ok(key) => key,
        Err(e) => {
            eprintln!("app demo-issuer: --secret-file: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut grants = std::collections::HashMap::<String, Vec<String>>::new();
    for (name, room) in args.grants {
        grants.entry(name).or_default().push(room);
    }
    let issuer = app::issuer::Issuer {
        key,
        grants,
        ttl: args.ttl,
    };
    let served = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                let listener = tokio::net::TcpListener::bind(args.listen)
                    .await
                    .with_context(|| format!("could not listen on {}", args.listen))?;
                let local = listener.local_addr().context("no local address")?;
                eprintln!("app demo-issuer: {}", app::issuer::WARNING);
                announce(&format!("listening http {local}"))
                    .context("could not write to stdout")?;
                let stop = app::shutdown::signal();
                axum::serve(listener, app::issuer::router(issuer))
                    .with_graceful_shutdown(async {
                        let _ = stop.await;
                    })
                    .await
                    .context("the demo issuer failed")
            })
        });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("app demo-issuer: {err:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

/// `app disconnect`: one command through Redis, then exit.
fn disconnect(args: DisconnectArgs) -> ExitCode {
    let overrides = app::config::Overrides {
        listen: None,
        redis_url: args.redis,
    };
    let config = match app::config::load(args.config.as_deref(), overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!(
                "app disconnect: configuration error: {:#}",
                anyhow::Error::new(err)
            );
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // No Redis is a configuration matter (64); Redis unreachable a runtime failure (1).
    if config.redis.is_none() {
        eprintln!("app disconnect: {:#}", app::users::DisconnectError::NoRedis);
        return ExitCode::from(EXIT_CONFIG);
    }
    let sent = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("could not start the async runtime")
        .and_then(|runtime| {
            runtime
                .block_on(app::users::disconnect_everywhere(
                    &config, &args.user, args.until,
                ))
                .map_err(anyhow::Error::new)
        });
    match sent {
        Ok(()) => {
            match args.until {
                Some(until) => println!(
                    "disconnected {} everywhere; refused until {until} (Unix time)",
                    args.user
                ),
                None => println!("disconnected {} everywhere", args.user),
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("app disconnect: {err:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn mint(args: &TokenArgs) -> anyhow::Result<app::auth::Minted> {
    use app::auth::SigningKey;
    let key = match (&args.secret_file, &args.key) {
        (Some(secret), _) => SigningKey::secret(
            secret,
            args.alg.unwrap_or(jsonwebtoken::Algorithm::HS256),
            args.kid.clone(),
        )?,
        (None, Some(pem)) => {
            let alg = args
                .alg
                .context("--key needs --alg: the key's algorithm (RS256, ES256 or EdDSA)")?;
            SigningKey::private_pem(pem, alg, args.kid.clone())?
        }
        (None, None) => anyhow::bail!("--secret-file or --key is required"),
    };
    let request = app::auth::TokenRequest {
        sub: args.sub.clone(),
        name: args.name.clone(),
        rooms: args.rooms.clone(),
        ttl: args.ttl,
        max_conns: args.max_conns,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs();
    Ok(key.mint(&request, now)?)
}

async fn serve(config: app::config::Config) -> anyhow::Result<()> {
    raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("could not listen on {}", config.listen))?;
    let local = listener
        .local_addr()
        .context("could not read the listener's address")?;
    let api_listener = match &config.api {
        None => None,
        Some(api) => {
            let listener = tokio::net::TcpListener::bind(api.listen)
                .await
                .with_context(|| format!("could not listen on {} (api_listen)", api.listen))?;
            let addr = listener
                .local_addr()
                .context("could not read the API listener's address")?;
            Some((listener, addr))
        }
    };
    announce(&format!("listening http {local}")).context("could not write to stdout")?;
    let api_listener = match api_listener {
        None => None,
        Some((listener, addr)) => {
            announce(&format!("listening api {addr}")).context("could not write to stdout")?;
            Some(listener)
        }
    };

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
    app::run_with(config, listener, api_listener, shutdown)
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
