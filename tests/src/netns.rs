//! Test hosts on one machine: network namespaces joined by a bridge on one private /24 that only
//! the test creates, with no default route. Everything is removed when the [`Lab`] is dropped,
//! also when the test fails.
//!
//! Layout: a switch namespace holds bridge `br0`; each host namespace gets `eth0`, one end of a
//! veth pair whose other end is a port of `br0`. Nothing is created in the root namespace.
//!
//! Programs run on a host through `ip netns exec` ([`Lab::command`]); the test's own sockets
//! (clients, health polls) open on a host when the test body runs through [`run_in`], on a
//! runtime whose threads all joined that host's namespace. [`ipv4_addrs`] reads what a host's
//! `eth0` holds, e.g. whether a virtual IP moved to it.

use std::fs::File;
use std::future::Future;
use std::os::fd::AsFd;
use std::process::Command;

use anyhow::{Context, Result, bail};
use rustix::thread::{LinkNameSpaceType, move_into_link_name_space};

/// A set of namespace hosts on one subnet.
pub struct Lab {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
}

impl Lab {
    /// Creates an empty lab whose namespace names start with `prefix` and this process id.
    pub fn new(prefix: &str, subnet: &str) -> Result<Lab> {
        let in_use = ip(&["-o", "addr", "show"])?;
        let net = subnet.trim_end_matches(".0/24");
        if in_use.contains(&format!("inet {net}.")) {
            bail!("subnet {subnet} is already in use on this machine; the test will not touch it");
        }
        let prefix = format!("{prefix}{}", std::process::id());
        let switch = format!("{prefix}-sw");
        ip(&["netns", "add", &switch])?;
        let lab = Lab {
            prefix,
            switch,
            hosts: Vec::new(),
        };
        lab.exec(&lab.switch, &["ip", "link", "set", "lo", "up"])?;
        lab.exec(&lab.switch, &["ip", "link", "add", "br0", "type", "bridge"])?;
        lab.exec(&lab.switch, &["ip", "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    /// Adds host `name` with address `addr/24` on `eth0`; returns its namespace name.
    pub fn add_host(&mut self, name: &str, addr: &str) -> Result<String> {
        let ns = format!("{}-{name}", self.prefix);
        ip(&["netns", "add", &ns])?;
        self.hosts.push(ns.clone());
        let port = format!("p-{name}");
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &self.switch,
        ])?;
        self.exec(&self.switch, &["ip", "link", "set", &port, "master", "br0"])?;
        self.exec(&self.switch, &["ip", "link", "set", &port, "up"])?;
        self.exec(&ns, &["ip", "link", "set", "lo", "up"])?;
        self.exec(
            &ns,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
        self.exec(&ns, &["ip", "link", "set", "eth0", "up"])?;
        Ok(ns)
    }

    /// Runs a command inside a namespace and waits for it.
    pub fn exec(&self, ns: &str, argv: &[&str]) -> Result<String> {
        let mut args = vec!["netns", "exec", ns];
        args.extend_from_slice(argv);
        ip(&args)
    }

    /// A `tokio` command that runs `program` inside namespace `ns`.
    pub fn command(ns: &str, program: &std::path::Path) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        cmd
    }
}

/// Runs `body` to completion on a fresh runtime whose threads are all in namespace `ns`: every
/// socket it opens is one of that host's. Programs it starts through [`Lab::command`] still run
/// in their own namespaces. A panic in `body` (a failed assertion) is the caller's panic.
pub fn run_in<F, Fut, T>(ns: &str, body: F) -> Result<T>
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Result<T>>,
    T: Send,
{
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            let path = format!("/run/netns/{ns}");
            let netns = File::open(&path).with_context(|| format!("cannot open {path}"))?;
            // setns(2) moves this thread only; the runtime's threads, spawned from it, follow.
            move_into_link_name_space(netns.as_fd(), Some(LinkNameSpaceType::Network))
                .with_context(|| format!("cannot enter network namespace {ns}"))?;
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot build a runtime")?;
            runtime.block_on(body())
        });
        thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The IPv4 addresses on `dev` of host `ns`, as `ADDR/PREFIX`.
pub async fn ipv4_addrs(ns: &str, dev: &str) -> Result<Vec<String>> {
    let out = tokio::process::Command::new("ip")
        .args(["-n", ns, "-o", "-4", "addr", "show", "dev", dev])
        .output()
        .await
        .context("cannot run `ip` (apt-get install -y iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} addr show dev {dev} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // `2: eth0    inet 10.0.0.10/24 brd 10.0.0.255 scope global eth0 ...`
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            words.find(|w| *w == "inet")?;
            words.next().map(str::to_owned)
        })
        .collect())
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.hosts.iter().chain(std::iter::once(&self.switch)) {
            if let Err(e) = ip(&["netns", "del", ns]) {
                eprintln!("could not remove namespace {ns}: {e:#}");
            }
        }
    }
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (apt-get install -y iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
