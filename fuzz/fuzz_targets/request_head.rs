//! Request heads from a client, through lb's HTTP/1.1 server and the checks `lb::http::proxy::handle`
//! makes in its order (CONNECT refused, target length, WebSocket handshake validation), then
//! `lb::http::headers::prepare_request` and `lb::backends::exchange::encode_head`. Checks that the rewritten head
//! keeps the proxy's promises (see `check_prepared`) and that the bytes sent to the backend parse
//! back as exactly that head.

#![no_main]

use std::net::IpAddr;

use hyper::header::{self, HeaderMap, HeaderName};
use hyper::http::request;
use hyper::{Method, StatusCode, Version};
use lb::backends::exchange::{RequestFraming, encode_head};
use lb::http::headers::{
    self, RequestHeadError, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO,
};
use lb::http::upgrade;
use libfuzzer_sys::fuzz_target;
use scaleout_fuzz::{answer, client_for, lb_config, serve_http1};

/// Every header the proxy must not forward (`lb::http::headers`' hop-by-hop list, and `Expect`).
const HOP_BY_HOP: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
];

fuzz_target!(|data: &[u8]| {
    let client = client_for(data);
    serve_http1(data, |req| {
        if req.method() == Method::CONNECT {
            return answer(StatusCode::METHOD_NOT_ALLOWED);
        }
        let uri = req.uri();
        let target_len = uri.path_and_query().map_or(0, |p| p.as_str().len())
            + uri.authority().map_or(0, |a| a.as_str().len());
        if target_len > lb_config().limits.max_uri_bytes {
            return answer(StatusCode::URI_TOO_LONG);
        }
        let websocket = upgrade::is_websocket(&req);
        if websocket && upgrade::validate(&req).is_err() {
            return answer(StatusCode::BAD_REQUEST);
        }
        let (mut head, _body) = req.into_parts();
        let before = head.clone();
        match headers::prepare_request(&mut head, client, websocket) {
            Ok(()) => {
                check_prepared(&before, &head, client, websocket);
                for framing in [
                    RequestFraming::None,
                    RequestFraming::Length(7),
                    RequestFraming::Chunked,
                ] {
                    check_encoded(&head, framing);
                }
                answer(StatusCode::OK)
            }
            Err(e) => {
                check_refusal(&before, e);
                answer(StatusCode::BAD_REQUEST)
            }
        }
    });
});

/// The `Host` values a request names: the authority of an absolute-form target replaces them.
fn hosts(head: &request::Parts) -> usize {
    if head.uri.authority().is_some() {
        1
    } else {
        head.headers.get_all(header::HOST).iter().count()
    }
}

/// A refusal is justified by the head.
fn check_refusal(before: &request::Parts, e: RequestHeadError) {
    match e {
        RequestHeadError::DuplicateHost => assert!(hosts(before) > 1, "{before:?}"),
        RequestHeadError::MissingHost => {
            assert_eq!(hosts(before), 0, "{before:?}");
            assert_eq!(before.version, Version::HTTP_11);
        }
        RequestHeadError::UserinfoInTarget => {
            let authority = before.uri.authority().map_or("", |a| a.as_str());
            assert!(authority.contains('@'), "{before:?}");
        }
    }
}

/// What a forwarded head must look like.
fn check_prepared(before: &request::Parts, after: &request::Parts, client: IpAddr, ws: bool) {
    assert_eq!(after.version, Version::HTTP_11);
    assert_eq!(after.method, before.method);
    assert!(after.uri.scheme().is_none() && after.uri.authority().is_none());
    let target = after.uri.path_and_query().map_or("/", |p| p.as_str());
    assert!(
        target.starts_with('/') || target == "*",
        "target {target:?} is not in origin form (from {:?})",
        before.uri
    );

    let hosts: Vec<_> = after.headers.get_all(header::HOST).iter().collect();
    assert!(hosts.len() <= 1, "{hosts:?}");
    if before.version == Version::HTTP_11 {
        assert_eq!(hosts.len(), 1);
    }
    match hosts.first() {
        Some(host) => assert_eq!(one(&after.headers, &X_FORWARDED_HOST), Some(*host)),
        None => assert!(!after.headers.contains_key(&X_FORWARDED_HOST)),
    }
    assert_eq!(
        one(&after.headers, &X_FORWARDED_PROTO).map(|v| v.as_bytes()),
        Some(&b"https"[..])
    );
    let forwarded = one(&after.headers, &X_FORWARDED_FOR)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("no single X-Forwarded-For in {:?}", after.headers));
    let last = forwarded.rsplit(',').next().map(str::trim);
    assert_eq!(last, Some(client.to_string().as_str()), "{forwarded:?}");

    for name in HOP_BY_HOP {
        let kept: Vec<_> = after.headers.get_all(name).iter().collect();
        match (ws, name) {
            (true, "connection") => assert_eq!(kept, ["upgrade"]),
            (true, "upgrade") => assert_eq!(kept, ["websocket"]),
            _ => assert!(kept.is_empty(), "{name} forwarded: {kept:?}"),
        }
    }
    // Headers the client's Connection header named are gone, except Host and the ones this
    // hop sets itself.
    let named = before
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok());
    for name in named {
        let own = [
            &header::HOST,
            &X_FORWARDED_FOR,
            &X_FORWARDED_PROTO,
            &X_FORWARDED_HOST,
            &header::CONNECTION,
            &header::UPGRADE,
        ];
        if !own.contains(&&name) {
            assert!(
                !after.headers.contains_key(&name),
                "{name} named by Connection, kept"
            );
        }
    }
    // Every other header is kept as it came, in its order.
    let ours = |name: &HeaderName| {
        HOP_BY_HOP.contains(&name.as_str())
            || [
                &header::HOST,
                &X_FORWARDED_FOR,
                &X_FORWARDED_PROTO,
                &X_FORWARDED_HOST,
            ]
            .contains(&name)
    };
    for (name, _) in before.headers.iter().filter(|(n, _)| !ours(n)) {
        if after.headers.contains_key(name) {
            let was: Vec<_> = before.headers.get_all(name).iter().collect();
            let is: Vec<_> = after.headers.get_all(name).iter().collect();
            assert_eq!(was, is, "{name} changed");
        }
    }
}

/// The one value of `name`, `None` when absent; panics when repeated.
fn one<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<&'a hyper::header::HeaderValue> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    assert!(values.next().is_none(), "{name} repeated");
    first
}

/// The bytes sent to the backend are one complete request head: the same method, target and
/// header fields, then the framing this hop chose.
fn check_encoded(head: &request::Parts, framing: RequestFraming) {
    let mut out = Vec::new();
    encode_head(head, framing, &mut out);
    let mut fields = vec![httparse::EMPTY_HEADER; head.headers.len() + 2];
    let mut parsed = httparse::Request::new(&mut fields);
    match parsed.parse(&out) {
        Ok(httparse::Status::Complete(n)) => assert_eq!(n, out.len(), "bytes after the head"),
        other => panic!(
            "the head sent to the backend does not parse ({other:?}): {:?}",
            String::from_utf8_lossy(&out)
        ),
    }
    assert_eq!(parsed.method, Some(head.method.as_str()));
    assert_eq!(
        parsed.path,
        Some(head.uri.path_and_query().map_or("/", |p| p.as_str()))
    );
    assert_eq!(parsed.version, Some(1));
    let expected: Vec<(&str, &[u8])> = head
        .headers
        .iter()
        .filter(|(n, _)| **n != header::CONTENT_LENGTH && **n != header::TRANSFER_ENCODING)
        .map(|(n, v)| (n.as_str(), v.as_bytes()))
        .collect();
    let framing_field: Option<(&str, String)> = match framing {
        RequestFraming::None => None,
        RequestFraming::Length(n) => Some(("content-length", n.to_string())),
        RequestFraming::Chunked => Some(("transfer-encoding", "chunked".to_owned())),
    };
    let got: Vec<(&str, &[u8])> = parsed.headers.iter().map(|f| (f.name, f.value)).collect();
    let mut want = expected.clone();
    if let Some((name, value)) = &framing_field {
        want.push((name, value.as_bytes()));
    }
    assert_eq!(got, want);
}
