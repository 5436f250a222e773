//! Who is here, across two instances on a real Redis: the state on joining and the diffs after
//! it, one member for one name on two instances, the members of a killed instance leaving
//! within `presence_ttl` (and nobody else), Redis losing presence without anyone leaving, a
//! join storm costing each member a handful of frames, and members arriving together in a new
//! room sharing one read of it; `presence = false` sends none.

use futures_util::future::join_all;
use serde_json::{Value, json};
use testkit::wait::eventually;

use crate::support::{App, Binary, Client, DEADLINE, Redis, TempFile};

/// Fast presence, so the tests run quickly: a frame at most every 100 ms, an instance gone
/// after a second of silence.
const FAST: &str = "presence_interval = \"100ms\"\npresence_ttl = \"1s\"\n";

/// The names a frame lists (`members` of a state, `joins` of a diff), sorted.
fn names(frame: &Value, list: &str) -> Vec<String> {
    let mut names: Vec<String> = frame[list]
        .as_array()
        .map(|members| {
            members
                .iter()
                .filter_map(|m| m["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn has_join(frame: &Value, name: &str) -> bool {
    names(frame, "joins").iter().any(|n| n == name)
}

fn has_leave(frame: &Value, name: &str) -> bool {
    names(frame, "leaves").iter().any(|n| n == name)
}

#[tokio::test]
async fn members_see_the_state_then_diffs_on_both_instances() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, FAST).await;

    let (mut ann, state) = Client::with_presence(one.addr, "room=hall").await;
    assert_eq!(
        state,
        json!({"presence": "state", "members": [], "count": 1})
    );
    ann.say("ann", "hello").await;
    // Her name is shown once her message is out, to herself too.
    ann.presence_until(|f| has_join(f, "ann")).await;

    let (mut bob, state) = Client::with_presence(two.addr, "room=hall").await;
    assert_eq!(
        state,
        json!({"presence": "state", "members": [{"name": "ann", "conns": 1}], "count": 2})
    );
    ann.presence_until(|f| f["count"] == 2).await;
    bob.say("bob", "hi").await;
    for client in [&mut ann, &mut bob] {
        let frames = client.presence_until(|f| has_join(f, "bob")).await;
        assert_eq!(frames.last().unwrap()["count"], 2);
    }
    bob.close().await;
    let frames = ann.presence_until(|f| has_leave(f, "bob")).await;
    assert_eq!(frames.last().unwrap()["count"], 1);
    assert!(frames.iter().all(|f| !has_leave(f, "ann")));

    // The original protocol hears no presence: its first frame is a chat message.
    let mut plain = Client::connect_with(one.addr, "room=hall").await;
    ann.say("ann", "again").await;
    let message = plain.json().await;
    assert_eq!(message["content"], "again");
}

#[tokio::test]
async fn one_name_on_two_instances_is_one_member() {
    let redis = Redis::start().await;
    let (one, two) = App::healthy_pair(&redis, FAST).await;
    let (mut tab1, _) = Client::with_presence(one.addr, "room=tabs").await;
    let (mut tab2, _) = Client::with_presence(two.addr, "room=tabs").await;
    tab1.say("cy", "tab one").await;
    tab2.say("cy", "tab two").await;
    let frames = tab1
        .presence_until(|f| {
            f["joins"]
                .as_array()
                .is_some_and(|j| j.contains(&json!({"name": "cy", "conns": 2})))
        })
        .await;
    assert!(frames.iter().all(|f| names(f, "leaves").is_empty()));
    // A newcomer sees one member with two connections.
    let (_, state) = Client::with_presence(one.addr, "room=tabs").await;
    assert_eq!(state["members"], json!([{"name": "cy", "conns": 2}]));
    assert_eq!(state["count"], 3);
}

#[tokio::test]
async fn a_killed_instance_members_leave_within_the_ttl_and_nobody_else_does() {
    let redis = Redis::start().await;
    let one = App::with_redis(&redis, FAST).await;
    one.wait_health(200).await;
    let config = TempFile::new(
        "app.toml",
        &format!("{}listen = \"127.0.0.1:0\"\n{FAST}", redis.app_config()),
    );
    let two = Binary::start(&["--config", config.as_str()]).await;
    eventually("the second instance to serve", DEADLINE, || async {
        anyhow::Ok(crate::support::http_get(two.addr, "/healthz").await.0 == 200)
    })
    .await
    .unwrap();

    let (mut ann, _) = Client::with_presence(one.addr, "room=k").await;
    ann.say("ann", "here").await;
    let (mut doomed, _) = Client::with_presence(two.addr, "room=k").await;
    doomed.say("dee", "here too").await;
    ann.presence_until(|f| has_join(f, "dee")).await;

    two.signal("KILL");
    let frames = ann.presence_until(|f| has_leave(f, "dee")).await;
    let last = frames.last().unwrap();
    assert_eq!(names(last, "leaves"), ["dee"]);
    assert_eq!(last["count"], 1);
    assert!(frames.iter().all(|f| !has_leave(f, "ann")), "{frames:?}");
    // A newcomer sees no ghost.
    let (_, state) = Client::with_presence(one.addr, "room=k").await;
    assert_eq!(state["members"], json!([{"name": "ann", "conns": 1}]));
}

#[tokio::test]
async fn presence_survives_redis_going_away_and_losing_it_without_a_leave() {
    let mut redis = Redis::start_persistent().await;
    // Redis is away for less than the TTL: nobody it had must leave.
    let config = "presence_interval = \"100ms\"\npresence_ttl = \"15s\"\n";
    let (one, two) = App::healthy_pair(&redis, config).await;
    let (mut ann, _) = Client::with_presence(one.addr, "room=r").await;
    ann.say("ann", "a").await;
    ann.presence_until(|f| has_join(f, "ann")).await;
    let (mut bob, state) = Client::with_presence(two.addr, "room=r").await;
    assert_eq!(names(&state, "members"), ["ann"]);
    bob.say("bob", "b").await;
    for client in [&mut ann, &mut bob] {
        client.presence_until(|f| has_join(f, "bob")).await;
    }

    // Redis away and back (its data kept), then presence lost outright (as a Redis that kept
    // nothing would): every instance writes itself again and nobody leaves.
    redis.stop().await;
    one.wait_health(503).await;
    redis.restart().await;
    one.wait_health(200).await;
    two.wait_health(200).await;
    let keys: Vec<String> = redis.command(&["KEYS", "{simple-chat:r}:presence*"]).await;
    assert!(keys.len() >= 2, "{keys:?}");
    let mut del = vec!["DEL"];
    del.extend(keys.iter().map(String::as_str));
    let _: i64 = redis.command(&del).await;
    eventually("both instances in Redis again", DEADLINE, || async {
        let live: i64 = redis.command(&["ZCARD", "{simple-chat:r}:presence"]).await;
        anyhow::Ok(live == 2)
    })
    .await
    .unwrap();

    // A marker: the next change everyone sees. Nothing before it is a leave.
    let (mut cy, _) = Client::with_presence(one.addr, "room=r").await;
    cy.say("cy", "c").await;
    for client in [&mut ann, &mut bob] {
        let frames = client.presence_until(|f| has_join(f, "cy")).await;
        for frame in &frames {
            assert!(names(frame, "leaves").is_empty(), "{frames:?}");
            let joins = names(frame, "joins");
            assert!(joins.iter().all(|n| n == "cy"), "{frames:?}");
        }
        assert_eq!(frames.last().unwrap()["count"], 3);
    }
}

#[tokio::test]
async fn a_join_storm_costs_each_member_a_handful_of_frames() {
    const STORM: usize = 1000;
    let app = App::start("").await;
    let (mut watcher, _) = Client::with_presence(app.addr, "room=storm").await;
    let mut storm = Vec::new();
    for wave in 0..STORM / 100 {
        let joined = join_all((0..100).map(|_| Client::upgraded(app.addr, "room=storm"))).await;
        storm.extend(joined);
        assert_eq!(storm.len(), (wave + 1) * 100);
    }
    let frames = watcher.presence_until(|f| f["count"] == STORM + 1).await;
    // The default interval is a second: the storm fits in a few, whatever this machine's pace.
    println!(
        "{STORM} joins: {} presence frames for the watcher (one per join would be {STORM})",
        frames.len()
    );
    assert!(
        frames.len() <= 30,
        "{} frames for {STORM} joins",
        frames.len()
    );
    drop(storm);
    watcher.presence_until(|f| f["count"] == 1).await;
}

#[tokio::test]
async fn members_arriving_together_in_a_new_room_share_its_first_read() {
    const MEMBERS: usize = 40;
    // An interval longer than the test: the only reads of the room from Redis are those made
    // as members arrive.
    let redis = Redis::start().await;
    let app = App::with_redis(
        &redis,
        "presence_interval = \"1h\"\npresence_ttl = \"5h\"\n",
    )
    .await;
    app.wait_health(200).await;
    // A member that does not watch presence: the room is joined and counted, not yet read.
    let mut first = Client::connect_with(app.addr, "room=together").await;
    redis.command::<()>(&["CONFIG", "RESETSTAT"]).await;
    // While Redis holds every script, members who watch presence arrive together: the first
    // one's read of the room is held, and the others must wait for it, not read it again.
    redis
        .command::<()>(&["CLIENT", "PAUSE", "60000", "WRITE"])
        .await;
    let mut members =
        join_all((0..MEMBERS).map(|_| Client::upgraded(app.addr, "presence&room=together"))).await;
    redis.command::<()>(&["CLIENT", "UNPAUSE"]).await;
    for member in &mut members {
        let state = member.json().await;
        assert_eq!(state["presence"], "state", "{state}");
    }
    let stats: String = redis.command(&["INFO", "commandstats"]).await;
    let scripts: u64 = stats
        .lines()
        .filter(|line| line.starts_with("cmdstat_evalsha:") || line.starts_with("cmdstat_eval:"))
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum();
    // One read: at most two script calls (a heartbeat that finds the entry gone writes it
    // again), each perhaps sent twice (EVALSHA, then EVAL when Redis did not have the script).
    assert!(
        scripts <= 4,
        "{scripts} script calls in Redis for {MEMBERS} members arriving together:\n{stats}"
    );
    // Everyone is served: a message reaches all of them.
    first.say("ann", "all here").await;
    assert_eq!(first.json().await["content"], "all here");
    for member in &mut members {
        while member.json().await["content"] != "all here" {}
    }
}

#[tokio::test]
async fn presence_off_sends_no_frame_and_the_api_says_so() {
    let app = App::start_with_api("presence = false\n", "key-1234567890").await;
    // Served without a presence frame: the first thing it hears is its own ping's answer.
    let mut client = Client::connect_with(app.addr, "presence&room=quiet").await;
    client.say("ann", "hi").await;
    assert_eq!(client.json().await["content"], "hi");
    let (status, body) = app
        .api_call(
            "GET",
            "/api/rooms/quiet/presence",
            Some("key-1234567890"),
            "",
        )
        .await;
    assert_eq!(status, 404);
    assert!(
        body["error"].as_str().unwrap().contains("presence = false"),
        "{body}"
    );
}
