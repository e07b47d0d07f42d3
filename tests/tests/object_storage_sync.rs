//! Sync, pull-through, a crash mid-sync, and retention with the store on Azure Blob Storage
//! (Azurite): everything a parent makes Outpost keep between runs (sync state, the readwrite
//! outbox, staging requests, pull times) lives in the container with the content, so a
//! restart on the same container carries on where the last process stopped.

use std::time::{Duration, Instant, SystemTime};

use outpost_e2e::emulators::Backend;
use outpost_e2e::fixtures::content;
use outpost_e2e::metrics::sample;
use outpost_e2e::oci::*;
use outpost_e2e::parent::{DockerRegistry, FaultProxy};
use outpost_e2e::scenarios::{
    NO_SYNC, fsck_clean, kill9_mid_sync_resumes, logs_clean, outpost_on,
    sixteen_clients_share_one_upstream_get, two_replicas, wait_keys,
};
use outpost_e2e::*;
use serde_json::Value;

/// Blob downloads through `proxy` that the parent answered with content. (A push to a
/// readwrite Outpost asks about blobs the parent does not have: 404s, not downloads.)
fn blob_downloads(proxy: &FaultProxy) -> usize {
    proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status / 100 == 2)
        .count()
}

/// Whether the object keys `keys` hold the blob `digest`.
fn has_blob_object(keys: &[String], digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    keys.iter()
        .any(|k| k.starts_with("blobs/") && k.ends_with(hex))
}

#[test]
fn sync_from_docker_registry_to_azurite() {
    let parent = DockerRegistry::builder().start();
    let c = content(run_seed() + 1000);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    load(&c.layout, "v2", &parent.host(), "team/app:v2", &[]);
    load(&c.layout, "multi", &parent.host(), "team/multi:latest", &[]);
    let proxy = FaultProxy::start(&parent.host());
    let cs = conn("edge-az", "u", "p", &proxy.host(), "http");
    let mut outpost = Registry::start_on(
        Backend::Azurite,
        &[
            "--connection-string",
            &cs,
            "--mode",
            "readwrite",
            "--chunk-size-mb",
            "1",
            "--sync-schedule",
            "0 0 1 1 *",
        ],
    );
    wait_run_success(&outpost, 1, Duration::from_secs(60));
    let top = Endpoint::plain(&parent.host());
    let local = Endpoint::plain(&outpost.host());
    for repo in ["team/app", "team/multi"] {
        assert_repo_identical(&top, &local, repo);
    }
    // Every blob byte-identical, each downloaded once, each an object in the container.
    let refs = [
        ("team/app", "v1"),
        ("team/app", "v2"),
        ("team/multi", "latest"),
    ];
    let blobs = blob_sizes(&top, &refs);
    let app_blobs = blob_sizes(&top, &refs[..2]);
    let repo_of = |d: &str| {
        if app_blobs.contains_key(d) {
            "team/app"
        } else {
            "team/multi"
        }
    };
    for (d, size) in &blobs {
        let got = local.blob(repo_of(d), d);
        assert_eq!(got.len() as u64, *size, "{d}");
        assert_eq!(&sha256(&got), d);
    }
    let m = metrics_text(&outpost);
    assert_eq!(
        metric(&m, "outpost_sync_bytes_downloaded_total"),
        blobs.values().sum::<u64>(),
        "each blob downloaded exactly once"
    );
    let storage = outpost.object.clone().expect("on Azurite");
    let keys = storage.keys();
    for d in blobs.keys() {
        assert!(has_blob_object(&keys, d), "{d} is not an object: {keys:?}");
    }
    assert!(
        keys.iter().any(|k| k.starts_with("sync/")),
        "the sync state is a document in the container: {keys:?}"
    );

    let before = admin_status(&outpost);
    let blob_gets = blob_downloads(&proxy);
    assert_eq!(blob_gets, blobs.len(), "one GET per blob");

    // A new process on the same container, which syncs only when asked, starts from the state
    // the first one left there. (Stopped with SIGTERM, which stores the state: its writer
    // coalesces changes, so a kill -9 may by design lose the last moment of it; the kill -9
    // cases are the outbox below and kill_9_mid_sync_resumes.)
    let mut args = vec!["--connection-string", cs.as_str(), "--mode", "readwrite"];
    args.extend_from_slice(&NO_SYNC);
    outpost.sigterm();
    assert!(outpost.wait_exit(Duration::from_secs(40)).success());
    outpost.restart_with_args(&args);
    let after = admin_status(&outpost);
    for field in ["lastSyncUtc", "lastRun", "connectionState"] {
        assert_eq!(after[field], before[field], "{field} after the restart");
    }
    assert_eq!(after["lastRun"]["number"], 1, "{after:#}");
    let names = |s: &Value| -> Vec<(String, u64)> {
        s["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                (
                    r["name"].as_str().unwrap().to_owned(),
                    r["tags"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(names(&after), names(&before));
    assert_eq!(
        names(&after),
        [("team/app".to_owned(), 2), ("team/multi".to_owned(), 1)]
    );
    // Still served, the whole index included, with nothing fetched from the parent.
    assert_repo_identical(&top, &local, "team/multi");
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &format!("docker://{}/team/multi:latest", outpost.host()),
        &format!("oci:{}:m", out.path().join("pulled").display()),
    ]);
    assert_eq!(blob_downloads(&proxy), blob_gets, "served from the store");

    // A local push waits in the outbox, which a kill -9 does not empty: the push was
    // acknowledged only once its entry was stored.
    load(&c.layout, "v3", &outpost.host(), "team/app:local", &[]);
    assert_eq!(admin_status(&outpost)["outboxPending"], 1);
    outpost.restart();
    assert_eq!(admin_status(&outpost)["outboxPending"], 1);

    // The next run downloads nothing again and uploads the waiting push.
    sync_now(&outpost);
    let s = admin_status(&outpost);
    assert_eq!(s["lastRun"]["number"], 2, "{s:#}");
    assert_eq!(s["lastRun"]["result"], "success", "{s:#}");
    assert_eq!(s["lastRun"]["bytesDownloaded"], 0, "{s:#}");
    assert_eq!(s["lastRun"]["blobsDownloaded"], 0, "{s:#}");
    assert_eq!(s["lastRun"]["pushedToParent"], 1, "{s:#}");
    assert_eq!(s["outboxPending"], 0, "{s:#}");
    assert_eq!(
        blob_downloads(&proxy),
        blob_gets,
        "no blob fetched again: {:?}",
        proxy.requests()
    );
    assert_eq!(
        sample(
            &metrics_text(&outpost),
            "outpost_sync_bytes_downloaded_total"
        ),
        Some(0.0)
    );
    assert_eq!(
        top.manifest("team/app", "local"),
        local.manifest("team/app", "local"),
        "the push reached the parent\n{}",
        outpost.log_text()
    );
    for repo in ["team/app", "team/multi"] {
        assert_repo_identical(&top, &local, repo);
    }
    fsck_clean(&outpost);
}

#[test]
fn pull_through_16_clients_one_upstream_get() {
    sixteen_clients_share_one_upstream_get(Backend::Azurite, 32 * MIB as usize, run_seed() + 2000);
}

#[test]
fn kill_9_mid_sync_resumes() {
    kill9_mid_sync_resumes(Backend::Azurite, 48 * MIB as usize, 2, run_seed() + 3000);
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// Waits until the wall clock is in a later second than `t`: pull times have a resolution of
/// one second, so pulls in different seconds are ordered.
fn next_second(t: SystemTime) {
    let deadline = Instant::now() + Duration::from_secs(3);
    while unix_secs(SystemTime::now()) <= unix_secs(t) {
        assert!(Instant::now() < deadline, "the clock stands still");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls the metrics until `name` reaches at least `min`; its value.
fn wait_metric(reg: &Registry, name: &str, min: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let m = metrics_text(reg);
        let v = sample(&m, name).unwrap_or(0.0) as u64;
        if v >= min {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{name} stayed at {v}\n{}",
            reg.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn retention_and_staging_on_azurite() {
    const S: u64 = 2 * MIB;
    let seed = run_seed() + 4000;
    let parent = DockerRegistry::builder().start();
    let up = Endpoint::plain(&parent.host());
    let repos = ["lru/a", "lru/b", "lru/c", "lru/d", "keep/staged"];
    let layers: Vec<String> = repos
        .iter()
        .zip(seed..)
        .map(|(r, s)| push_raw_image(&up, r, "v1", &pseudo_random(s, S as usize)))
        .collect();
    let layer = |repo: &str| layers[repos.iter().position(|r| *r == repo).unwrap()].clone();
    // Four images fit (4 S and their small manifests and config), the fifth does not; back
    // under 90 % of the limit means two must go.
    let limit = S * 42 / 10;
    let limit_arg = limit.to_string();
    let mut outpost = outpost_on(
        Backend::Azurite,
        &parent.host(),
        &["--max-storage", &limit_arg],
    );
    let storage = outpost.object.clone().expect("on Azurite");
    let ep = Endpoint::plain(&outpost.host());

    // Staged first, never pulled: the least recently pulled of all, and pinned.
    let id = stage(&outpost, r#"{"images": ["keep/staged:v1"]}"#);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = staging_get(&outpost, &id);
        if r["state"] == "succeeded" {
            break;
        }
        assert_ne!(r["images"][0]["state"], "failed", "{r:#}");
        assert!(Instant::now() < deadline, "{r:#}\n{}", outpost.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // The gauge is set after the request's new state is stored, so a kill from here on
    // cannot lose it.
    wait_metric(&outpost, "outpost_staging_images{state=\"staged\"}", 1);

    // Pulled in distinct seconds: a, b, c, a again, then d, which takes the store over the
    // limit. Least recently pulled: b, then c (the names' order would say a, b).
    let pull = |repo: &str| {
        let got = ep.manifest(repo, "v1").expect("pulled through");
        assert_eq!(Some(got), up.manifest(repo, "v1"), "{repo}");
        let t = SystemTime::now();
        wait_stored(&outpost, repo, "v1");
        next_second(t);
    };
    for repo in ["lru/a", "lru/b", "lru/c", "lru/a", "lru/d"] {
        pull(repo);
    }
    assert_eq!(
        wait_metric(&outpost, "outpost_evictions_total", 1),
        2,
        "two images evicted\n{}",
        outpost.log_text()
    );
    let m = metrics_text(&outpost);
    assert!(metric(&m, "outpost_evicted_bytes_total") >= 2 * S, "{m}");
    // Measured by one listing at start; the checks every 10 s and the eviction list no blobs.
    assert_eq!(
        metric(&m, "outpost_storage_listings_total{what=\"blobs\"}"),
        1,
        "{m}"
    );
    for repo in ["lru/b", "lru/c"] {
        assert!(ep.tags(repo).is_empty(), "{repo} evicted");
    }
    for repo in ["lru/a", "lru/d", "keep/staged"] {
        assert_eq!(ep.tags(repo), ["v1"], "{repo} kept");
    }
    let objects = storage.objects();
    let keys: Vec<String> = objects.iter().map(|(k, _)| k.clone()).collect();
    for repo in ["lru/b", "lru/c"] {
        assert!(
            !has_blob_object(&keys, &layer(repo)),
            "{repo}'s layer removed"
        );
    }
    for repo in ["lru/a", "lru/d", "keep/staged"] {
        assert!(has_blob_object(&keys, &layer(repo)), "{repo}'s layer kept");
    }
    let stored: u64 = objects
        .iter()
        .filter(|(k, _)| k.starts_with("blobs/"))
        .map(|(_, n)| n)
        .sum();
    assert!(
        stored <= limit / 100 * 90 && stored >= 3 * S,
        "{stored} bytes of blobs left, limit {limit}: {objects:?}"
    );

    // A new process with a limit nothing fits under: every image goes but the staged one,
    // whose request it found in the container.
    let cs = conn("edge", "u", "p", &parent.host(), "http");
    let mut args = vec!["--connection-string", cs.as_str(), "--max-storage", "1"];
    args.extend_from_slice(&NO_SYNC);
    outpost.restart_with_args(&args);
    let r = staging_get(&outpost, &id);
    assert_eq!(
        r["state"], "succeeded",
        "the staging request survived: {r:#}"
    );
    assert_eq!(r["images"][0]["state"], "staged", "{r:#}");
    assert_eq!(
        wait_metric(&outpost, "outpost_evictions_total", 1),
        2,
        "a and d evicted, the staged image not\n{}",
        outpost.log_text()
    );
    for repo in ["lru/a", "lru/d"] {
        assert!(ep.tags(repo).is_empty(), "{repo} evicted");
    }
    assert_eq!(ep.tags("keep/staged"), ["v1"]);
    assert!(has_blob_object(&storage.keys(), &layer("keep/staged")));
    // All of it is here: it pulls with the parent gone.
    drop(parent);
    let out = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}/keep/staged:v1", outpost.host()),
        &format!("oci:{}:s", out.path().join("pulled").display()),
    ]);
    assert_eq!(
        sha256(&ep.blob("keep/staged", &layer("keep/staged"))),
        layer("keep/staged")
    );
    // Eviction left no dangling link or manifest behind.
    fsck_clean(&outpost);
}

/// Pull-through with two replicas on one container (one leads): a replica that does not lead
/// answers at once too. Both miss the same blob at the same moment, so each may fetch it from
/// the parent (at most two GETs), and both clients get every byte; the container ends up with
/// one object for the blob and no upload left over, and later pulls at either replica are hits.
#[test]
fn two_replicas_pull_the_same_blob_through_at_once() {
    const SIZE: usize = 16 * MIB as usize;
    let parent = DockerRegistry::builder().start();
    let layer = pseudo_random(run_seed() + 2100, SIZE);
    let digest = push_raw_image(&Endpoint::plain(&parent.host()), "big/layer", "v1", &layer);
    drop(layer);
    let proxy = FaultProxy::start(&parent.host());
    let storage = Backend::Azurite.object_storage().expect("Azurite");
    let c = conn("edge-ha", "u", "p", &proxy.host(), "http");
    let mut args = vec!["--connection-string", c.as_str()];
    args.extend_from_slice(&NO_SYNC);
    let replicas = two_replicas(&storage, &args);
    let urls: Vec<String> = replicas
        .iter()
        .map(|r| format!("{}/v2/big/layer/blobs/{digest}", r.url()))
        .collect();
    let start = std::sync::Arc::new(std::sync::Barrier::new(urls.len()));
    let pulls: Vec<_> = urls
        .iter()
        .cloned()
        .map(|url| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                get_digest(&url)
            })
        })
        .collect();
    for (i, p) in pulls.into_iter().enumerate() {
        assert_eq!(
            p.join().expect("client"),
            (200, SIZE as u64, digest.clone()),
            "replica {i}:\n{}",
            replicas[i].log_text()
        );
    }
    let path = format!("/blobs/{digest}");
    let gets = proxy.gets_for(&path);
    assert!((1..=2).contains(&gets), "upstream GETs: {gets}");

    // Committed after the clients' reads may have ended: wait (bounded) for one object and
    // no upload session, then nothing more may appear.
    let hex = digest.trim_start_matches("sha256:");
    let settled = |keys: &[String]| {
        keys.iter()
            .filter(|k| k.starts_with("blobs/") && k.ends_with(hex))
            .count()
            == 1
            && !keys.iter().any(|k| k.starts_with("uploads/"))
    };
    wait_keys(
        &storage,
        "one blob object and no upload expected",
        &replicas,
        settled,
    );
    for url in &urls {
        assert_eq!(get_digest(url), (200, SIZE as u64, digest.clone()));
    }
    assert_eq!(proxy.gets_for(&path), gets, "later pulls are hits");
    eprintln!("upstream GETs for the blob: {gets}");
    logs_clean(&replicas);
    fsck_clean(&replicas[0]);
}
