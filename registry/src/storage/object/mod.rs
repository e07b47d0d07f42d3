//! The object-storage backend: S3 (and S3-compatible servers) and Azure Blob Storage through
//! Apache Arrow's `object_store` crate.
//!
//! Layout under the prefix, the same names as on disk:
//! ```text
//! blobs/<alg>/<hex[..2]>/<hex>                          immutable content, shared by all repositories
//! repositories/<name>/_layers/<alg>/<hex>               empty: the blob is available in <name>
//! repositories/<name>/_manifests/revisions/<alg>/<hex>  JSON: media type and subject of a manifest
//! repositories/<name>/_manifests/tags/<tag>             the digest the tag points at
//! repositories/<name>/_referrers/<alg>/<subject>/<alg>-<hex>  JSON descriptor of a referrer
//! repositories/<name>/_manifests/references/<alg>/<hex> what the manifest names (see `references`)
//! references/<alg>/<hex[..2]>/<hex>/<name, / as +>/<alg>-<hex>  empty: that manifest names it
//! uploads/<id>/state.json, uploads/<id>/parts/<start>   upload sessions
//! catalog/<hex of a repository name>, catalog.json      the repositories' index (see `catalog`)
//! locks/maintenance.json                                the gc lease (see `lock`)
//! sync/                                                 documents: sync state, the readwrite
//!                                                       outbox, staging requests, pull times
//! ```
//! An object store has no rename and no partial object: a PUT or a completed multipart upload
//! is visible whole or not at all. So a blob object is written only once its content hashed
//! to its digest (the multipart upload is aborted otherwise), a manifest only after every blob
//! it needs is linked, and a tag last. Upload sessions are objects too, so another process can
//! continue one.

use std::collections::HashMap;
use std::io;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};
use outpost_core::{Digest, RepositoryName, Tag};

use super::{
    BlobBytes, BlobInfo, BlobReader, ByteRange, ByteStream, Descriptor, DocVersion, Listings,
    MaintenanceGuard, ManifestWrites, NewManifest, RangeRequest, StorageError, Store,
    StoredManifest, UploadStatus,
};

mod blobs;
mod cache;
mod catalog;
mod docs;
mod instrument;
mod lock;
mod manifests;
mod open;
mod references;
mod uploads;

pub use instrument::RequestCounts;
pub use lock::LockTiming;
pub use open::{OpenError, is_object_url, open};

#[cfg(test)]
mod tests;

/// A [`Store`] in a bucket or container, under an optional prefix. Cheap to clone.
#[derive(Clone)]
pub struct BucketStore {
    store: Arc<dyn ObjectStore>,
    /// Empty, or the prefix without slashes at either end.
    prefix: String,
    /// One lock per upload session this process works on (other processes are not locked
    /// out: the client drives one session one request at a time).
    uploads: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<uploads::Progress>>>>>,
    /// Shared by manifest writes, exclusive for gc (within this process; `lock` extends it
    /// to other processes).
    maintenance: Arc<tokio::sync::RwLock<()>>,
    /// The maintenance lock across processes: its timings, this process's cached reading.
    lock: Arc<lock::Shared>,
    /// Manifest contents by digest (immutable, so never stale).
    manifests: Arc<cache::ManifestCache>,
    /// What the last requests said about the store (readiness).
    health: Arc<instrument::Health>,
    /// Requests sent, by operation.
    requests: Arc<RequestCounts>,
    /// The repositories' index entries written, for the paged catalog (see `catalog`).
    catalog: Arc<catalog::Catalog>,
    /// Bytes of blobs this handle uploaded and deleted (its clones share them).
    bytes: Arc<BlobBytes>,
    /// Manifests linked through this handle, for retention (its clones share them).
    writes: Arc<ManifestWrites>,
    /// Whole-store listings made through this handle.
    listings: Arc<Listings>,
    /// Signs URLs to objects (S3 presigned, Azure SAS), without a request.
    signer: Option<Arc<dyn object_store::signer::Signer>>,
    /// With `signer`: blob GETs are redirected with URLs valid this long.
    redirect: Option<Duration>,
}

/// How long the outcome of the last request stands for the store's readiness before a probe
/// asks again: readiness checks cost at most one request per interval.
const READY_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// An error of the object store: `Unavailable` when the store did not answer, `Io` otherwise.
/// The text keeps no credentials: object_store's messages name the path and the HTTP status,
/// never keys or signatures, and the query of any URL (where a SAS token travels) is cut.
fn os_err(e: object_store::Error) -> StorageError {
    let text = open::redact_queries(&e.to_string());
    if instrument::is_unavailable(&e) {
        StorageError::Unavailable(io::Error::other(text))
    } else {
        StorageError::Io(io::Error::other(text))
    }
}

/// An I/O error from object_store's buffered writer (it carries the object_store error).
fn os_io_err(e: io::Error) -> StorageError {
    let text = open::redact_queries(&e.to_string());
    if instrument::is_unavailable(&e) {
        StorageError::Unavailable(io::Error::new(e.kind(), text))
    } else {
        StorageError::Io(io::Error::new(e.kind(), text))
    }
}

fn age_of(meta: &ObjectMeta) -> Duration {
    let now_ms = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    let then_ms = u128::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0);
    Duration::from_millis(u64::try_from(now_ms.saturating_sub(then_ms)).unwrap_or(u64::MAX))
}

impl BucketStore {
    /// A store over `store` (a bucket or container), under `prefix` ("" for its root).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        let health = Arc::new(instrument::Health::default());
        let store = instrument::Instrumented::new(store, health.clone());
        let requests = store.counts();
        BucketStore {
            store: Arc::new(store),
            requests,
            signer: None,
            redirect: None,
            prefix: prefix.trim_matches('/').to_owned(),
            uploads: Arc::default(),
            maintenance: Arc::default(),
            lock: Arc::new(lock::Shared::new(LockTiming::default())),
            manifests: Arc::default(),
            catalog: Arc::default(),
            bytes: Arc::default(),
            writes: Arc::default(),
            listings: Arc::default(),
            health,
        }
    }

    /// Signs blob URLs with `signer` (the client `store` was built from).
    pub(crate) fn with_signer(mut self, signer: Arc<dyn object_store::signer::Signer>) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Uses `timing` for the maintenance lock (every process on the store must agree).
    pub fn with_lock_timing(mut self, timing: LockTiming) -> Self {
        self.lock = Arc::new(lock::Shared::new(timing));
        self
    }

    /// Redirects blob GETs to the store with URLs valid for `expiry` (None: serve them).
    pub fn with_redirect(mut self, expiry: Option<Duration>) -> Self {
        self.redirect = expiry;
        self
    }

    /// The key of `rel` (a path relative to the prefix, `/`-separated).
    fn key(&self, rel: &str) -> Key {
        if self.prefix.is_empty() {
            Key::from(rel)
        } else {
            Key::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// `key` relative to the prefix.
    fn rel<'a>(&self, key: &'a Key) -> Option<&'a str> {
        let k = key.as_ref();
        if self.prefix.is_empty() {
            Some(k)
        } else {
            k.strip_prefix(self.prefix.as_str())?.strip_prefix('/')
        }
    }

    fn blob_key(&self, d: &Digest) -> Key {
        self.key(&format!(
            "blobs/{}/{}/{}",
            d.algorithm().as_str(),
            &d.hex()[..2],
            d.hex()
        ))
    }

    fn repo_rel(repo: &RepositoryName) -> String {
        format!("repositories/{}", repo.as_str())
    }

    fn layer_key(&self, repo: &RepositoryName, d: &Digest) -> Key {
        self.key(&format!(
            "{}/_layers/{}/{}",
            Self::repo_rel(repo),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    fn revision_key(&self, repo: &RepositoryName, d: &Digest) -> Key {
        self.key(&format!(
            "{}/_manifests/revisions/{}/{}",
            Self::repo_rel(repo),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    fn tag_key(&self, repo: &RepositoryName, tag: &Tag) -> Key {
        self.key(&format!(
            "{}/_manifests/tags/{}",
            Self::repo_rel(repo),
            tag.as_str()
        ))
    }

    fn referrer_key(&self, repo: &RepositoryName, subject: &Digest, d: &Digest) -> Key {
        self.key(&format!(
            "{}/_referrers/{}/{}/{}-{}",
            Self::repo_rel(repo),
            subject.algorithm().as_str(),
            subject.hex(),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    /// Metadata of an object, `None` if there is none (one HEAD request).
    async fn head(&self, key: &Key) -> Result<Option<ObjectMeta>, StorageError> {
        match self.store.head(key).await {
            Ok(m) => Ok(Some(m)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(os_err(e)),
        }
    }

    /// A whole small object, `None` if there is none.
    async fn get_small(&self, key: &Key, max: u64) -> Result<Option<Bytes>, StorageError> {
        let r = match self.store.get(key).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(os_err(e)),
        };
        if r.meta.size > max {
            return Err(StorageError::Io(io::Error::other(format!(
                "{key} is larger than {max} bytes"
            ))));
        }
        r.bytes().await.map(Some).map_err(os_err)
    }

    async fn put(&self, key: &Key, data: Bytes) -> Result<(), StorageError> {
        self.store
            .put(key, PutPayload::from_bytes(data))
            .await
            .map(|_| ())
            .map_err(os_err)
    }

    /// Deletes an object; false if there was none (a HEAD first: S3 answers a delete of
    /// nothing as a success).
    async fn delete_existing(&self, key: &Key) -> Result<bool, StorageError> {
        if self.head(key).await?.is_none() {
            return Ok(false);
        }
        self.delete(key).await?;
        Ok(true)
    }

    async fn delete(&self, key: &Key) -> Result<(), StorageError> {
        match self.store.delete(key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err(e)),
        }
    }

    /// Every object under `rel` (a directory: its keys start with `rel/`).
    async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, StorageError> {
        let prefix = self.key(rel);
        let mut stream = self.store.list(Some(&prefix));
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            out.push(m.map_err(os_err)?);
        }
        Ok(out)
    }
}

#[async_trait]
impl Store for BucketStore {
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StorageError> {
        blobs::blob_size(self, digest).await
    }

    async fn blob_open(
        &self,
        digest: &Digest,
        range: Option<RangeRequest>,
    ) -> Result<(BlobReader, Option<ByteRange>), StorageError> {
        blobs::blob_open(self, digest, range).await
    }

    async fn blob_put(
        &self,
        digest: &Digest,
        body: ByteStream,
        declared_len: Option<u64>,
    ) -> Result<u64, StorageError> {
        blobs::blob_put(self, digest, body, declared_len).await
    }

    async fn blob_list(&self) -> Result<Vec<BlobInfo>, StorageError> {
        self.listings.blobs_listed();
        blobs::blob_list(self).await
    }

    async fn blob_remove(&self, digest: &Digest, min_age: Duration) -> Result<bool, StorageError> {
        blobs::blob_remove(self, digest, min_age).await
    }

    async fn blob_verify(&self, digest: &Digest) -> Result<bool, StorageError> {
        blobs::blob_verify(self, digest).await
    }

    async fn repo_blob_link(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        manifests::repo_blob_link(self, repo, digest).await
    }

    async fn repo_blob_linked(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        manifests::repo_blob_linked(self, repo, digest).await
    }

    async fn repo_blob_unlink(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        self.delete_existing(&self.layer_key(repo, digest)).await
    }

    async fn repo_blob_links(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError> {
        manifests::digests_under(self, &format!("{}/_layers", Self::repo_rel(repo))).await
    }

    async fn repositories(&self) -> Result<Vec<RepositoryName>, StorageError> {
        self.listings.repositories_listed();
        manifests::repositories(self).await
    }

    async fn repositories_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RepositoryName>, StorageError> {
        self.catalog_page(after, limit).await
    }

    async fn manifest_put(
        &self,
        repo: &RepositoryName,
        m: NewManifest<'_>,
    ) -> Result<(), StorageError> {
        manifests::manifest_put(self, repo, m).await
    }

    async fn manifest_by_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<StoredManifest, StorageError> {
        manifests::manifest_by_tag(self, repo, tag).await
    }

    async fn manifest_by_digest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<StoredManifest, StorageError> {
        manifests::read_manifest(self, repo, digest).await
    }

    async fn manifest_delete(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Vec<String>, StorageError> {
        manifests::manifest_delete(self, repo, digest).await
    }

    async fn manifest_list(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError> {
        manifests::digests_under(
            self,
            &format!("{}/_manifests/revisions", Self::repo_rel(repo)),
        )
        .await
    }

    async fn manifest_ages(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, Duration)>, StorageError> {
        manifests::digests_aged_under(
            self,
            &format!("{}/_manifests/revisions", Self::repo_rel(repo)),
        )
        .await
    }

    async fn tag_delete(&self, repo: &RepositoryName, tag: &Tag) -> Result<(), StorageError> {
        if self.delete_existing(&self.tag_key(repo, tag)).await? {
            Ok(())
        } else {
            Err(StorageError::ManifestUnknown)
        }
    }

    async fn tags(&self, repo: &RepositoryName) -> Result<Vec<String>, StorageError> {
        manifests::tags(self, repo).await
    }

    async fn tags_page(
        &self,
        repo: &RepositoryName,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, StorageError> {
        manifests::tags_page(self, repo, after, limit).await
    }

    async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Descriptor>, StorageError> {
        manifests::referrers(self, repo, subject).await
    }

    async fn referenced(
        &self,
        target: &Digest,
        repo: Option<&RepositoryName>,
    ) -> Result<bool, StorageError> {
        references::referenced(self, target, repo).await
    }

    async fn references_record(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        names: &[Digest],
    ) -> Result<bool, StorageError> {
        references::references_record(self, repo, digest, names).await
    }

    async fn upload_start(&self, repo: &RepositoryName) -> Result<String, StorageError> {
        uploads::upload_start(self, repo).await
    }

    async fn upload_status(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadStatus, StorageError> {
        let st = uploads::load(self, repo, id).await?;
        Ok(UploadStatus { offset: st.offset })
    }

    async fn upload_append(
        &self,
        repo: &RepositoryName,
        id: &str,
        start: Option<u64>,
        body: ByteStream,
    ) -> Result<UploadStatus, StorageError> {
        uploads::upload_append(self, repo, id, start, body).await
    }

    async fn upload_finish(
        &self,
        repo: &RepositoryName,
        id: &str,
        digest: &Digest,
    ) -> Result<u64, StorageError> {
        uploads::upload_finish(self, repo, id, digest).await
    }

    async fn upload_cancel(&self, repo: &RepositoryName, id: &str) -> Result<(), StorageError> {
        uploads::upload_cancel(self, repo, id).await
    }

    async fn upload_read(
        &self,
        repo: &RepositoryName,
        id: &str,
        offset: u64,
    ) -> Result<ByteStream, StorageError> {
        uploads::upload_read(self, repo, id, offset).await
    }

    async fn upload_expire(&self, idle: Duration) -> Result<usize, StorageError> {
        uploads::upload_expire(self, idle).await
    }

    async fn maintenance_lock(&self) -> Result<MaintenanceGuard, StorageError> {
        self.lock_exclusive().await
    }

    async fn doc_get(&self, key: &str) -> Result<Option<Bytes>, StorageError> {
        docs::doc_get(self, key).await
    }

    async fn doc_put(&self, key: &str, data: Bytes) -> Result<(), StorageError> {
        docs::doc_put(self, key, data).await
    }

    async fn doc_delete(&self, key: &str) -> Result<(), StorageError> {
        docs::doc_delete(self, key).await
    }

    async fn doc_list(&self, dir: &str) -> Result<Vec<String>, StorageError> {
        docs::doc_list(self, dir).await
    }

    async fn doc_get_versioned(
        &self,
        key: &str,
    ) -> Result<Option<(Bytes, DocVersion)>, StorageError> {
        docs::doc_get_versioned(self, key).await
    }

    async fn doc_put_if(
        &self,
        key: &str,
        data: Bytes,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, StorageError> {
        docs::doc_put_if(self, key, data, expected).await
    }

    async fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>, StorageError> {
        let (Some(signer), Some(expiry)) = (&self.signer, self.redirect) else {
            return Ok(None);
        };
        let url = signer
            .signed_url(http::Method::GET, &self.blob_key(digest), expiry)
            .await
            .map_err(os_err)?;
        Ok(Some(url.to_string()))
    }

    fn request_counts(&self) -> Option<Arc<RequestCounts>> {
        Some(self.requests.clone())
    }

    fn manifest_writes(&self) -> Arc<ManifestWrites> {
        self.writes.clone()
    }

    fn blob_bytes(&self) -> Option<Arc<BlobBytes>> {
        Some(self.bytes.clone())
    }

    fn listings(&self) -> Option<Arc<Listings>> {
        Some(self.listings.clone())
    }

    /// Ready while requests are answered. Recent traffic decides without a request; otherwise
    /// one HEAD (of a key that need not exist), shared by concurrent checks.
    async fn check_ready(&self) -> Result<(), StorageError> {
        let verdict = |answered: bool| {
            if answered {
                Ok(())
            } else {
                Err(StorageError::Unavailable(io::Error::other(
                    "the object store did not answer the last request",
                )))
            }
        };
        if let Some(answered) = self.health.recent(READY_PROBE_INTERVAL) {
            return verdict(answered);
        }
        let _probing = self.health.probing.lock().await;
        if let Some(answered) = self.health.recent(READY_PROBE_INTERVAL) {
            return verdict(answered);
        }
        self.head(&self.key("blobs")).await.map(|_| ())
    }
}
