//! The controller's Events in a burst: within a window, the first few Services of each
//! reason (the countable ones: `AddressAllocated`) get an Event each, the rest of the window
//! are counted per pool into one Event about the LoadBalancerPool, naming the first few.
//! 10,000 Services allocated at once made 10,000 Events, drained for minutes after the burst
//! at ~60/s (writes the steady state should not have); now a few dozen. Pure: time is given.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;

use super::write::ServiceEvent;

/// A window: its first [`OWN`] Events of each reason go out singly.
pub const WINDOW: Duration = Duration::from_secs(10);
pub const OWN: usize = 8;
/// A window's summary goes out this long after its last summarized Event, or when the
/// window ends.
pub const QUIET: Duration = Duration::from_secs(2);
/// Services named in a summary.
const NAMED: usize = 8;

#[derive(Default)]
struct Pending {
    count: usize,
    named: Vec<String>,
    action: &'static str,
}

/// The summarizer's state.
#[derive(Default)]
pub struct Summaries {
    /// The current window: when it began, and Events let through per reason.
    window: Option<(Instant, BTreeMap<&'static str, usize>)>,
    /// (reason, pool) → what was counted.
    pending: BTreeMap<(&'static str, String), Pending>,
    last_counted: Option<Instant>,
}

impl Summaries {
    /// An Event to publish as it is, or `None`: counted into a summary.
    pub fn offer(&mut self, event: ServiceEvent, now: Instant) -> Option<ServiceEvent> {
        let Some(countable) = event.countable.clone() else {
            return Some(event);
        };
        let (since, passed) = self.window.get_or_insert_with(|| (now, BTreeMap::new()));
        if now.duration_since(*since) >= WINDOW && self.pending.is_empty() {
            *since = now;
            passed.clear();
        }
        let passed = passed.entry(event.reason).or_default();
        if *passed < OWN {
            *passed += 1;
            return Some(event);
        }
        let pending = self
            .pending
            .entry((event.reason, countable.pool))
            .or_default();
        pending.count += 1;
        pending.action = event.action;
        if pending.named.len() < NAMED {
            pending.named.push(format!(
                "{}/{} ({})",
                event.service.namespace.as_deref().unwrap_or_default(),
                event.service.name.as_deref().unwrap_or_default(),
                countable.address
            ));
        }
        self.last_counted = Some(now);
        None
    }

    /// When [`Summaries::flush`] has something to give.
    pub fn due(&self) -> Option<Instant> {
        if self.pending.is_empty() {
            return None;
        }
        let quiet = self.last_counted? + QUIET;
        let end = self.window.as_ref()?.0 + WINDOW;
        Some(quiet.min(end))
    }

    /// The summaries due at `now` (a new window begins after them).
    pub fn flush(&mut self, now: Instant) -> Vec<ServiceEvent> {
        if self.due().is_none_or(|due| now < due) {
            return Vec::new();
        }
        self.window = None;
        self.last_counted = None;
        std::mem::take(&mut self.pending)
            .into_iter()
            .map(|((reason, pool), p)| summary_event(reason, &pool, p))
            .collect()
    }
}

fn summary_event(reason: &'static str, pool: &str, p: Pending) -> ServiceEvent {
    let others = p.count - p.named.len();
    let more = if others > 0 {
        format!(" and {others} others")
    } else {
        String::new()
    };
    ServiceEvent {
        service: ObjectReference {
            api_version: Some("ferrovip.io/v1alpha1".into()),
            kind: Some("LoadBalancerPool".into()),
            name: Some(pool.to_owned()),
            ..ObjectReference::default()
        },
        warning: false,
        reason,
        action: p.action,
        note: format!(
            "pool {pool}: {} more addresses allocated to Services: {}{more}; each Service's own status says which",
            p.count,
            p.named.join(", ")
        ),
        countable: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::write::Countable;

    fn allocated(i: usize, pool: &str) -> ServiceEvent {
        ServiceEvent {
            service: ObjectReference {
                kind: Some("Service".into()),
                namespace: Some("default".into()),
                name: Some(format!("svc-{i}")),
                ..ObjectReference::default()
            },
            warning: false,
            reason: "AddressAllocated",
            action: "Allocate",
            note: format!("address 192.0.2.{i} allocated from pool {pool}"),
            countable: Some(Countable {
                pool: pool.into(),
                address: format!("192.0.2.{i}"),
            }),
        }
    }

    #[test]
    fn a_burst_gets_a_few_events_and_one_summary_per_pool_then_a_new_window() {
        let t0 = Instant::now();
        let mut s = Summaries::default();
        let mut out = Vec::new();
        for i in 0..20 {
            let pool = if i < 15 { "web" } else { "db" };
            out.extend(s.offer(allocated(i, pool), t0 + Duration::from_millis(i as u64)));
        }
        // An Event that is not countable always goes out.
        let mut failure = allocated(99, "web");
        failure.countable = None;
        failure.reason = "AllocationFailed";
        assert!(s.offer(failure, t0).is_some());
        assert_eq!(out.len(), OWN, "the first {OWN} singly");
        assert!(
            s.flush(t0 + Duration::from_secs(1)).is_empty(),
            "not quiet yet"
        );
        let due = s.due().expect("summaries pending");
        assert_eq!(due, t0 + Duration::from_millis(19) + QUIET);
        let summaries = s.flush(due);
        let notes: Vec<(String, String)> = summaries
            .iter()
            .map(|e| (e.service.name.clone().unwrap_or_default(), e.note.clone()))
            .collect();
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert_eq!(notes[0].0, "db");
        assert_eq!(
            notes[0].1,
            "pool db: 5 more addresses allocated to Services: default/svc-15 (192.0.2.15), \
             default/svc-16 (192.0.2.16), default/svc-17 (192.0.2.17), default/svc-18 \
             (192.0.2.18), default/svc-19 (192.0.2.19); each Service's own status says which"
        );
        assert!(
            notes[1].1.starts_with(
                "pool web: 7 more addresses allocated to Services: default/svc-8 (192.0.2.8),"
            ),
            "{notes:?}"
        );
        assert!(
            summaries
                .iter()
                .all(|e| e.service.kind.as_deref() == Some("LoadBalancerPool"))
        );
        assert!(s.due().is_none());
        // A new window: the next ones go out singly again.
        assert!(s.offer(allocated(30, "web"), due).is_some());
    }

    #[test]
    fn a_steady_trickle_never_waits_for_a_summary() {
        let t0 = Instant::now();
        let mut s = Summaries::default();
        // One allocation every 2 s: never more than 8 in a window.
        for i in 0..30 {
            let at = t0 + Duration::from_secs(2 * i as u64);
            assert!(s.offer(allocated(i, "web"), at).is_some(), "Event {i}");
        }
        assert!(s.due().is_none());
    }

    #[test]
    fn a_long_burst_is_summarized_once_per_window() {
        let t0 = Instant::now();
        let mut s = Summaries::default();
        let mut singles = 0;
        let mut summaries = Vec::new();
        // 100 allocations a second for 30 s.
        for i in 0..3000 {
            let now = t0 + Duration::from_millis(10 * i as u64);
            summaries.extend(s.flush(now));
            singles += usize::from(s.offer(allocated(i, "web"), now).is_some());
        }
        summaries.extend(s.flush(t0 + Duration::from_secs(60)));
        let counted: usize = summaries
            .iter()
            .map(|e| {
                let n = e.note.split(": ").nth(1).unwrap_or_default();
                n.split(' ')
                    .next()
                    .unwrap_or_default()
                    .parse::<usize>()
                    .unwrap_or(0)
            })
            .sum();
        assert_eq!(summaries.len(), 3, "one per 10 s window");
        assert_eq!(singles, 3 * OWN);
        assert_eq!(singles + counted, 3000, "every allocation told once");
    }
}
