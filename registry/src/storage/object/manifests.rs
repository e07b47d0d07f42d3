//! Repository links, manifest revisions, tags and referrers: small objects, each written whole.

use std::collections::BTreeSet;
use std::io;

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use outpost_core::{Algorithm, Digest, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

use super::{BucketStore, os_err};
use crate::storage::hash::digest_of;
use crate::storage::{Descriptor, NewManifest, StorageError, StoredManifest};

/// Manifests are small; anything larger than this is not read into memory.
const MAX_MANIFEST_READ: u64 = 8 * 1024 * 1024;
/// Tags, revision links and referrer descriptors are tiny.
const MAX_LINK_READ: u64 = 64 * 1024;

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RevisionLink {
    media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    subject: Option<Digest>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StorageError {
    StorageError::Io(io::Error::other(format!("corrupt {what}: {e}")))
}

pub(super) async fn repo_blob_link(
    store: &BucketStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<(), StorageError> {
    if store.head(&store.blob_key(digest)).await?.is_none() {
        return Err(StorageError::BlobUnknown(digest.clone()));
    }
    store.catalog_note(repo).await?;
    // Writing the empty link again costs one PUT, checking first one HEAD: just write.
    store
        .put(&store.layer_key(repo, digest), Bytes::new())
        .await
}

pub(super) async fn repo_blob_linked(
    store: &BucketStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<bool, StorageError> {
    Ok(store.head(&store.layer_key(repo, digest)).await?.is_some()
        && store.head(&store.blob_key(digest)).await?.is_some())
}

/// Digests named `<alg>/<hex>` under `rel`, sorted.
pub(super) async fn digests_under(
    store: &BucketStore,
    rel: &str,
) -> Result<Vec<Digest>, StorageError> {
    Ok(digests_aged_under(store, rel)
        .await?
        .into_iter()
        .map(|(d, _)| d)
        .collect())
}

/// As [`digests_under`], each with the time since its object was last written (from the
/// same LIST: no request per object).
pub(super) async fn digests_aged_under(
    store: &BucketStore,
    rel: &str,
) -> Result<Vec<(Digest, std::time::Duration)>, StorageError> {
    let mut out = Vec::new();
    for meta in store.list(rel).await? {
        let Some(tail) = store
            .rel(&meta.location)
            .and_then(|r| r.strip_prefix(rel))
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        let Some((alg, hex)) = tail.split_once('/') else {
            continue;
        };
        let Some(alg) = Algorithm::ALL.into_iter().find(|a| a.as_str() == alg) else {
            continue;
        };
        if let Ok(d) = Digest::new(alg, hex) {
            out.push((d, super::age_of(&meta)));
        }
    }
    out.sort();
    Ok(out)
}

pub(super) async fn repositories(store: &BucketStore) -> Result<Vec<RepositoryName>, StorageError> {
    let mut names = BTreeSet::new();
    for meta in store.list("repositories").await? {
        let Some(rel) = store
            .rel(&meta.location)
            .and_then(|r| r.strip_prefix("repositories/"))
        else {
            continue;
        };
        // The repository is everything before its first `_manifests` or `_layers` segment.
        let segs: Vec<&str> = rel.split('/').collect();
        if let Some(i) = segs
            .iter()
            .position(|s| *s == "_manifests" || *s == "_layers")
            && i > 0
            && let Ok(name) = segs[..i].join("/").parse::<RepositoryName>()
        {
            names.insert(name.as_str().to_owned());
        }
    }
    Ok(names.iter().filter_map(|n| n.parse().ok()).collect())
}

pub(super) async fn manifest_put(
    store: &BucketStore,
    repo: &RepositoryName,
    m: NewManifest<'_>,
) -> Result<(), StorageError> {
    // Held until the links are written, so gc in this process cannot sweep a blob checked
    // below; the lease (see `lock`) does that for gc in other processes.
    let _lock = store.maintenance.read().await;
    let timing = store.lock.timing;
    // Bounded: another round only when a gc's lease appeared while the references were checked.
    let mut rounds = 0;
    let free = loop {
        rounds += 1;
        let (free, _) = store.wait_lock_free(None).await?;
        check_references(store, repo, &m).await?;
        write_content(store, &m).await?;
        // Re-read the lock right before the final write if the reading is older than the TTL.
        if free.at.elapsed() < timing.cache_ttl {
            break free;
        }
        let (_, waited) = store.wait_lock_free(None).await?;
        if !waited {
            break free;
        }
        // A gc held the lock meanwhile: what was checked may be gone.
        if rounds >= 3 {
            return Err(StorageError::Unavailable(io::Error::other(
                "gc keeps taking the maintenance lock on this store; retry later",
            )));
        }
    };
    store.catalog_note(repo).await?;
    store
        .put(&store.layer_key(repo, m.digest), Bytes::new())
        .await?;
    let link = RevisionLink {
        media_type: m.media_type.to_owned(),
        subject: m.subject.as_ref().map(|(d, _)| (*d).clone()),
    };
    store
        .references_write(repo, m.digest, m.names, false)
        .await?;
    let raw = serde_json::to_vec(&link).map_err(io::Error::other)?;
    let revision = store.revision_key(repo, m.digest);
    store.put(&revision, raw.into()).await?;
    // A gc that took its lease after `free` marks only after the settle period, so it sees the
    // revision if it was written by then. Otherwise a gc may have marked before it and swept
    // since: check again, with a reading of the lock sent now.
    if free.at.elapsed() >= timing.settle() {
        let written = std::time::Instant::now();
        let confirmed = async {
            store.wait_lock_free(Some(written)).await?;
            check_references(store, repo, &m).await?;
            if store.head(&store.blob_key(m.digest)).await?.is_none() {
                return Err(StorageError::ReferencedBlobUnknown(m.digest.clone()));
            }
            // `gc --delete-untagged` may have marked before this push re-wrote the revision
            // and removed it as untagged; the tag below must not point at nothing. The client
            // retries after a 503.
            if store.head(&revision).await?.is_none() {
                return Err(StorageError::Unavailable(io::Error::other(
                    "a concurrent gc removed this manifest while it was pushed; push it again",
                )));
            }
            Ok(())
        }
        .await;
        if let Err(e) = confirmed {
            tracing::warn!(repository = %repo, digest = %m.digest, error = %e, "withdrawing a manifest whose blobs a concurrent gc may have removed");
            store.delete(&revision).await?;
            store.references_remove(repo, m.digest).await?;
            return Err(e);
        }
    }
    if let Some((subject, desc)) = &m.subject {
        let raw = serde_json::to_vec(desc).map_err(io::Error::other)?;
        store
            .put(&store.referrer_key(repo, subject, m.digest), raw.into())
            .await?;
    }
    // The tag last: it never points at a manifest that is not whole. It carries the media
    // type too, so a GET by tag needs no revision read (a tag exists only while its revision
    // does: written after it, deleted before it).
    if let Some(tag) = m.tag {
        let link = format!("{}\n{}", m.digest, m.media_type);
        store
            .put(&store.tag_key(repo, tag), Bytes::from(link))
            .await?;
    }
    store.manifests.insert(m.digest, &m.content);
    store.writes.record(repo, m.digest);
    Ok(())
}

/// Every blob and child manifest `m` references is in `repo`.
async fn check_references(
    store: &BucketStore,
    repo: &RepositoryName,
    m: &NewManifest<'_>,
) -> Result<(), StorageError> {
    for b in m.blobs {
        if !repo_blob_linked(store, repo, b).await? {
            return Err(StorageError::ReferencedBlobUnknown(b.clone()));
        }
    }
    for child in m.manifests {
        if store
            .head(&store.revision_key(repo, child))
            .await?
            .is_none()
        {
            return Err(StorageError::ReferencedManifestUnknown(child.clone()));
        }
    }
    Ok(())
}

/// Stores the manifest's content as a blob (left alone if it is there: the same bytes).
async fn write_content(store: &BucketStore, m: &NewManifest<'_>) -> Result<(), StorageError> {
    // Content-addressed: a conditional create is one request where HEAD-then-PUT is two, and
    // an existing object (the same bytes) is left alone.
    let blob = store.blob_key(m.digest);
    let create = PutOptions::from(PutMode::Create);
    match store
        .store
        .put_opts(&blob, PutPayload::from_bytes(m.content.clone()), create)
        .await
    {
        Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => {}
        // A store without conditional writes (an S3 server with them switched off).
        Err(object_store::Error::NotImplemented { .. }) => {
            if store.head(&blob).await?.is_none() {
                store.put(&blob, m.content.clone()).await?;
            }
        }
        Err(e) => return Err(os_err(e)),
    }
    Ok(())
}

async fn read_revision(
    store: &BucketStore,
    repo: &RepositoryName,
    d: &Digest,
) -> Result<RevisionLink, StorageError> {
    let raw = store
        .get_small(&store.revision_key(repo, d), MAX_LINK_READ)
        .await?
        .ok_or(StorageError::ManifestUnknown)?;
    serde_json::from_slice(&raw).map_err(|e| corrupt("revision link", e))
}

/// The content of manifest `d`, from memory when this process has seen it.
async fn manifest_content(store: &BucketStore, d: &Digest) -> Result<Bytes, StorageError> {
    if let Some(c) = store.manifests.get(d) {
        return Ok(c);
    }
    let content = store
        .get_small(&store.blob_key(d), MAX_MANIFEST_READ)
        .await?
        .ok_or(StorageError::ManifestUnknown)?;
    // Only verified content is kept: a damaged object must not outlive its repair.
    if digest_of(d.algorithm(), &content) == *d {
        store.manifests.insert(d, &content);
    }
    Ok(content)
}

pub(super) async fn read_manifest(
    store: &BucketStore,
    repo: &RepositoryName,
    d: &Digest,
) -> Result<StoredManifest, StorageError> {
    let link = read_revision(store, repo, d).await?;
    Ok(StoredManifest {
        digest: d.clone(),
        media_type: link.media_type,
        content: manifest_content(store, d).await?,
    })
}

/// A tag object: the digest, then (since tags carry it) the manifest's media type.
fn parse_tag_link(raw: &[u8]) -> Result<(Digest, Option<String>), StorageError> {
    let text = std::str::from_utf8(raw).map_err(|e| corrupt("tag link", e))?;
    let mut lines = text.lines();
    let d = lines
        .next()
        .unwrap_or_default()
        .trim()
        .parse()
        .map_err(|e| corrupt("tag link", e))?;
    let media_type = lines
        .next()
        .map(str::trim)
        .filter(|m| !m.is_empty())
        .map(str::to_owned);
    Ok((d, media_type))
}

pub(super) async fn manifest_by_tag(
    store: &BucketStore,
    repo: &RepositoryName,
    tag: &Tag,
) -> Result<StoredManifest, StorageError> {
    let raw = store
        .get_small(&store.tag_key(repo, tag), MAX_LINK_READ)
        .await?
        .ok_or(StorageError::ManifestUnknown)?;
    match parse_tag_link(&raw)? {
        (d, Some(media_type)) => Ok(StoredManifest {
            content: manifest_content(store, &d).await?,
            digest: d,
            media_type,
        }),
        // Written before tags carried the media type.
        (d, None) => read_manifest(store, repo, &d).await,
    }
}

pub(super) async fn manifest_delete(
    store: &BucketStore,
    repo: &RepositoryName,
    d: &Digest,
) -> Result<Vec<String>, StorageError> {
    let link = read_revision(store, repo, d).await?;
    // Tags first: a crash part way leaves a manifest without tags, never a dangling tag.
    let tags_rel = format!("{}/_manifests/tags", BucketStore::repo_rel(repo));
    let mut removed = Vec::new();
    for meta in store.list(&tags_rel).await? {
        if let Some(raw) = store.get_small(&meta.location, MAX_LINK_READ).await?
            && parse_tag_link(&raw).is_ok_and(|(t, _)| t == *d)
        {
            store.delete(&meta.location).await?;
            removed.extend(meta.location.filename().map(str::to_owned));
        }
    }
    removed.sort();
    if let Some(subject) = link.subject {
        store.delete(&store.referrer_key(repo, &subject, d)).await?;
    }
    store.delete(&store.revision_key(repo, d)).await?;
    store.references_remove(repo, d).await?;
    Ok(removed)
}

/// Whether `repo` holds anything (one LIST with a delimiter).
async fn repo_exists(store: &BucketStore, repo: &RepositoryName) -> Result<bool, StorageError> {
    let top = store
        .store
        .list_with_delimiter(Some(&store.key(&BucketStore::repo_rel(repo))))
        .await
        .map_err(os_err)?;
    Ok(!(top.common_prefixes.is_empty() && top.objects.is_empty()))
}

pub(super) async fn tags(
    store: &BucketStore,
    repo: &RepositoryName,
) -> Result<Vec<String>, StorageError> {
    let repo_rel = BucketStore::repo_rel(repo);
    if !repo_exists(store, repo).await? {
        return Err(StorageError::RepositoryUnknown);
    }
    let listed = store
        .store
        .list_with_delimiter(Some(&store.key(&format!("{repo_rel}/_manifests/tags"))))
        .await
        .map_err(os_err)?;
    let mut names: Vec<String> = listed
        .objects
        .iter()
        .filter_map(|m| m.location.filename().map(str::to_owned))
        .filter(|n| n.parse::<Tag>().is_ok())
        .collect();
    names.sort();
    Ok(names)
}

/// Up to `limit` tags after `after`: a listing that starts after `after`'s key and stops
/// once the page is full (tag objects are flat and their keys sort as the tags do).
pub(super) async fn tags_page(
    store: &BucketStore,
    repo: &RepositoryName,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<String>, StorageError> {
    let rel = format!("{}/_manifests/tags", BucketStore::repo_rel(repo));
    let prefix = store.key(&rel);
    let mut listing = match after {
        Some(a) if a.parse::<Tag>().is_ok() => store
            .store
            .list_with_offset(Some(&prefix), &store.key(&format!("{rel}/{a}"))),
        // Not a tag, so not a key to start after: the whole listing, filtered below.
        _ => store.store.list(Some(&prefix)),
    };
    let mut out = Vec::new();
    while out.len() < limit
        && let Some(meta) = listing.next().await
    {
        let meta = meta.map_err(os_err)?;
        let Some(name) = store
            .rel(&meta.location)
            .and_then(|r| r.strip_prefix(rel.as_str()))
            .and_then(|r| r.strip_prefix('/'))
        else {
            continue;
        };
        if name.contains('/') || name.parse::<Tag>().is_err() || after.is_some_and(|a| name <= a) {
            continue;
        }
        out.push(name.to_owned());
    }
    // Only an empty page needs to tell an empty repository from an unknown one.
    if out.is_empty() && !repo_exists(store, repo).await? {
        return Err(StorageError::RepositoryUnknown);
    }
    Ok(out)
}

pub(super) async fn referrers(
    store: &BucketStore,
    repo: &RepositoryName,
    subject: &Digest,
) -> Result<Vec<Descriptor>, StorageError> {
    let rel = format!(
        "{}/_referrers/{}/{}",
        BucketStore::repo_rel(repo),
        subject.algorithm().as_str(),
        subject.hex()
    );
    let mut out = Vec::new();
    for meta in store.list(&rel).await? {
        let Some(raw) = store.get_small(&meta.location, MAX_LINK_READ).await? else {
            continue;
        };
        let Ok(desc) = serde_json::from_slice::<Descriptor>(&raw) else {
            tracing::warn!(key = %meta.location, "skipping unreadable referrer link");
            continue;
        };
        // A referrer whose manifest was deleted concurrently is not listed.
        if store
            .head(&store.revision_key(repo, &desc.digest))
            .await?
            .is_some()
        {
            out.push(desc);
        }
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use object_store::memory::InMemory;
    use outpost_core::Algorithm;

    use super::*;
    use crate::storage::Store;

    const MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";

    async fn stored(store: &BucketStore, repo: &RepositoryName, tag: &Tag) -> Digest {
        let content = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let digest = digest_of(Algorithm::Sha256, &content);
        let m = NewManifest {
            digest: &digest,
            media_type: MEDIA,
            content,
            blobs: &[],
            manifests: &[],
            names: &[],
            tag: Some(tag),
            subject: None,
        };
        store.manifest_put(repo, m).await.expect("put");
        digest
    }

    #[tokio::test]
    async fn tags_written_before_they_carried_the_media_type_still_resolve() {
        let store = BucketStore::new(Arc::new(InMemory::new()), "p");
        let repo: RepositoryName = "a/b".parse().expect("repo");
        let tag: Tag = "v1".parse().expect("tag");
        let d = stored(&store, &repo, &tag).await;
        let got = store.manifest_by_tag(&repo, &tag).await.expect("by tag");
        assert_eq!(
            (got.digest.clone(), got.media_type.as_str()),
            (d.clone(), MEDIA)
        );

        // The stage-1 format: the digest alone; the media type comes from the revision, and a
        // fresh process (empty cache) reads the content from the store.
        let old = BucketStore::new(store.store.clone(), "p");
        old.put(&old.tag_key(&repo, &tag), Bytes::from(d.to_string()))
            .await
            .expect("put old tag");
        let got = old.manifest_by_tag(&repo, &tag).await.expect("old tag");
        assert_eq!((got.digest, got.media_type.as_str()), (d.clone(), MEDIA));
        assert_eq!(got.content, Bytes::from_static(br#"{"schemaVersion":2}"#));

        // Deleting the manifest removes the old-format tag too.
        old.manifest_delete(&repo, &d).await.expect("delete");
        assert!(matches!(
            old.manifest_by_tag(&repo, &tag).await,
            Err(StorageError::ManifestUnknown)
        ));
    }

    #[test]
    fn damaged_tag_links_are_errors_not_panics() {
        for raw in [&b""[..], b"\n", b"sha256:zz", b"\xff\xfe"] {
            assert!(parse_tag_link(raw).is_err(), "{raw:?}");
        }
        let (d, m) = parse_tag_link(format!("sha256:{}\n", "a".repeat(64)).as_bytes())
            .expect("digest alone");
        assert_eq!((d.hex().len(), m), (64, None));
    }
}
