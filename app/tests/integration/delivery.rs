//! Delivery: across two instances on one Redis, compatibility with the original's Redis
//! payloads, and a single instance without Redis.

use crate::support::{App, Redis, assert_chat_shape, handshake_status};
use testkit::wait::{DEADLINE, eventually};

const CHANNEL: &str = "simple-chat";

#[tokio::test]
async fn a_message_reaches_every_client_of_both_instances_exactly_once() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, "").await;
    let mut clients = Vec::new();
    for app in [&one, &one, &two, &two] {
        clients.push(app.connect().await);
    }

    clients[0].say("ann", "hello from instance one").await;
    let mut seen = Vec::new();
    for client in &mut clients {
        seen.push(client.text().await);
    }
    // Byte for byte the same everywhere, the sender included, in the original's shape.
    assert!(seen.iter().all(|s| *s == seen[0]), "{seen:?}");
    let message = assert_chat_shape(&seen[0]);
    assert_eq!(message.name, "ann");
    assert_eq!(message.content, "hello from instance one");

    // Exactly once: the next thing every client sees is the next message, from instance two.
    clients[3].say("bob", "and back from two").await;
    for client in &mut clients {
        let next = assert_chat_shape(&client.text().await);
        assert_eq!(
            (next.name.as_str(), next.content.as_str()),
            ("bob", "and back from two")
        );
    }
}

#[tokio::test]
async fn redis_payloads_keep_the_original_shape_both_ways() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, "").await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    let mut raw = redis.subscribe(CHANNEL).await;

    // What an instance of the original publishes (Python's json.dumps spacing, an extra field
    // a newer instance might add) is delivered unchanged.
    let python =
        r#"{"time": "2024/01/02 03:04:05", "name": "py", "content": "caf\u00e9 <b>", "id": 7}"#;
    assert!(redis.publish(CHANNEL, python).await >= 2);
    assert_eq!(raw.next().await, python);
    assert_eq!(client.text().await, python);

    // What our client sends appears on the channel as {"time","name","content"}.
    client.say("rust", "to the original").await;
    let published = raw.next().await;
    let message = assert_chat_shape(&published);
    assert_eq!(
        (message.name.as_str(), message.content.as_str()),
        ("rust", "to the original")
    );
    assert_eq!(client.text().await, published);
}

#[tokio::test]
async fn channel_payloads_that_are_not_json_objects_are_not_shown() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, "").await;
    app.wait_health(200).await;
    let mut client = app.connect().await;
    redis.publish(CHANNEL, "not json").await;
    redis.publish(CHANNEL, "[1, 2]").await;
    let fine = r#"{"time":"t","name":"n","content":"c"}"#;
    redis.publish(CHANNEL, fine).await;
    assert_eq!(client.text().await, fine);
}

#[tokio::test]
async fn a_single_instance_without_redis_works_end_to_end() {
    let app = App::start("").await;
    let (status, page) = app.get("/").await;
    assert_eq!(status, 200);
    let page = String::from_utf8(page).unwrap();
    for id in ["name", "content", "send", "messages", "state"] {
        assert!(page.contains(&format!("id=\"{id}\"")), "page lacks #{id}");
    }
    // The fields hold no more than the server accepts.
    for (id, limit) in [
        ("name", app::config::DEFAULT_MAX_NAME_CHARS),
        ("content", app::config::DEFAULT_MAX_CONTENT_CHARS),
    ] {
        let field = format!("id=\"{id}\" maxlength=\"{limit}\"");
        assert!(page.contains(&field), "page lacks {field}");
    }
    assert!(
        !page.contains("innerHTML"),
        "the page must render text only"
    );
    let (status, icon) = app.get("/favicon.ico").await;
    assert_eq!(status, 200);
    assert_eq!(&icon[..4], &[0, 0, 1, 0], "an ICO file");
    assert_eq!(app.get("/healthz").await, (200, b"ok".to_vec()));

    let mut ann = app.connect().await;
    let mut bob = app.connect().await;
    ann.say("ann", "hi bob").await;
    let seen = ann.text().await;
    assert_eq!(bob.text().await, seen);
    let message = assert_chat_shape(&seen);
    assert_eq!(
        (message.name.as_str(), message.content.as_str()),
        ("ann", "hi bob")
    );
}

#[tokio::test]
async fn only_same_host_and_listed_origins_may_open_a_websocket() {
    let app = App::start("allowed_origins = [\"https://chat.example.com\"]").await;
    let own = format!("http://{}", app.addr);
    assert_eq!(handshake_status(app.addr, Some(&own)).await, 101);
    assert_eq!(
        handshake_status(app.addr, Some("https://chat.example.com")).await,
        101
    );
    assert_eq!(handshake_status(app.addr, None).await, 101);
    assert_eq!(
        handshake_status(app.addr, Some("https://evil.example")).await,
        403
    );
    assert_eq!(handshake_status(app.addr, Some("null")).await, 403);
    // Not ASCII: refused as such, never matched against the allowed origins.
    assert_eq!(
        handshake_status(app.addr, Some("https://chät.example.com")).await,
        403
    );
}

#[tokio::test]
async fn connections_over_the_limit_are_refused_with_503() {
    let app = App::start("max_connections = 2").await;
    let first = app.connect().await;
    let _second = app.connect().await;
    assert_eq!(handshake_status(app.addr, None).await, 503);
    // A slot comes back when a client leaves.
    first.close().await;
    eventually("a free connection slot", DEADLINE, || async {
        anyhow::Ok(handshake_status(app.addr, None).await == 101)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn rediss_with_a_password_and_a_private_ca_carries_messages() {
    let redis = Redis::start_tls().await;
    assert!(redis.url().starts_with("rediss://:"));
    let (one, two) = App::healthy_pair(&redis, "").await;
    let mut raw = redis.subscribe(CHANNEL).await;
    let mut sender = one.connect().await;
    let mut receiver = two.connect().await;
    sender.say("ann", "over TLS").await;
    let published = raw.next().await;
    assert_eq!(assert_chat_shape(&published).content, "over TLS");
    assert_eq!(sender.text().await, published);
    assert_eq!(receiver.text().await, published);
}
