//! Readwrite mode's durable queue of client pushes waiting to go up to the parent: one small
//! JSON file per pushed manifest under `<storage>/sync/outbox/`, named so that listing order
//! is push order. An entry leaves the queue only once the parent has the manifest (or it is
//! dropped as a conflict the parent wins, or set aside under `failed/` when the parent refuses
//! it for good).

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use outpost_core::{Digest, RepositoryName, Tag};
use serde::{Deserialize, Serialize};

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
    dir: PathBuf,
    /// Next sequence number; guarded so concurrent pushes get distinct, ordered names.
    next: Mutex<u64>,
}

fn seq_of(name: &str) -> Option<u64> {
    name.strip_suffix(".json")?.parse().ok()
}

fn names(dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        if let Some(n) = e.file_name().to_str().and_then(seq_of) {
            out.push((n, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

impl Outbox {
    pub fn open(dir: PathBuf) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let next = names(&dir)?.last().map_or(1, |(n, _)| n + 1);
        Ok(Outbox {
            dir,
            next: Mutex::new(next),
        })
    }

    /// Queues a pushed manifest; durable when this returns.
    pub fn push(
        &self,
        repo: &RepositoryName,
        tag: Option<&Tag>,
        digest: &Digest,
    ) -> io::Result<()> {
        let entry = Entry {
            repo: repo.as_str().to_owned(),
            tag: tag.map(|t| t.as_str().to_owned()),
            digest: digest.to_string(),
            queued_utc: super::schedule::rfc3339(std::time::SystemTime::now()),
        };
        let raw = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        let mut next = self.next.lock().unwrap_or_else(|p| p.into_inner());
        let path = self.dir.join(format!("{:020}.json", *next));
        crate::storage::fs::write_file_atomic(&path, &raw, 0o644)?;
        *next += 1;
        Ok(())
    }

    /// Queued entries, oldest first. Unreadable files are set aside, not retried forever.
    pub fn entries(&self) -> io::Result<Vec<(PathBuf, Entry)>> {
        let mut out = Vec::new();
        for (_, path) in names(&self.dir)? {
            match std::fs::read(&path).map(|raw| serde_json::from_slice::<Entry>(&raw)) {
                Ok(Ok(e)) => out.push((path, e)),
                Ok(Err(e)) => {
                    tracing::warn!(file = %path.display(), error = %e, "unreadable outbox entry set aside");
                    self.set_aside(&path, &e.to_string())?;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        names(&self.dir).map(|n| n.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// (repository, tag) of every queued tag push: sync leaves these tags alone.
    pub fn pending_tags(&self) -> HashSet<(String, String)> {
        self.entries()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, e)| e.tag.map(|t| (e.repo, t)))
            .collect()
    }

    /// (repository, digest) of every queued push: never evicted before the parent has it.
    pub fn pending_digests(&self) -> HashSet<(String, String)> {
        self.entries()
            .unwrap_or_default()
            .into_iter()
            .map(|(_, e)| (e.repo, e.digest))
            .collect()
    }

    pub fn done(&self, path: &Path) -> io::Result<()> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves an entry the parent refuses for good to `failed/`, with the reason beside it.
    pub fn set_aside(&self, path: &Path, reason: &str) -> io::Result<()> {
        let failed = self.dir.join("failed");
        std::fs::create_dir_all(&failed)?;
        if let Some(name) = path.file_name() {
            std::fs::rename(path, failed.join(name))?;
            std::fs::write(
                failed.join(Path::new(name).with_extension("reason")),
                reason,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let repo: RepositoryName = "team/app".parse().unwrap();
        let d = |c: char| -> Digest {
            format!("sha256:{}", c.to_string().repeat(64))
                .parse()
                .unwrap()
        };
        let tag: Tag = "v1".parse().unwrap();
        let o = Outbox::open(dir.path().join("outbox")).unwrap();
        o.push(&repo, Some(&tag), &d('a')).unwrap();
        o.push(&repo, None, &d('b')).unwrap();
        let o = Outbox::open(dir.path().join("outbox")).unwrap();
        o.push(&repo, None, &d('c')).unwrap();
        let e = o.entries().unwrap();
        let digests: Vec<_> = e.iter().map(|(_, e)| e.digest.clone()).collect();
        assert_eq!(
            digests,
            vec![d('a').to_string(), d('b').to_string(), d('c').to_string()]
        );
        assert!(o.pending_tags().contains(&("team/app".into(), "v1".into())));
        o.done(&e[0].0).unwrap();
        o.set_aside(&e[1].0, "denied").unwrap();
        assert_eq!(o.len(), 1);
        assert!(o.pending_tags().is_empty());
    }
}
