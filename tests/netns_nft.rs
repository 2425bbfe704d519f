//! NftRules against a real kernel and the real nft binary in network namespaces. Needs root
//! and nftables (`apt-get install nftables`).

mod netns_util;

use std::collections::BTreeSet;
use std::future::Future;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use ferrovip::dataplane::nft::{MasqueradeMatch, NftRecord, NftRules, Protocol};
use netns_util::Netns;
use serde_json::Value;

fn block_on<F: Future>(future: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(future)
}

fn service(addr: &str, protocol: Protocol, port: u16) -> MasqueradeMatch {
    MasqueradeMatch::Service {
        addr: addr.parse().unwrap(),
        protocol,
        port,
    }
}

fn protocol_of(value: &Value) -> Protocol {
    match value {
        Value::String(name) if name == "tcp" => Protocol::TCP,
        Value::String(name) if name == "udp" => Protocol::UDP,
        Value::String(name) if name == "sctp" => Protocol::SCTP,
        Value::Number(n) if n.as_u64() == Some(6) => Protocol::TCP,
        Value::Number(n) if n.as_u64() == Some(17) => Protocol::UDP,
        Value::Number(n) if n.as_u64() == Some(132) => Protocol::SCTP,
        other => panic!("unexpected protocol {other}"),
    }
}

/// What `nft -j list table inet ferrovip` shows: the set elements as matches, and the rules.
fn listed(ns: &Netns) -> (BTreeSet<MasqueradeMatch>, Vec<Value>) {
    let json: Value =
        serde_json::from_str(&ns.exec(&["nft", "-j", "list", "table", "inet", "ferrovip"]))
            .expect("nft JSON");
    let mut matches = BTreeSet::new();
    let mut rules = Vec::new();
    let mut sets = BTreeSet::new();
    for object in json["nftables"].as_array().expect("nftables array") {
        if let Some(set) = object.get("set") {
            let name = set["name"].as_str().unwrap().to_owned();
            for element in set["elem"].as_array().into_iter().flatten() {
                let item = if name == "fwmarks" {
                    MasqueradeMatch::Fwmark(element.as_u64().unwrap().try_into().unwrap())
                } else {
                    let concat = element["concat"].as_array().expect("concatenation");
                    MasqueradeMatch::Service {
                        addr: concat[0].as_str().unwrap().parse().unwrap(),
                        protocol: protocol_of(&concat[1]),
                        port: concat[2].as_u64().unwrap().try_into().unwrap(),
                    }
                };
                matches.insert(item);
            }
            sets.insert(name);
        }
        if let Some(rule) = object.get("rule") {
            rules.push(rule.clone());
        }
    }
    assert_eq!(
        sets,
        BTreeSet::from(["fwmarks".into(), "services_v4".into(), "services_v6".into()])
    );
    (matches, rules)
}

fn tables(ns: &Netns) -> String {
    ns.exec(&["nft", "list", "tables"])
}

/// A foreign table with the same name in another family, and one in ours.
const FOREIGN: &str = "table ip ferrovip {
	chain output {
		type filter hook output priority filter; policy accept;
		ip daddr 203.0.113.1 counter drop
	}
}
table inet other {
	set keep {
		type ipv4_addr
		elements = { 203.0.113.7 }
	}
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @keep counter
	}
}
";

fn load(ns: &Netns, script: &str) {
    let path = std::env::temp_dir().join(format!("{}.nft", ns.name));
    std::fs::write(&path, script).unwrap();
    let result = std::panic::catch_unwind(|| ns.exec(&["nft", "-f", path.to_str().unwrap()]));
    let _ = std::fs::remove_file(&path);
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

fn foreign_listing(ns: &Netns) -> String {
    ns.exec(&["nft", "list", "table", "ip", "ferrovip"])
        + &ns.exec(&["nft", "list", "table", "inet", "other"])
}

#[test]
fn netns_nft_apply_change_skip_repair_and_remove_touch_only_our_table() {
    let ns = Netns::new("nft");
    load(&ns, FOREIGN);
    let foreign = foreign_listing(&ns);
    let mut rules = NftRules::new("nft").in_netns(&ns.name);
    block_on(rules.available()).expect("nft and nf_tables available");
    assert_eq!(rules.invocations(), 0, "a check is not a write");
    assert!(!tables(&ns).contains("table inet ferrovip"));

    let first = BTreeSet::from([
        service("192.0.2.10", Protocol::TCP, 80),
        service("192.0.2.10", Protocol::UDP, 53),
        service("192.0.2.11", Protocol::SCTP, 3868),
        service("2001:db8::10", Protocol::TCP, 443),
        MasqueradeMatch::Fwmark(0x10),
    ]);
    assert!(block_on(rules.apply(&first)).unwrap());
    let (elements, listed_rules) = listed(&ns);
    assert_eq!(elements, first);
    assert_eq!(listed_rules.len(), 7);
    assert!(
        listed_rules
            .iter()
            .all(|rule| rule["expr"].to_string().contains("masquerade")),
        "{listed_rules:?}"
    );

    // Identical: no nft run, proven by an element added by hand that survives.
    ns.exec(&[
        "nft", "add", "element", "inet", "ferrovip", "fwmarks", "{ 0x99 }",
    ]);
    assert!(!block_on(rules.apply(&first)).unwrap());
    assert_eq!(rules.invocations(), 1);
    assert!(listed(&ns).0.contains(&MasqueradeMatch::Fwmark(0x99)));
    // A forced resync puts the table back to what is wanted.
    rules.forget();
    assert!(block_on(rules.apply(&first)).unwrap());
    assert_eq!(listed(&ns).0, first);

    let second = BTreeSet::from([
        service("192.0.2.10", Protocol::TCP, 8080),
        service("2001:db8::10", Protocol::UDP, 443),
        service("2001:db8::11", Protocol::SCTP, 9),
    ]);
    assert!(block_on(rules.apply(&second)).unwrap());
    assert_eq!(listed(&ns).0, second);
    assert_eq!(rules.invocations(), 3);
    assert_eq!(foreign_listing(&ns), foreign);

    block_on(rules.remove()).unwrap();
    let after = tables(&ns);
    assert!(!after.contains("table inet ferrovip"), "{after}");
    assert!(after.contains("table ip ferrovip") && after.contains("table inet other"));
    assert_eq!(foreign_listing(&ns), foreign);
    // Absent already: still fine, and nothing wanted needs no run.
    block_on(rules.remove()).unwrap();
    assert!(!block_on(rules.apply(&BTreeSet::new())).unwrap());
    assert_eq!(rules.invocations(), 5);

    // A fresh NftRules (an agent restart) syncs on its first call even with nothing wanted:
    // it removes a table an earlier run left behind.
    let mut earlier = NftRules::new("nft").in_netns(&ns.name);
    block_on(earlier.apply(&first)).unwrap();
    let mut restarted = NftRules::new("nft").in_netns(&ns.name);
    assert!(block_on(restarted.apply(&BTreeSet::new())).unwrap());
    assert!(!tables(&ns).contains("table inet ferrovip"));
    assert_eq!(foreign_listing(&ns), foreign);
}

#[test]
fn netns_nft_bad_binary_and_kernel_errors_are_typed() {
    let ns = Netns::new("nft-err");
    let missing = block_on(NftRules::new("/nonexistent/nft").available()).unwrap_err();
    assert_eq!(missing.metric_label(), "nft_missing");
    // `ip netns exec` into a namespace that does not exist: nft never runs, the error says why.
    let mut nowhere = NftRules::new("nft").in_netns(&format!("{}-gone", ns.name));
    let error = block_on(nowhere.apply(&BTreeSet::from([MasqueradeMatch::Fwmark(1)]))).unwrap_err();
    assert_eq!(error.metric_label(), "nft_failed");
    assert!(error.to_string().contains("-gone"), "{error}");
}

#[test]
fn netns_nft_ten_thousand_services() {
    let ns = Netns::new("nft-big");
    let mut rules = NftRules::new("nft").in_netns(&ns.name);
    let wanted: BTreeSet<MasqueradeMatch> = (0..10_000u32)
        .map(|i| MasqueradeMatch::Service {
            addr: IpAddr::from([10, 100, (i / 250) as u8, (i % 250) as u8 + 1]),
            protocol: Protocol::TCP,
            port: 80 + (i % 3) as u16,
        })
        .collect();
    let started = Instant::now();
    assert!(block_on(rules.apply(&wanted)).unwrap());
    let full = started.elapsed();
    let mut changed = wanted.clone();
    changed.insert(service("10.200.0.1", Protocol::UDP, 53));
    let started = Instant::now();
    assert!(block_on(rules.apply(&changed)).unwrap());
    let one_more = started.elapsed();
    let started = Instant::now();
    assert!(!block_on(rules.apply(&changed)).unwrap());
    let unchanged = started.elapsed();
    assert_eq!(listed(&ns).0, changed);
    println!(
        "nft 10,000 services: from empty {full:?}, one added {one_more:?}, unchanged {unchanged:?}"
    );
    assert!(unchanged < Duration::from_millis(50), "{unchanged:?}");
}

/// The client's source address as a backend sees it, for a TCP connection from `client` to
/// `vip` that the director's stand-in DNAT sends to `backend` (port 8080).
fn source_seen(client: &Netns, backend: &Netns, vip: SocketAddr, backend_addr: IpAddr) -> IpAddr {
    // A socket stays in the namespace it was created in.
    let listener = backend.enter(|| TcpListener::bind((backend_addr, 8080)).expect("bind"));
    let mut stream = client
        .enter(|| TcpStream::connect_timeout(&vip, Duration::from_secs(5)))
        .unwrap_or_else(|e| panic!("connect to {vip}: {e}"));
    let (mut accepted, peer) = listener.accept().unwrap();
    // Data both ways: the reply path works, whichever source the backend saw.
    accepted.write_all(b"pong").unwrap();
    let mut reply = [0u8; 4];
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"pong");
    peer.ip()
}

/// Three namespaces: client — director — backend. The director DNATs VIP:80 to the backend
/// (standing in for IPVS, which this host's kernel lacks; both leave the original destination
/// in conntrack) and marks IPv4 traffic to port 81 with 0x10 (standing in for a fwmark rule).
/// The backend routes back through the director either way, so only the masquerade decides
/// which source it sees.
#[test]
fn netns_nft_masquerades_by_original_destination_and_mark() {
    let client = Netns::new("nft-cl");
    let director = Netns::new("nft-dir");
    let backend = Netns::new("nft-be");
    director.ip(&[
        "link",
        "add",
        "d0",
        "type",
        "veth",
        "peer",
        "name",
        "c0",
        "netns",
        &client.name,
    ]);
    director.ip(&[
        "link",
        "add",
        "d1",
        "type",
        "veth",
        "peer",
        "name",
        "b0",
        "netns",
        &backend.name,
    ]);
    for (ns, link, v4, v6) in [
        (&client, "c0", "10.0.0.2/24", "fd00::2/64"),
        (&director, "d0", "10.0.0.1/24", "fd00::1/64"),
        (&director, "d1", "10.1.0.1/24", "fd01::1/64"),
        (&backend, "b0", "10.1.0.2/24", "fd01::2/64"),
    ] {
        ns.ip(&["addr", "add", v4, "dev", link]);
        ns.ip(&["addr", "add", v6, "dev", link, "nodad"]);
        ns.ip(&["link", "set", link, "up"]);
    }
    director.ip(&["addr", "add", "192.0.2.100/32", "dev", "lo"]);
    director.ip(&["addr", "add", "2001:db8::100/128", "dev", "lo"]);
    client.ip(&["route", "add", "default", "via", "10.0.0.1"]);
    client.ip(&["-6", "route", "add", "default", "via", "fd00::1"]);
    backend.ip(&["route", "add", "default", "via", "10.1.0.1"]);
    backend.ip(&["-6", "route", "add", "default", "via", "fd01::1"]);
    director.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
    director.exec(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"]);
    load(
        &director,
        "table inet standin {
	chain prerouting_mark {
		type filter hook prerouting priority mangle; policy accept;
		ip daddr 192.0.2.100 tcp dport 81 meta mark set 0x10
	}
	chain prerouting_dnat {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 192.0.2.100 tcp dport { 80, 81 } dnat ip to 10.1.0.2:8080
		ip6 daddr 2001:db8::100 tcp dport 80 dnat ip6 to [fd01::2]:8080
	}
}
",
    );

    let vip4: SocketAddr = "192.0.2.100:80".parse().unwrap();
    let vip4_marked: SocketAddr = "192.0.2.100:81".parse().unwrap();
    let vip6: SocketAddr = "[2001:db8::100]:80".parse().unwrap();
    let backend4: IpAddr = "10.1.0.2".parse().unwrap();
    let backend6: IpAddr = "fd01::2".parse().unwrap();
    let client4: IpAddr = "10.0.0.2".parse().unwrap();
    let client6: IpAddr = "fd00::2".parse().unwrap();
    let director4: IpAddr = "10.1.0.1".parse().unwrap();
    let director6: IpAddr = "fd01::1".parse().unwrap();

    // No masquerade yet: the backend sees the client.
    assert_eq!(source_seen(&client, &backend, vip4, backend4), client4);
    assert_eq!(source_seen(&client, &backend, vip6, backend6), client6);

    let mut rules = NftRules::new("nft").in_netns(&director.name);
    let wanted = BTreeSet::from([
        service("192.0.2.100", Protocol::TCP, 80),
        service("2001:db8::100", Protocol::TCP, 80),
    ]);
    block_on(rules.apply(&wanted)).unwrap();
    assert_eq!(source_seen(&client, &backend, vip4, backend4), director4);
    assert_eq!(source_seen(&client, &backend, vip6, backend6), director6);
    // Port 81 is not in the set, and its mark is not either.
    assert_eq!(
        source_seen(&client, &backend, vip4_marked, backend4),
        client4
    );

    // The same address and port over UDP, and another port: not ours to masquerade.
    let other = BTreeSet::from([
        service("192.0.2.100", Protocol::UDP, 80),
        service("192.0.2.100", Protocol::TCP, 82),
        service("2001:db8::100", Protocol::TCP, 8080),
    ]);
    block_on(rules.apply(&other)).unwrap();
    assert_eq!(source_seen(&client, &backend, vip4, backend4), client4);
    assert_eq!(source_seen(&client, &backend, vip6, backend6), client6);

    block_on(rules.apply(&BTreeSet::from([MasqueradeMatch::Fwmark(0x10)]))).unwrap();
    assert_eq!(
        source_seen(&client, &backend, vip4_marked, backend4),
        director4
    );
    assert_eq!(source_seen(&client, &backend, vip4, backend4), client4);

    block_on(rules.remove()).unwrap();
    assert_eq!(
        source_seen(&client, &backend, vip4_marked, backend4),
        client4
    );
    assert!(tables(&director).contains("table inet standin"));
}

/// A restarted agent takes over the table its predecessor applied, with no nft write, when
/// the table is exactly what was recorded after that apply and the wanted set is the same;
/// a different wanted set, or a table changed behind the agent's back, is rewritten.
#[test]
fn netns_nft_a_restart_adopts_the_recorded_table_without_a_write() {
    let ns = Netns::new("nftad");
    let wanted = BTreeSet::from([
        service("192.0.2.10", Protocol::TCP, 80),
        MasqueradeMatch::Fwmark(0x10),
    ]);
    let mut before = NftRules::new("nft").in_netns(&ns.name);
    let none = block_on(before.record(&BTreeSet::new())).expect("record without a table");
    assert_eq!(none.listing, None);
    block_on(before.apply(&wanted)).expect("apply");
    // Through the file format the state directory keeps.
    let text = block_on(before.record(&wanted)).expect("record").to_text();
    let record = NftRecord::from_text(&text).expect("a record reads back");
    let with_handles = || ns.exec(&["nft", "-a", "list", "table", "inet", "ferrovip"]);
    let handles = with_handles();

    let mut after = NftRules::new("nft").in_netns(&ns.name);
    assert!(block_on(after.adopt(&wanted, &record)).expect("adopt"));
    assert!(!block_on(after.apply(&wanted)).expect("apply"), "nft ran");
    assert_eq!(after.invocations(), 0, "adopting wrote");
    assert_eq!(with_handles(), handles, "the table was re-created");

    let fewer = BTreeSet::from([service("192.0.2.10", Protocol::TCP, 80)]);
    let mut other = NftRules::new("nft").in_netns(&ns.name);
    assert!(!block_on(other.adopt(&fewer, &record)).expect("adopt"));
    ns.exec(&[
        "nft", "add", "element", "inet", "ferrovip", "fwmarks", "{ 0x20 }",
    ]);
    let mut changed = NftRules::new("nft").in_netns(&ns.name);
    assert!(!block_on(changed.adopt(&wanted, &record)).expect("adopt"));
    assert!(
        block_on(changed.apply(&wanted)).expect("apply"),
        "the change is repaired"
    );
    assert_eq!(listed(&ns).0, wanted);
}
