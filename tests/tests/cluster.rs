//! Rooms over a real Redis Cluster (three primaries, `redis-server --cluster-enabled yes`):
//! two apps given `redis+cluster://` seed nodes deliver each room's messages to its members on
//! both, whichever shard owns the room, and each room's history lives on the shard that owns
//! its channel. Faults (a primary killed and replaced by its replica, a slot moved under load)
//! are in `chaos.rs`, under the whole chaos driver's account of every message. Presence of
//! each room is kept on its shard and seen from both apps.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
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
