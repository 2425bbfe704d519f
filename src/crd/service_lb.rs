//! The Service side of the contract: which Services ferrovip serves, what users write on them
//! (annotations), and what ferrovip writes back.
//!
//! The allocation's source of truth is the Service object itself: the leader writes the
//! allocation record ([`ANNOTATION_ALLOCATED`], addresses with the pool each came from) and
//! then `status.loadBalancer.ingress`. A new leader reads both, keeps every valid allocation,
//! and never keeps state only in memory. Agents plan from the record (so a node holds the
//! address even while the status write is pending, and keeps it through an API outage).

use std::collections::BTreeMap;
use std::net::IpAddr;

use thiserror::Error;

/// `spec.loadBalancerClass` of the Services ferrovip serves. Class-less `type: LoadBalancer`
/// Services are served too, unless the agent runs with `--ignore-classless-services`.
pub const LOAD_BALANCER_CLASS: &str = "ferrovip.io/vrrp";

/// User: the addresses wanted, comma separated, at most one per family
/// (`192.0.2.10,2001:db8::10`). Replaces the deprecated `spec.loadBalancerIP`; both given and
/// different is an error on the Service.
pub const ANNOTATION_LOAD_BALANCER_IPS: &str = "ferrovip.io/load-balancer-ips";

/// User: the pool to take addresses from (one name).
pub const ANNOTATION_POOL: &str = "ferrovip.io/pool";

/// User: Services with the same key share an address when their (protocol, port) sets are
/// disjoint and their `externalTrafficPolicy` agrees (`Local`: same selector too).
pub const ANNOTATION_SHARING_KEY: &str = "ferrovip.io/sharing-key";

/// ferrovip (the leader): the allocation record, `<address>@<pool>` per family, comma
/// separated, e.g. `192.0.2.10@web,2001:db8::10@web-v6`.
pub const ANNOTATION_ALLOCATED: &str = "ferrovip.io/allocated";

/// ferrovip (the master of each address): which node holds each address,
/// `<address>=<node>` comma separated, so `kubectl get svc -o yaml` shows it.
pub const ANNOTATION_MASTER: &str = "ferrovip.io/master";

/// Field manager of the leader's writes on Services and pools.
pub const CONTROLLER_MANAGER: &str = "ferrovip-controller";

/// Whether ferrovip serves this Service: `type: LoadBalancer` with our class, or with no class
/// when `serve_classless` (the default; `--ignore-classless-services` turns it off). Services
/// of any other class are never touched, not even their status.
pub fn served(svc: &k8s_openapi::api::core::v1::Service, serve_classless: bool) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return false;
    }
    match spec.load_balancer_class.as_deref() {
        Some(class) => class == LOAD_BALANCER_CLASS,
        None => serve_classless,
    }
}

/// The allocation record on a Service (`None`: no annotation), or why it cannot be read.
pub fn allocation_record(
    svc: &k8s_openapi::api::core::v1::Service,
) -> Option<Result<BTreeMap<IpAddr, String>, RecordError>> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_ALLOCATED)
        .map(|v| parse_allocated(v))
}

/// The entries of `status.loadBalancer.ingress` (none when there is no such list).
pub fn ingress_entries(
    svc: &k8s_openapi::api::core::v1::Service,
) -> impl Iterator<Item = &k8s_openapi::api::core::v1::LoadBalancerIngress> + '_ {
    svc.status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .into_iter()
        .flatten()
}

/// The addresses `status.loadBalancer.ingress` lists (entries without a readable `ip` left
/// out).
pub fn ingress_ips(svc: &k8s_openapi::api::core::v1::Service) -> impl Iterator<Item = IpAddr> + '_ {
    ingress_entries(svc).filter_map(|i| i.ip.as_deref()?.parse().ok())
}

/// A malformed `ferrovip.io/allocated` record (a user edited it): the record is ignored as a
/// whole and the leader rewrites it.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("annotation {ANNOTATION_ALLOCATED}: entry {0:?} is not <address>@<pool>")]
    Entry(String),
    #[error("annotation {ANNOTATION_ALLOCATED}: two addresses of one family")]
    TwoOfOneFamily,
}

/// The parsed allocation record: address → pool name, at most one address per family.
pub fn parse_allocated(value: &str) -> Result<BTreeMap<IpAddr, String>, RecordError> {
    let mut out = BTreeMap::new();
    for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (addr, pool) = entry
            .split_once('@')
            .ok_or_else(|| RecordError::Entry(entry.to_string()))?;
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| RecordError::Entry(entry.to_string()))?;
        let pool = pool.trim();
        if pool.is_empty() {
            return Err(RecordError::Entry(entry.to_string()));
        }
        if out.keys().any(|a: &IpAddr| a.is_ipv4() == addr.is_ipv4()) {
            return Err(RecordError::TwoOfOneFamily);
        }
        out.insert(addr, pool.to_string());
    }
    Ok(out)
}

/// A Service's [`ANNOTATION_MASTER`] value, as written.
pub fn master_value(svc: &k8s_openapi::api::core::v1::Service) -> Option<&str> {
    svc.metadata
        .annotations
        .as_ref()?
        .get(ANNOTATION_MASTER)
        .map(String::as_str)
}

/// The entries of a [`ANNOTATION_MASTER`] value (`<address>=<node>,...`). Unreadable entries
/// are skipped: the masters write the value, and one edited by hand is rewritten, not refused.
pub fn parse_master(value: &str) -> BTreeMap<IpAddr, String> {
    let mut entries = BTreeMap::new();
    for entry in value.split(',') {
        if let Some((addr, holder)) = entry.trim().split_once('=')
            && let Ok(addr) = addr.trim().parse::<IpAddr>()
        {
            entries.insert(addr, holder.trim().to_string());
        }
    }
    entries
}

/// A [`ANNOTATION_MASTER`] value: IPv4 first, then IPv6.
pub fn format_master(entries: &BTreeMap<IpAddr, String>) -> String {
    entries
        .iter()
        .map(|(a, n)| format!("{a}={n}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The record's text: IPv4 first, then IPv6.
pub fn format_allocated(record: &BTreeMap<IpAddr, String>) -> String {
    record
        .iter()
        .map(|(a, p)| format!("{a}@{p}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(type_: &str, class: Option<&str>) -> k8s_openapi::api::core::v1::Service {
        k8s_openapi::api::core::v1::Service {
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                type_: Some(type_.into()),
                load_balancer_class: class.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn serves_our_class_and_classless_unless_told_not_to() {
        assert!(served(
            &service("LoadBalancer", Some(LOAD_BALANCER_CLASS)),
            false
        ));
        assert!(served(&service("LoadBalancer", None), true));
        assert!(!served(&service("LoadBalancer", None), false));
        assert!(!served(
            &service("LoadBalancer", Some("metallb.io/metallb")),
            true
        ));
        assert!(!served(
            &service("ClusterIP", Some(LOAD_BALANCER_CLASS)),
            true
        ));
    }

    #[test]
    fn record_round_trips_and_rejects_garbage() {
        let r = parse_allocated("2001:db8::10@v6, 192.0.2.10@web").unwrap();
        assert_eq!(format_allocated(&r), "192.0.2.10@web,2001:db8::10@v6");
        assert!(parse_allocated("").unwrap().is_empty());
        assert_eq!(
            parse_allocated("192.0.2.10"),
            Err(RecordError::Entry("192.0.2.10".into()))
        );
        assert_eq!(
            parse_allocated("192.0.2.10@"),
            Err(RecordError::Entry("192.0.2.10@".into()))
        );
        assert_eq!(
            parse_allocated("192.0.2.10@a,192.0.2.11@a"),
            Err(RecordError::TwoOfOneFamily)
        );
    }
}
