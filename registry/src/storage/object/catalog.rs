//! The catalog index: one empty object per repository, `catalog/<hex of its name>`.
//!
//! Why an index here and not a walk as on disk: a listing of `repositories/` returns every
//! link, revision and tag object of every repository (tens per repository), and a listing with
//! a delimiter returns a whole level with no way to start part way; either makes each catalog
//! page read the whole store. The index is flat, and hex keeps byte order (each byte becomes
//! two digits of the same order), so its keys sort exactly as the names do, nested ones
//! included (`a` < `a-b` < `a/b`), and a listing that starts after `last`'s key
//! (`list_with_offset`: S3's `start-after`, Azure's `startFrom`) and stops after `n` reads one
//! page. Hex also keeps `/` out of the keys, so no key is both an object and a folder.
//!
//! An entry is written before a repository's first link or manifest (once per process and
//! repository: later writes skip it), and never removed, like a repository's folder on disk:
//! a repository whose content is all deleted stays listed. A store written before the index
//! existed gets it built from one full listing at the first catalog request; `catalog.json`
//! marks it complete.

use std::collections::HashSet;
use std::sync::Mutex;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path as Key;
use outpost_core::RepositoryName;

use super::{BucketStore, os_err};
use crate::storage::StorageError;

/// Marks the index complete (its content is informational).
const READY_KEY: &str = "catalog.json";
/// Entries written at once while building the index of an existing store.
const BUILD_CONCURRENCY: usize = 16;

#[derive(Default)]
pub(super) struct Catalog {
    /// Repositories whose entry this process wrote or saw written.
    known: Mutex<HashSet<String>>,
    /// Set once the index is known complete.
    ready: tokio::sync::OnceCell<()>,
}

impl Catalog {
    fn known(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.known.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn hex(name: &str) -> String {
    name.bytes().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<String> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    let bytes = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    String::from_utf8(bytes).ok()
}

impl BucketStore {
    fn catalog_key(&self, name: &str) -> Key {
        self.key(&format!("catalog/{}", hex(name)))
    }

    /// Makes sure `repo` has its index entry (one PUT the first time in this process).
    pub(super) async fn catalog_note(&self, repo: &RepositoryName) -> Result<(), StorageError> {
        if self.catalog.known().contains(repo.as_str()) {
            return Ok(());
        }
        self.put(&self.catalog_key(repo.as_str()), Bytes::new())
            .await?;
        self.catalog.known().insert(repo.as_str().to_owned());
        Ok(())
    }

    /// Builds the index from a full listing if no process has yet.
    async fn catalog_ready(&self) -> Result<(), StorageError> {
        self.catalog
            .ready
            .get_or_try_init(|| async {
                if self.head(&self.key(READY_KEY)).await?.is_some() {
                    return Ok(());
                }
                let repos = super::manifests::repositories(self).await?;
                tracing::info!(
                    repositories = repos.len(),
                    "building the catalog index of the object store"
                );
                futures_util::stream::iter(repos)
                    .map(|r| async move { self.catalog_note(&r).await })
                    .buffer_unordered(BUILD_CONCURRENCY)
                    .try_collect::<()>()
                    .await?;
                self.put(
                    &self.key(READY_KEY),
                    Bytes::from_static(b"{\"version\":1}\n"),
                )
                .await
            })
            .await
            .map(|_| ())
    }

    /// Up to `limit` repositories after `after`, from the index: one LIST request per 1000.
    pub(super) async fn catalog_page(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RepositoryName>, StorageError> {
        self.catalog_ready().await?;
        let prefix = self.key("catalog");
        let mut listing = match after {
            Some(a) => self
                .store
                .list_with_offset(Some(&prefix), &self.catalog_key(a)),
            None => self.store.list(Some(&prefix)),
        };
        let mut out = Vec::new();
        while out.len() < limit
            && let Some(meta) = listing.next().await
        {
            let meta = meta.map_err(os_err)?;
            let Some(name) = meta.location.filename().and_then(unhex) else {
                continue;
            };
            // The store's order is the names' order; this only guards a store that ignored
            // the offset.
            if after.is_some_and(|a| name.as_str() <= a) {
                continue;
            }
            if let Ok(r) = name.parse::<RepositoryName>() {
                out.push(r);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_keeps_the_order_of_names() {
        let mut names = vec!["ab", "a/b/c", "a", "a-b", "a/b", "a.b", "a_b", "a0"];
        let mut keys: Vec<String> = names.iter().map(|n| hex(n)).collect();
        names.sort_unstable();
        keys.sort_unstable();
        let back: Vec<String> = keys.iter().filter_map(|k| unhex(k)).collect();
        assert_eq!(back, names);
        assert_eq!(unhex("6"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("ff"), None, "not UTF-8");
    }
}
