//! What the leader writes, as pure functions of the object read and the decision (table-tested
//! below), and the writes themselves.
//!
//! - The allocation record: a JSON merge patch of the one annotation, carrying
//!   `metadata.resourceVersion` (the API server refuses it with 409 when the Service changed
//!   since it was read).
//! - `status.loadBalancer.ingress`: a merge patch of the status subresource, also carrying
//!   the resourceVersion (of the record write's answer when both are written).
//! - Pool status: a merge patch of the status subresource, only when it differs; a condition
//!   whose type, status, reason and message are unchanged keeps its `lastTransitionTime`.
//! - Events (`events.k8s.io/v1`) in the Service's namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, ObjectMeta, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, Resource};
use serde_json::{Value, json};

use crate::crd::service_lb::{
    ANNOTATION_ALLOCATED, ANNOTATION_MASTER, CONTROLLER_MANAGER, allocation_record,
    format_allocated, format_master, master_value, parse_master,
};
use crate::crd::{LoadBalancerPool, LoadBalancerPoolStatus};
use crate::ipam::{Ingress, ServiceDecision};
use crate::vocab::Family;

/// The record annotation's value wanted: `None` removes it.
fn record_value(record: &BTreeMap<IpAddr, String>) -> Option<String> {
    (!record.is_empty()).then(|| format_allocated(record))
}

/// The merge patch that makes `svc`'s record `record`, or `None` when it already is; with
/// `master`, the [`ANNOTATION_MASTER`] value written with it ([`master_with_record`]).
pub fn record_patch(
    svc: &Service,
    record: &BTreeMap<IpAddr, String>,
    master: Option<&str>,
) -> Option<Value> {
    let current = svc
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_ALLOCATED));
    let wanted = record_value(record);
    if current == wanted.as_ref() {
        return None;
    }
    let mut annotations = json!({ ANNOTATION_ALLOCATED: wanted });
    if let Some(master) = master {
        annotations[ANNOTATION_MASTER] = master.into();
    }
    Some(json!({
        "metadata": {
            "resourceVersion": svc.metadata.resource_version,
            "annotations": annotations,
        }
    }))
}

/// `externalTrafficPolicy: Local`: the address has a VRRP instance of its own, among the
/// nodes with its endpoints.
fn local_policy(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.external_traffic_policy.as_deref())
        == Some("Local")
}

/// Per pool and address family: the node that every [`ANNOTATION_MASTER`] entry of the pool's
/// addresses of that family names, among `services`, when they all name one. A pool's
/// addresses of one family share one VRRP instance (one template, no fixed router ID), so a
/// new address of the pool goes to that node as the others did. Not `Local` Services' (an
/// instance each).
pub fn master_hints(services: &[Arc<Service>]) -> BTreeMap<(String, Family), String> {
    // None: two nodes named (a takeover being written): no hint.
    let mut named: BTreeMap<(String, Family), Option<String>> = BTreeMap::new();
    for svc in services.iter().filter(|s| !local_policy(s)) {
        let Some(value) = master_value(svc) else {
            continue;
        };
        let Some(Ok(record)) = allocation_record(svc) else {
            continue;
        };
        let mut entries = parse_master(value);
        for (addr, pool) in record {
            let Some(node) = entries.remove(&addr) else {
                continue;
            };
            let hint = named
                .entry((pool, Family::of(&addr)))
                .or_insert_with(|| Some(node.clone()));
            if hint.as_ref() != Some(&node) {
                *hint = None;
            }
        }
    }
    named
        .into_iter()
        .filter_map(|(key, node)| Some((key, node?)))
        .collect()
}

/// The [`ANNOTATION_MASTER`] value to write with `svc`'s new record `record`, or `None`: the
/// addresses the Service gets, named with their pool's node ([`master_hints`]); its entries of
/// addresses it keeps are kept, those of addresses it gives up dropped. The leader names the
/// master in the record's own write instead of leaving it to the master's agent: 10,000
/// Services settled with a quarter fewer writes. It is a forecast: the agent that takes an
/// address checks the value and rewrites it when it names another node (or a node that holds
/// nothing any more: whoever takes the address over writes it).
pub fn master_with_record(
    svc: &Service,
    record: &BTreeMap<IpAddr, String>,
    hints: &BTreeMap<(String, Family), String>,
) -> Option<String> {
    if local_policy(svc) {
        return None;
    }
    let mut entries = master_value(svc).map(parse_master).unwrap_or_default();
    let mut named = false;
    for (addr, pool) in record {
        if entries.contains_key(addr) {
            continue;
        }
        if let Some(node) = hints.get(&(pool.clone(), Family::of(addr))) {
            entries.insert(*addr, node.clone());
            named = true;
        }
    }
    if !named {
        return None;
    }
    entries.retain(|a, _| record.contains_key(a));
    Some(format_master(&entries))
}

/// The Service's ingress as (ip, ipMode) pairs; entries without an ip (hostnames) as
/// unparseable, so that they differ from anything ferrovip wants.
fn current_ingress(svc: &Service) -> Vec<(Option<IpAddr>, Option<String>, bool)> {
    crate::crd::service_lb::ingress_entries(svc)
        .map(|i| {
            (
                i.ip.as_deref().and_then(|ip| ip.parse().ok()),
                i.ip_mode.clone(),
                i.hostname.is_some() || i.ports.as_ref().is_some_and(|p| !p.is_empty()),
            )
        })
        .collect()
}

/// The status merge patch that makes `svc`'s ingress `ingress`, or `None` when it already is.
pub fn ingress_patch(svc: &Service, ingress: &[Ingress]) -> Option<Value> {
    let current = current_ingress(svc);
    let same = current.len() == ingress.len()
        && current
            .iter()
            .zip(ingress)
            .all(|((ip, mode, extra), want)| {
                *ip == Some(want.ip) && mode.as_deref() == want.ip_mode && !extra
            });
    if same {
        return None;
    }
    let entries: Vec<Value> = ingress
        .iter()
        .map(|i| match i.ip_mode {
            Some(mode) => json!({"ip": i.ip.to_string(), "ipMode": mode}),
            None => json!({"ip": i.ip.to_string()}),
        })
        .collect();
    let list = if entries.is_empty() {
        Value::Null
    } else {
        Value::Array(entries)
    };
    Some(json!({
        "metadata": {"resourceVersion": svc.metadata.resource_version},
        "status": {"loadBalancer": {"ingress": list}},
    }))
}

/// The condition ferrovip keeps on the Services it serves (`status.conditions`, Kubernetes
/// 1.20+): `True` with the addresses once allocated, `False` with the failure's reason and
/// message (`PoolExhausted`, ...) while one stands, so `kubectl get svc -o yaml` says why an
/// address is `<pending>`.
pub const CONDITION_TYPE: &str = "ferrovip.io/AddressAllocated";

/// (status, reason, message) of [`CONDITION_TYPE`] for a decision; `None`: no condition (the
/// Service holds nothing and nothing failed, e.g. it is no longer of type LoadBalancer).
pub fn wanted_condition(decision: &ServiceDecision) -> Option<(&'static str, String, String)> {
    if let Some(f) = &decision.failure {
        return Some(("False", f.reason.to_string(), f.message.clone()));
    }
    if decision.record.is_empty() {
        return None;
    }
    let held = decision
        .record
        .iter()
        .map(|(a, p)| format!("{a} from pool {p}"))
        .collect::<Vec<_>>()
        .join(", ");
    Some(("True", "Allocated".to_string(), held))
}

/// `svc.status.conditions` with ferrovip's condition as `decision` wants it (others kept);
/// `None` when they already are. The transition time is kept when the status is unchanged.
pub fn conditions_update(
    svc: &Service,
    decision: &ServiceDecision,
    now: Timestamp,
) -> Option<Vec<Condition>> {
    let current: Vec<Condition> = svc
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default();
    let ours = current.iter().find(|c| c.type_ == CONDITION_TYPE);
    let wanted = wanted_condition(decision);
    let same = match (ours, &wanted) {
        (None, None) => true,
        (Some(c), Some((status, reason, message))) => {
            c.status == *status && c.reason == *reason && c.message == *message
        }
        _ => false,
    };
    if same {
        return None;
    }
    let mut out: Vec<Condition> = current
        .iter()
        .filter(|c| c.type_ != CONDITION_TYPE)
        .cloned()
        .collect();
    if let Some((status, reason, message)) = wanted {
        let since = ours
            .filter(|c| c.status == status)
            .map(|c| c.last_transition_time.clone())
            .unwrap_or(Time(now));
        out.push(Condition {
            type_: CONDITION_TYPE.to_string(),
            status: status.to_string(),
            reason,
            message,
            observed_generation: svc.metadata.generation,
            last_transition_time: since,
        });
    }
    Some(out)
}

/// The status merge patch for `decision`: its ingress and ferrovip's condition, or `None` when
/// the Service already shows both (or `decision` leaves the status alone: another class).
pub fn status_patch(svc: &Service, decision: &ServiceDecision, now: Timestamp) -> Option<Value> {
    let ingress = decision.ingress.as_ref()?;
    let ingress_body = ingress_patch(svc, ingress);
    let conditions = conditions_update(svc, decision, now);
    if ingress_body.is_none() && conditions.is_none() {
        return None;
    }
    let mut body = ingress_body.unwrap_or_else(
        || json!({"metadata": {"resourceVersion": svc.metadata.resource_version}, "status": {}}),
    );
    if let Some(conditions) = conditions {
        body["status"]["conditions"] = if conditions.is_empty() {
            Value::Null
        } else {
            serde_json::to_value(conditions).unwrap_or(Value::Null)
        };
    }
    Some(body)
}

/// `wanted` with each condition's `lastTransitionTime` taken from `old` when type, status,
/// reason and message are unchanged, `now` otherwise.
pub fn with_condition_times(
    old: Option<&LoadBalancerPoolStatus>,
    wanted: &LoadBalancerPoolStatus,
    now: Timestamp,
) -> LoadBalancerPoolStatus {
    let mut out = wanted.clone();
    for c in &mut out.conditions {
        let kept = old
            .into_iter()
            .flat_map(|o| &o.conditions)
            .find(|o| {
                o.type_ == c.type_
                    && o.status == c.status
                    && o.reason == c.reason
                    && o.message == c.message
            })
            .map(|o| o.last_transition_time.clone());
        c.last_transition_time = kept.unwrap_or(Time(now));
    }
    out
}

/// The pool status to write, or `None` when the pool already shows it.
pub fn pool_status_update(
    pool: &LoadBalancerPool,
    wanted: &LoadBalancerPoolStatus,
    now: Timestamp,
) -> Option<LoadBalancerPoolStatus> {
    let status = with_condition_times(pool.status.as_ref(), wanted, now);
    if pool.status.as_ref() == Some(&status)
        || (pool.status.is_none() && status == LoadBalancerPoolStatus::default())
    {
        return None;
    }
    Some(status)
}

/// The merge patch that sets the whole pool status (absent fields removed).
pub fn pool_status_patch(status: &LoadBalancerPoolStatus) -> Value {
    let mut body = serde_json::to_value(status).unwrap_or_else(|_| json!({}));
    if let Some(map) = body.as_object_mut() {
        for key in ["observedGeneration", "ipv4", "ipv6", "inUse", "conditions"] {
            map.entry(key).or_insert(Value::Null);
        }
    }
    json!({"status": body})
}

/// The controller's patch parameters (its field manager).
pub fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(CONTROLLER_MANAGER.into()),
        ..PatchParams::default()
    }
}

/// Patches a Service's metadata (the record).
pub async fn patch_service(api: &Api<Service>, name: &str, body: &Value) -> kube::Result<Service> {
    api.patch(name, &params(), &Patch::Merge(body)).await
}

/// Patches a Service's status subresource.
pub async fn patch_service_status(
    api: &Api<Service>,
    name: &str,
    body: &Value,
) -> kube::Result<Service> {
    api.patch_status(name, &params(), &Patch::Merge(body)).await
}

/// Patches a pool's status subresource.
pub async fn patch_pool_status(
    client: &Client,
    name: &str,
    status: &LoadBalancerPoolStatus,
) -> kube::Result<LoadBalancerPool> {
    let api: Api<LoadBalancerPool> = Api::all(client.clone());
    api.patch_status(name, &params(), &Patch::Merge(pool_status_patch(status)))
        .await
}

/// One Event about a Service.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEvent {
    /// What the Event is about: a Service, or a LoadBalancerPool for a summary.
    pub service: k8s_openapi::api::core::v1::ObjectReference,
    pub warning: bool,
    pub reason: &'static str,
    pub action: &'static str,
    pub note: String,
    /// In a burst, this Event may be counted into its pool's summary instead (the
    /// controller's `summary` module).
    pub countable: Option<Countable>,
}

/// What a summary may count instead of an Event of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Countable {
    pub pool: String,
    pub address: String,
}

impl ServiceEvent {
    pub fn new(
        svc: &Service,
        warning: bool,
        reason: &'static str,
        action: &'static str,
        note: String,
    ) -> ServiceEvent {
        ServiceEvent {
            service: svc.object_ref(&()),
            warning,
            reason,
            action,
            note,
            countable: None,
        }
    }

    /// An Event a burst may count into its pool's summary.
    pub fn countable(mut self, pool: &str, address: &str) -> ServiceEvent {
        self.countable = Some(Countable {
            pool: pool.to_owned(),
            address: address.to_owned(),
        });
        self
    }
}

/// Creates the Event in the Service's namespace (`events.k8s.io/v1`). One about a pool
/// (cluster-scoped, its uid looked up so that `kubectl describe` finds it) goes to
/// `default`, or to `kube-system` on servers that take no other for it (422 in `default`:
/// v1.20 wants new-style Events about cluster-scoped objects there).
pub async fn publish(client: &Client, identity: &str, event: &ServiceEvent) -> kube::Result<()> {
    let now = Timestamp::now();
    let mut note = event.note.clone();
    if note.len() > 1024 {
        let mut end = 1021;
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str("...");
    }
    let mut regarding = event.service.clone();
    let namespaces: Vec<String> = match &regarding.namespace {
        Some(namespace) => vec![namespace.clone()],
        None => {
            if regarding.uid.is_none()
                && regarding.kind.as_deref() == Some("LoadBalancerPool")
                && let Some(name) = &regarding.name
            {
                regarding.uid = Api::<LoadBalancerPool>::all(client.clone())
                    .get_opt(name)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|p| p.metadata.uid);
            }
            vec!["default".into(), "kube-system".into()]
        }
    };
    let last = namespaces.len() - 1;
    for (i, namespace) in namespaces.iter().enumerate() {
        let body = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.clone().unwrap_or_default(),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(event.action.into()),
            reason: Some(event.reason.into()),
            note: Some(note.clone()),
            regarding: Some(regarding.clone()),
            reporting_controller: Some("ferrovip.io/controller".into()),
            reporting_instance: Some(identity.into()),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.into()),
            ..K8sEvent::default()
        };
        let api: Api<K8sEvent> = Api::namespaced(client.clone(), namespace);
        match api.create(&PostParams::default(), &body).await {
            Ok(_) => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 422 && i < last => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether the server has `status.loadBalancer.ingress[].ipMode` (Kubernetes 1.30+; older
/// servers drop the field), from its `/version`.
pub fn has_ip_mode(major: &str, minor: &str) -> bool {
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .unwrap_or(0)
    };
    (number(major), number(minor)) >= (1, 30)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipam::{Failure, FailureReason};
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn svc(record: Option<&str>, ingress: &[(&str, Option<&str>)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("default".into()),
                resource_version: Some("42".into()),
                annotations: record.map(|r| {
                    [(ANNOTATION_ALLOCATED.to_string(), r.to_string())]
                        .into_iter()
                        .collect()
                }),
                ..ObjectMeta::default()
            },
            status: Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(
                        ingress
                            .iter()
                            .map(|(i, m)| LoadBalancerIngress {
                                ip: Some(i.to_string()),
                                ip_mode: m.map(Into::into),
                                ..LoadBalancerIngress::default()
                            })
                            .collect(),
                    ),
                }),
                ..ServiceStatus::default()
            }),
            ..Service::default()
        }
    }

    fn record(entries: &[(&str, &str)]) -> BTreeMap<IpAddr, String> {
        entries
            .iter()
            .map(|(a, p)| (ip(a), p.to_string()))
            .collect()
    }

    #[test]
    fn the_record_is_written_with_the_resource_version_only_when_it_differs() {
        let want = record(&[("192.0.2.10", "web")]);
        assert_eq!(
            record_patch(&svc(Some("192.0.2.10@web"), &[]), &want, None),
            None
        );
        let patch = record_patch(&svc(None, &[]), &want, None).unwrap();
        assert_eq!(
            patch,
            json!({"metadata": {"resourceVersion": "42", "annotations": {"ferrovip.io/allocated": "192.0.2.10@web"}}})
        );
        // A different pool is a different record.
        assert!(record_patch(&svc(Some("192.0.2.10@other"), &[]), &want, None).is_some());
        // Empty: the annotation goes (null), and only if it is there.
        let patch =
            record_patch(&svc(Some("192.0.2.10@web"), &[]), &BTreeMap::new(), None).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"]["ferrovip.io/allocated"],
            Value::Null
        );
        assert_eq!(record_patch(&svc(None, &[]), &BTreeMap::new(), None), None);
    }

    /// A Service holding `record` whose master annotation is `master`.
    fn annotated(record: &str, master: Option<&str>) -> Arc<Service> {
        let mut s = svc(Some(record), &[]);
        if let Some(m) = master {
            s.metadata
                .annotations
                .get_or_insert_with(BTreeMap::new)
                .insert(ANNOTATION_MASTER.to_string(), m.to_string());
        }
        Arc::new(s)
    }

    #[test]
    fn the_leader_names_the_master_of_a_new_address_when_its_pool_agrees() {
        let pool_v4 = ("lb".to_string(), Family::V4);
        let pool_v6 = ("lb".to_string(), Family::V6);
        let services = [
            annotated("192.0.2.10@lb", Some("192.0.2.10=node-a")),
            annotated(
                "192.0.2.11@lb,2001:db8::11@lb",
                Some("192.0.2.11=node-a,2001:db8::11=node-b"),
            ),
            // Not yet annotated, another pool, a record without entries: no say.
            annotated("192.0.2.12@lb", None),
            annotated("198.51.100.1@other", Some("198.51.100.1=node-c")),
            annotated("192.0.2.13@lb", Some("192.0.2.99=node-c")),
        ];
        let hints = master_hints(&services);
        assert_eq!(hints.get(&pool_v4).map(String::as_str), Some("node-a"));
        assert_eq!(hints.get(&pool_v6).map(String::as_str), Some("node-b"));
        assert_eq!(
            hints
                .get(&("other".to_string(), Family::V4))
                .map(String::as_str),
            Some("node-c")
        );
        // Two nodes named for one pool and family (a takeover being written): no hint.
        let mut split = services.to_vec();
        split.push(annotated("192.0.2.14@lb", Some("192.0.2.14=node-b")));
        let hints_split = master_hints(&split);
        assert_eq!(hints_split.get(&pool_v4), None);
        assert_eq!(
            hints_split.get(&pool_v6).map(String::as_str),
            Some("node-b")
        );

        // A new Service: both of its addresses named, IPv4 first.
        let new = svc(None, &[]);
        let both = record(&[("192.0.2.20", "lb"), ("2001:db8::20", "lb")]);
        let value = master_with_record(&new, &both, &hints).unwrap();
        assert_eq!(value, "192.0.2.20=node-a,2001:db8::20=node-b");
        let patch = record_patch(&new, &both, Some(&value)).unwrap();
        assert_eq!(
            patch["metadata"]["annotations"],
            json!({
                "ferrovip.io/allocated": "192.0.2.20@lb,2001:db8::20@lb",
                "ferrovip.io/master": "192.0.2.20=node-a,2001:db8::20=node-b",
            })
        );
        // Without a hint for its family, that address is left to its master's agent.
        assert_eq!(
            master_with_record(&new, &both, &hints_split).as_deref(),
            Some("2001:db8::20=node-b")
        );
        // An address that is named already keeps its entry (its master wrote it); one given
        // up loses its entry; nothing new to name: nothing written.
        let held = annotated("192.0.2.30@lb", Some("192.0.2.30=node-c,192.0.2.31=node-c"));
        let grown = record(&[("192.0.2.30", "lb"), ("2001:db8::30", "lb")]);
        assert_eq!(
            master_with_record(&held, &grown, &hints).as_deref(),
            Some("192.0.2.30=node-c,2001:db8::30=node-b")
        );
        assert_eq!(
            master_with_record(&held, &record(&[("192.0.2.30", "lb")]), &hints),
            None
        );
        assert_eq!(master_with_record(&new, &both, &BTreeMap::new()), None);

        // `Local`: an instance per address, so no forecast, and no say in one.
        let local = |mut s: Service| {
            s.spec = Some(k8s_openapi::api::core::v1::ServiceSpec {
                external_traffic_policy: Some("Local".into()),
                ..Default::default()
            });
            s
        };
        assert_eq!(master_with_record(&local(new.clone()), &both, &hints), None);
        let only_local = [Arc::new(local((*services[0]).clone()))];
        assert!(master_hints(&only_local).is_empty());
    }

    fn decision(record: &[(&str, &str)], failure: Option<FailureReason>) -> ServiceDecision {
        ServiceDecision {
            record: self::record(record),
            ingress: Some(
                record
                    .iter()
                    .map(|(a, _)| Ingress {
                        ip: ip(a),
                        ip_mode: None,
                    })
                    .collect(),
            ),
            allocated: Vec::new(),
            released: Vec::new(),
            failure: failure.map(|reason| Failure {
                reason,
                message: "pool small: no address left".into(),
            }),
        }
    }

    #[test]
    fn the_condition_says_why_an_address_is_pending_and_is_written_only_on_change() {
        let t0 = Timestamp::from_second(1_700_000_000).unwrap();
        let t1 = Timestamp::from_second(1_700_000_100).unwrap();
        // Pending: False with the failure's reason, in the same patch as the (empty) ingress.
        let pending = svc(None, &[]);
        let failed = decision(&[], Some(FailureReason::PoolExhausted));
        let patch = status_patch(&pending, &failed, t0).unwrap();
        let c = &patch["status"]["conditions"][0];
        assert_eq!(c["type"], CONDITION_TYPE);
        assert_eq!(c["status"], "False");
        assert_eq!(c["reason"], "PoolExhausted");
        assert_eq!(c["message"], "pool small: no address left");
        // Shown already: nothing to write.
        let mut shown = pending.clone();
        shown.status.get_or_insert_default().conditions = conditions_update(&pending, &failed, t0);
        assert_eq!(status_patch(&shown, &failed, t1), None);
        // Allocated: True naming the address and pool, with the ingress, new transition time.
        let ok = decision(&[("192.0.2.10", "small")], None);
        let patch = status_patch(&shown, &ok, t1).unwrap();
        assert_eq!(
            patch["status"]["loadBalancer"]["ingress"][0]["ip"],
            "192.0.2.10"
        );
        let c = &patch["status"]["conditions"][0];
        assert_eq!(c["status"], "True");
        assert_eq!(c["reason"], "Allocated");
        assert_eq!(c["message"], "192.0.2.10 from pool small");
        assert_eq!(c["lastTransitionTime"], "2023-11-14T22:15:00Z");
        // Another class: the status is left alone whatever the condition.
        let other = ServiceDecision {
            ingress: None,
            ..decision(&[], Some(FailureReason::PoolExhausted))
        };
        assert_eq!(status_patch(&pending, &other, t0), None);
        // No longer a LoadBalancer (nothing held, nothing failed): our condition goes, others stay.
        let mut foreign = shown.clone();
        foreign
            .status
            .as_mut()
            .unwrap()
            .conditions
            .as_mut()
            .unwrap()
            .push(Condition {
                type_: "example.com/Other".into(),
                status: "True".into(),
                reason: "Other".into(),
                message: String::new(),
                observed_generation: None,
                last_transition_time: Time(t0),
            });
        let patch = status_patch(&foreign, &decision(&[], None), t1).unwrap();
        let kept = patch["status"]["conditions"].as_array().unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0]["type"], "example.com/Other");
    }

    #[test]
    fn ingress_is_written_in_order_with_ip_mode_only_when_asked() {
        let v4 = Ingress {
            ip: ip("192.0.2.10"),
            ip_mode: None,
        };
        let v6 = Ingress {
            ip: ip("2001:db8::10"),
            ip_mode: None,
        };
        assert_eq!(
            ingress_patch(&svc(None, &[("192.0.2.10", None)]), &[v4]),
            None
        );
        let patch = ingress_patch(&svc(None, &[]), &[v4, v6]).unwrap();
        assert_eq!(
            patch["status"]["loadBalancer"]["ingress"],
            json!([{"ip": "192.0.2.10"}, {"ip": "2001:db8::10"}])
        );
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        // Order matters; ipMode matters.
        assert!(
            ingress_patch(
                &svc(None, &[("2001:db8::10", None), ("192.0.2.10", None)]),
                &[v4, v6]
            )
            .is_some()
        );
        let proxy = Ingress {
            ip_mode: Some("Proxy"),
            ..v4
        };
        let patch = ingress_patch(&svc(None, &[("192.0.2.10", None)]), &[proxy]).unwrap();
        assert_eq!(
            patch["status"]["loadBalancer"]["ingress"],
            json!([{"ip": "192.0.2.10", "ipMode": "Proxy"}])
        );
        assert_eq!(
            ingress_patch(&svc(None, &[("192.0.2.10", Some("Proxy"))]), &[proxy]),
            None
        );
        // Clearing: null, and nothing to do when already empty.
        let patch = ingress_patch(&svc(None, &[("192.0.2.10", None)]), &[]).unwrap();
        assert_eq!(patch["status"]["loadBalancer"]["ingress"], Value::Null);
        assert_eq!(ingress_patch(&svc(None, &[]), &[]), None);
        let mut none = svc(None, &[]);
        none.status = None;
        assert_eq!(ingress_patch(&none, &[]), None);
    }

    fn condition(type_: &str, status: &str, reason: &str, at: i64) -> Condition {
        Condition {
            type_: type_.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::from_second(at).unwrap()),
        }
    }

    #[test]
    fn pool_status_keeps_condition_times_and_is_written_only_when_changed() {
        let now = Timestamp::from_second(2_000_000_000).unwrap();
        let old = LoadBalancerPoolStatus {
            observed_generation: Some(1),
            in_use: Some(1),
            conditions: vec![
                condition("Ready", "True", "Ready", 100),
                condition("Conflict", "False", "NoConflict", 100),
            ],
            ..LoadBalancerPoolStatus::default()
        };
        let pool = LoadBalancerPool {
            metadata: ObjectMeta {
                name: Some("web".into()),
                ..ObjectMeta::default()
            },
            spec: serde_json::from_value(
                json!({"addresses": ["192.0.2.0/28"], "template": {"interface": "eth0"}}),
            )
            .unwrap(),
            status: Some(old.clone()),
        };
        // Same content (times left empty by ipam): nothing to write.
        let mut wanted = old.clone();
        for c in &mut wanted.conditions {
            c.last_transition_time = Time(Timestamp::UNIX_EPOCH);
        }
        assert_eq!(pool_status_update(&pool, &wanted, now), None);
        // A count changes: written, times kept.
        wanted.in_use = Some(2);
        let update = pool_status_update(&pool, &wanted, now).unwrap();
        assert_eq!(update.in_use, Some(2));
        assert!(
            update
                .conditions
                .iter()
                .all(|c| c.last_transition_time.0.as_second() == 100)
        );
        // A condition changes: only its time is now.
        wanted.conditions[1] = condition("Conflict", "True", "Overlap", 0);
        let update = pool_status_update(&pool, &wanted, now).unwrap();
        assert_eq!(update.conditions[0].last_transition_time.0.as_second(), 100);
        assert_eq!(update.conditions[1].last_transition_time.0, now);
        // The patch removes what the new status leaves out.
        let patch = pool_status_patch(&update);
        assert_eq!(patch["status"]["ipv4"], Value::Null);
        assert_eq!(patch["status"]["inUse"], 2);
    }

    #[test]
    fn ip_mode_from_the_server_version() {
        assert!(!has_ip_mode("1", "20"));
        assert!(!has_ip_mode("1", "29+"));
        assert!(has_ip_mode("1", "30"));
        assert!(has_ip_mode("1", "33+"));
        assert!(has_ip_mode("2", "0"));
        assert!(!has_ip_mode("", ""));
    }
}
