//! Runs the checks: one tokio task per check, converged to the wanted set, publishing a
//! [`HealthReport`] on a watch channel when a check changes state.
//!
//! A report is published when a check is added or removed, when it changes state, and while it
//! fails when the kind of failure changes (refused → timeout), so that the reason a user reads
//! stays true; never on every probe. A steady check costs no wake-ups downstream.
//!
//! Stale tasks never write: each started task gets a generation, registered in `live` under
//! the same lock [`HealthMonitor::set_checks`] holds while it edits the report. A task that was
//! replaced or removed, and is still finishing a probe on another worker thread, finds its
//! generation gone and drops its result.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::MissedTickBehavior;
use tracing::{debug, info};

use super::HealthError;
use super::check::{CheckKey, CheckSpec, validate};
use super::probe::probe;
use super::tracker::{CheckState, CheckTracker};

/// The last published facts about one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStatus {
    pub state: CheckState,
    /// Why the check fails (with its causes); `None` unless failing.
    pub last_error: Option<String>,
    /// Bounded kind of `last_error`, for metrics ([`HealthError::metric_label`]).
    pub last_error_kind: Option<&'static str>,
    /// When the check entered `state` (wall clock, for status timestamps).
    pub since: SystemTime,
    /// The same moment on the monotonic clock, for durations.
    pub since_instant: Instant,
    /// Run lengths as of this publication (not updated on every probe).
    pub consecutive_successes: u32,
    pub consecutive_failures: u32,
}

impl CheckStatus {
    fn unknown() -> Self {
        CheckStatus {
            state: CheckState::Unknown,
            last_error: None,
            last_error_kind: None,
            since: SystemTime::now(),
            since_instant: Instant::now(),
            consecutive_successes: 0,
            consecutive_failures: 0,
        }
    }

    /// Whether the check's weight should come off the priority.
    pub fn is_failing(&self) -> bool {
        self.state == CheckState::Failing
    }

    pub fn is_passing(&self) -> bool {
        self.state == CheckState::Passing
    }
}

/// Every running check's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthReport {
    pub checks: BTreeMap<CheckKey, CheckStatus>,
}

impl HealthReport {
    pub fn get(&self, key: &CheckKey) -> Option<&CheckStatus> {
        self.checks.get(key)
    }

    /// The checks of one VirtualIP, by check name.
    pub fn of_resource<'a>(
        &'a self,
        resource: &'a str,
    ) -> impl Iterator<Item = (&'a str, &'a CheckStatus)> + 'a {
        self.checks
            .range(CheckKey::new(resource, "")..)
            .take_while(move |(key, _)| key.resource == resource)
            .map(|(key, status)| (key.check.as_str(), status))
    }

    /// Whether every check has had its first result.
    pub fn all_known(&self) -> bool {
        self.checks
            .values()
            .all(|status| status.state != CheckState::Unknown)
    }
}

struct Shared {
    /// Generation of the task allowed to publish for each check.
    live: Mutex<BTreeMap<CheckKey, u64>>,
    report: watch::Sender<HealthReport>,
}

struct Running {
    spec: CheckSpec,
    task: AbortHandle,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Owns the probe tasks; dropping it stops them all.
pub struct HealthMonitor {
    shared: Arc<Shared>,
    running: BTreeMap<CheckKey, Running>,
    next_generation: u64,
}

impl HealthMonitor {
    pub fn new() -> (HealthMonitor, watch::Receiver<HealthReport>) {
        let (report, receiver) = watch::channel(HealthReport::default());
        let monitor = HealthMonitor {
            shared: Arc::new(Shared {
                live: Mutex::new(BTreeMap::new()),
                report,
            }),
            running: BTreeMap::new(),
            next_generation: 0,
        };
        (monitor, receiver)
    }

    /// Another receiver of the reports.
    pub fn subscribe(&self) -> watch::Receiver<HealthReport> {
        self.shared.report.subscribe()
    }

    /// Converges the running checks to `checks`: starts new ones, stops removed ones,
    /// restarts changed ones, and leaves identical ones (and their state) alone. A changed
    /// check whose target ([`CheckSpec::kind`]) is unchanged keeps its state, so retuning the
    /// interval or thresholds does not reset a failing check to unknown; a new target starts
    /// unknown. Returns the checks refused by [`validate`], which do not run.
    ///
    /// Must be called within a tokio runtime (it spawns the probe tasks).
    #[must_use = "refused checks do not run"]
    pub fn set_checks(
        &mut self,
        checks: BTreeMap<CheckKey, CheckSpec>,
    ) -> Vec<(CheckKey, HealthError)> {
        let mut refused = Vec::new();
        let mut wanted = BTreeMap::new();
        for (key, spec) in checks {
            match validate(&spec) {
                Ok(()) => {
                    wanted.insert(key, spec);
                }
                Err(error) => refused.push((key, error)),
            }
        }

        let mut resumed = BTreeSet::new();
        let mut starts = Vec::new();
        for (key, spec) in &wanted {
            match self.running.get(key) {
                Some(running) if running.spec == *spec => {}
                Some(running) if running.spec.kind == spec.kind => {
                    resumed.insert(key.clone());
                    starts.push((key.clone(), spec.clone()));
                }
                _ => starts.push((key.clone(), spec.clone())),
            }
        }

        let shared = Arc::clone(&self.shared);
        let mut live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
        self.running.retain(|key, running| {
            let keep = wanted.get(key) == Some(&running.spec);
            if !keep {
                live.remove(key);
            }
            keep
        });
        shared.report.send_if_modified(|report| {
            let before = report.checks.len();
            report.checks.retain(|key, _| wanted.contains_key(key));
            let mut modified = report.checks.len() != before;
            for (key, _) in &starts {
                if !(resumed.contains(key) && report.checks.contains_key(key)) {
                    report.checks.insert(key.clone(), CheckStatus::unknown());
                    modified = true;
                }
            }
            modified
        });

        for (key, spec) in starts {
            let initial = shared
                .report
                .borrow()
                .checks
                .get(&key)
                .cloned()
                .unwrap_or_else(CheckStatus::unknown);
            let generation = self.next_generation;
            self.next_generation += 1;
            live.insert(key.clone(), generation);
            debug!(check = %key, ?spec, state = %initial.state, "starting health check");
            let task = tokio::spawn(run_check(
                Arc::clone(&shared),
                key.clone(),
                generation,
                spec.clone(),
                initial,
            ));
            self.running.insert(
                key,
                Running {
                    spec,
                    task: task.abort_handle(),
                },
            );
        }
        refused
    }
}

async fn run_check(
    shared: Arc<Shared>,
    key: CheckKey,
    generation: u64,
    spec: CheckSpec,
    initial: CheckStatus,
) {
    let mut tracker = CheckTracker::resume(spec.rise, spec.fall, initial.state);
    let mut status = initial;
    let mut ticker = tokio::time::interval(spec.interval);
    // A probe that overran its interval is followed by a full interval, not a burst.
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let result = match tokio::time::timeout(spec.timeout, probe(&spec.kind)).await {
            Ok(result) => result,
            Err(_) => Err(HealthError::Timeout {
                after: spec.timeout,
            }),
        };
        let transition = tracker.record(result.is_ok());
        let error_kind = result.as_ref().err().map(HealthError::metric_label);
        let failure_changed = tracker.state() == CheckState::Failing
            && error_kind.is_some()
            && error_kind != status.last_error_kind;
        if transition.is_none() && !failure_changed {
            continue;
        }
        if let Some(to) = transition {
            info!(
                check = %key,
                event = "health_transition",
                from = %status.state,
                to = %to,
                error = result.as_ref().err().map(HealthError::chain).unwrap_or_default(),
                "health check {to}"
            );
            status.state = to;
            status.since = SystemTime::now();
            status.since_instant = Instant::now();
        }
        if tracker.state() == CheckState::Failing {
            if let Err(error) = &result {
                status.last_error = Some(error.chain());
                status.last_error_kind = Some(error.metric_label());
            }
        } else {
            status.last_error = None;
            status.last_error_kind = None;
        }
        status.consecutive_successes = tracker.consecutive_successes();
        status.consecutive_failures = tracker.consecutive_failures();
        publish(&shared, &key, generation, &status);
    }
}

fn publish(shared: &Shared, key: &CheckKey, generation: u64, status: &CheckStatus) {
    let live = shared.live.lock().unwrap_or_else(PoisonError::into_inner);
    if live.get(key) != Some(&generation) {
        return;
    }
    shared
        .report
        .send_if_modified(|report| match report.checks.get_mut(key) {
            Some(current) if current == status => false,
            Some(current) => {
                *current = status.clone();
                true
            }
            None => {
                report.checks.insert(key.clone(), status.clone());
                true
            }
        });
    drop(live);
}

#[cfg(test)]
mod tests;
