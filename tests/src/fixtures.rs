//! Images the sync, pull-through and object-storage suites load into their parents.

use serde_json::Value;

use crate::oci::derive_image;
use crate::{Layout, pseudo_random};

/// A layout of related images (see [`content`]).
pub struct Content {
    _dir: tempfile::TempDir,
    pub layout: Layout,
    /// Digest of the image manifest tagged v1 in the layout.
    pub app_v1: String,
}

/// A layout with a base image, three images on top of it (v1, v2, v3, sharing its layer), an
/// arm64 image `arm` and a multi-arch index `multi` of amd64 (`base`) + arm64.
pub fn content(seed: u64) -> Content {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image(
        "base",
        "amd64",
        &[("base.bin", pseudo_random(seed, 512 * 1024))],
    );
    derive_image(
        &layout,
        "base",
        "v1",
        &[("app.bin", pseudo_random(seed + 1, 64 * 1024))],
    );
    derive_image(
        &layout,
        "base",
        "v2",
        &[("app.bin", pseudo_random(seed + 2, 64 * 1024))],
    );
    derive_image(
        &layout,
        "base",
        "v3",
        &[("app.bin", pseudo_random(seed + 4, 64 * 1024))],
    );
    layout.add_image(
        "arm",
        "arm64",
        &[("arm.bin", pseudo_random(seed + 3, 100 * 1024))],
    );
    layout.add_index("multi", &[("base", "amd64"), ("arm", "arm64")]);
    let app_v1 = layout.descriptor("v1")["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    Content {
        _dir: dir,
        layout,
        app_v1,
    }
}

/// A big single-layer image `big` in a fresh layout; returns (its dir, the layout, the layer's
/// digest, the layer's size).
pub fn big_image(seed: u64, size: usize) -> (tempfile::TempDir, Layout, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image("big", "amd64", &[("big.bin", pseudo_random(seed, size))]);
    let m: Value =
        serde_json::from_slice(&layout.blob(layout.descriptor("big")["digest"].as_str().unwrap()))
            .unwrap();
    let biggest = m["layers"]
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|l| l["size"].as_u64().unwrap())
        .unwrap()
        .clone();
    (
        dir,
        layout,
        biggest["digest"].as_str().unwrap().to_owned(),
        biggest["size"].as_u64().unwrap(),
    )
}
