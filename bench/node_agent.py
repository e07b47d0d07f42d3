#!/usr/bin/env python3
"""The node agent with 50 upstream rules: how long a reconcile takes and how much memory the
running agent holds.

Reconcile time is what `outpost-node-agent reconcile` measures around its one pass (process
start excluded): the first pass on an empty root (52 files written, each fsynced and renamed,
its directory fsynced), passes with nothing to change, and passes after the CA rotates (one
file rewritten). Memory: `outpost-node-agent run` on the same root with a 100 ms input check
and a forced reconcile every second, sampled from /proc for --seconds; the peak (VmHWM) is
reported. Everything runs in a temp dir; the agent is stopped with SIGTERM and cleans up.

Usage: python3 bench/node_agent.py [--rules 50] [--passes 20] [--seconds 15] [--no-build] [--exe PATH]
"""

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import ROOT, free_port, rss_kib, wait_port  # noqa: E402

CA = "-----BEGIN CERTIFICATE-----\nMIIBbenchCA{n}\n-----END CERTIFICATE-----\n"


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", type=int, default=50, help="upstream rules (default 50)")
    ap.add_argument("--passes", type=int, default=20, help="timed passes per case (default 20)")
    ap.add_argument("--seconds", type=int, default=15, help="how long the running agent is sampled")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binary")
    ap.add_argument("--exe", help="measure this binary instead (e.g. an older build, to compare)")
    a = ap.parse_args()
    # cargo puts the binary under CARGO_TARGET_DIR when that is set.
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target")
    exe = os.path.join(target, "release", "outpost-node-agent")
    if a.exe:
        exe = os.path.abspath(a.exe)
    elif not a.no_build:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-node-agent"], cwd=ROOT,
                       check=True)
    tmp = tempfile.mkdtemp(prefix="outpost-agent-bench-")
    try:
        root = os.path.join(tmp, "root")
        os.makedirs(os.path.join(root, "etc/containerd"))
        with open(os.path.join(root, "etc/containerd/config.toml"), "w") as f:
            f.write('version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
                    '  config_path = "/etc/containerd/certs.d"\n')
        cfg = os.path.join(tmp, "outpost.toml")
        with open(cfg, "w") as f:
            f.write('registry = "outpost.local:5000"\n')
            for i in range(a.rules):
                f.write(f'[[rule]]\nupstream = "registry-{i:02d}.example.com"\n'
                        f'repositories = ["team-{i}/**"]\n')
        ca = os.path.join(tmp, "ca.crt")

        def write_ca(n):
            with open(ca, "w") as f:
                f.write(CA.format(n=n))

        def reconcile():
            out = subprocess.run([exe, "reconcile", "--config", cfg, "--ca-file", ca, "--root", root],
                                 capture_output=True, text=True, timeout=60)
            if out.returncode != 0:
                raise RuntimeError(f"reconcile failed: {out.stdout}{out.stderr}")
            m = re.search(r"(\d+) hosts configured.* in ([\d.]+) ms", out.stdout)
            return int(m.group(1)), float(m.group(2)), out.stdout.count("\nwrote ") + out.stdout.startswith("wrote ")

        cases = {"first pass (empty root, all files written)": [],
                 "no change": [], "CA rotated (1 file rewritten)": []}
        for i in range(a.passes):
            shutil.rmtree(os.path.join(root, "etc/containerd/certs.d"), ignore_errors=True)
            write_ca(0)
            hosts, ms, wrote = reconcile()
            cases["first pass (empty root, all files written)"].append(ms)
            _, ms, _ = reconcile()
            cases["no change"].append(ms)
            write_ca(i + 1)
            _, ms, _ = reconcile()
            cases["CA rotated (1 file rewritten)"].append(ms)
        print(f"{a.rules} rules: {hosts} hosts configured, {wrote} files written on the first pass")
        rows = []
        for name, v in cases.items():
            p95 = sorted(v)[max(0, int(len(v) * 0.95) - 1)]
            print(f"  {name:<46} median {statistics.median(v):7.2f} ms  p95 {p95:7.2f} ms  max {max(v):7.2f} ms")
            rows.append((f"reconcile, {name}, max", max(v), "<= 100 ms", max(v) <= 100))

        port = free_port()
        log = tempfile.TemporaryFile()
        proc = subprocess.Popen([exe, "run", "--config", cfg, "--ca-file", ca, "--root", root,
                                 "--no-label", "--cleanup-on-exit", "--listen", f"127.0.0.1:{port}",
                                 "--interval", "100ms", "--recheck-interval", "1s"],
                                stdout=log, stderr=log)
        try:
            wait_port(port, proc)
            samples = []
            end = time.time() + a.seconds
            while time.time() < end:
                samples.append(rss_kib(proc.pid))
                time.sleep(0.25)
            peak = hwm_kib(proc.pid)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        left = [p for p in os.listdir(os.path.join(root, "etc/containerd")) if p != "config.toml"]
        print(f"  running agent: RSS median {statistics.median(samples) / 1024:.1f} MiB, "
              f"peak (VmHWM) {peak / 1024:.1f} MiB over {a.seconds} s of 1 s forced reconciles; "
              f"exit {proc.returncode}, left after cleanup: {left or 'nothing'}")
        rows.append(("running agent peak RSS (MiB)", peak / 1024, "<= 16", peak / 1024 <= 16))
        print("ratios against targets")
        for name, value, target, ok in rows:
            print(f"  {name:<62} {value:8.2f}  target {target:<10} {'PASS' if ok else 'FAIL'}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
