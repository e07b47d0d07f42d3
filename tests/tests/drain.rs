//! Drain-aware readiness in the three binaries: SIGTERM while a loop of requests runs and a
//! probe polls `/readyz` as the kubelet would (a new connection each time). `/readyz` must
//! answer 503 from the first probe after the signal (within 1 s), while the listeners stay
//! open for the shutdown delay and every request sent meanwhile succeeds; a request in flight
//! when the listeners close (a slow blob download, a slow admission) completes; the process
//! exits 0. The plain-HTTP `--metrics-listen` of each serves parsed metric samples.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_e2e::metrics::{sample, samples};
use outpost_e2e::{Registry, TestPki, bin, free_port, pseudo_random, sha256};
use reqwest::blocking::Client;
use serde_json::json;

/// The shutdown delay the three get here.
const DELAY: Duration = Duration::from_secs(2);
/// Slack for scheduling on a loaded machine around the instants the checks compare.
const SLACK: Duration = Duration::from_millis(500);
/// The bound on the readiness flip.
const FLIP: Duration = Duration::from_secs(1);

/// A client that opens a new connection per request, as the kubelet's probes and a Service's
/// new clients do (a pooled connection would hide a closed listener).
fn fresh_client(ca: Option<&std::path::Path>) -> Client {
    let mut b = Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(30));
    if let Some(ca) = ca {
        let cert = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
        b = b.tls_certs_only([cert]);
    }
    b.build().unwrap()
}

/// What a request ended with: an HTTP status, or the transport error's text.
type Outcome = Result<u16, String>;

fn outcome(r: reqwest::Result<reqwest::blocking::Response>) -> Outcome {
    match r {
        Ok(r) => {
            let status = r.status().as_u16();
            // Read whole: a body cut short is a failed request.
            r.bytes().map(|_| status).map_err(|e| format!("body: {e}"))
        }
        Err(e) => Err(format!("{e:?}")),
    }
}

/// One request of a loop: when it started and ended, and how.
struct Sent {
    start: Instant,
    end: Instant,
    outcome: Outcome,
}

/// A probe loop and a request loop running beside the process until `finish`.
struct Load {
    stop: Arc<AtomicBool>,
    probes: JoinHandle<Vec<Sent>>,
    requests: JoinHandle<Vec<Sent>>,
}

fn run_loop(
    stop: Arc<AtomicBool>,
    pause: Duration,
    f: impl Fn() -> Outcome + Send + 'static,
) -> JoinHandle<Vec<Sent>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        // Bounded in count and time; ends when the test has seen the process exit.
        while !stop.load(Ordering::SeqCst) && out.len() < 20_000 && Instant::now() < deadline {
            let start = Instant::now();
            let outcome = f();
            out.push(Sent {
                start,
                end: Instant::now(),
                outcome,
            });
            std::thread::sleep(pause);
        }
        out
    })
}

impl Load {
    fn start(
        probe: impl Fn() -> Outcome + Send + 'static,
        request: impl Fn() -> Outcome + Send + 'static,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let probes = run_loop(stop.clone(), Duration::from_millis(25), probe);
        let requests = run_loop(stop.clone(), Duration::from_millis(10), request);
        // Both loops under way before the signal.
        std::thread::sleep(Duration::from_millis(400));
        Load {
            stop,
            probes,
            requests,
        }
    }

    /// Stops the loops (the process has exited) and checks what they saw around `term`.
    fn finish(self, what: &str, term: Instant, status: ExitStatus, log: &str) {
        self.stop.store(true, Ordering::SeqCst);
        let probes = self.probes.join().unwrap();
        let requests = self.requests.join().unwrap();
        assert!(status.success(), "{what}: exit {status}\n{log}");
        let close = term + DELAY;

        let before: Vec<&Sent> = probes.iter().filter(|p| p.end < term).collect();
        assert!(before.len() >= 3, "{what}: probes before the signal");
        for p in &before {
            assert_eq!(p.outcome, Ok(200), "{what}: ready before the signal\n{log}");
        }
        let first = probes
            .iter()
            .find(|p| p.outcome == Ok(503))
            .unwrap_or_else(|| panic!("{what}: /readyz never answered 503\n{log}"));
        let flip = first.end.saturating_duration_since(term);
        assert!(
            flip <= FLIP,
            "{what}: /readyz turned 503 only {flip:?} after SIGTERM"
        );
        // From the first 503 on, never ready again; answered (not refused) while the
        // listeners stay open.
        for p in probes.iter().filter(|p| p.start >= first.start) {
            assert_ne!(p.outcome, Ok(200), "{what}: ready again after the signal");
            if p.end + SLACK < close {
                assert_eq!(
                    p.outcome,
                    Ok(503),
                    "{what}: probe at {:?} after the signal, listeners still open\n{log}",
                    p.start.saturating_duration_since(term)
                );
            }
        }
        let probes_answered = probes
            .iter()
            .filter(|p| p.start >= first.start && p.outcome == Ok(503))
            .count();
        assert!(probes_answered >= 5, "{what}: 503s seen: {probes_answered}");

        // Every request sent before the listeners closed succeeded, including those sent after
        // the signal (the pod still serves while endpoints drop it); later ones may be refused.
        for r in requests.iter().filter(|r| r.start + SLACK < close) {
            assert_eq!(
                r.outcome,
                Ok(200),
                "{what}: request sent at {:?} from the signal, before the listeners closed",
                r.start.saturating_duration_since(term)
            );
        }
        let served_while_draining = requests
            .iter()
            .filter(|r| r.start > term && r.end + SLACK < close && r.outcome == Ok(200))
            .count();
        assert!(
            served_while_draining >= 5,
            "{what}: requests served after the signal: {served_while_draining}"
        );
        eprintln!(
            "{what}: 503 {flip:?} after SIGTERM; {} probes, {} requests ({served_while_draining} served while draining)",
            probes.len(),
            requests.len()
        );
    }
}

/// The samples of a `/metrics` page fetched over plain HTTP from `addr`; at least one named
/// with `prefix`.
fn plain_metrics(addr: &str, prefix: &str) -> String {
    let r = fresh_client(None)
        .get(format!("http://{addr}/metrics"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    let ours = samples(&text)
        .into_iter()
        .filter(|s| s.name.starts_with(prefix))
        .count();
    assert!(ours > 0, "no {prefix}* samples on {addr}:\n{text}");
    text
}

fn kill_term(pid: u32) {
    let st = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// Waits (bounded) for `child` to exit.
fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "no exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child when dropped (a failed assertion must not leave it running).
struct Killed(Option<Child>);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn registry_readyz_turns_503_at_sigterm_while_a_slow_download_completes() {
    let metrics_port = free_port();
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let mut reg =
        Registry::start_with_args(&["--shutdown-delay", "2s", "--metrics-listen", &metrics_addr]);
    // Large enough that a slow reader keeps it in flight past the listeners' close.
    let blob = pseudo_random(71, 24 * 1024 * 1024);
    let digest = sha256(&blob);
    let r = fresh_client(None)
        .post(format!(
            "{}/v2/drain/app/blobs/uploads/?digest={digest}",
            reg.url()
        ))
        .body(blob.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), 201);
    let text = plain_metrics(&metrics_addr, "outpost_");
    assert!(
        sample(&text, "outpost_storage_bytes").is_some(),
        "outpost_storage_bytes on --metrics-listen:\n{text}"
    );

    let base = reg.url();
    let (probe_url, v2) = (format!("{base}/readyz"), format!("{base}/v2/"));
    let probe_client = fresh_client(None);
    let client = fresh_client(None);
    let load = Load::start(
        move || outcome(probe_client.get(&probe_url).send()),
        move || outcome(client.get(&v2).send()),
    );
    // The slow download: started before the signal, read over about 4 s (the delay is 2 s).
    let url = format!("{base}/v2/drain/app/blobs/{digest}");
    let slow = std::thread::spawn(move || {
        let mut resp = fresh_client(None).get(&url).send().unwrap();
        assert_eq!(resp.status(), 200);
        let mut got = Vec::with_capacity(24 * 1024 * 1024);
        let mut buf = vec![0u8; 256 * 1024];
        let started = Instant::now();
        // Bounded by the body's length; the client's timeout bounds a stall.
        loop {
            let n = std::io::Read::read(&mut resp, &mut buf).expect("body read");
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            std::thread::sleep(Duration::from_millis(40));
        }
        (got, started.elapsed(), Instant::now())
    });
    std::thread::sleep(Duration::from_millis(200));
    let term = Instant::now();
    reg.sigterm();
    // Both listeners say so: the registry API's (probed above) and the metrics one.
    std::thread::sleep(Duration::from_millis(500));
    let r = fresh_client(None)
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "the metrics listener's /readyz while draining"
    );
    let status = reg.wait_exit(Duration::from_secs(40));
    let (got, took, end) = slow.join().unwrap();
    assert_eq!(got.len(), blob.len(), "the whole blob, in {took:?}");
    assert_eq!(sha256(&got), digest, "the blob's bytes");
    assert!(
        end > term + DELAY + SLACK,
        "the download was still in flight when the listeners closed (it took {took:?})"
    );
    load.finish("registry", term, status, &reg.log_text());
}

#[test]
fn webhook_readyz_turns_503_at_sigterm_while_admissions_complete() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    // A registry that accepts connections and never answers: each availability check of an
    // image on the rule's upstream takes the whole check timeout (a slow admission).
    let hung = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hung_addr = hung.local_addr().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "registry = \"{hung_addr}\"\ncheck_availability = true\n\
             [[rule]]\nupstream = \"myacr.azurecr.io\"\n"
        ),
    )
    .unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let log = dir.path().join("webhook.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("outpost-webhook"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--tls-cert")
        .arg(&pki.cert)
        .arg("--tls-key")
        .arg(&pki.key)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--shutdown-delay", "2s"])
        .args(["--availability-timeout", "2s", "--admission-budget", "4s"])
        .args(["--namespace", "outpost-system", "--no-secret-sync"])
        .env_remove("POD_NAMESPACE")
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .expect("start outpost-webhook");
    let mut child = Killed(Some(child));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let base = format!("https://127.0.0.1:{port}");
    let probe_client = fresh_client(Some(&pki.ca_cert));
    let deadline = Instant::now() + Duration::from_secs(20);
    while outcome(probe_client.get(format!("{base}/readyz")).send()) != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "webhook not ready:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    plain_metrics(&metrics_addr, "outpost_webhook_");
    let ready = fresh_client(None)
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .unwrap();
    assert_eq!(ready.status(), 200, "/readyz on the metrics listener");
    // No admissions on the plain-HTTP listener.
    let r = fresh_client(None)
        .post(format!("http://{metrics_addr}/mutate"))
        .body("{}")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);

    let review = |image: &str| {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "drain",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "team",
                "operation": "CREATE",
                "userInfo": {"username": "drain-test"},
                "object": {
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": {"name": "p", "namespace": "team"},
                    "spec": {"containers": [{"name": "c", "image": image}]},
                },
            },
        }))
        .unwrap()
    };
    // An admission succeeded: 200 with an AdmissionReview that allows the pod, read as
    // one (a warning would say it was not).
    let admitted = |r: reqwest::Result<reqwest::blocking::Response>| -> Outcome {
        let r = r.map_err(|e| format!("{e:?}"))?;
        let status = r.status().as_u16();
        let v: serde_json::Value = r.json().map_err(|e| format!("body: {e}"))?;
        if v["response"]["allowed"] != true || !v["response"]["warnings"].is_null() {
            return Err(format!("not admitted cleanly: {v}"));
        }
        Ok(status)
    };
    let (probe_url, mutate_url) = (format!("{base}/readyz"), format!("{base}/mutate"));
    let client = fresh_client(Some(&pki.ca_cert));
    // No rule for docker.io: answered at once.
    let quick = review("nginx:1.25");
    let load = Load::start(
        move || outcome(probe_client.get(&probe_url).send()),
        move || {
            admitted(
                client
                    .post(&mutate_url)
                    .header("content-type", "application/json")
                    .body(quick.clone())
                    .send(),
            )
        },
    );
    let pid = child.0.as_ref().unwrap().id();
    let term = Instant::now();
    kill_term(pid);
    // A slow admission sent shortly before the listeners close: still answered, in full.
    std::thread::sleep(DELAY - Duration::from_millis(800));
    let slow_client = fresh_client(Some(&pki.ca_cert));
    let slow_url = format!("{base}/mutate");
    let slow_body = review("myacr.azurecr.io/app:slow");
    let slow = std::thread::spawn(move || {
        let start = Instant::now();
        let r = slow_client
            .post(&slow_url)
            .header("content-type", "application/json")
            .body(slow_body)
            .send()
            .unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().unwrap();
        (v, start.elapsed(), Instant::now())
    });
    let status = wait_exit(child.0.as_mut().unwrap(), Duration::from_secs(40));
    child.0 = None;
    let (v, took, end) = slow.join().unwrap();
    assert_eq!(v["response"]["allowed"], true, "{v}");
    // Checked and found unavailable (the hung registry): kept upstream, with the reason.
    let warnings = v["response"]["warnings"].to_string();
    assert!(warnings.contains("did not answer within 2000 ms"), "{v}");
    assert!(
        end > term + DELAY + SLACK,
        "the admission waited for its availability check ({took:?}), past the close: {v}"
    );
    drop(hung);
    load.finish("webhook", term, status, &log_text());
}

#[test]
fn node_agent_readyz_turns_503_at_sigterm_while_it_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let containerd = root.join("etc/containerd");
    std::fs::create_dir_all(&containerd).unwrap();
    std::fs::write(
        containerd.join("config.toml"),
        "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
    )
    .unwrap();
    let config = dir.path().join("mirrors.toml");
    std::fs::write(
        &config,
        "registry = \"127.0.0.1:5999\"\nregistry_plain_http = true\n[[rule]]\nupstream = \"nowhere.invalid\"\n",
    )
    .unwrap();
    let (port, metrics_port) = (free_port(), free_port());
    let log = dir.path().join("agent.log");
    let logf = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("outpost-node-agent"))
        .arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .args([
            "--runtime",
            "containerd",
            "--no-label",
            "--interval",
            "200ms",
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--metrics-listen", &format!("127.0.0.1:{metrics_port}")])
        .args(["--shutdown-delay", "2s"])
        .stdin(Stdio::null())
        .stdout(logf.try_clone().unwrap())
        .stderr(logf)
        .spawn()
        .expect("start outpost-node-agent");
    let mut child = Killed(Some(child));
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let base = format!("http://127.0.0.1:{port}");
    let probe_client = fresh_client(None);
    let deadline = Instant::now() + Duration::from_secs(20);
    while outcome(probe_client.get(format!("{base}/readyz")).send()) != Ok(200) {
        assert!(
            Instant::now() < deadline,
            "agent not ready:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let metrics_addr = format!("127.0.0.1:{metrics_port}");
    let text = plain_metrics(&metrics_addr, "outpost_node_agent_");
    assert_eq!(
        sample(&text, "outpost_node_agent_configured_hosts"),
        Some(2.0),
        "{text}"
    );

    let (probe_url, metrics_url) = (format!("{base}/readyz"), format!("{base}/metrics"));
    let client = fresh_client(None);
    let load = Load::start(
        move || outcome(probe_client.get(&probe_url).send()),
        move || outcome(client.get(&metrics_url).send()),
    );
    let pid = child.0.as_ref().unwrap().id();
    let term = Instant::now();
    kill_term(pid);
    std::thread::sleep(Duration::from_millis(500));
    let r = fresh_client(None)
        .get(format!("http://{metrics_addr}/readyz"))
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        503,
        "the metrics listener's /readyz while draining"
    );
    let status = wait_exit(child.0.as_mut().unwrap(), Duration::from_secs(40));
    child.0 = None;
    load.finish("node agent", term, status, &log_text());
}
