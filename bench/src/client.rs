//! WebSocket client connections for the load generator.
//!
//! A [`Target`] is resolved once from a `ws://` or `wss://` URL (address, and for `wss` a rustls
//! connector that trusts only the given CA file); [`Target::connect`] then opens TCP (TCP_NODELAY,
//! optionally bound to a chosen source address), runs TLS when asked, and performs the WebSocket
//! handshake with `client_async_with_config`. With a CA file ([`Target::resolve`]) TLS session
//! resumption is disabled so that every connection costs each proxy one full handshake, the same
//! for all of them; [`Target::resolve_with`] takes any client configuration (`bench storm`
//! brings its own, which resumes).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::http::Uri;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::either::Either;

/// The transport under a WebSocket: TLS for `wss://`, plain TCP for `ws://`.
pub type Transport = Either<TlsStream<TcpStream>, TcpStream>;

/// An open client WebSocket.
pub type Ws = WebSocketStream<Transport>;

/// Read buffer per client connection: big enough for a 16 KiB message in one read, small enough
/// that ten thousand idle clients stay cheap (tungstenite's default is 128 KiB, eagerly allocated).
const READ_BUFFER: usize = 32 * 1024;

/// Where and how to connect: one URL, resolved once.
#[derive(Clone)]
pub struct Target {
    url: String,
    /// `host:port` of the URL, for the `Host` header of HTTP requests to the same server.
    authority: String,
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
}

/// The host of `uri` (parsed from `url`; IPv6 brackets removed) and the first address it
/// resolves to, at `port`.
pub async fn address_of(url: &str, uri: &Uri, port: u16) -> anyhow::Result<(String, SocketAddr)> {
    let host = uri
        .host()
        .with_context(|| format!("URL {url} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .with_context(|| format!("resolving {host}"))?
        .next()
        .with_context(|| format!("{host} resolves to no address"))?;
    Ok((host, addr))
}

/// Raises this process' open-file limit as far as it goes and checks that it leaves room for
/// `connections` sockets (and a hundred more for everything else).
pub fn room_for(connections: usize) -> anyhow::Result<()> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).context("raising the open-file limit")?;
    if (limit as usize) < connections.saturating_add(100) {
        bail!("open-file limit {limit} is too low for {connections} connections");
    }
    Ok(())
}

impl Target {
    /// Resolves `url` (`ws://` or `wss://`); `ca` is the PEM file of the CA to trust for `wss`.
    pub async fn resolve(url: &str, ca: Option<&Path>) -> anyhow::Result<Self> {
        let tls = match ca {
            Some(ca) => Some(Arc::new(client_config(ca)?)),
            None => None,
        };
        Self::resolve_with(url, tls).await
    }

    /// Resolves `url` (`ws://` or `wss://`); `tls` is the client configuration for `wss`.
    pub async fn resolve_with(
        url: &str,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> anyhow::Result<Self> {
        let uri: Uri = url.parse().with_context(|| format!("invalid URL {url}"))?;
        let secure = match uri.scheme_str() {
            Some("wss") => true,
            Some("ws") => false,
            _ => bail!("URL {url}: scheme must be ws or wss"),
        };
        let port = uri.port_u16().unwrap_or(if secure { 443 } else { 80 });
        let (host, addr) = address_of(url, &uri, port).await?;
        let tls = if secure {
            let config = tls.with_context(|| format!("{url} is wss: pass --ca FILE"))?;
            let name = ServerName::try_from(host.clone())
                .with_context(|| format!("{host} is not a valid TLS server name"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Self {
            url: url.to_string(),
            authority: format!("{}:{port}", uri.host().unwrap_or_default()),
            addr,
            tls,
        })
    }

    /// The URL this target was resolved from.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `host:port` of the URL.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    /// Opens one WebSocket, from `source` (port chosen by the kernel) when given.
    pub async fn connect(&self, source: Option<IpAddr>) -> anyhow::Result<Ws> {
        let transport = self.transport(source).await?;
        let (ws, _response) = tokio_tungstenite::client_async_with_config(
            self.url.as_str(),
            transport,
            Some(ws_config()),
        )
        .await
        .with_context(|| format!("WebSocket handshake with {}", self.url))?;
        Ok(ws)
    }

    /// Opens TCP (and TLS for `wss`) to the target, from `source` when given: what a WebSocket
    /// or an HTTP request to the same server runs on.
    pub async fn transport(&self, source: Option<IpAddr>) -> anyhow::Result<Transport> {
        let socket = if self.addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .context("creating socket")?;
        if let Some(ip) = source {
            socket
                .bind(SocketAddr::new(ip, 0))
                .with_context(|| format!("binding source address {ip}"))?;
        }
        socket.set_nodelay(true).context("setting TCP_NODELAY")?;
        let tcp = socket
            .connect(self.addr)
            .await
            .with_context(|| format!("connecting to {}", self.addr))?;
        let transport = match &self.tls {
            Some((connector, name)) => Either::Left(
                connector
                    .connect(name.clone(), tcp)
                    .await
                    .with_context(|| format!("TLS handshake with {}", self.addr))?,
            ),
            None => Either::Right(tcp),
        };
        Ok(transport)
    }
}

/// The WebSocket settings shared by the generator and the neutral backend: a modest read buffer
/// and eager writes (every `send` flushes anyway).
pub fn ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
}

/// The TLS 1.2/1.3 settings of the generator: trusts only `ca`, offers ALPN `http/1.1`, never resumes.
fn client_config(ca: &Path) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs::load_ca(ca)? {
        roots
            .add(cert)
            .with_context(|| format!("adding a certificate of {}", ca.display()))?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wss_needs_a_ca_and_urls_need_a_ws_scheme() {
        let err = Target::resolve("wss://127.0.0.1:1/ws", None)
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("--ca"));
        let err = Target::resolve("http://127.0.0.1:1/", None)
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("scheme"));
        let err = Target::resolve(
            "wss://127.0.0.1:1/ws",
            Some(Path::new("/nonexistent/ca.pem")),
        )
        .await
        .err()
        .unwrap();
        assert!(format!("{err:#}").contains("/nonexistent/ca.pem"));
        // An empty CA file: certs says it holds no certificate.
        let err = Target::resolve("wss://127.0.0.1:1/ws", Some(Path::new("/dev/null")))
            .await
            .err()
            .unwrap();
        assert!(
            format!("{err:#}").contains("/dev/null: no certificate found"),
            "{err:#}"
        );
    }
}
