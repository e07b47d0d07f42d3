//! Garbage collection: removes blobs no manifest references. Safe on a running store: it holds
//! the maintenance lock (manifest pushes wait) and spares blobs younger than a grace period, so
//! an upload whose manifest has not been pushed yet survives. The lock holds off manifest
//! pushes of every process on the store: an flock on a directory, a lease object on object
//! storage (see `storage::object::lock`), which gc checks before each removal and stops if it
//! was lost. A dry run removes nothing and takes no lock.

use std::collections::HashSet;
use std::time::Duration;

use outpost_core::Digest;

use crate::content::manifest;
use crate::storage::{MaintenanceHold, StorageError, Store};

#[derive(Debug, thiserror::Error)]
pub enum GcError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("manifest {digest} in {repo} cannot be parsed ({reason}); refusing to sweep")]
    Unreadable {
        repo: String,
        digest: Digest,
        reason: String,
    },
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_kept: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    pub links_removed: usize,
}

/// Runs a mark-and-sweep. With `dry_run` nothing is removed; the report says what would be.
pub async fn run(store: &dyn Store, grace: Duration, dry_run: bool) -> Result<GcReport, GcError> {
    if dry_run {
        return mark_and_sweep(store, grace, None).await;
    }
    let lock = store.maintenance_lock().await?;
    let result = mark_and_sweep(store, grace, Some(lock.as_ref())).await;
    // Released on every path: on object storage a lease left behind holds pushes up until it
    // expires.
    let released = lock.release().await;
    let report = result?;
    released?;
    Ok(report)
}

/// With `lock` None (a dry run) nothing is removed.
async fn mark_and_sweep(
    store: &dyn Store,
    grace: Duration,
    lock: Option<&dyn MaintenanceHold>,
) -> Result<GcReport, GcError> {
    let dry_run = lock.is_none();
    let mut live: HashSet<Digest> = HashSet::new();
    let repos = store.repositories().await?;
    for repo in &repos {
        for digest in store.manifest_list(repo).await? {
            live.insert(digest.clone());
            let m = match store.manifest_by_digest(repo, &digest).await {
                Ok(m) => m,
                // A revision whose content is gone references nothing we could keep.
                Err(StorageError::ManifestUnknown) => continue,
                Err(e) => return Err(e.into()),
            };
            let parsed = manifest::parse(&m.content, Some(&m.media_type)).map_err(|e| {
                GcError::Unreadable {
                    repo: repo.to_string(),
                    digest: digest.clone(),
                    reason: e.to_string(),
                }
            })?;
            live.extend(parsed.all_blobs);
        }
    }
    let mut report = GcReport::default();
    // Blobs listed and not removed: their links need no check below.
    let mut present: HashSet<Digest> = HashSet::new();
    for blob in store.blob_list().await? {
        if live.contains(&blob.digest) || blob.age < grace {
            report.blobs_kept += 1;
            present.insert(blob.digest);
            continue;
        }
        let removed = match lock {
            None => true,
            Some(lock) => {
                lock.check()?;
                store.blob_remove(&blob.digest, grace).await?
            }
        };
        if removed {
            tracing::info!(digest = %blob.digest, size = blob.size, dry_run, "removing unreferenced blob");
            report.blobs_removed += 1;
            report.bytes_removed += blob.size;
        } else {
            report.blobs_kept += 1;
            present.insert(blob.digest);
        }
    }
    if let Some(lock) = lock {
        for repo in &repos {
            for digest in store.repo_blob_links(repo).await? {
                lock.check()?;
                // A link is stale once its blob is gone. Blobs listed above and kept are not
                // (one removed by someone else since is left to the next run: a link to a
                // missing blob serves nothing), so only the others cost a check, which is a
                // HEAD request on object storage.
                if !present.contains(&digest)
                    && store.blob_size(&digest).await?.is_none()
                    && store.repo_blob_unlink(repo, &digest).await?
                {
                    report.links_removed += 1;
                }
            }
        }
    }
    Ok(report)
}
