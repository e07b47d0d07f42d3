//! One image from the parent, as a sync run, a staging request and a pull-through all need it:
//! plan what is missing (the manifest, an index's platform manifests, referrers), then write
//! manifests children first once every blob is stored, and point the tag last.
//!
//! Under a platform filter (`--platform`) an index is stored byte for byte as the parent sends
//! it, but only the children the filter keeps are fetched; the others stay absent (a pull asks
//! the parent for them on demand) and are listed in [`Tree::skipped`].

use std::collections::HashSet;

use bytes::Bytes;
use outpost_core::{Digest, Reference, RepositoryName, Tag};

use super::parent::{Parent, ParentError};
use crate::content::platform::{Child, PlatformFilter};
use crate::content::{self, Children, manifest};
use crate::storage::{StorageError, Store};

/// How deep referrers of referrers are followed (a signature of an SBOM of an image).
const REFERRER_DEPTH: usize = 2;
/// Index nesting beyond this is refused (an index of indexes of ... is a loop or an attack).
pub const MAX_DEPTH: usize = 8;

/// A manifest fetched from the parent, waiting for its blobs.
pub struct Fetched {
    pub digest: Digest,
    pub content: Bytes,
    /// The children (of an index) fetched with it, which must be stored before it.
    pub children: Vec<Digest>,
}

/// What one image needs: manifests in the order they can be written, and their blobs.
#[derive(Default)]
pub struct Tree {
    pub manifests: Vec<Fetched>,
    pub blobs: Vec<(Digest, u64)>,
    pub seen: HashSet<Digest>,
    /// Children of the indexes fetched here that the platform filter left out and that are not
    /// stored (what the filter saved; counted once the indexes are written).
    pub skipped: Vec<Child>,
}

impl Tree {
    /// Distinct blobs with their sizes.
    pub fn unique_blobs(&self) -> Vec<(Digest, u64)> {
        let mut seen = HashSet::new();
        self.blobs
            .iter()
            .filter(|(d, _)| seen.insert(d.clone()))
            .cloned()
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
    #[error("manifest {digest} from the parent is invalid: {reason}")]
    Invalid { digest: Digest, reason: String },
    /// Left out on purpose (an evicted image the parent did not change).
    #[error("skipped")]
    Skipped,
}

/// Called with every manifest fetched from the parent while planning.
pub type OnFetch<'a> = &'a (dyn Fn(&Digest, &Bytes) + Send + Sync);

pub struct Planner<'a> {
    pub store: &'a dyn Store,
    pub parent: &'a Parent,
    /// Attempts per manifest request.
    pub attempts: u32,
    pub on_fetch: Option<OnFetch<'a>>,
    /// Which children of an index are fetched.
    pub platforms: &'a PlatformFilter,
}

impl Planner<'_> {
    /// Everything under `digest` that is not stored yet, with its referrers. `known` is the
    /// root manifest's content when the caller already has it.
    pub async fn plan(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        known: Option<Bytes>,
    ) -> Result<Tree, PlanError> {
        let mut tree = Tree::default();
        self.collect(repo, digest, known, &mut tree, 0).await?;
        self.collect_referrers(repo, digest, &mut tree, 0).await;
        Ok(tree)
    }

    /// Fetches `digest` and everything under it that is not stored yet.
    async fn collect(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        known: Option<Bytes>,
        tree: &mut Tree,
        depth: usize,
    ) -> Result<(), PlanError> {
        if tree.seen.contains(digest) {
            return Ok(());
        }
        tree.seen.insert(digest.clone());
        match self.store.manifest_by_digest(repo, digest).await {
            // Stored manifests had all they reference when they were written, except the
            // children of an index a platform filter left out.
            Ok(m) => {
                self.stored_index(repo, &m.content, &m.media_type, tree, depth)
                    .await;
                return Ok(());
            }
            Err(StorageError::ManifestUnknown | StorageError::RepositoryUnknown) => {}
            Err(e) => return Err(e.into()),
        }
        if depth > MAX_DEPTH {
            return Err(PlanError::Invalid {
                digest: digest.clone(),
                reason: "indexes nested too deep".into(),
            });
        }
        let content = match known {
            Some(c) => c,
            None => {
                self.parent
                    .manifest_with(repo, &Reference::Digest(digest.clone()), self.attempts)
                    .await?
            }
        };
        let actual = crate::storage::hash::digest_of(digest.algorithm(), &content);
        if &actual != digest {
            return Err(PlanError::Invalid {
                digest: digest.clone(),
                reason: "content does not match its digest".into(),
            });
        }
        let parsed = manifest::parse(&content, None).map_err(|e| PlanError::Invalid {
            digest: digest.clone(),
            reason: e.to_string(),
        })?;
        if let Some(f) = self.on_fetch {
            f(digest, &content);
        }
        let (kept, skipped) = self.platforms.split(&parsed.children);
        for child in &kept {
            Box::pin(self.collect(repo, &child.digest, None, tree, depth + 1)).await?;
        }
        for child in skipped {
            // One stored already (pulled on demand, or kept by an earlier filter) saved nothing.
            match self.store.manifest_by_digest(repo, &child.digest).await {
                Ok(_) => {}
                Err(StorageError::ManifestUnknown | StorageError::RepositoryUnknown) => {
                    tree.skipped.push(child)
                }
                Err(e) => return Err(e.into()),
            }
        }
        tree.blobs.extend(parsed.blob_sizes.iter().cloned());
        tree.manifests.push(Fetched {
            digest: digest.clone(),
            content,
            children: kept.into_iter().map(|c| c.digest).collect(),
        });
        Ok(())
    }

    /// Adds to `tree` the children of a stored index that the filter keeps and the store
    /// lacks: left out by an earlier, narrower filter. A child that cannot be had now is left
    /// for the next run (or a pull) and does not fail the image, which is stored and whole for
    /// the platforms it had.
    async fn stored_index(
        &self,
        repo: &RepositoryName,
        content: &Bytes,
        media_type: &str,
        tree: &mut Tree,
        depth: usize,
    ) {
        if !matches!(media_type, manifest::OCI_INDEX | manifest::DOCKER_LIST) || depth >= MAX_DEPTH
        {
            return;
        }
        let Ok(parsed) = manifest::parse(content, Some(media_type)) else {
            return;
        };
        let (kept, _) = self.platforms.split(&parsed.children);
        for child in kept {
            let mut sub = Tree {
                seen: tree.seen.clone(),
                ..Default::default()
            };
            match Box::pin(self.collect(repo, &child.digest, None, &mut sub, depth + 1)).await {
                Ok(()) => {
                    tree.seen.extend(sub.seen);
                    tree.blobs.extend(sub.blobs);
                    tree.manifests.extend(sub.manifests);
                    tree.skipped.extend(sub.skipped);
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, child = %child.digest, error = %e, "platform manifest of a stored index not fetched");
                }
            }
        }
    }

    /// Adds the referrers of `subject` (signatures, SBOMs, attestations) to `tree`. A parent
    /// without referrers, or a referrer that cannot be fetched, does not fail the image.
    async fn collect_referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
        tree: &mut Tree,
        depth: usize,
    ) {
        let list = match self.parent.referrers(repo, subject).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(repository = %repo, %subject, error = %e, "no referrers from the parent");
                return;
            }
        };
        for r in list {
            let mut sub = Tree {
                seen: tree.seen.clone(),
                ..Default::default()
            };
            match self.collect(repo, &r, None, &mut sub, 0).await {
                Ok(()) => {
                    tree.seen.extend(sub.seen);
                    tree.blobs.extend(sub.blobs);
                    tree.manifests.extend(sub.manifests);
                    tree.skipped.extend(sub.skipped);
                    if depth < REFERRER_DEPTH {
                        Box::pin(self.collect_referrers(repo, &r, tree, depth + 1)).await;
                    }
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, referrer = %r, error = %e, "referrer skipped");
                }
            }
        }
    }
}

/// The bytes of `tree`'s distinct blobs already stored, and the blobs still missing.
pub async fn split_stored(
    store: &dyn Store,
    tree: &Tree,
) -> Result<(u64, Vec<(Digest, u64)>), StorageError> {
    let mut present = 0;
    let mut missing = Vec::new();
    for (d, n) in tree.unique_blobs() {
        match store.blob_size(&d).await? {
            Some(_) => present += n,
            None => missing.push((d, n)),
        }
    }
    Ok((present, missing))
}

/// The children `tree` left out that are not in `counted` yet (added to it), with the sizes
/// their index descriptors give.
pub fn skipped_bytes(tree: &Tree, counted: &mut HashSet<Digest>) -> u64 {
    tree.skipped
        .iter()
        .filter(|c| counted.insert(c.digest.clone()))
        .map(|c| c.size)
        .sum()
}

/// True when every blob `tree` needs is stored.
pub async fn blobs_stored(store: &dyn Store, tree: &Tree) -> Result<bool, StorageError> {
    for (d, _) in &tree.blobs {
        if store.blob_size(d).await?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes the manifests of `tree` children first (their blobs must be stored); returns how
/// many were written.
pub async fn write_manifests(
    store: &dyn Store,
    repo: &RepositoryName,
    tree: &Tree,
) -> Result<u64, (Digest, content::PushError)> {
    let mut n = 0;
    for (d, _) in &tree.blobs {
        link(store, repo, d)
            .await
            .map_err(|e| (d.clone(), e.into()))?;
    }
    for m in &tree.manifests {
        content::push_manifest_with(
            store,
            repo,
            &Reference::Digest(m.digest.clone()),
            None,
            m.content.clone(),
            Children::Only(&m.children),
        )
        .await
        .map_err(|e| (m.digest.clone(), e))?;
        n += 1;
    }
    Ok(n)
}

/// Points `tag` at the stored manifest `digest`.
pub async fn point_tag(
    store: &dyn Store,
    repo: &RepositoryName,
    tag: &Tag,
    digest: &Digest,
) -> Result<(), content::PushError> {
    let content = store.manifest_by_digest(repo, digest).await?.content;
    // Stored, so what it needs was checked when it was written (and children a platform filter
    // left out are absent on purpose).
    content::push_manifest_with(
        store,
        repo,
        &Reference::Tag(tag.clone()),
        None,
        content,
        Children::Only(&[]),
    )
    .await?;
    Ok(())
}

/// Links a stored blob into `repo` unless it is already there (a link is an fsynced write).
pub async fn link(
    store: &dyn Store,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<(), StorageError> {
    if !store.repo_blob_linked(repo, digest).await? {
        store.repo_blob_link(repo, digest).await?;
    }
    Ok(())
}
