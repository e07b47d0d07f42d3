//! A real Kubernetes for the suites: the project's Kubernetes 1.26 binaries (xz-compressed,
//! listed in `SHA256SUMS`, see `shared/k8s/README.md`) decompressed once into a cache outside
//! the work tree, and a control plane built from them ([`ControlPlane`]).
//!
//! Where the binaries come from: `$OUTPOST_K8S_BINARIES`, else the first `shared/k8s` found
//! beside the workspace or one of its parents (`../shared/k8s` for a clone in `/work/main`).
//! The cache: `$OUTPOST_K8S_CACHE`, else `$XDG_CACHE_HOME/outpost-k8s`, else
//! `~/.cache/outpost-k8s`; one directory per `SHA256SUMS` content, so new binaries never mix
//! with old ones.

pub mod control_plane;
pub mod node;

pub use control_plane::{ControlPlane, ControlPlaneOptions, Rest, StaticToken};

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The directory holding `SHA256SUMS` and the `*.xz` binaries.
pub fn binaries_source() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTPOST_K8S_BINARIES") {
        return PathBuf::from(d);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    for dir in workspace.ancestors() {
        let candidate = dir.join("shared/k8s");
        if candidate.join("SHA256SUMS").exists() {
            return candidate;
        }
    }
    panic!(
        "the Kubernetes binaries are missing: no shared/k8s/SHA256SUMS beside {} or a parent; \
         set OUTPOST_K8S_BINARIES to the directory holding SHA256SUMS and the *.xz files",
        workspace.display()
    );
}

fn cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("OUTPOST_K8S_CACHE") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("outpost-k8s");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(h).join(".cache/outpost-k8s");
    }
    std::env::temp_dir().join("outpost-k8s-cache")
}

/// `name -> sha256 hex` from SHA256SUMS.
fn sums(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let sum = parts.next()?;
            let name = parts.next()?.trim_start_matches('*');
            Some((name.to_string(), sum.to_ascii_lowercase()))
        })
        .collect()
}

fn file_sha256(path: &Path) -> String {
    let mut f =
        std::fs::File::open(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    ctx.finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Serialises decompression within one test binary (other processes are handled by the
/// temp-name-then-rename protocol).
static DECOMPRESS: Mutex<()> = Mutex::new(());

/// Path of the decompressed, checksum-verified Kubernetes binary `name` (`kube-apiserver`,
/// `kube-controller-manager`, `kube-scheduler`, `kubelet`). Decompressed on first use; a file in
/// the cache was verified before it was renamed into place, so its presence is the proof.
pub fn binary(name: &str) -> PathBuf {
    let source = binaries_source();
    let sums_text = std::fs::read_to_string(source.join("SHA256SUMS"))
        .unwrap_or_else(|e| panic!("cannot read {}/SHA256SUMS: {e}", source.display()));
    let expected = sums(&sums_text)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .unwrap_or_else(|| panic!("{name} is not listed in {}/SHA256SUMS", source.display()));
    let dir = cache_root().join(&crate::sha256_hex(sums_text.as_bytes())[..16]);
    let target = dir.join(name);
    if target.exists() {
        return target;
    }
    let _one = DECOMPRESS.lock().unwrap_or_else(|e| e.into_inner());
    if target.exists() {
        return target;
    }
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create the cache {}: {e}", dir.display()));
    // A name of our own: several test binaries may decompress at once; the last rename wins
    // and every candidate is complete and verified.
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let out = std::fs::File::create(&tmp)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
    let xz = source.join(format!("{name}.xz"));
    let status = Command::new(crate::require("xz"))
        .arg("-dc")
        .arg(&xz)
        .stdout(out)
        .status()
        .unwrap_or_else(|e| panic!("cannot run xz: {e}"));
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        panic!("xz -dc {} failed: {status}", xz.display());
    }
    let got = file_sha256(&tmp);
    if got != expected {
        let _ = std::fs::remove_file(&tmp);
        panic!("{name}: sha256 {got} does not match SHA256SUMS ({expected})");
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", tmp.display()));
    std::fs::rename(&tmp, &target)
        .unwrap_or_else(|e| panic!("cannot rename into {}: {e}", target.display()));
    target
}

/// A fresh random hex string (tokens, names).
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    aws_lc_rs::rand::fill(&mut b).expect("random bytes");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_parse_both_sha256sum_styles() {
        let s = sums("ab  kube-apiserver\nCD *kubelet\n\n");
        assert_eq!(
            s,
            vec![
                ("kube-apiserver".to_string(), "ab".to_string()),
                ("kubelet".to_string(), "cd".to_string())
            ]
        );
    }
}
