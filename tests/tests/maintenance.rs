//! `outpost-registry gc` and `fsck` on a running store.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use outpost_e2e::{Registry, http, pseudo_random, sha256};
use reqwest::StatusCode;
use serde_json::json;

struct Pushed {
    manifest: String,
    config: String,
    layer: String,
}

fn push(reg: &Registry, repo: &str, tag: &str, seed: u64) -> Pushed {
    let c = http();
    let blob = |data: Vec<u8>| {
        let d = sha256(&data);
        let r = c
            .post(format!("{}/v2/{repo}/blobs/uploads/?digest={d}", reg.url()))
            .body(data)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        d
    };
    let config = blob(format!("{{\"seed\":{seed}}}").into_bytes());
    let layer = blob(pseudo_random(seed, 50_000));
    let m = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 1},
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
        config,
        layer,
    }
}

fn status(reg: &Registry, repo: &str, digest: &str) -> StatusCode {
    http()
        .get(format!("{}/v2/{repo}/blobs/{digest}", reg.url()))
        .send()
        .unwrap()
        .status()
}

fn blob_file(reg: &Registry, digest: &str) -> std::path::PathBuf {
    let hex = digest.trim_start_matches("sha256:");
    reg.storage.join("blobs/sha256").join(&hex[..2]).join(hex)
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

#[test]
fn gc_removes_only_unreferenced_blobs() {
    let reg = Registry::start();
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

    let out = cli_ok(&reg, &["gc", "--grace", "0"]);
    assert!(out.contains("removed 4 blobs"), "{out}");
    for d in [&dropped.config, &dropped.layer, &dropped.manifest] {
        assert!(!blob_file(&reg, d).exists(), "{d} removed");
    }
    assert_eq!(status(&reg, "gc/orphan", &orphan), StatusCode::NOT_FOUND);
    assert_eq!(
        status(&reg, "gc/dropped", &dropped.layer),
        StatusCode::NOT_FOUND
    );
    for d in [&kept.config, &kept.layer, &kept.manifest] {
        assert_eq!(status(&reg, "gc/kept", d), StatusCode::OK, "{d} kept");
    }
    let r = http()
        .get(format!("{}/v2/gc/kept/manifests/v1", reg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert!(cli_ok(&reg, &["fsck"]).contains(", 0 problems"));
}

#[test]
fn gc_while_pushing_keeps_every_pushed_image() {
    let reg = Arc::new(Registry::start());
    let stop = Arc::new(AtomicBool::new(false));
    let (r2, s2) = (reg.clone(), stop.clone());
    let pusher = std::thread::spawn(move || {
        let mut n = 0u64;
        while !s2.load(Ordering::Relaxed) && n < 2000 {
            push(&r2, "busy/app", &format!("t{n}"), 100 + n);
            n += 1;
        }
        n
    });
    for _ in 0..5 {
        cli_ok(&reg, &["gc"]);
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

#[test]
fn fsck_reports_corruption_and_missing_blobs() {
    let reg = Registry::start();
    let a = push(&reg, "fsck/a", "v1", 7);
    let b = push(&reg, "fsck/b", "v1", 8);
    assert!(cli_ok(&reg, &["fsck"]).contains(", 0 problems"));

    // Flip one byte of a layer, and lose another image's config.
    let path = blob_file(&reg, &a.layer);
    let mut content = std::fs::read(&path).unwrap();
    content[100] ^= 0xff;
    std::fs::write(&path, content).unwrap();
    std::fs::remove_file(blob_file(&reg, &b.config)).unwrap();

    let out = reg.cli(&["fsck"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
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

#[test]
fn gc_and_fsck_refuse_a_missing_store() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    for cmd in ["gc", "fsck"] {
        let out = outpost_e2e::run_timeout(
            std::process::Command::new(outpost_e2e::bin("outpost-registry"))
                .arg(cmd)
                .arg("--storage")
                .arg(&missing),
            Duration::from_secs(30),
        );
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open storage"));
        assert!(!missing.exists(), "{cmd} must not create a store");
    }
}
