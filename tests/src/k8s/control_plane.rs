//! A real Kubernetes control plane: etcd (Debian's `etcd-server`), kube-apiserver,
//! kube-controller-manager and optionally kube-scheduler, with their data, PKI, kubeconfigs and
//! logs in one temp dir. Started by [`ControlPlane::start`] (or shared by all tests of a test
//! binary through [`ControlPlane::shared`]), stopped by PID on drop: the Kubernetes processes
//! first, then etcd. A guard process (`sh`, reading a pipe only this process holds) stops them
//! too when the test binary dies without dropping (a static, a panic abort, a kill).
//!
//! Inside a network namespace: set `bind_address` to an address of the namespace reachable
//! from the test process (e.g. the namespace end of a veth pair whose other end is on the
//! host), and `command_prefix` to `["nsenter", "--net=/run/netns/NAME"]`; every process is
//! started through the prefix (which must exec the program, so the PID is the program's).

use std::ffi::OsString;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::{Value, json};

use super::{binary, random_hex};
use crate::{require, run_ok};

/// One line of the API server's `--token-auth-file`: a bearer token for a test user.
#[derive(Clone, Debug)]
pub struct StaticToken {
    pub token: String,
    pub user: String,
    pub groups: Vec<String>,
}

/// How to start a control plane. `Default`: everything on 127.0.0.1, free ports, no prefix,
/// service CIDR 10.96.0.0/16, no scheduler.
#[derive(Clone, Debug)]
pub struct ControlPlaneOptions {
    /// Where the API server (and the controller manager's and scheduler's health ports)
    /// listen; also in the serving certificate. etcd always listens on 127.0.0.1 of the
    /// processes' network namespace.
    pub bind_address: IpAddr,
    /// The address the API server advertises (the `kubernetes` Service's endpoint) and clients
    /// use; default: `bind_address` (127.0.0.1 when that is unspecified).
    pub advertise_address: Option<IpAddr>,
    /// Program and arguments every process is started through, e.g.
    /// `["nsenter", "--net=/run/netns/NAME"]`. Empty: started directly.
    pub command_prefix: Vec<OsString>,
    /// `--service-cluster-ip-range`; its first address is the `kubernetes` Service's and in
    /// the serving certificate.
    pub service_cidr: String,
    /// Start kube-scheduler (pods get bound to nodes); without it pods stay Pending.
    pub scheduler: bool,
    /// Extra flags per component, appended last (a repeated single-value flag wins).
    pub etcd_args: Vec<String>,
    pub apiserver_args: Vec<String>,
    pub controller_manager_args: Vec<String>,
    pub scheduler_args: Vec<String>,
    /// More `--token-auth-file` lines (test users, a kubelet's `system:node:NAME`).
    pub tokens: Vec<StaticToken>,
    /// How long each component may take to become ready.
    pub ready_timeout: Duration,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        ControlPlaneOptions {
            bind_address: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_address: None,
            command_prefix: Vec::new(),
            service_cidr: "10.96.0.0/16".to_string(),
            scheduler: false,
            etcd_args: Vec::new(),
            apiserver_args: Vec::new(),
            controller_manager_args: Vec::new(),
            scheduler_args: Vec::new(),
            tokens: Vec::new(),
            ready_timeout: Duration::from_secs(120),
        }
    }
}

/// The admission plugins enabled besides the API server's defaults (shared/k8s/README.md).
pub const ADMISSION_PLUGINS: &str =
    "NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook";
/// The controllers the controller manager runs: all but those needing a cloud or node IPAM.
pub const CONTROLLERS: &str = "*,-nodeipam,-cloud-node-lifecycle,-service,-route";

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

/// A running control plane. Everything lives under [`ControlPlane::dir`].
pub struct ControlPlane {
    pub options: ControlPlaneOptions,
    /// Temp dir holding etcd's data, the PKI, kubeconfigs and logs (`logs/<component>.log`).
    pub dir: PathBuf,
    /// `https://<advertise address>:<port>`.
    pub server: String,
    /// The address the API server advertises (and [`ControlPlane::server`] names).
    pub advertise_address: IpAddr,
    pub apiserver_port: u16,
    pub etcd_port: u16,
    pub controller_manager_port: u16,
    pub scheduler_port: Option<u16>,
    /// The cluster CA (PEM files): it signed the serving certificate, is the client CA, the
    /// controller manager's root CA (in every namespace's `kube-root-ca.crt`) and its
    /// cluster-signing CA (kubelet client certificates from CSRs).
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    /// The API server's serving certificate and key (also served by the controller manager and
    /// the scheduler on their health ports).
    pub serving_cert: PathBuf,
    pub serving_key: PathBuf,
    /// The service-account signing key (EC, PEM).
    pub sa_key: PathBuf,
    /// A kubeconfig for the admin (`system:masters`) token.
    pub admin_kubeconfig: PathBuf,
    admin_token: String,
    procs: Mutex<Vec<Proc>>,
    etcd: Mutex<Option<Proc>>,
    guard: Mutex<Option<(Child, ChildStdin)>>,
}

/// The first usable address of a CIDR (`10.96.0.0/16` -> `10.96.0.1`).
pub fn first_address(cidr: &str) -> IpAddr {
    let (net, bits) = cidr
        .split_once('/')
        .unwrap_or_else(|| panic!("not a CIDR: {cidr}"));
    let bits: u32 = bits.parse().expect("CIDR prefix length");
    match net.parse::<IpAddr>().expect("CIDR address") {
        IpAddr::V4(a) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            IpAddr::V4(((u32::from(a) & mask) + 1).into())
        }
        IpAddr::V6(a) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            IpAddr::V6(((u128::from(a) & mask) + 1).into())
        }
    }
}

fn url_host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    }
}

/// A port nobody listens on at `ip` (in this process's network namespace; for another
/// namespace a free loopback port here, which a fresh namespace has free too).
fn free_port_on(ip: IpAddr) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .or_else(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// SIGTERM, then SIGKILL if it has not exited within `grace`; reaps it.
fn stop(p: &mut Proc, grace: Duration) {
    if let Ok(Some(_)) = p.child.try_wait() {
        return;
    }
    signal(p.child.id(), "TERM");
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = p.child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = p.child.kill();
    let _ = p.child.wait();
}

// The guard: waits for EOF on stdin (the test process holds the only write end, so EOF means
// it dropped the control plane or died), then stops what is left: each PID only while its
// command line still names our temp dir (never a stranger that reused the PID), the
// Kubernetes processes first, etcd last, and removes the temp dir.
const GUARD_SCRIPT: &str = r#"
read _ignored
dir=$1; etcd=$2; shift 2
ours() { [ -r "/proc/$1/cmdline" ] && tr '\0' '\n' < "/proc/$1/cmdline" | grep -qF -- "$dir"; }
for sig in TERM KILL; do
  for p in "$@"; do ours "$p" && kill -$sig "$p" 2>/dev/null; done
  i=0; while [ $i -lt 50 ]; do
    alive=0; for p in "$@"; do ours "$p" && alive=1; done
    [ $alive = 0 ] && break; sleep 0.1; i=$((i+1))
  done
done
for sig in TERM KILL; do
  ours "$etcd" && kill -$sig "$etcd" 2>/dev/null
  i=0; while [ $i -lt 50 ] && ours "$etcd"; do sleep 0.1; i=$((i+1)); done
done
rm -rf -- "$dir"
"#;

static SHARED: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

impl ControlPlane {
    /// One control plane for every test of this test binary (default options), started by the
    /// first caller. Statics are never dropped: the guard process stops it when the test
    /// binary exits. Tests sharing it keep to their own namespaces and release names.
    pub fn shared() -> &'static ControlPlane {
        let r = SHARED.get_or_init(|| {
            std::panic::catch_unwind(|| ControlPlane::start(ControlPlaneOptions::default()))
                .map_err(|e| {
                    e.downcast_ref::<String>()
                        .cloned()
                        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "unknown panic".to_string())
                })
        });
        match r {
            Ok(cp) => cp,
            Err(e) => panic!("the shared control plane did not start: {e}"),
        }
    }

    /// Starts etcd, kube-apiserver, kube-controller-manager (and kube-scheduler if asked) and
    /// waits until each is ready; panics with the tail of every log if one is not in time.
    pub fn start(options: ControlPlaneOptions) -> ControlPlane {
        // Resolve the binaries first: a missing or corrupt one fails before anything runs.
        let apiserver_bin = binary("kube-apiserver");
        let kcm_bin = binary("kube-controller-manager");
        let scheduler_bin = options.scheduler.then(|| binary("kube-scheduler"));
        let etcd_bin = require("etcd");

        let dir = tempfile::Builder::new()
            .prefix("outpost-k8s-")
            .tempdir()
            .expect("temp dir")
            .keep();
        std::fs::create_dir_all(dir.join("logs")).expect("logs dir");
        let bind = options.bind_address;
        let advertise = options
            .advertise_address
            .unwrap_or(if bind.is_unspecified() {
                IpAddr::V4(Ipv4Addr::LOCALHOST)
            } else {
                bind
            });
        let apiserver_port = free_port_on(bind);
        let etcd_port = free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let etcd_peer_port = free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST));
        let controller_manager_port = free_port_on(bind);
        let scheduler_port = options.scheduler.then(|| free_port_on(bind));
        let server = format!("https://{}:{apiserver_port}", url_host(advertise));
        let admin_token = random_hex(24);

        let cp = ControlPlane {
            ca_cert: dir.join("pki/ca.crt"),
            ca_key: dir.join("pki/ca.key"),
            serving_cert: dir.join("pki/apiserver.crt"),
            serving_key: dir.join("pki/apiserver.key"),
            sa_key: dir.join("pki/sa.key"),
            admin_kubeconfig: dir.join("admin.kubeconfig"),
            options,
            dir,
            server,
            advertise_address: advertise,
            apiserver_port,
            etcd_port,
            controller_manager_port,
            scheduler_port,
            admin_token,
            procs: Mutex::new(Vec::new()),
            etcd: Mutex::new(None),
            guard: Mutex::new(None),
        };
        cp.make_pki(advertise);
        let mut tokens = format!("{},admin,admin,\"system:masters\"\n", cp.admin_token);
        for (i, t) in cp.options.tokens.iter().enumerate() {
            tokens.push_str(&format!(
                "{},{},test-user-{i},\"{}\"\n",
                t.token,
                t.user,
                t.groups.join(",")
            ));
        }
        let tokens_file = cp.dir.join("pki/tokens.csv");
        std::fs::write(&tokens_file, tokens).expect("token file");
        cp.write_kubeconfig(&cp.admin_kubeconfig, None);

        let d = cp.dir.clone();
        let arg = |flag: &str, p: &Path| format!("--{flag}={}", p.display());
        let opts = cp.options.clone();

        // etcd: no fsync (a test's data dies with it) keeps it fast on a busy disk.
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer_port}");
        let mut etcd_args = vec![
            "--name=outpost-test".to_string(),
            arg("data-dir", &d.join("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=outpost-test={peer_url}"),
            "--unsafe-no-fsync".to_string(),
            "--log-level=warn".to_string(),
        ];
        etcd_args.extend(opts.etcd_args.iter().cloned());
        let etcd = cp.spawn("etcd", &etcd_bin, &etcd_args);
        *cp.etcd.lock().expect("etcd") = Some(etcd);

        let mut api_args = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={bind}"),
            format!("--advertise-address={advertise}"),
            format!("--secure-port={apiserver_port}"),
            arg("tls-cert-file", &cp.serving_cert),
            arg("tls-private-key-file", &cp.serving_key),
            arg("client-ca-file", &cp.ca_cert),
            arg("token-auth-file", &tokens_file),
            "--authorization-mode=Node,RBAC".to_string(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_string(),
            arg("service-account-key-file", &cp.sa_key),
            arg("service-account-signing-key-file", &cp.sa_key),
            format!("--service-cluster-ip-range={}", opts.service_cidr),
            format!("--enable-admission-plugins={ADMISSION_PLUGINS}"),
            "--allow-privileged=true".to_string(),
            arg("cert-dir", &d.join("apiserver-certs")),
            "--profiling=false".to_string(),
        ];
        api_args.extend(opts.apiserver_args.iter().cloned());
        let p = cp.spawn("kube-apiserver", &apiserver_bin, &api_args);
        cp.procs.lock().expect("procs").push(p);
        cp.start_guard();
        cp.wait_apiserver();

        let kubeconfig = cp.admin_kubeconfig.clone();
        let mut kcm_args = vec![
            arg("kubeconfig", &kubeconfig),
            arg("authentication-kubeconfig", &kubeconfig),
            arg("authorization-kubeconfig", &kubeconfig),
            "--leader-elect=false".to_string(),
            "--use-service-account-credentials".to_string(),
            arg("service-account-private-key-file", &cp.sa_key),
            arg("root-ca-file", &cp.ca_cert),
            arg("cluster-signing-cert-file", &cp.ca_cert),
            arg("cluster-signing-key-file", &cp.ca_key),
            format!("--controllers={CONTROLLERS}"),
            format!("--bind-address={bind}"),
            format!("--secure-port={controller_manager_port}"),
            arg("tls-cert-file", &cp.serving_cert),
            arg("tls-private-key-file", &cp.serving_key),
            arg("cert-dir", &d.join("kcm-certs")),
            "--profiling=false".to_string(),
        ];
        kcm_args.extend(opts.controller_manager_args.iter().cloned());
        let p = cp.spawn("kube-controller-manager", &kcm_bin, &kcm_args);
        cp.procs.lock().expect("procs").push(p);

        if let (Some(bin), Some(port)) = (&scheduler_bin, scheduler_port) {
            let mut s_args = vec![
                arg("kubeconfig", &kubeconfig),
                arg("authentication-kubeconfig", &kubeconfig),
                arg("authorization-kubeconfig", &kubeconfig),
                "--leader-elect=false".to_string(),
                format!("--bind-address={bind}"),
                format!("--secure-port={port}"),
                arg("tls-cert-file", &cp.serving_cert),
                arg("tls-private-key-file", &cp.serving_key),
                arg("cert-dir", &d.join("scheduler-certs")),
                "--profiling=false".to_string(),
            ];
            s_args.extend(opts.scheduler_args.iter().cloned());
            let p = cp.spawn("kube-scheduler", bin, &s_args);
            cp.procs.lock().expect("procs").push(p);
        }
        cp.start_guard();

        cp.wait_healthz("kube-controller-manager", controller_manager_port);
        if let Some(port) = scheduler_port {
            cp.wait_healthz("kube-scheduler", port);
        }
        // The controllers really work: the service-account controller made `default`.
        cp.wait_for("the default ServiceAccount", || {
            cp.admin()
                .get("/api/v1/namespaces/default/serviceaccounts/default")
                .0
                == 200
        });
        cp
    }

    fn make_pki(&self, advertise: IpAddr) {
        let pki = self.dir.join("pki");
        std::fs::create_dir_all(&pki).expect("pki dir");
        let openssl = require("openssl");
        run_ok(
            Command::new(&openssl)
                .args(["req", "-x509", "-newkey", "ec"])
                .args([
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-days",
                    "3",
                ])
                .args(["-subj", "/CN=outpost-test-kubernetes-ca"])
                .args(["-addext", "basicConstraints=critical,CA:TRUE"])
                .args([
                    "-addext",
                    "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
                ])
                .arg("-keyout")
                .arg(&self.ca_key)
                .arg("-out")
                .arg(&self.ca_cert),
        );
        run_ok(
            Command::new(&openssl)
                .args([
                    "req",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                ])
                .args(["-nodes", "-subj", "/CN=kube-apiserver"])
                .arg("-keyout")
                .arg(&self.serving_key)
                .arg("-out")
                .arg(pki.join("apiserver.csr")),
        );
        let mut ips = vec![
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise,
            first_address(&self.options.service_cidr),
        ];
        if !self.options.bind_address.is_unspecified() {
            ips.push(self.options.bind_address);
        }
        ips.sort();
        ips.dedup();
        let mut san: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        for dns in [
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ] {
            san.push(format!("DNS:{dns}"));
        }
        std::fs::write(
            pki.join("apiserver.ext"),
            format!(
                "subjectAltName={}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                 extendedKeyUsage=serverAuth\n",
                san.join(",")
            ),
        )
        .expect("ext file");
        run_ok(
            Command::new(&openssl)
                .args(["x509", "-req", "-days", "3"])
                .arg("-in")
                .arg(pki.join("apiserver.csr"))
                .arg("-CA")
                .arg(&self.ca_cert)
                .arg("-CAkey")
                .arg(&self.ca_key)
                .arg("-CAcreateserial")
                .arg("-extfile")
                .arg(pki.join("apiserver.ext"))
                .arg("-out")
                .arg(&self.serving_cert),
        );
        run_ok(
            Command::new(&openssl)
                .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
                .arg("-out")
                .arg(&self.sa_key),
        );
    }

    fn spawn(&self, name: &'static str, bin: &Path, args: &[String]) -> Proc {
        let log = self.dir.join("logs").join(format!("{name}.log"));
        let f = std::fs::File::create(&log).expect("log file");
        let mut cmd = match self.options.command_prefix.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let child = cmd
            .args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(f.try_clone().expect("log file"))
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", bin.display()));
        Proc { name, child, log }
    }

    /// (Re)starts the guard with the PIDs running now; the previous guard is told to exit
    /// by killing it (it has not read EOF, so it stops nothing).
    fn start_guard(&self) {
        let pids: Vec<String> = self
            .procs
            .lock()
            .expect("procs")
            .iter()
            .map(|p| p.child.id().to_string())
            .collect();
        let etcd = self
            .etcd
            .lock()
            .expect("etcd")
            .as_ref()
            .map(|p| p.child.id().to_string())
            .unwrap_or_default();
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(GUARD_SCRIPT)
            .arg("outpost-k8s-guard")
            .arg(&self.dir)
            .arg(etcd)
            .args(pids)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the guard process");
        let stdin = child.stdin.take().expect("guard stdin");
        if let Some((mut old, _stdin)) = self.guard.lock().expect("guard").replace((child, stdin)) {
            let _ = old.kill();
            let _ = old.wait();
        }
    }

    /// Every log's tail, for a failure message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let etcd = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
        let procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
        for p in etcd.iter().chain(procs.iter()) {
            out.push_str(&format!(
                "----- {} ({}), last lines:\n{}\n",
                p.name,
                p.log.display(),
                tail(&p.log, 40)
            ));
        }
        out
    }

    /// Panics (with the logs) if a process has exited.
    fn check_alive(&self) {
        let mut dead = Vec::new();
        {
            let mut etcd = self.etcd.lock().unwrap_or_else(|e| e.into_inner());
            let mut procs = self.procs.lock().unwrap_or_else(|e| e.into_inner());
            for p in etcd.iter_mut().chain(procs.iter_mut()) {
                if let Ok(Some(status)) = p.child.try_wait() {
                    dead.push(format!("{} exited ({status})", p.name));
                }
            }
        }
        if !dead.is_empty() {
            panic!("{}\n{}", dead.join(", "), self.logs());
        }
    }

    /// Polls `cond` every 100 ms until it holds; panics with the logs after the ready timeout
    /// or when a process dies.
    fn wait_for(&self, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + self.options.ready_timeout;
        loop {
            self.check_alive();
            if cond() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not ready within {:?}\n{}",
                    self.options.ready_timeout,
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_apiserver(&self) {
        let rest = self.admin();
        self.wait_for("kube-apiserver /readyz", || rest.get("/readyz").0 == 200);
    }

    fn wait_healthz(&self, name: &str, port: u16) {
        let http = self.http_client();
        let url = format!(
            "https://{}:{port}/healthz",
            // Where clients reach this control plane (the API server's address): with a
            // wildcard bind that is the advertised address, not this process's loopback.
            url_host(if self.options.bind_address.is_unspecified() {
                self.advertise_address
            } else {
                self.options.bind_address
            })
        );
        self.wait_for(&format!("{name} /healthz"), || {
            http.get(&url)
                .send()
                .map(|r| r.status() == 200)
                .unwrap_or(false)
        });
    }

    /// A blocking HTTPS client trusting the cluster CA only.
    pub fn http_client(&self) -> reqwest::blocking::Client {
        let pem = std::fs::read(&self.ca_cert).expect("CA file");
        let ca = reqwest::Certificate::from_pem(&pem).expect("CA certificate");
        reqwest::blocking::Client::builder()
            .no_proxy()
            .tls_certs_only([ca])
            .timeout(Duration::from_secs(30))
            .build()
            .expect("https client")
    }

    /// The `system:masters` bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// The cluster CA as PEM text.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(&self.ca_cert).expect("CA file")
    }

    /// A blocking REST client as the admin.
    pub fn admin(&self) -> Rest {
        self.rest(&self.admin_token)
    }

    /// A blocking REST client with a bearer token.
    pub fn rest(&self, token: &str) -> Rest {
        Rest {
            http: self.http_client(),
            base: self.server.clone(),
            token: token.to_string(),
        }
    }

    /// Kubeconfig text (JSON, which is YAML) for `token` (the admin's if None).
    pub fn kubeconfig_text(&self, token: Option<&str>, namespace: Option<&str>) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(self.ca_pem());
        let mut context = json!({"cluster": "outpost-test", "user": "user"});
        if let Some(ns) = namespace {
            context["namespace"] = json!(ns);
        }
        serde_json::to_string_pretty(&json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "outpost-test",
                          "cluster": {"server": self.server, "certificate-authority-data": ca}}],
            "users": [{"name": "user", "user": {"token": token.unwrap_or(&self.admin_token)}}],
            "contexts": [{"name": "outpost-test", "context": context}],
            "current-context": "outpost-test",
        }))
        .expect("kubeconfig json")
    }

    /// Writes a kubeconfig for `token` (the admin's if None) to `path` (mode 0600: it holds a
    /// credential).
    pub fn write_kubeconfig(&self, path: &Path, token: Option<&str>) {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        f.write_all(self.kubeconfig_text(token, None).as_bytes())
            .expect("write kubeconfig");
    }

    /// A `kube::Client` for `token` (the admin's if None). Call inside a tokio runtime.
    pub async fn client(&self, token: Option<&str>) -> kube::Client {
        let kc = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_text(token, None))
            .expect("kubeconfig parses");
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .expect("kube config");
        kube::Client::try_from(config).expect("kube client")
    }

    /// A token for ServiceAccount `ns/sa` from the TokenRequest API (one hour).
    pub fn service_account_token(&self, ns: &str, sa: &str) -> String {
        let (status, body) = self.admin().post(
            &format!("/api/v1/namespaces/{ns}/serviceaccounts/{sa}/token"),
            &json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": 3600},
            }),
        );
        assert_eq!(status, 201, "TokenRequest for {ns}/{sa}: {body}");
        body["status"]["token"]
            .as_str()
            .expect("a token in the TokenRequest status")
            .to_string()
    }

    /// Creates namespace `name` with `labels` (as the admin).
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let labels: serde_json::Map<String, Value> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
        let (status, body) = self.admin().post(
            "/api/v1/namespaces",
            &json!({"apiVersion": "v1", "kind": "Namespace",
                    "metadata": {"name": name, "labels": labels}}),
        );
        assert_eq!(status, 201, "create namespace {name}: {body}");
    }

    /// Stops every process (Kubernetes first, then etcd) and removes the temp dir.
    fn shutdown(&mut self) {
        let mut procs = std::mem::take(&mut *self.procs.lock().unwrap_or_else(|e| e.into_inner()));
        // The scheduler and controller manager before the API server they talk to.
        while let Some(mut p) = procs.pop() {
            stop(&mut p, Duration::from_secs(10));
        }
        if let Some(mut p) = self.etcd.lock().unwrap_or_else(|e| e.into_inner()).take() {
            stop(&mut p, Duration::from_secs(10));
        }
        if let Some((mut guard, stdin)) =
            self.guard.lock().unwrap_or_else(|e| e.into_inner()).take()
        {
            // EOF: the guard finds nothing of ours left, removes the dir and exits.
            drop(stdin);
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = guard.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = guard.kill();
            let _ = guard.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A minimal blocking JSON client of the API server with one bearer token. Each call returns
/// the HTTP status and the body (Null when empty or not JSON).
pub struct Rest {
    http: reqwest::blocking::Client,
    base: String,
    token: String,
}

impl Rest {
    fn send(&self, req: reqwest::blocking::RequestBuilder) -> (u16, Value) {
        match req.bearer_auth(&self.token).send() {
            Ok(r) => {
                let status = r.status().as_u16();
                let body = r.bytes().unwrap_or_default();
                (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
            }
            // Not listening (yet), reset: no HTTP status.
            Err(_) => (0, Value::Null),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.http.get(self.url(path)))
    }

    /// GET that must answer 200.
    pub fn get_ok(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.post(self.url(path)).json(body))
    }

    pub fn put(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.http.put(self.url(path)).json(body))
    }

    /// A JSON merge patch.
    pub fn patch(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(
            self.http
                .patch(self.url(path))
                .header("content-type", "application/merge-patch+json")
                .body(body.to_string()),
        )
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        self.send(self.http.delete(self.url(path)))
    }
}
