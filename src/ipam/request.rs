//! What a Service asks for: families, requested addresses, pool, sharing; and whether two
//! Services may share an address.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Service, ServiceSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::addrs::Family;
use super::{Config, Failure, FailureReason};
use crate::crd::ServiceRef;
use crate::crd::service_lb::{
    self, ANNOTATION_LOAD_BALANCER_IPS, ANNOTATION_POOL, ANNOTATION_SHARING_KEY, RecordError,
};

/// `spec.ipFamilyPolicy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    Single,
    PreferDual,
    RequireDual,
}

/// Why a served Service no longer is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unserved {
    /// `type` is no longer LoadBalancer: clear the status too.
    NotLoadBalancer(String),
    /// Another class (or class-less, not served): never touch the status.
    OtherClass(String),
}

/// One Service as the allocator reads it.
#[derive(Debug)]
pub struct Svc<'a> {
    pub key: ServiceRef,
    pub labels: &'a BTreeMap<String, String>,
    pub created: Option<&'a Time>,
    /// `None`: served; else why not (the Service only carries our record).
    pub unserved: Option<Unserved>,
    /// The `ferrovip.io/allocated` record as found.
    pub record: Option<Result<BTreeMap<IpAddr, String>, RecordError>>,
    /// `status.loadBalancer.ingress[].ip`.
    pub ingress: Vec<IpAddr>,
    /// The families wanted, the primary one first.
    pub families: Vec<Family>,
    pub policy: Policy,
    /// Requested address per family, or why the request cannot be read.
    pub requested: Result<[Option<IpAddr>; 2], Failure>,
    /// `ferrovip.io/pool`.
    pub pool: Option<String>,
    pub sharing_key: Option<String>,
    /// (protocol, port) of `spec.ports`.
    pub ports: BTreeSet<(String, i32)>,
    /// `externalTrafficPolicy: Local`.
    pub local: bool,
    pub selector: BTreeMap<String, String>,
}

static EMPTY: BTreeMap<String, String> = BTreeMap::new();

/// The Service as the allocator sees it, or `None` when ipam has nothing to do with it (not
/// served and without our record).
pub fn read<'a>(svc: &'a Service, config: &Config) -> Option<Svc<'a>> {
    let annotations = svc.metadata.annotations.as_ref().unwrap_or(&EMPTY);
    let record = service_lb::allocation_record(svc);
    let served = service_lb::served(svc, config.serve_classless);
    if !served && record.is_none() {
        return None;
    }
    static NO_SPEC: std::sync::LazyLock<ServiceSpec> =
        std::sync::LazyLock::new(ServiceSpec::default);
    let spec = svc.spec.as_ref().unwrap_or(&NO_SPEC);
    let unserved = if served {
        None
    } else if spec.type_.as_deref() != Some("LoadBalancer") {
        Some(Unserved::NotLoadBalancer(format!(
            "the Service is no longer of type LoadBalancer (type {})",
            spec.type_.as_deref().unwrap_or("ClusterIP")
        )))
    } else {
        Some(Unserved::OtherClass(match &spec.load_balancer_class {
            Some(class) => format!("the Service's loadBalancerClass is now {class}"),
            None => "class-less Services are not served (--ignore-classless-services)".to_string(),
        }))
    };
    let requested = requested(annotations, spec.load_balancer_ip.as_deref());
    let policy = match spec.ip_family_policy.as_deref() {
        Some("PreferDualStack") => Policy::PreferDual,
        Some("RequireDualStack") => Policy::RequireDual,
        _ => Policy::Single,
    };
    let listed: Vec<Family> = spec
        .ip_families
        .iter()
        .flatten()
        .filter_map(|f| Family::from_k8s_name(f))
        .fold(Vec::new(), |mut v, f| {
            if !v.contains(&f) {
                v.push(f);
            }
            v
        });
    let mut families = if !listed.is_empty() {
        listed.clone()
    } else if policy != Policy::Single {
        vec![Family::V4, Family::V6]
    } else {
        // No ipFamilies (the server always sets them; tests and old objects may not): the
        // family of a requested address, else IPv4.
        match &requested {
            Ok([None, Some(_)]) => vec![Family::V6],
            _ => vec![Family::V4],
        }
    };
    if policy == Policy::Single {
        families.truncate(1);
    }
    let requested = requested.and_then(|r| {
        for f in Family::BOTH {
            if let Some(ip) = r[f.index()]
                && !families.contains(&f)
            {
                return Err(Failure {
                    reason: FailureReason::InvalidRequest,
                    message: format!(
                        "requested address {ip} is {f}, not among the Service's families ({})",
                        families
                            .iter()
                            .map(|f| f.k8s_name())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
        }
        Ok(r)
    });
    let ingress = service_lb::ingress_ips(svc).collect();
    let nonempty = |k: &str| {
        annotations
            .get(k)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    Some(Svc {
        key: ServiceRef {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        },
        labels: svc.metadata.labels.as_ref().unwrap_or(&EMPTY),
        created: svc.metadata.creation_timestamp.as_ref(),
        unserved,
        record,
        ingress,
        families,
        policy,
        requested,
        pool: nonempty(ANNOTATION_POOL),
        sharing_key: nonempty(ANNOTATION_SHARING_KEY),
        ports: spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
            .collect(),
        local: spec.external_traffic_policy.as_deref() == Some("Local"),
        selector: spec.selector.clone().unwrap_or_default(),
    })
}

fn invalid(message: String) -> Failure {
    Failure {
        reason: FailureReason::InvalidRequest,
        message,
    }
}

/// The requested address per family: the annotation, the deprecated `spec.loadBalancerIP`,
/// both only when they agree.
fn requested(
    annotations: &BTreeMap<String, String>,
    load_balancer_ip: Option<&str>,
) -> Result<[Option<IpAddr>; 2], Failure> {
    let mut out = [None, None];
    let annotation = annotations
        .get(ANNOTATION_LOAD_BALANCER_IPS)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty());
    if let Some(value) = annotation {
        for item in value.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let ip: IpAddr = item.parse().map_err(|_| {
                invalid(format!(
                    "annotation {ANNOTATION_LOAD_BALANCER_IPS}: {item:?} is not an IP address"
                ))
            })?;
            let slot = &mut out[Family::of(ip).index()];
            if slot.is_some() {
                return Err(invalid(format!(
                    "annotation {ANNOTATION_LOAD_BALANCER_IPS}: two {} addresses (at most one per family)",
                    Family::of(ip)
                )));
            }
            *slot = Some(ip);
        }
    }
    let Some(lb_ip) = load_balancer_ip.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(out);
    };
    let ip: IpAddr = lb_ip.parse().map_err(|_| {
        invalid(format!(
            "spec.loadBalancerIP: {lb_ip:?} is not an IP address"
        ))
    })?;
    match annotation {
        Some(value) if !out.contains(&Some(ip)) => Err(Failure {
            reason: FailureReason::ConflictingRequest,
            message: format!(
                "spec.loadBalancerIP {ip} contradicts annotation {ANNOTATION_LOAD_BALANCER_IPS} \
                 ({value}): remove one"
            ),
        }),
        Some(_) => Ok(out),
        None => {
            out[Family::of(ip).index()] = Some(ip);
            Ok(out)
        }
    }
}

impl Svc<'_> {
    /// Whether `self` may share an address with `other` (already holding it), or why not:
    /// `SharingConflict` when both have the key, `RequestedAddressTaken` otherwise.
    pub fn may_share_with(&self, other: &Svc) -> Result<(), Failure> {
        let taken = |message: String| Failure {
            reason: FailureReason::RequestedAddressTaken,
            message,
        };
        let clash = |message: String| Failure {
            reason: FailureReason::SharingConflict,
            message,
        };
        let (Some(mine), Some(theirs)) = (&self.sharing_key, &other.sharing_key) else {
            return Err(taken(format!("held by Service {}", other.display())));
        };
        if mine != theirs || self.key.namespace != other.key.namespace {
            return Err(taken(format!(
                "held by Service {} (another sharing key)",
                other.display()
            )));
        }
        if let Some((proto, port)) = self.ports.intersection(&other.ports).next() {
            return Err(clash(format!(
                "sharing key {mine:?}: port {proto}/{port} is also used by Service {}",
                other.display()
            )));
        }
        if self.local != other.local {
            return Err(clash(format!(
                "sharing key {mine:?}: externalTrafficPolicy differs from Service {}",
                other.display()
            )));
        }
        if self.local && self.selector != other.selector {
            return Err(clash(format!(
                "sharing key {mine:?}: externalTrafficPolicy Local needs the same selector as \
                 Service {}",
                other.display()
            )));
        }
        Ok(())
    }

    pub fn display(&self) -> String {
        format!("{}/{}", self.key.namespace, self.key.name)
    }

    /// The record as found, unreadable ones as empty.
    pub fn old_record(&self) -> BTreeMap<IpAddr, String> {
        match &self.record {
            Some(Ok(r)) => r.clone(),
            _ => BTreeMap::new(),
        }
    }
}
