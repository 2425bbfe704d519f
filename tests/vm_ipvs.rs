//! IPVS on a real kernel. This host's kernel has none, so the test boots the VM image from
//! `e2e/vm/build.sh` with itself inside and runs the cases below there (see tests/vm/mod.rs).
//! Needs no root on the host; `cargo test --test vm_ipvs -- nat` runs the cases matching "nat".
//!
//! To add a case: write `fn my_case() -> CaseResult` and list it in `CASES`.

mod vm;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use ferrovip_e2e::vm::{GuestBridge, GuestNetns, TcpNameServer, tcp_request, tcp_spread};
use vm::{Case, CaseResult, ensure};

const CASES: &[Case] = &[
    ("ipvsadm_smoke", ipvsadm_smoke),
    ("nat_traffic", nat_traffic),
    ("nat_traffic_v6", nat_traffic_v6),
    ("dr_traffic", dr_traffic),
];

fn main() -> ExitCode {
    vm::main(CASES)
}

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections per traffic case: ten per backend, so round robin must split them exactly.
const CONNECTIONS: usize = 30;
const BACKENDS: usize = 3;

/// The schedulers of IPVS in Debian's 6.1 kernel (ip_vs_twos is not built there).
const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh",
];

/// ipvsadm programs a service and a destination and lists them back; every scheduler the
/// kernel has is accepted.
fn ipvsadm_smoke() -> CaseResult {
    let ns = GuestNetns::create("smoke")?;
    ns.exec("ipvsadm", &["-A", "-t", "10.0.0.1:80", "-s", "rr"])?;
    ns.exec(
        "ipvsadm",
        &[
            "-a",
            "-t",
            "10.0.0.1:80",
            "-r",
            "10.0.0.2:8080",
            "-m",
            "-w",
            "2",
        ],
    )?;
    let listing = ns.exec("ipvsadm", &["-Ln"])?;
    let rows: Vec<Vec<&str>> = listing
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    ensure(rows.contains(&vec!["TCP", "10.0.0.1:80", "rr"]), || {
        format!("service missing from ipvsadm -Ln:\n{listing}")
    })?;
    ensure(
        rows.contains(&vec!["->", "10.0.0.2:8080", "Masq", "2", "0", "0"]),
        || format!("destination missing from ipvsadm -Ln:\n{listing}"),
    )?;
    for (i, scheduler) in SCHEDULERS.iter().enumerate() {
        let service = format!("10.0.1.1:{}", 1000 + i);
        ns.exec("ipvsadm", &["-A", "-t", &service, "-s", scheduler])
            .map_err(|e| format!("scheduler {scheduler}: {e}"))?;
    }
    let services = ns.exec("ipvsadm", &["-Ln"])?.matches("TCP ").count();
    ensure(services == 1 + SCHEDULERS.len(), || {
        format!("{services} services listed")
    })
}

fn v4(a: u8, b: u8, c: u8, d: u8) -> Ipv4Addr {
    Ipv4Addr::new(a, b, c, d)
}

/// Starts one name server per backend namespace on `any`, answering with the namespace name.
fn name_servers(
    backends: &[GuestNetns],
    any: SocketAddr,
) -> Result<Vec<TcpNameServer>, vm::CaseError> {
    backends
        .iter()
        .map(|b| Ok(TcpNameServer::start(b, any, b.name())?))
        .collect()
}

/// Every backend answered exactly CONNECTIONS / BACKENDS times.
fn ensure_even_spread(replies: &BTreeMap<String, usize>, backends: &[GuestNetns]) -> CaseResult {
    let even = backends
        .iter()
        .all(|b| replies.get(b.name()) == Some(&(CONNECTIONS / BACKENDS)));
    ensure(even && replies.len() == BACKENDS, || {
        format!("round robin over {BACKENDS} backends answered {replies:?}")
    })
}

/// Addresses of the NAT topology of one family.
struct NatPlan {
    tag: &'static str,
    client: &'static str,
    director_front: &'static str,
    vip_cidr: &'static str,
    vip: SocketAddr,
    director_back: &'static str,
    director_back_ip: IpAddr,
    /// The backend's address with prefix, from its index (0-based).
    backend: fn(usize) -> String,
    forwarding_sysctl: &'static str,
    /// The nftables ruleset that gives the forwarded connections their return path.
    ruleset: &'static str,
}

/// The rulesets the NAT cases install: masquerade the connections whose original destination
/// (VIP, protocol, port) is a NAT service. `ct original proto-dst` has no type of its
/// own in a concatenation: the `meta l4proto` match before it gives it one, hence one rule
/// per protocol (UDP and SCTP rules look the same).
const NAT_RULESET_V4: &str = "table inet ferrovip-test {
\tset services4 {
\t\ttype ipv4_addr . inet_proto . inet_service
\t\telements = { 198.51.100.100 . tcp . 80 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta l4proto tcp ct original ip daddr . meta l4proto . ct original proto-dst @services4 masquerade
\t}
}
";
const NAT_RULESET_V6: &str = "table inet ferrovip-test {
\tset services6 {
\t\ttype ipv6_addr . inet_proto . inet_service
\t\telements = { 2001:db8:c::100 . tcp . 80 }
\t}
\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta l4proto tcp ct original ip6 daddr . meta l4proto . ct original proto-dst @services6 masquerade
\t}
}
";

/// IPVS masquerading (NAT) over IPv4 to backends on their own subnet without a route back to
/// the client: the director SNATs the forwarded connections (nftables masquerade on the
/// original destination, which needs `net.ipv4.vs.conntrack=1`), so replies come back
/// through it.
fn nat_traffic() -> CaseResult {
    nat_case(&NatPlan {
        tag: "nat4",
        client: "198.51.100.2/24",
        director_front: "198.51.100.1/24",
        vip_cidr: "198.51.100.100/32",
        vip: SocketAddr::from((v4(198, 51, 100, 100), 80)),
        director_back: "203.0.113.1/24",
        director_back_ip: IpAddr::V4(v4(203, 0, 113, 1)),
        backend: |i| format!("203.0.113.{}/24", 11 + i),
        forwarding_sysctl: "net.ipv4.ip_forward",
        ruleset: NAT_RULESET_V4,
    })
}

/// The same over IPv6 (the IPVS sysctls live under net.ipv4 for both families).
fn nat_traffic_v6() -> CaseResult {
    let vip: IpAddr = "2001:db8:c::100".parse()?;
    nat_case(&NatPlan {
        tag: "nat6",
        client: "2001:db8:c::2/64",
        director_front: "2001:db8:c::1/64",
        vip_cidr: "2001:db8:c::100/128",
        vip: SocketAddr::new(vip, 80),
        director_back: "2001:db8:b::1/64",
        director_back_ip: "2001:db8:b::1".parse()?,
        backend: |i| format!("2001:db8:b::{}/64", 11 + i),
        forwarding_sysctl: "net.ipv6.conf.all.forwarding",
        ruleset: NAT_RULESET_V6,
    })
}

fn nat_case(plan: &NatPlan) -> CaseResult {
    let tag = plan.tag;
    let client = GuestNetns::create(&format!("{tag}-client"))?;
    let director = GuestNetns::create(&format!("{tag}-director"))?;
    let backends = (1..=BACKENDS)
        .map(|i| GuestNetns::create(&format!("{tag}-b{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let lan = GuestBridge::create(&format!("{tag}-lan"))?;

    client.veth("eth0", &director, "eth0")?;
    client.add_address(plan.client, "eth0")?;
    director.add_address(plan.director_front, "eth0")?;
    director.add_address(plan.vip_cidr, "eth0")?;
    lan.attach(&director, "eth1", &[plan.director_back])?;
    for (i, backend) in backends.iter().enumerate() {
        lan.attach(backend, "eth0", &[&(plan.backend)(i)])?;
    }
    let any = match plan.vip {
        SocketAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        SocketAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    let servers = name_servers(&backends, SocketAddr::new(any, 8080))?;

    director.sysctl(plan.forwarding_sysctl, "1")?;
    director.sysctl("net.ipv4.vs.conntrack", "1")?;
    let service = plan.vip.to_string();
    director.exec("ipvsadm", &["-A", "-t", &service, "-s", "rr"])?;
    for i in 0..BACKENDS {
        let cidr = (plan.backend)(i);
        let ip: IpAddr = cidr.split('/').next().unwrap_or_default().parse()?;
        let real = SocketAddr::new(ip, 8080).to_string();
        director.exec(
            "ipvsadm",
            &["-a", "-t", &service, "-r", &real, "-m", "-w", "1"],
        )?;
    }

    // Without the masquerade rule the backends answer the client directly, which they have
    // no route to: the return path is what the rule adds.
    let unanswered = tcp_request(&client, plan.vip, Duration::from_secs(1));
    ensure(unanswered.is_err(), || {
        format!("a connection got through without masquerading: {unanswered:?}")
    })?;

    let path = format!("/tmp/{tag}.nft");
    std::fs::write(&path, plan.ruleset)?;
    director.exec("nft", &["-f", &path])?;

    let replies = tcp_spread(&client, plan.vip, CONNECTIONS, CONNECT_TIMEOUT)?;
    ensure_even_spread(&replies, &backends)?;
    for server in &servers {
        let peers = server.peers();
        ensure(
            peers.iter().all(|p| p.ip() == plan.director_back_ip),
            || format!("backend saw sources other than the director's address: {peers:?}"),
        )?;
    }
    Ok(())
}

/// IPVS direct routing: client, director and backends share one LAN; the backends hold the
/// VIP on lo (arp_ignore=1, arp_announce=2 so they never answer ARP for it) and reply to the
/// client directly, which sees its own address preserved at the backends.
fn dr_traffic() -> CaseResult {
    let client = GuestNetns::create("dr-client")?;
    let director = GuestNetns::create("dr-director")?;
    let backends = (1..=BACKENDS)
        .map(|i| GuestNetns::create(&format!("dr-b{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let lan = GuestBridge::create("dr-lan")?;

    lan.attach(&client, "eth0", &["192.0.2.2/24"])?;
    lan.attach(&director, "eth0", &["192.0.2.1/24", "192.0.2.100/32"])?;
    for (i, backend) in backends.iter().enumerate() {
        backend.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        backend.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        lan.attach(backend, "eth0", &[&format!("192.0.2.{}/24", 11 + i)])?;
        backend.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"])?;
    }
    let servers = name_servers(&backends, SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)))?;

    director.exec("ipvsadm", &["-A", "-t", "192.0.2.100:80", "-s", "rr"])?;
    for i in 0..BACKENDS {
        let real = format!("192.0.2.{}:80", 11 + i);
        director.exec(
            "ipvsadm",
            &["-a", "-t", "192.0.2.100:80", "-r", &real, "-g", "-w", "1"],
        )?;
    }
    let vip = SocketAddr::from((v4(192, 0, 2, 100), 80));
    let replies = tcp_spread(&client, vip, CONNECTIONS, CONNECT_TIMEOUT)?;
    ensure_even_spread(&replies, &backends)?;
    for server in &servers {
        let peers = server.peers();
        ensure(peers.iter().all(|p| p.ip() == v4(192, 0, 2, 2)), || {
            format!("backend saw sources other than the client's address: {peers:?}")
        })?;
    }
    // Only the director may own the VIP on the wire.
    let neighbours = client.ip(&["neigh", "show", "192.0.2.100"])?;
    let director_mac = director.ip(&["-br", "link", "show", "eth0"])?;
    let director_mac = director_mac.split_whitespace().nth(2).unwrap_or("?");
    ensure(neighbours.contains(director_mac), || {
        format!("the client resolved the VIP to {neighbours:?}, not the director ({director_mac})")
    })
}
