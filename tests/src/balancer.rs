//! A round-robin TCP balancer on loopback standing in for a Kubernetes Service in front of
//! several registry replicas: each accepted connection goes, whole, to the next backend whose
//! readiness URL last answered 200 (polled every [`POLL_EVERY`]), and bytes are copied both
//! ways until either side closes. Connections already open stay where they are when a backend
//! turns unready, as with kube-proxy. Backends can be added, removed and replaced while it
//! runs (a restarted replica may come back on another port). With no ready backend a
//! connection is accepted and closed at once, before any byte: what a client sees from a
//! Service with no endpoints. Stopped (listener, pollers, open connections) on drop.

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How often each backend's readiness URL is asked.
pub const POLL_EVERY: Duration = Duration::from_millis(200);
/// A probe slower than this counts as a failure (as a probe's timeoutSeconds would).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Connecting to a backend: loopback, so anything slower is a backend in trouble.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Connections open at once; beyond that new ones are closed (each costs two threads).
pub const MAX_CONNECTIONS: usize = 256;

/// One backend: where connections go, and the URL that says whether it takes new ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: SocketAddr,
    /// `http://host:port/path`; `None`: `http://<addr>/readyz`.
    pub readyz: Option<String>,
}

impl BackendSpec {
    pub fn new(addr: SocketAddr, readyz: Option<String>) -> Self {
        BackendSpec { addr, readyz }
    }

    /// A registry replica: its API port, ready as its admin port's `/readyz` says (as the
    /// chart's readiness probe asks).
    pub fn registry(r: &crate::Registry) -> Self {
        BackendSpec {
            addr: SocketAddr::from(([127, 0, 0, 1], r.port)),
            readyz: Some(format!("http://127.0.0.1:{}/readyz", r.admin_port)),
        }
    }

    /// `host:port[,http://host:port/path]`, as the binary's `--backend` takes it.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, readyz) = match s.split_once(',') {
            Some((a, u)) => (a, Some(u.to_owned())),
            None => (s, None),
        };
        let addr = resolve(addr).ok_or_else(|| format!("bad backend address {addr:?}"))?;
        if let Some(u) = &readyz {
            parse_http_url(u)
                .ok_or_else(|| format!("bad readiness URL {u:?} (http://host:port/path)"))?;
        }
        Ok(BackendSpec { addr, readyz })
    }

    fn probe_target(&self) -> Option<(SocketAddr, String, String)> {
        match &self.readyz {
            Some(u) => parse_http_url(u),
            None => Some((self.addr, self.addr.to_string(), "/readyz".to_owned())),
        }
    }
}

fn resolve(hostport: &str) -> Option<SocketAddr> {
    hostport.to_socket_addrs().ok()?.next()
}

/// `http://host:port/path` into (address, Host header, path).
fn parse_http_url(u: &str) -> Option<(SocketAddr, String, String)> {
    let rest = u.strip_prefix("http://")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Some((resolve(hostport)?, hostport.to_owned(), path.to_owned()))
}

/// One GET of the readiness URL: ready on a 200 status line, anything else (including no
/// answer within [`PROBE_TIMEOUT`]) is not ready.
fn probe(target: &(SocketAddr, String, String)) -> bool {
    let (addr, host, path) = target;
    let Ok(mut s) = TcpStream::connect_timeout(addr, PROBE_TIMEOUT) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(PROBE_TIMEOUT));
    let _ = s.set_write_timeout(Some(PROBE_TIMEOUT));
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).is_err() {
        return false;
    }
    // The status line is all we need; read until it is complete (bounded).
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 64];
    while !head.contains(&b'\n') && head.len() < 1024 {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let mut parts = line.split_whitespace();
    parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) && parts.next() == Some("200")
}

struct Backend {
    id: usize,
    spec: BackendSpec,
    ready: AtomicBool,
    removed: AtomicBool,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    active: AtomicU64,
}

/// What the balancer did with one backend so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendStats {
    pub id: usize,
    pub addr: SocketAddr,
    pub ready: bool,
    pub removed: bool,
    /// Connections sent to it (including those whose connect failed).
    pub connections: u64,
    /// Connections sent to it that it refused (the client's connection was then closed).
    pub connect_failures: u64,
    /// Connections to it open now.
    pub active: u64,
}

/// Every backend's figures (removed ones too) and the connections closed unserved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub backends: Vec<BackendStats>,
    /// Connections closed because no backend was ready.
    pub no_backend: u64,
    /// Connections closed because [`MAX_CONNECTIONS`] were open.
    pub overloaded: u64,
}

impl Stats {
    pub fn backend(&self, id: usize) -> Option<&BackendStats> {
        self.backends.iter().find(|b| b.id == id)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "backends": self.backends.iter().map(|b| serde_json::json!({
                "id": b.id,
                "addr": b.addr.to_string(),
                "ready": b.ready,
                "removed": b.removed,
                "connections": b.connections,
                "connect_failures": b.connect_failures,
                "active": b.active,
            })).collect::<Vec<_>>(),
            "no_backend": self.no_backend,
            "overloaded": self.overloaded,
        })
    }
}

struct Inner {
    backends: Mutex<Vec<Arc<Backend>>>,
    next_id: AtomicUsize,
    turn: AtomicUsize,
    stop: AtomicBool,
    no_backend: AtomicU64,
    overloaded: AtomicU64,
    /// Both sockets of every open connection, so a stop can close them.
    open: Mutex<HashMap<u64, (TcpStream, TcpStream)>>,
    next_conn: AtomicU64,
    pollers: Mutex<Vec<JoinHandle<()>>>,
}

/// A lock that a panicking holder did not leave unusable: the data is plain counters and lists.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    fn add(self: &Arc<Self>, spec: BackendSpec) -> usize {
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let target = spec.probe_target();
        let b = Arc::new(Backend {
            id,
            spec,
            ready: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            active: AtomicU64::new(0),
        });
        lock(&self.backends).push(b.clone());
        let inner = self.clone();
        let poller = std::thread::spawn(move || {
            // Ends when the backend is removed or the balancer stops.
            while !inner.stop.load(Ordering::SeqCst) && !b.removed.load(Ordering::SeqCst) {
                let started = Instant::now();
                let ok = target.as_ref().is_some_and(probe);
                b.ready
                    .store(ok && !b.removed.load(Ordering::SeqCst), Ordering::SeqCst);
                std::thread::sleep(POLL_EVERY.saturating_sub(started.elapsed()));
            }
            b.ready.store(false, Ordering::SeqCst);
        });
        let mut pollers = lock(&self.pollers);
        pollers.retain(|h| !h.is_finished());
        pollers.push(poller);
        id
    }

    /// The next ready backend in turn.
    fn pick(&self) -> Option<Arc<Backend>> {
        let backends = lock(&self.backends);
        let ready: Vec<&Arc<Backend>> = backends
            .iter()
            .filter(|b| b.ready.load(Ordering::SeqCst) && !b.removed.load(Ordering::SeqCst))
            .collect();
        if ready.is_empty() {
            return None;
        }
        let turn = self.turn.fetch_add(1, Ordering::SeqCst);
        Some(ready[turn % ready.len()].clone())
    }

    fn handle(self: &Arc<Self>, client: TcpStream) {
        let Some(backend) = self.pick() else {
            self.no_backend.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            return;
        };
        backend.connections.fetch_add(1, Ordering::SeqCst);
        let server = match TcpStream::connect_timeout(&backend.spec.addr, CONNECT_TIMEOUT) {
            Ok(s) => s,
            Err(_) => {
                // As kube-proxy: the client's connection fails; it is not sent elsewhere.
                backend.connect_failures.fetch_add(1, Ordering::SeqCst);
                let _ = client.shutdown(Shutdown::Both);
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        ) else {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            return;
        };
        let conn = self.next_conn.fetch_add(1, Ordering::SeqCst);
        lock(&self.open).insert(conn, (c3, s3));
        backend.active.fetch_add(1, Ordering::SeqCst);
        let back = std::thread::spawn(move || pipe(s2, c2));
        pipe(client, server);
        let _ = back.join();
        lock(&self.open).remove(&conn);
        backend.active.fetch_sub(1, Ordering::SeqCst);
    }

    fn stats(&self) -> Stats {
        let backends = lock(&self.backends)
            .iter()
            .map(|b| BackendStats {
                id: b.id,
                addr: b.spec.addr,
                ready: b.ready.load(Ordering::SeqCst),
                removed: b.removed.load(Ordering::SeqCst),
                connections: b.connections.load(Ordering::SeqCst),
                connect_failures: b.connect_failures.load(Ordering::SeqCst),
                active: b.active.load(Ordering::SeqCst),
            })
            .collect();
        Stats {
            backends,
            no_backend: self.no_backend.load(Ordering::SeqCst),
            overloaded: self.overloaded.load(Ordering::SeqCst),
        }
    }
}

/// Copies `from` into `to` until `from` ends; then ends `to`'s sending side (a half close, so
/// the other direction can still finish). On an error both sockets are closed: the peer of a
/// reset connection must see it end too.
fn pipe(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// The running balancer; stopped when dropped.
pub struct Balancer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    acceptor: Option<JoinHandle<()>>,
}

impl Balancer {
    /// A balancer on a free loopback port in front of `backends`.
    pub fn start(backends: &[BackendSpec]) -> Self {
        Self::bind(SocketAddr::from(([127, 0, 0, 1], 0)), backends).expect("balancer listens")
    }

    /// A balancer listening on `listen` in front of `backends`.
    pub fn bind(listen: SocketAddr, backends: &[BackendSpec]) -> io::Result<Self> {
        let listener = TcpListener::bind(listen)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            backends: Mutex::new(Vec::new()),
            next_id: AtomicUsize::new(0),
            turn: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            no_backend: AtomicU64::new(0),
            overloaded: AtomicU64::new(0),
            open: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(0),
            pollers: Mutex::new(Vec::new()),
        });
        for b in backends {
            inner.add(b.clone());
        }
        let i = inner.clone();
        let acceptor = std::thread::spawn(move || {
            let active = Arc::new(AtomicUsize::new(0));
            for conn in listener.incoming() {
                if i.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = conn else {
                    // Out of descriptors or a connection reset while queued: go on.
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                if active.load(Ordering::SeqCst) >= MAX_CONNECTIONS {
                    i.overloaded.fetch_add(1, Ordering::SeqCst);
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                active.fetch_add(1, Ordering::SeqCst);
                let (i2, a2) = (i.clone(), active.clone());
                std::thread::spawn(move || {
                    i2.handle(client);
                    a2.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        Ok(Balancer {
            inner,
            addr,
            acceptor: Some(acceptor),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `127.0.0.1:PORT`, for image references.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.addr.port())
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.host())
    }

    /// Adds a backend (not ready until its first probe answers 200); its id.
    pub fn add(&self, spec: BackendSpec) -> usize {
        self.inner.add(spec)
    }

    /// Takes a backend out: no new connections; open ones stay. False if there is no such id.
    pub fn remove(&self, id: usize) -> bool {
        let backends = lock(&self.inner.backends);
        match backends.iter().find(|b| b.id == id) {
            Some(b) => {
                b.removed.store(true, Ordering::SeqCst);
                b.ready.store(false, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Removes `id` and adds `spec` in its place; the new id.
    pub fn replace(&self, id: usize, spec: BackendSpec) -> usize {
        self.remove(id);
        self.add(spec)
    }

    /// The backend's id by address (the newest one at that address).
    pub fn id_of(&self, addr: SocketAddr) -> Option<usize> {
        lock(&self.inner.backends)
            .iter()
            .rev()
            .find(|b| b.spec.addr == addr && !b.removed.load(Ordering::SeqCst))
            .map(|b| b.id)
    }

    pub fn is_ready(&self, id: usize) -> bool {
        self.stats().backend(id).is_some_and(|b| b.ready)
    }

    /// Waits until backend `id`'s readiness is `ready`, at most `timeout`; whether it was.
    pub fn wait_ready(&self, id: usize, ready: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.is_ready(id) == ready {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        // Wakes the acceptor blocked in accept(); it sees the flag and ends.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        for (c, s) in lock(&self.inner.open).values() {
            let _ = c.shutdown(Shutdown::Both);
            let _ = s.shutdown(Shutdown::Both);
        }
        let pollers: Vec<JoinHandle<()>> = lock(&self.inner.pollers).drain(..).collect();
        for p in pollers {
            let _ = p.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny HTTP backend: `/readyz` answers 200 while `ready` holds, else 503; any other
    /// request is answered with the backend's name; `echo` connections (first line `ECHO`)
    /// get every byte back.
    struct Fake {
        addr: SocketAddr,
        ready: Arc<AtomicBool>,
        stop: Arc<AtomicBool>,
    }

    impl Fake {
        fn start(name: &'static str) -> Self {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap();
            let ready = Arc::new(AtomicBool::new(true));
            let stop = Arc::new(AtomicBool::new(false));
            let (r, st) = (ready.clone(), stop.clone());
            std::thread::spawn(move || {
                for c in l.incoming() {
                    if st.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(mut c) = c else { continue };
                    let r = r.clone();
                    std::thread::spawn(move || {
                        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                        let mut first = [0u8; 4];
                        if c.read_exact(&mut first).is_err() {
                            return;
                        }
                        if &first == b"ECHO" {
                            let mut rest = Vec::new();
                            let _ = c.read_to_end(&mut rest);
                            let _ = c.write_all(&rest);
                            return;
                        }
                        let mut head = first.to_vec();
                        let mut b = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") && c.read_exact(&mut b).is_ok() {
                            head.push(b[0]);
                        }
                        let text = String::from_utf8_lossy(&head).into_owned();
                        let resp = if text.starts_with("GET /readyz") {
                            if r.load(Ordering::SeqCst) {
                                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_owned()
                            } else {
                                "HTTP/1.1 503 No\r\ncontent-length: 0\r\n\r\n".to_owned()
                            }
                        } else {
                            format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                                name.len()
                            )
                        };
                        let _ = c.write_all(resp.as_bytes());
                    });
                }
            });
            Fake { addr, ready, stop }
        }

        fn spec(&self) -> BackendSpec {
            BackendSpec::new(self.addr, None)
        }
    }

    impl Drop for Fake {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            let _ = TcpStream::connect(self.addr);
        }
    }

    /// One request through the balancer on a new connection: the answering backend's name,
    /// or "" if the connection was closed unanswered.
    fn who(b: &Balancer) -> String {
        let mut s = TcpStream::connect(b.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned()
    }

    fn all_ready(b: &Balancer, ids: &[usize]) {
        for id in ids {
            assert!(
                b.wait_ready(*id, true, Duration::from_secs(10)),
                "{id} ready"
            );
        }
    }

    #[test]
    fn round_robin_over_ready_backends_only() {
        let fakes = [Fake::start("a"), Fake::start("b"), Fake::start("c")];
        let b = Balancer::start(&fakes.iter().map(Fake::spec).collect::<Vec<_>>());
        all_ready(&b, &[0, 1, 2]);
        let mut got: Vec<String> = (0..6).map(|_| who(&b)).collect();
        // Each in turn: any three consecutive connections hit three different backends.
        assert_eq!(
            got[..3]
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            3,
            "{got:?}"
        );
        assert_eq!(got[..3], got[3..], "{got:?}");
        got.sort();
        assert_eq!(got, ["a", "a", "b", "b", "c", "c"]);
        let s = b.stats();
        assert!(s.backends.iter().all(|x| x.connections == 2), "{s:?}");

        // b turns unready: new connections go to a and c only.
        fakes[1].ready.store(false, Ordering::SeqCst);
        assert!(b.wait_ready(1, false, Duration::from_secs(10)));
        let got: Vec<String> = (0..4).map(|_| who(&b)).collect();
        assert!(got.iter().all(|g| g == "a" || g == "c"), "{got:?}");
        assert_eq!(got.iter().filter(|g| *g == "a").count(), 2, "{got:?}");
        assert_eq!(b.stats().backend(1).unwrap().connections, 2);

        // None ready: the connection is closed with nothing sent, and counted.
        fakes[0].ready.store(false, Ordering::SeqCst);
        fakes[2].ready.store(false, Ordering::SeqCst);
        assert!(b.wait_ready(0, false, Duration::from_secs(10)));
        assert!(b.wait_ready(2, false, Duration::from_secs(10)));
        assert_eq!(who(&b), "");
        assert_eq!(b.stats().no_backend, 1);

        // c is replaced by a new backend on another port; b comes back.
        let d = Fake::start("d");
        let new = b.replace(2, d.spec());
        fakes[1].ready.store(true, Ordering::SeqCst);
        all_ready(&b, &[1, new]);
        let mut got: Vec<String> = (0..4).map(|_| who(&b)).collect();
        got.sort();
        assert_eq!(got, ["b", "b", "d", "d"]);
        let s = b.stats();
        assert!(s.backend(2).unwrap().removed && !s.backend(2).unwrap().ready);
        assert_eq!(b.id_of(d.addr), Some(new));
    }

    #[test]
    fn copies_bytes_both_ways_and_counts_refused_connects() {
        let e = Fake::start("e");
        let b = Balancer::start(&[e.spec()]);
        all_ready(&b, &[0]);
        let data = crate::pseudo_random(5, 3 << 20);
        let mut s = TcpStream::connect(b.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let sent = data.clone();
        let writer = std::thread::spawn(move || {
            w.write_all(b"ECHO").unwrap();
            w.write_all(&sent).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
        });
        let mut back = Vec::new();
        s.read_to_end(&mut back).unwrap();
        writer.join().unwrap();
        assert!(back == data, "{} bytes back of {}", back.len(), data.len());

        // A backend that is listed ready but refuses: the client's connection just closes.
        let gone = TcpListener::bind("127.0.0.1:0").unwrap();
        let spec = BackendSpec::new(
            gone.local_addr().unwrap(),
            Some(format!("http://{}/readyz", e.addr)),
        );
        drop(gone);
        b.remove(0);
        let id = b.add(spec);
        all_ready(&b, &[id]);
        assert_eq!(who(&b), "");
        let s = b.stats();
        assert_eq!(s.backend(id).unwrap().connect_failures, 1, "{s:?}");
        assert_eq!(s.to_json()["backends"][1]["connect_failures"], 1);
    }

    #[test]
    fn backend_specs_parse() {
        let s = BackendSpec::parse("127.0.0.1:5000,http://127.0.0.1:5001/readyz").unwrap();
        assert_eq!(s.addr, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(
            s.probe_target().unwrap(),
            (
                "127.0.0.1:5001".parse().unwrap(),
                "127.0.0.1:5001".into(),
                "/readyz".into()
            )
        );
        assert_eq!(
            BackendSpec::parse("127.0.0.1:5000")
                .unwrap()
                .probe_target()
                .unwrap()
                .2,
            "/readyz"
        );
        assert!(BackendSpec::parse("nowhere").is_err());
        assert!(BackendSpec::parse("127.0.0.1:5000,https://x:1/").is_err());
    }
}
