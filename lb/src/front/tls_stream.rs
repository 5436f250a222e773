//! A TLS server connection over a TCP socket whose buffers exist only while bytes are in flight.
//!
//! How it works: [`TlsStream`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Free space offered to each socket read: a maximal TLS record (16 KiB of plaintext plus
/// overhead) fits whole.
const READ_SIZE: usize = 18 * 1024;

/// Most bytes kept waiting for a record or handshake message to complete (handshake messages
/// may reach 64 KiB); more fails the connection.
const MAX_INCOMING: usize = 96 * 1024;

/// Encrypted bytes held before `poll_write` waits for the socket to take them.
const WRITE_HIGH: usize = 64 * 1024;

/// Most plaintext encrypted by one `poll_write`.
const MAX_WRITE: usize = 64 * 1024;

/// Bytes added per record by encryption, at most (header, tag, content type, padding margin).
const RECORD_OVERHEAD: usize = 64;

/// Largest plaintext per TLS record.
const MAX_FRAGMENT: usize = 16 * 1024;

/// Runs the TLS handshake on `io` as a server with `config`.
pub async fn accept(config: Arc<ServerConfig>, io: TcpStream) -> io::Result<TlsStream> {
    let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
    let mut tls = TlsStream {
        conn,
        io,
        incoming: Vec::new(),
        in_start: 0,
        plaintext: Vec::new(),
        plain_pos: 0,
        outgoing: Vec::new(),
        out_pos: 0,
        peer_closed: false,
        eof: false,
        shut: false,
        failed: false,
    };
    std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
    Ok(tls)
}

impl TlsStream {
    /// The application protocol agreed in the handshake, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }
}

/// An established TLS server connection.
///
/// [`accept`] runs the handshake and yields a [`TlsStream`], which hyper and `splice` read and
/// write like any socket. It drives rustls' unbuffered API, so the buffers are this module's:
///
/// - **incoming**: bytes read from the socket, up to [`READ_SIZE`] per read (a whole 16 KiB
///   record, or several small ones, in one `recv`). The records in it are decrypted straight
///   into the reader's buffer; whatever does not fit waits in **plaintext**.
/// - **outgoing**: records encrypted by `poll_write` (and handshake messages, alerts, key
///   updates). Several writes accumulate and leave in one `send` at `poll_flush`, so frames that
///   arrive together travel in one segment; past [`WRITE_HIGH`] bytes `poll_write` waits for
///   the socket.
///
/// Each buffer is freed as soon as it is empty and the socket has nothing more to read, so an
/// idle connection (a WebSocket tunnel waiting for its next message) holds no buffer at all,
/// where rustls' buffered connection keeps a 4 KiB read buffer for its whole life.
///
/// A peer's `close_notify`, or EOF after the handshake, ends the read side (a read of 0 bytes);
/// `poll_shutdown` sends our `close_notify`, then shuts the socket's write half. A TLS error
/// fails the call with `InvalidData`, after sending the alert rustls prepared when the socket
/// takes it at once.
pub struct TlsStream {
    conn: UnbufferedServerConnection,
    io: TcpStream,
    /// Bytes from the socket; those before `in_start` have been processed.
    incoming: Vec<u8>,
    in_start: usize,
    /// Decrypted bytes that did not fit the reader's buffer; those before `plain_pos` are read.
    plaintext: Vec<u8>,
    plain_pos: usize,
    /// Encrypted bytes for the socket; those before `out_pos` have been sent.
    outgoing: Vec<u8>,
    out_pos: usize,
    /// The peer sent `close_notify`.
    peer_closed: bool,
    /// The socket reached EOF.
    eof: bool,
    /// Our `close_notify` is queued; nothing more may be written.
    shut: bool,
    /// rustls reported an error; the connection is unusable.
    failed: bool,
}

impl std::fmt::Debug for TlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsStream")
            .field("io", &self.io)
            .field("peer_closed", &self.peer_closed)
            .field("shut", &self.shut)
            .finish_non_exhaustive()
    }
}

/// What to hand rustls when it can take application data.
#[derive(Clone, Copy)]
enum Outbound<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where processing the buffered records stopped.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// The reader's buffer is full.
    Delivered,
    /// The handshake needs more bytes from the peer.
    NeedBytes,
    /// Every buffered record is processed and the connection is established (what `Outbound` asked
    /// for is done).
    Established,
    /// Both sides have sent `close_notify`.
    Closed,
}

impl TlsStream {
    /// Bytes held in buffers right now (for tests of the idle footprint).
    #[cfg(test)]
    fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    /// Processes the buffered incoming records: plaintext goes into `out` while it has room and
    /// then into `self.plaintext`; handshake output and `send` go into `self.outgoing`.
    fn advance(&mut self, out: &mut ReadBuf<'_>, send: Outbound<'_>) -> io::Result<Stop> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the TLS connection has failed",
            ));
        }
        let mut send = Some(send);
        loop {
            let UnbufferedStatus { mut discard, state } = self
                .conn
                .process_tls_records(&mut self.incoming[self.in_start..]);
            let state = match state {
                Ok(state) => state,
                Err(e) => {
                    self.in_start += discard;
                    return Err(self.fail(e));
                }
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut records) => {
                    let mut stop = None;
                    while let Some(len) = records.peek_len() {
                        if !out.filled().is_empty() && len.get() > out.remaining() {
                            stop = Some(Stop::Delivered);
                            break;
                        }
                        let Some(record) = records.next_record() else {
                            break;
                        };
                        let record = match record {
                            Ok(record) => record,
                            Err(e) => {
                                self.in_start += discard;
                                return Err(self.fail(e));
                            }
                        };
                        discard += record.discard;
                        let n = record.payload.len().min(out.remaining());
                        out.put_slice(&record.payload[..n]);
                        self.plaintext.extend_from_slice(&record.payload[n..]);
                        if !out.filled().is_empty() && out.remaining() == 0 {
                            stop = Some(Stop::Delivered);
                            break;
                        }
                    }
                    stop
                }
                ConnectionState::EncodeTlsData(mut message) => {
                    append(&mut self.outgoing, RECORD_OVERHEAD * 4, |buf| {
                        message.encode(buf).map_err(Grow::from)
                    })?;
                    None
                }
                ConnectionState::TransmitTlsData(transmit) => {
                    // The bytes wait in `outgoing`, in order, until the next flush.
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some(Stop::NeedBytes),
                ConnectionState::WriteTraffic(mut writer) => {
                    match send.take().unwrap_or(Outbound::Nothing) {
                        Outbound::Nothing => {}
                        Outbound::Data(data) => {
                            let hint =
                                data.len() + (data.len() / MAX_FRAGMENT + 1) * RECORD_OVERHEAD;
                            append(&mut self.outgoing, hint, |buf| {
                                writer.encrypt(data, buf).map_err(Grow::from)
                            })?;
                        }
                        Outbound::CloseNotify => {
                            append(&mut self.outgoing, RECORD_OVERHEAD, |buf| {
                                writer.queue_close_notify(buf).map_err(Grow::from)
                            })?;
                        }
                    }
                    Some(Stop::Established)
                }
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => {
                    self.peer_closed = true;
                    Some(Stop::Closed)
                }
                other => {
                    // Early data is not enabled, so nothing else is expected.
                    self.in_start += discard;
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("unexpected TLS state {other:?}"),
                    ));
                }
            };
            self.in_start += discard;
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Turns a rustls error into an I/O error, first trying to send the alert it prepared.
    fn fail(&mut self, error: rustls::Error) -> io::Error {
        self.failed = true;
        // The alert is the first thing rustls hands out after the error.
        let status = self
            .conn
            .process_tls_records(&mut self.incoming[self.in_start..]);
        if let Ok(ConnectionState::EncodeTlsData(mut alert)) = status.state {
            let mut buf = [0u8; 64];
            if let Ok(n) = alert.encode(&mut buf) {
                self.outgoing.extend_from_slice(&buf[..n]);
            }
        }
        if self.out_pos < self.outgoing.len() {
            let _ = self.io.try_write(&self.outgoing[self.out_pos..]);
        }
        tls_error(error)
    }

    /// Reads more bytes from the socket into `incoming`; Ready(Ok) also at EOF (`self.eof`).
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.in_start >= self.incoming.len() {
            self.incoming.clear();
        } else if self.in_start > 0 {
            self.incoming.drain(..self.in_start);
        }
        self.in_start = 0;
        if self.incoming.len() >= MAX_INCOMING {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "TLS message too large",
            )));
        }
        self.incoming.reserve(READ_SIZE);
        // `read_buf` fills the spare capacity without zeroing it; the future keeps no state, so
        // polling it once and dropping it is a plain non-blocking read.
        let read = std::pin::pin!(self.io.read_buf(&mut self.incoming));
        match read.poll(cx) {
            Poll::Ready(Ok(0)) => {
                self.eof = true;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(_)) => Poll::Ready(Ok(())),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if self.incoming.is_empty() {
                    self.incoming = Vec::new();
                }
                Poll::Pending
            }
        }
    }

    /// Sends everything in `outgoing`, then frees it.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        self.outgoing = Vec::new();
        self.out_pos = 0;
        Poll::Ready(Ok(()))
    }

    /// Drives the handshake until the connection is established.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let mut none = ReadBuf::new(&mut []);
            match self.advance(&mut none, Outbound::Nothing)? {
                Stop::NeedBytes => {
                    if self.eof {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "connection closed during the TLS handshake",
                        )));
                    }
                    ready!(self.poll_send(cx))?;
                    ready!(self.poll_fill(cx))?;
                }
                Stop::Established | Stop::Closed | Stop::Delivered => {
                    return self.poll_send(cx);
                }
            }
        }
    }
}

impl AsyncRead for TlsStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.plain_pos < this.plaintext.len() {
            let n = (this.plaintext.len() - this.plain_pos).min(buf.remaining());
            buf.put_slice(&this.plaintext[this.plain_pos..this.plain_pos + n]);
            this.plain_pos += n;
            if this.plain_pos == this.plaintext.len() {
                this.plaintext = Vec::new();
                this.plain_pos = 0;
            }
            return Poll::Ready(Ok(()));
        }
        loop {
            let before = buf.filled().len();
            let stop = this.advance(buf, Outbound::Nothing)?;
            if stop == Stop::Delivered
                || buf.filled().len() > before
                || stop == Stop::Closed
                || this.peer_closed
                || this.eof
            {
                if this.eof && stop == Stop::NeedBytes {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                return Poll::Ready(Ok(()));
            }
            // Nothing to deliver: first send what rustls owes the peer (a key update answer),
            // without waiting for it, then read more.
            if this.out_pos < this.outgoing.len()
                && let Poll::Ready(Err(e)) = this.poll_send(cx)
            {
                return Poll::Ready(Err(e));
            }
            ready!(this.poll_fill(cx))?;
        }
    }
}

impl AsyncWrite for TlsStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.shut {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if this.outgoing.len() - this.out_pos >= WRITE_HIGH {
            ready!(this.poll_send(cx))?;
        }
        let data = &data[..data.len().min(MAX_WRITE)];
        let mut none = ReadBuf::new(&mut []);
        match this.advance(&mut none, Outbound::Data(data))? {
            Stop::Established => Poll::Ready(Ok(data.len())),
            Stop::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            Stop::NeedBytes | Stop::Delivered => {
                Poll::Ready(Err(io::ErrorKind::NotConnected.into()))
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.shut {
            this.shut = true;
            let mut none = ReadBuf::new(&mut []);
            // Without an established connection (or after the peer's close) there is nothing
            // to say; the socket is shut down all the same.
            let _ = this.advance(&mut none, Outbound::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// An encoding failure: the space needed (when too little was given) and the error.
struct Grow<E>(Option<usize>, E);

impl From<EncryptError> for Grow<EncryptError> {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(s) => Grow(Some(s.required_size), e),
            other => Grow(None, other),
        }
    }
}

impl From<EncodeError> for Grow<EncodeError> {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(s) => Grow(Some(s.required_size), e),
            other => Grow(None, other),
        }
    }
}

/// Appends what `write` produces to `out`, growing the space it gets when it asks for more.
fn append<E>(
    out: &mut Vec<u8>,
    hint: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, Grow<E>>,
) -> io::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let start = out.len();
    let mut room = hint;
    loop {
        out.resize(start + room, 0);
        match write(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n.min(room));
                return Ok(());
            }
            Err(Grow(Some(needed), _)) if needed > room => room = needed,
            Err(Grow(_, e)) => {
                out.truncate(start);
                return Err(io::Error::other(e));
            }
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A server config for `localhost` and a client config trusting its CA.
    fn configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        let bundle = certs::generate(&["localhost".to_owned()]).unwrap();
        let chain = bundle.server_chain().unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut resolver = crate::front::tls::SniResolver::default();
        resolver.add(chain.certified_key(&provider).unwrap(), &chain.dns_names());
        let server = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        let mut roots = rustls::RootCertStore::empty();
        for ca in bundle.ca_der().unwrap() {
            roots.add(ca).unwrap();
        }
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// A connected pair: our server stream and a tokio-rustls client.
    async fn pair() -> (TlsStream, tokio_rustls::client::TlsStream<TcpStream>) {
        let (server, client) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connect = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.unwrap();
            tokio_rustls::TlsConnector::from(client)
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
                .unwrap()
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = accept(server, tcp).await.unwrap();
        (tls, connect.await.unwrap())
    }

    #[tokio::test]
    async fn large_messages_cross_both_ways_and_an_idle_stream_holds_no_buffers() {
        let (mut server, mut client) = pair().await;
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            client.write_all(&sent).await.unwrap();
            client.flush().await.unwrap();
            let mut back = vec![0u8; sent.len()];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, sent);
            client
        });
        let mut got = vec![0u8; payload.len()];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(got, payload);
        server.write_all(&got).await.unwrap();
        server.flush().await.unwrap();
        let mut client = writer.await.unwrap();

        // Idle: a read that finds nothing releases every buffer.
        let mut one = [0u8; 1];
        let idle = tokio::time::timeout(Duration::from_millis(50), server.read(&mut one)).await;
        assert!(idle.is_err(), "nothing was sent");
        assert_eq!(server.buffered_capacity(), 0);

        // The client's close_notify ends the read side; ours reaches the client as EOF.
        client.shutdown().await.unwrap();
        assert_eq!(server.read(&mut one).await.unwrap(), 0);
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }

    #[tokio::test]
    async fn bytes_that_are_not_tls_fail_the_handshake() {
        let (server, _) = configs();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut plain = TcpStream::connect(addr).await.unwrap();
        plain
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let (tcp, _) = listener.accept().await.unwrap();
        let err = accept(server, tcp).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
