//! The pull-secret copy controller against a Kubernetes API substitute: kube's own `Client`
//! over an in-process service that answers the real API paths and object shapes (lists,
//! label selectors, Status errors, resourceVersion conflicts) from an in-memory store.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use outpost_webhook::secrets::{COPIED_FROM, MANAGED_BY, MANAGED_BY_LABEL, reconcile};
use serde_json::{Value, json};

#[derive(Default)]
struct Store {
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    secrets: BTreeMap<(String, String), Value>,
    version: u64,
    /// Every request, as "METHOD path?query", for assertions on what was written.
    log: Vec<String>,
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
    s.log.push(format!("{method} {path}"));
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let selector = query_param(query, "labelSelector");
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
                .cloned()
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
            (StatusCode::OK, obj)
        }
        (Method::DELETE, ["api", "v1", "namespaces", ns, "secrets", name]) => {
            match s.secrets.remove(&(ns.to_string(), name.to_string())) {
                Some(x) => (StatusCode::OK, x),
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

fn client(store: Shared) -> kube::Client {
    let svc = tower::service_fn(move |req: Request<kube::client::Body>| {
        let store = Arc::clone(&store);
        async move {
            let (parts, body) = req.into_parts();
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
                .body(Full::new(Bytes::from(serde_json::to_vec(&value).unwrap())))
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
    store.lock().unwrap().namespaces.insert(name.into(), labels);
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

#[tokio::test]
async fn renamed_pull_secret_replaces_the_old_copies() {
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
    let r = reconcile(&c, "outpost-system", "pull-2").await.unwrap();
    assert_eq!(r.created, vec!["shop"]);
    assert_eq!(r.deleted, vec!["shop"]);
    assert!(copy_in(&store, "shop").is_none());
    let s = store.lock().unwrap();
    assert_eq!(
        s.secrets[&("shop".to_owned(), "pull-2".to_owned())]["data"][".dockerconfigjson"],
        "djI="
    );
}
