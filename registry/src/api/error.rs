//! The OCI error body (`{"errors":[{"code","message","detail"}]}`) and the mapping from
//! library errors to the spec's codes and statuses.

use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::content::PushError;
use crate::storage::StorageError;

/// Error codes of the OCI distribution spec, plus the CNCF registry's pagination code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    TagInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    PaginationNumberInvalid,
    /// The CNCF registry's code for a 503: the service cannot answer now.
    Unavailable,
    Unknown,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::TagInvalid => "TAG_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
            Code::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            Code::Unavailable => "UNAVAILABLE",
            Code::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: Code,
    pub message: String,
    pub detail: Option<Value>,
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: Code, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
            headers: Vec::new(),
        }
    }

    pub fn detail(mut self, detail: Value) -> Self {
        self.detail = Some(detail);
        self
    }

    pub fn header(mut self, name: HeaderName, value: impl AsRef<str>) -> Self {
        if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
            self.headers.push((name, v));
        }
        self
    }

    pub fn bad_request(code: Code, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn not_found(code: Code, message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut err = json!({ "code": self.code.as_str(), "message": self.message });
        if let Some(d) = self.detail {
            err["detail"] = d;
        }
        let body = json!({ "errors": [err] }).to_string();
        let mut resp = (
            self.status,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response();
        for (k, v) in self.headers {
            resp.headers_mut().insert(k, v);
        }
        resp
    }
}

/// `Retry-After` of a 503 while storage does not answer: about as long as readiness keeps a
/// verdict before asking the store again.
const STORAGE_RETRY_AFTER_SECS: u64 = 5;

impl From<StorageError> for ApiError {
    fn from(e: StorageError) -> Self {
        use StorageError as S;
        match e {
            S::BlobUnknown(d) => ApiError::not_found(Code::BlobUnknown, "blob unknown to registry")
                .detail(json!({ "digest": d.to_string() })),
            S::ManifestUnknown => {
                ApiError::not_found(Code::ManifestUnknown, "manifest unknown to registry")
            }
            S::RepositoryUnknown => {
                ApiError::not_found(Code::NameUnknown, "repository name not known to registry")
            }
            S::UploadUnknown => {
                ApiError::not_found(Code::BlobUploadUnknown, "blob upload unknown to registry")
            }
            S::DigestMismatch { expected } => ApiError::bad_request(
                Code::DigestInvalid,
                "provided digest did not match uploaded content",
            )
            .detail(json!({ "digest": expected.to_string() })),
            S::SizeMismatch { declared, actual } => ApiError::bad_request(
                Code::SizeInvalid,
                format!("received {actual} bytes, but {declared} were declared"),
            ),
            S::RangeMismatch { requested, offset } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::BlobUploadInvalid,
                format!("chunk starts at {requested}, but the upload has {offset} bytes"),
            )
            .header(header::RANGE, upload_range(offset)),
            S::RangeNotSatisfiable { size } => ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                Code::SizeInvalid,
                format!("requested range not satisfiable for a blob of {size} bytes"),
            )
            .header(header::CONTENT_RANGE, format!("bytes */{size}")),
            S::ReferencedBlobUnknown(d) | S::ReferencedManifestUnknown(d) => ApiError::bad_request(
                Code::ManifestBlobUnknown,
                "manifest references an unknown blob",
            )
            .detail(json!({ "digest": d.to_string() })),
            S::Body(err) => ApiError::bad_request(
                Code::BlobUploadInvalid,
                format!("request body could not be read to its end: {err}"),
            ),
            S::Io(err) => {
                // Paths and OS details stay in the log, not in the response.
                tracing::error!(error = %err, "storage failure");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Code::Unknown,
                    "internal storage error",
                )
            }
            S::MaintenanceLocked(why) => {
                tracing::warn!(reason = %why, "maintenance lock");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "storage is under maintenance, retry later",
                )
                .header(header::RETRY_AFTER, STORAGE_RETRY_AFTER_SECS.to_string())
            }
            S::Unavailable(err) => {
                tracing::warn!(error = %err, "storage unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Code::Unavailable,
                    "storage is unavailable, retry later",
                )
                .header(header::RETRY_AFTER, STORAGE_RETRY_AFTER_SECS.to_string())
            }
        }
    }
}

impl From<PushError> for ApiError {
    fn from(e: PushError) -> Self {
        match e {
            PushError::Manifest(m) => ApiError::bad_request(Code::ManifestInvalid, m.to_string()),
            PushError::DigestMismatch(d) => ApiError::bad_request(
                Code::DigestInvalid,
                "manifest content does not match the digest in the URL",
            )
            .detail(json!({ "digest": d.to_string() })),
            PushError::Storage(s) => s.into(),
        }
    }
}

/// The `Range` header value of an upload holding `offset` bytes (`0-0` when empty, as the
/// CNCF registry and its clients expect).
pub fn upload_range(offset: u64) -> String {
    format!("0-{}", offset.saturating_sub(1))
}
