//! Process-wide counters and their Prometheus text exposition.
//!
//! How it works: [`Metrics`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::backends::balance::{Backend, Pool};

/// `Content-Type` of the `/metrics` body: the Prometheus text format 0.0.4.
pub const PROMETHEUS_TEXT: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Counters for the whole process (every backend together).
///
/// The proxy bumps the atomics in [`Metrics`] (and each backend's `BackendStats`) with
/// `fetch_add(.., Relaxed)` as connections, requests and tunnels come and go. The catalogues
/// [`GLOBAL`] and [`BACKEND`] describe every exported value once (its stats key, Prometheus
/// family, help text, type and how to read it); [`encode_prometheus`] walks them to produce the
/// `/metrics` body, and the admin stats views walk the same catalogues, so the three views
/// never disagree about what exists.
///
/// The text itself is written by the `prometheus-client` crate: at each scrape a collector
/// (`Scrape`) reads the atomics and the current pool through the catalogues and hands
/// constant counters and gauges to its Prometheus text (0.0.4) encoder, which writes the
/// `# HELP` and `# TYPE` lines, the `_total` suffix of counters and the escaped labels. The hot
/// path never sees the crate: it only bumps atomics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Client connections currently open (TLS and redirect listeners).
    pub connections_active: AtomicU64,
    /// Client connections accepted.
    pub connections_total: AtomicU64,
    /// Client connections refused at the connection limit or near the open-file limit.
    pub connections_rejected: AtomicU64,
    /// TLS handshakes that failed or timed out.
    pub tls_handshake_failures: AtomicU64,
    /// HTTP requests received from clients.
    pub requests_total: AtomicU64,
    /// Responses with a 2xx status sent to clients.
    pub responses_2xx: AtomicU64,
    /// Responses with a 3xx status sent to clients (including the https redirects).
    pub responses_3xx: AtomicU64,
    /// Responses with a 4xx status sent to clients.
    pub responses_4xx: AtomicU64,
    /// Responses with a 5xx status sent to clients (including lb's own 502/503).
    pub responses_5xx: AtomicU64,
    /// WebSocket tunnels currently spliced.
    pub tunnels_active: AtomicU64,
    /// WebSocket tunnels ever established.
    pub tunnels_total: AtomicU64,
    /// Configuration reloads that took effect.
    pub reloads_ok: AtomicU64,
    /// Configuration reloads rejected (the previous configuration kept serving).
    pub reloads_failed: AtomicU64,
    /// ACME orders that ended with a certificate.
    pub acme_orders_ok: AtomicU64,
    /// ACME orders (or account look-ups before one) that failed.
    pub acme_orders_failed: AtomicU64,
    /// 1 when this host may order: a single host, or the pair's holder of the virtual address
    /// at the ACME task's last check (set after the task acted on it).
    pub acme_holder: AtomicU64,
    /// Certificates adopted from the other host of the pair.
    pub acme_peer_adopted: AtomicU64,
    /// Peer channel messages refused (another secret, altered, stale).
    pub acme_peer_refused: AtomicU64,
    /// Expiry of every certificate served: (name, source, Unix seconds). Written when
    /// certificates change, read at scrape time only.
    certificate_expiry: Mutex<Vec<(String, &'static str, i64)>>,
}

impl Metrics {
    /// Replaces the expiry of the certificates from `source` (`file`, `acme`): each
    /// certificate's name (its first DNS name) and `notAfter` in Unix seconds.
    pub fn set_certificate_expiry(&self, source: &'static str, expiry: Vec<(String, i64)>) {
        let mut all = self
            .certificate_expiry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        all.retain(|(_, s, _)| *s != source);
        all.extend(expiry.into_iter().map(|(name, at)| (name, source, at)));
        all.sort();
    }

    /// The expiry of every certificate served: (name, source, Unix seconds).
    pub fn certificate_expiry(&self) -> Vec<(String, &'static str, i64)> {
        self.certificate_expiry
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Counts a response sent to a client in its status class; 1xx (such as a WebSocket's
    /// 101, counted as a tunnel instead) and out-of-range codes are not counted.
    pub fn record_response(&self, status: u16) {
        let counter = match status {
            200..=299 => &self.responses_2xx,
            300..=399 => &self.responses_3xx,
            400..=499 => &self.responses_4xx,
            500..=599 => &self.responses_5xx,
            _ => return,
        };
        counter.fetch_add(1, Relaxed);
    }
}

/// How Prometheus should treat a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (until restart).
    Counter,
    /// Goes up and down.
    Gauge,
}

impl Kind {
    fn metric_type(self) -> MetricType {
        match self {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
        }
    }
}

/// One exported value, read from a `T` (the global [`Metrics`] or one [`Backend`]).
#[derive(Debug)]
pub struct Metric<T> {
    /// Short name: the JSON key and HTML column in the stats views.
    pub key: &'static str,
    /// Prometheus metric family. Consecutive catalogue entries sharing a family are one
    /// family told apart by `label`.
    pub family: &'static str,
    /// The label (name, value) that distinguishes this entry within its family, if shared.
    pub label: Option<(&'static str, &'static str)>,
    /// Prometheus `# HELP` text of the family.
    pub help: &'static str,
    /// Prometheus `# TYPE` of the family.
    pub kind: Kind,
    /// Reads the current value.
    pub read: fn(&T) -> u64,
}

/// Every process-wide value, in exposition order.
pub const GLOBAL: &[Metric<Metrics>] = &[
    Metric {
        key: "connections_active",
        family: "lb_connections_active",
        label: None,
        help: "Client connections currently open.",
        kind: Kind::Gauge,
        read: |m| m.connections_active.load(Relaxed),
    },
    Metric {
        key: "connections_total",
        family: "lb_connections_total",
        label: None,
        help: "Client connections accepted.",
        kind: Kind::Counter,
        read: |m| m.connections_total.load(Relaxed),
    },
    Metric {
        key: "connections_rejected",
        family: "lb_connections_rejected_total",
        label: None,
        help: "Client connections refused at the connection or open-file limit.",
        kind: Kind::Counter,
        read: |m| m.connections_rejected.load(Relaxed),
    },
    Metric {
        key: "tls_handshake_failures",
        family: "lb_tls_handshake_failures_total",
        label: None,
        help: "TLS handshakes that failed or timed out.",
        kind: Kind::Counter,
        read: |m| m.tls_handshake_failures.load(Relaxed),
    },
    Metric {
        key: "requests_total",
        family: "lb_requests_total",
        label: None,
        help: "HTTP requests received from clients.",
        kind: Kind::Counter,
        read: |m| m.requests_total.load(Relaxed),
    },
    Metric {
        key: "responses_2xx",
        family: "lb_responses_total",
        label: Some(("class", "2xx")),
        help: "HTTP responses sent to clients, by status class.",
        kind: Kind::Counter,
        read: |m| m.responses_2xx.load(Relaxed),
    },
    Metric {
        key: "responses_3xx",
        family: "lb_responses_total",
        label: Some(("class", "3xx")),
        help: "HTTP responses sent to clients, by status class.",
        kind: Kind::Counter,
        read: |m| m.responses_3xx.load(Relaxed),
    },
    Metric {
        key: "responses_4xx",
        family: "lb_responses_total",
        label: Some(("class", "4xx")),
        help: "HTTP responses sent to clients, by status class.",
        kind: Kind::Counter,
        read: |m| m.responses_4xx.load(Relaxed),
    },
    Metric {
        key: "responses_5xx",
        family: "lb_responses_total",
        label: Some(("class", "5xx")),
        help: "HTTP responses sent to clients, by status class.",
        kind: Kind::Counter,
        read: |m| m.responses_5xx.load(Relaxed),
    },
    Metric {
        key: "tunnels_active",
        family: "lb_tunnels_active",
        label: None,
        help: "WebSocket tunnels currently spliced.",
        kind: Kind::Gauge,
        read: |m| m.tunnels_active.load(Relaxed),
    },
    Metric {
        key: "tunnels_total",
        family: "lb_tunnels_total",
        label: None,
        help: "WebSocket tunnels established.",
        kind: Kind::Counter,
        read: |m| m.tunnels_total.load(Relaxed),
    },
    Metric {
        key: "reloads_ok",
        family: "lb_reloads_total",
        label: Some(("result", "ok")),
        help: "Configuration reloads, by result (failed: the old configuration kept serving).",
        kind: Kind::Counter,
        read: |m| m.reloads_ok.load(Relaxed),
    },
    Metric {
        key: "reloads_failed",
        family: "lb_reloads_total",
        label: Some(("result", "failed")),
        help: "Configuration reloads, by result (failed: the old configuration kept serving).",
        kind: Kind::Counter,
        read: |m| m.reloads_failed.load(Relaxed),
    },
    Metric {
        key: "acme_orders_ok",
        family: "lb_acme_orders_total",
        label: Some(("result", "ok")),
        help: "ACME certificate orders, by result (failed: retried with backoff).",
        kind: Kind::Counter,
        read: |m| m.acme_orders_ok.load(Relaxed),
    },
    Metric {
        key: "acme_orders_failed",
        family: "lb_acme_orders_total",
        label: Some(("result", "failed")),
        help: "ACME certificate orders, by result (failed: retried with backoff).",
        kind: Kind::Counter,
        read: |m| m.acme_orders_failed.load(Relaxed),
    },
    Metric {
        key: "acme_holder",
        family: "lb_acme_holder",
        label: None,
        help: "1 when this host orders ACME certificates: a single host, or the holder of the \
               pair's virtual address at the ACME task's last check.",
        kind: Kind::Gauge,
        read: |m| m.acme_holder.load(Relaxed),
    },
    Metric {
        key: "acme_peer_adopted",
        family: "lb_acme_peer_adopted_total",
        label: None,
        help: "Certificates adopted from the other lb host of the pair.",
        kind: Kind::Counter,
        read: |m| m.acme_peer_adopted.load(Relaxed),
    },
    Metric {
        key: "acme_peer_refused",
        family: "lb_acme_peer_refused_total",
        label: None,
        help: "Peer channel messages refused (another secret, altered, or stale).",
        kind: Kind::Counter,
        read: |m| m.acme_peer_refused.load(Relaxed),
    },
];

/// Every per-backend number, in exposition order. (The up/down state is exported separately
/// as `lb_backend_up`, since the stats views show it as a word.)
pub const BACKEND: &[Metric<Backend>] = &[
    Metric {
        key: "weight",
        family: "lb_backend_weight",
        label: None,
        help: "Configured balancing weight of the backend.",
        kind: Kind::Gauge,
        read: |b| u64::from(b.weight()),
    },
    Metric {
        key: "active",
        family: "lb_backend_active_connections",
        label: None,
        help: "Connections and tunnels currently using the backend.",
        kind: Kind::Gauge,
        read: |b| b.active(),
    },
    Metric {
        key: "requests",
        family: "lb_backend_requests_total",
        label: None,
        help: "HTTP requests forwarded to the backend.",
        kind: Kind::Counter,
        read: |b| b.stats().requests.load(Relaxed),
    },
    Metric {
        key: "tunnels_active",
        family: "lb_backend_tunnels_active",
        label: None,
        help: "WebSocket tunnels currently spliced to the backend.",
        kind: Kind::Gauge,
        read: |b| b.stats().tunnels_active.load(Relaxed),
    },
    Metric {
        key: "tunnels_total",
        family: "lb_backend_tunnels_total",
        label: None,
        help: "WebSocket tunnels established to the backend.",
        kind: Kind::Counter,
        read: |b| b.stats().tunnels_total.load(Relaxed),
    },
    Metric {
        key: "bytes_to_backend",
        family: "lb_backend_bytes_total",
        label: Some(("direction", "to_backend")),
        help: "Bytes relayed between clients and the backend, by direction.",
        kind: Kind::Counter,
        read: |b| b.stats().bytes_to_backend.load(Relaxed),
    },
    Metric {
        key: "bytes_to_client",
        family: "lb_backend_bytes_total",
        label: Some(("direction", "to_client")),
        help: "Bytes relayed between clients and the backend, by direction.",
        kind: Kind::Counter,
        read: |b| b.stats().bytes_to_client.load(Relaxed),
    },
    Metric {
        key: "errors",
        family: "lb_backend_errors_total",
        label: None,
        help: "Requests or tunnels that failed after connecting to the backend.",
        kind: Kind::Counter,
        read: |b| b.stats().errors.load(Relaxed),
    },
    Metric {
        key: "connect_failures",
        family: "lb_backend_connect_failures_total",
        label: None,
        help: "Failed attempts to connect to the backend.",
        kind: Kind::Counter,
        read: |b| b.stats().connect_failures.load(Relaxed),
    },
    Metric {
        key: "transitions_up",
        family: "lb_backend_health_transitions_total",
        label: Some(("to", "up")),
        help: "Health state changes of the backend, by new state.",
        kind: Kind::Counter,
        read: |b| b.stats().transitions_up.load(Relaxed),
    },
    Metric {
        key: "transitions_down",
        family: "lb_backend_health_transitions_total",
        label: Some(("to", "down")),
        help: "Health state changes of the backend, by new state.",
        kind: Kind::Counter,
        read: |b| b.stats().transitions_down.load(Relaxed),
    },
];

/// The `/metrics` body: Prometheus text exposition format 0.0.4. Per-backend series carry the
/// labels `backend` (its name) and `addr`.
pub fn encode_prometheus(metrics: &Arc<Metrics>, pool: &Arc<Pool>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape {
        metrics: Arc::clone(metrics),
        pool: Arc::clone(pool),
    }));
    let mut out = String::with_capacity(4096);
    // Writing into a String cannot fail, and our collector only fails when the writer does.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
    out
}

/// One scrape: the counters and the pool generation current when it began.
#[derive(Debug)]
struct Scrape {
    metrics: Arc<Metrics>,
    pool: Arc<Pool>,
}

/// The labels of one series: its subject's (possibly none), then its catalogue entry's.
type Labels = Vec<(&'static str, String)>;

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        encode_families(&mut encoder, GLOBAL, &[(Labels::new(), &*self.metrics)])?;

        let mut expiry = encoder.encode_descriptor(
            "lb_certificate_not_after_seconds",
            "Expiry (notAfter, Unix seconds) of each certificate served, by its first name and \
             source (file: [[certificates]], acme: issued by the ACME CA).",
            None,
            MetricType::Gauge,
        )?;
        for (name, source, at) in self.metrics.certificate_expiry() {
            let labels = [("name", name.as_str()), ("source", source)];
            ConstGauge::new(at).encode(expiry.encode_family(&labels)?)?;
        }

        let backends: Vec<(Labels, &Backend)> = self
            .pool
            .backends()
            .iter()
            .map(|b| {
                let labels = vec![
                    ("backend", b.name().to_owned()),
                    ("addr", b.addr().to_string()),
                ];
                (labels, &**b)
            })
            .collect();
        let mut up = encoder.encode_descriptor(
            "lb_backend_up",
            "1 if the backend is up (passing health checks), 0 if down.",
            None,
            MetricType::Gauge,
        )?;
        for (labels, backend) in &backends {
            ConstGauge::new(u64::from(backend.is_up())).encode(up.encode_family(labels)?)?;
        }
        encode_families(&mut encoder, BACKEND, &backends)
    }
}

/// Writes each family of `catalogue` once, with one sample per entry and subject. A subject
/// is the labels that identify it (possibly none) and the value to read from.
fn encode_families<T>(
    encoder: &mut DescriptorEncoder,
    catalogue: &[Metric<T>],
    subjects: &[(Labels, &T)],
) -> fmt::Result {
    for family in catalogue.chunk_by(|a, b| a.family == b.family) {
        let Some(first) = family.first() else {
            continue;
        };
        // The encoder appends `_total` to a counter's name itself.
        let name = match first.kind {
            Kind::Counter => first.family.strip_suffix("_total").unwrap_or(first.family),
            Kind::Gauge => first.family,
        };
        let mut samples =
            encoder.encode_descriptor(name, first.help, None, first.kind.metric_type())?;
        for metric in family {
            for (labels, subject) in subjects {
                let mut labels: Vec<(&str, &str)> = labels
                    .iter()
                    .map(|(name, value)| (*name, value.as_str()))
                    .collect();
                labels.extend(metric.label);
                let sample = samples.encode_family(&labels)?;
                let value = (metric.read)(subject);
                match metric.kind {
                    Kind::Counter => ConstCounter::new(value).encode(sample)?,
                    Kind::Gauge => ConstGauge::new(value).encode(sample)?,
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use super::*;
    use crate::backends::balance::Policy;

    #[test]
    fn responses_are_counted_by_class() {
        let m = Metrics::default();
        for status in [101, 200, 204, 301, 404, 431, 502, 503, 600] {
            m.record_response(status);
        }
        let counts = [
            &m.responses_2xx,
            &m.responses_3xx,
            &m.responses_4xx,
            &m.responses_5xx,
        ]
        .map(|c| c.load(Relaxed));
        assert_eq!(counts, [2, 1, 2, 2]);
    }

    #[test]
    fn catalogue_families_are_consistent() {
        fn check<T>(catalogue: &[Metric<T>]) {
            let mut seen = std::collections::HashSet::new();
            for family in catalogue.chunk_by(|a, b| a.family == b.family) {
                let first = &family[0];
                assert!(seen.insert(first.family), "{} split apart", first.family);
                assert!(first.family.starts_with("lb_"));
                assert_eq!(
                    first.kind == Kind::Counter,
                    first.family.ends_with("_total"),
                    "{}: counters and only counters end in _total",
                    first.family
                );
                for m in family {
                    assert_eq!((m.help, m.kind), (first.help, first.kind), "{}", m.key);
                    assert_eq!(m.label.is_some(), family.len() > 1, "{}", m.key);
                }
            }
        }
        check(GLOBAL);
        check(BACKEND);
    }

    #[test]
    fn exposition_has_headers_labels_and_values() {
        let m = Metrics::default();
        m.connections_total.fetch_add(7, Relaxed);
        m.record_response(503);
        m.set_certificate_expiry("file", vec![("old.test".into(), 5)]);
        m.set_certificate_expiry("file", vec![("site.test".into(), 1_900_000_000)]);
        m.set_certificate_expiry("acme", vec![("chat.test".into(), 1_800_000_000)]);
        m.acme_orders_failed.fetch_add(2, Relaxed);
        let app1 = Arc::new(Backend::new(
            "app1".into(),
            SocketAddr::from(([127, 0, 0, 1], 8081)),
            2,
        ));
        let odd = Arc::new(Backend::new(
            "we\"ird\\name\n".into(),
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 8082)),
            1,
        ));
        app1.stats().bytes_to_client.fetch_add(1234, Relaxed);
        app1.stats().transitions_down.fetch_add(1, Relaxed);
        odd.set_up(false);
        let _lease = app1.lease();
        let text = encode_prometheus(
            &Arc::new(m),
            &Arc::new(Pool::new(vec![app1, odd], Policy::RoundRobin)),
        );

        let expected = [
            "# HELP lb_connections_total Client connections accepted.",
            "# TYPE lb_connections_total counter",
            "lb_connections_total 7",
            "# TYPE lb_responses_total counter",
            "lb_responses_total{class=\"2xx\"} 0",
            "lb_responses_total{class=\"5xx\"} 1",
            "# TYPE lb_connections_active gauge",
            "lb_reloads_total{result=\"failed\"} 0",
            "lb_acme_orders_total{result=\"ok\"} 0",
            "lb_acme_orders_total{result=\"failed\"} 2",
            "lb_certificate_not_after_seconds{name=\"site.test\",source=\"file\"} 1900000000",
            "lb_certificate_not_after_seconds{name=\"chat.test\",source=\"acme\"} 1800000000",
            "lb_backend_up{backend=\"app1\",addr=\"127.0.0.1:8081\"} 1",
            "lb_backend_up{backend=\"we\\\"ird\\\\name\\n\",addr=\"[::1]:8082\"} 0",
            "lb_backend_weight{backend=\"app1\",addr=\"127.0.0.1:8081\"} 2",
            "lb_backend_active_connections{backend=\"app1\",addr=\"127.0.0.1:8081\"} 1",
            "lb_backend_bytes_total{backend=\"app1\",addr=\"127.0.0.1:8081\",direction=\"to_client\"} 1234",
            "lb_backend_health_transitions_total{backend=\"app1\",addr=\"127.0.0.1:8081\",to=\"down\"} 1",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for line in expected {
            assert!(lines.contains(&line), "missing {line:?} in\n{text}");
        }
        assert!(!text.contains("old.test"), "replaced expiry still exported");
        // Each family is announced exactly once, before its samples.
        assert_eq!(text.matches("# TYPE lb_responses_total ").count(), 1);
        assert_eq!(text.matches("# TYPE lb_backend_bytes_total ").count(), 1);
        let header = text.find("# TYPE lb_backend_bytes_total").unwrap();
        let first_sample = text.find("\nlb_backend_bytes_total{").unwrap();
        assert!(header < first_sample);
        assert!(text.ends_with('\n'));
    }
}
