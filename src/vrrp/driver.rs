//! The VRRP driver: owns the sockets, the timers and the clock, feeds the sans-IO
//! [`Instance`]s and executes their outputs.
//!
//! One task (the engine) runs every instance of the node: one timer structure (a sorted set
//! of deadlines) instead of a task per VIP, so thousands of instances cost one wake-up per
//! deadline. One reader task per interface and family decodes packets and hands them over.
//! Address changes and announcements run in order on a separate effects task so that a slow
//! netlink call never delays an advertisement.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::Family;
use super::instance::{Config, Input, Instance, Output, State};
use super::packet::{Advertisement, DecodeError, virtual_mac};
use super::socket::{PreciseTimer, VrrpSocket, group};
use crate::dataplane::addr::AddressManager;
use crate::dataplane::link::{MacvlanManager, vmac_name};
use crate::model::{Desired, InstanceKey, InstanceSpec};

/// How often links are re-read (index, MAC, primary address) and instances that could not
/// start (missing interface or address) are retried.
const LINK_REFRESH: Duration = Duration::from_secs(2);
/// Timer lateness treated as "on time".
const TIMER_SLACK: Duration = Duration::from_millis(5);
/// Largest VRRP datagram we read: 20-byte IPv4 header (60 with options) + 8 + 255 × 16.
const RECV_BUFFER: usize = 4200;

/// Why a received packet was dropped (a bounded label set for counters and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Ttl,
    Decode,
    UnknownVrid,
    VersionMismatch,
    UnexpectedSource,
    Own,
}

impl DropReason {
    const ALL: [DropReason; 6] = [
        DropReason::Ttl,
        DropReason::Decode,
        DropReason::UnknownVrid,
        DropReason::VersionMismatch,
        DropReason::UnexpectedSource,
        DropReason::Own,
    ];

    pub fn metric_label(self) -> &'static str {
        match self {
            DropReason::Ttl => "ttl",
            DropReason::Decode => "decode",
            DropReason::UnknownVrid => "unknown_vrid",
            DropReason::VersionMismatch => "version_mismatch",
            DropReason::UnexpectedSource => "unexpected_source",
            DropReason::Own => "own",
        }
    }
}

/// Node-wide packet counters, shared with readers (and later the metrics endpoint).
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    dropped: [AtomicU64; 6],
}

impl Stats {
    fn count_drop(&self, why: DropReason) {
        self.dropped[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Drop counts by label.
    pub fn dropped(&self) -> Vec<(&'static str, u64)> {
        DropReason::ALL
            .iter()
            .map(|d| {
                (
                    d.metric_label(),
                    self.dropped[*d as usize].load(Ordering::Relaxed),
                )
            })
            .collect()
    }
}

/// What the engine reports about each instance, for status and events.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Observed {
    /// Keyed by (name of the instance's first VirtualIP, family); `members` lists them all.
    pub instances: BTreeMap<(String, Family), InstanceStatus>,
}

/// One instance as this node sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceStatus {
    /// The VirtualIPs this instance serves.
    pub members: Arc<[String]>,
    pub interface: String,
    pub vrid: u8,
    pub state: State,
    pub priority: u8,
    /// The current master's address (ours when Master), as learned from advertisements.
    pub master: Option<IpAddr>,
    /// When this node last changed state for this instance.
    pub since: SystemTime,
    /// Why, in words (`Reason`'s display), and as a bounded code.
    pub reason: String,
    pub reason_code: &'static str,
    /// Set while the instance cannot run (interface or its address missing).
    pub fault: Option<String>,
}

/// Commands to the engine.
pub enum Command {
    /// Converge to this desired state.
    Apply(Desired),
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
        nets: Vec<IpNet>,
    },
    Remove {
        ifindex: u32,
        nets: Vec<IpNet>,
    },
    Announce {
        interface: Arc<str>,
        mac: [u8; 6],
        addrs: Vec<IpAddr>,
        source_v6: Option<Ipv6Addr>,
    },
    DeleteLink {
        name: Arc<str>,
    },
    /// Set (or clear, with `None`) the valid lifetime of our addresses.
    Lifetime {
        ifindex: u32,
        nets: Vec<IpNet>,
        lifetime: Option<Duration>,
    },
    Barrier(oneshot::Sender<()>),
}

/// An interface with instances on it.
struct Link {
    name: Arc<str>,
    index: u32,
    mac: [u8; 6],
    primary_v4: Option<Ipv4Addr>,
    link_local_v6: Option<Ipv6Addr>,
    sockets: HashMap<Family, Arc<VrrpSocket>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl std::ops::Drop for Link {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

impl Link {
    fn primary(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.primary_v4.map(IpAddr::V4),
            Family::V6 => self.link_local_v6.map(IpAddr::V6),
        }
    }
}

type SlotKey = (Arc<str>, InstanceKey);

struct Slot {
    spec: InstanceSpec,
    /// `None` while the instance cannot run (interface or its address missing).
    instance: Option<Instance>,
    armed: Option<Instant>,
    /// The macvlan holding the addresses when `spec.virtual_mac` is set.
    vmac: Option<Vmac>,
}

/// A virtual-MAC macvlan: the addresses, announcements and advertisements of one instance go
/// through it, so they carry 00:00:5e:00:0{1,2}:VRID.
struct Vmac {
    name: Arc<str>,
    index: u32,
    mac: [u8; 6],
    socket: Arc<VrrpSocket>,
}

/// The engine: every VRRP instance of this node.
pub struct Engine {
    addresses: AddressManager,
    macvlans: MacvlanManager,
    links: HashMap<Arc<str>, Link>,
    slots: HashMap<SlotKey, Slot>,
    timers: BTreeSet<(Instant, SlotKey)>,
    incoming_tx: mpsc::Sender<Incoming>,
    incoming_rx: mpsc::Receiver<Incoming>,
    io: Io,
    outputs: Vec<Output>,
    observed: watch::Sender<Observed>,
    drain_buf: Vec<u8>,
    /// Addresses a restarting predecessor held for us, until the first plan adopts them.
    held: HashSet<(u32, IpNet)>,
}

impl Engine {
    /// Creates the engine and its effects task. Removes addresses a crashed predecessor left
    /// behind (marked as ours) before anything starts.
    pub async fn start(node: String, addresses: AddressManager) -> Engine {
        // Addresses a restarting predecessor held (finite lifetime) wait for adoption; all
        // other marked addresses are crash leftovers.
        let held: HashSet<(u32, IpNet)> = match addresses.list_held().await {
            Ok(held) => held.into_iter().collect(),
            Err(e) => {
                warn!(error = %e, "cannot list addresses held by a previous agent");
                HashSet::new()
            }
        };
        if !held.is_empty() {
            info!(
                count = held.len(),
                "addresses held by the previous agent wait for adoption"
            );
        }
        match addresses.remove_all_owned_except(&held).await {
            Ok(removed) if !removed.is_empty() => {
                info!(
                    count = removed.len(),
                    "removed addresses left behind by a previous agent"
                )
            }
            Ok(_) => {}
            Err(e) => warn!(error = %e, "could not clean up addresses left behind"),
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
        tokio::spawn(run_effects(addresses.clone(), macvlans.clone(), effects_rx));
        let (incoming_tx, incoming_rx) = mpsc::channel(4096);
        Engine {
            addresses,
            macvlans,
            links: HashMap::new(),
            slots: HashMap::new(),
            timers: BTreeSet::new(),
            incoming_tx,
            incoming_rx,
            io: Io {
                node,
                effects,
                encode_buf: Vec::with_capacity(1500),
                stats: Arc::new(Stats::default()),
            },
            outputs: Vec::new(),
            observed: watch::Sender::new(Observed::default()),
            drain_buf: Vec::new(),
            held,
        }
    }

    /// Instance states as they change (state, master, priority, faults).
    pub fn observe(&self) -> watch::Receiver<Observed> {
        self.observed.subscribe()
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.io.stats.clone()
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
        loop {
            let next = self.timers.first().map(|(t, _)| *t);
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
                    Some(Command::Apply(desired)) => self.apply(desired).await,
                    Some(Command::Shutdown(done)) => {
                        self.shutdown().await;
                        let _ = done.send(());
                        return;
                    }
                    Some(Command::Hold(hold, done)) => {
                        self.hold(hold).await;
                        let _ = done.send(());
                        return;
                    }
                    None => {
                        self.shutdown().await;
                        return;
                    }
                },
                () = due, if next.is_some() => {
                    // After a stall the timer and the advertisement that should have reset
                    // it can both be pending: hear everything queued before acting on time.
                    self.drain_pending();
                    self.fire_due(Instant::now());
                    // The timerfd is one-shot: re-arm on the next turn even if the first
                    // deadline is unchanged (it was not due yet, e.g. a spurious wake-up).
                    armed = None;
                }
                Some(incoming) = self.incoming_rx.recv() => self.receive(incoming),
                _ = refresh.tick() => self.refresh_links().await,
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
            .values()
            .flat_map(|l| {
                l.sockets
                    .iter()
                    .map(|(f, s)| (l.name.clone(), *f, s.clone()))
            })
            .collect();
        let mut buf = std::mem::take(&mut self.drain_buf);
        buf.resize(RECV_BUFFER, 0);
        for (interface, family, socket) in sockets {
            // Bounded, so a flood cannot hold the timers off for long.
            for _ in 0..1024 {
                let Some(received) = socket.try_recv(&mut buf) else {
                    break;
                };
                if let Some(incoming) = accept(&interface, family, received, &buf, &self.io.stats) {
                    self.receive(incoming);
                }
            }
        }
        self.drain_buf = buf;
    }

    fn fire_due(&mut self, now: Instant) {
        while let Some((deadline, key)) = self.timers.first().cloned() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.armed = None;
            }
            // Hand the instance its deadline rather than the (slightly later) wake-up time, so
            // advertisement intervals do not drift by the timer latency; after a real stall the
            // wake-up time is used so that no burst of catch-up advertisements follows.
            let at = if now - deadline < TIMER_SLACK {
                deadline
            } else {
                now
            };
            self.handle(&key, at, Input::Timer);
        }
    }

    fn receive(&mut self, incoming: Incoming) {
        let key: SlotKey = (
            incoming.interface.clone(),
            InstanceKey {
                family: incoming.family,
                vrid: incoming.advertisement.vrid,
            },
        );
        let own = self
            .links
            .get(&incoming.interface)
            .and_then(|l| l.primary(incoming.family));
        if own == Some(incoming.source) {
            self.io.stats.count_drop(DropReason::Own);
            return;
        }
        let Some(slot) = self.slots.get(&key) else {
            self.io.stats.count_drop(DropReason::UnknownVrid);
            debug!(interface = %incoming.interface, vrid = incoming.advertisement.vrid, source = %incoming.source, "dropped advertisement: VRID not configured");
            return;
        };
        if slot.spec.version != incoming.advertisement.version {
            self.io.stats.count_drop(DropReason::VersionMismatch);
            debug!(vip = %slot.spec.resource, source = %incoming.source, "dropped advertisement: version {} but configured {}", incoming.advertisement.version, slot.spec.version);
            return;
        }
        if !slot.spec.unicast_peers.is_empty()
            && !slot.spec.unicast_peers.contains(&incoming.source)
        {
            self.io.stats.count_drop(DropReason::UnexpectedSource);
            debug!(vip = %slot.spec.resource, source = %incoming.source, "dropped advertisement: source is not a configured unicast peer");
            return;
        }
        self.handle(
            &key,
            Instant::now(),
            Input::Advertisement {
                source: incoming.source,
                advertisement: incoming.advertisement,
            },
        );
    }

    /// Feeds one input to one instance and executes what it asks for.
    fn handle(&mut self, key: &SlotKey, now: Instant, input: Input) {
        let Engine {
            slots,
            links,
            timers,
            io,
            outputs,
            observed,
            ..
        } = self;
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        let Some(instance) = slot.instance.as_mut() else {
            return;
        };
        outputs.clear();
        instance.handle(now, input, outputs);
        let deadline = instance.deadline();
        if slot.armed != deadline {
            if let Some(old) = slot.armed.take() {
                timers.remove(&(old, key.clone()));
            }
            if let Some(new) = deadline {
                timers.insert((new, key.clone()));
            }
            slot.armed = deadline;
        }
        let priority = instance.config().priority;
        let transition = outputs.iter().rev().find_map(|o| match o {
            Output::Transition { reason, .. } => Some(*reason),
            _ => None,
        });
        let (state, master) = (instance.state(), instance.master());
        observed.send_if_modified(|o| {
            let key = (slot.spec.resource.clone(), slot.spec.family);
            let entry = o.instances.get_mut(&key);
            match (entry, transition) {
                (Some(e), None)
                    if e.state == state
                        && e.master == master
                        && e.priority == priority
                        && e.fault.is_none()
                        && *e.members == *slot.spec.members =>
                {
                    false
                }
                (Some(e), None) => {
                    if *e.members != *slot.spec.members {
                        e.members = slot.spec.members.clone().into();
                    }
                    e.state = state;
                    e.master = master;
                    e.priority = priority;
                    e.fault = None;
                    true
                }
                (_, reason) => {
                    o.instances.insert(
                        key,
                        InstanceStatus {
                            members: slot.spec.members.clone().into(),
                            interface: slot.spec.interface.clone(),
                            vrid: slot.spec.vrid,
                            state,
                            priority,
                            master,
                            since: SystemTime::now(),
                            reason: reason.map(|r| r.to_string()).unwrap_or_default(),
                            reason_code: reason.map_or("", |r| r.code()),
                            fault: None,
                        },
                    );
                    true
                }
            }
        });
        if let Some(link) = links.get(&key.0) {
            for output in outputs.drain(..) {
                io.execute(link, slot.vmac.as_ref(), &slot.spec, priority, output);
            }
        }
    }

    /// Records an instance that cannot run, or forgets one that is gone.
    fn observe_fault(&mut self, spec: &InstanceSpec, fault: Option<String>) {
        let key = (spec.resource.clone(), spec.family);
        self.observed.send_if_modified(|o| match fault {
            None => o.instances.remove(&key).is_some(),
            Some(f) => {
                if o.instances
                    .get(&key)
                    .is_some_and(|e| e.fault.as_ref() == Some(&f))
                {
                    return false;
                }
                o.instances.insert(
                    key,
                    InstanceStatus {
                        members: spec.members.clone().into(),
                        interface: spec.interface.clone(),
                        vrid: spec.vrid,
                        state: State::Initialize,
                        priority: spec.priority,
                        master: None,
                        since: SystemTime::now(),
                        reason: f.clone(),
                        reason_code: "fault",
                        fault: Some(f),
                    },
                );
                true
            }
        });
    }

    /// Converges the running instances to `desired` without disturbing unchanged ones.
    async fn apply(&mut self, desired: Desired) {
        let now = Instant::now();
        let mut wanted: HashMap<SlotKey, InstanceSpec> = HashMap::new();
        for (interface, instances) in desired.instances {
            let interface: Arc<str> = self
                .links
                .get_key_value(interface.as_str())
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(interface.as_str()));
            for (key, spec) in instances {
                wanted.insert((interface.clone(), key), spec);
            }
        }

        let gone: Vec<SlotKey> = self
            .slots
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.stop(&key, now);
        }

        for (key, spec) in wanted {
            match self.slots.get(&key) {
                Some(slot) if slot.spec == spec => {}
                Some(slot) if slot.spec.version != spec.version || slot.instance.is_none() => {
                    self.stop(&key, now);
                    self.begin(key, spec, now).await;
                }
                Some(slot) => {
                    let only_priority = InstanceSpec {
                        priority: spec.priority,
                        priority_reasons: spec.priority_reasons.clone(),
                        ..slot.spec.clone()
                    } == spec;
                    let input = if only_priority {
                        Input::SetPriority(spec.priority)
                    } else {
                        let primary = self.links.get(&key.0).and_then(|l| l.primary(spec.family));
                        match primary {
                            Some(p) => Input::Reconfigure(instance_config(&spec, p)),
                            None => continue,
                        }
                    };
                    info!(vip = %spec.resource, interface = %key.0, vrid = spec.vrid, priority = spec.priority, "configuration changed");
                    if let Some(slot) = self.slots.get_mut(&key) {
                        slot.spec = spec;
                    }
                    self.handle(&key, now, input);
                }
                None => self.begin(key, spec, now).await,
            }
        }

        if !self.held.is_empty() {
            // Held for a resource this node no longer runs: release now rather than at expiry.
            let mut by_link: HashMap<u32, Vec<IpNet>> = HashMap::new();
            for (index, net) in self.held.drain() {
                by_link.entry(index).or_default().push(net);
            }
            for (ifindex, nets) in by_link {
                let _ = self.io.effects.send(Effect::Remove { ifindex, nets });
            }
        }
        let used: HashSet<Arc<str>> = self.slots.keys().map(|(i, _)| i.clone()).collect();
        self.links.retain(|name, _| used.contains(name));
    }

    /// Starts one instance (or parks it when its interface is not usable yet).
    async fn begin(&mut self, key: SlotKey, spec: InstanceSpec, now: Instant) {
        let mut fault = None;
        let primary = match self.ensure_link(&key.0, spec.family).await {
            Ok(link) => link.primary(spec.family),
            Err(e) => {
                warn!(vip = %spec.resource, interface = %key.0, error = %e, "cannot run VRRP on this interface yet; retrying");
                fault = Some(format!("interface {}: {e}", key.0));
                None
            }
        };
        let mut vmac = None;
        let primary = match (primary, spec.virtual_mac) {
            (Some(p), true) => match self.ensure_vmac(&key.0, &spec, p).await {
                Ok(v) => {
                    vmac = Some(v);
                    Some(p)
                }
                Err(e) => {
                    warn!(vip = %spec.resource, interface = %key.0, error = %e, "cannot set up the virtual MAC; retrying");
                    fault = Some(format!("virtual MAC: {e}"));
                    None
                }
            },
            (p, _) => p,
        };
        let instance = match primary {
            Some(p) => Some(Instance::new(instance_config(&spec, p))),
            None if spec.virtual_mac && self.links.contains_key(&key.0) => None,
            None => {
                let what = if spec.family == Family::V4 {
                    "IPv4"
                } else {
                    "IPv6 link-local"
                };
                warn!(vip = %spec.resource, interface = %key.0, family = %spec.family, "interface has no usable {what} address; instance waits");
                fault.get_or_insert_with(|| {
                    format!("interface {} has no usable {what} address", key.0)
                });
                None
            }
        };
        let started = instance.is_some();
        if !started {
            self.observe_fault(&spec, fault);
        }
        self.slots.insert(
            key.clone(),
            Slot {
                spec,
                instance,
                armed: None,
                vmac,
            },
        );
        if started {
            let ifindex = self.links.get(&key.0).map(|l| l.index);
            let adopt = match (ifindex, self.slots.get(&key)) {
                (Some(index), Some(slot)) if slot.vmac.is_none() => slot
                    .spec
                    .addresses
                    .iter()
                    .all(|a| self.held.contains(&(index, *a))),
                _ => false,
            };
            if adopt && let (Some(ifindex), Some(slot)) = (ifindex, self.slots.get(&key)) {
                let nets = slot.spec.addresses.clone();
                for net in &nets {
                    self.held.remove(&(ifindex, *net));
                }
                let _ = self.io.effects.send(Effect::Lifetime {
                    ifindex,
                    nets,
                    lifetime: None,
                });
                self.handle(&key, now, Input::Adopt);
            } else {
                self.handle(&key, now, Input::Startup);
            }
        }
    }

    /// Stops every instance for a restart: masters of VRRPv3 instances (without a virtual
    /// MAC) keep their addresses for `hold` and tell the backups to wait; the rest leave as
    /// on shutdown.
    async fn hold(&mut self, hold: Duration) {
        let now = Instant::now();
        let keys: Vec<SlotKey> = self.slots.keys().cloned().collect();
        let mut held = 0;
        for key in keys {
            let Some(slot) = self.slots.get(&key) else {
                continue;
            };
            let holds = slot.vmac.is_none()
                && slot.spec.version == super::Version::V3
                && slot
                    .instance
                    .as_ref()
                    .is_some_and(|i| i.state() == State::Master);
            if !holds {
                self.stop(&key, now);
                continue;
            }
            let nets = slot.spec.addresses.clone();
            let ifindex = self.links.get(&key.0).map(|l| l.index);
            self.handle(&key, now, Input::Hold(hold));
            if let Some(ifindex) = ifindex {
                held += nets.len();
                let _ = self.io.effects.send(Effect::Lifetime {
                    ifindex,
                    nets,
                    lifetime: Some(hold),
                });
            }
            if let Some(slot) = self.slots.remove(&key)
                && let Some(at) = slot.armed
            {
                self.timers.remove(&(at, key.clone()));
            }
        }
        let (done, wait) = oneshot::channel();
        if self.io.effects.send(Effect::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
        info!(node = %self.io.node, addresses = held, hold = ?hold, "stopped for a restart; addresses held for the next agent");
    }

    fn stop(&mut self, key: &SlotKey, now: Instant) {
        self.handle(key, now, Input::Shutdown);
        if let Some(slot) = self.slots.remove(key) {
            self.observe_fault(&slot.spec, None);
            if let Some(at) = slot.armed {
                self.timers.remove(&(at, key.clone()));
            }
            if let Some(vmac) = slot.vmac {
                // Queued behind the address removal of the shutdown above.
                let _ = self.io.effects.send(Effect::DeleteLink { name: vmac.name });
            }
        }
    }

    async fn ensure_link(&mut self, name: &Arc<str>, family: Family) -> Result<&Link, String> {
        if !self.links.contains_key(name) {
            let info = self.addresses.link(name).await.map_err(|e| e.to_string())?;
            let link = Link {
                name: name.clone(),
                index: info.index,
                mac: info.mac,
                primary_v4: self.addresses.primary_ipv4(info.index).await.ok().flatten(),
                link_local_v6: self
                    .addresses
                    .link_local_v6(info.index)
                    .await
                    .ok()
                    .flatten(),
                sockets: HashMap::new(),
                readers: Vec::new(),
            };
            self.links.insert(name.clone(), link);
        }
        let link = self.links.get_mut(name).expect("inserted above");
        if !link.sockets.contains_key(&family) {
            let socket =
                Arc::new(VrrpSocket::open(name, link.index, family).map_err(|e| e.to_string())?);
            link.readers.push(tokio::spawn(read_loop(
                name.clone(),
                family,
                socket.clone(),
                self.incoming_tx.clone(),
                self.io.stats.clone(),
            )));
            link.sockets.insert(family, socket);
        }
        Ok(link)
    }

    /// Creates (or adopts) the instance's virtual-MAC macvlan and its send socket. For IPv6
    /// the macvlan also gets the parent's link-local address, the advertisements' source.
    async fn ensure_vmac(
        &self,
        interface: &Arc<str>,
        spec: &InstanceSpec,
        primary: IpAddr,
    ) -> Result<Vmac, String> {
        let link = self.links.get(interface).ok_or("interface vanished")?;
        let name = vmac_name(link.index, spec.family, spec.vrid);
        let mac = virtual_mac(spec.family, spec.vrid);
        let index = self
            .macvlans
            .ensure_macvlan(link.index, &name, mac)
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
            VrrpSocket::open_sender(&name, index, spec.family).map_err(|e| e.to_string())?;
        Ok(Vmac {
            name: Arc::from(name.as_str()),
            index,
            mac,
            socket: Arc::new(socket),
        })
    }

    /// Re-reads every link: a recreated interface gets new sockets and its instances start
    /// over; a changed primary address is handed to the instances of that family; instances
    /// parked because their interface was unusable are retried.
    async fn refresh_links(&mut self) {
        let now = Instant::now();
        let names: Vec<Arc<str>> = self.links.keys().cloned().collect();
        for name in names {
            let Ok(info) = self.addresses.link(&name).await else {
                continue;
            };
            let v4 = self.addresses.primary_ipv4(info.index).await.ok().flatten();
            let v6 = self
                .addresses
                .link_local_v6(info.index)
                .await
                .ok()
                .flatten();
            let on_link: Vec<SlotKey> = self
                .slots
                .keys()
                .filter(|(i, _)| *i == name)
                .cloned()
                .collect();
            let Some(link) = self.links.get_mut(&name) else {
                continue;
            };
            link.mac = info.mac;
            if link.index != info.index {
                info!(interface = %name, "interface was recreated; reopening its VRRP sockets");
                let mut specs = Vec::new();
                for key in on_link {
                    if let Some(spec) = self.slots.get(&key).map(|s| s.spec.clone()) {
                        self.stop(&key, now);
                        specs.push((key, spec));
                    }
                }
                self.links.remove(&name);
                for (key, spec) in specs {
                    self.begin(key, spec, now).await;
                }
                continue;
            }
            let mut changed = Vec::new();
            if link.primary_v4 != v4 {
                changed.push((Family::V4, v4.map(IpAddr::V4)));
            }
            if link.link_local_v6 != v6 {
                changed.push((Family::V6, v6.map(IpAddr::V6)));
            }
            link.primary_v4 = v4;
            link.link_local_v6 = v6;
            for (family, primary) in changed {
                if on_link.iter().any(|(_, k)| k.family == family) {
                    info!(interface = %name, %family, primary = ?primary, "primary address of the interface changed");
                }
                for key in on_link.iter().filter(|(_, k)| k.family == family) {
                    let Some(slot) = self.slots.get(key) else {
                        continue;
                    };
                    match (primary, slot.instance.is_some()) {
                        (Some(p), true) => {
                            let config = instance_config(&slot.spec, p);
                            self.handle(key, now, Input::Reconfigure(config));
                        }
                        (None, true) => {
                            let spec = slot.spec.clone();
                            self.stop(key, now);
                            self.slots.insert(
                                key.clone(),
                                Slot {
                                    spec,
                                    instance: None,
                                    armed: None,
                                    vmac: None,
                                },
                            );
                        }
                        // Parked instances are retried below.
                        (_, false) => {}
                    }
                }
            }
        }
        let parked: Vec<SlotKey> = self
            .slots
            .iter()
            .filter(|(_, s)| s.instance.is_none())
            .map(|(k, _)| k.clone())
            .collect();
        for key in parked {
            if let Some(slot) = self.slots.remove(&key) {
                self.begin(key, slot.spec, now).await;
            }
        }
    }

    async fn shutdown(&mut self) {
        let now = Instant::now();
        let keys: Vec<SlotKey> = self.slots.keys().cloned().collect();
        for key in keys {
            self.stop(&key, now);
        }
        let (done, wait) = oneshot::channel();
        if self.io.effects.send(Effect::Barrier(done)).is_ok() {
            let _ = wait.await;
        }
        info!(node = %self.io.node, "all instances stopped, addresses released");
    }
}

/// What executing outputs needs, apart from the instances themselves.
struct Io {
    node: String,
    effects: mpsc::UnboundedSender<Effect>,
    encode_buf: Vec<u8>,
    stats: Arc<Stats>,
}

impl Io {
    fn execute(
        &mut self,
        link: &Link,
        vmac: Option<&Vmac>,
        spec: &InstanceSpec,
        priority: u8,
        output: Output,
    ) {
        match output {
            Output::Send(advertisement) => {
                let Some(source) = link.primary(spec.family) else {
                    return;
                };
                let socket = match vmac {
                    Some(v) => &v.socket,
                    None => match link.sockets.get(&spec.family) {
                        Some(s) => s,
                        None => return,
                    },
                };
                let group = [group(spec.family)];
                let destinations: &[IpAddr] = if spec.unicast_peers.is_empty() {
                    &group
                } else {
                    &spec.unicast_peers
                };
                // One manifest usually lists every node as a peer, this one included.
                for &destination in destinations.iter().filter(|d| **d != source) {
                    self.encode_buf.clear();
                    if let Err(e) = advertisement.encode_into(
                        source,
                        destination,
                        spec.checksum,
                        &mut self.encode_buf,
                    ) {
                        warn!(vip = %spec.resource, error = %e, "cannot encode advertisement");
                        return;
                    }
                    match socket.send(source, destination, &self.encode_buf) {
                        Ok(()) => {
                            self.stats.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                            debug!(vip = %spec.resource, error = %e, "advertisement not sent");
                        }
                    }
                }
            }
            Output::AddAddresses(nets) => {
                let ifindex = vmac.map_or(link.index, |v| v.index);
                let _ = self.effects.send(Effect::Add { ifindex, nets });
            }
            Output::RemoveAddresses(nets) => {
                let ifindex = vmac.map_or(link.index, |v| v.index);
                let _ = self.effects.send(Effect::Remove { ifindex, nets });
            }
            Output::Announce(addrs) => {
                let _ = self.effects.send(Effect::Announce {
                    interface: vmac.map_or_else(|| link.name.clone(), |v| v.name.clone()),
                    mac: vmac.map_or(link.mac, |v| v.mac),
                    addrs,
                    source_v6: link.link_local_v6,
                });
            }
            Output::Transition { from, to, reason } => {
                info!(
                    event = "transition",
                    node = %self.node,
                    vip = %spec.resource,
                    interface = %link.name,
                    family = %spec.family,
                    vrid = spec.vrid,
                    from = %from,
                    to = %to,
                    reason = reason.code(),
                    priority,
                    "{} {from} -> {to}: {reason}",
                    spec.resource,
                );
            }
        }
    }
}

fn instance_config(spec: &InstanceSpec, primary: IpAddr) -> Config {
    Config {
        vrid: spec.vrid,
        version: spec.version,
        priority: spec.priority,
        advert_interval: spec.advert_interval,
        preempt: spec.preempt,
        preempt_delay: spec.preempt_delay,
        accept_mode: true,
        addresses: spec.addresses.clone(),
        primary_address: primary,
    }
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
    received: Result<super::socket::Received, super::socket::SocketError>,
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
            log_decode_drop(stats, interface, received.source, &e);
            None
        }
    }
}

fn log_decode_drop(stats: &Stats, interface: &str, source: IpAddr, e: &DecodeError) {
    stats.count_drop(DropReason::Decode);
    debug!(interface, %source, reason = e.metric_label(), error = %e, "dropped invalid VRRP packet");
}

/// Executes address changes and announcements in order.
async fn run_effects(
    addresses: AddressManager,
    macvlans: MacvlanManager,
    mut rx: mpsc::UnboundedReceiver<Effect>,
) {
    while let Some(effect) = rx.recv().await {
        match effect {
            Effect::Add { ifindex, nets } => {
                for net in nets {
                    if let Err(e) = addresses.add(ifindex, net).await {
                        warn!(address = %net, error = %e, "cannot add virtual address");
                    }
                }
            }
            Effect::Remove { ifindex, nets } => {
                for net in nets {
                    if let Err(e) = addresses.remove(ifindex, net).await {
                        warn!(address = %net, error = %e, "cannot remove virtual address");
                    }
                }
            }
            Effect::Announce {
                interface,
                mac,
                addrs,
                source_v6,
            } => {
                let name = interface.clone();
                let result = tokio::task::spawn_blocking(move || {
                    crate::announce::announce(&name, mac, &addrs, source_v6)
                })
                .await;
                match result {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => warn!(interface = %interface, error = %e, "announcement failed"),
                    Err(e) => warn!(interface = %interface, error = %e, "announcement task failed"),
                }
            }
            Effect::Lifetime {
                ifindex,
                nets,
                lifetime,
            } => {
                for net in nets {
                    if let Err(e) = addresses.set_lifetime(ifindex, net, lifetime).await {
                        warn!(address = %net, error = %e, "cannot set the lifetime of a virtual address");
                    }
                }
            }
            Effect::DeleteLink { name } => {
                if let Err(e) = macvlans.delete_link(&name).await {
                    warn!(interface = %name, error = %e, "cannot remove virtual-MAC interface");
                }
            }
            Effect::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}
