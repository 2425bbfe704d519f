//! Pools as the allocator sees them: parsed entries, validity (`Invalid` naming the entry),
//! overlaps with older pools and VirtualIPs (`Conflict`), what each may hand out, and the
//! status written back.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use super::addrs::{self, Family, RangeSet};
use crate::crd::{
    LoadBalancerPool, LoadBalancerPoolSpec, LoadBalancerPoolStatus, PoolUsage, SCHEDULERS,
    ServiceForwarding, template_field,
};

/// At most this many problems or overlaps are named in one condition message.
const MAX_NAMED: usize = 8;

/// One pool, analysed.
#[derive(Debug)]
pub struct Pool<'a> {
    pub name: String,
    pub spec: &'a LoadBalancerPoolSpec,
    pub generation: Option<i64>,
    /// Why the pool hands out nothing (empty: valid).
    pub problems: Vec<String>,
    /// Overlaps with older pools and VirtualIPs.
    pub conflicts: Vec<String>,
    /// The addresses of the parsed entries (network/broadcast excluded as the entry says):
    /// an allocation stays valid while its address is here.
    pub usable: [RangeSet; 2],
    /// What the pool may hand out: `usable` minus older pools and VirtualIPs; empty when
    /// invalid.
    pub handable: [RangeSet; 2],
    /// The pool lists addresses of the family.
    pub has_family: [bool; 2],
}

impl Pool<'_> {
    pub fn valid(&self) -> bool {
        self.problems.is_empty()
    }

    fn skip_buggy(&self, family: Family) -> bool {
        family == Family::V4 && self.spec.avoid_buggy_ips
    }

    /// Whether an allocation of `ip` from this pool is still valid.
    pub fn holds(&self, ip: IpAddr) -> bool {
        let (f, n) = addrs::number(ip);
        self.usable[f.index()].contains(n) && !(self.skip_buggy(f) && addrs::is_buggy(n))
    }

    /// Whether the pool may hand `ip` out now.
    pub fn hands_out(&self, ip: IpAddr) -> bool {
        let (f, n) = addrs::number(ip);
        self.handable[f.index()].contains(n) && !(self.skip_buggy(f) && addrs::is_buggy(n))
    }

    pub fn has_free_space(&self, family: Family) -> bool {
        !self.handable[family.index()].is_empty()
    }

    /// The lowest address `>= from` the pool may hand out that is not in `blocked`.
    pub fn lowest_free(
        &self,
        family: Family,
        from: u128,
        blocked: &BTreeSet<u128>,
    ) -> Option<u128> {
        self.handable[family.index()].lowest_free(from, blocked, self.skip_buggy(family))
    }

    pub fn forwards_with_ipvs(&self) -> bool {
        self.spec.template.forwarding == ServiceForwarding::IPVS
    }

    /// The status: per-family counts (`used`: every address held by a Service, whatever
    /// its pool; `in_use`: the addresses whose record names this pool) and conditions.
    pub fn status(&self, used: &[BTreeSet<u128>; 2], in_use: [u128; 2]) -> LoadBalancerPoolStatus {
        let mut usage: [Option<PoolUsage>; 2] = [None, None];
        let mut total_all = 0u128;
        let mut available_all = 0u128;
        for f in Family::BOTH {
            if !self.has_family[f.index()] {
                continue;
            }
            let set = &self.handable[f.index()];
            let total = set.count(self.skip_buggy(f));
            let taken = set.count_members(&used[f.index()], self.skip_buggy(f));
            let available = total - taken;
            total_all = total_all.saturating_add(total);
            available_all = available_all.saturating_add(available);
            usage[f.index()] = Some(PoolUsage {
                total: saturate(total),
                in_use: saturate(in_use[f.index()]),
                available: saturate(available),
            });
        }
        let [ipv4, ipv6] = usage;
        let ready = if !self.valid() {
            (
                "False",
                "Invalid",
                format!("hands out nothing: {}", self.problems[0]),
            )
        } else if total_all == 0 {
            (
                "False",
                "NoAddresses",
                "every address overlaps an older pool or a VirtualIP".to_string(),
            )
        } else if available_all == 0 {
            ("True", "Exhausted", "every address is in use".to_string())
        } else {
            ("True", "Ready", "hands out addresses".to_string())
        };
        let invalid = if self.valid() {
            ("False", "Valid", "the spec is valid".to_string())
        } else {
            ("True", "InvalidSpec", named(&self.problems))
        };
        let conflict = if self.conflicts.is_empty() {
            ("False", "NoOverlap", "no overlap".to_string())
        } else {
            ("True", "Overlap", named(&self.conflicts))
        };
        let condition = |type_: &str, (status, reason, message): (&str, &str, String)| Condition {
            type_: type_.to_string(),
            status: status.to_string(),
            reason: reason.to_string(),
            message,
            observed_generation: self.generation,
            // Left at the epoch: the writer keeps the previous time when nothing else changed.
            last_transition_time: Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH),
        };
        LoadBalancerPoolStatus {
            observed_generation: self.generation,
            ipv4,
            ipv6,
            in_use: Some(saturate(in_use[0].saturating_add(in_use[1]))),
            conditions: vec![
                condition("Ready", ready),
                condition("Conflict", conflict),
                condition("Invalid", invalid),
            ],
        }
    }
}

fn saturate(n: u128) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn named(items: &[String]) -> String {
    let mut out = items
        .iter()
        .take(MAX_NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if items.len() > MAX_NAMED {
        out.push_str(&format!("; and {} more", items.len() - MAX_NAMED));
    }
    out
}

/// Every pool, oldest first (creationTimestamp, then name): the order overlaps are decided in.
pub fn analyze<'a>(
    pools: &'a [LoadBalancerPool],
    reserved: &BTreeMap<IpAddr, String>,
) -> Vec<Pool<'a>> {
    let mut sorted: Vec<&LoadBalancerPool> = pools.iter().collect();
    sorted.sort_by(|a, b| {
        (&a.metadata.creation_timestamp, &a.metadata.name)
            .cmp(&(&b.metadata.creation_timestamp, &b.metadata.name))
    });
    let mut reserved_sets: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
    for ip in reserved.keys() {
        let (f, n) = addrs::number(*ip);
        reserved_sets[f.index()].push((n, n));
    }
    let reserved_sets = reserved_sets.map(RangeSet::from_ranges);
    let mut out: Vec<Pool> = Vec::with_capacity(sorted.len());
    for pool in sorted {
        let mut p = parse(pool);
        for f in Family::BOTH {
            let i = f.index();
            let mut handable = p.usable[i].clone();
            for older in &out {
                let overlap = p.usable[i].intersection(&older.usable[i]);
                if overlap.is_empty() {
                    continue;
                }
                let ranges: Vec<String> = overlap
                    .ranges()
                    .iter()
                    .map(|r| addrs::format_range(f, *r))
                    .collect();
                p.conflicts.push(format!(
                    "{} overlaps older pool {:?}: nothing is handed out from it",
                    ranges.join(", "),
                    older.name
                ));
                handable = handable.difference(&overlap);
            }
            let clash = handable.intersection(&reserved_sets[i]);
            for &(s, e) in clash.ranges() {
                for n in s..=e {
                    let ip = f.ip(n);
                    p.conflicts.push(format!(
                        "{ip} is the address of {}: not handed out",
                        reserved[&ip]
                    ));
                }
            }
            handable = handable.difference(&clash);
            if p.valid() {
                p.handable[i] = handable;
            }
        }
        out.push(p);
    }
    out
}

/// Parses one pool's entries and checks its template.
fn parse(pool: &LoadBalancerPool) -> Pool<'_> {
    let spec = &pool.spec;
    let mut problems = Vec::new();
    let mut ranges: [Vec<(u128, u128)>; 2] = [Vec::new(), Vec::new()];
    let mut has_family = [false; 2];
    if spec.addresses.is_empty() {
        problems.push("spec.addresses: at least one entry is required".to_string());
    }
    for (i, entry) in spec.addresses.iter().enumerate() {
        match addrs::parse_entry(entry) {
            Ok(e) => {
                has_family[e.family.index()] = true;
                ranges[e.family.index()].push((e.start, e.end));
            }
            Err(err) => problems.push(format!("spec.addresses[{i}]: {entry:?}: {err}")),
        }
    }
    let template = &spec.template;
    if template.priority.local_endpoints.is_some() {
        problems.push(
            "spec.template.priority.localEndpoints: not allowed in a pool (a Service with \
             externalTrafficPolicy: Local gets it by itself)"
                .to_string(),
        );
    }
    if !SCHEDULERS.contains(&template.scheduler.as_str()) {
        problems.push(format!(
            "spec.template.scheduler: {:?} is not one of {}",
            template.scheduler,
            SCHEDULERS.join(", ")
        ));
    }
    // The template is what a VirtualIP says besides its addresses: validate it as one, with a
    // dummy address of each family the pool has (VRRP settings depend on the family).
    let dummies = [
        (Family::V4, "192.0.2.1/32"),
        (Family::V6, "2001:db8::1/128"),
    ];
    let mut seen = BTreeSet::new();
    for (family, dummy) in dummies {
        if !has_family[family.index()] {
            continue;
        }
        if let Err(errors) = template
            .virtual_ip_spec(vec![dummy.to_string()], Vec::new())
            .validate()
        {
            for e in errors.0 {
                if e.field.starts_with("spec.addresses") {
                    continue;
                }
                let text = format!("{}: {}", template_field(&e.field), e.message);
                if seen.insert(text.clone()) {
                    problems.push(text);
                }
            }
        }
    }
    let usable = ranges.map(RangeSet::from_ranges);
    Pool {
        name: pool.metadata.name.clone().unwrap_or_default(),
        spec,
        generation: pool.metadata.generation,
        problems,
        conflicts: Vec::new(),
        usable,
        handable: [RangeSet::default(), RangeSet::default()],
        has_family,
    }
}
