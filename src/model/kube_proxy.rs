//! Coexistence with kube-proxy (pure): what a node observes of kube-proxy, and which
//! misconfigurations that makes for the load-balancer addresses it holds.
//!
//! The default (`forwarding: KubeProxy`): ferrovip elects the node that holds and announces
//! the address, kube-proxy forwards. In iptables and nftables modes kube-proxy DNATs a
//! load-balancer address in PREROUTING on whichever node the packet reaches (the master),
//! and binds nothing: no double programming. In IPVS mode it binds every load-balancer
//! address to the dummy link `kube-ipvs0` on every node, and every node then answers ARP for
//! it unless strict ARP is set (`arp_ignore` ≥ 1 and `arp_announce` ≥ 2, kube-proxy's
//! `ipvs.strictARP: true`): the address would be reachable through whichever node answered
//! last, not the master. With `forwarding: IPVS`, kube-proxy present and the Service's
//! ingress without `ipMode: Proxy` (servers before 1.30 drop it), kube-proxy's DNAT runs
//! before ferrovip's IPVS sees the packet: ferrovip's forwarding is bypassed.

/// What the node shows of kube-proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeProxyFacts {
    /// The link `kube-ipvs0` exists (kube-proxy in IPVS mode).
    pub ipvs_link: bool,
    /// `net.ipv4.conf.all.arp_ignore`, `.arp_announce`.
    pub arp_ignore_all: u8,
    pub arp_announce_all: u8,
    /// The same of `kube-ipvs0`, when it exists (the kernel uses the larger of `all` and the
    /// link's value).
    pub arp_ignore_link: Option<u8>,
    pub arp_announce_link: Option<u8>,
    /// The `nat` table has a `KUBE-SERVICES` chain (kube-proxy in iptables or IPVS mode).
    pub iptables_chain: bool,
    /// An nftables table named `kube-proxy` exists (kube-proxy in nftables mode).
    pub nft_table: bool,
}

impl KubeProxyFacts {
    /// Whether kube-proxy runs on the node, in any mode.
    pub fn present(&self) -> bool {
        self.ipvs_link || self.iptables_chain || self.nft_table
    }
}

/// What this node does with load-balancer addresses (from its plan).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbUse {
    /// Load-balancer addresses this node may hold.
    pub addresses: usize,
    /// Of those, forwarded by ferrovip's IPVS whose Service's ingress lacks `ipMode: Proxy`.
    pub ipvs_without_ip_mode: usize,
}

/// A misconfiguration of kube-proxy against the load-balancer addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// kube-proxy in IPVS mode without strict ARP: every node answers ARP for every
    /// load-balancer address.
    NoStrictArp { arp_ignore: u8, arp_announce: u8 },
    /// `forwarding: IPVS` while kube-proxy DNATs the same addresses first.
    IpvsBypassed { addresses: usize },
}

impl Problem {
    /// Every label, for a gauge that shows 0 for the problems absent.
    pub const LABELS: [&'static str; 2] = ["no_strict_arp", "ipvs_bypassed"];

    pub fn metric_label(&self) -> &'static str {
        match self {
            Problem::NoStrictArp { .. } => "no_strict_arp",
            Problem::IpvsBypassed { .. } => "ipvs_bypassed",
        }
    }

    /// The Event reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Problem::NoStrictArp { .. } => "KubeProxyStrictARPOff",
            Problem::IpvsBypassed { .. } => "KubeProxyBypassesIPVS",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Problem::NoStrictArp {
                arp_ignore,
                arp_announce,
            } => format!(
                "kube-proxy runs in IPVS mode (link kube-ipvs0) without strict ARP (arp_ignore {arp_ignore}, arp_announce {arp_announce}; need 1 and 2): every node answers ARP for the load-balancer addresses it binds to kube-ipvs0, not only the master; set ipvs.strictARP: true in kube-proxy's configuration"
            ),
            Problem::IpvsBypassed { addresses } => format!(
                "{addresses} load-balancer address(es) of pools with forwarding: IPVS, but kube-proxy runs on this node and their Services' ingress has no ipMode: Proxy (API servers before 1.30 drop it): kube-proxy's DNAT takes the traffic before ferrovip's IPVS sees it; use forwarding: KubeProxy, or run without kube-proxy"
            ),
        }
    }
}

/// The problems of `facts` for what the node does (`uses`). None while the node holds no
/// load-balancer address: kube-proxy's settings are then not ferrovip's concern.
pub fn assess(facts: &KubeProxyFacts, uses: LbUse) -> Vec<Problem> {
    let mut out = Vec::new();
    if uses.addresses == 0 {
        return out;
    }
    if facts.ipvs_link {
        let arp_ignore = facts.arp_ignore_all.max(facts.arp_ignore_link.unwrap_or(0));
        let arp_announce = facts
            .arp_announce_all
            .max(facts.arp_announce_link.unwrap_or(0));
        if arp_ignore < 1 || arp_announce < 2 {
            out.push(Problem::NoStrictArp {
                arp_ignore,
                arp_announce,
            });
        }
    }
    if uses.ipvs_without_ip_mode > 0 && facts.present() {
        out.push(Problem::IpvsBypassed {
            addresses: uses.ipvs_without_ip_mode,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const USED: LbUse = LbUse {
        addresses: 3,
        ipvs_without_ip_mode: 0,
    };

    #[test]
    fn ipvs_mode_without_strict_arp_is_reported_with_the_effective_values() {
        let mut f = KubeProxyFacts {
            ipvs_link: true,
            arp_ignore_link: Some(0),
            arp_announce_link: Some(0),
            iptables_chain: true,
            ..KubeProxyFacts::default()
        };
        assert_eq!(
            assess(&f, USED),
            [Problem::NoStrictArp {
                arp_ignore: 0,
                arp_announce: 0
            }]
        );
        // strictARP: kube-proxy sets `all` to 1 and 2.
        f.arp_ignore_all = 1;
        f.arp_announce_all = 2;
        assert!(assess(&f, USED).is_empty());
        // Set on the link only counts too (the kernel takes the larger); half is not enough.
        f.arp_ignore_all = 0;
        f.arp_announce_all = 0;
        f.arp_ignore_link = Some(1);
        f.arp_announce_link = Some(1);
        assert_eq!(
            assess(&f, USED),
            [Problem::NoStrictArp {
                arp_ignore: 1,
                arp_announce: 1
            }]
        );
        f.arp_announce_link = Some(2);
        assert!(assess(&f, USED).is_empty());
        // No load-balancer address here: not reported.
        f.arp_ignore_link = Some(0);
        assert!(assess(&f, LbUse::default()).is_empty());
        assert_eq!(assess(&f, USED).len(), 1);
    }

    #[test]
    fn iptables_and_nftables_modes_are_fine_for_kube_proxy_forwarding_only() {
        let iptables = KubeProxyFacts {
            iptables_chain: true,
            ..KubeProxyFacts::default()
        };
        let nft = KubeProxyFacts {
            nft_table: true,
            ..KubeProxyFacts::default()
        };
        let ipvs_used = LbUse {
            addresses: 3,
            ipvs_without_ip_mode: 2,
        };
        for f in [&iptables, &nft] {
            assert!(assess(f, USED).is_empty());
            assert_eq!(
                assess(f, ipvs_used),
                [Problem::IpvsBypassed { addresses: 2 }]
            );
        }
        // No kube-proxy at all: ferrovip's IPVS forwards alone.
        assert!(assess(&KubeProxyFacts::default(), ipvs_used).is_empty());
        let p = Problem::IpvsBypassed { addresses: 2 };
        assert!(p.message().contains("ipMode: Proxy"));
        assert!(Problem::LABELS.contains(&p.metric_label()));
    }
}
