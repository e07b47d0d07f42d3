#!/usr/bin/env python3
"""Outpost syncing from a parent registry, against skopeo sync, same parent, same run.

Starts Debian's docker-registry (CNCF distribution 2.8) as the parent and pushes images built
offline with umoci that share base layers across images and repositories. Then, in rounds with
a fresh destination each time, times `skopeo sync --dest dir` of every repository and Outpost's
start-up sync run (from process start until the admin API reports the run's success), counts
the bytes each one fetched from the parent (docker-registry's access log: response body bytes
per request), checks what Outpost synced (manifest digests, fsck) and prints the ratios
against the targets. Talks to 127.0.0.1 only; stops every server it starts.

Usage: python3 bench/sync.py [--repos 10] [--tags 2] [--base-layers 3] [--base-mib 40]
                             [--repo-layer-mib 4] [--tag-layer-mib 2] [--rounds 3]
                             [--concurrency 4,8] [--skopeo-mode parallel] [--no-build] [--json FILE]
"""

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ left in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, Server, free_port, run, run_bench  # noqa: E402  (bench/run.py: same helpers)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MIB = 1 << 20
# docker-registry's access log (Combined Log Format on its stdout): method, path, status, size.
ACCESS = re.compile(r'^\S+ \S+ \S+ \[[^\]]*\] "(\S+) (\S+) [^"]*" (\d{3}) (\d+|-)')
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get(url, headers=None, timeout=5):
    req = urllib.request.Request(url, headers=headers or {})
    with NO_PROXY.open(req, timeout=timeout) as r:
        return r.read(), r.headers


def settle_log(log):
    """Waits for a server's log file (docker-registry writes its access log after each
    response) to stop growing, and returns its length."""
    fd = log.fileno()
    size, deadline = os.fstat(fd).st_size, time.time() + 5
    while time.time() < deadline:
        time.sleep(0.2)
        now = os.fstat(fd).st_size
        if now == size:
            break
        size = now
    return size


def log_since(log, mark):
    """What the log gained since `mark` (a length from settle_log), once it settled."""
    end = settle_log(log)
    return os.pread(log.fileno(), end - mark, mark).decode(errors="replace")


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MIB), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


class SyncBench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="outpost-sync-bench-")
        self.servers = []
        self.images = []  # (repository, tag)
        self.digests = {}  # (repository, tag) -> manifest digest in the layout
        self.results = {}

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    # ---- the parent and its content ----

    def layer_tar(self, name, mib):
        """An uncompressed layer archive holding one file of random (incompressible) bytes."""
        path = self.path("tars", name + ".tar")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as t:
            info = tarfile.TarInfo(f"data/{name}.bin")
            info.size, info.mtime, info.mode = mib * MIB, 0, 0o644
            t.addfile(info, io.BytesIO(os.urandom(mib * MIB)))
        return path

    def build_images(self):
        a, layout = self.args, self.path("layout")
        run(["umoci", "init", "--layout", layout])
        run(["umoci", "new", "--image", f"{layout}:base"])
        for i in range(a.base_layers):
            run(["umoci", "raw", "add-layer", "--image", f"{layout}:base",
                 self.layer_tar(f"base-{i}", a.base_mib)])
        for r in range(a.repos):
            repo = f"bench/app-{r:02d}"
            # One layer shared by the repository's tags, one of each tag's own.
            run(["umoci", "raw", "add-layer", "--image", f"{layout}:base", "--tag", f"app-{r:02d}",
                 self.layer_tar(f"app-{r:02d}", a.repo_layer_mib)])
            for t in range(1, a.tags + 1):
                run(["umoci", "raw", "add-layer", "--image", f"{layout}:app-{r:02d}",
                     "--tag", f"app-{r:02d}-v{t}", self.layer_tar(f"app-{r:02d}-v{t}", a.tag_layer_mib)])
                self.images.append((repo, f"v{t}"))
        shutil.rmtree(self.path("tars"))
        # Unique bytes: every distinct digest (manifests, configs, layers) of the pushed images.
        with open(os.path.join(layout, "index.json")) as f:
            index = {m["annotations"]["org.opencontainers.image.ref.name"]: m
                     for m in json.load(f)["manifests"]}
        blobs, manifests = {}, {}
        for repo, tag in self.images:
            m = index[f"app-{repo[-2:]}-{tag}"]
            manifests[m["digest"]] = m["size"]
            self.digests[(repo, tag)] = m["digest"]
            with open(os.path.join(layout, "blobs", "sha256", m["digest"][7:]), "rb") as f:
                man = json.load(f)
            for d in [man["config"]] + man["layers"]:
                blobs[d["digest"]] = d["size"]
        for d, size in list(blobs.items()) + list(manifests.items()):
            if os.path.getsize(os.path.join(layout, "blobs", "sha256", d[7:])) != size:
                raise RuntimeError(f"layout blob {d} does not have its declared size {size}")
        self.unique = {"manifests": sum(manifests.values()), "blobs": sum(blobs.values()),
                       "blob_count": len(blobs), "manifest_count": len(manifests)}
        self.unique["total"] = self.unique["manifests"] + self.unique["blobs"]
        # What a client that keeps no shared store (skopeo's dir:) has to fetch.
        self.per_image_total = 0
        for repo, tag in self.images:
            with open(os.path.join(layout, "blobs", "sha256", self.digests[(repo, tag)][7:]), "rb") as f:
                man = json.load(f)
            self.per_image_total += index[f"app-{repo[-2:]}-{tag}"]["size"]
            self.per_image_total += sum(d["size"] for d in [man["config"]] + man["layers"])

    def start_parent(self):
        port = free_port()
        cfg = (f"version: 0.1\nlog:\n  level: error\n"
               f"storage:\n  filesystem:\n    rootdirectory: {self.path('parent')}\n"
               f"  delete:\n    enabled: false\n"
               f"http:\n  addr: 127.0.0.1:{port}\n")  # access log on (the default): stdout
        with open(self.path("parent.yml"), "w") as f:
            f.write(cfg)
        self.parent = Server("docker-registry", ["docker-registry", "serve", self.path("parent.yml")],
                             port)
        self.servers.append(self.parent)
        self.parent_host = f"127.0.0.1:{port}"

    def push_images(self):
        layout = self.path("layout")
        for repo, tag in self.images:
            run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false",
                 f"oci:{layout}:app-{repo[-2:]}-{tag}", f"docker://{self.parent_host}/{repo}:{tag}"])
        for (repo, tag), digest in self.digests.items():
            _, h = http_get(f"{self.parent.base}/v2/{repo}/manifests/{tag}", {"Accept": OCI_MANIFEST})
            if h["Docker-Content-Digest"] != digest:
                raise RuntimeError(f"{repo}:{tag} has {h['Docker-Content-Digest']} at the parent, "
                                   f"{digest} in the layout: skopeo rewrote the manifest")

    # ---- bytes served by the parent ----

    def log_mark(self):
        return settle_log(self.parent.log)

    def served_since(self, mark):
        text = log_since(self.parent.log, mark)
        out = {"blobs": 0, "manifests": 0, "other": 0, "requests": 0, "blob_gets": 0,
               "kinds": {}}
        for line in text.splitlines():
            m = ACCESS.match(line)
            if not m:
                continue
            method, path, status, size = m.group(1), m.group(2), int(m.group(3)), m.group(4)
            size = 0 if size == "-" else int(size)
            kind = ("blob" if "/blobs/" in path else "manifest" if "/manifests/" in path
                    else "tags" if path.endswith("/tags/list") or "/tags/list?" in path
                    else "catalog" if "/_catalog" in path
                    else "referrers" if "/referrers/" in path else path.split("?")[0])
            key = f"{method} {kind} {status}"
            out["kinds"][key] = out["kinds"].get(key, 0) + 1
            out["requests"] += 1
            # Content is what 200/206 GETs of blobs and manifests carry; error bodies and
            # listings are "other".
            if method == "GET" and status in (200, 206) and kind == "blob":
                out["blobs"] += size
                out["blob_gets"] += 1
            elif method == "GET" and status in (200, 206) and kind == "manifest":
                out["manifests"] += size
            else:
                out["other"] += size
        out["total"] = out["blobs"] + out["manifests"] + out["other"]
        return out

    # ---- contenders ----

    def skopeo_round(self, dest):
        a, host = self.args, self.parent_host
        repos = sorted({r for r, _ in self.images})
        base = ["skopeo", "sync", "--src", "docker", "--dest", "dir", "--src-tls-verify=false"]
        if a.skopeo_mode == "yaml":
            with open(self.path("sync.yml"), "w") as f:
                f.write(f"{host}:\n  tls-verify: false\n  images:\n")
                for r in repos:
                    f.write(f"    {r}: []\n")
        os.sync()
        mark = self.log_mark()
        t0 = time.perf_counter()
        if a.skopeo_mode == "yaml":
            run(["skopeo", "sync", "--src", "yaml", "--dest", "dir", self.path("sync.yml"), dest])
        elif a.skopeo_mode == "per-repo":
            for r in repos:
                run(base + [f"{host}/{r}", dest])
        else:  # parallel: one process per repository, all at once
            errs = [tempfile.TemporaryFile() for _ in repos]  # a pipe could fill and stall
            procs = [subprocess.Popen(base + [f"{host}/{r}", dest], stdout=subprocess.DEVNULL,
                                      stderr=e) for r, e in zip(repos, errs)]
            deadline = time.time() + a.timeout
            try:
                for p, e in zip(procs, errs):
                    if p.wait(timeout=max(1, deadline - time.time())) != 0:
                        e.seek(0)
                        raise RuntimeError(f"skopeo sync failed: {e.read().decode(errors='replace')}")
            finally:
                for p in procs:  # only left running if one failed or timed out
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                for e in errs:
                    e.close()
        wall = time.perf_counter() - t0
        served = self.served_since(mark)
        # Every image is there, with the parent's manifest.
        for repo, tag in self.images:
            mf = os.path.join(dest, f"{repo.rsplit('/', 1)[1]}:{tag}", "manifest.json")
            if sha256_file(mf) != self.digests[(repo, tag)]:
                raise RuntimeError(f"skopeo's copy of {repo}:{tag} has another manifest")
        return {"wall_s": wall, "parent": served}

    def outpost_round(self, exe, concurrency, storage, log_copy=None):
        port, admin = free_port(), free_port()
        conn = (f"ConnectedRegistryName=bench;SyncTokenName=u;SyncTokenPassword=p;"
                f"ParentGatewayEndpoint={self.parent_host};ParentEndpointProtocol=http")
        cmd = [exe, "serve", "--storage", storage, "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}", "--connection-string", conn,
               "--repository", "bench/**", "--sync-schedule", "0 0 1 1 *",
               "--sync-concurrency", str(concurrency), "--log-level", self.args.log_level]
        os.sync()
        mark = self.log_mark()
        t0 = time.perf_counter()
        server = Server(f"outpost-c{concurrency}", cmd, port)  # waits for the API port
        self.servers.append(server)
        try:
            status, deadline = None, time.time() + self.args.timeout
            while True:
                try:
                    body, _ = http_get(f"http://127.0.0.1:{admin}/outpost/v1/status", timeout=2)
                    status = json.loads(body)
                except (OSError, ValueError):
                    status = None  # admin listener not up yet
                if status and not status.get("syncing") and (status.get("lastRun") or {}).get("result"):
                    break
                if time.time() > deadline:
                    raise RuntimeError(f"Outpost's sync did not finish in {self.args.timeout} s: {status}")
                if server.proc.poll() is not None:
                    raise RuntimeError(f"Outpost exited ({server.proc.returncode})")
                time.sleep(0.05)
            wall = time.perf_counter() - t0
            last = status["lastRun"]
            if last["result"] != "success":
                raise RuntimeError(f"Outpost's sync ended {last['result']}: {status.get('lastError')}")
            served = self.served_since(mark)
            metrics, _ = http_get(f"{server.base}/metrics")
            m = re.search(rb"^outpost_sync_bytes_downloaded_total (\d+)", metrics, re.M)
            metric = int(m.group(1)) if m else None
            checked = self.verify_outpost(server)
        finally:
            server.stop()
            self.servers.remove(server)
            if log_copy:
                server.log.seek(0)
                with open(log_copy, "wb") as f:
                    shutil.copyfileobj(server.log, f)
        fsck = subprocess.run([exe, "fsck", "--storage", storage], capture_output=True, text=True,
                              timeout=600)
        if fsck.returncode != 0:
            raise RuntimeError(f"fsck after Outpost's sync: {fsck.stdout}{fsck.stderr}")
        return {"wall_s": wall, "parent": served, "metric_bytes": metric,
                "run": {k: last.get(k) for k in ("bytesDownloaded", "blobsDownloaded",
                                                 "manifestsWritten")},
                "skopeo_checked": checked}

    def verify_outpost(self, server):
        """Every image's manifest digest at Outpost is the parent's; skopeo agrees for two."""
        for (repo, tag), digest in self.digests.items():
            body, h = http_get(f"{server.base}/v2/{repo}/manifests/{tag}", {"Accept": OCI_MANIFEST})
            got = "sha256:" + hashlib.sha256(body).hexdigest()
            if got != digest or h.get("Docker-Content-Digest") != digest:
                raise RuntimeError(f"Outpost serves {got} for {repo}:{tag}, the parent {digest}")
        checked = []
        for repo, tag in (self.images[0], self.images[-1]):
            digests = []
            for base in (self.parent_host, f"127.0.0.1:{server.port}"):
                raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false",
                                      f"docker://{base}/{repo}:{tag}"], capture_output=True,
                                     check=True, timeout=120).stdout
                digests.append("sha256:" + hashlib.sha256(raw).hexdigest())
            if digests[0] != digests[1] or digests[0] != self.digests[(repo, tag)]:
                raise RuntimeError(f"skopeo inspect --raw {repo}:{tag}: parent {digests[0]}, "
                                   f"Outpost {digests[1]}")
            checked.append(f"{repo}:{tag}")
        return checked

    # ---- driver ----

    def run(self):
        a = self.args
        exe = os.path.join(ROOT, "target", "release", "outpost-registry")
        if not a.no_build:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry"],
                           cwd=ROOT, check=True)
        for tool in ["docker-registry", "skopeo", "umoci"]:
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is missing: apt-get install docker-registry skopeo umoci")
        print(f"building {a.repos * a.tags} images in {self.tmp}", file=sys.stderr)
        self.build_images()
        self.start_parent()
        print(f"pushing them to docker-registry at {self.parent_host}", file=sys.stderr)
        self.push_images()
        logs = a.outpost_logs
        if logs:
            os.makedirs(logs, exist_ok=True)
        samples = {"skopeo": []}
        samples.update({f"outpost-c{c}": [] for c in a.concurrency})
        for rnd in range(1, a.rounds + 1):
            dest = self.path("skopeo-dest")
            os.makedirs(dest)
            s = self.skopeo_round(dest)
            shutil.rmtree(dest)
            samples["skopeo"].append(s)
            print(f"round {rnd}: skopeo sync ({a.skopeo_mode}) {s['wall_s']:.2f} s, "
                  f"{s['parent']['total'] / MIB:.1f} MiB from the parent", file=sys.stderr)
            for c in a.concurrency:
                storage = self.path("outpost")
                log = os.path.join(logs, f"outpost-c{c}-round{rnd}.log") if logs else None
                o = self.outpost_round(exe, c, storage, log)
                shutil.rmtree(storage)
                samples[f"outpost-c{c}"].append(o)
                print(f"round {rnd}: outpost -c{c} {o['wall_s']:.2f} s, "
                      f"{o['parent']['total'] / MIB:.1f} MiB from the parent", file=sys.stderr)
        self.results = {
            "images": len(self.images), "repositories": a.repos, "tags_per_repository": a.tags,
            "layers": {"base": [a.base_layers, a.base_mib], "repo_mib": a.repo_layer_mib,
                       "tag_mib": a.tag_layer_mib},
            "unique_bytes": self.unique, "per_image_bytes": self.per_image_total,
            "skopeo_mode": a.skopeo_mode, "rounds": a.rounds, "samples": samples,
            "median_wall_s": {k: statistics.median(x["wall_s"] for x in v) for k, v in samples.items()},
        }
        self.report()

    def report(self):
        r, u = self.results, self.unique
        mib = lambda n: f"{n / MIB:9.1f} MiB"
        print(f"\n{r['images']} images in {r['repositories']} repositories; unique bytes "
              f"{u['total']} ({mib(u['total']).strip()}: {u['blob_count']} blobs "
              f"{u['blobs']} + {u['manifest_count']} manifests {u['manifests']}); "
              f"per image, summed: {mib(r['per_image_bytes']).strip()}")
        print("\nraw figures (medians of wall time; bytes of the last round)")
        for name, v in r["samples"].items():
            last = v[-1]
            p = last["parent"]
            extra = ""
            if "metric_bytes" in last:
                extra = f", outpost_sync_bytes_downloaded_total {last['metric_bytes']}"
            walls = ", ".join(f"{x['wall_s']:.2f}" for x in v)
            print(f"  {name:<11} {r['median_wall_s'][name]:7.2f} s  ({walls})  parent served "
                  f"{p['total']} bytes ({mib(p['total']).strip()}; blobs {p['blobs']} in "
                  f"{p['blob_gets']} GETs, manifests {p['manifests']}, other {p['other']}; "
                  f"{p['requests']} requests){extra}")
            print("              requests: " + ", ".join(f"{k} x{n}" for k, n in sorted(p["kinds"].items())))
        print(f"  checked after each Outpost run: all {r['images']} manifest digests over HTTP, "
              f"skopeo inspect --raw of {' and '.join(self.checked_names())}, fsck clean")
        rows = []  # (name, value, target text, pass)
        skopeo = r["median_wall_s"]["skopeo"]
        outposts = [n for n in r["samples"] if n != "skopeo"]
        for name in outposts:
            ratio = r["median_wall_s"][name] / skopeo
            rows.append((f"{name} wall time / skopeo sync's", ratio, "<= 0.5", ratio <= 0.5))
        for name in outposts:
            v = r["samples"][name]
            # Every round must fetch exactly the unique bytes; the figure is the worst round.
            got = [x["parent"]["blobs"] + x["parent"]["manifests"] for x in v]
            worst = max(got, key=lambda g: abs(g - u["total"]))
            rows.append((f"{name} bytes from the parent / unique", worst / u["total"], "== 1",
                         all(g == u["total"] for g in got)))
            metric = [x["metric_bytes"] or 0 for x in v]
            worst = max(metric, key=lambda g: abs(g - u["blobs"]))
            rows.append((f"{name} sync metric / unique blob bytes", worst / u["blobs"], "== 1",
                         all(g == u["blobs"] for g in metric)))
        print(f"\n  skopeo sync fetched {r['samples']['skopeo'][-1]['parent']['total'] / u['total']:.2f}x "
              "the unique bytes (dir: keeps one copy per image)")
        print("\nratios against targets")
        verdict = {}
        for name, value, target, ok in rows:
            verdict[name] = {"value": value, "target": target, "pass": ok}
            print(f"  {name:<50} {value:8.4f}  target {target:<6}  {'PASS' if ok else 'FAIL'}")
        r["ratios"] = verdict
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(r, f, indent=2)

    def checked_names(self):
        for v in self.results["samples"].values():
            if v and "skopeo_checked" in v[-1]:
                return v[-1]["skopeo_checked"]
        return []

    def cleanup(self):
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repos", type=int, default=10, help="repositories at the parent (default 10)")
    ap.add_argument("--tags", type=int, default=2, help="tags (images) per repository (default 2)")
    ap.add_argument("--base-layers", type=int, default=3, help="base layers shared by every image")
    ap.add_argument("--base-mib", type=int, default=40, help="MiB of random bytes per base layer")
    ap.add_argument("--repo-layer-mib", type=int, default=4,
                    help="MiB of the layer shared by one repository's tags (default 4)")
    ap.add_argument("--tag-layer-mib", type=int, default=2,
                    help="MiB of each image's own layer (default 2)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per contender; medians reported")
    ap.add_argument("--concurrency", default="4,8",
                    help="Outpost --sync-concurrency values, comma-separated (default 4,8)")
    ap.add_argument("--skopeo-mode", choices=["parallel", "yaml", "per-repo"], default="parallel",
                    help="one skopeo sync --src docker per repository, all at once (default: "
                         "the fastest here); one --src yaml listing every repository; or one "
                         "--src docker per repository in turn")
    ap.add_argument("--log-level", default="warn", help="Outpost's --log-level (default warn)")
    ap.add_argument("--outpost-logs", help="keep each Outpost run's log in this directory")
    ap.add_argument("--timeout", type=int, default=600, help="longest wait for one sync (s)")

    def make(a):
        a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
        return SyncBench(a)

    run_bench(ap, make)


if __name__ == "__main__":
    main()
