//! ferrovip installed with its Helm chart on the real-cluster rig
//! (`ferrovip_e2e::cluster::Cluster`: etcd, kube-apiserver, controller-manager, scheduler and
//! three kubelet nodes with containerd), shared by tests/e2e_cluster.rs and benches/helm.rs.
//!
//! The image is the one `e2e/image/build.sh` builds from the top-level Containerfile
//! (`FERROVIP_IMAGE_ARCHIVE`/`FERROVIP_IMAGE`, else built here), imported into every node's
//! containerd; Helm is the real Helm 3 CLI of `e2e/helm/install.sh` (`FERROVIP_HELM`). The agent
//! pods run as the chart says: its ServiceAccount and RBAC, capabilities, init container,
//! probes. The one departure from a production install is `apiServer.host`: the rig has no
//! kube-proxy, so the `kubernetes` Service address leads nowhere.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use ferrovip::lab::{LabSpec, PingTally, ping_command};
use ferrovip_e2e::cluster::{Cluster, ClusterOptions, PAUSE_IMAGE};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");
pub const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrovip");
pub const RELEASE: &str = "ferrovip";
pub const NAMESPACE: &str = "ferrovip-system";
pub const AGENT_LABEL: &str = "app.kubernetes.io/name=ferrovip";
pub const POLL: Duration = Duration::from_millis(100);

/// Polls `f` until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(POLL);
    }
}

/// Runs a script of the repository and returns its stdout lines; panics when it fails.
fn run_script(script: &str, args: &[&str]) -> Vec<String> {
    let out = Command::new("bash")
        .arg(Path::new(ROOT).join(script))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    assert!(out.status.success(), "{script} failed ({})", out.status);
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The Helm CLI: `FERROVIP_HELM`, else the one `e2e/helm/install.sh` caches.
pub fn helm_binary() -> &'static Path {
    static HELM: OnceLock<PathBuf> = OnceLock::new();
    HELM.get_or_init(|| match std::env::var_os("FERROVIP_HELM") {
        Some(path) => PathBuf::from(path),
        None => PathBuf::from(
            run_script("e2e/helm/install.sh", &[])
                .last()
                .expect("e2e/helm/install.sh printed a path"),
        ),
    })
}

/// Helm's stdout; panics with its output unless `helm ARGS` succeeded.
pub fn helm_succeeded(args: &[&str], out: Output) -> String {
    assert!(
        out.status.success(),
        "helm {} failed ({}): {}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image: (OCI archive, name) from `FERROVIP_IMAGE_ARCHIVE`/`FERROVIP_IMAGE`, else built
/// by `e2e/image/build.sh` (a release build of the agent first).
pub fn image() -> &'static (PathBuf, String) {
    static IMAGE: OnceLock<(PathBuf, String)> = OnceLock::new();
    IMAGE.get_or_init(|| {
        match (
            std::env::var_os("FERROVIP_IMAGE_ARCHIVE"),
            std::env::var("FERROVIP_IMAGE"),
        ) {
            (Some(archive), Ok(name)) => (PathBuf::from(archive), name),
            _ => {
                let lines = run_script("e2e/image/build.sh", &[]);
                assert!(lines.len() >= 2, "e2e/image/build.sh printed {lines:?}");
                (
                    PathBuf::from(&lines[lines.len() - 2]),
                    lines[lines.len() - 1].clone(),
                )
            }
        }
    })
}

/// The cluster, the chart's settings for it, and helpers.
pub struct HelmCluster {
    pub cluster: Cluster,
    /// `repository:tag` split for the chart.
    pub repository: String,
    pub tag: String,
    helm_home: PathBuf,
}

impl HelmCluster {
    /// Starts the cluster (three kubelet nodes and one client namespace on the bridge) and
    /// loads the image into every node.
    pub fn start() -> HelmCluster {
        let (archive, name) = image();
        let opts = ClusterOptions {
            lab: LabSpec {
                nodes: 4,
                ipv6: false,
                ..LabSpec::default()
            },
            kube_nodes: 3,
            build_script: Some(Path::new(ROOT).join("e2e/cluster/build.sh")),
            apiserver_build_script: Some(Path::new(ROOT).join("e2e/apiserver/build.sh")),
            ..ClusterOptions::default()
        };
        let cluster = Cluster::start(opts).expect("start the cluster");
        eprintln!("cluster ready in {:?}", cluster.start_time());
        cluster
            .import_image(archive, name)
            .expect("import the image");
        let (repository, tag) = name.rsplit_once(':').expect("image name has a tag");
        let helm_home = cluster.dir().join("helm");
        HelmCluster {
            repository: repository.to_owned(),
            tag: tag.to_owned(),
            helm_home,
            cluster,
        }
    }

    /// `helm ARGS` against the cluster (admin kubeconfig); the output, whatever the status.
    pub fn helm(&self, args: &[&str]) -> Output {
        Command::new(helm_binary())
            .args(args)
            .arg("--kubeconfig")
            .arg(self.cluster.host_admin_kubeconfig())
            .env("HELM_CONFIG_HOME", self.helm_home.join("config"))
            .env("HELM_CACHE_HOME", self.helm_home.join("cache"))
            .env("HELM_DATA_HOME", self.helm_home.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("run helm")
    }

    /// Like [`HelmCluster::helm`]; panics (with Helm's output) unless it succeeds.
    pub fn helm_ok(&self, args: &[&str]) -> String {
        helm_succeeded(args, self.helm(args))
    }

    /// The `--set` values every install here uses: the image loaded into the nodes, and the
    /// API server's address (no kube-proxy in the rig).
    pub fn base_values(&self) -> Vec<String> {
        vec![
            format!("image.repository={}", self.repository),
            format!("image.tag={}", self.tag),
            "image.pullPolicy=Never".to_owned(),
            format!("apiServer.host={}", self.cluster.api_host()),
            format!("apiServer.port={}", self.cluster.api_port()),
        ]
    }

    /// `helm install` (or `upgrade`) of the chart with the base values and `extra` `--set`s;
    /// does not wait for the pods.
    pub fn helm_apply(&self, verb: &str, extra: &[&str]) {
        self.helm_apply_with(verb, &[], extra)
    }

    /// [`HelmCluster::helm_apply`] with values files (`-f`) too.
    pub fn helm_apply_with(&self, verb: &str, files: &[&Path], extra: &[&str]) {
        let mut args: Vec<String> = vec![
            verb.to_owned(),
            RELEASE.to_owned(),
            CHART.to_owned(),
            "--namespace".to_owned(),
            NAMESPACE.to_owned(),
        ];
        if verb == "install" {
            args.push("--create-namespace".to_owned());
        }
        for value in self.base_values() {
            args.push("--set".to_owned());
            args.push(value);
        }
        for file in files {
            args.push("-f".to_owned());
            args.push(file.display().to_string());
        }
        for value in extra {
            args.push("--set".to_owned());
            args.push((*value).to_owned());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.helm_ok(&args);
    }

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.cluster.kubectl_ok(args).expect("kubectl")
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.kubectl(&all)).expect("kubectl printed JSON")
    }

    /// `kubectl apply` of a JSON document.
    pub fn apply(&self, doc: &Value) {
        let path = self.cluster.dir().join(format!("apply-{}.json", unique()));
        std::fs::write(&path, doc.to_string()).expect("write manifest");
        self.kubectl(&["apply", "-f", path.to_str().expect("utf-8")]);
    }

    /// The agent pods (not being deleted) by node index.
    pub fn agent_pods(&self) -> BTreeMap<usize, AgentPod> {
        let pods = self.json(&["-n", NAMESPACE, "get", "pods", "-l", AGENT_LABEL]);
        let mut found = BTreeMap::new();
        for pod in pods["items"].as_array().into_iter().flatten() {
            if !pod["metadata"]["deletionTimestamp"].is_null() {
                continue;
            }
            let Some(node) = pod["spec"]["nodeName"].as_str() else {
                continue;
            };
            let Some(index) = self.node_index(node) else {
                continue;
            };
            let status = pod["status"]["containerStatuses"]
                .as_array()
                .and_then(|s| s.iter().find(|c| c["name"] == "agent"))
                .cloned()
                .unwrap_or(Value::Null);
            found.insert(
                index,
                AgentPod {
                    name: pod["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                    uid: pod["metadata"]["uid"].as_str().unwrap_or("").to_owned(),
                    ready: is_ready(pod),
                    container_id: status["containerID"].as_str().map(str::to_owned),
                    restarts: status["restartCount"].as_u64().unwrap_or(0),
                    revision: pod["metadata"]["labels"]["controller-revision-hash"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                },
            );
        }
        found
    }

    /// Every pod in the agent's namespace, being deleted or not (for "none left").
    pub fn all_agent_pods(&self) -> usize {
        self.json(&["-n", NAMESPACE, "get", "pods", "-l", AGENT_LABEL])["items"]
            .as_array()
            .map_or(0, Vec::len)
    }

    /// Agent containers that still run, as the kubelets report them (pods being deleted too).
    pub fn running_agent_containers(&self) -> usize {
        self.json(&["-n", NAMESPACE, "get", "pods", "-l", AGENT_LABEL])["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|pod| pod["status"]["containerStatuses"].as_array().cloned())
            .flatten()
            .filter(|c| !c["state"]["running"].is_null())
            .count()
    }

    /// Waits until every node runs a Ready agent pod (of `revision`, when given).
    pub fn wait_agents_ready(&self, revision: Option<&str>, timeout: Duration) {
        let n = self.cluster.nodes().len();
        wait_for(
            &format!("{n} Ready agent pods (revision {revision:?})"),
            timeout,
            || {
                let pods = self.agent_pods();
                (pods.len() == n
                    && pods
                        .values()
                        .all(|p| p.ready && revision.is_none_or(|r| p.revision == r)))
                .then_some(())
            },
        );
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.cluster.nodes().iter().position(|n| n.name == name)
    }

    /// The client namespace's lab index (the fourth lab node: no kubelet).
    pub fn client(&self) -> usize {
        self.cluster.nodes().len()
    }

    /// Whether the client's ping of `addr` is answered (three tries of one second).
    pub fn ping(&self, addr: Ipv4Addr) -> bool {
        (0..3).any(|_| {
            self.cluster
                .lab()
                .ping(self.client(), addr.into(), Duration::from_secs(1))
                .unwrap_or(false)
        })
    }

    /// One echo request from the client, answered within 100 ms.
    pub fn ping_once(&self, addr: Ipv4Addr) -> bool {
        self.cluster
            .lab()
            .ping(self.client(), addr.into(), Duration::from_millis(100))
            .unwrap_or(false)
    }

    /// Kubelet nodes whose `eth0` holds `addr`.
    pub fn holders(&self, addr: Ipv4Addr) -> Vec<usize> {
        (0..self.cluster.nodes().len())
            .filter(|&i| {
                self.cluster
                    .lab()
                    .has_address(i, addr.into())
                    .unwrap_or(false)
            })
            .collect()
    }

    /// Waits until exactly `node` holds `addr`; returns how long that took.
    pub fn wait_holder(&self, addr: Ipv4Addr, node: usize, timeout: Duration) -> Duration {
        let started = Instant::now();
        wait_for(&format!("{addr} on node {node} alone"), timeout, || {
            (self.holders(addr) == [node]).then_some(())
        });
        started.elapsed()
    }

    /// A ping from the client every `interval` until [`Pinger::stop`].
    pub fn pinger(&self, addr: Ipv4Addr, interval: Duration) -> Pinger {
        let netns = &self.cluster.lab().node(self.client()).netns;
        let started = SystemTime::now();
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .arg("--")
            .args(ping_command(interval, addr.into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ping");
        // Read as it comes: a line per reply fills a pipe in about 800 replies, and a ping
        // blocked on its output sends nothing more.
        let mut stdout = child.stdout.take().expect("ping's stdout");
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        Pinger {
            child: Some(child),
            reader: Some(reader),
            started,
        }
    }

    /// What node `node` has that ferrovip may have put there: addresses on `eth0` other than
    /// the node's own, nftables tables, virtual-MAC links, files in the agent's state dir.
    pub fn node_leftovers(&self, node: usize) -> Vec<String> {
        let mut found = Vec::new();
        let own = self.cluster.nodes()[node].ipv4;
        let addrs = self.exec(node, &["ip", "-o", "-4", "addr", "show", "dev", "eth0"]);
        for line in addrs.lines() {
            if let Some(addr) = line.split_whitespace().nth(3)
                && !addr.starts_with(&format!("{own}/"))
            {
                found.push(format!("address {addr}"));
            }
        }
        let tables = self.exec(node, &["nft", "list", "tables"]);
        for table in tables.lines().filter(|l| l.contains("ferrovip")) {
            found.push(format!("nftables {table}"));
        }
        let links = self.exec(node, &["ip", "-o", "link", "show"]);
        for link in links.lines() {
            let name = link.split(": ").nth(1).unwrap_or("");
            if name.starts_with("fv") || name.contains("vrrp") {
                found.push(format!("link {name}"));
            }
        }
        // node-setup's record of the sysctls it set stays: the agent's /proc/sys is read-only,
        // so only `ferrovip cleanup` on the node can put them back (README, Operations).
        let state = self.cluster.host_path(node, "/run/ferrovip");
        for entry in std::fs::read_dir(&state).into_iter().flatten().flatten() {
            if entry.file_name() != "sysctls-node-setup" {
                found.push(format!("state file {}", entry.path().display()));
            }
        }
        found
    }

    /// Runs `args` in node `node`'s network namespace; its stdout (panics when it fails).
    pub fn exec(&self, node: usize, args: &[&str]) -> String {
        let out = self.cluster.exec_in_netns(node, args).expect("exec");
        assert!(
            out.status.success(),
            "`{}` on node {node} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The agent log of node `node` (its pod log files, every container run), for failures.
    pub fn agent_log(&self, node: usize) -> String {
        self.pod_logs(node, NAMESPACE)
    }

    /// The log files of node `node`'s pods whose directory under `/var/log/pods`
    /// (`<namespace>_<pod>_<uid>`) starts with `prefix`, every container run, each headed by
    /// its path.
    pub fn pod_logs(&self, node: usize, prefix: &str) -> String {
        let root = self.cluster.host_path(node, "/var/log/pods");
        let mut text = String::new();
        for dir in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            if !dir.file_name().to_string_lossy().starts_with(prefix) {
                continue;
            }
            for file in walk(&dir.path()) {
                text.push_str(&format!("--- {}\n", file.display()));
                text.push_str(&std::fs::read_to_string(&file).unwrap_or_default());
            }
        }
        text
    }

    /// Runs `test` on the cluster, then `after` (whatever happened). When `test` panics,
    /// prints the tail of each node's logs of pods under `log_prefix` and every pod, drops the
    /// cluster and goes on panicking; otherwise drops the cluster and asserts that nothing of
    /// it is left on the machine.
    pub fn run(
        mut self,
        log_prefix: &str,
        test: impl FnOnce(&HelmCluster),
        after: impl FnOnce(&HelmCluster),
    ) {
        let footprint = self.cluster.footprint();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| test(&self)));
        after(&self);
        if let Err(panic) = result {
            for node in 0..self.cluster.nodes().len() {
                eprintln!(
                    "=== logs of {log_prefix}* on node {node}\n{}",
                    tail(&self.pod_logs(node, log_prefix), 60)
                );
            }
            eprintln!(
                "=== pods\n{}",
                self.cluster
                    .kubectl(&["get", "pods", "-A", "-o", "wide"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            );
            drop(self);
            std::panic::resume_unwind(panic);
        }
        drop(self);
        let left = footprint.leftovers();
        assert!(left.is_empty(), "the cluster left {left:?}");
    }

    /// SIGKILLs node `node`'s agent container (its process on the host); the kubelet restarts
    /// it. Returns the instant of the kill.
    pub fn kill_agent(&self, node: usize) -> Instant {
        let pod = self
            .agent_pods()
            .remove(&node)
            .expect("an agent pod on the node");
        let id = pod.container_id.expect("the agent container runs");
        let pid = self
            .cluster
            .container_pid(node, &id)
            .expect("ctr tasks")
            .expect("the agent task runs");
        kill(Pid::from_raw(pid as i32), Signal::SIGKILL).expect("kill the agent");
        Instant::now()
    }

    /// A hostNetwork DaemonSet serving `/hostname` (the node's name) over HTTP on `port`:
    /// the backend of the test's Service (the rig has no kube-proxy, so an address's master
    /// answers with its own listener).
    pub fn deploy_echo(&self, port: u16) {
        self.apply(&json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "echo", "namespace": "default"},
            "spec": {
                "selector": {"matchLabels": {"app": "echo"}},
                "template": {
                    "metadata": {"labels": {"app": "echo"}},
                    "spec": {
                        "hostNetwork": true,
                        "terminationGracePeriodSeconds": 1,
                        "containers": [{
                            "name": "httpd",
                            "image": PAUSE_IMAGE,
                            "imagePullPolicy": "Never",
                            "command": ["/bin/busybox", "httpd", "-f", "-p", port.to_string(), "-h", "/etc"],
                            "ports": [{"containerPort": port, "name": "http"}],
                        }],
                    },
                },
            },
        }));
    }

    /// `GET http://addr:port/hostname` from the client: the answering node's name.
    pub fn http_hostname(&self, addr: Ipv4Addr, port: u16) -> Option<String> {
        let netns = &self.cluster.lab().node(self.client()).netns;
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args(["--", "curl", "-sS", "--max-time", "2"])
            .arg(format!("http://{addr}:{port}/hostname"))
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

/// One agent pod as the test sees it.
#[derive(Debug, Clone)]
pub struct AgentPod {
    pub name: String,
    pub uid: String,
    pub ready: bool,
    pub container_id: Option<String>,
    pub restarts: u64,
    pub revision: String,
}

pub fn is_ready(pod: &Value) -> bool {
    pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// A running `ping`; [`Pinger::stop`] tallies it.
pub struct Pinger {
    child: Option<Child>,
    reader: Option<std::thread::JoinHandle<String>>,
    /// When the ping started (its losses are reported relative to this).
    pub started: SystemTime,
}

impl Pinger {
    pub fn stop(mut self) -> PingTally {
        let mut child = self.child.take().expect("running");
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        child.wait().expect("ping exit");
        let text = self
            .reader
            .take()
            .expect("reading")
            .join()
            .expect("ping reader");
        PingTally::parse(&text).unwrap_or_else(|| panic!("no ping summary in {}", tail(&text, 20)))
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// A VirtualIP on the nodes' `eth0`, adverts every 100 ms, `preferred` node first.
pub fn virtual_ip(name: &str, addr: Ipv4Addr, vrid: u8, preferred: &str) -> Value {
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": name},
        "spec": {
            "addresses": [format!("{addr}/24")],
            "interface": "eth0",
            "virtualRouterId": vrid,
            "vrrp": {"version": 3, "advertisementInterval": "100ms", "preempt": true},
            "priority": {"base": 100, "preferredNodes": [{"nodeName": preferred, "weight": 50}]},
        },
    })
}

/// A pool of `first`-`last` on `eth0` (adverts every 100 ms), forwarding left to kube-proxy.
pub fn pool(name: &str, first: Ipv4Addr, last: Ipv4Addr) -> Value {
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "LoadBalancerPool",
        "metadata": {"name": name},
        "spec": {
            "addresses": [format!("{first}-{last}")],
            "template": {
                "interface": "eth0",
                "vrrp": {"advertisementInterval": "100ms"},
                "priority": {"base": 100},
            },
        },
    })
}

/// A Service of type LoadBalancer in `default` selecting the echo pods.
pub fn lb_service(name: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": "echo"},
            "ports": [{"name": "http", "port": port, "targetPort": port}],
        },
    })
}

/// The Service's first ingress IPv4 address, once allocated.
pub fn ingress_ip(service: &Value) -> Option<Ipv4Addr> {
    service["status"]["loadBalancer"]["ingress"]
        .as_array()?
        .iter()
        .find_map(|i| i["ip"].as_str()?.parse().ok())
}
