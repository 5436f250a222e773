//! The wire protocols of the chat stacks `bench fanout` loads: how a client joins once its
//! WebSocket is open, how a sender frames a chat message, and what an incoming text frame is.
//!
//! - [`Protocol::Chat`]: scaleout's and the original simple-chat's, `{"name","content"}` text
//!   frames in, `{"time","name","content"}` out; nothing to join (in token mode, the
//!   `{"token"}` frame, answered `{"auth":"ok"}`).
//! - [`Protocol::SocketIo`]: Socket.IO v5 over Engine.IO v4's WebSocket transport
//!   (`/socket.io/?EIO=4&transport=websocket`): the server opens with `0{...}`, the client joins
//!   the main namespace with `40` and waits for `40{...}`; events are `42["chat",{...}]`
//!   (a trailing offset when connection state recovery is on); the server's ping `2` is answered
//!   with `3`. With recovery the connect answer carries a private session id (`pid`): a client
//!   that reconnects joins with `40{"pid":...,"offset":...}` (its [`Session`]) and the server
//!   sends what it missed.
//! - [`Protocol::Pusher`]: Pusher channels (protocol 7): after `pusher:connection_established` the
//!   client sends `pusher:subscribe` for [`PUSHER_CHANNEL`] and waits for
//!   `pusher_internal:subscription_succeeded`; messages arrive as `{"event":"chat","data":"..."}`
//!   with the chat JSON as the data string; they are triggered through the HTTP events API
//!   ([`crate::pusher`]), not over the WebSocket; `pusher:ping` is answered with `pusher:pong`.

use std::borrow::Cow;
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Ws;

/// The channel every Pusher client subscribes to and every message is triggered on.
pub const PUSHER_CHANNEL: &str = "bench";
/// The event name of a chat message in Socket.IO and Pusher.
const EVENT: &str = "chat";
/// Longest wait for the server's side of a join.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Which protocol the clients speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Protocol {
    /// `{"name","content"}` text frames (scaleout, simple-chat, Node `ws`).
    #[default]
    Chat,
    /// Socket.IO v5 over Engine.IO v4, WebSocket transport.
    #[value(name = "socketio")]
    SocketIo,
    /// Pusher channels; messages triggered through the HTTP events API.
    Pusher,
}

/// What a client keeps to recover missed messages when it reconnects: Socket.IO's private
/// session id and the offset of the last event received (empty for the other protocols).
#[derive(Debug, Default)]
pub struct Session {
    pid: Option<String>,
    offset: Option<String>,
    /// The chat in token mode: the token this client signs in with.
    pub token: Option<String>,
}

impl Session {
    /// Keeps the offset of a received message when `keep` (a client that may reconnect), and
    /// passes the frame on.
    pub fn note<'a>(&mut self, incoming: Incoming<'a>, keep: bool) -> Incoming<'a> {
        if keep
            && let Incoming::Message {
                offset: Some(offset),
                ..
            } = &incoming
        {
            self.offset = Some(offset.to_string());
        }
        incoming
    }
}

/// The connect answer of a Socket.IO namespace.
#[derive(Deserialize)]
struct Connected {
    #[serde(default)]
    pid: Option<String>,
}

/// What an incoming text frame turned out to be.
#[derive(Debug, PartialEq)]
pub enum Incoming<'a> {
    /// A chat message: its `content`, and its offset where the server gives one (Socket.IO with
    /// connection state recovery).
    Message {
        content: Cow<'a, str>,
        offset: Option<&'a str>,
    },
    /// The server refused something (`{"error":...}`, `pusher:error`, a Socket.IO error packet).
    Error,
    /// A keep-alive the client must answer with this text frame.
    Reply(&'static str),
    /// Anything else.
    Other,
}

/// The chat JSON as every stack sends it (time and name are not needed).
#[derive(Deserialize)]
struct ChatFrame<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    error: Option<Cow<'a, str>>,
}

/// The envelope of a Pusher frame.
#[derive(Deserialize)]
struct PusherEvent<'a> {
    #[serde(borrow)]
    event: Cow<'a, str>,
}

/// The envelope of a Pusher channel event, whose data is a string.
#[derive(Deserialize)]
struct PusherData<'a> {
    #[serde(borrow)]
    data: Cow<'a, str>,
}

impl Protocol {
    /// Joins after the WebSocket handshake: Socket.IO's namespace connect (recovering the
    /// session's missed messages when it has a session id and an offset), Pusher's subscribe.
    pub async fn join(self, ws: &mut Ws, session: &mut Session) -> anyhow::Result<()> {
        match self {
            Self::Chat => match &session.token {
                None => Ok(()),
                Some(token) => {
                    let frame = serde_json::json!({ "token": token }).to_string();
                    ws.send(Message::text(frame))
                        .await
                        .context("sending the token")?;
                    let answer = next_text(ws).await?;
                    if !answer.contains(r#""auth":"ok""#) {
                        bail!("token refused: {answer:.200}");
                    }
                    Ok(())
                }
            },
            Self::SocketIo => {
                let open = next_text(ws).await?;
                if !open.starts_with('0') {
                    bail!("Socket.IO: expected the Engine.IO open packet, got {open:.80}");
                }
                let connect = match (&session.pid, &session.offset) {
                    (Some(pid), Some(offset)) => {
                        format!("40{}", serde_json::json!({"pid": pid, "offset": offset}))
                    }
                    _ => "40".to_string(),
                };
                ws.send(Message::text(connect))
                    .await
                    .context("Socket.IO connect")?;
                loop {
                    let text = next_text(ws).await?;
                    if let Some(answer) = text.strip_prefix("40") {
                        if let Ok(Connected { pid: Some(pid) }) = serde_json::from_str(answer) {
                            session.pid = Some(pid);
                        }
                        return Ok(());
                    }
                    if text.starts_with("44") {
                        bail!("Socket.IO: connect refused: {text:.200}");
                    }
                }
            }
            Self::Pusher => {
                let established = next_text(ws).await?;
                if event_of(&established).as_deref() != Some("pusher:connection_established") {
                    bail!("Pusher: expected pusher:connection_established, got {established:.200}");
                }
                let subscribe = format!(
                    r#"{{"event":"pusher:subscribe","data":{{"channel":"{PUSHER_CHANNEL}"}}}}"#
                );
                ws.send(Message::text(subscribe))
                    .await
                    .context("Pusher subscribe")?;
                loop {
                    let text = next_text(ws).await?;
                    match event_of(&text).as_deref() {
                        Some("pusher_internal:subscription_succeeded") => return Ok(()),
                        Some("pusher:error") => bail!("Pusher: subscribe refused: {text:.200}"),
                        _ => {}
                    }
                }
            }
        }
    }

    /// The text frame that sends one chat message over the WebSocket; `None` where messages are
    /// triggered another way (Pusher's HTTP API).
    pub fn frame(self, name: &str, content: &str) -> Option<String> {
        let chat = format!(r#"{{"name":"{name}","content":"{content}"}}"#);
        match self {
            Self::Chat => Some(chat),
            Self::SocketIo => Some(format!(r#"42["{EVENT}",{chat}]"#)),
            Self::Pusher => None,
        }
    }

    /// What an incoming text frame is.
    pub fn decode(self, text: &str) -> Incoming<'_> {
        match self {
            Self::Chat => chat_message(text),
            Self::SocketIo => {
                if text == "2" {
                    return Incoming::Reply("3");
                }
                if text.starts_with("44") {
                    return Incoming::Error;
                }
                let Some(args) = text.strip_prefix(r#"42[""#) else {
                    return Incoming::Other;
                };
                let Some(payload) = args
                    .strip_prefix(EVENT)
                    .and_then(|rest| rest.strip_prefix(r#"","#))
                else {
                    return Incoming::Other;
                };
                // The chat object comes first; an offset and the closing bracket may follow it.
                let mut stream =
                    serde_json::Deserializer::from_str(payload).into_iter::<ChatFrame<'_>>();
                match stream.next() {
                    Some(Ok(ChatFrame {
                        content: Some(content),
                        ..
                    })) => {
                        let offset = payload[stream.byte_offset()..]
                            .strip_prefix(",\"")
                            .and_then(|rest| rest.strip_suffix("\"]"));
                        Incoming::Message { content, offset }
                    }
                    _ => Incoming::Other,
                }
            }
            Self::Pusher => match event_of(text).as_deref() {
                Some(EVENT) => match serde_json::from_str::<PusherData<'_>>(text) {
                    Ok(PusherData { data }) => match chat_message(&data) {
                        Incoming::Message { content, .. } => Incoming::Message {
                            content: Cow::Owned(content.into_owned()),
                            offset: None,
                        },
                        _ => Incoming::Other,
                    },
                    Err(_) => Incoming::Other,
                },
                Some("pusher:ping") => Incoming::Reply(r#"{"event":"pusher:pong","data":{}}"#),
                Some("pusher:error") => Incoming::Error,
                _ => Incoming::Other,
            },
        }
    }
}

/// A chat JSON frame: its content, or an error answer.
fn chat_message(text: &str) -> Incoming<'_> {
    match serde_json::from_str::<ChatFrame<'_>>(text) {
        Ok(ChatFrame { error: Some(_), .. }) => Incoming::Error,
        Ok(ChatFrame {
            content: Some(content),
            ..
        }) => Incoming::Message {
            content,
            offset: None,
        },
        _ => Incoming::Other,
    }
}

/// The `event` of a Pusher frame.
fn event_of(text: &str) -> Option<Cow<'_, str>> {
    serde_json::from_str::<PusherEvent<'_>>(text)
        .ok()
        .map(|e| e.event)
}

/// The next text frame, within [`JOIN_TIMEOUT`].
async fn next_text(ws: &mut Ws) -> anyhow::Result<String> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    loop {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .context("no answer to the join in time")?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(text.as_str().to_owned()),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(e).context("reading the join answer"),
            None => bail!("the server closed the connection while joining"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message<'a>(content: &'a str, offset: Option<&'a str>) -> Incoming<'a> {
        Incoming::Message {
            content: content.into(),
            offset,
        }
    }

    #[test]
    fn a_session_keeps_the_last_offset_only_when_asked() {
        let mut session = Session::default();
        session.note(message("c", Some("1-0")), false);
        assert_eq!(session.offset, None);
        session.note(message("c", Some("2-0")), true);
        session.note(message("c", None), true);
        assert_eq!(session.offset.as_deref(), Some("2-0"));
    }

    #[test]
    fn chat_frames_and_messages() {
        assert_eq!(
            Protocol::Chat.frame("n", "c").as_deref(),
            Some(r#"{"name":"n","content":"c"}"#)
        );
        assert_eq!(
            Protocol::Chat.decode(r#"{"time":"t","name":"n","content":"c"}"#),
            message("c", None)
        );
        assert_eq!(
            Protocol::Chat.decode(r#"{"error":"slow down"}"#),
            Incoming::Error
        );
        assert_eq!(Protocol::Chat.decode("junk"), Incoming::Other);
    }

    #[test]
    fn socketio_events_with_and_without_an_offset_pings_and_errors() {
        assert_eq!(
            Protocol::SocketIo.frame("n", "c").as_deref(),
            Some(r#"42["chat",{"name":"n","content":"c"}]"#)
        );
        assert_eq!(
            Protocol::SocketIo.decode(r#"42["chat",{"time":"t","name":"n","content":"c"}]"#),
            message("c", None)
        );
        assert_eq!(
            Protocol::SocketIo.decode(r#"42["chat",{"name":"n","content":"c"},"1733-0"]"#),
            message("c", Some("1733-0"))
        );
        assert_eq!(Protocol::SocketIo.decode("2"), Incoming::Reply("3"));
        assert_eq!(
            Protocol::SocketIo.decode(r#"44{"message":"no"}"#),
            Incoming::Error
        );
        assert_eq!(
            Protocol::SocketIo.decode(r#"42["other",{"content":"c"}]"#),
            Incoming::Other
        );
        assert_eq!(Protocol::SocketIo.decode(r#"42["chat","#), Incoming::Other);
    }

    #[test]
    fn pusher_events_pings_and_errors() {
        assert_eq!(Protocol::Pusher.frame("n", "c"), None);
        let event =
            r#"{"event":"chat","channel":"bench","data":"{\"name\":\"n\",\"content\":\"c\"}"}"#;
        assert_eq!(Protocol::Pusher.decode(event), message("c", None));
        assert_eq!(
            Protocol::Pusher.decode(r#"{"event":"pusher:ping","data":{}}"#),
            Incoming::Reply(r#"{"event":"pusher:pong","data":{}}"#)
        );
        assert_eq!(
            Protocol::Pusher.decode(r#"{"event":"pusher:error","data":{"code":4100}}"#),
            Incoming::Error
        );
        assert_eq!(
            Protocol::Pusher.decode(r#"{"event":"chat","data":"not json"}"#),
            Incoming::Other
        );
        assert_eq!(Protocol::Pusher.decode("[]"), Incoming::Other);
    }
}
