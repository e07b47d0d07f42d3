//! The Helm chart through the real Helm library (helm-sdkpy, installed by tests/run.sh): lint
//! clean for the defaults and every documented scenario, failing for typos and bad
//! combinations (for the reason Helm gives); rendered objects checked per scenario; every flag
//! the templates pass known to its binary; the binaries started with the rendered arguments,
//! configs and mount layout; and the plain manifests in sync with the chart.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use outpost_e2e::*;
use serde_json::Value;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

#[test]
fn chart_lints_clean_for_every_scenario_and_fails_for_typos() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("charts/tests/lint.py"))
            .current_dir(repo()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("chart lint: 58 passed, 0 failed"), "{text}");
}

#[test]
fn manifests_are_in_sync_with_the_chart() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("manifests/generate.py"))
            .arg("--check")
            .current_dir(repo()),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("manifests in sync"), "{text}");
    // What kubectl apply -k gets: every object of the default install, none twice.
    let yaml = std::fs::read_to_string(repo().join("manifests/outpost.yaml")).unwrap();
    let mut objects: Vec<String> = Vec::new();
    let (mut kind, mut name) = (String::new(), String::new());
    for line in yaml.lines() {
        if line == "---" {
            kind.clear();
            name.clear();
        } else if let Some(k) = line.strip_prefix("kind: ") {
            kind = k.to_string();
        } else if let Some(n) = line.strip_prefix("  name: ")
            && name.is_empty()
        {
            name = n.to_string();
            objects.push(format!("{kind}/{name}"));
        }
    }
    for expected in [
        "Deployment/outpost-registry",
        "Service/outpost-registry",
        "PersistentVolumeClaim/outpost-data",
        "DaemonSet/outpost-node-agent",
        "Deployment/outpost-webhook",
        "PodDisruptionBudget/outpost-webhook",
        "MutatingWebhookConfiguration/outpost-webhook",
        // Self-managed certificates by default: the webhook's Role on its Secrets and its
        // right to set the configuration's caBundle.
        "Role/outpost-certs",
        "ClusterRole/outpost-webhook-ca-bundle",
    ] {
        assert!(
            objects.iter().any(|o| o == expected),
            "{expected} missing: {objects:?}"
        );
    }
    let mut unique = objects.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), objects.len(), "{objects:?}");
    assert!(
        !yaml.contains("connection-string: \""),
        "no connection string in plain YAML"
    );
}

/// `(subcommand, --flag)` pairs a template passes to its binary: the `args:` list (first item
/// the subcommand) and inline `command: [binary, subcommand, flags...]` arrays (the preStop).
fn template_flags(template: &str, binary: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sub: Option<String> = None;
    let mut in_args = false;
    for line in template.lines() {
        let t = line.trim();
        if t == "args:" {
            in_args = true;
            sub = None;
            continue;
        }
        if let Some(array) = t
            .strip_prefix("command: [")
            .and_then(|r| r.strip_suffix(']'))
        {
            let items: Vec<&str> = array
                .split(',')
                .map(|s| s.trim().trim_matches('"'))
                .collect();
            if items.first().is_some_and(|b| b.ends_with(binary)) && items.len() > 1 {
                for flag in &items[2..] {
                    out.push((items[1].to_string(), flag_name(flag)));
                }
            }
            continue;
        }
        if in_args {
            // A quoted item ("--storage-option=..." with an escaped value) is a flag too.
            match t.strip_prefix("- ").map(|i| i.trim_start_matches('"')) {
                Some(item) if item.starts_with("--") => {
                    let sub = sub.clone().expect("args start with a subcommand");
                    out.push((sub, flag_name(item)));
                }
                Some(item) if sub.is_none() => sub = Some(item.to_string()),
                Some(_) => {}
                // Template directives ({{- if }}) sit inside the list; anything else ends it.
                None if t.starts_with("{{") => {}
                None => in_args = false,
            }
        }
    }
    out
}

fn flag_name(arg: &str) -> String {
    arg.split('=').next().unwrap_or(arg).to_string()
}

#[test]
fn every_flag_the_chart_passes_exists_in_the_binary() {
    let templates = repo().join("charts/outpost/templates");
    let mut checked = 0;
    for (file, binary) in [
        ("registry.yaml", "outpost-registry"),
        ("webhook.yaml", "outpost-webhook"),
        ("node-agent.yaml", "outpost-node-agent"),
        ("certificates.yaml", "outpost-webhook"),
        ("uninstall.yaml", "outpost-webhook"),
    ] {
        let text = std::fs::read_to_string(templates.join(file)).unwrap();
        let flags = template_flags(&text, binary);
        assert!(flags.len() >= 5, "{file}: too few flags found: {flags:?}");
        for (sub, flag) in flags {
            let out = run_timeout(
                Command::new(bin(binary)).args([sub.as_str(), "--help"]),
                Duration::from_secs(30),
            );
            assert!(out.status.success(), "{binary} {sub} --help failed");
            let help = String::from_utf8_lossy(&out.stdout);
            let known = help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[')
                .any(|word| word == flag || word.starts_with(&format!("{flag}=")));
            assert!(
                known,
                "{file} passes {flag} to `{binary} {sub}`, which has no such flag:\n{help}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} flags checked");
}

#[test]
fn rendered_objects_match_the_chart_promises_in_every_scenario() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("charts/tests/render_checks.py"))
            .current_dir(repo()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("render checks: 37 passed, 0 failed"),
        "{text}"
    );
}

/// The chart rendered by the real Helm library for `values` (JSON) in namespace `edge`.
fn render(values: &str) -> Value {
    let out = run_timeout(
        Command::new("python3")
            .arg("-B")
            .arg(repo().join("charts/tests/helm_render.py"))
            .args([values, "edge"]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn object<'a>(rendered: &'a Value, kind: &str, name: &str) -> &'a Value {
    rendered["objects"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// A workload's container args with the pod's paths moved under `root` and its listeners on
/// free loopback ports; returns the args and the ports by flag.
fn local_args(workload: &Value, root: &Path) -> (Vec<String>, Vec<(String, u16)>) {
    let mut ports = Vec::new();
    let args = workload["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let a = a.as_str().unwrap();
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
    (args, ports)
}

fn port(ports: &[(String, u16)], flag: &str) -> u16 {
    ports.iter().find(|(f, _)| f == flag).unwrap().1
}

/// The token signing key file of the chart-made Secret, where the rendered mount puts it.
fn write_signing_key(rendered: &Value, root: &Path) {
    let keys = object(rendered, "Secret", "outpost-token-signing-key")["data"]["signing-keys"]
        .as_str()
        .expect("the chart's signing key");
    write(
        root.join("etc/outpost/signing-keys/signing-keys"),
        &base64::engine::general_purpose::STANDARD
            .decode(keys)
            .expect("base64 key file"),
    );
}

fn write(path: PathBuf, content: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, content).unwrap();
}

/// A process killed when dropped.
struct Running(std::process::Child, PathBuf);

impl Running {
    fn start(binary: &str, args: &[String], log: PathBuf) -> Self {
        Self::start_with_env(binary, args, &[], log)
    }

    fn start_with_env(
        binary: &str,
        args: &[String],
        env: &[(String, String)],
        log: PathBuf,
    ) -> Self {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin(binary))
            .args(args)
            .envs(env.iter().cloned())
            .env_remove("KUBECONFIG")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Running(child, log)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.1).unwrap_or_default()
    }

    /// Waits (20 s at most) for `url` to answer 200.
    fn wait_ready(&mut self, client: &reqwest::blocking::Client, url: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.0.try_wait() {
                panic!("exited early ({status}):\n{}", self.log());
            }
            if client
                .get(url)
                .send()
                .is_ok_and(|r| r.status().as_u16() == 200)
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{url} never ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The three binaries started with exactly the arguments, files and mounts the chart renders
/// (paths moved under a temp dir, listeners on loopback): the flag combinations, the mirror
/// config the chart writes and the file layout of its mounts are all accepted.
#[test]
fn the_binaries_start_with_the_rendered_arguments_and_files() {
    let rendered = render(
        r#"{"connectionString": "ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=p4ss;ParentGatewayEndpoint=127.0.0.1:9;ParentEndpointProtocol=http",
            "cert-manager": {"enabled": true},
            "tokens": {"existingSecret": "outpost-tokens"},
            "service": {"clusterIP": "10.96.100.100"},
            "trustDistribution": {"nodeCredentials": true},
            "webhook": {"rules": [{"upstream": "myacr.azurecr.io", "repositories": ["hello-world"]}, {"upstream": "docker.io"}]},
            "staging": {"images": ["hello-world:latest"]},
            "sync": {"concurrency": 2, "bandwidthLimit": 12500000}, "pullThrough": false}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("pki")).unwrap();
    let pki = TestPki::create(&root.join("pki"));
    let cert = std::fs::read(&pki.cert).unwrap();
    let key = std::fs::read(&pki.key).unwrap();
    let ca = std::fs::read(&pki.ca_cert).unwrap();
    let client = outpost_e2e::oci::client_with_ca(Some(&pki.ca_cert));
    let docker_config = br#"{"auths":{"10.96.100.100":{"auth":"ZWRnZS1wdWxsOnB3"}}}"#;

    // Registry: TLS, tokens, connection string file, staging; status over the admin API.
    let connection =
        object(&rendered, "Secret", "outpost-connection")["stringData"]["connection-string"]
            .as_str()
            .unwrap();
    write(root.join("etc/outpost/tls/tls.crt"), &cert);
    write(root.join("etc/outpost/tls/tls.key"), &key);
    write(root.join("etc/outpost/tls/ca.crt"), &ca);
    write(
        root.join("etc/outpost/connection/connection-string"),
        connection.as_bytes(),
    );
    // The bearer token signing key the chart generated, as the Secret's file.
    let signing_keys =
        object(&rendered, "Secret", "outpost-token-signing-key")["data"]["signing-keys"]
            .as_str()
            .unwrap();
    write(
        root.join("etc/outpost/signing-keys/signing-keys"),
        &base64::engine::general_purpose::STANDARD
            .decode(signing_keys)
            .unwrap(),
    );
    let tokens = root.join("etc/outpost/tokens/tokens.toml");
    std::fs::create_dir_all(tokens.parent().unwrap()).unwrap();
    let tokens_arg = tokens.to_str().unwrap();
    run_ok(Command::new(bin("outpost-registry")).args([
        "scope-map",
        "create",
        "--tokens",
        tokens_arg,
        "--name",
        "all-read",
        "--repository",
        "**",
        "content/read",
        "metadata/read",
    ]));
    run_ok(Command::new(bin("outpost-registry")).args([
        "token",
        "create",
        "--tokens",
        tokens_arg,
        "--name",
        "edge-pull",
        "--scope-map",
        "all-read",
    ]));
    let (args, ports) = local_args(object(&rendered, "Deployment", "outpost-registry"), root);
    let mut registry = Running::start("outpost-registry", &args, root.join("registry.log"));
    let api = port(&ports, "--listen");
    registry.wait_ready(&client, &format!("https://127.0.0.1:{api}/readyz"));
    // `kubectl exec ... outpost-registry status` as NOTES.txt says: the container's environment
    // names the admin API (HTTPS, the registry's CA), the port moved like the listener.
    let mut status = Command::new(bin("outpost-registry"));
    status.arg("status");
    let container = &object(&rendered, "Deployment", "outpost-registry")["spec"]["template"]["spec"]
        ["containers"][0];
    for env in container["env"].as_array().unwrap() {
        let value = env["value"].as_str().unwrap();
        let value = match value.strip_prefix('/') {
            Some(path) => root.join(path).display().to_string(),
            None => value.replace(":5050", &format!(":{}", port(&ports, "--admin-listen"))),
        };
        status.env(env["name"].as_str().unwrap(), value);
    }
    let status = run_ok(&mut status);
    assert!(status.contains("edge"), "{status}");
    // Tokens are enforced: no anonymous pulls.
    let r = client
        .get(format!("https://127.0.0.1:{api}/v2/"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    drop(registry);

    // Webhook: the rendered mirror config, TLS, registry CA and pull secret.
    let config = object(&rendered, "ConfigMap", "outpost-webhook")["data"]["config.toml"]
        .as_str()
        .unwrap();
    write(
        root.join("etc/outpost-webhook/config/config.toml"),
        config.as_bytes(),
    );
    write(root.join("etc/outpost-webhook/tls/tls.crt"), &cert);
    write(root.join("etc/outpost-webhook/tls/tls.key"), &key);
    write(root.join("etc/outpost-webhook/registry-ca/ca.crt"), &ca);
    write(
        root.join("etc/outpost-webhook/pull/.dockerconfigjson"),
        docker_config,
    );
    let (args, ports) = local_args(object(&rendered, "Deployment", "outpost-webhook"), root);
    let mut webhook = Running::start("outpost-webhook", &args, root.join("webhook.log"));
    webhook.wait_ready(
        &client,
        &format!("https://127.0.0.1:{}/readyz", port(&ports, "--listen")),
    );
    // What the ServiceMonitor scrapes: the rendered --metrics-listen, plain HTTP.
    let text = http()
        .get(format!(
            "http://127.0.0.1:{}/metrics",
            port(&ports, "--metrics-listen")
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        outpost_e2e::metrics::sample(&text, "outpost_webhook_admission_duration_seconds_count"),
        Some(0.0),
        "webhook metrics over plain HTTP:\n{text}"
    );
    drop(webhook);

    // Node agent: a node whose containerd reads /etc/containerd/certs.d, mounted at /host.
    let hosts = node_agent_round_trip(
        &rendered,
        root,
        &ca,
        "etc/containerd/certs.d/myacr.azurecr.io/hosts.toml",
    );
    assert!(hosts.contains("10.96.100.100"), "{hosts}");
}

/// A workload's container environment: the entries with a literal value (those from the
/// downward API are the kubelet's to fill).
fn container_env(workload: &Value) -> Vec<(String, String)> {
    workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    Some((
                        e["name"].as_str()?.to_string(),
                        e["value"].as_str()?.to_string(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the node agent as the DaemonSet would (rendered args, environment, config, CA,
/// credentials, the runtime's config directory under `root`/host), waits for readiness, reads
/// the file it wrote (`written`, relative to the node's root), then runs the rendered preStop
/// with the same environment and checks that the file is gone. Returns the file's content.
fn node_agent_round_trip(rendered: &Value, root: &Path, ca: &[u8], written: &str) -> String {
    let config = object(rendered, "ConfigMap", "outpost-node-agent")["data"]["config.toml"]
        .as_str()
        .unwrap();
    write(
        root.join("etc/outpost-node-agent/config/config.toml"),
        config.as_bytes(),
    );
    write(root.join("etc/outpost-node-agent/ca/ca.crt"), ca);
    write(
        root.join("etc/outpost-node-agent/pull/.dockerconfigjson"),
        br#"{"auths":{"10.96.100.100":{"auth":"ZWRnZS1wdWxsOnB3"}}}"#,
    );
    let daemonset = object(rendered, "DaemonSet", "outpost-node-agent");
    // The hostPath mount, as the kubelet makes it (DirectoryOrCreate).
    let mount = daemonset["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "runtime-config")
        .and_then(|m| m["mountPath"].as_str())
        .expect("the runtime-config mount");
    std::fs::create_dir_all(root.join(mount.trim_start_matches('/'))).unwrap();
    let env = container_env(daemonset);
    // containerd's config where the rendered environment says it is, naming the hosts
    // directory the rendered environment names.
    let var = |name: &str| env.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    if let (Some(ctd), Some(hosts)) = (var("OUTPOST_CONTAINERD_CONFIG"), var("OUTPOST_HOSTS_DIR")) {
        write(
            root.join("host").join(ctd.trim_start_matches('/')),
            format!(
                "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"{hosts}\"\n"
            )
            .as_bytes(),
        );
    }
    let (args, ports) = local_args(daemonset, root);
    let mut agent =
        Running::start_with_env("outpost-node-agent", &args, &env, root.join("agent.log"));
    agent.wait_ready(
        &http(),
        &format!("http://127.0.0.1:{}/readyz", port(&ports, "--listen")),
    );
    let file = root.join("host").join(written);
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", file.display(), agent.log()));
    // Trusted: the files are where the runtime's config says to look.
    let metrics = http()
        .get(format!(
            "http://127.0.0.1:{}/metrics",
            port(&ports, "--listen")
        ))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert_eq!(
        outpost_e2e::metrics::sample(&metrics, "outpost_node_agent_registry_trusted"),
        Some(1.0),
        "{metrics}\n{}",
        agent.log()
    );
    // The preStop hook, as rendered, removes what the agent wrote.
    let pre_stop: Vec<String> = daemonset["spec"]["template"]["spec"]["containers"][0]["lifecycle"]
        ["preStop"]["exec"]["command"]
        .as_array()
        .unwrap()
        .iter()
        .skip(1)
        .map(|a| {
            let a = a.as_str().unwrap();
            match a.split_once("=/") {
                Some((flag, path)) => format!("{flag}={}", root.join(path).display()),
                None => a.to_string(),
            }
        })
        .collect();
    drop(agent);
    run_ok(
        Command::new(bin("outpost-node-agent"))
            .args(&pre_stop)
            .envs(env.iter().cloned()),
    );
    assert!(!file.exists(), "preStop cleanup left {}", file.display());
    text
}

/// k3s nodes: the DaemonSet mounts /etc/rancher/k3s and the agent writes registries.yaml there
/// (mirrors through Outpost, its CA, the node credentials), removed again by the preStop.
#[test]
fn the_node_agent_configures_k3s_with_the_rendered_arguments() {
    let rendered = render(
        r#"{"service": {"clusterIP": "10.96.100.100"},
            "trustDistribution": {"runtime": "k3s", "nodeCredentials": true},
            "webhook": {"rules": [{"upstream": "myacr.azurecr.io"}]}}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pki")).unwrap();
    let pki = TestPki::create(&dir.path().join("pki"));
    let ca = std::fs::read(&pki.ca_cert).unwrap();
    let yaml = node_agent_round_trip(
        &rendered,
        dir.path(),
        &ca,
        "etc/rancher/k3s/registries.yaml",
    );
    assert!(
        yaml.contains("myacr.azurecr.io") && yaml.contains("10.96.100.100"),
        "{yaml}"
    );
}

/// The lab install (`httpsEnabled=false`, standalone, `anonymousPull`: the old behaviour): the
/// registry serves plain HTTP with the rendered arguments (the chart's signing key file too),
/// anonymous pulls are served, and `status` reaches its admin API over HTTP.
#[test]
fn the_plain_http_registry_starts_with_the_rendered_arguments() {
    let rendered = render(
        r#"{"httpsEnabled": false, "anonymousPull": true, "trustDistribution": {"enabled": false}}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let registry = object(&rendered, "Deployment", "outpost-registry");
    let (args, ports) = local_args(registry, root);
    assert!(args.iter().any(|a| a == "--http"), "{args:?}");
    write_signing_key(&rendered, root);
    let mut running = Running::start("outpost-registry", &args, root.join("registry.log"));
    let api = port(&ports, "--listen");
    running.wait_ready(&http(), &format!("http://127.0.0.1:{api}/readyz"));
    let r = http()
        .get(format!("http://127.0.0.1:{api}/v2/"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "anonymous pulls");
    let env = &registry["spec"]["template"]["spec"]["containers"][0]["env"];
    assert_eq!(env[0]["value"], "http://127.0.0.1:5050", "{env}");
    let status = run_ok(Command::new(bin("outpost-registry")).args([
        "status",
        "--admin",
        &format!("http://127.0.0.1:{}", port(&ports, "--admin-listen")),
    ]));
    assert!(status.contains("NAME"), "{status}");
}

/// The lab install with the node agent (`httpsEnabled=false`, the parent over plain HTTP): the
/// nodes get a plain-HTTP mirror (no CA), the parent's login server is mirrored by default and
/// containerd's fallback to it speaks plain HTTP too.
#[test]
fn the_lab_install_writes_a_plain_http_mirror_for_the_parent() {
    let rendered = render(
        r#"{"connectionString": "ConnectedRegistryName=edge;SyncTokenName=edge-sync;SyncTokenPassword=p4ss;ParentGatewayEndpoint=parent.lab:8080;ParentEndpointProtocol=http",
            "httpsEnabled": false, "cert-manager": {"enabled": false},
            "webhook": {"tlsSecret": "outpost-webhook-tls", "caBundle": "Q0EgYnVuZGxl"},
            "service": {"clusterIP": "10.96.100.100", "port": 80}}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let hosts = node_agent_round_trip(
        &rendered,
        dir.path(),
        b"",
        "etc/containerd/certs.d/parent.lab:8080/hosts.toml",
    );
    assert!(
        hosts.contains("server = \"http://parent.lab:8080\""),
        "{hosts}"
    );
    assert!(hosts.contains("[host.\"http://10.96.100.100\"]"), "{hosts}");
    assert!(!hosts.contains("ca ="), "{hosts}");
}

/// MicroK8s: the agent mounts /var/snap/microk8s and writes the hosts directory its containerd
/// reads (`current/args/certs.d`), checking `current/args/containerd.toml`.
#[test]
fn the_node_agent_writes_where_microk8s_reads() {
    let rendered = render(
        r#"{"service": {"clusterIP": "10.96.100.100"}, "trustDistribution": {"runtime": "microk8s"},
            "webhook": {"rules": [{"upstream": "myacr.azurecr.io"}]}}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("pki")).unwrap();
    let pki = TestPki::create(&dir.path().join("pki"));
    let ca = std::fs::read(&pki.ca_cert).unwrap();
    let hosts = node_agent_round_trip(
        &rendered,
        dir.path(),
        &ca,
        "var/snap/microk8s/current/args/certs.d/myacr.azurecr.io/hosts.toml",
    );
    assert!(
        hosts.contains("[host.\"https://10.96.100.100\"]"),
        "{hosts}"
    );
}

/// A container's environment as the kubelet builds it: literal values as they are, the pod's
/// name for `metadata.name` (the only downward API field the registry takes), and each
/// `secretKeyRef` from `secrets` ((Secret, key) -> value): an optional key the Secret lacks
/// leaves the variable unset, a required one stops the pod (here: the test).
fn kubelet_env(workload: &Value, secrets: &[(&str, &str, &str)]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for e in workload["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
    {
        let name = e["name"].as_str().unwrap().to_string();
        if let Some(value) = e["value"].as_str() {
            out.push((name, value.to_string()));
            continue;
        }
        if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
            assert_eq!(
                field, "metadata.name",
                "{name}: downward API field not handled"
            );
            out.push((name, "outpost-registry-pod".to_string()));
            continue;
        }
        let r = &e["valueFrom"]["secretKeyRef"];
        let found = secrets
            .iter()
            .find(|(s, k, _)| r["name"] == *s && r["key"] == *k);
        match found {
            Some((_, _, v)) => out.push((name, v.to_string())),
            None => assert!(
                r["optional"] == true,
                "{name}: required key {r} missing: the pod would not start"
            ),
        }
    }
    out
}

/// storage.type=azblob on Azurite through the chart: the registry started with exactly the
/// rendered arguments and the rendered environment (object_store's variables; the account key
/// from the Secret by reference, resolved as the kubelet would). A wrong key in the Secret
/// stops the start with one line about credentials; the right one serves, and a pushed blob
/// lands in the container under the prefix, readable by a second registry started the same way.
#[test]
fn the_registry_serves_from_azure_blob_storage_with_the_rendered_environment() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    // A fresh container on the shared Azurite; the chart's own prefix instead of the helper's.
    let storage = outpost_e2e::emulators::azurite();
    // No API server here: the election's lease in the bucket (cluster.rs runs the Lease).
    let rendered = render(&format!(
        r#"{{"httpsEnabled": false, "trustDistribution": {{"enabled": false}}, "webhook": {{"enabled": false}},
            "registry": {{"leaderElection": "store"}},
            "storage": {{"type": "azblob", "existingSecret": "outpost-azurite",
                        "azblob": {{"container": "{}", "prefix": "site-1", "useEmulator": true,
                                    "endpoint": "http://127.0.0.1:{}"}}}}}}"#,
        storage.bucket,
        storage.emulator().port()
    ));
    assert!(
        !rendered["objects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["kind"] == "PersistentVolumeClaim"),
        "no PVC on object storage"
    );
    let registry = object(&rendered, "Deployment", "outpost-registry");
    let (args, ports) = local_args(registry, root);
    assert!(
        args.iter()
            .any(|a| *a == format!("--storage=azblob://{}/site-1", storage.bucket)),
        "{args:?}"
    );
    write_signing_key(&rendered, root);

    // A Secret whose account key Azurite refuses (valid base64, wrong bytes).
    let wrong = "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXkgd3Jvbmcga2V5IHdyb25nIGtleQ==";
    let env = kubelet_env(
        registry,
        &[("outpost-azurite", "AZURE_STORAGE_ACCOUNT_KEY", wrong)],
    );
    assert!(
        env.iter()
            .any(|(k, v)| k == "AZURE_STORAGE_ACCOUNT_KEY" && v == wrong),
        "{env:?}"
    );
    let mut refused =
        Running::start_with_env("outpost-registry", &args, &env, root.join("refused.log"));
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = refused.0.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "still running with a wrong key:\n{}",
            refused.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = refused.log();
    assert!(!status.success(), "{log}");
    assert!(log.contains("credentials refused"), "{log}");
    assert!(!log.contains(wrong), "the key is never logged: {log}");
    drop(refused);

    // The right key: ready, and a blob pushed through the registry is stored in Azurite.
    let env = kubelet_env(
        registry,
        &[(
            "outpost-azurite",
            "AZURE_STORAGE_ACCOUNT_KEY",
            outpost_e2e::emulators::AZURITE_KEY,
        )],
    );
    let mut serving =
        Running::start_with_env("outpost-registry", &args, &env, root.join("registry.log"));
    let api = port(&ports, "--listen");
    serving.wait_ready(&http(), &format!("http://127.0.0.1:{api}/readyz"));
    let blob = b"stored in the blob container, not on a volume".to_vec();
    let digest = format!(
        "sha256:{}",
        aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &blob)
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let r = http()
        .post(format!(
            "http://127.0.0.1:{api}/v2/chart/blobs/uploads/?digest={digest}"
        ))
        .header("content-type", "application/octet-stream")
        .body(blob.clone())
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", serving.log());
    drop(serving);
    let names = storage.keys();
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        names
            .iter()
            .any(|n| n.starts_with("site-1/blobs/sha256/") && n.ends_with(hex)),
        "the blob under the prefix: {names:?}"
    );
    let mut again =
        Running::start_with_env("outpost-registry", &args, &env, root.join("again.log"));
    again.wait_ready(&http(), &format!("http://127.0.0.1:{api}/readyz"));
    let r = http()
        .get(format!("http://127.0.0.1:{api}/v2/chart/blobs/{digest}"))
        .send()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", again.log());
    assert_eq!(r.bytes().unwrap().as_ref(), blob.as_slice());
}

/// The chart's high-availability wiring run as its pods would: `registry.replicas: 2` on azblob
/// with `registry.leaderElection: store` renders `--leader-election=store`; two registries
/// started with the rendered arguments and environment on one Azurite container both serve,
/// and exactly one of them leads (never two). (The default, a Kubernetes Lease, runs against a
/// real API server in cluster.rs.)
#[test]
fn two_rendered_replicas_on_azblob_serve_with_exactly_one_leader() {
    let dir = tempfile::tempdir().unwrap();
    let storage = outpost_e2e::emulators::azurite();
    let rendered = render(&format!(
        r#"{{"httpsEnabled": false, "trustDistribution": {{"enabled": false}}, "webhook": {{"enabled": false}},
            "registry": {{"replicas": 2, "leaderElection": "store"}},
            "storage": {{"type": "azblob", "existingSecret": "outpost-azurite",
                        "azblob": {{"container": "{}", "prefix": "site-ha", "useEmulator": true,
                                    "endpoint": "http://127.0.0.1:{}"}}}}}}"#,
        storage.bucket,
        storage.emulator().port()
    ));
    let registry = object(&rendered, "Deployment", "outpost-registry");
    assert_eq!(registry["spec"]["replicas"], 2, "{registry}");
    let env = kubelet_env(
        registry,
        &[(
            "outpost-azurite",
            "AZURE_STORAGE_ACCOUNT_KEY",
            outpost_e2e::emulators::AZURITE_KEY,
        )],
    );
    let mut pods = Vec::new();
    let mut apis = Vec::new();
    for i in 0..2 {
        let pod_root = dir.path().join(format!("pod-{i}"));
        let (args, ports) = local_args(registry, &pod_root);
        write_signing_key(&rendered, &pod_root);
        assert!(
            args.iter().any(|a| a == "--leader-election=store"),
            "{args:?}"
        );
        let mut pod = Running::start_with_env(
            "outpost-registry",
            &args,
            &env,
            dir.path().join(format!("pod-{i}.log")),
        );
        let api = port(&ports, "--listen");
        pod.wait_ready(&http(), &format!("http://127.0.0.1:{api}/readyz"));
        pods.push(pod);
        apis.push(api);
    }
    let gauge = |api: u16| {
        let text = http()
            .get(format!("http://127.0.0.1:{api}/metrics"))
            .send()
            .ok()?
            .text()
            .ok()?;
        outpost_e2e::metrics::sample(&text, "outpost_leader")
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let gauges: Vec<Option<f64>> = apis.iter().map(|a| gauge(*a)).collect();
        let leaders = gauges.iter().filter(|g| **g == Some(1.0)).count();
        let logs = || format!("{}\n---\n{}", pods[0].log(), pods[1].log());
        assert!(leaders <= 1, "two leaders at once: {gauges:?}\n{}", logs());
        if leaders == 1 && gauges.iter().all(Option::is_some) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no single leader within 60 s: {gauges:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
