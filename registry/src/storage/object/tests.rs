//! The object-storage backend against real peers: Azurite (Microsoft's Azure Blob emulator,
//! from npm) and moto's S3 server (from PyPI), each started on loopback for the test and
//! stopped by PID. tests/run.sh installs both under `$OUTPOST_EMULATORS` (default
//! `~/.cache/outpost-emulators`); a missing emulator fails the test, it is never skipped.

use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_lc_rs::hmac;
use base64::Engine;
use bytes::Bytes;
use futures_util::StreamExt;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::{ObjectStore, ObjectStoreExt};
use outpost_core::{Algorithm, RepositoryName};

use super::{BucketStore, LockTiming};
use crate::storage::hash::digest_of;
use crate::storage::{ByteStream, StorageError, Store, conformance};

/// Azurite's well-known development account (public, documented by Microsoft).
const AZURITE_ACCOUNT: &str = "devstoreaccount1";
const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

fn emulators_dir() -> PathBuf {
    std::env::var_os("OUTPOST_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outpost-emulators")
        })
}

fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind a loopback port");
    l.local_addr().expect("local address").port()
}

/// An emulator process; killed (by its PID) and reaped when dropped, also on a panic.
pub(crate) struct Emulator {
    child: Child,
    pub(crate) port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Emulator {
    fn start(program: PathBuf, args: &[String], port: u16, dir: tempfile::TempDir) -> Self {
        assert!(
            program.exists(),
            "{} is missing: tests/run.sh installs the storage emulators (Azurite from npm, \
             moto[server] from PyPI) under $OUTPOST_EMULATORS (default ~/.cache/outpost-emulators)",
            program.display()
        );
        let log = std::fs::File::create(dir.path().join("emulator.log")).expect("log file");
        let child = Command::new(&program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        let mut em = Emulator {
            child,
            port,
            _dir: dir,
        };
        // Bounded: an emulator that is not listening within a minute fails the test.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return em;
            }
            if let Ok(Some(status)) = em.child.try_wait() {
                let log = std::fs::read_to_string(em._dir.path().join("emulator.log"))
                    .unwrap_or_default();
                panic!("{} exited with {status}: {log}", program.display());
            }
            assert!(
                Instant::now() < deadline,
                "{} is not listening on port {port} after 60 s",
                program.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Azurite's blob service, with one container `outpost`.
    pub(crate) async fn azurite() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let program = emulators_dir().join("azurite/node_modules/.bin/azurite-blob");
        let args = [
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
            "--location",
            &dir.path().display().to_string(),
            "--skipApiVersionCheck",
        ]
        .map(String::from);
        let em = Self::start(program, &args, port, dir);
        em.create_azure_container("outpost").await;
        em
    }

    /// moto's S3 server, with one bucket `outpost`.
    pub(crate) async fn moto() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let program = emulators_dir().join("moto/bin/moto_server");
        let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        let em = Self::start(program, &args, port, dir);
        // moto does not check signatures: a plain PUT creates the bucket.
        let resp = reqwest::Client::new()
            .put(format!("http://127.0.0.1:{}/outpost", em.port))
            .send()
            .await
            .expect("create bucket");
        assert!(
            resp.status().is_success(),
            "create bucket: {}",
            resp.status()
        );
        em
    }

    /// Creates a container through the Blob REST API, signed with the account's shared key.
    async fn create_azure_container(&self, name: &str) {
        let date = jiff::fmt::rfc2822::DateTimePrinter::new()
            .timestamp_to_rfc9110_string(&jiff::Timestamp::now())
            .expect("date");
        let version = "2021-08-06";
        let to_sign = format!(
            "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
             /{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{name}\nrestype:container"
        );
        let key_bytes = base64::engine::general_purpose::STANDARD
            .decode(AZURITE_KEY)
            .expect("key");
        let key = hmac::Key::new(hmac::HMAC_SHA256, &key_bytes);
        let sig = base64::engine::general_purpose::STANDARD
            .encode(hmac::sign(&key, to_sign.as_bytes()).as_ref());
        let resp = reqwest::Client::new()
            .put(format!(
                "http://127.0.0.1:{}/{AZURITE_ACCOUNT}/{name}?restype=container",
                self.port
            ))
            .header("x-ms-date", &date)
            .header("x-ms-version", version)
            .header("content-length", "0")
            .header(
                "authorization",
                format!("SharedKey {AZURITE_ACCOUNT}:{sig}"),
            )
            .send()
            .await
            .expect("create container");
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        assert!(status.is_success(), "create container: {status} {text}");
    }

    pub(crate) fn azure_store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            MicrosoftAzureBuilder::new()
                .with_account(AZURITE_ACCOUNT)
                .with_access_key(AZURITE_KEY)
                .with_container_name("outpost")
                .with_endpoint(format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.port))
                .with_allow_http(true)
                .build()
                .expect("azure client"),
        )
    }

    pub(crate) fn s3_store(&self) -> Arc<dyn ObjectStore> {
        Arc::new(
            AmazonS3Builder::new()
                .with_bucket_name("outpost")
                .with_region("us-east-1")
                .with_endpoint(format!("http://127.0.0.1:{}", self.port))
                .with_allow_http(true)
                .with_access_key_id("test")
                .with_secret_access_key("test")
                .build()
                .expect("s3 client"),
        )
    }
}

/// Short lock timings, so that waiting for a lease costs the tests little.
/// Two handles on the same container or bucket and prefix, sharing nothing in memory.
fn two_handles(
    make: impl Fn() -> Arc<dyn ObjectStore>,
    prefix: &str,
) -> (BucketStore, BucketStore) {
    (
        BucketStore::new(make(), prefix).with_lock_timing(LockTiming::quick()),
        BucketStore::new(make(), prefix).with_lock_timing(LockTiming::quick()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_blob_store_conforms() {
    let em = Emulator::azurite().await;
    let (a, b) = two_handles(|| em.azure_store(), "conformance");
    conformance::check(&a).await;
    conformance::check_two_handles(Arc::new(a), Arc::new(b)).await;
    let (a, b) = two_handles(|| em.azure_store(), "leases");
    leases(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms() {
    let em = Emulator::moto().await;
    let (a, b) = two_handles(|| em.s3_store(), "");
    conformance::check(&a).await;
    conformance::check_two_handles(Arc::new(a), Arc::new(b)).await;
    let (a, b) = two_handles(|| em.s3_store(), "leases");
    leases(a, b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_memory_leases() {
    let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let (a, b) = two_handles(|| mem.clone(), "p");
    conformance::check_two_handles(Arc::new(a.clone()), Arc::new(b.clone())).await;
    leases(a, b).await;
}

/// Writes a lease record directly, as another process would have.
async fn write_lease(store: &BucketStore, holder: &str, expires_in: i64) {
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64;
    let rec = serde_json::json!({"holder": holder, "expires_ms": now + expires_in});
    store
        .put(
            &store.key("locks/maintenance.json"),
            Bytes::from(rec.to_string()),
        )
        .await
        .expect("write lease");
}

async fn lease_present(store: &BucketStore) -> bool {
    store
        .head(&store.key("locks/maintenance.json"))
        .await
        .expect("head")
        .is_some()
}

/// The lease on object storage: expiry, takeover, bounds, loss.
async fn leases(a: BucketStore, b: BucketStore) {
    let bound = Duration::from_secs(20);
    // (b) A lease whose holder crashed (expired a minute ago) is taken over.
    write_lease(&a, "crashed-gc", -60_000).await;
    let g = tokio::time::timeout(bound, b.maintenance_lock())
        .await
        .expect("takes over within the bound")
        .expect("takes over");
    g.check().expect("held");
    let raw = b
        .get_small(&b.key("locks/maintenance.json"), 4096)
        .await
        .expect("read")
        .expect("lease");
    assert!(
        !String::from_utf8_lossy(&raw).contains("crashed-gc"),
        "the lease names the new holder"
    );
    g.release().await.expect("release");
    assert!(!lease_present(&a).await, "released leases are deleted");

    // An expired lease holds no push up either.
    write_lease(&a, "crashed-gc", -60_000).await;
    let r: RepositoryName = "lease/push".parse().expect("name");
    let content = Bytes::from_static(br#"{"schemaVersion":2,"lease":1}"#);
    let d = digest_of(Algorithm::Sha256, &content);
    let m = crate::storage::NewManifest {
        digest: &d,
        media_type: "application/vnd.oci.image.manifest.v1+json",
        content: content.clone(),
        blobs: &[],
        manifests: &[],
        names: &[],
        tag: None,
        subject: None,
    };
    tokio::time::timeout(Duration::from_secs(5), a.manifest_put(&r, m))
        .await
        .expect("not held up by an expired lease")
        .expect("push");

    // A live lease of another process: gc gives up after its bound saying until when; a push
    // answers Unavailable (503) after its own.
    write_lease(&a, "busy-gc", 600_000).await;
    let short = LockTiming {
        acquire_wait: Duration::from_millis(500),
        push_wait: Duration::from_millis(500),
        ..LockTiming::quick()
    };
    let c = BucketStore::new(a.store.clone(), &a.prefix).with_lock_timing(short);
    match tokio::time::timeout(bound, c.maintenance_lock()).await {
        Ok(Err(StorageError::MaintenanceLocked(why))) => assert!(
            why.contains("another gc holds the maintenance lock on this store until"),
            "{why}"
        ),
        Ok(Err(e)) => panic!("unexpected error: {e}"),
        Ok(Ok(_)) => panic!("took a live lease"),
        Err(_) => panic!("gc waited beyond its bound"),
    }
    let content = Bytes::from_static(br#"{"schemaVersion":2,"lease":2}"#);
    let d = digest_of(Algorithm::Sha256, &content);
    let m = crate::storage::NewManifest {
        digest: &d,
        media_type: "application/vnd.oci.image.manifest.v1+json",
        content,
        blobs: &[],
        manifests: &[],
        names: &[],
        tag: None,
        subject: None,
    };
    assert!(matches!(
        tokio::time::timeout(bound, c.manifest_put(&r, m))
            .await
            .expect("the push waited beyond its bound"),
        Err(StorageError::Unavailable(_))
    ));
    assert!(matches!(
        c.manifest_by_digest(&r, &d).await,
        Err(StorageError::ManifestUnknown)
    ));
    a.delete(&a.key("locks/maintenance.json"))
        .await
        .expect("delete");

    // A lease taken over behind the holder's back (as after a stall past its expiry) is
    // noticed at the next renewal: the holder must stop.
    let fast = LockTiming {
        lease: Duration::from_secs(2),
        ..LockTiming::quick()
    };
    let h = BucketStore::new(a.store.clone(), &a.prefix).with_lock_timing(fast);
    let g = h.maintenance_lock().await.expect("lock");
    g.check().expect("held");
    write_lease(&a, "usurper", 600_000).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.check().is_ok() {
        assert!(Instant::now() < deadline, "a lost lease went unnoticed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(g.check(), Err(StorageError::MaintenanceLocked(_))));
    // Released without deleting what is no longer ours.
    g.release().await.expect("release");
    assert!(
        lease_present(&a).await,
        "another holder's lease is left alone"
    );
    a.delete(&a.key("locks/maintenance.json"))
        .await
        .expect("delete");
}

fn stream_of(parts: Vec<Bytes>) -> ByteStream {
    Box::pin(futures_util::stream::iter(parts.into_iter().map(Ok)))
}

async fn collect(mut s: ByteStream) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(c) = s.next().await {
        out.extend_from_slice(&c.expect("read"));
    }
    out
}

/// A session begun by one process goes on in another (a second client over the same
/// container, with nothing shared in memory), across several parts, and its blob appears only
/// when finished.
async fn sessions_continue_elsewhere(a: BucketStore, b: BucketStore) {
    let r: RepositoryName = "cross/process".parse().expect("name");
    let mib = 1024 * 1024;
    let data: Vec<u8> = (0..(13 * mib + 123)).map(|i| (i % 251) as u8).collect();
    let d = digest_of(Algorithm::Sha256, &data);
    let id = a.upload_start(&r).await.expect("start");
    // Small chunks first (merged into one part), then one chunk larger than a part.
    for (i, piece) in data[..3 * mib].chunks(mib).enumerate() {
        let store = if i % 2 == 0 { &a } else { &b };
        store
            .upload_append(
                &r,
                &id,
                None,
                stream_of(vec![Bytes::copy_from_slice(piece)]),
            )
            .await
            .expect("append");
    }
    let st = b
        .upload_append(
            &r,
            &id,
            Some(3 * mib as u64),
            stream_of(
                data[3 * mib..]
                    .chunks(64 * 1024)
                    .map(Bytes::copy_from_slice)
                    .collect(),
            ),
        )
        .await
        .expect("append");
    assert_eq!(st.offset, data.len() as u64);
    assert_eq!(
        a.upload_status(&r, &id).await.expect("status").offset,
        data.len() as u64
    );
    // Readable from any offset, across parts.
    let from = 2 * mib as u64 + 7;
    let tail = collect(a.upload_read(&r, &id, from).await.expect("read")).await;
    assert_eq!(tail, &data[from as usize..]);
    // Nothing is visible before the finish, and a wrong digest leaves nothing either.
    assert_eq!(a.blob_size(&d).await.expect("size"), None);
    let wrong = digest_of(Algorithm::Sha256, b"wrong");
    assert!(matches!(
        b.upload_finish(&r, &id, &wrong).await,
        Err(StorageError::DigestMismatch { .. })
    ));
    assert_eq!(b.blob_size(&wrong).await.expect("size"), None);
    assert_eq!(
        a.upload_finish(&r, &id, &d).await.expect("finish"),
        data.len() as u64
    );
    let (reader, _) = b.blob_open(&d, None).await.expect("open");
    assert_eq!(reader.size, data.len() as u64);
    assert_eq!(collect(reader.body).await, data);
    assert!(b.repo_blob_linked(&r, &d).await.expect("linked"));
    // The session's objects are gone.
    assert_eq!(a.upload_expire(Duration::ZERO).await.expect("expire"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_sessions_continue_in_another_process() {
    let em = Emulator::azurite().await;
    sessions_continue_elsewhere(
        BucketStore::new(em.azure_store(), "x"),
        BucketStore::new(em.azure_store(), "x"),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_sessions_continue_in_another_process() {
    let em = Emulator::moto().await;
    sessions_continue_elsewhere(
        BucketStore::new(em.s3_store(), "x"),
        BucketStore::new(em.s3_store(), "x"),
    )
    .await;
}

fn azurite_options(em: &Emulator, key: &str) -> Vec<String> {
    vec![
        format!("account_name={AZURITE_ACCOUNT}"),
        format!("access_key={key}"),
        format!("endpoint=http://127.0.0.1:{}/{AZURITE_ACCOUNT}", em.port),
        "allow_http=true".to_owned(),
    ]
}

/// `--storage` URLs: a good one opens, and each kind of bad configuration is one clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_urls_open_or_say_why_not() {
    use super::{OpenError, open};
    let em = Emulator::azurite().await;
    let store = open(
        "azblob://outpost/some/prefix",
        &azurite_options(&em, AZURITE_KEY),
    )
    .await
    .expect("open");
    assert_eq!(store.prefix, "some/prefix");
    let err = open(
        "azblob://nosuchcontainer",
        &azurite_options(&em, AZURITE_KEY),
    )
    .await
    .err()
    .expect("missing container");
    assert!(matches!(err, OpenError::Missing { .. }), "{err}");
    // A wrong key (valid base64, not the account's).
    let wrong = base64::engine::general_purpose::STANDARD.encode([7u8; 64]);
    let err = open("azblob://outpost", &azurite_options(&em, &wrong))
        .await
        .err()
        .expect("wrong key");
    assert!(matches!(err, OpenError::Credentials { .. }), "{err}");
    assert!(!err.to_string().contains(&wrong), "{err}");
    let err = open("ftp://x", &[]).await.err().expect("scheme");
    assert!(matches!(err, OpenError::UnknownScheme(_)), "{err}");
    let err = open("azblob://outpost", &["no_such_option=1".to_owned()])
        .await
        .err()
        .expect("option");
    assert!(matches!(err, OpenError::UnknownOption { .. }), "{err}");
    let err = open("azblob://outpost", &["novalue".to_owned()])
        .await
        .err()
        .expect("option");
    assert!(matches!(err, OpenError::BadOption(_)), "{err}");
}

/// Multipart uploads open in moto's bucket (ListMultipartUploads).
async fn open_multipart_uploads(port: u16) -> usize {
    let text = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}/outpost?uploads"))
        .send()
        .await
        .expect("list uploads")
        .text()
        .await
        .expect("list body");
    text.matches("<UploadId>").count()
}

/// Parts moto holds for the multipart uploads open in its bucket (ListParts of each).
async fn uploaded_parts(port: u16) -> usize {
    let c = reqwest::Client::new();
    let text = c
        .get(format!("http://127.0.0.1:{port}/outpost?uploads"))
        .send()
        .await
        .expect("list uploads")
        .text()
        .await
        .expect("list body");
    let field = |block: &str, tag: &str| -> Option<String> {
        let start = block.find(&format!("<{tag}>"))? + tag.len() + 2;
        let end = block[start..].find(&format!("</{tag}>"))? + start;
        Some(block[start..end].to_owned())
    };
    let mut parts = 0;
    for block in text.split("<Upload>").skip(1) {
        let (Some(key), Some(id)) = (field(block, "Key"), field(block, "UploadId")) else {
            continue;
        };
        let listed = c
            .get(format!(
                "http://127.0.0.1:{port}/outpost/{key}?uploadId={id}"
            ))
            .send()
            .await
            .expect("list parts")
            .text()
            .await
            .expect("parts body");
        parts += listed.matches("<PartNumber>").count();
    }
    parts
}

/// A push whose client goes away mid-blob (its future dropped) leaves no multipart upload open.
/// (Once a part is sent, that is: a client gone while the upload's creation is in flight
/// leaves one the writer never heard of, for the bucket's lifecycle rule.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_blob_upload_is_aborted() {
    let em = Emulator::moto().await;
    let store = BucketStore::new(em.s3_store(), "abandoned");
    let d = digest_of(Algorithm::Sha256, b"never completed");
    // More than one part, then a body that never ends.
    let first: Vec<Result<Bytes, std::io::Error>> = (0..10)
        .map(|_| Ok(Bytes::from(vec![1u8; 1024 * 1024])))
        .collect();
    let body: ByteStream =
        Box::pin(futures_util::stream::iter(first).chain(futures_util::stream::pending()));
    let task = tokio::spawn(async move { store.blob_put(&d, body, None).await });
    // Bounded polling: the writer knows its multipart upload once a part of it has arrived
    // (parts are sent only after the creation's answer).
    let deadline = Instant::now() + Duration::from_secs(60);
    while uploaded_parts(em.port).await == 0 {
        assert!(Instant::now() < deadline, "no part was uploaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    task.abort();
    let deadline = Instant::now() + Duration::from_secs(60);
    while open_multipart_uploads(em.port).await > 0 {
        assert!(
            Instant::now() < deadline,
            "the abandoned multipart upload is still open"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An in-memory store that, once armed, pauses a manifest push right after its revision
/// object is written, until the test lets it go on: a push whose writes took long.
#[derive(Debug)]
struct PausingStore {
    inner: object_store::memory::InMemory,
    armed: std::sync::atomic::AtomicBool,
    written: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

impl std::fmt::Display for PausingStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PausingStore")
    }
}

#[async_trait::async_trait]
impl ObjectStore for PausingStore {
    async fn put_opts(
        &self,
        location: &object_store::path::Path,
        payload: object_store::PutPayload,
        opts: object_store::PutOptions,
    ) -> object_store::Result<object_store::PutResult> {
        let r = self.inner.put_opts(location, payload, opts).await;
        if location.as_ref().contains("/_manifests/revisions/")
            && self.armed.swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.written.notify_one();
            // Bounded: a test that never lets go fails on its own timeout.
            let _ = tokio::time::timeout(Duration::from_secs(30), self.go.notified()).await;
        }
        r
    }

    async fn put_multipart_opts(
        &self,
        location: &object_store::path::Path,
        opts: object_store::PutMultipartOptions,
    ) -> object_store::Result<Box<dyn object_store::MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &object_store::path::Path,
        options: object_store::GetOptions,
    ) -> object_store::Result<object_store::GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(
        &self,
        locations: futures_util::stream::BoxStream<
            'static,
            object_store::Result<object_store::path::Path>,
        >,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::path::Path>>
    {
        self.inner.delete_stream(locations)
    }

    fn list(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> futures_util::stream::BoxStream<'static, object_store::Result<object_store::ObjectMeta>>
    {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(
        &self,
        prefix: Option<&object_store::path::Path>,
    ) -> object_store::Result<object_store::ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &object_store::path::Path,
        to: &object_store::path::Path,
        options: object_store::CopyOptions,
    ) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

/// A push whose writes outlast the settle period checks again after them: if a gc (another
/// handle) swept one of its blobs meanwhile, the manifest is withdrawn and the push refused;
/// if nothing was swept, it stands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_push_is_withdrawn_if_gc_swept_its_blob() {
    let mem = Arc::new(PausingStore {
        inner: object_store::memory::InMemory::new(),
        armed: Default::default(),
        written: tokio::sync::Notify::new(),
        go: tokio::sync::Notify::new(),
    });
    let (a, gc) = two_handles(|| mem.clone(), "p");
    let r: RepositoryName = "slow/push".parse().expect("name");
    let mut layers = Vec::new();
    for data in [&b"layer one"[..], b"layer two"] {
        let d = digest_of(Algorithm::Sha256, data);
        a.blob_put(&d, stream_of(vec![Bytes::copy_from_slice(data)]), None)
            .await
            .expect("blob");
        a.repo_blob_link(&r, &d).await.expect("link");
        layers.push(d);
    }
    for (round, sweep) in [(1, true), (2, false)] {
        let content = Bytes::from(format!("{{\"schemaVersion\":2,\"round\":{round}}}"));
        let d = digest_of(Algorithm::Sha256, &content);
        let blobs = vec![layers[round - 1].clone()];
        mem.armed.store(true, std::sync::atomic::Ordering::SeqCst);
        let (a2, r2, d2) = (a.clone(), r.clone(), d.clone());
        let push = tokio::spawn(async move {
            let m = crate::storage::NewManifest {
                digest: &d2,
                media_type: "application/vnd.oci.image.manifest.v1+json",
                content,
                blobs: &blobs,
                manifests: &[],
                names: &[],
                tag: None,
                subject: None,
            };
            a2.manifest_put(&r2, m).await
        });
        tokio::time::timeout(Duration::from_secs(30), mem.written.notified())
            .await
            .expect("the push wrote its revision");
        // A gc that marked before that revision existed: it takes the lease (and settles,
        // longer than the push's settle budget), sweeps the layer, lets go.
        let g = gc.maintenance_lock().await.expect("lock");
        if sweep {
            assert!(
                gc.blob_remove(&layers[round - 1], Duration::ZERO)
                    .await
                    .expect("sweep")
            );
        }
        g.release().await.expect("release");
        mem.go.notify_one();
        let res = tokio::time::timeout(Duration::from_secs(30), push)
            .await
            .expect("the push ends")
            .expect("join");
        if sweep {
            assert!(
                matches!(res, Err(StorageError::ReferencedBlobUnknown(ref b)) if *b == layers[0]),
                "{res:?}"
            );
            assert!(matches!(
                a.manifest_by_digest(&r, &d).await,
                Err(StorageError::ManifestUnknown)
            ));
        } else {
            res.expect("the push stands");
            assert_eq!(
                a.manifest_by_digest(&r, &d).await.expect("stored").digest,
                d
            );
        }
    }
}

fn count_of(store: &BucketStore, op: &str) -> u64 {
    store
        .requests
        .snapshot()
        .into_iter()
        .find(|(o, _)| *o == op)
        .map_or(0, |(_, n)| n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_catalog_index_is_built_once_for_an_older_store_and_pages_read_one_page() {
    let mem: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
    let (a, _) = two_handles(|| mem.clone(), "p");
    let names = ["x/a", "x/a-b", "x/a/b", "y", "x/ab"];
    let d = digest_of(Algorithm::Sha256, b"indexed");
    a.blob_put(
        &d,
        Box::pin(futures_util::stream::iter([Ok(Bytes::from_static(
            b"indexed",
        ))])),
        None,
    )
    .await
    .unwrap();
    for n in names {
        a.repo_blob_link(&n.parse().unwrap(), &d).await.unwrap();
    }
    // As a store written before the index existed: no entries, no completion mark.
    let entries: Vec<_> = mem
        .list(Some(&"p/catalog".into()))
        .map(|m| m.unwrap().location)
        .collect()
        .await;
    assert_eq!(entries.len(), names.len());
    for k in entries.iter().chain([&"p/catalog.json".into()]) {
        mem.delete(k).await.unwrap();
    }
    let b = BucketStore::new(mem.clone(), "p");
    let page = |s: &BucketStore, after: Option<&'static str>, n: usize| {
        let s = s.clone();
        async move {
            s.repositories_page(after, n)
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.as_str().to_owned())
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(page(&b, None, 2).await, ["x/a", "x/a-b"]);
    assert!(mem.head(&"p/catalog.json".into()).await.is_ok());
    // Built: a page is one LIST request, however many repositories there are.
    let lists = count_of(&b, "list");
    assert_eq!(page(&b, Some("x/a-b"), 2).await, ["x/a/b", "x/ab"]);
    assert_eq!(count_of(&b, "list"), lists + 1);
    // A repository another process creates later is in the index at once.
    a.repo_blob_link(&"x/a.b".parse().unwrap(), &d)
        .await
        .unwrap();
    assert_eq!(page(&b, Some("x/a-b"), 2).await, ["x/a.b", "x/a/b"]);
    assert_eq!(
        page(&b, None, 100).await,
        ["x/a", "x/a-b", "x/a.b", "x/a/b", "x/ab", "y"]
    );
    // Writing to a repository already noted costs no further request for the index.
    let puts = count_of(&a, "put");
    a.repo_blob_link(&"x/a.b".parse().unwrap(), &d)
        .await
        .unwrap();
    assert_eq!(count_of(&a, "put"), puts + 1, "the link alone");
}
