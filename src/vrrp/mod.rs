//! VRRP (RFC 5798 / RFC 9568, and RFC 3768 for version 2).
//!
//! - [`packet`]: the advertisement codec (sans-IO, golden-vector tested).
//! - [`instance`]: the per-virtual-router state machine (sans-IO, time is an argument).
//!
//! Both are pure; the node engine (`crate::engine`) runs the instances of a node and the driver
//! (`crate::driver`) does their I/O.

pub mod instance;
pub mod packet;

use crate::vocab::Family;

/// IPv4 VRRP multicast group.
pub const MULTICAST_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(224, 0, 0, 18);
/// IPv6 VRRP multicast group.
pub const MULTICAST_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
/// IP protocol number of VRRP.
pub const IPPROTO_VRRP: u8 = 112;

/// The VRRP group of a family.
pub fn group(family: Family) -> std::net::IpAddr {
    match family {
        Family::V4 => std::net::IpAddr::V4(MULTICAST_V4),
        Family::V6 => std::net::IpAddr::V6(MULTICAST_V6),
    }
}
