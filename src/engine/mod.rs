//! The node engine: every VRRP instance of one node, sans-IO.
//!
//! [`NodeEngine::handle`] takes the current time and one [`Input`] and appends the
//! [`Output`]s the driver must carry out, in order; after every call the driver reads
//! [`NodeEngine::deadline`] and delivers [`Input::Timer`] once that instant has passed. The
//! same shape as [`Instance`] one level up: the engine never reads a clock, opens a socket or
//! talks netlink, which is what lets the simulated LAN (`engine::sim`) run this very code.
//!
//! It owns what is node-wide: one slot per (interface, family, VRID) with its instance, one
//! ordered set of deadlines for all of them (thousands of instances cost one wake-up per
//! deadline), demultiplexing of received advertisements by VRID with the node's filters
//! (own packets, version, unicast peers), converging to a new plan without disturbing
//! unchanged instances, adopting addresses a restarting predecessor held, the restart hold,
//! virtual-MAC bookkeeping, and the observed state reported to status and metrics.
//!
//! What it needs to know about the node's links (index, MAC, primary addresses, whether the
//! VRRP sockets and virtual-MAC interfaces could be set up) comes in as an [`Environment`]
//! that the driver reads before [`Input::Apply`] and every few seconds ([`Input::Refresh`]);
//! [`requirements`] tells the driver what to read and set up.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use tracing::{debug, info, warn};

use crate::model::{InstanceKey, InstanceSpec};
use crate::vocab::{ChecksumMode, Family, Version};
use crate::vrrp::group;
use crate::vrrp::instance::{self, Config, Instance, Reason, State};
use crate::vrrp::packet::Advertisement;

#[cfg(test)]
mod sim;
#[cfg(test)]
mod tests;

/// Timer lateness treated as "on time".
pub const TIMER_SLACK: Duration = Duration::from_millis(5);

/// A master re-adds an address that disappeared this many times within [`LOSS_WINDOW`];
/// one more and it steps down.
pub const MAX_REPAIRS: usize = 3;
/// See [`MAX_REPAIRS`].
pub const LOSS_WINDOW: Duration = Duration::from_secs(10);
/// How long an instance that stepped down because of its addresses waits before it runs
/// again; doubled for each further fault, up to [`FAULT_BACKOFF_MAX`].
pub const FAULT_BACKOFF: Duration = Duration::from_secs(10);
pub const FAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A fault this long after the previous one starts the back-off over.
const FAULT_MEMORY: Duration = Duration::from_secs(600);

/// The instances of a plan: per interface, keyed by family and VRID (`Desired::instances`).
pub type Instances = BTreeMap<String, BTreeMap<InstanceKey, InstanceSpec>>;

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

/// Node-wide packet counters, shared with the driver's readers and the metrics endpoint.
#[derive(Debug, Default)]
pub struct Stats {
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub send_errors: AtomicU64,
    dropped: [AtomicU64; 6],
    /// Backup → Master takeovers by (interface, family, reason code): how long the addresses
    /// went unannounced (see `instance::Output::Transition`). Takeovers are rare, hence the lock.
    takeovers: Mutex<BTreeMap<TakeoverKey, TakeoverFigures>>,
}

/// (interface, family, cause): the labels of a takeover observation. The cause is
/// [`Reason::code`] of a Backup → Master transition (`master_down`, `priority_zero`, `preempt`).
pub type TakeoverKey = (Arc<str>, Family, &'static str);

/// Upper bounds of the takeover histogram (seconds): 1-2.5-5 per decade from 10 ms to 10 s,
/// covering Skew_Time at short intervals up to Master_Down_Interval at the 1 s default
/// (about 3.6 s) and a few more.
pub const TAKEOVER_BUCKETS: [f64; 10] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The takeovers of one [`TakeoverKey`], as a histogram over [`TAKEOVER_BUCKETS`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TakeoverFigures {
    pub count: u64,
    /// Seconds.
    pub sum: f64,
    /// Observations per bucket (not cumulative); the last one is above every bound.
    pub buckets: [u64; TAKEOVER_BUCKETS.len() + 1],
}

impl TakeoverFigures {
    fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        let bucket = TAKEOVER_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(TAKEOVER_BUCKETS.len());
        self.buckets[bucket] += 1;
    }

    /// (upper bound, observations) per bucket, the last bound infinite.
    pub fn bucket_pairs(&self) -> Vec<(f64, u64)> {
        TAKEOVER_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.buckets)
            .collect()
    }
}

impl Stats {
    pub fn count_drop(&self, why: DropReason) {
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

    /// Records one Backup → Master takeover.
    pub fn observe_takeover(&self, key: TakeoverKey, unannounced: Duration) {
        self.takeovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key)
            .or_default()
            .observe(unannounced.as_secs_f64());
    }

    /// The takeovers observed so far, by key.
    pub fn takeovers(&self) -> Vec<(TakeoverKey, TakeoverFigures)> {
        self.takeovers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(k, h)| (k.clone(), h.clone()))
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
    /// When this node last became master of the instance, as a number from a sequence the
    /// engine counts over all its instances (0: not since the agent started). A reader that
    /// samples the state misses a mastership shorter than its period; one that compares this
    /// number does not (the status writer's `MasterElected` Events).
    pub elected: u64,
}

/// What the driver read about one interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkFacts {
    pub index: u32,
    pub mac: [u8; 6],
    pub primary_v4: Option<Ipv4Addr>,
    pub link_local_v6: Option<Ipv6Addr>,
    /// The interface's own subnet per family, as its address with the prefix: the primary
    /// IPv4 address, the first global IPv6 address (else the link-local one). Addresses with
    /// a shorter prefix are refused unless `allow_wide_prefix`.
    pub subnet_v4: Option<Ipv4Net>,
    pub subnet_v6: Option<Ipv6Net>,
}

impl LinkFacts {
    /// The advertisement source for `family`: the primary IPv4 address, the IPv6 link-local.
    pub fn primary(&self, family: Family) -> Option<IpAddr> {
        match family {
            Family::V4 => self.primary_v4.map(IpAddr::V4),
            Family::V6 => self.link_local_v6.map(IpAddr::V6),
        }
    }

    /// The interface's own subnet of `family`.
    pub fn subnet(&self, family: Family) -> Option<IpNet> {
        match family {
            Family::V4 => self.subnet_v4.map(IpNet::V4),
            Family::V6 => self.subnet_v6.map(IpNet::V6),
        }
    }
}

/// A virtual-MAC macvlan the driver set up: the addresses, announcements and advertisements
/// of one instance go through it, so they carry 00:00:5e:00:0{1,2}:VRID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmacFacts {
    pub name: Arc<str>,
    pub index: u32,
    pub mac: [u8; 6],
}

/// One interface as the driver found it, with the outcome of what it set up there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEnv {
    pub facts: Result<LinkFacts, String>,
    /// The receive socket of each family asked for (an error when it could not be opened).
    pub sockets: BTreeMap<Family, Result<(), String>>,
    /// The virtual-MAC interface of each (family, VRID) asked for.
    pub vmacs: BTreeMap<(Family, u8), Result<VmacFacts, String>>,
}

impl LinkEnv {
    fn socket(&self, family: Family) -> Result<(), String> {
        match self.sockets.get(&family) {
            Some(result) => result.clone(),
            None => Err(format!("no {family} VRRP socket")),
        }
    }
}

/// The node's links as far as the instances need them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Environment {
    pub links: BTreeMap<Arc<str>, LinkEnv>,
}

/// What an instance needs the driver to set up: the interface read, a receive socket for the
/// family, and, with `virtual_mac`, the macvlan of (family, VRID) once the interface has a
/// usable address of that family.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Requirement {
    pub interface: Arc<str>,
    pub family: Family,
    pub vrid: u8,
    pub virtual_mac: bool,
}

/// What the instances of `instances` need from the driver.
pub fn requirements(instances: &Instances) -> Vec<Requirement> {
    instances
        .iter()
        .flat_map(|(interface, specs)| {
            let interface: Arc<str> = Arc::from(interface.as_str());
            specs.values().map(move |spec| Requirement {
                interface: interface.clone(),
                family: spec.family,
                vrid: spec.vrid,
                virtual_mac: spec.virtual_mac,
            })
        })
        .collect()
}

/// Inputs to the engine.
#[derive(Debug)]
pub enum Input {
    /// Converge to these instances, with the links as the driver just read them.
    Apply {
        instances: Instances,
        env: Environment,
    },
    /// The links as re-read: a recreated interface restarts its instances, a changed primary
    /// address reconfigures them, and instances that could not start are retried.
    Refresh(Environment),
    /// A decoded advertisement that passed the TTL check.
    Advertisement {
        interface: Arc<str>,
        family: Family,
        source: IpAddr,
        advertisement: Advertisement,
    },
    /// [`NodeEngine::deadline`] has passed: fire every timer due.
    Timer,
    /// Leave gracefully: priority 0 from masters, addresses released, virtual MACs removed.
    Shutdown,
    /// Stop for a restart: masters of VRRPv3 instances (without a virtual MAC) keep their
    /// addresses for at most this long and tell the backups to wait as long; the next agent
    /// adopts them. The rest leave as on shutdown.
    Hold(Duration),
    /// An address went away from an interface (deleted by someone, expired, removed with its
    /// interface): the master holding it adds it again and announces it, or, when it keeps
    /// disappearing, steps down.
    AddressRemoved { ifindex: u32, net: IpNet },
    /// Several [`Input::AddressRemoved`] at once (the driver batches what is queued, e.g.
    /// every address of a group when its interface was flushed): repaired with one add and
    /// one announcement per master.
    AddressesRemoved { ifindex: u32, nets: Vec<IpNet> },
    /// Adding (or renewing) an address failed: the master holding it steps down.
    AddressFailed {
        ifindex: u32,
        net: IpNet,
        error: String,
    },
    /// Address notifications were lost: masters add (and announce) all their addresses
    /// again, which changes nothing where they are present.
    AddressEventsLost,
}

/// One advertisement to send.
#[derive(Debug, Clone, PartialEq)]
pub struct Transmit {
    pub interface: Arc<str>,
    pub family: Family,
    /// Send through this virtual-MAC interface's socket instead of the interface's.
    pub vmac: Option<Arc<str>>,
    pub source: IpAddr,
    /// The group, or the unicast peers other than ourselves.
    pub destinations: Arc<[IpAddr]>,
    pub checksum: ChecksumMode,
    pub advertisement: Advertisement,
    /// Goes out only after the announcements output before it (a preempting master's first
    /// advert: the master it preempts lets go of the addresses on receiving it), and so do
    /// the same instance's adverts after it until then.
    pub after_announcement: bool,
}

/// What the driver carries out, in order. Sends are immediate unless
/// [`Transmit::after_announcement`]; address and link changes and announcements may run on a
/// slower path, but in this order (an announcement never precedes its address).
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Send(Transmit),
    /// The list is shared with the instance (no copy per output of a huge group).
    AddAddresses {
        ifindex: u32,
        nets: Arc<[IpNet]>,
    },
    RemoveAddresses {
        ifindex: u32,
        nets: Arc<[IpNet]>,
    },
    /// Set (or clear, with `None`) the valid lifetime of our addresses.
    SetLifetime {
        ifindex: u32,
        nets: Vec<IpNet>,
        lifetime: Option<Duration>,
    },
    /// Restart hold: these addresses keep `hold` as their lifetime and are recorded as held
    /// for the next agent.
    HoldAddresses {
        ifindex: u32,
        nets: Vec<IpNet>,
        hold: Duration,
    },
    /// Renew the lifetime of every address the masters hold (one batch), so that they
    /// expire by themselves should this agent stop renewing (dead or hung).
    RenewAddresses {
        lifetime: Duration,
        addresses: Vec<(u32, IpNet)>,
    },
    Announce {
        interface: Arc<str>,
        /// The index of `interface` (the virtual MAC's when there is one): a later
        /// removal of addresses there stops what is left of the burst.
        ifindex: u32,
        mac: [u8; 6],
        addrs: Arc<[IpAddr]>,
        source_v6: Option<Ipv6Addr>,
    },
    /// No instance uses this virtual-MAC interface any more.
    DeleteVmac {
        name: Arc<str>,
    },
    /// A state change (also logged by the engine).
    Transition {
        interface: Arc<str>,
        key: InstanceKey,
        from: State,
        to: State,
        reason: Reason,
        /// Backup → Master: how long the addresses went unannounced as this node saw it
        /// (see `instance::Output::Transition`); also recorded in [`Stats`].
        unannounced: Option<Duration>,
    },
}

type SlotKey = (Arc<str>, InstanceKey);

struct Slot {
    spec: InstanceSpec,
    /// `spec.members`, shared with the observed state: compared by pointer on every
    /// advertisement, not name by name (a group may have thousands of members).
    members: Arc<[String]>,
    /// `None` while the instance cannot run (interface or its address missing).
    instance: Option<Instance>,
    armed: Option<Instant>,
    vmac: Option<VmacFacts>,
    /// Where advertisements go: the group, or the unicast peers other than ourselves.
    destinations: Arc<[IpAddr]>,
    faults: AddressFaults,
}

/// Trouble with an instance's addresses: recent disappearances, and the step-down back-off.
#[derive(Debug, Clone, Default)]
struct AddressFaults {
    /// Which addresses of this master disappeared when, within [`LOSS_WINDOW`] (a map, so
    /// that the loss of every address of a huge group is not quadratic).
    losses: HashMap<IpNet, Vec<Instant>>,
    /// When `losses` was last cleared of entries older than [`LOSS_WINDOW`].
    pruned: Option<Instant>,
    /// Step-downs in a row (reset after [`FAULT_MEMORY`] without one), and the last one.
    count: u32,
    last: Option<Instant>,
    /// Parked until then after a step-down.
    until: Option<Instant>,
}

/// Every VRRP instance of one node.
pub struct NodeEngine {
    node: String,
    env: Environment,
    slots: HashMap<SlotKey, Slot>,
    timers: BTreeSet<(Instant, SlotKey)>,
    /// Addresses a restarting predecessor held for us, until the first plan adopts them.
    held: HashSet<(u32, IpNet)>,
    observed: Observed,
    observed_changed: bool,
    /// The last number handed out for a transition to master ([`InstanceStatus::elected`]).
    elections: u64,
    stats: Arc<Stats>,
    /// A monotonic instant and the wall-clock time it corresponds to, for `since`.
    wall: (Instant, SystemTime),
    scratch: Vec<instance::Output>,
    /// Virtual-MAC interfaces released during one input, deleted at its end unless reused.
    released_vmacs: Vec<Arc<str>>,
    /// The finite lifetime masters give their addresses and renew; `None`: forever.
    address_lifetime: Option<Duration>,
    /// When the masters' addresses are renewed next.
    renew_at: Option<Instant>,
}

impl NodeEngine {
    /// `held`: addresses (interface index, address) a restarting predecessor recorded as held
    /// for us to adopt. `wall`: an instant and the wall-clock time at it.
    pub fn new(
        node: String,
        held: HashSet<(u32, IpNet)>,
        stats: Arc<Stats>,
        wall: (Instant, SystemTime),
    ) -> NodeEngine {
        NodeEngine {
            node,
            env: Environment::default(),
            slots: HashMap::new(),
            timers: BTreeSet::new(),
            held,
            observed: Observed::default(),
            observed_changed: false,
            elections: 0,
            stats,
            wall,
            scratch: Vec::new(),
            released_vmacs: Vec::new(),
            address_lifetime: None,
            renew_at: None,
        }
    }

    /// Masters give their addresses this lifetime (whole seconds, at least 1) and renew it
    /// every third of it, so the addresses of an agent that died or hangs expire within
    /// about the lifetime. `None` (the default) keeps addresses forever, as keepalived does.
    pub fn set_address_lifetime(&mut self, lifetime: Option<Duration>) {
        self.address_lifetime = lifetime.map(|l| Duration::from_secs(l.as_secs().max(1)));
    }

    pub fn address_lifetime(&self) -> Option<Duration> {
        self.address_lifetime
    }

    fn renew_period(&self) -> Option<Duration> {
        self.address_lifetime.map(|l| l / 3)
    }

    /// The earliest instant at which [`Input::Timer`] is due.
    pub fn deadline(&self) -> Option<Instant> {
        let timer = self.timers.first().map(|(t, _)| *t);
        match (timer, self.renew_at) {
            (Some(t), Some(r)) => Some(t.min(r)),
            (t, r) => t.or(r),
        }
    }

    /// The observed state of every instance.
    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    /// Whether [`NodeEngine::observed`] changed since the last call.
    pub fn take_observed_change(&mut self) -> bool {
        std::mem::take(&mut self.observed_changed)
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// What the running (and waiting) instances need from the driver.
    pub fn requirements(&self) -> Vec<Requirement> {
        let mut reqs: Vec<Requirement> = self
            .slots
            .iter()
            .map(|((interface, key), slot)| Requirement {
                interface: interface.clone(),
                family: key.family,
                vrid: key.vrid,
                virtual_mac: slot.spec.virtual_mac,
            })
            .collect();
        reqs.sort();
        reqs
    }

    /// The interfaces with instances on them (the driver closes the sockets of the others).
    pub fn interfaces(&self) -> BTreeSet<Arc<str>> {
        self.slots.keys().map(|(i, _)| i.clone()).collect()
    }

    /// The instance of `interface`/`key`, if it runs.
    pub fn instance(&self, interface: &str, key: InstanceKey) -> Option<&Instance> {
        self.slots
            .get(&(Arc::from(interface), key))
            .and_then(|s| s.instance.as_ref())
    }

    pub fn handle(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        let first_new = out.len();
        match input {
            Input::Apply { instances, env } => self.apply(now, instances, env, out),
            Input::Refresh(env) => self.refresh(now, env, out),
            Input::Advertisement {
                interface,
                family,
                source,
                advertisement,
            } => self.receive(now, interface, family, source, advertisement, out),
            Input::Timer => self.fire_due(now, out),
            Input::Shutdown => {
                for key in self.slot_keys() {
                    self.stop(&key, now, out);
                }
                self.renew_at = None;
            }
            Input::Hold(hold) => {
                self.hold(now, hold, out);
                self.renew_at = None;
            }
            Input::AddressRemoved { ifindex, net } => {
                self.addresses_removed(now, ifindex, vec![net], out)
            }
            Input::AddressesRemoved { ifindex, nets } => {
                self.addresses_removed(now, ifindex, nets, out)
            }
            Input::AddressFailed {
                ifindex,
                net,
                error,
            } => {
                if let Some(key) = self.master_holding(ifindex, net) {
                    let why = format!("cannot add address {net}: {error}");
                    self.address_fault(key, now, why, out);
                }
            }
            Input::AddressEventsLost => self.reassert_addresses(now, out),
        }
        self.delete_released_vmacs(out);
        // A master's addresses are renewed from its first add on.
        if self.renew_at.is_none()
            && let Some(period) = self.renew_period()
            && out[first_new..]
                .iter()
                .any(|o| matches!(o, Output::AddAddresses { .. }))
        {
            self.renew_at = Some(now + period);
        }
    }

    fn slot_keys(&self) -> Vec<SlotKey> {
        let mut keys: Vec<SlotKey> = self.slots.keys().cloned().collect();
        keys.sort();
        keys
    }

    fn fire_due(&mut self, now: Instant, out: &mut Vec<Output>) {
        if let Some(at) = self.renew_at
            && at <= now
        {
            let at = if now - at < TIMER_SLACK { at } else { now };
            self.renew(at, out);
        }
        let mut retry = Vec::new();
        while let Some((deadline, key)) = self.timers.first().cloned() {
            if deadline > now {
                break;
            }
            self.timers.pop_first();
            if let Some(slot) = self.slots.get_mut(&key) {
                slot.armed = None;
                if slot.instance.is_none() {
                    // The back-off after an address fault ran out.
                    retry.push(key);
                    continue;
                }
            }
            // Hand the instance its deadline rather than the (slightly later) wake-up time, so
            // advertisement intervals do not drift by the timer latency; after a real stall the
            // wake-up time is used so that no burst of catch-up advertisements follows.
            let at = if now - deadline < TIMER_SLACK {
                deadline
            } else {
                now
            };
            self.feed(&key, at, instance::Input::Timer, out);
        }
        for key in retry {
            self.retry_after_fault(key, now, out);
        }
    }

    /// Every address the masters hold, as (interface index, address).
    fn master_addresses(&self) -> Vec<(u32, IpNet)> {
        let mut all = Vec::new();
        for ((interface, _), slot) in &self.slots {
            if !slot
                .instance
                .as_ref()
                .is_some_and(|i| i.state() == State::Master)
            {
                continue;
            }
            let Some(link) = self.facts(interface) else {
                continue;
            };
            let ifindex = slot.vmac.as_ref().map_or(link.index, |v| v.index);
            all.extend(slot.spec.addresses.iter().map(|net| (ifindex, *net)));
        }
        all.sort();
        all
    }

    fn renew(&mut self, at: Instant, out: &mut Vec<Output>) {
        let (Some(lifetime), Some(period)) = (self.address_lifetime, self.renew_period()) else {
            self.renew_at = None;
            return;
        };
        let addresses = self.master_addresses();
        if addresses.is_empty() {
            self.renew_at = None;
            return;
        }
        out.push(Output::RenewAddresses {
            lifetime,
            addresses,
        });
        self.renew_at = Some(at + period);
    }

    /// The running master whose addresses include `net` on interface `ifindex`.
    fn master_holding(&self, ifindex: u32, net: IpNet) -> Option<SlotKey> {
        let mut keys: Vec<&SlotKey> = self
            .slots
            .iter()
            .filter(|((interface, _), slot)| {
                slot.instance
                    .as_ref()
                    .is_some_and(|i| i.state() == State::Master)
                    && slot.instance.as_ref().is_some_and(|i| i.holds(&net))
                    && self
                        .facts(interface)
                        .map(|l| slot.vmac.as_ref().map_or(l.index, |v| v.index))
                        == Some(ifindex)
            })
            .map(|(k, _)| k)
            .collect();
        keys.sort();
        keys.first().map(|k| (*k).clone())
    }

    /// An address went away: a master that holds it adds it again and announces it, unless
    /// it went away too often lately, then the master steps down.
    fn addresses_removed(
        &mut self,
        now: Instant,
        ifindex: u32,
        nets: Vec<IpNet>,
        out: &mut Vec<Output>,
    ) {
        // Grouped by the master holding them: O(addresses), one repair per master.
        let mut by_master: BTreeMap<SlotKey, Vec<IpNet>> = BTreeMap::new();
        for net in nets {
            if let Some(key) = self.master_holding(ifindex, net) {
                by_master.entry(key).or_default().push(net);
            }
        }
        for (key, nets) in by_master {
            let Some(slot) = self.slots.get_mut(&key) else {
                continue;
            };
            let faults = &mut slot.faults;
            if faults
                .pruned
                .is_none_or(|t| now.saturating_duration_since(t) >= LOSS_WINDOW)
            {
                faults.losses.retain(|_, times| {
                    times.retain(|t| now.saturating_duration_since(*t) < LOSS_WINDOW);
                    !times.is_empty()
                });
                faults.pruned = Some(now);
            }
            // Counted per address: an interface flushed once is repaired, one address that
            // keeps going is not.
            let mut worst: Option<(IpNet, usize)> = None;
            for net in &nets {
                let times = faults.losses.entry(*net).or_default();
                times.retain(|t| now.saturating_duration_since(*t) < LOSS_WINDOW);
                times.push(now);
                if times.len() > MAX_REPAIRS && worst.is_none_or(|(_, n)| times.len() > n) {
                    worst = Some((*net, times.len()));
                }
            }
            if let Some((net, losses)) = worst {
                let why = format!(
                    "address {net} keeps disappearing ({losses} times within {}s)",
                    LOSS_WINDOW.as_secs()
                );
                self.address_fault(key, now, why, out);
                continue;
            }
            if nets.len() == 1 {
                warn!(vip = %slot.spec.resource, interface = %key.0, address = %nets[0], "a virtual address of this master disappeared; adding it again");
            } else {
                warn!(vip = %slot.spec.resource, interface = %key.0, count = nets.len(), first = %nets[0], "virtual addresses of this master disappeared; adding them again");
            }
            self.readd(&key, nets.into(), out);
        }
    }

    /// Adds (and announces) addresses of a master again.
    fn readd(&self, key: &SlotKey, nets: Arc<[IpNet]>, out: &mut Vec<Output>) {
        let (Some(slot), Some(link)) = (self.slots.get(key), self.facts(&key.0)) else {
            return;
        };
        let priority = slot.spec.priority;
        let announce = instance::Output::Announce(nets.iter().map(IpNet::addr).collect());
        translate(
            &self.node,
            key,
            slot,
            link,
            priority,
            instance::Output::AddAddresses(nets),
            out,
        );
        translate(&self.node, key, slot, link, priority, announce, out);
    }

    fn reassert_addresses(&mut self, _now: Instant, out: &mut Vec<Output>) {
        warn!(node = %self.node, "address notifications were lost; adding every master's addresses again");
        for key in self.slot_keys() {
            let Some(slot) = self.slots.get(&key) else {
                continue;
            };
            if slot
                .instance
                .as_ref()
                .is_some_and(|i| i.state() == State::Master)
            {
                let Some(nets) = slot.instance.as_ref().map(|i| i.addresses().clone()) else {
                    continue;
                };
                self.readd(&key, nets, out);
            }
        }
    }

    /// The master cannot hold its addresses here: it leaves with priority 0 (a backup takes
    /// over at once), and the instance waits out a back-off before it runs again.
    fn address_fault(&mut self, key: SlotKey, now: Instant, why: String, out: &mut Vec<Output>) {
        self.feed(&key, now, instance::Input::Fault, out);
        let Some(slot) = self.slots.get_mut(&key) else {
            return;
        };
        let faults = &mut slot.faults;
        if faults
            .last
            .is_some_and(|t| now.saturating_duration_since(t) > FAULT_MEMORY)
        {
            faults.count = 0;
        }
        faults.count += 1;
        faults.last = Some(now);
        faults.losses.clear();
        let backoff = FAULT_BACKOFF
            .saturating_mul(1 << (faults.count - 1).min(8))
            .min(FAULT_BACKOFF_MAX);
        let until = now + backoff;
        faults.until = Some(until);
        slot.instance = None;
        if let Some(at) = slot.armed.take() {
            self.timers.remove(&(at, key.clone()));
        }
        slot.armed = Some(until);
        self.timers.insert((until, key.clone()));
        warn!(vip = %slot.spec.resource, interface = %key.0, vrid = slot.spec.vrid, reason = %why, backoff = ?backoff, "stepped down: the virtual addresses cannot be held on this node");
        let spec = slot.spec.clone();
        let fault = format!(
            "stepped down: {why}; running again in {}s",
            backoff.as_secs()
        );
        self.observe_fault(now, &spec, Some(fault));
    }

    /// Runs an instance again once its back-off after an address fault ran out.
    fn retry_after_fault(&mut self, key: SlotKey, now: Instant, out: &mut Vec<Output>) {
        let Some(slot) = self.slots.remove(&key) else {
            return;
        };
        let mut faults = slot.faults;
        faults.until = None;
        info!(vip = %slot.spec.resource, interface = %key.0, "running again after an address fault");
        self.begin(key.clone(), slot.spec, now, out);
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.faults = faults;
        }
    }

    fn receive(
        &mut self,
        now: Instant,
        interface: Arc<str>,
        family: Family,
        source: IpAddr,
        advertisement: Advertisement,
        out: &mut Vec<Output>,
    ) {
        let own = self.primary(&interface, family);
        if own == Some(source) {
            self.stats.count_drop(DropReason::Own);
            return;
        }
        let key: SlotKey = (
            interface,
            InstanceKey {
                family,
                vrid: advertisement.vrid,
            },
        );
        let Some(slot) = self.slots.get(&key) else {
            self.stats.count_drop(DropReason::UnknownVrid);
            debug!(interface = %key.0, vrid = advertisement.vrid, %source, "dropped advertisement: VRID not configured");
            return;
        };
        if slot.spec.version != advertisement.version {
            self.stats.count_drop(DropReason::VersionMismatch);
            debug!(vip = %slot.spec.resource, %source, "dropped advertisement: version {} but configured {}", advertisement.version, slot.spec.version);
            return;
        }
        if let Some(peers) = &slot.spec.unicast_peers
            && !peers.contains(&source)
        {
            self.stats.count_drop(DropReason::UnexpectedSource);
            debug!(vip = %slot.spec.resource, %source, "dropped advertisement: source is not a configured unicast peer");
            return;
        }
        let knew = slot
            .instance
            .as_ref()
            .and_then(Instance::learned_link_local);
        self.feed(
            &key,
            now,
            instance::Input::Advertisement {
                source,
                advertisement,
            },
            out,
        );
        log_learned_link_local(&self.node, &key, self.slots.get(&key), knew, source);
    }

    /// Feeds one input to one instance, re-arms its timer, updates the observed state and
    /// translates what the instance asks for into node-level outputs.
    fn feed(&mut self, key: &SlotKey, now: Instant, input: instance::Input, out: &mut Vec<Output>) {
        let since = self.wall_time(now);
        let NodeEngine {
            node,
            slots,
            env,
            timers,
            scratch,
            observed,
            observed_changed,
            elections,
            stats,
            ..
        } = self;
        let Some(slot) = slots.get_mut(key) else {
            return;
        };
        let Some(instance) = slot.instance.as_mut() else {
            return;
        };
        scratch.clear();
        instance.handle(now, input, scratch);
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
        let became_master = scratch.iter().any(|o| {
            matches!(
                o,
                instance::Output::Transition {
                    to: State::Master,
                    ..
                }
            )
        });
        let elected = became_master.then(|| {
            *elections += 1;
            *elections
        });
        let seen = Seen {
            state: instance.state(),
            master: instance.master(),
            priority: instance.config().priority,
            transition: scratch.iter().rev().find_map(|o| match o {
                instance::Output::Transition { reason, .. } => Some(*reason),
                _ => None,
            }),
            elected,
            since,
        };
        for output in scratch.iter() {
            if let instance::Output::Transition {
                to: State::Master,
                reason,
                unannounced: Some(unannounced),
                ..
            } = output
            {
                stats.observe_takeover(
                    (key.0.clone(), slot.spec.family, reason.code()),
                    *unannounced,
                );
            }
        }
        if let Some(link) = env.links.get(&key.0).and_then(|l| l.facts.as_ref().ok()) {
            // Only a preemption's advert waits for the announcement before it: the master
            // it preempts holds the addresses until it arrives. Any other advert that waited
            // (a master adding addresses, say) could miss its backups' Master_Down_Interval.
            let preempting = matches!(seen.transition, Some(Reason::Preempt { .. }));
            let mut announced = false;
            for output in scratch.drain(..) {
                let announce = matches!(output, instance::Output::Announce(_));
                let first = out.len();
                translate(node, key, slot, link, seen.priority, output, out);
                if preempting && announced {
                    for o in &mut out[first..] {
                        if let Output::Send(transmit) = o {
                            transmit.after_announcement = true;
                        }
                    }
                }
                announced |= announce;
            }
        }
        *observed_changed |= observe_instance(observed, &slot.spec, &slot.members, seen);
    }

    fn wall_time(&self, now: Instant) -> SystemTime {
        let (instant, wall) = self.wall;
        match now.checked_duration_since(instant) {
            Some(after) => wall + after,
            None => wall - instant.duration_since(now),
        }
    }

    /// Records an instance that cannot run, or forgets one that is gone.
    fn observe_fault(&mut self, now: Instant, spec: &InstanceSpec, fault: Option<String>) {
        let key = (spec.resource.clone(), spec.family);
        let changed = match fault {
            None => self.observed.instances.remove(&key).is_some(),
            Some(f) => {
                if self
                    .observed
                    .instances
                    .get(&key)
                    .is_some_and(|e| e.fault.as_ref() == Some(&f))
                {
                    false
                } else {
                    let since = self.wall_time(now);
                    let elected = self.observed.instances.get(&key).map_or(0, |e| e.elected);
                    self.observed.instances.insert(
                        key,
                        InstanceStatus {
                            members: spec.members.clone().into(),
                            interface: spec.interface.clone(),
                            vrid: spec.vrid,
                            state: State::Initialize,
                            priority: spec.priority,
                            master: None,
                            since,
                            reason: f.clone(),
                            reason_code: "fault",
                            fault: Some(f),
                            elected,
                        },
                    );
                    true
                }
            }
        };
        self.observed_changed |= changed;
    }

    /// Converges the running instances to `instances` without disturbing unchanged ones.
    fn apply(
        &mut self,
        now: Instant,
        instances: Instances,
        env: Environment,
        out: &mut Vec<Output>,
    ) {
        self.env = env;
        let mut wanted: BTreeMap<SlotKey, InstanceSpec> = BTreeMap::new();
        for (interface, specs) in instances {
            let interface: Arc<str> = self
                .env
                .links
                .get_key_value(interface.as_str())
                .map(|(k, _)| k.clone())
                .unwrap_or_else(|| Arc::from(interface.as_str()));
            for (key, spec) in specs {
                wanted.insert((interface.clone(), key), spec);
            }
        }

        for key in self.slot_keys() {
            if !wanted.contains_key(&key) {
                self.stop(&key, now, out);
            }
        }

        for (key, spec) in wanted {
            match self.slots.get(&key) {
                Some(slot) if slot.spec == spec => {}
                Some(slot)
                    if slot.spec.version != spec.version
                        || slot.instance.is_none()
                        || self.must_not_run(&key, &spec) =>
                {
                    self.stop(&key, now, out);
                    self.begin(key, spec, now, out);
                }
                Some(slot) => self.change(key, spec, slot.spec.clone(), now, out),
                None => self.begin(key, spec, now, out),
            }
        }

        let used = self.interfaces();
        self.env.links.retain(|name, _| used.contains(name));
        if !self.held.is_empty() {
            // Held for a resource this node no longer runs: release now rather than at expiry.
            let mut by_link: BTreeMap<u32, Vec<IpNet>> = BTreeMap::new();
            for (index, net) in self.held.drain() {
                by_link.entry(index).or_default().push(net);
            }
            for (ifindex, mut nets) in by_link {
                nets.sort();
                out.push(Output::RemoveAddresses {
                    ifindex,
                    nets: nets.into(),
                });
            }
        }
    }

    /// A running instance whose spec changed in place: a priority change is applied as such,
    /// anything else reconfigures it.
    fn change(
        &mut self,
        key: SlotKey,
        spec: InstanceSpec,
        old: InstanceSpec,
        now: Instant,
        out: &mut Vec<Output>,
    ) {
        // The instance is named after its first member: when that one goes (or a member
        // sorting before it comes), its observed entry moves to the new name. Left under the
        // old one, it would stay behind for good with a frozen state, and the status writer
        // would read both for every member.
        if old.resource != spec.resource
            && let Some(entry) = self
                .observed
                .instances
                .remove(&(old.resource.clone(), old.family))
        {
            self.observed
                .instances
                .insert((spec.resource.clone(), spec.family), entry);
            self.observed_changed = true;
        }
        let only_priority = InstanceSpec {
            priority: spec.priority,
            priority_reasons: spec.priority_reasons.clone(),
            ..old
        } == spec;
        let input = if only_priority {
            instance::Input::SetPriority(spec.priority)
        } else {
            match self.primary(&key.0, spec.family) {
                Some(p) => instance::Input::Reconfigure(instance_config(&spec, p)),
                None => return,
            }
        };
        info!(vip = %spec.resource, interface = %key.0, vrid = spec.vrid, priority = spec.priority, "configuration changed");
        let own = self.primary(&key.0, spec.family);
        if let Some(slot) = self.slots.get_mut(&key) {
            slot.destinations = destinations(&spec, own);
            if *slot.members != *spec.members {
                slot.members = spec.members.as_slice().into();
            }
            slot.spec = spec;
        }
        self.feed(&key, now, input, out);
    }

    /// Whether `spec` is refused on its interface as the engine knows it now.
    fn must_not_run(&self, key: &SlotKey, spec: &InstanceSpec) -> bool {
        empty_allowlist(spec).is_some()
            || self
                .facts(&key.0)
                .is_some_and(|f| wide_prefix(spec, &key.0, f).is_some())
    }

    fn facts(&self, interface: &str) -> Option<&LinkFacts> {
        self.env
            .links
            .get(interface)
            .and_then(|l| l.facts.as_ref().ok())
    }

    fn primary(&self, interface: &str, family: Family) -> Option<IpAddr> {
        self.facts(interface).and_then(|f| f.primary(family))
    }

    fn ifindex(&self, interface: &str) -> Option<u32> {
        self.facts(interface).map(|f| f.index)
    }

    /// Starts one instance, or parks it (with the reason in the observed state) while its
    /// interface, socket, address or virtual MAC is not usable; refreshes retry it.
    fn begin(&mut self, key: SlotKey, spec: InstanceSpec, now: Instant, out: &mut Vec<Output>) {
        let link = self.env.links.get(&key.0);
        let usable = match link {
            None => Err(format!("interface {}: not found", key.0)),
            Some(l) => match (&l.facts, l.socket(spec.family)) {
                (Err(e), _) => Err(format!("interface {}: {e}", key.0)),
                (Ok(_), Err(e)) => Err(format!("interface {}: {e}", key.0)),
                (Ok(facts), Ok(())) => Ok((facts, l)),
            },
        };
        let mut fault = None;
        let mut vmac = None;
        let refused = empty_allowlist(&spec).or_else(|| {
            usable
                .as_ref()
                .ok()
                .and_then(|(facts, _)| wide_prefix(&spec, &key.0, facts))
        });
        let primary = match (refused, usable) {
            (Some(why), _) => {
                let known = self
                    .observed
                    .instances
                    .get(&(spec.resource.clone(), spec.family))
                    .and_then(|e| e.fault.as_ref());
                if known != Some(&why) {
                    warn!(vip = %spec.resource, members = spec.members.len(), interface = %key.0, family = %spec.family, "refused on this node: {why}");
                }
                fault = Some(why);
                None
            }
            (None, Err(e)) => {
                warn!(vip = %spec.resource, interface = %key.0, error = %e, "cannot run VRRP on this interface yet; retrying");
                fault = Some(e);
                None
            }
            (None, Ok((facts, link))) => match facts.primary(spec.family) {
                None => {
                    let what = if spec.family == Family::V4 {
                        "IPv4"
                    } else {
                        "IPv6 link-local"
                    };
                    warn!(vip = %spec.resource, interface = %key.0, family = %spec.family, "interface has no usable {what} address; instance waits");
                    fault = Some(format!("interface {} has no usable {what} address", key.0));
                    None
                }
                Some(p) if !spec.virtual_mac => Some(p),
                Some(p) => match link.vmacs.get(&(spec.family, spec.vrid)) {
                    Some(Ok(v)) => {
                        vmac = Some(v.clone());
                        Some(p)
                    }
                    Some(Err(e)) => {
                        warn!(vip = %spec.resource, interface = %key.0, error = %e, "cannot set up the virtual MAC; retrying");
                        fault = Some(format!("virtual MAC: {e}"));
                        None
                    }
                    None => {
                        fault = Some("virtual MAC: not set up yet".to_string());
                        None
                    }
                },
            },
        };
        let instance = primary.map(|p| Instance::new(instance_config(&spec, p)));
        let started = instance.is_some();
        if !started {
            self.observe_fault(now, &spec, fault);
        }
        let ifindex = self.ifindex(&key.0);
        // Adopt only when every address of the instance was held on this interface.
        let adopt = started
            && vmac.is_none()
            && ifindex.is_some_and(|index| {
                spec.addresses
                    .iter()
                    .all(|a| self.held.contains(&(index, *a)))
            });
        let nets = spec.addresses.clone();
        self.slots.insert(
            key.clone(),
            Slot {
                destinations: destinations(&spec, primary),
                members: spec.members.as_slice().into(),
                spec,
                instance,
                armed: None,
                vmac,
                faults: AddressFaults::default(),
            },
        );
        if !started {
            return;
        }
        if adopt && let Some(ifindex) = ifindex {
            for net in &nets {
                self.held.remove(&(ifindex, *net));
            }
            out.push(Output::SetLifetime {
                ifindex,
                nets,
                lifetime: self.address_lifetime,
            });
            self.feed(&key, now, instance::Input::Adopt, out);
        } else {
            self.feed(&key, now, instance::Input::Startup, out);
        }
    }

    fn stop(&mut self, key: &SlotKey, now: Instant, out: &mut Vec<Output>) {
        self.feed(key, now, instance::Input::Shutdown, out);
        if let Some(slot) = self.slots.remove(key) {
            self.observe_fault(now, &slot.spec, None);
            if let Some(at) = slot.armed {
                self.timers.remove(&(at, key.clone()));
            }
            if let Some(vmac) = slot.vmac {
                self.released_vmacs.push(vmac.name);
            }
        }
    }

    /// Virtual-MAC interfaces of stopped instances go (after their addresses, queued before),
    /// unless an instance started in the same step uses the same one.
    fn delete_released_vmacs(&mut self, out: &mut Vec<Output>) {
        if self.released_vmacs.is_empty() {
            return;
        }
        let in_use: HashSet<&str> = self
            .slots
            .values()
            .filter_map(|s| s.vmac.as_ref().map(|v| &*v.name))
            .collect();
        let mut released = std::mem::take(&mut self.released_vmacs);
        released.sort();
        released.dedup();
        for name in released {
            if !in_use.contains(&*name) {
                out.push(Output::DeleteVmac { name });
            }
        }
    }

    fn hold(&mut self, now: Instant, hold: Duration, out: &mut Vec<Output>) {
        let mut held = 0;
        for key in self.slot_keys() {
            let Some(slot) = self.slots.get(&key) else {
                continue;
            };
            let holds = slot.vmac.is_none()
                && slot.spec.version == Version::V3
                && slot
                    .instance
                    .as_ref()
                    .is_some_and(|i| i.state() == State::Master);
            if !holds {
                self.stop(&key, now, out);
                continue;
            }
            let nets = slot.spec.addresses.clone();
            let ifindex = self.ifindex(&key.0);
            self.feed(&key, now, instance::Input::Hold(hold), out);
            if let Some(ifindex) = ifindex {
                held += nets.len();
                out.push(Output::HoldAddresses {
                    ifindex,
                    nets,
                    hold,
                });
            }
            if let Some(slot) = self.slots.remove(&key)
                && let Some(at) = slot.armed
            {
                self.timers.remove(&(at, key.clone()));
            }
        }
        info!(node = %self.node, addresses = held, hold = ?hold, "stopped for a restart; addresses held for the next agent");
    }

    /// Takes a re-read of the links: a recreated interface (new index) restarts its instances
    /// on the new sockets; a changed primary address reconfigures the instances of that family
    /// (or parks them when it is gone); instances that could not start are retried.
    fn refresh(&mut self, now: Instant, env: Environment, out: &mut Vec<Output>) {
        let keys = self.slot_keys();
        let mut recreated = Vec::new();
        let mut readdressed = Vec::new();
        for (name, link) in &self.env.links {
            let (Ok(before), Some(Ok(after))) =
                (&link.facts, env.links.get(name).map(|l| l.facts.as_ref()))
            else {
                continue;
            };
            if before.index != after.index {
                recreated.push(name.clone());
                continue;
            }
            for family in [Family::V4, Family::V6] {
                if before.primary(family) != after.primary(family) {
                    readdressed.push((name.clone(), family, after.primary(family)));
                }
            }
        }
        // Instances of a recreated interface leave on the old one (its index, its addresses)
        // and start over on the new one.
        let mut restart = Vec::new();
        for name in &recreated {
            info!(interface = %name, "interface was recreated; reopening its VRRP sockets");
            for key in keys.iter().filter(|(i, _)| i == name) {
                if let Some(spec) = self.slots.get(key).map(|s| s.spec.clone()) {
                    self.stop(key, now, out);
                    restart.push((key.clone(), spec));
                }
            }
        }
        self.env = env;
        for (key, spec) in restart {
            self.begin(key, spec, now, out);
        }
        for (name, family, primary) in readdressed {
            let of_family: Vec<&SlotKey> = keys
                .iter()
                .filter(|(i, k)| *i == name && k.family == family)
                .collect();
            if !of_family.is_empty() {
                info!(interface = %name, %family, primary = ?primary, "primary address of the interface changed");
            }
            for key in of_family {
                let Some(slot) = self.slots.get_mut(key) else {
                    continue;
                };
                match (primary, slot.instance.is_some()) {
                    (Some(p), true) => {
                        let config = instance_config(&slot.spec, p);
                        slot.destinations = destinations(&slot.spec, Some(p));
                        self.feed(key, now, instance::Input::Reconfigure(config), out);
                    }
                    (None, true) => {
                        let spec = slot.spec.clone();
                        self.stop(key, now, out);
                        self.slots.insert(
                            key.clone(),
                            Slot {
                                destinations: destinations(&spec, None),
                                members: spec.members.as_slice().into(),
                                spec,
                                instance: None,
                                armed: None,
                                vmac: None,
                                faults: AddressFaults::default(),
                            },
                        );
                    }
                    // Parked instances are retried below.
                    (_, false) => {}
                }
            }
        }
        // A running instance that the interface's subnet now refuses (it was renumbered
        // to a longer prefix) stops, and is parked like the others.
        for key in self.slot_keys() {
            let Some(slot) = self.slots.get(&key) else {
                continue;
            };
            if slot.instance.is_some() && self.must_not_run(&key, &slot.spec) {
                let spec = slot.spec.clone();
                self.stop(&key, now, out);
                self.slots.insert(
                    key,
                    Slot {
                        destinations: destinations(&spec, None),
                        members: spec.members.as_slice().into(),
                        spec,
                        instance: None,
                        armed: None,
                        vmac: None,
                        faults: AddressFaults::default(),
                    },
                );
            }
        }
        // Instances waiting out an address fault's back-off are left to their timer.
        let parked: Vec<SlotKey> = self
            .slot_keys()
            .into_iter()
            .filter(|k| self.slots[k].instance.is_none() && self.slots[k].faults.until.is_none())
            .collect();
        for key in parked {
            if let Some(slot) = self.slots.remove(&key) {
                if let Some(at) = slot.armed {
                    self.timers.remove(&(at, key.clone()));
                }
                self.begin(key, slot.spec, now, out);
            }
        }
    }
}

/// What one instance looks like after an input.
struct Seen {
    state: State,
    master: Option<IpAddr>,
    priority: u8,
    transition: Option<Reason>,
    /// The engine's number for a transition to master in this input.
    elected: Option<u64>,
    since: SystemTime,
}

/// Updates the observed entry of one running instance; whether it changed.
fn observe_instance(
    observed: &mut Observed,
    spec: &InstanceSpec,
    members: &Arc<[String]>,
    seen: Seen,
) -> bool {
    let key = (spec.resource.clone(), spec.family);
    let same = |theirs: &Arc<[String]>| Arc::ptr_eq(theirs, members) || **theirs == **members;
    match (observed.instances.get_mut(&key), seen.transition) {
        (Some(e), None)
            if e.state == seen.state
                && e.master == seen.master
                && e.priority == seen.priority
                && e.fault.is_none()
                && Arc::ptr_eq(&e.members, members) =>
        {
            false
        }
        (Some(e), None) if !Arc::ptr_eq(&e.members, members) && same(&e.members) => {
            // Equal lists: share ours, so that the next comparison is by pointer. Not a
            // change anyone needs to hear about unless something else changed too.
            e.members = members.clone();
            let changed = e.state != seen.state
                || e.master != seen.master
                || e.priority != seen.priority
                || e.fault.is_some();
            e.state = seen.state;
            e.master = seen.master;
            e.priority = seen.priority;
            e.fault = None;
            changed
        }
        (Some(e), None) => {
            if !same(&e.members) {
                e.members = members.clone();
            }
            e.state = seen.state;
            e.master = seen.master;
            e.priority = seen.priority;
            e.fault = None;
            true
        }
        (_, reason) => {
            let elected = seen
                .elected
                .or_else(|| observed.instances.get(&key).map(|e| e.elected))
                .unwrap_or(0);
            observed.instances.insert(
                key,
                InstanceStatus {
                    members: members.clone(),
                    interface: spec.interface.clone(),
                    vrid: spec.vrid,
                    state: seen.state,
                    priority: seen.priority,
                    master: seen.master,
                    since: seen.since,
                    reason: reason.map(|r| r.to_string()).unwrap_or_default(),
                    reason_code: reason.map_or("", |r| r.code()),
                    fault: None,
                    elected,
                },
            );
            true
        }
    }
}

/// Says once per instance that a peer's advertisement taught it the link-local to list first
/// (IPv6 without a configured link-local, see `Instance::advertised_addresses`).
fn log_learned_link_local(
    node: &str,
    key: &SlotKey,
    slot: Option<&Slot>,
    knew: Option<Ipv6Addr>,
    source: IpAddr,
) {
    let Some(slot) = slot else { return };
    let learned = slot
        .instance
        .as_ref()
        .and_then(Instance::learned_link_local);
    if let Some(link_local) = learned
        && knew.is_none()
    {
        info!(
            event = "link_local_learned",
            node = %node,
            vip = %slot.spec.resource,
            interface = %key.0,
            vrid = slot.spec.vrid,
            %link_local,
            peer = %source,
            "{}: peer {source} lists the link-local {link_local} first; our IPv6 advertisements list it first too from now on",
            slot.spec.resource,
        );
    }
}

/// Where an instance's advertisements go: the group, or its unicast peers other than
/// `own` (one manifest usually lists every node as a peer, this one included).
fn destinations(spec: &InstanceSpec, own: Option<IpAddr>) -> Arc<[IpAddr]> {
    match &spec.unicast_peers {
        None => Arc::from([group(spec.family)]),
        Some(peers) => peers.iter().copied().filter(|p| Some(*p) != own).collect(),
    }
}

/// Why `spec` must not run at all (whatever the interface): an allowlist with no peer would
/// accept advertisements from anyone, so it fails closed.
fn empty_allowlist(spec: &InstanceSpec) -> Option<String> {
    match &spec.unicast_peers {
        Some(peers) if peers.is_empty() => Some(format!(
            "spec.vrrp.unicastPeers: no {} peer; the instance does not run (an empty allowlist would accept advertisements from anyone)",
            spec.family
        )),
        _ => None,
    }
}

/// Why `spec` must not run on the interface `link`, if it must not: an address whose prefix
/// is shorter than the interface's own subnet would route a wider range through it than the
/// subnet the interface is on (`10.0.0.100/8` on `10.0.0.1/24`), unless the resource allows it.
/// The virtual router's link-local address (IPv6) is link-scoped and never checked.
pub fn wide_prefix(spec: &InstanceSpec, interface: &str, link: &LinkFacts) -> Option<String> {
    if spec.allow_wide_prefix {
        return None;
    }
    let subnet = link.subnet(spec.family)?;
    let wide: Vec<String> = spec
        .addresses
        .iter()
        .filter(|a| !matches!(a, IpNet::V6(v6) if v6.addr().is_unicast_link_local()))
        .filter(|a| a.prefix_len() < subnet.prefix_len())
        .map(IpNet::to_string)
        .collect();
    if wide.is_empty() {
        return None;
    }
    Some(format!(
        "spec.addresses: {} has a shorter prefix than interface {interface}'s subnet {subnet} and would route the whole range through it; use /{} or longer, or set spec.allowWidePrefix: true",
        wide.join(", "),
        subnet.prefix_len()
    ))
}

/// One instance output as a node-level output (addresses on the virtual MAC when it has one).
fn translate(
    node: &str,
    key: &SlotKey,
    slot: &Slot,
    link: &LinkFacts,
    priority: u8,
    output: instance::Output,
    out: &mut Vec<Output>,
) {
    let spec = &slot.spec;
    let ifindex = slot.vmac.as_ref().map_or(link.index, |v| v.index);
    match output {
        instance::Output::Send(advertisement) => {
            let Some(source) = link.primary(spec.family) else {
                return;
            };
            out.push(Output::Send(Transmit {
                interface: key.0.clone(),
                family: spec.family,
                vmac: slot.vmac.as_ref().map(|v| v.name.clone()),
                source,
                destinations: slot.destinations.clone(),
                checksum: spec.checksum,
                advertisement,
                after_announcement: false,
            }));
        }
        instance::Output::AddAddresses(nets) => out.push(Output::AddAddresses { ifindex, nets }),
        instance::Output::RemoveAddresses(nets) => {
            out.push(Output::RemoveAddresses { ifindex, nets })
        }
        instance::Output::Announce(addrs) => out.push(Output::Announce {
            interface: slot
                .vmac
                .as_ref()
                .map_or_else(|| key.0.clone(), |v| v.name.clone()),
            ifindex,
            mac: slot.vmac.as_ref().map_or(link.mac, |v| v.mac),
            addrs,
            source_v6: link.link_local_v6,
        }),
        instance::Output::Transition {
            from,
            to,
            reason,
            unannounced,
        } => {
            info!(
                event = "transition",
                node = %node,
                vip = %spec.resource,
                interface = %key.0,
                family = %spec.family,
                vrid = spec.vrid,
                from = %from,
                to = %to,
                reason = reason.code(),
                priority,
                "{} {from} -> {to}: {reason}",
                spec.resource,
            );
            out.push(Output::Transition {
                interface: key.0.clone(),
                key: key.1,
                from,
                to,
                reason,
                unannounced,
            });
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
