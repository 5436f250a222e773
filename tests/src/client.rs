//! Real chat clients: a WebSocket over TCP or over TLS that trusts a given CA file, speaking the
//! chat JSON. Every wait is bounded so a broken server fails the test instead of hanging it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::ServerName;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

/// A byte stream that is either plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// The longest a test waits for any one message.
pub const RECV_WITHIN: Duration = Duration::from_secs(10);

/// A TLS client configuration trusting only the CA in `ca_file`.
pub fn tls_connector(ca_file: &Path) -> Result<TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs::load_ca(ca_file)? {
        roots
            .add(cert)
            .with_context(|| format!("bad certificate in CA file {}", ca_file.display()))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// An open client WebSocket, plain or TLS.
pub type Ws = WebSocketStream<Box<dyn Io>>;

/// Opens a WebSocket to `url` (`ws://` or `wss://`; the TLS server name is the URL's host,
/// which the generated certificate must cover). `ca` is needed for `wss://`.
pub async fn connect(url: &str, ca: Option<&TlsConnector>) -> Result<WebSocketStream<Box<dyn Io>>> {
    let uri: tokio_tungstenite::tungstenite::http::Uri = url.parse().context("bad URL")?;
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("URL without host: {url}"))?
        .as_str()
        .to_string();
    let secure = matches!(uri.scheme_str(), Some("wss") | Some("https"));
    let host = uri
        .host()
        .unwrap_or_default()
        .trim_matches(['[', ']'])
        .to_string();
    let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .with_context(|| format!("cannot connect to {authority}"))?;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Io> = if secure {
        let connector = ca.ok_or_else(|| anyhow!("wss:// needs a CA"))?;
        let name = ServerName::try_from(host)?;
        Box::new(
            connector
                .connect(name, tcp)
                .await
                .context("TLS handshake failed")?,
        )
    } else {
        Box::new(tcp)
    };
    let mut request = url.into_client_request()?;
    let scheme = if uri.scheme_str() == Some("wss") {
        "https"
    } else {
        "http"
    };
    request.headers_mut().insert(
        "origin",
        HeaderValue::from_str(&format!("{scheme}://{authority}"))?,
    );
    let (ws, _response) = timeout(
        RECV_WITHIN,
        tokio_tungstenite::client_async(request, stream),
    )
    .await
    .map_err(|_| anyhow!("WebSocket handshake with {url} timed out"))?
    .with_context(|| format!("WebSocket handshake with {url} failed"))?;
    Ok(ws)
}

/// A chat participant.
pub struct ChatClient {
    ws: WebSocketStream<Box<dyn Io>>,
    closed: Option<Closed>,
}

/// What a client saw when it stopped receiving messages.
#[derive(Debug, PartialEq)]
pub enum Closed {
    /// A close frame with this code.
    Code(u16),
    /// The connection ended without a close frame.
    Abrupt,
}

impl ChatClient {
    /// Connects to the chat WebSocket at `url`.
    pub async fn connect(url: &str, ca: Option<&TlsConnector>) -> Result<ChatClient> {
        Ok(ChatClient {
            ws: connect(url, ca).await?,
            closed: None,
        })
    }

    /// Sends a chat message.
    pub async fn send(&mut self, name: &str, content: &str) -> Result<()> {
        let body = serde_json::json!({ "name": name, "content": content }).to_string();
        self.ws.send(Message::text(body)).await?;
        Ok(())
    }

    /// The next text frame, parsed as JSON (pings and pongs skipped).
    pub async fn recv(&mut self) -> Result<Value> {
        self.recv_within(RECV_WITHIN).await
    }

    /// Like [`ChatClient::recv`] with a custom bound.
    pub async fn recv_within(&mut self, within: Duration) -> Result<Value> {
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return serde_json::from_str(text.as_str()).context("frame is not JSON");
                    }
                    Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => bail!("receive failed: {e}"),
                    None => bail!("connection ended"),
                }
            }
        };
        timeout(within, next)
            .await
            .map_err(|_| anyhow!("no message within {within:?}"))?
    }

    /// The next text frame as JSON, or `None` once the connection has closed (see
    /// [`ChatClient::last_close`]); an error only when nothing happens within [`RECV_WITHIN`].
    pub async fn recv_event(&mut self) -> Result<Option<Value>> {
        if self.closed.is_some() {
            return Ok(None);
        }
        let next = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(text))) => {
                        return Ok(Some(
                            serde_json::from_str(text.as_str()).context("frame is not JSON")?,
                        ));
                    }
                    Some(Ok(Message::Close(Some(frame)))) => {
                        self.closed = Some(Closed::Code(frame.code.into()));
                        return Ok(None);
                    }
                    Some(Ok(Message::Close(None))) | None | Some(Err(_)) => {
                        self.closed = Some(Closed::Abrupt);
                        return Ok(None);
                    }
                    Some(Ok(_)) => continue,
                }
            }
        };
        timeout(RECV_WITHIN, next)
            .await
            .map_err(|_| anyhow!("nothing received within {RECV_WITHIN:?}"))?
    }

    /// How the connection closed, once [`ChatClient::recv_event`] returned `None`.
    pub fn last_close(&self) -> Closed {
        match &self.closed {
            Some(Closed::Code(code)) => Closed::Code(*code),
            _ => Closed::Abrupt,
        }
    }
}
