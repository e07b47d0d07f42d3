//! Retention under `--max-storage`: when the store grows past the limit, the least recently
//! used (pulled, or else stored) images are evicted until it is back under 90 % of it. Never
//! evicted: images a staging request pinned, local pushes still waiting for the parent, and
//! any blob a remaining manifest names (the store's reference index says which). Eviction only runs with a parent, which can serve an evicted image
//! again (pull-through); a standalone registry would lose data.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use outpost_core::{Digest, RepositoryName};

use crate::content::manifest;
use crate::service::usage::Usage;
use crate::storage::{StorageError, Store};
use crate::sync::Syncer;

/// How often the store's size is checked against the limit. The check reads the running
/// total (see `usage`: kept by the store's own counts of what it writes and removes, never by
/// listing the store), so it costs one small document read.
const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// When each image was last used (pulled, or stored), among the store's documents
/// (`<storage>/sync/access.json` on disk): every image retention may evict is in it.
const ACCESS_KEY: &str = "access.json";
/// Written once retention took stock of the store (see [`Retention::take_stock`]); removed by
/// a process that serves without retention, so the next one with it takes stock again.
pub(crate) const INDEX_KEY: &str = "retention-index.json";
/// Manifests one image may have (an index, its children, their referrers).
const MAX_IMAGE_MANIFESTS: usize = 10_000;
/// Eviction stops once the store is under this share of the limit, so it does not run again
/// at the next write.
const LOW_WATER_PERCENT: u64 = 90;

/// Images that must stay: (repository, manifest digest).
pub trait PinSource: Send + Sync {
    fn pinned(&self) -> HashSet<(String, Digest)>;
}

pub struct Retention {
    syncer: Arc<Syncer>,
    max_bytes: u64,
    usage: Arc<Usage>,
    pins: OnceLock<Arc<dyn PinSource>>,
    /// (repository, manifest digest) -> unix seconds of the last pull or store.
    access: Mutex<HashMap<(String, String), u64>>,
    dirty: AtomicBool,
    /// Whether this process saw that retention took stock of the store.
    stocked: AtomicBool,
    /// One eviction at a time.
    running: tokio::sync::Mutex<()>,
}

/// What one eviction pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EvictionReport {
    pub images: usize,
    pub manifests: usize,
    pub blobs: usize,
    pub bytes: u64,
}

/// `{"repo@digest": unix seconds}` as saved; entries that do not parse are dropped.
fn parse_access(raw: &[u8]) -> HashMap<(String, String), u64> {
    serde_json::from_slice::<HashMap<String, u64>>(raw)
        .map(|m| {
            m.into_iter()
                .filter_map(|(k, v)| {
                    let (r, d) = k.split_once('@')?;
                    Some(((r.to_owned(), d.to_owned()), v))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

impl Retention {
    /// Loads the pull times kept in the store (unreadable ones start afresh: the cost is
    /// evicting in a less useful order once).
    pub async fn new(
        syncer: Arc<Syncer>,
        max_bytes: u64,
        usage: Arc<Usage>,
    ) -> Result<Arc<Self>, StorageError> {
        let me = Arc::new(Retention {
            syncer,
            max_bytes,
            usage,
            pins: OnceLock::new(),
            access: Mutex::new(HashMap::new()),
            dirty: AtomicBool::new(false),
            stocked: AtomicBool::new(false),
            running: tokio::sync::Mutex::new(()),
        });
        // Every image this process stores from now on is noted (see `note_writes`).
        me.syncer.store().manifest_writes().watch();
        me.merge_stored().await?;
        Ok(me)
    }

    /// For a process serving without retention: the images it stores go unnoted, so the next
    /// process with retention must take stock again.
    pub async fn serving_without(store: &dyn Store) {
        if let Err(e) = store.doc_delete(INDEX_KEY).await {
            tracing::warn!(error = %e, "cannot mark the store for retention to take stock again");
        }
    }

    pub fn set_pins(&self, pins: Arc<dyn PinSource>) {
        let _ = self.pins.set(pins);
    }

    /// Records a pull of a manifest.
    pub fn touch(&self, repo: &RepositoryName, digest: &Digest) {
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((repo.as_str().to_owned(), digest.to_string()), unix_now());
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Takes in the pull times other processes on the same store saved (the latest of each).
    async fn merge_stored(&self) -> Result<(), StorageError> {
        let Some(raw) = self.syncer.store().doc_get(ACCESS_KEY).await? else {
            return Ok(());
        };
        let mut access = self.access.lock().unwrap_or_else(|p| p.into_inner());
        for (k, t) in parse_access(&raw) {
            let e = access.entry(k).or_insert(t);
            *e = (*e).max(t);
        }
        Ok(())
    }

    /// Stores the pull times if they changed (every check, and at shutdown), merged with what
    /// other processes on the same store saved.
    pub async fn save_access(&self) {
        self.note_writes();
        if !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        if let Err(e) = self.merge_stored().await {
            tracing::warn!(error = %e, "cannot read pull times");
            self.dirty.store(true, Ordering::Relaxed);
            return;
        }
        let map: HashMap<String, u64> = self
            .access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|((r, d), t)| (format!("{r}@{d}"), *t))
            .collect();
        let res = match serde_json::to_vec(&map) {
            Ok(b) => self.syncer.store().doc_put(ACCESS_KEY, b.into()).await,
            Err(e) => Err(StorageError::Io(std::io::Error::other(e))),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "cannot save pull times");
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    /// Checks the store against the limit every few seconds, while serving.
    pub fn spawn(self: &Arc<Self>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_INTERVAL);
            loop {
                tick.tick().await;
                // One process evicts: the leader (the others' pull times are not merged yet).
                // It takes stock first, once, so no pass pays for it.
                if me.syncer.leadership().is_leader() {
                    let store = me.syncer.store().clone();
                    if let Err(e) = me.take_stock(&*store).await {
                        tracing::warn!(error = %e, "cannot take stock of the store for retention");
                    } else if let Err(e) = me.enforce().await {
                        tracing::warn!(error = %e, "eviction failed");
                    }
                }
                me.save_access().await;
            }
        });
    }

    /// Evicts until the store is back under the low-water mark, if it is over the limit.
    pub async fn enforce(&self) -> Result<EvictionReport, StorageError> {
        let _one = self.running.lock().await;
        let size = self.usage.fold().await?;
        if size <= self.max_bytes {
            return Ok(EvictionReport::default());
        }
        let target = self.max_bytes / 100 * LOW_WATER_PERCENT;
        let excess = size - target;
        let store = self.syncer.store().clone();
        let started = std::time::Instant::now();
        let report = self.evict(&*store, excess).await?;
        let seconds = started.elapsed().as_secs_f64();
        // The store counted what it removed: folded in now, the gauge and the other
        // processes see it before the next check.
        let after = self.usage.fold().await?;
        tracing::info!(
            limit = self.max_bytes,
            before = size,
            after,
            images = report.images,
            blobs = report.blobs,
            bytes = report.bytes,
            seconds,
            "evicted least recently pulled images to stay under --max-storage"
        );
        if after > self.max_bytes {
            tracing::warn!(
                limit = self.max_bytes,
                size = after,
                "store is still over --max-storage: what remains is pinned, waiting for the \
                 parent, or in use"
            );
        }
        Ok(report)
    }

    /// Takes stock once per store (and again after a process ran without retention, which
    /// stores images it does not note): records in the reference index what each manifest
    /// stored before the index existed names, and notes every image not yet among the pull
    /// times, as used when it was last pushed. Afterwards eviction reads only what it evicts:
    /// `manifest_writes` tells of every image stored later.
    async fn take_stock(&self, store: &dyn Store) -> Result<(), StorageError> {
        if self.stocked.load(Ordering::Relaxed) {
            return Ok(());
        }
        if store.doc_get(INDEX_KEY).await?.is_some() {
            self.stocked.store(true, Ordering::Relaxed);
            return Ok(());
        }
        let started = std::time::Instant::now();
        let now = unix_now();
        let (mut manifests, mut roots) = (0usize, Vec::new());
        for repo in store.repositories().await? {
            let mut children: HashSet<Digest> = HashSet::new();
            let mut tops = Vec::new();
            for (d, age) in store.manifest_ages(&repo).await? {
                let Ok(m) = store.manifest_by_digest(&repo, &d).await else {
                    continue;
                };
                let Ok(p) = manifest::parse(&m.content, Some(&m.media_type)) else {
                    continue;
                };
                store.references_record(&repo, &d, &p.names()).await?;
                manifests += 1;
                children.extend(p.manifests.iter().cloned());
                if p.subject.is_none() {
                    tops.push((d, now.saturating_sub(age.as_secs())));
                }
            }
            roots.extend(
                tops.into_iter()
                    .filter(|(d, _)| !children.contains(d))
                    .map(|(d, t)| ((repo.as_str().to_owned(), d.to_string()), t)),
            );
        }
        let images = roots.len();
        {
            let mut access = self.access.lock().unwrap_or_else(|p| p.into_inner());
            for (k, t) in roots {
                access.entry(k).or_insert(t);
            }
        }
        self.dirty.store(true, Ordering::Relaxed);
        self.save_access().await;
        store
            .doc_put(INDEX_KEY, Bytes::from_static(b"{\"version\":1}\n"))
            .await?;
        self.stocked.store(true, Ordering::Relaxed);
        tracing::info!(
            manifests,
            images,
            seconds = started.elapsed().as_secs_f64(),
            "took stock of the store for retention (once: from now on eviction reads only what it evicts)"
        );
        Ok(())
    }

    /// Notes the images this process stored since the last call as used when stored (a pull
    /// noted since is later, and stays).
    fn note_writes(&self) {
        let written = self.syncer.store().manifest_writes().take();
        if written.is_empty() {
            return;
        }
        let mut access = self.access.lock().unwrap_or_else(|p| p.into_inner());
        for (r, d, at) in written {
            let t = unix_secs(at);
            let e = access
                .entry((r.as_str().to_owned(), d.to_string()))
                .or_insert(t);
            *e = (*e).max(t);
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Forgets a noted manifest (gone, or not an image of its own).
    fn forget(&self, key: &(String, String)) {
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// One pass, under the maintenance lock (no manifest changes meanwhile). The noted
    /// images are ordered in memory, least recently used first; each is read only when its
    /// turn comes, evicted with its children and referrers, and then each blob they named is
    /// asked of the reference index: one no manifest names any more is freed. The pass stops
    /// once what it freed covers the excess. Nothing is listed, so a pass costs in proportion
    /// to what it evicts (and to the images it passes over as pinned, waiting or not images
    /// of their own), not to the store.
    async fn evict(&self, store: &dyn Store, excess: u64) -> Result<EvictionReport, StorageError> {
        self.merge_stored().await?;
        self.take_stock(store).await?;
        self.note_writes();
        let pinned = self.pins.get().map(|p| p.pinned()).unwrap_or_default();
        let waiting: HashSet<(String, String)> = match self.syncer.outbox() {
            Some(o) => o.pending_digests().await,
            None => HashSet::new(),
        };
        let mut order: Vec<((String, String), u64)> = self
            .access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, t)| (k.clone(), *t))
            .collect();
        order.sort_by(|(a, ta), (b, tb)| ta.cmp(tb).then_with(|| a.cmp(b)));
        // Dropped on return; on object storage its lease is then deleted in the background.
        let lock = store.maintenance_lock().await?;

        let mut report = EvictionReport::default();
        for (key, _) in order {
            if report.bytes >= excess {
                break;
            }
            let (Ok(repo), Ok(digest)) = (key.0.parse::<RepositoryName>(), key.1.parse::<Digest>())
            else {
                self.forget(&key);
                continue;
            };
            if waiting.contains(&key) || pinned.contains(&(key.0.clone(), digest.clone())) {
                continue;
            }
            let root = match store.manifest_by_digest(&repo, &digest).await {
                Ok(m) => m,
                Err(StorageError::ManifestUnknown | StorageError::RepositoryUnknown) => {
                    self.forget(&key);
                    continue;
                }
                Err(e) => return Err(e),
            };
            let Ok(parsed) = manifest::parse(&root.content, Some(&root.media_type)) else {
                continue;
            };
            // A referrer goes with its subject, an index's child with the index.
            if parsed.subject.is_some() || store.referenced(&digest, Some(&repo)).await? {
                self.forget(&key);
                continue;
            }
            let evicted = evict_image(store, &repo, digest.clone(), parsed).await?;
            report.manifests += evicted.manifests;
            let evicted_tags = evicted.tags;
            let mut bytes = 0u64;
            for b in evicted.blobs {
                if store.referenced(&b, None).await? {
                    continue;
                }
                let Some(size) = store.blob_size(&b).await? else {
                    continue;
                };
                lock.check()?;
                if store.blob_remove(&b, Duration::ZERO).await? {
                    report.blobs += 1;
                    bytes += size;
                }
                store.repo_blob_unlink(&repo, &b).await?;
            }
            report.bytes += bytes;
            tracing::info!(repository = %repo, digest = %digest, tags = ?evicted_tags, bytes, "evicting image");
            let d = digest.to_string();
            self.syncer.state().update(|s| {
                for t in &evicted_tags {
                    s.evicted
                        .entry(repo.as_str().to_owned())
                        .or_default()
                        .insert(t.clone(), d.clone());
                }
            });
            self.forget(&key);
            report.images += 1;
        }
        let m = self.syncer.metrics();
        m.evictions.inc_by(report.images as u64);
        m.evicted_bytes.inc_by(report.bytes);
        Ok(report)
    }
}

/// What [`evict_image`] removed.
struct Evicted {
    manifests: usize,
    /// The root's tags.
    tags: Vec<String>,
    /// The blobs the removed manifests named, each once.
    blobs: Vec<Digest>,
}

/// Deletes an image: `root`, then its referrers and the children no manifest staying names,
/// theirs in turn.
async fn evict_image(
    store: &dyn Store,
    repo: &RepositoryName,
    root: Digest,
    parsed: manifest::ParsedManifest,
) -> Result<Evicted, StorageError> {
    let mut queue = std::collections::VecDeque::from([(root.clone(), parsed)]);
    let mut seen: HashSet<Digest> = HashSet::from([root.clone()]);
    let (mut manifests, mut blobs, mut tags) = (0usize, Vec::new(), Vec::new());
    let mut named: HashSet<Digest> = HashSet::new();
    // Bounded: an image of more manifests than this leaves the rest to gc.
    while manifests < MAX_IMAGE_MANIFESTS
        && let Some((cur, p)) = queue.pop_front()
    {
        let referrers = store.referrers(repo, &cur).await?;
        match store.manifest_delete(repo, &cur).await {
            Ok(removed) => {
                if cur == root {
                    tags = removed;
                }
                manifests += 1;
            }
            Err(StorageError::ManifestUnknown) => manifests += 1,
            Err(e) => return Err(e),
        }
        blobs.extend(p.all_blobs.into_iter().filter(|b| named.insert(b.clone())));
        let mut next: Vec<Digest> = referrers.into_iter().map(|r| r.digest).collect();
        for child in p.manifests {
            // Only once its last parent here is gone (two indexes can share a child).
            if !store.referenced(&child, Some(repo)).await? {
                next.push(child);
            }
        }
        for d in next {
            if !seen.insert(d.clone()) {
                continue;
            }
            let Ok(m) = store.manifest_by_digest(repo, &d).await else {
                continue;
            };
            if let Ok(p) = manifest::parse(&m.content, Some(&m.media_type)) {
                queue.push_back((d, p));
            }
        }
    }
    Ok(Evicted {
        manifests,
        tags,
        blobs,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use bytes::Bytes;
    use object_store::memory::InMemory;
    use outpost_core::{Algorithm, Reference};
    use serde_json::json;

    use super::*;
    use crate::config::Mode;
    use crate::content::push_manifest;
    use crate::leader::Leadership;
    use crate::metrics::Metrics;
    use crate::storage::hash::digest_of;
    use crate::storage::object::BucketStore;
    use crate::sync::schedule::Schedule;
    use crate::sync::{ConnectionSource, SyncOptions};

    const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    const INDEX: &str = "application/vnd.oci.image.index.v1+json";

    async fn retention(store: Arc<dyn Store>) -> Arc<Retention> {
        let conn = "ConnectedRegistryName=edge;SyncTokenName=t;SyncTokenPassword=p;\
                    ParentGatewayEndpoint=127.0.0.1:9;ParentEndpointProtocol=http"
            .parse()
            .expect("connection string");
        let opts = SyncOptions {
            connection: ConnectionSource::Given(conn),
            ca_file: None,
            repositories: Vec::new(),
            schedule: Schedule::new("0 0 1 1 *", None).expect("schedule"),
            concurrency: 1,
            chunk_size: 1 << 20,
            bandwidth_limit: None,
            mode: Mode::Readonly,
            platforms: Default::default(),
        };
        let metrics = Arc::new(Metrics::new());
        let syncer = Syncer::new(opts, store.clone(), metrics, Leadership::sole("t".into()))
            .await
            .expect("syncer");
        let usage = Arc::new(Usage::new(store, Default::default()));
        Retention::new(syncer, u64::MAX, usage)
            .await
            .expect("retention")
    }

    async fn blob(store: &dyn Store, repo: &RepositoryName, data: Vec<u8>) -> (Digest, u64) {
        let d = digest_of(Algorithm::Sha256, &data);
        let n = data.len() as u64;
        let body = Box::pin(futures_util::stream::once(async move {
            Ok::<_, std::io::Error>(Bytes::from(data))
        }));
        store.blob_put(&d, body, Some(n)).await.expect("blob");
        store.repo_blob_link(repo, &d).await.expect("link");
        (d, n)
    }

    fn desc(media_type: &str, d: &Digest, size: u64) -> serde_json::Value {
        json!({"mediaType": media_type, "digest": d.to_string(), "size": size})
    }

    /// Pushes a manifest of a unique config and layer plus `shared` (and `subject`); its
    /// digest and content size, and the bytes only it names.
    async fn image(
        store: &dyn Store,
        repo: &RepositoryName,
        seed: u64,
        shared: &(Digest, u64),
        subject: Option<(&Digest, u64)>,
        tag: Option<&str>,
    ) -> (Digest, u64, u64) {
        let config = blob(store, repo, format!("{{\"seed\":{seed:06}}}").into_bytes()).await;
        let layer = blob(
            store,
            repo,
            (0..4096u64)
                .map(|i| (i.wrapping_mul(seed + 7) >> 3) as u8 ^ seed as u8)
                .collect(),
        )
        .await;
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", &config.0, config.1),
            "layers": [
                desc("application/vnd.oci.image.layer.v1.tar", &layer.0, layer.1),
                desc("application/vnd.oci.image.layer.v1.tar", &shared.0, shared.1),
            ],
        });
        if let Some((s, n)) = subject {
            m["subject"] = desc(MANIFEST, s, n);
            m["artifactType"] = json!("application/vnd.example.sig");
        }
        let (d, n) = push(store, repo, m, tag).await;
        (d, n, config.1 + layer.1)
    }

    /// Pushes `m` by `tag`, or by digest; its digest and size.
    async fn push(
        store: &dyn Store,
        repo: &RepositoryName,
        m: serde_json::Value,
        tag: Option<&str>,
    ) -> (Digest, u64) {
        let content = Bytes::from(serde_json::to_vec(&m).expect("json"));
        let (d, n) = (digest_of(Algorithm::Sha256, &content), content.len() as u64);
        let reference = match tag {
            Some(t) => Reference::Tag(t.parse().expect("tag")),
            None => Reference::Digest(d.clone()),
        };
        push_manifest(store, repo, &reference, m["mediaType"].as_str(), content)
            .await
            .expect("push");
        (d, n)
    }

    /// A store on disk, in a folder removed when the first value drops.
    fn fs_store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::storage::fs::FsStore::open(dir.path()).expect("store");
        (dir, Arc::new(store))
    }

    fn repo(i: usize) -> RepositoryName {
        format!("scale/r{i:03}").parse().expect("name")
    }

    /// A store of `images` repositories, one image each, sharing a layer; then a pass that
    /// must free three images' bytes. Returns the requests the pass sent, by operation.
    async fn pass_requests(images: usize) -> Vec<(&'static str, u64)> {
        let bucket = BucketStore::new(Arc::new(InMemory::new()), "")
            .with_lock_timing(crate::storage::object::LockTiming::quick());
        let counts = bucket.request_counts().expect("counted");
        let store: Arc<dyn Store> = Arc::new(bucket);
        let shared = blob(&*store, &repo(0), b"shared base layer".repeat(100)).await;
        let mut own = 0;
        for i in 0..images {
            store
                .repo_blob_link(&repo(i), &shared.0)
                .await
                .expect("link");
            own = image(&*store, &repo(i), i as u64, &shared, None, Some("v1"))
                .await
                .2;
        }
        let r = retention(store.clone()).await;
        r.take_stock(&*store).await.expect("stock");
        let listings = store.listings().expect("counted").snapshot();
        let before = counts.snapshot();
        let report = r.evict(&*store, 3 * own - 1).await.expect("evict");
        let after = counts.snapshot();
        assert_eq!(store.listings().expect("counted").snapshot(), listings);
        assert_eq!(
            (report.images, report.manifests, report.blobs, report.bytes),
            (3, 3, 6, 3 * own)
        );
        // The least recently used (all stored in one second: by name) went, blobs and tags;
        // the shared layer stays for the others.
        for i in 0..images {
            let tags = store.tags(&repo(i)).await.unwrap_or_default();
            assert_eq!(tags.is_empty(), i < 3, "r{i:03}: {tags:?}");
        }
        assert!(store.blob_size(&shared.0).await.expect("size").is_some());
        before
            .iter()
            .zip(&after)
            .map(|((op, b), (_, a))| (*op, a - b))
            .collect()
    }

    /// The pass costs the same on a store four times larger: it reads only what it evicts.
    #[tokio::test]
    async fn an_eviction_pass_costs_the_same_however_large_the_store() {
        let small = pass_requests(12).await;
        let large = pass_requests(48).await;
        assert_eq!(small, large);
        assert!(small.iter().any(|(_, n)| *n > 0), "{small:?}");
    }

    /// fsck finds a manifest's name missing from the index once retention relies on it.
    #[tokio::test]
    async fn fsck_reports_what_the_reference_index_misses() {
        let (dir, store) = fs_store();
        let r = repo(0);
        let shared = blob(&*store, &r, b"base".repeat(64)).await;
        let (d, _, _) = image(&*store, &r, 1, &shared, None, Some("v1")).await;
        // A lost entry (as a store written by a version without the index lacks them all).
        let hex = &shared.0.hex();
        let entry = dir
            .path()
            .join(format!("references/sha256/{}/{hex}/scale+r000", &hex[..2]))
            .join(format!("sha256-{}", d.hex()));
        std::fs::remove_file(&entry).expect("entry");
        let problems = || async {
            crate::service::fsck::run(&*store, |_, _| {})
                .await
                .expect("fsck")
                .problems
        };
        // Not relied on yet: nothing to report. Taking stock records every manifest again.
        assert!(problems().await.is_empty());
        let ret = retention(store.clone()).await;
        ret.take_stock(&*store).await.expect("stock");
        assert!(problems().await.is_empty());
        assert!(entry.exists());
        // Lost once relied on: it shows.
        std::fs::remove_file(&entry).expect("entry");
        let found = problems().await;
        assert_eq!(
            found,
            [crate::service::fsck::Problem::Unindexed {
                repo: r.to_string(),
                manifest: d.clone(),
                name: shared.0.clone(),
            }]
        );
        assert!(found[0].to_string().contains(INDEX_KEY), "{}", found[0]);
        // The remedy it names: the next stock-taking indexes the manifest again.
        store.doc_delete(INDEX_KEY).await.expect("delete");
        let ret = retention(store.clone()).await;
        ret.take_stock(&*store).await.expect("stock");
        assert_eq!(problems().await, []);
    }

    /// An index goes with the children only it names (another index keeps a shared one), a
    /// signature with its image; manifests that are not images of their own are not
    /// candidates.
    #[tokio::test]
    async fn an_image_goes_with_its_own_children_and_referrers() {
        let (_dir, store) = fs_store();
        let r = repo(0);
        let shared = blob(&*store, &r, b"base".repeat(64)).await;
        let (amd, amd_n, amd_own) = image(&*store, &r, 1, &shared, None, None).await;
        let (arm, arm_n, arm_own) = image(&*store, &r, 2, &shared, None, None).await;
        let (sig, _, sig_own) = image(&*store, &r, 3, &shared, Some((&amd, amd_n)), None).await;
        let child = |d: &Digest, n: u64, arch: &str| {
            let mut c = desc(MANIFEST, d, n);
            c["platform"] = json!({"os": "linux", "architecture": arch});
            c
        };
        let old = json!({"schemaVersion": 2, "mediaType": INDEX,
            "manifests": [child(&amd, amd_n, "amd64")]});
        let new = json!({"schemaVersion": 2, "mediaType": INDEX,
            "manifests": [child(&amd, amd_n, "amd64"), child(&arm, arm_n, "arm64")]});
        let (old, _) = push(&*store, &r, old, Some("old")).await;
        let (new, _) = push(&*store, &r, new, Some("new")).await;
        let ret = retention(store.clone()).await;
        ret.take_stock(&*store).await.expect("stock");
        // Only the two indexes are images: the children and the signature are not noted.
        // The newer index was used least recently (the saved times, later, are dropped: a
        // pass merges them in taking the latest).
        store.doc_delete(ACCESS_KEY).await.expect("delete");
        {
            let mut noted = ret.access.lock().expect("lock");
            assert_eq!(noted.len(), 2);
            noted.insert((r.as_str().to_owned(), new.to_string()), 1);
            noted.insert((r.as_str().to_owned(), old.to_string()), 2);
        }

        // It goes with arm64, which only it names, and frees enough; amd64, which the other
        // index names too, stays whole, with its signature.
        let first = ret.evict(&*store, 1).await.expect("evict");
        assert_eq!((first.images, first.manifests), (1, 2));
        assert_eq!(store.tags(&r).await.expect("tags"), ["old"]);
        assert!(store.manifest_by_digest(&r, &arm).await.is_err());
        assert!(store.manifest_by_digest(&r, &amd).await.is_ok());
        assert!(store.manifest_by_digest(&r, &sig).await.is_ok());
        assert_eq!(store.referrers(&r, &amd).await.expect("referrers").len(), 1);

        let second = ret.evict(&*store, 1).await.expect("evict");
        assert_eq!((second.images, second.manifests), (1, 3));
        assert!(store.tags(&r).await.expect("tags").is_empty());
        for d in [&amd, &arm, &sig] {
            assert!(store.manifest_by_digest(&r, d).await.is_err());
        }
        // Each image's own blobs are freed, and the shared layer once nothing names it.
        assert_eq!(first.bytes, arm_own);
        assert_eq!(second.bytes, amd_own + sig_own + shared.1);
        assert!(store.blob_size(&shared.0).await.expect("size").is_none());
        assert!(!store.referenced(&shared.0, None).await.expect("index"));
    }
}
