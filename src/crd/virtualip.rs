//! The `VirtualIP` resource: one highly available address set, elected with VRRP.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
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

    /// Allow `addresses` with a shorter prefix than the interface's own subnet, e.g.
    /// `10.0.0.100/8` on an interface holding `10.0.0.1/24`. An address's prefix becomes a
    /// route on every master: a short one sends traffic for a whole range out of this
    /// interface, which is rarely what was meant, so each node refuses such an address
    /// (status `Fault` naming the address) unless this is true. One switch for the resource
    /// rather than a per-address form keeps `addresses` a plain list and makes the exception
    /// easy to find in review and to forbid with admission policy. Use `/32` (`/128`) or the
    /// subnet's own prefix otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_wide_prefix: bool,

    /// Network interface that carries the addresses and the VRRP advertisements.
    #[schemars(length(min = 1, max = 15))]
    pub interface: String,

    /// VRRP virtual router ID, 1-255, unique per interface (segment) and address family.
    /// When absent, every node derives the same ID from the name (shown in
    /// `status.virtualRouterId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub virtual_router_id: Option<i64>,

    /// Nodes that may hold the addresses (all nodes when absent). Nodes labelled
    /// `node.kubernetes.io/exclude-from-external-load-balancers` never do.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// VRRP protocol settings.
    #[serde(default)]
    pub vrrp: VrrpSpec,

    /// How each node's VRRP priority is derived.
    #[serde(default)]
    pub priority: PrioritySpec,

    /// Virtual services: traffic arriving at the addresses is balanced over backends with
    /// IPVS. Every eligible node programs them (only the master holds the addresses), so a new
    /// master forwards at once.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256))]
    pub services: Vec<VirtualService>,
}

/// One virtual service on every address of the VirtualIP: `port` and `protocol`, or a firewall
/// mark set by your own rules (`fwmark`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// Port on the virtual addresses (exactly one of `port` and `fwmark`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,

    /// `TCP`, `UDP` or `SCTP`.
    #[serde(default)]
    pub protocol: ServiceProtocol,

    /// Match packets carrying this firewall mark instead of an address and port (the marks
    /// are set by your own nftables or iptables rules); one service per address family.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub fwmark: Option<i64>,

    /// IPVS scheduler: `rr`, `wrr`, `lc`, `wlc`, `lblc`, `lblcr`, `dh`, `sh`, `sed`, `nq`,
    /// `fo`, `ovf`, `mh` or `twos`.
    #[serde(default = "default_scheduler")]
    pub scheduler: String,

    /// Scheduler flags: `sh-fallback`/`sh-port` for `sh`, `mh-fallback`/`mh-port` for `mh`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scheduler_flags: Vec<String>,

    /// How packets reach the backends: `masquerade` (NAT; backends may be anywhere routed),
    /// `direct` (direct routing: backends on the segment, holding the address on a loopback
    /// without answering ARP for it) or `tunnel` (IP-in-IP to the backends).
    #[serde(default)]
    pub forwarding: Forwarding,

    /// With `masquerade`: also rewrite the client's address to the node's, so replies come
    /// back through it without the backends routing via the node (like kube-proxy). Turn off
    /// when the backends' default route is the virtual address (classic LVS-NAT), to keep the
    /// client address.
    #[serde(default = "default_true")]
    pub source_nat: bool,

    /// Send a client to the same backend for this long after its last connection, e.g.
    /// `300s` (IPVS persistence). Off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"))]
    pub persistence: Option<String>,

    /// With `tunnel` forwarding: how packets are encapsulated (IP-in-IP by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tunnel: Option<TunnelSpec>,

    /// Limit on each backend's connections (IPVS thresholds): a backend at `max` gets no new
    /// connections until it has fewer than `resumeBelow` (by default three quarters of `max`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_limit: Option<ConnectionLimit>,

    /// Where the traffic goes (exactly one of `endpoints` and `serviceRef`).
    pub backends: Backends,
}

/// Encapsulation of `tunnel` forwarding.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TunnelSpec {
    /// `ipip` (default), `gue` (IP in UDP, needs `port`) or `gre`.
    #[serde(default, rename = "type")]
    pub kind: TunnelKind,
    /// UDP port of GUE on the backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// Checksum the outer header (`gue`, `gre`).
    #[serde(default)]
    pub checksum: bool,
    /// GUE remote checksum offload.
    #[serde(default)]
    pub remote_checksum: bool,
}

/// Tunnel encapsulation.
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
#[serde(rename_all = "lowercase")]
pub enum TunnelKind {
    #[default]
    Ipip,
    Gue,
    Gre,
}

/// Per-backend connection thresholds.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConnectionLimit {
    /// Connections (active and inactive) at which a backend stops getting new ones.
    #[schemars(range(min = 1, max = 2147483647))]
    pub max: i64,
    /// A full backend gets new connections again below this many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 2147483647))]
    pub resume_below: Option<i64>,
}

/// The backends of a virtual service.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Backends {
    /// Static backends (standalone mode, or servers outside the cluster).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 1024))]
    pub endpoints: Vec<StaticEndpoint>,

    /// The ready endpoints of a Kubernetes Service (Kubernetes mode): endpoints that are not
    /// ready leave the table, terminating ones drain at weight 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ref: Option<BackendServiceRef>,
}

/// A fixed backend.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpoint {
    pub address: String,
    /// Defaults to the service's port (required for `fwmark` services with `masquerade`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<i64>,
    /// Relative share of new connections for weighted schedulers; 0 drains the backend (no
    /// new connections, existing ones continue).
    #[serde(default = "default_weight")]
    #[schemars(range(min = 0, max = 65535))]
    pub weight: i64,
}

/// A Service port whose endpoints are the backends.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    /// The Service port: its name, or its number. May be omitted when the Service has one
    /// port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "int_or_string_schema")]
    pub port: Option<k8s_openapi::apimachinery::pkg::util::intstr::IntOrString>,
}

/// A name or a number. Not `x-kubernetes-int-or-string`: API servers before 1.21 fail to build
/// the OpenAPI models of a CRD holding one, and then treat every list of the resource as
/// atomic, so server-side apply of one node's status entry would drop the other nodes'. The
/// agent validates the value.
fn int_or_string_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The Service port: its name, or its number. May be omitted when the Service has one port.",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

/// Transport protocol of a virtual service.
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
pub enum ServiceProtocol {
    #[default]
    TCP,
    UDP,
    SCTP,
}

/// IPVS forwarding method.
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
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    #[default]
    Masquerade,
    Direct,
    Tunnel,
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
    /// without multicast: a list of addresses, or `auto` for the InternalIP addresses of the
    /// eligible nodes (Kubernetes mode). Advertisements from other sources are then dropped.
    #[serde(default, skip_serializing_if = "UnicastPeers::is_multicast")]
    pub unicast_peers: UnicastPeers,

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
            unicast_peers: UnicastPeers::default(),
            ipv4_checksum: Ipv4Checksum::default(),
            virtual_mac: false,
        }
    }
}

/// `auto`, or a list of peer addresses (empty: multicast).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UnicastPeers {
    Auto,
    List(Vec<String>),
}

impl Default for UnicastPeers {
    fn default() -> Self {
        UnicastPeers::List(Vec::new())
    }
}

impl UnicastPeers {
    pub fn is_multicast(&self) -> bool {
        matches!(self, UnicastPeers::List(l) if l.is_empty())
    }
}

impl Serialize for UnicastPeers {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            UnicastPeers::Auto => s.serialize_str("auto"),
            UnicastPeers::List(l) => l.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for UnicastPeers {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PeersVisitor;
        impl<'de> serde::de::Visitor<'de> for PeersVisitor {
            type Value = UnicastPeers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"auto\" or a list of peer addresses")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<UnicastPeers, E> {
                if v == "auto" {
                    Ok(UnicastPeers::Auto)
                } else {
                    Err(E::invalid_value(serde::de::Unexpected::Str(v), &self))
                }
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<UnicastPeers, A::Error> {
                let mut peers = Vec::new();
                while let Some(p) = seq.next_element::<String>()? {
                    peers.push(p);
                }
                Ok(UnicastPeers::List(peers))
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<UnicastPeers, E> {
                Ok(UnicastPeers::default())
            }
        }
        d.deserialize_any(PeersVisitor)
    }
}

impl JsonSchema for UnicastPeers {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "UnicastPeers".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        // A string or a list: not expressible as a structural schema, so the API server keeps
        // the value as given and the agent validates it.
        schemars::json_schema!({
            "x-kubernetes-preserve-unknown-fields": true
        })
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

    /// Penalties for an unhealthy node (Kubernetes mode, except `carrierDown`).
    #[serde(default)]
    pub node_health: NodeHealthWeights,

    /// A Service whose ready endpoints on this node matter (externalTrafficPolicy: Local):
    /// with none, the node's priority drops by `weight`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_endpoints: Option<LocalEndpoints>,

    /// TCP and HTTP checks run by every eligible node; each failing check subtracts its
    /// weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 32))]
    pub checks: Vec<HealthCheck>,
}

impl Default for PrioritySpec {
    fn default() -> Self {
        PrioritySpec {
            base: default_base(),
            preferred_nodes: Vec::new(),
            node_health: NodeHealthWeights::default(),
            local_endpoints: None,
            checks: Vec::new(),
        }
    }
}

/// Priority penalties (0-254) applied while a node is unhealthy.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeHealthWeights {
    /// The Node's `Ready` condition is not True.
    #[serde(default = "default_penalty")]
    #[schemars(range(min = 0, max = 254))]
    pub not_ready: i64,
    /// The Node's `NetworkUnavailable` condition is True.
    #[serde(default = "default_penalty")]
    #[schemars(range(min = 0, max = 254))]
    pub network_unavailable: i64,
    /// The Node is cordoned (`spec.unschedulable`). 0 by default: cordoning alone does not
    /// move addresses.
    #[serde(default)]
    #[schemars(range(min = 0, max = 254))]
    pub unschedulable: i64,
    /// The interface has no carrier (cable out, peer down).
    #[serde(default = "default_penalty")]
    #[schemars(range(min = 0, max = 254))]
    pub carrier_down: i64,
}

impl Default for NodeHealthWeights {
    fn default() -> Self {
        NodeHealthWeights {
            not_ready: default_penalty(),
            network_unavailable: default_penalty(),
            unschedulable: 0,
            carrier_down: default_penalty(),
        }
    }
}

/// A Service whose local endpoints' readiness counts.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LocalEndpoints {
    pub service: ServiceRef,
    #[serde(default = "default_penalty")]
    #[schemars(range(min = 0, max = 254))]
    pub weight: i64,
}

/// A namespaced Service.
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
}

/// A TCP or HTTP check (exactly one of `tcp`, `http`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HealthCheck {
    /// Unique within the VirtualIP; shown in the priority reasons.
    #[schemars(length(min = 1, max = 63))]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpCheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<HttpCheck>,
    /// Subtracted from the priority while the check fails.
    #[serde(default = "default_penalty")]
    #[schemars(range(min = 0, max = 254))]
    pub weight: i64,
    #[serde(default = "default_check_interval")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"))]
    pub interval: String,
    #[serde(default = "default_check_timeout")]
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m)$"))]
    pub timeout: String,
    /// Consecutive successes before a failing check passes again.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub rise: i64,
    /// Consecutive failures before a passing check fails.
    #[serde(default = "default_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub fall: i64,
}

/// Connect to `host:port`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpCheck {
    /// Defaults to 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
}

/// `GET http://host:port/path`; passes on a 2xx or 3xx answer unless `expectStatus` says
/// otherwise.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpCheck {
    /// Address to connect to. Defaults to 127.0.0.1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[schemars(range(min = 1, max = 65535))]
    pub port: i64,
    /// Request path, with its query if any: printable ASCII, no spaces (percent-encode them).
    #[serde(default = "default_path")]
    pub path: String,
    /// Probe over TLS. Like the kubelet's HTTPS probes, the server's certificate is not
    /// verified (the check asks whether the service answers, not who it is); the TLS server
    /// name is the `hostHeader`'s host when it is a DNS name.
    #[serde(default)]
    pub https: bool,
    /// Statuses that pass: one (`"200"`) or an inclusive range (`"200-299"`), within
    /// 100-599. A string, quoted in YAML. Defaults to 200-399.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{3}(-[0-9]{3})?$"))]
    pub expect_status: Option<String>,
    /// Value of the `Host` header, e.g. `app.example.com`. Defaults to `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1))]
    pub host_header: Option<String>,
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
    /// Per-node VRRP state; each node writes its own entry (server-side apply, keyed by name).
    /// In an instance shared by more than 8 VirtualIPs, healthy backups list themselves on the
    /// instance's first VirtualIP by name only; masters, faults and refusals show on each.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    // nullable: when the last node drops its entry, server-side apply (1.20) leaves null.
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"], "nullable" = true))]
    pub nodes: Vec<NodeStatus>,
    /// `Ready`, `Conflict`, `Degraded`.
    #[serde(
        default,
        deserialize_with = "null_as_empty",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"], "nullable" = true))]
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
    /// What this node forwards for the VirtualIP's `spec.services`, or why it does not
    /// (e.g. `ipvs: 2 services programmed`, `ipvs: not forwarding: IPVS is not available`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<String>,
    /// Why this node does not run the VirtualIP (state `Fault`): its interface or address is
    /// missing, or it refuses it, e.g. an address wider than the interface's subnet. Kept in
    /// the node's own entry: a condition holds one message, and nodes with different faults
    /// would overwrite each other's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<String>,
}

/// A list the API server may hand back as `null` (server-side apply leaves null when the last
/// owner drops its items).
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
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
fn default_scheduler() -> String {
    "rr".to_string()
}
fn default_weight() -> i64 {
    1
}
fn default_base() -> i64 {
    100
}
fn default_penalty() -> i64 {
    50
}
fn default_check_interval() -> String {
    "2s".to_string()
}
fn default_check_timeout() -> String {
    "1s".to_string()
}
fn default_threshold() -> i64 {
    2
}
fn default_path() -> String {
    "/".to_string()
}
