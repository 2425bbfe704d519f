//! VRRP advertisement codec (RFC 5798 / RFC 9568 version 3, RFC 3768 version 2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |(rsvd) |     Max Adver Int     |          Checksum             |   (v3)
//! |   Auth Type   |   Adver Int   |          Checksum             |   (v2)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       IPvX Address(es)                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Authentication Data (v2 only, 8 bytes)        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```
//!
//! Checksums (RFC 1071 one's complement over the message with the checksum field zeroed):
//! - v2: the VRRP message only (IPv4 only; VRRPv2 has no IPv6 form).
//! - v3 over IPv6: message plus the IPv6 pseudo-header (next header 112).
//! - v3 over IPv4: keepalived and Wireshark add an IPv4 pseudo-header (src, dst, 0, 112,
//!   length) while RFC 9568's text says message only. [`ChecksumMode`] picks the form sent;
//!   [`Advertisement::decode`] accepts either and reports which one matched.
//!
//! Receive leniency, and why:
//! - Reserved bits (the top nibble of v3 bytes 4-5) are ignored, as RFC 5798 §5.2.5 asks.
//! - Bytes after the declared message (8 + count × address size, plus 8 auth bytes in v2)
//!   are accepted and ignored: RFC 5798 §7.1 only requires the packet to *contain* the
//!   complete message. keepalived drops such packets, but only because it compares against
//!   its own configured address count, which is a policy for the state machine, not the
//!   codec. The checksum is verified over the declared message first and, if that fails,
//!   over the whole payload (a sender that considers the trailer part of its message).
//! - A message shorter than what its count declares is [`DecodeError::LengthMismatch`]; one
//!   shorter than the 8-byte fixed header is [`DecodeError::Truncated`].
//!
//! Validation that needs configuration (VRID configured here, TTL 255, own packets, address
//! list equal to ours, v2 interval equal to ours) belongs to the driver and state machine.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use super::IPPROTO_VRRP;
use crate::vocab::{ChecksumMode, Family, Version};

/// Fixed part of every VRRP message: version/type, VRID, priority, count, interval, checksum.
const FIXED_HEADER_LEN: usize = 8;
/// VRRPv2 carries 8 bytes of (obsolete, always zero here) authentication data.
const V2_AUTH_DATA_LEN: usize = 8;
const TYPE_ADVERTISEMENT: u8 = 1;
const V2_AUTH_NONE: u8 = 0;
/// The count field is one byte.
const MAX_ADDRESSES: usize = 255;
const CHECKSUM_OFFSET: usize = 6;
const IPV4_HEADER_LEN: usize = 20;
const IPV6_HEADER_LEN: usize = 40;

/// Ethertype of IPv4 frames.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// Ethertype of IPv6 frames.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;
/// Ethertype of ARP frames.
pub const ETHERTYPE_ARP: u16 = 0x0806;

/// One decoded (or to-be-encoded) VRRP advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub version: Version,
    /// Virtual router identifier, 1-255.
    pub vrid: u8,
    /// 0 = master leaving, 1-254 backup, 255 = address owner.
    pub priority: u8,
    /// v3: Max Adver Int in centiseconds (12 bits, 1-4095). v2: Adver Int in seconds.
    pub interval: u16,
    /// Virtual addresses, all of one family.
    pub addresses: Vec<IpAddr>,
}

/// A successfully decoded advertisement and the checksum form that validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub advertisement: Advertisement,
    /// v3 over IPv4: the form the sender used (answer in the same form to stay compatible
    /// with peers that accept only one). v3 over IPv6: always [`ChecksumMode::PseudoHeader`]
    /// (the only form). v2: always [`ChecksumMode::MessageOnly`] (the only form). Encoding
    /// with this mode reproduces the sender's checksum in every case.
    pub checksum: ChecksumMode,
}

/// Why an advertisement could not be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    #[error("VRID 0 is not a valid virtual router identifier")]
    VridZero,
    #[error("an advertisement needs at least one address")]
    NoAddresses,
    #[error("{0} addresses do not fit the one-byte count (at most 255)")]
    TooManyAddresses(usize),
    #[error("IPv4 and IPv6 addresses cannot share one advertisement")]
    MixedFamilies,
    #[error("{addresses} addresses cannot be sent from {src} to {dst}")]
    FamilyMismatch {
        addresses: Family,
        src: Family,
        dst: Family,
    },
    #[error("VRRPv2 is defined for IPv4 only")]
    V2OverIpv6,
    #[error("interval {interval} is outside 1..={max} for VRRPv{version}")]
    IntervalOutOfRange {
        version: Version,
        interval: u16,
        max: u16,
    },
}

impl EncodeError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            EncodeError::VridZero => "vrid_zero",
            EncodeError::NoAddresses => "no_addresses",
            EncodeError::TooManyAddresses(_) => "too_many_addresses",
            EncodeError::MixedFamilies => "mixed_families",
            EncodeError::FamilyMismatch { .. } => "family_mismatch",
            EncodeError::V2OverIpv6 => "v2_over_ipv6",
            EncodeError::IntervalOutOfRange { .. } => "interval_out_of_range",
        }
    }
}

/// Why a received packet was discarded by the codec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the fixed VRRP header (8 bytes), or than the IPv4 header it claims.
    #[error("packet truncated")]
    Truncated,
    #[error("unsupported VRRP version {0}")]
    UnsupportedVersion(u8),
    #[error("unsupported VRRP packet type {0}")]
    UnsupportedType(u8),
    #[error("advertisement carries no addresses")]
    ZeroCount,
    #[error("advertisement interval is zero")]
    ZeroInterval,
    /// The message is shorter than its address count (and v2 authentication data) require.
    #[error("message needs {expected} bytes for its address count but has {actual}")]
    LengthMismatch { expected: usize, actual: usize },
    /// `computed` is the checksum the message should carry in the default form
    /// (pseudo-header for v3, message only for v2).
    #[error("bad checksum {received:#06x}, expected {computed:#06x}")]
    BadChecksum { received: u16, computed: u16 },
    /// Source and destination addresses are of different families.
    #[error("source and destination address families differ")]
    FamilyMismatch,
    #[error("VRRPv2 is defined for IPv4 only")]
    V2OverIpv6,
    #[error("VRID 0 is not a valid virtual router identifier")]
    VridZero,
    /// VRRPv2 simple-text and IP-AH authentication were removed by RFC 3768; only 0 is taken.
    #[error("unsupported VRRPv2 authentication type {0}")]
    UnsupportedAuth(u8),
    #[error("malformed IPv4 header: {reason}")]
    BadIpv4Header { reason: &'static str },
}

impl DecodeError {
    /// A bounded label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            DecodeError::Truncated => "truncated",
            DecodeError::UnsupportedVersion(_) => "unsupported_version",
            DecodeError::UnsupportedType(_) => "unsupported_type",
            DecodeError::ZeroCount => "zero_count",
            DecodeError::ZeroInterval => "zero_interval",
            DecodeError::LengthMismatch { .. } => "length_mismatch",
            DecodeError::BadChecksum { .. } => "bad_checksum",
            DecodeError::FamilyMismatch => "family_mismatch",
            DecodeError::V2OverIpv6 => "v2_over_ipv6",
            DecodeError::VridZero => "vrid_zero",
            DecodeError::UnsupportedAuth(_) => "unsupported_auth",
            DecodeError::BadIpv4Header { .. } => "bad_ipv4_header",
        }
    }
}

/// Source and destination of one packet, known to be of one family.
#[derive(Debug, Clone, Copy)]
enum Endpoints {
    V4(Ipv4Addr, Ipv4Addr),
    V6(Ipv6Addr, Ipv6Addr),
}

impl Endpoints {
    fn new(src: IpAddr, dst: IpAddr) -> Option<Endpoints> {
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => Some(Endpoints::V4(s, d)),
            (IpAddr::V6(s), IpAddr::V6(d)) => Some(Endpoints::V6(s, d)),
            _ => None,
        }
    }

    fn address_len(self) -> usize {
        match self {
            Endpoints::V4(..) => 4,
            Endpoints::V6(..) => 16,
        }
    }

    /// Sum of the pseudo-header words for a VRRP message of `len` bytes.
    fn pseudo_header_sum(self, len: usize) -> u64 {
        // Lengths come from slices, so they fit u64; the v4 field is 16 bits and the v6
        // field 32 bits, and both are summed as 16-bit words.
        let len = len as u64;
        match self {
            Endpoints::V4(s, d) => {
                let sum = sum_words(&s.octets(), 0);
                let sum = sum_words(&d.octets(), sum);
                sum + u64::from(IPPROTO_VRRP) + (len & 0xffff)
            }
            Endpoints::V6(s, d) => {
                let sum = sum_words(&s.octets(), 0);
                let sum = sum_words(&d.octets(), sum);
                sum + u64::from(IPPROTO_VRRP) + (len >> 16) + (len & 0xffff)
            }
        }
    }
}

/// Adds `data` as big-endian 16-bit words (odd tail padded with zero) to `acc`, unfolded.
/// A u64 accumulator cannot overflow for any slice that fits in memory.
fn sum_words(data: &[u8], mut acc: u64) -> u64 {
    let mut words = data.chunks_exact(2);
    for word in &mut words {
        acc += u64::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        acc += u64::from(*last) << 8;
    }
    acc
}

/// Folds carries back into 16 bits (one's complement addition).
fn fold(mut acc: u64) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    // The loop leaves at most 16 significant bits.
    acc as u16
}

impl Advertisement {
    /// The advertisement interval as a duration (centiseconds in v3, seconds in v2).
    pub fn interval_duration(&self) -> Duration {
        self.version.interval_from_wire(self.interval)
    }

    /// The family of the first address, `None` when there are none.
    pub fn family(&self) -> Option<Family> {
        self.addresses.first().map(Family::of)
    }

    /// Bytes [`Advertisement::encode_into`] appends, for sizing IP headers ahead of the
    /// message. Meaningful only for an advertisement that encodes without error.
    pub fn encoded_len(&self) -> usize {
        let address_len = match self.family() {
            Some(Family::V6) => 16,
            _ => 4,
        };
        let auth = match self.version {
            Version::V2 => V2_AUTH_DATA_LEN,
            Version::V3 => 0,
        };
        FIXED_HEADER_LEN + address_len * self.addresses.len() + auth
    }

    /// Encodes the message (not the IP header) into a new buffer. `src` and `dst` are the
    /// IP source and destination the packet will carry; they enter the v3 checksum.
    pub fn encode(
        &self,
        src: IpAddr,
        dst: IpAddr,
        mode: ChecksumMode,
    ) -> Result<Vec<u8>, EncodeError> {
        let mut buf = Vec::with_capacity(self.encoded_len());
        self.encode_into(src, dst, mode, &mut buf)?;
        Ok(buf)
    }

    /// Appends the message to `buf` and returns its length. Allocates only if `buf` lacks
    /// capacity, so a reused buffer makes the send path allocation-free. On error `buf` is
    /// left untouched.
    pub fn encode_into(
        &self,
        src: IpAddr,
        dst: IpAddr,
        mode: ChecksumMode,
        buf: &mut Vec<u8>,
    ) -> Result<usize, EncodeError> {
        let endpoints = self.validate(src, dst)?;
        let len = self.encoded_len();
        let start = buf.len();
        buf.reserve(len);

        buf.push((self.version.number() << 4) | TYPE_ADVERTISEMENT);
        buf.push(self.vrid);
        buf.push(self.priority);
        // validate() bounded the count to 255.
        buf.push(self.addresses.len() as u8);
        match self.version {
            Version::V3 => buf.extend_from_slice(&self.interval.to_be_bytes()),
            // validate() bounded the v2 interval to 255.
            Version::V2 => buf.extend_from_slice(&[V2_AUTH_NONE, self.interval as u8]),
        }
        buf.extend_from_slice(&[0, 0]);
        for address in &self.addresses {
            match address {
                IpAddr::V4(a) => buf.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => buf.extend_from_slice(&a.octets()),
            }
        }
        if self.version == Version::V2 {
            buf.extend_from_slice(&[0; V2_AUTH_DATA_LEN]);
        }

        let message = &buf[start..];
        let initial = match (self.version, endpoints, mode) {
            (Version::V2, _, _) | (Version::V3, Endpoints::V4(..), ChecksumMode::MessageOnly) => 0,
            (Version::V3, _, _) => endpoints.pseudo_header_sum(len),
        };
        let checksum = !fold(sum_words(message, initial));
        let at = start + CHECKSUM_OFFSET;
        buf[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
        Ok(len)
    }

    fn validate(&self, src: IpAddr, dst: IpAddr) -> Result<Endpoints, EncodeError> {
        if self.vrid == 0 {
            return Err(EncodeError::VridZero);
        }
        let Some(first) = self.addresses.first() else {
            return Err(EncodeError::NoAddresses);
        };
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(EncodeError::TooManyAddresses(self.addresses.len()));
        }
        let family = Family::of(first);
        if self.addresses.iter().any(|a| Family::of(a) != family) {
            return Err(EncodeError::MixedFamilies);
        }
        let endpoints = Endpoints::new(src, dst)
            .filter(|_| Family::of(&src) == family)
            .ok_or(EncodeError::FamilyMismatch {
                addresses: family,
                src: Family::of(&src),
                dst: Family::of(&dst),
            })?;
        if !self.version.carries(family) {
            return Err(EncodeError::V2OverIpv6);
        }
        let wire = self.version.wire_intervals();
        let max = *wire.end();
        if !wire.contains(&self.interval) {
            return Err(EncodeError::IntervalOutOfRange {
                version: self.version,
                interval: self.interval,
                max,
            });
        }
        Ok(endpoints)
    }

    /// Decodes a VRRP message (the IP payload) received from `src` for `dst`; both enter
    /// the v3 checksum. Allocates only the address list.
    pub fn decode(msg: &[u8], src: IpAddr, dst: IpAddr) -> Result<Decoded, DecodeError> {
        let &[
            version_type,
            vrid,
            priority,
            count,
            word2_hi,
            word2_lo,
            ck_hi,
            ck_lo,
            ..,
        ] = msg
        else {
            return Err(DecodeError::Truncated);
        };
        let version = match version_type >> 4 {
            2 => Version::V2,
            3 => Version::V3,
            other => return Err(DecodeError::UnsupportedVersion(other)),
        };
        let packet_type = version_type & 0x0f;
        if packet_type != TYPE_ADVERTISEMENT {
            return Err(DecodeError::UnsupportedType(packet_type));
        }
        let endpoints = Endpoints::new(src, dst).ok_or(DecodeError::FamilyMismatch)?;
        if version == Version::V2 && matches!(endpoints, Endpoints::V6(..)) {
            return Err(DecodeError::V2OverIpv6);
        }

        let address_len = endpoints.address_len();
        let addresses_end = FIXED_HEADER_LEN + address_len * usize::from(count);
        let declared_len = match version {
            Version::V2 => addresses_end + V2_AUTH_DATA_LEN,
            Version::V3 => addresses_end,
        };
        if msg.len() < declared_len {
            return Err(DecodeError::LengthMismatch {
                expected: declared_len,
                actual: msg.len(),
            });
        }

        let checksum = verify_checksum(
            msg,
            declared_len,
            version,
            endpoints,
            u16::from_be_bytes([ck_hi, ck_lo]),
        )?;

        if vrid == 0 {
            return Err(DecodeError::VridZero);
        }
        if count == 0 {
            return Err(DecodeError::ZeroCount);
        }
        let interval = match version {
            // The top nibble is reserved: ignored on receive.
            Version::V3 => u16::from_be_bytes([word2_hi & 0x0f, word2_lo]),
            Version::V2 => {
                if word2_hi != V2_AUTH_NONE {
                    return Err(DecodeError::UnsupportedAuth(word2_hi));
                }
                u16::from(word2_lo)
            }
        };
        if interval == 0 {
            return Err(DecodeError::ZeroInterval);
        }

        let raw_addresses = &msg[FIXED_HEADER_LEN..addresses_end];
        let mut addresses = Vec::with_capacity(usize::from(count));
        match endpoints {
            Endpoints::V4(..) => {
                let (octets, _) = raw_addresses.as_chunks::<4>();
                addresses.extend(octets.iter().map(|o| IpAddr::from(*o)));
            }
            Endpoints::V6(..) => {
                let (octets, _) = raw_addresses.as_chunks::<16>();
                addresses.extend(octets.iter().map(|o| IpAddr::from(*o)));
            }
        }

        Ok(Decoded {
            advertisement: Advertisement {
                version,
                vrid,
                priority,
                interval,
                addresses,
            },
            checksum,
        })
    }
}

/// Accepts the message if any checksum form valid for its version and family matches,
/// first over the declared length, then over the whole payload when there is a trailer.
fn verify_checksum(
    msg: &[u8],
    declared_len: usize,
    version: Version,
    endpoints: Endpoints,
    received: u16,
) -> Result<ChecksumMode, DecodeError> {
    // Summing the received checksum along with the data gives 0xffff for a valid message
    // (RFC 1071 §1), which also accepts either representation of zero.
    let matches = |len: usize, message_sum: u64| -> Option<ChecksumMode> {
        let valid = |sum: u64| fold(sum) == 0xffff;
        match (version, endpoints) {
            (Version::V2, _) => valid(message_sum).then_some(ChecksumMode::MessageOnly),
            (Version::V3, Endpoints::V6(..)) => {
                valid(message_sum + endpoints.pseudo_header_sum(len))
                    .then_some(ChecksumMode::PseudoHeader)
            }
            (Version::V3, Endpoints::V4(..)) => {
                if valid(message_sum + endpoints.pseudo_header_sum(len)) {
                    Some(ChecksumMode::PseudoHeader)
                } else {
                    valid(message_sum).then_some(ChecksumMode::MessageOnly)
                }
            }
        }
    };

    let declared_sum = sum_words(&msg[..declared_len], 0);
    if let Some(mode) = matches(declared_len, declared_sum) {
        return Ok(mode);
    }
    if msg.len() > declared_len {
        // declared_len is a multiple of 4, so the trailer's words pair up as in the whole.
        let whole_sum = sum_words(&msg[declared_len..], declared_sum);
        if let Some(mode) = matches(msg.len(), whole_sum) {
            return Ok(mode);
        }
    }

    let zeroed_sum = declared_sum - u64::from(received);
    let computed = match version {
        Version::V2 => !fold(zeroed_sum),
        Version::V3 => !fold(zeroed_sum + endpoints.pseudo_header_sum(declared_len)),
    };
    Err(DecodeError::BadChecksum { received, computed })
}

/// The fields of a received IPv4 header that VRRP reception needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Info {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    /// Must be 255 for VRRP (checked by the caller, which knows about unicast peers).
    pub ttl: u8,
    pub protocol: u8,
}

/// Splits a received IPv4 datagram (as a Linux raw IPv4 socket or AF_PACKET delivers it)
/// into its header fields and payload. Options (IHL > 5) are skipped; bytes past the total
/// length (Ethernet padding of short frames) are cut off. The header checksum is not
/// verified: the kernel already has, and rewrites some options in place without fixing it.
pub fn parse_ipv4(datagram: &[u8]) -> Result<(Ipv4Info, &[u8]), DecodeError> {
    let Some(header) = datagram.get(..IPV4_HEADER_LEN) else {
        return Err(DecodeError::Truncated);
    };
    if header[0] >> 4 != 4 {
        return Err(DecodeError::BadIpv4Header {
            reason: "version is not 4",
        });
    }
    let header_len = usize::from(header[0] & 0x0f) * 4;
    if header_len < IPV4_HEADER_LEN {
        return Err(DecodeError::BadIpv4Header {
            reason: "header length below 20 bytes",
        });
    }
    let total_len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if total_len < header_len {
        return Err(DecodeError::BadIpv4Header {
            reason: "total length below header length",
        });
    }
    let payload = datagram
        .get(header_len..total_len)
        .ok_or(DecodeError::Truncated)?;
    let info = Ipv4Info {
        src: Ipv4Addr::new(header[12], header[13], header[14], header[15]),
        dst: Ipv4Addr::new(header[16], header[17], header[18], header[19]),
        ttl: header[8],
        protocol: header[9],
    };
    Ok((info, payload))
}

/// An IPv4 header (no options, ID 0, no fragmentation, protocol 112) with its checksum,
/// for sending through AF_PACKET or an IP_HDRINCL socket. VRRP sends TTL 255 and TOS 0xc0
/// (network control, as keepalived does). `payload_len` must leave room for the header in
/// the 16-bit total length; VRRP messages are at most 4088 bytes.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, payload_len: u16, ttl: u8, tos: u8) -> [u8; 20] {
    debug_assert!(usize::from(payload_len) <= usize::from(u16::MAX) - IPV4_HEADER_LEN);
    let total_len = payload_len.saturating_add(IPV4_HEADER_LEN as u16);
    let mut header = [0u8; IPV4_HEADER_LEN];
    header[0] = 0x45;
    header[1] = tos;
    header[2..4].copy_from_slice(&total_len.to_be_bytes());
    header[8] = ttl;
    header[9] = IPPROTO_VRRP;
    header[12..16].copy_from_slice(&src.octets());
    header[16..20].copy_from_slice(&dst.octets());
    let checksum = !fold(sum_words(&header, 0));
    header[10..12].copy_from_slice(&checksum.to_be_bytes());
    header
}

/// An IPv6 header (traffic class 0, flow label 0, next header 112) for AF_PACKET sends.
pub fn ipv6_header(src: Ipv6Addr, dst: Ipv6Addr, payload_len: u16, hop_limit: u8) -> [u8; 40] {
    let mut header = [0u8; IPV6_HEADER_LEN];
    header[0] = 0x60;
    header[4..6].copy_from_slice(&payload_len.to_be_bytes());
    header[6] = IPPROTO_VRRP;
    header[7] = hop_limit;
    header[8..24].copy_from_slice(&src.octets());
    header[24..40].copy_from_slice(&dst.octets());
    header
}

/// An Ethernet II header; see [`ethernet_frame`].
pub fn ethernet_header(dst_mac: [u8; 6], src_mac: [u8; 6], ethertype: u16) -> [u8; 14] {
    let mut header = [0u8; 14];
    header[..6].copy_from_slice(&dst_mac);
    header[6..12].copy_from_slice(&src_mac);
    header[12..].copy_from_slice(&ethertype.to_be_bytes());
    header
}

/// An Ethernet II frame without FCS or padding (the NIC adds both).
pub fn ethernet_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ethertype: u16,
    payload: &[u8],
) -> Vec<u8> {
    let header = ethernet_header(dst_mac, src_mac, ethertype);
    let mut frame = Vec::with_capacity(header.len() + payload.len());
    frame.extend_from_slice(&header);
    frame.extend_from_slice(payload);
    frame
}

/// The VRRP virtual router MAC: 00:00:5e:00:01:{VRID} for IPv4, 00:00:5e:00:02:{VRID} for
/// IPv6 (RFC 5798 §7.3).
pub fn virtual_mac(family: Family, vrid: u8) -> [u8; 6] {
    let family_octet = match family {
        Family::V4 => 0x01,
        Family::V6 => 0x02,
    };
    [0x00, 0x00, 0x5e, 0x00, family_octet, vrid]
}

/// The Ethernet group address a multicast IP destination maps to (RFC 1112 §6.4 for IPv4,
/// RFC 2464 §7 for IPv6). `None` for a unicast destination, whose MAC needs ARP/ND.
pub fn multicast_mac(dst: IpAddr) -> Option<[u8; 6]> {
    match dst {
        IpAddr::V4(a) if a.is_multicast() => {
            let o = a.octets();
            Some([0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]])
        }
        IpAddr::V6(a) if a.is_multicast() => {
            let o = a.octets();
            Some([0x33, 0x33, o[12], o[13], o[14], o[15]])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10));
    const DST4: IpAddr = IpAddr::V4(Ipv4Addr::new(224, 0, 0, 18));
    const SRC6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa));
    const DST6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12));

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// Vector A of the shared VRRP facts (v3, IPv4, pseudo-header checksum).
    fn vector_a() -> Vec<u8> {
        hex("3133640100640619c0a80164")
    }

    fn advert_v3_v4() -> Advertisement {
        Advertisement {
            version: Version::V3,
            vrid: 51,
            priority: 100,
            interval: 100,
            addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 1, 100))],
        }
    }

    /// Rewrites the checksum of a hand-made message so that only the field under test is
    /// wrong: pseudo-header form for v3, message only for v2.
    fn fix_checksum(mut msg: Vec<u8>, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        msg[6] = 0;
        msg[7] = 0;
        let endpoints = Endpoints::new(src, dst).unwrap();
        let initial = if msg[0] >> 4 == 3 {
            endpoints.pseudo_header_sum(msg.len())
        } else {
            0
        };
        let checksum = !fold(sum_words(&msg, initial));
        msg[6..8].copy_from_slice(&checksum.to_be_bytes());
        msg
    }

    fn decode_err(msg: &[u8], src: IpAddr, dst: IpAddr) -> DecodeError {
        Advertisement::decode(msg, src, dst).unwrap_err()
    }

    #[test]
    fn checksum_of_rfc1071_example() {
        // RFC 1071 §3 worked example: words 0001 f203 f4f5 f6f7 sum to ddf2 after folding.
        assert_eq!(fold(sum_words(&hex("0001f203f4f5f6f7"), 0)), 0xddf2);
        // An odd tail is padded with a zero byte.
        assert_eq!(fold(sum_words(&[0x12, 0x34, 0x56], 0)), 0x1234 + 0x5600);
    }

    #[test]
    fn truncated_below_fixed_header() {
        let a = vector_a();
        for len in 0..FIXED_HEADER_LEN {
            assert_eq!(decode_err(&a[..len], SRC4, DST4), DecodeError::Truncated);
        }
    }

    #[test]
    fn unsupported_version_and_type() {
        for version in [0u8, 1, 4, 15] {
            let mut msg = vector_a();
            msg[0] = (version << 4) | 1;
            assert_eq!(
                decode_err(&msg, SRC4, DST4),
                DecodeError::UnsupportedVersion(version)
            );
        }
        for packet_type in [0u8, 2, 15] {
            let mut msg = vector_a();
            msg[0] = 0x30 | packet_type;
            assert_eq!(
                decode_err(&msg, SRC4, DST4),
                DecodeError::UnsupportedType(packet_type)
            );
        }
    }

    #[test]
    fn zero_count_with_valid_checksum() {
        let msg = fix_checksum(hex("3133640000640000"), SRC4, DST4);
        assert_eq!(decode_err(&msg, SRC4, DST4), DecodeError::ZeroCount);
    }

    #[test]
    fn zero_interval_v3_even_with_reserved_bits_set() {
        let mut msg = vector_a();
        msg[4] = 0xf0;
        msg[5] = 0x00;
        let msg = fix_checksum(msg, SRC4, DST4);
        assert_eq!(decode_err(&msg, SRC4, DST4), DecodeError::ZeroInterval);
    }

    #[test]
    fn zero_interval_v2() {
        let msg = fix_checksum(hex("2133640100000000c0a801640000000000000000"), SRC4, DST4);
        assert_eq!(decode_err(&msg, SRC4, DST4), DecodeError::ZeroInterval);
    }

    #[test]
    fn reserved_bits_are_ignored() {
        let mut msg = vector_a();
        msg[4] |= 0xf0;
        let msg = fix_checksum(msg, SRC4, DST4);
        let decoded = Advertisement::decode(&msg, SRC4, DST4).unwrap();
        assert_eq!(decoded.advertisement, advert_v3_v4());
    }

    #[test]
    fn length_mismatch_when_count_exceeds_payload() {
        let a = vector_a();
        assert_eq!(
            decode_err(&a[..11], SRC4, DST4),
            DecodeError::LengthMismatch {
                expected: 12,
                actual: 11
            }
        );
        let mut two = a.clone();
        two[3] = 2;
        assert_eq!(
            decode_err(&two, SRC4, DST4),
            DecodeError::LengthMismatch {
                expected: 16,
                actual: 12
            }
        );
        // Over IPv6 the same count needs 16 bytes per address.
        assert_eq!(
            decode_err(&a, SRC6, DST6),
            DecodeError::LengthMismatch {
                expected: 24,
                actual: 12
            }
        );
        // v2 without its 8 authentication bytes.
        let v2 = hex("213364010001b8bdc0a80164");
        assert_eq!(
            decode_err(&v2, SRC4, DST4),
            DecodeError::LengthMismatch {
                expected: 20,
                actual: 12
            }
        );
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let mut msg = vector_a();
        msg.extend_from_slice(&[0xde, 0xad, 0xbe]);
        let decoded = Advertisement::decode(&msg, SRC4, DST4).unwrap();
        assert_eq!(decoded.advertisement, advert_v3_v4());
        assert_eq!(decoded.checksum, ChecksumMode::PseudoHeader);
    }

    #[test]
    fn trailing_bytes_covered_by_the_checksum_are_accepted() {
        // A sender that counts its trailer as part of the message (checksum and pseudo-header
        // length over all 16 bytes).
        let mut msg = vector_a();
        msg.extend_from_slice(&[0, 0, 0, 0x2a]);
        let msg = fix_checksum(msg, SRC4, DST4);
        let decoded = Advertisement::decode(&msg, SRC4, DST4).unwrap();
        assert_eq!(decoded.advertisement, advert_v3_v4());
        assert_eq!(decoded.checksum, ChecksumMode::PseudoHeader);
    }

    #[test]
    fn bad_checksum_reports_received_and_computed() {
        let mut msg = vector_a();
        msg[7] ^= 0x01;
        assert_eq!(
            decode_err(&msg, SRC4, DST4),
            DecodeError::BadChecksum {
                received: 0x0618,
                computed: 0x0619
            }
        );
        // A corrupted address is caught too.
        let mut msg = vector_a();
        msg[11] = 0x65;
        assert!(matches!(
            decode_err(&msg, SRC4, DST4),
            DecodeError::BadChecksum {
                received: 0x0619,
                ..
            }
        ));
        // The pseudo-header binds the message to its addresses.
        let other_src = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 11));
        assert!(matches!(
            decode_err(&vector_a(), other_src, DST4),
            DecodeError::BadChecksum { .. }
        ));
    }

    #[test]
    fn family_mismatch_and_v2_over_ipv6() {
        assert_eq!(
            decode_err(&vector_a(), SRC4, DST6),
            DecodeError::FamilyMismatch
        );
        assert_eq!(
            decode_err(&vector_a(), SRC6, DST4),
            DecodeError::FamilyMismatch
        );
        let v2 = hex("213364010001b8bdc0a801640000000000000000");
        assert_eq!(decode_err(&v2, SRC6, DST6), DecodeError::V2OverIpv6);
    }

    #[test]
    fn vrid_zero() {
        let mut msg = vector_a();
        msg[1] = 0;
        let msg = fix_checksum(msg, SRC4, DST4);
        assert_eq!(decode_err(&msg, SRC4, DST4), DecodeError::VridZero);
    }

    #[test]
    fn v2_authentication_other_than_none() {
        for auth in [1u8, 2, 254] {
            let mut msg = hex("213364010001b8bdc0a801640000000000000000");
            msg[4] = auth;
            let msg = fix_checksum(msg, SRC4, DST4);
            assert_eq!(
                decode_err(&msg, SRC4, DST4),
                DecodeError::UnsupportedAuth(auth)
            );
        }
    }

    #[test]
    fn either_representation_of_a_zero_checksum_is_accepted() {
        // Vector A's message-only checksum is 0xa85a; adding it to the address's low word
        // makes the zeroed sum 0xffff, so the checksum comes out as 0x0000. RFC 1071
        // verification (the sum including the field is all ones) must accept 0xffff too.
        let advert = Advertisement {
            addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 168, 0xa9, 0xbe))],
            ..advert_v3_v4()
        };
        let mut msg = advert
            .encode(SRC4, DST4, ChecksumMode::MessageOnly)
            .unwrap();
        assert_eq!(msg[6..8], [0, 0]);
        assert_eq!(
            Advertisement::decode(&msg, SRC4, DST4).unwrap().checksum,
            ChecksumMode::MessageOnly
        );
        msg[6] = 0xff;
        msg[7] = 0xff;
        assert_eq!(
            Advertisement::decode(&msg, SRC4, DST4)
                .unwrap()
                .advertisement,
            advert
        );
    }

    #[test]
    fn encode_errors() {
        let base = advert_v3_v4();
        let encode = |a: &Advertisement, src, dst| a.encode(src, dst, ChecksumMode::default());

        let a = Advertisement {
            vrid: 0,
            ..base.clone()
        };
        assert_eq!(encode(&a, SRC4, DST4), Err(EncodeError::VridZero));

        let a = Advertisement {
            addresses: vec![],
            ..base.clone()
        };
        assert_eq!(encode(&a, SRC4, DST4), Err(EncodeError::NoAddresses));

        let many = (0..256u32).map(|i| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)));
        let a = Advertisement {
            addresses: many.collect(),
            ..base.clone()
        };
        assert_eq!(
            encode(&a, SRC4, DST4),
            Err(EncodeError::TooManyAddresses(256))
        );

        let a = Advertisement {
            addresses: vec![base.addresses[0], SRC6],
            ..base.clone()
        };
        assert_eq!(encode(&a, SRC4, DST4), Err(EncodeError::MixedFamilies));

        let mismatch = EncodeError::FamilyMismatch {
            addresses: Family::V4,
            src: Family::V6,
            dst: Family::V6,
        };
        assert_eq!(encode(&base, SRC6, DST6), Err(mismatch));
        let mismatch = EncodeError::FamilyMismatch {
            addresses: Family::V4,
            src: Family::V4,
            dst: Family::V6,
        };
        assert_eq!(encode(&base, SRC4, DST6), Err(mismatch));

        let a = Advertisement {
            version: Version::V2,
            interval: 1,
            addresses: vec![SRC6],
            ..base.clone()
        };
        assert_eq!(encode(&a, SRC6, DST6), Err(EncodeError::V2OverIpv6));

        for (version, interval, max) in [
            (Version::V3, 0, 4095),
            (Version::V3, 4096, 4095),
            (Version::V2, 0, 255),
            (Version::V2, 256, 255),
        ] {
            let a = Advertisement {
                version,
                interval,
                ..base.clone()
            };
            assert_eq!(
                encode(&a, SRC4, DST4),
                Err(EncodeError::IntervalOutOfRange {
                    version,
                    interval,
                    max
                })
            );
        }
        // The bounds themselves are valid.
        for (version, interval) in [(Version::V3, 1), (Version::V3, 4095), (Version::V2, 255)] {
            let a = Advertisement {
                version,
                interval,
                ..base.clone()
            };
            let msg = encode(&a, SRC4, DST4).unwrap();
            assert_eq!(
                Advertisement::decode(&msg, SRC4, DST4)
                    .unwrap()
                    .advertisement,
                a
            );
        }
    }

    #[test]
    fn encode_into_appends_without_reallocating_and_leaves_buffer_alone_on_error() {
        let advert = advert_v3_v4();
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(b"prefix");
        let ptr = buf.as_ptr();
        let written = advert
            .encode_into(SRC4, DST4, ChecksumMode::PseudoHeader, &mut buf)
            .unwrap();
        assert_eq!(written, advert.encoded_len());
        assert_eq!(&buf[..6], b"prefix");
        assert_eq!(&buf[6..], vector_a().as_slice());
        assert_eq!(
            buf.as_ptr(),
            ptr,
            "encode_into reallocated a large enough buffer"
        );

        let before = buf.clone();
        let bad = Advertisement { vrid: 0, ..advert };
        assert!(
            bad.encode_into(SRC4, DST4, ChecksumMode::PseudoHeader, &mut buf)
                .is_err()
        );
        assert_eq!(buf, before);
    }

    #[test]
    fn max_count_round_trips_in_both_families() {
        for (src, dst, make) in [
            (
                SRC4,
                DST4,
                (|i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i))) as fn(u32) -> IpAddr,
            ),
            (SRC6, DST6, |i: u32| {
                IpAddr::V6(Ipv6Addr::from(0x2001_0db8_u128 << 96 | u128::from(i)))
            }),
        ] {
            let advert = Advertisement {
                version: Version::V3,
                vrid: 255,
                priority: 255,
                interval: 4095,
                addresses: (0..255).map(make).collect(),
            };
            let msg = advert.encode(src, dst, ChecksumMode::PseudoHeader).unwrap();
            assert_eq!(msg.len(), advert.encoded_len());
            assert_eq!(msg[3], 255);
            assert_eq!(
                Advertisement::decode(&msg, src, dst).unwrap().advertisement,
                advert
            );
        }
    }

    #[test]
    fn parse_ipv4_rejects_malformed_headers() {
        let datagram = {
            let mut d = ipv4_header(
                Ipv4Addr::new(192, 168, 1, 10),
                Ipv4Addr::new(224, 0, 0, 18),
                12,
                255,
                0xc0,
            )
            .to_vec();
            d.extend_from_slice(&vector_a());
            d
        };
        assert_eq!(parse_ipv4(&datagram[..19]), Err(DecodeError::Truncated));
        // Total length claims more than was received.
        assert_eq!(parse_ipv4(&datagram[..31]), Err(DecodeError::Truncated));

        let mut v6 = datagram.clone();
        v6[0] = 0x65;
        assert_eq!(
            parse_ipv4(&v6).unwrap_err().metric_label(),
            "bad_ipv4_header"
        );
        let mut short_ihl = datagram.clone();
        short_ihl[0] = 0x44;
        assert!(matches!(
            parse_ipv4(&short_ihl),
            Err(DecodeError::BadIpv4Header { .. })
        ));
        let mut short_total = datagram.clone();
        short_total[2..4].copy_from_slice(&19u16.to_be_bytes());
        assert!(matches!(
            parse_ipv4(&short_total),
            Err(DecodeError::BadIpv4Header { .. })
        ));
        // IHL pointing past the received bytes.
        let mut long_ihl = datagram[..20].to_vec();
        long_ihl[0] = 0x4f;
        long_ihl[2..4].copy_from_slice(&60u16.to_be_bytes());
        assert_eq!(parse_ipv4(&long_ihl), Err(DecodeError::Truncated));
    }

    #[test]
    fn parse_ipv4_skips_options_and_padding() {
        // IHL 6: one Router Alert option (RFC 2113), as some stacks add to multicast.
        let mut datagram = hex("46c0002400000000ff700000c0a8010ae000001294040000");
        datagram.extend_from_slice(&vector_a());
        // Ethernet minimum-frame padding after the datagram.
        datagram.extend_from_slice(&[0; 10]);
        let (info, payload) = parse_ipv4(&datagram).unwrap();
        assert_eq!(
            info,
            Ipv4Info {
                src: Ipv4Addr::new(192, 168, 1, 10),
                dst: Ipv4Addr::new(224, 0, 0, 18),
                ttl: 255,
                protocol: IPPROTO_VRRP,
            }
        );
        assert_eq!(payload, vector_a().as_slice());
    }

    #[test]
    fn ipv4_header_checksum_verifies() {
        let header = ipv4_header(
            Ipv4Addr::new(10, 1, 0, 3),
            Ipv4Addr::new(10, 1, 0, 1),
            12,
            255,
            0xc0,
        );
        assert_eq!(fold(sum_words(&header, 0)), 0xffff);
    }

    #[test]
    fn macs() {
        assert_eq!(virtual_mac(Family::V4, 51), [0, 0, 0x5e, 0, 1, 0x33]);
        assert_eq!(virtual_mac(Family::V6, 255), [0, 0, 0x5e, 0, 2, 0xff]);
        assert_eq!(
            multicast_mac(DST4),
            Some([0x01, 0x00, 0x5e, 0x00, 0x00, 0x12])
        );
        // Only the low 23 bits of the group map into the MAC.
        assert_eq!(
            multicast_mac(IpAddr::V4(Ipv4Addr::new(239, 129, 2, 3))),
            Some([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03])
        );
        assert_eq!(
            multicast_mac(DST6),
            Some([0x33, 0x33, 0x00, 0x00, 0x00, 0x12])
        );
        assert_eq!(multicast_mac(SRC4), None);
        assert_eq!(multicast_mac(SRC6), None);
    }

    #[test]
    fn metric_labels_are_distinct_snake_case() {
        let decode = [
            DecodeError::Truncated,
            DecodeError::UnsupportedVersion(4),
            DecodeError::UnsupportedType(2),
            DecodeError::ZeroCount,
            DecodeError::ZeroInterval,
            DecodeError::LengthMismatch {
                expected: 1,
                actual: 0,
            },
            DecodeError::BadChecksum {
                received: 0,
                computed: 1,
            },
            DecodeError::FamilyMismatch,
            DecodeError::V2OverIpv6,
            DecodeError::VridZero,
            DecodeError::UnsupportedAuth(1),
            DecodeError::BadIpv4Header { reason: "x" },
        ];
        let encode = [
            EncodeError::VridZero,
            EncodeError::NoAddresses,
            EncodeError::TooManyAddresses(256),
            EncodeError::MixedFamilies,
            EncodeError::FamilyMismatch {
                addresses: Family::V4,
                src: Family::V6,
                dst: Family::V6,
            },
            EncodeError::V2OverIpv6,
            EncodeError::IntervalOutOfRange {
                version: Version::V3,
                interval: 0,
                max: 4095,
            },
        ];
        for labels in [
            decode
                .iter()
                .map(DecodeError::metric_label)
                .collect::<Vec<_>>(),
            encode
                .iter()
                .map(EncodeError::metric_label)
                .collect::<Vec<_>>(),
        ] {
            let unique: std::collections::HashSet<_> = labels.iter().collect();
            assert_eq!(unique.len(), labels.len(), "{labels:?}");
            for label in labels {
                assert!(
                    label
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())
                );
            }
        }
    }
}
