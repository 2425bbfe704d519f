//! Why a DaemonSet pod is being stopped (SIGTERM): the same signal ends a container that the
//! kubelet restarts or a rolling update replaces (the node keeps running ferrovip: hold the
//! addresses for the next agent) and the last pod of an uninstall (`helm uninstall`, the
//! DaemonSet deleted: leave nothing behind on the node). The agent's own DaemonSet tells them
//! apart: gone, or carrying a `deletionTimestamp`, is an uninstall; present is a restart. An
//! API server that does not answer within the bound is taken for a restart: keeping is the
//! safe mistake (the addresses expire by their lifetime anyway), removing the VIPs of a node
//! that keeps running ferrovip is not.

use std::time::Duration;

use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tracing::{debug, info, warn};

/// How long the agent waits for its DaemonSet on SIGTERM.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// How long it waits for the Event naming its decision to be accepted.
const EVENT_TIMEOUT: Duration = Duration::from_secs(1);

/// What a SIGTERM means for this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Departure {
    /// ferrovip leaves the node: release with priority 0 and remove what it put in the kernel.
    Uninstall { why: String },
    /// The agent comes back (container restart, rolling update): hold as `--restart-hold` says.
    Restart { why: String },
}

impl Departure {
    pub fn why(&self) -> &str {
        match self {
            Departure::Uninstall { why } | Departure::Restart { why } => why,
        }
    }

    /// The Event's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Departure::Uninstall { .. } => "AgentUninstalling",
            Departure::Restart { .. } => "AgentRestarting",
        }
    }

    /// The Event's note.
    pub fn message(&self) -> String {
        match self {
            Departure::Uninstall { why } => format!(
                "ferrovip is being uninstalled from this node ({why}): addresses released with priority 0, kernel state removed"
            ),
            Departure::Restart { why } => format!(
                "the ferrovip agent is restarting ({why}): addresses held for the next agent as --restart-hold says"
            ),
        }
    }
}

/// What the lookup of the DaemonSet gave: the object (or `None`: not found), or why there was
/// no answer.
pub type Lookup = Result<Option<DaemonSet>, String>;

/// The decision from the lookup (pure).
pub fn decide(namespace: &str, name: &str, lookup: Lookup) -> Departure {
    match lookup {
        Ok(None) => Departure::Uninstall {
            why: format!("DaemonSet {namespace}/{name} not found"),
        },
        Ok(Some(ds)) if ds.metadata.deletion_timestamp.is_some() => Departure::Uninstall {
            why: format!("DaemonSet {namespace}/{name} is being deleted"),
        },
        Ok(Some(_)) => Departure::Restart {
            why: format!("DaemonSet {namespace}/{name} exists"),
        },
        Err(e) => Departure::Restart {
            why: format!(
                "DaemonSet {namespace}/{name} could not be read ({e}); keeping, since addresses expire by their lifetime anyway"
            ),
        },
    }
}

/// Asks the API server (bounded by `timeout`) and decides; logs the decision and publishes it
/// as an Event on this node's Node object when the API server answered.
pub async fn departure(
    client: &Client,
    namespace: &str,
    name: &str,
    node: &str,
    timeout: Duration,
) -> Departure {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let lookup = match tokio::time::timeout(timeout, api.get_opt(name)).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {timeout:?}")),
    };
    let answered = lookup.is_ok();
    let decision = decide(namespace, name, lookup);
    match &decision {
        Departure::Uninstall { why } => {
            info!(decision = "uninstall", why = %why, "SIGTERM: ferrovip is being uninstalled from this node")
        }
        Departure::Restart { why } if answered => {
            info!(decision = "restart", why = %why, "SIGTERM: the agent is restarting")
        }
        Departure::Restart { why } => {
            warn!(decision = "restart", why = %why, "SIGTERM: cannot tell a restart from an uninstall; treating it as a restart")
        }
    }
    if answered {
        match tokio::time::timeout(EVENT_TIMEOUT, node_event(client, node, &decision)).await {
            Ok(()) => {}
            Err(_) => debug!("departure Event not published within {EVENT_TIMEOUT:?}"),
        }
    }
    decision
}

/// A Normal Event about this node's Node object (in `default`, or in `kube-system` on servers
/// that take no other).
async fn node_event(client: &Client, node: &str, decision: &Departure) {
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
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{node}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.into()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some("Stop".into()),
            reason: Some(decision.reason().into()),
            note: Some(decision.message()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("ferrovip.io/agent".into()),
            reporting_instance: Some(node.to_string()),
            type_: Some("Normal".into()),
            ..K8sEvent::default()
        };
        match Api::<K8sEvent>::namespaced(client.clone(), namespace)
            .create(&PostParams::default(), &event)
            .await
        {
            Ok(_) => return,
            Err(kube::Error::Api(s)) if s.code == 422 && namespace == "default" => continue,
            Err(e) => {
                debug!(error = %e, "departure Event not published");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn ds(deleting: bool) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("ferrovip".into()),
                deletion_timestamp: deleting.then(|| Time(Timestamp::now())),
                ..ObjectMeta::default()
            },
            ..DaemonSet::default()
        }
    }

    #[test]
    fn gone_or_deleting_is_an_uninstall_present_or_unknown_a_restart() {
        let d = decide("ferrovip-system", "ferrovip", Ok(None));
        assert!(matches!(d, Departure::Uninstall { .. }), "{d:?}");
        assert_eq!(d.why(), "DaemonSet ferrovip-system/ferrovip not found");
        let d = decide("ns", "ds", Ok(Some(ds(true))));
        assert_eq!(
            d,
            Departure::Uninstall {
                why: "DaemonSet ns/ds is being deleted".into()
            }
        );
        let d = decide("ns", "ds", Ok(Some(ds(false))));
        assert_eq!(d.reason(), "AgentRestarting");
        let d = decide("ns", "ds", Err("connection refused".into()));
        assert!(matches!(d, Departure::Restart { .. }));
        assert!(d.why().contains("connection refused"), "{}", d.why());
        assert!(d.message().contains("held"), "{}", d.message());
    }
}
