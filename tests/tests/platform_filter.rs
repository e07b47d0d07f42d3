//! The platform filter (`--platform`) against a real parent (Debian's docker-registry behind the
//! counting proxy): a 3-platform index with buildx-style attestation manifests, synced for
//! linux/amd64 only. The index (and a Docker manifest list of the same children) is stored byte
//! for byte, only amd64's manifests and blobs cross the link, the other platforms are pulled on
//! demand while the parent is up and refused with a 404 that says why while it is not.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::emulators::Backend;
use outpost_e2e::metrics::sample;
use outpost_e2e::oci::*;
use outpost_e2e::parent::{DockerRegistry, FaultProxy};
use outpost_e2e::scenarios::{NO_SYNC, fsck_clean, outpost_on};
use outpost_e2e::*;
use serde_json::{Value, json};

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const REPO: &str = "demo/app";

/// One manifest pushed to the parent: its digest, bytes and the blobs it names.
struct Pushed {
    digest: String,
    bytes: Vec<u8>,
    blobs: BTreeSet<String>,
}

/// Pushes image `tag` of the layout into the parent's `REPO` by digest only (no tag, so only
/// the index brings it into a sync).
fn push_image(layout: &Layout, tag: &str, parent: &Endpoint) -> Pushed {
    let d = layout.descriptor(tag);
    let digest = d["digest"].as_str().unwrap().to_owned();
    let bytes = layout.blob(&digest);
    let m = manifest_json(&bytes);
    let mut blobs = BTreeSet::new();
    let mut descriptors = vec![m["config"].clone()];
    descriptors.extend(m["layers"].as_array().unwrap().iter().cloned());
    for b in descriptors {
        let bd = b["digest"].as_str().unwrap();
        assert_eq!(parent.push_blob(REPO, &layout.blob(bd)), bd);
        blobs.insert(bd.to_owned());
    }
    assert_eq!(
        parent.push_manifest(REPO, &digest, OCI_MANIFEST, &bytes),
        201
    );
    Pushed {
        digest,
        bytes,
        blobs,
    }
}

/// A buildx-style attestation manifest (platform unknown/unknown in the index) for `subject`.
fn push_attestation(subject: &str, seed: u64, parent: &Endpoint) -> Pushed {
    let statement = json!({
        "_type": "https://in-toto.io/Statement/v0.1",
        "predicateType": "https://spdx.dev/Document",
        "subject": [{"name": "demo", "digest": {"sha256": subject.trim_start_matches("sha256:")}}],
        "predicate": {"seed": seed},
    });
    let layer = serde_json::to_vec(&statement).unwrap();
    let config = serde_json::to_vec(&json!({
        "architecture": "unknown", "os": "unknown", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [sha256(&layer)]},
    }))
    .unwrap();
    let (cd, ld) = (
        parent.push_blob(REPO, &config),
        parent.push_blob(REPO, &layer),
    );
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": ld, "size": layer.len(),
                    "annotations": {"in-toto.io/predicate-type": "https://spdx.dev/Document"}}],
    });
    let bytes = serde_json::to_vec(&m).unwrap();
    let digest = sha256(&bytes);
    assert_eq!(
        parent.push_manifest(REPO, &digest, OCI_MANIFEST, &bytes),
        201
    );
    Pushed {
        digest,
        bytes,
        blobs: [cd, ld].into_iter().collect(),
    }
}

fn descriptor(p: &Pushed, platform: Value, annotations: Option<Value>) -> Value {
    let mut d = json!({
        "mediaType": OCI_MANIFEST,
        "digest": p.digest,
        "size": p.bytes.len(),
        "platform": platform,
    });
    if let Some(a) = annotations {
        d["annotations"] = a;
    }
    d
}

fn attestation_of(subject: &Pushed) -> Value {
    json!({
        "vnd.docker.reference.digest": subject.digest,
        "vnd.docker.reference.type": "attestation-manifest",
    })
}

/// Blob digests the parent was asked for (GET) through the proxy, with how often.
fn blob_gets(proxy: &FaultProxy) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in proxy.requests() {
        if r.method == "GET"
            && let Some((_, d)) = r.path.split_once("/blobs/")
        {
            *out.entry(d.to_owned()).or_default() += 1;
        }
    }
    out
}

/// The 404 body of a manifest GET: (code, message).
fn not_found(ep: &Endpoint, digest: &str) -> (String, String) {
    let r = ep.get(&format!("/v2/{REPO}/manifests/{digest}"));
    assert_eq!(r.status(), 404, "{digest}");
    let v: Value = r.json().unwrap();
    (
        v["errors"][0]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
        v["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

/// The fs store's revision link of a manifest in `REPO`: written after everything it needs.
fn revision_path(reg: &Registry, digest: &str) -> PathBuf {
    reg.storage
        .join("repositories/demo/app/_manifests/revisions/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

#[test]
fn a_three_platform_index_synced_for_amd64_fetches_only_amd64_and_pulls_the_rest_on_demand() {
    let seed = run_seed() + 1800;
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    for (tag, arch, n) in [("amd", "amd64", 0), ("arm", "arm64", 1), ("v7", "arm", 2)] {
        layout.add_image(
            tag,
            arch,
            &[(
                "app.bin",
                pseudo_random(seed + n, 150 * 1024 + n as usize * 1000),
            )],
        );
    }
    let mut parent = DockerRegistry::builder().start();
    let up = Endpoint::plain(&parent.host());
    let amd = push_image(&layout, "amd", &up);
    let arm = push_image(&layout, "arm", &up);
    let v7 = push_image(&layout, "v7", &up);
    let att_amd = push_attestation(&amd.digest, seed, &up);
    let att_arm = push_attestation(&arm.digest, seed + 1, &up);
    let unknown = json!({"architecture": "unknown", "os": "unknown"});
    let children = vec![
        descriptor(&amd, json!({"architecture": "amd64", "os": "linux"}), None),
        descriptor(&arm, json!({"architecture": "arm64", "os": "linux"}), None),
        descriptor(
            &v7,
            json!({"architecture": "arm", "os": "linux", "variant": "v7"}),
            None,
        ),
        descriptor(&att_amd, unknown.clone(), Some(attestation_of(&amd))),
        descriptor(&att_arm, unknown, Some(attestation_of(&arm))),
    ];
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children,
    }))
    .unwrap();
    assert_eq!(up.push_manifest(REPO, "v1", OCI_INDEX, &index), 201);
    // The same children as a Docker manifest list, under another tag.
    let list = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST, "manifests": children,
    }))
    .unwrap();
    assert_eq!(up.push_manifest(REPO, "list", DOCKER_LIST, &list), 201);

    let proxy = FaultProxy::start(&parent.host());
    let mut outpost = outpost_on(
        Backend::Fs,
        &proxy.host(),
        &["--repository", "demo/**", "--platform", "linux/amd64"],
    );
    let ep = Endpoint::plain(&outpost.host());
    sync_now(&outpost);

    // Both indexes stored byte for byte: their digests are the parent's.
    for (tag, bytes) in [("v1", &index), ("list", &list)] {
        let r = ep.get(&format!("/v2/{REPO}/manifests/{tag}"));
        assert_eq!(r.status(), 200, "{tag}");
        assert_eq!(header(&r, "docker-content-digest"), sha256(bytes), "{tag}");
        assert_eq!(&r.bytes().unwrap().to_vec(), bytes, "{tag}");
    }
    // Only amd64 and its attestation crossed the link: manifests and blobs.
    let kept: BTreeSet<String> = amd.blobs.union(&att_amd.blobs).cloned().collect();
    let gets = blob_gets(&proxy);
    assert_eq!(
        gets.keys().cloned().collect::<BTreeSet<_>>(),
        kept,
        "blob GETs at the parent"
    );
    assert!(gets.values().all(|n| *n == 1), "each blob once: {gets:?}");
    for m in [&amd, &att_amd] {
        // Each tag's plan asks for the manifests it does not have yet (two tags here).
        assert!(proxy.gets_for(&format!("/manifests/{}", m.digest)) >= 1);
        assert!(revision_path(&outpost, &m.digest).exists());
    }
    for m in [&arm, &v7, &att_arm] {
        assert_eq!(proxy.gets_for(&format!("/manifests/{}", m.digest)), 0);
        assert!(!revision_path(&outpost, &m.digest).exists());
    }
    // What was left out: the three skipped manifests as the index gives their sizes, counted
    // once although two indexes name them.
    let skipped = (arm.bytes.len() + v7.bytes.len() + att_arm.bytes.len()) as f64;
    let metrics = metrics_text(&outpost);
    assert_eq!(
        sample(&metrics, "outpost_sync_skipped_bytes_total"),
        Some(skipped),
        "skipped bytes"
    );

    // status shows the filter (admin JSON and the CLI).
    assert_eq!(admin_status(&outpost)["platforms"], json!(["linux/amd64"]));
    let out = admin_cli(&outpost, &["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("platforms: "))
        .unwrap_or_else(|| panic!("no platforms line:\n{text}"));
    assert_eq!(
        line.split_whitespace().next(),
        Some("linux/amd64"),
        "{line}"
    );

    // gc keeps the index and what it has, fsck finds it whole.
    let gc = outpost.cli(&["gc", "--grace", "0s"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    fsck_clean(&outpost);

    // The parent unreachable (stopped: the proxy's kept-alive connections to it close too):
    // what was synced is served, the left-out platforms get a 404 that says why, and an
    // unrelated digest gets the usual one.
    parent.stop();
    assert_eq!(ep.manifest(REPO, "v1").as_ref(), Some(&index));
    assert_eq!(ep.manifest(REPO, &amd.digest).as_ref(), Some(&amd.bytes));
    for b in &amd.blobs {
        assert_eq!(sha256(&ep.blob(REPO, b)), *b);
    }
    for (m, platform) in [(&arm, "linux/arm64"), (&v7, "linux/arm/v7")] {
        let (code, message) = not_found(&ep, &m.digest);
        assert_eq!(code, "MANIFEST_UNKNOWN");
        for part in [
            platform,
            "platform filter",
            "--platform linux/amd64",
            "unreachable",
        ] {
            assert!(message.contains(part), "{part:?} in {message:?}");
        }
    }
    let stranger = sha256(b"not in any index");
    let (code, message) = not_found(&ep, &stranger);
    assert_eq!(code, "MANIFEST_UNKNOWN");
    assert!(
        message.contains("unreachable") && !message.contains("platform filter"),
        "{message}"
    );

    // The parent back: arm64 is pulled on demand by a client asking for that platform (once
    // the offline hold of 10 s has passed) and stored whole.
    parent.start_again();
    let deadline = Instant::now() + Duration::from_secs(90);
    let pulled = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:arm", pulled.path().join("out").display());
    loop {
        let out = run_timeout(
            Command::new(require("skopeo")).args([
                "copy",
                "--src-tls-verify=false",
                "--override-arch",
                "arm64",
                &format!("docker://{}/{REPO}:v1", outpost.host()),
                &dst,
            ]),
            Duration::from_secs(60),
        );
        if out.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "arm64 not pulled on demand: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            outpost.log_text()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let got: Value =
        serde_json::from_slice(&std::fs::read(pulled.path().join("out/index.json")).unwrap())
            .unwrap();
    assert_eq!(got["manifests"][0]["digest"], json!(arm.digest));
    wait_until("the arm64 manifest stored", Duration::from_secs(60), || {
        revision_path(&outpost, &arm.digest).exists()
    });
    let gets = blob_gets(&proxy);
    for b in &arm.blobs {
        assert_eq!(gets.get(b), Some(&1), "arm64 blob {b} fetched once");
    }
    for b in v7.blobs.iter().chain(&att_arm.blobs) {
        assert_eq!(gets.get(b), None, "{b} never fetched");
    }

    // Stored: served with the parent away; arm/v7 still refused.
    parent.stop();
    assert_eq!(ep.manifest(REPO, &arm.digest).as_ref(), Some(&arm.bytes));
    for b in &arm.blobs {
        assert_eq!(sha256(&ep.blob(REPO, b)), *b);
    }
    let (_, message) = not_found(&ep, &v7.digest);
    assert!(message.contains("linux/arm/v7"), "{message}");

    // A later run fetches nothing more and counts nothing again.
    parent.start_again();
    let before = blob_gets(&proxy);
    sync_now(&outpost);
    assert_eq!(blob_gets(&proxy), before, "no blob fetched by a later run");
    assert_eq!(
        sample(&metrics_text(&outpost), "outpost_sync_skipped_bytes_total"),
        Some(skipped)
    );
    fsck_clean(&outpost);

    // Widened to arm/v7 (same store): the next run fetches what the stored index now keeps,
    // each blob once, and leaves the rest (arm64's attestation attests an unlisted platform).
    let c = conn("edge", "u", "p", &proxy.host(), "http");
    let mut args = vec!["--connection-string", c.as_str()];
    args.extend_from_slice(&NO_SYNC);
    args.extend_from_slice(&[
        "--repository",
        "demo/**",
        "--platform",
        "linux/amd64",
        "--platform",
        "linux/arm/v7",
    ]);
    outpost.restart_with_args(&args);
    sync_now(&outpost);
    assert!(revision_path(&outpost, &v7.digest).exists());
    assert!(!revision_path(&outpost, &att_arm.digest).exists());
    let gets = blob_gets(&proxy);
    for b in &v7.blobs {
        assert_eq!(gets.get(b), Some(&1), "arm/v7 blob {b} fetched once");
    }
    for b in &att_arm.blobs {
        assert_eq!(gets.get(b), None, "{b} never fetched");
    }
    // Nothing newly left out: the index was stored before this process started.
    assert_eq!(
        sample(&metrics_text(&outpost), "outpost_sync_skipped_bytes_total"),
        Some(0.0)
    );
    assert_eq!(
        admin_status(&outpost)["platforms"],
        json!(["linux/amd64", "linux/arm/v7"])
    );
    fsck_clean(&outpost);
}

#[test]
fn platforms_come_from_the_environment_and_bad_ones_stop_the_start() {
    let parent = DockerRegistry::builder().start();
    let c = conn("edge", "u", "p", &parent.host(), "http");
    let outpost = Registry::start_with_env(
        None,
        &["--connection-string", &c, "--sync-schedule", "0 0 1 1 *"],
        &[("OUTPOST_PLATFORM", "linux/amd64,Linux/AArch64/v8,linux/arm")],
    );
    assert_eq!(
        admin_status(&outpost)["platforms"],
        json!(["linux/amd64", "linux/arm64/v8", "linux/arm"])
    );
    for bad in ["linux", "linux/arm/v7/x", "linux/amd 64", "unknown/unknown"] {
        let dir = tempfile::tempdir().unwrap();
        let out = run_timeout(
            Command::new(bin("outpost-registry"))
                .args(["serve", "--storage"])
                .arg(dir.path())
                .args(["--connection-string", &c, "--platform", bad]),
            Duration::from_secs(30),
        );
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!("{bad:?} is not a platform"))
                && err.contains("OS/ARCH[/VARIANT]"),
            "{bad}: {err}"
        );
    }
}
