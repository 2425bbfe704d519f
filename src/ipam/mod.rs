//! Address allocation for Services of `type: LoadBalancer`: pure, deterministic, whole state.
//!
//! [`reconcile`] takes every pool, every Service, the namespaces' labels and the addresses of
//! VirtualIPs, and decides for every Service ferrovip serves (or that still carries our
//! allocation record) its record, its ingress and what changed, and for every pool its status.
//! The Service controller (the leader) writes the decisions; nothing is kept in memory.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::Service;

use crate::crd::{LoadBalancerPool, LoadBalancerPoolStatus, ServiceRef};

/// How the controller runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Serve `type: LoadBalancer` Services without `spec.loadBalancerClass`.
    pub serve_classless: bool,
    /// The API server has `status.loadBalancer.ingress[].ipMode` (1.30+).
    pub ip_mode: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            serve_classless: true,
            ip_mode: false,
        }
    }
}

/// Everything an allocation depends on.
#[derive(Clone, Copy, Debug)]
pub struct Inputs<'a> {
    /// All pools.
    pub pools: &'a [LoadBalancerPool],
    /// All Services; ipam filters.
    pub services: &'a [Service],
    /// Namespace → its labels.
    pub namespaces: &'a BTreeMap<String, BTreeMap<String, String>>,
    /// Addresses of VirtualIPs → `"VirtualIP <name>"`: never handed out.
    pub reserved: &'a BTreeMap<IpAddr, String>,
    pub config: Config,
}

/// What the leader should make true.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Outcome {
    /// Every Service ferrovip serves or that still carries our record; others absent
    /// (never touched).
    pub services: BTreeMap<ServiceRef, ServiceDecision>,
    /// Every pool, by name.
    pub pools: BTreeMap<String, PoolDecision>,
}

/// The desired state of one Service and what changed (for Events).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceDecision {
    /// Desired `ferrovip.io/allocated` (empty: remove the annotation).
    pub record: BTreeMap<IpAddr, String>,
    /// Desired `status.loadBalancer.ingress`, in order (empty: clear). `None` = leave status
    /// alone (the Service went to another class).
    pub ingress: Option<Vec<Ingress>>,
    /// Addresses new in the record, with their pool → Event `AddressAllocated`.
    pub allocated: Vec<(IpAddr, String)>,
    /// Addresses leaving the record, with why → Event `AddressReleased`.
    pub released: Vec<(IpAddr, String)>,
    /// Why the Service lacks (some of) what it asks for → Event `AllocationFailed`.
    pub failure: Option<Failure>,
}

/// One entry of `status.loadBalancer.ingress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Ingress {
    pub ip: IpAddr,
    /// `Some("Proxy")` for addresses ferrovip forwards itself (pool `forwarding: IPVS`) when
    /// the server has the field; `None`: leave it out.
    pub ip_mode: Option<&'static str>,
}

/// Why a Service did not get (all of) what it asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    pub reason: FailureReason,
    /// Names the pool, address or annotation concerned.
    pub message: String,
}

/// The reasons of [`Failure`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureReason {
    /// Every matching pool is full.
    PoolExhausted,
    /// The requested address is held by another Service (or a VirtualIP).
    RequestedAddressTaken,
    /// The requested address is in no (usable) pool.
    OutsideEveryPool,
    /// No pool may serve this Service (selectors, namespaces, autoAssign, the pool annotation).
    NoPoolMatches,
    /// The annotation and `spec.loadBalancerIP` contradict each other.
    ConflictingRequest,
    /// The sharing key's other Services use the same ports or another traffic policy.
    SharingConflict,
    /// `RequireDualStack` (or a requested family) without a usable pool of that family.
    FamilyUnavailable,
    /// A malformed annotation or field.
    InvalidRequest,
}

impl FailureReason {
    /// The `reason` label of the allocation-failure metric.
    pub fn metric_label(self) -> &'static str {
        match self {
            FailureReason::PoolExhausted => "pool_exhausted",
            FailureReason::RequestedAddressTaken => "requested_address_taken",
            FailureReason::OutsideEveryPool => "outside_every_pool",
            FailureReason::NoPoolMatches => "no_pool_matches",
            FailureReason::ConflictingRequest => "conflicting_request",
            FailureReason::SharingConflict => "sharing_conflict",
            FailureReason::FamilyUnavailable => "family_unavailable",
            FailureReason::InvalidRequest => "invalid_request",
        }
    }

    /// Every reason (metrics export a zero for each).
    pub const ALL: [FailureReason; 8] = [
        FailureReason::PoolExhausted,
        FailureReason::RequestedAddressTaken,
        FailureReason::OutsideEveryPool,
        FailureReason::NoPoolMatches,
        FailureReason::ConflictingRequest,
        FailureReason::SharingConflict,
        FailureReason::FamilyUnavailable,
        FailureReason::InvalidRequest,
    ];
}

/// The desired status of one pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolDecision {
    /// Conditions' `lastTransitionTime` is left empty: the writer keeps the old time when
    /// type/status/reason/message are unchanged.
    pub status: LoadBalancerPoolStatus,
}

/// Decide every allocation from the whole state (pure, deterministic).
pub fn reconcile(inputs: &Inputs) -> Outcome {
    let mut out = Outcome::default();
    for pool in inputs.pools {
        let name = pool.metadata.name.clone().unwrap_or_default();
        out.pools.insert(
            name,
            PoolDecision {
                status: LoadBalancerPoolStatus {
                    observed_generation: pool.metadata.generation,
                    ..Default::default()
                },
            },
        );
    }
    for svc in inputs.services {
        if !crate::crd::service_lb::served(svc, inputs.config.serve_classless) {
            continue;
        }
        let key = ServiceRef {
            namespace: svc.metadata.namespace.clone().unwrap_or_default(),
            name: svc.metadata.name.clone().unwrap_or_default(),
        };
        out.services.insert(key, ServiceDecision::default());
    }
    out
}
