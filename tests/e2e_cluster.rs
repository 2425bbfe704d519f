//! `helm install` of charts/ferrovip on a real cluster: kube-apiserver, controller-manager,
//! scheduler and three kubelet nodes (containerd + runc) built on this machine
//! (`ferrovip_e2e::cluster`), the image built from the Containerfile, and the real Helm 3 CLI.
//!
//! One cluster, one sequence (each step starts from the previous one's state):
//! 1. `helm install` with a VirtualIP and a LoadBalancerPool as initial objects (created by
//!    the chart's hooks after its wait-for-crds Job, which runs here on a kubelet): three agent
//!    pods Ready with the chart's ServiceAccount and RBAC (a missing rule fails here: the
//!    agents cannot list or elect); the VirtualIP answers ping from a client namespace on its
//!    preferred node; a Service of type LoadBalancer gets an address from the pool and
//!    answers HTTP there.
//! 2. SIGKILL of the master's agent container: the VIP moves to a backup, the kubelet restarts
//!    the container, the VIP comes back to its preferred node, and only one node holds it.
//! 3. `helm upgrade` with a changed value: a rolling restart, one node at a time (never two
//!    agent pods missing), during which a ping every 20 ms to the VIP loses nothing
//!    (restartHold: the pod going away keeps the address until its successor takes it over).
//! 4. `helm uninstall`: no agent pods, and on every node no ferrovip address, nftables table,
//!    link or state file; the CRDs and the user's VirtualIP and pool remain.
//!
//! Then the cluster is dropped and nothing of it is left on the machine.

mod cluster_util;

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use cluster_util::*;

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
const POOL_FIRST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 200);
const POOL_LAST: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 209);
const ECHO_PORT: u16 = 18080;
const PREFERRED: usize = 0;
const INSTALL_TIMEOUT: Duration = Duration::from_secs(180);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const POD_GONE_TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn helm_install_kill_upgrade_and_uninstall_on_a_real_cluster() {
    HelmCluster::start().run(NAMESPACE, run, |_| {});
}

fn run(hc: &HelmCluster) {
    let nodes: Vec<String> = hc.cluster.nodes().iter().map(|n| n.name.clone()).collect();

    // --- 1. helm install with a VirtualIP and a pool as the chart's initial objects, then a
    // Service of type LoadBalancer.
    let (vip, lb_pool) = (
        virtual_ip("web", VIP, 51, &nodes[PREFERRED]),
        pool("web", POOL_FIRST, POOL_LAST),
    );
    let initial = hc.cluster.dir().join("initial-objects.json");
    std::fs::write(
        &initial,
        serde_json::json!({
            "virtualIPs": [{"name": "web", "spec": vip["spec"]}],
            "loadBalancerPools": [{"name": "web", "spec": lb_pool["spec"]}],
        })
        .to_string(),
    )
    .expect("write the values file");
    let started = Instant::now();
    hc.helm_apply_with("install", &[&initial], &[]);
    // Created by the post-install hooks, after the wait-for-crds Job (the CRDs were created
    // by the same install); the Job is gone once it succeeded.
    hc.kubectl(&["get", "virtualip", "web"]);
    hc.kubectl(&["get", "loadbalancerpool", "web"]);
    assert_eq!(
        hc.kubectl(&["-n", NAMESPACE, "get", "jobs", "-o", "name"])
            .trim(),
        "",
        "the wait-for-crds Job outlived its success"
    );
    eprintln!(
        "helm install (with initial objects) returned after {:?}",
        started.elapsed()
    );
    hc.wait_agents_ready(None, INSTALL_TIMEOUT);
    eprintln!("helm install → 3 agents Ready: {:?}", started.elapsed());
    let sa = hc.json(&["-n", NAMESPACE, "get", "daemonset", RELEASE]);
    assert_eq!(
        sa["spec"]["template"]["spec"]["serviceAccountName"], RELEASE,
        "the agents run as the chart's ServiceAccount"
    );

    hc.wait_holder(VIP, PREFERRED, STEP_TIMEOUT);
    assert!(hc.ping(VIP), "the VIP {VIP} does not answer ping");
    eprintln!("helm install → VIP answering: {:?}", started.elapsed());
    wait_for("VirtualIP status naming the master", STEP_TIMEOUT, || {
        let vip = hc.json(&["get", "virtualip", "web"]);
        (vip["status"]["master"].as_str() == Some(nodes[PREFERRED].as_str())).then_some(())
    });

    hc.deploy_echo(ECHO_PORT);
    hc.apply(&lb_service("web", ECHO_PORT));
    let lb = wait_for("the Service's load-balancer address", STEP_TIMEOUT, || {
        ingress_ip(&hc.json(&["-n", "default", "get", "service", "web"]))
    });
    assert!(
        (u32::from(POOL_FIRST)..=u32::from(POOL_LAST)).contains(&u32::from(lb)),
        "{lb} is not from the pool"
    );
    let holder = wait_for(
        "one node holding the Service's address",
        STEP_TIMEOUT,
        || match hc.holders(lb).as_slice() {
            [one] => Some(*one),
            _ => None,
        },
    );
    assert!(hc.ping(lb), "the Service address {lb} does not answer ping");
    let answered = wait_for("the Service answering HTTP", STEP_TIMEOUT, || {
        hc.http_hostname(lb, ECHO_PORT)
    });
    assert_eq!(
        answered, nodes[holder],
        "the Service's address is answered by the node holding it"
    );

    // --- 2. kill the master's agent container.
    let before = hc.agent_pods()[&PREFERRED].clone();
    let pinger = hc.pinger(VIP, Duration::from_millis(20));
    let killed = hc.kill_agent(PREFERRED);
    let moved = wait_for("the VIP on a backup", STEP_TIMEOUT, || {
        let holders = hc.holders(VIP);
        (holders.len() == 1 && holders[0] != PREFERRED).then(|| killed.elapsed())
    });
    eprintln!("master's agent killed → VIP on a backup alone after {moved:?}");
    wait_for("the kubelet restarting the agent", STEP_TIMEOUT, || {
        hc.agent_pods()
            .get(&PREFERRED)
            .filter(|p| p.restarts > before.restarts && p.ready && p.uid == before.uid)
            .map(|_| ())
    });
    let back = hc.wait_holder(VIP, PREFERRED, STEP_TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    let pings = pinger.stop();
    eprintln!(
        "restarted agent took the VIP back ({back:?} after Ready); pings during kill and restart: {} sent, {} lost",
        pings.sent,
        pings.lost()
    );
    assert_eq!(hc.holders(VIP), [PREFERRED], "one holder after the restart");
    assert_eq!(
        hc.holders(lb).len(),
        1,
        "one holder of {lb} after the restart"
    );
    assert!(hc.ping(VIP));

    // --- 3. helm upgrade with a changed value: rolling restart, VIP keeps answering.
    let old_revision = hc.agent_pods()[&0].revision.clone();
    let pinger = hc.pinger(VIP, Duration::from_millis(20));
    let upgrade_started = Instant::now();
    let pings_started = pinger.started;
    hc.helm_apply("upgrade", &["logFormat=text"]);
    let mut max_missing = 0;
    // Each node's agent pod as the upgrade replaces it (absent = terminating or gone), with
    // the time since the upgrade began: where a loss falls in it tells which node's
    // hand-off lost it.
    let mut seen: Vec<Option<(String, bool)>> = vec![None; nodes.len()];
    let mut timeline = Vec::new();
    let new_revision = wait_for(
        "every agent pod of the new revision, Ready",
        INSTALL_TIMEOUT,
        || {
            let pods = hc.agent_pods();
            for (node, last) in seen.iter_mut().enumerate() {
                let now = pods.get(&node).map(|p| (p.name.clone(), p.ready));
                if now != *last {
                    let what = match &now {
                        Some((name, true)) => format!("{name} Ready"),
                        Some((name, false)) => format!("{name} not Ready"),
                        None => "no pod".to_owned(),
                    };
                    let at = upgrade_started.elapsed().as_secs_f64();
                    timeline.push(format!("+{at:.2}s {}: {what}", nodes[node]));
                    *last = now;
                }
            }
            let ready = pods.values().filter(|p| p.ready).count();
            max_missing = max_missing.max(nodes.len() - ready);
            let revisions: std::collections::BTreeSet<&str> =
                pods.values().map(|p| p.revision.as_str()).collect();
            (pods.len() == nodes.len()
                && ready == nodes.len()
                && revisions.len() == 1
                && !revisions.contains(old_revision.as_str()))
            .then(|| revisions.into_iter().next().unwrap_or_default().to_owned())
        },
    );
    let upgrade_time = upgrade_started.elapsed();
    hc.wait_holder(VIP, PREFERRED, STEP_TIMEOUT);
    std::thread::sleep(Duration::from_millis(500));
    let pings = pinger.stop();
    let lost = pings.lost();
    eprintln!(
        "helm upgrade: revision {old_revision} → {new_revision} in {upgrade_time:?}, at most {max_missing} agent(s) not Ready at once; pings every 20 ms: {} sent, {lost} lost\n  pods: {}",
        pings.sent,
        timeline.join(", ")
    );
    assert!(
        max_missing <= 1,
        "the rolling update took {max_missing} agents down at once"
    );
    assert!(
        pings.sent as f64 >= upgrade_time.as_secs_f64() / 0.020 / 2.0,
        "the ping stalled: {} sent in {upgrade_time:?}",
        pings.sent
    );
    assert_eq!(
        lost,
        0,
        "pings to the VIP were lost during helm upgrade: {} (after the upgrade began; pods: {})",
        pings.loss_windows(pings_started),
        timeline.join(", ")
    );
    assert_eq!(
        hc.holders(lb).len(),
        1,
        "one holder of {lb} after the upgrade"
    );

    // --- 4. helm uninstall: nothing left on the nodes; CRDs and user objects stay.
    hc.helm_ok(&["uninstall", RELEASE, "--namespace", NAMESPACE]);
    wait_for("every agent container stopped", STEP_TIMEOUT, || {
        (hc.running_agent_containers() == 0).then_some(())
    });
    // The pod objects go once each kubelet's status sync confirms (kubelet 1.20 has been seen
    // to take over a minute for one of them, its container long stopped).
    wait_for("no agent pods", POD_GONE_TIMEOUT, || {
        (hc.all_agent_pods() == 0).then_some(())
    });
    // Addresses carry a lifetime of about a second: allow it to run out before judging.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = (0..nodes.len())
            .flat_map(|i| {
                hc.node_leftovers(i)
                    .into_iter()
                    .map(move |l| format!("node {i}: {l}"))
            })
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "helm uninstall left on the nodes: {left:?}"
        );
        std::thread::sleep(POLL);
    }
    assert!(!hc.ping(VIP), "the VIP still answers after helm uninstall");
    for crd in ["virtualips.ferrovip.io", "loadbalancerpools.ferrovip.io"] {
        hc.kubectl(&["get", "crd", crd]);
    }
    hc.kubectl(&["get", "virtualip", "web"]);
    hc.kubectl(&["get", "loadbalancerpool", "web"]);
}
