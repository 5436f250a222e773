//! Graceful shutdown in-process: cancelling the token does what SIGTERM does in the binary.

use crate::support::{App, Ended, Redis, handshake_status};

#[tokio::test]
async fn shutdown_turns_health_503_refuses_new_sockets_then_closes_with_1001() {
    // A grace long enough to observe the draining state on a loaded machine, short enough for
    // a test (the client is closed at its end).
    let mut app = App::start("shutdown_grace = \"4s\"").await;
    let mut client = app.connect().await;
    assert_eq!(app.get("/healthz").await.0, 200);

    app.begin_shutdown();
    app.wait_health(503).await;
    assert_eq!(handshake_status(app.addr, None).await, 503);
    assert_eq!(client.ended(0).await, Ended::Closed(1001));
    app.finished().await.unwrap();
}

#[tokio::test]
async fn shutdown_with_redis_down_still_completes() {
    let mut redis = Redis::start().await;
    let mut app = App::with_redis(&redis, "shutdown_grace = \"0s\"").await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    redis.stop().await;
    app.wait_health(503).await;
    app.begin_shutdown();
    assert_eq!(client.ended(0).await, Ended::Closed(1001));
    app.finished().await.unwrap();
}
