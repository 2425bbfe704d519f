//! Bulk IPv4 address sets as `local` routes (AnyIP): the exact CIDR cover of a set of
//! addresses, and the routes that hold them.
//!
//! A `local` route in table main makes every address of its prefix local to the node: the
//! kernel answers ARP for them (with `arp_ignore` 0) and accepts their traffic. ferrovip's
//! routes carry `proto 0x46` ([`FERROVIP_ROUTE_PROTO`], the addresses' mark, which every
//! kernel keeps for routes), `scope host`, and as preferred source the set's *anchor*, an interface
//! address of ours: deleting the anchor (or its lifetime running out) makes the kernel flush
//! the routes (`fib_sync_down_addr` looks at table main). See [`super::addr`] for the sets.

use std::net::{IpAddr, Ipv4Addr};

use ipnet::Ipv4Net;
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

/// `rtm_protocol` of our routes ('F'), the number of the addresses' `IFA_PROTO` mark
/// (`super::addr::FERROVIP_ADDR_PROTO` is this constant). Every kernel keeps a route's protocol.
pub const FERROVIP_ROUTE_PROTO: u8 = 0x46;

/// The main routing table (`RT_TABLE_MAIN`).
pub const TABLE_MAIN: u8 = RouteHeader::RT_TABLE_MAIN;

/// The smallest set of prefixes whose union is exactly `addrs` (duplicates allowed, any
/// order): contiguous runs are split into the largest aligned blocks. Sorted by address.
pub fn cidr_cover(addrs: &[Ipv4Addr]) -> Vec<Ipv4Net> {
    let mut sorted: Vec<u32> = addrs.iter().map(|a| u32::from(*a)).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut cover = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end.wrapping_add(1) && end != u32::MAX {
            i += 1;
            end = sorted[i];
        }
        range_cover(start, end, &mut cover);
        i += 1;
    }
    cover
}

/// Appends the aligned blocks covering exactly `start..=end`.
fn range_cover(start: u32, end: u32, out: &mut Vec<Ipv4Net>) {
    let (mut start, end) = (u64::from(start), u64::from(end));
    while start <= end {
        // The largest block aligned at `start` that does not pass `end`.
        let mut size: u64 = if start == 0 {
            1 << 32
        } else {
            1 << start.trailing_zeros()
        };
        while start + size - 1 > end {
            size >>= 1;
        }
        let prefix = 32 - size.trailing_zeros() as u8;
        out.push(Ipv4Net::new(Ipv4Addr::from(start as u32), prefix).expect("prefix ≤ 32"));
        start += size;
    }
}

/// Every address of `nets`, in order.
pub fn cover_addresses(nets: &[Ipv4Net]) -> impl Iterator<Item = Ipv4Addr> + '_ {
    nets.iter().flat_map(|net| {
        let first = u64::from(u32::from(net.network()));
        let count = 1u64 << (32 - net.prefix_len());
        (first..first + count).map(|a| Ipv4Addr::from(a as u32))
    })
}

/// The RTM_NEWROUTE / RTM_DELROUTE body of one of our routes: `local <dst> dev <index> table
/// main proto 0x46 scope host src <prefsrc>`.
pub fn local_route(index: u32, dst: Ipv4Net, prefsrc: Ipv4Addr) -> RouteMessage {
    let mut message = RouteMessage::default();
    message.header.address_family = AddressFamily::Inet;
    message.header.destination_prefix_length = dst.prefix_len();
    message.header.table = TABLE_MAIN;
    message.header.protocol = RouteProtocol::from(FERROVIP_ROUTE_PROTO);
    message.header.scope = RouteScope::Host;
    message.header.kind = RouteType::Local;
    message.attributes = vec![
        RouteAttribute::Destination(RouteAddress::Inet(dst.network())),
        RouteAttribute::Oif(index),
        RouteAttribute::PrefSource(RouteAddress::Inet(prefsrc)),
    ];
    message
}

/// A route of ours as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRoute {
    pub index: u32,
    pub dst: Ipv4Net,
    /// The anchor (`None`: a route without a preferred source, made by hand).
    pub prefsrc: Option<Ipv4Addr>,
}

impl OwnedRoute {
    /// A `local` IPv4 route of table main with our protocol; `None` for any other route.
    pub fn from_message(message: &RouteMessage) -> Option<OwnedRoute> {
        let header = &message.header;
        if header.address_family != AddressFamily::Inet
            || u8::from(header.protocol) != FERROVIP_ROUTE_PROTO
            || header.kind != RouteType::Local
        {
            return None;
        }
        let mut table = u32::from(header.table);
        let (mut dst, mut index, mut prefsrc) = (Ipv4Addr::UNSPECIFIED, None, None);
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => dst = *ip,
                RouteAttribute::Oif(oif) => index = Some(*oif),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) => prefsrc = Some(*ip),
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != u32::from(TABLE_MAIN) {
            return None;
        }
        Some(OwnedRoute {
            index: index?,
            dst: Ipv4Net::new(dst, header.destination_prefix_length).ok()?,
            prefsrc,
        })
    }

    pub fn message(&self) -> RouteMessage {
        let mut message = local_route(
            self.index,
            self.dst,
            self.prefsrc.unwrap_or(Ipv4Addr::UNSPECIFIED),
        );
        if self.prefsrc.is_none() {
            message
                .attributes
                .retain(|a| !matches!(a, RouteAttribute::PrefSource(_)));
        }
        message
    }

    /// Whether `ip` is the route's anchor.
    pub fn anchored_at(&self, index: u32, ip: IpAddr) -> bool {
        self.index == index && self.prefsrc.map(IpAddr::V4) == Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The cover holds exactly the set, its prefixes are disjoint, and no two of them
    /// could merge into one (so it is minimal).
    fn check(addrs: &[Ipv4Addr]) -> Vec<Ipv4Net> {
        let cover = cidr_cover(addrs);
        let want: BTreeSet<Ipv4Addr> = addrs.iter().copied().collect();
        let got: Vec<Ipv4Addr> = cover_addresses(&cover).collect();
        let got_set: BTreeSet<Ipv4Addr> = got.iter().copied().collect();
        assert_eq!(
            got.len(),
            got_set.len(),
            "overlapping prefixes in {cover:?}"
        );
        assert_eq!(got_set, want, "cover {cover:?}");
        for pair in cover.windows(2) {
            assert!(pair[0].network() < pair[1].network());
            if pair[0].prefix_len() == pair[1].prefix_len()
                && let Some(parent) = pair[0].supernet()
            {
                assert!(
                    !(parent.contains(&pair[1]) && parent.network() == pair[0].network()),
                    "{} and {} merge",
                    pair[0],
                    pair[1]
                );
            }
        }
        cover
    }

    #[test]
    fn cover_table() {
        let cases: &[(&[&str], &[&str])] = &[
            (&[], &[]),
            (&["10.0.0.1"], &["10.0.0.1/32"]),
            (&["10.0.0.0", "10.0.0.1"], &["10.0.0.0/31"]),
            (&["10.0.0.1", "10.0.0.2"], &["10.0.0.1/32", "10.0.0.2/32"]),
            (
                &["10.0.0.3", "10.0.0.1", "10.0.0.2", "10.0.0.2"],
                &["10.0.0.1/32", "10.0.0.2/31"],
            ),
            (
                &["10.0.0.255", "10.0.1.0"],
                &["10.0.0.255/32", "10.0.1.0/32"],
            ),
            (&["0.0.0.0"], &["0.0.0.0/32"]),
            (&["255.255.255.255"], &["255.255.255.255/32"]),
            (
                &["255.255.255.254", "255.255.255.255"],
                &["255.255.255.254/31"],
            ),
        ];
        for (input, want) in cases {
            let addrs: Vec<Ipv4Addr> = input.iter().map(|s| v4(s)).collect();
            assert_eq!(check(&addrs), nets(want), "{input:?}");
        }
    }

    #[test]
    fn ten_thousand_contiguous_addresses_take_a_handful_of_prefixes() {
        let start = u32::from(v4("10.0.0.1"));
        let addrs: Vec<Ipv4Addr> = (start..start + 10_000).map(Ipv4Addr::from).collect();
        let cover = check(&addrs);
        assert!(cover.len() <= 2 * 14, "{} prefixes", cover.len());
        // From a /18 boundary: 8192 + 1024 + 512 + 256 + 16 = 10,000.
        let start = u32::from(v4("10.1.0.0"));
        let addrs: Vec<Ipv4Addr> = (start..start + 10_000).map(Ipv4Addr::from).collect();
        assert_eq!(
            check(&addrs),
            nets(&[
                "10.1.0.0/19",
                "10.1.32.0/22",
                "10.1.36.0/23",
                "10.1.38.0/24",
                "10.1.39.0/28"
            ])
        );
    }

    #[test]
    fn the_whole_space_is_one_prefix() {
        assert_eq!(cidr_cover(&[v4("0.0.0.0")]), nets(&["0.0.0.0/32"]));
        let mut out = Vec::new();
        range_cover(0, u32::MAX, &mut out);
        assert_eq!(out, nets(&["0.0.0.0/0"]));
    }

    /// Random sets (a small deterministic generator): dense runs with holes, and sparse
    /// scatters, checked against the brute-force expansion.
    #[test]
    fn random_sets_are_covered_exactly() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..300 {
            let base = (next() as u32) & 0xffff_f000;
            let count = (next() % 600) as usize;
            let dense = round % 2 == 0;
            let addrs: Vec<Ipv4Addr> = (0..count)
                .map(|_| {
                    let offset = if dense {
                        next() % 700
                    } else {
                        next() % 1_000_000
                    };
                    Ipv4Addr::from(base.wrapping_add(offset as u32))
                })
                .collect();
            check(&addrs);
        }
    }

    /// Every subset of a /28 against a brute force: the cover is exact, and as small as the
    /// block tree allows (aligned blocks nest, so the fewest prefixes take a block whole when
    /// the set holds all of it, and otherwise its two halves' fewest).
    #[test]
    fn every_subset_of_sixteen_addresses_has_the_fewest_prefixes() {
        fn fewest(set: u32, lo: u32, size: u32) -> usize {
            let mask = if size == 32 {
                u32::MAX
            } else {
                ((1u32 << size) - 1) << lo
            };
            if set & mask == mask {
                1
            } else if set & mask == 0 {
                0
            } else {
                fewest(set, lo, size / 2) + fewest(set, lo + size / 2, size / 2)
            }
        }
        let base = u32::from(v4("10.0.0.0"));
        for set in 0u32..(1 << 16) {
            let addrs: Vec<Ipv4Addr> = (0..16)
                .filter(|bit| set & (1 << bit) != 0)
                .map(|bit| Ipv4Addr::from(base + bit))
                .collect();
            let cover = check(&addrs);
            assert_eq!(cover.len(), fewest(set, 0, 16), "set {set:#06x}: {cover:?}");
        }
    }

    #[test]
    fn our_routes_are_recognised_and_round_trip() {
        let route = local_route(4, "10.0.0.0/24".parse().unwrap(), v4("10.0.0.1"));
        let owned = OwnedRoute::from_message(&route).unwrap();
        assert_eq!(
            owned,
            OwnedRoute {
                index: 4,
                dst: "10.0.0.0/24".parse().unwrap(),
                prefsrc: Some(v4("10.0.0.1")),
            }
        );
        assert_eq!(owned.message(), route);
        assert!(owned.anchored_at(4, IpAddr::V4(v4("10.0.0.1"))));
        let mut foreign = route.clone();
        foreign.header.protocol = RouteProtocol::Boot;
        assert_eq!(OwnedRoute::from_message(&foreign), None);
        let mut other_table = route.clone();
        other_table.header.table = 255;
        assert_eq!(OwnedRoute::from_message(&other_table), None);
        let mut unicast = route;
        unicast.header.kind = RouteType::Unicast;
        assert_eq!(OwnedRoute::from_message(&unicast), None);
    }
}
