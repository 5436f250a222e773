//! A plain HTTP/1.1 request on a fresh connection (`Connection: close`), read to the end within
//! [`DEADLINE`]: `GET` for health endpoints, metrics and stats, [`request`] for any method,
//! header fields and body (an API).

use std::net::SocketAddr;

use anyhow::{Context, Result, anyhow};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::DEADLINE;

/// An answer: status code, head (status line and fields) and body.
#[derive(Debug, Clone)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The status line and header fields, without the blank line.
    pub head: String,
    /// The body as sent (a chunked one is not decoded).
    pub body: Vec<u8>,
}

impl Response {
    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// `GET path` on `addr`.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<Response> {
    request(addr, "GET", path, &[], b"").await
}

/// `method path` on `addr` with the header `fields` (`name: value`, without `Host`,
/// `Connection` and `Content-Length`, which this adds) and `body`.
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    fields: &[&str],
    body: &[u8],
) -> Result<Response> {
    let exchange = async {
        let mut tcp = TcpStream::connect(addr).await?;
        let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
        for field in fields {
            head.push_str(field);
            head.push_str("\r\n");
        }
        if !body.is_empty() || method != "GET" {
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
        }
        head.push_str("\r\n");
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body).await?;
        let mut raw = Vec::new();
        tcp.read_to_end(&mut raw).await?;
        anyhow::Ok(raw)
    };
    let raw = tokio::time::timeout(DEADLINE, exchange)
        .await
        .map_err(|_| anyhow!("{method} {path} on {addr} timed out"))?
        .with_context(|| format!("{method} {path} on {addr}"))?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| anyhow!("{method} {path} on {addr}: no end of head in {raw:?}"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| anyhow!("{method} {path} on {addr}: bad status line in {head:?}"))?;
    Ok(Response {
        status,
        head,
        body: raw[end + 4..].to_vec(),
    })
}
