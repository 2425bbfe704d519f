//! Validation of `spec.services`: the virtual services IPVS (or a later nftables dataplane)
//! programs for a VirtualIP.

use std::collections::HashSet;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::duration::parse_duration;
use super::field::{Collector, check_object_ref, port};
use super::virtualip::{
    BackendServiceRef, ConnectionLimit, Forwarding, ServiceProtocol, StaticEndpoint, TunnelKind,
    VirtualService,
};

/// Schedulers of the Linux IPVS implementation (`ip_vs_<name>` modules).
pub const SCHEDULERS: &[&str] = &[
    "rr", "wrr", "lc", "wlc", "lblc", "lblcr", "dh", "sh", "sed", "nq", "fo", "ovf", "mh", "twos",
];

/// Longest persistence IPVS accepts is far beyond this; a day is what anyone means.
const MAX_PERSISTENCE: Duration = Duration::from_secs(86_400);
/// Backends' weight limit, as ipvsadm enforces it.
const MAX_WEIGHT: i64 = 65_535;

/// What a virtual service matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ServiceMatch {
    Port {
        protocol: ServiceProtocol,
        port: u16,
    },
    Fwmark(u32),
}

/// A validated entry of `spec.services`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidService {
    /// Position in `spec.services`, for messages.
    pub index: usize,
    pub matches: ServiceMatch,
    pub scheduler: String,
    /// IPVS scheduler flags 1-3 (`sh-fallback`/`mh-fallback`, `sh-port`/`mh-port`).
    pub scheduler_flags: [bool; 3],
    pub forwarding: Forwarding,
    pub source_nat: bool,
    /// Persistence timeout in whole seconds.
    pub persistence: Option<u32>,
    /// Encapsulation, with `tunnel` forwarding.
    pub tunnel: Option<Encapsulation>,
    /// (upper, lower) connection thresholds per backend; 0 means none.
    pub connection_limit: (u32, u32),
    pub backends: ValidBackends,
}

/// How `tunnel` forwarding encapsulates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Encapsulation {
    pub kind: TunnelKind,
    /// GUE's UDP port (0 otherwise).
    pub port: u16,
    pub checksum: bool,
    pub remote_checksum: bool,
}

/// Where a service's traffic goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValidBackends {
    /// (address, port — 0: the packet's own port, weight)
    Static(Vec<(IpAddr, u16, u32)>),
    Service(BackendServiceRef),
}

impl ServiceProtocol {
    pub fn name(self) -> &'static str {
        match self {
            ServiceProtocol::TCP => "TCP",
            ServiceProtocol::UDP => "UDP",
            ServiceProtocol::SCTP => "SCTP",
        }
    }
}

pub(super) fn validate_services(
    services: &[VirtualService],
    addresses: &[IpNet],
    errors: &mut Collector,
) -> Vec<ValidService> {
    let mut seen = HashSet::new();
    services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| validate_service(i, s, addresses, &mut seen, errors))
        .collect()
}

/// Entry `index` of `spec.services`, whose match must not be in `seen` yet; `None` without a
/// valid match.
fn validate_service(
    index: usize,
    s: &VirtualService,
    addresses: &[IpNet],
    seen: &mut HashSet<ServiceMatch>,
    errors: &mut Collector,
) -> Option<ValidService> {
    let at = format!("spec.services[{index}]");
    let field = |f: &str| format!("{at}.{f}");
    let matches = validate_match(&at, s, errors);
    if let Some(m) = matches
        && !seen.insert(m)
    {
        let what = match m {
            ServiceMatch::Port { protocol, port } => format!("{} port {port}", protocol.name()),
            ServiceMatch::Fwmark(mark) => format!("fwmark {mark}"),
        };
        errors.push(field("port"), format!("{what} is listed twice"));
    }
    let scheduler_flags = validate_scheduler(&at, s, errors);
    let persistence = s
        .persistence
        .as_deref()
        .and_then(|text| validate_persistence(field("persistence"), text, errors));
    let tunnel = validate_tunnel(&at, s, errors);
    let connection_limit = s.connection_limit.as_ref().map_or((0, 0), |limit| {
        validate_connection_limit(&at, limit, errors)
    });
    let service_port = match matches {
        Some(ServiceMatch::Port { port, .. }) => port,
        _ => 0,
    };
    let backends = validate_backends(index, s, service_port, addresses, errors);
    Some(ValidService {
        index,
        matches: matches?,
        scheduler: s.scheduler.clone(),
        scheduler_flags,
        forwarding: s.forwarding,
        source_nat: s.source_nat,
        persistence,
        tunnel,
        connection_limit,
        backends,
    })
}

/// Exactly one of `port` and `fwmark`, of service `at`.
fn validate_match(at: &str, s: &VirtualService, errors: &mut Collector) -> Option<ServiceMatch> {
    match (s.port, s.fwmark) {
        (Some(p), None) => port(format!("{at}.port"), p, errors).map(|port| ServiceMatch::Port {
            protocol: s.protocol,
            port,
        }),
        (None, Some(m)) => match u32::try_from(m) {
            Ok(mark) if mark >= 1 => Some(ServiceMatch::Fwmark(mark)),
            _ => {
                errors.push(
                    format!("{at}.fwmark"),
                    format!("must be between 1 and 4294967295, got {m}"),
                );
                None
            }
        },
        _ => {
            errors.push(at, "set exactly one of port, fwmark");
            None
        }
    }
}

/// `scheduler` and `schedulerFlags` of service `at`: the flags as IPVS numbers them.
fn validate_scheduler(at: &str, s: &VirtualService, errors: &mut Collector) -> [bool; 3] {
    if !SCHEDULERS.contains(&s.scheduler.as_str()) {
        errors.push(
            format!("{at}.scheduler"),
            format!(
                "{:?} is not an IPVS scheduler (one of {})",
                s.scheduler,
                SCHEDULERS.join(", ")
            ),
        );
    }
    let mut scheduler_flags = [false; 3];
    for (j, flag) in s.scheduler_flags.iter().enumerate() {
        let field = format!("{at}.schedulerFlags[{j}]");
        let (scheduler, bit) = match flag.split_once('-') {
            Some((sched, "fallback")) => (sched, 0),
            Some((sched, "port")) => (sched, 1),
            _ => (flag.as_str(), usize::MAX),
        };
        if bit == usize::MAX || !matches!(scheduler, "sh" | "mh") {
            errors.push(
                field,
                format!(
                    "{flag:?} is not a scheduler flag (sh-fallback, sh-port, mh-fallback, mh-port)"
                ),
            );
        } else if scheduler != s.scheduler {
            errors.push(
                field,
                format!("{flag:?} needs scheduler {scheduler}, not {}", s.scheduler),
            );
        } else {
            scheduler_flags[bit] = true;
        }
    }
    scheduler_flags
}

/// Persistence in whole seconds.
fn validate_persistence(field: String, text: &str, errors: &mut Collector) -> Option<u32> {
    match parse_duration(text) {
        Ok(d) if d >= Duration::from_secs(1) && d <= MAX_PERSISTENCE => {
            // IPVS counts whole seconds; round up so `1.5s` never means less.
            Some(d.as_secs() as u32 + u32::from(d.subsec_nanos() > 0))
        }
        Ok(_) => {
            errors.push(field, format!("{text} is out of range (1s to 1440m)"));
            None
        }
        Err(e) => {
            errors.push(field, e.to_string());
            None
        }
    }
}

/// `tunnel` of service `at`: only with tunnel forwarding, which defaults to IP-in-IP.
fn validate_tunnel(at: &str, s: &VirtualService, errors: &mut Collector) -> Option<Encapsulation> {
    let field = |f: &str| format!("{at}.{f}");
    let t = match (&s.tunnel, s.forwarding) {
        (None, Forwarding::Tunnel) => return Some(Encapsulation::default()),
        (None, _) => return None,
        (Some(_), f) if f != Forwarding::Tunnel => {
            errors.push(field("tunnel"), "only with forwarding: tunnel");
            return None;
        }
        (Some(t), _) => t,
    };
    let port = match (t.kind, t.port) {
        (TunnelKind::Gue, Some(p)) => port(field("tunnel.port"), p, errors).unwrap_or(0),
        (TunnelKind::Gue, None) => {
            errors.push(field("tunnel.port"), "gue needs the backends' UDP port");
            0
        }
        (_, Some(_)) => {
            errors.push(field("tunnel.port"), "only with type: gue");
            0
        }
        (_, None) => 0,
    };
    if t.checksum && t.kind == TunnelKind::Ipip {
        errors.push(field("tunnel.checksum"), "only with type: gue or gre");
    }
    if t.remote_checksum && t.kind != TunnelKind::Gue {
        errors.push(field("tunnel.remoteChecksum"), "only with type: gue");
    }
    Some(Encapsulation {
        kind: t.kind,
        port,
        checksum: t.checksum,
        remote_checksum: t.remote_checksum,
    })
}

/// (upper, lower) connection thresholds of service `at`.
fn validate_connection_limit(
    at: &str,
    limit: &ConnectionLimit,
    errors: &mut Collector,
) -> (u32, u32) {
    let max = match u32::try_from(limit.max) {
        Ok(m) if (1..=i32::MAX as u32).contains(&m) => m,
        _ => {
            errors.push(
                format!("{at}.connectionLimit.max"),
                format!("must be between 1 and 2147483647, got {}", limit.max),
            );
            1
        }
    };
    let resume = match limit.resume_below.map(u32::try_from) {
        None => 0,
        Some(Ok(r)) if r <= max => r,
        Some(_) => {
            errors.push(
                format!("{at}.connectionLimit.resumeBelow"),
                format!(
                    "must be between 0 and max ({max}), got {}",
                    limit.resume_below.unwrap_or_default()
                ),
            );
            0
        }
    };
    (max, resume)
}

/// Exactly one of `endpoints` and `serviceRef` of service `index`.
fn validate_backends(
    index: usize,
    s: &VirtualService,
    service_port: u16,
    addresses: &[IpNet],
    errors: &mut Collector,
) -> ValidBackends {
    match (&s.backends.endpoints[..], &s.backends.service_ref) {
        ([], Some(r)) => {
            let field = format!("spec.services[{index}].backends.serviceRef");
            check_object_ref(&field, &r.namespace, &r.name, errors);
            ValidBackends::Service(r.clone())
        }
        (endpoints, None) if !endpoints.is_empty() => ValidBackends::Static(validate_endpoints(
            index,
            s,
            service_port,
            addresses,
            errors,
        )),
        _ => {
            errors.push(
                format!("spec.services[{index}].backends"),
                "set exactly one of endpoints (a non-empty list), serviceRef",
            );
            ValidBackends::Static(Vec::new())
        }
    }
}

/// The static endpoints of service `index`, whose port is `service_port` (0 for fwmark).
fn validate_endpoints(
    index: usize,
    s: &VirtualService,
    service_port: u16,
    addresses: &[IpNet],
    errors: &mut Collector,
) -> Vec<(IpAddr, u16, u32)> {
    let mut seen = HashSet::new();
    let out: Vec<(IpAddr, u16, u32)> = s
        .backends
        .endpoints
        .iter()
        .enumerate()
        .filter_map(|(j, e)| {
            let at = format!("spec.services[{index}].backends.endpoints[{j}]");
            let endpoint = validate_endpoint(&at, e, s.forwarding, service_port, addresses, errors);
            if let Some((address, port, _)) = endpoint
                && !seen.insert((address, port))
            {
                errors.push(
                    format!("{at}.address"),
                    format!("{address} port {port} is listed twice"),
                );
            }
            endpoint
        })
        .collect();
    if s.forwarding != Forwarding::Tunnel && !out.is_empty() {
        check_endpoint_families(index, &out, addresses, errors);
    }
    out
}

/// One static endpoint at `at`: (address, port, weight); `None` without a usable address
/// and port.
fn validate_endpoint(
    at: &str,
    e: &StaticEndpoint,
    forwarding: Forwarding,
    service_port: u16,
    addresses: &[IpNet],
    errors: &mut Collector,
) -> Option<(IpAddr, u16, u32)> {
    let field = |f: &str| format!("{at}.{f}");
    let address = match e.address.parse::<IpAddr>() {
        Ok(ip) if ip.is_unspecified() || ip.is_multicast() => {
            errors.push(
                field("address"),
                format!("{} is not a unicast address", e.address),
            );
            return None;
        }
        Ok(ip) => ip,
        Err(_) => {
            errors.push(
                field("address"),
                format!("{:?} is not an IP address", e.address),
            );
            return None;
        }
    };
    // Only tunnels carry one family inside another.
    if forwarding != Forwarding::Tunnel
        && !addresses
            .iter()
            .any(|a| a.addr().is_ipv4() == address.is_ipv4())
    {
        errors.push(
            field("address"),
            format!(
                "{address}: no address in spec.addresses has this family (only tunnel forwarding mixes families)"
            ),
        );
    }
    let port = match e.port {
        None => service_port,
        Some(p) => port(field("port"), p, errors)?,
    };
    if forwarding != Forwarding::Masquerade && service_port != 0 && port != service_port {
        errors.push(
            field("port"),
            format!(
                "{port} differs from the service port {service_port}: only masquerade forwarding translates ports"
            ),
        );
    }
    if !(0..=MAX_WEIGHT).contains(&e.weight) {
        errors.push(
            field("weight"),
            format!("must be between 0 and {MAX_WEIGHT}, got {}", e.weight),
        );
    }
    Some((address, port, e.weight.clamp(0, MAX_WEIGHT) as u32))
}

/// Without a tunnel, each family of the virtual addresses needs an endpoint of its own.
fn check_endpoint_families(
    index: usize,
    endpoints: &[(IpAddr, u16, u32)],
    addresses: &[IpNet],
    errors: &mut Collector,
) {
    for family_v4 in [true, false] {
        let has_address = addresses.iter().any(|a| a.addr().is_ipv4() == family_v4);
        let has_backend = endpoints.iter().any(|(a, _, _)| a.is_ipv4() == family_v4);
        if has_address && !has_backend {
            let family = if family_v4 { "IPv4" } else { "IPv6" };
            errors.push(
                format!("spec.services[{index}].backends.endpoints"),
                format!("no {family} endpoint for the {family} virtual addresses"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{Backends, StaticEndpoint, VirtualIPSpec};
    use crate::crd::{ConnectionLimit, TunnelSpec};

    /// The example of the issue: TCP 80, rr, masquerade, one static backend.
    fn contract() -> VirtualIPSpec {
        let mut spec = crate::crd::sample_spec(&["192.0.2.100/24"], 51);
        spec.services = serde_saphyr::from_str(
            "- port: 80\n  protocol: TCP\n  scheduler: rr\n  forwarding: masquerade\n  backends:\n    endpoints:\n      - {address: 10.1.0.1, port: 8080, weight: 1}\n",
        )
        .unwrap();
        spec
    }

    fn errors(spec: &VirtualIPSpec) -> Vec<String> {
        match spec.validate() {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    fn endpoint(address: &str, port: Option<i64>, weight: i64) -> StaticEndpoint {
        StaticEndpoint {
            address: address.into(),
            port,
            weight,
        }
    }

    #[test]
    fn the_contract_is_valid() {
        let valid = contract().validate().unwrap();
        assert_eq!(
            valid.services,
            vec![ValidService {
                index: 0,
                matches: ServiceMatch::Port {
                    protocol: ServiceProtocol::TCP,
                    port: 80
                },
                scheduler: "rr".into(),
                scheduler_flags: [false; 3],
                forwarding: Forwarding::Masquerade,
                source_nat: true,
                persistence: None,
                tunnel: None,
                connection_limit: (0, 0),
                backends: ValidBackends::Static(vec![("10.1.0.1".parse().unwrap(), 8080, 1)]),
            }]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = contract();
        let s = &mut spec.services[0];
        s.scheduler = "fastest".into();
        s.port = Some(70000);
        s.persistence = Some("forever".into());
        s.scheduler_flags = vec!["sh-port".into(), "bogus".into()];
        s.backends.endpoints = vec![
            endpoint("10.1.0.1", Some(0), 1),
            endpoint("10.1.0.2", None, 70000),
            endpoint("not-an-ip", None, 1),
            endpoint("2001:db8::1", None, 1),
        ];
        let got = errors(&spec);
        for want in [
            "spec.services[0].port: must be between 1 and 65535, got 70000",
            "spec.services[0].scheduler: \"fastest\" is not an IPVS scheduler",
            "spec.services[0].schedulerFlags[0]: \"sh-port\" needs scheduler sh, not fastest",
            "spec.services[0].schedulerFlags[1]: \"bogus\" is not a scheduler flag",
            "spec.services[0].persistence: \"forever\" is not a duration",
            "spec.services[0].backends.endpoints[0].port: must be between 1 and 65535, got 0",
            "spec.services[0].backends.endpoints[1].weight: must be between 0 and 65535, got 70000",
            "spec.services[0].backends.endpoints[2].address: \"not-an-ip\" is not an IP address",
            "spec.services[0].backends.endpoints[3].address: 2001:db8::1: no address in spec.addresses has this family",
        ] {
            assert!(
                got.iter().any(|g| g.starts_with(want)),
                "missing {want:?} in {got:#?}"
            );
        }
    }

    #[test]
    fn unknown_forwarding_is_refused_naming_the_field() {
        let text = "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata: {name: web}\nspec:\n  addresses: [192.0.2.100/24]\n  interface: eth0\n  services:\n    - port: 80\n      forwarding: teleport\n      backends: {endpoints: [{address: 10.1.0.1}]}\n";
        let mut out = crate::crd::manifest::Manifests::default();
        crate::crd::manifest::parse_into(std::path::Path::new("web.yaml"), text, &mut out);
        assert!(out.virtual_ips.is_empty());
        let err = out.errors[0].to_string();
        assert!(
            err.contains("spec.services[0].forwarding") && err.contains("teleport"),
            "{err}"
        );
    }

    #[test]
    fn direct_routing_cannot_translate_ports_and_needs_each_family() {
        let mut spec = crate::crd::sample_spec(&["192.0.2.100/24", "2001:db8::100/64"], 51);
        spec.services = vec![VirtualService {
            port: Some(80),
            protocol: ServiceProtocol::TCP,
            fwmark: None,
            scheduler: "wlc".into(),
            scheduler_flags: Vec::new(),
            forwarding: Forwarding::Direct,
            source_nat: true,
            persistence: Some("1.5s".into()),
            tunnel: None,
            connection_limit: None,
            backends: Backends {
                endpoints: vec![endpoint("10.1.0.1", Some(8080), 1)],
                service_ref: None,
            },
        }];
        let got = errors(&spec);
        assert!(got.iter().any(|g| g.starts_with(
            "spec.services[0].backends.endpoints[0].port: 8080 differs from the service port 80"
        )));
        assert!(got.iter().any(|g| g
            == "spec.services[0].backends.endpoints: no IPv6 endpoint for the IPv6 virtual addresses"));

        spec.services[0].backends.endpoints = vec![
            endpoint("10.1.0.1", None, 1),
            endpoint("2001:db8::5", None, 0),
        ];
        let valid = spec.validate().unwrap();
        assert_eq!(valid.services[0].persistence, Some(2), "rounded up");
    }

    #[test]
    fn exactly_one_match_and_one_backend_source() {
        let mut spec = contract();
        spec.services[0].fwmark = Some(7);
        spec.services[0].backends.endpoints.clear();
        let got = errors(&spec);
        assert!(got.contains(&"spec.services[0]: set exactly one of port, fwmark".to_string()));
        assert!(got.contains(
            &"spec.services[0].backends: set exactly one of endpoints (a non-empty list), serviceRef"
                .to_string()
        ));

        let mut spec = contract();
        spec.services.push(spec.services[0].clone());
        assert_eq!(
            errors(&spec),
            vec!["spec.services[1].port: TCP port 80 is listed twice".to_string()]
        );
    }

    #[test]
    fn tunnels_and_connection_limits_are_checked() {
        let mut spec = contract();
        let s = &mut spec.services[0];
        s.tunnel = Some(TunnelSpec {
            kind: TunnelKind::Gre,
            port: Some(6080),
            checksum: true,
            remote_checksum: true,
        });
        s.connection_limit = Some(ConnectionLimit {
            max: 100,
            resume_below: Some(200),
        });
        let got = errors(&spec);
        assert_eq!(
            got,
            [
                "spec.services[0].tunnel: only with forwarding: tunnel",
                "spec.services[0].connectionLimit.resumeBelow: must be between 0 and max (100), got 200",
            ]
        );
        let s = &mut spec.services[0];
        s.forwarding = Forwarding::Tunnel;
        s.backends.endpoints[0].port = None;
        s.connection_limit = Some(ConnectionLimit {
            max: 100,
            resume_below: None,
        });
        assert_eq!(
            errors(&spec),
            [
                "spec.services[0].tunnel.port: only with type: gue",
                "spec.services[0].tunnel.remoteChecksum: only with type: gue",
            ]
        );
        let t = spec.services[0].tunnel.as_mut().unwrap();
        t.kind = TunnelKind::Gue;
        let valid = spec.validate().unwrap();
        assert_eq!(
            valid.services[0].tunnel,
            Some(Encapsulation {
                kind: TunnelKind::Gue,
                port: 6080,
                checksum: true,
                remote_checksum: true
            })
        );
        assert_eq!(valid.services[0].connection_limit, (100, 0));
    }
}
