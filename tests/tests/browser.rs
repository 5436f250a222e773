//! The chat page in a real browser: headless Chromium opens two pages at
//! `https://localhost:PORT/` through `lb` (trusting the CA from `lb certs generate`), a name and a
//! message typed into page 1 and sent with Enter appear in both pages, shown as text. Screenshots
//! of both pages are saved under `target/browser/` for people to look at. A page whose app is
//! killed resumes through the other one: every message sent while it was away (lb held still
//! until all were sent, so they reach the page only through its resume) is shown, once. Two
//! pages in one room each see the other appear in "who is here", and leave (for another room).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tests::browser::{Browser, Page};
use tests::client::ChatClient;
use tests::stack::Stack;

const WITHIN: Duration = Duration::from_secs(15);

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser")
}

/// A stack of two apps and a browser with two pages of `https://localhost:PORT/<fragment>`
/// through lb, both connected.
async fn two_connected_pages(fragment: &str) -> Result<(Stack, Browser, Page, Page)> {
    let stack = Stack::start(2).await?;
    let url = format!(
        "https://localhost:{}/{fragment}",
        stack.lb.addr("https").port()
    );
    let browser = Browser::launch(&stack.ca_file()).await?;
    let page1 = browser.open(&url).await?;
    let page2 = browser.open(&url).await?;
    let connected = "document.getElementById('state').dataset.state === 'connected'";
    page1.wait_for(connected, WITHIN).await?;
    page2.wait_for(connected, WITHIN).await?;
    Ok((stack, browser, page1, page2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_typed_in_one_page_appears_in_both() -> Result<()> {
    let (stack, _browser, page1, page2) = two_connected_pages("").await?;
    // Both pages hold a WebSocket tunnel through lb (which app each is on depends on how the
    // page's other requests interleaved with round-robin; crossing apps is stack.rs's job).
    stack.tunnels(2).await?;

    // Markup in a message must be shown as text, never run or rendered.
    let content = "hello from page 1 <b>not bold</b>";
    page1.type_into("name", "alice").await?;
    page1.type_into("content", content).await?;
    page1.press_enter().await?;

    let shows = format!(
        "document.getElementById('messages').textContent.includes({content:?}) && \
         document.getElementById('messages').textContent.includes('alice') && \
         document.querySelectorAll('#messages b').length === 0"
    );
    page1.wait_for(&shows, WITHIN).await?;
    page2.wait_for(&shows, WITHIN).await?;
    // Sending cleared the message field and kept the name.
    let fields = page1
        .eval(
            "document.getElementById('content').value + '|' + document.getElementById('name').value",
        )
        .await?;
    assert_eq!(fields, "|alice");

    let dir = screenshot_dir();
    let one = page1.screenshot(&dir.join("page1.png")).await?;
    let two = page2.screenshot(&dir.join("page2.png")).await?;
    println!("screenshots: {} {}", one.display(), two.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_whose_app_dies_resumes_and_shows_every_message_once() -> Result<()> {
    let mut stack = Stack::start(2).await?;
    let url = format!("https://localhost:{}/", stack.lb.addr("https").port());
    let browser = Browser::launch(&stack.ca_file()).await?;
    let page = browser.open(&url).await?;
    let connected = "document.getElementById('state').dataset.state === 'connected'";
    page.wait_for(connected, WITHIN).await?;
    let tunnels = stack.tunnels(1).await?;
    let (dies, lives) = if tunnels[0] == 1 { (0, 1) } else { (1, 0) };
    // The sender is attached to the other app directly, so it outlives the page's app.
    let survivor = format!("ws://{}/ws", stack.apps[lives].addr("http"));
    let mut sender = ChatClient::connect(&survivor, None).await?;
    sender.send("bob", "before").await?;
    let shows =
        |text: &str| format!("document.getElementById('messages').textContent.includes({text:?})");
    page.wait_for(&shows("before"), WITHIN).await?;

    // lb is stopped (SIGSTOP) while the page's app dies and the messages are sent: the page
    // cannot see the loss, nor reconnect, before all three are in the history, so they can only
    // reach it through its resume once lb goes on (SIGCONT).
    stack.lb.signal("STOP")?;
    stack.apps[dies].kill().await;
    for i in 1..=3 {
        sender.send("bob", &format!("away-{i}")).await?;
    }
    // The survivor's own copy of the last one: all three are published.
    loop {
        if sender.recv().await?["content"] == "away-3" {
            break;
        }
    }
    stack.lb.signal("CONT")?;
    page.wait_for(&shows("away-3"), WITHIN).await?;
    page.wait_for(connected, WITHIN).await?;
    sender.send("bob", "after").await?;
    page.wait_for(&shows("after"), WITHIN).await?;

    let contents = page
        .eval(
            "Array.from(document.querySelectorAll('#messages .content'))\
             .map(function (e) { return e.textContent; }).join('|')",
        )
        .await?;
    assert_eq!(contents, "before|away-1|away-2|away-3|after");
    let notes = page
        .eval("document.querySelectorAll('#messages li.note').length")
        .await?;
    assert_eq!(notes, 0, "the page said messages may be missing");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_page_sees_the_other_appear_and_leave() -> Result<()> {
    let (_stack, _browser, page1, page2) = two_connected_pages("#room=presence").await?;
    // An anonymous page is shown under the name of its last message.
    for (page, name) in [(&page1, "alice"), (&page2, "bob")] {
        page.type_into("name", name).await?;
        page.type_into("content", &format!("hi, {name} here"))
            .await?;
        page.press_enter().await?;
    }
    let here =
        |text: &str| format!("document.getElementById('here').textContent.includes({text:?})");
    for page in [&page1, &page2] {
        page.wait_for(&format!("{} && {}", here("alice"), here("bob")), WITHIN)
            .await?;
        page.wait_for(&here("2 here"), WITHIN).await?;
    }
    let dir = screenshot_dir();
    let shot = page1.screenshot(&dir.join("presence.png")).await?;
    println!("screenshot: {}", shot.display());
    // Page 2 leaves for another room: page 1 sees bob leave.
    page2.eval("location.hash = '#room=elsewhere'").await?;
    page1
        .wait_for(&format!("!{} && {}", here("bob"), here("1 here")), WITHIN)
        .await?;
    Ok(())
}
