//! Rooms in a real browser, through `lb`: the page switches to a room typed into its room
//! field (the URL hash follows), shows a message sent in that room and not one sent in the main
//! room meanwhile; back in the main room (through the URL hash) it resumes from its own
//! position there and shows what it missed, and nothing of the room.

use std::time::Duration;

use anyhow::{Result, ensure};
use tests::browser::Browser;
use tests::client::ChatClient;
use tests::stack::Stack;

const WITHIN: Duration = Duration::from_secs(15);

fn shows(text: &str) -> String {
    format!("document.getElementById('messages').textContent.includes({text:?})")
}

/// Sends `content` and waits until the server has published it (the sender gets it back).
async fn publish(client: &mut ChatClient, content: &str) -> Result<()> {
    client.send("bob", content).await?;
    let echo = client.recv().await?;
    ensure!(echo["content"] == content, "unexpected frame {echo}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_in_a_room_shows_that_room_only() -> Result<()> {
    let stack = Stack::start(2).await?;
    let url = format!("https://localhost:{}/", stack.lb.addr("https").port());
    let browser = Browser::launch(&stack.ca_file()).await?;
    let page = browser.open(&url).await?;
    // The page holds a position in the main room once its first notice arrived.
    let positioned = |key: &str| format!("sessionStorage.getItem({key:?}) !== null");
    page.wait_for(&positioned("chat-position"), WITHIN).await?;

    page.type_into("room", "lobby").await?;
    page.press_enter().await?;
    page.wait_for(&positioned("chat-position:lobby"), WITHIN)
        .await?;
    let (hash, title) = (
        page.eval("location.hash").await?,
        page.eval("document.title").await?,
    );
    assert_eq!(
        (hash.as_str(), title.as_str()),
        (Some("#room=lobby"), Some("lobby · Chat"))
    );

    // The main room's message is published first: an instance's one subscription brings both
    // in this order, so were the main room's messages delivered to the page, it would be there
    // by the time the lobby's is.
    let mut main = stack.client().await?;
    publish(&mut main, "in the main room").await?;
    let lobby_url = format!("{}?room=lobby", stack.url());
    let mut lobby = ChatClient::connect(&lobby_url, Some(&stack.tls)).await?;
    publish(&mut lobby, "in the lobby").await?;
    page.wait_for(&shows("in the lobby"), WITHIN).await?;
    let leaked = page.eval(&shows("in the main room")).await?;
    assert_eq!(leaked, false, "a main-room message was shown in the lobby");

    // Back to the main room: it resumes from where the page stood there.
    page.eval("location.hash = ''").await?;
    page.wait_for(&shows("in the main room"), WITHIN).await?;
    let state = page
        .eval(
            "[document.getElementById('room').value, \
              document.getElementById('messages').textContent.includes('in the lobby'), \
              document.querySelectorAll('#messages li.note').length].join('|')",
        )
        .await?;
    assert_eq!(state, "|false|0");
    Ok(())
}
