//! Raw-socket parts for tests that must see bytes rather than parsed messages: a scripted
//! backend that parses what lb sends it strictly and records every request as it was framed on
//! the wire, and a reader of HTTP/1.1 responses for clients that write raw bytes.
//!
//! [`RawBackend`] accepts only what a proxy may send: CRLF line endings, no obs-fold, and a body
//! framed by at most one of `Content-Length` (digits) or `Transfer-Encoding: chunked` (bare hex
//! sizes, no trailers). A request that breaks any of these is recorded in
//! [`RawBackend::violations`] and ends the connection; a connection that ends inside a request
//! is recorded in [`RawBackend::cut`]. Each complete request is recorded ([`Received`]) and
//! answered with what the script returns for it; [`RawBackend::echo`] answers `200` with
//! `METHOD TARGET` and the body.
//!
//! [`ResponseReader`] reads responses one by one from any byte stream (length, chunked or no
//! body), then, if asked, the end of the stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{Pki, TestConfig, within};

/// Header fields a parsed head may hold, on either side.
const MAX_FIELDS: usize = 256;

/// One request exactly as the backend received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub method: String,
    pub target: String,
    /// Field names lower-cased, values as sent, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Received {
    /// Every value of the field `name`.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `(method, target, body)`, for comparing with what a client framed.
    pub fn line(&self) -> (String, String, Vec<u8>) {
        (self.method.clone(), self.target.clone(), self.body.clone())
    }
}

/// What the backend does after writing a reply.
pub enum After {
    /// Reads the next request.
    KeepAlive,
    /// Closes the connection.
    Close,
    /// Hands the socket, and whatever was read past the request, to this task.
    Takeover(Takeover),
}

/// What takes over a connection after its reply: gets the socket and the bytes read ahead.
pub type Takeover =
    Box<dyn FnOnce(TcpStream, Vec<u8>) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// The backend's answer to one request.
pub struct Reply {
    pub bytes: Vec<u8>,
    pub after: After,
}

impl Reply {
    /// `200 OK` with `body`, keep-alive.
    pub fn ok(body: &[u8]) -> Reply {
        let mut bytes =
            format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend_from_slice(body);
        Reply {
            bytes,
            after: After::KeepAlive,
        }
    }
}

type Script = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

#[derive(Default)]
struct Record {
    received: Mutex<Vec<Received>>,
    violations: Mutex<Vec<String>>,
    cut: Mutex<Vec<String>>,
    accepts: AtomicUsize,
}

/// A backend on a raw socket (see the module docs).
pub struct RawBackend {
    addr: SocketAddr,
    record: Arc<Record>,
    token: CancellationToken,
}

impl RawBackend {
    /// Starts a backend answering each request with `script(request)`.
    pub async fn start(script: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> RawBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::default());
        let token = CancellationToken::new();
        let script: Script = Arc::new(script);
        let (rec, tok) = (Arc::clone(&record), token.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    () = tok.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                };
                rec.accepts.fetch_add(1, Relaxed);
                let (script, rec, tok) = (Arc::clone(&script), Arc::clone(&rec), tok.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        () = serve(stream, script, rec) => {}
                        () = tok.cancelled() => {}
                    }
                });
            }
        });
        RawBackend {
            addr,
            record,
            token,
        }
    }

    /// A backend answering `200` with `METHOD TARGET\n` followed by the request body.
    pub async fn echo() -> RawBackend {
        RawBackend::start(|req| Reply::ok(&echo_body(req))).await
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A test configuration with this backend alone.
    pub fn config(&self, pki: &Pki) -> TestConfig {
        let mut config = TestConfig::new(pki, &[]);
        config.backends = vec![("raw".into(), self.addr)];
        config
    }

    /// Connections accepted so far.
    pub fn accepts(&self) -> usize {
        self.record.accepts.load(Relaxed)
    }

    /// Complete requests received so far, oldest first.
    pub fn received(&self) -> Vec<Received> {
        self.record.received.lock().unwrap().clone()
    }

    /// Returns and forgets the requests received so far.
    pub fn take_received(&self) -> Vec<Received> {
        std::mem::take(&mut *self.record.received.lock().unwrap())
    }

    /// What lb sent that a proxy must not send.
    pub fn violations(&self) -> Vec<String> {
        self.record.violations.lock().unwrap().clone()
    }

    /// Requests whose connection ended before they were complete (their first line).
    pub fn cut(&self) -> Vec<String> {
        self.record.cut.lock().unwrap().clone()
    }

    /// Fails the test if lb ever sent something a proxy must not send.
    pub fn assert_clean(&self) {
        let violations = self.violations();
        assert!(violations.is_empty(), "lb sent the backend: {violations:?}");
    }
}

impl Drop for RawBackend {
    fn drop(&mut self) {
        self.token.cancel();
    }
}

/// The body [`RawBackend::echo`] answers with.
pub fn echo_body(req: &Received) -> Vec<u8> {
    let mut body = format!("{} {}\n", req.method, req.target).into_bytes();
    body.extend_from_slice(&req.body);
    body
}

/// Why a connection to the backend stopped being read.
enum Stop {
    /// The peer closed (or reset) between requests.
    Eof,
    /// The peer closed inside a request.
    Cut,
    /// The bytes broke the rules.
    Violation(String),
}

/// Reads `stream` until `buf` holds `need` bytes; false if the peer closes first.
async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>, need: usize) -> bool {
    while buf.len() < need {
        let mut chunk = [0u8; 16 * 1024];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    true
}

/// Reads one more batch from `stream` into `buf`; false at the end of the stream.
async fn more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let need = buf.len() + 1;
    fill(stream, buf, need).await
}

async fn serve(mut stream: TcpStream, script: Script, record: Arc<Record>) {
    let mut buf = Vec::new();
    loop {
        let (req, rest) = match read_request(&mut stream, &mut buf).await {
            Ok(parsed) => parsed,
            Err(Stop::Eof) => return,
            Err(Stop::Cut) => {
                let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
                record
                    .cut
                    .lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(line).trim_end().to_owned());
                return;
            }
            Err(Stop::Violation(why)) => {
                record.violations.lock().unwrap().push(why);
                return;
            }
        };
        buf = rest;
        let reply = script(&req);
        record.received.lock().unwrap().push(req);
        if stream.write_all(&reply.bytes).await.is_err() {
            return;
        }
        match reply.after {
            After::KeepAlive => {}
            After::Close => return,
            After::Takeover(task) => return task(stream, std::mem::take(&mut buf)).await,
        }
    }
}

/// Reads one request from `stream` (starting with the bytes in `buf`): the request and the
/// bytes read past it.
async fn read_request(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<(Received, Vec<u8>), Stop> {
    let head_len = loop {
        let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
        match httparse::Request::new(&mut fields).parse(buf) {
            Ok(httparse::Status::Complete(len)) => break len,
            Ok(httparse::Status::Partial) => {}
            Err(e) => return Err(Stop::Violation(format!("unparsable head ({e}): {buf:?}"))),
        }
        if !more(stream, buf).await {
            return Err(if buf.is_empty() { Stop::Eof } else { Stop::Cut });
        }
    };
    let head = &buf[..head_len];
    if head
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || head[i - 1] != b'\r'))
    {
        return Err(Stop::Violation(format!("bare LF in head: {head:?}")));
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
    let mut parsed = httparse::Request::new(&mut fields);
    let _ = parsed.parse(head);
    let mut req = Received {
        method: parsed.method.unwrap_or_default().to_owned(),
        target: parsed.path.unwrap_or_default().to_owned(),
        headers: parsed
            .headers
            .iter()
            .map(|f| {
                (
                    f.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(f.value).into_owned(),
                )
            })
            .collect(),
        body: Vec::new(),
    };
    if parsed.version != Some(1) {
        return Err(Stop::Violation(format!("not HTTP/1.1: {req:?}")));
    }
    let lengths = req.all("content-length");
    let codings = req.all("transfer-encoding");
    let mut pos = head_len;
    match (lengths.as_slice(), codings.as_slice()) {
        ([], []) => {}
        ([n], []) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            let n: usize = n.parse().map_err(|_| Stop::Violation(format!("{req:?}")))?;
            if !fill(stream, buf, pos + n).await {
                return Err(Stop::Cut);
            }
            req.body = buf[pos..pos + n].to_vec();
            pos += n;
        }
        ([], ["chunked"]) => loop {
            let line_end = loop {
                if let Some(i) = buf[pos..].windows(2).position(|w| w == b"\r\n") {
                    break pos + i;
                }
                if !more(stream, buf).await {
                    return Err(Stop::Cut);
                }
            };
            let size = std::str::from_utf8(&buf[pos..line_end])
                .ok()
                .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| usize::from_str_radix(s, 16).ok())
                .ok_or_else(|| {
                    Stop::Violation(format!("bad chunk size line: {:?}", &buf[pos..line_end]))
                })?;
            pos = line_end + 2;
            if !fill(stream, buf, pos + size + 2).await {
                return Err(Stop::Cut);
            }
            if &buf[pos + size..pos + size + 2] != b"\r\n" {
                return Err(Stop::Violation(if size == 0 {
                    "trailers after the last chunk".into()
                } else {
                    "chunk data not followed by CRLF".into()
                }));
            }
            req.body.extend_from_slice(&buf[pos..pos + size]);
            pos += size + 2;
            if size == 0 {
                break;
            }
        },
        _ => {
            return Err(Stop::Violation(format!(
                "ambiguous framing: content-length {lengths:?}, transfer-encoding {codings:?}"
            )));
        }
    }
    let rest = buf[pos..].to_vec();
    Ok((req, rest))
}

/// One response as a client read it off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Field names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of the field `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Reads HTTP/1.1 responses from a byte stream (see the module docs).
pub struct ResponseReader<S> {
    stream: S,
    buf: Vec<u8>,
    eof: bool,
}

impl<S: AsyncRead + Unpin> ResponseReader<S> {
    pub fn new(stream: S) -> Self {
        ResponseReader {
            stream,
            buf: Vec::new(),
            eof: false,
        }
    }

    /// The stream, to write on.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.stream
    }

    /// Reads more; false at the end of the stream (a reset counts as the end).
    async fn more(&mut self) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                self.eof = true;
                false
            }
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    }

    /// The next response to a request with `method`, or `None` if the stream ends first (with
    /// the bytes of a partial response, if any, in the panic message).
    pub async fn next_for(&mut self, method: &str) -> Option<RawResponse> {
        within("a response", async {
            let (status, headers, head_len) = loop {
                let mut fields = [httparse::EMPTY_HEADER; MAX_FIELDS];
                let mut res = httparse::Response::new(&mut fields);
                match res.parse(&self.buf) {
                    Ok(httparse::Status::Complete(len)) => {
                        let headers = res
                            .headers
                            .iter()
                            .map(|f| {
                                (
                                    f.name.to_ascii_lowercase(),
                                    String::from_utf8_lossy(f.value).into_owned(),
                                )
                            })
                            .collect::<Vec<_>>();
                        break (res.code.unwrap_or_default(), headers, len);
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(e) => panic!("not an HTTP response ({e}): {:?}", self.text()),
                }
                if !self.more().await {
                    assert!(self.buf.is_empty(), "cut response: {:?}", self.text());
                    return None;
                }
            };
            let mut res = RawResponse {
                status,
                headers,
                body: Vec::new(),
            };
            self.buf.drain(..head_len);
            let no_body = method == "HEAD" || status < 200 || status == 204 || status == 304;
            if !no_body && res.header("transfer-encoding").is_some() {
                loop {
                    let line = loop {
                        if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                            break i;
                        }
                        assert!(self.more().await, "cut chunked body");
                    };
                    let size_text = String::from_utf8_lossy(&self.buf[..line]).into_owned();
                    let size = usize::from_str_radix(size_text.split(';').next().unwrap(), 16)
                        .expect("chunk size");
                    while self.buf.len() < line + 2 + size + 2 {
                        assert!(self.more().await, "cut chunk");
                    }
                    res.body
                        .extend_from_slice(&self.buf[line + 2..line + 2 + size]);
                    self.buf.drain(..line + 2 + size + 2);
                    if size == 0 {
                        break;
                    }
                }
            } else if let Some(n) = res.header("content-length").filter(|_| !no_body) {
                let n: usize = n.parse().expect("content-length");
                while self.buf.len() < n {
                    assert!(self.more().await, "cut body: {:?}", self.text());
                }
                res.body = self.buf.drain(..n).collect();
            } else if !no_body {
                while self.more().await {}
                res.body = std::mem::take(&mut self.buf);
            }
            Some(res)
        })
        .await
    }

    /// The next response to a `GET` (or any request whose answer may have a body).
    pub async fn next(&mut self) -> Option<RawResponse> {
        self.next_for("GET").await
    }

    /// Reads to the end of the stream; returns the bytes that came before it.
    pub async fn rest(&mut self) -> Vec<u8> {
        within("the end of the stream", async {
            while self.more().await {}
        })
        .await;
        std::mem::take(&mut self.buf)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}
