//! A highly available registry: several `serve` processes on one Azurite container (one leader
//! by a lease in the store, one bearer token signing key file, upload sessions in the store)
//! behind the suite's round-robin balancer (`outpost_e2e::balancer`, standing in for a
//! Kubernetes Service: new connections only to replicas whose `/readyz` answers 200).
//!
//! - Three replicas: skopeo pushes and pulls through the balancer byte for byte; a chunked
//!   upload whose requests land on different replicas completes; a bearer token from one
//!   replica is accepted by the others.
//! - A rolling restart (SIGTERM with `--shutdown-delay`, a new replica on new ports) while 8
//!   clients pull in a loop, half of them keeping their connection from pull to pull: no pull
//!   fails. Clients resend a request only when its connection was refused or closed before any
//!   byte of a response, as containerd does; those resends are counted and reported.
//! - Two `gc --grace 0s` processes at once, again and again, beside pushes spread over two
//!   replicas (blobs at one, the manifest at the other; every other image deleted): `fsck`
//!   clean, the deleted images' blobs removed, and every image whose push succeeded complete
//!   through both.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use outpost_e2e::balancer::{BackendSpec, Balancer};
use outpost_e2e::emulators::{self, ObjectStorage};
use outpost_e2e::tokens::{bearer_token, full_access_tokens_file};
use outpost_e2e::{Layout, Registry, bin, http, metrics, pseudo_random, run_ok, sha256, skopeo};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";
/// Short, so leadership moves quickly when the leader restarts (as in leader.rs).
const LEASE: &str = "4s";

/// A signing key file shared by the replicas (`token-signing-key generate`).
fn key_file(dir: &Path) -> String {
    let key = run_ok(Command::new(bin("outpost-registry")).args(["token-signing-key", "generate"]));
    let path = dir.join("signing-keys");
    std::fs::write(&path, format!("{}\n", key.trim())).unwrap();
    path.display().to_string()
}

/// Every replica's flags: the shared key, leader election in the store, and `extra`.
fn replica_args(keys: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--token-signing-key-file",
        keys,
        "--leader-election",
        "store",
        "--leader-lease-duration",
        LEASE,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn start(storage: &ObjectStorage, args: &[String]) -> Registry {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Registry::start_on_storage(Some(storage.clone()), &args)
}

/// Waits until the balancer sends connections to every backend in `ids`.
fn wait_all_ready(b: &Balancer, ids: &[usize], replicas: &[&Registry]) {
    for id in ids {
        assert!(
            b.wait_ready(*id, true, Duration::from_secs(60)),
            "backend {id} not ready in 60 s: {:?}\n{}",
            b.stats(),
            logs(replicas)
        );
    }
}

/// The last lines of each replica's log, for failure messages.
fn logs(replicas: &[&Registry]) -> String {
    replicas
        .iter()
        .map(|r| {
            let text = r.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- replica on port {} ---\n{tail}", r.port)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn leader_gauge(r: &Registry) -> Option<f64> {
    let text = http()
        .get(format!("{}/metrics", r.url()))
        .send()
        .ok()?
        .text()
        .ok()?;
    metrics::sample(&text, "outpost_leader")
}

/// Waits (bounded) until exactly one of `rs` reports itself leader.
fn one_leader(rs: &[&Registry]) {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let gauges: Vec<Option<f64>> = rs.iter().map(|r| leader_gauge(r)).collect();
        let leaders = gauges.iter().filter(|g| **g == Some(1.0)).count();
        if leaders == 1 && gauges.iter().all(Option::is_some) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not exactly one leader: {gauges:?}\n{}",
            logs(rs)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Requests per (method, route, status) a replica's metrics count.
fn requests(r: &Registry, method: &str, route: &str, status: u16) -> f64 {
    let text = http()
        .get(format!("{}/metrics", r.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    metrics::samples(&text)
        .into_iter()
        .filter(|s| {
            s.name == "outpost_http_requests_total"
                && s.labels.get("method").map(String::as_str) == Some(method)
                && s.labels.get("route").map(String::as_str) == Some(route)
                && s.labels.get("status").map(String::as_str) == Some(status.to_string().as_str())
        })
        .map(|s| s.value)
        .sum()
}

// ---------------------------------------------------------------------------------------------
// 1. Three replicas behind the balancer.

/// A manifest and its blobs, fetched from `base` with `token`: the first status that is not
/// 200 (or a digest mismatch, as a panic), or 200.
fn pull_with(base: &str, token: &str, repo: &str, reference: &str) -> StatusCode {
    let c = http();
    let r = c
        .get(format!("{base}/v2/{repo}/manifests/{reference}"))
        .bearer_auth(token)
        .header("accept", MEDIA)
        .send()
        .unwrap();
    if r.status() != StatusCode::OK {
        return r.status();
    }
    let m: Value = serde_json::from_slice(&r.bytes().unwrap()).unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
    for l in m["layers"].as_array().unwrap() {
        digests.push(l["digest"].as_str().unwrap().to_owned());
    }
    for d in digests {
        let r = c
            .get(format!("{base}/v2/{repo}/blobs/{d}"))
            .bearer_auth(token)
            .send()
            .unwrap();
        if r.status() != StatusCode::OK {
            return r.status();
        }
        assert_eq!(sha256(&r.bytes().unwrap()), d, "{base}: blob {d}");
    }
    StatusCode::OK
}

#[test]
fn three_replicas_behind_a_balancer_share_images_uploads_and_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, pw) = full_access_tokens_file(dir.path());
    let args = replica_args(&key_file(dir.path()), &["--tokens", &tokens]);
    let storage = emulators::azurite();
    let replicas: Vec<Registry> = (0..3).map(|_| start(&storage, &args)).collect();
    let refs: Vec<&Registry> = replicas.iter().collect();
    let lb = Balancer::start(
        &replicas
            .iter()
            .map(BackendSpec::registry)
            .collect::<Vec<_>>(),
    );
    wait_all_ready(&lb, &[0, 1, 2], &refs);
    one_leader(&refs);

    // skopeo pushes a two-layer image through the balancer (fetching its token from whichever
    // replica the balancer picks) and pulls it back through it, byte for byte.
    let layout = Layout::new(dir.path());
    layout.add_image(
        "base",
        "amd64",
        &[("base.bin", pseudo_random(outpost_e2e::run_seed(), 3 << 20))],
    );
    outpost_e2e::oci::derive_image(
        &layout,
        "base",
        "v1",
        &[("app.bin", pseudo_random(7, 256 * 1024))],
    );
    let creds = format!("ci:{pw}");
    let remote = format!("docker://{}/ha/app:v1", lb.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--dest-creds",
        &creds,
        &format!("oci:{}:v1", layout.path.display()),
        &remote,
    ]);
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &remote,
        &format!("oci:{}:v1", back.display()),
    ]);
    let pushed = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:v1", layout.path.display()),
    ]);
    let pulled = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", back.display())]);
    assert_eq!(sha256(pulled.as_bytes()), sha256(pushed.as_bytes()));
    assert_eq!(pushed, pulled, "the manifest comes back byte for byte");
    let manifest: Value = serde_json::from_str(&pulled).unwrap();
    let layers = manifest["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2, "{manifest}");
    for d in layers.iter().chain([&manifest["config"]]) {
        let d = d["digest"].as_str().unwrap();
        let path = d.replace(':', "/");
        let b = std::fs::read(back.join("blobs").join(&path)).unwrap();
        assert_eq!(sha256(&b), d, "{d} pulled");
        assert!(b == std::fs::read(layout.path.join("blobs").join(&path)).unwrap());
    }
    let after_skopeo = lb.stats();
    eprintln!("connections per replica after skopeo's push and pull: {after_skopeo:?}");

    // A bearer token from replica 0, asked directly, works at 1 and 2 directly; a token that
    // no replica signed does not.
    let token = bearer_token(&replicas[0].url(), &pw, "ha/app");
    for r in &replicas[1..] {
        assert_eq!(pull_with(&r.url(), &token, "ha/app", "v1"), StatusCode::OK);
    }
    // The signature's first character changed: its leading bits differ.
    let (signed, signature) = token.rsplit_once('.').unwrap();
    let flipped = if signature.starts_with('A') { "B" } else { "A" };
    let forged = format!("{signed}.{flipped}{}", &signature[1..]);
    assert_eq!(
        pull_with(&replicas[1].url(), &forged, "ha/app", "v1"),
        StatusCode::UNAUTHORIZED
    );

    // A chunked upload through the balancer, each request on a new connection (a new client
    // per request), so the round robin spreads its requests over the replicas; chunks go on
    // until every replica has taken at least one (bounded), then the PUT completes it.
    let patches_before: Vec<f64> = replicas
        .iter()
        .map(|r| requests(r, "PATCH", "uploads", 202))
        .collect();
    let conns_before = lb.stats();
    let fresh = || {
        reqwest::blocking::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    };
    let token = bearer_token(&replicas[0].url(), &pw, "ha/chunked");
    let r = fresh()
        .post(format!("{}/v2/ha/chunked/blobs/uploads/", lb.url()))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let mut location = outpost_e2e::header(&r, "location");
    const CHUNK: usize = 256 * 1024;
    let mut data = Vec::new();
    let mut chunks = 0;
    let spread = |before: &[f64]| {
        replicas
            .iter()
            .zip(before)
            .map(|(r, b)| requests(r, "PATCH", "uploads", 202) - b)
            .collect::<Vec<f64>>()
    };
    while chunks < 3 || spread(&patches_before).iter().any(|n| *n < 1.0) {
        assert!(
            chunks < 30,
            "30 chunks did not reach every replica: {:?} {:?}",
            spread(&patches_before),
            lb.stats()
        );
        let chunk = pseudo_random(100 + chunks as u64, CHUNK);
        let url = absolute(&lb.url(), &location);
        let r = fresh()
            .patch(url)
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .header(
                "content-range",
                format!("{}-{}", data.len(), data.len() + CHUNK - 1),
            )
            .body(chunk.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "chunk {chunks}");
        data.extend_from_slice(&chunk);
        location = outpost_e2e::header(&r, "location");
        chunks += 1;
    }
    let digest = sha256(&data);
    let url = absolute(&lb.url(), &location);
    let sep = if url.contains('?') { '&' } else { '?' };
    let r = fresh()
        .put(format!("{url}{sep}digest={digest}"))
        .bearer_auth(&token)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED, "{}", r.text().unwrap());
    let patches = spread(&patches_before);
    let conns = lb.stats();
    let per_backend: Vec<u64> = (0..3)
        .map(|id| {
            conns.backend(id).unwrap().connections - conns_before.backend(id).unwrap().connections
        })
        .collect();
    eprintln!(
        "chunked upload: {chunks} chunks; PATCHes per replica {patches:?}; new connections per \
         replica {per_backend:?}"
    );
    assert!(per_backend.iter().all(|n| *n >= 1), "{per_backend:?}");
    assert_eq!(
        per_backend.iter().sum::<u64>(),
        chunks as u64 + 2,
        "one connection per request"
    );
    // The blob reads back whole from every replica, and through the balancer.
    for base in replicas.iter().map(Registry::url).chain([lb.url()]) {
        let r = http()
            .get(format!("{base}/v2/ha/chunked/blobs/{digest}"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{base}");
        assert!(r.bytes().unwrap() == data, "{base}: the blob differs");
    }
}

/// A Location header (relative or absolute) as an absolute URL on `base`.
fn absolute(base: &str, location: &str) -> String {
    if location.starts_with("http") {
        location.to_owned()
    } else {
        format!("{base}{location}")
    }
}

// ---------------------------------------------------------------------------------------------
// 2. A rolling restart under pulls.

/// What became of one request.
enum Outcome {
    Answered {
        status: u16,
        body: Vec<u8>,
    },
    /// Refused, or closed before any byte of a response: nothing was answered, so it may be
    /// sent again (containerd does). The text says which.
    Unanswered(&'static str),
    Failed(String),
}

/// One HTTP/1.1 keep-alive connection, by hand: a library would hide whether any byte of a
/// response arrived before the connection ended, which is what decides a resend.
struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    reused: bool,
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// A GET on `conn` (a new connection to `addr` when there is none); `conn` is dropped when
/// the connection cannot be used again.
fn get(conn: &mut Option<Conn>, addr: SocketAddr, path: &str) -> Outcome {
    if conn.is_none() {
        let s = match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
            Ok(s) => s,
            Err(_) => return Outcome::Unanswered("refused"),
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let _ = s.set_write_timeout(Some(Duration::from_secs(30)));
        let writer = match s.try_clone() {
            Ok(w) => w,
            Err(e) => return Outcome::Failed(format!("socket: {e}")),
        };
        *conn = Some(Conn {
            reader: BufReader::new(s),
            writer,
            reused: false,
        });
    }
    let Some(c) = conn.as_mut() else {
        return Outcome::Failed("no connection".into());
    };
    let unanswered = if c.reused {
        "closed unanswered (kept-alive connection)"
    } else {
        "closed unanswered (new connection)"
    };
    c.reused = true;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {MEDIA}\r\n\r\n");
    let outcome = read_response(c, req.as_bytes(), unanswered);
    let keep = matches!(&outcome, Outcome::Answered { .. }) && c.reused;
    if !keep {
        *conn = None;
    }
    outcome
}

/// Sends `req` and reads the response; marks the connection not reusable (`reused` false)
/// when the server closes it after this response.
fn read_response(c: &mut Conn, req: &[u8], unanswered: &'static str) -> Outcome {
    if c.writer.write_all(req).is_err() {
        return Outcome::Unanswered(unanswered);
    }
    let mut line = String::new();
    match c.reader.read_line(&mut line) {
        Ok(0) => return Outcome::Unanswered(unanswered),
        Err(e) if line.is_empty() && !timed_out(&e) => return Outcome::Unanswered(unanswered),
        Err(e) => return Outcome::Failed(format!("reading the status line: {e}")),
        Ok(_) => {}
    }
    let status: u16 = match line.split_whitespace().nth(1).and_then(|s| s.parse().ok()) {
        Some(s) if line.starts_with("HTTP/1.") => s,
        _ => return Outcome::Failed(format!("bad status line {line:?}")),
    };
    let (mut length, mut chunked, mut close) = (None, false, false);
    for _ in 0..200 {
        let mut h = String::new();
        match c.reader.read_line(&mut h) {
            Ok(0) => return Outcome::Failed("closed within the headers".into()),
            Err(e) => return Outcome::Failed(format!("reading headers: {e}")),
            Ok(_) => {}
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Outcome::Failed(format!("bad header {h:?}"));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse::<usize>().ok(),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    let read = if chunked {
        read_chunked(&mut c.reader, &mut body)
    } else if let Some(n) = length {
        body.resize(n, 0);
        c.reader.read_exact(&mut body).map_err(|e| e.to_string())
    } else {
        close = true;
        c.reader
            .read_to_end(&mut body)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    if let Err(e) = read {
        return Outcome::Failed(format!("HTTP {status}: body cut short: {e}"));
    }
    if close {
        c.reused = false;
    }
    Outcome::Answered { status, body }
}

fn read_chunked(r: &mut BufReader<TcpStream>, body: &mut Vec<u8>) -> Result<(), String> {
    for _ in 0..1_000_000 {
        let mut size = String::new();
        r.read_line(&mut size).map_err(|e| e.to_string())?;
        let hex = size.trim().split(';').next().unwrap_or_default();
        let n = usize::from_str_radix(hex, 16).map_err(|_| format!("chunk size {size:?}"))?;
        if n == 0 {
            // Trailers, up to the blank line.
            loop {
                let mut t = String::new();
                if r.read_line(&mut t).map_err(|e| e.to_string())? == 0 || t.trim().is_empty() {
                    return Ok(());
                }
            }
        }
        let start = body.len();
        body.resize(start + n, 0);
        r.read_exact(&mut body[start..])
            .map_err(|e| e.to_string())?;
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf).map_err(|e| e.to_string())?;
    }
    Err("too many chunks".into())
}

/// Counts shared by the pulling clients.
#[derive(Default)]
struct PullCounts {
    pulls: AtomicU64,
    failed: AtomicU64,
    requests: AtomicU64,
    /// Resends, by why the first try went unanswered.
    resent: Mutex<BTreeMap<&'static str, u64>>,
    /// The first failures, for the assertion message.
    failures: Mutex<Vec<String>>,
}

/// GET with resends of unanswered requests only (bounded: 40 tries within 30 s).
fn get_resending(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    path: &str,
    counts: &PullCounts,
) -> Result<(u16, Vec<u8>), String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for attempt in 0..40 {
        counts.requests.fetch_add(1, Ordering::Relaxed);
        match get(conn, addr, path) {
            Outcome::Answered { status, body } => return Ok((status, body)),
            Outcome::Failed(e) => return Err(format!("GET {path}: {e}")),
            Outcome::Unanswered(why) => {
                *counts
                    .resent
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(why)
                    .or_default() += 1;
                if Instant::now() > deadline {
                    return Err(format!("GET {path}: unanswered for 30 s ({why})"));
                }
                // A kept-alive connection the server closed is resent at once (as Go's HTTP
                // client does); otherwise a short pause, as a client's backoff.
                if attempt > 0 || why == "refused" || !why.contains("kept-alive") {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }
    Err(format!("GET {path}: unanswered 40 times"))
}

/// An image in the registry: its manifest and blobs.
struct Image {
    repo: String,
    tag: String,
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
}

/// One pull through `addr` on `conn` (a new connection if there is none or it ends): the
/// manifest byte for byte, then every blob by digest.
fn pull_once(
    conn: &mut Option<Conn>,
    addr: SocketAddr,
    img: &Image,
    counts: &PullCounts,
) -> Result<(), String> {
    let (status, body) = get_resending(
        conn,
        addr,
        &format!("/v2/{}/manifests/{}", img.repo, img.tag),
        counts,
    )?;
    if status != 200 {
        return Err(format!("manifest: HTTP {status}"));
    }
    if sha256(&body) != sha256(&img.manifest) {
        return Err("manifest differs".into());
    }
    for (digest, data) in &img.blobs {
        let (status, body) = get_resending(
            conn,
            addr,
            &format!("/v2/{}/blobs/{digest}", img.repo),
            counts,
        )?;
        if status != 200 {
            return Err(format!("blob {digest}: HTTP {status}"));
        }
        if sha256(&body) != *digest || body.len() != data.len() {
            return Err(format!("blob {digest}: digest mismatch"));
        }
    }
    Ok(())
}

/// Pushes an image of a config and `layers` random layers to `base` (anonymous).
fn push_image(base: &str, repo: &str, tag: &str, seed: u64, layers: &[usize]) -> Image {
    let c = http();
    let mut blobs = vec![(
        String::new(),
        format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes(),
    )];
    for (i, n) in layers.iter().enumerate() {
        blobs.push((String::new(), pseudo_random(seed + 1 + i as u64, *n)));
    }
    for (digest, data) in &mut blobs {
        *digest = sha256(data);
        let r = c
            .post(format!("{base}/v2/{repo}/blobs/uploads/?digest={digest}"))
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let manifest = manifest_of(&blobs);
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{tag}"))
        .header("content-type", MEDIA)
        .body(manifest.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    Image {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        manifest,
        blobs,
    }
}

/// An image manifest: the first blob is the config, the others layers.
fn manifest_of(blobs: &[(String, Vec<u8>)]) -> Vec<u8> {
    let desc = |(d, data): &(String, Vec<u8>), media: &str| json!({"mediaType": media, "digest": d, "size": data.len()});
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA,
        "config": desc(&blobs[0], "application/vnd.oci.image.config.v1+json"),
        "layers": blobs[1..].iter()
            .map(|b| desc(b, "application/vnd.oci.image.layer.v1.tar"))
            .collect::<Vec<_>>(),
    }))
    .unwrap()
}

/// Sets the flag when dropped: the threads a test started stop even when it fails midway.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

const CLIENTS: usize = 8;
/// How long the clients pull, and the pushes and gc runs go on.
const RUN_FOR: Duration = Duration::from_secs(60);

#[test]
fn a_rolling_restart_under_eight_pulling_clients_fails_no_pull() {
    let dir = tempfile::tempdir().unwrap();
    let args = replica_args(&key_file(dir.path()), &["--shutdown-delay", "2s"]);
    let storage = emulators::azurite();
    let mut replicas: Vec<Registry> = (0..3).map(|_| start(&storage, &args)).collect();
    let lb = Balancer::start(
        &replicas
            .iter()
            .map(BackendSpec::registry)
            .collect::<Vec<_>>(),
    );
    let mut ids = vec![0, 1, 2];
    wait_all_ready(&lb, &ids, &replicas.iter().collect::<Vec<_>>());
    let img = Arc::new(push_image(
        &lb.url(),
        "ha/pulled",
        "v1",
        outpost_e2e::run_seed(),
        &[512 * 1024, 64 * 1024, 4 * 1024],
    ));

    let counts = Arc::new(PullCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    let began = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (img, counts, stop, addr) = (img.clone(), counts.clone(), stop.clone(), lb.addr());
            std::thread::spawn(move || {
                // Half the clients keep their connection from pull to pull for as long as the
                // server keeps it open, as containerd's connection pool does (so a replica
                // shutting down still gets their requests until it closes the connection);
                // the others open one per pull, which the balancer spreads.
                let keep = i % 2 == 0;
                let mut conn = None;
                // Bounded by the stop flag, a hard deadline and a count.
                let deadline = Instant::now() + RUN_FOR + Duration::from_secs(120);
                for _ in 0..100_000 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    if !keep {
                        conn = None;
                    }
                    match pull_once(&mut conn, addr, &img, &counts) {
                        Ok(()) => counts.pulls.fetch_add(1, Ordering::SeqCst),
                        Err(e) => {
                            conn = None;
                            let mut f = counts.failures.lock().unwrap_or_else(|e| e.into_inner());
                            if f.len() < 20 {
                                f.push(format!("{:.1}s: {e}", began.elapsed().as_secs_f64()));
                            }
                            counts.failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                    std::thread::sleep(Duration::from_millis(10));
                }
            })
        })
        .collect();

    // Rolling restarts, one replica at a time, for as long as the clients pull (at least one
    // round, at most four): SIGTERM, the balancer sees it unready, it exits, a new replica on
    // new ports takes its place and gets traffic once ready.
    std::thread::sleep(Duration::from_secs(3));
    let mut retired: Vec<Registry> = Vec::new();
    let mut unready_after = Vec::new();
    let mut restarted = [0u32; 3];
    for k in 0..12 {
        if k >= 3 && began.elapsed() > RUN_FOR - Duration::from_secs(15) {
            break;
        }
        let slot = k % 3;
        let signalled = Instant::now();
        replicas[slot].sigterm();
        let seen = lb.wait_ready(ids[slot], false, Duration::from_secs(30));
        unready_after.push(signalled.elapsed());
        assert!(seen, "the balancer still sends to a replica shutting down");
        let status = replicas[slot].wait_exit(Duration::from_secs(60));
        assert!(
            status.success(),
            "exit {status}\n{}",
            logs(&[&replicas[slot]])
        );
        let fresh = start(&storage, &args);
        let id = lb.replace(ids[slot], BackendSpec::registry(&fresh));
        wait_all_ready(&lb, &[id], &[&fresh]);
        ids[slot] = id;
        retired.push(std::mem::replace(&mut replicas[slot], fresh));
        restarted[slot] += 1;
        // The new replica takes connections before the next goes.
        let deadline = Instant::now() + Duration::from_secs(30);
        while lb.stats().backend(id).is_none_or(|b| b.connections == 0) {
            assert!(
                Instant::now() < deadline,
                "no connection to the new replica"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    while began.elapsed() < RUN_FOR {
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().unwrap();
    }

    let stats = lb.stats();
    let resent = counts.resent.lock().unwrap().clone();
    let failures = counts.failures.lock().unwrap().clone();
    let (pulls, failed) = (
        counts.pulls.load(Ordering::SeqCst),
        counts.failed.load(Ordering::SeqCst),
    );
    eprintln!(
        "rolling restart: {} restarts {restarted:?}; {pulls} pulls ok, {failed} failed, {} \
         requests, resent {resent:?}; unready in the balancer after SIGTERM: \
         {unready_after:?}; balancer: no backend {}, per backend (connections, refused): {:?}",
        restarted.iter().sum::<u32>(),
        counts.requests.load(Ordering::SeqCst),
        stats.no_backend,
        stats
            .backends
            .iter()
            .map(|b| (b.connections, b.connect_failures))
            .collect::<Vec<_>>()
    );
    let all: Vec<&Registry> = retired.iter().chain(replicas.iter()).collect();
    assert_eq!(failed, 0, "failed pulls: {failures:#?}\n{}", logs(&all));
    assert!(
        restarted.iter().all(|n| *n >= 1),
        "every replica restarted: {restarted:?}"
    );
    assert!(pulls >= CLIENTS as u64, "{pulls} pulls in a minute");
    // Every replica, the new ones too, served pulls.
    for id in &ids {
        assert!(
            stats.backend(*id).unwrap().connections > 0,
            "replica {id} got no connection: {stats:?}"
        );
    }
    one_leader(&replicas.iter().collect::<Vec<_>>());
}

// ---------------------------------------------------------------------------------------------
// 3. Two gc processes at once beside pushes over two replicas.

/// One image pushed by a pusher thread: blobs uploaded at one replica, the manifest put at
/// the other.
struct Pushed {
    tag: String,
    manifest: Vec<u8>,
    blobs: Vec<(String, Vec<u8>)>,
    deleted: bool,
}

#[derive(Default)]
struct PushCounts {
    /// Manifests refused because gc took a blob (MANIFEST_BLOB_UNKNOWN): the blobs are
    /// uploaded again, as the README says a client does.
    refused: AtomicU64,
    /// 503 answers while gc held the lease too long: tried again.
    unavailable: AtomicU64,
    /// Blob uploads answered 404 BLOB_UNKNOWN (found stored, then swept before linked).
    upload_swept: AtomicU64,
}

const REPO: &str = "ha/gc";

/// Pushes `blobs` (HEAD first, as clients do: a blob already there is not uploaded) at
/// `up`, then the manifest at `put`, uploading again while gc takes blobs; bounded.
fn push_across(
    up: &Registry,
    put: &Registry,
    tag: &str,
    blobs: &[(String, Vec<u8>)],
    counts: &PushCounts,
) -> Vec<u8> {
    let c = http();
    let manifest = manifest_of(blobs);
    let deadline = Instant::now() + Duration::from_secs(150);
    let mut check_first = true;
    for _ in 0..60 {
        assert!(Instant::now() < deadline, "{tag} not pushed in 150 s");
        for (d, data) in blobs {
            if check_first {
                let r = c
                    .head(format!("{}/v2/{REPO}/blobs/{d}", up.url()))
                    .send()
                    .unwrap();
                if r.status() == StatusCode::OK {
                    continue;
                }
            }
            let r = c
                .post(format!("{}/v2/{REPO}/blobs/uploads/?digest={d}", up.url()))
                .header("content-type", "application/octet-stream")
                .body(data.clone())
                .send()
                .unwrap();
            let st = r.status();
            let text = r.text().unwrap_or_default();
            match st {
                StatusCode::CREATED => {}
                StatusCode::NOT_FOUND if text.contains("BLOB_UNKNOWN") => {
                    counts.upload_swept.fetch_add(1, Ordering::Relaxed);
                }
                StatusCode::SERVICE_UNAVAILABLE => {
                    counts.unavailable.fetch_add(1, Ordering::Relaxed);
                }
                other => panic!("upload {d} for {tag}: {other} {text}"),
            }
        }
        let r = c
            .put(format!("{}/v2/{REPO}/manifests/{tag}", put.url()))
            .header("content-type", MEDIA)
            .body(manifest.clone())
            .send()
            .unwrap();
        let st = r.status();
        let text = r.text().unwrap_or_default();
        match st {
            StatusCode::CREATED => return manifest,
            StatusCode::BAD_REQUEST if text.contains("MANIFEST_BLOB_UNKNOWN") => {
                counts.refused.fetch_add(1, Ordering::Relaxed);
                check_first = false;
            }
            StatusCode::SERVICE_UNAVAILABLE => {
                counts.unavailable.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
            other => panic!("manifest {tag}: {other} {text}"),
        }
    }
    panic!("{tag} not pushed in 60 attempts");
}

/// N of the `gc: removed N blobs (…)` line of a gc run's output.
fn removed_blobs(out: &str) -> u64 {
    out.lines()
        .find_map(|l| l.strip_prefix("gc: removed "))
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no removed count in {out:?}"))
}

#[test]
fn two_gc_processes_at_once_beside_pushes_over_two_replicas_keep_every_pushed_image() {
    let dir = tempfile::tempdir().unwrap();
    let args = replica_args(&key_file(dir.path()), &[]);
    let storage = emulators::azurite();
    let replicas = Arc::new([start(&storage, &args), start(&storage, &args)]);
    let seed = outpost_e2e::run_seed();
    // One layer every image shares (clients skip it once a HEAD finds it).
    let base = Arc::new(pseudo_random(seed, 128 * 1024));
    let counts = Arc::new(PushCounts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(stop.clone());
    const PUSHERS: u64 = 3;
    let pushers: Vec<_> = (0..PUSHERS)
        .map(|t| {
            let (rs, base, counts, stop) =
                (replicas.clone(), base.clone(), counts.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut pushed: Vec<Pushed> = Vec::new();
                let deadline = Instant::now() + RUN_FOR + Duration::from_secs(60);
                for n in 0..10_000u64 {
                    if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                        break;
                    }
                    let s = seed.wrapping_add(1000 * (t + 1) + 2 * n);
                    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{s}}}"#);
                    let blobs: Vec<(String, Vec<u8>)> = [
                        config.into_bytes(),
                        base.to_vec(),
                        pseudo_random(s, 16 * 1024),
                    ]
                    .into_iter()
                    .map(|d| (sha256(&d), d))
                    .collect();
                    // Blobs at one replica, the manifest at the other, alternating.
                    let (up, put) = if (n + t) % 2 == 0 {
                        (&rs[0], &rs[1])
                    } else {
                        (&rs[1], &rs[0])
                    };
                    let tag = format!("p{t}-{n}");
                    let manifest = push_across(up, put, &tag, &blobs, &counts);
                    // Every other image is deleted right away: garbage for gc to take.
                    let deleted = n % 2 == 1;
                    if deleted {
                        let r = http()
                            .delete(format!(
                                "{}/v2/{REPO}/manifests/{}",
                                up.url(),
                                sha256(&manifest)
                            ))
                            .send()
                            .unwrap();
                        assert_eq!(r.status(), StatusCode::ACCEPTED, "delete {tag}");
                    }
                    pushed.push(Pushed {
                        tag,
                        manifest,
                        blobs,
                        deleted,
                    });
                }
                pushed
            })
        })
        .collect();

    // Two gc processes, one configured as each replica is, started together (so their first
    // runs overlap: one waits for the other's lease) and then again and again with short
    // pauses, for the minute.
    let began = Instant::now();
    let together = Arc::new(Barrier::new(2));
    let gcs: Vec<_> = (0..2usize)
        .map(|i| {
            let (rs, stop, together) = (replicas.clone(), stop.clone(), together.clone());
            std::thread::spawn(move || {
                let mut runs: Vec<(Instant, Instant, u64)> = Vec::new();
                together.wait();
                for _ in 0..40 {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let t0 = Instant::now();
                    let out = rs[i].cli(&["gc", "--grace", "0s"]);
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    assert!(
                        out.status.success(),
                        "gc {i}: {text}{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    runs.push((t0, Instant::now(), removed_blobs(&text)));
                    // A pause between runs, so the other process and the pushes get the lease
                    // too (a waiting gc backs off up to 5 s between looks).
                    std::thread::sleep(Duration::from_secs(1));
                }
                runs
            })
        })
        .collect();
    // A pusher that ends early has panicked: its join below reports it.
    while began.elapsed() < RUN_FOR && !pushers.iter().any(|p| p.is_finished()) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::SeqCst);
    let runs: Vec<Vec<(Instant, Instant, u64)>> =
        gcs.into_iter().map(|g| g.join().unwrap()).collect();
    let images: Vec<Pushed> = pushers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    // Runs of the two processes that were alive at the same time.
    let overlaps = runs[0]
        .iter()
        .filter(|a| runs[1].iter().any(|b| a.0 < b.1 && b.0 < a.1))
        .count();
    let removed_beside: u64 = runs.iter().flatten().map(|r| r.2).sum();
    // One more run with nothing pushing: every deleted image's blobs go now at the latest.
    let out = replicas[0].cli(&["gc", "--grace", "0s"]);
    assert!(out.status.success());
    let removed = removed_beside + removed_blobs(&String::from_utf8_lossy(&out.stdout));
    let deleted = images.iter().filter(|p| p.deleted).count() as u64;
    eprintln!(
        "gc beside pushes: gc runs {:?} ({overlaps} overlapping), {removed_beside} blobs removed \
         beside pushes, {removed} in all; {} images pushed ({deleted} deleted); manifests \
         refused {}, 503s {}, uploads swept {}",
        runs.iter().map(Vec::len).collect::<Vec<_>>(),
        images.len(),
        counts.refused.load(Ordering::SeqCst),
        counts.unavailable.load(Ordering::SeqCst),
        counts.upload_swept.load(Ordering::SeqCst),
    );
    assert!(overlaps >= 1, "the two gc processes never ran at once");
    assert!(runs.iter().all(|r| !r.is_empty()), "{runs:?}");
    assert!(
        images.len() as u64 >= 2 * PUSHERS,
        "{} images",
        images.len()
    );
    // Each deleted image's config, layer and manifest are garbage.
    assert!(
        deleted >= 1 && removed >= 3 * deleted,
        "{removed} blobs removed, {deleted} images deleted"
    );

    let out = replicas[1].cli(&["fsck"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(", 0 problems"),
        "fsck: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every image kept is complete through both replicas; the deleted ones are gone.
    let c = http();
    for r in replicas.iter() {
        for p in &images {
            let resp = c
                .get(format!("{}/v2/{REPO}/manifests/{}", r.url(), p.tag))
                .header("accept", MEDIA)
                .send()
                .unwrap();
            if p.deleted {
                assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{} deleted", p.tag);
                continue;
            }
            assert_eq!(resp.status(), StatusCode::OK, "{} at {}", p.tag, r.url());
            assert!(resp.bytes().unwrap() == p.manifest, "{}", p.tag);
            for (d, data) in &p.blobs {
                let resp = c
                    .get(format!("{}/v2/{REPO}/blobs/{d}", r.url()))
                    .send()
                    .unwrap();
                assert_eq!(resp.status(), StatusCode::OK, "{}: {d}", p.tag);
                let got = resp.bytes().unwrap();
                assert!(sha256(&got) == *d && got == *data, "{}: {d}", p.tag);
            }
        }
    }
}
