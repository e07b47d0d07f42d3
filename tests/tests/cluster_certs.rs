//! Self-managed certificates on a real API server (the shared control plane of this binary):
//! the chart installed with its defaults (no cert-manager, no given Secret) through the real
//! Helm library, the webhook started as the Deployment renders it (two replicas racing from an
//! empty namespace) with a token of the chart's own ServiceAccount (TokenRequest): the Secrets
//! are created once and agree, the caBundle is patched and re-patched, HTTPS verifies for the
//! Service name against the bundle, writes outside the chart's RBAC are forbidden; a whole CA
//! rotation in seconds through the hidden timing flags; and the pre-delete hook's
//! `outpost-webhook uninstall`, with the hook's own RBAC, removing the managed Secrets, the
//! pull-secret copies and the node label.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use outpost_e2e::k8s::ControlPlane;
use outpost_e2e::{bin, free_port, run_timeout};
use serde_json::{Value, json};

const CONN: &str = "ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=p4ss;\
                    ParentGatewayEndpoint=myacr.westeurope.data.azurecr.io;ParentEndpointProtocol=https";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

fn cp() -> &'static ControlPlane {
    ControlPlane::shared()
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn unb64(v: &Value) -> String {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .expect("base64");
    String::from_utf8(raw).expect("PEM text")
}

/// Polls `cond` (every 200 ms, `secs` at most); panics with `what()` when it never holds.
fn eventually(secs: u64, what: impl Fn() -> String, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "{}", what());
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn helm_install(release: &str, ns: &str, values: &Value, dir: &Path) -> Value {
    let file = dir.join(format!("{release}.json"));
    std::fs::write(&file, values.to_string()).expect("values");
    let out = run_timeout(
        Command::new("python3")
            .arg("-B")
            .arg(repo().join("charts/tests/helm_cluster.py"))
            .arg("install")
            .arg("--kubeconfig")
            .arg(&cp().admin_kubeconfig)
            .args(["--release", release, "--namespace", ns, "--values"])
            .arg(&file),
        Duration::from_secs(240),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "helm install {release}: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("helm output")
}

/// Helm's hook objects for the same values (rendered by the real Helm library into the
/// stand-in API of helm_render.py), as JSON.
fn hooks(release: &str, ns: &str, values: &Value) -> Vec<Value> {
    let script = "import json, sys, yaml\n\
                  sys.path.insert(0, sys.argv[1])\n\
                  import helm_render\n\
                  _, r = helm_render.render(sys.argv[2], json.loads(sys.argv[3]), namespace=sys.argv[4], release=sys.argv[5])\n\
                  json.dump([yaml.safe_load(h['manifest']) for h in r['hooks']], sys.stdout)\n";
    let out = run_timeout(
        Command::new("python3")
            .args(["-B", "-c", script])
            .arg(repo().join("charts/tests"))
            .arg(repo().join("charts/outpost"))
            .arg(values.to_string())
            .args([ns, release]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("hooks JSON")
}

/// A process killed when dropped.
struct Proc {
    child: Child,
    log: PathBuf,
    port: u16,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The webhook container of the rendered Deployment as a local process: its args with the
/// config file under `dir`, the listener on a free loopback port, `extra` flags appended, the
/// namespace from the downward API, and the API reached with `token`.
fn start_webhook(
    ns: &str,
    release: &str,
    dir: &Path,
    token: &str,
    name: &str,
    extra: &[&str],
) -> Proc {
    start_container(ns, &format!("{release}-webhook"), dir, token, name, extra)
}

/// The first container of Deployment `deployment` as a local process (see `start_webhook`);
/// a `--config` file comes from the ConfigMap of the Deployment's name.
fn start_container(
    ns: &str,
    deployment: &str,
    dir: &Path,
    token: &str,
    name: &str,
    extra: &[&str],
) -> Proc {
    let admin = cp().admin();
    let dep = admin.get_ok(&format!(
        "/apis/apps/v1/namespaces/{ns}/deployments/{deployment}"
    ));
    let root = dir.join(name);
    std::fs::create_dir_all(&root).expect("dir");
    let config_path = root.join("config.toml");
    let port = free_port();
    let container = &dep["spec"]["template"]["spec"]["containers"][0];
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| {
            let a = a.as_str().expect("arg");
            if a.starts_with("--config=") {
                let config = admin.get_ok(&format!(
                    "/api/v1/namespaces/{ns}/configmaps/{deployment}"
                ))["data"]["config.toml"]
                    .as_str()
                    .expect("config.toml")
                    .to_string();
                std::fs::write(&config_path, config).expect("config");
                format!("--config={}", config_path.display())
            } else if a.starts_with("--listen=") {
                format!("--listen=127.0.0.1:{port}")
            } else if a.starts_with("--metrics-listen=") {
                // Loopback, and a port of its own: replicas run side by side here.
                format!("--metrics-listen=127.0.0.1:{}", free_port())
            } else if let Some(path) = a.strip_prefix("--namespace-credential-key-file=") {
                // The signing key Secret's file, as its volume would hold it.
                let file = Path::new(path)
                    .file_name()
                    .expect("key file name")
                    .to_string_lossy()
                    .into_owned();
                let volume = dep["spec"]["template"]["spec"]["volumes"]
                    .as_array()
                    .expect("volumes")
                    .iter()
                    .find(|v| v["name"] == "signing-keys")
                    .expect("the signing-keys volume");
                let name = volume["secret"]["secretName"].as_str().expect("secretName");
                let data = admin.get_ok(&format!("/api/v1/namespaces/{ns}/secrets/{name}"))["data"]
                    [file.as_str()]
                .as_str()
                .expect("key data")
                .to_string();
                let local = root.join(&file);
                std::fs::write(
                    &local,
                    base64::engine::general_purpose::STANDARD
                        .decode(data)
                        .expect("base64"),
                )
                .expect("key file");
                format!("--namespace-credential-key-file={}", local.display())
            } else {
                a.to_string()
            }
        })
        .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let kubeconfig = root.join("kubeconfig");
    cp().write_kubeconfig(&kubeconfig, Some(token));
    let log = root.join("webhook.log");
    let f = std::fs::File::create(&log).expect("log");
    let child = Command::new(bin("outpost-webhook"))
        .args(&args)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("KUBERNETES_SERVICE_PORT")
        .env_remove("POD_NAMESPACE")
        .env("KUBECONFIG", &kubeconfig)
        .env("OUTPOST_NAMESPACE", ns)
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("start outpost-webhook");
    Proc { child, log, port }
}

fn secret(ns: &str, name: &str) -> Option<Value> {
    let (status, body) = cp()
        .admin()
        .get(&format!("/api/v1/namespaces/{ns}/secrets/{name}"));
    (status == 200).then_some(body)
}

fn mwc_path(release: &str) -> String {
    format!("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{release}-webhook")
}

/// The caBundles of every webhook of the configuration, decoded.
fn ca_bundles(release: &str) -> Vec<String> {
    cp().admin().get_ok(&mwc_path(release))["webhooks"]
        .as_array()
        .expect("webhooks")
        .iter()
        .map(|w| {
            let v = &w["clientConfig"]["caBundle"];
            if v.is_null() { String::new() } else { unb64(v) }
        })
        .collect()
}

/// `GET /readyz` over HTTPS for the webhook Service's name, trusting only `bundle`.
fn verifies(p: &Proc, ns: &str, release: &str, bundle: &str) -> Result<(), String> {
    let certs =
        reqwest::Certificate::from_pem_bundle(bundle.as_bytes()).map_err(|e| e.to_string())?;
    let host = format!("{release}-webhook.{ns}.svc");
    let client = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_certs_only(certs)
        .resolve(&host, SocketAddr::from(([127, 0, 0, 1], p.port)))
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(|e| e.to_string())?;
    let r = client
        .get(format!("https://{host}:{}/readyz", p.port))
        .send()
        .map_err(|e| format!("{e:?}"))?;
    if r.status().as_u16() == 200 {
        Ok(())
    } else {
        Err(format!("HTTP {}", r.status()))
    }
}

fn sans(pem: &str, dir: &Path) -> String {
    let f = dir.join("cert.pem");
    std::fs::write(&f, pem).expect("cert file");
    let out = run_timeout(
        Command::new("openssl")
            .args([
                "x509",
                "-noout",
                "-ext",
                "subjectAltName,keyUsage,extendedKeyUsage",
                "-in",
            ])
            .arg(&f),
        Duration::from_secs(30),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn forbidden(what: &str, (status, body): (u16, Value)) {
    assert_eq!(status, 403, "{what} must be forbidden: {body}");
}

#[test]
fn managed_certificates_with_the_chart_rbac_and_the_uninstall_hook() {
    let (ns, release, app) = ("managed", "outpost-mc", "mc-app");
    let admin = cp().admin();
    let dir = tempfile::tempdir().expect("temp dir");
    cp().create_namespace(ns, &[]);
    cp().create_namespace(app, &[("outpost.io/inject", "enabled")]);
    // The pull secret the copier copies (as the chart README has the user create it).
    let (status, body) = admin.post(
        &format!("/api/v1/namespaces/{ns}/secrets"),
        &json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
                "metadata": {"name": "mc-pull"},
                "data": {".dockerconfigjson": b64(br#"{"auths":{}}"#)}}),
    );
    assert_eq!(status, 201, "{body}");
    // A node the agent labelled once and could not unlabel (unschedulable: no pod lands on a
    // node without a kubelet). The node agent is off here: the real-node suite runs it.
    let (status, body) = admin.post(
        "/api/v1/nodes",
        &json!({"apiVersion": "v1", "kind": "Node",
                "metadata": {"name": "mc-node", "labels": {"outpost.io/trusted": "true"}},
                "spec": {"unschedulable": true}}),
    );
    assert_eq!(status, 201, "{body}");
    // Its own pull secret name: the other tests' webhooks mint "outpost-pull" into every
    // opted-in namespace (mc-app too), and the first one there keeps it.
    let values = json!({"connectionString": CONN, "service": {"clusterIP": "10.96.100.21"},
                        "pullSecret": {"name": "mc-pull"},
                        "trustDistribution": {"enabled": false}});
    let release_info = helm_install(release, ns, &values, dir.path());
    assert_eq!(release_info["status"], "deployed", "{release_info}");
    // The template carries no caBundle: the webhook sets it.
    assert!(ca_bundles(release).iter().all(String::is_empty));

    // Two replicas from an empty namespace, with the chart's webhook ServiceAccount's token.
    let token = cp().service_account_token(ns, &format!("{release}-webhook"));
    let a = start_webhook(ns, release, dir.path(), &token, "a", &[]);
    let b = start_webhook(ns, release, dir.path(), &token, "b", &[]);
    let names = [
        format!("{release}-ca"),
        format!("{release}-registry-tls"),
        format!("{release}-webhook-tls"),
    ];
    eventually(
        60,
        || format!("managed Secrets never all there:\n{}\n{}", a.log(), b.log()),
        || names.iter().all(|n| secret(ns, n).is_some()),
    );
    let ca = secret(ns, &names[0]).expect("CA");
    let bundle = unb64(&ca["data"]["ca.crt"]);
    for (n, role) in names.iter().zip(["ca", "registry", "webhook"]) {
        let s = secret(ns, n).expect("secret");
        assert_eq!(s["type"], "kubernetes.io/tls", "{n}");
        assert_eq!(
            s["metadata"]["labels"]["app.kubernetes.io/managed-by"],
            "outpost-webhook"
        );
        assert_eq!(
            s["metadata"]["labels"]["outpost.io/certificate"], role,
            "{n}"
        );
        eventually(
            30,
            || format!("{n}'s ca.crt is not the bundle"),
            || unb64(&secret(ns, n).expect("secret")["data"]["ca.crt"]) == bundle,
        );
    }
    let registry_cert = unb64(&secret(ns, &names[1]).expect("registry")["data"]["tls.crt"]);
    let ext = sans(&registry_cert, dir.path());
    for want in [
        "DNS:outpost-mc-registry,",
        "DNS:outpost-mc-registry.managed,",
        "DNS:outpost-mc-registry.managed.svc,",
        "DNS:outpost-mc-registry.managed.svc.cluster.local",
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "IP Address:10.96.100.21",
        "Digital Signature",
        "TLS Web Server Authentication",
    ] {
        assert!(ext.contains(want), "{want} not in:\n{ext}");
    }
    // caBundle patched on every webhook of the configuration.
    eventually(
        30,
        || format!("caBundle not patched: {:?}", ca_bundles(release)),
        || ca_bundles(release).iter().all(|b| *b == bundle),
    );
    // Both replicas serve HTTPS for the Service name with a certificate of the one CA they
    // agreed on, and leave the Secrets alone once they agree (no write loop).
    for p in [&a, &b] {
        eventually(
            60,
            || {
                format!(
                    "no verified HTTPS: {:?}\n{}",
                    verifies(p, ns, release, &bundle),
                    p.log()
                )
            },
            || verifies(p, ns, release, &bundle).is_ok(),
        );
    }
    let version = |n: &str| secret(ns, n).expect("secret")["metadata"]["resourceVersion"].clone();
    let before: Vec<Value> = names.iter().map(|n| version(n)).collect();
    std::thread::sleep(Duration::from_secs(2));
    let after: Vec<Value> = names.iter().map(|n| version(n)).collect();
    assert_eq!(before, after, "the replicas keep rewriting the Secrets");
    for p in [&a, &b] {
        assert!(!p.log().contains("BEGIN"), "PEM in the log:\n{}", p.log());
    }

    // Someone resets the caBundle: it is set again.
    let mut mwc = admin.get_ok(&mwc_path(release));
    for w in mwc["webhooks"].as_array_mut().expect("webhooks") {
        w["clientConfig"]["caBundle"] = json!(b64(cp().ca_pem().as_bytes()));
    }
    let (status, body) = admin.put(&mwc_path(release), &mwc);
    assert_eq!(status, 200, "{body}");
    eventually(
        30,
        || format!("caBundle not re-patched: {}", a.log()),
        || ca_bundles(release).iter().all(|b| *b == bundle),
    );

    // The namespace's pull secret exists (minted by the controller, same token).
    eventually(
        60,
        || format!("no copy in {app}:\n{}", a.log()),
        || {
            admin
                .get(&format!("/api/v1/namespaces/{app}/secrets/mc-pull"))
                .0
                == 200
        },
    );

    // Outside the chart's RBAC: forbidden.
    let sa = cp().rest(&token);
    forbidden(
        "reading the connection Secret",
        sa.get(&format!(
            "/api/v1/namespaces/{ns}/secrets/{release}-connection"
        )),
    );
    forbidden(
        "deleting the CA Secret",
        sa.delete(&format!("/api/v1/namespaces/{ns}/secrets/{}", names[0])),
    );
    forbidden(
        "patching another webhook configuration",
        sa.patch(
            "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/someone-else",
            &json!({"metadata": {"labels": {"x": "y"}}}),
        ),
    );
    // Reading Secrets unnamed (a list) would read them all: refused too.
    forbidden(
        "listing the namespace's Secrets",
        sa.get(&format!("/api/v1/namespaces/{ns}/secrets")),
    );
    forbidden(
        "listing every Secret by label",
        sa.get("/api/v1/secrets?labelSelector=app.kubernetes.io%2Fmanaged-by%3Doutpost-webhook"),
    );
    forbidden(
        "replacing the registry Deployment",
        sa.put(
            &format!("/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"),
            &admin.get_ok(&format!(
                "/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"
            )),
        ),
    );
    drop(a);
    drop(b);

    // The pre-delete hook as Helm would create it: its ServiceAccount and RBAC, then the Job's
    // container with a token of that ServiceAccount.
    let hooks = hooks(release, ns, &values);
    let path_of = |o: &Value| -> String {
        let kind = o["kind"].as_str().expect("kind");
        match kind {
            "ServiceAccount" => format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            "ClusterRole" => "/apis/rbac.authorization.k8s.io/v1/clusterroles".into(),
            "ClusterRoleBinding" => "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".into(),
            "Role" => format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles"),
            "RoleBinding" => {
                format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings")
            }
            other => panic!("unexpected hook kind {other}"),
        }
    };
    let job = hooks
        .iter()
        .find(|h| h["kind"] == "Job")
        .expect("hook Job")
        .clone();
    for h in hooks.iter().filter(|h| h["kind"] != "Job") {
        let (status, body) = admin.post(&path_of(h), h);
        assert_eq!(status, 201, "{}: {body}", h["kind"]);
    }
    let pod = &job["spec"]["template"]["spec"];
    let hook_token =
        cp().service_account_token(ns, pod["serviceAccountName"].as_str().expect("sa"));
    let kubeconfig = dir.path().join("hook-kubeconfig");
    cp().write_kubeconfig(&kubeconfig, Some(&hook_token));
    let args: Vec<String> = pod["containers"][0]["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("arg").to_string())
        .collect();
    let out = run_timeout(
        Command::new(bin("outpost-webhook"))
            .args(&args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAMESPACE")
            .env("KUBECONFIG", &kubeconfig)
            .env("OUTPOST_NAMESPACE", ns),
        Duration::from_secs(200),
    );
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "uninstall hook failed:\n{log}");
    for n in &names {
        assert!(secret(ns, n).is_none(), "{n} left:\n{log}");
    }
    assert_eq!(
        admin
            .get(&format!("/api/v1/namespaces/{app}/secrets/mc-pull"))
            .0,
        404,
        "copy left:\n{log}"
    );
    assert!(secret(ns, "mc-pull").is_some(), "the source is the user's");
    let node = admin.get_ok("/api/v1/nodes/mc-node");
    assert!(
        node["metadata"]["labels"]["outpost.io/trusted"].is_null(),
        "{node}\n{log}"
    );
    assert_eq!(
        admin
            .get(&format!(
                "/apis/apps/v1/namespaces/{ns}/deployments/{release}-webhook"
            ))
            .0,
        404,
        "{log}"
    );
    // Run again (a retried Job): everything is already gone, still a success.
    let again = run_timeout(
        Command::new(bin("outpost-webhook"))
            .args(&args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("POD_NAMESPACE")
            .env("KUBECONFIG", &kubeconfig)
            .env("OUTPOST_NAMESPACE", ns),
        Duration::from_secs(200),
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // The hook's token may not touch what is outside its job.
    let hook = cp().rest(&hook_token);
    forbidden(
        "deleting the registry Deployment",
        hook.delete(&format!(
            "/apis/apps/v1/namespaces/{ns}/deployments/{release}-registry"
        )),
    );
    forbidden(
        "deleting the connection Secret",
        hook.delete(&format!(
            "/api/v1/namespaces/{ns}/secrets/{release}-connection"
        )),
    );
}

/// A whole CA rotation in seconds (hidden flags: CA 30 s, certificates 6 s, overlap 3 s): a
/// new CA joins the bundle first, signs only after the overlap, and the old one leaves the
/// bundle when it expires; the webhook configuration's caBundle follows and the webhook keeps
/// serving a certificate the published bundle verifies.
#[test]
fn the_ca_rotates_in_seconds_with_short_timings() {
    let (ns, release) = ("rotation", "outpost-rot");
    let dir = tempfile::tempdir().expect("temp dir");
    cp().create_namespace(ns, &[]);
    let values = json!({"connectionString": CONN, "trustDistribution": {"enabled": false},
                        "httpsEnabled": false, "service": {"port": 80}});
    helm_install(release, ns, &values, dir.path());
    let token = cp().service_account_token(ns, &format!("{release}-webhook"));
    let fast = [
        "--ca-validity=30s",
        "--cert-validity=6s",
        "--ca-overlap=3s",
        "--cert-check-interval=1s",
    ];
    let w = start_webhook(ns, release, dir.path(), &token, "w", &fast);
    let ca_name = format!("{release}-ca");
    let state = || -> Option<(String, String, Option<String>)> {
        let s = secret(ns, &ca_name)?;
        let next = s["data"].get("next.crt").map(unb64);
        Some((
            unb64(&s["data"]["tls.crt"]),
            unb64(&s["data"]["ca.crt"]),
            next,
        ))
    };
    eventually(60, || format!("no CA:\n{}", w.log()), || state().is_some());
    let (first, bundle, _) = state().expect("CA");
    eventually(
        60,
        || format!("not serving: {}", w.log()),
        || verifies(&w, ns, release, &bundle).is_ok(),
    );
    // Phase 1: the coming CA is published beside the signer.
    let mut next = String::new();
    eventually(
        90,
        || format!("no rotation started: {:?}\n{}", state(), w.log()),
        || match state() {
            Some((signer, bundle, Some(n))) if signer == first => {
                next = n;
                bundle.starts_with(next.as_str()) && bundle.contains(first.as_str())
            }
            _ => false,
        },
    );
    // The configuration trusts both before the new CA signs anything.
    eventually(
        30,
        || format!("caBundle without the coming CA: {}", w.log()),
        || {
            ca_bundles(release)
                .iter()
                .all(|b| b.contains(next.as_str()) && b.contains(first.as_str()))
        },
    );
    // Phase 2: after the overlap the new CA signs; the webhook serves a certificate of it.
    eventually(
        60,
        || format!("never promoted: {:?}\n{}", state(), w.log()),
        || state().is_some_and(|(signer, _, n)| signer == next && n.is_none()),
    );
    eventually(
        60,
        || format!("not serving a certificate of the new CA: {}", w.log()),
        || verifies(&w, ns, release, &next).is_ok(),
    );
    // Phase 3: the old CA expires and leaves the bundle and the configuration.
    eventually(
        90,
        || format!("old CA still trusted: {:?}\n{}", state(), w.log()),
        || state().is_some_and(|(_, bundle, _)| bundle == next),
    );
    eventually(
        30,
        || format!("caBundle still has the old CA: {}", w.log()),
        || ca_bundles(release).iter().all(|b| *b == next),
    );
    eventually(
        60,
        || format!("not serving after the rotation: {}", w.log()),
        || verifies(&w, ns, release, &next).is_ok(),
    );
}

/// The webhook off: the small certs Deployment keeps the registry's certificate alone, with
/// its own ServiceAccount's token, ready on plain HTTP once the Secrets exist, its expiry
/// in /metrics.
#[test]
fn the_certs_deployment_manages_the_registry_certificate_without_the_webhook() {
    let (ns, release) = ("certs-only", "outpost-co");
    let dir = tempfile::tempdir().expect("temp dir");
    cp().create_namespace(ns, &[]);
    let values = json!({"connectionString": CONN, "webhook": {"enabled": false},
                        "trustDistribution": {"enabled": false}});
    helm_install(release, ns, &values, dir.path());
    let token = cp().service_account_token(ns, &format!("{release}-certs"));
    let p = start_container(
        ns,
        &format!("{release}-certs"),
        dir.path(),
        &token,
        "c",
        &[],
    );
    let ready = || {
        outpost_e2e::http()
            .get(format!("http://127.0.0.1:{}/readyz", p.port))
            .send()
            .is_ok_and(|r| r.status().as_u16() == 200)
    };
    eventually(60, || format!("certs never ready:\n{}", p.log()), ready);
    let ca = secret(ns, &format!("{release}-ca")).expect("CA Secret");
    let reg = secret(ns, &format!("{release}-registry-tls")).expect("registry Secret");
    assert_eq!(reg["data"]["ca.crt"], ca["data"]["ca.crt"]);
    assert!(secret(ns, &format!("{release}-webhook-tls")).is_none());
    let ext = sans(&unb64(&reg["data"]["tls.crt"]), dir.path());
    assert!(
        ext.contains("DNS:outpost-co-registry.certs-only.svc"),
        "{ext}"
    );
    // Expiry gauges for alerting: the CA's and the registry certificate's notAfter, ahead.
    let page = outpost_e2e::http()
        .get(format!("http://127.0.0.1:{}/metrics", p.port))
        .send()
        .and_then(|r| r.text())
        .expect("metrics");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    for secret in [format!("{release}-ca"), format!("{release}-registry-tls")] {
        let series =
            format!("outpost_webhook_certificate_expiry_timestamp_seconds{{secret=\"{secret}\"}}");
        let at = outpost_e2e::metrics::sample(&page, &series)
            .unwrap_or_else(|| panic!("no {series} in:\n{page}"));
        assert!(at > now + 80.0 * 86400.0, "{series} = {at}");
    }
    assert_eq!(
        outpost_e2e::metrics::sample(&page, "outpost_webhook_certificate_errors_total"),
        Some(0.0),
        "{page}"
    );
    let sa = cp().rest(&token);
    forbidden(
        "reading the connection Secret",
        sa.get(&format!(
            "/api/v1/namespaces/{ns}/secrets/{release}-connection"
        )),
    );
    forbidden(
        "listing Secrets",
        sa.get(&format!("/api/v1/namespaces/{ns}/secrets")),
    );
    forbidden(
        "reading webhook configurations",
        sa.get("/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"),
    );
}
