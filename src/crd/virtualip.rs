//! The `VirtualIP` resource: one highly available address set, elected with VRRP.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A set of virtual addresses that the eligible nodes elect a master for with VRRP.
/// The master holds the addresses on `interface` and announces them; when it fails, the
/// backup with the highest priority takes over within Master_Down_Interval.
// The printcolumn(...) entries repeat `type_ = "string"`, which clippy mistakes for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferrovip.io",
    version = "v1alpha1",
    kind = "VirtualIP",
    plural = "virtualips",
    shortname = "vip",
    category = "ferrovip",
    doc = "A highly available set of virtual addresses, elected among nodes with VRRP.",
    status = "VirtualIPStatus",
    printcolumn(
        name = "Addresses",
        type_ = "string",
        json_path = ".spec.addresses",
        description = "Virtual addresses"
    ),
    printcolumn(
        name = "Master",
        type_ = "string",
        json_path = ".status.master",
        description = "Node holding the addresses"
    ),
    printcolumn(
        name = "State",
        type_ = "string",
        json_path = ".status.state",
        description = "Overall state"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualIPSpec {
    /// Virtual addresses with their prefix length, e.g. `192.0.2.100/24` or
    /// `2001:db8::100/64`. IPv4 and IPv6 may be mixed: each family runs its own VRRP instance
    /// with the same virtual router ID.
    #[schemars(length(min = 1, max = 1024))]
    pub addresses: Vec<String>,

    /// Network interface that carries the addresses and the VRRP advertisements.
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,

    /// VRRP virtual router ID, 1-255, unique per interface (segment) and address family.
    #[schemars(range(min = 1, max = 255))]
    pub virtual_router_id: i64,

    /// VRRP protocol settings.
    #[serde(default)]
    pub vrrp: VrrpSpec,

    /// How each node's VRRP priority is derived.
    #[serde(default)]
    pub priority: PrioritySpec,
}

/// VRRP protocol settings of one VirtualIP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VrrpSpec {
    /// VRRP version: 3 (RFC 5798/9568, IPv4 and IPv6, sub-second intervals) or 2 (RFC 3768,
    /// IPv4 only, whole seconds).
    #[serde(default = "default_version")]
    #[schemars(range(min = 2, max = 3))]
    pub version: i64,

    /// Advertisement interval, e.g. `100ms` or `1s`. Version 3: 10ms to 40.95s in steps of
    /// 10ms. Version 2: 1s to 255s in whole seconds.
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"))]
    pub advertisement_interval: String,

    /// Whether a higher-priority backup takes over from a lower-priority master.
    #[serde(default = "default_true")]
    pub preempt: bool,

    /// How long after start-up, or after first seeing a lower-priority master, a node waits
    /// before preempting it, e.g. `30s`. Lets a recovering node settle before it takes over.
    #[serde(default = "default_zero")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"))]
    pub preempt_delay: String,

    /// Send advertisements to these addresses instead of the multicast group, for networks
    /// without multicast. Advertisements from other sources are then dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unicast_peers: Vec<String>,

    /// Checksum form of version 3 over IPv4 when sending: `PseudoHeader` (keepalived's and
    /// Wireshark's) or `MessageOnly` (RFC 9568 text, keepalived `v3_checksum_as_v2`).
    /// Both forms are accepted on receive.
    #[serde(default)]
    pub ipv4_checksum: Ipv4Checksum,

    /// Hold the addresses on a macvlan with the VRRP virtual MAC (00:00:5e:00:01:VRID), so
    /// neighbours' caches stay valid across failover.
    #[serde(default)]
    pub virtual_mac: bool,
}

impl Default for VrrpSpec {
    fn default() -> Self {
        VrrpSpec {
            version: default_version(),
            advertisement_interval: default_interval(),
            preempt: true,
            preempt_delay: default_zero(),
            unicast_peers: Vec::new(),
            ipv4_checksum: Ipv4Checksum::default(),
            virtual_mac: false,
        }
    }
}

/// Checksum form of VRRPv3 over IPv4.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum Ipv4Checksum {
    #[default]
    PseudoHeader,
    MessageOnly,
}

/// Priority of a node: `base` plus the weights of the matching `preferredNodes`, clamped to
/// 1-254 (255 is reserved for an address owner, 0 for a master that leaves).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PrioritySpec {
    /// Priority of every eligible node before adjustments.
    #[serde(default = "default_base")]
    #[schemars(range(min = 1, max = 254))]
    pub base: i64,

    /// Nodes that get a priority bonus (or, with a negative weight, a malus).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub preferred_nodes: Vec<PreferredNode>,
}

impl Default for PrioritySpec {
    fn default() -> Self {
        PrioritySpec {
            base: default_base(),
            preferred_nodes: Vec::new(),
        }
    }
}

/// A priority adjustment for one node.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PreferredNode {
    /// Name of the node (the Kubernetes node name, or `--node-name` in standalone mode).
    #[schemars(length(min = 1))]
    pub node_name: String,
    /// Added to the base priority on that node.
    #[schemars(range(min = -254, max = 254))]
    pub weight: i64,
}

/// Observed state, written by the agents (each node writes only its own entry).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct VirtualIPStatus {
    /// Generation of the spec this status reflects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Node currently holding the addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// Summary for `kubectl get`: `Active`, `NoMaster`, `Invalid`, `Conflict`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// Virtual router ID in use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_router_id: Option<i64>,
    /// Per-node VRRP state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    /// `Ready`, `Conflict`, `Degraded`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One node's view of a VirtualIP.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub name: String,
    /// `Master`, `Backup`, `Initialize` or `Fault`.
    pub state: String,
    pub priority: i64,
    /// Why the priority is what it is, e.g. `base 100`, `preferred +50`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reasons: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

fn default_version() -> i64 {
    3
}
fn default_interval() -> String {
    "1s".to_string()
}
fn default_zero() -> String {
    "0s".to_string()
}
fn default_true() -> bool {
    true
}
fn default_base() -> i64 {
    100
}
