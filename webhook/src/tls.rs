//! HTTPS with rustls (aws-lc-rs): the certificate and key are loaded from PEM files and
//! re-read when they change (cert-manager rotation), or, with self-managed certificates, taken
//! from the manager's Secret as read through the API; either way swapped without a restart or
//! dropped connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::sync::watch;

use crate::certs::Snapshot;

#[derive(Debug, thiserror::Error)]
#[error("cannot load TLS certificate {cert} and key {key}: {reason}")]
pub struct TlsError {
    cert: String,
    key: String,
    reason: String,
}

/// TLS 1.2 and 1.3; HTTP/1.1 only, which is what the API server speaks to webhooks.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |reason: String| TlsError {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| err(e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| err(e.to_string()))?;
    from_pem(&cert_pem, &key_pem).map_err(err)
}

/// The server config for a PEM chain and key; the error never quotes the key.
pub fn from_pem(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<ServerConfig>, String> {
    let chain = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    if chain.is_empty() {
        return Err("no certificate in the certificate PEM".into());
    }
    // The key's parse error is not echoed: it could quote key material.
    let key_der = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|_| "no readable private key in the key PEM".to_owned())?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn modified(p: &Path) -> Option<SystemTime> {
    // metadata follows symlinks, so a Secret volume's `..data` swap is seen.
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Loads the pair, sets `loaded`, and reloads the pair when either file changes.
pub fn load_and_watch(
    cert: PathBuf,
    key: PathBuf,
    every: Duration,
    loaded: Arc<AtomicBool>,
) -> Result<RustlsConfig, TlsError> {
    let config = RustlsConfig::from_config(server_config(&cert, &key)?);
    loaded.store(true, Ordering::Release);
    let watched = config.clone();
    tokio::spawn(async move {
        let mut last = (modified(&cert), modified(&key));
        loop {
            tokio::time::sleep(every).await;
            let now = (modified(&cert), modified(&key));
            if now == last || now.0.is_none() || now.1.is_none() {
                continue;
            }
            match server_config(&cert, &key) {
                Ok(c) => {
                    watched.reload_from_config(c);
                    tracing::info!(cert = %cert.display(), "TLS certificate reloaded");
                    last = now;
                }
                // A half-written pair mid-rotation: keep serving the old one and retry.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
    });
    Ok(config)
}

/// Serves the certificate the manager keeps in Secret `secret`: waits (at most `wait`) for the
/// first one, sets `loaded`, and swaps in every renewal the manager publishes.
pub async fn from_manager(
    mut snapshots: watch::Receiver<Option<Arc<Snapshot>>>,
    secret: String,
    wait: Duration,
    loaded: Arc<AtomicBool>,
) -> Result<RustlsConfig, TlsError> {
    let err = |reason: String| TlsError {
        cert: format!("Secret {secret}"),
        key: format!("Secret {secret}"),
        reason,
    };
    let name = secret.clone();
    let current = move |rx: &watch::Receiver<Option<Arc<Snapshot>>>| {
        rx.borrow()
            .as_ref()
            .and_then(|s| s.leaf(&name).map(|l| l.pair.clone()))
    };
    let first = tokio::time::timeout(wait, async {
        loop {
            if let Some(p) = current(&snapshots) {
                return Ok(p);
            }
            if snapshots.changed().await.is_err() {
                return Err("the certificate manager stopped".to_owned());
            }
        }
    })
    .await
    .map_err(|_| {
        err(format!(
            "no certificate after {} s (see the certificate manager's warnings)",
            wait.as_secs()
        ))
    })?
    .map_err(err)?;
    let config = RustlsConfig::from_config(
        from_pem(first.cert.as_bytes(), first.key.as_bytes()).map_err(err)?,
    );
    loaded.store(true, Ordering::Release);
    tracing::info!(secret = %secret, "serving the managed certificate");
    let watched = config.clone();
    tokio::spawn(async move {
        let mut served = first;
        while snapshots.changed().await.is_ok() {
            let Some(next) = current(&snapshots) else {
                continue;
            };
            if next == served {
                continue;
            }
            match from_pem(next.cert.as_bytes(), next.key.as_bytes()) {
                Ok(c) => {
                    watched.reload_from_config(c);
                    tracing::info!(secret = %secret, "managed TLS certificate swapped in");
                    served = next;
                }
                Err(e) => {
                    tracing::warn!(secret = %secret, error = %e, "managed certificate unusable; keeping the previous one")
                }
            }
        }
    });
    Ok(config)
}
