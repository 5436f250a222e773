//! A client that never reads is disconnected once its queue is full, while the others keep
//! receiving every message.

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
