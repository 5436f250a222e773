//! The server API: the operator's backend posts into rooms, reads history and presence, on a
//! listener of its own (`api_listen`, off by default), never the public one.
//!
//! Every `/api/*` request but `/api/openapi.json` needs `Authorization: Bearer <key>` with a key
//! of `api_keys_file` (`keys`: several at once, reloaded on SIGHUP, compared in constant time);
//! otherwise 401 with a JSON error and nothing happens. `routes` holds the endpoints and the
//! OpenAPI document generated from them (`utoipa`); a message posted here takes the path of a
//! client's message (`protocol` validation, the room's store: its script, id, history and `cid`
//! dedupe). `metrics` counts every call by endpoint and status for `/metrics`. Errors are
//! `{"error": "<reason>"}` with a 4xx (bad input, nothing published) or 503 (Redis away).

pub mod keys;
pub mod metrics;
pub mod routes;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use self::keys::ApiKeys;
use self::metrics::ApiMetrics;
use crate::state::AppState;

/// What the API's handlers share.
#[derive(Clone)]
pub struct Api {
    /// The chat server's state: rooms, presence, config.
    pub app: AppState,
    /// The keys in force.
    pub keys: ApiKeys,
    /// The counters of `/metrics`.
    pub metrics: Arc<ApiMetrics>,
}

/// An answer other than success: a status and the reason, sent as `{"error": reason}`.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What is wrong, for the caller.
    pub reason: String,
}

impl ApiError {
    /// 400 with `reason`.
    pub fn bad_request(reason: impl std::fmt::Display) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            reason: reason.to_string(),
        }
    }

    /// `status` with `reason`.
    pub fn new(status: StatusCode, reason: impl std::fmt::Display) -> ApiError {
        ApiError {
            status,
            reason: reason.to_string(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.reason })),
        )
            .into_response()
    }
}

/// The API's routes: `/api/*` behind the keys, `/api/openapi.json` and `/metrics` open.
pub fn router(api: Api) -> Router {
    let keyed = Router::new()
        .route("/api/rooms", get(routes::list_rooms))
        .route("/api/rooms/{room}/messages", post(routes::post_message))
        .route("/api/rooms/{room}/history", get(routes::history))
        .route("/api/rooms/{room}/presence", get(routes::room_presence))
        .route("/api/users/{user}", get(routes::user))
        .route("/api/users/{user}/disconnect", post(routes::disconnect))
        .route_layer(middleware::from_fn_with_state(api.clone(), authorize));
    Router::new()
        .merge(keyed)
        .route("/api/openapi.json", get(routes::openapi))
        .route(
            "/metrics",
            get(metrics::scrape).with_state(Arc::clone(&api.metrics)),
        )
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint takes another method",
            )
        })
        .layer(middleware::from_fn_with_state(
            Arc::clone(&api.metrics),
            metrics::count,
        ))
        .with_state(api)
}

/// Middleware: lets a request through only with a key in force.
async fn authorize(State(api): State<Api>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match presented {
        Some(key) if api.keys.accepts(key.trim()) => next.run(request).await,
        Some(_) => {
            ApiError::new(StatusCode::UNAUTHORIZED, "the API key is not valid").into_response()
        }
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "an API key is required: Authorization: Bearer <key>",
        )
        .into_response(),
    }
}

/// Serves the API on `listener` until `stop`; SIGHUP reloads the keys meanwhile.
pub async fn serve(
    api: Api,
    listener: TcpListener,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let keys = api.keys.clone();
    let reload_stop = stop.clone();
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                () = reload_stop.cancelled() => break,
                signal = hangups.recv() => {
                    if signal.is_none() {
                        break;
                    }
                    match keys.reload() {
                        Ok(count) => tracing::info!(keys = count, "API keys reloaded"),
                        Err(e) => tracing::warn!(error = %e, "API keys not reloaded; the old ones stay"),
                    }
                }
            }
        }
    });
    axum::serve(listener, router(api))
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
}
