//! Manifest contents by digest, kept in memory: content-addressed, so an entry can never be
//! stale, and a manifest GET (a kubelet's first request at every pod start) costs one request
//! to the store instead of three. Bounded in bytes; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;
use outpost_core::Digest;

/// All entries together stay below this many bytes.
const MAX_BYTES: usize = 32 * 1024 * 1024;
/// Larger manifests (huge indexes) are not kept: they would push out many small ones.
const MAX_ENTRY: usize = 1024 * 1024;

#[derive(Default)]
pub(super) struct ManifestCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Digest, Bytes>,
    /// Insertion order, for eviction.
    order: VecDeque<Digest>,
    bytes: usize,
}

impl ManifestCache {
    pub(super) fn get(&self, d: &Digest) -> Option<Bytes> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.entries.get(d).cloned()
    }

    /// Keeps `content` of the manifest `d`, which the caller checked hashes to `d`.
    pub(super) fn insert(&self, d: &Digest, content: &Bytes) {
        if content.len() > MAX_ENTRY {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.entries.contains_key(d) {
            return;
        }
        while inner.bytes + content.len() > MAX_BYTES {
            let Some(old) = inner.order.pop_front() else {
                break;
            };
            if let Some(b) = inner.entries.remove(&old) {
                inner.bytes -= b.len();
            }
        }
        inner.bytes += content.len();
        inner.order.push_back(d.clone());
        inner.entries.insert(d.clone(), content.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_core::Algorithm;

    fn digest(n: usize) -> Digest {
        Digest::new(Algorithm::Sha256, &format!("{n:064x}")).expect("digest")
    }

    #[test]
    fn keeps_entries_and_evicts_the_oldest_above_the_bound() {
        let c = ManifestCache::default();
        let big = Bytes::from(vec![0u8; MAX_ENTRY]);
        let n = MAX_BYTES / MAX_ENTRY;
        for i in 0..n {
            c.insert(&digest(i), &big);
        }
        assert!(c.get(&digest(0)).is_some(), "all {n} fit");
        c.insert(&digest(n), &big);
        assert!(c.get(&digest(0)).is_none(), "the oldest went first");
        assert!(c.get(&digest(1)).is_some());
        assert!(c.get(&digest(n)).is_some());
        let inner = c.inner.lock().expect("lock");
        assert!(inner.bytes <= MAX_BYTES);
        assert_eq!(inner.entries.len(), inner.order.len());
    }

    #[test]
    fn skips_entries_larger_than_the_entry_bound() {
        let c = ManifestCache::default();
        c.insert(&digest(1), &Bytes::from(vec![0u8; MAX_ENTRY + 1]));
        assert!(c.get(&digest(1)).is_none());
    }
}
