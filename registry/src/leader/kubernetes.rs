//! The leader lease as a Kubernetes `Lease` (coordination.k8s.io/v1), the object
//! kube-controller-manager and client-go's leader election use. Every write carries the
//! resourceVersion it read, so two processes racing for it cannot both win (the API server
//! answers the loser 409). The chart's RBAC grants get/create/update on this one Lease name.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease as KubeLeaseObject, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Api;
use kube::api::PostParams;

use super::{Lease, LeaseError, Observed, may_take};

pub struct KubeLease {
    api: Api<KubeLeaseObject>,
    namespace: String,
    name: String,
    observed: Observed,
}

/// The namespace this pod runs in, from its ServiceAccount mount.
const NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

impl KubeLease {
    /// Connects as the pod's ServiceAccount in a cluster, or through KUBECONFIG outside one.
    /// `namespace`: given, else the pod's own, else the kubeconfig's default.
    pub async fn connect(namespace: Option<String>, name: String) -> Result<Self, LeaseError> {
        let err = |message: String| LeaseError::Backend {
            lease: format!("Lease {name}"),
            message,
        };
        let client = kube::Client::try_default()
            .await
            .map_err(|e| err(format!("no Kubernetes API to elect a leader with: {e}")))?;
        let namespace = match namespace {
            Some(n) => n,
            None => match std::fs::read_to_string(NAMESPACE_FILE) {
                Ok(n) if !n.trim().is_empty() => n.trim().to_owned(),
                _ => client.default_namespace().to_owned(),
            },
        };
        Ok(KubeLease {
            api: Api::namespaced(client, &namespace),
            namespace,
            name,
            observed: Observed::default(),
        })
    }

    fn err(&self, message: String) -> LeaseError {
        LeaseError::Backend {
            lease: self.describe(),
            message,
        }
    }

    fn spec(
        holder: &str,
        duration: Duration,
        acquired: Option<MicroTime>,
        transitions: i32,
    ) -> LeaseSpec {
        let now = MicroTime(jiff::Timestamp::now());
        LeaseSpec {
            holder_identity: Some(holder.to_owned()),
            lease_duration_seconds: Some(
                i32::try_from(duration.as_secs().max(1)).unwrap_or(i32::MAX),
            ),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

#[async_trait::async_trait]
impl Lease for KubeLease {
    async fn acquire_or_renew(&self, holder: &str, duration: Duration) -> Result<bool, LeaseError> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e.to_string()))?;
        let Some(mut lease) = current else {
            let fresh = KubeLeaseObject {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(Self::spec(holder, duration, None, 0)),
            };
            return match self.api.create(&PostParams::default(), &fresh).await {
                Ok(_) => Ok(true),
                // Another process created it first.
                Err(e) if is_status(&e, 409) => Ok(false),
                Err(e) => Err(self.err(e.to_string())),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let unchanged = self.observed.unchanged_for(&version);
        let their = spec.lease_duration_seconds.map_or(duration, |s| {
            Duration::from_secs(u64::try_from(s).unwrap_or(0))
        });
        if !may_take(holder, spec.holder_identity.as_deref(), unchanged, their) {
            return Ok(false);
        }
        let ours = spec.holder_identity.as_deref() == Some(holder);
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours { spec.acquire_time } else { None };
        lease.spec = Some(Self::spec(holder, duration, acquired, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            // Changed since we read it: someone else renewed or took it.
            Err(e) if is_status(&e, 409) => Ok(false),
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    async fn release(&self, holder: &str) -> Result<(), LeaseError> {
        let Some(mut lease) = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.err(e.to_string()))?
        else {
            return Ok(());
        };
        let Some(spec) = lease.spec.as_mut() else {
            return Ok(());
        };
        if spec.holder_identity.as_deref() != Some(holder) {
            return Ok(());
        }
        // An empty holder is free at once for every contender (client-go releases the same way).
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if is_status(&e, 409) => Ok(()),
            Err(e) => Err(self.err(e.to_string())),
        }
    }

    fn describe(&self) -> String {
        format!("Lease {}/{}", self.namespace, self.name)
    }
}
