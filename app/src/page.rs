//! The chat page and its icon, embedded in the binary at build time.
//!
//! `GET /` returns `page/index.html` (all styles and script inline, no external resources; it
//! derives the WebSocket URL from its own location and renders messages as text) and
//! `GET /favicon.ico` the icon. Nothing is read from disk at run time.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const INDEX_HTML: &str = include_str!("page/index.html");
const FAVICON: &[u8] = include_bytes!("page/favicon.ico");

/// Restricts the page to its own inline script and style, its own icon and its own WebSocket.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the chat page.
pub async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(INDEX_HTML),
    )
}

/// `GET /favicon.ico`: the icon.
pub async fn favicon() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "image/x-icon"),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        FAVICON,
    )
}
