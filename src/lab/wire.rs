//! Decoding of the few frames the lab watches on the bridge.
//!
//! The lab parses the bytes itself instead of using the agent's codec: a harness that shares
//! the code under test would agree with the agent's bugs. It reports what is on the wire, so
//! it checks structure (lengths, types) but not checksums or TTLs; those are exposed for the
//! tests to assert on.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

pub use pnet_datalink::MacAddr;

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const ETHERTYPE_VLAN: u16 = 0x8100;
const PROTO_VRRP: u8 = 112;
const PROTO_ICMPV6: u8 = 58;
const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;

/// One frame of interest, stamped when the capture thread received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub at: Instant,
    /// Ethernet source address of the frame.
    pub src_mac: MacAddr,
    pub kind: EventKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// A VRRP advertisement (IPv4 protocol or IPv6 next header 112).
    Advert(SeenAdvert),
    /// An ARP request or reply whose sender and target IP are the same (an announcement, not
    /// an RFC 5227 probe, which has sender 0.0.0.0).
    GratuitousArp {
        sender_ip: Ipv4Addr,
        sender_mac: MacAddr,
    },
    /// A neighbor advertisement with the Solicited flag clear.
    UnsolicitedNa {
        source: Ipv6Addr,
        target: Ipv6Addr,
        target_mac: Option<MacAddr>,
        override_flag: bool,
    },
}

/// The fields of a VRRP advertisement, as seen on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenAdvert {
    /// IP source: the sender's primary address, which identifies the router.
    pub source: IpAddr,
    pub destination: IpAddr,
    /// IPv4 TTL or IPv6 hop limit (must be 255 on a conforming sender).
    pub ttl: u8,
    pub version: u8,
    pub vrid: u8,
    pub priority: u8,
    /// Max Adver Int (v3, centiseconds) or Adver Int (v2, seconds) as a duration.
    pub interval: Duration,
    pub addresses: Vec<IpAddr>,
}

impl Event {
    pub fn advert(&self) -> Option<&SeenAdvert> {
        match &self.kind {
            EventKind::Advert(advert) => Some(advert),
            _ => None,
        }
    }

    /// The address this frame announces (GARP sender IP or NA target), if it is an
    /// announcement.
    pub fn announced(&self) -> Option<IpAddr> {
        match &self.kind {
            EventKind::GratuitousArp { sender_ip, .. } => Some(IpAddr::V4(*sender_ip)),
            EventKind::UnsolicitedNa { target, .. } => Some(IpAddr::V6(*target)),
            EventKind::Advert(_) => None,
        }
    }
}

/// Decodes one Ethernet frame into an event kind and the frame's source MAC, or `None` when
/// the frame is not one the lab watches (or is malformed).
pub fn parse_frame(frame: &[u8]) -> Option<(MacAddr, EventKind)> {
    let src_mac = mac_at(frame, 6)?;
    let mut ethertype = be16(frame, 12)?;
    let mut offset = 14;
    if ethertype == ETHERTYPE_VLAN {
        ethertype = be16(frame, 16)?;
        offset = 18;
    }
    let payload = frame.get(offset..)?;
    let kind = match ethertype {
        ETHERTYPE_IPV4 => parse_ipv4(payload)?,
        ETHERTYPE_IPV6 => parse_ipv6(payload)?,
        ETHERTYPE_ARP => parse_arp(payload)?,
        _ => return None,
    };
    Some((src_mac, kind))
}

fn parse_ipv4(packet: &[u8]) -> Option<EventKind> {
    let first = *packet.first()?;
    if first >> 4 != 4 {
        return None;
    }
    let header_len = usize::from(first & 0x0f) * 4;
    let total_len = usize::from(be16(packet, 2)?);
    let fragment = be16(packet, 6)? & 0x1fff;
    if header_len < 20 || total_len < header_len || fragment != 0 || packet[9] != PROTO_VRRP {
        return None;
    }
    let source = IpAddr::V4(ipv4_at(packet, 12)?);
    let destination = IpAddr::V4(ipv4_at(packet, 16)?);
    let vrrp = packet.get(header_len..total_len)?;
    parse_vrrp(vrrp, source, destination, packet[8], 4).map(EventKind::Advert)
}

fn parse_ipv6(packet: &[u8]) -> Option<EventKind> {
    if packet.first()? >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(be16(packet, 4)?);
    let hop_limit = *packet.get(7)?;
    let source = ipv6_at(packet, 8)?;
    let destination = ipv6_at(packet, 24)?;
    let mut next_header = packet[6];
    let mut body = packet.get(40..40 + payload_len)?;
    // MLD and friends carry a hop-by-hop header; VRRP and NA normally do not, but skipping the
    // generic extension headers costs little.
    while matches!(next_header, 0 | 43 | 60) {
        let len = (usize::from(*body.get(1)?) + 1) * 8;
        next_header = body[0];
        body = body.get(len..)?;
    }
    match next_header {
        PROTO_VRRP => parse_vrrp(
            body,
            IpAddr::V6(source),
            IpAddr::V6(destination),
            hop_limit,
            16,
        )
        .map(EventKind::Advert),
        PROTO_ICMPV6 => parse_neighbor_advert(body, source),
        _ => None,
    }
}

fn parse_vrrp(
    message: &[u8],
    source: IpAddr,
    destination: IpAddr,
    ttl: u8,
    address_len: usize,
) -> Option<SeenAdvert> {
    let first = *message.first()?;
    let version = first >> 4;
    if first & 0x0f != 1 || !(version == 2 || version == 3) {
        return None;
    }
    let vrid = *message.get(1)?;
    let priority = *message.get(2)?;
    let count = usize::from(*message.get(3)?);
    let interval = if version == 3 {
        Duration::from_millis(u64::from(be16(message, 4)? & 0x0fff) * 10)
    } else {
        Duration::from_secs(u64::from(*message.get(5)?))
    };
    let addresses = (0..count)
        .map(|i| {
            let at = 8 + i * address_len;
            if address_len == 4 {
                ipv4_at(message, at).map(IpAddr::V4)
            } else {
                ipv6_at(message, at).map(IpAddr::V6)
            }
        })
        .collect::<Option<Vec<_>>>()?;
    Some(SeenAdvert {
        source,
        destination,
        ttl,
        version,
        vrid,
        priority,
        interval,
        addresses,
    })
}

fn parse_neighbor_advert(icmp: &[u8], source: Ipv6Addr) -> Option<EventKind> {
    if *icmp.first()? != ICMPV6_NEIGHBOR_ADVERT || *icmp.get(1)? != 0 {
        return None;
    }
    let flags = *icmp.get(4)?;
    let solicited = flags & 0x40 != 0;
    if solicited {
        return None;
    }
    let target = ipv6_at(icmp, 8)?;
    let mut options = icmp.get(24..)?;
    let mut target_mac = None;
    while options.len() >= 8 {
        let len = usize::from(options[1]) * 8;
        if len == 0 || len > options.len() {
            break;
        }
        // Option 2: target link-layer address.
        if options[0] == 2 {
            target_mac = mac_at(options, 2);
        }
        options = &options[len..];
    }
    Some(EventKind::UnsolicitedNa {
        source,
        target,
        target_mac,
        override_flag: flags & 0x20 != 0,
    })
}

fn parse_arp(arp: &[u8]) -> Option<EventKind> {
    // Ethernet/IPv4 ARP only: htype 1, ptype 0x0800, hlen 6, plen 4.
    if be16(arp, 0)? != 1 || be16(arp, 2)? != ETHERTYPE_IPV4 || arp[4] != 6 || arp[5] != 4 {
        return None;
    }
    let sender_mac = mac_at(arp, 8)?;
    let sender_ip = ipv4_at(arp, 14)?;
    let target_ip = ipv4_at(arp, 24)?;
    if sender_ip != target_ip || sender_ip.is_unspecified() {
        return None;
    }
    Some(EventKind::GratuitousArp {
        sender_ip,
        sender_mac,
    })
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn mac_at(bytes: &[u8], at: usize) -> Option<MacAddr> {
    let b: [u8; 6] = bytes.get(at..at + 6)?.try_into().ok()?;
    Some(MacAddr::new(b[0], b[1], b[2], b[3], b[4], b[5]))
}

fn ipv4_at(bytes: &[u8], at: usize) -> Option<Ipv4Addr> {
    let b: [u8; 4] = bytes.get(at..at + 4)?.try_into().ok()?;
    Some(Ipv4Addr::from(b))
}

fn ipv6_at(bytes: &[u8], at: usize) -> Option<Ipv6Addr> {
    let b: [u8; 16] = bytes.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // Golden vector A (VRRPv3/IPv4, VRID 51, priority 100, 100 cs, VIP 192.168.1.100, from
    // 192.168.1.10), as a whole frame sent from the virtual MAC.
    const FRAME_V3_V4: &str = "01005e00001200005e000133080045c0002000000000ff7018e9c0a8010ae00000123133640100640619c0a80164";
    // Golden vector E: gratuitous ARP for 192.168.1.100 from 00:00:5e:00:01:33.
    const FRAME_GARP: &str =
        "ffffffffffff00005e0001330806000108000604000100005e000133c0a8016400005e000133c0a80164";
    // Golden vector B: IPv6 header + VRRPv3 message (VRID 10, priority 200, fe80::1 and
    // 2001:db8::100, from fe80::a to ff02::12).
    const IPV6_HEADER_B: &str =
        "60000000002870fffe80000000000000000000000000000aff020000000000000000000000000012";
    const VRRP_B: &str =
        "310ac8020064db1bfe80000000000000000000000000000120010db8000000000000000000000100";

    fn ethernet(ethertype: &str, payload: &str) -> Vec<u8> {
        hex(&format!("333300000012020000000001{ethertype}{payload}"))
    }

    #[test]
    fn decodes_vrrp_v3_over_ipv4() {
        let (mac, kind) = parse_frame(&hex(FRAME_V3_V4)).unwrap();
        assert_eq!(mac, MacAddr::new(0, 0, 0x5e, 0, 1, 0x33));
        let EventKind::Advert(advert) = kind else {
            panic!("not an advert: {kind:?}")
        };
        assert_eq!(
            advert,
            SeenAdvert {
                source: "192.168.1.10".parse().unwrap(),
                destination: "224.0.0.18".parse().unwrap(),
                ttl: 255,
                version: 3,
                vrid: 51,
                priority: 100,
                interval: Duration::from_secs(1),
                addresses: vec!["192.168.1.100".parse().unwrap()],
            }
        );
    }

    #[test]
    fn decodes_vrrp_v3_over_ipv6() {
        let frame = ethernet("86dd", &format!("{IPV6_HEADER_B}{VRRP_B}"));
        let (_, kind) = parse_frame(&frame).unwrap();
        let EventKind::Advert(advert) = kind else {
            panic!("not an advert: {kind:?}")
        };
        assert_eq!(advert.source, "fe80::a".parse::<IpAddr>().unwrap());
        assert_eq!(advert.destination, "ff02::12".parse::<IpAddr>().unwrap());
        assert_eq!((advert.version, advert.vrid, advert.priority), (3, 10, 200));
        assert_eq!(advert.interval, Duration::from_secs(1));
        assert_eq!(
            advert.addresses,
            vec![
                "fe80::1".parse::<IpAddr>().unwrap(),
                "2001:db8::100".parse().unwrap()
            ]
        );
    }

    #[test]
    fn decodes_vrrp_v2_interval_in_seconds() {
        // Golden vector C behind an IPv4 header from 192.168.1.10.
        let ip = "45c0002800000000ff700000c0a8010ae0000012";
        let frame = ethernet(
            "0800",
            &format!("{ip}213364010001b8bdc0a801640000000000000000"),
        );
        let (_, kind) = parse_frame(&frame).unwrap();
        let EventKind::Advert(advert) = kind else {
            panic!("not an advert: {kind:?}")
        };
        assert_eq!((advert.version, advert.priority), (2, 100));
        assert_eq!(advert.interval, Duration::from_secs(1));
    }

    #[test]
    fn decodes_gratuitous_arp() {
        let (_, kind) = parse_frame(&hex(FRAME_GARP)).unwrap();
        assert_eq!(
            kind,
            EventKind::GratuitousArp {
                sender_ip: "192.168.1.100".parse().unwrap(),
                sender_mac: MacAddr::new(0, 0, 0x5e, 0, 1, 0x33),
            }
        );
    }

    #[test]
    fn ignores_arp_probes_and_ordinary_requests() {
        // RFC 5227 probe: sender IP 0.0.0.0.
        let probe =
            "ffffffffffff0200000000010806000108000604000102000000000100000000000000000000c0a80164";
        assert_eq!(parse_frame(&hex(probe)), None);
        // Who-has 192.168.1.100 tell 192.168.1.10.
        let request = "ffffffffffff020000000001 0806 0001 0800 0604 0001 020000000001 c0a8010a 000000000000 c0a80164"
            .replace(' ', "");
        assert_eq!(parse_frame(&hex(&request)), None);
    }

    #[test]
    fn decodes_unsolicited_neighbor_advert_and_skips_solicited() {
        let ip =
            "6000000000203aff fe800000000000000000000000000001 ff020000000000000000000000000001";
        // Type 136, code 0, checksum, flags O=1 S=0, target 2001:db8::100, option 2 (MAC).
        let na = "88000000 20000000 20010db8000000000000000000000100 0201 020000000001";
        let frame = ethernet("86dd", &format!("{ip}{na}").replace(' ', ""));
        let (_, kind) = parse_frame(&frame).unwrap();
        assert_eq!(
            kind,
            EventKind::UnsolicitedNa {
                source: "fe80::1".parse().unwrap(),
                target: "2001:db8::100".parse().unwrap(),
                target_mac: Some(MacAddr::new(2, 0, 0, 0, 0, 1)),
                override_flag: true,
            }
        );
        let solicited = frame
            .iter()
            .enumerate()
            .map(|(i, b)| if i == 14 + 40 + 4 { 0x60 } else { *b })
            .collect::<Vec<_>>();
        assert_eq!(parse_frame(&solicited), None);
    }

    #[test]
    fn rejects_truncated_and_foreign_frames() {
        let frame = hex(FRAME_V3_V4);
        for len in [0, 13, 20, 40, frame.len() - 1] {
            assert_eq!(parse_frame(&frame[..len]), None, "length {len}");
        }
        // Same frame carrying TCP (protocol 6) instead of VRRP.
        let mut tcp = frame.clone();
        tcp[14 + 9] = 6;
        assert_eq!(parse_frame(&tcp), None);
        // VRRP type 2 is not an advertisement.
        let mut bad_type = frame;
        bad_type[14 + 20] = 0x32;
        assert_eq!(parse_frame(&bad_type), None);
    }
}
