//! The channel between the two lb hosts of a keepalived pair (`[acme.peer]`): each host serves
//! a peer listener on its own address and asks the other's.
//!
//! One TCP connection carries one exchange: a length-prefixed sealed [`Request`] (`seal`), a
//! length-prefixed sealed [`Answer`], close. A host asks its peer for the certificates it
//! serves (and whether it holds the virtual address: `Certificates`), for the key
//! authorization of an http-01 token it does not know (`Http01`: the CA's request reached this
//! host while the other one is validating), hands it the tls-alpn-01 answers of its order
//! under way (`TlsAlpn01`: a handshake cannot wait to ask, so the answer is there before the
//! CA is told to validate, for configured names only, and withdrawn when the order ends), and
//! tells it that it just issued a certificate (`Issued`: the peer pulls at once instead of at
//! its next minute). Answers come from the answering host's own state only, so a question
//! never travels further. A message that does not open (another secret, altered, stale) is
//! refused: logged, counted in `lb_acme_peer_refused_total`, the connection closed without an
//! answer. The listener accepts at most [`MAX_CONNECTIONS`] at once, each bounded by
//! [`TIMEOUT`] and [`MAX_MESSAGE`] bytes.
//!
//! Whether this host holds the virtual address is [`holds`]: whether the kernel lists it among
//! this host's (this network namespace's) own addresses, in `/proc/self/net/fib_trie` (IPv4:
//! a `/32 host LOCAL` entry) or `/proc/self/net/if_inet6` (through `self`: systemd's
//! `ProcSubset=pid`, in the shipped unit, hides `/proc/net`). Neither a bind
//! (`ip_nonlocal_bind`, often on beside keepalived, lets it succeed anywhere) nor a route's
//! source address (the interface's primary address, not the virtual one) would tell.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::Acme;
use super::challenge::alpn_certificate;
use super::renew::unix_now;
use super::seal::{Direction, Key, Refused};
use crate::config::{AcmePeerConfig, read_secret};
use crate::metrics::Metrics;

/// Longest exchange with the peer: connect, request, answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Largest sealed message accepted (every certificate with its chain and key, JSON).
pub const MAX_MESSAGE: usize = 1 << 20;

/// Most peer connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;

/// What one host asks the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// The certificates the peer serves, and whether it holds the virtual address.
    Certificates,
    /// The key authorization of an http-01 token.
    Http01 {
        /// The token from the CA's request path.
        token: String,
    },
    /// The sender issued a certificate: pull now.
    Issued,
    /// Present this tls-alpn-01 answer for `name` (the digest of the key authorization), or
    /// stop (`None`): the sender is validating, and the CA may reach either host.
    TlsAlpn01 {
        /// A configured name.
        name: String,
        /// SHA-256 of the key authorization.
        digest: Option<Vec<u8>>,
    },
}

/// One certificate as the peer serves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SharedCertificate {
    /// Its configured names, the first naming it.
    pub names: Vec<String>,
    /// Chain then key, PEM, as stored.
    pub pem: String,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Answer {
    /// To `Certificates`.
    Certificates {
        /// Whether the answering host holds the virtual address now.
        holder: bool,
        /// Every certificate it serves.
        certificates: Vec<SharedCertificate>,
    },
    /// To `Http01`: the key authorization, if the answering host has an order under way for it.
    Http01 {
        /// The answer to serve.
        key_authorization: Option<String>,
    },
    /// To `Issued`.
    Noted,
}

/// Why an exchange with the peer failed.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// Connecting, writing or reading failed.
    #[error("peer {address}: {source}")]
    Io {
        /// The peer's address.
        address: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The exchange took longer than [`TIMEOUT`].
    #[error("peer {0}: no answer within {TIMEOUT:?}")]
    Timeout(SocketAddr),
    /// The peer closed without answering (it refused the request: see its log).
    #[error(
        "peer {0} closed the connection without answering (it refused the request: do the \
         hosts share one secret file? see its log)"
    )]
    NoAnswer(SocketAddr),
    /// The answer did not open.
    #[error("peer {address}: answer refused: {reason}")]
    Refused {
        /// The peer's address.
        address: SocketAddr,
        /// Why.
        reason: Refused,
    },
    /// The answer does not fit the request.
    #[error("peer {0}: an answer that does not fit the request")]
    Unexpected(SocketAddr),
}

/// One host's side of the pair: the channel key, the addresses, and what its ACME task and
/// peer listener share.
#[derive(Debug)]
pub struct Peer {
    key: Key,
    /// `[acme.peer]`.
    pub config: AcmePeerConfig,
    /// Woken when the peer tells of an issued certificate.
    pub pull: Notify,
    /// Where refused messages are counted.
    metrics: Arc<Metrics>,
    /// Every configured name: the only ones whose tls-alpn-01 answers the peer may hand over.
    names: Vec<String>,
}

/// Whether this host holds `address` (see the module docs); `false` when the kernel's lists
/// cannot be read.
pub fn holds(address: IpAddr) -> bool {
    match address {
        IpAddr::V4(a) => std::fs::read_to_string("/proc/self/net/fib_trie")
            .is_ok_and(|table| ipv4_is_local(&table, a)),
        IpAddr::V6(a) => std::fs::read_to_string("/proc/self/net/if_inet6")
            .is_ok_and(|table| ipv6_is_local(&table, a)),
    }
}

/// Whether `fib_trie` (the text of `/proc/self/net/fib_trie`) has a `/32 host LOCAL` entry for
/// `address`: each entry is a `|-- ADDR` line followed by its prefix lines.
fn ipv4_is_local(fib_trie: &str, address: Ipv4Addr) -> bool {
    let mut current: Option<Ipv4Addr> = None;
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            current = addr.trim().parse().ok();
        } else if line.starts_with("+--") || line.ends_with(':') {
            current = None;
        } else if current == Some(address) && line.starts_with("/32 host LOCAL") {
            return true;
        }
    }
    false
}

/// Whether `if_inet6` (the text of `/proc/self/net/if_inet6`: an address in 32 hex digits first on
/// each line) lists `address`.
fn ipv6_is_local(if_inet6: &str, address: Ipv6Addr) -> bool {
    let wanted = address.to_bits();
    if_inet6.lines().any(|line| {
        line.split_whitespace()
            .next()
            .and_then(|hex| u128::from_str_radix(hex, 16).ok())
            == Some(wanted)
    })
}

impl Peer {
    /// The peer side for `config`, its key derived from the secret file (checked again here,
    /// as `lb check` does).
    pub fn new(
        config: AcmePeerConfig,
        names: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Result<Peer, String> {
        let secret = read_secret(&config.secret_file)?;
        Ok(Peer {
            key: Key::derive(&secret),
            config,
            pull: Notify::new(),
            metrics,
            names,
        })
    }

    /// Asks the peer `request` (see the module docs).
    pub async fn ask(&self, request: &Request) -> Result<Answer, PeerError> {
        let address = self.config.address;
        let io = |source| PeerError::Io { address, source };
        let id = self.key.new_id();
        let sealed = self
            .key
            .seal(Direction::Request, &id, request, unix_now())
            .map_err(|reason| PeerError::Refused { address, reason })?;
        let exchange = async {
            let mut stream = TcpStream::connect(address).await.map_err(io)?;
            stream.set_nodelay(true).map_err(io)?;
            write_frame(&mut stream, &sealed).await.map_err(io)?;
            match read_frame(&mut stream).await {
                Ok(Some(answer)) => Ok(answer),
                Ok(None) => Err(PeerError::NoAnswer(address)),
                Err(e) => Err(io(e)),
            }
        };
        let answer = tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| PeerError::Timeout(address))??;
        let answer: Answer = self
            .key
            .open_answer(&answer, &id, unix_now())
            .map_err(|reason| {
                self.metrics.acme_peer_refused.fetch_add(1, Relaxed);
                PeerError::Refused { address, reason }
            })?;
        let fits = matches!(
            (request, &answer),
            (Request::Certificates, Answer::Certificates { .. })
                | (Request::Http01 { .. }, Answer::Http01 { .. })
                | (Request::Issued | Request::TlsAlpn01 { .. }, Answer::Noted)
        );
        if !fits {
            return Err(PeerError::Unexpected(address));
        }
        Ok(answer)
    }

    /// The key authorization for http-01 `token`, asked of the peer (`None` when it has none
    /// or cannot be asked; logged).
    pub async fn http01(&self, token: &str) -> Option<String> {
        let request = Request::Http01 {
            token: token.to_owned(),
        };
        match self.ask(&request).await {
            Ok(Answer::Http01 { key_authorization }) => key_authorization,
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "could not ask the peer for an http-01 token");
                None
            }
        }
    }

    /// Hands the tls-alpn-01 answer for `name` to the peer (`digest`), or withdraws it
    /// (`None`); a failure is logged (the validation then succeeds only on this host).
    pub async fn share_tls_alpn01(&self, name: &str, digest: Option<&[u8]>) {
        let request = Request::TlsAlpn01 {
            name: name.to_owned(),
            digest: digest.map(<[u8]>::to_vec),
        };
        if let Err(e) = self.ask(&request).await {
            warn!(name, error = %e, "could not hand the tls-alpn-01 answer to the peer; a \
                                     validation reaching it fails and is retried");
        }
    }

    /// Presents (or withdraws) the peer's tls-alpn-01 answer for `name`, one of this host's
    /// configured names only.
    fn present_tls_alpn01(&self, acme: &Acme, name: &str, digest: Option<&[u8]>, from: SocketAddr) {
        if !self.names.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            warn!(peer = %from, name, "the peer validates a name not configured here; ignored");
            return;
        }
        let Some(digest) = digest else {
            acme.challenges.remove_tls(name);
            return;
        };
        match alpn_certificate(name, digest) {
            Ok(cert) => {
                debug!(peer = %from, name, "presenting the peer's tls-alpn-01 answer");
                acme.challenges.put_tls(name, cert);
            }
            Err(e) => warn!(peer = %from, name, error = %e, "unusable tls-alpn-01 answer"),
        }
    }

    /// Serves the peer listener until `token` is cancelled, answering from `acme`.
    pub async fn serve(
        self: Arc<Self>,
        acme: Arc<Acme>,
        listener: TcpListener,
        token: CancellationToken,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                () = token.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, from) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "peer listener: accept failed");
                    tokio::select! {
                        () = token.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    }
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                debug!(peer = %from, "peer listener busy; connection closed");
                continue;
            };
            let peer = Arc::clone(&self);
            let acme = Arc::clone(&acme);
            tokio::spawn(async move {
                let _slot = slot;
                match tokio::time::timeout(TIMEOUT, peer.answer(&acme, stream, from)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(peer = %from, error = %e, "peer exchange failed"),
                    Err(_) => debug!(peer = %from, "peer exchange timed out"),
                }
            });
        }
    }

    /// Answers the one request on `stream`.
    async fn answer(
        &self,
        acme: &Acme,
        mut stream: TcpStream,
        from: SocketAddr,
    ) -> std::io::Result<()> {
        let Some(sealed) = read_frame(&mut stream).await? else {
            return Ok(());
        };
        let (id, request) = match self
            .key
            .open::<Request>(Direction::Request, &sealed, unix_now())
        {
            Ok(opened) => opened,
            Err(reason) => {
                self.metrics.acme_peer_refused.fetch_add(1, Relaxed);
                warn!(peer = %from, reason = %reason, "peer request refused");
                return Ok(());
            }
        };
        let answer = match request {
            Request::Certificates => Answer::Certificates {
                holder: holds(self.config.virtual_address),
                certificates: acme.shared(),
            },
            Request::Http01 { token } => Answer::Http01 {
                key_authorization: acme.challenges.http_answer(&token),
            },
            Request::Issued => {
                self.pull.notify_one();
                Answer::Noted
            }
            Request::TlsAlpn01 { name, digest } => {
                self.present_tls_alpn01(acme, &name, digest.as_deref(), from);
                Answer::Noted
            }
        };
        let sealed = self
            .key
            .seal(Direction::Answer, &id, &answer, unix_now())
            .map_err(std::io::Error::other)?;
        write_frame(&mut stream, &sealed).await?;
        stream.shutdown().await
    }
}

/// Writes one message: its length (4 bytes, big-endian), then its bytes.
async fn write_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + bytes.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(bytes);
    stream.write_all(&frame).await
}

/// Reads one message (`None`: closed before one began); longer than [`MAX_MESSAGE`] is an
/// error.
async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 4];
    match stream.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a message of {len} bytes (at most {MAX_MESSAGE})"),
        ));
    }
    let mut bytes = vec![0u8; len];
    stream.read_exact(&mut bytes).await?;
    Ok(Some(bytes))
}

/// Peer sides on loopback for tests.
#[cfg(test)]
pub(crate) mod testing {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use super::*;

    /// A secret both sides of a test pair share.
    pub const SECRET: &str = "a secret both hosts share, 32+ bytes";

    /// A peer side listening on `listen`, asking `address`, with `secret` (written to
    /// `dir/name`, 0600).
    pub fn peer(
        dir: &Path,
        name: &str,
        secret: &str,
        listen: SocketAddr,
        address: SocketAddr,
    ) -> Arc<Peer> {
        let file = dir.join(name);
        std::fs::write(&file, secret).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = AcmePeerConfig {
            listen,
            address,
            secret_file: file,
            virtual_address: "127.0.0.1".parse().unwrap(),
        };
        let names = vec!["a.test".to_owned()];
        Arc::new(Peer::new(config, names, Arc::new(Metrics::default())).unwrap())
    }

    /// A peer listener on loopback answering from `acme` with `secret`, until `token` is
    /// cancelled: its side and address.
    pub async fn serving(
        dir: &Path,
        secret: &str,
        acme: Arc<Acme>,
        token: &CancellationToken,
    ) -> (Arc<Peer>, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let unused = "127.0.0.1:1".parse().unwrap();
        let server = peer(dir, "server.secret", secret, addr, unused);
        tokio::spawn(Arc::clone(&server).serve(acme, listener, token.child_token()));
        (server, addr)
    }

    /// A peer side asking `address` with `secret`.
    pub fn client(dir: &Path, secret: &str, address: SocketAddr) -> Arc<Peer> {
        let unused = "127.0.0.1:1".parse().unwrap();
        peer(dir, "client.secret", secret, unused, address)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{SECRET, client, serving};
    use super::*;

    /// A peer listener whose host has an order under way for http-01 token `tok`.
    async fn knowing_tok() -> (
        tempfile::TempDir,
        CancellationToken,
        Arc<Acme>,
        Arc<Peer>,
        SocketAddr,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let token = CancellationToken::new();
        let acme = Arc::new(Acme::default());
        acme.challenges.put_http("tok", "tok.thumbprint");
        let (server, addr) = serving(tmp.path(), SECRET, Arc::clone(&acme), &token).await;
        (tmp, token, acme, server, addr)
    }

    #[tokio::test]
    async fn an_http01_token_is_answered_from_the_peer_and_issued_wakes_its_pull() {
        let (tmp, token, acme, server, addr) = knowing_tok().await;
        let client = client(tmp.path(), SECRET, addr);
        assert_eq!(
            client.http01("tok").await.as_deref(),
            Some("tok.thumbprint")
        );
        assert_eq!(client.http01("unknown").await, None);
        let woken = server.pull.notified();
        assert_eq!(client.ask(&Request::Issued).await.unwrap(), Answer::Noted);
        tokio::time::timeout(TIMEOUT, woken).await.unwrap();
        // A tls-alpn-01 answer handed over is presented for a configured name until withdrawn.
        let tls_alpn01 = |name: &str, digest: Option<Vec<u8>>| Request::TlsAlpn01 {
            name: name.to_owned(),
            digest,
        };
        for (name, shown) in [("A.test", true), ("other.test", false)] {
            let request = tls_alpn01(name, Some(vec![7; 32]));
            assert_eq!(client.ask(&request).await.unwrap(), Answer::Noted);
            assert_eq!(
                acme.challenges.tls_certificate(name).is_some(),
                shown,
                "{name}"
            );
        }
        client.ask(&tls_alpn01("a.test", None)).await.unwrap();
        assert!(acme.challenges.tls_certificate("a.test").is_none());
        // The test pair's virtual address is 127.0.0.1, which this host holds.
        assert_eq!(
            client.ask(&Request::Certificates).await.unwrap(),
            Answer::Certificates {
                holder: true,
                certificates: Vec::new()
            }
        );
        assert_eq!(server.metrics.acme_peer_refused.load(Relaxed), 0);
        token.cancel();
    }

    #[tokio::test]
    async fn a_wrong_secret_gets_no_answer_and_is_counted() {
        let (tmp, token, _, server, addr) = knowing_tok().await;
        let client = client(tmp.path(), "another secret, also 32+ bytes long", addr);
        let e = client
            .ask(&Request::Http01 {
                token: "tok".into(),
            })
            .await
            .unwrap_err();
        assert!(matches!(e, PeerError::NoAnswer(_)), "{e}");
        assert_eq!(client.http01("tok").await, None);
        assert_eq!(server.metrics.acme_peer_refused.load(Relaxed), 2);
        token.cancel();
    }

    #[tokio::test]
    async fn a_tampered_request_gets_no_answer() {
        let (_tmp, token, _, server, addr) = knowing_tok().await;
        let key = Key::derive(SECRET.as_bytes());
        let request = Request::Http01 {
            token: "tok".into(),
        };
        let sealed = key
            .seal(Direction::Request, "id", &request, unix_now())
            .unwrap();
        // Untouched, the same bytes are answered; one bit flipped, they are not.
        for flip in [None, Some(sealed.len() / 2)] {
            let mut bytes = sealed.clone();
            if let Some(i) = flip {
                bytes[i] ^= 0x04;
            }
            let mut stream = TcpStream::connect(addr).await.unwrap();
            write_frame(&mut stream, &bytes).await.unwrap();
            let answer = read_frame(&mut stream).await.unwrap();
            match flip {
                None => {
                    let answer: Answer =
                        key.open_answer(&answer.unwrap(), "id", unix_now()).unwrap();
                    assert_eq!(
                        answer,
                        Answer::Http01 {
                            key_authorization: Some("tok.thumbprint".into())
                        }
                    );
                }
                Some(_) => assert!(answer.is_none(), "a tampered request was answered"),
            }
        }
        assert_eq!(server.metrics.acme_peer_refused.load(Relaxed), 1);
        // A length beyond the limit is refused before anything is read.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(read_frame(&mut stream).await.unwrap_or(None).is_none());
        token.cancel();
    }

    #[test]
    fn loopback_is_held_and_an_address_elsewhere_is_not() {
        assert!(holds("127.0.0.1".parse().unwrap()));
        assert!(!holds("192.0.2.1".parse().unwrap()));
        assert!(!holds("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn local_addresses_are_read_from_the_kernels_lists() {
        // A virtual address on eth0 beside the host's own (from a pair's lb host).
        let fib_trie = "Main:
  +-- 0.0.0.0/0 3 0 5
     +-- 10.213.49.0/24 2 0 2
        |-- 10.213.49.0
           /24 link UNICAST
        |-- 10.213.49.10
           /32 host LOCAL
        |-- 10.213.49.100
           /32 host LOCAL
        |-- 10.213.49.255
           /32 link BROADCAST
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.0
           /8 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
";
        let local = |a: &str| ipv4_is_local(fib_trie, a.parse().unwrap());
        assert!(local("10.213.49.100"));
        assert!(local("10.213.49.10"));
        assert!(!local("10.213.49.11"), "the peer's address");
        assert!(!local("10.213.49.0"), "a network, not an address");
        assert!(!local("10.213.49.255"), "a broadcast address");
        assert!(!local("127.0.0.0"));
        let if_inet6 = "00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000002 04 40 00 82     eth0
";
        assert!(ipv6_is_local(if_inet6, "fd00::2".parse().unwrap()));
        assert!(ipv6_is_local(if_inet6, "::1".parse().unwrap()));
        assert!(!ipv6_is_local(if_inet6, "fd00::3".parse().unwrap()));
        assert!(!ipv6_is_local("garbage\n\n", "::1".parse().unwrap()));
    }
}
