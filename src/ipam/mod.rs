//! Address allocation for Services of `type: LoadBalancer`: pure, deterministic, whole state.
//!
//! [`reconcile`] takes every pool, every Service, the namespaces' labels and the addresses of
//! VirtualIPs, and decides for every Service ferrovip serves (or that still carries our
//! allocation record) its record, its ingress and what changed, and for every pool its status.
//! The Service controller (the leader) writes the decisions; nothing is kept in memory.

mod addrs;
mod pools;
mod request;
mod selector;
pub use selector::matches as selector_matches;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;

use crate::crd::service_lb::ANNOTATION_POOL;
use crate::crd::{LoadBalancerPool, LoadBalancerPoolStatus, ServiceRef};
use addrs::Family;
use pools::Pool;
use request::{Policy, Svc, Unserved};

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
    /// All Services (shared with the store they come from); ipam filters.
    pub services: &'a [Arc<Service>],
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

impl std::fmt::Display for FailureReason {
    /// The variant's name (`PoolExhausted`), as in Event messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// The desired status of one pool.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PoolDecision {
    /// Conditions' `lastTransitionTime` is left empty: the writer keeps the old time when
    /// type/status/reason/message are unchanged.
    pub status: LoadBalancerPoolStatus,
}

/// Decide every allocation from the whole state (pure, deterministic).
///
/// Order of work: pools are analysed oldest first (overlaps belong to the older pool). Then
/// Services in precedence order (a valid record first, then an ingress address to adopt,
/// then the rest; within each, creationTimestamp, then namespace/name): first every Service
/// keeps what its record validly holds (so no Service ever gets an address another Service
/// validly holds), then Services without a record adopt their ingress address, then missing
/// addresses are allocated: Services asking for specific addresses first, then by age
/// (requested addresses are never handed to another Service automatically). The result is a
/// fixed point: reconciling the written decisions decides the same again.
pub fn reconcile(inputs: &Inputs) -> Outcome {
    let pools = pools::analyze(inputs.pools, inputs.reserved);
    let svcs: Vec<Svc> = inputs
        .services
        .iter()
        .filter_map(|s| request::read(s, &inputs.config))
        .collect();
    let mut a = Allocator::new(inputs, &pools, &svcs);
    a.run();
    a.outcome()
}

/// The failure to report among several (one per family, in the Service's family order): the
/// first that more addresses would not cure, else the first. What other Services hold decides
/// which families are exhausted, so that order keeps the report stable between reconciles.
fn worst(mut failed: Vec<(Family, Failure)>) -> (Family, Failure) {
    let i = failed
        .iter()
        .position(|(_, e)| e.reason != FailureReason::PoolExhausted)
        .unwrap_or(0);
    failed.swap_remove(i)
}

/// An address a Service holds during the reconcile.
#[derive(Clone, Debug)]
struct Held {
    ip: IpAddr,
    /// Index into the pools.
    pool: usize,
    /// Why it should give way to what the Service asks for now (request or pool changed);
    /// kept unless the replacement is found.
    replace: Option<String>,
    /// Set aside for a RequireDualStack Service that waits for another family's pool: no
    /// other Service takes it in this pass (so the next pass decides the same), but it is not
    /// the Service's yet (not in its record).
    tentative: bool,
}

struct Allocator<'i, 'p> {
    inputs: &'i Inputs<'i>,
    pools: &'p [Pool<'p>],
    by_name: BTreeMap<&'p str, usize>,
    svcs: &'p [Svc<'p>],
    /// Per Service, per family.
    held: Vec<[Option<Held>; 2]>,
    released: Vec<Vec<(IpAddr, String)>>,
    failure: Vec<Option<Failure>>,
    /// Address → the Services holding it, in the order they got it.
    holders: BTreeMap<IpAddr, Vec<usize>>,
    /// Addresses held by Services.
    used: [BTreeSet<u128>; 2],
    /// Addresses requested by Services that do not hold them yet.
    soft: [BTreeSet<u128>; 2],
    /// `used` ∪ `soft`: what a free allocation skips.
    blocked: [BTreeSet<u128>; 2],
    /// (namespace, sharing key) → addresses held under it.
    shared: BTreeMap<(String, String), BTreeSet<IpAddr>>,
    /// (pool, family) → every address of the pool below it is blocked.
    cursors: BTreeMap<(usize, Family), u128>,
}

impl<'i, 'p> Allocator<'i, 'p> {
    fn new(inputs: &'i Inputs<'i>, pools: &'p [Pool<'p>], svcs: &'p [Svc<'p>]) -> Self {
        Allocator {
            inputs,
            pools,
            by_name: pools
                .iter()
                .enumerate()
                .map(|(i, p)| (p.name.as_str(), i))
                .collect(),
            svcs,
            held: vec![[None, None]; svcs.len()],
            released: vec![Vec::new(); svcs.len()],
            failure: vec![None; svcs.len()],
            holders: BTreeMap::new(),
            used: Default::default(),
            soft: Default::default(),
            blocked: Default::default(),
            shared: BTreeMap::new(),
            cursors: BTreeMap::new(),
        }
    }

    /// The pool a recorded address belongs to: its recorded pool while that pool still
    /// contains it, else the pool that hands it out now (or any containing it).
    fn home(&self, ip: IpAddr, recorded: &str) -> Option<usize> {
        if let Some(&p) = self.by_name.get(recorded)
            && self.pools[p].holds(ip)
        {
            return Some(p);
        }
        self.pools
            .iter()
            .position(|p| p.hands_out(ip))
            .or_else(|| self.pools.iter().position(|p| p.holds(ip)))
    }

    /// 0: holds a valid record; 1: no record, an ingress address to adopt; 2: the rest.
    fn group(&self, s: &Svc) -> u8 {
        if s.old_record()
            .iter()
            .any(|(ip, p)| self.home(*ip, p).is_some())
        {
            0
        } else if !matches!(s.record, Some(Ok(_)))
            && s.ingress
                .iter()
                .any(|ip| self.pools.iter().any(|p| p.hands_out(*ip)))
        {
            1
        } else {
            2
        }
    }

    fn run(&mut self) {
        let mut order: Vec<(u8, usize)> = (0..self.svcs.len())
            .filter(|&i| self.svcs[i].unserved.is_none())
            .map(|i| (self.group(&self.svcs[i]), i))
            .collect();
        order.sort_by(|(ga, a), (gb, b)| {
            let (a, b) = (&self.svcs[*a], &self.svcs[*b]);
            (ga, a.created, &a.key).cmp(&(gb, b.created, &b.key))
        });
        for &(_, i) in &order {
            self.keep_record(i);
        }
        for &(g, i) in &order {
            if g == 1 {
                self.adopt(i);
            }
        }
        for &(_, i) in &order {
            let s = &self.svcs[i];
            if let Ok(r) = &s.requested {
                for ip in r.iter().flatten() {
                    let f = Family::of(*ip);
                    if self.held[i][f.index()].as_ref().map(|h| h.ip) != Some(*ip) {
                        let n = addrs::number(*ip).1;
                        self.soft[f.index()].insert(n);
                        self.blocked[f.index()].insert(n);
                    }
                }
            }
        }
        // Then what is missing, by age; first the Services whose record no longer matches
        // their request (what they give back is free for the others in this same pass), then
        // Services asking for addresses, so that a sharing Service finds the address its
        // partner asked for. (Not "holders first": a Service that got one family in this pass
        // would then come earlier in the next, and the next pass could decide otherwise.)
        let mut fill: Vec<usize> = order.iter().map(|&(_, i)| i).collect();
        fill.sort_by(|&a, &b| {
            let rank = |i: usize| {
                let s = &self.svcs[i];
                let replacing = self.held[i].iter().flatten().any(|h| h.replace.is_some());
                let asks = matches!(&s.requested, Ok(r) if r.iter().any(Option::is_some));
                (!replacing, !asks, s.created, &s.key)
            };
            rank(a).cmp(&rank(b))
        });
        for i in fill {
            self.fill(i);
        }
    }

    /// Phase 1: keep what the record validly holds, release the rest.
    fn keep_record(&mut self, i: usize) {
        let s = &self.svcs[i];
        for (ip, recorded) in s.old_record() {
            let f = Family::of(ip);
            if !s.families.contains(&f) {
                self.released[i].push((
                    ip,
                    format!("{f} is no longer among the Service's ipFamilies/ipFamilyPolicy"),
                ));
                continue;
            }
            // A VirtualIP created later on this address takes it (the agents hold it for the
            // VirtualIP): the Service moves, with an Event saying why, rather than showing an
            // address that nobody holds for it.
            if let Some(what) = self.inputs.reserved.get(&ip) {
                self.released[i].push((ip, format!("{ip} is now the address of {what}")));
                continue;
            }
            let Some(p) = self.home(ip, &recorded) else {
                let why = if self.by_name.contains_key(recorded.as_str()) {
                    format!("{ip} is no longer in pool {recorded:?} nor in any other pool")
                } else {
                    format!("pool {recorded:?} no longer exists and no other pool contains {ip}")
                };
                self.released[i].push((ip, why));
                continue;
            };
            if let Err(f) = self.may_join(i, ip) {
                self.released[i].push((
                    ip,
                    format!("a Service earlier in precedence keeps {ip}: {}", f.message),
                ));
                continue;
            }
            let replace = self.mismatch(s, ip, p);
            self.hold(i, ip, p, replace);
        }
    }

    /// Why a held address no longer matches the request (None: it does).
    fn mismatch(&self, s: &Svc, ip: IpAddr, pool: usize) -> Option<String> {
        if let Ok(r) = &s.requested
            && let Some(want) = r[Family::of(ip).index()]
            && want != ip
        {
            return Some(format!("replaced by the requested address {want}"));
        }
        match &s.pool {
            Some(name) if *name != self.pools[pool].name => Some(format!(
                "replaced by an address of pool {name:?} (annotation {ANNOTATION_POOL})"
            )),
            _ => None,
        }
    }

    /// Phase 1b: a Service without a record adopts its ingress addresses that a pool hands
    /// out (an upgrade, or the record deleted by hand), when nothing contradicts.
    fn adopt(&mut self, i: usize) {
        let s = &self.svcs[i];
        for &ip in &s.ingress {
            let f = Family::of(ip);
            if !s.families.contains(&f) || self.held[i][f.index()].is_some() {
                continue;
            }
            let Some(p) = self.pools.iter().position(|p| p.hands_out(ip)) else {
                continue;
            };
            if self.mismatch(s, ip, p).is_some() || self.may_join(i, ip).is_err() {
                continue;
            }
            self.hold(i, ip, p, None);
        }
    }

    /// Whether Service `i` may hold `ip` next to its current holders.
    fn may_join(&self, i: usize, ip: IpAddr) -> Result<(), Failure> {
        // Oldest holder first: the report does not depend on who got the address first.
        let mut holders: Vec<usize> = self
            .holders
            .get(&ip)
            .into_iter()
            .flatten()
            .copied()
            .collect();
        holders.sort_by_key(|&h| (self.svcs[h].created, &self.svcs[h].key));
        for h in holders {
            if h != i {
                self.svcs[i].may_share_with(&self.svcs[h]).map_err(|e| {
                    if self.held[h][Family::of(ip).index()]
                        .as_ref()
                        .is_some_and(|x| x.tentative)
                    {
                        Failure {
                            reason: e.reason,
                            message: format!(
                                "set aside for Service {} (RequireDualStack, waiting for its \
                                 other family)",
                                self.svcs[h].display()
                            ),
                        }
                    } else {
                        e
                    }
                })?;
            }
        }
        Ok(())
    }

    fn hold(&mut self, i: usize, ip: IpAddr, pool: usize, replace: Option<String>) {
        let (f, n) = addrs::number(ip);
        self.held[i][f.index()] = Some(Held {
            ip,
            pool,
            replace,
            tentative: false,
        });
        self.holders.entry(ip).or_default().push(i);
        self.used[f.index()].insert(n);
        self.blocked[f.index()].insert(n);
        let s = &self.svcs[i];
        if let Some(key) = &s.sharing_key {
            self.shared
                .entry((s.key.namespace.clone(), key.clone()))
                .or_default()
                .insert(ip);
        }
    }

    /// Service `i` lets go of `ip` (family `f`).
    fn unhold(&mut self, i: usize, f: Family) {
        let Some(held) = self.held[i][f.index()].take() else {
            return;
        };
        let ip = held.ip;
        let n = addrs::number(ip).1;
        let holders = self.holders.entry(ip).or_default();
        holders.retain(|&h| h != i);
        if holders.is_empty() {
            self.holders.remove(&ip);
            self.used[f.index()].remove(&n);
            if !self.soft[f.index()].contains(&n) {
                self.blocked[f.index()].remove(&n);
            }
            if let Some(c) = self.cursors.get_mut(&(held.pool, f)) {
                *c = (*c).min(n);
            }
        }
        let s = &self.svcs[i];
        if let Some(key) = &s.sharing_key {
            let k = (s.key.namespace.clone(), key.clone());
            let still = self.holders.get(&ip).is_some_and(|hs| {
                hs.iter()
                    .any(|&h| self.svcs[h].sharing_key.as_ref() == Some(key))
            });
            if !still && let Some(set) = self.shared.get_mut(&k) {
                set.remove(&ip);
            }
        }
    }

    /// Phase 2: allocate what Service `i` lacks (or should replace).
    fn fill(&mut self, i: usize) {
        let s = &self.svcs[i];
        if let Err(f) = &s.requested {
            self.failure[i] = Some(f.clone());
            return;
        }
        let needed: Vec<Family> = s
            .families
            .iter()
            .copied()
            .filter(|f| {
                self.held[i][f.index()]
                    .as_ref()
                    .is_none_or(|h| h.replace.is_some())
            })
            .collect();
        if needed.is_empty() {
            return;
        }
        let mut got: Vec<(Family, IpAddr, usize)> = Vec::new();
        let mut failed: Vec<(Family, Failure)> = Vec::new();
        for &f in &needed {
            match self.allocate(i, f) {
                Ok((ip, p)) => got.push((f, ip, p)),
                Err(e) => failed.push((f, e)),
            }
        }
        let dual = s.families.len() > 1;
        let label = |f: Family, e: Failure| {
            if dual {
                Failure {
                    reason: e.reason,
                    message: format!("{f}: {}", e.message),
                }
            } else {
                e
            }
        };
        match s.policy {
            Policy::RequireDual if !failed.is_empty() => {
                // All or nothing: what the Service already holds stays. When only exhausted
                // pools stand in the way, what it got is set aside for it (tentative); else
                // it goes back.
                let exhausted = failed
                    .iter()
                    .all(|(_, e)| e.reason == FailureReason::PoolExhausted);
                for (f, ip, p) in got {
                    if exhausted && self.held[i][f.index()].is_none() {
                        self.hold(i, ip, p, None);
                        if let Some(h) = self.held[i][f.index()].as_mut() {
                            h.tentative = true;
                        }
                    } else {
                        let c = self.cursors.entry((p, f)).or_insert(0);
                        *c = (*c).min(addrs::number(ip).1);
                    }
                }
                self.failure[i] = Some(if exhausted {
                    // Which families run out depends on who took what, so name every pool
                    // the Service waits for: the report stays the same until it changes.
                    let pools: Vec<String> = needed
                        .iter()
                        .map(|&f| {
                            let asked = s.requested.as_ref().ok().and_then(|r| r[f.index()]);
                            if let Some(ip) = asked {
                                return format!("{f} {ip}");
                            }
                            let names: Vec<String> = self
                                .candidates(i, f)
                                .unwrap_or_default()
                                .iter()
                                .map(|&p| format!("{:?}", self.pools[p].name))
                                .collect();
                            format!("{f} in {}", names.join(", "))
                        })
                        .collect();
                    Failure {
                        reason: FailureReason::PoolExhausted,
                        message: format!(
                            "RequireDualStack: no free addresses for every family ({})",
                            pools.join("; ")
                        ),
                    }
                } else {
                    let (f, e) = worst(failed);
                    label(f, e)
                });
                return;
            }
            Policy::PreferDual => {
                // A family no pool offers this Service is simply left out, as long as the
                // Service has an address.
                let has_some = s
                    .families
                    .iter()
                    .any(|f| self.held[i][f.index()].is_some() || got.iter().any(|g| g.0 == *f));
                if has_some {
                    failed.retain(|(_, e)| {
                        !matches!(
                            e.reason,
                            FailureReason::FamilyUnavailable | FailureReason::NoPoolMatches
                        )
                    });
                }
            }
            _ => {}
        }
        if !failed.is_empty() {
            let (f, e) = worst(failed);
            self.failure[i] = Some(label(f, e));
        }
        for (f, ip, p) in got {
            if let Some(old) = &self.held[i][f.index()] {
                let reason = old.replace.clone().unwrap_or_default();
                let old_ip = old.ip;
                self.unhold(i, f);
                self.released[i].push((old_ip, reason));
            }
            self.hold(i, ip, p, None);
        }
    }

    /// One address of family `f` for Service `i`: the requested one, one shared under its
    /// sharing key, or the lowest free address of the first pool (by priority) that serves it.
    fn allocate(&mut self, i: usize, f: Family) -> Result<(IpAddr, usize), Failure> {
        let s = &self.svcs[i];
        let requested = s.requested.as_ref().ok().and_then(|r| r[f.index()]);
        if let Some(ip) = requested {
            return self.requested(i, ip);
        }
        if let Some(key) = &s.sharing_key
            && let Some(ips) = self.shared.get(&(s.key.namespace.clone(), key.clone()))
        {
            for &ip in ips {
                if Family::of(ip) != f || self.may_join(i, ip).is_err() {
                    continue;
                }
                let Some(p) = self.holders[&ip]
                    .first()
                    .and_then(|&h| self.held[h][f.index()].as_ref())
                    .map(|h| h.pool)
                else {
                    continue;
                };
                let pool = &self.pools[p];
                let named = s.pool.as_ref().map(|n| *n == pool.name);
                // autoAssign false: only for Services that name the pool.
                if named.unwrap_or(pool.spec.auto_assign) && self.admits(p, i).is_ok() {
                    return Ok((ip, p));
                }
            }
        }
        let candidates = self.candidates(i, f)?;
        for &p in &candidates {
            let from = self.cursors.get(&(p, f)).copied().unwrap_or(0);
            if let Some(n) = self.pools[p].lowest_free(f, from, &self.blocked[f.index()]) {
                self.cursors.insert((p, f), n.saturating_add(1));
                return Ok((f.ip(n), p));
            }
            // Everything from `from` on is taken.
            self.cursors.insert((p, f), u128::MAX);
        }
        let names: Vec<String> = candidates
            .iter()
            .map(|&p| format!("{:?}", self.pools[p].name))
            .collect();
        Err(Failure {
            reason: FailureReason::PoolExhausted,
            message: format!(
                "no free {f} address in pool{} {}",
                if names.len() > 1 { "s" } else { "" },
                names.join(", ")
            ),
        })
    }

    /// The pools that may give Service `i` a new address of family `f`, in the order tried
    /// (priority, then age), or why there is none.
    fn candidates(&self, i: usize, f: Family) -> Result<Vec<usize>, Failure> {
        let s = &self.svcs[i];
        let unavailable = |message: String| Failure {
            reason: FailureReason::FamilyUnavailable,
            message,
        };
        let no_match = |message: String| Failure {
            reason: if s.policy == Policy::RequireDual {
                FailureReason::FamilyUnavailable
            } else {
                FailureReason::NoPoolMatches
            },
            message,
        };
        if let Some(name) = &s.pool {
            let Some(&p) = self.by_name.get(name.as_str()) else {
                return Err(no_match(format!(
                    "pool {name:?} (annotation {ANNOTATION_POOL}) does not exist"
                )));
            };
            let pool = &self.pools[p];
            if !pool.valid() {
                return Err(no_match(format!(
                    "pool {name:?} (annotation {ANNOTATION_POOL}) is Invalid: {}",
                    pool.problems[0]
                )));
            }
            if !pool.has_family[f.index()] {
                return Err(unavailable(format!(
                    "pool {name:?} (annotation {ANNOTATION_POOL}) has no {f} addresses"
                )));
            }
            if let Err(why) = self.admits(p, i) {
                return Err(no_match(format!(
                    "pool {name:?} (annotation {ANNOTATION_POOL}) does not serve this Service: {why}"
                )));
            }
            return Ok(vec![p]);
        }
        let mut out = Vec::new();
        let mut why_not = Vec::new();
        for (p, pool) in self.pools.iter().enumerate() {
            if !pool.has_family[f.index()] {
                continue;
            }
            if !pool.valid() {
                why_not.push(format!("{:?} (Invalid)", pool.name));
                continue;
            }
            if !pool.has_free_space(f) {
                why_not.push(format!(
                    "{:?} (every address overlaps an older pool or a VirtualIP)",
                    pool.name
                ));
                continue;
            }
            if !pool.spec.auto_assign {
                why_not.push(format!(
                    "{:?} (autoAssign false: name it in {ANNOTATION_POOL})",
                    pool.name
                ));
                continue;
            }
            match self.admits(p, i) {
                Ok(()) => out.push(p),
                Err(why) => why_not.push(format!("{:?} ({why})", pool.name)),
            }
        }
        if out.is_empty() {
            return Err(if why_not.is_empty() {
                unavailable(format!("no pool hands out {f} addresses"))
            } else {
                no_match(format!(
                    "no pool serves this Service with {f} addresses: {}",
                    why_not.join(", ")
                ))
            });
        }
        out.sort_by_key(|&p| (self.pools[p].spec.priority, p));
        Ok(out)
    }

    /// Whether pool `p` serves Service `i` (namespaces, namespaceSelector, serviceSelector).
    fn admits(&self, p: usize, i: usize) -> Result<(), String> {
        let spec = self.pools[p].spec;
        let s = &self.svcs[i];
        let ns = &s.key.namespace;
        if !spec.namespaces.is_empty() && !spec.namespaces.contains(ns) {
            return Err(format!("namespace {ns} is not in spec.namespaces"));
        }
        if let Some(sel) = &spec.namespace_selector {
            let empty = BTreeMap::new();
            let labels = self.inputs.namespaces.get(ns).unwrap_or(&empty);
            if !selector::matches(sel, labels) {
                return Err(format!(
                    "namespace {ns} does not match spec.namespaceSelector"
                ));
            }
        }
        if let Some(sel) = &spec.service_selector
            && !selector::matches(sel, s.labels)
        {
            return Err("the Service's labels do not match spec.serviceSelector".to_string());
        }
        Ok(())
    }

    /// The requested address `ip` for Service `i`.
    fn requested(&self, i: usize, ip: IpAddr) -> Result<(IpAddr, usize), Failure> {
        let s = &self.svcs[i];
        if let Some(what) = self.inputs.reserved.get(&ip) {
            return Err(Failure {
                reason: FailureReason::RequestedAddressTaken,
                message: format!("requested address {ip} is the address of {what}"),
            });
        }
        let Some(p) = self.pools.iter().position(|p| p.hands_out(ip)) else {
            let message = match self.pools.iter().find(|p| p.holds(ip)) {
                Some(pool) if !pool.valid() => format!(
                    "requested address {ip} is in pool {:?}, which is Invalid",
                    pool.name
                ),
                Some(pool) => format!(
                    "requested address {ip} is in pool {:?} but also in an older pool, which \
                     does not hand it out either",
                    pool.name
                ),
                None => format!("requested address {ip} is in no pool"),
            };
            return Err(Failure {
                reason: FailureReason::OutsideEveryPool,
                message,
            });
        };
        let pool = &self.pools[p];
        if let Some(name) = &s.pool
            && *name != pool.name
        {
            return Err(Failure {
                reason: FailureReason::ConflictingRequest,
                message: format!(
                    "requested address {ip} is in pool {:?}, not in pool {name:?} (annotation \
                     {ANNOTATION_POOL})",
                    pool.name
                ),
            });
        }
        if let Err(why) = self.admits(p, i) {
            return Err(Failure {
                reason: FailureReason::NoPoolMatches,
                message: format!(
                    "requested address {ip}: pool {:?} does not serve this Service: {why}",
                    pool.name
                ),
            });
        }
        self.may_join(i, ip).map_err(|e| Failure {
            reason: e.reason,
            message: format!("requested address {ip}: {}", e.message),
        })?;
        Ok((ip, p))
    }

    /// The failure of Service `i`, a requested address taken named after its holders at the
    /// end of the pass (who got it first in the pass may differ from one pass to the next).
    fn final_failure(&self, i: usize) -> Option<Failure> {
        let mut failure = self.failure[i].clone()?;
        let Ok(requested) = &self.svcs[i].requested else {
            return Some(failure);
        };
        for ip in requested.iter().flatten() {
            let prefix = format!("requested address {ip}: ");
            let Some(at) = failure.message.find(&prefix) else {
                continue;
            };
            if let Err(e) = self.may_join(i, *ip) {
                failure.message = format!("{}{prefix}{}", &failure.message[..at], e.message);
                failure.reason = e.reason;
            }
        }
        Some(failure)
    }

    fn outcome(&self) -> Outcome {
        let mut out = Outcome::default();
        for (i, s) in self.svcs.iter().enumerate() {
            let old = s.old_record();
            let decision = match &s.unserved {
                Some(why) => {
                    let (ingress, reason) = match why {
                        Unserved::NotLoadBalancer(r) => (Some(Vec::new()), r),
                        Unserved::OtherClass(r) => (None, r),
                    };
                    ServiceDecision {
                        record: BTreeMap::new(),
                        ingress,
                        allocated: Vec::new(),
                        released: old.keys().map(|ip| (*ip, reason.clone())).collect(),
                        failure: None,
                    }
                }
                None => {
                    let held: Vec<&Held> = s
                        .families
                        .iter()
                        .filter_map(|f| self.held[i][f.index()].as_ref())
                        .filter(|h| !h.tentative)
                        .collect();
                    let record: BTreeMap<IpAddr, String> = held
                        .iter()
                        .map(|h| (h.ip, self.pools[h.pool].name.clone()))
                        .collect();
                    let ingress = held
                        .iter()
                        .map(|h| Ingress {
                            ip: h.ip,
                            ip_mode: (self.inputs.config.ip_mode
                                && self.pools[h.pool].forwards_with_ipvs())
                            .then_some("Proxy"),
                        })
                        .collect();
                    ServiceDecision {
                        allocated: record
                            .iter()
                            .filter(|(ip, _)| !old.contains_key(ip))
                            .map(|(ip, p)| (*ip, p.clone()))
                            .collect(),
                        released: self.released[i]
                            .iter()
                            .filter(|(ip, _)| !record.contains_key(ip))
                            .cloned()
                            .collect(),
                        record,
                        ingress: Some(ingress),
                        failure: self.final_failure(i),
                    }
                }
            };
            out.services.insert(s.key.clone(), decision);
        }
        // Distinct addresses per (pool, family), from whoever holds them.
        let mut in_use = vec![[0u128; 2]; self.pools.len()];
        for (ip, holders) in &self.holders {
            let f = Family::of(*ip);
            let pools: BTreeSet<usize> = holders
                .iter()
                .filter_map(|&h| self.held[h][f.index()].as_ref())
                .filter(|x| !x.tentative)
                .map(|x| x.pool)
                .collect();
            for p in pools {
                in_use[p][f.index()] += 1;
            }
        }
        for (p, pool) in self.pools.iter().enumerate() {
            out.pools.insert(
                pool.name.clone(),
                PoolDecision {
                    status: pool.status(&self.used, in_use[p]),
                },
            );
        }
        out
    }
}
