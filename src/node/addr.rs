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

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST, NetlinkBuffer, NetlinkMessage,
    NetlinkPayload,
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

use super::ownership::{AddressRecord, OwnershipMode};

/// `IFA_PROTO` value marking addresses added by ferrovip ('F'). The kernel reserves 0-3
/// (unspec, loopback, router advertisement, link-local); other values are free for user
/// space and no common tool uses this one.
pub const FERROVIP_ADDR_PROTO: u8 = 0x46;

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
}

impl NetlinkOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetLink => "get_link",
            Self::GetAddr => "get_addr",
            Self::AddAddr => "add_addr",
            Self::DelAddr => "del_addr",
            Self::RenewAddr => "renew_addr",
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
            Self::Record { .. } => "record",
        }
    }

    /// The kernel's errno (positive, e.g. `libc::EPERM`) when netlink refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Sysctl { source, .. } => source.raw_os_error(),
            Self::Renew(source) => source.raw_os_error(),
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
/// Requests per `sendmsg` of a renewal: each error a batch can produce fits the receive buffer.
const RENEW_BATCH: usize = 256;
/// Receive buffer of the renewal and notification sockets (forced, as root).
const NETLINK_RCVBUF: usize = 4 << 20;

/// Adds, finds and removes ferrovip's virtual addresses over one rtnetlink connection.
#[derive(Debug, Clone)]
pub struct AddressManager {
    handle: Handle,
    mode: OwnershipMode,
    record: Arc<Mutex<AddressRecord>>,
    renewer: Arc<Mutex<Option<Renewer>>>,
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
        }
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
        Ok(Self::new(handle))
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

    /// Adds many addresses to one interface (checking `promote_secondaries` once); returns
    /// those that failed. A thousand take tens of milliseconds, well within one lifetime.
    pub async fn add_all(
        &self,
        index: u32,
        nets: &[IpNet],
        lifetime: Option<Duration>,
    ) -> Vec<(IpNet, AddrError)> {
        if nets.iter().any(|n| n.addr().is_ipv4())
            && let Err(e) = self.ensure_promote_secondaries(index).await
        {
            let mut failed = vec![(nets[0], e)];
            for net in &nets[1..] {
                if let Err(e) = self.add_with_lifetime(index, *net, lifetime).await {
                    failed.push((*net, e));
                }
            }
            return failed;
        }
        let mut failed = Vec::new();
        for net in nets {
            if let Err(e) = self.add_one(index, *net, lifetime).await {
                failed.push((*net, e));
            }
        }
        failed
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
        let messages: Vec<(u32, IpNet, AddressMessage)> = {
            let record = self.record();
            addresses
                .iter()
                .filter(|(index, net)| record.contains(*index, *net))
                .map(|&(index, net)| (index, net, self.address_message(index, net, Some(lifetime))))
                .collect()
        };
        let mut guard = self.renewer.lock().unwrap_or_else(|e| e.into_inner());
        if guard.is_none() {
            *guard = Some(Renewer::open().map_err(AddrError::Renew)?);
        }
        let renewer = guard.as_mut().expect("opened above");
        let mut report = RenewReport::default();
        for chunk in messages.chunks(RENEW_BATCH) {
            match renewer.renew(chunk) {
                Ok(failed) => {
                    report.writes += 1;
                    report.renewed += chunk.len();
                    report.failed.extend(failed);
                }
                Err(e) => {
                    // The socket's state is unknown: open a new one next time.
                    *guard = None;
                    return Err(AddrError::Renew(e));
                }
            }
        }
        Ok(report)
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
        let mut removed = Vec::new();
        for address in leftovers {
            let entry = (address.index, address.net);
            if self.delete(address.message).await? {
                removed.push(entry);
            }
        }
        {
            let mut record = self.record();
            let gone: Vec<(u32, IpNet)> = record
                .entries()
                .map(|(k, _)| *k)
                .filter(|k| !held.contains(k))
                .collect();
            for (index, net) in gone {
                record.remove(index, net);
            }
            for &(index, net) in &held {
                if !record.contains(index, net) {
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
    }

    /// Every address on every interface that is ours.
    pub async fn list_owned(&self) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        Ok(addresses
            .into_iter()
            .filter(|address| self.is_ours(address))
            .map(|address| (address.index, address.net))
            .collect())
    }

    /// Removes every address of ours not in `keep` (what a crashed predecessor left
    /// behind; `ferrovip cleanup`). Returns what it removed; stops at the first failure, and
    /// is safe to call again.
    pub async fn remove_all_owned_except(
        &self,
        keep: &HashSet<(u32, IpNet)>,
    ) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        let mut removed = Vec::new();
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

/// Seconds for `IFA_CACHEINFO`: whole seconds, at least 1; `None` is forever.
fn lifetime_seconds(lifetime: Option<Duration>) -> u32 {
    lifetime.map_or(u32::MAX, |d| {
        u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX - 1)
    })
}

/// A blocking rtnetlink socket for renewals: many RTM_NEWADDR requests per `sendmsg`.
#[derive(Debug)]
struct Renewer {
    socket: Socket,
    seq: u32,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl Renewer {
    fn open() -> io::Result<Renewer> {
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
        Ok(Renewer {
            socket,
            seq: 0,
            send_buf: Vec::new(),
            recv_buf: Vec::with_capacity(64 << 10),
        })
    }

    /// One `sendmsg` with every request; returns the refused ones with their errno.
    fn renew(
        &mut self,
        batch: &[(u32, IpNet, AddressMessage)],
    ) -> io::Result<Vec<(u32, IpNet, i32)>> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        self.send_buf.clear();
        let first = self.seq.wrapping_add(1);
        for (i, (_, _, message)) in batch.iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let mut request = NetlinkMessage::new(
                Default::default(),
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewAddress(message.clone())),
            );
            let last = i + 1 == batch.len();
            request.header.flags =
                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_REPLACE | if last { NLM_F_ACK } else { 0 };
            request.header.sequence_number = self.seq;
            request.finalize();
            let at = self.send_buf.len();
            self.send_buf.resize(at + request.buffer_len(), 0);
            request.serialize(&mut self.send_buf[at..]);
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
                if code != 0
                    && let Some((index, net, _)) = batch.get(offset)
                {
                    failed.push((*index, *net, -code));
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
        const RTNLGRP_IPV4_IFADDR: u32 = 5;
        const RTNLGRP_IPV6_IFADDR: u32 = 9;
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.add_membership(RTNLGRP_IPV4_IFADDR)?;
        socket.add_membership(RTNLGRP_IPV6_IFADDR)?;
        force_rcvbuf(&socket)?;
        nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(1, 0),
        )
        .map_err(io::Error::from)?;
        std::thread::Builder::new()
            .name("ferrovip-addr-events".into())
            .spawn(move || watch_addresses(socket, events))?;
        Ok(())
    }
}

fn watch_addresses(socket: Socket, events: mpsc::UnboundedSender<AddressEvent>) {
    let mut buf: Vec<u8> = Vec::with_capacity(256 << 10);
    loop {
        if events.is_closed() {
            return;
        }
        buf.clear();
        match socket.recv(&mut buf, 0) {
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
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
                let _ = events.send(AddressEvent::Lost);
                return;
            }
        }
        for event in removed_addresses(&buf) {
            if events.send(event).is_err() {
                return;
            }
        }
    }
}

/// The RTM_DELADDR notifications of one datagram.
fn removed_addresses(datagram: &[u8]) -> Vec<AddressEvent> {
    const RTM_DELADDR: u16 = 21;
    let mut events = Vec::new();
    let mut pos = 0;
    while let Some(rest) = datagram.get(pos..).filter(|r| r.len() >= 16) {
        let Ok(buffer) = NetlinkBuffer::new_checked(rest) else {
            break;
        };
        let len = buffer.length() as usize;
        pos += (len + 3) & !3;
        if buffer.message_type() != RTM_DELADDR {
            continue;
        }
        let Ok(message) = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rest[..len]) else {
            continue;
        };
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelAddress(message)) =
            message.payload
            && let Some(address) = KernelAddress::from_message(message)
        {
            events.push(AddressEvent::Removed {
                index: address.index,
                net: address.net,
            });
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

    #[test]
    fn connect_without_runtime_is_an_error() {
        let error = AddressManager::connect().unwrap_err();
        assert_eq!(error.metric_label(), "no_runtime");
    }
}
