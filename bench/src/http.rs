//! `bench http`: small-response HTTP(S) load over keep-alive, driven by `wrk`.
//!
//! The watched processes are sampled, `wrk -t T -c C -d D --latency URL` runs as a child, and they
//! are sampled again when it exits; wrk's text report is parsed for requests/s, the latency
//! distribution and errors. wrk's own CPU comes from this process's reaped-children times, so the
//! report says whether the load tool was the bottleneck, like the other subcommands.

use std::time::Duration;

use anyhow::{Context, bail};
use serde::Serialize;

use crate::procstat::{Load, Measured, Watch, Window};

/// Options of `bench http`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// http:// or https:// URL (wrk does not verify certificates).
    #[arg(long)]
    url: String,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Keep-alive connections.
    #[arg(long, default_value_t = 50)]
    connections: usize,
    /// Load time.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Processes whose CPU to report: NAME=PID[,PID...], repeatable.
    #[arg(long)]
    watch: Vec<Watch>,
}

/// What `bench http` measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// The URL measured.
    pub url: String,
    /// Keep-alive connections.
    pub connections: usize,
    /// Requests completed.
    pub requests: u64,
    /// Requests per second as wrk reports it.
    pub requests_per_s: f64,
    /// Median latency, ms.
    pub p50_ms: f64,
    /// 90th percentile latency, ms.
    pub p90_ms: f64,
    /// 99th percentile latency, ms.
    pub p99_ms: f64,
    /// Socket errors plus non-2xx/3xx responses.
    pub errors: u64,
    /// CPU microseconds per request of each watched group, in `--watch` order.
    pub cpu_us_per_request: Vec<f64>,
    /// CPU and memory of the watched groups, wrk (`children`) and the machine over the run.
    #[serde(flatten)]
    pub measured: Measured,
}

/// Runs wrk and reports.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let window = Window::open(&args.watch)?;
    let output = tokio::process::Command::new("wrk")
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", args.duration.as_secs_f64()))
        .arg("--latency")
        .arg(&args.url)
        .kill_on_drop(true)
        .output()
        .await
        .context("running wrk (is it installed?)")?;
    let measured = window.close()?;
    let text = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "wrk failed ({}): {}{}",
            output.status,
            text,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let parsed = parse_wrk(&text).with_context(|| format!("reading wrk's report:\n{text}"))?;
    Ok(Report {
        url: args.url,
        connections: args.connections,
        requests: parsed.requests,
        requests_per_s: parsed.requests_per_s,
        p50_ms: parsed.p50_ms,
        p90_ms: parsed.p90_ms,
        p99_ms: parsed.p99_ms,
        errors: parsed.errors,
        cpu_us_per_request: measured.cpu_us_per(parsed.requests),
        measured,
    })
}

/// The figures read off wrk's text report.
#[derive(Debug, Default, PartialEq)]
struct WrkFigures {
    requests: u64,
    requests_per_s: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    errors: u64,
}

fn parse_wrk(text: &str) -> anyhow::Result<WrkFigures> {
    let mut figures = WrkFigures::default();
    let (mut have_rate, mut have_p99) = (false, false);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", rate] => {
                figures.requests_per_s = rate.parse().context("Requests/sec")?;
                have_rate = true;
            }
            ["50%", t] => figures.p50_ms = millis(t)?,
            ["90%", t] => figures.p90_ms = millis(t)?,
            ["99%", t] => {
                figures.p99_ms = millis(t)?;
                have_p99 = true;
            }
            [n, "requests", "in", ..] => figures.requests = n.parse().context("request count")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                figures.errors += n.parse::<u64>().context("Non-2xx")?
            }
            ["Socket", "errors:", rest @ ..] => {
                // "connect 0, read 0, write 0, timeout 0"
                for n in rest.iter().skip(1).step_by(2) {
                    figures.errors += n
                        .trim_end_matches(',')
                        .parse::<u64>()
                        .context("socket errors")?;
                }
            }
            _ => {}
        }
    }
    if !have_rate || !have_p99 {
        bail!("no Requests/sec or latency distribution");
    }
    Ok(figures)
}

/// A wrk duration ("812.00us", "1.20ms", "2.01s") in milliseconds.
fn millis(t: &str) -> anyhow::Result<f64> {
    let split = t
        .find(|c: char| c.is_ascii_alphabetic())
        .with_context(|| format!("no unit in {t}"))?;
    let (value, unit) = t.split_at(split);
    let value: f64 = value
        .parse()
        .with_context(|| format!("bad number in {t}"))?;
    Ok(match unit {
        "us" => value / 1000.0,
        "ms" => value,
        "s" => value * 1000.0,
        "m" => value * 60_000.0,
        _ => bail!("unknown unit in {t}"),
    })
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "http {} ({} connections)", self.url, self.connections)?;
        writeln!(
            f,
            "  requests/s     {:.0} ({} requests, {} errors)",
            self.requests_per_s, self.requests, self.errors
        )?;
        writeln!(
            f,
            "  latency        p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms",
            self.p50_ms, self.p90_ms, self.p99_ms
        )?;
        self.measured
            .write_cpu_rows(f, &self.cpu_us_per_request, "request", None, Load::Wrk)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 1s test @ http://127.0.0.1:37633/
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.20ms    5.21ms  21.71ms   68.36%
    Req/Sec     8.59k   718.32    10.10k    80.00%
  Latency Distribution
     50%  812.00us
     75%    8.90ms
     90%   14.37ms
     99%    1.02s
  8793 requests in 1.03s, 0.96MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   8536.26
Transfer/sec:      0.94MB
";

    #[test]
    fn reads_wrks_report() {
        assert_eq!(
            parse_wrk(REPORT).unwrap(),
            WrkFigures {
                requests: 8793,
                requests_per_s: 8536.26,
                p50_ms: 0.812,
                p90_ms: 14.37,
                p99_ms: 1020.0,
                errors: 9,
            }
        );
    }

    #[test]
    fn rejects_a_report_without_figures() {
        assert!(parse_wrk("unable to connect to 127.0.0.1:1 Connection refused").is_err());
        assert!(millis("12").is_err());
        assert!(millis("12h").is_err());
    }
}
