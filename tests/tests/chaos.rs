//! Zero loss under faults, with real processes: each fault of the chaos driver injected at a
//! small scale (20 clients, 2 senders, 20 msg/s for 6 s) with resuming clients and retrying
//! senders, on one Redis server or, for the cluster faults (a primary killed, a slot moved), on
//! a real Redis Cluster; in each case
//! every message published exactly once, every client gets every message published
//! after it connected, once and in order, and no resume is refused. Then what cannot be
//! recovered is announced: a client resuming from before the kept history, and one resuming
//! after Redis lost its data (a new epoch), are told `recovered: false`; one resuming from the
//! newest message is not.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::Value;
use testkit::redis::Persistence;
use testkit::wait::eventually;
use tests::chaos::{self, Config, Report, Scenario};
use tests::client::ChatClient;
use tests::stack::{Options, Stack};

/// The small scale of these tests.
fn small(scenario: Scenario, resume: bool) -> Config {
    Config {
        resume,
        clients: 20,
        senders: 2,
        rate: 20.0,
        duration: Duration::from_secs(6),
        fault_at: Duration::from_secs(3),
        drain: Duration::from_secs(3),
        ..Config::new(scenario)
    }
}

/// Runs `scenario` with resume and checks that nothing was lost, duplicated or refused.
async fn zero_loss(scenario: Scenario) -> Result<Report> {
    let config = small(scenario, true);
    let report = chaos::run(&config).await?;
    println!("{report}");
    report.assert_zero_loss();
    Ok(report)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_refreshed_on_the_socket_through_an_app_kill_lose_nothing() -> Result<()> {
    // Tokens last 3 s and the run 9 s: every client is asked for a new token at least twice,
    // some of them also reconnect (with a new token) when their app is killed.
    let config = Config {
        token_ttl: Some(Duration::from_secs(3)),
        duration: Duration::from_secs(9),
        fault_at: Duration::from_secs(4),
        ..small(Scenario::KillApp, true)
    };
    let report = chaos::run(&config).await?;
    println!("{report}");
    report.assert_zero_loss();
    assert!(
        report.refreshes >= 2 * report.clients as u64,
        "{} refreshes for {} clients",
        report.refreshes,
        report.clients
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_fault() -> Result<()> {
    let report = zero_loss(Scenario::None).await?;
    assert_eq!((report.disconnects, report.retries), (0, 0), "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_original_protocol_without_a_fault_loses_nothing() -> Result<()> {
    let report = chaos::run(&small(Scenario::None, false)).await?;
    println!("{report}");
    assert_eq!(
        (
            report.connected,
            report.lost,
            report.duplicates,
            report.send_errors
        ),
        (20, 0, 0, 0),
        "{report}"
    );
    assert!(report.sent > 0, "{report}");
    assert_eq!(report.published, report.sent, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_killed() -> Result<()> {
    let report = zero_loss(Scenario::KillApp).await?;
    assert!(
        report.disconnects > 0,
        "the kill left every client alone: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_drained() -> Result<()> {
    let report = zero_loss(Scenario::DrainApp).await?;
    assert!(
        report.disconnects > 0,
        "the drain left every client alone: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_with_its_append_only_file() -> Result<()> {
    let report = zero_loss(Scenario::RedisRestart).await?;
    assert!(
        report.retries > 0,
        "no send was retried while Redis was down: {report}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_reloaded_with_new_weights() -> Result<()> {
    let report = zero_loss(Scenario::LbReload).await?;
    assert_eq!(report.disconnects, 0, "a reload cut tunnels: {report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_apps_restarted_in_turn() -> Result<()> {
    let report = zero_loss(Scenario::RollingRestart).await?;
    // Every client was on one of the two apps.
    assert!(report.disconnects >= 20, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_restarted() -> Result<()> {
    let report = zero_loss(Scenario::LbRestart).await?;
    assert!(report.disconnects >= 20, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_and_replaced_by_its_replica() -> Result<()> {
    let report = zero_loss(Scenario::ShardFailover).await?;
    // The primary was really gone for a while: sends failed and were retried until the replica
    // took over (after the cluster's node timeout), and none of them was lost.
    assert!(report.retries > 0, "{report}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_slot_moved_under_load() -> Result<()> {
    zero_loss(Scenario::SlotMigration).await?;
    Ok(())
}

/// Connects through `lb` with `query` (`resume`, or `epoch=..&last=..`) and returns the client
/// with its resume notice.
async fn resume(stack: &Stack, query: &str) -> Result<(ChatClient, Value)> {
    let mut client =
        ChatClient::connect(&format!("{}?{query}", stack.url()), Some(&stack.tls)).await?;
    let notice = client.recv().await?;
    if notice.get("recovered").is_none() {
        bail!("the first frame is not a resume notice: {notice}");
    }
    Ok((client, notice))
}

/// Reads frames until the message with this content; returns it.
async fn message(client: &mut ChatClient, content: &str) -> Result<Value> {
    loop {
        let frame = client.recv().await?;
        if frame["content"] == content {
            return Ok(frame);
        }
    }
}

fn position(message: &Value) -> Result<String> {
    let epoch = message["epoch"].as_str().context("no epoch")?;
    let id = message["id"].as_str().context("no id")?;
    Ok(format!("epoch={epoch}&last={id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_from_before_the_kept_history_is_not_recovered() -> Result<()> {
    let stack = Stack::start_with(&Options {
        app_config: "history_messages = 5".to_owned(),
        ..Options::default()
    })
    .await?;
    let mut sender = stack.client().await?;
    sender.send("bob", "first").await?;
    let first = message(&mut sender, "first").await?;
    // Redis trims whole Stream nodes (100 entries): send enough to drop the first one.
    for i in 0..250 {
        sender.send("bob", &format!("fill-{i}")).await?;
    }
    let newest = message(&mut sender, "fill-249").await?;

    let (_, notice) = resume(&stack, &position(&first)?).await?;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_eq!(notice["epoch"], first["epoch"], "{notice}");
    assert_eq!(notice["missed"], 0, "{notice}");
    assert!(notice["reason"].is_string(), "{notice}");
    // From the newest message, nothing is missing.
    let (_, notice) = resume(&stack, &position(&newest)?).await?;
    assert_eq!(notice["recovered"], true, "{notice}");
    assert_eq!(notice["missed"], 0, "{notice}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_after_redis_lost_its_data_gets_a_new_epoch() -> Result<()> {
    let mut stack = Stack::start_with(&Options {
        redis: Persistence::Off,
        ..Options::default()
    })
    .await?;
    let mut sender = stack.client().await?;
    sender.send("bob", "before").await?;
    let before = message(&mut sender, "before").await?;
    let old_epoch = before["epoch"].as_str().context("no epoch")?.to_owned();
    stack.redis.one()?.restart().await?;

    // The apps take clients again once they are back on Redis; until then a resume is refused
    // (503, or close 1013) and tried again.
    let (_, notice) = eventually(
        "a resume once the apps are back on Redis",
        Duration::from_secs(15),
        || async { resume(&stack, &position(&before)?).await.map(Some) },
    )
    .await?;
    assert_eq!(notice["recovered"], false, "{notice}");
    assert_ne!(notice["epoch"], old_epoch, "{notice}");
    assert!(notice["reason"].is_string(), "{notice}");
    Ok(())
}
