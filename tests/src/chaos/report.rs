//! The account of a chaos run: what the witness saw published against what each client
//! received, and the senders' and connections' counts.
//!
//! Loss is counted per client: every message the witness saw published from the client's first
//! ready connection on, that the client never received (a message sent but never published is
//! not loss here: it shows as `sent` above `published`, and as `unacked` with resume).
//! Duplicates are receipts of a message a client already had. [`Runs`] prints one table row per
//! run.

use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::Config;
use super::client::ClientLog;
use super::witness::Seen;
use crate::latency::Percentiles;

/// What one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The scenario's name.
    pub scenario: String,
    /// Whether clients resumed and senders retried.
    pub resume: bool,
    /// What the fault did.
    pub fault: String,
    /// How long injecting the fault took until the stack was whole again, seconds.
    pub fault_s: f64,
    /// Clients asked for.
    pub clients: usize,
    /// Clients that connected at least once.
    pub connected: usize,
    /// Sending clients.
    pub senders: usize,
    /// Total send rate, messages per second.
    pub rate: f64,
    /// Sending window, seconds.
    pub duration_s: f64,
    /// Messages the witness saw published (each once).
    pub published: u64,
    /// Of those, read from the history after the witness reconnected to Redis.
    pub caught_up: u64,
    /// Messages published a second time under another id.
    pub published_duplicates: u64,
    /// Messages written to a connection at least once.
    pub sent: u64,
    /// Error answers, failed writes, and (without resume) messages made while disconnected.
    pub send_errors: u64,
    /// Sends of a message already sent.
    pub retries: u64,
    /// With resume: messages never acknowledged.
    pub unacked: u64,
    /// Ready connections lost during the run.
    pub disconnects: u64,
    /// From a lost connection to the next ready one.
    pub reconnect: Percentiles,
    /// `recovered: false` notices.
    pub unrecovered: u64,
    /// Token mode: refresh notices the clients answered with a new token.
    pub refreshes: u64,
    /// Messages published after a client first connected that it never received, summed over
    /// clients.
    pub lost: u64,
    /// Clients that lost at least one.
    pub clients_with_loss: usize,
    /// Messages a client received more than once, summed over clients.
    pub duplicates: u64,
    /// Messages whose id was not above the previous one's, summed over clients.
    pub out_of_order: u64,
    /// From a message's creation at its sender to its first receipt, over all receipts.
    pub delivery: Percentiles,
}

/// Counts one run.
pub(super) fn tally(
    config: &Config,
    scenario: &str,
    fault: String,
    fault_took: Duration,
    seen: &Seen,
    logs: &[ClientLog],
) -> Report {
    let mut lost = 0;
    let mut clients_with_loss = 0;
    for log in logs {
        let Some(first) = log.first else { continue };
        let missing = seen
            .messages
            .get(first..)
            .unwrap_or_default()
            .iter()
            .filter(|m| !log.has(m.key))
            .count() as u64;
        lost += missing;
        clients_with_loss += usize::from(missing > 0);
    }
    let sum = |f: fn(&ClientLog) -> u64| logs.iter().map(f).sum::<u64>();
    let reconnects = logs
        .iter()
        .flat_map(|l| l.reconnects.iter().copied())
        .collect();
    let latencies = logs
        .iter()
        .flat_map(|l| l.latencies.iter().copied())
        .collect();
    Report {
        scenario: scenario.to_owned(),
        resume: config.resume,
        fault,
        fault_s: fault_took.as_secs_f64(),
        clients: config.clients,
        connected: logs.iter().filter(|l| l.first.is_some()).count(),
        senders: config.senders,
        rate: config.rate,
        duration_s: config.duration.as_secs_f64(),
        published: seen.messages.len() as u64,
        caught_up: seen.caught_up,
        published_duplicates: seen.duplicates,
        sent: sum(|l| l.sent),
        send_errors: sum(|l| l.send_errors),
        retries: sum(|l| l.retries),
        unacked: sum(|l| l.pending as u64),
        disconnects: sum(|l| l.disconnects),
        reconnect: Percentiles::of(reconnects),
        unrecovered: sum(|l| l.unrecovered),
        refreshes: sum(|l| l.refreshes),
        lost,
        clients_with_loss,
        duplicates: sum(|l| l.duplicates),
        out_of_order: sum(|l| l.out_of_order),
        delivery: Percentiles::of(latencies),
    }
}

/// Several runs, printed as one table.
#[derive(Debug, Clone, Serialize)]
pub struct Runs {
    /// One report per run, in the order run.
    pub runs: Vec<Report>,
}

/// The table's columns: header and width.
const COLUMNS: [(&str, usize); 14] = [
    ("scenario", 15),
    ("resume", 6),
    ("published", 9),
    ("sent", 6),
    ("send err", 8),
    ("retries", 7),
    ("unacked", 7),
    ("disconn", 7),
    ("reconn p50/max ms", 17),
    ("rec:false", 9),
    ("lost", 7),
    ("dup", 5),
    ("ooo", 4),
    ("p99 ms", 8),
];

impl Report {
    /// Panics (with the whole report) unless the run lost nothing: every client connected, no
    /// loss, duplicate, reordering, unacknowledged send or refused resume, every message sent
    /// published exactly once, and something was sent at all.
    pub fn assert_zero_loss(&self) {
        assert_eq!(
            (
                self.connected,
                self.lost,
                self.duplicates,
                self.out_of_order,
                self.unacked,
                self.unrecovered,
                self.published_duplicates,
            ),
            (self.clients, 0, 0, 0, 0, 0, 0),
            "{self}"
        );
        assert!(self.sent > 0, "{self}");
        assert_eq!(self.published, self.sent, "{self}");
    }

    fn cells(&self) -> [String; 14] {
        [
            self.scenario.clone(),
            if self.resume { "yes" } else { "no" }.to_owned(),
            self.published.to_string(),
            self.sent.to_string(),
            self.send_errors.to_string(),
            self.retries.to_string(),
            self.unacked.to_string(),
            self.disconnects.to_string(),
            format!("{:.0}/{:.0}", self.reconnect.p50_ms, self.reconnect.max_ms),
            self.unrecovered.to_string(),
            self.lost.to_string(),
            self.duplicates.to_string(),
            self.out_of_order.to_string(),
            format!("{:.1}", self.delivery.p99_ms),
        ]
    }
}

fn row(f: &mut fmt::Formatter<'_>, cells: &[String]) -> fmt::Result {
    let line: Vec<String> = cells
        .iter()
        .zip(COLUMNS)
        .enumerate()
        .map(|(i, (cell, (_, width)))| {
            if i == 0 {
                format!("{cell:<width$}")
            } else {
                format!("{cell:>width$}")
            }
        })
        .collect();
    writeln!(f, "{}", line.join("  ").trim_end())
}

impl fmt::Display for Runs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(first) = self.runs.first() {
            writeln!(
                f,
                "chaos: {} clients, {} senders, {} msg/s for {:.0} s through lb (wss)",
                first.clients, first.senders, first.rate, first.duration_s
            )?;
        }
        let header: Vec<String> = COLUMNS.iter().map(|(name, _)| (*name).to_owned()).collect();
        row(f, &header)?;
        for report in &self.runs {
            row(f, &report.cells())?;
        }
        writeln!(f)?;
        for report in &self.runs {
            writeln!(
                f,
                "{} (resume {}): {} in {:.1} s; {} of {} clients connected, {} of them lost messages, \
                 witness caught up {}, published twice {}",
                report.scenario,
                if report.resume { "yes" } else { "no" },
                report.fault,
                report.fault_s,
                report.connected,
                report.clients,
                report.clients_with_loss,
                report.caught_up,
                report.published_duplicates,
            )?;
            if report.refreshes > 0 {
                writeln!(f, "  tokens refreshed on the socket: {}", report.refreshes)?;
            }
        }
        Ok(())
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        Runs {
            runs: vec![self.clone()],
        }
        .fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use super::super::{Content, Key, Scenario};
    use super::*;

    const SENDERS: usize = 2;
    const PER_SENDER: usize = 3;

    fn key(sender: u32, seq: u32) -> Key {
        Key { sender, seq }
    }

    fn id(n: u64) -> String {
        format!("1000-{n}")
    }

    /// What the witness saw: every message of both senders, published in turn, with ids
    /// growing in publication order.
    fn everything_published() -> (Seen, Vec<Key>) {
        let mut seen = Seen::default();
        let count = AtomicUsize::new(0);
        let keys: Vec<Key> = (0..PER_SENDER as u32)
            .flat_map(|seq| (0..SENDERS as u32).map(move |sender| key(sender, seq)))
            .collect();
        for (n, k) in keys.iter().enumerate() {
            assert!(seen.record(*k, Some(id(n as u64)), &count));
        }
        (seen, keys)
    }

    /// A client ready from the first publication on that received `receipts` (index into the
    /// published order), in that order; it sent its share of the messages.
    fn client(receipts: &[usize], keys: &[Key]) -> ClientLog {
        let mut log = ClientLog::new(SENDERS, PER_SENDER);
        log.first = Some(0);
        log.sent = (keys.len() / 2) as u64;
        for &n in receipts {
            let content = Content {
                key: keys[n],
                created_ns: 0,
            };
            log.message(content, Some(("epoch".to_owned(), (1000, n as u64))));
        }
        log
    }

    /// The report of two clients: one that received everything, and `other`.
    fn report(other: &[usize]) -> Report {
        let (seen, keys) = everything_published();
        let all: Vec<usize> = (0..keys.len()).collect();
        let logs = [client(&all, &keys), client(other, &keys)];
        let config = Config {
            clients: 2,
            senders: SENDERS,
            ..Config::new(Scenario::None)
        };
        tally(
            &config,
            "synthetic",
            String::new(),
            Duration::ZERO,
            &seen,
            &logs,
        )
    }

    fn zero_loss_holds(report: &Report) -> bool {
        std::panic::catch_unwind(|| report.assert_zero_loss()).is_ok()
    }

    #[test]
    fn everything_received_once_in_order_is_zero_loss() {
        let report = report(&[0, 1, 2, 3, 4, 5]);
        assert_eq!((report.published, report.sent), (6, 6));
        assert_eq!(
            (report.lost, report.duplicates, report.out_of_order),
            (0, 0, 0)
        );
        assert!(zero_loss_holds(&report), "{report}");
    }

    #[test]
    fn a_missing_message_is_one_lost_by_one_client() {
        let report = report(&[0, 1, 2, 4, 5]);
        assert_eq!((report.lost, report.clients_with_loss), (1, 1));
        assert_eq!((report.duplicates, report.out_of_order), (0, 0));
        assert!(!zero_loss_holds(&report), "{report}");
    }

    #[test]
    fn a_message_received_twice_is_one_duplicate() {
        let report = report(&[0, 1, 2, 3, 3, 4, 5]);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.lost, 0);
        assert!(!zero_loss_holds(&report), "{report}");
    }

    #[test]
    fn two_messages_swapped_are_one_out_of_order() {
        let report = report(&[0, 1, 3, 2, 4, 5]);
        assert_eq!(report.out_of_order, 1);
        assert_eq!((report.lost, report.duplicates), (0, 0));
        assert!(!zero_loss_holds(&report), "{report}");
    }

    #[test]
    fn the_summary_says_how_many_tokens_were_refreshed_only_when_some_were() {
        let mut report = report(&[0, 1, 2, 3, 4, 5]);
        assert!(!report.to_string().contains("refreshed"), "{report}");
        report.refreshes = 7;
        assert!(
            report
                .to_string()
                .contains("tokens refreshed on the socket: 7"),
            "{report}"
        );
    }

    #[test]
    fn a_message_missed_before_the_client_was_ready_is_not_lost() {
        let (seen, keys) = everything_published();
        let mut late = client(&[2, 3, 4, 5], &keys);
        late.first = Some(2);
        let config = Config {
            clients: 1,
            senders: SENDERS,
            ..Config::new(Scenario::None)
        };
        let report = tally(
            &config,
            "synthetic",
            String::new(),
            Duration::ZERO,
            &seen,
            &[late],
        );
        assert_eq!(report.lost, 0, "{report}");
    }
}
