#!/usr/bin/env python3
"""Outpost against Debian's docker-registry (CNCF distribution 2.8), same content, same run.

Measures blob GET throughput and server CPU per GiB (plain and TLS, nginx sendfile beside as
the zero-copy limit), manifest GET requests/s with wrk, Outpost's RSS under 8 concurrent
1 GiB streams, and the cost of authentication on manifest GET over TLS. Prints every figure
and its ratio against the targets. Talks to 127.0.0.1 only; stops every server it starts.

Usage: python3 bench/run.py [--blob-mib 1024] [--rounds 5] [--gib-per-sample 4]
                            [--wrk-seconds 10] [--no-build] [--json FILE]
"""

import argparse
import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CLK_TCK = os.sysconf("SC_CLK_TCK")
GIB = 1 << 30


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600, **kw)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line; 12 and 13 after the name.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def wait_port(port, proc, timeout=30, host="127.0.0.1"):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early ({proc.returncode}): {proc.args}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} never opened: {proc.args}")


class Server:
    def __init__(self, name, cmd, port, scheme="http", cwd=None, host="127.0.0.1", log=None,
                 stdin=None):
        self.name, self.port, self.scheme, self.host = name, port, scheme, host
        # A named log when the caller reads it (e.g. an access log), else an anonymous one.
        self.log = open(log, "wb") if log else tempfile.TemporaryFile()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, cwd=cwd, stdin=stdin)
        try:
            wait_port(port, self.proc, host=host)
        except BaseException:
            self.stop()  # not yet in Bench.servers, so cleanup() would not see it
            raise

    @property
    def base(self):
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = tempfile.mkdtemp(prefix="outpost-bench-")
        self.servers = []
        self.results = {}

    def path(self, *p):
        return os.path.join(self.tmp, *p)

    def curl_base(self, server, auth=None):
        cmd = ["curl", "-sS", "--fail", "--noproxy", "*"]
        if server.scheme == "https":
            cmd += ["--cacert", self.path("ca.crt")]
        if auth:
            cmd += ["-u", auth]
        return cmd

    # ---- setup ----

    def make_pki(self):
        p = self.path
        run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-days", "2", "-subj", "/CN=bench-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", p("ca.key"), "-out", p("ca.crt")])
        run(["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", "/CN=127.0.0.1", "-keyout", p("tls.key"), "-out", p("tls.csr")])
        with open(p("ext.cnf"), "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                    "extendedKeyUsage=serverAuth\n")
        run(["openssl", "x509", "-req", "-days", "2", "-in", p("tls.csr"), "-CA", p("ca.crt"),
             "-CAkey", p("ca.key"), "-CAcreateserial", "-extfile", p("ext.cnf"),
             "-out", p("tls.crt")])

    def make_content(self):
        size = self.args.blob_mib << 20
        h = hashlib.sha256()
        with open(self.path("blob"), "wb") as f:
            left = size
            while left:
                chunk = os.urandom(min(left, 8 << 20))
                h.update(chunk)
                f.write(chunk)
                left -= len(chunk)
        self.blob_size = size
        self.blob_digest = "sha256:" + h.hexdigest()
        self.config = b"{}"
        self.config_digest = "sha256:" + hashlib.sha256(self.config).hexdigest()
        self.manifest = json.dumps({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.config_digest, "size": len(self.config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": self.blob_digest, "size": size}],
        }).encode()
        with open(self.path("manifest.json"), "wb") as f:
            f.write(self.manifest)
        with open(self.path("config.json"), "wb") as f:
            f.write(self.config)
        os.makedirs(self.path("www"))
        os.link(self.path("blob"), self.path("www", "blob"))

    def make_tokens(self, exe):
        tokens = self.path("tokens.toml")
        run([exe, "scope-map", "create", "--tokens", tokens, "--name", "bench",
             "--repository", "**", "content/read", "content/write", "metadata/read"])
        out = run([exe, "token", "create", "--tokens", tokens, "--name", "bench",
                   "--scope-map", "bench", "-o", "json"]).stdout
        self.password = json.loads(out)["password1"]
        return tokens

    def start_servers(self, exe):
        p = self.path
        tls = ["--tls-cert", p("tls.crt"), "--tls-key", p("tls.key")]

        def outpost(name, extra, scheme):
            port = free_port()
            cmd = [exe, "serve", "--listen", f"127.0.0.1:{port}",
                   "--admin-listen", f"127.0.0.1:{free_port()}",
                   "--storage", p(name), "--log-level", "warn"] + extra
            s = Server(name, cmd, port, scheme)
            self.servers.append(s)
            return s

        def distribution(name, tls_on):
            port = free_port()
            cfg = (f"version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
                   f"storage:\n  filesystem:\n    rootdirectory: {p(name)}\n"
                   f"http:\n  addr: 127.0.0.1:{port}\n")
            if tls_on:
                cfg += f"  tls:\n    certificate: {p('tls.crt')}\n    key: {p('tls.key')}\n"
            with open(p(name + ".yml"), "w") as f:
                f.write(cfg)
            s = Server(name, ["docker-registry", "serve", p(name + ".yml")], port,
                       "https" if tls_on else "http")
            self.servers.append(s)
            return s

        self.o_plain = outpost("outpost-plain", [], "http")
        self.o_tls = outpost("outpost-tls", tls, "https")
        self.o_auth = outpost("outpost-tls-auth", tls + ["--tokens", self.make_tokens(exe)], "https")
        self.d_plain = distribution("distribution-plain", False)
        self.d_tls = distribution("distribution-tls", True)
        port = free_port()
        os.makedirs(p("nginx"))
        with open(p("nginx.conf"), "w") as f:
            f.write(f"worker_processes 1;\ndaemon off;\nmaster_process off;\n"
                    f"pid {p('nginx', 'nginx.pid')};\nerror_log {p('nginx', 'error.log')};\n"
                    f"events {{ worker_connections 64; }}\n"
                    f"http {{\n  access_log off;\n  sendfile on;\n  tcp_nopush on;\n"
                    f"  client_body_temp_path {p('nginx')};\n"
                    f"  server {{ listen 127.0.0.1:{port}; root {p('www')}; }}\n}}\n")
        self.nginx = Server("nginx", ["nginx", "-c", p("nginx.conf"), "-p", p("nginx")], port)
        self.servers.append(self.nginx)

    def push(self, server, auth=None):
        base, repo = server.base, "bench/app"
        curl = self.curl_base(server, auth)
        for path, digest in [(self.path("blob"), self.blob_digest),
                             (self.path("config.json"), self.config_digest)]:
            headers = run(curl + ["-D", "-", "-o", "/dev/null", "-X", "POST",
                                  f"{base}/v2/{repo}/blobs/uploads/"]).stdout
            loc = [l.split(":", 1)[1].strip() for l in headers.splitlines()
                   if l.lower().startswith("location:")][0]
            if loc.startswith("/"):
                loc = base + loc
            sep = "&" if "?" in loc else "?"
            run(curl + ["-o", "/dev/null", "-T", path, "-H", "Content-Type: application/octet-stream",
                        f"{loc}{sep}digest={digest}"])
        run(curl + ["-o", "/dev/null", "-X", "PUT", "-H", f"Content-Type: {OCI_MANIFEST}",
                    "--data-binary", "@" + self.path("manifest.json"),
                    f"{base}/v2/{repo}/manifests/v1"])

    # ---- measurements ----

    def blob_url(self, server):
        if server is self.nginx:
            return f"{server.base}/blob"
        return f"{server.base}/v2/bench/app/blobs/{self.blob_digest}"

    def blob_sample(self, server):
        """GETs the blob gib_per_sample times in a row: (bytes/s, server CPU s per GiB)."""
        url = self.blob_url(server)
        n = self.args.gib_per_sample
        cmd = self.curl_base(server) + ["-o", "/dev/null", "-w", "%{size_download}\n", url]
        cpu0, t0 = cpu_seconds(server.proc.pid), time.perf_counter()
        total = 0
        for _ in range(n):
            total += int(run(cmd).stdout.strip())
        elapsed = time.perf_counter() - t0
        cpu = cpu_seconds(server.proc.pid) - cpu0
        if total != n * self.blob_size:
            raise RuntimeError(f"{server.name}: got {total} bytes, wanted {n * self.blob_size}")
        return total / elapsed, cpu / (total / GIB)

    def blobs(self, servers):
        out = {}
        for s in servers:
            self.blob_sample(s)  # warm the page cache and the server
        for _ in range(self.args.rounds):
            for s in servers:  # interleaved, so drift hits every server alike
                tput, cpu = self.blob_sample(s)
                out.setdefault(s.name, {"tput": [], "cpu": []})
                out[s.name]["tput"].append(tput)
                out[s.name]["cpu"].append(cpu)
        return {k: {"bytes_per_s": statistics.median(v["tput"]),
                    "cpu_s_per_gib": statistics.median(v["cpu"])} for k, v in out.items()}

    def wrk(self, server, headers=()):
        url = f"{server.base}/v2/bench/app/manifests/v1"
        cmd = ["wrk", "-t2", "-c16", f"-d{self.args.wrk_seconds}s", "-H", f"Accept: {OCI_MANIFEST}"]
        for h in headers:
            cmd += ["-H", h]
        out = run(cmd + [url]).stdout
        if "Non-2xx" in out:
            raise RuntimeError(f"wrk saw errors against {server.name}:\n{out}")
        return float([l for l in out.splitlines() if l.startswith("Requests/sec")][0].split()[1])

    def manifests(self):
        return {s.name: statistics.median(self.wrk(s) for _ in range(max(1, self.args.rounds // 2)))
                for s in (self.o_plain, self.d_plain)}

    def auth_overhead(self):
        basic = "Authorization: Basic " + base64.b64encode(f"bench:{self.password}".encode()).decode()
        tok_url = (f"{self.o_auth.base}/oauth2/token?service=outpost"
                   "&scope=repository:bench/app:pull")
        tok = json.loads(run(self.curl_base(self.o_auth, f"bench:{self.password}") + [tok_url]).stdout)
        bearer = "Authorization: Bearer " + tok["token"]
        res = {"none": [], "basic": [], "bearer": []}
        for _ in range(max(1, self.args.rounds // 2)):
            res["none"].append(self.wrk(self.o_tls))
            res["basic"].append(self.wrk(self.o_auth, [basic]))
            res["bearer"].append(self.wrk(self.o_auth, [bearer]))
        return {k: statistics.median(v) for k, v in res.items()}

    def rss(self):
        server = self.o_plain
        url = self.blob_url(server)
        peak, stop = [0], threading.Event()

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], rss_kib(server.proc.pid))
                time.sleep(0.05)

        t = threading.Thread(target=sample)
        t.start()
        procs = [subprocess.Popen(self.curl_base(server) + ["-o", "/dev/null", url])
                 for _ in range(8)]
        try:
            for p in procs:
                if p.wait(timeout=600) != 0:
                    raise RuntimeError("a concurrent download failed")
        finally:
            stop.set()
            t.join()
            for p in procs:  # only left running if one failed or timed out
                if p.poll() is None:
                    p.kill()
                    p.wait()
        return peak[0] / 1024

    # ---- driver ----

    def run(self):
        exe = os.path.join(ROOT, "target", "release", "outpost-registry")
        if not self.args.no_build:
            subprocess.run(["cargo", "build", "--release", "-q", "-p", "outpost-registry"],
                           cwd=ROOT, check=True)
        for tool in ["docker-registry", "nginx", "wrk", "curl", "openssl"]:
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} is missing: apt-get install docker-registry "
                                   "nginx-light wrk curl openssl")
        print(f"setting up in {self.tmp} ({self.args.blob_mib} MiB blob)", file=sys.stderr)
        self.make_pki()
        self.make_content()
        self.start_servers(exe)
        for s in (self.o_plain, self.o_tls, self.d_plain, self.d_tls):
            self.push(s)
        self.push(self.o_auth, f"bench:{self.password}")
        print("blob GET, plain", file=sys.stderr)
        plain = self.blobs([self.o_plain, self.d_plain, self.nginx])
        print("blob GET, TLS", file=sys.stderr)
        tls = self.blobs([self.o_tls, self.d_tls])
        print("manifest GET", file=sys.stderr)
        man = self.manifests()
        print("auth overhead", file=sys.stderr)
        auth = self.auth_overhead()
        print("RSS under 8 streams", file=sys.stderr)
        rss = self.rss()
        self.results = {"blob_plain": plain, "blob_tls": tls, "manifest_rps": man,
                        "auth_tls_manifest_rps": auth, "outpost_rss_mib": rss,
                        "blob_mib": self.args.blob_mib, "rounds": self.args.rounds,
                        "gib_per_sample": self.args.gib_per_sample}
        self.report()

    def report(self):
        r = self.results
        p, t, m, a = r["blob_plain"], r["blob_tls"], r["manifest_rps"], r["auth_tls_manifest_rps"]
        gbs = lambda x: f"{x / 1e9:.2f} GB/s"
        print("\nraw figures (medians)")
        for name, v in list(p.items()) + list(t.items()):
            print(f"  {name:<22} {gbs(v['bytes_per_s']):>11}   {v['cpu_s_per_gib']:.3f} CPU s/GiB")
        for name, v in m.items():
            print(f"  {name:<22} {v:>11.0f} manifest GET/s (plain)")
        for name, v in a.items():
            print(f"  outpost TLS auth={name:<6} {v:>9.0f} manifest GET/s")
        print(f"  outpost RSS, 8 x {r['blob_mib']} MiB streams: {r['outpost_rss_mib']:.1f} MiB")
        op, dp = p["outpost-plain"], p["distribution-plain"]
        rows = [
            ("plain blob GET throughput vs docker-registry", op["bytes_per_s"] / dp["bytes_per_s"], ">=", 0.95),
            ("plain server CPU per GiB vs docker-registry", op["cpu_s_per_gib"] / dp["cpu_s_per_gib"], "<=", 0.85),
            ("TLS blob GET throughput vs docker-registry",
             t["outpost-tls"]["bytes_per_s"] / t["distribution-tls"]["bytes_per_s"], ">=", 1.5),
            ("manifest GET req/s vs docker-registry", m["outpost-plain"] / m["distribution-plain"], ">=", 5.0),
            ("Outpost RSS (MiB), 8 concurrent streams", r["outpost_rss_mib"], "<=", 64.0),
            ("auth overhead, Basic (TLS manifest GET)", 1 - a["basic"] / a["none"], "<=", 0.10),
            ("auth overhead, bearer (TLS manifest GET)", 1 - a["bearer"] / a["none"], "<=", 0.10),
        ]
        print(f"\n  nginx sendfile (zero-copy limit): {p['nginx']['cpu_s_per_gib']:.3f} CPU s/GiB, "
              f"{p['nginx']['cpu_s_per_gib'] / dp['cpu_s_per_gib']:.2f}x docker-registry's")
        print("\nratios against targets")
        for name, value, op_, target in rows:
            ok = value >= target if op_ == ">=" else value <= target
            print(f"  {name:<46} {value:8.2f}  target {op_} {target:<5}  {'PASS' if ok else 'MISS'}")
        r["ratios"] = {name: value for name, value, _, _ in rows}
        if self.args.json:
            with open(self.args.json, "w") as f:
                json.dump(r, f, indent=2)

    def cleanup(self):
        for s in self.servers:
            s.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def run_bench(ap, make, binaries="binary"):
    """The end of every bench's main: the options they share (--no-build, --json), then the
    bench built from the parsed options by `make`, run, and cleaned up whatever happens."""
    ap.add_argument("--no-build", action="store_true", help=f"use the existing release {binaries}")
    ap.add_argument("--json", help="also write the figures to this file")
    b = make(ap.parse_args())
    try:
        b.run()
    finally:
        b.cleanup()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blob-mib", type=int, default=1024, help="blob size in MiB (default 1024)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per measurement; medians reported")
    ap.add_argument("--gib-per-sample", type=int, default=4,
                    help="blob downloads per CPU sample (several GiB: one is noisy)")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run")
    run_bench(ap, Bench)


if __name__ == "__main__":
    main()
