//! The keepalived pair of lb hosts in the namespace tests (`tests/ha_pair.rs`,
//! `tests/ha_pair_acme.rs`): the shipped `deploy/keepalived/keepalived.conf` and `lb-health`
//! with a lab's own `site.conf` ([`Site`]), keepalived started in the foreground on a host and
//! stopped as `systemctl stop` would, lb started on a host, and the virtual address awaited
//! where it should be (read from the hosts' `ip addr`).

use std::fs::Permissions;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testkit::process::{Proc, Ready, workspace_bin};
use testkit::wait::eventually;

use crate::netns::{Lab, ipv4_addrs};

/// Longest wait for the virtual IP to settle on a host: an election at start (three adverts and
/// the skew) after the health check's `rise`, with room to spare.
pub const VIP_WITHIN: Duration = Duration::from_secs(15);

/// How long keepalived or lb may take to stop after SIGTERM.
pub const STOP_WITHIN: Duration = Duration::from_secs(15);

/// A lab's addresses for `site.conf` (on `eth0` of each lb host).
pub struct Site<'a> {
    /// The virtual IP.
    pub vip: &'a str,
    /// lb1's own address (the higher priority).
    pub lb1: &'a str,
    /// lb2's own address.
    pub lb2: &'a str,
    /// lb's admin listener as seen from its own host, where the health check asks.
    pub admin: &'a str,
    /// The VRRP router id.
    pub router_id: u8,
}

/// The shipped keepalived.conf and lb-health in `dir/keepalived/`, with `site`'s `site.conf`;
/// returns the path of keepalived.conf. `dir` must be searchable by `nobody`, who runs the
/// health check.
pub fn keepalived_conf(dir: &Path, site: &Site<'_>) -> Result<PathBuf> {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/keepalived");
    let here = dir.join("keepalived");
    std::fs::create_dir(&here)?;
    std::fs::set_permissions(&here, Permissions::from_mode(0o755))?;
    for file in ["keepalived.conf", "lb-health"] {
        std::fs::copy(shipped.join(file), here.join(file))
            .with_context(|| format!("cannot copy {}", shipped.join(file).display()))?;
    }
    std::fs::set_permissions(here.join("lb-health"), Permissions::from_mode(0o755))?;
    std::fs::write(
        here.join("site.conf"),
        format!(
            "$INTERFACE=eth0\n$VIP={}/24\n$ROUTER_ID={}\n$LB1={}\n$LB2={}\n\
             $LB_HEALTH={}\n$LB_ADMIN={}\n$SCRIPT_USER=nobody\n",
            site.vip,
            site.router_id,
            site.lb1,
            site.lb2,
            here.join("lb-health").display(),
            site.admin,
        ),
    )?;
    Ok(here.join("keepalived.conf"))
}

/// Starts `lb run --config lb_toml` on host `ns`.
pub async fn start_lb(ns: &str, lb_toml: &Path) -> Result<Proc> {
    let mut cmd = Lab::command(ns, &workspace_bin("lb")?);
    cmd.arg("run").arg("--config").arg(lb_toml);
    Proc::spawn(
        &format!("{ns}: lb"),
        cmd,
        Ready::Listening(&["https", "admin"]),
    )
    .await
}

/// Waits until virtual IP `vip` is on host `to` and not on host `from`.
pub async fn vip_moves(vip: &str, to: &str, from: &str) -> Result<()> {
    let held = |addrs: Vec<String>| addrs.iter().any(|a| a.starts_with(&format!("{vip}/")));
    eventually(&format!("{vip} on {to} only"), VIP_WITHIN, || async {
        Ok(held(ipv4_addrs(to, "eth0").await?) && !held(ipv4_addrs(from, "eth0").await?))
    })
    .await
}

/// keepalived (VRRP only) in the foreground on one lb host, with its own pid files.
pub struct Keepalived {
    proc: Proc,
}

impl Keepalived {
    /// Starts keepalived as `-i id` (the `@id` lines of the configuration) on host `ns` and
    /// waits until its VRRP process has started; its pid files go to `dir`.
    pub async fn start(
        ns: &str,
        id: &str,
        bin: &Path,
        conf: &Path,
        dir: &Path,
    ) -> Result<Keepalived> {
        // keepalived logs to stderr; the harness reads readiness lines on stdout.
        let mut cmd = Lab::command(ns, Path::new("/bin/sh"));
        cmd.args(["-c", "exec \"$0\" \"$@\" 2>&1"])
            .arg(bin)
            .args(["--dont-fork", "--log-console", "--log-detail", "--vrrp"])
            .args(["--config-id", id, "--use-file"])
            .arg(conf)
            .arg("--pid")
            .arg(dir.join(format!("keepalived-{id}.pid")))
            .arg("--vrrp_pid")
            .arg(dir.join(format!("keepalived-vrrp-{id}.pid")));
        let proc = Proc::spawn(
            &format!("{ns}: keepalived"),
            cmd,
            Ready::Line("Startup complete"),
        )
        .await?;
        Ok(Keepalived { proc })
    }

    /// SIGTERM, as `systemctl stop keepalived`: the VRRP process releases the address (and
    /// tells the peer), then both processes exit.
    pub async fn stop(mut self) -> Result<()> {
        let status = self.proc.terminate(STOP_WITHIN).await?;
        if !status.success() {
            bail!("keepalived exited with {status}");
        }
        Ok(())
    }
}
