//! `/v2/<name>/blobs/<digest>`: GET (with `Range`), HEAD, DELETE.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;
use outpost_core::{Digest, RepositoryName};

use super::{ApiError, Code, Shared, etag_matches, set_header};
use crate::storage::RangeRequest;

pub fn parse_digest(d: &str) -> Result<Digest, ApiError> {
    d.parse().map_err(|e: outpost_core::DigestError| {
        ApiError::bad_request(Code::DigestInvalid, format!("invalid digest: {e}"))
    })
}

fn blob_unknown(d: &Digest) -> ApiError {
    ApiError::not_found(Code::BlobUnknown, "blob unknown to registry")
        .detail(serde_json::json!({ "digest": d.to_string() }))
}

/// Headers every successful blob response carries.
fn blob_headers(h: &mut HeaderMap, digest: &Digest) {
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    set_header(h, "docker-content-digest", digest.to_string());
    set_header(h, "etag", format!("\"{digest}\""));
}

pub async fn get(
    app: &Shared,
    repo: &RepositoryName,
    digest: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    let pt = app.pull_through.as_ref().filter(|p| p.in_scope(repo));
    if !app.store.repo_blob_linked(repo, &digest).await? {
        let Some(p) = pt else {
            if app.pull_through.is_some() {
                return Err(super::manifests::pull_error(
                    crate::service::pull_through::PullError::OutOfScope,
                    Code::BlobUnknown,
                ));
            }
            return Err(blob_unknown(&digest));
        };
        let (size, body) = p
            .blob(repo, &digest)
            .await
            .map_err(|e| super::manifests::pull_error(e, Code::BlobUnknown))?;
        // Range requests on a blob not stored yet get the whole blob (RFC 9110 allows it).
        let mut resp = if head {
            Response::new(Body::empty())
        } else {
            let counter = app.metrics.blob_bytes_served.clone();
            Response::new(Body::from_stream(body.inspect_ok(move |b| {
                counter.inc_by(b.len() as u64);
            })))
        };
        blob_headers(resp.headers_mut(), &digest);
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, size.into());
        return Ok(resp);
    }
    if let Some(p) = pt {
        p.hit();
    }
    if head {
        let size = app
            .store
            .blob_size(&digest)
            .await?
            .ok_or_else(|| blob_unknown(&digest))?;
        let mut resp = Response::new(Body::empty());
        blob_headers(resp.headers_mut(), &digest);
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, size.into());
        return Ok(resp);
    }
    // --storage-redirect: the client fetches the bytes (also a Range of them) from the object
    // store with a short-lived signed URL; access was checked before this handler ran.
    if let Some(url) = app.store.blob_redirect(&digest).await? {
        let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
        set_header(resp.headers_mut(), "location", url);
        set_header(
            resp.headers_mut(),
            "docker-content-digest",
            digest.to_string(),
        );
        return Ok(resp);
    }
    if etag_matches(headers, &digest) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        set_header(resp.headers_mut(), "etag", format!("\"{digest}\""));
        return Ok(resp);
    }
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(RangeRequest::parse);
    let (reader, served) = match app.store.blob_open(&digest, range).await {
        Ok(r) => r,
        Err(crate::storage::StorageError::BlobUnknown(_)) => return Err(blob_unknown(&digest)),
        Err(crate::storage::StorageError::RangeNotSatisfiable { size }) => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            set_header(
                resp.headers_mut(),
                "content-range",
                format!("bytes */{size}"),
            );
            return Ok(resp);
        }
        Err(e) => return Err(e.into()),
    };
    let counter = app.metrics.blob_bytes_served.clone();
    let body = reader.body.inspect_ok(move |b| {
        counter.inc_by(b.len() as u64);
    });
    let mut resp = Response::new(Body::from_stream(body));
    blob_headers(resp.headers_mut(), &digest);
    match served {
        Some(r) => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let h = resp.headers_mut();
            h.insert(header::CONTENT_LENGTH, r.count().into());
            set_header(
                h,
                "content-range",
                format!("bytes {}-{}/{}", r.first, r.last, reader.size),
            );
        }
        None => {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, reader.size.into());
        }
    }
    Ok(resp)
}

pub async fn delete(
    app: &Shared,
    repo: &RepositoryName,
    digest: &str,
) -> Result<Response, ApiError> {
    let digest = parse_digest(digest)?;
    if !app.store.repo_blob_unlink(repo, &digest).await? {
        return Err(blob_unknown(&digest));
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
