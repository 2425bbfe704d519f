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
