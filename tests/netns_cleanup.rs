//! What the dataplane changes outside IPVS, in network namespaces: the sysctls it records in
//! the state directory (IPv6 forwarding keeping router advertisements accepted), and
//! `ferrovip cleanup` removing everything an earlier run left where the kernel has no IPVS
//! (this kind of host: the IPVS case runs in the VM, `tests/vm_dataplane.rs`). Needs root and
//! nftables.

mod netns_util;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use ferrovip::dataplane::nft::{MasqueradeMatch, NftRules, Protocol};
use ferrovip::dataplane::sysctl::{IPV6_FORWARDING, Sysctls};
use ferrovip::node::addr::AddressManager;
use ferrovip::node::link::{MacvlanManager, vmac_name};
use ferrovip::vocab::Family;
use netns_util::{Netns, ifindex};

const AGENT: &str = env!("CARGO_BIN_EXE_ferrovip");
const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

/// A state directory unique to this process and test, removed at the end.
struct StateDir(PathBuf);

impl StateDir {
    fn new(tag: &str) -> StateDir {
        let dir = std::env::temp_dir().join(format!("fv-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        StateDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn recorded(&self) -> String {
        std::fs::read_to_string(self.0.join("sysctls")).unwrap_or_default()
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn conf(ns: &Netns, key: &str) -> String {
    ns.read_proc(&format!("/proc/sys/net/ipv6/conf/{key}"))
}

#[test]
fn netns_ipv6_forwarding_keeps_router_advertisements_accepted_and_puts_them_back() {
    let ns = Netns::new("ra");
    // No dummy module on every kernel: a veth pair gives two interfaces.
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"]);
    // d0 was told to ignore router advertisements: that stays as it is.
    ns.enter(|| std::fs::write("/proc/sys/net/ipv6/conf/d0/accept_ra", "0").unwrap());
    assert_eq!(conf(&ns, "all/forwarding"), "0");
    assert_eq!(conf(&ns, "d1/accept_ra"), "1");
    assert_eq!(conf(&ns, "default/accept_ra"), "1");
    let state = StateDir::new("ra");

    ns.enter(|| {
        let mut sysctls = Sysctls::load(state.path(), &[IPV6_FORWARDING]);
        sysctls.set(&[(IPV6_FORWARDING, "1")]).unwrap();
    });
    assert_eq!(conf(&ns, "all/forwarding"), "1");
    assert_eq!(conf(&ns, "d1/forwarding"), "1");
    assert_eq!(conf(&ns, "d1/accept_ra"), "2", "SLAAC keeps working on d1");
    assert_eq!(
        conf(&ns, "default/accept_ra"),
        "2",
        "and on links made later"
    );
    assert_eq!(conf(&ns, "d0/accept_ra"), "0");
    let recorded = state.recorded();
    for line in [
        "/proc/sys/net/ipv6/conf/all/forwarding 0",
        "/proc/sys/net/ipv6/conf/d1/accept_ra 1",
        "/proc/sys/net/ipv6/conf/default/accept_ra 1",
    ] {
        assert!(
            recorded.lines().any(|l| l == line),
            "{line:?} in {recorded}"
        );
    }
    assert!(!recorded.contains("d0"), "{recorded}");

    // A restarted dataplane reads what to put back from the state directory alone.
    ns.enter(|| {
        let mut sysctls = Sysctls::load(state.path(), &[IPV6_FORWARDING]);
        assert!(sysctls.is_set(IPV6_FORWARDING));
        sysctls.set(&[(IPV6_FORWARDING, "1")]).unwrap();
        assert_eq!(conf(&ns, "d1/accept_ra"), "2");
        sysctls.set(&[]).unwrap();
    });
    assert_eq!(conf(&ns, "all/forwarding"), "0");
    assert_eq!(conf(&ns, "d1/accept_ra"), "1");
    assert_eq!(conf(&ns, "default/accept_ra"), "1");
    assert_eq!(conf(&ns, "d0/accept_ra"), "0");
    assert_eq!(state.recorded(), "");
}

#[test]
fn netns_cleanup_without_ipvs_removes_table_macvlans_and_addresses_and_restores_sysctls() {
    let ns = Netns::new("clean");
    ns.ip(&[
        "link", "add", "eth0", "type", "veth", "peer", "name", "peer0",
    ]);
    ns.ip(&["link", "set", "peer0", "up"]);
    ns.ip(&["link", "set", "eth0", "up"]);
    ns.ip(&["addr", "add", "192.0.2.11/24", "dev", "eth0"]);
    let index = ifindex(&ns, "eth0");
    let vmac = vmac_name(index, Family::V4, 51);
    let state = StateDir::new("clean");

    // What an earlier run left: the masquerade table, forwarding sysctls (recorded), an
    // address and a virtual-MAC interface of ours. And what is not ours.
    ns.block_on(|| async {
        let mut nft = NftRules::new("nft");
        let wanted = BTreeSet::from([MasqueradeMatch::Service {
            addr: "192.0.2.100".parse().unwrap(),
            protocol: Protocol::TCP,
            port: 80,
        }]);
        nft.apply(&wanted).await.expect("nft table");
        let mut sysctls = Sysctls::load(state.path(), &[IPV6_FORWARDING, IP_FORWARD]);
        sysctls
            .set(&[(IP_FORWARD, "1"), (IPV6_FORWARDING, "1")])
            .unwrap();
        let addresses = AddressManager::connect().unwrap();
        addresses
            .add(index, "192.0.2.100/24".parse().unwrap())
            .await
            .unwrap();
        MacvlanManager::new(addresses.handle().clone())
            .ensure_macvlan(index, &vmac, [0, 0, 0x5e, 0, 1, 51])
            .await
            .unwrap();
    });
    ns.ip(&["addr", "add", "192.0.2.200/24", "dev", "eth0"]);
    ns.ip(&[
        "link", "add", "link", "eth0", "name", "mv0", "type", "macvlan",
    ]);
    assert!(
        ns.exec(&["nft", "list", "tables"])
            .contains("inet ferrovip")
    );
    assert_eq!(ns.read_proc(IP_FORWARD), "1");
    assert_eq!(conf(&ns, "eth0/accept_ra"), "2");
    assert!(ns.ip(&["-o", "link", "show"]).contains(&vmac));

    let out = ns.exec(&[
        AGENT,
        "cleanup",
        "--state-dir",
        &state.path().display().to_string(),
    ]);
    eprintln!("ferrovip cleanup:\n{out}");
    assert!(
        out.lines()
            .next()
            .is_some_and(|l| l.starts_with("ipvs: nothing to remove")),
        "this kernel has no IPVS: {out}"
    );
    assert!(out.contains(&format!("virtual-MAC interface {vmac} removed")));
    assert!(out.contains("sysctl /proc/sys/net/ipv6/conf/all/forwarding restored to 0"));

    let tables = ns.exec(&["nft", "list", "tables"]);
    assert!(!tables.contains("ferrovip"), "table left: {tables}");
    let links = ns.ip(&["-o", "link", "show"]);
    assert!(!links.contains(&vmac), "{links}");
    assert!(
        links.contains("mv0@eth0"),
        "a foreign macvlan stays: {links}"
    );
    let addrs = ns.ip(&["-o", "addr", "show", "dev", "eth0"]);
    assert!(!addrs.contains("192.0.2.100/"), "{addrs}");
    assert!(addrs.contains("192.0.2.200/24") && addrs.contains("192.0.2.11/24"));
    assert_eq!(ns.read_proc(IP_FORWARD), "0");
    assert_eq!(conf(&ns, "all/forwarding"), "0");
    assert_eq!(conf(&ns, "eth0/accept_ra"), "1");
    assert_eq!(state.recorded(), "");

    // Again: nothing left to do, and nothing fails.
    let again = ns.exec(&[
        AGENT,
        "cleanup",
        "--state-dir",
        &state.path().display().to_string(),
    ]);
    assert!(
        !again.contains("removed") && !again.contains("restored"),
        "{again}"
    );
}

/// A router advertisement with one autonomous /64 prefix (RFC 4861 §4.2, §4.6.2); the kernel
/// fills in the ICMPv6 checksum of a raw ICMPv6 socket.
fn router_advertisement(prefix: std::net::Ipv6Addr) -> Vec<u8> {
    let mut ra = vec![134, 0, 0, 0, 64, 0, 0, 0];
    ra.extend_from_slice(&[0; 8]); // reachable time, retransmission timer
    ra.extend_from_slice(&[3, 4, 64, 0xc0]); // prefix information: on-link, autonomous
    ra.extend_from_slice(&86_400u32.to_be_bytes()); // valid lifetime
    ra.extend_from_slice(&14_400u32.to_be_bytes()); // preferred lifetime
    ra.extend_from_slice(&[0; 4]);
    ra.extend_from_slice(&prefix.octets());
    ra
}

/// Sends `ra` from `link` in the namespace the calling thread is in, to all nodes.
fn send_router_advertisement(link: &str, ifindex: u32, ra: &[u8]) {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let socket = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6)).unwrap();
    socket.bind_device(Some(link.as_bytes())).unwrap();
    socket.set_multicast_hops_v6(255).unwrap();
    socket.set_multicast_if_v6(ifindex).unwrap();
    let all_nodes = std::net::SocketAddrV6::new("ff02::1".parse().unwrap(), 0, 0, ifindex);
    socket.send_to(ra, &SockAddr::from(all_nodes)).unwrap();
}

/// The behaviour the sysctls are for: a host whose IPv6 forwarding the dataplane turned on
/// still takes addresses from its router's advertisements (SLAAC); with the kernel's
/// `accept_ra=1` it would not.
#[test]
fn netns_a_host_forwarding_ipv6_still_autoconfigures_from_router_advertisements() {
    let router = Netns::new("rtr");
    let host = Netns::new("host");
    netns_util::run(
        "ip",
        &[
            "link",
            "add",
            "r0",
            "netns",
            &router.name,
            "type",
            "veth",
            "peer",
            "name",
            "h0",
            "netns",
            &host.name,
        ],
    );
    router.ip(&["link", "set", "r0", "up"]);
    host.ip(&["link", "set", "h0", "up"]);
    let r0 = ifindex(&router, "r0");
    // Both link-locals usable (duplicate address detection done).
    for (ns, link) in [(&router, "r0"), (&host, "h0")] {
        netns_util::wait_until(
            "a usable link-local address",
            std::time::Duration::from_secs(10),
            || {
                let a = ns.ip(&["-6", "addr", "show", "dev", link]);
                a.contains("fe80::") && !a.contains("tentative")
            },
        );
    }
    let state = StateDir::new("slaac");
    let autoconfigured = |prefix: &str| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            if host
                .ip(&["-6", "addr", "show", "dev", "h0"])
                .contains(prefix)
            {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };

    host.enter(|| {
        Sysctls::load(state.path(), &[IPV6_FORWARDING])
            .set(&[(IPV6_FORWARDING, "1")])
            .unwrap()
    });
    assert_eq!(conf(&host, "h0/forwarding"), "1");
    router.enter(|| {
        send_router_advertisement(
            "r0",
            r0,
            &router_advertisement("2001:db8:5::".parse().unwrap()),
        )
    });
    assert!(
        autoconfigured("2001:db8:5:0:"),
        "no SLAAC address while forwarding: {}",
        host.ip(&["-6", "addr", "show", "dev", "h0"])
    );

    // Without the dataplane's accept_ra=2, the same advertisement is ignored.
    host.enter(|| std::fs::write("/proc/sys/net/ipv6/conf/h0/accept_ra", "1").unwrap());
    router.enter(|| {
        send_router_advertisement(
            "r0",
            r0,
            &router_advertisement("2001:db8:6::".parse().unwrap()),
        )
    });
    assert!(
        !autoconfigured("2001:db8:6:0:"),
        "the kernel accepted an advertisement while forwarding with accept_ra=1"
    );
    host.enter(|| std::fs::write("/proc/sys/net/ipv6/conf/h0/accept_ra", "2").unwrap());
    host.enter(|| {
        Sysctls::load(state.path(), &[IPV6_FORWARDING])
            .set(&[])
            .unwrap()
    });
    assert_eq!(conf(&host, "h0/forwarding"), "0");
    assert_eq!(conf(&host, "h0/accept_ra"), "1");
}
