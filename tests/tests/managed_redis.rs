//! The managed-Redis path (ElastiCache with in-transit encryption and an AUTH token), here with a
//! real `redis-server` serving TLS only (a CA from `lb certs generate`) and `requirepass`: two
//! apps connecting with `rediss://` and the password deliver across; an app given a wrong
//! password reports 503 on `/healthz`, refuses WebSockets with 503, and keeps running.

use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use testkit::http::http_get;
use testkit::process::Proc;
use testkit::redis::{self, Redis, RedisTls};
use testkit::wait::{DEADLINE, eventually};
use tests::client::ChatClient;
use tests::stack::{generate_certs, start_app};

const PASSWORD: &str = "correct-horse-battery-staple";

/// Status code of `GET /healthz` on an app.
async fn healthz(addr: SocketAddr) -> Result<u16> {
    Ok(http_get(addr, "/healthz").await?.status)
}

async fn app_with_ca(dir: &Path, name: &str, url: &str) -> Result<Proc> {
    let config = dir.join(format!("{name}.toml"));
    let ca = dir.join("certs/ca.crt");
    std::fs::write(
        &config,
        format!("redis_ca_file = {:?}\n", ca.display().to_string()),
    )?;
    start_app(name, &config, url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_share_messages_through_redis_with_tls_and_auth() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    generate_certs(&certs, &["localhost", "127.0.0.1"]).await?;
    let tls = RedisTls {
        cert: certs.join("server.crt"),
        key: certs.join("server.key"),
        ca: certs.join("ca.crt"),
    };
    let redis = Redis::start_with(redis::Options {
        tls: Some(tls),
        password: Some(PASSWORD.to_owned()),
        ..redis::Options::default()
    })
    .await?;
    let url = redis.url();
    assert!(url.starts_with("rediss://:"), "{url}");

    let app1 = app_with_ca(dir.path(), "app1", &url).await?;
    let app2 = app_with_ca(dir.path(), "app2", &url).await?;
    for app in [&app1, &app2] {
        let addr = app.addr("http");
        eventually(
            "healthz 200",
            std::time::Duration::from_secs(10),
            || async move { Ok(healthz(addr).await? == 200) },
        )
        .await?;
    }
    let mut one = ChatClient::connect(&format!("ws://{}/ws", app1.addr("http")), None).await?;
    let mut two = ChatClient::connect(&format!("ws://{}/ws", app2.addr("http")), None).await?;
    one.send("alice", "over TLS").await?;
    for client in [&mut one, &mut two] {
        let msg = client.recv().await?;
        assert_eq!(msg["content"], "over TLS");
        assert_eq!(msg["name"], "alice");
    }

    // A wrong password: a clear error, 503, no crash loop.
    let wrong = url.replace(PASSWORD, "wrong-password");
    let mut bad = app_with_ca(dir.path(), "bad", &wrong).await?;
    let addr = bad.addr("http");
    // Redis refused the password (not merely: the app is still connecting).
    let refused = bad.log().wait_for("AuthenticationFailed", DEADLINE).await?;
    println!("the app logged: {refused}");
    assert_eq!(healthz(addr).await?, 503);
    // It never subscribed, so it takes no client (one could miss messages): 503, clearly.
    let refused = ChatClient::connect(&format!("ws://{addr}/ws"), None).await;
    let error = format!("{:#}", refused.err().context("a client was accepted")?);
    assert!(error.contains("503"), "{error}");
    assert!(bad.is_running(), "the app exited on a wrong Redis password");
    assert_eq!(healthz(addr).await?, 503);
    Ok(())
}
