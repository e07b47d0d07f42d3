//! `outpost-registry serve` as an operator meets it: TLS, refusals at start, one server per
//! store, JSON logs, and a SIGTERM that drains in-flight downloads and exits 0 (after a shutdown
//! delay, not ready but still serving, when one is set).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use outpost_e2e::{
    Layout, Registry, TestPki, bin, free_port, header, http, pseudo_random, run_ok, run_timeout,
    sha256, skopeo,
};
use reqwest::StatusCode;

fn serve_fails(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let out = run_timeout(
        Command::new(bin("outpost-registry"))
            .arg("serve")
            .arg("--storage")
            .arg(dir.path().join("data"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(args),
        Duration::from_secs(20),
    );
    assert!(
        !out.status.success(),
        "serve {args:?} should refuse to start"
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn refuses_plain_http_off_loopback_and_half_tls() {
    let port = free_port();
    let err = serve_fails(&["--listen", &format!("0.0.0.0:{port}")]);
    assert!(err.contains("refusing to serve plain HTTP"), "{err}");
    let err = serve_fails(&["--tls-cert", "/nonexistent.pem"]);
    assert!(err.contains("--tls-key"), "{err}");
    let err = serve_fails(&[
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--tls-cert",
        "/nonexistent.pem",
        "--tls-key",
        "/nonexistent.key",
    ]);
    assert!(err.contains("cannot load TLS certificate"), "{err}");
}

#[test]
fn one_server_per_store() {
    let reg = Registry::start();
    let out = run_timeout(
        Command::new(bin("outpost-registry"))
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{}", free_port()))
            .arg("--storage")
            .arg(&reg.storage),
        Duration::from_secs(20),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("another outpost-registry is serving"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sigterm_drains_an_in_flight_download_then_exits_zero() {
    let mut reg = Registry::start();
    let data = pseudo_random(9, 64 * 1024 * 1024);
    let d = sha256(&data);
    let r = http()
        .post(format!("{}/v2/drain/blobs/uploads/?digest={d}", reg.url()))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);

    let mut s = TcpStream::connect(("127.0.0.1", reg.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("GET /v2/drain/blobs/{d} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .unwrap();
    // Read a little so the response is under way, then ask the server to stop.
    let mut first = vec![0u8; 64 * 1024];
    let n = s.read(&mut first).unwrap();
    assert!(n > 0);
    reg.sigterm();
    std::thread::sleep(Duration::from_millis(300));
    // New connections are no longer accepted...
    assert!(
        TcpStream::connect(("127.0.0.1", reg.port)).is_err(),
        "listener closed after SIGTERM"
    );
    // ...while the download in flight completes, read slowly.
    let mut rest = Vec::new();
    let mut buf = vec![0u8; 1024 * 1024];
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        assert!(
            Instant::now() < deadline,
            "download did not finish while draining"
        );
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => rest.extend_from_slice(&buf[..k]),
            Err(e) => panic!("download cut during drain: {e}"),
        }
        if rest.len() + n >= data.len() {
            // Headers plus the whole body have arrived.
            let all = [&first[..n], &rest[..]].concat();
            if let Some(pos) = all.windows(4).position(|w| w == b"\r\n\r\n")
                && all.len() - pos - 4 == data.len()
            {
                assert_eq!(&all[pos + 4..], &data[..]);
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let status = reg.wait_exit(Duration::from_secs(35));
    assert!(status.success(), "exit status {status}");
}

/// `GET url`'s status on a fresh connection (a new client: no pooled keep-alive connection
/// from before the signal can stand in for the listener), or None when refused.
fn status_on_new_connection(url: &str) -> Option<u16> {
    http().get(url).send().ok().map(|r| r.status().as_u16())
}

/// Polls `url` (fresh connections) until it answers `want`, for `within` at most.
fn wait_for_status(url: &str, want: u16, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        last = status_on_new_connection(url);
        if last == Some(want) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{url} did not answer {want} within {within:?} (last: {last:?})");
}

/// SIGTERM with a shutdown delay: /readyz (API and admin listeners) answers 503 at once while
/// the listener still takes new connections and serves downloads; a second SIGTERM cuts the
/// delay short and the process exits 0. (The delay is two minutes, so nothing here depends on
/// being quick: every step has a bound far inside it.)
#[test]
fn sigterm_makes_readyz_503_while_serving_through_the_shutdown_delay() {
    let mut reg = Registry::start_with_args(&["--shutdown-delay", "120s"]);
    let data = pseudo_random(21, 256 * 1024);
    let d = sha256(&data);
    let r = http()
        .post(format!("{}/v2/delay/blobs/uploads/?digest={d}", reg.url()))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "connection"), "", "kept alive while serving");
    let ready = format!("{}/readyz", reg.url());
    let admin_ready = format!("http://127.0.0.1:{}/readyz", reg.admin_port);
    wait_for_status(&ready, 200, Duration::from_secs(20));
    assert_eq!(status_on_new_connection(&admin_ready), Some(200));

    let signalled = Instant::now();
    reg.sigterm();
    wait_for_status(&ready, 503, Duration::from_secs(10));
    let r = http().get(&ready).send().unwrap();
    assert_eq!(r.text().unwrap(), "shutting down\n");
    assert_eq!(status_on_new_connection(&admin_ready), Some(503));
    // Not ready, yet serving: a download on a new connection succeeds, whole, and asks the
    // client not to keep the connection (its next request opens one the balancer sends
    // elsewhere).
    let r = http()
        .get(format!("{}/v2/delay/blobs/{d}", reg.url()))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "connection"), "close");
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);
    assert_eq!(
        status_on_new_connection(&format!("{}/v2/", reg.url())),
        Some(200)
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(60),
        "the steps above took too long to prove anything about the delay"
    );

    // A second SIGTERM: no more waiting, drain and exit 0, long before the delay is over.
    reg.sigterm();
    let status = reg.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() < Duration::from_secs(110),
        "exited only when the delay ran out: {:?}",
        signalled.elapsed()
    );
}

/// A short shutdown delay runs out on its own: the process exits 0, never before the delay.
#[test]
fn shutdown_delay_runs_out_then_the_process_drains_and_exits_zero() {
    let mut reg = Registry::start_with_args(&["--shutdown-delay", "3s"]);
    wait_for_status(
        &format!("{}/readyz", reg.url()),
        200,
        Duration::from_secs(20),
    );
    let signalled = Instant::now();
    reg.sigterm();
    let status = reg.wait_exit(Duration::from_secs(45));
    assert!(status.success(), "exit status {status}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(3),
        "exited {:?} after SIGTERM, before the 3 s delay",
        signalled.elapsed()
    );
    let log = reg.log_text();
    assert!(
        log.contains("not ready, serving on for the shutdown delay"),
        "{log}"
    );
}

#[test]
fn https_with_rustls_for_http_clients_and_skopeo() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let reg = Registry::start_with_args(&[
        "--tls-cert",
        pki.cert.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_cert).unwrap()).unwrap();
    let c = reqwest::blocking::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .build()
        .unwrap();
    let r = c
        .get(format!("https://127.0.0.1:{}/v2/", reg.port))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        r.headers()["docker-distribution-api-version"],
        "registry/2.0"
    );
    // Plain HTTP on the TLS port gets nowhere.
    let plain = http()
        .get(format!("http://127.0.0.1:{}/v2/", reg.port))
        .send();
    assert!(!plain.is_ok_and(|r| r.status().is_success()));
    // skopeo verifies the certificate against the CA we hand it.
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image("v1", "amd64", &[("etc/hello", b"tls".to_vec())]);
    let dst = format!("docker://127.0.0.1:{}/secure/app:v1", reg.port);
    skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs.to_str().unwrap(),
        &format!("oci:{}:v1", layout.path.display()),
        &dst,
    ]);
    let raw = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs.to_str().unwrap(),
        &dst,
    ]);
    assert_eq!(sha256(raw.as_bytes()), layout.descriptor("v1")["digest"]);
}

#[test]
fn json_logs_and_separate_metrics_listener() {
    let mport = free_port();
    let reg = Registry::start_with_args(&[
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "--metrics-listen",
        &format!("127.0.0.1:{mport}"),
    ]);
    let c = http();
    c.get(format!("{}/v2/", reg.url())).send().unwrap();
    let r = c.get(format!("{}/metrics", reg.url())).send().unwrap();
    assert_eq!(
        r.status(),
        StatusCode::NOT_FOUND,
        "metrics moved off the API listener"
    );
    let text = c
        .get(format!("http://127.0.0.1:{mport}/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        text.contains(
            "outpost_http_requests_total{method=\"GET\",route=\"base\",status=\"200\"} 1"
        ),
        "{text}"
    );
    std::thread::sleep(Duration::from_millis(200));
    let log = reg.log_text();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"));
        assert!(v["level"].is_string(), "{l}");
    }
    assert!(
        log.contains("\"path\":\"/v2/\""),
        "debug request log: {log}"
    );
}

#[test]
fn help_documents_every_flag() {
    let out = run_ok(Command::new(bin("outpost-registry")).args(["serve", "--help"]));
    for flag in [
        "--listen",
        "--admin-listen",
        "--metrics-listen",
        "--storage",
        "--tls-cert",
        "--tls-key",
        "--http",
        "--upload-expiry",
        "--shutdown-delay",
        "OUTPOST_SHUTDOWN_DELAY",
        "--log-level",
        "--log-format",
        "OUTPOST_LISTEN",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}:\n{out}");
    }
    for sub in ["gc", "fsck"] {
        let out = run_ok(Command::new(bin("outpost-registry")).args([sub, "--help"]));
        assert!(out.contains("--storage"), "{out}");
    }
}
