//! The server API with real processes: keys (401 without one, rotation on SIGHUP), publishing
//! through the client's path to members on both instances, history paging, presence, every bad
//! input refused with nothing published, and the counters of `/metrics`.

use serde_json::{Value, json};
use testkit::wait::eventually;

use crate::support::{App, Binary, Client, DEADLINE, Redis, TempFile, api_call, http_get};

const KEY: &str = "test-key-0123456789";

#[tokio::test]
async fn every_call_needs_a_key_and_keys_rotate_on_sighup() {
    let keys = TempFile::new("api-keys", &format!("# the operators' keys\n{KEY}\n"));
    let config = TempFile::new(
        "app.toml",
        &format!(
            "listen = \"127.0.0.1:0\"\napi_listen = \"127.0.0.1:0\"\napi_keys_file = \"{}\"\n",
            keys.as_str()
        ),
    );
    let mut app = Binary::start(&["--config", config.as_str()]).await;
    let api = app.api_addr().await;
    for key in [None, Some("wrong"), Some("")] {
        let (status, body) = api_call(api, "GET", "/api/rooms", key, "").await;
        assert_eq!(status, 401, "{key:?}");
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(body["error"].as_str().unwrap().contains("key"), "{body}");
    }
    assert_eq!(
        api_call(api, "GET", "/api/rooms", Some(KEY), "").await.0,
        200
    );
    // A refused post publishes nothing (checked below through the history).
    let (status, _) = api_call(
        api,
        "POST",
        "/api/rooms/~/messages",
        Some("wrong"),
        r#"{"name":"x","content":"never"}"#,
    )
    .await;
    assert_eq!(status, 401);

    std::fs::write(&keys.path, "new-key-9876543210\n").unwrap();
    app.signal("HUP");
    eventually("the new key to be accepted", DEADLINE, || async {
        let (status, _) = api_call(api, "GET", "/api/rooms", Some("new-key-9876543210"), "").await;
        anyhow::Ok(status == 200)
    })
    .await
    .unwrap();
    assert_eq!(
        api_call(api, "GET", "/api/rooms", Some(KEY), "").await.0,
        401
    );
    let (status, body) = api_call(
        api,
        "GET",
        "/api/rooms/~/history",
        Some("new-key-9876543210"),
        "",
    )
    .await;
    assert_eq!(status, 200);
    let page: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(page["messages"], json!([]), "the refused post is not there");

    // The document and the counters need no key.
    let (status, body) = http_get(api, "/api/openapi.json").await;
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert!(doc["paths"]["/api/rooms/{room}/messages"]["post"].is_object());
    let (status, body) = http_get(api, "/metrics").await;
    assert_eq!(status, 200);
    let metrics = String::from_utf8(body).unwrap();
    let refused: u64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(r#"app_api_requests_total{endpoint="GET /api/rooms",status="401"} "#)
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no 401 counter in {metrics}"));
    // Three keyless or wrong keys, the new key until the reload, the old key after it.
    assert!(refused >= 4, "{metrics}");
    assert!(
        metrics.contains(r#"app_api_requests_total{endpoint="GET /api/rooms",status="200"}"#),
        "{metrics}"
    );
    // The API is not on the public listener.
    assert_eq!(http_get(app.addr, "/api/rooms").await.0, 404);
}

#[tokio::test]
async fn a_posted_message_reaches_members_on_both_instances_and_resume_finds_it() {
    let redis = Redis::start().await;
    let one = App::start_with_api(&redis.app_config(), KEY).await;
    let two = App::with_redis(&redis, "").await;
    one.wait_health(200).await;
    two.wait_health(200).await;
    let mut here = Client::connect_with(one.addr, "room=lobby").await;
    let mut there = Client::connect_with(two.addr, "room=lobby").await;

    let post =
        r#"{"name":"ops bot","content":"maintenance at noon","user":"ops","cid":"notice-1"}"#;
    let (status, posted) = one
        .api_call("POST", "/api/rooms/lobby/messages", Some(KEY), post)
        .await;
    assert_eq!(status, 201, "{posted}");
    assert_eq!(posted["duplicate"], false);
    for client in [&mut here, &mut there] {
        let message = client.json().await;
        assert_eq!(message["content"], "maintenance at noon");
        assert_eq!(message["user"], "ops");
        assert_eq!(message["id"], posted["id"]);
        assert_eq!(message["epoch"], posted["epoch"]);
    }
    // A retry is the same message; the same cid with other content is refused.
    let (status, again) = one
        .api_call("POST", "/api/rooms/lobby/messages", Some(KEY), post)
        .await;
    assert_eq!(
        (status, &again["id"], &again["duplicate"]),
        (200, &posted["id"], &json!(true))
    );
    let (status, refused) = one
        .api_call(
            "POST",
            "/api/rooms/lobby/messages",
            Some(KEY),
            r#"{"name":"ops bot","content":"something else","cid":"notice-1"}"#,
        )
        .await;
    assert_eq!(status, 409, "{refused}");
    // Resume knows the id, on the other instance.
    let query = format!(
        "room=lobby&epoch={}&last={}",
        posted["epoch"].as_str().unwrap(),
        posted["id"].as_str().unwrap()
    );
    let (_, notice) = Client::resume(two.addr, &query).await;
    assert_eq!(notice["recovered"], true, "{notice}");
    assert_eq!(notice["missed"], 0);
    // Nothing else was published: the next message is the next one everyone gets.
    here.say("ann", "next").await;
    for client in [&mut here, &mut there] {
        assert_eq!(client.json().await["content"], "next");
    }
}

#[tokio::test]
async fn history_pages_return_exactly_the_stored_messages() {
    let redis = Redis::start().await;
    let app = App::start_with_api(&redis.app_config(), KEY).await;
    app.wait_health(200).await;
    let mut ids = Vec::new();
    for n in 1..=25 {
        let body = json!({"name": "bot", "content": format!("m{n}")}).to_string();
        let (status, posted) = app
            .api_call("POST", "/api/rooms/paged/messages", Some(KEY), &body)
            .await;
        assert_eq!(status, 201, "{posted}");
        ids.push(posted["id"].as_str().unwrap().to_owned());
    }
    let page = |query: String| {
        let app = &app;
        async move {
            let (status, page) = app
                .api_call(
                    "GET",
                    &format!("/api/rooms/paged/history?{query}"),
                    Some(KEY),
                    "",
                )
                .await;
            assert_eq!(status, 200, "{page}");
            page["messages"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["content"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let contents = |range: std::ops::RangeInclusive<usize>| -> Vec<String> {
        range.map(|n| format!("m{n}")).collect()
    };
    assert_eq!(page("limit=10".into()).await, contents(16..=25));
    assert_eq!(
        page(format!("before={}&limit=10", ids[15])).await,
        contents(6..=15)
    );
    assert_eq!(
        page(format!("before={}&limit=10", ids[5])).await,
        contents(1..=5)
    );
    assert_eq!(
        page(format!("after={}&limit=3", ids[4])).await,
        contents(6..=8)
    );
    assert_eq!(
        page(format!("after={}&before={}", ids[9], ids[13])).await,
        contents(11..=13)
    );
    assert_eq!(
        page(format!("after={}", ids[24])).await,
        Vec::<String>::new()
    );
}

#[tokio::test]
async fn presence_endpoints_show_every_instance() {
    let redis = Redis::start().await;
    let extra = "presence_interval = \"100ms\"\npresence_ttl = \"1s\"\n";
    let one = App::start_with_api(&format!("{}{extra}", redis.app_config()), KEY).await;
    let two = App::with_redis(&redis, extra).await;
    one.wait_health(200).await;
    two.wait_health(200).await;
    let (mut ann, _) = Client::with_presence(one.addr, "room=seen").await;
    ann.say("ann", "a").await;
    let (mut bob, _) = Client::with_presence(two.addr, "room=seen").await;
    bob.say("bob", "b").await;
    ann.presence_until(|f| {
        f["joins"]
            .as_array()
            .is_some_and(|j| j.iter().any(|m| m["name"] == "bob"))
    })
    .await;
    let (status, presence) = one
        .api_call("GET", "/api/rooms/seen/presence", Some(KEY), "")
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        presence,
        json!({"room": "seen", "count": 2, "members": [
            {"name": "ann", "conns": 1}, {"name": "bob", "conns": 1}
        ]})
    );
    eventually("the room in the rooms list", DEADLINE, || async {
        let (_, rooms) = one.api_call("GET", "/api/rooms", Some(KEY), "").await;
        anyhow::Ok(
            rooms["rooms"]
                .as_array()
                .is_some_and(|rooms| rooms.iter().any(|r| r["room"] == "seen" && r["count"] == 2)),
        )
    })
    .await
    .unwrap();
    // Anonymous members are no user.
    let (status, user) = one.api_call("GET", "/api/users/ann", Some(KEY), "").await;
    assert_eq!(status, 200);
    assert_eq!(
        user,
        json!({"user": "ann", "online": false, "conns": 0, "rooms": []})
    );
}

#[tokio::test]
async fn bad_input_gets_a_clear_4xx_and_nothing_is_published() {
    let redis = Redis::start().await;
    let app = App::start_with_api(
        &format!("{}max_frame_bytes = 1024\n", redis.app_config()),
        KEY,
    )
    .await;
    app.wait_health(200).await;
    let mut member = Client::connect_with(app.addr, "room=guarded").await;
    let long_name = "n".repeat(100);
    let oversized = json!({"name": "x", "content": "y".repeat(2000)}).to_string();
    let post = |room: &str, body: &str| {
        (
            "POST",
            format!("/api/rooms/{room}/messages"),
            body.to_owned(),
        )
    };
    let get = |path: &str| ("GET", path.to_owned(), String::new());
    let cases = [
        (post("a:b", r#"{"name":"x","content":"y"}"#), 400),
        (post("guarded", "not json"), 400),
        (post("guarded", r#"{"name":"x"}"#), 400),
        (post("guarded", "[1]"), 400),
        (post("guarded", r#"{"name":5,"content":"y"}"#), 400),
        (
            post(
                "guarded",
                &format!(r#"{{"name":"{long_name}","content":"y"}}"#),
            ),
            400,
        ),
        (post("guarded", &oversized), 413),
        (
            post("guarded", r#"{"name":"x","content":"y","cid":"no spaces"}"#),
            400,
        ),
        (
            post("guarded", r#"{"name":"x","content":"y","user":7}"#),
            400,
        ),
        (get("/api/rooms/guarded/history?after=yesterday"), 400),
        (get("/api/rooms/guarded/history?before=1-x"), 400),
        (get("/api/rooms/guarded/history?limit=0"), 400),
        (get("/api/rooms/guarded/history?limit=5000"), 400),
        (get("/api/rooms/guarded/history?limit=many"), 400),
        (get("/api/rooms/a:b/presence"), 400),
        (get(&format!("/api/users/{}", "u".repeat(200))), 400),
        (get("/api/nothing"), 404),
        (
            (
                "DELETE",
                "/api/rooms/guarded/messages".to_owned(),
                String::new(),
            ),
            405,
        ),
    ];
    for ((method, path, body), expected) in cases {
        let (status, answer) = api_call(app.api.unwrap(), method, &path, Some(KEY), &body).await;
        assert_eq!(status, expected, "{method} {path} {body}");
        let answer: Value = serde_json::from_slice(&answer)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {answer:?}"));
        assert!(answer["error"].is_string(), "{method} {path}: {answer}");
    }
    // Nothing reached the member, nothing is in the history: the first message is the marker.
    let (status, posted) = app
        .api_call(
            "POST",
            "/api/rooms/guarded/messages",
            Some(KEY),
            r#"{"name":"x","content":"marker"}"#,
        )
        .await;
    assert_eq!(status, 201);
    assert_eq!(member.json().await["content"], "marker");
    let (_, page) = app
        .api_call("GET", "/api/rooms/guarded/history", Some(KEY), "")
        .await;
    assert_eq!(page["messages"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["messages"][0]["id"], posted["id"]);
}
