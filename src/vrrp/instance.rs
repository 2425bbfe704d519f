//! The per-virtual-router VRRP state machine: RFC 5798 / RFC 9568 §6.4 for version 3, RFC 3768
//! §6.4 for version 2.
//!
//! Sans-IO: [`Instance::handle`] takes the current time and one [`Input`] and appends the
//! [`Output`]s the driver must carry out, in order. The instance never reads a clock, owns no
//! socket and arms no timer; after every `handle` the driver reads [`Instance::deadline`] and
//! delivers [`Input::Timer`] once that instant has passed. This is what lets the whole protocol
//! run on a virtual clock in an in-memory LAN (see `vrrp::sim`).
//!
//! Timer arithmetic is exact to the nanosecond: with 100 ms adverts and priority 100,
//! Skew_Time is 60.9375 ms and Master_Down_Interval 360.9375 ms. RFC 5798 writes the formulas
//! in centiseconds, which would truncate the skew to whole centiseconds; keepalived computes in
//! microseconds. The sub-microsecond difference cannot change an election between peers.
//!
//! Intervals are quantised to what the wire can carry (v3: whole centiseconds, 1-4095; v2:
//! whole seconds, 1-255) so that our timers agree with what the backups learn from us.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::packet::Advertisement;
use crate::vocab::{Family, IntervalError, Version};

/// Priority of the router that owns the virtual addresses: always master, always preempts.
pub const PRIORITY_OWNER: u8 = 255;
/// Priority carried by the advertisement of a master that is leaving.
pub const PRIORITY_LEAVING: u8 = 0;

/// Most addresses an advertisement lists. An instance may hold many more (one election for
/// thousands of VIPs, since only 255 VRIDs exist); the advertisement then lists the first
/// ones, which keeps it in one unfragmented packet (IPv4: 20 + 8 + 4 × 255 bytes; IPv6:
/// 40 + 8 + 16 × 80). Receivers accept a list that differs from theirs (RFC 5798 §7.1 only
/// asks them to log it), as keepalived does.
pub fn max_advertised(family: Family) -> usize {
    match family {
        Family::V4 => 255,
        Family::V6 => 80,
    }
}

/// After a master learned the link-local from a peer, it announces its addresses at once and
/// again with its first advertisements at least this long after: the peer may have become a
/// second master meanwhile, and keepalived sends its own announcement burst before it reads
/// our answer and yields (tens of milliseconds later on a busy host), leaving the neighbours
/// with its MAC. keepalived's `garp_lower_prio_repeat` answers a lower-priority master the
/// same way.
pub const REANNOUNCE_AFTER_TEACHING: [Duration; 2] =
    [Duration::from_millis(250), Duration::from_secs(1)];

/// What one virtual router should do. Changing `vrid` or `version` makes it a different virtual
/// router: the driver creates a new [`Instance`] for that instead of sending
/// [`Input::Reconfigure`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub vrid: u8,
    pub version: Version,
    /// 1..=255; 255 = address owner. 0 is reserved for "master leaving" and is raised to 1.
    pub priority: u8,
    pub advert_interval: Duration,
    pub preempt: bool,
    /// keepalived semantics: after startup, or after first seeing a lower-priority master, wait
    /// this long before preempting it. Zero preempts at once.
    pub preempt_delay: Duration,
    /// Whether the master accepts packets addressed to the virtual addresses when it is not the
    /// owner (RFC 5798 §6.1). The state machine carries it for the driver; elections ignore it.
    pub accept_mode: bool,
    /// The virtual addresses, with the prefix to add them to the interface with. An IPv6
    /// link-local among them (the user listed one) goes first, and first on the wire (RFC 5798
    /// §5.2.9). Without one the advertisement lists only these addresses, as keepalived
    /// configured without a link-local does, until a peer's advertisement teaches the
    /// instance a link-local (see [`Instance::advertised_addresses`]).
    pub addresses: Vec<IpNet>,
    /// Our own advertisement source (IPv4 primary address / IPv6 link-local): the tie-breaker
    /// between masters of equal priority.
    pub primary_address: IpAddr,
}

impl Config {
    /// The address family of this virtual router (the family of its primary address).
    pub fn family(&self) -> Family {
        Family::of(&self.primary_address)
    }

    /// The interval as carried in the advertisement: centiseconds (v3) or seconds (v2),
    /// truncated and clamped to the field's range.
    pub fn wire_interval(&self) -> u16 {
        self.version.interval_to_wire(self.advert_interval)
    }

    /// The advertisement interval actually used: [`Config::advert_interval`] quantised to
    /// [`Config::wire_interval`].
    pub fn effective_advert_interval(&self) -> Duration {
        self.version.interval_from_wire(self.wire_interval())
    }

    /// Checks what [`Instance::new`] would otherwise silently quantise, clamp or tolerate.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vrid == 0 {
            return Err(ConfigError::InvalidVrid);
        }
        if self.priority == PRIORITY_LEAVING {
            return Err(ConfigError::InvalidPriority);
        }
        if self.addresses.is_empty() {
            return Err(ConfigError::NoAddresses);
        }
        let family = self.family();
        if !self.version.carries(family) {
            return Err(ConfigError::V2IsIpv4Only);
        }
        if let Some(address) = self
            .addresses
            .iter()
            .find(|net| Family::of(&net.addr()) != family)
        {
            return Err(ConfigError::MixedFamilies {
                address: *address,
                family,
                primary: self.primary_address,
            });
        }
        match self.version.check_interval(self.advert_interval) {
            Ok(()) => Ok(()),
            Err(IntervalError::OutOfRange(version)) => {
                let limits = version.interval_limits();
                Err(ConfigError::IntervalOutOfRange {
                    interval: self.advert_interval,
                    version,
                    min: *limits.start(),
                    max: *limits.end(),
                })
            }
            Err(IntervalError::NotWholeUnits(version)) => {
                Err(ConfigError::IntervalNotRepresentable {
                    interval: self.advert_interval,
                    version,
                })
            }
        }
    }
}

/// Why a [`Config`] is not a valid virtual router.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("VRID 0 is invalid (valid: 1-255)")]
    InvalidVrid,
    #[error("priority 0 is reserved for a master that is leaving (valid: 1-255)")]
    InvalidPriority,
    #[error("a virtual router needs at least one virtual address")]
    NoAddresses,
    #[error("VRRP version 2 carries IPv4 only")]
    V2IsIpv4Only,
    #[error("virtual address {address} is not {family} like the primary address {primary}")]
    MixedFamilies {
        address: IpNet,
        family: Family,
        primary: IpAddr,
    },
    #[error(
        "advertisement interval {interval:?} is outside {min:?}..={max:?} for VRRP version {version}"
    )]
    IntervalOutOfRange {
        interval: Duration,
        version: Version,
        min: Duration,
        max: Duration,
    },
    #[error(
        "advertisement interval {interval:?} cannot be carried by VRRP version {version} \
         (v3: whole centiseconds, v2: whole seconds)"
    )]
    IntervalNotRepresentable {
        interval: Duration,
        version: Version,
    },
}

impl ConfigError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ConfigError::InvalidVrid => "invalid_vrid",
            ConfigError::InvalidPriority => "invalid_priority",
            ConfigError::NoAddresses => "no_addresses",
            ConfigError::V2IsIpv4Only => "v2_ipv4_only",
            ConfigError::MixedFamilies { .. } => "mixed_families",
            ConfigError::IntervalOutOfRange { .. } => "interval_out_of_range",
            ConfigError::IntervalNotRepresentable { .. } => "interval_not_representable",
        }
    }
}

/// RFC 5798 states (RFC 9568 calls Master "Active"; we keep the names operators know).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Initialize,
    Backup,
    Master,
}

impl State {
    /// The keepalived-style name, also usable as a bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Initialize => "INIT",
            State::Backup => "BACKUP",
            State::Master => "MASTER",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened to the instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    Startup,
    /// Already validated by the driver (TTL, checksum, VRID, family, not our own).
    Advertisement {
        source: IpAddr,
        advertisement: Advertisement,
    },
    /// [`Instance::deadline`] has passed.
    Timer,
    /// Takes effect from the next advertisement sent or received. 0 is raised to 1.
    SetPriority(u8),
    /// A new configuration for the same VRID and version (see [`Config`]).
    Reconfigure(Config),
    Shutdown,
    /// Restart hand-off, outgoing side: a Master keeps its addresses and, instead of
    /// priority 0, advertises an interval of a quarter of this duration (capped at the v3
    /// maximum), so the backups wait for the next agent 3 × interval + skew: between ¾ of
    /// the hold and the hold, never past it. The held addresses live for the whole hold, so
    /// a next agent slower than that finds a backup already master (both hold the address
    /// for less than a quarter of the hold, the backup's announcement winning) instead of a
    /// gap with nobody holding it. VRRPv2 cannot announce another interval and leaves as on
    /// Shutdown.
    Hold(Duration),
    /// Restart hand-off, incoming side: start as Master at once, for addresses a held
    /// predecessor left on the interface.
    Adopt,
    /// The virtual addresses cannot be held on this node (adding fails, or they keep
    /// disappearing): leave as on Shutdown (priority 0, so a backup takes over at once).
    Fault,
}

/// What the driver must do, in the order given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// To the group (or the unicast peers; the driver decides).
    Send(Advertisement),
    /// Shared, not copied: a group may hold thousands of addresses.
    AddAddresses(Arc<[IpNet]>),
    RemoveAddresses(Arc<[IpNet]>),
    /// Gratuitous ARP / unsolicited NA burst for these addresses.
    Announce(Arc<[IpAddr]>),
    /// Always the last output of the input that caused it.
    Transition {
        from: State,
        to: State,
        reason: Reason,
        /// Backup → Master only: the time from the last advertisement this instance heard
        /// (from the previous master) to this transition, i.e. how long the addresses went
        /// unannounced as seen from here (about Master_Down_Interval after a crash, Skew_Time
        /// after a priority 0). `None` for every other transition, and when no advertisement
        /// was heard since the instance last became Backup.
        unannounced: Option<Duration>,
    },
}

/// Why a transition happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Initialize → Backup.
    Startup,
    /// Initialize → Master: we own the addresses (priority 255).
    Owner,
    /// Backup → Master: no advertisement accepted within Master_Down_Interval.
    MasterDown { last_master: Option<IpAddr> },
    /// Backup → Master: the master left (priority 0) and Skew_Time passed.
    PriorityZero { from: IpAddr },
    /// Backup → Master: we discarded a lower-priority master's adverts (preemption).
    Preempt { from: IpAddr, priority: u8 },
    /// Master → Backup: a higher priority master.
    HigherPriority { from: IpAddr, priority: u8 },
    /// Master → Backup: a master of equal priority with a higher primary address.
    TieBreak { from: IpAddr },
    /// → Initialize.
    Shutdown,
    /// → Initialize: the configuration changed VRID or version, so the instance starts over.
    Reconfigured,
    /// Master → Initialize keeping the addresses, for a restarting agent.
    Held,
    /// Initialize → Master: the previous agent held the addresses for us.
    Adopted,
    /// → Initialize: the virtual addresses could not be held on this node.
    AddressFault,
}

impl Reason {
    /// A bounded snake_case label for logs and metrics.
    pub fn code(&self) -> &'static str {
        match self {
            Reason::Startup => "startup",
            Reason::Owner => "owner",
            Reason::MasterDown { .. } => "master_down",
            Reason::PriorityZero { .. } => "priority_zero",
            Reason::Preempt { .. } => "preempt",
            Reason::HigherPriority { .. } => "higher_priority",
            Reason::TieBreak { .. } => "tie_break",
            Reason::Shutdown => "shutdown",
            Reason::Reconfigured => "reconfigured",
            Reason::Held => "held",
            Reason::Adopted => "adopted",
            Reason::AddressFault => "address_fault",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Startup => f.write_str("startup"),
            Reason::Owner => f.write_str("address owner (priority 255)"),
            Reason::MasterDown {
                last_master: Some(master),
            } => write!(f, "master {master} down"),
            Reason::MasterDown { last_master: None } => f.write_str("no master seen"),
            Reason::PriorityZero { from } => write!(f, "master {from} left (priority 0)"),
            Reason::Preempt { from, priority } => {
                write!(
                    f,
                    "preempted lower-priority master {from} (priority {priority})"
                )
            }
            Reason::HigherPriority { from, priority } => {
                write!(f, "higher-priority master {from} (priority {priority})")
            }
            Reason::TieBreak { from } => {
                write!(f, "master {from} has equal priority and a higher address")
            }
            Reason::Shutdown => f.write_str("shutdown"),
            Reason::Reconfigured => f.write_str("VRID or version reconfigured"),
            Reason::Held => f.write_str("agent restarting; addresses held"),
            Reason::Adopted => f.write_str("addresses held by the previous agent"),
            Reason::AddressFault => f.write_str("cannot hold the virtual addresses"),
        }
    }
}

/// Monotonic event counts of one instance (kept across Shutdown/Startup).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub adverts_sent: u64,
    pub priority_zero_sent: u64,
    /// Every [`Input::Advertisement`], including the discarded ones.
    pub adverts_received: u64,
    pub priority_zero_received: u64,
    /// Backup with preemption: lower priority. Master: lower priority, or equal priority from a
    /// lower address.
    pub discarded_lower_priority: u64,
    /// VRRPv2: the advertisement's interval differs from ours (RFC 3768 §7.1).
    pub discarded_interval_mismatch: u64,
    /// We own the addresses (priority 255) and ignore everyone else (RFC 5798 §7.1).
    pub discarded_as_owner: u64,
    /// Received in Initialize.
    pub discarded_not_running: u64,
    /// Wrong VRID or version, or interval 0: the driver should have dropped these.
    pub discarded_invalid: u64,
    /// Accepted, but the advertised addresses differ from ours (RFC 5798 §7.1: log, not drop).
    pub address_list_mismatch: u64,
    /// IPv6: 1 once a peer's advertisement taught us the link-local to list first.
    pub link_local_learned: u64,
    pub transitions: u64,
    pub became_master: u64,
    pub became_backup: u64,
}

/// One virtual router.
#[derive(Debug, Clone)]
pub struct Instance {
    config: Config,
    state: State,
    deadline: Option<Instant>,
    master: Option<IpAddr>,
    master_adver_interval: Duration,
    /// Set while the master-down timer runs for Skew_Time only because this master left.
    leaving_master: Option<IpAddr>,
    /// The lower-priority master whose adverts we are discarding in order to take over.
    preempting: Option<(IpAddr, u8)>,
    /// Start of the preempt_delay hold-off; `None` until startup or until a lower-priority
    /// master is first seen after a higher-priority one. Stored as a start rather than an end so
    /// that a huge delay cannot overflow `Instant`.
    preempt_hold_since: Option<Instant>,
    /// IPv6 without a configured link-local: the link-local a peer of this VRID listed first,
    /// which our advertisements then list first too. Kept for the life of the instance
    /// (Reconfigure included, a new VRID or version excluded).
    learned_link_local: Option<Ipv6Addr>,
    /// As Master, after learning the link-local: when, and the next of
    /// [`REANNOUNCE_AFTER_TEACHING`] still to do.
    reannounce: Option<(Instant, usize)>,
    /// As Backup: when the last advertisement from a master was heard (priority 0 and
    /// discarded lower-priority ones included), for [`Output::Transition::unannounced`].
    last_heard: Option<Instant>,
    counters: Counters,
    /// Derived from `config.addresses` (and `learned_link_local`) when they change, so that
    /// neither sending nor receiving an advertisement, nor a transition, is proportional to
    /// the number of addresses (see [`Addresses`]).
    addresses: Addresses,
}

/// An instance's addresses in the shapes its hot paths need, built once per configuration.
#[derive(Debug, Clone)]
struct Addresses {
    /// `config.addresses`, shared with every add/remove output.
    nets: Arc<[IpNet]>,
    /// Their addresses, shared with every announcement.
    addrs: Arc<[IpAddr]>,
    /// For [`Instance::holds`].
    set: HashSet<IpNet>,
    /// What our advertisements list (at most [`max_advertised`]).
    advertised: Vec<IpAddr>,
    /// `advertised`, sorted: a received list is compared with it in O(n log n) at worst.
    advertised_sorted: Vec<IpAddr>,
}

impl Addresses {
    fn new(config: &Config, learned_link_local: Option<Ipv6Addr>) -> Addresses {
        let nets: Arc<[IpNet]> = config.addresses.as_slice().into();
        let addrs: Arc<[IpAddr]> = nets.iter().map(IpNet::addr).collect();
        let link_local_configured =
            matches!(addrs.first(), Some(IpAddr::V6(a)) if a.is_unicast_link_local());
        let learned = learned_link_local
            .filter(|_| !link_local_configured)
            .map(IpAddr::V6);
        let advertised: Vec<IpAddr> = learned
            .into_iter()
            .chain(addrs.iter().copied())
            .take(max_advertised(config.family()))
            .collect();
        let mut advertised_sorted = advertised.clone();
        advertised_sorted.sort_unstable();
        Addresses {
            set: nets.iter().copied().collect(),
            nets,
            addrs,
            advertised,
            advertised_sorted,
        }
    }
}

impl Instance {
    /// In Initialize; nothing happens until [`Input::Startup`].
    pub fn new(mut config: Config) -> Self {
        config.priority = config.priority.max(1);
        let master_adver_interval = config.effective_advert_interval();
        Instance {
            addresses: Addresses::new(&config, None),
            config,
            state: State::Initialize,
            deadline: None,
            master: None,
            master_adver_interval,
            leaving_master: None,
            preempting: None,
            preempt_hold_since: None,
            learned_link_local: None,
            reannounce: None,
            last_heard: None,
            counters: Counters::default(),
        }
    }

    /// Appends to `out` what the driver must do, in order. Never reads a clock.
    pub fn handle(&mut self, now: Instant, input: Input, out: &mut Vec<Output>) {
        match input {
            Input::Startup => self.startup(now, out),
            Input::Advertisement {
                source,
                advertisement,
            } => self.receive(now, source, &advertisement, out),
            Input::Timer => self.timer(now, out),
            Input::SetPriority(priority) => self.config.priority = priority.max(1),
            Input::Reconfigure(config) => self.reconfigure(now, config, out),
            Input::Shutdown => self.leave(Reason::Shutdown, out),
            Input::Hold(duration) => self.hold(duration, out),
            Input::Fault => self.leave(Reason::AddressFault, out),
            Input::Adopt => {
                if self.state == State::Initialize {
                    self.preempt_hold_since = Some(now);
                    self.become_master(now, Reason::Adopted, out);
                }
            }
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When [`Input::Timer`] is due: the advertisement timer as Master, the master-down timer
    /// as Backup, none in Initialize. A Timer delivered before this instant is ignored.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The last known master: ourselves when Master, the source of the latest advertisement
    /// when Backup (cleared when that master leaves with priority 0), none in Initialize.
    pub fn master(&self) -> Option<IpAddr> {
        self.master
    }

    /// v3: learned from the master's advertisements (our own interval until then and while
    /// Master). v2: always our configured interval.
    pub fn master_adver_interval(&self) -> Duration {
        self.master_adver_interval
    }

    /// v3: ((256 − Priority) × Master_Adver_Interval) / 256. v2: (256 − Priority) / 256 s.
    pub fn skew_time(&self) -> Duration {
        let base = match self.config.version {
            Version::V3 => self.master_adver_interval,
            Version::V2 => Duration::from_secs(1),
        };
        base * (256 - u32::from(self.config.priority)) / 256
    }

    /// 3 × Master_Adver_Interval + Skew_Time.
    pub fn master_down_interval(&self) -> Duration {
        3 * self.master_adver_interval + self.skew_time()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The link-local a peer's advertisement taught this instance (IPv6 without a configured
    /// link-local only), if any.
    pub fn learned_link_local(&self) -> Option<Ipv6Addr> {
        self.learned_link_local
    }

    /// The IPvX address list of our advertisements, at most [`max_advertised`] long.
    ///
    /// IPv6 (RFC 5798 / RFC 9568 §5.2.9: the first address is the virtual router's
    /// link-local): a configured link-local is first already. Without one, the list starts
    /// with the link-local a peer's advertisement listed first, once one has been heard, and
    /// otherwise holds the configured addresses only. That is what keepalived sends when
    /// configured the way its users write it (`virtual_ipaddress { 2001:db8::100/64 }`), and
    /// keepalived up to 2.3.2 drops every advertisement whose address count differs from its
    /// own list ("received an unexpected ip number count"); a leading link-local nobody
    /// configured made it a second master.
    pub fn advertised_addresses(&self) -> &[IpAddr] {
        &self.addresses.advertised
    }

    /// Whether `net` is one of the configured addresses (O(1)).
    pub fn holds(&self, net: &IpNet) -> bool {
        self.addresses.set.contains(net)
    }

    /// The configured addresses, shared.
    pub fn addresses(&self) -> &Arc<[IpNet]> {
        &self.addresses.nets
    }

    /// IPv6 and the configuration's first address is a link-local.
    fn link_local_configured(&self) -> bool {
        matches!(self.config.addresses.first().map(IpNet::addr), Some(IpAddr::V6(a)) if a.is_unicast_link_local())
    }

    /// Learns the link-local an IPv6 peer of this VRID lists first, when ours has none; true
    /// when this advertisement taught it.
    fn learn_link_local(&mut self, advertisement: &Advertisement) -> bool {
        if self.learned_link_local.is_some()
            || self.config.family() != Family::V6
            || self.link_local_configured()
        {
            return false;
        }
        match advertisement.addresses.first() {
            Some(IpAddr::V6(first)) if first.is_unicast_link_local() => {
                self.learned_link_local = Some(*first);
                self.addresses = Addresses::new(&self.config, self.learned_link_local);
                self.counters.link_local_learned += 1;
                true
            }
            _ => false,
        }
    }

    fn is_owner(&self) -> bool {
        self.config.priority == PRIORITY_OWNER
    }

    fn preempts(&self) -> bool {
        self.config.preempt || self.is_owner()
    }

    fn startup(&mut self, now: Instant, out: &mut Vec<Output>) {
        if self.state != State::Initialize {
            return;
        }
        self.preempt_hold_since = Some(now);
        self.master_adver_interval = self.config.effective_advert_interval();
        if self.is_owner() {
            self.become_master(now, Reason::Owner, out);
        } else {
            self.master = None;
            self.become_backup(now, Reason::Startup, out);
        }
    }

    fn receive(
        &mut self,
        now: Instant,
        source: IpAddr,
        advertisement: &Advertisement,
        out: &mut Vec<Output>,
    ) {
        self.counters.adverts_received += 1;
        if advertisement.version != self.config.version
            || advertisement.vrid != self.config.vrid
            || advertisement.interval == 0
        {
            self.counters.discarded_invalid += 1;
            return;
        }
        if self.state == State::Initialize {
            self.counters.discarded_not_running += 1;
            return;
        }
        // Before any discard below: an owner or a master hears its peers' lists too, and a peer
        // that drops our list would otherwise stay a second master.
        let taught = self.learn_link_local(advertisement);
        if self.config.version == Version::V2
            && advertisement.interval != self.config.wire_interval()
        {
            self.counters.discarded_interval_mismatch += 1;
            return;
        }
        if self.is_owner() {
            self.counters.discarded_as_owner += 1;
        } else {
            if advertisement.priority == PRIORITY_LEAVING {
                self.counters.priority_zero_received += 1;
            }
            if !self.same_addresses(&advertisement.addresses) {
                self.counters.address_list_mismatch += 1;
            }
            match self.state {
                State::Backup => self.receive_as_backup(now, source, advertisement),
                State::Master => self.receive_as_master(now, source, advertisement, out),
                State::Initialize => {}
            }
        }
        if taught && self.state == State::Master {
            self.reassert_taught_list(now, advertisement, out);
        }
    }

    /// A master just learned the link-local from a peer's advertisement: that peer may be a
    /// second master because it dropped our list (keepalived up to 2.3.2). Advertise the list
    /// it accepts now rather than an interval later, and announce our addresses again, since
    /// its announcements moved the neighbours to it.
    fn reassert_taught_list(
        &mut self,
        now: Instant,
        advertisement: &Advertisement,
        out: &mut Vec<Output>,
    ) {
        if advertisement.priority != PRIORITY_LEAVING {
            // (A priority 0 was answered at once already.)
            self.send(self.config.priority, out);
            self.deadline = Some(now + self.config.effective_advert_interval());
        }
        out.push(Output::Announce(self.addresses.addrs.clone()));
        self.reannounce = Some((now, 0));
    }

    /// The later announcements of [`REANNOUNCE_AFTER_TEACHING`], with a master's advert.
    fn reannounce_if_due(&mut self, now: Instant, out: &mut Vec<Output>) {
        let Some((since, next)) = self.reannounce else {
            return;
        };
        if now.saturating_duration_since(since) < REANNOUNCE_AFTER_TEACHING[next] {
            return;
        }
        out.push(Output::Announce(self.addresses.addrs.clone()));
        self.reannounce = (next + 1 < REANNOUNCE_AFTER_TEACHING.len()).then_some((since, next + 1));
    }

    fn receive_as_backup(&mut self, now: Instant, source: IpAddr, advertisement: &Advertisement) {
        self.last_heard = Some(now);
        if advertisement.priority == PRIORITY_LEAVING {
            self.deadline = Some(now + self.skew_time());
            self.leaving_master = Some(source);
            self.preempting = None;
            if self.master == Some(source) {
                self.master = None;
            }
            return;
        }
        let ours = self.config.priority;
        if advertisement.priority > ours {
            self.preempt_hold_since = None;
        }
        self.master = Some(source);
        if advertisement.priority < ours && self.preempts() && !self.preemption_held(now) {
            self.counters.discarded_lower_priority += 1;
            self.preempting = Some((source, advertisement.priority));
            return;
        }
        self.learn_interval(advertisement);
        self.leaving_master = None;
        self.preempting = None;
        self.deadline = Some(now + self.master_down_interval());
    }

    fn receive_as_master(
        &mut self,
        now: Instant,
        source: IpAddr,
        advertisement: &Advertisement,
        out: &mut Vec<Output>,
    ) {
        if advertisement.priority == PRIORITY_LEAVING {
            // Another master is leaving: reassert at once so its backups do not race for it.
            self.send(self.config.priority, out);
            self.deadline = Some(now + self.config.effective_advert_interval());
            return;
        }
        let ours = self.config.priority;
        let reason = if advertisement.priority > ours {
            Reason::HigherPriority {
                from: source,
                priority: advertisement.priority,
            }
        } else if advertisement.priority == ours
            && address_above(source, self.config.primary_address)
        {
            Reason::TieBreak { from: source }
        } else {
            self.counters.discarded_lower_priority += 1;
            return;
        };
        if advertisement.priority > ours {
            self.preempt_hold_since = None;
        }
        self.learn_interval(advertisement);
        self.master = Some(source);
        self.become_backup(now, reason, out);
        self.last_heard = Some(now);
    }

    /// keepalived's preempt_delay: true while a lower-priority master must still be tolerated.
    fn preemption_held(&mut self, now: Instant) -> bool {
        let delay = self.config.preempt_delay;
        if delay.is_zero() || self.is_owner() {
            return false;
        }
        match self.preempt_hold_since {
            None => {
                self.preempt_hold_since = Some(now);
                true
            }
            Some(since) => now.saturating_duration_since(since) < delay,
        }
    }

    fn learn_interval(&mut self, advertisement: &Advertisement) {
        if self.config.version == Version::V3 {
            self.master_adver_interval = advertisement.interval_duration();
        }
    }

    /// The same addresses as ours in any order: O(n) when in our order (the common case),
    /// O(n log n) otherwise.
    fn same_addresses(&self, advertised: &[IpAddr]) -> bool {
        let ours = &self.addresses;
        if advertised.len() != ours.advertised.len() {
            return false;
        }
        if advertised == ours.advertised.as_slice() {
            return true;
        }
        let mut theirs = advertised.to_vec();
        theirs.sort_unstable();
        theirs == ours.advertised_sorted
    }

    fn timer(&mut self, now: Instant, out: &mut Vec<Output>) {
        match self.deadline {
            Some(deadline) if now >= deadline => {}
            _ => return,
        }
        match self.state {
            State::Master => {
                self.send(self.config.priority, out);
                self.reannounce_if_due(now, out);
                self.deadline = Some(now + self.config.effective_advert_interval());
            }
            State::Backup => {
                let reason = if let Some(from) = self.leaving_master {
                    Reason::PriorityZero { from }
                } else if let Some((from, priority)) = self.preempting {
                    Reason::Preempt { from, priority }
                } else {
                    Reason::MasterDown {
                        last_master: self.master,
                    }
                };
                self.become_master(now, reason, out);
            }
            State::Initialize => self.deadline = None,
        }
    }

    fn reconfigure(&mut self, now: Instant, mut config: Config, out: &mut Vec<Output>) {
        config.priority = config.priority.max(1);
        if config.vrid != self.config.vrid || config.version != self.config.version {
            // A different virtual router: the driver should have recreated the instance. Leave
            // and start over rather than mix two routers' timers and addresses.
            let was_running = self.state != State::Initialize;
            self.leave(Reason::Reconfigured, out);
            *self = Instance {
                counters: self.counters,
                ..Instance::new(config)
            };
            if was_running {
                self.startup(now, out);
            }
            return;
        }
        let addresses = Addresses::new(&config, self.learned_link_local);
        if self.state == State::Master {
            let removed: Arc<[IpNet]> = self
                .addresses
                .nets
                .iter()
                .filter(|net| !addresses.set.contains(net))
                .copied()
                .collect();
            let added: Arc<[IpNet]> = addresses
                .nets
                .iter()
                .filter(|net| !self.addresses.set.contains(net))
                .copied()
                .collect();
            if !removed.is_empty() {
                out.push(Output::RemoveAddresses(removed));
            }
            if !added.is_empty() {
                let announce = Output::Announce(added.iter().map(IpNet::addr).collect());
                out.push(Output::AddAddresses(added));
                out.push(announce);
            }
            // A shorter interval applies now; a longer one from the next advertisement.
            let sooner = now + config.effective_advert_interval();
            self.deadline = Some(self.deadline.map_or(sooner, |d| d.min(sooner)));
        }
        self.config = config;
        self.addresses = addresses;
        if self.state == State::Master || self.config.version == Version::V2 {
            self.master_adver_interval = self.config.effective_advert_interval();
        }
    }

    fn become_master(&mut self, now: Instant, reason: Reason, out: &mut Vec<Output>) {
        let from = self.state;
        let unannounced = match (from, self.last_heard.take()) {
            (State::Backup, Some(heard)) => Some(now.saturating_duration_since(heard)),
            _ => None,
        };
        if matches!(reason, Reason::Preempt { .. }) {
            // The master we preempt is alive and holds the addresses until our advert
            // reaches it: hold and announce them first, so that traffic moves to us before
            // it lets go. Advert first (RFC 5798 §6.4.2's order) left the time of our install
            // and announcement in which neither node took the traffic. Both hold the
            // addresses for that moment, as they do until any preempting advert arrives.
            out.push(Output::AddAddresses(self.addresses.nets.clone()));
            out.push(Output::Announce(self.addresses.addrs.clone()));
            self.send(self.config.priority, out);
        } else {
            // After a crash or a departure nobody holds them: the advert first stops the
            // other backups' timers, then the addresses.
            self.send(self.config.priority, out);
            out.push(Output::AddAddresses(self.addresses.nets.clone()));
            out.push(Output::Announce(self.addresses.addrs.clone()));
        }
        self.state = State::Master;
        self.master = Some(self.config.primary_address);
        self.master_adver_interval = self.config.effective_advert_interval();
        self.leaving_master = None;
        self.preempting = None;
        self.deadline = Some(now + self.master_adver_interval);
        self.transition(from, State::Master, reason, unannounced, out);
    }

    /// The caller has already set `master` and the learned interval.
    fn become_backup(&mut self, now: Instant, reason: Reason, out: &mut Vec<Output>) {
        let from = self.state;
        if from == State::Master {
            out.push(Output::RemoveAddresses(self.addresses.nets.clone()));
        }
        self.state = State::Backup;
        self.leaving_master = None;
        self.preempting = None;
        self.reannounce = None;
        self.last_heard = None;
        self.deadline = Some(now + self.master_down_interval());
        self.transition(from, State::Backup, reason, None, out);
    }

    fn leave(&mut self, reason: Reason, out: &mut Vec<Output>) {
        let from = self.state;
        match from {
            State::Initialize => return,
            State::Master => {
                self.send(PRIORITY_LEAVING, out);
                out.push(Output::RemoveAddresses(self.addresses.nets.clone()));
            }
            State::Backup => {}
        }
        self.state = State::Initialize;
        self.deadline = None;
        self.master = None;
        self.leaving_master = None;
        self.preempting = None;
        self.reannounce = None;
        self.last_heard = None;
        self.transition(from, State::Initialize, reason, None, out);
    }

    fn hold(&mut self, duration: Duration, out: &mut Vec<Output>) {
        if self.state != State::Master || self.config.version == Version::V2 {
            let reason = if self.state == State::Master {
                Reason::Shutdown
            } else {
                Reason::Held
            };
            return self.leave(reason, out);
        }
        // A quarter of the hold, as the backups learn it from the wire: their
        // Master_Down_Interval (3 × it + a skew below one of it) ends before the hold does.
        let centiseconds = Version::V3.interval_to_wire(duration / 4);
        self.send_with_interval(self.config.priority, centiseconds, out);
        self.state = State::Initialize;
        self.deadline = None;
        self.master = None;
        self.leaving_master = None;
        self.preempting = None;
        self.reannounce = None;
        self.last_heard = None;
        self.transition(State::Master, State::Initialize, Reason::Held, None, out);
    }

    fn send(&mut self, priority: u8, out: &mut Vec<Output>) {
        self.send_with_interval(priority, self.config.wire_interval(), out);
    }

    fn send_with_interval(&mut self, priority: u8, interval: u16, out: &mut Vec<Output>) {
        self.counters.adverts_sent += 1;
        if priority == PRIORITY_LEAVING {
            self.counters.priority_zero_sent += 1;
        }
        out.push(Output::Send(Advertisement {
            version: self.config.version,
            vrid: self.config.vrid,
            priority,
            interval,
            addresses: self.addresses.advertised.clone(),
        }));
    }

    fn transition(
        &mut self,
        from: State,
        to: State,
        reason: Reason,
        unannounced: Option<Duration>,
        out: &mut Vec<Output>,
    ) {
        self.counters.transitions += 1;
        match to {
            State::Master => self.counters.became_master += 1,
            State::Backup => self.counters.became_backup += 1,
            State::Initialize => {}
        }
        out.push(Output::Transition {
            from,
            to,
            reason,
            unannounced,
        });
    }
}

/// RFC 5798 §6.4.3: "the primary IPvX address of the sender is greater than the local primary
/// IPvX address", compared as unsigned integers in network byte order, which is what the
/// standard library's ordering of one address family does.
fn address_above(theirs: IpAddr, ours: IpAddr) -> bool {
    match (theirs, ours) {
        (IpAddr::V4(theirs), IpAddr::V4(ours)) => u32::from(theirs) > u32::from(ours),
        (IpAddr::V6(theirs), IpAddr::V6(ours)) => u128::from(theirs) > u128::from(ours),
        // The driver never hands us the other family; never yield to it.
        _ => false,
    }
}

#[cfg(test)]
mod tests;
