//! Liveness, readiness and the Prometheus endpoint.

use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use super::{RouteLabel, Shared};

async fn healthz() -> Response {
    let mut r = "ok\n".into_response();
    r.extensions_mut().insert(RouteLabel("health"));
    r
}

/// Ready when storage answers: a store that cannot be read cannot serve pulls. (Object stores
/// decide from recent requests and probe at most every few seconds: each request is billed.)
/// Not ready once shutting down, before the listeners close, so traffic moves elsewhere first.
async fn readyz(State(app): State<Shared>) -> Response {
    let mut r = if app.shutting_down.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else if app.store.check_ready().await.is_ok() {
        "ready\n".into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "storage unavailable\n").into_response()
    };
    r.extensions_mut().insert(RouteLabel("health"));
    r
}

async fn metrics(State(app): State<Shared>) -> Response {
    let mut r = (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response();
    r.extensions_mut().insert(RouteLabel("metrics"));
    r
}

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
}

pub fn metrics_router() -> Router<Shared> {
    Router::new().route("/metrics", get(metrics))
}
