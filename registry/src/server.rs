//! `outpost-registry serve`: the listeners, background upkeep and graceful shutdown.

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum_server::Handle;
use axum_server::tls_rustls::RustlsConfig;
use tokio::task::JoinSet;

use crate::api::{self, AppState};
use crate::auth::{Anonymous, Auth, AuthError, AuthOptions};
use crate::config::Mode;
use crate::leader::kubernetes::KubeLease;
use crate::leader::store::StoreLease;
use crate::leader::{Leadership, Lease};
use crate::metrics::Metrics;
use crate::service::usage::{PUBLISH_INTERVAL, Usage};
use crate::storage::Store;
use crate::storage::fs::FsStore;
use crate::sync::schedule::Schedule;
use crate::sync::{ConnectionSource, SyncError, SyncOptions, Syncer};
use crate::tls;

/// In-flight requests get this long to finish after SIGTERM.
const DRAIN: Duration = Duration::from_secs(30);
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    /// A directory, or an object store URL (`s3://`, `azblob://`).
    pub storage: PathBuf,
    /// `KEY=VALUE` options of the object store client.
    pub storage_options: Vec<String>,
    /// Blob GETs redirected to the object store with URLs valid this long.
    pub storage_redirect: Option<Duration>,
    /// Leader election through a Kubernetes Lease; `None`: this process leads.
    pub leader: Option<LeaderSettings>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub http: bool,
    pub upload_expiry: Duration,
    pub tokens: Option<PathBuf>,
    pub anonymous_pull: bool,
    /// None: readwrite while standalone (no parent to sync from), as nothing else could
    /// fill the store.
    pub mode: Option<Mode>,
    pub max_auth_failures: u32,
    pub token_lifetime: Duration,
    /// Bearer token signing keys shared by every replica; `None`: a key of this process.
    pub token_signing_key_file: Option<PathBuf>,
    /// The parent and how to sync from it; `None` for a standalone registry.
    pub sync: Option<SyncSettings>,
    /// Evict least recently pulled, unpinned images above this many bytes.
    pub max_storage: Option<u64>,
    /// Serve on, not ready, this long after SIGTERM/SIGINT before draining.
    pub shutdown_delay: Duration,
}

/// The lease processes sharing a store compete for.
#[derive(Debug, Clone)]
pub struct LeaderSettings {
    /// (Lease name, namespace) of a Kubernetes Lease; `None`: a lease document in the store.
    pub kubernetes: Option<(String, Option<String>)>,
    pub duration: Duration,
}

/// Sync settings as given on the command line (the mode is `ServeOptions::mode`).
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub connection: ConnectionSource,
    pub ca_file: Option<PathBuf>,
    pub repositories: Vec<outpost_core::RepositoryPattern>,
    /// `--platform`: which children of an index are fetched.
    pub platforms: crate::content::platform::PlatformFilter,
    pub schedule: Schedule,
    pub concurrency: usize,
    pub chunk_size: u64,
    pub bandwidth_limit: Option<u64>,
    pub pull_through: bool,
    pub respect_window: bool,
    /// Images to stage at start-up.
    pub stage: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Sync(#[from] SyncError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ServeError {
    let what = what.into();
    move |source| ServeError::Io { what, source }
}

impl ServeOptions {
    /// Refuses combinations that would serve something other than what the operator meant.
    pub fn validate(&self) -> Result<(), ServeError> {
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) | (None, Some(_)) => {
                return Err(ServeError::Config(
                    "--tls-cert and --tls-key must be given together".into(),
                ));
            }
            (Some(_), Some(_)) if self.http => {
                return Err(ServeError::Config(
                    "--http contradicts --tls-cert/--tls-key: choose one".into(),
                ));
            }
            _ => {}
        }
        if self.tls_cert.is_none() && !self.http {
            let addrs = [
                Some(self.listen),
                Some(self.admin_listen),
                self.metrics_listen,
            ];
            if let Some(a) = addrs.into_iter().flatten().find(|a| !a.ip().is_loopback()) {
                return Err(ServeError::Config(format!(
                    "refusing to serve plain HTTP on non-loopback address {a}: give --tls-cert and \
                     --tls-key for HTTPS, or --http to accept plain HTTP on the network"
                )));
            }
        }
        Ok(())
    }
}

fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, ServeError> {
    let l =
        std::net::TcpListener::bind(addr).map_err(io_err(format!("cannot listen on {addr}")))?;
    l.set_nonblocking(true)
        .map_err(io_err(format!("cannot listen on {addr}")))?;
    Ok(l)
}

fn spawn_server(
    set: &mut JoinSet<io::Result<()>>,
    listener: std::net::TcpListener,
    tls: Option<RustlsConfig>,
    router: Router,
    handle: Handle<SocketAddr>,
) -> Result<(), ServeError> {
    let svc = router.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        Some(cfg) => {
            let mut server = axum_server::from_tcp_rustls(listener, cfg)
                .map_err(io_err("cannot start HTTPS listener"))?
                .handle(handle);
            limit_slow_clients(server.http_builder());
            set.spawn(async move { server.serve(svc).await });
        }
        None => {
            let mut server = axum_server::from_tcp(listener)
                .map_err(io_err("cannot start HTTP listener"))?
                .handle(handle);
            limit_slow_clients(server.http_builder());
            set.spawn(async move { server.serve(svc).await });
        }
    }
    Ok(())
}

/// Closes HTTP/1 connections whose request headers take longer than 30 s to arrive, so slow
/// or stalled clients cannot hold connections open forever. hyper only enforces this with a
/// timer, which axum-server does not set.
fn limit_slow_clients(
    b: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
) {
    b.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
}

/// SIGTERM and SIGINT, watched from start-up to the end: a second signal (during the shutdown
/// delay) is told apart from the first, which one listener per wait could not do.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Self {
        use tokio::signal::unix::{SignalKind, signal};
        let watch = |kind: SignalKind, name: &str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch {name}");
                None
            }
        };
        Signals {
            term: watch(SignalKind::terminate(), "SIGTERM"),
            int: watch(SignalKind::interrupt(), "SIGINT"),
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}

/// Keeps `outpost_storage_bytes` current and expires idle upload sessions.
fn spawn_upkeep(
    store: Arc<dyn Store>,
    usage: Arc<Usage>,
    leadership: Arc<Leadership>,
    upload_expiry: Duration,
) {
    tokio::spawn(async move {
        // The one listing: when this process first leads (at start without leader
        // election). Afterwards the writes' own counts keep the figure (see `usage`).
        let mut measured = false;
        loop {
            if !measured && leadership.is_leader() {
                match usage.measure().await {
                    Ok(bytes) => {
                        measured = true;
                        tracing::info!(bytes, "measured the store's size");
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot measure storage"),
                }
            }
            if let Err(e) = usage.fold().await {
                tracing::warn!(error = %e, "cannot update the store's size");
            }
            tokio::time::sleep(PUBLISH_INTERVAL).await;
        }
    });
    let every = (upload_expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            match store.upload_expire(upload_expiry).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(sessions = n, "expired idle upload sessions"),
                Err(e) => tracing::warn!(error = %e, "cannot expire upload sessions"),
            }
        }
    });
}

/// Serves until SIGTERM or SIGINT; then, not ready, for the shutdown delay; then drains
/// in-flight requests for up to 30 s.
pub async fn run(opts: ServeOptions) -> Result<(), ServeError> {
    opts.validate()?;
    let storage = opts.storage.to_string_lossy().into_owned();
    // The store, and on a directory the lock that keeps a second server off it. Sync state,
    // the outbox, staging requests and pull times are documents in the store itself.
    let (store, _serve_lock): (Arc<dyn Store>, Option<std::fs::File>) =
        if crate::storage::object::is_object_url(&storage) {
            let s = crate::storage::object::open(&storage, &opts.storage_options)
                .await
                .map_err(|e| ServeError::Config(e.to_string()))?
                .with_redirect(opts.storage_redirect);
            tracing::info!(storage = %storage, "object storage");
            (Arc::new(s), None)
        } else {
            if opts.storage_redirect.is_some() {
                return Err(ServeError::Config(
                    "--storage-redirect needs object storage (s3:// or azblob://): a directory \
                     has no URL to redirect clients to"
                        .into(),
                ));
            }
            let store = FsStore::open(&opts.storage).map_err(io_err(format!(
                "cannot open storage {}",
                opts.storage.display()
            )))?;
            let lock = store
                .lock_for_serving()
                .map_err(io_err("cannot lock storage"))?;
            store
                .clean_tmp()
                .map_err(io_err("cannot clean storage tmp/"))?;
            (Arc::new(store), Some(lock))
        };

    let tls = match (&opts.tls_cert, &opts.tls_key) {
        (Some(c), Some(k)) => Some(tls::load_and_watch(c.clone(), k.clone())?),
        _ => None,
    };

    let anonymous = match (&opts.tokens, opts.listen.ip().is_loopback()) {
        (None, true) => Anonymous::Full,
        _ if opts.anonymous_pull => Anonymous::Pull,
        _ => Anonymous::None,
    };
    if opts.tokens.is_none() && anonymous != Anonymous::Full {
        if opts.token_signing_key_file.is_some() {
            // The chart's default since namespace credentials: not a misconfiguration.
            tracing::info!(
                "no --tokens file: only namespace credentials and anonymous pulls are possible \
                 on a non-loopback listener"
            );
        } else {
            tracing::warn!(
                "no --tokens file: only anonymous pulls are possible on a non-loopback listener"
            );
        }
    }
    // With a parent, readonly unless told otherwise (the spec's default); standalone, nothing
    // but client pushes could fill the store.
    let mode = opts.mode.unwrap_or(if opts.sync.is_some() {
        Mode::Readonly
    } else {
        Mode::Readwrite
    });
    let readonly = mode == Mode::Readonly;
    let auth = Arc::new(Auth::new(AuthOptions {
        tokens_file: opts.tokens.clone(),
        anonymous,
        readonly,
        max_failures: opts.max_auth_failures,
        token_lifetime: opts.token_lifetime,
        signing_key_file: opts.token_signing_key_file.clone(),
    })?);
    auth.spawn_watcher();
    tracing::info!(?anonymous, readonly, "access policy");

    let metrics = Arc::new(
        Metrics::new()
            .with_storage_requests(store.request_counts())
            .with_storage_listings(store.listings())
            .with_namespace_credentials(auth.namespaces().authentications.clone()),
    );
    let leadership = match &opts.leader {
        None => Leadership::sole(crate::leader::identity()),
        Some(_) if _serve_lock.is_some() => {
            return Err(ServeError::Config(
                "--leader-election needs object storage (s3:// or azblob://): a directory has \
                 one serving process, which its lock enforces"
                    .into(),
            ));
        }
        Some(l) => {
            let lease: Arc<dyn Lease> = match &l.kubernetes {
                Some((name, namespace)) => Arc::new(
                    KubeLease::connect(namespace.clone(), name.clone())
                        .await
                        .map_err(|e| ServeError::Config(e.to_string()))?,
                ),
                None => Arc::new(StoreLease::new(store.clone())),
            };
            tracing::info!(lease = %lease.describe(), duration = ?l.duration, "electing a leader");
            Leadership::elect(crate::leader::identity(), lease, l.duration)
        }
    };
    {
        let (mut rx, gauge) = (leadership.subscribe(), metrics.leader.clone());
        gauge.set(i64::from(*rx.borrow_and_update()));
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                gauge.set(i64::from(*rx.borrow_and_update()));
            }
        });
    }
    let syncer = match &opts.sync {
        Some(s) => {
            let syncer = Syncer::new(
                SyncOptions {
                    connection: s.connection.clone(),
                    ca_file: s.ca_file.clone(),
                    repositories: s.repositories.clone(),
                    schedule: s.schedule.clone(),
                    concurrency: s.concurrency,
                    chunk_size: s.chunk_size,
                    bandwidth_limit: s.bandwidth_limit,
                    mode,
                    platforms: s.platforms.clone(),
                },
                store.clone(),
                metrics.clone(),
                leadership.clone(),
            )
            .await?;
            let st = syncer.status(0);
            tracing::info!(
                name = %st.name, parent = %st.login_server, mode = %st.mode,
                schedule = %st.sync_schedule, window = %st.sync_window,
                platforms = %if st.platforms.is_empty() { "all".to_owned() } else { st.platforms.join(",") },
                "syncing from parent"
            );
            Some(syncer)
        }
        None => None,
    };
    let usage = Arc::new(Usage::new(store.clone(), metrics.storage_bytes.clone()));
    let retention = match (opts.max_storage, &syncer) {
        (Some(max), Some(s)) => Some(
            crate::service::retention::Retention::new(s.clone(), max, usage.clone())
                .await
                .map_err(|e| ServeError::Config(format!("cannot read pull times: {e}")))?,
        ),
        (Some(_), None) => {
            return Err(ServeError::Config(
                "--max-storage needs a parent (--connection-string): eviction on a standalone \
                 registry would delete images nothing can bring back"
                    .into(),
            ));
        }
        (None, _) => {
            crate::service::retention::Retention::serving_without(store.as_ref()).await;
            None
        }
    };
    let staging = match &syncer {
        Some(s) => {
            let st = crate::service::staging::Staging::open(
                s.clone(),
                opts.sync.as_ref().is_some_and(|x| x.respect_window),
            )
            .await
            .map_err(|e| ServeError::Config(format!("cannot open staging requests: {e}")))?;
            s.set_pins(st.clone());
            s.set_shared_work(st.clone());
            if let Some(r) = &retention {
                r.set_pins(st.clone());
            }
            Some(st)
        }
        None => None,
    };
    // This registry's own children: it is their parent whether or not it has a parent itself.
    let children = crate::sync::children::Children::new(
        store.clone(),
        metrics.clone(),
        syncer.as_ref().map(|s| s.status(0).name),
    );
    if let Some(s) = &syncer {
        s.set_children(children.clone());
    }
    let app = Arc::new(AppState {
        children: children.clone(),
        staging: staging.clone(),
        retention: retention.clone(),
        store: store.clone(),
        metrics: metrics.clone(),
        auth,
        tls: tls.is_some(),
        mode,
        pull_through: syncer
            .as_ref()
            .filter(|_| opts.sync.as_ref().is_some_and(|s| s.pull_through))
            .map(|s| crate::service::pull_through::PullThrough::new(s.clone())),
        syncer: syncer.clone(),
        shutting_down: AtomicBool::new(false),
    });

    let metrics_addr = opts.metrics_listen.filter(|m| *m != opts.listen);
    let metrics_on_admin = metrics_addr == Some(opts.admin_listen);
    let main_listener = bind(opts.listen)?;
    let admin_listener = bind(opts.admin_listen)?;
    let metrics_listener = match metrics_addr {
        Some(a) if !metrics_on_admin => Some(bind(a)?),
        _ => None,
    };

    spawn_upkeep(store, usage.clone(), leadership.clone(), opts.upload_expiry);
    children.spawn(!leadership.is_sole());
    if let Some(s) = &syncer {
        s.spawn();
    }
    if let Some(r) = &retention {
        r.spawn();
    }
    if let Some(st) = &staging {
        let wanted = opts
            .sync
            .as_ref()
            .map(|s| s.stage.clone())
            .unwrap_or_default();
        if !wanted.is_empty() {
            match st.submit_once(wanted).await {
                Ok((id, true)) => tracing::info!(id = %id, "staging the --stage images"),
                Ok((id, false)) => {
                    tracing::info!(id = %id, "the --stage images were staged by an earlier request")
                }
                Err(e) => tracing::error!(error = %e, "cannot stage the --stage images"),
            }
        }
    }

    let mut servers = JoinSet::new();
    let mut handles = Vec::new();
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut add = |listener: std::net::TcpListener, router: Router, what: &str| {
        let handle = Handle::new();
        handles.push(handle.clone());
        if let Ok(a) = listener.local_addr() {
            tracing::info!(address = %a, scheme, "{what} listening");
        }
        spawn_server(&mut servers, listener, tls.clone(), router, handle)
    };
    add(
        main_listener,
        api::router(app.clone(), metrics_addr.is_none()),
        "registry API",
    )?;
    add(
        admin_listener,
        api::admin_router(app.clone(), metrics_on_admin),
        "admin API",
    )?;
    if let Some(l) = metrics_listener {
        add(l, api::metrics_only_router(app.clone()), "metrics")?;
    }

    // Watched from here, as before: a signal during start-up still ends the process at once.
    let mut signals = Signals::new();
    tokio::select! {
        _ = signals.next() => {
            // Not ready first, listeners still open: load balancers and Kubernetes endpoints
            // take a few seconds to stop sending new connections to this process.
            app.shutting_down.store(true, Ordering::SeqCst);
            if !opts.shutdown_delay.is_zero() {
                tracing::info!(
                    delay_seconds = opts.shutdown_delay.as_secs_f64(),
                    "shutting down: not ready, serving on for the shutdown delay"
                );
                tokio::select! {
                    _ = tokio::time::sleep(opts.shutdown_delay) => {}
                    _ = signals.next() => tracing::info!("second signal: shutdown delay cut short"),
                }
            }
            tracing::info!("shutting down: draining in-flight requests");
            for h in &handles {
                h.graceful_shutdown(Some(DRAIN));
            }
        }
        Some(res) = servers.join_next() => {
            // A listener ending on its own is a failure: stop the others and report it.
            for h in &handles {
                h.shutdown();
            }
            return match res {
                Ok(Ok(())) => Err(ServeError::Config("a listener stopped unexpectedly".into())),
                Ok(Err(e)) => Err(ServeError::Io { what: "listener failed".into(), source: e }),
                Err(e) => Err(ServeError::Io { what: "listener task failed".into(), source: io::Error::other(e) }),
            };
        }
    }
    while let Some(res) = servers.join_next().await {
        if let Ok(Err(e)) = res {
            tracing::warn!(error = %e, "listener ended with an error during shutdown");
        }
    }
    // Saved while still leading: a successor re-reads the state when it takes the lease, so
    // a save after the handover would be missed, or overwrite the successor's newer state.
    if let Some(s) = &syncer
        && let Err(e) = s.state().save().await
    {
        tracing::warn!(error = %e, "cannot save sync state at shutdown");
    }
    // Hand the lease over at once rather than after it expires.
    leadership.resign().await;
    if let Some(r) = &retention {
        r.save_access().await;
    }
    // What this process wrote since its last fold, for the others and the next start.
    if let Err(e) = usage.fold().await {
        tracing::warn!(error = %e, "cannot update the store's size at shutdown");
    }
    tracing::info!("stopped");
    Ok(())
}
