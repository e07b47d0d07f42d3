//! Command line: `outpost-webhook serve`. Every flag also reads `OUTPOST_<FLAG>`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::admission::Admission;
use crate::availability::{self, Checker};
use crate::config::ConfigSource;
use crate::metrics::Metrics;
use crate::server::{self, AppState};
use crate::{secrets, tls};

#[derive(Parser, Debug)]
#[command(
    name = "outpost-webhook",
    version,
    about = "Outpost admission webhook: rewrites pod image references to the connected registry \
             and injects its pull secret, for namespaces labelled outpost.io/inject=enabled. \
             Fails open: it never blocks a pod.",
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
    /// Serve admission reviews (POST /mutate) over HTTPS, with /healthz, /readyz and /metrics
    /// on the same listener, and keep pull-secret copies in opted-in namespaces.
    Serve(Box<ServeArgs>),
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Mirror config (TOML: registry, pull_secret, skip_node_selector, check_availability,
    /// [[rule]]s); re-read when it changes. An invalid edit keeps the previous config.
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: PathBuf,
    /// PEM certificate chain the API server verifies (the webhook's caBundle); re-read when
    /// the file changes.
    #[arg(long, env = "OUTPOST_TLS_CERT")]
    pub tls_cert: PathBuf,
    /// PEM private key of the certificate; re-read when the file changes.
    #[arg(long, env = "OUTPOST_TLS_KEY")]
    pub tls_key: PathBuf,
    /// Address of the HTTPS listener.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// The webhook's own (release) namespace: the source of the pull secret, and pods there
    /// are never mutated. Default: the POD_NAMESPACE environment variable (downward API).
    #[arg(long, env = "OUTPOST_NAMESPACE")]
    pub namespace: Option<String>,
    /// Longest time an admission may take, availability checks included (ms, s suffix). The
    /// API server's own timeout is 10 s; past the budget the pod passes unchanged.
    #[arg(long, env = "OUTPOST_ADMISSION_BUDGET", default_value = "1s", value_parser = parse_duration)]
    pub admission_budget: Duration,
    /// Timeout of one availability check on Outpost (ms, s suffix).
    #[arg(long, env = "OUTPOST_AVAILABILITY_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub availability_timeout: Duration,
    /// How long an availability answer is reused for the same image (ms, s, m suffix).
    #[arg(long, env = "OUTPOST_AVAILABILITY_CACHE_TTL", default_value = "10s", value_parser = parse_duration)]
    pub availability_cache_ttl: Duration,
    /// PEM CA bundle for the Outpost registry's certificate (availability checks), trusted
    /// instead of the system roots. Without it, the system roots verify Outpost.
    #[arg(long, env = "OUTPOST_REGISTRY_CA_FILE")]
    pub registry_ca_file: Option<PathBuf>,
    /// Credentials for availability checks: a `.dockerconfigjson` file (mount the pull
    /// secret), read on every check so rotation applies at once.
    #[arg(long, env = "OUTPOST_REGISTRY_AUTH_FILE")]
    pub registry_auth_file: Option<PathBuf>,
    /// Check availability over plain HTTP (labs only; nodes still pull as configured).
    #[arg(long, env = "OUTPOST_REGISTRY_PLAIN_HTTP")]
    pub registry_plain_http: bool,
    /// Request bodies larger than this many bytes are not read; the pod passes unchanged.
    #[arg(long, env = "OUTPOST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Do not run the pull-secret copy controller (no Kubernetes API access needed).
    #[arg(long, env = "OUTPOST_NO_SECRET_SYNC")]
    pub no_secret_sync: bool,
    /// Period of full pull-secret reconciliations, besides watch events (s, m suffix).
    #[arg(long, env = "OUTPOST_SECRET_RESYNC", default_value = "5m", value_parser = parse_duration)]
    pub secret_resync: Duration,
    /// How often the config, certificate and key files are checked for changes.
    #[arg(long, env = "OUTPOST_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub reload_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Availability(#[from] availability::AvailabilityError),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
    #[error("HTTPS listener on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// `500ms`, `2s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} needs a unit: ms, s, m or h"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!("unknown unit {unit:?} in {s:?}: use ms, s, m or h")),
    }
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
    }
}

async fn serve(args: ServeArgs) -> Result<(), CliError> {
    if args.admission_budget.is_zero() {
        return Err(CliError::Zero("--admission-budget"));
    }
    if args.reload_interval.is_zero() {
        return Err(CliError::Zero("--reload-interval"));
    }
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty());
    let metrics = Arc::new(Metrics::new());
    let config = ConfigSource::new(args.config.clone());
    config.watch(args.reload_interval);
    let tls_loaded = Arc::new(AtomicBool::new(false));
    let tls = tls::load_and_watch(
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.reload_interval,
        Arc::clone(&tls_loaded),
    )?;
    let checker = Checker::new(availability::Settings {
        timeout: args.availability_timeout,
        cache_ttl: args.availability_cache_ttl,
        ca_file: args.registry_ca_file.clone(),
        auth_file: args.registry_auth_file.clone(),
        plain_http: args.registry_plain_http,
    })?;
    if !args.no_secret_sync {
        start_secret_sync(
            namespace.clone(),
            Arc::clone(&config),
            Arc::clone(&metrics),
            args.secret_resync,
        );
    }
    let admission = Arc::new(Admission {
        config: Arc::clone(&config),
        checker: Some(checker),
        own_namespace: namespace,
        budget: args.admission_budget,
        metrics: Arc::clone(&metrics),
    });
    let state = AppState {
        admission,
        metrics,
        config,
        tls_loaded,
        max_body: args.max_body_bytes,
    };
    server::serve(args.listen, tls, state)
        .await
        .map_err(|source| CliError::Serve {
            addr: args.listen,
            source,
        })?;
    tracing::info!("stopped");
    Ok(())
}

/// The copy controller needs the API server; without it the webhook still serves.
fn start_secret_sync(
    namespace: Option<String>,
    config: Arc<ConfigSource>,
    metrics: Arc<Metrics>,
    resync: Duration,
) {
    let Some(namespace) = namespace else {
        tracing::warn!("no --namespace or POD_NAMESPACE: pull-secret copies are not managed");
        return;
    };
    tokio::spawn(async move {
        let client = loop {
            match kube::Client::try_default().await {
                Ok(c) => break c,
                Err(e) => {
                    tracing::warn!(error = %e, "no Kubernetes API access for pull-secret copies; retrying in 30 s (--no-secret-sync turns this off)");
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }
        };
        secrets::run(client, namespace, config, metrics, resync).await;
    });
}
