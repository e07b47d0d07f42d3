//! HTTPS with rustls (aws-lc-rs): certificates loaded from PEM files and re-read when the files
//! change, as cert-manager rotates them, without a restart and without dropping connections.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use rustls::ServerConfig;
use rustls::crypto::{CryptoProvider, aws_lc_rs};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// How often certificate files are checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
#[error("cannot load TLS certificate {cert} and key {key}: {reason}")]
pub struct TlsError {
    cert: String,
    key: String,
    reason: String,
}

/// aws-lc-rs with AES-128-GCM preferred: as strong as any client needs, and the cheapest
/// suite per byte for large blob downloads.
fn provider() -> CryptoProvider {
    let mut p = aws_lc_rs::default_provider();
    let rank = |s: &rustls::SupportedCipherSuite| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256
        | rustls::CipherSuite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 => 1,
        _ => 2,
    };
    p.cipher_suites.sort_by_key(rank);
    p
}

/// Builds the server configuration from PEM files: TLS 1.2 and 1.3, HTTP/2 and HTTP/1.1.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let err = |reason: String| TlsError {
        cert: cert.display().to_string(),
        key: key.display().to_string(),
        reason,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| err(e.to_string()))?;
    let key_pem = std::fs::read(key).map_err(|e| err(e.to_string()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(format!("certificate file: {e}")))?;
    if chain.is_empty() {
        return Err(err("no certificate in the certificate file".into()));
    }
    // The key's own parse error is not echoed: it could quote key material.
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|_| err("the key file holds no readable private key".into()))?;
    let mut config = ServerConfig::builder_with_provider(Arc::new(provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| err(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)
        .map_err(|e| err(e.to_string()))?;
    config.ignore_client_order = true;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn modified(p: &Path) -> Option<SystemTime> {
    // metadata follows symlinks, so a Kubernetes secret volume's `..data` swap is seen.
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Loads the certificate and key, and keeps reloading them when either file changes.
pub fn load_and_watch(cert: PathBuf, key: PathBuf) -> Result<RustlsConfig, TlsError> {
    let config = RustlsConfig::from_config(server_config(&cert, &key)?);
    let watched = config.clone();
    tokio::spawn(async move {
        let mut last = (modified(&cert), modified(&key));
        loop {
            tokio::time::sleep(WATCH_INTERVAL).await;
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
                // Half-written files during a rotation: keep serving the old pair, retry.
                Err(e) => {
                    tracing::warn!(error = %e, "TLS certificate reload failed; keeping the previous one")
                }
            }
        }
    });
    Ok(config)
}
