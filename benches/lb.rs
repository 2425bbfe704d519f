//! Service of `type: LoadBalancer` → first ping answered through its address on the master:
//! the real `ferrovip agent` on two lab nodes (network namespaces) against a real
//! kube-apiserver v1.20 with etcd. Two kinds of rounds:
//! - end to end: the Service is created without an address; the Service controller running
//!   in the agents (one leads, by the Lease) allocates the pool's lowest free address, the
//!   agents plan it, the master elects itself and announces it;
//! - agents only: the benchmark writes the allocation record (`ferrovip.io/allocated`) in the
//!   Service it creates, as the leader would, so it measures the agents' side: watch delivery,
//!   planning, the new VRRP instance's election (Master_Down_Interval of the preferred node,
//!   about 341 ms at 100 ms adverts), the address and its gratuitous ARP.
//!
//! The controller's own figures at scale (1,000 Services) are `benches/services.rs`'s.
//!
//! Run as root: `cargo bench --bench lb [-- --rounds N]` (N rounds of each kind). Per round: a ping from the lab's
//! switch every 20 ms is started, the Service is created (`kubectl apply`, counted from just
//! before the command), the first reply ends the round; then the time until the master's
//! `ferrovip.io/master` annotation names it; the Service is deleted and its address released
//! before the next. Target: median create → first ping ≤ 1.5 s.

#[allow(dead_code)]
mod common;
#[allow(dead_code)]
#[path = "../tests/k8s_util/mod.rs"]
mod k8s_util;

use std::time::{Duration, Instant};

use common::{median, rounds_arg};
use ferrovip_e2e::AGENT_GROUP;
use k8s_util::{K8sLab, text};
use serde_json::{Value, json};

const POOL_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_loadbalancerpools.yaml"
);

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let rounds = rounds_arg(9);
    let mut c = K8sLab::new(2);
    c.install();
    c.kubectl(&["apply", "-f", POOL_CRD]);
    c.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=30s",
        "crd/loadbalancerpools.ferrovip.io",
    ]);
    c.apply(&json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "LoadBalancerPool",
        "metadata": {"name": "bench"},
        "spec": {
            "addresses": ["192.0.2.200-192.0.2.249"],
            "template": {
                "interface": "eth0",
                "vrrp": {"advertisementInterval": "100ms"},
                "priority": {"base": 100, "preferredNodes": [{"nodeName": "node-a", "weight": 50}]},
            },
        },
    }));
    // The agents' Service controller may hold the Lease (config/rbac's Role, bound to the
    // lab's agent identities as the chart binds it to the ServiceAccount).
    c.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "agents-lease", "namespace": "ferrovip-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferrovip-controller-lease"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP}],
    }));
    c.start_agents();

    let mut report = Vec::new();
    for end_to_end in [true, false] {
        let (pings, annotations) = measure(&mut c, rounds, end_to_end);
        report.push((end_to_end, pings, annotations));
    }
    for (end_to_end, pings, annotations) in report {
        let kind = if end_to_end {
            "end to end (the agents' controller allocates)"
        } else {
            "agents only (record written by the benchmark)"
        };
        let min = pings.iter().min().copied().unwrap_or_default();
        let max = pings.iter().max().copied().unwrap_or_default();
        println!(
            "{kind}: Service create → first ping via the address on the master ({rounds} rounds): median {}, min {}, max {} (target ≤ 1500 ms: {})",
            ms(median(pings.clone())),
            ms(min),
            ms(max),
            if median(pings) <= Duration::from_millis(1500) {
                "met"
            } else {
                "MISSED"
            }
        );
        println!(
            "{kind}: Service create → ferrovip.io/master annotation names the master: median {}",
            ms(median(annotations))
        );
    }
}

/// Rounds of one kind: (create → first ping, create → master annotation) per round.
fn measure(c: &mut K8sLab, rounds: usize, end_to_end: bool) -> (Vec<Duration>, Vec<Duration>) {
    let mut pings = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..rounds {
        // End to end: the lowest free address (every earlier Service is gone by then).
        let addr = if end_to_end {
            "192.0.2.200".to_string()
        } else {
            format!("192.0.2.{}", 201 + i % 49)
        };
        let name = format!("bench-{}-{i}", if end_to_end { "e2e" } else { "agents" });
        let annotations_json = if end_to_end {
            json!({})
        } else {
            json!({"ferrovip.io/allocated": format!("{addr}@bench")})
        };
        let mut pinger = c.spawn_ping(&addr, Duration::from_secs(10));
        let created = Instant::now();
        c.apply(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": "default",
                "annotations": annotations_json,
            },
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]},
        }));
        let (answered, replied) = pinger.wait();
        assert!(replied, "{addr} never answered");
        pings.push(answered.duration_since(created));
        let want = format!("{addr}=node-a");
        loop {
            let out = c.kubectl(&["get", "service", &name, "-n", "default", "-o", "json"]);
            let svc: Value = serde_json::from_str(&out).expect("json");
            if text(&svc["metadata"]["annotations"]["ferrovip.io/master"]) == want {
                annotations.push(created.elapsed());
                break;
            }
            assert!(created.elapsed() < Duration::from_secs(10), "no annotation");
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kubectl(&["delete", "service", &name, "-n", "default"]);
        c.wait_holders(&addr, &[], Duration::from_secs(5));
        eprintln!(
            "round {i} ({}): first ping {}, annotation {}",
            if end_to_end {
                "end to end"
            } else {
                "agents only"
            },
            ms(pings[i]),
            ms(annotations[i])
        );
    }
    (pings, annotations)
}
