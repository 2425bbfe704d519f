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
//! | `ferrovip_dataplane_available` | gauge 0/1 | `dataplane` |
//! | `ferrovip_dataplane_apply_total` | counter | `dataplane, result` |
//! | `ferrovip_dataplane_apply_duration_seconds` | histogram, 100 µs … 10 s | `dataplane` |
//! | `ferrovip_dataplane_writes_total` | counter | `dataplane` |
//! | `ferrovip_dataplane_errors_total` | counter | `dataplane, reason` |
//! | `ferrovip_ipvs_services`, `ferrovip_ipvs_destinations` | gauge | — |
//! | `ferrovip_virtualips` | gauge | `state` (`active`, `refused`) |
//! | `ferrovip_build_info` | gauge, always 1 | `version` |

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout, timeout_at};
use tracing::{debug, info, warn};

use crate::dataplane::ApplyReport;
use crate::dataplane::worker::ApplyObserver;
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
    dataplane_available: Family<DataplaneLabels, Gauge>,
    dataplane_apply: Family<ApplyLabels, Counter>,
    dataplane_apply_duration: HistogramFamily<DataplaneLabels>,
    dataplane_writes: Family<DataplaneLabels, Counter>,
    dataplane_errors: Family<ErrorLabels, Counter>,
    ipvs_services: Gauge,
    ipvs_destinations: Gauge,
    virtualips: Family<VirtualIpLabels, Gauge>,
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
                dataplane_available,
                dataplane_apply,
                dataplane_apply_duration,
                dataplane_writes,
                dataplane_errors,
                ipvs_services,
                ipvs_destinations,
                virtualips,
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

    /// Whether a dataplane (`"ipvs"`, `"nftables"`) works on this node.
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

/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 64;
/// Largest request head (request line and headers) accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Largest request body read and discarded (a GET has none; this keeps the stream in sync).
const MAX_BODY: usize = 64 * 1024;
/// An idle keep-alive connection is closed after this long. Longer than common scrape
/// intervals (15-60 s), so a scraper reuses its connection.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// A request must be complete this long after its first byte; so must a response's write.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing connection reads what the client still sends, so the close does not
/// turn into a reset that destroys the response in flight.
const LINGER: Duration = Duration::from_secs(1);
/// Pause after a failed accept (usually out of file descriptors) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `addr` until `shutdown` completes.
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) -> Result<(), MetricsError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    info!(%addr, "serving metrics");
    serve_listener(listener, metrics, shutdown).await;
    Ok(())
}

/// [`serve`] on a listener the caller bound (tests bind port 0 and read the address).
/// Open connections are dropped when `shutdown` completes.
pub async fn serve_listener(
    listener: TcpListener,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => {
                match accepted {
                    Ok((stream, peer)) => {
                        let metrics = metrics.clone();
                        connections.spawn(async move {
                            if let Err(e) = serve_connection(stream, &metrics).await {
                                debug!(%peer, error = %e, "metrics connection ended");
                            }
                        });
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot accept a metrics connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                }
            }
        }
    }
    connections.shutdown().await;
}

/// A parsed request, as far as this endpoint cares.
#[derive(Debug)]
struct Request {
    head: bool,
    path: String,
    keep_alive: bool,
    openmetrics: bool,
    body_length: usize,
}

/// Why a request is answered with an error status instead of its resource.
#[derive(Debug, PartialEq, Eq)]
enum Refusal {
    BadRequest(&'static str),
    MethodNotAllowed,
    HeadTooLarge,
    BodyTooLarge,
}

/// Reads and answers requests until the client or an error closes the connection.
async fn serve_connection(mut stream: TcpStream, metrics: &Metrics) -> io::Result<()> {
    let mut buffer: Vec<u8> = Vec::with_capacity(1024);
    loop {
        let head = match read_head(&mut stream, &mut buffer).await? {
            HeadRead::Complete(head) => head,
            HeadRead::Closed => return Ok(()),
            HeadRead::TooLarge => {
                let response = error_response(&Refusal::HeadTooLarge, false);
                write_response(&mut stream, &response).await?;
                return linger_close(stream).await;
            }
        };
        let request = match parse_request(&head) {
            Ok(request) => request,
            Err(refusal) => {
                let response = error_response(&refusal, false);
                write_response(&mut stream, &response).await?;
                return linger_close(stream).await;
            }
        };
        if request.body_length > MAX_BODY {
            let response = error_response(&Refusal::BodyTooLarge, false);
            write_response(&mut stream, &response).await?;
            return linger_close(stream).await;
        }
        discard_body(&mut stream, &mut buffer, request.body_length).await?;
        let response = respond(&request, metrics);
        write_response(&mut stream, &response).await?;
        if !request.keep_alive {
            return linger_close(stream).await;
        }
    }
}

enum HeadRead {
    Complete(Vec<u8>),
    Closed,
    TooLarge,
}

/// Takes one request head off the front of `buffer`, reading more as needed. Bytes after it
/// (a body, or pipelined requests) stay in `buffer`.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> io::Result<HeadRead> {
    let mut deadline = (!buffer.is_empty()).then(|| Instant::now() + IO_TIMEOUT);
    let mut scanned = 0;
    loop {
        // RFC 9112 §2.2: empty lines before a request line are ignored (some clients send a
        // CRLF after a body).
        let blank = buffer
            .iter()
            .take_while(|b| matches!(b, b'\r' | b'\n'))
            .count();
        if blank > 0 {
            buffer.drain(..blank);
            scanned = 0;
        }
        if let Some(end) = head_end(buffer, scanned) {
            let rest = buffer.split_off(end);
            let head = std::mem::replace(buffer, rest);
            return Ok(HeadRead::Complete(head));
        }
        if buffer.len() > MAX_HEAD {
            return Ok(HeadRead::TooLarge);
        }
        // The terminator may straddle two reads.
        scanned = buffer.len().saturating_sub(3);
        let mut chunk = [0u8; 4096];
        let read = match deadline {
            Some(deadline) => timeout_at(deadline, stream.read(&mut chunk)).await,
            None => timeout(IDLE_TIMEOUT, stream.read(&mut chunk)).await,
        };
        match read {
            // Idle or stalled: close without an answer (a 408 would race a new request).
            Err(_elapsed) => return Ok(HeadRead::Closed),
            Ok(Ok(0)) => return Ok(HeadRead::Closed),
            Ok(Ok(n)) => {
                buffer.extend_from_slice(&chunk[..n]);
                deadline.get_or_insert_with(|| Instant::now() + IO_TIMEOUT);
            }
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// The index just past the blank line that ends a head (CRLF CRLF, or bare LF LF which
/// RFC 9112 §2.2 lets a server accept).
fn head_end(buffer: &[u8], from: usize) -> Option<usize> {
    let from = from.min(buffer.len());
    for i in from..buffer.len() {
        if buffer[i] != b'\n' {
            continue;
        }
        if buffer[..i].ends_with(b"\n") {
            return Some(i + 1);
        }
        if buffer[..i].ends_with(b"\n\r") {
            return Some(i + 1);
        }
    }
    None
}

async fn discard_body(
    stream: &mut TcpStream,
    buffer: &mut Vec<u8>,
    length: usize,
) -> io::Result<()> {
    let buffered = length.min(buffer.len());
    buffer.drain(..buffered);
    let mut remaining = length - buffered;
    let deadline = Instant::now() + IO_TIMEOUT;
    let mut chunk = [0u8; 4096];
    while remaining > 0 {
        let want = remaining.min(chunk.len());
        let n = timeout_at(deadline, stream.read(&mut chunk[..want]))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "request body stalled"))??;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        remaining -= n;
    }
    Ok(())
}

fn parse_request(head: &[u8]) -> Result<Request, Refusal> {
    let head =
        std::str::from_utf8(head).map_err(|_| Refusal::BadRequest("request is not UTF-8"))?;
    let mut lines = head
        .split('\n')
        .map(|line| line.strip_suffix('\r').unwrap_or(line));
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::BadRequest("malformed request line"));
    };
    let http11 = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(Refusal::BadRequest("unsupported HTTP version")),
    };
    let mut connection_close = false;
    let mut connection_keep_alive = false;
    let mut host = false;
    let mut openmetrics = false;
    let mut body_length: Option<usize> = None;
    for line in lines.take_while(|line| !line.is_empty()) {
        if line.starts_with([' ', '\t']) {
            return Err(Refusal::BadRequest("folded header"));
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(Refusal::BadRequest("header without a colon"));
        };
        if name.is_empty() || name.ends_with([' ', '\t']) {
            return Err(Refusal::BadRequest("malformed header name"));
        }
        let value = value.trim_matches([' ', '\t']);
        if name.eq_ignore_ascii_case("host") {
            host = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                connection_close |= token.eq_ignore_ascii_case("close");
                connection_keep_alive |= token.eq_ignore_ascii_case("keep-alive");
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            let length: usize = value
                .parse()
                .map_err(|_| Refusal::BadRequest("invalid Content-Length"))?;
            if body_length.is_some_and(|previous| previous != length) {
                return Err(Refusal::BadRequest("conflicting Content-Length"));
            }
            body_length = Some(length);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            // Bodies have no use here; refusing chunked ones keeps the parser small.
            return Err(Refusal::BadRequest("Transfer-Encoding is not supported"));
        } else if name.eq_ignore_ascii_case("accept") {
            openmetrics = accepts_openmetrics(value);
        }
    }
    if http11 && !host {
        return Err(Refusal::BadRequest("missing Host header"));
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ if !method.is_empty() && method.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(Refusal::MethodNotAllowed);
        }
        _ => return Err(Refusal::BadRequest("malformed method")),
    };
    let path = origin_path(target).ok_or(Refusal::BadRequest("malformed request target"))?;
    Ok(Request {
        head: head_only,
        path: path.to_owned(),
        keep_alive: if http11 {
            !connection_close
        } else {
            connection_keep_alive && !connection_close
        },
        openmetrics,
        body_length: body_length.unwrap_or(0),
    })
}

/// The path of an origin-form (`/metrics?x`) or absolute-form (`http://host/metrics`) target.
fn origin_path(target: &str) -> Option<&str> {
    let origin = if target.starts_with('/') {
        target
    } else {
        let lower = target.get(..8).map(str::to_ascii_lowercase)?;
        let rest = if lower.starts_with("http://") {
            &target[7..]
        } else if lower.starts_with("https://") {
            &target[8..]
        } else {
            return None;
        };
        rest.find('/').map_or("/", |slash| &rest[slash..])
    };
    let path = origin.split(['?', '#']).next().unwrap_or(origin);
    Some(path)
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

struct Response {
    status: &'static str,
    content_type: &'static str,
    body: String,
    head_only: bool,
    keep_alive: bool,
    allow: bool,
}

fn respond(request: &Request, metrics: &Metrics) -> Response {
    let (status, content_type, body) = match request.path.as_str() {
        "/metrics" if request.openmetrics => (
            "200 OK",
            OPENMETRICS_CONTENT_TYPE,
            metrics.encode_openmetrics(),
        ),
        "/metrics" => (
            "200 OK",
            PROMETHEUS_CONTENT_TYPE,
            metrics.encode_prometheus(),
        ),
        "/healthz" | "/readyz" => ("200 OK", "text/plain; charset=utf-8", "ok\n".to_owned()),
        _ => (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found\n".to_owned(),
        ),
    };
    Response {
        status,
        content_type,
        body,
        head_only: request.head,
        keep_alive: request.keep_alive,
        allow: false,
    }
}

fn error_response(refusal: &Refusal, keep_alive: bool) -> Response {
    let (status, body) = match refusal {
        Refusal::BadRequest(why) => ("400 Bad Request", format!("bad request: {why}\n")),
        Refusal::MethodNotAllowed => (
            "405 Method Not Allowed",
            "only GET and HEAD are served\n".to_owned(),
        ),
        Refusal::HeadTooLarge => (
            "431 Request Header Fields Too Large",
            "request head too large\n".to_owned(),
        ),
        Refusal::BodyTooLarge => (
            "413 Content Too Large",
            "request body too large\n".to_owned(),
        ),
    };
    Response {
        status,
        content_type: "text/plain; charset=utf-8",
        body,
        head_only: false,
        keep_alive,
        allow: *refusal == Refusal::MethodNotAllowed,
    }
}

async fn write_response(stream: &mut TcpStream, response: &Response) -> io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: {}\r\n",
        response.status,
        response.content_type,
        response.body.len(),
        if response.keep_alive {
            "keep-alive"
        } else {
            "close"
        },
    );
    if response.allow {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    if !response.head_only {
        bytes.extend_from_slice(response.body.as_bytes());
    }
    timeout(IO_TIMEOUT, stream.write_all(&bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "response write stalled"))?
}

/// Half-closes, then reads until the client closes (or briefly), so unread request bytes do
/// not make the kernel reset the connection before the client has read the response.
async fn linger_close(mut stream: TcpStream) -> io::Result<()> {
    stream.shutdown().await?;
    let deadline = Instant::now() + LINGER;
    let mut sink = [0u8; 4096];
    let mut drained = 0;
    while drained < MAX_BODY {
        match timeout_at(deadline, stream.read(&mut sink)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => drained += n,
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::atomic::Ordering;
    use std::time::SystemTime;

    use tokio::io::{AsyncBufReadExt, BufReader};
    use tokio::sync::oneshot;

    use super::*;

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
    fn request_parsing() {
        let ok = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!(ok.path, "/metrics");
        assert!(ok.keep_alive && !ok.head && !ok.openmetrics);
        let ten = parse_request(b"HEAD http://a:9/readyz HTTP/1.0\nAccept: */*\n\n").unwrap();
        assert_eq!(ten.path, "/readyz");
        assert!(ten.head && !ten.keep_alive);
        let ten_ka = parse_request(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap();
        assert!(ten_ka.keep_alive);
        let close = parse_request(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        assert!(!close.unwrap().keep_alive);
        for (bad, why) in [
            (&b"GET /metrics\r\n\r\n"[..], "malformed request line"),
            (
                b"GET  /metrics HTTP/1.1\r\nHost: a\r\n\r\n",
                "malformed request line",
            ),
            (b"GET /metrics HTTP/2.0\r\n\r\n", "unsupported HTTP version"),
            (b"GET /metrics HTTP/1.1\r\n\r\n", "missing Host header"),
            (
                b"GET /metrics HTTP/1.1\r\nHost a\r\n\r\n",
                "header without a colon",
            ),
            (
                b"GET /m HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
                "folded header",
            ),
            (
                b"GET /m HTTP/1.1\r\nHost : a\r\n\r\n",
                "malformed header name",
            ),
            (
                b"GET /m HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting Content-Length",
            ),
            (
                b"GET /m HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
                "Transfer-Encoding is not supported",
            ),
            (
                b"GET metrics HTTP/1.1\r\nHost: a\r\n\r\n",
                "malformed request target",
            ),
            (
                b"g\xffT / HTTP/1.1\r\nHost: a\r\n\r\n",
                "request is not UTF-8",
            ),
        ] {
            assert_eq!(
                parse_request(bad).unwrap_err(),
                Refusal::BadRequest(why),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\nHost: a\r\n\r\n").unwrap_err(),
            Refusal::MethodNotAllowed
        );
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

    #[test]
    fn head_terminator_across_reads() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nrest", 0), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.0\n\nrest", 0), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: a\r\n", 0), None);
        let buffer = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(head_end(buffer, buffer.len() - 3 - 2), Some(buffer.len()));
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
        assert_eq!(parts.next(), Some("HTTP/1.1"), "status line {line:?}");
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

    #[tokio::test]
    async fn http_endpoint_serves_metrics_health_and_errors() {
        let metrics = Metrics::new();
        metrics.virtualips(2, 0);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve_listener(listener, metrics.clone(), async move {
            let _ = stopped.await;
        }));

        // Keep-alive: several requests, one of them pipelined, on one connection.
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
        assert_eq!(reply.headers["connection"], "keep-alive");
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
                  GET /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody\r\n\
                  POST /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
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
        assert_eq!(post.headers["connection"], "close");
        assert!(at_eof(&mut reader).await, "connection left open after 405");

        // Garbage: 400, then the server closes.
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"hello there\r\n\r\n").await.unwrap();
        let mut reader = BufReader::new(garbage);
        let bad = read_reply(&mut reader, false).await;
        assert_eq!(bad.status, 400);
        assert!(bad.body.contains("malformed request line"));
        assert!(at_eof(&mut reader).await);

        // An oversized head: 431, closed.
        let mut huge = TcpStream::connect(addr).await.unwrap();
        let mut request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n".to_vec();
        request.extend(std::iter::repeat_n(b'a', 2 * MAX_HEAD));
        let _ = huge.write_all(&request).await;
        let mut reader = BufReader::new(huge);
        assert_eq!(read_reply(&mut reader, false).await.status, 431);
        assert!(at_eof(&mut reader).await);

        // HTTP/1.0 without keep-alive: answered, then closed.
        let mut old = TcpStream::connect(addr).await.unwrap();
        old.write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
            .await
            .unwrap();
        let mut reader = BufReader::new(old);
        let reply = read_reply(&mut reader, false).await;
        assert_eq!(
            (reply.status, reply.headers["connection"].as_str()),
            (200, "close")
        );
        assert!(at_eof(&mut reader).await);

        // A client idling on a kept-alive connection does not delay shutdown.
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut reader = BufReader::new(idle);
        assert_eq!(read_reply(&mut reader, false).await.status, 200);
        stop.send(()).unwrap();
        timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops on shutdown")
            .unwrap();
        assert!(at_eof(&mut reader).await);
        assert!(TcpStream::connect(addr).await.is_err());
    }

    #[tokio::test]
    async fn serve_reports_bind_errors() {
        let taken = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = taken.local_addr().unwrap();
        let error = serve(addr, Metrics::new(), std::future::pending())
            .await
            .unwrap_err();
        assert_eq!(error.metric_label(), "bind");
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
    }
}
