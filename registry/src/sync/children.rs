//! Connected registries below this one: what each child reported at the end of its sync runs
//! (its own state, and the registries below it as it last heard them), kept among the store's
//! documents (`children/<name>.json`; `<storage>/sync/children/` on disk) so every replica
//! sharing the store lists the same children. A child not heard from for two of its schedule
//! intervals (10 minutes when it reports none) is shown `Offline`.
//!
//! The sending side is [`super::report`]; the HTTP endpoints are in the API layer above.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::metrics::{Metrics, StateLabels};
use crate::storage::{StorageError, Store};

/// The folder of the children's documents.
const DIR: &str = "children";
/// How long a child that reports no schedule interval may stay silent before it is `Offline`.
pub const DEFAULT_OFFLINE_AFTER: Duration = Duration::from_secs(600);
/// Largest report body accepted (a child with a thousand descendants stays far below).
pub const MAX_REPORT_BYTES: usize = 1024 * 1024;
/// Most registries one report may name below the child.
const MAX_DESCENDANTS: usize = 2000;
/// Longest text kept of any reported field (an error message, a login server).
const MAX_FIELD: usize = 1024;
/// How often the documents are re-read, for what other replicas stored (a process alone on
/// its store reads them once: it wrote every later one itself).
const RELOAD_EVERY: Duration = Duration::from_secs(30);
/// How often `outpost_children{state}` is recomputed (children turn `Offline` by time alone).
const PUBLISH_EVERY: Duration = Duration::from_secs(5);

/// One registry's state as it reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RegistryState {
    /// Its ConnectedRegistryName.
    pub name: String,
    /// readonly or readwrite.
    pub mode: String,
    /// Its connection to its own parent when it reported (online, offline, unknown).
    pub connection_state: String,
    /// The login server it syncs from, as its `status` shows it.
    #[serde(default)]
    pub login_server: String,
    /// End of its last successful sync.
    #[serde(default)]
    pub last_sync_utc: Option<String>,
    /// The Outpost version it runs.
    #[serde(default)]
    pub version: String,
    /// Bytes of content it stores (its running total).
    #[serde(default)]
    pub storage_bytes: u64,
    /// Images of its staging requests, by state.
    #[serde(default)]
    pub staging: BTreeMap<String, u64>,
    /// Time between two firings of its sync schedule; `None` when it has none.
    #[serde(default)]
    pub sync_interval_seconds: Option<u64>,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// What a child sends its parent: its state and the registries below it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    #[serde(flatten)]
    pub state: RegistryState,
    #[serde(default)]
    pub children: Vec<Descendant>,
}

/// A registry below the reporting child, as the child last heard it. Ages rather than times
/// cross the link, so the parent's judgement does not depend on the child's clock.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descendant {
    #[serde(flatten)]
    pub state: RegistryState,
    /// The registry it reports to.
    pub parent: String,
    pub seconds_since_heard: u64,
}

/// What the store keeps of one child.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Record {
    #[serde(flatten)]
    state: RegistryState,
    /// The registry it reports to; `None` for this one's own children.
    #[serde(default)]
    parent: Option<String>,
    /// When it was last heard (Unix seconds, this registry's clock).
    heard_unix: u64,
}

/// A child as listed (`GET /outpost/v1/children`, `connected-registry list`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ChildView {
    pub name: String,
    pub mode: String,
    /// `Online`, or `Offline` once not heard from for longer than `offlineAfterSeconds`.
    pub connection_state: String,
    /// The registry it reports to: this registry's name for its own children (`-` when this
    /// one has none), the intermediate child's for nested ones.
    pub parent: String,
    pub login_server: String,
    pub last_sync_utc: Option<String>,
    pub last_heard_utc: String,
    pub seconds_since_heard: u64,
    pub offline_after_seconds: u64,
    /// The state it reported of its own connection to its parent.
    pub reported_connection_state: String,
    pub version: String,
    pub storage_bytes: u64,
    pub staging: BTreeMap<String, u64>,
    pub sync_interval_seconds: Option<u64>,
    pub last_error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChildrenError {
    #[error("invalid report: {0}")]
    Invalid(String),
    #[error("cannot store the report: {0}")]
    Store(#[from] StorageError),
}

/// Whether `name` can be a connected registry's name here: a document name and, lowercased,
/// a repository path component (for its `gateway/<name>` pseudo-repository).
pub fn valid_name(name: &str) -> bool {
    (1..=50).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && crate::auth::gateway_repository(name)
            .parse::<outpost_core::RepositoryName>()
            .is_ok()
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn clip(s: &mut String) {
    if s.len() > MAX_FIELD {
        let mut end = MAX_FIELD;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// Checks a reported state and bounds what is kept of it.
fn sanitize(st: &mut RegistryState) -> Result<(), ChildrenError> {
    if !valid_name(&st.name) {
        return Err(ChildrenError::Invalid(format!(
            "registry name {:?} must be 1-50 of A-Z a-z 0-9 - _, starting and ending with a \
             letter or digit",
            st.name.chars().take(60).collect::<String>()
        )));
    }
    if st.mode != "readonly" && st.mode != "readwrite" {
        return Err(ChildrenError::Invalid(format!(
            "{}: mode must be readonly or readwrite",
            st.name
        )));
    }
    for s in [
        &mut st.connection_state,
        &mut st.login_server,
        &mut st.version,
    ] {
        clip(s);
    }
    for s in [&mut st.last_sync_utc, &mut st.last_error]
        .into_iter()
        .flatten()
    {
        clip(s);
    }
    st.staging.retain(|k, _| k.len() <= 32);
    Ok(())
}

fn key(name: &str) -> String {
    format!("{DIR}/{name}.json")
}

fn offline_after(st: &RegistryState) -> u64 {
    st.sync_interval_seconds
        .map_or(DEFAULT_OFFLINE_AFTER.as_secs(), |s| {
            s.saturating_mul(2).max(1)
        })
}

/// The children heard from, shared by the report endpoint, the admin API and the reporter.
pub struct Children {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    /// This registry's name, the PARENT of its own children (`-` for a standalone one).
    own_name: String,
    /// The documents as last read or written by this process.
    cache: Mutex<BTreeMap<String, Record>>,
}

impl Children {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        own_name: Option<String>,
    ) -> Arc<Self> {
        Arc::new(Children {
            store,
            metrics,
            own_name: own_name.unwrap_or_else(|| "-".into()),
            cache: Mutex::new(BTreeMap::new()),
        })
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Record>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores what child `report.state.name` reported (authorised by the caller), and the
    /// registries below it, unless this process heard more recently of one of them.
    pub async fn record(&self, mut report: Report) -> Result<(), ChildrenError> {
        sanitize(&mut report.state)?;
        if report.children.len() > MAX_DESCENDANTS {
            return Err(ChildrenError::Invalid(format!(
                "more than {MAX_DESCENDANTS} registries below {}",
                report.state.name
            )));
        }
        let now = now_unix();
        let mut records = vec![Record {
            state: report.state.clone(),
            parent: None,
            heard_unix: now,
        }];
        for mut d in report.children {
            sanitize(&mut d.state)?;
            if d.state.name == report.state.name || !valid_name(&d.parent) {
                return Err(ChildrenError::Invalid(format!(
                    "{} cannot be below itself or below {:?}",
                    d.state.name,
                    d.parent.chars().take(60).collect::<String>()
                )));
            }
            records.push(Record {
                state: d.state,
                parent: Some(d.parent),
                heard_unix: now.saturating_sub(d.seconds_since_heard),
            });
        }
        for r in records {
            let newer_known = self
                .cache()
                .get(&r.state.name)
                .is_some_and(|old| old.heard_unix > r.heard_unix);
            if newer_known {
                continue;
            }
            let data =
                serde_json::to_vec(&r).map_err(|e| StorageError::Io(std::io::Error::other(e)))?;
            self.store.doc_put(&key(&r.state.name), data.into()).await?;
            self.cache().insert(r.state.name.clone(), r);
        }
        self.publish_metrics();
        Ok(())
    }

    /// Re-reads every child's document (what other replicas stored). A document that does not
    /// parse is skipped with a warning, never fatal.
    pub async fn reload(&self) -> Result<(), StorageError> {
        let mut fresh = BTreeMap::new();
        for k in self.store.doc_list(DIR).await? {
            let Some(raw) = self.store.doc_get(&k).await? else {
                continue;
            };
            match serde_json::from_slice::<Record>(&raw) {
                Ok(r) => {
                    fresh.insert(r.state.name.clone(), r);
                }
                Err(e) => {
                    tracing::warn!(document = %k, error = %e, "child record unreadable; skipped")
                }
            }
        }
        *self.cache() = fresh;
        Ok(())
    }

    /// Every child heard from, nested ones included, by name, from the store.
    pub async fn list(&self) -> Result<Vec<ChildView>, StorageError> {
        self.reload().await?;
        self.publish_metrics();
        Ok(self.views())
    }

    fn views(&self) -> Vec<ChildView> {
        let now = now_unix();
        self.cache()
            .values()
            .map(|r| {
                let age = now.saturating_sub(r.heard_unix);
                let limit = offline_after(&r.state);
                let st = &r.state;
                ChildView {
                    name: st.name.clone(),
                    mode: st.mode.clone(),
                    connection_state: if age > limit { "Offline" } else { "Online" }.into(),
                    parent: r.parent.clone().unwrap_or_else(|| self.own_name.clone()),
                    login_server: st.login_server.clone(),
                    last_sync_utc: st.last_sync_utc.clone(),
                    last_heard_utc: super::schedule::rfc3339(
                        SystemTime::UNIX_EPOCH + Duration::from_secs(r.heard_unix),
                    ),
                    seconds_since_heard: age,
                    offline_after_seconds: limit,
                    reported_connection_state: st.connection_state.clone(),
                    version: st.version.clone(),
                    storage_bytes: st.storage_bytes,
                    staging: st.staging.clone(),
                    sync_interval_seconds: st.sync_interval_seconds,
                    last_error: st.last_error.clone(),
                }
            })
            .collect()
    }

    /// The registries below this one, as this registry's own report names them.
    pub fn descendants(&self) -> Vec<Descendant> {
        let now = now_unix();
        self.cache()
            .values()
            .map(|r| Descendant {
                state: r.state.clone(),
                parent: r.parent.clone().unwrap_or_else(|| self.own_name.clone()),
                seconds_since_heard: now.saturating_sub(r.heard_unix),
            })
            .collect()
    }

    /// Sets `outpost_children{state}` from what this process knows (both states always shown).
    pub fn publish_metrics(&self) {
        let (mut online, mut offline) = (0, 0);
        for v in self.views() {
            if v.connection_state == "Online" {
                online += 1;
            } else {
                offline += 1;
            }
        }
        let g = &self.metrics.children;
        g.get_or_create(&StateLabels { state: "online" })
            .set(online);
        g.get_or_create(&StateLabels { state: "offline" })
            .set(offline);
    }

    /// Reads the documents at start, and every [`RELOAD_EVERY`] when other processes share
    /// the store (`shared`: their reports), and keeps the gauge current, since a child turns
    /// `Offline` by the clock alone.
    pub fn spawn(self: &Arc<Self>, shared: bool) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut last_reload: Option<tokio::time::Instant> = None;
            loop {
                let Some(me) = weak.upgrade() else { return };
                if last_reload.is_none_or(|t| shared && t.elapsed() >= RELOAD_EVERY) {
                    if let Err(e) = me.reload().await {
                        tracing::warn!(error = %e, "cannot read the children's records");
                    }
                    last_reload = Some(tokio::time::Instant::now());
                }
                me.publish_metrics();
                drop(me);
                tokio::time::sleep(PUBLISH_EVERY).await;
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str, interval: Option<u64>) -> RegistryState {
        RegistryState {
            name: name.into(),
            mode: "readonly".into(),
            connection_state: "online".into(),
            sync_interval_seconds: interval,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn nested_children_are_kept_with_their_parent_and_age() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::storage::fs::FsStore::open(dir.path()).unwrap());
        let c = Children::new(store.clone(), Arc::new(Metrics::new()), None);
        c.record(Report {
            state: state("edge-a", Some(60)),
            children: vec![Descendant {
                state: state("edge-b", Some(5)),
                parent: "edge-a".into(),
                seconds_since_heard: 11,
            }],
        })
        .await
        .unwrap();
        // A second process on the same store sees both.
        let other = Children::new(store, Arc::new(Metrics::new()), Some("top".into()));
        let v = other.list().await.unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(
            (v[0].name.as_str(), v[0].parent.as_str()),
            ("edge-a", "top")
        );
        assert_eq!(v[0].connection_state, "Online");
        assert_eq!(
            (v[1].name.as_str(), v[1].parent.as_str()),
            ("edge-b", "edge-a")
        );
        // Heard 11 s ago with a 5 s interval: past two intervals.
        assert_eq!(v[1].connection_state, "Offline");
        assert_eq!(v[1].offline_after_seconds, 10);
        let d = other.descendants();
        assert_eq!(d[0].parent, "top");
        assert!(d[1].seconds_since_heard >= 11);
    }

    #[tokio::test]
    async fn bad_reports_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(crate::storage::fs::FsStore::open(dir.path()).unwrap());
        let c = Children::new(store, Arc::new(Metrics::new()), None);
        for name in ["", "../x", "a/b", "-a", &"a".repeat(51)] {
            let r = Report {
                state: state(name, None),
                children: vec![],
            };
            assert!(
                matches!(c.record(r).await, Err(ChildrenError::Invalid(_))),
                "{name}"
            );
        }
        let mut bad_mode = state("edge", None);
        bad_mode.mode = "x".into();
        assert!(
            c.record(Report {
                state: bad_mode,
                children: vec![]
            })
            .await
            .is_err()
        );
        assert!(c.list().await.unwrap().is_empty());
        assert_eq!(offline_after(&state("x", None)), 600);
    }
}
