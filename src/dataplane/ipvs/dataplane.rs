//! The IPVS implementation of [`Dataplane`]: converges the kernel's IPVS table to the desired
//! services by difference, owning only what it created.
//!
//! Ownership: IPVS services carry no owner mark, so the keys of the services this node
//! created are kept in a state file (`<state dir>/ipvs-services`, on tmpfs like the IPVS table
//! itself, so both vanish on reboot). Services in the kernel that are not in it are foreign
//! and never touched; a desired service whose key is taken by a foreign one is reported, not
//! overwritten. Without a state file (first start), existing services with a desired key are
//! adopted.
//!
//! Cost: the kernel is read once (and again after [`Dataplane::invalidate`]); afterwards an
//! apply is one comparison pass over the desired set against what was programmed, and
//! writes go out pipelined in one batch.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use tracing::{debug, info, warn};

use super::client::{IpvsClient, IpvsError, Op};
use super::diff::{Change, DestConf, Programmed, ServiceConf, diff};
use super::netlink;
use crate::dataplane::nft::{MasqueradeMatch, NftRecord, NftRules};
use crate::dataplane::sysctl::{IPV6_FORWARDING, Sysctls, write_atomically};
use crate::dataplane::{ApplyError, ApplyReport, Dataplane, ServiceFailure};
use crate::model::service::{
    BackendKey, Encapsulation, Forwarding, ServiceKey, ServiceProtocol, ServiceSet, ServiceSpec,
    TunnelKind,
};
use crate::vocab::Family;

/// Where the IPVS dataplane keeps its state and finds its tools.
#[derive(Debug, Clone)]
pub struct IpvsOptions {
    /// Holds the file listing the services this node created.
    pub state_dir: PathBuf,
    /// The `nft` binary, for the masquerade rules of the NAT return path.
    pub nft: PathBuf,
}

impl Default for IpvsOptions {
    fn default() -> Self {
        IpvsOptions {
            state_dir: PathBuf::from("/run/ferrovip"),
            nft: PathBuf::from("nft"),
        }
    }
}

/// Sysctls set while this node has virtual services (kube-proxy's IPVS mode sets the same):
/// connections to a removed backend fail at once instead of hanging, and persistence
/// templates of drained backends expire.
pub const SERVICE_SYSCTLS: &[(&str, &str)] = &[
    ("/proc/sys/net/ipv4/vs/expire_nodest_conn", "1"),
    ("/proc/sys/net/ipv4/vs/expire_quiescent_template", "1"),
];

/// IPv6 replies, de-masqueraded back to the client's address, are forwarded (interfaces
/// keep accepting router advertisements: see `dataplane::sysctl`).
pub const NAT6_FORWARDING: (&str, &str) = (IPV6_FORWARDING, "1");

/// Sysctls the NAT return path needs while a service masquerades.
pub const NAT_SYSCTLS: &[(&str, &str)] = &[
    // Let conntrack see IPVS connections, so that nftables can masquerade them.
    ("/proc/sys/net/ipv4/vs/conntrack", "1"),
    // Replies, de-masqueraded back to the client's address, are forwarded.
    ("/proc/sys/net/ipv4/ip_forward", "1"),
];

pub struct IpvsDataplane {
    options: IpvsOptions,
    client: Option<IpvsClient>,
    /// Our services as the kernel holds them (after the last read and the writes since).
    programmed: BTreeMap<ServiceKey, Programmed>,
    /// Services found in the kernel that are not ours.
    foreign: BTreeSet<ServiceKey>,
    /// Whether `programmed`/`foreign` reflect a read of the kernel.
    synced: bool,
    /// Ours, but not known how they look (a write failed): read before the next diff.
    uncertain: BTreeSet<ServiceKey>,
    nft: NftRules,
    /// The masquerade matches currently installed; `None` until the first apply, since an
    /// earlier run may have left a table.
    masquerading: Option<BTreeSet<MasqueradeMatch>>,
    /// The sysctls we changed, with the values before (also in the state dir).
    sysctls: Sysctls,
    /// What the state file says, to write it only on change.
    persisted: Option<BTreeSet<ServiceKey>>,
}

impl IpvsDataplane {
    pub fn new(options: IpvsOptions) -> IpvsDataplane {
        let nft = NftRules::new(options.nft.clone());
        // What an earlier run changed and recorded, to be put back when no longer needed.
        let known: Vec<&str> = SERVICE_SYSCTLS
            .iter()
            .chain(NAT_SYSCTLS)
            .chain([&NAT6_FORWARDING])
            .map(|(p, _)| *p)
            .collect();
        let sysctls = Sysctls::load(&options.state_dir, &known);
        IpvsDataplane {
            options,
            client: None,
            programmed: BTreeMap::new(),
            foreign: BTreeSet::new(),
            synced: false,
            uncertain: BTreeSet::new(),
            nft,
            masquerading: None,
            sysctls,
            persisted: None,
        }
    }

    /// Write requests sent to the kernel so far.
    pub fn writes(&self) -> u64 {
        self.client.as_ref().map_or(0, IpvsClient::writes)
    }

    fn state_file(&self) -> PathBuf {
        self.options.state_dir.join("ipvs-services")
    }

    /// Reads the whole IPVS table: our services (per the state file) into `programmed`, the
    /// rest into `foreign`.
    fn sync(&mut self, desired: &ServiceSet) -> Result<(), IpvsError> {
        let owned = read_state(&self.state_file());
        let client = self.client.as_mut().expect("connected");
        let services = read_services(client)?;
        self.programmed.clear();
        self.foreign.clear();
        self.uncertain.clear();
        let mut adopted = 0usize;
        for service in services {
            let Some(key) = key_from_netlink(&service.key) else {
                continue;
            };
            let ours = match &owned {
                Some(owned) => owned.contains(&key),
                None => desired.contains_key(&key),
            };
            if !ours {
                self.foreign.insert(key);
                continue;
            }
            let dests = client.destinations(&service.key)?;
            self.programmed
                .insert(key, programmed_from_netlink(&service.config, &dests));
            adopted += 1;
        }
        if adopted > 0 {
            info!(
                services = adopted,
                foreign = self.foreign.len(),
                "adopted the IPVS services of an earlier run"
            );
        }
        self.persisted = owned;
        self.synced = true;
        Ok(())
    }

    /// Reads back services whose state is unknown after a failed write.
    fn refresh_uncertain(&mut self) -> Result<(), IpvsError> {
        if self.uncertain.is_empty() {
            return Ok(());
        }
        let client = self.client.as_mut().expect("connected");
        let services = read_services(client)?;
        let by_key: BTreeMap<ServiceKey, &netlink::Service> = services
            .iter()
            .filter_map(|s| Some((key_from_netlink(&s.key)?, s)))
            .collect();
        for key in std::mem::take(&mut self.uncertain) {
            match by_key.get(&key) {
                Some(service) => {
                    let dests = client.destinations(&service.key)?;
                    self.programmed
                        .insert(key, programmed_from_netlink(&service.config, &dests));
                }
                None => {
                    self.programmed.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Records the keys of our services, when they changed.
    fn persist(&mut self) {
        let unchanged = self.persisted.as_ref().is_some_and(|p| {
            p.len() == self.programmed.len() && p.iter().eq(self.programmed.keys())
        });
        if unchanged {
            return;
        }
        let now: BTreeSet<ServiceKey> = self.programmed.keys().copied().collect();
        let path = self.state_file();
        match write_state(&path, &now) {
            Ok(()) => self.persisted = Some(now),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot record the IPVS services this node owns")
            }
        }
    }

    /// Installs exactly `wanted` masquerade matches (and the sysctls they and the services
    /// need).
    async fn return_path(
        &mut self,
        wanted: BTreeSet<MasqueradeMatch>,
        services: bool,
        ipv6: bool,
    ) -> Result<(), String> {
        let mut sysctls: Vec<(&'static str, &'static str)> = Vec::new();
        if services {
            sysctls.extend_from_slice(SERVICE_SYSCTLS);
        }
        if !wanted.is_empty() {
            sysctls.extend_from_slice(NAT_SYSCTLS);
        }
        // IPv6 forwarding makes the host ignore router advertisements: only while an IPv6
        // service masquerades.
        if ipv6 {
            sysctls.push(NAT6_FORWARDING);
        }
        self.sysctls.set(&sysctls)?;
        if self.masquerading.is_none() && self.adopt_table(&wanted).await {
            self.masquerading = Some(wanted.clone());
        }
        if self.masquerading.as_ref() == Some(&wanted) {
            return Ok(());
        }
        let applied = if wanted.is_empty() {
            match self.nft.remove().await {
                // Without nft no table can have been made: nothing to remove, and nodes
                // that masquerade nothing need no nft.
                Err(crate::dataplane::nft::NftError::Missing { .. }) => Ok(()),
                other => other,
            }
        } else {
            self.nft.apply(&wanted).await.map(|_| ())
        };
        applied.map_err(|e| format!("nftables masquerade rules: {e}"))?;
        self.record_table(&wanted).await;
        self.masquerading = Some(wanted);
        Ok(())
    }

    /// A restarted agent takes over the table its predecessor left, without rewriting it,
    /// when the table is exactly what was recorded and what is wanted now.
    async fn adopt_table(&mut self, wanted: &BTreeSet<MasqueradeMatch>) -> bool {
        let path = self.options.state_dir.join(NFT_FILE);
        let Some(recorded) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|text| NftRecord::from_text(&text))
        else {
            return false;
        };
        match self.nft.adopt(wanted, &recorded).await {
            Ok(true) => {
                debug!("adopted the nftables table of an earlier run");
                true
            }
            Ok(false) => false,
            // Without nft nothing can be adopted; the apply says why.
            Err(e) => {
                debug!(error = %e, "cannot read the nftables table");
                false
            }
        }
    }

    /// Records the table as it is now, for the next run's [`Self::adopt_table`].
    async fn record_table(&mut self, wanted: &BTreeSet<MasqueradeMatch>) {
        let path = self.options.state_dir.join(NFT_FILE);
        let written = match self.nft.record(wanted).await {
            Ok(record) => write_atomically(&path, &record.to_text()).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = written {
            // The next run rewrites the table once instead of adopting it: no harm.
            let _ = std::fs::remove_file(&path);
            debug!(path = %path.display(), error = %e, "cannot record the nftables table");
        }
    }
}

/// In the state dir: the nftables script last applied and the table's listing after it.
pub const NFT_FILE: &str = "nft-table";

impl IpvsDataplane {
    /// For `ferrovip cleanup`: removes the nftables table and puts back every sysctl recorded
    /// in the state directory, also where the kernel has no IPVS (the earlier run may have
    /// had it, or the module was unloaded since). One line per thing done.
    pub async fn remove_return_path(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        match self.nft.remove().await {
            Ok(()) => done.push("nftables: no table inet ferrovip left".to_string()),
            // Without nft no table can have been made.
            Err(crate::dataplane::nft::NftError::Missing { .. }) => {
                done.push("nftables: nft is not installed, so no table to remove".to_string())
            }
            Err(e) => done.push(format!("nftables: {e}")),
        }
        self.masquerading = Some(BTreeSet::new());
        done.extend(restore_all(&mut self.sysctls));
        // What `ferrovip node-setup` set for the agents.
        let mut node_setup = Sysctls::load_file(
            &self.options.state_dir,
            crate::dataplane::sysctl::NODE_SETUP_FILE,
            crate::dataplane::sysctl::is_net_sysctl,
        );
        done.extend(restore_all(&mut node_setup));
        done
    }
}

/// Puts back every sysctl `sysctls` recorded; one line per sysctl.
fn restore_all(sysctls: &mut Sysctls) -> Vec<String> {
    let recorded = sysctls.recorded();
    let failed = sysctls.set(&[]).err();
    let left: BTreeSet<String> = sysctls.recorded().into_iter().map(|(p, _)| p).collect();
    let mut done: Vec<String> = recorded
        .into_iter()
        .map(|(path, value)| {
            if left.contains(&path) {
                format!(
                    "sysctl {path} not restored to {value} (kept in the record): {}",
                    crate::dataplane::sysctl::READ_ONLY_HINT
                )
            } else {
                format!("sysctl {path} restored to {value}")
            }
        })
        .collect();
    done.extend(failed.map(|e| format!("sysctls: {e}")));
    done
}

impl Dataplane for IpvsDataplane {
    fn name(&self) -> &'static str {
        "ipvs"
    }

    fn invalidate(&mut self) {
        self.synced = false;
    }

    async fn apply(&mut self, desired: &ServiceSet) -> ApplyReport {
        let mut report = ApplyReport::default();
        if self.client.is_none() {
            match IpvsClient::connect() {
                Ok(c) => self.client = Some(c),
                Err(e) => {
                    report.unavailable = Some(e.to_string());
                    return report;
                }
            }
        }
        let writes_before = self.writes();
        // Which services are ours can change only by a read or a write.
        let keys_may_change = !self.synced || !self.uncertain.is_empty();
        let read = if self.synced {
            self.refresh_uncertain()
        } else {
            self.sync(desired)
        };
        if let Err(e) = read {
            // The table cannot even be read: nothing can be diffed safely.
            self.synced = false;
            if matches!(e, IpvsError::Unavailable) {
                self.client = None;
                report.unavailable = Some(e.to_string());
                return report;
            }
            report.error = Some(ApplyError {
                message: format!("cannot read the IPVS table: {e}"),
                reason: e.metric_label(),
            });
            return report;
        }

        let foreign = &self.foreign;
        let changes = diff(&self.programmed, desired, |k| foreign.contains(k));
        for key in foreign.iter().filter(|k| desired.contains_key(k)) {
            report.failures.push(ServiceFailure {
                key: *key,
                owner: desired[key].owner.clone(),
                error: format!(
                    "IPVS service {key} already exists and was not created by ferrovip: left alone"
                ),
                reason: "foreign_service",
                transient: false,
            });
        }

        // Masquerade rules first for new services (their first connection must already be
        // source-NATed), and removed only after the services are gone.
        let (wanted_masq, wanted_ipv6) = masquerade_matches(desired);
        let before_masq: BTreeSet<MasqueradeMatch> = wanted_masq
            .union(self.masquerading.as_ref().unwrap_or(&BTreeSet::new()))
            .cloned()
            .collect();
        let any_services = !desired.is_empty() || !self.programmed.is_empty();
        // Until the old services are gone, what they needed stays too.
        let ipv6_now = self.sysctls.is_set(NAT6_FORWARDING.0);
        let mut nft_error = self
            .return_path(before_masq, any_services, wanted_ipv6 || ipv6_now)
            .await
            .err();

        if !changes.is_empty() {
            if changes.len() <= 16 {
                debug!(?changes, "IPVS changes");
            } else {
                debug!(changes = changes.len(), "IPVS changes");
            }
            let ops: Vec<Op> = changes.iter().map(|c| op_for(c, desired)).collect();
            let client = self.client.as_mut().expect("connected");
            let results = client.execute(&ops);
            let mut failed: BTreeMap<ServiceKey, IpvsError> = BTreeMap::new();
            for (change, result) in changes.iter().zip(results) {
                if let Err(e) = result {
                    failed.entry(change.service()).or_insert(e);
                }
            }
            for change in &changes {
                let key = change.service();
                if failed.contains_key(&key) {
                    continue;
                }
                record(&mut self.programmed, change, desired);
            }
            for (key, e) in failed {
                // A partly applied service is read back before the next attempt.
                self.uncertain.insert(key);
                if matches!(e, IpvsError::Unavailable) {
                    self.client = None;
                    self.synced = false;
                }
                report.failures.push(ServiceFailure {
                    key,
                    owner: desired
                        .get(&key)
                        .map(|s| s.owner.clone())
                        .unwrap_or_default(),
                    error: e.to_string(),
                    reason: e.metric_label(),
                    transient: e.is_transient(),
                });
            }
        }
        if keys_may_change || !changes.is_empty() {
            self.persist();
        }

        if nft_error.is_none() {
            nft_error = self
                .return_path(wanted_masq, !self.programmed.is_empty(), wanted_ipv6)
                .await
                .err();
        }
        if let Some(error) = nft_error {
            for (key, spec) in desired
                .iter()
                .filter(|(_, s)| s.forwarding == Forwarding::Masquerade && s.source_nat)
            {
                report.failures.push(ServiceFailure {
                    key: *key,
                    owner: spec.owner.clone(),
                    error: error.clone(),
                    reason: "nftables",
                    transient: false,
                });
            }
        }

        report.writes = self.writes() - writes_before;
        report.services = self.programmed.len();
        report.backends = self.programmed.values().map(|p| p.dests.len()).sum();
        report
    }
}

/// How many service dumps a read may take to see a stable table.
const DUMP_ROUNDS: usize = 4;

/// Every IPVS service of the namespace. A dump is not a snapshot: the kernel resumes each
/// chunk by position in a hash table shared by all network namespaces, so services added or
/// removed anywhere meanwhile (a namespace being torn down, say) shift it and entries are
/// skipped, without the dump being flagged as interrupted. Skips can only lose or repeat
/// entries, never invent them: dump again until a dump adds nothing, and keep the union.
fn read_services(client: &mut IpvsClient) -> Result<Vec<netlink::Service>, IpvsError> {
    let mut seen: BTreeMap<netlink::ServiceKey, netlink::Service> = BTreeMap::new();
    for round in 0..DUMP_ROUNDS {
        let before = seen.len();
        let dump = client.services()?;
        let complete = dump.len() == before;
        for service in dump {
            seen.insert(service.key, service);
        }
        if round > 0 && complete && seen.len() == before {
            break;
        }
    }
    Ok(seen.into_values().collect())
}

/// Updates the record of what is programmed after a successful write.
fn record(
    programmed: &mut BTreeMap<ServiceKey, Programmed>,
    change: &Change,
    desired: &ServiceSet,
) {
    match *change {
        Change::AddService(k) | Change::EditService(k) => {
            let spec = &desired[&k];
            let entry = programmed.entry(k).or_insert_with(|| Programmed {
                conf: None,
                dests: BTreeMap::new(),
            });
            entry.conf = Some(ServiceConf::of(spec));
        }
        Change::DelService(k) => {
            programmed.remove(&k);
        }
        Change::AddDest(k, b) | Change::EditDest(k, b) => {
            let spec = &desired[&k];
            if let Some(p) = programmed.get_mut(&k) {
                p.dests.insert(b, DestConf::of(spec, spec.backends[&b]));
            }
        }
        Change::DelDest(k, b) => {
            if let Some(p) = programmed.get_mut(&k) {
                p.dests.remove(&b);
            }
        }
    }
}

/// The connections to masquerade, and whether one of them is IPv6.
fn masquerade_matches(desired: &ServiceSet) -> (BTreeSet<MasqueradeMatch>, bool) {
    let mut ipv6 = false;
    let matches = desired
        .iter()
        .filter(|(_, s)| s.forwarding == Forwarding::Masquerade && s.source_nat)
        .map(|(k, _)| {
            ipv6 |= k.family() == Family::V6;
            match *k {
                ServiceKey::Port {
                    addr,
                    protocol,
                    port,
                } => MasqueradeMatch::Service {
                    addr,
                    protocol,
                    port,
                },
                ServiceKey::Fwmark { mark, .. } => MasqueradeMatch::Fwmark(mark),
            }
        })
        .collect();
    (matches, ipv6)
}

// ---- translation to and from the netlink codec's types ----

fn key_to_netlink(key: &ServiceKey) -> netlink::ServiceKey {
    match *key {
        ServiceKey::Port {
            addr,
            protocol,
            port,
        } => netlink::ServiceKey::Addr {
            protocol: match protocol {
                ServiceProtocol::TCP => netlink::Protocol::Tcp,
                ServiceProtocol::UDP => netlink::Protocol::Udp,
                ServiceProtocol::SCTP => netlink::Protocol::Sctp,
            },
            addr,
            port,
        },
        ServiceKey::Fwmark { family, mark } => netlink::ServiceKey::Fwmark {
            family: match family {
                Family::V4 => netlink::AddrFamily::V4,
                Family::V6 => netlink::AddrFamily::V6,
            },
            mark,
        },
    }
}

/// `None` for services ferrovip never creates (other protocols): always foreign.
fn key_from_netlink(key: &netlink::ServiceKey) -> Option<ServiceKey> {
    Some(match *key {
        netlink::ServiceKey::Addr {
            protocol,
            addr,
            port,
        } => ServiceKey::Port {
            addr,
            protocol: match protocol {
                netlink::Protocol::Tcp => ServiceProtocol::TCP,
                netlink::Protocol::Udp => ServiceProtocol::UDP,
                netlink::Protocol::Sctp => ServiceProtocol::SCTP,
                netlink::Protocol::Other(_) => return None,
            },
            port,
        },
        netlink::ServiceKey::Fwmark { family, mark } => ServiceKey::Fwmark {
            family: match family {
                netlink::AddrFamily::V4 => Family::V4,
                netlink::AddrFamily::V6 => Family::V6,
            },
            mark,
        },
    })
}

fn service_to_netlink(key: &ServiceKey, spec: &ServiceSpec) -> netlink::Service {
    let full_mask = match key.family() {
        Family::V4 => u32::MAX,
        Family::V6 => 128,
    };
    netlink::Service {
        key: key_to_netlink(key),
        config: netlink::ServiceConfig {
            scheduler: spec.scheduler.clone(),
            flags: netlink::ServiceFlags {
                persistent: spec.persistence.is_some(),
                one_packet: false,
                sched_flag_1: spec.scheduler_flags[0],
                sched_flag_2: spec.scheduler_flags[1],
                sched_flag_3: spec.scheduler_flags[2],
            },
            timeout: spec.persistence.unwrap_or(0),
            netmask: full_mask,
            pe_name: None,
        },
    }
}

fn dest_to_netlink(spec: &ServiceSpec, backend: &BackendKey) -> netlink::Destination {
    netlink::Destination {
        key: netlink::DestKey {
            addr: backend.addr,
            port: backend.port,
        },
        config: netlink::DestConfig {
            forwarding: match spec.forwarding {
                Forwarding::Masquerade => netlink::Forwarding::Masquerade,
                Forwarding::Direct => netlink::Forwarding::DirectRoute,
                Forwarding::Tunnel => {
                    netlink::Forwarding::Tunnel(tunnel_to_netlink(spec.tunnel.unwrap_or_default()))
                }
            },
            weight: spec.backends[backend],
            upper_threshold: spec.connection_limit.0,
            lower_threshold: spec.connection_limit.1,
        },
    }
}

fn tunnel_to_netlink(e: Encapsulation) -> netlink::Tunnel {
    let flag = |on: bool, bit: u16| if on { bit } else { 0 };
    netlink::Tunnel {
        kind: match e.kind {
            TunnelKind::Ipip => netlink::TunnelType::Ipip,
            TunnelKind::Gue => netlink::TunnelType::Gue,
            TunnelKind::Gre => netlink::TunnelType::Gre,
        },
        port: e.port,
        flags: flag(e.checksum, netlink::TUNNEL_FLAG_CSUM)
            | flag(e.remote_checksum, netlink::TUNNEL_FLAG_REMCSUM),
    }
}

/// `None` for an encapsulation ferrovip does not know (it is rewritten).
fn tunnel_from_netlink(t: netlink::Tunnel) -> Option<Encapsulation> {
    Some(Encapsulation {
        kind: match t.kind {
            netlink::TunnelType::Ipip => TunnelKind::Ipip,
            netlink::TunnelType::Gue => TunnelKind::Gue,
            netlink::TunnelType::Gre => TunnelKind::Gre,
            netlink::TunnelType::Other(_) => return None,
        },
        port: t.port,
        checksum: t.flags & netlink::TUNNEL_FLAG_CSUM != 0,
        remote_checksum: t.flags & netlink::TUNNEL_FLAG_REMCSUM != 0,
    })
}

fn programmed_from_netlink(
    config: &netlink::ServiceConfig,
    dests: &[netlink::Destination],
) -> Programmed {
    let f = &config.flags;
    Programmed {
        conf: Some(ServiceConf {
            scheduler: config.scheduler.clone(),
            scheduler_flags: [f.sched_flag_1, f.sched_flag_2, f.sched_flag_3],
            persistence: f.persistent.then_some(config.timeout),
        }),
        dests: dests
            .iter()
            .map(|d| {
                let c = &d.config;
                (
                    BackendKey {
                        addr: d.key.addr,
                        port: d.key.port,
                    },
                    DestConf {
                        forwarding: match c.forwarding {
                            netlink::Forwarding::Masquerade => Some(Forwarding::Masquerade),
                            netlink::Forwarding::DirectRoute => Some(Forwarding::Direct),
                            netlink::Forwarding::Tunnel(t) => {
                                tunnel_from_netlink(t).map(|_| Forwarding::Tunnel)
                            }
                            _ => None,
                        },
                        weight: c.weight,
                        thresholds: (c.upper_threshold, c.lower_threshold),
                        tunnel: match c.forwarding {
                            netlink::Forwarding::Tunnel(t) => tunnel_from_netlink(t),
                            _ => None,
                        },
                    },
                )
            })
            .collect(),
    }
}

fn op_for(change: &Change, desired: &ServiceSet) -> Op {
    match *change {
        Change::AddService(k) => Op::AddService(service_to_netlink(&k, &desired[&k])),
        Change::EditService(k) => Op::EditService(service_to_netlink(&k, &desired[&k])),
        Change::DelService(k) => Op::DelService(key_to_netlink(&k)),
        Change::AddDest(k, b) => Op::AddDest(key_to_netlink(&k), dest_to_netlink(&desired[&k], &b)),
        Change::EditDest(k, b) => {
            Op::EditDest(key_to_netlink(&k), dest_to_netlink(&desired[&k], &b))
        }
        Change::DelDest(k, b) => Op::DelDest(
            key_to_netlink(&k),
            netlink::DestKey {
                addr: b.addr,
                port: b.port,
            },
        ),
    }
}

// ---- the state file: one service key per line ----

fn format_key(key: &ServiceKey) -> String {
    match key {
        ServiceKey::Port {
            addr,
            protocol,
            port,
        } => format!("{} {addr} {port}", protocol.name()),
        ServiceKey::Fwmark { family, mark } => format!("fwmark {family} {mark}"),
    }
}

fn parse_key(line: &str) -> Option<ServiceKey> {
    let mut parts = line.split_whitespace();
    let kind = parts.next()?;
    let a = parts.next()?;
    let b: u32 = parts.next()?.parse().ok()?;
    let protocol = match kind {
        "fwmark" => {
            let family = match a {
                "ipv4" => Family::V4,
                "ipv6" => Family::V6,
                _ => return None,
            };
            return Some(ServiceKey::Fwmark { family, mark: b });
        }
        "TCP" => ServiceProtocol::TCP,
        "UDP" => ServiceProtocol::UDP,
        "SCTP" => ServiceProtocol::SCTP,
        _ => return None,
    };
    Some(ServiceKey::Port {
        addr: a.parse::<IpAddr>().ok()?,
        protocol,
        port: u16::try_from(b).ok()?,
    })
}

/// The keys the state file lists; `None` when there is no file (first start).
fn read_state(path: &std::path::Path) -> Option<BTreeSet<ServiceKey>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(text.lines().filter_map(parse_key).collect())
}

fn write_state(path: &std::path::Path, keys: &BTreeSet<ServiceKey>) -> std::io::Result<()> {
    let mut text = String::with_capacity(keys.len() * 32);
    for k in keys {
        text.push_str(&format_key(k));
        text.push('\n');
    }
    write_atomically(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_file_keys_round_trip() {
        let keys: BTreeSet<ServiceKey> = [
            ServiceKey::Port {
                addr: "192.0.2.1".parse().unwrap(),
                protocol: ServiceProtocol::TCP,
                port: 80,
            },
            ServiceKey::Port {
                addr: "2001:db8::1".parse().unwrap(),
                protocol: ServiceProtocol::SCTP,
                port: 9,
            },
            ServiceKey::Fwmark {
                family: Family::V6,
                mark: 4_000_000_000,
            },
        ]
        .into();
        let dir = std::env::temp_dir().join(format!("ferrovip-state-{}", std::process::id()));
        let path = dir.join("ipvs-services");
        assert_eq!(read_state(&path), None);
        write_state(&path, &keys).unwrap();
        assert_eq!(read_state(&path), Some(keys));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(parse_key("TCP not-an-ip 80"), None);
        assert_eq!(parse_key("fwmark ipv5 1"), None);
    }
    /// What the kernel reports for a default tunnel destination is what the spec asks: an
    /// adopted table needs no rewrite.
    #[test]
    fn a_tunnel_destination_reads_back_as_specified() {
        let d = netlink::Destination {
            key: netlink::DestKey {
                addr: "10.1.0.4".parse().unwrap(),
                port: 0,
            },
            config: netlink::DestConfig {
                forwarding: netlink::Forwarding::Tunnel(netlink::Tunnel::default()),
                weight: 1,
                upper_threshold: 0,
                lower_threshold: 0,
            },
        };
        let cfg = netlink::ServiceConfig::new("mh", netlink::AddrFamily::V4);
        let p = programmed_from_netlink(&cfg, &[d]);
        let spec = ServiceSpec {
            owner: "t".into(),
            scheduler: "mh".into(),
            scheduler_flags: [false; 3],
            persistence: None,
            forwarding: Forwarding::Tunnel,
            source_nat: false,
            tunnel: None,
            connection_limit: (0, 0),
            backends: [(
                BackendKey {
                    addr: "10.1.0.4".parse().unwrap(),
                    port: 0,
                },
                1,
            )]
            .into(),
        };
        let want = crate::dataplane::ipvs::diff::DestConf::of(&spec, 1);
        assert_eq!(p.dests.values().next().unwrap(), &want);
    }
}
