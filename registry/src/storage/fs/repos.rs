//! Per-repository blob links (`_layers`) and the repository list.

use std::io::{self};
use std::path::Path;

use outpost_core::{Algorithm, Digest, RepositoryName};

use super::FsStore;
use super::files::*;
use crate::storage::StorageError;

impl FsStore {
    pub(super) fn digests_in(dir: &Path) -> io::Result<Vec<Digest>> {
        let mut out = Vec::new();
        for alg in Algorithm::ALL {
            for hex in list_names(&dir.join(alg.as_str()))? {
                if let Ok(d) = Digest::new(alg, &hex) {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }
}

pub(super) async fn repo_blob_link(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<(), StorageError> {
    let (link, blob) = (store.layer_link(repo, digest), store.blob_path(digest));
    let d = digest.clone();
    let store = store.handle();
    blocking(move || {
        if !exists(&blob)? {
            return Err(StorageError::BlobUnknown(d));
        }
        if !exists(&link)? {
            store.write_atomic(&link, b"")?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn repo_blob_linked(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<bool, StorageError> {
    let (link, blob) = (store.layer_link(repo, digest), store.blob_path(digest));
    blocking(move || Ok(exists(&link)? && exists(&blob)?)).await
}

pub(super) async fn repo_blob_unlink(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
) -> Result<bool, StorageError> {
    let link = store.layer_link(repo, digest);
    blocking(move || Ok(remove_file_if_exists(&link)?)).await
}

pub(super) async fn repo_blob_links(
    store: &FsStore,
    repo: &RepositoryName,
) -> Result<Vec<Digest>, StorageError> {
    let dir = store.repo_dir(repo).join("_layers");
    blocking(move || Ok(FsStore::digests_in(&dir)?)).await
}

pub(super) async fn repositories_page(
    store: &FsStore,
    after: Option<&str>,
    limit: usize,
) -> Result<Vec<RepositoryName>, StorageError> {
    let dir = store.root.join("repositories");
    let cache = store.dirs.clone();
    let after = after.map(str::to_owned);
    blocking(move || {
        let names = super::listing::repositories_page(&cache, &dir, after.as_deref(), limit)?;
        // The walk returns only names that parse.
        Ok(names.iter().filter_map(|n| n.parse().ok()).collect())
    })
    .await
}
