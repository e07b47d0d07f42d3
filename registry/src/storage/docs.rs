//! Documents: small records kept beside the content (sync state, the readwrite outbox, staging
//! requests, pull times), each written whole or not at all.
//!
//! A key is a `/`-separated relative name such as `staging/stg-1a2b.json`; every segment
//! starts with a letter, digit or `_` and holds only letters, digits and `._-` (so no `..`, no
//! absolute path, no hidden temp file). Backends keep documents under [`DOC_ROOT`], which no
//! other part of the layout uses (`blobs/`, `repositories/`, `uploads/`, `tmp/`): on disk that
//! is where these files lived before they went through the store, so existing stores keep
//! their state.

use super::StorageError;

/// The folder under a store's root (or prefix) that holds every document.
pub const DOC_ROOT: &str = "sync";

/// Largest document read back (a sync state with many repositories stays far below).
pub const DOC_MAX_BYTES: u64 = 64 * 1024 * 1024;

const MAX_KEY_LEN: usize = 512;

/// Which content of a document a conditional write expects to replace: opaque, from
/// [`super::Store::doc_get_versioned`] (an ETag and version on object storage, a content hash
/// on disk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocVersion(String);

impl DocVersion {
    pub fn new(s: String) -> Self {
        DocVersion(s)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn valid_segment(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Checks a document key (see the module's rule).
pub fn check_key(key: &str) -> Result<(), StorageError> {
    if key.is_empty() || key.len() > MAX_KEY_LEN || !key.split('/').all(valid_segment) {
        // An I/O error of kind InvalidInput: a caller's bug, not something a client can send.
        return Err(StorageError::Io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "invalid document key {:?}",
                key.chars().take(80).collect::<String>()
            ),
        )));
    }
    Ok(())
}

/// Checks a folder of documents given to `doc_list`: "" for the top, or a valid key.
pub fn check_dir(dir: &str) -> Result<(), StorageError> {
    if dir.is_empty() {
        Ok(())
    } else {
        check_key(dir)
    }
}

/// Whether `name` could be the last segment of a key (entries that cannot, such as temp
/// files, are left out of listings).
pub fn is_doc_name(name: &str) -> bool {
    valid_segment(name)
}

/// `dir/name`, or `name` at the top.
pub fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_owned()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        for ok in [
            "state.json",
            "outbox/00000000000000000001.json",
            "outbox/failed/1.reason",
            "staging/stg-00ff.json",
            "_x",
        ] {
            assert!(check_key(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "../x",
            "a/../b",
            "a/./b",
            "a//b",
            "a/",
            ".hidden",
            "a/.x.tmp",
            "a\\b",
            "a b",
            "ä",
            &"a".repeat(600),
        ] {
            assert!(
                matches!(check_key(bad), Err(StorageError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput),
                "{bad}"
            );
        }
        assert!(check_dir("").is_ok());
        assert!(check_dir("/").is_err());
        assert_eq!(join("", "a"), "a");
        assert_eq!(join("d", "a"), "d/a");
    }
}
