//! Sync from a real parent: Debian's docker-registry (Basic auth over TLS, or plain behind a
//! fault-injecting proxy), and Outpost itself as the parent of another Outpost.

use std::process::Command;
use std::time::Duration;

use outpost_e2e::emulators::Backend;
use outpost_e2e::fixtures::{big_image, content};
use outpost_e2e::metrics::sample;
use outpost_e2e::oci::*;
use outpost_e2e::parent::{DockerRegistry, FaultProxy};
use outpost_e2e::scenarios::kill9_mid_sync_resumes;
use outpost_e2e::*;
use serde_json::{Value, json};

/// A cosign-style signature: an OCI artifact whose subject is `subject`, tagged the way cosign
/// tags signatures (`sha256-<hex>.sig`), since docker-registry has no referrers API.
fn push_signature(ep: &Endpoint, repo: &str, subject: &[u8]) -> (String, Vec<u8>) {
    let config = ep.push_blob(repo, b"{}");
    let payload = format!(
        r#"{{"critical":{{"image":{{"docker-manifest-digest":"{}"}}}}}}"#,
        sha256(subject)
    );
    let layer = ep.push_blob(repo, payload.as_bytes());
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.dev.cosign.artifact.sig.v1+json",
        "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": config, "size": 2},
        "layers": [{"mediaType": "application/vnd.dev.cosign.simplesigning.v1+json", "digest": layer, "size": payload.len()}],
        "subject": {"mediaType": OCI_MANIFEST, "digest": sha256(subject), "size": subject.len()},
    });
    let bytes = serde_json::to_vec(&m).unwrap();
    let tag = format!("{}.sig", sha256(subject).replace(':', "-"));
    assert_eq!(ep.push_manifest(repo, &tag, OCI_MANIFEST, &bytes), 201);
    (sha256(&bytes), bytes)
}

#[test]
fn sync_from_tls_basic_parent_is_byte_identical_and_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let parent = DockerRegistry::builder()
        .basic_auth("syncer", "s3cret-pass")
        .tls(&pki.cert, &pki.key)
        .start();
    let creds = parent.skopeo_dest_args(Some(&pki.ca_cert));
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    let c = content(run_seed());
    let host = parent.host();
    let up = |tag: &str, repo_tag: &str| {
        let src = format!("oci:{}:{tag}", c.layout.path.display());
        let dst = format!("docker://{host}/{repo_tag}");
        let mut args = vec!["copy", "--all"];
        args.extend_from_slice(&creds);
        args.push(&src);
        args.push(&dst);
        skopeo(&args);
    };
    up("v1", "team/app:v1");
    up("v2", "team/app:v2");
    up("multi", "team/multi:latest");
    up("base", "lonely:1.0");
    up("v1", "other/secret:v1");
    let parent_ep = Endpoint {
        base: format!("https://{host}"),
        client: client_with_ca(Some(&pki.ca_cert)),
        basic: Some(("syncer".into(), "s3cret-pass".into())),
    };
    let subject = parent_ep.manifest("team/app", "v1").unwrap();
    assert_eq!(sha256(&subject), c.app_v1);
    let (sig_digest, sig_bytes) = push_signature(&parent_ep, "team/app", &subject);

    let conn = conn("edge-1", "syncer", "s3cret-pass", &host, "https");
    let outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn,
        "--parent-ca-file",
        pki.ca_cert.to_str().unwrap(),
        "--repository",
        "team/**",
        "--repository",
        "lonely",
        "--chunk-size-mb",
        "1",
    ]);
    let s = wait_run_success(&outpost, 1, Duration::from_secs(60));
    assert_eq!(s["connectionState"], "online");
    assert_eq!(s["name"], "edge-1");
    assert_eq!(s["mode"], "readonly");
    assert!(s["lastSyncUtc"].as_str().unwrap().ends_with('Z'));

    let local = Endpoint::plain(&outpost.host());
    for repo in ["team/app", "team/multi", "lonely"] {
        assert_repo_identical(&parent_ep, &local, repo);
    }
    let mut cat = local.catalog();
    cat.sort();
    assert_eq!(
        cat,
        ["lonely", "team/app", "team/multi"],
        "nothing out of scope"
    );
    assert!(local.manifest("other/secret", "v1").is_none());

    // The signature arrived byte-identical, and Outpost's referrers API lists it.
    assert_eq!(local.manifest("team/app", &sig_digest).unwrap(), sig_bytes);
    let refs: Value = local
        .get(&format!("/v2/team/app/referrers/{}", c.app_v1))
        .json()
        .unwrap();
    let listed: Vec<&str> = refs["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["digest"].as_str().unwrap())
        .collect();
    assert_eq!(listed, [sig_digest.as_str()]);

    // skopeo sees the same digests.
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--tls-verify=false",
        &format!("docker://{}/team/multi:latest", outpost.host()),
    ]);
    assert_eq!(
        sha256(raw.as_bytes()),
        sha256(&parent_ep.manifest("team/multi", "latest").unwrap())
    );

    // Shared blobs were fetched once: bytes downloaded equal the unique blob bytes.
    let metrics = http()
        .get(format!("{}/metrics", outpost.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        sample(&metrics, "outpost_parent_connected"),
        Some(1.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "outpost_sync_runs_total{result=\"success\"}").is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    let downloaded: u64 = metric(&metrics, "outpost_sync_bytes_downloaded_total");
    let unique: u64 = blob_sizes(
        &parent_ep,
        &[
            ("team/app", "v1"),
            ("team/app", "v2"),
            ("team/multi", "latest"),
            ("lonely", "1.0"),
            ("team/app", &format!("{}.sig", c.app_v1.replace(':', "-"))),
        ],
    )
    .values()
    .sum();
    assert_eq!(downloaded, unique, "each blob downloaded exactly once");

    // The status table and JSON through the CLI.
    let out = admin_cli(&outpost, &["status"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let head = text.lines().next().unwrap();
    for col in [
        "NAME",
        "MODE",
        "CONNECTION STATE",
        "PARENT",
        "LOGIN SERVER",
        "LAST SYNC(UTC)",
        "SYNC SCHEDULE",
        "SYNC WINDOW",
    ] {
        assert!(head.contains(col), "{head}");
    }
    assert!(text.lines().nth(1).unwrap().starts_with("edge-1"), "{text}");
    let out = admin_cli(&outpost, &["status", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["loginServer"], host);
    // Pushes are refused in readonly mode.
    assert_eq!(
        local.push_manifest("team/app", "x", OCI_MANIFEST, &subject),
        403
    );
    // The password never shows in the log.
    assert!(!outpost.log_text().contains("s3cret-pass"));
}

#[test]
fn nested_outposts_and_readwrite_up_the_chain() {
    let parent = DockerRegistry::builder().start();
    let c = content(run_seed() + 10);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    load(&c.layout, "multi", &parent.host(), "team/multi:latest", &[]);

    // A syncs from docker-registry; its tokens file lets B's sync token read and write.
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.toml");
    let t = tokens.to_str().unwrap();
    let outpost_cli = |args: &[&str]| run_ok(Command::new(bin("outpost-registry")).args(args));
    outpost_cli(&[
        "scope-map",
        "create",
        "--tokens",
        t,
        "--name",
        "child",
        "--repository",
        "**",
        "content/read",
        "metadata/read",
        "content/write",
    ]);
    let out = outpost_cli(&[
        "token",
        "create",
        "--tokens",
        t,
        "--name",
        "edge-b",
        "--scope-map",
        "child",
    ]);
    let password = out
        .split_whitespace()
        .find(|w| {
            w.len() >= 20
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        })
        .expect("password printed")
        .to_owned();
    let a = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge-a", "none", "none", &parent.host(), "http"),
        "--mode",
        "readwrite",
        "--tokens",
        t,
    ]);
    wait_run(&a, 1, Duration::from_secs(60));
    let b = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge-b", "edge-b", &password, &a.host(), "http"),
        "--mode",
        "readwrite",
    ]);
    wait_run_success(&b, 1, Duration::from_secs(60));
    let top = Endpoint::plain(&parent.host());
    let leaf = Endpoint::plain(&b.host());
    for repo in ["team/app", "team/multi"] {
        assert_repo_identical(&top, &leaf, repo);
    }

    // A push to B goes up to A at B's next sync, and on to docker-registry at A's.
    load(&c.layout, "v2", &b.host(), "team/app:from-leaf", &[]);
    assert!(top.manifest("team/app", "from-leaf").is_none());
    sync_now(&b);
    let a_ep = Endpoint {
        basic: Some(("edge-b".into(), password.clone())),
        ..Endpoint::plain(&a.host())
    };
    let at_a = a_ep.manifest("team/app", "from-leaf");
    assert!(at_a.is_some(), "pushed up to A\n{}", b.log_text());
    sync_now(&a);
    assert_eq!(
        top.manifest("team/app", "from-leaf"),
        at_a,
        "pushed up to docker-registry\n{}",
        a.log_text()
    );
    assert!(!b.log_text().contains(&password));
}

#[test]
fn offline_parent_keeps_serving_and_comes_back() {
    let mut parent = DockerRegistry::builder().start();
    let c = content(run_seed() + 20);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    load(&c.layout, "multi", &parent.host(), "team/app:multi", &[]);
    load(&c.layout, "v2", &parent.host(), "team/app:gone-soon", &[]);
    let outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge", "u", "p", &parent.host(), "http"),
        "--sync-schedule",
        "*/2 * * * * *",
    ]);
    wait_run(&outpost, 1, Duration::from_secs(60));
    let local = Endpoint::plain(&outpost.host());
    assert_eq!(local.tags("team/app"), ["gone-soon", "multi", "v1"]);

    parent.stop();
    wait_for(&outpost, "offline", Duration::from_secs(30), |s| {
        s["connectionState"] == "offline"
    });
    let metrics = http()
        .get(format!("{}/metrics", outpost.url()))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(sample(&metrics, "outpost_parent_connected"), Some(0.0));
    assert!(
        sample(&metrics, "outpost_sync_runs_total{result=\"failed\"}").is_some_and(|v| v >= 1.0)
    );
    // Everything synced still pulls, multi-arch included.
    let out = tempfile::tempdir().unwrap();
    for tag in ["v1", "multi", "gone-soon"] {
        skopeo(&[
            "copy",
            "--all",
            "--src-tls-verify=false",
            &format!("docker://{}/team/app:{tag}", outpost.host()),
            &format!("oci:{}:{tag}", out.path().join("pulled").display()),
        ]);
    }

    parent.start_again();
    let top = Endpoint::plain(&parent.host());
    load(&c.layout, "v3", &parent.host(), "team/app:v3", &[]);
    let gone = sha256(&top.manifest("team/app", "gone-soon").unwrap());
    top.delete_manifest("team/app", &gone);
    wait_for(
        &outpost,
        "online with the new tag",
        Duration::from_secs(30),
        |s| s["connectionState"] == "online" && local.tags("team/app") == ["multi", "v1", "v3"],
    );
    assert_repo_identical(&top, &local, "team/app");
}

#[test]
fn cut_connection_resumes_from_what_was_stored() {
    let parent = DockerRegistry::builder().start();
    let (_d, layout, layer, size) = big_image(run_seed() + 30, 12 * MIB as usize);
    load(&layout, "big", &parent.host(), "big/image:1", &[]);
    let proxy = FaultProxy::start(&parent.host());
    proxy.cut_after(&format!("/blobs/{layer}"), 5 * MIB + 12345);
    let outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge", "u", "p", &proxy.host(), "http"),
        "--chunk-size-mb",
        "2",
        "--sync-schedule",
        "0 0 1 1 *",
    ]);
    wait_run_success(&outpost, 1, Duration::from_secs(60));
    let starts = proxy.range_starts(&layer);
    assert_eq!(starts.len(), 2, "{:?}", proxy.requests());
    assert_eq!(starts[0], 0);
    // Everything that arrived was kept: at least the last complete chunk (4 MiB), here all of it.
    assert!(
        starts[1] >= 4 * MIB && starts[1] <= 5 * MIB + 12345,
        "{starts:?}"
    );
    assert!(proxy.body_bytes_for(&format!("/blobs/{layer}")) <= size + 2 * MIB);
    let got = Endpoint::plain(&outpost.host()).blob("big/image", &layer);
    assert_eq!(sha256(&got), layer);
}

#[test]
fn kill9_mid_layer_resumes_from_last_complete_chunk() {
    kill9_mid_sync_resumes(Backend::Fs, 16 * MIB as usize, 1, run_seed() + 40);
}

#[test]
fn window_closing_pauses_and_next_window_resumes() {
    let parent = DockerRegistry::builder().start();
    let (_d, layout, layer, size) = big_image(run_seed() + 50, 10 * MIB as usize);
    load(&layout, "big", &parent.host(), "big/image:1", &[]);
    let proxy = FaultProxy::start(&parent.host());
    let outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge", "u", "p", &proxy.host(), "http"),
        "--chunk-size-mb",
        "1",
        "--sync-bandwidth-limit",
        "2000000",
        "--sync-schedule",
        "*/8 * * * * *",
        "--sync-window",
        "PT3S",
    ]);
    let paused = wait_for(&outpost, "a paused run", Duration::from_secs(40), |s| {
        s["lastRun"]["result"] == "paused"
    });
    assert!(paused["syncWindow"] == "PT3S");
    let s = wait_for(&outpost, "a successful run", Duration::from_secs(60), |s| {
        s["lastRun"]["result"] == "success"
    });
    assert!(last_run(&s) >= 2);
    // Each window resumed where the last one stopped. (Bytes the parent had already pushed
    // into socket buffers when a window closed are fetched again, so no bound on bytes here.)
    let starts = proxy.range_starts(&layer);
    assert!(
        starts.len() >= 2 && starts[1..].iter().all(|&o| o > 0),
        "{starts:?}"
    );
    assert!(starts.windows(2).all(|w| w[0] < w[1]), "{starts:?}");
    assert!(*starts.last().unwrap() < size);
    let got = Endpoint::plain(&outpost.host()).blob("big/image", &layer);
    assert_eq!(sha256(&got), layer);
}

#[test]
fn readwrite_push_reaches_parent_after_restart_and_conflicts_go_to_parent() {
    let parent = DockerRegistry::builder().start();
    let c = content(run_seed() + 60);
    load(&c.layout, "v1", &parent.host(), "team/app:shared", &[]);
    // No run starts by itself: a one-second window once a year.
    let mut outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge", "u", "p", &parent.host(), "http"),
        "--mode",
        "readwrite",
        "--sync-schedule",
        "0 0 1 1 *",
        "--sync-window",
        "PT1S",
    ]);
    sync_now(&outpost);
    let top = Endpoint::plain(&parent.host());
    let local = Endpoint::plain(&outpost.host());
    assert_eq!(local.tags("team/app"), ["shared"]);

    load(&c.layout, "v2", &outpost.host(), "team/app:local-only", &[]);
    assert_eq!(admin_status(&outpost)["outboxPending"], 1);
    outpost.restart();
    assert!(
        top.manifest("team/app", "local-only").is_none(),
        "not uploaded before a sync"
    );
    sync_now(&outpost);
    assert_eq!(
        top.manifest("team/app", "local-only"),
        local.manifest("team/app", "local-only"),
        "uploaded after the restart\n{}",
        outpost.log_text()
    );
    assert_eq!(admin_status(&outpost)["outboxPending"], 0);

    // The tag moves at both ends: the parent wins, and says so in the log.
    load(&c.layout, "base", &parent.host(), "team/app:shared", &[]);
    load(&c.layout, "v2", &outpost.host(), "team/app:shared", &[]);
    sync_now(&outpost);
    let theirs = top.manifest("team/app", "shared").unwrap();
    assert_eq!(
        sha256(&theirs),
        c.layout.descriptor("base")["digest"].as_str().unwrap()
    );
    assert_eq!(local.manifest("team/app", "shared").unwrap(), theirs);
    assert!(
        outpost.log_text().contains("the parent wins"),
        "{}",
        outpost.log_text()
    );
}

#[test]
fn bad_connection_strings_name_the_key_and_hide_the_password() {
    let dir = tempfile::tempdir().unwrap();
    let storage = dir.path().join("data");
    for (cs, key) in [
        (
            "ConnectedRegistryName=a;SyncTokenName=b;SyncTokenPassword=hunter2-secret;ParentEndpointProtocol=https",
            "ParentGatewayEndpoint",
        ),
        (
            "ConnectedRegistryName=a;SyncTokenName=b;SyncTokenPassword=hunter2-secret;ParentGatewayEndpoint=x.io;ParentEndpointProtocol=ftp",
            "ParentEndpointProtocol",
        ),
    ] {
        let out = run_timeout(
            Command::new(bin("outpost-registry"))
                .args(["serve", "--storage"])
                .arg(&storage)
                .env("OUTPOST_CONNECTION_STRING", cs),
            Duration::from_secs(30),
        );
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(key), "{err}");
        assert!(!err.contains("hunter2-secret"), "{err}");
    }
    let out = run_timeout(
        Command::new(bin("outpost-registry"))
            .args(["serve", "--storage"])
            .arg(&storage)
            .args([
                "--connection-string",
                &conn("a", "b", "c", "127.0.0.1:1", "http"),
                "--sync-window",
                "4 hours",
            ]),
        Duration::from_secs(30),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--sync-window"));
}

#[test]
fn refused_catalog_still_syncs_exact_names_and_says_why() {
    let parent = DockerRegistry::builder().start();
    let c = content(run_seed() + 70);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    load(&c.layout, "base", &parent.host(), "lonely:1.0", &[]);
    let proxy = FaultProxy::start(&parent.host());
    proxy.refuse("/v2/_catalog", 401);
    let outpost = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge", "u", "p", &proxy.host(), "http"),
        "--repository",
        "team/*",
        "--repository",
        "lonely",
    ]);
    let s = wait_run(&outpost, 1, Duration::from_secs(60));
    assert_eq!(s["lastRun"]["result"], "success", "{s:#}");
    let note = s["scopeNote"].as_str().unwrap_or_default();
    assert!(
        note.contains("team/*") && note.contains("catalog"),
        "{note}"
    );
    let local = Endpoint::plain(&outpost.host());
    assert_eq!(local.catalog(), ["lonely"]);
    assert_repo_identical(&Endpoint::plain(&parent.host()), &local, "lonely");
    let out = admin_cli(&outpost, &["status"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("note: team/*"));
}

#[test]
fn rotated_sync_token_in_the_connection_file_applies_without_restart() {
    let parent = DockerRegistry::builder()
        .basic_auth("syncer", "new-pass")
        .start();
    let c = content(run_seed() + 80);
    let creds = parent.skopeo_dest_args(None);
    let creds: Vec<&str> = creds.iter().map(String::as_str).collect();
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &creds);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("connection-string");
    std::fs::write(
        &file,
        conn("edge", "syncer", "old-pass", &parent.host(), "http"),
    )
    .unwrap();
    let outpost = Registry::start_with_args(&[
        "--connection-string-file",
        file.to_str().unwrap(),
        "--repository",
        "team/app",
        "--sync-schedule",
        "0 0 1 1 *",
    ]);
    let s = wait_run(&outpost, 1, Duration::from_secs(60));
    assert_eq!(s["lastRun"]["result"], "failed", "{s:#}");
    assert_eq!(s["connectionState"], "offline");
    assert!(
        s["lastError"]
            .as_str()
            .unwrap()
            .contains("refused the sync token"),
        "{s:#}"
    );
    std::fs::write(
        &file,
        conn("edge", "syncer", "new-pass", &parent.host(), "http"),
    )
    .unwrap();
    sync_now(&outpost);
    assert_repo_identical(
        &Endpoint {
            basic: Some(("syncer".into(), "new-pass".into())),
            ..Endpoint::plain(&parent.host())
        },
        &Endpoint::plain(&outpost.host()),
        "team/app",
    );
    let log = outpost.log_text();
    assert!(log.contains("parent client rebuilt"), "{log}");
    assert!(!log.contains("old-pass") && !log.contains("new-pass"));
}
