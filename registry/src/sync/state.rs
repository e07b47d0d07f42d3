//! What sync knows between runs and across restarts: connection state, the last successful
//! sync, the last error, per-repository progress, the tags as last seen at the parent, and the
//! upload sessions holding partly downloaded blobs. Kept in `<storage>/sync/state.json`.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

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
}

impl SyncState {
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

/// The state and the file it lives in. Every change goes through [`StateFile::update`].
pub struct StateFile {
    path: PathBuf,
    state: Mutex<SyncState>,
}

impl StateFile {
    /// Loads `<dir>/state.json`; a missing file starts empty, an unreadable one is set aside
    /// (renamed `.corrupt`) so sync can go on from scratch rather than refuse to start.
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("state.json");
        let state = match std::fs::read(&path) {
            Ok(raw) => match serde_json::from_slice(&raw) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "sync state unreadable; starting afresh");
                    std::fs::rename(&path, path.with_extension("json.corrupt"))?;
                    SyncState::default()
                }
            },
            Err(e) if e.kind() == io::ErrorKind::NotFound => SyncState::default(),
            Err(e) => return Err(e),
        };
        Ok(StateFile {
            path,
            state: Mutex::new(state),
        })
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

    /// Changes the state and writes it durably. A failed write is logged and the change kept
    /// in memory: losing it costs at most some repeated work after a restart.
    pub fn update<T>(&self, f: impl FnOnce(&mut SyncState) -> T) -> T {
        let mut s = self.lock();
        let out = f(&mut s);
        match serde_json::to_vec_pretty(&*s) {
            Ok(raw) => {
                if let Err(e) = crate::storage::fs::write_file_atomic(&self.path, &raw, 0o644) {
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot save sync state");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot encode sync state"),
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_sets_aside_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let f = StateFile::open(dir.path().join("sync")).unwrap();
        f.update(|s| {
            s.connection_state = ConnectionState::Online;
            s.repositories
                .entry("a/b".into())
                .or_default()
                .tags
                .insert("v1".into(), "sha256:00".into());
        });
        let again = StateFile::open(dir.path().join("sync")).unwrap();
        assert_eq!(again.snapshot(), f.snapshot());
        std::fs::write(dir.path().join("sync/state.json"), b"{nope").unwrap();
        let fresh = StateFile::open(dir.path().join("sync")).unwrap();
        assert_eq!(fresh.snapshot(), SyncState::default());
        assert!(dir.path().join("sync/state.json.corrupt").exists());
    }
}
