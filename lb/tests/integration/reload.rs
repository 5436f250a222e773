//! Reloading a running lb: changed backends take new connections while open tunnels keep
//! echoing, backends that remain keep their state, certificates are swapped for new handshakes
//! only, and an invalid configuration leaves the running one serving. The last test does it all
//! with a real SIGHUP to the real binary.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use crate::support::*;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn changed_backends_take_new_connections_while_open_tunnels_keep_echoing() {
    let pki = Pki::local();
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&old])).await;
    let addr = lb.addrs().https;

    let mut tunnel = ws_connect(&pki, addr, "/ws").await;
    ws_echo(&mut tunnel, Message::text("before")).await;
    let mut keep_alive = HttpsConn::open(&pki, addr).await;
    assert_eq!(keep_alive.get("/").await.backend(), Some("old"));

    lb.reload(TestConfig::new(&pki, &[&new]).config())
        .expect("reload");

    ws_echo(&mut tunnel, Message::text("after the reload")).await;
    assert_eq!(old.ws_open(), 1);
    assert_eq!(https_get(&pki, addr, "/").await.backend(), Some("new"));
    assert_eq!(keep_alive.get("/").await.backend(), Some("new"));
    let mut fresh = ws_connect(&pki, addr, "/ws").await;
    ws_echo(&mut fresh, Message::text("new tunnel")).await;
    assert_eq!(new.ws_total(), 1);
    assert_eq!(old.ws_total(), 1);
    assert_eq!(lb.metrics().reloads_ok.load(Relaxed), 1);
    drop((tunnel, fresh));
    lb.shutdown().await;
}

#[tokio::test]
async fn backends_that_remain_keep_their_state_and_counters() {
    let pki = Pki::local();
    let a = TestBackend::start("a").await;
    let b = TestBackend::start("b").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&a])).await;
    assert_eq!(https_get(&pki, lb.addrs().https, "/").await.status, 200);
    let before = Arc::clone(&lb.pool().backends()[0]);
    lb.reload(TestConfig::new(&pki, &[&a, &b]).config())
        .expect("reload");
    let pool = lb.pool();
    assert_eq!(pool.backends().len(), 2);
    assert!(Arc::ptr_eq(&before, &pool.backends()[0]));
    assert_eq!(pool.backends()[0].stats().requests.load(Relaxed), 1);

    // Draining `a` with weight 0 keeps it (state, counters) and sends everything to `b`.
    let config = TestConfig::new(&pki, &[&a, &b]);
    let toml = config.toml().replace(
        &format!("addr = \"{}\"\n", a.addr()),
        &format!("addr = \"{}\"\nweight = 0\n", a.addr()),
    );
    let drained = lb::Config::parse(&toml, "test.toml", &config.base, &lb::Overrides::default())
        .expect("valid config");
    lb.reload(drained).expect("reload");
    let pool = lb.pool();
    assert!(Arc::ptr_eq(&before, &pool.backends()[0]));
    assert_eq!(pool.backends()[0].weight(), 0);
    for _ in 0..4 {
        let res = https_get(&pki, lb.addrs().https, "/").await;
        assert_eq!(res.backend(), Some("b"));
    }
    assert_eq!(pool.backends()[0].stats().requests.load(Relaxed), 1);
    lb.shutdown().await;
}

#[tokio::test]
async fn an_invalid_configuration_is_rejected_and_the_old_one_keeps_serving() {
    let pki = Pki::local();
    let old = TestBackend::start("old").await;
    let other = TestBackend::start("other").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&old])).await;
    let addr = lb.addrs().https;

    let bad_toml = lb.reload_with(|| {
        lb::Config::parse(
            "[listen]\nhttps = \"nonsense\"\n",
            "bad.toml",
            pki.dir.path(),
            &lb::Overrides::default(),
        )
    });
    let e = bad_toml.unwrap_err().to_string();
    assert!(e.contains("bad.toml: listen.https"), "{e}");

    let mut missing_cert = TestConfig::new(&pki, &[&other]);
    missing_cert.certificates = "[[certificates]]\npem = \"/nonexistent/site.pem\"\n".into();
    let e = lb.reload(missing_cert.config()).unwrap_err().to_string();
    assert!(e.contains("certificates[0].pem"), "{e}");

    assert_eq!(https_get(&pki, addr, "/").await.backend(), Some("old"));
    assert!(other.requests().is_empty());
    let metrics = lb.metrics();
    assert_eq!(metrics.reloads_failed.load(Relaxed), 2);
    assert_eq!(metrics.reloads_ok.load(Relaxed), 0);
    lb.shutdown().await;
}

#[tokio::test]
async fn certificates_are_swapped_for_new_handshakes_only() {
    let old_pki = Pki::local();
    let new_pki = Pki::local();
    let backend = TestBackend::start("app1").await;
    let lb = start_lb(&TestConfig::new(&old_pki, &[&backend])).await;
    let addr = lb.addrs().https;
    let mut established = HttpsConn::open(&old_pki, addr).await;

    lb.reload(TestConfig::new(&new_pki, &[&backend]).config())
        .expect("reload");

    assert!(
        tls_connect_with(old_pki.client_config(), addr, "localhost")
            .await
            .is_err(),
        "the old certificate is still presented"
    );
    assert_eq!(https_get(&new_pki, addr, "/").await.status, 200);
    assert_eq!(established.get("/").await.status, 200);
    lb.shutdown().await;
}

#[tokio::test]
async fn sighup_reloads_the_real_binary_and_a_bad_file_is_rejected() {
    let pki = Pki::local();
    let old = TestBackend::start("old").await;
    let new = TestBackend::start("new").await;
    let path = pki.dir.path().join("lb.toml");
    TestConfig::new(&pki, &[&old]).write(&path);
    let mut lb = LbProcess::start(&["run", "--config", path.to_str().unwrap()], 1).await;
    let addr = lb.addr("https");
    let mut tunnel = ws_connect(&pki, addr, "/ws").await;
    ws_echo(&mut tunnel, Message::text("before")).await;
    assert_eq!(https_get(&pki, addr, "/").await.backend(), Some("old"));

    TestConfig::new(&pki, &[&new]).write(&path);
    lb.signal("HUP");
    lb.log
        .wait_for("configuration reloaded", DEADLINE)
        .await
        .unwrap();
    assert_eq!(https_get(&pki, addr, "/").await.backend(), Some("new"));
    ws_echo(&mut tunnel, Message::text("still open")).await;

    let mut bad = TestConfig::new(&pki, &[&old]).toml();
    bad.push_str("[balance]\npolicy = \"random\"\n");
    std::fs::write(&path, bad).unwrap();
    lb.signal("HUP");
    lb.log.wait_for("reload rejected", DEADLINE).await.unwrap();
    assert_eq!(https_get(&pki, addr, "/").await.backend(), Some("new"));
    ws_echo(&mut tunnel, Message::text("still open after a bad reload")).await;

    drop(tunnel);
    lb.signal("TERM");
    let status = within("lb exits after SIGTERM", lb.child.wait())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn changed_listen_addresses_wait_for_a_restart_and_are_not_reported_as_bound() {
    let pki = Pki::local();
    let a = TestBackend::start("a").await;
    let lb = start_lb(&TestConfig::new(&pki, &[&a])).await;
    let before = lb.config().listen;
    let mut moved = TestConfig::new(&pki, &[&a]).config();
    moved.listen.https = "127.0.0.1:1".parse().unwrap();
    lb.reload(moved).expect("reload");
    assert_eq!(lb.config().listen, before);
    assert_eq!(
        https_get(&pki, lb.addrs().https, "/").await.status,
        200,
        "still served where it was bound"
    );
    lb.shutdown().await;
}
