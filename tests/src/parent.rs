//! Parents for sync tests: Debian's docker-registry (the CNCF distribution registry) on a free
//! loopback port, optionally with htpasswd Basic auth and TLS, and a fault-injecting HTTP/1.1
//! proxy that records what passes through it and can cut a response short.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::{free_port, require, run_ok};

/// How to start a [`DockerRegistry`].
#[derive(Default)]
pub struct DockerRegistryBuilder {
    basic: Option<(String, String)>,
    tls: Option<(PathBuf, PathBuf)>,
    ip: Option<std::net::IpAddr>,
}

impl DockerRegistryBuilder {
    /// Listen on `ip` (an address of the caller's network namespace) instead of 127.0.0.1.
    pub fn listen_ip(mut self, ip: std::net::IpAddr) -> Self {
        self.ip = Some(ip);
        self
    }

    /// htpasswd Basic auth with one user.
    pub fn basic_auth(mut self, user: &str, password: &str) -> Self {
        self.basic = Some((user.into(), password.into()));
        self
    }

    pub fn tls(mut self, cert: &Path, key: &Path) -> Self {
        self.tls = Some((cert.into(), key.into()));
        self
    }

    pub fn start(self) -> DockerRegistry {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let ip = self
            .ip
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: true\nstorage:\n  \
             filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  \
             addr: {ip}:{port}\n",
            dir.path().join("data").display()
        );
        if let Some((cert, key)) = &self.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = &self.basic {
            let htpasswd = dir.path().join("htpasswd");
            std::fs::write(&htpasswd, format!("{user}:{}\n", bcrypt(password))).expect("htpasswd");
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: outpost-tests\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).expect("config");
        let mut r = DockerRegistry {
            child: None,
            port,
            ip,
            tls: self.tls.is_some(),
            basic: self.basic.clone(),
            config: config_path,
            log: dir.path().join("registry.log"),
            _dir: dir,
        };
        r.start_again();
        r
    }
}

/// A bcrypt hash for htpasswd, from the C library's crypt through Python (docker-registry
/// accepts `$2b$`), so no extra package is needed.
fn bcrypt(password: &str) -> String {
    let script = "import crypt,sys; print(crypt.crypt(sys.argv[1], crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16)))";
    let out = run_ok(Command::new("python3").args(["-W", "ignore", "-c", script, password]));
    let hash = out.trim().to_owned();
    assert!(hash.starts_with("$2"), "no bcrypt from crypt(3): {hash}");
    hash
}

/// `docker-registry serve` on 127.0.0.1 (or the builder's `listen_ip`), killed on drop.
pub struct DockerRegistry {
    child: Option<Child>,
    pub port: u16,
    pub ip: std::net::IpAddr,
    tls: bool,
    basic: Option<(String, String)>,
    config: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

impl DockerRegistry {
    pub fn builder() -> DockerRegistryBuilder {
        DockerRegistryBuilder::default()
    }

    pub fn host(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.host())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops it (content and port are kept for [`DockerRegistry::start_again`]).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again) on the same port and storage, and waits until it answers.
    pub fn start_again(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log");
        let child = Command::new(require("docker-registry"))
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("docker-registry exited ({status}):\n{}", self.log_text());
            }
            // Listening is enough: TLS and auth are its business.
            if TcpStream::connect((self.ip, self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("docker-registry never listened:\n{}", self.log_text());
    }

    /// skopeo flags to push into it: credentials and, with TLS, a cert dir holding `ca`.
    pub fn skopeo_dest_args(&self, ca: Option<&Path>) -> Vec<String> {
        let mut args = Vec::new();
        if let (true, Some(ca)) = (self.tls, ca) {
            let certs = self._dir.path().join("certs.d");
            std::fs::create_dir_all(&certs).expect("certs dir");
            std::fs::copy(ca, certs.join("ca.crt")).expect("ca");
            args.push(format!("--dest-cert-dir={}", certs.display()));
        } else {
            args.push("--dest-tls-verify=false".into());
        }
        if let Some((user, password)) = &self.basic {
            args.push(format!("--dest-creds={user}:{password}"));
        }
        args
    }
}

impl Drop for DockerRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One request that went through a [`FaultProxy`].
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub method: String,
    pub path: String,
    pub range: Option<String>,
    pub status: u16,
    /// Response body bytes actually forwarded to the client.
    pub body_bytes: u64,
    /// The response stalled (see [`FaultProxy::stall_after`]).
    pub stalled: bool,
}

#[derive(Default)]
struct ProxyState {
    requests: Vec<ProxiedRequest>,
    cut: Option<(String, u64)>,
    refuse: Option<(String, u16)>,
    hold: Option<String>,
    stall: Option<(String, u64)>,
}

/// A plain-HTTP/1.1 proxy in front of `upstream` on a free loopback port. Threads end when it
/// is dropped (every socket has a short read timeout and checks the stop flag).
pub struct FaultProxy {
    pub port: u16,
    state: Arc<Mutex<ProxyState>>,
    offline: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    acceptor: Option<std::thread::JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(200);

impl FaultProxy {
    pub fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let state = Arc::new(Mutex::new(ProxyState::default()));
        let offline = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, off, sp, up) = (
            state.clone(),
            offline.clone(),
            stop.clone(),
            upstream.to_owned(),
        );
        let acceptor = std::thread::spawn(move || {
            while !sp.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        if off.load(Ordering::SeqCst) {
                            let _ = client.shutdown(Shutdown::Both);
                            continue;
                        }
                        let (st, sp, up) = (st.clone(), sp.clone(), up.clone());
                        std::thread::spawn(move || {
                            let _ = serve_connection(client, &up, &st, &sp);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        FaultProxy {
            port,
            state,
            offline,
            stop,
            acceptor: Some(acceptor),
        }
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.state.lock().expect("state").requests.clone()
    }

    /// The next response to a request whose path contains `path_contains` is cut after
    /// `body_bytes` bytes of body (one-shot).
    pub fn cut_after(&self, path_contains: &str, body_bytes: u64) {
        self.state.lock().expect("state").cut = Some((path_contains.into(), body_bytes));
    }

    /// Requests whose path contains `path_contains` get `status` from the proxy itself (as a
    /// parent that refuses, say, its catalog to a scope-map token).
    pub fn refuse(&self, path_contains: &str, status: u16) {
        self.state.lock().expect("state").refuse = Some((path_contains.into(), status));
    }

    /// Requests whose path contains `path_contains` wait at the proxy, before they reach the
    /// parent, until [`FaultProxy::release`] (or the proxy is dropped): a test can look at the
    /// child while it is certain the request has not been answered.
    pub fn hold(&self, path_contains: &str) {
        self.state.lock().expect("state").hold = Some(path_contains.into());
    }

    /// Responses to requests whose path contains `path_contains` and whose body (known by its
    /// `content-length`) is longer than `body_bytes` stop after `body_bytes` bytes, as a parent
    /// that stalls mid-transfer: the connection stays open and silent until
    /// [`FaultProxy::end_stalls`] (or the proxy is dropped) closes it. Every such response
    /// while set, so several downloads can be caught in the middle at once.
    pub fn stall_after(&self, path_contains: &str, body_bytes: u64) {
        self.state.lock().expect("state").stall = Some((path_contains.into(), body_bytes));
    }

    /// Stops stalling new responses, and closes the stalled ones without sending them a byte
    /// more (so nothing reaches a client that died meanwhile and the counts stay exact).
    pub fn end_stalls(&self) {
        self.state.lock().expect("state").stall = None;
    }

    /// Lets held requests (and later ones) through.
    pub fn release(&self) {
        self.state.lock().expect("state").hold = None;
    }

    pub fn set_offline(&self, offline: bool) {
        self.offline.store(offline, Ordering::SeqCst);
    }

    /// Body bytes forwarded for every request whose path contains `path_contains` (requests
    /// still in flight included).
    pub fn body_bytes_for(&self, path_contains: &str) -> u64 {
        self.state
            .lock()
            .expect("state")
            .requests
            .iter()
            .filter(|r| r.path.contains(path_contains))
            .map(|r| r.body_bytes)
            .sum()
    }

    /// GET requests whose path contains `path_part`.
    pub fn gets_for(&self, path_part: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains(path_part))
            .count()
    }

    /// Range starts of the GETs of blob `digest`, in order (0 for a request without a range).
    pub fn range_starts(&self, digest: &str) -> Vec<u64> {
        self.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.path.contains(&format!("/blobs/{digest}")))
            .map(|r| {
                r.range
                    .as_deref()
                    .and_then(|h| h.strip_prefix("bytes="))
                    .and_then(|h| h.split('-').next())
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0)
            })
            .collect()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
    }
}

/// Reads one line (up to CRLF), waiting through read timeouts unless stopping.
fn read_line(r: &mut BufReader<TcpStream>, stop: &AtomicBool) -> std::io::Result<Option<String>> {
    let mut buf = Vec::new();
    loop {
        match r.read_until(b'\n', &mut buf) {
            Ok(0) => return Ok(None),
            Ok(_) if buf.ends_with(b"\n") => {
                return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
            }
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A request or response head: the first line, the headers (names lowercased), and its bytes.
type Head = (String, Vec<(String, String)>, Vec<u8>);

fn read_head(r: &mut BufReader<TcpStream>, stop: &AtomicBool) -> std::io::Result<Option<Head>> {
    let Some(first) = read_line(r, stop)? else {
        return Ok(None);
    };
    let mut raw = first.clone().into_bytes();
    let mut headers = Vec::new();
    loop {
        let Some(line) = read_line(r, stop)? else {
            return Ok(None);
        };
        raw.extend_from_slice(line.as_bytes());
        let t = line.trim_end();
        if t.is_empty() {
            break;
        }
        if let Some((k, v)) = t.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
    }
    Ok(Some((first.trim_end().to_owned(), headers, raw)))
}

fn header<'a>(h: &'a [(String, String)], name: &str) -> Option<&'a str> {
    h.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Copies exactly `n` bytes, stopping early (Ok(false)) when `limit` bytes have gone through.
fn copy_n(
    from: &mut BufReader<TcpStream>,
    to: &mut TcpStream,
    mut n: u64,
    sent: &mut dyn FnMut(u64) -> bool,
    stop: &AtomicBool,
) -> std::io::Result<bool> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let want = buf.len().min(n as usize);
        match from.read(&mut buf[..want]) {
            Ok(0) => return Ok(false),
            Ok(k) => {
                to.write_all(&buf[..k])?;
                n -= k as u64;
                if !sent(k as u64) {
                    return Ok(false);
                }
            }
            Err(e) if is_timeout(&e) => {
                if stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

fn serve_connection(
    client: TcpStream,
    upstream: &str,
    state: &Mutex<ProxyState>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    let up = TcpStream::connect(upstream)?;
    for s in [&client, &up] {
        s.set_read_timeout(Some(POLL))?;
        s.set_nodelay(true)?;
    }
    let mut client_w = client.try_clone()?;
    let mut up_w = up.try_clone()?;
    let mut client_r = BufReader::new(client);
    let mut up_r = BufReader::new(up);
    loop {
        let Some((line, headers, raw)) = read_head(&mut client_r, stop)? else {
            return Ok(());
        };
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let path = parts.next().unwrap_or("").to_owned();
        let refused = {
            let st = state.lock().expect("state");
            st.refuse
                .as_ref()
                .filter(|(p, _)| path.contains(p.as_str()))
                .map(|(_, s)| *s)
        };
        // Held: wait for the release, checking the stop flag (bounded by the proxy's life).
        while state
            .lock()
            .expect("state")
            .hold
            .as_ref()
            .is_some_and(|p| path.contains(p.as_str()))
        {
            if stop.load(Ordering::SeqCst) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Some(status) = refused {
            let body =
                r#"{"errors":[{"code":"UNAUTHORIZED","message":"refused by the test proxy"}]}"#;
            state.lock().expect("state").requests.push(ProxiedRequest {
                method,
                path,
                range: header(&headers, "range").map(str::to_owned),
                status,
                body_bytes: 0,
                stalled: false,
            });
            write!(
                client_w,
                "HTTP/1.1 {status} Refused\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )?;
            continue;
        }
        up_w.write_all(&raw)?;
        let req_len: u64 = header(&headers, "content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if req_len > 0 && !copy_n(&mut client_r, &mut up_w, req_len, &mut |_| true, stop)? {
            return Ok(());
        }
        let Some((status_line, rh, rraw)) = read_head(&mut up_r, stop)? else {
            return Ok(());
        };
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let index = {
            let mut st = state.lock().expect("state");
            st.requests.push(ProxiedRequest {
                method: method.clone(),
                path: path.clone(),
                range: header(&headers, "range").map(str::to_owned),
                status,
                body_bytes: 0,
                stalled: false,
            });
            st.requests.len() - 1
        };
        let cut = {
            let mut st = state.lock().expect("state");
            match &st.cut {
                Some((p, n)) if path.contains(p.as_str()) => {
                    let n = *n;
                    st.cut = None;
                    Some(n)
                }
                _ => None,
            }
        };
        let stall = {
            let st = state.lock().expect("state");
            match &st.stall {
                Some((p, n)) if path.contains(p.as_str()) => Some(*n),
                _ => None,
            }
        };
        client_w.write_all(&rraw)?;
        let no_body =
            method == "HEAD" || status == 204 || status == 304 || (100..200).contains(&status);
        let mut forwarded = 0u64;
        let mut count = |k: u64| {
            forwarded += k;
            state.lock().expect("state").requests[index].body_bytes = forwarded;
            cut.is_none_or(|limit| forwarded < limit)
        };
        if no_body {
            continue;
        }
        let complete =
            if let Some(len) = header(&rh, "content-length").and_then(|v| v.parse::<u64>().ok()) {
                if let Some(at) = stall.filter(|at| *at < len) {
                    if copy_n(&mut up_r, &mut client_w, at, &mut count, stop)? {
                        state.lock().expect("state").requests[index].stalled = true;
                        // Silent until the stalls end or the proxy stops (bounded by its life).
                        while state.lock().expect("state").stall.is_some()
                            && !stop.load(Ordering::SeqCst)
                        {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                    let _ = client_w.shutdown(Shutdown::Both);
                    let _ = up_w.shutdown(Shutdown::Both);
                    return Ok(());
                }
                // A cut forwards exactly `limit` bytes, then drops both connections.
                let len = cut.map_or(len, |c| c.min(len));
                copy_n(&mut up_r, &mut client_w, len, &mut count, stop)? && cut.is_none()
            } else if header(&rh, "transfer-encoding").is_some_and(|t| t.contains("chunked")) {
                copy_chunked(&mut up_r, &mut client_w, &mut count, stop)?
            } else {
                // No length: the body runs to the end of the connection.
                let _ = copy_n(&mut up_r, &mut client_w, u64::MAX, &mut count, stop);
                false
            };
        if !complete {
            let _ = client_w.shutdown(Shutdown::Both);
            let _ = up_w.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

/// Forwards a chunked body as is; Ok(false) if it ended early or was cut.
fn copy_chunked(
    from: &mut BufReader<TcpStream>,
    to: &mut TcpStream,
    count: &mut dyn FnMut(u64) -> bool,
    stop: &AtomicBool,
) -> std::io::Result<bool> {
    loop {
        let Some(size_line) = read_line(from, stop)? else {
            return Ok(false);
        };
        to.write_all(size_line.as_bytes())?;
        let size =
            u64::from_str_radix(size_line.trim().split(';').next().unwrap_or("0"), 16).unwrap_or(0);
        if size == 0 {
            // Trailers, then the empty line.
            loop {
                let Some(l) = read_line(from, stop)? else {
                    return Ok(false);
                };
                to.write_all(l.as_bytes())?;
                if l.trim_end().is_empty() {
                    return Ok(true);
                }
            }
        }
        if !copy_n(from, to, size, count, stop)? {
            return Ok(false);
        }
        let Some(crlf) = read_line(from, stop)? else {
            return Ok(false);
        };
        to.write_all(crlf.as_bytes())?;
    }
}
