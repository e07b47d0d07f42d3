//! `/healthz`, `/readyz` (the last reconcile succeeded, and not shutting down) and `/metrics`,
//! on `--listen` and, with `--metrics-listen`, on a second address too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::Metrics;

/// What the endpoints report.
#[derive(Clone)]
pub struct Health {
    pub metrics: Arc<Metrics>,
    /// The last reconcile succeeded.
    pub ready: Arc<AtomicBool>,
    /// Set at the first SIGTERM or SIGINT: not ready from then on.
    pub draining: Arc<AtomicBool>,
}

fn router(h: Health) -> Router {
    let Health {
        metrics,
        ready,
        draining,
    } = h;
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let (ready, draining) = (ready.clone(), draining.clone());
                async move {
                    if draining.load(Ordering::SeqCst) {
                        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
                    } else if ready.load(Ordering::Relaxed) {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not reconciled\n")
                    }
                }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move {
                    (
                        [(
                            header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        m.encode(),
                    )
                        .into_response()
                }
            }),
        )
}

/// Serves until `stop` turns true, then lets requests in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics_listener: Option<tokio::net::TcpListener>,
    health: Health,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let one = |listener: tokio::net::TcpListener, mut stop: tokio::sync::watch::Receiver<bool>| {
        let app = router(health.clone());
        async move {
            let shutdown = async move {
                while !*stop.borrow_and_update() {
                    if stop.changed().await.is_err() {
                        break;
                    }
                }
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "metrics server failed");
            }
        }
    };
    match metrics_listener {
        None => one(listener, stop).await,
        Some(m) => {
            tokio::join!(one(listener, stop.clone()), one(m, stop));
        }
    }
}
