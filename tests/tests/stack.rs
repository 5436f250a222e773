//! The whole stack end to end, as users see it: clients over `wss://` through `lb`, two `app`
//! processes, one `redis-server`; every part a real process on loopback.
//!
//! Each test synchronises on observable state (a message arriving, a connection closing, `lb`'s
//! `/stats` saying a backend is down), never on sleeps.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use testkit::wait::eventually;
use tests::client::{ChatClient, Closed};
use tests::stack::Stack;
use tokio::task::JoinSet;

/// What one client saw until the end marker (or until its connection closed).
#[derive(Debug)]
struct Seen {
    contents: Vec<String>,
    closed: Option<Closed>,
}

/// Reads messages until one whose content is `end` (kept last), or until the connection closes.
/// Fails when nothing arrives in time or a frame is not chat JSON: a hang is not a disconnect.
async fn read_until(mut client: ChatClient, end: String) -> Result<(ChatClient, Seen)> {
    let mut contents = Vec::new();
    loop {
        let event = client
            .recv_event()
            .await
            .with_context(|| format!("waiting for {end:?} after {contents:?}"))?;
        match event {
            Some(msg) => {
                let content = msg["content"].as_str().unwrap_or_default().to_string();
                let done = content == end;
                contents.push(content);
                if done {
                    return Ok((
                        client,
                        Seen {
                            contents,
                            closed: None,
                        },
                    ));
                }
            }
            None => {
                let closed = client.last_close();
                return Ok((
                    client,
                    Seen {
                        contents,
                        closed: Some(closed),
                    },
                ));
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_clients_through_lb_each_get_every_message_exactly_once() -> Result<()> {
    let stack = Stack::start(2).await?;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(stack.client().await?);
    }
    let spread = stack.tunnels(50).await?;
    assert!(
        spread.iter().all(|&n| n > 0),
        "lb used one app only: {spread:?}"
    );

    // Ten different clients send one message each; client 0 waits until it has seen all ten,
    // then sends an end marker: Redis keeps publish order, so everything before the marker
    // reaches every client before it.
    let sent: Vec<String> = (0..10).map(|i| format!("msg-{i}")).collect();
    for (i, content) in sent.iter().enumerate() {
        clients[i * 5].send(&format!("sender{i}"), content).await?;
    }
    let mut first_seen = HashSet::new();
    while first_seen.len() < sent.len() {
        let msg = clients[0].recv().await?;
        first_seen.insert(msg["content"].as_str().unwrap_or_default().to_string());
    }
    clients[0].send("sender0", "end").await?;

    let mut tasks = JoinSet::new();
    for client in clients.drain(1..) {
        tasks.spawn(read_until(client, "end".to_string()));
    }
    let expected: HashSet<&str> = sent.iter().map(String::as_str).collect();
    while let Some(joined) = tasks.join_next().await {
        let (_, seen) = joined??;
        assert_eq!(seen.closed, None, "a client was disconnected: {seen:?}");
        let before_end = &seen.contents[..seen.contents.len() - 1];
        let got: HashSet<&str> = before_end.iter().map(String::as_str).collect();
        assert_eq!(got, expected, "wrong set of messages: {before_end:?}");
        assert_eq!(before_end.len(), sent.len(), "duplicates: {before_end:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_app_costs_its_clients_a_reconnect_and_the_others_nothing() -> Result<()> {
    let mut stack = Stack::start(2).await?;
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(stack.client().await?);
    }
    let on_app1 = stack.tunnels(20).await?[0] as usize;
    assert!(on_app1 > 0 && on_app1 < 20, "lb used one app only");
    // Traffic comes from a client attached to app2 directly, so it outlives app1.
    let app2_ws = format!("ws://{}/ws", stack.apps[1].addr("http"));
    let mut sender = ChatClient::connect(&app2_ws, None).await?;

    let mut readers = JoinSet::new();
    for client in clients.drain(..) {
        readers.spawn(read_until(client, "end".to_string()));
    }
    let mut seq = 0;
    let mut send_batch = async |sender: &mut ChatClient, n: usize| -> Result<()> {
        for _ in 0..n {
            sender.send("sender", &format!("seq-{seq}")).await?;
            seq += 1;
        }
        Ok(())
    };
    send_batch(&mut sender, 20).await?;
    stack.apps[0].kill().await;
    send_batch(&mut sender, 20).await?;
    stack.wait_backend("app1", false).await?;
    send_batch(&mut sender, 20).await?;
    sender.send("sender", "end").await?;
    let all: Vec<String> = (0..60)
        .map(|i| format!("seq-{i}"))
        .chain(["end".into()])
        .collect();

    let mut stayed = Vec::new();
    let mut dropped = Vec::new();
    while let Some(joined) = readers.join_next().await {
        let (client, seen) = joined??;
        match seen.closed {
            None => {
                assert_eq!(
                    seen.contents, all,
                    "a client that stayed connected missed messages"
                );
                stayed.push(client);
            }
            Some(_) => dropped.push(client),
        }
    }
    assert_eq!(
        dropped.len(),
        on_app1,
        "exactly app1's clients lose their connection"
    );
    assert_eq!(stayed.len(), 20 - on_app1);

    // New connections go to app2 only, without a failed connect to the dead app.
    let failures_before = stack.backends().await?[0].connect_failures;
    let n_dropped = dropped.len();
    drop(dropped);
    let mut reconnected = Vec::new();
    for _ in 0..n_dropped {
        reconnected.push(stack.client().await?);
    }
    assert_eq!(stack.tunnels(20).await?, [0, 20], "app2 holds every tunnel");
    let backends = stack.backends().await?;
    assert_eq!(
        backends[0].connect_failures, failures_before,
        "a connection tried dead app1"
    );
    reconnected[0].send("back", "hello again").await?;
    for client in reconnected.iter_mut().chain(stayed.iter_mut()) {
        assert_eq!(client.recv().await?["content"], "hello again");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_through_lb_resumes_after_redis_restarts() -> Result<()> {
    let mut stack = Stack::start(2).await?;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(stack.client().await?);
    }
    clients[0].send("a", "before").await?;
    for client in clients.iter_mut() {
        assert_eq!(client.recv().await?["content"], "before");
    }

    stack.redis.one()?.stop().await;
    // While Redis is down the apps say 503 on /healthz, so lb takes them out of rotation...
    stack.wait_backend("app1", false).await?;
    stack.wait_backend("app2", false).await?;
    // ...and a sender is told its message was not sent.
    clients[0].send("a", "during").await?;
    let answer = clients[0].recv().await?;
    assert!(
        answer.get("error").is_some(),
        "expected an error, got {answer}"
    );

    stack.redis.one()?.restart().await?;
    stack.wait_backend("app1", true).await?;
    stack.wait_backend("app2", true).await?;
    // The tunnels opened before the outage still work, and delivery crosses both apps again:
    // the sender retries (it is told each time a message could not be sent) until one is
    // delivered back to itself, and every other client then receives that one.
    let delivered = eventually_delivered(&mut clients[0]).await?;
    for client in clients.iter_mut().skip(1) {
        loop {
            let msg = client.recv().await?;
            if msg["content"] == delivered.as_str() {
                break;
            }
        }
    }
    for app in stack.apps.iter_mut() {
        assert!(app.is_running(), "an app exited because Redis went away");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_graceful_shutdown_moves_its_clients_to_the_other_app() -> Result<()> {
    let mut stack = Stack::start(2).await?;
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(stack.client().await?);
    }
    let on_app1 = stack.tunnels(10).await?[0] as usize;
    assert!(on_app1 > 0 && on_app1 < 10, "lb used one app only");

    stack.apps[0].signal("TERM")?;
    stack.wait_backend("app1", false).await?;
    let status = stack.apps[0].wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "app1 exited with {status}");

    let app2_ws = format!("ws://{}/ws", stack.apps[1].addr("http"));
    let mut sender = ChatClient::connect(&app2_ws, None).await?;
    sender.send("sender", "end").await?;
    let mut readers = JoinSet::new();
    for client in clients.drain(..) {
        readers.spawn(read_until(client, "end".to_string()));
    }
    let mut going_away = 0;
    let mut stayed = Vec::new();
    while let Some(joined) = readers.join_next().await {
        let (client, seen) = joined??;
        match seen.closed {
            None => {
                assert_eq!(seen.contents, ["end"]);
                stayed.push(client);
            }
            Some(code) => {
                assert_eq!(
                    code,
                    Closed::Code(1001),
                    "app1's clients are told it is going away"
                );
                going_away += 1;
            }
        }
    }
    assert_eq!(going_away, on_app1);

    let mut reconnected = Vec::new();
    for _ in 0..on_app1 {
        reconnected.push(stack.client().await?);
    }
    assert_eq!(stack.tunnels(10).await?, [0, 10], "app2 holds every tunnel");
    reconnected[0].send("back", "moved").await?;
    for client in reconnected.iter_mut().chain(stayed.iter_mut()) {
        assert_eq!(client.recv().await?["content"], "moved");
    }
    Ok(())
}

/// Sends numbered messages until one comes back delivered (not an error); returns its content.
async fn eventually_delivered(sender: &mut ChatClient) -> Result<String> {
    let sent = AtomicUsize::new(0);
    let sender = tokio::sync::Mutex::new(sender);
    let (sent, sender) = (&sent, &sender);
    eventually(
        "a delivery after the restart",
        Duration::from_secs(10),
        || async move {
            let content = format!("after-{}", sent.fetch_add(1, Ordering::Relaxed) + 1);
            let mut sender = sender.lock().await;
            sender.send("a", &content).await?;
            let answer = sender.recv().await?;
            Ok((answer["content"] == content.as_str()).then_some(content))
        },
    )
    .await
}
