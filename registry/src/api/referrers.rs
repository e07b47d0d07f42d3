//! `/v2/<name>/referrers/<digest>`: the OCI 1.1 referrers API, with `artifactType` filtering.

use axum::http::{HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outpost_core::RepositoryName;
use serde_json::json;

use super::blobs::parse_digest;
use super::{ApiError, Shared, query};
use crate::content::manifest::OCI_INDEX;

pub async fn list(
    app: &Shared,
    repo: &RepositoryName,
    digest: &str,
    uri: &Uri,
) -> Result<Response, ApiError> {
    let subject = parse_digest(digest)?;
    let filter = query(uri).remove("artifactType");
    let mut descriptors = app.store.referrers(repo, &subject).await?;
    if let Some(t) = &filter {
        descriptors.retain(|d| d.artifact_type.as_deref() == Some(t.as_str()));
    }
    let body = json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": descriptors,
    });
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, OCI_INDEX)],
        body.to_string(),
    )
        .into_response();
    if filter.is_some() {
        resp.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(resp)
}
