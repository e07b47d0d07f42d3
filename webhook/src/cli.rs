//! Command line: `outpost-webhook serve`, `certs`, `uninstall`. Every flag also reads
//! `OUTPOST_<FLAG>`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::admission::Admission;
use crate::availability::{self, Checker};
use crate::certs::{self, Leaf, Role, Snapshot, Spec, Timings, pki::Sans};
use crate::config::ConfigSource;
use crate::duration::parse_duration;
use crate::metrics::Metrics;
use crate::nscred::{self, Credentials, KeyFile, NodeCredential, Scope};
use crate::server::{self, AppState};
use crate::{secrets, tls, uninstall};
use outpost_core::RepositoryPattern;

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
    /// Only keep the self-managed certificates (the chart's choice when the webhook is off):
    /// the same manager `serve --manage-certs` runs, with /healthz, /readyz and /metrics over
    /// plain HTTP.
    Certs(Box<CertsArgs>),
    /// Remove what Outpost leaves behind outside its release (a Helm pre-delete hook): the
    /// node agent's DaemonSet (its pods clean their nodes while their RBAC still exists), the
    /// webhook and certificate Deployments, the trusted label on every node, the pull-secret
    /// copies in every namespace and the managed certificate Secrets. NotFound is success.
    Uninstall(Box<uninstall::UninstallArgs>),
}

/// Self-managed certificates: a CA and serving certificates kept in Secrets of the release
/// namespace, shared by every replica, renewed with a third of their validity left, the CA
/// rotated with overlap; the webhook configuration's caBundle kept equal to the trust bundle.
#[derive(clap::Args, Debug, Clone)]
pub struct CertArgs {
    /// Manage the certificates below through the Kubernetes API (needs --ca-secret and at
    /// least one of --webhook-tls-secret, --registry-tls-secret).
    #[arg(long, env = "OUTPOST_MANAGE_CERTS")]
    pub manage_certs: bool,
    /// Secret (kubernetes.io/tls) holding the signing CA (tls.crt, tls.key) and the trust
    /// bundle (ca.crt: every CA trusted now, newest first).
    #[arg(long, env = "OUTPOST_CA_SECRET")]
    pub ca_secret: Option<String>,
    /// Secret for the webhook's serving certificate; `serve` then serves HTTPS with it, read
    /// through the API (no --tls-cert/--tls-key).
    #[arg(long, env = "OUTPOST_WEBHOOK_TLS_SECRET")]
    pub webhook_tls_secret: Option<String>,
    /// DNS name of the webhook's certificate (repeatable; env: comma-separated).
    #[arg(
        long = "webhook-dns-name",
        env = "OUTPOST_WEBHOOK_DNS_NAMES",
        value_delimiter = ','
    )]
    pub webhook_dns_names: Vec<String>,
    /// Secret for the registry's serving certificate (tls.crt, tls.key, ca.crt = the bundle);
    /// `serve` then checks availability trusting the bundle.
    #[arg(long, env = "OUTPOST_REGISTRY_TLS_SECRET")]
    pub registry_tls_secret: Option<String>,
    /// DNS name of the registry's certificate (repeatable; env: comma-separated).
    #[arg(
        long = "registry-dns-name",
        env = "OUTPOST_REGISTRY_DNS_NAMES",
        value_delimiter = ','
    )]
    pub registry_dns_names: Vec<String>,
    /// IP address of the registry's certificate (repeatable; env: comma-separated).
    #[arg(
        long = "registry-ip",
        env = "OUTPOST_REGISTRY_IPS",
        value_delimiter = ','
    )]
    pub registry_ips: Vec<IpAddr>,
    /// MutatingWebhookConfiguration whose every webhook's caBundle is kept equal to the trust
    /// bundle (re-set if something resets it).
    #[arg(long, env = "OUTPOST_WEBHOOK_CONFIGURATION")]
    pub webhook_configuration: Option<String>,
    /// Validity of a new CA (rotation starts with a third left).
    #[arg(long, env = "OUTPOST_CA_VALIDITY", default_value = "26280h", value_parser = parse_duration, hide = true)]
    pub ca_validity: Duration,
    /// Validity of a new serving certificate (renewed with a third left).
    #[arg(long, env = "OUTPOST_CERT_VALIDITY", default_value = "2160h", value_parser = parse_duration, hide = true)]
    pub cert_validity: Duration,
    /// How long a new CA is trusted (in the bundle) before it signs.
    #[arg(long, env = "OUTPOST_CA_OVERLAP", default_value = "720h", value_parser = parse_duration, hide = true)]
    pub ca_overlap: Duration,
    /// Period of full certificate checks besides watch events.
    #[arg(long, env = "OUTPOST_CERT_CHECK_INTERVAL", default_value = "5m", value_parser = parse_duration, hide = true)]
    pub cert_check_interval: Duration,
    /// How long `serve` waits for its managed certificate before it gives up.
    #[arg(long, env = "OUTPOST_CERT_WAIT", default_value = "5m", value_parser = parse_duration, hide = true)]
    pub cert_wait: Duration,
}

impl CertArgs {
    /// The manager's spec, or None when certificates are not managed.
    pub fn spec(&self, namespace: Option<&str>) -> Result<Option<Spec>, CliError> {
        if !self.manage_certs {
            return Ok(None);
        }
        let usage = |m: &str| Err(CliError::Usage(m.to_owned()));
        let Some(namespace) = namespace else {
            return usage("--manage-certs needs --namespace (or POD_NAMESPACE)");
        };
        let Some(ca_secret) = self.ca_secret.clone() else {
            return usage("--manage-certs needs --ca-secret");
        };
        let mut leaves = Vec::new();
        if let Some(secret) = &self.webhook_tls_secret {
            if self.webhook_dns_names.is_empty() {
                return usage("--webhook-tls-secret needs at least one --webhook-dns-name");
            }
            leaves.push(Leaf {
                role: Role::Webhook,
                secret: secret.clone(),
                sans: Sans {
                    dns: self.webhook_dns_names.iter().cloned().collect(),
                    ips: Default::default(),
                },
            });
        }
        if let Some(secret) = &self.registry_tls_secret {
            if self.registry_dns_names.is_empty() && self.registry_ips.is_empty() {
                return usage("--registry-tls-secret needs a --registry-dns-name or --registry-ip");
            }
            leaves.push(Leaf {
                role: Role::Registry,
                secret: secret.clone(),
                sans: Sans {
                    dns: self.registry_dns_names.iter().cloned().collect(),
                    ips: self.registry_ips.iter().copied().collect(),
                },
            });
        }
        if leaves.is_empty() {
            return usage("--manage-certs needs --webhook-tls-secret or --registry-tls-secret");
        }
        let timings = Timings {
            ca_validity: self.ca_validity,
            cert_validity: self.cert_validity,
            overlap: self.ca_overlap,
        };
        timings.check().map_err(CliError::Usage)?;
        if self.cert_check_interval.is_zero() {
            return Err(CliError::Zero("--cert-check-interval"));
        }
        Ok(Some(Spec {
            namespace: namespace.to_owned(),
            ca_secret,
            leaves,
            webhook_configuration: self.webhook_configuration.clone(),
            timings,
            check_interval: self.cert_check_interval,
        }))
    }
}

#[derive(clap::Args, Debug)]
pub struct CertsArgs {
    #[command(flatten)]
    pub certs: CertArgs,
    /// The release namespace the Secrets live in. Default: POD_NAMESPACE (downward API).
    #[arg(long, env = "OUTPOST_NAMESPACE")]
    pub namespace: Option<String>,
    /// Plain-HTTP listener for /healthz and /readyz (ready once a pass has succeeded).
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// After SIGTERM or SIGINT, answer /readyz with 503 at once and serve on this long
    /// before stopping (s suffix; a second signal cuts it short).
    #[arg(long, env = "OUTPOST_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Mirror config (TOML: registry, pull_secret, skip_node_selector, check_availability,
    /// [[rule]]s); re-read when it changes. An invalid edit keeps the previous config.
    #[arg(long, env = "OUTPOST_CONFIG")]
    pub config: PathBuf,
    /// PEM certificate chain the API server verifies (the webhook's caBundle); re-read when
    /// the file changes. Not with --webhook-tls-secret.
    #[arg(long, env = "OUTPOST_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of the certificate; re-read when the file changes.
    #[arg(long, env = "OUTPOST_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Address of the HTTPS listener.
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: SocketAddr,
    /// Also serve /metrics (and /healthz, /readyz) on this address over plain HTTP, so
    /// Prometheus scrapes without TLS settings. No admissions there.
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// After SIGTERM or SIGINT, answer /readyz with 503 at once (on both listeners) and keep
    /// serving admissions this long, so endpoints drop the pod first; then stop accepting and
    /// let in-flight admissions finish (up to 30 s). A second signal cuts the delay short.
    #[arg(long, env = "OUTPOST_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
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
    /// secret), read on every check so rotation applies at once. Without it (or without the
    /// registry host in it) and with --namespace-credential-key-file, each check mints a
    /// credential of its own (the webhook's namespace, pull everything, 5 minutes).
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
    /// Mint a credential of its own for every opted-in namespace instead of copying the pull
    /// secret: signed with the first key of this file (the registry's
    /// --token-signing-key-file, one base64 key per line), scoped to pull the namespace's
    /// `outpost.io/repositories` annotation or --namespace-default-scope. Re-read when it
    /// changes; a new signing key re-mints every credential.
    #[arg(long, env = "OUTPOST_NAMESPACE_CREDENTIAL_KEY_FILE")]
    pub namespace_credential_key_file: Option<PathBuf>,
    /// Validity of a namespace credential (m, h suffix); renewed at half of it.
    #[arg(long, env = "OUTPOST_NAMESPACE_CREDENTIAL_LIFETIME", default_value = "8h", value_parser = parse_duration)]
    pub namespace_credential_lifetime: Duration,
    /// Repository patterns of namespaces without the annotation (repeatable; env and value:
    /// comma-separated; an empty value: such namespaces get no credential).
    #[arg(
        long = "namespace-default-scope",
        env = "OUTPOST_NAMESPACE_DEFAULT_SCOPE",
        value_delimiter = ',',
        default_value = "**"
    )]
    pub namespace_default_scope: Vec<String>,
    /// Keep a Secret of this name in the webhook's namespace holding a credential for the
    /// nodes' mirror path (the node agent's --pull-credentials-file), pulling
    /// --node-scope (with --namespace-credential-key-file).
    #[arg(long, env = "OUTPOST_NODE_CREDENTIAL_SECRET")]
    pub node_credential_secret: Option<String>,
    /// Repository patterns of the node credential (repeatable; env and value: comma-separated;
    /// empty, the default: no node credential, an existing one of ours is deleted).
    #[arg(long = "node-scope", env = "OUTPOST_NODE_SCOPE", value_delimiter = ',')]
    pub node_scope: Vec<String>,
    /// How often the config, certificate and key files are checked for changes.
    #[arg(long, env = "OUTPOST_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub reload_interval: Duration,
    #[command(flatten)]
    pub certs: CertArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Availability(#[from] availability::AvailabilityError),
    #[error("{0} must be more than zero")]
    Zero(&'static str),
    #[error("{0}")]
    Usage(String),
    #[error("no Kubernetes API access: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Uninstall(#[from] uninstall::UninstallError),
    #[error("health or metrics listener on {addr}: {source}")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTPS listener on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => serve(*args).await,
        Command::Certs(args) => certs_only(*args).await,
        Command::Uninstall(args) => {
            let client = kube::Client::try_default().await?;
            uninstall::run(&client, &args).await?;
            Ok(())
        }
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
    let config = ConfigSource::new(args.config.clone());
    config.watch(args.reload_interval);
    let spec = args.certs.spec(namespace.as_deref())?;
    let managed_webhook = spec
        .as_ref()
        .and_then(|_| args.certs.webhook_tls_secret.clone());
    let managed_registry = spec.as_ref().and_then(|s| {
        s.leaves
            .iter()
            .find(|l| l.role == Role::Registry)
            .map(|l| l.secret.clone())
    });
    if managed_registry.is_some() && args.registry_ca_file.is_some() {
        return Err(CliError::Usage(
            "--registry-ca-file and a managed --registry-tls-secret exclude each other".into(),
        ));
    }
    let metrics = Arc::new(Metrics::new());
    let snapshots = match spec {
        Some(spec) => Some(certs::manager::spawn(
            kube::Client::try_default().await?,
            spec,
            Arc::clone(&metrics),
        )),
        None => None,
    };
    let tls_loaded = Arc::new(AtomicBool::new(false));
    let tls = match (&managed_webhook, &args.tls_cert, &args.tls_key, &snapshots) {
        (Some(secret), None, None, Some(rx)) => {
            tls::from_manager(
                rx.clone(),
                secret.clone(),
                args.certs.cert_wait,
                Arc::clone(&tls_loaded),
            )
            .await?
        }
        (None, Some(cert), Some(key), _) => tls::load_and_watch(
            cert.clone(),
            key.clone(),
            args.reload_interval,
            Arc::clone(&tls_loaded),
        )?,
        (Some(_), _, _, _) => {
            return Err(CliError::Usage(
                "--tls-cert/--tls-key and a managed --webhook-tls-secret exclude each other".into(),
            ));
        }
        _ => {
            return Err(CliError::Usage(
                "serve needs --tls-cert and --tls-key, or --manage-certs with --webhook-tls-secret"
                    .into(),
            ));
        }
    };
    let credentials = namespace_credentials(&args)?;
    let checker = Checker::new(availability::Settings {
        timeout: args.availability_timeout,
        cache_ttl: args.availability_cache_ttl,
        ca_file: args.registry_ca_file.clone(),
        auth_file: args.registry_auth_file.clone(),
        plain_http: args.registry_plain_http,
        mint: credentials.as_ref().map(|c| availability::CheckMint {
            credentials: Arc::clone(c),
            namespace: namespace.clone().unwrap_or_else(|| "outpost".to_owned()),
        }),
    })?;
    if let (Some(_), Some(rx)) = (&managed_registry, &snapshots) {
        follow_bundle(rx.clone(), Arc::clone(&checker));
    }
    // Only the controller knows the namespaces' scopes: without it, images move as before.
    let scopes = credentials
        .as_ref()
        .filter(|_| !args.no_secret_sync)
        .map(|c| Arc::clone(&c.scopes));
    if !args.no_secret_sync {
        start_secret_sync(
            namespace.clone(),
            Arc::clone(&config),
            Arc::clone(&metrics),
            args.secret_resync,
            credentials.map(|c| (c, args.reload_interval)),
        );
    }
    let admission = Arc::new(Admission {
        config: Arc::clone(&config),
        checker: Some(checker),
        own_namespace: namespace,
        scopes,
        budget: args.admission_budget,
        metrics: Arc::clone(&metrics),
    });
    let state = AppState {
        admission,
        metrics,
        config,
        tls_loaded,
        max_body: args.max_body_bytes,
        draining: Arc::new(AtomicBool::new(false)),
    };
    // Bound now, so a taken port stops the start with its address.
    let metrics_listener = match args.metrics_listen {
        Some(addr) => Some(bind_plain(addr).map_err(|source| CliError::Health { addr, source })?),
        None => None,
    };
    server::serve(
        args.listen,
        tls,
        state,
        metrics_listener,
        args.shutdown_delay,
    )
    .await
    .map_err(|source| CliError::Serve {
        addr: args.listen,
        source,
    })?;
    tracing::info!("stopped");
    Ok(())
}

/// A plain-HTTP listener, non-blocking as tokio needs it.
fn bind_plain(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Availability checks trust the managed bundle, as it is now and after every rotation.
fn follow_bundle(
    mut rx: tokio::sync::watch::Receiver<Option<Arc<Snapshot>>>,
    checker: Arc<Checker>,
) {
    tokio::spawn(async move {
        let mut trusted = String::new();
        loop {
            let bundle = rx.borrow_and_update().as_ref().map(|s| s.bundle.clone());
            if let Some(b) = bundle
                && b != trusted
            {
                match checker.set_ca_bundle(b.as_bytes()) {
                    Ok(()) => trusted = b,
                    Err(e) => {
                        tracing::warn!(error = %e, "availability checks keep the previous trust bundle")
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// `certs`: the manager alone, with health endpoints for the kubelet's probes.
async fn certs_only(args: CertsArgs) -> Result<(), CliError> {
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty());
    let mut certs = args.certs.clone();
    // The subcommand exists to manage: the flag is implied.
    certs.manage_certs = true;
    let Some(spec) = certs.spec(namespace.as_deref())? else {
        return Err(CliError::Usage("nothing to manage".into()));
    };
    let metrics = Arc::new(Metrics::new());
    let rx = certs::manager::spawn(
        kube::Client::try_default().await?,
        spec,
        Arc::clone(&metrics),
    );
    let draining = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&draining);
    let ready = move || rx.borrow().is_some() && !flag.load(std::sync::atomic::Ordering::SeqCst);
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok\n" }))
        .route(
            "/metrics",
            axum::routing::get(move || {
                let text = metrics.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    )
                }
            }),
        )
        .route(
            "/readyz",
            axum::routing::get(move || {
                let ok = ready();
                async move {
                    if ok {
                        (axum::http::StatusCode::OK, "ready\n")
                    } else {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "not ready: shutting down, or no certificate pass has succeeded yet\n",
                        )
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|source| CliError::Health {
            addr: args.listen,
            source,
        })?;
    tracing::info!(addr = %args.listen, "certificate manager running; health on plain HTTP");
    let signals = server::Signals::new();
    let delay = args.shutdown_delay;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            server::drain_after_signal(signals, &draining, delay).await;
        })
        .await
        .map_err(|source| CliError::Health {
            addr: args.listen,
            source,
        })?;
    Ok(())
}

/// Namespace-credential mode, when a key file is given. The file is read now so that a wrong
/// path shows in the log at start (the controller keeps retrying; the webhook still serves).
fn namespace_credentials(args: &ServeArgs) -> Result<Option<Arc<Credentials>>, CliError> {
    let Some(path) = &args.namespace_credential_key_file else {
        return Ok(None);
    };
    if args.namespace_credential_lifetime < Duration::from_secs(2) {
        return Err(CliError::Usage(
            "--namespace-credential-lifetime must be at least 2s".into(),
        ));
    }
    let patterns = scope_flag("--namespace-default-scope", &args.namespace_default_scope)?;
    let node = match &args.node_credential_secret {
        Some(secret) => Some(NodeCredential {
            secret: secret.clone(),
            scope: Scope::new(scope_flag("--node-scope", &args.node_scope)?),
        }),
        None if args.node_scope.iter().any(|p| !p.trim().is_empty()) => {
            return Err(CliError::Usage(
                "--node-scope needs --node-credential-secret".into(),
            ));
        }
        None => None,
    };
    let keys = KeyFile::new(path.clone(), nscred::parse_key_file);
    if let Err(e) = keys.reload() {
        tracing::error!(error = %e, "namespace credentials are not minted until the key file loads");
    }
    Ok(Some(Arc::new(Credentials::new(
        keys,
        args.namespace_credential_lifetime,
        Scope::new(patterns),
        node,
    ))))
}

/// Repository patterns of a comma-separated scope flag (blank entries ignored).
fn scope_flag(flag: &str, values: &[String]) -> Result<Vec<RepositoryPattern>, CliError> {
    let mut patterns = Vec::new();
    for p in values.iter().map(|p| p.trim()).filter(|p| !p.is_empty()) {
        patterns.push(
            p.parse::<RepositoryPattern>()
                .map_err(|e| CliError::Usage(format!("{flag}: {e}")))?,
        );
    }
    if patterns.len() > nscred::MAX_PATTERNS {
        return Err(CliError::Usage(format!(
            "{flag}: at most {} patterns",
            nscred::MAX_PATTERNS
        )));
    }
    Ok(patterns)
}

/// The copy controller needs the API server; without it the webhook still serves.
fn start_secret_sync(
    namespace: Option<String>,
    config: Arc<ConfigSource>,
    metrics: Arc<Metrics>,
    resync: Duration,
    credentials: Option<(Arc<Credentials>, Duration)>,
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
        secrets::run(client, namespace, config, metrics, resync, credentials).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve_args(extra: &[&str]) -> ServeArgs {
        let mut argv = vec!["outpost-webhook", "serve", "--config=/c.toml"];
        argv.extend_from_slice(extra);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(a) => *a,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn namespace_credential_flags() {
        let a = serve_args(&[]);
        assert!(namespace_credentials(&a).unwrap().is_none(), "copy mode");
        let a = serve_args(&["--namespace-credential-key-file=/nonexistent/keys"]);
        let c = namespace_credentials(&a).unwrap().unwrap();
        assert_eq!(c.default_scope.to_string(), "**");
        assert_eq!(c.lifetime, Duration::from_secs(8 * 3600));
        // The chart's rendering of `default: []` and of a list.
        let a = serve_args(&[
            "--namespace-credential-key-file=/k",
            "--namespace-default-scope=",
        ]);
        assert!(
            namespace_credentials(&a)
                .unwrap()
                .unwrap()
                .default_scope
                .is_empty()
        );
        let a = serve_args(&[
            "--namespace-credential-key-file=/k",
            "--namespace-default-scope=team-a/**,base/*",
            "--namespace-credential-lifetime=90m",
        ]);
        let c = namespace_credentials(&a).unwrap().unwrap();
        assert_eq!(c.default_scope.to_string(), "base/*, team-a/**");
        assert_eq!(c.lifetime, Duration::from_secs(90 * 60));
        assert!(c.node.is_none());
        // The chart's rendering of trustDistribution.nodeScope: [] and of a list.
        let a = serve_args(&[
            "--namespace-credential-key-file=/k",
            "--node-credential-secret=outpost-node-pull",
            "--node-scope=",
        ]);
        let c = namespace_credentials(&a).unwrap().unwrap();
        let node = c.node.as_ref().expect("node credential");
        assert_eq!(node.secret, "outpost-node-pull");
        assert!(node.scope.is_empty());
        let a = serve_args(&[
            "--namespace-credential-key-file=/k",
            "--node-credential-secret=outpost-node-pull",
            "--node-scope=base/*,library/**",
        ]);
        let c = namespace_credentials(&a).unwrap().unwrap();
        assert_eq!(
            c.node.as_ref().unwrap().scope.to_string(),
            "base/*, library/**"
        );
        for bad in [
            &["--namespace-default-scope=Team/**"][..],
            &["--namespace-credential-lifetime=1s"][..],
            &["--node-scope=base/*"][..],
            &["--node-credential-secret=n", "--node-scope=Base"][..],
        ] {
            let mut argv = vec!["--namespace-credential-key-file=/k"];
            argv.extend_from_slice(bad);
            assert!(
                matches!(
                    namespace_credentials(&serve_args(&argv)),
                    Err(CliError::Usage(_))
                ),
                "{bad:?}"
            );
        }
    }
}
