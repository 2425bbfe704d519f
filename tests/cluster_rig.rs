//! The real-cluster rig (`ferrovip_e2e::cluster::Cluster`) on its own: etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler and three nodes, each a network namespace with its
//! own containerd and kubelet (v1.20.2, built by e2e/cluster/build.sh), on one bridge.
//!
//! A hostNetwork DaemonSet of the rig's busybox image runs a Ready pod on every node (in the
//! node's network and UTS namespaces); a killed container is restarted by its kubelet; deleting
//! the DaemonSet removes its pods; and after the cluster is dropped nothing of it is left on the
//! machine. Needs root; the binaries are built (minutes, once) when missing.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrovip::lab::LabSpec;
use ferrovip_e2e::cluster::{Cluster, ClusterOptions, PAUSE_IMAGE};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/cluster/build.sh");
const APISERVER_BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const DAEMONSET: &str = "rig-smoke";
const LABEL: &str = "app=rig-smoke";
const TIMEOUT: Duration = Duration::from_secs(90);

mod cluster_util;
use cluster_util::wait_for;

fn json_of(cluster: &Cluster, args: &[&str]) -> Value {
    let out = cluster.kubectl_ok(args).expect("kubectl");
    serde_json::from_str(&out).expect("kubectl printed JSON")
}

fn pods(cluster: &Cluster) -> Vec<Value> {
    json_of(cluster, &["get", "pods", "-l", LABEL, "-o", "json"])["items"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// Node name → (pod name, container id, restart count) of the Ready pods.
fn ready_pods(cluster: &Cluster) -> BTreeMap<String, (String, String, u64)> {
    pods(cluster)
        .iter()
        .filter(|pod| is_ready(pod) && pod["metadata"]["deletionTimestamp"].is_null())
        .filter_map(|pod| {
            let status = &pod["status"]["containerStatuses"][0];
            Some((
                pod["spec"]["nodeName"].as_str()?.to_owned(),
                (
                    pod["metadata"]["name"].as_str()?.to_owned(),
                    status["containerID"].as_str()?.to_owned(),
                    status["restartCount"].as_u64()?,
                ),
            ))
        })
        .collect()
}

/// The pod log files of `pod` on node `node`, concatenated (kubelet writes them under the
/// node's own /var/log/pods).
fn pod_logs(cluster: &Cluster, node: usize, pod: &str) -> String {
    let mut text = String::new();
    let root = cluster.host_path(node, "/var/log/pods");
    let Ok(dirs) = std::fs::read_dir(&root) else {
        return text;
    };
    for dir in dirs.filter_map(Result::ok) {
        if !dir.file_name().to_string_lossy().contains(pod) {
            continue;
        }
        for file in walk(&dir.path()) {
            text.push_str(&std::fs::read_to_string(file).unwrap_or_default());
        }
    }
    text
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

fn daemonset(host_network: bool) -> Value {
    // PID 1 of a container ignores SIGTERM unless it handles it: trap it, so a deletion takes
    // well under the grace period. With NET_ADMIN only, it adds an address in the (node's)
    // network namespace; it writes the node's name to a hostPath under /run (per node) and
    // reports the ServiceAccount token the kubelet mounted.
    let script = "trap 'exit 0' TERM; \
                  echo \"started on $(/bin/busybox hostname)\"; \
                  /bin/busybox ip -4 addr show dev eth0; \
                  /bin/busybox ip addr add 198.51.100.1/32 dev lo 2>/dev/null || true; \
                  /bin/busybox hostname > /run/rig-smoke/node; \
                  [ -s /var/run/secrets/kubernetes.io/serviceaccount/token ] && echo token mounted; \
                  while :; do /bin/busybox sleep 1; done";
    json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": DAEMONSET, "namespace": "default"},
        "spec": {
            "selector": {"matchLabels": {"app": DAEMONSET}},
            "template": {
                "metadata": {"labels": {"app": DAEMONSET}},
                "spec": {
                    "hostNetwork": host_network,
                    "terminationGracePeriodSeconds": 10,
                    // Privileged: /proc/sys is writable (a sysctl of the node's namespace).
                    "initContainers": [{
                        "name": "sysctl",
                        "image": PAUSE_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/busybox", "sysctl", "-w", "net.ipv4.ip_nonlocal_bind=1"],
                        "securityContext": {"privileged": true},
                    }],
                    "containers": [{
                        "name": "main",
                        "image": PAUSE_IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/busybox", "sh", "-c", script],
                        "securityContext": {
                            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                            "readOnlyRootFilesystem": true,
                            "allowPrivilegeEscalation": false,
                        },
                        "volumeMounts": [{"name": "state", "mountPath": "/run/rig-smoke"}],
                        "readinessProbe": {
                            "exec": {"command": ["/bin/busybox", "true"]},
                            "periodSeconds": 1,
                        },
                    }],
                    "volumes": [{
                        "name": "state",
                        "hostPath": {"path": "/run/rig-smoke", "type": "DirectoryOrCreate"},
                    }],
                },
            },
        },
    })
}

#[test]
fn three_kubelet_nodes_run_a_daemonset_restart_containers_and_leave_nothing() {
    // Four lab namespaces: three kubelet nodes and a client on the same bridge.
    let defaults = ClusterOptions::default();
    let mut cluster = Cluster::start(ClusterOptions {
        lab: LabSpec {
            nodes: 4,
            ..defaults.lab.clone()
        },
        kube_nodes: 3,
        build_script: Some(BUILD_SCRIPT.into()),
        apiserver_build_script: Some(APISERVER_BUILD_SCRIPT.into()),
        ..defaults
    })
    .expect("start the cluster");
    eprintln!(
        "cluster of {} nodes Ready {:?} after start() (API server at {})",
        cluster.nodes().len(),
        cluster.start_time(),
        cluster.api_url()
    );

    // Every node registered itself, Ready, with its bridge address as InternalIP.
    let nodes = json_of(&cluster, &["get", "nodes", "-o", "json"]);
    let items = nodes["items"].as_array().expect("a node list");
    assert_eq!(
        items.len(),
        3,
        "the client namespace runs no kubelet: {nodes}"
    );
    assert_eq!(cluster.clients().len(), 1);
    let client = cluster.clients()[0].index;
    for info in cluster.nodes() {
        assert!(
            cluster
                .lab()
                .ping(client, info.ipv4.into(), Duration::from_secs(1))
                .unwrap(),
            "the client reaches {}",
            info.name
        );
    }
    for info in cluster.nodes() {
        let node = items
            .iter()
            .find(|n| n["metadata"]["name"] == info.name.as_str())
            .unwrap_or_else(|| panic!("{} is not registered: {nodes}", info.name));
        assert!(is_ready(node), "{} not Ready: {node}", info.name);
        let addresses = &node["status"]["addresses"];
        assert!(
            addresses
                .as_array()
                .into_iter()
                .flatten()
                .any(|a| a["type"] == "InternalIP" && a["address"] == info.ipv4.to_string()),
            "{}: {addresses}",
            info.name
        );
    }
    // Importing is idempotent and checked (the image is already the sandbox image).
    let pause = std::env::var_os("FERROVIP_KUBE_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(&std::env::var("HOME").unwrap())
                .join(".cache/ferrovip/kube-node-v1.20.2-ferrovip1")
        })
        .join("pause.tar");
    cluster.import_image(&pause, PAUSE_IMAGE).expect("import");
    assert!(
        cluster
            .import_image(&pause, "localhost/not-in-the-archive:1")
            .is_err(),
        "an image the archive does not hold must be reported missing"
    );

    // A hostNetwork DaemonSet: one Ready pod per node, in the node's network and UTS namespaces.
    let manifest = cluster.dir().join("daemonset.json");
    std::fs::write(&manifest, daemonset(true).to_string()).unwrap();
    cluster
        .kubectl_ok(&["apply", "-f", &manifest.display().to_string()])
        .expect("apply the DaemonSet");
    let started = Instant::now();
    let ready = wait_for("a Ready pod on every node", TIMEOUT, || {
        let ready = ready_pods(&cluster);
        (ready.len() == 3).then_some(ready)
    });
    eprintln!(
        "DaemonSet pods Ready on 3 nodes {:?} after apply",
        started.elapsed()
    );
    for (i, info) in cluster.nodes().iter().enumerate() {
        let (pod, _, _) = &ready[&info.name];
        let logs = wait_for("the pod's log", TIMEOUT, || {
            let logs = pod_logs(&cluster, i, pod);
            logs.contains(&info.ipv4.to_string()).then_some(logs)
        });
        assert!(
            logs.contains(&format!("started on {}", info.name)),
            "{logs}"
        );
        assert!(logs.contains("token mounted"), "{logs}");
        // The privileged init container's sysctl and the NET_ADMIN address are in the node's
        // network namespace; the hostPath is the node's own.
        let sysctl = cluster
            .exec_in_netns(i, &["cat", "/proc/sys/net/ipv4/ip_nonlocal_bind"])
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&sysctl.stdout).trim(), "1");
        let lo = cluster
            .exec_in_netns(i, &["ip", "-4", "addr", "show", "dev", "lo"])
            .unwrap();
        assert!(String::from_utf8_lossy(&lo.stdout).contains("198.51.100.1/32"));
        let written = std::fs::read_to_string(cluster.host_path(i, "/run/rig-smoke/node"))
            .expect("the pod's hostPath file, on the node's own /run");
        assert_eq!(written.trim(), info.name);
        let seen = cluster
            .exec_in_node(i, &["cat", "/run/rig-smoke/node"])
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&seen.stdout).trim(), info.name);
    }
    // The API server reaches the kubelets (by InternalIP) for logs.
    let (pod, _, _) = &ready[&cluster.nodes()[2].name];
    let logs = cluster.kubectl_ok(&["logs", pod, "-c", "main"]).unwrap();
    assert!(logs.contains("started on node-c"), "{logs}");

    // Kill node-b's container process: its kubelet starts a new container in the same pod.
    let node_b = cluster.nodes()[1].name.clone();
    let (pod, container_id, restarts) = ready[&node_b].clone();
    let pid = cluster
        .container_pid(1, &container_id)
        .expect("ctr tasks ls")
        .unwrap_or_else(|| panic!("no running task for {container_id}"));
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the container");
    let killed = Instant::now();
    let (_, new_id, new_restarts) = wait_for("the killed container restarted", TIMEOUT, || {
        ready_pods(&cluster)
            .get(&node_b)
            .filter(|(name, id, _)| *name == pod && *id != container_id)
            .cloned()
    });
    eprintln!(
        "killed container restarted and Ready {:?} after the kill",
        killed.elapsed()
    );
    assert_eq!(new_restarts, restarts + 1);
    assert!(cluster.container_pid(1, &new_id).unwrap().is_some());
    assert!(cluster.container_pid(1, &container_id).unwrap().is_none());

    // Deleting the DaemonSet stops its containers (SIGTERM handled: well under the 10 s grace
    // period) and removes its pods. A 1.20 kubelet deletes the pod object at its next status
    // sync after the volumes are unmounted: up to 10 s later.
    let running: Vec<(usize, String)> = cluster
        .nodes()
        .iter()
        .enumerate()
        .map(|(i, info)| {
            let (_, id, _) = &ready_pods(&cluster)[&info.name];
            (i, id.clone())
        })
        .collect();
    let deleted = Instant::now();
    cluster
        .kubectl_ok(&["delete", "daemonset", DAEMONSET, "--wait=false"])
        .expect("delete the DaemonSet");
    wait_for("the DaemonSet's containers stopped", TIMEOUT, || {
        running
            .iter()
            .all(|(i, id)| cluster.container_pid(*i, id).unwrap().is_none())
            .then_some(())
    });
    let stopped = deleted.elapsed();
    wait_for("the DaemonSet's pods gone", TIMEOUT, || {
        pods(&cluster).is_empty().then_some(())
    });
    eprintln!(
        "DaemonSet deleted: containers stopped after {stopped:?}, pods gone after {:?}",
        deleted.elapsed()
    );
    assert!(
        stopped < Duration::from_secs(5),
        "containers waited out their grace period"
    );

    // Pods on the nodes' CNI network (bridge + host-local), left running for the teardown.
    std::fs::write(&manifest, daemonset(false).to_string()).unwrap();
    cluster
        .kubectl_ok(&["apply", "-f", &manifest.display().to_string()])
        .expect("apply the DaemonSet again, without the host network");
    wait_for("a Ready pod network pod on every node", TIMEOUT, || {
        (ready_pods(&cluster).len() == 3).then_some(())
    });
    for pod in pods(&cluster) {
        let ip = pod["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            ip.starts_with("10.244."),
            "pod IP {ip:?} not from the node's CNI range"
        );
    }

    // Teardown leaves nothing: processes, namespaces, mounts, cgroups, sysctls, files.
    let footprint = cluster.footprint();
    let dropped = Instant::now();
    drop(cluster);
    eprintln!("cluster torn down in {:?}", dropped.elapsed());
    let left = footprint.leftovers();
    assert!(left.is_empty(), "left behind:\n{}", left.join("\n"));
}
