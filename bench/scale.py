#!/usr/bin/env python3
"""Outpost at scale against Debian's docker-registry (CNCF distribution 2.8), same content, same run.

Grows a store in steps (default 1,000, 2,000 and 4,000 repositories, so half, full and double
the issue's 2,000 x 10 tags), pushed over HTTP to both registries: every image is a small
unique config, a small unique layer and a layer from a shared pool (mounted into each
repository). At each size it measures, for both: the push rate of the step, tags list and
manifest GET latency (p50/p99), paging through the whole catalog at n=100, gc wall time and
peak RSS (servers stopped, as distribution's gc needs), restart-to-ready time and idle CPU
over a window; and for Outpost an eviction pass under --max-storage on a copy of the store
(docker-registry, holding the same content, is its parent). Prints every figure, the growth
from size to size and the ratios against docker-registry. Talks to 127.0.0.1 only; stops
every server it starts.

Usage: python3 bench/scale.py [--sizes 1000,2000,4000] [--tags 10] [--concurrency 8]
                              [--samples 400] [--paging-rounds 3] [--big-tags-per-repo 2]
                              [--idle-seconds 20] [--no-evict] [--evict-only] [--no-build]
                              [--json FILE]
"""

import argparse
import hashlib
import http.client
import json
import os
import queue
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.dont_write_bytecode = True  # no __pycache__ left in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, Server, cpu_seconds, free_port, run_bench  # noqa: E402  (bench/run.py: same helpers)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
POOL_REPO = "pool/base"
BIG_REPO = "big/tags"   # one repository whose tags grow with the store
POOL_SIZE = 32          # shared layers, 16 KiB each
POOL_BLOB = 16 << 10
LAYER = 1 << 10         # each image's own layer


def sha(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pct(values, p):
    v = sorted(values)
    return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]


def print_evict(e):
    print(f"eviction pass (limit {e['limit']} of {e['store_bytes']} bytes): {e['seconds']:.2f} s, "
          f"{e['images']} images ({e['per_image_ms']:.2f} ms each), {e['blobs']} blobs, "
          f"{e['bytes']} bytes; listings after it {e['listings']}; stock-taking at start, once "
          f"per store: {e['stock_seconds']:.2f} s over {e['stock_manifests']} manifests")


def evict_growth(a, b):
    """A pass evicts a share of the store, so its time grows with the images it evicts; the
    time per evicted image is what must not grow with the store."""
    return (f"eviction pass x{b['seconds'] / a['seconds']:.2f} for x{b['images'] / a['images']:.2f} "
            f"the images; per evicted image x{b['per_image_ms'] / a['per_image_ms']:.2f}")


def repo_name(i):
    # Two levels and a spread of first letters, so the catalog walks nested directories.
    return f"team-{i % 20:02d}/app-{i:05d}"


class Client:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, port):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def req(self, method, path, body=None, headers=None):
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, r.getheader("Location"), r.getheader("Link"), data
            except (http.client.HTTPException, ConnectionError):
                # The server closed a kept-alive connection: once more on a new one.
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def close(self):
        self.conn.close()


def upload(c, repo, data, digest):
    st, loc, _, body = c.req("POST", f"/v2/{repo}/blobs/uploads/", b"",
                             {"Content-Length": "0"})
    if st != 202:
        raise RuntimeError(f"POST upload {repo}: {st} {body[:200]!r}")
    if loc.startswith("http"):
        loc = "/" + loc.split("/", 3)[3]
    sep = "&" if "?" in loc else "?"
    st, _, _, body = c.req("PUT", f"{loc}{sep}digest={digest}", data,
                           {"Content-Type": "application/octet-stream",
                            "Content-Length": str(len(data))})
    if st != 201:
        raise RuntimeError(f"PUT upload {repo}: {st} {body[:200]!r}")


def mount(c, repo, digest):
    st, _, _, body = c.req("POST", f"/v2/{repo}/blobs/uploads/?mount={digest}&from={POOL_REPO}",
                           b"", {"Content-Length": "0"})
    if st != 201:
        raise RuntimeError(f"mount into {repo}: {st} {body[:200]!r}")


class Content:
    """The images, made on demand from their indexes (the same bytes for both registries)."""

    def __init__(self, tags):
        self.tags = tags
        self.pool = [hashlib.sha256(b"pool %d" % k).digest() * (POOL_BLOB // 32)
                     for k in range(POOL_SIZE)]
        self.pool_digests = [sha(b) for b in self.pool]

    def pool_of(self, r, t):
        return (r * 3 + t % 2) % POOL_SIZE

    def image(self, r, t):
        seed = hashlib.sha256(b"image %d %d" % (r, t)).digest()
        layer = (seed * (LAYER // 32))[:LAYER]
        pool = self.pool_of(r, t)
        config = json.dumps({
            "architecture": "amd64", "os": "linux", "created": "2026-12-07T00:00:00Z",
            "config": {"Labels": {"bench": f"{r}-{t}"}},
            "rootfs": {"type": "layers",
                       "diff_ids": [self.pool_digests[pool], sha(layer)]},
        }, separators=(",", ":")).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": sha(config), "size": len(config)},
            "layers": [
                {"mediaType": OCI_LAYER, "digest": self.pool_digests[pool], "size": POOL_BLOB},
                {"mediaType": OCI_LAYER, "digest": sha(layer), "size": len(layer)},
            ],
        }, separators=(",", ":")).encode()
        return config, layer, manifest


class Scale:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="outpost-scale-")
        self.servers = []
        self.content = Content(args.tags)
        self.results = {"sizes": [], "args": vars(args)}
        self.exe = None

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    # ---- servers ----

    def start_outpost(self, storage=None, extra=(), name="outpost"):
        port, admin = free_port(), free_port()
        cmd = [self.exe, "serve", "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}",
               "--storage", storage or self.path("outpost"), "--log-level", "warn"] + list(extra)
        s = Server(name, cmd, port)
        s.admin = admin
        self.servers.append(s)
        return s

    def start_distribution(self):
        port = free_port()
        cfg = (f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
               f"storage:\n  filesystem:\n    rootdirectory: {self.path('distribution')}\n"
               f"  delete:\n    enabled: true\n"
               f"http:\n  addr: 127.0.0.1:{port}\n")
        with open(self.path("distribution.yml"), "w") as f:
            f.write(cfg)
        s = Server("docker-registry", ["docker-registry", "serve", self.path("distribution.yml")],
                   port)
        self.servers.append(s)
        return s

    def stop(self, s):
        s.stop()
        if s in self.servers:
            self.servers.remove(s)

    def wait_ready(self, s, t0, timeout=120):
        """Seconds from t0 until GET /v2/ answers 200."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if s.proc.poll() is not None:
                raise RuntimeError(f"{s.name} exited ({s.proc.returncode})")
            try:
                c = http.client.HTTPConnection("127.0.0.1", s.port, timeout=2)
                c.request("GET", "/v2/")
                ok = c.getresponse().status == 200
                c.close()
                if ok:
                    return time.perf_counter() - t0
            except OSError:
                pass
            time.sleep(0.01)
        raise RuntimeError(f"{s.name} not ready in {timeout} s")

    # ---- pushes ----

    def push_pool(self, s):
        c = Client(s.port)
        try:
            for data, d in zip(self.content.pool, self.content.pool_digests):
                upload(c, POOL_REPO, data, d)
            # The pool repository needs a manifest to count as a repository for both.
            config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
            upload(c, POOL_REPO, config, sha(config))
            m = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                            "config": {"mediaType": OCI_CONFIG, "digest": sha(config),
                                       "size": len(config)},
                            "layers": [{"mediaType": OCI_LAYER, "digest": d, "size": POOL_BLOB}
                                       for d in self.content.pool_digests]}).encode()
            st, _, _, body = c.req("PUT", f"/v2/{POOL_REPO}/manifests/v1", m,
                                   {"Content-Type": OCI_MANIFEST})
            if st != 201:
                raise RuntimeError(f"pool manifest: {st} {body[:200]!r}")
        finally:
            c.close()

    def in_parallel(self, port, items, each):
        """Calls each(client, item) for every item over `concurrency` keep-alive connections,
        stopping at the first error (raised here); the wall time in seconds."""
        work = queue.Queue()
        for i in items:
            work.put(i)
        errors = []

        def worker():
            c = Client(port)
            try:
                while not errors:
                    try:
                        item = work.get_nowait()
                    except queue.Empty:
                        return
                    each(c, item)
            except Exception as e:  # reported by the main thread
                errors.append(e)
            finally:
                c.close()

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker) for _ in range(self.args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        if errors:
            raise errors[0]
        return wall

    def push_repos(self, s, first, last):
        """Pushes repositories [first, last) with `concurrency` connections; images per second."""

        def push(c, r):
            repo = repo_name(r)
            mounted = set()
            for t in range(self.args.tags):
                config, layer, manifest = self.content.image(r, t)
                pool = self.content.pool_digests[self.content.pool_of(r, t)]
                if pool not in mounted:
                    mount(c, repo, pool)
                    mounted.add(pool)
                upload(c, repo, config, sha(config))
                upload(c, repo, layer, sha(layer))
                st, _, _, body = c.req("PUT", f"/v2/{repo}/manifests/v{t}", manifest,
                                       {"Content-Type": OCI_MANIFEST})
                if st != 201:
                    raise RuntimeError(f"manifest {repo}:v{t}: {st} {body[:200]!r}")

        wall = self.in_parallel(s.port, range(first, last), push)
        return (last - first) * self.args.tags / wall, wall

    def push_big_tags(self, s, first, last):
        """Tags [first, last) of one repository, all on one image: a tags list that grows."""
        c = Client(s.port)
        try:
            if first == 0:
                config, layer, _ = self.content.image(-1, 0)
                upload(c, BIG_REPO, config, sha(config))
                upload(c, BIG_REPO, layer, sha(layer))
                mount(c, BIG_REPO, self.content.pool_digests[self.content.pool_of(-1, 0)])
        finally:
            c.close()
        manifest = self.content.image(-1, 0)[2]

        def tag(c, t):
            st, _, _, body = c.req("PUT", f"/v2/{BIG_REPO}/manifests/t{t:06d}", manifest,
                                   {"Content-Type": OCI_MANIFEST})
            if st != 201:
                raise RuntimeError(f"tag t{t:06d}: {st} {body[:200]!r}")

        self.in_parallel(s.port, range(first, last), tag)

    # ---- reads ----

    def latencies(self, s, repos):
        rnd = random.Random(7)
        c = Client(s.port)
        out = {"tags_ms": [], "manifest_ms": []}
        try:
            for _ in range(self.args.samples):
                r = rnd.randrange(repos)
                t0 = time.perf_counter()
                st, _, _, body = c.req("GET", f"/v2/{repo_name(r)}/tags/list")
                out["tags_ms"].append((time.perf_counter() - t0) * 1000)
                if st != 200 or len(json.loads(body)["tags"]) != self.args.tags:
                    raise RuntimeError(f"tags list of {repo_name(r)}: {st}")
                tag = rnd.randrange(self.args.tags)
                t0 = time.perf_counter()
                st, _, _, body = c.req("GET", f"/v2/{repo_name(r)}/manifests/v{tag}",
                                       headers={"Accept": OCI_MANIFEST})
                out["manifest_ms"].append((time.perf_counter() - t0) * 1000)
                if st != 200:
                    raise RuntimeError(f"manifest {repo_name(r)}:v{tag}: {st}")
        finally:
            c.close()
        return {k: {"p50": pct(v, 50), "p99": pct(v, 99)} for k, v in out.items()}

    def catalog(self, s, expected, url="/v2/_catalog?n=100", key="repositories"):
        """Median of --paging-rounds walks through every repository (or tag) at n=100."""
        runs = [self.page_through(s, expected, url, key) for _ in range(self.args.paging_rounds)]
        return {"seconds": statistics.median(r["seconds"] for r in runs),
                "pages": runs[0]["pages"], "rounds": [r["seconds"] for r in runs]}

    def page_through(self, s, expected, url, key):
        """Seconds to page through every name at n=100, following Link headers."""
        c = Client(s.port)
        names, pages = [], 0
        t0 = time.perf_counter()
        try:
            while url and pages <= expected:
                st, _, link, body = c.req("GET", url)
                if st != 200:
                    raise RuntimeError(f"{s.name} catalog: {st} {body[:200]!r}")
                names.extend(json.loads(body)[key])
                pages += 1
                url = None
                if link:
                    url = link.split(";")[0].strip().strip("<>")
                    if url.startswith("http"):
                        url = "/" + url.split("/", 3)[3]
        finally:
            c.close()
        wall = time.perf_counter() - t0
        # docker-registry 2.8 answers a tags list whole, unsorted, whatever n says: only
        # Outpost's order is checked.
        ordered = names == sorted(names) or s.name == "docker-registry"
        if len(set(names)) != expected or len(names) != expected or not ordered:
            raise RuntimeError(f"{s.name} {key}: {len(names)} names, {expected} expected, "
                               f"sorted: {names == sorted(names)}")
        return {"seconds": wall, "pages": pages}

    def timed(self, cmd):
        """Wall seconds and peak RSS (MiB) of a command. The peak is its VmHWM, read every
        10 ms until it exits (the last reading stands: rusage's ru_maxrss would count the
        Python process the child was forked from, before its exec)."""
        out = tempfile.TemporaryFile()
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
        hwm = 0
        while p.poll() is None:
            try:
                with open(f"/proc/{p.pid}/status") as f:
                    for line in f:
                        if line.startswith("VmHWM:"):
                            hwm = int(line.split()[1])
            except OSError:
                pass
            time.sleep(0.01)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            out.seek(0)
            raise RuntimeError(f"{cmd[:2]} failed: {out.read()[-2000:]!r}")
        return {"seconds": wall, "peak_rss_mib": hwm / 1024}

    def idle_cpu(self, s):
        """Share of one core the server used while idle, over --idle-seconds."""
        time.sleep(3)  # past start-up work
        c0, t0 = cpu_seconds(s.proc.pid), time.perf_counter()
        time.sleep(self.args.idle_seconds)
        return (cpu_seconds(s.proc.pid) - c0) / (time.perf_counter() - t0)

    def metric(self, s, name):
        c = Client(s.port)
        try:
            _, _, _, body = c.req("GET", "/metrics")
        finally:
            c.close()
        for line in body.decode().splitlines():
            if line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            if series == name:
                return float(value)
        return None

    def store_bytes(self, root):
        total = 0
        for dirpath, _, files in os.walk(os.path.join(root, "blobs")):
            for f in files:
                total += os.path.getsize(os.path.join(dirpath, f))
        return total

    def evict(self, parent_port):
        """One eviction pass of Outpost on a copy of its store, limit 95 % of the size: the
        pass (logged with its duration) and, before it, the one-time stock-taking of a store
        retention has not seen (logged too)."""
        copy = self.path("evict")
        shutil.rmtree(copy, ignore_errors=True)
        subprocess.run(["cp", "-a", self.path("outpost"), copy], check=True)
        try:
            os.remove(os.path.join(copy, "serve.lock"))
        except FileNotFoundError:
            pass
        size = self.store_bytes(copy)
        limit = size * 95 // 100
        conn = (f"ConnectedRegistryName=bench;SyncTokenName=u;SyncTokenPassword=p;"
                f"ParentGatewayEndpoint=127.0.0.1:{parent_port};ParentEndpointProtocol=http")
        log = self.path("evict.log")
        port, admin = free_port(), free_port()
        cmd = [self.exe, "serve", "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}", "--storage", copy,
               "--connection-string", conn, "--repository", "nothing/here",
               "--sync-schedule", "0 0 1 1 *", "--max-storage", str(limit),
               "--log-level", "info", "--log-format", "json"]
        s = Server("outpost-evict", cmd, port, log=log)
        self.servers.append(s)
        try:
            deadline, summary, stock = time.time() + 600, None, None
            while summary is None:
                if time.time() > deadline:
                    raise RuntimeError("no eviction pass within 600 s")
                if s.proc.poll() is not None:
                    raise RuntimeError(f"evicting Outpost exited ({s.proc.returncode})")
                time.sleep(0.2)
                with open(log) as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except ValueError:
                            continue
                        fields = rec.get("fields", rec)
                        message = str(fields.get("message", ""))
                        if message.startswith("evicted least recently"):
                            summary = fields
                        elif message.startswith("took stock of the store"):
                            stock = fields
            listings = {w: self.metric(s, f'outpost_storage_listings_total{{what="{w}"}}')
                        for w in ("blobs", "repositories")}
        finally:
            self.stop(s)
            shutil.rmtree(copy, ignore_errors=True)
        if stock is None:
            raise RuntimeError("no stock-taking logged before the pass")
        images = int(summary["images"])
        return {"seconds": float(summary["seconds"]), "images": images,
                "per_image_ms": 1000 * float(summary["seconds"]) / max(images, 1),
                "blobs": int(summary["blobs"]), "bytes": int(summary["bytes"]),
                "store_bytes": size, "limit": limit, "listings": listings,
                "stock_seconds": float(stock["seconds"]), "stock_manifests": int(stock["manifests"])}

    # ---- the run ----

    def measure(self, o, d, repos):
        n = repos + 2  # and the pool's and the one with many tags
        fig = {"repos": repos, "manifests": repos * self.args.tags}
        print("  latencies", file=sys.stderr)
        fig["latency"] = {"outpost": self.latencies(o, repos), "distribution": self.latencies(d, repos)}
        print("  catalog", file=sys.stderr)
        fig["catalog"] = {"outpost": self.catalog(o, n), "distribution": self.catalog(d, n)}
        big = repos * self.args.big_tags_per_repo
        tags_url = f"/v2/{BIG_REPO}/tags/list?n=100"
        fig["big_tags"] = {"tags": big,
                           "outpost": self.catalog(o, big, tags_url, "tags"),
                           "distribution": self.catalog(d, big, tags_url, "tags")}
        print("  gc (servers stopped)", file=sys.stderr)
        self.stop(o)
        self.stop(d)
        fig["gc"] = {
            "outpost": self.timed([self.exe, "gc", "--storage", self.path("outpost")]),
            "distribution": self.timed(["docker-registry", "garbage-collect",
                                        self.path("distribution.yml")]),
        }
        print("  restart and idle", file=sys.stderr)
        t0 = time.perf_counter()
        o = self.start_outpost()
        o_ready = self.wait_ready(o, t0)
        t0 = time.perf_counter()
        d = self.start_distribution()
        d_ready = self.wait_ready(d, t0)
        fig["ready_s"] = {"outpost": o_ready, "distribution": d_ready}
        fig["idle_cpu"] = {"outpost": self.idle_cpu(o), "distribution": self.idle_cpu(d)}
        fig["outpost_listings"] = {
            w: self.metric(o, f'outpost_storage_listings_total{{what="{w}"}}')
            for w in ("blobs", "repositories")}
        fig["blobs"] = sum(len(f) for _, _, f in os.walk(self.path("outpost", "blobs")))
        if not self.args.no_evict:
            print("  eviction pass", file=sys.stderr)
            fig["evict"] = self.evict(d.port)
        return o, d, fig

    def run(self):
        target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
        self.exe = os.path.join(target, "release", "outpost-registry")
        if not self.args.no_build:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry",
                            "--bin", "outpost-registry"], cwd=ROOT, check=True)
        if not shutil.which("docker-registry"):
            raise RuntimeError("docker-registry is missing: apt-get install docker-registry")
        sizes = [int(x) for x in self.args.sizes.split(",")]
        print(f"store in {self.tmp}; sizes {sizes} x {self.args.tags} tags", file=sys.stderr)
        if self.args.evict_only:
            return self.run_evict_only(sizes)
        o, d = self.start_outpost(), self.start_distribution()
        for s in (o, d):
            self.push_pool(s)
        done = 0
        for size in sizes:
            print(f"size {size}: pushing {size - done} repositories", file=sys.stderr)
            rate_o, wall_o = self.push_repos(o, done, size)
            rate_d, wall_d = self.push_repos(d, done, size)
            for s in (o, d):
                self.push_big_tags(s, done * self.args.big_tags_per_repo,
                                   size * self.args.big_tags_per_repo)
            done = size
            o, d, fig = self.measure(o, d, size)
            fig["push"] = {"outpost": {"images_per_s": rate_o, "seconds": wall_o},
                           "distribution": {"images_per_s": rate_d, "seconds": wall_d}}
            self.results["sizes"].append(fig)
            self.report_size(fig)
        self.report_growth()
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.results, f, indent=2)

    def run_evict_only(self, sizes):
        """Outpost alone: push, then an eviction pass at each size. Its parent is a closed
        port (an eviction needs one configured, never reached)."""
        o = self.start_outpost()
        self.push_pool(o)
        done = 0
        for size in sizes:
            print(f"size {size}: pushing {size - done} repositories to Outpost", file=sys.stderr)
            rate, wall = self.push_repos(o, done, size)
            done = size
            time.sleep(11)  # a fold of the size (every 10 s) before the copy
            e = self.evict(free_port())
            self.results["sizes"].append({"repos": size, "manifests": size * self.args.tags,
                                          "push": {"outpost": {"images_per_s": rate,
                                                               "seconds": wall}},
                                          "evict": e})
            print(f"\n== {size} repositories: Outpost push {rate:.0f} images/s")
            print_evict(e)
            sys.stdout.flush()
        r = self.results["sizes"]
        for a, b in zip(r, r[1:]):
            print(f"{a['repos']} -> {b['repos']}: " + evict_growth(a["evict"], b["evict"]))
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(self.results, f, indent=2)

    def report_size(self, f):
        o, d = "outpost", "distribution"
        print(f"\n== {f['repos']} repositories, {f['manifests']} manifests, {f['blobs']} blobs")
        rows = [
            ("push, images/s", f["push"][o]["images_per_s"], f["push"][d]["images_per_s"], "{:.0f}"),
            ("tags list p50 ms", f["latency"][o]["tags_ms"]["p50"], f["latency"][d]["tags_ms"]["p50"], "{:.2f}"),
            ("tags list p99 ms", f["latency"][o]["tags_ms"]["p99"], f["latency"][d]["tags_ms"]["p99"], "{:.2f}"),
            ("manifest GET p50 ms", f["latency"][o]["manifest_ms"]["p50"], f["latency"][d]["manifest_ms"]["p50"], "{:.2f}"),
            ("manifest GET p99 ms", f["latency"][o]["manifest_ms"]["p99"], f["latency"][d]["manifest_ms"]["p99"], "{:.2f}"),
            ("catalog, all pages at n=100, s", f["catalog"][o]["seconds"], f["catalog"][d]["seconds"], "{:.3f}"),
            (f"{f['big_tags']['tags']} tags, all pages at n=100, s", f["big_tags"][o]["seconds"],
             f["big_tags"][d]["seconds"], "{:.3f}"),
            ("gc wall s", f["gc"][o]["seconds"], f["gc"][d]["seconds"], "{:.2f}"),
            ("gc peak RSS MiB", f["gc"][o]["peak_rss_mib"], f["gc"][d]["peak_rss_mib"], "{:.1f}"),
            ("restart to ready s", f["ready_s"][o], f["ready_s"][d], "{:.3f}"),
            ("idle CPU, % of a core", 100 * f["idle_cpu"][o], 100 * f["idle_cpu"][d], "{:.2f}"),
        ]
        print(f"{'figure':34} {'Outpost':>12} {'docker-registry':>16} {'ratio':>8}")
        for name, a, b, fmt in rows:
            ratio = f"{a / b:.2f}" if b else "-"
            print(f"{name:34} {fmt.format(a):>12} {fmt.format(b):>16} {ratio:>8}")
        print(f"Outpost whole-store listings since its restart: {f['outpost_listings']}")
        if "evict" in f:
            print_evict(f["evict"])
        sys.stdout.flush()

    def report_growth(self):
        sizes = self.results["sizes"]
        if len(sizes) < 2:
            return
        print("\n== growth from size to size (time per figure; 2.0 = linear for a doubling)")
        for a, b in zip(sizes, sizes[1:]):
            k = b["repos"] / a["repos"]
            print(f"{a['repos']} -> {b['repos']} repositories (x{k:g}):")
            for who in ("outpost", "distribution"):
                cat = b["catalog"][who]["seconds"] / a["catalog"][who]["seconds"]
                tags = b["big_tags"][who]["seconds"] / a["big_tags"][who]["seconds"]
                gc = b["gc"][who]["seconds"] / a["gc"][who]["seconds"]
                rss = b["gc"][who]["peak_rss_mib"] / a["gc"][who]["peak_rss_mib"]
                idle = (b["idle_cpu"][who] / a["idle_cpu"][who]) if a["idle_cpu"][who] else float("nan")
                print(f"  {who:13} catalog paging x{cat:.2f}, tags paging x{tags:.2f}, gc x{gc:.2f}, "
                      f"gc RSS x{rss:.2f}, "
                      f"idle CPU x{idle:.2f}")
            if "evict" in a and "evict" in b:
                print("  " + evict_growth(a["evict"], b["evict"]))
            cat = b["catalog"]["outpost"]["seconds"] / a["catalog"]["outpost"]["seconds"]
            if k == 2:
                verdict = "PASS" if cat <= 2.2 else "MISS"
                print(f"  Outpost catalog paging at double size: x{cat:.2f} (target <= 2.2) {verdict}")

    def cleanup(self):
        for s in list(self.servers):
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,2000,4000",
                    help="repository counts to grow through (default half, full, double of 2,000)")
    ap.add_argument("--tags", type=int, default=10, help="tags (images) per repository")
    ap.add_argument("--concurrency", type=int, default=8, help="push connections")
    ap.add_argument("--big-tags-per-repo", type=int, default=2,
                    help="tags of big/tags per repository of the size (default 2: 4,000 at 2,000)")
    ap.add_argument("--samples", type=int, default=400, help="requests per latency figure")
    ap.add_argument("--paging-rounds", type=int, default=3,
                    help="walks through the catalog and the large tags list; median reported")
    ap.add_argument("--idle-seconds", type=float, default=20, help="idle CPU window")
    ap.add_argument("--no-evict", action="store_true", help="skip the eviction passes")
    ap.add_argument("--evict-only", action="store_true",
                    help="Outpost alone: pushes and an eviction pass at each size, nothing else")
    run_bench(ap, Scale)


if __name__ == "__main__":
    main()
