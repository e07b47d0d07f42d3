#!/usr/bin/env python3
"""Builds the container images of Outpost's three binaries without a Docker engine: an OCI
image layout per binary, pushable with skopeo.

Each image is one layer on an empty base, distroless-style: the binary (stripped of debug
info) at /usr/local/bin, exactly the shared libraries `ldd` lists plus the dynamic loader,
the CA bundle (/etc/ssl/certs/ca-certificates.crt), an /etc/passwd and /etc/group with the
non-root user `nonroot` (65532), an empty /tmp; no shell. The config runs the binary as
65532:65532. Layers are reproducible: sorted entries, fixed owners and timestamps
(SOURCE_DATE_EPOCH, default 0).

Usage:
  cargo build --release --workspace --bins
  python3 images/build.py                       # layouts in target/images/<name>, tag = version
  skopeo copy oci:target/images/outpost-registry:0.1.0 docker://REGISTRY/outpost/outpost-registry:0.1.0

Options: --bin-dir DIR (default target/release), --out DIR, --tag TAG, --no-compress,
--only NAME (repeatable).
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ["outpost-registry", "outpost-webhook", "outpost-node-agent"]
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
UID = GID = 65532
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def version():
    with open(os.path.join(ROOT, "Cargo.toml")) as f:
        m = re.search(r'^version = "([^"]+)"', f.read(), re.M)
    return m.group(1) if m else "0.0.0"


def shared_libraries(binary):
    """Paths of the libraries and loader the dynamic linker resolves for `binary`."""
    out = subprocess.run(["ldd", binary], capture_output=True, text=True)
    if out.returncode != 0:
        if "not a dynamic executable" in (out.stdout + out.stderr):
            return []
        raise RuntimeError(f"ldd {binary}: {out.stderr}")
    libs = []
    for line in out.stdout.splitlines():
        line = line.strip()
        m = re.match(r"\S+ => (/\S+) \(", line) or re.match(r"(/\S+) \(", line)
        if m:
            libs.append(m.group(1))
        elif "=> not found" in line:
            raise RuntimeError(f"{binary}: {line}")
    return libs


class Layer:
    """An uncompressed tar built in memory with reproducible metadata."""

    def __init__(self, mtime):
        self.buf = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)
        self.mtime = mtime
        self.dirs = set()

    def _info(self, name, kind, mode, size=0):
        ti = tarfile.TarInfo(name.lstrip("/"))
        ti.type, ti.mode, ti.size, ti.mtime = kind, mode, size, self.mtime
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def dir(self, path, mode=0o755):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self.tar.addfile(self._info(d, tarfile.DIRTYPE, mode if i == len(parts) else 0o755))

    def file(self, path, data, mode=0o644):
        self.dir(os.path.dirname(path))
        self.tar.addfile(self._info(path, tarfile.REGTYPE, mode, len(data)), io.BytesIO(data))

    def close(self):
        self.tar.close()
        return self.buf.getvalue()


def read_binary(path, strip):
    if strip and shutil.which("strip"):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "bin")
            subprocess.run(["strip", "--strip-debug", "-o", out, path], check=True)
            with open(out, "rb") as f:
                return f.read()
    with open(path, "rb") as f:
        return f.read()


def write_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    return f"sha256:{digest}", len(data)


def build(name, bin_dir, out, tag, compress, strip, mtime):
    binary = os.path.join(bin_dir, name)
    if not os.path.isfile(binary):
        raise RuntimeError(f"{binary} is missing: cargo build --release --workspace --bins first")
    layer = Layer(mtime)
    # Sorted, so the same inputs always give the same layer.
    files = {f"/usr/local/bin/{name}": (read_binary(binary, strip), 0o755)}
    for lib in shared_libraries(binary):
        with open(lib, "rb") as f:  # follows symlinks: the image holds the real file
            files[lib] = (f.read(), 0o755)
    with open(CA_BUNDLE, "rb") as f:
        files[CA_BUNDLE] = (f.read(), 0o644)
    files["/etc/passwd"] = (b"root:x:0:0:root:/root:/sbin/nologin\n"
                            b"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n", 0o644)
    files["/etc/group"] = (b"root:x:0:\nnonroot:x:65532:\n", 0o644)
    layer.dir("/tmp", 0o1777)
    layer.dir("/home/nonroot", 0o700)
    for path in sorted(files):
        data, mode = files[path]
        layer.file(path, data, mode)
    tar = layer.close()
    diff_id = "sha256:" + hashlib.sha256(tar).hexdigest()
    if compress:
        blob = gzip.compress(tar, compresslevel=6, mtime=0)
        layer_type = "application/vnd.oci.image.layer.v1.tar+gzip"
    else:
        blob = tar
        layer_type = "application/vnd.oci.image.layer.v1.tar"
    layout = os.path.join(out, name)
    shutil.rmtree(layout, ignore_errors=True)
    os.makedirs(layout)
    layer_digest, layer_size = write_blob(layout, blob)
    created = "1970-01-01T00:00:00Z" if mtime == 0 else \
        __import__("datetime").datetime.fromtimestamp(mtime, __import__("datetime").timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    config = {
        "created": created,
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "User": f"{UID}:{GID}",
            "Entrypoint": [f"/usr/local/bin/{name}"],
            "Env": ["PATH=/usr/local/bin", f"SSL_CERT_FILE={CA_BUNDLE}"],
            "WorkingDir": "/",
            "Labels": {
                "org.opencontainers.image.title": name,
                "org.opencontainers.image.version": tag,
                "org.opencontainers.image.licenses": "Apache-2.0",
            },
        },
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": created, "created_by": "images/build.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_digest, config_size = write_blob(layout, config_bytes)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": layer_type, "digest": layer_digest, "size": layer_size}],
        "annotations": {"org.opencontainers.image.title": name},
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    manifest_digest, manifest_size = write_blob(layout, manifest_bytes)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest,
                                  "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"},
                                  "annotations": {"org.opencontainers.image.ref.name": tag}}]}, f)
    return layout, manifest_digest, layer_size


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", default=os.path.join(ROOT, "target", "release"),
                    help="where the built binaries are (default target/release)")
    ap.add_argument("--out", default=os.path.join(ROOT, "target", "images"),
                    help="where the OCI layouts go, one directory per image (default target/images)")
    ap.add_argument("--tag", default=version(), help="tag of each image (default: the workspace version)")
    ap.add_argument("--no-compress", action="store_true", help="uncompressed tar layers (faster)")
    ap.add_argument("--no-strip", action="store_true", help="keep debug info in the binaries")
    ap.add_argument("--only", action="append", choices=BINARIES, help="build only this image")
    a = ap.parse_args()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    for name in a.only or BINARIES:
        layout, digest, size = build(name, a.bin_dir, a.out, a.tag, not a.no_compress,
                                     not a.no_strip, mtime)
        print(f"{name}: oci:{layout}:{a.tag} {digest} (layer {size / (1 << 20):.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
