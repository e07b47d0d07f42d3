//! The node in the Kubernetes API: the `outpost.io/trusted` label the webhook's node affinity
//! selects on, and Events that tell operators what the agent found.

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

/// The label set on nodes that trust the registry.
pub const TRUSTED_LABEL: &str = "outpost.io/trusted";

/// Longest wait for one API call: a hung API server must not hold up reconciles of the files,
/// nor SIGTERM's drain (label removal included) past the pod's 30 s grace period.
pub const API_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum NodeApiError {
    #[error(transparent)]
    Kube(#[from] kube::Error),
    #[error("the Kubernetes API did not answer within {0:?}")]
    Timeout(Duration),
}

async fn bounded<T>(
    call: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, NodeApiError> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(NodeApiError::Timeout(API_TIMEOUT)),
    }
}

pub struct NodeApi {
    client: Client,
    name: String,
    recorder: Recorder,
}

impl NodeApi {
    /// In-cluster credentials (or `KUBECONFIG`).
    pub async fn connect(name: String) -> Result<Self, kube::Error> {
        let client = Client::try_default().await?;
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: "outpost-node-agent".into(),
                instance: Some(name.clone()),
            },
        );
        Ok(NodeApi {
            client,
            name,
            recorder,
        })
    }

    /// Sets (`true`) or removes (`false`) the trusted label.
    pub async fn set_trusted(&self, trusted: bool) -> Result<(), NodeApiError> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let value = if trusted {
            serde_json::Value::String("true".into())
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({ "metadata": { "labels": { TRUSTED_LABEL: value } } });
        bounded(nodes.patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))).await?;
        Ok(())
    }

    /// Publishes an Event about this node.
    pub async fn event(&self, warning: bool, reason: &str, note: &str) -> Result<(), NodeApiError> {
        let mut node = Node::default();
        node.metadata.name = Some(self.name.clone());
        let reference: ObjectReference = node.object_ref(&());
        bounded(self.recorder.publish(
            &Event {
                type_: if warning {
                    EventType::Warning
                } else {
                    EventType::Normal
                },
                reason: reason.into(),
                note: Some(note.chars().take(1000).collect()),
                action: "Reconcile".into(),
                secondary: None,
            },
            &reference,
        ))
        .await
    }
}
