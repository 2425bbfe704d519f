//! The VRRP driver: the I/O around the sans-IO [`NodeEngine`].
//!
//! The engine runs on its own OS thread with its own current-thread runtime ([`spawn`]), so
//! planning, watches, status writes and metrics (on the agent's runtime) never delay an
//! advertisement; optionally at real-time priority (`--vrrp-rt-priority`, SCHED_FIFO).
//! One task runs the engine: it owns the clock and one precise timer for the engine's
//! earliest deadline, reads the node's links and sets up what the instances need (VRRP
//! sockets, virtual-MAC interfaces) before handing the engine a plan, sends advertisements at
//! once, and queues address changes and announcements, in order, on a separate effects task
//! so that a slow netlink call never delays an advertisement. One reader task per interface
//! and family checks the TTL, decodes and hands packets over. Deciding anything is the
//! engine's job.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::engine::{
    DropReason, Environment, Input, Instances, LinkEnv, LinkFacts, NodeEngine, Observed, Output,
    Requirement, Stats, Transmit, VmacFacts, requirements,
};
use crate::node::addr::{AddrError, AddressEvent, AddressManager, AddressWatcher};
use crate::node::announce::Announcer;
use crate::node::link::{MacvlanManager, vmac_name};
use crate::node::ownership::OwnershipMode;
use crate::node::socket::{
    PreciseTimer, Received, SocketError, VrrpSocket, pin_memory, set_normal_priority,
    set_realtime_priority,
};
use crate::vocab::Family;
use crate::vrrp::packet::{Advertisement, virtual_mac};

/// How often links are re-read (index, MAC, primary address) and instances that could not
/// start (missing interface or address) are retried.
const LINK_REFRESH: Duration = Duration::from_secs(2);
/// Largest VRRP datagram we read: 20-byte IPv4 header (60 with options) + 8 + 255 × 16.
const RECV_BUFFER: usize = 4200;
/// Most queued address removals handed to the engine as one batch.
const REMOVED_BATCH: usize = 65_536;

/// The engine loop turns at least this often, even with nothing to do, so that its
/// [`Heartbeat`] proves it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// Proof that the engine loop turns: the driver stamps it on every turn of its loop (at
/// least every [`HEARTBEAT`]); `/healthz` fails when the stamp gets old.
#[derive(Debug)]
pub struct Heartbeat {
    origin: Instant,
    /// Microseconds from `origin` to the last turn.
    last: AtomicU64,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            origin: Instant::now(),
            last: AtomicU64::new(0),
        }
    }
}

impl Heartbeat {
    pub fn beat(&self) {
        let micros = self.origin.elapsed().as_micros() as u64;
        self.last.store(micros, Ordering::Relaxed);
    }

    /// How long ago the engine loop last turned.
    pub fn age(&self) -> Duration {
        let last = Duration::from_micros(self.last.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

/// What readiness needs from the engine: whether it has a plan, and what of its VRRP I/O
/// could not be set up for it (an interface missing, a socket that did not open).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineReadiness {
    /// The engine applied a plan (the first `Apply` command).
    pub applied: bool,
    /// One line per interface and family the plan needs whose socket is not open.
    pub missing_sockets: Vec<String>,
}

/// Errors starting the engine thread.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("cannot start the VRRP engine thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("cannot reach the kernel over netlink from the VRRP engine thread: {0}")]
    Netlink(#[source] AddrError),
    #[error("the VRRP engine thread ended while starting")]
    Died,
}

impl DriverError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            DriverError::Thread(_) => "thread",
            DriverError::Netlink(_) => "netlink",
            DriverError::Died => "died",
        }
    }
}

/// How the engine's addresses are kept: where the ownership record lives, how addresses are
/// recognised (`None`: ask the kernel), and the lifetime masters renew (`None`: forever).
pub struct AddressSettings {
    pub state_dir: PathBuf,
    pub ownership: Option<OwnershipMode>,
    pub lifetime: Option<Duration>,
    /// IPv4 sets larger than this (per interface and call) are installed as bulk sets (an
    /// anchor address and `local` routes); 0 never.
    pub bulk_threshold: usize,
    /// How announcement bursts are sent (`--announce-*`).
    pub announcer: Announcer,
}

/// The running engine thread, as the agent sees it.
pub struct EngineThread {
    pub commands: mpsc::Sender<Command>,
    pub observed: watch::Receiver<Observed>,
    pub stats: Arc<Stats>,
    pub heartbeat: Arc<Heartbeat>,
    pub readiness: watch::Receiver<EngineReadiness>,
    /// Resolves (with an error) when the thread has ended.
    pub finished: oneshot::Receiver<()>,
}

/// Sleeps until `at`; forever without one (a `select!` branch for an optional deadline).
pub async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Starts the engine on its own OS thread, with its own current-thread runtime and netlink
/// connection, at SCHED_FIFO `rt_priority` when given (a failure to get it is logged, not
/// fatal). Returns once the driver has cleaned up what a predecessor left and runs.
pub async fn spawn(
    node: String,
    rt_priority: Option<u8>,
    settings: AddressSettings,
) -> Result<EngineThread, DriverError> {
    let (started_tx, started_rx) = oneshot::channel();
    let (finished_tx, finished) = oneshot::channel::<()>();
    let (commands, commands_rx) = mpsc::channel(16);
    std::thread::Builder::new()
        .name("vrrp-engine".into())
        .spawn(move || {
            let _finished = finished_tx;
            if let Some(priority) = rt_priority {
                for problem in pin_memory() {
                    warn!(%problem, "the VRRP engine may stall on memory-map locks under load");
                }
                // Touch the stack the engine will use, so its pages are locked before it runs.
                std::hint::black_box([0u8; 64 * 1024]);
                match set_realtime_priority(priority) {
                    Ok(()) => info!(priority, "VRRP engine thread runs at SCHED_FIFO priority"),
                    Err(e) => {
                        warn!(priority, error = %e, "cannot give the VRRP engine thread real-time priority (needs CAP_SYS_NICE); it runs at normal priority")
                    }
                }
            }
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = started_tx.send(Err(DriverError::Thread(e)));
                    return;
                }
            };
            runtime.block_on(async move {
                let addresses = match AddressManager::connect_with_record(
                    &settings.state_dir,
                    settings.ownership,
                )
                .await
                {
                    Ok(addresses) => addresses.with_bulk_threshold(settings.bulk_threshold),
                    Err(e) => {
                        let _ = started_tx.send(Err(DriverError::Netlink(e)));
                        return;
                    }
                };
                info!(
                    ownership = addresses.mode().as_str(),
                    record = %addresses.record_path().unwrap_or_default().display(),
                    "how this agent recognises its addresses"
                );
                let driver = Driver::start_with(node, addresses, settings.announcer)
                    .await
                    .with_address_lifetime(settings.lifetime);
                let handles = (
                    driver.observe(),
                    driver.stats(),
                    driver.heartbeat(),
                    driver.readiness(),
                );
                if started_tx.send(Ok(handles)).is_err() {
                    return;
                }
                driver.run(commands_rx).await;
            });
        })
        .map_err(DriverError::Thread)?;
    let (observed, stats, heartbeat, readiness) =
        started_rx.await.map_err(|_| DriverError::Died)??;
    Ok(EngineThread {
        commands,
        observed,
        stats,
        heartbeat,
        readiness,
        finished,
    })
}

/// Commands to the driver.
pub enum Command {
    /// Converge to these instances (`Desired::instances`).
    Apply(Instances),
    /// Leave gracefully (priority 0, release addresses) and stop. Answers when done.
    Shutdown(oneshot::Sender<()>),
    /// Stop for a restart: masters keep their addresses for at most this long and tell the
    /// backups to wait as long (see [`Input::Hold`]); the next agent adopts them.
    Hold(Duration, oneshot::Sender<()>),
}

/// A decoded advertisement from a reader task.
struct Incoming {
    interface: Arc<str>,
    family: Family,
    source: IpAddr,
    advertisement: Advertisement,
}

/// Address and announcement work, executed in order by the effects task.
enum Effect {
    Add {
        ifindex: u32,
        nets: Arc<[IpNet]>,
        lifetime: Option<Duration>,
    },
    Remove {
        ifindex: u32,
        nets: Arc<[IpNet]>,
    },
    Announce {
        interface: Arc<str>,
        ifindex: u32,
        mac: [u8; 6],
        addrs: Arc<[IpAddr]>,
        source_v6: Option<Ipv6Addr>,
    },
    DeleteLink {
        name: Arc<str>,
        index: Option<u32>,
    },
    Lifetime {
        ifindex: u32,
        nets: Vec<IpNet>,
        lifetime: Option<Duration>,
    },
    Hold {
        ifindex: u32,
        nets: Vec<IpNet>,
        hold: Duration,
    },
    Renew {
        lifetime: Duration,
        addresses: Vec<(u32, IpNet)>,
    },
    Barrier(oneshot::Sender<()>),
    /// Advertisements held back behind an announcement ([`Transmit::after_announcement`]),
    /// sent in order with the effects.
    Send(QueuedAdverts),
}

/// One advertisement, encoded for each destination, waiting on the effects task.
struct QueuedAdverts {
    socket: Arc<VrrpSocket>,
    source: IpAddr,
    packets: Vec<(IpAddr, Vec<u8>)>,
    /// The instance's count of queued advertisements, dropped once these went out.
    pending: Arc<AtomicUsize>,
    stats: Arc<Stats>,
}

impl QueuedAdverts {
    fn send(self) {
        for (destination, bytes) in &self.packets {
            send_advert(&self.socket, self.source, *destination, bytes, &self.stats);
        }
        self.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends one encoded advertisement, counting it as sent or failed.
fn send_advert(
    socket: &VrrpSocket,
    source: IpAddr,
    destination: IpAddr,
    bytes: &[u8],
    stats: &Stats,
) {
    match socket.send(source, destination, bytes) {
        Ok(()) => {
            stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            stats.send_errors.fetch_add(1, Ordering::Relaxed);
            debug!(vrid = bytes.get(1).copied(), error = %e, "advertisement not sent");
        }
    }
}

/// Which advertisement an [`Encoded`] is: socket (interface or virtual-MAC interface),
/// family, VRID and destination.
type EncodedKey = (Arc<str>, Family, u8, IpAddr);

/// An encoded advertisement and what it was encoded from (the IPv6 and v3 checksums cover
/// source and destination, so both are part of it).
struct Encoded {
    source: IpAddr,
    checksum: crate::vocab::ChecksumMode,
    advertisement: Advertisement,
    bytes: Vec<u8>,
}

/// An interface with instances on it: what was last read of it and its receive sockets.
struct LinkIo {
    facts: LinkFacts,
    sockets: HashMap<Family, Arc<VrrpSocket>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl std::ops::Drop for LinkIo {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// A virtual-MAC interface and its send socket.
struct VmacIo {
    facts: VmacFacts,
    parent: u32,
    socket: Arc<VrrpSocket>,
}

/// Runs the node's [`NodeEngine`] on sockets, timers and netlink.
pub struct Driver {
    engine: NodeEngine,
    addresses: AddressManager,
    macvlans: MacvlanManager,
    links: HashMap<Arc<str>, LinkIo>,
    vmacs: HashMap<Arc<str>, VmacIo>,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming_rx: mpsc::Receiver<Incoming>,
    effects: mpsc::UnboundedSender<Effect>,
    outputs: Vec<Output>,
    /// The last encoded advertisement per socket, VRID and destination: re-encoded only
    /// when what it encodes changed (priority, interval, addresses, source, checksum mode).
    encoded: HashMap<EncodedKey, Encoded>,
    /// Per instance (socket's interface, family, VRID): its adverts queued behind an
    /// announcement on the effects task, not yet sent.
    queued_sends: HashMap<(Arc<str>, Family, u8), Arc<AtomicUsize>>,
    observed: watch::Sender<Observed>,
    drain_buf: Vec<u8>,
    stats: Arc<Stats>,
    heartbeat: Arc<Heartbeat>,
    readiness: watch::Sender<EngineReadiness>,
    node: String,
    /// Removed addresses (notifications) and failed adds (effects task), for the engine.
    address_events: mpsc::UnboundedReceiver<AddressEvent>,
    /// Reads links on a normal-priority thread of its own (`None`: on this thread).
    link_reader: Option<LinkReader>,
}

impl Driver {
    /// Creates the driver, its engine, its effects task and the address-notification
    /// reader. Removes addresses a crashed predecessor left behind (ours by mark or record,
    /// not recorded as held) before anything starts.
    pub async fn start(node: String, addresses: AddressManager) -> Driver {
        Driver::start_with(node, addresses, Announcer::default()).await
    }

    /// [`Driver::start`] with announcement bursts sent as `announcer` says.
    pub async fn start_with(
        node: String,
        addresses: AddressManager,
        announcer: Announcer,
    ) -> Driver {
        // Addresses a restarting predecessor recorded as held wait for adoption; all other
        // addresses of ours are crash leftovers.
        let held: HashSet<(u32, IpNet)> = match addresses.take_over(SystemTime::now()).await {
            Ok((held, removed)) => {
                if !removed.is_empty() {
                    info!(
                        count = removed.len(),
                        "removed addresses left behind by a previous agent"
                    );
                }
                held
            }
            Err(e) => {
                warn!(error = %e, "could not clean up addresses left behind");
                HashSet::new()
            }
        };
        if !held.is_empty() {
            info!(
                count = held.len(),
                "addresses held by the previous agent wait for adoption"
            );
        }
        let (address_tx, address_events) = mpsc::unbounded_channel();
        if let Err(e) = AddressWatcher::spawn_for(&addresses, address_tx.clone()) {
            warn!(error = %e, "cannot read address notifications: a virtual address that disappears is not put back until its next renewal");
        }
        let macvlans = MacvlanManager::new(addresses.handle().clone());
        match macvlans.list_owned().await {
            Ok(stale) => {
                for link in stale {
                    if let Err(e) = macvlans.delete_link(&link.name).await {
                        warn!(interface = %link.name, error = %e, "cannot remove a virtual-MAC interface left behind");
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list virtual-MAC interfaces left behind"),
        }
        let (effects, effects_rx) = mpsc::unbounded_channel();
        spawn_effects(addresses.clone(), effects_rx, address_tx, announcer);
        let link_reader = LinkReader::spawn(&addresses);
        let (incoming_tx, incoming_rx) = mpsc::channel(4096);
        let stats = Arc::new(Stats::default());
        let engine = NodeEngine::new(
            node.clone(),
            held,
            stats.clone(),
            (Instant::now(), SystemTime::now()),
        );
        Driver {
            engine,
            addresses,
            macvlans,
            links: HashMap::new(),
            vmacs: HashMap::new(),
            incoming_tx,
            incoming_rx,
            effects,
            outputs: Vec::new(),
            encoded: HashMap::new(),
            queued_sends: HashMap::new(),
            observed: watch::Sender::new(Observed::default()),
            drain_buf: Vec::new(),
            stats,
            heartbeat: Arc::new(Heartbeat::default()),
            readiness: watch::Sender::new(EngineReadiness::default()),
            node,
            address_events,
            link_reader,
        }
    }

    /// Masters' addresses get this lifetime and the engine renews it (see
    /// [`NodeEngine::set_address_lifetime`]); `None` keeps them forever.
    pub fn with_address_lifetime(mut self, lifetime: Option<Duration>) -> Driver {
        self.engine.set_address_lifetime(lifetime);
        self
    }

    /// Instance states as they change (state, master, priority, faults).
    pub fn observe(&self) -> watch::Receiver<Observed> {
        self.observed.subscribe()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Stamped on every turn of [`Driver::run`]'s loop.
    pub fn heartbeat(&self) -> Arc<Heartbeat> {
        self.heartbeat.clone()
    }

    /// Whether a plan was applied and its sockets are open.
    pub fn readiness(&self) -> watch::Receiver<EngineReadiness> {
        self.readiness.subscribe()
    }

    /// Runs until a `Shutdown` command (or until every sender is gone, which also shuts down).
    pub async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        // A timerfd fires on the microsecond; tokio's sleep (whole milliseconds) is the
        // fallback should the timerfd be unavailable.
        let precise = match PreciseTimer::new() {
            Ok(t) => Some(t),
            Err(e) => {
                warn!(error = %e, "no timerfd; deadlines fall back to millisecond timers");
                None
            }
        };
        let far = || tokio::time::Instant::now() + Duration::from_secs(86_400);
        let sleep = tokio::time::sleep_until(far());
        tokio::pin!(sleep);
        let mut armed: Option<Instant> = None;
        let mut refresh = tokio::time::interval(LINK_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (reread_tx, mut reread_rx) = mpsc::channel(1);
        let mut refreshing = false;
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            self.heartbeat.beat();
            let next = self.engine.deadline();
            if next != armed {
                match &precise {
                    Some(timer) => {
                        if let Err(e) = timer.arm(next) {
                            warn!(error = %e, "cannot arm the timerfd");
                        }
                    }
                    None => sleep
                        .as_mut()
                        .reset(next.map(tokio::time::Instant::from_std).unwrap_or_else(far)),
                }
                armed = next;
            }
            let due = async {
                match &precise {
                    Some(timer) => {
                        let _ = timer.wait().await;
                    }
                    None => (&mut sleep).await,
                }
            };
            tokio::select! {
                biased;
                command = commands.recv() => match command {
                    Some(Command::Apply(instances)) => self.apply(instances).await,
                    Some(Command::Shutdown(done)) => {
                        self.stop(Input::Shutdown).await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Hold(hold, done)) => {
                        self.stop(Input::Hold(hold)).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.stop(Input::Shutdown).await;
                        return;
                    }
                },
                () = due, if next.is_some() => {
                    // After a stall the timer and the advertisement that should have reset
                    // it can both be pending: hear everything queued before acting on time.
                    self.drain_pending();
                    self.handle(Instant::now(), Input::Timer);
                    // The timerfd is one-shot: re-arm on the next turn even if the first
                    // deadline is unchanged (it was not due yet, e.g. a spurious wake-up).
                    armed = None;
                }
                Some(incoming) = self.incoming_rx.recv() => self.receive(incoming),
                Some(event) = self.address_events.recv() => self.address_event(event),
                _ = refresh.tick() => {
                    // The links are read by a task of their own, so that a slow answer
                    // (thousands of addresses to dump, or another process holding the
                    // kernel's rtnl lock for a big change) never holds this loop, and with
                    // it the advertisements, back.
                    if !refreshing {
                        refreshing = true;
                        let names: Vec<Arc<str>> = self
                            .engine
                            .requirements()
                            .into_iter()
                            .map(|r| r.interface)
                            .collect::<BTreeSet<_>>()
                            .into_iter()
                            .collect();
                        let addresses = self.addresses.clone();
                        let reader = self.link_reader.clone();
                        let tx = reread_tx.clone();
                        tokio::spawn(async move {
                            let read = match &reader {
                                Some(reader) => reader.read(names.clone()).await,
                                None => None,
                            };
                            let read = match read {
                                Some(read) => read,
                                None => read_all(&addresses, names).await,
                            };
                            let _ = tx.send(read).await;
                        });
                    }
                }
                Some(read) = reread_rx.recv() => {
                    refreshing = false;
                    self.refresh(read).await;
                }
                _ = heartbeat.tick() => {}
            }
        }
    }

    /// Feeds the engine one input and carries out what it asks for.
    fn handle(&mut self, now: Instant, input: Input) {
        let mut outputs = std::mem::take(&mut self.outputs);
        self.engine.handle(now, input, &mut outputs);
        for output in outputs.drain(..) {
            self.execute(output);
        }
        self.outputs = outputs;
        if self.engine.take_observed_change() {
            self.observed.send_replace(self.engine.observed().clone());
        }
    }

    fn receive(&mut self, incoming: Incoming) {
        self.handle(
            Instant::now(),
            Input::Advertisement {
                interface: incoming.interface,
                family: incoming.family,
                source: incoming.source,
                advertisement: incoming.advertisement,
            },
        );
    }

    fn address_event(&mut self, event: AddressEvent) {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let input = match event {
                AddressEvent::Removed { index, net } => {
                    // Whatever else is queued for this interface goes with it, so that a
                    // group that vanished at once (a flushed interface) is repaired in one
                    // batch.
                    let mut nets = vec![net];
                    while nets.len() < REMOVED_BATCH {
                        match self.address_events.try_recv() {
                            Ok(AddressEvent::Removed { index: i, net }) if i == index => {
                                nets.push(net)
                            }
                            Ok(event) => {
                                next = Some(event);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    Input::AddressesRemoved {
                        ifindex: index,
                        nets,
                    }
                }
                AddressEvent::Failed { index, net, error } => Input::AddressFailed {
                    ifindex: index,
                    net,
                    error,
                },
                AddressEvent::Lost => Input::AddressEventsLost,
            };
            self.handle(Instant::now(), input);
        }
    }

    async fn apply(&mut self, instances: Instances) {
        // Links of instances about to stop stay in the environment: their leaving needs them.
        let mut wanted = requirements(&instances);
        wanted.extend(self.engine.requirements());
        let env = self.prepare(&wanted, false).await;
        let missing_sockets = missing_sockets(&requirements(&instances), &env);
        self.handle(Instant::now(), Input::Apply { instances, env });
        self.close_unused();
        self.readiness.send_if_modified(|r| {
            let new = EngineReadiness {
                applied: true,
                missing_sockets,
            };
            std::mem::replace(r, new.clone()) != new
        });
    }

    /// Takes in the links as `read` (by [`read_facts`]), then sets up what they need.
    async fn refresh(&mut self, read: Vec<(Arc<str>, Result<LinkFacts, String>)>) {
        for (name, facts) in read {
            match facts {
                Ok(facts) => self.store_link(&name, facts),
                // A known link keeps its last facts through a failed re-read.
                Err(e) => debug!(interface = %name, error = %e, "cannot re-read interface"),
            }
        }
        let wanted = self.engine.requirements();
        let env = self.prepare(&wanted, false).await;
        let missing = missing_sockets(&wanted, &env);
        self.handle(Instant::now(), Input::Refresh(env));
        self.close_unused();
        self.readiness.send_if_modified(|r| {
            let changed = r.missing_sockets != missing;
            r.missing_sockets = missing;
            changed
        });
    }

    async fn stop(&mut self, input: Input) {
        let shutdown = matches!(input, Input::Shutdown);
        self.handle(Instant::now(), input);
        let (done, wait) = oneshot::channel();
        if self.effects.send(Effect::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
        if shutdown {
            info!(node = %self.node, "all instances stopped, addresses released");
        }
    }

    /// Reads the links the requirements name (known ones again only with `reread`) and sets
    /// up their sockets and virtual-MAC interfaces; what could not be done is in the result.
    async fn prepare(&mut self, wanted: &[Requirement], reread: bool) -> Environment {
        let mut env = Environment::default();
        let names: BTreeSet<&Arc<str>> = wanted.iter().map(|r| &r.interface).collect();
        for name in names {
            let facts = self.read_link(name, reread).await;
            env.links.insert(
                name.clone(),
                LinkEnv {
                    facts,
                    sockets: BTreeMap::new(),
                    vmacs: BTreeMap::new(),
                },
            );
        }
        for req in wanted {
            let Some(link) = env.links.get_mut(&req.interface) else {
                continue;
            };
            let Ok(facts) = link.facts else {
                continue;
            };
            let socket = self.ensure_socket(&req.interface, req.family);
            let socket_ok = socket.is_ok();
            link.sockets.insert(req.family, socket);
            let Some(primary) = facts.primary(req.family) else {
                continue;
            };
            if req.virtual_mac && socket_ok {
                let vmac = self.ensure_vmac(&facts, req, primary).await;
                link.vmacs.insert((req.family, req.vrid), vmac);
            }
        }
        env
    }

    async fn read_link(&mut self, name: &Arc<str>, reread: bool) -> Result<LinkFacts, String> {
        if !reread && let Some(link) = self.links.get(name) {
            return Ok(link.facts);
        }
        let read = match &self.link_reader {
            Some(reader) => reader
                .read(vec![name.clone()])
                .await
                .and_then(|mut read| read.pop())
                .map(|(_, facts)| facts),
            None => None,
        };
        let read = match read {
            Some(read) => read,
            None => read_facts(&self.addresses, name).await,
        };
        match read {
            Ok(facts) => {
                self.store_link(name, facts);
                Ok(facts)
            }
            // A known link keeps its last facts through a failed re-read.
            Err(e) => self.links.get(name).map(|l| l.facts).ok_or(e),
        }
    }

    /// Records what was read of a link: new, updated, or recreated (a new index).
    fn store_link(&mut self, name: &Arc<str>, facts: LinkFacts) {
        match self.links.get_mut(name) {
            Some(link) if link.facts.index == facts.index => link.facts = facts,
            _ => {
                // New, or recreated: sockets bound to the old index are useless, and the
                // kernel removed the old interface's macvlans with it.
                if let Some(old) = self.links.remove(name) {
                    self.vmacs.retain(|_, v| v.parent != old.facts.index);
                }
                self.links.insert(
                    name.clone(),
                    LinkIo {
                        facts,
                        sockets: HashMap::new(),
                        readers: Vec::new(),
                    },
                );
            }
        }
    }

    fn ensure_socket(&mut self, name: &Arc<str>, family: Family) -> Result<(), String> {
        let Some(link) = self.links.get_mut(name) else {
            return Err("interface vanished".into());
        };
        if link.sockets.contains_key(&family) {
            return Ok(());
        }
        let socket =
            Arc::new(VrrpSocket::open(name, link.facts.index, family).map_err(|e| e.to_string())?);
        link.readers.push(tokio::spawn(read_loop(
            name.clone(),
            family,
            socket.clone(),
            self.incoming_tx.clone(),
            self.stats.clone(),
        )));
        link.sockets.insert(family, socket);
        Ok(())
    }

    /// Creates (or adopts) an instance's virtual-MAC macvlan and its send socket. For IPv6
    /// the macvlan also gets the parent's link-local address, the advertisements' source.
    async fn ensure_vmac(
        &mut self,
        parent: &LinkFacts,
        req: &Requirement,
        primary: IpAddr,
    ) -> Result<VmacFacts, String> {
        let name: Arc<str> = Arc::from(vmac_name(parent.index, req.family, req.vrid).as_str());
        if let Some(vmac) = self.vmacs.get(&name) {
            return Ok(vmac.facts.clone());
        }
        let mac = virtual_mac(req.family, req.vrid);
        let index = self
            .macvlans
            .ensure_macvlan(parent.index, &name, mac)
            .await
            .map_err(|e| e.to_string())?;
        if let IpAddr::V6(ll) = primary {
            let net = IpNet::V6(ipnet::Ipv6Net::new(ll, 64).map_err(|e| e.to_string())?);
            self.addresses
                .add(index, net)
                .await
                .map_err(|e| e.to_string())?;
        }
        let socket =
            VrrpSocket::open_sender(&name, index, req.family).map_err(|e| e.to_string())?;
        let facts = VmacFacts { name, index, mac };
        self.vmacs.insert(
            facts.name.clone(),
            VmacIo {
                facts: facts.clone(),
                parent: parent.index,
                socket: Arc::new(socket),
            },
        );
        Ok(facts)
    }

    /// Closes the sockets of interfaces no instance uses any more.
    fn close_unused(&mut self) {
        let used = self.engine.interfaces();
        self.links.retain(|name, _| used.contains(name));
        let (links, vmacs) = (&self.links, &self.vmacs);
        self.encoded
            .retain(|(via, ..), _| links.contains_key(via) || vmacs.contains_key(via));
        self.queued_sends
            .retain(|(via, ..), _| links.contains_key(via) || vmacs.contains_key(via));
    }

    fn execute(&mut self, output: Output) {
        let effect = match output {
            Output::Send(transmit) => return self.send(&transmit),
            Output::AddAddresses { ifindex, nets } => Effect::Add {
                ifindex,
                nets,
                lifetime: self.engine.address_lifetime(),
            },
            Output::HoldAddresses {
                ifindex,
                nets,
                hold,
            } => Effect::Hold {
                ifindex,
                nets,
                hold,
            },
            Output::RenewAddresses {
                lifetime,
                addresses,
            } => Effect::Renew {
                lifetime,
                addresses,
            },
            Output::RemoveAddresses { ifindex, nets } => Effect::Remove { ifindex, nets },
            Output::SetLifetime {
                ifindex,
                nets,
                lifetime,
            } => Effect::Lifetime {
                ifindex,
                nets,
                lifetime,
            },
            Output::Announce {
                interface,
                ifindex,
                mac,
                addrs,
                source_v6,
            } => Effect::Announce {
                interface,
                ifindex,
                mac,
                addrs,
                source_v6,
            },
            Output::DeleteVmac { name } => {
                let index = self.vmacs.remove(&name).map(|v| v.facts.index);
                Effect::DeleteLink { name, index }
            }
            // Logged by the engine.
            Output::Transition { .. } => return,
        };
        let _ = self.effects.send(effect);
    }

    fn send(&mut self, transmit: &Transmit) {
        let socket = match &transmit.vmac {
            Some(name) => self.vmacs.get(name).map(|v| &v.socket),
            None => self
                .links
                .get(&transmit.interface)
                .and_then(|l| l.sockets.get(&transmit.family)),
        };
        let Some(socket) = socket.cloned() else {
            return;
        };
        let via = transmit
            .vmac
            .as_ref()
            .unwrap_or(&transmit.interface)
            .clone();
        // A preempting master's advert waits for its announcement (the effects task sends
        // it), and the instance's later adverts queue behind it until it went out.
        let instance = (via.clone(), transmit.family, transmit.advertisement.vrid);
        let queued = match self.queued_sends.get(&instance) {
            Some(pending) if pending.load(Ordering::Acquire) > 0 => Some(pending.clone()),
            _ if transmit.after_announcement => {
                Some(self.queued_sends.entry(instance).or_default().clone())
            }
            _ => None,
        };
        let mut packets = Vec::new();
        for &destination in transmit.destinations.iter() {
            let key = (
                via.clone(),
                transmit.family,
                transmit.advertisement.vrid,
                destination,
            );
            let fresh = self.encoded.get(&key).is_some_and(|e| {
                e.source == transmit.source
                    && e.checksum == transmit.checksum
                    && e.advertisement == transmit.advertisement
            });
            if !fresh {
                let mut bytes = Vec::with_capacity(transmit.advertisement.encoded_len());
                if let Err(e) = transmit.advertisement.encode_into(
                    transmit.source,
                    destination,
                    transmit.checksum,
                    &mut bytes,
                ) {
                    warn!(interface = %transmit.interface, vrid = transmit.advertisement.vrid, error = %e, "cannot encode advertisement");
                    return;
                }
                self.encoded.insert(
                    key.clone(),
                    Encoded {
                        source: transmit.source,
                        checksum: transmit.checksum,
                        advertisement: transmit.advertisement.clone(),
                        bytes,
                    },
                );
            }
            let bytes = &self.encoded[&key].bytes;
            if queued.is_some() {
                packets.push((destination, bytes.clone()));
            } else {
                send_advert(&socket, transmit.source, destination, bytes, &self.stats);
            }
        }
        if let Some(pending) = queued
            && !packets.is_empty()
        {
            pending.fetch_add(1, Ordering::AcqRel);
            let queued = QueuedAdverts {
                socket,
                source: transmit.source,
                packets,
                pending,
                stats: self.stats.clone(),
            };
            // The effects task is gone only when the driver stops: send it here instead.
            if let Err(mpsc::error::SendError(Effect::Send(queued))) =
                self.effects.send(Effect::Send(queued))
            {
                queued.send();
            }
        }
    }

    /// Handles every advertisement already queued, in the channel or in the sockets.
    fn drain_pending(&mut self) {
        while let Ok(incoming) = self.incoming_rx.try_recv() {
            self.receive(incoming);
        }
        let sockets: Vec<(Arc<str>, Family, Arc<VrrpSocket>)> = self
            .links
            .iter()
            .flat_map(|(name, l)| l.sockets.iter().map(|(f, s)| (name.clone(), *f, s.clone())))
            .collect();
        let mut buf = std::mem::take(&mut self.drain_buf);
        buf.resize(RECV_BUFFER, 0);
        for (interface, family, socket) in sockets {
            // Bounded, so a flood cannot hold the timers off for long.
            for _ in 0..1024 {
                let Some(received) = socket.try_recv(&mut buf) else {
                    break;
                };
                if let Some(incoming) = accept(&interface, family, received, &buf, &self.stats) {
                    self.receive(incoming);
                }
            }
        }
        self.drain_buf = buf;
    }
}

/// Reads one link's facts (index, MAC, primary addresses, subnets) from the kernel.
/// What [`read_facts`] says of each of `names`.
async fn read_all(addresses: &AddressManager, names: Vec<Arc<str>>) -> Vec<LinkRead> {
    let mut read = Vec::with_capacity(names.len());
    for name in names {
        let facts = read_facts(addresses, &name).await;
        read.push((name, facts));
    }
    read
}

/// A link's name and what reading it gave.
type LinkRead = (Arc<str>, Result<LinkFacts, String>);

/// Names to read, and where the reads go.
type LinkRequest = (Vec<Arc<str>>, oneshot::Sender<Vec<LinkRead>>);

/// Reads links (index, MAC, primary addresses, subnets) for the engine on a thread of its own
/// at normal priority, with its own netlink connection. A netlink request runs in the kernel
/// in the context of the thread that sends it, and link and address reads take the kernel's
/// rtnl lock; when a normal-priority holder of that lock (another process changing addresses,
/// or this agent's effects thread) is preempted by busy processes, a real-time engine thread
/// waiting for the lock would wait as long, its advertisements with it (a priority
/// inversion: 33 ms seen once in 10 minutes at 10 ms adverts with two CPU hogs).
#[derive(Clone)]
struct LinkReader {
    requests: mpsc::UnboundedSender<LinkRequest>,
}

impl LinkReader {
    /// The reader thread, or `None` (reads stay on the caller's thread) if it cannot start.
    fn spawn(addresses: &AddressManager) -> Option<LinkReader> {
        let (requests, mut rx) = mpsc::unbounded_channel::<LinkRequest>();
        let addresses = addresses.clone();
        let spawned = spawn_normal_priority(
            "vrrp-links",
            "links are read on the engine's thread",
            move || async move {
                let own = match addresses.reconnect() {
                    Ok(own) => own,
                    Err(e) => {
                        warn!(error = %e, "no netlink connection for the link reader; links are read on the engine's thread");
                        return;
                    }
                };
                while let Some((names, reply)) = rx.recv().await {
                    let _ = reply.send(read_all(&own, names).await);
                }
            },
        );
        match spawned {
            Ok(_) => Some(LinkReader { requests }),
            Err(e) => {
                warn!(error = %e, "cannot start the link reader thread; links are read on the engine's thread");
                None
            }
        }
    }

    /// Reads `names` on the reader's thread; `None` when that thread is gone (it could not
    /// connect), for the caller to read them itself.
    async fn read(&self, names: Vec<Arc<str>>) -> Option<Vec<LinkRead>> {
        let (reply, answer) = oneshot::channel();
        self.requests.send((names, reply)).ok()?;
        answer.await.ok()
    }
}

async fn read_facts(addresses: &AddressManager, name: &str) -> Result<LinkFacts, String> {
    let info = addresses.link(name).await.map_err(|e| e.to_string())?;
    let (subnet_v4, subnet_v6) = addresses.own_subnets(info.index).await.unwrap_or_default();
    let facts = LinkFacts {
        index: info.index,
        mac: info.mac,
        primary_v4: addresses.primary_ipv4(info.index).await.ok().flatten(),
        link_local_v6: addresses.link_local_v6(info.index).await.ok().flatten(),
        subnet_v4,
        subnet_v6,
    };
    Ok(facts)
}

/// The interfaces and families of `wanted` without an open socket, in words.
fn missing_sockets(wanted: &[Requirement], env: &Environment) -> Vec<String> {
    let needed: BTreeSet<(&Arc<str>, Family)> =
        wanted.iter().map(|r| (&r.interface, r.family)).collect();
    needed
        .into_iter()
        .filter_map(|(interface, family)| {
            let why = match env
                .links
                .get(interface)
                .map(|l| (&l.facts, l.sockets.get(&family)))
            {
                None => "not set up".to_owned(),
                Some((Err(e), _)) => e.clone(),
                Some((Ok(_), Some(Ok(())))) => return None,
                Some((Ok(_), Some(Err(e)))) => e.clone(),
                Some((Ok(_), None)) => "no socket".to_owned(),
            };
            Some(format!("{interface} {family}: {why}"))
        })
        .collect()
}

/// Reads one socket until aborted: checks TTL, decodes, drops our own packets.
async fn read_loop(
    interface: Arc<str>,
    family: Family,
    socket: Arc<VrrpSocket>,
    tx: mpsc::Sender<Incoming>,
    stats: Arc<Stats>,
) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let received = socket.recv(&mut buf).await;
        if let Some(incoming) = accept(&interface, family, received, &buf, &stats)
            && tx.send(incoming).await.is_err()
        {
            return;
        }
    }
}

/// Checks one received datagram (TTL, then the codec) and turns it into an `Incoming`.
fn accept(
    interface: &Arc<str>,
    family: Family,
    received: Result<Received, SocketError>,
    buf: &[u8],
    stats: &Stats,
) -> Option<Incoming> {
    let received = match received {
        Ok(r) => r,
        Err(e) => {
            stats.count_drop(DropReason::Decode);
            debug!(interface = %interface, error = %e, "receive error");
            return None;
        }
    };
    stats.received.fetch_add(1, Ordering::Relaxed);
    if received.ttl != 255 {
        stats.count_drop(DropReason::Ttl);
        debug!(interface = %interface, source = %received.source, ttl = received.ttl, "dropped advertisement: TTL is not 255");
        return None;
    }
    let message = &buf[received.offset..received.offset + received.len];
    match Advertisement::decode(message, received.source, received.destination) {
        Ok(decoded) => Some(Incoming {
            interface: interface.clone(),
            family,
            source: received.source,
            advertisement: decoded.advertisement,
        }),
        Err(e) => {
            stats.count_drop(DropReason::Decode);
            debug!(interface = %interface, source = %received.source, reason = e.metric_label(), error = %e, "dropped invalid VRRP packet");
            None
        }
    }
}

/// Runs `work` on a new thread `name` at normal priority (threads inherit the engine
/// thread's real-time class), in a current-thread runtime of its own; `without` says what
/// is lost should that runtime not start.
fn spawn_normal_priority<F, Fut>(name: &str, without: &'static str, work: F) -> std::io::Result<()>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let thread = name.to_owned();
    std::thread::Builder::new()
        .name(thread.clone())
        .spawn(move || {
            if let Err(e) = set_normal_priority() {
                debug!(%thread, error = %e, "keeps the engine's scheduling class");
            }
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime.block_on(work()),
                Err(e) => {
                    warn!(%thread, error = %e, "cannot start the thread's runtime; {without}")
                }
            }
        })
        .map(drop)
}

/// Runs [`run_effects`] on a thread of its own, with its own runtime and netlink connection,
/// at normal priority: a netlink request runs in the kernel in the context of the thread
/// that sends it, and installing or removing thousands of addresses takes the kernel
/// hundreds of milliseconds; on the engine's thread that would hold the advertisements
/// back. Falls back to a task on the current runtime should the thread not start.
fn spawn_effects(
    addresses: AddressManager,
    rx: mpsc::UnboundedReceiver<Effect>,
    failures: mpsc::UnboundedSender<AddressEvent>,
    announcer: Announcer,
) {
    let (rx_slot, addresses_slot, failures_slot) = (
        Arc::new(std::sync::Mutex::new(Some(rx))),
        addresses.clone(),
        failures.clone(),
    );
    let taken = rx_slot.clone();
    let spawned = spawn_normal_priority(
        "vrrp-effects",
        "address changes are not carried out",
        move || async move {
            let Some(rx) = taken.lock().ok().and_then(|mut rx| rx.take()) else {
                return;
            };
            let addresses = match addresses_slot.reconnect() {
                Ok(own) => own,
                Err(e) => {
                    warn!(error = %e, "no netlink connection of the effects thread's own; sharing the engine's");
                    addresses_slot
                }
            };
            let macvlans = MacvlanManager::new(addresses.handle().clone());
            run_effects(addresses, macvlans, rx, failures_slot, announcer).await;
        },
    );
    if let Err(e) = spawned {
        warn!(error = %e, "cannot start the effects thread; address changes run on the engine's");
        if let Some(rx) = rx_slot.lock().ok().and_then(|mut rx| rx.take()) {
            let macvlans = MacvlanManager::new(addresses.handle().clone());
            tokio::spawn(run_effects(addresses, macvlans, rx, failures, announcer));
        }
    }
}

/// The announcement bursts whose later rounds still run, per interface index.
#[derive(Default)]
struct Bursts(HashMap<u32, Vec<Arc<std::sync::atomic::AtomicBool>>>);

impl Bursts {
    /// A cancel flag for a new burst on `ifindex` (finished bursts' flags are dropped).
    fn track(&mut self, ifindex: u32) -> Arc<std::sync::atomic::AtomicBool> {
        let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flags = self.0.entry(ifindex).or_default();
        flags.retain(|f| Arc::strong_count(f) > 1);
        flags.push(flag.clone());
        flag
    }

    fn cancel_all(&mut self) {
        let indexes: Vec<u32> = self.0.keys().copied().collect();
        for index in indexes {
            self.cancel(index);
        }
    }

    fn cancel(&mut self, ifindex: u32) {
        for flag in self.0.remove(&ifindex).unwrap_or_default() {
            flag.store(true, Ordering::Relaxed);
        }
    }
}

/// Executes address changes and announcements in order.
async fn run_effects(
    addresses: AddressManager,
    macvlans: MacvlanManager,
    mut rx: mpsc::UnboundedReceiver<Effect>,
    failures: mpsc::UnboundedSender<AddressEvent>,
    announcer: Announcer,
) {
    let mut record_error = false;
    let mut bursts = Bursts::default();
    while let Some(effect) = rx.recv().await {
        match effect {
            Effect::Add {
                ifindex,
                nets,
                lifetime,
            } => {
                for (net, e) in addresses.add_all(ifindex, &nets, lifetime).await {
                    warn!(address = %net, error = %e, "cannot add virtual address");
                    let _ = failures.send(AddressEvent::Failed {
                        index: ifindex,
                        net,
                        error: e.to_string(),
                    });
                }
            }
            Effect::Renew {
                lifetime,
                addresses: wanted,
            } => {
                let manager = addresses.clone();
                let result =
                    tokio::task::spawn_blocking(move || manager.renew(&wanted, lifetime)).await;
                match result {
                    Ok(Ok(report)) => {
                        for (index, net, errno) in report.failed {
                            let error = std::io::Error::from_raw_os_error(errno);
                            warn!(address = %net, error = %error, "cannot renew virtual address");
                            let _ = failures.send(AddressEvent::Failed {
                                index,
                                net,
                                error: error.to_string(),
                            });
                        }
                    }
                    Ok(Err(e)) => warn!(error = %e, "cannot renew virtual addresses"),
                    Err(e) => warn!(error = %e, "address renewal task failed"),
                }
            }
            Effect::Hold {
                ifindex,
                nets,
                hold,
            } => {
                for (net, e) in addresses.hold_all(ifindex, &nets, hold).await {
                    warn!(address = %net, error = %e, "cannot hold virtual address for the next agent");
                }
            }
            Effect::Remove { ifindex, nets } => {
                // What is left of a burst there would announce addresses leaving.
                bursts.cancel(ifindex);
                for (net, e) in addresses.remove_all(ifindex, &nets).await {
                    warn!(address = %net, error = %e, "cannot remove virtual address");
                }
            }
            Effect::Announce {
                interface,
                ifindex,
                mac,
                addrs,
                source_v6,
            } => {
                // The first round before the next effect, the later ones on their own.
                let name = interface.clone();
                let result = tokio::task::spawn_blocking(move || {
                    announcer.start(&name, mac, &addrs, source_v6)
                })
                .await;
                match result {
                    Ok(Ok(Some(burst))) => {
                        let cancel = bursts.track(ifindex);
                        tokio::task::spawn_blocking(move || {
                            if let Err(e) = burst.finish(&cancel) {
                                warn!(interface = %interface, error = %e, "announcement failed");
                            }
                        });
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => warn!(interface = %interface, error = %e, "announcement failed"),
                    Err(e) => warn!(interface = %interface, error = %e, "announcement task failed"),
                }
            }
            Effect::Lifetime {
                ifindex,
                nets,
                lifetime,
            } => {
                for (net, e) in addresses.set_lifetime_all(ifindex, &nets, lifetime).await {
                    warn!(address = %net, error = %e, "cannot set the lifetime of a virtual address");
                }
            }
            Effect::DeleteLink { name, index } => {
                if let Some(index) = index {
                    bursts.cancel(index);
                }
                if let Err(e) = macvlans.delete_link(&name).await {
                    warn!(interface = %name, error = %e, "cannot remove virtual-MAC interface");
                }
                if let Some(index) = index {
                    addresses.forget_interface(index);
                }
            }
            Effect::Send(queued) => queued.send(),
            Effect::Barrier(done) => {
                // The agent stops: what is left of the bursts would only delay its exit.
                bursts.cancel_all();
                // Everything before the barrier is done, its record included.
                if let Err(e) = addresses.flush_record() {
                    warn!(error = %e, "cannot record the agent's addresses");
                }
                let _ = done.send(());
            }
        }
        // The record follows every change of our addresses (a write only when it changed).
        match addresses.flush_record() {
            Ok(()) => record_error = false,
            Err(e) if !record_error => {
                warn!(error = %e, "cannot record the agent's addresses; a restarted agent may not recognise them");
                record_error = true;
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::vocab::{ChecksumMode, Version};

    const SOURCE: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    /// An encoded advertisement as a socket would hand it over, after `offset` bytes.
    fn datagram(ttl: u8, offset: usize) -> (Received, Vec<u8>) {
        let advertisement = Advertisement {
            version: Version::V3,
            vrid: 7,
            priority: 200,
            interval: 10,
            addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100))],
        };
        let group = crate::vrrp::group(Family::V4);
        let mut buf = vec![0u8; offset];
        advertisement
            .encode_into(SOURCE, group, ChecksumMode::PseudoHeader, &mut buf)
            .unwrap();
        let received = Received {
            source: SOURCE,
            destination: group,
            ttl,
            offset,
            len: buf.len() - offset,
        };
        (received, buf)
    }

    fn dropped(stats: &Stats, label: &str) -> u64 {
        stats
            .dropped()
            .into_iter()
            .find(|(l, _)| *l == label)
            .unwrap()
            .1
    }

    #[test]
    fn accepted_datagrams_are_decoded_from_their_offset() {
        let stats = Stats::default();
        let (received, buf) = datagram(255, 20);
        let incoming = accept(&Arc::from("eth0"), Family::V4, Ok(received), &buf, &stats).unwrap();
        assert_eq!(&*incoming.interface, "eth0");
        assert_eq!(incoming.source, SOURCE);
        assert_eq!(incoming.advertisement.vrid, 7);
        assert_eq!(incoming.advertisement.priority, 200);
        assert_eq!(stats.received.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_datagram_that_crossed_a_router_is_dropped_before_decoding() {
        let stats = Stats::default();
        let (received, buf) = datagram(254, 0);
        assert!(accept(&Arc::from("eth0"), Family::V4, Ok(received), &buf, &stats).is_none());
        assert_eq!(dropped(&stats, "ttl"), 1);
        assert_eq!(dropped(&stats, "decode"), 0);
    }

    #[test]
    fn a_corrupt_datagram_or_a_receive_error_counts_as_a_decode_drop() {
        let stats = Stats::default();
        let (received, mut buf) = datagram(255, 0);
        *buf.last_mut().unwrap() ^= 0xff;
        assert!(accept(&Arc::from("eth0"), Family::V4, Ok(received), &buf, &stats).is_none());
        let error = SocketError::Receive(std::io::Error::other("boom"));
        assert!(accept(&Arc::from("eth0"), Family::V4, Err(error), &buf, &stats).is_none());
        assert_eq!(dropped(&stats, "decode"), 2);
        assert_eq!(stats.received.load(Ordering::Relaxed), 1);
    }
}
