//! The admin API (`--admin-listen`): status of the registry and its sync, and starting a sync
//! now. Never exposed by the chart's Service.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use serde_json::json;

use super::Shared;
use super::access::json_response;
use crate::service::staging::StagingError;
use crate::sync::{RunRequest, Status, mode_name};

/// The status a standalone registry (no parent) reports.
fn standalone_status(app: &Shared) -> Status {
    Status {
        name: "outpost".into(),
        mode: mode_name(app.mode).into(),
        connection_state: "standalone".into(),
        parent: "-".into(),
        login_server: "-".into(),
        last_sync_utc: None,
        sync_schedule: "-".into(),
        sync_window: "-".into(),
        storage_bytes: app.metrics.storage_bytes.get(),
        repositories: Vec::new(),
        syncing: false,
        last_error: None,
        scope_note: None,
        last_run: None,
        outbox_pending: 0,
        requests: Vec::new(),
        platforms: Vec::new(),
    }
}

async fn status(State(app): State<Shared>) -> Response {
    let st = match &app.syncer {
        Some(s) => s.status(app.metrics.storage_bytes.get()),
        None => standalone_status(&app),
    };
    match serde_json::to_value(&st) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": e.to_string() }),
        ),
    }
}

async fn sync_now(State(app): State<Shared>) -> Response {
    let Some(s) = &app.syncer else {
        return json_response(
            StatusCode::CONFLICT,
            &json!({ "error": "standalone registry: no parent to sync from (give --connection-string)" }),
        );
    };
    match s.request_run().await {
        Ok(RunRequest::Started(run)) => json_response(
            StatusCode::ACCEPTED,
            &json!({ "run": run, "started": true }),
        ),
        Ok(RunRequest::AlreadyRunning) => json_response(
            StatusCode::CONFLICT,
            &json!({ "error": "a sync is already running", "started": false }),
        ),
        // Another process leads: it runs the request after its next poll (within seconds),
        // as run `runAtLeast` or later; status's `requests` names the run once it started.
        Ok(RunRequest::Queued { id, at_least }) => json_response(
            StatusCode::ACCEPTED,
            &json!({ "request": id, "runAtLeast": at_least, "started": false }),
        ),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": format!("cannot store the sync request: {e}") }),
        ),
    }
}

fn no_staging() -> Response {
    json_response(
        StatusCode::CONFLICT,
        &json!({ "error": "standalone registry: no parent to stage from (give --connection-string)" }),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StageBody {
    images: Vec<String>,
}

async fn stage(State(app): State<Shared>, body: axum::body::Bytes) -> Response {
    let Some(st) = &app.staging else {
        return no_staging();
    };
    let req: StageBody = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return json_response(
                StatusCode::BAD_REQUEST,
                &json!({ "error": format!("expected {{\"images\": [\"repo:tag\", ...]}}: {e}") }),
            );
        }
    };
    match st.submit(req.images).await {
        Ok(id) => json_response(StatusCode::ACCEPTED, &json!({ "id": id })),
        Err(StagingError::Invalid(m)) => {
            json_response(StatusCode::BAD_REQUEST, &json!({ "error": m }))
        }
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": e.to_string() }),
        ),
    }
}

async fn staging_list(State(app): State<Shared>) -> Response {
    let Some(st) = &app.staging else {
        return no_staging();
    };
    json_response(StatusCode::OK, &json!({ "requests": st.list() }))
}

async fn staging_get(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(st) = &app.staging else {
        return no_staging();
    };
    match st.get(&id).map(serde_json::to_value) {
        Some(Ok(v)) => json_response(StatusCode::OK, &v),
        Some(Err(e)) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": e.to_string() }),
        ),
        None => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("no staging request {id}") }),
        ),
    }
}

/// Forgets a finished request, unpinning its images.
async fn staging_delete(State(app): State<Shared>, Path(id): Path<String>) -> Response {
    let Some(st) = &app.staging else {
        return no_staging();
    };
    match st.remove(&id).await {
        Ok(true) => json_response(StatusCode::OK, &json!({ "deleted": id })),
        Ok(false) => json_response(
            StatusCode::CONFLICT,
            &json!({ "error": format!("no finished staging request {id}") }),
        ),
        Err(e) => json_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            &json!({ "error": e.to_string() }),
        ),
    }
}

/// The namespaces whose credentials this process accepted since it started (patterns, key
/// id, validity; never the credential).
async fn namespace_credentials(State(app): State<Shared>) -> Response {
    json_response(
        StatusCode::OK,
        &json!({ "namespaceCredentials": app.auth.namespaces().seen() }),
    )
}

pub fn router() -> Router<Shared> {
    Router::new()
        .route("/outpost/v1/status", get(status))
        .route(
            "/outpost/v1/namespace-credentials",
            get(namespace_credentials),
        )
        .route("/outpost/v1/children", get(super::children::list))
        .route("/outpost/v1/children/{name}", get(super::children::show))
        .route("/outpost/v1/sync", post(sync_now))
        .route("/outpost/v1/staging", post(stage).get(staging_list))
        .route(
            "/outpost/v1/staging/{id}",
            get(staging_get).delete(staging_delete),
        )
}
