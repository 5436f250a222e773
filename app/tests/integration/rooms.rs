//! Rooms: a room's messages reach only its members, on every instance, with ids, history and
//! resume of its own; an instance subscribes to a room only while it has members there (and
//! for the linger after), a member joining a room new to its instance misses nothing published
//! after it joined, every room is subscribed again and caught up after Redis dropped the
//! subscription; bad names and rooms beyond `max_rooms` are refused at the handshake; the
//! default room is the channel it always was.

use serde_json::Value;

use crate::support::{App, Client, Redis, SilentRelay, assert_chat_shape, handshake_answer};
use testkit::wait::{DEADLINE, eventually};

/// Rooms without members are dropped quickly, so tests can watch it.
const SHORT_LINGER: &str = "room_linger = \"100ms\"\n";
/// Enough room for a burst of messages from one client.
const FAST_SENDER: &str = "messages_per_second = 100000\nmessages_burst = 100000\n\
                           client_queue = 2000\n";

/// The channels Redis knows subscribers of, sorted.
async fn subscribed_channels(redis: &Redis) -> Vec<String> {
    let mut channels: Vec<String> = redis.command(&["PUBSUB", "CHANNELS"]).await;
    channels.sort();
    channels
}

/// The content of the next text frame, which must be a chat message.
async fn content(client: &mut Client) -> String {
    assert_chat_shape(&client.text().await).content
}

#[tokio::test]
async fn two_rooms_across_two_instances_reach_only_their_members() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, "").await;
    let mut lobby = [
        Client::connect_with(one.addr, "room=lobby").await,
        Client::connect_with(two.addr, "room=lobby").await,
    ];
    let mut games = [
        Client::connect_with(one.addr, "room=games").await,
        Client::connect_with(two.addr, "room=games").await,
    ];
    let mut main = [one.connect().await, two.connect().await];

    lobby[0].say("ann", "in the lobby").await;
    let seen = [lobby[0].text().await, lobby[1].text().await];
    assert_eq!(seen[0], seen[1], "the same bytes on both instances");
    assert_eq!(assert_chat_shape(&seen[0]).content, "in the lobby");
    // Sent after the lobby's message: were it delivered outside the lobby, it would come first.
    games[1].say("bob", "in games").await;
    for client in &mut games {
        assert_eq!(content(client).await, "in games");
    }
    main[1].say("cy", "in the main room").await;
    for client in &mut main {
        assert_eq!(content(client).await, "in the main room");
    }
    lobby[1].say("dee", "lobby again").await;
    for client in &mut lobby {
        assert_eq!(content(client).await, "lobby again");
    }
    // Each room has a history of its own.
    for (key, expected) in [
        ("{simple-chat:lobby}:history", 2),
        ("{simple-chat:games}:history", 1),
        ("{simple-chat}:history", 1),
    ] {
        let length: i64 = redis.command(&["XLEN", key]).await;
        assert_eq!(length, expected, "{key}");
    }
}

#[tokio::test]
async fn an_instance_subscribes_to_a_room_only_while_it_has_members() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, SHORT_LINGER).await;
    app.wait_health(200).await;
    assert_eq!(subscribed_channels(&redis).await, ["simple-chat"]);

    // A member is served once its room is subscribed.
    let first = Client::connect_with(app.addr, "room=lobby").await;
    assert_eq!(
        subscribed_channels(&redis).await,
        ["simple-chat", "simple-chat:lobby"]
    );
    let mut second = Client::connect_with(app.addr, "room=lobby").await;
    first.close().await;
    second.say("ann", "still here").await;
    assert_eq!(content(&mut second).await, "still here");
    second.close().await;
    eventually("the lobby to be unsubscribed", DEADLINE, || async {
        anyhow::Ok(subscribed_channels(&redis).await == ["simple-chat"])
    })
    .await
    .unwrap();

    // Coming back subscribes again, and messages flow.
    let mut back = Client::connect_with(app.addr, "room=lobby").await;
    assert_eq!(
        subscribed_channels(&redis).await,
        ["simple-chat", "simple-chat:lobby"]
    );
    back.say("ann", "back").await;
    assert_eq!(content(&mut back).await, "back");
}

/// Sends `content` in `client`'s room and waits for its delivery back.
async fn say_and_see(client: &mut Client, content: &str) {
    client.say("bob", content).await;
    let message: Value = client.json().await;
    assert_eq!(message["content"], content, "{message}");
}

fn position(frame: &Value) -> String {
    format!(
        "epoch={}&last={}",
        frame["epoch"].as_str().unwrap(),
        frame["id"].as_str().unwrap()
    )
}

/// One scenario for both histories: `reader` and `writer` are two instances (the same one
/// without Redis).
async fn a_client_resumes_within_its_room(reader: &App, writer: &App) {
    let (mut alice, _) = Client::resume(reader.addr, "room=lobby&resume").await;
    let (mut bob, _) = Client::resume(writer.addr, "room=lobby&resume").await;
    let mut main = writer.connect().await;
    say_and_see(&mut bob, "one").await;
    let seen = alice.json().await;
    assert_eq!(seen["content"], "one");
    alice.close().await;

    say_and_see(&mut bob, "two").await;
    say_and_see(&mut main, "in the main room").await;
    say_and_see(&mut bob, "three").await;
    let (mut alice, notice) =
        Client::resume(reader.addr, &format!("room=lobby&{}", position(&seen))).await;
    assert_eq!(notice["recovered"], true, "{notice}");
    assert_eq!(notice["missed"], 2, "{notice}");
    assert_eq!(content(&mut alice).await, "two");
    assert_eq!(content(&mut alice).await, "three");
    say_and_see(&mut bob, "four").await;
    assert_eq!(content(&mut alice).await, "four");

    // A position in the lobby means nothing in the main room: another history, another epoch.
    let (_, notice) = Client::resume(reader.addr, &position(&seen)).await;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_ne!(notice["epoch"], seen["epoch"]);
}

#[tokio::test]
async fn across_two_instances_a_client_resumes_within_its_room() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, "").await;
    a_client_resumes_within_its_room(&one, &two).await;
}

#[tokio::test]
async fn without_redis_a_client_resumes_within_its_room() {
    let app = App::start("").await;
    a_client_resumes_within_its_room(&app, &app).await;
}

#[tokio::test]
async fn a_client_joining_a_room_new_to_its_instance_misses_nothing_sent_after() {
    const BURST: usize = 300;
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, FAST_SENDER).await;

    // Right after the handshake, while instance one (no member of the room until this client)
    // is still subscribing: what is sent now reaches the client once it is served. Whether the
    // message lands before, during or after the subscription is up to timing; ten rooms try
    // it ten times.
    for i in 0..10 {
        let room = format!("room=quiet-{i}");
        let mut bob = Client::connect_with(two.addr, &room).await;
        let mut alice = Client::upgraded(one.addr, &room).await;
        bob.say("bob", "right after").await;
        assert_eq!(content(&mut alice).await, "right after", "{room}");
    }

    // While messages keep coming: alice joins "busy" on instance one while bob sends a burst
    // there from instance two. Everything after the position alice's notice gives her reaches
    // her, in order, once: exactly what the history holds after that position.
    let (mut bob, _) = Client::resume(two.addr, "room=busy&resume").await;
    let sender = tokio::spawn(async move {
        for i in 0..BURST {
            bob.say("bob", &format!("m{i}")).await;
        }
        bob
    });
    let (mut alice, start) = Client::resume(one.addr, "room=busy&resume").await;
    let last = format!("m{}", BURST - 1);
    let mut live = Vec::new();
    loop {
        let message = alice.json().await;
        live.push(message["id"].as_str().unwrap().to_owned());
        if message["content"] == last.as_str() {
            break;
        }
    }
    let _bob = sender.await.unwrap();
    let from = format!(
        "room=busy&epoch={}&last={}",
        start["epoch"].as_str().unwrap(),
        start["last"].as_str().unwrap()
    );
    let (mut check, notice) = Client::resume(one.addr, &from).await;
    assert_eq!(notice["recovered"], true, "{notice}");
    let mut history = Vec::new();
    for _ in 0..notice["missed"].as_u64().unwrap() {
        history.push(check.json().await["id"].as_str().unwrap().to_owned());
    }
    assert!(!history.is_empty(), "the burst came after alice's position");
    assert_eq!(live, history);
}

#[tokio::test]
async fn after_redis_dropped_the_subscription_every_room_is_subscribed_again_and_caught_up() {
    // Through the relay the app is not told when Redis drops its subscription (as just after a
    // Redis restart); a publish that reaches no subscriber makes it start over.
    let redis = Redis::start().await;
    let relay = SilentRelay::to(&redis).await;
    let app = App::start(&format!("redis_url = \"{}\"\n", relay.url)).await;
    app.wait_health(200).await;
    let (mut lobby, _) = Client::resume(app.addr, "room=lobby&resume").await;
    let mut main = app.connect().await;
    say_and_see(&mut lobby, "before").await;

    let killed: i64 = redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert_eq!(killed, 1, "the app's one subscription, for both rooms");
    assert!(subscribed_channels(&redis).await.is_empty());
    // Meanwhile a message lands in the lobby's history, as another instance's would.
    let body = r#"{"time":"2024/01/02 03:04:05","name":"other","content":"while away"}"#;
    let id: String = redis
        .command(&["XADD", "{simple-chat:lobby}:history", "*", "p", body])
        .await;
    // The main room's message reaches no subscriber: the app subscribes to both rooms again
    // and catches each up from its history.
    main.say("ann", "to nobody").await;
    assert_eq!(content(&mut main).await, "to nobody");
    let caught_up = lobby.json().await;
    assert_eq!(caught_up["content"], "while away", "{caught_up}");
    assert_eq!(caught_up["id"], id.as_str());
    assert_eq!(
        subscribed_channels(&redis).await,
        ["simple-chat", "simple-chat:lobby"]
    );
    say_and_see(&mut lobby, "after").await;
}

#[tokio::test]
async fn invalid_room_names_are_refused_with_400_and_the_rule() {
    let app = App::start("").await;
    let too_long = format!("room={}", "x".repeat(65));
    for query in [
        "room=a%20b",
        "room=a:b",
        "room=a/b",
        "room=%7Bx%7D",
        "room=caf%C3%A9",
        too_long.as_str(),
    ] {
        let (status, body) = handshake_answer(app.addr, query).await;
        assert_eq!(status, 400, "{query}");
        assert_eq!(
            body, "invalid room name: a room is 1 to 64 characters of A-Z, a-z, 0-9, _, - and .\n",
            "{query}"
        );
    }
    let longest = format!("room={}", "x".repeat(64));
    for query in ["room=A-z_0.9", longest.as_str(), "room="] {
        assert_eq!(handshake_answer(app.addr, query).await.0, 101, "{query}");
    }
}

#[tokio::test]
async fn rooms_beyond_max_rooms_are_refused_with_503_until_one_is_gone() {
    let app = App::start(&format!("max_rooms = 1\n{SHORT_LINGER}")).await;
    let first = Client::connect_with(app.addr, "room=one").await;
    let (status, body) = handshake_answer(app.addr, "room=two").await;
    assert_eq!(status, 503);
    assert_eq!(
        body,
        "too many rooms on this instance (max_rooms = 1); try again later\n"
    );
    // The room there is and the default room still take members.
    assert_eq!(handshake_answer(app.addr, "room=one").await.0, 101);
    assert_eq!(handshake_answer(app.addr, "").await.0, 101);
    first.close().await;
    eventually("room one to be gone", DEADLINE, || async {
        anyhow::Ok(handshake_answer(app.addr, "room=two").await.0 == 101)
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_default_room_is_the_channel_it_always_was() {
    let redis = Redis::start().await;
    let app = App::with_redis(&redis, "").await;
    app.wait_health(200).await;
    let mut plain = app.connect().await;
    let mut empty = Client::connect_with(app.addr, "room=").await;
    let mut lobby = Client::connect_with(app.addr, "room=lobby").await;
    let mut raw = redis.subscribe("simple-chat").await;

    // What the original app publishes reaches the default room's clients as it is.
    let python = r#"{"time": "2024/01/02 03:04:05", "name": "py", "content": "hi"}"#;
    assert!(redis.publish("simple-chat", python).await >= 2);
    assert_eq!(raw.next().await, python);
    assert_eq!(plain.text().await, python);
    assert_eq!(empty.text().await, python);
    // What a default-room client sends is on "simple-chat" and in its history, as before.
    empty.say("rust", "to the original").await;
    let published = raw.next().await;
    assert_eq!(assert_chat_shape(&published).content, "to the original");
    assert_eq!(plain.text().await, published);
    assert_eq!(empty.text().await, published);
    // None of it reached the lobby: the first thing its client sees is its own message, which
    // is not on "simple-chat".
    lobby.say("l", "in the lobby").await;
    assert_eq!(content(&mut lobby).await, "in the lobby");
    for (key, expected) in [
        ("{simple-chat}:history", 1),
        ("{simple-chat:lobby}:history", 1),
    ] {
        let length: i64 = redis.command(&["XLEN", key]).await;
        assert_eq!(length, expected, "{key}");
    }
}
