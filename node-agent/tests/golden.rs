//! Every file the agent writes, compared with golden copies in `tests/golden/<case>/`, and the
//! rules around them: foreign entries kept, unowned files refused, removed rules cleaned,
//! cleanup leaving the tree as it was. `UPDATE_GOLDEN=1` rewrites the golden copies.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_core::MirrorConfig;
use outpost_node_agent::reconcile::{Reconciler, Runtime};
use outpost_node_agent::render::RenderOptions;

const CA: &str =
    "-----BEGIN CERTIFICATE-----\nMIIBdummyCAforGoldenFiles\n-----END CERTIFICATE-----\n";

const CONFIG: &str = r#"
registry = "outpost.local:5000"
pull_secret = "outpost-pull"
[[rule]]
upstream = "docker.io"
repositories = ["library/**"]
[[rule]]
upstream = "ghcr.io"
[[rule]]
upstream = "lab.local:5000"
plain_http = true
[[rule]]
upstream = "myacr.azurecr.io"
ca_file = "/etc/ssl/certs/myacr-ca.pem"
[[rule]]
upstream = "index.docker.io"
repositories = ["team/**"]
"#;

fn cfg(text: &str) -> MirrorConfig {
    text.parse().unwrap()
}

fn reconciler(root: &Path, runtime: Runtime, options: RenderOptions) -> Reconciler {
    Reconciler::new(root.to_path_buf(), runtime, options)
}

fn dial() -> RenderOptions {
    RenderOptions {
        dial_timeout: Some(Duration::from_secs(2)),
        ..Default::default()
    }
}

/// Every file under `root` (relative path -> content), and every directory (content None).
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

/// Compares the files `paths` under `root` with `tests/golden/<case>/`.
fn assert_golden(case: &str, root: &Path, paths: &[&str]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(case);
    for p in paths {
        let got = std::fs::read_to_string(root.join(p))
            .unwrap_or_else(|e| panic!("{case}: {p} was not written: {e}"));
        let golden = dir.join(p);
        if std::env::var_os("UPDATE_GOLDEN").is_some() {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &got).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{case}: no golden {}: {e}", golden.display()));
        assert_eq!(got, want, "{case}: {p} differs from its golden copy");
    }
}

#[test]
fn containerd_files_match_their_golden_copies() {
    let root = tempfile::tempdir().unwrap();
    let r = reconciler(root.path(), Runtime::Containerd, dial());
    let report = r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    assert!(report.refused.is_empty());
    assert!(report.registry_trusted);
    // The registry and four upstreams (docker.io once, whichever way it is spelled).
    assert_eq!(report.configured_hosts, 5);
    assert_golden(
        "containerd",
        root.path(),
        &[
            "etc/containerd/certs.d/outpost.local:5000/ca.crt",
            "etc/containerd/certs.d/outpost.local:5000/hosts.toml",
            "etc/containerd/certs.d/docker.io/hosts.toml",
            "etc/containerd/certs.d/ghcr.io/hosts.toml",
            "etc/containerd/certs.d/lab.local:5000/hosts.toml",
            "etc/containerd/certs.d/myacr.azurecr.io/hosts.toml",
        ],
    );
    // Every hosts.toml is valid TOML with the managed header first.
    for (p, c) in tree(root.path()) {
        if p.ends_with("hosts.toml") {
            let text = String::from_utf8(c.unwrap()).unwrap();
            assert!(text.starts_with("# managed by outpost-node-agent\n"));
            text.parse::<toml::Table>()
                .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        }
    }
    // A second pass writes nothing.
    let again = r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    assert!(
        again.written.is_empty() && again.removed.is_empty(),
        "{again:?}"
    );
}

#[test]
fn node_credentials_become_a_static_authorization_header() {
    let root = tempfile::tempdir().unwrap();
    let opts = RenderOptions {
        authorization: Some("Basic cHVsbDpzM2NyZXQ=".into()),
        basic: Some(("pull".into(), "s3cret".into())),
        ..dial()
    };
    let c = cfg("registry = \"outpost.local:5000\"\n[[rule]]\nupstream = \"ghcr.io\"\n");
    reconciler(root.path(), Runtime::Containerd, opts)
        .reconcile(&c, Some(CA))
        .unwrap();
    assert_golden(
        "containerd-credentials",
        root.path(),
        &[
            "etc/containerd/certs.d/outpost.local:5000/hosts.toml",
            "etc/containerd/certs.d/ghcr.io/hosts.toml",
        ],
    );
}

const FOREIGN_YAML: &str = "# written by the k3s admin\nmirrors:\n  quay.io:\n    endpoint:\n      - \"https://quay-mirror.local\"\n  ghcr.io:\n    endpoint:\n      - \"https://ghcr-mirror.local\"\nconfigs:\n  quay-mirror.local:\n    auth:\n      username: bot\n      password: hunter2\n";

#[test]
fn k3s_registries_yaml_is_merged_keeping_foreign_entries_and_restored_on_cleanup() {
    let root = tempfile::tempdir().unwrap();
    let yaml = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(yaml.parent().unwrap()).unwrap();
    std::fs::write(&yaml, FOREIGN_YAML).unwrap();
    let before = tree(root.path());
    let r = reconciler(root.path(), Runtime::K3s, RenderOptions::default());
    let report = r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    // ghcr.io already has a mirror someone else configured: left alone.
    assert_eq!(report.refused, ["mirrors.ghcr.io"]);
    assert!(report.registry_trusted);
    assert_golden(
        "k3s",
        root.path(),
        &[
            "etc/rancher/k3s/registries.yaml",
            "etc/rancher/k3s/outpost/outpost.local:5000/ca.crt",
        ],
    );
    // The original is kept beside it until cleanup.
    assert_eq!(
        std::fs::read_to_string(
            root.path()
                .join("etc/rancher/k3s/registries.yaml.outpost-backup")
        )
        .unwrap(),
        FOREIGN_YAML
    );
    // A rule removed: its mirror goes, foreign entries stay.
    let fewer = CONFIG.replace(
        "[[rule]]\nupstream = \"lab.local:5000\"\nplain_http = true\n",
        "",
    );
    r.reconcile(&cfg(&fewer), Some(CA)).unwrap();
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(!text.contains("lab.local"), "{text}");
    assert!(text.contains("quay.io") && text.contains("hunter2") && text.contains("docker.io"));
    // Cleanup puts back the original bytes, and nothing of the agent's remains.
    r.cleanup().unwrap();
    assert_eq!(tree(root.path()), before);
}

#[test]
fn k3s_cleanup_keeps_entries_others_added_meanwhile() {
    let root = tempfile::tempdir().unwrap();
    let yaml = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(yaml.parent().unwrap()).unwrap();
    std::fs::write(&yaml, FOREIGN_YAML).unwrap();
    let r = reconciler(root.path(), Runtime::K3s, RenderOptions::default());
    r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    // The admin adds a mirror while the agent manages the file.
    let edited = std::fs::read_to_string(&yaml).unwrap().replace(
        "mirrors:\n",
        "mirrors:\n  registry.k8s.io:\n    endpoint:\n    - https://k8s-mirror.local\n",
    );
    std::fs::write(&yaml, edited).unwrap();
    r.cleanup().unwrap();
    let text = std::fs::read_to_string(&yaml).unwrap();
    assert!(text.contains("k8s-mirror.local") && text.contains("quay-mirror.local"));
    assert!(!text.contains("outpost.local"), "{text}");
    assert!(!text.contains("managed by outpost-node-agent"));
}

#[test]
fn unowned_files_are_never_overwritten_or_removed() {
    let root = tempfile::tempdir().unwrap();
    let theirs = root
        .path()
        .join("etc/containerd/certs.d/ghcr.io/hosts.toml");
    std::fs::create_dir_all(theirs.parent().unwrap()).unwrap();
    let content = "server = \"https://ghcr.io\"\n[host.\"https://their-mirror\"]\n  capabilities = [\"pull\"]\n";
    std::fs::write(&theirs, content).unwrap();
    let r = reconciler(root.path(), Runtime::Containerd, dial());
    let report = r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    assert_eq!(
        report.refused,
        ["etc/containerd/certs.d/ghcr.io/hosts.toml"]
    );
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), content);
    // The rest is in place, and the registry is still trusted.
    assert!(report.registry_trusted);
    assert_eq!(report.configured_hosts, 4);
    // Cleanup leaves their file (and its directory) alone too.
    r.cleanup().unwrap();
    assert_eq!(std::fs::read_to_string(&theirs).unwrap(), content);
    assert!(
        !root
            .path()
            .join("etc/containerd/certs.d/docker.io")
            .exists()
    );
    // A file of ours later replaced by someone else's is theirs from then on.
    let r2 = reconciler(root.path(), Runtime::Containerd, dial());
    r2.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    let hub = root
        .path()
        .join("etc/containerd/certs.d/docker.io/hosts.toml");
    std::fs::write(&hub, "server = \"https://registry-1.docker.io\"\n").unwrap();
    let report = r2.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    assert!(report.refused.iter().any(|p| p.contains("docker.io")));
    r2.cleanup().unwrap();
    assert_eq!(
        std::fs::read_to_string(&hub).unwrap(),
        "server = \"https://registry-1.docker.io\"\n"
    );
}

#[test]
fn removed_rules_remove_their_files_and_cleanup_restores_the_tree() {
    let root = tempfile::tempdir().unwrap();
    // Something of the node's own beside: it must survive.
    let own = root.path().join("etc/containerd/config.toml");
    std::fs::create_dir_all(own.parent().unwrap()).unwrap();
    std::fs::write(&own, "version = 2\n").unwrap();
    let before = tree(root.path());
    let r = reconciler(root.path(), Runtime::Containerd, dial());
    r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    let fewer = CONFIG.replace("[[rule]]\nupstream = \"ghcr.io\"\n", "");
    let report = r.reconcile(&cfg(&fewer), Some(CA)).unwrap();
    assert_eq!(
        report.removed,
        [PathBuf::from("etc/containerd/certs.d/ghcr.io/hosts.toml")]
    );
    assert!(!root.path().join("etc/containerd/certs.d/ghcr.io").exists());
    // A restarted agent (a new Reconciler) cleans up after the first one.
    reconciler(root.path(), Runtime::Containerd, RenderOptions::default())
        .cleanup()
        .unwrap();
    assert_eq!(tree(root.path()), before);
}

#[test]
fn a_changed_ca_is_rewritten_in_place() {
    let root = tempfile::tempdir().unwrap();
    let r = reconciler(root.path(), Runtime::Containerd, dial());
    r.reconcile(&cfg(CONFIG), Some(CA)).unwrap();
    let rotated = CA.replace("dummy", "rotated");
    let report = r.reconcile(&cfg(CONFIG), Some(&rotated)).unwrap();
    assert_eq!(
        report.written,
        [PathBuf::from(
            "etc/containerd/certs.d/outpost.local:5000/ca.crt"
        )]
    );
    let text = std::fs::read_to_string(
        root.path()
            .join("etc/containerd/certs.d/outpost.local:5000/ca.crt"),
    )
    .unwrap();
    assert!(text.contains("rotated"));
}

fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn credentials_are_written_private_and_foreign_permissions_are_kept() {
    use std::os::unix::fs::PermissionsExt;
    let c = cfg("registry = \"outpost.local:5000\"\n[[rule]]\nupstream = \"ghcr.io\"\n");
    let creds = RenderOptions {
        authorization: Some("Basic cHVsbDpzM2NyZXQ=".into()),
        basic: Some(("pull".into(), "s3cret".into())),
        ..dial()
    };
    // containerd: hosts.toml files with the header are 0600, the CA stays readable.
    let root = tempfile::tempdir().unwrap();
    reconciler(root.path(), Runtime::Containerd, creds.clone())
        .reconcile(&c, Some(CA))
        .unwrap();
    let d = root.path().join("etc/containerd/certs.d");
    assert_eq!(mode(&d.join("ghcr.io/hosts.toml")), 0o600);
    assert_eq!(mode(&d.join("outpost.local:5000/hosts.toml")), 0o600);
    assert_eq!(mode(&d.join("outpost.local:5000/ca.crt")), 0o644);
    // Without credentials: 0644 like the rest of containerd's configuration.
    let root = tempfile::tempdir().unwrap();
    reconciler(root.path(), Runtime::Containerd, dial())
        .reconcile(&c, Some(CA))
        .unwrap();
    let d = root.path().join("etc/containerd/certs.d");
    assert_eq!(mode(&d.join("ghcr.io/hosts.toml")), 0o644);

    // k3s: an admin's 0600 registries.yaml (it holds passwords) stays 0600 through the merge,
    // its backup is 0600, and cleanup restores bytes and mode.
    for (original, opts, merged) in [
        (0o600, RenderOptions::default(), 0o600),
        (0o640, RenderOptions::default(), 0o640),
        (0o644, creds.clone(), 0o600),
    ] {
        let root = tempfile::tempdir().unwrap();
        let yaml = root.path().join("etc/rancher/k3s/registries.yaml");
        std::fs::create_dir_all(yaml.parent().unwrap()).unwrap();
        std::fs::write(&yaml, FOREIGN_YAML).unwrap();
        std::fs::set_permissions(&yaml, std::fs::Permissions::from_mode(original)).unwrap();
        let r = reconciler(root.path(), Runtime::K3s, opts);
        r.reconcile(&c, Some(CA)).unwrap();
        assert_eq!(mode(&yaml), merged, "{original:o}");
        assert_eq!(
            mode(
                &root
                    .path()
                    .join("etc/rancher/k3s/registries.yaml.outpost-backup")
            ),
            0o600
        );
        r.cleanup().unwrap();
        assert_eq!(std::fs::read_to_string(&yaml).unwrap(), FOREIGN_YAML);
        assert_eq!(mode(&yaml), original, "{original:o}");
    }
}

/// A lab's plain-HTTP registry: `[host."http://R"]` without a CA, no CA file, the registry
/// trusted all the same; an upstream over plain HTTP keeps its `http://` server.
const PLAIN: &str = r#"
registry = "10.96.100.100"
registry_plain_http = true
[[rule]]
upstream = "parent.lab:8080"
plain_http = true
[[rule]]
upstream = "ghcr.io"
"#;

#[test]
fn a_plain_http_registry_needs_no_ca_on_containerd() {
    let root = tempfile::tempdir().unwrap();
    let r = reconciler(root.path(), Runtime::Containerd, dial());
    // The CA is not needed, and one given anyway is not written.
    let report = r.reconcile(&cfg(PLAIN), Some(CA)).unwrap();
    assert!(report.registry_trusted, "{report:?}");
    assert_eq!(report.configured_hosts, 3);
    assert!(
        !root
            .path()
            .join("etc/containerd/certs.d/10.96.100.100/ca.crt")
            .exists()
    );
    assert_golden(
        "containerd-plain-http",
        root.path(),
        &[
            "etc/containerd/certs.d/10.96.100.100/hosts.toml",
            "etc/containerd/certs.d/parent.lab:8080/hosts.toml",
            "etc/containerd/certs.d/ghcr.io/hosts.toml",
        ],
    );
    let again = reconciler(root.path(), Runtime::Containerd, dial())
        .reconcile(&cfg(PLAIN), None)
        .unwrap();
    assert!(again.written.is_empty() && again.registry_trusted);
    r.cleanup().unwrap();
    assert!(tree(root.path()).is_empty());
    // An HTTPS registry without its CA is an error, not a node without trust.
    let err = r.reconcile(&cfg(CONFIG), None).unwrap_err();
    assert!(err.to_string().contains("--ca-file"), "{err}");
}

#[test]
fn a_plain_http_registry_on_k3s_is_a_mirror_of_its_own() {
    let root = tempfile::tempdir().unwrap();
    let r = reconciler(root.path(), Runtime::K3s, RenderOptions::default());
    let report = r.reconcile(&cfg(PLAIN), None).unwrap();
    assert!(report.registry_trusted, "{report:?}");
    assert_golden(
        "k3s-plain-http",
        root.path(),
        &["etc/rancher/k3s/registries.yaml"],
    );
    assert!(!root.path().join("etc/rancher/k3s/outpost").exists());
    // Someone else's entry for the registry: left alone, and the node does not trust it.
    r.cleanup().unwrap();
    let yaml = root.path().join("etc/rancher/k3s/registries.yaml");
    std::fs::create_dir_all(yaml.parent().unwrap()).unwrap();
    std::fs::write(
        &yaml,
        "mirrors:\n  10.96.100.100:\n    endpoint:\n    - https://10.96.100.100\n",
    )
    .unwrap();
    let report = r.reconcile(&cfg(PLAIN), None).unwrap();
    assert!(!report.registry_trusted);
    assert!(
        report
            .refused
            .contains(&"mirrors.10.96.100.100".to_string())
    );
    r.cleanup().unwrap();
}

/// Other distributions' layouts: RKE2's registries.yaml, MicroK8s's and k0s's hosts
/// directories. Each written where that distribution reads it, and cleaned up to nothing.
#[test]
fn each_distribution_gets_its_files_where_it_reads_them() {
    use outpost_node_agent::render::Layout;
    let c = cfg("registry = \"outpost.local:5000\"\n[[rule]]\nupstream = \"ghcr.io\"\n");
    let cases: [(&str, Runtime, Layout, &[&str]); 3] = [
        (
            "rke2",
            Runtime::Rke2,
            Runtime::Rke2.default_layout(),
            &[
                "etc/rancher/rke2/registries.yaml",
                "etc/rancher/rke2/outpost/outpost.local:5000/ca.crt",
            ],
        ),
        (
            "microk8s",
            Runtime::Containerd,
            Layout {
                hosts_dir: "var/snap/microk8s/current/args/certs.d".into(),
                ..Default::default()
            },
            &[
                "var/snap/microk8s/current/args/certs.d/outpost.local:5000/hosts.toml",
                "var/snap/microk8s/current/args/certs.d/ghcr.io/hosts.toml",
            ],
        ),
        (
            "k0s",
            Runtime::Containerd,
            Layout {
                hosts_dir: "etc/k0s/certs.d".into(),
                ..Default::default()
            },
            &[
                "etc/k0s/certs.d/outpost.local:5000/hosts.toml",
                "etc/k0s/certs.d/ghcr.io/hosts.toml",
            ],
        ),
    ];
    for (case, runtime, layout, files) in cases {
        let root = tempfile::tempdir().unwrap();
        let r = Reconciler {
            layout,
            ..reconciler(root.path(), runtime, dial())
        };
        let report = r.reconcile(&c, Some(CA)).unwrap();
        assert!(report.registry_trusted, "{case}: {report:?}");
        assert_golden(case, root.path(), files);
        // Nothing lands in another distribution's place.
        for other in ["etc/containerd", "etc/rancher/k3s"] {
            assert!(!root.path().join(other).exists(), "{case}: wrote {other}");
        }
        r.cleanup().unwrap();
        assert!(
            tree(root.path()).is_empty(),
            "{case}: {:?}",
            tree(root.path())
        );
    }
}
