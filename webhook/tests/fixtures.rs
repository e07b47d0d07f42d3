//! The captured AdmissionReviews (tests/fixtures/admission, from a real API server) through the
//! admission handler: the returned patch applied to the request's pod must give the committed
//! golden pod, the same patch applied twice must give the same pod, and a second admission of
//! the patched pod (reinvocationPolicy: IfNeeded) must change nothing. `UPDATE_GOLDEN=1` rewrites the golden files (review the diff).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use outpost_webhook::admission::Admission;
use outpost_webhook::config::ConfigSource;
use outpost_webhook::metrics::Metrics;
use serde_json::Value;

const CONFIG: &str = r#"
registry = "outpost.local:5000"
pull_secret = "outpost-pull"
check_availability = false
[[rule]]
upstream = "myacr.azurecr.io"
repositories = ["hello-world", "team-a/**", "tools/*", "storefront"]
[[rule]]
upstream = "myacr.azurecr.io:443"
[[rule]]
upstream = "docker.io"
repositories = ["library/*", "bitnami/**"]
"#;

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join(sub)
}

fn admission(config: &str) -> Admission {
    Admission {
        config: ConfigSource::fixed(config.parse().unwrap()),
        checker: None,
        own_namespace: Some("outpost-system".into()),
        scopes: None,
        budget: Duration::from_secs(5),
        metrics: Arc::new(Metrics::new()),
    }
}

/// Sends a review; returns the response object.
async fn send(a: &Admission, review: &Value) -> Value {
    let answer = a.answer(&serde_json::to_vec(review).unwrap()).await;
    let body: Value = serde_json::from_slice(&answer.body).unwrap();
    assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(body["kind"], "AdmissionReview");
    let resp = body["response"].clone();
    assert_eq!(resp["uid"], review["request"]["uid"]);
    assert_eq!(resp["allowed"], true);
    resp
}

/// A pod annotation holding JSON, parsed.
fn annotation_json(pod: &Value, key: &str) -> Value {
    serde_json::from_str(pod["metadata"]["annotations"][key].as_str().unwrap()).unwrap()
}

fn patch_of(resp: &Value) -> Option<json_patch::Patch> {
    let b64 = resp.get("patch")?.as_str()?;
    assert_eq!(resp["patchType"], "JSONPatch");
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(serde_json::from_slice(&raw).unwrap())
}

fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir("fixtures/admission"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    v.sort();
    assert_eq!(v.len(), 8, "every captured fixture is here");
    v
}

#[tokio::test]
async fn fixture_pods_match_golden_and_reinvocation_is_idempotent() {
    let a = admission(CONFIG);
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    for path in fixtures() {
        let name = path.file_stem().unwrap().to_str().unwrap().to_owned();
        let review: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let resp = send(&a, &review).await;
        let mut pod = review["request"]["object"].clone();
        if let Some(patch) = patch_of(&resp) {
            json_patch::patch(&mut pod, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            // The same patch applied again changes nothing.
            let mut twice = pod.clone();
            json_patch::patch(&mut twice, &patch).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(twice, pod, "{name}: the patch applied twice differs");
        }
        let golden = dir("golden").join(format!("{name}.pod.json"));
        if update {
            std::fs::write(&golden, serde_json::to_string_pretty(&pod).unwrap() + "\n").unwrap();
        }
        let want: Value = serde_json::from_slice(&std::fs::read(&golden).unwrap())
            .unwrap_or_else(|e| panic!("{name}: golden {}: {e}", golden.display()));
        assert_eq!(
            pod, want,
            "{name}: patched pod differs from its golden file"
        );

        // Re-invocation: the API server sends the mutated pod again.
        let mut again = review.clone();
        again["request"]["object"] = pod.clone();
        let resp2 = send(&a, &again).await;
        assert!(
            patch_of(&resp2).is_none(),
            "{name}: second admission patched again: {resp2}"
        );
    }
}

fn pod_image(pod: &Value, field: &str, name: &str) -> String {
    pod["spec"][field]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What the golden files must say, asserted independently of them, so a wrong golden file
/// cannot pass.
#[tokio::test]
async fn mixed_pod_rewrites_per_rule() {
    let a = admission(CONFIG);
    let review: Value = serde_json::from_slice(
        &std::fs::read(dir("fixtures/admission/pod-mixed-create.json")).unwrap(),
    )
    .unwrap();
    let resp = send(&a, &review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    let d1 = "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb";
    for (field, name, want) in [
        ("initContainers", "init-short", "outpost.local:5000/library/busybox:1.36".to_owned()),
        ("initContainers", "init-acr", "outpost.local:5000/tools/migrate:2.1".into()),
        ("containers", "web", "outpost.local:5000/library/nginx".into()),
        ("containers", "cache", "outpost.local:5000/library/redis:7.2".into()),
        ("containers", "api", format!("outpost.local:5000/team-a/api@{d1}")),
        // ghcr.io has no rule; localhost has none; upper case is invalid.
        ("containers", "tool", "ghcr.io/org/tool:1.0@sha256:3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d".into()),
        ("containers", "local", "localhost:5000/dev/thing:0.1".into()),
        ("containers", "ported", "outpost.local:5000/hello-world:v2".into()),
        ("containers", "hub-user", "outpost.local:5000/bitnami/kubectl:1.29".into()),
        ("containers", "upper", "MyACR.azurecr.io/Hello:latest".into()),
    ] {
        assert_eq!(pod_image(&pod, field, name), want, "{name}");
    }
    let originals: Value = annotation_json(&pod, "outpost.io/original-images");
    assert_eq!(originals["web"], "nginx");
    assert_eq!(originals["init-short"], "busybox:1.36");
    assert!(originals.get("tool").is_none());
    assert_eq!(originals.as_object().unwrap().len(), 7);
    // The existing secret is kept and ours appended once.
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        serde_json::json!([{"name": "existing-secret"}, {"name": "outpost-pull"}])
    );
    // Existing preferences are kept; the requirement is added beside them.
    let aff = &pod["spec"]["affinity"];
    assert_eq!(
        aff["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"],
        review["request"]["object"]["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    );
    assert_eq!(
        aff["podAntiAffinity"],
        review["request"]["object"]["spec"]["affinity"]["podAntiAffinity"]
    );
    assert_eq!(
        aff["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"],
        serde_json::json!([{"matchExpressions": [{"key": "outpost.io/trusted", "operator": "In", "values": ["true"]}]}])
    );
}

/// Namespace-credential mode: only images the namespace's credential may pull move; the rest
/// keep their upstream name (and say why), and a namespace without a credential is left alone.
#[tokio::test]
async fn only_images_within_the_namespace_scope_move() {
    use outpost_webhook::nscred::{Scope, ScopeTable};
    let table = Arc::new(ScopeTable::new(Scope::parse("**").unwrap()));
    let scopes = std::collections::BTreeMap::from([(
        "shop".to_owned(),
        Scope::parse("library/*, tools/*").unwrap(),
    )]);
    table.replace(&scopes, []);
    let mut a = admission(CONFIG);
    a.scopes = Some(Arc::clone(&table));
    let review: Value = serde_json::from_slice(
        &std::fs::read(dir("fixtures/admission/pod-mixed-create.json")).unwrap(),
    )
    .unwrap();
    let resp = send(&a, &review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    for (field, name, want) in [
        (
            "initContainers",
            "init-short",
            "outpost.local:5000/library/busybox:1.36",
        ),
        (
            "initContainers",
            "init-acr",
            "outpost.local:5000/tools/migrate:2.1",
        ),
        ("containers", "web", "outpost.local:5000/library/nginx"),
        (
            "containers",
            "cache",
            "outpost.local:5000/library/redis:7.2",
        ),
        // Outside the scope: upstream names kept.
        (
            "containers",
            "ported",
            "myacr.azurecr.io:443/hello-world:v2",
        ),
        ("containers", "hub-user", "bitnami/kubectl:1.29"),
    ] {
        assert_eq!(pod_image(&pod, field, name), want, "{name}");
    }
    let kept: Value = annotation_json(&pod, "outpost.io/unavailable-images");
    let kept = kept.as_object().unwrap();
    assert_eq!(
        kept.keys().map(String::as_str).collect::<Vec<_>>(),
        ["api", "hub-user", "ported"]
    );
    assert!(
        kept["api"]
            .as_str()
            .unwrap()
            .contains("team-a/api is outside"),
        "{kept:?}"
    );
    assert_eq!(resp["warnings"].as_array().unwrap().len(), 3);
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        serde_json::json!([{"name": "existing-secret"}, {"name": "outpost-pull"}])
    );
    let outside = outpost_webhook::metrics::Metrics::encode(&a.metrics)
        .lines()
        .find_map(|l| l.strip_prefix("outpost_webhook_images_outside_scope_total "))
        .map(|v| v.parse::<f64>().unwrap());
    assert_eq!(outside, Some(3.0));

    // A namespace without a credential (the last pass did not see it; no API access here):
    // nothing moves and the pod gets no pull secret of ours.
    let mut other = review.clone();
    other["request"]["namespace"] = "elsewhere".into();
    let resp = send(&a, &other).await;
    let mut pod = other["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    assert_eq!(pod_image(&pod, "containers", "web"), "nginx");
    assert_eq!(
        pod["spec"]["imagePullSecrets"],
        serde_json::json!([{"name": "existing-secret"}])
    );
    assert!(
        pod["metadata"]["annotations"]
            .get("outpost.io/original-images")
            .is_none()
    );
}

#[tokio::test]
async fn required_affinity_is_anded_into_every_term() {
    let a = admission(CONFIG);
    let review: Value = serde_json::from_slice(
        &std::fs::read(dir("fixtures/admission/pod-required-affinity-create.json")).unwrap(),
    )
    .unwrap();
    let resp = send(&a, &review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    let terms = pod["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"]
        .as_array()
        .unwrap();
    assert_eq!(terms.len(), 2);
    for (t, arch) in terms.iter().zip(["amd64", "arm64"]) {
        assert_eq!(
            t["matchExpressions"],
            serde_json::json!([
                {"key": "kubernetes.io/arch", "operator": "In", "values": [arch]},
                {"key": "outpost.io/trusted", "operator": "In", "values": ["true"]},
            ])
        );
    }
}

#[tokio::test]
async fn skips_opt_out_updates_and_own_namespace() {
    let a = admission(CONFIG);
    let read = |f: &str| -> Value {
        serde_json::from_slice(&std::fs::read(dir("fixtures/admission").join(f)).unwrap()).unwrap()
    };
    for f in ["pod-optout-create.json", "pod-basic-update.json"] {
        assert!(patch_of(&send(&a, &read(f)).await).is_none(), "{f}");
    }
    let mut own = read("pod-basic-create.json");
    own["request"]["namespace"] = "outpost-system".into();
    assert!(patch_of(&send(&a, &own).await).is_none());
    // The same pod elsewhere is rewritten.
    assert!(patch_of(&send(&a, &read("pod-basic-create.json")).await).is_some());
}

#[tokio::test]
async fn ephemeral_container_moves_when_the_pod_can_pull_from_outpost() {
    let read = || -> Value {
        serde_json::from_slice(
            &std::fs::read(dir(
                "fixtures/admission/pod-basic-ephemeralcontainers-update.json",
            ))
            .unwrap(),
        )
        .unwrap()
    };
    // The captured pod has no pull secret: with one configured, the debug container stays.
    let a = admission(CONFIG);
    assert!(patch_of(&send(&a, &read()).await).is_none());
    // Without a pull secret (anonymous pulls), only the new ephemeral container moves.
    let no_secret = CONFIG.replace("pull_secret = \"outpost-pull\"\n", "");
    let a = admission(&no_secret);
    let review = read();
    let resp = send(&a, &review).await;
    let patch = patch_of(&resp).unwrap();
    assert_eq!(
        serde_json::to_value(&patch).unwrap(),
        serde_json::json!([{"op": "replace", "path": "/spec/ephemeralContainers/0/image",
            "value": "outpost.local:5000/library/busybox:1.36"}])
    );
}

#[tokio::test]
async fn skip_node_selector_adds_no_affinity() {
    let cfg = CONFIG.replace(
        "check_availability = false",
        "check_availability = false\nskip_node_selector = true",
    );
    let a = admission(&cfg);
    let review: Value = serde_json::from_slice(
        &std::fs::read(dir("fixtures/admission/pod-basic-create.json")).unwrap(),
    )
    .unwrap();
    let resp = send(&a, &review).await;
    let mut pod = review["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch_of(&resp).unwrap()).unwrap();
    assert!(pod["spec"].get("affinity").is_none());
    assert_eq!(
        pod_image(&pod, "containers", "hello"),
        "outpost.local:5000/hello-world:latest"
    );
}
