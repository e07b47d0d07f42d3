//! One admission review, from request body to response body. Fails open: whatever goes wrong,
//! the answer is `allowed: true` without a patch, a warning, and a log line.

use std::collections::{BTreeMap, HashSet};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use serde_json::{Value, json};

use crate::availability::Checker;
use crate::config::ConfigSource;
use crate::metrics::{Metrics, Outcome};
use crate::mutate::{self, Candidate, Scope};
use crate::nscred::ScopeTable;

pub const API_VERSION: &str = "admission.k8s.io/v1";

pub struct Admission {
    pub config: Arc<ConfigSource>,
    /// `None`: no availability checks, whatever the config says (not configured).
    pub checker: Option<Arc<Checker>>,
    /// The webhook's own (release) namespace: its pods are never touched.
    pub own_namespace: Option<String>,
    /// Each namespace's credential scope (namespace-credential mode): images outside it keep
    /// their upstream name. `None`: every covered image moves.
    pub scopes: Option<Arc<ScopeTable>>,
    /// The most an admission may take, checks included.
    pub budget: Duration,
    pub metrics: Arc<Metrics>,
}

/// A finished answer: the response body and how it ended.
pub struct Answer {
    pub body: Vec<u8>,
    pub outcome: Outcome,
}

/// The `allowed: true`, no-patch answer, with a warning.
pub fn fail_open(api_version: &str, uid: &str, warning: &str) -> Vec<u8> {
    let review = json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": {"uid": uid, "allowed": true, "warnings": [format!("outpost-webhook: {warning}")]},
    });
    review.to_string().into_bytes()
}

/// The uid and apiVersion of a body, as far as they can be read, for a fail-open answer.
fn identity(v: Option<&Value>) -> (String, String) {
    let uid = v
        .and_then(|v| v.pointer("/request/uid"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    // Answer in the request's admission version so the API server can read the answer.
    let api = v
        .and_then(|v| v.get("apiVersion"))
        .and_then(Value::as_str)
        .filter(|a| a.starts_with("admission.k8s.io/"))
        .unwrap_or(API_VERSION)
        .to_owned();
    (uid, api)
}

/// Serialises a review with `response.patch` as base64 text, the documented wire form of
/// the API's `[]byte` (kube-core's `Vec<u8>` serialises as an array of numbers).
fn encode_with_base64_patch(
    review: &AdmissionReview<DynamicObject>,
) -> Result<Vec<u8>, serde_json::Error> {
    use base64::Engine;
    let mut v = serde_json::to_value(review)?;
    if let Some(resp) = v.get_mut("response")
        && let Some(Value::Array(bytes)) = resp.get("patch")
    {
        let raw: Vec<u8> = bytes
            .iter()
            .filter_map(Value::as_u64)
            .filter_map(|b| u8::try_from(b).ok())
            .collect();
        resp["patch"] = Value::String(base64::engine::general_purpose::STANDARD.encode(raw));
    }
    serde_json::to_vec(&v)
}

/// Why the review could not be processed (logged and sent as a warning).
struct Failure(String);

/// How a guarded review ended.
enum Guarded {
    Done(Answer),
    Failed(String),
    Panicked(String),
    TimedOut,
}

/// Runs a review within the budget, catching panics: the only way out is a `Guarded`.
async fn guard<F>(budget: Duration, review: F) -> Guarded
where
    F: std::future::Future<Output = Result<Answer, Failure>>,
{
    match tokio::time::timeout(budget, AssertUnwindSafe(review).catch_unwind()).await {
        Ok(Ok(Ok(answer))) => Guarded::Done(answer),
        Ok(Ok(Err(Failure(why)))) => Guarded::Failed(why),
        Ok(Err(panic)) => Guarded::Panicked(
            panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        ),
        Err(_) => Guarded::TimedOut,
    }
}

impl Admission {
    /// Answers one review body. Never fails and never panics outward; never takes longer
    /// than the budget.
    pub async fn answer(&self, body: &[u8]) -> Answer {
        let start = Instant::now();
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let guarded = guard(self.budget, self.review(parsed.as_ref(), start)).await;
        let (uid, api) = identity(parsed.as_ref());
        let answer = match guarded {
            Guarded::Done(answer) => answer,
            Guarded::Failed(why) => {
                tracing::warn!(%uid, reason = %why, "admission passed unchanged");
                Answer {
                    body: fail_open(&api, &uid, &why),
                    outcome: Outcome::Error,
                }
            }
            Guarded::Panicked(what) => {
                tracing::error!(%uid, panic = %what, "admission handler panicked; pod passed unchanged");
                Answer {
                    body: fail_open(&api, &uid, "internal error; pod admitted unchanged"),
                    outcome: Outcome::Error,
                }
            }
            Guarded::TimedOut => {
                tracing::warn!(%uid, budget_ms = self.budget.as_millis() as u64, "admission over budget; pod passed unchanged");
                Answer {
                    body: fail_open(&api, &uid, "timed out; pod admitted unchanged"),
                    outcome: Outcome::Error,
                }
            }
        };
        self.metrics.admission(answer.outcome, start.elapsed());
        answer
    }

    async fn review(&self, body: Option<&Value>, start: Instant) -> Result<Answer, Failure> {
        let body = body.ok_or_else(|| Failure("request body is not JSON".into()))?;
        let api = body.get("apiVersion").and_then(Value::as_str);
        let kind = body.get("kind").and_then(Value::as_str);
        if api != Some(API_VERSION) || kind != Some("AdmissionReview") {
            return Err(Failure(format!(
                "expected an {API_VERSION} AdmissionReview, got apiVersion {api:?} kind {kind:?}"
            )));
        }
        let review: AdmissionReview<DynamicObject> = serde_json::from_value(body.clone())
            .map_err(|e| Failure(format!("unreadable AdmissionReview: {e}")))?;
        let req: AdmissionRequest<DynamicObject> = review
            .try_into()
            .map_err(|_| Failure("AdmissionReview without a request".into()))?;
        let unchanged = |outcome: Outcome| -> Result<Answer, Failure> {
            let resp = AdmissionResponse::from(&req).into_review();
            let body = serde_json::to_vec(&resp)
                .map_err(|e| Failure(format!("cannot encode the response: {e}")))?;
            Ok(Answer { body, outcome })
        };
        let is_pod =
            req.kind.group.is_empty() && req.kind.version == "v1" && req.kind.kind == "Pod";
        if !is_pod {
            tracing::debug!(uid = %req.uid, kind = %req.kind.kind, "not a pod; skipped");
            return unchanged(Outcome::Skipped);
        }
        let scope = match (&req.operation, req.sub_resource.as_deref()) {
            (Operation::Create, None) => Scope::WholePod,
            (Operation::Update, Some("ephemeralcontainers")) => Scope::EphemeralOnly,
            _ => return unchanged(Outcome::Skipped),
        };
        if let (Some(own), Some(ns)) = (&self.own_namespace, &req.namespace)
            && own == ns
        {
            return unchanged(Outcome::Skipped);
        }
        let pod = body
            .pointer("/request/object")
            .filter(|o| o.is_object())
            .ok_or_else(|| Failure("the request carries no pod object".into()))?;
        if mutate::opted_out(pod) {
            return unchanged(Outcome::Skipped);
        }
        let config = self
            .config
            .get()
            .ok_or_else(|| Failure("no valid config loaded".into()))?;
        let mut candidates = mutate::candidates(pod, &config, scope);
        if scope == Scope::EphemeralOnly {
            // Existing ephemeral containers are immutable: only the new ones may move, and
            // only if the pod can authenticate to Outpost (its secret is set at creation).
            let old: HashSet<&str> = body
                .pointer("/request/oldObject/spec/ephemeralContainers")
                .and_then(Value::as_array)
                .map(|l| {
                    l.iter()
                        .filter_map(|c| c.get("name").and_then(Value::as_str))
                        .collect()
                })
                .unwrap_or_default();
            candidates.retain(|c| !old.contains(c.name.as_str()));
            if let Some(secret) = &config.pull_secret
                && !mutate::has_pull_secret(pod, secret)
            {
                candidates.clear();
            }
        }
        let mut unavailable = BTreeMap::new();
        if let (Some(table), Some(ns)) = (&self.scopes, &req.namespace)
            && !candidates.is_empty()
        {
            candidates = self
                .within_scope(table, ns, candidates, &mut unavailable)
                .await;
        }
        if config.check_availability
            && let Some(checker) = &self.checker
            && !candidates.is_empty()
        {
            candidates = self
                .check(checker, candidates, start, &mut unavailable)
                .await;
        }
        let ops = mutate::patch_ops(pod, &config, scope, &candidates, &unavailable);
        if ops.is_empty() {
            return unchanged(Outcome::Unchanged);
        }
        let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops))
            .map_err(|e| Failure(format!("cannot build the patch: {e}")))?;
        let mut resp = AdmissionResponse::from(&req)
            .with_patch(patch)
            .map_err(|e| Failure(format!("cannot encode the patch: {e}")))?;
        if !unavailable.is_empty() {
            resp.warnings = Some(
                unavailable
                    .iter()
                    .map(|(name, why)| {
                        format!("outpost-webhook: container {name} keeps its upstream image: {why}")
                    })
                    .collect(),
            );
        }
        let outcome = if candidates.is_empty() {
            Outcome::Unchanged
        } else {
            Outcome::Rewritten
        };
        tracing::info!(
            uid = %req.uid,
            namespace = req.namespace.as_deref().unwrap_or(""),
            rewritten = candidates.len(),
            unavailable = unavailable.len(),
            "pod admitted"
        );
        let body = encode_with_base64_patch(&resp.into_review())
            .map_err(|e| Failure(format!("cannot encode the response: {e}")))?;
        Ok(Answer { body, outcome })
    }

    /// Keeps the candidates the namespace's credential may pull; the others stay on their
    /// upstream: containerd tries Outpost as the node's mirror, is refused what the node may
    /// not pull, and falls back to the upstream with the pod's own pull secrets. Moving them
    /// would only earn a 403 from Outpost and a pod that cannot start.
    async fn within_scope(
        &self,
        table: &ScopeTable,
        namespace: &str,
        candidates: Vec<Candidate>,
        unavailable: &mut BTreeMap<String, String>,
    ) -> Vec<Candidate> {
        let scope = table.lookup(namespace).await;
        let mut keep = Vec::with_capacity(candidates.len());
        for c in candidates {
            let repository = c.target.repository().as_str();
            let why = match &scope {
                Ok(s) if s.allows(repository) => {
                    keep.push(c);
                    continue;
                }
                Ok(s) => format!(
                    "{repository} is outside the repositories this namespace may pull from Outpost ({s})"
                ),
                Err(why) => format!("the namespace has no Outpost pull credential: {why}"),
            };
            self.metrics.outside_scope.inc();
            tracing::info!(namespace, container = %c.name, image = %c.original, reason = %why, "image left on its upstream");
            unavailable.insert(c.name, why);
        }
        keep
    }

    /// Runs the availability checks concurrently, stopping at a deadline short of the budget
    /// so the answer still goes out in time. Returns the candidates Outpost can serve.
    async fn check(
        &self,
        checker: &Arc<Checker>,
        candidates: Vec<Candidate>,
        start: Instant,
        unavailable: &mut BTreeMap<String, String>,
    ) -> Vec<Candidate> {
        // Leave a tenth of the budget (at most 100 ms) for building and sending the answer.
        let margin = (self.budget / 10).min(Duration::from_millis(100));
        let deadline = tokio::time::Instant::from_std(start + self.budget - margin);
        let checks = candidates.iter().map(|c| {
            let checker = Arc::clone(checker);
            let target = c.target.clone();
            async move {
                match tokio::time::timeout_at(deadline, checker.check(&target)).await {
                    Ok(outcome) => outcome,
                    Err(_) => {
                        Err("availability check did not finish within the admission budget".into())
                    }
                }
            }
        });
        let results = futures_util::future::join_all(checks).await;
        let mut keep = Vec::with_capacity(candidates.len());
        for (c, r) in candidates.into_iter().zip(results) {
            self.metrics.availability(r.is_ok());
            match r {
                Ok(()) => keep.push(c),
                Err(why) => {
                    tracing::info!(container = %c.name, image = %c.original, reason = %why, "image left on its upstream");
                    unavailable.insert(c.name, why);
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panics_and_overruns_are_caught() {
        let budget = Duration::from_millis(20);
        let panicking = async {
            if budget > Duration::ZERO {
                panic!("boom");
            }
            Err(Failure(String::new()))
        };
        assert!(matches!(guard(budget, panicking).await, Guarded::Panicked(w) if w == "boom"));
        let slow = async {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Err(Failure(String::new()))
        };
        assert!(matches!(guard(budget, slow).await, Guarded::TimedOut));
        let failing = async { Err(Failure("why".into())) };
        assert!(matches!(guard(budget, failing).await, Guarded::Failed(w) if w == "why"));
    }

    #[test]
    fn fail_open_answers_allow_without_patch() {
        let v: Value = serde_json::from_slice(&fail_open(API_VERSION, "u1", "bad")).unwrap();
        assert_eq!(v["response"]["allowed"], true);
        assert_eq!(v["response"]["uid"], "u1");
        assert!(v["response"].get("patch").is_none());
        assert_eq!(v["response"]["warnings"][0], "outpost-webhook: bad");
    }
}
