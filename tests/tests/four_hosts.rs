//! The original on-prem layout, built as four network-namespace hosts on one machine (root
//! only): `lb` on port 443 of its host, `app` on port 80 of two app hosts, `redis-server` on 6379
//! of its own, plus a client host. The client reaches the chat through the lb host's address and
//! a message crosses both app hosts. The namespaces share one private /24 that only this test
//! creates, have no default route, and are removed at the end.

use std::net::SocketAddr;

use anyhow::{Context, Result, bail};
use testkit::process::{Proc, Ready, system_bin, workspace_bin};
use tests::netns::Lab;
use tests::stack::{generate_certs, lb_config};

const SUBNET: &str = "10.213.47.0/24";
const LB: &str = "10.213.47.10";
const APP1: &str = "10.213.47.11";
const APP2: &str = "10.213.47.12";
const REDIS: &str = "10.213.47.13";
const CLIENT: &str = "10.213.47.20";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces): tests/run runs it when root"]
async fn four_hosts_lb_two_apps_redis() -> Result<()> {
    let mut lab = Lab::new("so4h", SUBNET)?;
    let lb_host = lab.add_host("lb", LB)?;
    let app1_host = lab.add_host("app1", APP1)?;
    let app2_host = lab.add_host("app2", APP2)?;
    let redis_host = lab.add_host("redis", REDIS)?;
    let client_host = lab.add_host("client", CLIENT)?;
    let routes = lab.exec(&client_host, &["ip", "route"])?;
    assert!(
        !routes.contains("default"),
        "a test host has a default route: {routes}"
    );

    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    generate_certs(&certs, &["lb.example.internal", LB]).await?;

    let redis_bin = system_bin("redis-server", "redis-server")?;
    let mut cmd = Lab::command(&redis_host, &redis_bin);
    cmd.args(["--bind", REDIS, "--port", "6379", "--protected-mode", "no"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path());
    let _redis = Proc::spawn("redis", cmd, Ready::Line("Ready to accept connections")).await?;

    let redis_url = format!("redis://{REDIS}:6379");
    let mut apps = Vec::new();
    for (host, addr) in [(&app1_host, APP1), (&app2_host, APP2)] {
        let mut cmd = Lab::command(host, &workspace_bin("app")?);
        cmd.args(["--listen", &format!("{addr}:80"), "--redis", &redis_url]);
        let app = Proc::spawn(host, cmd, Ready::Listening(&["http"])).await?;
        println!("{host}: app listening on {}", app.addr("http"));
        apps.push(app);
    }

    let backends: Vec<(String, SocketAddr)> = [("app1", APP1), ("app2", APP2)]
        .iter()
        .map(|(name, ip)| Ok((name.to_string(), format!("{ip}:80").parse()?)))
        .collect::<Result<_>>()?;
    let lb_toml = dir.path().join("lb.toml");
    std::fs::write(
        &lb_toml,
        lb_config(&format!("{LB}:443"), &certs.join("server.pem"), &backends),
    )?;
    let mut cmd = Lab::command(&lb_host, &workspace_bin("lb")?);
    cmd.arg("run").arg("--config").arg(&lb_toml);
    let lb = Proc::spawn("lb", cmd, Ready::Listening(&["https"])).await?;
    println!("{lb_host}: lb listening on {}", lb.addr("https"));

    // From the client host: one client through lb, one directly on each app host. A message
    // sent through lb reaches all three: it crossed Redis to both app hosts.
    let probe = workspace_bin("chat-probe")?;
    let out = Lab::command(&client_host, &probe)
        .arg(certs.join("ca.crt"))
        .arg(format!("wss://{LB}/ws"))
        .arg(format!("ws://{APP1}/ws"))
        .arg(format!("ws://{APP2}/ws"))
        .output()
        .await
        .context("cannot run chat-probe")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    print!("{client_host}: {stdout}");
    if !out.status.success() {
        bail!(
            "chat-probe failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for url in [
        format!("wss://{LB}/ws"),
        format!("ws://{APP1}/ws"),
        format!("ws://{APP2}/ws"),
    ] {
        assert!(
            stdout.contains(&format!("received {url} ")),
            "{url} got nothing"
        );
    }
    Ok(())
}
