//! `--storage s3://BUCKET[/PREFIX]` and `azblob://CONTAINER[/PREFIX]`: building the client from
//! the environment (object_store's own variables) and `--storage-option KEY=VALUE` (its own
//! option keys), then one request to prove the bucket is there and the credentials work.

use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::signer::Signer;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};

use super::{BucketStore, LockTiming};

/// Why an object store cannot be used; one line each, without secrets.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(
        "unknown storage scheme in {0:?}: use a directory, s3://BUCKET[/PREFIX] or azblob://CONTAINER[/PREFIX]"
    )]
    UnknownScheme(String),
    #[error("{0:?} names no bucket or container")]
    NoBucket(String),
    #[error("--storage-option {0:?} is not KEY=VALUE")]
    BadOption(String),
    #[error("--storage-option {key}: not an option of the {backend} client")]
    UnknownOption { backend: &'static str, key: String },
    #[error("--storage-option {key}: {message}")]
    BadValue { key: String, message: String },
    #[error("storage {url}: {message}")]
    Config { url: String, message: String },
    #[error("storage {url}: the bucket or container does not exist")]
    Missing { url: String },
    #[error("storage {url}: credentials refused ({message})")]
    Credentials { url: String, message: String },
    #[error("storage {url}: cannot reach the object store: {message}")]
    Unreachable { url: String, message: String },
}

/// True if `storage` is an object-store URL rather than a directory.
pub fn is_object_url(storage: &str) -> bool {
    storage.contains("://")
}

/// How long the start-up check may take before the endpoint counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(30);

/// Client defaults under which a request to a store that went away fails within seconds
/// (refused: about one; unroutable: about ten; silent: `read_timeout`) rather than minutes.
/// The same keys in `--storage-option` override them.
const CLIENT_DEFAULTS: [(&str, &str); 3] = [
    ("connect_timeout", "3s"),
    // A store that stops answering, also while a part is being uploaded to it.
    ("read_timeout", "30s"),
    // The whole transfer: a long blob download that keeps moving is not cut (the library's
    // 30 s cut it and relied on resuming it within its retry budget).
    ("timeout", "1h"),
];

/// The client's retries of a failed request (connection errors, 5xx, throttling): the
/// library's default is 10 over up to 3 minutes, which holds a client's request that long.
/// `--storage-option max_retries=N` and `retry_timeout=DURATION` override them.
fn default_retry() -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(10),
    }
}

/// Outpost's own keys among `--storage-option`, and the library's options.
struct ClientSettings {
    retry: RetryConfig,
    lock: LockTiming,
    options: Vec<(String, String)>,
}

/// Splits Outpost's own keys (retries, the maintenance lock's settle period) from the
/// library's options and puts the client defaults before the latter (so a user's value wins).
fn client_settings(pairs: Vec<(String, String)>) -> Result<ClientSettings, OpenError> {
    let mut retry = default_retry();
    let mut lock = LockTiming::default();
    let mut rest = Vec::new();
    for (k, v) in pairs {
        match k.as_str() {
            "max_retries" => {
                retry.max_retries = v.trim().parse().map_err(|_| OpenError::BadValue {
                    key: k.clone(),
                    message: "not a number".into(),
                })?;
            }
            "retry_timeout" => {
                retry.retry_timeout =
                    humantime::parse_duration(v.trim()).map_err(|e| OpenError::BadValue {
                        key: k.clone(),
                        message: e.to_string(),
                    })?;
            }
            // How long gc waits after taking the maintenance lock before it marks (the
            // cache age and write time a push may take). For tests; every process on the
            // store must use the same value.
            "maintenance_settle" => {
                let settle =
                    humantime::parse_duration(v.trim()).map_err(|e| OpenError::BadValue {
                        key: k.clone(),
                        message: e.to_string(),
                    })?;
                lock = LockTiming::with_settle(settle);
            }
            _ => rest.push((k, v)),
        }
    }
    let mut all: Vec<(String, String)> = CLIENT_DEFAULTS
        .iter()
        .filter(|(d, _)| !rest.iter().any(|(k, _)| k == d))
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    all.extend(rest);
    Ok(ClientSettings {
        retry,
        lock,
        options: all,
    })
}

/// Opens the bucket or container `url` names and checks it with one LIST request.
pub async fn open(url: &str, options: &[String]) -> Result<BucketStore, OpenError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| OpenError::UnknownScheme(url.to_owned()))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(OpenError::NoBucket(url.to_owned()));
    }
    let mut pairs = Vec::new();
    for o in options {
        let (k, v) = o
            .split_once('=')
            .ok_or_else(|| OpenError::BadOption(o.split('=').next().unwrap_or("").to_owned()))?;
        pairs.push((k.trim().to_ascii_lowercase(), v.to_owned()));
    }
    let ClientSettings {
        retry,
        lock,
        options: pairs,
    } = client_settings(pairs)?;
    let config = |e: object_store::Error| OpenError::Config {
        url: url.to_owned(),
        message: e.to_string(),
    };
    let (store, signer) = match scheme {
        "s3" => {
            let mut b = AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_retry(retry);
            for (k, v) in pairs {
                let key: AmazonS3ConfigKey = k.parse().map_err(|_| OpenError::UnknownOption {
                    backend: "S3",
                    key: k.clone(),
                })?;
                b = b.with_config(key, v);
            }
            let s = Arc::new(b.build().map_err(config)?);
            (s.clone() as Arc<dyn ObjectStore>, s as Arc<dyn Signer>)
        }
        "azblob" => {
            let mut b = MicrosoftAzureBuilder::from_env()
                .with_container_name(bucket)
                .with_retry(retry);
            for (k, v) in pairs {
                let key: AzureConfigKey = k.parse().map_err(|_| OpenError::UnknownOption {
                    backend: "Azure Blob",
                    key: k.clone(),
                })?;
                b = b.with_config(key, v);
            }
            let s = Arc::new(b.build().map_err(config)?);
            (s.clone() as Arc<dyn ObjectStore>, s as Arc<dyn Signer>)
        }
        _ => return Err(OpenError::UnknownScheme(url.to_owned())),
    };
    let store = BucketStore::new(store, prefix)
        .with_signer(signer)
        .with_lock_timing(lock);
    probe(&store, url).await?;
    Ok(store)
}

/// The first line of an object-store error, with the query of any URL in it cut off (a SAS
/// token travels in the query).
fn one_line(e: &object_store::Error) -> String {
    let text = e.to_string();
    redact_queries(text.lines().next().unwrap_or(""))
}

/// `text` with the query of every URL in it cut off.
pub(super) fn redact_queries(text: &str) -> String {
    text.split(' ')
        .map(|w| match (w.contains("://"), w.split_once('?')) {
            (true, Some((base, _))) => format!("{base}?…"),
            _ => w.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

async fn probe(store: &BucketStore, url: &str) -> Result<(), OpenError> {
    let prefix = store.key("repositories");
    let res = tokio::time::timeout(
        PROBE_TIMEOUT,
        store.store.list_with_delimiter(Some(&prefix)),
    )
    .await;
    let url = url.to_owned();
    let e = match res {
        Ok(Ok(_)) => return Ok(()),
        Err(_) => {
            return Err(OpenError::Unreachable {
                url,
                message: format!("no answer within {} s", PROBE_TIMEOUT.as_secs()),
            });
        }
        Ok(Err(e)) => e,
    };
    let message = one_line(&e);
    // The HTTP clients report a refused request as a generic error naming the status.
    let status = |code: &str| message.contains(&format!("status code: {code}"));
    match e {
        object_store::Error::NotFound { .. } => Err(OpenError::Missing { url }),
        _ if status("404") => Err(OpenError::Missing { url }),
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            Err(OpenError::Credentials { url, message })
        }
        _ if status("401") || status("403") => Err(OpenError::Credentials { url, message }),
        _ => Err(OpenError::Unreachable { url, message }),
    }
}
