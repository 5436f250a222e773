//! A child's log lines (its stderr), kept for the test to wait on and shown with the test's
//! output: [`Log::capture`] reads them as they come, [`Log::wait_for`] waits for a line that
//! contains a text.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Notify;

/// The lines a stream carried so far; cloned handles share them.
#[derive(Clone, Debug, Default)]
pub struct Log {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Debug, Default)]
struct State {
    lines: Vec<String>,
    ended: bool,
}

impl Log {
    /// Reads `stream` line by line until it ends (every writer closed it: a child's successor
    /// that inherited it too), keeping each line and echoing it to stderr as `name: line`.
    pub fn capture(name: &str, stream: impl AsyncRead + Unpin + Send + 'static) -> Log {
        let log = Log::default();
        let shared = Arc::clone(&log.shared);
        let name = name.to_owned();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stream).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                eprintln!("{name}: {line}");
                lock(&shared).lines.push(line);
                shared.changed.notify_waiters();
            }
            lock(&shared).ended = true;
            shared.changed.notify_waiters();
        });
        log
    }

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        lock(&self.shared).lines.clone()
    }

    /// The first line that contains `text`, waiting for it at most `within`; an error if the
    /// stream ends or the time passes first.
    pub async fn wait_for(&self, text: &str, within: Duration) -> Result<String> {
        let wait = async {
            loop {
                let changed = self.shared.changed.notified();
                {
                    let state = lock(&self.shared);
                    if let Some(line) = state.lines.iter().find(|l| l.contains(text)) {
                        return Ok(line.clone());
                    }
                    if state.ended {
                        bail!("the log ended without a line containing {text:?}");
                    }
                }
                changed.await;
            }
        };
        match tokio::time::timeout(within, wait).await {
            Ok(found) => found,
            Err(_) => bail!("no log line containing {text:?} within {within:?}"),
        }
    }
}

fn lock(shared: &Shared) -> MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_line_is_found_once_written_and_an_ended_log_says_so() {
        let (reader, mut writer) = tokio::io::duplex(64);
        let log = Log::capture("test", reader);
        let waiting = {
            let log = log.clone();
            tokio::spawn(async move { log.wait_for("ready", Duration::from_secs(20)).await })
        };
        tokio::io::AsyncWriteExt::write_all(&mut writer, b"starting\nready on 1\n")
            .await
            .unwrap();
        assert_eq!(waiting.await.unwrap().unwrap(), "ready on 1");
        drop(writer);
        let err = log.wait_for("never", Duration::from_secs(20)).await;
        let text = format!("{:#}", err.unwrap_err());
        assert!(text.contains("ended without"), "{text}");
        assert_eq!(log.lines(), ["starting", "ready on 1"]);
    }
}
