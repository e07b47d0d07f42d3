//! The mirror config file, loaded at start and re-read when it changes (a ConfigMap volume
//! swaps its `..data` symlink; metadata follows it). A broken edit keeps the last good config.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use outpost_core::MirrorConfig;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config {path}: {source}")]
    Invalid {
        path: String,
        #[source]
        source: outpost_core::ConfigError,
    },
}

pub fn load(path: &Path) -> Result<MirrorConfig, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::Read {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    text.parse().map_err(|source| LoadError::Invalid {
        path: path.display().to_string(),
        source,
    })
}

/// The current config, shared by every admission.
pub struct ConfigSource {
    path: PathBuf,
    current: RwLock<Option<Arc<MirrorConfig>>>,
}

impl ConfigSource {
    /// Tries a first load; on failure the source starts empty (not ready) and the watcher
    /// keeps trying.
    pub fn new(path: PathBuf) -> Arc<Self> {
        let first = match load(&path) {
            Ok(c) => Some(Arc::new(c)),
            Err(e) => {
                tracing::error!(error = %e, "config not loaded; admissions pass unchanged until it is");
                None
            }
        };
        Arc::new(ConfigSource {
            path,
            current: RwLock::new(first),
        })
    }

    /// A fixed config (tests, benches).
    pub fn fixed(config: MirrorConfig) -> Arc<Self> {
        Arc::new(ConfigSource {
            path: PathBuf::new(),
            current: RwLock::new(Some(Arc::new(config))),
        })
    }

    pub fn get(&self) -> Option<Arc<MirrorConfig>> {
        match self.current.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, c: MirrorConfig) {
        let mut w = match self.current.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        *w = Some(Arc::new(c));
    }

    /// Polls the file's modification time and reloads it when it changes.
    pub fn watch(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let me = Arc::clone(self);
        tokio::spawn(async move {
            let modified = |p: &Path| -> Option<SystemTime> {
                std::fs::metadata(p).and_then(|m| m.modified()).ok()
            };
            let mut last = modified(&me.path);
            loop {
                tokio::time::sleep(every).await;
                let now = modified(&me.path);
                if now == last && me.get().is_some() {
                    continue;
                }
                match load(&me.path) {
                    Ok(c) => {
                        let changed = me.get().is_none_or(|old| *old != c);
                        me.set(c);
                        if changed {
                            tracing::info!(path = %me.path.display(), "config loaded");
                        }
                        last = now;
                    }
                    Err(e) => {
                        if now != last {
                            tracing::warn!(error = %e, "config reload failed; keeping the previous one");
                        }
                        last = now;
                    }
                }
            }
        })
    }
}
