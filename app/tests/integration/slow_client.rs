//! A client that never reads is disconnected once its queue is full, while the others keep
//! receiving every message; one that reads late gets everything queued for it, intact and in
//! order.

use crate::support::{App, Ended, assert_chat_shape};

/// Enough bytes to fill the kernel's socket buffers on loopback (several MiB each way) and
/// then the small queue of the client that does not read.
const MESSAGES: usize = 600;
const CONTENT_CHARS: usize = 60_000;

#[tokio::test]
async fn a_client_that_never_reads_is_closed_and_the_others_get_everything() {
    let app = App::start(
        "max_frame_bytes = 70000\nmax_content_chars = 60000\nclient_queue = 4\n\
         messages_per_second = 100000\nmessages_burst = 100000",
    )
    .await;
    let mut stalled = app.connect().await;
    let mut sender = app.connect().await;
    let mut watcher = app.connect().await;

    // Lockstep: every message reaches both readers before the next is sent, all the while the
    // stalled client's buffers and then its queue fill up behind it.
    let content = "x".repeat(CONTENT_CHARS);
    for i in 0..MESSAGES {
        let name = format!("n{i}");
        sender.say(&name, &content).await;
        assert_eq!(assert_chat_shape(&sender.text().await).name, name);
        assert_eq!(assert_chat_shape(&watcher.text().await).name, name);
    }
    // The stalled client was cut off: it finds what was buffered for it, then the end.
    let ended = stalled.ended(MESSAGES - 1).await;
    assert!(
        matches!(ended, Ended::Closed(app::CLOSE_TOO_SLOW) | Ended::Dropped),
        "{ended:?}"
    );
    // The others are still connected and served.
    sender.say("after", "still here").await;
    assert_eq!(
        assert_chat_shape(&watcher.text().await).content,
        "still here"
    );
}

#[tokio::test]
async fn messages_queued_for_a_client_that_reads_late_arrive_intact_and_in_order() {
    let app =
        App::start("max_content_chars = 12000\nmessages_per_second = 1000\nmessages_burst = 1000")
            .await;
    let mut late = app.connect().await;
    let mut sender = app.connect().await;
    // Sent back to back, so messages pile up for `late` and leave in batches; sizes below,
    // around and well above the write buffer, so frames are cut across writes.
    let sizes = [1, 90, 1000, 1100, 3000, 11_000];
    let contents: Vec<String> = (0..48)
        .map(|i| format!("{i:02}:{}", "x".repeat(sizes[i % sizes.len()])))
        .collect();
    for content in &contents {
        sender.say("ann", content).await;
    }
    for content in &contents {
        assert_eq!(assert_chat_shape(&sender.text().await).content, *content);
    }
    for content in &contents {
        assert_eq!(assert_chat_shape(&late.text().await).content, *content);
    }
}
