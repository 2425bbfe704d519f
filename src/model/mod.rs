//! Snapshot → desired state of one node. Pure: no I/O, no clock.
//!
//! The standalone manifest reader and (later) the Kubernetes watchers both produce a
//! [`Snapshot`]; [`plan`] decides which VRRP instances this node runs, with which priority,
//! and which resources are refused and why.

pub mod kube_proxy;
pub mod lb;
pub mod service;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use crate::crd::{
    ServiceMatch, ServiceRef, ValidBackends, ValidCheck, ValidService, ValidSpec, ValidationErrors,
    VirtualIP,
};
use crate::vocab::{ChecksumMode, Family, NON_OWNER_PRIORITIES, VRIDS, Version};
use service::{BackendKey, Forwarding, ServiceKey, ServiceSet, ServiceSpec};

/// Nodes carrying this label never hold addresses (the Kubernetes convention for external
/// load balancers).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// Everything the planner looks at.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// In precedence order (oldest first in Kubernetes mode, file order in standalone mode):
    /// earlier entries win conflicts, so a newcomer never disturbs a running VIP.
    pub virtual_ips: Vec<VirtualIP>,
    /// Kubernetes mode: node-based rules (selector, Node health, `unicastPeers: auto`) apply.
    pub cluster: bool,
    /// The cluster's nodes (empty in standalone mode).
    pub nodes: BTreeMap<String, NodeFacts>,
    /// What this node observes itself.
    pub local: LocalFacts,
    /// Kubernetes mode: the endpoints of the Services that `spec.services[].backends.serviceRef`
    /// names (all nodes' endpoints: every node forwards to all of them).
    pub service_endpoints: BTreeMap<ServiceRef, ServiceEndpoints>,
    /// Whether the snapshot may be planned from at all, and from what it was made.
    pub completeness: Completeness,
    /// Kubernetes mode: the LoadBalancerPools' templates, by pool name.
    pub pools: BTreeMap<String, crate::crd::PoolTemplate>,
    /// Kubernetes mode: the served Services of `type: LoadBalancer` with an allocation
    /// record (each address becomes a synthetic VirtualIP, see [`lb`]).
    pub load_balancers: Vec<lb::LbService>,
}

/// How complete a snapshot (and the plan made from it) is. Nothing acts on a `Partial` one:
/// a plan from half-listed watches would remove what the missing half describes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Completeness {
    /// Not every source has been read once yet (and the default of [`Desired`]: no plan yet).
    #[default]
    Partial,
    /// Kubernetes mode, the API server unreachable at start: the last complete snapshot,
    /// saved on disk by an earlier run. The watches take over once they have listed.
    Cached,
    /// Every watch listed at least once (Kubernetes mode), or the manifests read.
    Complete,
}

impl Completeness {
    /// Whether a plan may act (program the dataplane, count as the first complete plan).
    pub fn is_usable(self) -> bool {
        self != Completeness::Partial
    }
}

/// A Service's ports and endpoints, as its EndpointSlices describe them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServiceEndpoints {
    /// The Service's ports: (name, number). The name is empty for an unnamed single port.
    pub ports: Vec<(String, u16)>,
    pub endpoints: Vec<EndpointFacts>,
}

/// One endpoint address of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EndpointFacts {
    pub address: IpAddr,
    /// The slice's ports: (name, target port number).
    pub ports: Vec<(String, u16)>,
    /// Ready for new connections (serving and not terminating).
    pub ready: bool,
    /// Terminating but still serving: drains at weight 0.
    pub draining: bool,
    /// The node the endpoint runs on (`externalTrafficPolicy: Local` forwards to this node's
    /// only). Absent in snapshots saved before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// What the planner needs to know about a Node.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFacts {
    pub labels: BTreeMap<String, String>,
    /// The `Ready` condition (`None`: not reported).
    pub ready: Option<bool>,
    /// The `NetworkUnavailable` condition.
    pub network_unavailable: Option<bool>,
    pub unschedulable: bool,
    /// InternalIP addresses, for `unicastPeers: auto`.
    pub internal_ips: Vec<IpAddr>,
}

/// Facts observed on this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalFacts {
    /// Interface name → carrier up. Interfaces not listed count as up.
    pub carrier: BTreeMap<String, bool>,
    /// (VirtualIP name, check name) of the checks failing now.
    pub failing_checks: BTreeSet<(String, String)>,
    /// Ready endpoints of a Service on this node. Services not listed have none.
    pub local_ready_endpoints: BTreeMap<ServiceRef, usize>,
    /// Whether `local_ready_endpoints` is known (the cluster serves EndpointSlice v1); when
    /// not, the local-endpoints penalty does not apply and the reasons say so.
    pub endpoints_known: bool,
    /// The Services that exist (Kubernetes mode), so a reference to a missing one is named.
    pub services: BTreeSet<ServiceRef>,
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
    /// Name of the (first) VirtualIP this instance serves, for logs.
    pub resource: String,
    /// Every VirtualIP this instance serves: VirtualIPs without an explicit VRID whose
    /// settings are identical share one instance (one election, one advertisement stream),
    /// so thousands of VIPs fit in the 255 VRIDs of a segment.
    pub members: Vec<String>,
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
    /// `None`: multicast, advertisements accepted from any source. `Some`: the unicast
    /// allowlist, the only sources accepted and the destinations of advertisements. An
    /// allowlist fails closed: the planner never plans an empty one (the family is refused
    /// instead) and the engine never runs one.
    pub unicast_peers: Option<Vec<IpAddr>>,
    pub checksum: ChecksumMode,
    pub virtual_mac: bool,
    /// `spec.allowWidePrefix`: the addresses may have a shorter prefix than the interface's
    /// own subnet (the engine refuses them otherwise, per node).
    pub allow_wide_prefix: bool,
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
    #[error(
        "spec.virtualRouterId: all 255 IDs are taken on interface {interface}; set one explicitly"
    )]
    NoFreeVrid { interface: String },
    #[error("{field}: needs Kubernetes mode (standalone agents know no other nodes)")]
    NeedsCluster { field: String },
    #[error("metadata.name: required")]
    Unnamed,
    /// A unicast allowlist was asked for, but it has no peer of this family: the family's
    /// instance is not run (an empty allowlist must not fall back to accepting anyone).
    #[error(
        "spec.vrrp.unicastPeers: {}; the {family} instance is not run (an empty allowlist would accept advertisements from anyone): {}",
        if *auto { format!("auto found no eligible node with an {family} InternalIP address") } else { format!("lists no {family} peer") },
        if *auto { format!("give the nodes {family} InternalIP addresses or list the peers") } else { format!("list the {family} peers too") }
    )]
    NoUnicastPeers { family: Family, auto: bool },
}

impl RefusalReason {
    pub fn metric_label(&self) -> &'static str {
        match self {
            RefusalReason::Invalid(_) => "invalid",
            RefusalReason::DuplicateVrid { .. } => "duplicate_vrid",
            RefusalReason::DuplicateAddress { .. } => "duplicate_address",
            RefusalReason::NoFreeVrid { .. } => "no_free_vrid",
            RefusalReason::NeedsCluster { .. } => "needs_cluster",
            RefusalReason::Unnamed => "unnamed",
            RefusalReason::NoUnicastPeers { .. } => "no_unicast_peers",
        }
    }

    /// Whether this is a clash with another resource (a `Conflict` condition) rather than a
    /// problem of the resource alone.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            RefusalReason::DuplicateVrid { .. }
                | RefusalReason::DuplicateAddress { .. }
                | RefusalReason::NoFreeVrid { .. }
        )
    }
}

/// The plan for one VirtualIP on this node, for status reporting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResourcePlan {
    /// The VRID in use (explicit or derived); `None` when refused before one was chosen.
    pub vrid: Option<u8>,
    /// Whether this node may hold the addresses (node selector, exclusion label).
    pub eligible: bool,
    pub priority: Option<u8>,
    pub priority_reasons: Vec<String>,
    pub refused: Option<RefusalReason>,
    /// Kubernetes mode, accepted resources: every node that may hold the addresses (node
    /// selector, exclusion label), this one or not. Status uses it to drop the entries of
    /// nodes that left. Empty otherwise.
    pub eligible_nodes: BTreeSet<String>,
    /// Kubernetes mode, accepted resources: whether one of `eligible_nodes` is Ready.
    /// Every node derives it alike, so `Ready=False` for "no eligible node runs" is written
    /// by whichever agents run, without a fight.
    pub eligible_ready: bool,
    /// Instances of an otherwise accepted resource that are not run (one address family),
    /// and why. Decided from the resources and the cluster, the same on every node.
    pub refused_instances: Vec<RefusalReason>,
}

impl ResourcePlan {
    /// A resource this node does not refuse: with its priority and reasons where the node is
    /// eligible.
    fn accepted(vrid: u8, priority: Option<(u8, Vec<String>)>) -> Self {
        let eligible = priority.is_some();
        let (priority, priority_reasons) = match priority {
            Some((p, reasons)) => (Some(p), reasons),
            None => (None, Vec::new()),
        };
        ResourcePlan {
            vrid: Some(vrid),
            eligible,
            priority,
            priority_reasons,
            refused: None,
            eligible_nodes: BTreeSet::new(),
            eligible_ready: false,
            refused_instances: Vec::new(),
        }
    }
}

/// The desired state of one node.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Desired {
    /// Per interface, the instances keyed by family and VRID.
    pub instances: BTreeMap<String, BTreeMap<InstanceKey, InstanceSpec>>,
    pub refused: Vec<Refusal>,
    /// Every named VirtualIP of the snapshot.
    pub resources: BTreeMap<String, ResourcePlan>,
    /// The health checks this node must run: (VirtualIP name, check name) → check.
    pub checks: BTreeMap<(String, String), ValidCheck>,
    /// The virtual services this node forwards (every eligible node programs them).
    pub services: ServiceSet,
    /// VirtualIP name → why some of its services have no or fewer backends (a missing
    /// Service, an unknown port, a clashing fwmark), for status.
    pub service_notes: BTreeMap<String, Vec<String>>,
    /// That of the snapshot planned from: `Partial` only in `Desired::default()`, which
    /// stands for "no plan yet" (readiness and the dataplane wait for a usable one).
    pub completeness: Completeness,
    /// The synthetic VirtualIPs of load-balancer addresses (by resource name, `lb/<addr>`):
    /// which Services hold the address, for the master's annotation and Events. Their status
    /// is never written to a VirtualIP.
    pub load_balancers: BTreeMap<String, LbPlan>,
}

/// One load-balancer address as planned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbPlan {
    pub address: IpAddr,
    /// Oldest first.
    pub services: Vec<ServiceRef>,
    pub local: bool,
    pub forwarding: crate::crd::ServiceForwarding,
    /// The Services' ingress says `ipMode: Proxy` (kube-proxy leaves the address alone).
    pub proxy_ip_mode: bool,
}

impl Desired {
    pub fn iter(&self) -> impl Iterator<Item = &InstanceSpec> {
        self.instances.values().flat_map(|m| m.values())
    }

    fn refuse(&mut self, resource: String, vrid: Option<u8>, reason: RefusalReason) {
        self.resources.insert(
            resource.clone(),
            ResourcePlan {
                vrid,
                eligible: false,
                priority: None,
                priority_reasons: Vec::new(),
                refused: Some(reason.clone()),
                eligible_nodes: BTreeSet::new(),
                eligible_ready: false,
                refused_instances: Vec::new(),
            },
        );
        self.refused.push(Refusal { resource, reason });
    }
}

/// What earlier (higher-precedence) resources already use.
#[derive(Default)]
struct Taken {
    vrids: BTreeMap<(String, Family, u8), String>,
    addresses: BTreeMap<IpAddr, String>,
    /// Sharing signature → the name of the group's first VirtualIP.
    groups: BTreeMap<String, String>,
    /// Addresses of real VirtualIPs (when there are load-balancer addresses): those win.
    reserved: BTreeMap<IpAddr, String>,
}

/// What VirtualIPs must agree on to share an instance: everything but names and addresses.
/// `None` for those that cannot share: an explicit VRID, or health inputs keyed by the
/// resource (checks, local endpoints).
fn sharing_signature(spec: &ValidSpec) -> Option<String> {
    if spec.vrid.is_some() || !spec.checks.is_empty() || spec.local_endpoints.is_some() {
        return None;
    }
    Some(format!(
        "{}|{:?}|{:?}|{}|{:?}|{:?}|{}|{:?}|{}|{:?}|{:?}|{:?}",
        spec.interface,
        spec.version,
        spec.advert_interval,
        spec.preempt,
        spec.preempt_delay,
        spec.unicast_peers,
        spec.unicast_auto,
        spec.checksum,
        spec.virtual_mac,
        spec.node_selector,
        (spec.base_priority, &spec.preferred_nodes),
        spec.node_health,
    ))
}

/// Which sharing group a VirtualIP joins: its signature, plus what the engine's per-node
/// wide-prefix check looks at (the prefix lengths and `allowWidePrefix`), so that every member
/// of a group gets the same verdict and a VirtualIP refused on a node never takes the others
/// of its group down with it. Not part of the seed of derived VRIDs, which stays the
/// signature.
fn group_key(signature: &str, spec: &ValidSpec) -> String {
    let prefixes: BTreeSet<(bool, u8)> = spec
        .addresses
        .iter()
        .map(|a| (a.addr().is_ipv4(), a.prefix_len()))
        .collect();
    format!("{signature}|{}|{prefixes:?}", spec.allow_wide_prefix)
}

/// Adds the virtual services of one eligible VirtualIP: each service on each of its addresses
/// (once per family for fwmark services).
/// `local_node`: only the endpoints on this node are backends (`externalTrafficPolicy:
/// Local`).
fn plan_services(
    name: &str,
    spec: &ValidSpec,
    snapshot: &Snapshot,
    local_node: Option<&str>,
    desired: &mut Desired,
) {
    for service in &spec.services {
        let (backends, note) = match &service.backends {
            ValidBackends::Static(list) => (
                list.iter()
                    .map(|&(addr, port, weight)| (BackendKey { addr, port }, weight))
                    .collect(),
                None,
            ),
            ValidBackends::Service(r) => service_ref_backends(service, r, snapshot, local_node),
        };
        if let Some(note) = note {
            desired
                .service_notes
                .entry(name.to_string())
                .or_default()
                .push(note);
        }
        let keys: Vec<ServiceKey> = match service.matches {
            ServiceMatch::Port { protocol, port } => spec
                .addresses
                .iter()
                .map(|a| ServiceKey::Port {
                    addr: a.addr(),
                    protocol,
                    port,
                })
                .collect(),
            ServiceMatch::Fwmark(mark) => [Family::V4, Family::V6]
                .into_iter()
                .filter(|f| spec.addresses.iter().any(|a| Family::of(&a.addr()) == *f))
                .map(|family| ServiceKey::Fwmark { family, mark })
                .collect(),
        };
        for key in keys {
            if let Some(other) = desired.services.get(&key) {
                let note = format!(
                    "spec.services[{}]: {key} is already forwarded by VirtualIP {:?}",
                    service.index, other.owner
                );
                desired
                    .service_notes
                    .entry(name.to_string())
                    .or_default()
                    .push(note);
                continue;
            }
            let family = key.family();
            let backends = backends
                .iter()
                .filter(|(b, _)| {
                    service.forwarding == Forwarding::Tunnel || Family::of(&b.addr) == family
                })
                .map(|(b, w)| (*b, *w))
                .collect();
            desired.services.insert(
                key,
                ServiceSpec {
                    owner: name.to_string(),
                    scheduler: service.scheduler.clone(),
                    scheduler_flags: service.scheduler_flags,
                    persistence: service.persistence,
                    forwarding: service.forwarding,
                    source_nat: service.source_nat,
                    tunnel: service.tunnel,
                    connection_limit: service.connection_limit,
                    backends,
                },
            );
        }
    }
}

/// The backends a `serviceRef` resolves to: ready endpoints at weight 1, terminating ones
/// still serving at weight 0 (they drain), others left out.
fn service_ref_backends(
    service: &ValidService,
    r: &crate::crd::BackendServiceRef,
    snapshot: &Snapshot,
    local_node: Option<&str>,
) -> (BTreeMap<BackendKey, u32>, Option<String>) {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let field = format!("spec.services[{}].backends.serviceRef", service.index);
    let key = ServiceRef {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    };
    let Some(found) = snapshot.service_endpoints.get(&key) else {
        return (
            BTreeMap::new(),
            Some(format!(
                "{field}: Service {}/{} not found (no backends)",
                r.namespace, r.name
            )),
        );
    };
    let port_name = match &r.port {
        None if found.ports.len() <= 1 => found.ports.first().map(|(n, _)| n.clone()),
        None => None,
        Some(IntOrString::String(n)) => found
            .ports
            .iter()
            .find(|(name, _)| name == n)
            .map(|(n, _)| n.clone()),
        Some(IntOrString::Int(p)) => found
            .ports
            .iter()
            .find(|(_, port)| i64::from(*port) == i64::from(*p))
            .map(|(n, _)| n.clone()),
    };
    let Some(port_name) = port_name else {
        let why = match &r.port {
            None => "the Service has several ports: name one in port".to_string(),
            Some(IntOrString::String(n)) => format!("the Service has no port named {n:?}"),
            Some(IntOrString::Int(p)) => format!("the Service has no port {p}"),
        };
        return (BTreeMap::new(), Some(format!("{field}.port: {why}")));
    };
    let mut backends = BTreeMap::new();
    for e in &found.endpoints {
        if local_node.is_some() && e.node.as_deref() != local_node {
            continue;
        }
        let Some(&(_, port)) = e.ports.iter().find(|(n, _)| *n == port_name) else {
            continue;
        };
        let weight = if e.ready {
            1
        } else if e.draining {
            0
        } else {
            continue;
        };
        // An address in two slices (while kube moves it) counts once, ready winning.
        let entry = backends
            .entry(BackendKey {
                addr: e.address,
                port,
            })
            .or_insert(weight);
        *entry = (*entry).max(weight);
    }
    (backends, None)
}

/// Plans what `node` runs.
pub fn plan(snapshot: &Snapshot, node: &str) -> Desired {
    let mut desired = Desired {
        completeness: snapshot.completeness,
        ..Desired::default()
    };
    let mut taken = Taken::default();
    let synthetic = lb::synthesize(&snapshot.pools, &snapshot.load_balancers);
    if synthetic.is_empty() {
        for vip in &snapshot.virtual_ips {
            plan_resource(vip, None, snapshot, node, &mut taken, &mut desired);
        }
        return desired;
    }
    // Addresses of real VirtualIPs win over load-balancer addresses, whatever their age
    // (the allocator never hands them out; a VirtualIP created later for an allocated
    // address takes it from the Service).
    for vip in &snapshot.virtual_ips {
        let name = vip.metadata.name.clone().unwrap_or_default();
        for a in &vip.spec.addresses {
            if let Ok(net) = a.parse::<IpNet>() {
                taken
                    .reserved
                    .entry(net.addr())
                    .or_insert_with(|| name.clone());
            }
        }
    }
    // Merged by creationTimestamp into the real VirtualIPs' order (a VirtualIP wins a tie).
    let mut pending = synthetic.iter().peekable();
    for vip in &snapshot.virtual_ips {
        if let Some(t) = vip.metadata.creation_timestamp.as_ref().map(|t| t.0) {
            while let Some(s) = pending
                .next_if(|s| s.vip.metadata.creation_timestamp.as_ref().map(|t| t.0) < Some(t))
            {
                plan_resource(&s.vip, Some(s), snapshot, node, &mut taken, &mut desired);
            }
        }
        plan_resource(vip, None, snapshot, node, &mut taken, &mut desired);
    }
    for s in pending {
        plan_resource(&s.vip, Some(s), snapshot, node, &mut taken, &mut desired);
    }
    desired
}

/// Whether `node` may hold a load-balancer address: with `externalTrafficPolicy: Local`,
/// only with a ready endpoint of one of its Services on the node (strict: a node without
/// one does not run the instance at all, so it can never win; its VRRP instance stops, and
/// a master that loses its last local endpoint steps down with a priority-0 advertisement).
/// When EndpointSlices are not served the endpoints are unknown and every node may.
fn lb_eligible(lb: &lb::Synthetic, local: &LocalFacts) -> bool {
    !lb.local
        || !local.endpoints_known
        || lb
            .services
            .iter()
            .any(|s| local.local_ready_endpoints.get(s).is_some_and(|n| *n > 0))
}

/// Plans one VirtualIP, after the resources that take precedence over it (`taken`).
fn plan_resource(
    vip: &VirtualIP,
    lb: Option<&lb::Synthetic>,
    snapshot: &Snapshot,
    node: &str,
    taken: &mut Taken,
    desired: &mut Desired,
) {
    let Some(name) = vip.metadata.name.clone() else {
        desired.refused.push(Refusal {
            resource: String::new(),
            reason: RefusalReason::Unnamed,
        });
        return;
    };
    let spec = match vip.spec.validate() {
        Ok(s) => s,
        Err(errors) => return desired.refuse(name, None, RefusalReason::Invalid(errors)),
    };
    if !snapshot.cluster
        && let Some(field) = needs_cluster(&spec)
    {
        return desired.refuse(name, None, RefusalReason::NeedsCluster { field });
    }
    if let Some(s) = lb {
        desired.load_balancers.insert(
            name.clone(),
            LbPlan {
                address: s.address,
                services: s.services.clone(),
                local: s.local,
                forwarding: s.forwarding,
                proxy_ip_mode: s.proxy_ip_mode,
            },
        );
        if let Some(other) = taken.reserved.get(&s.address) {
            let reason = RefusalReason::DuplicateAddress {
                address: s.address,
                other: other.clone(),
            };
            return desired.refuse(name, None, reason);
        }
    }
    // Local-policy addresses never share an instance: their eligibility is per Service.
    let shareable = lb.is_none_or(|s| !s.local);
    let vrid = match claim(&name, &spec, shareable, taken) {
        Ok(vrid) => vrid,
        Err((vrid, reason)) => return desired.refuse(name, vrid, reason),
    };

    // Node-independent, so decided before eligibility: every node reports the same verdict.
    let mut peers = Vec::new();
    let mut refused_instances = Vec::new();
    for (family, allowlist) in allowlists(&spec, snapshot) {
        match allowlist {
            Ok(list) => peers.push((family, list)),
            Err(reason) => refused_instances.push(reason),
        }
    }
    if peers.is_empty()
        && let Some(reason) = refused_instances.first()
    {
        return desired.refuse(name, Some(vrid), reason.clone());
    }

    let eligible = (!snapshot.cluster
        || snapshot
            .nodes
            .get(node)
            .is_some_and(|facts| is_eligible(&spec, facts)))
        && lb.is_none_or(|s| lb_eligible(s, &snapshot.local));
    let cluster_view = |mut plan: ResourcePlan| {
        if snapshot.cluster {
            for (name, facts) in &snapshot.nodes {
                if is_eligible(&spec, facts) {
                    plan.eligible_nodes.insert(name.clone());
                    plan.eligible_ready |= facts.ready == Some(true);
                }
            }
        }
        plan
    };
    if !eligible {
        desired.resources.insert(
            name,
            cluster_view(ResourcePlan {
                refused_instances,
                ..ResourcePlan::accepted(vrid, None)
            }),
        );
        return;
    }

    let (priority, priority_reasons) = priority_with_health(
        &name,
        &spec,
        node,
        snapshot.nodes.get(node),
        &snapshot.local,
    );
    for check in &spec.checks {
        desired
            .checks
            .insert((name.clone(), check.spec.name.clone()), check.clone());
    }
    let local_node = lb.filter(|s| s.local).map(|_| node);
    plan_services(&name, &spec, snapshot, local_node, desired);
    plan_instances(
        &name,
        &spec,
        vrid,
        (priority, &priority_reasons),
        &peers,
        desired,
    );
    desired.resources.insert(
        name,
        cluster_view(ResourcePlan {
            refused_instances,
            ..ResourcePlan::accepted(vrid, Some((priority, priority_reasons)))
        }),
    );
}

/// Per family of the addresses, IPv4 first: `None` for multicast, or the unicast allowlist
/// (the listed peers of the family, plus with `auto` the eligible nodes' InternalIPs of the
/// family). An allowlist that comes out empty is a refusal of that family: it must not fall
/// back to multicast and accept advertisements from anyone.
type Allowlist = Result<Option<Vec<IpAddr>>, RefusalReason>;

fn allowlists(spec: &ValidSpec, snapshot: &Snapshot) -> Vec<(Family, Allowlist)> {
    let unicast = spec.unicast_auto || !spec.unicast_peers.is_empty();
    let auto_peers: Vec<IpAddr> = if spec.unicast_auto {
        snapshot
            .nodes
            .values()
            .filter(|facts| is_eligible(spec, facts))
            .flat_map(|facts| facts.internal_ips.iter().copied())
            .collect()
    } else {
        Vec::new()
    };
    families(spec)
        .into_iter()
        .map(|family| {
            if !unicast {
                return (family, Ok(None));
            }
            let mut peers: Vec<IpAddr> = spec
                .unicast_peers
                .iter()
                .chain(&auto_peers)
                .filter(|p| Family::of(p) == family)
                .copied()
                .collect();
            let mut seen = BTreeSet::new();
            peers.retain(|p| seen.insert(*p));
            let allowlist = if peers.is_empty() {
                Err(RefusalReason::NoUnicastPeers {
                    family,
                    auto: spec.unicast_auto,
                })
            } else {
                Ok(Some(peers))
            };
            (family, allowlist)
        })
        .collect()
}

/// The first field of `spec` that only Kubernetes mode can serve, if any.
fn needs_cluster(spec: &ValidSpec) -> Option<String> {
    if spec.node_selector.is_some() {
        Some("spec.nodeSelector".to_string())
    } else if spec.unicast_auto {
        Some("spec.vrrp.unicastPeers: auto".to_string())
    } else if spec.local_endpoints.is_some() {
        Some("spec.priority.localEndpoints".to_string())
    } else {
        spec.services
            .iter()
            .find(|s| matches!(s.backends, ValidBackends::Service(_)))
            .map(|s| format!("spec.services[{}].backends.serviceRef", s.index))
    }
}

/// The address families of `spec`, IPv4 first.
fn families(spec: &ValidSpec) -> Vec<Family> {
    [Family::V4, Family::V6]
        .into_iter()
        .filter(|f| spec.addresses.iter().any(|a| Family::of(&a.addr()) == *f))
        .collect()
}

/// Takes a VRID and the addresses for `name` unless an earlier resource holds them: on a
/// refusal, the VRID it would have had (if chosen) and why. Conflicts depend only on the
/// resources, never on the node, so every node reaches the same verdict without coordination.
fn claim(
    name: &str,
    spec: &ValidSpec,
    shareable: bool,
    taken: &mut Taken,
) -> Result<u8, (Option<u8>, RefusalReason)> {
    let families = families(spec);
    let signature = sharing_signature(spec).filter(|_| shareable);
    let group = signature.as_deref().map(|sig| group_key(sig, spec));
    let leader = group.as_ref().and_then(|g| taken.groups.get(g).cloned());
    let seed = signature.as_deref().unwrap_or(name);
    let vrid = choose_vrid(spec, seed, &families, taken, leader.as_deref())
        .map_err(|reason| (spec.vrid, reason))?;
    if let Some(reason) = spec.addresses.iter().find_map(|a| {
        taken
            .addresses
            .get(&a.addr())
            .map(|other| RefusalReason::DuplicateAddress {
                address: a.addr(),
                other: other.clone(),
            })
    }) {
        return Err((Some(vrid), reason));
    }
    let owner = leader.unwrap_or_else(|| name.to_string());
    if let Some(g) = group {
        taken.groups.entry(g).or_insert_with(|| name.to_string());
    }
    for family in &families {
        taken
            .vrids
            .insert((spec.interface.clone(), *family, vrid), owner.clone());
    }
    for a in &spec.addresses {
        taken.addresses.insert(a.addr(), name.to_string());
    }
    Ok(vrid)
}

/// The VRRP instances of an eligible VirtualIP, one per family that is not refused (`peers`
/// lists those, with their allowlists): a new instance, or more addresses for the instance of
/// the sharing group it joins.
fn plan_instances(
    name: &str,
    spec: &ValidSpec,
    vrid: u8,
    (priority, priority_reasons): (u8, &[String]),
    peers: &[(Family, Option<Vec<IpAddr>>)],
    desired: &mut Desired,
) {
    for (family, unicast_peers) in peers {
        let (family, unicast_peers) = (*family, unicast_peers.clone());
        let mut addresses: Vec<IpNet> = spec
            .addresses
            .iter()
            .filter(|a| Family::of(&a.addr()) == family)
            .copied()
            .collect();
        let instances = desired.instances.entry(spec.interface.clone()).or_default();
        let key = InstanceKey { family, vrid };
        if let Some(shared) = instances.get_mut(&key) {
            // A later member of a sharing group: same settings, more addresses. Only the
            // new ones are looked at, so a group of 10,000 members is planned in linear time.
            append_link_local_first(&mut shared.addresses, addresses);
            shared.members.push(name.to_string());
            continue;
        }
        link_local_first(&mut addresses);
        instances.insert(
            key,
            InstanceSpec {
                resource: name.to_string(),
                members: vec![name.to_string()],
                interface: spec.interface.clone(),
                family,
                vrid,
                version: spec.version,
                priority,
                priority_reasons: priority_reasons.to_vec(),
                advert_interval: spec.advert_interval,
                preempt: spec.preempt,
                preempt_delay: spec.preempt_delay,
                addresses,
                unicast_peers,
                checksum: spec.checksum,
                virtual_mac: spec.virtual_mac,
                allow_wide_prefix: spec.allow_wide_prefix,
            },
        );
    }
}

/// The explicit VRID, or one derived from `seed` (the name, or the sharing signature): a
/// hash, then the next free ID on the interface. Derived IDs stay put while older resources
/// stay. IDs held by `group` (the sharing group this resource joins) count as free.
fn choose_vrid(
    spec: &ValidSpec,
    seed: &str,
    families: &[Family],
    taken: &Taken,
    group: Option<&str>,
) -> Result<u8, RefusalReason> {
    let user = |vrid: u8| {
        families.iter().find_map(|f| {
            taken
                .vrids
                .get(&(spec.interface.clone(), *f, vrid))
                .filter(|owner| Some(owner.as_str()) != group)
                .map(|other| (*f, other.clone()))
        })
    };
    if let Some(leader) = group {
        // Join the group's instance when every family is free there.
        let existing = families.iter().find_map(|f| {
            taken
                .vrids
                .iter()
                .find(|((i, fam, _), owner)| {
                    *i == spec.interface && fam == f && owner.as_str() == leader
                })
                .map(|((_, _, v), _)| *v)
        });
        if let Some(vrid) = existing
            && user(vrid).is_none()
        {
            return Ok(vrid);
        }
    }
    if let Some(vrid) = spec.vrid {
        return match user(vrid) {
            None => Ok(vrid),
            Some((family, other)) => Err(RefusalReason::DuplicateVrid {
                interface: spec.interface.clone(),
                family,
                vrid,
                other,
            }),
        };
    }
    // From the derived ID up, then around.
    let start = derived_vrid(seed);
    (start..=*VRIDS.end())
        .chain(*VRIDS.start()..start)
        .find(|v| user(*v).is_none())
        .ok_or_else(|| RefusalReason::NoFreeVrid {
            interface: spec.interface.clone(),
        })
}

/// FNV-1a of the name, folded into the VRIDs (1-255): the same on every node and every run.
pub fn derived_vrid(name: &str) -> u8 {
    let mut hash: u32 = 0x811c_9dc5;
    for b in name.bytes() {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    let count = u32::from(*VRIDS.end() - *VRIDS.start()) + 1;
    (hash % count) as u8 + *VRIDS.start()
}

/// Node selector and exclusion label.
fn is_eligible(spec: &ValidSpec, facts: &NodeFacts) -> bool {
    if facts.labels.contains_key(EXCLUDE_LABEL) {
        return false;
    }
    spec.node_selector
        .as_ref()
        .is_none_or(|selector| selector_matches(selector, &facts.labels))
}

/// Kubernetes label-selector semantics (matchLabels AND every matchExpression): the one
/// implementation, in `ipam` (the layer above), shared with pools' selectors.
pub use crate::ipam::selector_matches;

/// `base` plus the weights of the preferred-node entries naming `node`, clamped to 1-254 (the
/// health-free part of what `plan` computes; the tests state the rule through it).
#[cfg(test)]
fn priority_for(node: &str, base: i64, preferred: &[(String, i64)]) -> (u8, Vec<String>) {
    let (total, reasons) = unclamped_priority(node, base, preferred);
    clamp_priority(total, reasons)
}

fn unclamped_priority(node: &str, base: i64, preferred: &[(String, i64)]) -> (i64, Vec<String>) {
    let mut reasons = vec![format!("base {base}")];
    let mut total = base;
    for (name, weight) in preferred {
        if name == node {
            total += weight;
            reasons.push(format!("preferred node {weight:+}"));
        }
    }
    (total, reasons)
}

fn clamp_priority(total: i64, mut reasons: Vec<String>) -> (u8, Vec<String>) {
    let clamped = total.clamp(
        i64::from(*NON_OWNER_PRIORITIES.start()),
        i64::from(*NON_OWNER_PRIORITIES.end()),
    );
    if clamped != total {
        reasons.push(format!("clamped from {total} to {clamped}"));
    }
    (clamped as u8, reasons)
}

/// Base and preference, minus the penalties of what is unhealthy now.
fn priority_with_health(
    name: &str,
    spec: &ValidSpec,
    node: &str,
    facts: Option<&NodeFacts>,
    local: &LocalFacts,
) -> (u8, Vec<String>) {
    let (mut total, mut reasons) =
        unclamped_priority(node, spec.base_priority, &spec.preferred_nodes);
    let mut penalty = |applies: bool, weight: i64, why: String| {
        if applies && weight > 0 {
            total -= weight;
            reasons.push(format!("{why} -{weight}"));
        }
    };
    let w = &spec.node_health;
    if let Some(f) = facts {
        penalty(f.ready != Some(true), w.not_ready, "node not Ready".into());
        penalty(
            f.network_unavailable == Some(true),
            w.network_unavailable,
            "node NetworkUnavailable".into(),
        );
        penalty(
            f.unschedulable,
            w.unschedulable,
            "node unschedulable".into(),
        );
    }
    penalty(
        local.carrier.get(&spec.interface) == Some(&false),
        w.carrier_down,
        format!("{} carrier down", spec.interface),
    );
    let mut unknown = None;
    if let Some((service, weight)) = &spec.local_endpoints {
        let ready = local
            .local_ready_endpoints
            .get(service)
            .copied()
            .unwrap_or(0);
        let why = if local.services.contains(service) {
            "no ready local endpoints of"
        } else {
            "no such Service"
        };
        if local.endpoints_known {
            penalty(
                ready == 0,
                *weight,
                format!("{why} {}/{}", service.namespace, service.name),
            );
        } else {
            unknown = Some(format!(
                "local endpoints of {}/{} unknown (no EndpointSlice v1)",
                service.namespace, service.name
            ));
        }
    }
    for check in &spec.checks {
        let failing = local
            .failing_checks
            .contains(&(name.to_string(), check.spec.name.clone()));
        penalty(
            failing,
            check.weight,
            format!("check {} failing", check.spec.name),
        );
    }
    reasons.extend(unknown);
    clamp_priority(total, reasons)
}

/// RFC 5798 §5.2.9: an IPv6 advertisement's first address is the virtual router's link-local
/// address. A link-local the user lists goes first (held and advertised like the others).
/// None is made up when the user lists none: keepalived configured the usual way lists none
/// either and drops advertisements whose address count differs from its own; the VRRP
/// instance lists a link-local first only once a peer's advertisement shows one
/// (`vrrp::instance::Instance::advertised_addresses`).
fn link_local_first(addresses: &mut [IpNet]) {
    if let Some(i) = addresses.iter().position(is_link_local) {
        addresses[..=i].rotate_right(1);
    }
}

fn is_link_local(a: &IpNet) -> bool {
    matches!(a.addr(), IpAddr::V6(v6) if v6.is_unicast_link_local())
}

/// `list` followed by `more`, ordered as [`link_local_first`] orders the whole, looking only
/// at `more` (and `list`'s first address): `list` is already in that order.
fn append_link_local_first(list: &mut Vec<IpNet>, more: Vec<IpNet>) {
    let old_len = list.len();
    let had_first = list.first().is_some_and(is_link_local);
    let found = more.iter().position(is_link_local);
    list.extend(more);
    if !had_first && let Some(i) = found {
        list[..=old_len + i].rotate_right(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn vip(name: &str, vrid: i64, addresses: &[&str]) -> VirtualIP {
        VirtualIP::new(name, crate::crd::sample_spec(addresses, vrid))
    }

    fn snapshot(vips: Vec<VirtualIP>) -> Snapshot {
        Snapshot {
            virtual_ips: vips,
            ..Snapshot::default()
        }
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
    fn dual_stack_splits_by_family_and_makes_up_no_link_local() {
        let s = snapshot(vec![vip(
            "web",
            10,
            &["192.0.2.100/24", "2001:db8::100/64"],
        )]);
        let d = plan(&s, "node-b");
        let v6 = d.iter().find(|i| i.family == Family::V6).unwrap();
        let v6: Vec<String> = v6.addresses.iter().map(ToString::to_string).collect();
        assert_eq!(v6, ["2001:db8::100/64"]);
        let v4 = d.iter().find(|i| i.family == Family::V4).unwrap();
        assert_eq!(v4.addresses.len(), 1);
    }

    #[test]
    fn a_listed_link_local_goes_first_and_the_others_keep_their_order() {
        let s = snapshot(vec![vip(
            "web",
            10,
            &[
                "2001:db8::100/64",
                "2001:db8::101/64",
                "fe80::200:5eff:fe00:20a/64",
            ],
        )]);
        let d = plan(&s, "node-b");
        let v6: Vec<String> = d
            .iter()
            .next()
            .unwrap()
            .addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            v6,
            [
                "fe80::200:5eff:fe00:20a/64",
                "2001:db8::100/64",
                "2001:db8::101/64"
            ]
        );
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

    /// (name, labels, ready, InternalIP)
    type TestNode<'a> = (&'a str, &'a [(&'a str, &'a str)], bool, &'a str);

    fn cluster(nodes: &[TestNode]) -> BTreeMap<String, NodeFacts> {
        nodes
            .iter()
            .map(|(name, labels, ready, ip)| {
                (
                    name.to_string(),
                    NodeFacts {
                        labels: labels
                            .iter()
                            .map(|(k, v)| (k.to_string(), v.to_string()))
                            .collect(),
                        ready: Some(*ready),
                        network_unavailable: Some(false),
                        unschedulable: false,
                        internal_ips: vec![ip.parse().unwrap()],
                    },
                )
            })
            .collect()
    }

    #[test]
    fn derived_vrids_are_stable_and_avoid_older_ones() {
        // Health checks keep these out of sharing, so their IDs derive from their names.
        let solo = |name: &str, addr: &str| {
            let mut v = vip(name, 1, &[addr]);
            v.spec.virtual_router_id = None;
            v.spec.priority.checks = vec![crate::crd::HealthCheck {
                name: "port".into(),
                tcp: Some(crate::crd::TcpCheck {
                    host: None,
                    port: 80,
                }),
                http: None,
                weight: 10,
                interval: "1s".into(),
                timeout: "1s".into(),
                rise: 1,
                fall: 1,
            }];
            v
        };
        let a = solo("alpha", "192.0.2.100/24");
        let b = solo("beta", "192.0.2.101/24");
        let d = plan(&snapshot(vec![a.clone(), b.clone()]), "node-a");
        let va = d.resources["alpha"].vrid.unwrap();
        let vb = d.resources["beta"].vrid.unwrap();
        assert_eq!(va, derived_vrid("alpha"));
        assert_ne!(va, vb);
        // An explicit newcomer on alpha's derived ID is the one refused.
        let explicit = vip("gamma", i64::from(va), &["192.0.2.102/24"]);
        let d = plan(&snapshot(vec![a.clone(), b.clone(), explicit]), "node-b");
        assert_eq!(d.resources["alpha"].vrid, Some(va));
        assert!(d.resources["gamma"].refused.as_ref().unwrap().is_conflict());
        // An ID already taken pushes the derived one to the next free.
        let c = solo("alpha-twin", "192.0.2.103/24");
        let taken_first = vip(
            "first",
            i64::from(derived_vrid("alpha-twin")),
            &["192.0.2.104/24"],
        );
        let d = plan(&snapshot(vec![taken_first, c]), "node-a");
        assert_eq!(
            d.resources["alpha-twin"].vrid,
            Some(derived_vrid("alpha-twin") % 255 + 1)
        );
    }

    #[test]
    fn every_node_reaches_the_same_verdict() {
        let s = Snapshot {
            virtual_ips: vec![
                vip("web", 51, &["192.0.2.100/24"]),
                vip("clash", 51, &["192.0.2.101/24"]),
            ],
            cluster: true,
            nodes: cluster(&[
                ("node-a", &[], true, "192.0.2.11"),
                ("node-b", &[(EXCLUDE_LABEL, "")], true, "192.0.2.12"),
            ]),
            ..Snapshot::default()
        };
        let a = plan(&s, "node-a");
        let b = plan(&s, "node-b");
        assert_eq!(a.refused, b.refused);
        assert!(a.resources["web"].eligible);
        assert!(
            !b.resources["web"].eligible,
            "excluded node must not run it"
        );
        assert_eq!(b.iter().count(), 0);
    }

    #[test]
    fn node_selector_and_unicast_auto() {
        let mut v = vip("web", 51, &["192.0.2.100/24"]);
        v.spec.node_selector = Some(LabelSelector {
            match_labels: Some([("vip".to_string(), "yes".to_string())].into()),
            ..LabelSelector::default()
        });
        v.spec.vrrp.unicast_peers = crate::crd::UnicastPeers::Auto;
        let s = Snapshot {
            virtual_ips: vec![v],
            cluster: true,
            nodes: cluster(&[
                ("node-a", &[("vip", "yes")], true, "192.0.2.11"),
                ("node-b", &[("vip", "yes")], true, "192.0.2.12"),
                ("node-c", &[], true, "192.0.2.13"),
            ]),
            ..Snapshot::default()
        };
        let a = plan(&s, "node-a");
        let inst = a.iter().next().unwrap();
        let peers: Vec<String> = inst
            .unicast_peers
            .iter()
            .flatten()
            .map(|p| p.to_string())
            .collect();
        assert_eq!(peers, ["192.0.2.11", "192.0.2.12"]);
        assert_eq!(plan(&s, "node-c").iter().count(), 0);
        // A node without a Node object is not eligible in cluster mode.
        assert_eq!(plan(&s, "node-z").iter().count(), 0);
    }

    #[test]
    fn standalone_refuses_what_needs_the_cluster() {
        let mut v = vip("web", 51, &["192.0.2.100/24"]);
        v.spec.vrrp.unicast_peers = crate::crd::UnicastPeers::Auto;
        let d = plan(&snapshot(vec![v]), "node-a");
        assert_eq!(d.refused[0].reason.metric_label(), "needs_cluster");
        assert!(d.refused[0].reason.to_string().contains("unicastPeers"));
    }

    #[test]
    fn health_lowers_priority_with_reasons() {
        let mut v = vip("web", 51, &["192.0.2.100/24"]);
        v.spec.priority.checks = vec![crate::crd::HealthCheck {
            name: "api".into(),
            tcp: Some(crate::crd::TcpCheck {
                host: None,
                port: 6443,
            }),
            http: None,
            weight: 30,
            interval: "1s".into(),
            timeout: "500ms".into(),
            rise: 2,
            fall: 2,
        }];
        v.spec.priority.local_endpoints = Some(crate::crd::LocalEndpoints {
            service: ServiceRef {
                namespace: "web".into(),
                name: "frontend".into(),
            },
            weight: 20,
        });
        let mut s = Snapshot {
            virtual_ips: vec![v],
            cluster: true,
            nodes: cluster(&[("node-a", &[], false, "192.0.2.11")]),
            ..Snapshot::default()
        };
        s.local.carrier.insert("eth0".into(), false);
        s.local.endpoints_known = true;
        s.local.services.insert(ServiceRef {
            namespace: "web".into(),
            name: "frontend".into(),
        });
        s.local.failing_checks.insert(("web".into(), "api".into()));
        let d = plan(&s, "node-a");
        let plan_a = &d.resources["web"];
        // 150 - 50 (not ready) - 50 (carrier) - 20 (no endpoints) - 30 (check) = 0 → 1
        assert_eq!(plan_a.priority, Some(1));
        assert_eq!(
            plan_a.priority_reasons,
            [
                "base 100",
                "preferred node +50",
                "node not Ready -50",
                "eth0 carrier down -50",
                "no ready local endpoints of web/frontend -20",
                "check api failing -30",
                "clamped from 0 to 1"
            ]
        );
        assert!(
            d.checks
                .contains_key(&("web".to_string(), "api".to_string()))
        );

        // Healthy again.
        s.nodes.get_mut("node-a").unwrap().ready = Some(true);
        s.local = LocalFacts {
            endpoints_known: true,
            ..LocalFacts::default()
        };
        s.local.local_ready_endpoints.insert(
            ServiceRef {
                namespace: "web".into(),
                name: "frontend".into(),
            },
            2,
        );
        assert_eq!(plan(&s, "node-a").resources["web"].priority, Some(150));
    }

    #[test]
    fn selector_semantics() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement as Req;
        let labels: BTreeMap<String, String> = [
            ("zone".to_string(), "a".to_string()),
            ("role".to_string(), "edge".to_string()),
        ]
        .into();
        let sel = |op: &str, key: &str, values: &[&str]| LabelSelector {
            match_expressions: Some(vec![Req {
                key: key.into(),
                operator: op.into(),
                values: if values.is_empty() {
                    None
                } else {
                    Some(values.iter().map(|v| v.to_string()).collect())
                },
            }]),
            ..LabelSelector::default()
        };
        assert!(selector_matches(&sel("In", "zone", &["a", "b"]), &labels));
        assert!(!selector_matches(&sel("In", "zone", &["b"]), &labels));
        assert!(selector_matches(&sel("NotIn", "zone", &["b"]), &labels));
        assert!(selector_matches(&sel("NotIn", "missing", &["b"]), &labels));
        assert!(selector_matches(&sel("Exists", "role", &[]), &labels));
        assert!(!selector_matches(
            &sel("DoesNotExist", "role", &[]),
            &labels
        ));
        assert!(selector_matches(&LabelSelector::default(), &labels));
    }

    #[test]
    fn virtual_ips_with_identical_settings_share_one_instance() {
        let auto = |name: &str, addr: &str| {
            let mut v = vip(name, 1, &[addr]);
            v.spec.virtual_router_id = None;
            v
        };
        let mut slow = auto("slow", "192.0.2.104/24");
        slow.spec.vrrp.advertisement_interval = "1s".into();
        let s = snapshot(vec![
            auto("a", "192.0.2.101/24"),
            auto("b", "192.0.2.102/24"),
            slow,
            auto("c", "192.0.2.103/24"),
            auto("dup", "192.0.2.101/24"),
        ]);
        let d = plan(&s, "node-a");
        let instances: Vec<_> = d.iter().collect();
        assert_eq!(instances.len(), 2, "{instances:#?}");
        let shared = instances.iter().find(|i| i.members.len() > 1).unwrap();
        assert_eq!(shared.members, ["a", "b", "c"]);
        assert_eq!(shared.addresses.len(), 3);
        assert_eq!(d.resources["a"].vrid, d.resources["c"].vrid);
        assert_ne!(d.resources["a"].vrid, d.resources["slow"].vrid);
        assert_eq!(d.refused[0].resource, "dup");
        // Same plan on every node, and a member leaving keeps the others in place.
        let without_b = snapshot(vec![
            auto("a", "192.0.2.101/24"),
            auto("c", "192.0.2.103/24"),
        ]);
        assert_eq!(
            plan(&without_b, "node-b").resources["c"].vrid,
            d.resources["c"].vrid
        );
    }

    #[test]
    fn a_thousand_virtual_ips_fit_in_one_segment() {
        let vips: Vec<VirtualIP> = (0..1000)
            .map(|i| {
                let mut v = vip(
                    &format!("vip-{i}"),
                    1,
                    &[&format!("10.{}.{}.1/32", i / 250, i % 250)],
                );
                v.spec.virtual_router_id = None;
                v
            })
            .collect();
        let d = plan(&snapshot(vips), "node-a");
        assert!(d.refused.is_empty(), "{:?}", d.refused.first());
        assert_eq!(d.iter().count(), 1);
        assert_eq!(d.iter().next().unwrap().addresses.len(), 1000);
    }

    /// `count` VirtualIPs without a VRID in `groups` sharing groups (distinct base
    /// priorities), planned in Kubernetes mode on three nodes.
    pub(crate) fn scale_snapshot(count: usize, groups: usize) -> Snapshot {
        let per_group = count.div_ceil(groups);
        let virtual_ips = (0..count)
            .map(|i| {
                let mut v = vip(
                    &format!("vip-{i:05}"),
                    1,
                    &[&format!(
                        "10.{}.{}.{}/32",
                        i / 65536,
                        i / 256 % 256,
                        i % 256
                    )],
                );
                v.spec.virtual_router_id = None;
                v.spec.priority.base = 100 + (i / per_group) as i64;
                v
            })
            .collect();
        Snapshot {
            virtual_ips,
            cluster: true,
            nodes: cluster(&[
                ("node-a", &[], true, "192.0.2.11"),
                ("node-b", &[], true, "192.0.2.12"),
                ("node-c", &[], true, "192.0.2.13"),
            ]),
            completeness: Completeness::Complete,
            ..Snapshot::default()
        }
    }

    #[test]
    fn appending_keeps_the_link_local_first_order_of_the_whole() {
        let nets = |l: &[&str]| -> Vec<IpNet> { l.iter().map(|a| a.parse().unwrap()).collect() };
        let cases: [(&[&str], &[&str]); 5] = [
            (&["2001:db8::1/64"], &["fe80::1/64", "2001:db8::2/64"]),
            (
                &["2001:db8::1/64", "2001:db8::3/64"],
                &["2001:db8::2/64", "fe80::1/64"],
            ),
            (&["fe80::1/64", "2001:db8::1/64"], &["fe80::2/64"]),
            (&["10.0.0.1/32"], &["10.0.0.2/32"]),
            (&[], &["2001:db8::2/64", "fe80::9/64"]),
        ];
        for (list, more) in cases {
            let mut whole = nets(list);
            link_local_first(&mut whole);
            let mut appended = whole.clone();
            whole.extend(nets(more));
            link_local_first(&mut whole);
            append_link_local_first(&mut appended, nets(more));
            assert_eq!(appended, whole, "{list:?} + {more:?}");
        }
    }

    #[test]
    fn ten_thousand_virtual_ips_plan_in_linear_time() {
        let fastest = |count: usize| {
            let snapshot = scale_snapshot(count, 4);
            (0..3)
                .map(|_| {
                    let started = std::time::Instant::now();
                    let d = plan(&snapshot, "node-a");
                    let took = started.elapsed();
                    assert!(d.refused.is_empty(), "{:?}", d.refused.first());
                    assert_eq!(d.iter().count(), 4);
                    assert_eq!(d.resources.len(), count);
                    let addresses: usize = d.iter().map(|i| i.addresses.len()).sum();
                    assert_eq!(addresses, count);
                    took
                })
                .min()
                .unwrap()
        };
        let small = fastest(2_500);
        let large = fastest(10_000);
        println!("plan: 2,500 VirtualIPs {small:?}, 10,000 VirtualIPs {large:?}");
        // Linear: 4 times the work (a quadratic step makes it 16).
        assert!(
            large < small * 8,
            "10,000 VirtualIPs took {large:?}, 2,500 took {small:?}"
        );
    }

    #[test]
    fn local_endpoints_unknown_or_missing_service() {
        let mut v = vip("web", 51, &["192.0.2.100/24"]);
        v.spec.priority.local_endpoints = Some(crate::crd::LocalEndpoints {
            service: ServiceRef {
                namespace: "web".into(),
                name: "frontend".into(),
            },
            weight: 20,
        });
        let mut s = Snapshot {
            virtual_ips: vec![v],
            cluster: true,
            nodes: cluster(&[("node-b", &[], true, "192.0.2.12")]),
            ..Snapshot::default()
        };
        // Kubernetes 1.20: no EndpointSlice v1, so no penalty, and the reasons say why.
        let d = plan(&s, "node-b");
        assert_eq!(d.resources["web"].priority, Some(100));
        assert_eq!(
            d.resources["web"].priority_reasons.last().unwrap(),
            "local endpoints of web/frontend unknown (no EndpointSlice v1)"
        );
        s.local.endpoints_known = true;
        let d = plan(&s, "node-b");
        assert_eq!(d.resources["web"].priority, Some(80));
        assert_eq!(
            d.resources["web"].priority_reasons.last().unwrap(),
            "no such Service web/frontend -20"
        );
    }

    fn with_services(mut v: VirtualIP, yaml: &str) -> VirtualIP {
        v.spec.services = serde_saphyr::from_str(yaml).unwrap();
        v
    }

    fn port_key(addr: &str, port: u16) -> ServiceKey {
        ServiceKey::Port {
            addr: addr.parse().unwrap(),
            protocol: crate::crd::ServiceProtocol::TCP,
            port,
        }
    }

    #[test]
    fn static_services_are_planned_per_address_and_family() {
        let v = with_services(
            vip(
                "web",
                51,
                &["192.0.2.100/24", "192.0.2.101/24", "2001:db8::100/64"],
            ),
            "- port: 80\n  scheduler: wrr\n  backends:\n    endpoints:\n      - {address: 10.1.0.1, port: 8080, weight: 3}\n      - {address: 'fd00::1', port: 8080}\n- fwmark: 7\n  forwarding: tunnel\n  backends: {endpoints: [{address: 10.1.0.9}]}\n",
        );
        let d = plan(&snapshot(vec![v]), "node-a");
        assert!(d.refused.is_empty(), "{:?}", d.refused);
        let keys: Vec<String> = d.services.keys().map(|k| k.to_string()).collect();
        assert_eq!(
            keys,
            [
                "TCP 192.0.2.100:80",
                "TCP 192.0.2.101:80",
                "TCP [2001:db8::100]:80",
                "fwmark 7 (ipv4)",
                "fwmark 7 (ipv6)"
            ]
        );
        let v4 = &d.services[&port_key("192.0.2.100", 80)];
        assert_eq!(v4.owner, "web");
        assert_eq!(v4.scheduler, "wrr");
        assert_eq!(
            v4.backends
                .iter()
                .map(|(b, w)| (b.to_string(), *w))
                .collect::<Vec<_>>(),
            [("10.1.0.1:8080".to_string(), 3)]
        );
        let v6 = &d.services[&port_key("2001:db8::100", 80)];
        assert_eq!(
            v6.backends
                .keys()
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
            ["[fd00::1]:8080"]
        );
        // Tunnels carry either family; port 0 keeps the packet's port.
        let fw6 = &d.services[&ServiceKey::Fwmark {
            family: Family::V6,
            mark: 7,
        }];
        assert_eq!(
            fw6.backends
                .keys()
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
            ["10.1.0.9:0"]
        );
    }

    #[test]
    fn service_refs_need_the_cluster_and_resolve_ready_endpoints() {
        let v = with_services(
            vip("web", 51, &["192.0.2.100/24"]),
            "- port: 80\n  backends:\n    serviceRef: {namespace: shop, name: frontend, port: http}\n",
        );
        let d = plan(&snapshot(vec![v.clone()]), "node-a");
        assert_eq!(
            d.refused[0].reason.to_string(),
            "spec.services[0].backends.serviceRef: needs Kubernetes mode (standalone agents know no other nodes)"
        );

        let mut s = snapshot(vec![v]);
        s.cluster = true;
        s.nodes = cluster(&[("node-a", &[], true, "10.0.0.1")]);
        let d = plan(&s, "node-a");
        assert!(d.services[&port_key("192.0.2.100", 80)].backends.is_empty());
        assert_eq!(
            d.service_notes["web"],
            ["spec.services[0].backends.serviceRef: Service shop/frontend not found (no backends)"]
        );

        let endpoint = |addr: &str, ready: bool, draining: bool| EndpointFacts {
            address: addr.parse().unwrap(),
            ports: vec![("http".into(), 8080), ("metrics".into(), 9090)],
            ready,
            draining,
            node: None,
        };
        s.service_endpoints.insert(
            ServiceRef {
                namespace: "shop".into(),
                name: "frontend".into(),
            },
            ServiceEndpoints {
                ports: vec![("http".into(), 80), ("metrics".into(), 9090)],
                endpoints: vec![
                    endpoint("10.1.0.1", true, false),
                    endpoint("10.1.0.2", false, true),
                    endpoint("10.1.0.3", false, false),
                    endpoint("10.1.0.1", true, false),
                ],
            },
        );
        let d = plan(&s, "node-a");
        assert!(!d.service_notes.contains_key("web"));
        assert_eq!(
            d.services[&port_key("192.0.2.100", 80)]
                .backends
                .iter()
                .map(|(b, w)| (b.to_string(), *w))
                .collect::<Vec<_>>(),
            [
                ("10.1.0.1:8080".to_string(), 1),
                ("10.1.0.2:8080".to_string(), 0)
            ],
            "ready at weight 1, terminating drains at 0, not ready left out"
        );

        // A node that may not hold the addresses forwards nothing.
        s.nodes = cluster(&[("node-a", &[(EXCLUDE_LABEL, "")], true, "10.0.0.1")]);
        assert!(plan(&s, "node-a").services.is_empty());
    }

    #[test]
    fn a_clashing_fwmark_stays_with_the_older_virtual_ip() {
        let svc = "- fwmark: 7\n  backends: {endpoints: [{address: 10.1.0.1, port: 80}]}\n";
        let a = with_services(vip("a", 51, &["192.0.2.100/24"]), svc);
        let b = with_services(vip("b", 52, &["192.0.2.101/24"]), svc);
        let d = plan(&snapshot(vec![a, b]), "node-a");
        assert_eq!(d.services.len(), 1);
        assert_eq!(d.services.values().next().unwrap().owner, "a");
        assert_eq!(
            d.service_notes["b"],
            ["spec.services[0]: fwmark 7 (ipv4) is already forwarded by VirtualIP \"a\""]
        );
    }

    #[test]
    fn an_allowlist_without_a_peer_of_a_family_refuses_that_family_only() {
        use crate::crd::UnicastPeers;
        let list = |p: &[&str]| UnicastPeers::List(p.iter().map(|s| s.to_string()).collect());
        let dual = ["192.0.2.100/24", "2001:db8::100/64"];
        // (case, peers, addresses, cluster, running families with their allowlists,
        //  refused families of a running resource, whole resource refused)
        type Case<'a> = (
            &'a str,
            UnicastPeers,
            &'a [&'a str],
            bool,
            &'a [(Family, Option<&'a [&'a str]>)],
            &'a [Family],
            Option<Family>,
        );
        let cases: Vec<Case> = vec![
            (
                "multicast",
                list(&[]),
                &dual,
                false,
                &[(Family::V4, None), (Family::V6, None)],
                &[],
                None,
            ),
            (
                "IPv4 peers only",
                list(&["192.0.2.12"]),
                &dual,
                false,
                &[(Family::V4, Some(&["192.0.2.12"]))],
                &[Family::V6],
                None,
            ),
            (
                "both families listed",
                list(&["192.0.2.12", "2001:db8::12"]),
                &dual,
                false,
                &[
                    (Family::V4, Some(&["192.0.2.12"])),
                    (Family::V6, Some(&["2001:db8::12"])),
                ],
                &[],
                None,
            ),
            (
                "auto, nodes without IPv6",
                UnicastPeers::Auto,
                &dual,
                true,
                &[(Family::V4, Some(&["192.0.2.11", "192.0.2.12"]))],
                &[Family::V6],
                None,
            ),
            (
                "auto, IPv6 only, nodes without IPv6",
                UnicastPeers::Auto,
                &["2001:db8::100/64"],
                true,
                &[],
                &[],
                Some(Family::V6),
            ),
        ];
        for (case, peers, addresses, in_cluster, running, partly, whole) in cases {
            let mut v = vip("web", 51, addresses);
            v.spec.vrrp.unicast_peers = peers;
            let mut s = snapshot(vec![v]);
            if in_cluster {
                s.cluster = true;
                s.nodes = cluster(&[
                    ("node-a", &[], true, "192.0.2.11"),
                    ("node-b", &[], true, "192.0.2.12"),
                    ("node-c", &[(EXCLUDE_LABEL, "")], true, "192.0.2.13"),
                ]);
            }
            let d = plan(&s, "node-a");
            let got: Vec<(Family, Option<Vec<IpAddr>>)> = d
                .iter()
                .map(|i| (i.family, i.unicast_peers.clone()))
                .collect();
            let want: Vec<(Family, Option<Vec<IpAddr>>)> = running
                .iter()
                .map(|(f, p)| {
                    (
                        *f,
                        p.map(|p| p.iter().map(|a| a.parse().unwrap()).collect()),
                    )
                })
                .collect();
            assert_eq!(got, want, "{case}");
            let plan_web = &d.resources["web"];
            let refused_families: Vec<Family> = plan_web
                .refused_instances
                .iter()
                .map(|r| match r {
                    RefusalReason::NoUnicastPeers { family, .. } => *family,
                    other => panic!("{case}: {other}"),
                })
                .collect();
            assert_eq!(refused_families, partly, "{case}");
            assert_eq!(
                plan_web.refused.as_ref().map(|r| r.metric_label()),
                whole.map(|_| "no_unicast_peers"),
                "{case}"
            );
            // The verdict is the cluster's, not the node's: an excluded node reaches it too.
            if in_cluster {
                let c = plan(&s, "node-c");
                assert_eq!(c.resources["web"].refused, plan_web.refused, "{case}");
                assert_eq!(
                    c.resources["web"].refused_instances, plan_web.refused_instances,
                    "{case}"
                );
            }
        }
        let mut v = vip("web", 51, &dual);
        v.spec.vrrp.unicast_peers = list(&["192.0.2.12"]);
        let d = plan(&snapshot(vec![v]), "node-a");
        assert_eq!(
            d.resources["web"].refused_instances[0].to_string(),
            "spec.vrrp.unicastPeers: lists no ipv6 peer; the ipv6 instance is not run (an empty \
             allowlist would accept advertisements from anyone): list the ipv6 peers too"
        );
    }

    #[test]
    fn sharing_groups_agree_on_prefix_lengths_and_wide_prefixes() {
        let auto = |name: &str, addr: &str| {
            let mut v = vip(name, 1, &[addr]);
            v.spec.virtual_router_id = None;
            v
        };
        let mut allowed = auto("allowed", "192.0.2.104/24");
        allowed.spec.allow_wide_prefix = true;
        let s = snapshot(vec![
            auto("a", "192.0.2.101/24"),
            auto("wide", "10.0.0.1/8"),
            auto("b", "192.0.2.102/24"),
            allowed,
            auto("host", "192.0.2.103/32"),
        ]);
        let d = plan(&s, "node-a");
        let members: Vec<Vec<String>> = d.iter().map(|i| i.members.clone()).collect();
        assert_eq!(members.len(), 4, "{members:?}");
        assert!(members.contains(&vec!["a".to_string(), "b".to_string()]));
        // The first group keeps the VRID derived from the settings alone.
        assert_eq!(d.resources["a"].vrid, d.resources["b"].vrid);
        let only_a = plan(&snapshot(vec![auto("a", "192.0.2.101/24")]), "node-a");
        assert_eq!(only_a.resources["a"].vrid, d.resources["a"].vrid);
    }
}
