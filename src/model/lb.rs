//! Services of `type: LoadBalancer` as the agents plan them: every address of a Service's
//! allocation record becomes a synthetic VirtualIP (pure).
//!
//! The leader's record (`ferrovip.io/allocated`, see [`crate::crd::service_lb`]) is what the
//! agents plan from, not `status.loadBalancer.ingress`: a node holds the address as soon as
//! the record is written, and keeps it through an API outage (the record is in the saved
//! snapshot). One synthetic VirtualIP per address, named `lb/<address>` (Kubernetes names
//! contain neither `/` nor `:`, so it never clashes with a real VirtualIP), built from the
//! pool's template (`PoolTemplate::virtual_ip_spec`) with a /32 or /128, placed among the real
//! VirtualIPs by the creationTimestamp of its oldest Service. Services sharing an address
//! (sharing key) contribute their ports to the one synthetic VirtualIP: one address, one
//! election.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};

use crate::crd::{
    BackendServiceRef, Backends, Forwarding, PoolTemplate, ServiceForwarding, ServiceProtocol,
    ServiceRef, VirtualIP, VirtualService,
};

/// The prefix of every synthetic VirtualIP's name.
pub const NAME_PREFIX: &str = "lb/";

/// The synthetic VirtualIP name of a load-balancer address.
pub fn resource_name(address: &IpAddr) -> String {
    format!("{NAME_PREFIX}{address}")
}

/// Whether a resource name is that of a synthetic VirtualIP (never written as a VirtualIP).
pub fn is_synthetic(name: &str) -> bool {
    name.starts_with(NAME_PREFIX)
}

/// What the agents read of a served Service that carries an allocation record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LbService {
    pub service: ServiceRef,
    /// `metadata.creationTimestamp`: the precedence among VirtualIPs and other Services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Time>,
    /// The allocation record: address → pool.
    pub record: BTreeMap<IpAddr, String>,
    pub ports: Vec<LbPort>,
    /// `externalTrafficPolicy: Local`.
    #[serde(default)]
    pub local: bool,
    /// Every `status.loadBalancer.ingress` entry says `ipMode: Proxy` (servers 1.30+ keep
    /// it): kube-proxy leaves the address to ferrovip's IPVS.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_ip_mode: bool,
}

/// One port of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LbPort {
    /// Empty for the single unnamed port.
    pub name: String,
    pub protocol: ServiceProtocol,
    pub port: u16,
}

/// One load-balancer address as a VirtualIP.
#[derive(Debug, Clone)]
pub struct Synthetic {
    pub vip: VirtualIP,
    pub address: IpAddr,
    /// The Services holding the address, oldest first.
    pub services: Vec<ServiceRef>,
    /// `externalTrafficPolicy: Local` (of the first Service; sharing Services agree).
    pub local: bool,
    pub forwarding: ServiceForwarding,
    /// Every Service of the address has `ipMode: Proxy` in its ingress.
    pub proxy_ip_mode: bool,
}

/// The synthetic VirtualIPs of every allocated address whose pool exists, in precedence order
/// (oldest first, then by name). A later Service that names another pool for an address
/// already synthesized, or disagrees on the traffic policy, is left out of it (the allocator
/// never produces that); a port (protocol, number) already contributed by an older Service of
/// the address is skipped.
pub fn synthesize(
    pools: &BTreeMap<String, PoolTemplate>,
    services: &[LbService],
) -> Vec<Synthetic> {
    let mut ordered: Vec<&LbService> = services.iter().collect();
    ordered.sort_by(|a, b| {
        (a.created.as_ref().map(|t| t.0), &a.service)
            .cmp(&(b.created.as_ref().map(|t| t.0), &b.service))
    });
    struct Building<'a> {
        created: Option<Time>,
        pool: &'a str,
        template: &'a PoolTemplate,
        local: bool,
        members: Vec<(&'a LbService, Vec<&'a LbPort>)>,
    }
    let mut by_address: BTreeMap<IpAddr, Building> = BTreeMap::new();
    for svc in ordered {
        for (address, pool) in &svc.record {
            let Some(template) = pools.get(pool) else {
                continue;
            };
            let entry = by_address.entry(*address).or_insert_with(|| Building {
                created: svc.created.clone(),
                pool,
                template,
                local: svc.local,
                members: Vec::new(),
            });
            if entry.pool != pool || entry.local != svc.local {
                continue;
            }
            let taken: BTreeSet<(ServiceProtocol, u16)> = entry
                .members
                .iter()
                .flat_map(|(_, ports)| ports.iter().map(|p| (p.protocol, p.port)))
                .collect();
            let ports = svc
                .ports
                .iter()
                .filter(|p| !taken.contains(&(p.protocol, p.port)))
                .collect();
            entry.members.push((svc, ports));
        }
    }
    let mut out: Vec<Synthetic> = by_address
        .into_iter()
        .map(|(address, b)| {
            let forwarding = b.template.forwarding;
            let services = match forwarding {
                ServiceForwarding::KubeProxy => Vec::new(),
                ServiceForwarding::IPVS => b
                    .members
                    .iter()
                    .flat_map(|(svc, ports)| {
                        ports.iter().map(|p| virtual_service(b.template, svc, p))
                    })
                    .collect(),
            };
            let prefix = if address.is_ipv4() { 32 } else { 128 };
            let spec = b
                .template
                .virtual_ip_spec(vec![format!("{address}/{prefix}")], services);
            let vip = VirtualIP {
                metadata: ObjectMeta {
                    name: Some(resource_name(&address)),
                    creation_timestamp: b.created.clone(),
                    ..ObjectMeta::default()
                },
                spec,
                status: None,
            };
            Synthetic {
                vip,
                address,
                services: b.members.iter().map(|(s, _)| s.service.clone()).collect(),
                local: b.local,
                forwarding,
                proxy_ip_mode: b.members.iter().all(|(s, _)| s.proxy_ip_mode),
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let key = |s: &Synthetic| {
            (
                s.vip.metadata.creation_timestamp.as_ref().map(|t| t.0),
                s.vip.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    out
}

/// One Service port forwarded by IPVS to the Service's endpoints (by port name, so that two
/// ports of one number but different protocols stay apart). Masquerade; with
/// `externalTrafficPolicy: Local` without source NAT, so the pod sees the client's address
/// (the backends are then local pods, whose replies return through this node anyway).
fn virtual_service(template: &PoolTemplate, svc: &LbService, port: &LbPort) -> VirtualService {
    VirtualService {
        port: Some(i64::from(port.port)),
        protocol: port.protocol,
        fwmark: None,
        scheduler: template.scheduler.clone(),
        scheduler_flags: Vec::new(),
        forwarding: Forwarding::Masquerade,
        source_nat: !svc.local,
        persistence: None,
        tunnel: None,
        connection_limit: None,
        backends: Backends {
            endpoints: Vec::new(),
            service_ref: Some(BackendServiceRef {
                namespace: svc.service.namespace.clone(),
                name: svc.service.name.clone(),
                port: Some(IntOrString::String(port.name.clone())),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{PrioritySpec, VrrpSpec};
    use crate::model::service::ServiceKey;
    use crate::model::{EndpointFacts, NodeFacts, RefusalReason, ServiceEndpoints, Snapshot, plan};
    use crate::vocab::Family;
    use k8s_openapi::jiff::Timestamp;

    fn template(forwarding: ServiceForwarding) -> PoolTemplate {
        PoolTemplate {
            interface: "eth0".into(),
            node_selector: None,
            vrrp: VrrpSpec {
                advertisement_interval: "100ms".into(),
                ..VrrpSpec::default()
            },
            priority: PrioritySpec::default(),
            forwarding,
            scheduler: "rr".into(),
        }
    }

    fn at(secs: i64) -> Option<Time> {
        Some(Time(Timestamp::from_second(1_700_000_000 + secs).unwrap()))
    }

    fn svc_ref(name: &str) -> ServiceRef {
        ServiceRef {
            namespace: "shop".into(),
            name: name.into(),
        }
    }

    fn lb_service(name: &str, created: i64, record: &[(&str, &str)], ports: &[u16]) -> LbService {
        LbService {
            service: svc_ref(name),
            created: at(created),
            record: record
                .iter()
                .map(|(a, p)| (a.parse().unwrap(), p.to_string()))
                .collect(),
            ports: ports
                .iter()
                .map(|p| LbPort {
                    name: format!("p{p}"),
                    protocol: ServiceProtocol::TCP,
                    port: *p,
                })
                .collect(),
            local: false,
            proxy_ip_mode: false,
        }
    }

    fn vip_at(name: &str, created: i64, addresses: &[&str], vrid: Option<i64>) -> VirtualIP {
        let mut spec = crate::crd::sample_spec(addresses, vrid.unwrap_or(1));
        spec.virtual_router_id = vrid;
        spec.priority.preferred_nodes.clear();
        let mut v = VirtualIP::new(name, spec);
        v.metadata.creation_timestamp = at(created);
        v
    }

    fn node() -> NodeFacts {
        NodeFacts {
            ready: Some(true),
            ..NodeFacts::default()
        }
    }

    fn snapshot(pools: &[(&str, ServiceForwarding)], services: Vec<LbService>) -> Snapshot {
        let mut s = Snapshot {
            cluster: true,
            nodes: [
                ("node-a".to_string(), node()),
                ("node-b".to_string(), node()),
            ]
            .into(),
            pools: pools
                .iter()
                .map(|(n, f)| (n.to_string(), template(*f)))
                .collect(),
            load_balancers: services,
            ..Snapshot::default()
        };
        s.local.endpoints_known = true;
        s
    }

    /// Endpoints of `name` (ports named like `lb_service` names them), on the given nodes.
    fn endpoints(s: &mut Snapshot, name: &str, ports: &[u16], eps: &[(&str, &str)]) {
        s.service_endpoints.insert(
            svc_ref(name),
            ServiceEndpoints {
                ports: ports.iter().map(|p| (format!("p{p}"), *p)).collect(),
                endpoints: eps
                    .iter()
                    .map(|(addr, node)| EndpointFacts {
                        address: addr.parse().unwrap(),
                        ports: ports.iter().map(|p| (format!("p{p}"), 8000 + *p)).collect(),
                        ready: true,
                        draining: false,
                        node: Some(node.to_string()),
                    })
                    .collect(),
            },
        );
    }

    #[test]
    fn every_allocated_address_of_an_existing_pool_becomes_one_synthetic_virtual_ip() {
        let s = snapshot(
            &[("web", ServiceForwarding::KubeProxy)],
            vec![
                lb_service(
                    "a",
                    0,
                    &[("192.0.2.10", "web"), ("2001:db8::10", "web")],
                    &[80],
                ),
                lb_service("gone", 0, &[("192.0.2.11", "deleted-pool")], &[80]),
            ],
        );
        let d = plan(&s, "node-a");
        assert_eq!(
            d.load_balancers.keys().collect::<Vec<_>>(),
            ["lb/192.0.2.10", "lb/2001:db8::10"]
        );
        let addresses: Vec<String> = d
            .iter()
            .flat_map(|i| i.addresses.iter().map(|a| a.to_string()))
            .collect();
        assert_eq!(addresses, ["192.0.2.10/32", "2001:db8::10/128"]);
        // KubeProxy forwarding: no virtual services.
        assert!(d.services.is_empty());
        assert_eq!(d.load_balancers["lb/192.0.2.10"].services, [svc_ref("a")]);
        // Names a VirtualIP can never have.
        assert!(d.resources.keys().all(|n| is_synthetic(n)));
        // Standalone-like snapshot without pools or Services: nothing changes.
        let plain = Snapshot {
            virtual_ips: vec![vip_at("x", 0, &["192.0.2.1/24"], Some(7))],
            ..Snapshot::default()
        };
        assert!(plan(&plain, "node-a").load_balancers.is_empty());
    }

    #[test]
    fn identical_templates_share_one_instance_and_local_policy_never_shares() {
        let mut local = lb_service("local", 2, &[("192.0.2.12", "web")], &[80]);
        local.local = true;
        let mut s = snapshot(
            &[("web", ServiceForwarding::KubeProxy)],
            vec![
                lb_service("a", 0, &[("192.0.2.10", "web")], &[80]),
                lb_service("b", 1, &[("192.0.2.11", "web")], &[80]),
                local,
            ],
        );
        s.local.local_ready_endpoints.insert(svc_ref("local"), 1);
        let d = plan(&s, "node-a");
        let instances: Vec<_> = d.iter().collect();
        assert_eq!(instances.len(), 2, "{instances:#?}");
        assert_eq!(
            instances
                .iter()
                .find(|i| i.addresses.len() == 2)
                .unwrap()
                .members,
            ["lb/192.0.2.10", "lb/192.0.2.11"]
        );
        let alone = instances.iter().find(|i| i.addresses.len() == 1).unwrap();
        assert_eq!(alone.members, ["lb/192.0.2.12"]);
        // The derived VRID comes from the sharing signature: the same on every node.
        assert_eq!(
            d.resources["lb/192.0.2.10"].vrid,
            plan(&s, "node-b").resources["lb/192.0.2.10"].vrid
        );
    }

    #[test]
    fn precedence_by_creation_time_among_virtual_ips_and_virtual_ip_addresses_win() {
        let base = snapshot(
            &[("web", ServiceForwarding::KubeProxy)],
            vec![lb_service("a", 10, &[("192.0.2.10", "web")], &[80])],
        );
        let derived = plan(&base, "node-a").resources["lb/192.0.2.10"]
            .vrid
            .unwrap();
        // An older VirtualIP with that VRID keeps it; the address takes the next one.
        let mut s = base.clone();
        s.virtual_ips = vec![vip_at("old", 5, &["198.51.100.1/24"], Some(derived.into()))];
        let d = plan(&s, "node-a");
        assert!(d.resources["old"].refused.is_none());
        assert_ne!(d.resources["lb/192.0.2.10"].vrid, Some(derived));
        // A newer VirtualIP asking for it is refused: the Service came first.
        s.virtual_ips = vec![vip_at(
            "new",
            20,
            &["198.51.100.1/24"],
            Some(derived.into()),
        )];
        let d = plan(&s, "node-a");
        assert_eq!(d.resources["lb/192.0.2.10"].vrid, Some(derived));
        assert!(matches!(
            d.resources["new"].refused,
            Some(RefusalReason::DuplicateVrid { .. })
        ));
        // A VirtualIP holding the address wins whatever its age.
        s.virtual_ips = vec![vip_at("holder", 20, &["192.0.2.10/24"], Some(9))];
        let d = plan(&s, "node-a");
        assert!(d.resources["holder"].refused.is_none());
        assert_eq!(
            d.resources["lb/192.0.2.10"].refused,
            Some(RefusalReason::DuplicateAddress {
                address: "192.0.2.10".parse().unwrap(),
                other: "holder".into()
            })
        );
        assert_eq!(d.iter().count(), 1);
    }

    #[test]
    fn ipvs_forwarding_plans_one_virtual_service_per_port_of_every_sharing_service() {
        let mut s = snapshot(
            &[("web", ServiceForwarding::IPVS)],
            vec![
                lb_service("a", 0, &[("192.0.2.10", "web")], &[80, 443]),
                // Shares the address (sharing key); its 443 clashes and is skipped.
                lb_service("b", 1, &[("192.0.2.10", "web")], &[53, 443]),
            ],
        );
        endpoints(
            &mut s,
            "a",
            &[80, 443],
            &[("10.1.0.1", "node-a"), ("10.1.0.2", "node-b")],
        );
        endpoints(&mut s, "b", &[53, 443], &[("10.2.0.1", "node-b")]);
        let d = plan(&s, "node-a");
        assert_eq!(
            d.load_balancers["lb/192.0.2.10"].services,
            [svc_ref("a"), svc_ref("b")]
        );
        let key = |port| ServiceKey::Port {
            addr: "192.0.2.10".parse().unwrap(),
            protocol: ServiceProtocol::TCP,
            port,
        };
        assert_eq!(
            d.services.keys().copied().collect::<Vec<_>>(),
            [key(53), key(80), key(443)]
        );
        let backends = |port| {
            d.services[&key(port)]
                .backends
                .keys()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
        };
        // Cluster policy: every endpoint, source NAT on (replies come back through us).
        assert_eq!(backends(80), ["10.1.0.1:8080", "10.1.0.2:8080"]);
        assert_eq!(backends(443), ["10.1.0.1:8443", "10.1.0.2:8443"]);
        assert_eq!(backends(53), ["10.2.0.1:8053"]);
        assert!(d.services[&key(80)].source_nat);
        assert_eq!(d.iter().count(), 1);
    }

    #[test]
    fn local_policy_holds_only_with_a_local_endpoint_and_forwards_only_to_it() {
        let mut svc = lb_service("a", 0, &[("192.0.2.10", "web")], &[80]);
        svc.local = true;
        let mut s = snapshot(&[("web", ServiceForwarding::IPVS)], vec![svc]);
        endpoints(
            &mut s,
            "a",
            &[80],
            &[("10.1.0.1", "node-a"), ("10.1.0.2", "node-b")],
        );
        s.local.local_ready_endpoints.insert(svc_ref("a"), 1);
        let d = plan(&s, "node-a");
        assert_eq!(d.iter().count(), 1);
        let spec = d.services.values().next().unwrap();
        assert_eq!(
            spec.backends
                .keys()
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
            ["10.1.0.1:8080"]
        );
        assert!(!spec.source_nat, "the client's address must reach the pod");

        // No ready endpoint here: no instance, no forwarding (the node can never win).
        s.local.local_ready_endpoints.insert(svc_ref("a"), 0);
        let d = plan(&s, "node-a");
        assert_eq!(d.iter().count(), 0);
        assert!(d.services.is_empty());
        assert!(!d.resources["lb/192.0.2.10"].eligible);
        // Unknown endpoints (no EndpointSlices served): every node may hold it.
        s.local.endpoints_known = false;
        assert_eq!(plan(&s, "node-a").iter().count(), 1);
    }

    #[test]
    fn records_of_other_pools_or_policies_on_a_shared_address_are_left_out() {
        let mut b = lb_service("b", 1, &[("192.0.2.10", "web")], &[81]);
        b.local = true;
        let s = snapshot(
            &[
                ("web", ServiceForwarding::KubeProxy),
                ("other", ServiceForwarding::KubeProxy),
            ],
            vec![
                lb_service("a", 0, &[("192.0.2.10", "web")], &[80]),
                b,
                lb_service("c", 2, &[("192.0.2.10", "other")], &[82]),
            ],
        );
        let synth = synthesize(&s.pools, &s.load_balancers);
        assert_eq!(synth.len(), 1);
        assert_eq!(synth[0].services, [svc_ref("a")]);
        assert_eq!(synth[0].vip.metadata.creation_timestamp, at(0));
        let d = plan(&s, "node-b");
        assert_eq!(
            d.iter()
                .map(|i| (i.family, i.addresses.len()))
                .collect::<Vec<_>>(),
            [(Family::V4, 1)]
        );
    }
}
