//! Kernel dataplane: virtual addresses (rtnetlink), IPVS virtual services (generic netlink) and
//! the nftables rules their return path needs.

pub mod addr;
pub mod ipvs;
pub mod link;
pub mod nft;
pub mod service;
