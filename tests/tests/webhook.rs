//! The built `outpost-webhook` over HTTPS (its own test CA): the captured AdmissionReviews give
//! the golden pods, broken requests pass unchanged, availability checks against a real
//! `outpost-registry`, metrics and readiness, SIGTERM exit.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use outpost_e2e::metrics::sample;
use outpost_e2e::{Layout, Registry, TempDir, TestPki, bin, free_port, require, run_timeout};
use reqwest::blocking::Client;
use serde_json::{Value, json};

fn webhook_dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../webhook/tests")
        .join(sub)
}

fn fixture(name: &str) -> Value {
    let p = webhook_dir("fixtures/admission").join(name);
    serde_json::from_slice(&std::fs::read(&p).unwrap()).unwrap()
}

/// An `outpost-webhook serve` on loopback with its own PKI, killed when dropped.
struct Webhook {
    child: Option<Child>,
    port: u16,
    log: PathBuf,
    pki: TestPki,
    dir: TempDir,
}

impl Webhook {
    fn start(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = TestPki::create(dir.path());
        let config_path = dir.path().join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let port = free_port();
        let log = dir.path().join("webhook.log");
        let logf = std::fs::File::create(&log).unwrap();
        let child = Command::new(bin("outpost-webhook"))
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .arg("--tls-cert")
            .arg(&pki.cert)
            .arg("--tls-key")
            .arg(&pki.key)
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--namespace", "outpost-system", "--no-secret-sync"])
            .args(extra)
            .env_remove("POD_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf)
            .spawn()
            .expect("start outpost-webhook");
        let mut w = Webhook {
            child: Some(child),
            port,
            log,
            pki,
            dir,
        };
        w.wait_ready();
        w
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn client(&self) -> Client {
        let ca =
            reqwest::Certificate::from_pem(&std::fs::read(&self.pki.ca_cert).unwrap()).unwrap();
        Client::builder()
            .no_proxy()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.port)
    }

    fn wait_ready(&mut self) {
        let client = self.client();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!(
                    "outpost-webhook exited early ({status}):\n{}",
                    self.log_text()
                );
            }
            if let Ok(r) = client.get(self.url("/readyz")).send()
                && r.status() == 200
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("outpost-webhook not ready in time:\n{}", self.log_text());
    }

    /// POSTs a body to /mutate; the answer must be 200 with an AdmissionReview that allows.
    fn mutate_raw(&self, client: &Client, body: Vec<u8>) -> Value {
        let r = client
            .post(self.url("/mutate"))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: Value = r.json().unwrap();
        assert_eq!(v["kind"], "AdmissionReview", "{v}");
        assert_eq!(v["response"]["allowed"], true, "{v}");
        v["response"].clone()
    }

    fn mutate(&self, client: &Client, review: &Value) -> Value {
        let resp = self.mutate_raw(client, serde_json::to_vec(review).unwrap());
        assert_eq!(resp["uid"], review["request"]["uid"]);
        resp
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn patch_of(resp: &Value) -> Option<json_patch::Patch> {
    let b64 = resp.get("patch")?.as_str().expect("patch is base64 text");
    assert_eq!(resp["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(serde_json::from_slice(&raw).unwrap())
}

/// The same rules as the webhook crate's golden tests, so the goldens apply.
const CONFIG: &str = r#"
registry = "outpost.local:5000"
pull_secret = "outpost-pull"
check_availability = false
[[rule]]
upstream = "myacr.azurecr.io"
repositories = ["hello-world", "team-a/**", "tools/*", "storefront"]
[[rule]]
upstream = "myacr.azurecr.io:443"
[[rule]]
upstream = "docker.io"
repositories = ["library/*", "bitnami/**"]
"#;

#[test]
fn fixtures_over_https_give_the_golden_pods() {
    let w = Webhook::start(CONFIG, &[]);
    let client = w.client();
    let mut names: Vec<PathBuf> = std::fs::read_dir(webhook_dir("fixtures/admission"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8);
    let mut rewritten = 0;
    for path in names {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let review: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let resp = w.mutate(&client, &review);
        let mut pod = review["request"]["object"].clone();
        if let Some(patch) = patch_of(&resp) {
            json_patch::patch(&mut pod, &patch).unwrap();
            let mut twice = pod.clone();
            json_patch::patch(&mut twice, &patch).unwrap();
            assert_eq!(twice, pod, "{name}: the patch applied twice differs");
            rewritten += 1;
        }
        let golden: Value = serde_json::from_slice(
            &std::fs::read(webhook_dir("golden").join(format!("{name}.pod.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(pod, golden, "{name}");
        // The API server re-invokes with the mutated pod: nothing more to change.
        let mut again = review.clone();
        again["request"]["object"] = pod;
        assert!(patch_of(&w.mutate(&client, &again)).is_none(), "{name}");
    }
    assert_eq!(
        rewritten, 5,
        "basic, dry-run, from-deployment, mixed, required-affinity"
    );
    let metrics = client
        .get(w.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        sample(
            &metrics,
            "outpost_webhook_admissions_total{result=\"rewritten\"}"
        ) == Some(5.0),
        "{metrics}"
    );
    assert!(
        sample(&metrics, "outpost_webhook_admission_duration_seconds_count")
            .is_some_and(|v| v >= 1.0)
    );
    assert_eq!(client.get(w.url("/healthz")).send().unwrap().status(), 200);
}

#[test]
fn broken_requests_pass_unchanged() {
    let w = Webhook::start(CONFIG, &["--max-body-bytes", "65536"]);
    let client = w.client();
    let basic = fixture("pod-basic-create.json");
    let no_patch = |resp: &Value, why: &str| {
        assert!(resp.get("patch").is_none(), "{why}: {resp}");
    };
    // Malformed JSON, an empty body, a JSON value that is no review.
    for body in [
        &b"{not json"[..],
        b"",
        b"[1,2,3]",
        b"{\"kind\":\"AdmissionReview\"}",
    ] {
        let resp = w.mutate_raw(&client, body.to_vec());
        no_patch(&resp, &String::from_utf8_lossy(body));
        assert!(
            resp["warnings"][0]
                .as_str()
                .unwrap()
                .contains("outpost-webhook"),
            "{resp}"
        );
    }
    // The wrong admission API version: answered in that version, allowed, no patch.
    let mut old = basic.clone();
    old["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let r: Value = client
        .post(w.url("/mutate"))
        .body(serde_json::to_vec(&old).unwrap())
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(r["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(r["response"]["allowed"], true);
    assert_eq!(r["response"]["uid"], basic["request"]["uid"]);
    no_patch(&r["response"], "v1beta1");
    // Not a pod.
    let mut deploy = basic.clone();
    deploy["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    deploy["request"]["resource"] =
        json!({"group": "apps", "version": "v1", "resource": "deployments"});
    no_patch(&w.mutate(&client, &deploy), "deployment");
    // A review without the object, and one whose pod spec has the wrong shape.
    let mut empty = basic.clone();
    empty["request"].as_object_mut().unwrap().remove("object");
    no_patch(&w.mutate(&client, &empty), "no object");
    let mut odd = basic.clone();
    odd["request"]["object"]["spec"]["containers"] = json!("nginx");
    no_patch(&w.mutate(&client, &odd), "odd spec");
    // Oversized: not read past the limit.
    let mut big = basic.clone();
    big["request"]["object"]["metadata"]["annotations"]["padding"] = "x".repeat(100_000).into();
    let resp = w.mutate_raw(&client, serde_json::to_vec(&big).unwrap());
    no_patch(&resp, "oversized");
    assert!(
        resp["warnings"][0]
            .as_str()
            .unwrap()
            .contains("over 65536 bytes"),
        "{resp}"
    );
    // And the webhook still rewrites a good request afterwards.
    assert!(patch_of(&w.mutate(&client, &basic)).is_some());
    let metrics = client
        .get(w.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        sample(
            &metrics,
            "outpost_webhook_admissions_total{result=\"error\"}"
        ) == Some(7.0),
        "{metrics}"
    );
    assert!(
        sample(
            &metrics,
            "outpost_webhook_admissions_total{result=\"skipped\"}"
        ) == Some(1.0),
        "{metrics}"
    );
}

#[test]
fn availability_check_against_a_real_outpost() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let reg = Registry::start_with_args(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    // One image on Outpost: hello-world:latest.
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image("latest", "amd64", &[("etc/hello", b"hello".to_vec())]);
    let out = run_timeout(
        Command::new(require("skopeo"))
            .arg("--insecure-policy")
            .args(["copy", "--dest-cert-dir", certs.to_str().unwrap()])
            .arg(format!("oci:{}:latest", layout.path.display()))
            .arg(format!("docker://{}/hello-world:latest", reg.host())),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let config = format!(
        "registry = \"{}\"\npull_secret = \"outpost-pull\"\n[[rule]]\nupstream = \"myacr.azurecr.io\"\n",
        reg.host()
    );
    let w = Webhook::start(
        &config,
        &[
            "--registry-ca-file",
            pki.ca_cert.to_str().unwrap(),
            "--availability-cache-ttl",
            "0ms",
        ],
    );
    let client = w.client();
    let mut review = fixture("pod-basic-create.json");
    review["request"]["object"]["spec"]["containers"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "absent", "image": "myacr.azurecr.io/absent:1.0"}));
    let resp = w.mutate(&client, &review);
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    let containers = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(
        containers[0]["image"],
        format!("{}/hello-world:latest", reg.host())
    );
    assert_eq!(containers[1]["image"], "myacr.azurecr.io/absent:1.0");
    let ann = &pod["metadata"]["annotations"];
    let unavailable: Value =
        serde_json::from_str(ann["outpost.io/unavailable-images"].as_str().unwrap()).unwrap();
    assert!(
        unavailable["absent"]
            .as_str()
            .unwrap()
            .contains("not on Outpost"),
        "{unavailable}"
    );
    let originals: Value =
        serde_json::from_str(ann["outpost.io/original-images"].as_str().unwrap()).unwrap();
    assert_eq!(
        originals,
        json!({"hello": "myacr.azurecr.io/hello-world:latest"})
    );
    assert!(
        resp["warnings"][0].as_str().unwrap().contains("absent"),
        "{resp}"
    );

    // Re-invocation after the image arrived on Outpost moves it and clears its reason.
    let out = run_timeout(
        Command::new(require("skopeo"))
            .arg("--insecure-policy")
            .args(["copy", "--dest-cert-dir", certs.to_str().unwrap()])
            .arg(format!("oci:{}:latest", layout.path.display()))
            .arg(format!("docker://{}/absent:1.0", reg.host())),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut again = review.clone();
    again["request"]["object"] = pod.clone();
    let resp = w.mutate(&client, &again);
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    assert_eq!(
        pod["spec"]["containers"][1]["image"],
        format!("{}/absent:1.0", reg.host())
    );
    assert!(
        pod["metadata"]["annotations"]
            .get("outpost.io/unavailable-images")
            .is_none()
    );
    let originals: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["outpost.io/original-images"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(originals["absent"], "myacr.azurecr.io/absent:1.0");
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        json!([{"name": "outpost-pull"}])
    );

    // Outpost down: everything stays upstream, within the admission budget, with the reason.
    drop(reg);
    let t = Instant::now();
    let resp = w.mutate(&client, &fixture("pod-basic-create.json"));
    assert!(t.elapsed() < Duration::from_secs(5));
    let mut pod = fixture("pod-basic-create.json")["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "myacr.azurecr.io/hello-world:latest"
    );
    let why = pod["metadata"]["annotations"]["outpost.io/unavailable-images"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        why.contains("unreachable") || why.contains("did not answer"),
        "{why}"
    );
    assert!(pod["spec"].get("imagePullSecrets").is_none());
    assert!(pod["spec"].get("affinity").is_none());
    let _ = &w.dir;
}

#[test]
fn sigterm_exits_cleanly_and_config_reloads() {
    let mut w = Webhook::start(CONFIG, &["--reload-interval", "1s"]);
    let client = w.client();
    let basic = fixture("pod-basic-create.json");
    assert!(patch_of(&w.mutate(&client, &basic)).is_some());
    // A config without the rule: the pod passes unchanged once it is re-read.
    let config = w.dir.path().join("config.toml");
    std::fs::write(&config, "registry = \"outpost.local:5000\"\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if patch_of(&w.mutate(&client, &basic)).is_none() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "config not reloaded:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // A broken edit keeps the last good config (and readiness).
    std::fs::write(&config, "registry = ").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(client.get(w.url("/readyz")).send().unwrap().status(), 200);
    assert!(
        w.log_text().contains("config reload failed"),
        "{}",
        w.log_text()
    );

    let child = w.child.as_mut().unwrap();
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(35);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}\n{}", w.log_text());
    w.child = None;
}

#[test]
fn rotated_certificate_is_served_without_restart() {
    let w = Webhook::start(CONFIG, &["--reload-interval", "1s"]);
    let dir2 = tempfile::tempdir().unwrap();
    let pki2 = TestPki::create(dir2.path());
    let ca2 = reqwest::Certificate::from_pem(&std::fs::read(&pki2.ca_cert).unwrap()).unwrap();
    let client2 = Client::builder()
        .no_proxy()
        .tls_certs_only([ca2])
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    assert!(client2.get(w.url("/healthz")).send().is_err());
    // As cert-manager would: new files in place of the old ones.
    std::fs::copy(&pki2.key, &w.pki.key).unwrap();
    std::fs::copy(&pki2.cert, &w.pki.cert).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // A new connection each time, so the new handshake is seen.
        let c = Client::builder()
            .no_proxy()
            .tls_certs_only([reqwest::Certificate::from_pem(
                &std::fs::read(&pki2.ca_cert).unwrap(),
            )
            .unwrap()])
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        if c.get(w.url("/healthz"))
            .send()
            .is_ok_and(|r| r.status() == 200)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "certificate not reloaded:\n{}",
            w.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Admissions keep working over the new certificate.
    let resp = w.mutate(&client2, &fixture("pod-basic-create.json"));
    assert!(patch_of(&resp).is_some());
}

/// Outpost with client tokens: the check authenticates with the pull secret's credentials
/// (a mounted `.dockerconfigjson`); without them Outpost refuses and the image stays upstream.
#[test]
fn availability_check_uses_the_pull_secret_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let tokens = dir.path().join("tokens.toml");
    let registry_cli = |args: &[&str]| {
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
    for (name, actions) in [
        ("pull", &["content/read", "metadata/read"][..]),
        (
            "push",
            &["content/read", "content/write", "metadata/read"][..],
        ),
    ] {
        let mut args = vec!["scope-map", "create", "--name", name, "--repository", "**"];
        args.extend_from_slice(actions);
        registry_cli(&args);
    }
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
        let v: Value = serde_json::from_str(&out).unwrap();
        v["password1"].as_str().unwrap().to_owned()
    };
    let pusher = password("pusher", "push");
    let puller = password("puller", "pull");
    let reg = Registry::start_with_args(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
        "--tokens",
        tokens.to_str().unwrap(),
    ]);
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image("latest", "amd64", &[("etc/hello", b"hello".to_vec())]);
    let out = run_timeout(
        Command::new(require("skopeo"))
            .arg("--insecure-policy")
            .args(["copy", "--dest-cert-dir", certs.to_str().unwrap()])
            .args(["--dest-creds", &format!("pusher:{pusher}")])
            .arg(format!("oci:{}:latest", layout.path.display()))
            .arg(format!("docker://{}/hello-world:latest", reg.host())),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let auth = dir.path().join(".dockerconfigjson");
    std::fs::write(
        &auth,
        json!({"auths": {reg.host(): {"username": "puller", "password": puller}}}).to_string(),
    )
    .unwrap();
    let config = format!(
        "registry = \"{}\"\npull_secret = \"outpost-pull\"\n[[rule]]\nupstream = \"myacr.azurecr.io\"\n",
        reg.host()
    );
    let ca = pki.ca_cert.to_str().unwrap();
    let review = fixture("pod-basic-create.json");
    let image_after = |w: &Webhook| -> (String, Value) {
        let resp = w.mutate(&w.client(), &review);
        let mut pod = review["request"]["object"].clone();
        json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
        let ann = pod["metadata"]["annotations"].clone();
        (
            pod["spec"]["containers"][0]["image"]
                .as_str()
                .unwrap()
                .to_owned(),
            ann,
        )
    };
    // With the credentials: available, rewritten.
    let w = Webhook::start(
        &config,
        &[
            "--registry-ca-file",
            ca,
            "--registry-auth-file",
            auth.to_str().unwrap(),
        ],
    );
    let (image, _) = image_after(&w);
    assert_eq!(image, format!("{}/hello-world:latest", reg.host()));
    drop(w);
    // Without: refused, left upstream, and the reason says so.
    let w = Webhook::start(&config, &["--registry-ca-file", ca]);
    let (image, ann) = image_after(&w);
    assert_eq!(image, "myacr.azurecr.io/hello-world:latest");
    let why = ann["outpost.io/unavailable-images"].as_str().unwrap();
    assert!(
        why.contains("refused access") && why.contains("401"),
        "{why}"
    );
}
