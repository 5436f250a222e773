//! Active health checks: decides which backends are up.
//!
//! [`spawn`] starts one task per backend of a pool. Every `interval` the task opens a fresh TCP
//! connection to the backend, sends `GET <path> HTTP/1.1` and reads the response head; the
//! check passes if the status is `expect_status` within `timeout`. Each outcome feeds a
//! [`RiseFall`] counter: `fall` consecutive failures mark an up backend down, `rise`
//! consecutive passes mark a down backend up (HAProxy's `inter`, `rise`, `fall`). The task
//! writes the verdict into the backend's atomic state, which `Pool::pick` reads, counts the
//! transition in the backend's stats and logs it. Connect failures the proxy reports
//! (`Backend::report_connect_failure`) wake the task at once and count as failed checks, so a
//! backend that refuses connections leaves the rotation without waiting for the next interval.
//! The tasks stop when the cancellation token is cancelled.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use hyper::Method;
use tokio::io::AsyncWriteExt;
use tokio::time::{self, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backends::balance::{Backend, Pool};
use crate::backends::exchange::ExchangeError;
use crate::backends::upstream;

/// Default time between two checks of a backend (HAProxy `inter`).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
/// Default limit for one check, connect to response head (HAProxy `timeout check`).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default number of consecutive passed checks that bring a down backend up.
pub const DEFAULT_RISE: u32 = 2;
/// Default number of consecutive failed checks that take an up backend down.
pub const DEFAULT_FALL: u32 = 3;
/// Default path requested by a check: the app's health endpoint.
pub const DEFAULT_PATH: &str = "/healthz";
/// Default status a passing check must answer.
pub const DEFAULT_EXPECT_STATUS: u16 = 200;

/// Shortest interval the checker will use: a zero interval from a config is raised to this.
const MIN_INTERVAL: Duration = Duration::from_millis(10);

/// How backends are checked. Thresholds of 0 are treated as 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthConfig {
    /// Whether active checks run. Without them every backend stays up.
    pub enabled: bool,
    /// Request path of the check; must start with `/`.
    pub path: String,
    /// Status code a passing check answers.
    pub expect_status: u16,
    /// Time between two checks of one backend.
    pub interval: Duration,
    /// Limit for one check, from connect to the end of the response head.
    pub timeout: Duration,
    /// Consecutive passed checks that bring a down backend up.
    pub rise: u32,
    /// Consecutive failed checks that take an up backend down.
    pub fall: u32,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            enabled: true,
            path: DEFAULT_PATH.to_owned(),
            expect_status: DEFAULT_EXPECT_STATUS,
            interval: DEFAULT_INTERVAL,
            timeout: DEFAULT_TIMEOUT,
            rise: DEFAULT_RISE,
            fall: DEFAULT_FALL,
        }
    }
}

/// A change of a backend's health state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The backend came (back) up.
    Up,
    /// The backend went down.
    Down,
}

/// The rise/fall hysteresis of one backend: counts consecutive check outcomes that disagree
/// with the current state and flips the state when the streak reaches the threshold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive outcomes contradicting `up` (failures while up, passes while down).
    streak: u32,
}

impl RiseFall {
    /// A counter in state `up` with the given thresholds (0 is treated as 1).
    pub fn new(rise: u32, fall: u32, up: bool) -> Self {
        RiseFall {
            rise: rise.max(1),
            fall: fall.max(1),
            up,
            streak: 0,
        }
    }

    /// Whether the backend is currently considered up.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one check outcome; returns the transition it caused, if any.
    pub fn record(&mut self, passed: bool) -> Option<Transition> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let threshold = if self.up { self.fall } else { self.rise };
        if self.streak < threshold {
            return None;
        }
        self.up = passed;
        self.streak = 0;
        Some(if passed {
            Transition::Up
        } else {
            Transition::Down
        })
    }
}

/// Starts one checker task per backend of `pool` on `tracker`; they run until `token` is
/// cancelled. Does nothing when checks are disabled.
pub fn spawn(pool: Arc<Pool>, cfg: HealthConfig, token: CancellationToken, tracker: &TaskTracker) {
    if !cfg.enabled {
        info!("active health checks disabled: every backend stays up");
        return;
    }
    let cfg = Arc::new(cfg);
    for backend in pool.backends() {
        tracker.spawn(watch(Arc::clone(backend), Arc::clone(&cfg), token.clone()));
    }
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum CheckError {
    #[error("no response head within {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Connect(io::Error),
    #[error("i/o error: {0}")]
    Io(io::Error),
    #[error("connection closed before a complete response head")]
    Closed,
    #[error("malformed response: {0}")]
    Malformed(&'static str),
    #[error("status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
    #[error("the proxy could not connect")]
    ProxyConnectFailed,
}

/// The checker of one backend: checks every interval and applies reported connect failures
/// while waiting or checking.
async fn watch(backend: Arc<Backend>, cfg: Arc<HealthConfig>, token: CancellationToken) {
    let request = check_request(&cfg.path, backend.addr());
    let mut health = RiseFall::new(cfg.rise, cfg.fall, backend.is_up());
    let mut ticker = time::interval(cfg.interval.max(MIN_INTERVAL));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        let next_check = async {
            ticker.tick().await;
            check(backend.addr(), &request, cfg.expect_status, cfg.timeout).await
        };
        tokio::pin!(next_check);
        let outcome = loop {
            tokio::select! {
                () = token.cancelled() => return,
                () = backend.passive_failure_reported() => {
                    let failures = backend.take_passive_failures().min(health.fall);
                    for _ in 0..failures {
                        apply(&backend, &mut health, Err(CheckError::ProxyConnectFailed));
                    }
                }
                outcome = &mut next_check => break outcome,
            }
        };
        apply(&backend, &mut health, outcome);
    }
}

/// Feeds one outcome to the counter; on a transition, updates the backend, counts and logs.
fn apply(backend: &Backend, health: &mut RiseFall, outcome: Result<(), CheckError>) {
    if let Err(error) = &outcome {
        debug!(backend = backend.name(), addr = %backend.addr(), error = %error, "health check failed");
    }
    match (health.record(outcome.is_ok()), outcome) {
        (Some(Transition::Down), Err(error)) => {
            backend.set_up(false);
            backend.stats().transitions_down.fetch_add(1, Relaxed);
            warn!(backend = backend.name(), addr = %backend.addr(), state = "down", reason = %error, "backend marked down");
        }
        (Some(Transition::Up), _) => {
            backend.set_up(true);
            backend.stats().transitions_up.fetch_add(1, Relaxed);
            info!(backend = backend.name(), addr = %backend.addr(), state = "up", "backend marked up");
        }
        // A pass never takes a backend down.
        (Some(Transition::Down), Ok(())) | (None, _) => {}
    }
}

/// The bytes of one check request.
fn check_request(path: &str, addr: SocketAddr) -> Vec<u8> {
    format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: scaleout-lb-health\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

/// One check: passes if `addr` answers `request` with status `expect` within `limit`.
async fn check(
    addr: SocketAddr,
    request: &[u8],
    expect: u16,
    limit: Duration,
) -> Result<(), CheckError> {
    match time::timeout(limit, exchange(addr, request, expect, limit)).await {
        Ok(outcome) => outcome,
        Err(_elapsed) => Err(CheckError::Timeout(limit)),
    }
}

async fn exchange(
    addr: SocketAddr,
    request: &[u8],
    expect: u16,
    limit: Duration,
) -> Result<(), CheckError> {
    let mut conn = upstream::open(addr, limit)
        .await
        .map_err(CheckError::Connect)?;
    conn.stream
        .write_all(request)
        .await
        .map_err(CheckError::Io)?;
    // The answer is read as the proxy reads any backend's (limits, interim 1xx skipped).
    let head = crate::backends::exchange::read_response_head(&mut conn, &Method::GET)
        .await
        .map_err(|e| match e {
            ExchangeError::Closed(_) => CheckError::Closed,
            ExchangeError::BadResponse(why) => CheckError::Malformed(why),
            other => CheckError::Io(io::Error::other(other)),
        })?;
    let got = head.status.as_u16();
    if got == expect {
        Ok(())
    } else {
        Err(CheckError::Status {
            got,
            expected: expect,
        })
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio::time::Instant;

    use super::*;
    use crate::backends::balance::Policy;

    #[test]
    fn falls_after_fall_consecutive_failures() {
        let mut c = RiseFall::new(2, 3, true);
        assert_eq!(c.record(false), None);
        assert_eq!(c.record(false), None);
        assert!(c.is_up());
        assert_eq!(c.record(false), Some(Transition::Down));
        assert!(!c.is_up());
        // Further failures change nothing.
        assert_eq!(c.record(false), None);
    }

    #[test]
    fn a_pass_resets_the_failure_streak() {
        let mut c = RiseFall::new(2, 3, true);
        for _ in 0..10 {
            assert_eq!(c.record(false), None);
            assert_eq!(c.record(false), None);
            assert_eq!(c.record(true), None);
        }
        assert!(c.is_up());
    }

    #[test]
    fn rises_after_rise_consecutive_passes() {
        let mut c = RiseFall::new(2, 3, false);
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(false), None, "a failure resets the rise streak");
        assert_eq!(c.record(true), None);
        assert_eq!(c.record(true), Some(Transition::Up));
        assert!(c.is_up());
        assert_eq!(c.record(true), None);
    }

    #[test]
    fn zero_thresholds_act_as_one() {
        let mut c = RiseFall::new(0, 0, true);
        assert_eq!(c.record(false), Some(Transition::Down));
        assert_eq!(c.record(true), Some(Transition::Up));
    }

    #[test]
    fn defaults_are_haproxys() {
        let d = HealthConfig::default();
        assert!(d.enabled);
        assert_eq!((d.interval, d.rise, d.fall), (Duration::from_secs(2), 2, 3));
        assert_eq!((d.path.as_str(), d.expect_status), ("/healthz", 200));
    }

    /// Serves each accepted connection `response` once, after reading the request head.
    async fn answering(response: &'static str) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = vec![0; 1024];
                let _ = stream.read(&mut buf).await;
                let _ = stream.write_all(response.as_bytes()).await;
            }
        });
        addr
    }

    #[tokio::test]
    async fn check_reads_the_status() {
        let limit = Duration::from_secs(10);
        let req = check_request("/healthz", "127.0.0.1:1".parse().unwrap());
        let ok = answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        assert!(check(ok, &req, 200, limit).await.is_ok());
        let hinted = answering(
            "HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        )
        .await;
        assert!(check(hinted, &req, 200, limit).await.is_ok());
        let draining = answering("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        assert!(matches!(
            check(draining, &req, 200, limit).await,
            Err(CheckError::Status {
                got: 503,
                expected: 200
            })
        ));
        let garbage = answering("SSH-2.0-OpenSSH_9.2\r\n\r\n").await;
        assert!(matches!(
            check(garbage, &req, 200, limit).await,
            Err(CheckError::Malformed(_))
        ));
        let silent_close = answering("").await;
        assert!(matches!(
            check(silent_close, &req, 200, limit).await,
            Err(CheckError::Closed)
        ));
    }

    #[test]
    fn request_is_a_plain_get() {
        let req = check_request("/healthz", "[::1]:80".parse().unwrap());
        assert_eq!(
            String::from_utf8(req).unwrap(),
            "GET /healthz HTTP/1.1\r\nHost: [::1]:80\r\nUser-Agent: scaleout-lb-health\r\n\
             Accept: */*\r\nConnection: close\r\n\r\n"
        );
    }

    /// A pool of one backend that accepts connections (the kernel completes the handshake)
    /// but never answers; the listener must outlive the test.
    async fn silent_backend(name: &str) -> (TcpListener, Arc<Pool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = Backend::new(name.into(), listener.local_addr().unwrap(), 1);
        let pool = Arc::new(Pool::new(vec![Arc::new(backend)], Policy::RoundRobin));
        (listener, pool)
    }

    /// Yields (in virtual time) until `cond` holds or `limit` of virtual time has passed.
    async fn until(limit: Duration, cond: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while !cond() {
            if Instant::now() >= deadline {
                return false;
            }
            time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswering_backend_goes_down_after_fall_intervals() {
        let (_listener, pool) = silent_backend("silent").await;
        let backend = Arc::clone(&pool.backends()[0]);
        let cfg = HealthConfig {
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(1),
            fall: 3,
            ..HealthConfig::default()
        };
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        spawn(Arc::clone(&pool), cfg, token.clone(), &tracker);

        // Checks start at 0 s, 10 s and 20 s; each fails at its 1 s timeout.
        assert!(!until(Duration::from_secs(20), || !backend.is_up()).await);
        assert!(until(Duration::from_secs(2), || !backend.is_up()).await);
        assert_eq!(backend.stats().transitions_down.load(Relaxed), 1);
        assert_eq!(backend.stats().transitions_up.load(Relaxed), 0);

        token.cancel();
        tracker.close();
        assert!(
            time::timeout(Duration::from_secs(1), tracker.wait())
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reported_connect_failures_count_at_once() {
        let (_listener, pool) = silent_backend("refusing").await;
        let backend = Arc::clone(&pool.backends()[0]);
        let cfg = HealthConfig {
            interval: Duration::from_secs(3600),
            timeout: Duration::from_secs(1800),
            fall: 2,
            ..HealthConfig::default()
        };
        let (token, tracker) = (CancellationToken::new(), TaskTracker::new());
        spawn(Arc::clone(&pool), cfg, token.clone(), &tracker);

        backend.report_connect_failure();
        assert!(!until(Duration::from_secs(60), || !backend.is_up()).await);
        backend.report_connect_failure();
        // Long before the first (hanging) check could time out.
        assert!(until(Duration::from_secs(60), || !backend.is_up()).await);
        assert_eq!(backend.stats().connect_failures.load(Relaxed), 2);
        assert_eq!(backend.stats().transitions_down.load(Relaxed), 1);
        token.cancel();
    }

    #[tokio::test]
    async fn disabled_checks_start_nothing() {
        let (_listener, pool) = silent_backend("unchecked").await;
        let tracker = TaskTracker::new();
        let cfg = HealthConfig {
            enabled: false,
            ..HealthConfig::default()
        };
        spawn(pool, cfg, CancellationToken::new(), &tracker);
        assert!(tracker.is_empty());
    }
}
