//! Scenarios more than one suite runs, each on the storage backend it is given (a directory,
//! or a container or bucket of an emulator), and the checks they share.

use std::sync::Arc;
use std::time::Duration;

use crate::emulators::{Backend, ObjectStorage};
use crate::fixtures::big_image;
use crate::oci::*;
use crate::parent::{DockerRegistry, FaultProxy};
use crate::*;

/// A schedule that never fires during a test, with a window, so nothing syncs on its own.
pub const NO_SYNC: [&str; 4] = ["--sync-schedule", "0 0 1 1 *", "--sync-window", "PT1M"];

/// An Outpost on `backend` whose parent is `parent_host` (plain HTTP), which syncs only when
/// asked ([`NO_SYNC`]).
pub fn outpost_on(backend: Backend, parent_host: &str, extra: &[&str]) -> Registry {
    let c = conn("edge", "u", "p", parent_host, "http");
    let mut args = vec!["--connection-string", c.as_str()];
    args.extend_from_slice(&NO_SYNC);
    args.extend_from_slice(extra);
    Registry::start_on(backend, &args)
}

/// `fsck` finds no problem in the registry's store.
pub fn fsck_clean(reg: &Registry) {
    let out = reg.cli(&["fsck"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(", 0 problems"),
        "fsck:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Nothing of the blob `digest` is readable in `repo`, no manifest or tag of `repo` exists, and
/// on object storage no object holds the blob or a manifest.
pub fn nothing_partial(reg: &Registry, repo: &str, digest: &str) {
    let c = http();
    let g = c
        .get(format!("{}/v2/{repo}/blobs/{digest}", reg.url()))
        .send()
        .unwrap();
    assert_eq!(g.status(), 404, "no partial blob");
    let t = c
        .get(format!("{}/v2/{repo}/tags/list", reg.url()))
        .send()
        .unwrap();
    assert_eq!(t.status(), 404, "no manifest in {repo}");
    if let Some(o) = &reg.object {
        no_blob_or_manifest_objects(o, digest);
    }
}

/// No object in `o` holds the blob `digest`, and none holds a manifest.
pub fn no_blob_or_manifest_objects(o: &ObjectStorage, digest: &str) {
    let hex = digest.trim_start_matches("sha256:");
    let keys = o.keys();
    assert!(
        !keys
            .iter()
            .any(|k| k.starts_with("blobs/") && k.ends_with(hex)),
        "a blob object for {digest} exists: {keys:?}"
    );
    assert!(
        !keys.iter().any(|k| k.contains("/_manifests/")),
        "a manifest object exists: {keys:?}"
    );
}

/// 16 clients pull the same `size`-byte blob, not stored yet, through an Outpost on `backend`
/// at once: the parent sees exactly one GET, one copy crosses the link, every client gets
/// every byte, and the blob is stored for later pulls.
pub fn sixteen_clients_share_one_upstream_get(backend: Backend, size: usize, seed: u64) {
    const CLIENTS: usize = 16;
    let parent = DockerRegistry::builder().start();
    let layer = pseudo_random(seed, size);
    let digest = push_raw_image(&Endpoint::plain(&parent.host()), "big/layer", "v1", &layer);
    drop(layer);
    let proxy = FaultProxy::start(&parent.host());
    let outpost = outpost_on(backend, &proxy.host(), &[]);
    let url = format!("{}/v2/big/layer/blobs/{digest}", outpost.url());
    let start = Arc::new(std::sync::Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|i| {
            let (url, start) = (url.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                // Staggered a little: late readers join the download in progress.
                std::thread::sleep(Duration::from_millis(20 * i as u64));
                let (status, n, digest) = get_digest(&url);
                assert_eq!(status, 200, "client {i}");
                (n, digest)
            })
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        let (n, d) = h.join().unwrap();
        assert_eq!(n, size as u64, "client {i} got every byte");
        assert_eq!(d, digest, "client {i} got identical bytes");
    }
    let path = format!("/blobs/{digest}");
    assert_eq!(
        proxy.gets_for(&path),
        1,
        "one upstream GET: {:?}",
        proxy.requests()
    );
    assert_eq!(
        proxy.body_bytes_for(&path),
        size as u64,
        "one copy crossed the link"
    );
    // And it is stored: a later pull is a hit, with no new upstream request.
    let r = http().head(&url).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(proxy.gets_for(&path), 1);
    if let Some(o) = &outpost.object {
        // Committed once the download is verified, which may end after the clients' reads.
        let hex = digest.trim_start_matches("sha256:");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !o
            .keys()
            .iter()
            .any(|k| k.starts_with("blobs/") && k.ends_with(hex))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the blob is not an object in the container: {:?}\n{}",
                o.keys(),
                outpost.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// A sync of one `size`-byte layer, stored in chunks of `chunk_mib` MiB at a capped rate, is
/// killed (SIGKILL) mid-layer. While it is down and after it is back (its resumed request held
/// at the parent's door), nothing of the image is visible; then the download resumes at a
/// chunk boundary, at most one chunk before the last one reached, fetches the rest once, and
/// the image ends up byte-identical with a clean store.
pub fn kill9_mid_sync_resumes(backend: Backend, size: usize, chunk_mib: u64, seed: u64) {
    let chunk = chunk_mib * MIB;
    let parent = DockerRegistry::builder().start();
    let (_d, layout, layer, size) = big_image(seed, size);
    load(&layout, "big", &parent.host(), "big/image:1", &[]);
    let proxy = FaultProxy::start(&parent.host());
    let chunk_arg = chunk_mib.to_string();
    let mut outpost = Registry::start_on(
        backend,
        &[
            "--connection-string",
            &conn("edge", "u", "p", &proxy.host(), "http"),
            "--chunk-size-mb",
            &chunk_arg,
            "--sync-bandwidth-limit",
            "3000000",
            "--sync-schedule",
            "0 0 1 1 *",
            // A blob request must not join the download: what is visible is what is stored.
            "--pull-through",
            "false",
        ],
    );
    let path = format!("/blobs/{layer}");
    // Killed once Outpost itself has taken in 5 MiB (the proxy is ahead by socket buffers).
    let s = wait_for(&outpost, "5 MiB downloaded", Duration::from_secs(30), |s| {
        s["repositories"][0]["bytesDone"].as_u64().unwrap_or(0) >= 5 * MIB
    });
    let taken_in = s["repositories"][0]["bytesDone"].as_u64().unwrap();
    outpost.kill9();
    let before = proxy.body_bytes_for(&path);
    if let Some(o) = &outpost.object {
        // While it is down: the partial download is an upload session in the container, and
        // neither the blob nor a manifest is an object.
        no_blob_or_manifest_objects(o, &layer);
        let keys = o.keys();
        assert!(
            keys.iter().any(|k| k.starts_with("uploads/")),
            "no upload session object: {keys:?}"
        );
    }
    // Back, with the resumed download held at the proxy: still nothing of the image.
    proxy.hold(&path);
    outpost.restart();
    let local = Endpoint::plain(&outpost.host());
    assert_eq!(
        local.get(&format!("/v2/big/image{path}")).status(),
        404,
        "no partial blob"
    );
    let head = http()
        .head(format!("{}/v2/big/image{path}", outpost.url()))
        .send()
        .unwrap();
    assert_eq!(head.status(), 404, "no partial blob (HEAD)");
    assert!(local.tags("big/image").is_empty(), "no tag yet");
    assert!(
        local.manifest("big/image", "1").is_none(),
        "no manifest yet"
    );
    if let Some(o) = &outpost.object {
        no_blob_or_manifest_objects(o, &layer);
    }
    proxy.release();
    wait_run_success(&outpost, 1, Duration::from_secs(90));
    let starts = proxy.range_starts(&layer);
    assert_eq!(starts.len(), 2, "{starts:?}");
    // Resumed exactly at a chunk boundary, no later than what had arrived.
    assert!(
        starts[1] > 0 && starts[1].is_multiple_of(chunk) && starts[1] <= before,
        "{starts:?} {before}"
    );
    // At most the chunk in flight was lost: Outpost had taken in at least `taken_in` bytes;
    // the last whole chunk among them may still have been in its write at the kill (and the
    // bytes of the next are not a chunk), so it resumed no more than one chunk before the
    // last chunk boundary reached. (The proxy's own count also holds what sat unread in
    // socket buffers at the kill, so it is not the measure of what was fetched.)
    assert!(
        starts[1] + chunk >= taken_in / chunk * chunk,
        "{starts:?} taken in {taken_in}"
    );
    let resumed: Vec<_> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.path.contains(&path))
        .collect();
    assert_eq!(resumed[1].status, 206);
    assert_eq!(resumed[1].body_bytes, size - starts[1], "the rest, once");
    let got = local.blob("big/image", &layer);
    assert_eq!(sha256(&got), layer);
    assert_repo_identical(&Endpoint::plain(&parent.host()), &local, "big/image");
    fsck_clean(&outpost);
}

/// Two registries on `storage` (with `extra` arguments) electing a leader through a lease in
/// the store, short so a test does not wait long for one.
pub fn two_replicas(storage: &ObjectStorage, extra: &[&str]) -> [Registry; 2] {
    let mut args = vec![
        "--leader-election",
        "store",
        "--leader-lease-duration",
        "3s",
    ];
    args.extend_from_slice(extra);
    [
        Registry::start_on_storage(Some(storage.clone()), &args),
        Registry::start_on_storage(Some(storage.clone()), &args),
    ]
}

/// Waits (at most 30 s) until the keys in `storage` satisfy `settled`; on timeout, panics
/// with `what`, the keys and the logs of `regs`.
pub fn wait_keys(
    storage: &ObjectStorage,
    what: &str,
    regs: &[Registry],
    settled: impl Fn(&[String]) -> bool,
) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let keys = storage.keys();
        if settled(&keys) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {keys:?}\n{}",
            regs.iter()
                .map(Registry::log_text)
                .collect::<Vec<_>>()
                .join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// No log of `regs` shows a panic or an error.
pub fn logs_clean(regs: &[Registry]) {
    for r in regs {
        let log = r.log_text();
        assert!(!log.contains("panicked") && !log.contains("ERROR"), "{log}");
    }
}
