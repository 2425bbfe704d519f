//! kube-proxy detection (`dataplane::kube_proxy`) against a real kernel in a network
//! namespace: the `kube-ipvs0` link kube-proxy's IPVS mode creates, the ARP sysctls of
//! strictARP, and the nftables table of its nftables mode, judged by
//! `model::kube_proxy::assess`. Needs root and nftables.

mod netns_util;

use ferrovip::dataplane::kube_proxy::KubeProxyObserver;
use ferrovip::model::kube_proxy::{KubeProxyFacts, LbUse, Problem, assess};
use netns_util::Netns;

fn observe(ns: &Netns) -> KubeProxyFacts {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(KubeProxyObserver::in_netns(&ns.name).observe())
        .expect("the observation runs")
}

const HOLDING: LbUse = LbUse {
    addresses: 1,
    ipvs_without_ip_mode: 0,
};
const IPVS: LbUse = LbUse {
    addresses: 1,
    ipvs_without_ip_mode: 1,
};

#[test]
fn detects_ipvs_mode_without_strict_arp_and_nftables_mode() {
    let ns = Netns::new("kp");
    let facts = observe(&ns);
    assert!(
        !facts.present(),
        "a fresh namespace has no kube-proxy: {facts:?}"
    );
    assert!(assess(&facts, IPVS).is_empty());

    // kube-proxy's IPVS mode: its link (a dummy; a veth here, as this kernel may lack the
    // dummy driver: only the name counts), default ARP settings.
    ns.ip(&[
        "link",
        "add",
        "kube-ipvs0",
        "type",
        "veth",
        "peer",
        "name",
        "kp-peer",
    ]);
    let facts = observe(&ns);
    assert!(facts.ipvs_link);
    assert_eq!(facts.arp_ignore_link, Some(0));
    assert_eq!(
        assess(&facts, HOLDING),
        [Problem::NoStrictArp {
            arp_ignore: 0,
            arp_announce: 0
        }]
    );
    // And ferrovip's IPVS forwarding would be bypassed.
    assert_eq!(assess(&facts, IPVS).len(), 2);

    // strictARP, as kube-proxy sets it.
    ns.exec(&[
        "sh",
        "-c",
        "echo 1 > /proc/sys/net/ipv4/conf/all/arp_ignore && echo 2 > /proc/sys/net/ipv4/conf/all/arp_announce",
    ]);
    let facts = observe(&ns);
    assert_eq!((facts.arp_ignore_all, facts.arp_announce_all), (1, 2));
    assert!(assess(&facts, HOLDING).is_empty());

    // nftables mode: its table, no link.
    ns.ip(&["link", "del", "kube-ipvs0"]);
    ns.exec(&["nft", "add", "table", "ip", "kube-proxy"]);
    let facts = observe(&ns);
    assert!(facts.nft_table && !facts.ipvs_link);
    assert!(assess(&facts, HOLDING).is_empty());
    assert_eq!(
        assess(&facts, IPVS),
        [Problem::IpvsBypassed { addresses: 1 }]
    );
}
