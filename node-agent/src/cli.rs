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
use crate::reconcile::{Reconciler, Runtime};
use crate::render::RenderOptions;

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
    /// Remove everything the agent wrote on this node, restore what it changed, and exit.
    Cleanup(TargetArgs),
}

#[derive(clap::Args, Debug, Clone)]
pub struct TargetArgs {
    /// Prefix of every path the agent reads or writes: where the node's root filesystem is
    /// mounted (a DaemonSet mounts the host's /etc/containerd or /etc/rancher there).
    #[arg(long, env = "OUTPOST_ROOT", default_value = "/")]
    pub root: PathBuf,
    /// Which runtime configuration to write: containerd's hosts directory, or k3s's
    /// registries.yaml (k3s must restart to read it).
    #[arg(
        long,
        env = "OUTPOST_RUNTIME",
        value_enum,
        default_value = "containerd"
    )]
    pub runtime: Runtime,
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
    #[arg(long, env = "OUTPOST_CA_FILE")]
    pub ca_file: PathBuf,
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
    /// containerd's config file, relative to --root, checked for config_path and legacy mirrors.
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
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:9102")]
    pub listen: SocketAddr,
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
        config: i.config.clone(),
        ca_file: i.ca_file.clone(),
        credentials_file: i.pull_credentials_file.clone(),
        containerd_config: i.containerd_config.clone(),
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

/// Resolves at SIGTERM or SIGINT. The handlers are installed when this is called (not when
/// the future is first polled), so a signal during start-up still leads to a clean exit.
fn terminated() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run(r) => {
            let shutdown = terminated()?;
            let metrics = Arc::new(Metrics::new());
            let ready = Arc::new(AtomicBool::new(false));
            let opts = options(&r.inputs, Some(&r));
            if opts.node_name.is_none() && !r.no_label {
                tracing::warn!("no --node-name (OUTPOST_NODE_NAME): the node is not labelled");
            }
            let listener = tokio::net::TcpListener::bind(r.listen).await?;
            tracing::info!(address = %r.listen, root = %opts.root.display(), runtime = ?opts.runtime, "node agent started");
            let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
            let server = crate::server::serve(listener, metrics.clone(), ready.clone(), stop_rx);
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
            let ca = std::fs::read_to_string(&opts.ca_file)?;
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
            };
            let t = Instant::now();
            let report = rec.reconcile(&cfg, &ca)?;
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
        Command::Cleanup(t) => {
            let rec = Reconciler {
                root: t.root,
                runtime: t.runtime,
                options: RenderOptions::default(),
            };
            let report = rec.cleanup()?;
            for p in &report.removed {
                println!("removed {}", p.display());
            }
            Ok(ExitCode::SUCCESS)
        }
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
