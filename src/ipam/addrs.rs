//! Address arithmetic: one family's addresses as `u128`, sets of them as sorted disjoint
//! inclusive ranges (a pool may be an IPv6 /64: nothing here ever enumerates a range), and
//! the parsing of a pool's `spec.addresses` entries.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use thiserror::Error;

/// An address family; indexes the per-family arrays of the allocator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4 = 0,
    V6 = 1,
}

impl Family {
    pub const BOTH: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: IpAddr) -> Family {
        if ip.is_ipv4() { Family::V4 } else { Family::V6 }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// As Kubernetes spells it in `spec.ipFamilies`.
    pub fn k8s_name(self) -> &'static str {
        match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        }
    }

    pub fn from_k8s_name(name: &str) -> Option<Family> {
        match name {
            "IPv4" => Some(Family::V4),
            "IPv6" => Some(Family::V6),
            _ => None,
        }
    }

    /// The highest address of the family.
    fn max(self) -> u128 {
        match self {
            Family::V4 => u32::MAX as u128,
            Family::V6 => u128::MAX,
        }
    }

    pub fn ip(self, n: u128) -> IpAddr {
        match self {
            // Values of the IPv4 family never exceed u32::MAX.
            Family::V4 => IpAddr::V4(Ipv4Addr::from(n as u32)),
            Family::V6 => IpAddr::V6(Ipv6Addr::from(n)),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.k8s_name())
    }
}

/// An address as (family, number).
pub fn number(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(a) => (Family::V4, u32::from(a) as u128),
        IpAddr::V6(a) => (Family::V6, u128::from(a)),
    }
}

/// IPv4 addresses ending in `.0` or `.255` (`avoidBuggyIPs`).
pub fn is_buggy(n: u128) -> bool {
    matches!(n & 0xff, 0 | 0xff)
}

/// Sorted, disjoint, non-adjacent inclusive ranges of one family.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet(Vec<(u128, u128)>);

impl RangeSet {
    /// The union of any ranges (each `start <= end`).
    pub fn from_ranges(mut ranges: Vec<(u128, u128)>) -> RangeSet {
        ranges.sort_unstable();
        let mut out: Vec<(u128, u128)> = Vec::with_capacity(ranges.len());
        for (s, e) in ranges {
            match out.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet(out)
    }

    pub fn ranges(&self) -> &[(u128, u128)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, n: u128) -> bool {
        // The last range starting at or before n.
        let i = self.0.partition_point(|&(s, _)| s <= n);
        i > 0 && self.0[i - 1].1 >= n
    }

    pub fn intersection(&self, other: &RangeSet) -> RangeSet {
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < self.0.len() && j < other.0.len() {
            let (a, b) = (self.0[i], other.0[j]);
            let (s, e) = (a.0.max(b.0), a.1.min(b.1));
            if s <= e {
                out.push((s, e));
            }
            if a.1 < b.1 { i += 1 } else { j += 1 }
        }
        RangeSet(out)
    }

    pub fn difference(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let mut j = 0;
        for &(s, e) in &self.0 {
            let mut start = s;
            // Ranges of `other` ending before this one cannot matter for later ones either.
            while j < other.0.len() && other.0[j].1 < s {
                j += 1;
            }
            let mut k = j;
            let mut done = false;
            while k < other.0.len() && other.0[k].0 <= e {
                let (os, oe) = other.0[k];
                if os > start {
                    out.push((start, os - 1));
                }
                if oe >= e {
                    done = true;
                    break;
                }
                start = start.max(oe + 1);
                k += 1;
            }
            if !done {
                out.push((start, e));
            }
        }
        RangeSet(out)
    }

    /// How many addresses, without `.0`/`.255` ones when `skip_buggy` (IPv4 only).
    pub fn count(&self, skip_buggy: bool) -> u128 {
        self.0
            .iter()
            .map(|&(s, e)| {
                let all = (e - s).saturating_add(1);
                if skip_buggy {
                    all - buggy_in(s, e)
                } else {
                    all
                }
            })
            .fold(0u128, u128::saturating_add)
    }

    /// How many members of `used` are in the set (and not buggy when `skip_buggy`).
    pub fn count_members(&self, used: &BTreeSet<u128>, skip_buggy: bool) -> u128 {
        self.0
            .iter()
            .map(|&(s, e)| {
                used.range(s..=e)
                    .filter(|&&n| !(skip_buggy && is_buggy(n)))
                    .count() as u128
            })
            .sum()
    }

    /// The lowest address `>= from` of the set that is not in `used` (nor buggy when
    /// `skip_buggy`). Walks only the used addresses in its way.
    pub fn lowest_free(&self, from: u128, used: &BTreeSet<u128>, skip_buggy: bool) -> Option<u128> {
        let first = self.0.partition_point(|&(_, e)| e < from);
        for &(s, e) in &self.0[first..] {
            let mut c = s.max(from);
            let mut taken = used.range(c..=e).peekable();
            loop {
                if skip_buggy {
                    while c <= e && is_buggy(c) {
                        if c == e {
                            break;
                        }
                        c += 1;
                    }
                    if is_buggy(c) {
                        break;
                    }
                }
                while taken.peek().is_some_and(|&&t| t < c) {
                    taken.next();
                }
                match taken.peek() {
                    Some(&&t) if t == c => {
                        if c == e {
                            break;
                        }
                        c += 1;
                    }
                    _ => return Some(c),
                }
            }
        }
        None
    }
}

/// How many of `s..=e` end in `.0` or `.255`.
fn buggy_in(s: u128, e: u128) -> u128 {
    // Numbers n in [s, e] with n % 256 == r: floor((e - r) / 256) - floor((s - 1 - r) / 256),
    // written without negatives.
    let upto = |x: u128, r: u128| -> u128 {
        // How many n in [0, x] with n % 256 == r.
        if x < r { 0 } else { (x - r) / 256 + 1 }
    };
    let count = |r: u128| upto(e, r) - if s == 0 { 0 } else { upto(s - 1, r) };
    count(0) + count(255)
}

/// Formats `s..=e` as `a` or `a-b`.
pub fn format_range(family: Family, (s, e): (u128, u128)) -> String {
    if s == e {
        family.ip(s).to_string()
    } else {
        format!("{}-{}", family.ip(s), family.ip(e))
    }
}

/// One parsed `spec.addresses` entry: the addresses the pool may hand out from it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub family: Family,
    pub start: u128,
    pub end: u128,
}

/// Why an entry of `spec.addresses` is unusable.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum EntryError {
    #[error(
        "not an address range (use a CIDR like 192.0.2.0/28 or a range like 192.0.2.10-192.0.2.20)"
    )]
    Syntax,
    #[error("{0:?} is not an IP address")]
    Address(String),
    #[error("prefix length {0:?} is not a number from 0 to {1}")]
    Prefix(String, u8),
    #[error("host bits are set (the network is {0})")]
    HostBits(String),
    #[error("range mixes IPv4 and IPv6")]
    MixedFamilies,
    #[error("range end before start")]
    EndBeforeStart,
}

/// Parses a CIDR (network and broadcast skipped for IPv4 prefixes up to /30, the
/// subnet-router anycast address skipped for IPv6 prefixes up to /126) or an inclusive
/// `a-b` range (every address, as listed).
pub fn parse_entry(text: &str) -> Result<Entry, EntryError> {
    let text = text.trim();
    let addr = |s: &str| -> Result<IpAddr, EntryError> {
        s.trim()
            .parse::<IpAddr>()
            .map_err(|_| EntryError::Address(s.trim().to_string()))
    };
    if let Some((a, b)) = text.split_once('-') {
        let (fa, s) = number(addr(a)?);
        let (fb, e) = number(addr(b)?);
        if fa != fb {
            return Err(EntryError::MixedFamilies);
        }
        if e < s {
            return Err(EntryError::EndBeforeStart);
        }
        return Ok(Entry {
            family: fa,
            start: s,
            end: e,
        });
    }
    let Some((a, p)) = text.split_once('/') else {
        // A single address is a one-address range.
        if text.is_empty() {
            return Err(EntryError::Syntax);
        }
        let (family, n) = number(addr(text)?);
        return Ok(Entry {
            family,
            start: n,
            end: n,
        });
    };
    let (family, n) = number(addr(a)?);
    let bits: u8 = match family {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    let prefix: u8 = p
        .trim()
        .parse()
        .ok()
        .filter(|p| *p <= bits)
        .ok_or_else(|| EntryError::Prefix(p.trim().to_string(), bits))?;
    let host_bits = u32::from(bits - prefix);
    let host_mask: u128 = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let network = n & !host_mask & family.max();
    if n != network {
        return Err(EntryError::HostBits(format!(
            "{}/{prefix}",
            family.ip(network)
        )));
    }
    let last = network | (host_mask & family.max());
    let (start, end) = match family {
        Family::V4 if prefix <= 30 => (network + 1, last - 1),
        Family::V6 if prefix <= 126 => (network + 1, last),
        _ => (network, last),
    };
    Ok(Entry { family, start, end })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> u128 {
        number(s.parse().unwrap()).1
    }

    fn set(r: &[(u128, u128)]) -> RangeSet {
        RangeSet::from_ranges(r.to_vec())
    }

    #[test]
    fn cidr_edges() {
        let e = |s: &str| parse_entry(s).map(|e| (e.family, e.start, e.end));
        assert_eq!(
            e("192.0.2.0/24"),
            Ok((Family::V4, ip("192.0.2.1"), ip("192.0.2.254")))
        );
        assert_eq!(
            e("192.0.2.4/30"),
            Ok((Family::V4, ip("192.0.2.5"), ip("192.0.2.6")))
        );
        assert_eq!(
            e("192.0.2.4/31"),
            Ok((Family::V4, ip("192.0.2.4"), ip("192.0.2.5")))
        );
        assert_eq!(
            e("192.0.2.4/32"),
            Ok((Family::V4, ip("192.0.2.4"), ip("192.0.2.4")))
        );
        assert_eq!(e("0.0.0.0/0"), Ok((Family::V4, 1, u32::MAX as u128 - 1)));
        assert_eq!(
            e("2001:db8::/64"),
            Ok((
                Family::V6,
                ip("2001:db8::1"),
                ip("2001:db8::ffff:ffff:ffff:ffff")
            ))
        );
        assert_eq!(
            e("2001:db8::/126"),
            Ok((Family::V6, ip("2001:db8::1"), ip("2001:db8::3")))
        );
        assert_eq!(
            e("2001:db8::/127"),
            Ok((Family::V6, ip("2001:db8::"), ip("2001:db8::1")))
        );
        assert_eq!(
            e("2001:db8::5/128"),
            Ok((Family::V6, ip("2001:db8::5"), ip("2001:db8::5")))
        );
        assert_eq!(e("::/0"), Ok((Family::V6, 1, u128::MAX)));
        assert_eq!(
            e("192.0.2.0-192.0.2.255"),
            Ok((Family::V4, ip("192.0.2.0"), ip("192.0.2.255")))
        );
        assert_eq!(
            e("192.0.2.7"),
            Ok((Family::V4, ip("192.0.2.7"), ip("192.0.2.7")))
        );
    }

    #[test]
    fn bad_entries() {
        assert_eq!(
            parse_entry("192.0.2.9-192.0.2.1"),
            Err(EntryError::EndBeforeStart)
        );
        assert_eq!(
            parse_entry("192.0.2.1-2001:db8::1"),
            Err(EntryError::MixedFamilies)
        );
        assert_eq!(
            parse_entry("192.0.2.1/24"),
            Err(EntryError::HostBits("192.0.2.0/24".into()))
        );
        assert_eq!(
            parse_entry("192.0.2.0/33"),
            Err(EntryError::Prefix("33".into(), 32))
        );
        assert_eq!(
            parse_entry("192.0.2.300/24"),
            Err(EntryError::Address("192.0.2.300".into()))
        );
        assert_eq!(parse_entry(""), Err(EntryError::Syntax));
    }

    #[test]
    fn set_operations() {
        let a = set(&[(10, 20), (21, 25), (40, 50), (0, 2)]);
        assert_eq!(a.ranges(), &[(0, 2), (10, 25), (40, 50)]);
        assert!(a.contains(0) && a.contains(25) && a.contains(40) && !a.contains(26));
        let b = set(&[(2, 12), (45, 45), (50, 60)]);
        assert_eq!(
            a.intersection(&b).ranges(),
            &[(2, 2), (10, 12), (45, 45), (50, 50)]
        );
        assert_eq!(
            a.difference(&b).ranges(),
            &[(0, 1), (13, 25), (40, 44), (46, 49)]
        );
        assert_eq!(a.count(false), 3 + 16 + 11);
        let full = set(&[(0, u128::MAX)]);
        assert_eq!(full.count(false), u128::MAX, "saturates");
        assert_eq!(full.difference(&full), RangeSet::default());
        assert_eq!(
            full.difference(&set(&[(5, 5)])).ranges(),
            &[(0, 4), (6, u128::MAX)]
        );
    }

    #[test]
    fn buggy_counts_and_skips() {
        let s = set(&[(ip("10.0.0.0"), ip("10.0.2.255"))]);
        assert_eq!(s.count(true), 768 - 6);
        let s = set(&[(ip("10.0.0.255"), ip("10.0.1.0"))]);
        assert_eq!(s.count(true), 0);
        assert_eq!(s.lowest_free(0, &BTreeSet::new(), true), None);
        let s = set(&[(ip("10.0.0.254"), ip("10.0.1.2"))]);
        let used: BTreeSet<u128> = [ip("10.0.0.254")].into();
        assert_eq!(s.lowest_free(0, &used, true), Some(ip("10.0.1.1")));
        assert_eq!(s.lowest_free(0, &used, false), Some(ip("10.0.0.255")));
    }

    #[test]
    fn lowest_free_walks_used_only() {
        // A /64: 2^64 addresses, the first 10,000 used.
        let s = set(&[(ip("2001:db8::"), ip("2001:db8::ffff:ffff:ffff:ffff"))]);
        let base = ip("2001:db8::");
        let used: BTreeSet<u128> = (0..10_000).map(|i| base + i).collect();
        assert_eq!(s.lowest_free(0, &used, false), Some(base + 10_000));
        assert_eq!(
            s.lowest_free(base + 20_000, &used, false),
            Some(base + 20_000)
        );
        let s = set(&[(1, 3), (7, 9)]);
        let used: BTreeSet<u128> = [1, 2, 3, 7].into();
        assert_eq!(s.lowest_free(0, &used, false), Some(8));
        let used: BTreeSet<u128> = [1, 2, 3, 7, 8, 9].into();
        assert_eq!(s.lowest_free(0, &used, false), None);
        assert_eq!(s.count_members(&used, false), 6);
    }
}
