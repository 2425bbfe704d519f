//! IPVS over generic netlink: the codec, a pipelining client, and the converging dataplane.

pub mod client;
mod dataplane;
pub mod diff;
pub mod netlink;

pub use dataplane::{
    IpvsDataplane, IpvsOptions, NAT_SYSCTLS, NAT6_FORWARDING, NFT_FILE, SERVICE_SYSCTLS,
};
