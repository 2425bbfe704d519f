//! The last complete cluster snapshot, kept on disk so that an agent that starts while the
//! API server is unreachable (a node rebooting during an outage, or the agent holding the API
//! server's own VIP) can still join the election.
//!
//! The file holds exactly what the planner reads of the cluster (VirtualIPs' names and specs
//! in precedence order, Nodes' facts, the Services that exist, the endpoints of referenced
//! Services, this node's ready endpoints), not the objects: it changes only when a plan could,
//! so it is written rarely (never on a status write or a Node heartbeat). It is versioned
//! (a file of another version, or of another node, is ignored with a warning) and written
//! atomically (temporary file, fsync, rename), so a crash leaves the old file or the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kube::api::ObjectMeta;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{PoolTemplate, ServiceRef, VirtualIP, VirtualIPSpec};
use crate::model::lb::LbService;
use crate::model::{Completeness, LocalFacts, NodeFacts, ServiceEndpoints, Snapshot};

/// Bumped whenever the file's meaning changes; other versions are ignored, except those in
/// [`READABLE_VERSIONS`].
///
/// Version 2 added the load-balancer facts (pools' templates, served Services with their
/// allocation records, VirtualIPs' creationTimestamps, endpoints' nodes). A version-1 file
/// reads as one without them (it was written by an agent that served no load-balancer
/// addresses); an agent that reads only version 1 ignores a version-2 file with a warning.
pub const CACHE_VERSION: u32 = 2;

/// The versions this agent reads.
pub const READABLE_VERSIONS: std::ops::RangeInclusive<u32> = 1..=CACHE_VERSION;

/// The default file name in the state directory.
pub const CACHE_FILE: &str = "cluster-snapshot.json";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cannot read the cluster snapshot {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the cluster snapshot {} is not valid: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the cluster snapshot {} is of version {found}, this agent reads version {CACHE_VERSION}",
        path.display()
    )]
    Version { path: PathBuf, found: u32 },
    #[error("the cluster snapshot {} was saved by node {found}, this is node {node}", path.display())]
    OtherNode {
        path: PathBuf,
        found: String,
        node: String,
    },
    #[error("cannot write the cluster snapshot {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl CacheError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            CacheError::Read { .. } => "read",
            CacheError::Parse { .. } => "parse",
            CacheError::Version { .. } => "version",
            CacheError::OtherNode { .. } => "other_node",
            CacheError::Write { .. } => "write",
        }
    }
}

/// The file's contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CacheFile {
    version: u32,
    node: String,
    /// Seconds since the epoch, for the log line that says how old a used snapshot is.
    saved_at: u64,
    #[serde(flatten)]
    facts: ClusterFacts,
}

/// What the planner reads of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClusterFacts {
    /// Names and specs only, in precedence order.
    virtual_ips: Vec<NamedSpec>,
    nodes: BTreeMap<String, NodeFacts>,
    services: BTreeSet<ServiceRef>,
    service_endpoints: Vec<(ServiceRef, ServiceEndpoints)>,
    local_ready_endpoints: Vec<(ServiceRef, usize)>,
    endpoints_known: bool,
    /// Version 2: pool name → template.
    #[serde(default)]
    pools: BTreeMap<String, PoolTemplate>,
    /// Version 2: served Services with an allocation record.
    #[serde(default)]
    load_balancers: Vec<LbService>,
}

/// A VirtualIP as the planner reads it: its name and spec.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct NamedSpec {
    name: Option<String>,
    /// Version 2: the precedence among load-balancer addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<Time>,
    spec: VirtualIPSpec,
}

impl ClusterFacts {
    fn of(snapshot: &Snapshot) -> ClusterFacts {
        ClusterFacts {
            virtual_ips: snapshot
                .virtual_ips
                .iter()
                .map(|v| NamedSpec {
                    name: v.metadata.name.clone(),
                    created: v.metadata.creation_timestamp.clone(),
                    spec: v.spec.clone(),
                })
                .collect(),
            nodes: snapshot.nodes.clone(),
            services: snapshot.local.services.clone(),
            service_endpoints: snapshot
                .service_endpoints
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            local_ready_endpoints: snapshot
                .local
                .local_ready_endpoints
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            endpoints_known: snapshot.local.endpoints_known,
            pools: snapshot.pools.clone(),
            load_balancers: snapshot.load_balancers.clone(),
        }
    }

    fn into_snapshot(self) -> Snapshot {
        Snapshot {
            virtual_ips: self
                .virtual_ips
                .into_iter()
                .map(|v| VirtualIP {
                    metadata: ObjectMeta {
                        name: v.name,
                        creation_timestamp: v.created,
                        ..ObjectMeta::default()
                    },
                    spec: v.spec,
                    status: None,
                })
                .collect(),
            cluster: true,
            nodes: self.nodes,
            local: LocalFacts {
                local_ready_endpoints: self.local_ready_endpoints.into_iter().collect(),
                endpoints_known: self.endpoints_known,
                services: self.services,
                ..LocalFacts::default()
            },
            service_endpoints: self.service_endpoints.into_iter().collect(),
            completeness: Completeness::Cached,
            pools: self.pools,
            load_balancers: self.load_balancers,
        }
    }
}

/// A snapshot read back from the file.
#[derive(Debug, Clone)]
pub struct Cached {
    pub snapshot: Snapshot,
    /// How old the file is (zero when the clock went back).
    pub age: Duration,
}

/// The file of one node's last complete snapshot.
#[derive(Debug)]
pub struct SnapshotCache {
    path: PathBuf,
    node: String,
    /// The facts last written (or read), so that unchanged snapshots write nothing.
    written: Option<ClusterFacts>,
}

impl SnapshotCache {
    pub fn new(path: PathBuf, node: String) -> SnapshotCache {
        SnapshotCache {
            path,
            node,
            written: None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The saved snapshot (`Completeness::Cached`), `Ok(None)` when there is no file.
    pub fn load(&mut self) -> Result<Option<Cached>, CacheError> {
        let path = &self.path;
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(CacheError::Read {
                    path: path.clone(),
                    source,
                });
            }
        };
        // The version first, so that a file of another version says so rather than failing
        // to parse.
        #[derive(Deserialize)]
        struct Versioned {
            version: u32,
        }
        let parse = |source| CacheError::Parse {
            path: path.clone(),
            source,
        };
        let versioned: Versioned = serde_json::from_slice(&bytes).map_err(parse)?;
        if !READABLE_VERSIONS.contains(&versioned.version) {
            return Err(CacheError::Version {
                path: path.clone(),
                found: versioned.version,
            });
        }
        let file: CacheFile = serde_json::from_slice(&bytes).map_err(parse)?;
        if file.node != self.node {
            return Err(CacheError::OtherNode {
                path: path.clone(),
                found: file.node,
                node: self.node.clone(),
            });
        }
        let age = now_secs().saturating_sub(file.saved_at);
        self.written = Some(file.facts.clone());
        Ok(Some(Cached {
            snapshot: file.facts.into_snapshot(),
            age: Duration::from_secs(age),
        }))
    }

    /// Saves the cluster facts of a complete snapshot when they differ from the file's.
    /// Returns whether it wrote.
    pub fn save(&mut self, snapshot: &Snapshot) -> Result<bool, CacheError> {
        let facts = ClusterFacts::of(snapshot);
        if self.written.as_ref() == Some(&facts) {
            return Ok(false);
        }
        let file = CacheFile {
            version: CACHE_VERSION,
            node: self.node.clone(),
            saved_at: now_secs(),
            facts,
        };
        let bytes = serde_json::to_vec(&file).expect("the cluster facts serialize");
        write_atomically(&self.path, &bytes).map_err(|source| CacheError::Write {
            path: self.path.clone(),
            source,
        })?;
        self.written = Some(file.facts);
        Ok(true)
    }

    /// Saves, logging a failure once per kind of failure (the file is an aid, not a need).
    pub fn save_logged(&mut self, snapshot: &Snapshot, warned: &mut bool) {
        match self.save(snapshot) {
            Ok(true) => {
                if std::mem::take(warned) {
                    info!(path = %self.path.display(), "the cluster snapshot is saved again");
                }
            }
            Ok(false) => {}
            Err(e) => {
                if !*warned {
                    warn!(error = %e, "an agent restarted during an API outage will wait for the API server");
                    *warned = true;
                }
            }
        }
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes a temporary file beside `path`, syncs it and renames it over `path`: readers see
/// the old contents or the new, never a part.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(dir) = std::fs::File::open(dir)
    {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndpointFacts, plan};

    fn snapshot() -> Snapshot {
        let mut web = VirtualIP::new("web", crate::crd::sample_spec(&["192.0.2.1/24"], 1));
        web.spec.services = serde_saphyr::from_str(
            "- port: 80\n  backends: {serviceRef: {namespace: web, name: frontend}}\n",
        )
        .unwrap();
        web.metadata.resource_version = Some("42".into());
        web.metadata.uid = Some("u".into());
        let db = VirtualIP::new("db", crate::crd::sample_spec(&["192.0.2.2/24"], 2));
        let frontend = ServiceRef {
            namespace: "web".into(),
            name: "frontend".into(),
        };
        let mut s = Snapshot {
            virtual_ips: vec![web, db],
            cluster: true,
            completeness: Completeness::Complete,
            ..Snapshot::default()
        };
        for (name, ip) in [("node-a", "192.0.2.11"), ("node-b", "192.0.2.12")] {
            s.nodes.insert(
                name.into(),
                NodeFacts {
                    ready: Some(true),
                    internal_ips: vec![ip.parse().unwrap()],
                    ..NodeFacts::default()
                },
            );
        }
        s.service_endpoints.insert(
            frontend.clone(),
            ServiceEndpoints {
                ports: vec![("http".into(), 80)],
                endpoints: vec![EndpointFacts {
                    address: "10.1.0.1".parse().unwrap(),
                    ports: vec![("http".into(), 8080)],
                    ready: true,
                    draining: false,
                    node: Some("node-a".into()),
                }],
            },
        );
        s.local.services.insert(frontend.clone());
        s.local.local_ready_endpoints.insert(frontend.clone(), 1);
        s.local.endpoints_known = true;
        // A load-balancer address, older than "db" and younger than "web".
        let time = |secs: i64| {
            Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + secs).unwrap(),
            ))
        };
        s.virtual_ips[0].metadata.creation_timestamp = time(0);
        s.virtual_ips[1].metadata.creation_timestamp = time(20);
        let template: PoolTemplate = serde_saphyr::from_str(
            "interface: eth0\nforwarding: IPVS\nvrrp: {advertisementInterval: 100ms}\n",
        )
        .unwrap();
        s.pools.insert("pool".into(), template);
        s.load_balancers.push(LbService {
            service: frontend,
            created: time(10),
            record: [("192.0.2.50".parse().unwrap(), "pool".to_string())].into(),
            ports: vec![crate::model::lb::LbPort {
                name: "http".into(),
                protocol: crate::crd::ServiceProtocol::TCP,
                port: 80,
            }],
            local: true,
            proxy_ip_mode: false,
        });
        s
    }

    fn dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("ferrovip-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn a_saved_snapshot_plans_as_the_original_and_is_written_only_on_change() {
        let dir = dir("roundtrip");
        let path = dir.join(CACHE_FILE);
        let mut cache = SnapshotCache::new(path.clone(), "node-a".into());
        assert!(cache.load().unwrap().is_none());
        let original = snapshot();
        assert!(cache.save(&original).unwrap());
        // Unchanged facts (a status write, a new resourceVersion) write nothing.
        let mut touched = original.clone();
        touched.virtual_ips[0].metadata.resource_version = Some("43".into());
        assert!(!cache.save(&touched).unwrap());

        let mut reader = SnapshotCache::new(path.clone(), "node-a".into());
        let cached = reader.load().unwrap().expect("a saved snapshot");
        assert_eq!(cached.snapshot.completeness, Completeness::Cached);
        assert!(cached.age < Duration::from_secs(60));
        for node in ["node-a", "node-b"] {
            let mut want = plan(&original, node);
            want.completeness = Completeness::Cached;
            assert_eq!(plan(&cached.snapshot, node), want, "{node}");
        }
        let lb = plan(&cached.snapshot, "node-a");
        assert_eq!(lb.load_balancers.len(), 1);
        assert_eq!(lb.services.len(), 2, "{:?}", lb.services);
        // What was read counts as written: saving the same facts writes nothing.
        assert!(!reader.save(&original).unwrap());

        let mut changed = original.clone();
        changed.nodes.get_mut("node-b").unwrap().ready = Some(false);
        assert!(reader.save(&changed).unwrap());
        let again = SnapshotCache::new(path.clone(), "node-a".into())
            .load()
            .unwrap()
            .unwrap();
        assert_eq!(again.snapshot.nodes["node-b"].ready, Some(false));
        assert!(!dir.join("cluster-snapshot.json.tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_version_1_file_is_read_without_load_balancer_facts() {
        let dir = dir("v1");
        let path = dir.join(CACHE_FILE);
        SnapshotCache::new(path.clone(), "node-a".into())
            .save(&snapshot())
            .unwrap();
        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(value["version"], CACHE_VERSION);
        // What version 1 wrote: no pools, Services, timestamps or endpoint nodes.
        value["version"] = 1.into();
        let object = value.as_object_mut().unwrap();
        object.remove("pools");
        object.remove("loadBalancers");
        for v in value["virtualIps"].as_array_mut().unwrap() {
            v.as_object_mut().unwrap().remove("created");
        }
        for (_, eps) in value["serviceEndpoints"]
            .as_array_mut()
            .unwrap()
            .iter_mut()
            .map(|e| {
                let pair = e.as_array_mut().unwrap();
                (0, &mut pair[1])
            })
        {
            for e in eps["endpoints"].as_array_mut().unwrap() {
                e.as_object_mut().unwrap().remove("node");
            }
        }
        std::fs::write(&path, value.to_string()).unwrap();
        let cached = SnapshotCache::new(path.clone(), "node-a".into())
            .load()
            .unwrap()
            .expect("a version-1 file is read");
        assert!(cached.snapshot.load_balancers.is_empty());
        assert!(cached.snapshot.pools.is_empty());
        assert_eq!(cached.snapshot.virtual_ips.len(), 2);
        assert_eq!(plan(&cached.snapshot, "node-a").iter().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_of_another_version_or_node_or_garbage_are_refused() {
        let dir = dir("refused");
        let path = dir.join(CACHE_FILE);
        SnapshotCache::new(path.clone(), "node-a".into())
            .save(&snapshot())
            .unwrap();
        let err = SnapshotCache::new(path.clone(), "node-b".into())
            .load()
            .unwrap_err();
        assert_eq!(err.metric_label(), "other_node", "{err}");

        let mut value: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        value["version"] = (CACHE_VERSION + 1).into();
        value["nodes"] = "a shape this version does not know".into();
        std::fs::write(&path, value.to_string()).unwrap();
        let err = SnapshotCache::new(path.clone(), "node-a".into())
            .load()
            .unwrap_err();
        assert_eq!(err.metric_label(), "version", "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));

        std::fs::write(&path, b"{\"version\": 1, \"node\": ").unwrap();
        let err = SnapshotCache::new(path.clone(), "node-a".into())
            .load()
            .unwrap_err();
        assert_eq!(err.metric_label(), "parse", "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
