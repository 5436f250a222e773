//! The chat page in a real browser: headless Chromium opens two pages at
//! `https://localhost:PORT/` through `lb` (trusting the CA from `lb certs generate`), a name and a
//! message typed into page 1 and sent with Enter appear in both pages, shown as text. Screenshots
//! of both pages are saved under `target/browser/` for people to look at.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use tests::browser::Browser;
use tests::stack::Stack;

const WITHIN: Duration = Duration::from_secs(15);

fn screenshot_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_typed_in_one_page_appears_in_both() -> Result<()> {
    let stack = Stack::start(2).await?;
    let url = format!("https://localhost:{}/", stack.lb.addr("https").port());
    let browser = Browser::launch(&stack.ca_file()).await?;
    let page1 = browser.open(&url).await?;
    let page2 = browser.open(&url).await?;
    let connected = "document.getElementById('state').dataset.state === 'connected'";
    page1.wait_for(connected, WITHIN).await?;
    page2.wait_for(connected, WITHIN).await?;
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
