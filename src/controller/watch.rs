//! The leader's view of the cluster: reflectors for Services, LoadBalancerPools, VirtualIPs
//! and Namespaces.
//!
//! Either its own, started afresh (a new list) each time this process becomes leader and
//! dropped (their tasks aborted) when it stops leading (`ferrovip controller`), or, in the
//! agent, the agent's own Service, pool and VirtualIP stores ([`SharedStores`]) with only the
//! Namespaces watched per term: one copy of 10,000 Services in the process instead of two,
//! and three watches fewer on the API server. A shared store was not listed for the term, so
//! before its first pass a term reads the Services' versions afresh (metadata only, a quorum
//! read) and waits until the store has caught up with every one of them
//! ([`Watches::caught_up`]): what a predecessor wrote before this term began is then in the
//! store, as a fresh list would have it. A store that does not catch up within
//! [`CATCH_UP`] (its watch is failing) is left for a term of its own watches.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::api::ListParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::watcher;
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::crd::{LoadBalancerPool, VirtualIP};
use crate::source::cluster::SharedStores;
use crate::source::reflect::{Echoes, WriteEchoes, reflect};

/// How long a term waits for shared stores to catch up with its fresh read.
pub const CATCH_UP: Duration = Duration::from_secs(10);

/// After this long behind, the Services still missing from a shared store are read singly
/// (at most PROBE_MAX of them) to learn which were deleted meanwhile.
const PROBE_AFTER: Duration = Duration::from_secs(1);
const PROBE_MAX: usize = 100;

/// The four stores and their change signal.
pub struct Watches {
    pub services: Store<Service>,
    pub pools: Store<LoadBalancerPool>,
    pub virtual_ips: Store<VirtualIP>,
    pub namespaces: Store<Namespace>,
    /// Bumped on every applied change.
    pub changes: watch::Receiver<u64>,
    listed: Vec<(Vec<Arc<AtomicBool>>, &'static str)>,
    /// The stores are the agent's, not listed for this term.
    shared: bool,
    /// Where the controller's accepted writes go: the Service and pool watches restart when
    /// they leave one unheard ([`crate::source::reflect`]).
    pub echoes: WriteEchoes,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Watches {
    /// Starts the four reflectors (each lists first).
    pub fn start(client: &Client) -> Watches {
        let (changed, changes) = watch::channel(0u64);
        let flags: [(Arc<AtomicBool>, &'static str); 4] = [
            (Arc::default(), "Service"),
            (Arc::default(), "LoadBalancerPool"),
            (Arc::default(), "VirtualIP"),
            (Arc::default(), "Namespace"),
        ];
        let mut tasks = Vec::new();
        let echoes = WriteEchoes::default();
        let services = spawn(
            Api::<Service>::all(client.clone()),
            &changed,
            &flags[0],
            Some(echoes.services.clone()),
            &mut tasks,
        );
        let pools = spawn(
            Api::<LoadBalancerPool>::all(client.clone()),
            &changed,
            &flags[1],
            Some(echoes.pools.clone()),
            &mut tasks,
        );
        let virtual_ips = spawn(
            Api::<VirtualIP>::all(client.clone()),
            &changed,
            &flags[2],
            None,
            &mut tasks,
        );
        let namespaces = spawn(
            Api::<Namespace>::all(client.clone()),
            &changed,
            &flags[3],
            None,
            &mut tasks,
        );
        Watches {
            services,
            pools,
            virtual_ips,
            namespaces,
            changes,
            listed: flags.into_iter().map(|(f, k)| (vec![f], k)).collect(),
            shared: false,
            echoes,
            tasks,
        }
    }

    /// The agent's stores, and a Namespace reflector of this term's own.
    pub fn shared(client: &Client, shared: &SharedStores) -> Watches {
        let namespace_listed = (Arc::<AtomicBool>::default(), "Namespace");
        let mut tasks = Vec::new();
        let namespaces = spawn(
            Api::<Namespace>::all(client.clone()),
            &shared.changes,
            &namespace_listed,
            None,
            &mut tasks,
        );
        let mut listed = shared.listed.clone();
        listed.push((vec![namespace_listed.0], namespace_listed.1));
        Watches {
            services: shared.services.clone(),
            pools: shared.pools.clone(),
            virtual_ips: shared.virtual_ips.clone(),
            namespaces,
            changes: shared.changes.subscribe(),
            listed,
            shared: true,
            echoes: shared.echoes.clone(),
            tasks,
        }
    }

    /// The kinds not listed yet.
    pub fn missing(&self) -> Vec<&'static str> {
        self.listed
            .iter()
            .filter(|(flags, _)| !flags.iter().all(|f| f.load(Ordering::Relaxed)))
            .map(|(_, kind)| *kind)
            .collect()
    }

    /// Resolves once every reflector has listed.
    pub async fn listed(&mut self) {
        let mut warned = false;
        while !self.missing().is_empty() {
            tokio::select! {
                r = self.changes.changed() => if r.is_err() { std::future::pending::<()>().await },
                () = tokio::time::sleep(Duration::from_secs(30)) => if !warned {
                    warn!(missing = ?self.missing(), "the Service controller is still waiting for its first lists (is the LoadBalancerPool CRD installed, does RBAC allow list and watch?)");
                    warned = true;
                },
            }
        }
        info!(
            services = self.services.state().len(),
            pools = self.pools.state().len(),
            virtual_ips = self.virtual_ips.state().len(),
            namespaces = self.namespaces.state().len(),
            shared = self.shared,
            "Service controller: cluster listed"
        );
    }

    /// Whether the Service store holds every Service at least at the version a read now
    /// returns: at once for this term's own (freshly listed) stores; for shared ones, a
    /// metadata-only list, then waiting (at most [`CATCH_UP`]) for the watch to deliver what
    /// the store lacks. False: the store did not catch up (or the read failed), and this
    /// term must not decide from it.
    pub async fn caught_up(&mut self, client: &Client) -> bool {
        if !self.shared {
            return true;
        }
        let api = Api::<Service>::all(client.clone());
        let fresh = match api.list_metadata(&ListParams::default()).await {
            Ok(list) => list
                .items
                .into_iter()
                .filter_map(|m| {
                    let meta = m.metadata;
                    Some((
                        (meta.namespace?, meta.name?),
                        meta.resource_version.unwrap_or_default(),
                    ))
                })
                .collect::<Vec<_>>(),
            Err(e) => {
                warn!(error = %e, "Service controller: cannot read the Services' versions; this term watches on its own");
                return false;
            }
        };
        let started = tokio::time::Instant::now();
        let deadline = started + CATCH_UP;
        let probe_at = started + PROBE_AFTER;
        let mut probe_due = false;
        let mut probed = false;
        let mut waiting = fresh;
        loop {
            waiting = behind(waiting, &store_versions(&self.services));
            if waiting.is_empty() {
                return true;
            }
            // A Service deleted since the read never reaches the store: after a moment, the
            // few still missing are read one by one, and the gone ones no longer waited for.
            if !probe_due && tokio::time::Instant::now() >= probe_at {
                probe_due = true;
            }
            if probe_due && !probed && waiting.len() <= PROBE_MAX {
                probed = true;
                let mut present = Vec::with_capacity(waiting.len());
                for entry in waiting {
                    let ((namespace, name), _) = &entry;
                    let gone = matches!(
                        Api::<Service>::namespaced(client.clone(), namespace)
                            .get_opt(name)
                            .await,
                        Ok(None)
                    );
                    if !gone {
                        present.push(entry);
                    }
                }
                waiting = present;
                continue;
            }
            debug!(
                behind = waiting.len(),
                "Service controller: waiting for the shared Service store"
            );
            let wake = if probe_due {
                deadline
            } else {
                probe_at.min(deadline)
            };
            tokio::select! {
                r = self.changes.changed() => if r.is_err() { return false },
                () = tokio::time::sleep_until(wake), if wake < deadline => {}
                () = tokio::time::sleep_until(deadline) => {
                    warn!(
                        behind = waiting.len(),
                        first = ?waiting.first().map(|((ns, name), _)| format!("{ns}/{name}")),
                        "Service controller: the agent's Service store has not caught up; this term watches on its own"
                    );
                    return false;
                }
            }
        }
    }

    /// Namespace → labels.
    pub fn namespace_labels(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.namespaces
            .state()
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect()
    }

    /// Addresses of VirtualIPs, never handed out: address → `VirtualIP <name>`.
    pub fn reserved(&self) -> BTreeMap<IpAddr, String> {
        reserved(&self.virtual_ips.state())
    }
}

/// The addresses of `virtual_ips` (`spec.addresses` are `address/prefix`).
pub fn reserved(virtual_ips: &[Arc<VirtualIP>]) -> BTreeMap<IpAddr, String> {
    let mut out = BTreeMap::new();
    for vip in virtual_ips {
        let name = vip.metadata.name.clone().unwrap_or_default();
        for address in &vip.spec.addresses {
            let text = address.split('/').next().unwrap_or(address);
            if let Ok(ip) = text.trim().parse::<IpAddr>() {
                out.entry(ip).or_insert_with(|| format!("VirtualIP {name}"));
            }
        }
    }
    out
}

/// (namespace, name) → resourceVersion of every Service in `store`.
fn store_versions(store: &Store<Service>) -> HashMap<(String, String), String> {
    store
        .state()
        .iter()
        .filter_map(|svc| {
            let meta = &svc.metadata;
            Some((
                (meta.namespace.clone()?, meta.name.clone()?),
                meta.resource_version.clone().unwrap_or_default(),
            ))
        })
        .collect()
}

/// The entries of a fresh read that `store` does not hold at their version or a later one.
/// resourceVersions are compared as the numbers (etcd revisions) the API server gives; one
/// that is not a number counts as caught up only when equal.
fn behind(
    fresh: Vec<((String, String), String)>,
    store: &HashMap<(String, String), String>,
) -> Vec<((String, String), String)> {
    fresh
        .into_iter()
        .filter(|(key, version)| match store.get(key) {
            None => true,
            Some(held) if held == version => false,
            Some(held) => match (held.parse::<u64>(), version.parse::<u64>()) {
                (Ok(held), Ok(version)) => held < version,
                _ => true,
            },
        })
        .collect()
}

fn spawn<K>(
    api: Api<K>,
    changed: &watch::Sender<u64>,
    listed: &(Arc<AtomicBool>, &'static str),
    echoes: Option<Echoes>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let stream = reflect(
        api,
        watcher::Config::default(),
        writer,
        slim::<K>,
        echoes,
        listed.1,
    );
    tasks.push(tokio::spawn(drive(
        stream,
        changed.clone(),
        listed.0.clone(),
        listed.1,
    )));
    reader
}

/// Drops what the controller never reads: managed fields and kubectl's last-applied copy.
fn slim<K: Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

async fn drive<S, K>(
    stream: S,
    changed: watch::Sender<u64>,
    listed: Arc<AtomicBool>,
    kind: &'static str,
) where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut failing = false;
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                if failing {
                    info!(kind, "Service controller: watch re-established");
                    failing = false;
                }
                match event {
                    watcher::Event::InitDone => {
                        listed.store(true, Ordering::Relaxed);
                        changed.send_modify(|g| *g += 1);
                    }
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) => {
                        changed.send_modify(|g| *g += 1);
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            }
            Err(e) => {
                if !failing {
                    warn!(kind, error = %e, "Service controller: watch failed; retrying with backoff");
                } else {
                    debug!(kind, error = %e, "Service controller: watch still failing");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, version: &str) -> ((String, String), String) {
        (("default".into(), name.into()), version.into())
    }

    #[test]
    fn a_shared_store_is_behind_until_it_holds_every_fresh_version_or_a_later_one() {
        let fresh = vec![
            entry("same", "100"),
            entry("older-in-store", "200"),
            entry("newer-in-store", "300"),
            entry("missing", "400"),
            entry("opaque", "v7"),
        ];
        let store: HashMap<(String, String), String> = [
            entry("same", "100"),
            entry("older-in-store", "150"),
            entry("newer-in-store", "310"),
            entry("opaque", "v6"),
            // Created after the read: no reason to wait.
            entry("created-since", "500"),
        ]
        .into_iter()
        .collect();
        let behind: Vec<String> = behind(fresh, &store)
            .into_iter()
            .map(|((_, name), _)| name)
            .collect();
        // Numbers compare as etcd revisions; a version that is not a number must match.
        assert_eq!(behind, ["older-in-store", "missing", "opaque"]);
        // Once the watch delivers them, nothing is behind.
        let caught_up: HashMap<(String, String), String> = [
            entry("older-in-store", "200"),
            entry("missing", "401"),
            entry("opaque", "v7"),
        ]
        .into_iter()
        .collect();
        let rest = vec![
            entry("older-in-store", "200"),
            entry("missing", "400"),
            entry("opaque", "v7"),
        ];
        assert!(super::behind(rest, &caught_up).is_empty());
    }
}
