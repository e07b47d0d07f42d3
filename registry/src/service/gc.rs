//! Garbage collection: removes blobs no manifest references. Safe on a running store: it holds
//! the maintenance lock (manifest pushes wait) and spares blobs younger than a grace period, so
//! an upload whose manifest has not been pushed yet survives. On object storage the lock holds
//! off only this process's manifest writes (there is no lock across processes in a bucket).

use std::collections::HashSet;
use std::time::Duration;

use outpost_core::Digest;

use crate::content::manifest;
use crate::storage::{StorageError, Store};

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
    let _lock = store.maintenance_lock().await?;
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
        let removed = if dry_run {
            true
        } else {
            store.blob_remove(&blob.digest, grace).await?
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
    if !dry_run {
        for repo in &repos {
            for digest in store.repo_blob_links(repo).await? {
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
