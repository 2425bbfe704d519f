//! Virtual-MAC macvlans against a real kernel in network namespaces. Needs root.

mod netns_util;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrovip::node::addr::AddressManager;
use ferrovip::node::announce::{Announcer, garp_frame};
use ferrovip::node::link::{ArpSettings, MacvlanManager, VmacLink, vmac_name};
use ferrovip::vocab::Family;
use netns_util::{Netns, ifindex};
use pnet_datalink::Channel;

const VMAC4_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];
const VMAC6_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x02, 0x33];

fn manager() -> MacvlanManager {
    MacvlanManager::new(AddressManager::connect().unwrap().handle().clone())
}

/// A namespace with veth `va` (up, 192.0.2.1/24) whose peer `vb` is up in a second one.
fn setup() -> (Netns, Netns, u32) {
    let ns = Netns::new("link");
    let peer = Netns::new("link-peer");
    ns.ip(&[
        "link", "add", "va", "type", "veth", "peer", "name", "vb", "netns", &peer.name,
    ]);
    ns.ip(&["addr", "add", "192.0.2.1/24", "dev", "va"]);
    ns.ip(&["link", "set", "va", "up"]);
    peer.ip(&["link", "set", "vb", "up"]);
    let index = ifindex(&ns, "va");
    (ns, peer, index)
}

fn conf(ns: &Netns, ifname: &str, key: &str) -> String {
    ns.read_proc(&format!("/proc/sys/net/ipv4/conf/{ifname}/{key}"))
}

#[test]
fn netns_link_ensure_macvlan_creates_configures_and_is_idempotent() {
    let (ns, _peer, parent) = setup();
    let name = vmac_name(parent, Family::V4, 51);
    assert_eq!(conf(&ns, "va", "arp_ignore"), "0");
    let (index, again, listed) = ns.block_on(|| async {
        let links = manager();
        let index = links.ensure_macvlan(parent, &name, VMAC4_51).await.unwrap();
        let again = links.ensure_macvlan(parent, &name, VMAC4_51).await.unwrap();
        (index, again, links.list_owned().await.unwrap())
    });
    assert_eq!(index, again);
    assert_eq!(
        listed,
        vec![VmacLink {
            index,
            name: name.clone(),
            parent_index: parent,
            mac: VMAC4_51,
            up: true,
        }]
    );

    let details = ns.ip(&["-d", "link", "show", "dev", &name]);
    assert!(details.contains(&format!("{name}@va")), "{details}");
    assert!(
        details.contains("link/ether 00:00:5e:00:01:33"),
        "{details}"
    );
    assert!(details.contains("macvlan mode bridge"), "{details}");
    assert!(details.contains("state UP"), "{details}");

    for (key, value) in [
        ("arp_ignore", "1"),
        ("accept_local", "1"),
        ("rp_filter", "0"),
        ("promote_secondaries", "1"),
    ] {
        assert_eq!(conf(&ns, &name, key), value, "{name} {key}");
    }
    assert_eq!(conf(&ns, "va", "arp_ignore"), "1");
    assert_eq!(conf(&ns, "va", "arp_filter"), "1");
    assert_eq!(conf(&ns, "va", "arp_announce"), "2");
    assert_eq!(
        ns.read_proc(&format!("/proc/sys/net/ipv6/conf/{name}/addr_gen_mode")),
        "1"
    );
    // No link-local address derived from the shared virtual MAC.
    std::thread::sleep(Duration::from_millis(300));
    let v6 = ns.ip(&["-6", "addr", "show", "dev", &name]);
    assert!(!v6.contains("inet6"), "{v6}");
}

#[test]
fn netns_link_ensure_macvlan_repairs_mac_state_and_parent() {
    let (ns, _peer, parent) = setup();
    ns.ip(&["link", "add", "vc", "type", "veth", "peer", "name", "vd"]);
    ns.ip(&["link", "set", "vc", "up"]);
    let other_parent = ifindex(&ns, "vc");
    let name = "fv-test";
    let first = ns.block_on(|| async {
        manager()
            .ensure_macvlan(parent, name, VMAC4_51)
            .await
            .unwrap()
    });

    // Somebody changed the MAC and took it down: put back, same interface.
    ns.ip(&["link", "set", name, "down", "address", "02:00:00:00:00:77"]);
    let repaired = ns.block_on(|| async {
        manager()
            .ensure_macvlan(parent, name, VMAC6_51)
            .await
            .unwrap()
    });
    assert_eq!(repaired, first);
    let details = ns.ip(&["link", "show", "dev", name]);
    assert!(
        details.contains("link/ether 00:00:5e:00:02:33"),
        "{details}"
    );
    assert!(details.contains(",UP"), "{details}");

    // Another parent: re-created there.
    let (moved, listed) = ns.block_on(|| async {
        let links = manager();
        let moved = links
            .ensure_macvlan(other_parent, name, VMAC6_51)
            .await
            .unwrap();
        (moved, links.list_owned().await.unwrap())
    });
    assert_ne!(moved, first);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].parent_index, other_parent);
    assert!(
        ns.ip(&["link", "show", "dev", name])
            .contains(&format!("{name}@vc"))
    );
}

#[test]
fn netns_link_never_touches_interfaces_that_are_not_ours() {
    let (ns, _peer, parent) = setup();
    ns.ip(&[
        "link", "add", "mv0", "link", "va", "type", "macvlan", "mode", "bridge",
    ]);
    // Our prefix, but a veth: not a macvlan of ours either.
    ns.ip(&["link", "add", "fvx", "type", "veth", "peer", "name", "fvy"]);
    let (delete_foreign, ensure_on_foreign, bad_name, delete_missing, listed) =
        ns.block_on(|| async {
            let links = manager();
            (
                links.delete_link("mv0").await.unwrap_err(),
                links
                    .ensure_macvlan(parent, "fvx", VMAC4_51)
                    .await
                    .unwrap_err(),
                links
                    .ensure_macvlan(parent, "va", VMAC4_51)
                    .await
                    .unwrap_err(),
                links.delete_link("fv4.99.1").await.unwrap(),
                links.list_owned().await.unwrap(),
            )
        });
    assert_eq!(delete_foreign.metric_label(), "not_ours");
    assert_eq!(ensure_on_foreign.metric_label(), "not_ours");
    assert_eq!(bad_name.metric_label(), "invalid_name");
    assert!(!delete_missing);
    assert!(listed.is_empty(), "{listed:?}");
    assert!(ns.ip_ok(&["link", "show", "dev", "mv0"]));
    assert!(ns.ip_ok(&["link", "show", "dev", "fvx"]));
}

#[test]
fn netns_link_delete_and_restore_parent_arp_settings() {
    let (ns, _peer, parent) = setup();
    let name = vmac_name(parent, Family::V4, 7);
    let (before, during, deleted, deleted_again, after) = ns.block_on(|| async {
        let links = manager();
        let before = ArpSettings::read("va").unwrap();
        links
            .ensure_macvlan(parent, &name, [0, 0, 0x5e, 0, 1, 7])
            .await
            .unwrap();
        let during = ArpSettings::read("va").unwrap();
        let deleted = links.delete_link(&name).await.unwrap();
        let deleted_again = links.delete_link(&name).await.unwrap();
        before.restore("va").unwrap();
        (
            before,
            during,
            deleted,
            deleted_again,
            ArpSettings::read("va").unwrap(),
        )
    });
    assert_eq!(
        before,
        ArpSettings {
            arp_ignore: 0,
            arp_filter: 0,
            arp_announce: 0
        }
    );
    assert_eq!(
        during,
        ArpSettings {
            arp_ignore: 1,
            arp_filter: 1,
            arp_announce: 2
        }
    );
    assert!(deleted);
    assert!(!deleted_again);
    assert_eq!(after, before);
    assert!(!ns.ip_ok(&["link", "show", "dev", &name]));
}

#[test]
fn netns_link_garp_from_the_macvlan_carries_the_virtual_mac() {
    let (ns, peer, parent) = setup();
    let name = vmac_name(parent, Family::V4, 51);
    let vip = Ipv4Addr::new(192, 0, 2, 100);
    let index = ns.block_on(|| async {
        let addrs = AddressManager::connect().unwrap();
        let links = MacvlanManager::new(addrs.handle().clone());
        let index = links.ensure_macvlan(parent, &name, VMAC4_51).await.unwrap();
        addrs
            .add(index, "192.0.2.100/32".parse().unwrap())
            .await
            .unwrap();
        index
    });
    assert!(index > 0);
    // The peer still maps the VIP to some other MAC and learns the virtual one.
    peer.ip(&["addr", "add", "192.0.2.2/24", "dev", "vb"]);
    peer.ip(&[
        "neigh",
        "replace",
        "192.0.2.100",
        "lladdr",
        "02:00:00:00:00:99",
        "dev",
        "vb",
        "nud",
        "stale",
    ]);

    let (ready_tx, ready_rx) = mpsc::channel();
    let expected = garp_frame(VMAC4_51, vip);
    let received = std::thread::scope(|scope| {
        let receiver = scope.spawn(|| {
            peer.enter(|| {
                let vb = pnet_datalink::interfaces()
                    .into_iter()
                    .find(|i| i.name == "vb")
                    .unwrap();
                let config = pnet_datalink::Config {
                    read_timeout: Some(Duration::from_millis(100)),
                    promiscuous: false,
                    ..Default::default()
                };
                let Ok(Channel::Ethernet(_, mut rx)) = pnet_datalink::channel(&vb, config) else {
                    panic!("capture");
                };
                ready_tx.send(()).unwrap();
                let deadline = Instant::now() + Duration::from_secs(5);
                let mut frames = Vec::new();
                while frames.len() < 2 && Instant::now() < deadline {
                    if let Ok(frame) = rx.next()
                        && frame == expected.as_slice()
                    {
                        frames.push(frame.to_vec());
                    }
                }
                frames
            })
        });
        ready_rx.recv().unwrap();
        let sent = ns.enter(|| {
            Announcer {
                repeat: 2,
                interval: Duration::ZERO,
                rate: 0,
            }
            .announce(&name, VMAC4_51, &[IpAddr::V4(vip)], None)
            .unwrap()
        });
        assert_eq!(sent, 2);
        receiver.join().unwrap()
    });
    assert_eq!(received.len(), 2);
    let neigh = peer.ip(&["neigh", "show", "192.0.2.100", "dev", "vb"]);
    assert!(neigh.contains("lladdr 00:00:5e:00:01:33"), "{neigh}");
}
