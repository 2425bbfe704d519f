//! What must change to turn the programmed virtual services into the desired ones. Pure: the
//! IPVS dataplane executes the result.
//!
//! Both sides are sorted maps, so the walk is one merge over them with no lookups and no
//! allocation for services that did not change: a 10,000-service table with one changed
//! backend costs one comparison pass.

use std::cmp::Ordering;
use std::collections::BTreeMap;

use crate::model::service::{
    BackendKey, Encapsulation, Forwarding, ServiceKey, ServiceSet, ServiceSpec,
};

/// A service's settings as the kernel holds them (the part a SET can change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConf {
    pub scheduler: String,
    pub scheduler_flags: [bool; 3],
    /// Persistence timeout in seconds.
    pub persistence: Option<u32>,
}

impl ServiceConf {
    pub fn of(spec: &ServiceSpec) -> ServiceConf {
        ServiceConf {
            scheduler: spec.scheduler.clone(),
            scheduler_flags: spec.scheduler_flags,
            persistence: spec.persistence,
        }
    }

    fn matches(&self, spec: &ServiceSpec) -> bool {
        self.scheduler == spec.scheduler
            && self.scheduler_flags == spec.scheduler_flags
            && self.persistence == spec.persistence
    }
}

/// How the kernel forwards to one destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DestConf {
    /// `None`: a method ferrovip never sets (local node, bypass, an unknown encapsulation).
    pub forwarding: Option<Forwarding>,
    pub weight: u32,
    /// (upper, lower) connection thresholds.
    pub thresholds: (u32, u32),
    /// With tunnel forwarding.
    pub tunnel: Option<Encapsulation>,
}

impl DestConf {
    pub fn of(spec: &ServiceSpec, weight: u32) -> DestConf {
        DestConf {
            forwarding: Some(spec.forwarding),
            weight,
            thresholds: spec.connection_limit,
            // Tunnel destinations always carry an encapsulation (IPIP by default).
            tunnel: (spec.forwarding == Forwarding::Tunnel)
                .then(|| spec.tunnel.unwrap_or_default()),
        }
    }
}

/// One service as programmed in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Programmed {
    /// `None` when not known (after a failed write): it is rewritten on the next apply.
    pub conf: Option<ServiceConf>,
    pub dests: BTreeMap<BackendKey, DestConf>,
}

impl Programmed {
    pub fn of(spec: &ServiceSpec) -> Programmed {
        Programmed {
            conf: Some(ServiceConf::of(spec)),
            dests: spec
                .backends
                .iter()
                .map(|(b, w)| (*b, DestConf::of(spec, *w)))
                .collect(),
        }
    }
}

/// One write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    AddService(ServiceKey),
    EditService(ServiceKey),
    DelService(ServiceKey),
    AddDest(ServiceKey, BackendKey),
    EditDest(ServiceKey, BackendKey),
    DelDest(ServiceKey, BackendKey),
}

impl Change {
    pub fn service(&self) -> ServiceKey {
        match *self {
            Change::AddService(k)
            | Change::EditService(k)
            | Change::DelService(k)
            | Change::AddDest(k, _)
            | Change::EditDest(k, _)
            | Change::DelDest(k, _) => k,
        }
    }
}

/// The writes that turn `programmed` into `desired`, grouped by service and in an order the
/// kernel accepts (a service before its destinations). Services in `blocked` (foreign ones
/// with a desired key) are skipped.
pub fn diff(
    programmed: &BTreeMap<ServiceKey, Programmed>,
    desired: &ServiceSet,
    blocked: impl Fn(&ServiceKey) -> bool,
) -> Vec<Change> {
    let mut out = Vec::new();
    for pair in merge_join(programmed.iter(), desired.iter()) {
        match pair {
            Pair::Left(key) => out.push(Change::DelService(*key)),
            Pair::Right(key, _) if blocked(key) => {}
            Pair::Right(key, spec) => {
                out.push(Change::AddService(*key));
                out.extend(spec.backends.keys().map(|b| Change::AddDest(*key, *b)));
            }
            Pair::Both(key, prog, spec) => diff_service(*key, prog, spec, &mut out),
        }
    }
    out
}

/// Whether a destination is programmed as `wanted` (a service's destination settings, built
/// once per service) with `weight`.
fn dest_matches(conf: &DestConf, wanted: &DestConf, weight: u32) -> bool {
    conf.weight == weight
        && conf.forwarding == wanted.forwarding
        && conf.thresholds == wanted.thresholds
        && conf.tunnel == wanted.tunnel
}

fn diff_service(key: ServiceKey, prog: &Programmed, spec: &ServiceSpec, out: &mut Vec<Change>) {
    let conf_matches = prog.conf.as_ref().is_some_and(|c| c.matches(spec));
    let wanted = DestConf::of(spec, 0);
    // The common case, nothing changed, in one tight pass over both maps.
    if conf_matches
        && prog.dests.len() == spec.backends.len()
        && prog
            .dests
            .iter()
            .zip(&spec.backends)
            .all(|((b, conf), (k, w))| b == k && dest_matches(conf, &wanted, *w))
    {
        return;
    }
    if !conf_matches {
        out.push(Change::EditService(key));
    }
    for pair in merge_join(prog.dests.iter(), spec.backends.iter()) {
        match pair {
            Pair::Left(backend) => out.push(Change::DelDest(key, *backend)),
            Pair::Right(backend, _) => out.push(Change::AddDest(key, *backend)),
            Pair::Both(backend, conf, weight) => {
                if !dest_matches(conf, &wanted, *weight) {
                    out.push(Change::EditDest(key, *backend));
                }
            }
        }
    }
}

/// An entry of one or both of two maps walked together.
enum Pair<'a, K, A, B> {
    Left(&'a K),
    Right(&'a K, &'a B),
    Both(&'a K, &'a A, &'a B),
}

/// Walks two iterators sorted by key together, pairing equal keys.
fn merge_join<'a, K: Ord + 'a, A: 'a, B: 'a>(
    left: impl Iterator<Item = (&'a K, &'a A)>,
    right: impl Iterator<Item = (&'a K, &'a B)>,
) -> impl Iterator<Item = Pair<'a, K, A, B>> {
    let mut left = left.peekable();
    let mut right = right.peekable();
    std::iter::from_fn(move || {
        let order = match (left.peek(), right.peek()) {
            (None, None) => return None,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((l, _)), Some((r, _))) => l.cmp(r),
        };
        Some(match order {
            Ordering::Less => {
                let (k, _) = left.next()?;
                Pair::Left(k)
            }
            Ordering::Greater => {
                let (k, b) = right.next()?;
                Pair::Right(k, b)
            }
            Ordering::Equal => {
                let (k, a) = left.next()?;
                let (_, b) = right.next()?;
                Pair::Both(k, a, b)
            }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::service::ServiceProtocol;

    fn key(port: u16) -> ServiceKey {
        ServiceKey::Port {
            addr: "192.0.2.1".parse().unwrap(),
            protocol: ServiceProtocol::TCP,
            port,
        }
    }

    fn backend(last: u8) -> BackendKey {
        BackendKey {
            addr: [10, 1, 0, last].into(),
            port: 8080,
        }
    }

    fn spec(backends: &[(u8, u32)]) -> ServiceSpec {
        ServiceSpec {
            owner: "web".into(),
            scheduler: "rr".into(),
            scheduler_flags: [false; 3],
            persistence: None,
            forwarding: Forwarding::Masquerade,
            source_nat: true,
            tunnel: None,
            connection_limit: (0, 0),
            backends: backends.iter().map(|(b, w)| (backend(*b), *w)).collect(),
        }
    }

    fn programmed(desired: &ServiceSet) -> BTreeMap<ServiceKey, Programmed> {
        desired
            .iter()
            .map(|(k, s)| (*k, Programmed::of(s)))
            .collect()
    }

    #[test]
    fn nothing_changed_means_no_writes() {
        let desired: ServiceSet = (1..=100)
            .map(|p| (key(p), spec(&[(1, 1), (2, 1)])))
            .collect();
        assert!(diff(&programmed(&desired), &desired, |_| false).is_empty());
    }

    #[test]
    fn one_backend_changed_touches_one_destination() {
        let before: ServiceSet = (1..=100)
            .map(|p| (key(p), spec(&[(1, 1), (2, 1)])))
            .collect();
        let mut after = before.clone();
        after
            .get_mut(&key(50))
            .unwrap()
            .backends
            .insert(backend(2), 0);
        assert_eq!(
            diff(&programmed(&before), &after, |_| false),
            [Change::EditDest(key(50), backend(2))]
        );
        after
            .get_mut(&key(60))
            .unwrap()
            .backends
            .remove(&backend(1));
        after
            .get_mut(&key(70))
            .unwrap()
            .backends
            .insert(backend(3), 1);
        assert_eq!(
            diff(&programmed(&before), &after, |_| false),
            [
                Change::EditDest(key(50), backend(2)),
                Change::DelDest(key(60), backend(1)),
                Change::AddDest(key(70), backend(3)),
            ]
        );
    }

    #[test]
    fn services_come_and_go_whole_and_settings_are_edited_in_place() {
        let before: ServiceSet = [(key(1), spec(&[(1, 1)])), (key(2), spec(&[(1, 1)]))].into();
        let mut after: ServiceSet =
            [(key(2), spec(&[(1, 1)])), (key(3), spec(&[(1, 1), (2, 5)]))].into();
        after.get_mut(&key(2)).unwrap().scheduler = "wlc".into();
        assert_eq!(
            diff(&programmed(&before), &after, |_| false),
            [
                Change::DelService(key(1)),
                Change::EditService(key(2)),
                Change::AddService(key(3)),
                Change::AddDest(key(3), backend(1)),
                Change::AddDest(key(3), backend(2)),
            ]
        );
        // A foreign service with a desired key is left alone.
        assert_eq!(
            diff(&programmed(&before), &after, |k| *k == key(3)),
            [Change::DelService(key(1)), Change::EditService(key(2))]
        );
    }

    #[test]
    fn unknown_or_foreign_settings_are_rewritten() {
        let desired: ServiceSet = [(key(1), spec(&[(1, 1), (2, 1)]))].into();
        let mut prog = programmed(&desired);
        let p = prog.get_mut(&key(1)).unwrap();
        p.conf = None;
        p.dests.get_mut(&backend(1)).unwrap().thresholds = (10, 5);
        p.dests.get_mut(&backend(2)).unwrap().forwarding = None;
        assert_eq!(
            diff(&prog, &desired, |_| false),
            [
                Change::EditService(key(1)),
                Change::EditDest(key(1), backend(1)),
                Change::EditDest(key(1), backend(2)),
            ]
        );
    }
}
