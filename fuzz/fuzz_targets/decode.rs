//! Decodes arbitrary bytes as a VRRP message under IPv4 and IPv6 endpoints, and as an IPv4
//! datagram. Whatever decodes must re-encode, with the checksum form that matched, to a
//! message that decodes to the same advertisement.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrovip::vrrp::packet::{Advertisement, parse_ipv4};
use ferrovip::vrrp::{IPPROTO_VRRP, MULTICAST_V4, MULTICAST_V6};
use libfuzzer_sys::fuzz_target;

const ENDPOINTS: [(IpAddr, IpAddr); 2] = [
    (
        IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
        IpAddr::V4(MULTICAST_V4),
    ),
    (
        IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xa)),
        IpAddr::V6(MULTICAST_V6),
    ),
];

fn check_round_trip(msg: &[u8], src: IpAddr, dst: IpAddr) {
    let Ok(decoded) = Advertisement::decode(msg, src, dst) else {
        return;
    };
    let encoded = decoded
        .advertisement
        .encode(src, dst, decoded.checksum)
        .expect("a decoded advertisement must re-encode");
    let again =
        Advertisement::decode(&encoded, src, dst).expect("a re-encoded message must decode");
    assert_eq!(again, decoded);
}

fuzz_target!(|data: &[u8]| {
    for (src, dst) in ENDPOINTS {
        check_round_trip(data, src, dst);
    }
    // The same bytes as a received IPv4 datagram, the way the raw-socket driver sees them.
    if let Ok((info, payload)) = parse_ipv4(data)
        && info.protocol == IPPROTO_VRRP
    {
        check_round_trip(payload, info.src.into(), info.dst.into());
    }
});
