//! The virtual services a node should forward, independent of the dataplane that programs
//! them (IPVS now; nftables later).

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

pub use crate::crd::{Encapsulation, Forwarding, ServiceProtocol, TunnelKind};
use crate::vocab::Family;

/// What identifies a virtual service in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceKey {
    Port {
        addr: IpAddr,
        protocol: ServiceProtocol,
        port: u16,
    },
    Fwmark {
        family: Family,
        mark: u32,
    },
}

impl ServiceKey {
    pub fn family(&self) -> Family {
        match self {
            ServiceKey::Port { addr, .. } => Family::of(addr),
            ServiceKey::Fwmark { family, .. } => *family,
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Port {
                addr: IpAddr::V6(a),
                protocol,
                port,
            } => write!(f, "{} [{a}]:{port}", protocol.name()),
            ServiceKey::Port {
                addr,
                protocol,
                port,
            } => write!(f, "{} {addr}:{port}", protocol.name()),
            ServiceKey::Fwmark { family, mark } => write!(f, "fwmark {mark} ({family})"),
        }
    }
}

/// A backend of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendKey {
    pub addr: IpAddr,
    /// 0: the port the packet was sent to (fwmark services).
    pub port: u16,
}

impl fmt::Display for BackendKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V6(a) => write!(f, "[{a}]:{}", self.port),
            IpAddr::V4(a) => write!(f, "{a}:{}", self.port),
        }
    }
}

/// How one virtual service should forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The VirtualIP it belongs to, for logs and status.
    pub owner: String,
    pub scheduler: String,
    pub scheduler_flags: [bool; 3],
    /// Persistence timeout in seconds.
    pub persistence: Option<u32>,
    pub forwarding: Forwarding,
    /// Masquerade the client's address too, so replies return through this node.
    pub source_nat: bool,
    /// Encapsulation, with `Forwarding::Tunnel`.
    pub tunnel: Option<Encapsulation>,
    /// (upper, lower) connection thresholds of every backend; 0 means none.
    pub connection_limit: (u32, u32),
    /// Backend → weight. Weight 0 drains: no new connections, existing ones continue.
    pub backends: BTreeMap<BackendKey, u32>,
}

/// Every virtual service one node should program.
pub type ServiceSet = BTreeMap<ServiceKey, ServiceSpec>;
