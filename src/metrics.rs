//! Prometheus metrics and the HTTP endpoint that serves them.
//!
//! [`Metrics`] holds typed handles registered under the `ferrovip` prefix; clones share them.
//! The agent feeds it (VRRP states from the engine's watch channel, dataplane outcomes,
//! VirtualIP counts) and [`serve`] exposes them on `GET /metrics`, next to `/healthz` and
//! `/readyz`.
//!
//! Series (label values are bounded: instance labels come from configuration, everything else
//! from `metric_label()`-style `&'static str`s):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `ferrovip_vrrp_state` | gauge: 0 init, 1 backup, 2 master, 3 fault | `vip_group, interface, family, vrid` |
//! | `ferrovip_vrrp_priority` | gauge | same |
//! | `ferrovip_vrrp_transitions_total` | counter | same + `to` (`init`, `backup`, `master`, `fault`) |
//! | `ferrovip_vrrp_master_changes_total` | counter: the master address this node sees changed | same as state |
//! | `ferrovip_vrrp_packets_received_total`, `_sent_total`, `ferrovip_vrrp_send_errors_total` | counter | — |
//! | `ferrovip_vrrp_packets_dropped_total` | counter | `reason` |
//! | `ferrovip_bulk_arp_ignore_fallbacks_total` | counter: large IPv4 sets added as interface addresses because `arp_ignore` ≠ 0 | — |
//! | `ferrovip_bulk_ndp_fallbacks_total` | counter: large IPv6 sets added as interface addresses because the NDP responder could not start | — |
//! | `ferrovip_ndp_answers_total` | counter: neighbour solicitations answered for route-held IPv6 addresses | — |
//! | `ferrovip_watch_restarts_total` | counter: API server watches taken as silent and listed again (an accepted write, or the leader's progress, not delivered within 15 s; `source::reflect`) | — |
//! | `ferrovip_ndp_groups` | gauge: solicited-node multicast groups joined (per interface) for route-held IPv6 addresses | — |
//! | `ferrovip_vrrp_takeover_seconds` | histogram, 10 ms … 10 s: backup → master, from the last advertisement heard from the previous master to the transition (not observed from init, nor when none was heard) | `interface, family, cause` (`master_down`, `priority_zero`, `preempt`) |
//! | `ferrovip_dataplane_available` | gauge 0/1 | `dataplane` |
//! | `ferrovip_dataplane_apply_total` | counter | `dataplane, result` |
//! | `ferrovip_dataplane_apply_duration_seconds` | histogram, 100 µs … 10 s | `dataplane` |
//! | `ferrovip_dataplane_writes_total` | counter | `dataplane` |
//! | `ferrovip_dataplane_errors_total` | counter | `dataplane, reason` |
//! | `ferrovip_ipvs_services`, `ferrovip_ipvs_destinations` | gauge | — |
//! | `ferrovip_virtualips` | gauge | `state` (`active`, `refused`) |
//! | `ferrovip_kube_proxy_problem` | gauge 0/1: a kube-proxy misconfiguration against the load-balancer addresses this node may hold | `problem` (`no_strict_arp`, `ipvs_bypassed`) |
//! | `ferrovip_build_info` | gauge, always 1 | `version` |
//! | `ferrovip_controller_leading` | gauge 0/1: this process is the Service controller's leader | — |
//! | `ferrovip_pool_addresses`, `ferrovip_pool_addresses_in_use` | gauge (leader only) | `pool, family` |
//! | `ferrovip_allocation_failures_total` | counter: a Service's failure reason changed to `reason` | `reason` |
//! | `ferrovip_allocation_latency_seconds` | histogram: a Service first seen without an address → its allocation record written | — |
//! | `ferrovip_controller_writes_total` | counter | `kind` (`record`, `status`, `pool_status`, `event`), `result` |

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinSet};
use tracing::{debug, info, warn};

use crate::controller::{ControllerStats, PoolFigures};
use crate::dataplane::ApplyReport;
use crate::dataplane::worker::ApplyObserver;
use crate::driver::{EngineReadiness, HEARTBEAT, Heartbeat};
use crate::engine::{InstanceStatus, Observed, Stats};
use crate::vocab::Family as IpFamily;
use crate::vrrp::instance::State;

/// Upper bounds of the apply-duration histogram: 1-2.5-5 per decade from 100 µs to 10 s, so
/// both a one-destination change (sub-millisecond) and a 100 000-destination convergence land
/// in a bucket of their own.
const APPLY_DURATION_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The VRRP state as exported: the RFC state, except that an instance that cannot run reports
/// `Fault` (keepalived's numbering, so existing dashboards read it alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ExportedState {
    Init = 0,
    Backup = 1,
    Master = 2,
    Fault = 3,
}

impl ExportedState {
    const ALL: [ExportedState; 4] = [
        ExportedState::Init,
        ExportedState::Backup,
        ExportedState::Master,
        ExportedState::Fault,
    ];

    fn of(status: &InstanceStatus) -> Self {
        if status.fault.is_some() {
            return ExportedState::Fault;
        }
        match status.state {
            State::Initialize => ExportedState::Init,
            State::Backup => ExportedState::Backup,
            State::Master => ExportedState::Master,
        }
    }

    fn label(self) -> &'static str {
        match self {
            ExportedState::Init => "init",
            ExportedState::Backup => "backup",
            ExportedState::Master => "master",
            ExportedState::Fault => "fault",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    vip_group: String,
    interface: String,
    family: &'static str,
    vrid: u8,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    vip_group: String,
    interface: String,
    family: &'static str,
    vrid: u8,
    to: &'static str,
}

impl TransitionLabels {
    fn new(instance: &InstanceLabels, to: ExportedState) -> Self {
        Self {
            vip_group: instance.vip_group.clone(),
            interface: instance.interface.clone(),
            family: instance.family,
            vrid: instance.vrid,
            to: to.label(),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DataplaneLabels {
    dataplane: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApplyLabels {
    dataplane: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    dataplane: &'static str,
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VirtualIpLabels {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProblemLabels {
    problem: &'static str,
}

/// What the last [`Metrics::observe_vrrp`] saw of one instance.
#[derive(Debug)]
struct Seen {
    labels: InstanceLabels,
    state: ExportedState,
    /// Sticky through periods without a known master, so losing and relearning the same
    /// master is not counted as a change.
    master: Option<IpAddr>,
}

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

fn apply_duration_histogram() -> Histogram {
    Histogram::new(APPLY_DURATION_BUCKETS)
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    vrrp_state: Family<InstanceLabels, Gauge>,
    vrrp_priority: Family<InstanceLabels, Gauge>,
    vrrp_transitions: Family<TransitionLabels, Counter>,
    vrrp_master_changes: Family<InstanceLabels, Counter>,
    vrrp_seen: Mutex<HashMap<(String, IpFamily), Seen>>,
    vrrp_stats: Arc<VrrpPacketCollector>,
    controller: Arc<ControllerCollector>,
    dataplane_available: Family<DataplaneLabels, Gauge>,
    dataplane_apply: Family<ApplyLabels, Counter>,
    dataplane_apply_duration: HistogramFamily<DataplaneLabels>,
    dataplane_writes: Family<DataplaneLabels, Counter>,
    dataplane_errors: Family<ErrorLabels, Counter>,
    ipvs_services: Gauge,
    ipvs_destinations: Gauge,
    virtualips: Family<VirtualIpLabels, Gauge>,
    kube_proxy_problem: Family<ProblemLabels, Gauge>,
}

/// The agent's metrics. Cheap to clone: clones share one registry.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ferrovip");
        let vrrp_state = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "vrrp_state",
            "VRRP state of the instance on this node: 0 init, 1 backup, 2 master, 3 fault",
            vrrp_state.clone(),
        );
        let vrrp_priority = Family::<InstanceLabels, Gauge>::default();
        registry.register(
            "vrrp_priority",
            "VRRP priority this node advertises for the instance",
            vrrp_priority.clone(),
        );
        let vrrp_transitions = Family::<TransitionLabels, Counter>::default();
        registry.register(
            "vrrp_transitions",
            "VRRP state changes of the instance on this node, by new state",
            vrrp_transitions.clone(),
        );
        let vrrp_master_changes = Family::<InstanceLabels, Counter>::default();
        registry.register(
            "vrrp_master_changes",
            "Changes of the instance's master address as seen from this node",
            vrrp_master_changes.clone(),
        );
        let vrrp_stats = Arc::new(VrrpPacketCollector::default());
        registry.register_collector(Box::new(vrrp_stats.clone()));
        let controller = Arc::new(ControllerCollector::default());
        registry.register_collector(Box::new(controller.clone()));

        let dataplane_available = Family::<DataplaneLabels, Gauge>::default();
        registry.register(
            "dataplane_available",
            "Whether the dataplane works on this node (1) or is missing (0)",
            dataplane_available.clone(),
        );
        let dataplane_apply = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "dataplane_apply",
            "Dataplane convergences, by result",
            dataplane_apply.clone(),
        );
        let dataplane_apply_duration: HistogramFamily<DataplaneLabels> =
            Family::new_with_constructor(apply_duration_histogram);
        registry.register_with_unit(
            "dataplane_apply_duration",
            "Time one dataplane convergence took",
            Unit::Seconds,
            dataplane_apply_duration.clone(),
        );
        let dataplane_writes = Family::<DataplaneLabels, Counter>::default();
        registry.register(
            "dataplane_writes",
            "Changes written to the kernel by the dataplane",
            dataplane_writes.clone(),
        );
        let dataplane_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "dataplane_errors",
            "Dataplane errors, by reason",
            dataplane_errors.clone(),
        );
        let ipvs_services = Gauge::default();
        registry.register(
            "ipvs_services",
            "IPVS virtual services owned by this agent",
            ipvs_services.clone(),
        );
        let ipvs_destinations = Gauge::default();
        registry.register(
            "ipvs_destinations",
            "IPVS destinations of the services owned by this agent",
            ipvs_destinations.clone(),
        );

        let kube_proxy_problem = Family::<ProblemLabels, Gauge>::default();
        registry.register(
            "kube_proxy_problem",
            "A kube-proxy misconfiguration against the load-balancer addresses this node may hold (1: present)",
            kube_proxy_problem.clone(),
        );
        let virtualips = Family::<VirtualIpLabels, Gauge>::default();
        registry.register(
            "virtualips",
            "VirtualIPs this node serves (active) or refused as invalid or conflicting",
            virtualips.clone(),
        );
        registry.register(
            "build",
            "ferrovip build information",
            Info::new([("version", env!("CARGO_PKG_VERSION"))]),
        );

        Self {
            inner: Arc::new(Inner {
                registry,
                vrrp_state,
                vrrp_priority,
                vrrp_transitions,
                vrrp_master_changes,
                vrrp_seen: Mutex::new(HashMap::new()),
                vrrp_stats,
                controller,
                dataplane_available,
                dataplane_apply,
                dataplane_apply_duration,
                dataplane_writes,
                dataplane_errors,
                ipvs_services,
                ipvs_destinations,
                virtualips,
                kube_proxy_problem,
            }),
        }
    }

    /// Updates the VRRP series from the engine's latest report; call it whenever the watch
    /// channel changes. A transition is counted when an instance's state differs from the
    /// previous report (a new instance starts from `init`, as the state machine does); the
    /// watch channel keeps only the latest value, so states that came and went between two
    /// reports are not seen. Series of instances that are gone are removed.
    pub fn observe_vrrp(&self, observed: &Observed) {
        let inner = &self.inner;
        let mut seen = inner
            .vrrp_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        seen.retain(|key, entry| {
            let keep = observed.instances.contains_key(key);
            if !keep {
                self.forget_instance(&entry.labels);
            }
            keep
        });
        for (key, status) in &observed.instances {
            let state = ExportedState::of(status);
            let entry = match seen.get_mut(key) {
                Some(entry) if labels_match(&entry.labels, key, status) => entry,
                stale => {
                    // Another interface or VRID is another instance for the engine too.
                    if let Some(entry) = stale {
                        self.forget_instance(&entry.labels);
                    }
                    let labels = InstanceLabels {
                        vip_group: key.0.clone(),
                        interface: status.interface.clone(),
                        family: family_label(key.1),
                        vrid: status.vrid,
                    };
                    seen.insert(
                        key.clone(),
                        Seen {
                            labels,
                            state: ExportedState::Init,
                            master: None,
                        },
                    );
                    seen.get_mut(key).expect("just inserted")
                }
            };
            if entry.state != state {
                inner
                    .vrrp_transitions
                    .get_or_create(&TransitionLabels::new(&entry.labels, state))
                    .inc();
                entry.state = state;
            }
            if let Some(master) = status.master {
                if entry.master.is_some_and(|known| known != master) {
                    inner.vrrp_master_changes.get_or_create(&entry.labels).inc();
                } else if entry.master.is_none() {
                    // Creates the series at 0, so that a rate() sees the first change.
                    inner
                        .vrrp_master_changes
                        .get_or_create(&entry.labels)
                        .inc_by(0);
                }
                entry.master = Some(master);
            }
            inner
                .vrrp_state
                .get_or_create(&entry.labels)
                .set(state as i64);
            inner
                .vrrp_priority
                .get_or_create(&entry.labels)
                .set(i64::from(status.priority));
        }
    }

    fn forget_instance(&self, labels: &InstanceLabels) {
        let inner = &self.inner;
        inner.vrrp_state.remove(labels);
        inner.vrrp_priority.remove(labels);
        inner.vrrp_master_changes.remove(labels);
        for to in ExportedState::ALL {
            inner
                .vrrp_transitions
                .remove(&TransitionLabels::new(labels, to));
        }
    }

    /// Exports the engine's packet counters (read at scrape time). Only the first call counts:
    /// one engine runs per agent.
    pub fn attach_vrrp_stats(&self, stats: Arc<Stats>) {
        if self.inner.vrrp_stats.stats.set(stats).is_err() {
            warn!("VRRP packet counters attached twice; keeping the first");
        }
    }

    /// Exports the Service controller's figures (read at scrape time). Only the first call
    /// counts: one controller runs per process.
    pub fn attach_controller_stats(&self, stats: Arc<ControllerStats>) {
        if self.inner.controller.stats.set(stats).is_err() {
            warn!("controller figures attached twice; keeping the first");
        }
    }

    /// Whether a dataplane (`"ipvs"`, `"nftables"`) works on this node.
    /// The kube-proxy problems present now (every other one shows 0).
    pub fn kube_proxy_problems(&self, problems: &[crate::model::kube_proxy::Problem]) {
        for label in crate::model::kube_proxy::Problem::LABELS {
            let on = problems.iter().any(|p| p.metric_label() == label);
            self.inner
                .kube_proxy_problem
                .get_or_create(&ProblemLabels { problem: label })
                .set(i64::from(on));
        }
    }

    pub fn dataplane_available(&self, dataplane: &'static str, available: bool) {
        self.inner
            .dataplane_available
            .get_or_create(&DataplaneLabels { dataplane })
            .set(i64::from(available));
    }

    /// One convergence of a dataplane: `result` is a bounded label (`"ok"`, `"partial"` when
    /// some objects failed and the others were applied, `"error"`), `writes` the number of
    /// changes it sent to the kernel.
    pub fn dataplane_applied(
        &self,
        dataplane: &'static str,
        result: &'static str,
        duration: Duration,
        writes: u64,
    ) {
        let inner = &self.inner;
        let labels = DataplaneLabels { dataplane };
        inner
            .dataplane_apply
            .get_or_create(&ApplyLabels { dataplane, result })
            .inc();
        inner
            .dataplane_apply_duration
            .get_or_create(&labels)
            .observe(duration.as_secs_f64());
        inner.dataplane_writes.get_or_create(&labels).inc_by(writes);
    }

    /// One dataplane error; `reason` is the error's `metric_label()`.
    pub fn dataplane_error(&self, dataplane: &'static str, reason: &'static str) {
        self.inner
            .dataplane_errors
            .get_or_create(&ErrorLabels { dataplane, reason })
            .inc();
    }

    /// Size of the IPVS table this agent owns.
    pub fn ipvs_table(&self, services: u64, destinations: u64) {
        self.inner.ipvs_services.set(saturating_i64(services));
        self.inner
            .ipvs_destinations
            .set(saturating_i64(destinations));
    }

    /// VirtualIPs this node serves and those it refused (invalid or conflicting).
    pub fn virtualips(&self, active: u64, refused: u64) {
        let family = &self.inner.virtualips;
        family
            .get_or_create(&VirtualIpLabels { state: "active" })
            .set(saturating_i64(active));
        family
            .get_or_create(&VirtualIpLabels { state: "refused" })
            .set(saturating_i64(refused));
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn encode_prometheus(&self) -> String {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }

    /// The OpenMetrics text format (1.0.0), `# EOF` included.
    pub fn encode_openmetrics(&self) -> String {
        let mut text = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut text, &self.inner.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

impl ApplyObserver for Metrics {
    fn applied(&self, dataplane: &'static str, report: &ApplyReport, took: Duration) {
        self.dataplane_available(dataplane, report.unavailable.is_none());
        if report.unavailable.is_none() {
            self.dataplane_applied(dataplane, report.result_label(), took, report.writes);
            self.ipvs_table(report.services as u64, report.backends as u64);
        }
        let reasons = report.failures.iter().map(|f| f.reason);
        for reason in reasons.chain(report.error.as_ref().map(|e| e.reason)) {
            self.dataplane_error(dataplane, reason);
        }
    }
}

fn labels_match(
    labels: &InstanceLabels,
    key: &(String, IpFamily),
    status: &InstanceStatus,
) -> bool {
    labels.vip_group == key.0
        && labels.family == family_label(key.1)
        && labels.interface == status.interface
        && labels.vrid == status.vrid
}

fn family_label(family: IpFamily) -> &'static str {
    match family {
        IpFamily::V4 => "ipv4",
        IpFamily::V6 => "ipv6",
    }
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Reads the engine's atomic packet counters at scrape time, so the packet path never touches
/// the registry.
#[derive(Debug, Default)]
struct VrrpPacketCollector {
    stats: OnceLock<Arc<Stats>>,
}

impl Collector for VrrpPacketCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use std::sync::atomic::Ordering::Relaxed;
        let Some(stats) = self.stats.get() else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "vrrp_packets_received",
                "VRRP packets received",
                stats.received.load(Relaxed),
            ),
            (
                "vrrp_packets_sent",
                "VRRP packets sent",
                stats.sent.load(Relaxed),
            ),
            (
                "vrrp_send_errors",
                "VRRP packets that could not be sent",
                stats.send_errors.load(Relaxed),
            ),
            (
                "bulk_arp_ignore_fallbacks",
                "Large IPv4 address sets added as interface addresses instead of local routes \
                 because the interface's arp_ignore is not 0",
                crate::node::addr::arp_ignore_fallbacks(),
            ),
            (
                "bulk_ndp_fallbacks",
                "Large IPv6 address sets added as interface addresses instead of local routes \
                 because neighbour solicitations could not be answered from user space",
                crate::node::addr::ndp_fallbacks(),
            ),
            (
                "ndp_answers",
                "Neighbour solicitations answered for addresses held by local routes",
                crate::node::ndp::answers_total(),
            ),
            (
                "watch_restarts",
                "Watches of the API server listed again because they did not deliver this \
                 process's accepted writes, or what the Service controller's leader had seen, \
                 within 15 s",
                crate::source::reflect::restarts(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(name, help, None, MetricType::Counter)?)?;
        }
        let mut dropped = encoder.encode_descriptor(
            "vrrp_packets_dropped",
            "VRRP packets received and dropped, by reason",
            None,
            MetricType::Counter,
        )?;
        for (reason, value) in stats.dropped() {
            let labels = [("reason", reason)];
            ConstCounter::new(value).encode(dropped.encode_family(&labels)?)?;
        }
        ConstGauge::new(i64::try_from(crate::node::ndp::groups_joined()).unwrap_or(i64::MAX))
            .encode(encoder.encode_descriptor(
                "ndp_groups",
                "Solicited-node multicast groups joined, per interface, for IPv6 addresses held \
                 by local routes (so that MLD-snooping switches forward their solicitations)",
                None,
                MetricType::Gauge,
            )?)?;
        let mut takeovers = encoder.encode_descriptor(
            "vrrp_takeover",
            "Backup to master takeovers: from the last advertisement heard from the previous \
             master to this node's transition, by cause",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        for ((interface, family, cause), figures) in stats.takeovers() {
            let labels = [
                ("interface", &*interface),
                ("family", family_label(family)),
                ("cause", cause),
            ];
            takeovers
                .encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(
                    figures.sum,
                    figures.count,
                    &figures.bucket_pairs(),
                    None,
                )?;
        }
        Ok(())
    }
}

/// Reads the Service controller's figures at scrape time.
#[derive(Debug, Default)]
struct ControllerCollector {
    stats: OnceLock<Arc<ControllerStats>>,
}

impl Collector for ControllerCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = self.stats.get() else {
            return Ok(());
        };
        ConstGauge::new(i64::from(stats.leading())).encode(encoder.encode_descriptor(
            "controller_leading",
            "Whether this process leads the Service controller (holds its Lease)",
            None,
            MetricType::Gauge,
        )?)?;
        let pools = stats.pools();
        for (name, help, value) in [
            (
                "pool_addresses",
                "Addresses a LoadBalancerPool can hand out, per family (from the leader)",
                (|f: &PoolFigures| f.total) as fn(&PoolFigures) -> i64,
            ),
            (
                "pool_addresses_in_use",
                "Addresses of a LoadBalancerPool held by Services, per family (from the leader)",
                |f: &PoolFigures| f.in_use,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for ((pool, ip_family), figures) in &pools {
                let labels = [("pool", pool.as_str()), ("family", *ip_family)];
                ConstGauge::new(value(figures)).encode(family.encode_family(&labels)?)?;
            }
        }
        let failures = stats.failures();
        let mut family = encoder.encode_descriptor(
            "allocation_failures",
            "Services whose allocation failed, counted when a Service's reason changes",
            None,
            MetricType::Counter,
        )?;
        for reason in crate::ipam::FailureReason::ALL.map(|r| r.metric_label()) {
            let labels = [("reason", reason)];
            ConstCounter::new(failures.get(reason).copied().unwrap_or(0))
                .encode(family.encode_family(&labels)?)?;
        }
        stats.latency().encode(encoder.encode_descriptor(
            "allocation_latency",
            "From the controller first seeing a Service without an address to its allocation record written",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?)?;
        let writes = stats.writes();
        let mut family = encoder.encode_descriptor(
            "controller_writes",
            "Writes of the Service controller, by kind and result",
            None,
            MetricType::Counter,
        )?;
        for ((kind, result), count) in &writes {
            let labels = [("kind", *kind), ("result", *result)];
            ConstCounter::new(*count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl MetricsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            MetricsError::Bind { .. } => "bind",
        }
    }
}

/// Connections served at once. When all are taken, a new connection closes the one idle the
/// longest (no request in service, no response in flight), so clients holding idle
/// connections can never keep a probe out.
const MAX_CONNECTIONS: usize = 64;
/// A request head must be complete this long after the server starts waiting for it. On a
/// kept-alive connection the wait starts when the previous response is sent, so this is the
/// idle timeout too: long enough for a 15 s scrape interval to reuse its connection.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest request head (request line and headers) read; hyper answers 431 beyond.
const MAX_HEAD: usize = 16 * 1024;
/// Pause after a failed accept (usually out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// `/healthz` fails when the engine loop has not turned for this long: four heartbeats.
pub const ENGINE_STALL_LIMIT: Duration = Duration::from_millis(4 * HEARTBEAT.as_millis() as u64);

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
const TEXT: &str = "text/plain; charset=utf-8";

/// What `/healthz` and `/readyz` answer from. Clones share it.
#[derive(Debug, Clone)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Debug)]
struct HealthInner {
    heartbeat: Arc<Heartbeat>,
    engine: watch::Receiver<EngineReadiness>,
    planned: AtomicBool,
}

impl Health {
    pub fn new(heartbeat: Arc<Heartbeat>, engine: watch::Receiver<EngineReadiness>) -> Health {
        Health {
            inner: Arc::new(HealthInner {
                heartbeat,
                engine,
                planned: AtomicBool::new(false),
            }),
        }
    }

    /// The agent published a plan made from a complete source.
    pub fn plan_published(&self) {
        self.inner.planned.store(true, AtomicOrdering::Relaxed);
    }

    /// Live while the engine loop turns.
    pub fn live(&self) -> Result<(), String> {
        let age = self.inner.heartbeat.age();
        if age > ENGINE_STALL_LIMIT {
            return Err(format!(
                "the VRRP engine loop has not turned for {} ms (limit {} ms)",
                age.as_millis(),
                ENGINE_STALL_LIMIT.as_millis()
            ));
        }
        Ok(())
    }

    /// Ready when live, a complete plan was published and applied, and every interface and
    /// family it needs has its VRRP socket open; otherwise every reason.
    pub fn ready(&self) -> Result<(), Vec<String>> {
        let mut problems = Vec::new();
        if let Err(why) = self.live() {
            problems.push(why);
        }
        if !self.inner.planned.load(AtomicOrdering::Relaxed) {
            problems.push("no plan from a complete source yet".to_owned());
        }
        let engine = self.inner.engine.borrow();
        if !engine.applied {
            problems.push("the VRRP engine has not applied a plan yet".to_owned());
        }
        for missing in &engine.missing_sockets {
            problems.push(format!("no VRRP socket on {missing}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems)
        }
    }
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    info!(%addr, "serving metrics");
    serve_listener(listener, metrics, health, shutdown).await;
    Ok(())
}

/// Whether a connection is serving a request (or writing its response), and since when it
/// has not been.
#[derive(Debug)]
struct Activity {
    state: Mutex<(usize, std::time::Instant)>,
}

impl Activity {
    fn new() -> Arc<Activity> {
        Arc::new(Activity {
            state: Mutex::new((0, std::time::Instant::now())),
        })
    }

    /// When the connection became idle, or None while it serves a request.
    fn idle_since(&self) -> Option<std::time::Instant> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        (state.0 == 0).then_some(state.1)
    }
}

/// Marks a request in service until its response body has been handed to the connection.
#[derive(Debug)]
struct InFlight(Arc<Activity>);

impl InFlight {
    fn begin(activity: &Arc<Activity>) -> InFlight {
        activity
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0 += 1;
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.0 = state.0.saturating_sub(1);
        state.1 = std::time::Instant::now();
    }
}

/// A whole response body that keeps its request marked in flight until it has been sent.
struct ResponseBody {
    data: Option<Bytes>,
    _in_flight: InFlight,
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.get_mut().data.take().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// [`serve`] on a listener the caller bound (tests bind port 0 and read the address).
/// Open connections are dropped when `shutdown` completes.
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    let mut slots: HashMap<tokio::task::Id, (AbortHandle, Arc<Activity>)> = HashMap::new();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(ended) = connections.join_next_with_id(), if !connections.is_empty() => {
                let id = match ended {
                    Ok((id, ())) => id,
                    Err(e) => e.id(),
                };
                slots.remove(&id);
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if slots.len() >= MAX_CONNECTIONS && !evict_idlest(&mut slots) {
                        debug!(%peer, "every metrics connection is serving a request: closing a new one");
                        continue;
                    }
                    let activity = Activity::new();
                    let handle = connections.spawn(serve_connection(
                        stream,
                        metrics.clone(),
                        health.clone(),
                        activity.clone(),
                    ));
                    slots.insert(handle.id(), (handle, activity));
                }
                Err(e) => {
                    warn!(error = %e, "cannot accept a metrics connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            },
        }
    }
    connections.shutdown().await;
}

/// Closes the connection idle the longest; false when every one is serving a request.
fn evict_idlest(slots: &mut HashMap<tokio::task::Id, (AbortHandle, Arc<Activity>)>) -> bool {
    let idlest = slots
        .iter()
        .filter_map(|(id, (_, activity))| activity.idle_since().map(|since| (since, *id)))
        .min();
    match idlest {
        Some((_, id)) => {
            if let Some((handle, _)) = slots.remove(&id) {
                handle.abort();
            }
            true
        }
        None => false,
    }
}

async fn serve_connection(
    stream: TcpStream,
    metrics: Metrics,
    health: Health,
    activity: Arc<Activity>,
) {
    let peer = stream.peer_addr().ok();
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &metrics, &health, InFlight::begin(&activity));
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD);
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        debug!(?peer, error = %e, "metrics connection ended");
    }
}

/// Whether the `Accept` header asks for OpenMetrics (with a non-zero quality), which modern
/// Prometheus prefers; anything else gets the 0.0.4 text format every scraper reads.
fn accepts_openmetrics(accept: &str) -> bool {
    accept.split(',').any(|range| {
        let mut params = range.split(';').map(str::trim);
        let media = params.next().unwrap_or_default();
        if !media.eq_ignore_ascii_case("application/openmetrics-text") {
            return false;
        }
        params
            .filter_map(|p| p.strip_prefix("q="))
            .next()
            .is_none_or(|q| q.parse::<f64>().is_ok_and(|q| q > 0.0))
    })
}

fn respond(
    request: &Request<Incoming>,
    metrics: &Metrics,
    health: &Health,
    in_flight: InFlight,
) -> Response<ResponseBody> {
    let reply = |status: StatusCode, content_type: &'static str, body: String| {
        let mut response = Response::new(ResponseBody {
            data: Some(Bytes::from(body)),
            _in_flight: in_flight,
        });
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        response
    };
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            TEXT,
            "only GET and HEAD are served\n".to_owned(),
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/metrics" => {
            let openmetrics = request
                .headers()
                .get_all(header::ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(accepts_openmetrics);
            if openmetrics {
                let body = metrics.encode_openmetrics();
                reply(StatusCode::OK, OPENMETRICS_CONTENT_TYPE, body)
            } else {
                let body = metrics.encode_prometheus();
                reply(StatusCode::OK, PROMETHEUS_CONTENT_TYPE, body)
            }
        }
        "/healthz" => match health.live() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ok\n".to_owned()),
            Err(why) => reply(StatusCode::SERVICE_UNAVAILABLE, TEXT, format!("{why}\n")),
        },
        "/readyz" => match health.ready() {
            Ok(()) => reply(StatusCode::OK, TEXT, "ok\n".to_owned()),
            Err(problems) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                problems.join("\n") + "\n",
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering;
    use std::time::SystemTime;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::sync::oneshot;
    use tokio::time::timeout;

    use super::*;

    #[test]
    fn the_controller_figures_are_exported_with_bounded_labels() {
        let metrics = Metrics::new();
        assert!(!metrics.encode_prometheus().contains("controller_leading"));
        let stats = Arc::new(ControllerStats::default());
        metrics.attach_controller_stats(stats.clone());
        stats.set_leading(true);
        stats.set_pools(
            [(
                ("web".to_string(), "ipv4"),
                PoolFigures {
                    total: 14,
                    in_use: 3,
                },
            )]
            .into_iter()
            .collect(),
        );
        stats.failure("pool_exhausted");
        stats.write("record", "ok");
        stats.write("record", "ok");
        stats.allocated_after(Duration::from_millis(30));
        let text = metrics.encode_prometheus();
        for line in [
            "ferrovip_controller_leading 1",
            "ferrovip_pool_addresses{pool=\"web\",family=\"ipv4\"} 14",
            "ferrovip_pool_addresses_in_use{pool=\"web\",family=\"ipv4\"} 3",
            "ferrovip_allocation_failures_total{reason=\"pool_exhausted\"} 1",
            "ferrovip_allocation_failures_total{reason=\"sharing_conflict\"} 0",
            "ferrovip_controller_writes_total{kind=\"record\",result=\"ok\"} 2",
            "ferrovip_allocation_latency_seconds_bucket{le=\"0.05\"} 1",
            "ferrovip_allocation_latency_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
    }

    fn status(interface: &str, vrid: u8, state: State, priority: u8) -> InstanceStatus {
        InstanceStatus {
            members: Arc::from(vec!["web".to_owned()]),
            interface: interface.to_owned(),
            vrid,
            state,
            priority,
            master: None,
            since: SystemTime::UNIX_EPOCH,
            reason: String::new(),
            reason_code: "",
            fault: None,
            elected: 0,
        }
    }

    fn observed(entries: &[(&str, IpFamily, InstanceStatus)]) -> Observed {
        Observed {
            instances: entries
                .iter()
                .map(|(name, family, status)| (((*name).to_owned(), *family), status.clone()))
                .collect(),
        }
    }

    /// The value of the one line that starts with `series` followed by a space.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().expect("numeric sample"))
            .next()
    }

    const WEB: &str = r#"vip_group="web",interface="eth0",family="ipv4",vrid="51""#;

    #[test]
    fn vrrp_states_transitions_and_vanished_instances() {
        let metrics = Metrics::new();
        let mut web = status("eth0", 51, State::Backup, 100);
        let db = status("eth1", 7, State::Initialize, 90);
        metrics.observe_vrrp(&observed(&[
            ("web", IpFamily::V4, web.clone()),
            ("db", IpFamily::V6, db.clone()),
        ]));
        let text = metrics.encode_prometheus();
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_state{{{WEB}}}")),
            Some(1.0)
        );
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_priority{{{WEB}}}")),
            Some(100.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("ferrovip_vrrp_transitions_total{{{WEB},to=\"backup\"}}")
            ),
            Some(1.0)
        );
        let db_labels = r#"vip_group="db",interface="eth1",family="ipv6",vrid="7""#;
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_state{{{db_labels}}}")),
            Some(0.0)
        );
        // Starting in init is not a transition.
        assert!(!text.contains(r#"vip_group="db",interface="eth1",family="ipv6",vrid="7",to="#));
        assert!(text.contains("# TYPE ferrovip_vrrp_transitions_total counter"));

        // The same report again changes nothing.
        metrics.observe_vrrp(&observed(&[
            ("web", IpFamily::V4, web.clone()),
            ("db", IpFamily::V6, db.clone()),
        ]));
        web.state = State::Master;
        web.priority = 150;
        web.master = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)));
        metrics.observe_vrrp(&observed(&[("web", IpFamily::V4, web.clone())]));
        let text = metrics.encode_prometheus();
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_state{{{WEB}}}")),
            Some(2.0)
        );
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_priority{{{WEB}}}")),
            Some(150.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("ferrovip_vrrp_transitions_total{{{WEB},to=\"backup\"}}")
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("ferrovip_vrrp_transitions_total{{{WEB},to=\"master\"}}")
            ),
            Some(1.0)
        );
        assert!(
            !text.contains(r#"vip_group="db""#),
            "gone instance kept: {text}"
        );

        // A fault is state 3 and a transition of its own.
        web.fault = Some("interface eth0: missing".to_owned());
        web.state = State::Initialize;
        metrics.observe_vrrp(&observed(&[("web", IpFamily::V4, web.clone())]));
        let text = metrics.encode_prometheus();
        assert_eq!(
            value(&text, &format!("ferrovip_vrrp_state{{{WEB}}}")),
            Some(3.0)
        );
        assert_eq!(
            value(
                &text,
                &format!("ferrovip_vrrp_transitions_total{{{WEB},to=\"fault\"}}")
            ),
            Some(1.0)
        );

        // Moving to another VRID is another instance: the old series go.
        web.fault = None;
        web.vrid = 52;
        metrics.observe_vrrp(&observed(&[("web", IpFamily::V4, web)]));
        let text = metrics.encode_prometheus();
        assert!(!text.contains(r#"vrid="51""#), "{text}");
        assert_eq!(
            value(
                &text,
                r#"ferrovip_vrrp_state{vip_group="web",interface="eth0",family="ipv4",vrid="52"}"#
            ),
            Some(0.0)
        );

        metrics.observe_vrrp(&Observed::default());
        let text = metrics.encode_prometheus();
        assert!(!text.contains("ferrovip_vrrp_"), "{text}");
    }

    #[test]
    fn master_changes_count_new_masters_only() {
        let metrics = Metrics::new();
        let mut web = status("eth0", 51, State::Backup, 100);
        let series = format!("ferrovip_vrrp_master_changes_total{{{WEB}}}");
        let report = |web: &InstanceStatus| {
            metrics.observe_vrrp(&observed(&[("web", IpFamily::V4, web.clone())]));
            value(&metrics.encode_prometheus(), &series)
        };
        assert_eq!(report(&web), None);
        web.master = Some("192.0.2.1".parse().unwrap());
        assert_eq!(report(&web), Some(0.0));
        web.master = None;
        assert_eq!(report(&web), Some(0.0));
        web.master = Some("192.0.2.1".parse().unwrap());
        assert_eq!(report(&web), Some(0.0));
        web.master = Some("192.0.2.2".parse().unwrap());
        assert_eq!(report(&web), Some(1.0));
        web.master = Some("192.0.2.1".parse().unwrap());
        assert_eq!(report(&web), Some(2.0));
    }

    #[test]
    fn dataplane_agent_and_build_series() {
        let metrics = Metrics::new();
        let text = metrics.encode_prometheus();
        assert_eq!(
            value(
                &text,
                &format!(
                    "ferrovip_build_info{{version=\"{}\"}}",
                    env!("CARGO_PKG_VERSION")
                )
            ),
            Some(1.0)
        );
        assert_eq!(value(&text, "ferrovip_ipvs_services"), Some(0.0));

        metrics.dataplane_available("ipvs", false);
        metrics.dataplane_available("nftables", true);
        metrics.dataplane_applied("nftables", "ok", Duration::from_micros(80), 0);
        metrics.dataplane_applied("nftables", "ok", Duration::from_millis(3), 1);
        metrics.dataplane_applied("nftables", "error", Duration::from_secs(20), 0);
        metrics.dataplane_error("nftables", "nft_failed");
        metrics.ipvs_table(10_000, 100_000);
        metrics.virtualips(12, 1);
        let text = metrics.encode_prometheus();
        for (series, expected) in [
            (r#"ferrovip_dataplane_available{dataplane="ipvs"}"#, 0.0),
            (r#"ferrovip_dataplane_available{dataplane="nftables"}"#, 1.0),
            (
                r#"ferrovip_dataplane_apply_total{dataplane="nftables",result="ok"}"#,
                2.0,
            ),
            (
                r#"ferrovip_dataplane_apply_total{dataplane="nftables",result="error"}"#,
                1.0,
            ),
            (
                r#"ferrovip_dataplane_writes_total{dataplane="nftables"}"#,
                1.0,
            ),
            (
                r#"ferrovip_dataplane_errors_total{dataplane="nftables",reason="nft_failed"}"#,
                1.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_bucket{dataplane="nftables",le="0.0001"}"#,
                1.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_bucket{dataplane="nftables",le="0.0025"}"#,
                1.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_bucket{dataplane="nftables",le="0.005"}"#,
                2.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_bucket{dataplane="nftables",le="10"}"#,
                2.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_bucket{dataplane="nftables",le="+Inf"}"#,
                3.0,
            ),
            (
                r#"ferrovip_dataplane_apply_duration_seconds_count{dataplane="nftables"}"#,
                3.0,
            ),
            ("ferrovip_ipvs_services", 10_000.0),
            ("ferrovip_ipvs_destinations", 100_000.0),
            (r#"ferrovip_virtualips{state="active"}"#, 12.0),
            (r#"ferrovip_virtualips{state="refused"}"#, 1.0),
        ] {
            assert_eq!(value(&text, series), Some(expected), "{series} in\n{text}");
        }
        assert!(text.contains("# TYPE ferrovip_dataplane_apply_duration_seconds histogram"));
        let sum = value(
            &text,
            r#"ferrovip_dataplane_apply_duration_seconds_sum{dataplane="nftables"}"#,
        )
        .unwrap();
        assert!((sum - 20.00308).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn vrrp_packet_counters_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        assert!(!metrics.encode_prometheus().contains("vrrp_packets"));
        let stats = Arc::new(Stats::default());
        metrics.attach_vrrp_stats(stats.clone());
        stats.received.store(7, Ordering::Relaxed);
        stats.sent.store(3, Ordering::Relaxed);
        let text = metrics.encode_prometheus();
        assert_eq!(
            value(&text, "ferrovip_vrrp_packets_received_total"),
            Some(7.0)
        );
        assert_eq!(value(&text, "ferrovip_vrrp_packets_sent_total"), Some(3.0));
        assert_eq!(value(&text, "ferrovip_vrrp_send_errors_total"), Some(0.0));
        assert!(value(&text, "ferrovip_ndp_answers_total").is_some());
        assert!(value(&text, "ferrovip_watch_restarts_total").is_some());
        assert!(value(&text, "ferrovip_bulk_ndp_fallbacks_total").is_some());
        assert!(value(&text, "ferrovip_ndp_groups").is_some());
        assert_eq!(
            value(
                &text,
                r#"ferrovip_vrrp_packets_dropped_total{reason="ttl"}"#
            ),
            Some(0.0)
        );
        assert!(text.contains("# TYPE ferrovip_vrrp_packets_dropped_total counter"));
        stats.received.store(9, Ordering::Relaxed);
        let open = metrics.encode_openmetrics();
        assert_eq!(
            value(&open, "ferrovip_vrrp_packets_received_total"),
            Some(9.0)
        );
        assert!(open.ends_with("# EOF\n"));
    }

    #[test]
    fn vrrp_takeovers_are_a_histogram_by_interface_family_and_cause() {
        let metrics = Metrics::new();
        let stats = Arc::new(Stats::default());
        metrics.attach_vrrp_stats(stats.clone());
        // Declared before any takeover, without series.
        let text = metrics.encode_prometheus();
        assert!(text.contains("# TYPE ferrovip_vrrp_takeover_seconds histogram"));
        assert!(
            !text.contains("ferrovip_vrrp_takeover_seconds_count"),
            "{text}"
        );
        let eth0: Arc<str> = Arc::from("eth0");
        stats.observe_takeover(
            (eth0.clone(), IpFamily::V4, "master_down"),
            Duration::from_millis(3_620),
        );
        stats.observe_takeover(
            (eth0.clone(), IpFamily::V4, "master_down"),
            Duration::from_millis(380),
        );
        stats.observe_takeover(
            (eth0, IpFamily::V6, "priority_zero"),
            Duration::from_millis(8),
        );
        let text = metrics.encode_prometheus();
        let down = r#"interface="eth0",family="ipv4",cause="master_down""#;
        let zero = r#"interface="eth0",family="ipv6",cause="priority_zero""#;
        for (series, expected) in [
            (
                format!("ferrovip_vrrp_takeover_seconds_count{{{down}}}"),
                2.0,
            ),
            (
                format!("ferrovip_vrrp_takeover_seconds_count{{{zero}}}"),
                1.0,
            ),
            (
                format!("ferrovip_vrrp_takeover_seconds_bucket{{{down},le=\"0.01\"}}"),
                0.0,
            ),
            (
                format!("ferrovip_vrrp_takeover_seconds_bucket{{{down},le=\"0.5\"}}"),
                1.0,
            ),
            (
                format!("ferrovip_vrrp_takeover_seconds_bucket{{{down},le=\"5\"}}"),
                2.0,
            ),
            (
                format!("ferrovip_vrrp_takeover_seconds_bucket{{{zero},le=\"0.01\"}}"),
                1.0,
            ),
        ] {
            assert_eq!(value(&text, &series), Some(expected), "{series} in\n{text}");
        }
        let sum = value(
            &text,
            &format!("ferrovip_vrrp_takeover_seconds_sum{{{down}}}"),
        )
        .unwrap();
        assert!((sum - 4.0).abs() < 1e-9, "{sum}");
    }

    #[test]
    fn openmetrics_negotiation() {
        // What Prometheus 3 sends by default.
        assert!(accepts_openmetrics(
            "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,\
             application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
        ));
        assert!(accepts_openmetrics("Application/OpenMetrics-Text"));
        assert!(!accepts_openmetrics("application/openmetrics-text;q=0"));
        assert!(!accepts_openmetrics("text/plain;version=0.0.4"));
        assert!(!accepts_openmetrics("*/*"));
    }

    /// A response as a client reads it: status code, headers (lower-case names), body.
    struct Reply {
        status: u16,
        headers: HashMap<String, String>,
        body: String,
    }

    async fn read_reply<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R, head: bool) -> Reply {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let mut parts = line.split(' ');
        let version = parts.next();
        assert!(
            matches!(version, Some("HTTP/1.1" | "HTTP/1.0")),
            "status line {line:?}"
        );
        let status = parts.next().unwrap().parse().unwrap();
        let mut headers = HashMap::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await.unwrap();
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').unwrap();
            headers.insert(name.to_ascii_lowercase(), value.trim().to_owned());
        }
        let length: usize = headers["content-length"].parse().unwrap();
        let mut body = vec![0; if head { 0 } else { length }];
        reader.read_exact(&mut body).await.unwrap();
        Reply {
            status,
            headers,
            body: String::from_utf8(body).unwrap(),
        }
    }

    async fn at_eof<R: tokio::io::AsyncRead + Unpin>(reader: &mut R) -> bool {
        let mut byte = [0u8; 1];
        matches!(
            timeout(Duration::from_secs(5), reader.read(&mut byte)).await,
            Ok(Ok(0))
        )
    }

    /// A health whose engine beats and has applied a plan with every socket open.
    fn healthy() -> (Health, Arc<Heartbeat>, watch::Sender<EngineReadiness>) {
        let heartbeat = Arc::new(Heartbeat::default());
        heartbeat.beat();
        let engine = watch::Sender::new(EngineReadiness {
            applied: true,
            missing_sockets: Vec::new(),
        });
        let health = Health::new(heartbeat.clone(), engine.subscribe());
        health.plan_published();
        (health, heartbeat, engine)
    }

    struct Server {
        addr: SocketAddr,
        stop: oneshot::Sender<()>,
        task: tokio::task::JoinHandle<()>,
    }

    async fn start_server(metrics: Metrics, health: Health) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve_listener(listener, metrics, health, async move {
            let _ = stopped.await;
        }));
        Server { addr, stop, task }
    }

    /// One request on a new connection, `Connection: close`.
    async fn get(addr: SocketAddr, path: &str) -> Reply {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read_half, mut write_half) = stream.into_split();
        write_half
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
        read_reply(&mut BufReader::new(read_half), false).await
    }

    #[tokio::test]
    async fn http_endpoint_serves_metrics_health_and_errors() {
        let metrics = Metrics::new();
        metrics.virtualips(2, 0);
        let (health, _heartbeat, _engine) = healthy();
        let server = start_server(metrics.clone(), health).await;
        let addr = server.addr;

        // Keep-alive: several requests, pipelined, on one connection.
        let stream = TcpStream::connect(addr).await.unwrap();
        let (read_half, mut write_half) = stream.into_split();
        let mut reader = BufReader::new(read_half);
        write_half
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let reply = read_reply(&mut reader, false).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.headers["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert!(
            reply
                .body
                .contains("ferrovip_virtualips{state=\"active\"} 2\n"),
            "{}",
            reply.body
        );
        assert!(!reply.body.contains("# EOF"));

        metrics.virtualips(3, 0);
        write_half
            .write_all(
                b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0\r\n\r\n\
                  GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n\
                  HEAD /readyz HTTP/1.1\r\nHost: x\r\n\r\n\
                  GET /nope?x=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody\
                  POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await
            .unwrap();
        let open = read_reply(&mut reader, false).await;
        assert_eq!(open.status, 200);
        assert!(open.headers["content-type"].starts_with("application/openmetrics-text"));
        assert!(
            open.body
                .contains("ferrovip_virtualips{state=\"active\"} 3\n")
        );
        assert!(open.body.ends_with("# EOF\n"));
        let health = read_reply(&mut reader, false).await;
        assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
        let ready = read_reply(&mut reader, true).await;
        assert_eq!(
            (ready.status, ready.headers["content-length"].as_str()),
            (200, "3")
        );
        let missing = read_reply(&mut reader, false).await;
        assert_eq!(missing.status, 404);
        let post = read_reply(&mut reader, false).await;
        assert_eq!(post.status, 405);
        assert_eq!(post.headers["allow"], "GET, HEAD");
        assert!(
            at_eof(&mut reader).await,
            "connection left open after close"
        );

        // Garbage: 400, then the server closes.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"hello there\r\n\r\n").await.unwrap();
        let mut reader = BufReader::new(garbage);
        assert_eq!(read_reply_lenient(&mut reader).await, Some(400));
        assert!(at_eof(&mut reader).await);

        // An oversized head: 431, closed.
        let mut huge = TcpStream::connect(addr).await.unwrap();
        let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: ".to_vec();
        request.extend(std::iter::repeat_n(b'a', 2 * MAX_HEAD));
        let _ = huge.write_all(&request).await;
        let mut reader = BufReader::new(huge);
        assert_eq!(read_reply_lenient(&mut reader).await, Some(431));
        assert!(at_eof(&mut reader).await);

        // HTTP/1.0 without keep-alive: answered, then closed.
        let mut old = TcpStream::connect(addr).await.unwrap();
        old.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut reader = BufReader::new(old);
        assert_eq!(read_reply(&mut reader, false).await.status, 200);
        assert!(at_eof(&mut reader).await);

        // A client idling on a kept-alive connection does not delay shutdown.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reader = BufReader::new(idle);
        assert_eq!(read_reply(&mut reader, false).await.status, 200);
        server.stop.send(()).unwrap();
        timeout(Duration::from_secs(5), server.task)
            .await
            .expect("server stops on shutdown")
            .unwrap();
        assert!(at_eof(&mut reader).await);
        assert!(TcpStream::connect(addr).await.is_err());
    }

    /// The status code of whatever the server answers before closing, if anything.
    async fn read_reply_lenient<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Option<u16> {
        let mut line = String::new();
        timeout(Duration::from_secs(5), reader.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        let code = line.split(' ').nth(1)?.parse().ok()?;
        // Skip the rest of the response.
        let mut rest = Vec::new();
        let _ = timeout(Duration::from_secs(5), reader.read_to_end(&mut rest)).await;
        Some(code)
    }

    #[tokio::test]
    async fn idle_connections_cannot_lock_out_a_probe() {
        let (health, _heartbeat, _engine) = healthy();
        let server = start_server(Metrics::new(), health).await;
        // Four times the slots: silent connections, connections that sent half a head, and
        // kept-alive ones that finished a request and went quiet.
        let mut held = Vec::new();
        for i in 0..4 * MAX_CONNECTIONS {
            let mut stream = TcpStream::connect(server.addr).await.unwrap();
            match i % 3 {
                0 => {}
                1 => stream
                    .write_all(b"GET /metrics HTTP/1.1\r\nHo")
                    .await
                    .unwrap(),
                _ => {
                    stream
                        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        .await
                        .unwrap();
                    let mut buf = [0u8; 256];
                    let _ = stream.read(&mut buf).await.unwrap();
                }
            }
            held.push(stream);
        }
        // Probes, each on a new connection as the kubelet makes them, answer at once.
        for _ in 0..10 {
            let started = std::time::Instant::now();
            let reply = timeout(Duration::from_secs(2), get(server.addr, "/healthz"))
                .await
                .expect("a probe is not locked out by idle connections");
            assert_eq!((reply.status, reply.body.as_str()), (200, "ok\n"));
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "probe took {:?}",
                started.elapsed()
            );
        }
        // The server holds at most its slots: the oldest idle connections were closed.
        let mut closed = 0;
        for stream in &mut held {
            let mut buf = [0u8; 64];
            if let Ok(Ok(0)) = timeout(Duration::from_millis(20), stream.read(&mut buf)).await {
                closed += 1;
            }
        }
        assert!(
            closed >= held.len() - MAX_CONNECTIONS,
            "{closed} of {} idle connections closed",
            held.len()
        );
        server.stop.send(()).unwrap();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn healthz_fails_when_the_engine_loop_stops_turning() {
        let (health, heartbeat, _engine) = healthy();
        let server = start_server(Metrics::new(), health).await;
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        // The engine beats on every turn; here it turns a while, then stops.
        let turning = std::time::Instant::now();
        while turning.elapsed() < 2 * ENGINE_STALL_LIMIT {
            heartbeat.beat();
            assert_eq!(get(server.addr, "/healthz").await.status, 200);
            tokio::time::sleep(HEARTBEAT).await;
        }
        tokio::time::sleep(ENGINE_STALL_LIMIT + HEARTBEAT).await;
        let stalled = get(server.addr, "/healthz").await;
        assert_eq!(stalled.status, 503);
        assert!(
            stalled
                .body
                .starts_with("the VRRP engine loop has not turned for"),
            "{}",
            stalled.body
        );
        let ready = get(server.addr, "/readyz").await;
        assert_eq!(ready.status, 503);
        assert!(ready.body.contains("has not turned"), "{}", ready.body);
        // Turning again: healthy again.
        heartbeat.beat();
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        server.stop.send(()).unwrap();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn readyz_waits_for_a_complete_plan_applied_with_its_sockets_open() {
        let heartbeat = Arc::new(Heartbeat::default());
        heartbeat.beat();
        let engine = watch::Sender::new(EngineReadiness::default());
        let health = Health::new(heartbeat.clone(), engine.subscribe());
        let server = start_server(Metrics::new(), health.clone()).await;
        let before = get(server.addr, "/readyz").await;
        assert_eq!(before.status, 503);
        assert_eq!(
            before.body,
            "no plan from a complete source yet\nthe VRRP engine has not applied a plan yet\n"
        );
        // Alive all along: readiness is not liveness.
        assert_eq!(get(server.addr, "/healthz").await.status, 200);
        health.plan_published();
        engine.send_replace(EngineReadiness {
            applied: true,
            missing_sockets: vec!["eth1 ipv4: interface eth1 not found".into()],
        });
        let socketless = get(server.addr, "/readyz").await;
        assert_eq!(
            (socketless.status, socketless.body.as_str()),
            (
                503,
                "no VRRP socket on eth1 ipv4: interface eth1 not found\n"
            )
        );
        engine.send_replace(EngineReadiness {
            applied: true,
            missing_sockets: Vec::new(),
        });
        let ready = get(server.addr, "/readyz").await;
        assert_eq!((ready.status, ready.body.as_str()), (200, "ok\n"));
        server.stop.send(()).unwrap();
        server.task.await.unwrap();
    }

    #[tokio::test]
    async fn serve_reports_bind_errors() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let (health, _heartbeat, _engine) = healthy();
        let error = serve(addr, Metrics::new(), health, std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "bind");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
