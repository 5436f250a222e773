//! Backend selection: which upstream gets the next connection.
//!
//! How it works: [`Pool`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};

use tokio::sync::Notify;

/// Largest accepted backend weight (HAProxy's limit). Larger weights are clamped to it; config
/// validation should reject them so the operator hears about it.
pub const MAX_WEIGHT: u32 = 256;

/// How a [`Pool`] chooses among its healthy backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Each backend in turn, in proportion to its weight (HAProxy `balance roundrobin`).
    #[default]
    RoundRobin,
    /// The backend with the fewest active leases relative to its weight (HAProxy
    /// `balance leastconn`): the better choice for long-lived WebSocket tunnels.
    LeastConnections,
}

impl Policy {
    /// The name used in configuration files and in the stats views.
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConnections => "least-connections",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A balancing policy name that is not one of the accepted spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown balancing policy {0:?} (expected \"round-robin\" or \"least-connections\"; \
     HAProxy's \"roundrobin\" and \"leastconn\" are accepted too)"
)]
pub struct UnknownPolicy(pub String);

impl FromStr for Policy {
    type Err = UnknownPolicy;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" | "roundrobin" => Ok(Policy::RoundRobin),
            "least-connections" | "leastconn" => Ok(Policy::LeastConnections),
            other => Err(UnknownPolicy(other.to_owned())),
        }
    }
}

/// Traffic and health counters of one backend. The proxy updates them with
/// `fetch_add(.., Relaxed)`; the admin views read them.
#[derive(Debug, Default)]
pub struct BackendStats {
    /// HTTP requests forwarded to this backend.
    pub requests: AtomicU64,
    /// WebSocket tunnels currently spliced to this backend.
    pub tunnels_active: AtomicU64,
    /// WebSocket tunnels ever established to this backend.
    pub tunnels_total: AtomicU64,
    /// Bytes sent from clients to this backend.
    pub bytes_to_backend: AtomicU64,
    /// Bytes sent from this backend to clients.
    pub bytes_to_client: AtomicU64,
    /// Requests or tunnels that failed after the connection to the backend was made.
    pub errors: AtomicU64,
    /// Attempts to connect to this backend that failed (see [`Backend::report_connect_failure`]).
    pub connect_failures: AtomicU64,
    /// Times the health checker marked this backend up after it was down.
    pub transitions_up: AtomicU64,
    /// Times the health checker marked this backend down.
    pub transitions_down: AtomicU64,
}

/// One upstream server. Shared as `Arc<Backend>` between the pool, the health checker, the
/// proxy's leases and the admin views.
#[derive(Debug)]
pub struct Backend {
    name: String,
    addr: SocketAddr,
    /// Clamped to [`MAX_WEIGHT`]; changed in place by a reload, so draining a backend with
    /// weight 0 keeps its state, counters and open tunnels.
    weight: AtomicU32,
    /// Health state; starts up, like HAProxy, and is flipped only by the health checker.
    up: AtomicBool,
    /// Live [`Lease`]s: connections or tunnels currently using this backend.
    active: AtomicU64,
    stats: BackendStats,
    /// Connect failures the health checker has not yet counted.
    passive_failures: AtomicU32,
    /// Wakes this backend's health checker when a connect failure is reported, so a dead
    /// backend is taken out without waiting for the next check interval.
    passive_wake: Notify,
}

impl Backend {
    /// A backend that starts up (as HAProxy does). `weight` is clamped to [`MAX_WEIGHT`];
    /// weight 0 keeps the backend in the stats but sends it no new connections.
    pub fn new(name: String, addr: SocketAddr, weight: u32) -> Self {
        Backend {
            name,
            addr,
            weight: AtomicU32::new(weight.min(MAX_WEIGHT)),
            up: AtomicBool::new(true),
            active: AtomicU64::new(0),
            stats: BackendStats::default(),
            passive_failures: AtomicU32::new(0),
            passive_wake: Notify::new(),
        }
    }

    /// Where the backend listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The operator's name for the backend (config `name`, else its address).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its weight after clamping.
    pub fn weight(&self) -> u32 {
        self.weight.load(Relaxed)
    }

    /// Sets a new weight (clamped to [`MAX_WEIGHT`]), as a reload does; pools built afterwards
    /// schedule by it, and a weight of 0 stops new connections at once.
    pub fn set_weight(&self, weight: u32) {
        self.weight.store(weight.min(MAX_WEIGHT), Relaxed);
    }

    /// Whether the health checker currently considers the backend able to serve.
    pub fn is_up(&self) -> bool {
        self.up.load(Relaxed)
    }

    /// Number of live leases: the active connections and tunnels least-connections balances.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }

    /// Holds one active connection or tunnel on this backend until the lease is dropped.
    pub fn lease(self: &Arc<Self>) -> Lease {
        self.active.fetch_add(1, Relaxed);
        Lease {
            backend: Arc::clone(self),
        }
    }

    /// Traffic and health counters.
    pub fn stats(&self) -> &BackendStats {
        &self.stats
    }

    /// Passive health signal: the proxy could not connect to this backend.
    ///
    /// Counts in `connect_failures` and, when active health checks run, as one failed check
    /// toward `fall`: the backend's checker is woken at once, so a backend that refuses
    /// connections goes down after `fall` failed attempts instead of `fall` check intervals.
    /// A later successful check resets the streak, as for any failed check. Without active
    /// checks nothing marks the backend down (nothing could bring it back), so the signal
    /// only counts.
    pub fn report_connect_failure(&self) {
        self.stats.connect_failures.fetch_add(1, Relaxed);
        self.passive_failures.fetch_add(1, Relaxed);
        self.passive_wake.notify_one();
    }

    /// Sets the health state.
    pub(crate) fn set_up(&self, up: bool) {
        self.up.store(up, Relaxed);
    }

    /// Takes the connect failures reported since the last call.
    pub(crate) fn take_passive_failures(&self) -> u32 {
        self.passive_failures.swap(0, Relaxed)
    }

    /// Resolves when [`Backend::report_connect_failure`] has been called (a call made while
    /// nobody waits is remembered for the next waiter).
    pub(crate) async fn passive_failure_reported(&self) {
        self.passive_wake.notified().await;
    }
}

/// One active connection or tunnel on a backend; dropping it releases the count that
/// least-connections balances on.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
}

impl Lease {
    /// The leased backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.active.fetch_sub(1, Relaxed);
    }
}

/// The backends of one configuration generation and the policy that chooses among them.
///
/// A [`Pool`] holds the configured [`Backend`]s and a [`Policy`]. The proxy calls
/// [`Pool::pick`] for each new client connection (passing the backends it already failed to
/// reach, so a retry goes elsewhere), takes a [`Lease`] on the chosen backend for as long as the
/// connection or tunnel lives, and bumps the backend's [`BackendStats`] as bytes and requests
/// flow. The health checker (`health`) flips each backend's up/down state; `pick` only ever
/// returns backends that are up, have a non-zero weight and are not excluded.
///
/// The hot path takes no lock and allocates nothing: backend state and counts are atomics,
/// round-robin advances one shared `AtomicUsize` cursor through a precomputed smooth weighted
/// round-robin schedule (nginx's algorithm, computed once in [`Pool::new`]), and
/// least-connections compares the live lease counts divided by weight, starting its scan at a
/// rotating offset so ties are spread round-robin.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<Backend>>,
    policy: Policy,
    /// One cycle of smooth weighted round-robin: indices into `backends`, each appearing
    /// `weight / gcd` times, interleaved.
    schedule: Box<[u32]>,
    /// Shared position in `schedule` (round-robin) or scan offset (least-connections).
    cursor: AtomicUsize,
}

impl Pool {
    /// A pool over `backends`, choosing by `policy`.
    pub fn new(backends: Vec<Arc<Backend>>, policy: Policy) -> Self {
        let weights: Vec<u32> = backends.iter().map(|b| b.weight()).collect();
        Pool {
            schedule: smooth_schedule(&weights),
            backends,
            policy,
            cursor: AtomicUsize::new(0),
        }
    }

    /// All backends, up or down, in configuration order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// The balancing policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// A backend that is up, has a non-zero weight and whose address is not in `exclude`
    /// (the backends this request already failed to reach), or `None` if there is none.
    pub fn pick(&self, exclude: &[SocketAddr]) -> Option<Arc<Backend>> {
        let eligible = |b: &Backend| b.weight() > 0 && b.is_up() && !exclude.contains(&b.addr);
        let chosen = match self.policy {
            Policy::RoundRobin => self.pick_round_robin(eligible),
            Policy::LeastConnections => self.pick_least_connections(eligible),
        };
        chosen.map(Arc::clone)
    }

    /// Walks the schedule from the shared cursor. An ineligible slot is skipped by taking the
    /// next cursor value, so the slot is consumed and the remaining backends keep their
    /// weighted proportions (instead of the next backend in line inheriting the share).
    fn pick_round_robin(&self, eligible: impl Fn(&Backend) -> bool) -> Option<&Arc<Backend>> {
        if !self.backends.iter().any(|b| eligible(b)) {
            return None;
        }
        for _ in 0..self.schedule.len() {
            let slot = self.cursor.fetch_add(1, Relaxed) % self.schedule.len();
            let backend = self
                .schedule
                .get(slot)
                .and_then(|&i| self.backends.get(i as usize));
            if let Some(backend) = backend.filter(|b| eligible(b)) {
                return Some(backend);
            }
        }
        // Other pickers consumed the eligible slots meanwhile: any eligible backend will do.
        self.backends.iter().find(|b| eligible(b))
    }

    /// The eligible backend with the lowest `(active + 1) / weight`, scanning from a rotating
    /// offset so equally loaded backends take turns.
    fn pick_least_connections(&self, eligible: impl Fn(&Backend) -> bool) -> Option<&Arc<Backend>> {
        let n = self.backends.len();
        if n == 0 {
            return None;
        }
        let start = self.cursor.fetch_add(1, Relaxed) % n;
        let rotated = self.backends[start..].iter().chain(&self.backends[..start]);
        let mut best: Option<(&Arc<Backend>, u128)> = None;
        for backend in rotated.filter(|b| eligible(b)) {
            let load = u128::from(backend.active()) + 1;
            let lower = match best {
                None => true,
                // load / weight < best_load / best_weight, without division.
                Some((b, best_load)) => {
                    load * u128::from(b.weight()) < best_load * u128::from(backend.weight())
                }
            };
            if lower {
                best = Some((backend, load));
            }
        }
        best.map(|(b, _)| b)
    }
}

/// One cycle of nginx's smooth weighted round-robin over `weights` (reduced by their greatest
/// common divisor): each index appears `weight / gcd` times, spread out rather than bunched.
fn smooth_schedule(weights: &[u32]) -> Box<[u32]> {
    let divisor = weights.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w / divisor)).collect();
    let total: i64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::new();
    for _ in 0..total {
        for (c, w) in current.iter_mut().zip(&weights) {
            *c += w;
        }
        // The highest current weight wins; ties go to the earliest backend.
        let best = (0..current.len()).fold(
            0,
            |best, i| {
                if current[i] > current[best] { i } else { best }
            },
        );
        current[best] -= total;
        // Indices fit: a pool never holds anywhere near u32::MAX backends.
        schedule.push(u32::try_from(best).unwrap_or(u32::MAX));
    }
    schedule.into_boxed_slice()
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(port: u16, weight: u32) -> Arc<Backend> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Arc::new(Backend::new(format!("app{port}"), addr, weight))
    }

    /// How many of `picks` went to each backend, in pool order.
    fn spread(pool: &Pool, picks: usize, exclude: &[SocketAddr]) -> Vec<usize> {
        let mut counts = vec![0; pool.backends().len()];
        for _ in 0..picks {
            let chosen = pool.pick(exclude).expect("a backend is eligible");
            let i = pool
                .backends()
                .iter()
                .position(|b| Arc::ptr_eq(b, &chosen))
                .unwrap();
            counts[i] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_takes_turns_evenly() {
        let pool = Pool::new(
            vec![backend(1, 1), backend(2, 1), backend(3, 1)],
            Policy::RoundRobin,
        );
        let order: Vec<u16> = (0..6)
            .map(|_| pool.pick(&[]).unwrap().addr().port())
            .collect();
        assert_eq!(order, [1, 2, 3, 1, 2, 3]);
        assert_eq!(spread(&pool, 300, &[]), [100, 100, 100]);
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let pool = Pool::new(vec![backend(1, 3), backend(2, 1)], Policy::RoundRobin);
        let order: Vec<u16> = (0..4)
            .map(|_| pool.pick(&[]).unwrap().addr().port())
            .collect();
        // Smooth: the light backend is placed between the heavy one's turns.
        assert_eq!(order, [1, 1, 2, 1]);
        assert_eq!(spread(&pool, 400, &[]), [300, 100]);

        let pool = Pool::new(
            vec![backend(1, 5), backend(2, 1), backend(3, 1)],
            Policy::RoundRobin,
        );
        let order: Vec<u16> = (0..7)
            .map(|_| pool.pick(&[]).unwrap().addr().port())
            .collect();
        assert_eq!(order, [1, 1, 2, 1, 3, 1, 1]);
    }

    #[test]
    fn schedule_is_reduced_by_the_common_divisor() {
        assert_eq!(&*smooth_schedule(&[4, 2]), &[0, 1, 0]);
        assert_eq!(&*smooth_schedule(&[256, 256]), &[0, 1]);
        assert_eq!(&*smooth_schedule(&[3, 0, 1]), &[0, 0, 2, 0]);
        assert!(smooth_schedule(&[]).is_empty());
        assert!(smooth_schedule(&[0, 0]).is_empty());
    }

    #[test]
    fn weights_above_the_limit_are_clamped() {
        assert_eq!(backend(1, 10_000).weight(), MAX_WEIGHT);
    }

    #[test]
    fn down_backends_are_skipped_and_the_rest_stay_even() {
        let pool = Pool::new(
            vec![backend(1, 1), backend(2, 1), backend(3, 1)],
            Policy::RoundRobin,
        );
        pool.backends()[0].set_up(false);
        assert_eq!(spread(&pool, 300, &[]), [0, 150, 150]);

        let pool = Pool::new(
            vec![backend(1, 1), backend(2, 2), backend(3, 1)],
            Policy::RoundRobin,
        );
        pool.backends()[0].set_up(false);
        assert_eq!(spread(&pool, 300, &[]), [0, 200, 100]);
    }

    #[test]
    fn excluded_addresses_are_never_picked() {
        for policy in [Policy::RoundRobin, Policy::LeastConnections] {
            let pool = Pool::new(vec![backend(1, 1), backend(2, 1), backend(3, 1)], policy);
            let exclude = [pool.backends()[1].addr()];
            assert_eq!(spread(&pool, 100, &exclude)[1], 0, "{policy}");
            let all: Vec<SocketAddr> = pool.backends().iter().map(|b| b.addr()).collect();
            assert!(pool.pick(&all).is_none(), "{policy}");
        }
    }

    #[test]
    fn nothing_eligible_gives_none() {
        for policy in [Policy::RoundRobin, Policy::LeastConnections] {
            assert!(Pool::new(Vec::new(), policy).pick(&[]).is_none());
            let pool = Pool::new(vec![backend(1, 1), backend(2, 1)], policy);
            for b in pool.backends() {
                b.set_up(false);
            }
            assert!(pool.pick(&[]).is_none(), "{policy}");
            pool.backends()[1].set_up(true);
            assert_eq!(pool.pick(&[]).unwrap().addr().port(), 2, "{policy}");
        }
    }

    #[test]
    fn weight_zero_drains() {
        for policy in [Policy::RoundRobin, Policy::LeastConnections] {
            let pool = Pool::new(vec![backend(1, 0), backend(2, 1)], policy);
            assert_eq!(spread(&pool, 10, &[]), [0, 10], "{policy}");
            let pool = Pool::new(vec![backend(1, 0)], policy);
            assert!(pool.pick(&[]).is_none(), "{policy}");
        }
    }

    #[test]
    fn least_connections_picks_the_less_loaded() {
        let pool = Pool::new(vec![backend(1, 1), backend(2, 1)], Policy::LeastConnections);
        let busy = pool.backends()[0].lease();
        for _ in 0..5 {
            assert_eq!(pool.pick(&[]).unwrap().addr().port(), 2);
        }
        drop(busy);
        assert_eq!(pool.backends()[0].active(), 0);
        // Equal load: ties take turns.
        assert_eq!(spread(&pool, 10, &[]), [5, 5]);
    }

    #[test]
    fn least_connections_spreads_held_leases_by_weight() {
        let pool = Pool::new(vec![backend(1, 2), backend(2, 1)], Policy::LeastConnections);
        // Every pick holds its lease, as long-lived tunnels do.
        let leases: Vec<Lease> = (0..30).map(|_| pool.pick(&[]).unwrap().lease()).collect();
        assert_eq!(pool.backends()[0].active(), 20);
        assert_eq!(pool.backends()[1].active(), 10);
        drop(leases);
        assert_eq!(pool.backends()[0].active() + pool.backends()[1].active(), 0);
    }

    #[test]
    fn least_connections_skips_down_backends() {
        let pool = Pool::new(vec![backend(1, 1), backend(2, 1)], Policy::LeastConnections);
        let _busy = pool.backends()[1].lease();
        pool.backends()[0].set_up(false);
        assert_eq!(pool.pick(&[]).unwrap().addr().port(), 2);
    }

    #[test]
    fn connect_failures_are_counted_and_queued_for_the_checker() {
        let b = backend(1, 1);
        b.report_connect_failure();
        b.report_connect_failure();
        assert_eq!(b.stats().connect_failures.load(Relaxed), 2);
        assert_eq!(b.take_passive_failures(), 2);
        assert_eq!(b.take_passive_failures(), 0);
        assert!(
            b.is_up(),
            "a passive failure alone never marks a backend down"
        );
    }

    #[test]
    fn policy_names_round_trip() {
        for policy in [Policy::RoundRobin, Policy::LeastConnections] {
            assert_eq!(policy.to_string().parse::<Policy>(), Ok(policy));
        }
        assert_eq!("roundrobin".parse(), Ok(Policy::RoundRobin));
        assert_eq!("leastconn".parse(), Ok(Policy::LeastConnections));
        assert_eq!(
            "random".parse::<Policy>(),
            Err(UnknownPolicy("random".into()))
        );
        assert_eq!(Policy::default(), Policy::RoundRobin);
    }
}
