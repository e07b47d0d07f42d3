//! The HTTPS listener: `POST /mutate`, `/healthz`, `/readyz`, `/metrics`; SIGTERM drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use http_body_util::{BodyExt, Limited};

use crate::admission::{self, Admission};
use crate::config::ConfigSource;
use crate::metrics::{Metrics, Outcome};

/// How long in-flight admissions may take to finish after SIGTERM.
pub const DRAIN: Duration = Duration::from_secs(30);

#[derive(Clone)]
pub struct AppState {
    pub admission: Arc<Admission>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<ConfigSource>,
    pub tls_loaded: Arc<AtomicBool>,
    /// Larger request bodies are not read; the pod passes unchanged.
    pub max_body: usize,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

fn json(body: Vec<u8>) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn mutate(State(s): State<AppState>, body: Body) -> Response {
    let bytes = match Limited::new(body, s.max_body).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let why = if e.is::<http_body_util::LengthLimitError>() {
                format!(
                    "request body over {} bytes; pod admitted unchanged",
                    s.max_body
                )
            } else {
                format!("cannot read the request body: {e}")
            };
            tracing::warn!(reason = %why, "admission passed unchanged");
            s.metrics.admission(Outcome::Error, Duration::ZERO);
            return json(admission::fail_open(admission::API_VERSION, "", &why));
        }
    };
    json(s.admission.answer(&bytes).await.body)
}

async fn readyz(State(s): State<AppState>) -> Response {
    let tls = s.tls_loaded.load(Ordering::Acquire);
    let config = s.config.get().is_some();
    if tls && config {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let why = format!("not ready: certificate loaded {tls}, config loaded {config}\n");
        (StatusCode::SERVICE_UNAVAILABLE, why).into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.encode(),
    )
        .into_response()
}

/// Serves HTTPS on `addr` until SIGTERM or SIGINT, then drains for up to [`DRAIN`].
pub async fn serve(addr: SocketAddr, tls: RustlsConfig, state: AppState) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: draining admissions");
        h.graceful_shutdown(Some(DRAIN));
    });
    // Admission reviews are small and latency-bound: no Nagle delay waiting on an ACK.
    let acceptor = RustlsAcceptor::new(tls)
        .handshake_timeout(Duration::from_secs(10))
        .acceptor(NoDelayAcceptor::new());
    let mut server = axum_server::bind(addr).acceptor(acceptor).handle(handle);
    server.http_builder().http1().keep_alive(true);
    let app = router(state);
    tracing::info!(%addr, "serving admission reviews over HTTPS");
    server.serve(app.into_make_service()).await
}

pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await
            }
        }
    };
    tokio::select! {
        _ = term => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
