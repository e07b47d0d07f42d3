//! The container images: built by `images/build.py` from the binaries this build made,
//! pushed with skopeo to an Outpost started here, pulled back with containerd, run (the
//! libraries and loader are complete), and declaring a non-root user.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::oci::*;
use outpost_e2e::*;
use serde_json::Value;

const IMAGES: [&str; 3] = ["outpost-registry", "outpost-webhook", "outpost-node-agent"];

#[test]
fn images_build_push_to_outpost_pull_with_containerd_and_run_as_non_root() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = tempfile::tempdir().unwrap();
    let built = run_timeout(
        Command::new("python3")
            .arg(repo.join("images/build.py"))
            .arg("--bin-dir")
            .arg(bin_dir())
            .arg("--out")
            .arg(out.path())
            .args(["--tag", "test", "--no-compress"]),
        Duration::from_secs(300),
    );
    assert!(
        built.status.success(),
        "{}{}",
        String::from_utf8_lossy(&built.stdout),
        String::from_utf8_lossy(&built.stderr)
    );
    let outpost = Registry::start();
    let ep = Endpoint::plain(&outpost.host());
    let ctrd = Containerd::start();
    for name in IMAGES {
        let dest = format!("{}/outpost/{name}:test", outpost.host());
        skopeo(&[
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{}:test", out.path().join(name).display()),
            &format!("docker://{dest}"),
        ]);
        ctrd.ctr(&["image", "pull", "--plain-http", &dest]);
        // The config runs the binary as the non-root user.
        let m: Value =
            serde_json::from_slice(&ep.manifest(&format!("outpost/{name}"), "test").unwrap())
                .unwrap();
        let config: Value = serde_json::from_slice(&ep.blob(
            &format!("outpost/{name}"),
            m["config"]["digest"].as_str().unwrap(),
        ))
        .unwrap();
        assert_eq!(config["config"]["User"], "65532:65532", "{name}: {config}");
        assert_eq!(
            config["config"]["Entrypoint"][0],
            format!("/usr/local/bin/{name}")
        );
        // It runs: the loader, the libraries and the binary are all there.
        let ran = run_timeout(
            Command::new(require("ctr"))
                .arg("--address")
                .arg(&ctrd.socket)
                .args([
                    "run",
                    "--rm",
                    &dest,
                    &format!("run-{name}"),
                    &format!("/usr/local/bin/{name}"),
                    "--version",
                ]),
            Duration::from_secs(60),
        );
        let text = String::from_utf8_lossy(&ran.stdout);
        assert!(
            ran.status.success() && text.contains("0.1.0"),
            "{name}: {text}{}",
            String::from_utf8_lossy(&ran.stderr)
        );
    }
}
