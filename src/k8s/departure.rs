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

/// What the lookup of the DaemonSet gave.
#[derive(Debug, Clone)]
pub enum Lookup {
    Found(Box<DaemonSet>),
    NotFound,
    /// 401 or 403: this agent may no longer read it. `helm uninstall` deletes the DaemonSet
    /// and then, at once, the RoleBinding and the ServiceAccount, so the pods it stops often
    /// ask after their rights (or their token) are gone.
    Denied(String),
    /// No answer, or another error.
    Failed(String),
}

impl Lookup {
    fn from_result(result: Result<Option<DaemonSet>, kube::Error>) -> Lookup {
        match result {
            Ok(Some(ds)) => Lookup::Found(Box::new(ds)),
            Ok(None) => Lookup::NotFound,
            Err(kube::Error::Api(s)) if s.code == 401 || s.code == 403 => {
                Lookup::Denied(format!("{} {}", s.code, s.message))
            }
            Err(e) => Lookup::Failed(e.to_string()),
        }
    }

    /// Whether the DaemonSet could be read (found or not).
    pub fn readable(&self) -> bool {
        matches!(self, Lookup::Found(_) | Lookup::NotFound)
    }
}

/// The decision from the lookup (pure). `readable_before`: a lookup of this agent's
/// succeeded earlier (at start), so a denial now means its rights were taken away since, as
/// an uninstall does; never readable means RBAC is missing: a restart, to be safe.
pub fn decide(namespace: &str, name: &str, lookup: Lookup, readable_before: bool) -> Departure {
    match lookup {
        Lookup::NotFound => Departure::Uninstall {
            why: format!("DaemonSet {namespace}/{name} not found"),
        },
        Lookup::Found(ds) if ds.metadata.deletion_timestamp.is_some() => Departure::Uninstall {
            why: format!("DaemonSet {namespace}/{name} is being deleted"),
        },
        Lookup::Found(_) => Departure::Restart {
            why: format!("DaemonSet {namespace}/{name} exists"),
        },
        Lookup::Denied(e) if readable_before => Departure::Uninstall {
            why: format!(
                "DaemonSet {namespace}/{name} may no longer be read ({e}): the agent's RBAC or ServiceAccount was removed, as an uninstall does"
            ),
        },
        Lookup::Denied(e) => Departure::Restart {
            why: format!(
                "DaemonSet {namespace}/{name} may not be read and never could ({e}): grant get on it (the chart's Role does); keeping"
            ),
        },
        Lookup::Failed(e) => Departure::Restart {
            why: format!(
                "DaemonSet {namespace}/{name} could not be read ({e}); keeping, since addresses expire by their lifetime anyway"
            ),
        },
    }
}

/// Reads the DaemonSet within `timeout`.
pub async fn lookup(client: &Client, namespace: &str, name: &str, timeout: Duration) -> Lookup {
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    match tokio::time::timeout(timeout, api.get_opt(name)).await {
        Ok(result) => Lookup::from_result(result),
        Err(_) => Lookup::Failed(format!("no answer within {timeout:?}")),
    }
}

/// How often [`watch_readable`] tries again, and how long each try may take.
const READABLE_RETRY: Duration = Duration::from_secs(10);

/// At start: reads the DaemonSet until that succeeds once (every 10 s), and sets `readable`;
/// warns while it is denied (SIGTERM cannot tell an uninstall without it).
pub async fn watch_readable(
    client: Client,
    namespace: String,
    name: String,
    readable: std::sync::Arc<std::sync::atomic::AtomicBool>,
) {
    let mut warned = false;
    loop {
        match lookup(&client, &namespace, &name, READABLE_RETRY).await {
            l if l.readable() => {
                if let Lookup::NotFound = l {
                    warn!(daemonset = %format!("{namespace}/{name}"), "--daemonset names no DaemonSet: a SIGTERM will be taken for an uninstall");
                }
                readable.store(true, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            Lookup::Denied(e) if !warned => {
                warn!(daemonset = %format!("{namespace}/{name}"), error = %e, "cannot read the agent's DaemonSet: grant get on it (the chart's Role does), or SIGTERM can never tell an uninstall from a restart");
                warned = true;
            }
            _ => {}
        }
        tokio::time::sleep(READABLE_RETRY).await;
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
    readable_before: bool,
) -> Departure {
    let found = lookup(client, namespace, name, timeout).await;
    let answered = !matches!(found, Lookup::Failed(_));
    let decision = decide(namespace, name, found, readable_before);
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
        match tokio::time::timeout(
            EVENT_TIMEOUT,
            super::node_event(
                client,
                node,
                super::NodeEvent {
                    type_: "Normal",
                    action: "Stop",
                    reason: decision.reason(),
                    note: decision.message(),
                    what: "departure",
                },
            ),
        )
        .await
        {
            Ok(()) => {}
            Err(_) => debug!("departure Event not published within {EVENT_TIMEOUT:?}"),
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
    use k8s_openapi::jiff::Timestamp;

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
    fn gone_deleting_or_rights_withdrawn_is_an_uninstall_present_or_unknown_a_restart() {
        let d = decide("ferrovip-system", "ferrovip", Lookup::NotFound, true);
        assert!(matches!(d, Departure::Uninstall { .. }), "{d:?}");
        assert_eq!(d.why(), "DaemonSet ferrovip-system/ferrovip not found");
        let d = decide("ns", "ds", Lookup::Found(Box::new(ds(true))), true);
        assert_eq!(
            d,
            Departure::Uninstall {
                why: "DaemonSet ns/ds is being deleted".into()
            }
        );
        let d = decide("ns", "ds", Lookup::Found(Box::new(ds(false))), true);
        assert_eq!(d.reason(), "AgentRestarting");
        let d = decide(
            "ns",
            "ds",
            Lookup::Failed("connection refused".into()),
            true,
        );
        assert!(matches!(d, Departure::Restart { .. }));
        assert!(d.why().contains("connection refused"), "{}", d.why());
        assert!(d.message().contains("held"), "{}", d.message());
        // Rights taken away since the start: uninstall; never had them: keep.
        let denied = || Lookup::Denied("403 forbidden".into());
        assert!(matches!(
            decide("ns", "ds", denied(), true),
            Departure::Uninstall { .. }
        ));
        let d = decide("ns", "ds", denied(), false);
        assert!(matches!(d, Departure::Restart { .. }), "{d:?}");
        assert!(d.why().contains("never could"), "{}", d.why());
    }
}
