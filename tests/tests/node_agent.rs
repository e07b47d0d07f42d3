//! The node agent against a real containerd daemon (CRI on, `config_path` in the agent's root)
//! and a real Outpost over HTTPS with its own CA: pulls of an image named by an upstream that
//! does not exist go through Outpost, for `ctr --hosts-dir` and for a CRI PullImage (what
//! kubelet does); with Outpost down, a reachable upstream serves; SIGTERM with
//! `--cleanup-on-exit` leaves the directory as it was. The node's label and events against a
//! real API server (shared/k8s control plane); a hung one is a loopback stand-in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use outpost_e2e::cri::CriContainerd;
use outpost_e2e::metrics::sample;
use outpost_e2e::oci::*;
use outpost_e2e::parent::DockerRegistry;
use outpost_e2e::*;

fn tree(root: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Option<Vec<u8>>>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(rel, None);
                walk(root, &p, out);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

struct Agent {
    child: Option<Child>,
    log: PathBuf,
    port: u16,
}

impl Agent {
    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn metrics(&self) -> String {
        http()
            .get(format!("http://127.0.0.1:{}/metrics", self.port))
            .send()
            .map(|r| r.text().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Agent {
    /// `outpost-node-agent run --config --ca-file --root --listen <free port> <extra>`.
    fn spawn(
        work: &Path,
        config: &Path,
        ca: &Path,
        root: &Path,
        extra: &[&str],
        env: &[(&str, &Path)],
    ) -> Agent {
        let port = free_port();
        let log = work.join("agent.log");
        let f = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(bin("outpost-node-agent"));
        cmd.arg("run")
            .arg("--config")
            .arg(config)
            .arg("--ca-file")
            .arg(ca)
            .arg("--root")
            .arg(root)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Agent {
            child: Some(child),
            log,
            port,
        }
    }

    /// SIGTERM, then the exit status (within 30 s).
    fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "agent did not exit");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn containerd_pulls_through_outpost_falls_back_when_it_is_down_and_cleanup_restores_the_node() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::create(work.path());
    let mut outpost = Registry::start_with_args(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    let registry = format!("127.0.0.1:{}", outpost.port);

    // One image only Outpost has, one only the reachable upstream has.
    let layout = Layout::new(work.path());
    layout.add_image(
        "app",
        "amd64",
        &[("app.bin", pseudo_random(run_seed() + 600, 64 * 1024))],
    );
    layout.add_image(
        "fb",
        "amd64",
        &[("fb.bin", pseudo_random(run_seed() + 601, 64 * 1024))],
    );
    let certs = work.path().join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).unwrap();
    skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        &format!("oci:{}:app", layout.path.display()),
        &format!("docker://{registry}/demo/app:v1"),
    ]);
    let upstream = DockerRegistry::builder().start();
    load(&layout, "fb", &upstream.host(), "demo/fb:v1", &[]);

    // The node: containerd's config in the agent's root, nothing else yet.
    let root = tempfile::tempdir().unwrap();
    let ctrd = CriContainerd::start(root.path());
    let before = tree(root.path());

    let config = work.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "registry = \"{registry}\"\n\
             [[rule]]\nupstream = \"nowhere.invalid\"\n\
             [[rule]]\nupstream = \"{up}\"\nplain_http = true\n",
            up = upstream.host()
        ),
    )
    .unwrap();
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &[
            "--runtime",
            "containerd",
            "--cleanup-on-exit",
            "--no-label",
            "--interval",
            "200ms",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if sample(&m, "outpost_node_agent_configured_hosts") == Some(3.0)
            && sample(&m, "outpost_node_agent_registry_trusted") == Some(1.0)
        {
            assert!(
                sample(
                    &m,
                    "outpost_node_agent_config_warnings{check=\"config_path_unset\"}"
                ) == Some(0.0),
                "{m}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent not ready: {m}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    assert!(hosts_dir.join(&registry).join("ca.crt").is_file());

    // ctr with the hosts directory: the upstream does not exist, Outpost serves it.
    let out = ctrd.ctr_pull(&hosts_dir, "nowhere.invalid/demo/app:v1");
    assert!(
        out.status.success(),
        "ctr pull: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log_text()
    );
    // The CRI, as kubelet pulls: containerd reads the same directory through config_path.
    let image_ref = cri::pull_image(
        &ctrd.socket,
        "nowhere.invalid/demo/app:v1",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("CRI pull: {e}\ncontainerd:\n{}", ctrd.log_text()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");

    // Outpost down: the reachable upstream serves (containerd falls back to `server`).
    outpost.kill9();
    let fb = format!("{}/demo/fb:v1", upstream.host());
    let out = ctrd.ctr_pull(&hosts_dir, &fb);
    assert!(
        out.status.success(),
        "fallback ctr pull: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    cri::pull_image(&ctrd.socket, &fb, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("fallback CRI pull: {e}\ncontainerd:\n{}", ctrd.log_text()));
    // And nothing Outpost-only resolves now.
    assert!(
        cri::pull_image(
            &ctrd.socket,
            "nowhere.invalid/demo/other:v1",
            Duration::from_secs(60)
        )
        .is_err()
    );

    // SIGTERM with --cleanup-on-exit: the node's directory is as it was.
    let status = agent.terminate();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert_eq!(tree(root.path()), before, "{}", agent.log_text());
}

#[test]
fn a_node_without_config_path_is_reported_and_not_trusted() {
    let (work, root, pki, config, ctd) = node("version = 2\n");
    let agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &["--no-label", "--interval", "100ms"],
        &[],
    );
    let port = agent.port;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if sample(
            &m,
            "outpost_node_agent_config_warnings{check=\"config_path_unset\"}",
        ) == Some(1.0)
        {
            assert_eq!(
                sample(&m, "outpost_node_agent_registry_trusted"),
                Some(0.0),
                "{m}"
            );
            assert_eq!(
                sample(&m, "outpost_node_agent_configured_hosts"),
                Some(2.0),
                "{m}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{m}\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.log_text().contains("config_path is not set"));
    // Fixed on the node: the agent notices the file change and trusts.
    std::fs::write(
        &ctd,
        format!(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{}\"\n",
            root.path().join("etc/containerd/certs.d").display()
        ),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(&agent.metrics(), "outpost_node_agent_registry_trusted") != Some(1.0) {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // A bad config edit keeps the files and counts an error.
    std::fs::write(&config, "registry = \"Bad Host\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if sample(&m, "outpost_node_agent_reconcile_errors_total").is_some_and(|v| v > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{m}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        root.path()
            .join("etc/containerd/certs.d/ghcr.io/hosts.toml")
            .is_file()
    );
    let ready = http()
        .get(format!("http://127.0.0.1:{port}/readyz"))
        .send()
        .unwrap()
        .status();
    assert_eq!(ready, 503);
}

/// A Node registered in this test binary's real control plane (shared/k8s), and an admin
/// kubeconfig for the agent in `dir`.
fn real_node(dir: &Path, name: &str) -> PathBuf {
    let cp = k8s::ControlPlane::shared();
    let (status, body) = cp.admin().post(
        "/api/v1/nodes",
        &serde_json::json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}),
    );
    assert_eq!(status, 201, "register node {name}: {body}");
    let kubeconfig = dir.join("admin.kubeconfig");
    cp.write_kubeconfig(&kubeconfig, None);
    kubeconfig
}

/// The node's `outpost.io/trusted` label (None when absent).
fn trusted_label(name: &str) -> Option<String> {
    let node = k8s::ControlPlane::shared()
        .admin()
        .get_ok(&format!("/api/v1/nodes/{name}"));
    node["metadata"]["labels"]["outpost.io/trusted"]
        .as_str()
        .map(str::to_string)
}

/// The events (events.k8s.io) about node `name` whose reason starts with `reason`.
fn node_events(name: &str, reason: &str) -> Vec<serde_json::Value> {
    let list = k8s::ControlPlane::shared()
        .admin()
        .get_ok("/apis/events.k8s.io/v1/events");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == name)
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.starts_with(reason)))
        .cloned()
        .collect()
}

/// Against a real API server: the label while the node trusts the registry, an event for the
/// operators, and no label after SIGTERM with `--cleanup-on-exit`.
#[test]
fn the_node_is_labelled_while_it_trusts_the_registry_and_unlabelled_on_cleanup() {
    let (work, root, pki, config, _) = node(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    );
    let name = "agent-label";
    let kubeconfig = real_node(work.path(), name);
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &[
            "--cleanup-on-exit",
            "--node-name",
            name,
            "--interval",
            "100ms",
        ],
        &[("KUBECONFIG", &kubeconfig)],
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while trusted_label(name).as_deref() != Some("true") {
        assert!(
            Instant::now() < deadline,
            "node never labelled\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // An event told the operators (sent right after the label).
    let deadline = Instant::now() + Duration::from_secs(60);
    while node_events(name, "RegistryTrust").is_empty() {
        assert!(Instant::now() < deadline, "no event\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = agent.terminate();
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert_eq!(trusted_label(name), None, "{}", agent.log_text());
    assert!(!root.path().join("etc/containerd/certs.d").exists());
}

/// A Kubernetes API that accepts connections and never answers.
struct HungApi {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HungApi {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Bounded: at most 2 minutes, and ends with the test.
            let end = Instant::now() + Duration::from_secs(120);
            while !st.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < end {
                if let Ok((sock, _)) = listener.accept() {
                    held.push(sock);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        HungApi { port, stop }
    }
}

impl Drop for HungApi {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

#[test]
fn a_hung_kubernetes_api_holds_up_neither_the_files_nor_sigterm() {
    let (work, root, pki, config, _) = node(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    );
    let before = tree(root.path());
    let api = HungApi::start();
    let kubeconfig = kubeconfig(work.path(), api.port);
    let port = free_port();
    let log = work.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("outpost-node-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--ca-file")
        .arg(&pki.ca_cert)
        .arg("--root")
        .arg(root.path())
        .args(["--cleanup-on-exit", "--node-name", "node-1"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut agent = Agent {
        child: Some(child),
        log,
        port,
    };
    // The files are in place while the label call hangs.
    let deadline = Instant::now() + Duration::from_secs(30);
    while sample(&agent.metrics(), "outpost_node_agent_configured_hosts") != Some(2.0) {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    // SIGTERM mid-call: the pass is dropped, the files are cleaned up, and the label removal
    // gives up after its bound, well within a pod's 30 s grace period.
    let pid = agent.child.as_ref().unwrap().id();
    let t = Instant::now();
    run_ok(Command::new("kill").args(["-TERM", &pid.to_string()]));
    let mut child = agent.child.take().unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent did not exit within 30 s of SIGTERM\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", agent.log_text());
    assert_eq!(tree(root.path()), before, "{}", agent.log_text());
    assert!(
        agent.log_text().contains("did not answer within"),
        "{}",
        agent.log_text()
    );
}

/// Outpost with client tokens. containerd's CRI sends a pod's imagePullSecrets for the image's
/// own registry (the upstream), never for the mirror, so without node credentials the pull
/// through Outpost is refused; with `--pull-credentials-file` the agent writes a static
/// `Authorization` header for the mirror and the CRI pull succeeds.
#[test]
fn node_credentials_let_the_cri_pull_from_an_outpost_that_requires_tokens() {
    let work = tempfile::tempdir().unwrap();
    let pki = TestPki::create(work.path());
    let tokens = work.path().join("tokens.toml");
    let registry_cli = |args: &[&str]| -> String {
        let out = run_timeout(
            Command::new(bin("outpost-registry"))
                .args(args)
                .arg("--tokens")
                .arg(&tokens),
            Duration::from_secs(60),
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    registry_cli(&[
        "scope-map",
        "create",
        "--name",
        "pull",
        "--repository",
        "**",
        "content/read",
        "metadata/read",
    ]);
    registry_cli(&[
        "scope-map",
        "create",
        "--name",
        "push",
        "--repository",
        "**",
        "content/read",
        "content/write",
        "metadata/read",
    ]);
    let password = |name: &str, map: &str| -> String {
        let out = registry_cli(&[
            "token",
            "create",
            "--name",
            name,
            "--scope-map",
            map,
            "-o",
            "json",
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["password1"].as_str().unwrap().to_owned()
    };
    let pusher = password("pusher", "push");
    let puller = password("puller", "pull");
    let outpost = Registry::start_with_args(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
    ]);
    let registry = outpost.host();
    let layout = Layout::new(work.path());
    layout.add_image(
        "app",
        "amd64",
        &[("app.bin", pseudo_random(run_seed() + 610, 32 * 1024))],
    );
    let certs = work.path().join("skopeo-certs");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).unwrap();
    skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        "--dest-creds",
        &format!("pusher:{pusher}"),
        &format!("oci:{}:app", layout.path.display()),
        &format!("docker://{registry}/demo/app:v1"),
    ]);

    let root = tempfile::tempdir().unwrap();
    let ctrd = CriContainerd::start(root.path());
    let before = tree(root.path());
    let config = work.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!("registry = \"{registry}\"\n[[rule]]\nupstream = \"nowhere.invalid\"\n"),
    )
    .unwrap();
    let image = "nowhere.invalid/demo/app:v1";
    let wait_trusted = |agent: &Agent| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = agent.metrics();
            if sample(&m, "outpost_node_agent_configured_hosts") == Some(2.0)
                && sample(&m, "outpost_node_agent_registry_trusted") == Some(1.0)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready: {m}\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    // Without node credentials: Outpost refuses the anonymous pull.
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &["--no-label", "--cleanup-on-exit", "--interval", "200ms"],
        &[],
    );
    wait_trusted(&agent);
    let err = cri::pull_image(&ctrd.socket, image, Duration::from_secs(60))
        .expect_err("an anonymous pull through an Outpost with tokens succeeded");
    assert!(
        err.contains("401") || err.to_lowercase().contains("unauthorized"),
        "{err}"
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(tree(root.path()), before);

    // With them: the header is in the mirror's hosts.toml and the pull succeeds.
    let creds = work.path().join("dockerconfig.json");
    std::fs::write(
        &creds,
        serde_json::json!({"auths": {registry.clone(): {"username": "puller", "password": puller}}})
            .to_string(),
    )
    .unwrap();
    let creds_arg = creds.to_str().unwrap();
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &[
            "--no-label",
            "--cleanup-on-exit",
            "--interval",
            "200ms",
            "--pull-credentials-file",
            creds_arg,
        ],
        &[],
    );
    wait_trusted(&agent);
    let hosts = std::fs::read_to_string(
        root.path()
            .join("etc/containerd/certs.d/nowhere.invalid/hosts.toml"),
    )
    .unwrap();
    assert!(hosts.contains("Authorization = \"Basic "), "{hosts}");
    let image_ref = cri::pull_image(&ctrd.socket, image, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("CRI pull with node credentials: {e}\n{}", ctrd.log_text()));
    assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(tree(root.path()), before);
}

/// A node for the agent: a root holding containerd's config (`containerd_config`), a test PKI
/// and a mirror config (`outpost.local`, one rule for ghcr.io) in a work directory. Returns
/// (work, root, pki, mirror config path, containerd config path).
fn node(
    containerd_config: &str,
) -> (
    tempfile::TempDir,
    tempfile::TempDir,
    TestPki,
    PathBuf,
    PathBuf,
) {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let ctd = root.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(ctd.parent().unwrap()).unwrap();
    std::fs::write(&ctd, containerd_config).unwrap();
    let pki = TestPki::create(work.path());
    let config = work.path().join("outpost.toml");
    std::fs::write(
        &config,
        "registry = \"outpost.local\"\n[[rule]]\nupstream = \"ghcr.io\"\n",
    )
    .unwrap();
    (work, root, pki, config, ctd)
}

/// A kubeconfig for the agent that points at a loopback stand-in of the API server (only the
/// hung one: a real API server cannot be made to hang).
fn kubeconfig(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
             users:\n- name: agent\n  user:\n    token: not-a-secret\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n"
        ),
    )
    .unwrap();
    path
}

#[test]
fn containerd_config_drift_is_a_warning_event_on_the_node_and_keeps_the_label_off() {
    // No config_path, and a legacy mirror that would make containerd refuse one.
    let (work, root, pki, config, ctd) = node(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://mirror.example\"]\n",
    );
    let name = "agent-drift";
    let kc = real_node(work.path(), name);
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        // Full passes (the checks included) every 200 ms, changed or not.
        &[
            "--node-name",
            name,
            "--interval",
            "100ms",
            "--recheck-interval",
            "200ms",
        ],
        &[("KUBECONFIG", &kc)],
    );
    let notes = || -> Vec<String> {
        node_events(name, "Containerd")
            .iter()
            .map(|e| e["note"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ev = notes();
        if ev.iter().any(|n| n.contains("config_path is not set"))
            && ev.iter().any(|n| n.contains("legacy registry.mirrors"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drift events: {ev:?}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = node_events(name, "Containerd");
    assert!(events.iter().all(|e| e["type"] == "Warning"), "{events:?}");
    let m = agent.metrics();
    assert!(
        sample(
            &m,
            "outpost_node_agent_config_warnings{check=\"legacy_mirrors\"}"
        ) == Some(1.0),
        "{m}"
    );
    assert_eq!(
        sample(&m, "outpost_node_agent_registry_trusted"),
        Some(0.0),
        "{m}"
    );
    assert_eq!(
        trusted_label(name),
        None,
        "labelled although containerd ignores the hosts directory"
    );
    // Reported once per change, not once per pass: five full passes later, still two events,
    // each sent once (a repeat would have made a series).
    let passes = |m: &str| sample(m, "outpost_node_agent_reconciles_total").unwrap_or(0.0);
    let start = passes(&agent.metrics());
    let deadline = Instant::now() + Duration::from_secs(60);
    while passes(&agent.metrics()) < start + 5.0 {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let events = node_events(name, "Containerd");
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(events.iter().all(|e| e["series"].is_null()), "{events:?}");

    // The node's admin fixes the config: the agent notices and labels the node.
    std::fs::write(
        &ctd,
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while trusted_label(name).as_deref() != Some("true") {
        assert!(Instant::now() < deadline, "{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(agent.terminate().success(), "{}", agent.log_text());
}

#[test]
fn k3s_run_merges_registries_yaml_says_to_restart_k3s_and_restores_it_on_sigterm() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let yaml = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(yaml.parent().unwrap()).unwrap();
    let foreign = "# the admin's\nmirrors:\n  quay.io:\n    endpoint:\n      - \"https://quay-mirror.local\"\n";
    std::fs::write(&yaml, foreign).unwrap();
    let before = tree(root.path());
    let pki = TestPki::create(work.path());
    let config = work.path().join("outpost.toml");
    std::fs::write(
        &config,
        "registry = \"outpost.local:5000\"\n[[rule]]\nupstream = \"docker.io\"\n[[rule]]\nupstream = \"ghcr.io\"\n",
    )
    .unwrap();
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &[
            "--runtime",
            "k3s",
            "--no-label",
            "--cleanup-on-exit",
            "--interval",
            "100ms",
        ],
        &[],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if sample(&m, "outpost_node_agent_configured_hosts") == Some(2.0)
            && sample(&m, "outpost_node_agent_registry_trusted") == Some(1.0)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{m}\n{}", agent.log_text());
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(
        text.starts_with("# managed by outpost-node-agent\n"),
        "{text}"
    );
    assert!(text.contains("quay-mirror.local"), "{text}");
    assert!(text.contains("https://registry-1.docker.io"), "{text}");
    assert!(
        text.contains("ca_file: /etc/rancher/k3s/outpost/outpost.local:5000/ca.crt"),
        "{text}"
    );
    assert!(
        root.path()
            .join("etc/rancher/k3s/outpost/outpost.local:5000/ca.crt")
            .is_file()
    );
    assert!(
        agent.log_text().contains("restart k3s"),
        "{}",
        agent.log_text()
    );
    // Written once: later passes find it current.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        agent.log_text().matches("registries.yaml changed").count(),
        1,
        "{}",
        agent.log_text()
    );
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(tree(root.path()), before, "{}", agent.log_text());
}

/// The DaemonSet's preStop: `cleanup` takes the node from `OUTPOST_NODE_NAME` (as `run` does),
/// removes the files and the node's trusted label; with a hung API server it still removes the
/// files and gives up on the label within its bound, saying so in its exit status.
#[test]
fn the_prestop_cleanup_removes_the_files_and_the_node_label() {
    let (work, root, pki, config, _) = node(
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    );
    let before = tree(root.path());
    let reconcile = || {
        run_ok(
            Command::new(bin("outpost-node-agent"))
                .arg("reconcile")
                .arg("--config")
                .arg(&config)
                .arg("--ca-file")
                .arg(&pki.ca_cert)
                .arg("--root")
                .arg(root.path()),
        );
        assert!(
            root.path()
                .join("etc/containerd/certs.d/ghcr.io/hosts.toml")
                .is_file()
        );
    };
    let cleanup = |kubeconfig: &Path, node_name: &str| {
        run_timeout(
            Command::new(bin("outpost-node-agent"))
                .arg("cleanup")
                .arg("--root")
                .arg(root.path())
                .env("OUTPOST_NODE_NAME", node_name)
                .env("KUBECONFIG", kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST"),
            Duration::from_secs(60),
        )
    };

    // Against the real API server: the node carries the label `run` put there.
    let name = "agent-prestop";
    let admin = real_node(work.path(), name);
    let (status, body) = k8s::ControlPlane::shared().admin().patch(
        &format!("/api/v1/nodes/{name}"),
        &serde_json::json!({"metadata": {"labels": {"outpost.io/trusted": "true"}}}),
    );
    assert_eq!(status, 200, "{body}");
    reconcile();
    let out = cleanup(&admin, name);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(root.path()), before);
    assert_eq!(trusted_label(name), None);

    // The API server hangs: the files go all the same, the label call gives up, and the exit
    // status says the label may be left.
    reconcile();
    let hung = HungApi::start();
    let hung_dir = tempfile::tempdir().unwrap();
    let out = cleanup(&kubeconfig(hung_dir.path(), hung.port), "node-1");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot remove the node label"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(tree(root.path()), before);
}

/// A lab's plain-HTTP Outpost (`registry_plain_http`, no CA): a real containerd pulls through
/// the `[host."http://R"]` mirror, and images named by the registry itself (what the webhook
/// rewrites pods to) resolve over plain HTTP too.
#[test]
fn containerd_pulls_through_a_plain_http_outpost_without_a_ca() {
    let work = tempfile::tempdir().unwrap();
    let outpost = Registry::start_with_args(&[]);
    let registry = outpost.host();
    let layout = Layout::new(work.path());
    layout.add_image(
        "app",
        "amd64",
        &[("app.bin", pseudo_random(run_seed() + 620, 32 * 1024))],
    );
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:app", layout.path.display()),
        &format!("docker://{registry}/demo/app:v1"),
    ]);
    let root = tempfile::tempdir().unwrap();
    let ctrd = CriContainerd::start(root.path());
    let before = tree(root.path());
    let config = work.path().join("outpost.toml");
    std::fs::write(
        &config,
        format!(
            "registry = \"{registry}\"\nregistry_plain_http = true\n[[rule]]\nupstream = \"nowhere.invalid\"\n"
        ),
    )
    .unwrap();
    // No --ca-file.
    let port = free_port();
    let log = work.path().join("agent.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("outpost-node-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(root.path())
        .args(["--no-label", "--cleanup-on-exit", "--interval", "200ms"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let mut agent = Agent {
        child: Some(child),
        log,
        port,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = agent.metrics();
        if sample(&m, "outpost_node_agent_registry_trusted") == Some(1.0)
            && sample(&m, "outpost_node_agent_configured_hosts") == Some(2.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent not ready: {m}\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let hosts_dir = root.path().join("etc/containerd/certs.d");
    assert!(!hosts_dir.join(&registry).join("ca.crt").exists());
    for image in [
        "nowhere.invalid/demo/app:v1".to_string(),
        format!("{registry}/demo/app:v1"),
    ] {
        let image_ref = cri::pull_image(&ctrd.socket, &image, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("CRI pull {image}: {e}\n{}", ctrd.log_text()));
        assert!(image_ref.starts_with("sha256:"), "{image_ref}");
    }
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(tree(root.path()), before);
}

/// MicroK8s: its containerd.toml names the snap revision's directory
/// (`/var/snap/microk8s/<rev>/args/certs.d`) while the agent writes through the `current`
/// symlink: the same directory, so the node is trusted; a config naming another directory is not.
#[test]
fn microk8s_revision_paths_are_the_hosts_directory_through_current() {
    let (work, root, pki, config, _) = node("version = 2\n");
    let snap = root.path().join("var/snap/microk8s");
    std::fs::create_dir_all(snap.join("6089/args/certs.d")).unwrap();
    std::os::unix::fs::symlink("6089", snap.join("current")).unwrap();
    let containerd_toml = snap.join("6089/args/containerd.toml");
    let write_config = |path: &str| {
        std::fs::write(
            &containerd_toml,
            format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{path}\"\n"
            ),
        )
        .unwrap();
    };
    write_config("/var/snap/microk8s/6089/args/certs.d");
    let before = tree(root.path());
    let mut agent = Agent::spawn(
        work.path(),
        &config,
        &pki.ca_cert,
        root.path(),
        &["--no-label", "--cleanup-on-exit", "--interval", "100ms"],
        &[
            (
                "OUTPOST_HOSTS_DIR",
                Path::new("/var/snap/microk8s/current/args/certs.d"),
            ),
            (
                "OUTPOST_CONTAINERD_CONFIG",
                Path::new("/var/snap/microk8s/current/args/containerd.toml"),
            ),
        ],
    );
    let wait_for = |trusted: f64, elsewhere: f64| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let m = agent.metrics();
            if sample(&m, "outpost_node_agent_registry_trusted") == Some(trusted)
                && sample(
                    &m,
                    "outpost_node_agent_config_warnings{check=\"config_path_elsewhere\"}",
                ) == Some(elsewhere)
            {
                return;
            }
            assert!(Instant::now() < deadline, "{m}\n{}", agent.log_text());
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_for(1.0, 0.0);
    assert!(
        snap.join("6089/args/certs.d/ghcr.io/hosts.toml").is_file(),
        "{:?}",
        tree(root.path())
    );
    write_config("/var/snap/microk8s/6089/args/other.d");
    wait_for(0.0, 1.0);
    write_config("/var/snap/microk8s/6089/args/certs.d");
    assert!(agent.terminate().success(), "{}", agent.log_text());
    assert_eq!(tree(root.path()), before);
}
