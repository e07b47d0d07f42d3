//! The node in the Kubernetes API: the `outpost.io/trusted` label the webhook's node affinity
//! selects on, and Events that tell operators what the agent found.

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};

/// The label set on nodes that trust the registry.
pub const TRUSTED_LABEL: &str = "outpost.io/trusted";

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
    pub async fn set_trusted(&self, trusted: bool) -> Result<(), kube::Error> {
        let nodes: Api<Node> = Api::all(self.client.clone());
        let value = if trusted {
            serde_json::Value::String("true".into())
        } else {
            serde_json::Value::Null
        };
        let patch = serde_json::json!({ "metadata": { "labels": { TRUSTED_LABEL: value } } });
        nodes
            .patch(&self.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    /// Publishes an Event about this node.
    pub async fn event(&self, warning: bool, reason: &str, note: &str) -> Result<(), kube::Error> {
        let mut node = Node::default();
        node.metadata.name = Some(self.name.clone());
        let reference: ObjectReference = node.object_ref(&());
        self.recorder
            .publish(
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
            )
            .await
    }
}
