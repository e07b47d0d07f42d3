//! Consistency check: re-hashes every blob and checks that every manifest's content and
//! references are present, and recorded in the reference index once retention relies on it.
//! Read-only, so safe on a running store.
//!
//! An index may lack children: a platform filter (`--platform`) stores indexes whole but
//! fetches only the platforms a site runs, and a pull asks the parent for the others. Such an
//! index is counted (`partial_indexes`), not reported as a problem.

use outpost_core::Digest;

use crate::content::manifest;
use crate::service::retention;
use crate::storage::{StorageError, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// A blob whose content no longer hashes to its name.
    Corrupt { digest: Digest },
    /// A manifest revision whose own content is missing.
    ManifestMissing { repo: String, digest: Digest },
    /// A manifest that cannot be parsed.
    ManifestUnreadable {
        repo: String,
        digest: Digest,
        reason: String,
    },
    /// A manifest referencing a blob that is not stored.
    Dangling {
        repo: String,
        manifest: Digest,
        missing: Digest,
    },
    /// Something a manifest names that the reference index does not record (once retention
    /// took stock of the store): an eviction could free it while the manifest needs it.
    Unindexed {
        repo: String,
        manifest: Digest,
        name: Digest,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Corrupt { digest } => write!(f, "corrupt blob {digest}"),
            Problem::ManifestMissing { repo, digest } => {
                write!(f, "{repo}@{digest}: manifest content missing")
            }
            Problem::ManifestUnreadable {
                repo,
                digest,
                reason,
            } => {
                write!(f, "{repo}@{digest}: unreadable manifest: {reason}")
            }
            Problem::Dangling {
                repo,
                manifest,
                missing,
            } => {
                write!(f, "{repo}@{manifest}: references missing blob {missing}")
            }
            Problem::Unindexed {
                repo,
                manifest,
                name,
            } => {
                write!(
                    f,
                    "{repo}@{manifest}: {name} is missing from the reference index (delete the \
                     document {} for retention to index the store again at the next start)",
                    retention::INDEX_KEY
                )
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct FsckReport {
    pub blobs_checked: usize,
    pub bytes_checked: u64,
    pub manifests_checked: usize,
    /// Indexes with children not stored (left out by a platform filter).
    pub partial_indexes: usize,
    pub problems: Vec<Problem>,
}

/// Checks the whole store; `progress` is told each blob checked (index, total).
pub async fn run(
    store: &dyn Store,
    mut progress: impl FnMut(usize, usize),
) -> Result<FsckReport, StorageError> {
    let mut report = FsckReport::default();
    // Before retention took stock, manifests stored earlier are not in the index yet.
    let indexed = store.doc_get(retention::INDEX_KEY).await?.is_some();
    let blobs = store.blob_list().await?;
    for (i, blob) in blobs.iter().enumerate() {
        progress(i + 1, blobs.len());
        match store.blob_verify(&blob.digest).await {
            Ok(true) => {}
            Ok(false) => report.problems.push(Problem::Corrupt {
                digest: blob.digest.clone(),
            }),
            // Removed by a concurrent gc between listing and hashing: not a problem.
            Err(StorageError::BlobUnknown(_)) => continue,
            Err(e) => return Err(e),
        }
        report.blobs_checked += 1;
        report.bytes_checked += blob.size;
    }
    for repo in store.repositories().await? {
        let listed = store.manifest_list(&repo).await?;
        let revisions: std::collections::HashSet<&Digest> = listed.iter().collect();
        for digest in listed.iter().cloned() {
            report.manifests_checked += 1;
            let m = match store.manifest_by_digest(&repo, &digest).await {
                Ok(m) => m,
                Err(StorageError::ManifestUnknown) => {
                    // Deleted since listing, or content gone: only the latter is a problem.
                    if store.manifest_list(&repo).await?.contains(&digest) {
                        report.problems.push(Problem::ManifestMissing {
                            repo: repo.to_string(),
                            digest,
                        });
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            let parsed = match manifest::parse(&m.content, Some(&m.media_type)) {
                Ok(p) => p,
                Err(e) => {
                    report.problems.push(Problem::ManifestUnreadable {
                        repo: repo.to_string(),
                        digest,
                        reason: e.to_string(),
                    });
                    continue;
                }
            };
            for missing_candidate in &parsed.blobs {
                if store.blob_size(missing_candidate).await?.is_none() {
                    report.problems.push(Problem::Dangling {
                        repo: repo.to_string(),
                        manifest: digest.clone(),
                        missing: missing_candidate.clone(),
                    });
                }
            }
            if indexed {
                for name in parsed.names() {
                    if !store.referenced(&name, Some(&repo)).await? {
                        report.problems.push(Problem::Unindexed {
                            repo: repo.to_string(),
                            manifest: digest.clone(),
                            name,
                        });
                    }
                }
            }
            // A child stored in the repository is checked as a manifest of its own; one that
            // is not is a platform left out, served by pull-through when asked for.
            if parsed.manifests.iter().any(|c| !revisions.contains(c)) {
                report.partial_indexes += 1;
            }
        }
    }
    Ok(report)
}
