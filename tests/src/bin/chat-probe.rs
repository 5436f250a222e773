//! `chat-probe CA_FILE SENDER_URL [RECEIVER_URL...]`: a chat client for tests that run it on
//! another (network-namespace) host. Connects every URL, sends one message from the first, and
//! prints `received <url> <json>` for each connection that gets it (the sender included).
//! A connection refused while the apps start (they answer 503 until subscribed to Redis) is
//! tried again for up to ten seconds. Exits 0 when all received it, 1 otherwise.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tests::client::{ChatClient, tls_connector};

#[tokio::main]
async fn main() -> ExitCode {
    match probe().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("chat-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn probe() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [ca, urls @ ..] = args.as_slice() else {
        bail!("usage: chat-probe CA_FILE SENDER_URL [RECEIVER_URL...]");
    };
    if urls.is_empty() {
        bail!("usage: chat-probe CA_FILE SENDER_URL [RECEIVER_URL...]");
    }
    let tls = tls_connector(Path::new(ca))?;
    let mut clients = Vec::new();
    for url in urls {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let client = loop {
            match ChatClient::connect(url, Some(&tls)).await {
                Ok(client) => break client,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    eprintln!("chat-probe: {url}: {e:#}; trying again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        };
        clients.push(client);
    }
    let content = format!("probe {}", std::process::id());
    clients[0].send("probe", &content).await?;
    for (url, client) in urls.iter().zip(clients.iter_mut()) {
        let msg = client
            .recv()
            .await
            .with_context(|| format!("{url} received nothing"))?;
        if msg["content"] != content.as_str() {
            bail!("{url} received {msg} instead of {content:?}");
        }
        println!("received {url} {msg}");
    }
    Ok(())
}
