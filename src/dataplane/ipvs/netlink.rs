//! IPVS generic netlink codec (being written).
