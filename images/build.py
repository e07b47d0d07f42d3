#!/usr/bin/env python3
"""Builds Outpost's container images as OCI image layouts, without a container engine.

Each image is two layers: a base shared by all three images (exactly the shared libraries `ldd`
lists for the binary plus the dynamic loader, /etc/ssl/certs/ca-certificates.crt, /etc/passwd
and /etc/group with the non-root user `outpost` (65532), /etc/nsswitch.conf, an empty /tmp; no
shell, no package manager) and the binary, stripped of debug info, at /usr/local/bin/<name>. The config runs as
65532:65532 with the binary as entrypoint. Layers are reproducible: sorted entries, owner 0,
fixed mtimes (SOURCE_DATE_EPOCH, default 0), gzip without a timestamp.

Usage (real images from release binaries; the tests use the debug ones):
  cargo build --release -p outpost-registry -p outpost-webhook -p outpost-node-agent
  python3 images/build.py --bin-dir target/release --out images/out --tag 0.1.0
  skopeo copy oci:images/out/outpost-registry:0.1.0 docker://REGISTRY/outpost/outpost-registry:0.1.0

Standard library only; needs `ldd` (glibc) on the build machine, whose libraries go in the image:
build on the oldest glibc you deploy to, or on the same distribution as the nodes run.
"""

import argparse
import gzip
import hashlib
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile

BINARIES = ("outpost-registry", "outpost-webhook", "outpost-node-agent")
UID = GID = 65532
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
DESCRIPTIONS = {
    "outpost-registry": "Outpost registry: a connected OCI registry for Kubernetes at the edge",
    "outpost-webhook": "Outpost admission webhook: rewrites pod images to the Outpost registry",
    "outpost-node-agent": "Outpost node agent: containerd trusts and mirrors through Outpost",
}


class BuildError(Exception):
    pass


def shared_libraries(binary):
    """Absolute paths `ldd` lists for `binary` (libraries and the loader), in its order."""
    try:
        out = subprocess.run(["ldd", binary], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise BuildError(f"ldd {binary}: {e}") from e
    paths = []
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise BuildError(f"{binary}: a shared library is missing: {line}")
        m = re.match(r"^\S+ => (/\S+) \(", line) or re.match(r"^(/\S+) \(", line)
        if m:
            paths.append(m.group(1))
        elif "statically linked" in line:
            return []
    return paths


class Layer:
    """A reproducible tar layer: files are added as (path in image, bytes or host file, mode)."""

    def __init__(self, mtime):
        self.mtime = mtime
        self.entries = {}  # path -> ("file", source, mode) | ("dir", None, mode)

    def add_dir(self, path, mode=0o755):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), ("dir", None, mode))

    def add_file(self, path, source, mode=0o644):
        path = path.strip("/")
        if "/" in path:
            self.add_dir(path.rsplit("/", 1)[0])
        self.entries[path] = ("file", source, mode)

    def add_tmp(self):
        self.entries["tmp"] = ("dir", None, 0o1777)

    def write(self, blobs, gzip_level):
        """Writes the gzip blob into `blobs`; returns (descriptor, diff_id)."""
        with tempfile.TemporaryFile(dir=blobs) as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in sorted(self.entries):
                    kind, source, mode = self.entries[path]
                    info = tarfile.TarInfo(path)
                    info.mtime, info.mode = self.mtime, mode
                    info.uid = info.gid = 0
                    info.uname = info.gname = "root"
                    if kind == "dir":
                        info.type = tarfile.DIRTYPE
                        tar.addfile(info)
                    elif isinstance(source, bytes):
                        info.size = len(source)
                        tar.addfile(info, io.BytesIO(source))
                    else:
                        # The resolved file, so a library symlink on the host becomes a file.
                        info.size = os.path.getsize(source)
                        with open(source, "rb") as f:
                            tar.addfile(info, f)
            raw.seek(0)
            diff_id = hashlib.sha256()
            compressed = tempfile.NamedTemporaryFile(dir=blobs, delete=False)
            os.chmod(compressed.name, 0o644)
            try:
                with compressed, gzip.GzipFile(filename="", fileobj=compressed, mode="wb",
                                               compresslevel=gzip_level, mtime=0) as gz:
                    for chunk in iter(lambda: raw.read(1 << 20), b""):
                        diff_id.update(chunk)
                        gz.write(chunk)
                digest, size = _file_digest(compressed.name)
                os.replace(compressed.name, os.path.join(blobs, digest.split(":")[1]))
            except BaseException:
                os.unlink(compressed.name)
                raise
        return ({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                 "digest": digest, "size": size}, "sha256:" + diff_id.hexdigest())


def _file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest(), os.path.getsize(path)


def _put_json(blobs, obj, media_type):
    data = json.dumps(obj, indent=2, sort_keys=True).encode()
    digest = hashlib.sha256(data).hexdigest()
    with open(os.path.join(blobs, digest), "wb") as f:
        f.write(data)
    return {"mediaType": media_type, "digest": "sha256:" + digest, "size": len(data)}


def base_layer(binary, mtime):
    layer = Layer(mtime)
    for lib in shared_libraries(binary):
        layer.add_file(lib, os.path.realpath(lib), 0o755)
    if not os.path.exists(CA_BUNDLE):
        raise BuildError(f"{CA_BUNDLE} is missing: install ca-certificates")
    layer.add_file(CA_BUNDLE, os.path.realpath(CA_BUNDLE))
    layer.add_file("/etc/passwd", b"root:x:0:0:root:/root:/sbin/nologin\n"
                   b"outpost:x:65532:65532:outpost:/nonexistent:/sbin/nologin\n")
    layer.add_file("/etc/group", b"root:x:0:\noutpost:x:65532:\n")
    # Name lookups through files then DNS, without glibc's NSS modules (built into libc).
    layer.add_file("/etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    layer.add_tmp()
    return layer


def stripped(binary, workdir):
    """A copy of `binary` without debug info (symbols stay, so panics still name functions)."""
    if not shutil.which("strip"):
        print("images/build.py: no `strip` (binutils): the binary keeps its debug info",
              file=sys.stderr)
        return binary
    copy = os.path.join(workdir, os.path.basename(binary))
    try:
        subprocess.run(["strip", "--strip-debug", "-o", copy, binary], check=True,
                       capture_output=True)
    except subprocess.CalledProcessError as e:
        raise BuildError(f"strip {binary}: {e.stderr.decode(errors='replace')}") from e
    return copy


def build(binary, out, tag, version, gzip_level, mtime, strip=True):
    """Writes the OCI layout `out/<name>` for `binary`, with `tag` as its ref name."""
    name = os.path.basename(binary)
    layout = os.path.join(out, name)
    shutil.rmtree(layout, ignore_errors=True)
    blobs = os.path.join(layout, "blobs", "sha256")
    os.makedirs(blobs)
    arch = ARCH.get(platform.machine())
    if not arch:
        raise BuildError(f"unsupported machine {platform.machine()}")

    base, base_diff = base_layer(binary, mtime).write(blobs, gzip_level)
    with tempfile.TemporaryDirectory(dir=layout) as work:
        app = Layer(mtime)
        app.add_file(f"/usr/local/bin/{name}", stripped(binary, work) if strip else binary, 0o755)
        app_desc, app_diff = app.write(blobs, gzip_level)

    labels = {"org.opencontainers.image.title": name,
              "org.opencontainers.image.description": DESCRIPTIONS.get(name, name),
              "org.opencontainers.image.version": version,
              "org.opencontainers.image.source": "https://github.com/outpost/outpost"}
    config = {
        "architecture": arch, "os": "linux",
        "config": {"User": f"{UID}:{GID}", "Entrypoint": [f"/usr/local/bin/{name}"],
                   "Env": ["PATH=/usr/local/bin", f"SSL_CERT_FILE={CA_BUNDLE}"],
                   "WorkingDir": "/", "Labels": labels},
        "rootfs": {"type": "layers", "diff_ids": [base_diff, app_diff]},
        "history": [{"created_by": "images/build.py: shared libraries, CA bundle, passwd"},
                    {"created_by": f"images/build.py: /usr/local/bin/{name}"}],
    }
    config_desc = _put_json(blobs, config, "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": config_desc, "layers": [base, app_desc],
                "annotations": {k: v for k, v in labels.items()
                                if k != "org.opencontainers.image.description"}}
    manifest_desc = _put_json(blobs, manifest, manifest["mediaType"])
    manifest_desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    manifest_desc["platform"] = {"architecture": arch, "os": "linux"}
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                   "manifests": [manifest_desc]}, f, indent=2)
    return layout, manifest_desc["digest"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bin-dir", default="target/release",
                        help="directory holding the built binaries (default: target/release)")
    parser.add_argument("--out", default="images/out", help="where the OCI layouts go")
    parser.add_argument("--tag", default="0.1.0", help="ref name of each image in its layout")
    parser.add_argument("--gzip-level", type=int, default=6, choices=range(1, 10))
    parser.add_argument("--no-strip", action="store_true",
                        help="keep the binaries' debug info (default: strip --strip-debug)")
    parser.add_argument("binaries", nargs="*", default=list(BINARIES),
                        help=f"which binaries (default: {' '.join(BINARIES)})")
    args = parser.parse_args()
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    try:
        for name in args.binaries:
            binary = os.path.join(args.bin_dir, name)
            if not os.access(binary, os.X_OK):
                raise BuildError(f"{binary} is not an executable: build it first")
            layout, digest = build(binary, args.out, args.tag, args.tag, args.gzip_level, mtime,
                                   not args.no_strip)
            print(f"{name}: oci:{layout}:{args.tag} {digest}")
    except (BuildError, OSError) as e:
        print(f"images/build.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
