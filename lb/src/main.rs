//! `lb`: command-line entry point of the load balancer.
//!
//! Parses the command line, sets up logging (stderr, filtered by `RUST_LOG`), and runs one of
//! `lb run` (the default; with a file, or quick mode from flags alone), `lb check` or
//! `lb certs generate`. Everything else lives in the library. Exit codes: 0 on success, 64 when
//! the configuration (or a certificate it names, or a `certs` argument) is unusable, 1 on any
//! other failure (a listener that cannot be bound, a binary upgrade that cannot take over).
//!
//! `lb run` started by a running lb on SIGUSR2 finds the handover socket in `LB_TAKEOVER_FROM`:
//! it validates its configuration first, then takes the listening sockets and ticket keys over
//! (`ops::handover`) instead of binding, and tells the old process when it serves.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use confkit::EXIT_CONFIG;
use lb::ops::handover::{self, Handback, Successor};
use lb::ops::notify;
use lb::ops::signals::{Exit, Signals};
use lb::{Config, ConfigError, Lb, Overrides, StartError};

/// The scaleout load balancer: TLS termination, HTTP/1.1 proxying and WebSocket tunnels to
/// health-checked backends.
#[derive(Debug, Parser)]
#[command(name = "lb", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the load balancer (the default command).
    Run(RunArgs),
    /// Validate a configuration file and the certificates it names; exit 0 or 64.
    Check {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Local certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a new local CA and a server certificate signed by it.
    Generate {
        /// Directory to write ca.crt, ca.key, server.crt, server.key and server.pem into.
        #[arg(long)]
        out: PathBuf,
        /// A DNS name or IP address the certificate is for (repeatable; default: localhost
        /// and 127.0.0.1).
        #[arg(long = "host", value_name = "NAME")]
        hosts: Vec<String>,
        /// Replace existing key files.
        #[arg(long)]
        force: bool,
    },
}

/// Options of `lb run`; without `--config` they are the whole configuration (quick mode),
/// with it they override the file's keys.
#[derive(Debug, Args, Clone, Default)]
struct RunArgs {
    /// Configuration file (see config/lb.toml).
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(flatten)]
    overrides: Overrides,
}

impl RunArgs {
    /// Neither a file nor any quick-mode flag: nothing to run.
    fn is_empty(&self) -> bool {
        let o = &self.overrides;
        self.config.is_none()
            && o.listen.is_none()
            && o.backends.is_empty()
            && o.cert.is_none()
            && o.pem.is_none()
    }

    /// The configuration: the file with overrides, or quick mode.
    fn load(&self) -> Result<Config, ConfigError> {
        match &self.config {
            Some(path) => Config::load(path, &self.overrides),
            None => Config::from_overrides(&self.overrides),
        }
    }
}

/// The log filter: `RUST_LOG`, or `info` without it. rustls' own messages are limited to
/// errors unless `RUST_LOG` names rustls: it warns once per handshake about ordinary client
/// behaviour (an IP address sent as SNI by curl or wrk), a line per connection at any load.
fn log_filter(rust_log: Option<String>) -> String {
    let filter = rust_log
        .filter(|f| !f.trim().is_empty())
        .unwrap_or_else(|| "info".to_owned());
    if filter.contains("rustls") {
        filter
    } else {
        format!("{filter},rustls=error")
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(tracing_subscriber::EnvFilter::new(log_filter(
            std::env::var("RUST_LOG").ok(),
        )))
        .init();
    match cli.command {
        Some(Command::Check { config }) => check(&config),
        Some(Command::Certs(CertsCommand::Generate { out, hosts, force })) => {
            certs_generate(&out, hosts, force)
        }
        Some(Command::Run(args)) => run(args),
        None => run(cli.run),
    }
}

/// `lb check`: parse, validate, load the certificates.
fn check(path: &Path) -> ExitCode {
    let config = match Config::load(path, &Overrides::default()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let tickets = match lb::front::tickets::Tickets::new(config.tls.ticket_rotation) {
        Ok(tickets) => tickets,
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    match lb::front::tls::server_config(&config, &tickets, None, &lb::metrics::Metrics::default())
        .map(|_| config)
    {
        Ok(config) => {
            println!(
                "{}: configuration is valid ({} backend{}, {} certificate{}, https on {})",
                path.display(),
                config.backends.len(),
                if config.backends.len() == 1 { "" } else { "s" },
                config.certificates.len(),
                if config.certificates.len() == 1 {
                    ""
                } else {
                    "s"
                },
                config.listen.https
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

/// `lb run`: take over or bind, announce the listeners, serve signals, drain.
fn run(args: RunArgs) -> ExitCode {
    if args.is_empty() {
        eprintln!(
            "lb: nothing to run: give --config FILE, or quick mode: \
             lb --listen ADDR --backend HOST:PORT --pem FILE (see lb --help)"
        );
        return ExitCode::from(EXIT_CONFIG);
    }
    // Where the next version comes from: the path this process was started by (so a symlink
    // switched to a new release starts that release; a bare name is looked up on PATH again),
    // or, without one, the file of this process's own image, taken now (once that file is
    // replaced, the image is no longer at the path).
    let mut argv = std::env::args_os();
    let successor = argv
        .next()
        .filter(|program| !program.is_empty())
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::current_exe().ok())
        .map(|program| Successor {
            program,
            args: argv.collect(),
        });
    let config = match args.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let (inherited, handback) = match std::env::var_os(handover::TAKEOVER_ENV) {
        None => (lb::ops::server::Inherited::default(), None),
        Some(path) => match handover::receive(Path::new(&path)) {
            Ok((inherited, handback)) => (inherited, Some(handback)),
            Err(e) => {
                eprintln!("lb: upgrade: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("lb: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let mut signals = match Signals::install() {
            Ok(signals) => signals,
            Err(e) => {
                eprintln!("lb: could not install signal handlers: {e}");
                return ExitCode::FAILURE;
            }
        };
        let lb = match Lb::start_with(config, inherited).await {
            Ok(lb) => lb,
            Err(StartError::Config(e)) => {
                eprintln!("lb: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
            Err(e) => {
                eprintln!("lb: {e}");
                return ExitCode::FAILURE;
            }
        };
        if let Err(e) = announce(&lb) {
            eprintln!("lb: could not write to stdout: {e:#}");
            lb.shutdown().await;
            return ExitCode::FAILURE;
        }
        // The previous process hears first that this one serves: only then does it stop
        // accepting and count this one as its successor, and only then is this one the unit's
        // main process (`MAINPID=`).
        if let Some(handback) = handback {
            hand_back(handback);
        }
        notify::ready();
        match signals.run(&lb, || args.load(), successor.as_ref()).await {
            Exit::Terminate => {
                notify::stopping();
                lb.shutdown().await;
            }
            Exit::Upgraded(pid) => signals.drain_after_upgrade(&lb, pid).await,
        }
        ExitCode::SUCCESS
    })
}

/// Tells the old process this one serves. If it is gone, this one serves on regardless.
fn hand_back(handback: Handback) {
    match handback.ready() {
        Ok(()) => tracing::info!("took over from the previous process; serving"),
        Err(e) => tracing::warn!(error = %e,
            "could not tell the previous process that this one serves; serving anyway"),
    }
}

/// Prints the readiness lines, one per bound listener.
fn announce(lb: &Lb) -> anyhow::Result<()> {
    let addrs = lb.addrs();
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening https {}", addrs.https)?;
    if let Some(addr) = addrs.redirect {
        writeln!(out, "listening redirect {addr}")?;
    }
    if let Some(addr) = addrs.admin {
        writeln!(out, "listening admin {addr}")?;
    }
    out.flush().context("flushing stdout")?;
    Ok(())
}

/// `lb certs generate`.
fn certs_generate(out: &Path, mut hosts: Vec<String>, force: bool) -> ExitCode {
    if hosts.is_empty() {
        hosts = certs::DEFAULT_HOSTS.iter().map(|h| h.to_string()).collect();
    }
    let written = certs::generate(&hosts).and_then(|bundle| bundle.write_to(out, force));
    let written = match written {
        Ok(w) => w,
        // What the operator asked for is wrong: usage error (64).
        Err(
            e @ (certs::CertError::InvalidHost { .. }
            | certs::CertError::NoHosts
            | certs::CertError::WouldOverwrite { .. }),
        ) => {
            eprintln!("lb: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
        // Writing or generating failed: runtime error (1).
        Err(e) => {
            eprintln!("lb: {e}");
            return ExitCode::FAILURE;
        }
    };
    let ca = written.ca_cert.display();
    let first = &hosts[0];
    let url_host = if first.contains(':') {
        format!("[{first}]")
    } else {
        first.clone()
    };
    println!(
        "\
Wrote a new local CA and a server certificate for {hosts} to {dir}:
  {ca_file:<11} the CA certificate: trust this on clients
  {ca_key:<11} the CA private key (mode 0600): keep it; lb does not need it
  {crt:<11} server certificate, valid {days} days
  {key:<11} server private key (mode 0600)
  {pem:<11} server certificate + key in one file (HAProxy style)

Serve with it:
  lb --listen 0.0.0.0:443 --backend 10.0.0.11:80 --backend 10.0.0.12:80 --pem {pem_path}
  or in lb.toml:  [[certificates]]  pem = \"{pem_path}\"

Trust the CA:
  curl:            curl --cacert {ca} https://{url_host}/
  Debian/Ubuntu:   sudo cp {ca} /usr/local/share/ca-certificates/scaleout-local-ca.crt
                   sudo update-ca-certificates
  Firefox:         Settings > Privacy & Security > Certificates > View Certificates >
                   Authorities > Import {ca} (trust it to identify websites)
  Chrome/Chromium: Settings > Privacy and security > Security > Manage certificates >
                   Authorities > Import {ca}; or, on Linux:
                   certutil -d sql:$HOME/.pki/nssdb -A -t C,, -n scaleout-local-ca -i {ca}
  macOS:           sudo security add-trusted-cert -d -r trustRoot \\
                     -k /Library/Keychains/System.keychain {ca}",
        hosts = hosts.join(", "),
        days = certs::SERVER_VALIDITY_DAYS,
        dir = out.display(),
        ca_file = certs::FileNames::CA_CERT,
        ca_key = certs::FileNames::CA_KEY,
        crt = certs::FileNames::SERVER_CERT,
        key = certs::FileNames::SERVER_KEY,
        pem = certs::FileNames::COMBINED,
        pem_path = written.combined.display(),
    );
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rustls_is_quiet_unless_rust_log_names_it() {
        assert_eq!(log_filter(None), "info,rustls=error");
        assert_eq!(log_filter(Some(" ".into())), "info,rustls=error");
        assert_eq!(log_filter(Some("warn".into())), "warn,rustls=error");
        assert_eq!(log_filter(Some("rustls=debug".into())), "rustls=debug");
    }
}
