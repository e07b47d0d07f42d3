//! Pull-secret copies: every namespace labelled `outpost.io/inject=enabled` gets a copy of the
//! pull secret from the webhook's own (release) namespace, kept equal to the source; copies
//! this webhook made are removed when their namespace opts out. Level-triggered: one
//! reconciliation computes the whole desired state, run on every relevant watch event and on
//! a period, so a missed event is repaired at the next pass.
//!
//! Every read of Secrets names the pull secret (gets by name; lists and watches with a
//! `metadata.name` field selector, which RBAC matches against `resourceNames`), so the chart
//! can grant Secrets by that one name: a ServiceAccount allowed to list Secrets unnamed could
//! read every Secret in the cluster. Copies made under an earlier pull-secret name are
//! therefore not seen and stay (remove them by hand after a rename).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use crate::config::ConfigSource;
use crate::metrics::Metrics;

/// The namespace label that opts a namespace in (the chart's namespaceSelector).
pub const INJECT_LABEL: &str = "outpost.io/inject";
pub const INJECT_ENABLED: &str = "enabled";
/// Marks the copies this webhook owns; only those are ever updated or deleted.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY: &str = "outpost-webhook";
/// `namespace/name` of the source, so two releases never touch each other's copies.
pub const COPIED_FROM: &str = "outpost.io/copied-from";

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
}

/// What one reconciliation did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deleted: Vec<String>,
    /// Namespaces holding a secret of that name that this webhook does not own.
    pub foreign: Vec<String>,
    pub source_missing: bool,
}

fn is_copy_of(s: &Secret, source: &str) -> bool {
    let m = &s.metadata;
    m.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY_LABEL))
        .is_some_and(|v| v == MANAGED_BY)
        && m.annotations
            .as_ref()
            .and_then(|a| a.get(COPIED_FROM))
            .is_some_and(|v| v == source)
}

fn copy_of(source: &Secret, name: &str, namespace: &str, from: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([(COPIED_FROM.to_owned(), from.to_owned())])),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone(),
        ..Secret::default()
    }
}

/// Brings our existing copy `copy` to the source's content. Quiet when it already matches
/// (another replica got there first); a Conflict (a concurrent write) re-reads and decides
/// again, a few times at most, since racing replicas all converge on the same content.
async fn converge(
    api: &Api<Secret>,
    ns: &str,
    name: &str,
    source: &Secret,
    from: &str,
    mut copy: Secret,
    report: &mut Report,
) -> Result<(), SyncError> {
    for _ in 0..3 {
        if copy.data == source.data && copy.type_ == source.type_ {
            tracing::debug!(namespace = %ns, secret = name, "pull secret copy already up to date");
            return Ok(());
        }
        let mut fresh = copy_of(source, name, ns, from);
        fresh.metadata.resource_version = copy.metadata.resource_version.clone();
        // A secret's type is immutable: a changed type needs a new object.
        let written = if copy.type_ != source.type_ {
            match api.delete(name, &DeleteParams::default()).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
            fresh.metadata.resource_version = None;
            api.create(&PostParams::default(), &fresh).await.map(|_| ())
        } else {
            api.replace(name, &PostParams::default(), &fresh)
                .await
                .map(|_| ())
        };
        match written {
            Ok(()) => {
                tracing::info!(namespace = %ns, secret = name, "pull secret copy updated");
                report.updated.push(ns.to_owned());
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(name).await? {
                Some(now) if is_copy_of(&now, from) => copy = now,
                Some(_) => {
                    tracing::warn!(namespace = %ns, secret = name, "a secret of that name exists and is not a copy of ours; left alone");
                    report.foreign.push(ns.to_owned());
                    return Ok(());
                }
                None => return Ok(()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    // Still contended: the next pass (a watch event follows every write) tries again.
    Ok(())
}

/// One pass: create missing copies, update stale ones, delete owned copies in namespaces
/// that opted out.
pub async fn reconcile(
    client: &Client,
    source_namespace: &str,
    name: &str,
) -> Result<Report, SyncError> {
    let from = format!("{source_namespace}/{name}");
    let mut report = Report::default();
    let source = Api::<Secret>::namespaced(client.clone(), source_namespace)
        .get_opt(name)
        .await?;
    report.source_missing = source.is_none();
    let opted_in: BTreeSet<String> = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{INJECT_LABEL}={INJECT_ENABLED}")))
        .await?
        .items
        .into_iter()
        .filter(|ns| ns.metadata.deletion_timestamp.is_none())
        .filter_map(|ns| ns.metadata.name)
        .filter(|n| n != source_namespace)
        .collect();
    let owned: Vec<Secret> = Api::<Secret>::all(client.clone())
        .list(
            &ListParams::default()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
                .fields(&format!("metadata.name={name}")),
        )
        .await?
        .items
        .into_iter()
        .filter(|s| {
            s.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(COPIED_FROM))
                .is_some_and(|v| v.starts_with(&format!("{source_namespace}/")))
        })
        .collect();

    if let Some(source) = &source {
        for ns in &opted_in {
            let api = Api::<Secret>::namespaced(client.clone(), ns);
            let existing = owned.iter().find(|s| {
                s.metadata.namespace.as_deref() == Some(ns.as_str())
                    && s.metadata.name.as_deref() == Some(name)
                    && is_copy_of(s, &from)
            });
            match existing {
                Some(copy) if copy.data == source.data && copy.type_ == source.type_ => {}
                Some(copy) => {
                    converge(&api, ns, name, source, &from, copy.clone(), &mut report).await?
                }
                None if api.get_opt(name).await?.is_some() => {
                    // Checked before writing, so a foreign secret costs a read per pass, not
                    // a refused write.
                    tracing::debug!(namespace = %ns, secret = name, "a secret of that name exists and is not a copy of ours; left alone");
                    report.foreign.push(ns.clone());
                }
                None => {
                    let fresh = copy_of(source, name, ns, &from);
                    match api.create(&PostParams::default(), &fresh).await {
                        Ok(_) => {
                            tracing::info!(namespace = %ns, secret = name, "pull secret copied");
                            report.created.push(ns.clone());
                        }
                        // Another replica (or someone else) created it between our read and
                        // our write: read it again and decide on what is there now.
                        Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(name).await?
                        {
                            Some(now) if is_copy_of(&now, &from) => {
                                converge(&api, ns, name, source, &from, now, &mut report).await?
                            }
                            Some(_) => {
                                tracing::warn!(namespace = %ns, secret = name, "a secret of that name exists and is not a copy of ours; left alone");
                                report.foreign.push(ns.clone());
                            }
                            // Created and deleted again meanwhile: the next pass creates it.
                            None => {}
                        },
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    } else {
        tracing::warn!(
            namespace = source_namespace,
            secret = name,
            "source pull secret not found; copies not created or updated"
        );
    }

    for copy in &owned {
        let (Some(ns), Some(copy_name)) = (&copy.metadata.namespace, &copy.metadata.name) else {
            continue;
        };
        let wanted = opted_in.contains(ns) && copy_name == name;
        if wanted {
            continue;
        }
        let api = Api::<Secret>::namespaced(client.clone(), ns);
        match api.delete(copy_name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, secret = %copy_name, "pull secret copy removed");
                report.deleted.push(ns.clone());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(report)
}

/// A watch event as a bare trigger; errors are logged (the watcher retries with backoff).
fn only_ok<T>(ev: Result<T, watcher::Error>) -> std::future::Ready<Option<()>> {
    if let Err(e) = &ev {
        tracing::warn!(error = %e, "watch failed; retrying");
    }
    std::future::ready(ev.ok().map(|_| ()))
}

/// Watches that trigger a pass: namespaces, and, when a pull secret is configured, that one
/// name in the source namespace and everywhere among the copies.
fn triggers(
    client: &Client,
    source_namespace: &str,
    name: Option<&str>,
) -> futures_util::stream::BoxStream<'static, ()> {
    let namespaces = watcher(
        Api::<Namespace>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .filter_map(only_ok)
    .boxed();
    let Some(name) = name else {
        return namespaces;
    };
    let by_name = format!("metadata.name={name}");
    let sources = watcher(
        Api::<Secret>::namespaced(client.clone(), source_namespace),
        watcher::Config::default().fields(&by_name),
    )
    .default_backoff()
    .filter_map(only_ok)
    .boxed();
    let copies = watcher(
        Api::<Secret>::all(client.clone()),
        watcher::Config::default()
            .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
            .fields(&by_name),
    )
    .default_backoff()
    .filter_map(only_ok)
    .boxed();
    futures_util::stream::select_all([namespaces, sources, copies]).boxed()
}

/// Runs reconciliations for as long as the process lives: on namespace changes, on changes
/// to the source secret or to owned copies, and every `resync`. The watches follow the
/// configured pull-secret name when the config changes it.
pub async fn run(
    client: Client,
    source_namespace: String,
    config: Arc<ConfigSource>,
    metrics: Arc<Metrics>,
    resync: Duration,
) {
    let configured = || config.get().and_then(|c| c.pull_secret.clone());
    let mut watched = configured();
    let mut events = triggers(&client, &source_namespace, watched.as_deref());
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            ev = events.next() => if ev.is_none() { return },
        }
        // A burst of events (the initial lists, a rollout) makes one pass, not hundreds.
        let debounce = tokio::time::sleep(Duration::from_millis(250));
        tokio::pin!(debounce);
        loop {
            tokio::select! {
                _ = &mut debounce => break,
                ev = events.next() => if ev.is_none() { break },
            }
        }
        let name = configured();
        if name != watched {
            events = triggers(&client, &source_namespace, name.as_deref());
            watched = name.clone();
        }
        let Some(name) = name else {
            continue;
        };
        if let Err(e) = reconcile(&client, &source_namespace, &name).await {
            metrics.secret_sync_errors.inc();
            tracing::warn!(error = %e, "pull secret reconciliation failed; retrying");
        }
    }
}
