//! One WebSocket connection, from the handshake to its close: [`serve`] first waits until the
//! client's room is ready (at most [`ROOM_READY_TIMEOUT`]), sends a resuming client the
//! [`protocol::ResumeNotice`] and what it missed, is counted in the room's presence (a client
//! that asked for it gets the presence state, then its diffs), then until the client leaves or
//! is told to go
//! reads its frames (heartbeat, rate limit, [`protocol::parse_incoming`], stamp,
//! [`Room::publish`], the answer for the sender alone), writes its queue (in batches, skipping
//! what the resume sent), and pings it every `ping_interval`. A token connection (see `signin`)
//! also stamps its messages with its identity, takes a new token on the same socket, hears
//! when its token nears its end, and is closed at expiry or when an operator disconnects its
//! user. See ARCHITECTURE.md, "The message path".

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message;
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use tokio_util::sync::CancellationToken;

use super::close::{End, finish, refusal};
use super::rate_limit::TokenBucket;
use super::signin::{Due, SignedIn};
use crate::auth::token_of;
use crate::history::{Delivery, Resume};
use crate::hub::fanout::Member;
use crate::hub::rooms::{JoinError, Membership, Room};
use crate::position::{MessageId, Position};
use crate::presence::Here;
use crate::protocol::{self, ChatMessage, InputError, ResumeNotice, Signer};
use crate::state::AppState;

/// What a connecting client asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Resuming {
    /// The original protocol: no notice, live messages only.
    No,
    /// A position to resume from later, nothing to recover.
    Fresh,
    /// Everything after this position.
    From(Position),
    /// A position that cannot be one (the reason is told to the client).
    Malformed(&'static str),
}

/// Queued messages written to the socket before one flush.
const WRITE_BATCH: usize = 64;
/// How long a client of a room this instance has not subscribed to yet waits for the
/// subscription before it is closed (and tries again).
pub const ROOM_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Joins `room` (`None`: the main room): its membership and a place in its fan-out, from which
/// everything published from now on is queued for the new member, which `stop` (a child of the
/// shutdown token) tells to go.
pub(super) async fn join(
    state: &AppState,
    room: Option<&str>,
    stop: CancellationToken,
) -> Result<(Membership, Member), JoinError> {
    let membership = state.rooms().join(room).await?;
    let member = membership.room().fanout().join(stop);
    Ok((membership, member))
}

/// Runs one connection of a member of a room (`member`: its place in the room's fan-out, taken
/// before the handshake was answered) until the client leaves or is told to go.
pub(super) async fn serve<S>(
    mut socket: S,
    state: AppState,
    membership: Membership,
    mut member: Member,
    resuming: Resuming,
    wants_presence: bool,
    mut signed: Option<SignedIn>,
) where
    S: Stream<Item = Result<Message, axum::Error>> + Sink<Message, Error = axum::Error> + Unpin,
{
    let end = run(
        &mut socket,
        &state,
        &membership,
        &mut member,
        resuming,
        wants_presence,
        &mut signed,
    )
    .await;
    // An operator's disconnect cancels the connection's stop token; the seat says it was that.
    let end = match end {
        End::Stopped if signed.as_ref().is_some_and(SignedIn::left) => End::Disconnected,
        end => end,
    };
    finish(
        &mut socket,
        end,
        state.close_all().is_cancelled(),
        member.evicted.get().copied(),
    )
    .await;
}

/// Serves the connection until it has to end; says why.
async fn run<S>(
    socket: &mut S,
    state: &AppState,
    membership: &Membership,
    member: &mut Member,
    resuming: Resuming,
    wants_presence: bool,
    signed: &mut Option<SignedIn>,
) -> End
where
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
            if stop.is_cancelled() {
                return End::Stopped;
            }
            tracing::info!(timeout = ?ROOM_READY_TIMEOUT, "the room was not subscribed in time");
            return End::RoomUnavailable;
        }
    }
    let skip_through = match resume(socket, &room, resuming, &stop).await {
        Ok(skip_through) => skip_through,
        Err(end) => return end,
    };
    // Counted from here on (a signed-in connection as its user, an anonymous one without a name
    // until its first message), and, if it asked, told who is here.
    let author = signed.as_ref().map(|s| s.signer());
    let mut here = state.presence().enter(
        room.channel(),
        author.map(|a| a.user),
        author.map(|a| a.name),
    );
    let (presence_state, mut presence) =
        state.presence().watch(room.channel(), wants_presence).await;
    if let Some(frame) = presence_state {
        if let Err(end) = send(socket, Message::Text(frame), &stop).await {
            return end;
        }
    }
    let bucket = TokenBucket::new(limits.messages_per_second, limits.messages_burst);
    tracing::debug!(clients = room.fanout().len(), "WebSocket open");
    // A ping every interval; a client that sent nothing since the last one (not even its pong)
    // is unreachable and let go.
    let interval = state.config().ping_interval;
    let mut pings = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    pings.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = true;

    loop {
        // In this order: stop, then the client's queue, then its next frame. Writing before
        // reading keeps a client that sends fast from filling (and overflowing) its own queue.
        tokio::select! {
            biased;
            () = stop.cancelled() => return End::Stopped,
            due = next_due(signed.as_mut()), if signed.is_some() => match due {
                Due::Expired => return End::Expired,
                Due::Notice(notice) => {
                    if let Err(end) = send(socket, Message::Text(notice.into()), &stop).await {
                        return end;
                    }
                }
            },
            queued = member.rx.recv() => {
                let Some(first) = queued else { return End::Stopped };
                let fresh = |d: &Delivery| skip_through.is_none_or(|s| d.id.is_none_or(|id| id > s));
                if let Err(end) = write_queued(socket, first, &mut member.rx, fresh, &stop).await {
                    return end;
                }
            }
            frame = socket.next() => {
                heard = true;
                let reply = match frame {
                    None => return End::Gone,
                    Some(Err(e)) => return refusal(e, limits.max_frame_bytes),
                    // An empty text frame is a client's heartbeat: it proves its path works
                    // (sending it is how a client finds out that its path is gone) and needs
                    // no answer. It spends from the rate limit like any frame, silently.
                    Some(Ok(Message::Text(text))) if text.is_empty() => {
                        bucket.allow();
                        None
                    }
                    Some(Ok(Message::Text(text))) if !bucket.allow() => {
                        Some(rate_limited(state, &text))
                    }
                    Some(Ok(Message::Binary(_))) if !bucket.allow() => {
                        Some(rate_limited(state, ""))
                    }
                    Some(Ok(Message::Text(text))) => match (signed.as_mut(), token_of(&text)) {
                        (Some(s), Some(token)) => match s.refresh(state, &token) {
                            Ok(()) => Some(s.welcome()),
                            Err(denied) => {
                                tracing::info!(reason = %denied, "token refresh refused");
                                return End::Denied(denied);
                            }
                        },
                        (s, _) => {
                            let signer = s.as_ref().map(|s| s.signer());
                            accept(&text, state, &room, &mut here, &stop, signer).await
                        }
                    },
                    Some(Ok(Message::Binary(_))) => {
                        Some(protocol::error_json(&InputError::Binary.to_string(), None, false))
                    }
                    // Pings are answered by the WebSocket layer; a close is answered there too,
                    // after which the stream ends.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => None,
                };
                if let Some(reply) = reply {
                    if let Err(end) = send(socket, Message::Text(reply.into()), &stop).await {
                        return end;
                    }
                }
            }
            frame = presence.next() => {
                if let Err(end) = send(socket, Message::Text(frame), &stop).await {
                    return end;
                }
            }
            _ = pings.tick() => {
                if !heard {
                    tracing::info!(?interval, "letting go of a client that did not answer a ping");
                    return End::Gone;
                }
                heard = false;
                if let Err(end) = send(socket, Message::Ping(Default::default()), &stop).await {
                    return end;
                }
            }
        }
    }
}

/// A token connection's next deadline; never, for an anonymous one.
async fn next_due(signed: Option<&mut SignedIn>) -> Due {
    match signed {
        Some(signed) => signed.due().await,
        None => std::future::pending().await,
    }
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

/// Validates, stamps and publishes a client's text frame in its room (the connection then
/// shows the message's name in presence); the answer for the sender, if any (an error, or the
/// ack of a message with a `cid`).
async fn accept(
    text: &str,
    state: &AppState,
    room: &Room,
    here: &mut Here,
    stop: &CancellationToken,
    signer: Option<Signer<'_>>,
) -> Option<String> {
    let limits = &state.config().limits;
    let parsed = match signer {
        None => protocol::parse_incoming(text, limits.max_name_chars, limits.max_content_chars),
        Some(signer) => protocol::parse_signed(text, limits.max_content_chars, signer),
    };
    let mut incoming = match parsed {
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
    if published.is_ok() {
        here.rename(&message.name);
    }
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

#[cfg(test)]
mod tests {
    //! `serve` over channels instead of a socket.

    use std::pin::Pin;
    use std::task::{Context, Poll};

    use axum::extract::ws::Utf8Bytes;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::Config;
    use crate::ws::close::CLOSE_SHUTTING_DOWN;

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
        let (membership, member) = join(state, room, state.close_all().child_token())
            .await
            .unwrap();
        tokio::spawn(serve(
            socket,
            state.clone(),
            membership,
            member,
            Resuming::No,
            false,
            None,
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
            Message::Close(Some(frame)) => assert_eq!(frame.code, CLOSE_SHUTTING_DOWN),
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}
