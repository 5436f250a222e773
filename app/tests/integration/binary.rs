//! The real `app` binary: readiness line, SIGTERM, exit codes for bad configuration.

use crate::support::{Binary, Client, Ended, TempFile, http_get, run_binary};
use testkit::wait::{DEADLINE, eventually};

#[tokio::test]
async fn sigterm_drains_closes_clients_with_1001_and_exits_zero() {
    // A grace long enough to observe the draining state on a loaded machine.
    let config = TempFile::new("app.toml", "shutdown_grace = \"4s\"\n");
    let mut app = Binary::start(&["--config", config.as_str(), "--listen", "127.0.0.1:0"]).await;
    assert_eq!(http_get(app.addr, "/healthz").await.0, 200);
    let mut client = Client::connect(app.addr).await;
    client.say("ann", "before the end").await;
    assert!(client.text().await.contains("before the end"));

    app.terminate();
    eventually(
        "/healthz to answer 503 while draining",
        DEADLINE,
        || async { anyhow::Ok(http_get(app.addr, "/healthz").await.0 == 503) },
    )
    .await
    .unwrap();
    assert_eq!(client.ended(0).await, Ended::Closed(1001));
    assert_eq!(app.exit_code().await, Some(0));
}

#[tokio::test]
async fn an_unknown_key_exits_64_naming_the_file_and_the_key() {
    let config = TempFile::new("bad.toml", "listen = \"127.0.0.1:0\"\nmax_conections = 5\n");
    let (code, stderr) = run_binary(&["--config", config.as_str()], &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains(config.as_str()), "{stderr}");
    assert!(stderr.contains("max_conections"), "{stderr}");
}

#[tokio::test]
async fn a_bad_value_exits_64_naming_the_key() {
    let config = TempFile::new("bad.toml", "client_queue = 0\n");
    let (code, stderr) = run_binary(&["--config", config.as_str()], &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("client_queue"), "{stderr}");
}

#[tokio::test]
async fn a_missing_config_file_exits_64() {
    let (code, stderr) = run_binary(&["--config", "/nonexistent/app.toml"], &[]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("/nonexistent/app.toml"), "{stderr}");
}

#[tokio::test]
async fn a_bad_redis_url_in_the_environment_exits_64_naming_it() {
    let (code, stderr) = run_binary(&[], &[("REDIS_URL", "http://not-redis")]).await;
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("REDIS_URL"), "{stderr}");
}

#[tokio::test]
async fn a_port_in_use_exits_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = run_binary(&["--listen", &addr], &[]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains(&addr), "{stderr}");
}
