//! Semantic validation of a `VirtualIP` spec: everything the schema cannot say, with messages
//! that name the field. The checks and the services have modules of their own.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::check::{ValidCheck, validate_checks};
use super::duration::parse_duration;
use super::field::{Collector, ValidationErrors, check_object_ref, check_weight};
use super::services::{ValidService, validate_services};
use super::virtualip::{
    Ipv4Checksum, LocalEndpoints, NodeHealthWeights, PreferredNode, ServiceRef, UnicastPeers,
    VirtualIPSpec,
};
use crate::vocab::{ChecksumMode, Family, NON_OWNER_PRIORITIES, VRIDS, Version};

/// A spec that passed validation, in the engine's types.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    pub addresses: Vec<IpNet>,
    pub interface: String,
    /// `None`: chosen by the planner from the name.
    pub vrid: Option<u8>,
    pub version: Version,
    pub advert_interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
    pub unicast_peers: Vec<IpAddr>,
    /// `unicastPeers: auto`: the eligible nodes' InternalIP addresses.
    pub unicast_auto: bool,
    pub checksum: ChecksumMode,
    pub virtual_mac: bool,
    /// `spec.allowWidePrefix`.
    pub allow_wide_prefix: bool,
    pub node_selector: Option<LabelSelector>,
    pub base_priority: i64,
    /// (node name, weight)
    pub preferred_nodes: Vec<(String, i64)>,
    pub node_health: NodeHealthWeights,
    /// The Service whose local ready endpoints count, and the penalty without any.
    pub local_endpoints: Option<(ServiceRef, i64)>,
    pub checks: Vec<ValidCheck>,
    pub services: Vec<ValidService>,
}

const MAX_PREEMPT_DELAY: Duration = Duration::from_secs(3600);

impl VirtualIPSpec {
    /// Checks the whole spec and reports every problem at once, in the order of the fields.
    pub fn validate(&self) -> Result<ValidSpec, ValidationErrors> {
        let mut errors = Collector::default();
        let addresses = validate_addresses(&self.addresses, &mut errors);
        check_interface(&self.interface, &mut errors);
        let vrid = validate_vrid(self.virtual_router_id, &mut errors);
        let version = validate_version(self.vrrp.version, &addresses, &mut errors);
        let advert_interval =
            validate_advert_interval(&self.vrrp.advertisement_interval, version, &mut errors);
        let preempt_delay = validate_preempt_delay(&self.vrrp.preempt_delay, &mut errors);
        let (unicast_peers, unicast_auto) =
            validate_unicast_peers(&self.vrrp.unicast_peers, &addresses, &mut errors);
        check_base_priority(self.priority.base, &mut errors);
        let preferred_nodes = validate_preferred_nodes(&self.priority.preferred_nodes, &mut errors);
        if let Some(selector) = &self.node_selector {
            validate_selector(selector, &mut errors);
        }
        check_node_health(&self.priority.node_health, &mut errors);
        let local_endpoints = self
            .priority
            .local_endpoints
            .as_ref()
            .map(|l| validate_local_endpoints(l, &mut errors));
        let checks = validate_checks(&self.priority.checks, &mut errors);
        let services = validate_services(&self.services, &addresses, &mut errors);

        errors.finish(ValidSpec {
            addresses,
            interface: self.interface.clone(),
            vrid,
            version,
            advert_interval,
            preempt: self.vrrp.preempt,
            preempt_delay,
            unicast_peers,
            unicast_auto,
            checksum: match self.vrrp.ipv4_checksum {
                Ipv4Checksum::PseudoHeader => ChecksumMode::PseudoHeader,
                Ipv4Checksum::MessageOnly => ChecksumMode::MessageOnly,
            },
            virtual_mac: self.vrrp.virtual_mac,
            allow_wide_prefix: self.allow_wide_prefix,
            node_selector: self.node_selector.clone(),
            base_priority: self.priority.base,
            preferred_nodes,
            node_health: self.priority.node_health.clone(),
            local_endpoints,
            checks,
            services,
        })
    }
}

fn check_interface(interface: &str, errors: &mut Collector) {
    if interface.is_empty()
        || interface.len() > 15
        || interface
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
    {
        errors.push(
            "spec.interface",
            format!(
                "{interface:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
            ),
        );
    }
}

fn validate_vrid(vrid: Option<i64>, errors: &mut Collector) -> Option<u8> {
    let vrid = vrid?;
    match u8::try_from(vrid) {
        Ok(v) if VRIDS.contains(&v) => Some(v),
        _ => {
            errors.push(
                "spec.virtualRouterId",
                format!(
                    "must be between {} and {}, got {vrid}",
                    VRIDS.start(),
                    VRIDS.end()
                ),
            );
            None
        }
    }
}

/// `spec.vrrp.version`, which must carry every address.
fn validate_version(version: i64, addresses: &[IpNet], errors: &mut Collector) -> Version {
    let version = match version {
        2 => Version::V2,
        3 => Version::V3,
        other => {
            errors.push("spec.vrrp.version", format!("must be 2 or 3, got {other}"));
            Version::V3
        }
    };
    if let Some(i) = addresses
        .iter()
        .position(|a| !version.carries(Family::of(&a.addr())))
    {
        errors.push(
            "spec.vrrp.version",
            format!(
                "VRRP version 2 carries IPv4 only, but spec.addresses[{i}] is IPv6: use version 3"
            ),
        );
    }
    version
}

fn validate_advert_interval(text: &str, version: Version, errors: &mut Collector) -> Duration {
    let field = "spec.vrrp.advertisementInterval";
    match parse_duration(text) {
        Ok(d) => {
            if let Err(e) = version.check_interval(d) {
                errors.push(field, format!("{text} is {e}"));
            }
            d
        }
        Err(e) => {
            errors.push(field, e.to_string());
            Duration::from_secs(1)
        }
    }
}

fn validate_preempt_delay(text: &str, errors: &mut Collector) -> Duration {
    match parse_duration(text) {
        Ok(d) if d <= MAX_PREEMPT_DELAY => d,
        Ok(_) => {
            errors.push("spec.vrrp.preemptDelay", "must be at most 1h (60m)");
            Duration::ZERO
        }
        Err(e) => {
            errors.push("spec.vrrp.preemptDelay", e.to_string());
            Duration::ZERO
        }
    }
}

/// The listed peers, each of a family of the addresses and listed once; and whether the
/// peers are `auto`.
fn validate_unicast_peers(
    peers: &UnicastPeers,
    addresses: &[IpNet],
    errors: &mut Collector,
) -> (Vec<IpAddr>, bool) {
    let listed = match peers {
        UnicastPeers::Auto => return (Vec::new(), true),
        UnicastPeers::List(l) => l,
    };
    let mut unicast_peers = Vec::with_capacity(listed.len());
    for (i, peer) in listed.iter().enumerate() {
        let field = format!("spec.vrrp.unicastPeers[{i}]");
        match peer.parse::<IpAddr>() {
            Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                errors.push(field, format!("{peer} is not a unicast peer address"))
            }
            Ok(ip) if !addresses.iter().any(|a| a.addr().is_ipv4() == ip.is_ipv4()) => errors.push(
                field,
                format!("{peer}: no address in spec.addresses has this family"),
            ),
            Ok(ip) if unicast_peers.contains(&ip) => {
                errors.push(field, format!("{peer} is listed twice"))
            }
            Ok(ip) => unicast_peers.push(ip),
            Err(_) => errors.push(field, format!("{peer:?} is not an IP address")),
        }
    }
    (unicast_peers, false)
}

fn check_base_priority(base: i64, errors: &mut Collector) {
    let (min, max) = (
        i64::from(*NON_OWNER_PRIORITIES.start()),
        i64::from(*NON_OWNER_PRIORITIES.end()),
    );
    if !(min..=max).contains(&base) {
        errors.push(
            "spec.priority.base",
            format!("must be between {min} and {max}, got {base}"),
        );
    }
}

/// (node name, weight) of each entry; a weight can move a priority across the whole range.
fn validate_preferred_nodes(
    preferred: &[PreferredNode],
    errors: &mut Collector,
) -> Vec<(String, i64)> {
    let max = i64::from(*NON_OWNER_PRIORITIES.end());
    let mut seen = HashSet::new();
    for (i, p) in preferred.iter().enumerate() {
        let field = |f: &str| format!("spec.priority.preferredNodes[{i}].{f}");
        if p.node_name.is_empty() {
            errors.push(field("nodeName"), "must not be empty");
        } else if !seen.insert(p.node_name.as_str()) {
            errors.push(
                field("nodeName"),
                format!("{:?} is listed twice", p.node_name),
            );
        }
        if !(-max..=max).contains(&p.weight) {
            errors.push(
                field("weight"),
                format!("must be between -{max} and {max}, got {}", p.weight),
            );
        }
    }
    preferred
        .iter()
        .map(|p| (p.node_name.clone(), p.weight))
        .collect()
}

fn check_node_health(h: &NodeHealthWeights, errors: &mut Collector) {
    for (field, value) in [
        ("notReady", h.not_ready),
        ("networkUnavailable", h.network_unavailable),
        ("unschedulable", h.unschedulable),
        ("carrierDown", h.carrier_down),
    ] {
        check_weight(&format!("spec.priority.nodeHealth.{field}"), value, errors);
    }
}

fn validate_local_endpoints(l: &LocalEndpoints, errors: &mut Collector) -> (ServiceRef, i64) {
    check_weight("spec.priority.localEndpoints.weight", l.weight, errors);
    check_object_ref(
        "spec.priority.localEndpoints.service",
        &l.service.namespace,
        &l.service.name,
        errors,
    );
    (l.service.clone(), l.weight)
}

/// `spec.addresses`: at least one, each usable and listed once.
fn validate_addresses(raw: &[String], errors: &mut Collector) -> Vec<IpNet> {
    if raw.is_empty() {
        errors.push("spec.addresses", "must list at least one address");
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let message = match parse_virtual_address(text) {
            Ok(net) => match out.iter().position(|o| o.addr() == net.addr()) {
                Some(j) => format!("{} is already listed as spec.addresses[{j}]", net.addr()),
                None => {
                    out.push(net);
                    continue;
                }
            },
            Err(message) => message,
        };
        errors.push(format!("spec.addresses[{i}]"), message);
    }
    out
}

/// An address with its prefix that a node can hold as a host address. A bare address means a
/// host route: /32 or /128.
fn parse_virtual_address(text: &str) -> Result<IpNet, String> {
    let net = text
        .parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{text:?} is not an address with prefix, e.g. 192.0.2.100/24"))?;
    let ip = net.addr();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || is_broadcast(&ip) {
        return Err(format!("{ip} cannot be a virtual address"));
    }
    let host_prefix = if ip.is_ipv4() { 32 } else { 128 };
    if net.prefix_len() < host_prefix - 1 && ip == net.network() {
        return Err(format!(
            "{text} is the network address of its prefix, not a host address"
        ));
    }
    if let IpNet::V4(v4) = net
        && net.prefix_len() < 31
        && v4.addr() == v4.broadcast()
    {
        return Err(format!("{text} is the broadcast address of its prefix"));
    }
    Ok(net)
}

fn validate_selector(selector: &LabelSelector, errors: &mut Collector) {
    for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
        let field = format!("spec.nodeSelector.matchExpressions[{i}]");
        let values = expr.values.as_deref().unwrap_or_default();
        match expr.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => errors.push(
                format!("{field}.values"),
                format!("operator {} needs at least one value", expr.operator),
            ),
            "Exists" | "DoesNotExist" if !values.is_empty() => errors.push(
                format!("{field}.values"),
                format!("operator {} takes no values", expr.operator),
            ),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => errors.push(
                format!("{field}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            ),
        }
        if expr.key.is_empty() {
            errors.push(format!("{field}.key"), "must not be empty");
        }
    }
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contract() -> VirtualIPSpec {
        crate::crd::sample_spec(&["192.0.2.100/24"], 51)
    }

    fn fields(spec: &VirtualIPSpec) -> Vec<String> {
        spec.validate()
            .expect_err("spec should be refused")
            .0
            .into_iter()
            .map(|e| e.field)
            .collect()
    }

    #[test]
    fn the_contract_is_valid() {
        let v = contract().validate().unwrap();
        assert_eq!(v.vrid, Some(51));
        assert_eq!(v.version, Version::V3);
        assert_eq!(v.advert_interval, Duration::from_millis(100));
        assert_eq!(
            v.addresses,
            vec!["192.0.2.100/24".parse::<IpNet>().unwrap()]
        );
        assert!(v.preempt);
        assert_eq!(v.checksum, ChecksumMode::PseudoHeader);
    }

    #[test]
    fn version_2_with_one_second_and_unicast_peers_is_valid() {
        let mut s = contract();
        s.vrrp.version = 2;
        s.vrrp.advertisement_interval = "1s".into();
        s.vrrp.unicast_peers = UnicastPeers::List(vec!["192.0.2.12".into()]);
        let v = s.validate().unwrap();
        assert_eq!(v.version, Version::V2);
        assert_eq!(
            v.unicast_peers,
            vec!["192.0.2.12".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut s = contract();
        s.addresses = vec!["192.0.2.300/24".into()];
        assert_eq!(fields(&s), ["spec.addresses[0]"]);

        let mut s = contract();
        s.virtual_router_id = Some(0);
        assert_eq!(fields(&s), ["spec.virtualRouterId"]);
        s.virtual_router_id = Some(256);
        assert_eq!(fields(&s), ["spec.virtualRouterId"]);

        let mut s = contract();
        s.vrrp.version = 2;
        s.vrrp.advertisement_interval = "1s".into();
        s.addresses.push("2001:db8::1/64".into());
        let errs = s.validate().unwrap_err();
        assert_eq!(errs.0[0].field, "spec.vrrp.version");
        assert!(
            errs.0[0].message.contains("spec.addresses[1] is IPv6"),
            "{errs}"
        );

        let mut s = contract();
        s.vrrp.advertisement_interval = "5ms".into();
        assert_eq!(fields(&s), ["spec.vrrp.advertisementInterval"]);
        s.vrrp.advertisement_interval = "105ms".into();
        assert_eq!(fields(&s), ["spec.vrrp.advertisementInterval"]);
        s.vrrp.advertisement_interval = "41s".into();
        assert_eq!(fields(&s), ["spec.vrrp.advertisementInterval"]);
        s.vrrp.advertisement_interval = "fast".into();
        assert_eq!(fields(&s), ["spec.vrrp.advertisementInterval"]);

        let mut s = contract();
        s.vrrp.version = 2;
        s.vrrp.advertisement_interval = "100ms".into();
        assert_eq!(fields(&s), ["spec.vrrp.advertisementInterval"]);

        let mut s = contract();
        s.vrrp.unicast_peers = UnicastPeers::List(vec!["2001:db8::2".into(), "nope".into()]);
        assert_eq!(
            fields(&s),
            ["spec.vrrp.unicastPeers[0]", "spec.vrrp.unicastPeers[1]"]
        );

        let mut s = contract();
        s.priority.base = 255;
        s.priority.preferred_nodes[0].weight = 300;
        assert_eq!(
            fields(&s),
            [
                "spec.priority.base",
                "spec.priority.preferredNodes[0].weight"
            ]
        );
    }

    #[test]
    fn the_readme_example_is_valid() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## The VirtualIP resource").unwrap()..];
        let start = section.find("```yaml\n").unwrap() + "```yaml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let mut out = crate::crd::manifest::Manifests::default();
        crate::crd::manifest::parse_into(std::path::Path::new("README.md"), example, &mut out);
        assert!(out.errors.is_empty(), "{:?}", out.errors);
        let valid = out.virtual_ips[0].spec.validate().unwrap();
        assert_eq!(valid.checks.len(), 1);
        assert_eq!(valid.services.len(), 1);
    }

    #[test]
    fn addresses_must_be_usable_host_addresses() {
        for bad in [
            "192.0.2.0/24",
            "192.0.2.255/24",
            "224.0.0.5/32",
            "0.0.0.0/0",
            "127.0.0.2/8",
            "2001:db8::/64",
            "ff02::1/128",
        ] {
            let mut s = contract();
            s.addresses = vec![bad.into()];
            assert_eq!(fields(&s), ["spec.addresses[0]"], "{bad} accepted");
        }
        let mut s = contract();
        s.addresses = vec!["192.0.2.100/24".into(), "192.0.2.100/32".into()];
        assert_eq!(fields(&s), ["spec.addresses[1]"]);
        s.addresses = vec![];
        assert_eq!(fields(&s), ["spec.addresses"]);

        let mut s = contract();
        s.addresses = vec![
            "192.0.2.7".into(),
            "198.51.100.1/31".into(),
            "2001:db8::5".into(),
        ];
        let v = s.validate().unwrap();
        assert_eq!(v.addresses[0].prefix_len(), 32);
        assert_eq!(v.addresses[2].prefix_len(), 128);
    }
}
