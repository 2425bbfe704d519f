//! AddressManager against a real kernel in a network namespace. Needs root.

mod netns_util;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::Duration;

use ferrovip::node::addr::{AddressEvent, AddressManager, AddressWatcher, LinkInfo};
use ferrovip::node::ownership::OwnershipMode;
use ipnet::IpNet;
use netns_util::{Netns, ifindex};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A namespace with veth `va` (MAC 02:00:00:00:00:0a, MTU 1400, up) and its peer `vb`;
/// `va` has the node's own 192.0.2.1/24 and a foreign secondary 192.0.2.50/24.
fn setup() -> (Netns, u32) {
    let ns = Netns::new("addr");
    ns.ip(&[
        "link",
        "add",
        "va",
        "address",
        "02:00:00:00:00:0a",
        "mtu",
        "1400",
        "type",
        "veth",
        "peer",
        "name",
        "vb",
    ]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "va"]);
    ns.ip(&["addr", "add", "192.0.2.50/24", "dev", "va"]);
    ns.ip(&["link", "set", "va", "up"]);
    ns.ip(&["link", "set", "vb", "up"]);
    let index = ifindex(&ns, "va");
    (ns, index)
}

fn addresses(ns: &Netns) -> String {
    ns.ip(&["addr", "show", "dev", "va"])
}

#[test]
fn netns_addr_link_facts_and_source_addresses() {
    let (ns, index) = setup();
    netns_util::wait_until("link-local address of va", Duration::from_secs(5), || {
        let out = ns.ip(&["-6", "addr", "show", "dev", "va", "scope", "link"]);
        out.contains("fe80::") && !out.contains("tentative")
    });
    let (link, by_index, missing, primary, link_local) = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        (
            manager.link("va").await.unwrap(),
            manager.link_by_index(index).await.unwrap(),
            manager.link("nosuchif0").await.unwrap_err(),
            manager.primary_ipv4(index).await.unwrap(),
            manager.link_local_v6(index).await.unwrap(),
        )
    });
    assert_eq!(
        link,
        LinkInfo {
            index,
            name: "va".into(),
            mac: [2, 0, 0, 0, 0, 0x0a],
            up: true,
            carrier: true,
            mtu: 1400,
        }
    );
    assert_eq!(by_index, link);
    assert_eq!(missing.metric_label(), "link_not_found");
    assert_eq!(primary, Some(Ipv4Addr::new(192, 0, 2, 1)));
    let link_local = link_local.expect("a link-local address");
    let shown = ns.ip(&["-6", "addr", "show", "dev", "va", "scope", "link"]);
    assert!(shown.contains(&format!("{link_local}/64")), "{shown}");
}

#[test]
fn netns_addr_add_remove_and_cleanup_touch_only_our_addresses() {
    let (ns, index) = setup();
    let vip32 = net("192.0.2.100/32");
    let vip24 = net("192.0.2.101/24");
    let vip6 = net("2001:db8::100/64");
    let foreign = net("192.0.2.50/24");

    let (owned, primary, removed_foreign, cleaned, owned_after) = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        for vip in [vip32, vip24, vip6] {
            manager.add(index, vip).await.unwrap();
            // Idempotent.
            manager.add(index, vip).await.unwrap();
        }
        // Present but foreign: adding succeeds and leaves it foreign.
        manager.add(index, foreign).await.unwrap();
        let owned: HashSet<_> = manager.list_owned().await.unwrap().into_iter().collect();
        let primary = manager.primary_ipv4(index).await.unwrap();
        let removed_foreign = manager.remove(index, foreign).await.unwrap();
        let keep = HashSet::from([(index, vip32)]);
        let cleaned: HashSet<_> = manager
            .remove_all_owned_except(&keep)
            .await
            .unwrap()
            .into_iter()
            .collect();
        let owned_after = manager.list_owned().await.unwrap();
        (owned, primary, removed_foreign, cleaned, owned_after)
    });

    assert_eq!(
        owned,
        HashSet::from([(index, vip32), (index, vip24), (index, vip6)])
    );
    // Our /24 in the node's subnet is a secondary and never the advertisement source.
    assert_eq!(primary, Some(Ipv4Addr::new(192, 0, 2, 1)));
    assert!(!removed_foreign);
    assert_eq!(cleaned, HashSet::from([(index, vip24), (index, vip6)]));
    assert_eq!(owned_after, vec![(index, vip32)]);

    let shown = addresses(&ns);
    for present in ["192.0.2.1/24", "192.0.2.50/24", "192.0.2.100/32"] {
        assert!(shown.contains(present), "{present} missing: {shown}");
    }
    for absent in ["192.0.2.101", "2001:db8::100"] {
        assert!(!shown.contains(absent), "{absent} left: {shown}");
    }

    let (removed, removed_again) = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        (
            manager.remove(index, vip32).await.unwrap(),
            manager.remove(index, vip32).await.unwrap(),
        )
    });
    assert!(removed);
    assert!(!removed_again);
    assert!(!addresses(&ns).contains("192.0.2.100"));
}

#[test]
fn netns_addr_mark_survives_in_the_kernel_for_a_new_connection() {
    // A restarted agent (a new connection, no memory) finds the addresses by their mark,
    // and not the same addresses added by somebody else.
    let (ns, index) = setup();
    ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.add(index, net("192.0.2.100/32")).await.unwrap();
        manager.add(index, net("2001:db8::100/128")).await.unwrap();
    });
    ns.ip(&["addr", "add", "192.0.2.200/32", "dev", "va"]);
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8::200/128",
        "dev",
        "va",
        "nodad",
    ]);
    let owned: HashSet<_> = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.list_owned().await.unwrap().into_iter().collect()
    });
    assert_eq!(
        owned,
        HashSet::from([
            (index, net("192.0.2.100/32")),
            (index, net("2001:db8::100/128")),
        ])
    );
}

#[test]
fn netns_addr_ipv6_vip_is_usable_at_once() {
    let (ns, index) = setup();
    ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.add(index, net("2001:db8::100/64")).await.unwrap();
    });
    let shown = ns.ip(&["-6", "addr", "show", "dev", "va"]);
    let line = shown
        .lines()
        .find(|l| l.contains("2001:db8::100/64"))
        .unwrap_or_else(|| panic!("VIP missing: {shown}"));
    assert!(line.contains("nodad"), "{line}");
    assert!(!line.contains("tentative"), "{line}");
    // The prefix route is kept, like keepalived.
    let routes = ns.ip(&["-6", "route", "show", "dev", "va"]);
    assert!(routes.contains("2001:db8::/64"), "{routes}");
}

#[test]
fn netns_addr_removing_a_primary_vip_keeps_foreign_secondaries() {
    // Our VIP is the first address of 198.51.100.0/24, so the kernel makes it primary and
    // a later foreign address of that subnet secondary. Deleting a primary deletes its
    // secondaries unless promote_secondaries is on, which add() turns on.
    let (ns, index) = setup();
    let vip = net("198.51.100.10/24");
    ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.add(index, vip).await.unwrap();
    });
    assert_eq!(
        ns.read_proc("/proc/sys/net/ipv4/conf/va/promote_secondaries"),
        "1"
    );
    ns.ip(&["addr", "add", "198.51.100.20/24", "dev", "va"]);
    assert!(addresses(&ns).contains("198.51.100.20/24 scope global secondary"));
    let removed = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.remove(index, vip).await.unwrap()
    });
    assert!(removed);
    let shown = addresses(&ns);
    assert!(shown.contains("198.51.100.20/24"), "{shown}");
    assert!(!shown.contains("198.51.100.10"), "{shown}");
}

#[test]
fn netns_addr_add_on_a_missing_interface_is_link_not_found() {
    let (ns, _) = setup();
    let error = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.add(9999, net("2001:db8::1/128")).await.unwrap_err()
    });
    assert_eq!(error.metric_label(), "link_not_found", "{error:?}");
}

#[test]
fn netns_addr_this_kernel_keeps_the_mark_and_the_probe_leaves_nothing() {
    let (ns, _) = setup();
    let keeps = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.kernel_keeps_mark().await.unwrap()
    });
    // This host's kernel is ≥ 6.1 (the VM and CI run 6.x); a 5.x kernel answers false.
    let release = netns_util::run("uname", &["-r"]);
    let mut numbers = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let version = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    assert_eq!(keeps, version >= (6, 1), "kernel {release}");
    let lo = ns.ip(&["addr", "show", "dev", "lo"]);
    assert!(!lo.contains("127.70.70.70"), "probe left behind: {lo}");
}

#[test]
fn netns_addr_state_dir_ownership_works_without_the_mark_and_hands_over_held_addresses() {
    let (ns, index) = setup();
    let dir = std::env::temp_dir().join(format!("fv-netns-addr-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (vip, held, leftover, twin) = (
        net("192.0.2.100/32"),
        net("192.0.2.101/32"),
        net("2001:db8::102/128"),
        net("192.0.2.50/24"),
    );
    let listed = ns.block_on(|| async {
        let manager = AddressManager::connect_with_record(&dir, Some(OwnershipMode::StateDir))
            .await
            .unwrap();
        assert_eq!(manager.mode(), OwnershipMode::StateDir);
        for v in [vip, held, leftover] {
            manager.add(index, v).await.unwrap();
        }
        // The foreign twin stays foreign.
        manager.add(index, twin).await.unwrap();
        assert!(
            manager
                .hold(index, held, Duration::from_secs(30))
                .await
                .unwrap()
        );
        assert!(
            !manager
                .hold(index, twin, Duration::from_secs(30))
                .await
                .unwrap()
        );
        manager.flush_record().unwrap();
        let mut listed = manager.list_owned().await.unwrap();
        listed.sort();
        listed
    });
    assert_eq!(listed, vec![(index, vip), (index, held), (index, leftover)]);
    // No mark: a manager that trusts only the mark sees none of them.
    let marked = ns.block_on(|| async {
        AddressManager::connect()
            .unwrap()
            .list_owned()
            .await
            .unwrap()
    });
    assert!(marked.is_empty(), "{marked:?}");

    // The next agent: the held address waits for adoption, the rest of ours goes, the
    // foreign twin stays.
    let (held_now, removed) = ns.block_on(|| async {
        let manager = AddressManager::connect_with_record(&dir, Some(OwnershipMode::StateDir))
            .await
            .unwrap();
        manager
            .take_over(std::time::SystemTime::now())
            .await
            .unwrap()
    });
    assert_eq!(held_now, HashSet::from([(index, held)]));
    let removed: HashSet<_> = removed.into_iter().collect();
    assert_eq!(removed, HashSet::from([(index, vip), (index, leftover)]));
    let shown = ns.ip(&["addr", "show", "dev", "va"]);
    assert!(
        shown.contains("192.0.2.101/32") && shown.contains("192.0.2.50/24"),
        "{shown}"
    );
    assert!(
        !shown.contains("192.0.2.100/32") && !shown.contains("2001:db8::102"),
        "{shown}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn netns_addr_renewal_batches_keep_our_lifetimes_and_leave_foreign_ones() {
    let (ns, index) = setup();
    let vips: Vec<IpNet> = (1..=300)
        .map(|i| net(&format!("198.18.{}.{}/32", i / 200, i % 200 + 1)))
        .chain([net("2001:db8::100/128")])
        .collect();
    let foreign = net("192.0.2.50/24");
    let (report, gone_back) = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        for v in &vips {
            manager.add(index, *v).await.unwrap();
        }
        let mut wanted: Vec<(u32, IpNet)> = vips.iter().map(|v| (index, *v)).collect();
        wanted.push((index, foreign));
        let m = manager.clone();
        let w = wanted.clone();
        let report = tokio::task::spawn_blocking(move || m.renew(&w, Duration::from_secs(7)))
            .await
            .unwrap()
            .unwrap();
        // A renewal puts back one of ours that vanished.
        let first = vips[0];
        let m = manager.clone();
        let w = vec![(index, first)];
        let out = std::process::Command::new("ip")
            .args(["addr", "del", &first.to_string(), "dev", "va"])
            .status()
            .unwrap();
        assert!(out.success());
        tokio::task::spawn_blocking(move || m.renew(&w, Duration::from_secs(7)))
            .await
            .unwrap()
            .unwrap();
        let back = manager
            .list_owned()
            .await
            .unwrap()
            .contains(&(index, first));
        (report, back)
    });
    assert_eq!(report.renewed, 301, "ours only: {report:?}");
    assert_eq!(report.writes, 2, "256 requests per sendmsg: {report:?}");
    assert!(report.failed.is_empty(), "{report:?}");
    assert!(gone_back);
    let shown = ns.ip(&["addr", "show", "dev", "va"]);
    let section = |ip: &str| {
        shown
            .split("inet")
            .find(|s| s.trim_start().starts_with(ip))
            .unwrap_or_else(|| panic!("{ip} missing: {shown}"))
            .to_owned()
    };
    let ours = section("198.18.0.2/32");
    assert!(
        ours.contains("valid_lft 7sec") || ours.contains("valid_lft 6sec"),
        "{ours}"
    );
    assert!(
        section("6 2001:db8::100/128").contains("valid_lft"),
        "{shown}"
    );
    assert!(
        section("192.0.2.50/24").contains("valid_lft forever"),
        "foreign renewed: {shown}"
    );
}

#[test]
fn netns_addr_the_watcher_reports_removed_addresses() {
    let (ns, index) = setup();
    let events = ns.block_on(|| async {
        let manager = AddressManager::connect().unwrap();
        manager.add(index, net("192.0.2.100/32")).await.unwrap();
        manager.add(index, net("2001:db8::100/128")).await.unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn(tx).unwrap();
        for gone in ["192.0.2.100/32", "2001:db8::100/128"] {
            let status = std::process::Command::new("ip")
                .args(["addr", "del", gone, "dev", "va"])
                .status()
                .unwrap();
            assert!(status.success());
        }
        let mut events = Vec::new();
        while events.len() < 2 {
            let event = tokio::time::timeout(Duration::from_secs(2), rx.recv())
                .await
                .expect("a notification within 2 s")
                .unwrap();
            events.push(event);
        }
        events
    });
    assert_eq!(
        events,
        vec![
            AddressEvent::Removed {
                index,
                net: net("192.0.2.100/32")
            },
            AddressEvent::Removed {
                index,
                net: net("2001:db8::100/128")
            },
        ]
    );
}
