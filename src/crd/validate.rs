//! Semantic validation of a `VirtualIP` spec: everything the schema cannot say, with messages
//! that name the field.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::duration::parse_duration;
use super::services::{ValidService, validate_services};
use super::virtualip::{Ipv4Checksum, NodeHealthWeights, ServiceRef, UnicastPeers, VirtualIPSpec};
use crate::vocab::{ChecksumMode, Version};

/// One problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the field, e.g. `spec.vrrp.advertisementInterval`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// All problems found in one spec (never empty).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ValidationErrors(pub Vec<FieldError>);

impl fmt::Display for ValidationErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

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

/// A validated health check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCheck {
    pub name: String,
    pub kind: CheckKind,
    pub weight: i64,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
}

/// What a check probes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    Tcp {
        host: IpAddr,
        port: u16,
    },
    Http {
        host: IpAddr,
        port: u16,
        path: String,
    },
}

const MAX_PREEMPT_DELAY: Duration = Duration::from_secs(3600);

pub(super) struct Collector(Vec<FieldError>);

impl Collector {
    pub(super) fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
}

impl VirtualIPSpec {
    /// Checks the whole spec and reports every problem at once.
    pub fn validate(&self) -> Result<ValidSpec, ValidationErrors> {
        let mut errors = Collector(Vec::new());

        let addresses = validate_addresses(&self.addresses, &mut errors);

        if self.interface.is_empty()
            || self.interface.len() > 15
            || self
                .interface
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            errors.push(
                "spec.interface",
                format!(
                    "{:?} is not an interface name (1-15 characters, no '/', ':' or spaces)",
                    self.interface
                ),
            );
        }

        let vrid = match self.virtual_router_id.map(u8::try_from) {
            None => None,
            Some(Ok(v)) if v >= 1 => Some(v),
            Some(_) => {
                errors.push(
                    "spec.virtualRouterId",
                    format!(
                        "must be between 1 and 255, got {}",
                        self.virtual_router_id.unwrap_or_default()
                    ),
                );
                None
            }
        };

        let version = match self.vrrp.version {
            2 => Version::V2,
            3 => Version::V3,
            other => {
                errors.push("spec.vrrp.version", format!("must be 2 or 3, got {other}"));
                Version::V3
            }
        };
        if version == Version::V2
            && let Some(i) = addresses.iter().position(|a| a.addr().is_ipv6())
        {
            errors.push(
                "spec.vrrp.version",
                format!(
                    "VRRP version 2 carries IPv4 only, but spec.addresses[{i}] is IPv6: use version 3"
                ),
            );
        }

        let advert_interval = match parse_duration(&self.vrrp.advertisement_interval) {
            Ok(d) => {
                check_interval(version, d, &self.vrrp.advertisement_interval, &mut errors);
                d
            }
            Err(e) => {
                errors.push("spec.vrrp.advertisementInterval", e.to_string());
                Duration::from_secs(1)
            }
        };

        let preempt_delay = match parse_duration(&self.vrrp.preempt_delay) {
            Ok(d) if d <= MAX_PREEMPT_DELAY => d,
            Ok(_) => {
                errors.push("spec.vrrp.preemptDelay", "must be at most 1h (60m)");
                Duration::ZERO
            }
            Err(e) => {
                errors.push("spec.vrrp.preemptDelay", e.to_string());
                Duration::ZERO
            }
        };

        let (listed, unicast_auto) = match &self.vrrp.unicast_peers {
            UnicastPeers::Auto => (&[][..], true),
            UnicastPeers::List(l) => (&l[..], false),
        };
        let mut unicast_peers = Vec::with_capacity(listed.len());
        for (i, peer) in listed.iter().enumerate() {
            let field = format!("spec.vrrp.unicastPeers[{i}]");
            match peer.parse::<IpAddr>() {
                Ok(ip) if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() => {
                    errors.push(field, format!("{peer} is not a unicast peer address"))
                }
                Ok(ip) if !addresses.iter().any(|a| a.addr().is_ipv4() == ip.is_ipv4()) => errors
                    .push(
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

        if !(1..=254).contains(&self.priority.base) {
            errors.push(
                "spec.priority.base",
                format!("must be between 1 and 254, got {}", self.priority.base),
            );
        }
        let mut preferred_nodes = Vec::with_capacity(self.priority.preferred_nodes.len());
        let mut seen = HashSet::new();
        for (i, p) in self.priority.preferred_nodes.iter().enumerate() {
            if p.node_name.is_empty() {
                errors.push(
                    format!("spec.priority.preferredNodes[{i}].nodeName"),
                    "must not be empty",
                );
            } else if !seen.insert(p.node_name.as_str()) {
                errors.push(
                    format!("spec.priority.preferredNodes[{i}].nodeName"),
                    format!("{:?} is listed twice", p.node_name),
                );
            }
            if !(-254..=254).contains(&p.weight) {
                errors.push(
                    format!("spec.priority.preferredNodes[{i}].weight"),
                    format!("must be between -254 and 254, got {}", p.weight),
                );
            }
            preferred_nodes.push((p.node_name.clone(), p.weight));
        }

        if let Some(selector) = &self.node_selector {
            validate_selector(selector, &mut errors);
        }

        let h = &self.priority.node_health;
        for (field, value) in [
            ("notReady", h.not_ready),
            ("networkUnavailable", h.network_unavailable),
            ("unschedulable", h.unschedulable),
            ("carrierDown", h.carrier_down),
        ] {
            check_weight(
                &format!("spec.priority.nodeHealth.{field}"),
                value,
                &mut errors,
            );
        }
        let local_endpoints = self.priority.local_endpoints.as_ref().map(|l| {
            check_weight("spec.priority.localEndpoints.weight", l.weight, &mut errors);
            for (field, value) in [
                ("namespace", &l.service.namespace),
                ("name", &l.service.name),
            ] {
                if !is_dns_label(value) {
                    errors.push(
                        format!("spec.priority.localEndpoints.service.{field}"),
                        format!("{value:?} is not a valid name (lowercase DNS label)"),
                    );
                }
            }
            (l.service.clone(), l.weight)
        });
        let checks = validate_checks(&self.priority.checks, &mut errors);
        let services = validate_services(&self.services, &addresses, &mut errors);

        if !errors.0.is_empty() {
            return Err(ValidationErrors(errors.0));
        }
        Ok(ValidSpec {
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

fn validate_addresses(raw: &[String], errors: &mut Collector) -> Vec<IpNet> {
    if raw.is_empty() {
        errors.push("spec.addresses", "must list at least one address");
    }
    let mut out: Vec<IpNet> = Vec::with_capacity(raw.len());
    for (i, text) in raw.iter().enumerate() {
        let field = format!("spec.addresses[{i}]");
        // A bare address means a host route: /32 or /128.
        let parsed = text
            .parse::<IpNet>()
            .or_else(|_| text.parse::<IpAddr>().map(IpNet::from));
        let net = match parsed {
            Ok(net) => net,
            Err(_) => {
                errors.push(
                    field,
                    format!("{text:?} is not an address with prefix, e.g. 192.0.2.100/24"),
                );
                continue;
            }
        };
        let ip = net.addr();
        if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() || is_broadcast(&ip) {
            errors.push(field, format!("{ip} cannot be a virtual address"));
            continue;
        }
        let host_prefix = if ip.is_ipv4() { 32 } else { 128 };
        if net.prefix_len() < host_prefix - 1 && ip == net.network() {
            errors.push(
                field,
                format!("{text} is the network address of its prefix, not a host address"),
            );
            continue;
        }
        if let IpNet::V4(v4) = net
            && net.prefix_len() < 31
            && v4.addr() == v4.broadcast()
        {
            errors.push(
                field,
                format!("{text} is the broadcast address of its prefix"),
            );
            continue;
        }
        if let Some(j) = out.iter().position(|o| o.addr() == ip) {
            errors.push(
                field,
                format!("{ip} is already listed as spec.addresses[{j}]"),
            );
            continue;
        }
        out.push(net);
    }
    out
}

fn check_weight(field: &str, value: i64, errors: &mut Collector) {
    if !(0..=254).contains(&value) {
        errors.push(field, format!("must be between 0 and 254, got {value}"));
    }
}

pub(super) fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
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

fn validate_checks(checks: &[super::HealthCheck], errors: &mut Collector) -> Vec<ValidCheck> {
    let mut out = Vec::with_capacity(checks.len());
    let mut names = HashSet::new();
    for (i, c) in checks.iter().enumerate() {
        let field = |f: &str| format!("spec.priority.checks[{i}].{f}");
        if !is_dns_label(&c.name) {
            errors.push(
                field("name"),
                format!("{:?} is not a lowercase DNS label", c.name),
            );
        } else if !names.insert(c.name.as_str()) {
            errors.push(field("name"), format!("{:?} is used twice", c.name));
        }
        check_weight(&field("weight"), c.weight, errors);
        let mut duration = |f: &str, text: &str| match parse_duration(text) {
            Ok(d) if d >= Duration::from_millis(10) && d <= Duration::from_secs(3600) => d,
            Ok(_) => {
                errors.push(field(f), format!("{text} is out of range (10ms to 1h)"));
                Duration::from_secs(1)
            }
            Err(e) => {
                errors.push(field(f), e.to_string());
                Duration::from_secs(1)
            }
        };
        let interval = duration("interval", &c.interval);
        let timeout = duration("timeout", &c.timeout);
        if timeout > interval {
            errors.push(
                field("timeout"),
                format!("{} is longer than the interval {}", c.timeout, c.interval),
            );
        }
        let threshold = |f: &str, v: i64, errors: &mut Collector| match u32::try_from(v) {
            Ok(v) if (1..=100).contains(&v) => v,
            _ => {
                errors.push(field(f), format!("must be between 1 and 100, got {v}"));
                1
            }
        };
        let rise = threshold("rise", c.rise, errors);
        let fall = threshold("fall", c.fall, errors);
        let host = |f: &str, h: &Option<String>, errors: &mut Collector| match h {
            None => IpAddr::from([127, 0, 0, 1]),
            Some(h) => h.parse().unwrap_or_else(|_| {
                errors.push(field(f), format!("{h:?} is not an IP address"));
                IpAddr::from([127, 0, 0, 1])
            }),
        };
        let port = |f: &str, p: i64, errors: &mut Collector| match u16::try_from(p) {
            Ok(p) if p >= 1 => p,
            _ => {
                errors.push(field(f), format!("must be between 1 and 65535, got {p}"));
                1
            }
        };
        let kind = match (&c.tcp, &c.http) {
            (Some(t), None) => CheckKind::Tcp {
                host: host("tcp.host", &t.host, errors),
                port: port("tcp.port", t.port, errors),
            },
            (None, Some(h)) => {
                if !h.path.starts_with('/')
                    || h.path
                        .bytes()
                        .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
                {
                    errors.push(
                        field("http.path"),
                        format!("{:?} must start with '/' and contain no spaces", h.path),
                    );
                }
                CheckKind::Http {
                    host: host("http.host", &h.host, errors),
                    port: port("http.port", h.port, errors),
                    path: h.path.clone(),
                }
            }
            _ => {
                errors.push(
                    format!("spec.priority.checks[{i}]"),
                    "set exactly one of tcp, http",
                );
                continue;
            }
        };
        out.push(ValidCheck {
            name: c.name.clone(),
            kind,
            weight: c.weight,
            interval,
            timeout,
            rise,
            fall,
        });
    }
    out
}

fn is_broadcast(ip: &IpAddr) -> bool {
    matches!(ip, IpAddr::V4(v4) if v4.is_broadcast())
}

fn check_interval(version: Version, d: Duration, text: &str, errors: &mut Collector) {
    let field = "spec.vrrp.advertisementInterval";
    match version {
        Version::V3 => {
            if d < Duration::from_millis(10) || d > Duration::from_millis(40_950) {
                errors.push(
                    field,
                    format!("{text} is out of range: VRRPv3 allows 10ms to 40.95s"),
                );
            } else if !d.as_nanos().is_multiple_of(10_000_000) {
                errors.push(
                    field,
                    format!("{text} is not a multiple of 10ms (VRRPv3 counts in centiseconds)"),
                );
            }
        }
        Version::V2 => {
            if d < Duration::from_secs(1) || d > Duration::from_secs(255) {
                errors.push(
                    field,
                    format!("{text} is out of range: VRRPv2 allows 1s to 255s"),
                );
            } else if d.subsec_nanos() != 0 {
                errors.push(field, format!("{text} is not whole seconds (VRRPv2)"));
            }
        }
    }
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
