//! Object-store emulators for the end-to-end suites: Azurite (Microsoft's Azure Blob emulator,
//! from npm) and moto's S3 server (PyPI), both installed by tests/run.sh under
//! `$OUTPOST_EMULATORS`. Each is started on loopback on a free port and stopped by its PID when
//! the last handle to it is dropped (also when a test panics). Every test gets a fresh
//! container or bucket, so tests sharing one emulator process never see each other's objects.
//!
//! ```no_run
//! let store = outpost_e2e::emulators::azurite();
//! // store.args(): --storage azblob://… --storage-option …; store.env: the credentials.
//! ```

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use base64::Engine;

use crate::{TempDir, free_port, http, run_ok};

/// Azurite's well-known development account (public, documented by Microsoft).
pub const AZURITE_ACCOUNT: &str = "devstoreaccount1";
pub const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// moto accepts any credentials; these only have to be present.
const MOTO_KEY_ID: &str = "test";
const MOTO_SECRET: &str = "test";

/// Which emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Azurite,
    Moto,
}

/// Where the emulators are installed.
pub fn emulators_dir() -> PathBuf {
    std::env::var_os("OUTPOST_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outpost-emulators")
        })
}

/// One emulator process on loopback; killed by its PID and reaped when dropped.
pub struct Emulator {
    kind: Kind,
    /// Behind a lock so a test sharing the handle can stop and restart it.
    child: Mutex<Child>,
    program: PathBuf,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    dir: TempDir,
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The emulator each kind's tests in this test binary share while at least one holds it.
static SHARED: Mutex<[Option<Weak<Emulator>>; 2]> = Mutex::new([None, None]);

impl Emulator {
    /// Starts an emulator of its own (for a test that must stop it, say).
    pub fn start(kind: Kind) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let (program, args): (PathBuf, Vec<String>) = match kind {
            Kind::Azurite => (
                emulators_dir().join("azurite/node_modules/.bin/azurite-blob"),
                vec![
                    "--blobHost".into(),
                    "127.0.0.1".into(),
                    "--blobPort".into(),
                    port.to_string(),
                    "--location".into(),
                    dir.path().join("data").display().to_string(),
                    "--skipApiVersionCheck".into(),
                ],
            ),
            Kind::Moto => (
                emulators_dir().join("moto/bin/moto_server"),
                vec![
                    "-H".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ],
            ),
        };
        assert!(
            program.exists(),
            "{} is missing: tests/run.sh installs the storage emulators (Azurite from npm, \
             moto[server] from PyPI) under $OUTPOST_EMULATORS (default ~/.cache/outpost-emulators)",
            program.display()
        );
        let log = dir.path().join("emulator.log");
        let child = spawn(&program, &args, &log);
        let em = Emulator {
            kind,
            child: Mutex::new(child),
            program,
            args,
            port,
            log,
            dir,
        };
        em.wait_listening();
        em
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn wait_listening(&self) {
        let (kind, port) = (self.kind, self.port);
        // Bounded: an emulator that is not listening within a minute fails the test.
        let deadline = Instant::now() + Duration::from_secs(60);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = self.child().try_wait() {
                panic!("{kind:?} exited with {status}: {}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{kind:?} is not listening on port {port} after 60 s: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the process by its PID (SIGKILL) and reaps it: the store is gone.
    pub fn kill(&self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts the emulator again on the same port, over the same data directory (Azurite
    /// finds what it had saved; moto starts empty).
    pub fn restart(&self) {
        self.kill();
        *self.child() = spawn(&self.program, &self.args, &self.log);
        self.wait_listening();
    }

    /// Where Azurite keeps its data (`--location`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The running emulator of `kind` other tests of this binary use, or a new one. It stops
    /// when the last test holding it drops it.
    pub fn shared(kind: Kind) -> Arc<Self> {
        let slot = match kind {
            Kind::Azurite => 0,
            Kind::Moto => 1,
        };
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(em) = shared[slot].as_ref().and_then(Weak::upgrade) {
            return em;
        }
        let em = Arc::new(Self::start(kind));
        shared[slot] = Some(Arc::downgrade(&em));
        em
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A new, empty container (Azurite) or bucket (moto) on this emulator, and how to reach
    /// it. The handle keeps the emulator running.
    pub fn fresh(self: &Arc<Self>) -> ObjectStorage {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        // Lower-case letters, digits and dashes: valid as an Azure container and an S3 bucket.
        let bucket = format!(
            "t{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let port = self.port;
        self.create(&bucket);
        let (url, options, env) = match self.kind {
            Kind::Azurite => (
                format!("azblob://{bucket}/e2e"),
                vec![
                    format!("endpoint=http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"),
                    "allow_http=true".to_owned(),
                ],
                vec![
                    ("AZURE_STORAGE_ACCOUNT_NAME", AZURITE_ACCOUNT),
                    ("AZURE_STORAGE_ACCOUNT_KEY", AZURITE_KEY),
                ],
            ),
            Kind::Moto => (
                format!("s3://{bucket}/e2e"),
                vec![
                    format!("endpoint=http://127.0.0.1:{port}"),
                    "allow_http=true".to_owned(),
                    "region=us-east-1".to_owned(),
                ],
                vec![
                    ("AWS_ACCESS_KEY_ID", MOTO_KEY_ID),
                    ("AWS_SECRET_ACCESS_KEY", MOTO_SECRET),
                ],
            ),
        };
        // gc waits this long after taking its lease before it marks (the default, 5 s, would
        // slow every gc of the tests); serve and the CLI get the same options, as they must.
        let mut options = options;
        options.push("maintenance_settle=1s".to_owned());
        ObjectStorage {
            url,
            options,
            env: env
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            bucket,
            emulator: self.clone(),
        }
    }

    /// Creates the container (Azurite) or bucket (moto) `bucket`.
    pub fn create(&self, bucket: &str) {
        let port = self.port;
        match self.kind {
            Kind::Azurite => {
                azure_request(port, "PUT", bucket, &[("restype", "container")])
                    .unwrap_or_else(|e| panic!("create container {bucket}: {e}"));
            }
            Kind::Moto => {
                // moto does not check signatures: a plain PUT creates the bucket.
                let r = http()
                    .put(format!("http://127.0.0.1:{port}/{bucket}"))
                    .send()
                    .expect("create bucket");
                assert!(r.status().is_success(), "create bucket: {}", r.status());
            }
        }
    }
}

/// Starts `program`, its output appended to `log`.
fn spawn(program: &std::path::Path, args: &[String], log: &std::path::Path) -> Child {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log file"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()))
}

/// Where a registry under test keeps its data: a directory, or a fresh container or bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Fs,
    Azurite,
    Moto,
}

impl Backend {
    /// A fresh container or bucket on the shared emulator; `None` for a directory.
    pub fn object_storage(self) -> Option<ObjectStorage> {
        match self {
            Backend::Fs => None,
            Backend::Azurite => Some(azurite()),
            Backend::Moto => Some(moto()),
        }
    }
}

/// A fresh container on the shared Azurite.
pub fn azurite() -> ObjectStorage {
    Emulator::shared(Kind::Azurite).fresh()
}

/// A fresh bucket on the shared moto server.
pub fn moto() -> ObjectStorage {
    Emulator::shared(Kind::Moto).fresh()
}

/// One container or bucket under the prefix `e2e`: what `serve` (and the CLI) need to use it.
/// Credentials travel in the environment (object_store's own variables), so they are not on a
/// command line; everything else is `--storage` and `--storage-option`.
#[derive(Clone)]
pub struct ObjectStorage {
    /// `azblob://CONTAINER/e2e` or `s3://BUCKET/e2e`.
    pub url: String,
    /// `KEY=VALUE` options (endpoint, allow_http, region).
    pub options: Vec<String>,
    /// Environment variables holding the credentials.
    pub env: Vec<(String, String)>,
    /// The container or bucket name.
    pub bucket: String,
    emulator: Arc<Emulator>,
}

impl ObjectStorage {
    /// `--storage URL --storage-option K=V …`.
    pub fn args(&self) -> Vec<String> {
        let mut a = vec!["--storage".to_owned(), self.url.clone()];
        for o in &self.options {
            a.push("--storage-option".to_owned());
            a.push(o.clone());
        }
        a
    }

    /// Adds the arguments and the environment to `cmd`.
    pub fn configure<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.args(self.args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
    }

    pub fn emulator(&self) -> &Arc<Emulator> {
        &self.emulator
    }

    /// Replaces (or creates) the object `key` (relative to the prefix `e2e/`) with `data`,
    /// behind the registry's back: to damage what it stored.
    pub fn put_object(&self, key: &str, data: Vec<u8>) {
        let port = self.emulator.port;
        let path = format!("{}/e2e/{key}", self.bucket);
        match self.emulator.kind {
            Kind::Azurite => {
                azure_request_with(
                    port,
                    "PUT",
                    &path,
                    &[],
                    &[("x-ms-blob-type", "BlockBlob")],
                    data,
                )
                .unwrap_or_else(|e| panic!("put {path}: {e}"));
            }
            Kind::Moto => {
                let r = http()
                    .put(format!("http://127.0.0.1:{port}/{path}"))
                    .header("authorization", moto_authorization())
                    .body(data)
                    .send()
                    .expect("put object");
                assert!(r.status().is_success(), "put {path}: {}", r.status());
            }
        }
    }

    /// The text of the object `key` (relative to the prefix `e2e/`), or why it could not be
    /// read (a missing object included): to look at a small document the registry wrote.
    pub fn get_text(&self, key: &str) -> Result<String, String> {
        let port = self.emulator.port;
        let path = format!("{}/e2e/{key}", self.bucket);
        match self.emulator.kind {
            Kind::Azurite => azure_request(port, "GET", &path, &[]),
            Kind::Moto => {
                let r = http()
                    .get(format!("http://127.0.0.1:{port}/{path}"))
                    .header("authorization", moto_authorization())
                    .send()
                    .map_err(|e| e.to_string())?;
                let status = r.status();
                let text = r.text().map_err(|e| e.to_string())?;
                if status.is_success() {
                    Ok(text)
                } else {
                    Err(format!("{status}: {text}"))
                }
            }
        }
    }

    /// Deletes the object `key` (relative to the prefix `e2e/`) behind the registry's back.
    pub fn delete_object(&self, key: &str) {
        let port = self.emulator.port;
        let path = format!("{}/e2e/{key}", self.bucket);
        match self.emulator.kind {
            Kind::Azurite => {
                azure_request_with(port, "DELETE", &path, &[], &[], Vec::new())
                    .unwrap_or_else(|e| panic!("delete {path}: {e}"));
            }
            Kind::Moto => {
                let r = http()
                    .delete(format!("http://127.0.0.1:{port}/{path}"))
                    .header("authorization", moto_authorization())
                    .send()
                    .expect("delete object");
                assert!(r.status().is_success(), "delete {path}: {}", r.status());
            }
        }
    }

    /// Every object key in the container or bucket (committed objects only: a multipart upload
    /// or uncommitted blocks are not listed), relative to the prefix `e2e/`.
    pub fn keys(&self) -> Vec<String> {
        self.objects().into_iter().map(|(k, _)| k).collect()
    }

    /// Every object (as [`ObjectStorage::keys`] lists them) with its size in bytes.
    pub fn objects(&self) -> Vec<(String, u64)> {
        let port = self.emulator.port;
        let mut keys = Vec::new();
        let mut marker = String::new();
        // Bounded: one page per 1000 objects, far more than any test writes.
        for _ in 0..1000 {
            let text = match self.emulator.kind {
                Kind::Azurite => {
                    let mut q = vec![("comp", "list"), ("restype", "container")];
                    if !marker.is_empty() {
                        q.push(("marker", &marker));
                    }
                    azure_request(port, "GET", &self.bucket, &q)
                        .unwrap_or_else(|e| panic!("list {}: {e}", self.bucket))
                }
                Kind::Moto => {
                    let mut q = vec![("list-type", "2")];
                    if !marker.is_empty() {
                        q.push(("continuation-token", &marker));
                    }
                    let r = http()
                        .get(format!("http://127.0.0.1:{port}/{}", self.bucket))
                        .query(&q)
                        .send()
                        .expect("list bucket");
                    assert!(r.status().is_success(), "list bucket: {}", r.status());
                    r.text().expect("list body")
                }
            };
            let (entry, name, size) = match self.emulator.kind {
                Kind::Azurite => ("Blob", "Name", "Content-Length"),
                Kind::Moto => ("Contents", "Key", "Size"),
            };
            for b in blocks(&text, entry) {
                let k = elements(b, name).into_iter().next().unwrap_or_default();
                let n = elements(b, size)
                    .into_iter()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("no size for {k} in the listing"));
                keys.push((k.strip_prefix("e2e/").unwrap_or(&k).to_owned(), n));
            }
            marker = match self.emulator.kind {
                Kind::Azurite => elements(&text, "NextMarker"),
                Kind::Moto => elements(&text, "NextContinuationToken"),
            }
            .into_iter()
            .next()
            .unwrap_or_default();
            if marker.is_empty() {
                return keys;
            }
        }
        panic!("listing {} did not end", self.bucket);
    }
}

/// An `Authorization` header naming the test account. moto does not check signatures, but it
/// takes an unsigned request as anonymous, and anonymous may not change an object the account
/// wrote (403).
fn moto_authorization() -> String {
    format!(
        "AWS4-HMAC-SHA256 Credential={MOTO_KEY_ID}/20250101/us-east-1/s3/aws4_request, \
         SignedHeaders=host, Signature=00"
    )
}

/// The raw contents of the elements `<tag>…</tag>` in an XML listing.
fn blocks<'a>(xml: &'a str, tag: &str) -> Vec<&'a str> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find(&open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(&close) else { break };
        out.push(&after[..j]);
        rest = &after[j + close.len()..];
    }
    out
}

/// The texts of the elements `<tag>…</tag>` in an XML listing, XML entities decoded.
fn elements(xml: &str, tag: &str) -> Vec<String> {
    blocks(xml, tag)
        .into_iter()
        .map(|t| {
            t.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&apos;", "'")
                .replace("&amp;", "&")
        })
        .collect()
}

/// A bodiless request to Azurite's Blob REST API on `/{account}/{container}`, signed with the
/// development account's shared key; the response body, or why it failed.
fn azure_request(
    port: u16,
    method: &str,
    container: &str,
    query: &[(&str, &str)],
) -> Result<String, String> {
    azure_request_with(port, method, container, query, &[], Vec::new())
}

/// A request to Azurite's Blob REST API on `/{account}/{path}` (a container, or
/// `container/blob`) with `x-ms-` headers and a body, signed with the development account's
/// shared key; the response body, or why it failed.
fn azure_request_with(
    port: u16,
    method: &str,
    path: &str,
    query: &[(&str, &str)],
    ms_headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Result<String, String> {
    let date = run_ok(Command::new("date").args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"]));
    let date = date.trim();
    let version = "2021-08-06";
    // Canonicalized resource: the path, then each query parameter on its own line, sorted.
    let mut q: Vec<(String, &str)> = query
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), *v))
        .collect();
    q.sort();
    let mut resource = format!("/{AZURITE_ACCOUNT}/{AZURITE_ACCOUNT}/{path}");
    for (k, v) in &q {
        resource.push_str(&format!("\n{k}:{v}"));
    }
    // The x-ms- headers, lower-case and sorted, one per line.
    let mut headers: Vec<(String, String)> = ms_headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), (*v).to_owned()))
        .chain([
            ("x-ms-date".to_owned(), date.to_owned()),
            ("x-ms-version".to_owned(), version.to_owned()),
        ])
        .collect();
    headers.sort();
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    // VERB, then eleven standard headers of which only Content-Length is set (empty for no
    // body), the x-ms- headers, the resource.
    let length = if body.is_empty() {
        String::new()
    } else {
        body.len().to_string()
    };
    let to_sign = format!(
        "{method}\n\n\n{length}\n{}{canonical_headers}{resource}",
        "\n".repeat(8)
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = hmac::Key::new(
        hmac::HMAC_SHA256,
        &b64.decode(AZURITE_KEY).expect("Azurite's key is base64"),
    );
    let sig = b64.encode(hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|e| e.to_string())?;
    let mut req = http()
        .request(
            method,
            format!("http://127.0.0.1:{port}/{AZURITE_ACCOUNT}/{path}"),
        )
        .query(query);
    for (k, v) in &headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let r = req
        .header("content-length", body.len().to_string())
        .header(
            "authorization",
            format!("SharedKey {AZURITE_ACCOUNT}:{sig}"),
        )
        .body(body)
        .send()
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let text = r.text().map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(text)
    } else {
        Err(format!("{status}: {text}"))
    }
}
