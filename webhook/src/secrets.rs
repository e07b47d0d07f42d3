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
//!
//! With a namespace credential key file ([`Credentials`]) the controller mints instead of
//! copying: each opted-in namespace's secret holds a credential of its own, signed with the
//! registry's token signing key, scoped to pull the namespace's allowed repositories (its
//! `outpost.io/repositories` annotation, else the default scope) and expiring after the
//! configured lifetime. It is renewed at half its lifetime, and at once when the scope, the
//! signing key or the registry host changes. A namespace with an invalid annotation (reported
//! as an Event on it and in metrics) or an empty scope has no secret: an existing one is
//! deleted, so it grants nothing new (a credential already read stays valid until it expires).

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
use crate::nscred::{Credentials, KeyError, REPOSITORIES_ANNOTATION, Scope, scope_of};

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
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Mint(#[from] crate::nscred::MintError),
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

/// Annotations on a minted secret: what its credential was minted for (never the credential).
pub const CREDENTIAL_SCOPE: &str = "outpost.io/credential-scope";
pub const CREDENTIAL_KID: &str = "outpost.io/credential-kid";
pub const CREDENTIAL_REGISTRY: &str = "outpost.io/credential-registry";
/// Unix seconds.
pub const CREDENTIAL_ISSUED: &str = "outpost.io/credential-issued";
pub const CREDENTIAL_EXPIRES: &str = "outpost.io/credential-expires";

const DOCKER_CONFIG_JSON: &str = "kubernetes.io/dockerconfigjson";

/// Why a credential was minted (the `reason` label of the mint counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MintReason {
    /// No secret yet.
    New,
    /// Our secret without (readable) credential annotations: a copy made before minting.
    Format,
    Scope,
    Key,
    Registry,
    /// The configured lifetime was shortened below what the credential has left.
    Lifetime,
    Renewal,
}

impl MintReason {
    pub fn as_str(self) -> &'static str {
        match self {
            MintReason::New => "new",
            MintReason::Format => "format",
            MintReason::Scope => "scope",
            MintReason::Key => "key",
            MintReason::Registry => "registry",
            MintReason::Lifetime => "lifetime",
            MintReason::Renewal => "renewal",
        }
    }
}

/// A namespace whose annotation was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub namespace: String,
    pub annotation: String,
    pub error: String,
}

/// What one minting pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CredentialReport {
    pub minted: Vec<(String, MintReason)>,
    pub deleted: Vec<String>,
    pub foreign: Vec<String>,
    pub invalid: Vec<Invalid>,
    /// Namespaces holding a current credential after the pass.
    pub current: usize,
    /// Every opted-in namespace's scope (those with an empty one left out).
    pub scopes: BTreeMap<String, Scope>,
    /// The earliest renewal due among the secrets kept or written (Unix seconds).
    pub next_renewal: Option<u64>,
}

fn annotation<'a>(s: &'a Secret, key: &str) -> Option<&'a str> {
    s.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

/// When a credential issued at `issued` and expiring at `expires` is renewed: at half-life.
fn renew_at(issued: u64, expires: u64) -> u64 {
    issued + expires.saturating_sub(issued) / 2
}

/// How long a credential signed with a key this replica does not know is left alone after it
/// was issued: Secret volumes reach each node's pods at their own time (within about a minute),
/// so during a rotation another replica may already sign with the new key. Without this the two
/// would re-mint each other's credentials until both read the same file.
pub const KEY_PROPAGATION_SECS: u64 = 120;

/// Why `existing` (ours) must be minted again, or when to look again if it is current.
fn stale(
    existing: &Secret,
    scope: &Scope,
    minter: &dyn crate::nscred::Mint,
    registry: &str,
    lifetime: u64,
    now: u64,
) -> Result<u64, MintReason> {
    let kid = minter.kid();
    let times = (
        annotation(existing, CREDENTIAL_ISSUED).and_then(|v| v.parse::<u64>().ok()),
        annotation(existing, CREDENTIAL_EXPIRES).and_then(|v| v.parse::<u64>().ok()),
    );
    let (Some(issued), Some(expires), Some(had_scope), Some(had_kid), Some(had_registry)) = (
        times.0,
        times.1,
        annotation(existing, CREDENTIAL_SCOPE),
        annotation(existing, CREDENTIAL_KID),
        annotation(existing, CREDENTIAL_REGISTRY),
    ) else {
        return Err(MintReason::Format);
    };
    if existing.type_.as_deref() != Some(DOCKER_CONFIG_JSON) {
        return Err(MintReason::Format);
    }
    if had_scope != scope.to_string() {
        return Err(MintReason::Scope);
    }
    if had_kid != kid {
        let recent = now.saturating_sub(issued) < KEY_PROPAGATION_SECS;
        if minter.knows(had_kid) || !recent {
            return Err(MintReason::Key);
        }
        // A newer key file than ours, most likely: look again once it has had time to arrive
        // here (a key removed everywhere is replaced then).
        let due = renew_at(issued, expires);
        if now >= due {
            return Err(MintReason::Renewal);
        }
        return Ok(issued.saturating_add(KEY_PROPAGATION_SECS).min(due));
    }
    if had_registry != registry {
        return Err(MintReason::Registry);
    }
    if expires > now.saturating_add(lifetime) {
        return Err(MintReason::Lifetime);
    }
    let due = renew_at(issued, expires);
    if now >= due {
        return Err(MintReason::Renewal);
    }
    Ok(due)
}

/// The `.dockerconfigjson` holding `username`/`password` for `registry`.
fn docker_config(registry: &str, username: &str, password: &str) -> Vec<u8> {
    use base64::Engine;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
    serde_json::json!({"auths": {registry: {
        "username": username, "password": password, "auth": auth,
    }}})
    .to_string()
    .into_bytes()
}

struct Minting<'a> {
    name: &'a str,
    from: &'a str,
    registry: &'a str,
    scope: &'a Scope,
    kid: &'a str,
    issued: u64,
    expires: u64,
}

fn minted_secret(
    ns: &str,
    m: &Minting<'_>,
    minter: &dyn crate::nscred::Mint,
) -> Result<Secret, crate::nscred::MintError> {
    let cred = minter.mint(ns, m.scope, m.issued, m.expires)?;
    Ok(Secret {
        metadata: ObjectMeta {
            name: Some(m.name.to_owned()),
            namespace: Some(ns.to_owned()),
            labels: Some(BTreeMap::from([(
                MANAGED_BY_LABEL.to_owned(),
                MANAGED_BY.to_owned(),
            )])),
            annotations: Some(BTreeMap::from([
                (COPIED_FROM.to_owned(), m.from.to_owned()),
                (CREDENTIAL_SCOPE.to_owned(), m.scope.to_string()),
                (CREDENTIAL_KID.to_owned(), m.kid.to_owned()),
                (CREDENTIAL_REGISTRY.to_owned(), m.registry.to_owned()),
                (CREDENTIAL_ISSUED.to_owned(), m.issued.to_string()),
                (CREDENTIAL_EXPIRES.to_owned(), m.expires.to_string()),
            ])),
            ..ObjectMeta::default()
        },
        type_: Some(DOCKER_CONFIG_JSON.to_owned()),
        data: Some(BTreeMap::from([(
            ".dockerconfigjson".to_owned(),
            k8s_openapi::ByteString(docker_config(m.registry, &cred.username, &cred.password)),
        )])),
        ..Secret::default()
    })
}

/// Writes `fresh` over our `existing` secret (a changed type needs a new object). A Conflict
/// means another replica wrote meanwhile: its write's watch event brings the next pass, which
/// decides on what is there then. Returns whether this write landed.
async fn overwrite(
    api: &Api<Secret>,
    existing: &Secret,
    mut fresh: Secret,
) -> Result<bool, SyncError> {
    let name = fresh.metadata.name.clone().unwrap_or_default();
    let written = if existing.type_ != fresh.type_ {
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        api.create(&PostParams::default(), &fresh).await.map(|_| ())
    } else {
        fresh.metadata.resource_version = existing.metadata.resource_version.clone();
        api.replace(&name, &PostParams::default(), &fresh)
            .await
            .map(|_| ())
    };
    match written {
        Ok(()) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// One minting pass at `now` (Unix seconds): mint missing and stale credentials, delete our
/// secrets in namespaces that opted out, have an invalid annotation or an empty scope.
pub async fn reconcile_credentials(
    client: &Client,
    source_namespace: &str,
    name: &str,
    registry: &str,
    creds: &Credentials,
    now: u64,
) -> Result<CredentialReport, SyncError> {
    let from = format!("{source_namespace}/{name}");
    let minter = creds.keys.minter()?;
    let kid = minter.kid();
    let lifetime = creds.lifetime.as_secs().max(1);
    let mut report = CredentialReport::default();
    let mut wanted: BTreeMap<String, Scope> = BTreeMap::new();
    let namespaces = Api::<Namespace>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{INJECT_LABEL}={INJECT_ENABLED}")))
        .await?
        .items;
    for ns in namespaces {
        if ns.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(ns_name) = ns.metadata.name.clone() else {
            continue;
        };
        if ns_name == source_namespace {
            continue;
        }
        let text = ns
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(REPOSITORIES_ANNOTATION));
        match scope_of(text.map(String::as_str), &creds.default_scope) {
            Ok(scope) if scope.is_empty() => {}
            Ok(scope) => {
                wanted.insert(ns_name, scope);
            }
            Err(e) => report.invalid.push(Invalid {
                namespace: ns_name,
                annotation: text.cloned().unwrap_or_default(),
                error: e.to_string(),
            }),
        }
    }
    let owned: BTreeMap<String, Secret> = Api::<Secret>::all(client.clone())
        .list(
            &ListParams::default()
                .labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"))
                .fields(&format!("metadata.name={name}")),
        )
        .await?
        .items
        .into_iter()
        .filter(|s| annotation(s, COPIED_FROM).is_some_and(|v| v == from))
        .filter_map(|s| Some((s.metadata.namespace.clone()?, s)))
        .collect();

    let mut note_renewal = |due: u64| {
        report.next_renewal = Some(report.next_renewal.map_or(due, |n| n.min(due)));
    };
    let mut minted = Vec::new();
    let mut foreign = Vec::new();
    let mut current = 0;
    for (ns, scope) in &wanted {
        let api = Api::<Secret>::namespaced(client.clone(), ns);
        let reason = match owned.get(ns) {
            Some(existing) => {
                match stale(existing, scope, minter.as_ref(), registry, lifetime, now) {
                    Ok(due) => {
                        note_renewal(due);
                        current += 1;
                        continue;
                    }
                    Err(reason) => reason,
                }
            }
            None => MintReason::New,
        };
        let m = Minting {
            name,
            from: &from,
            registry,
            scope,
            kid: &kid,
            issued: now,
            expires: now.saturating_add(lifetime),
        };
        let fresh = minted_secret(ns, &m, minter.as_ref())?;
        let landed = match owned.get(ns) {
            Some(existing) => overwrite(&api, existing, fresh).await?,
            None if api.get_opt(name).await?.is_some() => {
                tracing::debug!(namespace = %ns, secret = name, "a secret of that name exists and is not ours; left alone");
                foreign.push(ns.clone());
                continue;
            }
            None => match api.create(&PostParams::default(), &fresh).await {
                Ok(_) => true,
                // Another replica (or someone else) created it meanwhile: the next pass
                // decides on what is there.
                Err(kube::Error::Api(e)) if e.code == 409 => false,
                Err(e) => return Err(e.into()),
            },
        };
        if landed {
            tracing::info!(namespace = %ns, secret = name, scope = %scope, kid = %kid, expires = m.expires, reason = reason.as_str(), "namespace credential minted");
            note_renewal(renew_at(m.issued, m.expires));
            minted.push((ns.clone(), reason));
            current += 1;
        }
    }
    report.minted = minted;
    report.foreign = foreign;
    report.current = current;

    for (ns, secret) in &owned {
        if wanted.contains_key(ns) {
            continue;
        }
        let Some(secret_name) = &secret.metadata.name else {
            continue;
        };
        match Api::<Secret>::namespaced(client.clone(), ns)
            .delete(secret_name, &DeleteParams::default())
            .await
        {
            Ok(_) => {
                tracing::info!(namespace = %ns, secret = %secret_name, "namespace credential removed");
                report.deleted.push(ns.clone());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    report.scopes = wanted;
    Ok(report)
}

/// What one pass did to the node credential: minted (why), and when to look again.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NodeReport {
    pub minted: Option<MintReason>,
    pub deleted: bool,
    /// A secret of that name exists and is not ours: left alone.
    pub foreign: bool,
    pub next_renewal: Option<u64>,
}

/// One pass over the node credential at `now`: the Secret `node.secret` in `namespace` holds
/// a current credential for `node.scope` (minted, renewed, re-minted on a scope, key or
/// registry change like the namespaces'), or, with an empty scope, no secret of ours.
pub async fn reconcile_node_credential(
    client: &Client,
    namespace: &str,
    node: &crate::nscred::NodeCredential,
    registry: &str,
    creds: &Credentials,
    now: u64,
) -> Result<NodeReport, SyncError> {
    let api = Api::<Secret>::namespaced(client.clone(), namespace);
    let from = format!("{namespace}/{}", node.secret);
    let mut report = NodeReport::default();
    let existing = api.get_opt(&node.secret).await?;
    let ours = existing.as_ref().filter(|s| is_copy_of(s, &from));
    if existing.is_some() && ours.is_none() {
        tracing::warn!(secret = %node.secret, "a secret of the node credential's name exists and is not ours; left alone");
        report.foreign = true;
        return Ok(report);
    }
    if node.scope.is_empty() {
        if ours.is_some() {
            match api.delete(&node.secret, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(secret = %node.secret, "node credential removed (empty scope)");
                    report.deleted = true;
                }
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        return Ok(report);
    }
    let minter = creds.keys.minter()?;
    let lifetime = creds.lifetime.as_secs().max(1);
    let reason = match ours {
        Some(s) => match stale(s, &node.scope, minter.as_ref(), registry, lifetime, now) {
            Ok(due) => {
                report.next_renewal = Some(due);
                return Ok(report);
            }
            Err(reason) => reason,
        },
        None => MintReason::New,
    };
    let kid = minter.kid();
    let m = Minting {
        name: &node.secret,
        from: &from,
        registry,
        scope: &node.scope,
        kid: &kid,
        issued: now,
        expires: now.saturating_add(lifetime),
    };
    let fresh = minted_secret(namespace, &m, minter.as_ref())?;
    let landed = match ours {
        Some(s) => overwrite(&api, s, fresh).await?,
        None => match api.create(&PostParams::default(), &fresh).await {
            Ok(_) => true,
            Err(kube::Error::Api(e)) if e.code == 409 => false,
            Err(e) => return Err(e.into()),
        },
    };
    if landed {
        tracing::info!(secret = %node.secret, scope = %node.scope, kid = %kid, expires = m.expires, reason = reason.as_str(), "node credential minted");
        report.minted = Some(reason);
        report.next_renewal = Some(renew_at(m.issued, m.expires));
    }
    Ok(report)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Reports invalid annotations: an Event on the namespace and a count, once per namespace and
/// annotation value (not on every pass); the gauge always holds the current number.
struct ScopeReporter {
    recorder: kube::runtime::events::Recorder,
    reported: BTreeMap<String, String>,
}

impl ScopeReporter {
    fn new(client: &Client) -> ScopeReporter {
        ScopeReporter {
            recorder: kube::runtime::events::Recorder::new(
                client.clone(),
                kube::runtime::events::Reporter {
                    controller: MANAGED_BY.into(),
                    instance: None,
                },
            ),
            reported: BTreeMap::new(),
        }
    }

    async fn report(&mut self, invalid: &[Invalid], metrics: &Metrics) {
        metrics.namespace_scopes_invalid.set(invalid.len() as i64);
        self.reported
            .retain(|ns, _| invalid.iter().any(|i| &i.namespace == ns));
        for i in invalid {
            if self.reported.get(&i.namespace) == Some(&i.annotation) {
                continue;
            }
            metrics.namespace_scope_errors.inc();
            tracing::warn!(namespace = %i.namespace, error = %i.error, "invalid repository scope; the namespace gets no pull credential");
            // The Event lives in the namespace it is about, where its users look.
            let reference = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Namespace".into()),
                name: Some(i.namespace.clone()),
                namespace: Some(i.namespace.clone()),
                ..Default::default()
            };
            let event = kube::runtime::events::Event {
                type_: kube::runtime::events::EventType::Warning,
                reason: "InvalidRepositoryScope".into(),
                note: Some(
                    format!(
                        "{}; no pull credential is issued for this namespace",
                        i.error
                    )
                    .chars()
                    .take(1000)
                    .collect(),
                ),
                action: "MintCredential".into(),
                secondary: None,
            };
            match self.recorder.publish(&event, &reference).await {
                Ok(()) => {
                    self.reported
                        .insert(i.namespace.clone(), i.annotation.clone());
                }
                Err(e) => {
                    tracing::warn!(namespace = %i.namespace, error = %e, "cannot publish the invalid scope Event; retrying next pass")
                }
            }
        }
    }
}

/// Runs reconciliations for as long as the process lives: on namespace changes, on changes
/// to the source secret or to owned copies, and every `resync`. The watches follow the
/// configured pull-secret name when the config changes it. With `credentials` it mints
/// namespace credentials instead of copying, also when a renewal is due and when the key file
/// changes (checked every `key_check`).
pub async fn run(
    client: Client,
    source_namespace: String,
    config: Arc<ConfigSource>,
    metrics: Arc<Metrics>,
    resync: Duration,
    credentials: Option<(Arc<Credentials>, Duration)>,
) {
    let configured = || config.get().and_then(|c| c.pull_secret.clone());
    let mut watched = configured();
    let mut events = triggers(&client, &source_namespace, watched.as_deref());
    let mut tick = tokio::time::interval(resync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let key_check = credentials.as_ref().map_or(resync, |(_, every)| *every);
    let mut key_tick = tokio::time::interval(key_check);
    key_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut scopes = ScopeReporter::new(&client);
    if let Some((creds, _)) = &credentials {
        creds.scopes.set_client(client.clone());
    }
    // When the earliest credential renewal is due (or a failed pass is retried).
    let mut due: Option<tokio::time::Instant> = None;
    loop {
        let renewal = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tick.tick() => {}
            _ = renewal => {}
            _ = key_tick.tick() => {
                let Some((creds, _)) = &credentials else { continue };
                match creds.keys.reload() {
                    Ok(true) => tracing::info!("namespace credential keys loaded"),
                    Ok(false) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "namespace credential key file not reloaded; keeping the previous keys");
                        continue;
                    }
                }
            }
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
        let Some((creds, _)) = &credentials else {
            if let Err(e) = reconcile(&client, &source_namespace, &name).await {
                metrics.secret_sync_errors.inc();
                tracing::warn!(error = %e, "pull secret reconciliation failed; retrying");
            }
            continue;
        };
        let Some(registry) = config.get().map(|c| c.registry.as_str().to_owned()) else {
            continue;
        };
        let now = now_secs();
        // The node credential first: its renewal time joins the namespaces' below.
        let mut node_due = None;
        if let Some(node) = &creds.node {
            match reconcile_node_credential(&client, &source_namespace, node, &registry, creds, now)
                .await
            {
                Ok(r) => {
                    if let Some(reason) = r.minted {
                        metrics.credential_minted(reason.as_str());
                    }
                    node_due = r.next_renewal;
                }
                Err(e) => {
                    metrics.secret_sync_errors.inc();
                    tracing::warn!(error = %e, "node credential reconciliation failed; retrying");
                    node_due = Some(now + 10);
                }
            }
        }
        match reconcile_credentials(&client, &source_namespace, &name, &registry, creds, now).await
        {
            Ok(report) => {
                for (_, reason) in &report.minted {
                    metrics.credential_minted(reason.as_str());
                }
                metrics.namespace_credentials.set(report.current as i64);
                creds.scopes.replace(
                    &report.scopes,
                    report
                        .invalid
                        .iter()
                        .map(|i| (i.namespace.clone(), i.error.clone())),
                );
                scopes.report(&report.invalid, &metrics).await;
                let next = match (report.next_renewal, node_due) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                due = next.map(|at| {
                    tokio::time::Instant::now() + Duration::from_secs(at.saturating_sub(now))
                });
            }
            Err(e) => {
                metrics.secret_sync_errors.inc();
                tracing::warn!(error = %e, "namespace credential reconciliation failed; retrying");
                due = Some(tokio::time::Instant::now() + Duration::from_secs(10).min(resync));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nscred::{Mint, parse_key_file};

    /// A minter of the shared format for a key file holding `keys`, in order.
    fn minter(keys: &[&str]) -> std::sync::Arc<dyn Mint> {
        parse_key_file(std::path::Path::new("keys"), &keys.join("\n")).unwrap()
    }

    fn ours(scope: &str, kid: &str, issued: u64, expires: u64) -> Secret {
        let mut s = Secret {
            type_: Some(DOCKER_CONFIG_JSON.to_owned()),
            ..Secret::default()
        };
        s.metadata.annotations = Some(BTreeMap::from([
            (CREDENTIAL_SCOPE.to_owned(), scope.to_owned()),
            (CREDENTIAL_KID.to_owned(), kid.to_owned()),
            (CREDENTIAL_REGISTRY.to_owned(), "r.local".to_owned()),
            (CREDENTIAL_ISSUED.to_owned(), issued.to_string()),
            (CREDENTIAL_EXPIRES.to_owned(), expires.to_string()),
        ]));
        s
    }

    #[test]
    fn what_makes_a_credential_stale() {
        let scope = Scope::parse("team-a/**").unwrap();
        let (key_a, key_b) = (
            outpost_core::keys::generate().unwrap(),
            outpost_core::keys::generate().unwrap(),
        );
        let a = minter(&[&key_a]);
        let b_then_a = minter(&[&key_b, &key_a]);
        let (kid_a, kid_b) = (a.kid(), b_then_a.kid());
        let (a, b_then_a) = (a.as_ref(), b_then_a.as_ref());
        let h = 3600;
        let fresh = ours("team-a/**", &kid_a, 1000, 1000 + 8 * h);
        // Current: looked at again at half-life.
        assert_eq!(
            stale(&fresh, &scope, a, "r.local", 8 * h, 1001),
            Ok(1000 + 4 * h)
        );
        assert_eq!(
            stale(&fresh, &scope, a, "r.local", 8 * h, 1000 + 4 * h),
            Err(MintReason::Renewal)
        );
        let other = Scope::parse("team-a/**, base/*").unwrap();
        assert_eq!(
            stale(&fresh, &other, a, "r.local", 8 * h, 1001),
            Err(MintReason::Scope)
        );
        assert_eq!(
            stale(&fresh, &scope, a, "other.local", 8 * h, 1001),
            Err(MintReason::Registry)
        );
        assert_eq!(
            stale(&fresh, &scope, a, "r.local", h, 1001),
            Err(MintReason::Lifetime)
        );
        assert_eq!(
            stale(&Secret::default(), &scope, a, "r.local", 8 * h, 1001),
            Err(MintReason::Format)
        );
        // The new key signs here: a credential of the old one (still known) is re-minted.
        assert_eq!(
            stale(&fresh, &scope, b_then_a, "r.local", 8 * h, 1001),
            Err(MintReason::Key)
        );
        // Signed with a key this replica does not have yet (another replica read the new file
        // first): left alone while the file may still be on its way, re-minted after.
        let by_b = ours("team-a/**", &kid_b, 1000, 1000 + 8 * h);
        assert_eq!(
            stale(&by_b, &scope, a, "r.local", 8 * h, 1010),
            Ok(1000 + KEY_PROPAGATION_SECS)
        );
        assert_eq!(
            stale(
                &by_b,
                &scope,
                a,
                "r.local",
                8 * h,
                1000 + KEY_PROPAGATION_SECS
            ),
            Err(MintReason::Key)
        );
        // A short lifetime: never a look-again time in the past.
        let short = ours("team-a/**", &kid_b, 1000, 1020);
        assert_eq!(stale(&short, &scope, a, "r.local", 20, 1005), Ok(1010));
        assert_eq!(
            stale(&short, &scope, a, "r.local", 20, 1010),
            Err(MintReason::Renewal)
        );
    }
}
