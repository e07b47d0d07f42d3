//! The chart in a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager
//! from shared/k8s; no node, so pods stay Pending): for every chart scenario installed,
//! upgraded and uninstalled through the real Helm library (helm-sdkpy, charts/tests/
//! helm_cluster.py), every object accepted, the changed values applied, nothing left but the
//! PVC (none on object storage); and the chart's RBAC proven by running the real binaries outside the cluster with the
//! chart's own ServiceAccount tokens (TokenRequest): enough for their work, and no more.
//!
//! Helm's uninstall waits for the chart's pre-delete hook Job, whose pod no kubelet runs here:
//! the suite runs it in the kubelet's place (the pod's container as a local process with its
//! ServiceAccount's token, the exit reported in the pod's status), so the hook really runs,
//! with its own RBAC, and must succeed. (The real-node suite runs it in a pod.)
//!
//! One control plane serves every test of this binary; each test has its own namespaces,
//! release name and cluster-scoped names (the release name prefixes them).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use outpost_e2e::k8s::ControlPlane;
use outpost_e2e::{TestPki, bin, free_port, http, run_timeout};
use serde_json::{Value, json};

const CONN: &str = "ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=p4ss;\
                    ParentGatewayEndpoint=myacr.westeurope.data.azurecr.io;ParentEndpointProtocol=https";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

/// The chart's uninstall hook removes `outpost.io/trusted` from every node of the cluster;
/// the RBAC test's node agent sets it on its node. Uninstalls hold this for reading, the
/// agent's test for writing, so no hook unlabels its node under its feet.
static NODE_LABELS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn cp() -> &'static ControlPlane {
    ControlPlane::shared()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Polls `cond` (every 100 ms, 60 s at most); panics with `what()` when it never holds.
fn eventually(what: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `charts/tests/helm_cluster.py <command> --kubeconfig <admin> --release --namespace <args>`:
/// the JSON it prints (the command must succeed).
fn helm(command: &str, release: &str, namespace: &str, args: &[&str]) -> Value {
    let out = run_timeout(
        Command::new("python3")
            .arg("-B")
            .arg(repo().join("charts/tests/helm_cluster.py"))
            .arg(command)
            .arg("--kubeconfig")
            .arg(&cp().admin_kubeconfig)
            .args(["--release", release, "--namespace", namespace])
            .args(args),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm {command} {release} failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("helm {command}: {e}: {stdout}"))
}

/// REST plural and scope of each kind the chart (or Kubernetes for it) creates.
fn resource(kind: &str) -> (&'static str, bool) {
    match kind {
        "Secret" => ("secrets", true),
        "ConfigMap" => ("configmaps", true),
        "Service" => ("services", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "PersistentVolumeClaim" => ("persistentvolumeclaims", true),
        "Pod" => ("pods", true),
        "Deployment" => ("deployments", true),
        "ReplicaSet" => ("replicasets", true),
        "DaemonSet" => ("daemonsets", true),
        "Job" => ("jobs", true),
        "PodDisruptionBudget" => ("poddisruptionbudgets", true),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "MutatingWebhookConfiguration" => ("mutatingwebhookconfigurations", false),
        "ValidatingWebhookConfiguration" => ("validatingwebhookconfigurations", false),
        other => panic!("the chart renders a {other}: add it to resource() in this suite"),
    }
}

fn api_prefix(api_version: &str) -> String {
    if api_version == "v1" {
        "/api/v1".to_string()
    } else {
        format!("/apis/{api_version}")
    }
}

/// The REST path of a manifest object (`objects` item of helm_cluster.py) in `namespace`.
fn object_path(o: &Value, namespace: &str) -> String {
    let kind = o["kind"].as_str().expect("kind");
    let (plural, namespaced) = resource(kind);
    let prefix = api_prefix(o["apiVersion"].as_str().expect("apiVersion"));
    let name = o["name"].as_str().expect("name");
    if namespaced {
        let ns = o["namespace"].as_str().unwrap_or(namespace);
        format!("{prefix}/namespaces/{ns}/{plural}/{name}")
    } else {
        format!("{prefix}/{plural}/{name}")
    }
}

fn describe(o: &Value) -> String {
    format!("{}/{}", o["kind"].as_str().unwrap_or("?"), o["name"])
}

fn kept_by_policy(o: &Value) -> bool {
    o["annotations"]["helm.sh/resource-policy"] == "keep"
}

/// Names of the items a list answered.
fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// The `kubernetes.io/tls` Secrets an own-TLS install names (registry and webhook), made by
/// the user beforehand with openssl, and the webhook's caBundle (base64 PEM).
fn own_tls_secrets(namespace: &str, dir: &Path) -> String {
    let pki = TestPki::create(dir);
    let read = |p: &Path| b64(&std::fs::read(p).expect("pki file"));
    for name in ["own-registry-tls", "own-webhook-tls"] {
        let (status, body) = cp().admin().post(
            &format!("/api/v1/namespaces/{namespace}/secrets"),
            &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                    "metadata": {"name": name},
                    "data": {"tls.crt": read(&pki.cert), "tls.key": read(&pki.key),
                             "ca.crt": read(&pki.ca_cert)}}),
        );
        assert_eq!(status, 201, "create secret {name}: {body}");
    }
    read(&pki.ca_cert)
}

/// The pull secret the chart's README has the user create in the release namespace.
fn create_pull_secret(namespace: &str, name: &str) {
    let config = json!({"auths": {"10.96.0.50": {"auth": b64(b"edge-pull:pw")}}});
    let (status, body) = cp().admin().post(
        &format!("/api/v1/namespaces/{namespace}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                "metadata": {"name": name},
                "data": {".dockerconfigjson": b64(config.to_string().as_bytes())}}),
    );
    assert_eq!(status, 201, "create pull secret: {body}");
}

/// Values of one scenario and what it enables.
struct Scenario {
    release: &'static str,
    namespace: &'static str,
    values: Value,
    webhook: bool,
    trust: bool,
    parent: bool,
    /// storage.type=pvc: the data PVC, kept on uninstall (object storage has none).
    pvc: bool,
}

fn write_values(dir: &Path, name: &str, values: &Value) -> PathBuf {
    let path = dir.join(name);
    // JSON is YAML.
    std::fs::write(&path, values.to_string()).expect("values file");
    path
}

/// Install, check, upgrade, check, uninstall, check: the whole life of a release. The caller
/// made the namespace and what the values name in it, or passes `--create-namespace` in
/// `install_args`; `after_install` checks scenario specifics while the release is installed.
fn install_upgrade_uninstall(s: Scenario, install_args: &[&str], after_install: impl FnOnce()) {
    let admin = cp().admin();
    let dir = tempfile::tempdir().expect("temp dir");
    let ns = s.namespace;
    let values = write_values(dir.path(), "values.json", &s.values);
    let mut args = vec!["--values", values.to_str().expect("utf-8 path")];
    args.extend_from_slice(install_args);
    let release = helm("install", s.release, ns, &args);
    assert_eq!(release["status"], "deployed", "{release}");
    assert_eq!(release["revision"], 1, "{release}");
    let objects = release["objects"].as_array().expect("objects").clone();
    assert!(objects.len() >= 5, "{objects:?}");

    // Every object the release holds was accepted and is there, labelled as the release's.
    for o in &objects {
        let got = admin.get_ok(&object_path(o, ns));
        assert_eq!(
            got["metadata"]["labels"]["app.kubernetes.io/instance"],
            s.release,
            "{}: {got}",
            describe(o)
        );
    }
    let kinds: Vec<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
    for kind in ["Deployment", "Service", "ServiceAccount"] {
        assert!(kinds.contains(&kind), "no {kind}: {kinds:?}");
    }
    assert_eq!(kinds.contains(&"PersistentVolumeClaim"), s.pvc, "{kinds:?}");
    assert_eq!(kinds.contains(&"DaemonSet"), s.trust, "{kinds:?}");
    assert_eq!(
        kinds.contains(&"MutatingWebhookConfiguration"),
        s.webhook,
        "{kinds:?}"
    );
    // The controllers made every Deployment's pods from the rendered templates, so the pod
    // specs passed the API server's pod validation and admission (ServiceAccount exists, ...).
    // (Not the DaemonSet's: it has pods only where another test registered a Node.)
    let deployments = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments?labelSelector=app.kubernetes.io/instance%3D{}",
        s.release
    ));
    let want_pods: i64 = deployments["items"]
        .as_array()
        .expect("deployments")
        .iter()
        .map(|d| d["spec"]["replicas"].as_i64().expect("replicas"))
        .sum();
    assert!(want_pods > if s.webhook { 2 } else { 0 }, "{deployments}");
    let pods_path = format!(
        "/api/v1/namespaces/{ns}/pods?labelSelector=app.kubernetes.io/instance%3D{},\
         app.kubernetes.io/component!%3Dnode-agent",
        s.release
    );
    eventually(
        || format!("{want_pods} pods: {:?}", names(&admin.get(&pods_path).1)),
        || names(&admin.get(&pods_path).1).len() as i64 == want_pods,
    );

    after_install();

    // Upgrade: another sync schedule and one more rewrite rule.
    let mut changed = s.values.clone();
    changed["sync"] = json!({"schedule": "0 3 * * *"});
    let mut rules = changed["webhook"]["rules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    rules.push(json!({"upstream": "ghcr.io", "repositories": ["team-b/**"]}));
    changed["webhook"]["rules"] = json!(rules);
    let upgraded_values = write_values(dir.path(), "upgrade.json", &changed);
    let webhook_generation = |release: &str| {
        admin
            .get_ok(&format!(
                "/apis/apps/v1/namespaces/{ns}/deployments/{release}-webhook"
            ))
            .pointer("/metadata/generation")
            .and_then(Value::as_i64)
            .expect("generation")
    };
    let before = s.webhook.then(|| webhook_generation(s.release));
    let upgraded = helm(
        "upgrade",
        s.release,
        ns,
        &["--values", upgraded_values.to_str().expect("utf-8 path")],
    );
    assert_eq!(upgraded["status"], "deployed", "{upgraded}");
    assert_eq!(upgraded["revision"], 2, "{upgraded}");
    let registry = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments/{}-registry",
        s.release
    ));
    let args = registry["spec"]["template"]["spec"]["containers"][0]["args"].clone();
    let has = |a: &str| args.as_array().is_some_and(|v| v.iter().any(|x| x == a));
    assert_eq!(has("--sync-schedule=0 3 * * *"), s.parent, "{args}");
    assert!(!has("--sync-schedule=* * * * *"), "{args}");
    let config_of = |component: &str| {
        admin.get_ok(&format!(
            "/api/v1/namespaces/{ns}/configmaps/{}-{component}",
            s.release
        ))["data"]["config.toml"]
            .as_str()
            .expect("config.toml")
            .to_string()
    };
    if s.webhook {
        let config = config_of("webhook");
        assert!(
            config.contains("upstream = \"ghcr.io\"") && config.contains("\"team-b/**\""),
            "{config}"
        );
        // The config checksum changed the pod template: a rollout.
        assert!(webhook_generation(s.release) > before.expect("generation"));
    }
    if s.trust {
        let config = config_of("node-agent");
        assert!(config.contains("upstream = \"ghcr.io\""), "{config}");
    }

    // Uninstall (waiting for the deletions, hooks run): nothing Helm created is left but the
    // PVC (if any).
    let hooks = uninstall(s.release, ns);
    for h in &hooks {
        assert!(h.success, "hook job {} failed:\n{}", h.job, h.log);
    }
    let hook_job = format!("{}-uninstall", s.release);
    assert!(
        hooks.iter().any(|h| h.job == hook_job),
        "the pre-delete hook {hook_job} did not run"
    );
    let mut kept = Vec::new();
    for o in &objects {
        let path = object_path(o, ns);
        if kept_by_policy(o) {
            assert_eq!(o["kind"], "PersistentVolumeClaim", "{}", describe(o));
            admin.get_ok(&path);
            kept.push(o["name"].as_str().expect("name").to_string());
        } else {
            eventually(
                || format!("{} still there after uninstall", describe(o)),
                || admin.get(&path).0 == 404,
            );
        }
    }
    let want_kept: Vec<String> = s
        .pvc
        .then(|| format!("{}-data", s.release))
        .into_iter()
        .collect();
    assert_eq!(kept, want_kept);
    // Nor anything the controllers made for it (ReplicaSets, pods: garbage-collected), nor
    // Helm's release records; the only labelled thing left is the PVC (if any).
    let selector = format!("labelSelector=app.kubernetes.io/instance%3D{}", s.release);
    for (prefix, plural) in [
        ("/api/v1", "pods"),
        ("/api/v1", "configmaps"),
        ("/api/v1", "secrets"),
        ("/api/v1", "services"),
        ("/api/v1", "serviceaccounts"),
        ("/apis/apps/v1", "replicasets"),
        ("/apis/apps/v1", "deployments"),
        ("/apis/apps/v1", "daemonsets"),
        ("/apis/batch/v1", "jobs"),
        ("/apis/policy/v1", "poddisruptionbudgets"),
    ] {
        let path = format!("{prefix}/namespaces/{ns}/{plural}?{selector}");
        eventually(
            || format!("{plural} left: {:?}", names(&admin.get(&path).1)),
            || admin.get(&path).0 == 200 && names(&admin.get(&path).1).is_empty(),
        );
    }
    for path in [
        "/apis/rbac.authorization.k8s.io/v1/clusterroles",
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations",
    ] {
        let left = names(&admin.get_ok(&format!("{path}?{selector}")));
        assert!(left.is_empty(), "{path}: {left:?}");
    }
    let pvcs = names(&admin.get_ok(&format!(
        "/api/v1/namespaces/{ns}/persistentvolumeclaims?{selector}"
    )));
    assert_eq!(pvcs, kept);
    let records = names(&admin.get_ok(&format!(
        "/api/v1/namespaces/{ns}/secrets?labelSelector=owner%3Dhelm,name%3D{}",
        s.release
    )));
    assert!(records.is_empty(), "Helm release records left: {records:?}");
}

/// Own certificates (no cert-manager): `tls.secret` for the registry, `webhook.tlsSecret` and
/// `webhook.caBundle` for the webhook, Secrets made beforehand as the chart README says.
#[test]
fn own_tls_installs_upgrades_and_uninstalls_leaving_only_the_pvc() {
    let (ns, release) = ("own-tls", "outpost-own-tls");
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_bundle = own_tls_secrets(ns, dir.path());
    let s = Scenario {
        release,
        namespace: ns,
        values: json!({
            "connectionString": CONN,
            "cert-manager": {"enabled": false},
            "tls": {"secret": "own-registry-tls"},
            "service": {"clusterIP": "10.96.100.11"},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle,
                        "rules": [{"upstream": "myacr.azurecr.io", "repositories": ["hello-world"]}]},
        }),
        webhook: true,
        trust: true,
        parent: true,
        pvc: true,
    };
    install_upgrade_uninstall(s, &[], || {
        let admin = cp().admin();
        let mwc = admin.get_ok(&format!(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{release}-webhook"
        ));
        assert_eq!(
            mwc["webhooks"][0]["clientConfig"]["caBundle"], ca_bundle,
            "{mwc}"
        );
        let svc = admin.get_ok(&format!(
            "/api/v1/namespaces/{ns}/services/{release}-registry"
        ));
        assert_eq!(svc["spec"]["clusterIP"], "10.96.100.11", "{svc}");
    });
}

/// The one-command install of the issue and the chart README: defaults (certificates managed
/// by Outpost, no cert-manager), a connection string and the Service IP as `--set`, the
/// namespace made by Helm. While installed, the webhook (run with the chart's arguments and
/// its ServiceAccount's token) makes the managed Secrets, patches the caBundle and writes an
/// opted-in namespace its pull secret with a namespace credential (no client tokens needed: the
/// chart's signing key); uninstall's hook then removes those too: nothing is left but the PVC.
#[test]
fn defaults_install_with_one_command_and_uninstall_leaves_only_the_pvc() {
    let (ns, release) = ("outpost", "outpost");
    let app = "defaults-app";
    let conn = format!("connectionString={CONN}");
    let s = Scenario {
        release,
        namespace: ns,
        values: json!({"connectionString": CONN, "service": {"clusterIP": "10.96.100.10"}}),
        webhook: true,
        trust: true,
        parent: true,
        pvc: true,
    };
    let managed = ["outpost-ca", "outpost-registry-tls", "outpost-webhook-tls"];
    let dir = tempfile::tempdir().expect("temp dir");
    let args = [
        "--create-namespace",
        "--set",
        &conn,
        "--set",
        "service.clusterIP=10.96.100.10",
    ];
    install_upgrade_uninstall(s, &args, || {
        let admin = cp().admin();
        let deployment = admin.get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/deployments/{release}-webhook"
        ));
        let token = cp().service_account_token(ns, &format!("{release}-webhook"));
        let webhook = run_as_pod(
            &deployment["spec"]["template"]["spec"],
            ns,
            &dir.path().join("webhook"),
            &[("metadata.namespace", ns)],
            &token,
        );
        for name in managed {
            let path = format!("/api/v1/namespaces/{ns}/secrets/{name}");
            eventually(
                || format!("no {name}:\n{}", webhook.log_text()),
                || admin.get(&path).0 == 200,
            );
        }
        let ca = admin.get_ok(&format!("/api/v1/namespaces/{ns}/secrets/outpost-ca"));
        let bundle = ca["data"]["ca.crt"].clone();
        let mwc_path = format!(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{release}-webhook"
        );
        eventually(
            || format!("caBundle not patched:\n{}", webhook.log_text()),
            || admin.get_ok(&mwc_path)["webhooks"][0]["clientConfig"]["caBundle"] == bundle,
        );
        cp().create_namespace(app, &[("outpost.io/inject", "enabled")]);
        let copy = format!("/api/v1/namespaces/{app}/secrets/outpost-pull");
        eventually(
            || format!("no pull secret in {app}:\n{}", webhook.log_text()),
            || admin.get(&copy).0 == 200,
        );
        // Minted (username the namespace, the default scope), not copied: there is nothing
        // to copy without client tokens.
        let minted = admin.get_ok(&copy);
        assert_eq!(
            minted["metadata"]["annotations"]["outpost.io/credential-scope"], "**",
            "{}",
            minted["metadata"]
        );
        // Its pods would stop when the hook deletes the Deployment; this one stops here.
        drop(webhook);
    });
    let admin = cp().admin();
    for name in managed {
        let (status, _) = admin.get(&format!("/api/v1/namespaces/{ns}/secrets/{name}"));
        assert_eq!(status, 404, "{name} left after uninstall");
    }
    let (status, _) = admin.get(&format!("/api/v1/namespaces/{app}/secrets/outpost-pull"));
    assert_eq!(status, 404, "the pull secret's copy left after uninstall");
}

/// The lab: plain HTTP (`httpsEnabled=false`), the node agent writing a plain-HTTP mirror,
/// the webhook with own certificates.
#[test]
fn http_lab_installs_upgrades_and_uninstalls_leaving_only_the_pvc() {
    let (ns, release) = ("http-lab", "outpost-http");
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_bundle = own_tls_secrets(ns, dir.path());
    let s = Scenario {
        release,
        namespace: ns,
        values: json!({
            "connectionString": CONN,
            "httpsEnabled": false,
            "cert-manager": {"enabled": false},
            "service": {"port": 80, "clusterIP": "10.96.100.12"},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle},
        }),
        webhook: true,
        trust: true,
        parent: true,
        pvc: true,
    };
    install_upgrade_uninstall(s, &[], || {
        let svc = cp().admin().get_ok(&format!(
            "/api/v1/namespaces/{ns}/services/{release}-registry"
        ));
        assert_eq!(svc["spec"]["ports"][0]["name"], "http", "{svc}");
        assert_eq!(svc["spec"]["ports"][0]["port"], 80, "{svc}");
        // The node agent writes a plain-HTTP mirror: no CA to distribute.
        let admin = cp().admin();
        let config = admin.get_ok(&format!(
            "/api/v1/namespaces/{ns}/configmaps/{release}-node-agent"
        ))["data"]["config.toml"]
            .as_str()
            .expect("config.toml")
            .to_string();
        assert!(config.contains("registry_plain_http = true"), "{config}");
        let ds = admin.get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/daemonsets/{release}-node-agent"
        ));
        let args = &ds["spec"]["template"]["spec"]["containers"][0]["args"];
        assert!(
            args.as_array().is_some_and(|a| !a
                .iter()
                .any(|x| x.as_str().is_some_and(|x| x.starts_with("--ca-file")))),
            "{args}"
        );
    });
}

/// No webhook: the registry, the node agent and the small certificate manager Deployment
/// (certificates managed by default), in a namespace Helm makes (`--create-namespace`).
#[test]
fn webhook_off_installs_upgrades_and_uninstalls_leaving_only_the_pvc() {
    let (ns, release) = ("webhook-off", "outpost-no-webhook");
    let s = Scenario {
        release,
        namespace: ns,
        values: json!({
            "connectionString": CONN,
            "webhook": {"enabled": false},
        }),
        webhook: false,
        trust: true,
        parent: true,
        pvc: true,
    };
    install_upgrade_uninstall(s, &["--create-namespace"], || {
        let admin = cp().admin();
        let namespace = admin.get_ok(&format!("/api/v1/namespaces/{ns}"));
        assert_eq!(namespace["status"]["phase"], "Active", "{namespace}");
        admin.get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/deployments/{release}-certs"
        ));
    });
}

/// k3s nodes, standalone (no parent): the node agent for k3s, own certificates.
#[test]
fn k3s_installs_upgrades_and_uninstalls_leaving_only_the_pvc() {
    let (ns, release) = ("k3s", "outpost-k3s");
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_bundle = own_tls_secrets(ns, dir.path());
    let s = Scenario {
        release,
        namespace: ns,
        values: json!({
            "cert-manager": {"enabled": false},
            "tls": {"secret": "own-registry-tls"},
            "service": {"clusterIP": "10.96.100.13"},
            "trustDistribution": {"runtime": "k3s", "nodeCredentials": true},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle},
        }),
        webhook: true,
        trust: true,
        parent: false,
        pvc: true,
    };
    install_upgrade_uninstall(s, &[], || {
        let ds = cp().admin().get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/daemonsets/{release}-node-agent"
        ));
        let spec = &ds["spec"]["template"]["spec"];
        assert!(
            spec["containers"][0]["args"]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x == "--runtime=k3s")),
            "{spec}"
        );
        assert_eq!(
            spec["volumes"]
                .as_array()
                .and_then(|v| v.iter().find(|v| v["name"] == "runtime-config"))
                .map(|v| v["hostPath"]["path"].clone()),
            Some(json!("/etc/rancher/k3s")),
            "{spec}"
        );
    });
}

/// Object storage (`storage.type=azblob`), credentials in a Secret the user made beforehand,
/// Azure workload identity on the ServiceAccount and pod: as the API server stored them, the
/// registry's Deployment has no volume for data and a rolling update, and its pod (made by the
/// controllers) takes the account key from the Secret by reference, never by value; no PVC is
/// made, so the uninstall leaves nothing of the release (the user's Secret stays).
/// An azblob release in a new namespace `ns`, made as a user would: own TLS Secrets and the
/// storage account key in a Secret beforehand; `registry` is the values' `registry` section.
fn azblob_scenario(
    release: &'static str,
    ns: &'static str,
    cluster_ip: &str,
    registry: Value,
) -> Scenario {
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_bundle = own_tls_secrets(ns, dir.path());
    let (status, body) = cp().admin().post(
        &format!("/api/v1/namespaces/{ns}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "outpost-azurite"},
                "data": {"AZURE_STORAGE_ACCOUNT_KEY": b64(b"a-key-kept-in-its-Secret")}}),
    );
    assert_eq!(status, 201, "create storage secret: {body}");
    Scenario {
        release,
        namespace: ns,
        values: json!({
            "cert-manager": {"enabled": false},
            "tls": {"secret": "own-registry-tls"},
            "service": {"clusterIP": cluster_ip},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle},
            "storage": {"type": "azblob", "existingSecret": "outpost-azurite",
                        "azblob": {"account": "outpoststore", "container": "outpost",
                                   "prefix": "site-1",
                                   "endpoint": "https://outpoststore.blob.core.windows.net"}},
            "registry": registry,
        }),
        webhook: true,
        trust: true,
        parent: false,
        pvc: false,
    }
}

#[test]
fn azblob_installs_upgrades_and_uninstalls_leaving_nothing() {
    let (ns, release) = ("azblob", "outpost-azblob");
    let s = azblob_scenario(
        release,
        ns,
        "10.96.100.14",
        json!({"serviceAccount": {"annotations": {
                   "azure.workload.identity/client-id": "00000000-0000-0000-0000-000000000001"}},
               "podLabels": {"azure.workload.identity/use": "true"}}),
    );
    install_upgrade_uninstall(s, &[], || {
        let admin = cp().admin();
        let d = admin.get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"
        ));
        assert_eq!(d["spec"]["replicas"], 1, "{d}");
        assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate", "{d}");
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{d}"
        );
        let pod_spec = &d["spec"]["template"]["spec"];
        assert!(
            pod_spec["volumes"]
                .as_array()
                .is_some_and(|v| !v.iter().any(|v| v.get("persistentVolumeClaim").is_some())),
            "{pod_spec}"
        );
        let args = &pod_spec["containers"][0]["args"];
        assert!(
            args.as_array()
                .is_some_and(|a| a.iter().any(|x| x == "--storage=azblob://outpost/site-1")),
            "{args}"
        );
        assert_eq!(
            d["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"], "true",
            "{d}"
        );
        let sa = admin.get_ok(&format!(
            "/api/v1/namespaces/{ns}/serviceaccounts/{release}-registry"
        ));
        assert_eq!(
            sa["metadata"]["annotations"]["azure.workload.identity/client-id"],
            "00000000-0000-0000-0000-000000000001",
            "{sa}"
        );
        let pvcs = admin.get_ok(&format!("/api/v1/namespaces/{ns}/persistentvolumeclaims"));
        assert!(names(&pvcs).is_empty(), "{pvcs}");
        // The pod the controllers made: the key by reference to the Secret, nowhere by value.
        let pods_path = format!(
            "/api/v1/namespaces/{ns}/pods?labelSelector=app.kubernetes.io/instance%3D{release},\
             app.kubernetes.io/component%3Dregistry"
        );
        eventually(
            || format!("registry pod: {}", admin.get(&pods_path).1),
            || names(&admin.get(&pods_path).1).len() == 1,
        );
        let pod = admin.get_ok(&pods_path)["items"][0].clone();
        let env = pod["spec"]["containers"][0]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let by_name = |n: &str| env.iter().find(|e| e["name"] == n).cloned();
        let account_key = by_name("AZURE_STORAGE_ACCOUNT_KEY").expect("AZURE_STORAGE_ACCOUNT_KEY");
        assert_eq!(
            account_key["valueFrom"]["secretKeyRef"],
            json!({"name": "outpost-azurite", "key": "AZURE_STORAGE_ACCOUNT_KEY", "optional": true}),
            "{account_key}"
        );
        assert!(account_key.get("value").is_none(), "{account_key}");
        assert_eq!(
            by_name("AZURE_STORAGE_ACCOUNT_NAME").map(|e| e["value"].clone()),
            Some(json!("outpoststore"))
        );
        assert_eq!(
            by_name("AZURE_STORAGE_ENDPOINT").map(|e| e["value"].clone()),
            Some(json!("https://outpoststore.blob.core.windows.net"))
        );
    });
    // The user's Secret is theirs: the release never owned it.
    cp().admin()
        .get_ok(&format!("/api/v1/namespaces/{ns}/secrets/outpost-azurite"));
}

/// Three registry replicas on azblob: the API server accepts the registry's
/// PodDisruptionBudget and topology spread as rendered, the controllers make three pods that
/// carry the spread, and the disruption controller counts them under the budget; the
/// uninstall leaves nothing (the budget included).
#[test]
fn azblob_with_three_replicas_installs_with_a_budget_and_spread_and_leaves_nothing() {
    let (ns, release) = ("azblob-ha", "outpost-azblob-ha");
    let s = azblob_scenario(release, ns, "10.96.100.15", json!({"replicas": 3}));
    install_upgrade_uninstall(s, &[], || {
        let admin = cp().admin();
        let d = admin.get_ok(&format!(
            "/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"
        ));
        assert_eq!(d["spec"]["replicas"], 3, "{d}");
        assert_eq!(d["spec"]["strategy"]["type"], "RollingUpdate", "{d}");
        assert_eq!(
            d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
            "{d}"
        );
        let args = &d["spec"]["template"]["spec"]["containers"][0]["args"];
        let lease = format!("{release}-registry-leader");
        for want in [
            "--leader-election=kubernetes".to_string(),
            format!("--leader-lease={lease}"),
            format!("--leader-lease-namespace={ns}"),
        ] {
            assert!(
                args.as_array()
                    .is_some_and(|a| a.iter().any(|x| *x == want)),
                "{want}: {args}"
            );
        }
        let role = admin.get_ok(&format!(
            "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles/{lease}"
        ));
        assert_eq!(role["rules"][1]["resourceNames"], json!([lease]), "{role}");
        let selector = d["spec"]["selector"]["matchLabels"].clone();
        assert_eq!(selector["app.kubernetes.io/component"], "registry", "{d}");
        let spread = json!([{"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
                             "whenUnsatisfiable": "ScheduleAnyway",
                             "labelSelector": {"matchLabels": selector}}]);
        assert_eq!(
            d["spec"]["template"]["spec"]["topologySpreadConstraints"], spread,
            "{d}"
        );
        let pdb = admin.get_ok(&format!(
            "/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{release}-registry"
        ));
        assert_eq!(pdb["spec"]["maxUnavailable"], 1, "{pdb}");
        assert_eq!(pdb["spec"]["selector"]["matchLabels"], selector, "{pdb}");
        // The pods the controllers made carry the spread; the disruption controller finds the
        // three of them through the budget's selector (none is ready: no node runs them).
        let pods_path = format!(
            "/api/v1/namespaces/{ns}/pods?labelSelector=app.kubernetes.io/instance%3D{release},\
             app.kubernetes.io/component%3Dregistry"
        );
        eventually(
            || format!("3 registry pods: {}", admin.get(&pods_path).1),
            || names(&admin.get(&pods_path).1).len() == 3,
        );
        for pod in admin.get_ok(&pods_path)["items"].as_array().expect("pods") {
            assert_eq!(pod["spec"]["topologySpreadConstraints"], spread, "{pod}");
            // The Lease needs the API token: the ServiceAccount admission mounted it.
            assert!(
                pod["spec"]["volumes"]
                    .as_array()
                    .is_some_and(|v| v.iter().any(|v| {
                        v["projected"]["sources"]
                            .as_array()
                            .is_some_and(|s| s.iter().any(|s| s["serviceAccountToken"].is_object()))
                    })),
                "{pod}"
            );
        }
        let pdb_path =
            format!("/apis/policy/v1/namespaces/{ns}/poddisruptionbudgets/{release}-registry");
        eventually(
            || format!("budget status: {}", admin.get(&pdb_path).1),
            || admin.get(&pdb_path).1["status"]["expectedPods"] == 3,
        );
    });
}

/// The chart's leader election as its pods would run it: two registries started from the
/// rendered Deployment (arguments, environment with the account key from the Secret, the pod
/// name from the downward API) on one Azurite container, each with a token of the chart's
/// registry ServiceAccount against this API server. Exactly one leads and the Lease names its
/// pod; SIGTERM hands the Lease to the other. The same token, through a kube client, can do
/// nothing else with Leases: other names, other namespaces, listing, patching and deleting
/// are forbidden (it may create a Lease, which RBAC cannot narrow by name, and then cannot
/// read it). The uninstall removes the Lease.
#[test]
fn two_registries_elect_through_the_chart_lease_with_its_rbac_and_no_more() {
    use k8s_openapi::api::coordination::v1::Lease;
    let (ns, release) = ("lease", "outpost-lease");
    let lease = format!("{release}-registry-leader");
    let admin = cp().admin();
    cp().create_namespace(ns, &[]);
    let storage = outpost_e2e::emulators::azurite();
    let (status, body) = admin.post(
        &format!("/api/v1/namespaces/{ns}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "outpost-azurite"},
                "data": {"AZURE_STORAGE_ACCOUNT_KEY":
                         b64(outpost_e2e::emulators::AZURITE_KEY.as_bytes())}}),
    );
    assert_eq!(status, 201, "create storage secret: {body}");
    let dir = tempfile::tempdir().expect("temp dir");
    let values = write_values(
        dir.path(),
        "values.json",
        &json!({
            "httpsEnabled": false,
            "trustDistribution": {"enabled": false},
            "webhook": {"enabled": false},
            "service": {"port": 80},
            "registry": {"replicas": 2, "shutdownDelaySeconds": 0},
            "storage": {"type": "azblob", "existingSecret": "outpost-azurite",
                        "azblob": {"container": storage.bucket, "prefix": "site-ha",
                                   "useEmulator": true,
                                   "endpoint": format!("http://127.0.0.1:{}",
                                                       storage.emulator().port())}},
        }),
    );
    helm(
        "install",
        release,
        ns,
        &["--values", values.to_str().expect("utf-8 path")],
    );
    let deployment = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"
    ));
    let spec = &deployment["spec"]["template"]["spec"];
    let sa = spec["serviceAccountName"]
        .as_str()
        .expect("serviceAccountName");
    let token = cp().service_account_token(ns, sa);
    let pods = ["registry-pod-a", "registry-pod-b"];
    let mut running: Vec<Running> = pods
        .iter()
        .map(|pod| {
            run_as_pod(
                spec,
                ns,
                &dir.path().join(pod),
                &[("metadata.name", pod)],
                &token,
            )
        })
        .collect();
    for r in &mut running {
        let url = format!("http://127.0.0.1:{}/readyz", r.port("--listen"));
        r.wait_ready(&http(), &url);
    }
    let gauge = |r: &Running| {
        let text = http()
            .get(format!("http://127.0.0.1:{}/metrics", r.port("--listen")))
            .send()
            .ok()?
            .text()
            .ok()?;
        outpost_e2e::metrics::sample(&text, "outpost_leader")
    };
    let holder = || {
        admin
            .get(&format!(
                "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}"
            ))
            .1["spec"]["holderIdentity"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    // Exactly one leads (never two), and the Lease names its pod.
    let one_leader = |rs: &[&Running]| -> usize {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let gauges: Vec<Option<f64>> = rs.iter().map(|r| gauge(r)).collect();
            let leaders: Vec<usize> = (0..rs.len()).filter(|i| gauges[*i] == Some(1.0)).collect();
            let logs = || {
                rs.iter()
                    .map(|r| r.log_text())
                    .collect::<Vec<_>>()
                    .join("\n---\n")
            };
            assert!(leaders.len() <= 1, "two leaders: {gauges:?}\n{}", logs());
            if leaders.len() == 1 && gauges.iter().all(Option::is_some) {
                return leaders[0];
            }
            assert!(
                Instant::now() < deadline,
                "no single leader within 60 s: {gauges:?}\n{}",
                logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let first = one_leader(&[&running[0], &running[1]]);
    let other = 1 - first;
    assert!(
        holder().starts_with(&format!("{}-", pods[first])),
        "the Lease names {}: {}",
        pods[first],
        holder()
    );

    // SIGTERM: the leader gives the Lease up and the other pod takes it.
    let status = running[first].terminate();
    assert!(status.success(), "{status}\n{}", running[first].log_text());
    assert_eq!(one_leader(&[&running[other]]), 0);
    eventually(
        || format!("the Lease does not name {}: {}", pods[other], holder()),
        || holder().starts_with(&format!("{}-", pods[other])),
    );
    for r in &running {
        let log = r.log_text();
        assert!(
            !log.contains("Forbidden") && !log.contains("forbidden"),
            "{log}"
        );
    }

    // The same token through a kube client: its Lease, and nothing else.
    let (status, body) = admin.post(
        &format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"),
        &json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": "another-lease"}, "spec": {"holderIdentity": "someone"}}),
    );
    assert_eq!(status, 201, "{body}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = cp().client(Some(&token)).await;
        let leases: kube::Api<Lease> = kube::Api::namespaced(client.clone(), ns);
        let forbidden = |what: &str, r: Result<Lease, kube::Error>| match r {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{what}: {s:?}"),
            other => panic!("{what} was allowed: {other:?}"),
        };
        let ours = leases.get(&lease).await.expect("its own Lease");
        let pp = kube::api::PostParams::default();
        // Unchanged, so the leader's renewals go on; 409 (the leader renewed in between) is
        // an authorised write too.
        match leases.replace(&lease, &pp, &ours).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(e) => panic!("updating its own Lease: {e:?}"),
        }
        forbidden("getting another Lease", leases.get("another-lease").await);
        let mut theirs = ours.clone();
        theirs.metadata.name = Some("another-lease".into());
        theirs.metadata.resource_version = None;
        forbidden(
            "updating another Lease",
            leases.replace("another-lease", &pp, &theirs).await,
        );
        forbidden(
            "patching its Lease",
            leases
                .patch(
                    &lease,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(json!({"spec": {"holderIdentity": "x"}})),
                )
                .await,
        );
        match leases.delete(&lease, &Default::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "deleting its Lease: {s:?}"),
            other => panic!("deleting its Lease was allowed: {other:?}"),
        }
        match leases.list(&Default::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "listing Leases: {s:?}"),
            other => panic!("listing Leases was allowed: {other:?}"),
        }
        let elsewhere: kube::Api<Lease> = kube::Api::namespaced(client.clone(), "kube-system");
        forbidden(
            "getting a Lease of kube-system",
            elsewhere.get("kube-controller-manager").await,
        );
        let mut made = Lease::default();
        made.metadata.name = Some("made-with-the-token".into());
        forbidden(
            "creating a Lease in another namespace",
            elsewhere.create(&pp, &made).await,
        );
        // Create cannot be narrowed by name in RBAC: allowed here, and then out of reach.
        leases
            .create(&pp, &made)
            .await
            .expect("create is granted on Leases");
        forbidden(
            "reading the Lease it made",
            leases.get("made-with-the-token").await,
        );
    });
    drop(running);
    // The Lease is the registry's, not Helm's: the uninstall hook removes it (after the
    // registry's Deployment, so no leader makes it again).
    let hooks = uninstall(release, ns);
    for h in &hooks {
        assert!(h.success, "hook job {} failed:\n{}", h.job, h.log);
    }
    let lease_path = format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{lease}");
    assert_eq!(
        admin.get(&lease_path).0,
        404,
        "{}",
        admin.get(&lease_path).1
    );
}

/// A binary started as the chart's pod would run it, outside the cluster; killed when dropped.
struct Running {
    child: Option<Child>,
    log: PathBuf,
    /// `--listen`-like flags moved to free loopback ports.
    ports: Vec<(String, u16)>,
}

impl Running {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn port(&self, flag: &str) -> u16 {
        self.ports
            .iter()
            .find(|(f, _)| f == flag)
            .map(|(_, p)| *p)
            .unwrap_or_else(|| panic!("no {flag} in {:?}", self.ports))
    }

    /// Waits (60 s at most) for `url` to answer 200.
    fn wait_ready(&mut self, client: &reqwest::blocking::Client, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("exited early ({status}):\n{}", self.log_text());
            }
            if client.get(url).send().is_ok_and(|r| r.status() == 200) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{url} never ready:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (at most `timeout`, then kills it) for the process to exit by itself.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("did not exit within {timeout:?}:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then the exit status (30 s at most).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        outpost_e2e::run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(s)) = child.try_wait() {
                return s;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("did not exit after SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs the first container of a pod spec (a workload's template, or a pod's, as the API
/// server holds them) the way the kubelet would, but as a local process: its volumes written
/// under `root` at their mount paths from the real ConfigMaps and Secrets (hostPath volumes
/// are `root` + the mount path, so `--root=/host` is `root`/host), every absolute path in its
/// arguments moved under `root`, listeners on free loopback ports, its environment from the
/// downward API (`fields`: fieldPath -> value), and `KUBECONFIG` carrying `token`. The program
/// is the workspace binary named by the image (or by the command's first item).
fn run_as_pod(
    spec: &Value,
    ns: &str,
    root: &Path,
    fields: &[(&str, &str)],
    token: &str,
) -> Running {
    let admin = cp().admin();
    let container = &spec["containers"][0];
    let volumes = spec["volumes"].as_array().cloned().unwrap_or_default();
    for m in container["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let mount = root.join(
            m["mountPath"]
                .as_str()
                .expect("mountPath")
                .trim_start_matches('/'),
        );
        std::fs::create_dir_all(&mount).expect("mount dir");
        let v = volumes
            .iter()
            .find(|v| v["name"] == m["name"])
            .unwrap_or_else(|| panic!("no volume for mount {m}"));
        let (data, items) = if let Some(name) = v["configMap"]["name"].as_str() {
            let cm = admin.get_ok(&format!("/api/v1/namespaces/{ns}/configmaps/{name}"));
            let data: Vec<(String, Vec<u8>)> = cm["data"]
                .as_object()
                .map(|d| {
                    d.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or("").as_bytes().to_vec()))
                        .collect()
                })
                .unwrap_or_default();
            (data, &v["configMap"]["items"])
        } else if let Some(name) = v["secret"]["secretName"].as_str() {
            let secret = admin.get_ok(&format!("/api/v1/namespaces/{ns}/secrets/{name}"));
            let data: Vec<(String, Vec<u8>)> = secret["data"]
                .as_object()
                .map(|d| {
                    d.iter()
                        .map(|(k, v)| {
                            let raw = base64::engine::general_purpose::STANDARD
                                .decode(v.as_str().unwrap_or(""))
                                .expect("secret data is base64");
                            (k.clone(), raw)
                        })
                        .collect()
                })
                .unwrap_or_default();
            (data, &v["secret"]["items"])
        } else if v["hostPath"].is_object() {
            continue;
        } else if v["projected"]["sources"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["serviceAccountToken"].is_object()))
        {
            // The API access volume the ServiceAccount admission adds to pods: here the
            // process gets the same token through KUBECONFIG.
            continue;
        } else {
            panic!("volume kind not handled: {v}");
        };
        let wanted: Vec<(String, String)> = match items.as_array() {
            Some(items) => items
                .iter()
                .map(|i| {
                    (
                        i["key"].as_str().expect("key").to_string(),
                        i["path"].as_str().expect("path").to_string(),
                    )
                })
                .collect(),
            None => data.iter().map(|(k, _)| (k.clone(), k.clone())).collect(),
        };
        for (key, path) in wanted {
            let content = data
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, c)| c.clone())
                .unwrap_or_else(|| panic!("{v}: no key {key}"));
            std::fs::write(mount.join(path), content).expect("volume file");
        }
    }
    let mut ports = Vec::new();
    let command: Vec<Value> = container["command"].as_array().cloned().unwrap_or_default();
    let args: Vec<String> = command
        .iter()
        .skip(1)
        .chain(container["args"].as_array().into_iter().flatten())
        .map(|a| {
            let a = a.as_str().expect("arg");
            let (flag, value) = a.split_once('=').unwrap_or((a, ""));
            if flag.ends_with("listen") {
                let port = free_port();
                ports.push((flag.to_string(), port));
                format!("{flag}=127.0.0.1:{port}")
            } else if let Some(path) = value.strip_prefix('/') {
                format!("{flag}={}", root.join(path).display())
            } else {
                a.to_string()
            }
        })
        .collect();
    // A pod without volumes has nothing under `root` yet.
    std::fs::create_dir_all(root).expect("pod root");
    let kubeconfig = root.join("kubeconfig");
    cp().write_kubeconfig(&kubeconfig, Some(token));
    let binary = match command.first().and_then(Value::as_str) {
        Some(program) => program.rsplit('/').next().expect("program name"),
        None => container["image"]
            .as_str()
            .and_then(|i| i.rsplit('/').next())
            .and_then(|n| n.split(':').next())
            .expect("binary name from the image"),
    };
    let log = root.join(format!("{binary}.log"));
    let f = std::fs::File::create(&log).expect("log");
    let mut cmd = Command::new(bin(binary));
    cmd.args(&args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .env("KUBECONFIG", &kubeconfig);
    for e in container["env"].as_array().cloned().unwrap_or_default() {
        let name = e["name"].as_str().expect("env name");
        if let Some(v) = e["value"].as_str() {
            cmd.env(name, v);
        } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            let value = fields
                .iter()
                .find(|(f, _)| *f == field)
                .map(|(_, v)| *v)
                .unwrap_or_else(|| panic!("no value for the downward API field {field}"));
            cmd.env(name, value);
        } else if let Some(secret) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
            // As the kubelet: the key's value, an optional key the Secret lacks unset, a
            // required one missing stops the pod (here: the test).
            let r = &e["valueFrom"]["secretKeyRef"];
            let key = r["key"].as_str().expect("secretKeyRef key");
            let data = admin.get_ok(&format!("/api/v1/namespaces/{ns}/secrets/{secret}"))["data"]
                [key]
                .as_str()
                .map(|v| {
                    base64::engine::general_purpose::STANDARD
                        .decode(v)
                        .expect("secret data is base64")
                });
            match data {
                Some(v) => {
                    cmd.env(name, String::from_utf8(v).expect("utf-8 secret value"));
                }
                None => assert!(r["optional"] == true, "{name}: {secret} has no {key}"),
            }
        } else {
            panic!("environment source not handled by this suite: {e}");
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("start {binary}: {e}"));
    Running {
        child: Some(child),
        log,
        ports,
    }
}

/// A Helm hook pod this suite ran in place of a kubelet.
struct HookRun {
    job: String,
    success: bool,
    log: String,
}

/// `helm uninstall` on a control plane without nodes, hooks included. Helm creates each
/// delete hook Job and waits for it to complete; no kubelet runs the Job's pod here, so this
/// does what a kubelet would: runs the pod's container as a local process (`run_as_pod`) with
/// a token of the pod's ServiceAccount (so the hook runs with exactly the chart's RBAC for it),
/// and reports its exit in the pod's status. The Job controller then completes the Job (or
/// retries it) and Helm goes on. Returns the hook pods run.
fn uninstall(release: &str, ns: &str) -> Vec<HookRun> {
    let (r, n) = (release.to_string(), ns.to_string());
    let _labels = NODE_LABELS.read().unwrap_or_else(|e| e.into_inner());
    let helm_run = std::thread::spawn(move || helm("uninstall", &r, &n, &[]));
    let admin = cp().admin();
    let dir = tempfile::tempdir().expect("temp dir");
    let mut handled: Vec<String> = Vec::new();
    let mut runs = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while !helm_run.is_finished() {
        assert!(Instant::now() < deadline, "helm uninstall {release} hangs");
        let pods = admin.get_ok(&format!(
            "/api/v1/namespaces/{ns}/pods?labelSelector=job-name"
        ));
        for pod in pods["items"].as_array().into_iter().flatten() {
            let name = pod["metadata"]["name"]
                .as_str()
                .expect("pod name")
                .to_string();
            if handled.contains(&name) || pod["status"]["phase"] != "Pending" {
                continue;
            }
            let job = pod["metadata"]["labels"]["job-name"]
                .as_str()
                .expect("job-name")
                .to_string();
            let (status, job_obj) =
                admin.get(&format!("/apis/batch/v1/namespaces/{ns}/jobs/{job}"));
            let hook = job_obj["metadata"]["annotations"]["helm.sh/hook"]
                .as_str()
                .unwrap_or("");
            if status != 200 || !hook.contains("delete") {
                continue;
            }
            handled.push(name.clone());
            let spec = &pod["spec"];
            let sa = spec["serviceAccountName"].as_str().unwrap_or("default");
            let token = cp().service_account_token(ns, sa);
            let mut running = run_as_pod(
                spec,
                ns,
                &dir.path().join(&name),
                &[
                    ("metadata.name", &name),
                    ("metadata.namespace", ns),
                    ("spec.serviceAccountName", sa),
                ],
                &token,
            );
            let exit = running.wait_exit(Duration::from_secs(240));
            let code = exit.code().unwrap_or(137);
            let container = &spec["containers"][0];
            let (phase, reason) = if exit.success() {
                ("Succeeded", "Completed")
            } else {
                ("Failed", "Error")
            };
            let (status, body) = admin.patch(
                &format!("/api/v1/namespaces/{ns}/pods/{name}/status"),
                &json!({"status": {"phase": phase, "containerStatuses": [{
                    "name": container["name"], "image": container["image"], "imageID": "",
                    "ready": false, "restartCount": 0, "started": false,
                    "state": {"terminated": {"exitCode": code, "reason": reason}},
                }]}}),
            );
            assert_eq!(status, 200, "reporting {name}'s exit: {body}");
            runs.push(HookRun {
                job,
                success: exit.success(),
                log: running.log_text(),
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Err(panic) = helm_run.join() {
        for r in &runs {
            eprintln!("hook job {} (success: {}):\n{}", r.job, r.success, r.log);
        }
        std::panic::resume_unwind(panic);
    }
    runs
}

fn https_client(ca_pem: &[u8]) -> reqwest::blocking::Client {
    let ca = reqwest::Certificate::from_pem(ca_pem).expect("CA");
    reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client")
}

fn forbidden(what: &str, (status, body): (u16, Value)) {
    assert_eq!(status, 403, "{what} must be forbidden: {body}");
    assert_eq!(body["reason"], "Forbidden", "{what}: {body}");
}

/// The chart's RBAC, with its own ServiceAccounts' tokens (TokenRequest): the webhook writes an
/// opted-in namespace its pull secret (a namespace credential, the chart's default) and
/// removes it on opt-out; the node agent
/// labels its Node, reports an event and writes its files, and unlabels on SIGTERM; writes
/// outside their roles are forbidden.
#[test]
fn the_chart_rbac_is_enough_for_the_webhook_and_the_node_agent_and_no_more() {
    let (ns, release) = ("rbac", "outpost-rbac");
    let (app, node) = ("rbac-app", "rbac-node");
    let admin = cp().admin();
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir).expect("pki dir");
    let ca_bundle = own_tls_secrets(ns, &pki_dir);
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(&ca_bundle)
        .expect("base64");
    create_pull_secret(ns, "rbac-pull");
    let values = write_values(
        dir.path(),
        "values.json",
        &json!({
            "connectionString": CONN,
            "cert-manager": {"enabled": false},
            "tls": {"secret": "own-registry-tls"},
            "service": {"clusterIP": "10.96.100.14"},
            // Its own name: other tests' webhooks copy "outpost-pull" into every opted-in
            // namespace, and would take this test's namespace's name (or it theirs).
            "pullSecret": {"name": "rbac-pull"},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle,
                        "rules": [{"upstream": "myacr.azurecr.io"}]},
        }),
    );
    helm(
        "install",
        release,
        ns,
        &["--values", values.to_str().expect("utf-8 path")],
    );

    // The webhook with its ServiceAccount's token.
    let webhook_token = cp().service_account_token(ns, &format!("{release}-webhook"));
    let deployment = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments/{release}-webhook"
    ));
    let webhook_root = dir.path().join("webhook");
    let mut webhook = run_as_pod(
        &deployment["spec"]["template"]["spec"],
        ns,
        &webhook_root,
        &[("metadata.namespace", ns)],
        &webhook_token,
    );
    let url = format!("https://127.0.0.1:{}/readyz", webhook.port("--listen"));
    webhook.wait_ready(&https_client(&ca_pem), &url);

    // Opt a namespace in: its pull secret appears, a credential minted for it (username the
    // namespace), marked as the webhook's.
    cp().create_namespace(app, &[("outpost.io/inject", "enabled")]);
    let copy_path = format!("/api/v1/namespaces/{app}/secrets/rbac-pull");
    eventually(
        || {
            format!(
                "no copy of the pull secret in {app}:\n{}",
                webhook.log_text()
            )
        },
        || admin.get(&copy_path).0 == 200,
    );
    let copy = admin.get_ok(&copy_path);
    assert_eq!(copy["type"], "kubernetes.io/dockerconfigjson");
    let config: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(copy["data"][".dockerconfigjson"].as_str().expect("data"))
            .expect("base64"),
    )
    .expect("json");
    assert_eq!(
        config["auths"]["10.96.100.14"]["username"], app,
        "minted for the namespace"
    );
    assert_eq!(
        copy["metadata"]["annotations"]["outpost.io/credential-scope"], "**",
        "{}",
        copy["metadata"]
    );
    assert_eq!(
        copy["metadata"]["labels"]["app.kubernetes.io/managed-by"],
        "outpost-webhook"
    );
    // Opt out: the copy goes.
    let (status, body) = admin.patch(
        &format!("/api/v1/namespaces/{app}"),
        &json!({"metadata": {"labels": {"outpost.io/inject": "disabled"}}}),
    );
    assert_eq!(status, 200, "{body}");
    eventually(
        || format!("the copy stayed after opt-out:\n{}", webhook.log_text()),
        || admin.get(&copy_path).0 == 404,
    );
    let log = webhook.log_text();
    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "{log}"
    );

    // The webhook's token cannot touch other Secrets or Nodes.
    let as_webhook = cp().rest(&webhook_token);
    let (status, body) = admin.post(
        &format!("/api/v1/namespaces/{app}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret"},
                "stringData": {"k": "v"}}),
    );
    assert_eq!(status, 201, "{body}");
    let other = format!("/api/v1/namespaces/{app}/secrets/app-secret");
    forbidden("reading another secret", as_webhook.get(&other));
    forbidden(
        "updating another secret",
        as_webhook.put(
            &other,
            &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "app-secret"},
                    "stringData": {"k": "stolen"}}),
        ),
    );
    forbidden("deleting another secret", as_webhook.delete(&other));

    // The node agent with its ServiceAccount's token, on a Node the admin registered.
    let _labels = NODE_LABELS.write().unwrap_or_else(|e| e.into_inner());
    let (status, body) = admin.post(
        "/api/v1/nodes",
        &json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}}),
    );
    assert_eq!(status, 201, "{body}");
    let agent_token = cp().service_account_token(ns, &format!("{release}-node-agent"));
    let daemonset = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/daemonsets/{release}-node-agent"
    ));
    let agent_root = dir.path().join("agent");
    let containerd = agent_root.join("host/etc/containerd/config.toml");
    std::fs::create_dir_all(containerd.parent().expect("parent")).expect("dirs");
    std::fs::write(
        &containerd,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    )
    .expect("containerd config");
    let mut agent = run_as_pod(
        &daemonset["spec"]["template"]["spec"],
        ns,
        &agent_root,
        &[("spec.nodeName", node)],
        &agent_token,
    );
    let node_path = format!("/api/v1/nodes/{node}");
    eventually(
        || format!("{node} never labelled:\n{}", agent.log_text()),
        || admin.get_ok(&node_path)["metadata"]["labels"]["outpost.io/trusted"] == "true",
    );
    let hosts = agent_root.join("host/etc/containerd/certs.d/myacr.azurecr.io/hosts.toml");
    let text = std::fs::read_to_string(&hosts).expect("hosts.toml of the rule's upstream");
    assert!(text.contains("10.96.100.14"), "{text}");
    eventually(
        || format!("no RegistryTrust event:\n{}", agent.log_text()),
        || {
            admin.get_ok("/apis/events.k8s.io/v1/events")["items"]
                .as_array()
                .is_some_and(|items| {
                    items
                        .iter()
                        .any(|e| e["regarding"]["name"] == node && e["reason"] == "RegistryTrust")
                })
        },
    );
    let ready = format!("http://127.0.0.1:{}/readyz", agent.port("--listen"));
    agent.wait_ready(&http(), &ready);

    // The agent's token cannot read or write Secrets.
    let as_agent = cp().rest(&agent_token);
    let pull = format!("/api/v1/namespaces/{ns}/secrets/rbac-pull");
    forbidden("reading the pull secret", as_agent.get(&pull));
    forbidden(
        "patching the pull secret",
        as_agent.patch(&pull, &json!({"metadata": {"labels": {"x": "y"}}})),
    );
    // Nor can the webhook's token label Nodes.
    forbidden(
        "patching a Node",
        as_webhook.patch(&node_path, &json!({"metadata": {"labels": {"x": "y"}}})),
    );

    // SIGTERM (--cleanup-on-exit, as rendered): label and files gone, with the same token.
    let status = agent.terminate();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    let labels = admin.get_ok(&node_path)["metadata"]["labels"].clone();
    assert!(labels.get("outpost.io/trusted").is_none(), "{labels}");
    assert!(!hosts.exists(), "{} left", hosts.display());
    let log = agent.log_text();
    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "{log}"
    );
    drop(webhook);
}

/// The harness's `kube::Client`s: the admin's sees everything, a ServiceAccount token (from
/// TokenRequest) only what RBAC grants it (nothing, for `default`).
#[test]
fn kube_clients_for_the_admin_and_for_a_service_account_token() {
    use k8s_openapi::api::core::v1::Namespace;
    let token = cp().service_account_token("default", "default");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let admin: kube::Api<Namespace> = kube::Api::all(cp().client(None).await);
        let list = admin.list(&Default::default()).await.expect("admin lists");
        assert!(
            list.items
                .iter()
                .any(|n| n.metadata.name.as_deref() == Some("kube-system"))
        );
        let sa: kube::Api<Namespace> = kube::Api::all(cp().client(Some(&token)).await);
        match sa.list(&Default::default()).await {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
            other => panic!("the default ServiceAccount listed namespaces: {other:?}"),
        }
    });
}

/// Client tokens on (`tokens.existingSecret`): the webhook, run with the chart's arguments,
/// volumes and ServiceAccount token, mints a namespace credential from the chart-made token
/// signing key instead of copying the pull secret: the opted-in namespace's secret holds a
/// credential that the registry's check (with that key Secret's file) accepts for that
/// namespace and its annotated patterns only; opting out removes it.
#[test]
fn with_client_tokens_the_rendered_webhook_mints_namespace_credentials() {
    let (ns, release) = ("nscred", "outpost-nscred");
    let app = "nscred-app";
    let admin = cp().admin();
    cp().create_namespace(ns, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let pki_dir = dir.path().join("pki");
    std::fs::create_dir_all(&pki_dir).expect("pki dir");
    let ca_bundle = own_tls_secrets(ns, &pki_dir);
    let ca_pem = base64::engine::general_purpose::STANDARD
        .decode(&ca_bundle)
        .expect("base64");
    create_pull_secret(ns, "nscred-pull");
    // The registry's tokens file; the webhook never reads it.
    let (status, body) = admin.post(
        &format!("/api/v1/namespaces/{ns}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "outpost-tokens"},
                "stringData": {"tokens.toml": ""}}),
    );
    assert_eq!(status, 201, "{body}");
    let values = write_values(
        dir.path(),
        "values.json",
        &json!({
            "connectionString": CONN,
            "cert-manager": {"enabled": false},
            "tls": {"secret": "own-registry-tls"},
            "service": {"clusterIP": "10.96.100.18"},
            "tokens": {"existingSecret": "outpost-tokens"},
            "namespaceScopes": {"default": [], "credentialLifetime": "2h"},
            // Its own name, apart from the other tests' webhooks copying "outpost-pull".
            "pullSecret": {"name": "nscred-pull"},
            "webhook": {"tlsSecret": "own-webhook-tls", "caBundle": ca_bundle},
        }),
    );
    helm(
        "install",
        release,
        ns,
        &["--values", values.to_str().expect("utf-8 path")],
    );
    let key_secret = admin.get_ok(&format!(
        "/api/v1/namespaces/{ns}/secrets/{release}-token-signing-key"
    ));
    let key_file = base64::engine::general_purpose::STANDARD
        .decode(
            key_secret["data"]["signing-keys"]
                .as_str()
                .expect("key data"),
        )
        .expect("base64");
    let keys = outpost_core::SigningKeys::parse(
        Path::new("signing-keys"),
        std::str::from_utf8(&key_file).expect("utf-8"),
    )
    .expect("the chart's key file");

    let token = cp().service_account_token(ns, &format!("{release}-webhook"));
    let deployment = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments/{release}-webhook"
    ));
    let mut webhook = run_as_pod(
        &deployment["spec"]["template"]["spec"],
        ns,
        &dir.path().join("webhook"),
        &[("metadata.namespace", ns)],
        &token,
    );
    let url = format!("https://127.0.0.1:{}/readyz", webhook.port("--listen"));
    webhook.wait_ready(&https_client(&ca_pem), &url);

    // Opted in without the annotation, and the chart's default scope is []: no credential.
    // Made first, so the pass that mints the app's credential has seen it.
    cp().create_namespace("nscred-none", &[("outpost.io/inject", "enabled")]);
    let (status, body) = admin.post(
        "/api/v1/namespaces",
        &json!({"apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": app, "labels": {"outpost.io/inject": "enabled"},
                             "annotations": {"outpost.io/repositories": "team-a/**"}}}),
    );
    assert_eq!(status, 201, "{body}");
    let path = format!("/api/v1/namespaces/{app}/secrets/nscred-pull");
    eventually(
        || format!("no namespace credential in {app}:\n{}", webhook.log_text()),
        || admin.get(&path).0 == 200,
    );
    let secret = admin.get_ok(&path);
    assert_eq!(secret["type"], "kubernetes.io/dockerconfigjson");
    let config: Value = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(secret["data"][".dockerconfigjson"].as_str().expect("data"))
            .expect("base64"),
    )
    .expect("dockerconfigjson");
    let entry = &config["auths"]["10.96.100.18"];
    assert_eq!(entry["username"], app, "{config}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let cred = outpost_core::nscred::verify(&keys, entry["password"].as_str().expect("pw"), now)
        .expect("the registry's check accepts it");
    assert_eq!(cred.namespace, app);
    assert_eq!(
        cred.repositories
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>(),
        ["team-a/**"]
    );
    assert_eq!(cred.expires_at - cred.issued_at, 7200);
    // The source's token is not what it holds.
    let source = admin.get_ok(&format!("/api/v1/namespaces/{ns}/secrets/nscred-pull"));
    assert_ne!(secret["data"], source["data"]);
    assert_eq!(
        admin
            .get("/api/v1/namespaces/nscred-none/secrets/nscred-pull")
            .0,
        404
    );

    let (status, body) = admin.patch(
        &format!("/api/v1/namespaces/{app}"),
        &json!({"metadata": {"labels": {"outpost.io/inject": null}}}),
    );
    assert_eq!(status, 200, "{body}");
    eventually(
        || {
            format!(
                "the credential stayed after opt-out:\n{}",
                webhook.log_text()
            )
        },
        || admin.get(&path).0 == 404,
    );
    let log = webhook.log_text();
    assert!(
        !log.contains("Forbidden") && !log.contains("forbidden"),
        "{log}"
    );
    assert!(
        !log.contains(entry["password"].as_str().expect("pw")),
        "the credential is in the log"
    );
    drop(webhook);
}
