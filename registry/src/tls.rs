//! HTTPS with rustls (aws-lc-rs): certificates loaded from PEM files and re-read when the files
//! change, as cert-manager rotates them, without a restart and without dropping connections.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;

/// How often certificate files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot load TLS certificate {cert} and key {key}: {source}")]
pub struct TlsError {
    cert: String,
    key: String,
    source: std::io::Error,
}

fn modified(p: &Path) -> Option<SystemTime> {
    // metadata follows symlinks, so a Kubernetes secret volume's `..data` swap is seen.
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Loads the certificate and key, and keeps reloading them when either file changes.
pub async fn load_and_watch(cert: PathBuf, key: PathBuf) -> Result<RustlsConfig, TlsError> {
    let config = RustlsConfig::from_pem_file(&cert, &key)
        .await
        .map_err(|source| TlsError {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        })?;
    let watched = config.clone();
    tokio::spawn(async move {
        let mut last = (modified(&cert), modified(&key));
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
            let now = (modified(&cert), modified(&key));
            if now == last || now.0.is_none() || now.1.is_none() {
                continue;
            }
            match watched.reload_from_pem_file(&cert, &key).await {
                Ok(()) => {
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                    last = now;
                }
                // Half-written files during a rotation: keep serving the old pair, retry.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
    });
    Ok(config)
}
