//! The referrers index: one descriptor file per manifest with a `subject`.

use std::fs::{self};
use std::io::{self};

use outpost_core::{Digest, RepositoryName};

use super::FsStore;
use super::files::*;
use crate::storage::{Descriptor, StorageError};

pub(super) async fn referrers(
    store: &FsStore,
    repo: &RepositoryName,
    subject: &Digest,
) -> Result<Vec<Descriptor>, StorageError> {
    let dir = store.referrers_dir(repo, subject);
    let store = store.handle();
    let repo = repo.clone();
    blocking(move || {
        let mut out = Vec::new();
        for name in list_names(&dir)? {
            let raw = match fs::read(dir.join(&name)) {
                Ok(r) => r,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e.into()),
            };
            let Ok(desc) = serde_json::from_slice::<Descriptor>(&raw) else {
                tracing::warn!(file = %dir.join(&name).display(), "skipping unreadable referrer link");
                continue;
            };
            // A referrer whose manifest was deleted concurrently is not listed.
            if exists(&store.revision_link(&repo, &desc.digest))? {
                out.push(desc);
            }
        }
        out.sort_by(|a, b| a.digest.cmp(&b.digest));
        Ok(out)
    })
    .await
}
