//! Real clients against Outpost: skopeo pushes and pulls (also a multi-arch index built offline
//! with umoci, copied with --all) and a real containerd daemon pulls and unpacks.

use outpost_e2e::{Containerd, Layout, Registry, pseudo_random, run_seed, sha256, skopeo};
use serde_json::Value;

fn layout_with_images(dir: &std::path::Path, seed: u64) -> Layout {
    let layout = Layout::new(dir);
    // Shared base content plus a unique file per platform.
    let shared = pseudo_random(seed, 300_000);
    layout.add_image(
        "amd64",
        "amd64",
        &[
            ("etc/shared.bin", shared.clone()),
            ("etc/platform", b"amd64".to_vec()),
        ],
    );
    layout.add_image(
        "arm64",
        "arm64",
        &[
            ("etc/shared.bin", shared),
            ("etc/platform", b"arm64".to_vec()),
        ],
    );
    layout
}

fn raw(reference: &str) -> Vec<u8> {
    skopeo(&["inspect", "--tls-verify=false", "--raw", reference]).into_bytes()
}

#[test]
fn skopeo_round_trip_preserves_digests() {
    let seed = run_seed();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_images(dir.path(), seed);
    let reg = Registry::start();
    let src = format!("oci:{}:amd64", layout.path.display());
    let dst = format!("docker://{}/team/app:1.0", reg.host());
    skopeo(&["copy", "--dest-tls-verify=false", &src, &dst]);

    let want = layout.descriptor("amd64");
    let got = raw(&dst);
    assert_eq!(sha256(&got), want["digest"], "manifest digest preserved");
    let inspect: Value =
        serde_json::from_str(&skopeo(&["inspect", "--tls-verify=false", &dst])).unwrap();
    assert_eq!(inspect["Digest"], want["digest"]);
    assert_eq!(inspect["Architecture"], "amd64");

    // Pull it back into a fresh layout: same manifest, same blobs.
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--src-tls-verify=false",
        &dst,
        &format!("oci:{}:copy", back.display()),
    ]);
    let back_layout = Layout { path: back };
    let d = back_layout.descriptor("copy");
    assert_eq!(d["digest"], want["digest"]);
    let manifest: Value =
        serde_json::from_slice(&back_layout.blob(d["digest"].as_str().unwrap())).unwrap();
    for layer in manifest["layers"].as_array().unwrap() {
        let digest = layer["digest"].as_str().unwrap();
        assert_eq!(
            back_layout.blob(digest),
            layout.blob(digest),
            "layer {digest}"
        );
    }

    // Docker schema 2 conversion on push, then tags listing through skopeo.
    let docker_dst = format!("docker://{}/team/app:docker", reg.host());
    skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        "--format",
        "v2s2",
        &src,
        &docker_dst,
    ]);
    let m: Value = serde_json::from_slice(&raw(&docker_dst)).unwrap();
    assert_eq!(
        m["mediaType"],
        "application/vnd.docker.distribution.manifest.v2+json"
    );
    let tags: Value = serde_json::from_str(&skopeo(&[
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/team/app", reg.host()),
    ]))
    .unwrap();
    assert_eq!(tags["Tags"], serde_json::json!(["1.0", "docker"]));
}

#[test]
fn skopeo_copy_all_multi_arch_index() {
    let seed = run_seed();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_images(dir.path(), seed);
    let index_digest = layout.add_index("multi", &[("amd64", "amd64"), ("arm64", "arm64")]);
    let reg = Registry::start();
    let dst = format!("docker://{}/multi/arch:latest", reg.host());
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.path.display()),
        &dst,
    ]);
    // The index and every platform manifest arrive byte for byte.
    let got = raw(&dst);
    assert_eq!(sha256(&got), index_digest);
    for arch in ["amd64", "arm64"] {
        let d = layout.descriptor(arch)["digest"]
            .as_str()
            .unwrap()
            .to_owned();
        let by_digest = format!("docker://{}/multi/arch@{d}", reg.host());
        assert_eq!(sha256(&raw(&by_digest)), d, "{arch}");
    }
    // And back out again with --all: the same index digest at the far end.
    let back = dir.path().join("back");
    skopeo(&[
        "copy",
        "--all",
        "--src-tls-verify=false",
        &dst,
        &format!("oci:{}:multi", back.display()),
    ]);
    let back_layout = Layout { path: back };
    assert_eq!(
        back_layout.descriptor("multi")["digest"],
        index_digest.as_str()
    );
}

#[test]
fn containerd_pulls_and_unpacks() {
    let seed = run_seed();
    let dir = tempfile::tempdir().unwrap();
    let layout = layout_with_images(dir.path(), seed);
    let index_digest = layout.add_index("multi", &[("amd64", "amd64"), ("arm64", "arm64")]);
    let reg = Registry::start();
    skopeo(&[
        "copy",
        "--all",
        "--dest-tls-verify=false",
        &format!("oci:{}:multi", layout.path.display()),
        &format!("docker://{}/edge/app:v1", reg.host()),
    ]);
    let ctd = Containerd::start();
    let image = format!("{}/edge/app:v1", reg.host());
    ctd.ctr(&[
        "image",
        "pull",
        "--plain-http",
        "--snapshotter",
        "native",
        "--platform",
        "linux/amd64",
        &image,
    ]);
    let list = ctd.ctr(&["image", "ls"]);
    assert!(
        list.contains(&image) && list.contains(&index_digest),
        "{list}"
    );
    // Unpacked: the snapshot holds the image's files.
    let check = ctd.ctr(&["image", "check"]);
    assert!(check.contains("complete"), "{check}");
    let snapshots = ctd.ctr(&["snapshot", "--snapshotter", "native", "ls"]);
    assert!(snapshots.lines().count() >= 2, "{snapshots}");
    let root = ctd
        .dir
        .path()
        .join("root/io.containerd.snapshotter.v1.native/snapshots");
    let found = std::fs::read_dir(&root)
        .unwrap()
        .filter_map(Result::ok)
        .any(|e| std::fs::read(e.path().join("etc/platform")).is_ok_and(|c| c == b"amd64"));
    assert!(
        found,
        "unpacked rootfs with etc/platform=amd64 under {}",
        root.display()
    );
}
