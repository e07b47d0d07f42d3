#!/usr/bin/env python3
"""Sixteen clients pulling one uncached layer through Outpost, against one direct pull from
the parent, in the same run.

The parent (Debian's docker-registry) sits behind a site link: a network namespace this
script creates, joined to the host by a veth pair shaped with `tc tbf` to --link-mbit in each
direction (the slow link between a site and its cloud registry). Outpost and the clients run
on the host side; clients reach Outpost over loopback. With --link-mbit 0 everything is on
loopback (no namespace), which measures memory bandwidth rather than a link.

Each round: one `curl` of the layer straight from the parent (the baseline), then a fresh
Outpost with an empty store and 16 `curl`s of the same layer started at once through it. It
reports the wall time of both, their ratio (target <= 1.3), and the layer bytes the parent
served during the Outpost case, from its access log (target: exactly one copy). Afterwards it
checks the stored layer's digest with one more GET (a cache hit) and runs fsck.

Needs root for the namespace (ip, tc from iproute2), docker-registry and curl. Stops every
server and removes the namespace it made.

Usage: python3 bench/pull_through.py [--layer-mib 256] [--clients 16] [--link-mbit 800]
                                     [--rounds 3] [--no-build] [--json FILE]
"""

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.dont_write_bytecode = True  # no __pycache__ left in bench/
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, Server, free_port, run, run_bench  # noqa: E402  (bench/run.py: same helpers)
from sync import ACCESS, log_since, settle_log  # noqa: E402  (docker-registry's access log)

MIB = 1 << 20
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))
NS, VETH_HOST, VETH_NS = "outpost-bench", "vob-host", "vob-ns"
HOST_IP, NS_IP = "10.213.7.1", "10.213.7.2"


def request(method, url, data=None, headers=None):
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    with NO_PROXY.open(req, timeout=600) as r:
        return r.status, r.headers, r.read()


class PullThroughBench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="outpost-pt-bench-")
        self.servers = []
        self.netns = False

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    # ---- the site link ----

    def make_link(self):
        rate = f"{self.args.link_mbit}mbit"
        cmds = [
            ["ip", "netns", "add", NS],
            ["ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS],
            ["ip", "link", "set", VETH_NS, "netns", NS],
            ["ip", "addr", "add", f"{HOST_IP}/24", "dev", VETH_HOST],
            ["ip", "link", "set", VETH_HOST, "up"],
            ["ip", "netns", "exec", NS, "ip", "addr", "add", f"{NS_IP}/24", "dev", VETH_NS],
            ["ip", "netns", "exec", NS, "ip", "link", "set", VETH_NS, "up"],
            ["ip", "netns", "exec", NS, "ip", "link", "set", "lo", "up"],
            ["tc", "qdisc", "add", "dev", VETH_HOST, "root", "tbf", "rate", rate, "burst", "256kb",
             "latency", "50ms"],
            ["ip", "netns", "exec", NS, "tc", "qdisc", "add", "dev", VETH_NS, "root", "tbf", "rate",
             rate, "burst", "256kb", "latency", "50ms"],
        ]
        self.netns = True
        for c in cmds:
            run(c)

    def drop_link(self):
        if self.netns:
            subprocess.run(["ip", "netns", "del", NS], capture_output=True)
            subprocess.run(["ip", "link", "del", VETH_HOST], capture_output=True)
            self.netns = False

    # ---- the parent ----

    def start_parent(self):
        port = free_port()
        ip = NS_IP if self.args.link_mbit else "127.0.0.1"
        cfg = (f"version: 0.1\nlog:\n  level: error\n"
               f"storage:\n  filesystem:\n    rootdirectory: {self.path('parent')}\n"
               f"http:\n  addr: {ip}:{port}\n")
        with open(self.path("parent.yml"), "w") as f:
            f.write(cfg)
        cmd = ["docker-registry", "serve", self.path("parent.yml")]
        if self.args.link_mbit:
            cmd = ["ip", "netns", "exec", NS] + cmd
        self.parent = Server("docker-registry", cmd, port, host=ip)
        self.servers.append(self.parent)
        self.parent_host = f"{ip}:{port}"

    def push_layer(self):
        """A one-layer image whose layer is --layer-mib of random bytes, pushed over HTTP."""
        base = f"http://{self.parent_host}/v2/bench/big"
        layer = os.urandom(self.args.layer_mib * MIB)
        config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
        digests = []
        for data in (config, layer):
            d = "sha256:" + hashlib.sha256(data).hexdigest()
            _, h, _ = request("POST", f"{base}/blobs/uploads/", b"")
            loc = h["Location"]
            url = loc if loc.startswith("http") else f"http://{self.parent_host}{loc}"
            sep = "&" if "?" in url else "?"
            request("PUT", f"{url}{sep}digest={d}", data,
                    {"Content-Type": "application/octet-stream"})
            digests.append((d, len(data)))
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digests[0][0], "size": digests[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": digests[1][0], "size": digests[1][1]}],
        }).encode()
        request("PUT", f"{base}/manifests/v1", manifest, {"Content-Type": OCI_MANIFEST})
        self.digest, self.size = digests[1]

    def log_mark(self):
        return settle_log(self.parent.log)

    def layer_bytes_since(self, mark):
        text = log_since(self.parent.log, mark)
        total, gets = 0, 0
        for line in text.splitlines():
            m = ACCESS.match(line)
            if m and m.group(1) == "GET" and f"/blobs/{self.digest}" in m.group(2):
                gets += 1
                total += 0 if m.group(4) == "-" else int(m.group(4))
        return total, gets

    # ---- contenders ----

    def curls(self, url, n):
        """Starts n curls at once; returns the wall time until the last one ends."""
        t0 = time.perf_counter()
        procs = [subprocess.Popen(["curl", "-sf", "--noproxy", "*", "-o", "/dev/null", "-w",
                                   "%{size_download}", url], stdout=subprocess.PIPE)
                 for _ in range(n)]
        sizes = [int(p.communicate(timeout=600)[0] or 0) for p in procs]
        wall = time.perf_counter() - t0
        for p, s in zip(procs, sizes):
            if p.returncode != 0 or s != self.size:
                raise RuntimeError(f"curl {url}: exit {p.returncode}, {s} of {self.size} bytes")
        return wall

    def direct(self):
        return self.curls(f"http://{self.parent_host}/v2/bench/big/blobs/{self.digest}", 1)

    def through_outpost(self, exe):
        storage = self.path("outpost")
        port, admin = free_port(), free_port()
        conn = (f"ConnectedRegistryName=bench;SyncTokenName=u;SyncTokenPassword=p;"
                f"ParentGatewayEndpoint={self.parent_host};ParentEndpointProtocol=http")
        cmd = [exe, "serve", "--storage", storage, "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}", "--connection-string", conn,
               "--sync-schedule", "0 0 1 1 *", "--sync-window", "PT1M", "--log-level", "warn"]
        server = Server("outpost", cmd, port)
        self.servers.append(server)
        try:
            os.sync()
            mark = self.log_mark()
            url = f"{server.base}/v2/bench/big/blobs/{self.digest}"
            wall = self.curls(url, self.args.clients)
            upstream, gets = self.layer_bytes_since(mark)
            # Stored whole and correct: one more GET is served from the store.
            _, _, body = request("GET", url)
            stored = "sha256:" + hashlib.sha256(body).hexdigest() == self.digest
            after, _ = self.layer_bytes_since(mark)
        finally:
            server.stop()
            self.servers.remove(server)
        fsck = subprocess.run([exe, "fsck", "--storage", storage], capture_output=True, text=True,
                              timeout=600)
        shutil.rmtree(storage)
        if fsck.returncode != 0:
            raise RuntimeError(f"fsck: {fsck.stdout}{fsck.stderr}")
        if not stored or after != upstream:
            raise RuntimeError("the layer was not stored correctly by the pull-through")
        return {"wall_s": wall, "upstream_bytes": upstream, "upstream_gets": gets}

    # ---- driver ----

    def run(self):
        a = self.args
        exe = os.path.join(ROOT, "target", "release", "outpost-registry")
        if not a.no_build:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry"],
                           cwd=ROOT, check=True)
        for tool in ["docker-registry", "curl"] + (["ip", "tc"] if a.link_mbit else []):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is missing")
        if a.link_mbit:
            self.make_link()
        self.start_parent()
        self.push_layer()
        print(f"layer {self.digest} ({self.size} bytes) at {self.parent_host}"
              f"{f', link {a.link_mbit} Mbit/s' if a.link_mbit else ', loopback'}", file=sys.stderr)
        direct, outpost = [], []
        for rnd in range(1, a.rounds + 1):
            d = self.direct()
            o = self.through_outpost(exe)
            direct.append(d)
            outpost.append(o)
            print(f"round {rnd}: direct {d:.2f} s; {a.clients} clients through Outpost "
                  f"{o['wall_s']:.2f} s, parent served {o['upstream_bytes']} layer bytes in "
                  f"{o['upstream_gets']} GET(s)", file=sys.stderr)
        md, mo = statistics.median(direct), statistics.median(x["wall_s"] for x in outpost)
        worst_bytes = max((x["upstream_bytes"] for x in outpost),
                          key=lambda b: abs(b - self.size))
        rows = [
            (f"{a.clients} clients through Outpost / one direct pull (wall)", mo / md, "<= 1.3",
             mo / md <= 1.3),
            ("layer bytes from the parent / one copy (worst round)", worst_bytes / self.size,
             "== 1", all(x["upstream_bytes"] == self.size for x in outpost)),
            ("upstream GETs of the layer (every round)",
             max(x["upstream_gets"] for x in outpost), "== 1",
             all(x["upstream_gets"] == 1 for x in outpost)),
        ]
        d_all = ", ".join(f"{x:.2f}" for x in direct)
        o_all = ", ".join(f"{x['wall_s']:.2f}" for x in outpost)
        print(f"\nmedian wall: direct {md:.2f} s ({d_all}); through Outpost {mo:.2f} s ({o_all})")
        print("ratios against targets")
        for name, value, target, ok in rows:
            print(f"  {name:<58} {value:8.4f}  target {target:<6}  {'PASS' if ok else 'FAIL'}")
        if a.json:
            with open(a.json, "w") as f:
                json.dump({"layer_bytes": self.size, "clients": a.clients, "link_mbit": a.link_mbit,
                           "direct_s": direct, "outpost": outpost,
                           "ratios": [{"name": n, "value": v, "target": t, "pass": ok}
                                      for n, v, t, ok in rows]}, f, indent=2)

    def cleanup(self):
        for s in self.servers:
            s.stop()
        self.drop_link()
        shutil.rmtree(self.tmp, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer-mib", type=int, default=256, help="layer size in MiB (default 256)")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    ap.add_argument("--link-mbit", type=int, default=800,
                    help="site link rate in Mbit/s each way; 0 = plain loopback (default 800)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; medians reported (default 3)")
    run_bench(ap, PullThroughBench)


if __name__ == "__main__":
    main()
