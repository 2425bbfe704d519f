//! The node agent: one loop that plans from a source (manifest files in standalone mode, the
//! API server in Kubernetes mode) plus what the node observes itself (interface carrier,
//! health checks), and hands the plan to the VRRP engine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::controller::{
    self as service_controller, ControllerError, ControllerHandle, ControllerOptions,
    ControllerStats,
};
use crate::dataplane::ipvs::{IpvsDataplane, IpvsOptions};
use crate::dataplane::worker::{self, DataplaneStatus};
use crate::driver::{self, AddressSettings, Command, DriverError};
use crate::engine::{Instances, Observed};
use crate::health::{self, CheckKey, CheckSpec, HealthMonitor, HealthReport};
use crate::k8s::departure::Departure;
use crate::k8s::status::StatusWriter;
use crate::metrics::{Health, Metrics};
use crate::model::service::ServiceSet;
use crate::model::{Desired, Snapshot, plan};
use crate::node::addr::{AddrError, AddressManager};
use crate::node::ownership::OwnershipMode;
use crate::source::cluster::{self, ClusterSource, K8sError};
use crate::source::{Source, off_runtime};

/// How often interface carrier is read.
const CARRIER_POLL: Duration = Duration::from_secs(1);
/// After a change of the cluster's objects the planner waits this many times what its last
/// snapshot and plan took (at most PLAN_PACING_MAX): at most a fifth of a core for planning
/// under a stream of changes, however large the cluster. With 2 (a third of a core), the
/// three agents took 87 % of a core while 10,000 Services settled, CPU the API server they
/// write to needed (settled in 82.6-90.3 s; with 4: 71.7 and 76.6 s, 10,000 VirtualIPs
/// unchanged at 48-50 s). A change waits at most five plans' time (a plan of 10,000: ~30-60
/// ms).
const PLAN_PACING: u32 = 4;
const PLAN_PACING_MAX: Duration = Duration::from_secs(1);
/// Plans cheaper than this are not paced: a small cluster's changes are planned as they
/// come, as before (its snapshot's cost is mostly writing the cache file).
const PLAN_PACING_FROM: Duration = Duration::from_millis(10);
/// After a plan at least PLAN_PACING_FROM long (a large cluster), once no plan has followed
/// for this long, the allocator's free memory goes back to the kernel
/// ([`crate::node::socket::release_free_memory`]): a burst's garbage would otherwise stay
/// resident while the agent idles.
const MEMORY_RELEASE_QUIET: Duration = Duration::from_secs(5);
/// And again this often while no plan comes (the Service controller's Events drain for a
/// minute after 10,000 Services were allocated): a trim of an idle heap takes milliseconds.
const MEMORY_RELEASE_PERIOD: Duration = Duration::from_secs(30);
/// How often status is compared with the objects (and failed writes retried) even when
/// nothing signals a change; only differences cause writes.
const STATUS_RETRY: Duration = Duration::from_secs(1);

/// How long a stopping agent waits for the Service controller to release its Lease.
const CONTROLLER_STOP: Duration = Duration::from_secs(2);

/// Settings of the agent process (what users ask for lives in VirtualIP resources).
#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Name of this node (Kubernetes: from the downward API, `spec.nodeName`).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Standalone mode: a VirtualIP manifest file, or a directory of `*.yaml` files. Without
    /// it the agent runs in Kubernetes mode (in-cluster config or KUBECONFIG).
    #[arg(long, env = "FERROVIP_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// How often manifest files are checked for changes (SIGHUP reloads at once).
    #[arg(long, default_value = "1s", value_parser = parse_duration_arg)]
    pub manifest_poll: Duration,
    /// On SIGTERM, keep the addresses this node is master for up to this long, and tell
    /// the backups to wait (¾ of it plus their skew: they take over before the addresses
    /// expire), so that a restarted agent takes them over without the VIPs moving (VRRPv3,
    /// no virtual MAC). `0s` releases them at once with priority 0,
    /// which fails over within Skew_Time: right for a node going away. SIGINT always
    /// releases.
    #[arg(long, env = "FERROVIP_RESTART_HOLD", default_value = "0s", value_parser = parse_duration_arg)]
    pub restart_hold: Duration,
    /// Kubernetes mode: the DaemonSet running this agent (in `--namespace`; needs `get` on
    /// it). On SIGTERM the agent reads it: gone, being deleted, or no longer readable after
    /// a read succeeded at start (an uninstall removes the agent's RBAC too) means ferrovip
    /// is being uninstalled from this node (release with priority 0, then remove everything
    /// `ferrovip cleanup` removes and the state directory's records); present, or no answer
    /// within 2 s, means a restart or rolling update (hold as `--restart-hold` says).
    /// Without it SIGTERM always holds.
    #[arg(long, env = "FERROVIP_DAEMONSET")]
    pub daemonset: Option<String>,
    /// Which dataplane forwards `spec.services`: `ipvs`, or `none` to program nothing.
    #[arg(long, env = "FERROVIP_DATAPLANE", default_value = "ipvs")]
    pub dataplane: DataplaneKind,
    /// Where the agent records what it created in the kernel (IPVS services), so that a
    /// restarted agent adopts them. Keep it on tmpfs: the kernel's tables do not survive a
    /// reboot either.
    #[arg(long, env = "FERROVIP_STATE_DIR", default_value = "/run/ferrovip")]
    pub state_dir: PathBuf,
    /// Kubernetes mode: where the last complete cluster snapshot is saved, so that an agent
    /// started while the API server is unreachable joins the election from it (default:
    /// `cluster-snapshot.json` in the state directory). The state directory is tmpfs, which
    /// survives an agent restart but not a reboot: point this at persistent storage (a
    /// hostPath such as `/var/lib/ferrovip`) for nodes that must rejoin after rebooting
    /// during an outage, e.g. those holding the API server's own VIP.
    #[arg(long, env = "FERROVIP_CLUSTER_SNAPSHOT")]
    pub cluster_snapshot: Option<PathBuf>,
    /// How often the dataplane re-reads the kernel to repair changes made behind its back.
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    pub dataplane_resync: Duration,
    /// The lifetime the master gives its virtual addresses and renews (whole seconds), so
    /// that the kernel removes them by itself within about this long when the agent dies or
    /// hangs. `0s` keeps them forever (as keepalived does).
    #[arg(long, env = "FERROVIP_ADDRESS_LIFETIME", default_value = "1s", value_parser = parse_duration_arg)]
    pub address_lifetime: Duration,
    /// How the agent recognises its addresses: `auto` (the kernel's IFA_PROTO mark where the
    /// kernel keeps it, Linux ≥ 6.1, else the state directory's record), or forced. Hidden:
    /// for tests of the fallback on a new kernel.
    #[arg(
        long,
        env = "FERROVIP_ADDRESS_OWNERSHIP",
        default_value = "auto",
        hide = true
    )]
    pub address_ownership: AddressOwnership,
    // --- branch bulk: bulk address install ---
    /// IPv4 address sets larger than this (one VIP group on one interface) are installed as
    /// one interface address (the anchor) plus `local` routes covering the set, in table main
    /// with `proto 0x46` (see `ip route show table main proto 0x46`): thousands of addresses
    /// in a few milliseconds. Needs `arp_ignore` 0 on the interface (else interface
    /// addresses, with a warning). `0` never.
    #[arg(long, env = "FERROVIP_BULK_THRESHOLD", default_value_t = crate::node::addr::DEFAULT_BULK_THRESHOLD)]
    pub bulk_threshold: usize,
    /// Serve Prometheus metrics (`/metrics`), liveness (`/healthz`) and readiness
    /// (`/readyz`) here; `off` disables. All addresses by default: the agent runs in the
    /// host network and is scraped at the node's address by Prometheus and probed there by
    /// the kubelet, whichever interface that is; it serves nothing but read-only figures.
    /// Bind it to one address (e.g. the node's, from the downward API) to narrow that.
    #[arg(long, env = "FERROVIP_METRICS_ADDR", default_value = "0.0.0.0:9646")]
    pub metrics_addr: String,
    /// Run the VRRP engine thread in the real-time class SCHED_FIFO at this priority (1-99),
    /// like keepalived's `vrrp_rt_priority`, so that busy CPUs cannot delay advertisements.
    /// Needs CAP_SYS_NICE; without it the agent warns and runs at normal priority.
    #[arg(long, env = "FERROVIP_VRRP_RT_PRIORITY", value_parser = clap::value_parser!(u8).range(1..=99))]
    pub vrrp_rt_priority: Option<u8>,
    /// Kubernetes mode: run the Service controller (addresses for Services of type
    /// LoadBalancer) in this agent; one agent of the cluster leads it through a Lease, the
    /// others wait. VRRP, health and IPVS never wait for it. `--service-controller=false`
    /// leaves allocation to a separate `ferrovip controller`.
    #[arg(
        long,
        env = "FERROVIP_SERVICE_CONTROLLER",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub service_controller: bool,
    #[command(flatten)]
    pub controller: ControllerOptions,
    // Branch burst: announcement bursts.
    #[command(flatten)]
    pub announce: AnnounceArgs,
}

/// How gratuitous ARP / unsolicited NA bursts are sent (see README "Announcement bursts").
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct AnnounceArgs {
    /// Rounds per announcement burst: one frame per address each (keepalived's
    /// garp_master_repeat). The first round goes out at once; 0 sends none.
    #[arg(long, env = "FERROVIP_ANNOUNCE_REPEAT", default_value_t = crate::node::announce::DEFAULT_REPEAT)]
    pub announce_repeat: u32,
    /// Pause between the rounds of a burst.
    #[arg(long, env = "FERROVIP_ANNOUNCE_INTERVAL", default_value = "10ms", value_parser = parse_duration_arg)]
    pub announce_interval: Duration,
    /// Most frames per second in the rounds after the first (0: no cap). The default,
    /// 10000, repeats 10,000 addresses in 1 s per round, about 4 s for the whole burst.
    #[arg(long, env = "FERROVIP_ANNOUNCE_RATE", default_value_t = crate::node::announce::DEFAULT_RATE)]
    pub announce_rate: u32,
}

impl AnnounceArgs {
    pub fn announcer(&self) -> crate::node::announce::Announcer {
        crate::node::announce::Announcer {
            repeat: self.announce_repeat,
            interval: self.announce_interval,
            rate: self.announce_rate,
        }
    }
}

/// Settings of `ferrovip controller`: the Service controller alone (Kubernetes only).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerArgs {
    /// Who this instance is in the Lease (`holderIdentity`). Default: NODE_NAME, else the
    /// host name.
    #[arg(long, env = "FERROVIP_IDENTITY")]
    pub identity: Option<String>,
    /// Serve Prometheus metrics (`/metrics`, `/healthz`, `/readyz`) here; `off` (the
    /// default) disables.
    #[arg(long, env = "FERROVIP_METRICS_ADDR", default_value = "off")]
    pub metrics_addr: String,
    #[command(flatten)]
    pub controller: ControllerOptions,
}

/// `--address-ownership`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AddressOwnership {
    Auto,
    KernelMark,
    StateDir,
}

impl AddressOwnership {
    fn mode(self) -> Option<OwnershipMode> {
        match self {
            AddressOwnership::Auto => None,
            AddressOwnership::KernelMark => Some(OwnershipMode::KernelMark),
            AddressOwnership::StateDir => Some(OwnershipMode::StateDir),
        }
    }
}

/// The dataplane for virtual services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DataplaneKind {
    Ipvs,
    None,
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::crd::parse_duration(s).map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot reach the kernel over netlink: {0}")]
    Netlink(#[source] AddrError),
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error(transparent)]
    Kubernetes(#[from] K8sError),
    #[error(transparent)]
    Engine(#[from] DriverError),
    #[error("--metrics-addr {0:?} is not an address:port (or `off`)")]
    MetricsAddr(String),
    #[error(transparent)]
    Controller(#[from] ControllerError),
}

impl AgentError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Netlink(_) => "netlink",
            AgentError::Signals(_) => "signals",
            AgentError::Kubernetes(e) => e.metric_label(),
            AgentError::Engine(e) => e.metric_label(),
            AgentError::MetricsAddr(_) => "metrics_addr",
            AgentError::Controller(e) => e.metric_label(),
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT, then leaves gracefully (priority 0, addresses
/// released), or, on SIGTERM with `--restart-hold`, holds the addresses for the next agent.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let mut signals = Signals::install()?;
    // Freed memory stays for the next plan; the agent hands it back once quiet (run loop).
    for problem in crate::node::socket::keep_freed_memory() {
        warn!(%problem, "the allocator keeps its adaptive thresholds");
    }
    let mut agent = Agent::start(&args).await?;
    let stop = agent.run(&args, &mut signals).await;
    agent.stop(stop, &args).await;
    Ok(())
}

/// How the agent leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Priority 0, addresses released (SIGINT; SIGTERM without `--restart-hold`).
    Release,
    /// Addresses held this long for the next agent (SIGTERM with `--restart-hold`).
    Hold(Duration),
    /// ferrovip leaves the node (its DaemonSet is gone): release, then remove everything.
    Uninstall,
}

impl Stop {
    fn hold(hold: Duration) -> Stop {
        if hold.is_zero() {
            Stop::Release
        } else {
            Stop::Hold(hold)
        }
    }
}

/// How long an uninstalling agent waits for the dataplane thread to finish its last apply.
const DATAPLANE_STOP: Duration = Duration::from_secs(5);

/// The signals the agent acts on.
struct Signals {
    terminate: Signal,
    interrupt: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> Result<Signals, AgentError> {
        let install = |kind| signal(kind).map_err(AgentError::Signals);
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }
}

/// A running agent: the VRRP driver, the dataplane worker, metrics and the source.
struct Agent {
    commands: mpsc::Sender<Command>,
    /// Resolves when the engine thread has ended.
    engine_finished: oneshot::Receiver<()>,
    stop_metrics: oneshot::Sender<()>,
    /// What `/healthz` and `/readyz` answer from.
    endpoint_health: Health,
    metrics: Metrics,
    /// `None` until the first complete plan: the dataplane applies nothing before it.
    services: watch::Sender<Option<Arc<ServiceSet>>>,
    desired: watch::Sender<Arc<Desired>>,
    source: Source,
    monitor: HealthMonitor,
    health: watch::Receiver<HealthReport>,
    /// The Service controller task (Kubernetes mode, `--service-controller`).
    controller: Option<ControllerHandle>,
    /// Kubernetes mode: the client, for the DaemonSet lookup on SIGTERM.
    client: Option<kube::Client>,
    /// Closed when the dataplane thread has ended.
    dataplane_status: Option<watch::Receiver<Option<Arc<DataplaneStatus>>>>,
    /// `--daemonset`: whether it could be read since the start.
    daemonset_readable: Arc<std::sync::atomic::AtomicBool>,
}

impl Agent {
    /// Sets everything up: the engine thread (whose driver first removes what a crashed
    /// predecessor left), metrics, the dataplane thread, the source (and in Kubernetes mode
    /// the status writer).
    async fn start(args: &AgentArgs) -> Result<Agent, AgentError> {
        if args.manifests.is_none() && args.service_controller {
            args.controller.validate()?;
        }
        let engine = driver::spawn(
            args.node_name.clone(),
            args.vrrp_rt_priority,
            AddressSettings {
                state_dir: args.state_dir.clone(),
                ownership: args.address_ownership.mode(),
                lifetime: Some(args.address_lifetime).filter(|l| !l.is_zero()),
                bulk_threshold: args.bulk_threshold,
                announcer: args.announce.announcer(),
            },
        )
        .await?;
        let observed = engine.observed;
        let metrics = Metrics::new();
        metrics.attach_vrrp_stats(engine.stats);
        let endpoint_health = Health::new(engine.heartbeat, engine.readiness);
        let stop_metrics = serve_metrics(&args.metrics_addr, &metrics, &endpoint_health)?;
        tokio::spawn(observe_vrrp(observed.clone(), metrics.clone()));
        let (services, services_rx) = watch::channel(None);
        let dataplane_status = match args.dataplane {
            DataplaneKind::Ipvs => Some(worker::spawn(
                IpvsDataplane::new(IpvsOptions {
                    state_dir: args.state_dir.clone(),
                    ..IpvsOptions::default()
                }),
                services_rx,
                metrics.clone(),
                args.dataplane_resync,
            )),
            DataplaneKind::None => None,
        };
        let dataplane_watch = dataplane_status.clone();
        let mut kube_client = None;
        let daemonset_readable = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (desired, desired_rx) = watch::channel(Arc::new(Desired::default()));
        let mut controller = None;
        let source = match &args.manifests {
            Some(path) => {
                info!(node = %args.node_name, manifests = %path.display(), "agent started in standalone mode");
                Source::files(path.clone(), args.manifest_poll)
            }
            None => {
                info!(node = %args.node_name, "agent started in Kubernetes mode");
                let client = cluster::client().await?;
                kube_client = Some(client.clone());
                if let Some(name) = &args.daemonset {
                    tokio::spawn(crate::k8s::departure::watch_readable(
                        client.clone(),
                        args.controller.namespace.clone(),
                        name.clone(),
                        daemonset_readable.clone(),
                    ));
                }
                let snapshot_file = args
                    .cluster_snapshot
                    .clone()
                    .unwrap_or_else(|| args.state_dir.join(crate::source::cache::CACHE_FILE));
                let watching = ClusterSource::watch(
                    client.clone(),
                    args.node_name.clone(),
                    Some(snapshot_file),
                    args.service_controller,
                );
                if args.service_controller {
                    // Its own task: planning, VRRP and IPVS never wait for it. It reads the
                    // agent's Service, pool and VirtualIP stores (one copy of each in the
                    // process, three watches fewer), waiting for nothing else of the agent's.
                    let stats = Arc::new(ControllerStats::default());
                    metrics.attach_controller_stats(stats.clone());
                    controller = Some(service_controller::spawn(
                        client.clone(),
                        args.controller.clone(),
                        args.node_name.clone(),
                        stats,
                        watching.controller_stores(),
                    ));
                }
                let mut cluster = watching.listed().await;
                cluster.set_serve_classless(!args.controller.ignore_classless_services);
                // kube-proxy against the load-balancer addresses (log, Node Event, gauge).
                let kube_proxy_metrics = metrics.clone();
                tokio::spawn(crate::k8s::kube_proxy::run(
                    crate::dataplane::kube_proxy::KubeProxyObserver::new(),
                    client.clone(),
                    args.node_name.clone(),
                    desired_rx.clone(),
                    move |problems| kube_proxy_metrics.kube_proxy_problems(problems),
                ));
                tokio::spawn(write_status(
                    StatusWriter::new(client, args.node_name.clone()),
                    cluster.clone_stores(),
                    desired_rx,
                    observed,
                    dataplane_status,
                ));
                Source::Cluster(Box::new(cluster))
            }
        };
        let (monitor, health) = HealthMonitor::new();
        Ok(Agent {
            commands: engine.commands,
            engine_finished: engine.finished,
            stop_metrics,
            endpoint_health,
            metrics,
            services,
            desired,
            source,
            monitor,
            health,
            controller,
            client: kube_client,
            dataplane_status: dataplane_watch,
            daemonset_readable,
        })
    }

    /// Plans on every change of the source, the health checks or an interface's carrier,
    /// and publishes each new plan. Returns how to leave.
    async fn run(&mut self, args: &AgentArgs, signals: &mut Signals) -> Stop {
        let mut carrier_poll = tokio::time::interval(CARRIER_POLL);
        carrier_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snapshot = self.source.snapshot().await;
        let mut carrier: BTreeMap<String, bool> = BTreeMap::new();
        let mut last: Option<Arc<Desired>> = None;
        let mut refused_checks: Vec<String> = Vec::new();
        let mut replan = true;
        // What the last snapshot and plan cost: under a stream of changes the planner waits
        // PLAN_PACING times that before the next, so it takes at most a fraction of a core.
        let mut plan_cost = Duration::ZERO;
        let mut snapshot_cost = Duration::ZERO;
        // Not with a real-time engine: its memory is locked, and trimming takes the
        // memory-map lock it must not wait for.
        let may_release = args.vrrp_rt_priority.is_none();
        let mut release_at: Option<tokio::time::Instant> = None;
        // Whether the allocator trims eagerly (quiet, after a release), until the next
        // large plan.
        let mut trimming = false;
        loop {
            // A partial snapshot (watches not all listed) is never planned from: its plan
            // would drop what the missing lists describe.
            if replan && snapshot.completeness.is_usable() {
                let planning = Instant::now();
                snapshot.local.carrier = carrier.clone();
                snapshot.local.failing_checks = failing_checks(&self.health.borrow_and_update());
                let planned;
                (snapshot, planned) =
                    plan_off_runtime(snapshot, args.node_name.clone(), last.clone()).await;
                if let Some(planned) = planned {
                    let desired = Arc::clone(&planned.desired);
                    if !self.publish(planned, &mut refused_checks).await {
                        warn!("the VRRP engine stopped unexpectedly");
                        return Stop::Release;
                    }
                    last = Some(desired);
                }
                // Ready for /readyz: a plan from a usable snapshot (every watch listed, the
                // manifests read, or the saved one during an API outage) was published.
                self.endpoint_health.plan_published();
                plan_cost = snapshot_cost + planning.elapsed();
                debug!(
                    snapshot_us = snapshot_cost.as_micros() as u64,
                    took_us = plan_cost.as_micros() as u64,
                    "planned"
                );
                snapshot_cost = Duration::ZERO;
                if may_release && (plan_cost >= PLAN_PACING_FROM || release_at.is_some()) {
                    release_at = Some(tokio::time::Instant::now() + MEMORY_RELEASE_QUIET);
                    // Busy: freed memory stays for the next plan (see release_memory).
                    if std::mem::take(&mut trimming) {
                        crate::node::socket::trim_eagerly(false);
                    }
                }
            }
            replan = true;
            tokio::select! {
                _ = signals.terminate.recv() => return self.on_terminate(args).await,
                _ = signals.interrupt.recv() => return Stop::Release,
                _ = signals.hangup.recv() => {
                    info!("SIGHUP: reloading");
                    snapshot = self.source.snapshot().await;
                }
                () = self.source.changed() => {
                    self.source.settle().await;
                    // 10,000 Services allocated a few at a time made every agent plan
                    // 10,000 addresses tens of times a second: together most of the machine
                    // the API server also needed. Small clusters plan in well under a
                    // millisecond and wait for nothing more.
                    if plan_cost >= PLAN_PACING_FROM {
                        tokio::time::sleep((plan_cost * PLAN_PACING).min(PLAN_PACING_MAX)).await;
                    }
                    let taking = Instant::now();
                    snapshot = self.source.snapshot().await;
                    snapshot_cost = taking.elapsed();
                }
                _ = self.health.changed() => {}
                () = driver::sleep_until(release_at) => {
                    release_at = (plan_cost >= PLAN_PACING_FROM)
                        .then(|| tokio::time::Instant::now() + MEMORY_RELEASE_PERIOD);
                    replan = false;
                    trimming = true;
                    tokio::task::spawn_blocking(release_memory);
                }
                _ = carrier_poll.tick() => {
                    let interfaces = last.iter().flat_map(|d| d.instances.keys());
                    let now: BTreeMap<String, bool> = interfaces
                        .filter_map(|i| health::carrier_up(i).map(|up| (i.clone(), up)))
                        .collect();
                    // Plan again only when a carrier changed.
                    replan = now != carrier;
                    carrier = now;
                }
            }
        }
    }

    /// Hands a new plan to the driver, the health monitor, the dataplane, metrics and status.
    /// False when the driver is gone.
    async fn publish(&mut self, planned: Planned, refused_checks: &mut Vec<String>) -> bool {
        let desired = &*planned.desired;
        self.source.report_refusals(desired);
        let refused: Vec<String> = self
            .monitor
            .set_checks(check_specs(desired))
            .into_iter()
            .map(|(key, e)| format!("check {key}: {e}"))
            .collect();
        if refused != *refused_checks {
            for r in &refused {
                warn!("{r}");
            }
            *refused_checks = refused;
        }
        if let Some(instances) = planned.instances
            && self.commands.send(Command::Apply(instances)).await.is_err()
        {
            return false;
        }
        if let Some(services) = planned.services {
            self.services.send_replace(Some(services));
        }
        self.metrics.virtualips(
            desired
                .resources
                .values()
                .filter(|r| r.refused.is_none())
                .count() as u64,
            desired.refused.len() as u64,
        );
        let _ = self.desired.send(Arc::clone(&planned.desired));
        true
    }

    /// SIGTERM: a restart (hold as `--restart-hold` says) unless the agent's DaemonSet says
    /// ferrovip is being uninstalled from the node.
    async fn on_terminate(&self, args: &AgentArgs) -> Stop {
        let (Some(client), Some(daemonset)) = (&self.client, &args.daemonset) else {
            return Stop::hold(args.restart_hold);
        };
        match crate::k8s::departure::departure(
            client,
            &args.controller.namespace,
            daemonset,
            &args.node_name,
            crate::k8s::departure::LOOKUP_TIMEOUT,
            self.daemonset_readable
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .await
        {
            Departure::Uninstall { .. } => Stop::Uninstall,
            Departure::Restart { .. } => Stop::hold(args.restart_hold),
        }
    }

    /// Leaves: priority 0 and addresses released, or held for the next agent. The IPVS table
    /// stays (forwarding continues through a restart, and the next agent adopts it), unless
    /// ferrovip is being uninstalled: then everything it put in the kernel goes, and the
    /// state directory's records with it.
    async fn stop(mut self, stop: Stop, args: &AgentArgs) {
        let hold = match stop {
            Stop::Hold(hold) => hold,
            Stop::Release | Stop::Uninstall => Duration::ZERO,
        };
        // Releases the controller's Lease (another agent takes over at once) alongside the
        // engine's shutdown, which never waits for it.
        let controller = self
            .controller
            .take()
            .map(|c| tokio::spawn(tokio::time::timeout(CONTROLLER_STOP, c.stop())));
        let (done, wait) = oneshot::channel();
        let command = if hold.is_zero() {
            info!("shutting down: sending priority 0 and releasing addresses");
            Command::Shutdown(done)
        } else {
            info!(hold = ?hold, "stopping for a restart: holding the addresses for the next agent");
            Command::Hold(hold, done)
        };
        if self.commands.send(command).await.is_ok() {
            let _ = wait.await;
        }
        let _ = self.engine_finished.await;
        if let Some(controller) = controller {
            let _ = controller.await;
        }
        if stop == Stop::Uninstall {
            // No plan reaches the dataplane any more: its thread ends after its last apply,
            // and cleaning up never races it.
            drop(self.services);
            if let Some(mut status) = self.dataplane_status.take() {
                let ended = async { while status.changed().await.is_ok() {} };
                if tokio::time::timeout(DATAPLANE_STOP, ended).await.is_err() {
                    warn!(
                        "the dataplane thread did not stop within {DATAPLANE_STOP:?}; cleaning up anyway"
                    );
                }
            }
            uninstall(args).await;
        }
        let _ = self.stop_metrics.send(());
    }
}

/// ferrovip leaves this node: [`cleanup`], then the state directory's records (and the saved
/// cluster snapshot). Records of what could not be undone are kept, so that a `ferrovip
/// cleanup` with more privilege finishes the job.
async fn uninstall(args: &AgentArgs) {
    match cleanup(args.state_dir.clone()).await {
        Ok(done) => {
            for line in done {
                info!("uninstall: {line}");
            }
        }
        Err(e) => warn!(error = %e, "uninstall: cleanup failed"),
    }
    let snapshot = args
        .cluster_snapshot
        .clone()
        .unwrap_or_else(|| args.state_dir.join(crate::source::cache::CACHE_FILE));
    for path in remove_records(&args.state_dir, &snapshot) {
        info!(path = %path.display(), "uninstall: record removed");
    }
    for (path, why) in leftover_records(&args.state_dir) {
        warn!(path = %path.display(), why, "uninstall: record kept: run `ferrovip cleanup` on the node with write access to /proc/sys to finish");
    }
}

/// Removes the records the agent keeps in `state_dir` of what it no longer has in the kernel
/// (after [`cleanup`]), and the saved cluster snapshot; returns the files removed. A sysctl
/// record whose values could not be put back is kept.
fn remove_records(state_dir: &std::path::Path, snapshot: &std::path::Path) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    let mut candidates = vec![snapshot.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // (`addresses-<netns>`: `cleanup` removed this namespace's; others belong to
            // agents of other namespaces sharing the directory.)
            let ours = ["ipvs-services", crate::dataplane::ipvs::NFT_FILE].contains(&name.as_str())
                || name == crate::source::cache::CACHE_FILE
                || name.ends_with(".tmp");
            if ours {
                candidates.push(entry.path());
            }
        }
    }
    for path in candidates {
        if std::fs::remove_file(&path).is_ok() {
            removed.push(path);
        }
    }
    for file in crate::dataplane::sysctl::RECORD_FILES {
        let path = state_dir.join(file);
        if path.exists() && crate::dataplane::sysctl::record_is_empty(&path) {
            let _ = std::fs::remove_file(&path);
            removed.push(path);
        }
    }
    removed
}

/// Records left in `state_dir` after [`remove_records`], with why.
fn leftover_records(state_dir: &std::path::Path) -> Vec<(PathBuf, &'static str)> {
    crate::dataplane::sysctl::RECORD_FILES
        .iter()
        .map(|f| state_dir.join(f))
        .filter(|p| p.exists())
        .map(|p| (p, "sysctls that could not be put back"))
        .collect()
}

/// Runs the Service controller alone (`ferrovip controller`) until SIGTERM or SIGINT, then
/// releases its Lease.
pub async fn run_controller(args: ControllerArgs) -> Result<(), AgentError> {
    args.controller.validate()?;
    let mut signals = Signals::install()?;
    let identity = match args
        .identity
        .clone()
        .or_else(|| std::env::var("NODE_NAME").ok())
    {
        Some(identity) => identity,
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "ferrovip-controller".into()),
    };
    let client = cluster::client().await?;
    let metrics = Metrics::new();
    let stats = Arc::new(ControllerStats::default());
    metrics.attach_controller_stats(stats.clone());
    // No engine here: live while this loop turns, ready once started.
    let heartbeat = Arc::new(crate::driver::Heartbeat::default());
    let (_readiness, readiness) = watch::channel(crate::driver::EngineReadiness {
        applied: true,
        missing_sockets: Vec::new(),
    });
    let health = Health::new(heartbeat.clone(), readiness);
    health.plan_published();
    let stop_metrics = serve_metrics(&args.metrics_addr, &metrics, &health)?;
    info!(identity = %identity, namespace = %args.controller.namespace, "Service controller started");
    let controller =
        service_controller::spawn(client, args.controller.clone(), identity, stats, None);
    let mut beat = tokio::time::interval(driver::HEARTBEAT);
    loop {
        heartbeat.beat();
        tokio::select! {
            _ = signals.terminate.recv() => break,
            _ = signals.interrupt.recv() => break,
            _ = signals.hangup.recv() => {}
            _ = beat.tick() => {}
        }
    }
    info!("stopping: releasing the Lease");
    controller.stop().await;
    let _ = stop_metrics.send(());
    Ok(())
}

/// Serves metrics unless `addr` is `off`; the sender stops the server.
fn serve_metrics(
    addr: &str,
    metrics: &Metrics,
    health: &Health,
) -> Result<oneshot::Sender<()>, AgentError> {
    let (stop, stopped) = oneshot::channel::<()>();
    if addr == "off" {
        return Ok(stop);
    }
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| AgentError::MetricsAddr(addr.to_string()))?;
    let m = metrics.clone();
    let health = health.clone();
    // Its own thread and runtime: planning a large snapshot runs on the agent's runtime for
    // as long as it takes, and a probe must not wait for it (the kubelet would restart a
    // busy agent). Ends with its runtime when `stop` is sent or dropped.
    let spawned = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    warn!(error = %e, "metrics are not served: cannot start their runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let stopped = async {
                    let _ = stopped.await;
                };
                if let Err(e) = crate::metrics::serve(addr, m, health, stopped).await {
                    warn!(error = %e, "metrics are not served");
                }
            });
        });
    if let Err(e) = spawned {
        warn!(error = %e, "metrics are not served: cannot start their thread");
    }
    Ok(stop)
}

/// Removes what agents put in this node's kernel, for a node that stops running ferrovip
/// (the agent itself leaves IPVS in place across restarts): the IPVS services listed in
/// `state_dir`, the nftables table and the sysctls recorded there (also where the kernel has
/// no IPVS), the addresses that are ours (marked, or recorded in `state_dir`) and the
/// virtual-MAC interfaces. Returns one line per thing done.
pub async fn cleanup(state_dir: PathBuf) -> Result<Vec<String>, AgentError> {
    use crate::dataplane::Dataplane;
    let mut done = Vec::new();
    let state_dir_of_addresses = state_dir.clone();
    let mut dataplane = IpvsDataplane::new(IpvsOptions {
        state_dir,
        ..IpvsOptions::default()
    });
    let report = dataplane.apply(&ServiceSet::new()).await;
    match &report.unavailable {
        Some(why) => done.push(format!("ipvs: nothing to remove ({why})")),
        None => done.push(format!(
            "ipvs: {} write(s), {} service(s) of ours left",
            report.writes, report.services
        )),
    }
    for failure in &report.failures {
        done.push(format!("ipvs: {}", failure.error));
    }
    done.extend(dataplane.remove_return_path().await);
    let addresses = AddressManager::connect_with_record(&state_dir_of_addresses, None)
        .await
        .map_err(AgentError::Netlink)?;
    // Bulk sets' routes first (they go with their anchors anyway).
    for (index, prefix) in addresses
        .remove_routes_except(&Default::default())
        .await
        .map_err(AgentError::Netlink)?
    {
        done.push(format!(
            "local route {prefix} (table main, proto 0x46) removed from interface {index}"
        ));
    }
    let removed = addresses
        .remove_all_owned_except(&Default::default())
        .await
        .map_err(AgentError::Netlink)?;
    for (index, net) in removed {
        done.push(format!("address {net} removed from interface {index}"));
    }
    // None of ours is left (those of a killed agent may have expired by their lifetime
    // before this ran): the record of this network namespace goes too.
    if let Some(record) = addresses.record_path()
        && std::fs::remove_file(&record).is_ok()
    {
        done.push(format!("address record {} removed", record.display()));
    }
    let macvlans = crate::node::link::MacvlanManager::new(addresses.handle().clone());
    match macvlans.list_owned().await {
        Ok(links) => {
            for link in links {
                match macvlans.delete_link(&link.name).await {
                    Ok(_) => done.push(format!("virtual-MAC interface {} removed", link.name)),
                    Err(e) => done.push(format!("virtual-MAC interface {}: {e}", link.name)),
                }
            }
        }
        Err(e) => done.push(format!("virtual-MAC interfaces: {e}")),
    }
    Ok(done)
}

/// A plan that differs from the last one, with what changed of what the agent hands on.
struct Planned {
    desired: Arc<Desired>,
    /// The engine thread's part, when it changed: a storm of changes to services, checks or
    /// refusals costs that thread nothing (with 1,000 VirtualIPs, converging to an identical
    /// plan delayed adverts by milliseconds).
    instances: Option<Instances>,
    /// The dataplane's part, when it changed.
    services: Option<Arc<ServiceSet>>,
}

/// Plans `snapshot` on the compute thread ([`off_runtime`]), not the agent's runtime thread:
/// with 10,000 Services a plan, its comparison with the last and the copies handed on kept
/// that thread (the watches, the status writes, the Service controller's writes) busy for
/// ~100 ms at a time. Gives the snapshot back, and the plan when it differs from `last`.
async fn plan_off_runtime(
    snapshot: Snapshot,
    node: String,
    last: Option<Arc<Desired>>,
) -> (Snapshot, Option<Planned>) {
    off_runtime(move || {
        let desired = plan(&snapshot, &node);
        if last.as_deref() == Some(&desired) {
            return (snapshot, None);
        }
        let instances = last
            .as_ref()
            .is_none_or(|p| p.instances != desired.instances)
            .then(|| desired.instances.clone());
        let services = last
            .as_ref()
            .is_none_or(|p| p.services != desired.services)
            .then(|| Arc::new(desired.services.clone()));
        let planned = Planned {
            desired: Arc::new(desired),
            instances,
            services,
        };
        (snapshot, Some(planned))
    })
    .await
}

/// Feeds the VRRP metrics from the engine's observations.
async fn observe_vrrp(mut observed: watch::Receiver<Observed>, metrics: Metrics) {
    loop {
        metrics.observe_vrrp(&observed.borrow_and_update());
        if observed.changed().await.is_err() {
            return;
        }
    }
}

fn failing_checks(report: &HealthReport) -> std::collections::BTreeSet<(String, String)> {
    report
        .checks
        .iter()
        .filter(|(_, status)| status.is_failing())
        .map(|(key, _)| (key.resource.clone(), key.check.clone()))
        .collect()
}

fn check_specs(desired: &Desired) -> BTreeMap<CheckKey, CheckSpec> {
    desired
        .checks
        .iter()
        .map(|((resource, name), check)| (CheckKey::new(resource, name), check.spec.clone()))
        .collect()
}

/// Gives the allocator's free memory back to the kernel, and says how much went. From here
/// until the next large plan the allocator trims as it frees, as glibc does by default
/// (the top of other threads' arenas, which `malloc_trim` leaves).
fn release_memory() {
    let started = Instant::now();
    let before = resident_bytes();
    crate::node::socket::trim_eagerly(true);
    let released = crate::node::socket::release_free_memory();
    let after = resident_bytes();
    let (before_mib, after_mib) = (before.unwrap_or(0) >> 20, after.unwrap_or(0) >> 20);
    let took_us = started.elapsed().as_micros() as u64;
    // Worth a line only when it was much (after a burst of a large cluster).
    if before_mib >= after_mib + 16 {
        info!(
            resident_before_mib = before_mib,
            resident_after_mib = after_mib,
            took_us,
            "free memory handed back to the kernel"
        );
    } else {
        debug!(
            released,
            resident_before_mib = before_mib,
            resident_after_mib = after_mib,
            took_us,
            "free memory handed back to the kernel"
        );
    }
}

/// This process's resident memory (`/proc/self/statm`, pages of 4 KiB).
fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// Applies status whenever the plan, the instances or the resources change, and retries
/// failed writes, in its own task so that a slow API server never delays planning.
async fn write_status(
    mut writer: StatusWriter,
    mut stores: cluster::Stores,
    mut desired: watch::Receiver<Arc<Desired>>,
    mut observed: watch::Receiver<Observed>,
    dataplane: Option<watch::Receiver<Option<Arc<DataplaneStatus>>>>,
) {
    writer.set_echoes(stores.echoes.clone());
    let mut retry = tokio::time::interval(STATUS_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut dataplane, has_dataplane) = match dataplane {
        Some(rx) => (rx, true),
        None => (watch::channel(None).1, false),
    };
    // What the last pass cost: paced like the planner, since a pass walks every VirtualIP
    // and Service. Unpaced, every agent ran one per 20 ms while 10,000 Services settled,
    // taking a sixth of the agent's time from the API server it writes to (perf). The time
    // spent waiting for the API server's answers is not the agent's cost and is left out.
    let mut cost = Duration::ZERO;
    loop {
        let started = Instant::now();
        let plan = desired.borrow_and_update().clone();
        let seen = observed.borrow_and_update().clone();
        let forwarding = dataplane.borrow_and_update().clone();
        // Before the first plan this node would report itself with no entry at all.
        if plan.completeness.is_usable() {
            writer.begin_pass();
            writer.set_services(forwarding.as_deref(), &plan);
            writer
                .reconcile(&stores.virtual_ips, &stores.nodes, &plan, &seen)
                .await;
            writer
                .reconcile_load_balancers(&stores.services, &plan, &seen)
                .await;
            cost = started.elapsed().saturating_sub(writer.waited());
            debug!(
                took_us = cost.as_micros() as u64,
                waited_us = writer.waited().as_micros() as u64,
                "status pass"
            );
        }
        // More writes ready (a pass writes at most a few hundred): the next pass at once.
        while !writer.more() {
            tokio::select! {
                r = desired.changed() => if r.is_err() { return } else { break },
                r = observed.changed() => if r.is_err() { return } else { break },
                r = stores.changes.changed() => if r.is_err() { return } else { break },
                r = dataplane.changed(), if has_dataplane => if r.is_err() { return } else { break },
                _ = retry.tick() => if writer.pending() { break },
            }
        }
        // Let a burst of changes settle into one round of writes.
        tokio::time::sleep(status_pause(cost)).await;
    }
}

/// The status writer's pause before its next pass, after one that took `cost`: 20 ms (a
/// burst of changes makes one round of writes), or for a large cluster's pass
/// PLAN_PACING times its cost (at most PLAN_PACING_MAX), as the planner paces itself.
fn status_pause(cost: Duration) -> Duration {
    let settle = Duration::from_millis(20);
    if cost < PLAN_PACING_FROM {
        return settle;
    }
    (cost * PLAN_PACING).clamp(settle, PLAN_PACING_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_writer_paces_itself_like_the_planner_for_large_clusters() {
        let ms = Duration::from_millis;
        // Small clusters: a burst settles for 20 ms, as before.
        assert_eq!(status_pause(Duration::ZERO), ms(20));
        assert_eq!(status_pause(ms(9)), ms(20));
        // A pass of 10,000 Services: four times its cost before the next, at most a second.
        assert_eq!(status_pause(ms(10)), ms(40));
        assert_eq!(status_pause(ms(40)), ms(160));
        assert_eq!(status_pause(ms(900)), PLAN_PACING_MAX);
    }
}
