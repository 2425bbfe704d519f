//! IPVS over generic netlink: the codec, a pipelining client, and the converging dataplane.

pub mod client;
pub mod diff;
pub mod netlink;
