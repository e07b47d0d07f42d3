//! The store's size without listing it, for `outpost_storage_bytes`, the status and
//! `--max-storage`.
//!
//! A listing costs a `stat` per blob on disk and a LIST request per 1000 blobs on object
//! storage, and grows with the store; done every minute it kept a large registry from ever
//! being idle. Instead the store counts the bytes of the blobs it creates and removes
//! ([`crate::storage::BlobBytes`]), and the total lives in a document beside the content
//! (`usage.json`), shared by every process on the store: each folds in what it created and
//! removed since it last did (a conditional write, so two processes never overwrite each
//! other's change) and reads the total back, one small read when nothing changed. Replicas
//! thus see each other's pushes, and a `gc` run from the command line hands its removals to
//! the running server, without any of them listing the store. The one listing is the
//! leader's (the only process's without leader election), once, when it starts leading: it
//! sets the figure exactly, correcting what a crash between a write and its fold lost.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};

use crate::storage::{BlobBytes, StorageError, Store};

/// The shared total among the store's documents.
pub const USAGE_KEY: &str = "usage.json";
/// How often a serving process folds in its bytes and reads the total back: one document
/// read every interval when idle, whatever the store's size.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(10);
/// Conditional writes tried per fold before leaving the bytes for the next one (another
/// process wrote in between each time).
const ATTEMPTS: usize = 5;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageDoc {
    /// Bytes of all blobs in the store.
    bytes: u64,
    /// Unix milliseconds of the last listing that set `bytes` exactly.
    measured_at_ms: u64,
    /// Unix milliseconds of the last change.
    updated_at_ms: u64,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

fn encode(doc: &UsageDoc) -> Result<Bytes, StorageError> {
    serde_json::to_vec(doc)
        .map(Bytes::from)
        .map_err(|e| StorageError::Io(std::io::Error::other(e)))
}

/// This process's view of the store's size.
pub struct Usage {
    store: Arc<dyn Store>,
    counter: Arc<BlobBytes>,
    /// The counter's (added, removed) already folded into the document.
    published: Mutex<(u64, u64)>,
    /// The document's total when last read or written; `None` before any.
    shared: Mutex<Option<u64>>,
    /// `outpost_storage_bytes`, set to [`Usage::current`] at every fold.
    gauge: Gauge<u64, AtomicU64>,
    /// When this process last folded or measured (unix milliseconds): a listing made after
    /// it already holds what the process wrote before it.
    synced_ms: Mutex<u64>,
    /// One fold at a time (the periodic one, retention's, the one at shutdown).
    folding: tokio::sync::Mutex<()>,
}

impl Usage {
    pub fn new(store: Arc<dyn Store>, gauge: Gauge<u64, AtomicU64>) -> Self {
        // A backend that does not count gets a counter that stays at zero.
        let counter = store.blob_bytes().unwrap_or_default();
        let published = (counter.added(), counter.removed());
        Usage {
            store,
            counter,
            published: Mutex::new(published),
            shared: Mutex::new(None),
            gauge,
            synced_ms: Mutex::new(unix_ms()),
            folding: tokio::sync::Mutex::new(()),
        }
    }

    fn unfolded(&self) -> i128 {
        let (a, r) = *self.published.lock().unwrap_or_else(|p| p.into_inner());
        let added = i128::from(self.counter.added()) - i128::from(a);
        let removed = i128::from(self.counter.removed()) - i128::from(r);
        added - removed
    }

    /// The store's size as this process knows it: the shared total plus what it created and
    /// removed since it last folded.
    pub fn current(&self) -> u64 {
        let shared = self
            .shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .unwrap_or(0);
        let total = i128::from(shared) + self.unfolded();
        u64::try_from(total.max(0)).unwrap_or(u64::MAX)
    }

    fn set_shared(&self, total: u64) {
        *self.shared.lock().unwrap_or_else(|p| p.into_inner()) = Some(total);
        self.gauge.set(self.current());
    }

    /// Lists the store and makes its total the shared figure (the leader, once).
    pub async fn measure(&self) -> Result<u64, StorageError> {
        let _one = self.folding.lock().await;
        // Taken before the listing: bytes written during it count again at the next fold
        // (the figure errs high, so eviction starts early rather than late).
        let before = (self.counter.added(), self.counter.removed());
        let now = unix_ms();
        let total: u64 = self.store.blob_list().await?.iter().map(|b| b.size).sum();
        let doc = UsageDoc {
            bytes: total,
            measured_at_ms: now,
            updated_at_ms: unix_ms(),
        };
        self.store.doc_put(USAGE_KEY, encode(&doc)?).await?;
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = before;
        *self.synced_ms.lock().unwrap_or_else(|p| p.into_inner()) = now;
        self.set_shared(total);
        Ok(total)
    }

    /// Folds what this process created and removed into the shared total and reads it back;
    /// returns [`Usage::current`]. Without a document yet (nobody measured), only this
    /// process's own count moves.
    pub async fn fold(&self) -> Result<u64, StorageError> {
        let _one = self.folding.lock().await;
        for _ in 0..ATTEMPTS {
            let snap = (self.counter.added(), self.counter.removed());
            let delta = {
                let (a, r) = *self.published.lock().unwrap_or_else(|p| p.into_inner());
                (i128::from(snap.0) - i128::from(a)) - (i128::from(snap.1) - i128::from(r))
            };
            let Some((raw, version)) = self.store.doc_get_versioned(USAGE_KEY).await? else {
                self.gauge.set(self.current());
                return Ok(self.current());
            };
            let doc: UsageDoc = match serde_json::from_slice(&raw) {
                Ok(d) => d,
                Err(e) => {
                    // Left for the leader's next measure to replace; counting on meanwhile.
                    tracing::warn!(error = %e, "unreadable {USAGE_KEY}");
                    self.gauge.set(self.current());
                    return Ok(self.current());
                }
            };
            let synced = *self.synced_ms.lock().unwrap_or_else(|p| p.into_inner());
            if delta == 0 || doc.measured_at_ms > synced {
                // Measured since this process last synced: the listing holds what it wrote
                // before (what it wrote during the listing is lost: a narrow window, once
                // per leader).
                *self.published.lock().unwrap_or_else(|p| p.into_inner()) = snap;
                *self.synced_ms.lock().unwrap_or_else(|p| p.into_inner()) = unix_ms();
                self.set_shared(doc.bytes);
                return Ok(self.current());
            }
            let bytes = u64::try_from((i128::from(doc.bytes) + delta).max(0)).unwrap_or(u64::MAX);
            let started = unix_ms();
            let new = UsageDoc {
                bytes,
                measured_at_ms: doc.measured_at_ms,
                updated_at_ms: started,
            };
            if self
                .store
                .doc_put_if(USAGE_KEY, encode(&new)?, Some(&version))
                .await?
                .is_some()
            {
                *self.published.lock().unwrap_or_else(|p| p.into_inner()) = snap;
                *self.synced_ms.lock().unwrap_or_else(|p| p.into_inner()) = started;
                self.set_shared(bytes);
                return Ok(self.current());
            }
        }
        self.gauge.set(self.current());
        Ok(self.current())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStore;
    use crate::storage::hash::digest_of;
    use outpost_core::{Algorithm, Digest};

    async fn put(store: &dyn Store, data: &'static [u8]) -> Digest {
        let d = digest_of(Algorithm::Sha256, data);
        let body = futures_util::stream::iter([Ok(Bytes::from_static(data))]);
        store.blob_put(&d, Box::pin(body), None).await.unwrap();
        d
    }

    fn blob_listings(store: &dyn Store) -> (u64, u64) {
        let [(_, blobs), (_, repos)] = store.listings().unwrap().snapshot();
        (blobs, repos)
    }

    /// The exact size, from a handle of its own (its listing is not counted against the
    /// handles under test).
    async fn exact(dir: &std::path::Path) -> u64 {
        let other = FsStore::open(dir).unwrap();
        other
            .blob_list()
            .await
            .unwrap()
            .iter()
            .map(|b| b.size)
            .sum()
    }

    #[tokio::test]
    async fn one_listing_at_start_then_the_writes_own_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        put(&*store, b"before the start").await;
        let gauge = Gauge::<u64, AtomicU64>::default();
        let usage = Usage::new(store.clone(), gauge.clone());
        assert_eq!(usage.measure().await.unwrap(), 16);
        assert_eq!(gauge.get(), 16);
        assert_eq!(blob_listings(&*store), (1, 0));

        // Idle: ten minutes' worth of folds read the document and list nothing.
        for _ in 0..(600 / PUBLISH_INTERVAL.as_secs()) {
            assert_eq!(usage.fold().await.unwrap(), 16);
        }
        assert_eq!(blob_listings(&*store), (1, 0), "no listing while idle");

        // A new blob counts at once, the same blob again not at all.
        let d = put(&*store, b"12345").await;
        assert_eq!(usage.current(), 21);
        put(&*store, b"12345").await;
        assert_eq!(usage.current(), 21);
        assert_eq!(usage.fold().await.unwrap(), 21);
        assert_eq!(gauge.get(), 21);

        // Another process on the store (a `gc` from the command line): its removal reaches
        // the first one's figure through the document, still without a listing.
        let other: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        let gc = Usage::new(other.clone(), Gauge::default());
        assert!(other.blob_remove(&d, Duration::ZERO).await.unwrap());
        assert_eq!(gc.fold().await.unwrap(), 16);
        assert_eq!(usage.fold().await.unwrap(), 16);
        assert_eq!(usage.current(), exact(dir.path()).await);
        assert_eq!(blob_listings(&*store), (1, 0));
        assert_eq!(blob_listings(&*other), (0, 0));
        let doc: UsageDoc =
            serde_json::from_slice(&store.doc_get(USAGE_KEY).await.unwrap().unwrap()).unwrap();
        assert_eq!(doc.bytes, 16);
    }

    #[tokio::test]
    async fn without_a_measure_a_process_counts_its_own_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        let usage = Usage::new(store.clone(), Gauge::default());
        put(&*store, b"abc").await;
        // No document yet (a follower before the leader measured): its own count only, and
        // nothing written that would pass for the store's total.
        assert_eq!(usage.fold().await.unwrap(), 3);
        assert!(store.doc_get(USAGE_KEY).await.unwrap().is_none());
        assert_eq!(blob_listings(&*store), (0, 0));
        // A damaged document is not trusted over the count, nor is it an error.
        store
            .doc_put(USAGE_KEY, Bytes::from_static(b"not json"))
            .await
            .unwrap();
        assert_eq!(usage.fold().await.unwrap(), 3);
        // The leader's measure replaces it, and the folds go on from there.
        // (Another process: a handle, and so a count, of its own.)
        let leader_store: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        let leader = Usage::new(leader_store, Gauge::default());
        assert_eq!(leader.measure().await.unwrap(), 3);
        // What the follower wrote before the measure is in it: not counted twice.
        assert_eq!(usage.fold().await.unwrap(), 3);
        put(&*store, b"de").await;
        assert_eq!(usage.fold().await.unwrap(), 5);
        assert_eq!(leader.fold().await.unwrap(), 5);
    }
}
