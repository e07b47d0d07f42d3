//! `outpost-registry gc` and `fsck` on a running store: every case on a storage directory
//! (module `fs`), on Azure Blob Storage through Azurite (module `azblob`) and on S3 through
//! moto (module `s3`), a fresh container or bucket per case.

use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::collections::BTreeSet;

use outpost_e2e::emulators::{Backend, ObjectStorage};
use outpost_e2e::oci::{admin_status, stage, staging_get, sync_now};
use outpost_e2e::scenarios::{fsck_clean, outpost_on};
use outpost_e2e::{Registry, bin, http, pseudo_random, run_timeout, sha256};
use reqwest::StatusCode;
use serde_json::json;

struct Pushed {
    manifest: String,
    manifest_bytes: Vec<u8>,
    config: String,
    config_bytes: Vec<u8>,
    layer: String,
    layer_bytes: Vec<u8>,
}

fn push(reg: &Registry, repo: &str, tag: &str, seed: u64) -> Pushed {
    let c = http();
    let blob = |data: &[u8]| {
        let d = sha256(data);
        let r = c
            .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", reg.url()))
            .body(data.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        d
    };
    let config_bytes = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer_bytes = pseudo_random(seed, 50_000);
    let config = blob(&config_bytes);
    let layer = blob(&layer_bytes);
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": config_bytes.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 50_000}],
    }))
    .unwrap();
    let r = c
        .put(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
        .header("content-type", "application/vnd.oci.image.manifest.v1+json")
        .body(m.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    Pushed {
        manifest: sha256(&m),
        manifest_bytes: m,
        config,
        config_bytes,
        layer,
        layer_bytes,
    }
}

fn status(reg: &Registry, repo: &str, digest: &str) -> StatusCode {
    http()
        .get(format!("{}/v2/{repo}/blobs/{digest}", reg.url()))
        .send()
        .unwrap()
        .status()
}

/// A blob's path under the storage root: `blobs/sha256/<hex[..2]>/<hex>`, the same on disk
/// and as an object key under the prefix.
fn blob_rel(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    format!("blobs/sha256/{}/{hex}", &hex[..2])
}

/// Whether the blob's content is in the store (a file, or an object in the bucket).
fn blob_stored(reg: &Registry, digest: &str) -> bool {
    match &reg.object {
        Some(o) => o.keys().contains(&blob_rel(digest)),
        None => reg.storage.join(blob_rel(digest)).exists(),
    }
}

/// Whether no maintenance lease is left in the bucket.
fn no_lease_left(reg: &Registry) -> bool {
    reg.object
        .as_ref()
        .is_none_or(|o| !o.keys().iter().any(|k| k.starts_with("locks/")))
}

/// Replaces a blob's content behind the registry's back.
fn overwrite_blob(reg: &Registry, digest: &str, data: Vec<u8>) {
    match &reg.object {
        Some(o) => o.put_object(&blob_rel(digest), data),
        None => std::fs::write(reg.storage.join(blob_rel(digest)), data).unwrap(),
    }
}

/// Removes a blob's content behind the registry's back.
fn lose_blob(reg: &Registry, digest: &str) {
    match &reg.object {
        Some(o) => o.delete_object(&blob_rel(digest)),
        None => std::fs::remove_file(reg.storage.join(blob_rel(digest))).unwrap(),
    }
}

fn cli_ok(reg: &Registry, args: &[&str]) -> String {
    let out = reg.cli(args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// The counts of the `store requests: N (op n, …)` line: the total and each operation. `None`
/// if there is no such line (a directory); panics if the parts do not add up to the total.
fn store_requests(out: &str) -> Option<(u64, Vec<(String, u64)>)> {
    let line = out
        .lines()
        .find_map(|l| l.strip_prefix("store requests: "))?;
    let (total, parts) = line
        .split_once(" (")
        .unwrap_or_else(|| panic!("requests line: {line}"));
    let total: u64 = total.parse().unwrap_or_else(|_| panic!("total: {line}"));
    let parts: Vec<(String, u64)> = parts
        .strip_suffix(')')
        .unwrap_or_else(|| panic!("requests line: {line}"))
        .split(", ")
        .map(|p| {
            let (op, n) = p.split_once(' ').unwrap_or_else(|| panic!("part {p}"));
            (
                op.to_owned(),
                n.parse().unwrap_or_else(|_| panic!("part {p}")),
            )
        })
        .collect();
    assert_eq!(
        parts.iter().map(|(_, n)| n).sum::<u64>(),
        total,
        "operations add up to the total: {line}"
    );
    Some((total, parts))
}

fn count(parts: &[(String, u64)], op: &str) -> u64 {
    parts.iter().find(|(o, _)| o == op).map_or(0, |(_, n)| *n)
}

/// Each case is a function of a backend; this makes one test of it per backend.
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod fs {
            $(#[test]
            fn $case() {
                super::$case(super::Backend::Fs);
            })*
        }
        mod azblob {
            $(#[test]
            fn $case() {
                super::$case(super::Backend::Azurite);
            })*
        }
        mod s3 {
            $(#[test]
            fn $case() {
                super::$case(super::Backend::Moto);
            })*
        }
    };
}

on_every_backend!(
    gc_removes_only_unreferenced_blobs,
    gc_delete_untagged_removes_exactly_the_unreachable_manifests,
    gc_delete_untagged_beside_pushes_by_digest_then_tag_loses_nothing,
    gc_while_pushing_keeps_every_pushed_image,
    fsck_reports_corruption_and_missing_blobs,
);

// On a directory the flock holds pushes off; on object storage, the maintenance lease.
#[test]
fn fs_gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest() {
    gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest(Backend::Fs);
}

#[test]
fn azblob_gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest() {
    gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest(Backend::Azurite);
}

#[test]
fn s3_gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest() {
    gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest(Backend::Moto);
}

fn gc_removes_only_unreferenced_blobs(backend: Backend) {
    let reg = Registry::start_on(backend, &[]);
    let kept = push(&reg, "gc/kept", "v1", 1);
    let dropped = push(&reg, "gc/dropped", "v1", 2);
    // An orphan blob with no manifest.
    let orphan_data = pseudo_random(3, 1000);
    let orphan = sha256(&orphan_data);
    http()
        .post(format!(
            "{}/v2/gc/orphan/blobs/uploads/?digest={orphan}",
            reg.url()
        ))
        .body(orphan_data)
        .send()
        .unwrap();
    // Drop the second image's manifest: its config and layer become unreferenced.
    let r = http()
        .delete(format!(
            "{}/v2/gc/dropped/manifests/{}",
            reg.url(),
            dropped.manifest
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);

    // Within the grace period nothing goes.
    let out = cli_ok(&reg, &["gc"]);
    assert!(out.contains("removed 0 blobs"), "{out}");
    // A dry run says what would go and removes nothing.
    let out = cli_ok(&reg, &["gc", "--grace", "0", "--dry-run"]);
    assert!(out.contains("would remove 4 blobs"), "{out}");
    assert_eq!(status(&reg, "gc/orphan", &orphan), StatusCode::OK);
    match store_requests(&out) {
        // A dry run only reads.
        Some((_, parts)) => {
            assert!(reg.object.is_some(), "{out}");
            assert!(count(&parts, "list") > 0, "{out}");
            for op in ["delete", "put"] {
                assert_eq!(count(&parts, op), 0, "{op} in a dry run: {out}");
            }
        }
        None => assert!(
            reg.object.is_none(),
            "no request count on object storage: {out}"
        ),
    }
    for d in [&dropped.config, &dropped.layer, &dropped.manifest, &orphan] {
        assert!(blob_stored(&reg, d), "{d} still stored after a dry run");
    }

    let out = cli_ok(&reg, &["gc", "--grace", "0"]);
    // The links of gc/dropped's config, layer and manifest, and gc/orphan's, went with them.
    assert!(
        out.contains("removed 4 blobs") && out.contains("removed 4 stale repository links"),
        "{out}"
    );
    if reg.object.is_some() {
        let (_, parts) = store_requests(&out).expect("request count on object storage");
        assert!(count(&parts, "delete") >= 4, "one delete per blob: {out}");
    }
    // With nothing to remove, a run costs listings and manifest reads, nothing per blob: the
    // only write and delete are the maintenance lease's (created, then deleted).
    let out = cli_ok(&reg, &["gc", "--grace", "0"]);
    assert!(out.contains("removed 0 blobs"), "{out}");
    if reg.object.is_some() {
        let (_, parts) = store_requests(&out).expect("request count on object storage");
        assert_eq!(
            count(&parts, "head"),
            0,
            "head with nothing to remove: {out}"
        );
        for op in ["delete", "put"] {
            assert_eq!(count(&parts, op), 1, "{op}: only the lease's: {out}");
        }
        assert!(no_lease_left(&reg), "the lease is gone after the run");
    }
    for d in [&dropped.config, &dropped.layer, &dropped.manifest, &orphan] {
        assert!(!blob_stored(&reg, d), "{d} removed");
    }
    assert_eq!(status(&reg, "gc/orphan", &orphan), StatusCode::NOT_FOUND);
    assert_eq!(
        status(&reg, "gc/dropped", &dropped.layer),
        StatusCode::NOT_FOUND
    );
    // The kept image pulls whole and unchanged.
    let c = http();
    let r = c
        .get(format!("{}/v2/gc/kept/manifests/v1", reg.url()))
        .header("accept", "application/vnd.oci.image.manifest.v1+json")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.bytes().unwrap().as_ref(), kept.manifest_bytes.as_slice());
    for (d, data) in [
        (&kept.config, &kept.config_bytes),
        (&kept.layer, &kept.layer_bytes),
    ] {
        assert!(blob_stored(&reg, d), "{d} kept");
        let r = c
            .get(format!("{}/v2/gc/kept/blobs/{d}", reg.url()))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{d} kept");
        assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice(), "{d} intact");
    }
    let out = cli_ok(&reg, &["fsck"]);
    assert!(out.contains(", 0 problems"), "{out}");
}

fn gc_while_pushing_keeps_every_pushed_image(backend: Backend) {
    let reg = Arc::new(Registry::start_on(backend, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (r2, s2, d2) = (reg.clone(), stop.clone(), done.clone());
    let pusher = std::thread::spawn(move || {
        let mut n = 0u64;
        while !s2.load(Ordering::Relaxed) && n < 2000 {
            push(&r2, "busy/app", &format!("t{n}"), 100 + n);
            n += 1;
            d2.store(n, Ordering::Relaxed);
        }
        n
    });
    // At least five runs, and runs until pushes went on beside them (a slow store under load
    // may not finish one push within five runs).
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut runs = 0;
    while runs < 5 || (done.load(Ordering::Relaxed) < 3 && !pusher.is_finished()) {
        assert!(Instant::now() < deadline, "no pushes beside gc in 120 s");
        cli_ok(&reg, &["gc"]);
        runs += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let pushed = pusher.join().unwrap();
    assert!(pushed > 0);
    let out = cli_ok(&reg, &["fsck"]);
    assert!(out.contains(", 0 problems"), "{out}");
    let r = http()
        .get(format!(
            "{}/v2/busy/app/manifests/t{}",
            reg.url(),
            pushed - 1
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
}

/// Pushes `p`'s manifest again without uploading its blobs first (they are in the store, old
/// and unreferenced). The registry may refuse (a gc took a blob: the client uploads it again)
/// or ask to retry (503 while gc holds the lock); returns how many attempts it took.
fn push_reusing(reg: &Registry, repo: &str, tag: &str, p: &Pushed) -> u32 {
    let c = http();
    let deadline = Instant::now() + Duration::from_secs(120);
    for attempt in 1..=40 {
        assert!(
            Instant::now() < deadline,
            "{repo}:{tag} not pushed in 120 s"
        );
        let r = c
            .put(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(p.manifest_bytes.clone())
            .send()
            .unwrap();
        let status = r.status();
        let body = r.text().unwrap_or_default();
        match status {
            StatusCode::CREATED => return attempt,
            StatusCode::BAD_REQUEST if body.contains("MANIFEST_BLOB_UNKNOWN") => {
                for (d, data) in [(&p.config, &p.config_bytes), (&p.layer, &p.layer_bytes)] {
                    let r = c
                        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", reg.url()))
                        .body(data.clone())
                        .send()
                        .unwrap();
                    let st = r.status();
                    let text = r.text().unwrap_or_default();
                    // --grace 0s spares no upload: a blob found already stored can be swept
                    // before it is linked (404 BLOB_UNKNOWN); the next attempt uploads again.
                    assert!(
                        st == StatusCode::CREATED
                            || (st == StatusCode::NOT_FOUND && text.contains("BLOB_UNKNOWN")),
                        "upload {d}: {st} {text}"
                    );
                }
            }
            StatusCode::SERVICE_UNAVAILABLE => std::thread::sleep(Duration::from_millis(200)),
            other => panic!("push {repo}:{tag}: {other} {body}"),
        }
    }
    panic!("{repo}:{tag} not pushed in 40 attempts");
}

/// A separate `gc --grace 0s` process runs again and again beside `serve` while manifests are
/// pushed that re-use old, unreferenced blobs (their images were deleted): gc must not sweep
/// a blob a push has just checked. Every push ends up stored with its blobs (refused pushes
/// upload them again), and fsck finds no dangling manifest.
fn gc_beside_pushes_reusing_old_blobs_leaves_no_dangling_manifest(backend: Backend) {
    let reg = Arc::new(Registry::start_on(backend, &[]));
    const IMAGES: u64 = 12;
    let images: Vec<Pushed> = (0..IMAGES)
        .map(|i| push(&reg, "reuse/app", &format!("old{i}"), 500 + i))
        .collect();
    for p in &images {
        let r = http()
            .delete(format!(
                "{}/v2/reuse/app/manifests/{}",
                reg.url(),
                p.manifest
            ))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED);
    }
    let images = Arc::new(images);
    let (r2, i2) = (reg.clone(), images.clone());
    let pusher = std::thread::spawn(move || {
        let mut attempts = 0;
        for (i, p) in i2.iter().enumerate() {
            // Spread over the gc runs: before a lease, while it settles, while it sweeps.
            std::thread::sleep(Duration::from_millis((i as u64 * 137) % 450));
            attempts += push_reusing(&r2, "reuse/app", &format!("v{i}"), p);
        }
        attempts
    });
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut runs = 0;
    while runs < 3 || !pusher.is_finished() {
        assert!(
            Instant::now() < deadline,
            "pushes beside gc not done in 240 s"
        );
        assert!(runs < 200, "pushes beside gc not done in 200 gc runs");
        cli_ok(&reg, &["gc", "--grace", "0s"]);
        runs += 1;
    }
    let attempts = pusher.join().unwrap();
    eprintln!("{IMAGES} pushes took {attempts} attempts beside {runs} gc runs");
    let out = cli_ok(&reg, &["fsck"]);
    assert!(out.contains(", 0 problems"), "{out}");
    let c = http();
    for (i, p) in images.iter().enumerate() {
        let r = c
            .get(format!("{}/v2/reuse/app/manifests/v{i}", reg.url()))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "v{i}");
        assert_eq!(r.bytes().unwrap().as_ref(), p.manifest_bytes.as_slice());
        for (d, data) in [(&p.config, &p.config_bytes), (&p.layer, &p.layer_bytes)] {
            let r = c
                .get(format!("{}/v2/reuse/app/blobs/{d}", reg.url()))
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::OK, "v{i}: {d}");
            assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice(), "v{i}: {d}");
        }
    }
}

fn fsck_reports_corruption_and_missing_blobs(backend: Backend) {
    let reg = Registry::start_on(backend, &[]);
    let a = push(&reg, "fsck/a", "v1", 7);
    let b = push(&reg, "fsck/b", "v1", 8);
    let out = cli_ok(&reg, &["fsck"]);
    assert!(out.contains(", 0 problems"), "{out}");
    assert_eq!(
        store_requests(&out).is_some(),
        reg.object.is_some(),
        "{out}"
    );

    // Flip one byte of a layer, and lose another image's config.
    let mut content = a.layer_bytes.clone();
    content[100] ^= 0xff;
    overwrite_blob(&reg, &a.layer, content);
    lose_blob(&reg, &b.config);

    let out = reg.cli(&["fsck"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains(&format!("corrupt blob {}", a.layer)),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "fsck/b@{}: references missing blob {}",
            b.manifest, b.config
        )),
        "{text}"
    );
    assert!(text.contains(", 2 problems"), "{text}");
}

/// `outpost-registry <sub> <args>` with `env`.
fn run_sub(sub: &str, args: &[String], env: &[(String, String)]) -> Output {
    run_timeout(
        Command::new(bin("outpost-registry"))
            .arg(sub)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v))),
        Duration::from_secs(120),
    )
}

/// A failed run ended with one line naming the problem, not a panic.
fn refused_with(out: &Output, wanted: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains(wanted),
        "wanted one error line with {wanted:?}: {err}"
    );
}

#[test]
fn gc_and_fsck_refuse_a_missing_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for cmd in ["gc", "fsck"] {
        let out = run_sub(
            cmd,
            &["--storage".into(), missing.display().to_string()],
            &[],
        );
        refused_with(&out, "cannot open storage");
        assert!(!missing.exists(), "{cmd} must not create a store");
    }
}

/// A container or bucket that was never created, on the same emulator as `o`.
fn never_created(o: &ObjectStorage) -> ObjectStorage {
    let mut m = o.clone();
    m.bucket = format!("{}-never", o.bucket);
    let (scheme, _) = o.url.split_once("://").expect("url");
    m.url = format!("{scheme}://{}/e2e", m.bucket);
    m
}

#[test]
fn gc_and_fsck_refuse_a_missing_container_or_bucket() {
    for backend in [Backend::Azurite, Backend::Moto] {
        let o = backend.object_storage().expect("object storage");
        let missing = never_created(&o);
        for cmd in ["gc", "fsck"] {
            // Options as flags here (the Registry helper passes them in the environment).
            let out = run_sub(cmd, &missing.args(), &missing.env);
            refused_with(&out, "does not exist");
        }
        assert!(o.keys().is_empty(), "nothing written");
    }
}

#[test]
fn gc_and_fsck_refuse_bad_credentials() {
    // moto takes any credentials; Azurite checks the shared key.
    let o = outpost_e2e::emulators::azurite();
    let env: Vec<(String, String)> = o
        .env
        .iter()
        .map(|(k, v)| {
            if k == "AZURE_STORAGE_ACCOUNT_KEY" {
                // Valid base64, wrong key.
                (
                    k.clone(),
                    "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXktd3Jvbmc=".into(),
                )
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    for cmd in ["gc", "fsck"] {
        let out = run_sub(cmd, &o.args(), &env);
        refused_with(&out, "credentials refused");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("d3Jvbmcta2V5"), "no secret in errors: {err}");
    }
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_IMAGE: &str = "application/vnd.oci.image.manifest.v1+json";

/// PUTs `body` as `repo`'s manifest `reference` (a tag, or its digest for a push by digest
/// only); its digest.
fn put_manifest(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let c = http();
    let deadline = Instant::now() + Duration::from_secs(120);
    // Bounded: a gc holding the maintenance lock answers 503 (retry), as clients do.
    loop {
        let r = c
            .put(format!("{}/v2/{repo}/manifests/{reference}", reg.url()))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap();
        let status = r.status();
        if status == StatusCode::SERVICE_UNAVAILABLE && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        assert_eq!(
            status,
            StatusCode::CREATED,
            "{repo}:{reference}: {}",
            r.text().unwrap_or_default()
        );
        return sha256(body);
    }
}

fn put_blob(reg: &Registry, repo: &str, data: &[u8]) -> String {
    let d = sha256(data);
    let r = http()
        .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", reg.url()))
        .body(data.to_vec())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    d
}

/// An image (config and one layer of its own) pushed by digest only; its manifest's bytes.
fn image_by_digest(reg: &Registry, repo: &str, seed: u64) -> Vec<u8> {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = pseudo_random(seed, 20_000);
    let (c, l) = (put_blob(reg, repo, &config), put_blob(reg, repo, &layer));
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len()}],
    }))
    .unwrap();
    put_manifest(reg, repo, &sha256(&m), OCI_IMAGE, &m);
    m
}

/// A cosign-style signature of `subject` (an image manifest of `size` bytes), pushed by
/// digest; its digest and the digest of its payload blob.
fn sign(reg: &Registry, repo: &str, subject: &str, size: usize, seed: u64) -> (String, String) {
    let empty = put_blob(reg, repo, b"{}");
    let payload = format!("{{\"signed\":\"{subject}\",\"seed\":{seed}}}").into_bytes();
    let p = put_blob(reg, repo, &payload);
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_IMAGE,
        "artifactType": "application/vnd.dev.cosign.simplesigning.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": p, "size": payload.len()}],
        "subject": {"mediaType": OCI_IMAGE, "digest": subject, "size": size},
    }))
    .unwrap();
    (put_manifest(reg, repo, &sha256(&m), OCI_IMAGE, &m), p)
}

/// Every manifest revision in the store as `repository@digest` (files on disk, objects in the
/// bucket: the same relative names).
fn stored_manifests(reg: &Registry) -> BTreeSet<String> {
    let keys: Vec<String> = match &reg.object {
        Some(o) => o.keys(),
        None => {
            let root = reg.storage.join("repositories");
            let mut out = Vec::new();
            let mut dirs = vec![root.clone()];
            // Bounded by the tree the test made.
            while let Some(d) = dirs.pop() {
                for e in std::fs::read_dir(&d).unwrap() {
                    let p = e.unwrap().path();
                    if p.is_dir() {
                        dirs.push(p);
                    } else {
                        let rel = p.strip_prefix(&reg.storage).unwrap();
                        out.push(rel.to_string_lossy().into_owned());
                    }
                }
            }
            out
        }
    };
    keys.iter()
        .filter_map(|k| {
            let rest = k.strip_prefix("repositories/")?;
            let (repo, digest) = rest.split_once("/_manifests/revisions/")?;
            let (alg, hex) = digest.split_once('/')?;
            Some(format!("{repo}@{alg}:{hex}"))
        })
        .collect()
}

/// The `repository@digest` lines gc printed.
fn listed_manifests(out: &str) -> BTreeSet<String> {
    out.lines()
        .filter(|l| l.contains("@sha256:") && !l.contains(' '))
        .map(str::to_owned)
        .collect()
}

/// `gc --delete-untagged` on a readwrite child of an Outpost parent holding: a tag moved to a
/// new manifest (the old one, and its signature, untagged), a manifest pushed by digest only, a
/// signed image (the signature's subject tagged), a multi-arch index whose children are pushed
/// by digest, an image staged by digest from the parent (untagged, pinned) and a push by
/// digest still in the outbox (the parent stopped). Exactly the first three go.
fn gc_delete_untagged_removes_exactly_the_unreachable_manifests(backend: Backend) {
    let mut parent = Registry::start();
    // Staged by digest: untagged at the parent too, so no sync brings a tag for it.
    let staged = image_by_digest(&parent, "stg/app", 41);
    let child = outpost_on(backend, &parent.host(), &["--mode", "readwrite"]);

    // A tag moved: the first manifest (and the signature made for it) lose their root.
    let old = push(&child, "keep/app", "v1", 31);
    let (old_sig, old_sig_payload) = sign(
        &child,
        "keep/app",
        &old.manifest,
        old.manifest_bytes.len(),
        32,
    );
    let new = push(&child, "keep/app", "v1", 33);
    // Pushed by digest, never tagged.
    let loose = image_by_digest(&child, "keep/app", 34);
    let loose_json: serde_json::Value = serde_json::from_slice(&loose).unwrap();
    // A signed image: the signature is reached through its tagged subject.
    let signed = push(&child, "signed/app", "v1", 35);
    let (signed_sig, _) = sign(
        &child,
        "signed/app",
        &signed.manifest,
        signed.manifest_bytes.len(),
        36,
    );
    // A multi-arch index: the children are pushed by digest, reached through the tagged index.
    let amd = image_by_digest(&child, "multi/app", 37);
    let arm = image_by_digest(&child, "multi/app", 38);
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_IMAGE, "digest": sha256(&amd), "size": amd.len(), "platform": {"os": "linux", "architecture": "amd64"}},
            {"mediaType": OCI_IMAGE, "digest": sha256(&arm), "size": arm.len(), "platform": {"os": "linux", "architecture": "arm64"}},
        ],
    }))
    .unwrap();
    let index_digest = put_manifest(&child, "multi/app", "v1", OCI_INDEX, &index);

    // The parent takes every push so far: none of them is held by the outbox any more.
    sync_now(&child);
    assert_eq!(admin_status(&child)["outboxPending"], 0, "outbox delivered");

    let id = stage(
        &child,
        &json!({"images": [format!("stg/app@{}", sha256(&staged))]}).to_string(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = staging_get(&child, &id);
        if s["images"][0]["state"] == "staged" {
            break;
        }
        assert_ne!(s["images"][0]["state"], "failed", "{s}");
        assert!(Instant::now() < deadline, "not staged in 60 s: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The parent goes away: this push stays queued for it.
    parent.kill9();
    let queued = image_by_digest(&child, "rw/app", 39);
    assert_eq!(
        admin_status(&child)["outboxPending"],
        1,
        "queued for the parent"
    );

    let m = |repo: &str, d: &str| format!("{repo}@{d}");
    let expected: BTreeSet<String> = [
        m("keep/app", &old.manifest),
        m("keep/app", &old_sig),
        m("keep/app", &sha256(&loose)),
    ]
    .into();
    let kept: BTreeSet<String> = [
        m("keep/app", &new.manifest),
        m("signed/app", &signed.manifest),
        m("signed/app", &signed_sig),
        m("multi/app", &index_digest),
        m("multi/app", &sha256(&amd)),
        m("multi/app", &sha256(&arm)),
        m("stg/app", &sha256(&staged)),
        m("rw/app", &sha256(&queued)),
    ]
    .into();
    let before = stored_manifests(&child);
    assert_eq!(
        before,
        expected.union(&kept).cloned().collect(),
        "the store holds what the test pushed"
    );
    // Blobs only the doomed manifests name: their contents, the old image's config and layer,
    // the old signature's payload, the loose image's config and layer.
    let loose_blobs = [
        loose_json["config"]["digest"].as_str().unwrap().to_owned(),
        loose_json["layers"][0]["digest"]
            .as_str()
            .unwrap()
            .to_owned(),
    ];
    let doomed_blobs: Vec<String> = [
        old.manifest.clone(),
        old.config.clone(),
        old.layer.clone(),
        old_sig.clone(),
        old_sig_payload.clone(),
        sha256(&loose),
    ]
    .into_iter()
    .chain(loose_blobs)
    .collect();

    // Everything was pushed moments ago: the default grace period (1h) keeps it all, as it
    // keeps a manifest pushed by digest that a tag will name in a moment.
    let out = cli_ok(&child, &["gc", "--delete-untagged"]);
    assert!(out.contains("removed 0 untagged manifests"), "{out}");
    assert_eq!(listed_manifests(&out), BTreeSet::new(), "{out}");
    assert_eq!(stored_manifests(&child), before);

    // A dry run lists exactly the set and removes nothing.
    let out = cli_ok(
        &child,
        &["gc", "--delete-untagged", "--grace", "0s", "--dry-run"],
    );
    assert_eq!(listed_manifests(&out), expected, "{out}");
    assert!(out.contains("would remove 3 untagged manifests"), "{out}");
    assert_eq!(
        stored_manifests(&child),
        before,
        "a dry run removes nothing"
    );
    for d in &doomed_blobs {
        assert!(blob_stored(&child, d), "{d} still stored after a dry run");
    }

    let out = cli_ok(&child, &["gc", "--delete-untagged", "--grace", "0s"]);
    assert_eq!(listed_manifests(&out), expected, "{out}");
    let after = stored_manifests(&child);
    assert_eq!(
        before.difference(&after).cloned().collect::<BTreeSet<_>>(),
        expected,
        "exactly the unreachable manifests removed"
    );
    assert_eq!(after, kept);
    for d in &doomed_blobs {
        assert!(
            !blob_stored(&child, d),
            "{d}: only the removed manifests named it"
        );
    }
    // What stays is whole: every kept manifest reads back byte for byte with its blobs.
    let c = http();
    for (repo, bytes) in [
        ("keep/app", new.manifest_bytes.clone()),
        ("signed/app", signed.manifest_bytes.clone()),
        ("multi/app", index.clone()),
        ("multi/app", amd.clone()),
        ("multi/app", arm.clone()),
        ("stg/app", staged.clone()),
        ("rw/app", queued.clone()),
    ] {
        let r = c
            .get(format!(
                "{}/v2/{repo}/manifests/{}",
                child.url(),
                sha256(&bytes)
            ))
            .header("accept", format!("{OCI_IMAGE}, {OCI_INDEX}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{repo}");
        assert_eq!(r.bytes().unwrap().as_ref(), bytes.as_slice(), "{repo}");
    }
    for (repo, d, data) in [
        ("keep/app", &new.layer, &new.layer_bytes),
        ("signed/app", &signed.layer, &signed.layer_bytes),
    ] {
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{d}", child.url()))
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "{repo}: {d}");
        assert_eq!(r.bytes().unwrap().as_ref(), data.as_slice(), "{repo}: {d}");
    }
    // The signature of the tagged image is still listed by the referrers API; the old one's
    // subject is gone with it.
    let r: serde_json::Value = c
        .get(format!(
            "{}/v2/signed/app/referrers/{}",
            child.url(),
            signed.manifest
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["manifests"][0]["digest"], signed_sig.as_str(), "{r}");
    let r: serde_json::Value = c
        .get(format!(
            "{}/v2/keep/app/referrers/{}",
            child.url(),
            old.manifest
        ))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["manifests"].as_array().map(Vec::len), Some(0), "{r}");
    assert_eq!(
        admin_status(&child)["outboxPending"],
        1,
        "the queued push is still queued"
    );
    fsck_clean(&child);
}

/// Pushes by digest, each tagged a moment later (as clients that push by digest first do),
/// while `gc --delete-untagged` runs again and again with a grace period of a few seconds: the
/// grace period keeps every manifest until its tag names it, so nothing is lost (gc runs
/// many times within each 300 ms between a push and its tag: removing a young untagged
/// manifest would show). The grace period must be longer than the slowest push, as the README
/// says: on object storage a push may wait for the gc lease, and gc runs back to back would
/// hold it off for long, so there they pause and the grace period is longer than the test.
fn gc_delete_untagged_beside_pushes_by_digest_then_tag_loses_nothing(backend: Backend) {
    let (grace, pause) = if backend == Backend::Fs {
        ("10s", Duration::ZERO)
    } else {
        ("300s", Duration::from_millis(500))
    };
    let reg = Arc::new(Registry::start_on(backend, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let (r2, s2, d2) = (reg.clone(), stop.clone(), done.clone());
    let pusher = std::thread::spawn(move || {
        let mut pushed = Vec::new();
        while !s2.load(Ordering::Relaxed) && pushed.len() < 200 {
            let n = pushed.len() as u64;
            let m = image_by_digest(&r2, "late/app", 900 + n);
            std::thread::sleep(Duration::from_millis(300));
            put_manifest(&r2, "late/app", &format!("t{n}"), OCI_IMAGE, &m);
            pushed.push(m);
            d2.store(pushed.len() as u64, Ordering::Relaxed);
        }
        pushed
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut runs = 0;
    while runs < 5 || (done.load(Ordering::Relaxed) < 8 && !pusher.is_finished()) {
        assert!(Instant::now() < deadline, "no pushes beside gc in 120 s");
        let out = cli_ok(&reg, &["gc", "--delete-untagged", "--grace", grace]);
        assert!(out.contains("removed 0 untagged manifests"), "{out}");
        runs += 1;
        std::thread::sleep(pause);
    }
    stop.store(true, Ordering::Relaxed);
    let pushed = pusher.join().unwrap();
    assert!(!pushed.is_empty());
    let c = http();
    for (n, m) in pushed.iter().enumerate() {
        let r = c
            .get(format!("{}/v2/late/app/manifests/t{n}", reg.url()))
            .header("accept", OCI_IMAGE)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK, "t{n}");
        assert_eq!(r.bytes().unwrap().as_ref(), m.as_slice(), "t{n}");
    }
    fsck_clean(&reg);
    eprintln!(
        "{} pushes by digest then tag beside {runs} gc runs",
        pushed.len()
    );
}
