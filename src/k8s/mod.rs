//! Kubernetes mode, reporting side: VirtualIP status and Events written back from what the
//! engine observes and the dataplane programs. The watchers that feed the planner are a
//! source, beside the manifest files: `crate::source::cluster`.

pub mod departure;
pub mod kube_proxy;
pub mod lease;
pub mod served;
pub mod status;

use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::debug;

/// What an Event about this node's Node object says.
pub(crate) struct NodeEvent<'a> {
    /// `Normal` or `Warning`.
    pub type_: &'a str,
    pub action: &'a str,
    pub reason: &'a str,
    pub note: String,
    /// For the debug line when it cannot be published (e.g. "departure").
    pub what: &'a str,
}

/// Publishes an Event about node `node`'s Node object: cluster-scoped, so in `default`, or in
/// `kube-system` on servers that take no other (422 in `default`).
pub(crate) async fn node_event(client: &Client, node: &str, event: NodeEvent<'_>) {
    let now = Timestamp::now();
    let regarding = ObjectReference {
        api_version: Some("v1".into()),
        kind: Some("Node".into()),
        name: Some(node.to_string()),
        uid: Api::<Node>::all(client.clone())
            .get_opt(node)
            .await
            .ok()
            .flatten()
            .and_then(|n| n.metadata.uid),
        ..ObjectReference::default()
    };
    for namespace in ["default", "kube-system"] {
        let object = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{node}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(event.action.into()),
            reason: Some(event.reason.into()),
            note: Some(event.note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("ferrovip.io/agent".into()),
            reporting_instance: Some(node.to_string()),
            type_: Some(event.type_.into()),
            ..K8sEvent::default()
        };
        match Api::<K8sEvent>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &object)
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 422 && namespace == "default" => continue,
            Err(e) => {
                debug!(error = %e, what = event.what, "Event about the Node not published");
                return;
            }
        }
    }
}
