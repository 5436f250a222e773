//! The ACME task: when each certificate is due, ordering it, retrying failures with capped,
//! jittered backoff, and swapping the result in.
//!
//! [`Renewer::start`] runs before the listeners accept: it opens the storage (refusing loose
//! permissions) and installs every stored certificate that still names the configured domains
//! and has not expired. [`Renewer::run`] then loops: the certificate due soonest is waited for
//! (at most [`RECHECK`] at a time, so a changed renewal window is seen), ordered, stored and
//! installed. A certificate is due at the start of the CA's ACME Renewal Information window
//! (RFC 9773; a random point in the window, as the RFC asks) when the CA offers one, else
//! `renew_before` ahead of its expiry (default: when a third of its lifetime is left); a
//! missing one is due at once. A failed order is logged with the CA's problem document and
//! tried again after 2 s, doubling up to [`BACKOFF_MAX`], each delay drawn between half and
//! all of it; the certificate served meanwhile stays until it expires.
//!
//! On a keepalived pair (`[acme.peer]`) the task also checks every [`HOLDER_POLL`] whether
//! this host holds the virtual address, and pulls what the other host serves at start, every
//! [`PULL_INTERVAL`], when told of an issued certificate, and before each order, adopting any
//! certificate for the same names that expires later than its own (stored like an issued one).
//! Only the holder orders, so one renewal is ordered once: a due certificate on the other host
//! waits for the holder's. When both hold the address (split brain) and can still talk, the
//! host whose peer address is lower orders; when they cannot, both may order, and only the one
//! the CA's validation reaches succeeds. `lb_acme_holder` is set once the task has acted on
//! what it saw (an order it started has ended).

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use instant_acme::{Account, CertificateIdentifier};
use rustls::pki_types::CertificateDer;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::order::{self, OrderError};
use super::peer::{self, Answer, Peer, Request, SharedCertificate};
use super::storage::{Storage, StorageError};
use super::{Acme, Served, served_from_pem};
use crate::config::AcmeConfig;
use crate::metrics::Metrics;

/// First retry delay after a failed order.
pub const BACKOFF_MIN: Duration = Duration::from_secs(2);

/// Longest retry delay (Let's Encrypt allows 5 failed validations per name an hour).
pub const BACKOFF_MAX: Duration = Duration::from_secs(3600);

/// Shortest time between two orders of one certificate, however early its renewal window
/// opens (a CA or a `renew_before` longer than the lifetime must not make lb order in a loop).
pub const ORDER_INTERVAL_MIN: Duration = Duration::from_secs(10);

/// Longest wait before a certificate's renewal time is computed again.
pub const RECHECK: Duration = Duration::from_secs(6 * 3600);

/// On a pair: how often the task checks whether this host holds the virtual address.
pub const HOLDER_POLL: Duration = Duration::from_secs(1);

/// On a pair: how often the certificates the other host serves are pulled (and at once when it
/// says it issued one).
pub const PULL_INTERVAL: Duration = Duration::from_secs(60);

/// The ACME task's state.
pub struct Renewer {
    acme: Arc<Acme>,
    config: AcmeConfig,
    storage: Storage,
    metrics: Arc<Metrics>,
    /// The account, once loaded or created (kept across orders).
    account: Option<Account>,
}

/// The current time in Unix seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The `n`th retry delay (n ≥ 1) before jitter: 2 s doubling, capped.
pub fn backoff(n: u32) -> Duration {
    BACKOFF_MIN
        .saturating_mul(1u32 << n.saturating_sub(1).min(20))
        .min(BACKOFF_MAX)
}

/// `d` scaled to a point between half of it and all of it, `unit` in `[0, 1)`.
pub fn jitter(d: Duration, unit: f64) -> Duration {
    d.mul_f64(0.5 + unit.clamp(0.0, 1.0) / 2.0)
}

/// A uniform random number in `[0, 1)` from the system's generator.
fn random_unit() -> f64 {
    let mut bytes = [0u8; 8];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    (u64::from_le_bytes(bytes) >> 11) as f64 / (1u64 << 53) as f64
}

/// When a certificate valid `not_before..not_after` is renewed without ARI: `renew_before`
/// ahead of expiry, or with a third of its lifetime left (Unix seconds).
pub fn renew_at(not_before: i64, not_after: i64, renew_before: Option<Duration>) -> i64 {
    match renew_before {
        Some(d) => not_after - d.as_secs() as i64,
        None => not_after - (not_after - not_before).max(0) / 3,
    }
}

impl Renewer {
    /// Opens the storage and installs the stored certificates (see the module docs).
    pub fn start(
        acme: Arc<Acme>,
        config: AcmeConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Renewer, StorageError> {
        let storage = Storage::open(&config.storage)?;
        let now = unix_now();
        for names in &config.domains {
            let Some(first) = names.first() else { continue };
            let path = storage.certificate_path(first);
            let pem = match std::fs::read_to_string(&path) {
                Ok(pem) => pem,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "stored certificate unreadable; ordering a new one");
                    continue;
                }
            };
            match served_from_pem(names, &pem) {
                Ok(s) if s.not_after <= now => {
                    info!(names = ?names, "stored certificate has expired; ordering a new one");
                }
                Ok(s) => {
                    info!(names = ?names, not_after = s.not_after, file = %path.display(),
                          "serving the stored certificate");
                    acme.install(Arc::new(s), &metrics);
                }
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "stored certificate unusable; ordering a new one");
                }
            }
        }
        Ok(Renewer {
            acme,
            config,
            storage,
            metrics,
            account: None,
        })
    }

    /// Orders and renews until `token` is cancelled (see the module docs).
    pub async fn run(mut self, token: CancellationToken) {
        let n = self.config.domains.len();
        let mut next: Vec<Instant> = vec![Instant::now(); n];
        let mut failures = vec![0u32; n];
        let peer = self.acme.peer.clone();
        let mut holder = peer.is_none();
        self.metrics.acme_holder.store(u64::from(holder), Relaxed);
        let mut pull_at = Instant::now();
        loop {
            let Some(mut wake) = next.iter().min().copied() else {
                return;
            };
            if peer.is_some() {
                wake = wake.min(Instant::now() + HOLDER_POLL).min(pull_at);
            }
            let nudged = async {
                match &peer {
                    Some(p) => p.pull.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep_until(wake) => {}
                () = nudged => pull_at = Instant::now(),
            }
            if let Some(p) = &peer {
                let holds = peer::holds(p.config.virtual_address);
                if holds != holder {
                    holder = holds;
                    if holder {
                        info!(virtual_address = %p.config.virtual_address,
                              "this host holds the pair's virtual address: it orders");
                    } else {
                        info!(virtual_address = %p.config.virtual_address,
                              "the other host holds the pair's virtual address: it orders");
                    }
                    // The new holder checks every certificate now; the old one stops ordering.
                    next.fill(Instant::now());
                    failures.fill(0);
                }
                if Instant::now() >= pull_at {
                    tokio::select! {
                        () = token.cancelled() => return,
                        _ = self.pull(p) => {}
                    }
                    pull_at = Instant::now() + PULL_INTERVAL;
                }
            }
            for i in 0..n {
                if next[i] > Instant::now() {
                    continue;
                }
                let step = self.step(i, &mut failures[i], peer.as_deref(), holder);
                next[i] = tokio::select! {
                    () = token.cancelled() => return,
                    at = step => at,
                };
            }
            self.metrics.acme_holder.store(u64::from(holder), Relaxed);
        }
    }

    /// Certificate `i`'s turn: ordered if it is due and this host orders (see the module
    /// docs); returns when its next turn is.
    async fn step(
        &mut self,
        i: usize,
        failures: &mut u32,
        peer: Option<&Peer>,
        holder: bool,
    ) -> Instant {
        if *failures == 0 {
            let wait = self.until_due(i).await;
            if !wait.is_zero() {
                return Instant::now() + wait.min(RECHECK);
            }
        }
        if let Some(p) = peer {
            if !holder {
                debug!(names = ?self.config.domains[i],
                       "due, but the other host holds the virtual address and orders it");
                *failures = 0;
                return Instant::now() + PULL_INTERVAL;
            }
            // The address may have just moved here from a host that renewed it already.
            let peer_holds = self.pull(p).await;
            let wait = self.until_due(i).await;
            if !wait.is_zero() {
                *failures = 0;
                return Instant::now() + wait.min(RECHECK);
            }
            if peer_holds == Some(true) && p.config.address < p.config.listen {
                warn!(virtual_address = %p.config.virtual_address, peer = %p.config.address,
                      "both hosts hold the virtual address (split brain); the peer, whose \
                       address is lower, orders");
                return Instant::now() + PULL_INTERVAL;
            }
        }
        match self.renew(i).await {
            Ok(()) => {
                *failures = 0;
                if let Some(p) = peer
                    && let Err(e) = p.ask(&Request::Issued).await
                {
                    warn!(error = %e, "could not tell the peer of the new certificate; it pulls \
                                       within a minute");
                }
                Instant::now() + ORDER_INTERVAL_MIN
            }
            Err(e) => {
                *failures += 1;
                self.metrics.acme_orders_failed.fetch_add(1, Relaxed);
                let delay = jitter(backoff(*failures), random_unit());
                let shown = Duration::from_millis(delay.as_millis() as u64);
                warn!(names = ?self.config.domains[i], directory = %self.config.directory,
                      attempt = *failures, retry_in = %humantime::format_duration(shown),
                      error = %e, "ACME order failed; the current certificate keeps serving");
                Instant::now() + delay
            }
        }
    }

    /// Pulls the certificates the peer serves and adopts each newer one; whether the peer
    /// holds the virtual address (`None`: it could not be asked; logged).
    async fn pull(&mut self, peer: &Peer) -> Option<bool> {
        match peer.ask(&Request::Certificates).await {
            Ok(Answer::Certificates {
                holder,
                certificates,
            }) => {
                for c in certificates {
                    self.adopt(c);
                }
                Some(holder)
            }
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "could not pull certificates from the peer; serving what \
                                   this host has");
                None
            }
        }
    }

    /// Serves and stores `shared` if it is for a configured certificate (the same names), is
    /// valid now and expires later than what this host serves for it.
    fn adopt(&mut self, shared: SharedCertificate) {
        let same = |names: &&Vec<String>| {
            names.len() == shared.names.len()
                && names
                    .iter()
                    .zip(&shared.names)
                    .all(|(a, b)| a.eq_ignore_ascii_case(b))
        };
        let Some(names) = self.config.domains.iter().find(same) else {
            debug!(names = ?shared.names, "the peer serves a certificate not configured here");
            return;
        };
        let Some(first) = names.first() else { return };
        let served = match served_from_pem(names, &shared.pem) {
            Ok(s) => s,
            Err(e) => {
                warn!(names = ?names, error = %e, "the peer's certificate is unusable");
                return;
            }
        };
        let now = unix_now();
        let current = self.acme.served(first).map_or(i64::MIN, |s| s.not_after);
        if served.not_after <= current || served.not_after <= now || served.not_before > now {
            return;
        }
        if let Err(e) = self.storage.save_certificate(first, &shared.pem) {
            warn!(names = ?names, error = %e, "could not store the peer's certificate; serving it");
        }
        self.metrics.acme_peer_adopted.fetch_add(1, Relaxed);
        info!(names = ?names, not_after = served.not_after,
              "adopted the certificate the other host issued; serving it");
        self.acme.install(Arc::new(served), &self.metrics);
    }

    /// How long until certificate `i` is due (zero: now).
    async fn until_due(&mut self, i: usize) -> Duration {
        let Some(first) = self.config.domains[i].first() else {
            return RECHECK;
        };
        let Some(served) = self.acme.served(first) else {
            return Duration::ZERO;
        };
        let mut at = renew_at(
            served.not_before,
            served.not_after,
            self.config.renew_before,
        );
        if let Some(window) = self.renewal_window(&served).await {
            at = window;
        }
        Duration::from_secs((at - unix_now()).max(0) as u64)
    }

    /// A point in the CA's ARI window for `served` (Unix seconds), when the account is loaded
    /// and the CA offers ARI.
    async fn renewal_window(&self, served: &Served) -> Option<i64> {
        let account = self.account.as_ref()?;
        let leaf: &CertificateDer<'_> = served.key.cert.first()?;
        let id = CertificateIdentifier::try_from(leaf).ok()?;
        let (info, _) = account.renewal_info(&id).await.ok()?;
        let start = info.suggested_window.start.unix_timestamp();
        let end = info.suggested_window.end.unix_timestamp().max(start);
        Some(start + ((end - start) as f64 * random_unit()) as i64)
    }

    /// Orders certificate `i`, stores it and serves it.
    async fn renew(&mut self, i: usize) -> Result<(), OrderError> {
        let names = self.config.domains[i].clone();
        info!(names = ?names, directory = %self.config.directory,
              challenge = self.config.challenge.name(), "ordering a certificate");
        let account = match &self.account {
            Some(a) => a.clone(),
            None => {
                let a = order::account(&self.config, &self.storage).await?;
                self.account = Some(a.clone());
                a
            }
        };
        let issued = order::order(
            &account,
            &names,
            self.config.challenge,
            &self.acme.challenges,
            self.acme.peer.as_deref(),
        )
        .await?;
        let served = served_from_pem(&names, &issued.pem).map_err(OrderError::Local)?;
        let first = names.first().map_or("", String::as_str);
        self.storage.save_certificate(first, &issued.pem)?;
        self.metrics.acme_orders_ok.fetch_add(1, Relaxed);
        info!(names = ?names, not_after = served.not_after, "certificate issued; serving it");
        self.acme.install(Arc::new(served), &self.metrics);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_two_seconds_up_to_an_hour() {
        let secs: Vec<u64> = (1..=13).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(
            secs,
            [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600, 3600]
        );
        assert_eq!(backoff(u32::MAX), BACKOFF_MAX);
    }

    #[test]
    fn jitter_stays_between_half_and_all() {
        let d = Duration::from_secs(100);
        assert_eq!(jitter(d, 0.0), Duration::from_secs(50));
        assert_eq!(jitter(d, 1.0), d);
        for _ in 0..100 {
            let j = jitter(d, random_unit());
            assert!(j >= Duration::from_secs(50) && j <= d, "{j:?}");
        }
    }

    #[test]
    fn renewal_time_is_a_third_of_the_lifetime_unless_configured() {
        assert_eq!(renew_at(0, 90, None), 60);
        assert_eq!(renew_at(1000, 1000 + 90 * 86400, None), 1000 + 60 * 86400);
        assert_eq!(
            renew_at(0, 90 * 86400, Some(Duration::from_secs(86400))),
            89 * 86400
        );
    }
}
