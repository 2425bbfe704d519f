//! Virtual-MAC interfaces: one macvlan per VRRP instance that uses the virtual router MAC
//! (00:00:5e:00:01:VRID for IPv4, 00:00:5e:00:02:VRID for IPv6, RFC 5798 §7.3).
//!
//! Naming and ownership: ferrovip's macvlans are called `fv4.<parent ifindex>.<vrid>` (or
//! `fv6.…`), e.g. `fv4.2.51`; when the parent's index is too large for the 15-byte interface
//! name limit, `fv4<parent ifindex, 8 hex digits><vrid, 2 hex digits>`. The parent is part of
//! the name because the same VRID may run on two LANs; the family because an IPv4 and an
//! IPv6 instance with the same VRID have different virtual MACs. A macvlan whose name starts
//! with [`VMAC_PREFIX`] is ours; nothing else is ever deleted or changed.
//!
//! Kernel settings, as keepalived sets them for its `use_vmac` interfaces:
//! - on the macvlan: `arp_ignore=1` (answer ARP only for addresses on the macvlan itself),
//!   `accept_local=1` (accept packets from local source addresses, so the advertisements of
//!   another instance on this host are heard), `rp_filter=0` (receive on an interface that
//!   has no address yet), `promote_secondaries=1`;
//! - on the parent: `arp_ignore=1` and `arp_filter=1`, so that the parent does not answer
//!   ARP for the VIP with the node's real MAC (Linux answers ARP for any local address on
//!   any interface by default), and `arp_announce=2`, so that the parent's own ARP requests
//!   (for replies sourced from the VIP) carry its own address, not the VIP: otherwise every
//!   neighbour it asks learns the VIP at the real MAC. These stay set when the macvlan goes; use
//!   [`ArpSettings::read`] before and [`ArpSettings::restore`] after to undo them.
//! - IPv6 address generation is turned off on the macvlan before it comes up: a link-local
//!   address derived from the virtual MAC would be the same on every router of the VRID and
//!   fail duplicate address detection on all but one. A caller running VRRP over IPv6 on the
//!   macvlan adds a link-local address itself (keepalived copies the parent's).
//!
//! Mode bridge (as specified for ferrovip; keepalived defaults to private): frames between
//! macvlans of one parent are switched inside the host.

use std::io;
use std::path::PathBuf;

use futures::TryStreamExt;
use netlink_packet_core::{DefaultNla, Emitable, NLA_F_NESTED};
use netlink_packet_route::link::{
    AfSpecInet, AfSpecInet6, AfSpecUnspec, In6AddrGenMode, InfoKind, LinkAttribute, LinkInfo,
    LinkMessage, MacVlanMode,
};
use rtnetlink::{Handle, LinkMacVlan, LinkUnspec};

use super::addr::{ensure_ipv4_conf, ipv4_conf_path, netlink_errno};
use crate::vocab::Family;

/// Names of ferrovip's macvlans start with this.
pub const VMAC_PREFIX: &str = "fv";

/// Linux interface names hold at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// The macvlan name for a VRRP instance with a virtual MAC.
pub fn vmac_name(parent_index: u32, family: Family, vrid: u8) -> String {
    let family = match family {
        Family::V4 => '4',
        Family::V6 => '6',
    };
    let readable = format!("{VMAC_PREFIX}{family}.{parent_index}.{vrid}");
    if readable.len() <= MAX_IFNAME_LEN {
        readable
    } else {
        format!("{VMAC_PREFIX}{family}{parent_index:08x}{vrid:02x}")
    }
}

/// The family and VRID a VRRP virtual router MAC stands for.
pub fn vrrp_identity(mac: [u8; 6]) -> Option<(Family, u8)> {
    match mac {
        [0x00, 0x00, 0x5e, 0x00, 0x01, vrid] => Some((Family::V4, vrid)),
        [0x00, 0x00, 0x5e, 0x00, 0x02, vrid] => Some((Family::V6, vrid)),
        _ => None,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkOp {
    GetLink,
    AddLink,
    SetLink,
    DelLink,
}

impl LinkOp {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::GetLink => "get_link",
            Self::AddLink => "add_link",
            Self::SetLink => "set_link",
            Self::DelLink => "del_link",
        }
    }
}

impl std::fmt::Display for LinkOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0:?} is not a valid ferrovip macvlan name (prefix {VMAC_PREFIX}, at most 15 bytes)")]
    InvalidName(String),
    #[error("interface {0} exists and is not a ferrovip macvlan")]
    NotOurs(String),
    #[error("interface {0} not found")]
    LinkNotFound(String),
    #[error("rtnetlink {op} failed")]
    Netlink {
        op: LinkOp,
        #[source]
        source: rtnetlink::Error,
    },
    #[error(
        "cannot set {} ({source}){}",
        path.display(),
        if source.raw_os_error() == Some(libc::EROFS) || source.kind() == io::ErrorKind::PermissionDenied {
            ": /proc/sys is read-only here (an unprivileged container), and this setting has no rtnetlink equivalent: run the agent privileged for VirtualIPs with virtualMac, or do without virtualMac"
        } else {
            ""
        }
    )]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl LinkError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidName(_) => "invalid_name",
            Self::NotOurs(_) => "not_ours",
            Self::LinkNotFound(_) => "link_not_found",
            Self::Netlink { op, .. } => op.as_str(),
            Self::Sysctl { .. } => "sysctl",
        }
    }

    /// The kernel's errno (positive) when netlink or procfs refused.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Netlink { source, .. } => netlink_errno(source),
            Self::Sysctl { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn sysctl_error((path, source): (PathBuf, io::Error)) -> LinkError {
    LinkError::Sysctl { path, source }
}

/// One of ferrovip's macvlans as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmacLink {
    pub index: u32,
    pub name: String,
    pub parent_index: u32,
    pub mac: [u8; 6],
    pub up: bool,
}

/// What matters about a link for macvlan management.
#[derive(Debug, Clone)]
struct LinkFacts {
    index: u32,
    name: String,
    macvlan: bool,
    parent_index: Option<u32>,
    mac: Option<[u8; 6]>,
    up: bool,
}

impl LinkFacts {
    fn from_message(message: &LinkMessage) -> Self {
        let mut facts = LinkFacts {
            index: message.header.index,
            name: String::new(),
            macvlan: false,
            parent_index: None,
            mac: None,
            up: message
                .header
                .flags
                .contains(netlink_packet_route::link::LinkFlags::Up),
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => facts.name.clone_from(name),
                LinkAttribute::Link(parent) => facts.parent_index = Some(*parent),
                LinkAttribute::Address(mac) => facts.mac = <[u8; 6]>::try_from(mac.as_slice()).ok(),
                LinkAttribute::LinkInfo(infos) => {
                    facts.macvlan = infos
                        .iter()
                        .any(|info| matches!(info, LinkInfo::Kind(InfoKind::MacVlan)));
                }
                _ => {}
            }
        }
        facts
    }

    fn is_ours(&self) -> bool {
        self.macvlan && self.name.starts_with(VMAC_PREFIX)
    }
}

/// Creates, finds and deletes ferrovip's macvlans. Shares a connection with
/// [`AddressManager`](super::addr::AddressManager) through its handle.
#[derive(Debug, Clone)]
pub struct MacvlanManager {
    handle: Handle,
}

impl MacvlanManager {
    pub fn new(handle: Handle) -> Self {
        Self { handle }
    }

    /// Makes `name` a macvlan (mode bridge) on `parent_index` with address `mac`, up, with
    /// the kernel settings described in the module documentation; returns its index.
    /// Idempotent: an existing macvlan of ours is kept (MAC corrected, brought up), or
    /// re-created when it hangs off another parent.
    pub async fn ensure_macvlan(
        &self,
        parent_index: u32,
        name: &str,
        mac: [u8; 6],
    ) -> Result<u32, LinkError> {
        validate_name(name)?;
        let parent = self.get(LinkLookup::Index(parent_index)).await?;

        let mut existing = self.find(name).await?;
        if let Some(link) = &existing {
            if !link.is_ours() {
                return Err(LinkError::NotOurs(name.to_owned()));
            }
            if link.parent_index != Some(parent_index) {
                self.delete_index(link.index).await?;
                existing = None;
            }
        }
        let link = match existing {
            Some(link) => link,
            None => self.create(parent_index, name, mac).await?,
        };

        self.set_ipv4_conf(link.index, &link.name, VMAC_SETTINGS)
            .await?;
        self.set_ipv4_conf(parent.index, &parent.name, PARENT_SETTINGS)
            .await?;

        if link.mac != Some(mac) || !link.up {
            let message = LinkUnspec::new_with_index(link.index)
                .address(mac.to_vec())
                .up()
                .build();
            self.set_link(message).await?;
        }
        Ok(link.index)
    }

    /// One RTM_SETLINK.
    async fn set_link(&self, message: LinkMessage) -> Result<(), LinkError> {
        self.handle
            .link()
            .set(message)
            .execute()
            .await
            .map_err(|source| LinkError::Netlink {
                op: LinkOp::SetLink,
                source,
            })
    }

    /// Deletes one of our macvlans. Returns `false` when there is no such interface;
    /// refuses interfaces that are not ours.
    pub async fn delete_link(&self, name: &str) -> Result<bool, LinkError> {
        let Some(link) = self.find(name).await? else {
            return Ok(false);
        };
        if !link.is_ours() {
            return Err(LinkError::NotOurs(name.to_owned()));
        }
        self.delete_index(link.index).await
    }

    /// All of our macvlans, on every parent.
    pub async fn list_owned(&self) -> Result<Vec<VmacLink>, LinkError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(|source| LinkError::Netlink {
                op: LinkOp::GetLink,
                source,
            })?;
        Ok(messages
            .iter()
            .map(LinkFacts::from_message)
            .filter(LinkFacts::is_ours)
            .map(|facts| VmacLink {
                index: facts.index,
                name: facts.name,
                parent_index: facts.parent_index.unwrap_or(0),
                mac: facts.mac.unwrap_or([0; 6]),
                up: facts.up,
            })
            .collect())
    }

    async fn create(
        &self,
        parent_index: u32,
        name: &str,
        mac: [u8; 6],
    ) -> Result<LinkFacts, LinkError> {
        // Created down: IPv6 address generation must be off before the link comes up.
        let message = LinkMacVlan::new(name, parent_index, MacVlanMode::Bridge)
            .address(mac.to_vec())
            .build();
        match self.handle.link().add(message).execute().await {
            Ok(()) => {}
            // Another task created it between our lookup and now; use theirs.
            Err(source) if netlink_errno(&source) == Some(libc::EEXIST) => {}
            Err(source) if netlink_errno(&source) == Some(libc::ENODEV) => {
                return Err(LinkError::LinkNotFound(parent_index.to_string()));
            }
            Err(source) => {
                return Err(LinkError::Netlink {
                    op: LinkOp::AddLink,
                    source,
                });
            }
        }
        let link = self.get(LinkLookup::Name(name)).await?;
        self.disable_ipv6_address_generation(link.index, name)
            .await?;
        Ok(link)
    }

    async fn delete_index(&self, index: u32) -> Result<bool, LinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(true),
            Err(source) if netlink_errno(&source) == Some(libc::ENODEV) => Ok(false),
            Err(source) => Err(LinkError::Netlink {
                op: LinkOp::DelLink,
                source,
            }),
        }
    }

    async fn find(&self, name: &str) -> Result<Option<LinkFacts>, LinkError> {
        match self.get(LinkLookup::Name(name)).await {
            Ok(link) => Ok(Some(link)),
            Err(LinkError::LinkNotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    async fn get(&self, lookup: LinkLookup<'_>) -> Result<LinkFacts, LinkError> {
        let request = self.handle.link().get();
        let (request, wanted) = match lookup {
            LinkLookup::Index(index) => (request.match_index(index), index.to_string()),
            LinkLookup::Name(name) => (request.match_name(name), name.to_owned()),
        };
        match request.execute().try_next().await {
            Ok(Some(message)) => Ok(LinkFacts::from_message(&message)),
            Ok(None) => Err(LinkError::LinkNotFound(wanted)),
            Err(source) if netlink_errno(&source) == Some(libc::ENODEV) => {
                Err(LinkError::LinkNotFound(wanted))
            }
            Err(source) => Err(LinkError::Netlink {
                op: LinkOp::GetLink,
                source,
            }),
        }
    }
}

enum LinkLookup<'a> {
    Index(u32),
    Name(&'a str),
}

fn validate_name(name: &str) -> Result<(), LinkError> {
    let valid = name.starts_with(VMAC_PREFIX)
        && name.len() <= MAX_IFNAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if valid {
        Ok(())
    } else {
        Err(LinkError::InvalidName(name.to_owned()))
    }
}

/// The macvlan's IPv4 settings (see the module documentation).
const VMAC_SETTINGS: &[(&str, u32)] = &[
    ("arp_ignore", 1),
    ("accept_local", 1),
    ("rp_filter", 0),
    ("promote_secondaries", 1),
];

/// The parent's IPv4 settings.
const PARENT_SETTINGS: &[(&str, u32)] =
    &[("arp_ignore", 1), ("arp_filter", 1), ("arp_announce", 2)];

/// `IFLA_INET_CONF`, inside `IFLA_AF_SPEC` / `AF_INET` of an RTM_SETLINK.
const IFLA_INET_CONF: u16 = 1;

/// The kernel's `IPV4_DEVCONF_*` id of a per-interface IPv4 setting.
fn devconf_id(key: &str) -> Option<u16> {
    Some(match key {
        "rp_filter" => 8,
        "arp_filter" => 13,
        "arp_announce" => 18,
        "arp_ignore" => 19,
        "promote_secondaries" => 20,
        "accept_local" => 23,
        _ => return None,
    })
}

/// Whether a /proc/sys write failed because the file system is read-only (an unprivileged
/// container's /proc/sys) or not writable to us.
fn read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EROFS) || e.kind() == io::ErrorKind::PermissionDenied
}

/// The `IFLA_INET_CONF` attribute setting `settings` (each `IPV4_DEVCONF_*` id, u32 value).
fn inet_conf_attribute(settings: &[(u16, u32)]) -> LinkAttribute {
    let mut value = Vec::new();
    for (id, v) in settings {
        let nla = DefaultNla::new(*id, v.to_ne_bytes().to_vec());
        let mut buf = vec![0; nla.buffer_len()];
        nla.emit(&mut buf);
        value.extend(buf);
    }
    let conf = DefaultNla::new(IFLA_INET_CONF | NLA_F_NESTED, value);
    LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![AfSpecInet::Other(conf)])])
}

impl MacvlanManager {
    /// Sets an interface's IPv4 settings where they differ: through /proc/sys, or, where that
    /// is read-only (an unprivileged container), over rtnetlink (RTM_SETLINK with
    /// `IFLA_INET_CONF`, which needs CAP_NET_ADMIN alone), read back through /proc/sys.
    async fn set_ipv4_conf(
        &self,
        index: u32,
        ifname: &str,
        settings: &[(&str, u32)],
    ) -> Result<(), LinkError> {
        let mut pending = Vec::new();
        for (key, value) in settings {
            match ensure_ipv4_conf(ifname, key, *value) {
                Ok(()) => {}
                Err((path, e)) if read_only(&e) => match devconf_id(key) {
                    Some(id) => pending.push((*key, id, *value, path)),
                    None => return Err(sysctl_error((path, e))),
                },
                Err(e) => return Err(sysctl_error(e)),
            }
        }
        if pending.is_empty() {
            return Ok(());
        }
        let ids: Vec<(u16, u32)> = pending.iter().map(|(_, id, v, _)| (*id, *v)).collect();
        let mut message = LinkUnspec::new_with_index(index).build();
        message.attributes.push(inet_conf_attribute(&ids));
        self.set_link(message).await?;
        for (key, _, value, path) in pending {
            if read_ipv4_conf(ifname, key)? != value {
                return Err(LinkError::Sysctl {
                    path,
                    source: io::Error::other(format!(
                        "set to {value} over rtnetlink, but it reads back otherwise"
                    )),
                });
            }
        }
        Ok(())
    }
}

/// `addr_gen_mode` 1 (`IN6_ADDR_GEN_MODE_NONE`). Skipped when the host has no IPv6.
impl MacvlanManager {
    /// `addr_gen_mode` 1 (`IN6_ADDR_GEN_MODE_NONE`), through /proc/sys or, where that is
    /// read-only, over rtnetlink (`IFLA_INET6_ADDR_GEN_MODE`). Skipped when the host has no
    /// IPv6.
    async fn disable_ipv6_address_generation(
        &self,
        index: u32,
        name: &str,
    ) -> Result<(), LinkError> {
        let path = PathBuf::from("/proc/sys/net/ipv6/conf")
            .join(name)
            .join("addr_gen_mode");
        match std::fs::read_to_string(&path) {
            Err(_) => return Ok(()),
            Ok(v) if v.trim() == "1" => return Ok(()),
            Ok(_) => {}
        }
        match std::fs::write(&path, "1\n") {
            Ok(()) => return Ok(()),
            Err(source) if !read_only(&source) => {
                return Err(LinkError::Sysctl { path, source });
            }
            Err(_) => {}
        }
        let mut message = LinkUnspec::new_with_index(index).build();
        message
            .attributes
            .push(LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet6(
                vec![AfSpecInet6::AddrGenMode(In6AddrGenMode::None)],
            )]));
        self.set_link(message).await?;
        match std::fs::read_to_string(&path) {
            Ok(v) if v.trim() == "1" => Ok(()),
            other => Err(LinkError::Sysctl {
                path,
                source: io::Error::other(format!(
                    "set to 1 over rtnetlink, but it reads back {other:?}"
                )),
            }),
        }
    }
}

/// The parent-side ARP settings that [`MacvlanManager::ensure_macvlan`] changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArpSettings {
    pub arp_ignore: u32,
    pub arp_filter: u32,
    pub arp_announce: u32,
}

impl ArpSettings {
    pub fn read(ifname: &str) -> Result<Self, LinkError> {
        Ok(Self {
            arp_ignore: read_ipv4_conf(ifname, "arp_ignore")?,
            arp_filter: read_ipv4_conf(ifname, "arp_filter")?,
            arp_announce: read_ipv4_conf(ifname, "arp_announce")?,
        })
    }

    pub fn restore(&self, ifname: &str) -> Result<(), LinkError> {
        ensure_ipv4_conf(ifname, "arp_ignore", self.arp_ignore).map_err(sysctl_error)?;
        ensure_ipv4_conf(ifname, "arp_filter", self.arp_filter).map_err(sysctl_error)?;
        ensure_ipv4_conf(ifname, "arp_announce", self.arp_announce).map_err(sysctl_error)
    }
}

fn read_ipv4_conf(ifname: &str, key: &str) -> Result<u32, LinkError> {
    let path = ipv4_conf_path(ifname, key);
    let text = std::fs::read_to_string(&path).map_err(|source| LinkError::Sysctl {
        path: path.clone(),
        source,
    })?;
    text.trim().parse().map_err(|_| LinkError::Sysctl {
        path,
        source: io::Error::new(io::ErrorKind::InvalidData, "not an unsigned integer"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmac_names_are_readable_and_fit_ifnamsiz() {
        assert_eq!(vmac_name(2, Family::V4, 51), "fv4.2.51");
        assert_eq!(vmac_name(9_999_999, Family::V6, 255), "fv6.9999999.255");
        let long = vmac_name(10_000_000, Family::V4, 255);
        assert_eq!(long, "fv400989680ff");
        assert_eq!(vmac_name(u32::MAX, Family::V6, 1), "fv6ffffffff01");
        for name in [long, vmac_name(u32::MAX, Family::V6, 255)] {
            assert!(name.len() <= MAX_IFNAME_LEN);
            validate_name(&name).unwrap();
        }
    }

    #[test]
    fn names_distinguish_family_parent_and_vrid() {
        let names = [
            vmac_name(2, Family::V4, 51),
            vmac_name(2, Family::V6, 51),
            vmac_name(3, Family::V4, 51),
            vmac_name(2, Family::V4, 52),
            vmac_name(25, Family::V4, 1),
            vmac_name(2, Family::V4, 51),
        ];
        let distinct: std::collections::HashSet<_> = names.iter().collect();
        assert_eq!(distinct.len(), 5);
    }

    #[test]
    fn vrrp_identity_recognises_virtual_router_macs() {
        assert_eq!(
            vrrp_identity([0, 0, 0x5e, 0, 1, 0x33]),
            Some((Family::V4, 51))
        );
        assert_eq!(
            vrrp_identity([0, 0, 0x5e, 0, 2, 10]),
            Some((Family::V6, 10))
        );
        assert_eq!(vrrp_identity([2, 0, 0, 0, 0, 1]), None);
    }

    #[test]
    fn names_without_our_prefix_or_too_long_are_rejected() {
        for bad in ["eth0", "fv4.1234567890.1", "", "fv/../x", "fv 1"] {
            let error = validate_name(bad).unwrap_err();
            assert_eq!(error.metric_label(), "invalid_name");
        }
    }

    #[test]
    fn only_macvlans_with_our_prefix_are_ours() {
        let mut message = LinkMessage::default();
        message.header.index = 9;
        message.attributes = vec![
            LinkAttribute::IfName("fv4.2.51".into()),
            LinkAttribute::Link(2),
            LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::MacVlan)]),
        ];
        let facts = LinkFacts::from_message(&message);
        assert!(facts.is_ours());
        assert_eq!(facts.parent_index, Some(2));

        message.attributes[2] = LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::Veth)]);
        assert!(!LinkFacts::from_message(&message).is_ours());

        message.attributes[0] = LinkAttribute::IfName("macvlan0".into());
        message.attributes[2] = LinkAttribute::LinkInfo(vec![LinkInfo::Kind(InfoKind::MacVlan)]);
        assert!(!LinkFacts::from_message(&message).is_ours());
    }
}
