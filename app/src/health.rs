//! `GET /healthz`: whether a load balancer should send this instance new clients.
//!
//! 200 `ok` while the instance can serve: listening and (with Redis) subscribed to the channel.
//! 503 with the reason while draining for shutdown or while the Redis subscription is down, so
//! that `lb` (or any HTTP health check) routes new clients to another instance.

use axum::extract::State;
use axum::http::StatusCode;

use crate::state::AppState;

/// The health answer.
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if !state.hub().is_up() {
        (StatusCode::SERVICE_UNAVAILABLE, "redis subscription down\n")
    } else {
        (StatusCode::OK, "ok")
    }
}
