//! Virtual addresses on interfaces, via rtnetlink, marked as ours.
//!
//! Every address ferrovip adds carries the address protocol [`FERROVIP_ADDR_PROTO`]
//! (`IFA_PROTO`, Linux ≥ 6.1; iproute2 releases after 6.1 show it as `proto` in
//! `ip -d addr`, Debian 12's 6.1 does not).
//! The kernel keeps the mark with the address, so an agent that restarts after a crash finds
//! the addresses its predecessor left behind, and never removes an address somebody else
//! configured, even one with the same value.
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
use std::path::PathBuf;
use std::time::Duration;

use futures::TryStreamExt;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressProtocol, CacheInfo,
};
use netlink_packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::Handle;

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
}

impl NetlinkOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetLink => "get_link",
            Self::GetAddr => "get_addr",
            Self::AddAddr => "add_addr",
            Self::DelAddr => "del_addr",
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
    #[error("cannot set {}", path.display())]
    Sysctl {
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
        }
    }

    /// The kernel's errno (positive, e.g. `libc::EPERM`) when netlink refused a request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Sysctl { source, .. } => source.raw_os_error(),
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
    owned: bool,
    flags: AddressFlags,
    /// Valid lifetime in seconds; `None` for forever.
    valid_lifetime: Option<u32>,
    message: AddressMessage,
}

impl KernelAddress {
    fn from_message(message: AddressMessage) -> Option<Self> {
        let mut local = None;
        let mut address = None;
        let mut owned = false;
        let mut valid_lifetime = None;
        let mut flags = AddressFlags::from_bits_retain(u32::from(message.header.flags.bits()));
        for attribute in &message.attributes {
            match attribute {
                AddressAttribute::Local(ip) => local = Some(*ip),
                AddressAttribute::Address(ip) => address = Some(*ip),
                AddressAttribute::Protocol(proto) => {
                    owned = u8::from(*proto) == FERROVIP_ADDR_PROTO;
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
            owned,
            flags,
            valid_lifetime,
            message,
        })
    }
}

/// Adds, finds and removes ferrovip's virtual addresses over one rtnetlink connection.
#[derive(Debug, Clone)]
pub struct AddressManager {
    handle: Handle,
}

impl AddressManager {
    /// Wraps a handle whose connection task the caller already spawned.
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// Opens a connection in the current network namespace and spawns its task on the
    /// current tokio runtime. Strict checking makes the kernel filter address dumps by
    /// interface instead of sending every address of the host.
    pub fn connect() -> Result<Self, AddrError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(AddrError::NoRuntime)?;
        let (connection, handle, _) =
            rtnetlink::new_connection_with_strict_check().map_err(AddrError::Connect)?;
        runtime.spawn(connection);
        Ok(Self::new(handle))
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
                    if !address.owned && !address.flags.contains(AddressFlags::Secondary) =>
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
                        && !address.owned
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
        for address in addresses.iter().filter(|a| !a.owned) {
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

    /// Adds `net` to the interface, marked as ours. Adding an address that is already there
    /// succeeds; if that address was not added by ferrovip it stays foreign, so
    /// [`remove`](Self::remove) will leave it alone.
    pub async fn add(&self, index: u32, net: IpNet) -> Result<(), AddrError> {
        self.add_with_lifetime(index, net, None, false).await
    }

    /// Gives one of our addresses a finite valid lifetime (the kernel removes it when that
    /// runs out), or makes it permanent again with `None`. A restarting agent holds its
    /// addresses this way, so they cannot outlive it by more than the hold.
    pub async fn set_lifetime(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
    ) -> Result<(), AddrError> {
        self.add_with_lifetime(index, net, lifetime, true).await
    }

    /// Our addresses that carry a finite lifetime: those a restarting predecessor held.
    pub async fn list_held(&self) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        Ok(addresses
            .into_iter()
            .filter(|address| address.owned && address.valid_lifetime.is_some())
            .map(|address| (address.index, address.net))
            .collect())
    }

    async fn add_with_lifetime(
        &self,
        index: u32,
        net: IpNet,
        lifetime: Option<Duration>,
        replace: bool,
    ) -> Result<(), AddrError> {
        if net.addr().is_ipv4() {
            self.ensure_promote_secondaries(index).await?;
        }
        let mut request = self
            .handle
            .address()
            .add(index, net.addr(), net.prefix_len());
        let message = request.message_mut();
        message
            .attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(
                FERROVIP_ADDR_PROTO,
            )));
        if net.addr().is_ipv6() {
            message.header.flags = AddressHeaderFlags::Nodad;
            message
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if replace {
            let seconds = lifetime.map_or(u32::MAX, |d| {
                u32::try_from(d.as_secs().max(1)).unwrap_or(u32::MAX - 1)
            });
            let mut info = CacheInfo::default();
            info.ifa_preferred = seconds;
            info.ifa_valid = seconds;
            message.attributes.push(AddressAttribute::CacheInfo(info));
            request = request.replace();
        }
        match request.execute().await {
            Ok(()) => Ok(()),
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
            .find(|address| address.owned && address.net == net)
        else {
            return Ok(false);
        };
        self.delete(ours.message).await
    }

    /// Every address on every interface that carries our mark.
    pub async fn list_owned(&self) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        Ok(addresses
            .into_iter()
            .filter(|address| address.owned)
            .map(|address| (address.index, address.net))
            .collect())
    }

    /// Start-up cleanup: removes every address of ours not in `keep` (what a crashed
    /// predecessor left behind). Returns what it removed; stops at the first failure, and
    /// is safe to call again.
    pub async fn remove_all_owned_except(
        &self,
        keep: &HashSet<(u32, IpNet)>,
    ) -> Result<Vec<(u32, IpNet)>, AddrError> {
        let addresses = self.addresses(None, AddressFamily::Unspec).await?;
        let mut removed = Vec::new();
        for address in addresses {
            if !address.owned || keep.contains(&(address.index, address.net)) {
                continue;
            }
            let entry = (address.index, address.net);
            if self.delete(address.message).await? {
                removed.push(entry);
            }
        }
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
        let name = self.link_by_index(index).await?.name;
        ensure_ipv4_conf(&name, "promote_secondaries", 1)
            .map_err(|(path, source)| AddrError::Sysctl { path, source })
    }
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
        assert!(parsed.owned);
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
        assert!(!KernelAddress::from_message(kernel_ll).unwrap().owned);
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
