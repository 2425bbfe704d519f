//! nftables rules for the IPVS return path (being written).
