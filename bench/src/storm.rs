//! `bench storm`: a reconnect storm through a proxy, first with full TLS handshakes, then with
//! every client resuming its TLS session.
//!
//! N clients open a TLS WebSocket (TCP, TLS 1.3 handshake, HTTP upgrade through the proxy to a
//! backend) all at the same moment: one tokio task per client, all spawned at once, each
//! connecting as soon as it runs (`--concurrency` bounds the connects in flight when given). A
//! connect not finished `--connect-timeout` after the storm began fails. Every client shares one
//! rustls `ClientConfig` (TLS 1.3 only, ALPN `http/1.1`) and one [`TicketPool`]: the session
//! tickets the proxy sends during the first storm are kept, none is offered back. Once every
//! connect has ended, all connections are dropped at once (the server disappeared), the watched
//! processes are given time to close what they held, and the same N clients come back at once,
//! now each offering a ticket from the pool: the second storm measures resumed handshakes. Which
//! kind each handshake was is read from rustls on the client side, not assumed.
//!
//! The client pins the server certificate: the leaf the proxy presents must be byte for byte the
//! one in `--pin`, and the handshake signature is not checked (as wrk and h2load check nothing),
//! so the generator's own cost per handshake stays small next to the proxy's on shared cores;
//! the proxy still signs every full handshake.
//!
//! Per storm: connects established and failed, how many resumed, the time until the last one
//! was up, connect time percentiles (from the client's first SYN to the `101`), CPU per
//! established connect of every watched group (`/proc`), the highest resident memory of each
//! (sampled every [`RSS_EVERY`] on a thread of its own) and the machine's TCP counters that show
//! a listener being overrun (accept-queue overflows, SYN cookies, SYN retransmits).

use std::collections::VecDeque;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientSessionStore, Tls12ClientSessionValue, Tls13ClientSessionValue};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, HandshakeKind, NamedGroup, SignatureScheme};
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio_util::either::Either;

use crate::client::{self, Target, Ws};
use crate::latency::Percentiles;
use crate::procstat::{Measured, TcpCounters, Watch, Window};

/// How often the watched processes' resident memory is sampled during a storm.
const RSS_EVERY: Duration = Duration::from_millis(20);
/// How often the watched processes' open descriptors are counted between the storms.
const SETTLE_POLL: Duration = Duration::from_millis(50);
/// Descriptors above the count before the first storm that still count as settled (health
/// checks and pooled backend connections come and go).
const SETTLE_SLACK: usize = 64;

/// Options of `bench storm`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// wss:// URL of a WebSocket endpoint behind the proxy.
    #[arg(long)]
    url: String,
    /// PEM file whose first certificate the server must present (pinned, byte for byte).
    #[arg(long)]
    pin: PathBuf,
    /// Clients in each storm.
    #[arg(long, default_value_t = 9000)]
    clients: usize,
    /// Connects in flight at once; all clients at once when not given.
    #[arg(long)]
    concurrency: Option<usize>,
    /// A connect not finished this long after its storm began fails.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// Longest wait between the storms for the watched processes to close what the first storm
    /// left open.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,
    /// Processes whose CPU and memory to report: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    watch: Vec<Watch>,
}

/// What `bench storm` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The URL measured.
    pub url: String,
    /// Clients in each storm.
    pub clients: usize,
    /// Connects in flight at once (the client count when all go at once).
    pub concurrency: usize,
    /// Session tickets the clients held when the first storm ended.
    pub tickets: usize,
    /// The first storm: every client new, full handshakes.
    pub full: Storm,
    /// The second storm: every client back with a ticket from the first.
    pub resumed: Storm,
}

/// One storm.
#[derive(Debug, Serialize)]
pub struct Storm {
    /// Connects that completed: TCP, TLS and the WebSocket upgrade.
    pub established: usize,
    /// Connects that failed or did not finish in time.
    pub failed: usize,
    /// The first failure, when there was one.
    pub first_error: Option<String>,
    /// Established connections whose TLS handshake resumed a session.
    pub resumed_handshakes: usize,
    /// Seconds from the start of the storm until the last successful connect finished.
    pub all_connected_s: f64,
    /// Connect times of the established connections, from the first SYN to the `101`.
    pub connect: Percentiles,
    /// CPU microseconds per established connection for each watched group, in `--watch` order.
    pub cpu_us_per_connect: Vec<f64>,
    /// The generator's CPU microseconds per established connection.
    pub generator_cpu_us_per_connect: f64,
    /// Highest resident memory of each watched group during the storm, MiB.
    pub peak_rss_mib: Vec<f64>,
    /// What the machine's listen and SYN counters grew by during the storm.
    pub tcp: TcpCounters,
    /// The watched groups, the generator and the machine from the start of the storm until
    /// every connect had ended.
    #[serde(flatten)]
    pub measured: Measured,
}

/// Runs both storms and reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let concurrency = args.concurrency.unwrap_or(args.clients);
    if args.clients == 0 || concurrency == 0 {
        bail!("--clients and --concurrency must be at least 1");
    }
    client::room_for(args.clients)?;
    let pinned = certs::load_ca(&args.pin)?
        .into_iter()
        .next()
        .with_context(|| format!("{}: no certificate", args.pin.display()))?;
    let tickets = Arc::new(TicketPool::new(4 * args.clients));
    let config = client_config(pinned, Arc::clone(&tickets) as Arc<dyn ClientSessionStore>)?;
    let target = Target::resolve_with(&args.url, Some(Arc::new(config))).await?;
    let idle_files = open_files(&args.watch)?;

    let (full, conns) = storm(&target, &args, concurrency).await?;
    eprintln!("storm: {}", full.summary("full"));
    let held = tickets.len();
    drop(conns);
    settle(&args.watch, idle_files, args.settle_timeout).await?;

    tickets.offer();
    let (resumed, conns) = storm(&target, &args, concurrency).await?;
    eprintln!("storm: {}", resumed.summary("resumed"));
    drop(conns);
    Ok(Report {
        url: target.url().to_string(),
        clients: args.clients,
        concurrency,
        tickets: held,
        full,
        resumed,
    })
}

/// One storm: every client connects at once (within `concurrency`); returns the figures and the
/// open connections, which the caller drops when it wants them gone.
async fn storm(
    target: &Target,
    args: &Args,
    concurrency: usize,
) -> anyhow::Result<(Storm, Vec<Ws>)> {
    let gate = Arc::new(Semaphore::new(concurrency));
    let peaks = RssPeaks::start(&args.watch)?;
    let tcp_before = TcpCounters::read()?;
    let window = Window::open(&args.watch)?;
    let start = Instant::now();
    let deadline = tokio::time::Instant::from_std(start + args.connect_timeout);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| {
            let (target, gate) = (target.clone(), Arc::clone(&gate));
            tokio::spawn(async move {
                let _permit = gate
                    .acquire()
                    .await
                    .map_err(|_| anyhow!("the connect gate closed"))?;
                let began = Instant::now();
                let ws = tokio::time::timeout_at(deadline, target.connect(None))
                    .await
                    .map_err(|_| anyhow!("not connected within the connect timeout"))??;
                anyhow::Ok((ws, began.elapsed(), start.elapsed()))
            })
        })
        .collect();

    let mut conns = Vec::with_capacity(args.clients);
    let mut times = Vec::with_capacity(args.clients);
    let (mut failed, mut first_error, mut last) = (0, None, Duration::ZERO);
    for task in tasks {
        match task.await.map_err(anyhow::Error::from).and_then(|r| r) {
            Ok((ws, took, at)) => {
                conns.push(ws);
                times.push(took.as_nanos() as u64);
                last = last.max(at);
            }
            Err(e) => {
                failed += 1;
                first_error.get_or_insert_with(|| format!("{e:#}"));
            }
        }
    }
    let measured = window.close()?;
    let tcp = TcpCounters::read()?.since(tcp_before);
    let peak_rss_mib = peaks.stop()?;

    let established = conns.len();
    let per_connect = |cpu_seconds: f64| cpu_seconds * 1e6 / established.max(1) as f64;
    let storm = Storm {
        established,
        failed,
        first_error,
        resumed_handshakes: conns.iter().filter(|ws| resumed(ws)).count(),
        all_connected_s: last.as_secs_f64(),
        connect: Percentiles::of(times),
        cpu_us_per_connect: measured.cpu_us_per(established as u64),
        generator_cpu_us_per_connect: per_connect(measured.generator.cpu_seconds),
        peak_rss_mib,
        tcp,
        measured,
    };
    Ok((storm, conns))
}

/// Whether the connection's TLS handshake resumed a session.
fn resumed(ws: &Ws) -> bool {
    match ws.get_ref() {
        Either::Left(tls) => tls.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed),
        Either::Right(_) => false,
    }
}

/// Descriptors held by all the watched processes together.
fn open_files(watches: &[Watch]) -> anyhow::Result<usize> {
    watches.iter().map(Watch::open_files).sum()
}

/// Waits (at most `within`) until the watched processes hold no more descriptors than `idle`
/// plus [`SETTLE_SLACK`]: the connections of the last storm are closed on their side too.
async fn settle(watches: &[Watch], idle: usize, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let open = open_files(watches)?;
        if open <= idle + SETTLE_SLACK {
            return Ok(());
        }
        if Instant::now() >= deadline {
            eprintln!(
                "storm: the watched processes still hold {open} descriptors ({idle} before the first storm) after {within:?}"
            );
            return Ok(());
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
}

/// The highest resident memory of each watched group, sampled on a thread of its own so that a
/// busy runtime does not delay the samples.
struct RssPeaks {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<f64>>,
}

impl RssPeaks {
    /// Samples once now (failing on a process that is not there) and then every [`RSS_EVERY`].
    fn start(watches: &[Watch]) -> anyhow::Result<Self> {
        let mut peaks = watches
            .iter()
            .map(|w| w.sample().map(|s| s.rss_mib()))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        let watches = watches.to_vec();
        let thread = std::thread::Builder::new()
            .name("rss-peaks".into())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    loop {
                        for (peak, watch) in peaks.iter_mut().zip(&watches) {
                            // A process gone mid-storm keeps the peak it reached.
                            if let Ok(sample) = watch.sample() {
                                *peak = peak.max(sample.rss_mib());
                            }
                        }
                        if stop.load(Relaxed) {
                            return peaks;
                        }
                        std::thread::sleep(RSS_EVERY);
                    }
                }
            })
            .context("starting the memory sampler")?;
        Ok(Self { stop, thread })
    }

    /// Takes a last sample and returns the peaks, in the order of the watches.
    fn stop(self) -> anyhow::Result<Vec<f64>> {
        self.stop.store(true, Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow!("the memory sampler panicked"))
    }
}

/// The clients' TLS settings: TLS 1.3 only, ALPN `http/1.1`, the pinned server certificate, and
/// `tickets` as the session store of every client.
fn client_config(
    pinned: CertificateDer<'static>,
    tickets: Arc<dyn ClientSessionStore>,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let schemes = provider
        .signature_verification_algorithms
        .supported_schemes();
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("TLS protocol versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            cert: pinned,
            schemes,
        }))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::store(tickets);
    Ok(config)
}

/// Accepts exactly one server certificate and leaves handshake signatures unchecked (see the
/// module documentation).
#[derive(Debug)]
struct Pinned {
    cert: CertificateDer<'static>,
    schemes: Vec<SignatureScheme>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.cert.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    /// The clients speak TLS 1.3 only: a TLS 1.2 handshake is refused, never waved through.
    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes.clone()
    }
}

/// One session store for every client of a run: keeps every TLS 1.3 ticket the server sends (up
/// to a capacity, oldest dropped first), and hands them out only once [`TicketPool::offer`] was
/// called, so that the first storm is all full handshakes even when early tickets arrive before
/// later clients start. (rustls' own cache keeps 8 tickets per server name: too few for a
/// storm of clients all going to one server.)
struct TicketPool {
    offering: AtomicBool,
    capacity: usize,
    tickets: Mutex<VecDeque<Tls13ClientSessionValue>>,
    kx_hint: Mutex<Option<NamedGroup>>,
}

impl TicketPool {
    fn new(capacity: usize) -> Self {
        Self {
            offering: AtomicBool::new(false),
            capacity,
            tickets: Mutex::new(VecDeque::new()),
            kx_hint: Mutex::new(None),
        }
    }

    /// From now on every new connection takes a ticket, while there are any.
    fn offer(&self) {
        self.offering.store(true, Relaxed);
    }

    /// Tickets held.
    fn len(&self) -> usize {
        lock(&self.tickets).len()
    }
}

/// A poisoned lock still holds consistent tickets (every update is one push or pop).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl fmt::Debug for TicketPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TicketPool")
            .field("offering", &self.offering.load(Relaxed))
            .field("tickets", &self.len())
            .finish_non_exhaustive()
    }
}

impl ClientSessionStore for TicketPool {
    fn set_kx_hint(&self, _server_name: ServerName<'static>, group: NamedGroup) {
        *lock(&self.kx_hint) = Some(group);
    }

    fn kx_hint(&self, _server_name: &ServerName<'_>) -> Option<NamedGroup> {
        *lock(&self.kx_hint)
    }

    // The clients speak TLS 1.3 only: there are no TLS 1.2 sessions to keep.
    fn set_tls12_session(&self, _server_name: ServerName<'static>, _: Tls12ClientSessionValue) {}

    fn tls12_session(&self, _server_name: &ServerName<'_>) -> Option<Tls12ClientSessionValue> {
        None
    }

    fn remove_tls12_session(&self, _server_name: &ServerName<'static>) {}

    fn insert_tls13_ticket(
        &self,
        _server_name: ServerName<'static>,
        ticket: Tls13ClientSessionValue,
    ) {
        let mut tickets = lock(&self.tickets);
        if tickets.len() >= self.capacity {
            tickets.pop_front();
        }
        tickets.push_back(ticket);
    }

    fn take_tls13_ticket(
        &self,
        _server_name: &ServerName<'static>,
    ) -> Option<Tls13ClientSessionValue> {
        if !self.offering.load(Relaxed) {
            return None;
        }
        lock(&self.tickets).pop_back()
    }
}

impl Storm {
    /// One line: counts, times, and the first watched group's CPU and memory.
    fn summary(&self, name: &str) -> String {
        let mut line = format!(
            "{name:<8} {} up, {} failed, {} resumed; all up after {:.2} s; connect p50 {:.1} ms, p99 {:.1} ms",
            self.established,
            self.failed,
            self.resumed_handshakes,
            self.all_connected_s,
            self.connect.p50_ms,
            self.connect.p99_ms
        );
        for ((usage, cpu), peak) in self
            .measured
            .watched
            .iter()
            .zip(&self.cpu_us_per_connect)
            .zip(&self.peak_rss_mib)
        {
            line.push_str(&format!(
                "; {} {cpu:.0} µs CPU per connect, peak RSS {peak:.1} MiB",
                usage.name
            ));
        }
        line
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "storm {} ({} clients, {} connects in flight at most; {} tickets after the first storm)",
            self.url, self.clients, self.concurrency, self.tickets
        )?;
        for (name, storm) in [("full", &self.full), ("resumed", &self.resumed)] {
            writeln!(f, "  {}", storm.summary(name))?;
            writeln!(
                f,
                "  {:<8} generator {:.0} µs CPU per connect; machine {:.2} cores busy; listen overflows {}, SYN cookies {}, SYN retransmits {}",
                "",
                storm.generator_cpu_us_per_connect,
                storm.measured.machine_cores,
                storm.tcp.listen_overflows,
                storm.tcp.syncookies_sent,
                storm.tcp.syn_retransmits
            )?;
            if let Some(e) = &storm.first_error {
                writeln!(f, "  {:<8} first failure: {e}", "")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    /// A TLS 1.3 WebSocket server that issues session tickets and holds every connection until
    /// the client goes; returns its address and the PEM of its certificate.
    async fn tls_ws_server() -> (std::net::SocketAddr, String) {
        let bundle = certs::generate(&["127.0.0.1".to_string()]).unwrap();
        let chain = bundle.server_chain().unwrap();
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain.certs, chain.key)
        .unwrap();
        config.ticketer = rustls::crypto::ring::Ticketer::new().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                        return;
                    };
                    while let Some(Ok(_)) = ws.next().await {}
                });
            }
        });
        (addr, bundle.server_cert_pem)
    }

    fn pem_file(pem: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(pem.as_bytes()).unwrap();
        file
    }

    fn args(addr: std::net::SocketAddr, pin: &tempfile::NamedTempFile) -> Args {
        Args {
            url: format!("wss://{addr}/ws"),
            pin: pin.path().to_path_buf(),
            clients: 12,
            concurrency: None,
            connect_timeout: Duration::from_secs(30),
            settle_timeout: Duration::from_secs(5),
            watch: vec![Watch::this_process()],
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_second_storm_resumes_with_the_tickets_of_the_first() {
        let (addr, pem) = tls_ws_server().await;
        let pin = pem_file(&pem);
        // One connect at a time: without the pool's gate, every client after the first would
        // resume with a ticket of the one before.
        let report = run(Args {
            concurrency: Some(1),
            ..args(addr, &pin)
        })
        .await
        .unwrap();
        assert_eq!((report.full.established, report.full.failed), (12, 0));
        assert_eq!(report.full.resumed_handshakes, 0);
        assert!(report.tickets >= 12, "{} tickets", report.tickets);
        assert_eq!((report.resumed.established, report.resumed.failed), (12, 0));
        assert_eq!(report.resumed.resumed_handshakes, 12);
        assert_eq!(report.full.connect.count, 12);
        assert_eq!(report.full.cpu_us_per_connect.len(), 1);
        assert!(report.full.peak_rss_mib[0] > 0.0);
        assert!(report.to_string().contains("12 resumed"), "{report}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn all_at_once_and_a_wrong_certificate_fails_every_connect() {
        let (addr, pem) = tls_ws_server().await;
        let pin = pem_file(&pem);
        let report = run(args(addr, &pin)).await.unwrap();
        assert_eq!(report.concurrency, 12);
        assert_eq!((report.full.established, report.full.failed), (12, 0));
        assert_eq!(report.resumed.resumed_handshakes, 12);

        let other = certs::generate(&["127.0.0.1".to_string()]).unwrap();
        let wrong = pem_file(&other.server_cert_pem);
        let report = run(args(addr, &wrong)).await.unwrap();
        assert_eq!((report.full.established, report.full.failed), (0, 12));
        let error = report.full.first_error.unwrap_or_default();
        assert!(error.contains("certificate"), "{error}");
    }
}
