//! Token mode's start of a connection and what it then carries. [`serve`] waits for the first
//! frame (at most `token_timeout`), passes it through the gate (the token, and the room it
//! grants), claims the user's seat (the per-user limit, an operator's disconnect) and only
//! then joins the room, so a refused connection never receives a message of it; the accepted
//! one hears `{"auth":"ok",...}` and runs as a `session` holding a [`SignedIn`]: the identity
//! its messages are stamped with, its seat, and when it must refresh and when it expires.

use std::pin::Pin;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::Message;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio::time::{Instant, Sleep};

use super::close::{End, finish, refusal};
use super::session::{self, Resuming};
use crate::auth::{Deadlines, Denied, Identity};
use crate::config::AuthConfig;
use crate::protocol::{self, Signer};
use crate::state::AppState;
use crate::users::Seat;

/// A signed-in connection's identity, seat and deadlines.
pub(super) struct SignedIn {
    identity: Identity,
    seat: Seat,
    /// The room it is in (`None`: the main room), which a refreshed token must still grant.
    room: Option<String>,
    refresh_before: Duration,
    /// When the connection ends unless a new token came.
    expires_at: Instant,
    /// Whether the notice for the current token went out.
    noticed: bool,
    /// Fires at the next deadline: the refresh notice, then (once noticed) the expiry.
    timer: Pin<Box<Sleep>>,
}

/// A signed-in connection's next deadline, come.
pub(super) enum Due {
    /// Time to ask for a new token: the notice to send.
    Notice(String),
    /// The token expired.
    Expired,
}

impl SignedIn {
    fn new(identity: Identity, seat: Seat, room: Option<String>, refresh_before: Duration) -> Self {
        let mut signed = SignedIn {
            identity,
            seat,
            room,
            refresh_before,
            expires_at: Instant::now(),
            noticed: false,
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
        };
        signed.schedule();
        signed
    }

    /// Sets the deadlines from the current token.
    fn schedule(&mut self) {
        let deadlines = Deadlines::of(self.identity.expires_at, now(), self.refresh_before);
        let start = Instant::now();
        self.expires_at = start + deadlines.close_in;
        self.noticed = false;
        self.timer.as_mut().reset(start + deadlines.notice_in);
    }

    /// Waits for the next deadline. After [`Due::Notice`] the timer moves on to the expiry, so
    /// the notice goes out once per token.
    pub(super) async fn due(&mut self) -> Due {
        self.timer.as_mut().await;
        if self.noticed {
            return Due::Expired;
        }
        self.noticed = true;
        self.timer.as_mut().reset(self.expires_at);
        Due::Notice(self.notice())
    }

    /// Who the connection's messages are from.
    pub(super) fn signer(&self) -> Signer<'_> {
        Signer {
            user: &self.identity.user,
            name: &self.identity.name,
        }
    }

    /// Whether an operator disconnected the user (which cancelled the connection's stop
    /// token).
    pub(super) fn left(&self) -> bool {
        self.seat.left()
    }

    /// What the connection is told when a token is accepted.
    pub(super) fn welcome(&self) -> String {
        let expires_in = self.identity.expires_at.saturating_sub(now());
        protocol::signed_in_json(&self.identity.user, &self.identity.name, expires_in)
    }

    /// The refresh notice: how long until the token expires.
    fn notice(&self) -> String {
        let left = self.expires_at.saturating_duration_since(Instant::now());
        protocol::refresh_json(left.as_secs())
    }

    /// A new token sent on the connection (`token` out of a `{"token": ...}` frame): the same
    /// user, still granted the room. On success the deadlines follow the new token.
    pub(super) fn refresh(&mut self, state: &AppState, token: &str) -> Result<(), Denied> {
        let Some(gate) = state.gate() else {
            return Err(Denied::NotATokenFrame);
        };
        self.identity = gate.refresh(&self.identity, token, self.room.as_deref(), now())?;
        self.schedule();
        Ok(())
    }
}

/// The time now in Unix seconds (0 if the clock is before 1970, which fails every token).
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Serves a token-mode connection to `room`: admission by its first frame, then the session.
pub(super) async fn serve<S>(
    mut socket: S,
    state: AppState,
    room: Option<String>,
    resuming: Resuming,
    wants_presence: bool,
) where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    match admit(&mut socket, &state, room).await {
        Ok((signed, membership, member)) => {
            if socket
                .send(Message::Text(signed.welcome().into()))
                .await
                .is_err()
            {
                return;
            }
            session::serve(
                socket,
                state,
                membership,
                member,
                resuming,
                wants_presence,
                Some(signed),
            )
            .await;
        }
        Err(end) => {
            if let End::Denied(denied) = &end {
                tracing::info!(reason = %denied, "token connection refused");
            }
            if let End::Seatless(refused) = &end {
                tracing::info!(reason = %refused, "token connection refused");
            }
            finish(&mut socket, end, state.close_all().is_cancelled(), None).await;
        }
    }
}

/// The first frame through the gate, the seat, the room: everything a token connection needs
/// before it is a member.
async fn admit<S>(
    socket: &mut S,
    state: &AppState,
    room: Option<String>,
) -> Result<
    (
        SignedIn,
        crate::hub::rooms::Membership,
        crate::hub::fanout::Member,
    ),
    End,
>
where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let (Some(gate), AuthConfig::Token(config)) = (state.gate(), &state.config().auth) else {
        return Err(End::Denied(Denied::NotATokenFrame));
    };
    let first = tokio::select! {
        first = first_frame(socket, state.config().limits.max_frame_bytes) => first?,
        () = tokio::time::sleep(config.token_timeout) => {
            return Err(End::Denied(Denied::NoToken(config.token_timeout)));
        }
        () = state.close_all().cancelled() => return Err(End::Stopped),
    };
    let identity = gate
        .admit(&first, room.as_deref(), now())
        .map_err(End::Denied)?;
    // The connection's stop token: shutdown, eviction, and an operator's disconnect.
    let stop = state.close_all().child_token();
    let seat = state
        .users()
        .claim(&identity, now(), stop.clone())
        .await
        .map_err(End::Seatless)?;
    let (membership, member) = match session::join(state, room.as_deref(), stop).await {
        Ok(joined) => joined,
        Err(e) => {
            tracing::warn!(room = ?room, error = %e, "token connection refused: cannot join the room");
            return Err(End::RoomUnavailable);
        }
    };
    tracing::debug!(user = %identity.user, "signed in");
    Ok((
        SignedIn::new(identity, seat, room, config.refresh_before),
        membership,
        member,
    ))
}

/// The client's first data frame, as text (a binary one is no token frame).
async fn first_frame<S>(socket: &mut S, max_frame_bytes: usize) -> Result<String, End>
where
    S: Stream<Item = Result<Message, axum::Error>> + Unpin,
{
    loop {
        match socket.next().await {
            None | Some(Ok(Message::Close(_))) => return Err(End::Gone),
            Some(Err(e)) => return Err(refusal(e, max_frame_bytes)),
            Some(Ok(Message::Text(text))) => return Ok(text.to_string()),
            Some(Ok(Message::Binary(_))) => return Err(End::Denied(Denied::NotATokenFrame)),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        }
    }
}
