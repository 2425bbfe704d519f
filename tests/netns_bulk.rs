//! Bulk address sets (an anchor address plus `local` routes) and batched address changes,
//! against a real kernel in network namespaces. Needs root.

mod netns_util;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ferrovip::node::addr::{AddressEvent, AddressManager, AddressWatcher, arp_ignore_fallbacks};
use ferrovip::node::ownership::OwnershipMode;
use ferrovip::node::route::cidr_cover;
use ipnet::{IpNet, Ipv4Net};
use netns_util::{Netns, ifindex, wait_until};

/// The node's namespace: veth `va` (10.0.0.1/8) whose peer `vb` (10.0.0.2/8) is in a second
/// namespace, the peer that sends ARP and pings.
fn setup(tag: &str) -> (Netns, Netns, u32) {
    let node = Netns::new(tag);
    let peer = Netns::new(&format!("{tag}p"));
    node.ip(&["link", "add", "va", "type", "veth", "peer", "name", "vb"]);
    node.ip(&["link", "set", "vb", "netns", &peer.name]);
    node.ip(&["addr", "add", "10.0.0.1/8", "dev", "va"]);
    node.ip(&["link", "set", "va", "up"]);
    peer.ip(&["addr", "add", "10.0.0.2/8", "dev", "vb"]);
    peer.ip(&["link", "set", "vb", "up"]);
    let index = ifindex(&node, "va");
    (node, peer, index)
}

/// `count` IPv4 /32s from `first` on.
fn v4_set(first: Ipv4Addr, count: u32) -> Vec<IpNet> {
    let first = u32::from(first);
    (first..first + count)
        .map(|a| IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), 32).unwrap()))
        .collect()
}

fn routes(ns: &Netns) -> Vec<String> {
    ns.ip(&["route", "show", "table", "main", "proto", "0x46"])
        .lines()
        .map(str::to_owned)
        .collect()
}

fn v4_addresses(ns: &Netns) -> Vec<String> {
    ns.ip(&["-4", "-o", "addr", "show", "dev", "va"])
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_owned())
        .collect()
}

/// Whether the namespace's route to `ip` is `local` (no route at all is not).
fn is_local(ns: &Netns, ip: &str) -> bool {
    std::process::Command::new("ip")
        .args(["-n", &ns.name, "route", "get", ip])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with("local "))
}

/// The Ethernet address of `dev` in `ns`.
fn mac_of(ns: &Netns, dev: &str) -> String {
    ns.ip(&["link", "show", dev])
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap()
        .to_owned()
}

/// A state directory removed when the test ends, also on failure.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fv-netns-bulk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn netns_bulk_ten_thousand_ipv4_addresses_as_routes_answered_and_removed() {
    let (node, peer, index) = setup("bulk");
    let set = v4_set(Ipv4Addr::new(10, 1, 0, 1), 10_000);
    let v4s: Vec<Ipv4Addr> = set
        .iter()
        .map(|n| match n {
            IpNet::V4(v) => v.addr(),
            IpNet::V6(_) => unreachable!(),
        })
        .collect();
    // The anchor (the lowest) is an interface address; the routes cover the rest.
    let v4s: Vec<std::net::IpAddr> = v4s.into_iter().map(std::net::IpAddr::V4).collect();
    let cover = cidr_cover(&v4s[1..]);
    let (failed, took) = node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        let start = Instant::now();
        let failed = manager
            .add_all(index, &set, Some(Duration::from_secs(60)))
            .await;
        (failed.len(), start.elapsed())
    });
    println!("10,000 IPv4 in bulk: installed in {took:?}");
    assert_eq!(failed, 0);
    let shown = routes(&node);
    assert_eq!(shown.len(), cover.len(), "{shown:?}");
    assert!(cover.len() <= 28, "{} routes", cover.len());
    for (line, prefix) in shown.iter().zip(&cover) {
        let want = if prefix.prefix_len() == 32 {
            format!("local {} dev va scope host src 10.1.0.1", prefix.addr())
        } else {
            format!("local {prefix} dev va scope host src 10.1.0.1")
        };
        assert_eq!(line.trim(), want);
    }
    // Only the anchor is an interface address (besides the node's own).
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8", "10.1.0.1/32"]);
    for ip in ["10.1.0.1", "10.1.19.136", "10.1.39.16"] {
        assert!(is_local(&node, ip), "{ip} not local");
    }
    assert!(!is_local(&node, "10.1.39.17"), "one past the set is local");
    assert!(!is_local(&node, "10.1.0.0"), "one before the set is local");
    // The peer's ARP for a covered address is answered and its ping too.
    peer.exec(&["ping", "-c", "1", "-W", "2", "10.1.23.45"]);
    let neigh = peer.ip(&["neigh", "show", "10.1.23.45", "dev", "vb"]);
    let mac = mac_of(&node, "va");
    assert!(neigh.contains(&mac), "{neigh} lacks {mac}");
    assert!(
        !ping_ok(&peer, "10.1.39.17"),
        "an address outside the set answered"
    );

    // A manager that did not install (or adopt, `take_over`) the set does not take its
    // route-held members apart.
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.remove_all(index, &set[1..3]).await.is_empty());
    });
    assert_eq!(routes(&node).len(), cover.len());

    let (failed, took) = node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        let failed = manager
            .add_all(index, &set, Some(Duration::from_secs(60)))
            .await;
        assert!(failed.is_empty(), "{failed:?}");
        let start = Instant::now();
        let failed = manager.remove_all(index, &set).await;
        (failed.len(), start.elapsed())
    });
    println!("10,000 IPv4 in bulk: removed in {took:?}");
    assert_eq!(failed, 0);
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
    assert!(!is_local(&node, "10.1.23.45"));
}

/// One ping from the peer (IPv4 or IPv6, by the address), its neighbour cache flushed first
/// so that the address is resolved again.
fn ping_ok(ns: &Netns, ip: &str) -> bool {
    let family = if ip.contains(':') { "-6" } else { "-4" };
    ns.ip_ok(&[family, "neigh", "flush", "dev", "vb"])
        && std::process::Command::new("ip")
            .args([
                "netns", "exec", &ns.name, "ping", family, "-c", "1", "-W", "1", ip,
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
}

#[test]
fn netns_bulk_removing_part_of_a_set_reanchors_it() {
    let (node, _peer, index) = setup("part");
    let set = v4_set(Ipv4Addr::new(10, 2, 0, 1), 100);
    let (left, right) = set.split_at(10);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.add_all(index, &set, None).await.is_empty());
        assert!(manager.remove_all(index, left).await.is_empty());
        // The rest is one set still: adding it again changes nothing.
        assert!(manager.add_all(index, right, None).await.is_empty());
    });
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8", "10.2.0.11/32"]);
    assert!(!is_local(&node, "10.2.0.10"));
    assert!(is_local(&node, "10.2.0.11"));
    assert!(is_local(&node, "10.2.0.100"));
    let shown = routes(&node);
    assert!(
        shown
            .iter()
            .all(|l| l.ends_with("src 10.2.0.11 ") || l.ends_with("src 10.2.0.11")),
        "{shown:?}"
    );
    assert_eq!(
        shown.len(),
        cidr_cover(
            &(12..=100)
                .map(|i| std::net::IpAddr::V4(Ipv4Addr::new(10, 2, 0, i)))
                .collect::<Vec<_>>()
        )
        .len()
    );
}

/// Services are allocated a few at a time: a group that grows by small adds (each under the
/// threshold) becomes one set once it passes the threshold, taking over the interface
/// addresses it had (deleted without a loss reported), and grows from then on by routes.
#[test]
fn netns_bulk_a_group_growing_a_few_at_a_time_becomes_one_set() {
    let (node, peer, index) = setup("grow");
    let all = v4_set(Ipv4Addr::new(10, 6, 0, 1), 150);
    let events = node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn_for(&manager, tx).unwrap();
        // 10 × 5, then 10 more (60: interface addresses), then 10 (70 > 64: a set).
        for chunk in all[..70].chunks(10) {
            assert!(manager.add_all(index, chunk, None).await.is_empty());
        }
        // Then one at a time, above the anchor (routes) and the set's gaps filled.
        for net in &all[70..] {
            assert!(manager.add_all(index, &[*net], None).await.is_empty());
        }
        // Adding what is there changes nothing.
        assert!(manager.add_all(index, &all, None).await.is_empty());
        let mut events = Vec::new();
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            events.push(e);
        }
        let owned = manager.list_owned().await.unwrap();
        assert_eq!(owned.len(), all.len(), "{owned:?}");
        // Removing every other address shrinks the set; then the rest goes.
        let odd: Vec<IpNet> = all.iter().copied().skip(1).step_by(2).collect();
        assert!(manager.remove_all(index, &odd).await.is_empty());
        assert!(!is_local(&node, "10.6.0.2"));
        assert!(is_local(&node, "10.6.0.3"));
        assert!(manager.remove_all(index, &all).await.is_empty());
        events
    });
    assert!(events.is_empty(), "no loss was reported: {events:?}");
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert!(!is_local(&node, "10.6.0.150"));
    drop(peer);
}

/// The growth itself, checked between the steps: interface addresses up to the threshold,
/// then the anchor alone, every member local and answering ping from the peer throughout.
#[test]
fn netns_bulk_growth_keeps_every_address_reachable() {
    let (node, peer, index) = setup("growp");
    let all = v4_set(Ipv4Addr::new(10, 7, 0, 1), 100);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.add_all(index, &all[..60], None).await.is_empty());
        assert_eq!(
            v4_addresses(&node).len(),
            61,
            "60 interface addresses and the node's own"
        );
        assert!(ping_ok(&peer, "10.7.0.60"));
        assert!(manager.add_all(index, &all[60..70], None).await.is_empty());
        assert_eq!(
            v4_addresses(&node),
            vec!["10.0.0.1/8", "10.7.0.1/32"],
            "the set's anchor alone"
        );
        for ip in ["10.7.0.1", "10.7.0.2", "10.7.0.60", "10.7.0.70"] {
            assert!(is_local(&node, ip), "{ip}");
        }
        assert!(ping_ok(&peer, "10.7.0.33"));
        assert!(manager.add_all(index, &all[70..], None).await.is_empty());
        assert!(ping_ok(&peer, "10.7.0.100"));
        assert_eq!(
            routes(&node).len(),
            cidr_cover(
                &(2..=100)
                    .map(|i| std::net::IpAddr::V4(Ipv4Addr::new(10, 7, 0, i)))
                    .collect::<Vec<_>>()
            )
            .len(),
            "{:?}",
            routes(&node)
        );
        assert_eq!(manager.list_owned().await.unwrap().len(), 100);
    });
}

#[test]
fn netns_bulk_anchor_expiry_flushes_the_routes_and_reports_every_address() {
    let (node, _peer, index) = setup("exp");
    let set = v4_set(Ipv4Addr::new(10, 3, 0, 1), 300);
    let events = node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn_for(&manager, tx).unwrap();
        assert!(
            manager
                .add_all(index, &set, Some(Duration::from_secs(2)))
                .await
                .is_empty()
        );
        let mut removed = HashSet::new();
        let deadline = Instant::now() + Duration::from_secs(8);
        while removed.len() < set.len() {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.recv()).await {
                Ok(Some(AddressEvent::Removed { index: i, net })) if i == index => {
                    assert!(removed.insert(net), "{net} reported twice");
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(_) => break,
            }
        }
        // Nothing more comes for this set (the routes' own deletions are not reported).
        let more = tokio::time::timeout(Duration::from_millis(500), rx.recv()).await;
        assert!(more.is_err(), "{more:?}");
        removed
    });
    assert_eq!(events, set.iter().copied().collect::<HashSet<_>>());
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
}

#[test]
fn netns_bulk_a_deleted_route_reports_its_set_and_adding_puts_it_back() {
    let (node, _peer, index) = setup("del");
    let set = v4_set(Ipv4Addr::new(10, 4, 0, 0), 256);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn_for(&manager, tx).unwrap();
        assert!(manager.add_all(index, &set, None).await.is_empty());
        let status = std::process::Command::new("ip")
            .args([
                "route",
                "del",
                "local",
                "10.4.0.128/25",
                "table",
                "main",
                "dev",
                "va",
            ])
            .status()
            .unwrap();
        assert!(status.success());
        let mut removed = HashSet::new();
        while removed.len() < set.len() {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(AddressEvent::Removed { net, .. })) => {
                    removed.insert(net);
                }
                other => panic!("expected removals, got {other:?}"),
            }
        }
        // The engine adds the addresses again, one at a time: the first puts the set back.
        for net in &set {
            assert!(manager.add_all(index, &[*net], None).await.is_empty());
        }
    });
    assert_eq!(routes(&node).len(), 8, "{:?}", routes(&node));
    assert!(is_local(&node, "10.4.0.200"));
}

#[test]
fn netns_bulk_held_set_is_adopted_by_the_next_agent_and_cleaned_up() {
    let (node, _peer, index) = setup("hold");
    let dir = TempDir::new("hold");
    let set = v4_set(Ipv4Addr::new(10, 5, 0, 1), 500);
    node.block_on(|| async {
        let manager = AddressManager::connect_with_record(&dir.0, None)
            .await
            .unwrap();
        assert!(
            manager
                .add_all(index, &set, Some(Duration::from_secs(5)))
                .await
                .is_empty()
        );
        assert!(
            manager
                .hold_all(index, &set, Duration::from_secs(60))
                .await
                .is_empty()
        );
        manager.flush_record().unwrap();
    });
    let anchor = node.ip(&["-4", "addr", "show", "dev", "va", "to", "10.5.0.1/32"]);
    assert!(
        anchor.contains("valid_lft 60sec") || anchor.contains("valid_lft 59sec"),
        "{anchor}"
    );
    let (held, removed, listed) = node.block_on(|| async {
        let next = AddressManager::connect_with_record(&dir.0, None)
            .await
            .unwrap();
        let (held, removed) = next.take_over(std::time::SystemTime::now()).await.unwrap();
        let listed: HashSet<(u32, IpNet)> = next.list_owned().await.unwrap().into_iter().collect();
        // Adopted: the engine's lifetime change reaches the anchor only.
        assert!(
            next.set_lifetime_all(index, &set, Some(Duration::from_secs(9)))
                .await
                .is_empty()
        );
        (held, removed, listed)
    });
    let want: HashSet<(u32, IpNet)> = set.iter().map(|n| (index, *n)).collect();
    assert_eq!(held, want);
    assert!(removed.is_empty(), "{removed:?}");
    assert_eq!(listed, want);
    let anchor = node.ip(&["-4", "addr", "show", "dev", "va", "to", "10.5.0.1/32"]);
    assert!(
        anchor.contains("valid_lft 9sec") || anchor.contains("valid_lft 8sec"),
        "{anchor}"
    );
    assert!(!routes(&node).is_empty());

    let done = node.block_on(|| async { ferrovip::agent::cleanup(dir.0.clone()).await.unwrap() });
    assert!(
        done.iter().any(|l| l.starts_with("local route 10.5.0.")),
        "{done:?}"
    );
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
}

#[test]
fn netns_bulk_leftover_routes_of_a_crashed_agent_are_removed_at_start() {
    let (node, _peer, index) = setup("crash");
    let dir = TempDir::new("crash");
    let set = v4_set(Ipv4Addr::new(10, 6, 0, 1), 200);
    node.block_on(|| async {
        let manager = AddressManager::connect_with_record(&dir.0, Some(OwnershipMode::StateDir))
            .await
            .unwrap();
        assert!(manager.add_all(index, &set, None).await.is_empty());
        manager.flush_record().unwrap();
    });
    assert!(!routes(&node).is_empty());
    let (held, removed) = node.block_on(|| async {
        AddressManager::connect_with_record(&dir.0, Some(OwnershipMode::StateDir))
            .await
            .unwrap()
            .take_over(std::time::SystemTime::now())
            .await
            .unwrap()
    });
    assert!(held.is_empty(), "{held:?}");
    assert!(
        removed.contains(&(index, "10.6.0.1/32".parse().unwrap())),
        "{removed:?}"
    );
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
}

#[test]
fn netns_bulk_arp_ignore_falls_back_to_interface_addresses() {
    let (node, _peer, index) = setup("arpi");
    node.exec(&["sysctl", "-qw", "net.ipv4.conf.va.arp_ignore=1"]);
    let set = v4_set(Ipv4Addr::new(10, 7, 0, 1), 100);
    let before = arp_ignore_fallbacks();
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.add_all(index, &set, None).await.is_empty());
    });
    assert!(arp_ignore_fallbacks() > before);
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node).len(), 101);
    // `all` counts too (the larger of the two).
    node.exec(&["sysctl", "-qw", "net.ipv4.conf.va.arp_ignore=0"]);
    node.exec(&["sysctl", "-qw", "net.ipv4.conf.all.arp_ignore=2"]);
    let more = v4_set(Ipv4Addr::new(10, 8, 0, 1), 100);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.add_all(index, &more, None).await.is_empty());
        assert!(manager.remove_all(index, &set).await.is_empty());
        assert!(manager.remove_all(index, &more).await.is_empty());
    });
    assert!(routes(&node).is_empty());
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
}

#[test]
fn netns_bulk_threshold_zero_never_uses_routes() {
    let (node, _peer, index) = setup("zero");
    let set = v4_set(Ipv4Addr::new(10, 9, 0, 1), 100);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap().with_bulk_threshold(0);
        assert!(manager.add_all(index, &set, None).await.is_empty());
    });
    assert!(routes(&node).is_empty());
    assert_eq!(v4_addresses(&node).len(), 101);
}

#[test]
fn netns_bulk_ipv6_batch_of_two_thousand_and_one_bad_request() {
    let (node, _peer, index) = setup("v6");
    let set: Vec<IpNet> = (1..=2000u32)
        .map(|i| format!("2001:db8:1::{i:x}/128").parse().unwrap())
        .collect();
    let (failed, took_add, took_remove) = node.block_on(|| async {
        // Interface addresses, batched (threshold 0: no bulk set).
        let manager = AddressManager::connect().unwrap().with_bulk_threshold(0);
        let start = Instant::now();
        let failed = manager
            .add_all(index, &set, Some(Duration::from_secs(60)))
            .await;
        let took_add = start.elapsed();
        assert!(failed.is_empty(), "{failed:?}");
        let shown = std::process::Command::new("ip")
            .args(["-6", "-o", "addr", "show", "dev", "va", "scope", "global"])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&shown.stdout).lines().count(), 2000);
        // A restart hold of all of them: one batch.
        let start = Instant::now();
        assert!(
            manager
                .hold_all(index, &set, Duration::from_secs(30))
                .await
                .is_empty()
        );
        println!("2,000 IPv6 held in {:?}", start.elapsed());
        let wanted: Vec<(u32, IpNet)> = set.iter().map(|n| (index, *n)).collect();
        let start = Instant::now();
        let report = manager.renew(&wanted, Duration::from_secs(30)).unwrap();
        assert!(report.failed.is_empty(), "{report:?}");
        assert_eq!(report.renewed, 2000);
        println!(
            "2,000 IPv6 renewed in {:?} ({} sendmsg)",
            start.elapsed(),
            report.writes
        );
        let shown = std::process::Command::new("ip")
            .args(["-6", "-o", "addr", "show", "dev", "va", "scope", "global"])
            .output()
            .unwrap();
        let shown = String::from_utf8_lossy(&shown.stdout);
        assert_eq!(
            shown
                .lines()
                .filter(|l| {
                    // The kernel takes a while for 2,000 (its IPv6 lifetime check walks
                    // every address on each change): at least 20 s left on every one.
                    l.split("valid_lft ")
                        .nth(1)
                        .and_then(|r| r.split("sec").next())
                        .and_then(|n| n.parse::<u32>().ok())
                        .is_some_and(|n| (20..=30).contains(&n))
                })
                .count(),
            2000,
            "{shown}"
        );
        let start = Instant::now();
        let failed = manager.remove_all(index, &set).await;
        (failed, took_add, start.elapsed())
    });
    println!("2,000 IPv6 batched: added in {took_add:?}, removed in {took_remove:?}");
    assert!(failed.is_empty(), "{failed:?}");
    let left = node.ip(&["-6", "-o", "addr", "show", "dev", "va", "scope", "global"]);
    assert!(left.is_empty(), "{left}");

    // One request the kernel refuses (a multicast address) among good ones: exactly that
    // address is reported, by name, and the others are there.
    let bad: IpNet = "ff0e::1/128".parse().unwrap();
    let mut mixed: Vec<IpNet> = (1..=50u32)
        .map(|i| format!("2001:db8:2::{i:x}/128").parse().unwrap())
        .collect();
    mixed.insert(20, bad);
    let failed = node.block_on(|| async {
        let manager = AddressManager::connect().unwrap().with_bulk_threshold(0);
        manager
            .add_all(index, &mixed, None)
            .await
            .into_iter()
            .map(|(net, e)| (net, e.to_string(), e.errno()))
            .collect::<Vec<_>>()
    });
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0].0, bad);
    assert!(failed[0].1.contains("ff0e::1/128"), "{}", failed[0].1);
    // EINVAL on 6.x ("Cannot assign multicast address"), EADDRNOTAVAIL on older kernels.
    assert!(
        matches!(failed[0].2, Some(libc::EINVAL | libc::EADDRNOTAVAIL)),
        "{failed:?}"
    );
    let shown = node.ip(&["-6", "-o", "addr", "show", "dev", "va", "scope", "global"]);
    assert_eq!(shown.lines().count(), 50, "{shown}");
}

fn v6_routes(ns: &Netns) -> Vec<String> {
    // iproute2 lists no IPv6 `local` route under `table main`: all tables, main's only.
    ns.ip(&["-6", "route", "show", "table", "all", "proto", "0x46"])
        .lines()
        .filter(|l| !l.contains(" table "))
        .map(str::to_owned)
        .collect()
}

fn v6_global(ns: &Netns) -> Vec<String> {
    ns.ip(&["-6", "-o", "addr", "show", "dev", "va", "scope", "global"])
        .lines()
        .map(|l| l.split_whitespace().nth(3).unwrap_or_default().to_owned())
        .collect()
}

/// 2,000 IPv6 VIPs as one bulk set: an anchor and a handful of expiring `local` routes, the
/// peer's neighbour solicitations answered by the NDP responder; renewal keeps the routes,
/// without it they expire and are no longer answered for; a deleted route reports the set,
/// a restart hold is adopted, and cleanup removes everything.
#[test]
fn netns_bulk_two_thousand_ipv6_as_expiring_routes_answered_by_ndp() {
    let (node, peer, index) = setup("v6b");
    node.ip(&["-6", "addr", "add", "2001:db8::1/64", "dev", "va", "nodad"]);
    peer.ip(&["-6", "addr", "add", "2001:db8::2/64", "dev", "vb", "nodad"]);
    // The VIPs are on-link for the peer (it resolves them with neighbour solicitations).
    peer.ip(&["-6", "route", "add", "2001:db8:1::/48", "dev", "vb"]);
    // Link-locals out of DAD: a reply from a route-held address resolves the peer with the
    // interface's link-local as source, which is held back while tentative.
    let ready = |ns: &Netns, dev: &str| {
        let shown = ns.ip(&["-6", "addr", "show", "dev", dev, "scope", "link"]);
        shown.contains("fe80") && !shown.contains("tentative")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !(ready(&node, "va") && ready(&peer, "vb")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    let dir = TempDir::new("v6b");
    let set: Vec<IpNet> = (1..=2000u32)
        .map(|i| format!("2001:db8:1::{i:x}/128").parse().unwrap())
        .collect();
    let ips: Vec<std::net::IpAddr> = set.iter().map(IpNet::addr).collect();
    let cover = cidr_cover(&ips[1..]);
    let mac = mac_of(&node, "va");
    node.block_on(|| async {
        let manager = AddressManager::connect_with_record(&dir.0, None)
            .await
            .unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn_for(&manager, tx).unwrap();
        let start = Instant::now();
        let failed = manager
            .add_all(index, &set, Some(Duration::from_secs(10)))
            .await;
        println!("2,000 IPv6 in bulk: installed in {:?}", start.elapsed());
        assert!(failed.is_empty(), "{failed:?}");
        let shown = v6_routes(&node);
        assert_eq!(shown.len(), cover.len(), "{shown:?}");
        assert!(shown.iter().all(|l| l.contains("expires")), "{shown:?}");
        assert_eq!(
            v6_global(&node),
            vec!["2001:db8:1::1/128", "2001:db8::1/64"]
        );
        // Answered through the responder (the peer resolves the neighbour), and pinged.
        assert!(ping_ok(&peer, "2001:db8:1::5a"));
        let neigh = peer.ip(&["-6", "neigh", "show", "2001:db8:1::5a", "dev", "vb"]);
        assert!(neigh.contains(&mac), "{neigh} lacks {mac}");
        assert!(ferrovip::node::ndp::answers_total() >= 1);
        assert_eq!(ferrovip::node::addr::ndp_fallbacks(), 0);
        assert!(ping_ok(&peer, "2001:db8:1::7d0"), "the last member");
        assert!(
            !ping_ok(&peer, "2001:db8:1::7d1"),
            "one past the set answered"
        );
        // The members' solicited-node groups are joined (MLD-snooping switches forward
        // solicitations only to ports that reported them); the anchor's is the kernel's.
        wait_until("the members' groups", Duration::from_secs(5), || {
            member_groups(&node) == (2..=2000).collect::<Vec<u32>>()
        });

        // Renewal (the engine's, three times a second) keeps the routes past their lifetime.
        let anchor = [(index, set[0])];
        let until = Instant::now() + Duration::from_millis(3500);
        while Instant::now() < until {
            let report = manager.renew(&anchor, Duration::from_secs(2)).unwrap();
            assert!(report.failed.is_empty(), "{report:?}");
            assert_eq!(report.renewed, 1 + cover.len());
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert!(is_local(&node, "2001:db8:1::3e8"));
        assert!(ping_ok(&peer, "2001:db8:1::3e8"));
        // A hung engine: no renewal, the routes expire and nobody answers for them.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(
            !is_local(&node, "2001:db8:1::3e8"),
            "an expired route still local"
        );
        assert!(
            !ping_ok(&peer, "2001:db8:1::3e9"),
            "an expired member answered"
        );
        // The anchor expired with them: the whole set was reported gone, once.
        let mut removed = HashSet::new();
        while let Ok(event) = rx.try_recv() {
            if let AddressEvent::Removed { net, .. } = event {
                assert!(removed.insert(net), "{net} reported twice");
            }
        }
        assert_eq!(removed.len(), set.len());
        // It wakes up: the engine adds its addresses again, the set is installed again.
        assert!(
            manager
                .add_all(index, &set[..1], Some(Duration::from_secs(60)))
                .await
                .is_empty()
        );
        assert!(ping_ok(&peer, "2001:db8:1::3e9"));
        assert_eq!(v6_routes(&node).len(), cover.len());
        tokio::time::sleep(Duration::from_millis(200)).await;
        while rx.try_recv().is_ok() {}

        // A route deleted by hand: every member reported once; adding one puts the set back.
        let victim = cover[cover.len() / 2];
        node.ip(&[
            "-6",
            "route",
            "del",
            "local",
            &victim.to_string(),
            "dev",
            "va",
            "table",
            "main",
        ]);
        let mut removed = HashSet::new();
        while removed.len() < set.len() {
            match tokio::time::timeout(Duration::from_secs(3), rx.recv()).await {
                Ok(Some(AddressEvent::Removed { net, .. })) => {
                    assert!(removed.insert(net), "{net} reported twice");
                }
                other => panic!("expected removals, got {other:?}"),
            }
        }
        assert!(
            manager
                .add_all(index, &set[5..6], Some(Duration::from_secs(60)))
                .await
                .is_empty()
        );
        assert_eq!(v6_routes(&node).len(), cover.len());
        assert!(is_local(&node, &victim.addr().to_string()));

        // Restart hold: anchor and routes keep 60 s; the next manager adopts them.
        assert!(
            manager
                .hold_all(index, &set, Duration::from_secs(60))
                .await
                .is_empty()
        );
        manager.flush_record().unwrap();
    });
    let shown = v6_routes(&node);
    assert!(
        shown
            .iter()
            .all(|l| l.contains("expires 60sec") || l.contains("expires 59sec")),
        "{shown:?}"
    );
    // The manager is gone and its groups with it; the held anchor keeps the kernel's.
    assert_eq!(member_groups(&node), Vec::<u32>::new());
    let (held, removed) = node.block_on(|| async {
        let next = AddressManager::connect_with_record(&dir.0, None)
            .await
            .unwrap();
        let taken = next.take_over(std::time::SystemTime::now()).await.unwrap();
        // The adopted set is answered for by the new manager's responder, its groups joined.
        assert!(ping_ok(&peer, "2001:db8:1::111"));
        wait_until(
            "the adopted members' groups",
            Duration::from_secs(5),
            || member_groups(&node).len() == 1999,
        );
        taken
    });
    assert_eq!(member_groups(&node), Vec::<u32>::new());
    let want: HashSet<(u32, IpNet)> = set.iter().map(|n| (index, *n)).collect();
    assert_eq!(held, want);
    assert!(removed.is_empty(), "{removed:?}");
    let done = node.block_on(|| async { ferrovip::agent::cleanup(dir.0.clone()).await.unwrap() });
    assert!(
        done.iter()
            .any(|l| l.starts_with("local route 2001:db8:1::")),
        "{done:?}"
    );
    assert!(v6_routes(&node).is_empty(), "{:?}", v6_routes(&node));
    assert_eq!(v6_global(&node), vec!["2001:db8::1/64"]);
}

/// The solicited-node groups joined on `va` for 2001:db8:1::2 to ::ffff (their low 24
/// bits, sorted), from `/proc/net/igmp6`: the groups of a set's members, not those of the
/// interface's own addresses.
fn member_groups(ns: &Netns) -> Vec<u32> {
    let link_local = ns.ip(&["-6", "addr", "show", "dev", "va", "scope", "link"]);
    let own = link_local
        .split("inet6 ")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
        .map(|a| u32::from_be_bytes([0, a.octets()[13], a.octets()[14], a.octets()[15]]));
    let mut groups: Vec<u32> = ns
        .solicited_groups("va")
        .into_iter()
        .filter(|low| (2..=0xffff).contains(low) && Some(*low) != own)
        .collect();
    groups.sort_unstable();
    groups
}

/// A node holding one group's set takes over another group whose addresses lie below that
/// set's anchor (a failover in the scale lab): they become a set of their own, not hundreds
/// of interface addresses; both sets stay whole and are removed cleanly.
#[test]
fn netns_bulk_a_group_below_a_set_becomes_a_set_of_its_own() {
    let (node, peer, index) = setup("below");
    let high = v4_set(Ipv4Addr::new(10, 8, 4, 0), 300);
    let low = v4_set(Ipv4Addr::new(10, 8, 0, 1), 300);
    node.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        assert!(manager.add_all(index, &high, None).await.is_empty());
        let start = Instant::now();
        assert!(manager.add_all(index, &low, None).await.is_empty());
        println!("300 below a set: installed in {:?}", start.elapsed());
        // Only the two anchors are interface addresses.
        assert_eq!(
            v4_addresses(&node),
            vec!["10.0.0.1/8", "10.8.4.0/32", "10.8.0.1/32"]
        );
        assert!(ping_ok(&peer, "10.8.0.200"));
        assert!(ping_ok(&peer, "10.8.5.20"));
        assert_eq!(manager.list_owned().await.unwrap().len(), 600);
        assert!(manager.remove_all(index, &low).await.is_empty());
        assert!(!is_local(&node, "10.8.0.200"));
        assert!(is_local(&node, "10.8.5.20"));
        assert!(manager.remove_all(index, &high).await.is_empty());
    });
    assert!(routes(&node).is_empty(), "{:?}", routes(&node));
    assert_eq!(v4_addresses(&node), vec!["10.0.0.1/8"]);
}
