//! CPU time and resident memory of processes, read from `/proc`.
//!
//! `--watch NAME=PID[,PID...]` names a group of processes (a proxy and its workers, say);
//! [`Watch::sample`] reads `utime + stime` from `/proc/PID/stat` and resident pages from
//! `/proc/PID/statm` for every PID of the group and sums them. A run opens a [`Window`] when its
//! measurement starts and closes it when it ends: the window samples the watched groups, the
//! generator itself (`/proc/self`), the children it has reaped (wrk) and the whole machine
//! (`/proc/stat`), and reports what each used in between ([`Measured`]). So every report can say
//! whether the generator was the bottleneck and whether other work was competing for the cores.

use std::fmt;
use std::fs;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::Serialize;

/// Kernel clock ticks per second for `/proc/*/stat` times (USER_HZ, fixed at 100 on Linux).
const TICKS_PER_SECOND: u64 = 100;
/// Page size for `/proc/*/statm` (4 KiB on the x86-64 and arm64 kernels we run on).
const PAGE_SIZE: u64 = 4096;

/// A named group of processes whose CPU time and memory are summed.
#[derive(Debug, Clone)]
pub struct Watch {
    /// The name printed in reports (`lb`, `haproxy`, `redis`...).
    pub name: String,
    /// The processes of the group; `self` means the generator itself.
    pids: Vec<String>,
}

impl FromStr for Watch {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let Some((name, pids)) = s.split_once('=') else {
            bail!("--watch {s}: expected NAME=PID[,PID...]");
        };
        let pids: Vec<String> = pids.split(',').map(str::to_string).collect();
        for pid in &pids {
            if pid != "self" && pid.parse::<u32>().is_err() {
                bail!("--watch {s}: {pid} is not a process id");
            }
        }
        if name.is_empty() {
            bail!("--watch {s}: empty name");
        }
        Ok(Self {
            name: name.to_string(),
            pids,
        })
    }
}

impl Watch {
    /// The generator itself.
    pub fn this_process() -> Self {
        Self {
            name: "generator".to_string(),
            pids: vec!["self".to_string()],
        }
    }

    /// CPU time of the group's reaped children (fields `cutime + cstime`); memory is left at zero.
    pub fn children(&self) -> anyhow::Result<Sample> {
        let mut total = Sample::default();
        for pid in &self.pids {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat ({})", self.name))?;
            total.cpu_ticks +=
                children_ticks(&stat).with_context(|| format!("/proc/{pid}/stat"))?;
        }
        Ok(total)
    }

    /// Descriptors the group holds open (entries of `/proc/PID/fd`).
    pub fn open_files(&self) -> anyhow::Result<usize> {
        let mut total = 0;
        for pid in &self.pids {
            total += fs::read_dir(format!("/proc/{pid}/fd"))
                .with_context(|| format!("listing /proc/{pid}/fd ({})", self.name))?
                .count();
        }
        Ok(total)
    }

    /// Current CPU time and resident memory of the group.
    pub fn sample(&self) -> anyhow::Result<Sample> {
        let mut total = Sample::default();
        for pid in &self.pids {
            let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("reading /proc/{pid}/stat ({})", self.name))?;
            let statm = fs::read_to_string(format!("/proc/{pid}/statm"))
                .with_context(|| format!("reading /proc/{pid}/statm ({})", self.name))?;
            total.cpu_ticks += cpu_ticks(&stat).with_context(|| format!("/proc/{pid}/stat"))?;
            let rss = resident_bytes(&statm).with_context(|| format!("/proc/{pid}/statm"))?;
            total.rss_bytes += rss;
            total.largest_rss_bytes = total.largest_rss_bytes.max(rss);
        }
        Ok(total)
    }
}

/// A point-in-time reading of a group.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    cpu_ticks: u64,
    rss_bytes: u64,
    /// Resident memory of the group's largest process (one instance of a server, say).
    largest_rss_bytes: u64,
}

impl Sample {
    /// Resident memory, MiB.
    pub fn rss_mib(&self) -> f64 {
        mib(self.rss_bytes)
    }
}

/// Bytes as MiB.
fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// What a group used over a window.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// The group's name.
    pub name: String,
    /// CPU seconds (user + system) spent in the window.
    pub cpu_seconds: f64,
    /// CPU seconds per wall second: 1.0 is one core busy.
    pub cores: f64,
    /// Resident memory at the end of the window, MiB (summed over the group's processes).
    pub rss_mib: f64,
    /// Resident memory of the group's largest process at the end of the window, MiB: per
    /// instance, where the group is several instances of one server.
    pub largest_process_rss_mib: f64,
    /// Resident memory growth over the window, KiB (negative when it shrank).
    pub rss_growth_kib: f64,
}

impl Usage {
    /// The usage between `before` and `after`, over `wall` time.
    pub fn since(name: &str, before: Sample, after: Sample, wall: Duration) -> Self {
        let cpu_seconds =
            after.cpu_ticks.saturating_sub(before.cpu_ticks) as f64 / TICKS_PER_SECOND as f64;
        Self {
            name: name.to_string(),
            cpu_seconds,
            cores: cpu_seconds / wall.as_secs_f64().max(1e-9),
            rss_mib: after.rss_mib(),
            largest_process_rss_mib: mib(after.largest_rss_bytes),
            rss_growth_kib: (after.rss_bytes as f64 - before.rss_bytes as f64) / 1024.0,
        }
    }
}

/// The samples taken when a measured window opened.
pub struct Window {
    watches: Vec<Watch>,
    watched: Vec<Sample>,
    generator: Sample,
    children: Sample,
    machine_ticks: u64,
    opened: Instant,
}

/// What everything used over a closed window.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// Each watched group, in `--watch` order.
    pub watched: Vec<Usage>,
    /// The generator process itself.
    pub generator: Usage,
    /// Child processes the generator ran and reaped during the window (wrk).
    pub children: Usage,
    /// Cores busy on the whole machine (every process, kernel included): near the core count
    /// means the figures were taken on a saturated machine.
    pub machine_cores: f64,
    /// Length of the window, seconds.
    pub wall_s: f64,
}

impl Window {
    /// Samples everything now.
    pub fn open(watches: &[Watch]) -> anyhow::Result<Self> {
        let me = Watch::this_process();
        Ok(Self {
            watches: watches.to_vec(),
            watched: watches
                .iter()
                .map(Watch::sample)
                .collect::<anyhow::Result<_>>()?,
            generator: me.sample()?,
            children: me.children()?,
            machine_ticks: machine_busy_ticks()?,
            opened: Instant::now(),
        })
    }

    /// Samples everything again and returns the differences.
    pub fn close(self) -> anyhow::Result<Measured> {
        let wall = self.opened.elapsed();
        let me = Watch::this_process();
        let mut watched = Vec::with_capacity(self.watches.len());
        for (watch, before) in self.watches.iter().zip(self.watched) {
            watched.push(Usage::since(&watch.name, before, watch.sample()?, wall));
        }
        let busy = machine_busy_ticks()?.saturating_sub(self.machine_ticks);
        Ok(Measured {
            watched,
            generator: Usage::since("generator", self.generator, me.sample()?, wall),
            children: Usage::since("children", self.children, me.children()?, wall),
            machine_cores: busy as f64 / TICKS_PER_SECOND as f64 / wall.as_secs_f64().max(1e-9),
            wall_s: wall.as_secs_f64(),
        })
    }
}

/// Who made the load, which decides the last rows of a report.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Load {
    /// This process: the watched rows give resident memory too, the last row the generator's cores.
    Generator,
    /// `wrk`, run as a child: the watched rows give CPU only, the last row wrk's cores.
    Wrk,
}

impl Measured {
    /// Microseconds of CPU per unit of work (request, round trip, delivery) for each watched group.
    pub fn cpu_us_per(&self, units: u64) -> Vec<f64> {
        self.watched
            .iter()
            .map(|u| u.cpu_seconds * 1e6 / units.max(1) as f64)
            .collect()
    }

    /// The CPU rows that end every report: one per watched group with its cores and `per_unit`
    /// µs of CPU per `unit`, then `server total` of them when given, then the cores of whatever
    /// made the `load` and of the whole machine (that last line without a newline).
    pub fn write_cpu_rows(
        &self,
        f: &mut fmt::Formatter<'_>,
        per_unit: &[f64],
        unit: &str,
        server_total: Option<f64>,
        load: Load,
    ) -> fmt::Result {
        for (u, per) in self.watched.iter().zip(per_unit) {
            write!(
                f,
                "  {:<13}  {:.2} cores, {per:.2} µs CPU per {unit}",
                u.name, u.cores
            )?;
            if load == Load::Generator {
                write!(f, ", RSS {:.1} MiB", u.rss_mib)?;
            }
            writeln!(f)?;
        }
        if let Some(total) = server_total {
            writeln!(f, "  server total   {total:.2} µs CPU per {unit}")?;
        }
        let (name, cores) = match load {
            Load::Generator => ("generator", self.generator.cores),
            Load::Wrk => ("wrk", self.children.cores),
        };
        write!(
            f,
            "  {name:<13}  {cores:.2} cores; machine {:.2} cores busy",
            self.machine_cores
        )
    }
}

/// The machine's TCP counters that show a connection storm overrunning a listener, from the
/// `TcpExt` lines of `/proc/net/netstat` (counted since boot, for every socket on the machine).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct TcpCounters {
    /// Completed connections dropped because a listener's accept queue was full.
    pub listen_overflows: u64,
    /// Connection requests dropped by listeners, for any reason (overflows included).
    pub listen_drops: u64,
    /// SYN cookies sent because a listener's SYN queue was full.
    pub syncookies_sent: u64,
    /// SYNs sent again by clients whose first SYN got no answer (a dropped SYN costs 1 s).
    pub syn_retransmits: u64,
}

impl TcpCounters {
    /// The counters now.
    pub fn read() -> anyhow::Result<Self> {
        let text = fs::read_to_string("/proc/net/netstat").context("reading /proc/net/netstat")?;
        Self::parse(&text).context("/proc/net/netstat")
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
            bail!("no TcpExt lines");
        };
        let mut counters = Self::default();
        for (name, value) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            let slot = match name {
                "ListenOverflows" => &mut counters.listen_overflows,
                "ListenDrops" => &mut counters.listen_drops,
                "SyncookiesSent" => &mut counters.syncookies_sent,
                "TCPSynRetrans" => &mut counters.syn_retransmits,
                _ => continue,
            };
            *slot = value
                .parse()
                .with_context(|| format!("{name}: not a number"))?;
        }
        Ok(counters)
    }

    /// What the counters grew by since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            listen_overflows: self
                .listen_overflows
                .saturating_sub(before.listen_overflows),
            listen_drops: self.listen_drops.saturating_sub(before.listen_drops),
            syncookies_sent: self.syncookies_sent.saturating_sub(before.syncookies_sent),
            syn_retransmits: self.syn_retransmits.saturating_sub(before.syn_retransmits),
        }
    }
}

/// Busy ticks of all CPUs since boot: the `cpu` line of `/proc/stat` less idle and iowait.
fn machine_busy_ticks() -> anyhow::Result<u64> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    busy_ticks(&stat).context("/proc/stat")
}

fn busy_ticks(stat: &str) -> anyhow::Result<u64> {
    let line = stat
        .lines()
        .next()
        .filter(|l| l.starts_with("cpu "))
        .context("no cpu line")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(|f| f.parse::<u64>().context("not a number"))
        .collect::<anyhow::Result<_>>()?;
    // user nice system idle iowait irq softirq steal
    if fields.len() < 8 {
        bail!("too few fields");
    }
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7])
}

/// `utime + stime` (fields 14 and 15) of a `/proc/PID/stat` line.
fn cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    two_fields_after(stat, 14)
}

/// `cutime + cstime` (fields 16 and 17): CPU of the children the process has waited for.
fn children_ticks(stat: &str) -> anyhow::Result<u64> {
    two_fields_after(stat, 16)
}

/// The sum of fields `first` and `first + 1` (1-based, as in proc(5)) of a `/proc/PID/stat` line.
/// The command name (field 2) may hold spaces and parentheses, so fields are counted after its
/// closing parenthesis.
fn two_fields_after(stat: &str, first: usize) -> anyhow::Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("no command name")?;
    // After ")": field 3 (state) is index 0.
    let mut fields = rest.split_whitespace().skip(first - 3);
    let mut next = || -> anyhow::Result<u64> {
        fields
            .next()
            .context("too few fields")?
            .parse::<u64>()
            .context("not a number")
    };
    Ok(next()? + next()?)
}

/// Resident set size in bytes from `/proc/PID/statm` (second field, in pages).
fn resident_bytes(statm: &str) -> anyhow::Result<u64> {
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .context("too few fields")?
        .parse()
        .context("not a number")?;
    Ok(pages * PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_counts_fields_after_the_command_name() {
        let line =
            "1234 (a (weird) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 5 6 20 0 3 0 1 2 3";
        assert_eq!(cpu_ticks(line).unwrap(), 325);
        assert_eq!(children_ticks(line).unwrap(), 11);
        assert!(cpu_ticks("1234 (x) S 1").is_err());
    }

    #[test]
    fn resident_bytes_reads_pages() {
        assert_eq!(
            resident_bytes("1000 250 10 1 0 100 0").unwrap(),
            250 * PAGE_SIZE
        );
        assert!(resident_bytes("1000").is_err());
    }

    #[test]
    fn watch_parses_names_and_pids() {
        let w: Watch = "nginx=10,11".parse().unwrap();
        assert_eq!(w.name, "nginx");
        assert_eq!(w.pids, ["10", "11"]);
        assert!("nginx".parse::<Watch>().is_err());
        assert!("nginx=abc".parse::<Watch>().is_err());
        assert!("=1".parse::<Watch>().is_err());
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        let stat = "cpu  10 1 5 1000 7 2 3 4 0 0\ncpu0 5 0 2 500 3 1 1 2 0 0\n";
        assert_eq!(busy_ticks(stat).unwrap(), 10 + 1 + 5 + 2 + 3 + 4);
        assert!(busy_ticks("intr 1 2 3").is_err());
    }

    #[test]
    fn a_window_measures_the_generator_and_the_machine() {
        let window = Window::open(&[Watch::this_process()]).unwrap();
        let measured = window.close().unwrap();
        assert_eq!(measured.watched.len(), 1);
        assert!(measured.machine_cores >= 0.0);
        assert_eq!(measured.cpu_us_per(0).len(), 1);
    }

    #[test]
    fn cpu_rows_of_the_generator_and_of_wrk() {
        let usage = |name: &str, cores: f64, rss_mib: f64| Usage {
            name: name.to_string(),
            cpu_seconds: 0.0,
            cores,
            rss_mib,
            largest_process_rss_mib: rss_mib,
            rss_growth_kib: 0.0,
        };
        let measured = Measured {
            watched: vec![usage("lb", 0.5, 12.0), usage("apps", 1.25, 40.0)],
            generator: usage("generator", 0.75, 0.0),
            children: usage("children", 0.33, 0.0),
            machine_cores: 1.9,
            wall_s: 1.0,
        };
        struct Rows<'a>(&'a Measured, &'a str, Option<f64>, Load);
        impl fmt::Display for Rows<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0
                    .write_cpu_rows(f, &[1.5, 2.0], self.1, self.2, self.3)
            }
        }
        assert_eq!(
            Rows(&measured, "delivery", Some(3.5), Load::Generator).to_string(),
            "  lb             0.50 cores, 1.50 µs CPU per delivery, RSS 12.0 MiB\n\
             \x20 apps           1.25 cores, 2.00 µs CPU per delivery, RSS 40.0 MiB\n\
             \x20 server total   3.50 µs CPU per delivery\n\
             \x20 generator      0.75 cores; machine 1.90 cores busy"
        );
        assert_eq!(
            Rows(&measured, "request", None, Load::Wrk).to_string(),
            "  lb             0.50 cores, 1.50 µs CPU per request\n\
             \x20 apps           1.25 cores, 2.00 µs CPU per request\n\
             \x20 wrk            0.33 cores; machine 1.90 cores busy"
        );
    }

    #[test]
    fn this_process_can_be_sampled() {
        let s = Watch::this_process().sample().unwrap();
        assert!(s.rss_bytes > 0);
        assert!(s.rss_mib() > 0.0);
        assert_eq!(s.largest_rss_bytes, s.rss_bytes);
    }

    #[test]
    fn a_group_sums_memory_and_keeps_its_largest_process() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        // A child blocked on stdin after echoing a line keeps its resident memory still.
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ready\n").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let once: Watch = format!("child={}", child.id()).parse().unwrap();
        let twice: Watch = format!("child={0},{0}", child.id()).parse().unwrap();
        let samples = (once.sample(), twice.sample());
        drop(stdin);
        child.wait().unwrap();
        let (once, twice) = (samples.0.unwrap(), samples.1.unwrap());
        assert!(once.rss_bytes > 0);
        assert_eq!(twice.rss_bytes, 2 * once.rss_bytes);
        assert_eq!(twice.largest_rss_bytes, once.rss_bytes);
        let usage = Usage::since("child", once, twice, Duration::from_secs(1));
        assert_eq!(usage.rss_mib, 2.0 * usage.largest_process_rss_mib);
    }

    #[test]
    fn tcp_counters_are_read_by_name_and_subtracted() {
        let text = "TcpExt: SyncookiesSent Other ListenOverflows ListenDrops TCPSynRetrans\n\
                    TcpExt: 5 99 7 9 11\n\
                    IpExt: InNoRoutes\nIpExt: 0\n";
        let before = TcpCounters::parse(text).unwrap();
        assert_eq!(
            before,
            TcpCounters {
                listen_overflows: 7,
                listen_drops: 9,
                syncookies_sent: 5,
                syn_retransmits: 11,
            }
        );
        let after = TcpCounters {
            listen_overflows: 10,
            ..before
        };
        assert_eq!(after.since(before).listen_overflows, 3);
        assert_eq!(after.since(before).syn_retransmits, 0);
        assert!(TcpCounters::parse("IpExt: A\nIpExt: 1\n").is_err());
        assert!(TcpCounters::read().is_ok());
    }

    #[test]
    fn open_files_counts_descriptors() {
        use std::io::{BufRead, BufReader, Write};
        use std::process::{Command, Stdio};
        // A child holds at least stdin, stdout and stderr (more when the test runner passes on
        // descriptors of its own, as cargo's jobserver pipes). Once it has echoed a line it is
        // past its start-up (where it opens and closes locale files) and waits on stdin.
        let mut child = Command::new("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(b"ready\n").unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line, "ready\n");
        let once: Watch = format!("child={}", child.id()).parse().unwrap();
        let twice: Watch = format!("child={0},{0}", child.id()).parse().unwrap();
        let counted = (once.open_files(), twice.open_files());
        drop(stdin);
        child.wait().unwrap();
        let (once, twice) = (counted.0.unwrap(), counted.1.unwrap());
        assert!(once >= 3, "{once}");
        assert_eq!(twice, 2 * once);
        assert!(
            Watch::from_str("gone=4194305")
                .unwrap()
                .open_files()
                .is_err()
        );
    }
}
