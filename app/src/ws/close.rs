//! How a connection ends: why ([`End`]), the close code each reason sends (one named constant
//! per reason; several share the wire code 1013, "try again later", which makes the page
//! reconnect and resume), and the close handshake, bounded by [`CLOSE_TIMEOUT`].

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, close_code};
use futures_util::{Sink, SinkExt, Stream, StreamExt};

use crate::auth::{CLOSE_FORBIDDEN, CLOSE_UNAUTHORIZED, Denied};
use crate::hub::fanout::Eviction;
use crate::users::Refused;

/// How long a close frame (and the client's answer) may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// The server is shutting down: the page reconnects, to another instance.
pub const CLOSE_SHUTTING_DOWN: u16 = close_code::AWAY;
/// The client cannot keep up (its queue is full): "try again later"; the page reconnects and
/// resumes.
pub const CLOSE_TOO_SLOW: u16 = close_code::AGAIN;
/// This instance lost track of the room's channel (a gap it cannot fill): the page reconnects
/// and learns through its resume what it cannot recover.
pub const CLOSE_INTERRUPTED: u16 = close_code::AGAIN;
/// A resume could not read the history: the page tries again shortly.
pub const CLOSE_HISTORY_UNAVAILABLE: u16 = close_code::AGAIN;
/// The room was not subscribed in time: the page tries again shortly.
pub const CLOSE_ROOM_UNAVAILABLE: u16 = close_code::AGAIN;
/// A frame over `max_frame_bytes`.
pub const CLOSE_FRAME_TOO_LARGE: u16 = close_code::SIZE;
/// A text frame that is not UTF-8.
pub const CLOSE_NOT_UTF8: u16 = close_code::INVALID;
/// Any other breach of the WebSocket protocol.
pub const CLOSE_PROTOCOL_ERROR: u16 = close_code::PROTOCOL;

/// Token mode: the token expired without a refresh.
pub const CLOSE_EXPIRED: u16 = CLOSE_UNAUTHORIZED;
/// Token mode: the user holds its limit of connections already (4429 mirrors HTTP 429).
pub const CLOSE_USER_LIMIT: u16 = 4429;
/// Token mode: an operator disconnected the user (4410 mirrors HTTP 410, gone); a page does not
/// reconnect at once.
pub const CLOSE_DISCONNECTED: u16 = 4410;
/// Token mode: the user's connections could not be counted (Redis unreachable).
pub const CLOSE_USERS_UNAVAILABLE: u16 = close_code::AGAIN;
/// The longest close reason the protocol allows, in bytes.
const MAX_REASON_BYTES: usize = 123;

/// Why a connection loop ended.
pub enum End {
    /// The client closed or the connection broke: nothing more to send.
    Gone,
    /// `stop` was cancelled: shutdown, a full queue, or a gap (see [`finish`]).
    Stopped,
    /// The client broke a limit or the protocol: close with this frame.
    Refused(CloseFrame),
    /// A resume could not read the history: the client tries again.
    HistoryUnavailable,
    /// The room did not become ready in time: the client tries again.
    RoomUnavailable,
    /// Token mode: the gate turned the token away.
    Denied(Denied),
    /// Token mode: the user was not given a seat.
    Seatless(Refused),
    /// Token mode: the token expired without a refresh.
    Expired,
    /// Token mode: an operator disconnected the user.
    Disconnected,
}

/// Closes the connection as `end` requires; `shutting_down` and `evicted` say why `stop` was
/// cancelled.
pub async fn finish<S>(socket: &mut S, end: End, shutting_down: bool, evicted: Option<Eviction>)
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let frame = match end {
        End::Gone => None,
        End::Refused(frame) => Some(frame),
        End::Stopped if shutting_down => Some(CloseFrame {
            code: CLOSE_SHUTTING_DOWN,
            reason: Utf8Bytes::from_static("server shutting down"),
        }),
        End::Stopped => Some(match evicted {
            Some(Eviction::Gap) => CloseFrame {
                code: CLOSE_INTERRUPTED,
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
            code: CLOSE_HISTORY_UNAVAILABLE,
            reason: Utf8Bytes::from_static("message history unreachable; reconnect shortly"),
        }),
        End::RoomUnavailable => Some(CloseFrame {
            code: CLOSE_ROOM_UNAVAILABLE,
            reason: Utf8Bytes::from_static("room not available yet; reconnect shortly"),
        }),
        End::Denied(denied) => Some(CloseFrame {
            code: denied.close_code(),
            reason: reason(&denied.to_string()),
        }),
        End::Seatless(refused) => Some(CloseFrame {
            code: match refused {
                Refused::Revoked(_) => CLOSE_FORBIDDEN,
                Refused::TooMany(_) => CLOSE_USER_LIMIT,
                Refused::Unavailable => CLOSE_USERS_UNAVAILABLE,
            },
            reason: reason(&refused.to_string()),
        }),
        End::Expired => Some(CloseFrame {
            code: CLOSE_EXPIRED,
            reason: Utf8Bytes::from_static("token expired"),
        }),
        End::Disconnected => Some(CloseFrame {
            code: CLOSE_DISCONNECTED,
            reason: Utf8Bytes::from_static("disconnected by the operator"),
        }),
    };
    if let Some(frame) = frame {
        tracing::debug!(code = frame.code, reason = %frame.reason, "closing WebSocket");
        close(socket, frame).await;
    }
    tracing::debug!("WebSocket closed");
}

/// `text` cut to the longest close reason, at a character boundary.
fn reason(text: &str) -> Utf8Bytes {
    let mut end = text.len().min(MAX_REASON_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    Utf8Bytes::from(&text[..end])
}

/// The close frame owed to a client whose frame the WebSocket layer rejected, if any.
pub fn refusal(error: axum::Error, max_frame_bytes: usize) -> End {
    use tungstenite_axum::error::{Error as WsError, ProtocolError};
    let error = error.into_inner();
    let frame = match error.downcast_ref::<WsError>() {
        Some(WsError::Capacity(_)) => CloseFrame {
            code: CLOSE_FRAME_TOO_LARGE,
            reason: format!("frame larger than {max_frame_bytes} bytes").into(),
        },
        Some(WsError::Utf8(_)) => CloseFrame {
            code: CLOSE_NOT_UTF8,
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
            code: CLOSE_PROTOCOL_ERROR,
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
