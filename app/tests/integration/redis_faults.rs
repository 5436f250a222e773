//! Redis going away: the instance reports 503, tells senders, resubscribes with backoff when
//! Redis is back, delivers again, and never exits. A subscription Redis dropped before the
//! instance noticed does not swallow messages either: the instance starts over and delivers
//! them from the history. A Redis that lost its data (a new epoch) lets every client go, and
//! each learns through its resume that its gap cannot be filled.

use crate::support::{
    App, Client, Ended, Redis, SilentRelay, assert_chat_shape, free_port, handshake_status,
};

const FAST_RECONNECT: &str = "redis_reconnect_min = \"50ms\"\nredis_reconnect_max = \"500ms\"";

#[tokio::test]
async fn redis_restart_turns_health_503_then_200_and_delivery_resumes() {
    let mut redis = Redis::start_persistent().await;
    let app = App::with_redis(&redis, FAST_RECONNECT).await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    client.say("ann", "before").await;
    assert_eq!(assert_chat_shape(&client.text().await).content, "before");

    redis.stop().await;
    app.wait_health(503).await;
    // A sender is told, not silently dropped.
    client.say("ann", "while down").await;
    assert!(client.error().await.contains("message not sent"));
    assert!(app.is_running());

    redis.restart().await;
    app.wait_health(200).await;
    // Once healthy, the very first message goes through (the publishing connection was
    // checked before /healthz turned 200), and the client was never let go: the history
    // survived the restart.
    client.say("ann", "after").await;
    let delivered = client.text().await;
    assert_eq!(assert_chat_shape(&delivered).content, "after");
    assert!(app.is_running());
}

#[tokio::test]
async fn a_redis_that_lost_its_data_lets_clients_go_and_their_resume_says_so() {
    let mut redis = Redis::start().await;
    let app = App::with_redis(&redis, FAST_RECONNECT).await;
    app.wait_health(200).await;
    let (mut client, _) = Client::resume(app.addr, "resume").await;
    client.say("ann", "before").await;
    let before = client.json().await;
    let (epoch, last) = (
        before["epoch"].as_str().unwrap(),
        before["id"].as_str().unwrap(),
    );

    // No persistence: the restarted Redis has no history, so a new epoch starts.
    redis.restart().await;
    assert_eq!(client.ended(0).await, Ended::Closed(1013));
    app.wait_health(200).await;
    let (_, notice) = Client::resume(app.addr, &format!("epoch={epoch}&last={last}")).await;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_ne!(notice["epoch"], epoch);
    assert!(
        notice["reason"].as_str().unwrap().contains("epoch"),
        "{notice}"
    );
}

#[tokio::test]
async fn an_instance_started_before_redis_becomes_healthy_when_redis_comes() {
    let port = free_port();
    let app = App::start(&format!(
        "redis_url = \"redis://127.0.0.1:{port}\"\n{FAST_RECONNECT}"
    ))
    .await;
    assert_eq!(app.get("/healthz").await.0, 503);
    // Until it knows where the channel stands, it takes no client: one could miss a message.
    assert_eq!(handshake_status(app.addr, None).await, 503);

    let mut redis = Redis::start_persistent_on(port).await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    client.say("ann", "now").await;
    let delivered = client.text().await;
    assert_eq!(assert_chat_shape(&delivered).content, "now");

    // Later outages do not close the door: the instance catches up for every client.
    redis.stop().await;
    app.wait_health(503).await;
    let mut during = app.connect().await;
    client.say("ann", "while down").await;
    assert!(client.error().await.contains("message not sent"));
    redis.restart().await;
    app.wait_health(200).await;
    client.say("ann", "back").await;
    for c in [&mut client, &mut during] {
        assert_eq!(assert_chat_shape(&c.text().await).content, "back");
    }
}

#[tokio::test]
async fn a_message_no_subscriber_received_still_reaches_the_clients() {
    // Through the relay the app is not told when Redis drops its subscription, so it still
    // counts as subscribed (as just after a Redis restart): only PUBLISH's count of receivers
    // (0) shows that the message reached nobody, not even this instance's own clients. The
    // message is in the history; the instance resubscribes at once and delivers it from there.
    let redis = Redis::start().await;
    let relay = SilentRelay::to(&redis).await;
    let app = App::start(&format!("redis_url = \"{}\"\n", relay.url)).await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    client.say("ann", "before").await;
    assert_eq!(assert_chat_shape(&client.text().await).content, "before");

    let killed: i64 = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 1, "the app's subscription");
    client.say("ann", "to nobody").await;
    let delivered = client.text().await;
    assert_eq!(assert_chat_shape(&delivered).content, "to nobody");
    client.say("ann", "then live").await;
    assert_eq!(assert_chat_shape(&client.text().await).content, "then live");
}
