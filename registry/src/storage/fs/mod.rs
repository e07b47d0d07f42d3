//! The local-disk backend.
//!
//! Layout under the root:
//! ```text
//! blobs/<alg>/<hex[..2]>/<hex>                          immutable content, shared by all repositories
//! repositories/<name>/_layers/<alg>/<hex>               empty: the blob is available in <name>
//! repositories/<name>/_manifests/revisions/<alg>/<hex>  JSON: media type and subject of a manifest
//! repositories/<name>/_manifests/tags/<tag>             the digest the tag points at
//! repositories/<name>/_referrers/<alg>/<subject>/<alg>-<hex>  JSON descriptor of a referrer
//! repositories/<name>/_manifests/references/<alg>/<hex> what the manifest names (see `references`)
//! references/<alg>/<hex[..2]>/<hex>/<name, / as +>/<alg>-<hex>  empty: that manifest names it
//! uploads/<id>/data, uploads/<id>/state.json            upload sessions
//! tmp/                                                  files being written; never read
//! maintenance.lock                                      shared by manifest writes, exclusive for gc
//! sync/                                                 documents: sync state, the readwrite
//!                                                       outbox, staging requests, pull times
//! ```
//! Every file that becomes visible is first written whole under `tmp/` (or `uploads/`),
//! fsynced, then renamed into place and its directory fsynced, so a crash at any instant leaves
//! either the old state or the new one. Repository names and digests are validated before they
//! reach here, so they are safe path components.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use outpost_core::{Digest, RepositoryName, Tag};

use super::{
    BlobBytes, BlobInfo, BlobReader, ByteRange, ByteStream, Descriptor, DocVersion, Listings,
    MaintenanceGuard, ManifestWrites, NewManifest, RangeRequest, StorageError, Store,
    StoredManifest, UploadStatus,
};

mod blobs;
mod docs;
mod files;
mod listing;
mod locks;
mod manifests;
mod references;
mod referrers;
mod repos;
mod uploads;

pub use files::write_file_atomic;
use files::*;
use uploads::UploadProgress;

/// Cheap to clone: clones share the upload table.
#[derive(Clone)]
pub struct FsStore {
    root: Arc<Path>,
    /// One lock per upload session, so concurrent PATCHes to one session serialise.
    uploads: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<UploadProgress>>>>>,
    /// Sorted listings of large directories of the repository tree, for paged listings.
    dirs: Arc<listing::DirCache>,
    /// Bytes of blobs created and removed through this handle (its clones share them).
    bytes: Arc<BlobBytes>,
    /// Manifests linked through this handle, for retention (its clones share them).
    writes: Arc<ManifestWrites>,
    /// Whole-store listings made through this handle.
    listings: Arc<Listings>,
    /// Held while a blob is moved into place: with one server per store on disk, the check
    /// for a blob already there and the rename are one step, so a blob stored twice at once
    /// is counted once.
    commits: Arc<Mutex<()>>,
}

impl FsStore {
    /// Opens (creating if needed) a store rooted at `root`.
    pub fn open(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        for d in ["blobs", "repositories", "uploads", "tmp"] {
            fs::create_dir_all(root.join(d))?;
        }
        Ok(FsStore {
            root: root.into(),
            uploads: Arc::default(),
            dirs: Arc::default(),
            bytes: Arc::default(),
            writes: Arc::default(),
            listings: Arc::default(),
            commits: Arc::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn handle(&self) -> FsStore {
        self.clone()
    }

    /// Removes leftovers of writes interrupted by a crash. Only safe while no other process
    /// writes to this store (the server holds `serve.lock` for that).
    pub fn clean_tmp(&self) -> io::Result<usize> {
        let dir = self.root.join("tmp");
        let mut n = 0;
        for name in list_names(&dir)? {
            let p = dir.join(name);
            if p.is_dir() {
                fs::remove_dir_all(&p)?;
            } else {
                fs::remove_file(&p)?;
            }
            n += 1;
        }
        Ok(n)
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    fn repo_dir(&self, repo: &RepositoryName) -> PathBuf {
        let mut p = self.root.join("repositories");
        for seg in repo.segments() {
            p.push(seg);
        }
        p
    }

    fn layer_link(&self, repo: &RepositoryName, d: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_layers")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    fn revision_link(&self, repo: &RepositoryName, d: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_manifests/revisions")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    fn tags_dir(&self, repo: &RepositoryName) -> PathBuf {
        self.repo_dir(repo).join("_manifests/tags")
    }

    fn referrers_dir(&self, repo: &RepositoryName, subject: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_referrers")
            .join(subject.algorithm().as_str())
            .join(subject.hex())
    }

    fn upload_dir(&self, id: &str) -> PathBuf {
        self.root.join("uploads").join(id)
    }

    fn tmp_path(&self) -> PathBuf {
        self.root.join("tmp").join(random_id())
    }

    /// Writes `data` to `dest` so that a reader sees either nothing or all of it.
    fn write_atomic(&self, dest: &Path, data: &[u8]) -> io::Result<()> {
        let tmp = self.tmp_path();
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            self.commit_file(&tmp, dest)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Renames a complete, fsynced file into place and makes the rename durable.
    fn commit_file(&self, from: &Path, dest: &Path) -> io::Result<()> {
        let parent = dest
            .parent()
            .ok_or_else(|| io::Error::other("destination has no parent"))?;
        fs::create_dir_all(parent)?;
        fs::rename(from, dest)?;
        sync_dir(parent)
    }

    /// Marks an existing blob as freshly used, so `gc`'s grace period protects it.
    fn touch(path: &Path) -> io::Result<()> {
        File::open(path)?.set_modified(SystemTime::now())
    }
}

#[async_trait]
impl Store for FsStore {
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

    fn manifest_writes(&self) -> Arc<ManifestWrites> {
        self.writes.clone()
    }

    fn blob_bytes(&self) -> Option<Arc<BlobBytes>> {
        Some(self.bytes.clone())
    }

    fn listings(&self) -> Option<Arc<Listings>> {
        Some(self.listings.clone())
    }

    async fn blob_verify(&self, digest: &Digest) -> Result<bool, StorageError> {
        blobs::blob_verify(self, digest).await
    }

    async fn repo_blob_link(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        repos::repo_blob_link(self, repo, digest).await
    }

    async fn repo_blob_linked(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        repos::repo_blob_linked(self, repo, digest).await
    }

    async fn repo_blob_unlink(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, StorageError> {
        repos::repo_blob_unlink(self, repo, digest).await
    }

    async fn repo_blob_links(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError> {
        repos::repo_blob_links(self, repo).await
    }

    async fn repositories(&self) -> Result<Vec<RepositoryName>, StorageError> {
        self.listings.repositories_listed();
        repos::repositories_page(self, None, usize::MAX).await
    }

    async fn repositories_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RepositoryName>, StorageError> {
        repos::repositories_page(self, after, limit).await
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
        manifests::manifest_by_digest(self, repo, digest).await
    }

    async fn manifest_delete(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<Vec<String>, StorageError> {
        manifests::manifest_delete(self, repo, digest).await
    }

    async fn manifest_list(&self, repo: &RepositoryName) -> Result<Vec<Digest>, StorageError> {
        manifests::manifest_list(self, repo).await
    }

    async fn manifest_ages(
        &self,
        repo: &RepositoryName,
    ) -> Result<Vec<(Digest, Duration)>, StorageError> {
        manifests::manifest_ages(self, repo).await
    }

    async fn tag_delete(&self, repo: &RepositoryName, tag: &Tag) -> Result<(), StorageError> {
        manifests::tag_delete(self, repo, tag).await
    }

    async fn tags(&self, repo: &RepositoryName) -> Result<Vec<String>, StorageError> {
        manifests::tags_page(self, repo, None, usize::MAX).await
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
        referrers::referrers(self, repo, subject).await
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
        uploads::upload_status(self, repo, id).await
    }

    async fn upload_read(
        &self,
        repo: &RepositoryName,
        id: &str,
        offset: u64,
    ) -> Result<ByteStream, StorageError> {
        uploads::upload_read(self, repo, id, offset).await
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

    async fn upload_expire(&self, idle: Duration) -> Result<usize, StorageError> {
        uploads::upload_expire(self, idle).await
    }

    async fn maintenance_lock(&self) -> Result<MaintenanceGuard, StorageError> {
        locks::maintenance_lock(self).await
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
}
