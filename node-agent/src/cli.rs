//! The command line: `run` (the DaemonSet's loop), `reconcile` (one pass) and `cleanup`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use crate::agent::{Agent, AgentOptions};
use crate::metrics::Metrics;
use crate::node::{NodeApi, TRUSTED_LABEL};
use crate::reconcile::{Reconciler, Runtime};
use crate::render::{Layout, RenderOptions, relative_to_root};

#[derive(Parser, Debug)]
#[command(
    name = "outpost-node-agent",
    version,
    about = "Outpost node agent: configures containerd (certs.d hosts.toml) and k3s \
             (registries.yaml) on each node to trust Outpost's CA and mirror upstream registries \
             through it, and removes what it wrote on cleanup.",
    arg_required_else_help = true
)]
pub struct Cli {
    #[command(flatten)]
    pub log: outpost_logging::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Keep the node's registry configuration in line with the config until SIGTERM.
    Run(RunArgs),
    /// Reconcile once, print what changed, and exit (1 on failure or refused files).
    Reconcile(InputArgs),
    /// Remove everything the agent wrote on this node, restore what it changed, remove the
    /// node's `outpost.io/trusted` label, and exit (the DaemonSet's preStop).
    Cleanup(CleanupArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Prefix of every path the agent reads or writes: where the node's root filesystem is
    /// mounted (a DaemonSet mounts the host's /etc/containerd or /etc/rancher there).
    #[arg(long, env = "OUTPOST_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Which runtime configuration to write: containerd's hosts directory (also MicroK8s and
    /// k0s, with --hosts-dir), or k3s's or RKE2's registries.yaml (read only at start, so
    /// k3s or RKE2 must restart).
    #[arg(
        long,
        env = "OUTPOST_RUNTIME",
        value_enum,
        default_value = "containerd"
    )]
    pub runtime: Runtime,
    /// containerd's hosts directory (its CRI registry `config_path`) as the node sees it;
    /// written under --root. MicroK8s: /var/snap/microk8s/current/args/certs.d; k0s: the
    /// config_path its containerd.d drop-in names, e.g. /etc/k0s/certs.d.
    #[arg(
        long,
        env = "OUTPOST_HOSTS_DIR",
        default_value = "/etc/containerd/certs.d"
    )]
    pub hosts_dir: PathBuf,
    /// registries.yaml as the node sees it (--runtime k3s or rke2); written under --root.
    /// Default: /etc/rancher/k3s/registries.yaml (k3s), /etc/rancher/rke2/registries.yaml
    /// (rke2). The registry's CA goes to `outpost/` beside it.
    #[arg(long, env = "OUTPOST_REGISTRIES_YAML")]
    pub registries_yaml: Option<PathBuf>,
}

impl TargetArgs {
    /// Where the runtime's files are, relative to the root.
    pub fn layout(&self) -> Layout {
        let default = self.runtime.default_layout();
        Layout {
            hosts_dir: relative_to_root(&self.hosts_dir),
            registries_yaml: self
                .registries_yaml
                .as_deref()
                .map_or(default.registries_yaml, relative_to_root),
        }
    }
}

#[derive(clap::Args, Debug, Clone)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Node whose `outpost.io/trusted` label is removed (downward API: spec.nodeName).
    #[arg(long, env = "OUTPOST_NODE_NAME")]
    pub node_name: Option<String>,
    /// Do not use the Kubernetes API (the label stays).
    #[arg(long, env = "OUTPOST_NO_LABEL")]
    pub no_label: bool,
}

#[derive(clap::Args, Debug, Clone)]
pub struct InputArgs {
    #[command(flatten)]
    pub target: TargetArgs,
    /// Mirror configuration (TOML: `registry`, `[[rule]] upstream/repositories/ca_file/plain_http`;
    /// the webhook's file works as is). Re-read when it changes.
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: PathBuf,
    /// PEM CA certificate of the Outpost registry's HTTPS certificate. Re-read when it changes.
    /// Not needed when the config says `registry_plain_http = true` (labs).
    #[arg(long, env = "OUTPOST_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// `.dockerconfigjson` holding a read-only token for the registry: sent by containerd as a
    /// static Authorization header (k3s: configs.auth). Off by default: every pod on the node
    /// then pulls with this token, whatever its own imagePullSecrets say.
    #[arg(long, env = "OUTPOST_PULL_CREDENTIALS_FILE")]
    pub pull_credentials_file: Option<PathBuf>,
    /// How long containerd waits to connect to the registry before falling back to the upstream
    /// (`dial_timeout` in hosts.toml, honoured from containerd 2.1; 1.6 and 1.7 ignore the key
    /// and fall back only once the connection is refused or times out). 0 leaves it out.
    #[arg(long, env = "OUTPOST_DIAL_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub dial_timeout: Duration,
    /// containerd's config file as the node sees it (under --root), checked for config_path
    /// and legacy mirrors (MicroK8s: /var/snap/microk8s/current/args/containerd.toml; k0s:
    /// /etc/k0s/containerd.toml).
    #[arg(
        long,
        env = "OUTPOST_CONTAINERD_CONFIG",
        default_value = "etc/containerd/config.toml"
    )]
    pub containerd_config: PathBuf,
}

#[derive(clap::Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub inputs: InputArgs,
    /// On SIGTERM, remove everything the agent wrote (and the node label) before exiting.
    #[arg(long, env = "OUTPOST_CLEANUP_ON_EXIT")]
    pub cleanup_on_exit: bool,
    /// Node name for the `outpost.io/trusted` label and events (downward API: spec.nodeName).
    #[arg(long, env = "OUTPOST_NODE_NAME")]
    pub node_name: Option<String>,
    /// Do not use the Kubernetes API (no label, no events).
    #[arg(long, env = "OUTPOST_NO_LABEL")]
    pub no_label: bool,
    /// Address for /healthz, /readyz and /metrics (plain HTTP).
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:9102")]
    pub listen: SocketAddr,
    /// Also serve /metrics (and /healthz, /readyz) on this address, plain HTTP, e.g. to
    /// expose metrics to Prometheus on another interface than the probes.
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// After SIGTERM or SIGINT, answer /readyz with 503 at once and keep running (files in
    /// place, endpoints answering) this long before cleaning up and stopping; a second
    /// signal cuts it short.
    #[arg(long, env = "OUTPOST_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// How often the inputs are re-read for changes.
    #[arg(long, env = "OUTPOST_INTERVAL", default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
    /// Reconcile (and re-check containerd's config) at least this often, changed or not, so
    /// files edited or deleted by hand come back.
    #[arg(long, env = "OUTPOST_RECHECK_INTERVAL", default_value = "60s", value_parser = parse_duration)]
    pub recheck_interval: Duration,
}

/// `500ms`, `5s`, `2m`, `1h`, or plain seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (500ms, 5s, 2m, 1h)"))?;
    Ok(match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    })
}

fn options(i: &InputArgs, run: Option<&RunArgs>) -> AgentOptions {
    AgentOptions {
        root: i.target.root.clone(),
        runtime: i.target.runtime,
        layout: i.target.layout(),
        config: i.config.clone(),
        ca_file: i.ca_file.clone(),
        credentials_file: i.pull_credentials_file.clone(),
        containerd_config: relative_to_root(&i.containerd_config),
        dial_timeout: (!i.dial_timeout.is_zero()).then_some(i.dial_timeout),
        interval: run.map_or(Duration::from_secs(2), |r| {
            r.interval.max(Duration::from_millis(50))
        }),
        recheck: run.map_or(Duration::from_secs(60), |r| r.recheck_interval),
        cleanup_on_exit: run.is_some_and(|r| r.cleanup_on_exit),
        node_name: run.and_then(|r| {
            if r.no_label {
                None
            } else {
                r.node_name.clone()
            }
        }),
    }
}

/// SIGTERM and SIGINT, installed when made (not when first awaited), so a signal during
/// start-up still leads to a clean exit; a second signal is told apart from the first.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Resolves once the agent should stop: at the first signal readiness turns off at once
/// (the listeners still answer), then after `delay` or a second signal.
async fn drain_after_signal(mut signals: Signals, draining: Arc<AtomicBool>, delay: Duration) {
    signals.next().await;
    draining.store(true, std::sync::atomic::Ordering::SeqCst);
    if delay.is_zero() {
        return;
    }
    tracing::info!(
        delay_seconds = delay.as_secs_f64(),
        "shutting down: not ready, running on for the shutdown delay"
    );
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = signals.next() => tracing::info!("second signal: shutdown delay cut short"),
    }
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(r) => {
            let signals = Signals::new()?;
            let draining = Arc::new(AtomicBool::new(false));
            let shutdown = drain_after_signal(signals, draining.clone(), r.shutdown_delay);
            let metrics = Arc::new(Metrics::new());
            let ready = Arc::new(AtomicBool::new(false));
            let opts = options(&r.inputs, Some(&r));
            if opts.node_name.is_none() && !r.no_label {
                tracing::warn!("no --node-name (OUTPOST_NODE_NAME): the node is not labelled");
            }
            let listener = tokio::net::TcpListener::bind(r.listen).await?;
            let metrics_listener = match r.metrics_listen {
                Some(addr) => Some(
                    tokio::net::TcpListener::bind(addr)
                        .await
                        .map_err(|e| anyhow::anyhow!("metrics listener on {addr}: {e}"))?,
                ),
                None => None,
            };
            tracing::info!(address = %r.listen, metrics_address = ?r.metrics_listen, root = %opts.root.display(), runtime = ?opts.runtime, "node agent started");
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let server = crate::server::serve(
                listener,
                metrics_listener,
                crate::server::Health {
                    metrics: metrics.clone(),
                    ready: ready.clone(),
                    draining,
                },
                stop_rx,
            );
            let server = tokio::spawn(server);
            let agent = Agent::new(opts, metrics, ready).await;
            agent.run(shutdown).await;
            let _ = stop_tx.send(true);
            let _ = server.await;
            tracing::info!("node agent stopped");
            Ok(ExitCode::SUCCESS)
        }
        Command::Reconcile(i) => {
            let opts = options(&i, None);
            let cfg: outpost_core::MirrorConfig = std::fs::read_to_string(&opts.config)?
                .parse()
                .map_err(|e| anyhow::anyhow!("{}: {e}", opts.config.display()))?;
            let ca = match &opts.ca_file {
                Some(p) => Some(std::fs::read_to_string(p)?),
                None => None,
            };
            let mut ro = RenderOptions {
                dial_timeout: opts.dial_timeout,
                ..Default::default()
            };
            if let Some(p) = &opts.credentials_file {
                let (h, b) = crate::agent::credentials_for(
                    &std::fs::read_to_string(p)?,
                    cfg.registry.as_str(),
                    p,
                )?;
                ro.authorization = Some(h);
                ro.basic = Some(b);
            }
            let rec = Reconciler {
                root: opts.root,
                runtime: opts.runtime,
                options: ro,
                layout: opts.layout,
            };
            let t = Instant::now();
            let report = rec.reconcile(&cfg, ca.as_deref())?;
            let took = t.elapsed();
            for p in &report.written {
                println!("wrote {}", p.display());
            }
            for p in &report.removed {
                println!("removed {}", p.display());
            }
            for p in &report.refused {
                println!("refused {p} (not managed by outpost-node-agent)");
            }
            println!(
                "{} hosts configured, registry trusted: {}, in {:.3} ms",
                report.configured_hosts,
                report.registry_trusted,
                took.as_secs_f64() * 1000.0
            );
            Ok(if report.refused.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Cleanup(c) => {
            let rec = Reconciler {
                root: c.target.root.clone(),
                runtime: c.target.runtime,
                options: RenderOptions::default(),
                layout: c.target.layout(),
            };
            // The label goes even when the files cannot: it is what sends pods here.
            let files = rec.cleanup();
            if let Ok(report) = &files {
                for p in &report.removed {
                    println!("removed {}", p.display());
                }
            }
            let label = match (&c.node_name, c.no_label) {
                (Some(name), false) => remove_label(name).await,
                _ => Ok(()),
            };
            files?;
            match label {
                Ok(()) => Ok(ExitCode::SUCCESS),
                Err(e) => {
                    eprintln!("cannot remove the node label: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

/// Removes the node's trusted label, within [`crate::node::API_TIMEOUT`] plus the client's set-up.
async fn remove_label(name: &str) -> Result<(), String> {
    let call = async {
        let api = NodeApi::connect(name.to_owned())
            .await
            .map_err(|e| e.to_string())?;
        api.set_trusted(false).await.map_err(|e| e.to_string())
    };
    let bound = crate::node::API_TIMEOUT + Duration::from_secs(5);
    match tokio::time::timeout(bound, call).await {
        Ok(Ok(())) => {
            println!("removed label {TRUSTED_LABEL} from node {name}");
            Ok(())
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no answer within {bound:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
