//! A real Kubernetes cluster on one machine, without docker: for end-to-end tests that run
//! ferrovip the way a cluster runs it (a DaemonSet's pods, ServiceAccounts, RBAC, kubelet
//! restarts).
//!
//! [`Cluster::start`] builds, in this order:
//! - a [`Lab`]: a switch namespace with bridge `br0` (address: host .1 of the lab subnet,
//!   [`Cluster::api_host`]) and one network namespace per node (`eth0` at host .11, .12, …);
//!   lab nodes past [`ClusterOptions::kube_nodes`] stay plain namespaces on the bridge
//!   ([`Cluster::clients`], e.g. a client that pings a VIP);
//! - etcd and kube-apiserver v1.20.2 ([`ApiServer`]) in the switch namespace, serving on the
//!   bridge address (its certificate names it) with ServiceAccount signing keys, authorization
//!   `Node,RBAC`, admission `NodeRestriction`, privileged containers allowed;
//! - kube-controller-manager (every default controller: daemonset, garbage collector,
//!   serviceaccount and its tokens, endpointslice, node lifecycle, …) and kube-scheduler, in the
//!   switch namespace, as `system:masters` identities, no leader election;
//! - per node: a mount and UTS namespace of its own (`unshare --mount --uts --propagation
//!   slave`) in which node-private directories are bind-mounted over `/run`, `/var/lib` and
//!   `/var/log` (kubelet and containerd hard-code paths there, and each kubelet's GC would delete
//!   other nodes' pod logs) and the hostname is the node's name; containerd in it (runc,
//!   cgroupfs, `restrict_oom_score_adj`, the pause image [`PAUSE_IMAGE`], a bridge + host-local
//!   CNI config so the node's network is ready), then kubelet in the same namespaces (entered with
//!   `nsenter`, not `ip netns exec`, which remounts `/sys` and hides the cgroup mounts), as
//!   `system:node:<name>`, registering the node's bridge address as its InternalIP.
//!
//! It returns once every node is `Ready` ([`Cluster::start_time`]: about 24 s here).
//!
//! What a test uses:
//! - [`Cluster::kubectl`] / [`Cluster::kubectl_ok`]: kubectl as admin (run in the switch
//!   namespace); [`Cluster::admin_kubeconfig`] for clients inside the lab's namespaces and
//!   [`Cluster::host_admin_kubeconfig`] for clients in the harness's own namespace (through a
//!   relay), e.g. a Helm CLI or a `kube::Client`.
//! - [`Cluster::api_host`] and [`Cluster::api_port`]: the API server as every node reaches it.
//!   There is no kube-proxy, so the `kubernetes` Service IP (10.96.0.1) leads nowhere: pods must
//!   be told this address (`KUBERNETES_SERVICE_HOST`/`_PORT`; the chart's `apiServer.host`).
//!   Host-network pods reach it; a pod on a node's CNI bridge (`10.244.<node>.0/24`) reaches
//!   only its own node (no forwarding, no NAT, no routes between nodes).
//! - [`Cluster::nodes`]: names, namespaces and addresses of the kubelet nodes (`node-a`, …);
//!   [`Cluster::lab`] for pings and frames on the bridge.
//! - [`Cluster::import_image`]: loads an OCI archive (`buildah push … oci-archive:FILE:NAME`)
//!   into every node's containerd under NAME; pods use it with `imagePullPolicy: Never`.
//! - [`Cluster::exec_in_netns`] (a node's network namespace only) and [`Cluster::exec_in_node`]
//!   (its network, mount and UTS namespaces: sees `/run/ferrovip` as the node's pods do);
//!   [`Cluster::host_path`] maps a node path under `/run`, `/var/lib` or `/var/log` to where
//!   the harness reads it (pod logs: `/var/log/pods`).
//! - `kubectl logs` works: the API server reaches each kubelet at its InternalIP (the kubelet's
//!   self-signed serving certificate is not verified, anonymous requests are allowed); the log
//!   files are also readable at [`Cluster::host_path`]`(node, "/var/log/pods")`.
//! - [`Cluster::ctr`] (containerd's CLI on a node), [`Cluster::container_pid`] (the host pid of
//!   a container by its id from a pod's status: kill it and the kubelet restarts the container),
//!   [`Cluster::pod_manifest_dir`] (the kubelet's static pod directory).
//! - [`Cluster::footprint`] then, after drop, [`Footprint::leftovers`]: what the cluster left
//!   on the machine (must be nothing).
//!
//! A chart test, in outline:
//!
//! ```text
//! let cluster = Cluster::start(ClusterOptions {
//!     lab: LabSpec { nodes: 4, ..ClusterOptions::default().lab }, // node-d: a client
//!     build_script: Some("e2e/cluster/build.sh".into()),
//!     apiserver_build_script: Some("e2e/apiserver/build.sh".into()),
//!     ..ClusterOptions::default()
//! })?;
//! cluster.import_image(&oci_archive, "localhost/ferrovip:TAG")?;
//! // helm --kubeconfig cluster.host_admin_kubeconfig() install ferrovip charts/ferrovip
//! //   --set apiServer.host={cluster.api_host()} --set apiServer.port={cluster.api_port()}
//! //   --set image.repository=localhost/ferrovip --set image.pullPolicy=Never …
//! cluster.kubectl_ok(&["-n", "ferrovip-system", "get", "pods", "-o", "json"])?;
//! cluster.lab().ping(3, vip, timeout)?;                     // from the client
//! cluster.exec_in_netns(0, &["ip", "-j", "addr"])?;         // what node-a holds
//! ```
//!
//! Dropping the cluster (also on panic) stops the kubelets, kills every container process (found
//! by their cgroups), containerd and its shims (found by the node's mount namespace), removes
//! the containers' `k8s.io/<id>` cgroups, stops the control plane, restores the host sysctls the
//! kubelets changed (`vm.overcommit_memory`, `kernel.panic`, …: kubelet writes them at start),
//! deletes the namespaces (and with them every link) and the scratch directory. Mounts made in
//! a node's mount namespace die with it (`slave` propagation keeps them off the host).
//!
//! A cluster whose test process died without its drop (SIGKILL, abort) is reclaimed by the
//! next [`Cluster::start`] ([`Cluster::cleanup_stale`]): its processes, containers, cgroups,
//! namespaces and directory.
//!
//! Names are unique per process (lab prefix `fvlab<pid>-<n>-`), so clusters of concurrent test
//! processes do not meet. The host sysctls are shared: clusters register in
//! `/run/ferrovip-cluster-sysctls/` (the values found by the first, one entry per live
//! cluster), and the last one to go (or the stale cleanup after it, for a dead process)
//! restores the values and removes the registry.
//!
//! Cost: the binaries come from `e2e/cluster/build.sh` (about 10 minutes once, cached); idle, a
//! three-node cluster uses about 8 % of a core and 0.9 GB of memory (see ARCHITECTURE.md).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use ferrovip::lab::{Lab, LabError, LabSpec, NodeInfo};

use crate::apiserver::{
    ApiServer, ApiServerError, ApiServerOptions, ApiUser, Daemon, checked_stdout, describe,
    find_on_path, is_executable, make_dir, run_checked, write_file,
};

/// Environment variable naming a directory with `kubelet`, `kube-controller-manager`,
/// `kube-scheduler` and `pause.tar` (what `e2e/cluster/build.sh` prints).
pub const KUBE_BIN_ENV: &str = "FERROVIP_KUBE_BIN";
/// The version (and patch level) of the node binaries: the cache directory's suffix.
pub const KUBE_NODE_VERSION: &str = "v1.20.2-ferrovip1";
/// The sandbox image of every node: busybox `sleep`, built by `e2e/cluster/build.sh` into
/// `pause.tar` next to the binaries, imported into each node's containerd at start.
pub const PAUSE_IMAGE: &str = "localhost/ferrovip-pause:1";

const BINARIES: [&str; 3] = ["kubelet", "kube-controller-manager", "kube-scheduler"];
/// Host tools the rig runs.
const TOOLS: [&str; 6] = [
    "containerd",
    "containerd-shim-runc-v2",
    "runc",
    "ctr",
    "nsenter",
    "unshare",
];
const CNI_BIN_DIR: &str = "/usr/lib/cni";
const CONTAINERD_NAMESPACE: &str = "k8s.io";
/// Inside a node's mount namespace; on the host under the node's directory.
const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// Node paths replaced by node-private directories, and those directories' names.
const PRIVATE_DIRS: [(&str, &str); 3] = [
    ("/run", "run"),
    ("/var/lib", "var-lib"),
    ("/var/log", "var-log"),
];
/// Host sysctls kubelet 1.20 sets at start (container manager's kernel tunables).
const KUBELET_SYSCTLS: [&str; 6] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];
const POLL: Duration = Duration::from_millis(200);
const CONTAINERD_READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(3);

static CLUSTER_SEQUENCE: AtomicUsize = AtomicUsize::new(0);
/// Default directories are `<temp>/ferrovip-cluster-<pid>-<n>`: how stale ones are found.
const DIR_STEM: &str = "ferrovip-cluster-";
/// Registry of the clusters whose kubelets changed the host sysctls: `originals` (`key value`
/// lines, as found before the first kubelet) and one empty file `<pid>-<n>` per live cluster.
const SYSCTL_REGISTRY: &str = "/run/ferrovip-cluster-sysctls";
const SYSCTL_ORIGINALS: &str = "originals";
static MEMBER_SEQUENCE: AtomicUsize = AtomicUsize::new(0);

/// Everything that can go wrong while starting or driving the cluster.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("invalid cluster options: {0}")]
    InvalidOptions(String),
    #[error("{what} not found ({detail}); run e2e/cluster/build.sh or set {KUBE_BIN_ENV}")]
    NotInstalled { what: String, detail: String },
    #[error(transparent)]
    ApiServer(#[from] ApiServerError),
    #[error("lab")]
    Lab(#[from] LabError),
    #[error("{context}: {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{what} on {node} exited ({status}) before it was ready; its log ends with:\n{log_tail}"
    )]
    Exited {
        what: &'static str,
        node: String,
        status: ExitStatus,
        log_tail: String,
    },
    #[error("{what} not ready after {waited:?}: {detail}")]
    NotReady {
        what: String,
        waited: Duration,
        detail: String,
    },
    #[error("image {image} is not in {node}'s containerd after importing {}", archive.display())]
    ImageMissing {
        image: String,
        node: String,
        archive: PathBuf,
    },
}

impl ClusterError {
    /// A bounded label for test summaries.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ClusterError::InvalidOptions(_) => "invalid_options",
            ClusterError::NotInstalled { .. } => "not_installed",
            ClusterError::ApiServer(e) => e.metric_label(),
            ClusterError::Lab(e) => e.metric_label(),
            ClusterError::Io { .. } => "io",
            ClusterError::Exited { .. } => "exited",
            ClusterError::NotReady { .. } => "not_ready",
            ClusterError::ImageMissing { .. } => "image_missing",
        }
    }
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterOptions {
    /// The namespaces (prefix, subnet, IPv6). `bridge_ipv4` defaults to host .1 of the subnet;
    /// it is where the API server serves.
    pub lab: LabSpec,
    /// The first `kube_nodes` lab nodes run containerd and a kubelet; the rest are clients.
    pub kube_nodes: usize,
    /// Scratch directory (node roots, logs, the API server's files). Must be empty or absent;
    /// removed on drop. Not under `/run`, `/var/lib` or `/var/log` (nodes replace those).
    pub dir: PathBuf,
    /// Run this (the repository's `e2e/cluster/build.sh`) when the node binaries are missing.
    pub build_script: Option<PathBuf>,
    /// Run this (`e2e/apiserver/build.sh`) when kube-apiserver is missing.
    pub apiserver_build_script: Option<PathBuf>,
    /// How long the nodes may take to turn Ready.
    pub ready_timeout: Duration,
    /// Appended to kube-apiserver's flags (a repeated flag replaces the rig's).
    pub apiserver_args: Vec<String>,
    /// Appended to every kubelet's flags.
    pub kubelet_args: Vec<String>,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            lab: LabSpec {
                ipv6: false,
                ..LabSpec::default()
            },
            kube_nodes: 3,
            dir: std::env::temp_dir().join(format!(
                "{DIR_STEM}{}-{}",
                std::process::id(),
                CLUSTER_SEQUENCE.fetch_add(1, Ordering::Relaxed)
            )),
            build_script: None,
            apiserver_build_script: None,
            ready_timeout: Duration::from_secs(120),
            apiserver_args: Vec::new(),
            kubelet_args: Vec::new(),
        }
    }
}

/// One kubelet node.
struct KubeNode {
    info: NodeInfo,
    dir: PathBuf,
    containerd: Option<Daemon>,
    kubelet: Option<Daemon>,
    /// `mnt:[inode]` of the node's mount namespace, once containerd runs in it.
    mnt_ns: Option<String>,
    /// An open handle on that namespace, held until teardown has killed everything in it: a
    /// namespace's inode number is reused as soon as it is freed (the kernel hands out the
    /// lowest free one), so without the handle a process of someone else's newer namespace
    /// could match `mnt_ns` and be killed.
    mnt_ns_hold: Option<std::fs::File>,
}

impl KubeNode {
    fn socket(&self) -> PathBuf {
        self.host_path(Path::new(CONTAINERD_SOCKET))
    }

    fn host_path(&self, path: &Path) -> PathBuf {
        for (inside, name) in PRIVATE_DIRS {
            if let Ok(rest) = path.strip_prefix(inside) {
                return self.dir.join(name).join(rest);
            }
        }
        path.to_owned()
    }

    fn containerd_pid(&self) -> Option<i32> {
        self.containerd.as_ref().map(|d| d.pgid().as_raw())
    }

    /// Ids of the containers and sandboxes containerd runs tasks for.
    fn task_ids(&self) -> Vec<String> {
        let tasks = self
            .host_path(Path::new("/run/containerd/io.containerd.runtime.v2.task"))
            .join(CONTAINERD_NAMESPACE);
        std::fs::read_dir(tasks)
            .map(|entries| {
                entries
                    .filter_map(|e| e.ok()?.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// What a cluster put on the machine, to check after drop that it is all gone
/// ([`Footprint::leftovers`]).
#[derive(Debug, Clone)]
pub struct Footprint {
    dir: PathBuf,
    netns: Vec<String>,
    mnt_ns: Vec<String>,
    container_ids: BTreeSet<String>,
    sysctls: Vec<(String, String)>,
    sysctl_member: Option<String>,
}

impl Footprint {
    /// Descriptions of anything still present: the scratch directory, a network namespace, a
    /// process in a node's mount namespace or a container's cgroup or naming the directory, a
    /// mount under the directory, a container cgroup, a host sysctl not restored.
    pub fn leftovers(&self) -> Vec<String> {
        let mut found = Vec::new();
        if self.dir.exists() {
            found.push(format!("directory {}", self.dir.display()));
        }
        for netns in &self.netns {
            if Path::new("/run/netns").join(netns).exists() {
                found.push(format!("network namespace {netns}"));
            }
        }
        let dir = self.dir.display().to_string();
        for pid in all_pids() {
            let mnt = mnt_ns_of(pid);
            let in_node = mnt.as_ref().is_some_and(|m| self.mnt_ns.contains(m));
            let in_container = in_cgroups(pid, &self.container_ids);
            let names_dir = cmdline(pid).contains(&dir);
            if in_node || in_container || names_dir {
                found.push(format!("process {pid} ({})", cmdline(pid)));
            }
        }
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mountinfo") {
            for line in mounts.lines().filter(|l| l.contains(&dir)) {
                found.push(format!("mount {line}"));
            }
        }
        for path in container_cgroup_dirs(&self.container_ids) {
            if path.exists() {
                found.push(format!("cgroup {}", path.display()));
            }
        }
        let registry = Path::new(SYSCTL_REGISTRY);
        if registry.exists() {
            // Another cluster runs: the values are its kubelets'; only our entry must be gone.
            if let Some(member) = &self.sysctl_member
                && registry.join(member).exists()
            {
                found.push(format!("sysctl registry entry {SYSCTL_REGISTRY}/{member}"));
            }
        } else {
            for (key, value) in &self.sysctls {
                let now = read_sysctl(key).unwrap_or_default();
                if &now != value {
                    found.push(format!("sysctl {key} is {now}, was {value}"));
                }
            }
        }
        found
    }
}

/// One process of the rig ([`Cluster::processes`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RigProcess {
    pub pid: u32,
    /// The kernel's short name (`comm`): `kubelet`, `containerd`, `kube-apiserver`, …
    pub name: String,
    /// `control plane`, a node's name, or `container`.
    pub place: String,
}

/// A running cluster. Dropping it removes everything it made (see the module doc).
pub struct Cluster {
    nodes: Vec<KubeNode>,
    controllers: Vec<Daemon>,
    api: Option<ApiServer>,
    lab: Option<Lab>,
    clients: Vec<NodeInfo>,
    dir: PathBuf,
    bin_dir: PathBuf,
    /// Host sysctls as found before the first kubelet (of any cluster) started.
    sysctls: Vec<(String, String)>,
    /// This cluster's entry in [`SYSCTL_REGISTRY`], once registered.
    sysctl_member: Option<String>,
    /// Every container id seen on a node (for teardown and [`Footprint`]).
    container_ids: BTreeSet<String>,
    start_time: Duration,
    keep_dir: AtomicBool,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("dir", &self.dir)
            .field(
                "nodes",
                &self.nodes().iter().map(|n| &n.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the cluster and returns once every kubelet node is Ready. Needs root.
    pub fn start(opts: ClusterOptions) -> Result<Cluster, ClusterError> {
        let started = Instant::now();
        validate(&opts)?;
        if let Err(e) = Cluster::cleanup_stale() {
            tracing::warn!(error = %e, "could not clean up stale clusters");
        }
        let bin_dir = resolve_bin_dir(opts.build_script.as_deref())?;
        let dir = opts.dir.clone();
        crate::apiserver::create_empty_dir(&dir)?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            controllers: Vec::new(),
            api: None,
            lab: None,
            clients: Vec::new(),
            dir,
            bin_dir,
            sysctls: Vec::new(),
            sysctl_member: None,
            container_ids: BTreeSet::new(),
            start_time: Duration::ZERO,
            keep_dir: AtomicBool::new(false),
        };
        // From here on an error drops `cluster`, which removes whatever was already built.
        let mut spec = opts.lab.clone();
        if spec.bridge_ipv4.is_none() {
            let net = spec.subnet_v4;
            let bridge = Ipv4Addr::from(u32::from(net.network()) + 1);
            spec.bridge_ipv4 = Some(
                format!("{bridge}/{}", net.prefix_len())
                    .parse()
                    .expect("an address and a prefix length parse"),
            );
        }
        let lab = Lab::create(spec)?;
        let bridge = lab.bridge_ipv4().expect("set above");
        let switch = lab.switch_netns().to_owned();
        let infos = lab.nodes().to_vec();
        cluster.lab = Some(lab);
        let (kube, clients) = infos.split_at(opts.kube_nodes);
        cluster.clients = clients.to_vec();

        let mut users = vec![
            ApiUser {
                name: "system:kube-controller-manager".into(),
                groups: vec!["system:masters".into()],
            },
            ApiUser {
                name: "system:kube-scheduler".into(),
                groups: vec!["system:masters".into()],
            },
        ];
        users.extend(kube.iter().map(|n| ApiUser {
            name: format!("system:node:{}", n.name),
            groups: vec!["system:nodes".into()],
        }));
        let mut apiserver_args = vec![
            "--authorization-mode=Node,RBAC".to_owned(),
            "--enable-admission-plugins=NodeRestriction".to_owned(),
            // The chart's init container that sets sysctls is privileged.
            "--allow-privileged=true".to_owned(),
            // `kubectl logs` reaches a kubelet at its bridge address.
            "--kubelet-preferred-address-types=InternalIP".to_owned(),
        ];
        apiserver_args.extend(opts.apiserver_args.iter().cloned());
        let api_opts = ApiServerOptions {
            netns: Some(switch.clone()),
            bind: IpAddr::V4(bridge),
            port: 6443,
            dir: cluster.dir.join("apiserver"),
            node_users: Vec::new(),
            build_script: opts.apiserver_build_script.clone(),
            ready_timeout: opts.ready_timeout,
            audit_log: false,
            users,
            extra_args: apiserver_args,
        };
        for (i, info) in kube.iter().enumerate() {
            let node = cluster.prepare_node(i, info.clone())?;
            cluster.nodes.push(node);
        }
        // The nodes' containerd starts (and loads the pause image) while etcd and the API
        // server do: neither needs the other.
        let (api, nodes) = std::thread::scope(|scope| {
            let api = scope.spawn(|| ApiServer::start(api_opts));
            let nodes = cluster.start_runtimes();
            let api = api
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            (api, nodes)
        });
        let api_result = api.map(|api| cluster.api = Some(api));
        nodes?;
        api_result?;
        cluster.start_controllers(&switch)?;
        let member = format!(
            "{}-{}",
            std::process::id(),
            MEMBER_SEQUENCE.fetch_add(1, Ordering::Relaxed)
        );
        cluster.sysctls = sysctls_join(&member)?;
        cluster.sysctl_member = Some(member);
        for i in 0..cluster.nodes.len() {
            cluster.start_kubelet(i, &opts.kubelet_args)?;
        }
        cluster.wait_ready(opts.ready_timeout)?;
        cluster.start_time = started.elapsed();
        Ok(cluster)
    }

    /// containerd on every node, then the pause image into each.
    fn start_runtimes(&mut self) -> Result<(), ClusterError> {
        for i in 0..self.nodes.len() {
            self.start_containerd(i)?;
        }
        let pause = self.bin_dir.join("pause.tar");
        for i in 0..self.nodes.len() {
            self.wait_containerd(i)?;
            self.import_on(i, &pause, PAUSE_IMAGE)?;
        }
        Ok(())
    }

    /// Reclaims clusters with default directories whose process is gone (killed before its
    /// drop ran): kills their containers (by cgroup) and daemons (by command line), removes
    /// their cgroups, restores the host sysctls they recorded, deletes stale lab namespaces
    /// ([`Lab::cleanup_stale`]) and their directories. Clusters of live processes are left
    /// alone. Returns the directories reclaimed.
    pub fn cleanup_stale() -> Result<Vec<PathBuf>, ClusterError> {
        let mut reclaimed = Vec::new();
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return Ok(reclaimed);
        };
        let stale: Vec<PathBuf> = entries
            .filter_map(|e| e.ok())
            .filter(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_prefix(DIR_STEM)
                    .and_then(|rest| rest.split('-').next()?.parse::<u32>().ok())
                    .is_some_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            })
            .map(|e| e.path())
            .collect();
        // Dead clusters' entries go; the sysctls are restored if no live cluster remains.
        if Path::new(SYSCTL_REGISTRY).exists() {
            sysctls_leave(None);
        }
        if stale.is_empty() {
            return Ok(reclaimed);
        }
        for dir in stale {
            let mut ids = BTreeSet::new();
            if let Ok(nodes) = std::fs::read_dir(dir.join("nodes")) {
                for node in nodes.filter_map(|e| e.ok()) {
                    let tasks = node
                        .path()
                        .join("run/containerd/io.containerd.runtime.v2.task")
                        .join(CONTAINERD_NAMESPACE);
                    if let Ok(tasks) = std::fs::read_dir(tasks) {
                        ids.extend(tasks.filter_map(|t| t.ok()?.file_name().into_string().ok()));
                    }
                }
            }
            let marker = dir.display().to_string();
            // kubelets first: they would restart the containers.
            kill_until_gone("stale daemon", |pid| cmdline(pid).contains(&marker));
            kill_until_gone("stale container", |pid| in_cgroups(pid, &ids));
            for path in container_cgroup_dirs(&ids) {
                let _ = std::fs::remove_dir(path);
            }
            reclaimed.push(dir);
        }
        // Shims and host-network containers of those nodes live in stale lab namespaces.
        Lab::cleanup_stale()?;
        for dir in &reclaimed {
            let _ = std::fs::remove_dir_all(dir);
        }
        Ok(reclaimed)
    }

    fn api(&self) -> &ApiServer {
        self.api
            .as_ref()
            .expect("the API server runs while the cluster exists")
    }

    fn start_controllers(&mut self, switch: &str) -> Result<(), ClusterError> {
        let api = self.api();
        let kcm_config = api.user_kubeconfig("system:kube-controller-manager");
        let scheduler_config = api.user_kubeconfig("system:kube-scheduler");
        let kcm_args = vec![
            format!("--kubeconfig={}", kcm_config.display()),
            format!(
                "--service-account-private-key-file={}",
                api.service_account_key().display()
            ),
            format!("--root-ca-file={}", api.ca_cert().display()),
            "--use-service-account-credentials=false".to_owned(),
            "--leader-elect=false".to_owned(),
            "--port=0".to_owned(),
            "--secure-port=0".to_owned(),
            "--controllers=*".to_owned(),
            "--v=1".to_owned(),
        ];
        let scheduler_args = vec![
            format!("--kubeconfig={}", scheduler_config.display()),
            "--leader-elect=false".to_owned(),
            "--port=0".to_owned(),
            "--secure-port=0".to_owned(),
            "--v=1".to_owned(),
        ];
        let kcm = Daemon::spawn(
            "kube-controller-manager",
            Some(switch),
            self.bin_dir.join("kube-controller-manager").as_os_str(),
            &kcm_args,
            self.dir.join("kube-controller-manager.log"),
        )?;
        self.controllers.push(kcm);
        let scheduler = Daemon::spawn(
            "kube-scheduler",
            Some(switch),
            self.bin_dir.join("kube-scheduler").as_os_str(),
            &scheduler_args,
            self.dir.join("kube-scheduler.log"),
        )?;
        self.controllers.push(scheduler);
        Ok(())
    }

    fn prepare_node(&self, index: usize, info: NodeInfo) -> Result<KubeNode, ClusterError> {
        let dir = self.dir.join("nodes").join(&info.name);
        for (_, name) in PRIVATE_DIRS {
            make_dir(&dir.join(name))?;
        }
        for name in ["cni", "manifests"] {
            make_dir(&dir.join(name))?;
        }
        write_file(&dir.join("containerd.toml"), &containerd_config(&dir))?;
        write_file(
            &dir.join("cni/10-ferrovip-rig.conflist"),
            &cni_config(index),
        )?;
        Ok(KubeNode {
            info,
            dir,
            containerd: None,
            kubelet: None,
            mnt_ns: None,
            mnt_ns_hold: None,
        })
    }

    fn start_containerd(&mut self, i: usize) -> Result<(), ClusterError> {
        let node = &self.nodes[i];
        let mut script = String::from("set -e\n");
        for (inside, name) in PRIVATE_DIRS {
            script.push_str(&format!(
                "mount --bind '{}' {inside}\n",
                node.dir.join(name).display()
            ));
        }
        script.push_str(&format!("hostname '{}'\n", node.info.name));
        script.push_str(&format!(
            "exec containerd --config '{}'\n",
            node.dir.join("containerd.toml").display()
        ));
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", node.info.netns))
            .args([
                "unshare",
                "--mount",
                "--uts",
                "--propagation",
                "slave",
                "--",
            ])
            .args(["/bin/sh", "-c", &script])
            .current_dir("/");
        let daemon = Daemon::spawn_command("containerd", command, node.dir.join("containerd.log"))?;
        self.nodes[i].containerd = Some(daemon);
        Ok(())
    }

    fn wait_containerd(&mut self, i: usize) -> Result<(), ClusterError> {
        let started = Instant::now();
        loop {
            let node = &mut self.nodes[i];
            let daemon = node.containerd.as_mut().expect("started");
            still_running(daemon, &node.info.name)?;
            if node.socket().exists() {
                let out = self.ctr(i, &["version"])?;
                if out.status.success() {
                    break;
                }
            }
            if started.elapsed() > CONTAINERD_READY_TIMEOUT {
                let node = &self.nodes[i];
                return Err(ClusterError::NotReady {
                    what: format!("containerd on {}", node.info.name),
                    waited: started.elapsed(),
                    detail: node
                        .containerd
                        .as_ref()
                        .map(Daemon::log_tail)
                        .unwrap_or_default(),
                });
            }
            std::thread::sleep(POLL);
        }
        // containerd runs in the node's mount namespace now (the script exec'd it there).
        let node = &mut self.nodes[i];
        let pid = node.containerd_pid().expect("started");
        let mnt = mnt_ns_of(pid);
        if mnt.is_none() || mnt == mnt_ns_of(std::process::id() as i32) {
            return Err(ClusterError::NotReady {
                what: format!("the mount namespace of {}", node.info.name),
                waited: started.elapsed(),
                detail: format!("containerd (pid {pid}) is not in a mount namespace of its own"),
            });
        }
        node.mnt_ns_hold = std::fs::File::open(format!("/proc/{pid}/ns/mnt")).ok();
        if mnt_ns_of(pid) != mnt {
            return Err(ClusterError::NotReady {
                what: format!("the mount namespace of {}", node.info.name),
                waited: started.elapsed(),
                detail: format!("containerd (pid {pid}) left its mount namespace"),
            });
        }
        node.mnt_ns = mnt;
        Ok(())
    }

    fn start_kubelet(&mut self, i: usize, extra: &[String]) -> Result<(), ClusterError> {
        let api = self.api();
        let node = &self.nodes[i];
        let name = &node.info.name;
        let kubeconfig = api.user_kubeconfig(&format!("system:node:{name}"));
        let socket = format!("unix://{CONTAINERD_SOCKET}");
        let mut args = vec![
            format!("--kubeconfig={}", kubeconfig.display()),
            "--container-runtime=remote".to_owned(),
            format!("--container-runtime-endpoint={socket}"),
            format!("--containerd={CONTAINERD_SOCKET}"),
            "--cgroup-driver=cgroupfs".to_owned(),
            // No QoS cgroup tree: containerd puts containers in `k8s.io/<id>`.
            "--cgroups-per-qos=false".to_owned(),
            "--enforce-node-allocatable=".to_owned(),
            "--fail-swap-on=false".to_owned(),
            "--make-iptables-util-chains=false".to_owned(),
            "--protect-kernel-defaults=false".to_owned(),
            // The bounding set lacks CAP_SYS_RESOURCE: nothing may lower its oom_score_adj.
            "--oom-score-adj=0".to_owned(),
            "--root-dir=/var/lib/kubelet".to_owned(),
            "--cert-dir=/var/lib/kubelet/pki".to_owned(),
            "--volume-plugin-dir=/var/lib/kubelet/volumeplugins".to_owned(),
            format!("--pod-manifest-path={}", node.dir.join("manifests").display()),
            format!("--hostname-override={name}"),
            format!("--node-ip={}", node.info.ipv4),
            "--read-only-port=0".to_owned(),
            "--cluster-domain=cluster.local".to_owned(),
            // The machine's disk may be fuller than kubelet's defaults allow (DiskPressure
            // taints, image GC deleting imported images that pods have not used yet).
            "--eviction-hard=memory.available<1Mi,nodefs.available<1%,nodefs.inodesFree<1%,imagefs.available<1%".to_owned(),
            "--image-gc-high-threshold=100".to_owned(),
            "--image-gc-low-threshold=99".to_owned(),
            "--v=1".to_owned(),
        ];
        args.extend(extra.iter().cloned());
        let pid = node.containerd_pid().expect("started");
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--uts",
                "--net",
                "--",
            ])
            .arg(self.bin_dir.join("kubelet"))
            .args(&args)
            .current_dir("/");
        let daemon = Daemon::spawn_command("kubelet", command, node.dir.join("kubelet.log"))?;
        self.nodes[i].kubelet = Some(daemon);
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        loop {
            for node in &mut self.nodes {
                for daemon in [node.containerd.as_mut(), node.kubelet.as_mut()]
                    .into_iter()
                    .flatten()
                {
                    still_running(daemon, &node.info.name)?;
                }
            }
            for daemon in &mut self.controllers {
                still_running(daemon, "the switch namespace")?;
            }
            let out = self.kubectl(&["get", "nodes", "-o", "json"])?;
            let detail = if out.status.success() {
                let ready = ready_nodes(&String::from_utf8_lossy(&out.stdout));
                let missing: Vec<&str> = self
                    .nodes
                    .iter()
                    .map(|n| n.info.name.as_str())
                    .filter(|n| !ready.contains(*n))
                    .collect();
                if missing.is_empty() {
                    return Ok(());
                }
                format!("not Ready: {}", missing.join(", "))
            } else {
                String::from_utf8_lossy(&out.stderr).trim().to_owned()
            };
            if started.elapsed() > timeout {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .filter_map(|n| {
                        let log = n.kubelet.as_ref()?.log_tail();
                        Some(format!("kubelet on {}:\n{log}", n.info.name))
                    })
                    .collect();
                return Err(ClusterError::NotReady {
                    what: "nodes".into(),
                    waited: started.elapsed(),
                    detail: format!("{detail}\n{}", logs.join("\n")),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    /// From [`Cluster::start`]'s call to every node Ready.
    pub fn start_time(&self) -> Duration {
        self.start_time
    }

    /// The kubelet nodes, in order (`node-a`, `node-b`, …): name, network namespace, `eth0`
    /// address (the Node's InternalIP).
    pub fn nodes(&self) -> Vec<&NodeInfo> {
        self.nodes.iter().map(|n| &n.info).collect()
    }

    /// Lab nodes without a kubelet (past [`ClusterOptions::kube_nodes`]).
    pub fn clients(&self) -> &[NodeInfo] {
        &self.clients
    }

    /// The lab under the cluster (pings, frames, the switch namespace). Node indexes of the
    /// lab are those of [`Cluster::nodes`] followed by [`Cluster::clients`].
    pub fn lab(&self) -> &Lab {
        self.lab
            .as_ref()
            .expect("the lab exists while the cluster does")
    }

    /// The API server harness (certificates, logs, restarts).
    pub fn apiserver(&self) -> &ApiServer {
        self.api()
    }

    /// The API server's address as the nodes (and their pods) reach it: the bridge's.
    pub fn api_host(&self) -> Ipv4Addr {
        self.lab().bridge_ipv4().expect("set at start")
    }

    pub fn api_port(&self) -> u16 {
        self.api().port()
    }

    /// `https://<api_host>:<api_port>`.
    pub fn api_url(&self) -> String {
        self.api().url()
    }

    /// Admin kubeconfig with [`Cluster::api_url`] (for clients in the lab's namespaces).
    pub fn admin_kubeconfig(&self) -> &Path {
        self.api().admin_kubeconfig()
    }

    /// Admin kubeconfig for clients in the harness's own network namespace (a relay).
    pub fn host_admin_kubeconfig(&self) -> &Path {
        self.api().host_admin_kubeconfig()
    }

    /// `kubectl` as admin; a non-zero exit is not an error (read `Output::status`).
    pub fn kubectl(&self, args: &[&str]) -> Result<Output, ClusterError> {
        Ok(self.api().kubectl(args)?)
    }

    /// Like [`Cluster::kubectl`], but a non-zero exit is an error; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, ClusterError> {
        Ok(self.api().kubectl_ok(args)?)
    }

    /// The scratch directory (logs: `kube-controller-manager.log`, `kube-scheduler.log`,
    /// `apiserver/`, `nodes/<name>/{containerd,kubelet}.log`). Removed on drop unless kept.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Keep [`Cluster::dir`] after drop, for post-mortems (then [`Footprint::leftovers`] names
    /// it).
    pub fn keep_dir(&self, keep: bool) {
        self.keep_dir.store(keep, Ordering::Relaxed);
        self.api().keep_dir(keep);
    }

    /// Where the harness finds node `node`'s `path`: node-private for paths under `/run`,
    /// `/var/lib` and `/var/log` (hostPath volumes there are per node), the path itself
    /// otherwise.
    pub fn host_path(&self, node: usize, path: impl AsRef<Path>) -> PathBuf {
        self.nodes[node].host_path(path.as_ref())
    }

    /// The kubelet's static pod directory on node `node` (`--pod-manifest-path`).
    pub fn pod_manifest_dir(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.join("manifests")
    }

    /// The kubelet's log on node `node`.
    pub fn kubelet_log(&self, node: usize) -> PathBuf {
        self.nodes[node].dir.join("kubelet.log")
    }

    /// Runs `args` in node `node`'s network namespace (`nsenter --net`), to completion; a
    /// non-zero exit is not an error.
    pub fn exec_in_netns(&self, node: usize, args: &[&str]) -> Result<Output, ClusterError> {
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net=/run/netns/{}", self.nodes[node].info.netns))
            .arg("--")
            .args(args);
        output(&mut command)
    }

    /// Runs `args` in node `node`'s network, mount and UTS namespaces: the node as its pods'
    /// hostPath volumes and host network see it.
    pub fn exec_in_node(&self, node: usize, args: &[&str]) -> Result<Output, ClusterError> {
        let pid = self.nodes[node].containerd_pid().expect("started");
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target",
                &pid.to_string(),
                "--mount",
                "--uts",
                "--net",
                "--",
            ])
            .args(args)
            .current_dir("/");
        output(&mut command)
    }

    /// `ctr -n k8s.io ARGS` against node `node`'s containerd; a non-zero exit is not an error.
    pub fn ctr(&self, node: usize, args: &[&str]) -> Result<Output, ClusterError> {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.nodes[node].socket())
            .args(["-n", CONTAINERD_NAMESPACE])
            .args(args);
        output(&mut command)
    }

    /// Imports an OCI archive into every node's containerd and checks that `image` (the name
    /// the archive carries, e.g. `localhost/ferrovip:0.1.0`) is there.
    pub fn import_image(&self, archive: &Path, image: &str) -> Result<(), ClusterError> {
        for i in 0..self.nodes.len() {
            self.import_on(i, archive, image)?;
        }
        Ok(())
    }

    fn import_on(&self, node: usize, archive: &Path, image: &str) -> Result<(), ClusterError> {
        let mut command = Command::new("ctr");
        command
            .arg("--address")
            .arg(self.nodes[node].socket())
            .args(["-n", CONTAINERD_NAMESPACE, "images", "import"])
            .arg(archive);
        run_checked(&mut command)?;
        let out = self.ctr(node, &["images", "ls", "-q"])?;
        let listed = String::from_utf8_lossy(&out.stdout);
        if !listed.lines().any(|line| line.trim() == image) {
            return Err(ClusterError::ImageMissing {
                image: image.to_owned(),
                node: self.nodes[node].info.name.clone(),
                archive: archive.to_owned(),
            });
        }
        Ok(())
    }

    /// The host pid of container `container_id` (as in a pod's
    /// `status.containerStatuses[].containerID`, with or without `containerd://`) on node
    /// `node`, if it runs.
    pub fn container_pid(
        &self,
        node: usize,
        container_id: &str,
    ) -> Result<Option<u32>, ClusterError> {
        let id = container_id.trim_start_matches("containerd://");
        let out = self.ctr(node, &["tasks", "ls"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .skip(1)
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let (task, pid, status) = (fields.next()?, fields.next()?, fields.next()?);
                (task == id && status == "RUNNING").then(|| pid.parse().ok())?
            })
            .next())
    }

    /// Every process of the rig now: etcd, kube-apiserver, controller-manager and scheduler (in
    /// the switch namespace), and per node containerd, its shims, kubelet (the node's mount
    /// namespace) and the containers (their cgroups). For cost measurements.
    pub fn processes(&mut self) -> Vec<RigProcess> {
        self.collect_container_ids();
        let switch = self.lab.as_ref().and_then(|lab| {
            let path = Path::new("/run/netns").join(lab.switch_netns());
            std::fs::metadata(path).ok().map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("net:[{}]", m.ino())
            })
        });
        let mut found = Vec::new();
        for pid in all_pids() {
            let place = if let Some(node) = self
                .nodes
                .iter()
                .find(|n| n.mnt_ns.is_some() && n.mnt_ns == mnt_ns_of(pid))
            {
                node.info.name.clone()
            } else if in_cgroups(pid, &self.container_ids) {
                "container".to_owned()
            } else if switch.is_some()
                && std::fs::read_link(format!("/proc/{pid}/ns/net"))
                    .ok()
                    .map(|l| l.to_string_lossy().into_owned())
                    == switch
            {
                "control plane".to_owned()
            } else {
                continue;
            };
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            found.push(RigProcess {
                pid: pid as u32,
                name,
                place,
            });
        }
        found
    }

    /// What the cluster has put on the machine so far; check it after drop with
    /// [`Footprint::leftovers`].
    pub fn footprint(&mut self) -> Footprint {
        self.collect_container_ids();
        let mut netns: Vec<String> = self
            .lab
            .iter()
            .flat_map(|lab| {
                std::iter::once(lab.switch_netns().to_owned())
                    .chain(lab.nodes().iter().map(|n| n.netns.clone()))
            })
            .collect();
        netns.sort();
        Footprint {
            dir: self.dir.clone(),
            netns,
            mnt_ns: self.nodes.iter().filter_map(|n| n.mnt_ns.clone()).collect(),
            container_ids: self.container_ids.clone(),
            sysctls: self.sysctls.clone(),
            sysctl_member: self.sysctl_member.clone(),
        }
    }

    fn collect_container_ids(&mut self) {
        for node in &self.nodes {
            self.container_ids.extend(node.task_ids());
        }
    }

    fn teardown(&mut self) {
        // No kubelet may restart what goes next.
        for node in &mut self.nodes {
            if let Some(mut kubelet) = node.kubelet.take()
                && let Err(e) = kubelet.terminate(STOP_GRACE)
            {
                tracing::warn!(node = node.info.name, error = %e, "could not stop kubelet");
            }
        }
        // Container processes while their shims still reap them: they are in cgroups named by
        // their ids, in mount (and maybe network) namespaces of their own.
        self.collect_container_ids();
        let ids = self.container_ids.clone();
        kill_until_gone("container", |pid| in_cgroups(pid, &ids));
        // containerd and its shims share the node's mount namespace.
        let own = mnt_ns_of(std::process::id() as i32);
        let node_ns: BTreeSet<String> = self
            .nodes
            .iter()
            .filter_map(|n| n.mnt_ns.clone())
            .filter(|ns| Some(ns) != own.as_ref())
            .collect();
        kill_until_gone("node", |pid| {
            mnt_ns_of(pid).is_some_and(|ns| node_ns.contains(&ns))
        });
        for node in &mut self.nodes {
            if let Some(mut containerd) = node.containerd.take() {
                let _ = containerd.terminate(Duration::ZERO);
            }
            node.mnt_ns_hold.take();
        }
        for path in container_cgroup_dirs(&ids) {
            if path.exists()
                && let Err(e) = std::fs::remove_dir(&path)
            {
                tracing::warn!(cgroup = %path.display(), error = %e, "could not remove");
            }
        }
        // The parent goes too when no other cluster uses it (rmdir refuses otherwise).
        for root in cgroup_roots() {
            let _ = std::fs::remove_dir(root.join(CONTAINERD_NAMESPACE));
        }
        for mut daemon in self.controllers.drain(..) {
            let _ = daemon.terminate(Duration::ZERO);
        }
        self.api.take();
        if let Some(member) = self.sysctl_member.take() {
            sysctls_leave(Some(&member));
        }
        self.lab.take();
        if !self.keep_dir.load(Ordering::Relaxed) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.teardown();
    }
}

fn validate(opts: &ClusterOptions) -> Result<(), ClusterError> {
    if opts.kube_nodes == 0 || opts.kube_nodes > opts.lab.nodes {
        return Err(ClusterError::InvalidOptions(format!(
            "kube_nodes must be 1..={} (the lab's nodes), got {}",
            opts.lab.nodes, opts.kube_nodes
        )));
    }
    if opts.kube_nodes > 200 {
        return Err(ClusterError::InvalidOptions(
            "at most 200 kubelet nodes".into(),
        ));
    }
    let dir = opts.dir.display().to_string();
    if !opts.dir.is_absolute() || dir.contains('\'') {
        return Err(ClusterError::InvalidOptions(format!(
            "dir {dir:?} must be absolute and free of quotes"
        )));
    }
    for (inside, _) in PRIVATE_DIRS {
        if opts.dir.starts_with(inside) {
            return Err(ClusterError::InvalidOptions(format!(
                "dir {dir} is under {inside}, which every node replaces with its own"
            )));
        }
    }
    Ok(())
}

/// Where `e2e/cluster/build.sh` puts the binaries.
fn cached_bin_dir() -> Option<PathBuf> {
    let cache = match std::env::var_os("FERROVIP_CACHE") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME")?).join(".cache/ferrovip"),
    };
    Some(cache.join(format!("kube-node-{KUBE_NODE_VERSION}")))
}

fn complete(dir: &Path) -> bool {
    BINARIES.iter().all(|b| is_executable(&dir.join(b))) && dir.join("pause.tar").is_file()
}

fn resolve_bin_dir(build_script: Option<&Path>) -> Result<PathBuf, ClusterError> {
    let dir = if let Some(dir) = std::env::var_os(KUBE_BIN_ENV) {
        let dir = PathBuf::from(dir);
        if !complete(&dir) {
            return Err(ClusterError::NotInstalled {
                what: "kubelet, kube-controller-manager, kube-scheduler or pause.tar".into(),
                detail: format!("{KUBE_BIN_ENV}={} lacks one", dir.display()),
            });
        }
        dir
    } else if let Some(dir) = cached_bin_dir().filter(|d| complete(d)) {
        dir
    } else if let Some(script) = build_script {
        tracing::info!(script = %script.display(), "building the node binaries (minutes, once)");
        let mut command = Command::new(script);
        command.stdin(Stdio::null()).stderr(Stdio::inherit());
        let out = command.output().map_err(|source| ApiServerError::Spawn {
            command: describe(&command),
            source,
        })?;
        let stdout = checked_stdout(describe(&command), out)?;
        let dir = stdout.lines().last().map(|l| PathBuf::from(l.trim()));
        match dir.filter(|d| complete(d)) {
            Some(dir) => dir,
            None => {
                return Err(ClusterError::NotInstalled {
                    what: "the node binaries".into(),
                    detail: format!("{} printed no complete directory", script.display()),
                });
            }
        }
    } else {
        return Err(ClusterError::NotInstalled {
            what: "the node binaries".into(),
            detail: format!("no {}", cached_bin_dir().unwrap_or_default().display()),
        });
    };
    for tool in TOOLS {
        if find_on_path(tool).is_none() {
            return Err(ClusterError::NotInstalled {
                what: tool.into(),
                detail: "not on PATH".into(),
            });
        }
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let path = Path::new(CNI_BIN_DIR).join(plugin);
        if !is_executable(&path) {
            return Err(ClusterError::NotInstalled {
                what: format!("CNI plugin {plugin}"),
                detail: format!("no {}", path.display()),
            });
        }
    }
    Ok(dir)
}

/// containerd's configuration for a node. Paths under `/run` and `/var/lib` are the node's own
/// (its mount namespace); the CNI config directory is named by its host path.
fn containerd_config(node_dir: &Path) -> String {
    format!(
        r#"version = 2
root = "/var/lib/containerd"
state = "/run/containerd"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.tracing.processor.v1.otlp"]

[grpc]
  address = "{CONTAINERD_SOCKET}"

[plugins."io.containerd.internal.v1.opt"]
  path = "/var/lib/containerd/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  # Without CAP_SYS_RESOURCE nothing may lower oom_score_adj; runc would fail every sandbox.
  restrict_oom_score_adj = true
  # Loading an AppArmor profile would change the host's kernel state.
  disable_apparmor = true
  stream_server_address = "127.0.0.1"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{}"
"#,
        node_dir.join("cni").display()
    )
}

/// A bridge + host-local network per node (10.244.<index>.0/24): the kubelet reports the
/// node's network ready only once a CNI config exists, even if every pod uses the host's.
fn cni_config(index: usize) -> String {
    serde_json::json!({
        "cniVersion": "0.4.0",
        "name": "ferrovip-rig",
        "plugins": [{
            "type": "bridge",
            "bridge": "cni0",
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "ranges": [[{"subnet": format!("10.244.{index}.0/24")}]],
            },
        }],
    })
    .to_string()
}

/// Names of the Nodes whose `Ready` condition is `True` in `kubectl get nodes -o json`.
fn ready_nodes(json: &str) -> BTreeSet<String> {
    let Ok(list) = serde_json::from_str::<serde_json::Value>(json) else {
        return BTreeSet::new();
    };
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|node| {
            node["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .filter_map(|node| node["metadata"]["name"].as_str().map(str::to_owned))
        .collect()
}

fn output(command: &mut Command) -> Result<Output, ClusterError> {
    command.stdin(Stdio::null());
    command.output().map_err(|source| {
        ClusterError::ApiServer(ApiServerError::Spawn {
            command: describe(command),
            source,
        })
    })
}

/// Holds `<SYSCTL_REGISTRY>.lock` (a directory: mkdir is atomic) while alive.
struct RegistryLock(PathBuf);

impl RegistryLock {
    fn take() -> Result<RegistryLock, ClusterError> {
        let lock = PathBuf::from(format!("{SYSCTL_REGISTRY}.lock"));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::create_dir(&lock) {
                Ok(()) => return Ok(RegistryLock(lock)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    // Left by a process that died holding it: older than any holder lives.
                    let abandoned = std::fs::metadata(&lock)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(30));
                    if abandoned {
                        let _ = std::fs::remove_dir(&lock);
                        continue;
                    }
                    if Instant::now() > deadline {
                        return Err(ClusterError::Io {
                            context: "waiting for the sysctl registry's lock",
                            path: lock,
                            source: e,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(ClusterError::Io {
                        context: "locking the sysctl registry",
                        path: lock,
                        source,
                    });
                }
            }
        }
    }
}

impl Drop for RegistryLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn parse_sysctls(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(key, _)| KUBELET_SYSCTLS.contains(key))
        .map(|(key, value)| (key.to_owned(), value.to_owned()))
        .collect()
}

/// Registers `member` before its kubelets start; returns the host's values as found before
/// the first registered cluster's kubelets (recorded then, kept while any member lives, and
/// kept when members died without leaving: their kubelets' values are not the originals).
fn sysctls_join(member: &str) -> Result<Vec<(String, String)>, ClusterError> {
    let _lock = RegistryLock::take()?;
    let dir = Path::new(SYSCTL_REGISTRY);
    make_dir(dir)?;
    let path = dir.join(SYSCTL_ORIGINALS);
    let recorded = std::fs::read_to_string(&path)
        .map(|text| parse_sysctls(&text))
        .unwrap_or_default();
    let originals = if recorded.is_empty() {
        let now: Vec<(String, String)> = KUBELET_SYSCTLS
            .iter()
            .filter_map(|key| Some((key.to_string(), read_sysctl(key)?)))
            .collect();
        let text: String = now.iter().map(|(k, v)| format!("{k} {v}\n")).collect();
        write_file(&path, &text)?;
        now
    } else {
        recorded
    };
    write_file(&dir.join(member), "")?;
    Ok(originals)
}

/// Removes `member` and the entries of dead processes; when no live member remains, restores
/// the recorded values and removes the registry.
fn sysctls_leave(member: Option<&str>) {
    let _lock = match RegistryLock::take() {
        Ok(lock) => lock,
        Err(e) => {
            tracing::warn!(error = %e, "sysctls not restored");
            return;
        }
    };
    let dir = Path::new(SYSCTL_REGISTRY);
    if let Some(member) = member {
        let _ = std::fs::remove_file(dir.join(member));
    }
    let mut live = 0;
    for entry in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == SYSCTL_ORIGINALS {
            continue;
        }
        let alive = name
            .split('-')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if alive {
            live += 1;
        } else {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    if live > 0 {
        return;
    }
    if let Ok(text) = std::fs::read_to_string(dir.join(SYSCTL_ORIGINALS)) {
        for (key, value) in parse_sysctls(&text) {
            if read_sysctl(&key).as_deref() != Some(value.as_str())
                && let Err(e) = std::fs::write(Path::new("/proc/sys").join(&key), &value)
            {
                tracing::warn!(sysctl = key, error = %e, "could not restore");
            }
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

fn read_sysctl(key: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(key))
        .ok()
        .map(|v| v.trim().to_owned())
}

fn all_pids() -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// `mnt:[inode]` of process `pid`.
/// `Exited` (with the log's tail) when `daemon`, of `node`, has exited.
fn still_running(daemon: &mut Daemon, node: &str) -> Result<(), ClusterError> {
    match daemon.exited() {
        Some(status) => Err(ClusterError::Exited {
            what: daemon.what,
            node: node.to_owned(),
            status,
            log_tail: daemon.log_tail(),
        }),
        None => Ok(()),
    }
}

fn mnt_ns_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/mnt"))
        .ok()
        .map(|link| link.to_string_lossy().into_owned())
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|raw| {
            String::from_utf8_lossy(&raw)
                .split('\0')
                .collect::<Vec<_>>()
                .join(" ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Whether process `pid` is in a cgroup named by one of `ids` (in any hierarchy).
fn in_cgroups(pid: i32, ids: &BTreeSet<String>) -> bool {
    if ids.is_empty() {
        return false;
    }
    std::fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|text| {
        text.lines().any(|line| {
            line.rsplit(':')
                .next()
                .is_some_and(|path| path.split('/').any(|part| ids.contains(part)))
        })
    })
}

/// Every cgroup v1 hierarchy's root (one per mount; `cpu` and `cpuacct` may be links to
/// one).
fn cgroup_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = std::fs::read_dir("/sys/fs/cgroup")
        .map(|entries| {
            entries
                .filter_map(|e| std::fs::canonicalize(e.ok()?.path()).ok())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default();
    roots.sort();
    roots.dedup();
    roots
}

/// `k8s.io/<id>` in every hierarchy, for the ids given.
fn container_cgroup_dirs(ids: &BTreeSet<String>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for root in cgroup_roots() {
        for id in ids {
            dirs.push(root.join(CONTAINERD_NAMESPACE).join(id));
        }
    }
    dirs
}

/// SIGKILLs every process `select` picks, again until none is left (or 10 s pass).
fn kill_until_gone(what: &str, select: impl Fn(i32) -> bool) {
    let own = std::process::id() as i32;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids: Vec<i32> = all_pids()
            .into_iter()
            .filter(|&pid| pid != own && select(pid) && !is_zombie(pid))
            .collect();
        if pids.is_empty() {
            return;
        }
        if Instant::now() > deadline {
            tracing::warn!(what, ?pids, "processes survived SIGKILL");
            return;
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_paths_under_run_var_lib_and_var_log_are_private() {
        let node = KubeNode {
            info: NodeInfo {
                index: 0,
                name: "node-a".into(),
                netns: "x".into(),
                interface: "eth0".into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ipv4: Ipv4Addr::new(192, 0, 2, 11),
                ipv4_prefix_len: 24,
                ipv6: None,
                ipv6_ll: None,
            },
            dir: PathBuf::from("/tmp/c/nodes/node-a"),
            containerd: None,
            kubelet: None,
            mnt_ns: None,
            mnt_ns_hold: None,
        };
        assert_eq!(
            node.host_path(Path::new("/run/ferrovip/state.json")),
            Path::new("/tmp/c/nodes/node-a/run/ferrovip/state.json")
        );
        assert_eq!(
            node.host_path(Path::new("/var/log/pods")),
            Path::new("/tmp/c/nodes/node-a/var-log/pods")
        );
        assert_eq!(
            node.host_path(Path::new("/etc/hosts")),
            Path::new("/etc/hosts")
        );
        assert_eq!(
            node.socket(),
            Path::new("/tmp/c/nodes/node-a/run/containerd/containerd.sock")
        );
    }

    #[test]
    fn ready_nodes_reads_the_ready_condition() {
        let json = r#"{"items":[
            {"metadata":{"name":"node-a"},"status":{"conditions":[{"type":"Ready","status":"True"}]}},
            {"metadata":{"name":"node-b"},"status":{"conditions":[{"type":"Ready","status":"False"}]}},
            {"metadata":{"name":"node-c"},"status":{}}]}"#;
        assert_eq!(ready_nodes(json), BTreeSet::from(["node-a".to_owned()]));
        assert!(ready_nodes("not json").is_empty());
    }

    #[test]
    fn options_are_checked() {
        let bad_dir = ClusterOptions {
            dir: "/var/lib/x".into(),
            ..ClusterOptions::default()
        };
        assert_eq!(
            validate(&bad_dir).unwrap_err().metric_label(),
            "invalid_options"
        );
        let too_many = ClusterOptions {
            kube_nodes: 4,
            ..ClusterOptions::default()
        };
        assert_eq!(
            validate(&too_many).unwrap_err().metric_label(),
            "invalid_options"
        );
        assert!(validate(&ClusterOptions::default()).is_ok());
    }

    #[test]
    fn containerd_config_names_the_pause_image_and_the_node_cni_dir() {
        let config = containerd_config(Path::new("/tmp/c/nodes/node-a"));
        assert!(config.contains(r#"sandbox_image = "localhost/ferrovip-pause:1""#));
        assert!(config.contains("restrict_oom_score_adj = true"));
        assert!(config.contains("SystemdCgroup = false"));
        assert!(config.contains(r#"conf_dir = "/tmp/c/nodes/node-a/cni""#));
        let cni: serde_json::Value = serde_json::from_str(&cni_config(2)).unwrap();
        assert_eq!(
            cni["plugins"][0]["ipam"]["ranges"][0][0]["subnet"],
            "10.244.2.0/24"
        );
    }
}
