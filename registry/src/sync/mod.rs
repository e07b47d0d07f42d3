//! Synchronisation with the parent registry: the connection string, the parent client, the
//! schedule and window, resumable transfers, the readwrite outbox and the persisted state.
//!
//! [`Syncer`] owns all of it; the scheduler task starts runs at schedule firings (or when asked
//! through the admin API) and [`engine`] carries a run out.

pub mod children;
pub mod connection;
mod engine;
pub mod flight;
pub mod image;
pub mod outbox;
pub mod parent;
pub mod report;
pub mod schedule;
pub mod state;
pub mod transfer;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use outpost_core::{Digest, RepositoryPattern};
use serde::Serialize;

use crate::config::Mode;
use crate::content::platform::PlatformFilter;
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::storage::Store;
use connection::ConnectionString;
use outbox::Outbox;
use parent::{Parent, ParentError};
use schedule::Schedule;
use state::{ConnectionState, StateFile};
use transfer::Throttle;

/// How often processes sharing a store look at what the others wrote: a follower re-reads the
/// sync state the leader writes, the leader picks up sync and staging requests others accepted.
const POLL_EVERY: Duration = Duration::from_secs(5);

/// Where a manual sync asked of a process that does not lead waits for the leader, among the
/// store's documents (`<storage>/sync/requests/` on disk): one document per request.
const REQUESTS_DIR: &str = "requests";

/// Where the connection string comes from; a file is re-read before each run so rotated sync
/// token passwords take effect without a restart.
#[derive(Debug, Clone)]
pub enum ConnectionSource {
    Given(ConnectionString),
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("cannot read --connection-string-file {path}: {source}")]
    ConnectionFile {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Connection(#[from] connection::ConnectionStringError),
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error("cannot open sync state in the store: {0}")]
    State(#[source] crate::storage::StorageError),
}

impl ConnectionSource {
    pub fn load(&self) -> Result<ConnectionString, SyncError> {
        match self {
            ConnectionSource::Given(c) => Ok(c.clone()),
            ConnectionSource::File(p) => {
                let text =
                    std::fs::read_to_string(p).map_err(|source| SyncError::ConnectionFile {
                        path: p.display().to_string(),
                        source,
                    })?;
                Ok(text.trim().parse()?)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub connection: ConnectionSource,
    pub ca_file: Option<PathBuf>,
    /// Empty: every repository the sync token can list.
    pub repositories: Vec<RepositoryPattern>,
    pub schedule: Schedule,
    pub concurrency: usize,
    pub chunk_size: u64,
    pub bandwidth_limit: Option<u64>,
    pub mode: Mode,
    /// Platforms whose manifests of an index are fetched (`--platform`); empty: all.
    pub platforms: PlatformFilter,
}

/// Progress of the run under way, read by the status endpoint.
#[derive(Default)]
struct LiveRun {
    /// Repository -> (images planned, images done, blobs it is waiting for).
    repos: Mutex<BTreeMap<String, LiveRepo>>,
    /// Bytes stored so far of each blob being downloaded.
    blobs: Mutex<HashMap<Digest, Arc<AtomicU64>>>,
}

#[derive(Default, Clone)]
struct LiveRepo {
    images_total: u64,
    images_synced: u64,
    missing: Vec<(Digest, u64)>,
}

/// Tags that must stay when the parent deletes them (staged images). Supplied by the service
/// layer above, so sync does not import it.
pub trait PinnedTags: Send + Sync {
    fn pinned_tags(&self) -> std::collections::HashSet<(String, String)>;
}

/// Work of the service layer above that follows the store on the same poll as the sync state
/// (staging requests): called every few seconds and whenever leadership changes.
#[async_trait::async_trait]
pub trait SharedWork: Send + Sync {
    /// `leading`: this process runs the work; `sole`: no other process shares the store.
    async fn poll(self: Arc<Self>, leading: bool, sole: bool);
}

/// What a manual sync request got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunRequest {
    /// This process leads and starts run `n` now.
    Started(u64),
    /// This process leads and a run is under way.
    AlreadyRunning,
    /// Another process leads: the request is stored, the leader runs it after its next poll,
    /// as a run numbered `at_least` or higher; `id` finds it in the status's `requests`.
    Queued { id: String, at_least: u64 },
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredRequest {
    id: String,
    requested_utc: String,
}

fn request_key(id: &str) -> String {
    format!("{REQUESTS_DIR}/{id}.json")
}

fn new_request_id() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).unwrap_or_default();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("sync-{hex}")
}

pub struct Syncer {
    /// Only the leader runs syncs (and staging downloads and retention, which ask it).
    leadership: Arc<Leadership>,
    opts: SyncOptions,
    conn: RwLock<ConnectionString>,
    parent: RwLock<Arc<Parent>>,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    state: Arc<StateFile>,
    outbox: Option<Arc<Outbox>>,
    flights: Arc<flight::Flights>,
    /// Staged images: their tags stay when the parent deletes them.
    pins: std::sync::OnceLock<Arc<dyn PinnedTags>>,
    /// Staging requests, polled with the sync state.
    shared_work: std::sync::OnceLock<Arc<dyn SharedWork>>,
    /// Stored requests (id, document key) picked up by the leader for its next run.
    picked: Mutex<Vec<(String, String)>>,
    trigger: tokio::sync::Notify,
    /// A run was asked for ([`Syncer::ask_run`]) and none has started since: a run that
    /// starts for any reason serves what was asked, so a wake-up left over from before it
    /// starts no second run.
    wanted: AtomicBool,
    /// Held while taking over the state: the poll loop and the scheduler both may on gaining
    /// leadership, and a second re-read would overwrite what the first one's run wrote.
    takeover: tokio::sync::Mutex<()>,
    running: AtomicBool,
    live: Mutex<Option<Arc<LiveRun>>>,
    /// The registries below this one, named in its reports to the parent.
    children: std::sync::OnceLock<Arc<children::Children>>,
    /// What the last `/v2/` answer said: the parent is an Outpost (reports go to it).
    parent_is_outpost: AtomicBool,
    parent_kind_known: AtomicBool,
    /// The last report's failure (`denied`, `failed`), so each kind is logged once in a row.
    last_report_failure: Mutex<Option<&'static str>>,
}

/// A row of the status table, and the JSON of `GET /outpost/v1/status`.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Status {
    pub name: String,
    pub mode: String,
    pub connection_state: String,
    pub parent: String,
    pub login_server: String,
    pub last_sync_utc: Option<String>,
    pub sync_schedule: String,
    pub sync_window: String,
    pub storage_bytes: u64,
    pub repositories: Vec<RepoStatus>,
    #[serde(default)]
    pub syncing: bool,
    #[serde(default)]
    pub last_error: Option<String>,
    #[serde(default)]
    pub scope_note: Option<String>,
    #[serde(default)]
    pub last_run: Option<state::RunSummary>,
    #[serde(default)]
    pub outbox_pending: usize,
    /// Manual syncs asked of processes that did not lead, and the runs that served them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requests: Vec<state::ServedRequest>,
    /// The platform filter (`--platform`): the platforms whose manifests of an index are
    /// synced; empty: every platform.
    #[serde(default)]
    pub platforms: Vec<String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct RepoStatus {
    pub name: String,
    pub tags: usize,
    pub images_total: u64,
    pub images_synced: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub last_sync_utc: Option<String>,
    pub last_error: Option<String>,
}

impl Syncer {
    /// Opens the sync state (and the readwrite outbox) kept among the store's documents.
    pub async fn new(
        opts: SyncOptions,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        leadership: Arc<Leadership>,
    ) -> Result<Arc<Self>, SyncError> {
        let conn = opts.connection.load()?;
        for k in &conn.unknown_keys {
            tracing::warn!(key = %k, "connection string key not understood; ignored");
        }
        if conn.protocol == connection::Protocol::Http {
            tracing::warn!(
                parent = %conn.login_server(),
                "ParentEndpointProtocol=http: the sync token and all content cross the network \
                 unencrypted; use this only in labs or between nested Outposts on a trusted link"
            );
        }
        let parent = Parent::new(&conn, opts.ca_file.as_ref())?;
        let state = StateFile::open(store.clone())
            .await
            .map_err(SyncError::State)?;
        state.set_writable(leadership.is_leader());
        let outbox = match opts.mode {
            Mode::Readwrite => Some(Arc::new(
                Outbox::open(store.clone())
                    .await
                    .map_err(SyncError::State)?,
            )),
            Mode::Readonly => None,
        };
        if let Some(t) = state.read(|s| s.last_sync_unix) {
            metrics.sync_last_success.set(t);
        }
        let throttle = opts.bandwidth_limit.map(|b| Arc::new(Throttle::new(b)));
        let flights = Arc::new(flight::Flights::new(
            store.clone(),
            state.clone(),
            metrics.clone(),
            opts.chunk_size,
            throttle,
        ));
        Ok(Arc::new(Syncer {
            flights,
            pins: std::sync::OnceLock::new(),
            shared_work: std::sync::OnceLock::new(),
            picked: Mutex::new(Vec::new()),
            leadership,
            opts,
            conn: RwLock::new(conn),
            parent: RwLock::new(Arc::new(parent)),
            store,
            metrics,
            state,
            outbox,
            trigger: tokio::sync::Notify::new(),
            wanted: AtomicBool::new(false),
            takeover: tokio::sync::Mutex::new(()),
            running: AtomicBool::new(false),
            live: Mutex::new(None),
            children: std::sync::OnceLock::new(),
            parent_is_outpost: AtomicBool::new(false),
            parent_kind_known: AtomicBool::new(false),
            last_report_failure: Mutex::new(None),
        }))
    }

    /// The readwrite outbox, for the push handlers.
    pub fn outbox(&self) -> Option<&Arc<Outbox>> {
        self.outbox.as_ref()
    }

    pub fn mode(&self) -> Mode {
        self.opts.mode
    }

    pub fn set_pins(&self, pins: Arc<dyn PinnedTags>) {
        let _ = self.pins.set(pins);
    }

    /// The registries below this one, reported with its own state; set before
    /// [`Syncer::spawn`].
    pub fn set_children(&self, children: Arc<children::Children>) {
        let _ = self.children.set(children);
    }

    /// Work polled with the sync state (staging); set before [`Syncer::spawn`].
    pub fn set_shared_work(&self, work: Arc<dyn SharedWork>) {
        let _ = self.shared_work.set(work);
    }

    /// (repository, tag) of staged images.
    pub fn pinned_tags(&self) -> std::collections::HashSet<(String, String)> {
        self.pins.get().map(|p| p.pinned_tags()).unwrap_or_default()
    }

    /// Whether `repo` is within `--repository` (all repositories when none was given).
    pub fn in_scope(&self, repo: &str) -> bool {
        self.opts.repositories.is_empty() || self.opts.repositories.iter().any(|p| p.matches(repo))
    }

    pub fn options(&self) -> &SyncOptions {
        &self.opts
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn flights(&self) -> &Arc<flight::Flights> {
        &self.flights
    }

    pub fn leadership(&self) -> &Arc<Leadership> {
        &self.leadership
    }

    pub fn state(&self) -> &Arc<StateFile> {
        &self.state
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Records a contact outside a run (pull-through, staging) when it changes the state;
    /// runs record every contact.
    pub fn note_contact(&self, ok: bool) {
        let now = if ok {
            ConnectionState::Online
        } else {
            ConnectionState::Offline
        };
        if self.state.read(|s| s.connection_state != now) {
            self.contact(ok);
        }
    }

    /// Records that `repo:tag` now points at `digest`, as fetched from the parent outside a run
    /// (pull-through, staging): sync treats it as synced, and it is no longer evicted.
    pub fn record_tag(&self, repo: &str, tag: &str, digest: &Digest) {
        let d = digest.to_string();
        self.state.update(|s| {
            s.repositories
                .entry(repo.to_owned())
                .or_default()
                .tags
                .insert(tag.to_owned(), d);
            s.forget_eviction(repo, tag);
        });
    }

    /// The login server and the gateway endpoint, as images may name the parent.
    pub fn parent_hosts(&self) -> Vec<String> {
        let conn = self.conn.read().unwrap_or_else(|p| p.into_inner());
        let mut v = vec![conn.login_server(), conn.parent_endpoint.clone()];
        v.dedup();
        v
    }

    pub fn parent(&self) -> Arc<Parent> {
        self.parent
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads a connection string file and rebuilds the client when it changed.
    fn reload_connection(&self) {
        let ConnectionSource::File(_) = &self.opts.connection else {
            return;
        };
        let fresh = match self.opts.connection.load() {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "connection string unreadable; keeping the previous one");
                return;
            }
        };
        if *self.conn.read().unwrap_or_else(|p| p.into_inner()) == fresh {
            return;
        }
        match Parent::new(&fresh, self.opts.ca_file.as_ref()) {
            Ok(p) => {
                tracing::info!(parent = %fresh.login_server(), token = %fresh.sync_token_name, "connection string changed; parent client rebuilt");
                *self.parent.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(p);
                *self.conn.write().unwrap_or_else(|p| p.into_inner()) = fresh;
            }
            Err(e) => {
                tracing::warn!(error = %e, "new connection string unusable; keeping the previous one")
            }
        }
    }

    /// Asks for a run now, outside the schedule (and outside the window). The leader starts it
    /// at once; any other process stores the request for the leader's next poll.
    pub async fn request_run(&self) -> Result<RunRequest, crate::storage::StorageError> {
        let next = self
            .state
            .read(|s| s.last_run.as_ref().map_or(1, |r| r.number + 1));
        if self.leadership.is_leader() {
            if self.running.load(Ordering::SeqCst) {
                return Ok(RunRequest::AlreadyRunning);
            }
            self.ask_run();
            return Ok(RunRequest::Started(next));
        }
        let req = StoredRequest {
            id: new_request_id(),
            requested_utc: schedule::rfc3339(SystemTime::now()),
        };
        let raw = serde_json::to_vec(&req)
            .map_err(|e| crate::storage::StorageError::Io(std::io::Error::other(e)))?;
        self.store
            .doc_put(&request_key(&req.id), raw.into())
            .await?;
        tracing::info!(request = %req.id, "sync requested; the leading process runs it");
        // The leader's runs since the state was last re-read here only raise the number.
        Ok(RunRequest::Queued {
            id: req.id,
            at_least: next,
        })
    }

    /// The leader: picks up the requests other processes stored and starts a run for them,
    /// unless one is under way (then they wait for the next poll, so the run that serves them
    /// starts after they were made).
    async fn pick_up_requests(&self) {
        if self.running.load(Ordering::SeqCst) {
            return;
        }
        let keys = match self.store.doc_list(REQUESTS_DIR).await {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list sync requests");
                return;
            }
        };
        let mut fresh = Vec::new();
        for k in keys {
            let raw = match self.store.doc_get(&k).await {
                Ok(Some(raw)) => raw,
                Ok(None) => continue,
                Err(e) => {
                    tracing::warn!(request = %k, error = %e, "cannot read a sync request");
                    continue;
                }
            };
            match serde_json::from_slice::<StoredRequest>(&raw) {
                Ok(r) if request_key(&r.id) == k => fresh.push((r.id, k)),
                _ => {
                    tracing::warn!(request = %k, "unreadable sync request; removed");
                    let _ = self.store.doc_delete(&k).await;
                }
            }
        }
        if fresh.is_empty() {
            return;
        }
        {
            let mut picked = self.picked.lock().unwrap_or_else(|p| p.into_inner());
            for f in fresh {
                if !picked.iter().any(|(id, _)| *id == f.0) {
                    tracing::info!(request = %f.0, "sync requested through another process");
                    picked.push(f);
                }
            }
        }
        self.ask_run();
    }

    /// Wakes the scheduler for a run outside the schedule.
    fn ask_run(&self) {
        self.wanted.store(true, Ordering::SeqCst);
        self.trigger.notify_one();
    }

    /// Starts the scheduler: a run at every firing of the schedule (bounded by the window),
    /// and whenever [`Syncer::request_run`] asks.
    pub fn spawn(self: &Arc<Self>) {
        self.spawn_poll();
        let me = self.clone();
        tokio::spawn(async move {
            let now = SystemTime::now();
            // A restart inside an open window resumes at once; a continuous schedule starts
            // with a run so a fresh Outpost does not wait for the first firing.
            let mut due: Option<Option<SystemTime>> = match me.opts.schedule.open_window_at(now) {
                Some((_, end)) => Some(Some(end)),
                None if me.opts.schedule.window_text() == "continuous" => Some(None),
                None => None,
            };
            loop {
                if let Some(deadline) = due.take() {
                    if !me.leadership.is_leader() {
                        tracing::info!("sync due; waiting to lead (another process syncs)");
                        me.leadership.until_leading().await;
                    }
                    // Requests it took over are served by this very run.
                    me.take_over_state().await;
                    me.run(deadline).await;
                }
                let now = SystemTime::now();
                let Some(next) = me.opts.schedule.next_after(now) else {
                    tracing::error!("sync schedule has no next firing; scheduled syncs stop");
                    me.trigger.notified().await;
                    if me.wanted.load(Ordering::SeqCst) {
                        due = Some(None);
                    }
                    continue;
                };
                let wait = next.duration_since(now).unwrap_or(Duration::ZERO);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => due = Some(me.opts.schedule.deadline(next)),
                    _ = me.trigger.notified() => {
                        if me.wanted.load(Ordering::SeqCst) {
                            due = Some(None);
                        }
                    }
                }
            }
        });
    }

    /// One loop, every few seconds and at each leadership change, for what processes sharing
    /// the store see of each other. While another process leads: stop writing the sync state
    /// and re-read what the leader writes, so status here answers as the leader's does. While
    /// leading (beside others): pick up the sync requests they stored. Then the staging
    /// requests ([`SharedWork`]).
    fn spawn_poll(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let mut rx = self.leadership.subscribe();
        tokio::spawn(async move {
            loop {
                let leading = *rx.borrow_and_update();
                let Some(me) = weak.upgrade() else { return };
                let sole = me.leadership.is_sole();
                if !leading {
                    // Requests picked up while leading stay stored for the new leader.
                    me.picked.lock().unwrap_or_else(|p| p.into_inner()).clear();
                    me.state.set_writable(false);
                    match me.state.reload().await {
                        // The last success is the site's, whichever process synced: alerts on
                        // it must not fire at a replica that does not lead.
                        Ok(()) => {
                            if let Some(t) = me.state.read(|s| s.last_sync_unix) {
                                me.metrics.sync_last_success.set(t);
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "cannot read the leader's sync state"),
                    }
                    if let Some(o) = &me.outbox
                        && let Err(e) = o.recount().await
                    {
                        tracing::warn!(error = %e, "cannot count the outbox");
                    }
                } else if !sole {
                    if me.take_over_state().await {
                        me.ask_run();
                    }
                    me.pick_up_requests().await;
                }
                if let Some(work) = me.shared_work.get().cloned() {
                    work.poll(leading, sole).await;
                }
                drop(me);
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(POLL_EVERY) => {}
                }
            }
        });
    }

    /// Before the first run as leader: the state the previous leader stored (its partial
    /// downloads, its last run), not this process's copy from when it followed. Returns
    /// whether it took over requests left unserved (they wait in `picked` for the next run).
    async fn take_over_state(&self) -> bool {
        let _one = self.takeover.lock().await;
        if self.state.is_writable() {
            return false;
        }
        if let Err(e) = self.state.reload().await {
            tracing::warn!(error = %e, "cannot read the previous leader's sync state; going on with ours");
        }
        self.state.set_writable(true);
        // Requests the previous leader took into a run it did not finish (it died or lost
        // the lease): their documents are gone, so this process serves them from the state.
        let unserved: Vec<String> = self.state.read(|s| {
            s.requests
                .iter()
                .filter(|q| q.result.is_none())
                .map(|q| q.id.clone())
                .collect()
        });
        if unserved.is_empty() {
            return false;
        }
        {
            let mut picked = self.picked.lock().unwrap_or_else(|p| p.into_inner());
            for id in unserved {
                if !picked.iter().any(|(p, _)| *p == id) {
                    tracing::info!(request = %id, "sync request the previous leader left unserved");
                    // No document left to remove.
                    picked.push((id, String::new()));
                }
            }
        }
        true
    }

    /// One run, to completion or until `deadline`.
    async fn run(self: &Arc<Self>, deadline: Option<SystemTime>) {
        if self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.wanted.store(false, Ordering::SeqCst);
        self.reload_connection();
        let live = Arc::new(LiveRun::default());
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live.clone());
        let started = SystemTime::now();
        let picked = std::mem::take(&mut *self.picked.lock().unwrap_or_else(|p| p.into_inner()));
        let number = self.state.update(|s| {
            let n = s.last_run.as_ref().map_or(1, |r| r.number + 1);
            s.last_run = Some(state::RunSummary {
                number: n,
                started_utc: schedule::rfc3339(started),
                ..Default::default()
            });
            for (id, _) in &picked {
                s.note_request(id, n);
            }
            n
        });
        if !picked.is_empty() {
            // Stored before the requests go, so each is either pending or shown served.
            if let Err(e) = self.state.save().await {
                tracing::warn!(error = %e, "cannot save the sync state");
            }
            for (_, key) in picked.iter().filter(|(_, k)| !k.is_empty()) {
                if let Err(e) = self.store.doc_delete(key).await {
                    tracing::warn!(request = %key, error = %e, "cannot remove a served sync request");
                }
            }
        }
        tracing::info!(run = number, deadline = ?deadline.map(schedule::rfc3339), "sync started");
        let parent = self.parent();
        let report = engine::Run::new(self.clone(), parent.clone(), deadline, live.clone())
            .execute()
            .await;
        self.finish(number, started, &report, &live);
        // After the run, so the parent hears its outcome; not when the parent was unreachable.
        if report.contact_error.is_none() {
            self.report_to_parent(&parent).await;
        }
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.running.store(false, Ordering::SeqCst);
    }

    fn finish(&self, number: u64, started: SystemTime, r: &engine::Report, live: &LiveRun) {
        let now = SystemTime::now();
        let result = r.result();
        self.metrics
            .sync_runs
            .get_or_create(&crate::metrics::ResultLabels { result })
            .inc();
        let repos = live.repos.lock().unwrap_or_else(|p| p.into_inner()).clone();
        self.state.update(|s| {
            if let Some(run) = s.last_run.as_mut().filter(|run| run.number == number) {
                run.finished_utc = Some(schedule::rfc3339(now));
                run.result = Some(result.to_owned());
                run.bytes_downloaded = r.bytes_downloaded;
                run.blobs_downloaded = r.blobs_downloaded;
                run.manifests_written = r.manifests_written;
                run.tags_deleted = r.tags_deleted;
                run.pushed_to_parent = r.pushed_to_parent;
            }
            for q in s.requests.iter_mut().filter(|q| q.run == number) {
                q.result = Some(result.to_owned());
            }
            s.last_error = r.first_error();
            if result == "success" {
                s.last_sync_utc = Some(schedule::rfc3339(now));
                let unix = now
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or_default();
                s.last_sync_unix = Some(unix);
                self.metrics.sync_last_success.set(unix);
            }
            for (name, l) in &repos {
                let entry = s.repositories.entry(name.clone()).or_default();
                entry.images_total = l.images_total;
                entry.images_synced = l.images_synced;
                entry.bytes_total = l.missing.iter().map(|(_, n)| n).sum();
                entry.bytes_done = r
                    .repo_bytes_done
                    .get(name)
                    .copied()
                    .unwrap_or_default()
                    .min(entry.bytes_total);
                entry.last_error = r.repo_errors.get(name).cloned();
                if entry.last_error.is_none() && entry.images_synced == entry.images_total {
                    entry.last_sync_utc = Some(schedule::rfc3339(now));
                }
            }
        });
        let took = now.duration_since(started).unwrap_or_default();
        match result {
            "success" | "paused" => tracing::info!(
                run = number,
                result,
                bytes = r.bytes_downloaded,
                blobs = r.blobs_downloaded,
                manifests = r.manifests_written,
                ?took,
                "sync finished"
            ),
            _ => {
                tracing::warn!(run = number, result, error = ?r.first_error(), ?took, "sync finished with errors")
            }
        }
    }

    /// Records the outcome of a contact with the parent.
    fn contact(&self, ok: bool) {
        self.metrics.parent_connected.set(i64::from(ok));
        let new = if ok {
            ConnectionState::Online
        } else {
            ConnectionState::Offline
        };
        let changed = self.state.read(|s| s.connection_state != new);
        if changed || ok {
            self.state.update(|s| {
                s.connection_state = new;
                if ok {
                    s.last_contact_utc = Some(schedule::rfc3339(SystemTime::now()));
                }
            });
        }
        if changed {
            tracing::info!(state = new.as_str(), "parent connection state changed");
        }
    }

    pub fn status(&self, storage_bytes: u64) -> Status {
        let s = self.state.snapshot();
        let conn = self.conn.read().unwrap_or_else(|p| p.into_inner()).clone();
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut repos: BTreeMap<String, RepoStatus> = s
            .repositories
            .iter()
            .map(|(name, r)| {
                (
                    name.clone(),
                    RepoStatus {
                        name: name.clone(),
                        tags: r.tags.len(),
                        images_total: r.images_total,
                        images_synced: r.images_synced,
                        bytes_total: r.bytes_total,
                        bytes_done: r.bytes_done,
                        last_sync_utc: r.last_sync_utc.clone(),
                        last_error: r.last_error.clone(),
                    },
                )
            })
            .collect();
        if let Some(live) = &live {
            let blobs = live.blobs.lock().unwrap_or_else(|p| p.into_inner()).clone();
            for (name, l) in live.repos.lock().unwrap_or_else(|p| p.into_inner()).iter() {
                let e = repos.entry(name.clone()).or_insert_with(|| RepoStatus {
                    name: name.clone(),
                    tags: 0,
                    images_total: 0,
                    images_synced: 0,
                    bytes_total: 0,
                    bytes_done: 0,
                    last_sync_utc: None,
                    last_error: None,
                });
                e.images_total = l.images_total;
                e.images_synced = l.images_synced;
                e.bytes_total = l.missing.iter().map(|(_, n)| n).sum();
                e.bytes_done = l
                    .missing
                    .iter()
                    .map(|(d, n)| {
                        blobs
                            .get(d)
                            .map_or(0, |p| p.load(Ordering::Relaxed).min(*n))
                    })
                    .sum();
            }
        }
        Status {
            name: conn.registry_name.clone(),
            mode: mode_name(self.opts.mode).into(),
            connection_state: s.connection_state.as_str().into(),
            parent: conn.parent_endpoint.clone(),
            login_server: conn.login_server(),
            last_sync_utc: s.last_sync_utc.clone(),
            sync_schedule: self.opts.schedule.cron_text().into(),
            sync_window: self.opts.schedule.window_text().into(),
            storage_bytes,
            repositories: repos.into_values().collect(),
            syncing: live.is_some(),
            last_error: s.last_error.clone(),
            scope_note: s.scope_note.clone(),
            last_run: s.last_run.clone(),
            outbox_pending: self.outbox.as_ref().map_or(0, |o| o.len()),
            requests: s.requests.clone(),
            platforms: self.opts.platforms.names(),
        }
    }

    /// Counts what the platform filter saved in `tree`, once its manifests are written;
    /// `counted` holds the children already counted (two tags of one index in a run).
    pub fn count_skipped(
        &self,
        tree: &image::Tree,
        counted: &mut std::collections::HashSet<Digest>,
    ) {
        let n = image::skipped_bytes(tree, counted);
        if n > 0 {
            self.metrics.sync_skipped_bytes.inc_by(n);
        }
    }
}

pub fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Readonly => "readonly",
        Mode::Readwrite => "readwrite",
    }
}
