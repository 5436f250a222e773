//! The admin listener: metrics and stats for operators (bind it to loopback).
//!
//! [`serve`] accepts HTTP/1.1 connections until its token is cancelled and answers, from the
//! live counters in [`Metrics`] and the current [`Pool`] generation (loaded from the `ArcSwap`
//! the reloader swaps):
//! - `GET /metrics`: Prometheus text exposition (see `metrics`);
//! - `GET /stats`: the same numbers as one JSON object, with a `backends` array;
//! - `GET /`: a small HTML page with a table per backend, refreshing every 5 s.
//!
//! Every view is rendered on request from the `metrics` catalogues; nothing is cached.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::backends::balance::Pool;
use crate::front::listener;
use crate::metrics::{BACKEND, GLOBAL, Metrics, PROMETHEUS_TEXT, encode_prometheus};

/// An admin client must send its request head within this time.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// Serves the admin endpoints on `listener` until `token` is cancelled; open admin
/// connections are closed then too.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    pool: Arc<ArcSwap<Pool>>,
    token: CancellationToken,
) {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connections = token.clone();
    listener::accept_loop(
        listener,
        "admin",
        token,
        || Some(()),
        move |stream, peer, ()| {
            let metrics = Arc::clone(&metrics);
            let pool = Arc::clone(&pool);
            let service = service_fn(move |request: Request<Incoming>| {
                let response = respond(
                    request.method(),
                    request.uri().path(),
                    &metrics,
                    &pool.load(),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http.serve_connection(TokioIo::new(stream), service);
            let token = connections.clone();
            tokio::spawn(async move {
                tokio::select! {
                    result = connection => {
                        if let Err(error) = result {
                            debug!(peer = %peer, error = %error, "admin connection failed");
                        }
                    }
                    () = token.cancelled() => {}
                }
            });
        },
    )
    .await;
}

/// The response to one admin request.
fn respond(
    method: &Method,
    path: &str,
    metrics: &Arc<Metrics>,
    pool: &Arc<Pool>,
) -> Response<Full<Bytes>> {
    if method != Method::GET && method != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN_TEXT,
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/metrics" => reply(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            encode_prometheus(metrics, pool),
        ),
        "/stats" => reply(
            StatusCode::OK,
            "application/json",
            stats_json(metrics, pool),
        ),
        "/" => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            stats_html(metrics, pool),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN_TEXT,
            "not found: the admin listener serves /, /stats and /metrics\n".into(),
        ),
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// `/stats`: `{"policy": .., "pid": .., <global counters>, "backends": [{"name", "addr", "up",
/// <numbers>}]}`. The process id tells which process answered during a binary upgrade.
fn stats_json(metrics: &Metrics, pool: &Pool) -> String {
    let mut out = String::with_capacity(2048);
    // Writing into a String cannot fail.
    let _ = write!(
        out,
        "{{\"policy\":\"{}\",\"pid\":{}",
        pool.policy(),
        std::process::id()
    );
    for metric in GLOBAL {
        let _ = write!(out, ",\"{}\":{}", metric.key, (metric.read)(metrics));
    }
    out.push_str(",\"backends\":[");
    for (i, backend) in pool.backends().iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(
            out,
            "{{\"name\":\"{}\",\"addr\":\"{}\",\"up\":{}",
            escape_json(backend.name()),
            backend.addr(),
            backend.is_up()
        );
        for metric in BACKEND {
            let _ = write!(out, ",\"{}\":{}", metric.key, (metric.read)(backend));
        }
        out.push('}');
    }
    out.push_str("]}");
    out
}

/// `/`: one table row per backend, then the process-wide counters.
fn stats_html(metrics: &Metrics, pool: &Pool) -> String {
    let mut out = String::with_capacity(4096);
    out.push_str(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"refresh\" content=\"5\"><title>lb stats</title>\
         <style>body{font-family:sans-serif}table{border-collapse:collapse}\
         th,td{border:1px solid #999;padding:2px 8px;text-align:right}\
         th:first-child,td:first-child{text-align:left}\
         .up{background:#cfc}.down{background:#fcc}</style></head><body>\n",
    );
    let _ = write!(
        out,
        "<h1>lb stats</h1>\n<p>balancing: {}. Also <a href=\"/metrics\">/metrics</a> \
         (Prometheus) and <a href=\"/stats\">/stats</a> (JSON).</p>\n",
        pool.policy()
    );
    out.push_str("<table>\n<tr><th>backend</th><th>address</th><th>state</th>");
    for metric in BACKEND {
        let _ = write!(out, "<th>{}</th>", metric.key.replace('_', " "));
    }
    out.push_str("</tr>\n");
    for backend in pool.backends() {
        let state = if backend.is_up() { "up" } else { "down" };
        let _ = write!(
            out,
            "<tr class=\"{state}\"><td>{}</td><td>{}</td><td>{state}</td>",
            escape_html(backend.name()),
            backend.addr()
        );
        for metric in BACKEND {
            let _ = write!(out, "<td>{}</td>", (metric.read)(backend));
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n<h2>All connections</h2>\n<table>\n");
    for metric in GLOBAL {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td></tr>",
            metric.key.replace('_', " "),
            (metric.read)(metrics)
        );
    }
    out.push_str("</table>\n</body></html>\n");
    out
}

fn escape_json(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(escaped, "\\u{:04x}", u32::from(c));
            }
            c => escaped.push(c),
        }
    }
    escaped
}

fn escape_html(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::sync::atomic::Ordering::Relaxed;

    use http_body_util::BodyExt;

    use super::*;
    use crate::backends::balance::{Backend, Policy};

    fn pool() -> Pool {
        let app1 = Backend::new("app1".into(), SocketAddr::from(([127, 0, 0, 1], 8081)), 1);
        let odd = Backend::new(
            "<b>\"x\"\u{1}".into(),
            SocketAddr::from(([127, 0, 0, 1], 8082)),
            3,
        );
        app1.stats().requests.fetch_add(5, Relaxed);
        odd.set_up(false);
        Pool::new(
            vec![Arc::new(app1), Arc::new(odd)],
            Policy::LeastConnections,
        )
    }

    #[test]
    fn json_lists_global_and_backend_numbers() {
        let metrics = Metrics::default();
        metrics.tunnels_total.fetch_add(2, Relaxed);
        let json = stats_json(&metrics, &pool());
        let pid = std::process::id();
        assert!(json.starts_with(&format!(
            "{{\"policy\":\"least-connections\",\"pid\":{pid},\"connections_active\":0,"
        )));
        assert!(json.contains(",\"tunnels_total\":2,"));
        assert!(json.contains(
            "{\"name\":\"app1\",\"addr\":\"127.0.0.1:8081\",\"up\":true,\"weight\":1,\"active\":0,\"requests\":5,"
        ));
        assert!(json.contains("{\"name\":\"<b>\\\"x\\\"\\u0001\",\"addr\":\"127.0.0.1:8082\",\"up\":false,\"weight\":3,"));
        assert!(json.ends_with("\"transitions_down\":0}]}"));
        assert_eq!(json.matches('{').count(), json.matches('}').count());
    }

    #[test]
    fn html_escapes_names_and_shows_states() {
        let html = stats_html(&Metrics::default(), &pool());
        assert!(html.contains("<tr class=\"up\"><td>app1</td><td>127.0.0.1:8081</td><td>up</td>"));
        assert!(
            html.contains(
                "<td>&lt;b&gt;&quot;x&quot;\u{1}</td><td>127.0.0.1:8082</td><td>down</td>"
            )
        );
        assert!(!html.contains("<b>"));
        assert!(html.contains("<th>bytes to client</th>"));
    }

    async fn body_of(response: Response<Full<Bytes>>) -> String {
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn routes() {
        let (metrics, pool) = (Arc::new(Metrics::default()), Arc::new(pool()));
        let response = respond(&Method::GET, "/metrics", &metrics, &pool);
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()[header::CONTENT_TYPE], PROMETHEUS_TEXT);
        assert!(body_of(response).await.contains("lb_backend_up{"));

        let response = respond(&Method::HEAD, "/stats", &metrics, &pool);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");

        let response = respond(&Method::GET, "/", &metrics, &pool);
        assert!(body_of(response).await.starts_with("<!doctype html>"));

        let response = respond(&Method::GET, "/nope", &metrics, &pool);
        assert_eq!(response.status(), StatusCode::NOT_FOUND);

        let response = respond(&Method::POST, "/metrics", &metrics, &pool);
        assert_eq!(response.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(response.headers()[header::ALLOW], "GET, HEAD");
    }
}
