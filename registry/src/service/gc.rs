//! Garbage collection: removes blobs no manifest references. Safe on a running store: it holds
//! the maintenance lock (manifest pushes wait) and spares blobs younger than a grace period, so
//! an upload whose manifest has not been pushed yet survives. The lock holds off manifest
//! pushes of every process on the store: an flock on a directory, a lease object on object
//! storage (see `storage::object::lock`), which gc checks before each removal and stops if it
//! was lost. A dry run removes nothing and takes no lock.
//!
//! With `delete_untagged` (as the distribution registry's `--delete-untagged`) it first removes
//! the manifests no tag reaches (see [`unreachable`]) and older than the grace period, then
//! sweeps the blobs only they referenced. The grace period is what protects a manifest pushed
//! by digest that a tag or an index will name a moment later (buildx pushes an index's
//! children first; some clients push by digest, then tag): every push writes the revision
//! link again, so its age is the time since the last push. Tags cannot move while gc marks
//! and removes: a tag is written by a manifest push, which waits for the lock.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use outpost_core::{Digest, RepositoryName, Tag};

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
    /// A staging request or outbox entry that cannot be read: what it keeps is unknown, so
    /// no untagged manifest is removed.
    #[error("{0}; refusing to remove untagged manifests")]
    Held(StorageError),
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    pub blobs_kept: usize,
    pub blobs_removed: usize,
    pub bytes_removed: u64,
    pub links_removed: usize,
    /// Untagged manifests removed (or, in a dry run, that would be), as `repository@digest`,
    /// sorted.
    pub manifests_removed: Vec<String>,
}

/// What a run does.
#[derive(Debug, Clone, Copy)]
pub struct GcOptions {
    /// Blobs, and with `delete_untagged` manifests, written more recently than this stay.
    pub grace: Duration,
    /// Remove nothing; report what would go.
    pub dry_run: bool,
    /// First remove the manifests no tag reaches (see [`unreachable`]), then sweep blobs.
    pub delete_untagged: bool,
}

/// Runs a mark-and-sweep. With `dry_run` nothing is removed; the report says what would be.
pub async fn run(store: &dyn Store, opts: GcOptions) -> Result<GcReport, GcError> {
    if opts.dry_run {
        return mark_and_sweep(store, opts, None).await;
    }
    let lock = store.maintenance_lock().await?;
    let result = mark_and_sweep(store, opts, Some(lock.as_ref())).await;
    // Released on every path: on object storage a lease left behind holds pushes up until it
    // expires.
    let released = lock.release().await;
    let report = result?;
    released?;
    Ok(report)
}

/// Manifests kept whether tagged or not: images a staging request names, and pushes the
/// readwrite outbox has not yet delivered to the parent (or set aside as refused).
async fn held_manifests(store: &dyn Store) -> Result<HashSet<(String, Digest)>, GcError> {
    let mut held = crate::service::staging::pinned_in_store(store)
        .await
        .map_err(GcError::Held)?;
    for (repo, digest) in crate::sync::outbox::held_digests(store)
        .await
        .map_err(GcError::Held)?
    {
        if let Ok(d) = digest.parse() {
            held.insert((repo, d));
        }
    }
    Ok(held)
}

/// One manifest of a repository as gc sees it: `None` when its content is gone.
type Parsed = Option<manifest::ParsedManifest>;

/// The manifests of one repository that no root reaches. Roots: tagged manifests, `held`
/// ones and those younger than the grace period (a push by digest that a tag or an index
/// will name in a moment). From a kept manifest the children of an index are kept, and a
/// referrer is kept when its subject is (signatures and SBOMs of kept images).
pub fn unreachable(
    manifests: &HashMap<Digest, (Duration, Parsed)>,
    tagged: &HashSet<Digest>,
    held: &HashSet<Digest>,
    grace: Duration,
) -> HashSet<Digest> {
    let mut referrers: HashMap<&Digest, Vec<&Digest>> = HashMap::new();
    for (d, (_, p)) in manifests {
        if let Some(subject) = p.as_ref().and_then(|p| p.subject.as_ref()) {
            referrers.entry(subject).or_default().push(d);
        }
    }
    let mut kept: HashSet<&Digest> = HashSet::new();
    let mut todo: Vec<&Digest> = manifests
        .iter()
        .filter(|(d, (age, _))| tagged.contains(*d) || held.contains(*d) || *age < grace)
        .map(|(d, _)| d)
        .collect();
    // Each manifest is expanded once, so this ends after at most one pass over the edges.
    while let Some(d) = todo.pop() {
        if !kept.insert(d) {
            continue;
        }
        if let Some((_, Some(p))) = manifests.get(d) {
            todo.extend(p.manifests.iter().filter(|c| manifests.contains_key(*c)));
        }
        if let Some(rs) = referrers.get(d) {
            todo.extend(rs.iter().copied());
        }
    }
    manifests
        .keys()
        .filter(|d| !kept.contains(d))
        .cloned()
        .collect()
}

/// The digests `repo`'s tags point at (a tag removed meanwhile is skipped).
async fn tagged(store: &dyn Store, repo: &RepositoryName) -> Result<HashSet<Digest>, GcError> {
    let mut out = HashSet::new();
    let names = match store.tags(repo).await {
        Ok(n) => n,
        // Every manifest of the repository deleted since it was listed.
        Err(StorageError::RepositoryUnknown) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for name in names {
        let Ok(tag) = name.parse::<Tag>() else {
            continue;
        };
        match store.manifest_by_tag(repo, &tag).await {
            Ok(m) => {
                out.insert(m.digest);
            }
            Err(StorageError::ManifestUnknown) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Every manifest of `repo`, read and parsed, with its age when `aged` (else zero).
async fn read_manifests(
    store: &dyn Store,
    repo: &RepositoryName,
    aged: bool,
) -> Result<HashMap<Digest, (Duration, Parsed)>, GcError> {
    let listed: Vec<(Digest, Duration)> = if aged {
        store.manifest_ages(repo).await?
    } else {
        // The plain sweep costs what it always did: no ages needed.
        store
            .manifest_list(repo)
            .await?
            .into_iter()
            .map(|d| (d, Duration::ZERO))
            .collect()
    };
    let mut out = HashMap::new();
    for (digest, age) in listed {
        let m = match store.manifest_by_digest(repo, &digest).await {
            Ok(m) => m,
            // A revision whose content is gone references nothing we could keep.
            Err(StorageError::ManifestUnknown) => {
                out.insert(digest, (age, None));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let parsed =
            manifest::parse(&m.content, Some(&m.media_type)).map_err(|e| GcError::Unreadable {
                repo: repo.to_string(),
                digest: digest.clone(),
                reason: e.to_string(),
            })?;
        out.insert(digest, (age, Some(parsed)));
    }
    Ok(out)
}

/// With `lock` None (a dry run) nothing is removed. With `delete_untagged`, manifests no root
/// reaches are removed first and their blobs left unmarked.
async fn mark_and_sweep(
    store: &dyn Store,
    opts: GcOptions,
    lock: Option<&dyn MaintenanceHold>,
) -> Result<GcReport, GcError> {
    let dry_run = lock.is_none();
    let grace = opts.grace;
    // Read once the lock is held, just before marking. Staging requests and outbox entries
    // are written outside the lock, but each names a manifest pushed moments before (young
    // enough for the grace period), except a staging request naming by digest a manifest
    // stored long ago and untagged: submitted during this run, it can lose that manifest,
    // which pull-through or the next staging request fetches from the parent again.
    let held = if opts.delete_untagged {
        Some(held_manifests(store).await?)
    } else {
        None
    };
    let held = held.as_ref();
    let mut report = GcReport::default();
    let mut live: HashSet<Digest> = HashSet::new();
    let repos = store.repositories().await?;
    for repo in &repos {
        let manifests = read_manifests(store, repo, held.is_some()).await?;
        let doomed = match held {
            Some(held) => {
                let held: HashSet<Digest> = held
                    .iter()
                    .filter(|(r, _)| r == repo.as_str())
                    .map(|(_, d)| d.clone())
                    .collect();
                // Read under the lock: no tag can move until it is released.
                let tagged = tagged(store, repo).await?;
                unreachable(&manifests, &tagged, &held, grace)
            }
            None => HashSet::new(),
        };
        let mut doomed: Vec<Digest> = doomed.into_iter().collect();
        doomed.sort();
        for d in &doomed {
            if let Some(lock) = lock {
                lock.check()?;
                match store.manifest_delete(repo, d).await {
                    // Deleted by a client meanwhile: gone all the same.
                    Ok(_) | Err(StorageError::ManifestUnknown) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            tracing::info!(repository = %repo, digest = %d, dry_run, "removing untagged manifest");
            report.manifests_removed.push(format!("{repo}@{d}"));
        }
        for (digest, (_, parsed)) in manifests {
            if doomed.binary_search(&digest).is_ok() {
                continue;
            }
            live.insert(digest);
            if let Some(p) = parsed {
                live.extend(p.all_blobs);
            }
        }
    }
    report.manifests_removed.sort();
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::hash::digest_of;
    use outpost_core::Algorithm;

    const HOUR: Duration = Duration::from_secs(3600);

    fn d(name: &str) -> Digest {
        digest_of(Algorithm::Sha256, name.as_bytes())
    }

    /// A parsed manifest naming `children` (an index) and `subject` (a referrer).
    fn m(children: &[&str], subject: Option<&str>) -> Parsed {
        Some(manifest::ParsedManifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            blobs: Vec::new(),
            all_blobs: Vec::new(),
            blob_sizes: Vec::new(),
            manifests: children.iter().map(|c| d(c)).collect(),
            children: Vec::new(),
            subject: subject.map(d),
            artifact_type: None,
            annotations: None,
        })
    }

    fn names(set: HashSet<Digest>, all: &[&str]) -> Vec<String> {
        let mut out: Vec<String> = all
            .iter()
            .filter(|n| set.contains(&d(n)))
            .map(|n| n.to_string())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn only_what_no_root_reaches_goes() {
        let old = 2 * HOUR;
        let all = [
            "index",
            "amd",
            "arm",
            "tagged",
            "sig",
            "sig-of-sig",
            "moved",
            "moved-sig",
            "loose",
            "young",
            "young-sig",
            "old-subject",
            "held",
            "held-child",
            "gone",
        ];
        let manifests: HashMap<Digest, (Duration, Parsed)> = [
            // A tagged index whose arm64 child was never fetched (a platform filter).
            ("index", old, m(&["amd", "arm64-not-stored"], None)),
            ("amd", old, m(&[], None)),
            ("arm", old, m(&[], None)),
            ("tagged", old, m(&[], None)),
            ("sig", old, m(&[], Some("tagged"))),
            ("sig-of-sig", old, m(&[], Some("sig"))),
            ("moved", old, m(&[], None)),
            ("moved-sig", old, m(&[], Some("moved"))),
            ("loose", old, m(&[], None)),
            // Pushed a moment ago by digest: kept, with what it reaches, but not its subject.
            ("young", Duration::from_secs(5), m(&[], None)),
            (
                "young-sig",
                Duration::from_secs(5),
                m(&[], Some("old-subject")),
            ),
            ("old-subject", old, m(&[], None)),
            ("held", old, m(&["held-child"], None)),
            ("held-child", old, m(&[], None)),
            // Content gone: nothing to follow, untagged and old.
            ("gone", old, None),
        ]
        .into_iter()
        .map(|(n, age, p)| (d(n), (age, p)))
        .collect();
        let tagged: HashSet<Digest> = [d("index"), d("tagged")].into();
        let held: HashSet<Digest> = [d("held")].into();
        let doomed = unreachable(&manifests, &tagged, &held, HOUR);
        assert_eq!(
            names(doomed, &all),
            ["arm", "gone", "loose", "moved", "moved-sig", "old-subject"]
        );
        // A grace period longer than every age keeps everything.
        assert!(unreachable(&manifests, &tagged, &held, 3 * HOUR).is_empty());
    }
}
