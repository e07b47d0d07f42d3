//! The OCI content model over storage: what a manifest is (parsing, the blobs and children it
//! names) and the one way a manifest is written, shared by client pushes, sync, staging and
//! pull-through. Below both `service` and `sync`, so neither imports the other for it.

pub mod manifest;
pub mod platform;

use bytes::Bytes;
use outpost_core::{Digest, Reference, RepositoryName};

use crate::storage::{NewManifest, StorageError, Store};
use manifest::{ManifestError, ParsedManifest};

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("manifest content does not match digest {0}")]
    DigestMismatch(Digest),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// The outcome of a manifest push.
pub struct Pushed {
    pub digest: Digest,
    pub subject: Option<Digest>,
}

/// Which children of an index must be in the repository before the index is linked.
#[derive(Debug, Clone, Copy)]
pub enum Children<'a> {
    /// Every child (client pushes: an index arrives after all it names).
    All,
    /// Only these: an index synced under a platform filter names children the site never
    /// fetches, and a tag pointed at a stored index needs nothing checked again.
    Only(&'a [Digest]),
}

/// Validates a manifest and links it into `repo` under `reference`.
pub async fn push_manifest(
    store: &dyn Store,
    repo: &RepositoryName,
    reference: &Reference,
    content_type: Option<&str>,
    content: Bytes,
) -> Result<Pushed, PushError> {
    push_manifest_with(store, repo, reference, content_type, content, Children::All).await
}

/// [`push_manifest`], requiring only `children` of an index to be stored.
pub async fn push_manifest_with(
    store: &dyn Store,
    repo: &RepositoryName,
    reference: &Reference,
    content_type: Option<&str>,
    content: Bytes,
    children: Children<'_>,
) -> Result<Pushed, PushError> {
    let parsed: ParsedManifest = manifest::parse(&content, content_type)?;
    let required: &[Digest] = match children {
        Children::All => &parsed.manifests,
        Children::Only(c) => c,
    };
    let (digest, tag) = match reference {
        Reference::Digest(d) => {
            let actual = crate::storage::hash::digest_of(d.algorithm(), &content);
            if &actual != d {
                return Err(PushError::DigestMismatch(d.clone()));
            }
            (actual, None)
        }
        Reference::Tag(t) => (
            crate::storage::hash::digest_of(outpost_core::Algorithm::Sha256, &content),
            Some(t),
        ),
    };
    let subject = parsed
        .subject
        .as_ref()
        .map(|s| (s, parsed.referrer_descriptor(&digest, content.len() as u64)));
    let names = parsed.names();
    store
        .manifest_put(
            repo,
            NewManifest {
                digest: &digest,
                media_type: &parsed.media_type,
                content,
                blobs: &parsed.blobs,
                manifests: required,
                names: &names,
                tag,
                subject,
            },
        )
        .await?;
    Ok(Pushed {
        subject: parsed.subject.clone(),
        digest,
    })
}
