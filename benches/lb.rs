//! Service of `type: LoadBalancer` → first ping answered through its address on the master:
//! the real `ferrovip agent` on two lab nodes (network namespaces) against a real
//! kube-apiserver v1.20 with etcd. The benchmark writes the allocation record
//! (`ferrovip.io/allocated`) in the Service it creates, as the Service controller's leader
//! would, so it measures the agents' side: watch delivery, planning, the new VRRP instance's
//! election (Master_Down_Interval of the preferred node, about 341 ms at 100 ms adverts), the
//! address and its gratuitous ARP. The controller's own latency (create → record) is
//! `benches/services.rs`'s.
//!
//! Run as root: `cargo bench --bench lb [-- --rounds N]`. Per round: a ping from the lab's
//! switch every 20 ms is started, the Service is created (`kubectl apply`, counted from just
//! before the command), the first reply ends the round; then the time until the master's
//! `ferrovip.io/master` annotation names it; the Service is deleted and its address released
//! before the next. Target: median create → first ping ≤ 1.5 s.

#[allow(dead_code)]
#[path = "../tests/k8s_util/mod.rs"]
mod k8s_util;

use std::time::{Duration, Instant};

use k8s_util::{K8sLab, text};
use serde_json::{Value, json};

const POOL_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_loadbalancerpools.yaml"
);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn main() {
    let mut rounds = 9usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--rounds" {
            rounds = args
                .next()
                .and_then(|v| v.parse().ok())
                .expect("--rounds N");
        }
    }
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
    c.start_agents();

    let mut pings = Vec::new();
    let mut annotations = Vec::new();
    for i in 0..rounds {
        let addr = format!("192.0.2.{}", 200 + i % 50);
        let name = format!("bench-{i}");
        let mut pinger = c.spawn_ping(&addr, Duration::from_secs(10));
        let created = Instant::now();
        c.apply(&json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": name,
                "namespace": "default",
                "annotations": {"ferrovip.io/allocated": format!("{addr}@bench")},
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
            "round {i}: first ping {}, annotation {}",
            ms(pings[i]),
            ms(annotations[i])
        );
    }
    let min = pings.iter().min().copied().unwrap_or_default();
    let max = pings.iter().max().copied().unwrap_or_default();
    println!(
        "Service create → first ping via the address on the master ({rounds} rounds): median {}, min {}, max {} (target ≤ 1500 ms: {})",
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
        "Service create → ferrovip.io/master annotation names the master: median {}",
        ms(median(annotations))
    );
}
