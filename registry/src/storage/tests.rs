use super::*;

#[test]
fn range_headers() {
    let p = RangeRequest::parse;
    assert_eq!(
        p("bytes=0-9"),
        Some(RangeRequest::From {
            first: 0,
            last: Some(9)
        })
    );
    assert_eq!(
        p("bytes=5-"),
        Some(RangeRequest::From {
            first: 5,
            last: None
        })
    );
    assert_eq!(p("bytes=-3"), Some(RangeRequest::Suffix(3)));
    assert_eq!(p("bytes=9-5"), None);
    assert_eq!(p("bytes=0-1,4-5"), None);
    assert_eq!(p("items=0-1"), None);
    assert_eq!(p("bytes=a-b"), None);
    assert_eq!(p("bytes=-"), None);
}

#[test]
fn ranges_resolve_against_size() {
    let r = |first, last| Some(ByteRange { first, last });
    assert_eq!(
        RangeRequest::From {
            first: 0,
            last: Some(99)
        }
        .resolve(10),
        r(0, 9)
    );
    assert_eq!(
        RangeRequest::From {
            first: 10,
            last: None
        }
        .resolve(10),
        None
    );
    assert_eq!(RangeRequest::Suffix(3).resolve(10), r(7, 9));
    assert_eq!(RangeRequest::Suffix(30).resolve(10), r(0, 9));
    assert_eq!(RangeRequest::Suffix(0).resolve(10), None);
    assert_eq!(
        RangeRequest::From {
            first: 0,
            last: None
        }
        .resolve(0),
        None
    );
}

/// Documents stay where these files lived before they went through the store (`sync/` under
/// the root), so a store written by an older version keeps its state; a write's temp file is
/// never listed.
#[tokio::test]
async fn fs_documents_keep_the_old_layout() {
    use super::Store;
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sync/staging")).unwrap();
    std::fs::write(dir.path().join("sync/state.json"), b"old state").unwrap();
    std::fs::write(dir.path().join("sync/staging/stg-01.json"), b"{}").unwrap();
    std::fs::write(dir.path().join("sync/staging/.stg-02.json.1.ab.tmp"), b"{").unwrap();
    let store = super::fs::FsStore::open(dir.path()).unwrap();
    assert_eq!(
        store.doc_get("state.json").await.unwrap().unwrap(),
        bytes::Bytes::from_static(b"old state")
    );
    assert_eq!(
        store.doc_list("staging").await.unwrap(),
        vec!["staging/stg-01.json"]
    );
    store
        .doc_put("outbox/1.json", bytes::Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert!(dir.path().join("sync/outbox/1.json").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("sync/outbox/1.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "documents are private to the registry");
}
