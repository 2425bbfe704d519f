//! The words every layer shares: address family, VRRP version, checksum form.
//!
//! A leaf module: it imports nothing from the crate, so the API contract (`crd`), the planner
//! (`model`), the engines and the dataplane can all name these without pointing at each other.

use std::fmt;

/// The VRRP protocol version spoken by one virtual router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V2,
    V3,
}

impl Version {
    pub fn number(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Address family of a virtual router: IPv4 and IPv6 are separate instances on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &std::net::IpAddr) -> Family {
        match addr {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// How the VRRPv3-over-IPv4 checksum is computed when sending.
/// On receive both forms are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChecksumMode {
    /// Message plus IPv4 pseudo-header (keepalived's default, Wireshark's expectation).
    #[default]
    PseudoHeader,
    /// Message only (RFC 9568 text; keepalived `v3_checksum_as_v2`).
    MessageOnly,
}
