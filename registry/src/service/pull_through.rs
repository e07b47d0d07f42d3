//! Pull-through on demand: a client pull of an in-scope image that is not stored yet is served
//! from the parent while it is stored. The manifest is answered as soon as the parent sends
//! it; the whole image (the platforms `--platform` keeps, its referrers) is then fetched in
//! the background exactly as a sync would, and the manifests and the tag are written once
//! every blob is in, so readers never see an incomplete image. Blob requests join the
//! download of that blob (one upstream GET, however many clients) and stream it as it
//! arrives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost_core::{Digest, Reference, RepositoryName};
use tokio::sync::OnceCell;

use crate::content::manifest;
use crate::content::platform::PlatformFilter;
use crate::metrics::PullLabels;
use crate::storage::{ByteStream, StorageError};
use crate::sync::Syncer;
use crate::sync::flight::{End, Flight, FlightOptions};
use crate::sync::image::{self, Planner};
use crate::sync::parent::ParentError;

/// Once the parent failed to answer, requests fail at once for this long instead of each
/// waiting for a connect timeout.
const OFFLINE_HOLD: Duration = Duration::from_secs(10);
/// Manifest requests to the parent on behalf of a waiting client: no long backoff.
const CLIENT_ATTEMPTS: u32 = 1;
/// Blob downloads a waiting client starts: one resume, then the client is told.
const CLIENT_BLOB_ATTEMPTS: u32 = 2;
/// Manifests of a repository read to tell whether a digest missing while offline is a child
/// a platform filter left out (only then, to say so): bounds the cost of that answer.
const FILTERED_LOOKUP_LIMIT: usize = 1000;

#[derive(Debug, Clone, thiserror::Error)]
pub enum PullError {
    #[error("repository is outside this registry's sync scope")]
    OutOfScope,
    #[error("not stored here, and the parent does not have it: {0}")]
    NotFound(String),
    #[error("not stored here, and the parent registry is unreachable: {0}")]
    Offline(String),
    /// A child of a stored index that the platform filter left out, asked for while offline.
    #[error(
        "not stored here: {digest} is the {platform} manifest of a stored index, which was not \
         synced because of the platform filter ({filter}), and the parent registry is \
         unreachable to fetch it on demand: {why}"
    )]
    PlatformNotSynced {
        digest: Digest,
        platform: String,
        filter: String,
        why: String,
    },
    #[error("not stored here, and the parent refused it: {0}")]
    Refused(String),
    #[error("the parent sent an invalid manifest: {0}")]
    Invalid(String),
    #[error("storage: {0}")]
    Storage(String),
    /// The store itself is unreachable (object storage down): the client should retry here.
    #[error("storage is unavailable: {0}")]
    StorageUnavailable(String),
}

impl PullError {
    fn from_parent(e: ParentError) -> Self {
        match e {
            ParentError::NotFound(m) => PullError::NotFound(m),
            ParentError::Unreachable(m) => PullError::Offline(m),
            ParentError::Unauthorized(m) | ParentError::Denied(m) => PullError::Refused(m),
            other => PullError::Invalid(other.to_string()),
        }
    }
}

/// A manifest served from the parent.
#[derive(Debug, Clone)]
pub struct PulledManifest {
    pub digest: Digest,
    pub media_type: String,
    pub content: Bytes,
}

type ManifestCell = Arc<OnceCell<Result<PulledManifest, PullError>>>;
/// (repository, reference or digest).
type Key = (String, String);

pub struct PullThrough {
    syncer: Arc<Syncer>,
    /// Manifest fetches under way, by (repository, reference): one per key.
    fetching: Mutex<HashMap<(String, String), ManifestCell>>,
    /// Manifests fetched for images still being completed, by (repository, reference), so a
    /// client's next requests (the platform manifest of an index) need not go to the parent.
    /// Each entry names the image (repository, digest) whose completion it belongs to.
    recent: Mutex<HashMap<Key, (PulledManifest, Key)>>,
    /// Images being completed, by (repository, digest).
    completing: Mutex<std::collections::HashSet<(String, String)>>,
    /// When the parent last failed to answer, and why.
    offline: Mutex<Option<(Instant, String)>>,
}

impl PullThrough {
    pub fn new(syncer: Arc<Syncer>) -> Arc<Self> {
        Arc::new(PullThrough {
            syncer,
            fetching: Mutex::default(),
            recent: Mutex::default(),
            completing: Mutex::default(),
            offline: Mutex::default(),
        })
    }

    pub fn in_scope(&self, repo: &RepositoryName) -> bool {
        self.syncer.in_scope(repo.as_str())
    }

    /// Counts a request answered from storage.
    pub fn hit(&self) {
        self.count("hit");
    }

    fn count(&self, result: &'static str) {
        self.syncer
            .metrics()
            .pull_through
            .get_or_create(&PullLabels { result })
            .inc();
    }

    fn check_offline(&self) -> Result<(), PullError> {
        let g = self.offline.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some((at, why)) if at.elapsed() < OFFLINE_HOLD => Err(PullError::Offline(format!(
                "{why} ({}s ago; not retried for {}s)",
                at.elapsed().as_secs(),
                OFFLINE_HOLD.as_secs()
            ))),
            _ => Ok(()),
        }
    }

    fn contact(&self, result: &Result<PulledManifest, PullError>) {
        match result {
            Err(PullError::Offline(why)) | Err(PullError::Refused(why)) => {
                *self.offline.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some((Instant::now(), why.clone()));
                self.syncer.note_contact(false);
            }
            _ => {
                *self.offline.lock().unwrap_or_else(|p| p.into_inner()) = None;
                self.syncer.note_contact(true);
            }
        }
    }

    /// A manifest that is not stored: from the images being completed, or from the parent.
    pub async fn manifest(
        self: &Arc<Self>,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<PulledManifest, PullError> {
        match self.manifest_inner(repo, reference).await {
            Err(PullError::Offline(why)) => Err(match reference {
                Reference::Digest(d) => match self.filtered_child(repo, d).await {
                    Some(platform) => PullError::PlatformNotSynced {
                        digest: d.clone(),
                        platform,
                        filter: filter_text(&self.syncer.options().platforms),
                        why,
                    },
                    None => PullError::Offline(why),
                },
                Reference::Tag(_) => PullError::Offline(why),
            }),
            other => other,
        }
    }

    /// The platform of `digest` when a stored index of `repo` names it as a child (absent, so
    /// left out by a platform filter); looked for only on the offline path.
    async fn filtered_child(&self, repo: &RepositoryName, digest: &Digest) -> Option<String> {
        let store = self.syncer.store();
        let list = store.manifest_list(repo).await.ok()?;
        for d in list.into_iter().take(FILTERED_LOOKUP_LIMIT) {
            let Ok(m) = store.manifest_by_digest(repo, &d).await else {
                continue;
            };
            if !matches!(
                m.media_type.as_str(),
                manifest::OCI_INDEX | manifest::DOCKER_LIST
            ) {
                continue;
            }
            let Ok(parsed) = manifest::parse(&m.content, Some(&m.media_type)) else {
                continue;
            };
            if let Some(c) = parsed.children.iter().find(|c| &c.digest == digest) {
                return Some(c.platform_text());
            }
        }
        None
    }

    async fn manifest_inner(
        self: &Arc<Self>,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<PulledManifest, PullError> {
        if !self.in_scope(repo) {
            return Err(PullError::OutOfScope);
        }
        let key = (repo.as_str().to_owned(), reference.to_string());
        if let Some(m) = self
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .map(|(m, _)| m.clone())
        {
            self.count("hit");
            return Ok(m);
        }
        if let Err(e) = self.check_offline() {
            self.count("error");
            return Err(e);
        }
        let cell = self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let me = self.clone();
        let result = cell
            .get_or_init(|| async {
                let r = me.fetch_manifest(repo, reference).await;
                me.contact(&r);
                r
            })
            .await
            .clone();
        {
            let mut f = self.fetching.lock().unwrap_or_else(|p| p.into_inner());
            if f.get(&key).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
                f.remove(&key);
            }
        }
        self.count(if result.is_ok() { "miss" } else { "error" });
        result
    }

    async fn fetch_manifest(
        self: &Arc<Self>,
        repo: &RepositoryName,
        reference: &Reference,
    ) -> Result<PulledManifest, PullError> {
        let parent = self.syncer.parent();
        let content = parent
            .manifest_with(repo, reference, CLIENT_ATTEMPTS)
            .await
            .map_err(PullError::from_parent)?;
        let digest = match reference {
            Reference::Digest(d) => {
                let actual = crate::storage::hash::digest_of(d.algorithm(), &content);
                if &actual != d {
                    return Err(PullError::Invalid(format!(
                        "content of {d} does not match its digest"
                    )));
                }
                actual
            }
            Reference::Tag(_) => {
                crate::storage::hash::digest_of(outpost_core::Algorithm::Sha256, &content)
            }
        };
        let parsed =
            manifest::parse(&content, None).map_err(|e| PullError::Invalid(e.to_string()))?;
        let pulled = PulledManifest {
            digest: digest.clone(),
            media_type: parsed.media_type,
            content: content.clone(),
        };
        {
            let owner = (repo.as_str().to_owned(), digest.to_string());
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            recent.insert(
                (repo.as_str().to_owned(), reference.to_string()),
                (pulled.clone(), owner.clone()),
            );
            recent.insert(owner.clone(), (pulled.clone(), owner));
        }
        let tag = match reference {
            Reference::Tag(t) => Some(t.clone()),
            Reference::Digest(_) => None,
        };
        self.spawn_completion(repo.clone(), tag, digest, content);
        Ok(pulled)
    }

    /// Fetches the rest of the image in the background and stores it whole.
    fn spawn_completion(
        self: &Arc<Self>,
        repo: RepositoryName,
        tag: Option<outpost_core::Tag>,
        digest: Digest,
        content: Bytes,
    ) {
        let key = (repo.as_str().to_owned(), digest.to_string());
        if !self
            .completing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let res = me.complete(&repo, tag.as_ref(), &digest, content).await;
            match &res {
                Ok(()) => {
                    tracing::info!(repository = %repo, tag = ?tag.as_ref().map(|t| t.as_str()), %digest, "pulled through and stored");
                }
                Err(e) => {
                    tracing::warn!(repository = %repo, %digest, error = %e, "pull-through could not store the image")
                }
            }
            me.completing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
            // Stored now (or failed: the next request asks the parent again).
            me.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, (_, owner)| owner != &key);
        });
    }

    async fn complete(
        self: &Arc<Self>,
        repo: &RepositoryName,
        tag: Option<&outpost_core::Tag>,
        digest: &Digest,
        content: Bytes,
    ) -> Result<(), String> {
        let store = self.syncer.store().clone();
        let parent = self.syncer.parent();
        let owner = (repo.as_str().to_owned(), digest.to_string());
        let on_fetch = |d: &Digest, c: &Bytes| {
            if let Ok(p) = manifest::parse(c, None) {
                let m = PulledManifest {
                    digest: d.clone(),
                    media_type: p.media_type,
                    content: c.clone(),
                };
                self.recent
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(
                        (repo.as_str().to_owned(), d.to_string()),
                        (m, owner.clone()),
                    );
            }
        };
        let planner = Planner {
            store: &*store,
            parent: &parent,
            attempts: 2,
            on_fetch: Some(&on_fetch),
            platforms: &self.syncer.options().platforms,
        };
        let tree = planner
            .plan(repo, digest, Some(content))
            .await
            .map_err(|e| e.to_string())?;
        let (_, missing) = image::split_stored(&*store, &tree)
            .await
            .map_err(|e| e.to_string())?;
        let ends = self
            .syncer
            .flights()
            .fetch_all(
                parent.clone(),
                repo,
                missing,
                None,
                self.syncer.options().concurrency,
            )
            .await;
        for (d, _, end) in ends {
            if end != End::Done {
                return Err(format!("blob {d}: {end:?}"));
            }
        }
        image::write_manifests(&*store, repo, &tree)
            .await
            .map_err(|(d, e)| format!("manifest {d}: {e}"))?;
        self.syncer
            .count_skipped(&tree, &mut std::collections::HashSet::new());
        if let Some(t) = tag {
            image::point_tag(&*store, repo, t, digest)
                .await
                .map_err(|e| format!("tag {t}: {e}"))?;
            self.syncer.record_tag(repo.as_str(), t.as_str(), digest);
        }
        Ok(())
    }

    /// A blob that is not linked into `repo`: its size and a stream of it, following the
    /// download under way (or starting one).
    pub async fn blob(
        self: &Arc<Self>,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<(u64, ByteStream), PullError> {
        if !self.in_scope(repo) {
            return Err(PullError::OutOfScope);
        }
        let store = self.syncer.store().clone();
        let flights = self.syncer.flights().clone();
        let flight = match flights.get(digest) {
            Some(f) => f,
            None => {
                if let Err(e) = self.check_offline() {
                    self.count("error");
                    return Err(e);
                }
                let parent = self.syncer.parent();
                // Stored for another repository: serve it once the parent confirms this one
                // has it too (a digest alone must not open another repository's content).
                if store.blob_size(digest).await.ok().flatten().is_some() {
                    return match parent.blob_exists(repo, digest).await {
                        Ok(true) => {
                            image::link(&*store, repo, digest)
                                .await
                                .map_err(PullError::from)?;
                            self.count("hit");
                            let (r, _) = store
                                .blob_open(digest, None)
                                .await
                                .map_err(PullError::from)?;
                            Ok((r.size, r.body))
                        }
                        Ok(false) => Err(PullError::NotFound(format!("blob {digest}"))),
                        Err(e) => Err(PullError::from_parent(e)),
                    };
                }
                flights
                    .fetch(
                        parent,
                        repo,
                        digest,
                        FlightOptions {
                            size: None,
                            deadline: None,
                            attempts: CLIENT_BLOB_ATTEMPTS,
                        },
                    )
                    .0
            }
        };
        let size = match self.size_of(&flight).await {
            Ok(s) => s,
            Err(e) => {
                if matches!(e, PullError::Offline(_) | PullError::Refused(_)) {
                    *self.offline.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some((Instant::now(), e.to_string()));
                    self.syncer.note_contact(false);
                }
                self.count("error");
                return Err(e);
            }
        };
        self.count("miss");
        // Once stored, the blob belongs to this repository too.
        let (f, r, st) = (flight.clone(), repo.clone(), store.clone());
        tokio::spawn(async move {
            if f.wait().await == End::Done
                && let Err(e) = image::link(&*st, &r, &f.digest).await
            {
                tracing::warn!(repository = %r, digest = %f.digest, error = %e, "cannot link pulled-through blob");
            }
        });
        Ok((size, flights.follow(flight)))
    }

    /// Waits until the flight knows the blob's size (the parent's response headers).
    async fn size_of(&self, flight: &Flight) -> Result<u64, PullError> {
        let mut rx = flight.subscribe();
        loop {
            {
                let st = rx.borrow_and_update();
                if let Some(n) = st.size {
                    return Ok(n);
                }
                match &st.end {
                    Some(End::Done) => break,
                    Some(End::Failed {
                        message,
                        contact,
                        not_found,
                    }) => {
                        return Err(if *not_found {
                            PullError::NotFound(message.clone())
                        } else if *contact {
                            PullError::Offline(message.clone())
                        } else {
                            PullError::Invalid(message.clone())
                        });
                    }
                    Some(End::Paused) => {
                        return Err(PullError::Offline("download paused".into()));
                    }
                    None => {}
                }
            }
            if rx.changed().await.is_err() {
                break;
            }
        }
        match self.syncer.store().blob_size(&flight.digest).await {
            Ok(Some(n)) => Ok(n),
            Ok(None) => Err(PullError::Storage("blob vanished after download".into())),
            Err(e) => Err(e.into()),
        }
    }
}

/// The filter as a message names it.
fn filter_text(f: &PlatformFilter) -> String {
    if f.is_all() {
        "none is set now; an earlier one left it out".into()
    } else {
        format!("--platform {}", f.names().join(", "))
    }
}

impl From<StorageError> for PullError {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Unavailable(_) => PullError::StorageUnavailable(e.to_string()),
            e => PullError::Storage(e.to_string()),
        }
    }
}
