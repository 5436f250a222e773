//! The WebSocket endpoint `/ws`: admission, then one task per connection.
//!
//! [`upgrade`] admits a handshake or refuses it with an HTTP status: 503 while draining, at
//! `max_connections`, before the instance first subscribed to Redis, or for a room beyond
//! `max_rooms`; 403 for a foreign `Origin`; 400 for a query string that is not one or a room
//! name that is not one. An admitted connection is a member of its room (`?room=NAME`, see
//! `rooms`; none is the default room) and in the room's fan-out before the handshake is
//! answered, so that whatever is published after the client got its `101` reaches it. It runs
//! [`serve`], one task that first waits until the room is ready (its channel subscribed: at
//! most [`ROOM_READY_TIMEOUT`], then 1013), then, for a client that asked to resume
//! (`?resume`, or `?epoch=E&last=ID`; see [`WsQuery`]), sends the [`protocol::ResumeNotice`]
//! and the messages of its room it missed, then does three things until the client leaves or
//! is told to go:
//! - frames from the client: an empty text frame is a heartbeat and needs no answer; any other
//!   goes through the rate limit, [`protocol::parse_incoming`], stamp, then
//!   [`Room::publish`] in its room (answered with `{"ack": cid, …}` when the frame had a
//!   `cid`); a problem is answered with `{"error": …}` to this client alone and the connection
//!   stays open; a frame over the size limit closes with 1009, invalid UTF-8 with 1007;
//! - messages from the fan-out queue: written to the client, in order, minus those up to the
//!   position the resume notice gave (sent with it, or older than the client's start);
//! - `stop`: cancelled by the fan-out when the queue is full or this instance lost track of the
//!   room's channel (close 1013, the page reconnects and resumes) or by shutdown (close 1001);
//! - a ping every `ping_interval`: a client that sent nothing since the previous one, not even
//!   its pong, is unreachable and let go.
//!
//! Buffers are small (a 4 KiB read buffer; a 1 KiB write buffer, allocated at the first
//! message, in which the frames of one batch collect until the flush) so that many idle
//! connections stay cheap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::extract::Query;
use axum::extract::State;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocketUpgrade, close_code};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::AppState;
use crate::fanout::{Delivery, Eviction, Member};
use crate::history::Resume;
use crate::origin;
use crate::position::{MAX_EPOCH_CHARS, MessageId, Position};
use crate::protocol::{self, ChatMessage, InputError, ResumeNotice};
use crate::rate_limit::TokenBucket;
use crate::rooms::{Membership, Room, parse_room};

/// Read buffer per connection; axum's default is 128 KiB, which idle connections would hold.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Write buffer per connection: the frames of a batch (see [`write_queued`]) collect here and
/// leave in one write at the flush, or as soon as more than this is waiting, instead of one
/// write per frame. Small because it keeps the capacity of the largest batch it has held:
/// 8 KiB cost ~9 KiB more per connection that once fell behind, 1 KiB (about one TCP segment,
/// some eight chat messages) ~1 KiB.
pub const WRITE_BUFFER_BYTES: usize = 1024;
/// Queued messages written to the socket before one flush.
const WRITE_BATCH: usize = 64;
/// How long a close frame (and the client's answer) may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a client of a room this instance has not subscribed to yet waits for the
/// subscription before it is closed with 1013 (and tries again).
pub const ROOM_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Close code for a client that cannot keep up: "try again later"; the page reconnects.
pub const CLOSE_TOO_SLOW: u16 = close_code::AGAIN;

/// The query string of `/ws`: `?room=NAME` for a room (none, or empty, for the default room);
/// `?resume` for a fresh client that wants a position to resume from later, `?epoch=E&last=ID`
/// to resume after `ID` (a position in that room); none of these for the original protocol.
#[derive(Debug, Default, serde::Deserialize)]
pub struct WsQuery {
    room: Option<String>,
    resume: Option<String>,
    epoch: Option<String>,
    last: Option<String>,
}

/// What a connecting client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resuming {
    /// The original protocol: no notice, live messages only.
    No,
    /// A position to resume from later, nothing to recover.
    Fresh,
    /// Everything after this position.
    From(Position),
    /// A position that cannot be one (the reason is told to the client).
    Malformed(&'static str),
}

impl WsQuery {
    fn resuming(self) -> Resuming {
        match (self.epoch, self.last) {
            (None, None) if self.resume.is_some() => Resuming::Fresh,
            (None, None) => Resuming::No,
            (Some(epoch), Some(last)) => {
                let epoch_ok = !epoch.is_empty()
                    && epoch.len() <= MAX_EPOCH_CHARS
                    && epoch.bytes().all(|b| b.is_ascii_graphic());
                match last.parse::<MessageId>() {
                    Ok(last) if epoch_ok => Resuming::From(Position { epoch, last }),
                    Ok(_) => Resuming::Malformed("`epoch` is not an epoch this server gave"),
                    Err(_) => Resuming::Malformed("`last` is not a message id (<ms>-<seq>)"),
                }
            }
            _ => Resuming::Malformed("resuming needs both `epoch` and `last`"),
        }
    }
}

/// `GET /ws`: admission checks, then the upgrade.
pub async fn upgrade(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    query: Result<Query<WsQuery>, QueryRejection>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let peer = peer.map_or_else(|| "-".to_owned(), |Extension(ConnectInfo(a))| a.to_string());
    // Behind lb the peer is lb; the client's own address is in X-Forwarded-For.
    let forwarded_for = headers
        .get("x-forwarded-for")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    if state.is_draining() {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
    if !state.broker().accepts_clients() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: not connected to Redis yet\n",
        )
            .into_response();
    }
    let (room, resuming) = match query {
        Ok(Query(mut query)) => {
            let room = query.room.take();
            match parse_room(room.as_deref()) {
                Ok(room) => (room.map(str::to_owned), query.resuming()),
                Err(e) => {
                    tracing::info!(%peer, %forwarded_for, room = ?room, "WebSocket refused: invalid room name");
                    return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
                }
            }
        }
        Err(e) => {
            tracing::info!(%peer, %forwarded_for, error = %e, "WebSocket refused: bad query string");
            return (StatusCode::BAD_REQUEST, format!("{e}\n")).into_response();
        }
    };
    let Ok(request_origin) = headers.get(header::ORIGIN).map(|v| v.to_str()).transpose() else {
        let origin = headers.get(header::ORIGIN);
        tracing::warn!(%peer, %forwarded_for, ?origin, "WebSocket refused: Origin header is not ASCII text");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    if !origin::allowed(request_origin, host, &state.config().allowed_origins) {
        tracing::warn!(%peer, %forwarded_for, origin = ?request_origin, host = ?host, "WebSocket refused: origin not allowed");
        return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
    }
    let Some(slot) = Slot::acquire(&state) else {
        tracing::warn!(%peer, %forwarded_for, limit = state.config().limits.max_connections, "WebSocket refused: connection limit reached");
        return (StatusCode::SERVICE_UNAVAILABLE, "too many connections\n").into_response();
    };
    let membership = match state.rooms().join(room.as_deref()).await {
        Ok(membership) => membership,
        Err(e) => {
            tracing::warn!(%peer, %forwarded_for, room = ?room, error = %e, "WebSocket refused: cannot join the room");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
    };
    // In the room's fan-out before the client hears 101: whatever is published after its
    // handshake is queued for it.
    let member = membership
        .room()
        .fanout()
        .join(state.close_all().child_token());
    let tracked = state.tracker().token();
    let max_frame = state.config().limits.max_frame_bytes;
    let span =
        tracing::info_span!("ws", %peer, %forwarded_for, channel = %membership.room().channel());
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_frame_size(max_frame)
        .max_message_size(max_frame)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"))
        .on_upgrade(move |socket| {
            async move {
                let _slot = slot;
                let _tracked = tracked;
                serve(socket, state, membership, member, resuming).await;
            }
            .instrument(span)
        })
}

/// One of `max_connections`, given back when dropped.
struct Slot(AppState);

impl Slot {
    fn acquire(state: &AppState) -> Option<Slot> {
        let limit = state.config().limits.max_connections;
        state
            .connections()
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(state.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.connections().fetch_sub(1, Ordering::AcqRel);
    }
}

/// Why a connection loop ended.
enum End {
    /// The client closed or the connection broke: nothing more to send.
    Gone,
    /// `stop` was cancelled: shutdown (1001) or a full queue (1013).
    Stopped,
    /// The client broke a limit or the protocol: close with this frame.
    Refused(CloseFrame),
    /// A resume could not read the history: close with 1013, the client tries again.
    HistoryUnavailable,
    /// The room did not become ready in time: close with 1013, the client tries again.
    RoomUnavailable,
}

/// Runs one connection of a member of a room (`member`: its place in the room's fan-out, taken
/// before the handshake was answered) until the client leaves or is told to go.
async fn serve<S>(
    mut socket: S,
    state: AppState,
    membership: Membership,
    mut member: Member,
    resuming: Resuming,
) where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let limits = &state.config().limits;
    let room = Arc::clone(membership.room());
    // The member joined before the history is read: whatever is published from then on is
    // queued, and what the resume sends as well is skipped when it comes out of the queue.
    let stop = member.stop.clone();
    // A room new to this instance: the subscriber subscribes to its channel and catches up
    // into the queue from the room's start, read before its first member joined, so nothing
    // published after this member joined is missed. The client is not served (no frame read,
    // no resume) until then.
    if !room.is_ready() {
        let ready = tokio::select! {
            ready = room.ready_within(ROOM_READY_TIMEOUT) => ready,
            () = stop.cancelled() => false,
        };
        if !ready {
            let end = if stop.is_cancelled() {
                End::Stopped
            } else {
                End::RoomUnavailable
            };
            finish(&mut socket, &state, end, member.evicted.get().copied()).await;
            return;
        }
    }
    let skip_through = match resume(&mut socket, &room, resuming, &stop).await {
        Ok(skip_through) => skip_through,
        Err(end) => {
            finish(&mut socket, &state, end, member.evicted.get().copied()).await;
            return;
        }
    };
    let bucket = TokenBucket::new(limits.messages_per_second, limits.messages_burst);
    tracing::debug!(clients = room.fanout().len(), "WebSocket open");
    // A ping every interval; a client that sent nothing since the last one (not even its pong)
    // is unreachable and let go.
    let interval = state.config().ping_interval;
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = true;

    let end = loop {
        // In this order: stop, then the client's queue, then its next frame. Writing before
        // reading keeps a client that sends fast from filling (and overflowing) its own queue.
        tokio::select! {
            biased;
            () = stop.cancelled() => break End::Stopped,
            queued = member.rx.recv() => {
                let Some(first) = queued else { break End::Stopped };
                let fresh = |d: &Delivery| skip_through.is_none_or(|s| d.id.is_none_or(|id| id > s));
                if let Err(end) = write_queued(&mut socket, first, &mut member.rx, fresh, &stop).await {
                    break end;
                }
            }
            frame = socket.next() => {
                heard = true;
                let reply = match frame {
                    None => break End::Gone,
                    Some(Err(e)) => break refusal(e, limits.max_frame_bytes),
                    // An empty text frame is a client's heartbeat: it proves its path works
                    // (sending it is how a client finds out that its path is gone) and needs
                    // no answer. It spends from the rate limit like any frame, silently.
                    Some(Ok(Message::Text(text))) if text.is_empty() => {
                        bucket.allow();
                        None
                    }
                    Some(Ok(Message::Text(text))) if !bucket.allow() => {
                        Some(rate_limited(&state, &text))
                    }
                    Some(Ok(Message::Binary(_))) if !bucket.allow() => {
                        Some(rate_limited(&state, ""))
                    }
                    Some(Ok(Message::Text(text))) => accept(&text, &state, &room, &stop).await,
                    Some(Ok(Message::Binary(_))) => {
                        Some(protocol::error_json(&InputError::Binary.to_string(), None, false))
                    }
                    // Pings are answered by the WebSocket layer; a close is answered there too,
                    // after which the stream ends.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => None,
                };
                if let Some(reply) = reply {
                    if let Err(end) = send(&mut socket, Message::Text(reply.into()), &stop).await {
                        break end;
                    }
                }
            }
            _ = pings.tick() => {
                if !heard {
                    tracing::info!(?interval, "letting go of a client that did not answer a ping");
                    break End::Gone;
                }
                heard = false;
                if let Err(end) = send(&mut socket, Message::Ping(Default::default()), &stop).await {
                    break end;
                }
            }
        }
    };
    finish(&mut socket, &state, end, member.evicted.get().copied()).await;
}

/// Closes the connection as `end` requires.
async fn finish<S>(socket: &mut S, state: &AppState, end: End, evicted: Option<Eviction>)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = match end {
        End::Gone => None,
        End::Refused(frame) => Some(frame),
        End::Stopped if state.close_all().is_cancelled() => Some(CloseFrame {
            code: close_code::AWAY,
            reason: Utf8Bytes::from_static("server shutting down"),
        }),
        End::Stopped => Some(match evicted {
            Some(Eviction::Gap) => CloseFrame {
                code: CLOSE_TOO_SLOW,
                reason: Utf8Bytes::from_static("message stream interrupted; reconnect to resume"),
            },
            Some(Eviction::TooSlow) | None => {
                tracing::info!("closing a client that cannot keep up (queue full)");
                CloseFrame {
                    code: CLOSE_TOO_SLOW,
                    reason: Utf8Bytes::from_static("too slow: message queue full; reconnect"),
                }
            }
        }),
        End::HistoryUnavailable => Some(CloseFrame {
            code: CLOSE_TOO_SLOW,
            reason: Utf8Bytes::from_static("message history unreachable; reconnect shortly"),
        }),
        End::RoomUnavailable => {
            tracing::info!(timeout = ?ROOM_READY_TIMEOUT, "the room was not subscribed in time");
            Some(CloseFrame {
                code: CLOSE_TOO_SLOW,
                reason: Utf8Bytes::from_static("room not available yet; reconnect shortly"),
            })
        }
    };
    if let Some(frame) = frame {
        tracing::debug!(code = frame.code, reason = %frame.reason, "closing WebSocket");
        close(socket, frame).await;
    }
    tracing::debug!("WebSocket closed");
}

/// For a client that asked to resume: the notice and the missed messages of its room. Returns
/// the id up to which queued messages were sent already.
async fn resume<S>(
    socket: &mut S,
    room: &Room,
    resuming: Resuming,
    stop: &CancellationToken,
) -> Result<Option<MessageId>, End>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let (from, malformed) = match resuming {
        Resuming::No => return Ok(None),
        Resuming::Fresh => (None, None),
        Resuming::From(position) => (Some(position), None),
        Resuming::Malformed(reason) => (None, Some(reason)),
    };
    let read = tokio::select! {
        read = room.resume(from.as_ref()) => read,
        () = stop.cancelled() => return Err(End::Stopped),
    };
    let Resume {
        recovered,
        epoch,
        last,
        missed,
        reason,
    } = read.map_err(|_| End::HistoryUnavailable)?;
    let notice = ResumeNotice {
        recovered: recovered && malformed.is_none(),
        epoch,
        last: last.to_string(),
        missed: missed.len(),
        reason: malformed.or(reason).map(str::to_owned),
    };
    if !notice.recovered {
        tracing::info!(
            reason = notice.reason.as_deref().unwrap_or("-"),
            "a resuming client's gap cannot be filled"
        );
    }
    let write = async {
        socket.feed(Message::Text(notice.to_json().into())).await?;
        for delivery in missed {
            socket.feed(Message::Text(delivery.text)).await?;
        }
        socket.flush().await
    };
    tokio::select! {
        written = write => written.map_err(|_| End::Gone)?,
        () = stop.cancelled() => return Err(End::Stopped),
    }
    // The client now stands at `last`: what the queue holds up to it was either sent above or
    // (for a fresh or failed resume, queued between the join and the read) precedes the
    // position the client was given, and would reach it out of order.
    Ok(Some(last))
}

/// Validates, stamps and publishes a client's text frame in its room; the answer for the
/// sender, if any (an error, or the ack of a message with a `cid`).
async fn accept(
    text: &str,
    state: &AppState,
    room: &Room,
    stop: &CancellationToken,
) -> Option<String> {
    let limits = &state.config().limits;
    let mut incoming =
        match protocol::parse_incoming(text, limits.max_name_chars, limits.max_content_chars) {
            Ok(incoming) => incoming,
            Err(e) => {
                let cid = cid_of(text);
                return Some(protocol::error_json(&e.to_string(), cid.as_deref(), false));
            }
        };
    let cid = incoming.cid.take();
    let message = ChatMessage::stamp(incoming, &chrono::Local::now());
    let body = message.to_json();
    let published = tokio::select! {
        published = room.publish(&body, cid.as_deref()) => published,
        () = stop.cancelled() => return None,
    };
    match (published, cid) {
        (Ok(published), Some(cid)) => {
            Some(protocol::ack_json(&cid, published.id, &published.epoch))
        }
        (Ok(_), None) => None,
        (Err(e), cid) => Some(protocol::error_json(&e.to_string(), cid.as_deref(), true)),
    }
}

/// The `cid` of a frame that was refused, when it had a usable one, so the error names it.
fn cid_of(text: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Cid {
        cid: String,
    }
    let cid = serde_json::from_str::<Cid>(text).ok()?.cid;
    protocol::is_cid(&cid).then_some(cid)
}

/// The answer to a frame over the rate limit: with its `cid`, to be sent again later.
fn rate_limited(state: &AppState, text: &str) -> String {
    let limits = &state.config().limits;
    let reason = InputError::RateLimited {
        per_second: limits.messages_per_second,
        burst: limits.messages_burst,
    };
    protocol::error_json(&reason.to_string(), cid_of(text).as_deref(), true)
}

/// The close frame owed to a client whose frame the WebSocket layer rejected, if any.
fn refusal(error: axum::Error, max_frame_bytes: usize) -> End {
    use tungstenite_axum::error::{Error as WsError, ProtocolError};
    let error = error.into_inner();
    let frame = match error.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => CloseFrame {
            code: close_code::SIZE,
            reason: format!("frame larger than {max_frame_bytes} bytes").into(),
        },
        Some(WsError::Utf8(_)) => CloseFrame {
            code: close_code::INVALID,
            reason: Utf8Bytes::from_static("text frame is not valid UTF-8"),
        },
        Some(WsError::Protocol(
            ProtocolError::ResetWithoutClosingHandshake | ProtocolError::SendAfterClosing,
        ))
        | None => {
            tracing::debug!(error = %error, "WebSocket ended");
            return End::Gone;
        }
        Some(WsError::Protocol(e)) => CloseFrame {
            code: close_code::PROTOCOL,
            reason: format!("protocol error: {e}")
                .chars()
                .take(100)
                .collect::<String>()
                .into(),
        },
        Some(_) => {
            tracing::debug!(error = %error, "WebSocket failed");
            return End::Gone;
        }
    };
    tracing::info!(code = frame.code, reason = %frame.reason, "refusing a client frame");
    End::Refused(frame)
}

/// Writes `first` and whatever else is already queued (up to a batch), those that pass `wanted`,
/// then flushes.
async fn write_queued<S>(
    socket: &mut S,
    first: Delivery,
    rx: &mut tokio::sync::mpsc::Receiver<Delivery>,
    wanted: impl Fn(&Delivery) -> bool,
    stop: &CancellationToken,
) -> Result<(), End>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    let write = async {
        if wanted(&first) {
            socket.feed(Message::Text(first.text)).await?;
        }
        for _ in 1..WRITE_BATCH {
            let Ok(next) = rx.try_recv() else { break };
            if wanted(&next) {
                socket.feed(Message::Text(next.text)).await?;
            }
        }
        socket.flush().await
    };
    tokio::select! {
        written = write => written.map_err(|_| End::Gone),
        () = stop.cancelled() => Err(End::Stopped),
    }
}

/// Sends one message unless `stop` comes first (a client that does not read blocks the send).
async fn send<S>(socket: &mut S, message: Message, stop: &CancellationToken) -> Result<(), End>
where
    S: Sink<Message, Error = axum::Error> + Unpin,
{
    tokio::select! {
        sent = socket.send(message) => sent.map_err(|_| End::Gone),
        () = stop.cancelled() => Err(End::Stopped),
    }
}

/// Sends a close frame and waits for the client's answer, both bounded by [`CLOSE_TIMEOUT`].
async fn close<S>(socket: &mut S, frame: CloseFrame)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let handshake = async {
        if socket.send(Message::Close(Some(frame))).await.is_err() {
            return;
        }
        // Read until the client's close arrives and the stream ends.
        while let Some(Ok(_)) = socket.next().await {}
    };
    if tokio::time::timeout(CLOSE_TIMEOUT, handshake)
        .await
        .is_err()
    {
        tracing::debug!("client did not complete the close handshake in time");
    }
}

#[cfg(test)]
mod tests {
    //! `serve` over channels instead of a socket.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Config;

    /// A client's end: frames go in through `to_server`, replies come out of `from_server`.
    /// Like a socket with a write buffer, what is sent reaches the client only at a flush.
    struct FakeSocket {
        incoming: mpsc::UnboundedReceiver<Result<Message, axum::Error>>,
        unflushed: Vec<Message>,
        outgoing: mpsc::UnboundedSender<Message>,
    }

    impl Stream for FakeSocket {
        type Item = Result<Message, axum::Error>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.incoming.poll_recv(cx)
        }
    }

    impl Sink<Message> for FakeSocket {
        type Error = axum::Error;
        fn poll_ready(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            self.unflushed.push(item);
            Ok(())
        }
        fn poll_flush(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Result<(), Self::Error>> {
            let socket = &mut *self;
            let sent = socket
                .unflushed
                .drain(..)
                .try_for_each(|m| socket.outgoing.send(m));
            Poll::Ready(sent.map_err(axum::Error::new))
        }
        fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            self.poll_flush(cx)
        }
    }

    struct Client {
        to_server: mpsc::UnboundedSender<Result<Message, axum::Error>>,
        from_server: mpsc::UnboundedReceiver<Message>,
    }

    impl Client {
        fn send(&self, text: &str) {
            self.to_server.send(Ok(Message::Text(text.into()))).unwrap();
        }
        async fn text(&mut self) -> String {
            match self.from_server.recv().await.unwrap() {
                Message::Text(t) => t.to_string(),
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    async fn connect(state: &AppState) -> Client {
        connect_to(state, None).await
    }

    /// A client of `room` (`None`: the default room), in the room's fan-out when this returns
    /// (as a real client is once it has its `101`).
    async fn connect_to(state: &AppState, room: Option<&str>) -> Client {
        let (to_server, incoming) = mpsc::unbounded_channel();
        let (outgoing, from_server) = mpsc::unbounded_channel();
        let socket = FakeSocket {
            incoming,
            unflushed: Vec::new(),
            outgoing,
        };
        let membership = state.rooms().join(room).await.unwrap();
        let member = membership
            .room()
            .fanout()
            .join(state.close_all().child_token());
        tokio::spawn(serve(
            socket,
            state.clone(),
            membership,
            member,
            Resuming::No,
        ));
        Client {
            to_server,
            from_server,
        }
    }

    fn state(toml: &str) -> AppState {
        AppState::new(Config::from_toml(toml, "test").unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_message_reaches_every_client_and_bad_input_only_its_sender() {
        let state = state("");
        let mut alice = connect(&state).await;
        let mut bob = connect(&state).await;
        alice.send("not json");
        assert_eq!(
            alice.text().await,
            protocol::error_json(&InputError::NotJson.to_string(), None, false)
        );
        alice.send(r#"{"name": "alice", "content": "hi"}"#);
        let seen_by_alice = alice.text().await;
        let seen_by_bob = bob.text().await;
        assert_eq!(seen_by_alice, seen_by_bob);
        let message: ChatMessage = serde_json::from_str(&seen_by_bob).unwrap();
        assert_eq!(
            (message.name.as_str(), message.content.as_str()),
            ("alice", "hi")
        );
    }

    #[tokio::test]
    async fn binary_frames_and_floods_get_an_error_and_the_connection_stays() {
        let state = state("messages_per_second = 1\nmessages_burst = 2");
        let mut client = connect(&state).await;
        client
            .to_server
            .send(Ok(Message::Binary(vec![1, 2, 3].into())))
            .unwrap();
        assert!(client.text().await.contains("binary frames"));
        client.send("{}");
        assert!(client.text().await.contains("is missing"));
        client.send("{}");
        assert!(client.text().await.contains("too many messages"));
        assert_eq!(
            state.rooms().default_room().fanout().len(),
            1,
            "still connected"
        );
    }

    #[tokio::test]
    async fn queued_messages_are_written_in_order_and_flushed() {
        let state = state("");
        let mut client = connect(&state).await;
        // Queued before the connection task runs again, so they are written as one batch.
        let messages: Vec<String> = (0..WRITE_BATCH + 3)
            .map(|i| format!("{{\"n\":{i}}}"))
            .collect();
        for message in &messages {
            state.rooms().default_room().fanout().deliver(&Delivery {
                id: None,
                text: Utf8Bytes::from(message.as_str()),
            });
        }
        for message in &messages {
            assert_eq!(&client.text().await, message);
        }
    }

    #[tokio::test]
    async fn a_message_reaches_only_the_members_of_its_room() {
        let state = state("");
        let mut lobby = connect_to(&state, Some("lobby")).await;
        let mut also_lobby = connect_to(&state, Some("lobby")).await;
        let mut main = connect(&state).await;
        let mut other = connect_to(&state, Some("other")).await;

        lobby.send(r#"{"name": "ann", "content": "in the lobby"}"#);
        for client in [&mut lobby, &mut also_lobby] {
            let message: ChatMessage = serde_json::from_str(&client.text().await).unwrap();
            assert_eq!(message.content, "in the lobby");
        }
        // The next thing the others see is a message of their own room.
        main.send(r#"{"name": "bob", "content": "in the main room"}"#);
        other.send(r#"{"name": "cy", "content": "elsewhere"}"#);
        let message: ChatMessage = serde_json::from_str(&main.text().await).unwrap();
        assert_eq!(message.content, "in the main room");
        let message: ChatMessage = serde_json::from_str(&other.text().await).unwrap();
        assert_eq!(message.content, "elsewhere");
        // Each room has a history of its own: the lobby's first message is not the main room's.
        let lobby_room = state.rooms().join(Some("lobby")).await.unwrap();
        let resumed = lobby_room.room().resume(None).await.unwrap();
        let main_room = state.rooms().default_room().resume(None).await.unwrap();
        assert_ne!(resumed.epoch, main_room.epoch);
    }

    #[tokio::test]
    async fn shutdown_closes_with_1001() {
        let state = state("");
        let mut client = connect(&state).await;
        state.close_all().cancel();
        match client.from_server.recv().await.unwrap() {
            Message::Close(Some(frame)) => assert_eq!(frame.code, close_code::AWAY),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
