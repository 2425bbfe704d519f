//! Leader election with a `coordination.k8s.io/v1` Lease, for tasks that need exactly one
//! writer in the cluster (the Service controller).
//!
//! The Lease is the only shared state: whoever holds it (`holderIdentity`) and renewed it
//! (`renewTime`) less than `leaseDurationSeconds` ago leads. Every change is a compare-and-swap
//! on the Lease's `resourceVersion` (create, or replace carrying the version read), so two
//! contenders never both win one round. Fencing: the leader counts its term from the moment it
//! *sent* its last successful renewal, so its own view of the lease always ends before any
//! contender's (who counts from the `renewTime` written after that moment); it stops as soon as
//! one renewal fails. A graceful stop releases the Lease (clears `holderIdentity`) so that a
//! contender takes over at once instead of after the lease duration.
//!
//! [`decide`] is the pure part (table-tested); [`Elector`] runs it against the API server.
//!
//! The Lease also carries how far the leader's watches have come ([`PROGRESS_ANNOTATIONS`]):
//! every contender reads the Lease anyway, and a contender whose own watch of the same kind
//! stays behind that for long has a silent watch ([`crate::source::reflect`]).

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use crate::source::reflect::{Echoes, WriteEchoes};

/// Errors of one election round (the elector retries; they are logged, not returned).
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("Lease {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("Lease {namespace}/{name} changed under us (resourceVersion conflict)")]
    Conflict { namespace: String, name: String },
}

impl LeaseError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            LeaseError::Api { .. } => "api",
            LeaseError::Conflict { .. } => "conflict",
        }
    }
}

/// Annotations on the Lease: the highest resource version among the Services and the pools
/// in the leader's stores, as of its last renewal.
pub const PROGRESS_ANNOTATIONS: [&str; 2] =
    ["ferrovip.io/services-heard", "ferrovip.io/pools-heard"];

/// Each progress annotation with the watch it is about.
fn progress_kinds(progress: &WriteEchoes) -> [(&'static str, &Echoes); 2] {
    [
        (PROGRESS_ANNOTATIONS[0], &progress.services),
        (PROGRESS_ANNOTATIONS[1], &progress.pools),
    ]
}

/// Which Lease, who we are, and the timing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    /// Written as `holderIdentity` (the node name in the agent).
    pub identity: String,
    /// How long a renewal holds the Lease (`leaseDurationSeconds`, rounded up to whole
    /// seconds; the leader's own fence uses the exact value).
    pub duration: Duration,
    /// How often the leader renews, and how often a contender looks.
    pub renew: Duration,
}

/// What to do with the Lease as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// There is none: create it, holding it.
    Create,
    /// Free (released) or expired: take it over (a new acquisition, transitions + 1).
    Acquire,
    /// Ours: renew it.
    Renew,
    /// Someone else holds it for `expires_in` more (by its `renewTime` and our clock).
    Wait {
        holder: String,
        expires_in: Duration,
    },
}

/// The pure decision: what `identity` does with `lease` (`None`: absent) at `now`.
pub fn decide(lease: Option<&LeaseSpec>, identity: &str, now: Timestamp) -> Step {
    let Some(spec) = lease else {
        return Step::Create;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Step::Acquire;
    }
    if holder == identity {
        return Step::Renew;
    }
    let Some(renewed) = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .map(|t| t.0)
    else {
        // Held, but never renewed: nothing says it is alive.
        return Step::Acquire;
    };
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let left = renewed
        .checked_add(duration)
        .map(|expiry| expiry.duration_since(now))
        .unwrap_or(SignedDuration::ZERO);
    if left <= SignedDuration::ZERO {
        Step::Acquire
    } else {
        Step::Wait {
            holder: holder.to_string(),
            expires_in: left.unsigned_abs(),
        }
    }
}

/// The Lease spec after `step` by `identity` at `now` (`old`: the spec read, if any). `None`
/// for [`Step::Wait`].
pub fn next_spec(
    step: &Step,
    old: Option<&LeaseSpec>,
    identity: &str,
    duration: Duration,
    now: Timestamp,
) -> Option<LeaseSpec> {
    let seconds = i32::try_from(duration.as_millis().div_ceil(1000))
        .unwrap_or(i32::MAX)
        .max(1);
    let old = old.cloned().unwrap_or_default();
    match step {
        Step::Wait { .. } => None,
        Step::Create => Some(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        }),
        Step::Acquire => Some(LeaseSpec {
            holder_identity: Some(identity.to_string()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(MicroTime(now)),
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(old.lease_transitions.unwrap_or(0).saturating_add(1)),
            ..old
        }),
        Step::Renew => Some(LeaseSpec {
            lease_duration_seconds: Some(seconds),
            renew_time: Some(MicroTime(now)),
            ..old
        }),
    }
}

/// The elector's published state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Leadership {
    /// Counts acquisitions by this process: a new term after any gap (a failed renewal ends a
    /// term even when the next renewal succeeds), so a task can tell that it must start over.
    pub term: u64,
    /// Whether we hold the Lease.
    pub leading: bool,
    /// When this term began (the acquisition, or the renewal that ended a gap).
    pub since: Option<Instant>,
    /// When our hold ends unless renewed: the start of the last successful renewal plus the
    /// lease duration. Never write at or after it.
    pub valid_until: Option<Instant>,
    /// When the last successful renewal (or acquisition) was sent.
    pub renewed_at: Option<Instant>,
    /// Who holds the Lease as last read, if not us.
    pub holder: Option<String>,
}

impl Leadership {
    /// Whether a write may be sent now under term `term`.
    pub fn may_write(&self, term: u64, now: Instant) -> bool {
        self.leading && self.term == term && self.valid_until.is_some_and(|v| now < v)
    }
}

/// A running elector: its state, a way to renew at once, and its stop.
pub struct LeaseHandle {
    pub state: watch::Receiver<Leadership>,
    renew_now: mpsc::Sender<oneshot::Sender<bool>>,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl LeaseHandle {
    /// Renews now (a compare-and-swap on the Lease); true while still leading. False when
    /// not leading or the elector is gone.
    pub async fn renew(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.renew_now.send(tx).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Releases the Lease if held (a contender takes over at once) and stops the elector.
    pub async fn release(mut self) {
        if let Some(stop) = self.stop.take() {
            let (done, wait) = oneshot::channel();
            if stop.send(done).is_ok() {
                let _ = wait.await;
            }
        }
    }
}

/// Runs the election against the API server.
pub struct Elector {
    api: Api<Lease>,
    settings: LeaseSettings,
    /// The Lease as last read or written (its resourceVersion is the next swap's condition).
    lease: Option<Lease>,
    state: watch::Sender<Leadership>,
    /// Log a holder once per change.
    logged_holder: Option<String>,
    /// The watches whose progress the Lease carries (the agent's shared stores): published
    /// while leading, expected while not.
    progress: Option<WriteEchoes>,
}

impl Elector {
    /// Starts the elector task.
    pub fn spawn(client: Client, settings: LeaseSettings) -> LeaseHandle {
        Elector::spawn_with_progress(client, settings, None)
    }

    /// [`Elector::spawn`], with the Lease carrying the progress of `progress`'s watches.
    pub fn spawn_with_progress(
        client: Client,
        settings: LeaseSettings,
        progress: Option<WriteEchoes>,
    ) -> LeaseHandle {
        let (state, rx) = watch::channel(Leadership::default());
        let (renew_now, requests) = mpsc::channel(16);
        let (stop, stopped) = oneshot::channel();
        let elector = Elector {
            api: Api::namespaced(client, &settings.namespace),
            settings,
            lease: None,
            state,
            logged_holder: None,
            progress,
        };
        tokio::spawn(elector.run(requests, stopped));
        LeaseHandle {
            state: rx,
            renew_now,
            stop: Some(stop),
        }
    }

    async fn run(
        mut self,
        mut requests: mpsc::Receiver<oneshot::Sender<bool>>,
        mut stopped: oneshot::Receiver<oneshot::Sender<()>>,
    ) {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                () = tokio::time::sleep(wait) => {
                    wait = self.round().await;
                }
                Some(reply) = requests.recv() => {
                    let leading = if self.state.borrow().leading {
                        wait = self.round().await;
                        self.state.borrow().leading
                    } else {
                        false
                    };
                    let _ = reply.send(leading);
                }
                done = &mut stopped => {
                    self.release().await;
                    if let Ok(done) = done {
                        let _ = done.send(());
                    }
                    return;
                }
            }
        }
    }

    fn error(&self, source: kube::Error) -> LeaseError {
        match source {
            kube::Error::Api(s) if s.code == 409 => LeaseError::Conflict {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
            },
            source => LeaseError::Api {
                namespace: self.settings.namespace.clone(),
                name: self.settings.name.clone(),
                source,
            },
        }
    }

    /// One round: read if needed, decide, write. Returns how long until the next round.
    async fn round(&mut self) -> Duration {
        let renew = self.settings.renew;
        // Up to two attempts: a conflict on the cached version re-reads and decides again.
        for attempt in 0..2 {
            if self.lease.is_none() || attempt > 0 {
                match self.api.get_opt(&self.settings.name).await {
                    Ok(lease) => self.lease = lease,
                    Err(e) => {
                        let e = self.error(e);
                        self.lost(&e);
                        return renew;
                    }
                }
            }
            match self.attempt().await {
                Ok(wait) => return wait,
                Err(LeaseError::Conflict { .. }) if attempt == 0 => {
                    debug!("Lease changed since last read; reading it again");
                }
                Err(e) => {
                    self.lost(&e);
                    // Read afresh next time.
                    self.lease = None;
                    return renew;
                }
            }
        }
        renew
    }

    /// Decides from the cached Lease and writes. Ok: how long until the next round.
    async fn attempt(&mut self) -> Result<Duration, LeaseError> {
        let now = Timestamp::now();
        let identity = self.settings.identity.clone();
        let spec = self.lease.as_ref().and_then(|l| l.spec.as_ref());
        let step = decide(
            self.lease
                .as_ref()
                .map(|l| l.spec.clone().unwrap_or_default())
                .as_ref(),
            &identity,
            now,
        );
        if let Step::Wait { holder, expires_in } = &step {
            self.expect_progress();
            let holder = holder.clone();
            if self.logged_holder.as_deref() != Some(holder.as_str()) {
                info!(lease = %self.settings.name, holder = %holder, "another instance leads");
                self.logged_holder = Some(holder.clone());
            }
            let was_leading = self.state.borrow().leading;
            if was_leading {
                warn!(lease = %self.settings.name, holder = %holder, "the Lease was taken over: no longer leading");
            }
            self.state.send_modify(|s| {
                s.leading = false;
                s.valid_until = None;
                s.holder = Some(holder);
            });
            // A contender reads afresh every round (the holder may release or renew).
            self.lease = None;
            // Look again at expiry, but at least every renew interval (it may be released).
            return Ok((*expires_in + Duration::from_millis(10)).min(self.settings.renew));
        }
        let new_spec = next_spec(&step, spec, &identity, self.settings.duration, now)
            .expect("every step but Wait writes");
        let sent = Instant::now();
        let written = match step {
            Step::Create => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.settings.name.clone()),
                        namespace: Some(self.settings.namespace.clone()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(new_spec),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            _ => {
                let mut lease = self.lease.clone().unwrap_or_default();
                lease.spec = Some(new_spec);
                self.publish_progress(&mut lease.metadata);
                // `replace` carries metadata.resourceVersion: the compare-and-swap.
                self.api
                    .replace(&self.settings.name, &PostParams::default(), &lease)
                    .await
            }
        };
        let lease = written.map_err(|e| self.error(e))?;
        self.lease = Some(lease);
        let valid_until = sent + self.settings.duration;
        let was_leading = self.state.borrow().leading;
        if !was_leading {
            info!(lease = %self.settings.name, identity = %identity, ?step, "leading");
            self.logged_holder = Some(identity.clone());
        }
        self.state.send_modify(|s| {
            if !was_leading {
                s.term += 1;
                s.since = Some(sent);
            }
            s.leading = true;
            s.valid_until = Some(valid_until);
            s.renewed_at = Some(sent);
            s.holder = Some(identity.clone());
        });
        Ok(self.settings.renew)
    }

    /// The leader's watches' progress, into the Lease it writes.
    fn publish_progress(&self, meta: &mut ObjectMeta) {
        let Some(progress) = &self.progress else {
            return;
        };
        let annotations = meta.annotations.get_or_insert_default();
        for (key, echoes) in progress_kinds(progress) {
            match echoes.held() {
                0 => annotations.remove(key),
                held => annotations.insert(key.to_owned(), held.to_string()),
            };
        }
    }

    /// The leader's watches' progress, as the Lease read says: this process's watches must
    /// reach it.
    fn expect_progress(&self) {
        let (Some(progress), Some(annotations)) = (
            &self.progress,
            self.lease
                .as_ref()
                .and_then(|l| l.metadata.annotations.as_ref()),
        ) else {
            return;
        };
        for (key, echoes) in progress_kinds(progress) {
            if let Some(version) = annotations.get(key).and_then(|v| v.parse().ok()) {
                echoes.expect_progress(version);
            }
        }
    }

    /// A round failed: stop leading at once (fencing), whatever the cause.
    fn lost(&mut self, e: &LeaseError) {
        let was_leading = self.state.borrow().leading;
        if was_leading {
            warn!(error = %e, "renewing the Lease failed: no longer leading");
        } else {
            debug!(error = %e, "Lease round failed");
        }
        self.state.send_modify(|s| {
            s.leading = false;
            s.valid_until = None;
        });
    }

    /// Clears `holderIdentity` if we hold the Lease (compare-and-swap), so that a contender
    /// takes over without waiting for the lease to expire.
    async fn release(&mut self) {
        let leading = self.state.borrow().leading;
        self.state.send_modify(|s| {
            s.leading = false;
            s.valid_until = None;
        });
        if !leading {
            return;
        }
        let Some(mut lease) = self.lease.clone() else {
            return;
        };
        let mut spec = lease.spec.clone().unwrap_or_default();
        if spec.holder_identity.as_deref() != Some(self.settings.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        lease.spec = Some(spec);
        match self
            .api
            .replace(&self.settings.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => info!(lease = %self.settings.name, "Lease released"),
            Err(e) => {
                warn!(error = %self.error(e), "could not release the Lease; it expires by itself")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn held(holder: Option<&str>, renewed: Option<i64>, duration: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(Into::into),
            renew_time: renewed.map(|s| MicroTime(at(s))),
            lease_duration_seconds: Some(duration),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    #[test]
    fn absent_is_created_free_is_acquired_ours_is_renewed() {
        assert_eq!(decide(None, "a", at(0)), Step::Create);
        assert_eq!(
            decide(Some(&held(None, Some(0), 10)), "a", at(1)),
            Step::Acquire
        );
        assert_eq!(
            decide(Some(&held(Some(""), Some(0), 10)), "a", at(1)),
            Step::Acquire
        );
        // Ours, even long expired (a restart with the same identity).
        assert_eq!(
            decide(Some(&held(Some("a"), Some(0), 10)), "a", at(100)),
            Step::Renew
        );
    }

    #[test]
    fn another_holder_is_waited_for_until_expiry() {
        let lease = held(Some("b"), Some(0), 10);
        assert_eq!(
            decide(Some(&lease), "a", at(4)),
            Step::Wait {
                holder: "b".into(),
                expires_in: Duration::from_secs(6)
            }
        );
        assert_eq!(decide(Some(&lease), "a", at(10)), Step::Acquire);
        assert_eq!(decide(Some(&lease), "a", at(11)), Step::Acquire);
        // Held but never renewed or acquired: nothing says it is alive.
        assert_eq!(
            decide(Some(&held(Some("b"), None, 10)), "a", at(0)),
            Step::Acquire
        );
    }

    #[test]
    fn writes_count_transitions_and_round_the_duration_up() {
        let old = held(Some("b"), Some(0), 10);
        let acquired = next_spec(
            &Step::Acquire,
            Some(&old),
            "a",
            Duration::from_millis(1500),
            at(20),
        )
        .unwrap();
        assert_eq!(acquired.holder_identity.as_deref(), Some("a"));
        assert_eq!(acquired.lease_transitions, Some(4));
        assert_eq!(acquired.lease_duration_seconds, Some(2));
        assert_eq!(acquired.acquire_time, Some(MicroTime(at(20))));
        let renewed = next_spec(
            &Step::Renew,
            Some(&acquired),
            "a",
            Duration::from_secs(10),
            at(22),
        )
        .unwrap();
        assert_eq!(renewed.acquire_time, Some(MicroTime(at(20))));
        assert_eq!(renewed.renew_time, Some(MicroTime(at(22))));
        assert_eq!(renewed.lease_transitions, Some(4));
        let created =
            next_spec(&Step::Create, None, "a", Duration::from_millis(300), at(0)).unwrap();
        assert_eq!(created.lease_duration_seconds, Some(1));
        assert_eq!(created.lease_transitions, Some(0));
        assert!(
            next_spec(
                &Step::Wait {
                    holder: "b".into(),
                    expires_in: Duration::ZERO
                },
                Some(&old),
                "a",
                Duration::from_secs(10),
                at(0)
            )
            .is_none()
        );
    }

    #[test]
    fn writes_are_fenced_by_term_and_validity() {
        let now = Instant::now();
        let state = Leadership {
            term: 2,
            leading: true,
            valid_until: Some(now + Duration::from_secs(1)),
            ..Leadership::default()
        };
        assert!(state.may_write(2, now));
        assert!(!state.may_write(1, now));
        assert!(!state.may_write(2, now + Duration::from_secs(1)));
        let lost = Leadership {
            leading: false,
            ..state
        };
        assert!(!lost.may_write(2, now));
    }
}
