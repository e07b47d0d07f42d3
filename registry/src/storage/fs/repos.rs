//! Per-repository blob links (`_layers`) and the repository list.

use std::io::{self};
use std::path::Path;

use outpost_core::{Algorithm, Digest, RepositoryName};

use super::FsStore;
use super::files::*;
use crate::storage::StorageError;

impl FsStore {
    pub(super) fn repositories_under(
        dir: &Path,
        prefix: &str,
        out: &mut Vec<String>,
    ) -> io::Result<()> {
        let mut is_repo = false;
        for name in list_names(dir)? {
            if name.starts_with('_') {
                is_repo |= name == "_manifests" || name == "_layers";
                continue;
            }
            let child = dir.join(&name);
            if child.is_dir() {
                let full = if prefix.is_empty() {
                    name
                } else {
                    format!("{prefix}/{name}")
                };
                Self::repositories_under(&child, &full, out)?;
            }
        }
        if is_repo && !prefix.is_empty() {
            out.push(prefix.to_owned());
        }
        Ok(())
    }

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

pub(super) async fn repositories(store: &FsStore) -> Result<Vec<RepositoryName>, StorageError> {
    let dir = store.root.join("repositories");
    blocking(move || {
        let mut names = Vec::new();
        FsStore::repositories_under(&dir, "", &mut names)?;
        let mut repos: Vec<RepositoryName> = names.iter().filter_map(|n| n.parse().ok()).collect();
        repos.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        Ok(repos)
    })
    .await
}
