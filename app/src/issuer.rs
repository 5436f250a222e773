//! A demo token issuer, for trying token mode on one machine (`app demo-issuer`, started by
//! `deploy/local/up --auth`). `GET /token?name=NAME` signs a token for whoever asks, under the
//! name asked for, with the rooms `--grant NAME=ROOM` gives that name: there is no login at
//! all, which is why it binds loopback addresses only and says so loudly. A real deployment's
//! `token_url` is the operator's own site, which knows who the browser's cookie belongs to.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::auth::{SigningKey, TokenRequest};

/// What the issuer signs with and grants.
pub struct Issuer {
    /// The key the app's `[auth]` verifies.
    pub key: SigningKey,
    /// Rooms granted per name (beyond the public ones).
    pub grants: HashMap<String, Vec<String>>,
    /// Lifetime of each token.
    pub ttl: Duration,
}

/// The warning the issuer prints at start and sends with every token.
pub const WARNING: &str = "DEMO TOKEN ISSUER: signs a token for ANY name without a login; for trials on this machine only";

#[derive(serde::Deserialize)]
struct NameQuery {
    name: Option<String>,
}

/// The issuer's routes: `GET /token?name=NAME`.
pub fn router(issuer: Issuer) -> Router {
    Router::new()
        .route("/token", get(token))
        .with_state(Arc::new(issuer))
}

/// Whether `addr` is one the issuer may listen on: loopback only.
pub fn may_listen_on(addr: SocketAddr) -> bool {
    addr.ip().is_loopback()
}

async fn token(
    State(issuer): State<Arc<Issuer>>,
    query: Result<Query<NameQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let name = query
        .ok()
        .and_then(|Query(q)| q.name)
        .map(|n| n.trim().to_owned())
        .unwrap_or_default();
    let mut response = if name.is_empty() || name.chars().count() > 64 {
        (
            StatusCode::BAD_REQUEST,
            axum::Json(serde_json::json!({ "error": "name: 1 to 64 characters" })),
        )
            .into_response()
    } else {
        let request = TokenRequest {
            sub: name.to_lowercase(),
            name: Some(name.clone()),
            rooms: issuer
                .grants
                .get(&name.to_lowercase())
                .cloned()
                .unwrap_or_default(),
            ttl: issuer.ttl,
            max_conns: None,
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match issuer.key.mint(&request, now) {
            Ok(minted) => {
                tracing::warn!(name, "{WARNING}: signed a token");
                axum::Json(serde_json::json!({ "token": minted.token, "warning": WARNING }))
                    .into_response()
            }
            Err(e) => (
                StatusCode::BAD_REQUEST,
                axum::Json(serde_json::json!({ "error": e.to_string() })),
            )
                .into_response(),
        }
    };
    // The page is served by the app, on another port: let it read the answer.
    if let Some(origin) = headers.get(header::ORIGIN) {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}
