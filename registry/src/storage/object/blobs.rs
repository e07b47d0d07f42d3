//! Content-addressed blobs: written through a buffered (multipart when large) upload that is
//! completed only once the content hashed to its digest, and aborted otherwise.

use std::io;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::ObjectStoreExt;
use object_store::buffered::BufWriter;
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore};
use outpost_core::{Algorithm, Digest};
use tokio::io::AsyncWriteExt;

use super::{BucketStore, age_of, os_err, os_io_err};
use crate::storage::hash::Hasher;
use crate::storage::{BlobInfo, BlobReader, ByteRange, ByteStream, RangeRequest, StorageError};

/// Size of the parts of a multipart upload (S3 wants at least 5 MiB for all but the last; at
/// most 10,000 parts, so blobs up to ~80 GB).
pub(super) const PART_SIZE: usize = 8 * 1024 * 1024;

/// A writer whose object appears only when [`Self::commit`] is called after a good digest.
/// Dropped before that (a client gone mid-push drops the request's future), it aborts the
/// multipart upload in the background, so no incomplete upload is left billing the user.
pub(super) struct BlobWriter {
    w: Option<BufWriter>,
    store: std::sync::Arc<dyn ObjectStore>,
    key: Key,
    hasher: Option<Hasher>,
    written: u64,
    /// The store handle's count of blob bytes created.
    bytes: std::sync::Arc<crate::storage::BlobBytes>,
}

impl BlobWriter {
    pub(super) fn new(store: &BucketStore, key: Key, algorithm: Algorithm) -> Self {
        BlobWriter {
            w: Some(BufWriter::with_capacity(
                store.store.clone(),
                key.clone(),
                PART_SIZE,
            )),
            store: store.store.clone(),
            key,
            hasher: Some(Hasher::new(algorithm)),
            written: 0,
            bytes: store.bytes.clone(),
        }
    }

    pub(super) async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), StorageError> {
        let (Some(w), Some(h)) = (self.w.as_mut(), self.hasher.as_mut()) else {
            return Err(StorageError::Io(io::Error::other("upload already ended")));
        };
        h.update(&chunk);
        self.written += chunk.len() as u64;
        w.put(chunk).await.map_err(os_err)
    }

    pub(super) fn written(&self) -> u64 {
        self.written
    }

    /// Completes the upload if the content hashed to `expected`, aborts it otherwise.
    pub(super) async fn commit(mut self, expected: &Digest) -> Result<u64, StorageError> {
        let actual = self.hasher.take().map(Hasher::finish);
        if actual.as_ref() != Some(expected) {
            self.abort_now().await;
            return Err(StorageError::DigestMismatch {
                expected: expected.clone(),
            });
        }
        let Some(mut w) = self.w.take() else {
            return Err(StorageError::Io(io::Error::other("upload already ended")));
        };
        if let Err(e) = w.shutdown().await {
            // Another replica completing the same blob at the same moment can make this
            // completion fail (Azure drops a blob's uncommitted blocks when one block list
            // commits). The key is content-addressed and only ever completed after a digest
            // check, so an object of this size there now holds these very bytes.
            if let Ok(meta) = self.store.head(&self.key).await
                && meta.size == self.written
            {
                return Ok(self.written);
            }
            // object_store cannot abort a writer once it has shut down (it panics); a
            // multipart upload left open is for the bucket's lifecycle rule (README).
            return Err(os_io_err(e));
        }
        // Counted only here: an upload that found the blob there wrote nothing new.
        self.bytes.add(self.written);
        Ok(self.written)
    }

    pub(super) async fn abort(mut self) {
        self.abort_now().await;
    }

    async fn abort_now(&mut self) {
        if let Some(mut w) = self.w.take()
            && let Err(e) = w.abort().await
        {
            tracing::warn!(error = %e, "could not abort an object upload");
        }
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        if let Some(mut w) = self.w.take()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            rt.spawn(async move {
                if let Err(e) = w.abort().await {
                    tracing::warn!(error = %e, "could not abort an abandoned object upload");
                }
            });
        }
    }
}

fn into_byte_stream(r: object_store::GetResult) -> ByteStream {
    Box::pin(r.into_stream().map(|c| c.map_err(io::Error::other)))
}

pub(super) async fn blob_size(
    store: &BucketStore,
    digest: &Digest,
) -> Result<Option<u64>, StorageError> {
    Ok(store.head(&store.blob_key(digest)).await?.map(|m| m.size))
}

pub(super) async fn blob_open(
    store: &BucketStore,
    digest: &Digest,
    range: Option<RangeRequest>,
) -> Result<(BlobReader, Option<ByteRange>), StorageError> {
    let key = store.blob_key(digest);
    let unknown = |e: object_store::Error| match e {
        object_store::Error::NotFound { .. } => StorageError::BlobUnknown(digest.clone()),
        e => os_err(e),
    };
    let Some(range) = range else {
        // One GET: its metadata carries the size.
        let r = store.store.get(&key).await.map_err(unknown)?;
        let size = r.meta.size;
        return Ok((
            BlobReader {
                size,
                body: into_byte_stream(r),
            },
            None,
        ));
    };
    let size = store
        .head(&key)
        .await?
        .ok_or_else(|| StorageError::BlobUnknown(digest.clone()))?
        .size;
    let resolved = range
        .resolve(size)
        .ok_or(StorageError::RangeNotSatisfiable { size })?;
    let opts = GetOptions {
        range: Some(GetRange::Bounded(resolved.first..resolved.last + 1)),
        ..GetOptions::default()
    };
    let r = store.store.get_opts(&key, opts).await.map_err(unknown)?;
    Ok((
        BlobReader {
            size,
            body: into_byte_stream(r),
        },
        Some(resolved),
    ))
}

pub(super) async fn blob_put(
    store: &BucketStore,
    digest: &Digest,
    mut body: ByteStream,
    declared_len: Option<u64>,
) -> Result<u64, StorageError> {
    let key = store.blob_key(digest);
    let check_len = |written: u64| match declared_len {
        Some(declared) if declared != written => Err(StorageError::SizeMismatch {
            declared,
            actual: written,
        }),
        _ => Ok(()),
    };
    if store.head(&key).await?.is_some() {
        // Already stored: the body is still checked, but nothing is uploaded again.
        let mut h = Hasher::new(digest.algorithm());
        let mut written = 0u64;
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(StorageError::Body)?;
            h.update(&chunk);
            written += chunk.len() as u64;
        }
        check_len(written)?;
        if &h.finish() != digest {
            return Err(StorageError::DigestMismatch {
                expected: digest.clone(),
            });
        }
        return Ok(written);
    }
    let mut w = BlobWriter::new(store, key, digest.algorithm());
    while let Some(chunk) = body.next().await {
        let res = match chunk {
            Ok(c) => w.write(c).await,
            Err(e) => Err(StorageError::Body(e)),
        };
        if let Err(e) = res {
            w.abort().await;
            return Err(e);
        }
    }
    if let Err(e) = check_len(w.written()) {
        w.abort().await;
        return Err(e);
    }
    w.commit(digest).await
}

pub(super) async fn blob_list(store: &BucketStore) -> Result<Vec<BlobInfo>, StorageError> {
    let mut out = Vec::new();
    for meta in store.list("blobs").await? {
        let Some(rel) = store.rel(&meta.location) else {
            continue;
        };
        let parts: Vec<&str> = rel.split('/').collect();
        let [_, alg, _, hex] = parts.as_slice() else {
            continue;
        };
        let Some(alg) = Algorithm::ALL.into_iter().find(|a| a.as_str() == *alg) else {
            continue;
        };
        let Ok(digest) = Digest::new(alg, hex) else {
            continue;
        };
        out.push(BlobInfo {
            digest,
            size: meta.size,
            age: age_of(&meta),
        });
    }
    out.sort_by(|a, b| a.digest.cmp(&b.digest));
    Ok(out)
}

pub(super) async fn blob_remove(
    store: &BucketStore,
    digest: &Digest,
    min_age: Duration,
) -> Result<bool, StorageError> {
    let key = store.blob_key(digest);
    let Some(meta) = store.head(&key).await? else {
        return Ok(false);
    };
    if age_of(&meta) < min_age {
        return Ok(false);
    }
    store.delete(&key).await?;
    store.bytes.remove(meta.size);
    Ok(true)
}

pub(super) async fn blob_verify(
    store: &BucketStore,
    digest: &Digest,
) -> Result<bool, StorageError> {
    let r = match store.store.get(&store.blob_key(digest)).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => {
            return Err(StorageError::BlobUnknown(digest.clone()));
        }
        Err(e) => return Err(os_err(e)),
    };
    let mut h = Hasher::new(digest.algorithm());
    let mut s = r.into_stream();
    while let Some(c) = s.next().await {
        h.update(&c.map_err(os_err)?);
    }
    Ok(&h.finish() == digest)
}
