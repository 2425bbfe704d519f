//! The leader's view of the cluster: reflectors for Services, LoadBalancerPools, VirtualIPs
//! and Namespaces, started afresh (a new list) each time this process becomes leader and
//! dropped (their tasks aborted) when it stops leading.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Service};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use crate::crd::{LoadBalancerPool, VirtualIP};

/// The four stores and their change signal.
pub struct Watches {
    pub services: Store<Service>,
    pub pools: Store<LoadBalancerPool>,
    pub virtual_ips: Store<VirtualIP>,
    pub namespaces: Store<Namespace>,
    /// Bumped on every applied change.
    pub changes: watch::Receiver<u64>,
    listed: [(Arc<AtomicBool>, &'static str); 4],
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
        let services = spawn(
            Api::<Service>::all(client.clone()),
            &changed,
            &flags[0],
            &mut tasks,
        );
        let pools = spawn(
            Api::<LoadBalancerPool>::all(client.clone()),
            &changed,
            &flags[1],
            &mut tasks,
        );
        let virtual_ips = spawn(
            Api::<VirtualIP>::all(client.clone()),
            &changed,
            &flags[2],
            &mut tasks,
        );
        let namespaces = spawn(
            Api::<Namespace>::all(client.clone()),
            &changed,
            &flags[3],
            &mut tasks,
        );
        Watches {
            services,
            pools,
            virtual_ips,
            namespaces,
            changes,
            listed: flags,
            tasks,
        }
    }

    /// The kinds not listed yet.
    pub fn missing(&self) -> Vec<&'static str> {
        self.listed
            .iter()
            .filter(|(flag, _)| !flag.load(Ordering::Relaxed))
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
            "Service controller: cluster listed"
        );
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

fn spawn<K>(
    api: Api<K>,
    changed: &watch::Sender<u64>,
    listed: &(Arc<AtomicBool>, &'static str),
    tasks: &mut Vec<JoinHandle<()>>,
) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).modify(slim::<K>),
    )
    .default_backoff();
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
