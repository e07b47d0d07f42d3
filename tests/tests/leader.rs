//! Leader election among registry processes on one Azurite container: through a Kubernetes
//! Lease against a real kube-apiserver (the shared control plane; each process with a
//! ServiceAccount token whose Role grants the one Lease name only, as the chart's RBAC will),
//! and through a lease document in the store. Exactly one leads (`outpost_leader` 1); a
//! SIGTERM hands the lease over at once, a kill -9 within the lease duration.

use std::time::{Duration, Instant};

use outpost_e2e::Registry;
use outpost_e2e::emulators::{Backend, ObjectStorage};
use outpost_e2e::k8s::{ControlPlane, random_hex};
use serde_json::json;

const LEASE: &str = "outpost-registry";
/// Short, so the test is quick; the retry period is a third of it.
const DURATION_S: u64 = 4;

fn cp() -> &'static ControlPlane {
    ControlPlane::shared()
}

/// A namespace with a ServiceAccount allowed to create Leases and to get and update the one
/// named LEASE (create cannot be limited to a name in RBAC); returns (namespace, token).
fn lease_account() -> (String, String) {
    let ns = format!("leader-{}", random_hex(4));
    cp().create_namespace(&ns, &[]);
    let admin = cp().admin();
    for (path, body) in [
        (
            format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "registry"}}),
        ),
        (
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                   "metadata": {"name": "registry-lease"},
                   "rules": [
                       {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                        "verbs": ["create"]},
                       {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                        "resourceNames": [LEASE], "verbs": ["get", "update"]}]}),
        ),
        (
            format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings"),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                   "metadata": {"name": "registry-lease"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                               "name": "registry-lease"},
                   "subjects": [{"kind": "ServiceAccount", "name": "registry", "namespace": ns}]}),
        ),
    ] {
        let (status, body) = admin.post(&path, &body);
        assert_eq!(status, 201, "POST {path}: {body}");
    }
    let token = cp().service_account_token(&ns, "registry");
    (ns, token)
}

/// The sample `name` of `r`'s metrics, if it answers and has one.
fn gauge(r: &Registry, name: &str) -> Option<f64> {
    let text = outpost_e2e::http()
        .get(format!("{}/metrics", r.url()))
        .send()
        .ok()?
        .text()
        .ok()?;
    outpost_e2e::metrics::sample(&text, name)
}

fn leader_gauge(r: &Registry) -> Option<f64> {
    gauge(r, "outpost_leader")
}

/// Waits until exactly one of `rs` reports itself leader; its index.
fn one_leader(rs: &[&Registry], within: Duration) -> usize {
    let deadline = Instant::now() + within;
    loop {
        let gauges: Vec<Option<f64>> = rs.iter().map(|r| leader_gauge(r)).collect();
        let leaders: Vec<usize> = (0..rs.len()).filter(|i| gauges[*i] == Some(1.0)).collect();
        if leaders.len() == 1 && gauges.iter().all(Option::is_some) {
            return leaders[0];
        }
        assert!(
            leaders.len() <= 1,
            "two leaders at once: {gauges:?}\n{}",
            rs.iter()
                .map(|r| r.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        assert!(
            Instant::now() < deadline,
            "no single leader within {within:?}: {gauges:?}\n{}",
            rs.iter()
                .map(|r| r.log_text())
                .collect::<Vec<_>>()
                .join("\n---\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn holder(ns: &str) -> String {
    let lease = cp().admin().get_ok(&format!(
        "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEASE}"
    ));
    lease["spec"]["holderIdentity"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// `n` registries on `storage`, syncing from the parent of the connection string `cs`,
/// electing through a lease in the store (DURATION_S), with `extra` arguments.
fn store_replicas(storage: &ObjectStorage, n: usize, cs: &str, extra: &[&str]) -> Vec<Registry> {
    let duration = format!("{DURATION_S}s");
    let mut args = vec![
        "--connection-string",
        cs,
        "--leader-election",
        "store",
        "--leader-lease-duration",
        duration.as_str(),
    ];
    args.extend_from_slice(extra);
    (0..n)
        .map(|_| Registry::start_on_storage(Some(storage.clone()), &args))
        .collect()
}

/// Of two replicas: (leader, follower), once one leads.
fn leader_and_follower(rs: &[Registry]) -> (&Registry, &Registry) {
    let first = one_leader(&[&rs[0], &rs[1]], Duration::from_secs(DURATION_S * 5));
    (&rs[first], &rs[1 - first])
}

#[test]
fn exactly_one_replica_leads_through_a_kubernetes_lease_and_hands_over() {
    let (ns, token) = lease_account();
    let dir = tempfile::tempdir().expect("temp dir");
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, cp().kubeconfig_text(Some(&token), Some(&ns)))
        .expect("write kubeconfig");
    let path = kubeconfig.to_str().expect("utf-8 path").to_owned();
    elect_and_hand_over("kubernetes", &[("KUBECONFIG", path.as_str())], |leader| {
        assert!(
            leader.log_text().contains(&holder(&ns)),
            "the Lease names the leader: {}",
            holder(&ns)
        );
    });
}

/// Without Kubernetes: the lease is a document in the store, written conditionally.
#[test]
fn exactly_one_replica_leads_through_a_lease_in_the_store_and_hands_over() {
    elect_and_hand_over("store", &[], |_| {});
}

#[test]
fn leader_election_is_refused_on_a_directory() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = std::process::Command::new(outpost_e2e::bin("outpost-registry"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--storage")
        .arg(dir.path())
        .args(["--leader-election", "store"])
        .output()
        .expect("run outpost-registry");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("--leader-election needs object storage"),
        "{err}"
    );
}

/// Two registries on one Azurite container elect one leader through `--leader-election
/// <election>`; SIGTERM hands over at once; after a kill -9 a newcomer waits for the lease to
/// expire. `check_leader` looks at the first leader.
fn elect_and_hand_over(election: &str, env: &[(&str, &str)], check_leader: impl Fn(&Registry)) {
    let storage = Backend::Azurite.object_storage().expect("Azurite");
    let duration = format!("{DURATION_S}s");
    let args = [
        "--leader-election",
        election,
        "--leader-lease-duration",
        duration.as_str(),
    ];
    let start = || Registry::start_with_env(Some(storage.clone()), &args, env);
    let a = start();
    let b = start();
    let lease_time = Duration::from_secs(DURATION_S);

    // Exactly one leads, and it stays so over several renewals.
    let first = one_leader(&[&a, &b], lease_time * 5);
    std::thread::sleep(lease_time * 2);
    assert_eq!(
        one_leader(&[&a, &b], lease_time),
        first,
        "leadership moved while both ran"
    );
    let (leader, other) = if first == 0 { (a, b) } else { (b, a) };
    check_leader(&leader);

    // SIGTERM: the leader gives the lease up, the other takes it within one retry period.
    let handed = Instant::now();
    leader.sigterm();
    let mut leader = leader;
    assert!(leader.wait_exit(Duration::from_secs(40)).success());
    assert_eq!(one_leader(&[&other], lease_time * 3), 0);
    assert!(
        handed.elapsed() < lease_time * 3,
        "handover took {:?}",
        handed.elapsed()
    );

    // kill -9: nobody releases; a new replica takes over once the lease has gone unrenewed
    // for its duration (observed on its own clock), and never before the old one is gone.
    let mut old = other;
    let c = start();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        leader_gauge(&c),
        Some(0.0),
        "a newcomer does not take a live lease"
    );
    old.kill9();
    let killed = Instant::now();
    assert_eq!(one_leader(&[&c], lease_time * 4), 0);
    // The last renewal was at most a third of the duration before the kill.
    assert!(
        killed.elapsed() >= lease_time / 2,
        "took the lease {:?} after the leader died, before it expired",
        killed.elapsed()
    );
}

/// With a parent: of two replicas on one container only the leader syncs (each blob comes
/// from the parent once), and the other answers status with the leader's state, re-read from
/// the store.
#[test]
fn only_the_leader_syncs_and_the_other_reports_its_state() {
    use outpost_e2e::oci::{conn, load, wait_for, wait_run_success};
    use outpost_e2e::parent::{DockerRegistry, FaultProxy};

    let parent = DockerRegistry::builder().start();
    let c = outpost_e2e::fixtures::content(outpost_e2e::run_seed() + 3000);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    load(&c.layout, "v2", &parent.host(), "team/app:v2", &[]);
    let proxy = FaultProxy::start(&parent.host());
    let cs = conn("edge-ha", "u", "p", &proxy.host(), "http");
    let storage = Backend::Azurite.object_storage().expect("Azurite");
    let replicas = store_replicas(&storage, 2, &cs, &[]);
    let (leader, follower) = leader_and_follower(&replicas);

    let s = wait_run_success(leader, 1, Duration::from_secs(90));
    // The follower re-reads the state every few seconds: the same run, the same last sync.
    wait_for(
        follower,
        "the leader's state",
        Duration::from_secs(30),
        |f| {
            f["lastRun"]["number"] == s["lastRun"]["number"] && f["lastSyncUtc"] == s["lastSyncUtc"]
        },
    );
    assert!(
        !follower.log_text().contains("sync started"),
        "the follower ran a sync:\n{}",
        follower.log_text()
    );
    // The last success is the site's: the same gauge at both, so alerts hold at either.
    let last = |r: &Registry| gauge(r, "outpost_sync_last_success_timestamp_seconds");
    let at_leader = last(leader).expect("a last success at the leader");
    assert!(at_leader > 0.0);
    // Set right after the state re-read that the status above showed: allow that moment. The
    // same instant, to a millisecond (it went through the state's JSON).
    let same = |t: Option<f64>| t.is_some_and(|t| (t - at_leader).abs() < 0.001);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !same(last(follower)) {
        assert!(
            Instant::now() < deadline,
            "{:?} vs {at_leader}",
            last(follower)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Each blob came from the parent once.
    let mut fetched: Vec<String> = proxy
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/") && r.status / 100 == 2)
        .map(|r| r.path)
        .collect();
    let all = fetched.len();
    fetched.sort();
    fetched.dedup();
    assert!(
        all > 0 && fetched.len() == all,
        "blob GETs at the parent: {all}, distinct {}",
        fetched.len()
    );

    // A staging request accepted by the follower is downloaded by the leader; both report it.
    load(&c.layout, "v1", &parent.host(), "team/staged:v1", &[]);
    let admin = |r: &Registry| format!("http://127.0.0.1:{}/outpost/v1/staging", r.admin_port);
    let resp = outpost_e2e::http()
        .post(admin(follower))
        .json(&serde_json::json!({"images": ["team/staged:v1"]}))
        .send()
        .expect("POST staging");
    assert_eq!(resp.status(), 202);
    let id = resp.json::<serde_json::Value>().expect("json")["id"]
        .as_str()
        .expect("an id")
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(60);
    for r in [leader, follower] {
        loop {
            let got: serde_json::Value = outpost_e2e::http()
                .get(format!("{}/{id}", admin(r)))
                .send()
                .and_then(|r| r.json())
                .unwrap_or_default();
            if got["state"] == "succeeded" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "staging {id} not reported succeeded: {got:#}\n{}",
                r.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    assert!(
        leader.log_text().contains("image staged"),
        "{}",
        leader.log_text()
    );
    assert!(
        !follower.log_text().contains("image staged"),
        "the follower downloaded:\n{}",
        follower.log_text()
    );
}

/// kill -9 of the leader in the middle of a sync, on three replicas: another one leads within
/// the lease duration and a retry period, its first run resumes the old leader's partial
/// downloads from their stored chunks (a Range from the chunk boundary reached), the image
/// ends up byte-identical, and the parent served no more blob bytes than the blobs' sizes
/// plus one chunk per blob that was in flight at the kill. The interrupted run serves a sync
/// asked of a follower: the new leader serves that request in its own run.
#[test]
fn kill_9_of_the_leader_mid_sync_hands_over_and_resumes_from_the_stored_chunks() {
    use outpost_e2e::oci::{Endpoint, MIB, OCI_MANIFEST, assert_repo_identical, conn};
    use outpost_e2e::parent::{DockerRegistry, FaultProxy};
    use outpost_e2e::scenarios::fsck_clean;

    const CHUNK_MIB: u64 = 2;
    let chunk = CHUNK_MIB * MIB;
    // The parent stalls each layer after two and a half chunks: two are stored, and half of
    // the third is in the leader's memory when it dies.
    let stall_at = chunk * 5 / 2;
    let stored_at_kill = stall_at / chunk * chunk;

    // A small image for the first run, which comes at start.
    let parent = DockerRegistry::builder().start();
    let top = Endpoint::plain(&parent.host());
    let small = b"a small layer".to_vec();
    outpost_e2e::oci::push_raw_image(&top, "team/small", "v1", &small);
    let seed = outpost_e2e::run_seed();
    let repo = "team/big";

    let proxy = FaultProxy::start(&parent.host());
    proxy.stall_after("/blobs/", stall_at);
    let cs = conn("edge-ha", "u", "p", &proxy.host(), "http");
    let storage = Backend::Azurite.object_storage().expect("Azurite");
    let chunk_arg = CHUNK_MIB.to_string();
    let extra = [
        "--chunk-size-mb",
        &chunk_arg,
        "--sync-schedule",
        "0 0 1 1 *",
    ];
    let mut replicas = store_replicas(&storage, 3, &cs, &extra);
    let lease_time = Duration::from_secs(DURATION_S);
    let first = one_leader(&replicas.iter().collect::<Vec<_>>(), lease_time * 5);

    // Then two layers of several chunks (not whole chunks), so two downloads are in flight at
    // once, brought by a sync asked of a follower.
    outpost_e2e::oci::wait_run_success(&replicas[first], 1, Duration::from_secs(90));
    let layers: Vec<Vec<u8>> = (0..2u64)
        .map(|i| outpost_e2e::pseudo_random(seed + i, (7 * MIB + 4321 * (i + 1)) as usize))
        .collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let config_digest = top.push_blob(repo, config);
    let layer_digests: Vec<String> = layers.iter().map(|l| top.push_blob(repo, l)).collect();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config.len()},
        "layers": layer_digests.iter().zip(&layers).map(|(d, l)| json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": d, "size": l.len()
        })).collect::<Vec<_>>(),
    });
    let manifest = serde_json::to_vec(&manifest).expect("manifest json");
    assert_eq!(top.push_manifest(repo, "v1", OCI_MANIFEST, &manifest), 201);
    // The small image's config is the same blob as this one's.
    let total: u64 = config.len() as u64
        + small.len() as u64
        + layers.iter().map(|l| l.len() as u64).sum::<u64>();
    let follower = (first + 1) % replicas.len();
    let asked = outpost_e2e::http()
        .post(format!(
            "http://127.0.0.1:{}/outpost/v1/sync",
            replicas[follower].admin_port
        ))
        .send()
        .expect("POST sync");
    assert_eq!(asked.status(), 202);
    let request = asked.json::<serde_json::Value>().expect("json")["request"]
        .as_str()
        .expect("a request id")
        .to_owned();

    // Both layers stalled at the parent, and both partial downloads stored up to the last
    // whole chunk (the upload sessions' durable offsets, as the store holds them).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let stalled = proxy.requests().iter().filter(|r| r.stalled).count();
        let offsets = session_offsets(&storage);
        if stalled == layers.len()
            && offsets.len() == layers.len()
            && offsets.iter().all(|o| *o == stored_at_kill)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not both layers stalled with {stored_at_kill} bytes stored: {stalled} stalled, \
             session offsets {offsets:?}\n{}",
            replicas[first].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let in_flight = proxy.requests().iter().filter(|r| r.stalled).count() as u64;
    let mut old = replicas.remove(first);
    assert!(
        old.log_text().contains("sync started"),
        "{}",
        old.log_text()
    );
    old.kill9();
    let killed = Instant::now();
    // The dead leader's stalled responses are closed, and the successor's pass.
    proxy.end_stalls();

    // A successor within the lease duration and one retry period (the follower's attempts
    // are that far apart), plus the time its lease requests and this poll take.
    let retry = lease_time / 3;
    let bound = lease_time + retry + Duration::from_millis(1500);
    let next = loop {
        if let Some(i) = (0..replicas.len()).find(|i| leader_gauge(&replicas[*i]) == Some(1.0)) {
            break i;
        }
        assert!(
            killed.elapsed() < bound,
            "no new leader {:?} after the kill",
            killed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let took = killed.elapsed();
    eprintln!(
        "new leader {took:?} after the kill (lease {lease_time:?}, retry {retry:?}, bound {bound:?})"
    );
    assert!(
        took >= lease_time / 2,
        "took the lease {took:?} after the leader died, before it expired"
    );
    let refs: Vec<&Registry> = replicas.iter().collect();
    assert_eq!(one_leader(&refs, lease_time), next);
    let leader = &replicas[next];
    let other = &replicas[1 - next];

    // Run 2 died with the old leader; the new leader's run serves the request.
    let s = outpost_e2e::oci::wait_run_success(leader, 3, Duration::from_secs(120));
    eprintln!("the new leader's run: {}", s["lastRun"]);
    let served = s["requests"]
        .as_array()
        .and_then(|r| r.iter().find(|q| q["id"] == request.as_str()))
        .cloned()
        .unwrap_or_default();
    assert_eq!(served["run"], 3, "{s:#}");
    assert_eq!(served["result"], "success", "{s:#}");
    assert!(
        !other.log_text().contains("sync started"),
        "the follower ran a sync:\n{}",
        other.log_text()
    );

    // Each layer: fetched from 0 by the old leader, then from the chunk boundary it had
    // stored, once, by the new one.
    for (digest, layer) in layer_digests.iter().zip(&layers) {
        assert_eq!(
            proxy.range_starts(digest),
            [0, stored_at_kill],
            "GETs of {digest}: {:?}",
            proxy.requests()
        );
        let gets: Vec<_> = proxy
            .requests()
            .into_iter()
            .filter(|r| r.method == "GET" && r.path.contains(&format!("/blobs/{digest}")))
            .collect();
        assert_eq!(gets[1].status, 206, "{gets:?}");
        assert_eq!(
            gets[1].body_bytes,
            layer.len() as u64 - stored_at_kill,
            "the rest, once"
        );
    }
    assert_eq!(
        proxy.gets_for(&format!("/blobs/{config_digest}")),
        1,
        "the config blob came once"
    );

    // Bytes at the parent: every blob once, plus at most one chunk per blob in flight.
    let served: u64 = proxy
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .map(|r| r.body_bytes)
        .sum();
    let limit = total + chunk * in_flight;
    eprintln!(
        "blob bytes served by the parent: {served} (blobs {total}, {in_flight} in flight at the \
         kill, chunk {chunk}: bound {limit}; lost {})",
        served.saturating_sub(total)
    );
    assert!(served <= limit, "{served} > {limit}");

    // Byte-identical, and a clean store.
    let local = Endpoint::plain(&leader.host());
    assert_repo_identical(&top, &local, repo);
    for (digest, layer) in layer_digests.iter().zip(&layers) {
        assert!(local.blob(repo, digest) == *layer, "{digest} differs");
    }
    fsck_clean(leader);
}

/// The durable offsets of the upload sessions in the store (`uploads/<id>/state.json`).
fn session_offsets(storage: &outpost_e2e::emulators::ObjectStorage) -> Vec<u64> {
    storage
        .keys()
        .iter()
        .filter(|k| k.starts_with("uploads/") && k.ends_with("/state.json"))
        .filter_map(|k| storage.get_text(k).ok())
        .filter_map(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .filter_map(|v| v["offset"].as_u64())
        .collect()
}

/// A manual sync asked of the follower (as `outpost-registry sync --wait` through a Service
/// may land): the follower stores the request and answers at once, the leader runs it on its
/// next poll, and the follower's `sync --wait` sees that run succeed in the state it re-reads.
/// The schedule never fires during the test, so run 2 can only be the requested one.
#[test]
fn a_sync_asked_of_the_follower_is_run_by_the_leader() {
    use outpost_e2e::oci::{conn, load, wait_run_success};
    use outpost_e2e::parent::DockerRegistry;

    let parent = DockerRegistry::builder().start();
    let c = outpost_e2e::fixtures::content(outpost_e2e::run_seed() + 3100);
    load(&c.layout, "v1", &parent.host(), "team/app:v1", &[]);
    let cs = conn("edge-ask", "u", "p", &parent.host(), "http");
    let storage = Backend::Azurite.object_storage().expect("Azurite");
    let replicas = store_replicas(&storage, 2, &cs, &["--sync-schedule", "0 0 1 1 *"]);
    let (leader, follower) = leader_and_follower(&replicas);
    // A continuous schedule's first run, at start.
    wait_run_success(leader, 1, Duration::from_secs(90));

    load(&c.layout, "v2", &parent.host(), "team/app:v2", &[]);
    let out = outpost_e2e::run_timeout(
        std::process::Command::new(outpost_e2e::bin("outpost-registry"))
            .args(["sync", "--wait", "--timeout", "90s", "--admin"])
            .arg(format!("http://127.0.0.1:{}", follower.admin_port)),
        Duration::from_secs(120),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\nleader:\n{}",
        String::from_utf8_lossy(&out.stderr),
        leader.log_text()
    );
    assert!(stdout.contains("sync requested (sync-"), "{stdout}");
    assert!(stdout.contains("sync run 2 success"), "{stdout}");
    // Both report run 2 as the one that served the request, and it brought v2.
    let status = |r: &Registry| -> serde_json::Value {
        outpost_e2e::http()
            .get(format!(
                "http://127.0.0.1:{}/outpost/v1/status",
                r.admin_port
            ))
            .send()
            .and_then(|r| r.json())
            .expect("status")
    };
    let s = status(follower);
    let served = &s["requests"][0];
    assert_eq!(served["run"], 2, "{s:#}");
    assert_eq!(served["result"], "success", "{s:#}");
    let app = s["repositories"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["name"] == "team/app"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(app["tags"], 2, "{s:#}");
    assert_eq!(status(leader)["requests"], s["requests"]);
    assert!(
        leader
            .log_text()
            .contains("sync requested through another process"),
        "{}",
        leader.log_text()
    );
    assert!(
        !follower.log_text().contains("sync started"),
        "the follower ran a sync:\n{}",
        follower.log_text()
    );
}
