//! Frames no browser sends, written on a raw socket: oversized frames and messages, lying
//! lengths, invalid UTF-8, and RFC 6455 violations (reserved bits, unknown opcodes, unmasked or
//! fragmented control frames, continuations out of place, malformed closes). Each ends its
//! connection with the close code the RFC names (1009, 1007, 1002), none reaches anyone, and the
//! server keeps serving normal clients. A client that answers no ping is let go.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{App, DEADLINE, assert_chat_shape};

/// The frame and message size limit these tests run with.
const MAX_FRAME: usize = 1024;

/// The masking key of every masked frame here.
const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Close codes (RFC 6455 §7.4.1).
const PROTOCOL_ERROR: u16 = 1002;
const INVALID_DATA: u16 = 1007;
const TOO_BIG: u16 = 1009;

/// A frame: `first` is the FIN/RSV/opcode byte; the payload is masked when `masked`.
fn frame(first: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mask_bit = if masked { 0x80 } else { 0 };
    let mut out = vec![first];
    match payload.len() {
        n @ 0..=125 => out.push(mask_bit | n as u8),
        n @ 126..=0xffff => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&MASK);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ MASK[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A masked frame, as a client must send it.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    frame(first, payload, true)
}

/// The head of a masked text frame that declares `len` payload bytes, without the payload.
fn declared(len: u64) -> Vec<u8> {
    let mut out = vec![0x81, 0x80 | 127];
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&MASK);
    out
}

/// A WebSocket client on a raw socket: it writes whatever bytes it is given.
struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Opens `/ws` on `addr`.
    async fn connect(addr: SocketAddr) -> RawClient {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let handshake = format!(
            "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        stream.write_all(handshake.as_bytes()).await.unwrap();
        let mut client = RawClient {
            stream,
            buf: Vec::new(),
        };
        let head_end = loop {
            if let Some(i) = client.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            assert!(client.more().await, "no handshake answer");
        };
        let head: Vec<u8> = client.buf.drain(..head_end).collect();
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        client
    }

    /// Reads more from the socket; false once it has ended.
    async fn more(&mut self) -> bool {
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout(DEADLINE, self.stream.read(&mut chunk))
            .await
            .expect("timed out waiting for the server")
        {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// Writes `bytes`; the server may already have closed, which is not an error here.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// Reads the server's frames until its close frame and returns the close code (1005 for a
    /// close without one), or `None` if the connection ended without a close frame.
    async fn close_code(&mut self) -> Option<u16> {
        loop {
            if self.buf.len() >= 2 {
                let (opcode, len) = (self.buf[0] & 0x0f, (self.buf[1] & 0x7f) as usize);
                assert_eq!(self.buf[1] & 0x80, 0, "the server masked a frame");
                let (start, len) = match len {
                    126 if self.buf.len() >= 4 => {
                        (4, u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize)
                    }
                    127 if self.buf.len() >= 10 => (
                        10,
                        u64::from_be_bytes(self.buf[2..10].try_into().unwrap()) as usize,
                    ),
                    126 | 127 => (usize::MAX, 0),
                    n => (2, n),
                };
                if start != usize::MAX && self.buf.len() >= start + len {
                    let payload: Vec<u8> = self.buf.drain(..start + len).skip(start).collect();
                    if opcode == 0x8 {
                        return Some(match payload.as_slice() {
                            [a, b, ..] => u16::from_be_bytes([*a, *b]),
                            _ => 1005,
                        });
                    }
                    continue;
                }
            }
            if !self.more().await {
                return None;
            }
        }
    }
}

#[tokio::test]
async fn each_bad_frame_closes_with_its_code_and_the_server_keeps_serving() {
    let app = App::start(&format!("max_frame_bytes = {MAX_FRAME}\n")).await;
    let mut bystander = app.connect().await;
    let big = vec![b'x'; MAX_FRAME + 1];
    let half = vec![b'x'; MAX_FRAME / 2 + 1];
    let cases: Vec<(&str, Vec<Vec<u8>>, u16)> = vec![
        (
            "a text frame over the limit",
            vec![masked(0x81, &big)],
            TOO_BIG,
        ),
        (
            "a binary frame over the limit",
            vec![masked(0x82, &big)],
            TOO_BIG,
        ),
        (
            "a message over the limit in fragments within it",
            vec![masked(0x01, &half), masked(0x80, &half)],
            TOO_BIG,
        ),
        (
            "a declared length of 2^62, no payload",
            vec![declared(1 << 62)],
            TOO_BIG,
        ),
        (
            "a declared length of 2^64 - 1",
            vec![declared(u64::MAX)],
            TOO_BIG,
        ),
        (
            "invalid UTF-8",
            vec![masked(0x81, b"{\"name\":\"a\",\"content\":\"\xff\"}")],
            INVALID_DATA,
        ),
        (
            "an overlong encoding",
            vec![masked(0x81, b"\xc0\xaf")],
            INVALID_DATA,
        ),
        (
            "a UTF-16 surrogate",
            vec![masked(0x81, b"\xed\xa0\x80")],
            INVALID_DATA,
        ),
        (
            "a code point split across fragments, then broken",
            vec![masked(0x01, b"ab\xe2\x82"), masked(0x80, b"(")],
            INVALID_DATA,
        ),
        (
            "RSV1 without an extension",
            vec![masked(0xc1, b"hi")],
            PROTOCOL_ERROR,
        ),
        ("RSV2", vec![masked(0xa1, b"hi")], PROTOCOL_ERROR),
        ("RSV3", vec![masked(0x91, b"hi")], PROTOCOL_ERROR),
        (
            "reserved data opcode 0x3",
            vec![masked(0x83, b"hi")],
            PROTOCOL_ERROR,
        ),
        (
            "reserved control opcode 0xB",
            vec![masked(0x8b, b"hi")],
            PROTOCOL_ERROR,
        ),
        (
            "an unmasked frame",
            vec![frame(0x81, b"hi", false)],
            PROTOCOL_ERROR,
        ),
        (
            "a fragmented ping",
            vec![masked(0x09, b"hi")],
            PROTOCOL_ERROR,
        ),
        (
            "a ping over 125 bytes",
            vec![masked(0x89, &[b'p'; 126])],
            PROTOCOL_ERROR,
        ),
        (
            "a continuation with nothing to continue",
            vec![masked(0x80, b"hi")],
            PROTOCOL_ERROR,
        ),
        (
            "a new message inside a fragmented one",
            vec![masked(0x01, b"ab"), masked(0x81, b"cd")],
            PROTOCOL_ERROR,
        ),
        (
            "a close with a 1-byte payload",
            vec![masked(0x88, b"\x03")],
            PROTOCOL_ERROR,
        ),
        (
            "a close with reserved code 1005",
            vec![masked(0x88, &1005u16.to_be_bytes())],
            PROTOCOL_ERROR,
        ),
        (
            "a close whose reason is not UTF-8",
            vec![masked(0x88, b"\x03\xe8\xff")],
            INVALID_DATA,
        ),
        (
            "a close with code 999",
            vec![masked(0x88, &999u16.to_be_bytes())],
            PROTOCOL_ERROR,
        ),
    ];
    let mut failures = Vec::new();
    for (what, frames, code) in &cases {
        let mut client = RawClient::connect(app.addr).await;
        for frame in frames {
            client.send(frame).await;
        }
        let got = client.close_code().await;
        if got != Some(*code) {
            failures.push(format!("{what}: closed with {got:?}, expected {code}"));
        }
        // After its close frame the server ends the connection.
        client.buf.clear();
        if client.more().await {
            failures.push(format!("{what}: bytes after the close: {:?}", client.buf));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // Still serving: a normal client's message reaches the bystander, and it is the first thing
    // the bystander sees, so nothing of the above reached anyone.
    let mut normal = app.connect().await;
    normal.say("ann", "still here").await;
    let seen = bystander.text().await;
    assert_eq!(assert_chat_shape(&seen).content, "still here");
    assert_eq!(normal.text().await, seen);
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test]
async fn a_client_that_answers_no_ping_is_let_go_and_one_that_answers_stays() {
    let app = App::start("ping_interval = \"200ms\"").await;
    let mut listener = app.connect().await;
    let mut silent = RawClient::connect(app.addr).await;
    // The listener reads all along (its WebSocket layer answers each ping); the silent client
    // reads raw bytes and answers nothing, until the server ends its connection. Then a message
    // sent by a newcomer still reaches the listener.
    let (pings, text) = tokio::join!(
        async {
            while silent.more().await {}
            let pings = silent.buf.chunks(2).filter(|f| *f == [0x89, 0x00]).count();
            assert_eq!(silent.buf.len(), pings * 2, "only pings: {:?}", silent.buf);
            let mut sender = app.connect().await;
            sender.say("late", "after the silent one left").await;
            pings
        },
        listener.text()
    );
    assert!(pings >= 1, "the server never pinged");
    assert_eq!(
        assert_chat_shape(&text).content,
        "after the silent one left"
    );
}
