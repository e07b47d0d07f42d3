//! The reference index on object storage (see the disk backend's `references` for what it is
//! for), with the same names:
//!
//! ```text
//! references/<alg>/<hex[..2]>/<hex>/<repository, / as +>/<alg>-<manifest hex>   empty
//! repositories/<name>/_manifests/references/<alg>/<hex>    what the manifest names, a line each
//! ```
//! Entries, then the record, are written before the revision; the record, then the entries,
//! removed after it. An object store has no empty folders, so any key under a target's
//! prefix is a manifest naming it.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use outpost_core::{Digest, RepositoryName};

use super::{BucketStore, os_err};
use crate::storage::{StorageError, repo_segment};

/// A record lists a manifest's blobs and children: far below this.
const MAX_RECORD_READ: u64 = 4 * 1024 * 1024;
/// Entries written at once for one manifest.
const WRITE_CONCURRENCY: usize = 8;

impl BucketStore {
    fn references_rel(target: &Digest) -> String {
        format!(
            "references/{}/{}/{}",
            target.algorithm().as_str(),
            &target.hex()[..2],
            target.hex()
        )
    }

    fn reference_entry(&self, target: &Digest, repo: &RepositoryName, m: &Digest) -> Key {
        self.key(&format!(
            "{}/{}/{}-{}",
            Self::references_rel(target),
            repo_segment(repo),
            m.algorithm().as_str(),
            m.hex()
        ))
    }

    fn reference_record(&self, repo: &RepositoryName, d: &Digest) -> Key {
        self.key(&format!(
            "{}/_manifests/references/{}/{}",
            Self::repo_rel(repo),
            d.algorithm().as_str(),
            d.hex()
        ))
    }

    /// Writes manifest `m`'s entries, then its record (so a record that exists has all its
    /// entries, and a second push of the same manifest, which names the same, writes none).
    /// `again`: every entry even if the record exists (recording on request repairs).
    pub(super) async fn references_write(
        &self,
        repo: &RepositoryName,
        m: &Digest,
        targets: &[Digest],
        again: bool,
    ) -> Result<(), StorageError> {
        let record = self.reference_record(repo, m);
        if !again && self.head(&record).await?.is_some() {
            return Ok(());
        }
        let keys: Vec<Key> = targets
            .iter()
            .map(|t| self.reference_entry(t, repo, m))
            .collect();
        futures_util::stream::iter(keys)
            .map(|k| async move { self.put(&k, Bytes::new()).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        let lines: String = targets.iter().map(|t| format!("{t}\n")).collect();
        self.put(&record, Bytes::from(lines)).await
    }

    /// Removes manifest `m`'s record, then its entries, once its revision is gone (nothing for
    /// a manifest stored before the index was kept: it has no record).
    pub(super) async fn references_remove(
        &self,
        repo: &RepositoryName,
        m: &Digest,
    ) -> Result<(), StorageError> {
        let record = self.reference_record(repo, m);
        let Some(raw) = self.get_small(&record, MAX_RECORD_READ).await? else {
            return Ok(());
        };
        let text = String::from_utf8_lossy(&raw);
        let keys: Vec<Key> = text
            .lines()
            .filter_map(|l| l.trim().parse::<Digest>().ok())
            .map(|t| self.reference_entry(&t, repo, m))
            .collect();
        // The record first, as on disk: never a record whose entries are gone.
        self.delete(&record).await?;
        futures_util::stream::iter(keys)
            .map(|k| async move { self.delete(&k).await })
            .buffer_unordered(WRITE_CONCURRENCY)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

/// One LIST request, of at most one page: the first key under the prefix answers.
pub(super) async fn referenced(
    store: &BucketStore,
    target: &Digest,
    repo: Option<&RepositoryName>,
) -> Result<bool, StorageError> {
    let mut rel = BucketStore::references_rel(target);
    if let Some(r) = repo {
        rel = format!("{rel}/{}", repo_segment(r));
    }
    let prefix = store.key(&rel);
    let mut listing = store.store.list(Some(&prefix));
    match listing.next().await {
        None => Ok(false),
        Some(Ok(_)) => Ok(true),
        Some(Err(e)) => Err(os_err(e)),
    }
}

pub(super) async fn references_record(
    store: &BucketStore,
    repo: &RepositoryName,
    digest: &Digest,
    targets: &[Digest],
) -> Result<bool, StorageError> {
    let revision = store.revision_key(repo, digest);
    if store.head(&revision).await?.is_none() {
        return Ok(false);
    }
    store.references_write(repo, digest, targets, true).await?;
    // Deleted meanwhile: undo, so no entry outlives it (a delete after this check removes
    // them itself, from the record just written).
    if store.head(&revision).await?.is_none() {
        store.references_remove(repo, digest).await?;
        return Ok(false);
    }
    Ok(true)
}
