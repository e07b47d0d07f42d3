//! Staging: download a named set of images now, ahead of a maintenance window, and report how
//! far each got. Every request is validated whole before anything downloads (unknown
//! repositories or tags, images outside the scope or of another registry fail with the reason),
//! is kept on disk with its progress, resumes after a restart, and pins what it staged so
//! neither eviction nor a tag deleted at the parent removes it.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use outpost_core::{Digest, Reference, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

use crate::metrics::StateLabels;
use crate::storage::{StorageError, Store};
use crate::sync::flight::End;
use crate::sync::image::{self, PlanError, Planner};
use crate::sync::parent::{self, ParentError};
use crate::sync::schedule::rfc3339;
use crate::sync::{SharedWork, Syncer};

/// Most images one request may name.
pub const MAX_IMAGES: usize = 1000;
/// Longest image reference accepted.
const MAX_IMAGE_LEN: usize = 512;
/// How often progress is written to the request's file while downloading.
const SAVE_EVERY: Duration = Duration::from_secs(1);
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_CAP: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Pending,
    Downloading,
    Staged,
    Failed,
}

impl ImageState {
    pub fn as_str(self) -> &'static str {
        match self {
            ImageState::Pending => "pending",
            ImageState::Downloading => "downloading",
            ImageState::Staged => "staged",
            ImageState::Failed => "failed",
        }
    }

    fn terminal(self) -> bool {
        matches!(self, ImageState::Staged | ImageState::Failed)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ImageStatus {
    /// As the request named it.
    pub image: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repository: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// What the reference resolved to at the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    pub state: ImageState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StagingRequest {
    pub id: String,
    pub created_utc: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_utc: Option<String>,
    /// `running` until every image is staged or failed, then `succeeded` or `failed`.
    pub state: String,
    pub images: Vec<ImageStatus>,
}

impl StagingRequest {
    fn done(&self) -> bool {
        self.images.iter().all(|i| i.state.terminal())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot save the staging request: {0}")]
    Store(#[from] StorageError),
}

pub struct Staging {
    syncer: Arc<Syncer>,
    requests: Mutex<BTreeMap<String, StagingRequest>>,
    respect_window: bool,
    /// Requests whose run is a task of this process.
    running: Mutex<HashSet<String>>,
}

/// An image name split into repository and reference, its registry checked against the parent.
fn parse_image(name: &str, parent_hosts: &[String]) -> Result<(RepositoryName, Reference), String> {
    let name = name.trim();
    // The first component is a registry when it has a '.' or ':' or is localhost (Docker's rule).
    let (host, rest) = match name.split_once('/') {
        Some((h, r)) if h.contains('.') || h.contains(':') || h == "localhost" => (Some(h), r),
        _ => (None, name),
    };
    if let Some(h) = host
        && !parent_hosts.iter().any(|p| p.eq_ignore_ascii_case(h))
    {
        return Err(format!(
            "registry {h} is not this Outpost's parent ({}); name images as in the parent, \
             e.g. hello-world:latest",
            parent_hosts.first().map_or("-", String::as_str)
        ));
    }
    let (path, digest) = match rest.split_once('@') {
        Some((p, d)) => (p, Some(d)),
        None => (rest, None),
    };
    // A ':' after the last '/' starts the tag.
    let (repo, tag) = match path.rfind(':') {
        Some(i) if !path[i..].contains('/') => (&path[..i], Some(&path[i + 1..])),
        _ => (path, None),
    };
    let repo: RepositoryName = repo.parse().map_err(|e| format!("{e}"))?;
    let reference = match (digest, tag) {
        (Some(d), _) => Reference::Digest(d.parse::<Digest>().map_err(|e| e.to_string())?),
        (None, Some(t)) => Reference::Tag(t.parse::<Tag>().map_err(|e| e.to_string())?),
        (None, None) => Reference::Tag("latest".parse::<Tag>().map_err(|e| e.to_string())?),
    };
    Ok((repo, reference))
}

fn new_id() -> String {
    let mut b = [0u8; 8];
    aws_lc_rs::rand::fill(&mut b).unwrap_or_default();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("stg-{hex}")
}

/// Where a request is kept among the store's documents (`<storage>/sync/staging/` on disk).
const DIR: &str = "staging";

fn key(id: &str) -> String {
    format!("{DIR}/{id}.json")
}

/// The id of the request kept under `key`, if the key is one of [`key`]'s.
fn id_of(k: &str) -> Option<&str> {
    k.strip_prefix(DIR)?
        .strip_prefix('/')?
        .strip_suffix(".json")
        .filter(|id| valid_id(id))
}

fn valid_id(id: &str) -> bool {
    id.len() <= 64 && id.starts_with("stg-") && id[4..].bytes().all(|b| b.is_ascii_hexdigit())
}

impl Staging {
    /// Loads the requests kept in the store.
    pub async fn open(
        syncer: Arc<Syncer>,
        respect_window: bool,
    ) -> Result<Arc<Self>, StorageError> {
        let s = Arc::new(Staging {
            syncer,
            requests: Mutex::new(BTreeMap::new()),
            respect_window,
            running: Mutex::new(HashSet::new()),
        });
        s.refresh().await?;
        Ok(s)
    }

    fn start_pending(self: &Arc<Self>) {
        let ids: Vec<String> = self
            .reqs()
            .values()
            .filter(|r| !r.done())
            .map(|r| r.id.clone())
            .collect();
        for id in ids {
            if self.spawn(id.clone()) {
                tracing::info!(id = %id, "resuming staging request");
            }
        }
    }

    /// Reads the requests in the store: all of them at start, then those other processes
    /// wrote (new ones, and the progress of those this process does not run; finished ones do
    /// not change and are not read again).
    async fn refresh(&self) -> Result<(), StorageError> {
        let store = self.store().clone();
        let running = self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // What was known before listing: a request accepted here meanwhile is kept even if the
        // listing missed it.
        let before: HashSet<String> = self.reqs().keys().cloned().collect();
        let mut seen = HashSet::new();
        for k in store.doc_list(DIR).await? {
            let Some(id) = id_of(&k) else {
                tracing::warn!(request = %k, "staging request with a bad id; ignored");
                continue;
            };
            seen.insert(id.to_owned());
            if self.is_done(id) || running.contains(id) {
                continue;
            }
            let Some(raw) = store.doc_get(&k).await? else {
                continue;
            };
            match serde_json::from_slice::<StagingRequest>(&raw) {
                Ok(r) if r.id == id => {
                    self.reqs().insert(r.id.clone(), r);
                }
                Ok(_) => tracing::warn!(request = %k, "staging request with a bad id; ignored"),
                Err(e) => {
                    tracing::warn!(request = %k, error = %e, "unreadable staging request; ignored")
                }
            }
        }
        // Forgotten (DELETE) through another process.
        self.reqs()
            .retain(|id, _| seen.contains(id) || running.contains(id) || !before.contains(id));
        self.publish_metrics();
        Ok(())
    }

    fn reqs(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, StagingRequest>> {
        // A panic while holding the lock leaves plain data behind; keep using it.
        self.requests.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_done(&self, id: &str) -> bool {
        self.reqs().get(id).is_some_and(|r| r.done())
    }

    /// Accepts a request; it runs in the background.
    pub async fn submit(self: &Arc<Self>, images: Vec<String>) -> Result<String, StagingError> {
        if images.is_empty() {
            return Err(StagingError::Invalid("\"images\" is empty".into()));
        }
        if images.len() > MAX_IMAGES {
            return Err(StagingError::Invalid(format!(
                "at most {MAX_IMAGES} images per request"
            )));
        }
        if let Some(bad) = images
            .iter()
            .find(|i| i.trim().is_empty() || i.len() > MAX_IMAGE_LEN)
        {
            return Err(StagingError::Invalid(format!(
                "image name {bad:?} is empty or longer than {MAX_IMAGE_LEN} characters"
            )));
        }
        let id = new_id();
        let req = StagingRequest {
            id: id.clone(),
            created_utc: rfc3339(SystemTime::now()),
            finished_utc: None,
            state: "running".into(),
            images: images
                .into_iter()
                .map(|image| ImageStatus {
                    image: image.trim().to_owned(),
                    repository: None,
                    reference: None,
                    digest: None,
                    state: ImageState::Pending,
                    bytes_done: 0,
                    bytes_total: 0,
                    error: None,
                })
                .collect(),
        };
        self.write(&req).await?;
        self.reqs().insert(id.clone(), req);
        self.publish_metrics();
        if self.syncer.leadership().is_leader() {
            tracing::info!(id = %id, "staging request accepted");
            self.spawn(id.clone());
        } else {
            tracing::info!(id = %id, "staging request accepted; the leading process downloads it");
        }
        Ok(id)
    }

    /// Submits `images` unless a request for the same set exists (start-up staging, which
    /// runs at every restart). The id, and whether a new request was made.
    pub async fn submit_once(
        self: &Arc<Self>,
        images: Vec<String>,
    ) -> Result<(String, bool), StagingError> {
        let mut want: Vec<String> = images.iter().map(|i| i.trim().to_owned()).collect();
        want.sort();
        want.dedup();
        let existing = self
            .reqs()
            .values()
            .find(|r| {
                let mut have: Vec<String> = r.images.iter().map(|i| i.image.clone()).collect();
                have.sort();
                have.dedup();
                have == want
            })
            .map(|r| r.id.clone());
        match existing {
            Some(id) => Ok((id, false)),
            None => Ok((self.submit(want).await?, true)),
        }
    }

    pub fn get(&self, id: &str) -> Option<StagingRequest> {
        self.reqs().get(id).cloned()
    }

    pub fn list(&self) -> Vec<StagingRequest> {
        self.reqs().values().cloned().collect()
    }

    /// Forgets a finished request, which unpins its images. False if unknown or still running.
    pub async fn remove(&self, id: &str) -> Result<bool, StagingError> {
        if !self.is_done(id) {
            return Ok(false);
        }
        if valid_id(id) {
            self.store().doc_delete(&key(id)).await?;
        }
        self.reqs().remove(id);
        self.publish_metrics();
        Ok(true)
    }

    fn staged(&self) -> impl Iterator<Item = ImageStatus> {
        let reqs = self.reqs();
        reqs.values()
            .flat_map(|r| r.images.iter())
            .filter(|i| i.state == ImageState::Staged)
            .cloned()
            .collect::<Vec<_>>()
            .into_iter()
    }

    async fn write(&self, req: &StagingRequest) -> Result<(), StorageError> {
        let data = serde_json::to_vec_pretty(req)
            .map_err(|e| StorageError::Io(std::io::Error::other(e)))?;
        self.store().doc_put(&key(&req.id), data.into()).await
    }

    fn store(&self) -> &Arc<dyn Store> {
        self.syncer.store()
    }

    fn publish_metrics(&self) {
        let mut counts: BTreeMap<&'static str, i64> = BTreeMap::new();
        for s in [
            ImageState::Pending,
            ImageState::Downloading,
            ImageState::Staged,
            ImageState::Failed,
        ] {
            counts.insert(s.as_str(), 0);
        }
        for r in self.reqs().values() {
            for i in &r.images {
                *counts.entry(i.state.as_str()).or_default() += 1;
            }
        }
        let g = &self.syncer.metrics().staging_images;
        for (state, n) in counts {
            g.get_or_create(&StateLabels { state }).set(n);
        }
    }

    /// Changes image `idx` of request `id`; saves when `save` (progress is saved less often).
    async fn update(&self, id: &str, idx: usize, save: bool, f: impl FnOnce(&mut ImageStatus)) {
        let snapshot = {
            let mut reqs = self.reqs();
            let Some(r) = reqs.get_mut(id) else { return };
            let Some(i) = r.images.get_mut(idx) else {
                return;
            };
            let before = i.state;
            f(i);
            let changed = before != i.state;
            if r.done() && r.finished_utc.is_none() {
                r.finished_utc = Some(rfc3339(SystemTime::now()));
                r.state = if r.images.iter().all(|i| i.state == ImageState::Staged) {
                    "succeeded".into()
                } else {
                    "failed".into()
                };
            }
            (save || changed).then(|| r.clone())
        };
        if let Some(r) = snapshot {
            if let Err(e) = self.write(&r).await {
                tracing::warn!(id = %id, error = %e, "cannot save staging progress");
            }
            self.publish_metrics();
        }
    }

    /// Runs request `id` here unless it already runs here; whether it started.
    fn spawn(self: &Arc<Self>, id: String) -> bool {
        if !self
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone())
        {
            return false;
        }
        let me = self.clone();
        tokio::spawn(async move {
            me.run(&id).await;
            me.running
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        });
        true
    }

    /// False once another process leads: it continues the request from what is stored.
    fn still_leading(&self, id: &str) -> bool {
        let leading = self.syncer.leadership().is_leader();
        if !leading {
            tracing::info!(id = %id, "no longer leading; the leading process continues this staging request");
        }
        leading
    }

    async fn run(self: &Arc<Self>, id: &str) {
        let Some(req) = self.get(id) else { return };
        // 1. Validate every image before downloading any.
        let mut retry = RETRY_FIRST;
        loop {
            if !self.still_leading(id) {
                return;
            }
            let Some(req) = self.get(id) else { return };
            let mut waiting = None;
            for (idx, img) in req.images.iter().enumerate() {
                if img.state.terminal() || img.digest.is_some() {
                    continue;
                }
                match self.validate(&img.image).await {
                    Ok((repo, reference, digest)) => {
                        self.update(id, idx, true, |i| {
                            i.repository = Some(repo.to_string());
                            i.reference = Some(reference.to_string());
                            i.digest = Some(digest.to_string());
                            i.error = None;
                        })
                        .await
                    }
                    Err(Check::Fail(why)) => {
                        tracing::warn!(id = %id, image = %img.image, reason = %why, "staging image refused");
                        self.update(id, idx, true, |i| {
                            i.state = ImageState::Failed;
                            i.error = Some(why);
                        })
                        .await
                    }
                    Err(Check::Wait(why)) => {
                        self.update(id, idx, true, |i| {
                            i.error = Some(format!("waiting for the parent: {why}"))
                        })
                        .await;
                        waiting = Some(why);
                    }
                }
            }
            match waiting {
                None => break,
                Some(why) => {
                    tracing::info!(id = %id, error = %why, ?retry, "parent unreachable; staging validation retries");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_CAP);
                }
            }
        }
        drop(req);
        // 2. Download, image by image.
        let count = self.get(id).map_or(0, |r| r.images.len());
        for idx in 0..count {
            let mut retry = RETRY_FIRST;
            loop {
                if !self.still_leading(id) {
                    return;
                }
                let Some(img) = self.get(id).and_then(|r| r.images.get(idx).cloned()) else {
                    return;
                };
                if img.state.terminal() {
                    break;
                }
                let deadline = match self.window().await {
                    Some(d) => d,
                    None => return,
                };
                match self.download(id, idx, &img, deadline).await {
                    Ok(()) => {
                        tracing::info!(id = %id, image = %img.image, "image staged");
                        self.update(id, idx, true, |i| {
                            i.state = ImageState::Staged;
                            i.bytes_done = i.bytes_total;
                            i.error = None;
                        })
                        .await;
                        break;
                    }
                    Err(Step::Paused) => {
                        self.update(id, idx, true, |i| {
                            i.state = ImageState::Pending;
                            i.error = Some("sync window closed; continues in the next one".into());
                        })
                        .await;
                    }
                    Err(Step::Wait(why)) => {
                        tracing::info!(id = %id, image = %img.image, error = %why, ?retry, "staging download interrupted; retrying");
                        self.update(id, idx, true, |i| {
                            i.error = Some(format!("waiting for the parent: {why}"));
                        })
                        .await;
                        tokio::time::sleep(retry).await;
                        retry = (retry * 2).min(RETRY_CAP);
                    }
                    Err(Step::Fail(why)) => {
                        tracing::warn!(id = %id, image = %img.image, error = %why, "staging image failed");
                        self.update(id, idx, true, |i| {
                            i.state = ImageState::Failed;
                            i.error = Some(why);
                        })
                        .await;
                        break;
                    }
                }
            }
        }
        if let Some(r) = self.get(id) {
            let staged = r
                .images
                .iter()
                .filter(|i| i.state == ImageState::Staged)
                .count();
            tracing::info!(id = %id, staged, failed = r.images.len() - staged, state = %r.state, "staging request finished");
        }
    }

    /// With `--respect-window`, waits for an open sync window and returns its end; otherwise
    /// returns at once with no deadline.
    async fn window(&self) -> Option<Option<SystemTime>> {
        if !self.respect_window {
            return Some(None);
        }
        let schedule = &self.syncer.options().schedule;
        loop {
            let now = SystemTime::now();
            if schedule.window_text() == "continuous" {
                return Some(None);
            }
            if let Some((_, end)) = schedule.open_window_at(now) {
                return Some(Some(end));
            }
            let next = schedule.next_after(now)?;
            let wait = next.duration_since(now).unwrap_or_default();
            tokio::time::sleep(wait.max(Duration::from_millis(100))).await;
        }
    }

    async fn validate(&self, name: &str) -> Result<(RepositoryName, Reference, Digest), Check> {
        let (repo, reference) =
            parse_image(name, &self.syncer.parent_hosts()).map_err(Check::Fail)?;
        if !self.syncer.in_scope(repo.as_str()) {
            return Err(Check::Fail(format!(
                "repository {repo} is outside this registry's sync scope (--repository)"
            )));
        }
        let parent = self.syncer.parent();
        match parent.resolve(&repo, &reference).await {
            Ok(d) => {
                self.syncer.note_contact(true);
                Ok((repo, reference, d))
            }
            Err(ParentError::NotFound(m)) => Err(Check::Fail(format!(
                "{repo}:{reference} not found at the parent: {m}"
            ))),
            Err(ParentError::Denied(m)) => Err(Check::Fail(format!(
                "the sync token may not read {repo}: {m}"
            ))),
            Err(e) if e.is_contact_failure() => {
                self.syncer.note_contact(false);
                Err(Check::Wait(e.to_string()))
            }
            Err(e) => Err(Check::Fail(e.to_string())),
        }
    }

    async fn download(
        &self,
        id: &str,
        idx: usize,
        img: &ImageStatus,
        deadline: Option<SystemTime>,
    ) -> Result<(), Step> {
        let fail = |m: String| Step::Fail(m);
        let repo: RepositoryName = img
            .repository
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| fail(format!("{e}")))?;
        let digest: Digest = img
            .digest
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| fail(format!("{e}")))?;
        let store = self.syncer.store().clone();
        let parent = self.syncer.parent();
        let planner = Planner {
            store: &*store,
            parent: &parent,
            attempts: parent::ATTEMPTS,
            on_fetch: None,
            platforms: &self.syncer.options().platforms,
        };
        let tree = planner
            .plan(&repo, &digest, None)
            .await
            .map_err(|e| match e {
                PlanError::Parent(p) if p.is_contact_failure() => Step::Wait(p.to_string()),
                other => Step::Fail(other.to_string()),
            })?;
        let (present, missing) = image::split_stored(&*store, &tree)
            .await
            .map_err(|e| fail(e.to_string()))?;
        let total = present + missing.iter().map(|(_, n)| n).sum::<u64>();
        self.update(id, idx, true, |i| {
            i.state = ImageState::Downloading;
            i.bytes_total = total;
            i.bytes_done = present;
            i.error = None;
        })
        .await;
        let flights = self.syncer.flights().clone();
        // Progress of this image: what its flights have stored so far.
        let progress = {
            let (flights, missing) = (flights.clone(), missing.clone());
            move || -> u64 {
                missing
                    .iter()
                    .map(|(d, n)| flights.progress_of(d).unwrap_or(0).min(*n))
                    .sum()
            }
        };
        let work = flights.fetch_all(
            parent.clone(),
            &repo,
            missing,
            deadline,
            self.syncer.options().concurrency,
        );
        tokio::pin!(work);
        let mut done_bytes = 0u64;
        let ends = loop {
            tokio::select! {
                ends = &mut work => break ends,
                _ = tokio::time::sleep(SAVE_EVERY) => {
                    let now = present + progress();
                    self.update(id, idx, true, |i| i.bytes_done = now.min(total)).await;
                }
            }
        };
        let mut paused = false;
        for (d, n, end) in ends {
            match end {
                End::Done => done_bytes += n,
                End::Paused => paused = true,
                End::Failed {
                    contact: true,
                    message,
                    ..
                } => return Err(Step::Wait(message)),
                End::Failed { message, .. } => return Err(fail(format!("blob {d}: {message}"))),
            }
        }
        self.update(id, idx, true, |i| {
            i.bytes_done = (present + done_bytes).min(total)
        })
        .await;
        if paused {
            return Err(Step::Paused);
        }
        image::write_manifests(&*store, &repo, &tree)
            .await
            .map_err(|(d, e)| fail(format!("manifest {d}: {e}")))?;
        self.syncer
            .count_skipped(&tree, &mut std::collections::HashSet::new());
        if let Some(Ok(tag)) = img.reference.as_deref().map(str::parse::<Tag>) {
            image::point_tag(&*store, &repo, &tag, &digest)
                .await
                .map_err(|e| fail(format!("tag {tag}: {e}")))?;
            self.syncer.record_tag(repo.as_str(), tag.as_str(), &digest);
        }
        Ok(())
    }
}

/// Polled by the syncer with its state, every few seconds and at each leadership change:
/// continues every request a restart interrupted, and keeps the requests in step with the
/// store when several processes share it (the leader picks up what the others accepted; the
/// others show the leader's progress). Only the leader runs requests.
#[async_trait::async_trait]
impl SharedWork for Staging {
    async fn poll(self: Arc<Self>, leading: bool, sole: bool) {
        if !sole && let Err(e) = self.refresh().await {
            tracing::warn!(error = %e, "cannot read staging requests");
        }
        if leading {
            self.start_pending();
        }
    }
}

/// (repository, digest) of every image a staging request kept in the store names, whatever
/// its state (a download in progress writes its manifests before its tag; a digest reference
/// has no tag at all), read from the store so that `gc` beside a running server sees them. A
/// request that does not parse is an error: what it pins is unknown.
pub async fn pinned_in_store(store: &dyn Store) -> Result<HashSet<(String, Digest)>, StorageError> {
    let mut out = HashSet::new();
    for k in store.doc_list(DIR).await? {
        if id_of(&k).is_none() {
            continue;
        }
        // Forgotten (DELETE) since the listing.
        let Some(raw) = store.doc_get(&k).await? else {
            continue;
        };
        let req: StagingRequest = serde_json::from_slice(&raw).map_err(|e| {
            StorageError::Io(std::io::Error::other(format!(
                "unreadable staging request {k}: {e}"
            )))
        })?;
        out.extend(req.images.into_iter().filter_map(|i| {
            let digest = i.digest?.parse().ok()?;
            Some((i.repository?, digest))
        }));
    }
    Ok(out)
}

/// Tags staged images hold: sync does not delete these when the parent does.
impl crate::sync::PinnedTags for Staging {
    fn pinned_tags(&self) -> HashSet<(String, String)> {
        self.staged()
            .filter_map(|i| {
                let r = i.reference?;
                let repo = i.repository?;
                (!r.contains(':')).then_some((repo, r))
            })
            .collect()
    }
}

impl crate::service::retention::PinSource for Staging {
    fn pinned(&self) -> HashSet<(String, Digest)> {
        self.staged()
            .filter_map(|i| Some((i.repository?, i.digest?.parse().ok()?)))
            .collect()
    }
}

enum Check {
    Fail(String),
    Wait(String),
}

enum Step {
    Fail(String),
    Wait(String),
    Paused,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_names() {
        let hosts = vec!["myacr.azurecr.io".to_owned(), "gw.example:8443".to_owned()];
        let ok = |n: &str| parse_image(n, &hosts).map(|(r, f)| format!("{r} {f}"));
        assert_eq!(ok("demo-image:latest").unwrap(), "demo-image latest");
        assert_eq!(ok("demo-image").unwrap(), "demo-image latest");
        assert_eq!(ok("team/app:v1.2").unwrap(), "team/app v1.2");
        assert_eq!(ok("myacr.azurecr.io/team/app:v1").unwrap(), "team/app v1");
        assert_eq!(ok("gw.example:8443/app:v1").unwrap(), "app v1");
        let d = format!("sha256:{}", "a".repeat(64));
        assert_eq!(ok(&format!("app@{d}")).unwrap(), format!("app {d}"));
        assert_eq!(ok(&format!("app:v1@{d}")).unwrap(), format!("app {d}"));
        assert!(
            ok("docker.io/library/nginx:1")
                .unwrap_err()
                .contains("not this Outpost's parent")
        );
        assert!(ok("Bad/Name:1").is_err());
        assert!(ok("app:bad tag").is_err());
        assert!(ok("app@sha256:zz").is_err());
    }

    #[test]
    fn ids() {
        let id = new_id();
        assert!(valid_id(&id), "{id}");
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id("stg-zz"));
    }
}
