//! The README's control-plane VIP procedure ("Control-plane VIP (kubeadm, static pod)") on the
//! real-kubelet cluster rig (`ferrovip_e2e::cluster::Cluster`, three kubelet nodes and a client
//! namespace on one bridge), with the image `e2e/image/build.sh` builds.
//!
//! 1. On every node, as the README says: `ferrovip static-pod --virtualip …` into the directory
//!    the static pod mounts (`--manifests-dir /var/lib/ferrovip-cp`: node-private in the rig,
//!    where `/etc` is shared by the simulated nodes), `ferrovip static-pod --image …` into the
//!    kubelet's static pod directory; the same VIP, VRID and interface, the other nodes as
//!    unicast peers. The kubelets run the pods without the API server's help; their mirror pods
//!    appear in `kube-system`; one node holds the VIP and it answers ping from the client.
//! 2. The API server behind the VIP. The rig has one API server, in the switch namespace on the
//!    bridge address; "an API server on every control-plane node" is simulated by an nftables
//!    DNAT in each node's network namespace from VIP:<api port> to the bridge address (with
//!    masquerade, so replies come back through the node that holds the VIP, and forwarding on).
//!    A client in the client namespace runs `kubectl --server https://VIP:PORT
//!    --tls-server-name <bridge address>` in a loop while the master's agent container is
//!    SIGKILLed: the VIP moves to a backup, the kubelet restarts the container, the requests keep
//!    succeeding (failures and the longest failing stretch are printed and bounded).
//! 3. Removing the static pod manifests (as an admin would): the kubelets stop the agents with
//!    SIGTERM, which in standalone mode releases; no node holds the VIP, no agent container runs.
//!
//! The nft tables are deleted at the end; the cluster's drop removes the rest.

mod cluster_util;

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cluster_util::*;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 150);
const VRID: u8 = 42;
/// The node-private host directory of the VirtualIP manifest.
const MANIFESTS_DIR: &str = "/var/lib/ferrovip-cp";
/// The agent's state directory (static-pod's default).
const STATE_DIR: &str = "/run/ferrovip-cp";
/// The nftables table of the simulated per-node API server.
const NAT_TABLE: &str = "cpvip_apiserver";
const STEP_TIMEOUT: Duration = Duration::from_secs(90);

#[test]
fn control_plane_vip_as_static_pods_survives_a_master_kill_with_the_api_server_behind_it() {
    HelmCluster::start().run(STATIC_POD_LOGS, run, |hc| {
        for node in 0..hc.cluster.nodes().len() {
            let _ = hc
                .cluster
                .exec_in_netns(node, &["nft", "delete", "table", "ip", NAT_TABLE]);
        }
    });
}

/// Where the kubelet keeps the static pods' logs: `/var/log/pods/kube-system_ferrovip-*`.
const STATIC_POD_LOGS: &str = "kube-system_ferrovip";

/// `ferrovip static-pod ARGS` (the binary under test); its stdout.
fn static_pod(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovip"))
        .arg("static-pod")
        .args(args)
        .output()
        .expect("run ferrovip static-pod");
    assert!(
        out.status.success(),
        "ferrovip static-pod {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

/// The mirror pod of node `node`'s static pod: (containerID of the agent, restarts, ready).
fn mirror_pod(hc: &HelmCluster, node: usize) -> Option<(Option<String>, u64, bool)> {
    let name = format!("ferrovip-{}", hc.cluster.nodes()[node].name);
    let out = hc
        .cluster
        .kubectl(&["-n", "kube-system", "get", "pod", &name, "-o", "json"])
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let pod: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    assert_eq!(
        pod["metadata"]["annotations"]["kubernetes.io/config.source"], "file",
        "{name} is the mirror of a static pod"
    );
    let status = pod["status"]["containerStatuses"]
        .as_array()
        .and_then(|s| s.iter().find(|c| c["name"] == "ferrovip"))
        .cloned()
        .unwrap_or_default();
    Some((
        status["containerID"].as_str().map(str::to_owned),
        status["restartCount"].as_u64().unwrap_or(0),
        is_ready(&pod),
    ))
}

/// Whether node `node`'s containerd runs a container of `image` (the agent; the init container
/// has exited).
fn agent_running(hc: &HelmCluster, node: usize, image: &str) -> bool {
    let out = hc
        .cluster
        .ctr(node, &["containers", "ls"])
        .expect("ctr containers ls");
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .skip(1)
        .filter_map(|l| {
            let mut fields = l.split_whitespace();
            let id = fields.next()?;
            (fields.next()? == image).then(|| id.to_owned())
        })
        .collect();
    ids.iter().any(|id| {
        hc.cluster
            .container_pid(node, id)
            .expect("ctr tasks ls")
            .is_some()
    })
}

/// One kubectl request through the VIP from the client namespace.
struct Attempt {
    at: Instant,
    took: Duration,
    ok: bool,
    error: String,
}

/// `kubectl get --raw /api/v1/nodes` against https://VIP:<api port> from the client, in a loop
/// until `stop`.
fn api_loop(hc: &HelmCluster, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<Attempt>> {
    let netns = hc.cluster.lab().node(hc.client()).netns.clone();
    let kubeconfig = hc.cluster.admin_kubeconfig().to_owned();
    let server = format!("https://{VIP}:{}", hc.cluster.api_port());
    let tls_name = hc.cluster.api_host().to_string();
    let cache = hc.cluster.dir().join("cpvip-kubectl-cache");
    std::thread::spawn(move || {
        let mut attempts = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let at = Instant::now();
            let out = Command::new("nsenter")
                .arg(format!("--net=/run/netns/{netns}"))
                .args(["--", "kubectl", "--kubeconfig"])
                .arg(&kubeconfig)
                .args(["--server", &server, "--tls-server-name", &tls_name])
                .arg("--cache-dir")
                .arg(&cache)
                .args(["--request-timeout", "2s", "get", "--raw", "/api/v1/nodes"])
                .output()
                .expect("run kubectl");
            let ok = out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("\"NodeList\"");
            attempts.push(Attempt {
                at,
                took: at.elapsed(),
                ok,
                error: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
            std::thread::sleep(Duration::from_millis(50));
        }
        attempts
    })
}

fn run(hc: &HelmCluster) {
    let nodes: Vec<(String, Ipv4Addr)> = hc
        .cluster
        .nodes()
        .iter()
        .map(|n| (n.name.clone(), n.ipv4))
        .collect();
    let image = format!("{}:{}", hc.repository, hc.tag);
    let bridge = hc.cluster.api_host();
    let port = hc.cluster.api_port();

    // --- 1. The README's files on every node; the kubelets run the pods.
    let started = Instant::now();
    for (i, (name, _)) in nodes.iter().enumerate() {
        let mut common: Vec<String> = [
            "--node-name",
            name,
            "--interface",
            "eth0",
            "--address",
            &format!("{VIP}/24"),
            "--vrid",
            &VRID.to_string(),
            "--manifests-dir",
            MANIFESTS_DIR,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (j, (_, peer)) in nodes.iter().enumerate() {
            if j != i {
                common.extend(["--unicast-peer".to_owned(), peer.to_string()]);
            }
        }
        let dir = hc.cluster.host_path(i, MANIFESTS_DIR);
        std::fs::create_dir_all(&dir).expect("create the manifests dir");
        let mut vip_args = vec!["--virtualip".to_owned()];
        vip_args.extend(common.iter().cloned());
        std::fs::write(dir.join("control-plane.yaml"), static_pod(&vip_args))
            .expect("write the VirtualIP");
        let mut pod_args = vec!["--image".to_owned(), image.clone()];
        pod_args.extend(common);
        let pod = static_pod(&pod_args);
        assert!(pod.contains(STATE_DIR), "state dir {STATE_DIR} in\n{pod}");
        // No imagePullPolicy: the tag is not `latest`, so IfNotPresent, and the image is
        // imported on every node.
        std::fs::write(hc.cluster.pod_manifest_dir(i).join("ferrovip.yaml"), pod)
            .expect("write the static pod");
    }
    let master = wait_for(
        "exactly one node holding the VIP",
        STEP_TIMEOUT,
        || match hc.holders(VIP).as_slice() {
            [one] => Some(*one),
            _ => None,
        },
    );
    eprintln!(
        "static pods written → VIP on {} after {:?}",
        nodes[master].0,
        started.elapsed()
    );
    assert!(hc.ping(VIP), "the VIP {VIP} does not answer ping");
    wait_for("three Ready mirror pods", STEP_TIMEOUT, || {
        (0..nodes.len())
            .all(|i| mirror_pod(hc, i).is_some_and(|(id, _, ready)| id.is_some() && ready))
            .then_some(())
    });
    eprintln!("three mirror pods Ready after {:?}", started.elapsed());
    assert_eq!(hc.holders(VIP), [master], "one holder of the VIP");

    // --- 2. The API server through the VIP while the master's agent is killed.
    for i in 0..nodes.len() {
        hc.exec(i, &["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        hc.exec(i, &["sysctl", "-qw", "net.ipv4.conf.all.send_redirects=0"]);
        hc.exec(i, &["sysctl", "-qw", "net.ipv4.conf.eth0.send_redirects=0"]);
        let rules = format!(
            "table ip {NAT_TABLE} {{\n\
             chain pre {{ type nat hook prerouting priority dstnat; ip daddr {VIP} tcp dport {port} dnat to {bridge}:{port}; }}\n\
             chain post {{ type nat hook postrouting priority srcnat; ip daddr {bridge} tcp dport {port} ct status dnat masquerade; }}\n\
             }}\n"
        );
        let file = hc.cluster.dir().join(format!("cpvip-nat-{i}.nft"));
        std::fs::write(&file, rules).expect("write nft rules");
        hc.exec(i, &["nft", "-f", file.to_str().expect("utf-8")]);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let requests = api_loop(hc, stop.clone());
    std::thread::sleep(Duration::from_secs(3));

    let (id, restarts_before, _) = mirror_pod(hc, master).expect("the master's mirror pod");
    let id = id.expect("the master's agent runs");
    let pid = hc
        .cluster
        .container_pid(master, &id)
        .expect("ctr tasks")
        .expect("the agent task runs");
    let killed = Instant::now();
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the agent");
    // Taken over: a backup holds the VIP (the dead agent's address may still be there until
    // its lifetime runs out); alone: it has.
    let mut taken_over = None;
    let backup = wait_for("the VIP on a backup alone", STEP_TIMEOUT, || {
        let holders = hc.holders(VIP);
        if taken_over.is_none() && holders.iter().any(|&h| h != master) {
            taken_over = Some(killed.elapsed());
        }
        match holders.as_slice() {
            [one] if *one != master => Some(*one),
            _ => None,
        }
    });
    let alone = killed.elapsed();
    eprintln!(
        "master {}'s agent SIGKILLed → VIP on {} after {:?}, on it alone (the dead agent's address expired) after {alone:?}",
        nodes[master].0,
        nodes[backup].0,
        taken_over.expect("set before alone")
    );
    wait_for("the kubelet restarting the agent", STEP_TIMEOUT, || {
        mirror_pod(hc, master)
            .filter(|(_, restarts, ready)| *restarts > restarts_before && *ready)
            .map(|_| ())
    });
    let restarted = killed.elapsed();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, Ordering::Relaxed);
    let attempts = requests.join().expect("the kubectl loop");
    let holder_after = hc.holders(VIP);
    eprintln!(
        "kubelet restarted the agent ({restarted:?} after the kill); VIP now on {holder_after:?}"
    );
    assert_eq!(holder_after.len(), 1, "one holder after the restart");

    let before_kill = attempts.iter().filter(|a| a.at < killed).count();
    let ok_before = attempts.iter().filter(|a| a.at < killed && a.ok).count();
    let after: Vec<&Attempt> = attempts.iter().filter(|a| a.at >= killed).collect();
    let failed: Vec<&&Attempt> = after.iter().filter(|a| !a.ok).collect();
    // The longest stretch from the first failing request's start to the next success's start.
    let mut longest = Duration::ZERO;
    let mut since: Option<Instant> = None;
    for a in &after {
        match (a.ok, since) {
            (false, None) => since = Some(a.at),
            (true, Some(s)) => {
                longest = longest.max(a.at - s);
                since = None;
            }
            _ => {}
        }
    }
    let slowest_before = attempts
        .iter()
        .filter(|a| a.at < killed)
        .map(|a| a.took)
        .max()
        .unwrap_or_default();
    let slowest_after = after.iter().map(|a| a.took).max().unwrap_or_default();
    eprintln!(
        "kubectl through https://{VIP}:{port}: before the kill {ok_before}/{before_kill} ok (slowest {slowest_before:?}); from the kill on {} requests (slowest {slowest_after:?}), {} failed, longest failing stretch {longest:?}; errors: {:?}",
        after.len(),
        failed.len(),
        failed.iter().map(|a| a.error.as_str()).collect::<Vec<_>>()
    );
    assert!(
        before_kill > 0 && ok_before == before_kill,
        "the API server answers through the VIP before the kill"
    );
    assert!(
        since.is_none(),
        "the last kubectl requests through the VIP failed"
    );
    assert!(after.len() >= 5, "too few requests after the kill");
    assert!(
        longest < Duration::from_secs(5),
        "the API server was unreachable through the VIP for {longest:?}"
    );
    assert!(hc.ping(VIP));

    // --- 3. The admin removes the static pod manifests: the agents release, no VIP anywhere.
    let removed = Instant::now();
    for i in 0..nodes.len() {
        std::fs::remove_file(hc.cluster.pod_manifest_dir(i).join("ferrovip.yaml"))
            .expect("remove the static pod");
    }
    wait_for("no agent container on any node", STEP_TIMEOUT, || {
        (0..nodes.len())
            .all(|i| !agent_running(hc, i, &image))
            .then_some(())
    });
    let stopped = removed.elapsed();
    let held = hc.holders(VIP);
    eprintln!("static pods removed → agents stopped after {stopped:?}; VIP held by {held:?}");
    assert!(held.is_empty(), "the VIP outlived its agents on {held:?}");
    // Released on SIGTERM (standalone mode, no restart hold), not left to the lifetime.
    let last = holder_after[0];
    let log = hc.pod_logs(last, STATIC_POD_LOGS);
    assert!(
        log.contains("sending priority 0 and releasing addresses"),
        "the master's agent did not release on SIGTERM:\n{}",
        tail(&log, 20)
    );
    // Nothing comes back, and no node holds any address beyond its own.
    std::thread::sleep(Duration::from_secs(2));
    for (i, (_, own)) in nodes.iter().enumerate() {
        let addrs = hc.exec(i, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        let extra: Vec<&str> = addrs
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter(|a| !a.starts_with(&format!("{own}/")))
            .collect();
        assert!(extra.is_empty(), "node {i} still holds {extra:?}");
    }
    assert!(
        !hc.ping(VIP),
        "the VIP answers after the static pods were removed"
    );
    wait_for("the mirror pods gone", STEP_TIMEOUT, || {
        (0..nodes.len())
            .all(|i| mirror_pod(hc, i).is_none())
            .then_some(())
    });
}
