//! Readwrite mode's durable queue of client pushes waiting to go up to the parent: one small
//! JSON document per pushed manifest under `outbox/` among the store's documents
//! (`<storage>/sync/outbox/` on disk), keyed so that listing order is push order. An entry
//! leaves the queue only once the parent has the manifest (or it is dropped as a conflict the
//! parent wins, or set aside under `failed/` when the parent refuses it for good).
//!
//! Replicas sharing a store queue into the same folder: each entry is created only if its key
//! is free, so two replicas never write the same sequence number over each other, and the one
//! that loses takes a later number (its push came after).

use std::collections::HashSet;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use outpost_core::{Digest, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

use crate::storage::{StorageError, Store};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub repo: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    pub digest: String,
    pub queued_utc: String,
}

pub struct Outbox {
    store: Arc<dyn Store>,
    /// Next sequence number; guarded so concurrent pushes get distinct, ordered keys.
    next: tokio::sync::Mutex<u64>,
    /// Entries queued, kept beside the documents so status need not list the store.
    len: AtomicUsize,
}

const DIR: &str = "outbox";
const FAILED: &str = "outbox/failed";

fn seq_of(key: &str) -> Option<u64> {
    key.strip_prefix("outbox/")?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Keys of the queued entries, oldest first.
async fn keys(store: &dyn Store) -> Result<Vec<(u64, String)>, StorageError> {
    let mut out: Vec<(u64, String)> = store
        .doc_list(DIR)
        .await?
        .into_iter()
        .filter_map(|k| Some((seq_of(&k)?, k)))
        .collect();
    out.sort();
    Ok(out)
}

/// (repository, digest) of every push still queued for the parent, and of those set aside
/// under `failed/` (kept for the operator to resolve), read without changing anything: gc
/// keeps these manifests. An entry that does not parse is an error, since what it holds back
/// is unknown.
pub async fn held_digests(store: &dyn Store) -> Result<HashSet<(String, String)>, StorageError> {
    let mut keys: Vec<String> = keys(store).await?.into_iter().map(|(_, k)| k).collect();
    keys.extend(
        store
            .doc_list(FAILED)
            .await?
            .into_iter()
            .filter(|k| k.ends_with(".json")),
    );
    let mut out = HashSet::new();
    for key in keys {
        // Uploaded (and removed) since the listing.
        let Some(raw) = store.doc_get(&key).await? else {
            continue;
        };
        let e: Entry = serde_json::from_slice(&raw).map_err(|e| {
            StorageError::Io(io::Error::other(format!(
                "unreadable outbox entry {key}: {e}"
            )))
        })?;
        out.insert((e.repo, e.digest));
    }
    Ok(out)
}

impl Outbox {
    pub async fn open(store: Arc<dyn Store>) -> Result<Self, StorageError> {
        let queued = keys(store.as_ref()).await?;
        let next = queued.last().map_or(1, |(n, _)| n + 1);
        Ok(Outbox {
            store,
            next: tokio::sync::Mutex::new(next),
            len: AtomicUsize::new(queued.len()),
        })
    }

    /// Queues a pushed manifest; durable when this returns.
    pub async fn push(
        &self,
        repo: &RepositoryName,
        tag: Option<&Tag>,
        digest: &Digest,
    ) -> Result<(), StorageError> {
        let entry = Entry {
            repo: repo.as_str().to_owned(),
            tag: tag.map(|t| t.as_str().to_owned()),
            digest: digest.to_string(),
            queued_utc: super::schedule::rfc3339(std::time::SystemTime::now()),
        };
        let raw: bytes::Bytes = serde_json::to_vec(&entry)
            .map_err(|e| StorageError::Io(io::Error::other(e)))?
            .into();
        let mut next = self.next.lock().await;
        // Each lost race re-lists and moves past every number taken; bounded all the same.
        for _ in 0..100 {
            let key = format!("{DIR}/{:020}.json", *next);
            if self
                .store
                .doc_put_if(&key, raw.clone(), None)
                .await?
                .is_some()
            {
                *next += 1;
                self.len.fetch_add(1, Ordering::SeqCst);
                return Ok(());
            }
            // Another replica on this store took the number.
            let last = keys(self.store.as_ref())
                .await?
                .last()
                .map_or(0, |(n, _)| *n);
            *next = (*next + 1).max(last + 1);
        }
        Err(StorageError::Io(io::Error::other(
            "could not queue the push for the parent: every outbox number tried was taken",
        )))
    }

    /// Counts the queued entries again: a replica that does not sync sees the entries every
    /// replica queued, for status.
    pub async fn recount(&self) -> Result<(), StorageError> {
        let n = keys(self.store.as_ref()).await?.len();
        self.len.store(n, Ordering::SeqCst);
        Ok(())
    }

    /// Queued entries with their keys, oldest first. Unreadable ones are set aside, not
    /// retried forever.
    pub async fn entries(&self) -> Result<Vec<(String, Entry)>, StorageError> {
        let mut out = Vec::new();
        let queued = keys(self.store.as_ref()).await?;
        self.len.store(queued.len(), Ordering::SeqCst);
        for (_, key) in queued {
            let Some(raw) = self.store.doc_get(&key).await? else {
                continue;
            };
            match serde_json::from_slice::<Entry>(&raw) {
                Ok(e) => out.push((key, e)),
                Err(e) => {
                    tracing::warn!(entry = %key, error = %e, "unreadable outbox entry set aside");
                    self.set_aside(&key, &e.to_string()).await?;
                }
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (repository, tag) of every queued tag push: sync leaves these tags alone.
    pub async fn pending_tags(&self) -> HashSet<(String, String)> {
        self.entries()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, e)| e.tag.map(|t| (e.repo, t)))
            .collect()
    }

    /// (repository, digest) of every queued push: never evicted before the parent has it.
    pub async fn pending_digests(&self) -> HashSet<(String, String)> {
        self.entries()
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|(_, e)| (e.repo, e.digest))
            .collect()
    }

    pub async fn done(&self, key: &str) -> Result<(), StorageError> {
        self.store.doc_delete(key).await?;
        self.forget_one();
        Ok(())
    }

    fn forget_one(&self) {
        let _ = self
            .len
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Moves an entry the parent refuses for good to `failed/`, with the reason beside it.
    pub async fn set_aside(&self, key: &str, reason: &str) -> Result<(), StorageError> {
        let Some(name) = key.rsplit('/').next() else {
            return Ok(());
        };
        if let Some(raw) = self.store.doc_get(key).await? {
            self.store.doc_put(&format!("{FAILED}/{name}"), raw).await?;
        }
        let stem = name.strip_suffix(".json").unwrap_or(name);
        self.store
            .doc_put(
                &format!("{FAILED}/{stem}.reason"),
                bytes::Bytes::from(reason.to_owned()),
            )
            .await?;
        self.store.doc_delete(key).await?;
        self.forget_one();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::fs::FsStore;

    #[tokio::test]
    async fn keeps_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(FsStore::open(dir.path()).unwrap());
        let repo: RepositoryName = "team/app".parse().unwrap();
        let d = |c: char| -> Digest {
            format!("sha256:{}", c.to_string().repeat(64))
                .parse()
                .unwrap()
        };
        let tag: Tag = "v1".parse().unwrap();
        let o = Outbox::open(store.clone()).await.unwrap();
        o.push(&repo, Some(&tag), &d('a')).await.unwrap();
        o.push(&repo, None, &d('b')).await.unwrap();
        let o = Outbox::open(store.clone()).await.unwrap();
        assert_eq!(o.len(), 2);
        o.push(&repo, None, &d('c')).await.unwrap();
        let e = o.entries().await.unwrap();
        let digests: Vec<_> = e.iter().map(|(_, e)| e.digest.clone()).collect();
        assert_eq!(
            digests,
            vec![d('a').to_string(), d('b').to_string(), d('c').to_string()]
        );
        assert!(
            o.pending_tags()
                .await
                .contains(&("team/app".into(), "v1".into()))
        );
        o.done(&e[0].0).await.unwrap();
        o.set_aside(&e[1].0, "denied").await.unwrap();
        assert_eq!(o.len(), 1);
        assert!(o.pending_tags().await.is_empty());
        // On disk where the files always were.
        assert!(
            dir.path()
                .join("sync/outbox/failed/00000000000000000002.json")
                .exists()
        );
        assert_eq!(
            std::fs::read_to_string(
                dir.path()
                    .join("sync/outbox/failed/00000000000000000002.reason")
            )
            .unwrap(),
            "denied"
        );
        assert_eq!(Outbox::open(store).await.unwrap().len(), 1);
    }

    /// Two replicas opened on the same store before either pushed: every push is kept, in
    /// the order the pushes were queued, and each replica counts them all after a recount.
    #[tokio::test]
    async fn replicas_on_one_store_never_overwrite_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = || -> Arc<dyn Store> { Arc::new(FsStore::open(dir.path()).unwrap()) };
        let a = Outbox::open(store()).await.unwrap();
        let b = Outbox::open(store()).await.unwrap();
        let repo: RepositoryName = "team/app".parse().unwrap();
        let d = |c: char| -> Digest {
            format!("sha256:{}", c.to_string().repeat(64))
                .parse()
                .unwrap()
        };
        a.push(&repo, None, &d('a')).await.unwrap();
        b.push(&repo, None, &d('b')).await.unwrap();
        a.push(&repo, None, &d('c')).await.unwrap();
        b.push(&repo, None, &d('d')).await.unwrap();
        let digests: Vec<_> = a
            .entries()
            .await
            .unwrap()
            .into_iter()
            .map(|(_, e)| e.digest)
            .collect();
        let want: Vec<_> = "abcd".chars().map(|c| d(c).to_string()).collect();
        assert_eq!(digests, want);
        b.recount().await.unwrap();
        assert_eq!((a.len(), b.len()), (4, 4));
    }
}
