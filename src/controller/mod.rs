//! The Service controller's I/O: one leader per cluster (a Lease, [`crate::k8s::lease`])
//! watches Services, LoadBalancerPools, VirtualIPs and Namespaces, has [`crate::ipam`] decide
//! the whole state, and writes only the differences: the allocation record and
//! `status.loadBalancer.ingress` of Services, pool status, Events.
//!
//! Safety (issue 10: no duplicate, no renumbering, no fight):
//! - Fencing. A new leader waits one `--lease-renew` after acquiring (a predecessor whose
//!   Lease was taken from it notices at its next renewal and stops), then lists everything
//!   afresh before its first write (in the agent, whose stores it shares: reads the Services'
//!   versions afresh and waits until the stores hold them, [`watch::Watches::caught_up`]). The leader renews (compare-and-swap) before each batch of
//!   writes and checks, before every single write, that its term is current and its hold
//!   (counted from when its last renewal was sent) has not run out.
//! - Optimistic concurrency. Every Service write carries the resourceVersion it was decided
//!   from; a 409 reads the Service again and decides again.
//! - Writes in flight count as done for the decisions made meanwhile (the Service as it will
//!   be is what the allocator sees), and a write's answer counts until the watch catches up:
//!   the allocator never sees a Service without the address it is being given, so it never
//!   gives that address to another.
//! - Only Services in the allocator's outcome are ever written (others are not ours).

pub mod stats;
pub mod summary;
pub mod watch;
pub mod write;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, Service, ServiceStatus};
use k8s_openapi::jiff::Timestamp;
use kube::{Api, Client};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

pub use stats::{ControllerStats, PoolFigures};

use crate::crd::service_lb::{ANNOTATION_ALLOCATED, ANNOTATION_MASTER, format_allocated};
use crate::crd::{LoadBalancerPool, LoadBalancerPoolStatus, ServiceRef};
use crate::ipam::{self, Inputs, ServiceDecision};
use crate::k8s::lease::{Elector, Leadership, LeaseHandle, LeaseSettings};
use crate::source::cluster::SharedStores;
use crate::source::off_runtime;
use crate::source::reflect::WriteEchoes;
use write::ServiceEvent;

/// Name of the Lease in the agent's namespace.
pub const LEASE_NAME: &str = "ferrovip-controller";
/// How long after a change more changes are awaited before deciding (a burst decides once).
const DEBOUNCE: Duration = Duration::from_millis(20);
/// Service writes in flight at once.
const WRITES_IN_FLIGHT: usize = 48;
/// A pass comes at the earliest this many times what the last one took after it (at most
/// PASS_PACING_MAX later).
const PASS_PACING: u32 = 2;
const PASS_PACING_MAX: Duration = Duration::from_secs(1);
/// Service write tasks at most at once (beyond WRITES_IN_FLIGHT they wait their turn): each
/// holds a copy of its Service, and a pass over 10,000 costs enough that fewer per pass
/// would make the passes the limit (32: ~38 Services/s at 10,000; 256: ~150/s, a pass of
/// ~170 ms paced to one per ~0.5 s found the last pass's 256 still queued).
const QUEUED_WRITES: usize = 512;
/// A renewal sent less than this long ago counts as the renewal before a batch.
const RENEWAL_FRESH: Duration = Duration::from_millis(200);
/// When something is left to retry (a failed write, a pool count held back), how often.
const RETRY: Duration = Duration::from_secs(1);
/// A pool's status is rewritten for changed counts alone at most this often (conditions at
/// once): a thousand Services allocated in a burst would otherwise rewrite it on every pass.
const POOL_COUNTS_EVERY: Duration = Duration::from_secs(1);
/// Events waiting to be created; more are dropped (counted in the write metric). A burst of
/// 10,000 new Services queues an Event each while the allocation writes go first.
const EVENT_QUEUE: usize = 16384;
/// Events created at once (8 drained a burst's queued Events no faster than 4: ~60-70/s
/// either way on the 2-core test machine).
const EVENTS_IN_FLIGHT: usize = 4;
/// An Event waits while the leader has Services left to write ([`Busy`]), up to this long:
/// addresses and status come first (10,000 Services settled faster without their Events
/// competing for the API server), and a controller that never stops writing still gets its
/// Events out.
const EVENT_DEFER_MAX: Duration = Duration::from_secs(10);
/// How often a deferred Event looks again.
const EVENT_DEFER_POLL: Duration = Duration::from_millis(50);

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    crate::crd::parse_duration(s).map_err(|e| e.to_string())
}

/// Settings of the Service controller (flags of `ferrovip agent` and `ferrovip controller`).
#[derive(Debug, Clone, clap::Args)]
pub struct ControllerOptions {
    /// Serve only Services with `spec.loadBalancerClass: ferrovip.io/vrrp`, not class-less
    /// `type: LoadBalancer` ones (another load balancer serves those).
    #[arg(long, env = "FERROVIP_IGNORE_CLASSLESS_SERVICES")]
    pub ignore_classless_services: bool,
    /// The namespace of the controller's Lease (the agent's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferrovip-system")]
    pub namespace: String,
    /// How long the leader's Lease holds without renewal: a crashed leader is replaced
    /// after this long (a gracefully stopped one at once).
    #[arg(long, env = "FERROVIP_LEASE_DURATION", default_value = "10s", value_parser = parse_duration_arg)]
    pub lease_duration: Duration,
    /// How often the leader renews the Lease (and contenders look at it).
    #[arg(long, env = "FERROVIP_LEASE_RENEW", default_value = "2s", value_parser = parse_duration_arg)]
    pub lease_renew: Duration,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            ignore_classless_services: false,
            namespace: "ferrovip-system".into(),
            lease_duration: Duration::from_secs(10),
            lease_renew: Duration::from_secs(2),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(
        "--lease-renew ({renew:?}) must be shorter than --lease-duration ({duration:?}), and both above zero"
    )]
    Timing { renew: Duration, duration: Duration },
}

impl ControllerError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            ControllerError::Timing { .. } => "timing",
        }
    }
}

impl ControllerOptions {
    pub fn validate(&self) -> Result<(), ControllerError> {
        if self.lease_renew.is_zero() || self.lease_renew >= self.lease_duration {
            return Err(ControllerError::Timing {
                renew: self.lease_renew,
                duration: self.lease_duration,
            });
        }
        Ok(())
    }
}

/// A running controller.
pub struct ControllerHandle {
    stop: oneshot::Sender<oneshot::Sender<()>>,
}

impl ControllerHandle {
    /// Stops writing, releases the Lease (a contender takes over at once), and returns.
    pub async fn stop(self) {
        let (done, wait) = oneshot::channel();
        if self.stop.send(done).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Starts the controller task: it contends for the Lease and, while leading, allocates.
/// With `shared`, each term reads the agent's Service, pool and VirtualIP stores
/// ([`SharedStores`]) instead of listing and watching them itself.
pub fn spawn(
    client: Client,
    options: ControllerOptions,
    identity: String,
    stats: Arc<ControllerStats>,
    shared: Option<SharedStores>,
) -> ControllerHandle {
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(run(client, options, identity, stats, shared, stopped));
    ControllerHandle { stop }
}

async fn run(
    client: Client,
    options: ControllerOptions,
    identity: String,
    stats: Arc<ControllerStats>,
    shared: Option<SharedStores>,
    mut stop: oneshot::Receiver<oneshot::Sender<()>>,
) {
    // In the agent, the Lease carries the Service and pool watches' progress: a node whose
    // watch stays behind the leader's starts it again.
    let lease = Elector::spawn_with_progress(
        client.clone(),
        LeaseSettings {
            namespace: options.namespace.clone(),
            name: LEASE_NAME.into(),
            identity: identity.clone(),
            duration: options.lease_duration,
            renew: options.lease_renew,
        },
        shared.as_ref().map(|s| s.echoes.clone()),
    );
    // Shared by every term's writes, and read by the Event task to let them go first.
    let permits = Arc::new(Semaphore::new(WRITES_IN_FLIGHT));
    let allocating = Arc::new(AtomicBool::new(false));
    let events = spawn_events(
        client.clone(),
        identity.clone(),
        stats.clone(),
        Busy {
            writes: permits.clone(),
            allocating: allocating.clone(),
        },
    );
    let mut state = lease.state.clone();
    let mut ip_mode: Option<bool> = None;
    let done = loop {
        let term = tokio::select! {
            term = leading(&mut state) => match term {
                Some(term) => term,
                None => break None,
            },
            done = &mut stop => break done.ok(),
        };
        // A predecessor whose Lease was taken over stops at its next renewal.
        tokio::select! {
            () = tokio::time::sleep(options.lease_renew) => {}
            done = &mut stop => break done.ok(),
        }
        if !state.borrow().may_write(term, Instant::now()) {
            continue;
        }
        if ip_mode.is_none() {
            match client.apiserver_version().await {
                Ok(v) => {
                    let has = write::has_ip_mode(&v.major, &v.minor);
                    info!(version = %v.git_version, ip_mode = has, "API server version read");
                    ip_mode = Some(has);
                }
                Err(e) => {
                    warn!(error = %e, "cannot read the API server version; not writing ipMode for now")
                }
            }
        }
        let config = ipam::Config {
            serve_classless: !options.ignore_classless_services,
            ip_mode: ip_mode.unwrap_or(false),
        };
        info!(identity = %identity, term, "Service controller leading: listing the cluster");
        stats.set_leading(true);
        let watches = match shared.as_ref() {
            Some(shared) => watch::Watches::shared(&client, shared),
            None => watch::Watches::start(&client),
        };
        let context = Context {
            client: client.clone(),
            term,
            state: lease.state.clone(),
            permits: permits.clone(),
            allocating: allocating.clone(),
            stats: stats.clone(),
            events: events.clone(),
            echoes: watches.echoes.clone(),
        };
        let mut leader = Leader::new(context, config, watches);
        let stopped = tokio::select! {
            () = leader.run(&lease) => None,
            done = &mut stop => Some(done.ok()),
        };
        drop(leader);
        allocating.store(false, Ordering::Relaxed);
        stats.set_leading(false);
        if let Some(done) = stopped {
            break done;
        }
        info!(identity = %identity, term, "Service controller no longer leading");
    };
    lease.release().await;
    if let Some(done) = done {
        let _ = done.send(());
    }
}

/// Waits until leading; the term. `None` when the elector is gone.
async fn leading(state: &mut tokio::sync::watch::Receiver<Leadership>) -> Option<u64> {
    loop {
        {
            let s = state.borrow_and_update();
            if s.leading {
                return Some(s.term);
            }
        }
        state.changed().await.ok()?;
    }
}

/// What the Event task yields to.
#[derive(Clone)]
struct Busy {
    /// The Service writes' permits: some taken, writes are in flight.
    writes: Arc<Semaphore>,
    /// The leader's last pass left Services to write (started, in flight or queued).
    allocating: Arc<AtomicBool>,
}

impl Busy {
    fn now(&self) -> bool {
        self.allocating.load(Ordering::Relaxed)
            || self.writes.available_permits() < WRITES_IN_FLIGHT
    }
}

/// Creates Events from a queue, a few at a time, each once the leader has nothing left to
/// write (or after [`EVENT_DEFER_MAX`]), so that they never hold up allocation.
fn spawn_events(
    client: Client,
    identity: String,
    stats: Arc<ControllerStats>,
    busy: Busy,
) -> mpsc::Sender<ServiceEvent> {
    let (tx, mut rx) = mpsc::channel::<ServiceEvent>(EVENT_QUEUE);
    // A burst's Events are summarized per pool before they queue for publishing.
    let (summarized_tx, mut summarized) = mpsc::channel::<ServiceEvent>(EVENT_QUEUE);
    tokio::spawn(async move {
        let mut summaries = summary::Summaries::default();
        loop {
            let due = summaries.due();
            let event = tokio::select! {
                event = rx.recv() => match event {
                    Some(event) => summaries.offer(event, Instant::now()),
                    None => break,
                },
                () = crate::driver::sleep_until(due.map(Into::into)) => None,
            };
            let ready = event.into_iter().chain(summaries.flush(Instant::now()));
            for event in ready {
                if summarized_tx.send(event).await.is_err() {
                    return;
                }
            }
        }
        for event in summaries.flush(Instant::now() + summary::WINDOW) {
            let _ = summarized_tx.send(event).await;
        }
    });
    tokio::spawn(async move {
        let stream = futures::stream::poll_fn(move |cx| summarized.poll_recv(cx));
        stream
            .for_each_concurrent(EVENTS_IN_FLIGHT, |event| {
                let client = client.clone();
                let identity = identity.clone();
                let stats = stats.clone();
                let busy = busy.clone();
                async move {
                    let queued = Instant::now();
                    while busy.now() && queued.elapsed() < EVENT_DEFER_MAX {
                        tokio::time::sleep(EVENT_DEFER_POLL).await;
                    }
                    match write::publish(&client, &identity, &event).await {
                        Ok(()) => stats.write("event", "ok"),
                        Err(e) => {
                            stats.write("event", "error");
                            debug!(error = %e, reason = event.reason, "Event not created");
                        }
                    }
                }
            })
            .await;
    });
    tx
}

/// A Service as the allocator must see it while our write is in flight or until the watch
/// shows its outcome: `object`, used while the store holds one of the `stale` versions.
struct Override {
    object: Arc<Service>,
    stale: Vec<String>,
}

/// How a Service's writes ended.
struct ServiceDone {
    key: ServiceRef,
    /// The latest version known (a write's answer, or a fresh read after a conflict); `None`:
    /// nothing known beyond the store.
    object: Option<Service>,
    /// Versions older than `object`.
    stale: Vec<String>,
    /// Something failed: decide again later.
    retry: bool,
}

struct PoolDone {
    name: String,
    written: Option<(Vec<String>, LoadBalancerPoolStatus)>,
}

enum Done {
    Service(Box<ServiceDone>),
    Pool(PoolDone),
}

/// What every write task needs.
#[derive(Clone)]
struct Context {
    client: Client,
    term: u64,
    state: tokio::sync::watch::Receiver<Leadership>,
    permits: Arc<Semaphore>,
    /// Set by each pass: Services are left to write ([`Busy`]).
    allocating: Arc<AtomicBool>,
    stats: Arc<ControllerStats>,
    events: mpsc::Sender<ServiceEvent>,
    /// Accepted writes, to be heard back through the watches (this term's
    /// [`watch::Watches::echoes`]).
    echoes: WriteEchoes,
}

impl Context {
    fn fenced(&self) -> bool {
        !self.state.borrow().may_write(self.term, Instant::now())
    }

    fn event(&self, event: ServiceEvent) {
        if self.events.try_send(event).is_err() {
            self.stats.write("event", "dropped");
        }
    }
}

/// One term of leadership.
struct Leader {
    context: Context,
    config: ipam::Config,
    watches: watch::Watches,
    overrides: HashMap<ServiceRef, Override>,
    inflight: HashSet<ServiceRef>,
    pools_inflight: HashSet<String>,
    /// Per pool: versions older than our last status write, that status, and when.
    pool_written: HashMap<String, (Vec<String>, LoadBalancerPoolStatus, Instant)>,
    /// The last failure reason told per Service (an Event once per change).
    failures: HashMap<ServiceRef, ipam::FailureReason>,
    /// When a Service was first seen without an address (allocation latency).
    first_seen: HashMap<ServiceRef, Instant>,
    jobs: JoinSet<Done>,
    /// Which Service each write task is for: a task that panicked still frees its Service.
    job_keys: HashMap<tokio::task::Id, ServiceRef>,
    retry: bool,
    /// The last pass left Services to write for lack of room (QUEUED_WRITES): the next pass
    /// comes when a write ends.
    backlog: bool,
}

impl Leader {
    fn new(context: Context, config: ipam::Config, watches: watch::Watches) -> Leader {
        Leader {
            watches,
            context,
            config,
            overrides: HashMap::new(),
            inflight: HashSet::new(),
            pools_inflight: HashSet::new(),
            pool_written: HashMap::new(),
            failures: HashMap::new(),
            first_seen: HashMap::new(),
            jobs: JoinSet::new(),
            job_keys: HashMap::new(),
            retry: false,
            backlog: false,
        }
    }

    /// Allocates until leadership is lost.
    async fn run(&mut self, lease: &LeaseHandle) {
        let mut state = self.context.state.clone();
        tokio::select! {
            () = self.watches.listed() => {}
            () = lost(&mut state, self.context.term) => return,
        }
        // Shared stores: what was written before this term must be in them first.
        let caught_up = tokio::select! {
            up = self.watches.caught_up(&self.context.client) => up,
            () = lost(&mut state, self.context.term) => return,
        };
        if !caught_up {
            self.watches = watch::Watches::start(&self.context.client);
            tokio::select! {
                () = self.watches.listed() => {}
                () = lost(&mut state, self.context.term) => return,
            }
        }
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut dirty = true;
        let mut next_pass = Instant::now();
        loop {
            if dirty {
                // Paced like the agents' planner: a pass over 10,000 Services costs tens of
                // milliseconds, and one per change or per finished write starved the API
                // server it writes to (the writes started go on meanwhile).
                let wait = next_pass.saturating_duration_since(Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                let fresh = state
                    .borrow()
                    .renewed_at
                    .is_some_and(|t| t.elapsed() < RENEWAL_FRESH);
                if !fresh && !lease.renew().await {
                    return;
                }
                if self.context.fenced() {
                    return;
                }
                let started = Instant::now();
                self.pass().await;
                next_pass = Instant::now() + (started.elapsed() * PASS_PACING).min(PASS_PACING_MAX);
                dirty = false;
            }
            tokio::select! {
                r = self.watches.changes.changed() => {
                    if r.is_err() {
                        return;
                    }
                    tokio::time::sleep(DEBOUNCE).await;
                    self.watches.changes.mark_unchanged();
                    dirty = true;
                }
                Some(done) = self.jobs.join_next_with_id() => {
                    // Every task that ended, not one per pass: a pass starts writes only
                    // for the room the ended ones leave.
                    dirty |= self.joined(done);
                    while let Some(done) = self.jobs.try_join_next_with_id() {
                        dirty |= self.joined(done);
                    }
                }
                () = lost(&mut state, self.context.term) => return,
                _ = retry.tick() => {
                    dirty |= std::mem::take(&mut self.retry);
                }
            }
        }
    }

    /// A joined write task; true when a pass should follow.
    fn joined(&mut self, done: Result<(tokio::task::Id, Done), tokio::task::JoinError>) -> bool {
        let again = self.join(done);
        self.set_allocating(again);
        again
    }

    /// Tells the Event task whether Services are left to write (`more`: a pass follows).
    fn set_allocating(&self, more: bool) {
        let left = more || self.backlog || !self.inflight.is_empty();
        self.context.allocating.store(left, Ordering::Relaxed);
    }

    fn join(&mut self, done: Result<(tokio::task::Id, Done), tokio::task::JoinError>) -> bool {
        match done {
            Ok((id, done)) => {
                self.job_keys.remove(&id);
                self.finish(done) || self.backlog
            }
            Err(e) => {
                warn!(error = %e, "a write task failed");
                if let Some(key) = self.job_keys.remove(&e.id()) {
                    self.inflight.remove(&key);
                    self.overrides.remove(&key);
                }
                self.pools_inflight.clear();
                self.retry = true;
                false
            }
        }
    }

    /// A write task ended: what it learnt becomes the allocator's view. True when a new pass
    /// should run at once (a conflict).
    fn finish(&mut self, done: Done) -> bool {
        match done {
            Done::Service(done) => {
                let done = *done;
                self.inflight.remove(&done.key);
                match done.object {
                    Some(object) => {
                        self.overrides.insert(
                            done.key,
                            Override {
                                object: Arc::new(object),
                                stale: done.stale,
                            },
                        );
                    }
                    None => {
                        self.overrides.remove(&done.key);
                    }
                }
                if done.retry {
                    self.retry = true;
                }
                done.retry
            }
            Done::Pool(done) => {
                self.pools_inflight.remove(&done.name);
                match done.written {
                    Some((stale, status)) => {
                        self.pool_written
                            .insert(done.name, (stale, status, Instant::now()));
                    }
                    None => self.retry = true,
                }
                false
            }
        }
    }

    /// The Services as the allocator must see them: the store, with our writes in flight or
    /// not yet reflected.
    fn services_view(&mut self) -> Vec<Arc<Service>> {
        let store = self.watches.services.state();
        let mut present = HashSet::with_capacity(store.len());
        let mut out = Vec::with_capacity(store.len());
        for svc in store {
            let (Some(namespace), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name)
            else {
                continue;
            };
            let key = ServiceRef {
                namespace: namespace.clone(),
                name: name.clone(),
            };
            let rv = svc.metadata.resource_version.clone().unwrap_or_default();
            let view = match self.overrides.get(&key) {
                Some(o) if self.inflight.contains(&key) || o.stale.contains(&rv) => {
                    Arc::clone(&o.object)
                }
                Some(_) => {
                    self.overrides.remove(&key);
                    svc
                }
                None => svc,
            };
            present.insert(key);
            out.push(view);
        }
        let inflight = &self.inflight;
        self.overrides
            .retain(|k, _| present.contains(k) || inflight.contains(k));
        self.first_seen.retain(|k, _| present.contains(k));
        self.failures.retain(|k, _| present.contains(k));
        out
    }

    /// Decides the whole state and starts the writes of what differs. The deciding ([`decide`])
    /// runs on the agent's compute thread ([`off_runtime`]): on the runtime thread, a pass over
    /// 10,000 Services held up the watches and the write tasks (this pass's answers included).
    async fn pass(&mut self) {
        let pass_started = Instant::now();
        self.context.stats.pass();
        self.backlog = false;
        let services = self.services_view();
        let pools: Vec<LoadBalancerPool> = self
            .watches
            .pools
            .state()
            .iter()
            .map(|p| (**p).clone())
            .collect();
        let namespaces = self.watches.namespace_labels();
        let reserved = self.watches.reserved();
        let config = self.config;
        let (outcome, decided) =
            off_runtime(move || decide(&pools, services, &namespaces, &reserved, config)).await;
        self.pool_figures(&outcome.pools);
        let now = Instant::now();
        let started_writes = self.inflight.len();
        for (key, decision) in &outcome.services {
            let Some(Decided {
                svc,
                differs,
                master,
            }) = decided.get(key)
            else {
                continue;
            };
            self.failure_event(key, svc, decision);
            if !has_record(svc) {
                self.first_seen.entry(key.clone()).or_insert(now);
            }
            if self.inflight.contains(key) || !differs {
                continue;
            }
            // A task per Service to write holds its copy of the Service once it writes:
            // 10,000 tasks at once were 250 MB more. The rest is decided again by a later
            // pass.
            if self.inflight.len() >= QUEUED_WRITES {
                self.backlog = true;
                continue;
            }
            let rv = svc.metadata.resource_version.clone().unwrap_or_default();
            self.overrides.insert(
                key.clone(),
                Override {
                    object: Arc::new(intended(svc, decision, master.as_deref())),
                    stale: vec![rv],
                },
            );
            self.inflight.insert(key.clone());
            let first_seen = if decision.record.is_empty() {
                None
            } else {
                self.first_seen.get(key).copied()
            };
            let task = self.jobs.spawn(service_writes(
                self.context.clone(),
                key.clone(),
                Arc::clone(svc),
                decision.clone(),
                master.clone(),
                first_seen,
            ));
            self.job_keys.insert(task.id(), key.clone());
        }
        for (name, decision) in &outcome.pools {
            self.pool_write(name, &decision.status);
        }
        self.set_allocating(false);
        debug!(
            started = self.inflight.len() - started_writes,
            in_flight = self.inflight.len(),
            writing = WRITES_IN_FLIGHT - self.context.permits.available_permits(),
            took_us = pass_started.elapsed().as_micros() as u64,
            "pass"
        );
    }

    fn pool_figures(&self, pools: &BTreeMap<String, ipam::PoolDecision>) {
        let mut figures = BTreeMap::new();
        for (name, decision) in pools {
            for (family, usage) in [
                ("ipv4", &decision.status.ipv4),
                ("ipv6", &decision.status.ipv6),
            ] {
                if let Some(u) = usage {
                    figures.insert(
                        (name.clone(), family),
                        PoolFigures {
                            total: u.total,
                            in_use: u.in_use,
                        },
                    );
                }
            }
        }
        self.context.stats.set_pools(figures);
    }

    /// An `AllocationFailed` Event when a Service's failure reason changes.
    fn failure_event(&mut self, key: &ServiceRef, svc: &Service, decision: &ServiceDecision) {
        match &decision.failure {
            Some(f) if self.failures.get(key) != Some(&f.reason) => {
                self.failures.insert(key.clone(), f.reason);
                self.context.stats.failure(f.reason.metric_label());
                self.context.event(ServiceEvent::new(
                    svc,
                    true,
                    "AllocationFailed",
                    "Allocate",
                    f.message.clone(),
                ));
            }
            Some(_) => {}
            None => {
                self.failures.remove(key);
            }
        }
    }

    /// Starts a pool status write when the status differs (counts alone at most every
    /// [`POOL_COUNTS_EVERY`]).
    fn pool_write(&mut self, name: &str, wanted: &LoadBalancerPoolStatus) {
        if self.pools_inflight.contains(name) {
            return;
        }
        let Some(pool) = self
            .watches
            .pools
            .state()
            .into_iter()
            .find(|p| p.metadata.name.as_deref() == Some(name))
        else {
            return;
        };
        let mut pool = (*pool).clone();
        let rv = pool.metadata.resource_version.clone().unwrap_or_default();
        let mut last_write = None;
        if let Some((stale, status, at)) = self.pool_written.get(name) {
            if stale.contains(&rv) {
                pool.status = Some(status.clone());
            }
            last_write = Some(*at);
        }
        let Some(update) = write::pool_status_update(&pool, wanted, Timestamp::now()) else {
            return;
        };
        let current = pool.status.clone().unwrap_or_default();
        let counts_only = current.conditions == update.conditions
            && current.observed_generation == update.observed_generation;
        if counts_only && last_write.is_some_and(|t| t.elapsed() < POOL_COUNTS_EVERY) {
            self.retry = true;
            return;
        }
        self.pools_inflight.insert(name.to_string());
        let context = self.context.clone();
        let name = name.to_string();
        self.jobs.spawn(async move {
            let _permit = context.permits.clone().acquire_owned().await;
            if context.fenced() {
                return Done::Pool(PoolDone {
                    name,
                    written: None,
                });
            }
            match write::patch_pool_status(&context.client, &name, &update).await {
                Ok(written) => {
                    context.echoes.pools.expect(&written.metadata);
                    context.stats.write("pool_status", "ok");
                    Done::Pool(PoolDone {
                        name,
                        written: Some((vec![rv], update)),
                    })
                }
                Err(e) => {
                    context.stats.write("pool_status", result_label(&e));
                    debug!(pool = %name, error = %e, "pool status not written");
                    Done::Pool(PoolDone {
                        name,
                        written: None,
                    })
                }
            }
        });
    }
}

/// A decided Service as the pass saw it, whether its record or status differs from the
/// decision, and the master annotation to write with a new record.
struct Decided {
    svc: Arc<Service>,
    differs: bool,
    master: Option<String>,
}

/// The allocator's outcome over `services` (off the runtime thread), and per decided Service
/// what the pass needs of it.
fn decide(
    pools: &[LoadBalancerPool],
    services: Vec<Arc<Service>>,
    namespaces: &BTreeMap<String, BTreeMap<String, String>>,
    reserved: &BTreeMap<IpAddr, String>,
    config: ipam::Config,
) -> (ipam::Outcome, HashMap<ServiceRef, Decided>) {
    let started = Instant::now();
    let outcome = ipam::reconcile(&Inputs {
        pools,
        services: &services,
        namespaces,
        reserved,
        config,
    });
    debug!(
        services = services.len(),
        decided = outcome.services.len(),
        took_us = started.elapsed().as_micros() as u64,
        "allocation pass"
    );
    let now = Timestamp::now();
    let mut decided = HashMap::with_capacity(outcome.services.len());
    // Read only when some record is to be written.
    let mut hints = None;
    for svc in &services {
        let (Some(namespace), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
            continue;
        };
        let key = ServiceRef {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        let Some(decision) = outcome.services.get(&key) else {
            continue;
        };
        let record = write::record_patch(svc, &decision.record, None).is_some();
        let master = if record && !decision.record.is_empty() {
            let hints = hints.get_or_insert_with(|| write::master_hints(&services));
            write::master_with_record(svc, &decision.record, hints)
        } else {
            None
        };
        let differs = record || write::status_patch(svc, decision, now).is_some();
        decided.insert(
            key,
            Decided {
                svc: Arc::clone(svc),
                differs,
                master,
            },
        );
    }
    (outcome, decided)
}

/// Resolves when term `term` can no longer write (lost, expired, or a new term).
async fn lost(state: &mut tokio::sync::watch::Receiver<Leadership>, term: u64) {
    loop {
        let until = {
            let s = state.borrow_and_update();
            if !s.may_write(term, Instant::now()) {
                return;
            }
            s.valid_until
        };
        let sleep = until
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(tokio::time::Instant::now);
        tokio::select! {
            r = state.changed() => if r.is_err() { return },
            () = tokio::time::sleep_until(sleep) => {}
        }
    }
}

fn has_record(svc: &Service) -> bool {
    svc.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(ANNOTATION_ALLOCATED))
}

/// `svc` as it will be once `decision` (and `master` with its record) is written.
fn intended(svc: &Service, decision: &ServiceDecision, master: Option<&str>) -> Service {
    let mut out = svc.clone();
    let annotations = out.metadata.annotations.get_or_insert_with(BTreeMap::new);
    if let Some(master) = master {
        annotations.insert(ANNOTATION_MASTER.to_string(), master.to_string());
    }
    if decision.record.is_empty() {
        annotations.remove(ANNOTATION_ALLOCATED);
    } else {
        annotations.insert(
            ANNOTATION_ALLOCATED.to_string(),
            format_allocated(&decision.record),
        );
    }
    if let Some(ingress) = &decision.ingress {
        let status = out.status.get_or_insert_with(ServiceStatus::default);
        let lb = status
            .load_balancer
            .get_or_insert_with(LoadBalancerStatus::default);
        lb.ingress = (!ingress.is_empty()).then(|| {
            ingress
                .iter()
                .map(|i| LoadBalancerIngress {
                    ip: Some(i.ip.to_string()),
                    ip_mode: i.ip_mode.map(Into::into),
                    ..LoadBalancerIngress::default()
                })
                .collect()
        });
        if let Some(conditions) = write::conditions_update(svc, decision, Timestamp::now()) {
            let status = out.status.get_or_insert_with(ServiceStatus::default);
            status.conditions = (!conditions.is_empty()).then_some(conditions);
        }
    }
    out
}

fn result_label(e: &kube::Error) -> &'static str {
    match e {
        kube::Error::Api(s) if s.code == 409 => "conflict",
        _ => "error",
    }
}

/// The writes of one Service: the record, then the status, each fenced and carrying the
/// resourceVersion; Events once the record is written.
async fn service_writes(
    context: Context,
    key: ServiceRef,
    base: Arc<Service>,
    decision: ServiceDecision,
    master: Option<String>,
    first_seen: Option<Instant>,
) -> Done {
    let _permit = context.permits.clone().acquire_owned().await;
    let api: Api<Service> = Api::namespaced(context.client.clone(), &key.namespace);
    let mut current = Arc::unwrap_or_clone(base);
    let mut stale = Vec::new();
    let mut wrote = false;
    let end = |object: Option<Service>, stale: Vec<String>, retry: bool| {
        Done::Service(Box::new(ServiceDone {
            key: key.clone(),
            object,
            stale,
            retry,
        }))
    };
    if let Some(body) = write::record_patch(&current, &decision.record, master.as_deref()) {
        if context.fenced() {
            return end(None, stale, false);
        }
        match write::patch_service(&api, &key.name, &body).await {
            Ok(svc) => {
                context.echoes.services.expect(&svc.metadata);
                context.stats.write("record", "ok");
                if let Some(t) = first_seen {
                    context.stats.allocated_after(t.elapsed());
                }
                for (address, pool) in &decision.allocated {
                    context.event(
                        ServiceEvent::new(
                            &svc,
                            false,
                            "AddressAllocated",
                            "Allocate",
                            format!("address {address} allocated from pool {pool}"),
                        )
                        .countable(pool, &address.to_string()),
                    );
                }
                for (address, why) in &decision.released {
                    context.event(ServiceEvent::new(
                        &svc,
                        false,
                        "AddressReleased",
                        "Release",
                        format!("address {address} released: {why}"),
                    ));
                }
                stale.push(
                    current
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default(),
                );
                current = svc;
                wrote = true;
            }
            Err(e) => {
                return failed(&context, &api, &key, e, "record", current, stale, wrote).await;
            }
        }
    }
    if let Some(body) = write::status_patch(&current, &decision, Timestamp::now()) {
        if context.fenced() {
            return end(wrote.then_some(current), stale, false);
        }
        match write::patch_service_status(&api, &key.name, &body).await {
            Ok(svc) => {
                context.echoes.services.expect(&svc.metadata);
                context.stats.write("status", "ok");
                stale.push(
                    current
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default(),
                );
                current = svc;
                wrote = true;
            }
            Err(e) => {
                return failed(&context, &api, &key, e, "status", current, stale, wrote).await;
            }
        }
    }
    end(wrote.then_some(current), stale, false)
}

/// A write failed: on a conflict, read the Service again (decided again at once); gone: the
/// store will tell; otherwise retried later. What was written before stays in the view.
#[allow(clippy::too_many_arguments)]
async fn failed(
    context: &Context,
    api: &Api<Service>,
    key: &ServiceRef,
    e: kube::Error,
    kind: &'static str,
    current: Service,
    mut stale: Vec<String>,
    wrote: bool,
) -> Done {
    context.stats.write(kind, result_label(&e));
    let rv = current
        .metadata
        .resource_version
        .clone()
        .unwrap_or_default();
    let object = match &e {
        kube::Error::Api(s) if s.code == 409 => {
            debug!(service = %format!("{}/{}", key.namespace, key.name), kind, "conflict; reading the Service again");
            match api.get_opt(&key.name).await {
                Ok(Some(fresh)) => {
                    stale.push(rv);
                    Some(fresh)
                }
                Ok(None) => None,
                Err(_) => wrote.then_some(current),
            }
        }
        kube::Error::Api(s) if s.code == 404 => None,
        _ => {
            warn!(service = %format!("{}/{}", key.namespace, key.name), kind, error = %e, "write failed; retrying");
            wrote.then_some(current)
        }
    };
    Done::Service(Box::new(ServiceDone {
        key: key.clone(),
        object,
        stale,
        retry: true,
    }))
}
