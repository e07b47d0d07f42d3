//! A real Kubernetes node for the suites: kubelet 1.26 + Debian's containerd (CRI) + the CNI
//! bridge plugin, inside a network namespace the test creates (see `shared/k8s/README.md` for
//! why each piece is set up the way it is).
//!
//! - [`NetNs`]: the network namespace, with the node IP on a veth pair and a route for the
//!   Service CIDR. Creating it moves the calling thread into it, so everything that thread
//!   starts afterwards (the [`ControlPlane`](super::ControlPlane), docker-registry, Helm, the
//!   suite's HTTP clients, threads) lives in it; Drop moves the thread back and deletes it.
//! - [`Node`]: containerd, its shims and kubelet in one private mount namespace held by a
//!   long-lived `sleep` (`unshare --mount --propagation slave`): `/run` is a tmpfs and
//!   `/var/lib`, `/var/log` and `/etc/containerd` are bind mounts of temp dirs, so the machine's
//!   own containerd and kubelet files are never touched, and a DaemonSet's hostPath under
//!   `/etc/containerd` lands in this node's containerd config. kubelet runs in its own cgroup
//!   root. Drop stops everything by PID, removes the cgroups and the temp dirs.
//! - [`ServiceProxy`]: kube-proxy's place: a thread polling Services and Endpoints and writing
//!   iptables DNAT rules for ClusterIPs in the namespace.

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{ControlPlane, Rest, binary, random_hex};
use crate::{require, run_ok, run_timeout};

/// The pod network of the node's CNI bridge.
pub const POD_CIDR: &str = "10.88.0.0/16";

fn setns_net(fd: &File) -> std::io::Result<()> {
    // SAFETY: setns on a valid, open namespace file descriptor; it only changes the calling
    // thread's network namespace.
    let r = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn ip(args: &[&str]) {
    run_ok(Command::new(require("ip")).args(args));
}

/// A network namespace holding the node IP, entered by the thread that created it.
pub struct NetNs {
    pub name: String,
    pub node_ip: Ipv4Addr,
    /// The thread's network namespace before: restored on drop.
    home: File,
    /// Deletes the namespace if this process dies without dropping it (EOF on its stdin);
    /// killed first on drop.
    guard: Option<(Child, ChildStdin)>,
}

impl NetNs {
    /// Creates `outpost-<random>` with loopback up, `node_ip/24` on one end of a veth pair
    /// (the kernel may lack the dummy interface), a route for `service_cidr` over it (node
    /// processes' connections to ClusterIPs must find a route before being DNAT'd), forwarding
    /// on; then moves the calling thread into it.
    pub fn create_and_enter(node_ip: Ipv4Addr, service_cidr: &str) -> NetNs {
        let home = File::open("/proc/thread-self/ns/net").expect("this thread's network namespace");
        let name = format!("outpost-{}", random_hex(4));
        ip(&["netns", "add", &name]);
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg("read _ignored; ip netns del \"$1\" 2>/dev/null")
            .arg("outpost-netns-guard")
            .arg(&name)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the namespace's guard");
        let stdin = guard.stdin.take().expect("guard stdin");
        let ns = NetNs {
            name: name.clone(),
            node_ip,
            home,
            guard: Some((guard, stdin)),
        };
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &name, "link", "add", "node0", "type", "veth", "peer", "name", "node1",
        ]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{node_ip}/24"),
            "dev",
            "node0",
        ]);
        ip(&["-n", &name, "link", "set", "node0", "up"]);
        ip(&["-n", &name, "link", "set", "node1", "up"]);
        ip(&["-n", &name, "route", "add", service_cidr, "dev", "node0"]);
        // Pods reach the node IP and each other through the bridge, routed here.
        ip(&[
            "netns",
            "exec",
            &name,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ]);
        let target = File::open(ns.path()).expect("the new network namespace");
        setns_net(&target).expect("setns into the test's network namespace");
        ns
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        if let Some((mut g, _stdin)) = self.guard.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        if let Err(e) = setns_net(&self.home) {
            eprintln!("cannot return to the original network namespace: {e}");
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
    }
}

/// What [`Node::start`] needs to know.
pub struct NodeOptions {
    /// The node's name (kubelet's `--hostname-override`).
    pub name: String,
    /// The `system:node:<name>` token the control plane accepts (group `system:nodes`).
    pub token: String,
    /// The pod sandbox image (containerd's `sandbox_image`): an OCI layout (`dir`, `tag`)
    /// of an image that just sleeps, imported as `sandbox_image` before kubelet starts.
    pub sandbox_layout: (PathBuf, String),
    pub sandbox_image: String,
}

/// kubelet + containerd in a private mount namespace, registered with a control plane.
pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    /// Temp dir holding the node's files; removed on drop.
    pub dir: PathBuf,
    /// The node's `/etc/containerd` (certs.d below it is containerd's registry config_path).
    pub etc_containerd: PathBuf,
    /// The node's `/var/lib` and `/var/log`.
    pub var_lib: PathBuf,
    pub var_log: PathBuf,
    /// containerd's gRPC socket (outside the private mount namespace, so `ctr` reaches it).
    pub socket: PathBuf,
    cgroup_root: String,
    holder: Option<Child>,
    containerd: Option<Child>,
    kubelet: Option<Child>,
    guard: Option<(Child, ChildStdin)>,
}

// The guard: a shell waiting for EOF on stdin, which only this process holds. Drop kills it
// first (so it does nothing) and cleans up itself; EOF without that means the test process died
// without unwinding (abort, SIGKILL), and then the guard stops the node: the containers (kubelet's
// cgroup root), every process in the node's mount namespace (identified by the namespace the
// holder had at start, so never a stranger), the cgroups, the network namespace, the temp dir.
const GUARD_SCRIPT: &str = r#"
read _ignored
dir=$1; cg=$2; mnt=$3; netns=$4
for round in 1 2 3 4 5 6 7 8 9 10; do
  left=0
  for f in $(find /sys/fs/cgroup/"$cg" /sys/fs/cgroup/*/"$cg" -name cgroup.procs 2>/dev/null); do
    for p in $(cat "$f"); do kill -KILL "$p" 2>/dev/null; left=1; done
  done
  for d in /proc/[0-9]*; do
    [ "$(readlink "$d/ns/mnt" 2>/dev/null)" = "$mnt" ] && { kill -KILL "${d#/proc/}" 2>/dev/null; left=1; }
  done
  [ $left = 0 ] && break
  sleep 0.3
done
for h in /sys/fs/cgroup/"$cg" /sys/fs/cgroup/*/"$cg"; do [ -d "$h" ] && find "$h" -depth -type d -exec rmdir {} + 2>/dev/null; done
ip netns del "$netns" 2>/dev/null
rm -rf -- "$dir"
"#;

/// The cgroup hierarchies: `/sys/fs/cgroup/<controller>` on cgroup v1 (this project's
/// machines), `/sys/fs/cgroup` itself on a unified (v2) host.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut v: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists() && !p.is_symlink())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every cgroup directory below `dir`, deepest first.
fn cgroup_tree(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() && !p.is_symlink() {
                cgroup_tree(&p, out);
            }
        }
    }
    out.push(dir.to_path_buf());
}

fn pids_in(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL after `grace`; reaps it.
fn stop_child(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    kill(child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Node {
    /// Starts containerd and kubelet for `cp` in the calling thread's network namespace
    /// (`ns`, entered by [`NetNs::create_and_enter`]) and waits until the node is Ready.
    pub fn start(ns: &NetNs, cp: &ControlPlane, opts: NodeOptions) -> Node {
        let kubelet_bin = binary("kubelet");
        let dir = tempfile::Builder::new()
            .prefix("outpost-node-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let d = |p: &str| dir.join(p);
        for sub in [
            "var-lib",
            "var-log",
            "etc-containerd/certs.d",
            "cni",
            "logs",
        ] {
            std::fs::create_dir_all(d(sub)).expect("node dirs");
        }
        let cgroup_root = format!("/outpost-node-{}", random_hex(4));
        let mut node = Node {
            name: opts.name.clone(),
            ip: ns.node_ip,
            etc_containerd: d("etc-containerd"),
            var_lib: d("var-lib"),
            var_log: d("var-log"),
            socket: d("containerd.sock"),
            dir: dir.clone(),
            cgroup_root,
            holder: None,
            containerd: None,
            kubelet: None,
            guard: None,
        };

        // kubelet's cgroup root must exist in every hierarchy (cpuset's needs its CPUs and
        // memory nodes before anything can join it).
        for h in cgroup_hierarchies() {
            let c = h.join(node.cgroup_root.trim_start_matches('/'));
            std::fs::create_dir_all(&c).expect("kubelet's cgroup root");
            for f in ["cpuset.cpus", "cpuset.mems"] {
                if let Ok(v) = std::fs::read_to_string(h.join(f)) {
                    std::fs::write(c.join(f), v.trim()).expect("cpuset of the cgroup root");
                }
            }
        }

        // The holder of the private mount namespace.
        let script = "set -e; mount -t tmpfs tmpfs /run; mount --bind \"$1\" /var/lib; \
                      mount --bind \"$2\" /var/log; mkdir -p /etc/containerd; \
                      mount --bind \"$3\" /etc/containerd; exec sleep infinity";
        let holder = Command::new(require("unshare"))
            .args([
                "--mount",
                "--propagation",
                "slave",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&node.var_lib)
            .arg(&node.var_log)
            .arg(&node.etc_containerd)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(d("logs/holder.log")).expect("log"))
            .spawn()
            .expect("start the mount namespace holder");
        let holder_pid = holder.id();
        node.holder = Some(holder);
        node.wait_for("the mount namespace", Duration::from_secs(20), |n| {
            std::fs::read_to_string(format!("/proc/{holder_pid}/comm"))
                .map(|c| c.trim() == "sleep")
                .unwrap_or(false)
                || n.holder_exited()
        });
        assert!(!node.holder_exited(), "{}", tail(&d("logs/holder.log"), 20));
        let mnt = std::fs::read_link(format!("/proc/{holder_pid}/ns/mnt"))
            .expect("the holder's mount namespace");
        let mut guard = Command::new("sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("outpost-node-guard")
            .arg(&dir)
            .arg(node.cgroup_root.trim_start_matches('/'))
            .arg(&mnt)
            .arg(&ns.name)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the node's guard");
        let stdin = guard.stdin.take().expect("guard stdin");
        node.guard = Some((guard, stdin));

        // containerd with CRI: no oom_score_adj (this VM lacks CAP_SYS_RESOURCE), registry
        // hosts from the node's /etc/containerd/certs.d, the native snapshotter (no overlay
        // over the test's temp dirs), CNI from Debian's plugins.
        let config = format!(
            r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cni}"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "/etc/containerd/certs.d"
"#,
            sock = node.socket.display(),
            sandbox = opts.sandbox_image,
            cni = d("cni").display(),
        );
        std::fs::write(node.etc_containerd.join("config.toml"), config).expect("containerd config");
        std::fs::write(
            d("cni/10-outpost-test.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0",
                "name": "outpost-test",
                "plugins": [{
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    // The ServiceProxy masquerades what needs it.
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                }],
            })
            .to_string(),
        )
        .expect("CNI config");
        let containerd = node.in_mount_ns(&require("containerd"), "containerd", |c| {
            // Where a node agent looks for it: the node's /etc/containerd.
            c.arg("--config=/etc/containerd/config.toml");
        });
        node.containerd = Some(containerd);
        node.wait_for("containerd's socket", Duration::from_secs(30), |n| {
            n.socket.exists()
                && run_timeout(
                    Command::new(require("ctr"))
                        .arg("--address")
                        .arg(&n.socket)
                        .arg("version"),
                    Duration::from_secs(10),
                )
                .status
                .success()
        });
        let (layout, tag) = &opts.sandbox_layout;
        node.import_layout(layout, tag, &opts.sandbox_image);

        // kubelet: cgroupfs in its own root; no image GC and near-zero eviction thresholds so
        // imported images stay on a busy disk; no cluster DNS (there is none).
        std::fs::write(d("resolv.conf"), format!("nameserver {}\n", ns.node_ip))
            .expect("resolv.conf");
        let kubelet_config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": node.cgroup_root,
            "failSwapOn": false,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "1Mi",
                "nodefs.available": "1%",
                "nodefs.inodesFree": "1%",
                "imagefs.available": "1%",
            },
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": false},
                "x509": {"clientCAFile": cp.ca_cert},
            },
            "authorization": {"mode": "AlwaysAllow"},
            "address": ns.node_ip.to_string(),
            "readOnlyPort": 0,
            "healthzPort": 0,
            "clusterDomain": "cluster.local",
            "resolvConf": d("resolv.conf"),
            "serializeImagePulls": false,
            "nodeStatusUpdateFrequency": "5s",
            "localStorageCapacityIsolation": false,
        });
        std::fs::write(d("kubelet.json"), kubelet_config.to_string()).expect("kubelet config");
        cp.write_kubeconfig(&d("kubelet.kubeconfig"), Some(&opts.token));
        let kubelet = node.in_mount_ns(&kubelet_bin, "kubelet", |c| {
            c.arg(format!("--config={}", d("kubelet.json").display()))
                .arg(format!(
                    "--kubeconfig={}",
                    d("kubelet.kubeconfig").display()
                ))
                .arg(format!(
                    "--container-runtime-endpoint=unix://{}",
                    node.socket.display()
                ))
                .arg(format!("--hostname-override={}", opts.name))
                .arg(format!("--node-ip={}", ns.node_ip))
                .arg("--root-dir=/var/lib/kubelet")
                .arg("-v=1");
        });
        node.kubelet = Some(kubelet);
        let admin = cp.admin();
        let path = format!("/api/v1/nodes/{}", node.name);
        node.wait_for("the node to be Ready", Duration::from_secs(120), |n| {
            n.assert_running();
            let (code, v) = admin.get(&path);
            code == 200
                && v["status"]["conditions"].as_array().is_some_and(|c| {
                    c.iter()
                        .any(|c| c["type"] == "Ready" && c["status"] == "True")
                })
        });
        node
    }

    /// A command run in the node's mount namespace (and the holder's network namespace).
    fn in_mount_ns(&self, program: &Path, log: &str, f: impl FnOnce(&mut Command)) -> Child {
        let holder = self.holder.as_ref().expect("holder").id();
        let mut c = Command::new(require("nsenter"));
        c.arg("-t")
            .arg(holder.to_string())
            .args(["--mount", "--net", "--wd=/"])
            .arg(program);
        f(&mut c);
        let logf = File::create(self.dir.join("logs").join(format!("{log}.log"))).expect("log");
        c.stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {log}: {e}"))
    }

    fn holder_exited(&mut self) -> bool {
        self.holder
            .as_mut()
            .is_none_or(|h| matches!(h.try_wait(), Ok(Some(_))))
    }

    /// Panics (with the logs) if containerd or kubelet has exited.
    pub fn assert_running(&mut self) {
        let mut exited = None;
        for (name, c) in [
            ("containerd", &mut self.containerd),
            ("kubelet", &mut self.kubelet),
        ] {
            if let Some(c) = c
                && let Ok(Some(status)) = c.try_wait()
            {
                exited = Some(format!("{name} exited ({status})"));
            }
        }
        if let Some(e) = exited {
            panic!("{e}:\n{}", self.logs_tail(40));
        }
    }

    fn wait_for(&mut self, what: &str, timeout: Duration, mut f: impl FnMut(&mut Node) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            if f(self) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{what}: not within {timeout:?}\n{}", self.logs_tail(40));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The last `lines` of containerd's and kubelet's logs.
    pub fn logs_tail(&self, lines: usize) -> String {
        let mut out = String::new();
        for name in ["holder", "containerd", "kubelet"] {
            let p = self.dir.join("logs").join(format!("{name}.log"));
            out.push_str(&format!(
                "--- {name} ({}):\n{}\n",
                p.display(),
                tail(&p, lines)
            ));
        }
        out
    }

    /// Runs `ctr -n k8s.io <args>` against the node's containerd; stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(require("ctr"))
                .arg("--address")
                .arg(&self.socket)
                .args(["-n", "k8s.io"])
                .args(args),
        )
    }

    /// Imports `tag` of the OCI layout `layout` into the node's containerd (the CRI
    /// namespace) as `name`, unpacked for the CRI snapshotter.
    pub fn import_layout(&self, layout: &Path, tag: &str, name: &str) {
        let archive = self.dir.join(format!("import-{}.tar", random_hex(4)));
        run_ok(
            Command::new(require("skopeo"))
                .args(["--insecure-policy", "copy", "-q"])
                .arg(format!("oci:{}:{tag}", layout.display()))
                .arg(format!("oci-archive:{}:{name}", archive.display())),
        );
        self.ctr(&[
            "images",
            "import",
            "--snapshotter",
            "native",
            archive.to_str().expect("path"),
        ]);
        let _ = std::fs::remove_file(&archive);
    }

    /// Image references containerd's CRI namespace holds.
    pub fn images(&self) -> Vec<String> {
        self.ctr(&["images", "ls", "-q"])
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// (reference, manifest digest) of every image in containerd's CRI namespace.
    pub fn image_refs(&self) -> Vec<(String, String)> {
        self.ctr(&["images", "ls"])
            .lines()
            .skip(1)
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let r = f.next()?;
                let _type = f.next()?;
                Some((r.to_string(), f.next()?.to_string()))
            })
            .collect()
    }

    /// Removes an image (by reference) and everything containerd no longer references.
    pub fn remove_image(&self, name: &str) {
        let _ = run_timeout(
            Command::new(require("ctr"))
                .arg("--address")
                .arg(&self.socket)
                .args(["-n", "k8s.io", "images", "rm", "--sync", name]),
            Duration::from_secs(60),
        );
    }

    /// Pods, events and the node's log tails: what a failure message needs.
    pub fn diagnostics(&self, cp: &ControlPlane) -> String {
        let admin = cp.admin();
        let mut out = String::from("=== pods\n");
        let (_, pods) = admin.get("/api/v1/pods");
        for p in pods["items"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{}/{} on {} phase {}: conditions {} containers {}\n",
                p["metadata"]["namespace"].as_str().unwrap_or(""),
                p["metadata"]["name"].as_str().unwrap_or(""),
                p["spec"]["nodeName"].as_str().unwrap_or("-"),
                p["status"]["phase"].as_str().unwrap_or(""),
                p["status"]["conditions"],
                p["status"]["containerStatuses"],
            ));
        }
        out.push_str("=== events\n");
        let (_, events) = admin.get("/api/v1/events");
        for e in events["items"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "{} {}/{} {}: {}\n",
                e["type"].as_str().unwrap_or(""),
                e["involvedObject"]["kind"].as_str().unwrap_or(""),
                e["involvedObject"]["name"].as_str().unwrap_or(""),
                e["reason"].as_str().unwrap_or(""),
                e["message"].as_str().unwrap_or(""),
            ));
        }
        out.push_str("=== container logs\n");
        let mut logs = Vec::new();
        collect_files(&self.var_log.join("pods"), &mut logs);
        for l in logs {
            out.push_str(&format!("--- {}:\n{}\n", l.display(), tail(&l, 15)));
        }
        out.push_str("=== node\n");
        out.push_str(&self.logs_tail(40));
        out
    }

    /// Processes in the node's mount namespace (containerd, shims, kubelet, the holder).
    fn mount_ns_pids(&self) -> Vec<u32> {
        let Some(holder) = self.holder.as_ref().map(Child::id) else {
            return Vec::new();
        };
        let Ok(ours) = std::fs::read_link(format!("/proc/{holder}/ns/mnt")) else {
            return Vec::new();
        };
        std::fs::read_dir("/proc")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
                    .filter(|pid| {
                        std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
                            .ok()
                            .as_ref()
                            == Some(&ours)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Processes in kubelet's cgroup root (the containers).
    fn cgroup_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for h in cgroup_hierarchies() {
            let mut dirs = Vec::new();
            cgroup_tree(&h.join(self.cgroup_root.trim_start_matches('/')), &mut dirs);
            for d in dirs {
                pids.extend(pids_in(&d));
            }
        }
        pids.sort();
        pids.dedup();
        pids
    }
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if p.is_dir() {
                collect_files(&p, out);
            } else {
                out.push(p);
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some((mut g, _stdin)) = self.guard.take() {
            let _ = g.kill();
            let _ = g.wait();
        }
        if let Some(k) = self.kubelet.as_mut() {
            stop_child(k, Duration::from_secs(10));
        }
        // The containers: everything in kubelet's cgroup root (all started by this node).
        for _ in 0..50 {
            let pids = self.cgroup_pids();
            if pids.is_empty() {
                break;
            }
            for p in pids {
                kill(p, "KILL");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(c) = self.containerd.as_mut() {
            stop_child(c, Duration::from_secs(10));
        }
        // The shims (and anything else left in the node's mount namespace), then the holder.
        let holder = self.holder.as_ref().map(Child::id);
        for _ in 0..50 {
            let left: Vec<u32> = self
                .mount_ns_pids()
                .into_iter()
                .filter(|p| Some(*p) != holder)
                .collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                kill(p, "KILL");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        for h in cgroup_hierarchies() {
            let mut dirs = Vec::new();
            cgroup_tree(&h.join(self.cgroup_root.trim_start_matches('/')), &mut dirs);
            for d in dirs {
                for _ in 0..50 {
                    if std::fs::remove_dir(&d).is_ok() || !d.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// kube-proxy's place: a thread that polls Services and Endpoints and keeps iptables DNAT
/// rules for every ClusterIP port in the namespace: in OUTPUT for node processes (containerd
/// pulling from a ClusterIP, the API server calling a webhook Service), in PREROUTING for pods;
/// pod-to-Service-to-pod traffic on the bridge is masqueraded so the replies come back through
/// the DNAT.
pub struct ServiceProxy {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const SVC_CHAIN: &str = "OUTPOST-TEST-SERVICES";
const MASQ_CHAIN: &str = "OUTPOST-TEST-MASQ";
/// How often Services and Endpoints are read.
const PROXY_INTERVAL: Duration = Duration::from_millis(300);

fn iptables_restore(rules: &str) -> Result<(), String> {
    let mut child = Command::new(require("iptables-restore"))
        .arg("--noflush")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(rules.as_bytes())
        .map_err(|e| e.to_string())?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "iptables-restore: {}\n{rules}",
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The nat table rules for `services` and `endpoints` (API lists).
pub fn service_rules(services: &Value, endpoints: &Value) -> String {
    let mut rules = format!("*nat\n:{SVC_CHAIN} - [0:0]\n:{MASQ_CHAIN} - [0:0]\n");
    rules.push_str(&format!(
        "-A {MASQ_CHAIN} -s {POD_CIDR} -d {POD_CIDR} -m conntrack --ctstate DNAT -j MASQUERADE\n"
    ));
    let empty = Vec::new();
    for svc in services["items"].as_array().unwrap_or(&empty) {
        let ns = svc["metadata"]["namespace"].as_str().unwrap_or("");
        let name = svc["metadata"]["name"].as_str().unwrap_or("");
        let Some(cluster_ip) = svc["spec"]["clusterIP"]
            .as_str()
            .filter(|ip| ip.parse::<Ipv4Addr>().is_ok())
        else {
            continue;
        };
        let ep = endpoints["items"]
            .as_array()
            .unwrap_or(&empty)
            .iter()
            .find(|e| e["metadata"]["namespace"] == ns && e["metadata"]["name"] == name);
        for port in svc["spec"]["ports"].as_array().unwrap_or(&empty) {
            let port_name = port["name"].as_str().unwrap_or("");
            let proto = port["protocol"].as_str().unwrap_or("TCP").to_lowercase();
            let Some(svc_port) = port["port"].as_u64() else {
                continue;
            };
            // Ready addresses with this port (matched by name, as kube-proxy does).
            let mut targets: Vec<String> = Vec::new();
            for subset in ep.and_then(|e| e["subsets"].as_array()).unwrap_or(&empty) {
                let Some(target_port) = subset["ports"]
                    .as_array()
                    .unwrap_or(&empty)
                    .iter()
                    .find(|p| p["name"].as_str().unwrap_or("") == port_name)
                    .and_then(|p| p["port"].as_u64())
                else {
                    continue;
                };
                for a in subset["addresses"].as_array().unwrap_or(&empty) {
                    if let Some(ip) = a["ip"].as_str() {
                        targets.push(format!("{ip}:{target_port}"));
                    }
                }
            }
            targets.sort();
            let n = targets.len();
            for (i, t) in targets.iter().enumerate() {
                // Spread evenly: the i-th of n rules takes 1/(n-i) of what reaches it.
                let pick = if i + 1 < n {
                    format!(
                        "-m statistic --mode random --probability {:.5} ",
                        1.0 / (n - i) as f64
                    )
                } else {
                    String::new()
                };
                rules.push_str(&format!(
                    "-A {SVC_CHAIN} -d {cluster_ip}/32 -p {proto} -m {proto} --dport {svc_port} \
                     -m comment --comment {ns}/{name}:{port_name} {pick}-j DNAT \
                     --to-destination {t}\n"
                ));
            }
        }
    }
    rules.push_str("COMMIT\n");
    rules
}

impl ServiceProxy {
    /// Starts the thread in the calling thread's network namespace; the first rules are in
    /// place when this returns.
    pub fn start(cp: &ControlPlane) -> ServiceProxy {
        iptables_restore(&service_rules(&Value::Null, &Value::Null)).expect("the proxy's chains");
        for (chain, jump) in [
            ("PREROUTING", SVC_CHAIN),
            ("OUTPUT", SVC_CHAIN),
            ("POSTROUTING", MASQ_CHAIN),
        ] {
            run_ok(
                Command::new(require("iptables")).args(["-t", "nat", "-I", chain, "1", "-j", jump]),
            );
        }
        let rest = cp.admin();
        let mut last = String::new();
        sync_rules(&rest, &mut last).expect("the first Service rules");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                if let Err(e) = sync_rules(&rest, &mut last) {
                    eprintln!("service proxy: {e}");
                }
                std::thread::sleep(PROXY_INTERVAL);
            }
        });
        ServiceProxy {
            stop,
            thread: Some(thread),
        }
    }
}

fn sync_rules(rest: &Rest, last: &mut String) -> Result<(), String> {
    let (c1, services) = rest.get("/api/v1/services");
    let (c2, endpoints) = rest.get("/api/v1/endpoints");
    if c1 != 200 || c2 != 200 {
        return Err(format!("listing Services/Endpoints: HTTP {c1}/{c2}"));
    }
    let rules = service_rules(&services, &endpoints);
    if rules != *last {
        iptables_restore(&rules)?;
        *last = rules;
    }
    Ok(())
}

impl Drop for ServiceProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rules_spread_over_ready_endpoints_matched_by_port_name() {
        let services = json!({"items": [
            {"metadata": {"namespace": "a", "name": "web"},
             "spec": {"clusterIP": "10.96.0.10", "ports": [
                {"name": "https", "port": 443, "protocol": "TCP"}]}},
            {"metadata": {"namespace": "a", "name": "headless"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
        ]});
        let endpoints = json!({"items": [
            {"metadata": {"namespace": "a", "name": "web"},
             "subsets": [{"addresses": [{"ip": "10.88.0.3"}, {"ip": "10.88.0.2"}],
                          "ports": [{"name": "https", "port": 8443}]}]},
        ]});
        let r = service_rules(&services, &endpoints);
        let dnat: Vec<&str> = r.lines().filter(|l| l.contains("DNAT --to")).collect();
        assert_eq!(dnat.len(), 2, "{r}");
        assert!(dnat[0].contains("--probability 0.50000") && dnat[0].ends_with("10.88.0.2:8443"));
        assert!(!dnat[1].contains("probability") && dnat[1].ends_with("10.88.0.3:8443"));
        assert!(!r.contains("None"));
    }
}
