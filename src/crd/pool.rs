//! The `LoadBalancerPool` resource: addresses that Services of `type: LoadBalancer` get, and
//! the VRRP side (interface, VRRP settings, nodes, priority) of every address handed out.
//!
//! The contract between the Service controller (one leader per cluster) and the agents (every
//! node) is in the Service object itself: see [`crate::crd::service_lb`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::virtualip::{PrioritySpec, VrrpSpec};

/// Addresses for Services of `type: LoadBalancer`, and how the nodes hold them.
// The printcolumn(...) entries repeat `type_ = "string"`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferrovip.io",
    version = "v1alpha1",
    kind = "LoadBalancerPool",
    plural = "loadbalancerpools",
    shortname = "lbpool",
    category = "ferrovip",
    doc = "Addresses handed out to Services of type LoadBalancer, and the VRRP settings of every address handed out.",
    status = "LoadBalancerPoolStatus",
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".spec.addresses",
        description = "Address ranges"
    ),
    printcolumn(
        name = "IPv4 Free",
        type_ = "integer",
        json_path = ".status.ipv4.available",
        description = "IPv4 addresses left"
    ),
    printcolumn(
        name = "IPv6 Free",
        type_ = "integer",
        json_path = ".status.ipv6.available",
        description = "IPv6 addresses left (saturated at 2^63-1)"
    ),
    printcolumn(
        name = "In Use",
        type_ = "integer",
        json_path = ".status.inUse",
        description = "Addresses held by Services"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Whether the pool hands out addresses"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancerPoolSpec {
    /// Address ranges: CIDRs (`192.0.2.0/28`, `2001:db8::/120`) or inclusive ranges
    /// (`192.0.2.10-192.0.2.20`), IPv4 and IPv6 mixed. A CIDR's network and broadcast
    /// addresses are never handed out (IPv4 prefixes up to /30); list them as a range to use
    /// them.
    #[schemars(
        length(min = 1, max = 256),
        inner(regex(pattern = r"^[0-9A-Fa-f:.]+(/[0-9]{1,3}|-[0-9A-Fa-f:.]+)?$"))
    )]
    pub addresses: Vec<String>,

    /// Hand out addresses to Services that ask for no pool (default). When false, only
    /// Services that name this pool (`ferrovip.io/pool`) or one of its addresses get one.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Never hand out IPv4 addresses ending in `.0` or `.255` (some clients and routers drop
    /// them).
    #[serde(
        default,
        rename = "avoidBuggyIPs",
        skip_serializing_if = "std::ops::Not::not"
    )]
    pub avoid_buggy_ips: bool,

    /// Only Services whose labels match. All Services when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,

    /// Only Services in namespaces whose labels match. Combined with `namespaces` (both must
    /// allow a namespace when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,

    /// Only Services in these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,

    /// When several pools may serve a Service, the lowest `priority` is tried first (then
    /// the oldest pool, then the name).
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000000))]
    pub priority: i64,

    /// The VRRP side of every address this pool hands out.
    pub template: PoolTemplate,
}

/// How the nodes hold an address of the pool: what a VirtualIP says, without its addresses
/// and services (those come from the Service).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PoolTemplate {
    /// Network interface that carries the addresses and the VRRP advertisements.
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,

    /// Nodes that may hold the addresses (all nodes when absent). Nodes labelled
    /// `node.kubernetes.io/exclude-from-external-load-balancers` never do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// VRRP protocol settings. Addresses of pools with identical templates share VRRP
    /// instances (one election for many addresses).
    #[serde(default)]
    pub vrrp: VrrpSpec,

    /// How each node's VRRP priority is derived (`localEndpoints` is not allowed here: a
    /// Service with `externalTrafficPolicy: Local` gets it by itself).
    #[serde(default)]
    pub priority: PrioritySpec,

    /// Who forwards the Service's traffic once it reaches the master.
    #[serde(default)]
    pub forwarding: ServiceForwarding,

    /// IPVS scheduler when `forwarding` is `IPVS` (see VirtualIP `spec.services[].scheduler`).
    #[serde(default = "default_scheduler")]
    pub scheduler: String,
}

/// Who forwards a load-balancer address's traffic.
#[derive(
    Deserialize,
    Serialize,
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    JsonSchema,
)]
pub enum ServiceForwarding {
    /// kube-proxy (iptables, IPVS or nftables mode) forwards, as for any load-balancer
    /// address; ferrovip elects the node that holds and announces the address. Right on a
    /// standard cluster: nothing is programmed twice.
    #[default]
    KubeProxy,
    /// ferrovip programs IPVS towards the Service's ready endpoints on every eligible node,
    /// and writes `ipMode: Proxy` in the Service status where the API server has the field
    /// (1.29+), which tells kube-proxy to leave the address alone. For clusters without
    /// kube-proxy, or servers with `ipMode`.
    IPVS,
}

/// What the Service controller observes of a pool (written by the leader only).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerPoolStatus {
    /// Generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// IPv4 addresses of the pool (absent when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<PoolUsage>,
    /// IPv6 addresses of the pool (absent when it has none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<PoolUsage>,
    /// Addresses of the pool held by Services, both families.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use: Option<i64>,
    /// `Ready`, `Conflict` (overlap with an older pool, or with a VirtualIP), `Invalid`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Address counts of one family. IPv6 counts saturate at 2^63-1.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolUsage {
    /// Addresses the pool can hand out (ranges minus network/broadcast and, with
    /// `avoidBuggyIPs`, .0/.255 addresses, minus overlaps with older pools).
    pub total: i64,
    pub in_use: i64,
    pub available: i64,
}

fn default_true() -> bool {
    true
}
fn default_scheduler() -> String {
    "rr".to_string()
}

impl PoolTemplate {
    /// The VirtualIP spec that an address set of this pool is held with: the template's
    /// settings, the given addresses and services, a VRID derived like any VirtualIP's
    /// without one. Validating it (`VirtualIPSpec::validate`) validates the template; a
    /// problem's field names `spec.template.<field>` once [`template_field`] maps it.
    pub fn virtual_ip_spec(
        &self,
        addresses: Vec<String>,
        services: Vec<super::virtualip::VirtualService>,
    ) -> super::virtualip::VirtualIPSpec {
        super::virtualip::VirtualIPSpec {
            addresses,
            allow_wide_prefix: false,
            interface: self.interface.clone(),
            virtual_router_id: None,
            node_selector: self.node_selector.clone(),
            vrrp: self.vrrp.clone(),
            priority: self.priority.clone(),
            services,
        }
    }
}

/// A VirtualIP field path (`spec.vrrp.advertisementInterval`) as the pool field it comes from
/// (`spec.template.vrrp.advertisementInterval`).
pub fn template_field(virtual_ip_field: &str) -> String {
    match virtual_ip_field.strip_prefix("spec.") {
        Some(rest) => format!("spec.template.{rest}"),
        None => virtual_ip_field.to_string(),
    }
}
