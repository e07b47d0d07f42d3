//! One image from the parent, as a sync run, a staging request and a pull-through all need it:
//! plan what is missing (the manifest, an index's platform manifests, referrers), then write
//! manifests children first once every blob is stored, and point the tag last.

use std::collections::HashSet;

use bytes::Bytes;
use outpost_core::{Digest, Reference, RepositoryName, Tag};

use super::parent::{Parent, ParentError};
use crate::content::{self, manifest};
use crate::storage::{StorageError, Store};

/// How deep referrers of referrers are followed (a signature of an SBOM of an image).
const REFERRER_DEPTH: usize = 2;
/// Index nesting beyond this is refused (an index of indexes of ... is a loop or an attack).
pub const MAX_DEPTH: usize = 8;

/// A manifest fetched from the parent, waiting for its blobs.
pub struct Fetched {
    pub digest: Digest,
    pub content: Bytes,
}

/// What one image needs: manifests in the order they can be written, and their blobs.
#[derive(Default)]
pub struct Tree {
    pub manifests: Vec<Fetched>,
    pub blobs: Vec<(Digest, u64)>,
    pub seen: HashSet<Digest>,
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
            // Stored manifests had all they reference when they were written.
            Ok(_) => return Ok(()),
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
        for child in &parsed.manifests {
            Box::pin(self.collect(repo, child, None, tree, depth + 1)).await?;
        }
        tree.blobs.extend(parsed.blob_sizes.iter().cloned());
        tree.manifests.push(Fetched {
            digest: digest.clone(),
            content,
        });
        Ok(())
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
        content::push_manifest(
            store,
            repo,
            &Reference::Digest(m.digest.clone()),
            None,
            m.content.clone(),
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
    content::push_manifest(store, repo, &Reference::Tag(tag.clone()), None, content).await?;
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
