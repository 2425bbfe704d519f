//! Gratuitous ARP and unsolicited NA on a real veth pair between two network namespaces.
//! Needs root (creates namespaces).

mod netns_util;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrovip::node::announce::{Announcer, garp_frame, unsolicited_na_frame};
use netns_util::Netns;
use pnet_datalink::Channel;

const VMAC_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];
const OLD_MASTER_MAC: &str = "02:00:00:00:00:99";

/// Opens a capture on `ifname` (in the calling thread's namespace), reports readiness, and
/// collects frames for which `wanted` holds until `count` arrived or `within` passed.
fn capture(
    ifname: &str,
    ready: mpsc::Sender<()>,
    count: usize,
    within: Duration,
    wanted: impl Fn(&[u8]) -> bool,
) -> Vec<Vec<u8>> {
    let interface = pnet_datalink::interfaces()
        .into_iter()
        .find(|i| i.name == ifname)
        .unwrap_or_else(|| panic!("no interface {ifname}"));
    let config = pnet_datalink::Config {
        read_timeout: Some(Duration::from_millis(100)),
        promiscuous: false,
        ..Default::default()
    };
    let Ok(Channel::Ethernet(_, mut rx)) = pnet_datalink::channel(&interface, config) else {
        panic!("cannot open a capture on {ifname}");
    };
    ready.send(()).unwrap();
    let deadline = Instant::now() + within;
    let mut frames = Vec::new();
    while frames.len() < count && Instant::now() < deadline {
        match rx.next() {
            Ok(frame) if wanted(frame) => frames.push(frame.to_vec()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => panic!("capture failed: {e}"),
        }
    }
    frames
}

fn is_arp_or_na(frame: &[u8]) -> bool {
    let ethertype = frame.get(12..14);
    ethertype == Some(&[0x08, 0x06])
        || (ethertype == Some(&[0x86, 0xdd])
            && frame.get(20) == Some(&58)
            && frame.get(54) == Some(&136))
}

/// Two namespaces joined by veth `va` (sender side) — `vb` (receiver side).
fn veth_pair() -> (Netns, Netns) {
    let a = Netns::new("ann-a");
    let b = Netns::new("ann-b");
    a.ip(&[
        "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &b.name,
    ]);
    a.ip(&["addr", "add", "192.0.2.1/24", "dev", "va"]);
    a.ip(&["link", "set", "va", "up"]);
    b.ip(&["addr", "add", "192.0.2.2/24", "dev", "vb"]);
    b.ip(&["-6", "addr", "add", "2001:db8::2/64", "dev", "vb", "nodad"]);
    b.ip(&["link", "set", "vb", "up"]);
    // IPv6 accepts multicast (the NA goes to ff02::1) only once the kernel has configured
    // the link, which link-watch does some hundreds of milliseconds after carrier.
    netns_util::wait_until("IPv6 multicast route on vb", Duration::from_secs(5), || {
        b.ip(&["-6", "route", "show", "table", "local", "dev", "vb"])
            .contains("multicast ff00::/8")
    });
    // The receiver still has the VIPs at the previous master's MAC.
    for vip in ["192.0.2.100", "2001:db8::100"] {
        b.ip(&[
            "neigh",
            "replace",
            vip,
            "lladdr",
            OLD_MASTER_MAC,
            "dev",
            "vb",
            "nud",
            "stale",
        ]);
    }
    (a, b)
}

#[test]
fn netns_announce_garp_and_na_reach_the_peer_and_update_its_neighbour_cache() {
    let (a, b) = veth_pair();
    let vip4 = Ipv4Addr::new(192, 0, 2, 100);
    let vip6: Ipv6Addr = "2001:db8::100".parse().unwrap();
    let source: Ipv6Addr = "fe80::1".parse().unwrap();
    let expected_garp = garp_frame(VMAC_51, vip4);
    let expected_na = unsolicited_na_frame(VMAC_51, vip6, source);
    let announcer = Announcer {
        repeat: 3,
        interval: Duration::from_millis(20),
        rate: 0,
    };

    let (ready_tx, ready_rx) = mpsc::channel();
    let (received, sent) = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            b.enter(|| {
                capture("vb", ready_tx, 6, Duration::from_secs(5), |frame| {
                    is_arp_or_na(frame) && frame[6..12] == VMAC_51
                })
            })
        });
        ready_rx.recv().expect("capture ready");
        let sent = a.enter(|| {
            announcer
                .announce(
                    "va",
                    VMAC_51,
                    &[IpAddr::V4(vip4), IpAddr::V6(vip6)],
                    Some(source),
                )
                .expect("announce")
        });
        (receiver.join().unwrap(), sent)
    });

    assert_eq!(sent, 6);
    assert_eq!(received.len(), 6, "received {received:02x?}");
    assert_eq!(received.iter().filter(|f| **f == expected_garp).count(), 3);
    assert_eq!(received.iter().filter(|f| **f == expected_na).count(), 3);

    // The peer's kernel accepted both (so the ICMPv6 checksum is right) and replaced the old
    // master's MAC (so the GARP counts as gratuitous and the NA has the override flag).
    let neigh4 = b.ip(&["neigh", "show", "192.0.2.100", "dev", "vb"]);
    assert!(neigh4.contains("lladdr 00:00:5e:00:01:33"), "{neigh4}");
    let neigh6 = b.ip(&["-6", "neigh", "show", "2001:db8::100", "dev", "vb"]);
    assert!(neigh6.contains("lladdr 00:00:5e:00:01:33"), "{neigh6}");
}

#[test]
fn netns_announce_socket_receives_nothing_while_open() {
    // The sending socket is bound to protocol 0: it must not show up as a packet tap that
    // copies the interface's traffic. /proc/thread-self/net/packet lists every packet socket of the
    // namespace with its protocol; during a slow burst only ours exists.
    let (a, _b) = veth_pair();
    let announcer = Announcer {
        repeat: 20,
        interval: Duration::from_millis(25),
        rate: 0,
    };
    let vip = [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100))];
    let listing = a.enter(|| {
        std::thread::scope(|scope| {
            let sender = scope.spawn(|| announcer.announce("va", VMAC_51, &vip, None));
            std::thread::sleep(Duration::from_millis(200));
            let listing = std::fs::read_to_string("/proc/thread-self/net/packet").unwrap();
            assert_eq!(sender.join().unwrap().unwrap(), 20);
            listing
        })
    });
    let sockets: Vec<&str> = listing.lines().skip(1).collect();
    assert_eq!(sockets.len(), 1, "{listing}");
    // Columns: sk RefCnt Type Proto Iface R Rmem User Inode.
    let columns: Vec<&str> = sockets[0].split_whitespace().collect();
    assert_eq!(columns[3], "0000", "protocol of {listing}");
    assert_eq!(columns[5], "0", "not running: {listing}");
}

#[test]
fn netns_announce_on_a_down_interface_is_a_send_error() {
    let (a, _b) = veth_pair();
    a.ip(&["link", "set", "va", "down"]);
    let error = a
        .enter(|| {
            Announcer::default().announce(
                "va",
                VMAC_51,
                &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100))],
                None,
            )
        })
        .unwrap_err();
    assert_eq!(error.metric_label(), "send", "{error:?}");
}

/// A frame captured with its kernel receive timestamp.
struct Stamped {
    at: Duration,
    frame: Vec<u8>,
}

/// Captures on every interface of the calling thread's namespace (an `ETH_P_ALL` packet
/// socket with a large buffer, so that a burst of thousands is not dropped, and kernel
/// timestamps, so that the reader's scheduling does not count), reports readiness, and
/// collects frames from `mac` until `count` arrived or `within` passed.
fn capture_stamped(
    ready: mpsc::Sender<()>,
    mac: [u8; 6],
    count: usize,
    within: Duration,
) -> Vec<Stamped> {
    use nix::sys::socket::{
        AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType, recvmsg,
        setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("packet socket");
    setsockopt(&fd, sockopt::RcvBufForce, &(256 << 20)).expect("SO_RCVBUFFORCE");
    setsockopt(&fd, sockopt::ReceiveTimestampns, &true).expect("SO_TIMESTAMPNS");
    let timeout = nix::sys::time::TimeVal::new(0, 100_000);
    setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).expect("SO_RCVTIMEO");
    ready.send(()).unwrap();
    let deadline = Instant::now() + within;
    let mut frames = Vec::with_capacity(count);
    let mut buf = [0u8; 2048];
    while frames.len() < count && Instant::now() < deadline {
        let mut iov = [std::io::IoSliceMut::new(&mut buf)];
        let mut cmsg = nix::cmsg_space!(nix::sys::time::TimeSpec);
        let (len, at) =
            match recvmsg::<()>(fd.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty()) {
                Ok(msg) => {
                    let at = msg.cmsgs().unwrap().find_map(|c| match c {
                        ControlMessageOwned::ScmTimestampns(t) => Some(Duration::from(t)),
                        _ => None,
                    });
                    (msg.bytes, at.expect("kernel timestamp"))
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
                Err(e) => panic!("capture failed: {e}"),
            };
        let frame = &buf[..len];
        if frame.len() >= 14 && frame[6..12] == mac && is_arp_or_na(frame) {
            frames.push(Stamped {
                at,
                frame: frame.to_vec(),
            });
        }
    }
    frames
}

/// The address a captured GARP (sender IP) or NA (target) announces.
fn announced(frame: &[u8]) -> IpAddr {
    if frame[12..14] == [0x08, 0x06] {
        IpAddr::V4(Ipv4Addr::new(frame[28], frame[29], frame[30], frame[31]))
    } else {
        let target: [u8; 16] = frame[62..78].try_into().unwrap();
        IpAddr::V6(Ipv6Addr::from(target))
    }
}

fn v4_addresses(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 40, 0, 0)) + i as u32,
            ))
        })
        .collect()
}

fn v6_addresses(n: usize) -> Vec<IpAddr> {
    (0..n)
        .map(|i| IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 1, 0, 0, 0, i as u16)))
        .collect()
}

/// Sends one burst from `a` (veth `va`) and captures it on `b`.
fn burst(a: &Netns, b: &Netns, announcer: Announcer, addrs: &[IpAddr]) -> (usize, Vec<Stamped>) {
    let expected = addrs.len() * announcer.repeat as usize;
    let within = Duration::from_secs(10) + announcer.later_rounds_take(addrs.len());
    let (ready_tx, ready_rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let receiver =
            scope.spawn(|| b.enter(|| capture_stamped(ready_tx, VMAC_51, expected, within)));
        ready_rx.recv().expect("capture ready");
        let source: Ipv6Addr = "fe80::1".parse().unwrap();
        let sent = a.enter(|| {
            announcer
                .announce("va", VMAC_51, addrs, Some(source))
                .expect("announce")
        });
        (sent, receiver.join().unwrap())
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[test]
fn netns_announce_ten_thousand_addresses_one_frame_each_per_round_later_rounds_paced() {
    let (a, b) = veth_pair();
    let n = 10_000;
    let addrs = v4_addresses(n);
    // Rounds after the first at 50,000 frames/s: 200 ms each, 100 ms apart.
    let announcer = Announcer {
        repeat: 3,
        interval: Duration::from_millis(100),
        rate: 50_000,
    };
    let (sent, frames) = burst(&a, &b, announcer, &addrs);
    assert_eq!(sent, 3 * n);
    assert_eq!(frames.len(), 3 * n, "frames lost on the wire");
    let wanted: std::collections::HashSet<IpAddr> = addrs.iter().copied().collect();
    for round in frames.chunks(n) {
        let seen: std::collections::HashSet<IpAddr> =
            round.iter().map(|s| announced(&s.frame)).collect();
        assert_eq!(seen, wanted, "every address exactly once per round");
        assert!(round.iter().all(|s| s.frame
            == garp_frame(
                VMAC_51,
                match announced(&s.frame) {
                    IpAddr::V4(v4) => v4,
                    IpAddr::V6(_) => unreachable!(),
                }
            )));
    }
    let span = |r: usize| frames[(r + 1) * n - 1].at - frames[r * n].at;
    let gap = |r: usize| frames[r * n].at - frames[r * n - 1].at;
    eprintln!(
        "10,000 GARPs: first round {:.1} ms; round 2 after {:.1} ms, lasting {:.1} ms; round 3 after {:.1} ms, lasting {:.1} ms",
        ms(span(0)),
        ms(gap(1)),
        ms(span(1)),
        ms(gap(2)),
        ms(span(2))
    );
    // The first round is not paced: far faster than the 200 ms of a paced one.
    assert!(
        span(0) < Duration::from_millis(150),
        "first round {:?}",
        span(0)
    );
    for r in 1..3 {
        // The interval separates the rounds; the rate stretches them to ~200 ms.
        assert!(
            gap(r) >= Duration::from_millis(99),
            "gap before round {r}: {:?}",
            gap(r)
        );
        assert!(
            span(r) >= Duration::from_millis(190),
            "round {r} took {:?}",
            span(r)
        );
        assert!(
            span(r) < Duration::from_millis(600),
            "round {r} took {:?}",
            span(r)
        );
    }
}

/// Figures: the first round of a burst (first to last frame on the wire, kernel receive
/// timestamps on the peer), 10,000 IPv4 and 2,000 IPv6 addresses, median of 5 bursts.
/// `cargo test --release --test netns_announce -- --nocapture first_round`
#[test]
fn netns_announce_first_round_time_for_ten_thousand_ipv4_and_two_thousand_ipv6() {
    let (a, b) = veth_pair();
    let one_round = Announcer {
        repeat: 1,
        ..Announcer::default()
    };
    for (label, addrs) in [
        ("10,000 IPv4 (GARP)", v4_addresses(10_000)),
        ("2,000 IPv6 (NA)", v6_addresses(2_000)),
    ] {
        let mut spans = Vec::new();
        for _ in 0..5 {
            let (sent, frames) = burst(&a, &b, one_round, &addrs);
            assert_eq!(sent, addrs.len());
            assert_eq!(
                frames.len(),
                addrs.len(),
                "{label}: frames lost on the wire"
            );
            spans.push(frames.last().unwrap().at - frames[0].at);
        }
        spans.sort();
        eprintln!(
            "first round, {label}: median {:.2} ms (min {:.2}, max {:.2}) over 5 bursts",
            ms(spans[2]),
            ms(spans[0]),
            ms(spans[4])
        );
        assert!(spans[2] < Duration::from_millis(500), "{label}: {spans:?}");
    }
}
