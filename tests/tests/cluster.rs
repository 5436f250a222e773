//! Rooms over a real Redis Cluster (three primaries, `redis-server --cluster-enabled yes`):
//! two apps given `redis+cluster://` seed nodes deliver each room's messages to its members on
//! both, whichever shard owns the room, and each room's history lives on the shard that owns
//! its channel. Faults (a primary killed and replaced by its replica, a slot moved under load)
//! are in `chaos.rs`, under the whole chaos driver's account of every message.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use testkit::process::Proc;
use tests::client::ChatClient;
use tests::cluster::RedisCluster;
use tests::stack::{CHANNEL, app_config, start_app, wait_healthy};

fn room_url(app: &Proc, room: &str) -> String {
    format!("ws://{}/ws?room={room}", app.addr("http"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rooms_on_every_shard_reach_their_members_on_both_apps() -> Result<()> {
    let cluster = RedisCluster::start(3, 0).await?;
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

    // One room on each primary.
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
