//! Prometheus metrics (prefix `outpost_`), encoded in the OpenMetrics text format.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::storage::{Listings, RequestCounts};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub method: String,
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PullLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: &'static str,
}

pub struct Metrics {
    registry: Registry,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: Family<RouteLabels, Histogram>,
    pub blob_bytes_served: Counter,
    pub storage_bytes: Gauge<u64, AtomicU64>,
    /// 1 while this process leads (runs sync, staging and retention), else 0.
    pub leader: Gauge,
    /// 1 while the last contact with the parent succeeded.
    pub parent_connected: Gauge,
    pub sync_runs: Family<ResultLabels, Counter>,
    pub sync_last_success: Gauge<f64, AtomicU64>,
    pub sync_bytes_downloaded: Counter,
    /// Bytes the platform filter left at the parent (see the README: the sizes of the skipped
    /// manifests as their indexes give them).
    pub sync_skipped_bytes: Counter,
    pub pull_through: Family<PullLabels, Counter>,
    pub staging_images: Family<StateLabels, Gauge>,
    pub evictions: Counter,
    pub evicted_bytes: Counter,
    /// Connected registries below this one, by state (online, offline).
    pub children: Family<StateLabels, Gauge>,
    /// Reports of this registry's state to its parent, by result.
    pub parent_reports: Family<ResultLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("outpost");
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method, route and status",
            http_requests.clone(),
        );
        let http_duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            // 100 µs to ~100 s.
            Histogram::new(exponential_buckets(0.0001, 4.0, 11))
        });
        registry.register(
            "http_request_duration_seconds",
            "Time to produce response headers, by method and route",
            http_duration.clone(),
        );
        let blob_bytes_served = Counter::default();
        registry.register(
            "blob_bytes_served",
            "Blob bytes sent to clients",
            blob_bytes_served.clone(),
        );
        let storage_bytes = Gauge::<u64, AtomicU64>::default();
        registry.register(
            "storage_bytes",
            "Bytes of blob content in the store",
            storage_bytes.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this process leads the processes sharing its store (runs sync, staging \
             and retention), else 0",
            leader.clone(),
        );
        let parent_connected = Gauge::default();
        registry.register(
            "parent_connected",
            "1 while the last contact with the parent registry succeeded, else 0",
            parent_connected.clone(),
        );
        let sync_runs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "sync_runs",
            "Sync runs finished, by result (success, partial, paused, failed)",
            sync_runs.clone(),
        );
        let sync_last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "sync_last_success_timestamp_seconds",
            "Unix time of the end of the last sync run that completed without errors",
            sync_last_success.clone(),
        );
        let sync_bytes_downloaded = Counter::default();
        registry.register(
            "sync_bytes_downloaded",
            "Blob bytes downloaded from the parent registry",
            sync_bytes_downloaded.clone(),
        );
        let sync_skipped_bytes = Counter::default();
        registry.register(
            "sync_skipped_bytes",
            "Bytes not fetched from the parent because of the platform filter: the sizes of the \
             index children of unlisted platforms that were left out (their manifests, as the \
             index descriptors give them; their layers are not known without fetching them)",
            sync_skipped_bytes.clone(),
        );
        let pull_through = Family::<PullLabels, Counter>::default();
        registry.register(
            "pull_through",
            "Manifest and blob requests for in-scope repositories: hit (stored), miss (fetched \
             from the parent while served) or error (not stored and the parent could not serve it)",
            pull_through.clone(),
        );
        let staging_images = Family::<StateLabels, Gauge>::default();
        registry.register(
            "staging_images",
            "Images of staging requests, by state (pending, downloading, staged, failed)",
            staging_images.clone(),
        );
        let evictions = Counter::default();
        registry.register(
            "evictions",
            "Images evicted to keep the store under --max-storage",
            evictions.clone(),
        );
        let evicted_bytes = Counter::default();
        registry.register(
            "evicted_bytes",
            "Blob bytes removed by eviction",
            evicted_bytes.clone(),
        );
        let children = Family::<StateLabels, Gauge>::default();
        registry.register(
            "children",
            "Connected registries below this one (nested ones included) by state: online, or \
             offline when not heard from for two of their sync intervals (10 minutes without one)",
            children.clone(),
        );
        let parent_reports = Family::<ResultLabels, Counter>::default();
        registry.register(
            "parent_reports",
            "Reports of this registry's state to an Outpost parent, by result (sent; denied: \
             the sync token lacks message/write on gateway/<name>; failed: any other error)",
            parent_reports.clone(),
        );
        Metrics {
            children,
            parent_reports,
            pull_through,
            staging_images,
            evictions,
            leader,
            evicted_bytes,
            registry,
            parent_connected,
            sync_runs,
            sync_last_success,
            sync_bytes_downloaded,
            sync_skipped_bytes,
            http_requests,
            http_duration,
            blob_bytes_served,
            storage_bytes,
        }
    }

    pub fn observe_request(&self, method: &str, route: &str, status: u16, elapsed: Duration) {
        self.http_requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                route: route.to_owned(),
                status,
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabels {
                method: method.to_owned(),
                route: route.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Also exposes `storage_requests_total{backend,operation}`, read from `counts` (the
    /// object store's) on each scrape.
    pub fn with_storage_requests(mut self, counts: Option<Arc<RequestCounts>>) -> Self {
        if let Some(counts) = counts {
            self.registry
                .register_collector(Box::new(StorageRequests(counts)));
        }
        self
    }

    /// Also exposes `storage_listings_total{what}`, read from `listings` on each scrape.
    pub fn with_storage_listings(mut self, listings: Option<Arc<Listings>>) -> Self {
        if let Some(listings) = listings {
            self.registry
                .register_collector(Box::new(StorageListings(listings)));
        }
        self
    }

    /// Also exposes `namespace_credential_authentications_total{result,namespace}`, the
    /// counter the auth layer keeps.
    pub fn with_namespace_credentials(
        mut self,
        family: Family<crate::auth::namespace::NsAuthLabels, Counter>,
    ) -> Self {
        self.registry.register(
            "namespace_credential_authentications",
            "Namespace credentials presented, by result (accepted, expired, not_yet_valid, \
             bad_signature, unknown_key, malformed, wrong_username) and namespace (empty when \
             no credential of the claimed namespace was accepted before)",
            family,
        );
        self
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// `outpost_storage_requests_total{backend,operation}`: the object store's request counters.
#[derive(Debug)]
struct StorageRequests(Arc<RequestCounts>);

impl Collector for StorageRequests {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "storage_requests",
            "Requests sent to the object store, by operation (each is billed)",
            None,
            MetricType::Counter,
        )?;
        let backend = self.0.backend();
        for (operation, n) in self.0.snapshot() {
            let labels = [("backend", backend), ("operation", operation)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// `outpost_storage_listings_total{what}`: whole-store listings (see [`Listings`]).
#[derive(Debug)]
struct StorageListings(Arc<Listings>);

impl Collector for StorageListings {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "storage_listings",
            "Listings of the whole store (every blob, or every repository), whose cost grows \
             with the store: at start, by gc, fsck and eviction passes, never while idle",
            None,
            MetricType::Counter,
        )?;
        for (what, n) in self.0.snapshot() {
            ConstCounter::new(n).encode(family.encode_family(&[("what", what)])?)?;
        }
        Ok(())
    }
}
