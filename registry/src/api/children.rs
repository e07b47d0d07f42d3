//! Connected registries below this one: `PUT /outpost/v1/children/{name}` on the registry API,
//! where a child reports its state with its sync token (allowed by `message/write` on
//! `gateway/<name>`), and `GET /outpost/v1/children[/{name}]` on the admin API.

use axum::extract::{Path, Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::access::{client_ip, denial_response, json_response};
use super::{ApiError, Code, RouteLabel, Shared};
use crate::auth::{Action, Credentials, Need, gateway_repository};
use crate::sync::children::{ChildrenError, MAX_REPORT_BYTES, Report, valid_name};

/// A child's report. Authenticated like any registry request; authorised by `message/write`
/// on the child's gateway pseudo-repository, so a sync token reports only as its own child.
pub async fn report(State(app): State<Shared>, Path(name): Path<String>, req: Request) -> Response {
    let mut resp = receive(&app, &name, req).await;
    resp.extensions_mut().insert(RouteLabel("children"));
    resp
}

async fn receive(app: &Shared, name: &str, req: Request) -> Response {
    let ip = client_ip(&req);
    let (parts, body) = req.into_parts();
    let (headers, uri) = (&parts.headers, &parts.uri);
    if !valid_name(name) {
        return ApiError::bad_request(
            Code::NameInvalid,
            "a connected registry name is 1-50 of A-Z a-z 0-9 - _",
        )
        .into_response();
    }
    let deny = |d| denial_response(app, headers, uri, d);
    let creds = match Credentials::parse(headers.get(header::AUTHORIZATION).map(|v| v.as_bytes())) {
        Ok(c) => c,
        Err(d) => return deny(d),
    };
    let principal = match app.auth.authenticate(ip, creds).await {
        Ok(p) => p,
        Err(d) => return deny(d),
    };
    // valid_name made sure the pseudo-repository parses.
    let Ok(repo) = gateway_repository(name).parse() else {
        return ApiError::bad_request(Code::NameInvalid, "invalid connected registry name")
            .into_response();
    };
    let need = Need {
        repo,
        action: Action::MessageWrite,
    };
    if let Err(d) = app.auth.authorize(&principal, &[need]) {
        return deny(d);
    }
    let bytes = match axum::body::to_bytes(body, MAX_REPORT_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                Code::SizeInvalid,
                "report too large or unreadable",
            )
            .into_response();
        }
    };
    let report: Report = match serde_json::from_slice(&bytes) {
        Ok(r) => r,
        Err(e) => {
            return ApiError::bad_request(Code::Unsupported, format!("not a report: {e}"))
                .into_response();
        }
    };
    if report.state.name != name {
        return ApiError::bad_request(
            Code::Unsupported,
            "the report's name is not the one in the path",
        )
        .into_response();
    }
    match app.children.record(report).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(ChildrenError::Invalid(m)) => {
            ApiError::bad_request(Code::Unsupported, m).into_response()
        }
        Err(ChildrenError::Store(e)) => ApiError::from(e).into_response(),
    }
}

/// `GET /outpost/v1/children` (admin API): every child heard from, nested ones included.
pub async fn list(State(app): State<Shared>) -> Response {
    match app.children.list().await {
        Ok(children) => json_response(StatusCode::OK, &json!({ "children": children })),
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("cannot read the children's records: {e}") }),
        ),
    }
}

/// `GET /outpost/v1/children/{name}` (admin API): one child's details.
pub async fn show(State(app): State<Shared>, Path(name): Path<String>) -> Response {
    match app.children.list().await {
        Ok(children) => match children.into_iter().find(|c| c.name == name) {
            Some(c) => json_response(StatusCode::OK, &json!(c)),
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({ "error": format!("no connected registry {name} has reported here") }),
            ),
        },
        Err(e) => json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({ "error": format!("cannot read the children's records: {e}") }),
        ),
    }
}
