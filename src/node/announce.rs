//! Gratuitous ARP and unsolicited neighbour advertisements.
//!
//! A new VRRP master tells the LAN that the virtual addresses moved to its (virtual) MAC:
//! switches relearn the port from the frame's source MAC, and hosts update their ARP / ND
//! caches from the sender hardware address (ARP) or the target link-layer option (NA).
//!
//! The frame builders are pure; [`Announcer`] sends them through an `AF_PACKET` socket.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::IntoRawFd;
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType};
use pnet_datalink::{Channel, ChannelType, MacAddr, NetworkInterface};
use pnet_packet::ip::IpNextHeaderProtocols;

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_PTYPE_IPV4: u16 = 0x0800;
const ARP_OP_REQUEST: u16 = 1;

const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Neighbour advertisement flags word: Router (bit 31), Solicited (30), Override (29).
const NA_FLAG_OVERRIDE: u32 = 1 << 29;
const ND_OPT_TARGET_LINK_LAYER_ADDRESS: u8 = 2;
/// ICMPv6 header (4) + flags/reserved (4) + target (16) + link-layer option (8).
const NA_ICMPV6_LEN: usize = 32;

/// All-nodes multicast, and its Ethernet mapping (RFC 2464: 33:33 + low 32 bits).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

/// Gratuitous ARP as keepalived sends it: a broadcast ARP request whose sender and target
/// protocol addresses are both the VIP, and whose sender and target hardware addresses are
/// both `src_mac`.
///
/// ```text
/// Ethernet: ff:ff:ff:ff:ff:ff | src_mac | 0x0806
/// ARP:      htype 1 | ptype 0x0800 | hlen 6 | plen 4 | op 1 (request)
///           sha = src_mac | spa = ip | tha = src_mac | tpa = ip
/// ```
///
/// A request rather than a reply because some hosts only update existing cache entries
/// from requests; no padding to 60 bytes, the NIC pads short frames.
pub fn garp_frame(src_mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    frame.extend_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    frame.push(6);
    frame.push(4);
    frame.extend_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ip.octets());
    frame
}

/// Unsolicited neighbour advertisement (RFC 4861 §7.2.6) for `target`, sent from `source`
/// to all nodes.
///
/// ```text
/// Ethernet: 33:33:00:00:00:01 | src_mac | 0x86dd
/// IPv6:     version 6 | payload 32 | next header 58 | hop limit 255 | source | ff02::1
/// ICMPv6:   type 136 | code 0 | checksum | R=0 S=0 O=1 | target
///           option type 2 (target link-layer address) | length 1 (8 bytes) | src_mac
/// ```
///
/// R=0: a VIP is a host address, so the master must not claim to be a router for it.
/// S=0: nobody solicited it. O=1: replace whatever MAC the neighbours cached.
pub fn unsolicited_na_frame(src_mac: [u8; 6], target: Ipv6Addr, source: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(NA_ICMPV6_LEN);
    icmp.push(ICMPV6_NEIGHBOR_ADVERTISEMENT);
    icmp.push(0);
    icmp.extend_from_slice(&[0, 0]);
    icmp.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&target.octets());
    icmp.push(ND_OPT_TARGET_LINK_LAYER_ADDRESS);
    icmp.push(1);
    icmp.extend_from_slice(&src_mac);
    // Word 1 is the checksum field itself, which the sum must skip.
    let checksum = pnet_packet::util::ipv6_checksum(
        &icmp,
        1,
        &[],
        &source,
        &ALL_NODES,
        IpNextHeaderProtocols::Icmpv6,
    );
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + NA_ICMPV6_LEN);
    frame.extend_from_slice(&ALL_NODES_MAC);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(NA_ICMPV6_LEN as u16).to_be_bytes());
    frame.push(IpNextHeaderProtocols::Icmpv6.0);
    // Receivers drop ND messages with any other hop limit (RFC 4861 §7.1.2).
    frame.push(255);
    frame.extend_from_slice(&source.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// The frames announcing `addrs`: one GARP per IPv4 address, one NA per IPv6 address.
///
/// An NA must come from an address of the interface; without `source_v6` (normally the
/// interface's link-local address) the target itself is used, which the master holds by
/// the time it announces.
pub fn announcement_frames(
    src_mac: [u8; 6],
    addrs: &[IpAddr],
    source_v6: Option<Ipv6Addr>,
) -> Vec<Vec<u8>> {
    addrs
        .iter()
        .map(|addr| match *addr {
            IpAddr::V4(v4) => garp_frame(src_mac, v4),
            IpAddr::V6(v6) => unsolicited_na_frame(src_mac, v6, source_v6.unwrap_or(v6)),
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {name} not found")]
    InterfaceNotFound {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open an AF_PACKET socket")]
    Socket(#[source] nix::Error),
    #[error("cannot bind an AF_PACKET socket to {name}")]
    Bind {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("the datalink backend did not return an Ethernet channel for {0}")]
    NotEthernet(String),
    #[error("sending an announcement on {name} failed after {sent} frames")]
    Send {
        name: String,
        sent: usize,
        #[source]
        source: io::Error,
    },
}

impl AnnounceError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InterfaceNotFound { .. } => "interface_not_found",
            Self::Socket(_) => "socket",
            Self::Bind { .. } => "bind",
            Self::NotEthernet(_) => "not_ethernet",
            Self::Send { .. } => "send",
        }
    }
}

/// Sends announcement bursts. Blocking: call it from `spawn_blocking`.
///
/// Each call opens a socket bound to the interface and closes it at the end. The socket is
/// created with protocol 0, so the kernel never queues received traffic on it (an `ETH_P_ALL`
/// socket kept open would get a copy of every frame on the interface).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcer {
    /// Rounds per burst; each round sends every frame once (keepalived `garp_master_repeat`).
    pub repeat: u32,
    /// Pause between rounds (keepalived `garp_interval`); a second, delayed burst
    /// (keepalived `garp_master_delay`) is the caller's to schedule.
    pub interval: Duration,
}

impl Default for Announcer {
    /// keepalived's defaults: 5 rounds, back to back.
    fn default() -> Self {
        Self {
            repeat: 5,
            interval: Duration::ZERO,
        }
    }
}

impl Announcer {
    /// Announces `addrs` on `ifname` from `src_mac`; returns the number of frames sent.
    pub fn announce(
        &self,
        ifname: &str,
        src_mac: [u8; 6],
        addrs: &[IpAddr],
        source_v6: Option<Ipv6Addr>,
    ) -> Result<usize, AnnounceError> {
        let frames = announcement_frames(src_mac, addrs, source_v6);
        if frames.is_empty() || self.repeat == 0 {
            return Ok(0);
        }
        let mut sender = open_sender(ifname, src_mac)?;
        let mut sent = 0;
        for round in 0..self.repeat {
            if round > 0 && !self.interval.is_zero() {
                std::thread::sleep(self.interval);
            }
            for frame in &frames {
                let result = sender
                    .send_to(frame, None)
                    .unwrap_or_else(|| Err(io::Error::other("frame larger than the write buffer")));
                result.map_err(|source| AnnounceError::Send {
                    name: ifname.to_owned(),
                    sent,
                    source,
                })?;
                sent += 1;
            }
        }
        Ok(sent)
    }
}

/// [`Announcer::announce`] with the default burst.
pub fn announce(
    ifname: &str,
    src_mac: [u8; 6],
    addrs: &[IpAddr],
    source_v6: Option<Ipv6Addr>,
) -> Result<usize, AnnounceError> {
    Announcer::default().announce(ifname, src_mac, addrs, source_v6)
}

fn open_sender(
    ifname: &str,
    src_mac: [u8; 6],
) -> Result<Box<dyn pnet_datalink::DataLinkSender>, AnnounceError> {
    let index = nix::net::if_::if_nametoindex(ifname).map_err(|source| {
        AnnounceError::InterfaceNotFound {
            name: ifname.to_owned(),
            source,
        }
    })?;
    // Protocol 0: a packet socket that can send but is hooked to no ethertype, so it
    // receives nothing. pnet binds it with the Layer3 protocol below, also 0, which keeps
    // it unhooked.
    let socket = nix::sys::socket::socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(AnnounceError::Socket)?;
    let interface = NetworkInterface {
        name: ifname.to_owned(),
        description: String::new(),
        index,
        mac: Some(MacAddr::from(src_mac)),
        ips: Vec::new(),
        flags: 0,
    };
    let config = pnet_datalink::Config {
        read_buffer_size: 64,
        write_timeout: Some(Duration::from_secs(1)),
        channel_type: ChannelType::Layer3(0),
        promiscuous: false,
        // pnet owns (and closes) the descriptor from here on, also when binding fails.
        socket_fd: Some(socket.into_raw_fd()),
        ..pnet_datalink::Config::default()
    };
    match pnet_datalink::channel(&interface, config) {
        Ok(Channel::Ethernet(sender, _receiver)) => Ok(sender),
        Ok(_) => Err(AnnounceError::NotEthernet(ifname.to_owned())),
        Err(source) => Err(AnnounceError::Bind {
            name: ifname.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMAC_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 1071 one's-complement sum, written independently of pnet's.
    fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
        let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        let mut sum: u32 = bytes
            .chunks(2)
            .map(|w| u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0)))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum as u16
    }

    #[test]
    fn garp_matches_golden_vector_e() {
        let expected = hex(
            "ffffffffffff00005e0001330806000108000604000100005e000133c0a80164\
             00005e000133c0a80164",
        );
        assert_eq!(
            garp_frame(VMAC_51, Ipv4Addr::new(192, 168, 1, 100)),
            expected
        );
    }

    #[test]
    fn unsolicited_na_matches_hand_built_vector() {
        let source: Ipv6Addr = "fe80::a".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frame = unsolicited_na_frame(VMAC_51, target, source);
        let expected = hex("333300000001 00005e000133 86dd \
             60000000 0020 3a ff \
             fe80000000000000000000000000000a \
             ff020000000000000000000000000001 \
             88 00 0000 20000000 \
             20010db8000000000000000000000100 \
             02 01 00005e000133");
        assert_eq!(frame.len(), expected.len());
        // Everything but the checksum (bytes 56..58, zero above) is as written by hand.
        assert_eq!(frame[..56], expected[..56]);
        assert_eq!(frame[58..], expected[58..]);

        // A correct checksum makes the sum over pseudo-header and message all ones.
        let icmp = &frame[54..];
        let pseudo_len = (icmp.len() as u32).to_be_bytes();
        let sum = ones_complement_sum(&[
            &source.octets(),
            &ALL_NODES.octets(),
            &pseudo_len,
            &[0, 0, 0, 58],
            icmp,
        ]);
        assert_eq!(sum, 0xffff);
        // The same value as a one-off Python computation of RFC 1071 over these bytes.
        assert_eq!(&frame[56..58], &[0xca, 0x28]);
    }

    #[test]
    fn na_checksum_depends_on_source_address() {
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let a = unsolicited_na_frame(VMAC_51, target, "fe80::a".parse().unwrap());
        let b = unsolicited_na_frame(VMAC_51, target, "fe80::b".parse().unwrap());
        assert_ne!(a[56..58], b[56..58]);
    }

    #[test]
    fn announcement_frames_pick_builder_per_family_and_default_na_source() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 100));
        let v6: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frames = announcement_frames(VMAC_51, &[v4, IpAddr::V6(v6)], None);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[0],
            garp_frame(VMAC_51, Ipv4Addr::new(192, 168, 1, 100))
        );
        assert_eq!(frames[1], unsolicited_na_frame(VMAC_51, v6, v6));
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let frames = announcement_frames(VMAC_51, &[IpAddr::V6(v6)], Some(ll));
        assert_eq!(frames[0], unsolicited_na_frame(VMAC_51, v6, ll));
    }

    #[test]
    fn nothing_to_announce_sends_nothing_and_needs_no_interface() {
        let sent = Announcer::default()
            .announce("no-such-if0", VMAC_51, &[], None)
            .unwrap();
        assert_eq!(sent, 0);
    }

    #[test]
    fn unknown_interface_is_a_typed_error() {
        let err = announce(
            "no-such-if0",
            VMAC_51,
            &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
            None,
        )
        .unwrap_err();
        assert_eq!(err.metric_label(), "interface_not_found");
    }
}
