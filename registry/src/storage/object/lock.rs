//! The maintenance lock across processes sharing a bucket: `gc` (exclusive) against manifest
//! pushes of every server on the same store (shared).
//!
//! An object store has no locks, so the exclusive side is a lease: the object
//! `locks/maintenance.json` (outside what gc, fsck and the documents list), holding who took it
//! and until when. It is written through the same conditional pair as the store's documents
//! ([`super::docs::put_if`]): created only if absent, renewed only at the version it holds,
//! taken over once expired only at the expired version (two takers cannot both win), and
//! deleted on release. A push does not write anything: before its final write it reads the
//! object (cached for [`LockTiming::cache_ttl`], so a busy server reads it at most once per
//! interval) and waits while a live lease exists.
//!
//! Unlike the leader lease (`crate::leader`), which judges expiry by watching the record go
//! unchanged on the reader's own clock, this record carries its expiry time: a push reads it
//! once and must decide at once, with no history to watch.
//!
//! A push that read "free" just before gc took the lease goes on writing; gc therefore waits
//! [`LockTiming::settle`] (the cache age a push may rely on plus a bound on its writes) before
//! it marks. A push whose writes took longer than that checks again afterwards, with a fresh
//! read of the lock and of its blobs, and withdraws the manifest if a gc took them.
//!
//! Stores without conditional writes (an S3 server with them switched off) get `put_if`'s
//! read-compare-write instead: best effort, two gc processes starting within the same instant
//! could both take the lock there.
//!
//! Leases compare the holder's wall clock (the expiry it wrote) with the reader's: the lease
//! is long against any sane clock skew between hosts.

use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use object_store::path::Path as Key;
use serde::{Deserialize, Serialize};

use super::BucketStore;
use super::docs::{get_versioned, put_if};
use crate::storage::{DocVersion, MaintenanceGuard, MaintenanceHold, StorageError};

/// Where the lease lives, relative to the prefix.
const LOCK_REL: &str = "locks/maintenance.json";
/// The record is tiny; a larger object there is not ours.
const MAX_LOCK_READ: u64 = 4096;

/// The lock's timings. The defaults suit production; tests shorten them.
#[derive(Debug, Clone, Copy)]
pub struct LockTiming {
    /// How long a lease lasts without renewal (a crashed gc blocks pushes at most this long).
    pub lease: Duration,
    /// How old a push's reading of the lock may be when it starts its final write.
    pub cache_ttl: Duration,
    /// How long a push's final writes may take after that and still be covered by the settle
    /// period (a slower push checks again afterwards).
    pub write_bound: Duration,
    /// How long `gc` waits for another gc's lease before giving up.
    pub acquire_wait: Duration,
    /// How long a push waits for a gc's lease before answering 503.
    pub push_wait: Duration,
}

#[cfg(test)]
impl LockTiming {
    /// Short waits, for tests with every process on one machine.
    pub(crate) fn quick() -> Self {
        LockTiming {
            lease: Duration::from_secs(20),
            cache_ttl: Duration::from_millis(100),
            write_bound: Duration::from_millis(200),
            acquire_wait: Duration::from_secs(30),
            push_wait: Duration::from_secs(20),
        }
    }
}

impl Default for LockTiming {
    fn default() -> Self {
        // Two minutes: long against clock skew and a stalled request, short enough that a
        // crashed gc holds pushes up for little time.
        let lease = Duration::from_secs(120);
        LockTiming {
            lease,
            // One lock read per two seconds on a busy server.
            cache_ttl: Duration::from_secs(2),
            // Checking a few links and writing two small objects: well under a second on a
            // healthy store.
            write_bound: Duration::from_secs(3),
            // A crashed holder's lease runs out within `lease`: the waiter then takes it over.
            acquire_wait: lease + Duration::from_secs(10),
            push_wait: lease,
        }
    }
}

impl LockTiming {
    /// The defaults with a settle period of `settle` (split between cache age and writes).
    pub fn with_settle(settle: Duration) -> Self {
        let cache_ttl = settle / 2;
        LockTiming {
            cache_ttl,
            write_bound: settle.saturating_sub(cache_ttl),
            ..LockTiming::default()
        }
    }

    /// How long gc waits after taking the lease before it marks: any push that read the lock
    /// as free before the lease existed has finished its final write by then.
    pub fn settle(&self) -> Duration {
        self.cache_ttl + self.write_bound
    }

    fn renew_every(&self) -> Duration {
        self.lease / 4
    }

    /// Remaining lease below which the holder stops removing (a renewal was missed twice).
    fn safety_margin(&self) -> Duration {
        self.lease / 4
    }
}

#[derive(Serialize, Deserialize, Debug)]
struct LockRecord {
    holder: String,
    /// Milliseconds since the Unix epoch, by the holder's clock.
    expires_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn format_ms(ms: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t).to_string()
}

fn locked(text: String) -> StorageError {
    StorageError::MaintenanceLocked(text)
}

/// What a read of the lock found, and when the read was sent.
#[derive(Clone, Copy)]
pub(super) struct Observation {
    pub(super) at: Instant,
    /// The expiry of another process's live lease, `None` when pushes may go on.
    held_until_ms: Option<u64>,
}

/// This process's view of the lock: its holder id and the cached observation.
pub(super) struct Shared {
    pub(super) timing: LockTiming,
    holder: String,
    cache: tokio::sync::Mutex<Option<Observation>>,
}

impl Shared {
    pub(super) fn new(timing: LockTiming) -> Self {
        Shared {
            timing,
            holder: format!("{}-{}", std::process::id(), super::uploads::random_id()),
            cache: tokio::sync::Mutex::new(None),
        }
    }
}

impl BucketStore {
    fn lock_key(&self) -> Key {
        self.key(LOCK_REL)
    }

    /// The lease record and its version, `None` if there is none.
    async fn read_lock(&self) -> Result<Option<(LockRecord, DocVersion)>, StorageError> {
        let Some((raw, version)) = get_versioned(self, &self.lock_key(), MAX_LOCK_READ).await?
        else {
            return Ok(None);
        };
        // An unreadable record (a torn manual edit) counts as expired: it is taken over.
        let rec = serde_json::from_slice(&raw).unwrap_or(LockRecord {
            holder: String::new(),
            expires_ms: 0,
        });
        Ok(Some((rec, version)))
    }

    fn lock_record(&self) -> Bytes {
        let rec = LockRecord {
            holder: self.lock.holder.clone(),
            expires_ms: now_ms().saturating_add(
                u64::try_from(self.lock.timing.lease.as_millis()).unwrap_or(u64::MAX),
            ),
        };
        Bytes::from(serde_json::to_vec(&rec).unwrap_or_default())
    }

    /// Writes this process's lease if the object is still at `expected` (`None`: absent).
    async fn put_lock(
        &self,
        expected: Option<&DocVersion>,
    ) -> Result<Option<DocVersion>, StorageError> {
        put_if(self, &self.lock_key(), self.lock_record(), expected).await
    }

    /// Reads the lock, or takes a reading younger than the cache TTL. `fresh_after`: only a
    /// reading sent after that instant will do.
    async fn observe(&self, fresh_after: Option<Instant>) -> Result<Observation, StorageError> {
        let mut cache = self.lock.cache.lock().await;
        if let Some(o) = *cache
            && o.at.elapsed() < self.lock.timing.cache_ttl
            && fresh_after.is_none_or(|t| o.at >= t)
        {
            return Ok(o);
        }
        let at = Instant::now();
        let held_until_ms = match self.read_lock().await? {
            // This process's own lease: the in-process lock already orders its pushes.
            Some((rec, _)) if rec.holder != self.lock.holder && rec.expires_ms > now_ms() => {
                Some(rec.expires_ms)
            }
            _ => None,
        };
        let o = Observation { at, held_until_ms };
        *cache = Some(o);
        Ok(o)
    }

    /// Waits (bounded) until no other process holds the lease. Returns the reading that found
    /// it free; `waited` tells whether a lease was seen on the way.
    pub(super) async fn wait_lock_free(
        &self,
        fresh_after: Option<Instant>,
    ) -> Result<(Observation, bool), StorageError> {
        let t = self.lock.timing;
        let deadline = Instant::now() + t.push_wait;
        let mut waited = false;
        // Bounded by the deadline; the count bounds it too should the clock misbehave.
        for _ in 0..100_000 {
            let o = self.observe(fresh_after).await?;
            let Some(until_ms) = o.held_until_ms else {
                return Ok((o, waited));
            };
            waited = true;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            let to_expiry = Duration::from_millis(until_ms.saturating_sub(now_ms()));
            let nap = t
                .cache_ttl
                .min(to_expiry)
                .min(deadline - now)
                .max(Duration::from_millis(20));
            tokio::time::sleep(nap).await;
        }
        Err(StorageError::Unavailable(io::Error::other(
            "gc holds the maintenance lock on this store; retry later",
        )))
    }

    /// Takes the lease (waiting, bounded, for another holder), then waits the settle period.
    pub(super) async fn lock_exclusive(&self) -> Result<MaintenanceGuard, StorageError> {
        let local = self.maintenance.clone().write_owned().await;
        let t = self.lock.timing;
        let deadline = Instant::now() + t.acquire_wait;
        let mut backoff = Duration::from_millis(100);
        // The first attempt creates; after that, each attempt names the version last read.
        let mut current: Option<(LockRecord, DocVersion)> = None;
        let mut taken = None;
        for _ in 0..10_000 {
            let sent = Instant::now();
            if let Some(v) = self.put_lock(current.as_ref().map(|(_, v)| v)).await? {
                if current.is_some() {
                    // Expired (its holder crashed), unreadable, or a leftover of this process.
                    tracing::warn!("taking over an expired gc maintenance lock");
                }
                taken = Some((v, sent));
                break;
            }
            // Someone else wrote it first: look again.
            current = self.read_lock().await?;
            let holder_until = match &current {
                Some((rec, _)) if rec.expires_ms > now_ms() && rec.holder != self.lock.holder => {
                    Some(rec.expires_ms)
                }
                _ => None,
            };
            let Some(until) = holder_until else {
                continue;
            };
            // A live lease is never overwritten: after the wait, try to create again.
            current = None;
            let now = Instant::now();
            if now >= deadline {
                return Err(locked(format!(
                    "another gc holds the maintenance lock on this store until {} \
                     (waited {} s)",
                    format_ms(until),
                    t.acquire_wait.as_secs()
                )));
            }
            let to_expiry = Duration::from_millis(until.saturating_sub(now_ms()));
            tokio::time::sleep(
                backoff
                    .min(to_expiry + Duration::from_millis(10))
                    .min(deadline - now),
            )
            .await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        let Some((version, sent)) = taken else {
            return Err(locked(
                "could not take the maintenance lock on this store".into(),
            ));
        };
        // The cached reading may predate the lease; this process's pushes are held off by
        // `local` anyway.
        *self.lock.cache.lock().await = None;
        let state = Arc::new(HeldState {
            lost: AtomicBool::new(false),
            version: std::sync::Mutex::new(version),
            valid_until: std::sync::Mutex::new(sent + t.lease),
            io: tokio::sync::Mutex::new(()),
        });
        let renewer = tokio::spawn(renew(self.clone(), state.clone()));
        let guard = ObjectGuard {
            local: Some(local),
            store: self.clone(),
            state,
            renewer,
            released: false,
        };
        // Pushes that read "free" just before the lease appeared finish meanwhile.
        tokio::time::sleep(t.settle()).await;
        guard.check()?;
        Ok(Box::new(guard))
    }
}

struct HeldState {
    lost: AtomicBool,
    version: std::sync::Mutex<DocVersion>,
    /// By this process's clock, from when the last successful write was sent.
    valid_until: std::sync::Mutex<Instant>,
    /// Held across a renewal's write, so a release never races one.
    io: tokio::sync::Mutex<()>,
}

impl HeldState {
    fn version(&self) -> DocVersion {
        self.version
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn valid_until(&self) -> Instant {
        *self.valid_until.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Renews the lease every quarter lease until the guard goes; notes a lost lease.
async fn renew(store: BucketStore, state: Arc<HeldState>) {
    let t = store.lock.timing;
    loop {
        tokio::time::sleep(t.renew_every()).await;
        let _io = state.io.lock().await;
        let sent = Instant::now();
        match store.put_lock(Some(&state.version())).await {
            Ok(Some(v)) => {
                *state.version.lock().unwrap_or_else(|p| p.into_inner()) = v;
                *state.valid_until.lock().unwrap_or_else(|p| p.into_inner()) = sent + t.lease;
            }
            Ok(None) => {
                tracing::error!("the gc maintenance lock was taken over by another process");
                state.lost.store(true, Ordering::SeqCst);
                return;
            }
            // Retried at the next tick; `check` stops the holder before the lease runs out.
            Err(e) => tracing::warn!(error = %e, "cannot renew the gc maintenance lock"),
        }
    }
}

struct ObjectGuard {
    /// This process's side; on a drop without release it goes with the background delete, so
    /// a new lease of this process is never deleted by an old guard's.
    local: Option<tokio::sync::OwnedRwLockWriteGuard<()>>,
    store: BucketStore,
    state: Arc<HeldState>,
    renewer: tokio::task::JoinHandle<()>,
    released: bool,
}

impl ObjectGuard {
    /// Whether the lease is still ours with time to spare.
    fn still_ours(&self) -> bool {
        !self.state.lost.load(Ordering::SeqCst)
            && Instant::now() + self.store.lock.timing.safety_margin() < self.state.valid_until()
    }
}

#[async_trait]
impl MaintenanceHold for ObjectGuard {
    fn check(&self) -> Result<(), StorageError> {
        if self.still_ours() {
            Ok(())
        } else {
            Err(locked(
                "the maintenance lock on this store was lost (not renewed in time, or taken over \
                 by another gc); stopped before removing anything more"
                    .into(),
            ))
        }
    }

    async fn release(mut self: Box<Self>) -> Result<(), StorageError> {
        self.released = true;
        let _io = self.state.io.lock().await;
        self.renewer.abort();
        // A lease that may have run out could be someone else's by now: leave it to expire.
        if self.still_ours() {
            self.store.delete(&self.store.lock_key()).await?;
        }
        Ok(())
    }
}

impl Drop for ObjectGuard {
    fn drop(&mut self) {
        self.renewer.abort();
        if self.released || !self.still_ours() {
            return;
        }
        // Without an explicit release (an error path): delete in the background if the runtime
        // still runs; otherwise the lease expires.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let store = self.store.clone();
            let state = self.state.clone();
            let local = self.local.take();
            rt.spawn(async move {
                let _local = local;
                let _io = state.io.lock().await;
                if let Err(e) = store.delete(&store.lock_key()).await {
                    tracing::warn!(error = %e, "cannot release the gc maintenance lock");
                }
            });
        }
    }
}
