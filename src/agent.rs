//! The node agent: one loop that plans from a source (manifest files in standalone mode, the
//! API server in Kubernetes mode) plus what the node observes itself (interface carrier,
//! health checks), and hands the plan to the VRRP engine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use crate::crd::VirtualIP;
use crate::crd::manifest::{self, ManifestError, Manifests};
use crate::dataplane::addr::{AddrError, AddressManager};
use crate::dataplane::ipvs::{IpvsDataplane, IpvsOptions};
use crate::dataplane::service::ServiceSet;
use crate::dataplane::worker::{self, DataplaneStatus};
use crate::health::{self, CheckKey, CheckSpec, HealthMonitor, HealthReport};
use crate::k8s::status::StatusWriter;
use crate::k8s::{ClusterSource, K8sError};
use crate::metrics::Metrics;
use crate::model::{Desired, Snapshot, plan};
use crate::vrrp::driver::{Command, Engine, Observed};

/// How often interface carrier is read.
const CARRIER_POLL: Duration = Duration::from_secs(1);
/// How often status is compared with the objects (and failed writes retried) even when
/// nothing signals a change; only differences cause writes.
const STATUS_RETRY: Duration = Duration::from_secs(1);

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
    /// the backups to wait as long, so that a restarted agent takes them over without the
    /// VIPs moving (VRRPv3, no virtual MAC). `0s` releases them at once with priority 0,
    /// which fails over within Skew_Time: right for a node going away. SIGINT always
    /// releases.
    #[arg(long, env = "FERROVIP_RESTART_HOLD", default_value = "0s", value_parser = parse_duration_arg)]
    pub restart_hold: Duration,
    /// Which dataplane forwards `spec.services`: `ipvs`, or `none` to program nothing.
    #[arg(long, env = "FERROVIP_DATAPLANE", default_value = "ipvs")]
    pub dataplane: DataplaneKind,
    /// Where the agent records what it created in the kernel (IPVS services), so that a
    /// restarted agent adopts them. Keep it on tmpfs: the kernel's tables do not survive a
    /// reboot either.
    #[arg(long, env = "FERROVIP_STATE_DIR", default_value = "/run/ferrovip")]
    pub state_dir: PathBuf,
    /// How often the dataplane re-reads the kernel to repair changes made behind its back.
    #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
    pub dataplane_resync: Duration,
    /// Serve Prometheus metrics (`/metrics`) and health (`/healthz`) here; `off` disables.
    #[arg(long, env = "FERROVIP_METRICS_ADDR", default_value = "0.0.0.0:9646")]
    pub metrics_addr: String,
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
    #[error("--metrics-addr {0:?} is not an address:port (or `off`)")]
    MetricsAddr(String),
}

impl AgentError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Netlink(_) => "netlink",
            AgentError::Signals(_) => "signals",
            AgentError::Kubernetes(e) => e.metric_label(),
            AgentError::MetricsAddr(_) => "metrics_addr",
        }
    }
}

/// Where VirtualIPs come from.
enum Source {
    Files {
        files: ManifestSource,
        poll: tokio::time::Interval,
        reported: Reported,
    },
    Cluster(ClusterSource),
}

impl Source {
    /// Resolves when the source may have changed. Cancel-safe: it races other wake-ups.
    async fn changed(&mut self) {
        match self {
            Source::Files { files, poll, .. } => loop {
                poll.tick().await;
                if files.changed() {
                    return;
                }
            },
            Source::Cluster(c) => c.changed().await,
        }
    }

    fn snapshot(&mut self) -> Snapshot {
        match self {
            Source::Files {
                files, reported, ..
            } => files.load(reported),
            Source::Cluster(c) => c.snapshot(),
        }
    }
}

/// Runs the agent until SIGTERM or SIGINT, then leaves gracefully (priority 0, addresses
/// released).
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    let mut terminate = signal(SignalKind::terminate()).map_err(AgentError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(AgentError::Signals)?;
    let mut hangup = signal(SignalKind::hangup()).map_err(AgentError::Signals)?;

    let addresses = AddressManager::connect().map_err(AgentError::Netlink)?;
    let engine = Engine::start(args.node_name.clone(), addresses).await;
    let observed = engine.observe();
    let metrics = Metrics::new();
    metrics.attach_vrrp_stats(engine.stats());
    let (stop_metrics, metrics_stopped) = oneshot::channel::<()>();
    if args.metrics_addr != "off" {
        let addr: SocketAddr = args
            .metrics_addr
            .parse()
            .map_err(|_| AgentError::MetricsAddr(args.metrics_addr.clone()))?;
        let m = metrics.clone();
        tokio::spawn(async move {
            let stopped = async {
                let _ = metrics_stopped.await;
            };
            if let Err(e) = crate::metrics::serve(addr, m, stopped).await {
                warn!(error = %e, "metrics are not served");
            }
        });
    }
    tokio::spawn(observe_vrrp(observed.clone(), metrics.clone()));
    let (services_tx, services_rx) = watch::channel(Arc::new(ServiceSet::new()));
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
    let (commands, commands_rx) = mpsc::channel(16);
    let engine_task = tokio::spawn(engine.run(commands_rx));
    let (desired_tx, desired_rx) = watch::channel(Arc::new(Desired::default()));

    let mut source = match &args.manifests {
        Some(path) => {
            info!(node = %args.node_name, manifests = %path.display(), "agent started in standalone mode");
            let mut poll = tokio::time::interval(args.manifest_poll);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            Source::Files {
                files: ManifestSource::new(path.clone()),
                poll,
                reported: Reported::default(),
            }
        }
        None => {
            info!(node = %args.node_name, "agent started in Kubernetes mode");
            let client = crate::k8s::client().await?;
            let cluster = ClusterSource::start(client.clone(), args.node_name.clone()).await;
            tokio::spawn(write_status(
                StatusWriter::new(client, args.node_name.clone()),
                cluster.clone_stores(),
                desired_rx,
                observed.clone(),
                dataplane_status.clone(),
            ));
            Source::Cluster(cluster)
        }
    };

    let (mut monitor, mut health_rx) = HealthMonitor::new();
    let mut carrier_poll = tokio::time::interval(CARRIER_POLL);
    carrier_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut snapshot = source.snapshot();
    let mut carrier: BTreeMap<String, bool> = BTreeMap::new();
    let mut last: Option<Desired> = None;
    let mut refused_checks: Vec<String> = Vec::new();
    let mut hold = Duration::ZERO;
    let mut replan = true;
    loop {
        snapshot.local.carrier = carrier.clone();
        snapshot.local.failing_checks = failing_checks(&health_rx.borrow_and_update());
        let desired = if replan {
            Some(plan(&snapshot, &args.node_name))
        } else {
            None
        };
        replan = true;
        if let Some(desired) = desired
            && last.as_ref() != Some(&desired)
        {
            if let Source::Files { reported, .. } = &mut source {
                reported.refusals(&desired);
            }
            let refused: Vec<String> = monitor
                .set_checks(check_specs(&desired))
                .into_iter()
                .map(|(key, e)| format!("check {key}: {e}"))
                .collect();
            if refused != refused_checks {
                for r in &refused {
                    warn!("{r}");
                }
                refused_checks = refused;
            }
            if commands
                .send(Command::Apply(desired.clone()))
                .await
                .is_err()
            {
                warn!("the VRRP engine stopped unexpectedly");
                break;
            }
            services_tx.send_if_modified(|s| {
                if **s == desired.services {
                    false
                } else {
                    *s = Arc::new(desired.services.clone());
                    true
                }
            });
            metrics.virtualips(
                desired
                    .resources
                    .values()
                    .filter(|r| r.refused.is_none())
                    .count() as u64,
                desired.refused.len() as u64,
            );
            let _ = desired_tx.send(Arc::new(desired.clone()));
            last = Some(desired);
        }

        tokio::select! {
            _ = terminate.recv() => {
                hold = args.restart_hold;
                break;
            }
            _ = interrupt.recv() => break,
            _ = hangup.recv() => {
                info!("SIGHUP: reloading");
                snapshot = source.snapshot();
            }
            () = source.changed() => {
                if let Source::Cluster(c) = &mut source {
                    c.settle().await;
                }
                snapshot = source.snapshot();
            }
            _ = health_rx.changed() => {}
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

    let (done, wait) = oneshot::channel();
    let command = if hold.is_zero() {
        info!("shutting down: sending priority 0 and releasing addresses");
        Command::Shutdown(done)
    } else {
        info!(hold = ?hold, "stopping for a restart: holding the addresses for the next agent");
        Command::Hold(hold, done)
    };
    if commands.send(command).await.is_ok() {
        let _ = wait.await;
    }
    let _ = engine_task.await;
    let _ = stop_metrics.send(());
    // The IPVS table stays: forwarding continues through a restart, and the next agent
    // adopts it.
    Ok(())
}

/// Removes what agents put in this node's kernel, for a node that stops running ferrovip
/// (the agent itself leaves IPVS in place across restarts): the IPVS services listed in
/// `state_dir`, the nftables table (restoring the sysctls recorded there) and the addresses
/// marked as ours. Returns one line per thing done.
pub async fn cleanup(state_dir: PathBuf) -> Result<Vec<String>, AgentError> {
    use crate::dataplane::Dataplane;
    let mut done = Vec::new();
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
    let addresses = AddressManager::connect().map_err(AgentError::Netlink)?;
    let removed = addresses
        .remove_all_owned_except(&Default::default())
        .await
        .map_err(AgentError::Netlink)?;
    for (index, net) in removed {
        done.push(format!("address {net} removed from interface {index}"));
    }
    Ok(done)
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

/// Applies status whenever the plan, the instances or the resources change, and retries
/// failed writes, in its own task so that a slow API server never delays planning.
async fn write_status(
    mut writer: StatusWriter,
    mut stores: crate::k8s::Stores,
    mut desired: watch::Receiver<Arc<Desired>>,
    mut observed: watch::Receiver<Observed>,
    dataplane: Option<watch::Receiver<Option<Arc<DataplaneStatus>>>>,
) {
    let mut retry = tokio::time::interval(STATUS_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut dataplane, has_dataplane) = match dataplane {
        Some(rx) => (rx, true),
        None => (watch::channel(None).1, false),
    };
    loop {
        let plan = desired.borrow_and_update().clone();
        let seen = observed.borrow_and_update().clone();
        let forwarding = dataplane.borrow_and_update().clone();
        writer.set_services(forwarding.as_deref(), &plan);
        writer
            .reconcile(&stores.virtual_ips, &stores.nodes, &plan, &seen)
            .await;
        loop {
            tokio::select! {
                r = desired.changed() => if r.is_err() { return } else { break },
                r = observed.changed() => if r.is_err() { return } else { break },
                r = stores.changes.changed() => if r.is_err() { return } else { break },
                r = dataplane.changed(), if has_dataplane => if r.is_err() { return } else { break },
                _ = retry.tick() => if writer.pending() { break },
            }
        }
        // Let a burst of changes settle into one round of writes.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The manifest files, with change detection and the last good content of each file.
struct ManifestSource {
    path: PathBuf,
    fingerprint: Option<Vec<(PathBuf, Option<SystemTime>, u64)>>,
    /// Per file, the VirtualIPs of its last successful parse: a file that becomes unreadable
    /// or stops being valid YAML keeps its previous VIPs running instead of dropping them.
    last_good: BTreeMap<PathBuf, Vec<VirtualIP>>,
}

impl ManifestSource {
    fn new(path: PathBuf) -> Self {
        ManifestSource {
            path,
            fingerprint: None,
            last_good: BTreeMap::new(),
        }
    }

    /// Whether the files changed since the last load (true before the first load).
    fn changed(&mut self) -> bool {
        let now = fingerprint(&self.path);
        if self.fingerprint.as_ref() == Some(&now) {
            return false;
        }
        self.fingerprint = Some(now);
        true
    }

    fn load(&mut self, reported: &mut Reported) -> Snapshot {
        self.fingerprint = Some(fingerprint(&self.path));
        let files = match manifest::manifest_files(&self.path) {
            Ok(files) => files,
            Err(e) => {
                reported.manifest_errors(&[e], "keeping the VirtualIPs loaded before");
                return self.snapshot();
            }
        };
        let mut errors = Vec::new();
        let mut fresh = BTreeMap::new();
        for file in files {
            let text = match std::fs::read_to_string(&file) {
                Ok(t) => t,
                Err(source) => {
                    errors.push(ManifestError::Read {
                        path: file.clone(),
                        source,
                    });
                    if let Some(prev) = self.last_good.remove(&file) {
                        fresh.insert(file, prev);
                    }
                    continue;
                }
            };
            let mut parsed = Manifests::default();
            manifest::parse_into(&file, &text, &mut parsed);
            let whole_file_broken = parsed
                .errors
                .iter()
                .any(|e| matches!(e, ManifestError::Yaml { .. }));
            if whole_file_broken && let Some(prev) = self.last_good.remove(&file) {
                fresh.insert(file, prev);
            } else {
                fresh.insert(file, parsed.virtual_ips);
            }
            errors.extend(parsed.errors);
        }
        self.last_good = fresh;
        reported.manifest_errors(&errors, "the other VirtualIPs keep running");
        self.snapshot()
    }

    fn snapshot(&self) -> Snapshot {
        // Names must be unique across files too: the first definition wins.
        let mut seen = std::collections::HashSet::new();
        let mut virtual_ips = Vec::new();
        for (file, vips) in &self.last_good {
            for vip in vips {
                let name = vip.metadata.name.clone().unwrap_or_default();
                if seen.insert(name.clone()) {
                    virtual_ips.push(vip.clone());
                } else {
                    warn!(resource = %format!("VirtualIP {name:?}"), file = %file.display(), "metadata.name: defined in more than one file; the first definition is used");
                }
            }
        }
        Snapshot {
            virtual_ips,
            ..Snapshot::default()
        }
    }
}

fn fingerprint(path: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let files = manifest::manifest_files(path).unwrap_or_default();
    files
        .into_iter()
        .map(|f| {
            let meta = std::fs::metadata(&f).ok();
            let mtime = meta.as_ref().and_then(|m| m.modified().ok());
            let len = meta.map(|m| m.len()).unwrap_or(0);
            (f, mtime, len)
        })
        .collect()
}

/// Logs problems once per change instead of on every reload.
#[derive(Default)]
struct Reported {
    manifest: Vec<String>,
    refused: Vec<String>,
}

impl Reported {
    fn manifest_errors(&mut self, errors: &[ManifestError], consequence: &str) {
        let now: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        if now != self.manifest {
            for e in &now {
                warn!(error = %e, "manifest refused; {consequence}");
            }
            self.manifest = now;
        }
    }

    fn refusals(&mut self, desired: &crate::model::Desired) {
        let now: Vec<String> = desired
            .refused
            .iter()
            .map(|r| format!("VirtualIP {:?}: {}", r.resource, r.reason))
            .collect();
        if now != self.refused {
            for (r, text) in desired.refused.iter().zip(&now) {
                warn!(resource = %r.resource, reason = r.reason.metric_label(), "refused {text}; the other VirtualIPs keep running");
            }
            self.refused = now;
        }
    }
}
