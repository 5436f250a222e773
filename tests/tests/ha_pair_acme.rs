//! ACME on the keepalived pair (README, "The keepalived pair"), in network namespaces (root
//! only): two lb hosts running `lb` with `[acme]` and `[acme.peer]` and keepalived with the
//! shipped configuration, and a client host running Pebble (real http-01 validation, its DNS
//! answering the virtual address for every name) and the test's own connections.
//!
//! The virtual address settles on lb1, which orders the certificate for the address's name; the
//! CA validates through the virtual address, so on lb1. lb2, which does not hold the address,
//! orders nothing and adopts lb1's certificate over the peer channel (it serves it on its own
//! address too, and stores it). Then lb on lb1 is killed (SIGKILL): keepalived moves the address
//! to lb2, which finds itself the holder, serves the same valid Pebble certificate for the name
//! through the virtual address, and orders nothing: one order for the pair, none at failover.
//!
//! The namespaces share one private /24 that only this test creates, have no default route, and
//! are removed at the end, also when the test fails.

use std::fs::Permissions;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use testkit::process::system_bin;
use testkit::wait::eventually;
use tests::keepalived::{Keepalived, STOP_WITHIN, Site, keepalived_conf, start_lb, vip_moves};
use tests::netns::{Lab, run_in};
use tests::pebble::{Pebble, PebbleOptions, client_trusting, handshake};
use tests::stack::{generate_certs, lb_acme_orders, lb_metric};

const SUBNET: &str = "10.213.49.0/24";
const LB1: &str = "10.213.49.10";
const LB2: &str = "10.213.49.11";
const VIP: &str = "10.213.49.100";
const CLIENT: &str = "10.213.49.30";
/// The name the certificate is for: Pebble's DNS resolves it (and every name) to the VIP.
const NAME: &str = "chat.pair.test";
/// lb's admin listener on every address of each lb host: keepalived's health check asks on
/// loopback, the test from the client host.
const ADMIN_PORT: u16 = 9100;
/// Each host's peer listener, on its own address.
const PEER_PORT: u16 = 9443;
/// Pebble's ACME listener on the client host.
const PEBBLE_PORT: u16 = 14000;
/// How long an issuance may take (Pebble validates at once; lb retries after 2 s, 4 s, ...).
const ISSUED_WITHIN: Duration = Duration::from_secs(60);

const SITE: Site<'static> = Site {
    vip: VIP,
    lb1: LB1,
    lb2: LB2,
    admin: "127.0.0.1:9100",
    router_id: 52,
};

#[test]
#[ignore = "needs root (network namespaces): tests/run runs it when root"]
fn ha_pair_orders_once_and_the_backup_serves_the_certificate_after_failover() -> Result<()> {
    let mut lab = Lab::new("soac", SUBNET)?;
    let lb1 = lab.add_host("lb1", LB1)?;
    let lb2 = lab.add_host("lb2", LB2)?;
    let client = lab.add_host("client", CLIENT)?;
    let keepalived = system_bin("keepalived", "keepalived")?;
    run_in(&client, || pair(&lb1, &lb2, &client, &keepalived))
}

async fn pair(lb1: &str, lb2: &str, client: &str, keepalived: &Path) -> Result<()> {
    let dir = tempfile::tempdir()?;
    // keepalived runs the health check as `nobody`, who must reach the script inside.
    std::fs::set_permissions(dir.path(), Permissions::from_mode(0o755))?;
    generate_certs(&dir.path().join("fallback"), &[NAME, VIP]).await?;

    let pebble = Pebble::start(
        dir.path(),
        PebbleOptions {
            netns: Some(client.to_owned()),
            address: CLIENT.parse()?,
            names_at: VIP.parse()?,
            ..PebbleOptions::local(PEBBLE_PORT, 80, 443, None)
        },
    )
    .await?;

    let secret = dir.path().join("peer.secret");
    std::fs::write(
        &secret,
        "the secret the two lb hosts share, in a 0600 file\n",
    )?;
    std::fs::set_permissions(&secret, Permissions::from_mode(0o600))?;
    let config = |host: &str, own: &str, other: &str| -> Result<std::path::PathBuf> {
        let path = dir.path().join(format!("lb-{host}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"[listen]
https = "0.0.0.0:443"
redirect = "0.0.0.0:80"
admin = "0.0.0.0:{ADMIN_PORT}"

[[certificates]]
pem = "fallback/server.pem"

[[backends]]
addr = "{CLIENT}:8001"

[health]
enabled = false

[acme]
directory = "{directory}"
contact = ["mailto:ops@pair.test"]
domains = [["{NAME}"]]
challenge = "http-01"
storage = "acme-{host}"
ca_file = "{ca_file}"

[acme.peer]
listen = "{own}:{PEER_PORT}"
address = "{other}:{PEER_PORT}"
virtual_address = "{VIP}"
secret_file = "peer.secret"
"#,
                directory = pebble.directory,
                ca_file = pebble.ca_file.display(),
            ),
        )?;
        Ok(path)
    };
    let mut lb1_proc = start_lb(lb1, &config("lb1", LB1, LB2)?).await?;
    let _lb2_proc = start_lb(lb2, &config("lb2", LB2, LB1)?).await?;
    let admin1 = SocketAddr::new(LB1.parse()?, ADMIN_PORT);
    let admin2 = SocketAddr::new(LB2.parse()?, ADMIN_PORT);

    // keepalived on both, lb1 first: it has the higher priority and wins the first election.
    let conf = keepalived_conf(dir.path(), &SITE)?;
    let _ka1 = Keepalived::start(lb1, "lb1", keepalived, &conf, dir.path()).await?;
    let _ka2 = Keepalived::start(lb2, "lb2", keepalived, &conf, dir.path()).await?;
    vip_moves(VIP, lb1, lb2).await?;
    println!("{lb1}: holds {VIP}");

    // lb1, the holder, orders; the CA validates through the virtual address.
    eventually("lb1 to be issued a certificate", ISSUED_WITHIN, || async {
        Ok(lb_acme_orders(admin1, "ok").await? >= 1.0)
    })
    .await?;
    // lb2 adopts it over the peer channel (told at once by lb1).
    eventually("lb2 to adopt lb1's certificate", ISSUED_WITHIN, || async {
        Ok(lb_metric(admin2, "lb_acme_peer_adopted_total").await? >= 1.0)
    })
    .await?;
    let trusting_pebble = client_trusting(pebble.root().await?)?;
    let vip_443 = SocketAddr::new(VIP.parse()?, 443);
    let (issued, _) = handshake(vip_443, NAME, Arc::clone(&trusting_pebble)).await?;
    let (on_lb2, _) = handshake(
        SocketAddr::new(LB2.parse()?, 443),
        NAME,
        Arc::clone(&trusting_pebble),
    )
    .await?;
    assert_eq!(issued[0], on_lb2[0], "lb2 serves lb1's certificate");
    assert_eq!(lb_metric(admin1, "lb_acme_holder").await?, 1.0);
    assert_eq!(lb_metric(admin2, "lb_acme_holder").await?, 0.0);
    let stored = dir.path().join(format!("acme-lb2/{NAME}.pem"));
    let mode = std::fs::metadata(&stored)?.permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o600,
        "lb2 stores the adopted certificate like an issued one"
    );

    // The holder's lb dies: its health check fails and keepalived moves the address to lb2.
    lb1_proc.signal("KILL")?;
    vip_moves(VIP, lb2, lb1).await?;
    lb1_proc.wait_exit(STOP_WITHIN).await?;
    // lb_acme_holder is set once lb2's ACME task has acted as the holder (any order it
    // started has ended).
    eventually("lb2 to act as the holder", ISSUED_WITHIN, || async {
        Ok(lb_metric(admin2, "lb_acme_holder").await? == 1.0)
    })
    .await?;
    let (after, _) = handshake(vip_443, NAME, Arc::clone(&trusting_pebble)).await?;
    assert_eq!(
        after[0], issued[0],
        "after failover lb2 serves the certificate lb1 was issued, verified against Pebble's root"
    );
    assert_eq!(
        lb_acme_orders(admin2, "ok").await?,
        0.0,
        "lb2 ordered at failover"
    );
    assert_eq!(
        lb_acme_orders(admin2, "failed").await?,
        0.0,
        "lb2 ordered at failover"
    );
    println!(
        "one order for the pair (on {lb1}); {lb2} adopted it, and after failover serves it \
         through {VIP} with no order"
    );
    Ok(())
}
