//! outpost-registry on object storage: `serve --storage azblob://…` against Azurite
//! (Microsoft's Azure Blob emulator from npm, installed by tests/run.sh under
//! `$OUTPOST_EMULATORS`), started on loopback by the test and stopped by PID. skopeo pushes an
//! image through the registry and pulls it back; bad storage configuration fails at start with
//! one clear line.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use base64::Engine;
use outpost_e2e::{Layout, bin, free_port, pseudo_random, run_ok, run_timeout, skopeo};

/// Azurite's well-known development account (public, documented by Microsoft).
const ACCOUNT: &str = "devstoreaccount1";
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";

/// A child process killed (by its PID) and reaped on drop, also when the test panics.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_listening(p: &mut Proc, port: u16, what: &str, log: &std::path::Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(st)) = p.0.try_wait() {
            panic!(
                "{what} exited ({st}): {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "{what} not listening after 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn emulators_dir() -> PathBuf {
    std::env::var_os("OUTPOST_EMULATORS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/outpost-emulators")
        })
}

/// moto's S3 server (PyPI), with one bucket `outpost`.
fn moto(dir: &std::path::Path) -> (Proc, u16) {
    let program = emulators_dir().join("moto/bin/moto_server");
    assert!(
        program.exists(),
        "{} is missing: tests/run.sh installs moto[server]",
        program.display()
    );
    let port = free_port();
    let log = dir.join("moto.log");
    let f = std::fs::File::create(&log).expect("log");
    let child = Command::new(&program)
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("start moto_server");
    let mut p = Proc(child);
    wait_listening(&mut p, port, "moto_server", &log);
    // moto does not check signatures: a plain PUT creates the bucket.
    let resp = reqwest::blocking::Client::new()
        .put(format!("http://127.0.0.1:{port}/outpost"))
        .send()
        .expect("create bucket");
    assert!(
        resp.status().is_success(),
        "create bucket: {}",
        resp.status()
    );
    (p, port)
}

fn s3_args(port: u16, url: &str) -> Vec<String> {
    let mut args = vec!["--storage".to_owned(), url.to_owned()];
    for o in [
        format!("endpoint=http://127.0.0.1:{port}"),
        "allow_http=true".to_owned(),
        "region=us-east-1".to_owned(),
        "access_key_id=test".to_owned(),
        "secret_access_key=test".to_owned(),
    ] {
        args.push("--storage-option".to_owned());
        args.push(o);
    }
    args
}

fn azurite(dir: &std::path::Path) -> (Proc, u16) {
    let program = emulators_dir().join("azurite/node_modules/.bin/azurite-blob");
    assert!(
        program.exists(),
        "{} is missing: tests/run.sh installs Azurite",
        program.display()
    );
    let port = free_port();
    let log = dir.join("azurite.log");
    let f = std::fs::File::create(&log).expect("log");
    let child = Command::new(&program)
        .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
        .arg("--location")
        .arg(dir.join("azurite"))
        .arg("--skipApiVersionCheck")
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log"))
        .stderr(f)
        .spawn()
        .expect("start azurite");
    let mut p = Proc(child);
    wait_listening(&mut p, port, "azurite", &log);
    create_container(port, "outpost");
    (p, port)
}

/// Creates a container through the Blob REST API, signed with the account's shared key.
fn create_container(port: u16, name: &str) {
    let date = run_ok(Command::new("date").args(["-u", "+%a, %d %b %Y %H:%M:%S GMT"]));
    let date = date.trim();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n\
         /{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = hmac::Key::new(hmac::HMAC_SHA256, &b64.decode(KEY).expect("key"));
    let sig = b64.encode(hmac::sign(&key, to_sign.as_bytes()).as_ref());
    let resp = reqwest::blocking::Client::new()
        .put(format!(
            "http://127.0.0.1:{port}/{ACCOUNT}/{name}?restype=container"
        ))
        .header("x-ms-date", date)
        .header("x-ms-version", version)
        .header("content-length", "0")
        .header("authorization", format!("SharedKey {ACCOUNT}:{sig}"))
        .send()
        .expect("create container");
    assert!(
        resp.status().is_success(),
        "create container: {}",
        resp.status()
    );
}

fn storage_args(port: u16, url: &str) -> Vec<String> {
    let mut args = vec!["--storage".to_owned(), url.to_owned()];
    for o in [
        format!("account_name={ACCOUNT}"),
        format!("access_key={KEY}"),
        format!("endpoint=http://127.0.0.1:{port}/{ACCOUNT}"),
        "allow_http=true".to_owned(),
    ] {
        args.push("--storage-option".to_owned());
        args.push(o);
    }
    args
}

#[test]
fn skopeo_round_trip_through_azure_blob_storage() {
    let dir = tempfile::tempdir().unwrap();
    let (_azurite, az_port) = azurite(dir.path());
    round_trip(dir.path(), &storage_args(az_port, "azblob://outpost/e2e"));
}

#[test]
fn skopeo_round_trip_through_s3() {
    let dir = tempfile::tempdir().unwrap();
    let (_moto, s3_port) = moto(dir.path());
    round_trip(dir.path(), &s3_args(s3_port, "s3://outpost/e2e"));
}

/// skopeo pushes an image with a layer larger than one upload part through a registry on
/// `storage` and pulls it back byte for byte.
fn round_trip(dir: &std::path::Path, storage: &[String]) {
    let port = free_port();
    let log = dir.join("registry.log");
    let f = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin("outpost-registry"))
        .arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
        .args(storage)
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .expect("start outpost-registry");
    let mut registry = Proc(child);
    wait_listening(&mut registry, port, "outpost-registry", &log);

    let layout = Layout::new(dir);
    layout.add_image("v1", "amd64", &[("data/big", pseudo_random(15, 12 << 20))]);
    let dest = format!("docker://127.0.0.1:{port}/object/store:v1");
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}:v1", layout.path.display()),
        &dest,
    ]);
    let back = dir.join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dest,
        &format!("oci:{}:v1", back.display()),
    ]);
    let pushed = skopeo(&[
        "inspect",
        "--raw",
        &format!("oci:{}:v1", layout.path.display()),
    ]);
    let pulled = skopeo(&["inspect", "--raw", &format!("oci:{}:v1", back.display())]);
    assert_eq!(pushed, pulled, "the manifest comes back byte for byte");
    let manifest: serde_json::Value = serde_json::from_str(&pulled).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let d = layer["digest"].as_str().unwrap().replace(':', "/");
        let a = std::fs::read(layout.path.join("blobs").join(&d)).unwrap();
        let b = std::fs::read(back.join("blobs").join(&d)).unwrap();
        assert!(a == b, "layer {d} differs");
    }
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(log_text.contains("object storage"), "{log_text}");
}

#[test]
fn bad_storage_configuration_fails_at_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (_azurite, az_port) = azurite(dir.path());
    let cases: [(Vec<String>, &str); 3] = [
        (
            storage_args(az_port, "azblob://no-such-container"),
            "does not exist",
        ),
        (
            vec!["--storage".into(), "ftp://x/y".into()],
            "unknown storage scheme",
        ),
        (
            {
                let mut a = storage_args(az_port, "azblob://outpost");
                a.extend(["--storage-option".into(), "no_such_option=1".into()]);
                a
            },
            "not an option",
        ),
    ];
    for (args, expect) in cases {
        let out = run_timeout(
            Command::new(bin("outpost-registry"))
                .arg("serve")
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(["--admin-listen", &format!("127.0.0.1:{}", free_port())])
                .args(&args),
            Duration::from_secs(60),
        );
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{args:?} started: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{stderr}");
        assert!(!stderr.contains(KEY), "the key is never printed: {stderr}");
    }
}
