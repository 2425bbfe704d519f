//! Bulk address sets as `local` routes (AnyIP): the exact CIDR cover of a set of addresses,
//! and the routes that hold them.
//!
//! A `local` route in table main makes every address of its prefix local to the node: the
//! kernel accepts their traffic and, for IPv4 (with `arp_ignore` 0), answers ARP for them.
//! ferrovip's routes carry `proto 0x46` ([`FERROVIP_ROUTE_PROTO`], the addresses' mark, which
//! every kernel keeps for routes) and as preferred source the set's *anchor*, an interface
//! address of ours. IPv4: `scope host`; deleting the anchor (or its lifetime running out)
//! makes the kernel flush the routes (`fib_sync_down_addr` looks at table main). IPv6: the
//! kernel only clears a route's preferred source when that address goes, so IPv6 routes carry
//! their own lifetime (`RTA_EXPIRES`, whole seconds; a lookup skips an expired route at once)
//! and nobody answers neighbour solicitations for them but ferrovip ([`super::ndp`]). See
//! [`super::addr`] for the sets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netlink_packet_route::AddressFamily;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};

/// `rtm_protocol` of our routes ('F'), the number of the addresses' `IFA_PROTO` mark
/// (`super::addr::FERROVIP_ADDR_PROTO` is this constant). Every kernel keeps a route's protocol.
pub const FERROVIP_ROUTE_PROTO: u8 = 0x46;

/// The main routing table (`RT_TABLE_MAIN`).
pub const TABLE_MAIN: u8 = RouteHeader::RT_TABLE_MAIN;

/// An address as (is IPv6, value): one number line per family.
fn key(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(v4) => (false, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (true, u128::from(v6)),
    }
}

fn net_of(v6: bool, addr: u128, prefix: u8) -> IpNet {
    if v6 {
        IpNet::V6(Ipv6Net::new(Ipv6Addr::from(addr), prefix).expect("prefix ≤ 128"))
    } else {
        IpNet::V4(Ipv4Net::new(Ipv4Addr::from(addr as u32), prefix).expect("prefix ≤ 32"))
    }
}

/// The smallest set of prefixes whose union is exactly `addrs` (duplicates allowed, any
/// order, IPv4 and IPv6 each covered on its own): contiguous runs are split into the
/// largest aligned blocks. Sorted by address (IPv4 first).
pub fn cidr_cover(addrs: &[IpAddr]) -> Vec<IpNet> {
    let mut sorted: Vec<(bool, u128)> = addrs.iter().map(|a| key(*a)).collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut cover = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let (v6, start) = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len()
            && sorted[i + 1].0 == v6
            && end != u128::MAX
            && sorted[i + 1].1 == end + 1
        {
            i += 1;
            end = sorted[i].1;
        }
        range_cover(v6, start, end, &mut cover);
        i += 1;
    }
    cover
}

/// The last address of the block of `host` host bits that starts at `start` (aligned).
fn block_end(start: u128, host: u32) -> u128 {
    if host >= 128 {
        u128::MAX
    } else {
        start | ((1u128 << host) - 1)
    }
}

/// Appends the aligned blocks covering exactly `start..=end` (`start ≤ end`) of one family.
fn range_cover(v6: bool, start: u128, end: u128, out: &mut Vec<IpNet>) {
    let bits: u32 = if v6 { 128 } else { 32 };
    let mut start = start;
    loop {
        // The largest block aligned at `start` that does not pass `end`.
        let mut host = if start == 0 {
            bits
        } else {
            start.trailing_zeros().min(bits)
        };
        while host > 0 && block_end(start, host) > end {
            host -= 1;
        }
        out.push(net_of(v6, start, (bits - host) as u8));
        let last = block_end(start, host);
        if last >= end {
            return;
        }
        start = last + 1;
    }
}

/// Every address of `nets`, in order.
pub fn cover_addresses(nets: &[IpNet]) -> impl Iterator<Item = IpAddr> + '_ {
    nets.iter().flat_map(|net| {
        let (v6, first) = key(net.network());
        let host = u32::from(net.max_prefix_len() - net.prefix_len());
        let last = block_end(first, host);
        let mut next = Some(first);
        std::iter::from_fn(move || {
            let at = next?;
            next = (at < last).then(|| at + 1);
            Some(match net_of(v6, at, net.max_prefix_len()) {
                IpNet::V4(n) => IpAddr::V4(n.addr()),
                IpNet::V6(n) => IpAddr::V6(n.addr()),
            })
        })
    })
}

/// The RTM_NEWROUTE / RTM_DELROUTE body of one of our routes: `local <dst> dev <index> table
/// main proto 0x46 src <prefsrc>`, IPv4 with `scope host`, IPv6 with `expires <seconds>` when
/// given (ignored for IPv4, whose routes go with their anchor).
pub fn local_route(index: u32, dst: IpNet, prefsrc: IpAddr, expires: Option<u32>) -> RouteMessage {
    let mut message = RouteMessage::default();
    let address = |ip: IpAddr| match ip {
        IpAddr::V4(v4) => RouteAddress::Inet(v4),
        IpAddr::V6(v6) => RouteAddress::Inet6(v6),
    };
    message.header.address_family = match dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    message.header.destination_prefix_length = dst.prefix_len();
    message.header.table = TABLE_MAIN;
    message.header.protocol = RouteProtocol::from(FERROVIP_ROUTE_PROTO);
    message.header.scope = match dst {
        IpNet::V4(_) => RouteScope::Host,
        IpNet::V6(_) => RouteScope::Universe,
    };
    message.header.kind = RouteType::Local;
    message.attributes = vec![
        RouteAttribute::Destination(address(dst.network())),
        RouteAttribute::Oif(index),
        RouteAttribute::PrefSource(address(prefsrc)),
    ];
    if let (IpNet::V6(_), Some(seconds)) = (dst, expires) {
        message.attributes.push(RouteAttribute::Expires(seconds));
    }
    message
}

/// A route of ours as a dump reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedRoute {
    pub index: u32,
    pub dst: IpNet,
    /// The anchor (`None`: a route without a preferred source, made by hand, or an IPv6
    /// route whose anchor went).
    pub prefsrc: Option<IpAddr>,
}

impl OwnedRoute {
    /// A `local` route of table main with our protocol; `None` for any other route.
    pub fn from_message(message: &RouteMessage) -> Option<OwnedRoute> {
        let header = &message.header;
        let v6 = match header.address_family {
            AddressFamily::Inet => false,
            AddressFamily::Inet6 => true,
            _ => return None,
        };
        if u8::from(header.protocol) != FERROVIP_ROUTE_PROTO || header.kind != RouteType::Local {
            return None;
        }
        let mut table = u32::from(header.table);
        let (mut dst, mut index, mut prefsrc) = (None, None, None);
        for attribute in &message.attributes {
            match attribute {
                RouteAttribute::Destination(RouteAddress::Inet(ip)) if !v6 => {
                    dst = Some(IpAddr::V4(*ip))
                }
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) if v6 => {
                    dst = Some(IpAddr::V6(*ip))
                }
                RouteAttribute::Oif(oif) => index = Some(*oif),
                RouteAttribute::PrefSource(RouteAddress::Inet(ip)) if !v6 => {
                    prefsrc = Some(IpAddr::V4(*ip))
                }
                RouteAttribute::PrefSource(RouteAddress::Inet6(ip)) if v6 => {
                    prefsrc = Some(IpAddr::V6(*ip))
                }
                RouteAttribute::Table(t) => table = *t,
                _ => {}
            }
        }
        if table != u32::from(TABLE_MAIN) {
            return None;
        }
        let dst = dst.unwrap_or(if v6 {
            IpAddr::V6(Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        });
        Some(OwnedRoute {
            index: index?,
            dst: IpNet::new(dst, header.destination_prefix_length).ok()?,
            prefsrc,
        })
    }

    /// The body that deletes this route.
    pub fn message(&self) -> RouteMessage {
        let unspecified = match self.dst {
            IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
        };
        let mut message = local_route(
            self.index,
            self.dst,
            self.prefsrc.unwrap_or(unspecified),
            None,
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
        self.index == index && self.prefsrc == Some(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn v4(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    /// The cover holds exactly the set, its prefixes are disjoint, and no two of them
    /// could merge into one (so it is minimal).
    fn check(addrs: &[Ipv4Addr]) -> Vec<IpNet> {
        let addrs: Vec<IpAddr> = addrs.iter().map(|a| IpAddr::V4(*a)).collect();
        check_ip(&addrs)
    }

    fn check_ip(addrs: &[IpAddr]) -> Vec<IpNet> {
        let cover = cidr_cover(addrs);
        let want: BTreeSet<IpAddr> = addrs.iter().copied().collect();
        let got: Vec<IpAddr> = cover_addresses(&cover).collect();
        let got_set: BTreeSet<IpAddr> = got.iter().copied().collect();
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
        assert_eq!(check(&[v4("0.0.0.0")]), nets(&["0.0.0.0/32"]));
        let mut out = Vec::new();
        range_cover(false, 0, u128::from(u32::MAX), &mut out);
        assert_eq!(out, nets(&["0.0.0.0/0"]));
        let mut out = Vec::new();
        range_cover(true, 0, u128::MAX, &mut out);
        assert_eq!(out, nets(&["::/0"]));
        let mut out = Vec::new();
        range_cover(true, u128::MAX - 1, u128::MAX, &mut out);
        assert_eq!(out, nets(&["ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe/127"]));
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
        let route = local_route(
            4,
            "10.0.0.0/24".parse().unwrap(),
            IpAddr::V4(v4("10.0.0.1")),
            Some(9),
        );
        assert!(
            !route
                .attributes
                .iter()
                .any(|a| matches!(a, RouteAttribute::Expires(_))),
            "IPv4 routes go with their anchor, not by expiry"
        );
        let owned = OwnedRoute::from_message(&route).unwrap();
        assert_eq!(
            owned,
            OwnedRoute {
                index: 4,
                dst: "10.0.0.0/24".parse().unwrap(),
                prefsrc: Some(IpAddr::V4(v4("10.0.0.1"))),
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

    #[test]
    fn ipv6_sets_are_covered_exactly_and_their_routes_expire() {
        let base: u128 = "fd00::1:0".parse::<Ipv6Addr>().unwrap().into();
        let addrs: Vec<IpAddr> = (1..=2_000u128)
            .map(|i| IpAddr::V6(Ipv6Addr::from(base + i)))
            .collect();
        let cover = check_ip(&addrs);
        assert!(cover.len() <= 2 * 11, "{} prefixes", cover.len());
        assert!(cover.iter().all(|n| matches!(n, IpNet::V6(_))));
        // Mixed families: each on its own line.
        let mixed = check_ip(&[
            IpAddr::V6("fd00::1".parse().unwrap()),
            IpAddr::V4(v4("10.0.0.0")),
            IpAddr::V6("fd00::".parse().unwrap()),
            IpAddr::V4(v4("10.0.0.1")),
        ]);
        assert_eq!(mixed, nets(&["10.0.0.0/31", "fd00::/127"]));

        let dst: IpNet = "fd00::1:0/112".parse().unwrap();
        let src = IpAddr::V6("fd00::1:0".parse().unwrap());
        let route = local_route(7, dst, src, Some(3));
        assert_eq!(route.header.address_family, AddressFamily::Inet6);
        assert!(route.attributes.contains(&RouteAttribute::Expires(3)));
        let owned = OwnedRoute::from_message(&route).unwrap();
        assert_eq!(
            owned,
            OwnedRoute {
                index: 7,
                dst,
                prefsrc: Some(src),
            }
        );
        assert_eq!(owned.message(), local_route(7, dst, src, None));
    }
}
