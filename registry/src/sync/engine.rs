//! One sync run: push the outbox up (readwrite), resolve the scope, list tags, fetch the
//! manifests that changed (indexes with the platform manifests `--platform` keeps, and
//! referrers), download each missing blob once, then write manifests children first and tags
//! last, and follow tags the parent deleted.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use futures_util::StreamExt;
use outpost_core::{Digest, Reference, RepositoryName, Tag};

use super::flight::{End, FlightOptions};
use super::image::{self, MAX_DEPTH, PlanError, Planner, Tree, link};
use super::parent::{self, Parent, ParentError};
use super::transfer;
use super::{LiveRepo, LiveRun, Syncer};
use crate::content::manifest;
use crate::storage::StorageError;

#[derive(Debug, Default)]
pub struct Report {
    /// The parent could not be reached or refused the sync token.
    pub contact_error: Option<String>,
    pub paused: bool,
    pub errors: Vec<String>,
    pub repo_errors: BTreeMap<String, String>,
    pub repo_bytes_done: BTreeMap<String, u64>,
    pub bytes_downloaded: u64,
    pub blobs_downloaded: u64,
    pub manifests_written: u64,
    pub tags_deleted: u64,
    pub pushed_to_parent: u64,
}

impl Report {
    pub fn result(&self) -> &'static str {
        if self.contact_error.is_some() {
            "failed"
        } else if self.paused {
            "paused"
        } else if !self.errors.is_empty() || !self.repo_errors.is_empty() {
            "partial"
        } else {
            "success"
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.contact_error
            .clone()
            .or_else(|| self.errors.first().cloned())
            .or_else(|| {
                self.repo_errors
                    .iter()
                    .next()
                    .map(|(r, e)| format!("{r}: {e}"))
            })
    }

    fn repo_error(&mut self, repo: &RepositoryName, e: impl std::fmt::Display) {
        self.repo_errors
            .entry(repo.as_str().to_owned())
            .or_insert_with(|| e.to_string());
    }
}

struct TagPlan {
    repo: RepositoryName,
    tag: Tag,
    digest: Digest,
    tree: Tree,
}

pub struct Run {
    syncer: Arc<Syncer>,
    parent: Arc<Parent>,
    deadline: Option<SystemTime>,
    live: Arc<LiveRun>,
    report: Report,
}

impl Run {
    pub(super) fn new(
        syncer: Arc<Syncer>,
        parent: Arc<Parent>,
        deadline: Option<SystemTime>,
        live: Arc<LiveRun>,
    ) -> Self {
        Run {
            syncer,
            parent,
            deadline,
            live,
            report: Report::default(),
        }
    }

    /// The window closed, or this process stopped leading (another one syncs now): the run
    /// pauses as at the end of a window, keeping what it stored.
    fn window_closed(&self) -> bool {
        self.deadline.is_some_and(|d| SystemTime::now() >= d)
            || !self.syncer.leadership().is_leader()
    }

    /// Notes a parent error; true when it means the parent is unusable for this run.
    fn contact_failed(&mut self, e: &ParentError) -> bool {
        if e.is_contact_failure() {
            self.syncer.contact(false);
            self.report.contact_error = Some(e.to_string());
            true
        } else {
            false
        }
    }

    pub async fn execute(mut self) -> Report {
        match self.parent.ping().await {
            Ok(outpost) => self.syncer.note_parent_kind(outpost),
            Err(e) => {
                self.contact_failed(&e);
                return self.report;
            }
        }
        self.syncer.contact(true);
        if let Err(e) = self.flush_outbox().await {
            if self.contact_failed(&e) {
                return self.report;
            }
            self.report.errors.push(format!("outbox: {e}"));
        }
        let repos = match self.resolve_scope().await {
            Ok(r) => r,
            Err(e) => {
                if !self.contact_failed(&e) {
                    self.report.errors.push(e.to_string());
                }
                return self.report;
            }
        };
        let pending = match &self.syncer.outbox {
            Some(o) => o.pending_tags().await,
            None => Default::default(),
        };

        // Tags of every repository.
        let mut listed: Vec<(RepositoryName, Vec<Tag>)> = Vec::new();
        for repo in repos {
            match self.parent.tags(&repo).await {
                Ok(tags) => {
                    let tags: Vec<Tag> = tags.iter().filter_map(|t| t.parse().ok()).collect();
                    listed.push((repo, tags));
                }
                Err(e) => {
                    if self.contact_failed(&e) {
                        return self.report;
                    }
                    self.report.repo_error(&repo, e);
                }
            }
        }
        {
            let mut live = self.live.repos.lock().unwrap_or_else(|p| p.into_inner());
            for (repo, tags) in &listed {
                live.insert(
                    repo.as_str().to_owned(),
                    LiveRepo {
                        images_total: tags.len() as u64,
                        ..Default::default()
                    },
                );
            }
        }

        // Which tags changed, and what they need.
        let concurrency = self.syncer.opts.concurrency.max(1);
        let jobs: Vec<(RepositoryName, Tag)> = listed
            .iter()
            .flat_map(|(r, tags)| tags.iter().map(move |t| (r.clone(), t.clone())))
            .collect();
        let plans: Vec<(RepositoryName, Tag, Result<TagPlan, PlanError>)> = {
            let this = &self;
            futures_util::stream::iter(jobs)
                .map(|(repo, tag)| async move {
                    let res = this.plan_tag(&repo, &tag).await;
                    (repo, tag, res)
                })
                .buffer_unordered(concurrency * 2)
                .collect()
                .await
        };
        let mut ok_plans = Vec::new();
        for (repo, tag, res) in plans {
            match res {
                Ok(p) => ok_plans.push(p),
                Err(PlanError::Parent(e)) if self.contact_failed(&e) => return self.report,
                Err(PlanError::Skipped) => {}
                Err(e) => {
                    tracing::warn!(repository = %repo, %tag, error = %e, "cannot plan tag");
                    self.report.repo_error(&repo, format!("{tag}: {e}"));
                }
            }
        }

        if let Err(e) = self.transfer(&ok_plans).await {
            if self.contact_failed(&e) {
                return self.report;
            }
            self.report.errors.push(e.to_string());
        }
        self.commit(&ok_plans, &pending).await;
        let mut keep = pending.clone();
        keep.extend(self.syncer.pinned_tags());
        self.follow_deletions(&listed, &keep).await;
        self.report
    }

    /// Repositories in scope: exact names as given, wildcards matched against the catalog.
    async fn resolve_scope(&mut self) -> Result<Vec<RepositoryName>, ParentError> {
        let patterns = self.syncer.opts.repositories.clone();
        let mut out: BTreeSet<RepositoryName> = BTreeSet::new();
        let needs_catalog = patterns.is_empty() || patterns.iter().any(|p| !p.is_exact());
        for p in patterns.iter().filter(|p| p.is_exact()) {
            match p.as_str().parse() {
                Ok(r) => {
                    out.insert(r);
                }
                Err(e) => tracing::warn!(pattern = p.as_str(), error = %e, "not a repository name"),
            }
        }
        let mut note = None;
        if needs_catalog {
            match self.parent.catalog().await {
                Ok(names) => {
                    for n in names {
                        let in_scope =
                            patterns.is_empty() || patterns.iter().any(|p| p.matches(&n));
                        if in_scope && let Ok(r) = n.parse() {
                            out.insert(r);
                        }
                    }
                }
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    let wild: Vec<&str> = if patterns.is_empty() {
                        vec!["(all repositories)"]
                    } else {
                        patterns
                            .iter()
                            .filter(|p| !p.is_exact())
                            .map(|p| p.as_str())
                            .collect()
                    };
                    let msg = format!(
                        "{} matched nothing: the parent refused its catalog ({e}); name \
                         repositories exactly with --repository to sync them",
                        wild.join(", ")
                    );
                    tracing::warn!("{msg}");
                    note = Some(msg);
                    if out.is_empty() {
                        self.report.errors.push(format!("catalog refused: {e}"));
                    }
                }
            }
        }
        let names: Vec<String> = out.iter().map(|r| r.as_str().to_owned()).collect();
        self.syncer.state.update(|s| {
            s.scope_note = note;
            // Forget repositories that left the scope (their content stays until gc).
            s.repositories.retain(|k, _| names.contains(k));
        });
        Ok(out.into_iter().collect())
    }

    async fn plan_tag(&self, repo: &RepositoryName, tag: &Tag) -> Result<TagPlan, PlanError> {
        let digest = self.parent.tag_digest(repo, tag).await?;
        let d = digest.to_string();
        if self
            .syncer
            .state
            .read(|s| s.is_evicted(repo.as_str(), tag.as_str(), &d))
        {
            // Evicted under --max-storage and unchanged at the parent: a pull brings it back.
            return Err(PlanError::Skipped);
        }
        let planner = Planner {
            store: &*self.syncer.store,
            parent: &self.parent,
            attempts: parent::ATTEMPTS,
            on_fetch: None,
            platforms: &self.syncer.opts.platforms,
        };
        let tree = planner.plan(repo, &digest, None).await?;
        Ok(TagPlan {
            repo: repo.clone(),
            tag: tag.clone(),
            digest,
            tree,
        })
    }

    /// Downloads every missing blob once, however many images and repositories share it.
    async fn transfer(&mut self, plans: &[TagPlan]) -> Result<(), ParentError> {
        let store = self.syncer.store.clone();
        // Digest -> (size, repositories that need it), in a stable order.
        let mut needed: BTreeMap<Digest, (u64, BTreeSet<RepositoryName>)> = BTreeMap::new();
        for p in plans {
            for (d, size) in &p.tree.blobs {
                needed
                    .entry(d.clone())
                    .or_insert((*size, BTreeSet::new()))
                    .1
                    .insert(p.repo.clone());
            }
        }
        let mut fetch = Vec::new();
        for (digest, (size, repos)) in needed {
            match store.blob_size(&digest).await {
                Ok(Some(_)) => {
                    for r in &repos {
                        if let Err(e) = link(&*store, r, &digest).await {
                            self.report.repo_error(r, e);
                        }
                    }
                }
                Ok(None) => fetch.push((digest, size, repos)),
                Err(e) => self.report.errors.push(format!("storage: {e}")),
            }
        }
        {
            let mut live = self.live.repos.lock().unwrap_or_else(|p| p.into_inner());
            let mut blobs = self.live.blobs.lock().unwrap_or_else(|p| p.into_inner());
            for (d, size, repos) in &fetch {
                blobs.insert(d.clone(), Arc::new(AtomicU64::new(0)));
                for r in repos {
                    if let Some(l) = live.get_mut(r.as_str()) {
                        l.missing.push((d.clone(), *size));
                    }
                }
            }
        }
        if fetch.is_empty() {
            return Ok(());
        }
        if self.window_closed() {
            self.report.paused = true;
            return Ok(());
        }
        let total: u64 = fetch.iter().map(|(_, s, _)| s).sum();
        tracing::info!(
            blobs = fetch.len(),
            bytes = total,
            "downloading missing blobs"
        );
        let parent = self.parent.clone();
        let flights = self.syncer.flights.clone();
        let deadline = self.deadline;
        let live = self.live.clone();
        let results: Vec<_> = futures_util::stream::iter(fetch)
            .map(|(digest, size, repos)| {
                let parent = parent.clone();
                let flights = flights.clone();
                let live = live.clone();
                async move {
                    // Any repository that needs it has it at the parent; take the first.
                    let Some(first) = repos.iter().next() else {
                        return (digest, size, repos, End::Done, 0);
                    };
                    let (flight, started) = flights.fetch(
                        parent,
                        first,
                        &digest,
                        FlightOptions {
                            size: Some(size),
                            deadline,
                            attempts: transfer::ATTEMPTS,
                        },
                    );
                    live.blobs
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(digest.clone(), flight.progress.clone());
                    let end = flight.wait().await;
                    let downloaded = if started {
                        flight.downloaded.load(Ordering::Relaxed)
                    } else {
                        0
                    };
                    (digest, size, repos, end, downloaded)
                }
            })
            .buffer_unordered(self.syncer.opts.concurrency.max(1))
            .collect()
            .await;
        let mut contact = None;
        for (digest, size, repos, end, downloaded) in results {
            self.report.bytes_downloaded += downloaded;
            match end {
                End::Done => {
                    self.report.blobs_downloaded += 1;
                    for r in &repos {
                        *self
                            .report
                            .repo_bytes_done
                            .entry(r.as_str().to_owned())
                            .or_default() += size;
                        if let Err(e) = link(&*store, r, &digest).await {
                            self.report.repo_error(r, e);
                        }
                    }
                }
                End::Paused => self.report.paused = true,
                End::Failed {
                    message,
                    contact: true,
                    ..
                } => contact = Some(ParentError::Unreachable(message)),
                End::Failed { message, .. } => {
                    tracing::warn!(%digest, error = %message, "blob download failed");
                    for r in &repos {
                        self.report
                            .repo_error(r, format!("blob {digest}: {message}"));
                    }
                }
            }
        }
        match contact {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Writes manifests (children first) and points tags, for every image whose blobs are
    /// all stored. Tags with a local push still waiting for the parent are left alone.
    async fn commit(&mut self, plans: &[TagPlan], pending: &HashSet<(String, String)>) {
        let store = self.syncer.store.clone();
        let mut skipped = HashSet::new();
        for p in plans {
            if !image::blobs_stored(&*store, &p.tree).await.unwrap_or(false) {
                continue;
            }
            match image::write_manifests(&*store, &p.repo, &p.tree).await {
                Ok(n) => {
                    self.report.manifests_written += n;
                    self.syncer.count_skipped(&p.tree, &mut skipped);
                }
                Err((digest, e)) => {
                    tracing::warn!(repository = %p.repo, %digest, error = %e, "cannot store manifest");
                    self.report.repo_error(&p.repo, format!("{digest}: {e}"));
                    continue;
                }
            }
            let key = (p.repo.as_str().to_owned(), p.tag.as_str().to_owned());
            let local = store
                .manifest_by_tag(&p.repo, &p.tag)
                .await
                .ok()
                .map(|m| m.digest);
            if local.as_ref() != Some(&p.digest) {
                if pending.contains(&key) {
                    tracing::info!(repository = %p.repo, tag = %p.tag, "tag has a local push waiting for the parent; left as is");
                    continue;
                }
                if let Err(e) = image::point_tag(&*store, &p.repo, &p.tag, &p.digest).await {
                    self.report.repo_error(&p.repo, format!("{}: {e}", p.tag));
                    continue;
                }
                if let Some(old) = local {
                    tracing::info!(repository = %p.repo, tag = %p.tag, from = %old, to = %p.digest, "tag moved to follow the parent");
                }
            }
            let digest = p.digest.to_string();
            let known = self.syncer.state.read(|s| {
                s.repositories.get(&key.0).and_then(|r| r.tags.get(&key.1)) == Some(&digest)
            });
            // Saving the state fsyncs; an unchanged tag (the common case) does not need it.
            if !known {
                self.syncer.state.update(|s| {
                    s.repositories
                        .entry(key.0.clone())
                        .or_default()
                        .tags
                        .insert(key.1.clone(), digest);
                });
            }
            if let Some(l) = self
                .live
                .repos
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get_mut(p.repo.as_str())
            {
                l.images_synced += 1;
            }
        }
    }

    /// Removes local tags the parent no longer has (repositories whose tags were listed).
    async fn follow_deletions(
        &mut self,
        listed: &[(RepositoryName, Vec<Tag>)],
        pending: &HashSet<(String, String)>,
    ) {
        let store = self.syncer.store.clone();
        for (repo, tags) in listed {
            let at_parent: HashSet<&str> = tags.iter().map(|t| t.as_str()).collect();
            let local = match store.tags(repo).await {
                Ok(t) => t,
                Err(StorageError::RepositoryUnknown) => continue,
                Err(e) => {
                    self.report.repo_error(repo, e);
                    continue;
                }
            };
            for t in local {
                if at_parent.contains(t.as_str())
                    || pending.contains(&(repo.as_str().to_owned(), t.clone()))
                {
                    continue;
                }
                let Ok(tag) = t.parse::<Tag>() else { continue };
                match store.tag_delete(repo, &tag).await {
                    Ok(()) => {
                        tracing::info!(repository = %repo, tag = %t, "tag deleted to follow the parent");
                        self.report.tags_deleted += 1;
                        self.syncer.state.update(|s| {
                            if let Some(r) = s.repositories.get_mut(repo.as_str()) {
                                r.tags.remove(&t);
                            }
                        });
                    }
                    Err(e) => self.report.repo_error(repo, format!("delete tag {t}: {e}")),
                }
            }
        }
    }

    /// Readwrite: uploads queued client pushes to the parent, oldest first. Stops at the first
    /// failure that may pass (the queue keeps its order); sets aside what the parent refuses.
    async fn flush_outbox(&mut self) -> Result<(), ParentError> {
        let Some(outbox) = self.syncer.outbox.clone() else {
            return Ok(());
        };
        let entries = outbox
            .entries()
            .await
            .map_err(|e| ParentError::Protocol(format!("outbox unreadable: {e}")))?;
        for (path, e) in entries {
            if self.window_closed() {
                self.report.paused = true;
                return Ok(());
            }
            let parsed = (
                e.repo.parse::<RepositoryName>(),
                e.digest.parse::<Digest>(),
                e.tag.as_deref().map(str::parse::<Tag>).transpose(),
            );
            let (Ok(repo), Ok(digest), Ok(tag)) = parsed else {
                let _ = outbox.set_aside(&path, "invalid entry").await;
                continue;
            };
            match self.push_up(&repo, tag.as_ref(), &digest).await {
                Ok(PushUp::Pushed) => {
                    tracing::info!(repository = %repo, tag = ?e.tag, %digest, "local push uploaded to the parent");
                    self.report.pushed_to_parent += 1;
                    if let Some(t) = &tag {
                        self.syncer.state.update(|s| {
                            s.repositories
                                .entry(repo.as_str().to_owned())
                                .or_default()
                                .tags
                                .insert(t.as_str().to_owned(), digest.to_string());
                        });
                    }
                    outbox
                        .done(&path)
                        .await
                        .map_err(|e| ParentError::Protocol(format!("outbox: {e}")))?;
                }
                Ok(PushUp::Conflict(theirs)) => {
                    tracing::warn!(
                        repository = %repo, tag = ?e.tag, ours = %digest, parent = %theirs,
                        "tag moved both here and at the parent; the parent wins, local push not uploaded"
                    );
                    outbox
                        .done(&path)
                        .await
                        .map_err(|e| ParentError::Protocol(format!("outbox: {e}")))?;
                }
                Err(UpError::Parent(pe)) if pe.is_transient() || pe.is_contact_failure() => {
                    return Err(pe);
                }
                Err(err) => {
                    tracing::error!(repository = %repo, %digest, error = %err, "local push cannot be uploaded; set aside in the outbox's failed/");
                    self.report
                        .errors
                        .push(format!("outbox {repo}@{digest}: {err}"));
                    let _ = outbox.set_aside(&path, &err.to_string()).await;
                }
            }
        }
        Ok(())
    }

    async fn push_up(
        &self,
        repo: &RepositoryName,
        tag: Option<&Tag>,
        digest: &Digest,
    ) -> Result<PushUp, UpError> {
        if let Some(t) = tag {
            match self.parent.tag_digest(repo, t).await {
                Ok(theirs) if &theirs == digest => return Ok(PushUp::Pushed),
                Ok(theirs) => {
                    let last_seen = self.syncer.state.read(|s| {
                        s.repositories
                            .get(repo.as_str())
                            .and_then(|r| r.tags.get(t.as_str()).cloned())
                    });
                    // The parent moved (or created) the tag since we last saw it.
                    if last_seen.as_deref() != Some(theirs.to_string().as_str()) {
                        return Ok(PushUp::Conflict(theirs));
                    }
                }
                Err(ParentError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let media_type = self.upload_manifest(repo, digest, 0).await?;
        if let Some(t) = tag {
            let content = self
                .syncer
                .store
                .manifest_by_digest(repo, digest)
                .await?
                .content;
            self.parent
                .push_manifest(repo, &Reference::Tag(t.clone()), &media_type, content)
                .await?;
        }
        Ok(PushUp::Pushed)
    }

    /// Uploads a stored manifest with everything under it the parent lacks; returns its
    /// media type.
    async fn upload_manifest(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        depth: usize,
    ) -> Result<String, UpError> {
        if depth > MAX_DEPTH {
            return Err(UpError::Local("indexes nested too deep".into()));
        }
        let store = self.syncer.store.clone();
        let m = store.manifest_by_digest(repo, digest).await?;
        let parsed = manifest::parse(&m.content, Some(&m.media_type))
            .map_err(|e| UpError::Local(e.to_string()))?;
        for child in &parsed.manifests {
            Box::pin(self.upload_manifest(repo, child, depth + 1)).await?;
        }
        for (blob, _) in &parsed.blob_sizes {
            if self.parent.blob_exists(repo, blob).await? {
                continue;
            }
            let (reader, _) = store.blob_open(blob, None).await?;
            self.parent
                .push_blob(repo, blob, reader.size, reader.body)
                .await?;
        }
        self.parent
            .push_manifest(
                repo,
                &Reference::Digest(digest.clone()),
                &m.media_type,
                m.content,
            )
            .await?;
        Ok(m.media_type)
    }
}

enum PushUp {
    Pushed,
    Conflict(Digest),
}

#[derive(Debug, thiserror::Error)]
enum UpError {
    #[error(transparent)]
    Parent(#[from] ParentError),
    #[error("local content: {0}")]
    Local(String),
}

impl From<StorageError> for UpError {
    fn from(e: StorageError) -> Self {
        UpError::Local(e.to_string())
    }
}
