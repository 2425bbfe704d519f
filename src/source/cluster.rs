//! The cluster source (Kubernetes mode): reflectors for VirtualIP, Node, Service and
//! EndpointSlice feed the same [`Snapshot`] the manifest files feed in standalone mode;
//! `crate::k8s::status` reports back.
//!
//! The stores keep their last contents while the API server is unreachable, so planning (and
//! VRRP) carry on unchanged through an outage; the watchers re-list with backoff and the
//! agent resyncs without flapping because an identical snapshot plans identically.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::cache::SnapshotCache;
use super::offload::off_runtime;
use super::reflect::{Echoes, WriteEchoes, reflect};
use crate::crd::service_lb::{allocation_record, served};
use crate::crd::{LoadBalancerPool, ServiceProtocol, ServiceRef, VirtualIP};
use crate::model::lb::{LbPort, LbService};
use crate::model::{Completeness, EndpointFacts, NodeFacts, ServiceEndpoints, Snapshot};

/// How long after a change more changes are awaited before planning, so that a burst (an
/// initial list, `kubectl apply` of many objects) plans once.
const DEBOUNCE: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error("cannot build a Kubernetes client (in-cluster config or KUBECONFIG): {0}")]
    Client(#[source] kube::Error),
}

impl K8sError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            K8sError::Client(_) => "client",
        }
    }
}

/// The cluster as the agent sees it.
pub struct ClusterSource {
    node: String,
    virtual_ips: Store<VirtualIP>,
    nodes: Store<Node>,
    services: Store<Service>,
    pools: Store<LoadBalancerPool>,
    /// Whether class-less `type: LoadBalancer` Services are served.
    serve_classless: bool,
    slices: Slices,
    /// Every change, for the status writer (see `Flags::any_change`); the planner's own
    /// signal is `seen`.
    any_change: watch::Sender<u64>,
    seen: watch::Receiver<u64>,
    endpoints_known: Arc<AtomicBool>,
    /// Which watches have listed once.
    listed: Listed,
    /// The agent's writes, checked against its watches.
    echoes: WriteEchoes,
    /// The last complete snapshot on disk: read at start, written on every change of a
    /// complete one.
    cache: Option<SnapshotCache>,
    cache_warned: bool,
    /// Planned from until every watch has listed (an API outage at start).
    cached: Option<Snapshot>,
    /// Whether the first complete list has been logged.
    complete_logged: bool,
}

/// Per watch, whether it has listed once (a resource the server does not serve counts as
/// listed: that it is absent is known).
#[derive(Clone, Default)]
struct Listed {
    virtual_ips: Arc<AtomicBool>,
    nodes: Arc<AtomicBool>,
    services: Arc<AtomicBool>,
    slices: Arc<AtomicBool>,
    pools: Arc<AtomicBool>,
    /// Some watch failed before listing: the API server is unreachable or refuses.
    failed: Arc<AtomicBool>,
}

impl Listed {
    fn missing(&self) -> Vec<&'static str> {
        [
            (&self.virtual_ips, "VirtualIP"),
            (&self.nodes, "Node"),
            (&self.services, "Service"),
            (&self.slices, "EndpointSlice"),
            (&self.pools, "LoadBalancerPool"),
        ]
        .into_iter()
        .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
        .map(|(_, kind)| kind)
        .collect()
    }

    fn complete(&self) -> bool {
        self.missing().is_empty()
    }
}

/// What one watch reports besides the store: listed once, failed, served.
#[derive(Clone)]
struct Flags {
    /// Wakes the planner.
    changed: watch::Sender<u64>,
    /// Wakes the status writer: every change, also those the planner does not read.
    any_change: watch::Sender<u64>,
    /// What of an object the planner reads, when not all of it: an object whose fingerprint
    /// is unchanged wakes only the status writer. For VirtualIPs, whose status changes (every
    /// node's write, 30,000 of them when 10,000 VirtualIPs settle on three nodes) would
    /// otherwise each make every agent copy the store and plan again.
    planner_view: Option<PlannerView>,
    listed: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    served: Option<Arc<AtomicBool>>,
    /// A resource the server may not serve (its CRD not installed): not found counts as
    /// listed (empty), and the watch keeps retrying.
    optional: bool,
    /// Wakes the Service controller, which reads this store too ([`SharedStores`]):
    /// on the changes that wake the planner.
    controller: Option<watch::Sender<u64>>,
}

/// The fingerprint of what the planner reads of an object (see `Flags::planner_view`).
type PlannerView = fn(&dyn std::any::Any) -> Option<(String, u64)>;

/// A VirtualIP's spec (its `generation`: the status subresource keeps status writes from
/// bumping it), identity, age and deletion: what the planner reads of it.
fn virtual_ip_view(object: &dyn std::any::Any) -> Option<(String, u64)> {
    use std::hash::{Hash, Hasher};
    let vip = object.downcast_ref::<VirtualIP>()?;
    let meta = &vip.metadata;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    meta.uid.hash(&mut h);
    meta.generation.hash(&mut h);
    meta.deletion_timestamp.is_some().hash(&mut h);
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0.as_nanosecond())
        .hash(&mut h);
    Some((meta.name.clone()?, h.finish()))
}

/// With a saved snapshot, how long the first lists may take before the agent starts from
/// the snapshot instead, when no list failed outright (a failed list uses it at once). An
/// API server that answers lists a node's share of a cluster well within this; one that
/// does not answer (its VIP held by nobody, packets dropped) would otherwise keep the node
/// out of the election for a TCP timeout. Short, because with `--restart-hold` the held
/// addresses wait for this agent, and because a snapshot identical to the lists that follow
/// plans identically: starting from it early costs nothing when it is current.
pub const CACHE_GRACE: Duration = Duration::from_secs(2);

/// What the status writer reads: the stores and a change signal of its own.
pub struct Stores {
    pub virtual_ips: Store<VirtualIP>,
    pub nodes: Store<Node>,
    /// For the master annotation of load-balancer addresses.
    pub services: Store<Service>,
    pub changes: watch::Receiver<u64>,
    /// Where the status writer's accepted writes go, to be heard back through the watches.
    pub echoes: WriteEchoes,
}

impl ClusterSource {
    /// Starts the watchers (VirtualIPs, Nodes, Services, EndpointSlices, pools);
    /// [`Watching::listed`] waits for their first lists. With `controller`, the Service, pool
    /// and VirtualIP stores can be lent to the Service controller
    /// ([`Watching::controller_stores`]).
    pub fn watch(
        client: Client,
        node: String,
        cache: Option<PathBuf>,
        controller: bool,
    ) -> Watching {
        let changed = watch::Sender::new(0u64);
        let any_change = watch::Sender::new(0u64);
        let controller_changes = controller.then(|| watch::Sender::new(0u64));
        let endpoints_known = Arc::new(AtomicBool::new(false));
        let pools_served = Arc::new(AtomicBool::new(false));
        let listed = Listed::default();
        let echoes = WriteEchoes::default();
        let flags = |flag: &Arc<AtomicBool>, served: Option<Arc<AtomicBool>>| Flags {
            changed: changed.clone(),
            any_change: any_change.clone(),
            listed: flag.clone(),
            failed: listed.failed.clone(),
            served,
            optional: false,
            planner_view: None,
            controller: None,
        };
        let virtual_ips = spawn_reflector(
            Api::<VirtualIP>::all(client.clone()),
            Flags {
                planner_view: Some(virtual_ip_view),
                controller: controller_changes.clone(),
                ..flags(&listed.virtual_ips, None)
            },
            Some(echoes.virtual_ips.clone()),
        );
        let nodes = spawn_reflector(
            Api::<Node>::all(client.clone()),
            flags(&listed.nodes, None),
            None,
        );
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            Flags {
                controller: controller_changes.clone(),
                ..flags(&listed.services, None)
            },
            Some(echoes.services.clone()),
        );
        let pools = spawn_reflector(
            Api::<LoadBalancerPool>::all(client.clone()),
            Flags {
                optional: true,
                controller: controller_changes.clone(),
                ..flags(&listed.pools, Some(pools_served.clone()))
            },
            Some(echoes.pools.clone()),
        );
        let slices = spawn_slices(client, flags(&listed.slices, Some(endpoints_known.clone())));
        Watching {
            node,
            cache,
            virtual_ips,
            nodes,
            services,
            pools,
            pools_served,
            slices,
            changed,
            any_change,
            controller_changes,
            endpoints_known,
            listed,
            echoes,
        }
    }
}

/// The agent's stores, lent to the Service controller (`controller::watch`).
#[derive(Clone)]
pub struct SharedStores {
    pub services: Store<Service>,
    pub pools: Store<LoadBalancerPool>,
    pub virtual_ips: Store<VirtualIP>,
    /// Per kind, the flags that must all be set for it to count as listed (for pools, also
    /// that the server served them: the agent takes a pool CRD it cannot list as "no pools",
    /// which the controller must not allocate from).
    pub listed: Vec<(Vec<Arc<AtomicBool>>, &'static str)>,
    /// Bumped by the agent's reflectors on every change the controller reads.
    pub changes: watch::Sender<u64>,
    /// Where the controller's accepted writes go, to be heard back through these stores'
    /// watches.
    pub echoes: WriteEchoes,
}

/// A [`ClusterSource`] whose watches run and may not have listed yet.
pub struct Watching {
    node: String,
    cache: Option<PathBuf>,
    virtual_ips: Store<VirtualIP>,
    nodes: Store<Node>,
    services: Store<Service>,
    pools: Store<LoadBalancerPool>,
    /// The pool watch has had an answer from the server (not "taken as empty").
    pools_served: Arc<AtomicBool>,
    slices: Slices,
    changed: watch::Sender<u64>,
    any_change: watch::Sender<u64>,
    controller_changes: Option<watch::Sender<u64>>,
    endpoints_known: Arc<AtomicBool>,
    listed: Listed,
    echoes: WriteEchoes,
}

impl Watching {
    /// The stores the Service controller reads, when [`ClusterSource::watch`] was asked for
    /// them.
    pub fn controller_stores(&self) -> Option<SharedStores> {
        Some(SharedStores {
            services: self.services.clone(),
            pools: self.pools.clone(),
            virtual_ips: self.virtual_ips.clone(),
            listed: vec![
                (vec![self.listed.services.clone()], "Service"),
                (
                    vec![self.listed.pools.clone(), self.pools_served.clone()],
                    "LoadBalancerPool",
                ),
                (vec![self.listed.virtual_ips.clone()], "VirtualIP"),
            ],
            changes: self.controller_changes.clone()?,
            echoes: self.echoes.clone(),
        })
    }

    /// Waits until every watch has listed once. With a snapshot saved in `cache` by an
    /// earlier run, it waits only until a list fails or [`CACHE_GRACE`] passes, and then
    /// plans from the snapshot until the lists complete.
    pub async fn listed(self) -> ClusterSource {
        let Watching {
            node,
            cache,
            virtual_ips,
            nodes,
            services,
            pools,
            pools_served: _,
            slices,
            changed,
            any_change,
            controller_changes: _,
            endpoints_known,
            listed,
            echoes,
        } = self;
        let mut cache = cache.map(|path| SnapshotCache::new(path, node.clone()));
        let cached = match cache.as_mut().map(SnapshotCache::load) {
            Some(Ok(Some(cached))) => Some(cached),
            Some(Ok(None)) | None => None,
            Some(Err(e)) => {
                warn!(error = %e, "the saved cluster snapshot is not used");
                None
            }
        };
        let mut seen = changed.subscribe();
        let started = tokio::time::Instant::now();
        let mut waiting_logged = false;
        let use_cache = loop {
            if listed.complete() {
                break false;
            }
            if cached.is_some()
                && (listed.failed.load(Ordering::Relaxed) || started.elapsed() >= CACHE_GRACE)
            {
                break true;
            }
            if !waiting_logged {
                info!(missing = ?listed.missing(), "waiting for the first list of the cluster state");
                waiting_logged = true;
            }
            let wake = if cached.is_some() {
                CACHE_GRACE.saturating_sub(started.elapsed())
            } else {
                // Say now and then what is still missing (RBAC, an unreachable server).
                Duration::from_secs(30)
            };
            tokio::select! {
                r = seen.changed() => if r.is_err() { std::future::pending::<()>().await },
                () = tokio::time::sleep(wake) => if cached.is_none() {
                    warn!(missing = ?listed.missing(), "still waiting for the first list of the cluster state (is the API server reachable, does RBAC allow list and watch?)");
                },
            }
        };
        let cached = match (use_cache, cached) {
            (true, Some(c)) => {
                warn!(
                    path = %cache.as_ref().map(|c| c.path().display().to_string()).unwrap_or_default(),
                    age_s = c.age.as_secs(),
                    virtual_ips = c.snapshot.virtual_ips.len(),
                    nodes = c.snapshot.nodes.len(),
                    missing = ?listed.missing(),
                    "the API server cannot be listed: starting from the saved cluster snapshot until it can"
                );
                Some(c.snapshot)
            }
            _ => None,
        };
        let seen = changed.subscribe();
        let mut source = ClusterSource {
            node,
            virtual_ips,
            nodes,
            services,
            pools,
            serve_classless: true,
            slices,
            any_change,
            seen,
            endpoints_known,
            listed,
            echoes,
            cache,
            cache_warned: false,
            cached,
            complete_logged: false,
        };
        source.log_complete();
        source
    }
}

impl ClusterSource {
    /// Whether class-less `type: LoadBalancer` Services count (default true; the agent's
    /// `--ignore-classless-services` turns it off).
    pub fn set_serve_classless(&mut self, serve: bool) {
        self.serve_classless = serve;
    }

    /// Whether every watch has listed once (the stores, not a saved snapshot, are planned
    /// from).
    pub fn complete(&self) -> bool {
        self.listed.complete()
    }

    fn log_complete(&mut self) {
        if self.complete_logged || !self.listed.complete() {
            return;
        }
        self.complete_logged = true;
        info!(
            virtual_ips = self.virtual_ips.state().len(),
            nodes = self.nodes.state().len(),
            services = self.services.state().len(),
            endpoint_slices = self.slices.state().len(),
            "cluster state listed"
        );
    }

    /// Resolves after the next change. Cancel-safe (it is raced against other wake-ups): a
    /// change is only marked seen when this resolves. Call [`ClusterSource::settle`] after.
    pub async fn changed(&mut self) {
        if self.seen.changed().await.is_err() {
            // The watcher tasks never end; if they did, there is nothing left to wait for.
            std::future::pending::<()>().await;
        }
    }

    /// Lets a burst of changes (an initial list, `kubectl apply` of many objects) arrive, so
    /// that it plans once.
    pub async fn settle(&mut self) {
        tokio::time::sleep(DEBOUNCE).await;
        self.seen.mark_unchanged();
    }

    /// The stores for the status writer.
    pub fn clone_stores(&self) -> Stores {
        Stores {
            virtual_ips: self.virtual_ips.clone(),
            nodes: self.nodes.clone(),
            services: self.services.clone(),
            changes: self.any_change.subscribe(),
            echoes: self.echoes.clone(),
        }
    }

    pub fn virtual_ips(&self) -> &Store<VirtualIP> {
        &self.virtual_ips
    }

    pub fn nodes(&self) -> &Store<Node> {
        &self.nodes
    }

    /// The snapshot to plan from. Local facts other than endpoints are the caller's.
    ///
    /// Once every watch has listed: the stores (`Complete`), saved to the cache file when
    /// they changed what the planner reads. Before: the saved snapshot (`Cached`) if the
    /// agent started from one, otherwise the stores as far as listed (`Partial`, never
    /// planned from).
    pub async fn snapshot(&mut self) -> Snapshot {
        if !self.listed.complete() {
            if let Some(cached) = &self.cached {
                return cached.clone();
            }
            return self.stores_snapshot(Completeness::Partial);
        }
        self.log_complete();
        if self.cached.take().is_some() {
            info!(
                "every watch has listed: planning from the API server again instead of the saved snapshot"
            );
        }
        // Off the runtime thread (`off_runtime`), the save too: with 10,000 Services the copy
        // took ~50 ms, and the save serializes it and syncs a file.
        let stores = self.stores();
        let mut cache = self.cache.take();
        let mut warned = self.cache_warned;
        let (snapshot, cache, warned) = off_runtime(move || {
            let snapshot = stores.snapshot(Completeness::Complete);
            if let Some(cache) = cache.as_mut() {
                cache.save_logged(&snapshot, &mut warned);
            }
            (snapshot, cache, warned)
        })
        .await;
        self.cache = cache;
        self.cache_warned = warned;
        snapshot
    }

    fn stores_snapshot(&self, completeness: Completeness) -> Snapshot {
        self.stores().snapshot(completeness)
    }

    /// The stores the planner reads (handles: shared with the watches that fill them).
    fn stores(&self) -> StoreSet {
        StoreSet {
            virtual_ips: self.virtual_ips.clone(),
            nodes: self.nodes.clone(),
            services: self.services.clone(),
            pools: self.pools.clone(),
            slices: self.slices.clone(),
            serve_classless: self.serve_classless,
            endpoints_known: self.endpoints_known.load(Ordering::Relaxed),
            node: self.node.clone(),
        }
    }
}

/// What a snapshot is built from.
struct StoreSet {
    virtual_ips: Store<VirtualIP>,
    nodes: Store<Node>,
    services: Store<Service>,
    pools: Store<LoadBalancerPool>,
    slices: Slices,
    serve_classless: bool,
    endpoints_known: bool,
    node: String,
}

impl StoreSet {
    fn snapshot(&self, completeness: Completeness) -> Snapshot {
        let mut virtual_ips: Vec<VirtualIP> = self
            .virtual_ips
            .state()
            .iter()
            .filter(|v| v.meta().deletion_timestamp.is_none())
            // Without status, which the planner does not read: with 10,000 VirtualIPs and
            // three nodes' entries each, it is most of the copy the agent keeps.
            .map(|v| VirtualIP {
                metadata: v.metadata.clone(),
                spec: v.spec.clone(),
                status: None,
            })
            .collect();
        // Oldest first: earlier resources win conflicts, everywhere alike.
        virtual_ips.sort_by(|a, b| {
            let key = |v: &VirtualIP| {
                (
                    v.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    v.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let nodes = self
            .nodes
            .state()
            .iter()
            .filter_map(|n| Some((n.metadata.name.clone()?, node_facts(n))))
            .collect();
        let mut snapshot = Snapshot {
            virtual_ips,
            cluster: true,
            nodes,
            completeness,
            ..Snapshot::default()
        };
        snapshot.local.endpoints_known = self.endpoints_known;
        let slices = self.slices.state();
        snapshot.local.local_ready_endpoints = local_ready_endpoints(&slices, &self.node);
        let services = self.services.state();
        snapshot.pools = self
            .pools
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| Some((p.metadata.name.clone()?, p.spec.template.clone())))
            .collect();
        snapshot.load_balancers = load_balancers(&services, self.serve_classless);
        let mut wanted = referenced_services(&snapshot.virtual_ips);
        // Only IPVS-forwarded addresses need endpoints (kube-proxy forwards the others).
        wanted.extend(
            snapshot
                .load_balancers
                .iter()
                .filter(|lb| {
                    lb.record.values().any(|pool| {
                        snapshot
                            .pools
                            .get(pool)
                            .is_some_and(|t| t.forwarding == crate::crd::ServiceForwarding::IPVS)
                    })
                })
                .map(|lb| lb.service.clone()),
        );
        snapshot.service_endpoints = service_endpoints(&wanted, &services, &slices);
        snapshot.local.services = self
            .services
            .state()
            .iter()
            .filter_map(|svc| {
                Some(ServiceRef {
                    namespace: svc.metadata.namespace.clone()?,
                    name: svc.metadata.name.clone()?,
                })
            })
            .collect();
        snapshot
    }
}

/// The EndpointSlice stores: one per version, only the one the API server serves is filled.
#[derive(Clone)]
struct Slices {
    v1: Store<EndpointSlice>,
    v1beta1: Store<DynamicObject>,
}

impl Slices {
    fn state(&self) -> Vec<Arc<EndpointSlice>> {
        let mut slices = self.v1.state();
        slices.extend(self.v1beta1.state().iter().filter_map(|o| {
            let mut value = serde_json::to_value(&**o).ok()?;
            value["apiVersion"] = "discovery.k8s.io/v1".into();
            // v1beta1 names the node in `topology` (its `nodeName` is feature-gated).
            for e in value["endpoints"].as_array_mut().into_iter().flatten() {
                if e.get("nodeName").is_none()
                    && let Some(host) = e["topology"]["kubernetes.io/hostname"].as_str()
                {
                    e["nodeName"] = host.to_string().into();
                }
            }
            serde_json::from_value(value).ok().map(Arc::new)
        }));
        slices
    }
}

/// Which EndpointSlice version the API server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SliceVersion {
    V1,
    /// Kubernetes 1.19/1.20 serve EndpointSlices only as v1beta1, whose fields the agent
    /// reads (addresses, conditions, nodeName, ports) are those of v1.
    V1beta1,
}

/// The served EndpointSlice version (`None`: neither), or why the server could not tell.
async fn slice_version(client: &Client) -> Result<Option<SliceVersion>, kube::Error> {
    for (group, version) in [
        ("discovery.k8s.io/v1", SliceVersion::V1),
        ("discovery.k8s.io/v1beta1", SliceVersion::V1beta1),
    ] {
        match client.list_api_group_resources(group).await {
            Ok(list) if list.resources.iter().any(|r| r.name == "endpointslices") => {
                return Ok(Some(version));
            }
            Ok(_) => {}
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// How often a resource the API server does not serve is looked for again.
const UNSERVED_RECHECK: Duration = Duration::from_secs(300);
/// Retries of the version discovery while the server cannot be reached.
const DISCOVERY_RETRY: std::ops::RangeInclusive<Duration> =
    Duration::from_millis(500)..=Duration::from_secs(30);

/// The EndpointSlice reflector, in the version the server serves. Which one is found out
/// first, retried while the server is unreachable (an agent started during an outage must
/// not settle on the wrong version), and rechecked now and then while neither is served
/// (that it is not served counts as listed: the planner then knows no local endpoints).
fn spawn_slices(client: Client, flags: Flags) -> Slices {
    let (v1, v1_writer) = reflector::store();
    let resource = ApiResource {
        group: "discovery.k8s.io".into(),
        version: "v1beta1".into(),
        api_version: "discovery.k8s.io/v1beta1".into(),
        kind: "EndpointSlice".into(),
        plural: "endpointslices".into(),
    };
    let v1beta1_writer = reflector::store::Writer::new(resource.clone());
    let v1beta1 = v1beta1_writer.as_reader();
    tokio::spawn(async move {
        let mut warned = false;
        let mut retry = *DISCOVERY_RETRY.start();
        let version = loop {
            match slice_version(&client).await {
                Ok(Some(version)) => break version,
                Ok(None) => {
                    if !warned {
                        warn!(
                            "the API server serves no EndpointSlices (discovery.k8s.io/v1 needs Kubernetes 1.21+, v1beta1 1.17+); local endpoint health and serviceRef backends are not used"
                        );
                        warned = true;
                        flags.listed.store(true, Ordering::Relaxed);
                        flags.changed.send_modify(|g| *g += 1);
                    }
                    tokio::time::sleep(UNSERVED_RECHECK).await;
                }
                Err(e) => {
                    if !flags.listed.load(Ordering::Relaxed)
                        && !flags.failed.swap(true, Ordering::Relaxed)
                    {
                        flags.changed.send_modify(|g| *g += 1);
                    }
                    debug!(error = %e, "cannot tell which EndpointSlice version is served; retrying");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(*DISCOVERY_RETRY.end());
                }
            }
        };
        match version {
            SliceVersion::V1 => {
                let api = Api::<EndpointSlice>::all(client);
                let stream = reflector::reflector(
                    v1_writer,
                    watcher(api, watcher::Config::default()).modify(slim::<EndpointSlice>),
                )
                .default_backoff();
                drive(stream, flags, "EndpointSlice").await;
            }
            SliceVersion::V1beta1 => {
                info!(
                    "the API server serves EndpointSlice discovery.k8s.io/v1beta1 only: using it"
                );
                let api = Api::<DynamicObject>::all_with(client, &resource);
                let stream = reflector::reflector(
                    v1beta1_writer,
                    watcher(api, watcher::Config::default()).modify(slim::<DynamicObject>),
                )
                .default_backoff();
                drive(stream, flags, "EndpointSlice").await;
            }
        }
    });
    Slices { v1, v1beta1 }
}

/// Whether `event` changes what the planner reads (always, without a `view`), keeping the
/// fingerprints up to date.
fn planner_reads<K: 'static>(
    views: &mut HashMap<String, u64>,
    view: Option<PlannerView>,
    event: &watcher::Event<K>,
) -> bool {
    let Some(view) = view else {
        return true;
    };
    match event {
        watcher::Event::Apply(object) => match view(object) {
            Some((name, print)) => views.insert(name, print) != Some(print),
            None => true,
        },
        watcher::Event::Delete(object) => {
            if let Some((name, _)) = view(object) {
                views.remove(&name);
            }
            true
        }
        // A re-list may have missed deletions: start over.
        _ => {
            views.clear();
            true
        }
    }
}

/// Runs one reflector in its own task; every applied change wakes the planner.
/// A reflector of `api` (restarted when it leaves one of `echoes` unheard, see
/// [`reflect`]).
fn spawn_reflector<K>(api: Api<K>, flags: Flags, echoes: Option<Echoes>) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    let (reader, writer) = reflector::store();
    let kind = short_kind::<K>();
    let stream = reflect(
        api,
        watcher::Config::default(),
        writer,
        slim::<K>,
        echoes,
        kind,
    );
    tokio::spawn(drive(stream, flags, kind));
    reader
}

/// The last part of a type's name (`VirtualIP`, `Service`), for the log.
fn short_kind<K>() -> &'static str {
    let name = std::any::type_name::<K>();
    name.rsplit("::").next().unwrap_or(name)
}

/// Drops what the agent never reads before an object enters a store: managed fields and
/// kubectl's last-applied copy (together often larger than the object), and a Node's image
/// list. With a thousand VirtualIPs this is most of the agent's memory.
fn slim<K: Resource + 'static>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
    if let Some(node) = (object as &mut dyn std::any::Any).downcast_mut::<Node>()
        && let Some(status) = node.status.as_mut()
    {
        status.images = None;
    }
}

async fn drive<S, K: 'static>(stream: S, flags: Flags, kind: &'static str)
where
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>>,
{
    let mut failing = false;
    let mut views: HashMap<String, u64> = HashMap::new();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                // `Init` only announces a list attempt; it is no sign the server answers.
                if matches!(event, watcher::Event::Init) {
                    continue;
                }
                if failing {
                    info!(kind, "watch re-established");
                    failing = false;
                }
                if let Some(s) = &flags.served {
                    s.store(true, Ordering::Relaxed);
                }
                if matches!(event, watcher::Event::InitDone) {
                    flags.listed.store(true, Ordering::Relaxed);
                }
                // Bookmarks and the start of a re-list change nothing yet.
                if matches!(
                    event,
                    watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone
                ) {
                    flags.any_change.send_modify(|g| *g += 1);
                    if planner_reads(&mut views, flags.planner_view, &event) {
                        flags.changed.send_modify(|g| *g += 1);
                        if let Some(controller) = &flags.controller {
                            controller.send_modify(|g| *g += 1);
                        }
                    }
                }
            }
            Err(e) => {
                let not_served = is_not_found(&e);
                let forbidden = status_code(&e) == Some(403);
                if flags.optional && (not_served || forbidden) {
                    // Its CRD is not installed, or RBAC predates it: taken as empty, so that
                    // an upgraded agent with old RBAC still plans its VirtualIPs. The watch
                    // retries.
                    if let (Some(s), true) = (&flags.served, not_served) {
                        s.store(false, Ordering::Relaxed);
                    }
                    if !flags.listed.swap(true, Ordering::Relaxed) {
                        if forbidden {
                            warn!(
                                kind,
                                error = %e,
                                "not allowed to list this resource (RBAC of an older release?): taken as empty until allowed; apply config/rbac"
                            );
                        } else {
                            info!(
                                kind,
                                "the API server does not serve this resource (CRD not installed?): taken as empty; the watch keeps retrying"
                            );
                        }
                        flags.changed.send_modify(|g| *g += 1);
                    }
                    failing = true;
                    continue;
                }
                if !flags.listed.load(Ordering::Relaxed)
                    && !flags.failed.swap(true, Ordering::Relaxed)
                {
                    // Wakes an agent that waits to start from its saved snapshot.
                    flags.changed.send_modify(|g| *g += 1);
                }
                if let (Some(s), true) = (&flags.served, not_served) {
                    // Served once, gone now (a downgrade): stop counting on it.
                    if s.swap(false, Ordering::Relaxed) {
                        warn!(kind, "the API server stopped serving this resource");
                        flags.changed.send_modify(|g| *g += 1);
                    }
                } else if !failing {
                    warn!(kind, error = %e, "watch failed; VRRP carries on with the last known state and the watch retries with backoff");
                } else {
                    debug!(kind, error = %e, "watch still failing");
                }
                failing = true;
            }
        }
    }
}

fn is_not_found(e: &watcher::Error) -> bool {
    status_code(e) == Some(404)
}

fn status_code(e: &watcher::Error) -> Option<u16> {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(status))
        | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

/// The parts of a Node the planner uses.
pub fn node_facts(node: &Node) -> NodeFacts {
    let status = node.status.as_ref();
    let condition = |kind: &str| {
        status
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == kind))
            .map(|c| c.status == "True")
    };
    let internal_ips = status
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter(|a| a.type_ == "InternalIP")
        .filter_map(|a| a.address.parse::<IpAddr>().ok())
        .collect();
    NodeFacts {
        labels: node.metadata.labels.clone().unwrap_or_default(),
        ready: condition("Ready"),
        network_unavailable: condition("NetworkUnavailable"),
        unschedulable: node
            .spec
            .as_ref()
            .and_then(|s| s.unschedulable)
            .unwrap_or(false),
        internal_ips,
    }
}

/// The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label).
fn slice_service(slice: &EndpointSlice) -> Option<ServiceRef> {
    Some(ServiceRef {
        namespace: slice.metadata.namespace.clone()?,
        name: slice
            .metadata
            .labels
            .as_ref()?
            .get("kubernetes.io/service-name")?
            .clone(),
    })
}

/// Ready (and not terminating) endpoints on `node`, per Service.
pub fn local_ready_endpoints(
    slices: &[Arc<EndpointSlice>],
    node: &str,
) -> BTreeMap<ServiceRef, usize> {
    let mut out = BTreeMap::new();
    for slice in slices {
        let Some(service) = slice_service(slice) else {
            continue;
        };
        let ready = slice
            .endpoints
            .iter()
            .filter(|e| e.node_name.as_deref() == Some(node))
            .filter(|e| {
                let c = e.conditions.as_ref();
                // Absent `ready` means ready (API convention); terminating ones do not count.
                c.and_then(|c| c.ready).unwrap_or(true)
                    && !c.and_then(|c| c.terminating).unwrap_or(false)
            })
            .count();
        *out.entry(service).or_insert(0) += ready;
    }
    out
}

/// The Services that VirtualIPs forward to (`backends.serviceRef`).
pub fn referenced_services(virtual_ips: &[VirtualIP]) -> BTreeSet<ServiceRef> {
    virtual_ips
        .iter()
        .flat_map(|v| &v.spec.services)
        .filter_map(|s| s.backends.service_ref.as_ref())
        .map(|r| ServiceRef {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
        })
        .collect()
}

/// The served Services of `type: LoadBalancer` that carry a readable, non-empty allocation
/// record (being deleted: no longer). A malformed record is ignored (the leader rewrites it).
pub fn load_balancers(services: &[Arc<Service>], serve_classless: bool) -> Vec<LbService> {
    services
        .iter()
        .filter(|svc| svc.metadata.deletion_timestamp.is_none() && served(svc, serve_classless))
        .filter_map(|svc| {
            let record = allocation_record(svc)?.ok().filter(|r| !r.is_empty())?;
            let spec = svc.spec.as_ref()?;
            let ports = spec
                .ports
                .iter()
                .flatten()
                .filter_map(|p| {
                    let protocol = match p.protocol.as_deref() {
                        None | Some("TCP") => ServiceProtocol::TCP,
                        Some("UDP") => ServiceProtocol::UDP,
                        Some("SCTP") => ServiceProtocol::SCTP,
                        Some(_) => return None,
                    };
                    Some(LbPort {
                        name: p.name.clone().unwrap_or_default(),
                        protocol,
                        port: u16::try_from(p.port).ok()?,
                    })
                })
                .collect();
            Some(LbService {
                service: ServiceRef {
                    namespace: svc.metadata.namespace.clone()?,
                    name: svc.metadata.name.clone()?,
                },
                created: svc.metadata.creation_timestamp.clone(),
                record,
                ports,
                local: spec.external_traffic_policy.as_deref() == Some("Local"),
                proxy_ip_mode: svc
                    .status
                    .as_ref()
                    .and_then(|s| s.load_balancer.as_ref())
                    .and_then(|lb| lb.ingress.as_ref())
                    .is_some_and(|ingress| {
                        !ingress.is_empty()
                            && ingress
                                .iter()
                                .all(|i| i.ip_mode.as_deref() == Some("Proxy"))
                    }),
            })
        })
        .collect()
}

/// Ports and endpoints of the `wanted` Services.
pub fn service_endpoints(
    wanted: &BTreeSet<ServiceRef>,
    services: &[Arc<Service>],
    slices: &[Arc<EndpointSlice>],
) -> BTreeMap<ServiceRef, ServiceEndpoints> {
    let mut out = BTreeMap::new();
    if wanted.is_empty() {
        return out;
    }
    for svc in services {
        let (Some(namespace), Some(name)) = (&svc.metadata.namespace, &svc.metadata.name) else {
            continue;
        };
        let key = ServiceRef {
            namespace: namespace.clone(),
            name: name.clone(),
        };
        if !wanted.contains(&key) {
            continue;
        }
        let ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port).ok()?,
                ))
            })
            .collect();
        out.insert(
            key,
            ServiceEndpoints {
                ports,
                endpoints: Vec::new(),
            },
        );
    }
    for slice in slices {
        let Some(entry) = slice_service(slice).and_then(|svc| out.get_mut(&svc)) else {
            continue;
        };
        let ports: Vec<(String, u16)> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some((
                    p.name.clone().unwrap_or_default(),
                    u16::try_from(p.port?).ok()?,
                ))
            })
            .collect();
        for e in &slice.endpoints {
            let c = e.conditions.as_ref();
            // API conventions: an absent `ready` means ready; absent `serving` follows ready.
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let ready = c.and_then(|c| c.ready).unwrap_or(true) && !terminating;
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            for address in &e.addresses {
                let Ok(address) = address.parse() else {
                    continue;
                };
                entry.endpoints.push(EndpointFacts {
                    address,
                    ports: ports.clone(),
                    ready,
                    draining: terminating && serving,
                    node: e.node_name.clone(),
                });
            }
        }
    }
    out
}

/// A client from the in-cluster service account or KUBECONFIG.
pub async fn client() -> Result<Client, K8sError> {
    Client::try_default().await.map_err(K8sError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{NodeAddress, NodeCondition, NodeSpec, NodeStatus};
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions};
    use kube::api::ObjectMeta;

    #[test]
    fn node_facts_read_conditions_labels_and_addresses() {
        let node = Node {
            metadata: ObjectMeta {
                name: Some("node-a".into()),
                labels: Some([("zone".to_string(), "a".to_string())].into()),
                ..ObjectMeta::default()
            },
            spec: Some(NodeSpec {
                unschedulable: Some(true),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![
                    NodeCondition {
                        type_: "Ready".into(),
                        status: "False".into(),
                        ..NodeCondition::default()
                    },
                    NodeCondition {
                        type_: "NetworkUnavailable".into(),
                        status: "True".into(),
                        ..NodeCondition::default()
                    },
                ]),
                addresses: Some(vec![
                    NodeAddress {
                        type_: "Hostname".into(),
                        address: "node-a".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "192.0.2.11".into(),
                    },
                    NodeAddress {
                        type_: "InternalIP".into(),
                        address: "2001:db8::11".into(),
                    },
                ]),
                ..NodeStatus::default()
            }),
        };
        let f = node_facts(&node);
        assert_eq!(f.ready, Some(false));
        assert_eq!(f.network_unavailable, Some(true));
        assert!(f.unschedulable);
        assert_eq!(f.labels["zone"], "a");
        assert_eq!(f.internal_ips.len(), 2);
        assert_eq!(node_facts(&Node::default()).ready, None);
    }

    #[test]
    fn local_endpoints_count_ready_ones_on_this_node() {
        let endpoint = |node: &str, ready: Option<bool>, terminating: Option<bool>| Endpoint {
            addresses: vec!["10.1.0.1".into()],
            node_name: Some(node.into()),
            conditions: Some(EndpointConditions {
                ready,
                serving: None,
                terminating,
            }),
            ..Endpoint::default()
        };
        let slice = |name: &str, service: &str, endpoints| {
            Arc::new(EndpointSlice {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some("web".into()),
                    labels: Some(
                        [(
                            "kubernetes.io/service-name".to_string(),
                            service.to_string(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                address_type: "IPv4".into(),
                endpoints,
                ports: None,
            })
        };
        let slices = vec![
            slice(
                "frontend-1",
                "frontend",
                vec![
                    endpoint("node-a", Some(true), None),
                    endpoint("node-a", None, None),
                    endpoint("node-a", Some(false), None),
                    endpoint("node-a", Some(true), Some(true)),
                    endpoint("node-b", Some(true), None),
                ],
            ),
            slice(
                "frontend-2",
                "frontend",
                vec![endpoint("node-a", Some(true), None)],
            ),
            slice(
                "other-1",
                "other",
                vec![endpoint("node-b", Some(true), None)],
            ),
        ];
        let counts = local_ready_endpoints(&slices, "node-a");
        let key = |n: &str| ServiceRef {
            namespace: "web".into(),
            name: n.into(),
        };
        assert_eq!(counts[&key("frontend")], 3);
        assert_eq!(counts[&key("other")], 0);
    }

    #[test]
    fn service_endpoints_give_each_address_its_state_and_the_slice_ports() {
        let endpoint =
            |addr: &str, ready: Option<bool>, serving: Option<bool>, terminating| Endpoint {
                addresses: vec![addr.into()],
                conditions: Some(EndpointConditions {
                    ready,
                    serving,
                    terminating,
                }),
                ..Endpoint::default()
            };
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some("frontend-1".into()),
                namespace: Some("web".into()),
                labels: Some(
                    [(
                        "kubernetes.io/service-name".to_string(),
                        "frontend".to_string(),
                    )]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![
                endpoint("10.1.0.1", Some(true), None, None),
                endpoint("10.1.0.2", Some(false), Some(true), Some(true)),
                endpoint("10.1.0.3", Some(false), Some(false), Some(true)),
                endpoint("10.1.0.4", None, None, None),
                endpoint("not-an-address", Some(true), None, None),
            ],
            ports: Some(vec![k8s_openapi::api::discovery::v1::EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
        };
        let service = Service {
            metadata: ObjectMeta {
                name: Some("frontend".into()),
                namespace: Some("web".into()),
                ..ObjectMeta::default()
            },
            spec: Some(k8s_openapi::api::core::v1::ServiceSpec {
                ports: Some(vec![k8s_openapi::api::core::v1::ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Service::default()
        };
        let mut vip = VirtualIP::new("web", crate::crd::sample_spec(&["192.0.2.1/24"], 1));
        vip.spec.services = serde_saphyr::from_str(
            "- port: 80\n  backends: {serviceRef: {namespace: web, name: frontend}}\n",
        )
        .unwrap();
        let out = service_endpoints(
            &referenced_services(&[vip]),
            &[Arc::new(service)],
            &[Arc::new(slice)],
        );
        let found = &out[&ServiceRef {
            namespace: "web".into(),
            name: "frontend".into(),
        }];
        assert_eq!(found.ports, [("http".to_string(), 80)]);
        let states: Vec<(String, bool, bool)> = found
            .endpoints
            .iter()
            .map(|e| (e.address.to_string(), e.ready, e.draining))
            .collect();
        assert_eq!(
            states,
            [
                ("10.1.0.1".to_string(), true, false),
                ("10.1.0.2".to_string(), false, true),
                ("10.1.0.3".to_string(), false, false),
                ("10.1.0.4".to_string(), true, false),
            ]
        );
        assert!(
            found
                .endpoints
                .iter()
                .all(|e| e.ports == [("http".to_string(), 8080)])
        );
    }
}
