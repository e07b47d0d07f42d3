//! The OCI Distribution v1.1 HTTP API. One module per area; this one parses request paths
//! (repository names have any depth, so axum's path patterns cannot split them) and
//! dispatches.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri, Version, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use futures_util::TryStreamExt;
use outpost_core::RepositoryName;

use crate::auth::Auth;
use crate::metrics::Metrics;
use crate::storage::{ByteStream, Store};

pub mod access;
pub mod admin;
pub mod blobs;
pub mod children;
pub mod error;
pub mod health;
pub mod listing;
pub mod manifests;
pub mod referrers;
pub mod uploads;

#[cfg(test)]
mod tests;

pub use error::{ApiError, Code};

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub auth: Arc<Auth>,
    /// Whether clients reach us over HTTPS (for the token endpoint's URL).
    pub tls: bool,
    /// Whether clients may push (readwrite) or only pull (readonly).
    pub mode: crate::config::Mode,
    /// Sync with the parent; `None` for a standalone registry.
    pub syncer: Option<Arc<crate::sync::Syncer>>,
    /// Pull-through on demand; `None` when standalone or with `--pull-through false`.
    pub pull_through: Option<Arc<crate::service::pull_through::PullThrough>>,
    /// Pull times and eviction under `--max-storage`.
    pub retention: Option<Arc<crate::service::retention::Retention>>,
    /// Staging requests; `None` when standalone.
    pub staging: Option<Arc<crate::service::staging::Staging>>,
    /// Connected registries that report to this one.
    pub children: Arc<crate::sync::children::Children>,
    /// Set on SIGTERM/SIGINT: /readyz answers 503 from then on, so load balancers stop
    /// sending new connections while the listeners still serve (`--shutdown-delay`).
    pub shutting_down: std::sync::atomic::AtomicBool,
}

pub type Shared = Arc<AppState>;

/// The route a request matched, recorded for metrics.
#[derive(Clone, Copy)]
pub struct RouteLabel(pub &'static str);

/// A parsed `/v2/...` path.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Base,
    Catalog,
    Manifest(RepositoryName, String),
    Blob(RepositoryName, String),
    UploadStart(RepositoryName),
    Upload(RepositoryName, String),
    Tags(RepositoryName),
    Referrers(RepositoryName, String),
}

impl Route {
    fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Manifest(..) => "manifests",
            Route::Blob(..) => "blobs",
            Route::UploadStart(..) | Route::Upload(..) => "uploads",
            Route::Tags(..) => "tags",
            Route::Referrers(..) => "referrers",
        }
    }
}

fn percent_decode(s: &str) -> Option<String> {
    decode(s, false)
}

/// Percent-decoding of form fields, where `+` stands for a space.
pub fn percent_decode_form(s: &str) -> Option<String> {
    decode(s, true)
}

fn decode(s: &str, plus_is_space: bool) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if plus_is_space && b[i] == b'+' {
            out.push(b' ');
            i += 1;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Splits the path after `/v2/` into a route. Names are matched on the raw path, so any
/// percent-encoding in a name (`%2e%2e`) fails the name grammar instead of being decoded.
pub fn parse_path(rest: &str) -> Result<Route, ApiError> {
    if rest.is_empty() {
        return Ok(Route::Base);
    }
    if rest == "_catalog" {
        return Ok(Route::Catalog);
    }
    let segs: Vec<&str> = rest.split('/').collect();
    let n = segs.len();
    let name = |upto: usize| -> Result<RepositoryName, ApiError> {
        let raw = segs[..upto].join("/");
        raw.parse().map_err(|e: outpost_core::NameError| {
            ApiError::bad_request(Code::NameInvalid, "invalid repository name")
                .detail(serde_json::json!({ "name": raw, "reason": e.to_string() }))
        })
    };
    let last = || {
        percent_decode(segs[n - 1]).ok_or_else(|| {
            ApiError::bad_request(Code::NameInvalid, "invalid percent-encoding in path")
        })
    };
    let route = if n >= 3 && segs[n - 2] == "tags" && segs[n - 1] == "list" {
        Route::Tags(name(n - 2)?)
    } else if n >= 3 && segs[n - 3] == "blobs" && segs[n - 2] == "uploads" {
        if segs[n - 1].is_empty() {
            Route::UploadStart(name(n - 3)?)
        } else {
            Route::Upload(name(n - 3)?, last()?)
        }
    } else if n >= 3 && segs[n - 2] == "blobs" && segs[n - 1] == "uploads" {
        Route::UploadStart(name(n - 2)?)
    } else if n >= 3 && segs[n - 2] == "manifests" {
        Route::Manifest(name(n - 2)?, last()?)
    } else if n >= 3 && segs[n - 2] == "blobs" {
        Route::Blob(name(n - 2)?, last()?)
    } else if n >= 3 && segs[n - 2] == "referrers" {
        Route::Referrers(name(n - 2)?, last()?)
    } else {
        return Err(ApiError::not_found(Code::Unsupported, "no such endpoint"));
    };
    Ok(route)
}

/// The query string as a map; a malformed one counts as empty.
pub fn query(uri: &Uri) -> HashMap<String, String> {
    Query::<HashMap<String, String>>::try_from_uri(uri)
        .map(|q| q.0)
        .unwrap_or_default()
}

/// A request body as a byte stream.
pub fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// `Content-Length` if present and valid.
pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Sets a header from a computed value; values that are not valid header text are skipped
/// (they cannot occur for digests, names and media types validated before this point).
pub fn set_header(h: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(name, v);
    }
}

/// Whether `If-None-Match` names the entity tag of `digest`.
pub fn etag_matches(headers: &HeaderMap, digest: &outpost_core::Digest) -> bool {
    let etag = format!("\"{digest}\"");
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.split(',').any(|t| t.trim() == etag))
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        Code::Unsupported,
        "method not supported on this endpoint",
    )
}

async fn dispatch(State(app): State<Shared>, req: Request) -> Response {
    let ip = access::client_ip(&req);
    let (parts, body) = req.into_parts();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let rest = uri.path().strip_prefix("/v2/").unwrap_or("");
    let route = match parse_path(rest) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let label = RouteLabel(route.label());
    let principal = match access::check(&app, ip, &route, &method, &headers, &uri).await {
        Ok(p) => p,
        Err(mut resp) => {
            resp.extensions_mut().insert(label);
            return resp;
        }
    };
    let result = match (route, &method) {
        (Route::Base, &Method::GET | &Method::HEAD) => Ok(base()),
        (Route::Catalog, &Method::GET) => listing::catalog(&app, &uri, &principal).await,
        (Route::Tags(repo), &Method::GET) => listing::tags(&app, &repo, &uri).await,
        (Route::Manifest(repo, r), &Method::GET | &Method::HEAD) => {
            manifests::get(&app, &repo, &r, &headers, method == Method::HEAD).await
        }
        (Route::Manifest(repo, r), &Method::PUT) => {
            manifests::put(&app, &repo, &r, &headers, body).await
        }
        (Route::Manifest(repo, r), &Method::DELETE) => manifests::delete(&app, &repo, &r).await,
        (Route::Blob(repo, d), &Method::GET | &Method::HEAD) => {
            blobs::get(&app, &repo, &d, &headers, method == Method::HEAD).await
        }
        (Route::Blob(repo, d), &Method::DELETE) => blobs::delete(&app, &repo, &d).await,
        (Route::UploadStart(repo), &Method::POST) => {
            uploads::start(&app, &repo, &uri, &headers, body, &principal).await
        }
        (Route::Upload(repo, id), &Method::GET) => uploads::status(&app, &repo, &id).await,
        (Route::Upload(repo, id), &Method::PATCH) => {
            uploads::patch(&app, &repo, &id, &headers, body).await
        }
        (Route::Upload(repo, id), &Method::PUT) => {
            uploads::finish(&app, &repo, &id, &uri, &headers, body).await
        }
        (Route::Upload(repo, id), &Method::DELETE) => uploads::cancel(&app, &repo, &id).await,
        (Route::Referrers(repo, d), &Method::GET) => referrers::list(&app, &repo, &d, &uri).await,
        _ => Err(method_not_allowed()),
    };
    let mut resp = result.unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(label);
    resp
}

fn base() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], "{}").into_response()
}

/// Records metrics, stamps the API version header and logs each request at debug level.
async fn observe(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let start = Instant::now();
    let method = req.method().clone();
    let path_for_log =
        tracing::enabled!(tracing::Level::DEBUG).then(|| req.uri().path().to_owned());
    let http1 = req.version() <= Version::HTTP_11;
    let mut resp = next.run(req).await;
    // Shutting down (not ready, still serving): an HTTP/1 client is told to close its kept-alive
    // connection after this response, so its next request opens a new connection, which the
    // load balancer sends to another replica. Kept open, the connection would sit idle until the
    // drain closes it, and a request sent at that instant goes unanswered and must be resent.
    // (HTTP/2 has no such header; the drain's GOAWAY tells those clients.)
    if http1 && app.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    let route = resp
        .extensions()
        .get::<RouteLabel>()
        .map_or("other", |r| r.0);
    let status = resp.status();
    if route != "health" && route != "metrics" {
        resp.headers_mut().insert(
            "docker-distribution-api-version",
            HeaderValue::from_static("registry/2.0"),
        );
        // Tells a child syncing from here that it may report its state (other parents lack
        // the header, and a child sends them nothing).
        resp.headers_mut().insert(
            crate::sync::report::OUTPOST_API_HEADER,
            HeaderValue::from_static(crate::sync::report::OUTPOST_API_VERSION),
        );
    }
    let elapsed = start.elapsed();
    app.metrics
        .observe_request(method.as_str(), route, status.as_u16(), elapsed);
    if let Some(path) = path_for_log {
        tracing::debug!(%method, path, status = status.as_u16(), ms = elapsed.as_secs_f64() * 1e3, "request");
    }
    resp
}

/// The registry API router. `/metrics` is added when it is served on the same listener.
pub fn router(app: Shared, with_metrics: bool) -> Router {
    let mut r = Router::new()
        .route(
            "/v2",
            any(|| async { axum::response::Redirect::permanent("/v2/") }),
        )
        .route("/v2/", any(dispatch))
        .route("/v2/{*rest}", any(dispatch))
        .route(access::TOKEN_PATH, any(access::token_endpoint))
        .route(
            "/outpost/v1/children/{name}",
            axum::routing::put(children::report),
        )
        .merge(health::router());
    if with_metrics {
        r = r.merge(health::metrics_router());
    }
    r.fallback(|| async {
        let mut resp = ApiError::not_found(Code::Unsupported, "no such endpoint").into_response();
        resp.extensions_mut().insert(RouteLabel("other"));
        resp
    })
    .layer(middleware::from_fn_with_state(app.clone(), observe))
    .with_state(app)
}

/// Routes for a listener that serves only `/metrics` (and health), such as `--metrics-listen`.
pub fn metrics_only_router(app: Shared) -> Router {
    Router::new()
        .merge(health::router())
        .merge(health::metrics_router())
        .with_state(app)
}

/// The admin listener's routes. The admin API itself (status, sync, staging) grows here.
pub fn admin_router(app: Shared, with_metrics: bool) -> Router {
    let mut r = Router::new().merge(health::router()).merge(admin::router());
    if with_metrics {
        r = r.merge(health::metrics_router());
    }
    r.with_state(app)
}
