//! Header rewriting at the proxy hop: what a request carries to the backend and what a response
//! carries back.
//!
//! Requests lose their hop-by-hop headers (`Connection` and every header it names,
//! `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-Authorization`, `Proxy-Authenticate`) and `Expect` (answered at this hop), keep
//! `Host`, and gain `X-Forwarded-For` (the client address appended to any earlier list),
//! `X-Forwarded-Proto: https` and `X-Forwarded-Host` (the client's `Host`). Message framing is
//! not copied: `exchange` frames the forwarded body itself (`Content-Length` when the length is
//! known, chunked otherwise), so the backend sees exactly the bytes the client framed. A
//! WebSocket upgrade keeps `Connection: upgrade` and `Upgrade: websocket`. Responses lose their
//! hop-by-hop headers the same way, except on a `101 Switching Protocols`.

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::{PathAndQuery, Uri};
use hyper::http::{Version, request};

/// `X-Forwarded-For`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Hop-by-hop headers removed in both directions (RFC 9110 §7.6.1, plus the de-facto
/// `Keep-Alive` and `Proxy-Connection`), as ready names: removing them costs no parsing.
static HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Why a request cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestHeadError {
    /// An HTTP/1.1 request without `Host` (RFC 9112 §3.2).
    MissingHost,
    /// More than one `Host` field: the backend might route by another one than this hop logs
    /// and forwards as `X-Forwarded-Host` (RFC 9112 §3.2 requires a 400).
    DuplicateHost,
    /// An absolute-form target with user information (`https://user:pw@host/`): an error
    /// (RFC 9110 §4.2.4); passed on, it would become the backend's `Host`.
    UserinfoInTarget,
}

impl RequestHeadError {
    /// The body of the 400 the client gets.
    pub fn message(self) -> &'static str {
        match self {
            RequestHeadError::MissingHost => "400 Bad Request: a Host header is required\n",
            RequestHeadError::DuplicateHost => "400 Bad Request: more than one Host header\n",
            RequestHeadError::UserinfoInTarget => {
                "400 Bad Request: user information in the request target\n"
            }
        }
    }
}

/// Rewrites a client request head for the backend (see the module docs). `websocket` keeps the
/// upgrade headers.
pub fn prepare_request(
    head: &mut request::Parts,
    client: IpAddr,
    websocket: bool,
) -> Result<(), RequestHeadError> {
    // An absolute-form target (`GET https://host/path`) names the host; the backend gets the
    // origin form and that host.
    if head
        .uri
        .authority()
        .is_some_and(|a| a.as_str().contains('@'))
    {
        return Err(RequestHeadError::UserinfoInTarget);
    }
    if let Some(authority) = head.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        head.headers.insert(header::HOST, host);
    }
    if head.uri.authority().is_some() || head.uri.scheme().is_some() {
        let path = match head.uri.path_and_query() {
            // An empty path is `/` in origin form (RFC 9112 §3.2.1): `http://h?q` is `/?q`.
            Some(p) if !p.as_str().starts_with('/') => {
                PathAndQuery::try_from(format!("/{}", p.as_str())).ok()
            }
            p => p.cloned(),
        };
        head.uri = Uri::from(path.unwrap_or_else(|| PathAndQuery::from_static("/")));
    }
    let mut hosts = head.headers.get_all(header::HOST).iter();
    let host = hosts.next().cloned();
    if hosts.next().is_some() {
        return Err(RequestHeadError::DuplicateHost);
    }
    if host.is_none() && head.version == Version::HTTP_11 {
        return Err(RequestHeadError::MissingHost);
    }
    head.version = Version::HTTP_11;

    remove_hop_by_hop(&mut head.headers);
    head.headers.remove(header::EXPECT);
    append_forwarded_for(&mut head.headers, client);
    head.headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("https"));
    match host {
        Some(host) => head.headers.insert(X_FORWARDED_HOST.clone(), host),
        None => head.headers.remove(&X_FORWARDED_HOST),
    };
    if websocket {
        head.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        head.headers
            .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    Ok(())
}

/// Rewrites a backend response head for the client. A `101` keeps its upgrade headers.
pub fn prepare_response(headers: &mut HeaderMap, switching_protocols: bool) {
    if switching_protocols {
        let upgrade = headers.get(header::UPGRADE).cloned();
        remove_hop_by_hop(headers);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(upgrade) = upgrade {
            headers.insert(header::UPGRADE, upgrade);
        }
    } else {
        remove_hop_by_hop(headers);
    }
}

/// Removes the fixed hop-by-hop headers and every header the `Connection` header names
/// (except `Host`, which a client must not be able to strip).
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        remove_connection_named(headers);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Removes every header the `Connection` header names, except `Host`.
fn remove_connection_named(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .filter(|name| *name != header::HOST)
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// Appends `client` to `X-Forwarded-For`, folding earlier values into one list.
fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let client = client.to_string();
    let mut earlier = headers
        .get_all(&X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .peekable();
    let value = if earlier.peek().is_none() {
        client
    } else {
        let mut list = earlier.collect::<Vec<_>>().join(", ");
        list.push_str(", ");
        list.push_str(&client);
        list
    };
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), value);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::Request;

    fn head(build: impl FnOnce(request::Builder) -> request::Builder) -> request::Parts {
        build(Request::builder()).body(()).unwrap().into_parts().0
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

    #[test]
    fn adds_forwarded_headers_and_keeps_host() {
        let mut h = head(|b| b.uri("/chat?x=1").header("host", "chat.example.test"));
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(h.headers["host"], "chat.example.test");
        assert_eq!(h.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h.headers["x-forwarded-proto"], "https");
        assert_eq!(h.headers["x-forwarded-host"], "chat.example.test");
        assert_eq!(h.uri, "/chat?x=1");
    }

    #[test]
    fn appends_to_an_earlier_forwarded_for_list() {
        let mut h = head(|b| {
            b.header("host", "h")
                .header("x-forwarded-for", "10.0.0.1")
                .header("x-forwarded-for", "10.0.0.2, 10.0.0.3")
                .header("x-forwarded-proto", "http")
        });
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(
            h.headers["x-forwarded-for"],
            "10.0.0.1, 10.0.0.2, 10.0.0.3, 192.0.2.7"
        );
        assert_eq!(h.headers.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h.headers["x-forwarded-proto"], "https");
    }

    #[test]
    fn removes_hop_by_hop_and_connection_named_headers_but_not_host() {
        let mut h = head(|b| {
            b.header("host", "h")
                .header("connection", "keep-alive, X-Secret, host")
                .header("keep-alive", "timeout=5")
                .header("x-secret", "1")
                .header("te", "trailers")
                .header("transfer-encoding", "chunked")
                .header("proxy-authorization", "Basic x")
                .header("upgrade", "h2c")
                .header("expect", "100-continue")
                .header("x-kept", "yes")
        });
        prepare_request(&mut h, CLIENT, false).unwrap();
        for gone in [
            "connection",
            "keep-alive",
            "x-secret",
            "te",
            "transfer-encoding",
            "proxy-authorization",
            "upgrade",
            "expect",
        ] {
            assert!(!h.headers.contains_key(gone), "{gone} kept");
        }
        assert_eq!(h.headers["host"], "h");
        assert_eq!(h.headers["x-kept"], "yes");
    }

    #[test]
    fn websocket_keeps_only_the_upgrade_headers() {
        let mut h = head(|b| {
            b.header("host", "h")
                .header("connection", "keep-alive, Upgrade")
                .header("upgrade", "websocket")
                .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
        });
        prepare_request(&mut h, CLIENT, true).unwrap();
        assert_eq!(h.headers["connection"], "upgrade");
        assert_eq!(h.headers["upgrade"], "websocket");
        assert_eq!(h.headers["sec-websocket-key"], "dGhlIHNhbXBsZSBub25jZQ==");
    }

    #[test]
    fn absolute_form_becomes_origin_form_with_its_host() {
        let mut h = head(|b| {
            b.uri("https://chat.example.test/ws?a=b")
                .header("host", "other")
        });
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(h.uri, "/ws?a=b");
        assert_eq!(h.headers["host"], "chat.example.test");
    }

    #[test]
    fn user_information_in_the_target_is_refused() {
        let mut h = head(|b| {
            b.uri("https://user:pw@chat.example.test/")
                .header("host", "h")
        });
        assert_eq!(
            prepare_request(&mut h, CLIENT, false),
            Err(RequestHeadError::UserinfoInTarget)
        );
    }

    #[test]
    fn absolute_form_without_a_path_gets_slash_before_its_query() {
        // Found by the request_head fuzz target: the backend got `GET ?q HTTP/1.1`.
        let mut h = head(|b| b.uri("ht1ps://chat.example.test?=w/as").header("host", "h"));
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(h.uri, "/?=w/as");
        assert_eq!(h.headers["host"], "chat.example.test");
        let mut h = head(|b| b.uri("http://chat.example.test").header("host", "h"));
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(h.uri, "/");
    }

    #[test]
    fn two_host_headers_are_refused() {
        let mut h = head(|b| b.header("host", "a").header("host", "b"));
        assert_eq!(
            prepare_request(&mut h, CLIENT, false),
            Err(RequestHeadError::DuplicateHost)
        );
    }

    #[test]
    fn http11_without_host_is_refused_but_http10_is_not() {
        let mut h = head(|b| b.uri("/"));
        assert_eq!(
            prepare_request(&mut h, CLIENT, false),
            Err(RequestHeadError::MissingHost)
        );
        let mut h = head(|b| b.uri("/").version(Version::HTTP_10));
        prepare_request(&mut h, CLIENT, false).unwrap();
        assert_eq!(h.version, Version::HTTP_11);
        assert!(!h.headers.contains_key("x-forwarded-host"));
    }

    #[test]
    fn responses_lose_hop_by_hop_headers_except_on_101() {
        let mut headers = HeaderMap::new();
        headers.insert("connection", HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        let mut switching = headers.clone();
        switching.insert("upgrade", HeaderValue::from_static("websocket"));
        prepare_response(&mut headers, false);
        assert_eq!(headers.len(), 1);
        prepare_response(&mut switching, true);
        assert_eq!(switching["connection"], "upgrade");
        assert_eq!(switching["upgrade"], "websocket");
        assert!(!switching.contains_key("x-hop"));
    }
}
