//! The container images: built by `images/build.py` from the binaries this build made (the
//! debug ones in CI; the release ones for real images), pushed with skopeo to an Outpost
//! started here, pulled back and unpacked by containerd, declaring a non-root user, and run
//! from containerd's unpacked root filesystem as that user (the loader and the libraries are
//! all there; there is no shell); a second build is identical.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::oci::*;
use outpost_e2e::*;
use serde_json::Value;

const IMAGES: [&str; 3] = ["outpost-registry", "outpost-webhook", "outpost-node-agent"];

fn build_images(out: &Path) {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let built = run_timeout(
        Command::new("python3")
            .arg("-B")
            .arg(repo.join("images/build.py"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(out)
            // The debug binaries are large; real images use the default level.
            .args(["--tag", "test", "--gzip-level", "1"]),
        Duration::from_secs(600),
    );
    assert!(
        built.status.success(),
        "{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
}

/// The native snapshot (a full copy of the image's file system) holding `file`.
fn unpacked_root(ctrd: &Containerd, file: &str) -> PathBuf {
    let snapshots = ctrd
        .dir
        .path()
        .join("root/io.containerd.snapshotter.v1.native/snapshots");
    std::fs::read_dir(&snapshots)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.join(file).is_file())
        .unwrap_or_else(|| panic!("no snapshot under {} holds {file}", snapshots.display()))
}

#[test]
fn images_build_push_to_outpost_pull_with_containerd_and_run_as_non_root() {
    let out = tempfile::tempdir().unwrap();
    build_images(out.path());
    let outpost = Registry::start();
    let ep = Endpoint::plain(&outpost.host());
    let ctrd = Containerd::start();
    for name in IMAGES {
        let repo = format!("outpost/{name}");
        let dest = format!("{}/{repo}:test", outpost.host());
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:test", out.path().join(name).display()),
            &format!("docker://{dest}"),
        ]);

        // What Outpost serves: the config runs the binary as the non-root user.
        let manifest: Value =
            serde_json::from_slice(&ep.manifest(&repo, "test").expect("pushed manifest")).unwrap();
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2, "{manifest}");
        let config: Value =
            serde_json::from_slice(&ep.blob(&repo, manifest["config"]["digest"].as_str().unwrap()))
                .unwrap();
        assert_eq!(config["config"]["User"], "65532:65532", "{name}: {config}");
        assert_eq!(
            config["config"]["Entrypoint"],
            serde_json::json!([format!("/usr/local/bin/{name}")])
        );

        // containerd pulls it from Outpost and unpacks it.
        ctrd.ctr(&[
            "image",
            "pull",
            "--plain-http",
            "--snapshotter",
            "native",
            &dest,
        ]);
        let list = ctrd.ctr(&["image", "ls"]);
        assert!(list.contains(&dest), "{list}");
        let binary = format!("usr/local/bin/{name}");
        let root = unpacked_root(&ctrd, &binary);
        let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.contains(":65532:65532:"), "{passwd}");
        assert!(root.join("etc/ssl/certs/ca-certificates.crt").is_file());
        for shell in ["bin/sh", "bin/bash", "usr/bin/sh", "bin/busybox"] {
            assert!(!root.join(shell).exists(), "{name} has {shell}");
        }

        // It runs from that root as the image's user: loader, libraries and binary are there.
        let ran = run_timeout(
            Command::new("chroot")
                .arg("--userspec=65532:65532")
                .arg(&root)
                .arg(format!("/{binary}"))
                .arg("--version"),
            Duration::from_secs(60),
        );
        let text = String::from_utf8_lossy(&ran.stdout);
        assert!(
            ran.status.success() && text.contains(name),
            "{name}: {text}{}",
            String::from_utf8_lossy(&ran.stderr)
        );
    }
    // Reproducible: a second build gives the same manifests, byte for byte.
    let again = tempfile::tempdir().unwrap();
    build_images(again.path());
    for name in IMAGES {
        let index = |dir: &Path| std::fs::read(dir.join(name).join("index.json")).unwrap();
        assert_eq!(
            index(out.path()),
            index(again.path()),
            "{name} is not reproducible"
        );
    }
    // The base layer (libraries, CA bundle, passwd) is the same blob in all three images.
    let bases: Vec<String> = IMAGES
        .iter()
        .map(|name| {
            let m: Value =
                serde_json::from_slice(&ep.manifest(&format!("outpost/{name}"), "test").unwrap())
                    .unwrap();
            m["layers"][0]["digest"].as_str().unwrap().to_string()
        })
        .collect();
    assert!(bases.iter().all(|b| b == &bases[0]), "{bases:?}");
}
