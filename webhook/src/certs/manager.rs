//! The certificate Secrets and the webhook configuration's `caBundle` through the Kubernetes
//! API. Every write is conditional (create, or replace at the resourceVersion read): a
//! replica that loses a race (AlreadyExists, Conflict) reads again and decides again.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::watch;

use super::pki::{self, PkiError, Sans};
use super::plan::{self, CaState, Decision, LeafState, Timings};
use super::{CERTIFICATE_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
use crate::metrics::{Metrics, SecretLabels};

/// Reads and writes of one Secret before giving up for this pass (each lost race costs one).
const ATTEMPTS: usize = 5;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("Secret {0}: still contended after {ATTEMPTS} attempts")]
    Contended(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Registry,
    Webhook,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Registry => "registry",
            Role::Webhook => "webhook",
        }
    }
}

/// One serving certificate: its Secret and names.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub role: Role,
    pub secret: String,
    pub sans: Sans,
}

/// What the manager keeps.
#[derive(Clone, Debug)]
pub struct Spec {
    pub namespace: String,
    pub ca_secret: String,
    pub leaves: Vec<Leaf>,
    /// The MutatingWebhookConfiguration whose every `caBundle` is the trust bundle.
    pub webhook_configuration: Option<String>,
    pub timings: Timings,
    /// Period of full passes besides watch events (time-based renewals and rotations).
    pub check_interval: Duration,
}

/// The state after a pass: what the process serves and trusts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// Every trusted CA, PEM, newest first.
    pub bundle: String,
    /// The signing CA's certificate (PEM).
    pub signer: String,
    pub leaves: BTreeMap<String, plan::LeafState>,
}

impl Snapshot {
    /// The serving certificate kept in Secret `secret`.
    pub fn leaf(&self, secret: &str) -> Option<&plan::LeafState> {
        self.leaves.get(secret)
    }
}

fn data_of(s: &Secret) -> BTreeMap<String, Vec<u8>> {
    s.data
        .as_ref()
        .map(|d| d.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect())
        .unwrap_or_default()
}

fn secret(
    name: &str,
    namespace: &str,
    certificate: &str,
    data: BTreeMap<String, Vec<u8>>,
    current: Option<&Secret>,
) -> Secret {
    let mut meta = current
        .map(|c| c.metadata.clone())
        .unwrap_or_else(|| ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        });
    let labels = meta.labels.get_or_insert_with(BTreeMap::new);
    labels.insert(MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned());
    labels.insert(CERTIFICATE_LABEL.to_owned(), certificate.to_owned());
    meta.managed_fields = None;
    Secret {
        metadata: meta,
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data.into_iter().map(|(k, v)| (k, ByteString(v))).collect()),
        ..Secret::default()
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Reads `name`, decides, writes if needed; on a lost race reads and decides again.
async fn ensure<T>(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    certificate: &str,
    mut decide: impl FnMut(Option<BTreeMap<String, Vec<u8>>>) -> Result<Decision<T>, CertError>,
    data: impl Fn(&T) -> BTreeMap<String, Vec<u8>>,
) -> Result<T, CertError> {
    for _ in 0..ATTEMPTS {
        let current = api.get_opt(name).await?;
        let decision = decide(current.as_ref().map(data_of))?;
        let (value, why) = match decision {
            Decision::Keep(v) => return Ok(v),
            Decision::Write(v, why) => (v, why),
        };
        let object = secret(name, namespace, certificate, data(&value), current.as_ref());
        let written = match &current {
            None => api.create(&PostParams::default(), &object).await,
            Some(_) => api.replace(name, &PostParams::default(), &object).await,
        };
        match written {
            Ok(_) => {
                tracing::info!(%namespace, secret = name, reason = why, "certificate Secret written");
                return Ok(value);
            }
            Err(e) if is_conflict(&e) => {
                tracing::debug!(%namespace, secret = name, "another replica wrote first; reading again");
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(CertError::Contended(name.to_owned()))
}

/// One pass: the CA, then each serving certificate, then the webhook configuration.
pub async fn reconcile(
    client: &Client,
    spec: &Spec,
    now: SystemTime,
) -> Result<Snapshot, CertError> {
    let api = Api::<Secret>::namespaced(client.clone(), &spec.namespace);
    let ca = ensure(
        &api,
        &spec.namespace,
        &spec.ca_secret,
        "ca",
        |stored| {
            let stored = stored.map(|d| CaState::from_data(&d));
            if let Some(Err(why)) = &stored {
                tracing::warn!(secret = %spec.ca_secret, %why, "stored CA unreadable");
            }
            Ok(plan::decide_ca(
                stored,
                &spec.ca_secret,
                now,
                &spec.timings,
            )?)
        },
        CaState::to_data,
    )
    .await?;
    let mut leaves = BTreeMap::new();
    for leaf in &spec.leaves {
        let state = ensure(
            &api,
            &spec.namespace,
            &leaf.secret,
            leaf.role.as_str(),
            |stored| {
                let stored = stored.map(|d| LeafState::from_data(&d));
                if let Some(Err(why)) = &stored {
                    tracing::warn!(secret = %leaf.secret, %why, "stored certificate unreadable");
                }
                Ok(plan::decide_leaf(
                    stored,
                    &ca,
                    &leaf.sans,
                    now,
                    &spec.timings,
                )?)
            },
            LeafState::to_data,
        )
        .await?;
        leaves.insert(leaf.secret.clone(), state);
    }
    let bundle = ca.bundle_pem();
    if let Some(name) = &spec.webhook_configuration {
        patch_ca_bundle(client, name, &bundle).await?;
    }
    Ok(Snapshot {
        bundle,
        signer: ca.signer.cert.clone(),
        leaves,
    })
}

/// Sets every webhook's `clientConfig.caBundle` of the configuration `name` to `bundle`
/// (replace at the resourceVersion read). Returns whether it wrote.
pub async fn patch_ca_bundle(client: &Client, name: &str, bundle: &str) -> Result<bool, CertError> {
    let api = Api::<MutatingWebhookConfiguration>::all(client.clone());
    let want = ByteString(bundle.as_bytes().to_vec());
    for _ in 0..ATTEMPTS {
        let Some(mut mwc) = api.get_opt(name).await? else {
            tracing::debug!(configuration = name, "webhook configuration not found yet");
            return Ok(false);
        };
        let mut changed = false;
        for w in mwc.webhooks.iter_mut().flatten() {
            if w.client_config.ca_bundle.as_ref() != Some(&want) {
                w.client_config.ca_bundle = Some(want.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        mwc.metadata.managed_fields = None;
        match api.replace(name, &PostParams::default(), &mwc).await {
            Ok(_) => {
                tracing::info!(
                    configuration = name,
                    "webhook caBundle set to the trust bundle"
                );
                return Ok(true);
            }
            Err(e) if is_conflict(&e) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(CertError::Contended(name.to_owned()))
}

fn trigger<T>(ev: Result<T, watcher::Error>) -> std::future::Ready<Option<()>> {
    if let Err(e) = &ev {
        tracing::warn!(error = %e, "certificate watch failed; retrying");
    }
    std::future::ready(ev.ok().map(|_| ()))
}

/// Runs passes for as long as the process lives: on changes to the managed Secrets or the
/// webhook configuration (each watched by name, which the chart's RBAC allows), every
/// `check_interval`, and after a failure with backoff (1 s doubling to 60 s). Each pass's
/// result is published on the returned channel (None until the first success).
pub fn spawn(
    client: Client,
    spec: Spec,
    metrics: Arc<Metrics>,
) -> watch::Receiver<Option<Arc<Snapshot>>> {
    let (tx, rx) = watch::channel(None);
    tokio::spawn(run(client, spec, metrics, tx));
    rx
}

/// Expiry gauges from a pass's result.
fn record(metrics: &Metrics, spec: &Spec, snap: &Snapshot) {
    let set = |secret: &str, pem: &str| {
        if let Ok(i) = pki::info(pem)
            && let Ok(d) = i.not_after.duration_since(std::time::UNIX_EPOCH)
        {
            metrics
                .certificate_expiry
                .get_or_create(&SecretLabels {
                    secret: secret.to_owned(),
                })
                .set(i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        }
    };
    set(&spec.ca_secret, &snap.signer);
    for (secret, leaf) in &snap.leaves {
        set(secret, &leaf.pair.cert);
    }
}

async fn run(
    client: Client,
    spec: Spec,
    metrics: Arc<Metrics>,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
) {
    let by_name = |name: &str| watcher::Config::default().fields(&format!("metadata.name={name}"));
    let secrets = Api::<Secret>::namespaced(client.clone(), &spec.namespace);
    let mut streams = vec![
        watcher(secrets.clone(), by_name(&spec.ca_secret))
            .default_backoff()
            .filter_map(trigger)
            .boxed(),
    ];
    for leaf in &spec.leaves {
        streams.push(
            watcher(secrets.clone(), by_name(&leaf.secret))
                .default_backoff()
                .filter_map(trigger)
                .boxed(),
        );
    }
    if let Some(name) = &spec.webhook_configuration {
        streams.push(
            watcher(
                Api::<MutatingWebhookConfiguration>::all(client.clone()),
                by_name(name),
            )
            .default_backoff()
            .filter_map(trigger)
            .boxed(),
        );
    }
    let mut events = futures_util::stream::select_all(streams);
    let mut backoff = Duration::from_secs(1);
    loop {
        let wait = match reconcile(&client, &spec, SystemTime::now()).await {
            Ok(snap) => {
                backoff = Duration::from_secs(1);
                record(&metrics, &spec, &snap);
                tx.send_if_modified(|cur| {
                    if cur.as_deref() == Some(&snap) {
                        false
                    } else {
                        *cur = Some(Arc::new(snap));
                        true
                    }
                });
                spec.check_interval
            }
            Err(e) => {
                metrics.certificate_errors.inc();
                tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "certificate reconciliation failed");
                let w = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                w
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            ev = events.next() => if ev.is_none() { return },
        }
        // Our own writes and a burst of events make one pass.
        let debounce = tokio::time::sleep(Duration::from_millis(200));
        tokio::pin!(debounce);
        loop {
            tokio::select! {
                _ = &mut debounce => break,
                ev = events.next() => if ev.is_none() { break },
            }
        }
    }
}
