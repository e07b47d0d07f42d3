//! The OCI content model over storage: what a manifest is (parsing, the blobs and children it
//! names) and the one way a manifest is written, shared by client pushes, sync, staging and
//! pull-through. Below both `service` and `sync`, so neither imports the other for it.

pub mod manifest;

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

/// Validates a manifest and links it into `repo` under `reference`.
pub async fn push_manifest(
    store: &dyn Store,
    repo: &RepositoryName,
    reference: &Reference,
    content_type: Option<&str>,
    content: Bytes,
) -> Result<Pushed, PushError> {
    let parsed: ParsedManifest = manifest::parse(&content, content_type)?;
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
    store
        .manifest_put(
            repo,
            NewManifest {
                digest: &digest,
                media_type: &parsed.media_type,
                content,
                blobs: &parsed.blobs,
                manifests: &parsed.manifests,
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
