//! The chat page and its icon, embedded in the binary at build time.
//!
//! `GET /` returns `page/index.html` (all styles and script inline, no external resources; it
//! derives the WebSocket URL from its own location and renders messages as text) with the
//! configured name and content lengths as its fields' `maxlength` and, in token mode, the
//! `token_url` it fetches its token from (which its Content-Security-Policy then allows), and
//! `GET /favicon.ico` the icon. Nothing is read from disk at run time.

use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};

use crate::config::AuthConfig;
use crate::state::AppState;

const INDEX_HTML: &str = include_str!("page/index.html");
const FAVICON: &[u8] = include_bytes!("page/favicon.ico");

/// Restricts the page to its own inline script and style, its own icon and its own WebSocket
/// (`{{CONNECT}}`: and, in token mode, the origin of an absolute `token_url`).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'unsafe-inline'; \
     style-src 'unsafe-inline'; img-src 'self'; connect-src 'self'{{CONNECT}}; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `GET /`: the chat page.
pub async fn index(State(state): State<AppState>) -> impl IntoResponse {
    let limits = &state.config().limits;
    let token_url = match &state.config().auth {
        AuthConfig::Anonymous => "",
        AuthConfig::Token(token) => token.token_url.as_str(),
    };
    (
        [
            (header::CONTENT_SECURITY_POLICY, policy(token_url)),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
            (header::CACHE_CONTROL, "no-cache".to_owned()),
        ],
        Html(render(
            limits.max_name_chars,
            limits.max_content_chars,
            token_url,
        )),
    )
}

/// The page with its fields' `maxlength` set to the server's limits (a browser counts UTF-16
/// units, the server characters: a field may hold fewer characters than allowed, never more)
/// and the token URL (empty in anonymous mode; config checked it holds no quote or `<`).
fn render(max_name_chars: usize, max_content_chars: usize, token_url: &str) -> String {
    INDEX_HTML
        .replace("{{MAX_NAME_CHARS}}", &max_name_chars.to_string())
        .replace("{{MAX_CONTENT_CHARS}}", &max_content_chars.to_string())
        .replace("{{TOKEN_URL}}", &token_url.replace('&', "&amp;"))
}

/// The Content-Security-Policy, letting the page fetch an absolute token URL's origin.
fn policy(token_url: &str) -> String {
    let origin = ["https://", "http://"].iter().find_map(|scheme| {
        let rest = token_url.strip_prefix(scheme)?;
        let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
        (!host.is_empty() && !host.contains([' ', ';', ',', '\'']))
            .then(|| format!(" {scheme}{host}"))
    });
    CONTENT_SECURITY_POLICY.replace("{{CONNECT}}", origin.as_deref().unwrap_or(""))
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
        let page = render(8, 32, "");
        assert!(
            page.contains(r#"<input id="name" maxlength="8" "#),
            "{page}"
        );
        assert!(
            page.contains(r#"<input id="content" maxlength="32" "#),
            "{page}"
        );
        assert!(!page.contains("{{"), "a placeholder is left");
        assert!(page.contains(r#"<body data-token-url="">"#), "anonymous");
    }

    #[test]
    fn token_mode_names_its_token_url_and_the_policy_allows_it() {
        let page = render(8, 32, "http://127.0.0.1:9/token?a=1&b=2");
        assert!(page.contains(r#"data-token-url="http://127.0.0.1:9/token?a=1&amp;b=2""#));
        assert!(
            policy("http://127.0.0.1:9/token").contains("connect-src 'self' http://127.0.0.1:9;")
        );
        assert!(policy("/token").contains("connect-src 'self';"));
        assert!(policy("").contains("connect-src 'self';"));
    }
}
