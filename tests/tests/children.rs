//! Connected registries report to their Outpost parent: a nested chain parent → A → B, listed
//! at the parent with their states, modes and last syncs (admin JSON, the CLI table and the
//! `outpost_children{state}` gauge); B stopped turns `Offline` within two of its sync
//! intervals; a sync token without `message/write` on its gateway cannot report (403 at the
//! parent, counted at the child) while its sync works; a docker-registry parent is sent
//! nothing beyond the `/v2/` answer that tells it apart.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use outpost_e2e::emulators::Backend;
use outpost_e2e::metrics::{sample, samples};
use outpost_e2e::oci::*;
use outpost_e2e::parent::{DockerRegistry, FaultProxy};
use outpost_e2e::scenarios::outpost_on;
use outpost_e2e::*;
use serde_json::Value;

/// Every child's sync interval in this suite (a seconds field in the cron), so a stopped
/// child is `Offline` after 10 s unheard.
const SCHEDULE: &str = "*/5 * * * * *";
const INTERVAL: u64 = 5;

/// Adds to `tokens` a scope map and token named `name` that may read every repository, and,
/// with `report`, report as the connected registry `name`; returns the password.
fn sync_token(tokens: &std::path::Path, name: &str, report: bool) -> String {
    let t = tokens.to_str().expect("path");
    let mut map = vec![
        "scope-map",
        "create",
        "--tokens",
        t,
        "--name",
        name,
        "--repository",
        "**",
        "content/read",
        "metadata/read",
    ];
    if report {
        map.extend_from_slice(&["--gateway", name]);
    }
    run_ok(Command::new(bin("outpost-registry")).args(&map));
    let out = run_ok(Command::new(bin("outpost-registry")).args([
        "token",
        "create",
        "--tokens",
        t,
        "--name",
        name,
        "--scope-map",
        name,
        "-o",
        "json",
    ]));
    let v: Value = serde_json::from_str(&out).expect("token create -o json");
    v["password1"].as_str().expect("password1").to_owned()
}

fn children(reg: &Registry) -> Vec<Value> {
    let v: Value = http()
        .get(format!(
            "http://127.0.0.1:{}/outpost/v1/children",
            reg.admin_port
        ))
        .send()
        .expect("admin API")
        .json()
        .expect("children JSON");
    v["children"].as_array().cloned().unwrap_or_default()
}

fn child(list: &[Value], name: &str) -> Option<Value> {
    list.iter().find(|c| c["name"] == name).cloned()
}

fn metrics(reg: &Registry) -> String {
    http()
        .get(format!("{}/metrics", reg.url()))
        .send()
        .expect("metrics")
        .text()
        .expect("metrics text")
}

/// Polls the registry's children until `f` holds, at most `limit`.
fn wait_children(reg: &Registry, what: &str, limit: Duration, f: impl Fn(&[Value]) -> bool) {
    let deadline = Instant::now() + limit;
    loop {
        let list = children(reg);
        if f(&list) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not within {limit:?}: {list:#?}\n{}",
            reg.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn rfc3339_now() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    run_ok(Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%SZ"]))
        .trim()
        .to_owned()
}

#[test]
fn nested_children_report_to_the_top_and_go_offline() {
    let started = rfc3339_now();
    let dir = tempfile::tempdir().unwrap();
    // The top: a standalone Outpost whose tokens let A sync and report, C only sync.
    let top_tokens = dir.path().join("top.toml");
    let a_pw = sync_token(&top_tokens, "edge-a", true);
    let c_pw = sync_token(&top_tokens, "edge-c", false);
    let ci_pw = outpost_e2e::tokens::client_token(
        &top_tokens,
        "ci",
        "**",
        &["content/read", "content/write", "metadata/read"],
    );
    let top = Registry::start_with_args(&["--tokens", top_tokens.to_str().unwrap()]);
    let top_ep = Endpoint {
        basic: Some(("ci".into(), ci_pw)),
        ..Endpoint::plain(&top.host())
    };
    push_raw_image(&top_ep, "team/app", "v1", &pseudo_random(run_seed(), 4096));

    // A syncs from the top and hears B, which syncs from A.
    let a_tokens = dir.path().join("a.toml");
    let b_pw = sync_token(&a_tokens, "edge-b", true);
    let a = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge-a", "edge-a", &a_pw, &top.host(), "http"),
        "--mode",
        "readwrite",
        "--tokens",
        a_tokens.to_str().unwrap(),
        "--sync-schedule",
        SCHEDULE,
    ]);
    let mut b = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge-b", "edge-b", &b_pw, &a.host(), "http"),
        "--sync-schedule",
        SCHEDULE,
    ]);
    wait_children(
        &top,
        "A and B listed Online with a last sync",
        Duration::from_secs(60),
        |l| {
            ["edge-a", "edge-b"].iter().all(|n| {
                child(l, n).is_some_and(|c| {
                    c["connectionState"] == "Online" && c["lastSyncUtc"].is_string()
                })
            })
        },
    );
    // B has the image: the chain syncs.
    let leaf = Endpoint::plain(&b.host());
    wait_until("B has team/app:v1", Duration::from_secs(30), || {
        leaf.manifest("team/app", "v1").is_some()
    });
    assert_eq!(
        leaf.manifest("team/app", "v1"),
        top_ep.manifest("team/app", "v1")
    );
    // B's report after its run that stored the image reaches the top through A.
    wait_children(&top, "B's storage reported", Duration::from_secs(30), |l| {
        child(l, "edge-b").is_some_and(|c| c["storageBytes"].as_u64().unwrap_or(0) > 4096)
    });

    let list = children(&top);
    assert_eq!(list.len(), 2, "{list:#?}");
    let ca = child(&list, "edge-a").unwrap();
    let cb = child(&list, "edge-b").unwrap();
    assert_eq!(ca["mode"], "readwrite");
    assert_eq!(cb["mode"], "readonly");
    assert_eq!(ca["parent"], "-", "A reports to the top directly");
    assert_eq!(cb["parent"], "edge-a", "B is nested below A");
    assert_eq!(ca["loginServer"], top.host());
    assert_eq!(cb["loginServer"], a.host());
    assert_eq!(cb["syncIntervalSeconds"], INTERVAL);
    assert_eq!(cb["offlineAfterSeconds"], 2 * INTERVAL);
    assert!(ca["version"].as_str().is_some_and(|v| !v.is_empty()));
    // Last syncs: after the test began, and no later than each child's own.
    for (c, reg) in [(&ca, &a), (&cb, &b)] {
        let reported = c["lastSyncUtc"].as_str().unwrap().to_owned();
        let own = admin_status(reg)["lastSyncUtc"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            reported >= started && reported <= own,
            "{reported} {started} {own}"
        );
    }
    // A lists B as well (its own child).
    let at_a = children(&a);
    assert_eq!(at_a.len(), 1);
    assert_eq!(at_a[0]["name"], "edge-b");

    // The CLI table, read by columns.
    let out = admin_cli(&top, &["connected-registry", "list"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rows: Vec<Vec<String>> = text
        .lines()
        .map(|l| {
            l.split("  ")
                .map(str::trim)
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect()
        })
        .collect();
    assert_eq!(
        rows[0],
        [
            "NAME",
            "MODE",
            "CONNECTION STATE",
            "PARENT",
            "LOGIN SERVER",
            "LAST SYNC(UTC)"
        ],
        "{text}"
    );
    let row = |n: &str| rows.iter().find(|r| r[0] == n).cloned().unwrap_or_default();
    let (top_host, a_host) = (top.host(), a.host());
    assert_eq!(
        row("edge-a")[..5],
        ["edge-a", "readwrite", "Online", "-", top_host.as_str()]
    );
    assert_eq!(
        row("edge-b")[..5],
        ["edge-b", "readonly", "Online", "edge-a", a_host.as_str()]
    );
    assert!(row("edge-b")[5].starts_with("20"), "{text}");
    let out = admin_cli(&top, &["connected-registry", "list", "-o", "json"]);
    let v: Value = serde_json::from_slice(&out.stdout).expect("list -o json");
    assert_eq!(v["children"].as_array().map(Vec::len), Some(2));
    let gauge = |reg: &Registry, state: &str| {
        sample(
            &metrics(reg),
            &format!("outpost_children{{state=\"{state}\"}}"),
        )
    };
    wait_until(
        "outpost_children online 2, offline 0",
        Duration::from_secs(15),
        || gauge(&top, "online") == Some(2.0) && gauge(&top, "offline") == Some(0.0),
    );

    // B stops: Offline at the top within two of its intervals of silence. Ages cross the
    // link in whole seconds (up to 2 s of rounding on A and the top), plus the report's
    // transit and the polling: 5 s of slack.
    b.kill9();
    let stopped = Instant::now();
    wait_children(&top, "B Offline", Duration::from_secs(30), |l| {
        child(l, "edge-b").is_some_and(|c| c["connectionState"] == "Offline")
    });
    let took = stopped.elapsed();
    assert!(
        took <= Duration::from_secs(2 * INTERVAL + 5),
        "B Offline only after {took:?}"
    );
    let list = children(&top);
    assert_eq!(child(&list, "edge-a").unwrap()["connectionState"], "Online");
    wait_until(
        "outpost_children online 1, offline 1",
        Duration::from_secs(15),
        || gauge(&top, "online") == Some(1.0) && gauge(&top, "offline") == Some(1.0),
    );
    let out = admin_cli(&top, &["connected-registry", "show", "edge-b"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    let field = |k: &str| {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(&format!("{k}:"))
                    .map(|v| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    assert_eq!(field("Connection state"), "Offline", "{text}");
    assert_eq!(field("Parent"), "edge-a", "{text}");
    assert_eq!(field("Mode"), "readonly", "{text}");
    assert!(
        !admin_cli(&top, &["connected-registry", "show", "edge-x"])
            .status
            .success()
    );

    // C's token lacks message/write on gateway/edge-c: its sync works, its report is refused.
    let c = Registry::start_with_args(&[
        "--connection-string",
        &conn("edge-c", "edge-c", &c_pw, &top.host(), "http"),
        "--sync-schedule",
        "0 0 1 1 *",
        "--sync-window",
        "PT1M",
    ]);
    sync_now(&c);
    assert!(
        Endpoint::plain(&c.host())
            .manifest("team/app", "v1")
            .is_some()
    );
    let denied = sample(
        &metrics(&c),
        "outpost_parent_reports_total{result=\"denied\"}",
    );
    assert_eq!(denied, Some(1.0), "{}", c.log_text());
    assert_eq!(
        sample(
            &metrics(&c),
            "outpost_parent_reports_total{result=\"sent\"}"
        ),
        None
    );
    let refused = sample(
        &metrics(&top),
        "outpost_http_requests_total{method=\"PUT\",route=\"children\",status=\"403\"}",
    );
    assert_eq!(refused, Some(1.0));
    assert!(child(&children(&top), "edge-c").is_none());
    // A second refusal is counted but not logged again at info.
    sync_now(&c);
    assert_eq!(
        sample(
            &metrics(&c),
            "outpost_parent_reports_total{result=\"denied\"}"
        ),
        Some(2.0)
    );
    let log = c.log_text();
    let info_lines = log
        .lines()
        .filter(|l| l.contains("cannot report this registry's state"))
        .count();
    assert_eq!(info_lines, 1, "{log}");
    assert!(
        !log.contains(&c_pw),
        "the sync token's password is never logged"
    );
    // A and B reported with their own tokens all along.
    assert!(
        sample(
            &metrics(&a),
            "outpost_parent_reports_total{result=\"sent\"}"
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

#[test]
fn a_docker_registry_parent_gets_no_report() {
    let parent = DockerRegistry::builder().start();
    let top = Endpoint::plain(&parent.host());
    push_raw_image(&top, "team/app", "v1", &pseudo_random(run_seed(), 4096));
    let proxy = FaultProxy::start(&parent.host());
    let d = outpost_on(Backend::Fs, &proxy.host(), &[]);
    sync_now(&d);
    let got = Endpoint::plain(&d.host()).manifest("team/app", "v1");
    assert!(got.is_some());
    assert_eq!(got, top.manifest("team/app", "v1"));
    let requests = proxy.requests();
    assert!(
        requests.iter().all(|r| r.path.starts_with("/v2/")),
        "only the registry API was asked: {:?}",
        requests
            .iter()
            .map(|r| (&r.method, &r.path))
            .collect::<Vec<_>>()
    );
    let page = metrics(&d);
    assert!(
        samples(&page)
            .iter()
            .all(|s| s.name != "outpost_parent_reports_total"),
        "no report attempted"
    );
    assert!(d.log_text().contains("the parent is not an Outpost"));
}
