//! Virtual addresses on interfaces, via rtnetlink, known as ours.
//!
//! Every address ferrovip adds is recorded in the state directory ([`super::ownership`]) and,
//! where the kernel keeps it (Linux ≥ 6.1, detected at start by a probe), carries the address
//! protocol [`FERROVIP_ADDR_PROTO`] (`IFA_PROTO`; iproute2 releases after 6.1 show it as
//! `proto` in `ip -d addr`, Debian 12's 6.1 does not). So an agent that restarts after a crash
//! finds the addresses its predecessor left behind, and never removes an address somebody
//! else configured, even one with the same value (adding an address that is already there
//! does not make it ours).
//!
//! Masters' addresses carry a short finite lifetime that the engine renews
//! ([`AddressManager::renew`], many requests per `sendmsg`), so the kernel itself removes the
//! addresses of an agent that died or hangs. [`AddressWatcher`] reads the kernel's address
//! notifications so that the engine can put back an address that disappeared.
//!
//! Bulk address sets: an IPv4 set of more than [`AddressManager::bulk_threshold`] addresses
//! given for one interface in one call is installed as one interface address of ours, the
//! *anchor* (the lowest address, marked, recorded, with the lifetime), plus the exact CIDR
//! cover of the rest of the set as `local` routes of ours in table main whose preferred
//! source is the anchor ([`super::route`]): a handful of routes instead of thousands of
//! interface addresses (adding IPv4 addresses is quadratic in the kernel). The kernel flushes
//! the routes with the anchor (`fib_sync_down_addr`, only once the anchor's address is no
//! longer local: so the routes do not cover the anchor), so renewing the anchor's lifetime
//! keeps the whole set and a dead agent's set expires with it. Every request, whatever the kind, goes out in batches (many requests
//! per `sendmsg`, [`Batcher`]) with each refusal mapped back to its address.
//!
//! Choices:
//! - IPv6 VIPs are added with `IFA_F_NODAD`: VRRP already guarantees that one node holds the
//!   address, and duplicate address detection would keep it tentative (unusable as a source,
//!   not answered for) for about a second after every failover.
//! - The kernel's prefix route is kept (no `IFA_F_NOPREFIXROUTE`), like keepalived: a VIP
//!   given with its subnet's prefix makes that subnet reachable on the interface; a /32 or
//!   /128 VIP adds only the local route either way.
//! - Before adding an IPv4 address, `promote_secondaries` is turned on for the interface
//!   (keepalived does the same): should our VIP be the primary address of its subnet,
//!   deleting it would otherwise delete every secondary address of that subnet with it,
//!   including addresses that are not ours.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkMessage, NetlinkPayload,
};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol, CacheInfo,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::protocols::NETLINK_ROUTE;
use netlink_sys::{Socket, SocketAddr};
use rtnetlink::Handle;
use tokio::sync::mpsc;

use super::ndp::{Memberships, NdpResponder};
use super::ownership::{AddressRecord, OwnershipMode};
use super::route::{OwnedRoute, cover_addresses, local_route};

/// `IFA_PROTO` value marking addresses added by ferrovip ('F'). The kernel reserves 0-3
/// (unspec, loopback, router advertisement, link-local); other values are free for user
/// space and no common tool uses this one.
pub const FERROVIP_ADDR_PROTO: u8 = super::route::FERROVIP_ROUTE_PROTO;

const ENODEV: i32 = libc::ENODEV;
const EEXIST: i32 = libc::EEXIST;
const ENOENT: i32 = libc::ENOENT;
const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// The rtnetlink request that failed, for messages and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetlinkOp {
    GetLink,
    GetAddr,
    AddAddr,
    DelAddr,
    RenewAddr,
    GetRoute,
    AddRoute,
    DelRoute,
}

impl NetlinkOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetLink => "get_link",
            Self::GetAddr => "get_addr",
            Self::AddAddr => "add_addr",
            Self::DelAddr => "del_addr",
            Self::RenewAddr => "renew_addr",
            Self::GetRoute => "get_route",
            Self::AddRoute => "add_route",
            Self::DelRoute => "del_route",
        }
    }
}

impl fmt::Display for NetlinkOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("cannot open an rtnetlink socket")]
    Connect(#[source] io::Error),
    #[error("no tokio runtime to drive the rtnetlink connection")]
    NoRuntime(#[source] tokio::runtime::TryCurrentError),
    #[error("interface {0} not found")]
    LinkNotFound(String),
    #[error("rtnetlink {op} failed")]
    Netlink {
        op: NetlinkOp,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "cannot set {} ({source}){}",
        path.display(),
        if source.raw_os_error() == Some(libc::EROFS) || source.kind() == io::ErrorKind::PermissionDenied {
            ": /proc/sys is read-only here (an unprivileged container): set it beforehand with `ferrovip node-setup --interface <name>` (the chart's init container) or on the host"
        } else {
            ""
        }
    )]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("address renewal over netlink failed")]
    Renew(#[source] io::Error),
    #[error("rtnetlink {op} for {net} refused: {}", io::Error::from_raw_os_error(*errno))]
    Refused {
        op: NetlinkOp,
        net: IpNet,
        errno: i32,
    },
    #[error("batched rtnetlink exchange failed")]
    Batch(#[source] io::Error),
    #[error("cannot write the address record {}", path.display())]
    Record {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl AddrError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::NoRuntime(_) => "no_runtime",
            Self::LinkNotFound(_) => "link_not_found",
            Self::Netlink { op, .. } => op.as_str(),
            Self::Sysctl { .. } => "sysctl",
            Self::Renew(_) => "renew",
            Self::Refused { op, .. } => op.as_str(),
            Self::Batch(_) => "batch",
            Self::Record { .. } => "record",
        }
    }

    /// The kernel's errno (positive, e.g. `libc::EPERM`) when netlink refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Sysctl { source, .. } => source.raw_os_error(),
            Self::Renew(source) | Self::Batch(source) => source.raw_os_error(),
            Self::Refused { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

/// Positive errno of a netlink NACK.
pub(crate) fn netlink_errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => message.code.map(|code| -code.get()),
        _ => None,
    }
}

/// What the kernel reports about one interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkInfo {
    pub index: u32,
    pub name: String,
    /// All zeros for links without an Ethernet address.
    pub mac: [u8; 6],
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// The lower layer reports carrier (cable, peer, parent up).
    pub carrier: bool,
    pub mtu: u32,
}

impl LinkInfo {
    pub(crate) fn from_message(message: &LinkMessage) -> Self {
        let mut info = LinkInfo {
            index: message.header.index,
            name: String::new(),
            mac: [0; 6],
            up: message.header.flags.contains(LinkFlags::Up),
            carrier: message.header.flags.contains(LinkFlags::LowerUp),
            mtu: 0,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => info.name.clone_from(name),
                LinkAttribute::Address(mac) => {
                    if let Ok(mac) = <[u8; 6]>::try_from(mac.as_slice()) {
                        info.mac = mac;
                    }
                }
                LinkAttribute::Carrier(carrier) => info.carrier = *carrier != 0,
                LinkAttribute::Mtu(mtu) => info.mtu = *mtu,
                _ => {}
            }
        }
        info
    }
}

/// One address as the kernel reports it.
#[derive(Debug, Clone)]
struct KernelAddress {
    index: u32,
    net: IpNet,
    /// Carries our `IFA_PROTO` mark (only a kernel ≥ 6.1 reports it).
    marked: bool,
    flags: AddressFlags,
    /// Valid lifetime in seconds; `None` for forever.
    valid_lifetime: Option<u32>,
    message: AddressMessage,
}

impl KernelAddress {
    fn from_message(message: AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut address = None;
        let mut marked = false;
        let mut valid_lifetime = None;
        let mut flags = AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()));
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Protocol(proto) => {
                    marked = u8::from(*proto) == FERROVIP_ADDR_PROTO;
                }
                AddressAttribute::Flags(all) => flags = *all,
                AddressAttribute::CacheInfo(info) if info.ifa_valid != u32::MAX => {
                    valid_lifetime = Some(info.ifa_valid)
                }
                _ => {}
            }
        }
        // IFA_ADDRESS is the peer on point-to-point links; IFA_LOCAL is ours when present.
        let ip = local.or(address)?;
        let net = IpNet::new(ip, message.header.prefix_len).ok()?;
        Some(Self {
            index: message.header.index,
            net,
            marked,
            flags,
            valid_lifetime,
            message,
        })
    }
}

/// Where a probe address goes to learn whether the kernel keeps `IFA_PROTO`: a host route in
/// 127/8 on `lo`, which is local already, so nothing can notice it for the instant it exists.
const PROBE_ADDRESS: Ipv4Addr = Ipv4Addr::new(127, 70, 70, 70);
/// Requests per `sendmsg` of a batch: each error a batch can produce fits the receive buffer.
const BATCH: usize = 256;
/// Default of [`AddressManager::with_bulk_threshold`] (the agent's `--bulk-threshold`).
pub const DEFAULT_BULK_THRESHOLD: usize = 64;
const ESRCH: i32 = libc::ESRCH;

/// Calls that installed interface addresses instead of a bulk set because the interface's
/// effective `arp_ignore` is not 0 (exported as `ferrovip_bulk_arp_ignore_fallbacks_total`).
static ARP_IGNORE_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many bulk installs fell back to interface addresses because of `arp_ignore`.
pub fn arp_ignore_fallbacks() -> u64 {
    ARP_IGNORE_FALLBACKS.load(Ordering::Relaxed)
}

/// Calls that installed IPv6 interface addresses instead of a bulk set because the NDP
/// responder could not start (exported as `ferrovip_bulk_ndp_fallbacks_total`).
static NDP_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// How many IPv6 bulk installs fell back to interface addresses (no NDP responder).
pub fn ndp_fallbacks() -> u64 {
    NDP_FALLBACKS.load(Ordering::Relaxed)
}

/// One bulk set on one interface: its anchor (an interface address of ours, whose prefix
/// length and family every member shares), its members and the routes covering them.
#[derive(Debug, Clone, PartialEq, Eq)]
struct BulkSet {
    index: u32,
    anchor: IpNet,
    /// Sorted, without duplicates; the anchor is the first.
    members: Vec<IpAddr>,
    /// The exact CIDR cover of the members but the anchor.
    covers: Vec<IpNet>,
    lifetime: Option<Duration>,
    /// Its anchor or a route went away (notification) and it was not installed again yet.
    lost: bool,
    /// IPv6: until when its routes are valid (the lifetime last given to them; `None`:
    /// forever). The NDP responder answers for its members only until then, so that a hung
    /// engine's addresses stop being answered for when the kernel stops accepting them.
    valid_until: Option<Instant>,
}

impl BulkSet {
    /// `members` sorted and deduplicated, not empty, of one family.
    fn new(index: u32, prefix: u8, members: Vec<IpAddr>, lifetime: Option<Duration>) -> Self {
        let anchor = IpNet::new(members[0], prefix).expect("prefix of a valid net");
        Self {
            index,
            anchor,
            // Not the anchor: the kernel flushes the routes of a deleted IPv4 address only
            // when that address is no longer local, which a route covering it would keep it.
            covers: super::route::cidr_cover(&members[1..]),
            members,
            lifetime,
            lost: false,
            valid_until: valid_until(lifetime),
        }
    }

    /// This set with `more` members, all above the anchor (which stays): the routes of the
    /// new cover replace the old ones.
    fn grown(&self, more: impl IntoIterator<Item = IpAddr>) -> BulkSet {
        let mut members: BTreeSet<IpAddr> = self.members.iter().copied().collect();
        members.extend(more.into_iter().filter(|ip| *ip > self.anchor.addr()));
        let members: Vec<IpAddr> = members.into_iter().collect();
        BulkSet {
            index: self.index,
            anchor: self.anchor,
            covers: super::route::cidr_cover(&members[1..]),
            members,
            lifetime: self.lifetime,
            lost: false,
            valid_until: self.valid_until,
        }
    }

    fn member_nets(&self) -> impl Iterator<Item = IpNet> + '_ {
        let prefix = self.anchor.prefix_len();
        self.members
            .iter()
            .map(move |ip| IpNet::new(*ip, prefix).expect("valid prefix"))
    }

    fn anchor_net(&self) -> IpNet {
        self.anchor
    }

    fn is_v6(&self) -> bool {
        matches!(self.anchor, IpNet::V6(_))
    }

    /// The RTM_NEWROUTE body of one of its routes (IPv6: expiring with its lifetime).
    fn route(&self, cover: IpNet) -> netlink_packet_route::route::RouteMessage {
        local_route(
            self.index,
            cover,
            self.anchor.addr(),
            route_expiry(self.lifetime),
        )
    }
}

/// The members of an IPv6 set held by its routes (all but the anchor, an interface address
/// whose group the kernel joins); none for IPv4.
fn route_held_v6(set: &BulkSet) -> Vec<Ipv6Addr> {
    if !set.is_v6() {
        return Vec::new();
    }
    set.members[1..]
        .iter()
        .filter_map(|ip| match ip {
            IpAddr::V6(v6) => Some(*v6),
            IpAddr::V4(_) => None,
        })
        .collect()
}

/// When a lifetime given now runs out (`None`: never).
fn valid_until(lifetime: Option<Duration>) -> Option<Instant> {
    lifetime.map(|d| Instant::now() + Duration::from_secs(u64::from(lifetime_seconds(Some(d)))))
}

/// `RTA_EXPIRES` of an IPv6 route for a lifetime: whole seconds as the address's
/// (`None`: no expiry).
fn route_expiry(lifetime: Option<Duration>) -> Option<u32> {
    lifetime.map(|d| lifetime_seconds(Some(d)))
}

/// The bulk sets this manager installed or adopted, shared with the address watcher and the
/// NDP responder.
#[derive(Debug, Default)]
struct BulkSets {
    /// By (interface, anchor address).
    sets: HashMap<(u32, IpAddr), BulkSet>,
    /// (interface, member address) → its set's anchor.
    member_of: HashMap<(u32, IpAddr), IpAddr>,
    /// Interfaces already warned about `arp_ignore`.
    arp_warned: HashSet<u32>,
    /// Interfaces whose IPv6 sets the NDP responder answers for, with the MAC it answers.
    ndp_macs: HashMap<u32, [u8; 6]>,
    /// The NDP responder's group memberships: the solicited-node groups of IPv6 sets'
    /// route-held members are joined while the sets are here (MLD-snooping switches forward
    /// solicitations only to ports that joined).
    memberships: Option<Memberships>,
}

impl BulkSets {
    fn insert(&mut self, set: BulkSet) {
        for ip in &set.members {
            self.member_of.insert((set.index, *ip), set.anchor.addr());
        }
        let key = (set.index, set.anchor.addr());
        let replaced = self.sets.insert(key, set);
        if let Some(memberships) = &self.memberships {
            let left = replaced.as_ref().map(route_held_v6).unwrap_or_default();
            memberships.change(key.0, route_held_v6(&self.sets[&key]), left);
        }
    }

    fn take(&mut self, index: u32, anchor: IpAddr) -> Option<BulkSet> {
        let set = self.sets.remove(&(index, anchor))?;
        for ip in &set.members {
            if self.member_of.get(&(index, *ip)) == Some(&anchor) {
                self.member_of.remove(&(index, *ip));
            }
        }
        if let Some(memberships) = &self.memberships {
            memberships.leave(index, route_held_v6(&set));
        }
        Some(set)
    }

    /// From now on the sets' members' groups are joined through `memberships`, those of the
    /// sets already here at once. Only the first call counts (one responder per manager).
    fn attach_memberships(&mut self, memberships: Memberships) {
        if self.memberships.is_some() {
            return;
        }
        for set in self.sets.values() {
            memberships.join(set.index, route_held_v6(set));
        }
        self.memberships = Some(memberships);
    }

    /// The anchor of the set `net` belongs to (same prefix length).
    fn anchor_of(&self, index: u32, net: &IpNet) -> Option<IpAddr> {
        let anchor = *self.member_of.get(&(index, net.addr()))?;
        let set = self.sets.get(&(index, anchor))?;
        (set.anchor.prefix_len() == net.prefix_len()).then_some(anchor)
    }

    /// The live set (not lost) of this family and prefix length on this interface, the
    /// lowest-anchored if there are several.
    fn live_set(&self, index: u32, v6: bool, prefix: u8) -> Option<&BulkSet> {
        self.sets
            .values()
            .filter(|s| {
                s.index == index && s.is_v6() == v6 && s.anchor.prefix_len() == prefix && !s.lost
            })
            .min_by_key(|s| s.anchor.addr())
    }

    /// Whether `net` is a member, not the anchor, of a live set: local through its routes,
    /// whatever happens to an interface address of the same address.
    fn route_held(&self, index: u32, net: &IpNet) -> bool {
        self.anchor_of(index, net).is_some_and(|anchor| {
            anchor != net.addr() && self.sets.get(&(index, anchor)).is_some_and(|s| !s.lost)
        })
    }

    /// The MAC the NDP responder answers a solicitation for `target` on `index` with: when it
    /// is a route-held member (the kernel answers for the anchor, an interface address) of a
    /// live IPv6 set whose routes have not expired.
    fn ndp_answer(&self, index: u32, target: Ipv6Addr, now: Instant) -> Option<[u8; 6]> {
        let ip = IpAddr::V6(target);
        let anchor = *self.member_of.get(&(index, ip))?;
        let set = self.sets.get(&(index, anchor))?;
        let valid = set.valid_until.is_none_or(|until| now < until);
        (anchor != ip && !set.lost && valid)
            .then(|| self.ndp_macs.get(&index).copied())
            .flatten()
    }

    /// The set anchored at `anchor` went away (its anchor, or a route of `covers`): every
    /// member counts as removed, once. `None` when it is no set of ours.
    fn lose(
        &mut self,
        index: u32,
        anchor: IpNet,
        cover: Option<IpNet>,
    ) -> Option<Vec<AddressEvent>> {
        let set = self.sets.get_mut(&(index, anchor.addr()))?;
        match cover {
            None if set.anchor != anchor => return None,
            Some(cover) if !set.covers.contains(&cover) => return None,
            _ => {}
        }
        if set.lost {
            return Some(Vec::new());
        }
        set.lost = true;
        Some(
            set.member_nets()
                .map(|net| AddressEvent::Removed { index, net })
                .collect(),
        )
    }
}

/// What a failed request of a batch is blamed on.
type Blame = Vec<IpNet>;
/// Receive buffer of the renewal and notification sockets (forced, as root).
const NETLINK_RCVBUF: usize = 4 << 20;

/// Adds, finds and removes ferrovip's virtual addresses over one rtnetlink connection.
#[derive(Debug, Clone)]
pub struct AddressManager {
    handle: Handle,
    mode: OwnershipMode,
    record: Arc<Mutex<AddressRecord>>,
    renewer: Arc<Mutex<Option<Batcher>>>,
    bulk: Arc<Mutex<BulkSets>>,
    bulk_threshold: usize,
    /// Answers neighbour solicitations for IPv6 sets' members (started with the first).
    ndp: Arc<Mutex<Option<Arc<NdpResponder>>>>,
}

/// How one renewal went.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RenewReport {
    /// Requests sent (our addresses among those asked for).
    pub renewed: usize,
    /// `sendmsg` calls they took.
    pub writes: usize,
    /// Addresses the kernel refused, with its errno.
    pub failed: Vec<(u32, IpNet, i32)>,
}

/// What the address notifications (and failed adds) tell the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressEvent {
    /// An address went away (deleted, expired, or removed with its interface).
    Removed { index: u32, net: IpNet },
    /// Adding (or renewing) one of our addresses failed.
    Failed {
        index: u32,
        net: IpNet,
        error: String,
    },
    /// Notifications were lost (the socket's receive buffer overran).
    Lost,
}

impl AddressManager {
    /// Wraps a handle whose connection task the caller already spawned. Ownership by the
    /// kernel's mark, with a record kept in memory only.
    pub fn new(handle: Handle) -> Self {
        Self {
            handle,
            mode: OwnershipMode::KernelMark,
            record: Arc::new(Mutex::new(AddressRecord::in_memory())),
            renewer: Arc::new(Mutex::new(None)),
            bulk: Arc::new(Mutex::new(BulkSets::default())),
            bulk_threshold: DEFAULT_BULK_THRESHOLD,
            ndp: Arc::new(Mutex::new(None)),
        }
    }

    /// IPv4 sets of more than `threshold` addresses for one interface in one call are
    /// installed as an anchor and `local` routes (see the module's documentation); 0 never.
    pub fn with_bulk_threshold(mut self, threshold: usize) -> Self {
        self.bulk_threshold = threshold;
        self
    }

    pub fn bulk_threshold(&self) -> usize {
        self.bulk_threshold
    }

    fn bulk(&self) -> MutexGuard<'_, BulkSets> {
        self.bulk.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a connection in the current network namespace and spawns its task on the
    /// current tokio runtime. Strict checking makes the kernel filter address dumps by
    /// interface instead of sending every address of the host. Ownership by the kernel's
    /// mark; see [`AddressManager::connect_with_record`] for the agent's.
    pub fn connect() -> Result<Self, AddrError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(AddrError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(AddrError::Connect)?;
        runtime.spawn(connection);
        let manager = Self::new(handle);
        // The batch socket belongs to the namespace of the thread that opens it: this one.
        if let Err(e) = manager.open_batcher() {
            tracing::debug!(error = %e, "cannot open the batch socket yet");
        }
        Ok(manager)
    }

    /// The agent's manager: the record of `state_dir`, and the given ownership mode, or with
    /// `None` the one this kernel supports (a probe: see [`AddressManager::kernel_keeps_mark`]).
    pub async fn connect_with_record(
        state_dir: &Path,
        mode: Option<OwnershipMode>,
    ) -> Result<Self, AddrError> {
        let mut manager = Self::connect()?;
        manager.mode = match mode {
            Some(mode) => mode,
            None => match manager.kernel_keeps_mark().await {
                Ok(true) => OwnershipMode::KernelMark,
                Ok(false) => OwnershipMode::StateDir,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot probe whether the kernel keeps address marks; relying on the state directory");
                    OwnershipMode::StateDir
                }
            },
        };
        manager.record = Arc::new(Mutex::new(AddressRecord::load(state_dir)));
        Ok(manager)
    }

    /// The same manager (ownership mode, record, renewer) over a new netlink connection
    /// whose task runs on the current tokio runtime: a thread that must not spend its time in
    /// the kernel's address handlers (the VRRP engine's) leaves them to another thread this
    /// way, since a netlink request runs in the context of the thread whose task sends it.
    pub fn reconnect(&self) -> Result<Self, AddrError> {
        let fresh = Self::connect()?;
        Ok(Self {
            handle: fresh.handle,
            mode: self.mode,
            record: self.record.clone(),
            renewer: self.renewer.clone(),
            bulk: self.bulk.clone(),
            bulk_threshold: self.bulk_threshold,
            ndp: self.ndp.clone(),
        })
    }

    /// How this manager recognises its addresses.
    pub fn mode(&self) -> OwnershipMode {
        self.mode
    }

    /// Where the record is kept (`None`: in memory only).
    pub fn record_path(&self) -> Option<PathBuf> {
        self.record().path().map(Path::to_path_buf)
    }

    fn record(&self) -> MutexGuard<'_, AddressRecord> {
        self.record.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the record if it changed.
    pub fn flush_record(&self) -> Result<(), AddrError> {
        let mut record = self.record();
        record.flush().map_err(|source| AddrError::Record {
            path: record.path().map(Path::to_path_buf).unwrap_or_default(),
            source,
        })
    }

    /// Whether the kernel keeps `IFA_PROTO` (Linux ≥ 6.1; older kernels accept the attribute
    /// and drop it): adds a marked probe address to `lo` (127.70.70.70/32, inside the
    /// loopback range that is local already), reads it back and deletes it. Asking the kernel
    /// rather than comparing version numbers also gets backports right.
    pub async fn kernel_keeps_mark(&self) -> Result<bool, AddrError> {
        let lo = self.link("lo").await?.index;
        let probe = IpNet::V4(ipnet::Ipv4Net::new(PROBE_ADDRESS, 32).expect("a /32"));
        let mut request = self.handle.address().add(lo, probe.addr(), 32);
        request
            .message_mut()
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                FERROVIP_ADDR_PROTO,
            )));
        match request.execute().await {
            Ok(()) => {}
            // A probe left by an agent that died during its own probe: read it all the same.
            Err(source) if netlink_errno(&source) == Some(EEXIST) => {}
            Err(source) => {
                return Err(AddrError::Netlink {
                    op: NetlinkOp::AddAddr,
                    source,
                });
            }
        }
        let found = self
            .addresses(Some(lo), AddressFamily::Inet)
            .await?
            .into_iter()
            .find(|a| a.net == probe);
        let keeps = found.as_ref().is_some_and(|a| a.marked);
        if let Some(found) = found {
            self.delete(found.message).await?;
        }
        Ok(keeps)
    }

    fn is_ours(&self, address: &KernelAddress) -> bool {
        (self.mode == OwnershipMode::KernelMark && address.marked)
            || self.record().contains(address.index, address.net)
    }

    /// The underlying handle, to share the connection (e.g. with the macvlan manager).
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    pub async fn link(&self, name: &str) -> Result<LinkInfo, AddrError> {
        let request = self.handle.link().get().match_name(name);
        self.single_link(request, name.to_owned()).await
    }

    pub async fn link_by_index(&self, index: u32) -> Result<LinkInfo, AddrError> {
        let request = self.handle.link().get().match_index(index);
        self.single_link(request, index.to_string()).await
    }

    async fn single_link(
        &self,
        request: rtnetlink::LinkGetRequest,
        wanted: String,
    ) -> Result<LinkInfo, AddrError> {
        let mut links = request.execute();
        match links.try_next().await {
            Ok(Some(message)) => Ok(LinkInfo::from_message(&message)),
            Ok(None) => Err(AddrError::LinkNotFound(wanted)),
            Err(source) if netlink_errno(&source) == Some(ENODEV) => {
                Err(AddrError::LinkNotFound(wanted))
            }
            Err(source) => Err(AddrError::Netlink {
                op: NetlinkOp::GetLink,
                source,
            }),
        }
    }

    /// The address VRRPv2/v3 over IPv4 sends from: the first primary (non-secondary) IPv4
    /// address of the interface that is not one of ours.
    pub async fn primary_ipv4(&self, index: u32) -> Result<Option<Ipv4Addr>, AddrError> {
        let addresses = self.addresses(Some(index), AddressFamily::Inet).await?;
        Ok(addresses
            .iter()
            .find_map(|address| match address.net.addr() {
                IpAddr::V4(ip)
                    if !self.is_ours(address)
                        && !address.flags.contains(AddressFlags::Secondary) =>
                {
                    Some(ip)
                }
                _ => None,
            }))
    }

    /// The address VRRP over IPv6 and unsolicited NAs are sent from: a link-local address
    /// of the interface that finished duplicate address detection and is not one of ours (the
    /// virtual router's link-local is the same on every node and would break the tie-break).
    pub async fn link_local_v6(&self, index: u32) -> Result<Option<Ipv6Addr>, AddrError> {
        let addresses = self.addresses(Some(index), AddressFamily::Inet6).await?;
        let unusable = AddressFlags::Tentative | AddressFlags::Dadfailed;
        Ok(addresses
            .iter()
            .find_map(|address| match address.net.addr() {
                IpAddr::V6(ip)
                    if ip.is_unicast_link_local()
                        && !self.is_ours(address)
                        && !address.flags.intersects(unusable) =>
                {
                    Some(ip)
                }
                _ => None,
            }))
    }

    /// The interface's own subnets (not ours), as address and prefix: the first primary IPv4
    /// address, and the first global IPv6 address, else the first link-local one.
    pub async fn own_subnets(
        &self,
        index: u32,
    ) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>), AddrError> {
        let addresses = self.addresses(Some(index), AddressFamily::Unspec).await?;
        let mut v4 = None;
        let (mut global, mut link_local) = (None, None);
        for address in addresses.iter().filter(|a| !self.is_ours(a)) {
            match address.net {
                IpNet::V4(net) if !address.flags.contains(AddressFlags::Secondary) => {
                    v4 = v4.or(Some(net))
                }
                IpNet::V6(net) if net.addr().is_unicast_link_local() => {
                    link_local = link_local.or(Some(net))
                }
                IpNet::V6(net) => global = global.or(Some(net)),
                IpNet::V4(_) => {}
            }
        }
        Ok((v4, global.or(link_local)))
    }

    /// Adds `net` to the interface, as ours, without a lifetime. Adding an address that is
    /// already there succeeds; if that address was not added by ferrovip it stays foreign,
    /// so [`remove`](Self::remove) will leave it alone.
    pub async fn add(&self, index: u32, net: IpNet) -> Result<(), AddrError> {
        self.add_with_lifetime(index, net, None).await
    }

    /// [`add`](Self::add) with a finite valid (and preferred) lifetime, which the engine
    /// renews while it holds the address.
    pub async fn add_with_lifetime(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
    ) -> Result<(), AddrError> {
        if net.addr().is_ipv4() {
            self.ensure_promote_secondaries(index).await?;
        }
        self.add_one(index, net, lifetime).await
    }

    /// Adds many addresses to one interface, as ours, in batches; returns those that failed
    /// (each error names its address). An IPv4 set of more than
    /// [`bulk_threshold`](Self::bulk_threshold) addresses becomes bulk sets (one per prefix
    /// length, see the module's documentation) unless the interface's `arp_ignore` forbids
    /// it; addresses of a bulk set installed before are left alone, or, when a notification
    /// said the set went away, its whole set is installed again.
    pub async fn add_all(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Duration>,
    ) -> Vec<(IpNet, AddrError)> {
        let mut failed = Vec::new();
        let mut lost = Vec::new();
        let mut fresh: Vec<IpNet> = Vec::new();
        let mut plain: Vec<IpNet> = Vec::new();
        {
            let mut bulk = self.bulk();
            let mut anchors = HashSet::new();
            for net in nets {
                match bulk.anchor_of(index, net) {
                    Some(anchor) => {
                        if anchors.insert(anchor)
                            && let Some(set) = bulk.sets.get_mut(&(index, anchor))
                            && set.lost
                        {
                            set.lifetime = lifetime;
                            lost.push(set.clone());
                        }
                    }
                    None => fresh.push(*net),
                }
            }
        }
        let v4_first = fresh
            .iter()
            .copied()
            .find(|n| n.addr().is_ipv4())
            .or_else(|| lost.iter().find(|s| !s.is_v6()).map(BulkSet::anchor_net));
        if let Some(first) = v4_first
            && let Err(e) = self.ensure_promote_secondaries(index).await
        {
            failed.push((first, e));
        }
        // Per family and prefix length: into the live set of that length (addresses above
        // its anchor), or a new set when these and the interface addresses of ours of that
        // length are more than the threshold (those then go: the set's routes hold them). So
        // a group that grows a few addresses at a time (Services allocated one by one) ends
        // up a set too, not thousands of interface addresses renewed three times a second.
        let mut sets = Vec::new();
        let mut grown = Vec::new();
        let mut migrate: Vec<(IpAddr, Vec<IpNet>)> = Vec::new();
        if self.bulk_threshold > 0 && !fresh.is_empty() {
            let mut by_prefix: BTreeMap<(bool, u8), BTreeSet<IpAddr>> = BTreeMap::new();
            for net in &fresh {
                by_prefix
                    .entry((net.addr().is_ipv6(), net.prefix_len()))
                    .or_default()
                    .insert(net.addr());
            }
            let mut arp_ok = None;
            let mut ndp_ok = None;
            for ((v6, prefix), members) in by_prefix {
                let to_net = |ip: IpAddr| IpNet::new(ip, prefix).expect("valid");
                let existing = self.bulk().live_set(index, v6, prefix).cloned();
                let mut members = members;
                let mut ours_plain = Vec::new();
                if let Some(old) = existing {
                    let (above, below): (BTreeSet<IpAddr>, BTreeSet<IpAddr>) =
                        members.into_iter().partition(|ip| *ip > old.anchor.addr());
                    if !above.is_empty() {
                        let new = old.grown(above);
                        grown.push((old, new));
                    }
                    // Below the set's anchor: a set of their own when they are many (another
                    // group taken over by a node that holds a set already), else interface
                    // addresses.
                    if below.len() <= self.bulk_threshold {
                        plain.extend(below.into_iter().map(to_net));
                        continue;
                    }
                    members = below;
                } else {
                    ours_plain = self.plain_addresses(index, v6, prefix, &members);
                }
                if members.len() + ours_plain.len() > self.bulk_threshold {
                    // IPv4: the kernel answers ARP for route-held addresses with arp_ignore
                    // 0; IPv6: ferrovip answers neighbour solicitations for them.
                    let ok = match (v6, arp_ok, ndp_ok) {
                        (false, Some(ok), _) | (true, _, Some(ok)) => ok,
                        (false, None, _) => {
                            *arp_ok.insert(self.arp_ignore_allows_bulk(index).await)
                        }
                        (true, _, None) => *ndp_ok.insert(self.ensure_ndp(index).await),
                    };
                    if ok {
                        let all: BTreeSet<IpAddr> =
                            members.iter().chain(&ours_plain).copied().collect();
                        let set = BulkSet::new(index, prefix, all.into_iter().collect(), lifetime);
                        let anchor = set.anchor.addr();
                        let moved = ours_plain
                            .into_iter()
                            .filter(|ip| *ip != anchor)
                            .map(to_net)
                            .collect();
                        migrate.push((anchor, moved));
                        sets.push(set);
                        continue;
                    }
                }
                plain.extend(members.into_iter().map(to_net));
            }
        } else {
            plain.extend(fresh);
        }
        let set_failures = self.install_sets(sets, false).await;
        let failed_nets: HashSet<IpNet> = set_failures.iter().map(|(net, _)| *net).collect();
        failed.extend(set_failures);
        self.drop_covered(index, migrate, &failed_nets).await;
        failed.extend(self.grow_sets(index, grown).await);
        failed.extend(self.install_sets(lost, true).await);
        failed.extend(self.add_plain(index, &plain, lifetime).await);
        failed
    }

    /// Starts the NDP responder (once per manager) and has it listen on `index`, answering
    /// with the interface's MAC. `false` (with a warning) when it cannot: the caller then
    /// adds interface addresses, which the kernel answers for.
    async fn ensure_ndp(&self, index: u32) -> bool {
        if self.bulk().ndp_macs.contains_key(&index) {
            return true;
        }
        let mac = match self.link_by_index(index).await {
            Ok(link) => link.mac,
            Err(e) => {
                NDP_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(interface = index, error = %e, "cannot read the interface for an IPv6 bulk install; adding interface addresses");
                return false;
            }
        };
        let responder = {
            let mut guard = self.ndp.lock().unwrap_or_else(|e| e.into_inner());
            match guard.as_ref() {
                Some(responder) => Ok(responder.clone()),
                None => {
                    let bulk = self.bulk.clone();
                    let lookup: super::ndp::Lookup = Arc::new(move |index, target| {
                        bulk.lock().unwrap_or_else(|e| e.into_inner()).ndp_answer(
                            index,
                            target,
                            Instant::now(),
                        )
                    });
                    NdpResponder::start(lookup).map(|responder| {
                        let responder = Arc::new(responder);
                        *guard = Some(responder.clone());
                        responder
                    })
                }
            }
        };
        match responder.and_then(|responder| responder.listen_on(index).map(|()| responder)) {
            Ok(responder) => {
                let mut bulk = self.bulk();
                bulk.ndp_macs.insert(index, mac);
                bulk.attach_memberships(responder.memberships());
                true
            }
            Err(e) => {
                NDP_FALLBACKS.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(interface = index, error = %e, "cannot answer neighbour solicitations from user space (AF_PACKET); large IPv6 sets are added as interface addresses (slow for thousands)");
                false
            }
        }
    }

    /// Our recorded interface addresses of this family and prefix length on this
    /// interface, other than sets' anchors and `except`.
    fn plain_addresses(
        &self,
        index: u32,
        v6: bool,
        prefix: u8,
        except: &BTreeSet<IpAddr>,
    ) -> Vec<IpAddr> {
        let bulk = self.bulk();
        self.record()
            .entries()
            .filter_map(|((i, net), _)| {
                (*i == index && net.addr().is_ipv6() == v6 && net.prefix_len() == prefix)
                    .then_some(net.addr())
            })
            .filter(|ip| !except.contains(ip) && !bulk.sets.contains_key(&(index, *ip)))
            .collect()
    }

    /// Deletes interface addresses of ours that a new set's routes hold now (one batch),
    /// for the sets that were installed whole (with the anchor they were given).
    async fn drop_covered(
        &self,
        index: u32,
        migrate: Vec<(IpAddr, Vec<IpNet>)>,
        failed: &HashSet<IpNet>,
    ) {
        let mut nets = Vec::new();
        for (anchor, moved) in migrate {
            let installed = self.bulk().sets.contains_key(&(index, anchor));
            if installed && !moved.iter().any(|net| failed.contains(net)) {
                nets.extend(moved);
            }
        }
        if nets.is_empty() {
            return;
        }
        let requests = nets
            .iter()
            .map(|net| Request::del_address(self.address_message(index, *net, None)))
            .collect();
        match self.batch(requests).await {
            Ok((refused, _)) => {
                let refused: HashMap<usize, i32> = refused.into_iter().collect();
                let mut record = self.record();
                for (i, net) in nets.iter().enumerate() {
                    match refused.get(&i) {
                        None | Some(&(ENOENT | EADDRNOTAVAIL | ENODEV)) => {
                            record.remove(index, *net);
                        }
                        Some(errno) => {
                            tracing::debug!(address = %net, errno, "interface address a bulk set covers not deleted; it stays recorded")
                        }
                    }
                }
                tracing::debug!(
                    interface = index,
                    addresses = nets.len(),
                    "interface addresses now held by a bulk set's routes deleted"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot delete interface addresses a bulk set now holds; they stay until removed")
            }
        }
    }

    /// Grown sets: the routes of each new cover (replace), then the old routes it no longer
    /// has, one batch. The sets are updated before, so the deletions are not losses.
    async fn grow_sets(
        &self,
        index: u32,
        grown: Vec<(BulkSet, BulkSet)>,
    ) -> Vec<(IpNet, AddrError)> {
        if grown.is_empty() {
            return Vec::new();
        }
        let mut requests = Vec::new();
        let mut blame: Vec<usize> = Vec::new();
        let mut added: Vec<Vec<IpNet>> = Vec::new();
        {
            let mut bulk = self.bulk();
            for (old, new) in grown {
                let before: HashSet<IpAddr> = old.members.iter().copied().collect();
                added.push(
                    new.member_nets()
                        .filter(|net| !before.contains(&net.addr()))
                        .collect(),
                );
                let set = added.len() - 1;
                for cover in new.covers.iter().filter(|c| !old.covers.contains(c)) {
                    requests.push(Request::new_route(new.route(*cover)));
                    blame.push(set);
                }
                for cover in old.covers.iter().filter(|c| !new.covers.contains(c)) {
                    requests.push(Request::del_route(local_route(
                        index,
                        *cover,
                        old.anchor.addr(),
                        None,
                    )));
                    blame.push(set);
                }
                bulk.take(index, old.anchor.addr());
                bulk.insert(new);
            }
        }
        let ops: Vec<NetlinkOp> = requests.iter().map(Request::op).collect();
        let mut failed = Vec::new();
        match self.batch(requests).await {
            Ok((refused, _)) => {
                let mut blamed = HashSet::new();
                for (i, errno) in refused {
                    if ops[i] == NetlinkOp::DelRoute && matches!(errno, ENOENT | ESRCH | ENODEV) {
                        continue;
                    }
                    if blamed.insert(blame[i]) {
                        failed.extend(
                            added[blame[i]]
                                .iter()
                                .map(|net| (*net, refusal(ops[i], *net, errno, index))),
                        );
                    }
                }
            }
            Err(e) => {
                failed.extend(added.iter().flatten().map(|net| (*net, copy_error(&e))));
            }
        }
        failed
    }

    /// Interface addresses, one batch: added ones are recorded; one already there stays as
    /// it is (and foreign if it was).
    async fn add_plain(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Duration>,
    ) -> Vec<(IpNet, AddrError)> {
        let requests: Vec<Request> = nets
            .iter()
            .map(|net| {
                Request::new_address(
                    self.address_message(index, *net, lifetime),
                    NLM_F_CREATE | NLM_F_EXCL,
                )
            })
            .collect();
        let refused = match self.batch(requests).await {
            Ok((refused, _)) => refused,
            Err(e) => return nets.iter().map(|net| (*net, copy_error(&e))).collect(),
        };
        let mut refused_at: HashMap<usize, i32> = refused.into_iter().collect();
        let mut failed = Vec::new();
        let mut record = self.record();
        for (i, net) in nets.iter().enumerate() {
            match refused_at.remove(&i) {
                None => record.insert(index, *net),
                Some(EEXIST) => {}
                Some(errno) => failed.push((*net, refusal(NetlinkOp::AddAddr, *net, errno, index))),
            }
        }
        failed
    }

    /// Installs bulk sets in one batch: the anchor (new: must not exist, or be ours
    /// already; `again`: created or replaced) and the covering routes. An anchor somebody
    /// else configured is not taken: the next member becomes the anchor.
    async fn install_sets(&self, sets: Vec<BulkSet>, again: bool) -> Vec<(IpNet, AddrError)> {
        let mut failed = Vec::new();
        let mut pending = sets;
        let mut stale = Vec::new();
        // A few tries for anchors that turned out foreign.
        for _ in 0..4 {
            if pending.is_empty() {
                break;
            }
            let mut requests = Vec::new();
            let mut blame: Vec<(usize, Option<usize>)> = Vec::new(); // (set, cover)
            for (s, set) in pending.iter().enumerate() {
                let flags = if again {
                    NLM_F_CREATE | NLM_F_REPLACE
                } else {
                    NLM_F_CREATE | NLM_F_EXCL
                };
                requests.push(Request::new_address(
                    self.address_message(set.index, set.anchor_net(), set.lifetime),
                    flags,
                ));
                blame.push((s, None));
                for (c, cover) in set.covers.iter().enumerate() {
                    requests.push(Request::new_route(set.route(*cover)));
                    blame.push((s, Some(c)));
                }
            }
            let refused = match self.batch(requests).await {
                Ok((refused, _)) => refused,
                Err(e) => {
                    for set in &pending {
                        failed.extend(set.member_nets().map(|net| (net, copy_error(&e))));
                    }
                    return failed;
                }
            };
            let mut anchor_errno: HashMap<usize, i32> = HashMap::new();
            let mut cover_errno: HashMap<(usize, usize), i32> = HashMap::new();
            for (i, errno) in refused {
                match blame[i] {
                    (s, None) => {
                        anchor_errno.insert(s, errno);
                    }
                    (s, Some(c)) => {
                        cover_errno.insert((s, c), errno);
                    }
                }
            }
            // Anchors already there: ours (recorded, or marked) or somebody else's?
            let mut ours_already: HashSet<(u32, IpNet)> = HashSet::new();
            let unknown = anchor_errno.iter().any(|(s, errno)| {
                *errno == EEXIST
                    && !self
                        .record()
                        .contains(pending[*s].index, pending[*s].anchor_net())
            });
            if unknown && let Ok(addresses) = self.addresses(None, AddressFamily::Unspec).await {
                ours_already.extend(
                    addresses
                        .iter()
                        .filter(|a| self.is_ours(a))
                        .map(|a| (a.index, a.net)),
                );
            }
            let mut retry = Vec::new();
            for (s, mut set) in pending.into_iter().enumerate() {
                let anchor = set.anchor_net();
                match anchor_errno.get(&s) {
                    None => self.record().insert(set.index, anchor),
                    Some(&EEXIST) if self.record().contains(set.index, anchor) => {}
                    Some(&EEXIST) if ours_already.contains(&(set.index, anchor)) => {
                        // Marked ours (an earlier agent's): renewed from now on.
                        self.record().insert(set.index, anchor);
                    }
                    Some(&EEXIST) if set.members.len() > 1 => {
                        // Somebody else's address (which stays theirs, and local through
                        // them): the rest of the set is anchored at the next member; routes
                        // of this try that the new cover lacks go.
                        tracing::debug!(address = %anchor, "bulk anchor exists and is not ours; anchoring at the next member");
                        let members = set.members.split_off(1);
                        let next =
                            BulkSet::new(set.index, set.anchor.prefix_len(), members, set.lifetime);
                        stale.extend(set.covers.iter().filter(|c| !next.covers.contains(c)).map(
                            |c| OwnedRoute {
                                index: set.index,
                                dst: *c,
                                prefsrc: Some(set.anchor.addr()),
                            },
                        ));
                        retry.push(next);
                        continue;
                    }
                    Some(&errno) => {
                        let error = refusal(NetlinkOp::AddAddr, anchor, errno, set.index);
                        let text = error.to_string();
                        failed.push((anchor, error));
                        failed.extend(set.member_nets().filter(|n| *n != anchor).map(|net| {
                            (
                                net,
                                AddrError::Refused {
                                    op: NetlinkOp::AddAddr,
                                    net,
                                    errno,
                                },
                            )
                        }));
                        tracing::debug!(anchor = %anchor, error = %text, "bulk set not installed");
                        continue;
                    }
                }
                for ((_, c), errno) in cover_errno.iter().filter(|((t, _), _)| *t == s) {
                    let prefix = set.anchor.prefix_len();
                    for ip in cover_addresses(&set.covers[*c..=*c]) {
                        let net = IpNet::new(ip, prefix).expect("valid");
                        failed.push((
                            net,
                            AddrError::Refused {
                                op: NetlinkOp::AddRoute,
                                net,
                                errno: *errno,
                            },
                        ));
                    }
                }
                set.lost = false;
                set.valid_until = valid_until(set.lifetime);
                // Anchors of the members' old sets, if any, are not touched: sets are disjoint.
                self.bulk().insert(set);
            }
            pending = retry;
        }
        if let Err(e) = self.delete_routes(&stale).await {
            tracing::warn!(error = %e, "cannot delete routes of a bulk anchor that was not ours");
        }
        for set in pending {
            failed.extend(set.member_nets().map(|net| {
                (
                    net,
                    AddrError::Refused {
                        op: NetlinkOp::AddAddr,
                        net,
                        errno: EEXIST,
                    },
                )
            }));
        }
        failed
    }

    /// Whether route-held addresses would be answered for on this interface: its effective
    /// `arp_ignore` (the larger of `all` and its own) is 0. Otherwise warns once per
    /// interface and counts the fallback.
    async fn arp_ignore_allows_bulk(&self, index: u32) -> bool {
        let name = match self.link_by_index(index).await {
            Ok(link) => link.name,
            Err(e) => {
                tracing::warn!(interface = index, error = %e, "cannot read the interface for a bulk install; adding interface addresses");
                return false;
            }
        };
        let read = |ifname: &str| -> Option<u32> {
            std::fs::read_to_string(ipv4_conf_path(ifname, "arp_ignore"))
                .ok()?
                .trim()
                .parse()
                .ok()
        };
        let effective = match (read("all"), read(&name)) {
            (Some(all), Some(own)) => all.max(own),
            _ => u32::MAX,
        };
        if effective == 0 {
            return true;
        }
        ARP_IGNORE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
        if self.bulk().arp_warned.insert(index) {
            tracing::warn!(
                interface = %name,
                arp_ignore = effective,
                "arp_ignore is not 0 on this interface: the kernel would not answer ARP for addresses held by local routes, so large IPv4 sets are added as interface addresses (slow for thousands; with arp_ignore 0 on the interface and in `all` they are installed in bulk; virtual-MAC interfaces need 1)"
            );
        }
        false
    }

    fn open_batcher(&self) -> Result<(), AddrError> {
        let mut guard = self.renewer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Batcher::open().map_err(AddrError::Batch)?);
        }
        Ok(())
    }

    /// Blocking: the batch socket's exchange (opened here if it is not yet, in the calling
    /// thread's namespace). A socket whose state is unknown after an error is replaced.
    fn exchange_blocking(&self, requests: &[Request]) -> io::Result<(Vec<(usize, i32)>, usize)> {
        let mut guard = self.renewer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Batcher::open()?);
        }
        let result = guard.as_mut().expect("opened above").exchange(requests);
        if result.is_err() {
            *guard = None;
        }
        result
    }

    /// [`exchange_blocking`](Self::exchange_blocking) on a blocking thread, so that the
    /// engine's runtime keeps running while the kernel works.
    async fn batch(&self, requests: Vec<Request>) -> Result<(Vec<(usize, i32)>, usize), AddrError> {
        if requests.is_empty() {
            return Ok((Vec::new(), 0));
        }
        self.open_batcher()?;
        let manager = self.clone();
        tokio::task::spawn_blocking(move || manager.exchange_blocking(&requests))
            .await
            .map_err(|e| AddrError::Batch(io::Error::other(e.to_string())))?
            .map_err(AddrError::Batch)
    }

    /// Removes many addresses of ours from one interface in one batch (members of a bulk
    /// set: the set shrinks, its routes and anchor follow; none left: routes and anchor go).
    /// Addresses absent or foreign are left alone. Returns those that failed.
    pub async fn remove_all(&self, index: u32, nets: &[IpNet]) -> Vec<(IpNet, AddrError)> {
        let mut plain = Vec::new();
        let mut requests = Vec::new();
        let mut blame: Vec<Blame> = Vec::new();
        {
            let mut touched: HashMap<IpAddr, Vec<IpNet>> = HashMap::new();
            let mut bulk = self.bulk();
            for net in nets {
                match bulk.anchor_of(index, net) {
                    Some(anchor) => touched.entry(anchor).or_default().push(*net),
                    None => plain.push(*net),
                }
            }
            for (anchor, gone) in touched {
                // A member that is also an interface address of ours (a set that took it
                // over but could not delete it): that goes too.
                for net in &gone {
                    if anchor != net.addr() && self.record().remove(index, *net) {
                        requests.push(Request::del_address(
                            self.address_message(index, *net, None),
                        ));
                        blame.push(vec![*net]);
                    }
                }
                let Some(old) = bulk.take(index, anchor) else {
                    continue;
                };
                let gone_ips: HashSet<IpAddr> = gone.iter().map(IpNet::addr).collect();
                let remaining: Vec<IpAddr> = old
                    .members
                    .iter()
                    .copied()
                    .filter(|ip| !gone_ips.contains(ip))
                    .collect();
                let old_anchor = old.anchor_net();
                if remaining.is_empty() {
                    for cover in &old.covers {
                        requests.push(Request::del_route(local_route(index, *cover, anchor, None)));
                        blame.push(gone.clone());
                    }
                    requests.push(Request::del_address(
                        self.address_message(index, old_anchor, None),
                    ));
                    blame.push(vec![old_anchor]);
                    self.record().remove(index, old_anchor);
                    continue;
                }
                let new = BulkSet::new(index, old.anchor.prefix_len(), remaining, old.lifetime);
                let new_anchor = new.anchor_net();
                if new_anchor != old_anchor {
                    requests.push(Request::new_address(
                        self.address_message(index, new_anchor, new.lifetime),
                        NLM_F_CREATE | NLM_F_REPLACE,
                    ));
                    blame.push(vec![new_anchor]);
                    self.record().insert(index, new_anchor);
                }
                for cover in &new.covers {
                    requests.push(Request::new_route(new.route(*cover)));
                    blame.push(gone.clone());
                }
                for cover in old.covers.iter().filter(|c| !new.covers.contains(c)) {
                    requests.push(Request::del_route(local_route(index, *cover, anchor, None)));
                    blame.push(gone.clone());
                }
                if new_anchor != old_anchor {
                    requests.push(Request::del_address(
                        self.address_message(index, old_anchor, None),
                    ));
                    blame.push(vec![old_anchor]);
                    self.record().remove(index, old_anchor);
                }
                bulk.insert(new);
            }
        }
        let mut failed = Vec::new();
        if !plain.is_empty() {
            match self.addresses(Some(index), AddressFamily::Unspec).await {
                Ok(addresses) => {
                    let wanted: HashSet<IpNet> = plain.iter().copied().collect();
                    for address in addresses {
                        if wanted.contains(&address.net) && self.is_ours(&address) {
                            blame.push(vec![address.net]);
                            requests.push(Request::del_address(address.message));
                        }
                    }
                }
                Err(e) => failed.extend(plain.iter().map(|net| (*net, copy_error(&e)))),
            }
        }
        let ops: Vec<NetlinkOp> = requests.iter().map(Request::op).collect();
        match self.batch(requests).await {
            Ok((refused, _)) => {
                for (i, errno) in refused {
                    if matches!(errno, ENOENT | EADDRNOTAVAIL | ENODEV | ESRCH) {
                        continue;
                    }
                    for net in &blame[i] {
                        failed.push((*net, refusal(ops[i], *net, errno, index)));
                    }
                }
            }
            Err(e) => {
                let mut all: Vec<IpNet> = blame.into_iter().flatten().collect();
                all.sort();
                all.dedup();
                failed.extend(all.into_iter().map(|net| (net, copy_error(&e))));
            }
        }
        let mut record = self.record();
        for net in &plain {
            record.remove(index, *net);
        }
        failed
    }

    /// [`set_lifetime`](Self::set_lifetime) for many addresses of one interface: a bulk
    /// set's lifetime is its anchor's (set once per set). Recorded addresses in one batch.
    pub async fn set_lifetime_all(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Duration>,
    ) -> Vec<(IpNet, AddrError)> {
        let targets = self.anchors_or_self(index, nets, Some(lifetime));
        self.set_lifetimes(index, &targets, lifetime, None).await
    }

    /// [`hold`](Self::hold) for many addresses of one interface: a bulk set is held by its
    /// anchor (its routes go with it; the next agent adopts them with the anchor).
    pub async fn hold_all(
        &self,
        index: u32,
        nets: &[IpNet],
        hold: Duration,
    ) -> Vec<(IpNet, AddrError)> {
        let targets = self.anchors_or_self(index, nets, Some(Some(hold)));
        self.set_lifetimes(index, &targets, Some(hold), Some(hold))
            .await
    }

    /// New lifetimes: recorded addresses in one batch (recorded again, held when `hold`),
    /// the others one by one through [`set_lifetime`](Self::set_lifetime) /
    /// [`hold`](Self::hold), which look for the kernel's mark.
    async fn set_lifetimes(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Duration>,
        hold: Option<Duration>,
    ) -> Vec<(IpNet, AddrError)> {
        let (recorded, others): (Vec<IpNet>, Vec<IpNet>) = {
            let record = self.record();
            nets.iter().partition(|net| record.contains(index, **net))
        };
        let mut failed = Vec::new();
        let mut requests: Vec<Request> = recorded
            .iter()
            .map(|net| {
                let mut message = self.address_message(index, *net, None);
                let seconds = lifetime_seconds(lifetime);
                let mut info = CacheInfo::default();
                info.ifa_preferred = seconds;
                info.ifa_valid = seconds;
                message.attributes.push(AddressAttribute::CacheInfo(info));
                Request::new_address(message, NLM_F_CREATE | NLM_F_REPLACE)
            })
            .collect();
        // IPv6 sets' routes carry the lifetime too (blamed on their anchor).
        let routes = self.route_lifetimes(index, &recorded, lifetime);
        let route_blame: Vec<IpNet> = routes.iter().map(|(net, _)| *net).collect();
        requests.extend(routes.into_iter().map(|(_, request)| request));
        match self.batch(requests).await {
            Ok((refused, _)) => {
                let mut refused: HashMap<usize, i32> = refused.into_iter().collect();
                let mut blamed = HashSet::new();
                for (i, net) in route_blame.iter().enumerate() {
                    if let Some(errno) = refused.remove(&(recorded.len() + i))
                        && blamed.insert(*net)
                    {
                        failed.push((*net, refusal(NetlinkOp::AddRoute, *net, errno, index)));
                    }
                }
                let now = SystemTime::now();
                let mut record = self.record();
                for (i, net) in recorded.iter().enumerate() {
                    match refused.get(&i) {
                        None => {
                            // Recording again clears a hold; a hold records one.
                            record.insert(index, *net);
                            if let Some(hold) = hold {
                                record.hold(index, *net, now, hold);
                            }
                        }
                        Some(&errno) => {
                            failed.push((*net, refusal(NetlinkOp::AddAddr, *net, errno, index)))
                        }
                    }
                }
            }
            Err(e) => failed.extend(recorded.iter().map(|net| (*net, copy_error(&e)))),
        }
        for net in others {
            let result = match hold {
                Some(hold) => self.hold(index, net, hold).await,
                None => self.set_lifetime(index, net, lifetime).await,
            };
            if let Err(e) = result {
                failed.push((net, e));
            }
        }
        failed
    }

    /// The requests that give the routes of the IPv6 sets anchored at any of `anchors` on
    /// `index` a new lifetime, each with its anchor (IPv4 routes go with their anchor).
    fn route_lifetimes(
        &self,
        index: u32,
        anchors: &[IpNet],
        lifetime: Option<Duration>,
    ) -> Vec<(IpNet, Request)> {
        let mut bulk = self.bulk();
        let mut out = Vec::new();
        for net in anchors.iter().filter(|n| n.addr().is_ipv6()) {
            let Some(set) = bulk.sets.get_mut(&(index, net.addr())) else {
                continue;
            };
            if set.anchor != *net {
                continue;
            }
            set.lifetime = lifetime;
            set.valid_until = valid_until(lifetime);
            out.extend(
                set.covers
                    .iter()
                    .map(|cover| (*net, Request::new_route(set.route(*cover)))),
            );
        }
        out
    }

    /// `nets` with every bulk member replaced by its set's anchor (once); sets the sets'
    /// lifetime when given.
    fn anchors_or_self(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Option<Duration>>,
    ) -> Vec<IpNet> {
        let mut bulk = self.bulk();
        let mut anchors = HashSet::new();
        let mut out = Vec::new();
        for net in nets {
            match bulk.anchor_of(index, net) {
                Some(anchor) => {
                    if anchors.insert(anchor)
                        && let Some(set) = bulk.sets.get_mut(&(index, anchor))
                    {
                        if let Some(lifetime) = lifetime {
                            set.lifetime = lifetime;
                        }
                        out.push(set.anchor_net());
                    }
                }
                None => out.push(*net),
            }
        }
        out
    }

    /// Our routes (`proto 0x46`, `local`, table main, IPv4 and IPv6) on every interface.
    async fn owned_routes(&self) -> Result<Vec<OwnedRoute>, AddrError> {
        let mut owned = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut filter = netlink_packet_route::route::RouteMessage::default();
            filter.header.address_family = family;
            filter.header.table = super::route::TABLE_MAIN;
            filter.header.protocol =
                netlink_packet_route::route::RouteProtocol::from(FERROVIP_ADDR_PROTO);
            filter.header.kind = netlink_packet_route::route::RouteType::Local;
            let messages: Vec<netlink_packet_route::route::RouteMessage> = self
                .handle
                .route()
                .get(filter)
                .execute()
                .try_collect()
                .await
                .map_err(|source| AddrError::Netlink {
                    op: NetlinkOp::GetRoute,
                    source,
                })?;
            owned.extend(messages.iter().filter_map(OwnedRoute::from_message));
        }
        Ok(owned)
    }

    /// Deletes routes in one batch (gone already counts as done).
    async fn delete_routes(&self, routes: &[OwnedRoute]) -> Result<(), AddrError> {
        let requests = routes
            .iter()
            .map(|r| Request::del_route(r.message()))
            .collect();
        let (refused, _) = self.batch(requests).await?;
        if let Some((i, errno)) = refused
            .into_iter()
            .find(|(_, errno)| !matches!(*errno, ENOENT | ESRCH | ENODEV))
        {
            let route = &routes[i];
            return Err(refusal(NetlinkOp::DelRoute, route.dst, errno, route.index));
        }
        Ok(())
    }

    async fn add_one(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
    ) -> Result<(), AddrError> {
        let mut request = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        *request.message_mut() = self.address_message(index, net, lifetime);
        match request.execute().await {
            Ok(()) => {
                self.record().insert(index, net);
                Ok(())
            }
            Err(source) if netlink_errno(&source) == Some(EEXIST) => Ok(()),
            Err(source) if netlink_errno(&source) == Some(ENODEV) => {
                Err(AddrError::LinkNotFound(index.to_string()))
            }
            Err(source) => Err(AddrError::Netlink {
                op: NetlinkOp::AddAddr,
                source,
            }),
        }
    }

    /// The RTM_NEWADDR body for one of our addresses: the mark (when the kernel keeps it),
    /// no DAD for IPv6, and the lifetime (`None`: forever).
    fn address_message(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
    ) -> AddressMessage {
        let mut request = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        let message = request.message_mut();
        if self.mode == OwnershipMode::KernelMark {
            message
                .attributes
                .push(AddressAttribute::Protocol(AddressProtocol::from(
                    FERROVIP_ADDR_PROTO,
                )));
        }
        if net.addr().is_ipv6() {
            message.header.flags = AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Some(lifetime) = lifetime {
            let seconds = lifetime_seconds(Some(lifetime));
            let mut info = CacheInfo::default();
            info.ifa_preferred = seconds;
            info.ifa_valid = seconds;
            message.attributes.push(AddressAttribute::CacheInfo(info));
        }
        message.clone()
    }

    /// Gives one of our addresses a finite valid lifetime (the kernel removes it when that
    /// runs out), or makes it permanent with `None`. Addresses that are not ours are left
    /// alone (returns `false`).
    pub async fn set_lifetime(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
    ) -> Result<bool, AddrError> {
        if !self.record().contains(index, net) {
            let family = match net {
                IpNet::V4(_) => AddressFamily::Inet,
                IpNet::V6(_) => AddressFamily::Inet6,
            };
            let ours = self
                .addresses(Some(index), family)
                .await?
                .iter()
                .any(|a| a.net == net && self.is_ours(a));
            if !ours {
                return Ok(false);
            }
        }
        let mut request = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len())
            .replace();
        let mut message = self.address_message(index, net, None);
        let seconds = lifetime_seconds(lifetime);
        let mut info = CacheInfo::default();
        info.ifa_preferred = seconds;
        info.ifa_valid = seconds;
        message.attributes.push(AddressAttribute::CacheInfo(info));
        *request.message_mut() = message;
        match request.execute().await {
            Ok(()) => {
                // Recording again clears a hold: the address is ours again, not held.
                self.record().insert(index, net);
                Ok(true)
            }
            Err(source) if netlink_errno(&source) == Some(ENODEV) => {
                Err(AddrError::LinkNotFound(index.to_string()))
            }
            Err(source) => Err(AddrError::Netlink {
                op: NetlinkOp::AddAddr,
                source,
            }),
        }
    }

    /// Restart hold, outgoing side: our address keeps `hold` as its lifetime and the record
    /// says it is held until then, which is what the next agent adopts.
    pub async fn hold(&self, index: u32, net: IpNet, hold: Duration) -> Result<bool, AddrError> {
        let held = self.set_lifetime(index, net, Some(hold)).await?;
        if held {
            self.record().hold(index, net, SystemTime::now(), hold);
        }
        Ok(held)
    }

    /// Renews the lifetime of those of `addresses` that are ours (recorded), in batches of
    /// many requests per `sendmsg` (only the last of each asks for an acknowledgement; the
    /// kernel reports every failure regardless). A renewal of an address that disappeared
    /// adds it again. Blocking: call it from a blocking thread.
    pub fn renew(
        &self,
        addresses: &[(u32, IpNet)],
        lifetime: Duration,
    ) -> Result<RenewReport, AddrError> {
        // Members of bulk sets are not recorded, their anchors are: this renews one address
        // per set (and an IPv6 set's handful of routes, which carry the lifetime too).
        let (mut keys, mut requests): (Vec<(u32, IpNet)>, Vec<Request>) = {
            let record = self.record();
            addresses
                .iter()
                .filter(|(index, net)| record.contains(*index, *net))
                .map(|&(index, net)| {
                    let message = self.address_message(index, net, Some(lifetime));
                    (
                        (index, net),
                        Request::new_address(message, NLM_F_CREATE | NLM_F_REPLACE),
                    )
                })
                .unzip()
        };
        let v6_anchors: Vec<(u32, IpNet)> = keys
            .iter()
            .filter(|(_, net)| net.addr().is_ipv6())
            .copied()
            .collect();
        if !v6_anchors.is_empty() && !self.bulk().sets.is_empty() {
            for (index, net) in v6_anchors {
                for (anchor, request) in self.route_lifetimes(index, &[net], Some(lifetime)) {
                    keys.push((index, anchor));
                    requests.push(request);
                }
            }
        }
        let (refused, writes) = self
            .exchange_blocking(&requests)
            .map_err(AddrError::Renew)?;
        Ok(RenewReport {
            renewed: requests.len(),
            writes,
            failed: refused
                .into_iter()
                .map(|(i, errno)| (keys[i].0, keys[i].1, errno))
                .collect(),
        })
    }

    /// Start-up: the addresses a restarting predecessor held for us (the record says so and
    /// the hold has not run out) stay, to be adopted; every other address of ours is what a
    /// crashed predecessor left behind and is removed. Returns (held, removed). With the
    /// kernel's mark and no record at all (an agent of a version without one), marked
    /// addresses with a finite lifetime count as held, as they did then.
    pub async fn take_over(
        &self,
        now: SystemTime,
    ) -> Result<(HashSet<(u32, IpNet)>, Vec<(u32, IpNet)>), AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        let legacy = self.mode == OwnershipMode::KernelMark
            && self.record().path().is_some_and(|p| !p.exists())
            && self.record().is_empty();
        let mut held = HashSet::new();
        let mut leftovers = Vec::new();
        for address in addresses {
            if !self.is_ours(&address) {
                continue;
            }
            let entry = (address.index, address.net);
            let is_held = self.record().held_at(entry.0, entry.1, now)
                || (legacy && address.valid_lifetime.is_some());
            if is_held {
                held.insert(entry);
            } else {
                leftovers.push(address);
            }
        }
        // Bulk sets: routes anchored at a held address are held with it (and adopted into
        // this manager's sets); every other route of ours is a leftover.
        let mut removed = Vec::new();
        let held_anchors: HashMap<(u32, IpAddr), IpNet> = held
            .iter()
            .map(|(index, net)| ((*index, net.addr()), *net))
            .collect();
        let mut adopted: HashMap<(u32, IpAddr), Vec<IpNet>> = HashMap::new();
        let mut stale = Vec::new();
        for route in self.owned_routes().await? {
            match route
                .prefsrc
                .and_then(|src| held_anchors.get(&(route.index, src)).map(|a| (src, a)))
            {
                Some((src, _)) => adopted
                    .entry((route.index, src))
                    .or_default()
                    .push(route.dst),
                None => stale.push(route),
            }
        }
        self.delete_routes(&stale).await?;
        removed.extend(stale.iter().map(|r| (r.index, r.dst)));
        // Held IPv6 sets are answered for from now on, as their predecessor did.
        let v6_interfaces: BTreeSet<u32> = adopted
            .keys()
            .filter(|(_, src)| src.is_ipv6())
            .map(|(index, _)| *index)
            .collect();
        {
            let mut bulk = self.bulk();
            for ((index, src), mut covers) in adopted {
                let anchor = held_anchors[&(index, src)];
                covers.sort();
                let mut members: Vec<IpAddr> = cover_addresses(&covers).collect();
                members.push(src);
                members.sort_unstable();
                members.dedup();
                for ip in &members {
                    let net = IpNet::new(*ip, anchor.prefix_len()).expect("valid");
                    held.insert((index, net));
                }
                if let Some(set) = bulk.take(index, src) {
                    tracing::debug!(anchor = %set.anchor, "bulk set adopted again");
                }
                bulk.insert(BulkSet {
                    index,
                    anchor,
                    members,
                    covers,
                    lifetime: None,
                    lost: false,
                    valid_until: None,
                });
            }
        }
        for index in v6_interfaces {
            self.ensure_ndp(index).await;
        }
        for address in leftovers {
            let entry = (address.index, address.net);
            if self.delete(address.message).await? {
                removed.push(entry);
            }
        }
        {
            let bulk = self.bulk();
            let mut record = self.record();
            let gone: Vec<(u32, IpNet)> = record
                .entries()
                .map(|(k, _)| *k)
                .filter(|k| !held.contains(k))
                .collect();
            // Members of an adopted set are held, but only its anchor is recorded.
            let is_member = |index: u32, net: &IpNet| {
                bulk.anchor_of(index, net)
                    .is_some_and(|anchor| anchor != net.addr())
            };
            for (index, net) in gone {
                record.remove(index, net);
            }
            for &(index, net) in &held {
                if !record.contains(index, net) && !is_member(index, &net) {
                    record.insert(index, net);
                }
            }
        }
        self.flush_record()?;
        Ok((held, removed))
    }

    /// Removes `net` from the interface if it is there and ours. Returns whether it
    /// removed something: `false` when the address is absent or foreign.
    pub async fn remove(&self, index: u32, net: IpNet) -> Result<bool, AddrError> {
        let family = match net {
            IpNet::V4(_) => AddressFamily::Inet,
            IpNet::V6(_) => AddressFamily::Inet6,
        };
        let addresses = self.addresses(Some(index), family).await?;
        let Some(ours) = addresses
            .into_iter()
            .find(|address| address.net == net && self.is_ours(address))
        else {
            self.record().remove(index, net);
            return Ok(false);
        };
        let removed = self.delete(ours.message).await?;
        self.record().remove(index, net);
        Ok(removed)
    }

    /// Forgets the addresses of an interface that was deleted (with them).
    pub fn forget_interface(&self, index: u32) {
        self.record().remove_interface(index);
        let mut bulk = self.bulk();
        let anchors: Vec<IpAddr> = bulk
            .sets
            .keys()
            .filter(|(i, _)| *i == index)
            .map(|(_, a)| *a)
            .collect();
        for anchor in anchors {
            bulk.take(index, anchor);
        }
        bulk.ndp_macs.remove(&index);
    }

    /// Every address on every interface that is ours: interface addresses, and the members
    /// of bulk sets (every address our routes cover, with the prefix length of their anchor,
    /// or /32 for a route whose preferred source is not ours).
    pub async fn list_owned(&self) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        let owned: Vec<(u32, IpNet)> = addresses
            .into_iter()
            .filter(|address| self.is_ours(address))
            .map(|address| (address.index, address.net))
            .collect();
        let prefixes: HashMap<(u32, IpAddr), u8> = owned
            .iter()
            .map(|(index, net)| ((*index, net.addr()), net.prefix_len()))
            .collect();
        let mut seen: HashSet<(u32, IpNet)> = owned.iter().copied().collect();
        let mut all = owned;
        for route in self.owned_routes().await? {
            let prefix = route
                .prefsrc
                .and_then(|src| prefixes.get(&(route.index, src)).copied())
                .unwrap_or(route.dst.max_prefix_len());
            for ip in cover_addresses(std::slice::from_ref(&route.dst)) {
                let entry = (route.index, IpNet::new(ip, prefix).expect("valid"));
                if seen.insert(entry) {
                    all.push(entry);
                }
            }
        }
        Ok(all)
    }

    /// Removes every address of ours not in `keep` (what a crashed predecessor left
    /// behind; `ferrovip cleanup`). Returns what it removed; stops at the first failure, and
    /// is safe to call again.
    pub async fn remove_all_owned_except(
        &self,
        keep: &HashSet<(u32, IpNet)>,
    ) -> Result<Vec<(u32, IpNet)>, AddrError> {
        // Our routes first (kept only with their anchor), listed by prefix.
        let mut removed: Vec<(u32, IpNet)> = self.remove_routes_except(keep).await?;
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        for address in addresses {
            if !self.is_ours(&address) || keep.contains(&(address.index, address.net)) {
                continue;
            }
            let entry = (address.index, address.net);
            if self.delete(address.message).await? {
                removed.push(entry);
            }
            self.record().remove(entry.0, entry.1);
        }
        self.flush_record()?;
        Ok(removed)
    }

    /// Deletes our routes (bulk sets) except those anchored at an address of `keep`, in one
    /// batch, and forgets their sets; returns them (interface, prefix).
    pub async fn remove_routes_except(
        &self,
        keep: &HashSet<(u32, IpNet)>,
    ) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let routes: Vec<OwnedRoute> = self
            .owned_routes()
            .await?
            .into_iter()
            .filter(|route| {
                !keep
                    .iter()
                    .any(|(index, net)| route.anchored_at(*index, net.addr()))
            })
            .collect();
        {
            let mut bulk = self.bulk();
            let gone: Vec<(u32, IpAddr)> = bulk
                .sets
                .values()
                .filter(|set| !keep.contains(&(set.index, set.anchor_net())))
                .map(|set| (set.index, set.anchor.addr()))
                .collect();
            for (index, anchor) in gone {
                bulk.take(index, anchor);
            }
        }
        self.delete_routes(&routes).await?;
        Ok(routes.iter().map(|r| (r.index, r.dst)).collect())
    }

    async fn delete(&self, message: AddressMessage) -> Result<bool, AddrError> {
        match self.handle.address().del(message).execute().await {
            Ok(()) => Ok(true),
            // Gone already (removed concurrently, or with its interface).
            Err(source)
                if matches!(
                    netlink_errno(&source),
                    Some(ENOENT | EADDRNOTAVAIL | ENODEV)
                ) =>
            {
                Ok(false)
            }
            Err(source) => Err(AddrError::Netlink {
                op: NetlinkOp::DelAddr,
                source,
            }),
        }
    }

    async fn addresses(
        &self,
        index: Option<u32>,
        family: AddressFamily,
    ) -> Result<Vec<KernelAddress>, AddrError> {
        let mut request = self.handle.address().get();
        if let Some(index) = index {
            // The header lets a strict-checking kernel filter; the builder's filter covers
            // connections without strict checking.
            request.message_mut().header.index = index;
            request = request.set_link_index_filter(index);
        }
        request.message_mut().header.family = family;
        let messages: Vec<AddressMessage> =
            request
                .execute()
                .try_collect()
                .await
                .map_err(|source| AddrError::Netlink {
                    op: NetlinkOp::GetAddr,
                    source,
                })?;
        Ok(messages
            .into_iter()
            .filter(|message| family == AddressFamily::Unspec || message.header.family == family)
            .filter_map(KernelAddress::from_message)
            .collect())
    }

    async fn ensure_promote_secondaries(&self, index: u32) -> Result<(), AddrError> {
        // The kernel ORs `all` with the interface's own value.
        let all = std::fs::read_to_string(ipv4_conf_path("all", "promote_secondaries"));
        if all.is_ok_and(|v| v.trim() == "1") {
            return Ok(());
        }
        let name = self.link_by_index(index).await?.name;
        ensure_ipv4_conf(&name, "promote_secondaries", 1)
            .map_err(|(path, source)| AddrError::Sysctl { path, source })
    }
}

/// The error of a refused request of a batch, naming the address.
fn refusal(op: NetlinkOp, net: IpNet, errno: i32, index: u32) -> AddrError {
    if errno == ENODEV {
        AddrError::LinkNotFound(index.to_string())
    } else {
        AddrError::Refused { op, net, errno }
    }
}

/// One error for many addresses (the batch as a whole failed).
fn copy_error(error: &AddrError) -> AddrError {
    let kind = match error {
        AddrError::Batch(e) | AddrError::Renew(e) => e.kind(),
        _ => io::ErrorKind::Other,
    };
    AddrError::Batch(io::Error::new(kind, error.to_string()))
}

/// Seconds for `IFA_CACHEINFO`: whole seconds, at least 1; `None` is forever.
fn lifetime_seconds(lifetime: Option<Duration>) -> u32 {
    lifetime.map_or(u32::MAX, |d| {
        u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX - 1)
    })
}

/// One request of a batch: a message and its flags besides `NLM_F_REQUEST`/`NLM_F_ACK`.
#[derive(Debug, Clone)]
struct Request {
    message: RouteNetlinkMessage,
    flags: u16,
}

impl Request {
    fn new_address(message: AddressMessage, flags: u16) -> Self {
        Self {
            message: RouteNetlinkMessage::NewAddress(message),
            flags,
        }
    }

    fn del_address(message: AddressMessage) -> Self {
        Self {
            message: RouteNetlinkMessage::DelAddress(message),
            flags: 0,
        }
    }

    fn new_route(message: netlink_packet_route::route::RouteMessage) -> Self {
        Self {
            message: RouteNetlinkMessage::NewRoute(message),
            flags: NLM_F_CREATE | NLM_F_REPLACE,
        }
    }

    fn del_route(message: netlink_packet_route::route::RouteMessage) -> Self {
        Self {
            message: RouteNetlinkMessage::DelRoute(message),
            flags: 0,
        }
    }

    fn op(&self) -> NetlinkOp {
        match self.message {
            RouteNetlinkMessage::NewAddress(_) => NetlinkOp::AddAddr,
            RouteNetlinkMessage::DelAddress(_) => NetlinkOp::DelAddr,
            RouteNetlinkMessage::NewRoute(_) => NetlinkOp::AddRoute,
            _ => NetlinkOp::DelRoute,
        }
    }
}

/// A blocking rtnetlink socket for batches: many requests per `sendmsg`, only the last of
/// each asking for an acknowledgement (the kernel reports every failure regardless).
#[derive(Debug)]
struct Batcher {
    socket: Socket,
    seq: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl Batcher {
    fn open() -> io::Result<Batcher> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        force_rcvbuf(&socket)?;
        // Errors then echo only the request's header.
        let _ = socket.set_cap_ack(true);
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(2, 0),
        )
        .map_err(io::Error::from)?;
        Ok(Batcher {
            socket,
            seq: 0,
            send_buf: Vec::new(),
            recv_buf: Vec::with_capacity(64 << 10),
        })
    }

    /// Every request, [`BATCH`] per `sendmsg`, in order; returns the refused ones (their
    /// position in `requests`) with the kernel's errno, and the `sendmsg` calls it took.
    fn exchange(&mut self, requests: &[Request]) -> io::Result<(Vec<(usize, i32)>, usize)> {
        let mut failed = Vec::new();
        let mut writes = 0;
        for (chunk_no, chunk) in requests.chunks(BATCH).enumerate() {
            for (i, errno) in self.exchange_chunk(chunk)? {
                failed.push((chunk_no * BATCH + i, errno));
            }
            writes += 1;
        }
        Ok((failed, writes))
    }

    fn exchange_chunk(&mut self, batch: &[Request]) -> io::Result<Vec<(usize, i32)>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.send_buf.clear();
        let first = self.seq.wrapping_add(1);
        for (i, request) in batch.iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let mut message = NetlinkMessage::new(
                Default::default(),
                NetlinkPayload::InnerMessage(request.message.clone()),
            );
            let last = i + 1 == batch.len();
            message.header.flags = NLM_F_REQUEST | request.flags | if last { NLM_F_ACK } else { 0 };
            message.header.sequence_number = self.seq;
            message.finalize();
            let at = self.send_buf.len();
            self.send_buf.resize(at + message.buffer_len(), 0);
            message.serialize(&mut self.send_buf[at..]);
        }
        let last = self.seq;
        let sent = self.socket.send(&self.send_buf, 0)?;
        if sent != self.send_buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", self.send_buf.len()),
            ));
        }
        let mut failed = Vec::new();
        loop {
            self.recv_buf.clear();
            self.socket.recv(&mut self.recv_buf, 0)?;
            let mut pos = 0;
            while let Some(rest) = self.recv_buf.get(pos..).filter(|r| r.len() >= 16) {
                let Ok(buffer) = NetlinkBuffer::new_checked(rest) else {
                    break;
                };
                let len = buffer.length() as usize;
                pos += (len + 3) & !3;
                if buffer.message_type() != netlink_packet_core::NLMSG_ERROR {
                    continue;
                }
                let seq = buffer.sequence_number();
                let code = buffer
                    .payload()
                    .get(..4)
                    .map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                let offset = seq.wrapping_sub(first) as usize;
                if code != 0 && offset < batch.len() {
                    failed.push((offset, -code));
                }
                if seq == last {
                    return Ok(failed);
                }
            }
        }
    }
}

fn force_rcvbuf(socket: &Socket) -> io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &NETLINK_RCVBUF).is_err() {
        socket.set_rx_buf_sz(NETLINK_RCVBUF as libc::c_int)?;
    }
    Ok(())
}

/// Reads the kernel's address notifications (RTNLGRP_IPV4_IFADDR, RTNLGRP_IPV6_IFADDR) on
/// its own thread and reports every removed address, and lost notifications, to the driver.
pub struct AddressWatcher;

impl AddressWatcher {
    /// Subscribes in the calling thread's network namespace and starts the reader thread; it
    /// ends when `events` is closed.
    pub fn spawn(events: mpsc::UnboundedSender<AddressEvent>) -> io::Result<()> {
        Self::start(events, None)
    }

    /// [`spawn`](Self::spawn) that also knows `manager`'s bulk sets: when a set's anchor
    /// goes (deleted, expired) or one of its routes is deleted, every address of the set is
    /// reported removed, once, so that the engine puts the whole set back.
    pub fn spawn_for(
        manager: &AddressManager,
        events: mpsc::UnboundedSender<AddressEvent>,
    ) -> io::Result<()> {
        Self::start(events, Some(manager.bulk.clone()))
    }

    fn start(
        events: mpsc::UnboundedSender<AddressEvent>,
        bulk: Option<Arc<Mutex<BulkSets>>>,
    ) -> io::Result<()> {
        const RTNLGRP_IPV4_IFADDR: u32 = 5;
        const RTNLGRP_IPV4_ROUTE: u32 = 7;
        const RTNLGRP_IPV6_IFADDR: u32 = 9;
        const RTNLGRP_IPV6_ROUTE: u32 = 11;
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(RTNLGRP_IPV4_IFADDR)?;
        socket.add_membership(RTNLGRP_IPV6_IFADDR)?;
        if bulk.is_some() {
            socket.add_membership(RTNLGRP_IPV4_ROUTE)?;
            socket.add_membership(RTNLGRP_IPV6_ROUTE)?;
        }
        force_rcvbuf(&socket)?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .map_err(io::Error::from)?;
        std::thread::Builder::new()
            .name("ferrovip-addr-events".into())
            .spawn(move || watch_addresses(socket, events, bulk))?;
        Ok(())
    }
}

fn watch_addresses(
    socket: Socket,
    events: mpsc::UnboundedSender<AddressEvent>,
    bulk: Option<Arc<Mutex<BulkSets>>>,
) {
    let lose_all = || {
        if let Some(bulk) = &bulk {
            let mut bulk = bulk.lock().unwrap_or_else(|e| e.into_inner());
            for set in bulk.sets.values_mut() {
                set.lost = true;
            }
        }
    };
    let mut buf: Vec<u8> = Vec::with_capacity(256 << 10);
    loop {
        if events.is_closed() {
            return;
        }
        buf.clear();
        match socket.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                // The engine adds everything again; bulk sets are then installed again too.
                lose_all();
                let _ = events.send(AddressEvent::Lost);
                continue;
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "address notifications stopped");
                lose_all();
                let _ = events.send(AddressEvent::Lost);
                return;
            }
        }
        for event in removed_addresses(&buf, bulk.as_deref()) {
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

/// The RTM_DELADDR notifications of one datagram, bulk sets' anchors and routes expanded to
/// every address of their set.
fn removed_addresses(datagram: &[u8], bulk: Option<&Mutex<BulkSets>>) -> Vec<AddressEvent> {
    const RTM_DELADDR: u16 = 21;
    const RTM_DELROUTE: u16 = 25;
    let lose = |index: u32, anchor: IpNet, cover: Option<IpNet>| {
        let bulk = bulk?;
        bulk.lock()
            .unwrap_or_else(|e| e.into_inner())
            .lose(index, anchor, cover)
    };
    let mut events = Vec::new();
    let mut pos = 0;
    while let Some(rest) = datagram.get(pos..).filter(|r| r.len() >= 16) {
        let Ok(buffer) = NetlinkBuffer::new_checked(rest) else {
            break;
        };
        let len = buffer.length() as usize;
        pos += (len + 3) & !3;
        if buffer.message_type() != RTM_DELADDR && buffer.message_type() != RTM_DELROUTE {
            continue;
        }
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) else {
            continue;
        };
        match message.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(message)) => {
                let Some(address) = KernelAddress::from_message(message) else {
                    continue;
                };
                let route_held = || {
                    bulk.is_some_and(|b| {
                        b.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .route_held(address.index, &address.net)
                    })
                };
                match lose(address.index, address.net, None) {
                    Some(members) => events.extend(members),
                    // An interface address of a set's member (taken over by the set): the
                    // address stays local through the set's routes.
                    None if route_held() => {}
                    None => events.push(AddressEvent::Removed {
                        index: address.index,
                        net: address.net,
                    }),
                }
            }
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(message)) => {
                if let Some(route) = OwnedRoute::from_message(&message)
                    && let Some(src) = route.prefsrc
                    && let Some(members) = lose(route.index, IpNet::from(src), Some(route.dst))
                {
                    events.extend(members);
                }
            }
            _ => {}
        }
    }
    events
}

/// Sets `/proc/sys/net/ipv4/conf/<ifname>/<key>` unless it already has the value, so an
/// agent whose `/proc/sys` is read-only still works when the host was set up beforehand.
/// `/proc/sys/net` shows the network namespace of the calling thread.
pub(crate) fn ensure_ipv4_conf(
    ifname: &str,
    key: &str,
    value: u32,
) -> Result<(), (PathBuf, io::Error)> {
    let path = ipv4_conf_path(ifname, key);
    let current = std::fs::read_to_string(&path).map_err(|e| (path.clone(), e))?;
    if current.trim() == value.to_string() {
        return Ok(());
    }
    std::fs::write(&path, format!("{value}\n")).map_err(|e| (path, e))
}

pub(crate) fn ipv4_conf_path(ifname: &str, key: &str) -> PathBuf {
    PathBuf::from("/proc/sys/net/ipv4/conf")
        .join(ifname)
        .join(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_route::address::AddressHeader;

    fn message(
        index: u32,
        family: AddressFamily,
        prefix_len: u8,
        attributes: Vec<AddressAttribute>,
    ) -> AddressMessage {
        let mut message = AddressMessage::default();
        message.header = AddressHeader {
            family,
            prefix_len,
            index,
            ..AddressHeader::default()
        };
        message.attributes = attributes;
        message
    }

    #[test]
    fn kernel_address_recognises_our_mark() {
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        let ours = message(
            3,
            AddressFamily::Inet,
            32,
            vec![
                AddressAttribute::Address(ip),
                AddressAttribute::Local(ip),
                AddressAttribute::Protocol(AddressProtocol::Other(FERROVIP_ADDR_PROTO)),
            ],
        );
        let parsed = KernelAddress::from_message(ours).unwrap();
        assert!(parsed.marked);
        assert_eq!(parsed.index, 3);
        assert_eq!(parsed.net, "192.0.2.10/32".parse::<IpNet>().unwrap());

        let kernel_ll = message(
            3,
            AddressFamily::Inet6,
            64,
            vec![
                AddressAttribute::Address("fe80::1".parse().unwrap()),
                AddressAttribute::Protocol(AddressProtocol::LinkLocal),
            ],
        );
        assert!(!KernelAddress::from_message(kernel_ll).unwrap().marked);
    }

    #[test]
    fn point_to_point_address_uses_local_not_peer() {
        let parsed = KernelAddress::from_message(message(
            1,
            AddressFamily::Inet,
            32,
            vec![
                AddressAttribute::Address("198.51.100.1".parse().unwrap()),
                AddressAttribute::Local("192.0.2.1".parse().unwrap()),
            ],
        ))
        .unwrap();
        assert_eq!(parsed.net, "192.0.2.1/32".parse::<IpNet>().unwrap());
    }

    #[test]
    fn extended_flags_attribute_wins_over_header_byte() {
        let mut msg = message(
            1,
            AddressFamily::Inet6,
            64,
            vec![
                AddressAttribute::Address("fe80::1".parse().unwrap()),
                AddressAttribute::Flags(AddressFlags::Permanent | AddressFlags::Tentative),
            ],
        );
        msg.header.flags = AddressHeaderFlags::Permanent;
        let parsed = KernelAddress::from_message(msg).unwrap();
        assert!(parsed.flags.contains(AddressFlags::Tentative));
    }

    #[test]
    fn link_info_reads_name_mac_state_and_mtu() {
        let mut msg = LinkMessage::default();
        msg.header.index = 7;
        msg.header.flags = LinkFlags::Up | LinkFlags::Broadcast;
        msg.attributes = vec![
            LinkAttribute::IfName("eth0".into()),
            LinkAttribute::Address(vec![2, 0, 0, 0, 0, 9]),
            LinkAttribute::Carrier(1),
            LinkAttribute::Mtu(9000),
        ];
        assert_eq!(
            LinkInfo::from_message(&msg),
            LinkInfo {
                index: 7,
                name: "eth0".into(),
                mac: [2, 0, 0, 0, 0, 9],
                up: true,
                carrier: true,
                mtu: 9000,
            }
        );
    }

    #[test]
    fn errors_have_bounded_labels_and_errno() {
        let nack = rtnetlink::Error::NetlinkError({
            let mut message = netlink_packet_core::ErrorMessage::default();
            message.code = std::num::NonZeroI32::new(-libc::EPERM);
            message
        });
        let error = AddrError::Netlink {
            op: NetlinkOp::AddAddr,
            source: nack,
        };
        assert_eq!(error.metric_label(), "add_addr");
        assert_eq!(error.errno(), Some(libc::EPERM));
        assert_eq!(
            AddrError::LinkNotFound("eth9".into()).metric_label(),
            "link_not_found"
        );
    }

    fn datagram(messages: Vec<RouteNetlinkMessage>) -> Vec<u8> {
        let mut out = Vec::new();
        for inner in messages {
            let mut message = NetlinkMessage::from(inner);
            message.finalize();
            let at = out.len();
            out.resize(at + message.buffer_len(), 0);
            message.serialize(&mut out[at..]);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        out
    }

    #[test]
    fn a_lost_anchor_or_route_reports_its_whole_set_once() {
        let members: Vec<IpAddr> = (1..=5)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 9, 0, i)))
            .collect();
        let set = BulkSet::new(4, 32, members.clone(), None);
        assert_eq!(
            set.covers,
            vec![
                "10.9.0.2/31".parse().unwrap(),
                "10.9.0.4/31".parse().unwrap()
            ]
        );
        let bulk = Mutex::new(BulkSets::default());
        bulk.lock().unwrap().insert(set);
        let anchor = message(
            4,
            AddressFamily::Inet,
            32,
            vec![AddressAttribute::Local(members[0])],
        );
        let every: Vec<AddressEvent> = members
            .iter()
            .map(|ip| AddressEvent::Removed {
                index: 4,
                net: IpNet::new(*ip, 32).unwrap(),
            })
            .collect();
        // A route that is not one of the set's (ours by number, another prefix): nothing.
        let stray = local_route(4, "10.9.0.8/29".parse().unwrap(), members[0], None);
        assert!(
            removed_addresses(
                &datagram(vec![RouteNetlinkMessage::DelRoute(stray)]),
                Some(&bulk)
            )
            .is_empty()
        );
        // The anchor's deletion, then the routes the kernel flushes with it: every member
        // once.
        let flushed = local_route(4, "10.9.0.2/31".parse().unwrap(), members[0], None);
        let events = removed_addresses(
            &datagram(vec![
                RouteNetlinkMessage::DelAddress(anchor.clone()),
                RouteNetlinkMessage::DelRoute(flushed.clone()),
            ]),
            Some(&bulk),
        );
        assert_eq!(events, every);
        assert!(bulk.lock().unwrap().sets[&(4, members[0])].lost);
        // Installed again, a deleted route reports the set again.
        bulk.lock()
            .unwrap()
            .sets
            .get_mut(&(4, members[0]))
            .unwrap()
            .lost = false;
        let events = removed_addresses(
            &datagram(vec![RouteNetlinkMessage::DelRoute(flushed)]),
            Some(&bulk),
        );
        assert_eq!(events, every);
        // Without the sets (or for another address) it is one address, as before.
        let events = removed_addresses(
            &datagram(vec![RouteNetlinkMessage::DelAddress(anchor)]),
            None,
        );
        assert_eq!(events, every[..1]);
    }

    /// The NDP responder answers for a live IPv6 set's route-held members only: not for the
    /// anchor (an interface address, which the kernel answers for), not for a lost set, not
    /// once the routes' lifetime ran out, not on another interface or before it listens there.
    #[test]
    fn ndp_answers_only_for_live_route_held_ipv6_members() {
        let base: u128 = "fd00::1:0".parse::<Ipv6Addr>().unwrap().into();
        let members: Vec<IpAddr> = (1..=100u128)
            .map(|i| IpAddr::V6(Ipv6Addr::from(base + i)))
            .collect();
        let v6 = |i: u128| Ipv6Addr::from(base + i);
        let mac = [2, 0, 0, 0, 0, 7];
        let mut bulk = BulkSets::default();
        let set = BulkSet::new(3, 128, members.clone(), Some(Duration::from_secs(2)));
        assert!(set.covers.iter().all(|c| matches!(c, IpNet::V6(_))));
        let route = set.route(set.covers[0]);
        assert!(
            route
                .attributes
                .contains(&netlink_packet_route::route::RouteAttribute::Expires(2))
        );
        bulk.insert(set);
        let now = Instant::now();
        assert_eq!(bulk.ndp_answer(3, v6(50), now), None, "not listening yet");
        bulk.ndp_macs.insert(3, mac);
        assert_eq!(bulk.ndp_answer(3, v6(50), now), Some(mac));
        assert_eq!(bulk.ndp_answer(3, v6(1), now), None, "the anchor");
        assert_eq!(bulk.ndp_answer(3, v6(101), now), None, "not a member");
        assert_eq!(bulk.ndp_answer(4, v6(50), now), None, "another interface");
        assert_eq!(
            bulk.ndp_answer(3, v6(50), now + Duration::from_secs(3)),
            None,
            "the routes expired"
        );
        bulk.sets.get_mut(&(3, members[0])).unwrap().lost = true;
        assert_eq!(bulk.ndp_answer(3, v6(50), now), None, "lost");
    }

    /// The solicited-node groups follow the IPv6 sets: joined for the route-held members of
    /// the sets present when the responder attaches and of those inserted later, the new
    /// members before the old ones left when a set is replaced, left when it is taken;
    /// nothing for IPv4 sets or the anchor.
    #[test]
    fn ipv6_sets_join_and_leave_their_members_groups() {
        use crate::node::ndp::{Membership, Memberships};
        let v6 = |i: u16| IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, i));
        let only = |ip: IpAddr| match ip {
            IpAddr::V6(v6) => v6,
            IpAddr::V4(_) => unreachable!(),
        };
        let mut bulk = BulkSets::default();
        let first = BulkSet::new(3, 128, (1..=3).map(v6).collect(), None);
        bulk.insert(first.clone());
        let (memberships, rx) = Memberships::for_test();
        bulk.attach_memberships(memberships.clone());
        let change = |ifindex, join: Vec<IpAddr>, leave: Vec<IpAddr>| Membership {
            ifindex,
            join: join.into_iter().map(only).collect(),
            leave: leave.into_iter().map(only).collect(),
        };
        assert_eq!(
            rx.try_recv().unwrap(),
            change(3, vec![v6(2), v6(3)], vec![])
        );
        // A second responder's handle changes nothing.
        bulk.attach_memberships(memberships);
        assert!(rx.try_recv().is_err());
        bulk.insert(first.grown([v6(4)]));
        assert_eq!(
            rx.try_recv().unwrap(),
            change(3, vec![v6(2), v6(3), v6(4)], vec![v6(2), v6(3)])
        );
        let v4: Vec<IpAddr> = (1..=3u8)
            .map(|i| IpAddr::V4(Ipv4Addr::new(10, 0, 0, i)))
            .collect();
        bulk.insert(BulkSet::new(3, 32, v4.clone(), None));
        assert!(bulk.take(3, v4[0]).is_some());
        assert!(rx.try_recv().is_err(), "IPv4 sets have no groups");
        assert!(bulk.take(3, v6(1)).is_some());
        assert_eq!(
            rx.try_recv().unwrap(),
            change(3, vec![], vec![v6(2), v6(3), v6(4)])
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn connect_without_runtime_is_an_error() {
        let error = AddressManager::connect().unwrap_err();
        assert_eq!(error.metric_label(), "no_runtime");
    }
}
