//! One HTTP/1.1 exchange with a backend over a [`BackendConn`], run in the client's own task:
//! the request head encoded straight from the rewritten head into one buffer (with the first
//! part of the body when it is already there, so a small request is one write), the body
//! streamed after it, and the response head read and parsed in place with `httparse`.
//!
//! How it works: [`round_trip()`]. Where it sits among lb's layers: `ARCHITECTURE.md` (code
//! map, `lb/`).

use std::io::{self, Write as _};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt as _;
use http_body_util::BodyExt as _;
use hyper::body::{Body as _, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::request;
use hyper::{Method, StatusCode};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::backends::upstream::BackendConn;

/// Largest response head accepted from a backend.
pub const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Most header fields accepted in a response head.
const MAX_RESPONSE_HEADERS: usize = 128;

/// Bytes asked for per read from a backend.
pub const READ_CHUNK: usize = 16 * 1024;

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeError {
    /// The backend closed or reset the connection before any byte of an answer (whether the
    /// request may be sent again is the caller's decision: it must have had no body).
    #[error("connection closed before the response: {0}")]
    Closed(io::Error),
    /// The client's request body broke off (the client left, sent bad chunks, or sent
    /// nothing more for the step timeout).
    #[error("client request body failed: {0}")]
    ClientBody(Box<dyn std::error::Error + Send + Sync>),
    /// The backend sent no response head within the step timeout after the request.
    #[error("no response head in time")]
    Timeout,
    /// The backend's answer is not acceptable HTTP/1.1.
    #[error("invalid response: {0}")]
    BadResponse(&'static str),
    /// Reading from or writing to the backend failed midway.
    #[error("{0}")]
    Io(io::Error),
}

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Everything until the backend closes the connection.
    UntilClose,
}

/// A backend's response head.
#[derive(Debug)]
pub struct ResponseHead {
    /// The status.
    pub status: StatusCode,
    /// The header fields as received, `Content-Length` removed when a transfer coding is used.
    pub headers: HeaderMap,
    /// How the body is delimited.
    pub framing: Framing,
    /// Whether the connection may carry another request once the body has been read.
    pub keep_alive: bool,
}

/// How the request body is announced to the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no length header.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// Sends the request on `conn` and reads the answer's head (see [`send_request`] and
/// [`read_response_head`]). Each step must progress within `step`: every write to the backend,
/// every piece of the client's body, and the response head once the request is sent (so a long
/// upload is fine as long as it moves). A backend that stops reading a request body may already
/// have answered (`413 Content Too Large`, a redirect, an error page): that answer is passed on,
/// with the connection marked not reusable, rather than a `502`.
///
/// [`round_trip`] is the entry point. The proxy frames what it sends itself, whatever the client
/// used: `Content-Length` when the body's length is known, chunked otherwise, nothing for a
/// request without a body (and `Content-Length: 0` when the client said so). The response's framing follows RFC 9112 §6.3:
/// no body after `HEAD`, `204` or `304`; chunked when the last transfer coding is chunked; read
/// to the close for any other transfer coding or when there is no length; otherwise exactly
/// `Content-Length` bytes (duplicate lengths must agree). Interim `1xx` answers (`100 Continue`,
/// `103 Early Hints`) are consumed here, since this hop answers `Expect` itself. A response
/// that is not valid HTTP/1.1, or whose head exceeds [`MAX_RESPONSE_HEAD`], is an error the
/// caller turns into `502`.
pub async fn round_trip(
    conn: &mut BackendConn,
    head: &request::Parts,
    body: Option<Incoming>,
    sent: &AtomicU64,
    step: Duration,
) -> Result<ResponseHead, ExchangeError> {
    match send_request(conn, head, body, sent, step).await {
        Ok(()) => read_response_head_within(conn, &head.method, step).await,
        Err(ExchangeError::Io(e)) => {
            match read_response_head_within(conn, &head.method, step).await {
                Ok(early) => Ok(ResponseHead {
                    keep_alive: false,
                    ..early
                }),
                Err(_) => Err(ExchangeError::Io(e)),
            }
        }
        Err(e) => Err(e),
    }
}

/// Writes the request (head from `head`, which must be in origin form and rewritten for the
/// backend, then `body`) to `conn`, counting body bytes into `sent`.
async fn send_request(
    conn: &mut BackendConn,
    head: &request::Parts,
    body: Option<Incoming>,
    sent: &AtomicU64,
    step: Duration,
) -> Result<(), ExchangeError> {
    let mut out = Vec::with_capacity(1024);
    let Some(mut body) = body else {
        let framing = if head.headers.contains_key(header::CONTENT_LENGTH) {
            RequestFraming::Length(0)
        } else {
            RequestFraming::None
        };
        encode_head(head, framing, &mut out);
        return write_within(&mut conn.stream, &out, step)
            .await
            .map_err(ExchangeError::Closed);
    };
    let framing = body
        .size_hint()
        .exact()
        .map_or(RequestFraming::Chunked, RequestFraming::Length);
    encode_head(head, framing, &mut out);
    // The first part of the body usually arrived with the head: it joins the head in `out`
    // and both leave in one write. Later pieces of a counted body go out without a copy.
    let mut first = body.frame().now_or_never();
    let mut head_sent = false;
    loop {
        let frame = match first.take() {
            Some(frame) => frame,
            None => {
                if !head_sent {
                    write_within(&mut conn.stream, &out, step)
                        .await
                        .map_err(ExchangeError::Io)?;
                    out.clear();
                    head_sent = true;
                }
                tokio::time::timeout(step, body.frame())
                    .await
                    .map_err(|_| ExchangeError::ClientBody("no more of the body in time".into()))?
            }
        };
        let data = match frame {
            None => break,
            Some(Err(e)) => return Err(ExchangeError::ClientBody(e.into())),
            // Trailers are not forwarded.
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) if !data.is_empty() => data,
                _ => continue,
            },
        };
        sent.fetch_add(data.len() as u64, Relaxed);
        if framing == RequestFraming::Chunked {
            let _ = write!(out, "{:x}\r\n", data.len());
            out.extend_from_slice(&data);
            out.extend_from_slice(b"\r\n");
        } else if head_sent {
            write_within(&mut conn.stream, &data, step)
                .await
                .map_err(ExchangeError::Io)?;
            continue;
        } else {
            out.extend_from_slice(&data);
        }
        if head_sent {
            write_within(&mut conn.stream, &out, step)
                .await
                .map_err(ExchangeError::Io)?;
            out.clear();
        }
    }
    if framing == RequestFraming::Chunked {
        out.extend_from_slice(b"0\r\n\r\n");
    }
    if !out.is_empty() {
        write_within(&mut conn.stream, &out, step)
            .await
            .map_err(ExchangeError::Io)?;
    }
    Ok(())
}

/// Writes all of `data` to `stream`, failing with `TimedOut` when the backend takes none of it
/// for `step`.
async fn write_within(stream: &mut TcpStream, data: &[u8], step: Duration) -> io::Result<()> {
    tokio::time::timeout(step, stream.write_all(data))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "the backend took no data in time"))?
}

/// Appends the request head for the backend to `out`: request line, every header field except
/// the framing ones, then the framing this hop chose.
pub fn encode_head(head: &request::Parts, framing: RequestFraming, out: &mut Vec<u8>) {
    out.extend_from_slice(head.method.as_str().as_bytes());
    out.push(b' ');
    let target = head.uri.path_and_query().map_or("/", |p| p.as_str());
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in &head.headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            let _ = write!(out, "content-length: {n}\r\n");
        }
        RequestFraming::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// [`read_response_head`] bounded by `step`.
async fn read_response_head_within(
    conn: &mut BackendConn,
    method: &Method,
    step: Duration,
) -> Result<ResponseHead, ExchangeError> {
    tokio::time::timeout(step, read_response_head(conn, method))
        .await
        .unwrap_or(Err(ExchangeError::Timeout))
}

/// Reads the final response head from `conn` (interim `1xx` answers other than `101` are
/// skipped). `method` is the request's, which decides whether a body follows.
pub(crate) async fn read_response_head(
    conn: &mut BackendConn,
    method: &Method,
) -> Result<ResponseHead, ExchangeError> {
    let mut received = false;
    loop {
        if !conn.buf.is_empty() {
            match head_len(&conn.buf)? {
                Some(len) => {
                    // The head's bytes become shared: header values are views of them.
                    let raw = conn.buf.split_to(len).freeze();
                    match parse_response_head(&raw, method)? {
                        Some(head) => return Ok(head),
                        None => continue,
                    }
                }
                None if conn.buf.len() >= MAX_RESPONSE_HEAD => {
                    return Err(ExchangeError::BadResponse("response head too large"));
                }
                None => {}
            }
        }
        conn.buf.reserve(READ_CHUNK);
        let n = match conn.stream.read_buf(&mut conn.buf).await {
            Ok(n) => n,
            Err(e) if received => return Err(ExchangeError::Io(e)),
            Err(e) => return Err(ExchangeError::Closed(e)),
        };
        if n == 0 {
            return Err(if received {
                ExchangeError::BadResponse("connection closed inside the response head")
            } else {
                ExchangeError::Closed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the backend closed the connection",
                ))
            });
        }
        received = true;
    }
}

/// The length of the complete response head at the start of `buf`, `None` while incomplete.
pub fn head_len(buf: &[u8]) -> Result<Option<usize>, ExchangeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    match httparse::Response::new(&mut fields).parse(buf) {
        Ok(httparse::Status::Complete(len)) => Ok(Some(len)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            Err(ExchangeError::BadResponse("too many header fields"))
        }
        Err(_) => Err(ExchangeError::BadResponse("malformed response head")),
    }
}

/// Parses the complete response head `raw` (as measured by [`head_len`]): the head, or `None`
/// for an interim answer to skip. Header values are views of `raw`, not copies.
pub fn parse_response_head(
    raw: &Bytes,
    method: &Method,
) -> Result<Option<ResponseHead>, ExchangeError> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut fields);
    if !matches!(response.parse(raw), Ok(httparse::Status::Complete(_))) {
        return Err(ExchangeError::BadResponse("malformed response head"));
    }
    let code = response.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| ExchangeError::BadResponse("invalid status code"))?;
    if status.is_informational() && status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(None);
    }

    let mut headers = HeaderMap::with_capacity(response.headers.len());
    let mut length: Option<u64> = None;
    let mut transfer_coded = false;
    let mut chunked = false;
    for field in response.headers.iter() {
        let name = HeaderName::from_bytes(field.name.as_bytes())
            .map_err(|_| ExchangeError::BadResponse("invalid header name"))?;
        let value = HeaderValue::from_maybe_shared(raw.slice_ref(field.value))
            .map_err(|_| ExchangeError::BadResponse("invalid header value"))?;
        if name == header::CONTENT_LENGTH {
            let n = parse_length(field.value)
                .ok_or(ExchangeError::BadResponse("invalid Content-Length"))?;
            if length.is_some_and(|earlier| earlier != n) {
                return Err(ExchangeError::BadResponse(
                    "differing Content-Length values",
                ));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            transfer_coded = true;
            chunked = last_token_is(field.value, b"chunked");
        }
        headers.append(name, value);
    }
    let framing = if *method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        Framing::Empty
    } else if transfer_coded {
        if chunked {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        length.map_or(Framing::UntilClose, Framing::Length)
    };
    // HTTP/1.1 keeps the connection unless told to close it; HTTP/1.0 only when asked to.
    let close = if response.version == Some(1) {
        connection_has(&headers, "close")
    } else {
        !connection_has(&headers, "keep-alive")
    };
    if transfer_coded {
        // The transfer coding overrides any length (RFC 9112 §6.3).
        headers.remove(header::CONTENT_LENGTH);
    }
    // A transfer coding next to a length, or on HTTP/1.0, is how response smuggling starts
    // (RFC 9112 §6.3): this answer is forwarded, the connection not reused.
    let suspicious = transfer_coded && (length.is_some() || response.version != Some(1));
    let head = ResponseHead {
        status,
        headers,
        framing,
        keep_alive: !close && !suspicious && framing != Framing::UntilClose,
    };
    Ok(Some(head))
}

/// A `Content-Length` value: decimal digits only.
fn parse_length(value: &[u8]) -> Option<u64> {
    let digits = value.trim_ascii();
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether the last entry of the comma-separated list `value` is `token` (case-insensitive).
fn last_token_is(value: &[u8], token: &[u8]) -> bool {
    value
        .rsplit(|&b| b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(token))
}

/// Whether the `Connection` header(s) list `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    list_has(headers, &header::CONNECTION, token)
}

/// Whether the comma-separated header `name` lists `token` (case-insensitive).
pub fn list_has(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_any(raw: &str, method: &Method) -> Option<ResponseHead> {
        assert_eq!(head_len(raw.as_bytes()).unwrap(), Some(raw.len()));
        parse_response_head(&Bytes::copy_from_slice(raw.as_bytes()), method).unwrap()
    }

    fn parse(raw: &str, method: &Method) -> ResponseHead {
        parse_any(raw, method).unwrap()
    }

    fn parse_err(raw: &str) -> &'static str {
        let result = head_len(raw.as_bytes()).and_then(|_| {
            parse_response_head(&Bytes::copy_from_slice(raw.as_bytes()), &Method::GET)
        });
        match result {
            Err(ExchangeError::BadResponse(why)) => why,
            other => panic!("accepted: {other:?}"),
        }
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let get = Method::GET;
        let h = parse("HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::Length(5), true));
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
            &get,
        );
        assert_eq!(h.framing, Framing::Chunked);
        assert!(!h.headers.contains_key("content-length"));
        assert!(
            !h.keep_alive,
            "a length beside a transfer coding ends the connection"
        );
        let h = parse(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let h = parse(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            &get,
        );
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let h = parse("HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = parse("HTTP/1.1 200 OK\r\n\r\n", &get);
        assert_eq!((h.framing, h.keep_alive), (Framing::UntilClose, false));
        let h = parse(
            "HTTP/1.1 200 OK\r\ncontent-length: 9\r\n\r\n",
            &Method::HEAD,
        );
        assert_eq!(h.framing, Framing::Empty);
        assert_eq!(h.headers["content-length"], "9");
        for code in [204, 304] {
            let h = parse(&format!("HTTP/1.1 {code} X\r\n\r\n"), &get);
            assert_eq!((h.framing, h.keep_alive), (Framing::Empty, true));
        }
    }

    #[test]
    fn connection_reuse_follows_version_and_connection_header() {
        let get = Method::GET;
        let h = parse(
            "HTTP/1.1 200 OK\r\nConnection: x, Close\r\ncontent-length: 0\r\n\r\n",
            &get,
        );
        assert!(!h.keep_alive);
        let h = parse("HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n", &get);
        assert!(!h.keep_alive);
        let h = parse(
            "HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 0\r\n\r\n",
            &get,
        );
        assert!(h.keep_alive);
    }

    #[test]
    fn interim_answers_are_skipped_and_partial_heads_wait() {
        assert!(parse_any("HTTP/1.1 100 Continue\r\n\r\n", &Method::GET).is_none());
        let h = parse(
            "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
            &Method::GET,
        );
        assert_eq!((h.status.as_u16(), h.framing), (101, Framing::Empty));
        assert_eq!(head_len(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap(), None);
    }

    #[test]
    fn bad_heads_are_refused() {
        assert_eq!(
            parse_err("HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"),
            "differing Content-Length values"
        );
        assert_eq!(
            parse_err("HTTP/1.1 200 OK\r\ncontent-length: +1\r\n\r\n"),
            "invalid Content-Length"
        );
        assert_eq!(
            parse_err("HTTP/1.1 2000 OK\r\n\r\n"),
            "malformed response head"
        );
        assert_eq!(parse_err("SMTP ready\r\n\r\n"), "malformed response head");
        let many: String = (0..200).map(|i| format!("x-{i}: 1\r\n")).collect();
        assert_eq!(
            parse_err(&format!("HTTP/1.1 200 OK\r\n{many}\r\n")),
            "too many header fields"
        );
    }

    #[test]
    fn request_heads_carry_the_framing_this_hop_chose() {
        let mut head = hyper::Request::post("/up?x=1")
            .header("host", "h")
            .header("content-length", "99")
            .header("transfer-encoding", "chunked")
            .header("x-a", "1")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut out = Vec::new();
        encode_head(&head, RequestFraming::Chunked, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /up?x=1 HTTP/1.1\r\nhost: h\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        head.method = Method::GET;
        let mut out = Vec::new();
        encode_head(&head, RequestFraming::Length(0), &mut out);
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with("x-a: 1\r\ncontent-length: 0\r\n\r\n")
        );
    }

    #[test]
    fn list_matching_ignores_case_and_spaces() {
        let mut headers = HeaderMap::new();
        headers.append("connection", HeaderValue::from_static("keep-alive"));
        headers.append("connection", HeaderValue::from_static(" Upgrade "));
        assert!(connection_has(&headers, "upgrade"));
        assert!(!connection_has(&headers, "close"));
    }
}
