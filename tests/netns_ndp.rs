//! The user-space NDP responder against real kernels: namespace A holds a /120 of IPv6
//! addresses through a `local` route (which the kernel does not answer solicitations for)
//! and runs the responder; namespace B, on the other end of a veth pair, resolves and pings
//! them. Needs root.

mod netns_util;

use std::net::Ipv6Addr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrovip::node::ndp::{Lookup, NdpResponder};
use ipnet::Ipv6Net;
use netns_util::{Netns, ifindex, wait_until};

/// fd00::1/64 on A's `na`, fd00::2/64 on B's `nb`, both up, and A's `local` route for
/// fd00::100:0/120.
fn addresses_and_held_range(a: &Netns, b: &Netns) {
    a.ip(&["-6", "addr", "add", "fd00::1/64", "dev", "na", "nodad"]);
    b.ip(&["-6", "addr", "add", "fd00::2/64", "dev", "nb", "nodad"]);
    a.ip(&["link", "set", "na", "up"]);
    b.ip(&["link", "set", "nb", "up"]);
    a.ip(&[
        "-6",
        "route",
        "add",
        "local",
        "fd00::100:0/120",
        "dev",
        "na",
        "proto",
        "0x46",
        "table",
        "main",
    ]);
}

/// A (veth `na`, fd00::1/64, plus `local` fd00::100:0/120) — B (veth `nb`, fd00::2/64).
fn setup(tag: &str) -> (Netns, Netns) {
    let a = Netns::new(&format!("{tag}a"));
    let b = Netns::new(&format!("{tag}b"));
    a.ip(&[
        "link", "add", "na", "type", "veth", "peer", "name", "nb", "netns", &b.name,
    ]);
    addresses_and_held_range(&a, &b);
    // IPv6 on a link works once the kernel has configured it (link-watch, some hundreds of
    // milliseconds after carrier): until then B's solicitations may not even leave.
    for (ns, dev) in [(&a, "na"), (&b, "nb")] {
        wait_until(
            &format!("IPv6 multicast route on {dev}"),
            Duration::from_secs(5),
            || {
                ns.ip(&["-6", "route", "show", "table", "local", "dev", dev])
                    .contains("multicast ff00::/8")
            },
        );
    }
    (a, b)
}

fn mac_of(ns: &Netns, dev: &str) -> [u8; 6] {
    let line = ns.ip(&["-o", "link", "show", "dev", dev]);
    let text = line
        .split("link/ether ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no MAC in {line:?}"));
    let mut mac = [0; 6];
    for (byte, part) in mac.iter_mut().zip(text.split(':')) {
        *byte = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// One ping from `ns` with a 2 s wait; whether a reply came.
fn ping(ns: &Netns, target: &str) -> bool {
    Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ping", "-6", "-c1", "-W2", "-n", target,
        ])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// B's neighbour entry for `target`, as `ip -6 neigh show` prints it.
fn neighbour(b: &Netns, target: &str) -> String {
    b.ip(&["-6", "neigh", "show", target, "dev", "nb"])
        .trim()
        .to_owned()
}

/// The packet sockets of the calling thread's namespace: (protocol, interface index)
/// columns of /proc/thread-self/net/packet.
fn packet_sockets() -> Vec<(String, String)> {
    std::fs::read_to_string("/proc/thread-self/net/packet")
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            let columns: Vec<&str> = line.split_whitespace().collect();
            (columns[3].to_owned(), columns[4].to_owned())
        })
        .collect()
}

/// IFF_ALLMULTI in the interface's kernel flags (sysfs shows `dev->flags`, which counts
/// memberships such as ours; `ip link` shows only what a user set).
fn allmulti(ns: &Netns, dev: &str) -> bool {
    let flags = ns.read_proc(&format!("/sys/class/net/{dev}/flags"));
    let flags = u32::from_str_radix(flags.trim_start_matches("0x"), 16).unwrap();
    flags & 0x200 != 0
}

#[test]
fn netns_ndp_answers_for_route_held_addresses_only_while_running() {
    let (a, b) = setup("ndp");
    let index = ifindex(&a, "na");
    let mac = mac_of(&a, "na");
    let held: Ipv6Net = "fd00::100:0/120".parse().unwrap();
    let lookup: Lookup = Arc::new(move |ifindex, target: Ipv6Addr| {
        (ifindex == index && held.contains(&target)).then_some(mac)
    });

    // Without the responder, the kernel does not answer for a route-held address.
    assert!(!ping(&b, "fd00::100:3"), "answered without a responder");
    assert!(!neighbour(&b, "fd00::100:3").contains("lladdr"));

    a.enter(|| {
        let responder = NdpResponder::start(lookup).expect("start");
        responder.listen_on(index).expect("listen_on");
        responder.listen_on(index).expect("listen_on again");
        assert!(allmulti(&a, "na"), "ALLMULTI not set on na");
        // One socket, IPv6 (86dd), on every interface (index 0).
        assert_eq!(
            packet_sockets(),
            vec![("86dd".to_owned(), "0".to_owned())],
            "packet sockets"
        );
        // An interface that does not exist is an error.
        assert!(responder.listen_on(999_999).is_err());

        assert!(ping(&b, "fd00::100:5"), "no reply from fd00::100:5");
        let entry = neighbour(&b, "fd00::100:5");
        assert!(
            entry.contains(&format!("lladdr {}", mac_text(mac))),
            "neighbour entry {entry:?}"
        );
        assert!(responder.answered() >= 1);

        // A target outside the held range is not answered.
        assert!(!ping(&b, "fd00::200:1"), "fd00::200:1 answered");
        let entry = neighbour(&b, "fd00::200:1");
        assert!(!entry.contains("lladdr"), "neighbour entry {entry:?}");

        // Duplicate address detection by B for a held address gets the all-nodes answer,
        // which B's kernel takes as a conflict.
        let answered = responder.answered();
        b.ip(&["-6", "addr", "add", "fd00::100:7/128", "dev", "nb"]);
        wait_until(
            "DAD failure of fd00::100:7 on B",
            Duration::from_secs(5),
            || {
                b.ip(&["-6", "addr", "show", "dev", "nb"])
                    .contains("dadfailed")
            },
        );
        assert!(responder.answered() > answered);

        let stopping = Instant::now();
        drop(responder);
        assert!(
            stopping.elapsed() < Duration::from_secs(1),
            "stopping took {:?}",
            stopping.elapsed()
        );
        // The socket is closed, and with it the multicast membership.
        assert_eq!(packet_sockets(), vec![], "packet sockets after drop");
        assert!(!allmulti(&a, "na"), "ALLMULTI left on na");
    });

    // After the responder is gone, a fresh target is not answered.
    assert!(!ping(&b, "fd00::100:9"), "fd00::100:9 answered after drop");
    let entry = neighbour(&b, "fd00::100:9");
    assert!(!entry.contains("lladdr"), "neighbour entry {entry:?}");
    // The one resolved while it ran still works from B's cache.
    assert!(ping(&b, "fd00::100:5"));
}

/// Whether `ns`'s link-local address on `dev` is out of duplicate address detection (the
/// kernel sends MLD reports, and the bridge's queries, from it).
fn link_local_ready(ns: &Netns, dev: &str) -> bool {
    let shown = ns.ip(&["-6", "addr", "show", "dev", dev, "scope", "link"]);
    shown.contains("fe80") && !shown.contains("tentative")
}

/// Behind a switch with MLD snooping (a Linux bridge with snooping and a querier), a
/// solicitation reaches only ports that reported its solicited-node group. The responder
/// answers for the whole /120, but B resolves exactly the addresses whose groups A joined;
/// groups are counted per address and left when the responder stops.
#[test]
fn netns_ndp_joins_solicited_node_groups_for_an_mld_snooping_switch() {
    let a = Netns::new("mlda");
    let b = Netns::new("mldb");
    let s = Netns::new("mlds");
    s.ip(&[
        "link",
        "add",
        "br0",
        "type",
        "bridge",
        "mcast_snooping",
        "1",
    ]);
    s.ip(&["-6", "addr", "add", "fd00::f0/64", "dev", "br0", "nodad"]);
    for (ns, dev, port) in [(&a, "na", "sa"), (&b, "nb", "sb")] {
        s.ip(&[
            "link", "add", port, "type", "veth", "peer", "name", dev, "netns", &ns.name,
        ]);
        s.ip(&["link", "set", port, "master", "br0", "up"]);
    }
    s.ip(&["link", "set", "br0", "up"]);
    addresses_and_held_range(&a, &b);
    wait_until("link-locals out of DAD", Duration::from_secs(10), || {
        link_local_ready(&a, "na") && link_local_ready(&b, "nb") && link_local_ready(&s, "br0")
    });
    // The querier starts now that the bridge has its addresses. Once a query's response
    // interval has passed (1 s here, 10 s by default), multicast to a group nobody reported
    // goes nowhere but to multicast routers.
    s.ip(&[
        "link",
        "set",
        "br0",
        "type",
        "bridge",
        "mcast_query_response_interval",
        "100",
    ]);
    s.ip(&["link", "set", "br0", "type", "bridge", "mcast_querier", "1"]);
    std::thread::sleep(Duration::from_millis(1500));

    let index = ifindex(&a, "na");
    let mac = mac_of(&a, "na");
    let held: Ipv6Net = "fd00::100:0/120".parse().unwrap();
    let lookup: Lookup = Arc::new(move |ifindex, target: Ipv6Addr| {
        (ifindex == index && held.contains(&target)).then_some(mac)
    });
    let member = |n: u32| -> Ipv6Addr { format!("fd00::100:{n:x}").parse().unwrap() };
    a.enter(|| {
        let responder = NdpResponder::start(lookup).expect("start");
        responder.listen_on(index).expect("listen_on");
        let groups = responder.memberships();
        groups.join(index, vec![member(5)]);
        // Another address of the same group (its low 24 bits are fd00::100:5's): counted.
        groups.join(index, vec!["fd00::1:100:5".parse().unwrap()]);
        wait_until("fd00::100:5's group joined", Duration::from_secs(5), || {
            a.solicited_groups("na").contains(&0x5)
        });
        assert_eq!(ferrovip::node::ndp::groups_joined(), 1);
        // The report went out and the switch learned it.
        wait_until("the bridge's MDB entry", Duration::from_secs(5), || {
            s.exec(&["bridge", "mdb", "show", "dev", "br0"])
                .contains("ff02::1:ff00:5")
        });
        assert!(ping(&b, "fd00::100:5"), "no reply from a joined address");
        // Answered for, but its group not joined: the switch does not forward B's solicitation.
        assert!(
            !ping(&b, "fd00::100:6"),
            "a solicitation crossed the snooping switch"
        );
        let answered = responder.answered();
        groups.join(index, vec![member(6)]);
        wait_until("fd00::100:6's group joined", Duration::from_secs(5), || {
            a.solicited_groups("na").contains(&0x6)
        });
        assert!(ping(&b, "fd00::100:6"), "no reply after joining");
        assert!(responder.answered() > answered);

        // One of the two addresses of a group leaves: the group stays; both: it goes.
        groups.leave(index, vec![member(5)]);
        groups.change(index, vec![member(7)], vec![member(6)]);
        wait_until("fd00::100:6's group left", Duration::from_secs(5), || {
            let joined = a.solicited_groups("na");
            !joined.contains(&0x6) && joined.contains(&0x7)
        });
        assert!(a.solicited_groups("na").contains(&0x5));
        groups.leave(index, vec!["fd00::1:100:5".parse().unwrap()]);
        wait_until("fd00::100:5's group left", Duration::from_secs(5), || {
            !a.solicited_groups("na").contains(&0x5)
        });
        assert_eq!(ferrovip::node::ndp::groups_joined(), 1);

        drop(responder);
        // Its sockets closed: no group of ours is left (the interface's own remain).
        let left = a.solicited_groups("na");
        assert!(!left.contains(&0x7), "groups left behind: {left:x?}");
        assert_eq!(ferrovip::node::ndp::groups_joined(), 0);
        // A handle kept past the responder does nothing.
        groups.join(index, vec![member(8)]);
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!a.solicited_groups("na").contains(&0x8));
}
