//! `/v2/<name>/blobs/uploads/`: monolithic, POST+PUT and chunked uploads, cross-repository
//! mount, status and cancel.

use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use outpost_core::{Digest, RepositoryName};

use super::blobs::parse_digest;
use super::error::upload_range;
use super::{ApiError, Code, Shared, body_stream, content_length, query, set_header};
use crate::auth::{Action, Principal};

/// 201 for a blob now in `repo`.
fn created(repo: &RepositoryName, digest: &Digest) -> Response {
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    set_header(h, "location", format!("/v2/{repo}/blobs/{digest}"));
    set_header(h, "docker-content-digest", digest.to_string());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

/// 202 or 204 describing an upload session in progress.
fn in_progress(status: StatusCode, repo: &RepositoryName, id: &str, offset: u64) -> Response {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    set_header(h, "location", format!("/v2/{repo}/blobs/uploads/{id}"));
    set_header(h, "range", upload_range(offset));
    set_header(h, "docker-upload-uuid", id.to_owned());
    h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    resp
}

pub async fn start(
    app: &Shared,
    repo: &RepositoryName,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    principal: &Principal,
) -> Result<Response, ApiError> {
    let q = query(uri);
    if let Some(mount) = q.get("mount") {
        let digest = parse_digest(mount)?;
        if let Some(from) = q.get("from") {
            let from: RepositoryName = from.parse().map_err(|_| {
                ApiError::bad_request(Code::NameInvalid, "invalid repository name in from")
            })?;
            // Mounting reads the source: without that right it is an ordinary upload, and
            // whether the blob exists there is not revealed.
            if principal.may(from.as_str(), Action::ContentRead)
                && app.store.repo_blob_linked(&from, &digest).await?
            {
                app.store.repo_blob_link(repo, &digest).await?;
                return Ok(created(repo, &digest));
            }
        }
        // Not mountable: the spec says to fall back to a new upload session.
    } else if let Some(d) = q.get("digest") {
        let digest = parse_digest(d)?;
        // The store counts the bytes of a new blob (`outpost_storage_bytes`).
        app.store
            .blob_put(&digest, body_stream(body), content_length(headers))
            .await?;
        app.store.repo_blob_link(repo, &digest).await?;
        return Ok(created(repo, &digest));
    }
    let id = app.store.upload_start(repo).await?;
    Ok(in_progress(StatusCode::ACCEPTED, repo, &id, 0))
}

pub async fn status(app: &Shared, repo: &RepositoryName, id: &str) -> Result<Response, ApiError> {
    let st = app.store.upload_status(repo, id).await?;
    Ok(in_progress(StatusCode::NO_CONTENT, repo, id, st.offset))
}

/// Parses `Content-Range` of a chunk: `first-last`, also accepting the HTTP form
/// `bytes first-last/total` that some clients send.
fn chunk_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>, ApiError> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::new(
            StatusCode::RANGE_NOT_SATISFIABLE,
            Code::BlobUploadInvalid,
            "malformed Content-Range",
        )
    };
    let s = v.to_str().map_err(|_| bad())?.trim();
    let s = s
        .strip_prefix("bytes=")
        .or_else(|| s.strip_prefix("bytes "))
        .unwrap_or(s);
    let s = s.split('/').next().unwrap_or(s);
    let (a, b) = s.split_once('-').ok_or_else(bad)?;
    let first: u64 = a.trim().parse().map_err(|_| bad())?;
    let last: u64 = b.trim().parse().map_err(|_| bad())?;
    if last < first {
        return Err(bad());
    }
    Ok(Some((first, last)))
}

async fn append(
    app: &Shared,
    repo: &RepositoryName,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<u64, ApiError> {
    let range = chunk_range(headers)?;
    if let (Some((first, last)), Some(len)) = (range, content_length(headers))
        && last - first + 1 != len
    {
        return Err(ApiError::bad_request(
            Code::SizeInvalid,
            "Content-Range and Content-Length disagree",
        ));
    }
    let before = app.store.upload_status(repo, id).await?.offset;
    let st = match app
        .store
        .upload_append(repo, id, range.map(|r| r.0), body_stream(body))
        .await
    {
        Err(crate::storage::StorageError::RangeMismatch { offset, .. }) => {
            let mut resp = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::BlobUploadInvalid,
                "chunk does not start where the upload ends",
            )
            .header(header::RANGE, upload_range(offset));
            resp = resp.header(header::LOCATION, format!("/v2/{repo}/blobs/uploads/{id}"));
            return Err(resp);
        }
        other => other?,
    };
    if let Some((first, last)) = range
        && st.offset - before != last - first + 1
    {
        return Err(ApiError::bad_request(
            Code::SizeInvalid,
            "chunk length does not match Content-Range",
        ));
    }
    Ok(st.offset)
}

pub async fn patch(
    app: &Shared,
    repo: &RepositoryName,
    id: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let offset = append(app, repo, id, headers, body).await?;
    Ok(in_progress(StatusCode::ACCEPTED, repo, id, offset))
}

pub async fn finish(
    app: &Shared,
    repo: &RepositoryName,
    id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let q = query(uri);
    let digest =
        parse_digest(q.get("digest").ok_or_else(|| {
            ApiError::bad_request(Code::DigestInvalid, "digest parameter missing")
        })?)?;
    // A final chunk may ride on the PUT; skip the append when the client says there is none.
    if content_length(headers) != Some(0) {
        append(app, repo, id, headers, body).await?;
    } else {
        app.store.upload_status(repo, id).await?;
    }
    app.store.upload_finish(repo, id, &digest).await?;
    Ok(created(repo, &digest))
}

pub async fn cancel(app: &Shared, repo: &RepositoryName, id: &str) -> Result<Response, ApiError> {
    app.store.upload_cancel(repo, id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}
