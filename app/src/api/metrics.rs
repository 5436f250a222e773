//! `/metrics` of the API listener: API calls counted by endpoint (the route's template, e.g.
//! `/api/rooms/{room}/messages`, so room names do not multiply the series) and HTTP status,
//! written in the Prometheus text format by `prometheus-client` at each scrape.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of one series: `endpoint` and `status`.
type Labels = Vec<(&'static str, String)>;

/// The API's counters.
pub struct ApiMetrics {
    registry: Registry,
    calls: Family<Labels, Counter>,
}

impl ApiMetrics {
    /// Empty counters, registered.
    pub fn new() -> Arc<ApiMetrics> {
        let mut registry = Registry::default();
        let calls = Family::<Labels, Counter>::default();
        registry.register(
            "app_api_requests",
            "Server API requests by endpoint and HTTP status",
            calls.clone(),
        );
        Arc::new(ApiMetrics { registry, calls })
    }

    fn count(&self, endpoint: &str, status: u16) {
        self.calls
            .get_or_create(&vec![
                ("endpoint", endpoint.to_owned()),
                ("status", status.to_string()),
            ])
            .inc();
    }

    /// The text a scrape receives.
    fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Middleware: counts every request by its route and the status answered (`other` for a path
/// no route matched).
pub async fn count(
    State(metrics): State<Arc<ApiMetrics>>,
    request: Request,
    next: Next,
) -> Response {
    let endpoint = request.extensions().get::<MatchedPath>().map_or_else(
        || "other".to_owned(),
        |p| format!("{} {}", request.method(), p.as_str()),
    );
    let response = next.run(request).await;
    metrics.count(&endpoint, response.status().as_u16());
    response
}

/// `GET /metrics`.
pub async fn scrape(State(metrics): State<Arc<ApiMetrics>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )],
        metrics.encode(),
    )
        .into_response()
}
