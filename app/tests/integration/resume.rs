//! Zero loss across reconnects: a client that resumes with its epoch and last id gets exactly
//! what it missed, then live messages, with no duplicates; a gap the history cannot fill is
//! announced (`recovered: false`); a retried send with the same `cid` is published once and
//! acknowledged with the id it got. Against both the in-process history and Redis.

use serde_json::Value;

use crate::support::{App, Client, Redis};

/// Reads `n` chat messages; returns their contents.
async fn contents(client: &mut Client, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        let message = client.json().await;
        assert!(message["id"].is_string(), "{message}");
        out.push(message["content"].as_str().unwrap().to_owned());
    }
    out
}

/// Sends `content` with `cid` and returns the ack, once the message's own delivery (which
/// may come before or after the ack) has arrived too.
async fn send_acked(client: &mut Client, content: &str, cid: &str) -> Value {
    client.say_with_cid("bob", content, cid).await;
    let (mut ack, mut delivered) = (None, None);
    while ack.is_none() || delivered.is_none() {
        let frame = client.json().await;
        if frame.get("ack").is_some() {
            assert_eq!(frame["ack"], cid);
            ack = Some(frame);
        } else {
            assert_eq!(frame["content"], content, "{frame}");
            delivered = Some(frame);
        }
    }
    let (ack, delivered) = (ack.unwrap(), delivered.unwrap());
    assert_eq!(ack["id"], delivered["id"], "the ack names the message's id");
    ack
}

fn position(frame: &Value) -> String {
    format!(
        "epoch={}&last={}",
        frame["epoch"].as_str().unwrap(),
        frame["id"].as_str().or(frame["last"].as_str()).unwrap()
    )
}

/// One scenario for both histories: `reader` and `writer` are two instances (the same one
/// without Redis).
async fn a_resuming_client_gets_exactly_what_it_missed(reader: &App, writer: &App) {
    let (mut alice, fresh) = Client::resume(reader.addr, "resume").await;
    assert_eq!(fresh["recovered"], true, "{fresh}");
    assert_eq!(fresh["missed"], 0);
    let (mut bob, _) = Client::resume(writer.addr, "resume").await;
    send_acked(&mut bob, "one", "c1").await;
    let seen = alice.json().await;
    assert_eq!(seen["content"], "one");
    alice.close().await;

    send_acked(&mut bob, "two", "c2").await;
    send_acked(&mut bob, "three", "c3").await;
    let (mut alice, notice) = Client::resume(reader.addr, &position(&seen)).await;
    assert_eq!(notice["recovered"], true, "{notice}");
    assert_eq!(notice["missed"], 2, "{notice}");
    assert_eq!(contents(&mut alice, 2).await, ["two", "three"]);
    // Then live, nothing twice.
    send_acked(&mut bob, "four", "c4").await;
    assert_eq!(contents(&mut alice, 1).await, ["four"]);

    // A resume from the fresh position gets everything since.
    let (mut late, notice) = Client::resume(reader.addr, &position(&fresh)).await;
    assert_eq!(notice["missed"], 4, "{notice}");
    assert_eq!(
        contents(&mut late, 4).await,
        ["one", "two", "three", "four"]
    );
}

#[tokio::test]
async fn without_redis_a_resuming_client_gets_exactly_what_it_missed() {
    let app = App::start("").await;
    a_resuming_client_gets_exactly_what_it_missed(&app, &app).await;
}

#[tokio::test]
async fn across_two_instances_a_resuming_client_gets_exactly_what_it_missed() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, "").await;
    a_resuming_client_gets_exactly_what_it_missed(&one, &two).await;
}

#[tokio::test]
async fn a_retried_send_is_published_once_and_acked_with_the_first_id() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, "").await;
    app.wait_health(200).await;
    let (mut watcher, _) = Client::resume(app.addr, "resume").await;
    let (mut sender, _) = Client::resume(app.addr, "resume").await;
    let first = send_acked(&mut sender, "once", "retry-me").await;
    // The retry: acked with the same id, and nothing new is delivered.
    sender.say_with_cid("bob", "once", "retry-me").await;
    let again = sender.json().await;
    assert_eq!(
        (&again["ack"], &again["id"]),
        (&first["ack"], &first["id"]),
        "{again}"
    );
    send_acked(&mut sender, "next", "other").await;
    let seen = contents(&mut watcher, 2).await;
    assert_eq!(seen, ["once", "next"]);
    let length: i64 = redis.command(&["XLEN", "{simple-chat}:history"]).await;
    assert_eq!(length, 2);
}

#[tokio::test]
async fn gaps_the_history_cannot_fill_are_announced() {
    let app = App::start("history_messages = 2").await;
    let (mut sender, fresh) = Client::resume(app.addr, "resume").await;
    for (i, content) in ["a", "b", "c"].into_iter().enumerate() {
        send_acked(&mut sender, content, &format!("c{i}")).await;
    }
    // Three were sent, two are kept: from the fresh position, "a" is gone.
    let (_, notice) = Client::resume(app.addr, &position(&fresh)).await;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert!(
        notice["reason"].as_str().unwrap().contains("older"),
        "{notice}"
    );
    assert_eq!(notice["missed"], 0);

    for (query, why) in [
        ("epoch=not-this-one&last=0-0", "epoch"),
        ("epoch=x&last=yesterday", "message id"),
        ("last=1-0", "both"),
    ] {
        let (_, notice) = Client::resume(app.addr, query).await;
        assert_eq!(notice["recovered"], false, "{query}: {notice}");
        assert!(
            notice["reason"].as_str().unwrap().contains(why),
            "{query}: {notice}"
        );
        // The notice still gives a position to go on from.
        assert_eq!(notice["epoch"], fresh["epoch"]);
    }
}

#[tokio::test]
async fn a_refused_message_with_a_cid_names_it_and_plain_clients_get_no_acks() {
    let app = App::start("max_content_chars = 3").await;
    let (mut client, _) = Client::resume(app.addr, "resume").await;
    client.say_with_cid("ann", "too long", "c9").await;
    let error = client.json().await;
    assert_eq!(error["cid"], "c9", "{error}");
    assert!(
        error["error"].as_str().unwrap().contains("limit"),
        "{error}"
    );

    // The original protocol: no notice, no ack, only the message itself.
    let mut plain = app.connect().await;
    plain.say("ann", "ok").await;
    let message = plain.json().await;
    assert_eq!(message["content"], "ok");
    assert!(message.get("ack").is_none());
}
