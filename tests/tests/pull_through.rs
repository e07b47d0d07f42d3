//! Pull-through, staging and retention against a real parent (Debian's docker-registry, often
//! behind a proxy that counts what crosses the link), with skopeo and containerd as clients.

use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::emulators::Backend;
use outpost_e2e::metrics::sample;
use outpost_e2e::oci::*;
use outpost_e2e::parent::{DockerRegistry, FaultProxy};
use outpost_e2e::scenarios::{NO_SYNC, outpost_on, sixteen_clients_share_one_upstream_get};
use outpost_e2e::*;
use serde_json::Value;

struct Images {
    _dir: tempfile::TempDir,
    layout: Layout,
}

/// An amd64 image `app`, an arm64 image `arm`, an index `multi` of both, and `other`.
fn images(seed: u64) -> Images {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image(
        "app",
        "amd64",
        &[("app.bin", pseudo_random(seed, 300 * 1024))],
    );
    layout.add_image(
        "arm",
        "arm64",
        &[("arm.bin", pseudo_random(seed + 1, 200 * 1024))],
    );
    layout.add_index("multi", &[("app", "amd64"), ("arm", "arm64")]);
    layout.add_image(
        "other",
        "amd64",
        &[("other.bin", pseudo_random(seed + 2, 100 * 1024))],
    );
    Images { _dir: dir, layout }
}

fn skopeo_out(args: &[&str]) -> std::process::Output {
    run_timeout(
        Command::new(require("skopeo")).args(args),
        Duration::from_secs(120),
    )
}

#[test]
fn never_synced_images_pull_through_for_skopeo_and_containerd_and_stay_when_the_parent_goes() {
    let imgs = images(run_seed() + 100);
    let mut parent = DockerRegistry::builder().start();
    for (tag, dest) in [
        ("app", "demo/app:v1"),
        ("multi", "demo/multi:v1"),
        ("other", "demo/other:v1"),
        ("other", "outside/x:v1"),
    ] {
        load(&imgs.layout, tag, &parent.host(), dest, &[]);
    }
    let proxy = FaultProxy::start(&parent.host());
    let outpost = outpost_on(Backend::Fs, &proxy.host(), &["--repository", "demo/**"]);
    let ep = Endpoint::plain(&outpost.host());
    let up = Endpoint::plain(&parent.host());
    assert!(ep.tags("demo/app").is_empty(), "nothing synced yet");

    // skopeo: the first pull comes through, byte-identical.
    let dir = tempfile::tempdir().unwrap();
    let dst = format!("oci:{}:app", dir.path().join("out").display());
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/demo/app:v1", outpost.host()),
        &dst,
    ]);
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/demo/app:v1", outpost.host()),
    ]);
    assert_eq!(
        raw.as_bytes(),
        up.manifest("demo/app", "v1").unwrap().as_slice()
    );

    // containerd pulls the multi-arch index (its platform) through Outpost.
    let ctrd = Containerd::start();
    ctrd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        &format!("{}/demo/multi:v1", outpost.host()),
    ]);

    // Both are stored whole (every platform of the index) shortly after.
    wait_stored(&outpost, "demo/app", "v1");
    wait_stored(&outpost, "demo/multi", "v1");
    let index = up.manifest("demo/multi", "v1").unwrap();
    for child in manifest_json(&index)["manifests"].as_array().unwrap() {
        let d = child["digest"].as_str().unwrap();
        assert_eq!(ep.manifest("demo/multi", d), up.manifest("demo/multi", d));
    }

    // Out of scope: never fetched.
    let r = ep.get("/v2/outside/x/manifests/v1");
    assert_eq!(r.status(), 404);
    assert!(r.text().unwrap().contains("outside"), "says why");
    assert_eq!(
        proxy.gets_for("/outside/"),
        0,
        "no request for out-of-scope"
    );
    assert_eq!(
        proxy
            .requests()
            .iter()
            .filter(|r| r.path.contains("/outside/"))
            .count(),
        0
    );

    // The parent goes away: cached pulls still work...
    parent.stop();
    let dir2 = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/demo/multi:v1", outpost.host()),
        &format!("oci:{}:m", dir2.path().join("out").display()),
    ]);
    // ... and uncached ones fail within 2 s, saying why.
    for attempt in 0..2 {
        let t = Instant::now();
        let r = ep.get("/v2/demo/other/manifests/v1");
        let took = t.elapsed();
        assert_eq!(r.status(), 404, "attempt {attempt}");
        let body: Value = r.json().unwrap();
        assert_eq!(body["errors"][0]["code"], "MANIFEST_UNKNOWN", "{body}");
        let msg = body["errors"][0]["message"].as_str().unwrap();
        assert!(msg.contains("unreachable"), "{msg}");
        assert!(took < Duration::from_secs(2), "attempt {attempt}: {took:?}");
    }
    let t = Instant::now();
    let out = skopeo_out(&[
        "inspect",
        "--tls-verify=false",
        &format!("docker://{}/demo/other:v1", outpost.host()),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("parent registry is unreachable"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let m = metrics_text(&outpost);
    assert!(
        metric(&m, "outpost_pull_through_total{result=\"miss\"}") >= 2,
        "{m}"
    );
    assert!(
        metric(&m, "outpost_pull_through_total{result=\"hit\"}") >= 1,
        "{m}"
    );
    assert!(
        metric(&m, "outpost_pull_through_total{result=\"error\"}") >= 2,
        "{m}"
    );
    assert_eq!(sample(&m, "outpost_parent_connected"), Some(0.0), "{m}");
}

#[test]
fn sixteen_clients_share_one_upstream_get_of_a_256_mib_layer() {
    sixteen_clients_share_one_upstream_get(Backend::Fs, 256 * 1024 * 1024, run_seed() + 200);
}

#[test]
fn staging_reports_each_image_pins_what_it_staged_and_survives_gc_and_eviction() {
    let imgs = images(run_seed() + 300);
    let mut parent = DockerRegistry::builder().start();
    load(
        &imgs.layout,
        "multi",
        &parent.host(),
        "demo/multi:v1",
        &["--all"],
    );
    load(&imgs.layout, "app", &parent.host(), "demo/app:v1", &[]);
    load(&imgs.layout, "other", &parent.host(), "demo/other:v1", &[]);
    // The same image as the staged demo/app:v1, in another repository: every blob shared.
    load(&imgs.layout, "app", &parent.host(), "demo/twin:v1", &[]);
    let mut outpost = outpost_on(Backend::Fs, &parent.host(), &[]);

    // Validation before download: the bad tag fails with a reason. One image comes from a file.
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), "# release 42\ndemo/app:nope\n\n").unwrap();
    let out = admin_cli(
        &outpost,
        &[
            "stage",
            "demo/multi:v1",
            &format!("{}/demo/app:v1", parent.host()),
            "-f",
            list.path().to_str().unwrap(),
            "--wait",
            "--timeout",
            "90s",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a failed image fails the command");
    assert!(
        stdout.contains("2 staged, 1 failed"),
        "{stdout}\n{stderr}\n{}",
        outpost.log_text()
    );
    assert!(stdout.contains("failed: demo/app:nope"), "{stdout}");
    assert!(
        stderr.contains("demo/multi:v1") && stderr.contains("staged"),
        "progress lines: {stderr}"
    );
    let id = stdout
        .split_whitespace()
        .find(|w| w.starts_with("stg-"))
        .unwrap()
        .to_owned();
    let r = staging_get(&outpost, &id);
    let states: Vec<&str> = r["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["staged", "staged", "failed"], "{r:#}");
    let bad = &r["images"][2];
    assert!(
        bad["error"].as_str().unwrap().contains("not found"),
        "{bad}"
    );
    assert_eq!(bad["bytesDone"], 0, "nothing downloaded for it");
    let multi = &r["images"][0];
    assert!(
        multi["bytesTotal"].as_u64().unwrap() > 400 * 1024,
        "{multi}"
    );
    assert_eq!(multi["bytesDone"], multi["bytesTotal"]);
    let m = metrics_text(&outpost);
    assert_eq!(
        metric(&m, "outpost_staging_images{state=\"staged\"}"),
        2,
        "{m}"
    );
    assert_eq!(
        metric(&m, "outpost_staging_images{state=\"failed\"}"),
        1,
        "{m}"
    );

    // Two unpinned images: pulled through, then stored.
    let ep = Endpoint::plain(&outpost.host());
    for repo in ["demo/other", "demo/twin"] {
        assert!(ep.manifest(repo, "v1").is_some());
        wait_stored(&outpost, repo, "v1");
    }

    // gc keeps staged content: pull it all back with the parent gone.
    parent.stop();
    let gc = outpost.cli(&["gc", "--grace", "0s"]);
    assert!(
        gc.status.success(),
        "{}",
        String::from_utf8_lossy(&gc.stderr)
    );
    let host = outpost.host();
    let pull_all = |what: &str| {
        let dir = tempfile::tempdir().unwrap();
        skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{host}/{what}"),
            &format!("oci:{}:x", dir.path().join("o").display()),
        ]);
    };
    pull_all("demo/multi:v1");
    pull_all("demo/app:v1");

    // A store limit far below what is there: everything unpinned goes, staged images stay.
    let c = conn("edge", "u", "p", &parent.host(), "http");
    let mut args = vec!["--connection-string", c.as_str(), "--max-storage", "1"];
    args.extend_from_slice(&NO_SYNC);
    outpost.restart_with_args(&args);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = metrics_text(&outpost);
        if metric(&m, "outpost_evictions_total") >= 1 {
            assert!(metric(&m, "outpost_evicted_bytes_total") > 0, "{m}");
            // The size came from the one listing at start; the eviction listed no blobs.
            assert_eq!(
                metric(&m, "outpost_storage_listings_total{what=\"blobs\"}"),
                1,
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no eviction\n{}",
            outpost.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(ep.tags("demo/other").is_empty(), "unpinned image evicted");
    // The twin is evicted too, but not the blobs it shares with the staged image.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ep.tags("demo/twin").is_empty() {
        assert!(
            Instant::now() < deadline,
            "twin not evicted\n{}",
            outpost.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    pull_all("demo/multi:v1");
    pull_all("demo/app:v1");
    let fsck = outpost.cli(&["fsck"]);
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
}

#[test]
fn staging_interrupted_by_a_crash_resumes_after_restart() {
    const MIB: u64 = 1024 * 1024;
    let parent = DockerRegistry::builder().start();
    let layer = pseudo_random(run_seed() + 400, 24 * MIB as usize);
    let digest = push_raw_image(&Endpoint::plain(&parent.host()), "big/staged", "v1", &layer);
    drop(layer);
    let proxy = FaultProxy::start(&parent.host());
    let c = conn("edge", "u", "p", &proxy.host(), "http");
    let mut args = vec![
        "--connection-string",
        c.as_str(),
        "--chunk-size-mb",
        "2",
        "--sync-bandwidth-limit",
        "6000000",
    ];
    args.extend_from_slice(&NO_SYNC);
    let mut outpost = Registry::start_with_args(&args);
    let id = stage(&outpost, r#"{"images": ["big/staged:v1"]}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let done_at_kill = loop {
        let r = staging_get(&outpost, &id);
        let done = r["images"][0]["bytesDone"].as_u64().unwrap_or(0);
        if done > 6 * MIB {
            assert_eq!(r["images"][0]["state"], "downloading");
            break done;
        }
        assert!(Instant::now() < deadline, "{r:#}\n{}", outpost.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    outpost.restart();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = staging_get(&outpost, &id);
        if r["images"][0]["state"] == "staged" {
            assert_eq!(r["state"], "succeeded");
            break;
        }
        assert_ne!(r["images"][0]["state"], "failed", "{r:#}");
        assert!(Instant::now() < deadline, "{r:#}\n{}", outpost.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(outpost.log_text().contains("resuming staging request"));
    // The second process resumed with a Range request from what the first had stored (at
    // most the 2 MiB chunk in flight lost), not from zero.
    let path = format!("/blobs/{digest}");
    let starts = proxy.range_starts(&digest);
    assert_eq!(starts.len(), 2, "{:?}", proxy.requests());
    assert_eq!(starts[0], 0);
    assert!(
        starts[1] + 2 * MIB >= done_at_kill && starts[1] > 0,
        "resumed at {} after {done_at_kill} bytes were reported",
        starts[1]
    );
    assert!(proxy.body_bytes_for(&path) < 2 * 24 * MIB);
    let ep = Endpoint::plain(&outpost.host());
    assert_eq!(ep.tags("big/staged"), ["v1"]);
}

#[test]
fn images_named_at_start_up_are_staged_once() {
    let imgs = images(run_seed() + 500);
    let parent = DockerRegistry::builder().start();
    load(&imgs.layout, "app", &parent.host(), "demo/app:v1", &[]);
    let mut outpost = outpost_on(Backend::Fs, &parent.host(), &["--stage", "demo/app:v1"]);
    let list = |reg: &Registry| -> Value {
        http()
            .get(format!(
                "http://127.0.0.1:{}/outpost/v1/staging",
                reg.admin_port
            ))
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let l = list(&outpost);
        if l["requests"][0]["state"] == "succeeded" {
            break;
        }
        assert!(Instant::now() < deadline, "{l:#}\n{}", outpost.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    outpost.restart();
    let l = list(&outpost);
    assert_eq!(l["requests"].as_array().unwrap().len(), 1, "{l:#}");
    assert!(outpost.log_text().contains("staged by an earlier request"));
    assert_eq!(Endpoint::plain(&outpost.host()).tags("demo/app"), ["v1"]);
}

#[test]
fn with_respect_window_staging_validates_at_once_but_downloads_only_in_the_window() {
    let imgs = images(run_seed() + 700);
    let parent = DockerRegistry::builder().start();
    load(&imgs.layout, "app", &parent.host(), "demo/app:v1", &[]);
    let proxy = FaultProxy::start(&parent.host());
    // The window (one minute after midnight on January 1st) is closed now.
    let outpost = outpost_on(Backend::Fs, &proxy.host(), &["--respect-window"]);
    let id = stage(&outpost, r#"{"images": ["demo/app:v1", "demo/app:nope"]}"#);
    let deadline = Instant::now() + Duration::from_secs(30);
    let r = loop {
        let r = staging_get(&outpost, &id);
        if r["images"][0]["digest"].is_string() && r["images"][1]["state"] == "failed" {
            break r;
        }
        assert!(Instant::now() < deadline, "{r:#}\n{}", outpost.log_text());
        std::thread::sleep(Duration::from_millis(100));
    };
    // Validated (digest resolved, the bad tag refused) but nothing downloaded.
    std::thread::sleep(Duration::from_secs(2));
    let r2 = staging_get(&outpost, &id);
    assert_eq!(r2["images"][0]["state"], "pending", "{r:#}");
    assert_eq!(r2["images"][0]["bytesDone"], 0);
    assert_eq!(proxy.gets_for("/blobs/"), 0, "{:?}", proxy.requests());
    assert_eq!(r2["state"], "running");
}
