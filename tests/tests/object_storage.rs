//! outpost-registry on object storage: `serve --storage azblob://…` against Azurite
//! (Microsoft's Azure Blob emulator from npm, installed by tests/run.sh under
//! `$OUTPOST_EMULATORS`), started on loopback by the test and stopped by PID. skopeo pushes an
//! image through the registry and pulls it back; bad storage configuration fails at start with
//! one clear line.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use outpost_e2e::emulators::{self, AZURITE_KEY, ObjectStorage};
use outpost_e2e::{
    Layout, Registry, bin, free_port, header, http, pseudo_random, run_timeout, skopeo,
};

#[test]
fn skopeo_round_trip_through_azure_blob_storage() {
    round_trip(emulators::azurite());
}

#[test]
fn skopeo_round_trip_through_s3() {
    round_trip(emulators::moto());
}

/// skopeo pushes an image with a layer larger than one upload part through a registry on
/// `storage` and pulls it back byte for byte.
fn round_trip(storage: ObjectStorage) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let registry = Registry::start_on_storage(Some(storage), &[]);
    let port = registry.port;

    let layout = Layout::new(dir);
    layout.add_image("v1", "amd64", &[("data/big", pseudo_random(15, 12 << 20))]);
    let dest = format!("docker://127.0.0.1:{port}/object/store:v1");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.path.display()),
        &dest,
    ]);
    let back = dir.join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:v1", back.display()),
    ]);
    let pushed = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:v1", layout.path.display()),
    ]);
    let pulled = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", back.display())]);
    assert_eq!(pushed, pulled, "the manifest comes back byte for byte");
    let manifest: serde_json::Value = serde_json::from_str(&pulled).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap().replace(':', "/");
        let a = std::fs::read(layout.path.join("blobs").join(&d)).unwrap();
        let b = std::fs::read(back.join("blobs").join(&d)).unwrap();
        assert!(a == b, "layer {d} differs");
    }
    let log_text = registry.log_text();
    assert!(log_text.contains("object storage"), "{log_text}");
}

#[test]
fn bad_storage_configuration_fails_at_start_with_one_line() {
    let az = emulators::azurite();
    // The key on the command line this time, so the check that it is never printed bites.
    let storage_args = |url: &str| {
        let mut a = vec!["--storage".to_owned(), url.to_owned()];
        for o in az.options.iter().cloned().chain([
            format!("account_name={}", emulators::AZURITE_ACCOUNT),
            format!("access_key={AZURITE_KEY}"),
        ]) {
            a.push("--storage-option".to_owned());
            a.push(o);
        }
        a
    };
    let cases: [(Vec<String>, &str); 3] = [
        (storage_args("azblob://no-such-container"), "does not exist"),
        (
            vec!["--storage".into(), "ftp://x/y".into()],
            "unknown storage scheme",
        ),
        (
            {
                let mut a = storage_args(&format!("azblob://{}", az.bucket));
                a.extend(["--storage-option".into(), "no_such_option=1".into()]);
                a
            },
            "not an option",
        ),
    ];
    for (args, expect) in cases {
        let out = run_timeout(
            Command::new(bin("outpost-registry"))
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
                .args(&args),
            Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} started: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(
            !stderr.contains(AZURITE_KEY),
            "the key is never printed: {stderr}"
        );
    }
}

/// Polls `ok` every 200 ms until it holds, for at most `limit`.
fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json";

/// The object store goes away while the registry serves (the emulator killed by its PID):
/// blob and manifest GETs are answered 503 `UNAVAILABLE` with a `Retry-After` (the test
/// client's 120 s timeout bounds how long that may take: the object-store client's retries are
/// bounded to seconds), and readiness turns false. Once the emulator runs again on the same
/// port, the registry answers by itself, without a restart; Azurite restarted on the same data
/// gives the same content back, moto (in memory) comes back empty and takes a push again.
fn outage(kind: emulators::Kind) {
    let em = Arc::new(emulators::Emulator::start(kind));
    let storage = em.fresh();
    let registry = Registry::start_on_storage(Some(storage.clone()), &[]);
    let port = registry.port;
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image(
        "v1",
        "amd64",
        &[("data/small", pseudo_random(17, 64 << 10))],
    );
    let push = || {
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:v1", layout.path.display()),
            &format!("docker://127.0.0.1:{port}/outage/app:v1"),
        ])
    };
    push();
    let base = registry.url();
    let manifest_url = format!("{base}/v2/outage/app/manifests/v1");
    let ready_url = format!("{base}/readyz");
    let c = http();
    let get = |url: &str| {
        c.get(url)
            .header("accept", MANIFEST_TYPES)
            .send()
            .expect("an answer within the client's timeout")
    };
    let r = get(&manifest_url);
    assert_eq!(r.status(), 200);
    let manifest: serde_json::Value = r.json().unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let blob_url = format!("{base}/v2/outage/app/blobs/{layer}");
    let r = get(&blob_url);
    assert_eq!(r.status(), 200);
    let layer_bytes = r.bytes().unwrap();
    assert_eq!(get(&ready_url).status(), 200);

    if kind == emulators::Kind::Azurite {
        // Azurite keeps blob metadata in a LokiJS database saved every few seconds: wait
        // until it holds the tag, the push's last object, before killing it.
        let db = em.data_dir().join("__azurite_db_blob__.json");
        let tag_key = "e2e/repositories/outage/app/_manifests/tags/v1";
        wait_for(Duration::from_secs(60), "Azurite saved the push", || {
            std::fs::read_to_string(&db).is_ok_and(|t| t.contains(tag_key))
        });
    }
    em.kill();

    for url in [&blob_url, &manifest_url] {
        let r = get(url);
        assert_eq!(r.status(), 503, "GET {url} with the store gone");
        let retry: u64 = header(&r, "retry-after")
            .parse()
            .expect("Retry-After in seconds");
        assert!(retry >= 1);
        let body: serde_json::Value = r.json().expect("an OCI error body");
        assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    }
    wait_for(
        Duration::from_secs(60),
        "not ready while the store is gone",
        || get(&ready_url).status() == 503,
    );

    em.restart();
    if kind == emulators::Kind::Moto {
        em.create(&storage.bucket);
    }
    wait_for(Duration::from_secs(60), "ready again", || {
        get(&ready_url).status() == 200
    });
    if kind == emulators::Kind::Azurite {
        let r = get(&blob_url);
        assert_eq!(
            r.status(),
            200,
            "the blob again, without a registry restart"
        );
        assert!(r.bytes().unwrap() == layer_bytes);
        let r = get(&manifest_url);
        assert_eq!(r.status(), 200);
        assert_eq!(r.json::<serde_json::Value>().unwrap(), manifest);
    } else {
        assert_eq!(
            get(&blob_url).status(),
            404,
            "answered from the empty bucket"
        );
        push();
        let r = get(&blob_url);
        assert_eq!(r.status(), 200);
        assert!(r.bytes().unwrap() == layer_bytes);
    }
    let log = registry.log_text();
    assert!(log.contains("storage unavailable"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[test]
fn azure_blob_storage_outage_gives_503_and_recovers() {
    outage(emulators::Kind::Azurite);
}

#[test]
fn s3_outage_gives_503_and_recovers() {
    outage(emulators::Kind::Moto);
}

/// `outpost_storage_requests_total` by operation, from the registry's metrics page.
fn storage_requests(registry: &Registry) -> std::collections::BTreeMap<String, f64> {
    let text = http()
        .get(format!("{}/metrics", registry.url()))
        .send()
        .expect("metrics")
        .text()
        .expect("metrics body");
    outpost_e2e::metrics::samples(&text)
        .into_iter()
        .filter(|s| s.name == "outpost_storage_requests_total")
        .map(|s| {
            assert_eq!(s.labels["backend"], "azblob");
            (s.labels["operation"].clone(), s.value)
        })
        .collect()
}

fn spent(
    before: &std::collections::BTreeMap<String, f64>,
    after: &std::collections::BTreeMap<String, f64>,
) -> std::collections::BTreeMap<String, f64> {
    after
        .iter()
        .map(|(op, n)| (op.clone(), n - before.get(op).copied().unwrap_or(0.0)))
        .filter(|(_, n)| *n != 0.0)
        .collect()
}

/// What one push and one pull of a small image (one 64 KiB layer and a config) cost in
/// object-store requests, counted by the registry (`outpost_storage_requests_total`); the
/// figures are printed for the README.
#[test]
fn request_counts_of_a_push_and_a_pull_on_azure_blob_storage() {
    let registry = Registry::start_on_storage(Some(emulators::azurite()), &[]);
    let port = registry.port;
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image(
        "v1",
        "amd64",
        &[("data/small", pseudo_random(18, 64 << 10))],
    );
    let image = format!("docker://127.0.0.1:{port}/counted/app:v1");

    let start = storage_requests(&registry);
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.path.display()),
        &image,
    ]);
    let pushed = storage_requests(&registry);
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &image,
        &format!("oci:{}:v1", back.display()),
    ]);
    let pulled = storage_requests(&registry);

    let push = spent(&start, &pushed);
    let pull = spent(&pushed, &pulled);
    eprintln!("object-store requests, push of one small image: {push:?}");
    eprintln!("object-store requests, pull of one small image: {pull:?}");
    let of =
        |m: &std::collections::BTreeMap<String, f64>, op: &str| m.get(op).copied().unwrap_or(0.0);
    // Pushed: the layer, the config and the manifest, each stored as an object.
    assert!(of(&push, "put") >= 3.0, "{push:?}");
    // A pull reads: it writes and deletes nothing, and reads the manifest and both blobs.
    for op in ["put", "put_multipart", "put_part", "delete", "copy"] {
        assert_eq!(of(&pull, op), 0.0, "a pull sent {op}: {pull:?}");
    }
    assert!(of(&pull, "get") >= 3.0, "{pull:?}");
}

/// `--storage-redirect`: blob GETs are answered 307 to a short-lived signed URL of the object
/// store (an Azure SAS URL checked by Azurite; an S3 presigned URL on moto), which skopeo follows:
/// the image comes back byte for byte while the registry serves no blob byte itself. HEAD stays
/// local; a Range request redirects too and the store honours the Range.
fn redirected_pull(storage: ObjectStorage) {
    let registry = Registry::start_on_storage(Some(storage), &["--storage-redirect"]);
    let port = registry.port;
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    let content = pseudo_random(19, 300 << 10);
    layout.add_image("v1", "amd64", &[("data/file", content)]);
    let image = format!("docker://127.0.0.1:{port}/redirected/app:v1");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.path.display()),
        &image,
    ]);
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &image,
        &format!("oci:{}:v1", back.display()),
    ]);
    let pulled = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", back.display())]);
    let manifest: serde_json::Value = serde_json::from_str(&pulled).unwrap();
    let layer = manifest["layers"][0]["digest"].as_str().unwrap().to_owned();
    let path = layer.replace(':', "/");
    let want = std::fs::read(layout.path.join("blobs").join(&path)).unwrap();
    let got = std::fs::read(back.join("blobs").join(&path)).unwrap();
    assert!(want == got, "the layer comes back byte for byte");

    let text = http()
        .get(format!("{}/metrics", registry.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let served: f64 = outpost_e2e::metrics::samples(&text)
        .into_iter()
        .filter(|s| s.name == "outpost_blob_bytes_served_total")
        .map(|s| s.value)
        .sum();
    assert_eq!(served, 0.0, "blob bytes went through the registry");

    let blob_url = format!("{}/v2/redirected/app/blobs/{layer}", registry.url());
    let c = http(); // does not follow redirects
    let r = c.head(&blob_url).send().unwrap();
    assert_eq!(r.status(), 200, "HEAD stays local");
    assert_eq!(header(&r, "content-length"), want.len().to_string());
    let r = c
        .get(&blob_url)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(r.status(), 307);
    let location = header(&r, "location");
    assert!(
        location.starts_with("http://127.0.0.1:") && !location.contains(&format!(":{port}/")),
        "{location}"
    );
    let r = c
        .get(&location)
        .header("range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206, "the store honours the Range");
    assert_eq!(&r.bytes().unwrap()[..], &want[10..20]);
    // A URL whose signature does not match is refused by the store.
    if location.contains("sig=") {
        let forged = location.replace("sig=", "sig=A");
        assert!(!c.get(&forged).send().unwrap().status().is_success());
    }
}

#[test]
fn storage_redirect_through_azure_sas() {
    redirected_pull(emulators::azurite());
}

#[test]
fn storage_redirect_through_s3_presigned_urls() {
    redirected_pull(emulators::moto());
}

#[test]
fn storage_redirect_is_refused_on_a_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_timeout(
        Command::new(bin("outpost-registry"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
            .arg("--storage")
            .arg(dir.path().join("data"))
            .arg("--storage-redirect"),
        Duration::from_secs(60),
    );
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "started: {text}");
    assert!(
        text.contains("--storage-redirect needs object storage"),
        "{text}"
    );
    assert!(!text.contains("panicked"), "{text}");
}

#[test]
fn two_replicas_push_the_same_blob_and_tag_at_once_on_azure_blob_storage() {
    same_pushes_on_two_replicas(emulators::azurite());
}

#[test]
fn two_replicas_push_the_same_blob_and_tag_at_once_on_s3() {
    same_pushes_on_two_replicas(emulators::moto());
}

/// Two replicas on one store, at the same moment, each push the same multipart-sized layer
/// and then their own manifest to the same tag, twice over: every push succeeds, the tag is
/// one of the two manifests (the last write wins), both manifests and the layer read back
/// from either replica, no upload session is left and fsck is clean.
fn same_pushes_on_two_replicas(storage: ObjectStorage) {
    use outpost_e2e::oci::{Endpoint, OCI_MANIFEST, get_digest};
    use outpost_e2e::scenarios::{fsck_clean, logs_clean, two_replicas, wait_keys};
    let replicas = two_replicas(&storage, &[]);
    let layer = Arc::new(pseudo_random(31, 20 << 20));
    let layer_digest = outpost_e2e::sha256(&layer);
    for round in 0..2 {
        let start = Arc::new(std::sync::Barrier::new(replicas.len()));
        let pushes: Vec<_> = replicas
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (ep, layer, start) = (Endpoint::plain(&r.host()), layer.clone(), start.clone());
                std::thread::spawn(move || {
                    let config = format!(
                        r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"replica":{i},"round":{round}}}"#
                    );
                    start.wait();
                    let cfg = ep.push_blob("same/app", config.as_bytes());
                    let l = ep.push_blob("same/app", &layer);
                    let m = serde_json::to_vec(&serde_json::json!({
                        "schemaVersion": 2,
                        "mediaType": OCI_MANIFEST,
                        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": config.len()},
                        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": l, "size": layer.len()}],
                    }))
                    .unwrap();
                    let status = ep.push_manifest("same/app", "v1", OCI_MANIFEST, &m);
                    (status, outpost_e2e::sha256(&m))
                })
            })
            .collect();
        let pushed: Vec<(u16, String)> = pushes.into_iter().map(|p| p.join().unwrap()).collect();
        for (i, (status, _)) in pushed.iter().enumerate() {
            assert_eq!(
                *status,
                201,
                "round {round}, replica {i}:\n{}",
                replicas[i].log_text()
            );
        }
        for r in &replicas {
            let ep = Endpoint::plain(&r.host());
            let tagged = outpost_e2e::sha256(&ep.manifest("same/app", "v1").expect("tag"));
            assert!(
                pushed.iter().any(|(_, d)| *d == tagged),
                "the tag is neither manifest pushed"
            );
            for (_, d) in &pushed {
                assert!(ep.manifest("same/app", d).is_some(), "manifest {d}");
            }
            let url = format!("{}/v2/same/app/blobs/{layer_digest}", r.url());
            assert_eq!(
                get_digest(&url),
                (200, layer.len() as u64, layer_digest.clone())
            );
        }
    }
    wait_keys(&storage, "upload sessions left", &replicas, |keys| {
        !keys.iter().any(|k| k.starts_with("uploads/"))
    });
    logs_clean(&replicas);
    fsck_clean(&replicas[0]);
}
