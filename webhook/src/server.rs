//! The HTTPS listener: `POST /mutate`, `/healthz`, `/readyz`, `/metrics`, and optionally a
//! plain-HTTP one for `/metrics` (and the health endpoints) that Prometheus scrapes without TLS
//! settings. SIGTERM turns `/readyz` to 503 at once on both, serves on for the shutdown delay
//! (so endpoints drop the pod before it stops answering), then drains.

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
    /// Set at the first SIGTERM or SIGINT: not ready from then on.
    pub draining: Arc<AtomicBool>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/mutate", post(mutate))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            close_when_draining,
        ))
        .with_state(state)
}

/// The plain-HTTP metrics listener's routes: no admissions there.
pub fn metrics_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// While draining, HTTP/1 answers carry `Connection: close`, so a kept-alive client (the API
/// server's connection pool) reconnects, through the Service, to a replica that stays.
async fn close_when_draining(
    State(s): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let http1 = req.version() < axum::http::Version::HTTP_2;
    let mut r = next.run(req).await;
    if http1 && s.draining.load(Ordering::SeqCst) {
        r.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    r
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
    if s.draining.load(Ordering::SeqCst) {
        return (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response();
    }
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

/// Serves HTTPS on `addr` (and plain HTTP on `metrics`) until SIGTERM or SIGINT; then, not
/// ready, for `shutdown_delay`; then drains for up to [`DRAIN`].
pub async fn serve(
    addr: SocketAddr,
    tls: RustlsConfig,
    state: AppState,
    metrics: Option<std::net::TcpListener>,
    shutdown_delay: Duration,
) -> std::io::Result<()> {
    let handle = axum_server::Handle::new();
    let metrics_handle = axum_server::Handle::new();
    let (h, mh) = (handle.clone(), metrics_handle.clone());
    // Watched from here: a signal while the listeners start still stops the process.
    let signals = Signals::new();
    let draining = Arc::clone(&state.draining);
    tokio::spawn(async move {
        drain_after_signal(signals, &draining, shutdown_delay).await;
        tracing::info!("shutting down: draining admissions");
        h.graceful_shutdown(Some(DRAIN));
        mh.graceful_shutdown(Some(DRAIN));
    });
    // Admission reviews are small and latency-bound: no Nagle delay waiting on an ACK.
    let acceptor = RustlsAcceptor::new(tls)
        .handshake_timeout(Duration::from_secs(10))
        .acceptor(NoDelayAcceptor::new());
    let mut server = axum_server::bind(addr).acceptor(acceptor).handle(handle);
    server.http_builder().http1().keep_alive(true);
    let app = router(state.clone());
    tracing::info!(%addr, "serving admission reviews over HTTPS");
    let https = server.serve(app.into_make_service());
    let Some(listener) = metrics else {
        return https.await;
    };
    if let Ok(a) = listener.local_addr() {
        tracing::info!(addr = %a, "serving /metrics over plain HTTP");
    }
    let plain = axum_server::from_tcp(listener)?
        .handle(metrics_handle)
        .serve(metrics_router(state).into_make_service());
    let (a, b) = tokio::join!(https, plain);
    a.and(b)
}

/// SIGTERM and SIGINT, installed when made (not when first awaited), so a signal during
/// start-up is not lost; a second signal is told apart from the first.
pub struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    pub fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for {name}");
                None
            }
        };
        Signals {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT.
    pub async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}

impl Default for Signals {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits for the first signal and turns readiness off at once, listeners still open (as the
/// registry does); then serves on for `delay`, cut short by a second signal. The caller
/// closes its listeners and drains when this returns.
pub async fn drain_after_signal(mut signals: Signals, draining: &AtomicBool, delay: Duration) {
    signals.next().await;
    draining.store(true, Ordering::SeqCst);
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        delay_seconds = delay.as_secs_f64(),
        "shutting down: not ready, serving on for the shutdown delay"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = signals.next() => tracing::info!("second signal: shutdown delay cut short"),
    }
}
