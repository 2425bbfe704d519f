//! Snapshot → desired state of one node. Pure: no I/O, no clock.
//!
//! The standalone manifest reader and (later) the Kubernetes watchers both produce a
//! [`Snapshot`]; [`plan`] decides which VRRP instances this node runs, with which priority,
//! and which resources are refused and why.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use ipnet::{IpNet, Ipv6Net};

use crate::crd::{ValidationErrors, VirtualIP};
use crate::vrrp::{ChecksumMode, Family, Version};

/// Everything the planner looks at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// In source order (file order in standalone mode). Earlier entries win conflicts.
    pub virtual_ips: Vec<VirtualIP>,
}

/// One VRRP instance: a (interface, family, VRID) triple is unique on a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    pub family: Family,
    pub vrid: u8,
}

/// What one node should run for one VirtualIP and address family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Name of the VirtualIP this instance serves.
    pub resource: String,
    pub interface: String,
    pub family: Family,
    pub vrid: u8,
    pub version: Version,
    pub priority: u8,
    /// Human-readable derivation of `priority`, e.g. `["base 100", "preferred node +50"]`.
    pub priority_reasons: Vec<String>,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    /// The addresses to hold as master. For IPv6 the first one is link-local (RFC 5798 §5.2.9).
    pub addresses: Vec<IpNet>,
    pub unicast_peers: Vec<IpAddr>,
    pub checksum: ChecksumMode,
    pub virtual_mac: bool,
}

/// A resource (or part of it) this node does not run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub resource: String,
    pub reason: RefusalReason,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RefusalReason {
    #[error("{0}")]
    Invalid(ValidationErrors),
    #[error(
        "spec.virtualRouterId: {vrid} is already used for {family} on interface {interface} by VirtualIP {other:?}"
    )]
    DuplicateVrid {
        interface: String,
        family: Family,
        vrid: u8,
        other: String,
    },
    #[error("spec.addresses: {address} is already served by VirtualIP {other:?}")]
    DuplicateAddress { address: IpAddr, other: String },
    #[error("metadata.name: required")]
    Unnamed,
}

impl RefusalReason {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RefusalReason::Invalid(_) => "invalid",
            RefusalReason::DuplicateVrid { .. } => "duplicate_vrid",
            RefusalReason::DuplicateAddress { .. } => "duplicate_address",
            RefusalReason::Unnamed => "unnamed",
        }
    }
}

/// The desired state of one node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Per interface, the instances keyed by family and VRID.
    pub instances: BTreeMap<String, BTreeMap<InstanceKey, InstanceSpec>>,
    pub refused: Vec<Refusal>,
}

impl Desired {
    pub fn iter(&self) -> impl Iterator<Item = &InstanceSpec> {
        self.instances.values().flat_map(|m| m.values())
    }
}

/// Lowest and highest priority a non-owner may have.
const MIN_PRIORITY: i64 = 1;
const MAX_PRIORITY: i64 = 254;

/// Plans what `node` runs.
pub fn plan(snapshot: &Snapshot, node: &str) -> Desired {
    let mut desired = Desired::default();
    let mut address_owner: BTreeMap<IpAddr, String> = BTreeMap::new();

    for vip in &snapshot.virtual_ips {
        let Some(name) = vip.metadata.name.clone() else {
            desired.refused.push(Refusal {
                resource: String::new(),
                reason: RefusalReason::Unnamed,
            });
            continue;
        };
        let spec = match vip.spec.validate() {
            Ok(s) => s,
            Err(errors) => {
                desired.refused.push(Refusal {
                    resource: name,
                    reason: RefusalReason::Invalid(errors),
                });
                continue;
            }
        };

        // Conflicts with a resource planned earlier refuse this one whole, so an existing VIP
        // is never disturbed by a newcomer.
        let families: Vec<Family> = [Family::V4, Family::V6]
            .into_iter()
            .filter(|f| spec.addresses.iter().any(|a| Family::of(&a.addr()) == *f))
            .collect();
        let per_interface = desired.instances.get(&spec.interface);
        let vrid_clash = families.iter().find_map(|family| {
            let key = InstanceKey {
                family: *family,
                vrid: spec.vrid,
            };
            per_interface
                .and_then(|m| m.get(&key))
                .map(|other| RefusalReason::DuplicateVrid {
                    interface: spec.interface.clone(),
                    family: *family,
                    vrid: spec.vrid,
                    other: other.resource.clone(),
                })
        });
        let address_clash = spec.addresses.iter().find_map(|a| {
            address_owner
                .get(&a.addr())
                .map(|other| RefusalReason::DuplicateAddress {
                    address: a.addr(),
                    other: other.clone(),
                })
        });
        if let Some(reason) = vrid_clash.or(address_clash) {
            desired.refused.push(Refusal {
                resource: name,
                reason,
            });
            continue;
        }

        let (priority, priority_reasons) =
            priority_for(node, spec.base_priority, &spec.preferred_nodes);
        for a in &spec.addresses {
            address_owner.insert(a.addr(), name.clone());
        }
        for family in families {
            let mut addresses: Vec<IpNet> = spec
                .addresses
                .iter()
                .filter(|a| Family::of(&a.addr()) == family)
                .copied()
                .collect();
            if family == Family::V6 {
                link_local_first(&mut addresses, spec.vrid);
            }
            let unicast_peers = spec
                .unicast_peers
                .iter()
                .filter(|p| Family::of(p) == family)
                .copied()
                .collect();
            desired
                .instances
                .entry(spec.interface.clone())
                .or_default()
                .insert(
                    InstanceKey {
                        family,
                        vrid: spec.vrid,
                    },
                    InstanceSpec {
                        resource: name.clone(),
                        interface: spec.interface.clone(),
                        family,
                        vrid: spec.vrid,
                        version: spec.version,
                        priority,
                        priority_reasons: priority_reasons.clone(),
                        advert_interval: spec.advert_interval,
                        preempt: spec.preempt,
                        preempt_delay: spec.preempt_delay,
                        addresses,
                        unicast_peers,
                        checksum: spec.checksum,
                        virtual_mac: spec.virtual_mac,
                    },
                );
        }
    }
    desired
}

/// `base` plus the weights of the preferred-node entries naming `node`, clamped to 1-254.
pub fn priority_for(node: &str, base: i64, preferred: &[(String, i64)]) -> (u8, Vec<String>) {
    let mut reasons = vec![format!("base {base}")];
    let mut total = base;
    for (name, weight) in preferred {
        if name == node {
            total += weight;
            reasons.push(format!("preferred node {weight:+}"));
        }
    }
    let clamped = total.clamp(MIN_PRIORITY, MAX_PRIORITY);
    if clamped != total {
        reasons.push(format!("clamped from {total} to {clamped}"));
    }
    (clamped as u8, reasons)
}

/// RFC 5798 §5.2.9: an IPv6 advertisement's first address is the virtual router's link-local
/// address. When the user lists none, use the one derived from the virtual MAC
/// 00:00:5e:00:02:VRID (modified EUI-64), as routers do.
fn link_local_first(addresses: &mut Vec<IpNet>, vrid: u8) {
    let is_ll =
        |a: &IpNet| matches!(a.addr(), IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
    if let Some(i) = addresses.iter().position(is_ll) {
        let ll = addresses.remove(i);
        addresses.insert(0, ll);
    } else {
        let ll = Ipv6Addr::new(
            0xfe80,
            0,
            0,
            0,
            0x0200,
            0x5eff,
            0xfe00,
            0x0200 | u16::from(vrid),
        );
        let net = Ipv6Net::new(ll, 64).expect("64 is a valid IPv6 prefix length");
        addresses.insert(0, IpNet::V6(net));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PreferredNode, PrioritySpec, VirtualIPSpec, VrrpSpec};

    fn vip(name: &str, vrid: i64, addresses: &[&str]) -> VirtualIP {
        VirtualIP::new(
            name,
            VirtualIPSpec {
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                interface: "eth0".into(),
                virtual_router_id: vrid,
                vrrp: VrrpSpec {
                    advertisement_interval: "100ms".into(),
                    ..VrrpSpec::default()
                },
                priority: PrioritySpec {
                    base: 100,
                    preferred_nodes: vec![PreferredNode {
                        node_name: "node-a".into(),
                        weight: 50,
                    }],
                },
            },
        )
    }

    fn snapshot(vips: Vec<VirtualIP>) -> Snapshot {
        Snapshot { virtual_ips: vips }
    }

    #[test]
    fn priority_is_base_plus_matching_weights_clamped() {
        let prefs = vec![("node-a".to_string(), 50), ("node-a".to_string(), 200)];
        assert_eq!(priority_for("node-b", 100, &prefs).0, 100);
        let (p, reasons) = priority_for("node-a", 100, &prefs);
        assert_eq!(p, 254);
        assert_eq!(reasons.last().unwrap(), "clamped from 350 to 254");
        assert_eq!(priority_for("node-a", 10, &[("node-a".into(), -50)]).0, 1);
    }

    #[test]
    fn the_contract_plans_one_instance_per_node() {
        let s = snapshot(vec![vip("web", 51, &["192.0.2.100/24"])]);
        let a = plan(&s, "node-a");
        let inst: Vec<_> = a.iter().collect();
        assert_eq!(inst.len(), 1);
        assert_eq!(inst[0].priority, 150);
        assert_eq!(inst[0].priority_reasons, ["base 100", "preferred node +50"]);
        assert_eq!(inst[0].advert_interval, Duration::from_millis(100));
        assert_eq!(plan(&s, "node-b").iter().next().unwrap().priority, 100);
        assert!(a.refused.is_empty());
    }

    #[test]
    fn dual_stack_splits_by_family_with_link_local_first() {
        let s = snapshot(vec![vip(
            "web",
            10,
            &["192.0.2.100/24", "2001:db8::100/64"],
        )]);
        let d = plan(&s, "node-b");
        let v6 = d.iter().find(|i| i.family == Family::V6).unwrap();
        assert_eq!(v6.addresses[0].to_string(), "fe80::200:5eff:fe00:20a/64");
        assert_eq!(v6.addresses[1].to_string(), "2001:db8::100/64");
        let v4 = d.iter().find(|i| i.family == Family::V4).unwrap();
        assert_eq!(v4.addresses.len(), 1);
    }

    #[test]
    fn conflicts_refuse_the_later_resource_only() {
        let s = snapshot(vec![
            vip("web", 51, &["192.0.2.100/24"]),
            vip("dup-vrid", 51, &["192.0.2.101/24"]),
            vip("dup-addr", 52, &["192.0.2.100/24"]),
            vip("bad", 300, &["192.0.2.102/24"]),
            vip("other-family", 51, &["2001:db8::1/64"]),
        ]);
        let d = plan(&s, "node-a");
        let running: Vec<_> = d.iter().map(|i| i.resource.as_str()).collect();
        assert_eq!(running, ["web", "other-family"]);
        let refused: Vec<_> = d
            .refused
            .iter()
            .map(|r| (r.resource.as_str(), r.reason.metric_label()))
            .collect();
        assert_eq!(
            refused,
            [
                ("dup-vrid", "duplicate_vrid"),
                ("dup-addr", "duplicate_address"),
                ("bad", "invalid")
            ]
        );
        assert!(
            d.refused[0]
                .reason
                .to_string()
                .contains("spec.virtualRouterId: 51")
        );
        assert!(
            d.refused[2]
                .reason
                .to_string()
                .contains("spec.virtualRouterId")
        );
    }
}
