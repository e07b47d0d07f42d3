//! `outpost-webhook uninstall`: what a Helm pre-delete hook runs so that an uninstall leaves
//! nothing behind outside the release (the data PVC is kept by design). Order matters: the node
//! agent's pods must terminate (their preStop and SIGTERM remove the runtime files and the
//! node label) while their ServiceAccount and RBAC still exist, i.e. before Helm deletes those;
//! the webhook and the certificate manager must be gone before their copies and Secrets are
//! deleted, or they would make them again. Every step treats NotFound as done.

use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Secret};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use crate::certs::CERTIFICATE_LABEL;
use crate::duration::parse_duration;
use crate::secrets::{COPIED_FROM, MANAGED_BY, MANAGED_BY_LABEL};

#[derive(clap::Args, Debug)]
pub struct UninstallArgs {
    /// The release namespace. Default: POD_NAMESPACE (downward API).
    #[arg(long, env = "OUTPOST_NAMESPACE")]
    pub namespace: Option<String>,
    /// The node agent's DaemonSet: deleted first (foreground), then waited for until its pods
    /// are gone.
    #[arg(long, env = "OUTPOST_NODE_AGENT_DAEMONSET")]
    pub node_agent_daemonset: Option<String>,
    /// A Deployment to delete and wait for (repeatable; env: comma-separated): the webhook's,
    /// the certificate manager's.
    #[arg(
        long = "deployment",
        env = "OUTPOST_DEPLOYMENTS",
        value_delimiter = ','
    )]
    pub deployments: Vec<String>,
    /// The node label the node agent sets; removed from every node still carrying it.
    #[arg(long, env = "OUTPOST_NODE_LABEL", default_value = "outpost.io/trusted")]
    pub node_label: String,
    /// The pull secret whose copies (made by the webhook from <namespace>/<name>) are deleted
    /// in every namespace.
    #[arg(long, env = "OUTPOST_PULL_SECRET")]
    pub pull_secret: Option<String>,
    /// The nodes' credential Secret of the release namespace (the webhook's
    /// --node-credential-secret), deleted if the webhook made it.
    #[arg(long, env = "OUTPOST_NODE_CREDENTIAL_SECRET")]
    pub node_credential_secret: Option<String>,
    /// A managed certificate Secret of the release namespace to delete (repeatable; env:
    /// comma-separated); only if it carries the certificate manager's labels.
    #[arg(
        long = "certificate-secret",
        env = "OUTPOST_CERTIFICATE_SECRETS",
        value_delimiter = ','
    )]
    pub certificate_secrets: Vec<String>,
    /// A Lease of the release namespace to delete (repeatable; env: comma-separated): the
    /// registry's leader election, made by the registry rather than by Helm. After the
    /// Deployments, so no leader makes it again.
    #[arg(long = "lease", env = "OUTPOST_LEASES", value_delimiter = ',')]
    pub leases: Vec<String>,
    /// Longest wait for each deleted workload to be gone (pods terminating, cleanup hooks).
    #[arg(long, env = "OUTPOST_UNINSTALL_WAIT", default_value = "120s", value_parser = parse_duration)]
    pub wait: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error("uninstall needs --namespace (or POD_NAMESPACE)")]
    NoNamespace,
    #[error("{failed} uninstall step(s) failed (see the warnings above)")]
    Failed { failed: usize },
}

/// What was removed (for the log and tests).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    pub workloads_deleted: Vec<String>,
    pub nodes_unlabelled: Vec<String>,
    pub copies_deleted: Vec<String>,
    pub certificates_deleted: Vec<String>,
    pub leases_deleted: Vec<String>,
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// Deletes `name` with foreground propagation (the object stays until its pods are gone) and
/// waits, at most `wait`, until it is gone. Returns whether it existed.
async fn delete_and_wait<K>(api: &Api<K>, name: &str, wait: Duration) -> Result<bool, kube::Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::foreground()).await {
        Ok(_) => {}
        Err(e) if not_found(&e) => return Ok(false),
        Err(e) => return Err(e),
    }
    let deadline = Instant::now() + wait;
    while api.get_opt(name).await?.is_some() {
        if Instant::now() >= deadline {
            tracing::warn!(
                name,
                wait_s = wait.as_secs(),
                "still terminating; going on without it"
            );
            return Ok(true);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    Ok(true)
}

pub async fn run(client: &Client, args: &UninstallArgs) -> Result<Report, UninstallError> {
    let namespace = args
        .namespace
        .clone()
        .or_else(|| std::env::var("POD_NAMESPACE").ok())
        .filter(|n| !n.is_empty())
        .ok_or(UninstallError::NoNamespace)?;
    let mut report = Report::default();
    let mut failed = 0;
    let mut fail = |step: &str, e: kube::Error| {
        tracing::warn!(step, error = %e, "uninstall step failed");
        failed += 1;
    };

    if let Some(ds) = &args.node_agent_daemonset {
        let api = Api::<DaemonSet>::namespaced(client.clone(), &namespace);
        match delete_and_wait(&api, ds, args.wait).await {
            Ok(true) => {
                tracing::info!(daemonset = %ds, "node agent removed");
                report.workloads_deleted.push(format!("daemonset/{ds}"));
            }
            Ok(false) => {}
            Err(e) => fail("delete the node agent DaemonSet", e),
        }
    }
    let deployments = Api::<Deployment>::namespaced(client.clone(), &namespace);
    for d in &args.deployments {
        match delete_and_wait(&deployments, d, args.wait).await {
            Ok(true) => {
                tracing::info!(deployment = %d, "deployment removed");
                report.workloads_deleted.push(format!("deployment/{d}"));
            }
            Ok(false) => {}
            Err(e) => fail("delete a Deployment", e),
        }
    }

    let leases = Api::<Lease>::namespaced(client.clone(), &namespace);
    for l in &args.leases {
        match leases.delete(l, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(lease = %l, "lease removed");
                report.leases_deleted.push(l.clone());
            }
            Err(e) if not_found(&e) => {}
            Err(e) => fail("delete a Lease", e),
        }
    }

    // Nodes whose agent could not clean up (no node name, a pod that never ran, a wait cut
    // short): the label is the webhook's node affinity and must not outlive the install.
    let nodes = Api::<Node>::all(client.clone());
    match nodes
        .list_metadata(&ListParams::default().labels(&args.node_label))
        .await
    {
        Ok(list) => {
            for node in list.items {
                let Some(name) = node.metadata.name else {
                    continue;
                };
                let patch =
                    serde_json::json!({"metadata": {"labels": {args.node_label.as_str(): null}}});
                match nodes
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                {
                    Ok(_) => {
                        tracing::info!(node = %name, label = %args.node_label, "node label removed");
                        report.nodes_unlabelled.push(name);
                    }
                    Err(e) if not_found(&e) => {}
                    Err(e) => fail("remove the node label", e),
                }
            }
        }
        Err(e) => fail("list labelled nodes", e),
    }

    // Secrets are only ever read by name (RBAC then grants those names only): the copies
    // with a `metadata.name` field selector across namespaces, the certificates one by one.
    let mut doomed: Vec<(String, String, bool)> = Vec::new();
    if let Some(pull) = &args.pull_secret {
        let from = format!("{namespace}/{pull}");
        let all = Api::<Secret>::all(client.clone());
        match all
            .list_metadata(
                &ListParams::default()
                    .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
                    .fields(&format!("metadata.name={pull}")),
            )
            .await
        {
            Ok(list) => {
                for s in list.items {
                    let copied_from = s
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(COPIED_FROM));
                    if copied_from != Some(&from) {
                        continue;
                    }
                    if let (Some(ns), Some(name)) = (s.metadata.namespace, s.metadata.name) {
                        doomed.push((ns, name, true));
                    }
                }
            }
            Err(e) => fail("list the pull-secret copies", e),
        }
    }
    let own = Api::<Secret>::namespaced(client.clone(), &namespace);
    if let Some(name) = &args.node_credential_secret {
        let from = format!("{namespace}/{name}");
        match own.get_metadata_opt(name).await {
            Ok(Some(s)) => {
                let ours = s
                    .metadata
                    .labels
                    .as_ref()
                    .is_some_and(|l| l.get(MANAGED_BY_LABEL).is_some_and(|v| v == MANAGED_BY))
                    && s.metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(COPIED_FROM))
                        .is_some_and(|v| *v == from);
                if ours {
                    doomed.push((namespace.clone(), name.clone(), true));
                } else {
                    tracing::warn!(secret = %name, "not the webhook's node credential; left alone");
                }
            }
            Ok(None) => {}
            Err(e) => fail("read the node credential Secret", e),
        }
    }
    for name in &args.certificate_secrets {
        match own.get_metadata_opt(name).await {
            Ok(Some(s)) => {
                let ours = s.metadata.labels.as_ref().is_some_and(|l| {
                    l.contains_key(CERTIFICATE_LABEL)
                        && l.get(MANAGED_BY_LABEL).is_some_and(|v| v == MANAGED_BY)
                });
                if ours {
                    doomed.push((namespace.clone(), name.clone(), false));
                } else {
                    tracing::warn!(secret = %name, "not a managed certificate Secret; left alone");
                }
            }
            Ok(None) => {}
            Err(e) => fail("read a certificate Secret", e),
        }
    }
    for (ns, name, is_copy) in doomed {
        let api = Api::<Secret>::namespaced(client.clone(), &ns);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %ns, secret = %name, "secret removed");
                if is_copy {
                    report.copies_deleted.push(ns);
                } else {
                    report.certificates_deleted.push(name);
                }
            }
            Err(e) if not_found(&e) => {}
            Err(e) => fail("delete a secret", e),
        }
    }
    if failed > 0 {
        return Err(UninstallError::Failed { failed });
    }
    tracing::info!(?report, "uninstall clean-up done");
    Ok(report)
}
