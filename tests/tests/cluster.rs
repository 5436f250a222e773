//! Rooms over a real Redis Cluster (three primaries, `redis-server --cluster-enabled yes`):
//! two apps given `redis+cluster://` seed nodes deliver each room's messages to its members on
//! both, whichever shard owns the room, and each room's history lives on the shard that owns
//! its channel. Faults (a primary killed and replaced by its replica, a slot moved under load)
//! are in `chaos.rs`, under the whole chaos driver's account of every message. Presence of
//! each room is kept on its shard and seen from both apps. In token mode a user's connection
//! limit holds across both apps and `app disconnect` reaches both through the cluster.

use std::collections::BTreeMap;

use anyhow::{Context, Result, ensure};
use testkit::process::Proc;
use tests::client::ChatClient;
use tests::cluster::RedisCluster;
use tests::stack::{CHANNEL, app_config, start_app, wait_healthy};

fn room_url(app: &Proc, room: &str) -> String {
    format!("ws://{}/ws?room={room}", app.addr("http"))
}

/// Two apps on `cluster`, both healthy (their config lives in the returned directory).
async fn two_apps(cluster: &RedisCluster) -> Result<(tempfile::TempDir, [Proc; 2])> {
    let dir = tempfile::tempdir()?;
    let app_toml = dir.path().join("app.toml");
    std::fs::write(&app_toml, app_config())?;
    let apps = [
        start_app("app1", &app_toml, &cluster.url()).await?,
        start_app("app2", &app_toml, &cluster.url()).await?,
    ];
    for app in &apps {
        wait_healthy(app.addr("http")).await?;
    }
    Ok((dir, apps))
}

/// A room whose channel lives on each primary of a three-primary `cluster`, by primary.
async fn one_room_per_primary(cluster: &RedisCluster) -> Result<BTreeMap<usize, String>> {
    let masters = cluster.masters().await?;
    ensure!(masters.len() == 3, "expected 3 primaries, got {masters:?}");
    let mut rooms: BTreeMap<usize, String> = BTreeMap::new();
    for i in 0..1000 {
        let room = format!("r{i}");
        let owner = cluster
            .owner(cluster.slot(&format!("{CHANNEL}:{room}")).await?)
            .await?;
        rooms.entry(owner).or_insert(room);
        if rooms.len() == masters.len() {
            break;
        }
    }
    ensure!(rooms.len() == 3, "no room found for every primary");
    Ok(rooms)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_shard_reach_their_members_on_both_apps() -> Result<()> {
    let cluster = RedisCluster::start(3, 0).await?;
    let (_dir, apps) = two_apps(&cluster).await?;
    let rooms = one_room_per_primary(&cluster).await?;

    let mut members = Vec::new();
    for room in rooms.values() {
        let sender = ChatClient::connect(&room_url(&apps[0], room), None).await?;
        let receiver = ChatClient::connect(&room_url(&apps[1], room), None).await?;
        members.push((room.clone(), sender, receiver));
    }
    for (room, sender, _) in &mut members {
        sender.send("alice", &format!("hello {room}")).await?;
    }
    for (room, sender, receiver) in &mut members {
        // Each member sees its own room's message and no other: a message of another room
        // would come first or instead.
        for client in [sender, receiver] {
            let got = client.recv().await?;
            assert_eq!(got["content"], format!("hello {room}"), "in room {room}");
            assert!(got["id"].is_string() && got["epoch"].is_string(), "{got}");
        }
    }

    // Each room's history is on the primary that owns its channel.
    for (owner, room) in &rooms {
        let mut conn = cluster.node(*owner).await?;
        let len: u64 = redis::cmd("XLEN")
            .arg(format!("{{{CHANNEL}:{room}}}:history"))
            .query_async(&mut conn)
            .await?;
        assert_eq!(len, 1, "history of {room} on node {owner}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_of_rooms_on_every_shard_is_shared_by_both_apps() -> Result<()> {
    let cluster = RedisCluster::start(3, 0).await?;
    let (_dir, apps) = two_apps(&cluster).await?;
    let rooms = one_room_per_primary(&cluster).await?;
    for (owner, room) in &rooms {
        let url = |app: &Proc| format!("ws://{}/ws?presence&room={room}", app.addr("http"));
        let mut ann = ChatClient::connect(&url(&apps[0]), None).await?;
        let mut bob = ChatClient::connect(&url(&apps[1]), None).await?;
        ann.send("ann", "hi").await?;
        bob.send("bob", "hi").await?;
        // Each sees both names, whichever instance the other is on.
        for client in [&mut ann, &mut bob] {
            let mut seen = std::collections::BTreeSet::new();
            while !(seen.contains("ann") && seen.contains("bob")) {
                let frame = client.recv().await?;
                for list in ["members", "joins"] {
                    for member in frame[list].as_array().into_iter().flatten() {
                        if let Some(name) = member["name"].as_str() {
                            seen.insert(name.to_owned());
                        }
                    }
                }
            }
        }
        // Both instances are in the room's presence, on the primary that owns the room.
        let mut conn = cluster.node(*owner).await?;
        let instances: u64 = redis::cmd("ZCARD")
            .arg(format!("{{{CHANNEL}:{room}}}:presence"))
            .query_async(&mut conn)
            .await?;
        assert_eq!(instances, 2, "presence of {room} on node {owner}");
    }
    Ok(())
}

/// Token mode: connects to `app` and signs in with `token`; the socket once the server said
/// `{"auth":"ok"}`, or the close code it ended with.
async fn sign_in(app: &Proc, token: &str) -> Result<Result<tests::client::Ws, u16>> {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = tests::client::connect(&format!("ws://{}/ws", app.addr("http")), None).await?;
    let frame = serde_json::json!({ "token": token }).to_string();
    ws.send(Message::text(frame)).await?;
    Ok(match signed_in_or_closed(&mut ws, true).await? {
        None => Ok(ws),
        Some(code) => Err(code),
    })
}

/// The close code that ends `ws` (texts before it are skipped).
async fn closed_with(ws: &mut tests::client::Ws) -> Result<u16> {
    signed_in_or_closed(ws, false)
        .await?
        .context("read a sign-in while waiting for the close")
}

/// Reads `ws` until the server says `{"auth":"ok"}` (`None`; only when `sign_in`) or the
/// connection ends (its close code: 1005 without one, 1006 without a close frame).
async fn signed_in_or_closed(ws: &mut tests::client::Ws, sign_in: bool) -> Result<Option<u16>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(testkit::wait::DEADLINE, ws.next()).await? {
            Some(Ok(Message::Text(text))) if sign_in && text.contains(r#""auth":"ok""#) => {
                return Ok(None);
            }
            Some(Ok(Message::Close(frame))) => {
                return Ok(Some(frame.map_or(1005, |f| u16::from(f.code))));
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Ok(Some(1006)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_limit_and_disconnect_hold_across_apps_on_a_cluster() -> Result<()> {
    let cluster = RedisCluster::start(3, 0).await?;
    let tokens = tests::chaos::Tokens::new(std::time::Duration::from_secs(600))?;
    let dir = tempfile::tempdir()?;
    let app_toml = dir.path().join("app.toml");
    std::fs::write(
        &app_toml,
        format!(
            "{}{}max_connections_per_user = 1\n",
            app_config(),
            tokens.app_config()
        ),
    )?;
    let apps = [
        start_app("app1", &app_toml, &cluster.url()).await?,
        start_app("app2", &app_toml, &cluster.url()).await?,
    ];
    for app in &apps {
        wait_healthy(app.addr("http")).await?;
    }
    let alice = tokens.mint("alice")?;
    let Ok(mut first) = sign_in(&apps[0], &alice).await? else {
        anyhow::bail!("alice was refused on app1");
    };
    // Her count lives on her key's shard: the other app sees it.
    assert_eq!(sign_in(&apps[1], &alice).await?.err(), Some(4429));
    let status = tokio::process::Command::new(testkit::process::workspace_bin("app")?)
        .args(["disconnect", "--redis", &cluster.url(), "--user", "alice"])
        .status()
        .await?;
    ensure!(status.success(), "app disconnect failed: {status}");
    assert_eq!(closed_with(&mut first).await?, 4410);
    // Her place is free again (given back once app1 has closed her connection).
    testkit::wait::eventually(
        "alice's place to be free",
        testkit::wait::DEADLINE,
        || async { anyhow::Ok(sign_in(&apps[1], &alice).await?.ok()) },
    )
    .await?;
    Ok(())
}
