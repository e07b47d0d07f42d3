//! Prometheus metrics (prefix `outpost_node_agent_`).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    pub check: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub configured_hosts: Gauge,
    pub reconcile_errors: Counter,
    pub reconciles: Counter,
    pub refused_files: Gauge,
    pub config_warnings: Family<CheckLabels, Gauge>,
    pub registry_trusted: Gauge,
    pub last_success: Gauge<f64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_node_agent");
        let configured_hosts = Gauge::default();
        registry.register(
            "configured_hosts",
            "Registry hosts configured on this node (hosts.toml files or registries.yaml mirrors the agent owns)",
            configured_hosts.clone(),
        );
        let reconcile_errors = Counter::default();
        registry.register(
            "reconcile_errors",
            "Reconcile passes that failed",
            reconcile_errors.clone(),
        );
        let reconciles = Counter::default();
        registry.register("reconciles", "Reconcile passes", reconciles.clone());
        let refused_files = Gauge::default();
        registry.register(
            "refused_files",
            "Files or entries the agent wanted but left alone because it does not own them",
            refused_files.clone(),
        );
        let config_warnings = Family::<CheckLabels, Gauge>::default();
        registry.register(
            "config_warnings",
            "1 while a check of containerd's config fails (config_path_unset, legacy_mirrors, ...)",
            config_warnings.clone(),
        );
        let registry_trusted = Gauge::default();
        registry.register(
            "registry_trusted",
            "1 while the node trusts the registry (its CA and hosts entry in place, containerd configured to read them)",
            registry_trusted.clone(),
        );
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last reconcile that succeeded",
            last_success.clone(),
        );
        Metrics {
            registry,
            configured_hosts,
            reconcile_errors,
            reconciles,
            refused_files,
            config_warnings,
            registry_trusted,
            last_success,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
