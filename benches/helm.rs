//! `helm install` → first VIP answering, and pings lost during `helm upgrade`, on the
//! real-cluster rig (kube-apiserver, controller-manager, scheduler, three kubelet nodes with
//! containerd; see tests/cluster_util), with the image built from the Containerfile and the
//! real Helm 3 CLI.
//!
//! Run as root: `cargo bench --bench helm [-- --rounds N]`. One cluster; per round:
//! 1. `helm install` with one VirtualIP in the chart's values (created by the chart once the
//!    agents' CRDs exist), a ping from a client namespace every 20 ms: time from the start of
//!    `helm install` to the first reply;
//! 2. `helm upgrade` with a changed value (a rolling restart of every agent pod, one node at a
//!    time; `restartHold` at the chart's default), a ping every 20 ms to the VIP from just
//!    before the command until every pod of the new revision is Ready and the VIP is back on
//!    its preferred node: pings sent and lost;
//! 3. `helm uninstall`, then the VirtualIP (kept by the uninstall, as a user's object) is
//!    deleted, so the next round installs from nothing again.
//!
//! Prints each round and the medians. There is no reference to compare with in the same rig:
//! neither keepalived nor kube-vip/MetalLB images can be fetched here.

#[path = "../tests/cluster_util/mod.rs"]
mod cluster_util;
#[allow(dead_code)]
mod common;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cluster_util::*;
use common::{median, rounds_arg};

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const TIMEOUT: Duration = Duration::from_secs(180);

fn main() {
    let rounds = rounds_arg(5);
    let hc = HelmCluster::start();
    let preferred = hc.cluster.nodes()[0].name.clone();
    let vip_values = [
        "virtualIPs[0].name=bench".to_owned(),
        format!("virtualIPs[0].spec.addresses[0]={VIP}/24"),
        "virtualIPs[0].spec.interface=eth0".to_owned(),
        "virtualIPs[0].spec.virtualRouterId=51".to_owned(),
        "virtualIPs[0].spec.vrrp.advertisementInterval=100ms".to_owned(),
        "virtualIPs[0].spec.priority.base=100".to_owned(),
        format!("virtualIPs[0].spec.priority.preferredNodes[0].nodeName={preferred}"),
        "virtualIPs[0].spec.priority.preferredNodes[0].weight=50".to_owned(),
    ];
    let vip_values: Vec<&str> = vip_values.iter().map(String::as_str).collect();

    let mut installs = Vec::new();
    let mut losses = Vec::new();
    for round in 1..=rounds {
        // 1. install → first reply (a probe every ~20 ms: 100 ms timeout, or the next at once).
        let started = Instant::now();
        let installer = {
            let values = vip_values.clone();
            let hc = &hc;
            std::thread::scope(|s| {
                let install = s.spawn(move || hc.helm_apply("install", &values));
                let answered = wait_for("the VIP answering", TIMEOUT, || {
                    hc.ping_once(VIP).then(|| started.elapsed())
                });
                install.join().expect("helm install");
                answered
            })
        };
        hc.wait_agents_ready(None, TIMEOUT);
        hc.wait_holder(VIP, 0, TIMEOUT);

        // 2. upgrade with a ping every 20 ms.
        let old = hc.agent_pods()[&0].revision.clone();
        let pinger = hc.pinger(VIP, Duration::from_millis(20));
        let pinger_started = pinger.started;
        let upgrade_started = Instant::now();
        let mut values = vip_values.clone();
        // A pod-template change every round (an annotation), so every upgrade rolls.
        let flip = format!("podAnnotations.bench-round=r{round}");
        values.push(&flip);
        hc.helm_apply("upgrade", &values);
        wait_for("the rolling update to finish", TIMEOUT, || {
            let pods = hc.agent_pods();
            (pods.len() == hc.cluster.nodes().len()
                && pods.values().all(|p| p.ready && p.revision != old))
            .then_some(())
        });
        let upgrade_time = upgrade_started.elapsed();
        hc.wait_holder(VIP, 0, TIMEOUT);
        std::thread::sleep(Duration::from_millis(500));
        let pings = pinger.stop();
        println!(
            "round {round}: helm install → VIP answering {:.2} s; helm upgrade (rolling, {:.1} s): {} pings, {} lost {}",
            installer.as_secs_f64(),
            upgrade_time.as_secs_f64(),
            pings.sent,
            pings.lost(),
            pings.loss_windows(pinger_started)
        );
        installs.push(installer);
        losses.push(pings.lost());

        // 3. uninstall and forget the VIP.
        hc.helm_ok(&["uninstall", RELEASE, "--namespace", NAMESPACE]);
        wait_for("no agent pods", TIMEOUT, || {
            (hc.all_agent_pods() == 0).then_some(())
        });
        hc.kubectl(&["delete", "virtualip", "bench", "--ignore-not-found"]);
    }
    println!(
        "median over {rounds} rounds: helm install → first VIP reply {:.2} s; pings lost during helm upgrade {} (of one every 20 ms)",
        median(installs).as_secs_f64(),
        median(losses)
    );
}
