//! The reference index: which manifests name each blob and child manifest, so retention can
//! tell what an eviction frees by asking about those digests only, never reading the store.
//!
//! ```text
//! references/<alg>/<hex[..2]>/<hex>/<repository, / as +>/<alg>-<manifest hex>   empty
//! repositories/<name>/_manifests/references/<alg>/<hex>    what the manifest names, a line each
//! ```
//! A manifest's entries, then its record, are written before its revision link; its record,
//! then its entries, are removed after it. So a stored manifest is always in the index, and a
//! crash part way leaves at worst an entry for a manifest that is gone, which keeps a blob
//! from eviction (gc still removes the blob).

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

use outpost_core::{Digest, RepositoryName};

use super::FsStore;
use super::files::*;
use crate::storage::{StorageError, repo_segment};

impl FsStore {
    /// The folder of `target`'s entries (one sub-folder per repository).
    fn references_dir(&self, target: &Digest) -> PathBuf {
        self.root
            .join("references")
            .join(target.algorithm().as_str())
            .join(&target.hex()[..2])
            .join(target.hex())
    }

    fn reference_entry(&self, target: &Digest, repo: &RepositoryName, m: &Digest) -> PathBuf {
        self.references_dir(target)
            .join(repo_segment(repo))
            .join(format!("{}-{}", m.algorithm(), m.hex()))
    }

    fn reference_record(&self, repo: &RepositoryName, d: &Digest) -> PathBuf {
        self.repo_dir(repo)
            .join("_manifests/references")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    /// Writes manifest `m`'s entries, then its record, durably, before its revision link.
    /// `again`: each entry even if the record exists (recording on request repairs lost
    /// entries; a push, whose record says its entries are there, writes nothing more).
    pub(super) fn references_write(
        &self,
        repo: &RepositoryName,
        m: &Digest,
        targets: &[Digest],
        again: bool,
    ) -> io::Result<()> {
        let record_path = self.reference_record(repo, m);
        // The record is written last, so one that exists has all its entries (what a manifest
        // names follows from its content: a second push of it has nothing to add).
        if !again && exists(&record_path)? {
            return Ok(());
        }
        for t in targets {
            let entry = self.reference_entry(t, repo, m);
            if exists(&entry)? {
                continue;
            }
            let dir = entry
                .parent()
                .ok_or_else(|| io::Error::other("reference entry has no parent"))?;
            fs::create_dir_all(dir)?;
            // Empty: the name is the content, so the directory's fsync makes it durable.
            File::create(&entry)?;
            sync_dir(dir)?;
        }
        let record: String = targets.iter().map(|t| format!("{t}\n")).collect();
        self.write_atomic(&record_path, record.as_bytes())
    }

    /// Removes manifest `m`'s record, then its entries, once its revision link is gone. A
    /// manifest stored before the index was kept has no record: nothing to remove.
    pub(super) fn references_remove(&self, repo: &RepositoryName, m: &Digest) -> io::Result<()> {
        let path = self.reference_record(repo, m);
        let raw = match fs::read_to_string(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        // The record first: a crash part way leaves entries without one, which keep blobs
        // (never a record whose entries are gone, which a push of the manifest would trust).
        remove_file_if_exists(&path)?;
        for t in raw.lines().filter_map(|l| l.trim().parse::<Digest>().ok()) {
            remove_file_if_exists(&self.reference_entry(&t, repo, m))?;
        }
        Ok(())
    }
}

/// Whether `dir` holds any entry (a folder left empty by removals holds none).
fn has_entry(dir: &Path) -> io::Result<bool> {
    match fs::read_dir(dir) {
        Ok(mut rd) => Ok(rd.next().transpose()?.is_some()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

pub(super) async fn referenced(
    store: &FsStore,
    target: &Digest,
    repo: Option<&RepositoryName>,
) -> Result<bool, StorageError> {
    let dir = store.references_dir(target);
    let only = repo.map(repo_segment);
    blocking(move || {
        if let Some(seg) = only {
            return Ok(has_entry(&dir.join(seg))?);
        }
        // Read lazily: a base layer has a folder for every repository naming it, and the
        // first that is not empty answers.
        let segments = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e.into()),
        };
        for seg in segments {
            if has_entry(&seg?.path())? {
                return Ok(true);
            }
        }
        Ok(false)
    })
    .await
}

pub(super) async fn references_record(
    store: &FsStore,
    repo: &RepositoryName,
    digest: &Digest,
    targets: &[Digest],
) -> Result<bool, StorageError> {
    let store = store.handle();
    let (repo, digest, targets) = (repo.clone(), digest.clone(), targets.to_vec());
    blocking(move || {
        // As a manifest write: gc does not sweep meanwhile.
        let _lock = store.lock_file(false)?;
        if !exists(&store.revision_link(&repo, &digest))? {
            return Ok(false);
        }
        store.references_write(&repo, &digest, &targets, true)?;
        // Deleted meanwhile (deletes take no lock): undo, so no entry outlives it.
        if !exists(&store.revision_link(&repo, &digest))? {
            store.references_remove(&repo, &digest)?;
            return Ok(false);
        }
        Ok(true)
    })
    .await
}
