//! Documents (see [`crate::storage::docs`]): files under `sync/`, replaced through a temp file
//! beside them, fsync and rename.

use std::fs;
use std::io::{self, Read};
use std::path::PathBuf;

use bytes::Bytes;

use super::FsStore;
use super::files::*;
use crate::storage::StorageError;
use crate::storage::docs::{self, DOC_MAX_BYTES, DOC_ROOT, DocVersion};
use crate::storage::hash::digest_of;

impl FsStore {
    fn doc_path(&self, key: &str) -> PathBuf {
        let mut p = self.root.join(DOC_ROOT);
        for seg in key.split('/') {
            p.push(seg);
        }
        p
    }
}

pub(super) async fn doc_get(store: &FsStore, key: &str) -> Result<Option<Bytes>, StorageError> {
    docs::check_key(key)?;
    let path = store.doc_path(key);
    blocking(move || {
        let f = match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let mut buf = Vec::new();
        f.take(DOC_MAX_BYTES + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > DOC_MAX_BYTES {
            return Err(StorageError::Io(io::Error::other(format!(
                "document {} is larger than {DOC_MAX_BYTES} bytes",
                path.display()
            ))));
        }
        Ok(Some(Bytes::from(buf)))
    })
    .await
}

pub(super) async fn doc_put(store: &FsStore, key: &str, data: Bytes) -> Result<(), StorageError> {
    docs::check_key(key)?;
    let path = store.doc_path(key);
    blocking(move || {
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        // Only the registry reads these; some name images and tags of private repositories.
        Ok(write_file_atomic(&path, &data, 0o600)?)
    })
    .await
}

pub(super) async fn doc_delete(store: &FsStore, key: &str) -> Result<(), StorageError> {
    docs::check_key(key)?;
    let path = store.doc_path(key);
    blocking(move || {
        if remove_file_if_exists(&path)?
            && let Some(dir) = path.parent()
        {
            // A removed outbox entry must stay removed after a crash.
            sync_dir(dir)?;
        }
        Ok(())
    })
    .await
}

pub(super) async fn doc_list(store: &FsStore, dir: &str) -> Result<Vec<String>, StorageError> {
    docs::check_dir(dir)?;
    let path = if dir.is_empty() {
        store.root.join(DOC_ROOT)
    } else {
        store.doc_path(dir)
    };
    let dir = dir.to_owned();
    blocking(move || {
        let mut out = Vec::new();
        for name in list_names(&path)? {
            // Temp files of an interrupted write and sub-folders are not documents.
            if !docs::is_doc_name(&name) {
                continue;
            }
            match fs::metadata(path.join(&name)) {
                Ok(m) if m.is_file() => out.push(docs::join(&dir, &name)),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        out.sort();
        Ok(out)
    })
    .await
}

/// One conditional write at a time in this process: a directory has one serving process (its
/// lock), so this makes the read-compare-write atomic.
static CONDITIONAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn version_of(data: &[u8]) -> DocVersion {
    DocVersion::new(digest_of(outpost_core::Algorithm::Sha256, data).to_string())
}

pub(super) async fn doc_get_versioned(
    store: &FsStore,
    key: &str,
) -> Result<Option<(Bytes, DocVersion)>, StorageError> {
    Ok(doc_get(store, key).await?.map(|b| {
        let v = version_of(&b);
        (b, v)
    }))
}

pub(super) async fn doc_put_if(
    store: &FsStore,
    key: &str,
    data: Bytes,
    expected: Option<&DocVersion>,
) -> Result<Option<DocVersion>, StorageError> {
    let _one = CONDITIONAL.lock().await;
    let current = doc_get(store, key).await?.map(|b| version_of(&b));
    if current.as_ref() != expected {
        return Ok(None);
    }
    let version = version_of(&data);
    doc_put(store, key, data).await?;
    Ok(Some(version))
}
