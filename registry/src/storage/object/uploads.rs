//! Upload sessions as objects: `uploads/<id>/state.json` (repository, durable offset, parts)
//! and `uploads/<id>/parts/<start>` (the bytes from offset `start`). Every part but the last
//! holds at least [`MIN_PART`] bytes: a smaller last part is read back and rewritten with the
//! next chunk's bytes, so small PATCHes do not become thousands of tiny objects. Any process
//! can continue a session; the finished blob is hashed while it is uploaded (multipart) to its
//! content-addressed key and appears only if the digest matched.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStore};
use outpost_core::{Algorithm, Digest, RepositoryName};
use serde::{Deserialize, Serialize};

use super::blobs::{BlobWriter, PART_SIZE};
use super::{BucketStore, age_of, os_err};
use crate::storage::hash::Hasher;
use crate::storage::{ByteStream, StorageError, UploadStatus};

/// Below this, the last part is merged with the next chunk (S3's minimum part size).
const MIN_PART: u64 = 5 * 1024 * 1024;
const MAX_STATE_READ: u64 = 1024 * 1024;

#[derive(Serialize, Deserialize, Clone)]
pub(super) struct UploadState {
    repo: String,
    pub(super) offset: u64,
    parts: Vec<Part>,
}

#[derive(Serialize, Deserialize, Clone, Copy)]
struct Part {
    start: u64,
    len: u64,
}

/// In-memory running hash of a session this process appended to, valid while `offset`
/// matches the durable offset (another process may have appended in between).
pub(super) struct Progress {
    offset: u64,
    hasher: Option<Hasher>,
}

pub(super) fn random_id() -> String {
    let mut b = [0u8; 16];
    // The system RNG failing is not recoverable; fall back to time-based bytes rather than panic.
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        b = t.to_le_bytes();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn valid_upload_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl BucketStore {
    fn state_key(&self, id: &str) -> object_store::path::Path {
        self.key(&format!("uploads/{id}/state.json"))
    }

    fn part_key(&self, id: &str, start: u64) -> object_store::path::Path {
        self.key(&format!("uploads/{id}/parts/{start:020}"))
    }

    fn progress(&self, id: &str) -> Arc<tokio::sync::Mutex<Progress>> {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Progress {
                    offset: 0,
                    hasher: None,
                }))
            })
            .clone()
    }

    fn forget(&self, id: &str) {
        let mut map = self.uploads.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(id);
    }

    async fn save(&self, id: &str, st: &UploadState) -> Result<(), StorageError> {
        let raw = serde_json::to_vec(st).map_err(io::Error::other)?;
        self.put(&self.state_key(id), raw.into()).await
    }

    /// Stores `data` as the part starting at `start`, then records it in the session state:
    /// the part counts only once the state naming it is saved.
    async fn save_part(
        &self,
        id: &str,
        st: &mut UploadState,
        start: u64,
        data: bytes::Bytes,
    ) -> Result<(), StorageError> {
        let len = data.len() as u64;
        self.put(&self.part_key(id, start), data).await?;
        st.parts.push(Part { start, len });
        st.offset = start + len;
        self.save(id, st).await
    }

    /// Removes every object of a session, the state first (the session ends there).
    async fn remove_session(&self, id: &str) -> Result<(), StorageError> {
        self.delete(&self.state_key(id)).await?;
        for meta in self.list(&format!("uploads/{id}")).await? {
            self.delete(&meta.location).await?;
        }
        Ok(())
    }
}

pub(super) async fn load(
    store: &BucketStore,
    repo: &RepositoryName,
    id: &str,
) -> Result<UploadState, StorageError> {
    if !valid_upload_id(id) {
        return Err(StorageError::UploadUnknown);
    }
    let raw = store
        .get_small(&store.state_key(id), MAX_STATE_READ)
        .await?
        .ok_or(StorageError::UploadUnknown)?;
    let st: UploadState =
        serde_json::from_slice(&raw).map_err(|e| StorageError::Io(io::Error::other(e)))?;
    if st.repo != repo.as_str() {
        return Err(StorageError::UploadUnknown);
    }
    Ok(st)
}

pub(super) async fn upload_start(
    store: &BucketStore,
    repo: &RepositoryName,
) -> Result<String, StorageError> {
    let id = random_id();
    store
        .save(
            &id,
            &UploadState {
                repo: repo.as_str().to_owned(),
                offset: 0,
                parts: Vec::new(),
            },
        )
        .await?;
    Ok(id)
}

/// The first `len` bytes of a part.
async fn read_part(
    store: &BucketStore,
    id: &str,
    p: Part,
    from: u64,
) -> Result<Bytes, StorageError> {
    if from >= p.len {
        return Ok(Bytes::new());
    }
    let opts = GetOptions {
        range: Some(GetRange::Bounded(from..p.len)),
        ..GetOptions::default()
    };
    let r = match store
        .store
        .get_opts(&store.part_key(id, p.start), opts)
        .await
    {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Err(StorageError::UploadUnknown),
        Err(e) => return Err(os_err(e)),
    };
    let data = r.bytes().await.map_err(os_err)?;
    if (data.len() as u64) < p.len - from {
        return Err(StorageError::Io(io::Error::other(
            "upload part is shorter than its recorded length",
        )));
    }
    Ok(data.slice(..usize::try_from(p.len - from).unwrap_or(data.len())))
}

pub(super) async fn upload_append(
    store: &BucketStore,
    repo: &RepositoryName,
    id: &str,
    start: Option<u64>,
    mut body: ByteStream,
) -> Result<UploadStatus, StorageError> {
    let lock = store.progress(id);
    let mut progress = lock.lock().await;
    let mut st = load(store, repo, id).await?;
    if let Some(s) = start
        && s != st.offset
    {
        return Err(StorageError::RangeMismatch {
            requested: s,
            offset: st.offset,
        });
    }
    if progress.offset != st.offset || progress.hasher.is_none() {
        progress.hasher = (st.offset == 0).then(|| Hasher::new(Algorithm::Sha256));
        progress.offset = st.offset;
    }
    // A small last part is extended with this chunk's bytes (same key, rewritten whole).
    let (mut buf_start, mut buf, mut reread) = match st.parts.last().copied() {
        Some(p) if p.len < MIN_PART => {
            let data = read_part(store, id, p, 0).await?;
            st.parts.pop();
            (p.start, BytesMut::from(&data[..]), Some(p))
        }
        _ => (st.offset, BytesMut::new(), None),
    };
    let mut result = Ok(());
    loop {
        let chunk = match body.next().await {
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                result = Err(StorageError::Body(e));
                break;
            }
            None => break,
        };
        if let Some(h) = progress.hasher.as_mut() {
            h.update(&chunk);
        }
        buf.extend_from_slice(&chunk);
        reread = None;
        if buf.len() >= PART_SIZE {
            let data = std::mem::take(&mut buf).freeze();
            // Durable from here: a crash or a cut body later keeps these bytes.
            store.save_part(id, &mut st, buf_start, data).await?;
            progress.offset = st.offset;
            buf_start = st.offset;
        }
    }
    if let Some(p) = reread {
        // Nothing new arrived: the small part stays as it was.
        st.parts.push(p);
    } else if !buf.is_empty() {
        // Whatever arrived is kept, even from a chunk cut short, so a client can resume.
        store
            .save_part(id, &mut st, buf_start, buf.freeze())
            .await?;
    }
    progress.offset = st.offset;
    result?;
    Ok(UploadStatus { offset: st.offset })
}

pub(super) async fn upload_read(
    store: &BucketStore,
    repo: &RepositoryName,
    id: &str,
    offset: u64,
) -> Result<ByteStream, StorageError> {
    let st = load(store, repo, id).await?;
    let pending: VecDeque<(Part, u64)> = st
        .parts
        .iter()
        .filter(|p| p.start + p.len > offset)
        .map(|p| (*p, offset.saturating_sub(p.start)))
        .collect();
    let (store, id) = (store.clone(), id.to_owned());
    // One part (at most a few MiB) in memory at a time.
    let s = futures_util::stream::unfold(pending, move |mut pending| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            let (p, from) = pending.pop_front()?;
            let item = read_part(&store, &id, p, from)
                .await
                .map_err(|e| io::Error::other(e.to_string()));
            let next = if item.is_ok() {
                pending
            } else {
                VecDeque::new()
            };
            Some((item, next))
        }
    });
    Ok(Box::pin(s))
}

pub(super) async fn upload_finish(
    store: &BucketStore,
    repo: &RepositoryName,
    id: &str,
    digest: &Digest,
) -> Result<u64, StorageError> {
    let lock = store.progress(id);
    let mut progress = lock.lock().await;
    let st = load(store, repo, id).await?;
    let running = match progress.hasher.take() {
        Some(h) if progress.offset == st.offset && h.algorithm() == digest.algorithm() => {
            Some(h.finish())
        }
        _ => None,
    };
    progress.offset = u64::MAX;
    if running.as_ref().is_some_and(|a| a != digest) {
        return Err(StorageError::DigestMismatch {
            expected: digest.clone(),
        });
    }
    let blob = store.blob_key(digest);
    let exists = store.head(&blob).await?.is_some();
    if !(exists && running.is_some()) {
        // Read the parts back, hashing them, and (unless the blob is there already) upload
        // them to the blob's key: the object appears only if the digest matched.
        let mut w = (!exists).then(|| BlobWriter::new(store, blob, digest.algorithm()));
        let mut h = Hasher::new(digest.algorithm());
        let copied: Result<(), StorageError> = async {
            for p in &st.parts {
                let data = read_part(store, id, *p, 0).await?;
                match w.as_mut() {
                    Some(w) => w.write(data).await?,
                    None => h.update(&data),
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            if let Some(w) = w {
                w.abort().await;
            }
            return Err(e);
        }
        let actual = h.finish();
        match w {
            Some(w) => {
                w.commit(digest).await?;
            }
            None if &actual != digest => {
                return Err(StorageError::DigestMismatch {
                    expected: digest.clone(),
                });
            }
            None => {}
        }
    }
    store.catalog_note(repo).await?;
    store
        .put(&store.layer_key(repo, digest), Bytes::new())
        .await?;
    store.remove_session(id).await?;
    drop(progress);
    store.forget(id);
    Ok(st.offset)
}

pub(super) async fn upload_cancel(
    store: &BucketStore,
    repo: &RepositoryName,
    id: &str,
) -> Result<(), StorageError> {
    let lock = store.progress(id);
    let guard = lock.lock().await;
    load(store, repo, id).await?;
    store.remove_session(id).await?;
    drop(guard);
    store.forget(id);
    Ok(())
}

pub(super) async fn upload_expire(
    store: &BucketStore,
    idle: Duration,
) -> Result<usize, StorageError> {
    // The newest object of a session tells when it was last written (its state is rewritten
    // with every part). Objects left without a state (a crash while ending a session) expire
    // the same way.
    let mut sessions: HashMap<String, Duration> = HashMap::new();
    for meta in store.list("uploads").await? {
        let Some(id) = store
            .rel(&meta.location)
            .and_then(|r| r.strip_prefix("uploads/"))
            .and_then(|r| r.split('/').next())
        else {
            continue;
        };
        if !valid_upload_id(id) {
            continue;
        }
        let age = age_of(&meta);
        let e = sessions.entry(id.to_owned()).or_insert(age);
        *e = (*e).min(age);
    }
    let mut removed = 0;
    for (id, idle_for) in sessions {
        if idle_for < idle {
            continue;
        }
        let lock = store.progress(&id);
        // A session in use right now is not idle.
        let Ok(guard) = lock.try_lock() else {
            continue;
        };
        store.remove_session(&id).await?;
        removed += 1;
        drop(guard);
        store.forget(&id);
    }
    Ok(removed)
}
