//! Kubernetes-mode benchmark: the real `ferrovip agent` on three lab nodes (network
//! namespaces), each with its node's least-privilege identity, against a real kube-apiserver
//! v1.20 with etcd and an audit log.
//!
//! Run as root: `cargo bench --bench k8s [-- --apply-rounds N --vips N --groups G --window S
//! --skip-shared --skip-failover --keep]` (about 3-4 minutes with the defaults). Prints a table
//! and writes the same figures to `target/bench-k8s.json`.
//!
//! 1. Apply latency: `kubectl apply` of one new VirtualIP (fresh address, 100 ms adverts) →
//!    gratuitous ARP on the bridge, first ping reply from another node (node-c), and
//!    `status.master` set. Once as a new VRRP instance (explicit VRID), once joining a shared
//!    instance that already runs. Target: the VIP answers within 1 s.
//! 2. Scale: `--vips` VirtualIPs (no VRID, identical settings → one shared instance; and
//!    `--groups` groups with distinct base priorities → that many instances). Time until all
//!    have `status.master`, the write burst while they settle, then over `--window` seconds
//!    the write requests per node (counted in the API server's audit log by user
//!    `ferrovip:<node>`; target ≤ 1/s per node), and each agent's RSS (target ≤ 40 MiB) and
//!    CPU.
//! 3. Failover at scale: SIGKILL the master's agent with every VIP in one shared instance;
//!    the takeover on the wire, and until the new master holds (and announced) every address.
//! 4. `--services N`: N Services of type LoadBalancer from one pool (issue 12's Service
//!    target; `k8s/services.rs`): every Service with an address, annotated with its master,
//!    every address on node-a, the writes per node, steady state.
//!
//! Priorities follow tests/e2e_k8s.rs: base 100, node-a +50, node-b +40, node-c −40.
//!
//! Environment: `FERROVIP_BENCH_LOG` is the agents' log filter (`FERROVIP_LOG` syntax, default
//! `info`); `FERROVIP_BENCH_APISERVER_ARGS` adds kube-apiserver flags (whitespace-separated,
//! e.g. `-v=3 --watch-cache-sizes=services#20000`).

// Shared with the other benchmarks; this one uses part of it.
#[allow(dead_code)]
mod common;
#[path = "k8s/services.rs"]
mod lb_services;
use common::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferrovip::crd::VirtualIP;
use ferrovip::lab::{
    FailoverQuery, Lab, LabSpec, ProcId, Sniffer, log_tail, master_down_interval, masters_since,
    measure_failover,
};
use ferrovip::source::reflect::{Echoes, reflect};
use ferrovip_e2e::{ApiServer, ApiServerOptions, node_object};
use futures::{StreamExt, TryStreamExt};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{reflector, watcher};
use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::{Value, json};

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_virtualips.yaml"
);
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
const AGENT_ROLE: &str = "ferrovip-agent";
/// The lab's subnet is 192.0.2.0/24 with nodes from .11; the API server takes .1 on the bridge.
const BRIDGE: &str = "192.0.2.1/24";
const NODES: usize = 3;
/// node-a (priority 150): master of everything.
const MASTER: usize = 0;
/// node-b (priority 140): takes over when node-a's agent dies.
const SUCCESSOR: usize = 1;
/// node-c pings the applied VIPs: "another node".
const PINGER: usize = 2;
const PRIORITY_BASE: u8 = 100;
const SUCCESSOR_PRIORITY: u8 = 140;
const INTERVAL: Duration = Duration::from_millis(100);
/// Apply-latency VIPs: .100 + round (own VRID 10 + round), .150 + round (shared), seed .149.
const APPLY_OWN_HOST: u8 = 100;
const APPLY_SHARED_HOST: u8 = 150;
const APPLY_SEED_HOST: u8 = 149;
const APPLY_FIRST_VRID: u8 = 10;
const MAX_APPLY_ROUNDS: usize = 40;
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const APPLY_PAUSE: Duration = Duration::from_millis(300);
/// Bulk VIPs are /32s from the benchmarking range 198.18.0.0/15, 250 per third octet.
const BULK_OCTETS: [u8; 2] = [198, 18];
const BULK_PER_OCTET: usize = 250;
const MAX_BULK: usize = BULK_PER_OCTET * 256;
const CREATE_CONCURRENCY: usize = 16;
/// Settled means no VirtualIP changed for this long.
const QUIET: Duration = Duration::from_secs(3);
const QUIET_TIMEOUT: Duration = Duration::from_secs(20);
const AGENT_LISTED_TIMEOUT: Duration = Duration::from_secs(30);
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);
const BULK_DELETE_TIMEOUT: Duration = Duration::from_secs(900);
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);
const LOG_LINES: usize = 25;
const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];
/// The issue's targets.
const APPLY_TARGET: Duration = Duration::from_secs(1);
const WRITES_TARGET_PER_NODE_PER_S: f64 = 1.0;
const RSS_TARGET_KIB: u64 = 40 * 1024;
/// Issue 12's target with 10,000 VirtualIPs (`--scale`).
const RSS_TARGET_SCALE_KIB: u64 = 150 * 1024;

fn rss_target_kib(vips: usize) -> u64 {
    if vips > 1000 {
        RSS_TARGET_SCALE_KIB
    } else {
        RSS_TARGET_KIB
    }
}

/// One instant and the wall clock at the same moment: audit entries carry wall-clock time,
/// everything else here is measured with `Instant`.
static ANCHOR: LazyLock<(Instant, SystemTime)> =
    LazyLock::new(|| (Instant::now(), SystemTime::now()));

/// Apply latency, scale and failover of the agent in Kubernetes mode.
#[derive(Parser, Debug)]
#[command(name = "k8s")]
struct Args {
    /// VirtualIPs applied one after another, per variant (own instance / shared instance).
    #[arg(long, default_value_t = 7)]
    apply_rounds: usize,
    /// VirtualIPs of the scale phases (0 skips them and the failover).
    #[arg(long, default_value_t = 1000)]
    vips: usize,
    /// Second scale variant: this many groups of distinct settings (0 or 1 skips it).
    #[arg(long, default_value_t = 10)]
    groups: usize,
    /// Steady-state measurement window, seconds.
    #[arg(long, default_value_t = 30)]
    window: u64,
    /// How long the VIPs of a scale phase may take to settle, seconds.
    #[arg(long, default_value_t = 120)]
    settle_timeout: u64,
    /// Skip killing the master with every VIP in one instance.
    #[arg(long)]
    skip_failover: bool,
    /// Skip the shared-instance scale variant (and so the failover).
    #[arg(long)]
    skip_shared: bool,
    /// Keep the lab directory (agent logs, API server audit log) for a post-mortem.
    #[arg(long)]
    keep: bool,
    /// The scale scenario of issue 12: this many VirtualIPs in `--groups` groups (default
    /// 4), nothing else (`--apply-rounds 0 --skip-shared --skip-failover`), `--runs` times
    /// (default 3), a 60 s window unless `--window` says otherwise; target: settled (every
    /// VirtualIP shows a master and Ready) within 60 s.
    #[arg(long)]
    scale: Option<usize>,
    /// How many times each scale variant runs (fresh agents each time); medians printed.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Issue 12's Service scenario: this many Services of type LoadBalancer from one pool,
    /// `--runs` times, nothing else unless `--vips`/`--apply-rounds` are given (a 60 s
    /// window unless `--window` says otherwise, settle timeout 600 s).
    #[arg(long, default_value_t = 0)]
    services: usize,
    /// Added by `cargo bench`; `cargo test --benches` runs the binary without it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if let Some(n) = args.scale {
        args.vips = n;
        args.apply_rounds = 0;
        args.skip_shared = true;
        args.skip_failover = true;
        let given = |flag: &str| std::env::args().any(|a| a == flag);
        if !given("--groups") {
            args.groups = 4;
        }
        if !given("--runs") {
            args.runs = 3;
        }
        if !given("--window") {
            args.window = 60;
        }
    }
    if args.services > 0 {
        let given = |flag: &str| std::env::args().any(|a| a == flag);
        if !given("--vips") && args.scale.is_none() {
            args.vips = 0;
            args.groups = 0;
        }
        if !given("--apply-rounds") {
            args.apply_rounds = 0;
        }
        if !given("--window") {
            args.window = 60;
        }
        if !given("--settle-timeout") {
            args.settle_timeout = 600;
        }
    }
    if !args.bench {
        println!("k8s: a root benchmark of real daemons; run it with `cargo bench --bench k8s`");
        return Ok(());
    }
    ensure!(
        args.apply_rounds <= MAX_APPLY_ROUNDS,
        "--apply-rounds is at most {MAX_APPLY_ROUNDS}"
    );
    ensure!(args.vips <= MAX_BULK, "--vips is at most {MAX_BULK}");
    ensure!(
        args.services <= lb_services::MAX_SERVICES,
        "--services is at most {}",
        lb_services::MAX_SERVICES
    );
    ensure!(
        args.groups <= args.vips.max(1),
        "--groups must not exceed --vips"
    );
    ensure!(args.window > 0, "--window must be positive");
    LazyLock::force(&ANCHOR);
    watch_for_interrupts()?;
    let started = Instant::now();
    let removed = Lab::cleanup_stale()?;
    if !removed.is_empty() {
        println!(
            "removed {} namespaces left behind by earlier labs",
            removed.len()
        );
    }
    let clock_ticks = clock_ticks_per_second();
    println!(
        "ferrovip Kubernetes-mode benchmark: {NODES} nodes, kube-apiserver {}, VRRPv3 every {} ms, priorities 150 / 140 / 60",
        ferrovip_e2e::APISERVER_VERSION,
        INTERVAL.as_millis()
    );
    let mut cluster = Cluster::create()?;
    if args.keep {
        cluster.lab.keep_dir(true);
        cluster.api.keep_dir(true);
        println!("keeping {}", cluster.lab.dir().display());
    }
    let mut report = Report::new(&args);

    if args.apply_rounds > 0 {
        let outcome = apply_latency(&mut cluster, args.apply_rounds, &mut report.apply_rounds);
        note_failure(&mut report.errors, "apply", outcome)?;
        report.apply = ApplySummary::of(&report.apply_rounds);
    }
    if args.vips > 0 {
        let settle_timeout = Duration::from_secs(args.settle_timeout);
        let window = Duration::from_secs(args.window);
        // The shared variant runs last so that the failover finds it in place.
        let mut variants = Vec::new();
        if args.groups > 1 {
            variants.push(Layout::Groups(args.groups));
        }
        if !args.skip_shared {
            variants.push(Layout::Shared);
        }
        for layout in variants {
            report
                .plan_ms
                .push((layout.label(), plan_time(layout, args.vips)));
            for _ in 0..args.runs.max(1) {
                let outcome = scale(
                    &mut cluster,
                    layout,
                    args.vips,
                    settle_timeout,
                    window,
                    clock_ticks,
                );
                if let Some(bulk) = note_failure(&mut report.errors, &layout.label(), outcome)? {
                    report.scale.push(bulk);
                }
            }
        }
        let shared_ready = report
            .scale
            .last()
            .is_some_and(|s| s.layout == "shared" && s.instances == 1);
        if !args.skip_failover && shared_ready {
            let outcome = failover_at_scale(&mut cluster, args.vips);
            report.failover = note_failure(&mut report.errors, "failover", outcome)?;
        }
    }
    if args.services > 0 {
        for _ in 0..args.runs.max(1) {
            let outcome = lb_services::services_scale(
                &mut cluster,
                args.services,
                Duration::from_secs(args.settle_timeout),
                Duration::from_secs(args.window),
                clock_ticks,
            );
            if let Some(run) = note_failure(&mut report.errors, "services", outcome)? {
                report.services.push(run);
            }
        }
    }
    report.runtime_s = round3(started.elapsed().as_secs_f64());
    drop(cluster);

    println!("\n{}", report.table());
    let json_path = json_path();
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("figures written to {}", json_path.display());
    if !report.errors.is_empty() {
        let first: Vec<&str> = report
            .errors
            .iter()
            .filter_map(|e| e.lines().next())
            .collect();
        bail!(
            "{} phase(s) failed:\n  {}",
            report.errors.len(),
            first.join("\n  ")
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Interrupts, clocks, paths

/// The wall-clock time of `at`.
fn wall(at: Instant) -> SystemTime {
    let (instant, system) = *ANCHOR;
    if at >= instant {
        system + at.duration_since(instant)
    } else {
        system - instant.duration_since(at)
    }
}

/// `target/bench-k8s.json`, found from the agent binary Cargo built for this bench
/// (`target/<profile>/ferrovip`), so CARGO_TARGET_DIR is honoured.
fn json_path() -> PathBuf {
    Path::new(AGENT_BINARY)
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("target"))
        .join("bench-k8s.json")
}

fn clock_ticks_per_second() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// VirtualIP documents

/// A VirtualIP with the lab defaults: VRRPv3 every 100 ms, base `base`, node-a +50, node-b
/// +40, node-c −40.
fn vip_doc(name: &str, address: &str, vrid: Option<u8>, base: u8, label: &str) -> Value {
    let mut spec = json!({
        "addresses": [address],
        "interface": "eth0",
        "vrrp": {"advertisementInterval": format!("{}ms", INTERVAL.as_millis())},
        "priority": {
            "base": base,
            "preferredNodes": [
                {"nodeName": "node-a", "weight": 50},
                {"nodeName": "node-b", "weight": 40},
                {"nodeName": "node-c", "weight": -40},
            ],
        },
    });
    if let Some(vrid) = vrid {
        spec["virtualRouterId"] = json!(vrid);
    }
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": name, "labels": {"bench": label}},
        "spec": spec,
    })
}

fn bulk_address(i: usize) -> Ipv4Addr {
    let [a, b] = BULK_OCTETS;
    Ipv4Addr::new(
        a,
        b,
        (i / BULK_PER_OCTET) as u8,
        (i % BULK_PER_OCTET + 1) as u8,
    )
}

fn lab_address(host: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, host)
}

// ---------------------------------------------------------------------------------------------
// What the harness sees of VirtualIP status (a watch of its own)

/// One VirtualIP as the harness's watch saw it.
#[derive(Debug, Clone, Default)]
struct Seen {
    resource_version: Option<String>,
    master: Option<String>,
    /// When `status.master` last took its current value.
    master_since: Option<Instant>,
    /// When `status.master` was first set.
    first_master_at: Option<Instant>,
    /// When the status first showed an active master and every node's entry.
    complete_at: Option<Instant>,
    /// When the status first showed a master, `state: Active` and `Ready=True`.
    ready_at: Option<Instant>,
    vrid: Option<i64>,
    /// Changes (new resourceVersions) seen.
    changes: u64,
    /// The last two statuses, to show what changes.
    status: Option<Value>,
    previous_status: Option<Value>,
}

#[derive(Debug, Default)]
struct WatchState {
    vips: HashMap<String, Seen>,
    tally: WatchTally,
    /// The VirtualIPs are in instances of more than 8 (the scale phase): healthy backups list
    /// themselves on each instance's first VirtualIP only, so the master's entry alone is a
    /// complete status too.
    large_instances: bool,
}

impl WatchState {
    fn observe(&mut self, vip: &VirtualIP, at: Instant) {
        let Some(name) = vip.metadata.name.clone() else {
            return;
        };
        let seen = self.vips.entry(name).or_default();
        // A re-list repeats objects it already delivered.
        if seen.resource_version.is_some() && seen.resource_version == vip.metadata.resource_version
        {
            return;
        }
        seen.resource_version = vip.metadata.resource_version.clone();
        seen.changes += 1;
        self.tally.changed(at);
        seen.previous_status = seen.status.take();
        seen.status = serde_json::to_value(&vip.status).ok();
        let status = vip.status.clone().unwrap_or_default();
        if status.master != seen.master {
            seen.master = status.master.clone();
            seen.master_since = Some(at);
        }
        if seen.master.is_some() && seen.first_master_at.is_none() {
            seen.first_master_at = Some(at);
        }
        seen.vrid = status.virtual_router_id;
        let masters = status.nodes.iter().filter(|n| n.state == "Master").count();
        let backups = status.nodes.iter().filter(|n| n.state == "Backup").count();
        let entries = status.nodes.len();
        let complete = status.state.as_deref() == Some("Active")
            && status.master.is_some()
            && masters == 1
            && masters + backups == entries
            && (entries == NODES || (self.large_instances && entries == 1));
        if complete && seen.complete_at.is_none() {
            seen.complete_at = Some(at);
        }
        let ready = status.master.is_some()
            && status.state.as_deref() == Some("Active")
            && status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
        if ready && seen.ready_at.is_none() {
            seen.ready_at = Some(at);
        }
    }
}

impl Watched for WatchState {
    type Object = VirtualIP;
    const KIND: &'static str = "VirtualIP";

    fn observe(&mut self, vip: &VirtualIP, at: Instant) {
        WatchState::observe(self, vip, at);
    }

    fn forget(&mut self, name: &str) {
        self.vips.remove(name);
    }

    fn tally(&mut self) -> &mut WatchTally {
        &mut self.tally
    }
}

/// What every harness watch counts besides its objects.
#[derive(Debug, Default)]
struct WatchTally {
    /// Every change of any object (new resourceVersion, deletion), and the last one.
    changes: u64,
    last_change: Option<Instant>,
    /// The first list is complete.
    listed: bool,
    error: Option<String>,
}

impl WatchTally {
    fn changed(&mut self, at: Instant) {
        self.changes += 1;
        self.last_change = Some(at);
    }
}

/// What a harness watch keeps (VirtualIPs here, Services in `k8s/services.rs`).
trait Watched: Default + Send + 'static {
    type Object: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static;
    const KIND: &'static str;
    /// A new or changed object (also one a re-list repeats).
    fn observe(&mut self, object: &Self::Object, at: Instant);
    /// A deleted object, by name.
    fn forget(&mut self, name: &str);
    fn tally(&mut self) -> &mut WatchTally;
}

/// A watch of the harness's own, run on the cluster's runtime. It is the agents' reflector
/// ([`reflect`]): kube-apiserver v1.20 sometimes leaves every Service watch silent in a
/// burst, this one included, which would hold the measurement for the watch's 290 s timeout.
/// The harness's creates and [`Watch::probe`] tell it to list again.
struct Watch<S> {
    state: Arc<Mutex<S>>,
    /// The harness's accepted creates, to be heard back through the watch.
    echoes: Echoes,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Drop for Watch<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The VirtualIPs as the harness sees them.
type StatusWatch = Watch<WatchState>;

impl<S: Watched> Watch<S> {
    fn start(
        runtime: &tokio::runtime::Runtime,
        api: Api<S::Object>,
        config: watcher::Config,
    ) -> Watch<S> {
        let state = Arc::new(Mutex::new(S::default()));
        let echoes = Echoes::default();
        let task = runtime.spawn({
            let state = state.clone();
            let echoes = echoes.clone();
            async move {
                let (_, writer) = reflector::store();
                let stream = reflect(api, config, writer, |_| {}, Some(echoes), S::KIND);
                let mut stream = std::pin::pin!(stream);
                while let Some(event) = stream.next().await {
                    let at = Instant::now();
                    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
                    match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => {
                            state.observe(&o, at);
                        }
                        Ok(watcher::Event::Delete(o)) => {
                            if let Some(name) = &kube::Resource::meta(&o).name {
                                state.forget(name);
                            }
                            state.tally().changed(at);
                        }
                        Ok(watcher::Event::InitDone) => state.tally().listed = true,
                        Ok(watcher::Event::Init) => {}
                        Err(e) => state.tally().error = Some(e.to_string()),
                    }
                }
            }
        });
        Watch {
            state,
            echoes,
            task,
        }
    }

    /// The watch has brought nothing for a while although it should (a phase has not
    /// settled): the objects' latest version, read from the API server (metadata only), which
    /// the watch must reach within the echo timeout or list again.
    fn probe(&self, runtime: &tokio::runtime::Runtime, api: &Api<S::Object>, labels: &str) {
        let list = runtime.block_on(api.list_metadata(&ListParams::default().labels(labels)));
        if let Ok(list) = list
            && let Some(latest) = list
                .items
                .iter()
                .filter_map(|o| o.metadata.resource_version.as_deref()?.parse::<u64>().ok())
                .max()
        {
            self.echoes.expect_progress(latest);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, S> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_listed(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            check_interrupted()?;
            let (listed, error) = {
                let mut state = self.lock();
                let tally = state.tally();
                (tally.listed, tally.error.clone())
            };
            if listed {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "the harness's {} watch did not list within {timeout:?}: {error:?}",
                    S::KIND
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl StatusWatch {
    fn get(&self, name: &str) -> Option<Seen> {
        self.lock().vips.get(name).cloned()
    }
}

/// The last change a watch saw once nothing changed for QUIET (`None`: still changing after
/// QUIET_TIMEOUT, warned about).
fn wait_quiet(
    last_change: impl Fn() -> Option<Instant>,
    what: &str,
) -> anyhow::Result<Option<Instant>> {
    let deadline = Instant::now() + QUIET_TIMEOUT;
    loop {
        check_interrupted()?;
        let last = last_change();
        let now = Instant::now();
        if let Some(last) = last
            && now.duration_since(last) >= QUIET
        {
            return Ok(Some(last));
        }
        if now >= deadline {
            eprintln!("  warning: {what} still change {QUIET_TIMEOUT:?} after settling");
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The start of a scale phase: the agents, their CPU and the API server's counters before
/// the creates, and the creates themselves.
struct Phase {
    pids: Vec<i32>,
    cpu_start: Vec<Option<CpuSample>>,
    metrics_before: BTreeMap<String, f64>,
    started: Instant,
    create: Duration,
}

impl Phase {
    /// Creates every document, CREATE_CONCURRENCY in flight.
    /// Each accepted create goes to `echoes` (the harness watch's).
    fn create_all<K>(
        cluster: &Cluster,
        api: Api<K>,
        docs: Vec<K>,
        what: &str,
        echoes: &Echoes,
    ) -> anyhow::Result<Phase>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + Serialize + std::fmt::Debug,
    {
        let pids: Vec<i32> = (0..NODES)
            .map(|i| cluster.pid(i))
            .collect::<anyhow::Result<_>>()?;
        let cpu_start = pids.iter().map(|p| cpu_sample(*p)).collect();
        let (metrics_before, _) = apiserver_metrics(cluster)?;
        let count = docs.len();
        let started = Instant::now();
        cluster.runtime.block_on(async {
            futures::stream::iter(docs)
                .map(|doc| {
                    let api = api.clone();
                    async move { api.create(&PostParams::default(), &doc).await }
                })
                .buffer_unordered(CREATE_CONCURRENCY)
                .try_for_each(|created| {
                    echoes.expect(created.meta());
                    async { Ok(()) }
                })
                .await
        })?;
        let create = started.elapsed();
        println!("  created {count} {what} in {:.2} s", create.as_secs_f64());
        Ok(Phase {
            pids,
            cpu_start,
            metrics_before,
            started,
            create,
        })
    }

    /// Settled: the agents' CPU now, and the API server's load since the start (printed).
    fn settled(
        &self,
        cluster: &Cluster,
    ) -> anyhow::Result<(Vec<Option<CpuSample>>, ApiServerLoad)> {
        let cpu = self.pids.iter().map(|p| cpu_sample(*p)).collect();
        let load = ApiServerLoad::between(
            &self.metrics_before,
            apiserver_metrics(cluster)?,
            self.started.elapsed(),
        );
        println!(
            "  API server while settling ({:.0} s, every client): {}; watchers {:?}",
            load.span_s,
            load.summary(),
            load.watchers
        );
        Ok((cpu, load))
    }
}

/// Prints the settling writes per node; returns each agent's share of a core meanwhile.
fn settling_report(
    cluster: &Cluster,
    writes: &NodeWrites,
    cpu_start: &[Option<CpuSample>],
    cpu_settled: &[Option<CpuSample>],
    clock_ticks: u64,
) -> BTreeMap<String, f64> {
    for i in 0..NODES {
        let w = writes.of(cluster.name(i));
        println!(
            "  settling writes {}: {} (peak {}/s) {:?}",
            cluster.name(i),
            w.total,
            w.peak_per_second,
            w.by_request
        );
    }
    (0..NODES)
        .map(|i| {
            (
                cluster.name(i).to_owned(),
                cpu_percent(cpu_start[i], cpu_settled[i], clock_ticks),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The API server's audit log

#[derive(Debug, Clone)]
struct AuditEntry {
    at: SystemTime,
    user: String,
    verb: String,
    /// `resource` or `resource/subresource`.
    resource: String,
    code: u16,
}

/// Reads the audit log incrementally (it only grows: rotation is off).
struct AuditLog {
    path: PathBuf,
    offset: u64,
    partial: String,
    entries: Vec<AuditEntry>,
}

impl AuditLog {
    fn new(path: PathBuf) -> AuditLog {
        AuditLog {
            path,
            offset: 0,
            partial: String::new(),
            entries: Vec::new(),
        }
    }

    fn refresh(&mut self) -> anyhow::Result<()> {
        let mut file = match std::fs::File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.push_str(&String::from_utf8_lossy(&bytes));
        let Some(end) = self.partial.rfind('\n') else {
            return Ok(());
        };
        let complete: String = self.partial.drain(..=end).collect();
        for line in complete.lines() {
            if let Some(entry) = parse_audit_line(line) {
                self.entries.push(entry);
            }
        }
        Ok(())
    }

    /// Write requests by node identity received in `[from, to)`.
    fn node_writes(&mut self, from: SystemTime, to: SystemTime) -> anyhow::Result<NodeWrites> {
        self.refresh()?;
        let span = to.duration_since(from).unwrap_or_default().as_secs_f64();
        let mut per_node: BTreeMap<String, WriteCount> = BTreeMap::new();
        let mut per_second: BTreeMap<(String, u64), u64> = BTreeMap::new();
        for entry in self
            .entries
            .iter()
            .filter(|e| e.at >= from && e.at < to)
            .filter(|e| WRITE_VERBS.contains(&e.verb.as_str()))
        {
            let Some(node) = entry.user.strip_prefix("ferrovip:") else {
                continue;
            };
            let count = per_node.entry(node.to_owned()).or_default();
            count.total += 1;
            *count
                .by_request
                .entry(format!("{} {}", entry.verb, entry.resource))
                .or_default() += 1;
            if !(200..300).contains(&entry.code) {
                count.failed += 1;
            }
            let second = entry.at.duration_since(from).unwrap_or_default().as_secs();
            *per_second.entry((node.to_owned(), second)).or_default() += 1;
        }
        for ((node, _), n) in per_second {
            let count = per_node.entry(node).or_default();
            count.peak_per_second = count.peak_per_second.max(n);
        }
        for count in per_node.values_mut() {
            count.per_second = if span > 0.0 {
                round3(count.total as f64 / span)
            } else {
                0.0
            };
        }
        Ok(NodeWrites {
            span_s: round3(span),
            per_node,
        })
    }
}

fn parse_audit_line(line: &str) -> Option<AuditEntry> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["stage"] != "ResponseComplete" {
        return None;
    }
    let at =
        k8s_openapi::jiff::Timestamp::from_str(v["requestReceivedTimestamp"].as_str()?).ok()?;
    let object = &v["objectRef"];
    let mut resource = object["resource"].as_str().unwrap_or("-").to_owned();
    if let Some(sub) = object["subresource"].as_str() {
        resource = format!("{resource}/{sub}");
    }
    Some(AuditEntry {
        at: SystemTime::from(at),
        user: v["user"]["username"].as_str()?.to_owned(),
        verb: v["verb"].as_str()?.to_owned(),
        resource,
        code: v["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
    })
}

/// Write requests of one node over a span.
#[derive(Debug, Clone, Default, Serialize)]
struct WriteCount {
    total: u64,
    per_second: f64,
    /// The most writes in any one second of the span.
    peak_per_second: u64,
    /// Answered with a non-2xx code.
    failed: u64,
    /// `verb resource[/subresource]` → count.
    by_request: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, Serialize)]
struct NodeWrites {
    span_s: f64,
    per_node: BTreeMap<String, WriteCount>,
}

impl NodeWrites {
    fn of(&self, node: &str) -> WriteCount {
        self.per_node.get(node).cloned().unwrap_or_default()
    }
}

// ---------------------------------------------------------------------------------------------
// Process cost

#[derive(Debug, Clone, Copy)]
struct CpuSample {
    at: Instant,
    ticks: u64,
}

fn cpu_sample(pid: i32) -> Option<CpuSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime 15 (all threads).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(CpuSample {
        at: Instant::now(),
        ticks: utime + stime,
    })
}

fn cpu_percent(before: Option<CpuSample>, after: Option<CpuSample>, clock_ticks: u64) -> f64 {
    match (before, after) {
        (Some(b), Some(a)) if a.at > b.at => round3(
            a.ticks.saturating_sub(b.ticks) as f64
                / clock_ticks as f64
                / a.at.duration_since(b.at).as_secs_f64()
                * 100.0,
        ),
        _ => 0.0,
    }
}

/// Resident memory of a process, KiB.
#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Memory {
    rss_kib: u64,
    /// Peak RSS since the process started (`VmHWM`).
    peak_rss_kib: u64,
    /// Heap and other private memory (`RssAnon`); the rest is the mapped binary and libraries.
    anon_kib: u64,
    file_kib: u64,
    threads: u64,
}

fn memory(pid: i32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_rss_kib: field("VmHWM:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:"),
        threads: field("Threads:"),
    }
}

/// Transitions an agent logged (`event = "transition"`) with a wall-clock time in
/// `[from, to)`, as `vip vrid from→to`.
fn logged_transitions(log: &Path, from: SystemTime, to: SystemTime) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|l| l["event"] == "transition")
        .filter(|l| {
            l["timestamp"]
                .as_str()
                .and_then(|t| k8s_openapi::jiff::Timestamp::from_str(t).ok())
                .map(SystemTime::from)
                .is_some_and(|t| t >= from && t < to)
        })
        .map(|l| {
            format!(
                "{} vrid {} {}→{} ({})",
                l["vip"].as_str().unwrap_or("?"),
                l["vrid"],
                l["from"].as_str().unwrap_or("?"),
                l["to"].as_str().unwrap_or("?"),
                l["reason"].as_str().unwrap_or("")
            )
        })
        .collect()
}

/// Paths whose values differ between two JSON values (at most `limit`).
fn changed_paths(a: &Value, b: &Value, path: &str, limit: usize, out: &mut Vec<String>) {
    if out.len() >= limit || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                changed_paths(
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    &format!("{path}.{k}"),
                    limit,
                    out,
                );
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                changed_paths(p, q, &format!("{path}[{i}]"), limit, out);
            }
        }
        _ => out.push(format!("{path}: {a} → {b}")),
    }
}

/// eth0's transmitted frames and drops on node `node`.
fn tx_counters(netns: &str) -> Option<(u64, u64)> {
    let out = Command::new("ip")
        .args(["-n", netns, "-j", "-s", "link", "show", "eth0"])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&out.stdout).ok()?;
    let tx = &v[0]["stats64"]["tx"];
    Some((tx["packets"].as_u64()?, tx["dropped"].as_u64().unwrap_or(0)))
}

fn exe_is_agent(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let agent = Path::new(AGENT_BINARY).canonicalize().ok();
    exe.is_some() && exe == agent
}

// ---------------------------------------------------------------------------------------------
// The cluster: lab, API server, capture, agents, an admin client

struct Cluster {
    // Field order is drop order: the harness's client and watch go before the server, the
    // capture and the server before the namespaces.
    watch: StatusWatch,
    client: kube::Client,
    runtime: tokio::runtime::Runtime,
    audit: AuditLog,
    sniffer: Sniffer,
    api: ApiServer,
    lab: Lab,
    agents: Vec<Option<ProcId>>,
    starts: Vec<usize>,
    manifests: usize,
}

impl Cluster {
    fn create() -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let lab = Lab::create(LabSpec {
            nodes: NODES,
            ipv6: false,
            bridge_ipv4: Some(BRIDGE.parse().context("bridge prefix")?),
            ..LabSpec::default()
        })?;
        let api = ApiServer::start(ApiServerOptions {
            netns: Some(lab.switch_netns().to_owned()),
            bind: lab.bridge_ipv4().context("bridge address")?.into(),
            dir: lab.dir().join("apiserver"),
            node_users: lab.nodes().iter().map(|n| n.name.clone()).collect(),
            build_script: Some(BUILD_SCRIPT.into()),
            audit_log: true,
            extra_args: std::iter::once(lb_services::NODE_PORT_RANGE.to_owned())
                .chain(
                    std::env::var("FERROVIP_BENCH_APISERVER_ARGS")
                        .unwrap_or_default()
                        .split_whitespace()
                        .map(str::to_owned),
                )
                .collect(),
            ..ApiServerOptions::default()
        })?;
        let sniffer = Sniffer::start(&lab)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("harness runtime")?;
        let kubeconfig = api.host_admin_kubeconfig().to_owned();
        let client = runtime.block_on(async move {
            let kubeconfig = Kubeconfig::read_from(&kubeconfig)?;
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })?;
        let audit = AuditLog::new(api.audit_log_path());
        // A stand-in until the CRD is installed: a watch started before would back off.
        let idle = runtime.spawn(async {});
        let mut cluster = Cluster {
            watch: StatusWatch {
                state: Arc::default(),
                echoes: Echoes::default(),
                task: idle,
            },
            client,
            runtime,
            audit,
            sniffer,
            api,
            lab,
            agents: vec![None; NODES],
            starts: vec![0; NODES],
            manifests: 0,
        };
        cluster.install()?;
        cluster.watch = StatusWatch::start(
            &cluster.runtime,
            Api::all(cluster.client.clone()),
            watcher::Config::default(),
        );
        cluster.watch.wait_listed(AGENT_LISTED_TIMEOUT)?;
        cluster.start_agents()?;
        println!(
            "lab {} and API server {} (audit log on) ready, agents listening, after {:.1} s",
            cluster.lab.prefix(),
            cluster.api.url(),
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    fn name(&self, i: usize) -> &str {
        &self.lab.node(i).name
    }

    fn ip(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.lab.node(i).ipv4)
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(self.api.kubectl_ok(args)?)
    }

    /// Writes `doc` to a file and `kubectl apply`s it; returns how long kubectl ran.
    fn apply(&mut self, doc: &Value) -> anyhow::Result<Duration> {
        self.manifests += 1;
        let path = self
            .api
            .dir()
            .join(format!("manifest-{}.json", self.manifests));
        std::fs::write(&path, doc.to_string())?;
        let started = Instant::now();
        self.kubectl(&["apply", "-f", &path.display().to_string()])?;
        Ok(started.elapsed())
    }

    /// The CRD, the agent's RBAC bound to the node identities, one Ready Node per lab node
    /// with its address as InternalIP (there is no kubelet).
    fn install(&mut self) -> anyhow::Result<()> {
        self.kubectl(&["apply", "-f", CRD])?;
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/virtualips.ferrovip.io",
        ])?;
        // The agents watch pools too (Services of type LoadBalancer, `--services`).
        self.kubectl(&["apply", "-f", lb_services::POOL_CRD])?;
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/loadbalancerpools.ferrovip.io",
        ])?;
        self.kubectl(&["apply", "-f", RBAC])?;
        self.api.bind_agent_group(AGENT_ROLE)?;
        let nodes: Vec<Value> = self.lab.nodes().iter().map(node_object).collect();
        self.apply(&json!({"apiVersion": "v1", "kind": "List", "items": nodes}))?;
        Ok(())
    }

    fn start_agent(&mut self, i: usize) -> anyhow::Result<()> {
        self.starts[i] += 1;
        let name = self.name(i).to_owned();
        let kubeconfig = format!("KUBECONFIG={}", self.api.node_kubeconfig(&name).display());
        // The agents' log filter (FERROVIP_LOG's syntax): FERROVIP_BENCH_LOG, else info.
        let log = format!(
            "FERROVIP_LOG={}",
            std::env::var("FERROVIP_BENCH_LOG").unwrap_or_else(|_| "info".into())
        );
        // Per node (one host, one /run): the saved cluster snapshot above all.
        let state_dir = self.lab.dir().join(format!("state-{name}"));
        let state_dir = state_dir.display().to_string();
        let id = self.lab.spawn(
            i,
            &[
                "env",
                &kubeconfig,
                &log,
                AGENT_BINARY,
                "--log-format",
                "json",
                "agent",
                "--node-name",
                &name,
                "--state-dir",
                &state_dir,
            ],
            format!("{name}.{}.log", self.starts[i]),
        )?;
        self.agents[i] = Some(id);
        Ok(())
    }

    fn start_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..NODES {
            self.start_agent(i)?;
        }
        for i in 0..NODES {
            self.wait_listed(i)?;
        }
        Ok(())
    }

    /// SIGTERM every agent, then start fresh ones: each scale phase measures memory of an
    /// agent that saw only that phase.
    fn restart_agents(&mut self) -> anyhow::Result<()> {
        self.stop_agents()?;
        self.start_agents()
    }

    fn stop_agents(&mut self) -> anyhow::Result<()> {
        for i in 0..NODES {
            if let Some(id) = self.agents[i].take() {
                self.lab.kill(id, Signal::SIGTERM)?;
                if self.lab.wait(id, Duration::from_secs(5))?.is_none() {
                    self.lab.kill(id, Signal::SIGKILL)?;
                    self.lab.wait(id, Duration::from_secs(5))?;
                }
            }
        }
        Ok(())
    }

    fn agent(&self, i: usize) -> anyhow::Result<ProcId> {
        self.agents[i].with_context(|| format!("no agent runs on {}", self.name(i)))
    }

    fn pid(&self, i: usize) -> anyhow::Result<i32> {
        Ok(self.lab.pid(self.agent(i)?)? as i32)
    }

    fn log_path(&self, i: usize) -> anyhow::Result<PathBuf> {
        Ok(self.lab.proc_info(self.agent(i)?)?.1)
    }

    fn wait_listed(&self, i: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + AGENT_LISTED_TIMEOUT;
        let path = self.log_path(i)?;
        loop {
            check_interrupted()?;
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.contains("\"cluster state listed\"") {
                return Ok(());
            }
            self.check_alive()?;
            if Instant::now() >= deadline {
                bail!(
                    "{} did not list the cluster within {AGENT_LISTED_TIMEOUT:?}\n{}",
                    self.name(i),
                    self.logs()
                );
            }
            std::thread::sleep(POLL);
        }
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        for i in 0..NODES {
            if let Some(id) = self.agents[i]
                && let Some(status) = self.lab.exit_status(id)?
            {
                bail!(
                    "the agent on {} exited ({status})\n{}",
                    self.name(i),
                    self.logs()
                );
            }
        }
        if let Some(failure) = self.sniffer.failure() {
            bail!("the capture stopped: {failure}");
        }
        Ok(())
    }

    /// The agents' log tails for an error message; the lab directory is kept for the rest.
    fn logs(&self) -> String {
        self.lab.keep_dir(true);
        self.api.keep_dir(true);
        let mut out = format!(
            "(logs kept in {}, API server files in {})\n",
            self.lab.dir().display(),
            self.api.dir().display()
        );
        for i in 0..NODES {
            if let Some(Ok((_, log))) = self.agents[i].map(|id| self.lab.proc_info(id)) {
                let _ = writeln!(
                    out,
                    "--- {} ({}) ---\n{}",
                    self.name(i),
                    log.display(),
                    log_tail(&log, LOG_LINES)
                );
            }
        }
        out
    }

    /// What the API server and the agents say about VirtualIP `name`.
    fn diagnose(&self, name: &str) -> String {
        let status = self
            .api
            .kubectl(&["get", "vip", name, "-o", "jsonpath={.status}"])
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let mut out = format!("status {status}");
        for i in 0..NODES {
            let Ok(log) = self.log_path(i) else {
                continue;
            };
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().filter(|l| l.contains(name)).collect();
            let _ = write!(
                out,
                "\n      {}: {}",
                self.name(i),
                lines[lines.len().saturating_sub(3)..].join("\n        ")
            );
        }
        out
    }

    /// The IPv4 addresses node `i` holds besides its own: on `eth0`, or through the agent's
    /// bulk-set routes (large sets).
    fn vip_addresses(&self, i: usize) -> anyhow::Result<HashSet<Ipv4Addr>> {
        let own = self.lab.node(i).ipv4;
        let mut held = self.lab.held_ipv4(i)?;
        held.remove(&own);
        Ok(held)
    }

    /// Deletes the VirtualIPs labelled `bench=label` and waits until no node holds any
    /// address `theirs` matches.
    fn delete_all(
        &mut self,
        label: &str,
        theirs: fn(&Ipv4Addr) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let api: Api<VirtualIP> = Api::all(self.client.clone());
        let selector = format!("bench={label}");
        self.runtime.block_on(async {
            api.delete_collection(
                &DeleteParams::default(),
                &ListParams::default().labels(&selector),
            )
            .await
        })?;
        self.wait_released(theirs, started + RELEASE_TIMEOUT)?;
        Ok(started.elapsed())
    }

    /// Deletes the VirtualIPs labelled `bench=<label>` with the agents stopped, then starts
    /// them and waits until they have released the addresses. 10,000 deletions beside the
    /// agents' status writes took the API server over 10 minutes (its delete-collection
    /// answered 504 and went on deleting); alone, they take about a minute.
    fn delete_all_quietly(
        &mut self,
        label: &str,
        theirs: fn(&Ipv4Addr) -> bool,
    ) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.stop_agents()?;
        let api: Api<VirtualIP> = Api::all(self.client.clone());
        let selector = format!("bench={label}");
        let params = ListParams::default().labels(&selector);
        let deadline = started + BULK_DELETE_TIMEOUT;
        let mut asked: Option<Instant> = None;
        loop {
            check_interrupted()?;
            let left = self
                .runtime
                .block_on(api.list_metadata(&params.clone().limit(1)))?;
            if left.items.is_empty() {
                break;
            }
            if Instant::now() >= deadline {
                bail!(
                    "VirtualIPs labelled {selector} still exist {BULK_DELETE_TIMEOUT:?} after the delete began"
                );
            }
            // Again only if the last request is long over: the server goes on with one that
            // timed out (504).
            if asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(90)) {
                asked = Some(Instant::now());
                match self
                    .runtime
                    .block_on(api.delete_collection(&DeleteParams::default(), &params))
                {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 504 => {
                        eprintln!(
                            "  delete-collection timed out (504); the server goes on deleting"
                        );
                    }
                    Err(e) => return Err(e.into()),
                }
            } else {
                sleep(Duration::from_secs(1))?;
            }
        }
        self.start_agents()?;
        self.wait_released(theirs, Instant::now() + RELEASE_TIMEOUT)?;
        Ok(started.elapsed())
    }

    /// Waits until no agent holds an address `theirs` selects.
    fn wait_released(
        &mut self,
        theirs: fn(&Ipv4Addr) -> bool,
        deadline: Instant,
    ) -> anyhow::Result<()> {
        loop {
            check_interrupted()?;
            let mut held = 0;
            for i in 0..NODES {
                if self.agents[i].is_some() {
                    held += self.vip_addresses(i)?.iter().filter(|a| theirs(a)).count();
                }
            }
            if held == 0 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{held} addresses still held {RELEASE_TIMEOUT:?} after the VirtualIPs were deleted\n{}",
                    self.logs()
                );
            }
            sleep(Duration::from_millis(100))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Apply latency

/// A ping from node `PINGER` every 20 ms that exits at the first reply.
struct Pinger {
    child: Child,
}

impl Pinger {
    fn spawn(netns: &str, addr: Ipv4Addr, deadline: Duration) -> anyhow::Result<Pinger> {
        let child = Command::new("ip")
            .args([
                "netns", "exec", netns, "ping", "-n", "-q", "-c", "1", "-i", "0.02",
            ])
            .arg("-w")
            .arg(deadline.as_secs().max(1).to_string())
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn ping")?;
        Ok(Pinger { child })
    }

    /// Waits for ping to exit: the instant it did and whether it got a reply.
    fn wait(&mut self) -> anyhow::Result<(Instant, bool)> {
        loop {
            check_interrupted()?;
            if let Some(status) = self.child.try_wait()? {
                return Ok((Instant::now(), status.success()));
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
enum ApplyVariant {
    /// An explicit VRID: a new VRRP instance, which waits Master_Down_Interval in Backup.
    NewInstance,
    /// No VRID, settings of a running shared instance: the VIP joins it.
    JoinsSharedInstance,
}

impl ApplyVariant {
    fn label(self) -> &'static str {
        match self {
            ApplyVariant::NewInstance => "new instance (own VRID)",
            ApplyVariant::JoinsSharedInstance => "joins a shared instance",
        }
    }
}

/// One `kubectl apply`, all times from just before kubectl started, in ms.
#[derive(Debug, Clone, Serialize)]
struct ApplyRound {
    variant: ApplyVariant,
    name: String,
    address: Ipv4Addr,
    kubectl_ms: f64,
    garp_ms: Option<f64>,
    /// First echo reply at node-c (ping every 20 ms from before the apply).
    ping_ms: Option<f64>,
    status_master_ms: Option<f64>,
    /// `status.master`, Active and every node's entry.
    status_complete_ms: Option<f64>,
    master: Option<String>,
    /// The node whose gratuitous ARP came first.
    garp_from: Option<String>,
    /// When the VIP did not answer: its status and the agents' log lines naming it.
    problem: Option<String>,
    /// Nodes that advertised the VIP's VRID with priority > 0 during the round, in order: a
    /// new instance starts in Backup on every node, and whoever's Master_Down_Interval runs
    /// out first advertises first.
    masters_on_wire: Vec<String>,
}

fn apply_rounds(
    cluster: &mut Cluster,
    rounds: usize,
    results: &mut Vec<ApplyRound>,
) -> anyhow::Result<()> {
    let mdi = master_down_interval(150, INTERVAL);
    println!(
        "\n== 1. kubectl apply → VIP answers ({rounds} VIPs per variant; a new instance waits Master_Down_Interval(150) = {:.1} ms in Backup first)",
        millis(mdi)
    );
    for variant in [ApplyVariant::NewInstance, ApplyVariant::JoinsSharedInstance] {
        if variant == ApplyVariant::JoinsSharedInstance {
            // The instance the measured VIPs join: running, node-a master.
            let seed = "apply-shared-seed";
            let address = format!("{}/24", lab_address(APPLY_SEED_HOST));
            cluster.apply(&vip_doc(seed, &address, None, PRIORITY_BASE, "apply"))?;
            wait_status(cluster, seed, APPLY_TIMEOUT, |s| s.complete_at.is_some())?;
            sleep(APPLY_PAUSE)?;
        }
        for round in 0..rounds {
            check_interrupted()?;
            cluster.check_alive()?;
            let record = apply_round(cluster, variant, round)?;
            println!(
                "  {:<24} {}/{rounds} {:<15} kubectl {:>6.1}  GARP {:>7}  ping {:>7}  status.master {:>7}  complete {:>7}",
                variant.label(),
                round + 1,
                record.address,
                record.kubectl_ms,
                opt_ms(record.garp_ms),
                opt_ms(record.ping_ms),
                opt_ms(record.status_master_ms),
                opt_ms(record.status_complete_ms),
            );
            if let Some(problem) = &record.problem {
                println!("    did not answer: {problem}");
            }
            if record.garp_from.as_deref() != Some("node-a")
                || record.masters_on_wire.iter().any(|m| m != "node-a")
            {
                println!(
                    "    first GARP from {:?}; masters on the wire in order: {:?}",
                    record.garp_from, record.masters_on_wire
                );
            }
            results.push(record);
            sleep(APPLY_PAUSE)?;
        }
    }
    Ok(())
}

fn is_apply_address(a: &Ipv4Addr) -> bool {
    let [a, b, c, d] = a.octets();
    [a, b, c] == [192, 0, 2] && d >= APPLY_OWN_HOST
}

fn is_bulk_address(a: &Ipv4Addr) -> bool {
    let [a, b, ..] = a.octets();
    [a, b] == BULK_OCTETS
}

/// The apply rounds, then the VIPs are deleted whether the rounds succeeded or not.
fn apply_latency(
    cluster: &mut Cluster,
    rounds: usize,
    results: &mut Vec<ApplyRound>,
) -> anyhow::Result<()> {
    let outcome = apply_rounds(cluster, rounds, results);
    check_interrupted()?;
    let took = cluster.delete_all("apply", is_apply_address)?;
    println!(
        "  deleted the apply VIPs; every address released {:.2} s after the delete started",
        took.as_secs_f64()
    );
    outcome
}

fn apply_round(
    cluster: &mut Cluster,
    variant: ApplyVariant,
    round: usize,
) -> anyhow::Result<ApplyRound> {
    let (name, address, vrid) = match variant {
        ApplyVariant::NewInstance => (
            format!("apply-own-{round}"),
            lab_address(APPLY_OWN_HOST + round as u8),
            Some(APPLY_FIRST_VRID + round as u8),
        ),
        ApplyVariant::JoinsSharedInstance => (
            format!("apply-shared-{round}"),
            lab_address(APPLY_SHARED_HOST + round as u8),
            None,
        ),
    };
    let doc = vip_doc(
        &name,
        &format!("{address}/24"),
        vrid,
        PRIORITY_BASE,
        "apply",
    );
    let mut pinger = Pinger::spawn(&cluster.lab.node(PINGER).netns, address, APPLY_TIMEOUT)?;
    // ping sends its first request right after it starts; the apply must come later.
    std::thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    let kubectl = cluster.apply(&doc)?;
    let garp = cluster.sniffer.wait_for(
        |e| e.at >= started && e.announced() == Some(IpAddr::V4(address)),
        APPLY_TIMEOUT,
    );
    let (ping_done, replied) = pinger.wait()?;
    let seen = wait_status(cluster, &name, APPLY_TIMEOUT, |s| s.complete_at.is_some()).ok();
    let since = |at: Instant| millis(at.saturating_duration_since(started));
    let node_of_mac = |mac: ferrovip::lab::wire::MacAddr| {
        cluster
            .lab
            .nodes()
            .iter()
            .find(|n| n.mac == mac)
            .map_or_else(|| mac.to_string(), |n| n.name.clone())
    };
    let node_of_ip = |ip: IpAddr| node_name(&cluster.lab, ip);
    let masters_on_wire = seen
        .as_ref()
        .and_then(|s| s.vrid)
        .and_then(|v| u8::try_from(v).ok())
        .map(|vrid| {
            masters_since(&cluster.sniffer.events_since(started), vrid, started)
                .into_iter()
                .map(node_of_ip)
                .collect()
        })
        .unwrap_or_default();
    let problem = (!replied || garp.is_none()).then(|| cluster.diagnose(&name));
    Ok(ApplyRound {
        problem,
        variant,
        name,
        address,
        kubectl_ms: millis(kubectl),
        garp_from: garp.as_ref().map(|g| node_of_mac(g.src_mac)),
        garp_ms: garp.map(|g| since(g.at)),
        masters_on_wire,
        ping_ms: replied.then(|| since(ping_done)),
        status_master_ms: seen.as_ref().and_then(|s| s.first_master_at).map(since),
        status_complete_ms: seen.as_ref().and_then(|s| s.complete_at).map(since),
        master: seen.and_then(|s| s.master),
    })
}

/// Waits until the harness's watch shows VirtualIP `name` satisfying `pred`.
fn wait_status(
    cluster: &Cluster,
    name: &str,
    timeout: Duration,
    pred: impl Fn(&Seen) -> bool,
) -> anyhow::Result<Seen> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        if let Some(seen) = cluster.watch.get(name).filter(|s| pred(s)) {
            return Ok(seen);
        }
        if Instant::now() >= deadline {
            bail!(
                "VirtualIP {name}: status not complete within {timeout:?} (watch error: {:?})",
                cluster.watch.lock().tally.error
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[derive(Debug, Clone, Serialize)]
struct ApplySummary {
    variant: ApplyVariant,
    rounds: usize,
    kubectl: Option<Stats>,
    garp: Option<Stats>,
    ping: Option<Stats>,
    status_master: Option<Stats>,
    status_complete: Option<Stats>,
    /// Rounds without a ping reply / without a GARP.
    no_reply: usize,
    no_garp: usize,
    /// Rounds in which another node than node-a announced first or advertised as master.
    other_master_first: usize,
    /// Every round answered within the 1 s target.
    within_target: bool,
}

impl ApplySummary {
    fn of(rounds: &[ApplyRound]) -> Vec<ApplySummary> {
        [ApplyVariant::NewInstance, ApplyVariant::JoinsSharedInstance]
            .into_iter()
            .filter_map(|variant| {
                let rs: Vec<&ApplyRound> = rounds.iter().filter(|r| r.variant == variant).collect();
                if rs.is_empty() {
                    return None;
                }
                let no_reply = rs.iter().filter(|r| r.ping_ms.is_none()).count();
                Some(ApplySummary {
                    variant,
                    rounds: rs.len(),
                    kubectl: Stats::of(rs.iter().map(|r| r.kubectl_ms)),
                    garp: Stats::of(rs.iter().filter_map(|r| r.garp_ms)),
                    ping: Stats::of(rs.iter().filter_map(|r| r.ping_ms)),
                    status_master: Stats::of(rs.iter().filter_map(|r| r.status_master_ms)),
                    status_complete: Stats::of(rs.iter().filter_map(|r| r.status_complete_ms)),
                    no_reply,
                    no_garp: rs.iter().filter(|r| r.garp_ms.is_none()).count(),
                    other_master_first: rs
                        .iter()
                        .filter(|r| {
                            r.garp_from.as_deref() != Some("node-a")
                                || r.masters_on_wire.iter().any(|m| m != "node-a")
                        })
                        .count(),
                    within_target: no_reply == 0
                        && rs
                            .iter()
                            .all(|r| r.ping_ms.is_some_and(|p| p < millis(APPLY_TARGET))),
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Scale

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Identical settings, no VRID: one shared instance.
    Shared,
    /// This many groups, each with its own base priority: one instance per group.
    Groups(usize),
}

impl Layout {
    fn label(self) -> String {
        match self {
            Layout::Shared => "shared".into(),
            Layout::Groups(n) => format!("{n}-groups"),
        }
    }

    /// Name and base priority of VIP `i` of `count`.
    fn vip(self, i: usize, count: usize) -> (String, u8) {
        match self {
            Layout::Shared => (format!("bulk-{i:05}"), PRIORITY_BASE),
            Layout::Groups(groups) => {
                let per_group = count.div_ceil(groups);
                let group = i / per_group;
                (
                    format!("bulk-g{group:02}-{i:05}"),
                    PRIORITY_BASE + group as u8,
                )
            }
        }
    }
}

/// CPU and memory of one agent.
#[derive(Debug, Clone, Serialize)]
struct AgentCost {
    node: String,
    pid: i32,
    pid_is_the_agent: bool,
    cpu_percent_of_one_core: f64,
    rss_kib: u64,
    /// Peak RSS since the agent started (settling included).
    peak_rss_kib: u64,
    rss_at_window_start_kib: u64,
    memory: Memory,
    /// VRRP transitions the agent logged during the window.
    transitions: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct SteadyReport {
    /// The API server's requests in the window (its /metrics), every client.
    apiserver: ApiServerLoad,
    window_s: f64,
    writes: NodeWrites,
    /// VirtualIP changes (new resourceVersions) the harness's watch saw in the window.
    virtualip_changes: u64,
    agents: Vec<AgentCost>,
    /// Adverts with priority > 0 per second, by source node.
    adverts_per_second: BTreeMap<String, f64>,
    /// node-a alone advertised every VRID over the whole window.
    single_master_on_wire: bool,
    /// VRIDs with other masters than node-a alone in the window → who advertised, in order.
    unstable_vrids: BTreeMap<u8, Vec<String>>,
    /// The VirtualIPs that changed most in the window: `name (VRID): changes; what changed
    /// last`.
    most_changed: Vec<String>,
    writes_within_target: bool,
    rss_within_target: bool,
}

#[derive(Debug, Clone, Serialize)]
struct ScaleReport {
    layout: String,
    vips: usize,
    /// Distinct VRIDs in status: VRRP instances.
    instances: usize,
    vrids: Vec<i64>,
    /// The harness creating every VirtualIP (16 requests in flight).
    create_s: f64,
    /// From the first create to every VirtualIP showing `status.master`.
    to_all_status_master_s: Option<f64>,
    /// … to every VirtualIP showing Active with every node's entry.
    to_all_status_complete_s: Option<f64>,
    /// … to every VirtualIP showing a master, Active and `Ready=True` (the issue's "settled").
    to_all_ready_s: Option<f64>,
    /// … to node-a holding every address (polled every ~100 ms).
    to_all_addresses_on_master_s: Option<f64>,
    /// … to the last VirtualIP change before 3 s of quiet.
    to_quiet_s: Option<f64>,
    settle_problem: Option<String>,
    /// Writes per node from the first create to the quiet point.
    settle_writes: NodeWrites,
    /// CPU per node over the same span, % of one core.
    settle_cpu_percent: BTreeMap<String, f64>,
    /// The API server's requests over the same span (its /metrics), all clients: verb and
    /// resource → requests/s.
    settle_apiserver: ApiServerLoad,
    steady: SteadyReport,
}

/// The API server's own account of its load: `apiserver_request_total` differences by verb
/// and resource (every client: the agents, and the harness's watch and creates), and
/// `apiserver_registered_watchers` at the end.
#[derive(Debug, Clone, Default, Serialize)]
struct ApiServerLoad {
    span_s: f64,
    requests_per_second: BTreeMap<String, f64>,
    watchers: BTreeMap<String, f64>,
}

/// `apiserver_request_total` (by "VERB resource[/subresource]") and
/// `apiserver_registered_watchers` (by kind) from the API server's /metrics.
fn apiserver_metrics(
    cluster: &Cluster,
) -> anyhow::Result<(BTreeMap<String, f64>, BTreeMap<String, f64>)> {
    let text = cluster.kubectl(&["get", "--raw", "/metrics"])?;
    let label = |labels: &str, key: &str| -> String {
        let pat = format!("{key}=\"");
        labels
            .split(',')
            .find_map(|kv| kv.strip_prefix(&pat))
            .map(|v| v.trim_end_matches('"').to_string())
            .unwrap_or_default()
    };
    let (mut requests, mut watchers) = (BTreeMap::new(), BTreeMap::new());
    for line in text.lines() {
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let Some((name, labels)) = series.split_once('{') else {
            continue;
        };
        let labels = labels.trim_end_matches('}');
        match name {
            "apiserver_request_total" => {
                let resource = label(labels, "resource");
                if resource.is_empty() {
                    continue;
                }
                let sub = label(labels, "subresource");
                let key = format!(
                    "{} {resource}{}",
                    label(labels, "verb"),
                    if sub.is_empty() {
                        String::new()
                    } else {
                        format!("/{sub}")
                    }
                );
                *requests.entry(key).or_insert(0.0) += value;
            }
            "apiserver_registered_watchers" if value > 0.0 => {
                *watchers.entry(label(labels, "kind")).or_insert(0.0) += value;
            }
            _ => {}
        }
    }
    Ok((requests, watchers))
}

impl ApiServerLoad {
    fn between(
        before: &BTreeMap<String, f64>,
        after: (BTreeMap<String, f64>, BTreeMap<String, f64>),
        span: Duration,
    ) -> ApiServerLoad {
        let span_s = span.as_secs_f64().max(1e-3);
        let requests_per_second = after
            .0
            .iter()
            .filter_map(|(k, v)| {
                let d = v - before.get(k).copied().unwrap_or(0.0);
                (d > 0.0).then(|| (k.clone(), (d / span_s * 100.0).round() / 100.0))
            })
            .collect();
        ApiServerLoad {
            span_s: round3(span_s),
            requests_per_second,
            watchers: after.1,
        }
    }

    fn summary(&self) -> String {
        let mut top: Vec<(&String, &f64)> = self.requests_per_second.iter().collect();
        top.sort_by(|a, b| b.1.total_cmp(a.1));
        let parts: Vec<String> = top
            .iter()
            .take(6)
            .map(|(k, v)| format!("{k} {v:.2}/s"))
            .collect();
        parts.join(", ")
    }
}

/// The `count` VirtualIPs of a scale phase laid out as `layout`, one /32 each.
fn scale_docs(layout: Layout, count: usize) -> anyhow::Result<Vec<VirtualIP>> {
    (0..count)
        .map(|i| {
            let (name, base) = layout.vip(i, count);
            let doc = vip_doc(
                &name,
                &format!("{}/32", bulk_address(i)),
                None,
                base,
                "bulk",
            );
            serde_json::from_value(doc).context("VirtualIP document")
        })
        .collect()
}

/// How long `plan()` takes for `count` VirtualIPs of `layout` on three nodes: median of 5.
fn plan_time(layout: Layout, count: usize) -> f64 {
    use ferrovip::model::{Completeness, NodeFacts, Snapshot, plan};
    let virtual_ips = scale_docs(layout, count).expect("the scale phase's VirtualIPs");
    let nodes = ["node-a", "node-b", "node-c"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            (
                n.to_string(),
                NodeFacts {
                    ready: Some(true),
                    network_unavailable: Some(false),
                    internal_ips: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 11 + i as u8))],
                    ..NodeFacts::default()
                },
            )
        })
        .collect();
    let snapshot = Snapshot {
        virtual_ips,
        cluster: true,
        nodes,
        completeness: Completeness::Complete,
        ..Snapshot::default()
    };
    let times: Vec<Duration> = (0..5)
        .map(|_| {
            let started = Instant::now();
            let desired = plan(&snapshot, "node-a");
            let took = started.elapsed();
            assert_eq!(desired.resources.len(), count);
            took
        })
        .collect();
    let ms = millis(median(times));
    println!(
        "plan(): {count} VirtualIPs ({}) in {ms:.1} ms (median of 5)",
        layout.label()
    );
    ms
}

fn scale(
    cluster: &mut Cluster,
    layout: Layout,
    count: usize,
    settle_timeout: Duration,
    window: Duration,
    clock_ticks: u64,
) -> anyhow::Result<ScaleReport> {
    println!(
        "\n== 2. {count} VirtualIPs, layout {} (fresh agents)",
        layout.label()
    );
    if cluster
        .watch
        .lock()
        .vips
        .keys()
        .any(|n| n.starts_with("bulk-"))
    {
        let took = cluster.delete_all_quietly("bulk", is_bulk_address)?;
        println!(
            "  deleted the previous VirtualIPs; released after {:.1} s",
            took.as_secs_f64()
        );
    }
    cluster.restart_agents()?;
    cluster.audit.refresh()?;
    sleep(Duration::from_secs(1))?;
    cluster.watch.lock().large_instances = true;

    let docs = scale_docs(layout, count)?;
    let names: Vec<String> = docs
        .iter()
        .filter_map(|d| d.metadata.name.clone())
        .collect();
    let phase = Phase::create_all(
        cluster,
        Api::all(cluster.client.clone()),
        docs,
        "VirtualIPs",
        &cluster.watch.echoes,
    )?;
    let (pids, started, create) = (phase.pids.clone(), phase.started, phase.create);

    // Settling: status on every VirtualIP, every address on node-a.
    let deadline = started + settle_timeout;
    let mut addresses_at = None;
    let mut next_address_poll = Instant::now();
    let mut last_print = Instant::now();
    let (mut all_master_at, mut all_complete_at, mut all_ready_at) = (None, None, None);
    let mut settle_problem = None;
    loop {
        check_interrupted()?;
        cluster.check_alive()?;
        let now = Instant::now();
        if addresses_at.is_none() && now >= next_address_poll {
            let held = cluster.vip_addresses(MASTER)?.len();
            if held >= count {
                addresses_at = Some(Instant::now());
            }
            next_address_poll = now + Duration::from_millis(100);
        }
        let (with_master, complete, latest_master, latest_complete, ready, latest_ready) = {
            let state = cluster.watch.lock();
            let seen: Vec<&Seen> = names.iter().filter_map(|n| state.vips.get(n)).collect();
            (
                seen.iter().filter(|s| s.first_master_at.is_some()).count(),
                seen.iter().filter(|s| s.complete_at.is_some()).count(),
                seen.iter().filter_map(|s| s.first_master_at).max(),
                seen.iter().filter_map(|s| s.complete_at).max(),
                seen.iter().filter(|s| s.ready_at.is_some()).count(),
                seen.iter().filter_map(|s| s.ready_at).max(),
            )
        };
        if ready == count && all_ready_at.is_none() {
            all_ready_at = latest_ready;
        }
        if with_master == count && all_master_at.is_none() {
            all_master_at = latest_master;
        }
        if complete == count && all_complete_at.is_none() {
            all_complete_at = latest_complete;
        }
        if all_master_at.is_some()
            && all_complete_at.is_some()
            && all_ready_at.is_some()
            && addresses_at.is_some()
        {
            break;
        }
        if now.duration_since(last_print) >= Duration::from_secs(5) {
            println!(
                "  … {:.0} s: {with_master} with status.master, {complete} complete, node-a holds {} addresses",
                started.elapsed().as_secs_f64(),
                cluster.vip_addresses(MASTER)?.len()
            );
            last_print = now;
        }
        if now >= deadline {
            let problem = format!(
                "not settled after {settle_timeout:?}: {with_master}/{count} with status.master, {complete}/{count} complete, node-a holds {} of {count} addresses",
                cluster.vip_addresses(MASTER)?.len()
            );
            eprintln!("  warning: {problem}; measuring anyway");
            settle_problem = Some(problem);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Quiet: no VirtualIP changed for QUIET.
    let quiet_at = wait_quiet(|| cluster.watch.lock().tally.last_change, "VirtualIPs")?;
    let (cpu_settled, settle_apiserver) = phase.settled(cluster)?;
    let settle_end = quiet_at.unwrap_or_else(Instant::now) + Duration::from_millis(1);
    let settle_writes = cluster.audit.node_writes(wall(started), wall(settle_end))?;
    let since = |at: Option<Instant>| at.map(|at| round3(at.duration_since(started).as_secs_f64()));
    let mut vrids: Vec<i64> = {
        let state = cluster.watch.lock();
        names
            .iter()
            .filter_map(|n| state.vips.get(n)?.vrid)
            .collect()
    };
    vrids.sort();
    vrids.dedup();
    // Each instance's first VirtualIP (by name) lists every node; the others the master alone.
    let listing = {
        let state = cluster.watch.lock();
        let mut first: BTreeMap<i64, &str> = BTreeMap::new();
        for n in &names {
            if let Some(vrid) = state.vips.get(n).and_then(|s| s.vrid) {
                let f = first.entry(vrid).or_insert(n.as_str());
                if n.as_str() < *f {
                    *f = n.as_str();
                }
            }
        }
        // `status.nodes` of VirtualIP `n`, as last seen.
        let nodes_of = |n: &str| -> &[Value] {
            state
                .vips
                .get(n)
                .and_then(|s| s.status.as_ref())
                .and_then(|s| s["nodes"].as_array())
                .map_or(&[], Vec::as_slice)
        };
        let entries = |n: &str| nodes_of(n).len();
        let listed = first.values().filter(|n| entries(n) == NODES).count();
        let alone = names.iter().filter(|n| entries(n) == 1).count();
        let reps: HashSet<&str> = first.values().copied().collect();
        // The others, with their entries (node:state), to show what is left.
        let others: Vec<String> = names
            .iter()
            .filter(|n| !reps.contains(n.as_str()) && entries(n) != 1)
            .take(12)
            .map(|n| {
                let shown: Vec<String> = nodes_of(n)
                    .iter()
                    .map(|e| {
                        format!(
                            "{}:{}",
                            e["name"].as_str().unwrap_or("?"),
                            e["state"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                format!("{n} [{}]", shown.join(" "))
            })
            .collect();
        format!(
            "{listed} of {} instances list every node on their first VirtualIP; {alone} VirtualIPs show the master's entry alone; others: {others:?}",
            first.len()
        )
    };
    println!("  {listing}");
    println!(
        "  all status.master after {}, all complete after {}, {count} addresses on node-a after {}, quiet after {} (s); {} instance(s), VRIDs {:?}",
        opt_s(since(all_master_at)),
        opt_s(since(all_complete_at)),
        opt_s(since(addresses_at)),
        opt_s(since(quiet_at)),
        vrids.len(),
        vrids
    );
    let settle_cpu_percent = settling_report(
        cluster,
        &settle_writes,
        &phase.cpu_start,
        &cpu_settled,
        clock_ticks,
    );

    let steady = steady_window(cluster, &pids, &vrids, window, clock_ticks)?;
    Ok(ScaleReport {
        layout: layout.label(),
        vips: count,
        instances: vrids.len(),
        vrids,
        create_s: round3(create.as_secs_f64()),
        to_all_status_master_s: since(all_master_at),
        to_all_status_complete_s: since(all_complete_at),
        to_all_ready_s: since(all_ready_at),
        to_all_addresses_on_master_s: since(addresses_at),
        to_quiet_s: since(quiet_at),
        settle_problem,
        settle_writes,
        settle_cpu_percent,
        settle_apiserver,
        steady,
    })
}

fn steady_window(
    cluster: &mut Cluster,
    pids: &[i32],
    vrids: &[i64],
    window: Duration,
    clock_ticks: u64,
) -> anyhow::Result<SteadyReport> {
    let (changes_before, per_vip_before): (u64, HashMap<String, u64>) = {
        let state = cluster.watch.lock();
        (
            state.tally.changes,
            state
                .vips
                .iter()
                .map(|(n, s)| (n.clone(), s.changes))
                .collect(),
        )
    };
    let memory_before: Vec<Memory> = pids.iter().map(|p| memory(*p)).collect();
    let (metrics_before, _) = apiserver_metrics(cluster)?;
    let before: Vec<Option<CpuSample>> = pids.iter().map(|p| cpu_sample(*p)).collect();
    let start = Instant::now();
    sleep(window)?;
    let after: Vec<Option<CpuSample>> = pids.iter().map(|p| cpu_sample(*p)).collect();
    let end = Instant::now();
    let apiserver =
        ApiServerLoad::between(&metrics_before, apiserver_metrics(cluster)?, end - start);
    println!(
        "  API server in the window (every client): {}; watchers {:?}",
        apiserver.summary(),
        apiserver.watchers
    );
    cluster.check_alive()?;
    let (changes, mut most_changed) = {
        let state = cluster.watch.lock();
        let mut changed: Vec<(u64, String, &Seen)> = state
            .vips
            .iter()
            .map(|(n, s)| {
                let before = per_vip_before.get(n).copied().unwrap_or(0);
                (s.changes - before, n.clone(), s)
            })
            .filter(|(c, ..)| *c > 0)
            .collect();
        changed.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let described: Vec<(u64, String)> = changed
            .iter()
            .take(5)
            .map(|(c, name, seen)| {
                let mut paths = Vec::new();
                if let (Some(a), Some(b)) = (&seen.previous_status, &seen.status) {
                    changed_paths(a, b, "status", 6, &mut paths);
                }
                (
                    *c,
                    format!(
                        "{name} (VRID {}): {c} changes; last: {}",
                        seen.vrid.unwrap_or(0),
                        paths.join(", ")
                    ),
                )
            })
            .collect();
        (state.tally.changes - changes_before, described)
    };
    let most_changed: Vec<String> = most_changed.drain(..).map(|(_, d)| d).collect();
    // Blocking audit mode writes before answering; the margin covers the file system.
    sleep(Duration::from_millis(300))?;
    let writes = cluster.audit.node_writes(wall(start), wall(end))?;
    let span = end.duration_since(start);
    let agents: Vec<AgentCost> = (0..NODES)
        .map(|i| {
            let memory = memory(pids[i]);
            let transitions = cluster
                .log_path(i)
                .map(|log| logged_transitions(&log, wall(start), wall(end)))
                .unwrap_or_default();
            AgentCost {
                node: cluster.name(i).to_owned(),
                pid: pids[i],
                pid_is_the_agent: exe_is_agent(pids[i]),
                cpu_percent_of_one_core: cpu_percent(before[i], after[i], clock_ticks),
                rss_kib: memory.rss_kib,
                peak_rss_kib: memory.peak_rss_kib,
                rss_at_window_start_kib: memory_before[i].rss_kib,
                memory,
                transitions,
            }
        })
        .collect();
    let wire = WireWindow::capture(&cluster.sniffer, &cluster.lab, start, end);
    let unstable_vrids = wire.unstable_vrids(
        &cluster.lab,
        vrids.iter().map(|v| *v as u8),
        start,
        cluster.ip(MASTER),
    );
    let single_master_on_wire = !vrids.is_empty() && unstable_vrids.is_empty();
    let writes_within_target = (0..NODES).all(|i| {
        writes.of(cluster.name(i)).total as f64 / span.as_secs_f64() <= WRITES_TARGET_PER_NODE_PER_S
    });
    let rss_within_target = agents
        .iter()
        .all(|a| a.rss_kib <= rss_target_kib(cluster.watch.lock().vips.len()));
    for a in &agents {
        let w = writes.of(&a.node);
        println!(
            "  steady {:.0} s, {}: writes {} ({:.2}/s) {:?}; CPU {:.2}% of one core; RSS {:.1} MiB (peak {:.1} MiB)",
            span.as_secs_f64(),
            a.node,
            w.total,
            w.per_second,
            w.by_request,
            a.cpu_percent_of_one_core,
            a.rss_kib as f64 / 1024.0,
            a.peak_rss_kib as f64 / 1024.0
        );
        println!(
            "    memory: anon {:.1} MiB, file {:.1} MiB, {} threads; RSS {:.1} MiB at the window's start; {} VRRP transitions in the window {:?}",
            a.memory.anon_kib as f64 / 1024.0,
            a.memory.file_kib as f64 / 1024.0,
            a.memory.threads,
            a.rss_at_window_start_kib as f64 / 1024.0,
            a.transitions.len(),
            a.transitions.iter().take(4).collect::<Vec<_>>()
        );
    }
    if !unstable_vrids.is_empty() {
        println!("  VRIDs without node-a as sole master in the window: {unstable_vrids:?}");
    }
    for line in &most_changed {
        println!("  changed: {line}");
    }
    Ok(SteadyReport {
        apiserver,
        window_s: round3(span.as_secs_f64()),
        writes,
        virtualip_changes: changes,
        agents,
        adverts_per_second: wire.adverts_per_second,
        single_master_on_wire,
        unstable_vrids,
        most_changed,
        writes_within_target,
        rss_within_target,
    })
}

// ---------------------------------------------------------------------------------------------
// 3. Failover at scale

#[derive(Debug, Clone, Serialize)]
struct FailoverReport {
    vips: usize,
    vrid: u8,
    new_master: String,
    kill_to_advert_ms: f64,
    /// node-a's last advert → node-b's first: Master_Down_Interval(140) by the RFC.
    last_advert_to_takeover_ms: Option<f64>,
    master_down_interval_ms: f64,
    kill_to_first_garp_ms: Option<f64>,
    /// node-b holds every address (`ip -o addr`, polled every ~20 ms).
    kill_to_all_addresses_ms: Option<f64>,
    /// node-b announced every address (gratuitous ARP on the bridge).
    kill_to_all_garps_ms: Option<f64>,
    /// Distinct addresses the capture saw node-b announce. The capture drops frames in a
    /// burst of thousands, so this can fall short of what was sent: see `frames_sent`.
    garped_addresses: usize,
    /// Frames node-b's eth0 transmitted from the kill to 1 s after it held every address
    /// (adverts, announcements, ARP replies), and its transmit drops.
    frames_sent: Option<u64>,
    frames_dropped: Option<u64>,
    /// Every VirtualIP's `status.master` is node-b.
    kill_to_all_status_master_s: Option<f64>,
    /// Writes per node from the kill to that point.
    writes: NodeWrites,
}

fn failover_at_scale(cluster: &mut Cluster, count: usize) -> anyhow::Result<FailoverReport> {
    let (vrid, names) = {
        let state = cluster.watch.lock();
        let names: Vec<String> = state
            .vips
            .keys()
            .filter(|n| n.starts_with("bulk-"))
            .cloned()
            .collect();
        let vrid = state
            .vips
            .get(&Layout::Shared.vip(0, count).0)
            .and_then(|s| s.vrid)
            .context("the shared instance's VRID")?;
        (u8::try_from(vrid).context("VRID")?, names)
    };
    ensure!(
        names.len() == count,
        "{} of {count} VirtualIPs",
        names.len()
    );
    let mdi = master_down_interval(SUCCESSOR_PRIORITY, INTERVAL);
    println!(
        "\n== 3. SIGKILL node-a's agent, master of {count} VIPs in VRID {vrid} (Master_Down_Interval(140) = {:.1} ms)",
        millis(mdi)
    );
    let bulk: HashSet<Ipv4Addr> = (0..count).map(bulk_address).collect();
    let successor_mac = cluster.lab.node(SUCCESSOR).mac;
    let successor_netns = cluster.lab.node(SUCCESSOR).netns.clone();
    let tx_before = tx_counters(&successor_netns);
    let stopped_at = Instant::now();
    cluster.lab.kill(cluster.agent(MASTER)?, Signal::SIGKILL)?;
    let query = FailoverQuery {
        vrid,
        old_master: cluster.ip(MASTER),
        stopped_at,
        vip: Some(IpAddr::V4(bulk_address(0))),
    };
    let failover = measure_failover(&cluster.sniffer, &query, Duration::from_secs(5))?;
    let new_master = node_name(&cluster.lab, failover.new_master);

    let deadline = stopped_at + FAILOVER_TIMEOUT;
    let addresses_at = loop {
        check_interrupted()?;
        if cluster.vip_addresses(SUCCESSOR)?.len() >= count {
            break Some(Instant::now());
        }
        if Instant::now() >= deadline {
            eprintln!("  warning: node-b does not hold every address after {FAILOVER_TIMEOUT:?}");
            break None;
        }
        std::thread::sleep(POLL);
    };
    // Announcements may trail the addresses by a little.
    sleep(Duration::from_secs(1))?;
    let tx_after = tx_counters(&successor_netns);
    let (frames_sent, frames_dropped) = match (tx_before, tx_after) {
        (Some((p0, d0)), Some((p1, d1))) => (Some(p1 - p0), Some(d1 - d0)),
        _ => (None, None),
    };
    let mut garped = HashSet::new();
    let mut all_garps_at = None;
    for event in cluster.sniffer.events_since(stopped_at) {
        if event.src_mac != successor_mac {
            continue;
        }
        if let Some(IpAddr::V4(a)) = event.announced()
            && bulk.contains(&a)
        {
            garped.insert(a);
            if garped.len() == count && all_garps_at.is_none() {
                all_garps_at = Some(event.at);
            }
        }
    }
    let status_at = loop {
        check_interrupted()?;
        let (moved, latest) = {
            let state = cluster.watch.lock();
            let seen: Vec<&Seen> = names.iter().filter_map(|n| state.vips.get(n)).collect();
            (
                seen.iter()
                    .filter(|s| s.master.as_deref() == Some("node-b"))
                    .count(),
                seen.iter().filter_map(|s| s.master_since).max(),
            )
        };
        if moved == count {
            break latest;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "  warning: {moved}/{count} VirtualIPs show status.master node-b after {FAILOVER_TIMEOUT:?}"
            );
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let writes_end = status_at.unwrap_or_else(Instant::now) + Duration::from_millis(1);
    sleep(Duration::from_millis(300))?;
    let writes = cluster
        .audit
        .node_writes(wall(stopped_at), wall(writes_end))?;
    let since = |at: Instant| millis(at.saturating_duration_since(stopped_at));
    let report = FailoverReport {
        vips: count,
        vrid,
        new_master,
        kill_to_advert_ms: millis(failover.death_to_advert),
        last_advert_to_takeover_ms: failover.last_advert_to_takeover.map(millis),
        master_down_interval_ms: millis(mdi),
        kill_to_first_garp_ms: failover.death_to_garp.map(millis),
        kill_to_all_addresses_ms: addresses_at.map(since),
        kill_to_all_garps_ms: all_garps_at.map(since),
        garped_addresses: garped.len(),
        frames_sent,
        frames_dropped,
        kill_to_all_status_master_s: status_at
            .map(|at| round3(at.saturating_duration_since(stopped_at).as_secs_f64())),
        writes,
    };
    println!(
        "  {} took over: kill → advert {:.1} ms (gap {} ms), first GARP {} ms, all {count} addresses {} ms, all GARPs {} ms ({} addresses), all status.master {}",
        report.new_master,
        report.kill_to_advert_ms,
        opt_ms(report.last_advert_to_takeover_ms),
        opt_ms(report.kill_to_first_garp_ms),
        opt_ms(report.kill_to_all_addresses_ms),
        opt_ms(report.kill_to_all_garps_ms),
        report.garped_addresses,
        opt_s(report.kill_to_all_status_master_s)
    );
    Ok(report)
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Clone, Serialize)]
struct Targets {
    apply_to_answer_ms: f64,
    writes_per_node_per_second: f64,
    rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    command: String,
    nodes: usize,
    interval_ms: f64,
    apiserver: &'static str,
    targets: Targets,
    apply: Vec<ApplySummary>,
    scale: Vec<ScaleReport>,
    /// `plan()` of the scale phase's VirtualIPs on one node, ms (median of 5), per layout.
    plan_ms: Vec<(String, f64)>,
    failover: Option<FailoverReport>,
    services: Vec<lb_services::ServicesReport>,
    apply_rounds: Vec<ApplyRound>,
    runtime_s: f64,
    errors: Vec<String>,
}

impl Report {
    fn new(args: &Args) -> Report {
        let mut command = String::from("cargo bench --bench k8s");
        let mut extra = vec![
            format!("--apply-rounds {}", args.apply_rounds),
            format!("--vips {}", args.vips),
            format!("--groups {}", args.groups),
            format!("--window {}", args.window),
            format!("--settle-timeout {}", args.settle_timeout),
        ];
        if args.skip_failover {
            extra.push("--skip-failover".into());
        }
        if args.skip_shared {
            extra.push("--skip-shared".into());
        }
        if args.keep {
            extra.push("--keep".into());
        }
        if let Some(n) = args.scale {
            extra = vec![format!("--scale {n}"), format!("--groups {}", args.groups)];
            extra.push(format!("--runs {}", args.runs));
            extra.push(format!("--window {}", args.window));
        } else if args.runs > 1 {
            extra.push(format!("--runs {}", args.runs));
        }
        if args.services > 0 {
            extra.push(format!("--services {}", args.services));
        }
        let _ = write!(command, " -- {}", extra.join(" "));
        Report {
            command,
            nodes: NODES,
            interval_ms: millis(INTERVAL),
            apiserver: ferrovip_e2e::APISERVER_VERSION,
            targets: Targets {
                apply_to_answer_ms: millis(APPLY_TARGET),
                writes_per_node_per_second: WRITES_TARGET_PER_NODE_PER_S,
                rss_kib: rss_target_kib(args.vips),
            },
            apply: Vec::new(),
            scale: Vec::new(),
            plan_ms: Vec::new(),
            failover: None,
            services: Vec::new(),
            apply_rounds: Vec::new(),
            runtime_s: 0.0,
            errors: Vec::new(),
        }
    }

    fn table(&self) -> String {
        let mut t = Table::new(28);
        let _ = writeln!(t.out, "{}", self.command);
        if !self.apply.is_empty() {
            let names: Vec<&str> = self.apply.iter().map(|a| a.variant.label()).collect();
            t.heading(
                "\n1. kubectl apply → VIP, ms from kubectl's start: median [min–max]",
                &names,
            );
            t.row("kubectl apply returned", &self.apply, |a| {
                stats_cell(a.kubectl.as_ref())
            });
            t.row("gratuitous ARP on the bridge", &self.apply, |a| {
                stats_cell(a.garp.as_ref())
            });
            t.row("first ping reply at node-c", &self.apply, |a| {
                stats_cell(a.ping.as_ref())
            });
            t.row("status.master set", &self.apply, |a| {
                stats_cell(a.status_master.as_ref())
            });
            t.row("status complete (all 3 entries)", &self.apply, |a| {
                stats_cell(a.status_complete.as_ref())
            });
            t.row("rounds / no reply / no GARP", &self.apply, |a| {
                format!("{} / {} / {}", a.rounds, a.no_reply, a.no_garp)
            });
            t.row("rounds where node-b/c was master first", &self.apply, |a| {
                a.other_master_first.to_string()
            });
            t.row("every VIP answers < 1 s", &self.apply, |a| {
                verdict(a.within_target)
            });
        }
        if !self.scale.is_empty() {
            let names: Vec<String> = self
                .scale
                .iter()
                .map(|s| format!("{} × {}", s.vips, s.layout))
                .collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            t.heading("\n2. Scale (s from the first create)", &names);
            let s = &self.scale;
            t.row("VRRP instances", s, |r| r.instances.to_string());
            t.row("create all (harness, 16 in flight)", s, |r| {
                format!("{:.2} s", r.create_s)
            });
            t.row("→ all status.master set", s, |r| {
                opt_s(r.to_all_status_master_s)
            });
            t.row("→ all master + Active + Ready", s, |r| {
                opt_s(r.to_all_ready_s)
            });
            t.row("  (after the last create)", s, |r| {
                opt_s(r.to_all_ready_s.map(|t| t - r.create_s))
            });
            t.row("→ all status complete", s, |r| {
                opt_s(r.to_all_status_complete_s)
            });
            t.row("→ all addresses on node-a", s, |r| {
                opt_s(r.to_all_addresses_on_master_s)
            });
            t.row("→ last VirtualIP change (3 s quiet)", s, |r| {
                opt_s(r.to_quiet_s)
            });
            for node in ["node-a", "node-b", "node-c"] {
                t.row(&format!("settling writes {node} (peak/s)"), s, |r| {
                    let w = r.settle_writes.of(node);
                    format!("{} ({})", w.total, w.peak_per_second)
                });
            }
            for node in ["node-a", "node-b", "node-c"] {
                t.row(&format!("settling CPU {node}"), s, |r| {
                    format!(
                        "{:.1}%",
                        r.settle_cpu_percent.get(node).copied().unwrap_or(0.0)
                    )
                });
            }
            let window = s.first().map_or(0.0, |r| r.steady.window_s);
            let _ = writeln!(
                t.out,
                "steady state over {window:.0} s (targets: ≤ {WRITES_TARGET_PER_NODE_PER_S} write/s per node, RSS ≤ {} MiB)",
                rss_target_kib(s.first().map_or(0, |r| r.vips)) / 1024
            );
            for node in ["node-a", "node-b", "node-c"] {
                t.row(&format!("  writes/s {node}"), s, |r| {
                    let w = r.steady.writes.of(node);
                    format!("{:.2} ({})", w.per_second, w.total)
                });
            }
            for (i, node) in ["node-a", "node-b", "node-c"].iter().enumerate() {
                t.row(&format!("  CPU {node} (% of one core)"), s, |r| {
                    r.steady.agents.get(i).map_or("—".into(), |a| {
                        format!("{:.2}%", a.cpu_percent_of_one_core)
                    })
                });
            }
            for (i, node) in ["node-a", "node-b", "node-c"].iter().enumerate() {
                t.row(&format!("  RSS {node} (peak)"), s, |r| {
                    r.steady.agents.get(i).map_or("—".into(), |a| {
                        format!(
                            "{:.1} ({:.1}) MiB",
                            a.rss_kib as f64 / 1024.0,
                            a.peak_rss_kib as f64 / 1024.0
                        )
                    })
                });
            }
            t.row("  VirtualIP changes in the window", s, |r| {
                r.steady.virtualip_changes.to_string()
            });
            t.row("  node-a sole master on the wire", s, |r| {
                verdict(r.steady.single_master_on_wire)
            });
            t.row("  writes within target", s, |r| {
                verdict(r.steady.writes_within_target)
            });
            t.row("  RSS within target", s, |r| {
                verdict(r.steady.rss_within_target)
            });
            t.row("  API server watchers (by kind)", s, |r| {
                let w: Vec<String> = r
                    .steady
                    .apiserver
                    .watchers
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect();
                w.join(", ")
            });
            let _ = writeln!(t.out, "API server requests/s, every client (its /metrics):");
            for (i, r) in s.iter().enumerate() {
                let _ = writeln!(
                    t.out,
                    "  run {}: settling {}\n         steady {}",
                    i + 1,
                    r.settle_apiserver.summary(),
                    r.steady.apiserver.summary()
                );
            }
            for (layout, ms) in &self.plan_ms {
                let _ = writeln!(t.out, "plan() of {layout}: {ms:.1} ms (median of 5)");
            }
            for (what, of) in [
                (
                    "every VirtualIP with a master, Active and Ready",
                    (|r: &ScaleReport| r.to_all_ready_s) as fn(&ScaleReport) -> Option<f64>,
                ),
                ("every node's entry too", |r: &ScaleReport| {
                    r.to_all_status_complete_s
                }),
            ] {
                let mut times: Vec<f64> = s.iter().filter_map(of).collect();
                if s.len() > 1 && times.len() == s.len() {
                    times.sort_by(f64::total_cmp);
                    let _ = writeln!(
                        t.out,
                        "settled ({what}), median of {}: {:.2} s {times:?}",
                        s.len(),
                        times[times.len() / 2]
                    );
                }
            }
        }
        if let Some(f) = &self.failover {
            let _ = writeln!(
                t.out,
                "\n3. SIGKILL the master of {} VIPs in one instance (VRID {}); ms from the kill",
                f.vips, f.vrid
            );
            let one = [f];
            t.row("new master", &one, |f| f.new_master.clone());
            t.row("→ new master's first advert", &one, |f| {
                format!("{:.1}", f.kill_to_advert_ms)
            });
            t.row("last advert → first advert (gap)", &one, |f| {
                format!(
                    "{} (MDI {:.1})",
                    opt_ms(f.last_advert_to_takeover_ms),
                    f.master_down_interval_ms
                )
            });
            t.row("→ first GARP", &one, |f| opt_ms(f.kill_to_first_garp_ms));
            t.row("→ all addresses on the new master", &one, |f| {
                opt_ms(f.kill_to_all_addresses_ms)
            });
            t.row("→ all addresses announced (capture)", &one, |f| {
                format!(
                    "{} ({} seen)",
                    opt_ms(f.kill_to_all_garps_ms),
                    f.garped_addresses
                )
            });
            t.row("frames node-b sent / dropped (eth0)", &one, |f| {
                format!(
                    "{} / {}",
                    f.frames_sent.map_or("—".into(), |n| n.to_string()),
                    f.frames_dropped.map_or("—".into(), |n| n.to_string())
                )
            });
            t.row("→ all status.master = new master", &one, |f| {
                opt_s(f.kill_to_all_status_master_s)
            });
            for node in ["node-b", "node-c"] {
                t.row(&format!("writes {node} until then"), &one, |f| {
                    f.writes.of(node).total.to_string()
                });
            }
        }
        if !self.services.is_empty() {
            lb_services::table(&mut t, &self.services);
        }
        let _ = writeln!(t.out, "\nruntime {:.0} s", self.runtime_s);
        t.out
    }
}

fn verdict(ok: bool) -> String {
    if ok { "yes".into() } else { "NO".into() }
}

fn opt_s(v: Option<f64>) -> String {
    v.map_or_else(|| "—".into(), |v| format!("{v:.2} s"))
}
