//! Bad input (SPEC §3): each gets its answer, only the sender hears about it, the connection
//! stays usable where the spec says so, and nothing reaches the Redis channel. An empty frame
//! is a heartbeat: no answer, nothing published.

use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::support::{App, Ended, Redis, assert_chat_shape};

const LIMITS: &str = "max_frame_bytes = 1024\nmax_name_chars = 8\nmax_content_chars = 32\n\
                      messages_per_second = 1000\nmessages_burst = 1000";

#[tokio::test]
async fn every_bad_input_gets_its_answer_and_nothing_is_published() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, LIMITS).await;
    app.wait_health(200).await;
    let mut raw = redis.subscribe("simple-chat").await;
    let mut sender = app.connect().await;
    let mut bystander = app.connect().await;

    let cases: &[(&str, &str)] = &[
        ("hello", "not valid JSON"),
        ("{\"name\": \"a\", \"content\": ", "not valid JSON"),
        ("[\"a\", \"b\"]", "must be a JSON object"),
        ("42", "must be a JSON object"),
        ("{\"content\": \"x\"}", "\"name\" is missing"),
        ("{\"name\": \"a\"}", "\"content\" is missing"),
        (
            "{\"name\": 1, \"content\": \"x\"}",
            "\"name\" must be a string",
        ),
        (
            "{\"name\": \"a\", \"content\": [\"x\"]}",
            "\"content\" must be a string",
        ),
        (
            "{\"name\": \"123456789\", \"content\": \"x\"}",
            "\"name\" is 9 characters long",
        ),
        (
            "{\"name\": \"a\", \"content\": \"123456789012345678901234567890123\"}",
            "\"content\" is 33 characters long",
        ),
    ];
    for (input, reason) in cases {
        sender.send_text(input).await;
        let error = sender.error().await;
        assert!(error.contains(reason), "{input:?} answered {error:?}");
    }
    sender
        .send(Message::binary(
            b"{\"name\":\"a\",\"content\":\"b\"}".to_vec(),
        ))
        .await;
    assert!(sender.error().await.contains("binary frames"));

    // Still usable: a good message goes through, and it is the first thing on the channel and
    // the first thing the bystander sees.
    sender.say("ann", "still here").await;
    let published = raw.next().await;
    let message = assert_chat_shape(&published);
    assert_eq!(message.content, "still here");
    assert_eq!(sender.text().await, published);
    assert_eq!(bystander.text().await, published);
}

#[tokio::test]
async fn an_oversized_frame_closes_with_1009_and_invalid_utf8_with_1007() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, LIMITS).await;
    app.wait_health(200).await;
    let mut raw = redis.subscribe("simple-chat").await;
    let mut bystander = app.connect().await;

    let mut big = app.connect().await;
    let content = "x".repeat(1100);
    big.say("ann", &content).await;
    assert_eq!(big.ended(0).await, Ended::Closed(1009));

    let mut garbled = app.connect().await;
    let bytes = b"{\"name\":\"a\",\"content\":\"\xff\xfe\"}".to_vec();
    garbled
        .send(Message::Frame(Frame::message(
            bytes,
            OpCode::Data(Data::Text),
            true,
        )))
        .await;
    assert_eq!(garbled.ended(0).await, Ended::Closed(1007));

    // Neither reached the channel nor the other client: the next message on both is this one.
    let mut marker = app.connect().await;
    marker.say("bob", "marker").await;
    let published = raw.next().await;
    assert_eq!(assert_chat_shape(&published).content, "marker");
    assert_eq!(bystander.text().await, published);
}

#[tokio::test]
async fn a_flood_is_answered_with_an_error_and_the_connection_stays() {
    let app = App::start("messages_per_second = 1\nmessages_burst = 3").await;
    let mut client = app.connect().await;
    // In one write, so that the app takes all four within the same second (the limit
    // refills one message a second).
    client
        .say_at_once(&[
            ("ann", "message 0"),
            ("ann", "message 1"),
            ("ann", "message 2"),
            ("ann", "one too many"),
        ])
        .await;
    // The error reply and the three delivered messages may interleave.
    let mut delivered = Vec::new();
    let mut errors = Vec::new();
    for _ in 0..4 {
        let text = client.text().await;
        if text.starts_with("{\"error\"") {
            errors.push(text);
        } else {
            delivered.push(assert_chat_shape(&text).content);
        }
    }
    assert_eq!(delivered, ["message 0", "message 1", "message 2"]);
    assert_eq!(errors.len(), 1);
    assert!(errors[0].contains("too many messages"), "{errors:?}");
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn an_empty_frame_is_a_heartbeat_answered_with_nothing_and_published_nowhere() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, LIMITS).await;
    app.wait_health(200).await;
    let mut raw = redis.subscribe("simple-chat").await;
    let mut sender = app.connect().await;
    for _ in 0..3 {
        sender.send_text("").await;
    }
    // The next frame the sender gets is its own message: no answer came for the heartbeats,
    // and the channel carries only the message.
    sender.say("ann", "after the heartbeats").await;
    assert_eq!(
        assert_chat_shape(&sender.text().await).content,
        "after the heartbeats"
    );
    let published: serde_json::Value = serde_json::from_str(&raw.next().await).unwrap();
    assert_eq!(published["content"], "after the heartbeats");
}
