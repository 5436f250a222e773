//! `bench summary`: turns the results file of `bench/run` into Markdown tables.
//!
//! `bench/run` appends one JSON line per measurement, `{"figure", "system", "rep", "report"}`,
//! where `report` is what a subcommand printed with `--json`. For every known figure this module
//! takes each metric (a JSON pointer into the report) per system, prints the median over the
//! repetitions, and the ratio lb ÷ the best of the other proxies (HAProxy, nginx, Sozu; for the
//! reconnect storm, one ratio per peer). The peer stacks (`peers-*`: scaleout behind lb and behind
//! HAProxy beside Node `ws`, Socket.IO and Sockudo) get the ratio of each scaleout row to the best
//! peer stack. The fan-out ramp and the peers' knee get their own tables with the highest rate that
//! lost nothing with p99 under the latency limit; peers that could not run are named with why.
//! Titles with `{clients}` get the client count the fan-out reports themselves give.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::PathBuf;

use anyhow::Context;
use serde::Deserialize;
use serde_json::Value;

/// Options of `bench summary`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The results file (JSON lines) written by bench/run.
    results: PathBuf,
    /// p99 limit in ms for the ramp's highest acceptable rate (bench/run passes its RAMP_P99_MS).
    #[arg(long, default_value_t = 50.0)]
    p99_limit_ms: f64,
}

/// One line of the results file.
#[derive(Debug, Deserialize)]
struct Record {
    figure: String,
    system: String,
    report: Value,
}

/// Which way a metric improves; `None` for context columns that get no ratio.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    None,
}

struct Metric {
    label: &'static str,
    pointer: &'static str,
    better: Better,
    digits: usize,
}

/// The ratio columns of a figure.
#[derive(Clone, Copy, PartialEq)]
enum Ratios {
    /// One column: lb ÷ the best of the other proxies.
    BetterPeer,
    /// One column per peer: lb ÷ HAProxy, lb ÷ nginx, lb ÷ Sozu.
    EachPeer,
    /// One column per scaleout stack: it ÷ the best of the peer stacks.
    Stacks,
}

struct Figure {
    id: &'static str,
    /// `{clients}` is replaced by the `clients` of the figure's reports.
    title: &'static str,
    metrics: &'static [Metric],
    ratios: Ratios,
}

/// The proxies lb is compared with, in column order.
const PEERS: &[&str] = &["haproxy", "nginx", "sozu"];
/// scaleout's stacks in the peers figures, each compared with the best of [`PEER_STACKS`].
const OURS: &[&str] = &["scaleout-lb", "scaleout-haproxy"];
/// The chat stacks users would pick instead.
const PEER_STACKS: &[&str] = &["node-ws", "socketio", "socketio-streams", "sockudo"];

const fn m(label: &'static str, pointer: &'static str, better: Better, digits: usize) -> Metric {
    Metric {
        label,
        pointer,
        better,
        digits,
    }
}

const ECHO: &[Metric] = &[
    m("round trips/s", "/round_trips_per_s", Better::Higher, 0),
    m("RTT p50 (ms)", "/rtt/p50_ms", Better::Lower, 3),
    m("RTT p99 (ms)", "/rtt/p99_ms", Better::Lower, 3),
    m(
        "proxy CPU per round trip (µs)",
        "/cpu_us_per_round_trip/0",
        Better::Lower,
        1,
    ),
    m("proxy cores busy", "/watched/0/cores", Better::None, 2),
    m("generator cores busy", "/generator/cores", Better::None, 2),
    m(
        "machine cores busy (all processes)",
        "/machine_cores",
        Better::None,
        2,
    ),
];

const STACK: &[Metric] = &[
    m("deliveries/s", "/deliveries_per_s", Better::None, 0),
    m("lost", "/lost", Better::Lower, 0),
    m("latency p50 (ms)", "/latency/p50_ms", Better::Lower, 2),
    m("latency p99 (ms)", "/latency/p99_ms", Better::Lower, 2),
    m("latency max (ms)", "/latency/max_ms", Better::Lower, 2),
    m(
        "server CPU per delivery (µs)",
        "/server_cpu_us_per_delivery",
        Better::Lower,
        2,
    ),
    m("  proxy", "/cpu_us_per_delivery/0", Better::Lower, 2),
    m("  apps", "/cpu_us_per_delivery/1", Better::Lower, 2),
    m("  redis", "/cpu_us_per_delivery/2", Better::Lower, 2),
    m(
        "app RSS per instance, largest (MiB)",
        "/watched/1/largest_process_rss_mib",
        Better::Lower,
        1,
    ),
    m("generator cores busy", "/generator/cores", Better::None, 2),
    m(
        "machine cores busy (all processes)",
        "/machine_cores",
        Better::None,
        2,
    ),
];

/// A fault under chat load: what the clients lost and got twice (a `bench chaos` run for
/// scaleout, a `bench fanout --reconnect` run for a peer).
const FAULT: &[Metric] = &[
    m("messages sent", "/sent", Better::None, 0),
    m("deliveries lost", "/lost", Better::Lower, 0),
    m("deliveries twice", "/duplicates", Better::Lower, 0),
];

const STORM: &[Metric] = &[
    m(
        "all connected after (s)",
        "/full/all_connected_s",
        Better::Lower,
        2,
    ),
    m("connect p50 (ms)", "/full/connect/p50_ms", Better::Lower, 0),
    m("connect p99 (ms)", "/full/connect/p99_ms", Better::Lower, 0),
    m("failed connects", "/full/failed", Better::Lower, 0),
    m(
        "**proxy CPU per full handshake (µs)**",
        "/full/cpu_us_per_connect/0",
        Better::Lower,
        0,
    ),
    m(
        "peak proxy RSS (MiB)",
        "/full/peak_rss_mib/0",
        Better::Lower,
        1,
    ),
    m("proxy cores busy", "/full/watched/0/cores", Better::None, 2),
    m(
        "generator CPU per connect (µs)",
        "/full/generator_cpu_us_per_connect",
        Better::None,
        0,
    ),
    m(
        "machine cores busy (all processes)",
        "/full/machine_cores",
        Better::None,
        2,
    ),
    m(
        "accept-queue overflows",
        "/full/tcp/listen_overflows",
        Better::None,
        0,
    ),
    m(
        "SYN retransmits",
        "/full/tcp/syn_retransmits",
        Better::None,
        0,
    ),
    m(
        "resumed: all connected after (s)",
        "/resumed/all_connected_s",
        Better::Lower,
        2,
    ),
    m(
        "resumed: connect p50 (ms)",
        "/resumed/connect/p50_ms",
        Better::Lower,
        0,
    ),
    m(
        "resumed: connect p99 (ms)",
        "/resumed/connect/p99_ms",
        Better::Lower,
        0,
    ),
    m(
        "resumed: failed connects",
        "/resumed/failed",
        Better::Lower,
        0,
    ),
    m(
        "resumed: handshakes that resumed",
        "/resumed/resumed_handshakes",
        Better::None,
        0,
    ),
    m(
        "**proxy CPU per resumed handshake (µs)**",
        "/resumed/cpu_us_per_connect/0",
        Better::Lower,
        0,
    ),
    m(
        "resumed: peak proxy RSS (MiB)",
        "/resumed/peak_rss_mib/0",
        Better::Lower,
        1,
    ),
    m(
        "resumed: proxy cores busy",
        "/resumed/watched/0/cores",
        Better::None,
        2,
    ),
    m(
        "resumed: generator CPU per connect (µs)",
        "/resumed/generator_cpu_us_per_connect",
        Better::None,
        0,
    ),
    m(
        "resumed: machine cores busy",
        "/resumed/machine_cores",
        Better::None,
        2,
    ),
    m(
        "resumed: accept-queue overflows",
        "/resumed/tcp/listen_overflows",
        Better::None,
        0,
    ),
];

const FIGURES: &[Figure] = &[
    Figure {
        id: "https",
        title: "HTTPS small response over keep-alive (wrk -t1 -c50)",
        metrics: &[
            m("requests/s", "/requests_per_s", Better::Higher, 0),
            m("latency p50 (ms)", "/p50_ms", Better::Lower, 3),
            m("latency p99 (ms)", "/p99_ms", Better::Lower, 3),
            m(
                "proxy CPU per request (µs)",
                "/cpu_us_per_request/0",
                Better::Lower,
                1,
            ),
            m("proxy cores busy", "/watched/0/cores", Better::None, 2),
            m("wrk cores busy", "/children/cores", Better::None, 2),
            m(
                "machine cores busy (all processes)",
                "/machine_cores",
                Better::None,
                2,
            ),
        ],
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "echo-64",
        title: "WebSocket echo, 64 B, 50 connections",
        metrics: ECHO,
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "echo-16k",
        title: "WebSocket echo, 16 KiB, 50 connections",
        metrics: ECHO,
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "idle",
        title: "Memory per idle TLS WebSocket tunnel",
        metrics: &[
            m("KiB per tunnel", "/kib_per_connection/0", Better::Lower, 1),
            m("tunnels established", "/established", Better::None, 0),
            m(
                "proxy RSS with all up (MiB)",
                "/watched/0/rss_mib",
                Better::Lower,
                1,
            ),
        ],
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "floor",
        title: "Kernel floor: one loopback TCP hop, 500 connections, 150 B, one message per connection at a time",
        metrics: &[
            m(
                "CPU per hop: one send + one receive (µs)",
                "/cpu_us_per_hop",
                Better::None,
                2,
            ),
            m(
                "machine cores busy (all processes)",
                "/machine_cores",
                Better::None,
                2,
            ),
        ],
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "stack-25",
        title: "Whole stack, {clients} clients, 25 msg/s",
        metrics: STACK,
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "stack-100",
        title: "Whole stack, {clients} clients, 100 msg/s",
        metrics: STACK,
        ratios: Ratios::BetterPeer,
    },
    Figure {
        id: "peers-25",
        title: "Chat stacks side by side, {clients} clients, 25 msg/s",
        metrics: STACK,
        ratios: Ratios::Stacks,
    },
    Figure {
        id: "peers-100",
        title: "Chat stacks side by side, {clients} clients, 100 msg/s",
        metrics: STACK,
        ratios: Ratios::Stacks,
    },
    Figure {
        id: "peers-200",
        title: "Chat stacks side by side, {clients} clients, 200 msg/s",
        metrics: STACK,
        ratios: Ratios::Stacks,
    },
    Figure {
        id: "fault-kill-app",
        title: "Fault: one server SIGKILLed and restarted, {clients} clients, 50 msg/s",
        metrics: FAULT,
        ratios: Ratios::Stacks,
    },
    Figure {
        id: "fault-redis-restart",
        title: "Fault: Redis shut down and restarted 2 s later, {clients} clients, 50 msg/s",
        metrics: FAULT,
        ratios: Ratios::Stacks,
    },
    Figure {
        id: "storm-rsa",
        title: "Reconnect storm, {clients} TLS WebSocket clients at once, RSA-2048 certificate",
        metrics: STORM,
        ratios: Ratios::EachPeer,
    },
    Figure {
        id: "storm-ecdsa",
        title: "Reconnect storm, {clients} TLS WebSocket clients at once, ECDSA P-256 certificate",
        metrics: STORM,
        ratios: Ratios::EachPeer,
    },
];

/// Column order; systems not in the results are left out.
const SYSTEMS: &[&str] = &[
    "lb",
    "haproxy",
    "nginx",
    "sozu",
    "baseline",
    "direct",
    "scaleout-lb",
    "scaleout-haproxy",
    "node-ws",
    "socketio",
    "socketio-streams",
    "sockudo",
];

/// Reads the results and prints the tables.
pub fn run(args: &Args) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(&args.results)
        .with_context(|| format!("reading {}", args.results.display()))?;
    let mut records = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let record: Record = serde_json::from_str(line)
            .with_context(|| format!("{} line {}", args.results.display(), n + 1))?;
        records.push(record);
    }
    Ok(render(&records, args.p99_limit_ms))
}

fn render(records: &[Record], p99_limit_ms: f64) -> String {
    let mut out = String::new();
    for figure in FIGURES {
        let of_figure: Vec<&Record> = records.iter().filter(|r| r.figure == figure.id).collect();
        if !of_figure.is_empty() {
            figure_table(&mut out, figure, &of_figure);
        }
    }
    for (figure, title) in [
        ("ramp", "Whole stack ramp"),
        ("peers-knee", "Chat stacks side by side, knee"),
    ] {
        let ramp: Vec<&Record> = records.iter().filter(|r| r.figure == figure).collect();
        if !ramp.is_empty() {
            ramp_table(&mut out, title, &ramp, p99_limit_ms);
        }
    }
    for r in records.iter().filter(|r| r.figure == "missing") {
        let reason = r.report.pointer("/reason").and_then(Value::as_str);
        let _ = writeln!(
            out,
            "{} is missing from these figures: {}\n",
            display_name(&r.system),
            reason.unwrap_or("no reason given")
        );
    }
    out
}

fn figure_table(out: &mut String, figure: &Figure, records: &[&Record]) {
    let systems: Vec<&str> = SYSTEMS
        .iter()
        .copied()
        .filter(|s| records.iter().any(|r| r.system == *s))
        .collect();
    let reps = systems
        .iter()
        .map(|s| records.iter().filter(|r| r.system == *s).count())
        .max()
        .unwrap_or(0);
    // The ratio columns: each a label, the system compared and the peers it is compared with.
    let present = |list: &[&'static str]| -> Vec<&'static str> {
        list.iter()
            .copied()
            .filter(|p| systems.contains(p))
            .collect()
    };
    let names = |list: &[&str]| -> String {
        list.iter()
            .map(|p| display_name(p))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (peers, ours) = match figure.ratios {
        Ratios::Stacks => (present(PEER_STACKS), present(OURS)),
        _ => (present(PEERS), present(&["lb"])),
    };
    let columns: Vec<(String, &str, Vec<&str>)> = if peers.is_empty() {
        Vec::new()
    } else if figure.ratios == Ratios::EachPeer {
        ours.iter()
            .flat_map(|o| peers.iter().map(move |p| (*o, *p)))
            .map(|(o, p)| (format!("{o} ÷ {}", display_name(p)), o, vec![p]))
            .collect()
    } else {
        ours.iter()
            .map(|o| {
                let label = if peers.len() == 1 {
                    format!("{} ÷ {}", display_name(o), names(&peers))
                } else {
                    format!("{} ÷ best of {}", display_name(o), names(&peers))
                };
                (label, *o, peers.clone())
            })
            .collect()
    };
    let title = figure.title.replace("{clients}", &clients(records));
    let _ = writeln!(out, "### {title} (median of {reps})\n");
    let mut header = String::from("| figure |");
    let mut rule = String::from("|---|");
    for s in &systems {
        let _ = write!(header, " {} |", display_name(s));
        rule.push_str("---:|");
    }
    for (label, _, _) in &columns {
        let _ = write!(header, " {label} |");
        rule.push_str("---:|");
    }
    let _ = writeln!(out, "{header}\n{rule}");
    for metric in figure.metrics {
        let medians: BTreeMap<&str, f64> = systems
            .iter()
            .filter_map(|s| {
                let values: Vec<f64> = records
                    .iter()
                    .filter(|r| r.system == *s)
                    .filter_map(|r| r.report.pointer(metric.pointer).and_then(Value::as_f64))
                    .collect();
                median(values).map(|v| (*s, v))
            })
            .collect();
        let mut row = format!("| {} |", metric.label);
        for s in &systems {
            match medians.get(s) {
                Some(v) => {
                    let _ = write!(row, " {:.*} |", metric.digits, v);
                }
                None => row.push_str(" – |"),
            }
        }
        for (_, ours, against) in &columns {
            match ratio(&medians, ours, against, metric.better) {
                Some(r) => {
                    let _ = write!(row, " {r:.2} |");
                }
                None => row.push_str(" |"),
            }
        }
        let _ = writeln!(out, "{row}");
    }
    out.push('\n');
}

/// `ours`' median divided by the best of the `peers`' medians.
fn ratio(medians: &BTreeMap<&str, f64>, ours: &str, peers: &[&str], better: Better) -> Option<f64> {
    let lb = *medians.get(ours)?;
    let others = peers.iter().filter_map(|s| medians.get(s).copied());
    let best = match better {
        Better::Higher => others.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.max(v)))),
        Better::Lower => others.fold(None, |a: Option<f64>, v| Some(a.map_or(v, |a| a.min(v)))),
        Better::None => None,
    }?;
    (best != 0.0).then(|| lb / best)
}

fn ramp_table(out: &mut String, title: &str, records: &[&Record], p99_limit_ms: f64) {
    let _ = writeln!(out, "### {title}, {} clients\n", clients(records));
    let _ = writeln!(
        out,
        "| system | msg/s | deliveries/s | lost | p50 (ms) | p99 (ms) | server CPU per delivery (µs) | generator cores | machine cores |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let get = |r: &Record, p: &str| {
        r.report
            .pointer(p)
            .and_then(Value::as_f64)
            .unwrap_or(f64::NAN)
    };
    // Per system: the rate and the deliveries/s of the highest clean step, and its lowest step
    // (rate, lost, p99) to name when none is clean.
    let mut knees: BTreeMap<&str, Option<(f64, f64)>> = BTreeMap::new();
    let mut lowest: BTreeMap<&str, (f64, f64, f64)> = BTreeMap::new();
    let mut sorted: Vec<&&Record> = records.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.system, get(a, "/rate"))
            .partial_cmp(&(&b.system, get(b, "/rate")))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    for r in sorted {
        let (rate, lost, p99) = (get(r, "/rate"), get(r, "/lost"), get(r, "/latency/p99_ms"));
        let deliveries = get(r, "/deliveries_per_s");
        let _ = writeln!(
            out,
            "| {} | {rate:.0} | {deliveries:.0} | {lost:.0} | {:.2} | {p99:.2} | {:.2} | {:.2} | {:.2} |",
            display_name(&r.system),
            get(r, "/latency/p50_ms"),
            get(r, "/server_cpu_us_per_delivery"),
            get(r, "/generator/cores"),
            get(r, "/machine_cores"),
        );
        lowest.entry(r.system.as_str()).or_insert((rate, lost, p99));
        let knee = knees.entry(r.system.as_str()).or_insert(None);
        if lost == 0.0 && p99 < p99_limit_ms && knee.is_none_or(|(k, _)| rate > k) {
            *knee = Some((rate, deliveries));
        }
    }
    out.push('\n');
    for (system, knee) in knees {
        let _ = match knee {
            Some((k, deliveries)) => writeln!(
                out,
                "{}: highest rate with zero loss and p99 < {p99_limit_ms} ms: **{k:.0} msg/s** ({deliveries:.0} deliveries/s)\n",
                display_name(system),
            ),
            None => {
                let (rate, lost, p99) = lowest.get(system).copied().unwrap_or_default();
                writeln!(
                    out,
                    "{}: no knee, no step met zero loss with p99 < {p99_limit_ms} ms (lowest step, {rate:.0} msg/s: lost {lost:.0}, p99 {p99:.0} ms)\n",
                    display_name(system)
                )
            }
        };
    }
}

/// The `clients` the reports asked for, with thousands separators; several values (a results file
/// joined from runs with different `STACK_CLIENTS`) are all named, in ascending order.
fn clients(records: &[&Record]) -> String {
    let mut counts: Vec<u64> = records
        .iter()
        .filter_map(|r| r.report.pointer("/clients").and_then(Value::as_u64))
        .collect();
    counts.sort_unstable();
    counts.dedup();
    if counts.is_empty() {
        return "?".to_string();
    }
    counts
        .into_iter()
        .map(thousands)
        .collect::<Vec<_>>()
        .join(" or ")
}

/// `1234567` as `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn display_name(system: &str) -> &str {
    match system {
        "haproxy" => "HAProxy",
        "sozu" => "Sozu",
        "direct" => "direct (no proxy)",
        "baseline" => "lb, baseline app",
        "scaleout-lb" => "scaleout (lb)",
        "scaleout-haproxy" => "scaleout (HAProxy)",
        "node-ws" => "Node ws (HAProxy)",
        "socketio" => "Socket.IO (HAProxy)",
        "socketio-streams" => "Socket.IO streams + recovery (HAProxy)",
        "sockudo" => "Sockudo (HAProxy)",
        other => other,
    }
}

/// The median (the mean of the two middle values for an even count); `None` for no values.
pub(crate) fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(figure: &str, system: &str, report: Value) -> Record {
        Record {
            figure: figure.into(),
            system: system.into(),
            report,
        }
    }

    #[test]
    fn medians_and_ratio_against_the_better_peer() {
        let mut records = Vec::new();
        for (system, rates) in [
            ("lb", [60.0, 50.0, 70.0]),
            ("haproxy", [40.0, 45.0, 41.0]),
            ("nginx", [30.0, 50.0, 20.0]),
        ] {
            for rate in rates {
                records.push(record(
                    "echo-64",
                    system,
                    serde_json::json!({"round_trips_per_s": rate, "rtt": {"p99_ms": rate / 10.0}}),
                ));
            }
        }
        let text = render(&records, 50.0);
        assert!(
            text.contains("| round trips/s | 60 | 41 | 30 | 1.46 |"),
            "{text}"
        );
        // p99: lower is better, so the ratio is against nginx's 3.0.
        assert!(
            text.contains("| RTT p99 (ms) | 6.000 | 4.100 | 3.000 | 2.00 |"),
            "{text}"
        );
        assert!(
            text.contains("| proxy CPU per round trip (µs) | – | – | – | |"),
            "{text}"
        );
        assert!(!text.contains("HTTPS"));
    }

    #[test]
    fn storm_rows_compare_lb_with_each_peer() {
        let storm = |cpu: f64, resumed_cpu: f64| {
            serde_json::json!({
                "clients": 9000,
                "full": {"cpu_us_per_connect": [cpu], "failed": 0},
                "resumed": {"cpu_us_per_connect": [resumed_cpu], "resumed_handshakes": 9000},
            })
        };
        let records = vec![
            record("storm-ecdsa", "lb", storm(400.0, 150.0)),
            record("storm-ecdsa", "haproxy", storm(500.0, 100.0)),
            record("storm-ecdsa", "nginx", storm(800.0, 300.0)),
        ];
        let text = render(&records, 50.0);
        assert!(
            text.contains("Reconnect storm, 9,000 TLS WebSocket clients at once, ECDSA P-256"),
            "{text}"
        );
        assert!(
            text.contains("| figure | lb | HAProxy | nginx | lb ÷ HAProxy | lb ÷ nginx |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| **proxy CPU per full handshake (µs)** | 400 | 500 | 800 | 0.80 | 0.50 |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| **proxy CPU per resumed handshake (µs)** | 150 | 100 | 300 | 1.50 | 0.50 |"
            ),
            "{text}"
        );
        // Zero failures everywhere: no ratio; counts without a better side: no ratio.
        assert!(
            text.contains("| failed connects | 0 | 0 | 0 | | |"),
            "{text}"
        );
        assert!(
            text.contains("| resumed: handshakes that resumed | 9000 | 9000 | 9000 | | |"),
            "{text}"
        );
        assert!(!text.contains("RSA-2048"), "{text}");
    }

    #[test]
    fn the_floor_is_a_table_of_its_own_without_a_ratio() {
        let records: Vec<Record> = [17.0, 19.0, 18.0]
            .into_iter()
            .map(|us| record("floor", "direct", serde_json::json!({"cpu_us_per_hop": us})))
            .collect();
        let text = render(&records, 50.0);
        assert!(text.contains("Kernel floor"), "{text}");
        assert!(
            text.contains("| CPU per hop: one send + one receive (µs) | 18.00 |"),
            "{text}"
        );
        assert!(!text.contains("lb ÷"), "{text}");
    }

    #[test]
    fn ramp_finds_the_highest_clean_rate() {
        // 500 clients, and deliveries a little short of rate × clients as in a real run.
        let step = |rate: f64, lost: u64, p99: f64| {
            record(
                "ramp",
                "lb",
                serde_json::json!({
                    "clients": 500,
                    "rate": rate,
                    "deliveries_per_s": rate * 500.0 - 7.0,
                    "lost": lost,
                    "latency": {"p99_ms": p99},
                }),
            )
        };
        let records = vec![
            step(400.0, 0, 80.0),
            step(100.0, 0, 3.0),
            step(200.0, 0, 9.0),
            step(300.0, 2, 9.0),
        ];
        let text = render(&records, 50.0);
        assert!(text.contains("**200 msg/s**"), "{text}");
        assert!(text.contains("(99993 deliveries/s)"), "{text}");
        assert!(text.contains("ramp, 500 clients"), "{text}");
        let none = render(&[step(200.0, 0, 90.0), step(100.0, 1, 3.0)], 50.0);
        assert!(
            none.contains("lb: no knee, no step met zero loss with p99 < 50 ms (lowest step, 100 msg/s: lost 1, p99 3 ms)"),
            "{none}"
        );
    }

    #[test]
    fn stack_titles_take_the_client_count_from_the_reports() {
        let records = vec![
            record("stack-25", "lb", serde_json::json!({"clients": 2500})),
            record("stack-100", "lb", serde_json::json!({"clients": 1000})),
            record("stack-100", "lb", serde_json::json!({"clients": 200})),
        ];
        let text = render(&records, 50.0);
        assert!(
            text.contains("Whole stack, 2,500 clients, 25 msg/s"),
            "{text}"
        );
        assert!(
            text.contains("Whole stack, 200 or 1,000 clients, 100 msg/s"),
            "{text}"
        );
        assert_eq!(thousands(1_234_567), "1,234,567");
        assert_eq!(thousands(999), "999");
    }

    #[test]
    fn scaleout_stacks_against_the_best_peer_stack_and_missing_peers_named() {
        let stack = |cpu: f64, p99: f64| {
            serde_json::json!({
                "clients": 1000,
                "server_cpu_us_per_delivery": cpu,
                "latency": {"p99_ms": p99, "max_ms": p99 * 2.0},
                "watched": [{"rss_mib": 9.0}, {"rss_mib": cpu * 2.0, "largest_process_rss_mib": cpu}],
            })
        };
        let records = vec![
            record("peers-100", "scaleout-lb", stack(20.0, 10.0)),
            record("peers-100", "scaleout-haproxy", stack(30.0, 12.0)),
            record("peers-100", "node-ws", stack(40.0, 8.0)),
            record("peers-100", "socketio", stack(25.0, 30.0)),
            record(
                "missing",
                "sockudo",
                serde_json::json!({"reason": "cargo install failed"}),
            ),
        ];
        let text = render(&records, 50.0);
        assert!(
            text.contains("Chat stacks side by side, 1,000 clients, 100 msg/s"),
            "{text}"
        );
        assert!(
            text.contains(
                "| scaleout (lb) ÷ best of Node ws (HAProxy), Socket.IO (HAProxy) | scaleout (HAProxy) ÷ best of"
            ),
            "{text}"
        );
        // CPU: the best peer is Socket.IO's 25; p99: Node ws's 8.
        assert!(
            text.contains(
                "| server CPU per delivery (µs) | 20.00 | 30.00 | 40.00 | 25.00 | 0.80 | 1.20 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| latency p99 (ms) | 10.00 | 12.00 | 8.00 | 30.00 | 1.25 | 1.50 |"),
            "{text}"
        );
        assert!(
            text.contains("| latency max (ms) | 20.00 | 24.00 | 16.00 | 60.00 | 1.25 | 1.50 |"),
            "{text}"
        );
        // Memory per instance, not the sum of both.
        assert!(
            text.contains(
                "| app RSS per instance, largest (MiB) | 20.0 | 30.0 | 40.0 | 25.0 | 0.80 | 1.20 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("Sockudo (HAProxy) is missing from these figures: cargo install failed"),
            "{text}"
        );
    }

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }
}
