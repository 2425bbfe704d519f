//! Runs a [`Dataplane`] on its own thread: kernel writes (thousands of netlink requests when
//! a large table is first programmed) never delay VRRP or planning. It applies the latest
//! desired set, retries what failed with backoff, re-reads the kernel now and then to repair
//! drift, and publishes the outcome for status and metrics.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{ApplyReport, Dataplane};
use crate::model::service::{ServiceKey, ServiceSet};

/// First retry of a failed service; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often a dataplane that is missing (no IPVS module) is looked for again.
const UNAVAILABLE_RECHECK: Duration = Duration::from_secs(60);

/// VirtualIP name → (services, backends) it wants.
type PerOwner = BTreeMap<String, (usize, usize)>;

/// The last outcome, for status and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataplaneStatus {
    pub name: &'static str,
    pub report: ApplyReport,
    /// Services and backends desired, per VirtualIP.
    pub desired_per_owner: PerOwner,
}

impl DataplaneStatus {
    /// One line for a VirtualIP's status entry: what this node forwards for it.
    pub fn summary_for(&self, owner: &str) -> Option<String> {
        let (services, backends) = *self.desired_per_owner.get(owner)?;
        let name = self.name;
        let what = format!(
            "{services} service{}, {backends} backend{}",
            plural(services),
            plural(backends)
        );
        if let Some(why) = &self.report.unavailable {
            return Some(format!("{name}: {what} not programmed: {why}"));
        }
        if let Some(e) = &self.report.error {
            return Some(format!("{name}: {what}, not converged: {}", e.message));
        }
        let failed: Vec<&str> = self
            .report
            .failures
            .iter()
            .filter(|f| f.owner == owner)
            .map(|f| f.error.as_str())
            .collect();
        Some(match failed.as_slice() {
            [] => format!("{name}: {what} programmed"),
            [first, rest @ ..] => {
                let more = if rest.is_empty() {
                    String::new()
                } else {
                    format!(" (and {} more)", rest.len())
                };
                format!("{name}: {what}, {} failed: {first}{more}", failed.len())
            }
        })
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Hears the outcome of every apply (the agent's metrics). The dataplane layer names no
/// observer of its own, so the imports point down: metrics knows the report, not the reverse.
pub trait ApplyObserver: Send + 'static {
    fn applied(&self, dataplane: &'static str, report: &ApplyReport, took: Duration);
}

/// Starts the worker thread. It stops when `desired`'s sender is dropped.
///
/// `desired` holds `None` until the first complete plan: until then the worker touches
/// nothing, not even to read the kernel. Applying an empty set there would remove every
/// service an earlier run left (and the nft table and sysctls) only to rebuild them when the
/// plan arrives; a restarted agent must instead adopt them with no write at all.
pub fn spawn<D: Dataplane + 'static>(
    mut dataplane: D,
    mut desired: watch::Receiver<Option<Arc<ServiceSet>>>,
    observer: impl ApplyObserver,
    resync: Duration,
) -> watch::Receiver<Option<Arc<DataplaneStatus>>> {
    let (status_tx, status_rx) = watch::channel(None);
    let name = dataplane.name();
    let spawned = std::thread::Builder::new()
        .name(format!("dataplane-{name}"))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    warn!(dataplane = name, error = %e, "cannot start the dataplane thread's runtime");
                    return;
                }
            };
            runtime.block_on(async move {
                let mut log = Logged::default();
                let mut backoff = FIRST_BACKOFF;
                let mut next_resync = Instant::now() + resync;
                let mut counted: Option<(Arc<ServiceSet>, PerOwner)> = None;
                loop {
                    let Some(set) = desired.borrow_and_update().clone() else {
                        // No complete plan yet.
                        if desired.changed().await.is_err() {
                            return;
                        }
                        continue;
                    };
                    if counted.is_none() {
                        info!(
                            dataplane = name,
                            services = set.len(),
                            backends = set.values().map(|s| s.backends.len()).sum::<usize>(),
                            "first complete plan: converging the kernel to it"
                        );
                    }
                    if Instant::now() >= next_resync {
                        dataplane.invalidate();
                        next_resync = Instant::now() + resync;
                    }
                    let started = Instant::now();
                    let report = dataplane.apply(&set).await;
                    let took = started.elapsed();
                    observer.applied(name, &report, took);
                    log.report(name, &set, &report, took);
                    let wait = if report.unavailable.is_some() {
                        UNAVAILABLE_RECHECK
                    } else if report.incomplete() {
                        let wait = if report.retry_soon() { FIRST_BACKOFF } else { backoff };
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                        wait
                    } else {
                        backoff = FIRST_BACKOFF;
                        next_resync.saturating_duration_since(Instant::now())
                    };
                    // Counted again only for a new set, not for every retry or resync.
                    let per_owner = match &counted {
                        Some((counted_set, per_owner)) if Arc::ptr_eq(counted_set, &set) => {
                            per_owner.clone()
                        }
                        _ => {
                            let mut per_owner = BTreeMap::new();
                            for spec in set.values() {
                                let entry: &mut (usize, usize) =
                                    per_owner.entry(spec.owner.clone()).or_default();
                                entry.0 += 1;
                                entry.1 += spec.backends.len();
                            }
                            counted = Some((set.clone(), per_owner.clone()));
                            per_owner
                        }
                    };
                    let status = DataplaneStatus {
                        name,
                        report,
                        desired_per_owner: per_owner,
                    };
                    status_tx.send_if_modified(|current| {
                        if current.as_deref() == Some(&status) {
                            false
                        } else {
                            *current = Some(Arc::new(status));
                            true
                        }
                    });
                    tokio::select! {
                        changed = desired.changed() => if changed.is_err() { return },
                        () = tokio::time::sleep(wait) => {}
                    }
                }
            });
        });
    if let Err(e) = spawned {
        warn!(dataplane = name, error = %e, "cannot start the dataplane thread");
    }
    status_rx
}

/// What has been logged, so that each problem is said once and its end is said too.
#[derive(Default)]
struct Logged {
    unavailable: Option<String>,
    error: Option<String>,
    failures: BTreeMap<ServiceKey, String>,
}

impl Logged {
    fn report(&mut self, name: &str, set: &ServiceSet, report: &ApplyReport, took: Duration) {
        match (&report.unavailable, &self.unavailable) {
            (Some(why), None) if !set.is_empty() => {
                warn!(
                    dataplane = name,
                    services = set.len(),
                    "{why}: virtual services are not forwarded on this node (VRRP keeps running)"
                );
                self.unavailable = Some(why.clone());
            }
            (Some(why), None) => {
                debug!(dataplane = name, "{why} (no virtual services are needed)");
            }
            (None, Some(_)) => {
                info!(dataplane = name, "available again");
                self.unavailable = None;
            }
            _ => {}
        }
        if report.unavailable.is_some() {
            return;
        }
        let error = report.error.as_ref().map(|e| e.message.clone());
        if error != self.error {
            match &error {
                Some(message) => warn!(dataplane = name, "{message}"),
                None => info!(dataplane = name, "the kernel's table is readable again"),
            }
            self.error = error;
        }
        let mut now = BTreeMap::new();
        for f in &report.failures {
            if self.failures.get(&f.key) != Some(&f.error) {
                warn!(
                    dataplane = name,
                    virtualip = %f.owner,
                    service = %f.key,
                    reason = f.reason,
                    transient = f.transient,
                    "{}",
                    f.error
                );
            }
            now.insert(f.key, f.error.clone());
        }
        for key in self.failures.keys() {
            if !now.contains_key(key) {
                info!(dataplane = name, service = %key, "service converged after earlier failures");
            }
        }
        self.failures = now;
        if report.writes > 0 {
            info!(
                dataplane = name,
                writes = report.writes,
                services = report.services,
                backends = report.backends,
                took_us = took.as_micros() as u64,
                "dataplane applied"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::ServiceFailure;
    use crate::vocab::Family;

    fn status(report: ApplyReport) -> DataplaneStatus {
        DataplaneStatus {
            name: "ipvs",
            report,
            desired_per_owner: [("web".to_string(), (2, 3)), ("db".to_string(), (1, 1))].into(),
        }
    }

    #[test]
    fn summaries_say_what_is_forwarded_and_why_not() {
        let ok = status(ApplyReport::default());
        assert_eq!(
            ok.summary_for("web").unwrap(),
            "ipvs: 2 services, 3 backends programmed"
        );
        assert_eq!(
            ok.summary_for("db").unwrap(),
            "ipvs: 1 service, 1 backend programmed"
        );
        assert_eq!(ok.summary_for("other"), None);

        let missing = status(ApplyReport {
            unavailable: Some("IPVS is not available".into()),
            ..ApplyReport::default()
        });
        assert_eq!(
            missing.summary_for("web").unwrap(),
            "ipvs: 2 services, 3 backends not programmed: IPVS is not available"
        );
        let unreadable = status(ApplyReport {
            error: Some(crate::dataplane::ApplyError {
                message: "cannot read the IPVS table: EBUSY".into(),
                reason: "EBUSY",
            }),
            ..ApplyReport::default()
        });
        assert_eq!(
            unreadable.summary_for("web").unwrap(),
            "ipvs: 2 services, 3 backends, not converged: cannot read the IPVS table: EBUSY"
        );

        let failure = |error: &str| ServiceFailure {
            key: ServiceKey::Fwmark {
                family: Family::V4,
                mark: 1,
            },
            owner: "web".into(),
            error: error.into(),
            reason: "ENOENT",
            transient: false,
        };
        let partial = status(ApplyReport {
            failures: vec![failure("first"), failure("second")],
            ..ApplyReport::default()
        });
        assert_eq!(
            partial.summary_for("web").unwrap(),
            "ipvs: 2 services, 3 backends, 2 failed: first (and 1 more)"
        );
        assert_eq!(
            partial.summary_for("db").unwrap(),
            "ipvs: 1 service, 1 backend programmed"
        );
    }

    /// Counts applies and the sets it was handed.
    struct Counting(std::sync::mpsc::Sender<usize>);

    impl Dataplane for Counting {
        fn name(&self) -> &'static str {
            "counting"
        }
        async fn apply(&mut self, desired: &ServiceSet) -> ApplyReport {
            let _ = self.0.send(desired.len());
            ApplyReport::default()
        }
        fn invalidate(&mut self) {}
    }

    struct Quiet;
    impl ApplyObserver for Quiet {
        fn applied(&self, _: &'static str, _: &ApplyReport, _: Duration) {}
    }

    #[test]
    fn nothing_is_applied_before_the_first_plan_not_even_an_empty_set() {
        let (applied_tx, applied) = std::sync::mpsc::channel();
        let (desired, desired_rx) = watch::channel(None);
        let status = spawn(
            Counting(applied_tx),
            desired_rx,
            Quiet,
            Duration::from_secs(300),
        );
        assert!(
            applied.recv_timeout(Duration::from_millis(300)).is_err(),
            "applied before any plan"
        );
        assert!(status.borrow().is_none());
        // The first plan, even one without services, is applied (it removes what an
        // earlier run left and the plan no longer wants).
        desired.send_replace(Some(Arc::new(ServiceSet::new())));
        assert_eq!(applied.recv_timeout(Duration::from_secs(5)), Ok(0));
        drop(desired);
    }
}
