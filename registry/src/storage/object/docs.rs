//! Documents (see [`crate::storage::docs`]): one object each under `sync/`. A PUT replaces an
//! object whole, so there is nothing to stage.

use bytes::Bytes;
use object_store::ObjectStore;
use object_store::path::Path as Key;

use super::{BucketStore, os_err};
use crate::storage::StorageError;
use crate::storage::docs::{self, DOC_MAX_BYTES, DOC_ROOT};

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
