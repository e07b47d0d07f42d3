//! `/v2/<name>/manifests/<reference>`: GET, HEAD, PUT, DELETE.

use axum::body::Body;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use outpost_core::{Reference, RepositoryName};

use super::{ApiError, Code, Shared, body_stream, content_length, etag_matches, set_header};
use crate::content::{self, manifest};
use crate::service::pull_through::PullError;
use crate::storage::{StorageError, StoredManifest};

/// How a pull-through failure reaches the client: a 404 with the reason in the message. A
/// 404 rather than a 5xx because clients print the message of 4xx errors only, and because
/// containerd falls back from a mirror answering 404 to the upstream registry itself.
pub fn pull_error(e: PullError, unknown: Code) -> ApiError {
    match e {
        PullError::OutOfScope => ApiError::not_found(
            unknown,
            "not stored here; the repository is outside this registry's sync scope",
        ),
        PullError::NotFound(_)
        | PullError::Refused(_)
        | PullError::Invalid(_)
        | PullError::Offline(_)
        | PullError::PlatformNotSynced { .. } => ApiError::not_found(unknown, e.to_string()),
        PullError::Storage(_) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            Code::Unknown,
            e.to_string(),
        ),
        // As for a local read with the store down: 503 and Retry-After, the cause in the log.
        PullError::StorageUnavailable(why) => {
            crate::storage::StorageError::Unavailable(std::io::Error::other(why)).into()
        }
    }
}

/// The reference of a PUT or DELETE: an invalid one is the client's error (400).
fn parse_reference(r: &str) -> Result<Reference, ApiError> {
    r.parse().map_err(|e: outpost_core::NameError| match e {
        outpost_core::NameError::Digest(d) => {
            ApiError::bad_request(Code::DigestInvalid, format!("invalid digest: {d}"))
        }
        other => ApiError::bad_request(Code::TagInvalid, other.to_string()),
    })
}

/// The reference of a GET or HEAD: the spec allows only 200 and 404 there (end-3), and no
/// manifest can be stored under a reference that does not parse, so it is unknown.
fn lookup_reference(r: &str) -> Result<Reference, ApiError> {
    r.parse().map_err(|e: outpost_core::NameError| {
        ApiError::not_found(Code::ManifestUnknown, format!("manifest unknown: {e}"))
    })
}

/// Media types the client accepts, without parameters; empty when it names none.
fn accepted(headers: &HeaderMap) -> Vec<String> {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| {
            t.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .filter(|t| !t.is_empty())
        .collect()
}

fn acceptable(accept: &[String], media_type: &str) -> bool {
    accept.is_empty()
        || accept
            .iter()
            .any(|a| a == media_type || a == "*/*" || a == "application/*")
}

pub async fn get(
    app: &Shared,
    repo: &RepositoryName,
    reference: &str,
    headers: &HeaderMap,
    head: bool,
) -> Result<Response, ApiError> {
    let reference = lookup_reference(reference)?;
    let stored = match &reference {
        Reference::Tag(t) => app.store.manifest_by_tag(repo, t).await,
        Reference::Digest(d) => app.store.manifest_by_digest(repo, d).await,
    };
    let pt = app.pull_through.as_ref().filter(|p| p.in_scope(repo));
    let m: StoredManifest = match (stored, pt) {
        (Ok(m), pt) => {
            if let Some(p) = pt {
                p.hit();
            }
            if let Some(r) = &app.retention {
                r.touch(repo, &m.digest);
            }
            m
        }
        (Err(StorageError::ManifestUnknown | StorageError::RepositoryUnknown), Some(p)) => {
            let pulled = p
                .manifest(repo, &reference)
                .await
                .map_err(|e| pull_error(e, Code::ManifestUnknown))?;
            if let Some(r) = &app.retention {
                r.touch(repo, &pulled.digest);
            }
            StoredManifest {
                digest: pulled.digest,
                media_type: pulled.media_type,
                content: pulled.content,
            }
        }
        (Err(StorageError::ManifestUnknown | StorageError::RepositoryUnknown), None)
            if app.pull_through.is_some() =>
        {
            return Err(pull_error(PullError::OutOfScope, Code::ManifestUnknown));
        }
        (Err(e), _) => return Err(e.into()),
    };
    let accept = accepted(headers);
    if !acceptable(&accept, &m.media_type) {
        return Err(ApiError::not_found(
            Code::ManifestUnknown,
            format!(
                "manifest is {}, which the request's Accept header does not list",
                m.media_type
            ),
        ));
    }
    let mut resp = if etag_matches(headers, &m.digest) {
        StatusCode::NOT_MODIFIED.into_response()
    } else if head {
        let mut r = Response::new(Body::empty());
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, m.content.len().into());
        r
    } else {
        Response::new(Body::from(m.content.clone()))
    };
    let h = resp.headers_mut();
    set_header(h, "content-type", m.media_type.clone());
    set_header(h, "docker-content-digest", m.digest.to_string());
    set_header(h, "etag", format!("\"{}\"", m.digest));
    Ok(resp)
}

/// Beyond this much, an oversized body is not drained before the 413: the connection closes.
const MAX_DRAIN_BYTES: u64 = 32 * 1024 * 1024;

/// Reads a manifest body, refusing more than the spec's 4 MiB.
async fn read_limited(headers: &HeaderMap, body: Body) -> Result<bytes::Bytes, ApiError> {
    let too_large = ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        Code::SizeInvalid,
        format!(
            "manifest is larger than {} bytes",
            manifest::MAX_MANIFEST_BYTES
        ),
    );
    let declared = content_length(headers);
    if declared.is_some_and(|l| l > MAX_DRAIN_BYTES) {
        return Err(too_large);
    }
    let mut stream = body_stream(body);
    let mut buf = bytes::BytesMut::new();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::bad_request(
                Code::ManifestInvalid,
                format!("manifest body could not be read to its end: {e}"),
            )
        })?;
        total += chunk.len() as u64;
        // Past the limit the rest is read and dropped (up to a cap), so the client, still
        // sending, gets the 413 rather than a reset connection.
        if total > MAX_DRAIN_BYTES {
            return Err(too_large);
        }
        if total <= manifest::MAX_MANIFEST_BYTES as u64 {
            buf.extend_from_slice(&chunk);
        }
    }
    if total > manifest::MAX_MANIFEST_BYTES as u64 {
        return Err(too_large);
    }
    if declared.is_some_and(|d| d != total) {
        return Err(ApiError::bad_request(
            Code::SizeInvalid,
            "manifest body length does not match Content-Length",
        ));
    }
    Ok(buf.freeze())
}

pub async fn put(
    app: &Shared,
    repo: &RepositoryName,
    reference: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let reference = parse_reference(reference)?;
    let content = read_limited(headers, body).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let pushed =
        content::push_manifest(app.store.as_ref(), repo, &reference, content_type, content).await?;
    // Readwrite with a parent: stored now, uploaded to the parent by the next sync.
    if let Some(outbox) = app.syncer.as_ref().and_then(|s| s.outbox()) {
        let tag = match &reference {
            Reference::Tag(t) => Some(t),
            Reference::Digest(_) => None,
        };
        if let Err(e) = outbox.push(repo, tag, &pushed.digest).await {
            tracing::error!(repository = %repo, digest = %pushed.digest, error = %e, "cannot queue push for the parent");
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Code::Unknown,
                "manifest stored but not queued for the parent; push it again",
            ));
        }
    }
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    set_header(
        h,
        "location",
        format!("/v2/{repo}/manifests/{}", pushed.digest),
    );
    set_header(h, "docker-content-digest", pushed.digest.to_string());
    if let Some(subject) = pushed.subject {
        set_header(h, "oci-subject", subject.to_string());
    }
    Ok(resp)
}

pub async fn delete(
    app: &Shared,
    repo: &RepositoryName,
    reference: &str,
) -> Result<Response, ApiError> {
    match parse_reference(reference)? {
        Reference::Digest(d) => drop(app.store.manifest_delete(repo, &d).await?),
        Reference::Tag(t) => app.store.tag_delete(repo, &t).await?,
    }
    Ok(StatusCode::ACCEPTED.into_response())
}
