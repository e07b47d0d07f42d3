//! The storage boundary: content-addressed blobs shared by every repository, and per-repository
//! links (blobs, manifest revisions, tags, referrers) and upload sessions.
//!
//! Storage knows nothing of HTTP, authentication or the parent registry. Every backend must pass
//! the suite in [`conformance`]: [`fs::FsStore`] is the local-disk backend,
//! [`object::BucketStore`] the object-storage one (S3, Azure Blob).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;
use outpost_core::{Digest, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

pub mod docs;
pub mod fs;
pub mod hash;
pub mod object;

pub use docs::DocVersion;
pub use object::RequestCounts;

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
mod tests;

/// A stream of body bytes, as read from a client or from storage.
pub type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, io::Error>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("blob {0} is unknown")]
    BlobUnknown(Digest),
    #[error("manifest is unknown")]
    ManifestUnknown,
    #[error("repository is unknown")]
    RepositoryUnknown,
    #[error("upload session is unknown")]
    UploadUnknown,
    #[error("content does not match digest {expected}")]
    DigestMismatch { expected: Digest },
    #[error("content length {actual} does not match the declared {declared}")]
    SizeMismatch { declared: u64, actual: u64 },
    #[error("chunk starts at {requested} but the upload has {offset} bytes")]
    RangeMismatch { requested: u64, offset: u64 },
    #[error("requested range is not satisfiable for a blob of {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    #[error("manifest references unknown blob {0}")]
    ReferencedBlobUnknown(Digest),
    #[error("manifest references unknown manifest {0}")]
    ReferencedManifestUnknown(Digest),
    #[error("client body: {0}")]
    Body(io::Error),
    #[error("storage I/O: {0}")]
    Io(#[from] io::Error),
    /// The backend did not answer (connection refused or dropped, timeout, a 5xx or throttling
    /// answer after the client's own retries): the same request may succeed later.
    #[error("storage unavailable: {0}")]
    Unavailable(io::Error),
    /// The maintenance lock is held elsewhere or was lost (object storage: another `gc`).
    #[error("{0}")]
    MaintenanceLocked(String),
}

/// A byte range of a blob, both ends inclusive, already checked against the blob's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    /// Number of bytes in the range (never zero: both ends are inclusive).
    pub fn count(&self) -> u64 {
        self.last - self.first + 1
    }
}

/// A single byte range as a client asks for it, before the blob's size is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// `bytes=first-` or `bytes=first-last`
    From { first: u64, last: Option<u64> },
    /// `bytes=-n`: the last n bytes
    Suffix(u64),
}

impl RangeRequest {
    /// Parses a `Range` header. `None` for a header to ignore (several ranges, another unit,
    /// bad syntax), as RFC 9110 allows.
    pub fn parse(header: &str) -> Option<Self> {
        let spec = header.trim().strip_prefix("bytes=")?.trim();
        if spec.contains(',') {
            return None;
        }
        let (a, b) = spec.split_once('-')?;
        let num = |s: &str| -> Option<u64> {
            if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            s.parse().ok()
        };
        if a.is_empty() {
            return Some(RangeRequest::Suffix(num(b)?));
        }
        let first = num(a)?;
        let last = if b.is_empty() { None } else { Some(num(b)?) };
        if last.is_some_and(|l| l < first) {
            return None;
        }
        Some(RangeRequest::From { first, last })
    }

    /// The satisfiable part of this request for a blob of `size` bytes.
    pub fn resolve(self, size: u64) -> Option<ByteRange> {
        if size == 0 {
            return None;
        }
        match self {
            RangeRequest::From { first, last } => (first < size).then(|| ByteRange {
                first,
                last: last.map_or(size - 1, |l| l.min(size - 1)),
            }),
            RangeRequest::Suffix(0) => None,
            RangeRequest::Suffix(n) => Some(ByteRange {
                first: size.saturating_sub(n),
                last: size - 1,
            }),
        }
    }
}

/// An open blob: its full size and a stream of the requested bytes.
pub struct BlobReader {
    pub size: u64,
    pub body: ByteStream,
}

/// An OCI content descriptor, as stored for referrers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<serde_json::Map<String, serde_json::Value>>,
}

/// A manifest to link into a repository, already parsed and validated by the service layer.
pub struct NewManifest<'a> {
    /// The digest of `content`, computed by the caller (storage does not hash it again).
    pub digest: &'a Digest,
    pub media_type: &'a str,
    pub content: Bytes,
    /// Blobs (config, layers) that must already be linked into the repository.
    pub blobs: &'a [Digest],
    /// Manifests (index children) that must already be in the repository.
    pub manifests: &'a [Digest],
    /// Everything the manifest names, present or not: every blob (non-distributable ones
    /// too) and child manifest. The reference index records these (see
    /// [`Store::referenced`]).
    pub names: &'a [Digest],
    pub tag: Option<&'a Tag>,
    /// The `subject` this manifest refers to, with the descriptor listed by the referrers API.
    pub subject: Option<(&'a Digest, Descriptor)>,
}

/// A manifest read back from a repository.
#[derive(Debug, Clone)]
pub struct StoredManifest {
    pub digest: Digest,
    pub media_type: String,
    pub content: Bytes,
}

/// What an upload session looks like to a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadStatus {
    /// Bytes received and durably stored so far.
    pub offset: u64,
}

/// Identifies a blob held in the store, with its size on disk.
#[derive(Debug, Clone)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    /// Seconds since the blob was written or last re-linked.
    pub age: Duration,
}

/// Bytes of the blobs a store handle created and removed since it was opened, as the backend
/// saw them (storing a blob that is already there adds nothing), so a running total of the
/// store's size can follow writes and deletes without listing the store.
#[derive(Debug, Default)]
pub struct BlobBytes {
    added: AtomicU64,
    removed: AtomicU64,
}

impl BlobBytes {
    pub fn added(&self) -> u64 {
        self.added.load(Ordering::Relaxed)
    }

    pub fn removed(&self) -> u64 {
        self.removed.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, n: u64) {
        self.added.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn remove(&self, n: u64) {
        self.removed.fetch_add(n, Ordering::Relaxed);
    }
}

/// A repository name as one segment of the reference index's paths, in every backend: `/`
/// never occurs in a name's components and `+` never in a name, so the mapping is one to one,
/// a name of at most 255 bytes stays one file name, and a listing can stop at it.
pub(crate) fn repo_segment(repo: &RepositoryName) -> String {
    repo.as_str().replace('/', "+")
}

/// Manifests a store handle linked, as (repository, digest), from the moment someone
/// watches: retention learns of every image stored (pushed, synced, pulled through) without
/// listing the store, taking what was recorded at each check.
#[derive(Debug, Default)]
pub struct ManifestWrites {
    watched: std::sync::atomic::AtomicBool,
    written: std::sync::Mutex<Vec<(RepositoryName, Digest, std::time::SystemTime)>>,
}

impl ManifestWrites {
    /// Starts recording (nothing is kept before, so an unwatched store keeps nothing).
    pub fn watch(&self) {
        self.watched.store(true, Ordering::Relaxed);
    }

    /// What was recorded since the last call, each with when it was linked.
    pub fn take(&self) -> Vec<(RepositoryName, Digest, std::time::SystemTime)> {
        std::mem::take(&mut *self.written.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub(crate) fn record(&self, repo: &RepositoryName, digest: &Digest) {
        if self.watched.load(Ordering::Relaxed) {
            self.written
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((repo.clone(), digest.clone(), std::time::SystemTime::now()));
        }
    }
}

/// Whole-store listings a store handle made, by what they listed (`blobs`: every blob with
/// its size; `repositories`: every repository). Each costs in proportion to the store, so
/// the steady state makes none (`outpost_storage_listings_total{what}`).
#[derive(Debug, Default)]
pub struct Listings {
    blobs: AtomicU64,
    repositories: AtomicU64,
}

impl Listings {
    /// `(what, count)` for each kind, in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, u64); 2] {
        [
            ("blobs", self.blobs.load(Ordering::Relaxed)),
            ("repositories", self.repositories.load(Ordering::Relaxed)),
        ]
    }

    pub(crate) fn blobs_listed(&self) {
        self.blobs.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn repositories_listed(&self) {
        self.repositories.fetch_add(1, Ordering::Relaxed);
    }
}

/// The maintenance lock held exclusively: manifest links do not change while it is held (by
/// `gc` while it marks and sweeps).
#[async_trait]
pub trait MaintenanceHold: Send + Sync {
    /// Whether the lock is still held; a holder checks before each removal. A lock across
    /// processes on object storage is a lease that can be lost; the others cannot.
    fn check(&self) -> Result<(), StorageError> {
        Ok(())
    }

    /// Gives the lock up now (dropping the guard does too, except that on object storage
    /// the lease object is then deleted in the background, or expires).
    async fn release(self: Box<Self>) -> Result<(), StorageError> {
        Ok(())
    }
}

pub type MaintenanceGuard = Box<dyn MaintenanceHold>;

#[async_trait]
pub trait Store: Send + Sync + 'static {
    // --- blobs, global and content-addressed ---

    /// Size of a blob if it is stored.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError>;
    /// Opens a blob, optionally for one byte range (checked against its size).
    async fn blob_open(
        &self,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<(BlobReader, Option<ByteRange>), StorageError>;
    /// Streams `body` into the store; it becomes visible only once it hashes to `digest`.
    /// Returns the blob's size.
    async fn blob_put(
        &self,
        digest: &Digest,
        body: ByteStream,
        declared_len: Option<u64>,
    ) -> Result<u64, StorageError>;
    /// Every blob in the store.
    async fn blob_list(&self) -> Result<Vec<BlobInfo>, StorageError>;
    /// Removes a blob if it is still older than `min_age`; true if removed.
    async fn blob_remove(&self, digest: &Digest, min_age: Duration) -> Result<bool, StorageError>;
    /// Re-hashes a blob; false if its content no longer matches its digest.
    async fn blob_verify(&self, digest: &Digest) -> Result<bool, StorageError>;

    // --- repository links ---

    /// Makes a stored blob available in `repo`.
    async fn repo_blob_link(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), StorageError>;
    async fn repo_blob_linked(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError>;
    /// Removes a blob from `repo` (the content stays until `gc`); false if it was not linked.
    async fn repo_blob_unlink(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError>;
    /// Blobs linked into `repo`.
    async fn repo_blob_links(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError>;
    /// Every repository holding at least one manifest or blob, sorted.
    async fn repositories(&self) -> Result<Vec<RepositoryName>, StorageError>;
    /// At most `limit` repositories whose names sort after `after` (byte order of the full
    /// names, as the catalog pages them), sorted. A backend reads in proportion to `limit`,
    /// not to the number of repositories, so paging through all of them stays linear; this
    /// default (the full list) is for stores where that does not matter.
    async fn repositories_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RepositoryName>, StorageError> {
        Ok(self
            .repositories()
            .await?
            .into_iter()
            .filter(|r| after.is_none_or(|a| r.as_str() > a))
            .take(limit)
            .collect())
    }

    // --- manifests, tags, referrers ---

    /// Stores and links a manifest after checking every blob and manifest it references is in
    /// the repository; then points the tag at it and records it as a referrer of its subject.
    async fn manifest_put(
        &self,
        repo: &RepositoryName,
        m: NewManifest<'_>,
    ) -> Result<(), StorageError>;
    async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<StoredManifest, StorageError>;
    async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<StoredManifest, StorageError>;
    /// Unlinks a manifest, every tag pointing at it and its referrer entry; returns the tags
    /// it removed (read anyway to find them), sorted.
    async fn manifest_delete(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Vec<String>, StorageError>;
    /// Digests of every manifest linked into `repo`.
    async fn manifest_list(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError>;
    /// As [`Store::manifest_list`], each with the time since it was last pushed into `repo`
    /// (every push, by digest or by tag, writes its revision link again): gc's grace period
    /// for untagged manifests.
    async fn manifest_ages(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, Duration)>, StorageError>;
    async fn tag_delete(&self, repo: &RepositoryName, tag: &Tag) -> Result<(), StorageError>;
    /// Tags of `repo`, sorted; `RepositoryUnknown` if the repository does not exist.
    async fn tags(&self, repo: &RepositoryName) -> Result<Vec<String>, StorageError>;
    /// At most `limit` tags of `repo` that sort after `after`, sorted; `RepositoryUnknown`
    /// as for [`Store::tags`]. Like [`Store::repositories_page`], a backend reads in
    /// proportion to `limit`; the default filters the full list.
    async fn tags_page(
        &self,
        repo: &RepositoryName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        Ok(self
            .tags(repo)
            .await?
            .into_iter()
            .filter(|t| after.is_none_or(|a| t.as_str() > a))
            .take(limit)
            .collect())
    }
    /// Descriptors of the manifests in `repo` whose subject is `subject`.
    async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, StorageError>;

    // --- the reference index ---

    /// Whether a stored manifest names `target` (as a blob, or as an index's child): one in
    /// `repo`, or in any repository when `repo` is `None`. Answered from the index that
    /// `manifest_put` and `manifest_delete` keep, with one small listing, so it costs the same
    /// however large the store is. A manifest stored before the store kept the index is in it
    /// once [`Store::references_record`] has recorded it.
    async fn referenced(
        &self,
        target: &Digest,
        repo: Option<&RepositoryName>,
    ) -> Result<bool, StorageError>;
    /// Records in the index what manifest `digest` of `repo` names (as
    /// [`NewManifest::names`]), for a manifest stored before the index was kept; false,
    /// recording nothing, if the manifest is not in `repo`.
    async fn references_record(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        names: &[Digest],
    ) -> Result<bool, StorageError>;

    // --- upload sessions ---

    async fn upload_start(&self, repo: &RepositoryName) -> Result<String, StorageError>;
    async fn upload_status(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadStatus, StorageError>;
    /// Appends a chunk; `start`, when the client gave one, must equal the current offset.
    async fn upload_append(
        &self,
        repo: &RepositoryName,
        id: &str,
        start: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadStatus, StorageError>;
    /// Verifies the upload against `digest`, commits it as a blob linked into `repo` and ends
    /// the session. Returns the blob's size.
    async fn upload_finish(
        &self,
        repo: &RepositoryName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64, StorageError>;
    async fn upload_cancel(&self, repo: &RepositoryName, id: &str) -> Result<(), StorageError>;
    /// Streams what an open session holds from `offset` to its current end, including bytes
    /// of a chunk still being appended (a pull-through reader following a download in
    /// progress). Bytes past the durable offset may be rewritten with the same content when a
    /// download resumes, so this suits sessions filled with content-addressed data only.
    async fn upload_read(
        &self,
        repo: &RepositoryName,
        id: &str,
        offset: u64,
    ) -> Result<ByteStream, StorageError>;
    /// Removes sessions idle for longer than `idle`; returns how many.
    async fn upload_expire(&self, idle: Duration) -> Result<usize, StorageError>;

    // --- maintenance ---

    /// Blocks manifest writes (of every process using the store) until the guard is released
    /// or dropped.
    async fn maintenance_lock(&self) -> Result<MaintenanceGuard, StorageError>;

    // --- documents beside the content (see [`docs`] for keys) ---

    /// A whole document, `None` if there is none (one GET on object storage).
    async fn doc_get(&self, key: &str) -> Result<Option<Bytes>, StorageError>;
    /// Replaces a document whole: a reader sees the old or the new content, never a mix, and
    /// the new one is durable when this returns (one PUT on object storage).
    async fn doc_put(&self, key: &str, data: Bytes) -> Result<(), StorageError>;
    /// Removes a document; removing one that is not there is no error (one DELETE).
    async fn doc_delete(&self, key: &str) -> Result<(), StorageError>;
    /// Keys of the documents directly in folder `dir` ("" for the top), sorted; not those
    /// in its sub-folders (one LIST on object storage, per 1000 keys).
    async fn doc_list(&self, dir: &str) -> Result<Vec<String>, StorageError>;
    /// A document with its version, for a conditional write (one GET on object storage).
    async fn doc_get_versioned(
        &self,
        key: &str,
    ) -> Result<Option<(Bytes, DocVersion)>, StorageError>;
    /// Replaces a document only if it is still at `expected` (`None`: only if there is none),
    /// so of two writers racing from the same read one wins. The new version, or `None` when
    /// the document changed since (one PUT on object storage; a store without conditional
    /// writes falls back to reading first, which narrows the race without closing it).
    async fn doc_put_if(
        &self,
        key: &str,
        data: Bytes,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, StorageError>;

    /// A URL the client may fetch the blob from directly for a while (a presigned or SAS
    /// URL), when the store is set to redirect blob downloads; `None` otherwise.
    async fn blob_redirect(&self, _digest: &Digest) -> Result<Option<String>, StorageError> {
        Ok(None)
    }

    /// The bytes of blobs this handle created and removed; `None` if the backend does not
    /// count them.
    fn blob_bytes(&self) -> Option<std::sync::Arc<BlobBytes>> {
        None
    }

    /// The manifests this handle linked (its clones share the record).
    fn manifest_writes(&self) -> std::sync::Arc<ManifestWrites>;

    /// The whole-store listings this handle made; `None` if the backend does not count them.
    fn listings(&self) -> Option<std::sync::Arc<Listings>> {
        None
    }

    /// Requests sent to the backend by operation, where each is billed (object stores).
    fn request_counts(&self) -> Option<std::sync::Arc<RequestCounts>> {
        None
    }

    /// Whether the backend answers (readiness). The default asks for the empty blob's size.
    async fn check_ready(&self) -> Result<(), StorageError> {
        let empty = hash::digest_of(outpost_core::Algorithm::Sha256, b"");
        self.blob_size(&empty).await.map(|_| ())
    }
}
