//! Prometheus metrics (prefix `outpost_webhook_`), in the OpenMetrics text format.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// How an admission ended, as the `admissions` counter labels it. Defined here, below the
/// admission code that reports it, so that metrics depends on nothing in the crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Rewritten,
    Unchanged,
    Skipped,
    Error,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Rewritten => "rewritten",
            Outcome::Unchanged => "unchanged",
            Outcome::Skipped => "skipped",
            Outcome::Error => "error",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SecretLabels {
    pub secret: String,
}

pub struct Metrics {
    registry: Registry,
    admissions: Family<ResultLabels, Counter>,
    duration: Histogram,
    availability_checks: Family<ResultLabels, Counter>,
    pub secret_sync_errors: Counter,
    /// notAfter (Unix seconds) of each managed certificate: the signing CA and the serving ones.
    pub certificate_expiry: Family<SecretLabels, Gauge>,
    pub certificate_errors: Counter,
    /// Invalid `outpost.io/repositories` annotations seen (each namespace and value once).
    pub namespace_scope_errors: Counter,
    /// Opted-in namespaces whose annotation is invalid now (they get no credential).
    pub namespace_scopes_invalid: Gauge,
    /// Opted-in namespaces holding a current namespace credential after the last pass.
    pub namespace_credentials: Gauge,
    credentials_minted: Family<ReasonLabels, Counter>,
    /// Images left on their upstream because the namespace's credential may not pull them.
    pub outside_scope: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost_webhook");
        let admissions = Family::<ResultLabels, Counter>::default();
        registry.register(
            "admissions",
            "Admission reviews answered, by result (rewritten, unchanged, skipped, error)",
            admissions.clone(),
        );
        // 100 µs to ~6.5 s.
        let duration = Histogram::new(exponential_buckets(0.0001, 2.0, 17));
        registry.register(
            "admission_duration_seconds",
            "Time to answer an admission review",
            duration.clone(),
        );
        let availability_checks = Family::<ResultLabels, Counter>::default();
        registry.register(
            "availability_checks",
            "Images checked on Outpost before a rewrite, by result (available, unavailable)",
            availability_checks.clone(),
        );
        let secret_sync_errors = Counter::default();
        registry.register(
            "secret_sync_errors",
            "Failed pull-secret copy reconciliations",
            secret_sync_errors.clone(),
        );
        let certificate_expiry = Family::<SecretLabels, Gauge>::default();
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "When each self-managed certificate expires (Unix time), by Secret (the CA's: its signing CA)",
            certificate_expiry.clone(),
        );
        let certificate_errors = Counter::default();
        registry.register(
            "certificate_errors",
            "Failed self-managed certificate passes (retried with backoff)",
            certificate_errors.clone(),
        );
        let namespace_scope_errors = Counter::default();
        registry.register(
            "namespace_scope_errors",
            "Invalid outpost.io/repositories namespace annotations found (each namespace and value counted once)",
            namespace_scope_errors.clone(),
        );
        let namespace_scopes_invalid = Gauge::default();
        registry.register(
            "namespace_scopes_invalid",
            "Opted-in namespaces whose outpost.io/repositories annotation is invalid (no credential)",
            namespace_scopes_invalid.clone(),
        );
        let namespace_credentials = Gauge::default();
        registry.register(
            "namespace_credentials",
            "Opted-in namespaces holding a current namespace pull credential",
            namespace_credentials.clone(),
        );
        let credentials_minted = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "namespace_credentials_minted",
            "Namespace pull credentials minted, by reason (new, format, scope, key, registry, lifetime, renewal)",
            credentials_minted.clone(),
        );
        let outside_scope = Counter::default();
        registry.register(
            "images_outside_scope",
            "Images left on their upstream because their namespace's credential may not pull them from Outpost",
            outside_scope.clone(),
        );
        Metrics {
            registry,
            outside_scope,
            namespace_scope_errors,
            namespace_scopes_invalid,
            namespace_credentials,
            credentials_minted,
            admissions,
            duration,
            availability_checks,
            secret_sync_errors,
            certificate_expiry,
            certificate_errors,
        }
    }

    pub fn admission(&self, outcome: Outcome, took: Duration) {
        self.admissions
            .get_or_create(&ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
        self.duration.observe(took.as_secs_f64());
    }

    pub fn credential_minted(&self, reason: &'static str) {
        self.credentials_minted
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn availability(&self, available: bool) {
        let result = if available {
            "available"
        } else {
            "unavailable"
        };
        self.availability_checks
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
