//! The webhook's pull-secret copy controller (`outpost_webhook::secrets`) against the real
//! kube-apiserver of this binary's shared control plane: single passes (copies follow the
//! source and the namespace labels, a foreign secret of that name is left alone), a renamed
//! pull secret read only by its name (a ServiceAccount whose RBAC grants Secrets by that name
//! alone), the create race lost to another replica, and the running controller following
//! watch events. Namespace credentials (issue 17): minted per namespace with the chart's
//! rendered RBAC, verified with the registry's own check, re-minted on annotation and key
//! changes, renewed before expiry, reported when the annotation is invalid; and pulled with by
//! skopeo from a real registry that refuses them the other team's images.
//!
//! The copier lists namespaces and copies cluster-wide, so every test names its namespaces
//! and its pull secret with a fresh prefix and looks only at its own namespaces in the
//! reports: the tests share the control plane and may run at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use outpost_e2e::k8s::{ControlPlane, Rest, random_hex};
use outpost_e2e::metrics::sample;
use outpost_e2e::{Layout, Registry, TestPki, bin, require, run_ok, run_timeout};
use outpost_webhook::config::ConfigSource;
use outpost_webhook::metrics::Metrics;
use outpost_webhook::nscred::{
    Credentials, KeyFile, NodeCredential, REPOSITORIES_ANNOTATION, Scope, parse_key_file,
};
use outpost_webhook::secrets::{
    self, COPIED_FROM, INJECT_ENABLED, INJECT_LABEL, MANAGED_BY, MANAGED_BY_LABEL, MintReason,
    reconcile, reconcile_node_credential,
};
use serde_json::{Value, json};

fn cp() -> &'static ControlPlane {
    ControlPlane::shared()
}

/// Starts the shared control plane first (it blocks), then runs `f` on a runtime of its own.
fn run<F: Future>(f: F) -> F::Output {
    cp();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// One test's names: a fresh prefix for its namespaces and its pull secret.
struct Names(String);

impl Names {
    fn new() -> Names {
        Names(format!("ws{}-", random_hex(4)))
    }
    fn of(&self, n: &str) -> String {
        format!("{}{n}", self.0)
    }
    /// The report's namespaces of this test, prefix stripped (other tests' left out).
    fn mine(&self, v: &[String]) -> Vec<String> {
        v.iter()
            .filter_map(|n| n.strip_prefix(&self.0))
            .map(str::to_owned)
            .collect()
    }
}

/// What a `hooked` client saw, and the writes it makes land first.
#[derive(Default)]
struct Hook {
    /// Every request, as "METHOD path?query".
    log: Mutex<Vec<String>>,
    /// Every answered request and its status code.
    statuses: Mutex<Vec<(String, u16)>>,
    /// Per namespace: another writer's Secret, created through the API server (as the admin)
    /// just before our create in that namespace reaches it, so our create loses the race.
    racers: Mutex<BTreeMap<String, Secret>>,
}

impl Hook {
    fn log(&self) -> Vec<String> {
        self.log.lock().expect("log").clone()
    }
    fn clear(&self) {
        self.log.lock().expect("log").clear();
    }
}

/// A `kube::Client` for `token` (the admin's if None) to the real API server, every request
/// passing through `hook` first.
async fn hooked(hook: &Arc<Hook>, token: Option<&str>) -> kube::Client {
    let inner = cp().client(token).await;
    let admin = cp().client(None).await;
    let hook = Arc::clone(hook);
    let svc = tower::service_fn(move |req: http::Request<kube::client::Body>| {
        let (inner, admin, hook) = (inner.clone(), admin.clone(), Arc::clone(&hook));
        async move {
            let line = format!("{} {}", req.method(), req.uri());
            hook.log.lock().expect("log").push(line.clone());
            let create_in = (req.method() == http::Method::POST)
                .then(|| {
                    req.uri()
                        .path()
                        .strip_prefix("/api/v1/namespaces/")?
                        .strip_suffix("/secrets")
                        .map(str::to_owned)
                })
                .flatten();
            if let Some(ns) = create_in {
                let racer = hook.racers.lock().expect("racers").remove(&ns);
                if let Some(racer) = racer {
                    Api::<Secret>::namespaced(admin, &ns)
                        .create(&PostParams::default(), &racer)
                        .await?;
                }
            }
            let resp = inner.send(req).await?;
            hook.statuses
                .lock()
                .expect("statuses")
                .push((line, resp.status().as_u16()));
            Ok::<_, kube::Error>(resp)
        }
    });
    kube::Client::new(svc, "default")
}

/// A `.dockerconfigjson` (the API server checks it is JSON) whose one credential is `token`,
/// base64 as Secret data.
fn docker_config(token: &str) -> String {
    let text = json!({"auths": {"r.local": {"auth": token}}}).to_string();
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A dockerconfigjson Secret with credential `token`.
fn secret(name: &str, token: &str, labels: Value) -> Secret {
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "labels": labels},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": docker_config(token)},
    }))
    .expect("secret")
}

/// A copy as the copier makes it (another replica's), from `from` ("ns/name").
fn ours(name: &str, token: &str, from: &str) -> Secret {
    let mut s = secret(name, token, json!({MANAGED_BY_LABEL: MANAGED_BY}));
    s.metadata.annotations = Some(BTreeMap::from([(COPIED_FROM.to_owned(), from.to_owned())]));
    s
}

async fn create_secret(c: &kube::Client, ns: &str, s: &Secret) {
    Api::<Secret>::namespaced(c.clone(), ns)
        .create(&PostParams::default(), s)
        .await
        .unwrap_or_else(|e| panic!("create secret in {ns}: {e}"));
}

async fn delete_secret(c: &kube::Client, ns: &str, name: &str) {
    Api::<Secret>::namespaced(c.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete secret {ns}/{name}: {e}"));
}

async fn copy_in(c: &kube::Client, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(c.clone(), ns)
        .get_opt(name)
        .await
        .unwrap_or_else(|e| panic!("get secret {ns}/{name}: {e}"))
}

/// The credential in the `.dockerconfigjson` of `ns/name`, if that Secret exists.
async fn data_in(c: &kube::Client, ns: &str, name: &str) -> Option<String> {
    let s = copy_in(c, ns, name).await?;
    let raw = s.data?.get(".dockerconfigjson")?.0.clone();
    let config: Value = serde_json::from_slice(&raw).expect("dockerconfigjson");
    Some(config["auths"]["r.local"]["auth"].as_str()?.to_owned())
}

async fn resource_version(c: &kube::Client, ns: &str, name: &str) -> Option<String> {
    copy_in(c, ns, name).await?.metadata.resource_version
}

/// Creates namespace `name`, opted in or not.
async fn namespace(c: &kube::Client, name: &str, inject: bool) {
    let labels = if inject {
        json!({INJECT_LABEL: INJECT_ENABLED})
    } else {
        json!({})
    };
    let ns: Namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))
            .expect("namespace");
    Api::<Namespace>::all(c.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
}

/// Opts namespace `name` in or out.
async fn set_inject(c: &kube::Client, name: &str, inject: bool) {
    let value = if inject {
        json!(INJECT_ENABLED)
    } else {
        Value::Null
    };
    Api::<Namespace>::all(c.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {INJECT_LABEL: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("label namespace {name}: {e}"));
}

/// Sets the source's credential to `token`, as a token rotation does.
async fn rotate(c: &kube::Client, ns: &str, name: &str, token: &str) {
    Api::<Secret>::namespaced(c.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {".dockerconfigjson": docker_config(token)}})),
        )
        .await
        .unwrap_or_else(|e| panic!("update source {ns}/{name}: {e}"));
}

/// Writes in the log that touch this test's namespaces (other tests' namespaces are opted in
/// too, and new ones legitimately get copies).
fn my_writes(hook: &Hook, names: &Names) -> Vec<String> {
    hook.log()
        .into_iter()
        .filter(|l| !l.starts_with("GET ") && l.contains(&format!("/namespaces/{}", names.0)))
        .collect()
}

/// Polls `cond` every 100 ms for 30 s at most; panics naming `what` when it never holds.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn copies_follow_the_source_and_the_namespace_labels() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("pull"));
    let from = format!("{sys}/{name}");
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, true).await;
        for (x, inject) in [
            ("shop", true),
            ("lab", true),
            ("other", false),
            ("theirs", true),
        ] {
            namespace(&admin, &n.of(x), inject).await;
        }
        create_secret(&admin, &sys, &secret(&name, "v1", json!({}))).await;
        // A secret of the same name that someone else made: never touched.
        create_secret(
            &admin,
            &n.of("theirs"),
            &secret(&name, "mine", json!({"app": "mine"})),
        )
        .await;
        let hook = Arc::new(Hook::default());
        let c = hooked(&hook, None).await;

        // Create: one copy per opted-in namespace (not the source's own, not "other").
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert_eq!(n.mine(&r.created), ["lab", "shop"], "{r:?}");
        assert_eq!(n.mine(&r.foreign), ["theirs"], "{r:?}");
        assert!(
            n.mine(&r.updated).is_empty() && n.mine(&r.deleted).is_empty(),
            "{r:?}"
        );
        for x in ["lab", "shop"] {
            let copy = copy_in(&admin, &n.of(x), &name).await.expect("a copy");
            assert_eq!(
                data_in(&admin, &n.of(x), &name).await.as_deref(),
                Some("v1")
            );
            assert_eq!(
                copy.type_.as_deref(),
                Some("kubernetes.io/dockerconfigjson")
            );
            let labels = copy.metadata.labels.expect("labels");
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY);
            let annotations = copy.metadata.annotations.expect("annotations");
            assert_eq!(annotations[COPIED_FROM], from);
        }
        assert!(copy_in(&admin, &n.of("other"), &name).await.is_none());
        assert!(copy_in(&admin, &sys, &name).await.is_some());
        assert_eq!(
            data_in(&admin, &n.of("theirs"), &name).await.as_deref(),
            Some("mine")
        );

        // Nothing changed: nothing written (the copies keep their resourceVersions).
        let before = [
            resource_version(&admin, &n.of("lab"), &name).await,
            resource_version(&admin, &n.of("shop"), &name).await,
        ];
        hook.clear();
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert!(
            n.mine(&r.created).is_empty()
                && n.mine(&r.updated).is_empty()
                && n.mine(&r.deleted).is_empty(),
            "{r:?}"
        );
        assert_eq!(my_writes(&hook, &n), Vec::<String>::new());
        let after = [
            resource_version(&admin, &n.of("lab"), &name).await,
            resource_version(&admin, &n.of("shop"), &name).await,
        ];
        assert_eq!(before, after);

        // Update on source change (a rotated token).
        rotate(&admin, &sys, &name, "v2").await;
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert_eq!(n.mine(&r.updated), ["lab", "shop"], "{r:?}");
        for x in ["lab", "shop"] {
            assert_eq!(
                data_in(&admin, &n.of(x), &name).await.as_deref(),
                Some("v2")
            );
        }
        assert_eq!(
            data_in(&admin, &n.of("theirs"), &name).await.as_deref(),
            Some("mine")
        );

        // Removal when a namespace opts out; other copies and foreign secrets stay.
        set_inject(&admin, &n.of("lab"), false).await;
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert_eq!(n.mine(&r.deleted), ["lab"], "{r:?}");
        assert!(copy_in(&admin, &n.of("lab"), &name).await.is_none());
        assert!(copy_in(&admin, &n.of("shop"), &name).await.is_some());
        assert!(copy_in(&admin, &n.of("theirs"), &name).await.is_some());

        // A deleted copy is recreated.
        delete_secret(&admin, &n.of("shop"), &name).await;
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert_eq!(n.mine(&r.created), ["shop"], "{r:?}");

        // Source gone: copies are kept (a re-created source will update them), nothing created.
        delete_secret(&admin, &sys, &name).await;
        namespace(&admin, &n.of("new"), true).await;
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert!(r.source_missing, "{r:?}");
        assert!(
            n.mine(&r.deleted).is_empty() && n.mine(&r.created).is_empty(),
            "{r:?}"
        );
        assert!(copy_in(&admin, &n.of("shop"), &name).await.is_some());
        assert!(copy_in(&admin, &n.of("new"), &name).await.is_none());
    });
}

/// Creates the ServiceAccount `account` in `sys`, the ClusterRole `role` with `rules` and the
/// binding between them (as the chart's RBAC does); the account's token.
fn bind_cluster_role(
    admin_rest: &Rest,
    sys: &str,
    account: &str,
    role: &str,
    rules: &Value,
) -> String {
    for (path, body) in [
        (
            format!("/api/v1/namespaces/{sys}/serviceaccounts"),
            json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}}),
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterroles".to_owned(),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": role}, "rules": rules}),
        ),
        (
            "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings".to_owned(),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": role},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": role},
                   "subjects": [{"kind": "ServiceAccount", "name": account,
                                 "namespace": sys}]}),
        ),
    ] {
        let (status, body) = admin_rest.post(&path, &body);
        assert_eq!(status, 201, "POST {path}: {body}");
    }
    cp().service_account_token(sys, account)
}

/// Waits until the API server's authorizer lets `sa` (the webhook's token) read the pull
/// secret `name` in `sys`: a new binding takes a moment to apply.
async fn rbac_in_force(sa: &kube::Client, sys: &str, name: &str) {
    eventually("RBAC for the webhook's token", || async move {
        Api::<Secret>::namespaced(sa.clone(), sys)
            .get_opt(name)
            .await
            .is_ok()
    })
    .await;
}

/// Deletes the cluster-wide objects [`bind_cluster_role`] made.
fn unbind_cluster_role(admin_rest: &Rest, role: &str) {
    let _ = admin_rest.delete(&format!(
        "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings/{role}"
    ));
    let _ = admin_rest.delete(&format!(
        "/apis/rbac.authorization.k8s.io/v1/clusterroles/{role}"
    ));
}

/// A renamed pull secret gets its own copies; copies under the old name are no longer read
/// (every read names the pull secret, so RBAC can grant that name only) and stay. The second
/// pass runs with a ServiceAccount token whose RBAC grants Secrets by the new name alone, as
/// the chart's does: the real authorizer accepts every request it makes.
#[test]
fn renamed_pull_secret_gets_new_copies_and_reads_only_its_name() {
    let n = Names::new();
    let (sys, old, new) = (n.of("system"), n.of("pull"), n.of("pull-2"));
    // RBAC by name: namespaces read, Secrets created unnamed (a create cannot be named),
    // everything else on Secrets by the pull secret's name only.
    let role = n.of("copier");
    let admin_rest = cp().admin();
    let rules = json!([
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create"]},
        {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [new],
         "verbs": ["get", "list", "watch", "update", "delete"]},
    ]);
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
        namespace(&admin, &n.of("shop"), true).await;
        create_secret(&admin, &sys, &secret(&old, "v1", json!({}))).await;
        create_secret(&admin, &sys, &secret(&new, "v2", json!({}))).await;
        reconcile(&admin, &sys, &old).await.expect("reconcile");
        assert!(copy_in(&admin, &n.of("shop"), &old).await.is_some());
    });
    // The blocking REST client outside the runtime.
    let token = bind_cluster_role(&admin_rest, &sys, "copier", &role, &rules);
    run(async {
        let admin = cp().client(None).await;
        let sa = cp().client(Some(&token)).await;
        // The binding reaches the authorizer's cache.
        let (sa_r, sys_r, new_r) = (&sa, sys.as_str(), new.as_str());
        eventually("RBAC for the copier's token", || async move {
            Api::<Secret>::namespaced(sa_r.clone(), sys_r)
                .get_opt(new_r)
                .await
                .is_ok_and(|s| s.is_some())
        })
        .await;
        // The grant is by name: the old name is forbidden to this token.
        match Api::<Secret>::namespaced(sa.clone(), &n.of("shop"))
            .get_opt(&old)
            .await
        {
            Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
            other => panic!("the copier's token read a Secret by another name: {other:?}"),
        }

        let hook = Arc::new(Hook::default());
        let c = hooked(&hook, Some(&token)).await;
        let r = reconcile(&c, &sys, &new).await.expect("reconcile by name");
        assert_eq!(n.mine(&r.created), ["shop"], "{r:?}");
        assert!(n.mine(&r.deleted).is_empty(), "{r:?}");
        assert_eq!(
            data_in(&admin, &n.of("shop"), &new).await.as_deref(),
            Some("v2")
        );
        // The copy under the old name stays.
        assert_eq!(
            data_in(&admin, &n.of("shop"), &old).await.as_deref(),
            Some("v1")
        );
        // Every Secret read named it: a get of that name, or a list by that name (a create
        // cannot name it in the path; RBAC grants create unnamed).
        for l in hook
            .log()
            .iter()
            .filter(|l| l.contains("/secrets") && !l.starts_with("POST "))
        {
            assert!(
                l.contains(&format!("/secrets/{new}"))
                    || l.contains(&format!("fieldSelector=metadata.name%3D{new}")),
                "a Secret request not by name: {l}"
            );
        }
    });
    unbind_cluster_role(&admin_rest, &role);
}

/// Two replicas race to create a namespace's copy: the one that loses reads what the winner
/// made, sees its own kind of copy and leaves it (or brings it up to date) instead of calling
/// it foreign; a genuinely foreign secret that appears in the gap is still left alone. The
/// winner's create is made through the real API server by a hook in our client's request
/// path, between our read and our create.
#[test]
fn a_lost_create_race_rereads_and_recognises_our_copy() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("pull"));
    let from = format!("{sys}/{name}");
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
        for x in ["same", "stale", "theirs"] {
            namespace(&admin, &n.of(x), true).await;
        }
        create_secret(&admin, &sys, &secret(&name, "v1", json!({}))).await;
        let hook = Arc::new(Hook::default());
        {
            let mut racers = hook.racers.lock().expect("racers");
            // The other replica's copy, current.
            racers.insert(n.of("same"), ours(&name, "v1", &from));
            // The other replica's copy, made from the source before a rotation.
            racers.insert(n.of("stale"), ours(&name, "v0", &from));
            // Someone else's secret of that name.
            racers.insert(
                n.of("theirs"),
                secret(&name, "mine", json!({"app": "mine"})),
            );
        }
        let c = hooked(&hook, None).await;
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert!(
            hook.racers.lock().expect("racers").is_empty(),
            "every race was run"
        );
        assert!(n.mine(&r.created).is_empty(), "{r:?}");
        assert_eq!(n.mine(&r.updated), ["stale"], "{r:?}");
        assert_eq!(n.mine(&r.foreign), ["theirs"], "{r:?}");
        for x in ["same", "stale"] {
            assert_eq!(
                data_in(&admin, &n.of(x), &name).await.as_deref(),
                Some("v1"),
                "{x}"
            );
        }
        assert_eq!(
            data_in(&admin, &n.of("theirs"), &name).await.as_deref(),
            Some("mine")
        );
        // The race is over: the next pass writes nothing.
        let before = [
            resource_version(&admin, &n.of("same"), &name).await,
            resource_version(&admin, &n.of("stale"), &name).await,
        ];
        hook.clear();
        let r = reconcile(&c, &sys, &name).await.expect("reconcile");
        assert!(
            n.mine(&r.created).is_empty() && n.mine(&r.updated).is_empty(),
            "{r:?}"
        );
        assert_eq!(my_writes(&hook, &n), Vec::<String>::new());
        let after = [
            resource_version(&admin, &n.of("same"), &name).await,
            resource_version(&admin, &n.of("stale"), &name).await,
        ];
        assert_eq!(before, after);
    });
}

/// The running controller, driven by the API server's watch events alone (the periodic
/// resync is an hour).
#[test]
fn the_running_controller_follows_watch_events() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("pull"));
    let (shop, lab) = (n.of("shop"), n.of("lab"));
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
        namespace(&admin, &shop, true).await;
        create_secret(&admin, &sys, &secret(&name, "v1", json!({}))).await;
        let config = ConfigSource::fixed(
            format!("registry = \"r.local\"\npull_secret = \"{name}\"")
                .parse()
                .expect("config"),
        );
        let hook = Arc::new(Hook::default());
        let task = tokio::spawn(secrets::run(
            hooked(&hook, None).await,
            sys.clone(),
            config,
            Arc::new(Metrics::new()),
            Duration::from_secs(3600),
            None,
        ));
        let (a, name, shop, lab, h) = (&admin, name.as_str(), shop.as_str(), lab.as_str(), &hook);
        eventually("first copy", || async move {
            copy_in(a, shop, name).await.is_some()
        })
        .await;
        // The watches are open once each kind has been watched.
        eventually("watches open", || async move {
            h.log().iter().filter(|l| l.contains("watch=true")).count() >= 3
        })
        .await;
        // A namespace opts in.
        namespace(&admin, lab, true).await;
        eventually("copy in lab", || async move {
            copy_in(a, lab, name).await.is_some()
        })
        .await;
        // The source changes.
        rotate(&admin, &sys, name, "v2").await;
        eventually("copies updated", || async move {
            data_in(a, shop, name).await.as_deref() == Some("v2")
                && data_in(a, lab, name).await.as_deref() == Some("v2")
        })
        .await;
        // A namespace opts out.
        set_inject(&admin, lab, false).await;
        eventually("copy removed", || async move {
            copy_in(a, lab, name).await.is_none()
        })
        .await;
        // Someone deletes a copy: it comes back.
        delete_secret(&admin, shop, name).await;
        eventually("copy restored", || async move {
            copy_in(a, shop, name).await.is_some()
        })
        .await;
        task.abort();
    });
}

/// The chart's ClusterRole for the webhook, rendered by the real Helm library with client
/// tokens on (namespace credentials) and `pull_secret` as the pull secret's name.
fn chart_webhook_rules(pull_secret: &str) -> Value {
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let values = json!({"tokens": {"existingSecret": "outpost-tokens"},
                        "pullSecret": {"name": pull_secret}});
    let out = run_timeout(
        std::process::Command::new("python3")
            .arg("-B")
            .arg(repo.join("charts/tests/helm_render.py"))
            .args([values.to_string().as_str(), "outpost"]),
        Duration::from_secs(120),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered: Value = serde_json::from_slice(&out.stdout).expect("rendered chart");
    rendered["objects"]
        .as_array()
        .expect("objects")
        .iter()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "outpost-webhook")
        .expect("the webhook's ClusterRole")["rules"]
        .clone()
}

/// The credential for `registry` in the dockerconfigjson of `ns/name`: (username, password).
async fn credential_in(
    c: &kube::Client,
    ns: &str,
    name: &str,
    registry: &str,
) -> Option<(String, String)> {
    let s = copy_in(c, ns, name).await?;
    assert_eq!(s.type_.as_deref(), Some("kubernetes.io/dockerconfigjson"));
    let raw = s.data?.get(".dockerconfigjson")?.0.clone();
    let config: Value = serde_json::from_slice(&raw).expect("dockerconfigjson");
    let entry = &config["auths"][registry];
    let (user, pass) = (entry["username"].as_str()?, entry["password"].as_str()?);
    // containerd and kubelet read `auth`: the same pair.
    let auth = base64::engine::general_purpose::STANDARD
        .decode(entry["auth"].as_str()?)
        .expect("auth is base64");
    assert_eq!(auth, format!("{user}:{pass}").into_bytes());
    Some((user.to_owned(), pass.to_owned()))
}

fn keys_of(text: &str) -> outpost_core::SigningKeys {
    outpost_core::SigningKeys::parse(std::path::Path::new("keys"), text).expect("key file")
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Verifies `ns/name`'s credential with `keys` (the registry's own check): it names `ns`,
/// grants exactly `patterns`, and was signed with `kid`. Returns it.
async fn verified(
    c: &kube::Client,
    keys: &outpost_core::SigningKeys,
    ns: &str,
    name: &str,
    patterns: &[&str],
    kid: &str,
) -> outpost_core::NamespaceCredential {
    let (user, pass) = credential_in(c, ns, name, "r.local")
        .await
        .unwrap_or_else(|| panic!("no credential in {ns}"));
    assert_eq!(user, ns);
    let cred = outpost_core::nscred::verify(keys, &pass, unix_now())
        .unwrap_or_else(|e| panic!("the credential of {ns} does not verify: {e}"));
    assert_eq!(cred.namespace, ns);
    let got: Vec<&str> = cred.repositories.iter().map(|p| p.as_str()).collect();
    assert_eq!(got, patterns, "{ns}");
    assert_eq!(cred.kid, kid, "{ns}");
    cred
}

fn annotation_of(s: &Secret, key: &str) -> Option<String> {
    s.metadata.annotations.as_ref()?.get(key).cloned()
}

/// Sets (or removes, with None) a namespace's repositories annotation.
async fn set_repositories(c: &kube::Client, name: &str, value: Option<&str>) {
    Api::<Namespace>::all(c.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {REPOSITORIES_ANNOTATION: value}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("annotate namespace {name}: {e}"));
}

/// The nodes' credential (`trustDistribution.nodeScope`): a pass mints the Secret in the
/// webhook's namespace for the node scope (username that namespace, verified with the
/// registry's check); a pass with nothing to do writes nothing; a changed scope re-mints; an
/// empty scope deletes it; a secret of that name that is not ours is left alone.
#[test]
fn the_node_credential_follows_the_node_scope() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("node-pull"));
    let dir = tempfile::tempdir().expect("temp dir");
    let key_path = dir.path().join("signing-keys");
    let key = outpost_core::keys::generate().expect("key");
    std::fs::write(&key_path, format!("{key}\n")).expect("key file");
    let keys = keys_of(&key);
    let kid = keys.kids()[0].clone();
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
        let creds = Credentials::new(
            KeyFile::new(key_path.clone(), parse_key_file),
            Duration::from_secs(3600),
            Scope::parse("**").expect("scope"),
            None,
        );
        let node = |scope: &str| NodeCredential {
            secret: name.clone(),
            scope: if scope.is_empty() {
                Scope::new(Vec::new())
            } else {
                Scope::parse(scope).expect("scope")
            },
        };
        let pass = |scope: &'static str, now: u64| {
            let (admin, sys, creds, node) = (admin.clone(), sys.clone(), &creds, node(scope));
            async move {
                reconcile_node_credential(&admin, &sys, &node, "r.local", creds, now)
                    .await
                    .expect("node credential pass")
            }
        };
        let now = unix_now();
        let r = pass("library/**, base/*", now).await;
        assert_eq!(r.minted, Some(MintReason::New), "{r:?}");
        assert_eq!(r.next_renewal, Some(now + 1800), "{r:?}");
        verified(&admin, &keys, &sys, &name, &["base/*", "library/**"], &kid).await;
        let version = |s: Option<Secret>| s.expect("the node secret").metadata.resource_version;
        let before = version(copy_in(&admin, &sys, &name).await);
        let r = pass("library/**, base/*", now + 1).await;
        assert_eq!(
            (r.minted, r.next_renewal),
            (None, Some(now + 1800)),
            "{r:?}"
        );
        assert_eq!(
            version(copy_in(&admin, &sys, &name).await),
            before,
            "rewritten"
        );
        let r = pass("base/*", now + 2).await;
        assert_eq!(r.minted, Some(MintReason::Scope), "{r:?}");
        verified(&admin, &keys, &sys, &name, &["base/*"], &kid).await;
        let r = pass("", now + 3).await;
        assert!(r.deleted && r.minted.is_none(), "{r:?}");
        assert!(copy_in(&admin, &sys, &name).await.is_none());
        // Someone else's secret of that name: left alone, whatever the scope.
        Api::<Secret>::namespaced(admin.clone(), &sys)
            .create(&PostParams::default(), &secret(&name, "theirs", json!({})))
            .await
            .expect("create a foreign secret");
        for scope in ["base/*", ""] {
            let r = pass(scope, now + 4).await;
            assert!(r.foreign && r.minted.is_none() && !r.deleted, "{r:?}");
        }
        let theirs = copy_in(&admin, &sys, &name).await.expect("theirs");
        assert!(annotation_of(&theirs, COPIED_FROM).is_none(), "{theirs:?}");
    });
}

/// Namespace credentials, minted by the running controller with the chart's ServiceAccount
/// RBAC (rendered by Helm, bound to a token of its own): team-a, team-b and shared get each
/// their own credential, verified with the registry's check to their namespace and patterns
/// (shared: the default); an invalid annotation gives an Event on its namespace, the metrics
/// and no credential; a changed annotation re-mints; a renewal lands at half the (short)
/// lifetime, before expiry; a rotated key file (new key first) re-mints everything with the
/// new kid while old credentials still verify during the overlap; opting out removes the
/// secret. No request of the controller is refused, and every Secret read names the secret.
#[test]
fn namespace_credentials_are_minted_scoped_renewed_and_rotated() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("pull"));
    let (team_a, team_b, shared, bad) =
        (n.of("team-a"), n.of("team-b"), n.of("shared"), n.of("bad"));
    let rules = chart_webhook_rules(&name);
    let role = n.of("webhook");
    let admin_rest = cp().admin();
    let dir = tempfile::tempdir().expect("temp dir");
    let key_path = dir.path().join("signing-keys");
    let key_a = outpost_core::keys::generate().expect("key");
    let key_b = outpost_core::keys::generate().expect("key");
    let kid_a = keys_of(&key_a).kids()[0].clone();
    let kid_b = keys_of(&key_b).kids()[0].clone();
    std::fs::write(&key_path, format!("{key_a}\n")).expect("key file");
    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
    });
    let token = bind_cluster_role(&admin_rest, &sys, "webhook", &role, &rules);
    run(async {
        let admin = cp().client(None).await;
        let sa = cp().client(Some(&token)).await;
        rbac_in_force(&sa, &sys, &name).await;
        for (ns, annotation) in [
            (&team_a, Some("team-a/**")),
            (&team_b, Some("team-b/**")),
            (&shared, None),
            (&bad, Some("Team-A/**")),
        ] {
            namespace(&admin, ns, true).await;
            if let Some(a) = annotation {
                set_repositories(&admin, ns, Some(a)).await;
            }
        }
        let config = ConfigSource::fixed(
            format!("registry = \"r.local\"\npull_secret = \"{name}\"")
                .parse()
                .expect("config"),
        );
        let creds = Arc::new(Credentials::new(
            KeyFile::new(key_path.clone(), parse_key_file),
            Duration::from_secs(24),
            Scope::parse("**").expect("scope"),
            None,
        ));
        let metrics = Arc::new(Metrics::new());
        let hook = Arc::new(Hook::default());
        let task = tokio::spawn(secrets::run(
            hooked(&hook, Some(&token)).await,
            sys.clone(),
            config,
            Arc::clone(&metrics),
            Duration::from_secs(3600),
            Some((creds, Duration::from_millis(200))),
        ));
        let (a, name) = (&admin, name.as_str());
        let (team_a, team_b, shared, bad) = (
            team_a.as_str(),
            team_b.as_str(),
            shared.as_str(),
            bad.as_str(),
        );
        eventually("the three credentials", || async move {
            let mut all = true;
            for ns in [team_a, team_b, shared] {
                all &= copy_in(a, ns, name).await.is_some();
            }
            all
        })
        .await;
        let keys = keys_of(&key_a);
        let first_a = verified(a, &keys, team_a, name, &["team-a/**"], &kid_a).await;
        verified(a, &keys, team_b, name, &["team-b/**"], &kid_a).await;
        verified(a, &keys, shared, name, &["**"], &kid_a).await;
        assert!(first_a.allows("team-a/app") && !first_a.allows("team-b/app"));
        assert_eq!(first_a.expires_at - first_a.issued_at, 24);
        // Each namespace its own credential.
        let mut passwords = Vec::new();
        for ns in [team_a, team_b, shared] {
            passwords.push(credential_in(a, ns, name, "r.local").await.expect("cred").1);
        }
        let distinct: std::collections::BTreeSet<&String> = passwords.iter().collect();
        assert_eq!(distinct.len(), 3);

        // The invalid annotation: an Event on its namespace, the metrics, no secret.
        let m = &metrics;
        eventually("the invalid scope reported", || async move {
            let text = m.encode();
            sample(&text, "outpost_webhook_namespace_scopes_invalid") == Some(1.0)
                && sample(&text, "outpost_webhook_namespace_scope_errors_total") == Some(1.0)
        })
        .await;
        eventually("the InvalidRepositoryScope Event", || async move {
            Api::<k8s_openapi::api::events::v1::Event>::namespaced(a.clone(), bad)
                .list(&Default::default())
                .await
                .is_ok_and(|l| {
                    l.items.iter().any(|e| {
                        e.reason.as_deref() == Some("InvalidRepositoryScope")
                            && e.type_.as_deref() == Some("Warning")
                            && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(bad)
                            && e.note.as_deref().is_some_and(|n| n.contains("Team-A/**"))
                    })
                })
        })
        .await;
        assert!(copy_in(a, bad, name).await.is_none());

        // Fixed: the namespace gets its credential, the gauge drops; broken again: the
        // secret goes and the error is counted again.
        set_repositories(&admin, bad, Some("team-a/**")).await;
        eventually("credential after the fix", || async move {
            copy_in(a, bad, name).await.is_some()
                && sample(&m.encode(), "outpost_webhook_namespace_scopes_invalid") == Some(0.0)
        })
        .await;
        set_repositories(&admin, bad, Some("team-a/**,")).await;
        eventually("secret removed when the annotation breaks", || async move {
            copy_in(a, bad, name).await.is_none()
                && sample(&m.encode(), "outpost_webhook_namespace_scope_errors_total") == Some(2.0)
        })
        .await;

        // A changed annotation re-mints at once with the new patterns.
        set_repositories(&admin, team_a, Some("team-a/**, base/*")).await;
        eventually("team-a re-minted", || async move {
            copy_in(a, team_a, name).await.is_some_and(|s| {
                annotation_of(&s, secrets::CREDENTIAL_SCOPE).as_deref() == Some("base/*, team-a/**")
            })
        })
        .await;
        let cred = verified(a, &keys, team_a, name, &["base/*", "team-a/**"], &kid_a).await;
        assert!(cred.allows("base/alpine") && !cred.allows("base/x/y"));

        // Renewal before expiry: the credential of team-b is replaced at half its lifetime.
        let before = verified(a, &keys, team_b, name, &["team-b/**"], &kid_a).await;
        eventually("team-b renewed", || async move {
            copy_in(a, team_b, name).await.is_some_and(|s| {
                annotation_of(&s, secrets::CREDENTIAL_ISSUED)
                    .is_some_and(|i| i != before.issued_at.to_string())
            })
        })
        .await;
        let renewed_at = unix_now();
        assert!(
            renewed_at < before.expires_at,
            "renewed at {renewed_at}, the old credential expired at {}",
            before.expires_at
        );
        let after = verified(a, &keys, team_b, name, &["team-b/**"], &kid_a).await;
        assert!(after.expires_at > before.expires_at, "{after:?} {before:?}");
        assert!(
            after.issued_at >= before.issued_at + 24 / 2,
            "renewed before half-life: {after:?} {before:?}"
        );
        // Counted when the pass ends, which may be just after the write is seen.
        eventually("the renewal counted", || async move {
            sample(
                &m.encode(),
                "outpost_webhook_namespace_credentials_minted_total{reason=\"renewal\"}",
            )
            .is_some_and(|v| v >= 1.0)
        })
        .await;

        // Key rotation, step 2 (the new key first, the old one still verifying): everything is
        // re-minted with the new kid; a credential of the old key still verifies meanwhile.
        let old = credential_in(a, shared, name, "r.local")
            .await
            .expect("cred")
            .1;
        // Checked at this instant below: which keys accept it, not whether it expired since.
        let old_at = unix_now();
        std::fs::write(&key_path, format!("{key_b}\n{key_a}\n")).expect("key file");
        let both = keys_of(&format!("{key_b}\n{key_a}\n"));
        let kid_b_r = kid_b.as_str();
        eventually("re-minted with the new key", || async move {
            let mut all = true;
            for ns in [team_a, team_b, shared] {
                all &= copy_in(a, ns, name).await.is_some_and(|s| {
                    annotation_of(&s, secrets::CREDENTIAL_KID).as_deref() == Some(kid_b_r)
                });
            }
            all
        })
        .await;
        verified(a, &both, shared, name, &["**"], &kid_b).await;
        verified(a, &both, team_a, name, &["base/*", "team-a/**"], &kid_b).await;
        assert_eq!(
            outpost_core::nscred::verify(&both, &old, old_at)
                .expect("the old key still verifies")
                .kid,
            kid_a
        );
        // With the old key removed, its credentials no longer verify; the new ones do.
        let only_b = keys_of(&key_b);
        assert_eq!(
            outpost_core::nscred::verify(&only_b, &old, old_at),
            Err(outpost_core::NsCredError::UnknownKey)
        );
        verified(a, &only_b, team_b, name, &["team-b/**"], &kid_b).await;
        eventually("the key re-mints counted", || async move {
            sample(
                &m.encode(),
                "outpost_webhook_namespace_credentials_minted_total{reason=\"key\"}",
            )
            .is_some_and(|v| v >= 3.0)
        })
        .await;

        // Opting out removes the secret; the others stay.
        set_inject(&admin, team_b, false).await;
        eventually("team-b's secret removed", || async move {
            copy_in(a, team_b, name).await.is_none()
        })
        .await;
        assert!(copy_in(a, team_a, name).await.is_some());
        task.abort();

        // The chart's RBAC was enough: nothing refused. Every Secret read named the secret.
        let refused: Vec<(String, u16)> = hook
            .statuses
            .lock()
            .expect("statuses")
            .iter()
            .filter(|(_, s)| *s == 401 || *s == 403)
            .cloned()
            .collect();
        assert!(refused.is_empty(), "refused: {refused:?}");
        for l in hook
            .log()
            .iter()
            .filter(|l| l.contains("/secrets") && !l.starts_with("POST "))
        {
            assert!(
                l.contains(&format!("/secrets/{name}"))
                    || l.contains(&format!("fieldSelector=metadata.name%3D{name}")),
                "a Secret request not by name: {l}"
            );
        }
    });
    unbind_cluster_role(&admin_rest, &role);
}

/// `outpost-registry` run over HTTPS with a tokens file (no anonymous pulls) and `keys` as its
/// token signing key file; returns it, the PKI and the admin token's password.
fn registry_with_keys(
    dir: &std::path::Path,
    keys: &std::path::Path,
) -> (Registry, TestPki, String) {
    let pki = TestPki::create(dir);
    let tokens = dir.join("tokens.toml");
    let t = |args: &[&str]| {
        run_ok(
            std::process::Command::new(bin("outpost-registry"))
                .args(args)
                .arg("--tokens")
                .arg(&tokens),
        )
    };
    t(&[
        "scope-map",
        "create",
        "--name",
        "admin",
        "--repository",
        "**",
        "content/read",
        "content/write",
        "metadata/read",
        "metadata/write",
    ]);
    let out = t(&[
        "token",
        "create",
        "--name",
        "admin",
        "--scope-map",
        "admin",
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).expect("token json");
    let admin_pw = v["password1"].as_str().expect("password").to_owned();
    let args = [
        "--tls-cert".to_owned(),
        pki.cert.display().to_string(),
        "--tls-key".to_owned(),
        pki.key.display().to_string(),
        "--tokens".to_owned(),
        tokens.display().to_string(),
        "--token-signing-key-file".to_owned(),
        keys.display().to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    (Registry::start_with_args(&argv), pki, admin_pw)
}

fn skopeo(args: &[String]) -> std::process::Output {
    run_timeout(
        std::process::Command::new(require("skopeo"))
            .arg("--insecure-policy")
            .args(args),
        Duration::from_secs(120),
    )
}

/// Lifetime of the credentials minted in [`minted_secrets_pull_their_own_images_from_the_registry`].
const LIFETIME: u64 = 20;

/// The minted secrets against the real registry: the controller runs with the chart's RBAC;
/// over HTTPS with anonymous pulls off and the same signing key file as the controller, skopeo
/// with each namespace's `.dockerconfigjson` (as kubelet gets it) pulls its own team's image,
/// and the registry refuses it the other team's (403); `shared` (no annotation, the default
/// scope) pulls both; after a key rotation (new key first, in the file both read) the re-minted
/// secrets still pull; an opted-out namespace's secret is gone, and the credential it held
/// fails once it expires.
#[test]
fn minted_secrets_pull_their_own_images_from_the_registry() {
    let n = Names::new();
    let (sys, name) = (n.of("system"), n.of("pull"));
    let (team_a, team_b, shared) = (n.of("team-a"), n.of("team-b"), n.of("shared"));
    let role = n.of("webhook");
    let admin_rest = cp().admin();
    let dir = tempfile::tempdir().expect("temp dir");
    let key_path = dir.path().join("signing-keys");
    let key_a = outpost_core::keys::generate().expect("key");
    let key_b = outpost_core::keys::generate().expect("key");
    std::fs::write(&key_path, format!("{key_a}\n")).expect("key file");
    let (reg, pki, admin_pw) = registry_with_keys(dir.path(), &key_path);
    let host = reg.host();
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).expect("certs dir");
    std::fs::copy(&pki.ca_cert, certs.join("ca.crt")).expect("ca");
    let certs = certs.display().to_string();
    let layout = Layout::new(dir.path());
    layout.add_image("v1", "amd64", &[("etc/team", b"private".to_vec())]);
    for repo in ["team-a/app", "team-b/app"] {
        let out = skopeo(&[
            "copy".into(),
            "--dest-cert-dir".into(),
            certs.clone(),
            "--dest-creds".into(),
            format!("admin:{admin_pw}"),
            format!("oci:{}:v1", layout.path.display()),
            format!("docker://{host}/{repo}:v1"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_cert).expect("ca")).expect("ca pem");
    let http = reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");

    run(async {
        let admin = cp().client(None).await;
        namespace(&admin, &sys, false).await;
    });
    // The controller runs with the chart's RBAC for the webhook.
    let token = bind_cluster_role(
        &admin_rest,
        &sys,
        "webhook",
        &role,
        &chart_webhook_rules(&name),
    );
    run(async {
        let admin = cp().client(None).await;
        let sa = cp().client(Some(&token)).await;
        rbac_in_force(&sa, &sys, &name).await;
        for (ns, scope) in [
            (&team_a, Some("team-a/**")),
            (&team_b, Some("team-b/**")),
            (&shared, None),
        ] {
            namespace(&admin, ns, true).await;
            if scope.is_some() {
                set_repositories(&admin, ns, scope).await;
            }
        }
        let config = ConfigSource::fixed(
            format!("registry = \"{host}\"\npull_secret = \"{name}\"")
                .parse()
                .expect("config"),
        );
        // A short lifetime, so the opted-out namespace's credential is seen to expire below
        // (the chart's 8 h work the same way, renewed at half-life).
        let creds = Arc::new(Credentials::new(
            KeyFile::new(key_path.clone(), parse_key_file),
            Duration::from_secs(LIFETIME),
            Scope::parse("**").expect("scope"),
            None,
        ));
        let task = tokio::spawn(secrets::run(
            sa.clone(),
            sys.clone(),
            config,
            Arc::new(Metrics::new()),
            Duration::from_secs(3600),
            Some((creds, Duration::from_millis(200))),
        ));
        let (a, name_r, host_r) = (&admin, name.as_str(), host.as_str());
        let (ta, tb, sh) = (team_a.as_str(), team_b.as_str(), shared.as_str());
        // Each namespace's secret, as a file skopeo reads (kubelet hands containerd the same).
        let auth_file = |ns: String| {
            let path = dir.path().join(format!("{ns}.json"));
            async move {
                let s = copy_in(a, &ns, name_r).await?;
                let raw = s.data?.get(".dockerconfigjson")?.0.clone();
                std::fs::write(&path, raw).expect("auth file");
                Some(path)
            }
        };
        let pulls = |file: std::path::PathBuf, repo: &'static str| {
            let args = vec![
                "inspect".to_owned(),
                "--raw".to_owned(),
                "--cert-dir".to_owned(),
                certs.clone(),
                "--authfile".to_owned(),
                file.display().to_string(),
                format!("docker://{host_r}/{repo}:v1"),
            ];
            async move {
                tokio::task::spawn_blocking(move || skopeo(&args))
                    .await
                    .expect("skopeo")
            }
        };
        // The registry's answer to one manifest request with `ns`'s secret as Basic.
        let status = |ns: String, repo: &'static str| {
            let http = http.clone();
            async move {
                let (user, pass) = credential_in(a, &ns, name_r, host_r).await?;
                let r = http
                    .get(format!("https://{host_r}/v2/{repo}/manifests/v1"))
                    .header(
                        "Accept",
                        "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json",
                    )
                    .basic_auth(user, Some(pass))
                    .send()
                    .await
                    .expect("request");
                Some(r.status().as_u16())
            }
        };
        eventually("the three secrets", || async move {
            copy_in(a, ta, name_r).await.is_some()
                && copy_in(a, tb, name_r).await.is_some()
                && copy_in(a, sh, name_r).await.is_some()
        })
        .await;
        // `shared` has no annotation: the default scope (`**`) pulls both teams' images.
        let file = auth_file(shared.clone()).await.expect("secret");
        for repo in ["team-a/app", "team-b/app"] {
            let out = pulls(file.clone(), repo).await;
            assert!(
                out.status.success(),
                "shared pulling {repo}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (ns, own, other) in [
            (&team_a, "team-a/app", "team-b/app"),
            (&team_b, "team-b/app", "team-a/app"),
        ] {
            let file = auth_file(ns.clone()).await.expect("secret");
            let out = pulls(file.clone(), own).await;
            assert!(
                out.status.success(),
                "{ns} pulling {own}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let out = pulls(file, other).await;
            assert!(!out.status.success(), "{ns} pulled {other}");
            assert_eq!(status(ns.clone(), own).await, Some(200), "{ns} {own}");
            assert_eq!(status(ns.clone(), other).await, Some(403), "{ns} {other}");
        }

        // Rotation: the new key first in the file the registry and the controller both read.
        std::fs::write(&key_path, format!("{key_b}\n{key_a}\n")).expect("key file");
        let kid_b = keys_of(&key_b).kids()[0].clone();
        let kid_b_r = kid_b.as_str();
        eventually("secrets re-minted with the new key", || async move {
            let mut all = true;
            for ns in [ta, tb] {
                all &= copy_in(a, ns, name_r).await.is_some_and(|s| {
                    annotation_of(&s, secrets::CREDENTIAL_KID).as_deref() == Some(kid_b_r)
                });
            }
            all
        })
        .await;
        // The registry re-reads its key file on its own schedule: its first answers to the
        // new key may still be 401.
        let status_r = &status;
        eventually("the new key's credential accepted", || async move {
            status_r(ta.to_owned(), "team-a/app").await == Some(200)
        })
        .await;
        let file = auth_file(team_a.clone()).await.expect("secret");
        let out = pulls(file, "team-a/app").await;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(status(team_a.clone(), "team-b/app").await, Some(403));

        // Opt-out: the secret goes, and the credential read before it works until it expires,
        // at most the lifetime after it was minted, then no more (401).
        let (user, pass) = credential_in(a, &team_b, name_r, host_r)
            .await
            .expect("team-b's credential");
        let expires = copy_in(a, &team_b, name_r)
            .await
            .and_then(|s| annotation_of(&s, secrets::CREDENTIAL_EXPIRES))
            .and_then(|v| v.parse::<u64>().ok())
            .expect("expiry annotation");
        assert!(expires <= unix_now() + LIFETIME, "{expires}");
        set_inject(&admin, &team_b, false).await;
        let team_b_r = team_b.as_str();
        eventually("team-b's secret removed", || async move {
            copy_in(a, team_b_r, name_r).await.is_none()
        })
        .await;
        let old = |user: String, pass: String| {
            let http = http.clone();
            async move {
                http.get(format!("https://{host_r}/v2/team-b/app/manifests/v1"))
                    .header("Accept", "application/vnd.oci.image.manifest.v1+json")
                    .basic_auth(user, Some(pass))
                    .send()
                    .await
                    .expect("request")
                    .status()
                    .as_u16()
            }
        };
        // Checked only with a second to spare: under load the removal may take a while.
        if unix_now() + 1 < expires {
            assert_eq!(old(user.clone(), pass.clone()).await, 200);
        }
        let wait = Duration::from_secs(expires.saturating_sub(unix_now()) + 1);
        assert!(wait <= Duration::from_secs(LIFETIME + 1));
        tokio::time::sleep(wait).await;
        assert_eq!(
            old(user, pass).await,
            401,
            "the opted-out credential outlived its expiry"
        );
        task.abort();
    });
    unbind_cluster_role(&admin_rest, &role);
    drop(reg);
}
