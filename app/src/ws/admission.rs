//! Admission to `/ws`: [`upgrade`] checks a handshake and either refuses it with an HTTP status
//! or makes the client a member of its room and hands the socket to `session`.
//!
//! Refusals: 503 while draining, at `max_connections`, before the instance first subscribed to
//! Redis, or for a room beyond `max_rooms`; 403 for a foreign `Origin`; 400 for a query string
//! that is not one or a room name that is not one. An admitted client is in its room's fan-out
//! before the handshake is answered, so whatever is published after it got its `101` reaches
//! it.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use axum::Extension;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tracing::Instrument;

use super::session::{self, Resuming};
use super::signin;
use crate::origin;
use crate::position::{MAX_EPOCH_CHARS, MessageId, Position};
use crate::protocol::parse_room;
use crate::state::AppState;

/// Read buffer per connection; axum's default is 128 KiB, which idle connections would hold.
pub const READ_BUFFER_BYTES: usize = 4 * 1024;
/// Write buffer per connection: the frames of a batch (see `session`) collect here and leave in
/// one write at the flush, or as soon as more than this is waiting, instead of one write per
/// frame. Small because it keeps the capacity of the largest batch it has held: 8 KiB cost
/// ~9 KiB more per connection that once fell behind, 1 KiB (about one TCP segment, some eight
/// chat messages) ~1 KiB.
pub const WRITE_BUFFER_BYTES: usize = 1024;

/// The query string of `/ws`: `?room=NAME` for a room (none, or empty, for the default room);
/// `?resume` for a fresh client that wants a position to resume from later, `?epoch=E&last=ID`
/// to resume after `ID` (a position in that room); `?presence` for the room's presence frames;
/// none of these for the original protocol.
#[derive(Debug, Default, serde::Deserialize)]
pub struct WsQuery {
    room: Option<String>,
    presence: Option<String>,
    resume: Option<String>,
    epoch: Option<String>,
    last: Option<String>,
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
    if !state.hub().accepts_clients() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "starting: not connected to Redis yet\n",
        )
            .into_response();
    }
    let (room, resuming, wants_presence) = match query {
        Ok(Query(mut query)) => {
            let room = query.room.take();
            let wants_presence = query.presence.is_some();
            match parse_room(room.as_deref()) {
                Ok(room) => (room.map(str::to_owned), query.resuming(), wants_presence),
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
    let tracked = state.tracker().token();
    let max_frame = state.config().limits.max_frame_bytes;
    let ws = ws
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        .max_frame_size(max_frame)
        .max_message_size(max_frame)
        .on_failed_upgrade(|e| tracing::debug!(error = %e, "WebSocket upgrade failed"));
    if state.gate().is_some() {
        // Token mode: the room is joined only once the first frame's token grants it.
        let span =
            tracing::info_span!("ws", %peer, %forwarded_for, room = room.as_deref().unwrap_or("-"));
        return ws.on_upgrade(move |socket| {
            async move {
                let _slot = slot;
                let _tracked = tracked;
                signin::serve(socket, state, room, resuming, wants_presence).await;
            }
            .instrument(span)
        });
    }
    // In the room's fan-out before the client hears 101: whatever is published after its
    // handshake is queued for it.
    let (membership, member) = match session::join(
        &state,
        room.as_deref(),
        state.close_all().child_token(),
    )
    .await
    {
        Ok(joined) => joined,
        Err(e) => {
            tracing::warn!(%peer, %forwarded_for, room = ?room, error = %e, "WebSocket refused: cannot join the room");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response();
        }
    };
    let span =
        tracing::info_span!("ws", %peer, %forwarded_for, channel = %membership.room().channel());
    ws.on_upgrade(move |socket| {
        async move {
            let _slot = slot;
            let _tracked = tracked;
            session::serve(
                socket,
                state,
                membership,
                member,
                resuming,
                wants_presence,
                None,
            )
            .await;
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
