//! Services of `type: LoadBalancer`, the agents' side, end to end: the real `ferrovip agent`
//! binary in two network namespaces against a real kube-apiserver v1.20 with etcd. The test
//! writes the allocation record (`ferrovip.io/allocated`) itself, as the Service controller's
//! leader would, so what is tested is only the agents: the address becomes a VRRP-held address
//! on exactly one node, the `ferrovip.io/master` annotation and a `MasterElected` Event name
//! that node, a killed master's address moves to the other node within about
//! Master_Down_Interval, and nothing is written at steady state.
//!
//! IPVS is not available on the host kernel: the IPVS-forwarded pool is checked through the
//! service set the agents plan (their dataplane reports how many virtual services it could
//! not program); the VM tests drive the real IPVS path.
//!
//! Needs root; one test at a time (`--test-threads=1`).

#[allow(dead_code)]
mod k8s_util;

use std::time::{Duration, Instant};

use k8s_util::{K8sLab, text};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const POOL_CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_loadbalancerpools.yaml"
);
/// Advertisements every 100 ms, node-a preferred (150 against 100): Master_Down_Interval of
/// node-b is 3 × 100 ms + (256 − 100) × 100 ms / 256 ≈ 361 ms.
const MASTER_DOWN_B: Duration = Duration::from_millis(361);
/// Scheduling noise on a shared 2-core machine (debug build, etcd, kube-apiserver, agents).
const LATE: Duration = Duration::from_millis(250);

fn pool(name: &str, addresses: &str, forwarding: &str) -> Value {
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "LoadBalancerPool",
        "metadata": {"name": name},
        "spec": {
            "addresses": [addresses],
            "template": {
                "interface": "eth0",
                "vrrp": {"advertisementInterval": "100ms"},
                "priority": {"base": 100, "preferredNodes": [{"nodeName": "node-a", "weight": 50}]},
                "forwarding": forwarding,
            },
        },
    })
}

/// A Service with the allocation record the leader would have written.
fn service(name: &str, record: &str, ports: &[u16]) -> Value {
    let ports: Vec<Value> = ports
        .iter()
        .map(|p| json!({"name": format!("p{p}"), "port": p, "protocol": "TCP"}))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": name,
            "namespace": "default",
            "annotations": {"ferrovip.io/allocated": record},
        },
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": ports},
    })
}

fn master_annotation(c: &K8sLab, name: &str) -> String {
    let out = c.kubectl(&["get", "service", name, "-n", "default", "-o", "json"]);
    let svc: Value = serde_json::from_str(&out).expect("service json");
    text(&svc["metadata"]["annotations"]["ferrovip.io/master"])
}

fn wait_annotation(c: &K8sLab, name: &str, want: &str, timeout: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let got = master_annotation(c, name);
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "Service {name}: ferrovip.io/master should be {want:?} within {timeout:?}, is {got:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn service_events(c: &K8sLab, name: &str, reason: &str) -> Vec<Value> {
    let out = c.kubectl(&["get", "events.events.k8s.io", "-n", "default", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| {
            e["regarding"]["kind"] == "Service"
                && e["regarding"]["name"] == name
                && e["reason"] == reason
        })
        .cloned()
        .collect()
}

/// Patches of Services (any field) since `mark`, from the audit log, per user.
fn service_patches_since(c: &K8sLab, mark: u64) -> usize {
    let log = std::fs::read(c.api.audit_log_path()).unwrap_or_default();
    let from = usize::try_from(mark).unwrap_or(usize::MAX).min(log.len());
    String::from_utf8_lossy(&log[from..])
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| {
            e["verb"] == "patch"
                && e["objectRef"]["resource"] == "services"
                && e["stage"] == "ResponseComplete"
        })
        .count()
}

/// Two nodes, the API server with the pool CRD and `pools`, no agent yet.
fn installed_with_pools(pools: Vec<Value>) -> K8sLab {
    let mut c = K8sLab::new(2);
    c.install();
    c.kubectl(&["apply", "-f", POOL_CRD]);
    c.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=30s",
        "crd/loadbalancerpools.ferrovip.io",
    ]);
    c.apply(&json!({"apiVersion": "v1", "kind": "List", "items": pools}));
    c
}

/// [`installed_with_pools`], the agents started.
fn lab_with_pools(pools: Vec<Value>) -> K8sLab {
    let mut c = installed_with_pools(pools);
    c.start_agents();
    c
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

#[test]
fn e2e_lb_service_address_held_by_one_node_annotated_and_failed_over() {
    let mut c = lab_with_pools(vec![
        pool("web", "192.0.2.200-192.0.2.219", "KubeProxy"),
        pool("fast", "192.0.2.220-192.0.2.229", "IPVS"),
    ]);
    // node-a looks like a node with kube-proxy in IPVS mode without strict ARP (its link;
    // a veth, as the host kernel may lack the dummy driver).
    c.exec_ok(
        0,
        &[
            "ip",
            "link",
            "add",
            "kube-ipvs0",
            "type",
            "veth",
            "peer",
            "name",
            "kp-peer",
        ],
    );

    // --- 1. Service create (with the record) → the preferred node holds the address and it
    // answers; several times, for the median.
    let mut latencies = Vec::new();
    for i in 0..5 {
        let addr = format!("192.0.2.{}", 210 + i);
        let name = format!("probe-{i}");
        let mut pinger = c.spawn_ping(&addr, Duration::from_secs(10));
        let created = Instant::now();
        c.apply(&service(&name, &format!("{addr}@web"), &[80]));
        let (answered, replied) = pinger.wait();
        assert!(replied, "{addr} never answered a ping");
        latencies.push(answered.duration_since(created));
        c.wait_holders(&addr, &[0], Duration::from_secs(5));
        c.kubectl(&["delete", "service", &name, "-n", "default", "--wait=true"]);
        c.wait_holders(&addr, &[], Duration::from_secs(5));
    }
    eprintln!(
        "Service create → first ping reply via the address: median {} (runs: {})",
        ms(median(latencies.clone())),
        latencies
            .iter()
            .map(|d| ms(*d))
            .collect::<Vec<_>>()
            .join(", ")
    );
    assert!(
        median(latencies) <= Duration::from_millis(1500),
        "Service create → first ping is over the 1.5 s target"
    );

    // The agent on node-a reported kube-proxy's missing strict ARP as a Warning Event on
    // its Node (cluster-scoped: kube-system on v1.20), node-b did not.
    let node_events = |node: &str| -> Vec<Value> {
        let out = c.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| {
                e["regarding"]["kind"] == "Node"
                    && e["regarding"]["name"] == node
                    && e["reason"] == "KubeProxyStrictARPOff"
            })
            .cloned()
            .collect()
    };
    let started = Instant::now();
    while node_events("node-a").is_empty() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no KubeProxyStrictARPOff Event about node-a"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node_events("node-a").len(), 1, "reported once");
    assert!(node_events("node-b").is_empty());

    // --- 2. The long-lived Service: exactly one holder, annotation and Event name it.
    let addr = "192.0.2.200";
    c.apply(&service("shop", &format!("{addr}@web"), &[80, 443]));
    c.wait_holders(addr, &[0], Duration::from_secs(5));
    let took = wait_annotation(&c, "shop", "192.0.2.200=node-a", Duration::from_secs(5));
    eprintln!(
        "master annotation written {} after the address was held",
        ms(took)
    );
    let events = service_events(&c, "shop", "MasterElected");
    assert_eq!(events.len(), 1, "one MasterElected Event: {events:?}");
    assert_eq!(events[0]["reportingInstance"], "node-a");
    assert!(text(&events[0]["note"]).contains("node-a holds 192.0.2.200"));
    // Never a VirtualIP status write for a synthetic resource: there is no such VirtualIP.
    let vips = c.kubectl(&["get", "virtualips", "-o", "name"]);
    assert!(vips.trim().is_empty(), "no VirtualIP objects: {vips}");

    // --- 3. Steady state: no Service writes.
    let mark = c.audit_mark();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        service_patches_since(&c, mark),
        0,
        "Service patches at steady state"
    );

    // --- 4. Kill the master: node-b holds the address within about Master_Down_Interval,
    // and as new master writes the annotation.
    let killed = c.signal(0, Signal::SIGKILL);
    let mut holders_b;
    loop {
        holders_b = c.has(1, addr);
        if holders_b || killed.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let takeover = killed.elapsed();
    assert!(holders_b, "node-b never took {addr} over");
    eprintln!(
        "takeover by node-b {} after SIGKILL of node-a (Master_Down_Interval {})",
        ms(takeover),
        ms(MASTER_DOWN_B)
    );
    assert!(
        takeover <= MASTER_DOWN_B + LATE,
        "takeover took {takeover:?}"
    );
    // node-a's address expires (lifetime) now that its agent is dead.
    c.wait_holders(addr, &[1], Duration::from_secs(3));
    wait_annotation(&c, "shop", "192.0.2.200=node-b", Duration::from_secs(5));
    let events = service_events(&c, "shop", "MasterElected");
    assert!(
        events.iter().any(|e| e["reportingInstance"] == "node-b"),
        "a MasterElected Event from node-b: {events:?}"
    );

    // --- 5. node-a back: it preempts (priority 150), writes the annotation again.
    c.start_agent(0);
    c.wait_listed(0);
    c.wait_holders(addr, &[0], Duration::from_secs(5));
    wait_annotation(&c, "shop", "192.0.2.200=node-a", Duration::from_secs(5));

    // --- 6. IPVS forwarding: every node plans one virtual service per port (two here); the
    // host kernel has no IPVS, so the dataplane says it cannot program them.
    c.apply(&service("api", "192.0.2.220@fast", &[8080, 8443]));
    c.wait_holders("192.0.2.220", &[0], Duration::from_secs(5));
    for i in 0..2 {
        let line = c.wait_log(i, "the IPVS service set", Duration::from_secs(5), |l| {
            l["dataplane"] == "ipvs" && l["services"] == 2
        });
        eprintln!("{}: {line}", c.name(i));
    }
    wait_annotation(&c, "api", "192.0.2.220=node-a", Duration::from_secs(5));

    // --- 7. A record naming a pool that does not exist, or no record: nothing held.
    c.apply(&service("orphan", "192.0.2.230@missing", &[80]));
    c.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "pending", "namespace": "default"},
        "spec": {"type": "LoadBalancer", "ports": [{"port": 80}],
                 "loadBalancerIP": "192.0.2.201"},
    }));
    std::thread::sleep(Duration::from_secs(1));
    assert!(c.holders("192.0.2.230").is_empty());
    assert!(c.holders("192.0.2.201").is_empty());

    // --- 8. Delete: released everywhere.
    c.kubectl(&["delete", "service", "shop", "-n", "default"]);
    c.wait_holders(addr, &[], Duration::from_secs(5));
}

#[test]
fn e2e_lb_a_burst_of_services_gets_a_few_events_and_one_summary() {
    let mut c = lab_with_pools(vec![pool("web", "192.0.2.200-192.0.2.219", "KubeProxy")]);
    c.wait_listed(0);

    // 14 Services at once, all in node-a's instance: the first 8 get a MasterElected Event
    // each, the other 6 one Event about the Node once their annotations are written.
    const BURST: usize = 14;
    const OWN: usize = 8;
    let items: Vec<Value> = (0..BURST)
        .map(|i| {
            service(
                &format!("burst-{i}"),
                &format!("192.0.2.{}@web", 200 + i),
                &[80],
            )
        })
        .collect();
    c.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    for i in 0..BURST {
        wait_annotation(
            &c,
            &format!("burst-{i}"),
            &format!("192.0.2.{}=node-a", 200 + i),
            Duration::from_secs(10),
        );
    }
    let elected = || -> (usize, Vec<String>) {
        let out = c.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
        let items = list["items"].as_array().cloned().unwrap_or_default();
        let mine = items
            .iter()
            .filter(|e| e["reason"] == "MasterElected" && e["reportingInstance"] == "node-a");
        let own = mine
            .clone()
            .filter(|e| e["regarding"]["kind"] == "Service")
            .count();
        // (The instance's own MasterElected Event about the Node, "is master of N
        // VirtualIPs", is another matter.)
        let summaries = mine
            .filter(|e| e["regarding"]["kind"] == "Node" && e["regarding"]["name"] == "node-a")
            .map(|e| text(&e["note"]))
            .filter(|note| note.contains("more Services"))
            .collect();
        (own, summaries)
    };
    let started = Instant::now();
    let (own, summaries) = loop {
        let (own, summaries) = elected();
        if own + summaries.len() > OWN || started.elapsed() > Duration::from_secs(10) {
            break (own, summaries);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("{own} Service Events, summaries: {summaries:?}");
    assert_eq!(own, OWN, "an Event each for the first {OWN}");
    assert_eq!(summaries.len(), 1, "one summary: {summaries:?}");
    assert!(
        summaries[0].starts_with(&format!(
            "node-a holds the addresses of {} more Services ({} addresses): default/burst-",
            BURST - OWN,
            BURST - OWN
        )),
        "{summaries:?}"
    );
    // Nothing more follows.
    std::thread::sleep(Duration::from_secs(2));
    let (own_after, summaries_after) = elected();
    assert_eq!((own_after, summaries_after.len()), (OWN, 1));
}

/// A Service of `type: LoadBalancer` with nothing of ferrovip's on it (the controller
/// allocates).
/// A field of the controller's Lease (empty until the first agent creates it).
fn lease_field(c: &K8sLab, path: &str) -> String {
    let out = c.kubectl_output(&[
        "get",
        "lease",
        "-n",
        "ferrovip-system",
        "ferrovip-controller",
        "-o",
        &format!("jsonpath={{{path}}}"),
    ]);
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn plain_service(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

/// Service name → its first `status.loadBalancer.ingress` address, for those that have one.
fn ingress_addresses(c: &K8sLab) -> std::collections::BTreeMap<String, String> {
    let out = c.kubectl(&["get", "services", "-n", "default", "-o", "json"]);
    let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
    list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            let ip = text(&s["status"]["loadBalancer"]["ingress"][0]["ip"]);
            (!ip.is_empty()).then(|| (text(&s["metadata"]["name"]), ip))
        })
        .collect()
}

/// The log line of node `i`'s controller term starting to decide.
fn controller_listed(c: &K8sLab, i: usize) -> Value {
    c.wait_log(i, "the controller's list", Duration::from_secs(20), |l| {
        l["message"] == "Service controller: cluster listed"
    })
}

fn wait_allocated(
    c: &K8sLab,
    count: usize,
    timeout: Duration,
) -> std::collections::BTreeMap<String, String> {
    let started = Instant::now();
    loop {
        let got = ingress_addresses(c);
        if got.len() >= count {
            return got;
        }
        assert!(
            started.elapsed() < timeout,
            "{count} Services should have an address within {timeout:?}: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Service controller in the agents reads the agents' own stores (no watches of its own
/// for Services, pools, VirtualIPs): the first leader allocates from them (a burst's Events:
/// 8 of their own and one summary about the pool), and when it is killed in the middle of a
/// burst the next one catches its shared stores up with a fresh read before deciding, keeps
/// every address given and gives no address twice.
#[test]
fn e2e_lb_the_agents_controller_reads_their_stores_and_hands_over_without_a_duplicate() {
    let mut c = installed_with_pools(vec![pool("web", "192.0.2.200-192.0.2.239", "KubeProxy")]);
    // The controller's Lease Role, bound to the agents (the chart does this).
    c.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "agents-lease", "namespace": "ferrovip-system"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferrovip-controller-lease"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": ferrovip_e2e::AGENT_GROUP}],
    }));
    let lease = ["--lease-duration=3s", "--lease-renew=1s"];
    for i in 0..2 {
        c.start_agent_with(i, &lease);
    }
    for i in 0..2 {
        c.wait_listed(i);
    }
    let holder = || lease_field(&c, ".spec.holderIdentity");
    let started = Instant::now();
    let first = loop {
        let h = holder();
        if let Some(i) = (0..2).find(|&i| c.name(i) == h) {
            break i;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no agent leads the controller: {h:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let other = 1 - first;
    let line = controller_listed(&c, first);
    assert_eq!(line["shared"], true, "{line}");

    // --- 1. 15 Services allocated by the first leader.
    let items: Vec<Value> = (0..15).map(|i| plain_service(&format!("a-{i}"))).collect();
    c.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    let before = wait_allocated(&c, 15, Duration::from_secs(20));
    // Their AddressAllocated Events: 8 of their own, the other 7 counted into one Event
    // about the pool.
    let started = Instant::now();
    let (own, summaries) = loop {
        let out = c.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"]);
        let list: Value = serde_json::from_str(&out).expect("kubectl -o json");
        let allocated: Vec<Value> = list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["reason"] == "AddressAllocated")
            .cloned()
            .collect();
        let own = allocated
            .iter()
            .filter(|e| e["regarding"]["kind"] == "Service")
            .count();
        let summaries: Vec<String> = allocated
            .iter()
            .filter(|e| e["regarding"]["kind"] == "LoadBalancerPool")
            .map(|e| text(&e["note"]))
            .collect();
        if (own, summaries.len()) == (8, 1) || started.elapsed() > Duration::from_secs(15) {
            break (own, summaries);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(own, 8, "an Event each for the first 8: {summaries:?}");
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert!(
        summaries[0].starts_with("pool web: 7 more addresses allocated to Services: default/a-"),
        "{summaries:?}"
    );
    // The Lease carries how far the leader's Service watch has come (the other agent checks
    // its own watch against it): at least as far as every Service now.
    let started = Instant::now();
    loop {
        let services: Value =
            serde_json::from_str(&c.kubectl(&["get", "services", "-A", "-o", "json"]))
                .expect("kubectl -o json");
        let newest = services["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| text(&s["metadata"]["resourceVersion"]).parse::<u64>().ok())
            .max()
            .expect("Services have versions");
        let heard = lease_field(&c, ".metadata.annotations.ferrovip\\.io/services-heard");
        if heard.parse::<u64>().is_ok_and(|h| h >= newest) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the Lease should carry the leader's Service watch progress (≥ {newest}): {heard:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // --- 2. The leader killed, 15 more created at once: the other agent takes over.
    c.signal(first, Signal::SIGKILL);
    let items: Vec<Value> = (0..15).map(|i| plain_service(&format!("b-{i}"))).collect();
    c.apply(&json!({"apiVersion": "v1", "kind": "List", "items": items}));
    let after = wait_allocated(&c, 30, Duration::from_secs(30));
    let line = controller_listed(&c, other);
    assert_eq!(line["shared"], true, "{line}");
    let log = c.log(other);
    assert!(
        !log.iter()
            .any(|l| text(&l["message"]).contains("has not caught up")),
        "the new leader's shared store should have caught up"
    );
    // Healthy watches: none was taken as silent, although the other agent checked its own
    // against the Lease and the writes.
    assert!(
        !log.iter()
            .any(|l| text(&l["message"]).contains("taken as silent")),
        "no watch of a healthy API server should be listed again"
    );
    for (name, addr) in &before {
        assert_eq!(
            after.get(name),
            Some(addr),
            "{name} must keep its address across the handover"
        );
    }
    let mut seen = std::collections::BTreeMap::new();
    for (name, addr) in &after {
        if let Some(earlier) = seen.insert(addr.clone(), name.clone()) {
            panic!("{addr} given to both {earlier} and {name}: {after:?}");
        }
    }
    eprintln!(
        "{} Services, {} distinct addresses, leader {} then {}",
        after.len(),
        seen.len(),
        c.name(first),
        c.name(other)
    );
}
