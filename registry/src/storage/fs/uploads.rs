//! Upload sessions: `uploads/<id>/data` and `uploads/<id>/state.json`.

use std::fs::{self, File};
use std::io::{self, Seek, SeekFrom};
use std::sync::Arc;
use std::time::Duration;

use outpost_core::{Algorithm, Digest, RepositoryName};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncSeekExt, AsyncWriteExt};

use super::FsStore;
use super::blobs::{blob_stream, write_stream};
use super::files::*;
use crate::storage::hash::Hasher;
use crate::storage::{ByteStream, StorageError, UploadStatus};

#[derive(Serialize, Deserialize)]
pub(super) struct UploadState {
    repo: String,
    offset: u64,
}

/// In-memory running hash of an upload, valid while `offset` matches the committed offset.
pub(super) struct UploadProgress {
    offset: u64,
    hasher: Option<Hasher>,
}

pub(super) fn valid_upload_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl FsStore {
    pub(super) fn load_upload(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadState, StorageError> {
        if !valid_upload_id(id) {
            return Err(StorageError::UploadUnknown);
        }
        let raw = not_found_to(
            fs::read(self.upload_dir(id).join("state.json")),
            StorageError::UploadUnknown,
        )?;
        let st: UploadState =
            serde_json::from_slice(&raw).map_err(|e| StorageError::Io(io::Error::other(e)))?;
        if st.repo != repo.as_str() {
            return Err(StorageError::UploadUnknown);
        }
        Ok(st)
    }

    /// [`Self::load_upload`] off the async threads.
    pub(super) async fn load_upload_async(
        &self,
        repo: &RepositoryName,
        id: &str,
    ) -> Result<UploadState, StorageError> {
        let (store, repo, id) = (self.handle(), repo.clone(), id.to_owned());
        blocking(move || store.load_upload(&repo, &id)).await
    }

    pub(super) fn save_upload(&self, id: &str, st: &UploadState) -> io::Result<()> {
        let raw = serde_json::to_vec(st).map_err(io::Error::other)?;
        self.write_atomic(&self.upload_dir(id).join("state.json"), &raw)
    }

    pub(super) fn upload_lock(&self, id: &str) -> Arc<tokio::sync::Mutex<UploadProgress>> {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(UploadProgress {
                    offset: 0,
                    hasher: None,
                }))
            })
            .clone()
    }

    pub(super) fn forget_upload(&self, id: &str) {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }
}

pub(super) async fn upload_start(
    store: &FsStore,
    repo: &RepositoryName,
) -> Result<String, StorageError> {
    let store = store.handle();
    let repo = repo.clone();
    blocking(move || {
        let id = random_id();
        let dir = store.upload_dir(&id);
        fs::create_dir_all(&dir)?;
        File::create(dir.join("data"))?;
        store.save_upload(
            &id,
            &UploadState {
                repo: repo.as_str().to_owned(),
                offset: 0,
            },
        )?;
        Ok(id)
    })
    .await
}

pub(super) async fn upload_status(
    store: &FsStore,
    repo: &RepositoryName,
    id: &str,
) -> Result<UploadStatus, StorageError> {
    let store = store.handle();
    let (repo, id) = (repo.clone(), id.to_owned());
    blocking(move || {
        let st = store.load_upload(&repo, &id)?;
        Ok(UploadStatus { offset: st.offset })
    })
    .await
}

pub(super) async fn upload_read(
    store: &FsStore,
    repo: &RepositoryName,
    id: &str,
    offset: u64,
) -> Result<ByteStream, StorageError> {
    let store = store.handle();
    let (repo, id) = (repo.clone(), id.to_owned());
    blocking(move || {
        store.load_upload(&repo, &id)?;
        let mut file = not_found_to(
            File::open(store.upload_dir(&id).join("data")),
            StorageError::UploadUnknown,
        )?;
        let len = file.metadata()?.len();
        if offset > 0 {
            file.seek(SeekFrom::Start(offset.min(len)))?;
        }
        Ok(blob_stream(file, len.saturating_sub(offset)))
    })
    .await
}

pub(super) async fn upload_append(
    store: &FsStore,
    repo: &RepositoryName,
    id: &str,
    start: Option<u64>,
    body: ByteStream,
) -> Result<UploadStatus, StorageError> {
    let lock = store.upload_lock(id);
    let mut progress = lock.lock().await;
    let st = store.load_upload_async(repo, id).await?;
    if let Some(s) = start
        && s != st.offset
    {
        return Err(StorageError::RangeMismatch {
            requested: s,
            offset: st.offset,
        });
    }
    let data = store.upload_dir(id).join("data");
    let committed = st.offset;
    let std_file = blocking(move || {
        let f = File::options().write(true).open(&data)?;
        // Bytes past the committed offset are from a chunk that never completed.
        f.set_len(committed)?;
        Ok(f)
    })
    .await?;
    let mut file = tokio::fs::File::from_std(std_file);
    file.seek(SeekFrom::Start(st.offset)).await?;
    if progress.offset != st.offset || progress.hasher.is_none() {
        progress.hasher = (st.offset == 0).then(|| Hasher::new(Algorithm::Sha256));
        progress.offset = st.offset;
    }
    let (written, res) = write_stream(&mut file, body, &mut progress.hasher).await;
    file.flush().await?;
    file.sync_data().await?;
    drop(file);
    // Whatever arrived is kept, even from a chunk cut short, so a client can resume from it.
    let offset = st.offset + written;
    let (store, id2) = (store.handle(), id.to_owned());
    let state = UploadState {
        repo: st.repo,
        offset,
    };
    blocking(move || Ok(store.save_upload(&id2, &state)?)).await?;
    progress.offset = offset;
    res?;
    Ok(UploadStatus { offset })
}

pub(super) async fn upload_finish(
    store: &FsStore,
    repo: &RepositoryName,
    id: &str,
    digest: &Digest,
) -> Result<u64, StorageError> {
    let lock = store.upload_lock(id);
    let mut progress = lock.lock().await;
    let st = store.load_upload_async(repo, id).await?;
    let data = store.upload_dir(id).join("data");
    let running = match progress.hasher.take() {
        Some(h) if progress.offset == st.offset && h.algorithm() == digest.algorithm() => {
            Some(h.finish())
        }
        _ => None,
    };
    progress.offset = u64::MAX;
    let handle = store.handle();
    let (repo, id2, d) = (repo.clone(), id.to_owned(), digest.clone());
    let result = blocking(move || {
        let f = File::options().write(true).open(&data)?;
        f.set_len(st.offset)?;
        f.sync_all()?;
        drop(f);
        let actual = match running {
            Some(a) => a,
            None => hash_file(&data, d.algorithm(), st.offset)?,
        };
        if actual != d {
            return Err(StorageError::DigestMismatch { expected: d });
        }
        handle.commit_blob(&data, &d, st.offset)?;
        handle.write_atomic(&handle.layer_link(&repo, &d), b"")?;
        fs::remove_dir_all(handle.upload_dir(&id2))?;
        Ok(st.offset)
    })
    .await;
    if result.is_ok() {
        store.forget_upload(id);
    }
    result
}

pub(super) async fn upload_cancel(
    store: &FsStore,
    repo: &RepositoryName,
    id: &str,
) -> Result<(), StorageError> {
    let lock = store.upload_lock(id);
    let _guard = lock.lock().await;
    store.load_upload_async(repo, id).await?;
    let dir = store.upload_dir(id);
    blocking(move || Ok(fs::remove_dir_all(dir)?)).await?;
    store.forget_upload(id);
    Ok(())
}

pub(super) async fn upload_expire(store: &FsStore, idle: Duration) -> Result<usize, StorageError> {
    let dir = store.root.join("uploads");
    let d2 = dir.clone();
    // (id, idle for) of every session on disk.
    let sessions = blocking(move || {
        let mut out = Vec::new();
        for id in list_names(&d2)? {
            if !valid_upload_id(&id) {
                continue;
            }
            let path = d2.join(&id);
            let idle_for = fs::metadata(path.join("state.json"))
                .or_else(|_| fs::metadata(&path))
                .map(|m| age_of(&m))
                .unwrap_or_default();
            out.push((id, idle_for));
        }
        Ok(out)
    })
    .await?;
    let mut removed = 0;
    for (id, idle_for) in sessions {
        let lock = store.upload_lock(&id);
        // A session in use right now is not idle.
        let Ok(_guard) = lock.try_lock() else {
            continue;
        };
        let path = dir.join(&id);
        if idle_for >= idle {
            let p = path.clone();
            blocking(move || Ok(fs::remove_dir_all(p)?)).await?;
            removed += 1;
            drop(_guard);
            store.forget_upload(&id);
        }
    }
    Ok(removed)
}
