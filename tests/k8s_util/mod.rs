//! The Kubernetes-mode harness of tests/e2e_k8s.rs: a lab of network namespaces, a real
//! kube-apiserver (v1.20) with etcd in the lab's switch namespace, a capture on the lab bridge,
//! and one `ferrovip agent` per node running with that node's least-privilege identity
//! (KUBECONFIG of user `ferrovip:<node>`, bound to the agent's ClusterRole from config/rbac).
//!
//! There is no kubelet or controller manager: the harness creates the Node objects (with a
//! `Ready` condition and the lab address as InternalIP) and flips their conditions itself.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferrovip::lab::{Lab, LabSpec, NodeInfo, ProcId, Sniffer, log_tail, masters_since};
use ferrovip_e2e::{ApiServer, ApiServerOptions, node_object, node_ready_condition};
use futures::StreamExt;
use kube::api::WatchParams;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, WatchEvent};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

pub const AGENT: &str = env!("CARGO_BIN_EXE_ferrovip");
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_virtualips.yaml"
);
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
/// Runs a command as the chart's agent container (see the script).
const RESTRICTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/restricted.sh");
/// The agent's ClusterRole in config/rbac.
const AGENT_ROLE: &str = "ferrovip-agent";
/// The lab's subnet is 192.0.2.0/24 with nodes from .11; the API server takes .1 on the bridge.
const BRIDGE: &str = "192.0.2.1/24";
/// How often waits poll the API server or the kernel.
const POLL: Duration = Duration::from_millis(20);
const LOG_TAIL_LINES: usize = 40;

/// One transition log line of an agent (`event = "transition"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub vip: String,
    pub vrid: u64,
    pub from: String,
    pub to: String,
    pub reason: String,
}

pub struct K8sLab {
    // Field order is drop order: the capture and the server stop before the namespaces go.
    pub sniffer: Sniffer,
    pub api: ApiServer,
    pub lab: Lab,
    agents: Vec<Option<ProcId>>,
    /// Every agent ever started, for the log dump of a failed test.
    history: Vec<(usize, ProcId)>,
    manifests: usize,
    /// Agents run as the chart's container does ([`K8sLab::restrict`]).
    restricted: bool,
}

impl Drop for K8sLab {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (node, id) in &self.history {
            if let Ok((_, path)) = self.lab.proc_info(*id) {
                eprintln!(
                    "---- agent on {} ({}):\n{}",
                    self.lab.node(*node).name,
                    path.display(),
                    log_tail(&path, LOG_TAIL_LINES)
                );
            }
        }
        eprintln!(
            "---- kube-apiserver:\n{}",
            log_tail(&self.api.apiserver_log(), 15)
        );
    }
}

impl K8sLab {
    /// A lab of `nodes` IPv4-only nodes, the API server on its bridge, and a capture.
    pub fn new(nodes: usize) -> K8sLab {
        // Namespaces of earlier runs that were killed before their Drop ran.
        let _ = Lab::cleanup_stale();
        let started = Instant::now();
        let lab = Lab::create(LabSpec {
            nodes,
            ipv6: false,
            bridge_ipv4: Some(BRIDGE.parse().expect("bridge prefix")),
            ..LabSpec::default()
        })
        .expect("build the lab (needs root)");
        let api = ApiServer::start(ApiServerOptions {
            netns: Some(lab.switch_netns().to_owned()),
            bind: lab.bridge_ipv4().expect("bridge address").into(),
            dir: lab.dir().join("apiserver"),
            node_users: lab.nodes().iter().map(|n| n.name.clone()).collect(),
            build_script: Some(BUILD_SCRIPT.into()),
            // Who sent which request: the exact count of each node's status writes.
            audit_log: true,
            ..ApiServerOptions::default()
        })
        .expect("start etcd and kube-apiserver");
        let sniffer = Sniffer::start(&lab).expect("capture on the lab bridge");
        eprintln!(
            "lab {} ({nodes} nodes) and API server {} ready after {:?}",
            lab.prefix(),
            api.url(),
            started.elapsed()
        );
        K8sLab {
            sniffer,
            api,
            agents: vec![None; nodes],
            history: Vec::new(),
            manifests: 0,
            restricted: false,
            lab,
        }
    }

    pub fn node(&self, i: usize) -> &NodeInfo {
        self.lab.node(i)
    }

    pub fn name(&self, i: usize) -> &str {
        &self.lab.node(i).name
    }

    pub fn ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.lab.node(i).ipv4)
    }

    pub fn node_count(&self) -> usize {
        self.agents.len()
    }

    // -----------------------------------------------------------------------------------------
    // kubectl as admin

    /// `kubectl` as admin; a failure is returned, not a panic.
    pub fn kubectl_output(&self, args: &[&str]) -> Output {
        self.api.kubectl(args).expect("run kubectl")
    }

    /// `kubectl` as admin; panics on failure, returns stdout.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.api
            .kubectl_ok(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// Writes `doc` (a JSON object, possibly a `List`) to a file and `kubectl apply`s it.
    pub fn apply(&mut self, doc: &Value) {
        self.manifests += 1;
        let path = self
            .api
            .dir()
            .join(format!("manifest-{}.json", self.manifests));
        std::fs::write(&path, doc.to_string()).expect("write manifest");
        self.kubectl(&["apply", "-f", &path.display().to_string()]);
    }

    /// The usual opening: [`K8sLab::new`], [`K8sLab::install`], then every agent started and
    /// listing.
    pub fn running(nodes: usize) -> K8sLab {
        let mut lab = K8sLab::new(nodes);
        lab.install();
        lab.start_agents();
        lab
    }

    /// The CRD, the agent's RBAC bound to the node identities, and one Ready Node object per
    /// lab node with its address as InternalIP.
    pub fn install(&mut self) {
        let started = Instant::now();
        self.kubectl(&["apply", "-f", CRD]);
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/virtualips.ferrovip.io",
        ]);
        self.assert_accepts_empty_strings();
        self.kubectl(&["apply", "-f", RBAC]);
        self.api
            .bind_agent_group(AGENT_ROLE)
            .expect("bind the agent group");
        let nodes: Vec<Value> = self.lab.nodes().iter().map(node_object).collect();
        self.apply(&json!({"apiVersion": "v1", "kind": "List", "items": nodes}));
        for i in 0..self.node_count() {
            let ready = self.kubectl(&[
                "get",
                "node",
                self.name(i),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            assert_eq!(
                ready,
                "True",
                "{} was created without its status",
                self.name(i)
            );
        }
        eprintln!("CRD, RBAC and Nodes installed in {:?}", started.elapsed());
    }

    /// The agents write `message: ""` in conditions, as Kubernetes itself does. A
    /// kube-apiserver v1.20 compiled with Go 1.19 or later rejects every empty string in a
    /// custom resource as `null`: its vendored OpenAPI type validator compares
    /// `reflect.Zero(T)` with `reflect.ValueOf(data)`, which newer Go makes equal for `""`.
    /// Say so here instead of failing later on missing status.
    fn assert_accepts_empty_strings(&mut self) {
        self.manifests += 1;
        let path = self
            .api
            .dir()
            .join(format!("manifest-{}.json", self.manifests));
        let probe = json!({
            "apiVersion": "ferrovip.io/v1alpha1",
            "kind": "VirtualIP",
            "metadata": {"name": "empty-string-probe"},
            "spec": {
                "addresses": ["192.0.2.250/24"],
                "interface": "eth0",
                "nodeSelector": {"matchLabels": {"probe": ""}},
            },
        });
        std::fs::write(&path, probe.to_string()).expect("write manifest");
        let out = self.kubectl_output(&[
            "create",
            "--dry-run=server",
            "-f",
            &path.display().to_string(),
        ]);
        assert!(
            out.status.success(),
            "this kube-apiserver build rejects empty strings in custom resources, so every \
             status write fails: rebuild it with the OpenAPI type validator fixed (in \
             vendor/k8s.io/kube-openapi/pkg/validation/validate/type.go, `if data == nil || \
             reflect.DeepEqual(reflect.Zero(...), ...)` must become `if data == nil`): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    /// Sets node `i`'s Ready condition through the status subresource, as a kubelet (or the
    /// node lifecycle controller) would.
    pub fn set_node_ready(&self, i: usize, ready: bool) {
        let patch = json!({"status": {"conditions": [node_ready_condition(ready)]}}).to_string();
        self.kubectl(&[
            "patch",
            "node",
            self.name(i),
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch,
        ]);
    }

    /// `kubectl label node` (`key=value`, or `key-` to remove).
    pub fn label_node(&self, i: usize, label: &str) {
        self.kubectl(&["label", "node", self.name(i), label, "--overwrite"]);
    }

    /// The VirtualIP as JSON (`Value::Null` when it does not exist).
    pub fn vip(&self, name: &str) -> Value {
        let out = self.kubectl_output(&["get", "vip", name, "-o", "json"]);
        if !out.status.success() {
            return Value::Null;
        }
        serde_json::from_slice(&out.stdout).expect("kubectl -o json")
    }

    /// Polls the VirtualIP until `pred` holds; returns it and how long that took.
    pub fn wait_vip(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Value, Duration) {
        let started = Instant::now();
        loop {
            let vip = self.vip(name);
            if pred(&vip) {
                return (vip, started.elapsed());
            }
            assert!(
                started.elapsed() < timeout,
                "VirtualIP {name}: {what} not seen within {timeout:?}; last status:\n{}",
                serde_json::to_string_pretty(&vip["status"]).unwrap_or_default()
            );
            std::thread::sleep(POLL);
        }
    }

    /// events.k8s.io/v1 Events in `namespace` about VirtualIP `name`.
    pub fn events_about(&self, namespace: &str, name: &str) -> Vec<Value> {
        let out = self.kubectl(&["get", "events.events.k8s.io", "-n", namespace, "-o", "json"]);
        let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["regarding"]["kind"] == "VirtualIP" && e["regarding"]["name"] == name)
            .cloned()
            .collect()
    }

    /// Waits for an Event with `reason` about VirtualIP `name` (in kube-system: v1.20 takes
    /// Events about cluster-scoped objects nowhere else).
    pub fn wait_event(&self, name: &str, reason: &str, timeout: Duration) -> Value {
        let started = Instant::now();
        loop {
            if let Some(event) = self
                .events_about("kube-system", name)
                .into_iter()
                .find(|e| e["reason"] == reason)
            {
                return event;
            }
            assert!(
                started.elapsed() < timeout,
                "no {reason} Event about VirtualIP {name} within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Where the audit log ends now, for [`K8sLab::status_requests_since`].
    pub fn audit_mark(&self) -> u64 {
        std::fs::metadata(self.api.audit_log_path()).map_or(0, |m| m.len())
    }

    /// Requests to write VirtualIP status since `mark`, per user (`ferrovip:<node>`), counted
    /// from the API server's audit log; failed ones included (they cost the server as much).
    pub fn status_requests_since(&self, mark: u64) -> BTreeMap<String, usize> {
        let log = std::fs::read(self.api.audit_log_path()).unwrap_or_default();
        let from = usize::try_from(mark).unwrap_or(usize::MAX).min(log.len());
        let mut counts = BTreeMap::new();
        for line in String::from_utf8_lossy(&log[from..]).lines() {
            let Ok(entry) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let object = &entry["objectRef"];
            let write = ["patch", "update"].contains(&entry["verb"].as_str().unwrap_or(""));
            if write && object["resource"] == "virtualips" && object["subresource"] == "status" {
                *counts.entry(text(&entry["user"]["username"])).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Watches every VirtualIP for `window` and records the writes. Blocks for `window`.
    pub fn count_writes(&self, window: Duration) -> Writes {
        self.write_counter(window).join()
    }

    /// Starts counting writes in the background for `window`.
    pub fn write_counter(&self, window: Duration) -> WriteCounter {
        let kubeconfig = self.api.host_admin_kubeconfig().to_owned();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            block_on(async move {
                let client = client_from(&kubeconfig).await;
                count_writes(client, window, ready_tx).await
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the write counter started watching");
        WriteCounter { thread }
    }

    // -----------------------------------------------------------------------------------------
    // Agents

    /// From now on agents run as the chart's DaemonSet runs them: NET_ADMIN and NET_RAW only,
    /// no_new_privs, every mount read-only but the state directory, /proc/sys read-only;
    /// after `ferrovip node-setup --promote-secondaries` on every node (its privileged init
    /// container), whose output is returned per node.
    pub fn restrict(&mut self) -> Vec<String> {
        self.restricted = true;
        (0..self.node_count())
            .map(|i| {
                let state = self.state_dir(i);
                std::fs::create_dir_all(&state).expect("state directory");
                let state = state.display().to_string();
                let out = self
                    .lab
                    .exec(
                        i,
                        &[
                            AGENT,
                            "node-setup",
                            "--promote-secondaries",
                            "--state-dir",
                            &state,
                        ],
                    )
                    .expect("run node-setup");
                assert!(
                    out.status.success(),
                    "node-setup on {}: {}",
                    self.name(i),
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8_lossy(&out.stdout).into_owned()
            })
            .collect()
    }

    /// Starts the agent on node `i` in Kubernetes mode with that node's identity.
    pub fn start_agent(&mut self, i: usize) -> ProcId {
        self.start_agent_with(i, &[])
    }

    /// [`K8sLab::start_agent`] with more arguments for `ferrovip agent`.
    pub fn start_agent_with(&mut self, i: usize, extra: &[&str]) -> ProcId {
        let name = self.name(i).to_owned();
        let starts = self.history.iter().filter(|(n, _)| *n == i).count();
        let kubeconfig = format!("KUBECONFIG={}", self.api.node_kubeconfig(&name).display());
        let state_dir = self.state_dir(i).display().to_string();
        let mut args = Vec::new();
        if self.restricted {
            std::fs::create_dir_all(self.state_dir(i)).expect("state directory");
            args.extend(["sh", RESTRICTED, &state_dir, "--"]);
        }
        args.extend([
            "env",
            &kubeconfig,
            "FERROVIP_LOG=info",
            AGENT,
            "--log-format",
            "json",
            "agent",
            "--node-name",
            &name,
            // Per node (one host, one /run): the saved cluster snapshot above all.
            "--state-dir",
            &state_dir,
        ]);
        args.extend_from_slice(extra);
        let id = self
            .lab
            .spawn(i, &args, format!("{name}.{}.log", starts + 1))
            .expect("spawn agent");
        self.agents[i] = Some(id);
        self.history.push((i, id));
        id
    }

    /// Starts every agent and waits until each has listed VirtualIPs and Nodes.
    pub fn start_agents(&mut self) {
        for i in 0..self.node_count() {
            self.start_agent(i);
        }
        for i in 0..self.node_count() {
            self.wait_listed(i);
        }
    }

    /// Waits until the current agent on `i` logged its first list of the cluster state.
    pub fn wait_listed(&self, i: usize) {
        self.wait_log(i, "the first list", Duration::from_secs(20), |l| {
            l["message"] == "cluster state listed"
        });
    }

    /// Node `i`'s state directory (kept across its agent's restarts).
    pub fn state_dir(&self, i: usize) -> std::path::PathBuf {
        self.lab.dir().join(format!("state-{}", self.name(i)))
    }

    fn agent(&self, i: usize) -> ProcId {
        self.agents[i].unwrap_or_else(|| panic!("no agent on {}", self.name(i)))
    }

    /// Signals the agent on `i`; returns the instant just before the signal.
    pub fn signal(&self, i: usize, signal: Signal) -> Instant {
        let at = Instant::now();
        self.lab.kill(self.agent(i), signal).expect("signal agent");
        at
    }

    pub fn wait_exit(&self, i: usize) {
        let status = self
            .lab
            .wait(self.agent(i), Duration::from_secs(5))
            .expect("wait agent");
        assert!(status.is_some(), "agent on {} did not exit", self.name(i));
    }

    pub fn assert_running(&self, i: usize) {
        let status = self.lab.exit_status(self.agent(i)).expect("agent status");
        assert!(
            status.is_none(),
            "agent on {} exited: {status:?}",
            self.name(i)
        );
    }

    /// Every JSON line the current agent on `i` logged so far.
    pub fn log(&self, i: usize) -> Vec<Value> {
        let (_, path) = self.lab.proc_info(self.agent(i)).expect("proc info");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn wait_log(
        &self,
        i: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let started = Instant::now();
        loop {
            if let Some(line) = self.log(i).into_iter().find(|l| pred(l)) {
                return line;
            }
            self.assert_running(i);
            assert!(
                started.elapsed() < timeout,
                "{} did not log {what} within {timeout:?}",
                self.name(i)
            );
            std::thread::sleep(POLL);
        }
    }

    /// The transitions the current agent on `i` logged.
    pub fn transitions(&self, i: usize) -> Vec<Transition> {
        self.log(i)
            .iter()
            .filter(|l| l["event"] == "transition")
            .map(|l| Transition {
                vip: text(&l["vip"]),
                vrid: l["vrid"].as_u64().unwrap_or(0),
                from: text(&l["from"]),
                to: text(&l["to"]),
                reason: text(&l["reason"]),
            })
            .collect()
    }

    /// Per node, the transitions its current agent logged (empty for nodes without one).
    pub fn all_transitions(&self) -> Vec<Vec<Transition>> {
        (0..self.node_count())
            .map(|i| {
                if self.agents[i].is_some() {
                    self.transitions(i)
                } else {
                    Vec::new()
                }
            })
            .collect()
    }

    // -----------------------------------------------------------------------------------------
    // The wire and the kernel

    /// Sources of adverts with priority > 0 for `vrid` since `since`, in order.
    pub fn masters_since(&self, vrid: u8, since: Instant) -> Vec<IpAddr> {
        masters_since(&self.sniffer.events_since(since), vrid, since)
    }

    /// Waits until node `i` alone advertised `vrid` over a whole window of four 100 ms
    /// intervals.
    pub fn wait_master(&self, vrid: u8, i: usize, timeout: Duration) {
        let window = Duration::from_millis(450);
        let started = Instant::now();
        loop {
            let now = Instant::now();
            let masters = self.masters_since(vrid, now - window);
            if now >= started + window && masters == [self.ip(i)] {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "VRID {vrid}: expected {} alone as master within {timeout:?}, the wire shows {masters:?}",
                self.name(i)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    pub fn has(&self, i: usize, addr: &str) -> bool {
        self.lab
            .has_address(i, addr.parse().expect("address"))
            .expect("ip addr")
    }

    /// The nodes holding `addr` on eth0.
    pub fn holders(&self, addr: &str) -> Vec<usize> {
        (0..self.node_count())
            .filter(|i| self.has(*i, addr))
            .collect()
    }

    /// Polls until exactly `expected` hold `addr`; returns how long that took.
    pub fn wait_holders(&self, addr: &str, expected: &[usize], timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let holders = self.holders(addr);
            if holders == expected {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{addr}: expected on nodes {expected:?} within {timeout:?}, held by {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// One ping from the switch namespace (where the API server runs), up to 3 tries.
    pub fn ping(&self, addr: &str) -> bool {
        (0..3).any(|_| {
            self.lab
                .exec_switch(&["ping", "-c", "1", "-W", "1", addr])
                .expect("ping")
                .status
                .success()
        })
    }

    /// A ping from the switch namespace that sends every 20 ms and exits at the first reply
    /// (or after `deadline`).
    pub fn spawn_ping(&self, addr: &str, deadline: Duration) -> Pinger {
        let child = Command::new("ip")
            .args(["netns", "exec", self.lab.switch_netns(), "ping", "-n", "-q"])
            .args(["-c", "1", "-i", "0.02", "-w"])
            .arg(deadline.as_secs().max(1).to_string())
            .arg(addr)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn ping");
        Pinger { child }
    }

    /// Runs `args` in node `i`; panics when it fails.
    pub fn exec_ok(&self, i: usize, args: &[&str]) -> String {
        let out = self.lab.exec(i, args).expect("exec");
        assert!(
            out.status.success(),
            "`{}` on {} failed: {}",
            args.join(" "),
            self.name(i),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `text` to a file in the lab directory; returns its path.
    pub fn write_file(&self, name: &str, text: &str) -> String {
        let path = self.lab.dir().join(name);
        std::fs::write(&path, text).expect("write file");
        path.display().to_string()
    }
}

/// Writes to VirtualIPs counted in the background; see [`K8sLab::write_counter`].
pub struct WriteCounter {
    thread: std::thread::JoinHandle<Writes>,
}

/// What a [`WriteCounter`] saw.
#[derive(Debug, Default)]
pub struct Writes {
    /// Changes to any VirtualIP (a no-op apply changes nothing and is not seen here).
    pub total: usize,
    /// Every version written, in order: (VirtualIP name, its status).
    pub statuses: Vec<(String, Value)>,
}

impl WriteCounter {
    /// Waits for the end of the window.
    pub fn join(self) -> Writes {
        self.thread
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

async fn count_writes(
    client: Client,
    window: Duration,
    ready: std::sync::mpsc::Sender<()>,
) -> Writes {
    let gvk = GroupVersionKind::gvk("ferrovip.io", "v1alpha1", "VirtualIP");
    let api: Api<DynamicObject> = Api::all_with(
        client,
        &ApiResource::from_gvk_with_plural(&gvk, "virtualips"),
    );
    let version = api
        .list_metadata(&ListParams::default())
        .await
        .expect("list VirtualIPs")
        .metadata
        .resource_version
        .expect("a list has a resourceVersion");
    let stream = api
        .watch(&WatchParams::default(), &version)
        .await
        .expect("watch VirtualIPs");
    let _ = ready.send(());
    let mut writes = Writes::default();
    let mut stream = std::pin::pin!(stream);
    let deadline = tokio::time::Instant::now() + window;
    loop {
        let item = match tokio::time::timeout_at(deadline, stream.next()).await {
            Err(_) | Ok(None) => break,
            Ok(Some(item)) => item.expect("watch event"),
        };
        let object = match item {
            WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o) => o,
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error: {e:?}"),
        };
        writes.total += 1;
        let name = object.metadata.name.clone().unwrap_or_default();
        writes.statuses.push((name, object.data["status"].clone()));
    }
    writes
}

fn block_on<T>(f: impl Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(f)
}

/// A running ping; see [`K8sLab::spawn_ping`].
pub struct Pinger {
    child: Child,
}

impl Pinger {
    /// Waits for the first reply; returns the instant ping exited and whether it got one.
    pub fn wait(&mut self) -> (Instant, bool) {
        loop {
            if let Some(status) = self.child.try_wait().expect("poll ping") {
                return (Instant::now(), status.success());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Pinger {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn client_from(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to client config");
    Client::try_from(config).expect("kube client")
}

pub fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

/// The condition of `type_` in a VirtualIP's status.
pub fn condition<'a>(vip: &'a Value, type_: &str) -> Option<&'a Value> {
    vip["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

/// The `status.nodes[]` entry of `node`.
pub fn node_entry<'a>(vip: &'a Value, node: &str) -> Option<&'a Value> {
    vip["status"]["nodes"]
        .as_array()?
        .iter()
        .find(|n| n["name"] == node)
}

/// Names in `status.nodes[]`, in the server's order.
pub fn entry_names(vip: &Value) -> Vec<String> {
    vip["status"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| text(&n["name"]))
        .collect()
}

/// The reasons of `node`'s entry.
pub fn reasons(vip: &Value, node: &str) -> Vec<String> {
    node_entry(vip, node)
        .and_then(|n| n["reasons"].as_array())
        .into_iter()
        .flatten()
        .map(text)
        .collect()
}
