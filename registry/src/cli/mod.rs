//! Command line: `serve`, `gc`, `fsck`, `scope-map`, `token`, `token-signing-key`. Every flag also reads
//! `OUTPOST_<FLAG>`.

mod admin;
mod nscred;
mod tokens;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::config::parse_duration;
use crate::config::{LeaderElection, Mode};
use crate::server::{self, ServeError, ServeOptions, SyncSettings};
use crate::service::{fsck, gc};
use crate::storage::Store;
use crate::storage::fs::FsStore;
use crate::sync::ConnectionSource;
use crate::sync::schedule::Schedule;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-registry",
    version,
    about = "Outpost connected registry: an OCI Distribution registry for the edge",
    long_about = "Outpost connected registry: a complete OCI Distribution v1.1 registry on \
                  crash-safe local storage.\n\nStart it with `outpost-registry serve`; by default \
                  it stores content under ./outpost-data and listens on 127.0.0.1:5000 over plain \
                  HTTP, which is allowed because loopback is not reachable from the network."
)]
pub struct Cli {
    #[command(flatten)]
    pub log: outpost_logging::LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the registry API, the admin API and metrics.
    Serve(Box<ServeArgs>),
    /// Remove blobs that no manifest references (with --delete-untagged, first the manifests
    /// no tag reaches). Safe while the registry is serving: manifest pushes wait while gc
    /// holds the maintenance lock (an flock on a directory, a lease object on object
    /// storage), and --grace keeps recent uploads and pushes.
    Gc(GcArgs),
    /// Re-hash every blob and check every manifest's references; exits 1 on any problem.
    Fsck(FsckArgs),
    /// Manage scope maps in a tokens file (which actions on which repositories).
    #[command(subcommand)]
    ScopeMap(tokens::ScopeMapCommand),
    /// Manage client tokens in a tokens file (usernames, passwords, status).
    #[command(subcommand)]
    Token(tokens::TokenCommand),
    /// Bearer token signing keys for --token-signing-key-file.
    #[command(subcommand)]
    TokenSigningKey(SigningKeyCommand),
    /// Namespace-scoped pull credentials signed with the --token-signing-key-file keys: mint
    /// one, or list those a running registry accepted.
    #[command(subcommand)]
    NamespaceCredential(nscred::NamespaceCredentialCommand),
    /// Show the registry's status (mode, connection to the parent, last sync) from the admin API.
    Status(admin::StatusArgs),
    /// Start a sync with the parent now, outside the schedule; --wait follows it to the end.
    Sync(admin::SyncArgs),
    /// The connected registries that report to this one (nested ones included), from the
    /// admin API: `list` as a table, `show NAME` one in detail.
    #[command(subcommand)]
    ConnectedRegistry(admin::ConnectedRegistryCommand),
    /// Download images now, ahead of a maintenance window, and pin them; --wait shows a
    /// progress bar per image and exits 1 if any image failed.
    Stage(admin::StageArgs),
}

#[derive(Subcommand, Debug)]
pub enum SigningKeyCommand {
    /// Print a new key line (the base64 of 32 random bytes) for --token-signing-key-file.
    Generate,
}

/// Where the content is: the same flags for serve, gc and fsck.
#[derive(clap::Args, Debug)]
pub struct StorageArgs {
    /// Storage: a directory (content-addressed blobs, repositories, upload sessions), or an
    /// object store: s3://BUCKET[/PREFIX] or azblob://CONTAINER[/PREFIX], configured from
    /// object_store's own environment variables (AWS_*, AZURE_STORAGE_*) and --storage-option.
    #[arg(long, env = "OUTPOST_STORAGE", default_value = "./outpost-data")]
    pub storage: PathBuf,
    /// KEY=VALUE option of the object store client (object_store's keys, e.g. endpoint,
    /// region, allow_http, account_name); repeatable, comma-separated in the environment.
    #[arg(
        long = "storage-option",
        env = "OUTPOST_STORAGE_OPTION",
        value_delimiter = ','
    )]
    pub storage_option: Vec<String>,
}

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address of the registry API (OCI Distribution v1.1).
    #[arg(long, env = "OUTPOST_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: SocketAddr,
    /// Address of the admin API (GET /outpost/v1/status, POST /outpost/v1/sync, health). It
    /// has no authentication: keep it off the network.
    #[arg(long, env = "OUTPOST_ADMIN_LISTEN", default_value = "127.0.0.1:5050")]
    pub admin_listen: SocketAddr,
    /// Where /metrics is served; by default on the registry API's listener.
    #[arg(long, env = "OUTPOST_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    pub store: StorageArgs,
    /// Answer blob GETs with a 307 to a presigned S3 URL or an Azure SAS URL, so clients
    /// download straight from the object store (they must be able to reach it). Object
    /// storage only; HEAD and manifests stay local.
    #[arg(long, env = "OUTPOST_STORAGE_REDIRECT")]
    pub storage_redirect: bool,
    /// How long a redirect URL stays valid (s, m, h or d suffix).
    #[arg(long, env = "OUTPOST_STORAGE_REDIRECT_EXPIRY", default_value = "10m", value_parser = parse_duration)]
    pub storage_redirect_expiry: Duration,
    /// How processes sharing one object store pick the one that runs sync, staging and
    /// retention (the others only serve): kubernetes (a Lease object, as the pod's
    /// ServiceAccount in a cluster, through KUBECONFIG outside one), store (a lease document
    /// in the store, written conditionally) or none (this process is the only one).
    #[arg(
        long,
        env = "OUTPOST_LEADER_ELECTION",
        value_enum,
        default_value = "none"
    )]
    pub leader_election: LeaderElection,
    /// Name of the Lease object (--leader-election kubernetes).
    #[arg(long, env = "OUTPOST_LEADER_LEASE", default_value = "outpost-registry")]
    pub leader_lease: String,
    /// Namespace of the Lease; by default the pod's own (outside a cluster, the kubeconfig's).
    #[arg(long, env = "OUTPOST_LEADER_LEASE_NAMESPACE")]
    pub leader_lease_namespace: Option<String>,
    /// How long a lease lasts unrenewed: the longest the work of a leader that died waits for
    /// its successor.
    #[arg(long, env = "OUTPOST_LEADER_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub leader_lease_duration: Duration,
    /// PEM certificate chain for HTTPS; re-read when the file changes.
    #[arg(long, env = "OUTPOST_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for HTTPS; re-read when the file changes.
    #[arg(long, env = "OUTPOST_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plain HTTP even on a non-loopback address (without it, that is refused).
    #[arg(long, env = "OUTPOST_HTTP")]
    pub http: bool,
    /// After SIGTERM/SIGINT, keep serving this long with /readyz answering 503 before the
    /// listeners close and in-flight requests drain (up to 30 s): time for load balancers and
    /// Kubernetes endpoints to stop sending new connections (s, m or h suffix; the chart sets
    /// 5s); meanwhile HTTP/1 responses carry `Connection: close`, so kept-alive clients reconnect
    /// elsewhere. A second signal ends the delay early.
    #[arg(long, env = "OUTPOST_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,
    /// Upload sessions idle for longer than this are removed (s, m, h or d suffix).
    #[arg(long, env = "OUTPOST_UPLOAD_EXPIRY", default_value = "24h", value_parser = parse_duration)]
    pub upload_expiry: Duration,
    /// Client tokens and scope maps (TOML); re-read when it changes. Without it, anonymous
    /// access is allowed only on a loopback --listen (or pull-only with --anonymous-pull).
    #[arg(long, env = "OUTPOST_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// Let clients without credentials pull (content/read, metadata/read) every repository.
    #[arg(long, env = "OUTPOST_ANONYMOUS_PULL")]
    pub anonymous_pull: bool,
    /// readonly refuses client pushes and deletes (DENIED); readwrite accepts them. Default:
    /// readwrite for a standalone registry.
    #[arg(long, env = "OUTPOST_MODE", value_enum)]
    pub mode: Option<Mode>,
    /// Failed logins allowed per client address per minute; beyond it the address gets 429
    /// TOOMANYREQUESTS until the minute is over (other addresses are unaffected).
    #[arg(long, env = "OUTPOST_MAX_AUTH_FAILURES", default_value_t = 20)]
    pub max_auth_failures: u32,
    /// How long bearer tokens from /oauth2/token stay valid (s, m or h suffix).
    #[arg(long, env = "OUTPOST_TOKEN_LIFETIME", default_value = "5m", value_parser = parse_duration)]
    pub token_lifetime: Duration,
    /// Keys that sign and verify bearer tokens, shared by every replica so a token from one
    /// is accepted by all: one key per line, the base64 of at least 32 random bytes
    /// (`token-signing-key generate`), `#` comments. The first key signs, every key verifies;
    /// re-read when it changes. Without it, a random key of this process (tokens are valid
    /// on this process only).
    #[arg(long, env = "OUTPOST_TOKEN_SIGNING_KEY_FILE")]
    pub token_signing_key_file: Option<PathBuf>,
    /// The parent registry, in Azure's connection string format
    /// (ConnectedRegistryName=..;SyncTokenName=..;SyncTokenPassword=..;ParentGatewayEndpoint=..;
    /// ParentEndpointProtocol=https). Prefer the environment variable or
    /// --connection-string-file: a flag is visible in the process list. Without a connection
    /// string, Outpost is a standalone registry.
    #[arg(
        long,
        env = "OUTPOST_CONNECTION_STRING",
        hide_env_values = true,
        conflicts_with = "connection_string_file"
    )]
    pub connection_string: Option<String>,
    /// File holding the connection string (e.g. a mounted Secret); re-read before every sync,
    /// so a rotated sync token password applies without a restart.
    #[arg(long, env = "OUTPOST_CONNECTION_STRING_FILE")]
    pub connection_string_file: Option<PathBuf>,
    /// PEM CA bundle trusted for the parent's HTTPS certificate, in addition to the system's
    /// (private parents, nested Outposts with their own CA).
    #[arg(long, env = "OUTPOST_PARENT_CA_FILE")]
    pub parent_ca_file: Option<PathBuf>,
    /// Repositories kept in sync (repeatable; comma-separated in the environment variable).
    /// `*` matches within one path segment, `**` across segments. Wildcards need the parent's
    /// catalog; without any, every repository the sync token can list.
    #[arg(long = "repository", env = "OUTPOST_REPOSITORY", value_delimiter = ',')]
    pub repositories: Vec<outpost_core::RepositoryPattern>,
    /// Platforms this site runs, OS/ARCH[/VARIANT] (repeatable; comma-separated in the
    /// environment variable), e.g. linux/amd64 or linux/arm/v7. Indexes are stored byte for
    /// byte, but sync, staging and pull-through fetch only these platforms' manifests, blobs
    /// and referrers; other platforms are fetched when pulled (online). Default: all.
    #[arg(
        long = "platform",
        env = "OUTPOST_PLATFORM",
        value_delimiter = ',',
        value_name = "OS/ARCH[/VARIANT]"
    )]
    pub platforms: Vec<crate::content::platform::PlatformSpec>,
    /// When a sync may start: 5-field cron in UTC (a leading seconds field is also accepted).
    #[arg(long, env = "OUTPOST_SYNC_SCHEDULE", default_value = "* * * * *")]
    pub sync_schedule: String,
    /// How long after each schedule firing syncing may go on, as an ISO 8601 duration (PT4H);
    /// transfers pause at its end and resume in the next window. Default: continuous.
    #[arg(long, env = "OUTPOST_SYNC_WINDOW")]
    pub sync_window: Option<String>,
    /// Blob downloads from the parent are stored (fsynced) in chunks of this many MiB; a fault
    /// or restart resumes from the last stored chunk with an HTTP Range request.
    #[arg(long, env = "OUTPOST_CHUNK_SIZE_MB", default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub chunk_size_mb: u64,
    /// Blob downloads from the parent run this many at a time.
    #[arg(long, env = "OUTPOST_SYNC_CONCURRENCY", default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub sync_concurrency: u64,
    /// Cap on download bandwidth from the parent, in bytes per second, shared by all
    /// transfers (metered links). Default: no cap.
    #[arg(long, env = "OUTPOST_SYNC_BANDWIDTH_LIMIT", value_parser = clap::value_parser!(u64).range(1..))]
    pub sync_bandwidth_limit: Option<u64>,
    /// A client pull of an in-scope image that is not stored yet is fetched from the parent
    /// while it streams to the client, and stored whole (every platform) for later pulls.
    /// `--pull-through false` turns it off: only synced and staged images are served.
    #[arg(long, env = "OUTPOST_PULL_THROUGH", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub pull_through: bool,
    /// Staging requests download only inside the sync window (default: at once, outside the
    /// schedule, since staging is for getting images on site before they are needed).
    #[arg(long, env = "OUTPOST_RESPECT_WINDOW")]
    pub respect_window: bool,
    /// Keep the store under this size (bytes, or with a suffix: 500Gi, 20G, 512Mi): when it
    /// grows past, the least recently pulled images that no staging request pinned are
    /// evicted, while serving. Default: no limit.
    #[arg(long, env = "OUTPOST_MAX_STORAGE", value_parser = parse_size)]
    pub max_storage: Option<u64>,
    /// Images to stage at start-up (repeatable; comma-separated in the environment variable),
    /// as `outpost-registry stage` would: for installs that list them in their configuration
    /// (the chart's `staging.images`). A request with the same images is not made twice.
    #[arg(
        long = "stage",
        env = "OUTPOST_STAGE",
        value_delimiter = ',',
        value_name = "IMAGE"
    )]
    pub stage: Vec<String>,
}

/// Parses a size: plain bytes, or a number with K/M/G/T (powers of 1000) or Ki/Mi/Gi/Ti
/// (powers of 1024), as Kubernetes quantities write them.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (bytes, or e.g. 500Gi, 20G)"))?;
    let mult: u64 = match unit {
        "" => 1,
        "K" | "k" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "T" => 1000u64.pow(4),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (K, M, G, T, Ki, Mi, Gi, Ti)"
            ));
        }
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is out of range"))
}

#[derive(clap::Args, Debug)]
pub struct GcArgs {
    #[command(flatten)]
    pub store: StorageArgs,
    /// Blobs (and with --delete-untagged manifests) written or pushed more recently than this
    /// are kept, so pushes in progress are safe.
    #[arg(long, env = "OUTPOST_GC_GRACE", default_value = "1h", value_parser = parse_duration)]
    pub grace: Duration,
    /// Report what would be removed without removing it (with --delete-untagged, each
    /// manifest as repository@digest).
    #[arg(long, env = "OUTPOST_GC_DRY_RUN")]
    pub dry_run: bool,
    /// First remove manifests that no tag reaches (directly, through an index, or as a
    /// referrer of a reached manifest) and that were pushed longer than --grace ago, then
    /// their blobs. Never removed: images a staging request names, pushes the readwrite
    /// outbox has not delivered to the parent, referrers of kept manifests.
    #[arg(long, env = "OUTPOST_GC_DELETE_UNTAGGED")]
    pub delete_untagged: bool,
}

#[derive(clap::Args, Debug)]
pub struct FsckArgs {
    #[command(flatten)]
    pub store: StorageArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Serve(#[from] ServeError),
    #[error("cannot open storage {path}: {source}")]
    Storage {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    ObjectStorage(#[from] crate::storage::object::OpenError),
    #[error(transparent)]
    Gc(#[from] gc::GcError),
    #[error(transparent)]
    Fsck(#[from] crate::storage::StorageError),
    #[error(transparent)]
    Tokens(#[from] crate::auth::tokens::TokensError),
    #[error(transparent)]
    Schedule(#[from] crate::sync::schedule::ScheduleError),
    #[error(transparent)]
    ConnectionString(#[from] crate::sync::connection::ConnectionStringError),
    #[error("{0}")]
    Admin(String),
}

/// The store `--storage` names: a directory that must exist (gc and fsck never create one),
/// or a bucket or container, checked with one request as `serve` checks it.
async fn open_store(a: &StorageArgs) -> Result<Arc<dyn Store>, CliError> {
    let path = &a.storage;
    let url = path.to_string_lossy();
    if crate::storage::object::is_object_url(&url) {
        let store = crate::storage::object::open(&url, &a.storage_option).await?;
        return Ok(Arc::new(store));
    }
    if !path.is_dir() {
        return Err(CliError::Storage {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        });
    }
    let store = FsStore::open(path).map_err(|source| CliError::Storage {
        path: path.display().to_string(),
        source,
    })?;
    Ok(Arc::new(store))
}

/// `store requests: 12 (list 3, get 5, head 2, delete 2)`: what a run cost on an object store
/// (each request is billed), operations sent at least once; `None` on a directory.
fn requests_line(store: &dyn Store) -> Option<String> {
    let counts = store.request_counts()?.snapshot();
    let total: u64 = counts.iter().map(|(_, n)| n).sum();
    let parts: Vec<String> = counts
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(op, n)| format!("{op} {n}"))
        .collect();
    Some(format!("store requests: {total} ({})", parts.join(", ")))
}

/// The parent and sync settings from serve's flags; `None` without a connection string.
fn sync_settings(a: &ServeArgs) -> Result<Option<SyncSettings>, CliError> {
    let connection = match (&a.connection_string, &a.connection_string_file) {
        (Some(text), _) => ConnectionSource::Given(text.trim().parse()?),
        (None, Some(path)) => {
            let src = ConnectionSource::File(path.clone());
            // Fail at start, with the key named, rather than at the first sync.
            src.load()
                .map_err(|e| CliError::Serve(ServeError::Sync(e)))?;
            src
        }
        (None, None) => return Ok(None),
    };
    Ok(Some(SyncSettings {
        connection,
        ca_file: a.parent_ca_file.clone(),
        repositories: a.repositories.clone(),
        platforms: crate::content::platform::PlatformFilter::new(a.platforms.clone()),
        schedule: Schedule::new(&a.sync_schedule, a.sync_window.as_deref())?,
        concurrency: a.sync_concurrency as usize,
        chunk_size: a.chunk_size_mb * 1024 * 1024,
        bandwidth_limit: a.sync_bandwidth_limit,
        pull_through: a.pull_through,
        respect_window: a.respect_window,
        stage: a.stage.clone(),
    }))
}

pub async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Serve(a) => {
            let sync = sync_settings(&a)?;
            if sync.is_none()
                && (!a.repositories.is_empty()
                    || a.sync_window.is_some()
                    || !a.platforms.is_empty())
            {
                tracing::warn!(
                    "--repository, --platform and --sync-window have no effect without a \
                     connection string"
                );
            }
            server::run(ServeOptions {
                listen: a.listen,
                admin_listen: a.admin_listen,
                metrics_listen: a.metrics_listen,
                storage: a.store.storage,
                storage_options: a.store.storage_option,
                storage_redirect: a.storage_redirect.then_some(a.storage_redirect_expiry),
                leader: match a.leader_election {
                    LeaderElection::None => None,
                    LeaderElection::Kubernetes => Some(server::LeaderSettings {
                        kubernetes: Some((
                            a.leader_lease.clone(),
                            a.leader_lease_namespace.clone(),
                        )),
                        duration: a.leader_lease_duration,
                    }),
                    LeaderElection::Store => Some(server::LeaderSettings {
                        kubernetes: None,
                        duration: a.leader_lease_duration,
                    }),
                },
                tls_cert: a.tls_cert,
                tls_key: a.tls_key,
                http: a.http,
                upload_expiry: a.upload_expiry,
                tokens: a.tokens,
                anonymous_pull: a.anonymous_pull,
                mode: a.mode,
                max_auth_failures: a.max_auth_failures,
                token_lifetime: a.token_lifetime,
                token_signing_key_file: a.token_signing_key_file,
                sync,
                max_storage: a.max_storage,
                shutdown_delay: a.shutdown_delay,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Gc(a) => {
            let store = open_store(&a.store).await?;
            // Made before the run, so what the run removes is this process's to fold in.
            let usage = crate::service::usage::Usage::new(store.clone(), Default::default());
            let r = gc::run(
                store.as_ref(),
                gc::GcOptions {
                    grace: a.grace,
                    dry_run: a.dry_run,
                    delete_untagged: a.delete_untagged,
                },
            )
            .await?;
            // The running server's figure drops at its next fold, without listing the store.
            if r.bytes_removed > 0
                && !a.dry_run
                && let Err(e) = usage.fold().await
            {
                eprintln!("gc: cannot update the store's recorded size: {e}");
            }
            let verb = if a.dry_run { "would remove" } else { "removed" };
            if a.delete_untagged {
                for m in &r.manifests_removed {
                    println!("{m}");
                }
                println!(
                    "gc: {verb} {} untagged manifests",
                    r.manifests_removed.len()
                );
            }
            println!(
                "gc: {verb} {} blobs ({} bytes), kept {}, removed {} stale repository links",
                r.blobs_removed, r.bytes_removed, r.blobs_kept, r.links_removed
            );
            if let Some(line) = requests_line(store.as_ref()) {
                println!("{line}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(a) => admin::status(a).await,
        Command::Sync(a) => admin::sync(a).await,
        Command::ConnectedRegistry(c) => admin::connected_registry(c).await,
        Command::Stage(a) => admin::stage(a).await,
        Command::ScopeMap(c) => {
            tokens::run_scope_map(c)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Token(c) => {
            let namespaces = match &c {
                tokens::TokenCommand::List {
                    admin: Some(admin),
                    admin_ca_file,
                    output,
                    ..
                } => Some((
                    admin::AdminArgs {
                        admin: admin.clone(),
                        admin_ca_file: admin_ca_file.clone(),
                    },
                    *output,
                )),
                _ => None,
            };
            tokens::run_token(c)?;
            if let Some((a, output)) = namespaces {
                let seen = admin::namespace_credentials(&a).await?;
                if output == tokens::Output::Text {
                    println!();
                }
                nscred::print_seen(&seen, output);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::NamespaceCredential(c) => nscred::run(c).await,
        Command::TokenSigningKey(SigningKeyCommand::Generate) => {
            let key = crate::auth::keys::generate()
                .map_err(|_| CliError::Admin("the system random generator failed".into()))?;
            println!("{key}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Fsck(a) => {
            let store = open_store(&a.store).await?;
            let tty = std::io::stderr().is_terminal();
            let r = fsck::run(store.as_ref(), |i, n| {
                if tty {
                    eprint!("\rfsck: checking blob {i}/{n}");
                    let _ = std::io::stderr().flush();
                }
            })
            .await?;
            if tty {
                eprintln!();
            }
            for p in &r.problems {
                println!("{p}");
            }
            println!(
                "fsck: {} blobs ({} bytes) and {} manifests checked, {} problems",
                r.blobs_checked,
                r.bytes_checked,
                r.manifests_checked,
                r.problems.len()
            );
            if r.partial_indexes > 0 {
                // Not a problem: what a platform filter leaves out is pulled on demand.
                println!(
                    "fsck: {} indexes lack platforms that were not synced (platform filter)",
                    r.partial_indexes
                );
            }
            if let Some(line) = requests_line(store.as_ref()) {
                println!("{line}");
            }
            Ok(if r.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1"), Ok(1));
        assert_eq!(parse_size("500Gi"), Ok(500 << 30));
        assert_eq!(parse_size("20G"), Ok(20_000_000_000));
        assert_eq!(parse_size("512Mi"), Ok(512 << 20));
        assert_eq!(parse_size("3k"), Ok(3000));
        for bad in ["", "0", "Gi", "1.5Gi", "10GB", "-1", "99999999999Ti"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
