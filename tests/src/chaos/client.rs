//! One chaos client: a WebSocket through `lb` that reconnects whenever it is lost, records every
//! message of the run it receives, and, for a sender, sends the messages its clock makes.
//!
//! Connecting: with resume, `/ws?resume` the first time and `/ws?epoch=E&last=ID` afterwards,
//! where `E` and `ID` are the newest position the client holds (from the notice and every
//! message); the connection is ready once the notice arrived. Without resume, plain `/ws`, ready
//! once the app answered a ping (its connection task serves the client). A ready connection that ends (close frame of any code, error, end of stream) is
//! retried at once; failed attempts back off from [`BACKOFF_FIRST`] to [`BACKOFF_MAX`], jittered.
//!
//! Sending with resume: every message gets a `cid`; it stays pending until its `ack` arrives and
//! is sent again, with the same `cid`, [`ACK_WITHIN`] after a send without an answer,
//! [`RETRY_AFTER`] after an error answer, and at once on every new connection. Without resume a
//! message is sent once; one made while the client is disconnected is not sent at all (the
//! page cannot send then either) and counts as a send error.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use super::witness::lock;
use super::{Content, Key, parse_content, unix_nanos};
use crate::client::{Io, connect};

/// A send without an answer for this long is sent again.
const ACK_WITHIN: Duration = Duration::from_secs(2);
/// A send answered with an error is sent again this much later.
const RETRY_AFTER: Duration = Duration::from_millis(250);
/// The longest a connection attempt (TCP, TLS, WebSocket handshake) may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(5);
/// The longest the closing handshake at the end may take.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);
/// The payload of the ping whose pong makes a connection of the original protocol ready.
const READY_PING: &[u8] = b"ready";
/// Pause after the first failed attempt; doubled after each further one.
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
/// The longest pause between attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What every client of a run shares.
pub(super) struct Plan {
    /// `wss://.../ws` through `lb`.
    pub url: String,
    /// Trusts the stack's CA.
    pub tls: TlsConnector,
    /// Speak the zero-loss protocol.
    pub resume: bool,
    /// The run's id, first in every content.
    pub run: u32,
    /// Sending clients.
    pub senders: usize,
    /// Highest sequence number (exclusive) a sender uses.
    pub per_sender: usize,
    /// How often to send a heartbeat (an empty frame), as the page does.
    pub heartbeat: Option<Duration>,
    /// Token mode: each connection's first frame is a token, renewed when the server asks.
    pub tokens: Option<Arc<super::Tokens>>,
}

/// What one client saw and did; shared with the driver, which reads it during the drain.
#[derive(Debug, Default)]
pub struct ClientLog {
    /// The witness's count when the client was first ready: it must receive every message
    /// published from that one on.
    pub first: Option<usize>,
    /// One bit per message of the run: received.
    received: Vec<u64>,
    per_sender: usize,
    /// Messages in the run at most: senders × per_sender.
    capacity: usize,
    /// Messages received again.
    pub duplicates: u64,
    /// Creation to first receipt of each message, nanoseconds.
    pub latencies: Vec<u64>,
    /// Ready connections that ended before the run did.
    pub disconnects: u64,
    /// From each lost connection to the next ready one, nanoseconds.
    pub reconnects: Vec<u64>,
    /// Notices saying `recovered: false`.
    pub unrecovered: u64,
    /// Token mode: refresh notices answered with a new token.
    pub refreshes: u64,
    /// Messages whose id was not greater than the one before (same epoch).
    pub out_of_order: u64,
    /// Messages written to a connection at least once.
    pub sent: u64,
    /// Error answers, failed writes, and (without resume) messages made while disconnected.
    pub send_errors: u64,
    /// Sends of a message already sent.
    pub retries: u64,
    /// Messages sent but not acknowledged yet (with resume).
    pub pending: usize,
    /// The position of the message received last, to check that ids only grow.
    previous: Option<Position>,
}

impl ClientLog {
    /// An empty log for a run of `senders` × `per_sender` messages at most.
    pub fn new(senders: usize, per_sender: usize) -> ClientLog {
        ClientLog {
            received: vec![0; (senders * per_sender).div_ceil(64)],
            per_sender,
            capacity: senders * per_sender,
            ..ClientLog::default()
        }
    }

    fn bit(&self, key: Key) -> Option<(usize, u64)> {
        let (sender, seq) = (key.sender as usize, key.seq as usize);
        if seq >= self.per_sender {
            return None;
        }
        let index = sender * self.per_sender + seq;
        (index < self.capacity).then(|| (index / 64, 1 << (index % 64)))
    }

    /// Whether message `key` was received.
    pub fn has(&self, key: Key) -> bool {
        self.bit(key)
            .is_some_and(|(word, bit)| self.received[word] & bit != 0)
    }

    /// Notes the receipt of a message of the run, with its place in the history (epoch and
    /// id) when it has one: a duplicate, an id not above the one before, or else its latency.
    pub(super) fn message(&mut self, content: Content, at: Option<(String, (u64, u64))>) {
        if let Some((epoch, id)) = at {
            if self
                .previous
                .as_ref()
                .is_some_and(|p| p.epoch == epoch && id <= p.last)
            {
                self.out_of_order += 1;
            }
            self.previous = Some(Position { epoch, last: id });
        }
        if self.receive(content.key) {
            self.latencies
                .push(unix_nanos().saturating_sub(content.created_ns));
        }
    }

    /// Notes a receipt; false when it is a duplicate.
    fn receive(&mut self, key: Key) -> bool {
        let Some((word, bit)) = self.bit(key) else {
            return false;
        };
        if self.received[word] & bit != 0 {
            self.duplicates += 1;
            return false;
        }
        self.received[word] |= bit;
        true
    }
}

/// A sender's messages: new ones from its clock, and those waiting for an acknowledgement.
pub(super) struct Outbox {
    sender: u32,
    new: mpsc::UnboundedReceiver<(Key, String)>,
    /// By sequence number.
    pending: BTreeMap<u32, Pending>,
}

struct Pending {
    /// The frame, `cid` included.
    frame: String,
    /// When to send it (again).
    due: Instant,
}

impl Outbox {
    /// The outbox of sender `sender`, fed by its clock.
    pub fn new(sender: u32, new: mpsc::UnboundedReceiver<(Key, String)>) -> Outbox {
        Outbox {
            sender,
            new,
            pending: BTreeMap::new(),
        }
    }

    /// The next message from the clock; never ready once the clock has stopped.
    async fn next(&mut self) -> (Key, String) {
        match self.new.recv().await {
            Some(message) => message,
            None => std::future::pending().await,
        }
    }
}

/// A message id, `<ms>-<seq>`, compared numerically.
fn parse_id(text: &str) -> Option<(u64, u64)> {
    let (ms, seq) = text.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// A place in the channel's history.
#[derive(Debug)]
struct Position {
    epoch: String,
    last: (u64, u64),
}

/// Any text frame from the server; which fields are present says what it is.
#[derive(Deserialize)]
struct Frame {
    recovered: Option<bool>,
    refresh: Option<bool>,
    epoch: Option<String>,
    last: Option<String>,
    ack: Option<String>,
    error: Option<String>,
    cid: Option<String>,
    content: Option<String>,
    id: Option<String>,
}

/// How a connection ended.
enum Ended {
    /// The run is over.
    Stopped,
    /// Lost, after the connection was ready or before.
    Lost { ready: bool },
}

type Ws = WebSocketStream<Box<dyn Io>>;

/// Runs client `i` until `stop`.
pub(super) async fn run(
    i: usize,
    plan: Arc<Plan>,
    log: Arc<Mutex<ClientLog>>,
    published: Arc<AtomicUsize>,
    outbox: Option<Outbox>,
    stop: CancellationToken,
) {
    let client = Client {
        name: format!("chaos-{i}"),
        rng: (i as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ unix_nanos(),
        plan,
        log,
        published,
        outbox,
        position: None,
        down_since: None,
    };
    client.run(stop).await;
}

struct Client {
    /// Its name in messages, and its user in token mode.
    name: String,
    plan: Arc<Plan>,
    log: Arc<Mutex<ClientLog>>,
    published: Arc<AtomicUsize>,
    outbox: Option<Outbox>,
    position: Option<Position>,
    /// When the last ready connection was lost, until the next one is ready.
    down_since: Option<Instant>,
    /// xorshift state for the backoff jitter.
    rng: u64,
}

impl Client {
    async fn run(mut self, stop: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let url = self.url();
            let attempt = tokio::select! {
                biased;
                () = stop.cancelled() => break,
                attempt = timeout(CONNECT_WITHIN, connect(&url, Some(&self.plan.tls))) => attempt,
            };
            let ready = match attempt {
                Ok(Ok(mut ws)) => match self.session(&mut ws, &stop).await {
                    Ended::Stopped => {
                        // Best effort: the counts are taken.
                        let _ = timeout(CLOSE_WITHIN, ws.close(None)).await;
                        break;
                    }
                    Ended::Lost { ready } => {
                        if ready {
                            lock(&self.log).disconnects += 1;
                            self.down_since = Some(Instant::now());
                        }
                        ready
                    }
                },
                Ok(Err(_)) | Err(_) => false,
            };
            if ready {
                failures = 0;
                continue;
            }
            failures += 1;
            let pause = self.backoff(failures);
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// The URL of the next attempt.
    fn url(&self) -> String {
        match (&self.position, self.plan.resume) {
            (_, false) => self.plan.url.clone(),
            (None, true) => format!("{}?resume", self.plan.url),
            (Some(p), true) => format!(
                "{}?epoch={}&last={}-{}",
                self.plan.url, p.epoch, p.last.0, p.last.1
            ),
        }
    }

    /// The pause after `failures` failed attempts in a row: doubling, capped, ±50 % jitter.
    fn backoff(&mut self, failures: u32) -> Duration {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let base = BACKOFF_FIRST
            .saturating_mul(1 << failures.saturating_sub(1).min(10))
            .min(BACKOFF_MAX);
        base.mul_f64(0.5 + (self.rng >> 11) as f64 / (1u64 << 53) as f64)
    }

    /// One connection, until it is lost or the run stops.
    async fn session(&mut self, ws: &mut Ws, stop: &CancellationToken) -> Ended {
        let mut ready = false;
        if self.send_token(ws).await.is_err() {
            return Ended::Lost { ready };
        }
        if !self.plan.resume {
            // No notice in the original protocol: the app's answer to a ping says that its
            // connection task serves this client (and so receives the room's messages).
            if ws.send(Message::Ping(READY_PING.into())).await.is_err() {
                return Ended::Lost { ready };
            }
        }
        let mut beats = self
            .plan
            .heartbeat
            .map(|every| tokio::time::interval_at(Instant::now() + every, every));
        loop {
            let due = match (&self.outbox, ready) {
                (Some(outbox), true) => outbox.pending.values().map(|p| p.due).min(),
                _ => None,
            };
            let wake = tokio::time::sleep_until(due.unwrap_or_else(Instant::now));
            let sending = ready && self.outbox.is_some();
            let outbox = &mut self.outbox;
            tokio::select! {
                biased;
                () = stop.cancelled() => return Ended::Stopped,
                frame = ws.next() => match frame {
                    Some(Ok(Message::Text(text))) => {
                        if self.on_text(&text, &mut ready) && self.send_token(ws).await.is_err() {
                            return Ended::Lost { ready };
                        }
                    }
                    Some(Ok(Message::Pong(payload))) if !ready && payload == READY_PING => {
                        ready = true;
                        self.ready_without_resume();
                    }
                    Some(Ok(Message::Close(_)) | Err(_)) | None => return Ended::Lost { ready },
                    Some(Ok(_)) => {}
                },
                (key, content) = next_new(outbox), if sending => {
                    if self.send_new(ws, key, content).await.is_err() {
                        return Ended::Lost { ready };
                    }
                }
                () = wake, if due.is_some() => {
                    if self.resend_due(ws).await.is_err() {
                        return Ended::Lost { ready };
                    }
                }
                () = heartbeat(&mut beats) => {
                    if ws.send(Message::text("")).await.is_err() {
                        return Ended::Lost { ready };
                    }
                }
            }
        }
    }

    /// Without resume, the connection is ready: messages made while disconnected are dropped
    /// (the original protocol had no way to send them).
    fn ready_without_resume(&mut self) {
        self.became_ready();
        if let Some(outbox) = &mut self.outbox {
            let mut dropped = 0;
            while outbox.new.try_recv().is_ok() {
                dropped += 1;
            }
            lock(&self.log).send_errors += dropped;
        }
    }

    /// The connection is ready: the first time, note where the witness stands; after a loss,
    /// how long the client was away.
    fn became_ready(&mut self) {
        let published = self.published.load(Ordering::Acquire);
        let mut log = lock(&self.log);
        if log.first.is_none() {
            log.first = Some(published);
        } else if let Some(since) = self.down_since.take() {
            log.reconnects.push(since.elapsed().as_nanos() as u64);
        }
    }

    /// Token mode: sends a fresh token (the first frame, or a refresh).
    async fn send_token(&mut self, ws: &mut Ws) -> Result<(), ()> {
        let Some(tokens) = &self.plan.tokens else {
            return Ok(());
        };
        let token = tokens.mint(&self.name).map_err(|_| ())?;
        let frame = serde_json::json!({ "token": token }).to_string();
        ws.send(Message::text(frame)).await.map_err(|_| ())
    }

    /// Takes in one text frame; whether the server asks for a new token.
    fn on_text(&mut self, text: &str, ready: &mut bool) -> bool {
        let Ok(frame) = serde_json::from_str::<Frame>(text) else {
            return false;
        };
        if frame.refresh == Some(true) {
            lock(&self.log).refreshes += 1;
            return true;
        }
        self.on_frame(frame, ready);
        false
    }

    fn on_frame(&mut self, frame: Frame, ready: &mut bool) {
        if let Some(recovered) = frame.recovered {
            // The resume notice: the position to hold, and everything pending goes out again.
            if let (Some(epoch), Some(last)) =
                (frame.epoch, frame.last.as_deref().and_then(parse_id))
            {
                self.position = Some(Position { epoch, last });
            }
            if !recovered {
                lock(&self.log).unrecovered += 1;
            }
            *ready = true;
            self.became_ready();
            let now = Instant::now();
            if let Some(outbox) = &mut self.outbox {
                outbox.pending.values_mut().for_each(|p| p.due = now);
            }
        } else if let Some(cid) = frame.ack {
            if let Some(outbox) = &mut self.outbox {
                if let Some(seq) = seq_of(&cid) {
                    outbox.pending.remove(&seq);
                }
                lock(&self.log).pending = outbox.pending.len();
            }
        } else if frame.error.is_some() {
            lock(&self.log).send_errors += 1;
            let pending = self
                .outbox
                .as_mut()
                .zip(frame.cid.as_deref().and_then(seq_of));
            if let Some(p) = pending.and_then(|(outbox, seq)| outbox.pending.get_mut(&seq)) {
                p.due = Instant::now() + RETRY_AFTER;
            }
        } else if let Some(content) = frame
            .content
            .as_deref()
            .and_then(|c| parse_content(c, self.plan.run))
        {
            let at = frame.epoch.zip(frame.id.as_deref().and_then(parse_id));
            if let Some((epoch, id)) = &at {
                match &mut self.position {
                    Some(p) if p.epoch == *epoch => p.last = p.last.max(*id),
                    _ => {
                        self.position = Some(Position {
                            epoch: epoch.clone(),
                            last: *id,
                        })
                    }
                }
            }
            lock(&self.log).message(content, at);
        }
    }

    /// Sends a message from the clock for the first time.
    async fn send_new(&mut self, ws: &mut Ws, key: Key, content: String) -> Result<(), ()> {
        let Some(outbox) = &mut self.outbox else {
            return Ok(());
        };
        let name = format!("chaos-{}", outbox.sender);
        if !self.plan.resume {
            let frame = serde_json::json!({ "name": name, "content": content }).to_string();
            let written = ws.send(Message::text(frame)).await;
            let mut log = lock(&self.log);
            return match written {
                Ok(()) => {
                    log.sent += 1;
                    Ok(())
                }
                Err(_) => {
                    log.send_errors += 1;
                    Err(())
                }
            };
        }
        let cid = format!("{}-{}-{}", self.plan.run, key.sender, key.seq);
        let frame = serde_json::json!({ "name": name, "content": content, "cid": cid }).to_string();
        outbox.pending.insert(
            key.seq,
            Pending {
                frame: frame.clone(),
                due: Instant::now() + ACK_WITHIN,
            },
        );
        {
            let mut log = lock(&self.log);
            log.sent += 1;
            log.pending = outbox.pending.len();
        }
        // A failed write leaves it pending: it goes out again on the next connection.
        ws.send(Message::text(frame)).await.map_err(|_| {
            lock(&self.log).send_errors += 1;
        })
    }

    /// Sends again every pending message that is due.
    async fn resend_due(&mut self, ws: &mut Ws) -> Result<(), ()> {
        let Some(outbox) = &mut self.outbox else {
            return Ok(());
        };
        let now = Instant::now();
        for pending in outbox.pending.values_mut().filter(|p| p.due <= now) {
            pending.due = now + ACK_WITHIN;
            lock(&self.log).retries += 1;
            if ws.send(Message::text(pending.frame.clone())).await.is_err() {
                lock(&self.log).send_errors += 1;
                return Err(());
            }
        }
        Ok(())
    }
}

/// The next message from the sender's clock; never ready for a client that does not send.
async fn next_new(outbox: &mut Option<Outbox>) -> (Key, String) {
    match outbox {
        Some(outbox) => outbox.next().await,
        None => std::future::pending().await,
    }
}

/// The sequence number in a `cid` (`RUN-SENDER-SEQ`).
fn seq_of(cid: &str) -> Option<u32> {
    cid.rsplit('-').next()?.parse().ok()
}

/// Waits for the next heartbeat; never, without heartbeats.
async fn heartbeat(beats: &mut Option<tokio::time::Interval>) {
    match beats {
        Some(beats) => {
            beats.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_and_duplicates_per_message() {
        let mut log = ClientLog::new(2, 3);
        let key = Key { sender: 1, seq: 2 };
        assert!(!log.has(key));
        assert!(log.receive(key));
        assert!(log.has(key));
        assert!(!log.has(Key { sender: 0, seq: 2 }));
        assert!(!log.receive(key));
        assert_eq!(log.duplicates, 1);
        // Out of range: never counted.
        assert!(!log.receive(Key { sender: 0, seq: 3 }));
        assert!(!log.receive(Key { sender: 2, seq: 0 }));
    }

    #[test]
    fn ids_compare_numerically_and_cids_name_their_message() {
        assert!(parse_id("10-0") > parse_id("9-5"));
        assert!(parse_id("10-10") > parse_id("10-9"));
        assert_eq!(parse_id("10"), None);
        assert_eq!(seq_of("77-3-41"), Some(41));
        assert_eq!(seq_of("x"), None);
    }
}
