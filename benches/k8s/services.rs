//! Issue 12's Service target (`--services N`): N Services of type LoadBalancer created at once
//! against one LoadBalancerPool whose template shares one VRRP instance. The Service
//! controller runs in the agents (one leads, by the Lease) and hands out the addresses
//! (2 writes per Service), the agents synthesize one VirtualIP per address, node-a becomes
//! master of the shared instance, holds every address, and writes `ferrovip.io/master` on
//! each Service. Measured from the first create: every Service with an address in
//! `status.loadBalancer.ingress`, every Service annotated with its master, every address on
//! node-a; the writes per node while settling and at steady state, RSS and CPU, the API
//! server's requests/s and watches.

use super::*;
use k8s_openapi::api::core::v1::Service;

pub(super) const POOL_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_loadbalancerpools.yaml"
);
/// LoadBalancer Services need a NodePort each on a v1.20 server (no
/// `allocateLoadBalancerNodePorts` without an alpha gate): the default range holds 2,768.
pub(super) const NODE_PORT_RANGE: &str = "--service-node-port-range=20000-45000";
pub(super) const MAX_SERVICES: usize = 25_000;
const POOL: &str = "bench-lb";
/// 198.19.0.0/18: 16,382 usable addresses, inside the bulk range the agents' checks know.
const POOL_RANGE: &str = "198.19.0.0/18";
const NAMESPACE: &str = "default";
const LABEL: &str = "bench-svc";
/// While the Services have not settled and the harness's watch brought nothing for this
/// long, the harness reads the Services' latest version to check its watch ([`Watch::probe`]).
const PROBE_AFTER: Duration = Duration::from_secs(5);
const ANNOTATION_MASTER: &str = "ferrovip.io/master";

fn is_pool_address(a: &Ipv4Addr) -> bool {
    let [x, y, z, _] = a.octets();
    x == 198 && y == 19 && z < 64
}

fn pool_doc() -> Value {
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "LoadBalancerPool",
        "metadata": {"name": POOL},
        "spec": {
            "addresses": [POOL_RANGE],
            "template": {
                "interface": "eth0",
                "vrrp": {"advertisementInterval": format!("{}ms", INTERVAL.as_millis())},
                "priority": {
                    "base": PRIORITY_BASE,
                    "preferredNodes": [
                        {"nodeName": "node-a", "weight": 50},
                        {"nodeName": "node-b", "weight": 40},
                        {"nodeName": "node-c", "weight": -40},
                    ],
                },
            },
        },
    })
}

fn service_doc(i: usize) -> anyhow::Result<Service> {
    Ok(serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": format!("svc-{i:05}"), "namespace": NAMESPACE, "labels": {"bench": LABEL}},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": format!("svc-{i:05}")},
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        },
    }))?)
}

/// One Service as the harness's watch saw it.
#[derive(Debug, Clone, Default)]
struct Seen {
    resource_version: Option<String>,
    ingress_at: Option<Instant>,
    annotated_at: Option<Instant>,
    /// The node the master annotation names.
    master: Option<String>,
    changes: u64,
}

#[derive(Debug, Default)]
struct WatchState {
    services: HashMap<String, Seen>,
    tally: WatchTally,
}

impl WatchState {
    fn observe(&mut self, svc: &Service, at: Instant) {
        let Some(name) = svc.metadata.name.clone() else {
            return;
        };
        let seen = self.services.entry(name).or_default();
        if seen.resource_version.is_some() && seen.resource_version == svc.metadata.resource_version
        {
            return;
        }
        seen.resource_version = svc.metadata.resource_version.clone();
        seen.changes += 1;
        self.tally.changed(at);
        let has_ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .is_some_and(|i| !i.is_empty());
        if has_ingress && seen.ingress_at.is_none() {
            seen.ingress_at = Some(at);
        }
        let master = svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_MASTER))
            .and_then(|v| v.split(',').next())
            .and_then(|entry| entry.split_once('='))
            .map(|(_, node)| node.trim().to_owned());
        if master.is_some() && seen.annotated_at.is_none() {
            seen.annotated_at = Some(at);
        }
        seen.master = master;
    }
}

impl Watched for WatchState {
    type Object = Service;
    const KIND: &'static str = "Service";

    fn observe(&mut self, svc: &Service, at: Instant) {
        WatchState::observe(self, svc, at);
    }

    fn forget(&mut self, name: &str) {
        self.services.remove(name);
    }

    fn tally(&mut self) -> &mut WatchTally {
        &mut self.tally
    }
}

#[derive(Debug, Clone, Serialize)]
pub(super) struct ServicesReport {
    pub(super) services: usize,
    pub(super) create_s: f64,
    pub(super) to_all_ingress_s: Option<f64>,
    pub(super) to_all_annotated_s: Option<f64>,
    pub(super) to_all_addresses_on_master_s: Option<f64>,
    pub(super) to_quiet_s: Option<f64>,
    /// Services whose master annotation names each node.
    pub(super) annotated_by: BTreeMap<String, usize>,
    pub(super) settle_problem: Option<String>,
    pub(super) settle_writes: NodeWrites,
    pub(super) settle_cpu_percent: BTreeMap<String, f64>,
    pub(super) settle_apiserver: ApiServerLoad,
    pub(super) service_changes_in_window: u64,
    pub(super) steady: SteadyReport,
}

/// Deletes the benchmark's Services with the agents stopped (the harness's own clean-up, not
/// a measurement), then starts the agents and waits until no node holds a pool address.
fn delete_services(cluster: &mut Cluster) -> anyhow::Result<Duration> {
    let started = Instant::now();
    cluster.stop_agents()?;
    let api: Api<Service> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let params = ListParams::default().labels(&format!("bench={LABEL}"));
    let deadline = started + BULK_DELETE_TIMEOUT;
    let mut asked: Option<Instant> = None;
    loop {
        check_interrupted()?;
        let left = cluster
            .runtime
            .block_on(api.list_metadata(&params.clone().limit(1)))?;
        if left.items.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "Services labelled bench={LABEL} still exist {BULK_DELETE_TIMEOUT:?} after the delete began"
        );
        if asked.is_none_or(|t| t.elapsed() >= Duration::from_secs(90)) {
            asked = Some(Instant::now());
            // v1.20 has no delete-collection of Services: one by one, 16 in flight.
            let names: Vec<String> = cluster
                .runtime
                .block_on(api.list_metadata(&params))?
                .items
                .into_iter()
                .filter_map(|m| m.metadata.name)
                .collect();
            cluster.runtime.block_on(async {
                futures::stream::iter(names)
                    .map(|name| {
                        let api = api.clone();
                        async move {
                            match api.delete(&name, &DeleteParams::default()).await {
                                Ok(_) => Ok(()),
                                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                                Err(e) => Err(e),
                            }
                        }
                    })
                    .buffer_unordered(CREATE_CONCURRENCY)
                    .try_for_each(|_| async { Ok(()) })
                    .await
            })?;
        } else {
            sleep(Duration::from_secs(1))?;
        }
    }
    cluster.start_agents()?;
    cluster.wait_released(is_pool_address, Instant::now() + RELEASE_TIMEOUT)?;
    Ok(started.elapsed())
}

pub(super) fn services_scale(
    cluster: &mut Cluster,
    count: usize,
    settle_timeout: Duration,
    window: Duration,
    clock_ticks: u64,
) -> anyhow::Result<ServicesReport> {
    println!("\n== 4. {count} Services of type LoadBalancer from one pool (fresh agents)");
    cluster.apply(&pool_doc())?;
    // The agents' Service controller may hold the Lease (config/rbac's Role, bound to the
    // lab's agent identities as the chart binds it to the ServiceAccount).
    cluster.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "agents-lease", "namespace": "ferrovip-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferrovip-controller-lease"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": ferrovip_e2e::AGENT_GROUP}],
    }))?;
    let watch: Watch<WatchState> = Watch::start(
        &cluster.runtime,
        Api::namespaced(cluster.client.clone(), NAMESPACE),
        watcher::Config::default().labels(&format!("bench={LABEL}")),
    );
    watch.wait_listed(AGENT_LISTED_TIMEOUT)?;
    if !watch.lock().services.is_empty() {
        let took = delete_services(cluster)?;
        println!(
            "  deleted the previous Services; released after {:.1} s",
            took.as_secs_f64()
        );
    }
    cluster.restart_agents()?;
    cluster.audit.refresh()?;
    sleep(Duration::from_secs(1))?;

    let docs: Vec<Service> = (0..count).map(service_doc).collect::<anyhow::Result<_>>()?;
    let phase = Phase::create_all(
        cluster,
        Api::namespaced(cluster.client.clone(), NAMESPACE),
        docs,
        "Services",
        &watch.echoes,
    )?;
    let (pids, started, create) = (phase.pids.clone(), phase.started, phase.create);

    let deadline = started + settle_timeout;
    let (mut ingress_at, mut annotated_at, mut addresses_at) = (None, None, None);
    let mut next_address_poll = Instant::now();
    let mut last_print = Instant::now();
    let mut settle_problem = None;
    let services: Api<Service> = Api::namespaced(cluster.client.clone(), NAMESPACE);
    let mut last_probe = Instant::now();
    loop {
        check_interrupted()?;
        cluster.check_alive()?;
        let now = Instant::now();
        if addresses_at.is_none() && now >= next_address_poll {
            let held = cluster
                .vip_addresses(MASTER)?
                .iter()
                .filter(|a| is_pool_address(a))
                .count();
            if held >= count {
                addresses_at = Some(Instant::now());
            }
            next_address_poll = now + Duration::from_millis(100);
        }
        let (with_ingress, annotated, latest_ingress, latest_annotated) = {
            let state = watch.lock();
            let seen = state.services.values();
            (
                seen.clone().filter(|s| s.ingress_at.is_some()).count(),
                seen.clone().filter(|s| s.annotated_at.is_some()).count(),
                seen.clone().filter_map(|s| s.ingress_at).max(),
                seen.filter_map(|s| s.annotated_at).max(),
            )
        };
        if with_ingress >= count && ingress_at.is_none() {
            ingress_at = latest_ingress;
        }
        if annotated >= count && annotated_at.is_none() {
            annotated_at = latest_annotated;
        }
        if ingress_at.is_some() && annotated_at.is_some() && addresses_at.is_some() {
            break;
        }
        let held = || -> anyhow::Result<usize> {
            Ok(cluster
                .vip_addresses(MASTER)?
                .iter()
                .filter(|a| is_pool_address(a))
                .count())
        };
        // Nothing new for a while: make sure the watch is not the one that stopped.
        let last_change = watch.lock().tally.last_change.unwrap_or(started);
        if now.duration_since(last_change) >= PROBE_AFTER
            && now.duration_since(last_probe) >= PROBE_AFTER
        {
            watch.probe(&cluster.runtime, &services, &format!("bench={LABEL}"));
            last_probe = now;
        }
        if now.duration_since(last_print) >= Duration::from_secs(5) {
            println!(
                "  … {:.0} s: {with_ingress} with an address, {annotated} with the master annotation, node-a holds {} addresses",
                started.elapsed().as_secs_f64(),
                held()?
            );
            last_print = now;
        }
        if now >= deadline {
            let problem = format!(
                "not settled after {settle_timeout:?}: {with_ingress}/{count} with an address, {annotated}/{count} annotated, node-a holds {} of {count} addresses",
                held()?
            );
            eprintln!("  warning: {problem}; measuring anyway");
            settle_problem = Some(problem);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let quiet_at = wait_quiet(|| watch.lock().tally.last_change, "Services")?;
    let (cpu_settled, settle_apiserver) = phase.settled(cluster)?;
    let settle_end = quiet_at.unwrap_or_else(Instant::now) + Duration::from_millis(1);
    let settle_writes = cluster.audit.node_writes(wall(started), wall(settle_end))?;
    let since = |at: Option<Instant>| at.map(|at| round3(at.duration_since(started).as_secs_f64()));
    let mut annotated_by: BTreeMap<String, usize> = BTreeMap::new();
    for seen in watch.lock().services.values() {
        if let Some(node) = &seen.master {
            *annotated_by.entry(node.clone()).or_default() += 1;
        }
    }
    println!(
        "  all with an address after {}, all annotated after {}, {count} addresses on node-a after {}, quiet after {} (s); annotations name {annotated_by:?}",
        opt_s(since(ingress_at)),
        opt_s(since(annotated_at)),
        opt_s(since(addresses_at)),
        opt_s(since(quiet_at)),
    );
    let settle_cpu_percent = settling_report(
        cluster,
        &settle_writes,
        &phase.cpu_start,
        &cpu_settled,
        clock_ticks,
    );
    let changes_before = watch.lock().tally.changes;
    let steady = steady_window(cluster, &pids, &[], window, clock_ticks)?;
    let service_changes_in_window = watch.lock().tally.changes - changes_before;
    println!("  Service changes in the window: {service_changes_in_window}");
    Ok(ServicesReport {
        services: count,
        create_s: round3(create.as_secs_f64()),
        to_all_ingress_s: since(ingress_at),
        to_all_annotated_s: since(annotated_at),
        to_all_addresses_on_master_s: since(addresses_at),
        to_quiet_s: since(quiet_at),
        annotated_by,
        settle_problem,
        settle_writes,
        settle_cpu_percent,
        settle_apiserver,
        service_changes_in_window,
        steady,
    })
}

/// The table's section for the Service runs.
pub(super) fn table(t: &mut Table, runs: &[ServicesReport]) {
    let names: Vec<String> = runs
        .iter()
        .map(|r| format!("{} Services", r.services))
        .collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    t.heading(
        "\n4. Services of type LoadBalancer from one pool (s from the first create)",
        &names,
    );
    t.row("create all (harness, 16 in flight)", runs, |r| {
        format!("{:.2} s", r.create_s)
    });
    t.row("→ all with an address (ingress)", runs, |r| {
        opt_s(r.to_all_ingress_s)
    });
    t.row("→ all annotated with their master", runs, |r| {
        opt_s(r.to_all_annotated_s)
    });
    t.row("→ all addresses on node-a", runs, |r| {
        opt_s(r.to_all_addresses_on_master_s)
    });
    t.row("→ last Service change (3 s quiet)", runs, |r| {
        opt_s(r.to_quiet_s)
    });
    for node in ["node-a", "node-b", "node-c"] {
        t.row(&format!("settling writes {node} (peak/s)"), runs, |r| {
            let w = r.settle_writes.of(node);
            format!("{} ({})", w.total, w.peak_per_second)
        });
    }
    for node in ["node-a", "node-b", "node-c"] {
        t.row(&format!("steady writes/s {node}"), runs, |r| {
            let w = r.steady.writes.of(node);
            format!("{:.2} ({})", w.per_second, w.total)
        });
    }
    for (i, node) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        t.row(&format!("steady CPU / RSS {node}"), runs, |r| {
            r.steady.agents.get(i).map_or("—".into(), |a| {
                format!(
                    "{:.2}% / {:.1} MiB",
                    a.cpu_percent_of_one_core,
                    a.rss_kib as f64 / 1024.0
                )
            })
        });
    }
}
