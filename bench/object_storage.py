#!/usr/bin/env python3
"""Outpost on Azure Blob Storage (Azurite) beside Outpost on local disk, same content, same run.

Measures blob GET throughput and server CPU per GiB (Outpost's own CPU, and the emulator's
beside it), manifest GET requests/s with wrk, the wall time of pushing a set of images with
skopeo, and how many object-store requests one push and one pull cost (counted from Azurite's
access log, i.e. on the store's side, and from Outpost's own `outpost_storage_requests_total`
when the binary exports it). Prints every figure and the azblob/fs ratios. Talks to 127.0.0.1
only; stops every server it starts (by PID).

Usage: python3 bench/object_storage.py [--blob-mib 256] [--rounds 3] [--images 20]
                                       [--wrk-seconds 10] [--no-build] [--exe PATH]
                                       [--json FILE]
"""

import argparse
import base64
import collections
import email.utils
import hashlib
import hmac
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run as base  # noqa: E402  (the shared helpers of bench/run.py)

ROOT = base.ROOT
OCI_MANIFEST = base.OCI_MANIFEST
GIB = base.GIB
# Azurite's well-known development account (public, documented by Microsoft).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
ACCESS_LINE = re.compile(r'"(GET|HEAD|PUT|POST|DELETE|PATCH|OPTIONS) (\S+) HTTP/[0-9.]+" (\d+)')


def emulators_dir():
    return os.environ.get("OUTPOST_EMULATORS",
                          os.path.join(os.path.expanduser("~"), ".cache", "outpost-emulators"))


def create_container(port, name):
    """PUT ?restype=container, signed with the account's shared key."""
    date = email.utils.formatdate(usegmt=True)
    version = "2021-08-06"
    # urllib always sends a Content-Type with a body, and it is signed.
    ctype = "application/octet-stream"
    to_sign = (f"PUT\n\n\n\n\n{ctype}\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n"
               f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container")
    sig = base64.b64encode(hmac.new(base64.b64decode(KEY), to_sign.encode(), hashlib.sha256)
                           .digest()).decode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/{ACCOUNT}/{name}?restype=container", method="PUT", data=b"",
        headers={"x-ms-date": date, "x-ms-version": version, "Content-Type": ctype,
                 "Authorization": f"SharedKey {ACCOUNT}:{sig}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        if r.status >= 300:
            raise RuntimeError(f"create container: {r.status}")


def metric_samples(text, name):
    """(labels, value) of every sample line of `name` (never the HELP/TYPE lines)."""
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)", line)
        if m and m.group(1) == name:
            out.append((m.group(2) or "", float(m.group(3))))
    return out


class ObjectBench(base.Bench):
    def __init__(self, args):
        super().__init__(args)
        self.azurite_log = None
        self.nginx = None  # bench/run.py's blob_url asks; no nginx here

    # ---- setup ----

    def start_azurite(self):
        program = os.path.join(emulators_dir(), "azurite", "node_modules", ".bin", "azurite-blob")
        if not os.path.exists(program):
            raise RuntimeError(f"{program} is missing: tests/run.sh installs Azurite (npm)")
        port = base.free_port()
        self.azurite_log = self.path("azurite.log")
        cmd = [program, "--blobHost", "127.0.0.1", "--blobPort", str(port),
               "--location", self.path("azurite"), "--skipApiVersionCheck"]
        s = base.Server("azurite", cmd, port, log=self.azurite_log)
        self.servers.append(s)
        create_container(port, "outpost")
        self.azurite = s

    def start_registries(self, exe):
        def outpost(name, storage):
            port, admin = base.free_port(), base.free_port()
            cmd = [exe, "serve", "--listen", f"127.0.0.1:{port}",
                   "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "warn"] + storage
            s = base.Server(name, cmd, port)
            s.admin = admin
            self.servers.append(s)
            return s

        self.fs = outpost("outpost-fs", ["--storage", self.path("fs")])
        opts = [f"account_name={ACCOUNT}", f"access_key={KEY}",
                f"endpoint=http://127.0.0.1:{self.azurite.port}/{ACCOUNT}", "allow_http=true"]
        storage = ["--storage", "azblob://outpost/bench"]
        for o in opts:
            storage += ["--storage-option", o]
        self.az = outpost("outpost-azblob", storage)

    def make_image_set(self):
        """An OCI layout with `images` tags: a base layer shared by all, one own layer each."""
        layout = self.path("images")
        blobs = os.path.join(layout, "blobs", "sha256")
        os.makedirs(blobs)

        def put(data):
            d = hashlib.sha256(data).hexdigest()
            with open(os.path.join(blobs, d), "wb") as f:
                f.write(data)
            return {"digest": "sha256:" + d, "size": len(data)}

        with open(os.path.join(layout, "oci-layout"), "w") as f:
            json.dump({"imageLayoutVersion": "1.0.0"}, f)
        shared = put(os.urandom(self.args.shared_kib << 10))
        index = []
        for i in range(self.args.images + 2):  # two more for the request counts
            own = put(os.urandom(self.args.own_kib << 10))
            layers = [shared, own]
            config = put(json.dumps({
                "architecture": "amd64", "os": "linux",
                "rootfs": {"type": "layers", "diff_ids": [l["digest"] for l in layers]},
                "config": {"Env": [f"N={i}"]}}).encode())
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": dict(config, mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": [dict(l, mediaType="application/vnd.oci.image.layer.v1.tar")
                           for l in layers]}).encode()
            m = put(manifest)
            index.append(dict(m, mediaType=OCI_MANIFEST,
                              annotations={"org.opencontainers.image.ref.name": f"t{i}"}))
        with open(os.path.join(layout, "index.json"), "w") as f:
            json.dump({"schemaVersion": 2, "manifests": index}, f)
        self.layout = layout

    # ---- measurements ----

    def skopeo_push(self, server, tag, repo="bench/set"):
        base.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                  f"oci:{self.layout}:{tag}", f"docker://127.0.0.1:{server.port}/{repo}:{tag}"])

    def skopeo_pull(self, server, tag, repo="bench/set"):
        dest = tempfile.mkdtemp(dir=self.tmp)
        base.run(["skopeo", "copy", "--quiet", "--src-tls-verify=false",
                  f"docker://127.0.0.1:{server.port}/{repo}:{tag}", f"oci:{dest}:{tag}"])
        shutil.rmtree(dest)

    def push_set(self, server):
        t0 = time.perf_counter()
        for i in range(self.args.images):
            self.skopeo_push(server, f"t{i}")
        return time.perf_counter() - t0

    def cpu_per_gib(self, servers):
        """Blob GET samples with the CPU of every process in `servers` (Outpost and the store)."""
        target = servers[0]
        url = self.blob_url(target)
        n = self.args.gib_per_sample
        cmd = self.curl_base(target) + ["-o", "/dev/null", "-w", "%{size_download}\n", url]
        cpu0 = [base.cpu_seconds(s.proc.pid) for s in servers]
        t0 = time.perf_counter()
        total = 0
        for _ in range(n):
            total += int(base.run(cmd).stdout.strip())
        elapsed = time.perf_counter() - t0
        if total != n * self.blob_size:
            raise RuntimeError(f"{target.name}: got {total} bytes, wanted {n * self.blob_size}")
        cpus = [(base.cpu_seconds(s.proc.pid) - c) / (total / GIB) for s, c in zip(servers, cpu0)]
        return total / elapsed, cpus

    def blob_figures(self):
        sets = {"fs": [self.fs], "azblob": [self.az, self.azurite]}
        for s in sets.values():
            self.cpu_per_gib(s)  # warm-up
        raw = collections.defaultdict(lambda: {"tput": [], "cpu": [], "store_cpu": []})
        for _ in range(self.args.rounds):
            for name, s in sets.items():  # interleaved, so drift hits both alike
                tput, cpus = self.cpu_per_gib(s)
                raw[name]["tput"].append(tput)
                raw[name]["cpu"].append(cpus[0])
                raw[name]["store_cpu"].append(cpus[1] if len(cpus) > 1 else 0.0)
        return {k: {"bytes_per_s": statistics.median(v["tput"]),
                    "cpu_s_per_gib": statistics.median(v["cpu"]),
                    "store_cpu_s_per_gib": statistics.median(v["store_cpu"])}
                for k, v in raw.items()}

    def wrk_figures(self):
        out = {}
        for name, s in (("fs", self.fs), ("azblob", self.az)):
            out[name] = statistics.median(self.wrk(s) for _ in range(max(1, self.args.rounds // 2)))
        return out

    def azurite_requests(self):
        with open(self.azurite_log, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return [(m.group(1), m.group(2)) for m in map(ACCESS_LINE.search, lines) if m]

    def outpost_requests(self, server):
        try:
            with urllib.request.urlopen(f"{server.base}/metrics",
                                        timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None
        samples = metric_samples(text, "outpost_storage_requests_total")
        return {labels: v for labels, v in samples} if samples else None

    def counted(self, what, action):
        """Runs `action`, returns the store requests it caused, by method and by Outpost's op."""
        time.sleep(0.5)  # let Azurite flush the access lines of the previous step
        before = len(self.azurite_requests())
        before_ops = self.outpost_requests(self.az)
        action()
        time.sleep(0.5)
        after = self.azurite_requests()[before:]
        by_method = dict(collections.Counter(m for m, _ in after))
        after_ops = self.outpost_requests(self.az)
        ops = None
        if before_ops is not None and after_ops is not None:
            ops = {k: v - before_ops.get(k, 0) for k, v in after_ops.items()
                   if v - before_ops.get(k, 0) > 0}
        print(f"  {what}: {len(after)} store requests {by_method}", file=sys.stderr)
        return {"total": len(after), "by_method": by_method, "outpost_ops": ops}

    def request_counts(self):
        n = self.args.images
        return {
            # A new image whose shared base layer the registry already holds (the usual push).
            "push_new_image_base_present": self.counted(
                "push", lambda: self.skopeo_push(self.az, f"t{n}", "bench/counted")),
            "push_same_image_again": self.counted(
                "push again", lambda: self.skopeo_push(self.az, f"t{n}", "bench/counted")),
            "pull_image": self.counted(
                "pull", lambda: self.skopeo_pull(self.az, f"t{n}", "bench/counted")),
            "manifest_get": self.counted(
                "manifest GET", lambda: urllib.request.urlopen(urllib.request.Request(
                    f"{self.az.base}/v2/bench/counted/manifests/t{n}",
                    headers={"Accept": OCI_MANIFEST}), timeout=30).read()),
        }

    # ---- driver ----

    def run(self):
        exe = self.args.exe or os.path.join(ROOT, "target", "release", "outpost-registry")
        if not self.args.no_build and not self.args.exe:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry"],
                           cwd=ROOT, check=True)
        for tool in ["skopeo", "wrk", "curl"]:
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is missing: apt-get install skopeo wrk curl")
        print(f"setting up in {self.tmp} ({self.args.blob_mib} MiB blob, "
              f"{self.args.images} images)", file=sys.stderr)
        self.make_content()
        self.make_image_set()
        self.start_azurite()
        self.start_registries(exe)
        print("push of the image set", file=sys.stderr)
        push = {}
        for name, s in (("fs", self.fs), ("azblob", self.az)):
            push[name] = self.push_set(s)
        print("store requests per operation (azblob)", file=sys.stderr)
        counts = self.request_counts()
        for s in (self.fs, self.az):
            self.push(s)
        print("blob GET", file=sys.stderr)
        blobs = self.blob_figures()
        print("manifest GET", file=sys.stderr)
        man = self.wrk_figures()
        self.results = {"blob": blobs, "manifest_rps": man, "push_set_s": push,
                        "requests": counts, "blob_mib": self.args.blob_mib,
                        "images": self.args.images, "rounds": self.args.rounds,
                        "gib_per_sample": self.args.gib_per_sample}
        self.report()

    def report(self):
        r = self.results
        b, m, p = r["blob"], r["manifest_rps"], r["push_set_s"]
        print("\nraw figures (medians)")
        for name, v in b.items():
            store = (f", store (Azurite) {v['store_cpu_s_per_gib']:.3f} CPU s/GiB"
                     if name == "azblob" else "")
            print(f"  blob GET {name:<7} {v['bytes_per_s'] / 1e9:6.2f} GB/s   "
                  f"Outpost {v['cpu_s_per_gib']:.3f} CPU s/GiB{store}")
        for name, v in m.items():
            print(f"  manifest GET {name:<7} {v:9.0f} req/s")
        for name, v in p.items():
            print(f"  push of {r['images']} images {name:<7} {v:7.2f} s")
        print("\nobject-store requests (azblob, counted by Azurite)")
        for what, c in r["requests"].items():
            ops = f"; Outpost's counters {c['outpost_ops']}" if c["outpost_ops"] else ""
            print(f"  {what:<30} {c['total']:4d}  {c['by_method']}{ops}")
        ratios = {
            "blob GET throughput azblob/fs": b["azblob"]["bytes_per_s"] / b["fs"]["bytes_per_s"],
            "Outpost CPU per GiB azblob/fs": b["azblob"]["cpu_s_per_gib"] / b["fs"]["cpu_s_per_gib"],
            "manifest GET req/s azblob/fs": m["azblob"] / m["fs"],
            "image-set push time azblob/fs": p["azblob"] / p["fs"],
        }
        print("\nratios (fs measured in the same run is the baseline)")
        for name, v in ratios.items():
            print(f"  {name:<34} {v:6.2f}")
        r["ratios"] = ratios
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(r, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=256, help="blob size in MiB (default 256)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per measurement; medians")
    ap.add_argument("--gib-per-sample", type=int, default=2,
                    help="blob downloads per CPU sample")
    ap.add_argument("--images", type=int, default=20, help="images in the pushed set")
    ap.add_argument("--shared-kib", type=int, default=4096, help="base layer shared by the set")
    ap.add_argument("--own-kib", type=int, default=1024, help="each image's own layer")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--exe", help="this outpost-registry binary instead of building one")
    base.run_bench(ap, ObjectBench)


if __name__ == "__main__":
    main()
