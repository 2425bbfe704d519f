//! Observes kube-proxy on this node (the facts [`crate::model::kube_proxy::assess`] judges):
//! the `kube-ipvs0` link, the ARP sysctls, the `KUBE-SERVICES` chain of iptables' `nat`
//! table, and an nftables table `kube-proxy`. One small shell script, run now and then (a
//! missing `iptables` or `nft` binary reads as "not there"); in a network namespace for the
//! tests.

use crate::model::kube_proxy::KubeProxyFacts;

const SCRIPT: &str = r#"test -e /sys/class/net/kube-ipvs0 && echo link
for dev in all kube-ipvs0; do for key in arp_ignore arp_announce; do
  v=$(cat /proc/sys/net/ipv4/conf/$dev/$key 2>/dev/null) && echo "sysctl $dev $key $v"
done; done
iptables -w 5 -t nat -S KUBE-SERVICES >/dev/null 2>&1 && echo chain
nft list table ip kube-proxy >/dev/null 2>&1 && echo nft
nft list table ip6 kube-proxy >/dev/null 2>&1 && echo nft
exit 0
"#;

/// Runs the observation, in the agent's namespace or (tests) another one.
#[derive(Debug, Clone, Default)]
pub struct KubeProxyObserver {
    netns: Option<String>,
}

impl KubeProxyObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Observes inside network namespace `name` (`ip netns exec`, which also mounts that
    /// namespace's /sys).
    pub fn in_netns(name: &str) -> Self {
        KubeProxyObserver {
            netns: Some(name.to_string()),
        }
    }

    /// What the node shows now; `None` when the script could not run at all.
    pub async fn observe(&self) -> Option<KubeProxyFacts> {
        let mut command = match &self.netns {
            Some(ns) => {
                let mut c = tokio::process::Command::new("ip");
                c.args(["netns", "exec", ns, "sh", "-c", SCRIPT]);
                c
            }
            None => {
                let mut c = tokio::process::Command::new("sh");
                c.args(["-c", SCRIPT]);
                c
            }
        };
        command.stdin(std::process::Stdio::null());
        command.kill_on_drop(true);
        let out = command.output().await.ok()?;
        out.status
            .success()
            .then(|| parse(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// The script's output as facts.
pub fn parse(text: &str) -> KubeProxyFacts {
    let mut f = KubeProxyFacts::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["link"] => f.ipvs_link = true,
            ["chain"] => f.iptables_chain = true,
            ["nft"] => f.nft_table = true,
            ["sysctl", dev, key, value] => {
                let Ok(v) = value.parse::<u8>() else {
                    continue;
                };
                match (*dev, *key) {
                    ("all", "arp_ignore") => f.arp_ignore_all = v,
                    ("all", "arp_announce") => f.arp_announce_all = v,
                    (_, "arp_ignore") => f.arp_ignore_link = Some(v),
                    (_, "arp_announce") => f.arp_announce_link = Some(v),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_script_output() {
        let f = parse(
            "link\nsysctl all arp_ignore 0\nsysctl all arp_announce 2\nsysctl kube-ipvs0 arp_ignore 1\nsysctl kube-ipvs0 arp_announce 0\nchain\n",
        );
        assert_eq!(
            f,
            KubeProxyFacts {
                ipvs_link: true,
                arp_ignore_all: 0,
                arp_announce_all: 2,
                arp_ignore_link: Some(1),
                arp_announce_link: Some(0),
                iptables_chain: true,
                nft_table: false,
            }
        );
        assert_eq!(
            parse("sysctl all arp_ignore 1\n"),
            KubeProxyFacts {
                arp_ignore_all: 1,
                ..KubeProxyFacts::default()
            }
        );
    }
}
