//! Pusher's HTTP events API, the way a Pusher app triggers messages: each sender's messages go
//! out as signed `POST /apps/ID/events` requests over one keep-alive connection to the server
//! its WebSocket goes to (through the same proxy).
//!
//! Signing follows Pusher's HTTP API reference: the query carries `auth_key`, `auth_timestamp`,
//! `auth_version=1.0` and the body's `body_md5`; `auth_signature` is the hex HMAC-SHA256, keyed
//! with the app secret, of `POST\n/apps/ID/events\n` followed by those parameters sorted by name.

use std::str::FromStr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::Target;
use crate::protocol::PUSHER_CHANNEL;

/// A Pusher app's credentials: `ID:KEY:SECRET` on the command line.
#[derive(Debug, Clone)]
pub struct App {
    id: String,
    key: String,
    secret: String,
}

impl FromStr for App {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let mut parts = s.splitn(3, ':');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(id), Some(key), Some(secret))
                if !id.is_empty() && !key.is_empty() && !secret.is_empty() =>
            {
                Ok(Self {
                    id: id.to_string(),
                    key: key.to_string(),
                    secret: secret.to_string(),
                })
            }
            _ => bail!("--pusher-app {s}: expected ID:KEY:SECRET"),
        }
    }
}

impl App {
    /// The path of the events API.
    fn path(&self) -> String {
        format!("/apps/{}/events", self.id)
    }

    /// The signed query string of a POST of `body` at `timestamp` (Unix seconds).
    fn signed_query(&self, body: &[u8], timestamp: u64) -> String {
        let query = format!(
            "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={:x}",
            self.key,
            md5::compute(body)
        );
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.secret.as_bytes());
        let tag = ring::hmac::sign(&key, format!("POST\n{}\n{query}", self.path()).as_bytes());
        let signature: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        format!("{query}&auth_signature={signature}")
    }
}

/// The body that triggers event `chat` on the bench channel with `data` (a string, the chat JSON).
fn body(data: &str) -> String {
    serde_json::json!({"name": "chat", "channels": [PUSHER_CHANNEL], "data": data}).to_string()
}

/// One sender's way to the events API: [`Trigger::send`] queues a message, a task posts them in
/// order.
pub struct Trigger {
    queue: mpsc::UnboundedSender<String>,
}

impl Trigger {
    /// Starts the posting task on its own connection to `target`; the task ends when the
    /// trigger is dropped and returns how many posts failed.
    pub fn spawn(target: Target, app: Arc<App>) -> (Self, JoinHandle<u64>) {
        let (queue, mut rx) = mpsc::unbounded_channel::<String>();
        let task = tokio::spawn(async move {
            let mut failed = 0;
            let mut conn: Option<SendRequest<Full<Bytes>>> = None;
            while let Some(data) = rx.recv().await {
                if let Err(e) = post(&target, &app, &mut conn, &data).await {
                    eprintln!("fanout: trigger: {e:#}");
                    conn = None;
                    failed += 1;
                }
            }
            failed
        });
        (Self { queue }, task)
    }

    /// Queues one message (the chat JSON the event carries); false when the task has ended.
    pub fn send(&self, data: String) -> bool {
        self.queue.send(data).is_ok()
    }
}

/// Posts one event, (re)connecting first when there is no open connection.
async fn post(
    target: &Target,
    app: &App,
    conn: &mut Option<SendRequest<Full<Bytes>>>,
    data: &str,
) -> anyhow::Result<()> {
    let sender = match conn {
        Some(sender) if !sender.is_closed() => sender,
        _ => {
            let transport = target.transport(None).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(transport))
                    .await
                    .context("HTTP handshake with the events API")?;
            tokio::spawn(async move {
                // Ends with the connection; a failure shows in the next post.
                let _ = connection.await;
            });
            conn.insert(sender)
        }
    };
    let body = body(data);
    let timestamp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let uri = format!(
        "{}?{}",
        app.path(),
        app.signed_query(body.as_bytes(), timestamp)
    );
    let request = hyper::Request::post(uri)
        .header(hyper::header::HOST, target.authority())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .context("building the events request")?;
    sender.ready().await.context("events API connection")?;
    let response = sender
        .send_request(request)
        .await
        .context("posting an event")?;
    let status = response.status();
    let answer = response
        .into_body()
        .collect()
        .await
        .context("reading the events API answer")?
        .to_bytes();
    if !status.is_success() {
        bail!(
            "events API answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of Pusher's HTTP API reference.
    #[test]
    fn signs_like_the_worked_example() {
        let app: App = "3:278d425bdf160c739803:7ad3773142a6692b25b8"
            .parse()
            .unwrap();
        let body = r#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        assert_eq!(
            app.signed_query(body.as_bytes(), 1353088179),
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn app_credentials_need_three_parts() {
        assert!("3:k:s".parse::<App>().is_ok());
        for bad in ["3:k", "", "3::s", ":k:s"] {
            let err = bad.parse::<App>().unwrap_err();
            assert!(format!("{err}").contains("ID:KEY:SECRET"), "{bad}");
        }
    }

    #[test]
    fn the_body_carries_the_chat_json_as_a_string() {
        assert_eq!(
            body(r#"{"content":"c"}"#),
            r#"{"channels":["bench"],"data":"{\"content\":\"c\"}","name":"chat"}"#
        );
    }
}
