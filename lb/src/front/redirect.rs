//! The optional plain-HTTP listener: every request gets a `301 Moved Permanently` to the same
//! host and path over https, except a CA's http-01 validation requests
//! (`/.well-known/acme-challenge/TOKEN`) when `[acme]` is configured: a token of an order
//! under way is answered with its key authorization; on a keepalived pair a token this host
//! does not know is asked of the other host (whose order it may be, the virtual address having
//! moved during the validation); any other gets 404.
//!
//! The host comes from the request's `Host` header (its port dropped); the https port is added
//! when it is not 443. A request without a usable `Host` gets 400. Connections are served by
//! hyper with the same header timeout and size limits as the https side, and close on shutdown.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use hyper::header::{self, HeaderValue};
use hyper::http::uri::Authority;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::{debug, info};

use crate::acme::Acme;
use crate::acme::challenge::HTTP_PREFIX;
use crate::front::conn;
use crate::front::listener::ConnSlot;
use crate::front::state::State;
use crate::http::body::ResponseBody;
use crate::http::context::local_response;

/// The `Location` for a request to `host` (a `Host` header value) and `target` (path and
/// query), or `None` when `host` is not a valid authority.
pub fn location(host: &str, target: &str, https_port: u16) -> Option<String> {
    let authority: Authority = host.parse().ok()?;
    if authority.as_str().contains('@') {
        return None;
    }
    let name = authority.host();
    let target = if target.starts_with('/') { target } else { "/" };
    Some(if https_port == 443 {
        format!("https://{name}{target}")
    } else {
        format!("https://{name}:{https_port}{target}")
    })
}

/// The redirect (or 400) for one request.
fn respond<B>(req: &Request<B>, https_port: u16) -> Response<ResponseBody> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let location = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .and_then(|host| location(host, target, https_port))
        .and_then(|l| HeaderValue::from_str(&l).ok());
    match location {
        Some(location) => {
            let mut response = local_response(
                StatusCode::MOVED_PERMANENTLY,
                "301 Moved Permanently: use https\n",
            );
            response.headers_mut().insert(header::LOCATION, location);
            response
        }
        None => local_response(
            StatusCode::BAD_REQUEST,
            "400 Bad Request: a valid Host header is required\n",
        ),
    }
}

/// The answer to an http-01 validation request, or `None` when `target` is not one.
async fn acme_answer(acme: &Acme, target: &str) -> Option<Response<ResponseBody>> {
    let token = target.strip_prefix(HTTP_PREFIX)?;
    let mut answer = acme.challenges.http_answer(token);
    if answer.is_none()
        && let Some(peer) = &acme.peer
    {
        answer = peer.http01(token).await;
        info!(
            token,
            answered = answer.is_some(),
            "http-01 token unknown here; asked the peer"
        );
    }
    Some(match answer {
        Some(key_authorization) => {
            let mut response =
                Response::new(ResponseBody::text(bytes::Bytes::from(key_authorization)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            response
        }
        None => local_response(StatusCode::NOT_FOUND, "404 Not Found: no such challenge\n"),
    })
}

/// Serves one connection on the redirect listener.
pub async fn serve(state: Arc<State>, stream: TcpStream, peer: SocketAddr, slot: ConnSlot) {
    let config = state.config.load_full();
    let https_port = state.https_port;
    let requested = Arc::new(Notify::new());
    let seen = Arc::clone(&requested);
    let acme = state.acme.clone();
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        seen.notify_one();
        let acme = acme.clone();
        async move {
            let target = req.uri().path();
            let answer = match acme.as_deref() {
                Some(a) => acme_answer(a, target).await,
                None => None,
            };
            let response = match answer {
                Some(answer) => answer,
                None => respond(&req, https_port),
            };
            info!(peer = %peer, method = %req.method(), uri = %req.uri(),
              status = response.status().as_u16(), "redirect");
            Ok::<_, Infallible>(response)
        }
    });
    let mut connection =
        conn::http1_server(&config).serve_connection(TokioIo::new(stream), service);
    let result = state
        .serve_until_drained(&mut connection, requested.notified(), |c| {
            c.graceful_shutdown()
        })
        .await;
    if let Some(Err(e)) = result {
        debug!(peer = %peer, error = %e, "redirect connection ended with an error");
    }
    drop(slot);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_keeps_host_and_path_and_swaps_the_port() {
        assert_eq!(
            location("chat.example.test", "/a?b=1", 443).as_deref(),
            Some("https://chat.example.test/a?b=1")
        );
        assert_eq!(
            location("localhost:8080", "/", 8443).as_deref(),
            Some("https://localhost:8443/")
        );
        assert_eq!(
            location("[::1]:80", "/x", 443).as_deref(),
            Some("https://[::1]/x")
        );
        assert_eq!(location("a b", "/", 443), None);
        assert_eq!(location("user@evil.test", "/", 443), None);
        assert_eq!(location("h", "*", 443).as_deref(), Some("https://h/"));
    }

    #[tokio::test]
    async fn challenge_requests_get_the_key_authorization_or_404() {
        let acme = Acme::default();
        acme.challenges.put_http("tok", "tok.print");
        let ok = acme_answer(&acme, "/.well-known/acme-challenge/tok")
            .await
            .unwrap();
        assert_eq!(ok.status(), StatusCode::OK);
        let missing = acme_answer(&acme, "/.well-known/acme-challenge/other")
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        assert!(acme_answer(&acme, "/index.html").await.is_none());
    }

    #[tokio::test]
    async fn a_token_unknown_here_is_answered_by_the_peer() {
        use http_body_util::BodyExt;

        use crate::acme::peer::testing::{SECRET, client, serving};

        let tmp = tempfile::tempdir().unwrap();
        let token = tokio_util::sync::CancellationToken::new();
        // The other host's order is under way: it knows the token.
        let other = Arc::new(Acme::default());
        other.challenges.put_http("theirs", "theirs.print");
        let (_, addr) = serving(tmp.path(), SECRET, other, &token).await;
        // This host got the CA's request.
        let here = Acme::paired(client(tmp.path(), SECRET, addr));
        here.challenges.put_http("ours", "ours.print");
        for (token, expected) in [("theirs", "theirs.print"), ("ours", "ours.print")] {
            let answer = acme_answer(&here, &format!("/.well-known/acme-challenge/{token}"))
                .await
                .unwrap();
            assert_eq!(answer.status(), StatusCode::OK);
            let body = answer.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(body, expected.as_bytes());
        }
        let missing = acme_answer(&here, "/.well-known/acme-challenge/nobodys")
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        token.cancel();
    }

    #[test]
    fn requests_without_host_get_400() {
        let req = Request::builder().uri("/x").body(()).unwrap();
        assert_eq!(respond(&req, 443).status(), StatusCode::BAD_REQUEST);
        let req = Request::builder()
            .uri("/x")
            .header("host", "h:80")
            .body(())
            .unwrap();
        let res = respond(&req, 443);
        assert_eq!(res.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(res.headers()["location"], "https://h/x");
    }
}
