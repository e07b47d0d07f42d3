//! outpost-registry on object storage: `serve --storage azblob://…` against Azurite
//! (Microsoft's Azure Blob emulator from npm, installed by tests/run.sh under
//! `$OUTPOST_EMULATORS`), started on loopback by the test and stopped by PID. skopeo pushes an
//! image through the registry and pulls it back; bad storage configuration fails at start with
//! one clear line.

use std::process::Command;
use std::time::Duration;

use outpost_e2e::emulators::{self, AZURITE_KEY, ObjectStorage};
use outpost_e2e::{Layout, Registry, bin, free_port, pseudo_random, run_timeout, skopeo};

#[test]
fn skopeo_round_trip_through_azure_blob_storage() {
    round_trip(emulators::azurite());
}

#[test]
fn skopeo_round_trip_through_s3() {
    round_trip(emulators::moto());
}

/// skopeo pushes an image with a layer larger than one upload part through a registry on
/// `storage` and pulls it back byte for byte.
fn round_trip(storage: ObjectStorage) {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let registry = Registry::start_on_storage(Some(storage), &[]);
    let port = registry.port;

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
    let log_text = registry.log_text();
    assert!(log_text.contains("object storage"), "{log_text}");
}

#[test]
fn bad_storage_configuration_fails_at_start_with_one_line() {
    let az = emulators::azurite();
    // The key on the command line this time, so the check that it is never printed bites.
    let storage_args = |url: &str| {
        let mut a = vec!["--storage".to_owned(), url.to_owned()];
        for o in az.options.iter().cloned().chain([
            format!("account_name={}", emulators::AZURITE_ACCOUNT),
            format!("access_key={AZURITE_KEY}"),
        ]) {
            a.push("--storage-option".to_owned());
            a.push(o);
        }
        a
    };
    let cases: [(Vec<String>, &str); 3] = [
        (storage_args("azblob://no-such-container"), "does not exist"),
        (
            vec!["--storage".into(), "ftp://x/y".into()],
            "unknown storage scheme",
        ),
        (
            {
                let mut a = storage_args(&format!("azblob://{}", az.bucket));
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
        assert!(
            !stderr.contains(AZURITE_KEY),
            "the key is never printed: {stderr}"
        );
    }
}
