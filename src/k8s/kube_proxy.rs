//! Reports kube-proxy misconfigurations against the load-balancer addresses this node may
//! hold (see [`crate::model::kube_proxy`]): a warning in the log and a Warning Event on this
//! node's Node object when a problem appears (`kubectl describe node` shows it), an info line
//! when it goes, and a gauge through `report` (the agent's metrics).
//!
//! Observed at start, whenever the node's use of load-balancer addresses changes, and every
//! [`RECHECK`] (kube-proxy may start or be reconfigured later). Nothing is observed while the
//! node may hold no load-balancer address.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::crd::ServiceForwarding;
use crate::dataplane::kube_proxy::KubeProxyObserver;
use crate::model::kube_proxy::{LbUse, Problem, assess};
use crate::model::{Desired, lb};

/// How often kube-proxy is looked at again while the node may hold load-balancer addresses.
pub const RECHECK: Duration = Duration::from_secs(60);

/// What this node does with load-balancer addresses, from its plan.
pub fn lb_use(desired: &Desired) -> LbUse {
    let mut uses = LbUse::default();
    for (name, plan) in &desired.load_balancers {
        if !lb::is_synthetic(name)
            || !desired
                .resources
                .get(name)
                .is_some_and(|r| r.eligible && r.refused.is_none())
        {
            continue;
        }
        uses.addresses += 1;
        if plan.forwarding == ServiceForwarding::IPVS && !plan.proxy_ip_mode {
            uses.ipvs_without_ip_mode += 1;
        }
    }
    uses
}

/// Runs until `desired` closes.
pub async fn run(
    observer: KubeProxyObserver,
    client: Client,
    node: String,
    mut desired: watch::Receiver<Arc<Desired>>,
    mut report: impl FnMut(&[Problem]) + Send,
) {
    let mut reported: BTreeSet<&'static str> = BTreeSet::new();
    loop {
        let uses = lb_use(&desired.borrow_and_update());
        // Nothing observed while the node may hold no load-balancer address; what was
        // reported stays reported (no new log line or Event when addresses come back).
        let observed = if uses.addresses == 0 {
            None
        } else {
            let facts = observer.observe().await;
            if facts.is_none() {
                debug!("cannot observe kube-proxy (no sh?)");
            }
            facts
        };
        let problems = observed
            .as_ref()
            .map(|facts| assess(facts, uses))
            .unwrap_or_default();
        report(&problems);
        if observed.is_some() {
            let now: BTreeSet<&'static str> = problems.iter().map(Problem::metric_label).collect();
            for p in &problems {
                if !reported.contains(p.metric_label()) {
                    warn!(problem = p.metric_label(), "{}", p.message());
                    super::node_event(
                        &client,
                        &node,
                        super::NodeEvent {
                            type_: "Warning",
                            action: "Check",
                            reason: p.reason(),
                            note: p.message(),
                            what: "kube-proxy",
                        },
                    )
                    .await;
                }
            }
            for gone in reported.difference(&now) {
                info!(problem = *gone, "kube-proxy problem resolved");
            }
            reported = now;
        }
        // Plans change often; kube-proxy is looked at again only when the use changed or
        // the recheck is due.
        let recheck = tokio::time::Instant::now() + RECHECK;
        loop {
            tokio::select! {
                r = desired.changed() => {
                    if r.is_err() {
                        return;
                    }
                    if lb_use(&desired.borrow()) != uses {
                        break;
                    }
                }
                () = tokio::time::sleep_until(recheck) => break,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{LbPlan, ResourcePlan};

    #[test]
    fn use_counts_eligible_addresses_and_ipvs_ones_without_ip_mode() {
        let mut d = Desired::default();
        for (addr, forwarding, ip_mode, eligible) in [
            ("192.0.2.10", ServiceForwarding::KubeProxy, false, true),
            ("192.0.2.11", ServiceForwarding::IPVS, false, true),
            ("192.0.2.12", ServiceForwarding::IPVS, true, true),
            ("192.0.2.13", ServiceForwarding::IPVS, false, false),
        ] {
            let address = addr.parse().unwrap();
            let name = lb::resource_name(&address);
            d.load_balancers.insert(
                name.clone(),
                LbPlan {
                    address,
                    services: Vec::new(),
                    local: false,
                    forwarding,
                    proxy_ip_mode: ip_mode,
                },
            );
            d.resources.insert(
                name,
                ResourcePlan {
                    eligible,
                    ..ResourcePlan::default()
                },
            );
        }
        assert_eq!(
            lb_use(&d),
            LbUse {
                addresses: 3,
                ipvs_without_ip_mode: 1
            }
        );
    }
}
