#!/usr/bin/env python3
"""Outpost replicas on one Azure Blob container (Azurite): throughput behind a round-robin TCP
balancer, and how long a leader failover takes. Same run, same content, same two cores.

Throughput: manifest GET and blob GET with wrk through `outpost-balancer` (the suites'
round-robin TCP balancer, tests/src/balancer.rs, as a process) in front of 1 and of 3
`outpost-registry serve` processes sharing one container; baseline: the one replica directly,
without the balancer, interleaved with the others in every round.

Failover: 3 replicas with `--leader-election store` and a docker-registry parent behind a small
forwarding proxy in this script that timestamps every request it relays. The leader is killed
(SIGKILL), or in other rounds stopped (SIGTERM); measured: the time until the parent sees the
next request (the new leader's first sync request), and until another replica reports
`outpost_leader 1`. Baseline: a fresh replica's time from spawn to its first parent request
(a cold start, no lease to wait for), measured in the same run.

Prints every figure and the ratios. Talks to 127.0.0.1 only; stops every process it starts
(by PID).

Usage: python3 bench/ha.py [--no-build] [--exe PATH] [--balancer PATH] [--blob-mib 16]
                           [--rounds 2] [--wrk-seconds 10] [--connections 16]
                           [--lease-seconds 15] [--failovers 3] [--json FILE]
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import object_storage as objbench  # noqa: E402  (Azurite and its container)
import run as base  # noqa: E402  (the shared helpers of bench/run.py)

ROOT = base.ROOT
OCI_MANIFEST = base.OCI_MANIFEST
REPO = "bench/app"  # where base.Bench.push puts the image


def target_dir():
    return os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")


def get(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read().decode()


def leader_gauge(server):
    """outpost_leader from the replica's /metrics (a sample line, never the text around it);
    None when it does not answer."""
    try:
        text = get(f"{server.base}/metrics", timeout=2)
    except OSError:
        return None
    for labels, value in objbench.metric_samples(text, "outpost_leader"):
        if not labels:
            return value
    return None


def status(server):
    return json.loads(get(f"http://127.0.0.1:{server.admin}/outpost/v1/status"))


def wait(what, cond, timeout, every=0.05):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout} s")
        time.sleep(every)


class Relay:
    """A TCP relay in front of the parent that notes (monotonic time, request line) of every
    request a client sends: on a keep-alive connection each request starts a new send, and a
    sync's requests are small, so the start of a client's send is the start of a request."""

    METHOD = re.compile(rb"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS) (\S+) HTTP/1\.[01]\r\n")

    def __init__(self, upstream_port):
        self.upstream = upstream_port
        self.seen = []
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            up.settimeout(None)
            threading.Thread(target=self._pipe, args=(client, up, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(up, client, False), daemon=True).start()

    def _pipe(self, src, dst, requests):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if requests:
                    m = self.METHOD.match(data)
                    if m:
                        with self.lock:
                            self.seen.append((time.monotonic(), m.group(1).decode() + " "
                                              + m.group(2).decode()))
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def first_after(self, t):
        with self.lock:
            return next(((at, line) for at, line in self.seen if at > t), None)

    def count_between(self, t0, t1):
        with self.lock:
            return sum(1 for at, _ in self.seen if t0 <= at <= t1)

    def stop(self):
        self.stopped = True
        self.sock.close()


class HaBench(objbench.ObjectBench):
    def __init__(self, args):
        super().__init__(args)
        self.relay = None

    # ---- processes ----

    def storage_args(self, prefix):
        args = ["--storage", f"azblob://outpost/{prefix}"]
        for o in [f"account_name={objbench.ACCOUNT}", f"access_key={objbench.KEY}",
                  f"endpoint=http://127.0.0.1:{self.azurite.port}/{objbench.ACCOUNT}",
                  "allow_http=true"]:
            args += ["--storage-option", o]
        return args

    def replica(self, name, prefix, extra, port=None, admin=None):
        port, admin = port or base.free_port(), admin or base.free_port()
        cmd = [self.exe, "serve", "--listen", f"127.0.0.1:{port}",
               "--admin-listen", f"127.0.0.1:{admin}", "--log-level", "info"]
        cmd += self.storage_args(prefix) + extra
        s = base.Server(name, cmd, port, log=self.path(f"{name}.log"))
        s.admin, s.prefix, s.extra = admin, prefix, extra
        self.servers.append(s)
        return s

    def restart(self, s):
        """The same replica again (same ports, same store), after it ended."""
        self.servers.remove(s)
        s.log.close()
        os.rename(self.path(f"{s.name}.log"), self.path(f"{s.name}.{time.time():.0f}.log"))
        return self.replica(s.name, s.prefix, s.extra, s.port, s.admin)

    def balancer(self, name, backends):
        port = base.free_port()
        cmd = [self.balancer_exe, "--listen", f"127.0.0.1:{port}", "--stats-every", "0.5"]
        for b in backends:
            cmd += ["--backend", f"127.0.0.1:{b.port},{b.base}/readyz"]
        # It reads commands from standard input: never the terminal of whoever runs this.
        s = base.Server(name, cmd, port, log=self.path(f"{name}.log"), stdin=subprocess.DEVNULL)
        self.servers.append(s)
        # Connections are sent only to backends its probe found ready.
        wait(f"{name}: every backend ready",
             lambda: (st := self.balancer_stats(s)) is not None
             and len(st["backends"]) == len(backends)
             and all(b["ready"] for b in st["backends"]), 30)
        return s

    def balancer_stats(self, s):
        """The last stats line the balancer printed (--stats-every)."""
        with open(self.path(f"{s.name}.log"), "rb") as f:
            lines = [l for l in f.read().decode(errors="replace").splitlines()
                     if l.startswith("{")]
        return json.loads(lines[-1]) if lines else None

    # ---- throughput ----

    def wrk(self, url, what):
        cmd = ["wrk", "-t2", f"-c{self.args.connections}", f"-d{self.args.wrk_seconds}s",
               "--timeout", "20s", "-H", f"Accept: {OCI_MANIFEST}", url]
        out = base.run(cmd).stdout
        if "Non-2xx" in out or "Socket errors" in out:
            raise RuntimeError(f"wrk saw errors ({what}):\n{out}")
        return float([l for l in out.splitlines() if l.startswith("Requests/sec")][0].split()[1])

    def throughput(self):
        r1, r2, r3 = (self.replica(f"tput-{i}", "tput",
                                   ["--leader-election", "store"]) for i in range(3))
        self.push(r1)
        cases = {"direct": r1,
                 "balancer, 1 replica": self.balancer("balancer-1", [r1]),
                 "balancer, 3 replicas": self.balancer("balancer-3", [r1, r2, r3])}
        paths = {"manifest": f"/v2/{REPO}/manifests/v1",
                 "blob": f"/v2/{REPO}/blobs/{self.blob_digest}"}
        for s in cases.values():  # warm-up: caches, connections to Azurite
            for p in paths.values():
                req = urllib.request.Request(s.base + p, headers={"Accept": OCI_MANIFEST})
                with urllib.request.urlopen(req, timeout=60) as resp:
                    resp.read()
        raw = {k: {c: [] for c in cases} for k in paths}
        for rnd in range(self.args.rounds):
            for kind, p in paths.items():
                for case, s in cases.items():  # interleaved, so drift hits every case alike
                    v = self.wrk(s.base + p, f"{kind}, {case}")
                    raw[kind][case].append(v)
                    print(f"  round {rnd + 1} {kind:<8} {case:<21} {v:9.1f} req/s",
                          file=sys.stderr)
        spread = [b["connections"] for b in self.balancer_stats(cases["balancer, 3 replicas"])
                  ["backends"]]
        out = {"manifest_rps": {c: statistics.median(v) for c, v in raw["manifest"].items()},
               "blob_bytes_per_s": {c: statistics.median(v) * self.blob_size
                                    for c, v in raw["blob"].items()},
               "raw": raw, "connections_per_backend_3": spread}
        for s in (r1, r2, r3, *[cases[c] for c in cases if c != "direct"]):
            s.stop()
            self.servers.remove(s)
        return out

    # ---- failover ----

    def start_parent(self):
        port = base.free_port()
        cfg = (f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
               f"storage:\n  filesystem:\n    rootdirectory: {self.path('parent')}\n"
               f"http:\n  addr: 127.0.0.1:{port}\n")
        with open(self.path("parent.yml"), "w") as f:
            f.write(cfg)
        parent = base.Server("parent", ["docker-registry", "serve", self.path("parent.yml")], port)
        self.servers.append(parent)
        self.push(parent)
        self.relay = Relay(port)
        return parent

    def sync_args(self):
        conn = ("ConnectedRegistryName=bench;SyncTokenName=u;SyncTokenPassword=p;"
                f"ParentGatewayEndpoint=127.0.0.1:{self.relay.port};ParentEndpointProtocol=http")
        return ["--connection-string", conn, "--leader-election", "store",
                "--leader-lease-duration", f"{self.args.lease_seconds}s"]

    def one_leader(self, replicas, timeout):
        def check():
            g = [leader_gauge(r) for r in replicas]
            leaders = [r for r, v in zip(replicas, g) if v == 1]
            return leaders[0] if len(leaders) == 1 and None not in g else None
        return wait("exactly one leader", check, timeout)

    def synced(self, leader):
        """Waits until the leader's last run succeeded and none runs."""
        def done():
            s = status(leader)
            return not s.get("syncing") and (s.get("lastRun") or {}).get("result") == "success"
        wait(f"{leader.name}: a successful run", done, 120, every=0.1)

    def cold_starts(self):
        """Spawn → first request at the parent, for a replica alone on a fresh prefix."""
        out = []
        for i in range(self.args.failovers):
            t0 = time.monotonic()
            s = self.replica(f"cold-{i}", f"cold-{i}", self.sync_args())
            first = wait("the cold replica's first parent request",
                         lambda: self.relay.first_after(t0), 60, every=0.01)
            out.append(first[0] - t0)
            print(f"  cold start {i + 1}: first parent request {first[1]!r} after "
                  f"{out[-1]:.3f} s", file=sys.stderr)
            self.synced(s)
            s.stop()
            self.servers.remove(s)
        return out

    def failovers(self, sig):
        replicas = [self.replica(f"{sig.lower()}-{i}", f"failover-{sig.lower()}",
                                 self.sync_args()) for i in range(3)]
        lease = self.args.lease_seconds
        leader = self.one_leader(replicas, lease * 4)
        self.synced(leader)
        rounds = []
        for i in range(self.args.failovers):
            others = [r for r in replicas if r is not leader]
            time.sleep(1)  # quiet before the kill: its run ended, followers send nothing
            quiet = self.relay.count_between(time.monotonic() - 1, time.monotonic())
            gone = []
            t0 = time.monotonic()
            if sig == "KILL":
                leader.proc.kill()
            else:
                leader.proc.send_signal(signal.SIGTERM)
            waiter = threading.Thread(
                target=lambda p=leader.proc: (p.wait(timeout=60), gone.append(time.monotonic())))
            waiter.start()
            # Polled every 20 ms: the replica that reports it leads first.
            new = wait("a new leader", lambda: next(
                (r for r in others if leader_gauge(r) == 1), None), lease * 3 + 30, every=0.02)
            t_leader = time.monotonic() - t0
            first = wait("the new leader's first parent request",
                         lambda: self.relay.first_after(t0), lease * 3 + 30, every=0.01)
            t_first = first[0] - t0
            waiter.join()
            t_exit = gone[0] - t0
            rounds.append({"leader_s": t_leader, "first_request_s": t_first, "exit_s": t_exit,
                           "first_request": first[1], "requests_in_quiet_second": quiet})
            print(f"  SIG{sig} {i + 1}: {new.name} leads after {t_leader:.3f} s, first parent "
                  f"request {first[1]!r} after {t_first:.3f} s (old process gone after "
                  f"{t_exit:.3f} s; parent requests in the second before: {quiet})",
                  file=sys.stderr)
            self.synced(new)
            replicas[replicas.index(leader)] = self.restart(leader)
            wait("the restarted replica follows",
                 lambda: all(leader_gauge(r) is not None for r in replicas), 30)
            leader = self.one_leader(replicas, lease * 2)
        for r in replicas:
            r.stop()
            self.servers.remove(r)
        return rounds

    # ---- driver ----

    def run(self):
        rel = os.path.join(target_dir(), "release")
        self.exe = self.args.exe or os.path.join(rel, "outpost-registry")
        self.balancer_exe = self.args.balancer or os.path.join(rel, "outpost-balancer")
        if not self.args.no_build:
            if not self.args.exe:
                subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry",
                                "--bin", "outpost-registry"], cwd=ROOT, check=True)
            if not self.args.balancer:
                subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-e2e",
                                "--bin", "outpost-balancer"], cwd=ROOT, check=True)
        for tool in ["wrk", "curl", "docker-registry"]:
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is missing: apt-get install wrk curl docker-registry")
        for exe in (self.exe, self.balancer_exe):
            if not os.path.exists(exe):
                raise RuntimeError(f"{exe} is missing (build it, or drop --no-build)")
        load_before = os.getloadavg()[0]
        print(f"setting up in {self.tmp} ({self.args.blob_mib} MiB blob)", file=sys.stderr)
        self.make_content()
        self.start_azurite()
        print("throughput (wrk)", file=sys.stderr)
        tput = self.throughput()
        print("failover", file=sys.stderr)
        self.start_parent()
        cold = self.cold_starts()
        kill = self.failovers("KILL")
        term = self.failovers("TERM")
        self.results = {"throughput": tput, "cold_start_s": cold, "kill": kill, "term": term,
                        "lease_s": self.args.lease_seconds, "blob_mib": self.args.blob_mib,
                        "rounds": self.args.rounds, "wrk_seconds": self.args.wrk_seconds,
                        "connections": self.args.connections, "cpus": os.cpu_count(),
                        "load_average": [load_before, os.getloadavg()[0]]}
        self.report()

    def report(self):
        r = self.results
        t = r["throughput"]
        print(f"\nload average (1 min) {r['load_average'][0]:.2f} before, "
              f"{r['load_average'][1]:.2f} after; {r['cpus']} CPUs")
        print(f"\nthroughput (medians of {r['rounds']} rounds; wrk -t2 -c{r['connections']} "
              f"-d{r['wrk_seconds']}s; {r['blob_mib']} MiB blob)")
        for c, v in t["manifest_rps"].items():
            print(f"  manifest GET  {c:<21} {v:9.0f} req/s")
        for c, v in t["blob_bytes_per_s"].items():
            print(f"  blob GET      {c:<21} {v / 1e9:9.3f} GB/s")
        print(f"  connections per backend (3 replicas, whole run): "
              f"{t['connections_per_backend_3']}")
        med = statistics.median
        cold = med(r["cold_start_s"])
        print(f"\nfailover (lease {r['lease_s']} s; medians of {len(r['kill'])} rounds)")
        print(f"  cold start: spawn -> first parent request      {cold:7.3f} s  "
              f"{[round(x, 3) for x in r['cold_start_s']]}")
        for sig in ("kill", "term"):
            for k, what in (("leader_s", "-> another replica leads"),
                            ("first_request_s", "-> its first parent request")):
                xs = [x[k] for x in r[sig]]
                print(f"  SIG{sig.upper():<4} {what:<36} {med(xs):7.3f} s  "
                      f"{[round(x, 3) for x in xs]}")
        d, m, b = "direct", t["manifest_rps"], t["blob_bytes_per_s"]
        ratios = {
            "manifest GET, balancer + 1 replica / direct": m["balancer, 1 replica"] / m[d],
            "manifest GET, balancer + 3 replicas / direct": m["balancer, 3 replicas"] / m[d],
            "blob GET, balancer + 1 replica / direct": b["balancer, 1 replica"] / b[d],
            "blob GET, balancer + 3 replicas / direct": b["balancer, 3 replicas"] / b[d],
            "kill -9 failover / cold start": med(x["first_request_s"] for x in r["kill"]) / cold,
            "kill -9 failover / lease duration":
                med(x["first_request_s"] for x in r["kill"]) / r["lease_s"],
            "SIGTERM handover / cold start": med(x["first_request_s"] for x in r["term"]) / cold,
        }
        print("\nratios (baselines measured in this run: the replica directly; a cold start)")
        for name, v in ratios.items():
            print(f"  {name:<46} {v:6.2f}")
        r["ratios"] = ratios
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(r, f, indent=2)

    def cleanup(self):
        if self.relay:
            self.relay.stop()
        super().cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=16, help="blob size in MiB (default 16)")
    ap.add_argument("--rounds", type=int, default=2, help="wrk rounds per case; medians")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    ap.add_argument("--connections", type=int, default=16, help="wrk connections")
    ap.add_argument("--lease-seconds", type=int, default=15,
                    help="--leader-lease-duration of the replicas (default 15, serve's default)")
    ap.add_argument("--failovers", type=int, default=3,
                    help="kill -9 rounds, SIGTERM rounds and cold starts (each)")
    ap.add_argument("--exe", help="this outpost-registry binary instead of building one")
    ap.add_argument("--balancer", help="this outpost-balancer binary instead of building one")
    base.run_bench(ap, HaBench, binaries="binaries")


if __name__ == "__main__":
    main()
