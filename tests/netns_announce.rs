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
