//! Test hosts on one machine: network namespaces joined by a bridge on one private /24 that only
//! the test creates, with no default route. Everything is removed when the [`Lab`] is dropped,
//! also when the test fails.
//!
//! Layout: a switch namespace holds bridge `br0`; each host namespace gets `eth0`, one end of a
//! veth pair whose other end is a port of `br0`. Nothing is created in the root namespace.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// A set of namespace hosts on one subnet.
pub struct Lab {
    prefix: String,
    switch: String,
    hosts: Vec<String>,
}

/// True when this process may create namespaces (root).
pub fn can_create() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
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
