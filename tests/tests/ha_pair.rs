//! The HA pair of lb hosts (README, "Five hosts"), built from network namespaces on one machine
//! (root only): two lb hosts each running `lb` and keepalived with the shipped
//! `deploy/keepalived/keepalived.conf` (only `site.conf`, the site's addresses, is this lab's),
//! a backend host with Redis and two apps, and a client host that reaches the chat only through
//! the virtual IP.
//!
//! The virtual IP sits on lb1 (the higher priority). Then, under chat load from resuming clients
//! and retrying senders (the chaos driver), lb on lb1 is killed (SIGKILL by PID): its health
//! check fails, keepalived releases the address and lb2 takes it (observed in the hosts'
//! `ip addr`); lb on lb1 is started again. Every client loses its connection once, reconnects
//! through the virtual IP to lb2 with resume, and in the end every message sent was published
//! once and received exactly once by every client. With `nopreempt` the address stays on lb2
//! although lb1 is healthy again. Then keepalived is stopped on lb2 while its lb keeps running:
//! the address goes back to lb1, and every client, also one that only receives, finds out
//! through its heartbeat, reconnects through lb1 and loses nothing. Stopped, both keepalived
//! processes leave the address on neither host.
//!
//! The namespaces share one private /24 that only this test creates (not the four-host test's),
//! have no default route, and are removed at the end, also when the test fails.

use std::fs::Permissions;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testkit::process::{Proc, Ready, system_bin, workspace_bin};
use testkit::wait::eventually;
use tests::chaos::{self, Config, Scenario, Target};
use tests::client::tls_connector;
use tests::keepalived::{
    Keepalived, STOP_WITHIN, Site, VIP_WITHIN, keepalived_conf, start_lb, vip_moves,
};
use tests::netns::{Lab, ipv4_addrs, run_in};
use tests::stack::{app_config, generate_certs, lb_config_weighted, wait_healthy};
use tokio::time::Instant;

const SUBNET: &str = "10.213.48.0/24";
/// How long one read of lb's `/stats` may take.
const STATS_WITHIN: Duration = Duration::from_secs(2);
const LB1: &str = "10.213.48.10";
const LB2: &str = "10.213.48.11";
const VIP: &str = "10.213.48.100";
const BACKEND: &str = "10.213.48.20";
const CLIENT: &str = "10.213.48.30";
/// lb's admin listener on each lb host, where keepalived's health check asks.
const ADMIN: &str = "127.0.0.1:9100";
/// This lab's `site.conf`.
const SITE: Site<'static> = Site {
    vip: VIP,
    lb1: LB1,
    lb2: LB2,
    admin: ADMIN,
    router_id: 51,
};

/// The lab's hosts (namespace names).
struct Hosts {
    lb1: String,
    lb2: String,
    backend: String,
    client: String,
}

#[test]
#[ignore = "needs root (network namespaces): tests/run runs it when root"]
fn ha_pair_moves_the_virtual_ip_and_clients_lose_nothing() -> Result<()> {
    let mut lab = Lab::new("soha", SUBNET)?;
    let hosts = Hosts {
        lb1: lab.add_host("lb1", LB1)?,
        lb2: lab.add_host("lb2", LB2)?,
        backend: lab.add_host("backend", BACKEND)?,
        client: lab.add_host("client", CLIENT)?,
    };
    let keepalived = system_bin("keepalived", "keepalived")?;
    // The test's own sockets (clients, witness, health polls) are the client host's.
    run_in(&hosts.client, || pair(&hosts, &keepalived))
}

async fn pair(hosts: &Hosts, keepalived: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // keepalived runs the health check as `nobody`, who must reach the script inside.
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755))?;
    let certs = dir.path().join("certs");
    generate_certs(&certs, &["chat.example.internal", VIP]).await?;

    // The backend host: Redis and two apps.
    let redis_bin = system_bin("redis-server", "redis-server")?;
    let mut cmd = Lab::command(&hosts.backend, &redis_bin);
    cmd.args([
        "--bind",
        BACKEND,
        "--port",
        "6379",
        "--protected-mode",
        "no",
    ])
    .args(["--save", "", "--appendonly", "no", "--dir"])
    .arg(dir.path());
    let _redis = Proc::spawn("redis", cmd, Ready::Line("Ready to accept connections")).await?;
    let redis_url = format!("redis://{BACKEND}:6379");
    let app_toml = dir.path().join("app.toml");
    std::fs::write(&app_toml, app_config())?;
    let mut apps = Vec::new();
    let mut backends = Vec::new();
    for (name, port) in [("app1", 8001), ("app2", 8002)] {
        let addr: SocketAddr = format!("{BACKEND}:{port}").parse()?;
        let mut cmd = Lab::command(&hosts.backend, &workspace_bin("app")?);
        cmd.arg("--config").arg(&app_toml).args([
            "--listen",
            &addr.to_string(),
            "--redis",
            &redis_url,
        ]);
        apps.push(Proc::spawn(name, cmd, Ready::Listening(&["http"])).await?);
        wait_healthy(addr).await?;
        backends.push((name.to_owned(), addr, 1));
    }

    // lb on both lb hosts, on every address (the virtual IP included, whenever it arrives).
    let lb_toml = dir.path().join("lb.toml");
    std::fs::write(
        &lb_toml,
        lb_config_weighted("0.0.0.0:443", ADMIN, &certs.join("server.pem"), &backends),
    )?;
    let mut lb1 = start_lb(&hosts.lb1, &lb_toml).await?;
    let _lb2 = start_lb(&hosts.lb2, &lb_toml).await?;

    // keepalived on both, lb1 first: it has the higher priority and wins the first election.
    let conf = keepalived_conf(dir.path(), &SITE)?;
    let ka1 = Keepalived::start(&hosts.lb1, "lb1", keepalived, &conf, dir.path()).await?;
    let ka2 = Keepalived::start(&hosts.lb2, "lb2", keepalived, &conf, dir.path()).await?;
    vip_moves(VIP, &hosts.lb1, &hosts.lb2).await?;
    println!("{}: holds {VIP}", hosts.lb1);

    // Chat load through the virtual IP; the fault moves it to lb2.
    let target = Target {
        url: format!("wss://{VIP}/ws"),
        tls: tls_connector(&certs.join("ca.crt"))?,
        redis_url,
        tokens: None,
    };
    let config = Config {
        clients: 20,
        senders: 2,
        rate: 20.0,
        duration: Duration::from_secs(12),
        fault_at: Duration::from_secs(2),
        drain: Duration::from_secs(5),
        ..Config::new(Scenario::None)
    };
    let fault = async {
        let began = Instant::now();
        lb1.signal("KILL")?;
        vip_moves(VIP, &hosts.lb2, &hosts.lb1).await?;
        let to_lb2 = began.elapsed();
        lb1.wait_exit(STOP_WITHIN).await?;
        lb1 = start_lb(&hosts.lb1, &lb_toml).await?;
        all_back_through(&hosts.lb2, config.clients).await?;
        Ok(format!(
            "lb on lb1 SIGKILL: VIP on lb2 after {to_lb2:.1?}; lb on lb1 started again; \
             every client back through lb2"
        ))
    };
    let report = chaos::drive(&config, "lb-failover", &target, fault).await?;
    println!("{report}");
    report.assert_zero_loss();
    // `nopreempt`: lb1, healthy again for seconds now, did not take the address back (which
    // would have broken every connection a second time).
    assert_each_client_moved_once(&report);
    assert!(lb1.is_running(), "lb on lb1, started again, has exited");
    vip_moves(VIP, &hosts.lb2, &hosts.lb1).await?;

    // keepalived stopped on the holder while its lb keeps running (`systemctl stop keepalived`
    // there): the address goes back to lb1, and lb2 still holds every client's connection but
    // can no longer send from the address, so a client that only receives hears nothing. Its
    // heartbeat (1 s here; the page's is 15 s) reaches lb1, which resets it; it reconnects
    // through lb1 and resumes.
    let config = Config {
        heartbeat: Duration::from_secs(1),
        ..config
    };
    let fault = async {
        let began = Instant::now();
        ka2.stop().await?;
        vip_moves(VIP, &hosts.lb1, &hosts.lb2).await?;
        let to_lb1 = began.elapsed();
        all_back_through(&hosts.lb1, config.clients).await?;
        Ok(format!(
            "keepalived on lb2 stopped, its lb still running: VIP on lb1 after {to_lb1:.1?}; \
             every client back through lb1"
        ))
    };
    let report = chaos::drive(&config, "keepalived-stopped", &target, fault).await?;
    println!("{report}");
    report.assert_zero_loss();
    assert_each_client_moved_once(&report);

    // Stopped, keepalived releases the address.
    ka1.stop().await?;
    for host in [&hosts.lb1, &hosts.lb2] {
        let left = ipv4_addrs(host, "eth0").await?;
        assert!(
            !left.iter().any(|a| a.starts_with(&format!("{VIP}/"))),
            "keepalived stopped and left {VIP} on {host}: {left:?}"
        );
    }
    Ok(())
}

/// The move broke every client's WebSocket: each went through one lb host, then the other
/// (fewer disconnects than twice the clients: not every client was broken twice).
fn assert_each_client_moved_once(report: &chaos::Report) {
    let clients = report.clients as u64;
    assert!(
        (clients..2 * clients).contains(&report.disconnects),
        "expected each client to lose its connection once: {report}"
    );
}

/// Waits until lb on host `ns` holds a tunnel for each of `clients`.
async fn all_back_through(ns: &str, clients: usize) -> Result<()> {
    let clients = clients as u64;
    eventually(
        &format!("{clients} tunnels through {ns}"),
        VIP_WITHIN,
        || async { Ok(tunnels(ns).await? == clients) },
    )
    .await
}

/// How many WebSocket tunnels lb on host `ns` holds, from its loopback-only admin `/stats`
/// (read from inside the host).
async fn tunnels(ns: &str) -> Result<u64> {
    let request = r"GET /stats HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n";
    let get = format!(
        "exec 3<>/dev/tcp/{}; printf '{request}' >&3; cat <&3",
        ADMIN.replace(':', "/")
    );
    // One read is bounded: a request lost while the address moves is asked again, instead of
    // holding the whole wait until its deadline.
    let read = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "bash", "-c", &get])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(STATS_WITHIN, read)
        .await
        .map_err(|_| {
            anyhow::anyhow!("lb's admin listener on {ns} did not answer within {STATS_WITHIN:?}")
        })??;
    let text = String::from_utf8_lossy(&out.stdout);
    let Some((_, body)) = text.split_once("\r\n\r\n") else {
        bail!("no answer from lb's admin listener on {ns}: {text}");
    };
    let stats: serde_json::Value = serde_json::from_str(body).context("bad /stats JSON")?;
    let backends = stats["backends"].as_array().cloned().unwrap_or_default();
    Ok(backends
        .iter()
        .filter_map(|b| b["tunnels_active"].as_u64())
        .sum())
}
