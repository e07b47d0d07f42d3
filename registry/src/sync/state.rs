//! What sync knows between runs and across restarts: connection state, the last successful
//! sync, the last error, per-repository progress, the tags as last seen at the parent, and the
//! upload sessions holding partly downloaded blobs. Kept in the store's document `state.json`
//! (`<storage>/sync/state.json` on disk), so a process started anywhere on the same store
//! sees it.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::storage::{StorageError, Store};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionState {
    /// No contact attempted yet since the state was created.
    #[default]
    Unknown,
    Online,
    Offline,
}

impl ConnectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectionState::Unknown => "unknown",
            ConnectionState::Online => "online",
            ConnectionState::Offline => "offline",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RepoState {
    /// Tag -> digest as last synced from the parent.
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub images_total: u64,
    #[serde(default)]
    pub images_synced: u64,
    #[serde(default)]
    pub bytes_total: u64,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// A blob whose download is under way in an upload session of the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Partial {
    pub repo: String,
    pub upload_id: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RunSummary {
    pub number: u64,
    pub started_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_utc: Option<String>,
    /// success, partial, paused or failed; absent while running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
    #[serde(default)]
    pub bytes_downloaded: u64,
    #[serde(default)]
    pub blobs_downloaded: u64,
    #[serde(default)]
    pub manifests_written: u64,
    #[serde(default)]
    pub tags_deleted: u64,
    #[serde(default)]
    pub pushed_to_parent: u64,
}

/// A manual sync asked of a process that did not lead, and the leader's run that served it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ServedRequest {
    pub id: String,
    pub run: u64,
    /// The run's result once it finished (as `lastRun.result`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<String>,
}

/// How many served requests the state keeps (the newest), so a waiting client finds its own.
const SERVED_KEPT: usize = 32;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SyncState {
    #[serde(default)]
    pub connection_state: ConnectionState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_contact_utc: Option<String>,
    /// End of the last run that finished without errors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_utc: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_unix: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// Why part of the scope could not be resolved (e.g. the parent refused its catalog).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope_note: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<RunSummary>,
    #[serde(default)]
    pub repositories: BTreeMap<String, RepoState>,
    /// Digest -> upload session with the part downloaded so far.
    #[serde(default)]
    pub partials: BTreeMap<String, Partial>,
    /// Repository -> tag -> digest of images evicted by `--max-storage`: a sync leaves them
    /// out until the parent moves the tag (or a client pulls it again).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub evicted: BTreeMap<String, BTreeMap<String, String>>,
    /// Manual syncs other processes stored, and the runs that served them (the newest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<ServedRequest>,
}

impl SyncState {
    /// Records that run `run` serves request `id`.
    pub fn note_request(&mut self, id: &str, run: u64) {
        self.requests.retain(|q| q.id != id);
        self.requests.push(ServedRequest {
            id: id.to_owned(),
            run,
            result: None,
        });
        let extra = self.requests.len().saturating_sub(SERVED_KEPT);
        self.requests.drain(..extra);
    }

    pub fn forget_eviction(&mut self, repo: &str, tag: &str) {
        if let Some(r) = self.evicted.get_mut(repo) {
            r.remove(tag);
            if r.is_empty() {
                self.evicted.remove(repo);
            }
        }
    }

    pub fn is_evicted(&self, repo: &str, tag: &str, digest: &str) -> bool {
        self.evicted
            .get(repo)
            .and_then(|r| r.get(tag))
            .is_some_and(|d| d == digest)
    }
}

/// The key of the state among the store's documents (`<storage>/sync/state.json` on disk).
const STATE_KEY: &str = "state.json";
/// Where an unreadable state is set aside.
const CORRUPT_KEY: &str = "state.json.corrupt";
/// Pause after a failed save before the writer tries again.
const SAVE_RETRY: Duration = Duration::from_secs(5);
/// Shortest time between two background saves: progress changes many times a second and on
/// object storage each save is a PUT.
const SAVE_EVERY: Duration = Duration::from_millis(500);

/// The state and the document it lives in. Every change goes through [`StateFile::update`],
/// which changes memory at once; a background writer stores the latest version soon after
/// (coalescing bursts), and [`StateFile::save`] stores it now where a change must be durable.
pub struct StateFile {
    store: Arc<dyn Store>,
    /// Only the leader of the processes sharing the store writes the state; the others keep
    /// their changes in memory and [`StateFile::reload`] what the leader wrote.
    writable: AtomicBool,
    state: Mutex<SyncState>,
    /// Bumped by every update, under the state's lock.
    version: AtomicU64,
    /// The version last stored; held across a write so two writes never reorder.
    saved: tokio::sync::Mutex<u64>,
    dirty: Arc<Notify>,
}

impl StateFile {
    /// Loads the state from the store; none starts empty, an unreadable one is set aside
    /// (`state.json.corrupt`) so sync can go on from scratch rather than refuse to start.
    /// Must be called within a Tokio runtime (it starts the writer).
    pub async fn open(store: Arc<dyn Store>) -> Result<Arc<Self>, StorageError> {
        let state = match store.doc_get(STATE_KEY).await? {
            Some(raw) => match serde_json::from_slice(&raw) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "sync state unreadable; starting afresh");
                    store.doc_put(CORRUPT_KEY, raw).await?;
                    SyncState::default()
                }
            },
            None => SyncState::default(),
        };
        let file = Arc::new(StateFile {
            store,
            writable: AtomicBool::new(true),
            state: Mutex::new(state),
            version: AtomicU64::new(0),
            saved: tokio::sync::Mutex::new(0),
            dirty: Arc::new(Notify::new()),
        });
        let weak = Arc::downgrade(&file);
        let dirty = file.dirty.clone();
        tokio::spawn(async move {
            loop {
                dirty.notified().await;
                // Gone (dropped, which notifies once more): nothing left to save.
                let Some(file) = weak.upgrade() else { return };
                let pause = match file.save().await {
                    Ok(()) => SAVE_EVERY,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot save sync state; retrying");
                        dirty.notify_one();
                        SAVE_RETRY
                    }
                };
                drop(file);
                tokio::time::sleep(pause).await;
            }
        });
        Ok(file)
    }

    pub fn snapshot(&self) -> SyncState {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reads without changing anything.
    pub fn read<T>(&self, f: impl FnOnce(&SyncState) -> T) -> T {
        f(&self.lock())
    }

    /// Changes the state in memory; the writer stores it within a moment. A lost write costs
    /// at most some repeated work after a restart; where it would cost more, call
    /// [`StateFile::save`] too.
    pub fn update<T>(&self, f: impl FnOnce(&mut SyncState) -> T) -> T {
        let out = {
            let mut s = self.lock();
            let out = f(&mut s);
            self.version.fetch_add(1, Ordering::SeqCst);
            out
        };
        self.dirty.notify_one();
        out
    }

    /// Whether this process may write the state (it leads); see [`StateFile::reload`].
    pub fn set_writable(&self, writable: bool) {
        self.writable.store(writable, Ordering::SeqCst);
    }

    pub fn is_writable(&self) -> bool {
        self.writable.load(Ordering::SeqCst)
    }

    /// Replaces the state in memory with what the store holds (written by the leader), dropping
    /// changes made here that were not stored. A follower calls it to answer status as the
    /// leader would, and a new leader before its first run, so it resumes the old leader's
    /// partial downloads and never writes back its own stale copy.
    pub async fn reload(&self) -> Result<(), StorageError> {
        let mut saved = self.saved.lock().await;
        let state = match self.store.doc_get(STATE_KEY).await? {
            Some(raw) => {
                serde_json::from_slice(&raw).map_err(|e| StorageError::Io(io::Error::other(e)))?
            }
            None => SyncState::default(),
        };
        let mut s = self.lock();
        *s = state;
        *saved = self.version.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(())
    }

    /// Stores the current state now, unless it is stored already or this process does not
    /// lead.
    pub async fn save(&self) -> Result<(), StorageError> {
        if !self.writable.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut saved = self.saved.lock().await;
        let (version, raw) = {
            let s = self.lock();
            (
                self.version.load(Ordering::SeqCst),
                serde_json::to_vec_pretty(&*s),
            )
        };
        if version == *saved {
            return Ok(());
        }
        let raw = raw.map_err(|e| StorageError::Io(io::Error::other(e)))?;
        self.store.doc_put(STATE_KEY, raw.into()).await?;
        *saved = version;
        Ok(())
    }
}

impl Drop for StateFile {
    fn drop(&mut self) {
        // Wakes the writer so it sees the state is gone and ends.
        self.dirty.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStore;

    #[test]
    fn served_requests_keep_the_newest_once_each() {
        let mut s = SyncState::default();
        for i in 0..40u64 {
            s.note_request(&format!("sync-{i}"), i);
        }
        // Picked up again by a later run (the leader changed before it ran): one entry.
        s.note_request("sync-39", 41);
        assert_eq!(s.requests.len(), SERVED_KEPT);
        assert_eq!(s.requests[0].id, "sync-8");
        let last = s.requests.last().unwrap();
        assert_eq!((last.id.as_str(), last.run), ("sync-39", 41));
        assert_eq!(s.requests.iter().filter(|q| q.id == "sync-39").count(), 1);
    }

    #[tokio::test]
    async fn survives_reopen_and_sets_aside_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        let f = StateFile::open(store.clone()).await.unwrap();
        f.update(|s| {
            s.connection_state = ConnectionState::Online;
            s.repositories
                .entry("a/b".into())
                .or_default()
                .tags
                .insert("v1".into(), "sha256:00".into());
        });
        f.save().await.unwrap();
        let again = StateFile::open(store.clone()).await.unwrap();
        assert_eq!(again.snapshot(), f.snapshot());
        // The background writer stores an update without an explicit save.
        f.update(|s| s.last_error = Some("x".into()));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let stored = StateFile::open(store.clone()).await.unwrap().snapshot();
            if stored.last_error.as_deref() == Some("x") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never saved");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A follower writes nothing, and reload brings it what the leader stored.
        let follower = StateFile::open(store.clone()).await.unwrap();
        follower.set_writable(false);
        follower.update(|s| s.last_error = Some("follower's".into()));
        follower.save().await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let stored = StateFile::open(store.clone()).await.unwrap().snapshot();
        assert_eq!(stored.last_error.as_deref(), Some("x"));
        f.update(|s| s.last_error = Some("leader's".into()));
        f.save().await.unwrap();
        follower.reload().await.unwrap();
        assert_eq!(follower.snapshot(), f.snapshot());
        std::fs::write(dir.path().join("sync/state.json"), b"{nope").unwrap();
        let fresh = StateFile::open(store.clone()).await.unwrap();
        assert_eq!(fresh.snapshot(), SyncState::default());
        assert!(dir.path().join("sync/state.json.corrupt").exists());
    }
}
