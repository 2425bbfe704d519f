//! IPVS generic netlink codec: family `"IPVS"`, version 1 (`include/uapi/linux/ip_vs.h`).
//!
//! ```text
//!  nlmsghdr | genlmsghdr {cmd, version 1} | IPVS_CMD_ATTR_SERVICE (nested)
//!                                          |   AF u16, PROTOCOL u16, ADDR 16 bytes, PORT be16
//!                                          |   or AF u16, FWMARK u32
//!                                          |   SCHED_NAME str, [PE_NAME str], FLAGS {u32, u32},
//!                                          |   TIMEOUT u32, NETMASK (see below)
//!                                          | IPVS_CMD_ATTR_DEST (nested)
//!                                          |   ADDR_FAMILY u16, ADDR 16 bytes, PORT be16,
//!                                          |   FWD_METHOD u32, WEIGHT u32, TUN_TYPE u8,
//!                                          |   TUN_PORT be16, TUN_FLAGS u16, U_THRESH u32,
//!                                          |   L_THRESH u32
//! ```
//!
//! What the kernel (`net/netfilter/ipvs/ip_vs_ctl.c`) does with it, and why the types look the
//! way they do:
//! - A service is identified by (family, protocol, address, port) or by (family, fwmark); the
//!   rest (scheduler, flags, persistence timeout and netmask, persistence engine) can be changed
//!   in place with `SET_SERVICE`. `NEW_SERVICE` and `SET_SERVICE` need all of scheduler, flags,
//!   timeout and netmask (else `EINVAL`); other commands only the identifying attributes.
//! - A destination is identified by (family, address, port) within its service; forwarding
//!   method, weight, thresholds and tunnel parameters can all be changed in place with
//!   `SET_DEST`. `NEW_DEST`/`SET_DEST` need forwarding, weight and both thresholds.
//! - Addresses travel as the 16-byte `union nf_inet_addr` (an IPv4 address in the first four
//!   bytes); the kernel copies at most 16 bytes and zero-fills, so 4-byte IPv4 addresses are
//!   accepted too. Ports (and the tunnel port) are big-endian; everything else is host order.
//! - The persistence netmask is a big-endian IPv4 mask for IPv4 services but a host-order
//!   prefix length (1..=128, checked even without persistence) for IPv6 services. It is kept
//!   here as a `u32` in host terms: `0xffff_ff00` for an IPv4 /24, `64` for an IPv6 /64.
//! - Dumps report flags with `mask = ~0` and the kernel-internal `IP_VS_SVC_F_HASHED` bit set;
//!   both are dropped on decode so a dumped config compares equal to the requested one.
//! - Dumps report the tunnel attributes for every destination; they only mean something with
//!   tunnel forwarding, which is why [`Forwarding::Tunnel`] carries them.
//! - Unknown attributes are skipped (newer kernels add them); unknown protocol, forwarding and
//!   tunnel values are kept as `Other` so foreign services still decode.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use netlink_packet_core::{
    DecodeError, Emitable, NLA_F_NESTED, NLA_HEADER_SIZE, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NlasIterator, ParseableParametrized,
};
use netlink_packet_generic::{GenlFamily, GenlHeader, GenlMessage};

/// The generic netlink family name the IPVS module registers.
pub const FAMILY_NAME: &str = "IPVS";
/// `IPVS_GENL_VERSION`.
pub const FAMILY_VERSION: u8 = 1;

const CMD_NEW_SERVICE: u8 = 1;
const CMD_SET_SERVICE: u8 = 2;
const CMD_DEL_SERVICE: u8 = 3;
const CMD_GET_SERVICE: u8 = 4;
const CMD_NEW_DEST: u8 = 5;
const CMD_SET_DEST: u8 = 6;
const CMD_DEL_DEST: u8 = 7;
const CMD_GET_DEST: u8 = 8;
const CMD_SET_INFO: u8 = 14;
const CMD_GET_INFO: u8 = 15;

const CMD_ATTR_SERVICE: u16 = 1;
const CMD_ATTR_DEST: u16 = 2;
const CMD_ATTR_TABLE: usize = 3;

const SVC_ATTR_AF: u16 = 1;
const SVC_ATTR_PROTOCOL: u16 = 2;
const SVC_ATTR_ADDR: u16 = 3;
const SVC_ATTR_PORT: u16 = 4;
const SVC_ATTR_FWMARK: u16 = 5;
const SVC_ATTR_SCHED_NAME: u16 = 6;
const SVC_ATTR_FLAGS: u16 = 7;
const SVC_ATTR_TIMEOUT: u16 = 8;
const SVC_ATTR_NETMASK: u16 = 9;
const SVC_ATTR_PE_NAME: u16 = 11;
const SVC_ATTR_TABLE: usize = 13;

const DEST_ATTR_ADDR: u16 = 1;
const DEST_ATTR_PORT: u16 = 2;
const DEST_ATTR_FWD_METHOD: u16 = 3;
const DEST_ATTR_WEIGHT: u16 = 4;
const DEST_ATTR_U_THRESH: u16 = 5;
const DEST_ATTR_L_THRESH: u16 = 6;
const DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const DEST_ATTR_INACT_CONNS: u16 = 8;
const DEST_ATTR_PERSIST_CONNS: u16 = 9;
const DEST_ATTR_ADDR_FAMILY: u16 = 11;
const DEST_ATTR_TUN_TYPE: u16 = 13;
const DEST_ATTR_TUN_PORT: u16 = 14;
const DEST_ATTR_TUN_FLAGS: u16 = 15;
const DEST_ATTR_TABLE: usize = 16;

const INFO_ATTR_VERSION: u16 = 1;
const INFO_ATTR_CONN_TAB_SIZE: u16 = 2;
const INFO_ATTR_TABLE: usize = 3;

const SVC_F_PERSISTENT: u32 = 0x0001;
const SVC_F_ONEPACKET: u32 = 0x0004;
const SVC_F_SCHED1: u32 = 0x0008;
const SVC_F_SCHED2: u32 = 0x0010;
const SVC_F_SCHED3: u32 = 0x0020;

const FWD_MASQ: u32 = 0;
const FWD_LOCAL: u32 = 1;
const FWD_TUNNEL: u32 = 2;
const FWD_DROUTE: u32 = 3;
const FWD_BYPASS: u32 = 4;

/// Longest scheduler or persistence-engine name the kernel takes (`IP_VS_SCHEDNAME_MAXLEN` - 1).
pub const MAX_NAME_LEN: usize = 15;

/// `IP_VS_TUNNEL_ENCAP_FLAG_CSUM`: GUE/GRE with checksums.
pub const TUNNEL_FLAG_CSUM: u16 = 1 << 0;
/// `IP_VS_TUNNEL_ENCAP_FLAG_REMCSUM`: GUE with remote checksum offload.
pub const TUNNEL_FLAG_REMCSUM: u16 = 1 << 1;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("malformed netlink message: {0}")]
    Netlink(#[source] DecodeError),
    #[error("malformed attribute in {context}: {source}")]
    Attribute {
        context: &'static str,
        #[source]
        source: DecodeError,
    },
    #[error("{context} lacks {attr}")]
    Missing {
        context: &'static str,
        attr: &'static str,
    },
    #[error("{attr} is {len} bytes long, expected {expected}")]
    Length {
        attr: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("{attr} is {len} bytes long, which is no {family} address")]
    AddressLength {
        attr: &'static str,
        len: usize,
        family: AddrFamily,
    },
    #[error("{attr} is not UTF-8")]
    String { attr: &'static str },
    #[error("{attr} holds unknown address family {value}")]
    Family { attr: &'static str, value: u16 },
    #[error("unknown IPVS command {0}")]
    Command(u8),
    #[error("message type {found} is not the IPVS family ({expected})")]
    MessageType { expected: u16, found: u16 },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl CodecError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Netlink(_) => "netlink",
            Self::Attribute { .. } => "attribute",
            Self::Missing { .. } => "missing_attribute",
            Self::Length { .. } | Self::AddressLength { .. } => "attribute_length",
            Self::String { .. } => "string",
            Self::Family { .. } => "address_family",
            Self::Command(_) => "command",
            Self::MessageType { .. } => "message_type",
            Self::Invalid { .. } => "invalid",
        }
    }

    fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AddrFamily {
    V4,
    V6,
}

impl AddrFamily {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    /// The netmask that makes persistence per client address (what ipvsadm sets by default).
    pub fn full_netmask(self) -> u32 {
        match self {
            Self::V4 => u32::MAX,
            Self::V6 => 128,
        }
    }

    fn to_af(self) -> u16 {
        match self {
            Self::V4 => libc::AF_INET as u16,
            Self::V6 => libc::AF_INET6 as u16,
        }
    }

    fn from_af(value: u16, attr: &'static str) -> Result<Self, CodecError> {
        match i32::from(value) {
            libc::AF_INET => Ok(Self::V4),
            libc::AF_INET6 => Ok(Self::V6),
            _ => Err(CodecError::Family { attr, value }),
        }
    }
}

impl fmt::Display for AddrFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    /// The kernel takes any IP protocol number; only ipvsadm limits it to the three above.
    Other(u16),
}

impl Protocol {
    pub fn number(self) -> u16 {
        match self {
            Self::Tcp => libc::IPPROTO_TCP as u16,
            Self::Udp => libc::IPPROTO_UDP as u16,
            Self::Sctp => libc::IPPROTO_SCTP as u16,
            Self::Other(n) => n,
        }
    }

    pub fn from_number(n: u16) -> Self {
        match i32::from(n) {
            libc::IPPROTO_TCP => Self::Tcp,
            libc::IPPROTO_UDP => Self::Udp,
            libc::IPPROTO_SCTP => Self::Sctp,
            _ => Self::Other(n),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Tcp => f.write_str("TCP"),
            Self::Udp => f.write_str("UDP"),
            Self::Sctp => f.write_str("SCTP"),
            Self::Other(n) => write!(f, "protocol {n}"),
        }
    }
}

/// What identifies a virtual service; none of it can change without delete + add.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Addr {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    /// Mark 0 is not a firewall-mark service to the kernel; [`Service::validate`] refuses it.
    Fwmark { family: AddrFamily, mark: u32 },
}

impl ServiceKey {
    pub fn family(&self) -> AddrFamily {
        match self {
            Self::Addr { addr, .. } => AddrFamily::of(addr),
            Self::Fwmark { family, .. } => *family,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Addr {
                protocol,
                addr: IpAddr::V6(addr),
                port,
            } => write!(f, "{protocol} [{addr}]:{port}"),
            Self::Addr {
                protocol,
                addr,
                port,
            } => write!(f, "{protocol} {addr}:{port}"),
            Self::Fwmark { family, mark } => write!(f, "fwmark {mark} ({family})"),
        }
    }
}

/// `IP_VS_SVC_F_*`; the scheduler flags mean what the scheduler makes of them (`sh`: flag 1 is
/// fallback, flag 2 hashes the port too; `mh` likewise).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceFlags {
    pub persistent: bool,
    pub one_packet: bool,
    pub sched_flag_1: bool,
    pub sched_flag_2: bool,
    pub sched_flag_3: bool,
}

impl ServiceFlags {
    pub fn bits(self) -> u32 {
        [
            (self.persistent, SVC_F_PERSISTENT),
            (self.one_packet, SVC_F_ONEPACKET),
            (self.sched_flag_1, SVC_F_SCHED1),
            (self.sched_flag_2, SVC_F_SCHED2),
            (self.sched_flag_3, SVC_F_SCHED3),
        ]
        .into_iter()
        .filter(|(set, _)| *set)
        .fold(0, |bits, (_, bit)| bits | bit)
    }

    /// Bits this type does not name (the kernel's `HASHED`, future ones) are dropped.
    pub fn from_bits(bits: u32) -> Self {
        Self {
            persistent: bits & SVC_F_PERSISTENT != 0,
            one_packet: bits & SVC_F_ONEPACKET != 0,
            sched_flag_1: bits & SVC_F_SCHED1 != 0,
            sched_flag_2: bits & SVC_F_SCHED2 != 0,
            sched_flag_3: bits & SVC_F_SCHED3 != 0,
        }
    }
}

/// What `SET_SERVICE` can change in place.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceConfig {
    /// `rr`, `wrr`, `lc`, `wlc`, `sh`, `mh`, …, or `none`; the kernel loads `ip_vs_<name>`.
    pub scheduler: String,
    pub flags: ServiceFlags,
    /// Persistence timeout in seconds (meaningful with `flags.persistent`).
    pub timeout: u32,
    /// IPv4: the mask as a host-order integer (`0xffff_ff00` for /24). IPv6: the prefix length.
    pub netmask: u32,
    /// Persistence engine (`sip` is the only one the kernel has).
    pub pe_name: Option<String>,
}

impl ServiceConfig {
    /// A service without persistence, with the netmask ipvsadm would give it.
    pub fn new(scheduler: impl Into<String>, family: AddrFamily) -> Self {
        Self {
            scheduler: scheduler.into(),
            flags: ServiceFlags::default(),
            timeout: 0,
            netmask: family.full_netmask(),
            pe_name: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Service {
    pub key: ServiceKey,
    pub config: ServiceConfig,
}

impl Service {
    /// Refuses what the kernel would refuse (or misread), naming the field.
    pub fn validate(&self) -> Result<(), CodecError> {
        if let ServiceKey::Fwmark { mark: 0, .. } = self.key {
            return Err(CodecError::invalid(
                "fwmark",
                "must not be 0 (the kernel reads mark 0 as no mark)",
            ));
        }
        validate_name("scheduler", &self.config.scheduler)?;
        if let Some(pe) = &self.config.pe_name {
            validate_name("pe_name", pe)?;
        }
        if self.key.family() == AddrFamily::V6 && !(1..=128).contains(&self.config.netmask) {
            return Err(CodecError::invalid(
                "netmask",
                format!("{} is no IPv6 prefix length (1..=128)", self.config.netmask),
            ));
        }
        Ok(())
    }
}

fn validate_name(field: &'static str, name: &str) -> Result<(), CodecError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN || name.contains('\0') {
        return Err(CodecError::invalid(
            field,
            format!("{name:?} must be 1 to {MAX_NAME_LEN} bytes without NUL"),
        ));
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TunnelType {
    #[default]
    Ipip,
    Gue,
    Gre,
    Other(u8),
}

impl TunnelType {
    fn number(self) -> u8 {
        match self {
            Self::Ipip => 0,
            Self::Gue => 1,
            Self::Gre => 2,
            Self::Other(n) => n,
        }
    }

    fn from_number(n: u8) -> Self {
        match n {
            0 => Self::Ipip,
            1 => Self::Gue,
            2 => Self::Gre,
            n => Self::Other(n),
        }
    }
}

/// Encapsulation of tunnel forwarding. The default (IPIP, no port, no flags) is what a tunnel
/// destination gets when nothing else is asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tunnel {
    pub kind: TunnelType,
    /// UDP destination port of GUE (required, non-zero, for GUE).
    pub port: u16,
    /// [`TUNNEL_FLAG_CSUM`], [`TUNNEL_FLAG_REMCSUM`].
    pub flags: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Forwarding {
    /// NAT (`-m`).
    Masquerade,
    Local,
    /// IP-in-IP or GUE/GRE (`-i`); the only method allowed across address families.
    Tunnel(Tunnel),
    /// Direct routing (`-g`, ipvsadm's default).
    DirectRoute,
    Bypass,
    /// A value the kernel stored that this codec does not know (the field is 3 bits wide).
    Other(u32),
}

impl Forwarding {
    fn number(self) -> u32 {
        match self {
            Self::Masquerade => FWD_MASQ,
            Self::Local => FWD_LOCAL,
            Self::Tunnel(_) => FWD_TUNNEL,
            Self::DirectRoute => FWD_DROUTE,
            Self::Bypass => FWD_BYPASS,
            Self::Other(n) => n,
        }
    }

    fn tunnel(self) -> Tunnel {
        match self {
            Self::Tunnel(tunnel) => tunnel,
            _ => Tunnel::default(),
        }
    }
}

impl fmt::Display for Forwarding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Masquerade => f.write_str("masquerade"),
            Self::Local => f.write_str("local"),
            Self::Tunnel(t) => match t.kind {
                TunnelType::Ipip => f.write_str("tunnel (ipip)"),
                TunnelType::Gue => write!(f, "tunnel (gue port {})", t.port),
                TunnelType::Gre => f.write_str("tunnel (gre)"),
                TunnelType::Other(n) => write!(f, "tunnel (type {n})"),
            },
            Self::DirectRoute => f.write_str("direct routing"),
            Self::Bypass => f.write_str("bypass"),
            Self::Other(n) => write!(f, "forwarding method {n}"),
        }
    }
}

/// What identifies a destination within its service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestKey {
    /// Its family may differ from the service's only with tunnel forwarding.
    pub addr: IpAddr,
    /// 0 on a fwmark service: the port the packet was sent to.
    pub port: u16,
}

impl fmt::Display for DestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V6(addr) => write!(f, "[{addr}]:{}", self.port),
            IpAddr::V4(addr) => write!(f, "{addr}:{}", self.port),
        }
    }
}

/// What `SET_DEST` can change in place (all of it, forwarding method included).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DestConfig {
    pub forwarding: Forwarding,
    /// 0 drains: no new connections, existing ones stay. At most `i32::MAX`.
    pub weight: u32,
    /// 0: no limit.
    pub upper_threshold: u32,
    /// Must not exceed `upper_threshold` (the kernel answers `ERANGE`, even when that is 0).
    pub lower_threshold: u32,
}

impl DestConfig {
    pub fn new(forwarding: Forwarding, weight: u32) -> Self {
        Self {
            forwarding,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Destination {
    pub key: DestKey,
    pub config: DestConfig,
}

impl Destination {
    /// Refuses what the kernel would refuse for a destination of `service`, naming the field.
    pub fn validate(&self, service: &ServiceKey) -> Result<(), CodecError> {
        let c = &self.config;
        if c.weight > i32::MAX as u32 {
            return Err(CodecError::invalid(
                "weight",
                format!("{} exceeds {}", c.weight, i32::MAX),
            ));
        }
        if c.lower_threshold > c.upper_threshold {
            return Err(CodecError::invalid(
                "lower_threshold",
                format!(
                    "{} exceeds the upper threshold {}",
                    c.lower_threshold, c.upper_threshold
                ),
            ));
        }
        match c.forwarding {
            Forwarding::Other(n) => {
                return Err(CodecError::invalid(
                    "forwarding",
                    format!("unknown method {n}"),
                ));
            }
            Forwarding::Tunnel(Tunnel {
                kind: TunnelType::Gue,
                port: 0,
                ..
            }) => return Err(CodecError::invalid("tunnel.port", "GUE needs a port")),
            Forwarding::Tunnel(_) => {}
            _ if AddrFamily::of(&self.key.addr) != service.family() => {
                return Err(CodecError::invalid(
                    "address",
                    format!(
                        "{} destination of an {} service needs tunnel forwarding",
                        AddrFamily::of(&self.key.addr),
                        service.family()
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

/// Connection counters a destination dump reports alongside the configuration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct DestCounters {
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persistent_conns: u32,
}

/// One entry of a destination dump.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DestEntry {
    pub destination: Destination,
    pub counters: DestCounters,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpvsInfo {
    /// `IP_VS_VERSION_CODE`, e.g. `0x010201`.
    pub version: u32,
    /// Buckets of the connection hash table.
    pub conn_tab_size: u32,
}

impl IpvsInfo {
    pub fn version_string(&self) -> String {
        let v = self.version;
        format!("{}.{}.{}", (v >> 16) & 0xff, (v >> 8) & 0xff, v & 0xff)
    }
}

/// One IPVS generic netlink message: the requests, and the forms replies take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IpvsMessage {
    /// A request, and each entry of a service dump.
    NewService(Service),
    SetService(Service),
    DelService(ServiceKey),
    /// One service (`GET_SERVICE` without `NLM_F_DUMP`; the reply is a `NewService`).
    GetService(ServiceKey),
    /// The service dump request (`GET_SERVICE` with `NLM_F_DUMP`, no attributes).
    GetServices,
    NewDest(ServiceKey, Destination),
    SetDest(ServiceKey, Destination),
    DelDest(ServiceKey, DestKey),
    /// The destination dump request; a missing service dumps nothing rather than failing.
    GetDests(ServiceKey),
    /// Each entry of a destination dump (`NEW_DEST` without a service).
    DestEntry(DestEntry),
    GetInfo,
    /// The reply to `GetInfo` (`SET_INFO`).
    Info(IpvsInfo),
}

impl IpvsMessage {
    fn cmd(&self) -> u8 {
        match self {
            Self::NewService(_) => CMD_NEW_SERVICE,
            Self::SetService(_) => CMD_SET_SERVICE,
            Self::DelService(_) => CMD_DEL_SERVICE,
            Self::GetService(_) | Self::GetServices => CMD_GET_SERVICE,
            Self::NewDest(..) | Self::DestEntry(_) => CMD_NEW_DEST,
            Self::SetDest(..) => CMD_SET_DEST,
            Self::DelDest(..) => CMD_DEL_DEST,
            Self::GetDests(_) => CMD_GET_DEST,
            Self::GetInfo => CMD_GET_INFO,
            Self::Info(_) => CMD_SET_INFO,
        }
    }

    /// Whether the kernel answers this request with a dump (`NLM_F_DUMP` needed).
    pub fn is_dump_request(&self) -> bool {
        matches!(self, Self::GetServices | Self::GetDests(_))
    }

    fn emit_attrs<S: Sink>(&self, s: &mut S) {
        match self {
            Self::NewService(svc) | Self::SetService(svc) => {
                put_service(s, &svc.key, Some(&svc.config))
            }
            Self::DelService(key) | Self::GetService(key) | Self::GetDests(key) => {
                put_service(s, key, None)
            }
            Self::GetServices | Self::GetInfo => {}
            Self::NewDest(key, dest) | Self::SetDest(key, dest) => {
                put_service(s, key, None);
                put_dest(s, &dest.key, Some(&dest.config), None);
            }
            Self::DelDest(key, dest) => {
                put_service(s, key, None);
                put_dest(s, dest, None, None);
            }
            Self::DestEntry(entry) => put_dest(
                s,
                &entry.destination.key,
                Some(&entry.destination.config),
                Some(&entry.counters),
            ),
            Self::Info(info) => {
                s.put(INFO_ATTR_VERSION, &info.version.to_ne_bytes());
                s.put(INFO_ATTR_CONN_TAB_SIZE, &info.conn_tab_size.to_ne_bytes());
            }
        }
    }

    /// Decodes the attributes following the generic netlink header.
    pub fn decode(header: &GenlHeader, attrs: &[u8]) -> Result<Self, CodecError> {
        if header.cmd == CMD_GET_INFO {
            return Ok(Self::GetInfo);
        }
        if header.cmd == CMD_SET_INFO {
            let t = table::<INFO_ATTR_TABLE>(attrs, "IPVS info")?;
            let version = need::<4>(&t, INFO_ATTR_VERSION, "IPVS_INFO_ATTR_VERSION", "IPVS info")?;
            let size = need::<4>(
                &t,
                INFO_ATTR_CONN_TAB_SIZE,
                "IPVS_INFO_ATTR_CONN_TAB_SIZE",
                "IPVS info",
            )?;
            return Ok(Self::Info(IpvsInfo {
                version: u32::from_ne_bytes(version),
                conn_tab_size: u32::from_ne_bytes(size),
            }));
        }
        let t = table::<CMD_ATTR_TABLE>(attrs, "IPVS message")?;
        let service = t[CMD_ATTR_SERVICE as usize]
            .map(|nested| table::<SVC_ATTR_TABLE>(nested, "IPVS_CMD_ATTR_SERVICE"))
            .transpose()?;
        let dest = t[CMD_ATTR_DEST as usize]
            .map(|nested| table::<DEST_ATTR_TABLE>(nested, "IPVS_CMD_ATTR_DEST"))
            .transpose()?;
        let need_service = || service.ok_or(missing("IPVS message", "IPVS_CMD_ATTR_SERVICE"));
        let need_dest = || dest.ok_or(missing("IPVS message", "IPVS_CMD_ATTR_DEST"));
        Ok(match header.cmd {
            CMD_NEW_SERVICE | CMD_SET_SERVICE => {
                let svc = need_service()?;
                let key = decode_service_key(&svc)?;
                let service = Service {
                    key,
                    config: decode_service_config(&svc, key.family())?,
                };
                if header.cmd == CMD_NEW_SERVICE {
                    Self::NewService(service)
                } else {
                    Self::SetService(service)
                }
            }
            CMD_DEL_SERVICE => Self::DelService(decode_service_key(&need_service()?)?),
            CMD_GET_SERVICE => match service {
                Some(svc) => Self::GetService(decode_service_key(&svc)?),
                None => Self::GetServices,
            },
            CMD_NEW_DEST if service.is_none() => {
                let d = need_dest()?;
                let key = decode_dest_key(&d, None)?;
                Self::DestEntry(DestEntry {
                    destination: Destination {
                        key,
                        config: decode_dest_config(&d)?,
                    },
                    counters: decode_dest_counters(&d)?,
                })
            }
            CMD_NEW_DEST | CMD_SET_DEST => {
                let service = decode_service_key(&need_service()?)?;
                let d = need_dest()?;
                let destination = Destination {
                    key: decode_dest_key(&d, Some(service.family()))?,
                    config: decode_dest_config(&d)?,
                };
                if header.cmd == CMD_NEW_DEST {
                    Self::NewDest(service, destination)
                } else {
                    Self::SetDest(service, destination)
                }
            }
            CMD_DEL_DEST => {
                let service = decode_service_key(&need_service()?)?;
                Self::DelDest(
                    service,
                    decode_dest_key(&need_dest()?, Some(service.family()))?,
                )
            }
            CMD_GET_DEST => Self::GetDests(decode_service_key(&need_service()?)?),
            cmd => return Err(CodecError::Command(cmd)),
        })
    }
}

impl GenlFamily for IpvsMessage {
    fn family_name() -> &'static str {
        FAMILY_NAME
    }

    fn command(&self) -> u8 {
        self.cmd()
    }

    fn version(&self) -> u8 {
        FAMILY_VERSION
    }
}

impl Emitable for IpvsMessage {
    fn buffer_len(&self) -> usize {
        let mut counter = Counter(0);
        self.emit_attrs(&mut counter);
        counter.0
    }

    fn emit(&self, buffer: &mut [u8]) {
        self.emit_attrs(&mut Writer {
            buf: buffer,
            pos: 0,
        });
    }
}

impl ParseableParametrized<[u8], GenlHeader> for IpvsMessage {
    fn parse_with_param(buf: &[u8], header: GenlHeader) -> Result<Self, DecodeError> {
        Self::decode(&header, buf).map_err(|e| DecodeError::from(e.to_string()))
    }
}

/// Appends one whole netlink message (header, generic header, attributes) to `out`.
pub fn encode_message(
    message: IpvsMessage,
    family_id: u16,
    flags: u16,
    seq: u32,
    out: &mut Vec<u8>,
) {
    let mut genl = GenlMessage::from_payload(message);
    genl.set_resolved_family_id(family_id);
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut nl = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(genl));
    nl.finalize();
    let start = out.len();
    out.resize(start + nl.buffer_len(), 0);
    nl.serialize(&mut out[start..]);
}

/// Decodes one whole netlink message of the IPVS family `family_id`.
pub fn decode_message(
    bytes: &[u8],
    family_id: u16,
) -> Result<(NetlinkHeader, IpvsMessage), CodecError> {
    let buffer = NetlinkBuffer::new_checked(bytes).map_err(CodecError::Netlink)?;
    let mut header = NetlinkHeader::default();
    header.length = buffer.length();
    header.message_type = buffer.message_type();
    header.flags = buffer.flags();
    header.sequence_number = buffer.sequence_number();
    header.port_number = buffer.port_number();
    if header.message_type != family_id {
        return Err(CodecError::MessageType {
            expected: family_id,
            found: header.message_type,
        });
    }
    let payload = buffer.payload();
    let genl = GenlHeader::parse(payload).map_err(CodecError::Netlink)?;
    let attrs = payload.get(GENL_HEADER_LEN..).unwrap_or_default();
    Ok((header, IpvsMessage::decode(&genl, attrs)?))
}

/// Length of `struct genlmsghdr`.
pub const GENL_HEADER_LEN: usize = 4;

// Encoding: one walk over the attributes, run once to size the buffer and once to fill it.

trait Sink {
    fn put(&mut self, kind: u16, value: &[u8]);
    fn open(&mut self, kind: u16) -> usize;
    fn close(&mut self, start: usize);
}

struct Counter(usize);

impl Sink for Counter {
    fn put(&mut self, _kind: u16, value: &[u8]) {
        self.0 += NLA_HEADER_SIZE + align4(value.len());
    }

    fn open(&mut self, _kind: u16) -> usize {
        self.0 += NLA_HEADER_SIZE;
        0
    }

    fn close(&mut self, _start: usize) {}
}

struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Writer<'_> {
    fn header(&mut self, len: usize, kind: u16) {
        // Attribute lengths are bounded by the 64 KiB netlink messages this module builds.
        let len = len as u16;
        self.buf[self.pos..self.pos + 2].copy_from_slice(&len.to_ne_bytes());
        self.buf[self.pos + 2..self.pos + 4].copy_from_slice(&kind.to_ne_bytes());
    }
}

impl Sink for Writer<'_> {
    fn put(&mut self, kind: u16, value: &[u8]) {
        self.header(NLA_HEADER_SIZE + value.len(), kind);
        let start = self.pos + NLA_HEADER_SIZE;
        self.buf[start..start + value.len()].copy_from_slice(value);
        let end = self.pos + NLA_HEADER_SIZE + align4(value.len());
        self.buf[start + value.len()..end].fill(0);
        self.pos = end;
    }

    fn open(&mut self, kind: u16) -> usize {
        let start = self.pos;
        self.header(NLA_HEADER_SIZE, kind | NLA_F_NESTED);
        self.pos += NLA_HEADER_SIZE;
        start
    }

    fn close(&mut self, start: usize) {
        let len = (self.pos - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

fn align4(len: usize) -> usize {
    (len + 3) & !3
}

fn addr_bytes(addr: &IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => {
            let mut bytes = [0; 16];
            bytes[..4].copy_from_slice(&v4.octets());
            bytes
        }
        IpAddr::V6(v6) => v6.octets(),
    }
}

fn put_service<S: Sink>(s: &mut S, key: &ServiceKey, config: Option<&ServiceConfig>) {
    let nest = s.open(CMD_ATTR_SERVICE);
    s.put(SVC_ATTR_AF, &key.family().to_af().to_ne_bytes());
    match key {
        ServiceKey::Fwmark { mark, .. } => s.put(SVC_ATTR_FWMARK, &mark.to_ne_bytes()),
        ServiceKey::Addr {
            protocol,
            addr,
            port,
        } => {
            s.put(SVC_ATTR_PROTOCOL, &protocol.number().to_ne_bytes());
            s.put(SVC_ATTR_ADDR, &addr_bytes(addr));
            s.put(SVC_ATTR_PORT, &port.to_be_bytes());
        }
    }
    if let Some(config) = config {
        put_string(s, SVC_ATTR_SCHED_NAME, &config.scheduler);
        if let Some(pe) = &config.pe_name {
            put_string(s, SVC_ATTR_PE_NAME, pe);
        }
        let mut flags = [0; 8];
        flags[..4].copy_from_slice(&config.flags.bits().to_ne_bytes());
        flags[4..].copy_from_slice(&u32::MAX.to_ne_bytes());
        s.put(SVC_ATTR_FLAGS, &flags);
        s.put(SVC_ATTR_TIMEOUT, &config.timeout.to_ne_bytes());
        let netmask = match key.family() {
            AddrFamily::V4 => config.netmask.to_be_bytes(),
            AddrFamily::V6 => config.netmask.to_ne_bytes(),
        };
        s.put(SVC_ATTR_NETMASK, &netmask);
    }
    s.close(nest);
}

fn put_string<S: Sink>(s: &mut S, kind: u16, value: &str) {
    // Built on the stack: names are at most a few bytes, and encoding sits on the hot path.
    let mut bytes = [0u8; 64];
    let len = value.len().min(bytes.len() - 1);
    bytes[..len].copy_from_slice(&value.as_bytes()[..len]);
    s.put(kind, &bytes[..=len]);
}

fn put_dest<S: Sink>(
    s: &mut S,
    key: &DestKey,
    config: Option<&DestConfig>,
    counters: Option<&DestCounters>,
) {
    let nest = s.open(CMD_ATTR_DEST);
    s.put(
        DEST_ATTR_ADDR_FAMILY,
        &AddrFamily::of(&key.addr).to_af().to_ne_bytes(),
    );
    s.put(DEST_ATTR_ADDR, &addr_bytes(&key.addr));
    s.put(DEST_ATTR_PORT, &key.port.to_be_bytes());
    if let Some(config) = config {
        // Same order as ipvsadm, tunnel attributes included for every method: the kernel
        // stores them as sent and dumps them back, so sending zeros keeps edits exact.
        let tunnel = config.forwarding.tunnel();
        s.put(
            DEST_ATTR_FWD_METHOD,
            &config.forwarding.number().to_ne_bytes(),
        );
        s.put(DEST_ATTR_WEIGHT, &config.weight.to_ne_bytes());
        s.put(DEST_ATTR_TUN_TYPE, &[tunnel.kind.number()]);
        s.put(DEST_ATTR_TUN_PORT, &tunnel.port.to_be_bytes());
        s.put(DEST_ATTR_TUN_FLAGS, &tunnel.flags.to_ne_bytes());
        s.put(DEST_ATTR_U_THRESH, &config.upper_threshold.to_ne_bytes());
        s.put(DEST_ATTR_L_THRESH, &config.lower_threshold.to_ne_bytes());
    }
    if let Some(counters) = counters {
        s.put(DEST_ATTR_ACTIVE_CONNS, &counters.active_conns.to_ne_bytes());
        s.put(
            DEST_ATTR_INACT_CONNS,
            &counters.inactive_conns.to_ne_bytes(),
        );
        s.put(
            DEST_ATTR_PERSIST_CONNS,
            &counters.persistent_conns.to_ne_bytes(),
        );
    }
    s.close(nest);
}

// Decoding: attributes land in a table indexed by type, the last occurrence winning as in the
// kernel's nla_parse; types beyond the table are newer than this codec and skipped.

type Table<'a, const N: usize> = [Option<&'a [u8]>; N];

fn table<'a, const N: usize>(
    buf: &'a [u8],
    context: &'static str,
) -> Result<Table<'a, N>, CodecError> {
    let mut table = [None; N];
    for nla in NlasIterator::new(buf) {
        let nla = nla.map_err(|source| CodecError::Attribute { context, source })?;
        let kind = usize::from(nla.kind());
        let len = usize::from(nla.length());
        let inner: &[u8] = nla.into_inner();
        // new_checked (inside the iterator) guarantees NLA_HEADER_SIZE <= len <= inner.len().
        let value = inner.get(NLA_HEADER_SIZE..len).unwrap_or_default();
        if let Some(slot) = table.get_mut(kind) {
            *slot = Some(value);
        }
    }
    Ok(table)
}

fn missing(context: &'static str, attr: &'static str) -> CodecError {
    CodecError::Missing { context, attr }
}

fn fixed<const L: usize>(
    t: &[Option<&[u8]>],
    kind: u16,
    attr: &'static str,
) -> Result<Option<[u8; L]>, CodecError> {
    let Some(value) = t.get(usize::from(kind)).copied().flatten() else {
        return Ok(None);
    };
    value.try_into().map(Some).map_err(|_| CodecError::Length {
        attr,
        len: value.len(),
        expected: L,
    })
}

fn need<const L: usize>(
    t: &[Option<&[u8]>],
    kind: u16,
    attr: &'static str,
    context: &'static str,
) -> Result<[u8; L], CodecError> {
    fixed::<L>(t, kind, attr)?.ok_or(missing(context, attr))
}

fn decode_addr(value: &[u8], family: AddrFamily, attr: &'static str) -> Result<IpAddr, CodecError> {
    let bad = || CodecError::AddressLength {
        attr,
        len: value.len(),
        family,
    };
    match family {
        AddrFamily::V4 if (4..=16).contains(&value.len()) => {
            let octets: [u8; 4] = value[..4].try_into().map_err(|_| bad())?;
            Ok(IpAddr::V4(Ipv4Addr::from(octets)))
        }
        AddrFamily::V6 => {
            let octets: [u8; 16] = value.try_into().map_err(|_| bad())?;
            Ok(IpAddr::V6(Ipv6Addr::from(octets)))
        }
        AddrFamily::V4 => Err(bad()),
    }
}

fn decode_string(value: &[u8], attr: &'static str) -> Result<String, CodecError> {
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    String::from_utf8(value[..end].to_vec()).map_err(|_| CodecError::String { attr })
}

const SVC: &str = "IPVS_CMD_ATTR_SERVICE";
const DEST: &str = "IPVS_CMD_ATTR_DEST";

fn decode_service_key(t: &Table<'_, SVC_ATTR_TABLE>) -> Result<ServiceKey, CodecError> {
    let af = u16::from_ne_bytes(need::<2>(t, SVC_ATTR_AF, "IPVS_SVC_ATTR_AF", SVC)?);
    let family = AddrFamily::from_af(af, "IPVS_SVC_ATTR_AF")?;
    if let Some(mark) = fixed::<4>(t, SVC_ATTR_FWMARK, "IPVS_SVC_ATTR_FWMARK")? {
        return Ok(ServiceKey::Fwmark {
            family,
            mark: u32::from_ne_bytes(mark),
        });
    }
    let protocol = u16::from_ne_bytes(need::<2>(
        t,
        SVC_ATTR_PROTOCOL,
        "IPVS_SVC_ATTR_PROTOCOL",
        SVC,
    )?);
    let addr = t[SVC_ATTR_ADDR as usize].ok_or(missing(SVC, "IPVS_SVC_ATTR_ADDR"))?;
    let port = u16::from_be_bytes(need::<2>(t, SVC_ATTR_PORT, "IPVS_SVC_ATTR_PORT", SVC)?);
    Ok(ServiceKey::Addr {
        protocol: Protocol::from_number(protocol),
        addr: decode_addr(addr, family, "IPVS_SVC_ATTR_ADDR")?,
        port,
    })
}

fn decode_service_config(
    t: &Table<'_, SVC_ATTR_TABLE>,
    family: AddrFamily,
) -> Result<ServiceConfig, CodecError> {
    let sched = t[SVC_ATTR_SCHED_NAME as usize].ok_or(missing(SVC, "IPVS_SVC_ATTR_SCHED_NAME"))?;
    let [b0, b1, b2, b3, m0, m1, m2, m3] =
        need::<8>(t, SVC_ATTR_FLAGS, "IPVS_SVC_ATTR_FLAGS", SVC)?;
    let bits = u32::from_ne_bytes([b0, b1, b2, b3]);
    let mask = u32::from_ne_bytes([m0, m1, m2, m3]);
    let timeout = need::<4>(t, SVC_ATTR_TIMEOUT, "IPVS_SVC_ATTR_TIMEOUT", SVC)?;
    let netmask = need::<4>(t, SVC_ATTR_NETMASK, "IPVS_SVC_ATTR_NETMASK", SVC)?;
    Ok(ServiceConfig {
        scheduler: decode_string(sched, "IPVS_SVC_ATTR_SCHED_NAME")?,
        flags: ServiceFlags::from_bits(bits & mask),
        timeout: u32::from_ne_bytes(timeout),
        netmask: match family {
            AddrFamily::V4 => u32::from_be_bytes(netmask),
            AddrFamily::V6 => u32::from_ne_bytes(netmask),
        },
        pe_name: t[SVC_ATTR_PE_NAME as usize]
            .map(|pe| decode_string(pe, "IPVS_SVC_ATTR_PE_NAME"))
            .transpose()?,
    })
}

/// `service_family` stands in for a missing `ADDR_FAMILY`, as the kernel does for requests;
/// dump entries carry no service, and every kernel since 3.18 sends the attribute.
fn decode_dest_key(
    t: &Table<'_, DEST_ATTR_TABLE>,
    service_family: Option<AddrFamily>,
) -> Result<DestKey, CodecError> {
    let family = match fixed::<2>(t, DEST_ATTR_ADDR_FAMILY, "IPVS_DEST_ATTR_ADDR_FAMILY")? {
        Some(af) => AddrFamily::from_af(u16::from_ne_bytes(af), "IPVS_DEST_ATTR_ADDR_FAMILY")?,
        None => service_family.ok_or(missing(DEST, "IPVS_DEST_ATTR_ADDR_FAMILY"))?,
    };
    let addr = t[DEST_ATTR_ADDR as usize].ok_or(missing(DEST, "IPVS_DEST_ATTR_ADDR"))?;
    let port = need::<2>(t, DEST_ATTR_PORT, "IPVS_DEST_ATTR_PORT", DEST)?;
    Ok(DestKey {
        addr: decode_addr(addr, family, "IPVS_DEST_ATTR_ADDR")?,
        port: u16::from_be_bytes(port),
    })
}

fn decode_dest_config(t: &Table<'_, DEST_ATTR_TABLE>) -> Result<DestConfig, CodecError> {
    let u32_attr = |kind, attr| need::<4>(t, kind, attr, DEST).map(u32::from_ne_bytes);
    let method = u32_attr(DEST_ATTR_FWD_METHOD, "IPVS_DEST_ATTR_FWD_METHOD")?;
    let forwarding = match method {
        FWD_MASQ => Forwarding::Masquerade,
        FWD_LOCAL => Forwarding::Local,
        FWD_DROUTE => Forwarding::DirectRoute,
        FWD_BYPASS => Forwarding::Bypass,
        FWD_TUNNEL => {
            let kind = fixed::<1>(t, DEST_ATTR_TUN_TYPE, "IPVS_DEST_ATTR_TUN_TYPE")?;
            let port = fixed::<2>(t, DEST_ATTR_TUN_PORT, "IPVS_DEST_ATTR_TUN_PORT")?;
            let flags = fixed::<2>(t, DEST_ATTR_TUN_FLAGS, "IPVS_DEST_ATTR_TUN_FLAGS")?;
            Forwarding::Tunnel(Tunnel {
                kind: TunnelType::from_number(kind.map_or(0, |[k]| k)),
                port: port.map_or(0, u16::from_be_bytes),
                flags: flags.map_or(0, u16::from_ne_bytes),
            })
        }
        other => Forwarding::Other(other),
    };
    Ok(DestConfig {
        forwarding,
        weight: u32_attr(DEST_ATTR_WEIGHT, "IPVS_DEST_ATTR_WEIGHT")?,
        upper_threshold: u32_attr(DEST_ATTR_U_THRESH, "IPVS_DEST_ATTR_U_THRESH")?,
        lower_threshold: u32_attr(DEST_ATTR_L_THRESH, "IPVS_DEST_ATTR_L_THRESH")?,
    })
}

fn decode_dest_counters(t: &Table<'_, DEST_ATTR_TABLE>) -> Result<DestCounters, CodecError> {
    let counter = |kind, attr| fixed::<4>(t, kind, attr).map(|v| v.map_or(0, u32::from_ne_bytes));
    Ok(DestCounters {
        active_conns: counter(DEST_ATTR_ACTIVE_CONNS, "IPVS_DEST_ATTR_ACTIVE_CONNS")?,
        inactive_conns: counter(DEST_ATTR_INACT_CONNS, "IPVS_DEST_ATTR_INACT_CONNS")?,
        persistent_conns: counter(DEST_ATTR_PERSIST_CONNS, "IPVS_DEST_ATTR_PERSIST_CONNS")?,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use netlink_packet_core::{NLM_F_ACK, NLM_F_DUMP, NLM_F_REQUEST, NlaBuffer};

    use super::*;

    const FAMILY: u16 = 0x24;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn tcp(addr: &str, port: u16) -> ServiceKey {
        ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: v4(addr),
            port,
        }
    }

    fn dest(addr: &str, port: u16, forwarding: Forwarding, weight: u32) -> Destination {
        Destination {
            key: DestKey {
                addr: v4(addr),
                port,
            },
            config: DestConfig::new(forwarding, weight),
        }
    }

    fn samples() -> Vec<IpvsMessage> {
        let v6_key = ServiceKey::Addr {
            protocol: Protocol::Udp,
            addr: v4("2001:db8::1"),
            port: 53,
        };
        let fwmark = ServiceKey::Fwmark {
            family: AddrFamily::V6,
            mark: 0x1234_5678,
        };
        let mut persistent = ServiceConfig::new("sh", AddrFamily::V4);
        persistent.flags = ServiceFlags {
            persistent: true,
            one_packet: true,
            sched_flag_1: true,
            sched_flag_2: false,
            sched_flag_3: true,
        };
        persistent.timeout = 300;
        persistent.netmask = 0xffff_ff00;
        persistent.pe_name = Some("sip".into());
        let mut v6_config = ServiceConfig::new("mh", AddrFamily::V6);
        v6_config.netmask = 64;
        let gue = Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            flags: TUNNEL_FLAG_CSUM | TUNNEL_FLAG_REMCSUM,
        });
        let mut thresholds = dest("10.1.0.9", 0, Forwarding::Local, i32::MAX as u32);
        thresholds.config.upper_threshold = 1000;
        thresholds.config.lower_threshold = 10;
        let mixed = Destination {
            key: DestKey {
                addr: v4("2001:db8::42"),
                port: 8080,
            },
            config: DestConfig::new(Forwarding::Tunnel(Tunnel::default()), 2),
        };
        vec![
            IpvsMessage::NewService(Service {
                key: tcp("10.0.0.1", 80),
                config: ServiceConfig::new("rr", AddrFamily::V4),
            }),
            IpvsMessage::SetService(Service {
                key: tcp("10.0.0.1", 443),
                config: persistent,
            }),
            IpvsMessage::NewService(Service {
                key: v6_key,
                config: v6_config.clone(),
            }),
            IpvsMessage::NewService(Service {
                key: fwmark,
                config: v6_config,
            }),
            IpvsMessage::NewService(Service {
                key: ServiceKey::Addr {
                    protocol: Protocol::Other(47),
                    addr: v4("10.0.0.2"),
                    port: 0,
                },
                config: ServiceConfig::new("none", AddrFamily::V4),
            }),
            IpvsMessage::DelService(ServiceKey::Addr {
                protocol: Protocol::Sctp,
                addr: v4("10.0.0.3"),
                port: 9,
            }),
            IpvsMessage::GetService(fwmark),
            IpvsMessage::GetServices,
            IpvsMessage::NewDest(
                tcp("10.0.0.1", 80),
                dest("10.1.0.1", 8080, Forwarding::Masquerade, 1),
            ),
            IpvsMessage::SetDest(tcp("10.0.0.1", 80), dest("10.1.0.2", 80, gue, 0)),
            IpvsMessage::NewDest(tcp("10.0.0.1", 80), mixed),
            IpvsMessage::NewDest(fwmark, thresholds),
            IpvsMessage::SetDest(
                tcp("10.0.0.1", 80),
                dest("10.1.0.3", 80, Forwarding::DirectRoute, 7),
            ),
            IpvsMessage::NewDest(
                tcp("10.0.0.1", 80),
                dest("10.1.0.4", 80, Forwarding::Bypass, 1),
            ),
            IpvsMessage::DelDest(
                v6_key,
                DestKey {
                    addr: v4("2001:db8::2"),
                    port: 53,
                },
            ),
            IpvsMessage::GetDests(v6_key),
            IpvsMessage::DestEntry(DestEntry {
                destination: dest("10.1.0.5", 8443, Forwarding::Masquerade, 5),
                counters: DestCounters {
                    active_conns: 3,
                    inactive_conns: 4,
                    persistent_conns: 5,
                },
            }),
            IpvsMessage::GetInfo,
            IpvsMessage::Info(IpvsInfo {
                version: 0x010201,
                conn_tab_size: 4096,
            }),
        ]
    }

    fn encode(message: IpvsMessage) -> Vec<u8> {
        let mut out = Vec::new();
        encode_message(message, FAMILY, NLM_F_REQUEST | NLM_F_ACK, 7, &mut out);
        out
    }

    #[test]
    fn every_message_round_trips() {
        for message in samples() {
            let bytes = encode(message.clone());
            let (header, decoded) = decode_message(&bytes, FAMILY).unwrap();
            assert_eq!(decoded, message);
            assert_eq!(header.length as usize, bytes.len());
            assert_eq!(header.message_type, FAMILY);
            assert_eq!(header.sequence_number, 7);
            assert_eq!(bytes[16], message.cmd());
            assert_eq!(bytes[17], FAMILY_VERSION);
            assert_eq!(
                message.buffer_len() + 20,
                bytes.len(),
                "{message:?}: buffer_len must match what emit writes"
            );
            // The same bytes through the library's own message types.
            let via_library =
                NetlinkMessage::<GenlMessage<IpvsMessage>>::deserialize(&bytes).unwrap();
            match via_library.payload {
                NetlinkPayload::InnerMessage(genl) => assert_eq!(genl.payload, message),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn byte_order_follows_the_kernel() {
        let mut config = ServiceConfig::new("wrr", AddrFamily::V4);
        config.netmask = 0xffff_ff00;
        config.timeout = 0x0102_0304;
        let bytes = encode(IpvsMessage::NewService(Service {
            key: tcp("192.0.2.1", 0x1f90),
            config,
        }));
        let svc = nested(&bytes[20..], CMD_ATTR_SERVICE);
        assert_eq!(
            attr(svc, SVC_ATTR_PORT),
            [0x1f, 0x90],
            "ports are big-endian"
        );
        assert_eq!(
            attr(svc, SVC_ATTR_ADDR),
            [192, 0, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            "an IPv4 address fills the first 4 bytes of nf_inet_addr"
        );
        assert_eq!(attr(svc, SVC_ATTR_NETMASK), [255, 255, 255, 0]);
        assert_eq!(attr(svc, SVC_ATTR_TIMEOUT), 0x0102_0304u32.to_ne_bytes());
        assert_eq!(attr(svc, SVC_ATTR_SCHED_NAME), b"wrr\0");
        assert_eq!(attr(svc, SVC_ATTR_AF), (libc::AF_INET as u16).to_ne_bytes());

        let mut config = ServiceConfig::new("rr", AddrFamily::V6);
        config.netmask = 64;
        let bytes = encode(IpvsMessage::NewService(Service {
            key: ServiceKey::Addr {
                protocol: Protocol::Tcp,
                addr: v4("2001:db8::1"),
                port: 443,
            },
            config,
        }));
        let svc = nested(&bytes[20..], CMD_ATTR_SERVICE);
        assert_eq!(
            attr(svc, SVC_ATTR_NETMASK),
            64u32.to_ne_bytes(),
            "an IPv6 netmask is a host-order prefix length"
        );

        let gue = Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 6080,
            flags: TUNNEL_FLAG_CSUM,
        });
        let bytes = encode(IpvsMessage::NewDest(
            tcp("192.0.2.1", 80),
            dest("10.1.0.1", 8080, gue, 3),
        ));
        let d = nested(&bytes[20..], CMD_ATTR_DEST);
        assert_eq!(attr(d, DEST_ATTR_PORT), 8080u16.to_be_bytes());
        assert_eq!(attr(d, DEST_ATTR_TUN_PORT), 6080u16.to_be_bytes());
        assert_eq!(attr(d, DEST_ATTR_TUN_TYPE), [1]);
        assert_eq!(attr(d, DEST_ATTR_TUN_FLAGS), 1u16.to_ne_bytes());
        assert_eq!(attr(d, DEST_ATTR_FWD_METHOD), 2u32.to_ne_bytes());
        assert_eq!(attr(d, DEST_ATTR_WEIGHT), 3u32.to_ne_bytes());
    }

    /// Attributes of a buffer in order, type flags masked off.
    fn attrs(buf: &[u8]) -> Vec<(u16, &[u8])> {
        NlasIterator::new(buf)
            .map(|nla| {
                let nla = nla.unwrap();
                let (kind, len) = (nla.kind(), usize::from(nla.length()));
                (kind, &nla.into_inner()[NLA_HEADER_SIZE..len])
            })
            .collect()
    }

    fn nested(buf: &[u8], kind: u16) -> &[u8] {
        attrs(buf).into_iter().find(|(k, _)| *k == kind).unwrap().1
    }

    fn attr(buf: &[u8], kind: u16) -> &[u8] {
        nested(buf, kind)
    }

    // Raw attribute builders for replies shaped the way the kernel writes them.
    fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = ((value.len() + 4) as u16).to_ne_bytes().to_vec();
        out.extend_from_slice(&kind.to_ne_bytes());
        out.extend_from_slice(value);
        out.resize(align4(out.len()), 0);
        out
    }

    fn nest(kind: u16, parts: &[Vec<u8>]) -> Vec<u8> {
        nla(kind, &parts.concat())
    }

    fn genl(cmd: u8, attrs: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&((20 + attrs.len()) as u32).to_ne_bytes());
        out.extend_from_slice(&FAMILY.to_ne_bytes());
        out.extend_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
        out.extend_from_slice(&9u32.to_ne_bytes());
        out.extend_from_slice(&4242u32.to_ne_bytes());
        out.extend_from_slice(&[cmd, 1, 0, 0]);
        out.extend_from_slice(attrs);
        out
    }

    fn stats(kind: u16, wide: bool) -> Vec<u8> {
        let parts: Vec<Vec<u8>> = (1..=10)
            .map(|k| {
                if wide || k == 4 || k == 5 {
                    nla(k, &[0, 0, 0, 0, 7, 0, 0, 0])
                } else {
                    nla(k, &7u32.to_ne_bytes())
                }
            })
            .collect();
        nest(kind, &parts)
    }

    #[test]
    fn decodes_kernel_style_dump_replies() {
        // As ip_vs_genl_fill_service writes it: no NLA_F_NESTED, 16-byte address, HASHED set
        // with mask ~0, both stats nests; plus attributes from some future kernel.
        let service = nest(
            CMD_ATTR_SERVICE,
            &[
                nla(SVC_ATTR_AF, &(libc::AF_INET as u16).to_ne_bytes()),
                nla(SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes()),
                nla(
                    SVC_ATTR_ADDR,
                    &[10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ),
                nla(SVC_ATTR_PORT, &80u16.to_be_bytes()),
                nla(SVC_ATTR_SCHED_NAME, b"wlc\0"),
                nla(SVC_ATTR_PE_NAME, b"sip\0"),
                nla(SVC_ATTR_FLAGS, &[3, 0, 0, 0, 255, 255, 255, 255]),
                nla(SVC_ATTR_TIMEOUT, &360u32.to_ne_bytes()),
                nla(SVC_ATTR_NETMASK, &[255, 255, 0, 0]),
                stats(10, false),
                stats(12, true),
                nla(40, b"from the future"),
            ],
        );
        let bytes = genl(CMD_NEW_SERVICE, &[service, nla(9, &[1, 2, 3, 4])].concat());
        let (_, decoded) = decode_message(&bytes, FAMILY).unwrap();
        let mut config = ServiceConfig::new("wlc", AddrFamily::V4);
        config.flags.persistent = true;
        config.timeout = 360;
        config.netmask = 0xffff_0000;
        config.pe_name = Some("sip".into());
        assert_eq!(
            decoded,
            IpvsMessage::NewService(Service {
                key: tcp("10.0.0.1", 80),
                config,
            })
        );

        // As ip_vs_genl_fill_dest writes it: tunnel attributes for every method.
        let entry = |fwd: u32, tun_type: u8| {
            nest(
                CMD_ATTR_DEST,
                &[
                    nla(DEST_ATTR_ADDR, &addr_bytes(&v4("2001:db8::7"))),
                    nla(DEST_ATTR_PORT, &443u16.to_be_bytes()),
                    nla(DEST_ATTR_FWD_METHOD, &fwd.to_ne_bytes()),
                    nla(DEST_ATTR_WEIGHT, &5u32.to_ne_bytes()),
                    nla(DEST_ATTR_TUN_TYPE, &[tun_type]),
                    nla(DEST_ATTR_TUN_PORT, &5555u16.to_be_bytes()),
                    nla(DEST_ATTR_TUN_FLAGS, &2u16.to_ne_bytes()),
                    nla(DEST_ATTR_U_THRESH, &0u32.to_ne_bytes()),
                    nla(DEST_ATTR_L_THRESH, &0u32.to_ne_bytes()),
                    nla(DEST_ATTR_ACTIVE_CONNS, &11u32.to_ne_bytes()),
                    nla(DEST_ATTR_INACT_CONNS, &12u32.to_ne_bytes()),
                    nla(DEST_ATTR_PERSIST_CONNS, &13u32.to_ne_bytes()),
                    nla(
                        DEST_ATTR_ADDR_FAMILY,
                        &(libc::AF_INET6 as u16).to_ne_bytes(),
                    ),
                    stats(10, false),
                    stats(12, true),
                    nla(33, &[0; 12]),
                ],
            )
        };
        let (_, masq) = decode_message(&genl(CMD_NEW_DEST, &entry(0, 0)), FAMILY).unwrap();
        let counters = DestCounters {
            active_conns: 11,
            inactive_conns: 12,
            persistent_conns: 13,
        };
        let mut expected = Destination {
            key: DestKey {
                addr: v4("2001:db8::7"),
                port: 443,
            },
            config: DestConfig::new(Forwarding::Masquerade, 5),
        };
        assert_eq!(
            masq,
            IpvsMessage::DestEntry(DestEntry {
                destination: expected,
                counters,
            }),
            "tunnel attributes mean nothing without tunnel forwarding"
        );
        let (_, gue) = decode_message(&genl(CMD_NEW_DEST, &entry(2, 1)), FAMILY).unwrap();
        expected.config.forwarding = Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 5555,
            flags: TUNNEL_FLAG_REMCSUM,
        });
        assert_eq!(
            gue,
            IpvsMessage::DestEntry(DestEntry {
                destination: expected,
                counters,
            })
        );

        let info = genl(
            CMD_SET_INFO,
            &[
                nla(INFO_ATTR_VERSION, &0x010201u32.to_ne_bytes()),
                nla(INFO_ATTR_CONN_TAB_SIZE, &4096u32.to_ne_bytes()),
            ]
            .concat(),
        );
        match decode_message(&info, FAMILY).unwrap().1 {
            IpvsMessage::Info(info) => {
                assert_eq!(info.version_string(), "1.2.1");
                assert_eq!(info.conn_tab_size, 4096);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn destination_family_falls_back_to_the_service_only_in_requests() {
        let dest_attrs = |family: Option<u16>| {
            let mut parts = vec![
                nla(DEST_ATTR_ADDR, &[10, 1, 0, 1]),
                nla(DEST_ATTR_PORT, &80u16.to_be_bytes()),
            ];
            parts.extend(family.map(|af| nla(DEST_ATTR_ADDR_FAMILY, &af.to_ne_bytes())));
            nest(CMD_ATTR_DEST, &parts)
        };
        let service = nest(
            CMD_ATTR_SERVICE,
            &[
                nla(SVC_ATTR_AF, &(libc::AF_INET as u16).to_ne_bytes()),
                nla(SVC_ATTR_FWMARK, &5u32.to_ne_bytes()),
            ],
        );
        // What ipvsadm before 1.28 sent: a 4-byte address, no family.
        let bytes = genl(CMD_DEL_DEST, &[service, dest_attrs(None)].concat());
        assert_eq!(
            decode_message(&bytes, FAMILY).unwrap().1,
            IpvsMessage::DelDest(
                ServiceKey::Fwmark {
                    family: AddrFamily::V4,
                    mark: 5
                },
                DestKey {
                    addr: v4("10.1.0.1"),
                    port: 80
                }
            )
        );
        let err = decode_message(&genl(CMD_NEW_DEST, &dest_attrs(None)), FAMILY).unwrap_err();
        assert!(
            matches!(
                err,
                CodecError::Missing {
                    attr: "IPVS_DEST_ATTR_ADDR_FAMILY",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn malformed_messages_are_typed_errors() {
        let af = nla(SVC_ATTR_AF, &(libc::AF_INET as u16).to_ne_bytes());
        let svc = |parts: &[Vec<u8>]| genl(CMD_DEL_SERVICE, &nest(CMD_ATTR_SERVICE, parts));
        let decode = |bytes: &[u8]| decode_message(bytes, FAMILY).unwrap_err();

        let err = decode(&svc(&[nla(SVC_ATTR_FWMARK, &1u32.to_ne_bytes())]));
        assert_eq!(
            err.to_string(),
            "IPVS_CMD_ATTR_SERVICE lacks IPVS_SVC_ATTR_AF"
        );
        assert_eq!(err.metric_label(), "missing_attribute");

        let err = decode(&svc(&[nla(SVC_ATTR_AF, &[2])]));
        assert!(
            matches!(
                err,
                CodecError::Length {
                    attr: "IPVS_SVC_ATTR_AF",
                    len: 1,
                    expected: 2
                }
            ),
            "{err}"
        );

        let err = decode(&svc(&[nla(SVC_ATTR_AF, &7u16.to_ne_bytes())]));
        assert!(matches!(err, CodecError::Family { value: 7, .. }), "{err}");

        let err = decode(&svc(&[
            af.clone(),
            nla(SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes()),
            nla(SVC_ATTR_ADDR, &[10, 0, 0]),
            nla(SVC_ATTR_PORT, &80u16.to_be_bytes()),
        ]));
        assert!(
            matches!(err, CodecError::AddressLength { len: 3, .. }),
            "{err}"
        );

        let err = decode(&svc(&[
            af.clone(),
            nla(SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes()),
            nla(SVC_ATTR_ADDR, &[0; 17]),
            nla(SVC_ATTR_PORT, &80u16.to_be_bytes()),
        ]));
        assert!(
            matches!(err, CodecError::AddressLength { len: 17, .. }),
            "{err}"
        );

        let err = decode(&svc(&[
            af.clone(),
            nla(SVC_ATTR_PROTOCOL, &6u16.to_ne_bytes()),
        ]));
        assert!(
            matches!(
                err,
                CodecError::Missing {
                    attr: "IPVS_SVC_ATTR_ADDR",
                    ..
                }
            ),
            "{err}"
        );

        let mut new_service = vec![
            af.clone(),
            nla(SVC_ATTR_FWMARK, &1u32.to_ne_bytes()),
            nla(SVC_ATTR_SCHED_NAME, &[0xff, 0xfe, 0]),
            nla(SVC_ATTR_FLAGS, &[0; 8]),
            nla(SVC_ATTR_TIMEOUT, &[0; 4]),
            nla(SVC_ATTR_NETMASK, &[0; 4]),
        ];
        let err = decode(&genl(
            CMD_NEW_SERVICE,
            &nest(CMD_ATTR_SERVICE, &new_service),
        ));
        assert!(matches!(err, CodecError::String { .. }), "{err}");
        new_service.pop();
        new_service[2] = nla(SVC_ATTR_SCHED_NAME, b"rr\0");
        let err = decode(&genl(
            CMD_NEW_SERVICE,
            &nest(CMD_ATTR_SERVICE, &new_service),
        ));
        assert!(
            matches!(
                err,
                CodecError::Missing {
                    attr: "IPVS_SVC_ATTR_NETMASK",
                    ..
                }
            ),
            "{err}"
        );

        // An attribute claiming more bytes than the message holds.
        let mut truncated = svc(std::slice::from_ref(&af));
        truncated[20..22].copy_from_slice(&200u16.to_ne_bytes());
        let err = decode(&truncated);
        assert!(matches!(err, CodecError::Attribute { .. }), "{err}");

        let err = decode(&genl(CMD_GET_SERVICE + 40, &[]));
        assert!(matches!(err, CodecError::Command(44)), "{err}");

        let err = decode(&genl(CMD_NEW_DEST, &[]));
        assert!(
            matches!(
                err,
                CodecError::Missing {
                    attr: "IPVS_CMD_ATTR_DEST",
                    ..
                }
            ),
            "{err}"
        );

        let err = decode_message(&genl(CMD_GET_INFO, &[]), FAMILY + 1).unwrap_err();
        assert!(
            matches!(err, CodecError::MessageType { found: FAMILY, .. }),
            "{err}"
        );

        let err = decode(&genl(CMD_GET_INFO, &[])[..12]);
        assert_eq!(err.metric_label(), "netlink");
        let mut short = genl(CMD_GET_INFO, &[]);
        short.truncate(18);
        short[..4].copy_from_slice(&18u32.to_ne_bytes());
        assert!(matches!(decode(&short), CodecError::Netlink(_)));
    }

    #[test]
    fn validation_names_the_field() {
        let service = |key, config| Service { key, config };
        let v4_config = ServiceConfig::new("rr", AddrFamily::V4);
        let field = |r: Result<(), CodecError>| match r.unwrap_err() {
            CodecError::Invalid { field, .. } => field,
            other => panic!("{other}"),
        };
        assert!(
            service(tcp("10.0.0.1", 80), v4_config.clone())
                .validate()
                .is_ok()
        );
        let fwmark0 = ServiceKey::Fwmark {
            family: AddrFamily::V4,
            mark: 0,
        };
        assert_eq!(
            field(service(fwmark0, v4_config.clone()).validate()),
            "fwmark"
        );
        let long = ServiceConfig::new("a-scheduler-name", AddrFamily::V4);
        assert_eq!(
            field(service(tcp("10.0.0.1", 80), long).validate()),
            "scheduler"
        );
        assert_eq!(
            field(service(tcp("10.0.0.1", 80), ServiceConfig::new("", AddrFamily::V4)).validate()),
            "scheduler"
        );
        let mut pe = v4_config.clone();
        pe.pe_name = Some(String::new());
        assert_eq!(
            field(service(tcp("10.0.0.1", 80), pe).validate()),
            "pe_name"
        );
        let v6_key = ServiceKey::Addr {
            protocol: Protocol::Tcp,
            addr: v4("2001:db8::1"),
            port: 80,
        };
        let err = service(v6_key, v4_config).validate().unwrap_err();
        assert_eq!(
            err.to_string(),
            "netmask: 4294967295 is no IPv6 prefix length (1..=128)"
        );

        let svc = tcp("10.0.0.1", 80);
        assert!(
            dest("10.1.0.1", 80, Forwarding::Masquerade, 0)
                .validate(&svc)
                .is_ok()
        );
        let heavy = dest("10.1.0.1", 80, Forwarding::Masquerade, 1 << 31);
        assert_eq!(field(heavy.validate(&svc)), "weight");
        let mut lower = dest("10.1.0.1", 80, Forwarding::Masquerade, 1);
        lower.config.lower_threshold = 5;
        assert_eq!(field(lower.validate(&svc)), "lower_threshold");
        let gue = Forwarding::Tunnel(Tunnel {
            kind: TunnelType::Gue,
            port: 0,
            flags: 0,
        });
        assert_eq!(
            field(dest("10.1.0.1", 80, gue, 1).validate(&svc)),
            "tunnel.port"
        );
        let mut mixed = dest("10.1.0.1", 80, Forwarding::DirectRoute, 1);
        mixed.key.addr = v4("2001:db8::9");
        assert_eq!(field(mixed.validate(&svc)), "address");
        mixed.config.forwarding = Forwarding::Tunnel(Tunnel::default());
        assert!(mixed.validate(&svc).is_ok());
        assert_eq!(
            field(dest("10.1.0.1", 80, Forwarding::Other(6), 1).validate(&svc)),
            "forwarding"
        );
    }

    #[test]
    fn displays_read_like_ipvsadm() {
        assert_eq!(tcp("10.0.0.1", 80).to_string(), "TCP 10.0.0.1:80");
        let v6 = ServiceKey::Addr {
            protocol: Protocol::Sctp,
            addr: v4("2001:db8::1"),
            port: 9,
        };
        assert_eq!(v6.to_string(), "SCTP [2001:db8::1]:9");
        let mark = ServiceKey::Fwmark {
            family: AddrFamily::V6,
            mark: 7,
        };
        assert_eq!(mark.to_string(), "fwmark 7 (IPv6)");
        assert_eq!(
            DestKey {
                addr: v4("2001:db8::2"),
                port: 80
            }
            .to_string(),
            "[2001:db8::2]:80"
        );
        assert_eq!(Protocol::Other(47).to_string(), "protocol 47");
        assert_eq!(Forwarding::DirectRoute.to_string(), "direct routing");
    }

    /// xorshift64*: deterministic, no dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn never_panics_on_random_or_mutated_input() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let valid: Vec<Vec<u8>> = samples().into_iter().map(encode).collect();
        let mut decoded = 0;
        for round in 0..40_000 {
            let bytes = if round % 4 == 0 {
                let len = rng.below(200);
                (0..len).map(|_| rng.next() as u8).collect()
            } else {
                // Valid messages with bytes flipped, cut short or grown.
                let mut bytes = valid[rng.below(valid.len())].clone();
                for _ in 0..=rng.below(4) {
                    let i = rng.below(bytes.len());
                    bytes[i] = rng.next() as u8;
                }
                match rng.below(4) {
                    0 => bytes.truncate(rng.below(bytes.len() + 1)),
                    1 => bytes.extend((0..rng.below(16)).map(|_| rng.next() as u8)),
                    _ => {}
                }
                bytes
            };
            // Whatever decodes must survive its own re-encoding unchanged.
            if let Ok((_, message)) = decode_message(&bytes, FAMILY) {
                decoded += 1;
                let again = decode_message(&encode(message.clone()), FAMILY).unwrap().1;
                assert_eq!(again, message, "{bytes:02x?}");
            }
        }
        assert!(
            decoded > 1000,
            "mutations should often stay decodable: {decoded}"
        );
    }

    // ---- Golden vectors: what Debian's ipvsadm sent to (and got from) a 6.1 kernel. ----

    const CAPTURE: &str = include_str!("../../../tests/data/ipvsadm-netlink.txt");

    struct Captured {
        args: String,
        messages: Vec<(bool, Vec<u8>)>,
    }

    fn parse_capture(text: &str) -> (u16, Vec<Captured>) {
        let mut family = None;
        let mut commands: Vec<Captured> = Vec::new();
        for line in text.lines() {
            if let Some(id) = line.strip_prefix("# family-id ") {
                family = Some(id.trim().parse().unwrap());
            } else if let Some(args) = line.strip_prefix("# ipvsadm ") {
                commands.push(Captured {
                    args: args.to_owned(),
                    messages: Vec::new(),
                });
            } else if let Some((dir, hex)) =
                line.split_once(' ').filter(|(d, _)| *d == ">" || *d == "<")
            {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                    .collect();
                commands
                    .last_mut()
                    .unwrap()
                    .messages
                    .push((dir == ">", bytes));
            }
        }
        (family.expect("# family-id line"), commands)
    }

    /// What an ipvsadm command line asks for, with ipvsadm's defaults (ipvsadm.c
    /// process_options): scheduler wlc, persistence 360 s, netmask /32 or /128, direct
    /// routing, weight 1, and the service port for a server without one or routed directly.
    enum Expected {
        Write(IpvsMessage),
        List,
    }

    fn ipvsadm_meaning(args: &str) -> Expected {
        let mut words = args.split_whitespace().peekable();
        let mut command = None;
        let mut key = None;
        let mut fwmark_v6 = false;
        let mut config = ServiceConfig::new("wlc", AddrFamily::V4);
        let mut sched = None;
        let mut netmask = None;
        let mut server: Option<(IpAddr, Option<u16>)> = None;
        let mut forwarding = Forwarding::DirectRoute;
        let mut tunnel = Tunnel::default();
        let mut dest_config = DestConfig::new(Forwarding::DirectRoute, 1);
        let endpoint = |s: &str| -> (IpAddr, Option<u16>) {
            if let Some(rest) = s.strip_prefix('[') {
                let (addr, port) = rest.split_once("]:").unwrap();
                (addr.parse().unwrap(), Some(port.parse().unwrap()))
            } else if let Ok(addr) = s.parse() {
                (addr, None)
            } else {
                let (addr, port) = s.rsplit_once(':').unwrap();
                (addr.parse().unwrap(), Some(port.parse().unwrap()))
            }
        };
        while let Some(word) = words.next() {
            let mut value = || words.next().unwrap().to_owned();
            match word {
                "-A" | "-E" | "-D" | "-a" | "-e" | "-d" | "-Ln" | "-L" => command = Some(word),
                "-n" => {}
                "-t" | "-u" | "--sctp-service" => {
                    let protocol = match word {
                        "-t" => Protocol::Tcp,
                        "-u" => Protocol::Udp,
                        _ => Protocol::Sctp,
                    };
                    let (addr, port) = endpoint(&value());
                    key = Some(ServiceKey::Addr {
                        protocol,
                        addr,
                        port: port.unwrap_or(0),
                    });
                }
                "-f" => {
                    key = Some(ServiceKey::Fwmark {
                        family: AddrFamily::V4,
                        mark: value().parse().unwrap(),
                    })
                }
                "-6" => fwmark_v6 = true,
                "-s" => sched = Some(value()),
                "-p" => {
                    config.flags.persistent = true;
                    config.timeout = 360;
                    if let Some(t) = words.peek().and_then(|w| w.parse().ok()) {
                        config.timeout = t;
                        words.next();
                    }
                }
                "-M" => netmask = Some(value()),
                "-o" => config.flags.one_packet = true,
                "--pe" => config.pe_name = Some(value()),
                "-b" => {
                    for flag in value().split(',') {
                        match flag {
                            "flag-1" | "sh-fallback" | "mh-fallback" => {
                                config.flags.sched_flag_1 = true
                            }
                            "flag-2" | "sh-port" | "mh-port" => config.flags.sched_flag_2 = true,
                            "flag-3" => config.flags.sched_flag_3 = true,
                            other => panic!("scheduler flag {other}"),
                        }
                    }
                }
                "-r" => server = Some(endpoint(&value())),
                "-m" => forwarding = Forwarding::Masquerade,
                "-g" => forwarding = Forwarding::DirectRoute,
                "-i" => forwarding = Forwarding::Tunnel(Tunnel::default()),
                "--tun-type" => {
                    tunnel.kind = match value().as_str() {
                        "ipip" => TunnelType::Ipip,
                        "gue" => TunnelType::Gue,
                        "gre" => TunnelType::Gre,
                        other => panic!("tunnel type {other}"),
                    }
                }
                "--tun-port" => tunnel.port = value().parse().unwrap(),
                "--tun-nocsum" => {}
                "--tun-csum" => tunnel.flags |= TUNNEL_FLAG_CSUM,
                "--tun-remcsum" => tunnel.flags |= TUNNEL_FLAG_REMCSUM,
                "-w" => dest_config.weight = value().parse().unwrap(),
                "-x" => dest_config.upper_threshold = value().parse().unwrap(),
                "-y" => dest_config.lower_threshold = value().parse().unwrap(),
                other => panic!("the golden test does not know ipvsadm option {other}; teach it"),
            }
        }
        let mut key = match (command, key) {
            (Some("-L" | "-Ln"), _) => return Expected::List,
            (_, Some(key)) => key,
            (command, None) => panic!("{command:?} without a service"),
        };
        if let (ServiceKey::Fwmark { family, .. }, true) = (&mut key, fwmark_v6) {
            *family = AddrFamily::V6;
        }
        config.netmask = match netmask {
            Some(mask) if key.family() == AddrFamily::V6 => mask.parse().unwrap(),
            Some(mask) => u32::from(mask.parse::<Ipv4Addr>().unwrap()),
            None => key.family().full_netmask(),
        };
        if let Forwarding::Tunnel(_) = forwarding {
            forwarding = Forwarding::Tunnel(tunnel);
        }
        dest_config.forwarding = forwarding;
        let service_port = match key {
            ServiceKey::Addr { port, .. } => port,
            ServiceKey::Fwmark { .. } => 0,
        };
        let dest_key = server.map(|(addr, port)| {
            let routed = matches!(forwarding, Forwarding::Tunnel(_) | Forwarding::DirectRoute);
            let port = match key {
                ServiceKey::Addr { .. } if routed && command != Some("-d") => service_port,
                _ => port.unwrap_or(service_port),
            };
            DestKey { addr, port }
        });
        config.scheduler = sched.unwrap_or(config.scheduler);
        let service = Service { key, config };
        let destination = || Destination {
            key: dest_key.unwrap(),
            config: dest_config,
        };
        Expected::Write(match command.unwrap() {
            "-A" => IpvsMessage::NewService(service),
            "-E" => IpvsMessage::SetService(service),
            "-D" => IpvsMessage::DelService(key),
            "-a" => IpvsMessage::NewDest(key, destination()),
            "-e" => IpvsMessage::SetDest(key, destination()),
            "-d" => IpvsMessage::DelDest(key, dest_key.unwrap()),
            other => panic!("command {other}"),
        })
    }

    /// Compares ipvsadm's bytes with ours for the same message, header fields taken from the
    /// capture. Byte-exact when ours is the same request; otherwise every attribute we send
    /// must be among ipvsadm's, with the same bytes (ipvsadm also sends the scheduler,
    /// flags, timeout and netmask with requests that only need the service key, which the
    /// kernel ignores there). Returns whether the bytes were identical.
    fn same_bytes_or_subset(theirs: &[u8], message: &IpvsMessage) -> bool {
        let header = NetlinkBuffer::new_checked(theirs).unwrap();
        let mut ours = Vec::new();
        encode_message(
            message.clone(),
            header.message_type(),
            header.flags(),
            header.sequence_number(),
            &mut ours,
        );
        ours[12..16].copy_from_slice(&theirs[12..16]);
        if ours == theirs {
            return true;
        }
        assert_eq!(
            ours[4..20],
            theirs[4..20],
            "headers differ beyond the length"
        );
        let their_top = attrs(&theirs[20..]);
        for (kind, value) in attrs(&ours[20..]) {
            let (_, their_value) = their_top
                .iter()
                .find(|(k, _)| *k == kind)
                .unwrap_or_else(|| panic!("ipvsadm sends no attribute {kind} in {message:?}"));
            if *their_value == value {
                continue;
            }
            let theirs_nested = attrs(their_value);
            for (sub, sub_value) in attrs(value) {
                assert!(
                    theirs_nested.contains(&(sub, sub_value)),
                    "attribute {kind}.{sub} differs from ipvsadm's in {message:?}"
                );
            }
        }
        false
    }

    type Table = BTreeMap<ServiceKey, (ServiceConfig, BTreeMap<DestKey, DestConfig>)>;

    fn apply(table: &mut Table, message: &IpvsMessage) {
        match message {
            IpvsMessage::NewService(s) | IpvsMessage::SetService(s) => {
                table
                    .entry(s.key)
                    .or_insert_with(|| (s.config.clone(), BTreeMap::new()))
                    .0 = s.config.clone();
            }
            IpvsMessage::DelService(key) => {
                table.remove(key);
            }
            IpvsMessage::NewDest(key, d) | IpvsMessage::SetDest(key, d) => {
                table.get_mut(key).unwrap().1.insert(d.key, d.config);
            }
            IpvsMessage::DelDest(key, d) => {
                table.get_mut(key).unwrap().1.remove(d);
            }
            other => panic!("{other:?} is no write"),
        }
    }

    #[test]
    fn golden_ipvsadm_messages() {
        let (family, commands) = parse_capture(CAPTURE);
        assert!(
            commands.len() >= 10,
            "the capture holds {} commands",
            commands.len()
        );
        let mut table = Table::new();
        let mut exact = 0;
        let mut subset = 0;
        for command in &commands {
            let expected = ipvsadm_meaning(&command.args);
            let mut writes = Vec::new();
            let mut dump_requests = Vec::new();
            let mut listed_services = Vec::new();
            let mut listed_dests: BTreeMap<ServiceKey, BTreeMap<DestKey, DestConfig>> =
                BTreeMap::new();
            let mut last_dump_key = None;
            for (sent, bytes) in &command.messages {
                let (header, message) = decode_message(bytes, family)
                    .unwrap_or_else(|e| panic!("ipvsadm {}: {e}: {bytes:02x?}", command.args));
                if !sent {
                    // The kernel's replies: the info, and the dumps of a listing.
                    match message {
                        IpvsMessage::Info(info) => assert_eq!(info.version_string(), "1.2.1"),
                        IpvsMessage::NewService(s) => listed_services.push(s),
                        IpvsMessage::DestEntry(entry) => {
                            let d = entry.destination;
                            listed_dests
                                .entry(last_dump_key.unwrap())
                                .or_default()
                                .insert(d.key, d.config);
                        }
                        other => panic!("unexpected reply {other:?}"),
                    }
                    continue;
                }
                assert_ne!(header.flags & NLM_F_REQUEST, 0);
                if same_bytes_or_subset(bytes, &message) {
                    exact += 1;
                } else {
                    subset += 1;
                    if let IpvsMessage::NewDest(..) | IpvsMessage::SetDest(..) = message {
                        // The destination itself, tunnel attributes included, is identical.
                        assert_eq!(
                            nested(&bytes[20..], CMD_ATTR_DEST),
                            nested(&encode(message.clone())[20..], CMD_ATTR_DEST)
                        );
                    }
                    assert!(
                        matches!(
                            message,
                            IpvsMessage::DelService(_)
                                | IpvsMessage::NewDest(..)
                                | IpvsMessage::SetDest(..)
                                | IpvsMessage::DelDest(..)
                        ),
                        "{message:?} should be byte-identical to ipvsadm's"
                    );
                }
                match message {
                    // ipvsadm asks for the version before every command.
                    IpvsMessage::GetInfo => assert_eq!(header.flags, NLM_F_REQUEST | NLM_F_ACK),
                    IpvsMessage::GetServices => {
                        // ipvsadm also sets NLM_F_ACK, which a dump does not need.
                        assert_eq!(header.flags & NLM_F_DUMP, NLM_F_DUMP);
                        dump_requests.push(message);
                    }
                    IpvsMessage::GetDests(key) => {
                        assert_eq!(header.flags & NLM_F_DUMP, NLM_F_DUMP);
                        last_dump_key = Some(key);
                        dump_requests.push(message);
                    }
                    write => {
                        assert_eq!(header.flags, NLM_F_REQUEST | NLM_F_ACK);
                        writes.push(write);
                    }
                }
            }
            match expected {
                Expected::Write(message) => {
                    assert_eq!(
                        writes,
                        std::slice::from_ref(&message),
                        "ipvsadm {}",
                        command.args
                    );
                    apply(&mut table, &message);
                }
                Expected::List => {
                    assert!(writes.is_empty());
                    assert_eq!(dump_requests[0], IpvsMessage::GetServices);
                    let listed: BTreeMap<_, _> = listed_services
                        .iter()
                        .map(|s| (s.key, s.config.clone()))
                        .collect();
                    let modelled: BTreeMap<_, _> =
                        table.iter().map(|(k, (c, _))| (*k, c.clone())).collect();
                    assert_eq!(
                        listed, modelled,
                        "the kernel's service dump decodes to what was asked"
                    );
                    // One destination dump per listed service, in ipvsadm's sorted order.
                    let mut asked: Vec<_> = dump_requests[1..]
                        .iter()
                        .map(|m| match m {
                            IpvsMessage::GetDests(key) => *key,
                            other => panic!("{other:?}"),
                        })
                        .collect();
                    asked.sort();
                    let mut listed_keys: Vec<_> = listed.keys().copied().collect();
                    listed_keys.sort();
                    assert_eq!(asked, listed_keys);
                    for (key, (_, dests)) in &table {
                        assert_eq!(
                            listed_dests.get(key).cloned().unwrap_or_default(),
                            *dests,
                            "destinations of {key}"
                        );
                    }
                }
            }
        }
        assert!(
            exact >= 10 && subset >= 5,
            "exact {exact}, by attribute {subset}"
        );
    }

    #[test]
    fn nla_buffer_agrees_with_the_table_reader() {
        // The table keeps the value NlaBuffer reports, padding excluded.
        let raw = nla(SVC_ATTR_SCHED_NAME, b"wlc\0\0");
        let buffer = NlaBuffer::new_checked(&raw[..]).unwrap();
        let t = table::<SVC_ATTR_TABLE>(&raw, "test").unwrap();
        assert_eq!(t[SVC_ATTR_SCHED_NAME as usize], Some(buffer.value()));
    }
}
