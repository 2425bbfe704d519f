//! VirtualIP status and Events.
//!
//! Every node applies (server-side apply, field manager `ferrovip-<node>`) only what it knows:
//! its own `status.nodes[]` entry (a list map keyed by name), plus fields every node derives
//! identically from the same resources and wire (`master`, `state`, `virtualRouterId`,
//! `observedGeneration`, the conditions). Identical values applied by several managers are
//! co-owned, not fought over, and nothing is written while nothing changed.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::{Api, Client, Resource};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::crd::service_lb::{ANNOTATION_MASTER, allocation_record, master_value};
use crate::crd::{NodeStatus, ServiceRef, VirtualIP};
use crate::engine::{InstanceStatus, Observed};
use crate::model::{Completeness, Desired, RefusalReason, ResourcePlan};
use crate::source::reflect::WriteEchoes;
use crate::vrrp::instance::State;

/// The same Warning about the same resource is not repeated more often than this.
const EVENT_REPEAT: Duration = Duration::from_secs(600);
/// After a failed write, wait this long before trying that resource again.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// Events a node may publish in a burst, and how many more per second after it: a failover
/// of a thousand VIPs in one instance would otherwise create a thousand Events at once.
const EVENT_BURST: f64 = 20.0;
const EVENTS_PER_SECOND: f64 = 2.0;
/// Instances with more VirtualIPs than this get one summary Event per transition (about the
/// Node, naming the count) instead of one Event per VirtualIP.
const EVENT_MEMBERS: usize = 8;
/// Healthy backups of instances with more VirtualIPs than this report their entry on one
/// VirtualIP of the instance only (the first by name, [`summarized`]): with 10,000 VirtualIPs
/// on three nodes, one entry per VirtualIP per node is 30,000 writes where the masters' are
/// 10,000.
const SUMMARY_MEMBERS: usize = EVENT_MEMBERS;
/// Load-balancer Services: within this window the first [`EVENT_MEMBERS`] Services this node
/// becomes master of get a `MasterElected` Event each; the rest are counted into one Event
/// about the Node, published when the burst's annotations are written (or the window ends).
/// 10,000 Services elected at once are then a handful of Events, not 10,000 (of which the
/// rate limit published ~200 and dropped the rest unsaid).
const LB_EVENT_WINDOW: Duration = Duration::from_secs(10);
/// The summary goes out early once nothing more was elected for this long and nothing waits
/// to be written (the end of a burst); during a long burst, once per window.
const LB_SUMMARY_QUIET: Duration = Duration::from_secs(2);
/// Status writes in flight at once; in a pass with nothing more urgent than this node's
/// entries ([`WritePriority::Rest`]) while it still waits for masters' writes to show,
/// fewer, so that the masters' writes (`status.master`, `Ready`) get most of the API server
/// while many VirtualIPs settle.
const WRITES_IN_FLIGHT: usize = 8;
const REST_WRITES_IN_FLIGHT: usize = 2;
/// Status writes per pass at most; the rest wait for the next pass (20 ms later), which
/// writes from what is known by then: a VirtualIP whose state changed meanwhile is written
/// once, with the new state. The most useful writes go first ([`WritePriority`]).
const WRITES_PER_PASS: usize = 256;
/// How long a node that knows no master yet (it has just started: no advertisement heard,
/// Master_Down_Interval not over) keeps its entry to itself: what it would write ("Backup,
/// no master") is about to change, and with 10,000 VirtualIPs each such write costs 10,000.
const UNDECIDED_HOLD: Duration = Duration::from_secs(3);
/// How long a node that is not master waits for the master's write to show before it writes
/// a VirtualIP it has a master for: written after the master's, its conditions carry the
/// master's transition times instead of its own, and the two writes agree at once.
const MASTER_FIRST: Duration = Duration::from_secs(30);
/// The same for a backup that leaves its entry out ([`summarized`]): its write would only
/// repeat the master's, and while 10,000 VirtualIPs settle the master's writes take over a
/// minute (the API server takes ~150 a second here). Written after all only if the master
/// cannot write for this long (its agent cut off from the API server, say).
const MASTER_FIRST_SUMMARIZED: Duration = Duration::from_secs(300);

/// Which status writes of a pass go first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum WritePriority {
    /// This node is master and the object does not say so.
    OursToShow,
    /// The object shows no master, or another than the one this node knows.
    MasterToShow,
    /// Everything else (this node's entry, conditions, services).
    Rest,
}
/// A write the object does not reflect is repeated at most this often (longer than the
/// watch lags behind a busy API server: a shorter time repeats writes that already took).
const REWRITE_AFTER: Duration = Duration::from_secs(5);

/// Event severity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Normal,
    Warning,
}

/// Writes status and Events for one node.
pub struct StatusWriter {
    api: Api<VirtualIP>,
    client: Client,
    node: String,
    params: PatchParams,
    /// Where Events about (cluster-scoped) VirtualIPs go: `default`, or `kube-system` on API
    /// servers that accept no other (Kubernetes 1.20).
    event_namespace: &'static str,
    /// What was last applied successfully, per VirtualIP: a hash of the document (10,000
    /// documents kept whole would be tens of MB).
    written: HashMap<String, u64>,
    failed_at: HashMap<String, Instant>,
    applied_at: HashMap<String, Instant>,
    warned: HashMap<(String, String), Instant>,
    /// Token bucket for Events: (tokens, last refill), and how many were dropped.
    event_tokens: (f64, Instant),
    /// Something was left for later (a failed write, a write to repeat).
    pending: bool,
    events_dropped: u64,
    /// Per VirtualIP: the latest election of ours seen ([`InstanceStatus::elected`]), so that
    /// a mastership shorter than a pass still gets its Event.
    elected_seen: HashMap<String, u64>,
    /// Per instance with more than [`EVENT_MEMBERS`] VirtualIPs (keyed like
    /// `Observed::instances`): the same.
    group_elected_seen: HashMap<(String, crate::vocab::Family), u64>,
    outage_logged: bool,
    /// Per VirtualIP, what this node forwards for its `spec.services`.
    services: HashMap<String, String>,
    /// Per VirtualIP, when stale entries were last removed (or tried): the watch shows the
    /// removal a moment later, and a failed try waits like a failed write.
    stale_tried: HashMap<String, Instant>,
    /// Load-balancer addresses: see [`StatusWriter::reconcile_load_balancers`].
    lb: LbMasters,
    /// The last pass left writes for the next one ([`WRITES_PER_PASS`]).
    more: bool,
    /// The inputs of the last pass but the VirtualIPs themselves.
    last_inputs: Option<PassInputs>,
    /// VirtualIP → resourceVersion it had when the last pass found nothing to do for it:
    /// skipped while it and the other inputs stay the same, so a pass over 10,000 settled
    /// VirtualIPs costs 10,000 lookups instead of 10,000 status documents built and compared.
    quiet: HashMap<String, String>,
    /// VirtualIP → since when this node (not the master) waits for the master's write.
    waiting_for_master: HashMap<String, Instant>,
    /// Time this pass spent waiting for the API server's answers to its writes (since
    /// [`StatusWriter::begin_pass`]): not work of the agent's, so not paced.
    waited: Duration,
    /// Accepted writes, to be heard back through the agent's watches
    /// ([`crate::source::reflect`]).
    echoes: WriteEchoes,
}

/// What a pass reads besides the VirtualIPs.
#[derive(PartialEq)]
struct PassInputs {
    /// The plan's address: a new plan is a new `Arc`.
    desired: usize,
    observed: Observed,
    addresses: BTreeMap<IpAddr, String>,
    services: HashMap<String, String>,
    reporter: bool,
}

/// What the master of load-balancer addresses still has to write on Services.
#[derive(Default)]
struct LbMasters {
    /// Per synthetic VirtualIP (`lb/<addr>`): whether this node was master at the last look.
    was_master: HashMap<String, bool>,
    /// (Service, address) whose `ferrovip.io/master` should name this node: added on a
    /// transition to master, removed once written (or found written, or no longer master).
    pending: std::collections::BTreeSet<(ServiceRef, IpAddr)>,
    /// Per Service, when a write last failed.
    failed_at: HashMap<ServiceRef, Instant>,
    /// Per Service, since when its write waits for the controller's ingress.
    awaiting_ingress: HashMap<ServiceRef, Instant>,
    /// Token bucket of annotation writes: (tokens, last refill).
    tokens: Option<(f64, Instant)>,
    /// The current [`LB_EVENT_WINDOW`]: when it began and how many Services got an Event of
    /// their own in it.
    event_window: Option<(Instant, usize)>,
    /// Services elected beyond those, for the summary Event: (Service, addresses), and when
    /// the last one was added.
    summarized: Vec<(ServiceRef, usize)>,
    summarized_at: Option<Instant>,
}

impl StatusWriter {
    pub fn new(client: Client, node: String) -> StatusWriter {
        StatusWriter {
            api: Api::all(client.clone()),
            client,
            params: PatchParams::apply(&format!("ferrovip-{node}")).force(),
            event_namespace: "default",
            event_tokens: (EVENT_BURST, Instant::now()),
            pending: false,
            events_dropped: 0,
            node,
            written: HashMap::new(),
            failed_at: HashMap::new(),
            applied_at: HashMap::new(),
            warned: HashMap::new(),
            elected_seen: HashMap::new(),
            group_elected_seen: HashMap::new(),
            outage_logged: false,
            services: HashMap::new(),
            stale_tried: HashMap::new(),
            lb: LbMasters::default(),
            more: false,
            last_inputs: None,
            quiet: HashMap::new(),
            waiting_for_master: HashMap::new(),
            waited: Duration::ZERO,
            echoes: WriteEchoes::default(),
        }
    }

    /// Where accepted writes are reported, so that a watch that stops delivering them is
    /// started again (the agent's [`crate::source::cluster::Stores::echoes`]).
    pub fn set_echoes(&mut self, echoes: WriteEchoes) {
        self.echoes = echoes;
    }

    /// Whether the last pass left writes to retry or repeat: the periodic pass is skipped
    /// otherwise (with a thousand VIPs it is most of the agent's idle CPU).
    pub fn pending(&self) -> bool {
        self.pending
    }

    /// Whether the last pass left writes it had ready for the next pass, which should then
    /// come at once rather than on the retry tick.
    pub fn more(&self) -> bool {
        self.more
    }

    /// Starts a pass (one [`StatusWriter::reconcile`] and one
    /// [`StatusWriter::reconcile_load_balancers`]): [`StatusWriter::waited`] counts from here.
    pub fn begin_pass(&mut self) {
        self.waited = Duration::ZERO;
    }

    /// How long this pass waited for the API server to answer its status, annotation and
    /// stale-entry writes. The agent paces passes by their cost without it: pacing on the
    /// round trips held 10,000 VirtualIPs' status writes to 256 per 1.7 s (a second's pause
    /// after each pass of 256), far below what the API server takes.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// What the dataplane forwards per VirtualIP (shown in the node's status entry) from the
    /// last outcome and the planner's notes.
    pub fn set_services(
        &mut self,
        dataplane: Option<&crate::dataplane::worker::DataplaneStatus>,
        desired: &Desired,
    ) {
        self.services.clear();
        if let Some(d) = dataplane {
            for owner in d.desired_per_owner.keys() {
                if let Some(summary) = d.summary_for(owner) {
                    self.services.insert(owner.clone(), summary);
                }
            }
        }
        for (owner, notes) in &desired.service_notes {
            let line = self.services.entry(owner.clone()).or_default();
            for note in notes {
                if !line.is_empty() {
                    line.push_str("; ");
                }
                line.push_str(note);
            }
        }
    }

    /// Brings every VirtualIP's status up to date with what this node knows now.
    pub async fn reconcile(
        &mut self,
        virtual_ips: &Store<VirtualIP>,
        nodes: &Store<Node>,
        desired: &Desired,
        observed: &Observed,
    ) {
        let addresses = node_addresses(nodes);
        let reporter = reporting_node(nodes);
        let now = Instant::now();
        let inputs = PassInputs {
            desired: std::ptr::from_ref(desired) as usize,
            observed: observed.clone(),
            addresses: addresses.clone(),
            services: self.services.clone(),
            reporter: reporter.as_deref() == Some(self.node.as_str()),
        };
        if self.last_inputs.as_ref() != Some(&inputs) {
            self.quiet.clear();
            self.last_inputs = Some(inputs);
        }
        let mut by_member: HashMap<&str, Vec<&InstanceStatus>> = HashMap::new();
        // The VirtualIP of each large instance where its healthy backups list themselves.
        let mut listed_on = std::collections::HashSet::new();
        for status in observed.instances.values() {
            for member in status.members.iter() {
                by_member.entry(member.as_str()).or_default().push(status);
            }
            if status.members.len() > SUMMARY_MEMBERS
                && let Some(first) = status.members.iter().min()
            {
                listed_on.insert(first.as_str());
            }
        }
        self.group_events(desired, observed).await;
        let mut live = std::collections::HashSet::new();
        let mut writes = Vec::new();
        // VirtualIPs whose master's write this node waits for.
        let mut deferred = 0usize;
        let mut stale_removals = Vec::new();
        self.pending = false;
        for vip in virtual_ips.state() {
            let Some(name) = vip.metadata.name.clone() else {
                continue;
            };
            if vip.metadata.deletion_timestamp.is_some() {
                continue;
            }
            live.insert(name.clone());
            // Never a synthetic (load-balancer) resource: their names cannot be VirtualIP
            // names, and their status goes on the Service.
            if crate::model::lb::is_synthetic(&name) {
                continue;
            }
            let version = vip.metadata.resource_version.clone().unwrap_or_default();
            if self.quiet.get(&name) == Some(&version) {
                continue;
            }
            let Some(plan) = desired.resources.get(&name) else {
                continue;
            };
            let ours = by_member.get(name.as_str()).cloned().unwrap_or_default();

            self.events_for(
                &vip,
                &name,
                plan,
                &ours,
                reporter.as_deref() == Some(self.node.as_str()),
            )
            .await;

            // Judged only from listed Nodes: a saved snapshot does not know nodes that joined
            // since, and their entries are not stale.
            if desired.completeness == Completeness::Complete
                && ours.iter().any(|s| s.state == State::Master)
                && self
                    .stale_tried
                    .get(&name)
                    .is_none_or(|t| now.duration_since(*t) >= RETRY_AFTER)
            {
                let stale = stale_entries(&vip, plan, &self.node);
                if !stale.is_empty() {
                    stale_removals.push((name.clone(), stale));
                }
            }

            let services = self.services.get(&name).map(String::as_str);
            let listed_here = listed_on.contains(name.as_str());
            let (body, summary) = applied_status(
                &vip,
                &self.node,
                plan,
                &ours,
                &addresses,
                services,
                listed_here,
            );
            let unchanged = self.written.get(&name) == Some(&body_hash(&body));
            // A summarized backup writes only what the object does not show yet (its old
            // entry to drop, or the master's view before the master's write shows).
            if (unchanged || summary) && reflected(&vip, &body, &self.node) {
                self.waiting_for_master.remove(&name);
                if plan.refused.is_none() && plan.refused_instances.is_empty() {
                    self.quiet.insert(name, version);
                }
                continue;
            }
            let shown = vip.status.as_ref().and_then(|s| s.master.as_deref());
            let master = body["status"]["master"].as_str();
            if plan.refused.is_none() {
                // Just started, no master heard of yet: what this node would write is about
                // to change.
                let undecided = !ours.is_empty()
                    && master.is_none()
                    && ours.iter().all(|s| s.fault.is_none())
                    && ours.iter().map(|s| s.since).max().is_some_and(|t| {
                        SystemTime::now().duration_since(t).unwrap_or_default() < UNDECIDED_HOLD
                    });
                if undecided {
                    self.pending = true;
                    continue;
                }
                // Another node is master: its write first.
                if let Some(m) = master
                    && m != self.node
                    && shown != Some(m)
                {
                    let since = *self.waiting_for_master.entry(name.clone()).or_insert(now);
                    let wait = if summary {
                        MASTER_FIRST_SUMMARIZED
                    } else {
                        MASTER_FIRST
                    };
                    if now.duration_since(since) < wait {
                        deferred += 1;
                        self.pending = true;
                        continue;
                    }
                }
            }
            let priority = match master {
                Some(m) if m == self.node && shown != Some(m) => WritePriority::OursToShow,
                Some(m) if shown != Some(m) => WritePriority::MasterToShow,
                _ => WritePriority::Rest,
            };
            // Written, but the object does not show it (another node's apply removed what we
            // co-owned, say): write again, though not more often than once a second.
            if unchanged
                && self
                    .applied_at
                    .get(&name)
                    .is_some_and(|t| now.duration_since(*t) < REWRITE_AFTER)
            {
                self.pending = true;
                continue;
            }
            if self
                .failed_at
                .get(&name)
                .is_some_and(|t| now.duration_since(*t) < RETRY_AFTER)
            {
                self.pending = true;
                continue;
            }
            writes.push((priority, name, body));
        }
        writes.sort_by_key(|(priority, ..)| *priority);
        self.more = writes.len() > WRITES_PER_PASS;
        if self.more {
            writes.truncate(WRITES_PER_PASS);
            self.pending = true;
        }

        // Writes go out a few at a time: after a failover of a thousand VIPs, one at a time
        // would take the API server's round trip a thousand times.
        // Slow only while masters' writes are still to come (this node waits for some).
        let in_flight = if deferred == 0 || writes.iter().any(|(p, ..)| *p != WritePriority::Rest) {
            WRITES_IN_FLIGHT
        } else {
            REST_WRITES_IN_FLIGHT
        };
        let api = &self.api;
        let params = &self.params;
        let echoes = &self.echoes.virtual_ips;
        let writing = Instant::now();
        let results: Vec<_> = futures::stream::iter(writes)
            .map(|(_, name, body)| async move {
                let result = api
                    .patch_status(&name, params, &Patch::Apply(&body))
                    .await
                    // Keep only the outcome: holding a thousand returned objects at once would
                    // set the agent's memory high-water mark.
                    .map(|vip| echoes.expect(&vip.metadata));
                (name, body, result)
            })
            .buffer_unordered(in_flight)
            .collect()
            .await;
        self.waited += writing.elapsed();
        for (name, body, result) in results {
            match result {
                Ok(_) => {
                    debug!(vip = %name, "status applied");
                    if self.outage_logged {
                        info!("status writes succeed again");
                        self.outage_logged = false;
                    }
                    self.failed_at.remove(&name);
                    self.waiting_for_master.remove(&name);
                    self.applied_at.insert(name.clone(), now);
                    self.written.insert(name, body_hash(&body));
                }
                // Deleted meanwhile (10,000 VirtualIPs deleted at once): nothing to retry,
                // and no outage to report.
                Err(kube::Error::Api(s)) if s.code == 404 => {
                    debug!(vip = %name, "status not written: the VirtualIP is gone");
                    self.failed_at.insert(name, now);
                }
                Err(e) => {
                    // The first failure after a success is a warning; repeats while the API
                    // server stays away are debug noise.
                    if !self.outage_logged {
                        warn!(vip = %name, error = %e, "cannot write VirtualIP status; retrying (VRRP is not affected)");
                        self.outage_logged = true;
                    } else {
                        debug!(vip = %name, error = %e, "status write failed again");
                    }
                    self.failed_at.insert(name, now);
                    self.pending = true;
                }
            }
        }
        let removing = Instant::now();
        for (name, stale) in stale_removals {
            self.stale_tried.insert(name.clone(), now);
            self.remove_stale_entries(&name, &stale).await;
        }
        self.waited += removing.elapsed();
        self.stale_tried.retain(|k, _| live.contains(k));
        self.written.retain(|k, _| live.contains(k));
        self.failed_at.retain(|k, _| live.contains(k));
        self.applied_at.retain(|k, _| live.contains(k));
        self.elected_seen.retain(|k, _| live.contains(k));
        self.quiet.retain(|k, _| live.contains(k));
        self.waiting_for_master.retain(|k, _| live.contains(k));
    }

    /// Removes other nodes' entries from `status.nodes[]`: the only code path that touches
    /// another node's entry. Only the master of the VirtualIP calls it, for entries of nodes
    /// that are gone or no longer eligible ([`stale_entries`]).
    ///
    /// Server-side apply lets a manager drop only its own fields, so this is a JSON patch on
    /// the status subresource (the `patch` verb the agent already has): a `test` of each
    /// entry's name at its index, then the removals from the back. If the list changed
    /// meanwhile, a test fails, nothing is removed (422), and the next pass tries again on
    /// what the watch shows. Unlike applying an empty status under the dead node's manager
    /// name, it removes exactly the entry, never the co-owned fields that node also applied,
    /// and no agent ever writes under another node's identity.
    async fn remove_stale_entries(&mut self, vip: &str, stale: &[(usize, String)]) {
        let mut ops: Vec<serde_json::Value> = stale
            .iter()
            .map(|(i, node)| json!({"op": "test", "path": format!("/status/nodes/{i}/name"), "value": node}))
            .collect();
        let mut indices: Vec<usize> = stale.iter().map(|(i, _)| *i).collect();
        indices.sort_unstable_by(|a, b| b.cmp(a));
        ops.extend(
            indices
                .iter()
                .map(|i| json!({"op": "remove", "path": format!("/status/nodes/{i}")})),
        );
        let patch = match serde_json::from_value(serde_json::Value::Array(ops)) {
            Ok(p) => Patch::Json::<()>(p),
            Err(e) => {
                warn!(vip, error = %e, "cannot build the patch that removes stale status entries");
                return;
            }
        };
        let nodes: Vec<&str> = stale.iter().map(|(_, n)| n.as_str()).collect();
        match self
            .api
            .patch_status(vip, &PatchParams::default(), &patch)
            .await
        {
            Ok(written) => {
                self.echoes.virtual_ips.expect(&written.metadata);
                info!(vip, nodes = ?nodes, "removed the status entries of nodes that left or are no longer eligible")
            }
            Err(e) => {
                debug!(vip, nodes = ?nodes, error = %e, "stale status entries not removed this time")
            }
        }
    }

    async fn events_for(
        &mut self,
        vip: &VirtualIP,
        name: &str,
        plan: &ResourcePlan,
        ours: &[&InstanceStatus],
        reporter: bool,
    ) {
        let elected = ours.iter().map(|s| s.elected).max().unwrap_or(0);
        let seen = self.elected_seen.entry(name.to_string()).or_insert(0);
        let new_election = elected > *seen;
        *seen = (*seen).max(elected);
        // A member of a large instance: its Event is the instance's summary.
        let grouped = ours.iter().any(|s| s.members.len() > EVENT_MEMBERS);
        if new_election && !grouped {
            let priority = plan.priority.unwrap_or(0);
            let note = match ours.iter().find(|s| s.state == State::Master) {
                Some(s) => format!(
                    "{} is master (priority {priority}): {}",
                    self.node, s.reason
                ),
                // Master for less than a pass: said all the same, with where it went since.
                None => format!(
                    "{} became master (priority {priority}) and is {} again: {}",
                    self.node,
                    state_name(ours),
                    ours.first().map(|s| s.reason.as_str()).unwrap_or_default()
                ),
            };
            self.publish(vip, EventType::Normal, "MasterElected", "Elect", note)
                .await;
        }
        // A refused instance (one family) is reported like a refused resource.
        let refusals = plan.refused.iter().chain(&plan.refused_instances);
        for reason in refusals.filter(|_| reporter) {
            let (event_reason, action) = match reason {
                r if r.is_conflict() => ("Conflict", "Refuse"),
                RefusalReason::NoUnicastPeers { .. } => ("NoUnicastPeers", "Refuse"),
                _ => ("Invalid", "Validate"),
            };
            let note = reason.to_string();
            let key = (name.to_string(), note.clone());
            let now = Instant::now();
            if self
                .warned
                .get(&key)
                .is_none_or(|t| now.duration_since(*t) >= EVENT_REPEAT)
            {
                // Remembered only once published, so a rate-limited warning comes later.
                if self
                    .publish(vip, EventType::Warning, event_reason, action, note)
                    .await
                {
                    self.warned.insert(key, now);
                }
            }
        }
    }

    /// One `MasterElected` Event about this node's Node per transition to master of an
    /// instance with more than [`EVENT_MEMBERS`] VirtualIPs, naming how many VirtualIPs and
    /// addresses it holds: a failover of 10,000 VirtualIPs is one Event, not 10,000 (of
    /// which the rate limit would publish a few dozen). Every VirtualIP's status still
    /// shows its master.
    async fn group_events(&mut self, desired: &Desired, observed: &Observed) {
        let mut elected = Vec::new();
        for (key, s) in &observed.instances {
            if s.members.len() <= EVENT_MEMBERS {
                continue;
            }
            let seen = self.group_elected_seen.entry(key.clone()).or_insert(0);
            let new_election = s.elected > *seen;
            *seen = (*seen).max(s.elected);
            if new_election {
                let addresses = desired
                    .instances
                    .get(&s.interface)
                    .and_then(|m| {
                        m.get(&crate::model::InstanceKey {
                            family: key.1,
                            vrid: s.vrid,
                        })
                    })
                    .map_or(0, |i| i.addresses.len());
                let is = if s.state == State::Master {
                    "is master"
                } else {
                    "became master (and is no longer)"
                };
                elected.push(format!(
                    "{} {is} of {} VirtualIPs ({} addresses) on {} {} VRID {} (priority {}), {} and others: {}",
                    self.node,
                    s.members.len(),
                    addresses,
                    s.interface,
                    key.1,
                    s.vrid,
                    s.priority,
                    s.members.first().map(String::as_str).unwrap_or_default(),
                    s.reason
                ));
            }
        }
        self.group_elected_seen
            .retain(|k, _| observed.instances.contains_key(k));
        for note in elected {
            self.node_master_elected(note).await;
        }
    }

    /// A `MasterElected` Event about this node's Node (the summaries of big groups).
    async fn node_master_elected(&mut self, note: String) {
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Node".into()),
            name: Some(self.node.clone()),
            ..Default::default()
        };
        let node = self.node.clone();
        self.publish_about(
            regarding,
            &node,
            None,
            EventType::Normal,
            "MasterElected",
            "Elect",
            note,
        )
        .await;
    }

    async fn publish(
        &mut self,
        vip: &VirtualIP,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> bool {
        let name = vip.metadata.name.clone().unwrap_or_default();
        self.publish_about(
            vip.object_ref(&()),
            &name,
            None,
            type_,
            reason,
            action,
            note,
        )
        .await
    }

    /// An Event about any object: in `namespace` (a namespaced object's own), or for a
    /// cluster-scoped one in `default` (`kube-system` on servers that take no other).
    #[allow(clippy::too_many_arguments)]
    async fn publish_about(
        &mut self,
        regarding: k8s_openapi::api::core::v1::ObjectReference,
        name: &str,
        namespace: Option<&str>,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) -> bool {
        let (tokens, refilled) = self.event_tokens;
        let elapsed = refilled.elapsed().as_secs_f64();
        let tokens = (tokens + elapsed * EVENTS_PER_SECOND).min(EVENT_BURST);
        if tokens < 1.0 {
            self.event_tokens = (tokens, Instant::now());
            self.events_dropped += 1;
            if self.events_dropped.is_power_of_two() {
                info!(
                    dropped = self.events_dropped,
                    "Events rate-limited; status still shows every change"
                );
            }
            return false;
        }
        self.event_tokens = (tokens - 1.0, Instant::now());
        let now = Timestamp::now();
        let event = |namespace: &str| K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.to_string()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(action.into()),
            reason: Some(reason.into()),
            note: Some(truncate(note.clone(), 1024)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("ferrovip.io/agent".into()),
            reporting_instance: Some(self.node.clone()),
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            ..K8sEvent::default()
        };
        loop {
            let ns = namespace.unwrap_or(self.event_namespace);
            let api: Api<K8sEvent> = Api::namespaced(self.client.clone(), ns);
            match api.create(&PostParams::default(), &event(ns)).await {
                Ok(_) => return true,
                Err(kube::Error::Api(status))
                    if status.code == 422
                        && namespace.is_none()
                        && self.event_namespace == "default" =>
                {
                    info!(
                        "this API server takes Events about cluster-scoped objects only in kube-system; using it"
                    );
                    self.event_namespace = "kube-system";
                }
                Err(e) => {
                    debug!(error = %e, reason, "event not published");
                    return false;
                }
            }
        }
    }
}

/// The entries of `status.nodes[]` (index, node) that the master removes: those of nodes
/// that may not hold the addresses (deleted Node objects, node selector, exclusion label).
/// Not those of Nodes that are merely not Ready: their agent may still run and would put its
/// entry back; without a heartbeat of each agent (a Lease) that is not known.
fn stale_entries(vip: &VirtualIP, plan: &ResourcePlan, node: &str) -> Vec<(usize, String)> {
    if plan.refused.is_some() {
        return Vec::new();
    }
    vip.status
        .iter()
        .flat_map(|s| s.nodes.iter().enumerate())
        .filter(|(_, e)| e.name != node && !plan.eligible_nodes.contains(&e.name))
        .map(|(i, e)| (i, e.name.clone()))
        .collect()
}

/// Whether this node leaves its entry out of a VirtualIP's `status.nodes[]`: it is a healthy
/// backup (no fault, a master known) of instances of more than [`SUMMARY_MEMBERS`]
/// VirtualIPs each, the VirtualIP has no `spec.services` (whose per-node line says what this
/// node forwards) and is not where its instances' backups list themselves (`listed_on`, the
/// first member by name). Faults, refusals, a master and nodes just starting are always
/// written where they apply. The cluster-wide fields (`master`, `state`, conditions) are the
/// master's: the same as this node would write, so nothing is written once the master's
/// write shows.
fn summarized(
    plan: &ResourcePlan,
    ours: &[&InstanceStatus],
    services: Option<&str>,
    listed_on: bool,
) -> bool {
    plan.refused.is_none()
        && plan.eligible
        && services.is_none()
        && !listed_on
        && !ours.is_empty()
        && ours.iter().all(|s| {
            s.state == State::Backup
                && s.fault.is_none()
                && s.master.is_some()
                && s.members.len() > SUMMARY_MEMBERS
        })
}

/// What this node applies for one VirtualIP ([`desired_status`], without its entry where it
/// is [`summarized`]), and whether it is summarized.
fn applied_status(
    vip: &VirtualIP,
    node: &str,
    plan: &ResourcePlan,
    ours: &[&InstanceStatus],
    addresses: &BTreeMap<IpAddr, String>,
    services: Option<&str>,
    listed_on: bool,
) -> (serde_json::Value, bool) {
    let mut body = desired_status(vip, node, plan, ours, addresses, services);
    let summary = summarized(plan, ours, services, listed_on);
    if summary && let Some(status) = body["status"].as_object_mut() {
        status.remove("nodes");
    }
    (body, summary)
}

/// Whether the object shows what `body` applies: our node entry (or its absence), the
/// cluster-wide fields and the conditions we set.
fn reflected(vip: &VirtualIP, body: &serde_json::Value, node: &str) -> bool {
    let Ok(current) = serde_json::to_value(vip.status.clone().unwrap_or_default()) else {
        return false;
    };
    let Some(wanted) = body["status"].as_object() else {
        return true;
    };
    for key in ["master", "state", "virtualRouterId", "observedGeneration"] {
        if let Some(v) = wanted.get(key)
            && current.get(key) != Some(v)
        {
            return false;
        }
    }
    let entries = |v: &serde_json::Value| {
        v.get("nodes")
            .and_then(|n| n.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let ours = entries(&body["status"]);
    let theirs = entries(&current);
    match ours.first() {
        Some(entry) => {
            if !theirs.contains(entry) {
                return false;
            }
        }
        None => {
            if theirs.iter().any(|e| e["name"] == node) {
                return false;
            }
        }
    }
    let conditions = current
        .get("conditions")
        .and_then(|c| c.as_array())
        .cloned()
        .unwrap_or_default();
    wanted
        .get("conditions")
        .and_then(|c| c.as_array())
        .into_iter()
        .flatten()
        .all(|w| {
            conditions.iter().any(|c| {
                ["type", "status", "reason", "message"]
                    .iter()
                    .all(|k| c.get(k) == w.get(k))
            })
        })
}

fn body_hash(body: &serde_json::Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    body.to_string().hash(&mut h);
    h.finish()
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// InternalIP address → node name.
fn node_addresses(nodes: &Store<Node>) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for n in nodes.state() {
        let Some(name) = n.metadata.name.clone() else {
            continue;
        };
        for ip in crate::source::cluster::node_facts(&n).internal_ips {
            out.insert(ip, name.clone());
        }
    }
    out
}

/// The node that publishes cluster-level Warnings (refused resources): the first Ready node by
/// name, so that exactly one node reports them without coordination.
fn reporting_node(nodes: &Store<Node>) -> Option<String> {
    nodes
        .state()
        .iter()
        .filter(|n| crate::source::cluster::node_facts(n).ready == Some(true))
        .filter_map(|n| n.metadata.name.clone())
        .min()
}

fn state_name(ours: &[&InstanceStatus]) -> &'static str {
    if ours.iter().any(|s| s.fault.is_some()) {
        "Fault"
    } else if ours.iter().any(|s| s.state == State::Master) {
        "Master"
    } else if ours.iter().any(|s| s.state == State::Backup) {
        "Backup"
    } else {
        "Initialize"
    }
}

fn rfc3339(t: SystemTime) -> String {
    Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// The status this node applies for one VirtualIP (apiVersion/kind/name included).
pub fn desired_status(
    vip: &VirtualIP,
    node: &str,
    plan: &ResourcePlan,
    ours: &[&InstanceStatus],
    addresses: &BTreeMap<IpAddr, String>,
    services: Option<&str>,
) -> serde_json::Value {
    let name = vip.metadata.name.clone().unwrap_or_default();
    let mut status = serde_json::Map::new();
    status.insert("observedGeneration".into(), json!(vip.metadata.generation));
    if let Some(vrid) = plan.vrid {
        status.insert("virtualRouterId".into(), json!(vrid));
    }
    let previous = vip
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();

    let (state, conditions) = match &plan.refused {
        Some(reason) => {
            let (summary, ready_reason, conflict) = match reason {
                r if r.is_conflict() => ("Conflict", "Conflict", Some(conflict_reason(r))),
                RefusalReason::NoUnicastPeers { .. } => ("Invalid", "NoUnicastPeers", None),
                _ => ("Invalid", "Invalid", None),
            };
            let message = reason.to_string();
            let mut conds = vec![condition(previous, "Ready", false, ready_reason, &message)];
            conds.push(match conflict {
                Some(r) => condition(previous, "Conflict", true, r, &message),
                None => condition(previous, "Conflict", false, "NoConflict", ""),
            });
            (Some(summary), conds)
        }
        None => {
            let master = ours.iter().find_map(|s| {
                if s.state == State::Master {
                    Some(node.to_string())
                } else {
                    s.master.map(|ip| {
                        addresses
                            .get(&ip)
                            .cloned()
                            .unwrap_or_else(|| ip.to_string())
                    })
                }
            });
            // No eligible node is Ready: every agent that runs says so alike (derived from
            // the Node objects only, so eligible and ineligible nodes never disagree), also
            // when no agent is eligible at all.
            let unready = (!plan.eligible_ready).then(|| no_eligible_node(plan));
            if !plan.eligible {
                // This node has no view of the election: it writes nothing but the fields
                // derived from the resource, and drops its node entry.
                let mut status = json!({"observedGeneration": vip.metadata.generation, "virtualRouterId": plan.vrid});
                if let Some(message) = &unready {
                    status["state"] = json!("NoMaster");
                    status["conditions"] = json!([
                        condition(previous, "Ready", false, "NoEligibleNode", message),
                        condition(previous, "Conflict", false, "NoConflict", ""),
                    ]);
                }
                let body = json!({
                    "apiVersion": "ferrovip.io/v1alpha1",
                    "kind": "VirtualIP",
                    "metadata": {"name": name},
                    "status": status,
                });
                return body;
            }
            let faults: Vec<String> = ours.iter().filter_map(|s| s.fault.clone()).collect();
            let mut conds = Vec::new();
            if let Some(message) = &unready {
                // Possibly still held (by a node whose kubelet is down), but not Ready.
                if let Some(m) = &master {
                    status.insert("master".into(), json!(m));
                }
                conds.push(condition(
                    previous,
                    "Ready",
                    false,
                    "NoEligibleNode",
                    message,
                ));
                conds.push(condition(previous, "Conflict", false, "NoConflict", ""));
            // Cluster-wide fields come only from a node that knows the master: a node that
            // has just started (or lost track) would otherwise overwrite the others' view
            // with "no master" until it hears the first advertisement.
            } else if let Some(m) = &master {
                status.insert("master".into(), json!(m));
                conds.push(condition(
                    previous,
                    "Ready",
                    true,
                    "MasterElected",
                    &format!("{m} holds the addresses"),
                ));
                conds.push(condition(previous, "Conflict", false, "NoConflict", ""));
            }
            // Refused instances (one family) are the cluster's verdict, the same on every
            // node, so a condition they co-own; a node's faults go in its own entry.
            if !plan.refused_instances.is_empty() {
                let why: Vec<String> = plan
                    .refused_instances
                    .iter()
                    .map(|r| r.to_string())
                    .collect();
                conds.push(condition(
                    previous,
                    "Degraded",
                    true,
                    "NoUnicastPeers",
                    &why.join("; "),
                ));
            }
            let since = ours.iter().map(|s| s.since).max();
            let entry = NodeStatus {
                name: node.to_string(),
                state: state_name(ours).to_string(),
                priority: i64::from(plan.priority.unwrap_or(0)),
                reasons: plan.priority_reasons.clone(),
                last_transition_time: since.map(rfc3339),
                services: services.map(str::to_string),
                fault: (!faults.is_empty()).then(|| faults.join("; ")),
            };
            status.insert("nodes".into(), json!([entry]));
            let state = if unready.is_some() {
                Some("NoMaster")
            } else {
                master.is_some().then_some("Active")
            };
            (state, conds)
        }
    };
    if let Some(state) = state {
        status.insert("state".into(), json!(state));
    }
    if !conditions.is_empty() {
        status.insert("conditions".into(), json!(conditions));
    }
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": name},
        "status": status,
    })
}

/// The message of `Ready=False` when no eligible node is Ready (identical on every node).
fn no_eligible_node(plan: &ResourcePlan) -> String {
    const NAMED: usize = 5;
    if plan.eligible_nodes.is_empty() {
        return "no node may hold the addresses: none matches spec.nodeSelector without the \
                exclusion label"
            .into();
    }
    let names: Vec<&str> = plan
        .eligible_nodes
        .iter()
        .take(NAMED)
        .map(String::as_str)
        .collect();
    let more = plan.eligible_nodes.len().saturating_sub(NAMED);
    let more = if more > 0 {
        format!(" and {more} more")
    } else {
        String::new()
    };
    format!(
        "none of the nodes that may hold the addresses is Ready: {}{more}",
        names.join(", ")
    )
}

fn conflict_reason(r: &RefusalReason) -> &'static str {
    match r {
        RefusalReason::DuplicateVrid { .. } => "DuplicateVirtualRouterId",
        RefusalReason::DuplicateAddress { .. } => "DuplicateAddress",
        _ => "NoFreeVirtualRouterId",
    }
}

/// A condition, keeping the previous transition time when nothing about it changed (so that
/// every node applies the identical value).
fn condition(
    previous: &[Condition],
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
) -> Condition {
    let status = if status { "True" } else { "False" };
    let kept = previous
        .iter()
        .find(|c| {
            c.type_ == type_ && c.status == status && c.reason == reason && c.message == message
        })
        .map(|c| c.last_transition_time.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: None,
        last_transition_time: kept.unwrap_or_else(|| Time(Timestamp::now())),
    }
}

/// Annotation writes on Services a node may make in a burst, and how many more per second
/// after it: a failover of 10,000 Services' addresses takes the API server ~40 s of writes
/// at most 8 in flight, beside its other clients, rather than as fast as it answers (the
/// VirtualIP status writer's pace, ~360/s here). It was 50 then 20/s: 8 minutes for 10,000.
const ANNOTATION_BURST: f64 = 256.0;
const ANNOTATIONS_PER_SECOND: f64 = 250.0;
/// How long the master annotation waits for the controller's ingress before it is written
/// anyway.
const INGRESS_WAIT: Duration = Duration::from_secs(2);

impl StatusWriter {
    /// Load-balancer addresses: the node that became master of an address writes
    /// `ferrovip.io/master: <addr>=<node>` on each of its Services (a merge patch of that one
    /// annotation, guarded by the Service's resourceVersion) and a `MasterElected` Event in
    /// the Service's namespace. Only on a transition to master, and not when the annotation
    /// already says so (an agent restarted while master writes nothing); nothing at steady
    /// state. Writes are rate-limited (a token bucket) and a few in flight at once; what is
    /// left waits for the next pass ([`StatusWriter::pending`]).
    pub async fn reconcile_load_balancers(
        &mut self,
        services: &Store<k8s_openapi::api::core::v1::Service>,
        desired: &Desired,
        observed: &Observed,
    ) {
        let mut master_of: HashMap<&str, bool> = HashMap::new();
        for status in observed.instances.values() {
            if status.state == State::Master {
                for member in status.members.iter() {
                    master_of.insert(member.as_str(), true);
                }
            }
        }
        let lb = &mut self.lb;
        for (name, plan) in &desired.load_balancers {
            let now = master_of.contains_key(name.as_str())
                && desired
                    .resources
                    .get(name)
                    .is_some_and(|r| r.refused.is_none());
            let was = lb.was_master.insert(name.clone(), now).unwrap_or(false);
            if now && !was {
                for svc in &plan.services {
                    lb.pending.insert((svc.clone(), plan.address));
                }
            } else if !now {
                lb.pending.retain(|(_, a)| *a != plan.address);
            }
        }
        lb.was_master
            .retain(|name, _| desired.load_balancers.contains_key(name));
        let live: std::collections::HashSet<IpAddr> =
            desired.load_balancers.values().map(|p| p.address).collect();
        lb.pending.retain(|(_, a)| live.contains(a));
        if lb.pending.is_empty() {
            self.lb_summary_event(Instant::now()).await;
            return;
        }

        // Per Service: the new annotation value, or nothing to write.
        let now = Instant::now();
        let mut by_service: BTreeMap<ServiceRef, Vec<IpAddr>> = BTreeMap::new();
        for (svc, addr) in &lb.pending {
            by_service.entry(svc.clone()).or_default().push(*addr);
        }
        let (mut tokens, refilled) = lb.tokens.unwrap_or((ANNOTATION_BURST, now));
        tokens = (tokens + now.duration_since(refilled).as_secs_f64() * ANNOTATIONS_PER_SECOND)
            .min(ANNOTATION_BURST);
        let mut writes = Vec::new();
        for (svc, addrs) in by_service {
            let key = kube::runtime::reflector::ObjectRef::new(&svc.name).within(&svc.namespace);
            let Some(object) = services.get(&key) else {
                lb.pending.retain(|(s, _)| *s != svc);
                continue;
            };
            let record = allocation_record(&object)
                .and_then(Result::ok)
                .unwrap_or_default();
            let current = master_value(&object);
            let Some(value) = master_annotation(current, &record, &addrs, &self.node) else {
                // Already says so (or the addresses left the record): nothing to write.
                lb.pending.retain(|(s, _)| *s != svc);
                continue;
            };
            // After the controller's status write, not beside it: both carry the Service's
            // resourceVersion, so writing as soon as the record shows would make one of the
            // two fail with 409 nearly every time (measured with 10,000 Services: most
            // writes conflicted and the allocation crawled at ~7 Services/s). The change
            // that brings the ingress wakes the next pass; without a controller writing
            // status (none leads, or records written by hand) it goes after INGRESS_WAIT.
            if !ingress_lists(&object, &addrs) {
                let since = *lb.awaiting_ingress.entry(svc.clone()).or_insert(now);
                if now.duration_since(since) < INGRESS_WAIT {
                    continue;
                }
            }
            if lb
                .failed_at
                .get(&svc)
                .is_some_and(|t| now.duration_since(*t) < RETRY_AFTER)
            {
                continue;
            }
            if tokens < 1.0 {
                break;
            }
            tokens -= 1.0;
            let patch = json!({"metadata": {
                "resourceVersion": object.metadata.resource_version,
                "annotations": {ANNOTATION_MASTER: value},
            }});
            writes.push((svc, addrs, patch, object.object_ref(&())));
        }
        lb.tokens = Some((tokens, now));
        let client = &self.client;
        let echoes = &self.echoes.services;
        let writing = Instant::now();
        let results: Vec<_> = futures::stream::iter(writes)
            .map(|(svc, addrs, patch, regarding)| async move {
                let api: Api<k8s_openapi::api::core::v1::Service> =
                    Api::namespaced(client.clone(), &svc.namespace);
                let result = api
                    .patch(&svc.name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|written| echoes.expect(&written.metadata));
                (svc, addrs, regarding, result)
            })
            .buffer_unordered(WRITES_IN_FLIGHT)
            .collect()
            .await;
        self.waited += writing.elapsed();
        let mut elected = Vec::new();
        for (svc, addrs, regarding, result) in results {
            match result {
                Ok(()) => {
                    debug!(service = %format!("{}/{}", svc.namespace, svc.name), "master annotation written");
                    self.lb.failed_at.remove(&svc);
                    self.lb
                        .pending
                        .retain(|(s, a)| !(*s == svc && addrs.contains(a)));
                    elected.push((svc, addrs, regarding));
                }
                // Changed meanwhile (409): the watch brings the new version, the next pass
                // decides again on it.
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(e) => {
                    debug!(service = %format!("{}/{}", svc.namespace, svc.name), error = %e, "cannot write the master annotation; retrying");
                    self.lb.failed_at.insert(svc, now);
                }
            }
        }
        for (svc, addrs, regarding) in elected {
            let (since, own) = match self.lb.event_window {
                Some((since, own)) if now.duration_since(since) < LB_EVENT_WINDOW => (since, own),
                _ => (now, 0),
            };
            if own >= EVENT_MEMBERS {
                self.lb.event_window = Some((since, own));
                self.lb.summarized.push((svc, addrs.len()));
                self.lb.summarized_at = Some(now);
                continue;
            }
            self.lb.event_window = Some((since, own + 1));
            let list: Vec<String> = addrs.iter().map(IpAddr::to_string).collect();
            let note = format!("{} holds {}", self.node, list.join(", "));
            self.publish_about(
                regarding,
                &svc.name,
                Some(&svc.namespace),
                EventType::Normal,
                "MasterElected",
                "Elect",
                note,
            )
            .await;
        }
        let waiting: std::collections::HashSet<&ServiceRef> =
            self.lb.pending.iter().map(|(s, _)| s).collect();
        self.lb.failed_at.retain(|svc, _| waiting.contains(svc));
        self.lb
            .awaiting_ingress
            .retain(|svc, _| waiting.contains(svc));
        self.lb_summary_event(now).await;
        if !self.lb.pending.is_empty() {
            self.pending = true;
        }
    }

    /// The summary `MasterElected` Event of the Services beyond [`EVENT_MEMBERS`] in the
    /// window, once their burst is over (nothing pending, nothing more elected for
    /// [`LB_SUMMARY_QUIET`]) or the window is; until then another round is asked for. (Sent
    /// whenever nothing was pending, it went out on nearly every round of a burst that
    /// trickles in, ~200 with 10,000 Services.)
    async fn lb_summary_event(&mut self, now: Instant) {
        let window_over = self
            .lb
            .event_window
            .is_none_or(|(since, _)| now.duration_since(since) >= LB_EVENT_WINDOW);
        let quiet = self
            .lb
            .summarized_at
            .is_none_or(|at| now.duration_since(at) >= LB_SUMMARY_QUIET);
        if self.lb.summarized.is_empty() || !(window_over || (self.lb.pending.is_empty() && quiet))
        {
            if !self.lb.summarized.is_empty() {
                self.pending = true;
            }
            return;
        }
        let summarized = std::mem::take(&mut self.lb.summarized);
        let note = lb_summary_note(&self.node, &summarized);
        self.node_master_elected(note).await;
    }
}

/// The summary Event's note: how many Services (and addresses) beyond those with an Event of
/// their own, naming the first few.
fn lb_summary_note(node: &str, summarized: &[(ServiceRef, usize)]) -> String {
    let addresses: usize = summarized.iter().map(|(_, n)| n).sum();
    let named: Vec<String> = summarized
        .iter()
        .take(SUMMARY_MEMBERS)
        .map(|(svc, _)| format!("{}/{}", svc.namespace, svc.name))
        .collect();
    let others = summarized.len() - named.len();
    let more = if others > 0 {
        format!(" and {others} others")
    } else {
        String::new()
    };
    format!(
        "{node} holds the addresses of {} more Services ({addresses} addresses): {}{more}; each one's ferrovip.io/master annotation names its master",
        summarized.len(),
        named.join(", ")
    )
}

/// Whether `status.loadBalancer.ingress` lists every one of `addrs` (the controller's status
/// write for them is done).
fn ingress_lists(svc: &k8s_openapi::api::core::v1::Service, addrs: &[IpAddr]) -> bool {
    let listed: Vec<IpAddr> = crate::crd::service_lb::ingress_ips(svc).collect();
    addrs.iter().all(|addr| listed.contains(addr))
}

/// The new `ferrovip.io/master` value when this node (`node`) became master of `ours`, or
/// `None` when the current value says so already. Entries of addresses no longer in the
/// record are dropped; those of the record's other addresses are kept (their masters write
/// them); IPv4 first.
pub fn master_annotation(
    current: Option<&str>,
    record: &BTreeMap<IpAddr, String>,
    ours: &[IpAddr],
    node: &str,
) -> Option<String> {
    let mut entries = crate::crd::service_lb::parse_master(current.unwrap_or_default());
    let ours: Vec<IpAddr> = ours
        .iter()
        .filter(|a| record.contains_key(a))
        .copied()
        .collect();
    if ours
        .iter()
        .all(|a| entries.get(a).map(String::as_str) == Some(node))
    {
        return None;
    }
    entries.retain(|a, _| record.contains_key(a));
    for a in ours {
        entries.insert(a, node.to_string());
    }
    Some(crate::crd::service_lb::format_master(&entries))
}

#[cfg(test)]
mod lb_tests {
    use super::*;

    #[test]
    fn the_master_annotation_waits_for_the_controllers_ingress() {
        let svc = |ingress: serde_json::Value| -> k8s_openapi::api::core::v1::Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": "web", "namespace": "default"},
                "status": {"loadBalancer": {"ingress": ingress}},
            }))
            .unwrap()
        };
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        assert!(!ingress_lists(&svc(serde_json::json!([])), &[v4]));
        assert!(!ingress_lists(
            &k8s_openapi::api::core::v1::Service::default(),
            &[v4]
        ));
        assert!(ingress_lists(
            &svc(serde_json::json!([{"ip": "192.0.2.10"}])),
            &[v4]
        ));
        // Dual stack: both written, or not yet.
        assert!(!ingress_lists(
            &svc(serde_json::json!([{"ip": "192.0.2.10"}])),
            &[v4, v6]
        ));
        assert!(ingress_lists(
            &svc(
                serde_json::json!([{"ip": "2001:db8::10"}, {"ip": "192.0.2.10", "ipMode": "VIP"}])
            ),
            &[v4, v6]
        ));
    }

    #[test]
    fn master_annotation_changes_only_our_entries_and_only_when_needed() {
        let v4: IpAddr = "192.0.2.10".parse().unwrap();
        let v6: IpAddr = "2001:db8::10".parse().unwrap();
        let record: BTreeMap<IpAddr, String> =
            [(v4, "web".to_string()), (v6, "web6".to_string())].into();
        assert_eq!(
            master_annotation(None, &record, &[v4], "node-a").as_deref(),
            Some("192.0.2.10=node-a")
        );
        assert_eq!(
            master_annotation(Some("192.0.2.10=node-a"), &record, &[v4], "node-a"),
            None
        );
        // The other family's master is kept, ours replaced, IPv4 first.
        assert_eq!(
            master_annotation(
                Some("2001:db8::10=node-b,192.0.2.10=node-b"),
                &record,
                &[v4],
                "node-a"
            )
            .as_deref(),
            Some("192.0.2.10=node-a,2001:db8::10=node-b")
        );
        // An entry of an address that left the record goes; an address not in the record is
        // never written.
        let only_v4: BTreeMap<IpAddr, String> = [(v4, "web".to_string())].into();
        assert_eq!(
            master_annotation(Some("2001:db8::10=node-b"), &only_v4, &[v4], "node-a").as_deref(),
            Some("192.0.2.10=node-a")
        );
        assert_eq!(master_annotation(None, &only_v4, &[v6], "node-a"), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{VirtualIPSpec, VirtualIPStatus};
    use crate::vocab::Family;

    #[test]
    fn a_burst_of_elected_services_is_summarized_naming_the_first_few() {
        let svc = |i: usize| ServiceRef {
            namespace: "shop".into(),
            name: format!("s{i}"),
        };
        let many: Vec<(ServiceRef, usize)> = (0..9992).map(|i| (svc(i), 1)).collect();
        assert_eq!(
            lb_summary_note("node-a", &many),
            "node-a holds the addresses of 9992 more Services (9992 addresses): shop/s0, shop/s1, \
             shop/s2, shop/s3, shop/s4, shop/s5, shop/s6, shop/s7 and 9984 others; each one's \
             ferrovip.io/master annotation names its master"
        );
        let few = [(svc(1), 2), (svc(2), 1)];
        assert_eq!(
            lb_summary_note("node-b", &few),
            "node-b holds the addresses of 2 more Services (3 addresses): shop/s1, shop/s2; each \
             one's ferrovip.io/master annotation names its master"
        );
    }

    fn vip() -> VirtualIP {
        let spec: VirtualIPSpec = serde_json::from_value(json!({
            "addresses": ["192.0.2.100/24"], "interface": "eth0", "virtualRouterId": 51
        }))
        .unwrap();
        let mut v = VirtualIP::new("web", spec);
        v.metadata.generation = Some(3);
        v
    }

    fn plan(eligible: bool, refused: Option<RefusalReason>) -> ResourcePlan {
        ResourcePlan {
            vrid: Some(51),
            eligible,
            priority: eligible.then_some(150),
            priority_reasons: if eligible {
                vec!["base 100".into(), "preferred node +50".into()]
            } else {
                vec![]
            },
            refused,
            eligible_nodes: ["node-a".to_string(), "node-b".to_string()].into(),
            eligible_ready: true,
            refused_instances: Vec::new(),
        }
    }

    fn instance(state: State, master: Option<&str>) -> InstanceStatus {
        InstanceStatus {
            members: vec!["web".to_string()].into(),
            interface: "eth0".into(),
            vrid: 51,
            state,
            priority: 150,
            master: master.map(|m| m.parse().unwrap()),
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            reason: "no master seen".into(),
            reason_code: "master_down",
            fault: None,
            elected: u64::from(state == State::Master),
        }
    }

    fn addresses() -> BTreeMap<IpAddr, String> {
        [("192.0.2.11".parse().unwrap(), "node-a".to_string())].into()
    }

    /// The status one node applies for `web`: a builder over `desired_status`'s arguments.
    /// Starts eligible, with no instance, from the unwritten `vip()`.
    struct Status {
        vip: VirtualIP,
        node: &'static str,
        plan: ResourcePlan,
        ours: Vec<InstanceStatus>,
    }

    impl Status {
        fn on(node: &'static str) -> Self {
            Status {
                vip: vip(),
                node,
                plan: plan(true, None),
                ours: Vec::new(),
            }
        }

        /// One of this node's instances serving `web`.
        fn instance(mut self, state: State, master: Option<&str>) -> Self {
            self.ours.push(instance(state, master));
            self
        }

        fn ineligible(mut self) -> Self {
            self.plan = plan(false, None);
            self
        }

        fn refused(mut self, reason: RefusalReason) -> Self {
            self.plan = plan(false, Some(reason));
            self
        }

        /// The VirtualIP as this node read it (with another node's status, say).
        fn seeing(mut self, vip: VirtualIP) -> Self {
            self.vip = vip;
            self
        }

        fn body(&self) -> serde_json::Value {
            let ours: Vec<&InstanceStatus> = self.ours.iter().collect();
            desired_status(&self.vip, self.node, &self.plan, &ours, &addresses(), None)
        }
    }

    #[test]
    fn a_master_reports_itself_and_its_entry() {
        let body = Status::on("node-a")
            .instance(State::Master, Some("192.0.2.11"))
            .body();
        let s = &body["status"];
        assert_eq!(s["master"], "node-a");
        assert_eq!(s["state"], "Active");
        assert_eq!(s["observedGeneration"], 3);
        assert_eq!(s["virtualRouterId"], 51);
        assert_eq!(s["nodes"][0]["name"], "node-a");
        assert_eq!(s["nodes"][0]["state"], "Master");
        assert_eq!(s["nodes"][0]["priority"], 150);
        assert_eq!(s["nodes"][0]["reasons"][1], "preferred node +50");
        assert_eq!(s["nodes"][0]["lastTransitionTime"], "2023-11-14T22:13:20Z");
        assert_eq!(s["conditions"][0]["type"], "Ready");
        assert_eq!(s["conditions"][0]["status"], "True");
        assert_eq!(s["nodes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_backup_names_the_master_node_from_its_address() {
        let body = Status::on("node-b")
            .instance(State::Backup, Some("192.0.2.11"))
            .body();
        assert_eq!(body["status"]["master"], "node-a");
        assert_eq!(body["status"]["nodes"][0]["state"], "Backup");
        let body = Status::on("node-b")
            .instance(State::Backup, Some("192.0.2.99"))
            .body();
        assert_eq!(body["status"]["master"], "192.0.2.99");
        let body = Status::on("node-b").instance(State::Backup, None).body();
        // A node that knows no master writes only its own entry.
        let s = body["status"].as_object().unwrap();
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            ["nodes", "observedGeneration", "virtualRouterId"]
        );
    }

    #[test]
    fn refused_and_ineligible() {
        let reason = RefusalReason::DuplicateVrid {
            interface: "eth0".into(),
            family: Family::V4,
            vrid: 51,
            other: "api".into(),
        };
        let body = Status::on("node-a").refused(reason).body();
        let s = &body["status"];
        assert_eq!(s["state"], "Conflict");
        let conflict = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Conflict")
            .unwrap();
        assert_eq!(conflict["status"], "True");
        assert_eq!(conflict["reason"], "DuplicateVirtualRouterId");
        assert!(conflict["message"].as_str().unwrap().contains("\"api\""));
        assert!(s.get("nodes").is_none());

        let body = Status::on("node-c").ineligible().body();
        let s = body["status"].as_object().unwrap();
        assert_eq!(
            s.keys().collect::<Vec<_>>(),
            ["observedGeneration", "virtualRouterId"]
        );
    }

    #[test]
    fn unchanged_conditions_keep_their_time_so_nodes_agree() {
        let first = Status::on("node-a")
            .instance(State::Master, Some("192.0.2.11"))
            .body();
        let conditions: Vec<Condition> =
            serde_json::from_value(first["status"]["conditions"].clone()).unwrap();
        let mut seen = vip();
        seen.status = Some(VirtualIPStatus {
            conditions: conditions.clone(),
            ..VirtualIPStatus::default()
        });
        std::thread::sleep(Duration::from_millis(5));
        let second = Status::on("node-b")
            .seeing(seen)
            .instance(State::Backup, Some("192.0.2.11"))
            .body();
        assert_eq!(
            second["status"]["conditions"],
            first["status"]["conditions"]
        );
    }

    #[test]
    fn healthy_backups_of_large_instances_list_themselves_on_one_virtual_ip() {
        let large = |state: State, master: Option<&str>| {
            let mut i = instance(state, master);
            i.members = (0..=SUMMARY_MEMBERS)
                .map(|n| format!("web-{n:02}"))
                .collect::<Vec<_>>()
                .into();
            i
        };
        let apply = |ours: &[InstanceStatus], seen: &VirtualIP, services, listed_on| {
            let ours: Vec<&InstanceStatus> = ours.iter().collect();
            let plan = plan(true, None);
            applied_status(
                seen,
                "node-b",
                &plan,
                &ours,
                &addresses(),
                services,
                listed_on,
            )
        };
        let backup = [large(State::Backup, Some("192.0.2.11"))];
        let master = Status::on("node-a")
            .instance(State::Master, Some("192.0.2.11"))
            .body();
        let mut seen = vip();
        seen.status = Some(serde_json::from_value(master["status"].clone()).unwrap());

        // Left out: the body holds the master's view and no entry, which the master's write
        // already shows, so the backup writes nothing.
        let (body, summary) = apply(&backup, &seen, None, false);
        assert!(summary);
        assert!(body["status"].get("nodes").is_none(), "{body}");
        assert_eq!(body["status"]["master"], "node-a");
        assert!(reflected(&seen, &body, "node-b"));
        // Its entry from before (when the instance was small, say) is not what it applies
        // now: it writes once, and server-side apply drops the entry.
        let (full, _) = apply(&backup, &vip(), None, true);
        let mut old = seen.clone();
        old.status
            .as_mut()
            .unwrap()
            .nodes
            .push(serde_json::from_value(full["status"]["nodes"][0].clone()).unwrap());
        assert!(!reflected(&old, &body, "node-b"));

        // Listed on the instance's first VirtualIP, with services, faults, no master known,
        // a small instance, or a master: the entry as always.
        assert!(!apply(&backup, &seen, None, true).1);
        assert_eq!(
            apply(&backup, &seen, None, true).0["status"]["nodes"][0]["state"],
            "Backup"
        );
        assert!(!apply(&backup, &seen, Some("ipvs: 1 service programmed"), false).1);
        let mut faulty = large(State::Backup, Some("192.0.2.11"));
        faulty.fault = Some("interface eth0 is missing".into());
        assert!(!apply(&[faulty], &seen, None, false).1);
        assert!(!apply(&[large(State::Backup, None)], &seen, None, false).1);
        assert!(
            !apply(
                &[instance(State::Backup, Some("192.0.2.11"))],
                &seen,
                None,
                false
            )
            .1
        );
        assert!(
            !apply(
                &[large(State::Master, Some("192.0.2.12"))],
                &seen,
                None,
                false
            )
            .1
        );
        // Both families: summarized only if every instance is large and healthy.
        let small_v6 = instance(State::Backup, Some("192.0.2.11"));
        assert!(!apply(&[backup[0].clone(), small_v6], &seen, None, false).1);
        assert!(apply(&[backup[0].clone(), backup[0].clone()], &seen, None, false).1);
        // A refused VirtualIP says why on every node.
        let ours: Vec<&InstanceStatus> = backup.iter().collect();
        let refused = plan(false, Some(RefusalReason::Unnamed));
        assert!(!summarized(&refused, &ours, None, false));
    }

    #[test]
    fn a_write_another_node_undid_is_noticed() {
        let body = Status::on("node-a")
            .instance(State::Master, Some("192.0.2.11"))
            .body();
        let mut seen = vip();
        assert!(
            !reflected(&seen, &body, "node-a"),
            "empty status reflects nothing"
        );
        seen.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
        assert!(reflected(&seen, &body, "node-a"));
        // Conditions dropped to null by another manager's apply.
        let mut undone = body["status"].clone();
        undone["conditions"] = serde_json::Value::Null;
        seen.status = Some(serde_json::from_value(undone).unwrap());
        assert!(!reflected(&seen, &body, "node-a"));
        // An ineligible node's body is reflected only once its entry is gone.
        let gone = Status::on("node-a").ineligible().body();
        seen.status = Some(serde_json::from_value(body["status"].clone()).unwrap());
        assert!(!reflected(&seen, &gone, "node-a"));
        assert!(reflected(&seen, &gone, "node-z"));
    }

    #[test]
    fn no_ready_eligible_node_is_said_alike_by_eligible_and_ineligible_nodes() {
        let unready = |mut st: Status, eligible: &[&str]| {
            st.plan.eligible_ready = false;
            st.plan.eligible_nodes = eligible.iter().map(|n| n.to_string()).collect();
            st
        };
        let ready_of = |body: &serde_json::Value| {
            body["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["type"] == "Ready")
                .cloned()
                .unwrap()
        };
        // No node matches the selector: the agents that run (none eligible) say so.
        let c = unready(Status::on("node-c").ineligible(), &[]).body();
        assert_eq!(c["status"]["state"], "NoMaster");
        assert_eq!(ready_of(&c)["status"], "False");
        assert_eq!(ready_of(&c)["reason"], "NoEligibleNode");
        assert!(c["status"].get("nodes").is_none());
        // Eligible nodes exist but none is Ready: an eligible agent that still runs (and
        // may hold the addresses) writes the very same condition and state as the others.
        let a = unready(Status::on("node-a"), &["node-a", "node-b"])
            .instance(State::Master, None)
            .body();
        let c = unready(Status::on("node-c").ineligible(), &["node-a", "node-b"]).body();
        let strip = |mut v: serde_json::Value| {
            v.as_object_mut().unwrap().remove("lastTransitionTime");
            v
        };
        assert_eq!(strip(ready_of(&a)), strip(ready_of(&c)));
        assert_eq!(a["status"]["state"], c["status"]["state"]);
        assert_eq!(a["status"]["master"], "node-a");
        assert!(
            ready_of(&a)["message"]
                .as_str()
                .unwrap()
                .contains("node-a, node-b"),
            "{a}"
        );
        assert_eq!(a["status"]["nodes"][0]["name"], "node-a");
    }

    #[test]
    fn the_master_finds_the_entries_of_nodes_that_left() {
        let mut seen = vip();
        seen.status = Some(
            serde_json::from_value(json!({"nodes": [
                {"name": "node-a", "state": "Master", "priority": 150},
                {"name": "node-gone", "state": "Backup", "priority": 100},
                {"name": "node-b", "state": "Backup", "priority": 100},
                {"name": "node-excluded", "state": "Backup", "priority": 100},
            ]}))
            .unwrap(),
        );
        let p = plan(true, None);
        assert_eq!(
            stale_entries(&seen, &p, "node-a"),
            [
                (1, "node-gone".to_string()),
                (3, "node-excluded".to_string())
            ]
        );
        // A refused resource has no eligible nodes to judge by.
        let refused = plan(
            false,
            Some(RefusalReason::NoFreeVrid {
                interface: "eth0".into(),
            }),
        );
        assert!(stale_entries(&seen, &refused, "node-a").is_empty());
    }

    #[test]
    fn a_refused_family_degrades_the_resource_with_the_reason() {
        let reason = RefusalReason::NoUnicastPeers {
            family: Family::V6,
            auto: false,
        };
        let mut status = Status::on("node-a").instance(State::Master, Some("192.0.2.11"));
        status.plan.refused_instances = vec![reason.clone()];
        let body = status.body();
        let s = &body["status"];
        assert_eq!(s["state"], "Active", "the IPv4 instance runs");
        let degraded = s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["type"] == "Degraded")
            .unwrap();
        assert_eq!(degraded["status"], "True");
        assert_eq!(degraded["reason"], "NoUnicastPeers");
        assert_eq!(degraded["message"], reason.to_string());

        // Every family refused: the resource is, with the same reason.
        let body = Status::on("node-a").refused(reason.clone()).body();
        let ready = &body["status"]["conditions"][0];
        assert_eq!(ready["type"], "Ready");
        assert_eq!(ready["status"], "False");
        assert_eq!(ready["reason"], "NoUnicastPeers");
    }

    #[test]
    fn a_fault_goes_in_the_nodes_own_entry_not_a_shared_condition() {
        let mut fault = instance(State::Initialize, None);
        fault.fault = Some("spec.addresses: 192.0.2.100/16 has a shorter prefix".into());
        let mut status = Status::on("node-b");
        status.ours.push(fault);
        let body = status.body();
        let entry = &body["status"]["nodes"][0];
        assert_eq!(entry["state"], "Fault");
        assert_eq!(
            entry["fault"],
            "spec.addresses: 192.0.2.100/16 has a shorter prefix"
        );
        // Every node with a fault of its own writing one condition would overwrite the others'.
        assert!(body["status"].get("conditions").is_none(), "{body}");
    }
}
