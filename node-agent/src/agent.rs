//! The agent's loop: re-reads its inputs (mirror config, CA, node credentials, containerd's
//! config) every `interval`, reconciles when one changed or every `recheck`, reports through
//! logs, metrics and node Events, keeps the node label in step, and cleans up on the way out.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use outpost_core::MirrorConfig;

use crate::metrics::{CheckLabels, Metrics};
use crate::node::NodeApi;
use crate::preflight::{self, Warning};
use crate::reconcile::{Reconciler, Report, Runtime};
use crate::render::{self, RenderOptions};

#[derive(Debug, Clone)]
pub struct AgentOptions {
    pub root: PathBuf,
    pub runtime: Runtime,
    /// Where the runtime's files are, relative to the root.
    pub layout: render::Layout,
    pub config: PathBuf,
    /// The registry's CA; `None` for a plain-HTTP registry.
    pub ca_file: Option<PathBuf>,
    pub credentials_file: Option<PathBuf>,
    /// containerd's config file, relative to the root.
    pub containerd_config: PathBuf,
    pub dial_timeout: Option<Duration>,
    pub interval: Duration,
    pub recheck: Duration,
    pub cleanup_on_exit: bool,
    /// Node to label; `None` skips the Kubernetes API entirely.
    pub node_name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// Everything a pass reads, as text, so a change is a plain comparison.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Inputs {
    config: String,
    ca: Option<String>,
    credentials: Option<String>,
    containerd: Option<String>,
}

fn read(path: &Path) -> Result<String, InputError> {
    std::fs::read_to_string(path).map_err(|source| InputError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Node pull credentials for the registry from a `.dockerconfigjson`: the `Authorization`
/// header value for containerd and the user and password for k3s.
pub fn credentials_for(
    dockerconfig: &str,
    registry: &str,
    path: &Path,
) -> Result<(String, (String, String)), InputError> {
    let invalid = |reason: String| InputError::Invalid {
        path: path.display().to_string(),
        reason,
    };
    let v: serde_json::Value =
        serde_json::from_str(dockerconfig).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let auths = v["auths"]
        .as_object()
        .ok_or_else(|| invalid("no \"auths\" object".into()))?;
    let entry = auths
        .iter()
        .find(|(k, _)| {
            let host = k
                .trim_start_matches("https://")
                .trim_start_matches("http://")
                .trim_end_matches('/');
            host == registry
        })
        .map(|(_, e)| e)
        .ok_or_else(|| invalid(format!("no entry for {registry}")))?;
    let (user, pass) = match (entry["username"].as_str(), entry["password"].as_str()) {
        (Some(u), Some(p)) => (u.to_owned(), p.to_owned()),
        _ => {
            let raw = entry["auth"]
                .as_str()
                .ok_or_else(|| invalid(format!("entry for {registry} has no auth")))?;
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(raw)
                .map_err(|e| invalid(format!("auth is not base64: {e}")))?;
            let text =
                String::from_utf8(decoded).map_err(|_| invalid("auth is not UTF-8".into()))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| invalid("auth is not user:password".into()))?;
            (u.to_owned(), p.to_owned())
        }
    };
    let header = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    );
    Ok((header, (user, pass)))
}

pub struct Agent {
    opts: AgentOptions,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    node: Option<NodeApi>,
    last_inputs: Option<Inputs>,
    last_pass: Option<Instant>,
    last_warnings: Vec<Warning>,
    last_error: Option<String>,
    labelled: Option<bool>,
}

impl Agent {
    pub async fn new(opts: AgentOptions, metrics: Arc<Metrics>, ready: Arc<AtomicBool>) -> Self {
        let node = match &opts.node_name {
            None => None,
            Some(name) => match NodeApi::connect(name.clone()).await {
                Ok(n) => Some(n),
                Err(e) => {
                    tracing::warn!(error = %e, "no Kubernetes API access: the node is not labelled and no events are sent");
                    None
                }
            },
        };
        Agent {
            opts,
            metrics,
            ready,
            node,
            last_inputs: None,
            last_pass: None,
            last_warnings: Vec::new(),
            last_error: None,
            labelled: None,
        }
    }

    fn reconciler(&self, options: RenderOptions) -> Reconciler {
        Reconciler {
            root: self.opts.root.clone(),
            runtime: self.opts.runtime,
            options,
            layout: self.opts.layout.clone(),
        }
    }

    fn read_inputs(&self) -> Result<Inputs, InputError> {
        Ok(Inputs {
            config: read(&self.opts.config)?,
            ca: match &self.opts.ca_file {
                Some(p) => Some(read(p)?),
                None => None,
            },
            credentials: match &self.opts.credentials_file {
                Some(p) => Some(read(p)?),
                None => None,
            },
            // With its imports merged in, so a drop-in's change is noticed too.
            containerd: preflight::effective_config(
                &self.opts.root,
                &self.opts.root.join(&self.opts.containerd_config),
            ),
        })
    }

    /// Runs until `shutdown` resolves; then cleans up if asked to.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        loop {
            // A pass waits only on the Kubernetes API (file work has no await points), so
            // dropping it at SIGTERM leaves no file half-done and keeps the drain short.
            tokio::select! {
                _ = &mut shutdown => break,
                _ = self.tick() => {}
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.opts.interval) => {}
            }
        }
        self.ready.store(false, Ordering::Relaxed);
        if self.opts.cleanup_on_exit {
            self.cleanup().await;
        }
    }

    /// Reconciles when an input changed or the recheck period passed.
    pub async fn tick(&mut self) {
        let inputs = match self.read_inputs() {
            Ok(i) => i,
            Err(e) => {
                self.fail(e.to_string());
                return;
            }
        };
        let due = self
            .last_pass
            .is_none_or(|t| t.elapsed() >= self.opts.recheck);
        if !due && self.last_inputs.as_ref() == Some(&inputs) && self.last_error.is_none() {
            return;
        }
        self.last_pass = Some(Instant::now());
        match self.pass(&inputs).await {
            Ok(()) => {
                if self.last_error.take().is_some() {
                    tracing::info!("reconcile succeeded again");
                }
                self.last_inputs = Some(inputs);
                self.ready.store(true, Ordering::Relaxed);
            }
            Err(e) => self.fail(e),
        }
    }

    fn fail(&mut self, e: String) {
        self.metrics.reconcile_errors.inc();
        self.ready.store(false, Ordering::Relaxed);
        if self.last_error.as_deref() != Some(e.as_str()) {
            tracing::error!(error = %e, "reconcile failed; files left as they were");
        }
        self.last_error = Some(e);
    }

    async fn pass(&mut self, inputs: &Inputs) -> Result<(), String> {
        self.metrics.reconciles.inc();
        let cfg: MirrorConfig = inputs
            .config
            .parse()
            .map_err(|e| format!("{}: {e}", self.opts.config.display()))?;
        let ca = match (&inputs.ca, &self.opts.ca_file) {
            // A plain-HTTP registry needs no CA: one given anyway is not used.
            _ if cfg.registry_plain_http => None,
            (Some(text), Some(path)) => {
                if !text.contains("-----BEGIN CERTIFICATE-----") {
                    return Err(format!(
                        "{}: no PEM certificate in the CA file",
                        path.display()
                    ));
                }
                Some(text.as_str())
            }
            _ => {
                return Err(format!(
                    "{}: the registry serves HTTPS (no registry_plain_http = true), so the agent \
                     needs its CA (--ca-file)",
                    self.opts.config.display()
                ));
            }
        };
        let mut options = RenderOptions {
            dial_timeout: self.opts.dial_timeout,
            ..Default::default()
        };
        if let (Some(text), Some(path)) = (&inputs.credentials, &self.opts.credentials_file) {
            let (header, basic) =
                credentials_for(text, cfg.registry.as_str(), path).map_err(|e| e.to_string())?;
            options.authorization = Some(header);
            options.basic = Some(basic);
        }
        let report: Report = self
            .reconciler(options)
            .reconcile(&cfg, ca)
            .map_err(|e| e.to_string())?;
        for p in &report.written {
            tracing::info!(path = %p.display(), "wrote");
        }
        for p in &report.removed {
            tracing::info!(path = %p.display(), "removed");
        }
        if !report.refused.is_empty() {
            tracing::warn!(refused = ?report.refused, "not owned by the agent (no managed header): left untouched; remove them or drop the rule");
        }
        self.metrics
            .configured_hosts
            .set(report.configured_hosts as i64);
        self.metrics.refused_files.set(report.refused.len() as i64);
        let warnings = if self.opts.runtime.uses_registries_yaml() {
            Vec::new()
        } else {
            self.preflight(inputs)
        };
        self.report_warnings(&warnings).await;
        let trusted = report.registry_trusted && !warnings.iter().any(preflight::blocks_trust);
        self.metrics.registry_trusted.set(i64::from(trusted));
        self.label(trusted).await;
        if !report.refused.is_empty()
            && let Some(n) = &self.node
            && (!report.written.is_empty() || self.last_inputs.is_none())
        {
            let note = format!(
                "files not owned by the agent left untouched: {}",
                report.refused.join(", ")
            );
            if let Err(e) = n.event(true, "UnownedFiles", &note).await {
                tracing::warn!(error = %e, "cannot publish event");
            }
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default();
        self.metrics.last_success.set(now);
        Ok(())
    }

    fn preflight(&self, inputs: &Inputs) -> Vec<Warning> {
        let Some(text) = &inputs.containerd else {
            return vec![Warning {
                check: "config_unreadable",
                message: format!(
                    "cannot read containerd's config {} (under --root)",
                    self.opts.containerd_config.display()
                ),
            }];
        };
        // containerd may name the hosts directory as the node sees it, through another path
        // to the same directory (MicroK8s names /var/snap/microk8s/<revision>, the agent
        // writes through .../current), or (tests, nested roots) as the agent sees it.
        let on_node = Path::new("/").join(&self.opts.layout.hosts_dir);
        let here = self.opts.root.join(&self.opts.layout.hosts_dir);
        let here_real = std::fs::canonicalize(&here).ok();
        let root = &self.opts.root;
        preflight::check_containerd(text, &on_node, |p| {
            p == on_node
                || p == here
                || here_real.is_some()
                    && std::fs::canonicalize(root.join(render::relative_to_root(p))).ok()
                        == here_real
        })
    }

    async fn report_warnings(&mut self, warnings: &[Warning]) {
        for check in preflight::CHECKS {
            let on = warnings.iter().any(|w| w.check == check);
            self.metrics
                .config_warnings
                .get_or_create(&CheckLabels { check })
                .set(i64::from(on));
        }
        if warnings == self.last_warnings.as_slice() {
            return;
        }
        for w in warnings {
            tracing::warn!(check = w.check, "{}", w.message);
            if let Some(n) = &self.node
                && let Err(e) = n.event(true, w.reason(), &w.message).await
            {
                tracing::warn!(error = %e, "cannot publish event");
            }
        }
        if warnings.is_empty() && !self.last_warnings.is_empty() {
            tracing::info!("containerd's config checks pass now");
        }
        self.last_warnings = warnings.to_vec();
    }

    async fn label(&mut self, trusted: bool) {
        let Some(n) = &self.node else { return };
        if self.labelled == Some(trusted) {
            return;
        }
        match n.set_trusted(trusted).await {
            Ok(()) => {
                tracing::info!(
                    trusted,
                    label = crate::node::TRUSTED_LABEL,
                    "node label updated"
                );
                self.labelled = Some(trusted);
                let note = if trusted {
                    "the node trusts the Outpost registry and mirrors through it"
                } else {
                    "the node does not trust the Outpost registry (see the agent's log)"
                };
                if let Err(e) = n.event(!trusted, "RegistryTrust", note).await {
                    tracing::warn!(error = %e, "cannot publish event");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot label the node"),
        }
    }

    /// Removes what the agent wrote and its label.
    pub async fn cleanup(&mut self) {
        match self.reconciler(RenderOptions::default()).cleanup() {
            Ok(r) => {
                for p in &r.removed {
                    tracing::info!(path = %p.display(), "removed on exit");
                }
                self.metrics.configured_hosts.set(0);
            }
            Err(e) => {
                self.metrics.reconcile_errors.inc();
                tracing::error!(error = %e, "cleanup failed");
            }
        }
        if let Some(n) = &self.node {
            match n.set_trusted(false).await {
                Ok(()) => tracing::info!("node label removed"),
                Err(e) => tracing::warn!(error = %e, "cannot remove the node label"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_from_dockerconfigjson() {
        let p = Path::new("creds");
        let auth = base64::engine::general_purpose::STANDARD.encode("pull:s3cret");
        let text = format!(r#"{{"auths":{{"https://r.example:5000":{{"auth":"{auth}"}}}}}}"#);
        let (h, (u, pw)) = credentials_for(&text, "r.example:5000", p).unwrap();
        assert_eq!(h, format!("Basic {auth}"));
        assert_eq!((u.as_str(), pw.as_str()), ("pull", "s3cret"));
        let text = r#"{"auths":{"r":{"username":"a","password":"b"}}}"#;
        assert!(credentials_for(text, "r", p).is_ok());
        assert!(credentials_for(text, "other", p).is_err());
        assert!(credentials_for("{}", "r", p).is_err());
    }
}
