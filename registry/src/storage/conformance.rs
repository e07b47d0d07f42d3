//! The behaviour every [`Store`] backend must show. A new backend adds one test that calls
//! [`check`] on a fresh, empty instance.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use outpost_core::{Algorithm, Digest, RepositoryName, Tag};

use super::hash::digest_of;
use super::{ByteStream, Descriptor, NewManifest, RangeRequest, StorageError, Store};

fn stream_of(parts: Vec<&'static [u8]>) -> ByteStream {
    Box::pin(futures_util::stream::iter(
        parts.into_iter().map(|p| Ok(Bytes::from_static(p))),
    ))
}

fn failing_stream(first: &'static [u8]) -> ByteStream {
    Box::pin(futures_util::stream::iter(vec![
        Ok(Bytes::from_static(first)),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "client went away",
        )),
    ]))
}

async fn read_all(store: &dyn Store, d: &Digest, range: Option<RangeRequest>) -> Vec<u8> {
    let (mut r, _) = store.blob_open(d, range).await.unwrap();
    let mut out = Vec::new();
    while let Some(c) = r.body.next().await {
        out.extend_from_slice(&c.unwrap());
    }
    out
}

fn repo(s: &str) -> RepositoryName {
    s.parse().unwrap()
}

fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

pub async fn check(store: &dyn Store) {
    blobs(store).await;
    uploads(store).await;
    manifests(store).await;
    references(store).await;
    paging(store).await;
    maintenance(store).await;
    documents(store).await;
    conditional_documents(store).await;
}

async fn blobs(store: &dyn Store) {
    let data: &'static [u8] = b"hello, outpost";
    let d = digest_of(Algorithm::Sha256, data);
    assert_eq!(store.blob_size(&d).await.unwrap(), None);

    // A wrong digest or length never becomes visible.
    let wrong = digest_of(Algorithm::Sha256, b"other");
    assert!(matches!(
        store.blob_put(&wrong, stream_of(vec![data]), None).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert!(matches!(
        store.blob_put(&d, stream_of(vec![data]), Some(3)).await,
        Err(StorageError::SizeMismatch { .. })
    ));
    assert!(matches!(
        store.blob_put(&d, failing_stream(b"hello"), None).await,
        Err(StorageError::Body(_))
    ));
    assert_eq!(store.blob_size(&d).await.unwrap(), None);

    assert_eq!(
        store
            .blob_put(&d, stream_of(vec![&data[..5], &data[5..]]), Some(14))
            .await
            .unwrap(),
        14
    );
    assert_eq!(store.blob_size(&d).await.unwrap(), Some(14));
    assert_eq!(read_all(store, &d, None).await, data);
    assert_eq!(
        read_all(
            store,
            &d,
            Some(RangeRequest::From {
                first: 7,
                last: None
            })
        )
        .await,
        b"outpost"
    );
    assert_eq!(
        read_all(store, &d, Some(RangeRequest::Suffix(4))).await,
        b"post"
    );
    assert!(matches!(
        store
            .blob_open(
                &d,
                Some(RangeRequest::From {
                    first: 14,
                    last: None
                })
            )
            .await,
        Err(StorageError::RangeNotSatisfiable { size: 14 })
    ));
    // Writing the same content again is harmless.
    store
        .blob_put(&d, stream_of(vec![data]), None)
        .await
        .unwrap();

    // sha512 content is addressed separately.
    let d512 = digest_of(Algorithm::Sha512, data);
    store
        .blob_put(&d512, stream_of(vec![data]), None)
        .await
        .unwrap();
    assert_eq!(read_all(store, &d512, None).await, data);

    // The empty blob.
    let empty = digest_of(Algorithm::Sha256, b"");
    store
        .blob_put(&empty, stream_of(vec![]), Some(0))
        .await
        .unwrap();
    assert_eq!(store.blob_size(&empty).await.unwrap(), Some(0));
    assert!(read_all(store, &empty, None).await.is_empty());

    // Repository links.
    let r = repo("conf/blobs");
    assert!(!store.repo_blob_linked(&r, &d).await.unwrap());
    store.repo_blob_link(&r, &d).await.unwrap();
    assert!(store.repo_blob_linked(&r, &d).await.unwrap());
    assert!(
        !store
            .repo_blob_linked(&repo("conf/other"), &d)
            .await
            .unwrap()
    );
    assert_eq!(store.repo_blob_links(&r).await.unwrap(), vec![d.clone()]);
    assert!(matches!(
        store.repo_blob_link(&r, &wrong).await,
        Err(StorageError::BlobUnknown(_))
    ));
    assert!(store.repo_blob_unlink(&r, &d).await.unwrap());
    assert!(!store.repo_blob_unlink(&r, &d).await.unwrap());
    assert!(store.blob_verify(&d).await.unwrap());
}

async fn uploads(store: &dyn Store) {
    let r = repo("conf/uploads");
    let id = store.upload_start(&r).await.unwrap();
    assert_eq!(store.upload_status(&r, &id).await.unwrap().offset, 0);
    // A session belongs to its repository.
    assert!(matches!(
        store.upload_status(&repo("conf/elsewhere"), &id).await,
        Err(StorageError::UploadUnknown)
    ));
    assert!(matches!(
        store.upload_status(&r, "../../etc").await,
        Err(StorageError::UploadUnknown)
    ));
    let st = store
        .upload_append(&r, &id, Some(0), stream_of(vec![b"chunk-one "]))
        .await
        .unwrap();
    assert_eq!(st.offset, 10);
    // What a session holds can be read while it is open.
    let mut tail = Vec::new();
    let mut body = store.upload_read(&r, &id, 6).await.unwrap();
    while let Some(b) = body.next().await {
        tail.extend_from_slice(&b.unwrap());
    }
    assert_eq!(tail, b"one ");
    assert!(matches!(
        store.upload_read(&repo("conf/elsewhere"), &id, 0).await,
        Err(StorageError::UploadUnknown)
    ));
    // Out of order.
    assert!(matches!(
        store
            .upload_append(&r, &id, Some(5), stream_of(vec![b"x"]))
            .await,
        Err(StorageError::RangeMismatch {
            requested: 5,
            offset: 10
        })
    ));
    // A chunk cut short keeps what arrived, so the client can resume from there.
    assert!(matches!(
        store
            .upload_append(&r, &id, None, failing_stream(b"chu"))
            .await,
        Err(StorageError::Body(_))
    ));
    assert_eq!(store.upload_status(&r, &id).await.unwrap().offset, 13);
    store
        .upload_append(&r, &id, Some(13), stream_of(vec![b"nk-two"]))
        .await
        .unwrap();
    let whole = b"chunk-one chunk-two";
    let d = digest_of(Algorithm::Sha256, whole);
    let wrong = digest_of(Algorithm::Sha256, b"nope");
    assert!(matches!(
        store.upload_finish(&r, &id, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    // Still there after a mismatch; the right digest completes it.
    assert_eq!(store.upload_finish(&r, &id, &d).await.unwrap(), 19);
    assert!(store.repo_blob_linked(&r, &d).await.unwrap());
    assert!(matches!(
        store.upload_status(&r, &id).await,
        Err(StorageError::UploadUnknown)
    ));
    assert_eq!(read_all(store, &d, None).await, whole);

    // sha512 digests on finish, and cancel.
    let id = store.upload_start(&r).await.unwrap();
    store
        .upload_append(&r, &id, None, stream_of(vec![b"abc"]))
        .await
        .unwrap();
    let d512 = digest_of(Algorithm::Sha512, b"abc");
    store.upload_finish(&r, &id, &d512).await.unwrap();
    let id = store.upload_start(&r).await.unwrap();
    store.upload_cancel(&r, &id).await.unwrap();
    assert!(matches!(
        store.upload_cancel(&r, &id).await,
        Err(StorageError::UploadUnknown)
    ));

    // Expiry removes idle sessions only.
    let idle = store.upload_start(&r).await.unwrap();
    assert_eq!(
        store
            .upload_expire(Duration::from_secs(3600))
            .await
            .unwrap(),
        0
    );
    assert_eq!(store.upload_expire(Duration::ZERO).await.unwrap(), 1);
    assert!(store.upload_status(&r, &idle).await.is_err());
}

async fn put_blob(store: &dyn Store, r: &RepositoryName, data: &'static [u8]) -> Digest {
    let d = digest_of(Algorithm::Sha256, data);
    store
        .blob_put(&d, stream_of(vec![data]), None)
        .await
        .unwrap();
    store.repo_blob_link(r, &d).await.unwrap();
    d
}

async fn manifests(store: &dyn Store) {
    let r = repo("conf/manifests");
    let config = put_blob(store, &r, b"{}").await;
    let layer = put_blob(store, &r, b"layer").await;
    let content = Bytes::from_static(b"{\"schemaVersion\":2,\"pretend\":\"manifest\"}");
    let d = digest_of(Algorithm::Sha256, &content);
    let missing = digest_of(Algorithm::Sha256, b"missing");
    let t = tag("v1");
    // A manifest is refused while any blob it needs is missing, and nothing is linked.
    let with_missing = [config.clone(), missing];
    assert!(matches!(
        store
            .manifest_put(&r, image(&d, &content, &with_missing, Some(&t), None))
            .await,
        Err(StorageError::ReferencedBlobUnknown(_))
    ));
    assert!(matches!(
        store.manifest_by_tag(&r, &t).await,
        Err(StorageError::ManifestUnknown)
    ));
    let ok = [config.clone(), layer.clone()];
    store
        .manifest_put(&r, image(&d, &content, &ok, Some(&t), None))
        .await
        .unwrap();
    let by_tag = store.manifest_by_tag(&r, &t).await.unwrap();
    assert_eq!(by_tag.digest, d);
    assert_eq!(by_tag.content, content);
    assert_eq!(
        by_tag.media_type,
        "application/vnd.oci.image.manifest.v1+json"
    );
    assert_eq!(
        store.manifest_by_digest(&r, &d).await.unwrap().content,
        content
    );
    assert_eq!(store.tags(&r).await.unwrap(), vec!["v1".to_owned()]);
    assert_eq!(store.manifest_list(&r).await.unwrap(), vec![d.clone()]);
    // Just pushed: young (gc's grace period for untagged manifests counts from here).
    let ages = store.manifest_ages(&r).await.unwrap();
    assert_eq!(ages.len(), 1);
    assert_eq!(ages[0].0, d);
    assert!(ages[0].1 < Duration::from_secs(60), "{:?}", ages[0].1);
    assert!(matches!(
        store.tags(&repo("conf/nothing")).await,
        Err(StorageError::RepositoryUnknown)
    ));
    assert!(store.repositories().await.unwrap().contains(&r));

    // An index needs its children in the repository.
    let idx_content = Bytes::from_static(b"{\"schemaVersion\":2,\"pretend\":\"index\"}");
    let idx = digest_of(Algorithm::Sha256, &idx_content);
    let children_missing = [missing_child()];
    let put_index = |children: &[Digest]| {
        let children = children.to_vec();
        let idx = idx.clone();
        let idx_content = idx_content.clone();
        let r = r.clone();
        async move {
            store
                .manifest_put(
                    &r,
                    NewManifest {
                        digest: &idx,
                        media_type: "application/vnd.oci.image.index.v1+json",
                        content: idx_content,
                        blobs: &[],
                        manifests: &children,
                        names: &children,
                        tag: None,
                        subject: None,
                    },
                )
                .await
        }
    };
    assert!(matches!(
        put_index(&children_missing).await,
        Err(StorageError::ReferencedManifestUnknown(_))
    ));
    put_index(std::slice::from_ref(&d)).await.unwrap();

    // Referrers.
    let sig_content = Bytes::from_static(b"{\"schemaVersion\":2,\"pretend\":\"signature\"}");
    let sig = digest_of(Algorithm::Sha256, &sig_content);
    let desc = Descriptor {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: sig.clone(),
        size: sig_content.len() as u64,
        artifact_type: Some("application/vnd.example.sig".into()),
        annotations: None,
    };
    store
        .manifest_put(
            &r,
            image(&sig, &sig_content, &ok, None, Some((&d, desc.clone()))),
        )
        .await
        .unwrap();
    assert_eq!(store.referrers(&r, &d).await.unwrap(), vec![desc]);
    assert!(store.referrers(&r, &idx).await.unwrap().is_empty());

    // Deletes: a tag alone, then a manifest with its tags and referrer entry.
    let v2 = tag("v2");
    store
        .manifest_put(&r, image(&d, &content, &ok, Some(&v2), None))
        .await
        .unwrap();
    store.tag_delete(&r, &tag("v2")).await.unwrap();
    assert!(matches!(
        store.tag_delete(&r, &tag("v2")).await,
        Err(StorageError::ManifestUnknown)
    ));
    assert!(store.manifest_by_digest(&r, &d).await.is_ok());
    store.manifest_delete(&r, &sig).await.unwrap();
    assert!(store.referrers(&r, &d).await.unwrap().is_empty());
    // The tags that went with it are named (v2 was deleted before).
    assert_eq!(store.manifest_delete(&r, &d).await.unwrap(), ["v1"]);
    assert!(store.tags(&r).await.unwrap().is_empty());
    assert!(matches!(
        store.manifest_by_digest(&r, &d).await,
        Err(StorageError::ManifestUnknown)
    ));
    assert!(matches!(
        store.manifest_delete(&r, &d).await,
        Err(StorageError::ManifestUnknown)
    ));
}

/// The reference index: who names a blob or a child, kept by puts and deletes, per
/// repository and across them; a manifest from before the index is recorded on request.
async fn references(store: &dyn Store) {
    let (a, b) = (repo("conf/refs/a"), repo("conf/refs/b"));
    let shared = put_blob(store, &a, b"shared layer").await;
    store.repo_blob_link(&b, &shared).await.unwrap();
    let own = put_blob(store, &a, b"a's own layer").await;
    // Never stored: an index under a platform filter names children the site does not hold.
    let absent = digest_of(Algorithm::Sha256, b"absent child");
    for d in [&shared, &own, &absent] {
        assert!(!store.referenced(d, None).await.unwrap());
    }

    let one = Bytes::from_static(b"{\"schemaVersion\":2,\"refs\":1}");
    let one_d = digest_of(Algorithm::Sha256, &one);
    let both = [shared.clone(), own.clone()];
    store
        .manifest_put(&a, image(&one_d, &one, &both, None, None))
        .await
        .unwrap();
    let two = Bytes::from_static(b"{\"schemaVersion\":2,\"refs\":2}");
    let two_d = digest_of(Algorithm::Sha256, &two);
    let only_shared = [shared.clone()];
    store
        .manifest_put(&b, image(&two_d, &two, &only_shared, None, None))
        .await
        .unwrap();
    assert!(store.referenced(&shared, None).await.unwrap());
    assert!(store.referenced(&shared, Some(&a)).await.unwrap());
    assert!(store.referenced(&shared, Some(&b)).await.unwrap());
    assert!(store.referenced(&own, Some(&a)).await.unwrap());
    assert!(!store.referenced(&own, Some(&b)).await.unwrap());
    // Another repository whose name `a`'s extends is not `a`.
    assert!(
        !store
            .referenced(&own, Some(&repo("conf/refs")))
            .await
            .unwrap()
    );

    // An index names its children, stored or not; pushing it again adds nothing.
    let idx = Bytes::from_static(b"{\"schemaVersion\":2,\"refs\":\"index\"}");
    let idx_d = digest_of(Algorithm::Sha256, &idx);
    let required = [one_d.clone()];
    let names = [one_d.clone(), absent.clone()];
    for _ in 0..2 {
        store
            .manifest_put(
                &a,
                NewManifest {
                    digest: &idx_d,
                    media_type: "application/vnd.oci.image.index.v1+json",
                    content: idx.clone(),
                    blobs: &[],
                    manifests: &required,
                    names: &names,
                    tag: Some(&tag("multi")),
                    subject: None,
                },
            )
            .await
            .unwrap();
    }
    assert!(store.referenced(&one_d, Some(&a)).await.unwrap());
    assert!(store.referenced(&absent, Some(&a)).await.unwrap());
    assert!(!store.referenced(&one_d, Some(&b)).await.unwrap());

    // Deletes count down: a blob stays named while any manifest names it.
    store.manifest_delete(&a, &idx_d).await.unwrap();
    assert!(!store.referenced(&one_d, None).await.unwrap());
    assert!(!store.referenced(&absent, None).await.unwrap());
    store.manifest_delete(&a, &one_d).await.unwrap();
    assert!(!store.referenced(&own, None).await.unwrap());
    assert!(!store.referenced(&shared, Some(&a)).await.unwrap());
    assert!(store.referenced(&shared, None).await.unwrap());
    store.manifest_delete(&b, &two_d).await.unwrap();
    assert!(!store.referenced(&shared, None).await.unwrap());

    // Recording on request: only a manifest that is there, and a delete undoes it.
    assert!(
        !store
            .references_record(&b, &two_d, &only_shared)
            .await
            .unwrap()
    );
    assert!(!store.referenced(&shared, None).await.unwrap());
    store
        .manifest_put(&b, image(&two_d, &two, &only_shared, None, None))
        .await
        .unwrap();
    assert!(
        store
            .references_record(&b, &two_d, &only_shared)
            .await
            .unwrap()
    );
    assert!(store.referenced(&shared, Some(&b)).await.unwrap());
    store.manifest_delete(&b, &two_d).await.unwrap();
    assert!(!store.referenced(&shared, None).await.unwrap());
}

/// Every page of `size` from the start, each asked after the last name of the one before.
async fn all_pages<F, Fut>(size: usize, mut page: F) -> Vec<String>
where
    F: FnMut(Option<String>) -> Fut,
    Fut: std::future::Future<Output = Vec<String>>,
{
    let mut got: Vec<String> = Vec::new();
    // Bounded: the store holds far fewer than this many names.
    for _ in 0..1000 {
        let p = page(got.last().cloned()).await;
        assert!(p.len() <= size, "a page of {size} held {}", p.len());
        if p.is_empty() {
            return got;
        }
        got.extend(p);
    }
    panic!("paging did not end");
}

/// Paged repositories and tags: the lexical order of full names, which is not the order of a
/// walk of the nested folders (`a-b` and `a.b` sort between `a` and `a/b`).
async fn paging(store: &dyn Store) {
    let nested = [
        "page/ab",
        "page/a/b/c",
        "page/a",
        "page/a-b",
        "page/a/b",
        "page/a.b",
        "page/a_b",
        "page/a0",
        "page/b/a",
        "page/a-b/c",
    ];
    for n in nested {
        put_blob(store, &repo(n), b"paging").await;
    }
    let page_of = |after: Option<String>, size: usize| async move {
        store
            .repositories_page(after.as_deref(), size)
            .await
            .unwrap()
            .iter()
            .map(|r| r.as_str().to_owned())
            .collect::<Vec<String>>()
    };
    // One page of everything: sorted, every repository in it. A repository whose content
    // was all deleted may stay in it (its folder on disk, its index entry on object storage).
    let all = page_of(None, usize::MAX).await;
    let mut sorted = all.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(all, sorted, "sorted, each name once");
    for r in store.repositories().await.unwrap() {
        assert!(all.iter().any(|a| a == r.as_str()), "{r} listed");
    }
    for n in nested {
        assert!(all.iter().any(|a| a == n), "{n} listed");
    }
    for size in [1, 2, 3, 7, 1000] {
        assert_eq!(
            all_pages(size, |after| page_of(after, size)).await,
            all,
            "pages of {size}"
        );
    }
    let expect = |after: &str, n: usize| -> Vec<String> {
        all.iter()
            .filter(|a| a.as_str() > after)
            .take(n)
            .cloned()
            .collect()
    };
    // `last` need not be a repository, nor even a valid name.
    for after in [
        "page/a",
        "page/a-",
        "page/a/",
        "page/a/b/c/d",
        "page/a.",
        "Z",
        "page/a~",
        "",
    ] {
        assert_eq!(
            page_of(Some(after.to_owned()), 3).await,
            expect(after, 3),
            "after {after:?}"
        );
    }
    assert_eq!(
        page_of(Some("page/a".to_owned()), 4).await,
        ["page/a-b", "page/a-b/c", "page/a.b", "page/a/b"]
    );
    assert!(page_of(None, 0).await.is_empty());

    // Tags: flat names, sorted as bytes (upper case before lower, `-` and `.` before digits).
    let r = repo("page/tags");
    let config = put_blob(store, &r, b"{}").await;
    let content = Bytes::from_static(b"{\"schemaVersion\":2,\"pretend\":\"paged\"}");
    let d = digest_of(Algorithm::Sha256, &content);
    let names = [
        "v1", "v1-rc", "v1.0", "v10", "V2", "a_b", "_x", "latest", "v1.0.1",
    ];
    for t in names {
        let t = tag(t);
        store
            .manifest_put(
                &r,
                image(&d, &content, std::slice::from_ref(&config), Some(&t), None),
            )
            .await
            .unwrap();
    }
    let mut sorted: Vec<String> = names.iter().map(|t| t.to_string()).collect();
    sorted.sort_unstable();
    assert_eq!(store.tags(&r).await.unwrap(), sorted);
    for size in [1, 2, 4, 100] {
        let got = all_pages(size, |after| {
            let r = r.clone();
            async move { store.tags_page(&r, after.as_deref(), size).await.unwrap() }
        })
        .await;
        assert_eq!(got, sorted, "tag pages of {size}");
    }
    // `last` need not be a tag (only `v1.` is one).
    for after in ["v1.", "v1/x", "~", "v1-rc~"] {
        let want: Vec<String> = sorted
            .iter()
            .filter(|t| t.as_str() > after)
            .take(2)
            .cloned()
            .collect();
        assert_eq!(
            store.tags_page(&r, Some(after), 2).await.unwrap(),
            want,
            "tags after {after:?}"
        );
    }
    assert!(matches!(
        store.tags_page(&repo("page/none"), None, 10).await,
        Err(StorageError::RepositoryUnknown)
    ));
    assert!(matches!(
        store.tags_page(&repo("page/none"), Some("v1"), 10).await,
        Err(StorageError::RepositoryUnknown)
    ));
    // A repository with blobs but no tags is known, with an empty page.
    assert!(
        store
            .tags_page(&repo("page/a"), None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

fn image<'a>(
    digest: &'a Digest,
    content: &Bytes,
    blobs: &'a [Digest],
    tag: Option<&'a Tag>,
    subject: Option<(&'a Digest, Descriptor)>,
) -> NewManifest<'a> {
    NewManifest {
        digest,
        media_type: "application/vnd.oci.image.manifest.v1+json",
        content: content.clone(),
        blobs,
        manifests: &[],
        names: blobs,
        tag,
        subject,
    }
}

fn missing_child() -> Digest {
    digest_of(Algorithm::Sha256, b"no such child")
}

async fn maintenance(store: &dyn Store) {
    let listed = store.blob_list().await.unwrap();
    assert!(!listed.is_empty());
    let victim = put_blob(store, &repo("conf/gc"), b"unreferenced").await;
    // Too young for a one-hour grace period, old enough for none.
    assert!(
        !store
            .blob_remove(&victim, Duration::from_secs(3600))
            .await
            .unwrap()
    );
    assert!(store.blob_remove(&victim, Duration::ZERO).await.unwrap());
    assert_eq!(store.blob_size(&victim).await.unwrap(), None);
    let guard = store.maintenance_lock().await.unwrap();
    guard.check().unwrap();
    guard.release().await.unwrap();
    // Dropping a guard releases it too.
    drop(store.maintenance_lock().await.unwrap());
    tokio::time::timeout(BOUND, store.maintenance_lock())
        .await
        .expect("a dropped guard releases the lock")
        .unwrap()
        .release()
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let store = super::fs::FsStore::open(dir.path()).unwrap();
    check(&store).await;
    let other = super::fs::FsStore::open(dir.path()).unwrap();
    check_two_handles(Arc::new(store), Arc::new(other)).await;
}

/// How long a step that must wait for the other handle is watched before it counts as
/// waiting, and how long it may take once it can go on.
const WAITING: Duration = Duration::from_millis(700);
const BOUND: Duration = Duration::from_secs(20);

/// The maintenance lock across two handles on the same store, as two processes see it: `a`
/// and `b` are opened separately on the same directory, container or bucket.
pub async fn check_two_handles(a: Arc<dyn Store>, b: Arc<dyn Store>) {
    // (a) While `a` holds the lock exclusively, `b` cannot take it; it gets it after release.
    let held = a.maintenance_lock().await.unwrap();
    held.check().unwrap();
    let b2 = b.clone();
    let mut second = tokio::spawn(async move { b2.maintenance_lock().await });
    assert!(
        tokio::time::timeout(WAITING, &mut second).await.is_err(),
        "a second handle took the maintenance lock while the first held it"
    );
    held.release().await.unwrap();
    let got = tokio::time::timeout(BOUND, second)
        .await
        .expect("the lock is free after release")
        .unwrap()
        .unwrap();
    got.check().unwrap();
    got.release().await.unwrap();

    // (c) While `a` holds it, a manifest push on `b` waits, and completes after release.
    let r = repo("conf/lock");
    let layer = put_blob(b.as_ref(), &r, b"layer under the lock").await;
    let content = Bytes::from_static(br#"{"schemaVersion":2,"lock":true}"#);
    let digest = digest_of(Algorithm::Sha256, &content);
    let held = a.maintenance_lock().await.unwrap();
    let (b2, r2, d2, c2, l2) = (b.clone(), r.clone(), digest.clone(), content.clone(), layer);
    let mut push = tokio::spawn(async move {
        let blobs = [l2];
        let t = tag("locked");
        b2.manifest_put(&r2, image(&d2, &c2, &blobs, Some(&t), None))
            .await
    });
    assert!(
        tokio::time::timeout(WAITING, &mut push).await.is_err(),
        "a manifest push went on while another handle held the maintenance lock"
    );
    assert!(matches!(
        a.manifest_by_digest(&r, &digest).await,
        Err(StorageError::ManifestUnknown)
    ));
    held.release().await.unwrap();
    tokio::time::timeout(BOUND, push)
        .await
        .expect("the push goes on after release")
        .unwrap()
        .unwrap();
    let got = a.manifest_by_tag(&r, &tag("locked")).await.unwrap();
    assert_eq!((got.digest, got.content), (digest, content));
}

/// Conditional writes (the leader lease): of two writers that read the same version, one wins.
async fn conditional_documents(store: &dyn Store) {
    let key = "cas/lease.json";
    assert_eq!(store.doc_get_versioned(key).await.unwrap(), None);
    let v1 = store
        .doc_put_if(key, Bytes::from_static(b"one"), None)
        .await
        .unwrap()
        .expect("created when absent");
    // A second create loses.
    assert_eq!(
        store
            .doc_put_if(key, Bytes::from_static(b"other"), None)
            .await
            .unwrap(),
        None
    );
    let (data, read) = store.doc_get_versioned(key).await.unwrap().unwrap();
    assert_eq!((&data[..], &read), (&b"one"[..], &v1));
    // Two writers from the same read: the first wins, the second is refused.
    let v2 = store
        .doc_put_if(key, Bytes::from_static(b"two"), Some(&read))
        .await
        .unwrap()
        .expect("update from the current version");
    assert_ne!(v2, v1);
    assert_eq!(
        store
            .doc_put_if(key, Bytes::from_static(b"late"), Some(&read))
            .await
            .unwrap(),
        None
    );
    let (data, now) = store.doc_get_versioned(key).await.unwrap().unwrap();
    assert_eq!((&data[..], now), (&b"two"[..], v2.clone()));
    // A plain write moves the version too.
    store
        .doc_put(key, Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(
        store
            .doc_put_if(key, Bytes::from_static(b"stale"), Some(&v2))
            .await
            .unwrap(),
        None
    );
    store.doc_delete(key).await.unwrap();
    assert!(invalid_key(store.doc_get_versioned("../x").await));
}

fn invalid_key(r: Result<impl std::fmt::Debug, StorageError>) -> bool {
    matches!(r, Err(StorageError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidInput)
}

async fn documents(store: &dyn Store) {
    assert_eq!(store.doc_get("state.json").await.unwrap(), None);
    assert!(store.doc_list("").await.unwrap().is_empty());
    assert!(store.doc_list("outbox").await.unwrap().is_empty());

    // Whole replacement, empty and larger documents.
    store
        .doc_put("state.json", Bytes::from_static(b"{\"a\":1}"))
        .await
        .unwrap();
    store
        .doc_put("state.json", Bytes::from_static(b"{\"a\":2}"))
        .await
        .unwrap();
    assert_eq!(
        store.doc_get("state.json").await.unwrap().unwrap(),
        Bytes::from_static(b"{\"a\":2}")
    );
    store.doc_put("empty", Bytes::new()).await.unwrap();
    assert_eq!(store.doc_get("empty").await.unwrap().unwrap().len(), 0);
    let big: Bytes = (0..1_500_000u32).map(|i| (i % 253) as u8).collect();
    store.doc_put("big.bin", big.clone()).await.unwrap();
    assert_eq!(store.doc_get("big.bin").await.unwrap().unwrap(), big);

    // Listing: one folder, sorted by name, without its sub-folders.
    for k in [
        "outbox/00000000000000000002.json",
        "outbox/00000000000000000010.json",
        "outbox/00000000000000000001.json",
        "outbox/failed/00000000000000000003.json",
    ] {
        store.doc_put(k, Bytes::from_static(b"{}")).await.unwrap();
    }
    assert_eq!(
        store.doc_list("outbox").await.unwrap(),
        vec![
            "outbox/00000000000000000001.json",
            "outbox/00000000000000000002.json",
            "outbox/00000000000000000010.json",
        ]
    );
    assert_eq!(
        store.doc_list("outbox/failed").await.unwrap(),
        vec!["outbox/failed/00000000000000000003.json"]
    );
    assert_eq!(
        store.doc_list("").await.unwrap(),
        vec!["big.bin", "empty", "state.json"]
    );
    assert!(store.doc_list("outbox/none").await.unwrap().is_empty());

    // Removal; removing again is no error.
    store
        .doc_delete("outbox/00000000000000000002.json")
        .await
        .unwrap();
    store
        .doc_delete("outbox/00000000000000000002.json")
        .await
        .unwrap();
    assert_eq!(
        store
            .doc_get("outbox/00000000000000000002.json")
            .await
            .unwrap(),
        None
    );
    assert_eq!(store.doc_list("outbox").await.unwrap().len(), 2);

    // Keys never leave the documents' folder.
    for bad in ["../blobs/x", "/etc/passwd", "a/../../b", "a//b", ".x", ""] {
        assert!(invalid_key(store.doc_get(bad).await), "{bad}");
        assert!(invalid_key(store.doc_put(bad, Bytes::new()).await), "{bad}");
        assert!(invalid_key(store.doc_delete(bad).await), "{bad}");
    }
    assert!(invalid_key(store.doc_list("../repositories").await));

    // Documents named like content are not content.
    let blobs_before = store.blob_list().await.unwrap().len();
    let repos_before = store.repositories().await.unwrap();
    let hex = "ab".repeat(32);
    store
        .doc_put(&format!("blobs/sha256/ab/{hex}"), Bytes::from_static(b"x"))
        .await
        .unwrap();
    store
        .doc_put(
            &format!("repositories/doc/_layers/sha256/{hex}"),
            Bytes::new(),
        )
        .await
        .unwrap();
    store
        .doc_put("uploads/x/state.json", Bytes::from_static(b"{}"))
        .await
        .unwrap();
    assert_eq!(store.blob_list().await.unwrap().len(), blobs_before);
    assert_eq!(store.repositories().await.unwrap(), repos_before);
    store.upload_expire(Duration::ZERO).await.unwrap();
    assert!(
        store
            .doc_get("uploads/x/state.json")
            .await
            .unwrap()
            .is_some()
    );
}
