//! Retention under `--max-storage`: when the store grows past the limit, the least recently
//! pulled images are evicted until it is back under 90 % of it. Never evicted: images a
//! staging request pinned, local pushes still waiting for the parent, and any blob a remaining
//! manifest references. Eviction only runs with a parent, which can serve an evicted image
//! again (pull-through); a standalone registry would lose data.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use outpost_core::{Digest, RepositoryName};

use crate::content::manifest;
use crate::service::usage::Usage;
use crate::storage::{StorageError, Store};
use crate::sync::Syncer;

/// How often the store's size is checked against the limit. The check reads the running
/// total (see `usage`: kept by the store's own counts of what it writes and removes, never by
/// listing the store), so it costs one small document read.
const CHECK_INTERVAL: Duration = Duration::from_secs(10);
/// The pull times among the store's documents (`<storage>/sync/access.json` on disk).
const ACCESS_KEY: &str = "access.json";
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
    /// (repository, manifest digest) -> unix seconds of the last pull.
    access: Mutex<HashMap<(String, String), u64>>,
    dirty: AtomicBool,
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
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
            running: tokio::sync::Mutex::new(()),
        });
        me.merge_stored().await?;
        Ok(me)
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
                if me.syncer.leadership().is_leader()
                    && let Err(e) = me.enforce().await
                {
                    tracing::warn!(error = %e, "eviction failed");
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

    /// One pass, under the maintenance lock from the first read to the last removal (no
    /// manifest changes meanwhile): every manifest is read once, to find the images and to
    /// count how many manifests name each blob. Evicting counts down; a blob at zero is
    /// freed, so the pass stops once what it actually frees covers the excess (a blob shared
    /// with a remaining image does not count). No blob is listed: sizes are asked of the
    /// freed blobs only, links removed in the evicted images' repositories only (`gc` clears
    /// any other stale link).
    async fn evict(&self, store: &dyn Store, excess: u64) -> Result<EvictionReport, StorageError> {
        self.merge_stored().await?;
        let pinned = self.pins.get().map(|p| p.pinned()).unwrap_or_default();
        let waiting: HashSet<(String, String)> = match self.syncer.outbox() {
            Some(o) => o.pending_digests().await,
            None => HashSet::new(),
        };
        let access = self
            .access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        // Dropped on return; on object storage its lease is then deleted in the background.
        let lock = store.maintenance_lock().await?;

        // Every image: a manifest that is neither an index child nor a referrer, with the
        // manifests under it and the blobs they name.
        let mut candidates: Vec<Candidate> = Vec::new();
        // The blobs each manifest names, and how many manifests name each blob: evicting
        // counts down, and a blob at zero is what an eviction frees.
        let mut blobs_of: HashMap<(RepositoryName, Digest), Vec<Digest>> = HashMap::new();
        let mut refs: HashMap<Digest, usize> = HashMap::new();
        for repo in store.repositories().await? {
            let mut parsed: HashMap<Digest, manifest::ParsedManifest> = HashMap::new();
            for d in store.manifest_list(&repo).await? {
                let Ok(m) = store.manifest_by_digest(&repo, &d).await else {
                    continue;
                };
                if let Ok(p) = manifest::parse(&m.content, Some(&m.media_type)) {
                    parsed.insert(d, p);
                }
            }
            let children: HashSet<&Digest> =
                parsed.values().flat_map(|p| p.manifests.iter()).collect();
            for (d, p) in &parsed {
                if children.contains(d) || p.subject.is_some() {
                    continue;
                }
                let key = (repo.as_str().to_owned(), d.to_string());
                if pinned.contains(&(repo.as_str().to_owned(), d.clone())) || waiting.contains(&key)
                {
                    continue;
                }
                let mut members = vec![d.clone()];
                let mut i = 0;
                while i < members.len() {
                    let cur = members[i].clone();
                    if let Some(p) = parsed.get(&cur) {
                        members.extend(p.manifests.iter().cloned());
                    }
                    // Referrers (signatures, SBOMs) go with their subject.
                    members.extend(
                        parsed
                            .iter()
                            .filter(|(_, q)| q.subject.as_ref() == Some(&cur))
                            .map(|(k, _)| k.clone()),
                    );
                    i += 1;
                    if members.len() > 10_000 {
                        break;
                    }
                }
                candidates.push(Candidate {
                    repo: repo.clone(),
                    last_pull: access.get(&key).copied().unwrap_or(0),
                    digest: d.clone(),
                    members,
                });
            }
            for (d, p) in parsed {
                let mut blobs = p.all_blobs;
                blobs.sort();
                blobs.dedup();
                for b in &blobs {
                    *refs.entry(b.clone()).or_default() += 1;
                }
                blobs_of.insert((repo.clone(), d), blobs);
            }
        }
        candidates.sort_by(|a, b| {
            a.last_pull
                .cmp(&b.last_pull)
                .then_with(|| a.repo.cmp(&b.repo))
                .then_with(|| a.digest.to_string().cmp(&b.digest.to_string()))
        });

        let mut report = EvictionReport::default();
        let mut planned = 0u64;
        // Sizes of the blobs evictions free, asked once each.
        let mut sizes: HashMap<Digest, u64> = HashMap::new();
        // Each blob no remaining manifest names, with the repositories that named it.
        let mut doomed: HashMap<Digest, HashSet<RepositoryName>> = HashMap::new();
        let mut evicted: HashSet<(RepositoryName, Digest)> = HashSet::new();
        for c in candidates {
            if planned >= excess {
                break;
            }
            // What this image frees: the blobs only it (and images evicted before) named.
            let mut bytes = 0u64;
            for m in &c.members {
                let key = (c.repo.clone(), m.clone());
                if !evicted.insert(key.clone()) {
                    continue;
                }
                for b in blobs_of.get(&key).map(Vec::as_slice).unwrap_or_default() {
                    let Some(n) = refs.get_mut(b) else { continue };
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        let size = store.blob_size(b).await?.unwrap_or(0);
                        sizes.insert(b.clone(), size);
                        bytes += size;
                        doomed.entry(b.clone()).or_default().insert(c.repo.clone());
                    }
                }
            }
            planned += bytes;
            let tags = store.tags(&c.repo).await.unwrap_or_default();
            let mut evicted_tags = Vec::new();
            for t in tags {
                let Ok(tag) = t.parse() else { continue };
                if let Ok(m) = store.manifest_by_tag(&c.repo, &tag).await
                    && m.digest == c.digest
                {
                    evicted_tags.push(t);
                }
            }
            for m in &c.members {
                match store.manifest_delete(&c.repo, m).await {
                    Ok(()) | Err(StorageError::ManifestUnknown) => report.manifests += 1,
                    Err(e) => return Err(e),
                }
            }
            tracing::info!(repository = %c.repo, digest = %c.digest, tags = ?evicted_tags, bytes, "evicting image");
            let digest = c.digest.to_string();
            self.syncer.state().update(|s| {
                for t in &evicted_tags {
                    s.evicted
                        .entry(c.repo.as_str().to_owned())
                        .or_default()
                        .insert(t.clone(), digest.clone());
                }
            });
            self.access
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&(c.repo.as_str().to_owned(), digest));
            self.dirty.store(true, Ordering::Relaxed);
            report.images += 1;
        }
        for (b, repos) in &doomed {
            lock.check()?;
            if store.blob_remove(b, Duration::ZERO).await? {
                report.blobs += 1;
                report.bytes += sizes.get(b).copied().unwrap_or(0);
            }
            for repo in repos {
                store.repo_blob_unlink(repo, b).await?;
            }
        }
        let m = self.syncer.metrics();
        m.evictions.inc_by(report.images as u64);
        m.evicted_bytes.inc_by(report.bytes);
        Ok(report)
    }
}

struct Candidate {
    repo: RepositoryName,
    digest: Digest,
    last_pull: u64,
    members: Vec<Digest>,
}
