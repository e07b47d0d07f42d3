//! The pod mutation itself, on the pod's raw JSON (so fields this build does not know survive):
//! which images move to Outpost, and the JSON Patch that moves them, records the originals,
//! adds the pull secret and the node affinity. Pure: no I/O, no clock.

use std::collections::BTreeMap;

use outpost_core::{ImageError, ImageReference, MirrorConfig};
use serde_json::{Map, Value, json};

/// Container name → image before the rewrite.
pub const ORIGINAL_IMAGES: &str = "outpost.io/original-images";
/// Container name → why its image was left on the upstream (availability check).
pub const UNAVAILABLE_IMAGES: &str = "outpost.io/unavailable-images";
/// `"false"` on a pod opts it out.
pub const INJECT: &str = "outpost.io/inject";
/// The node label the node agent sets once the node trusts Outpost.
pub const TRUSTED_LABEL: &str = "outpost.io/trusted";

/// The three container lists of a pod spec, as their JSON fields are named.
pub const CONTAINER_FIELDS: [&str; 3] = ["initContainers", "containers", "ephemeralContainers"];

/// What happens to one image reference under a config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Move it to this reference on the Outpost registry.
    Rewrite(ImageReference),
    /// Leave it: why.
    Keep(KeepReason),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeepReason {
    /// Not a valid reference (upper-case host, bad tag, ...): the runtime would refuse or
    /// misread it, so it is not ours to touch.
    Invalid(ImageError),
    /// Already on the Outpost registry.
    OnOutpost,
    /// No rule covers its host and repository.
    NoRule,
}

/// The rewrite rule for one image reference: normalise, find the first rule that covers it,
/// and keep path, tag and digest on the Outpost host.
pub fn decide(image: &str, config: &MirrorConfig) -> Decision {
    let parsed: ImageReference = match image.parse() {
        Ok(r) => r,
        Err(e) => return Decision::Keep(KeepReason::Invalid(e)),
    };
    if parsed.host().canonical() == config.registry.canonical() {
        return Decision::Keep(KeepReason::OnOutpost);
    }
    match config.rule_for(parsed.host(), parsed.repository().as_str()) {
        Some(_) => Decision::Rewrite(parsed.with_host(&config.registry)),
        None => Decision::Keep(KeepReason::NoRule),
    }
}

/// One container of the pod whose image a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// `containers`, `initContainers` or `ephemeralContainers`.
    pub field: &'static str,
    pub index: usize,
    pub name: String,
    pub original: String,
    pub target: ImageReference,
}

/// Which container lists an admission may touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Pod CREATE: every container list, plus pull secret, affinity and annotations.
    WholePod,
    /// The `ephemeralcontainers` subresource: the API server accepts changes to ephemeral
    /// containers only, so only their images move.
    EphemeralOnly,
}

/// The containers whose images a rule covers, in spec order.
pub fn candidates(pod: &Value, config: &MirrorConfig, scope: Scope) -> Vec<Candidate> {
    let mut out = Vec::new();
    let Some(spec) = pod.get("spec") else {
        return out;
    };
    for field in CONTAINER_FIELDS {
        if scope == Scope::EphemeralOnly && field != "ephemeralContainers" {
            continue;
        }
        let Some(list) = spec.get(field).and_then(Value::as_array) else {
            continue;
        };
        for (index, c) in list.iter().enumerate() {
            let (Some(name), Some(image)) = (
                c.get("name").and_then(Value::as_str),
                c.get("image").and_then(Value::as_str),
            ) else {
                continue;
            };
            if let Decision::Rewrite(target) = decide(image, config) {
                out.push(Candidate {
                    field,
                    index,
                    name: name.to_owned(),
                    original: image.to_owned(),
                    target,
                });
            }
        }
    }
    out
}

/// True if the pod opted out with `outpost.io/inject: "false"`.
pub fn opted_out(pod: &Value) -> bool {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(INJECT))
        .and_then(Value::as_str)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// True if the pod already lists `secret` in `imagePullSecrets`.
pub fn has_pull_secret(pod: &Value, secret: &str) -> bool {
    pod.pointer("/spec/imagePullSecrets")
        .and_then(Value::as_array)
        .is_some_and(|l| {
            l.iter()
                .any(|s| s.get("name").and_then(Value::as_str) == Some(secret))
        })
}

/// JSON Pointer escaping of one reference token (RFC 6901).
fn escape(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

fn trusted_requirement() -> Value {
    json!({"key": TRUSTED_LABEL, "operator": "In", "values": ["true"]})
}

/// Builds the JSON Patch operations for a pod: `rewrites` are the candidates to move,
/// `unavailable` the containers left alone by the availability check (name → reason).
/// Returns no operations when there is nothing to change, so a re-invocation on an already
/// mutated pod yields an empty patch. Every operation sets a whole value (`replace`, or `add`
/// of a complete member), never an append or a removal, so the patch applied twice gives the
/// same pod as applied once.
pub fn patch_ops(
    pod: &Value,
    config: &MirrorConfig,
    scope: Scope,
    rewrites: &[Candidate],
    unavailable: &BTreeMap<String, String>,
) -> Vec<Value> {
    let mut ops = Vec::new();
    for c in rewrites {
        ops.push(json!({
            "op": "replace",
            "path": format!("/spec/{}/{}/image", c.field, c.index),
            "value": c.target.to_string(),
        }));
    }
    // Only ephemeral containers may change through that subresource.
    if scope == Scope::EphemeralOnly {
        return ops;
    }
    annotation_ops(pod, rewrites, unavailable, &mut ops);
    if rewrites.is_empty() {
        return ops;
    }
    if let Some(secret) = &config.pull_secret
        && !has_pull_secret(pod, secret)
    {
        // The whole list rather than an append (`/-`), so applying the patch twice is
        // harmless.
        let mut list = pod
            .pointer("/spec/imagePullSecrets")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        list.push(json!({"name": secret}));
        ops.push(json!({"op": "add", "path": "/spec/imagePullSecrets", "value": list}));
    }
    if !config.skip_node_selector {
        affinity_ops(pod, &mut ops);
    }
    ops
}

/// Reads a JSON-map annotation; an absent or unreadable one is empty.
fn annotation_map(pod: &Value, key: &str) -> Map<String, Value> {
    pod.pointer("/metadata/annotations")
        .and_then(|a| a.get(key))
        .and_then(Value::as_str)
        .and_then(|s| serde_json::from_str::<Map<String, Value>>(s).ok())
        .unwrap_or_default()
}

fn annotation_ops(
    pod: &Value,
    rewrites: &[Candidate],
    unavailable: &BTreeMap<String, String>,
    ops: &mut Vec<Value>,
) {
    let annotations = pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object);
    let mut set: Vec<(&str, Option<String>)> = Vec::new();
    if !rewrites.is_empty() {
        // Merge: a re-invocation that moves a container added since keeps the earlier ones.
        let mut originals = annotation_map(pod, ORIGINAL_IMAGES);
        for c in rewrites {
            originals.insert(c.name.clone(), Value::String(c.original.clone()));
        }
        set.push((ORIGINAL_IMAGES, Some(Value::Object(originals).to_string())));
    }
    let existing = annotation_map(pod, UNAVAILABLE_IMAGES);
    let mut reasons = existing.clone();
    for c in rewrites {
        reasons.remove(&c.name);
    }
    for (name, why) in unavailable {
        reasons.insert(name.clone(), Value::String(why.clone()));
    }
    if reasons != existing {
        if reasons.is_empty() {
            set.push((UNAVAILABLE_IMAGES, None));
        } else {
            set.push((UNAVAILABLE_IMAGES, Some(Value::Object(reasons).to_string())));
        }
    }
    if set.is_empty() {
        return;
    }
    match annotations {
        None => {
            let map: Map<String, Value> = set
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| (k.to_owned(), Value::String(v))))
                .collect();
            if !map.is_empty() {
                ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": map}));
            }
        }
        // A removal is written as the whole new map: a `remove` op would fail if the patch
        // were applied twice, and every op here stays idempotent.
        Some(existing)
            if set
                .iter()
                .any(|(k, v)| v.is_none() && existing.contains_key(*k)) =>
        {
            let mut map = existing.clone();
            for (k, v) in set {
                match v {
                    Some(v) => map.insert(k.to_owned(), Value::String(v)),
                    None => map.remove(k),
                };
            }
            ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": map}));
        }
        Some(_) => {
            for (k, v) in set {
                if let Some(v) = v {
                    let path = format!("/metadata/annotations/{}", escape(k));
                    ops.push(json!({"op": "add", "path": path, "value": v}));
                }
            }
        }
    }
}

/// Adds `outpost.io/trusted In [true]` as a required node affinity. Node selector terms are
/// ORed, so the requirement goes into every existing term (ANDed with what it already asks);
/// a term that already mentions the label is left as it is.
fn affinity_ops(pod: &Value, ops: &mut Vec<Value>) {
    let term = json!({"matchExpressions": [trusted_requirement()]});
    let required = json!({"nodeSelectorTerms": [term]});
    let present = |p: &str| pod.pointer(p).is_some_and(|v| !v.is_null());
    if !present("/spec/affinity") {
        ops.push(json!({"op": "add", "path": "/spec/affinity",
            "value": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": required}}}));
        return;
    }
    if !present("/spec/affinity/nodeAffinity") {
        ops.push(json!({"op": "add", "path": "/spec/affinity/nodeAffinity",
            "value": {"requiredDuringSchedulingIgnoredDuringExecution": required}}));
        return;
    }
    let req_path = "/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution";
    if !present(req_path) {
        ops.push(json!({"op": "add", "path": req_path, "value": required}));
        return;
    }
    let terms = pod
        .pointer(&format!("{req_path}/nodeSelectorTerms"))
        .and_then(Value::as_array);
    let Some(terms) = terms.filter(|t| !t.is_empty()) else {
        ops.push(
            json!({"op": "add", "path": format!("{req_path}/nodeSelectorTerms"), "value": [term]}),
        );
        return;
    };
    for (i, t) in terms.iter().enumerate() {
        let exprs = t.get("matchExpressions").and_then(Value::as_array);
        let mentions = exprs.is_some_and(|e| {
            e.iter()
                .any(|x| x.get("key").and_then(Value::as_str) == Some(TRUSTED_LABEL))
        });
        if mentions {
            continue;
        }
        // The whole list, not an append: idempotent like every op here.
        let mut list = exprs.cloned().unwrap_or_default();
        list.push(trusted_requirement());
        let path = format!("{req_path}/nodeSelectorTerms/{i}/matchExpressions");
        ops.push(json!({"op": "add", "path": path, "value": list}));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> MirrorConfig {
        format!("registry = \"r.local\"\npull_secret = \"p\"\n{extra}\n[[rule]]\nupstream = \"docker.io\"\n")
            .parse()
            .unwrap()
    }

    fn apply(pod: &Value, ops: Vec<Value>) -> Value {
        let mut out = pod.clone();
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
        json_patch::patch(&mut out, &patch).unwrap();
        out
    }

    fn run(pod: &Value, c: &MirrorConfig) -> Value {
        let cands = candidates(pod, c, Scope::WholePod);
        let ops = patch_ops(pod, c, Scope::WholePod, &cands, &BTreeMap::new());
        let once = apply(pod, ops.clone());
        assert_eq!(apply(&once, ops), once, "the patch applied twice differs");
        once
    }

    #[test]
    fn bare_pod_gets_everything_once() {
        let c = config("");
        let pod =
            json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "nginx"}]}});
        let out = run(&pod, &c);
        assert_eq!(
            out["spec"]["containers"][0]["image"],
            "r.local/library/nginx"
        );
        assert_eq!(
            out["metadata"]["annotations"][ORIGINAL_IMAGES],
            "{\"a\":\"nginx\"}"
        );
        assert_eq!(out["spec"]["imagePullSecrets"], json!([{"name": "p"}]));
        assert_eq!(
            out["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                ["nodeSelectorTerms"][0]["matchExpressions"][0]["key"],
            TRUSTED_LABEL
        );
        assert_eq!(run(&out, &c), out);
    }

    #[test]
    fn affinity_shapes() {
        let c = config("");
        let req = "/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution";
        // nodeAffinity with only preferences.
        let pod = json!({"metadata": {"annotations": {}}, "spec": {
            "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
            "containers": [{"name": "a", "image": "nginx"}]}});
        let out = run(&pod, &c);
        assert!(out.pointer(req).is_some());
        assert!(
            out.pointer(
                "/spec/affinity/nodeAffinity/preferredDuringSchedulingIgnoredDuringExecution"
            )
            .is_some()
        );
        // A term with matchFields only gets matchExpressions; a term that already names the
        // label is left alone; an empty term list gets one term.
        let pod = json!({"metadata": {}, "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]},
                {"matchExpressions": [{"key": TRUSTED_LABEL, "operator": "Exists"}]}
            ]}}},
            "containers": [{"name": "a", "image": "nginx"}]}});
        let out = run(&pod, &c);
        let terms = out.pointer(&format!("{req}/nodeSelectorTerms")).unwrap();
        assert_eq!(terms[0]["matchFields"][0]["key"], "metadata.name");
        assert_eq!(terms[0]["matchExpressions"][0]["key"], TRUSTED_LABEL);
        assert_eq!(terms[1]["matchExpressions"].as_array().unwrap().len(), 1);
        let pod = json!({"metadata": {}, "spec": {
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}},
            "containers": [{"name": "a", "image": "nginx"}]}});
        let out = run(&pod, &c);
        assert_eq!(
            out.pointer(&format!("{req}/nodeSelectorTerms"))
                .unwrap()
                .as_array()
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn reinvocation_with_a_new_container_merges() {
        let c = config("");
        let pod =
            json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "nginx"}]}});
        let mut out = run(&pod, &c);
        // Another webhook adds a sidecar, then we are invoked again.
        out["spec"]["containers"]
            .as_array_mut()
            .unwrap()
            .push(json!({"name": "side", "image": "envoyproxy/envoy:v1"}));
        let again = run(&out, &c);
        let originals: Value = serde_json::from_str(
            again["metadata"]["annotations"][ORIGINAL_IMAGES]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            originals,
            json!({"a": "nginx", "side": "envoyproxy/envoy:v1"})
        );
        assert_eq!(again["spec"]["imagePullSecrets"], json!([{"name": "p"}]));
        let terms = again.pointer("/spec/affinity/nodeAffinity/requiredDuringSchedulingIgnoredDuringExecution/nodeSelectorTerms").unwrap();
        assert_eq!(terms[0]["matchExpressions"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_cleared_reason_is_removed_idempotently() {
        let c = config("");
        let reasons = json!({"a": "not on Outpost"}).to_string();
        let pod = json!({"metadata": {"annotations": {UNAVAILABLE_IMAGES: reasons, "x": "y"}},
            "spec": {"containers": [{"name": "a", "image": "nginx"}]}});
        // `run` also applies the patch twice.
        let out = run(&pod, &c);
        let ann = out["metadata"]["annotations"].as_object().unwrap();
        assert!(!ann.contains_key(UNAVAILABLE_IMAGES));
        assert_eq!(ann["x"], "y");
        assert_eq!(ann[ORIGINAL_IMAGES], "{\"a\":\"nginx\"}");
        // Still unavailable: the reason is updated in place.
        let cands = candidates(&pod, &c, Scope::WholePod);
        let why = BTreeMap::from([("a".to_owned(), "Outpost unreachable".to_owned())]);
        let ops = patch_ops(&pod, &c, Scope::WholePod, &[], &why);
        let once = apply(&pod, ops.clone());
        assert_eq!(apply(&once, ops), once);
        assert_eq!(
            once["metadata"]["annotations"][UNAVAILABLE_IMAGES],
            json!({"a": "Outpost unreachable"}).to_string()
        );
        assert_eq!(once["spec"]["containers"][0]["image"], "nginx");
        assert_eq!(cands.len(), 1);
    }

    #[test]
    fn nothing_covered_means_no_patch() {
        let c: MirrorConfig = "registry = \"r.local\"\n[[rule]]\nupstream = \"ghcr.io\""
            .parse()
            .unwrap();
        let pod =
            json!({"metadata": {}, "spec": {"containers": [{"name": "a", "image": "nginx"}]}});
        let cands = candidates(&pod, &c, Scope::WholePod);
        assert!(cands.is_empty());
        assert!(patch_ops(&pod, &c, Scope::WholePod, &cands, &BTreeMap::new()).is_empty());
    }

    #[test]
    fn opt_out_annotation() {
        let pod = |v: &str| json!({"metadata": {"annotations": {INJECT: v}}});
        assert!(opted_out(&pod("false")));
        assert!(opted_out(&pod("False")));
        assert!(!opted_out(&pod("true")));
        assert!(!opted_out(&json!({"metadata": {}})));
    }
}
