//! Documents (see [`crate::storage::docs`]): one object each under `sync/`. A PUT replaces an
//! object whole, so there is nothing to stage.

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};

use super::{BucketStore, os_err};
use crate::storage::StorageError;
use crate::storage::docs::{self, DOC_MAX_BYTES, DOC_ROOT, DocVersion};

impl BucketStore {
    fn doc_key(&self, key: &str) -> Key {
        self.key(&format!("{DOC_ROOT}/{key}"))
    }
}

pub(super) async fn doc_get(store: &BucketStore, key: &str) -> Result<Option<Bytes>, StorageError> {
    docs::check_key(key)?;
    store.get_small(&store.doc_key(key), DOC_MAX_BYTES).await
}

pub(super) async fn doc_put(
    store: &BucketStore,
    key: &str,
    data: Bytes,
) -> Result<(), StorageError> {
    docs::check_key(key)?;
    store.put(&store.doc_key(key), data).await
}

pub(super) async fn doc_delete(store: &BucketStore, key: &str) -> Result<(), StorageError> {
    docs::check_key(key)?;
    // No HEAD first: deleting nothing is fine here, and saves a request.
    store.delete(&store.doc_key(key)).await
}

pub(super) async fn doc_list(store: &BucketStore, dir: &str) -> Result<Vec<String>, StorageError> {
    docs::check_dir(dir)?;
    let rel_dir = if dir.is_empty() {
        DOC_ROOT.to_owned()
    } else {
        format!("{DOC_ROOT}/{dir}")
    };
    let prefix = store.key(&rel_dir);
    // With a delimiter: the documents of this folder only, not those of its sub-folders.
    let listing = store
        .store
        .list_with_delimiter(Some(&prefix))
        .await
        .map_err(os_err)?;
    let mut out: Vec<String> = listing
        .objects
        .iter()
        .filter_map(|m| {
            let rel = store.rel(&m.location)?;
            let name = rel.strip_prefix(rel_dir.as_str())?.strip_prefix('/')?;
            (docs::is_doc_name(name)).then(|| docs::join(dir, name))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// An ETag and, where the store versions objects, the version: what a conditional PUT names.
fn version_of(e_tag: Option<String>, version: Option<String>) -> DocVersion {
    DocVersion::new(format!(
        "{}\n{}",
        e_tag.unwrap_or_default(),
        version.unwrap_or_default()
    ))
}

fn update_version(v: &DocVersion) -> UpdateVersion {
    let (e_tag, version) = v.as_str().split_once('\n').unwrap_or((v.as_str(), ""));
    UpdateVersion {
        e_tag: Some(e_tag.to_owned()).filter(|s| !s.is_empty()),
        version: Some(version.to_owned()).filter(|s| !s.is_empty()),
    }
}

pub(super) async fn doc_get_versioned(
    store: &BucketStore,
    key: &str,
) -> Result<Option<(Bytes, DocVersion)>, StorageError> {
    docs::check_key(key)?;
    get_versioned(store, &store.doc_key(key), DOC_MAX_BYTES).await
}

pub(super) async fn doc_put_if(
    store: &BucketStore,
    key: &str,
    data: Bytes,
    expected: Option<&DocVersion>,
) -> Result<Option<DocVersion>, StorageError> {
    docs::check_key(key)?;
    put_if(store, &store.doc_key(key), data, expected).await
}

/// An object's content and version, `None` if there is none; refuses one over `max` bytes.
/// With [`put_if`], the conditional pair that documents and the gc maintenance lease share.
pub(super) async fn get_versioned(
    store: &BucketStore,
    key: &Key,
    max: u64,
) -> Result<Option<(Bytes, DocVersion)>, StorageError> {
    let r = match store.store.get(key).await {
        Ok(r) => r,
        Err(object_store::Error::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(os_err(e)),
    };
    if r.meta.size > max {
        return Err(StorageError::Io(std::io::Error::other(format!(
            "{key} is larger than {max} bytes"
        ))));
    }
    let version = version_of(r.meta.e_tag.clone(), r.meta.version.clone());
    Ok(Some((r.bytes().await.map_err(os_err)?, version)))
}

/// Writes `data` at `key` only if the object is still at `expected` (`None`: only if there is
/// none). `Ok(None)` when another writer changed, created or deleted it since it was read.
pub(super) async fn put_if(
    store: &BucketStore,
    key: &Key,
    data: Bytes,
    expected: Option<&DocVersion>,
) -> Result<Option<DocVersion>, StorageError> {
    let mode = match expected {
        None => PutMode::Create,
        Some(v) => PutMode::Update(update_version(v)),
    };
    match store
        .store
        .put_opts(
            key,
            PutPayload::from_bytes(data.clone()),
            PutOptions::from(mode),
        )
        .await
    {
        Ok(r) => Ok(Some(version_of(r.e_tag, r.version))),
        // Someone else created, changed or removed it since it was read: they won.
        Err(object_store::Error::AlreadyExists { .. })
        | Err(object_store::Error::Precondition { .. })
        | Err(object_store::Error::NotFound { .. }) => Ok(None),
        // A store without conditional writes (S3 without aws_conditional_put): compare the
        // version read now with the one expected, then write. Best effort: two writers can
        // still both pass the comparison in the moment between.
        Err(object_store::Error::NotImplemented { .. }) => {
            let now = get_versioned(store, key, u64::MAX).await?.map(|(_, v)| v);
            if now.as_ref() != expected {
                return Ok(None);
            }
            let r = store
                .store
                .put(key, PutPayload::from_bytes(data))
                .await
                .map_err(os_err)?;
            Ok(Some(version_of(r.e_tag, r.version)))
        }
        Err(e) => Err(os_err(e)),
    }
}
