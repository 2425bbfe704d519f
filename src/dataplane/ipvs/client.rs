//! IPVS netlink client (being written).
