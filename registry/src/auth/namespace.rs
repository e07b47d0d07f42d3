//! What the registry remembers of namespace credentials (`outpost_core::nscred`): the
//! namespaces whose credentials it accepted, for the admin API and `token list`, and the
//! authentication counter. Never the credentials themselves.

use std::collections::BTreeMap;
use std::sync::Mutex;

use outpost_core::{NamespaceCredential, NsCredError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};

/// Namespaces remembered (and used as metric labels) at most: a cluster's namespaces, with
/// room; beyond it new ones are counted under the label `_other`.
pub const MAX_NAMESPACES: usize = 2000;
/// The label of namespaces beyond [`MAX_NAMESPACES`].
pub const OTHER: &str = "_other";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NsAuthLabels {
    pub result: &'static str,
    /// The credential's namespace when it was accepted; for a refusal, the username if a
    /// credential of that namespace was accepted before (otherwise empty: names nobody
    /// signed must not grow the label set).
    pub namespace: String,
}

/// A namespace whose credential was accepted since this process started.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SeenCredential {
    pub namespace: String,
    pub repositories: Vec<String>,
    /// The id of the signing key (a hash of it, not the key).
    pub kid: String,
    pub issued_at: u64,
    pub expires_at: u64,
    pub last_accepted: u64,
}

#[derive(Default)]
pub struct NamespaceAuth {
    seen: Mutex<BTreeMap<String, SeenCredential>>,
    pub authentications: Family<NsAuthLabels, Counter>,
}

/// The metric's `result` for a refusal.
pub fn result_of(e: &NsCredError) -> &'static str {
    match e {
        NsCredError::Expired => "expired",
        NsCredError::NotYetValid => "not_yet_valid",
        NsCredError::BadSignature => "bad_signature",
        NsCredError::UnknownKey => "unknown_key",
        _ => "malformed",
    }
}

impl NamespaceAuth {
    fn count(&self, result: &'static str, namespace: String) {
        self.authentications
            .get_or_create(&NsAuthLabels { result, namespace })
            .inc();
    }

    /// Records an accepted credential (the newest one of its namespace is shown).
    pub fn accepted(&self, c: &NamespaceCredential, now: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if !seen.contains_key(&c.namespace) && seen.len() >= MAX_NAMESPACES {
            seen.retain(|_, s| s.expires_at > now);
        }
        let label = if seen.contains_key(&c.namespace) || seen.len() < MAX_NAMESPACES {
            let entry = seen
                .entry(c.namespace.clone())
                .or_insert_with(|| SeenCredential {
                    namespace: c.namespace.clone(),
                    repositories: Vec::new(),
                    kid: String::new(),
                    issued_at: 0,
                    expires_at: 0,
                    last_accepted: 0,
                });
            if c.issued_at >= entry.issued_at {
                entry.repositories = c
                    .repositories
                    .iter()
                    .map(|p| p.as_str().to_owned())
                    .collect();
                entry.kid = c.kid.clone();
                entry.issued_at = c.issued_at;
                entry.expires_at = c.expires_at;
            }
            entry.last_accepted = now;
            c.namespace.clone()
        } else {
            OTHER.to_owned()
        };
        drop(seen);
        self.count("accepted", label);
    }

    /// Records a refusal; `username` is what the client claimed.
    pub fn refused(&self, result: &'static str, username: &str) {
        let known = self
            .seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(username);
        self.count(
            result,
            if known {
                username.to_owned()
            } else {
                "".into()
            },
        );
    }

    /// The namespaces whose credentials were accepted, by name.
    pub fn seen(&self) -> Vec<SeenCredential> {
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cred(ns: &str, issued_at: u64, expires_at: u64, pattern: &str) -> NamespaceCredential {
        NamespaceCredential {
            namespace: ns.into(),
            repositories: vec![pattern.parse().unwrap()],
            issued_at,
            expires_at,
            kid: "0011223344556677".into(),
        }
    }

    fn count(n: &NamespaceAuth, result: &'static str, namespace: &str) -> u64 {
        n.authentications
            .get_or_create(&NsAuthLabels {
                result,
                namespace: namespace.into(),
            })
            .get()
    }

    #[test]
    fn newest_credential_shows_and_labels_stay_bounded() {
        let n = NamespaceAuth::default();
        n.accepted(&cred("team-a", 100, 200, "team-a/**"), 150);
        // An older credential still in use does not replace the newer one shown.
        n.accepted(&cred("team-a", 50, 160, "old/**"), 151);
        let seen = n.seen();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].repositories, vec!["team-a/**"]);
        assert_eq!((seen[0].issued_at, seen[0].last_accepted), (100, 151));
        assert_eq!(count(&n, "accepted", "team-a"), 2);

        // Fill the table with credentials that expire at 300.
        for i in 1..MAX_NAMESPACES {
            n.accepted(&cred(&format!("ns-{i}"), 100, 300, "x/**"), 150);
        }
        assert_eq!(n.seen().len(), MAX_NAMESPACES);
        n.accepted(&cred("late", 100, 400, "x/**"), 160);
        assert_eq!(count(&n, "accepted", OTHER), 1);
        assert_eq!(count(&n, "accepted", "late"), 0);
        assert!(n.seen().iter().all(|s| s.namespace != "late"));
        // Refusals name only namespaces accepted before.
        n.refused("expired", "team-a");
        n.refused("bad_signature", "nobody");
        assert_eq!(count(&n, "expired", "team-a"), 1);
        assert_eq!(count(&n, "bad_signature", ""), 1);
        assert_eq!(count(&n, "bad_signature", "nobody"), 0);
        // Once the others expired, they make room.
        n.accepted(&cred("late", 100, 400, "x/**"), 350);
        assert_eq!(count(&n, "accepted", "late"), 1);
        let names: Vec<String> = n.seen().into_iter().map(|s| s.namespace).collect();
        assert_eq!(names, vec!["late"]);
    }
}
