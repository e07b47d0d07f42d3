//! The pull-secret copy controller against a Kubernetes API substitute: kube's own `Client`
//! over an in-process service that answers the real API paths and object shapes (lists,
//! label selectors, Status errors, resourceVersion conflicts, and watches as streams of
//! newline-delimited events) from an in-memory store.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use outpost_webhook::config::ConfigSource;
use outpost_webhook::metrics::Metrics;
use outpost_webhook::secrets::{self, COPIED_FROM, MANAGED_BY, MANAGED_BY_LABEL, reconcile};
use serde_json::{Value, json};
use tokio::sync::broadcast;

/// One watch event: the resource kind, the event type and the object.
#[derive(Clone, Debug)]
struct Event {
    kind: &'static str,
    ty: &'static str,
    object: Value,
}

struct Store {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    secrets: BTreeMap<(String, String), Value>,
    version: u64,
    /// Every request, as "METHOD path?query", for assertions on what was written.
    log: Vec<String>,
    events: broadcast::Sender<Event>,
    /// Another writer that wins a race: on our POST of this key, its object is stored first
    /// (between our read and our write), so our create meets AlreadyExists.
    racers: BTreeMap<(String, String), Value>,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            namespaces: BTreeMap::new(),
            secrets: BTreeMap::new(),
            version: 0,
            log: Vec::new(),
            events: broadcast::channel(1024).0,
            racers: BTreeMap::new(),
        }
    }
}

impl Store {
    fn emit(&mut self, kind: &'static str, ty: &'static str, mut object: Value) {
        self.version += 1;
        object["metadata"]["resourceVersion"] = self.version.to_string().into();
        let _ = self.events.send(Event { kind, ty, object });
    }
}

fn ns_object(name: &str, labels: &BTreeMap<String, String>) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

type Shared = Arc<Mutex<Store>>;

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

fn selector_matches(selector: Option<&str>, labels: Option<&Value>) -> bool {
    let Some(sel) = selector else { return true };
    sel.split(',').all(|term| {
        let (k, v) = term.split_once('=').expect("equality selectors only");
        labels.and_then(|l| l.get(k)).and_then(Value::as_str) == Some(v)
    })
}

/// `metadata.name=X` field selectors (the only kind the controller sends).
fn field_matches(selector: Option<&str>, object: &Value) -> bool {
    let Some(sel) = selector else { return true };
    let want = sel
        .strip_prefix("metadata.name=")
        .expect("metadata.name field selectors only");
    object["metadata"]["name"] == want
}

fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| {
            v.replace("%2F", "/")
                .replace("%3D", "=")
                .replace("%2C", ",")
        })
    })
}

fn handle(
    store: &Shared,
    method: &Method,
    path: &str,
    query: Option<&str>,
    body: &[u8],
) -> (StatusCode, Value) {
    let mut s = store.lock().unwrap();
    s.log
        .push(format!("{method} {path}?{}", query.unwrap_or_default()));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let selector = query_param(query, "labelSelector");
    let fields = query_param(query, "fieldSelector");
    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["api", "v1", "namespaces"]) => {
            let items: Vec<Value> = s
                .namespaces
                .iter()
                .map(|(n, l)| json!({"metadata": {"name": n, "labels": l}}))
                .filter(|ns| selector_matches(selector.as_deref(), ns["metadata"].get("labels")))
                .collect();
            (
                StatusCode::OK,
                json!({"kind": "NamespaceList", "apiVersion": "v1",
                "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "secrets"]) => {
            let items: Vec<Value> = s
                .secrets
                .values()
                .filter(|x| selector_matches(selector.as_deref(), x["metadata"].get("labels")))
                .filter(|x| field_matches(fields.as_deref(), x))
                .cloned()
                .collect();
            (
                StatusCode::OK,
                json!({"kind": "SecretList", "apiVersion": "v1",
                "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "secrets"]) => {
            let items: Vec<Value> = s
                .secrets
                .iter()
                .filter(|((n, _), x)| {
                    n == ns
                        && selector_matches(selector.as_deref(), x["metadata"].get("labels"))
                        && field_matches(fields.as_deref(), x)
                })
                .map(|(_, x)| x.clone())
                .collect();
            (
                StatusCode::OK,
                json!({"kind": "SecretList", "apiVersion": "v1",
                "metadata": {"resourceVersion": s.version.to_string()}, "items": items}),
            )
        }
        (Method::GET, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match s.secrets.get(&(ns.to_string(), name.to_string())) {
                Some(x) => (StatusCode::OK, x.clone()),
                None => status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("secrets \"{name}\" not found"),
                ),
            }
        }
        (Method::POST, ["api", "v1", "namespaces", ns, "secrets"]) => {
            let mut obj: Value = serde_json::from_slice(body).unwrap();
            let name = obj["metadata"]["name"].as_str().unwrap().to_owned();
            let key = (ns.to_string(), name.clone());
            if let Some(mut won) = s.racers.remove(&key) {
                s.version += 1;
                won["metadata"]["resourceVersion"] = s.version.to_string().into();
                s.secrets.insert(key.clone(), won.clone());
                s.emit("Secret", "ADDED", won);
            }
            if s.secrets.contains_key(&key) {
                return status(
                    StatusCode::CONFLICT,
                    "AlreadyExists",
                    &format!("secrets \"{name}\" already exists"),
                );
            }
            s.version += 1;
            obj["metadata"]["resourceVersion"] = s.version.to_string().into();
            obj["metadata"]["namespace"] = ns.to_string().into();
            obj["kind"] = "Secret".into();
            obj["apiVersion"] = "v1".into();
            s.secrets.insert(key, obj.clone());
            s.emit("Secret", "ADDED", obj.clone());
            (StatusCode::CREATED, obj)
        }
        (Method::PUT, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            let mut obj: Value = serde_json::from_slice(body).unwrap();
            let key = (ns.to_string(), name.to_string());
            let Some(cur) = s.secrets.get(&key) else {
                return status(StatusCode::NOT_FOUND, "NotFound", "not found");
            };
            if obj["metadata"]["resourceVersion"] != cur["metadata"]["resourceVersion"] {
                return status(
                    StatusCode::CONFLICT,
                    "Conflict",
                    "the object has been modified",
                );
            }
            s.version += 1;
            obj["metadata"]["resourceVersion"] = s.version.to_string().into();
            s.secrets.insert(key, obj.clone());
            s.emit("Secret", "MODIFIED", obj.clone());
            (StatusCode::OK, obj)
        }
        (Method::DELETE, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match s.secrets.remove(&(ns.to_string(), name.to_string())) {
                Some(x) => {
                    s.emit("Secret", "DELETED", x.clone());
                    (StatusCode::OK, x)
                }
                None => status(StatusCode::NOT_FOUND, "NotFound", "not found"),
            }
        }
        _ => status(
            StatusCode::NOT_FOUND,
            "NotFound",
            &format!("no route {method} {path}"),
        ),
    }
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A watch: events from now on, for the kind the path names (and its namespace), as
/// newline-delimited JSON, until the client goes away.
fn watch(store: &Shared, path: &str, query: Option<&str>) -> Response<Body> {
    let rx = {
        let mut s = store.lock().unwrap();
        s.log.push(format!("WATCH {path}"));
        s.events.subscribe()
    };
    let parts: Vec<String> = path
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let selector = query_param(query, "labelSelector");
    let fields = query_param(query, "fieldSelector");
    let (kind, namespace) = match parts
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["api", "v1", "namespaces"] => ("Namespace", None),
        ["api", "v1", "secrets"] => ("Secret", None),
        ["api", "v1", "namespaces", ns, "secrets"] => ("Secret", Some(ns.to_string())),
        other => panic!("no watch for {other:?}"),
    };
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let (selector, namespace, fields) = (selector.clone(), namespace.clone(), fields.clone());
        async move {
            loop {
                let ev = rx.recv().await.ok()?;
                let m = &ev.object["metadata"];
                if ev.kind != kind
                    || namespace.as_deref().is_some_and(|n| m["namespace"] != n)
                    || !selector_matches(selector.as_deref(), m.get("labels"))
                    || !field_matches(fields.as_deref(), &ev.object)
                {
                    continue;
                }
                let mut line =
                    serde_json::to_vec(&json!({"type": ev.ty, "object": ev.object})).unwrap();
                line.push(b'\n');
                return Some((Ok::<_, Infallible>(Frame::data(Bytes::from(line))), rx));
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed_unsync(StreamBody::new(stream)))
        .unwrap()
}

fn client(store: Shared) -> kube::Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let store = Arc::clone(&store);
        async move {
            let (parts, body) = req.into_parts();
            if parts.uri.query().is_some_and(|q| q.contains("watch=true")) {
                return Ok::<_, Infallible>(watch(&store, parts.uri.path(), parts.uri.query()));
            }
            let body = body.collect().await.unwrap().to_bytes();
            let (code, value) = handle(
                &store,
                &parts.method,
                parts.uri.path(),
                parts.uri.query(),
                &body,
            );
            let resp = Response::builder()
                .status(code)
                .header("content-type", "application/json")
                .body(BodyExt::boxed_unsync(Full::new(Bytes::from(
                    serde_json::to_vec(&value).unwrap(),
                ))))
                .unwrap();
            Ok::<_, Infallible>(resp)
        }
    });
    kube::Client::new(svc, "default")
}

fn secret(ns: &str, name: &str, data: &str, labels: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "1", "labels": labels},
        "type": "kubernetes.io/dockerconfigjson",
        "data": {".dockerconfigjson": data}})
}

fn ns(store: &Shared, name: &str, inject: bool) {
    let mut labels = BTreeMap::from([("kubernetes.io/metadata.name".to_owned(), name.to_owned())]);
    if inject {
        labels.insert("outpost.io/inject".into(), "enabled".into());
    }
    let mut s = store.lock().unwrap();
    let ty = if s.namespaces.contains_key(name) {
        "MODIFIED"
    } else {
        "ADDED"
    };
    s.emit("Namespace", ty, ns_object(name, &labels));
    s.namespaces.insert(name.into(), labels);
}

fn copy_in(store: &Shared, ns: &str) -> Option<Value> {
    store
        .lock()
        .unwrap()
        .secrets
        .get(&(ns.into(), "outpost-pull".into()))
        .cloned()
}

#[tokio::test]
async fn copies_follow_the_source_and_the_namespace_labels() {
    let store: Shared = Arc::default();
    ns(&store, "outpost-system", true);
    ns(&store, "shop", true);
    ns(&store, "lab", true);
    ns(&store, "other", false);
    ns(&store, "theirs", true);
    {
        let mut s = store.lock().unwrap();
        s.secrets.insert(
            ("outpost-system".into(), "outpost-pull".into()),
            secret("outpost-system", "outpost-pull", "djE=", json!({})),
        );
        // A secret of the same name that someone else made: never touched.
        s.secrets.insert(
            ("theirs".into(), "outpost-pull".into()),
            secret("theirs", "outpost-pull", "bWluZQ==", json!({"app": "mine"})),
        );
    }
    let c = client(Arc::clone(&store));

    // Create: one copy per opted-in namespace (not the source's own, not "other").
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert_eq!(r.created, vec!["lab", "shop"]);
    assert_eq!(r.foreign, vec!["theirs"]);
    assert!(r.updated.is_empty() && r.deleted.is_empty());
    for n in ["lab", "shop"] {
        let copy = copy_in(&store, n).unwrap();
        assert_eq!(copy["data"][".dockerconfigjson"], "djE=");
        assert_eq!(copy["type"], "kubernetes.io/dockerconfigjson");
        assert_eq!(copy["metadata"]["labels"][MANAGED_BY_LABEL], MANAGED_BY);
        assert_eq!(
            copy["metadata"]["annotations"][COPIED_FROM],
            "outpost-system/outpost-pull"
        );
    }
    assert!(copy_in(&store, "other").is_none());
    assert_eq!(
        copy_in(&store, "theirs").unwrap()["data"][".dockerconfigjson"],
        "bWluZQ=="
    );

    // Nothing changed: nothing written.
    store.lock().unwrap().log.clear();
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert!(r.created.is_empty() && r.updated.is_empty() && r.deleted.is_empty());
    assert!(
        store
            .lock()
            .unwrap()
            .log
            .iter()
            .all(|l| l.starts_with("GET ")),
        "{:?}",
        store.lock().unwrap().log
    );

    // Update on source change (a rotated token).
    store
        .lock()
        .unwrap()
        .secrets
        .get_mut(&("outpost-system".into(), "outpost-pull".into()))
        .unwrap()["data"][".dockerconfigjson"] = "djI=".into();
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert_eq!(r.updated, vec!["lab", "shop"]);
    for n in ["lab", "shop"] {
        assert_eq!(
            copy_in(&store, n).unwrap()["data"][".dockerconfigjson"],
            "djI="
        );
    }
    assert_eq!(
        copy_in(&store, "theirs").unwrap()["data"][".dockerconfigjson"],
        "bWluZQ=="
    );

    // Removal when a namespace opts out; other copies and foreign secrets stay.
    ns(&store, "lab", false);
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert_eq!(r.deleted, vec!["lab"]);
    assert!(copy_in(&store, "lab").is_none());
    assert!(copy_in(&store, "shop").is_some());
    assert!(copy_in(&store, "theirs").is_some());

    // A deleted copy is recreated.
    store
        .lock()
        .unwrap()
        .secrets
        .remove(&("shop".into(), "outpost-pull".into()));
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert_eq!(r.created, vec!["shop"]);

    // Source gone: copies are kept (a re-created source will update them), nothing created.
    store
        .lock()
        .unwrap()
        .secrets
        .remove(&("outpost-system".into(), "outpost-pull".into()));
    ns(&store, "new", true);
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert!(r.source_missing);
    assert!(r.deleted.is_empty() && r.created.is_empty());
    assert!(copy_in(&store, "shop").is_some());
    assert!(copy_in(&store, "new").is_none());
}

/// A renamed pull secret gets its own copies; copies under the old name are no longer read
/// (every read names the pull secret, so RBAC can grant that name only) and stay.
#[tokio::test]
async fn renamed_pull_secret_gets_new_copies_and_reads_only_its_name() {
    let store: Shared = Arc::default();
    ns(&store, "outpost-system", false);
    ns(&store, "shop", true);
    {
        let mut s = store.lock().unwrap();
        s.secrets.insert(
            ("outpost-system".into(), "outpost-pull".into()),
            secret("outpost-system", "outpost-pull", "djE=", json!({})),
        );
        s.secrets.insert(
            ("outpost-system".into(), "pull-2".into()),
            secret("outpost-system", "pull-2", "djI=", json!({})),
        );
    }
    let c = client(Arc::clone(&store));
    reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert!(copy_in(&store, "shop").is_some());
    store.lock().unwrap().log.clear();
    let r = reconcile(&c, "outpost-system", "pull-2").await.unwrap();
    assert_eq!(r.created, vec!["shop"]);
    assert!(r.deleted.is_empty(), "{r:?}");
    let s = store.lock().unwrap();
    assert_eq!(
        s.secrets[&("shop".to_owned(), "pull-2".to_owned())]["data"][".dockerconfigjson"],
        "djI="
    );
    // Every Secret read named it: a get of that name, or a list by that name (a create cannot
    // name it in the path; RBAC grants create unnamed).
    for l in s
        .log
        .iter()
        .filter(|l| l.contains("/secrets") && !l.starts_with("POST "))
    {
        assert!(
            l.contains("/secrets/pull-2") || l.contains("fieldSelector=metadata.name%3Dpull-2"),
            "a Secret request not by name: {l}"
        );
    }
}

/// Two replicas race to create a namespace's copy: the one that loses reads what the winner
/// made, sees its own kind of copy and leaves it (or brings it up to date) instead of calling it
/// foreign; a genuinely foreign secret that appears in the gap is still left alone.
#[tokio::test]
async fn a_lost_create_race_rereads_and_recognises_our_copy() {
    let store: Shared = Arc::default();
    ns(&store, "outpost-system", false);
    for n in ["same", "stale", "theirs"] {
        ns(&store, n, true);
    }
    let ours = |ns: &str, data: &str| {
        let mut c = secret(
            ns,
            "outpost-pull",
            data,
            json!({MANAGED_BY_LABEL: MANAGED_BY}),
        );
        c["metadata"]["annotations"] = json!({COPIED_FROM: "outpost-system/outpost-pull"});
        c
    };
    {
        let mut s = store.lock().unwrap();
        s.secrets.insert(
            ("outpost-system".into(), "outpost-pull".into()),
            secret("outpost-system", "outpost-pull", "djE=", json!({})),
        );
        // The other replica's copy, current.
        s.racers
            .insert(("same".into(), "outpost-pull".into()), ours("same", "djE="));
        // The other replica's copy, made from the source before a rotation.
        s.racers.insert(
            ("stale".into(), "outpost-pull".into()),
            ours("stale", "djA="),
        );
        // Someone else's secret of that name.
        s.racers.insert(
            ("theirs".into(), "outpost-pull".into()),
            secret("theirs", "outpost-pull", "bWluZQ==", json!({"app": "mine"})),
        );
    }
    let c = client(Arc::clone(&store));
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert!(r.created.is_empty(), "{r:?}");
    assert_eq!(r.updated, vec!["stale"], "{r:?}");
    assert_eq!(r.foreign, vec!["theirs"], "{r:?}");
    for n in ["same", "stale"] {
        assert_eq!(
            copy_in(&store, n).unwrap()["data"][".dockerconfigjson"],
            "djE=",
            "{n}"
        );
    }
    assert_eq!(
        copy_in(&store, "theirs").unwrap()["data"][".dockerconfigjson"],
        "bWluZQ=="
    );
    // The race is over: the next pass writes nothing.
    store.lock().unwrap().log.clear();
    let r = reconcile(&c, "outpost-system", "outpost-pull")
        .await
        .unwrap();
    assert!(r.created.is_empty() && r.updated.is_empty(), "{r:?}");
    assert!(
        store
            .lock()
            .unwrap()
            .log
            .iter()
            .all(|l| l.starts_with("GET ")),
        "{:?}",
        store.lock().unwrap().log
    );
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The running controller, driven by watch events alone (the periodic resync is an hour).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_controller_follows_watch_events() {
    let store: Shared = Arc::default();
    ns(&store, "outpost-system", false);
    ns(&store, "shop", true);
    store.lock().unwrap().secrets.insert(
        ("outpost-system".into(), "outpost-pull".into()),
        secret("outpost-system", "outpost-pull", "djE=", json!({})),
    );
    let config = ConfigSource::fixed(
        "registry = \"r.local\"\npull_secret = \"outpost-pull\""
            .parse()
            .unwrap(),
    );
    let task = tokio::spawn(secrets::run(
        client(Arc::clone(&store)),
        "outpost-system".into(),
        config,
        Arc::new(Metrics::new()),
        Duration::from_secs(3600),
    ));
    let st = Arc::clone(&store);
    tokio::task::spawn_blocking(move || {
        wait_until("first copy", || copy_in(&st, "shop").is_some());
        // The watches are open once each kind has been watched.
        wait_until("watches open", || {
            st.lock()
                .unwrap()
                .log
                .iter()
                .filter(|l| l.starts_with("WATCH"))
                .count()
                >= 3
        });
        // A namespace opts in.
        ns(&st, "lab", true);
        wait_until("copy in lab", || copy_in(&st, "lab").is_some());
        // The source changes.
        {
            let mut s = st.lock().unwrap();
            let key = ("outpost-system".to_owned(), "outpost-pull".to_owned());
            let mut src = s.secrets[&key].clone();
            src["data"][".dockerconfigjson"] = "djI=".into();
            s.secrets.insert(key, src.clone());
            s.emit("Secret", "MODIFIED", src);
        }
        wait_until("copies updated", || {
            ["shop", "lab"]
                .iter()
                .all(|n| copy_in(&st, n).is_some_and(|c| c["data"][".dockerconfigjson"] == "djI="))
        });
        // A namespace opts out.
        ns(&st, "lab", false);
        wait_until("copy removed", || copy_in(&st, "lab").is_none());
        // Someone deletes a copy: it comes back.
        {
            let mut s = st.lock().unwrap();
            let gone = s
                .secrets
                .remove(&("shop".to_owned(), "outpost-pull".to_owned()))
                .unwrap();
            s.emit("Secret", "DELETED", gone);
        }
        wait_until("copy restored", || copy_in(&st, "shop").is_some());
    })
    .await
    .unwrap();
    task.abort();
}
