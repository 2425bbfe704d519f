//! Kernel dataplane: virtual addresses (rtnetlink), later IPVS and nftables.

pub mod addr;
pub mod link;
