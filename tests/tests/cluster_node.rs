//! The chart on a real node: kubelet + containerd (CRI) + CNI in a network namespace this test
//! creates (tests/src/k8s/node.rs), a real control plane (tests/src/k8s/control_plane.rs), the
//! three Outpost images built by `images/build.py` from this build's binaries and imported into
//! the node's containerd under the chart's image names, a parent docker-registry on the node IP,
//! and the chart installed through the real Helm library (charts/tests/helm_cluster.py) exactly
//! as the chart README's install guide says (its `helm install` block replayed word for word,
//! only `<connection string>` filled in: managed certificates, default rewrite rules from the
//! connection string).
//!
//! It shows: the chart's pods become Ready as rendered (non-root, read-only root, PVC bound);
//! the node agent writes hosts.toml into the node's containerd config and labels the node; an
//! unchanged Deployment in an opted-in namespace runs with its image rewritten to Outpost and
//! pulled from it with the namespace credential the webhook wrote into that namespace
//! (anonymous pulls are off by default); the same Deployment in an opted-in namespace whose
//! `outpost.io/repositories` does not cover the image keeps the parent's name and pulls it from
//! the parent after Outpost refuses it on the mirror path; a pod in another namespace gets the parent's image:
//! the node has no credential (nothing private through the mirror path), so containerd falls
//! back from Outpost to the parent; with the parent stopped and the images gone from the
//! node, the rewritten pod starts again from Outpost while the other one cannot pull (Outpost
//! does not serve it through the mirror path); after an upgrade setting
//! `trustDistribution.nodeScope` to the app's repositories, the webhook mints the nodes'
//! credential, the node agent gives it to containerd and the other pod pulls from Outpost
//! through the mirror path, the parent still away; with Outpost down, containerd falls back to
//! the plain-HTTP parent; and uninstall (its pre-delete hook) removes the node agent's files,
//! the node label, the namespace and node credentials and the managed Secrets.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_e2e::k8s::node::{NetNs, Node, NodeOptions, ServiceProxy};
use outpost_e2e::k8s::{ControlPlane, ControlPlaneOptions, Rest, StaticToken, random_hex};
use outpost_e2e::oci::{conn, load};
use outpost_e2e::parent::DockerRegistry;
use outpost_e2e::*;
use serde_json::{Value, json};

const SERVICE_CIDR: &str = "10.96.0.0/16";
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE_NAME: &str = "edge-1";
/// The README's example ClusterIP, inside SERVICE_CIDR.
const OUTPOST_IP: &str = "10.96.100.100";
const RELEASE: &str = "outpost";
const NAMESPACE: &str = "outpost";
const SANDBOX_IMAGE: &str = "outpost.test/sandbox:1";
const APP_REPO: &str = "team/app";
const APP_TAG: &str = "1.0";
const LABEL: &str = "outpost.io/trusted";

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace")
        .to_path_buf()
}

/// `image.repository` and `image.tag` of the chart's values.yaml (top-level `image:` block).
fn chart_image_values() -> (String, String) {
    let text = std::fs::read_to_string(repo_root().join("charts/outpost/values.yaml"))
        .expect("values.yaml");
    let mut in_image = false;
    let (mut repository, mut tag) = (None, None);
    for line in text.lines() {
        if !line.starts_with(' ') && !line.starts_with('#') && !line.is_empty() {
            in_image = line.trim_end() == "image:";
            continue;
        }
        if !in_image {
            continue;
        }
        let l = line.trim();
        let value = |l: &str| {
            l.split_once(':')
                .map(|(_, v)| v.trim().trim_matches('"').to_string())
        };
        if l.starts_with("repository:") {
            repository = value(l);
        } else if l.starts_with("tag:") {
            tag = value(l);
        }
    }
    (
        repository.expect("image.repository in values.yaml"),
        tag.expect("image.tag in values.yaml"),
    )
}

/// `images/build.py` from this build's binaries, started in the background (it takes a while).
fn start_image_build(out: &Path) -> Child {
    Command::new("python3")
        .arg("-B")
        .arg(repo_root().join("images/build.py"))
        .arg("--bin-dir")
        .arg(bin_dir())
        .arg("--out")
        .arg(out)
        // The debug binaries are large; real images use the default level.
        .args(["--tag", "test", "--gzip-level", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start images/build.py")
}

/// busybox-static images: `sandbox` (sleeps: the pod sandbox) and `app` (the test workload).
fn busybox_images(dir: &Path) -> Layout {
    let layout = Layout::new(dir);
    layout.add_image("sandbox", "amd64", &[]);
    let img = format!("{}:sandbox", layout.path.display());
    run_ok(Command::new(require("umoci")).args([
        "config",
        "--image",
        &img,
        "--config.entrypoint",
        "/bin/busybox",
        "--config.cmd",
        "sleep",
        "--config.cmd",
        "2147483647",
    ]));
    layout.add_image(
        "app",
        "amd64",
        &[("etc/app-marker", b"outpost node test\n".to_vec())],
    );
    layout
}

fn unb64(v: &Value) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("not base64 ({e}): {v}"))
}

/// Polls `f` every 500 ms until it holds or `timeout` passes (then panics with `what`).
fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn create(api: &Rest, path: &str, body: Value) {
    let (status, resp) = api.post(path, &body);
    assert_eq!(status, 201, "POST {path}: {resp}");
}

/// `helm_cluster.py <args>` (the real Helm library) with the admin kubeconfig; its JSON.
fn helm(cp: &ControlPlane, args: &[String]) -> Value {
    let out = run_timeout(
        Command::new("python3")
            .arg("-B")
            .arg(repo_root().join("charts/tests/helm_cluster.py"))
            .args(args)
            .arg("--kubeconfig")
            .arg(&cp.admin_kubeconfig),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "helm {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("helm output {e}: {text}"))
}

/// The label selector of one of the chart's components.
fn component(c: &str) -> String {
    format!("app.kubernetes.io%2Finstance%3D{RELEASE},app.kubernetes.io%2Fcomponent%3D{c}")
}

fn pod_ready(p: &Value) -> bool {
    p["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

fn pods(api: &Rest, ns: &str, selector: &str) -> Vec<Value> {
    let v = api.get_ok(&format!(
        "/api/v1/namespaces/{ns}/pods?labelSelector={selector}"
    ));
    v["items"].as_array().cloned().unwrap_or_default()
}

fn wait_ready(api: &Rest, ns: &str, selector: &str, count: usize, timeout: Duration) -> Vec<Value> {
    let mut last = Vec::new();
    wait_until(
        &format!("{count} Ready pod(s) {selector} in {ns}"),
        timeout,
        || {
            last = pods(api, ns, selector)
                .into_iter()
                .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
                .collect();
            last.len() == count && last.iter().all(pod_ready)
        },
    );
    last
}

/// The node's label `LABEL`, if any.
fn node_label(api: &Rest) -> Option<String> {
    api.get_ok(&format!("/api/v1/nodes/{NODE_NAME}"))["metadata"]["labels"][LABEL]
        .as_str()
        .map(str::to_string)
}

/// The OCI runtime spec containerd made for a pod's first container.
fn runtime_spec(node: &Node, pod: &Value) -> Value {
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("containerd://"))
        .unwrap_or_else(|| panic!("no container ID: {}", pod["status"]));
    let info: Value =
        serde_json::from_str(&node.ctr(&["containers", "info", id])).expect("ctr info JSON");
    info["Spec"].clone()
}

fn files_under(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
        {
            let p = e.path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
            }
        }
    }
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn chart_pods_run_on_a_real_node_and_pull_through_outpost() {
    let started = Instant::now();
    let work = tempfile::tempdir().expect("temp dir");
    let images_out = work.path().join("images");
    let mut build = start_image_build(&images_out);
    let busybox = busybox_images(work.path());

    let netns = NetNs::create_and_enter(NODE_IP, SERVICE_CIDR);
    let node_token = random_hex(24);
    let cp = ControlPlane::start(ControlPlaneOptions {
        bind_address: IpAddr::V4(NODE_IP),
        service_cidr: SERVICE_CIDR.to_string(),
        scheduler: true,
        apiserver_args: vec!["--kubelet-preferred-address-types=InternalIP".to_string()],
        tokens: vec![StaticToken {
            token: node_token.clone(),
            user: format!("system:node:{NODE_NAME}"),
            groups: vec!["system:nodes".to_string()],
        }],
        ..ControlPlaneOptions::default()
    });
    let mut node = Node::start(
        &netns,
        &cp,
        NodeOptions {
            name: NODE_NAME.to_string(),
            token: node_token,
            sandbox_layout: (busybox.path.clone(), "sandbox".to_string()),
            sandbox_image: SANDBOX_IMAGE.to_string(),
        },
    );
    let proxy = ServiceProxy::start(&cp);
    eprintln!("node Ready after {:?}", started.elapsed());

    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        scenario(&cp, &mut node, &busybox, &mut build, &images_out, started)
    }));
    if let Err(e) = result {
        eprintln!(
            "{}\n=== control plane\n{}",
            node.diagnostics(&cp),
            cp.logs()
        );
        let _ = build.kill();
        let _ = build.wait();
        drop(proxy);
        drop(node);
        drop(cp);
        drop(netns);
        std::panic::resume_unwind(e);
    }
    drop(proxy);
    drop(node);
    drop(cp);
    drop(netns);
    eprintln!("suite took {:?}", started.elapsed());
}

fn scenario(
    cp: &ControlPlane,
    node: &mut Node,
    busybox: &Layout,
    build: &mut Child,
    images_out: &Path,
    started: Instant,
) {
    let api = cp.admin();

    // The parent: Debian's docker-registry on the node IP, holding the app image.
    let mut parent = DockerRegistry::builder()
        .listen_ip(IpAddr::V4(NODE_IP))
        .start();
    let parent_host = parent.host();
    load(
        busybox,
        "app",
        &parent_host,
        &format!("{APP_REPO}:{APP_TAG}"),
        &[],
    );
    let parent_image = format!("{parent_host}/{APP_REPO}:{APP_TAG}");

    // Outpost's images under the chart's names.
    let deadline = Instant::now() + Duration::from_secs(600);
    let status = loop {
        if let Some(s) = build.try_wait().expect("wait build.py") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "images/build.py took over 10 min"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let mut err = String::new();
    if let Some(mut e) = build.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(status.success(), "images/build.py: {err}");
    let (repository, tag) = chart_image_values();
    for name in ["registry", "webhook", "node-agent"] {
        node.import_layout(
            &images_out.join(format!("outpost-{name}")),
            "test",
            &format!("{repository}/outpost-{name}:{tag}"),
        );
    }
    eprintln!("images imported after {:?}", started.elapsed());

    let work = tempfile::tempdir().expect("temp dir");
    // The PVC's volume: a hostPath in the node's /var/lib, owned by the registry's user.
    let pv_dir = node.var_lib.join("outpost-pv");
    std::fs::create_dir_all(&pv_dir).expect("pv dir");
    run_ok(Command::new("chown").arg("65532:65532").arg(&pv_dir));
    create(
        &api,
        "/api/v1/persistentvolumes",
        json!({"apiVersion": "v1", "kind": "PersistentVolume",
               "metadata": {"name": "outpost-test-pv"},
               "spec": {"capacity": {"storage": "1Ti"}, "accessModes": ["ReadWriteOnce"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "hostPath": {"path": "/var/lib/outpost-pv", "type": "Directory"}}}),
    );

    // The chart, installed as the chart README's install guide says, word for word (through
    // the real Helm library), with only its `<connection string>` filled in.
    let connection = conn("edge", "sync", "unused", &parent_host, "http");
    let commands = readme_install_commands();
    assert_eq!(
        commands.len(),
        1,
        "the README's install block is one helm install: {commands:?}"
    );
    let args = helm_install_args(
        &shell_words(&commands[0]),
        &[("<connection string>", connection)],
    );
    // (Not the arguments: they hold the connection string.)
    eprintln!("README install: {}", commands[0]);
    // What the test relies on: the release, its namespace and the ClusterIP the guide names.
    let arg_after = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    assert_eq!(arg_after("--release").as_deref(), Some(RELEASE));
    assert_eq!(arg_after("--namespace").as_deref(), Some(NAMESPACE));
    assert!(
        args.contains(&format!("service.clusterIP={OUTPOST_IP}")),
        "the guide's ClusterIP is not {OUTPOST_IP} (in {SERVICE_CIDR}): {args:?}"
    );
    let release = helm(cp, &args);
    assert_eq!(release["status"], "deployed", "{release}");

    check_chart_pods(cp, node);
    eprintln!("chart Ready after {:?}", started.elapsed());

    // The node agent: hosts.toml in the node's containerd config, and the node label.
    let certs_d = node.etc_containerd.join("certs.d");
    let mirror_hosts = certs_d.join(&parent_host).join("hosts.toml");
    wait_until(
        "the node agent's hosts.toml for the parent",
        Duration::from_secs(60),
        || mirror_hosts.exists(),
    );
    let hosts = std::fs::read_to_string(&mirror_hosts).expect("hosts.toml");
    eprintln!("{}:\n{hosts}", mirror_hosts.display());
    assert!(hosts.contains(&format!("https://{OUTPOST_IP}")), "{hosts}");
    // The fallback is the parent as the connection string names it: plain HTTP.
    assert!(
        hosts.contains(&format!("server = \"http://{parent_host}\"")),
        "{hosts}"
    );
    wait_until("the node label", Duration::from_secs(60), || {
        node_label(&api).as_deref() == Some("true")
    });

    // An unchanged Deployment in an opted-in namespace: rewritten to Outpost, pulled from it.
    cp.create_namespace("apps", &[("outpost.io/inject", "enabled")]);
    let app_deployment = json!({"apiVersion": "apps/v1", "kind": "Deployment",
               "metadata": {"name": "app"},
               "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "app"}},
                        "template": {"metadata": {"labels": {"app": "app"}},
                                     "spec": {"automountServiceAccountToken": false,
                                              "terminationGracePeriodSeconds": 1,
                                              "containers": [{"name": "app", "image": parent_image,
                                                  "command": ["/bin/busybox", "sleep", "3600"]}]}}}});
    create(
        &api,
        "/apis/apps/v1/namespaces/apps/deployments",
        app_deployment.clone(),
    );
    let outpost_image = format!("{OUTPOST_IP}/{APP_REPO}:{APP_TAG}");
    let app = wait_ready(&api, "apps", "app%3Dapp", 1, Duration::from_secs(120));
    assert_eq!(
        app[0]["spec"]["containers"][0]["image"],
        outpost_image.as_str()
    );
    assert_eq!(
        app[0]["spec"]["imagePullSecrets"],
        json!([{"name": "outpost-pull"}]),
        "{}",
        app[0]
    );
    // The pull secret the webhook wrote into the namespace: a credential of its own (username
    // the namespace), the only way to pull from Outpost with anonymous pulls off.
    let pull = api.get_ok("/api/v1/namespaces/apps/secrets/outpost-pull");
    assert_eq!(
        pull["metadata"]["annotations"]["outpost.io/credential-scope"], "**",
        "{}",
        pull["metadata"]
    );
    let config: Value =
        serde_json::from_slice(&unb64(&pull["data"][".dockerconfigjson"])).expect("json");
    let entry = &config["auths"][OUTPOST_IP];
    assert_eq!(entry["username"], "apps", "the namespace is the username");
    let basic = format!("Basic {}", entry["auth"].as_str().expect("auth"));
    assert!(
        node.images().contains(&outpost_image),
        "{:?}",
        node.images()
    );
    // Outpost holds it now (fetched from the parent while containerd pulled): asked through
    // the Service's ClusterIP with the registry's CA, as the node does.
    // The CA bundle Outpost made (the managed certificates: no cert-manager, no given Secret).
    let registry_tls = api.get_ok(&format!(
        "/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-registry-tls"
    ));
    let ca_file = work.path().join("ca.crt");
    std::fs::write(&ca_file, unb64(&registry_tls["data"]["ca.crt"])).expect("ca.crt");
    let client = outpost_e2e::oci::client_with_ca(Some(&ca_file));
    let url = format!("https://{OUTPOST_IP}/v2/{APP_REPO}/tags/list");
    let anonymous = client
        .get(&url)
        .send()
        .expect("Outpost through the ClusterIP");
    assert_eq!(anonymous.status().as_u16(), 401, "anonymous pulls are off");
    let tags: Value = client
        .get(&url)
        .header("authorization", &basic)
        .send()
        .and_then(|r| r.json())
        .expect("Outpost's tag list through the ClusterIP");
    assert_eq!(tags["tags"], json!([APP_TAG]), "{tags}");

    // The same Deployment in an opted-in namespace whose scope does not cover the image: the
    // webhook leaves its upstream name (the namespace's credential could not pull it from
    // Outpost), and containerd takes it from the parent after Outpost, tried first as the
    // node's mirror, refuses it.
    create(
        &api,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "team-b", "labels": {"outpost.io/inject": "enabled"},
                            "annotations": {"outpost.io/repositories": "team-b/**"}}}),
    );
    let mut team_b_app = app_deployment.clone();
    team_b_app["metadata"]["namespace"] = json!("team-b");
    create(
        &api,
        "/apis/apps/v1/namespaces/team-b/deployments",
        team_b_app,
    );
    let b = wait_ready(&api, "team-b", "app%3Dapp", 1, Duration::from_secs(120));
    assert_eq!(
        b[0]["spec"]["containers"][0]["image"],
        parent_image.as_str()
    );
    assert!(b[0]["spec"].get("imagePullSecrets").is_none(), "{}", b[0]);
    let kept = b[0]["metadata"]["annotations"]["outpost.io/unavailable-images"]
        .as_str()
        .unwrap_or("");
    assert!(
        kept.contains("outside the repositories"),
        "{}",
        b[0]["metadata"]
    );
    let b_secret = api.get_ok("/api/v1/namespaces/team-b/secrets/outpost-pull");
    assert_eq!(
        b_secret["metadata"]["annotations"]["outpost.io/credential-scope"],
        "team-b/**"
    );

    // A pod in a namespace that is not opted in: its image as written. The node has no
    // credential for the mirror path (trustDistribution.nodeCredentials off), so Outpost serves
    // it nothing private there and containerd takes the image from the parent.
    cp.create_namespace("plain", &[]);
    let plain_pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "plain", "labels": {"app": "plain"}},
        "spec": {"automountServiceAccountToken": false, "terminationGracePeriodSeconds": 1,
                 "containers": [{"name": "app", "image": parent_image,
                                 "command": ["/bin/busybox", "sleep", "3600"]}]}});
    create(&api, "/api/v1/namespaces/plain/pods", plain_pod.clone());
    let plain = wait_ready(&api, "plain", "app%3Dplain", 1, Duration::from_secs(120));
    assert_eq!(
        plain[0]["spec"]["containers"][0]["image"],
        parent_image.as_str()
    );

    // The parent goes away, and the app's images from the node: new pods must pull again,
    // and only Outpost can serve them.
    parent.stop();
    remove_app_images(node);
    api.delete("/api/v1/namespaces/plain/pods/plain");
    for p in pods(&api, "apps", "app%3Dapp") {
        let name = p["metadata"]["name"].as_str().unwrap_or("");
        api.delete(&format!("/api/v1/namespaces/apps/pods/{name}"));
    }
    wait_until("the plain pod gone", Duration::from_secs(60), || {
        api.get("/api/v1/namespaces/plain/pods/plain").0 == 404
    });
    create(&api, "/api/v1/namespaces/plain/pods", plain_pod.clone());
    wait_ready(&api, "apps", "app%3Dapp", 1, Duration::from_secs(120));
    // The plain pod has only the mirror path, where Outpost serves nothing private: it cannot
    // pull while the parent is away.
    wait_until(
        "the plain pod failing to pull with the parent away",
        Duration::from_secs(120),
        || {
            let p = api.get_ok("/api/v1/namespaces/plain/pods/plain");
            let reason = p["status"]["containerStatuses"][0]["state"]["waiting"]["reason"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            reason == "ErrImagePull" || reason == "ImagePullBackOff"
        },
    );
    let images = node.images();
    assert!(
        images.contains(&outpost_image) && !images.contains(&parent_image),
        "{images:?}"
    );
    eprintln!("offline restarts done after {:?}", started.elapsed());

    // The nodes' allow list (trustDistribution.nodeScope): the webhook mints the nodes'
    // credential, the node agent gives it to containerd, and the plain pod's image, inside the
    // allow list, now comes from Outpost through the mirror path, with the parent still away.
    let node_values = work.path().join("node-scope.json");
    std::fs::write(
        &node_values,
        json!({"trustDistribution": {"nodeScope": ["team/**"]}}).to_string(),
    )
    .expect("values");
    let mut upgrade = args.clone();
    upgrade[0] = "upgrade".to_string();
    upgrade.extend(["--values".to_string(), node_values.display().to_string()]);
    let release = helm(cp, &upgrade);
    assert_eq!(release["status"], "deployed", "{release}");
    let node_pull = format!("/api/v1/namespaces/{NAMESPACE}/secrets/{RELEASE}-node-pull");
    wait_until("the nodes' credential", Duration::from_secs(120), || {
        api.get(&node_pull).0 == 200
    });
    let minted = api.get_ok(&node_pull);
    assert_eq!(
        minted["metadata"]["annotations"]["outpost.io/credential-scope"], "team/**",
        "{}",
        minted["metadata"]
    );
    wait_until(
        "hosts.toml with the nodes' credential",
        Duration::from_secs(120),
        || {
            std::fs::read_to_string(&mirror_hosts)
                .is_ok_and(|t| t.contains("Authorization = \"Basic "))
        },
    );
    api.delete("/api/v1/namespaces/plain/pods/plain");
    wait_until("the plain pod gone", Duration::from_secs(60), || {
        api.get("/api/v1/namespaces/plain/pods/plain").0 == 404
    });
    create(&api, "/api/v1/namespaces/plain/pods", plain_pod.clone());
    wait_ready(&api, "plain", "app%3Dplain", 1, Duration::from_secs(120));
    assert!(node.images().contains(&parent_image), "{:?}", node.images());
    eprintln!(
        "mirror path with the nodes' credential done after {:?}",
        started.elapsed()
    );

    // Outpost down, the parent back: containerd falls back from the mirror to the parent
    // itself, over plain HTTP as the connection string says (ParentEndpointProtocol=http).
    parent.start_again();
    let (code, body) = api.patch(
        &format!("/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{RELEASE}-registry"),
        &json!({"spec": {"replicas": 0}}),
    );
    assert_eq!(code, 200, "scale the registry to 0: {body}");
    wait_until("the registry pod gone", Duration::from_secs(90), || {
        pods(&api, NAMESPACE, &component("registry")).is_empty()
    });
    remove_app_images(node);
    api.delete("/api/v1/namespaces/plain/pods/plain");
    wait_until("the plain pod gone", Duration::from_secs(60), || {
        api.get("/api/v1/namespaces/plain/pods/plain").0 == 404
    });
    create(&api, "/api/v1/namespaces/plain/pods", plain_pod);
    wait_ready(&api, "plain", "app%3Dplain", 1, Duration::from_secs(120));
    eprintln!("fallback to the parent done after {:?}", started.elapsed());

    // Uninstall: the node agent removes its files and the label.
    helm(
        cp,
        &[
            "uninstall".into(),
            "--release".into(),
            RELEASE.into(),
            "--namespace".into(),
            NAMESPACE.into(),
        ],
    );
    wait_until("the node agent pods gone", Duration::from_secs(90), || {
        pods(
            &api,
            NAMESPACE,
            "app.kubernetes.io%2Fcomponent%3Dnode-agent",
        )
        .is_empty()
    });
    let left = files_under(&certs_d);
    let label = node_label(&api);
    eprintln!("after uninstall: files {left:?}, label {label:?}");
    assert!(left.is_empty(), "the node agent left {left:?}");
    assert_eq!(label, None, "the node label is left after uninstall");
    // The namespace credential in the opted-in namespace and the managed certificates are gone.
    let copies = api
        .get_ok("/api/v1/secrets?labelSelector=app.kubernetes.io%2Fmanaged-by%3Doutpost-webhook");
    assert_eq!(copies["items"], json!([]), "left after uninstall: {copies}");
}

/// Removes every reference to the app's manifest from the node (names and the CRI's sha256
/// ID), so its blobs go and the next pod must pull again.
fn remove_app_images(node: &Node) {
    // Every reference to the app's manifest (names and the CRI's sha256 ID), so the blobs go.
    let refs = node.image_refs();
    let app_digests: Vec<&String> = refs
        .iter()
        .filter(|(r, _)| r.contains(APP_REPO))
        .map(|(_, d)| d)
        .collect();
    for (r, d) in &refs {
        if app_digests.contains(&d) {
            node.remove_image(r);
        }
    }
    assert!(
        !node.images().iter().any(|i| i.contains(APP_REPO)),
        "{:?}",
        node.images()
    );
}

/// The chart's pods Ready as rendered: PVC bound, non-root with a read-only root where the
/// chart says so, probes passing (Ready).
fn check_chart_pods(cp: &ControlPlane, node: &mut Node) {
    let api = cp.admin();
    let sel = |c: &str| {
        format!("app.kubernetes.io%2Finstance%3D{RELEASE},app.kubernetes.io%2Fcomponent%3D{c}")
    };
    let registry = wait_ready(
        &api,
        NAMESPACE,
        &sel("registry"),
        1,
        Duration::from_secs(180),
    );
    let webhook = wait_ready(
        &api,
        NAMESPACE,
        &sel("webhook"),
        2,
        Duration::from_secs(180),
    );
    let agent = wait_ready(
        &api,
        NAMESPACE,
        &sel("node-agent"),
        1,
        Duration::from_secs(180),
    );
    node.assert_running();
    let pvc = api.get_ok(&format!(
        "/api/v1/namespaces/{NAMESPACE}/persistentvolumeclaims/{RELEASE}-data"
    ));
    assert_eq!(pvc["status"]["phase"], "Bound", "{pvc}");
    assert_eq!(pvc["spec"]["volumeName"], "outpost-test-pv");
    for (pod, uid) in [(&registry[0], 65532), (&webhook[0], 65532), (&agent[0], 0)] {
        let spec = runtime_spec(node, pod);
        let name = pod["metadata"]["name"].as_str().unwrap_or("");
        assert_eq!(spec["root"]["readonly"], true, "{name}: {}", spec["root"]);
        assert_eq!(spec["process"]["user"]["uid"], uid, "{name}");
        assert_eq!(spec["process"]["noNewPrivileges"], true, "{name}");
        let caps = &spec["process"]["capabilities"]["effective"];
        assert!(
            caps.is_null() || caps.as_array().is_some_and(|c| c.is_empty()),
            "{name}: capabilities {caps}"
        );
    }
}

/// The commands of the chart README's install guide: the first ```sh block under
/// "## Install", comments and blank lines dropped, continuation lines joined.
fn readme_install_commands() -> Vec<String> {
    let text = std::fs::read_to_string(repo_root().join("charts/outpost/README.md"))
        .expect("charts/outpost/README.md");
    let section = text
        .split("\n## Install")
        .nth(1)
        .expect("an Install section in the chart README");
    let block = section
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("\n```").next())
        .expect("a ```sh block in the Install section");
    let mut commands = Vec::new();
    let mut current = String::new();
    for line in block.lines() {
        let l = line.trim();
        if current.is_empty() && (l.is_empty() || l.starts_with('#')) {
            continue;
        }
        match l.strip_suffix('\\') {
            Some(part) => {
                current.push_str(part);
                current.push(' ');
            }
            None => {
                current.push_str(l);
                commands.push(std::mem::take(&mut current));
            }
        }
    }
    commands
}

/// Words of a command line as a POSIX shell splits them (single and double quotes, backslash
/// escapes outside single quotes); no expansions.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = word.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                for c in chars.by_ref() {
                    if c == '\'' {
                        break;
                    }
                    w.push(c);
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                while let Some(c) = chars.next() {
                    match c {
                        '"' => break,
                        '\\' => w.extend(chars.next()),
                        c => w.push(c),
                    }
                }
            }
            '\\' => word.get_or_insert_with(String::new).extend(chars.next()),
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(word);
    words
}

/// `helm install` words as helm_cluster.py arguments (`-n`/`--namespace`,
/// `--create-namespace`, `--set`; anything else is refused), each `<placeholder>` replaced by
/// its value from `placeholders` (an unknown one is refused).
fn helm_install_args(words: &[String], placeholders: &[(&str, String)]) -> Vec<String> {
    assert!(
        words.len() >= 4 && words[0] == "helm" && words[1] == "install",
        "not a helm install command: {words:?}"
    );
    let substitute = |v: &str| -> String {
        let mut out = v.to_string();
        for (name, value) in placeholders {
            out = out.replace(name, value);
        }
        assert!(
            !(out.contains('<') && out.contains('>')),
            "an undocumented placeholder in {v:?}"
        );
        out
    };
    let mut args = vec![
        "install".to_string(),
        "--release".to_string(),
        words[2].clone(),
        "--chart".to_string(),
        repo_root().join(&words[3]).display().to_string(),
    ];
    let mut rest = words[4..].iter();
    while let Some(w) = rest.next() {
        let mut value = |flag: &str| {
            rest.next()
                .unwrap_or_else(|| panic!("{flag} without a value"))
                .clone()
        };
        match w.as_str() {
            "-n" | "--namespace" => {
                let ns = value(w);
                args.extend(["--namespace".to_string(), ns]);
            }
            "--create-namespace" => args.push(w.clone()),
            "--set" => {
                let kv = value(w);
                args.extend(["--set".to_string(), substitute(&kv)]);
            }
            other => match other.strip_prefix("--set=") {
                Some(kv) => args.extend(["--set".to_string(), substitute(kv)]),
                None => {
                    panic!("the README's helm install uses {other}, which this test cannot replay")
                }
            },
        }
    }
    args
}

#[test]
fn readme_install_words_map_to_helm_arguments() {
    let words = shell_words(
        r#"helm install outpost charts/outpost -n outpost --create-namespace --set connectionString='<connection string>' --set "a.b=x y" --set=c=1"#,
    );
    assert_eq!(words[8], "connectionString=<connection string>");
    let args = helm_install_args(&words, &[("<connection string>", "A=1;B=2".to_string())]);
    assert_eq!(&args[..3], ["install", "--release", "outpost"]);
    assert!(args[4].ends_with("/charts/outpost"));
    assert_eq!(
        &args[5..],
        [
            "--namespace",
            "outpost",
            "--create-namespace",
            "--set",
            "connectionString=A=1;B=2",
            "--set",
            "a.b=x y",
            "--set",
            "c=1"
        ]
    );
}
