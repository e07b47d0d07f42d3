//! Manifest revisions and tags.

use std::fs::{self, File};
use std::io::{self, Read};

use bytes::Bytes;
use outpost_core::{Digest, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

use super::FsStore;
use super::files::*;
use crate::storage::{NewManifest, StorageError, StoredManifest};

/// Manifests are small; anything larger than this in a revision is not read into memory.
pub(super) const MAX_MANIFEST_READ: u64 = 8 * 1024 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(super) struct RevisionLink {
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<Digest>,
}

impl FsStore {
    pub(super) fn read_revision(
        &self,
        repo: &RepositoryName,
        d: &Digest,
    ) -> Result<RevisionLink, StorageError> {
        let raw = not_found_to(
            fs::read(self.revision_link(repo, d)),
            StorageError::ManifestUnknown,
        )?;
        serde_json::from_slice(&raw).map_err(|e| StorageError::Io(io::Error::other(e)))
    }

    pub(super) fn read_manifest(
        &self,
        repo: &RepositoryName,
        d: &Digest,
    ) -> Result<StoredManifest, StorageError> {
        let link = self.read_revision(repo, d)?;
        let mut f = not_found_to(File::open(self.blob_path(d)), StorageError::ManifestUnknown)?;
        let mut content = Vec::new();
        (&mut f).take(MAX_MANIFEST_READ).read_to_end(&mut content)?;
        Ok(StoredManifest {
            digest: d.clone(),
            media_type: link.media_type,
            content: Bytes::from(content),
        })
    }

    pub(super) fn read_tag(
        &self,
        repo: &RepositoryName,
        tag: &Tag,
    ) -> Result<Digest, StorageError> {
        let raw = not_found_to(
            fs::read_to_string(self.tags_dir(repo).join(tag.as_str())),
            StorageError::ManifestUnknown,
        )?;
        raw.trim()
            .parse()
            .map_err(|e| StorageError::Io(io::Error::other(format!("corrupt tag link: {e}"))))
    }
}

pub(super) async fn manifest_put(
    store: &FsStore,
    repo: &RepositoryName,
    m: NewManifest<'_>,
) -> Result<(), StorageError> {
    let store = store.handle();
    let repo = repo.clone();
    let digest = m.digest.clone();
    let blobs = m.blobs.to_vec();
    let manifests = m.manifests.to_vec();
    let names = m.names.to_vec();
    let tag = m.tag.cloned();
    let content = m.content.clone();
    let link = RevisionLink {
        media_type: m.media_type.to_owned(),
        subject: m.subject.as_ref().map(|(d, _)| (*d).clone()),
    };
    let referrer = m.subject.map(|(d, desc)| (d.clone(), desc));
    blocking(move || {
        // Held until the links are written, so gc cannot sweep a blob checked below.
        let _lock = store.lock_file(false)?;
        for b in &blobs {
            if !(exists(&store.layer_link(&repo, b))? && exists(&store.blob_path(b))?) {
                return Err(StorageError::ReferencedBlobUnknown(b.clone()));
            }
        }
        for child in &manifests {
            if !exists(&store.revision_link(&repo, child))? {
                return Err(StorageError::ReferencedManifestUnknown(child.clone()));
            }
        }
        let blob = store.blob_path(&digest);
        // Touched when present; written when absent, or swept by a gc just before the touch.
        let touched = if exists(&blob)? {
            match FsStore::touch(&blob) {
                Ok(()) => true,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
                Err(e) => return Err(e.into()),
            }
        } else {
            false
        };
        if !touched {
            store.write_atomic(&blob, &content)?;
        }
        let layer = store.layer_link(&repo, &digest);
        if !exists(&layer)? {
            store.write_atomic(&layer, b"")?;
        }
        store.references_write(&repo, &digest, &names, false)?;
        let raw = serde_json::to_vec(&link).map_err(io::Error::other)?;
        store.write_atomic(&store.revision_link(&repo, &digest), &raw)?;
        if let Some((subject, desc)) = referrer {
            let raw = serde_json::to_vec(&desc).map_err(io::Error::other)?;
            let name = format!("{}-{}", digest.algorithm(), digest.hex());
            store.write_atomic(&store.referrers_dir(&repo, &subject).join(name), &raw)?;
        }
        if let Some(tag) = tag {
            let path = store.tags_dir(&repo).join(tag.as_str());
            store.write_atomic(&path, digest.to_string().as_bytes())?;
        }
        store.writes.record(&repo, &digest);
        Ok(())
    })
    .await
}

pub(super) async fn manifest_by_tag(
    store: &FsStore,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<StoredManifest, StorageError> {
    let store = store.handle();
    let (repo, tag) = (repo.clone(), tag.clone());
    blocking(move || {
        let d = store.read_tag(&repo, &tag)?;
        store.read_manifest(&repo, &d)
    })
    .await
}

pub(super) async fn manifest_by_digest(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<StoredManifest, StorageError> {
    let store = store.handle();
    let (repo, d) = (repo.clone(), digest.clone());
    blocking(move || store.read_manifest(&repo, &d)).await
}

pub(super) async fn manifest_delete(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<Vec<String>, StorageError> {
    let store = store.handle();
    let (repo, d) = (repo.clone(), digest.clone());
    blocking(move || {
        let link = store.read_revision(&repo, &d)?;
        // Tags first: a crash part way leaves a manifest without tags, never a dangling tag.
        let tags = store.tags_dir(&repo);
        let mut removed = Vec::new();
        for name in list_names(&tags)? {
            let path = tags.join(&name);
            if let Ok(raw) = fs::read_to_string(&path)
                && raw.trim() == d.to_string()
                && remove_file_if_exists(&path)?
            {
                removed.push(name);
            }
        }
        removed.sort();
        if let Some(subject) = link.subject {
            let name = format!("{}-{}", d.algorithm(), d.hex());
            remove_file_if_exists(&store.referrers_dir(&repo, &subject).join(name))?;
        }
        remove_file_if_exists(&store.revision_link(&repo, &d))?;
        store.references_remove(&repo, &d)?;
        Ok(removed)
    })
    .await
}

pub(super) async fn manifest_list(
    store: &FsStore,
    repo: &RepositoryName,
) -> Result<Vec<Digest>, StorageError> {
    let dir = store.repo_dir(repo).join("_manifests/revisions");
    blocking(move || Ok(FsStore::digests_in(&dir)?)).await
}

/// Every revision link with its age: a push writes the link again, so this is the time since
/// the manifest was last pushed into the repository (by digest or by tag).
pub(super) async fn manifest_ages(
    store: &FsStore,
    repo: &RepositoryName,
) -> Result<Vec<(Digest, std::time::Duration)>, StorageError> {
    let dir = store.repo_dir(repo).join("_manifests/revisions");
    blocking(move || {
        let mut out = Vec::new();
        for d in FsStore::digests_in(&dir)? {
            let path = dir.join(d.algorithm().as_str()).join(d.hex());
            match fs::metadata(&path) {
                Ok(meta) => out.push((d, age_of(&meta))),
                // Deleted since the listing.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(out)
    })
    .await
}

pub(super) async fn tag_delete(
    store: &FsStore,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<(), StorageError> {
    let path = store.tags_dir(repo).join(tag.as_str());
    blocking(move || {
        if remove_file_if_exists(&path)? {
            Ok(())
        } else {
            Err(StorageError::ManifestUnknown)
        }
    })
    .await
}

pub(super) async fn tags_page(
    store: &FsStore,
    repo: &RepositoryName,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    let (dir, tags) = (store.repo_dir(repo), store.tags_dir(repo));
    let cache = store.dirs.clone();
    let after = after.map(str::to_owned);
    blocking(move || {
        if !dir.is_dir() {
            return Err(StorageError::RepositoryUnknown);
        }
        Ok(super::listing::tags_page(
            &cache,
            &tags,
            after.as_deref(),
            limit,
        )?)
    })
    .await
}
