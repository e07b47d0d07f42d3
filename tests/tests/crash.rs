//! Crash safety: kill -9 the server while it receives a large chunked upload, a monolithic
//! upload and manifest pushes, at many points. After each restart `fsck` is clean, no partial
//! blob is readable, and the interrupted work can be resumed or retried. Every case runs on a
//! storage directory, on Azure Blob Storage through Azurite (`azblob_*`) and on S3 through
//! moto (`s3_*`).

use std::io::Write;
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use outpost_e2e::emulators::Backend;
use outpost_e2e::scenarios::{fsck_clean, nothing_partial};
use outpost_e2e::{Registry, http, pseudo_random, run_seed, sha256};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MIB: usize = 1024 * 1024;

/// Tiny deterministic generator for kill points.
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

/// Starts a request whose body is sent piece by piece, and returns the socket so the caller
/// can keep writing while the server is killed.
fn start_slow_request(port: u16, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(head.as_bytes()).expect("head");
    s
}

fn upload_offset(reg: &Registry, location: &str) -> u64 {
    let r = http()
        .get(format!("{}{location}", reg.url()))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NO_CONTENT,
        "upload survives a crash"
    );
    let range = r.headers()["range"].to_str().unwrap().to_owned();
    let end: u64 = range.trim_start_matches("0-").parse().unwrap();
    if end == 0 { 0 } else { end + 1 }
}

#[test]
fn kill_during_chunked_upload_at_many_points() {
    chunked_upload_kills(Backend::Fs);
}

#[test]
fn azblob_kill_during_chunked_upload_at_many_points() {
    chunked_upload_kills(Backend::Azurite);
}

#[test]
fn s3_kill_during_chunked_upload_at_many_points() {
    chunked_upload_kills(Backend::Moto);
}

fn chunked_upload_kills(backend: Backend) {
    let seed = run_seed();
    let mut rng = Lcg(seed);
    let data = pseudo_random(seed, 48 * MIB + 12345);
    let digest = sha256(&data);
    let mut reg = Registry::start_on(backend, &[]);
    let c = http();
    let r = c
        .post(format!("{}/v2/crash/big/blobs/uploads/", reg.url()))
        .send()
        .unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_owned();

    let chunk = 6 * MIB;
    let mut kills = 0;
    let mut offset = 0usize;
    let deadline = Instant::now() + Duration::from_secs(240);
    while offset < data.len() {
        assert!(Instant::now() < deadline, "upload did not finish in time");
        let end = (offset + chunk).min(data.len());
        if kills < 8 {
            // Send part of this chunk slowly, then crash the server mid-body.
            let head = format!(
                "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\n\
                 Content-Range: {offset}-{}\r\nContent-Length: {}\r\n\r\n",
                end - 1,
                end - offset
            );
            let mut s = start_slow_request(reg.port, &head);
            let cut = offset + rng.below((end - offset) as u64) as usize;
            let mut sent = offset;
            while sent < cut {
                let n = (cut - sent).min(256 * 1024);
                if s.write_all(&data[sent..sent + n]).is_err() {
                    break;
                }
                sent += n;
            }
            std::thread::sleep(Duration::from_millis(rng.below(50)));
            reg.kill9();
            drop(s);
            kills += 1;
            reg.restart();
            // Nothing of the unfinished blob is visible, the store is consistent, and the
            // upload resumes from what was durably received.
            nothing_partial(&reg, "crash/big", &digest);
            if let Some(o) = &reg.object {
                // The session lives in the container, not in the killed process.
                let keys = o.keys();
                assert!(
                    keys.iter().any(|k| k.starts_with("uploads/")),
                    "no upload session object: {keys:?}"
                );
            }
            fsck_clean(&reg);
            let durable = upload_offset(&reg, &location) as usize;
            assert!(
                durable >= offset && durable <= sent,
                "resume offset {durable} outside [{offset}, {sent}]"
            );
            offset = durable;
            continue;
        }
        let r = c
            .patch(format!("{}{location}", reg.url()))
            .header("content-range", format!("{offset}-{}", end - 1))
            .body(data[offset..end].to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
        offset = end;
    }
    let r = c
        .put(format!("{}{location}?digest={digest}", reg.url()))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "{}",
        r.text().unwrap_or_default()
    );
    let got = c
        .get(format!("{}/v2/crash/big/blobs/{digest}", reg.url()))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(sha256(&got), digest);
    assert_eq!(kills, 8);
    fsck_clean(&reg);
}

#[test]
fn kill_during_monolithic_upload_and_retry() {
    monolithic_upload_kills(Backend::Fs);
}

#[test]
fn azblob_kill_during_monolithic_upload_and_retry() {
    monolithic_upload_kills(Backend::Azurite);
}

#[test]
fn s3_kill_during_monolithic_upload_and_retry() {
    monolithic_upload_kills(Backend::Moto);
}

fn monolithic_upload_kills(backend: Backend) {
    let seed = run_seed();
    let mut rng = Lcg(seed ^ 0xabc);
    let data = pseudo_random(seed ^ 1, 16 * MIB);
    let digest = sha256(&data);
    let mut reg = Registry::start_on(backend, &[]);
    for _ in 0..4 {
        let head = format!(
            "POST /v2/crash/mono/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: x\r\n\
             Content-Length: {}\r\n\r\n",
            data.len()
        );
        let mut s = start_slow_request(reg.port, &head);
        let cut = rng.below(data.len() as u64) as usize;
        let _ = s.write_all(&data[..cut]);
        std::thread::sleep(Duration::from_millis(20));
        reg.kill9();
        drop(s);
        reg.restart();
        nothing_partial(&reg, "crash/mono", &digest);
        if reg.object.is_none() {
            // Interrupted writes leave nothing behind in tmp/ once the server is back.
            assert_eq!(
                std::fs::read_dir(reg.storage.join("tmp")).unwrap().count(),
                0
            );
        }
        fsck_clean(&reg);
    }
    let r = http()
        .post(format!(
            "{}/v2/crash/mono/blobs/uploads/?digest={digest}",
            reg.url()
        ))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
}

fn push_image(
    c: &reqwest::blocking::Client,
    url: &str,
    i: u64,
    shared: &str,
) -> Result<(), String> {
    let config = format!("{{\"n\":{i}}}").into_bytes();
    let cd = sha256(&config);
    let r = c
        .post(format!("{url}/v2/crash/many/blobs/uploads/?digest={cd}"))
        .body(config.clone())
        .send()
        .map_err(|e| e.to_string())?;
    if r.status() != StatusCode::CREATED {
        return Err(format!("config: {}", r.status()));
    }
    let r = c
        .post(format!(
            "{url}/v2/crash/many/blobs/uploads/?mount={shared}&from=crash/base"
        ))
        .send()
        .map_err(|e| e.to_string())?;
    if r.status() != StatusCode::CREATED {
        return Err(format!("mount: {}", r.status()));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": shared, "size": 2 * MIB}],
    }))
    .map_err(|e| e.to_string())?;
    let r = c
        .put(format!("{url}/v2/crash/many/manifests/t{i}"))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(manifest)
        .send()
        .map_err(|e| e.to_string())?;
    if r.status() != StatusCode::CREATED {
        return Err(format!("manifest: {}", r.status()));
    }
    Ok(())
}

/// Every tag resolves to a complete manifest whose blobs are all readable.
fn every_tag_complete(reg: &Registry) -> usize {
    let c = http();
    let r = c
        .get(format!("{}/v2/crash/many/tags/list", reg.url()))
        .send()
        .unwrap();
    if r.status() == StatusCode::NOT_FOUND {
        return 0;
    }
    let v: Value = r.json().unwrap();
    let tags: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
    for t in &tags {
        let r = c
            .get(format!("{}/v2/crash/many/manifests/{t}", reg.url()))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "tag {t} dangles");
        let m: Value = r.json().unwrap();
        for d in std::iter::once(&m["config"]).chain(m["layers"].as_array().unwrap()) {
            let digest = d["digest"].as_str().unwrap();
            let b = c
                .head(format!("{}/v2/crash/many/blobs/{digest}", reg.url()))
                .send()
                .unwrap();
            assert_eq!(b.status(), StatusCode::OK, "tag {t}: blob {digest} missing");
        }
    }
    tags.len()
}

#[test]
fn kill_during_manifest_pushes() {
    manifest_push_kills(Backend::Fs);
}

#[test]
fn azblob_kill_during_manifest_pushes() {
    manifest_push_kills(Backend::Azurite);
}

#[test]
fn s3_kill_during_manifest_pushes() {
    manifest_push_kills(Backend::Moto);
}

fn manifest_push_kills(backend: Backend) {
    let seed = run_seed();
    let mut rng = Lcg(seed ^ 0xdef);
    let mut reg = Registry::start_on(backend, &[]);
    let c = http();
    let shared_data = pseudo_random(seed, 2 * MIB);
    let shared = sha256(&shared_data);
    let r = c
        .post(format!(
            "{}/v2/crash/base/blobs/uploads/?digest={shared}",
            reg.url()
        ))
        .body(shared_data)
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let mut next = 0u64;
    for round in 0..6 {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let url = reg.url();
        let shared2 = shared.clone();
        let (stop2, done2) = (stop.clone(), done.clone());
        let start = next;
        let pusher = std::thread::spawn(move || {
            let c = http();
            let mut i = start;
            // Bounded: stops at the first failure (the crash) or after 10 000 pushes.
            while !stop2.load(Ordering::Relaxed) && i < start + 10_000 {
                if push_image(&c, &url, i, &shared2).is_err() {
                    break;
                }
                i += 1;
                done2.fetch_add(1, Ordering::Relaxed);
            }
            i
        });
        // The kill lands at a random point after one push of this round went through, so
        // each round makes progress however slow the store is (an emulator under load).
        let deadline = Instant::now() + Duration::from_secs(60);
        while done.load(Ordering::Relaxed) == 0 && !pusher.is_finished() {
            assert!(Instant::now() < deadline, "round {round}: no push in 60 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        reg.kill9();
        stop.store(true, Ordering::Relaxed);
        let reached = pusher.join().unwrap();
        reg.restart();
        let complete = every_tag_complete(&reg);
        assert!(complete as u64 >= start, "round {round}: earlier tags lost");
        fsck_clean(&reg);
        // The push that was cut off can simply be retried.
        push_image(&c, &reg.url(), reached, &shared).expect("retry after crash");
        next = reached + 1;
    }
    assert!(next > 6, "pushes made progress between crashes");
}
