//! WebSocket opening handshakes, through lb's HTTP/1.1 server, `lb::http::upgrade::is_websocket` and
//! `lb::http::upgrade::validate`. Checks that an accepted handshake meets RFC 6455 §4.2.1 as the
//! module documents it (GET, HTTP/1.1, `Connection: upgrade`, one `Sec-WebSocket-Version: 13`,
//! one `Sec-WebSocket-Key` of 16 bytes in base64), and that the head forwarded to the backend
//! (`lb::http::headers::prepare_request`) carries the handshake's own fields, `Sec-WebSocket-Key`,
//! `-Version`, `-Extensions` and `-Protocol` among them, byte for byte unless the client's
//! `Connection` header named them.

#![no_main]

use base64::Engine as _;
use hyper::header::{self, HeaderMap};
use hyper::{Method, Request, StatusCode, Version};
use lb::http::{headers, upgrade};
use libfuzzer_sys::fuzz_target;
use scaleout_fuzz::{answer, client_for, serve_http1};

fuzz_target!(|data: &[u8]| {
    let client = client_for(data);
    serve_http1(data, |req| {
        if !upgrade::is_websocket(&req) {
            return answer(StatusCode::NOT_FOUND);
        }
        if upgrade::validate(&req).is_err() {
            return answer(StatusCode::BAD_REQUEST);
        }
        check_accepted(&req);
        let (mut head, _body) = req.into_parts();
        let before = head.headers.clone();
        if headers::prepare_request(&mut head, client, true).is_err() {
            return answer(StatusCode::BAD_REQUEST);
        }
        check_forwarded(&before, &head.headers);
        answer(StatusCode::SWITCHING_PROTOCOLS)
    });
});

/// Everything `validate` promises about a handshake it accepted.
fn check_accepted<B>(req: &Request<B>) {
    assert_eq!(req.method(), Method::GET);
    assert_eq!(req.version(), Version::HTTP_11);
    let lists = |name| -> Vec<String> {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|t| t.trim().to_ascii_lowercase())
            .collect()
    };
    assert!(lists(header::CONNECTION).iter().any(|t| t == "upgrade"));
    assert!(lists(header::UPGRADE).iter().any(|t| t == "websocket"));
    let versions: Vec<_> = req
        .headers()
        .get_all("sec-websocket-version")
        .iter()
        .collect();
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0].as_bytes().trim_ascii(), b"13");
    let keys: Vec<_> = req.headers().get_all("sec-websocket-key").iter().collect();
    assert_eq!(keys.len(), 1);
    let nonce = base64::engine::general_purpose::STANDARD
        .decode(keys[0].as_bytes().trim_ascii())
        .unwrap_or_else(|e| panic!("accepted a key that is not base64: {e}"));
    assert_eq!(nonce.len(), 16);
}

/// The handshake's fields reach the backend untouched.
fn check_forwarded(before: &HeaderMap, after: &HeaderMap) {
    let named: Vec<String> = before
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for name in [
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-extensions",
        "sec-websocket-protocol",
        "origin",
    ] {
        let was: Vec<_> = before.get_all(name).iter().collect();
        let is: Vec<_> = after.get_all(name).iter().collect();
        if named.iter().any(|n| n == name) {
            assert!(is.is_empty(), "{name} named by Connection, forwarded");
        } else {
            assert_eq!(was, is, "{name} not forwarded as received");
        }
    }
    assert_eq!(
        after.get_all(header::UPGRADE).iter().collect::<Vec<_>>(),
        ["websocket"]
    );
    assert_eq!(
        after.get_all(header::CONNECTION).iter().collect::<Vec<_>>(),
        ["upgrade"]
    );
}
