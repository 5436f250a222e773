//! The chat page and its icon, embedded in the binary at build time.
//!
//! `GET /` returns `page/index.html` (all styles and script inline, no external resources; it
//! derives the WebSocket URL from its own location and renders messages as text) with the
//! configured name and content lengths as its fields' `maxlength`, and `GET /favicon.ico` the
//! icon. Nothing is read from disk at run time.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};

use crate::state::AppState;

const INDEX_HTML: &str = include_str!("page/index.html");
const FAVICON: &[u8] = include_bytes!("page/favicon.ico");

/// Restricts the page to its own inline script and style, its own icon and its own WebSocket.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the chat page.
pub async fn index(State(state): State<AppState>) -> impl IntoResponse {
    let limits = &state.config().limits;
    (
        [
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Html(render(limits.max_name_chars, limits.max_content_chars)),
    )
}

/// The page with its fields' `maxlength` set to the server's limits. A browser counts UTF-16
/// units, the server characters: a field may hold fewer characters than allowed, never more.
fn render(max_name_chars: usize, max_content_chars: usize) -> String {
    INDEX_HTML
        .replace("{{MAX_NAME_CHARS}}", &max_name_chars.to_string())
        .replace("{{MAX_CONTENT_CHARS}}", &max_content_chars.to_string())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fields_are_limited_to_the_configured_lengths() {
        let page = render(8, 32);
        assert!(
            page.contains(r#"<input id="name" maxlength="8" "#),
            "{page}"
        );
        assert!(
            page.contains(r#"<input id="content" maxlength="32" "#),
            "{page}"
        );
        assert!(!page.contains("{{"), "a placeholder is left");
    }
}
