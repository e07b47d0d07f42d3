//! Helpers for the end-to-end suites: run Outpost's binaries and real peers (skopeo, umoci,
//! containerd) on loopback and temp dirs, and stop every one of them when a test ends.

pub mod balancer;
pub mod cri;
pub mod emulators;
pub mod fixtures;
pub mod k8s;
pub mod metrics;
pub mod oci;
pub mod parent;
pub mod scenarios;
pub mod tokens;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub use tempfile::TempDir;

/// Directory holding the workspace's built binaries (`target/debug` or `target/release`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTPOST_BIN_DIR") {
        return PathBuf::from(d);
    }
    // Test executables live in target/<profile>/deps/.
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>")
        .to_path_buf()
}

/// Path of one of the workspace's binaries; it must have been built (`cargo build --workspace`).
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace --bins)",
        p.display()
    );
    p
}

/// Path of a required external tool. The README's test command installs all of them.
pub fn require(tool: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(tool);
        if p.exists() {
            return p;
        }
    }
    panic!("{tool} is not installed: run the README's test command (it installs the test peers)");
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Runs a command to completion within `timeout`, killing it if it takes longer.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {desc}: {e}"));
    // Drain pipes in threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

/// Runs a command that must succeed within two minutes; returns its stdout.
/// Polls `f` every 200 ms until it holds; panics with `what` once `limit` has passed.
pub fn wait_until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "not within {limit:?}: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{desc} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(data))
}

pub fn sha512(data: &[u8]) -> String {
    let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, data);
    let hex: String = d.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha512:{hex}")
}

/// Deterministic pseudo-random bytes (xorshift), so content is unique per seed without a
/// random-number dependency.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A seed that differs between runs; printed so a failure can be replayed.
pub fn run_seed() -> u64 {
    let seed = std::env::var("OUTPOST_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("test seed: OUTPOST_TEST_SEED={seed}");
    seed
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// An `outpost-registry serve` process on loopback, stopped (SIGKILL) when dropped.
pub struct Registry {
    child: Option<Child>,
    pub port: u16,
    pub admin_port: u16,
    /// The storage directory; unused when `object` is set.
    pub storage: PathBuf,
    /// The container or bucket the registry uses instead of a directory.
    pub object: Option<emulators::ObjectStorage>,
    pub log: PathBuf,
    extra: Vec<String>,
    env: Vec<(String, String)>,
    _dir: TempDir,
}

impl Registry {
    /// A registry on fresh storage.
    pub fn start() -> Self {
        Self::start_with_args(&[])
    }

    pub fn start_with_args(extra: &[&str]) -> Self {
        Self::start_on_storage(None, extra)
    }

    /// A registry on fresh storage of `backend` (a directory, or a fresh container or bucket).
    pub fn start_on(backend: emulators::Backend, extra: &[&str]) -> Self {
        Self::start_on_storage(backend.object_storage(), extra)
    }

    /// A registry on `object` storage (a container or bucket), or on a fresh directory.
    pub fn start_on_storage(object: Option<emulators::ObjectStorage>, extra: &[&str]) -> Self {
        Self::start_with_env(object, extra, &[])
    }

    /// As [`Registry::start_on_storage`], with these environment variables set for it.
    pub fn start_with_env(
        object: Option<emulators::ObjectStorage>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let storage = dir.path().join("data");
        let mut r = Registry {
            child: None,
            port: free_port(),
            admin_port: free_port(),
            storage,
            object,
            log: dir.path().join("registry.log"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        };
        r.spawn();
        r
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let mut cmd = Command::new(bin("outpost-registry"));
        cmd.arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", self.admin_port));
        self.storage_args(&mut cmd);
        let child = cmd
            .args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start outpost-registry");
        self.child = Some(child);
        self.wait_ready();
    }

    /// `--storage` (and on object storage its options and credentials) for `cmd`.
    fn storage_args(&self, cmd: &mut Command) {
        match &self.object {
            Some(o) => {
                o.configure(cmd);
            }
            None => {
                cmd.arg("--storage").arg(&self.storage);
            }
        }
    }

    fn wait_ready(&mut self) {
        // Generous: on object storage the start includes a request to the emulator.
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!(
                    "outpost-registry exited early ({status}):\n{}",
                    self.log_text()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "outpost-registry did not listen in time:\n{}",
            self.log_text()
        );
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL, as a crash would: nothing gets to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM without waiting.
    pub fn sigterm(&self) {
        if let Some(c) = &self.child {
            signal(c.id(), "TERM");
        }
    }

    /// Waits up to `timeout` for the process to exit after a signal.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let mut c = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!("outpost-registry did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again on the same storage and ports.
    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    /// Starts the server again on the same storage and ports, with other extra arguments.
    pub fn restart_with_args(&mut self, extra: &[&str]) {
        self.kill9();
        self.extra = extra.iter().map(|s| s.to_string()).collect();
        self.spawn();
    }

    /// Runs `outpost-registry <args> --storage <this storage>` (with its options and
    /// credentials on object storage) to completion.
    pub fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(bin("outpost-registry"));
        cmd.args(args);
        match &self.object {
            // The options through serve's variable, so a subcommand that takes no
            // --storage-option flag still gets them once it reads that variable.
            Some(o) => {
                cmd.arg("--storage")
                    .arg(&o.url)
                    .env("OUTPOST_STORAGE_OPTION", o.options.join(","))
                    .envs(o.env.iter().map(|(k, v)| (k, v)));
            }
            None => {
                cmd.arg("--storage").arg(&self.storage);
            }
        }
        run_timeout(&mut cmd, Duration::from_secs(300))
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A blocking HTTP client for tests (no proxies, generous timeouts).
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("http client")
}

/// A response header as text ("" when absent).
pub fn header(r: &reqwest::blocking::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

/// Sends one raw HTTP/1.1 request (which should say `Connection: close`) and returns the
/// status and the whole response. For requests an HTTP library would normalise (`..` in paths)
/// or refuse to send (truncated bodies: `end_body` then closes our sending side, so the server
/// sees the body end early; the status is 0 if it just closes the connection).
pub fn raw_request(port: u16, request: &[u8], end_body: bool) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30))).ok();
    s.write_all(request).expect("send");
    if end_body {
        let _ = s.shutdown(std::net::Shutdown::Write);
    }
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// An OCI image layout on disk, built offline with umoci.
pub struct Layout {
    pub path: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        let path = dir.join("layout");
        run_ok(
            Command::new(require("umoci"))
                .args(["init", "--layout"])
                .arg(&path),
        );
        Layout { path }
    }

    fn image_ref(&self, tag: &str) -> String {
        format!("{}:{tag}", self.path.display())
    }

    /// Adds an image `tag` for `arch` holding `files` (path in rootfs, content), plus busybox.
    pub fn add_image(&self, tag: &str, arch: &str, files: &[(&str, Vec<u8>)]) {
        let umoci = require("umoci");
        let work = self.path.with_file_name(format!("bundle-{tag}"));
        run_ok(Command::new(&umoci).args(["new", "--image", &self.image_ref(tag)]));
        run_ok(
            Command::new(&umoci)
                .args(["unpack", "--rootless", "--image", &self.image_ref(tag)])
                .arg(&work),
        );
        let rootfs = work.join("rootfs");
        std::fs::create_dir_all(rootfs.join("bin")).expect("rootfs");
        std::fs::copy(require("busybox"), rootfs.join("bin/busybox")).expect("busybox");
        for (p, content) in files {
            let target = rootfs.join(p);
            std::fs::create_dir_all(target.parent().expect("parent")).expect("dirs");
            std::fs::write(target, content).expect("file");
        }
        run_ok(
            Command::new(&umoci)
                .args(["repack", "--image", &self.image_ref(tag)])
                .arg(&work),
        );
        run_ok(Command::new(&umoci).args([
            "config",
            "--image",
            &self.image_ref(tag),
            "--architecture",
            arch,
            "--os",
            "linux",
            "--config.cmd",
            "/bin/busybox",
        ]));
        let _ = std::fs::remove_dir_all(&work);
    }

    fn index_json(&self) -> serde_json::Value {
        let raw = std::fs::read(self.path.join("index.json")).expect("index.json");
        serde_json::from_slice(&raw).expect("index.json parses")
    }

    /// The manifest descriptor tagged `tag` in index.json.
    pub fn descriptor(&self, tag: &str) -> serde_json::Value {
        self.index_json()["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .cloned()
            .unwrap_or_else(|| panic!("no tag {tag} in layout"))
    }

    pub fn blob(&self, digest: &str) -> Vec<u8> {
        let (alg, hex) = digest.split_once(':').expect("digest");
        std::fs::read(self.path.join("blobs").join(alg).join(hex)).expect("blob")
    }

    /// Writes an OCI index of the images tagged `tags` (with their platforms) and tags it.
    /// Returns the index's digest.
    pub fn add_index(&self, tag: &str, tags: &[(&str, &str)]) -> String {
        let manifests: Vec<serde_json::Value> = tags
            .iter()
            .map(|(t, arch)| {
                let d = self.descriptor(t);
                serde_json::json!({
                    "mediaType": d["mediaType"],
                    "digest": d["digest"],
                    "size": d["size"],
                    "platform": { "architecture": arch, "os": "linux" },
                })
            })
            .collect();
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": manifests,
        });
        let bytes = serde_json::to_vec(&index).expect("json");
        let digest = sha256(&bytes);
        std::fs::write(
            self.path.join("blobs/sha256").join(sha256_hex(&bytes)),
            &bytes,
        )
        .expect("write index blob");
        let mut top = self.index_json();
        top["manifests"]
            .as_array_mut()
            .expect("manifests")
            .push(serde_json::json!({
                "mediaType": "application/vnd.oci.image.index.v1+json",
                "digest": digest,
                "size": bytes.len(),
                "annotations": { "org.opencontainers.image.ref.name": tag },
            }));
        std::fs::write(
            self.path.join("index.json"),
            serde_json::to_vec(&top).expect("json"),
        )
        .expect("write index.json");
        digest
    }
}

/// `skopeo` against a plain-HTTP registry on loopback.
pub fn skopeo(args: &[&str]) -> String {
    run_ok(
        Command::new(require("skopeo"))
            .args(["--insecure-policy"])
            .args(args),
    )
}

/// A containerd daemon with its own root, state and socket under a temp dir, killed on drop.
pub struct Containerd {
    child: Option<Child>,
    pub dir: TempDir,
    pub socket: PathBuf,
}

impl Containerd {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let d = dir.path();
        let socket = d.join("containerd.sock");
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"\"\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = socket.display(),
        );
        std::fs::write(d.join("config.toml"), config).expect("config");
        let log = std::fs::File::create(d.join("containerd.log")).expect("log");
        let child = Command::new(require("containerd"))
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd {
            child: Some(child),
            dir,
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !c.socket.exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    /// Runs `ctr` against this daemon; returns stdout, panicking on failure.
    pub fn ctr(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(require("ctr"))
                .arg("--address")
                .arg(&self.socket)
                .args(args),
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Files of a test PKI made with openssl: a CA and a server certificate it signed for
/// 127.0.0.1 and localhost.
pub struct TestPki {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestPki {
    pub fn create(dir: &Path) -> Self {
        let openssl = require("openssl");
        let p = |n: &str| dir.join(n);
        run_ok(
            Command::new(&openssl)
                .args([
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-days", "2", "-subj", "/CN=outpost-test-ca"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
                .arg("-keyout")
                .arg(p("ca.key"))
                .arg("-out")
                .arg(p("ca.crt")),
        );
        run_ok(
            Command::new(&openssl)
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-subj", "/CN=outpost-test"])
                .arg("-keyout")
                .arg(p("tls.key"))
                .arg("-out")
                .arg(p("tls.csr")),
        );
        std::fs::write(
            p("ext.cnf"),
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .expect("ext file");
        run_ok(
            Command::new(&openssl)
                .args(["x509", "-req", "-days", "2"])
                .arg("-in")
                .arg(p("tls.csr"))
                .arg("-CA")
                .arg(p("ca.crt"))
                .arg("-CAkey")
                .arg(p("ca.key"))
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(p("ext.cnf"))
                .arg("-out")
                .arg(p("tls.crt")),
        );
        TestPki {
            ca_cert: p("ca.crt"),
            cert: p("tls.crt"),
            key: p("tls.key"),
        }
    }
}
