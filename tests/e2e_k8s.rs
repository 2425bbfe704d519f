//! End-to-end tests of the agent in Kubernetes mode: the real `ferrovip agent` binary in every
//! node of a lab of network namespaces, each with its node's least-privilege identity
//! (config/rbac bound to the agents' group), against a real kube-apiserver v1.20 with etcd
//! (`ferrovip_e2e::ApiServer`). Observed four ways: `kubectl` (status, printer columns,
//! Events), a capture on the lab bridge (adverts, gratuitous ARP), the kernel (`ip addr`,
//! ping) and the agents' JSON transition log lines.
//!
//! Needs root and runs one test at a time (`--test-threads=1`, as e2e/test.sh does). One lab
//! and one API server per test; each test covers several behaviours to share the start-up.
//!
//! Timing facts (RFC 5798), copied here from the VRRP notes:
//! - Skew_Time = ((256 − Priority) × Master_Adver_Interval) / 256
//! - Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time
//!
//! All VirtualIPs advertise every 100 ms; priorities with the default preferences are
//! node-a 150, node-b 140, node-c 60 (base 100, +50, +40, −40), so node-b's takeover timer
//! (345 ms) fires well before node-c's (377 ms).

mod k8s_util;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferrovip::lab::{FailoverQuery, master_down_interval, measure_failover};
use k8s_util::{K8sLab, condition, entry_names, node_entry, reasons, text};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

const INTERVAL: Duration = Duration::from_millis(100);
/// Scheduling noise allowed on top of a protocol timer (debug build, two cores shared with
/// etcd, kube-apiserver and three agents).
const LATE: Duration = Duration::from_millis(150);
const PRIO_A: u8 = 150;
const PRIO_B: u8 = 140;
const PRIO_C: u8 = 60;

/// A VirtualIP with the lab defaults: VRRPv3 every 100 ms, base 100, node-a +50, node-b +40,
/// node-c −40.
fn vip_doc(name: &str, addresses: &[&str], vrid: Option<u8>) -> Value {
    let mut spec = json!({
        "addresses": addresses,
        "interface": "eth0",
        "vrrp": {"advertisementInterval": "100ms"},
        "priority": {
            "base": 100,
            "preferredNodes": [
                {"nodeName": "node-a", "weight": 50},
                {"nodeName": "node-b", "weight": 40},
                {"nodeName": "node-c", "weight": -40},
            ],
        },
    });
    if let Some(vrid) = vrid {
        spec["virtualRouterId"] = json!(vrid);
    }
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": name},
        "spec": spec,
    })
}

/// `web`: 192.0.2.100/24 on VRID 51, the VirtualIP every test starts with.
fn web_doc() -> Value {
    vip_doc("web", &["192.0.2.100/24"], Some(51))
}

fn list(items: Vec<Value>) -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": items})
}

fn ip(addr: &str) -> IpAddr {
    addr.parse().expect("address")
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// Active with `master`, as every node reports it.
fn active_with(vip: &Value, master: &str) -> bool {
    vip["status"]["master"] == master
        && vip["status"]["state"] == "Active"
        && condition(vip, "Ready").is_some_and(|c| c["status"] == "True")
}

/// `status.nodes[]` shows `states` (node, state) and nothing else.
fn entries_are(vip: &Value, states: &[(&str, &str)]) -> bool {
    let mut names = entry_names(vip);
    names.sort();
    let mut want: Vec<String> = states.iter().map(|(n, _)| n.to_string()).collect();
    want.sort();
    names == want
        && states
            .iter()
            .all(|(n, s)| node_entry(vip, n).is_some_and(|e| e["state"] == *s))
}

/// Active with node-a as master, and node-b and node-c as its backups, as every node reports it.
fn led_by_node_a_of_three(vip: &Value) -> bool {
    active_with(vip, "node-a")
        && entries_are(
            vip,
            &[
                ("node-a", "Master"),
                ("node-b", "Backup"),
                ("node-c", "Backup"),
            ],
        )
}

/// Writes per second per field manager over `window`, for the report.
fn rates(counts: &std::collections::BTreeMap<String, usize>, window: Duration) -> String {
    if counts.is_empty() {
        return "none".into();
    }
    counts
        .iter()
        .map(|(m, n)| format!("{m}: {:.2}/s", *n as f64 / window.as_secs_f64()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Checks whose failure does not invalidate the steps after them (status quality, not
/// addresses): collected and reported together at the end, so one run shows every problem.
#[derive(Default)]
struct Findings(Vec<String>);

impl Findings {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            let finding = what();
            eprintln!("FINDING: {finding}");
            self.0.push(finding);
        }
    }

    fn finish(self) {
        assert!(
            self.0.is_empty(),
            "{} finding(s):\n- {}",
            self.0.len(),
            self.0.join("\n- ")
        );
    }
}

// ---------------------------------------------------------------------------------------------

/// Install, apply, status, printer columns, Events; no status churn; a backup's restart;
/// invalid and conflicting resources; shared instances; deletion.
#[test]
fn e2e_k8s_apply_status_conflicts_sharing_and_deletion() {
    let mut findings = Findings::default();
    let started = Instant::now();
    let mut c = K8sLab::running(3);

    // --- 1. kubectl apply → the preferred node holds the VIP and it answers.
    let web = "192.0.2.100";
    let mut pinger = c.spawn_ping(web, Duration::from_secs(10));
    let applied = Instant::now();
    c.apply(&web_doc());
    let kubectl_took = applied.elapsed();
    let garp = c
        .sniffer
        .wait_for(
            |e| e.at >= applied && e.announced() == Some(ip(web)),
            Duration::from_secs(5),
        )
        .expect("a gratuitous ARP for the VIP");
    let (answered, replied) = pinger.wait();
    assert!(replied, "{web} never answered a ping");
    let (vip, _) = c.wait_vip(
        "web",
        "Active on node-a",
        Duration::from_secs(5),
        led_by_node_a_of_three,
    );
    let apply_to_status = applied.elapsed();
    let apply_to_garp = garp.at.duration_since(applied);
    let apply_to_ping = answered.duration_since(applied);
    eprintln!(
        "apply → VIP: kubectl apply returned after {}, GARP after {}, first ping reply after {}",
        ms(kubectl_took),
        ms(apply_to_garp),
        ms(apply_to_ping)
    );
    // Whoever's timer fires first announces: node-a's Master_Down_Interval is only 4 ms
    // shorter than node-b's, less than the spread of the agents' watch deliveries, so node-b
    // may hold the address briefly before node-a preempts it.
    eprintln!(
        "first announcement by {}",
        if garp.src_mac == c.node(0).mac {
            "node-a"
        } else {
            "another node"
        }
    );
    // The target (< 1 s) is the benchmark's (`cargo bench --bench k8s` measures apply →
    // ping); here a bound that a loaded 2-core machine keeps and a broken path does not (it
    // measured 1.46 s once while four builds shared the cores).
    assert!(
        apply_to_ping < Duration::from_secs(3),
        "apply → ping took {apply_to_ping:?} (sanity bound 3 s; target < 1 s)"
    );
    eprintln!(
        "apply → status Active with three node entries (kubectl polling) within {}",
        ms(apply_to_status)
    );
    c.wait_master(51, 0, Duration::from_secs(2));
    c.wait_holders(web, &[0], Duration::from_secs(1));

    let status = &vip["status"];
    assert_eq!(status["virtualRouterId"], 51);
    assert_eq!(status["observedGeneration"], vip["metadata"]["generation"]);
    for (node, priority, preference) in [
        ("node-a", PRIO_A, "preferred node +50"),
        ("node-b", PRIO_B, "preferred node +40"),
        ("node-c", PRIO_C, "preferred node -40"),
    ] {
        let entry = node_entry(&vip, node).expect("entry");
        assert_eq!(entry["priority"], priority, "{node}: {entry}");
        assert_eq!(reasons(&vip, node), ["base 100", preference], "{node}");
        assert!(entry["lastTransitionTime"].is_string(), "{node}: {entry}");
    }
    let ready = condition(&vip, "Ready").expect("Ready condition");
    assert_eq!(ready["reason"], "MasterElected");
    assert!(text(&ready["message"]).contains("node-a"), "{ready}");
    assert_eq!(
        condition(&vip, "Conflict").expect("Conflict")["status"],
        "False"
    );

    let table = c.kubectl(&["get", "vip"]);
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["NAME", "ADDRESSES", "MASTER", "STATE", "AGE"],
        "{table}"
    );
    assert_eq!(
        rows[1][..4],
        ["web", "[\"192.0.2.100/24\"]", "node-a", "Active"],
        "{table}"
    );

    c.wait_event("web", "MasterElected", Duration::from_secs(5));
    // Every election's Event, once published: a node that was briefly master at start-up
    // publishes its Event after the first one is seen.
    let elections = || -> (Vec<Value>, usize) {
        let elected: Vec<Value> = c
            .events_about("kube-system", "web")
            .into_iter()
            .filter(|e| e["reason"] == "MasterElected")
            .collect();
        let became_master: usize = c
            .all_transitions()
            .iter()
            .map(|log| {
                log.iter()
                    .filter(|t| t.vip == "web" && t.to == "MASTER")
                    .count()
            })
            .sum();
        (elected, became_master)
    };
    let settled = Instant::now();
    let (elected, became_master) = loop {
        let (elected, became_master) = elections();
        if elected.len() >= became_master || settled.elapsed() > Duration::from_secs(5) {
            break (elected, became_master);
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    for event in &elected {
        assert_eq!(event["type"], "Normal", "{event}");
        assert_eq!(event["reportingController"], "ferrovip.io/agent", "{event}");
    }
    let by_a = elected
        .iter()
        .filter(|e| e["reportingInstance"] == "node-a")
        .count();
    assert!(by_a >= 1, "no MasterElected Event by node-a: {elected:?}");
    assert_eq!(
        elected.len(),
        became_master,
        "one MasterElected Event per election"
    );

    // --- 3. Nothing changes → nothing is written.
    let quiet = Duration::from_secs(5);
    let rv_before = text(&c.vip("web")["metadata"]["resourceVersion"]);
    let mark = c.audit_mark();
    let writes = c.count_writes(quiet);
    let requests = c.status_requests_since(mark);
    let rv_after = text(&c.vip("web")["metadata"]["resourceVersion"]);
    eprintln!(
        "steady state over {quiet:?}: {} writes; status requests per node: {}",
        writes.total,
        rates(&requests, quiet)
    );
    assert_eq!(writes.total, 0, "status churn at steady state: {writes:?}");
    assert!(
        requests.is_empty(),
        "status requests at steady state: {requests:?}"
    );
    assert_eq!(rv_before, rv_after, "the VirtualIP changed at steady state");

    // --- 8. Restarting a backup's agent does not move the VIP.
    let before = c.all_transitions();
    let counter = c.write_counter(Duration::from_secs(3));
    let mark = c.audit_mark();
    let since = c.signal(1, Signal::SIGTERM);
    c.wait_exit(1);
    c.start_agent(1);
    c.wait_listed(1);
    c.wait_log(1, "its Backup transition", Duration::from_secs(5), |l| {
        l["event"] == "transition" && l["to"] == "BACKUP"
    });
    let writes = counter.join();
    let requests = c.status_requests_since(mark);
    eprintln!(
        "while node-b's agent restarted: {} writes; status requests {requests:?}",
        writes.total
    );
    // node-b rewrites its own entry (new lastTransitionTime); nobody else has news, and the
    // VirtualIP was served throughout.
    let not_ready: Vec<&Value> = writes
        .statuses
        .iter()
        .map(|(_, status)| status)
        .filter(|status| status["state"] != "Active")
        .collect();
    findings.check(not_ready.is_empty(), || {
        format!(
            "while a backup's agent restarted, status turned non-Active {} times in {} writes \
             (first: state {}, conditions {}); status requests {requests:?}",
            not_ready.len(),
            writes.total,
            not_ready[0]["state"],
            not_ready[0]["conditions"],
        )
    });
    findings.check(
        requests.keys().all(|user| user == "ferrovip:node-b"),
        || format!("others wrote status during node-b's restart: {requests:?}"),
    );
    assert_eq!(c.masters_since(51, since), [c.ip(0)], "mastership moved");
    assert_eq!(c.transitions(0), before[0], "node-a changed state");
    assert_eq!(c.transitions(2), before[2], "node-c changed state");
    assert_eq!(c.holders(web), [0]);
    let (_, took) = c.wait_vip(
        "web",
        "node-b back",
        Duration::from_secs(5),
        led_by_node_a_of_three,
    );
    eprintln!(
        "backup restart: mastership stayed on node-a; status settled {}",
        ms(took)
    );

    // --- 5a. A spec the schema cannot catch is refused with a reason; the rest runs on.
    let before = c.all_transitions();
    let since = Instant::now();
    c.apply(&vip_doc("broken", &["192.0.2.300/24"], Some(60)));
    let (vip, _) = c.wait_vip("broken", "Invalid", Duration::from_secs(5), |v| {
        v["status"]["state"] == "Invalid"
    });
    let ready = condition(&vip, "Ready").expect("Ready");
    assert_eq!(ready["status"], "False");
    assert_eq!(ready["reason"], "Invalid");
    assert!(
        text(&ready["message"]).contains("spec.addresses[0]"),
        "the message names the field: {ready}"
    );
    let warning = c.wait_event("broken", "Invalid", Duration::from_secs(5));
    assert_eq!(warning["type"], "Warning");
    assert_eq!(warning["reportingInstance"], "node-a");
    assert!(
        text(&warning["note"]).contains("spec.addresses[0]"),
        "{warning}"
    );

    // --- 5b. The same explicit VRID twice: the newer resource is refused, the older runs on.
    c.apply(&vip_doc("web-dup", &["192.0.2.101/24"], Some(51)));
    let (vip, _) = c.wait_vip("web-dup", "Conflict", Duration::from_secs(5), |v| {
        condition(v, "Conflict").is_some_and(|c| c["status"] == "True")
    });
    let conflict = condition(&vip, "Conflict").expect("Conflict");
    assert_eq!(conflict["reason"], "DuplicateVirtualRouterId");
    assert!(text(&conflict["message"]).contains("\"web\""), "{conflict}");
    assert_eq!(vip["status"]["state"], "Conflict");
    assert_eq!(condition(&vip, "Ready").expect("Ready")["status"], "False");
    let warning = c.wait_event("web-dup", "Conflict", Duration::from_secs(5));
    assert_eq!(warning["type"], "Warning");
    std::thread::sleep(Duration::from_millis(500));
    let web_now = c.vip("web");
    assert!(active_with(&web_now, "node-a"), "{}", web_now["status"]);
    assert_eq!(
        condition(&web_now, "Conflict").expect("Conflict")["status"],
        "False"
    );
    assert_eq!(c.masters_since(51, since), [c.ip(0)]);
    assert_eq!(
        c.all_transitions(),
        before,
        "a refused resource caused a transition"
    );
    assert!(c.holders("192.0.2.101").is_empty());
    assert!(c.ping(web), "web stopped answering");
    let advertised: Vec<Vec<IpAddr>> = c
        .sniffer
        .events_since(since)
        .iter()
        .filter_map(|e| {
            e.advert()
                .filter(|a| a.vrid == 51)
                .map(|a| a.addresses.clone())
        })
        .collect();
    assert!(
        advertised.iter().all(|a| a == &[ip(web)]),
        "VRID 51 advertised other addresses: {advertised:?}"
    );

    // --- 10. Three VirtualIPs without a VRID and with identical settings: one instance.
    let shared = ["192.0.2.121", "192.0.2.122", "192.0.2.123"];
    let before = c.all_transitions();
    let since = Instant::now();
    c.apply(&list(
        (1..=3)
            .map(|i| {
                vip_doc(
                    &format!("shared-{i}"),
                    &[&format!("{}/24", shared[i - 1])],
                    None,
                )
            })
            .collect(),
    ));
    let mut vrids = Vec::new();
    for i in 1..=3 {
        let (vip, _) = c.wait_vip(
            &format!("shared-{i}"),
            "Active on node-a",
            Duration::from_secs(5),
            |v| active_with(v, "node-a") && entry_names(v).len() == 3,
        );
        vrids.push(vip["status"]["virtualRouterId"].as_u64().expect("a VRID"));
    }
    let vrid = vrids[0] as u8;
    assert!(vrids.iter().all(|v| *v == vrids[0]), "one VRID: {vrids:?}");
    assert_ne!(vrid, 51);
    for addr in shared {
        c.wait_holders(addr, &[0], Duration::from_secs(2));
    }
    c.wait_master(vrid, 0, Duration::from_secs(2));
    let window = Instant::now() - Duration::from_millis(500);
    let mut on_wire: Vec<u8> = c
        .sniffer
        .events_since(window)
        .iter()
        .filter_map(|e| e.advert().map(|a| a.vrid))
        .collect();
    on_wire.sort();
    on_wire.dedup();
    assert_eq!(on_wire, [51, vrid], "VRIDs on the wire");
    let last = c
        .sniffer
        .events_since(window)
        .iter()
        .rev()
        .find_map(|e| e.advert().filter(|a| a.vrid == vrid).cloned())
        .expect("an advert of the shared instance");
    let mut carried = last.addresses.clone();
    carried.sort();
    assert_eq!(
        carried,
        shared.map(ip),
        "the shared advert carries every address"
    );
    for (node, log) in c.all_transitions().iter().enumerate() {
        let new: Vec<_> = log[before[node].len()..].to_vec();
        assert!(
            new.iter()
                .all(|t| t.vrid == u64::from(vrid) && t.vip == "shared-1"),
            "{}: one instance, named after its first VirtualIP: {new:?}",
            c.name(node)
        );
        let want = if node == 0 { "MASTER" } else { "BACKUP" };
        assert_eq!(
            new.last().map(|t| t.to.as_str()),
            Some(want),
            "{}: {new:?}",
            c.name(node)
        );
    }
    assert_eq!(c.masters_since(51, since), [c.ip(0)]);

    // --- 10b. The instance grows past 8 VirtualIPs (12): its healthy backups list themselves
    // on its first VirtualIP only (shared-1); the others show the master's entry alone (the
    // backups' earlier entries on shared-2 and shared-3 dropped), so a settle costs about one
    // write per VirtualIP, not one per VirtualIP per node.
    let mark = c.audit_mark();
    let grown = Instant::now();
    c.apply(&list(
        (4..=12)
            .map(|i| {
                vip_doc(
                    &format!("shared-{i}"),
                    &[&format!("192.0.2.{}/24", 120 + i)],
                    None,
                )
            })
            .collect(),
    ));
    for i in 1..=12 {
        let name = format!("shared-{i}");
        let want: &[&str] = if i == 1 {
            &["node-a", "node-b", "node-c"]
        } else {
            &["node-a"]
        };
        c.wait_vip(&name, "Active on node-a", Duration::from_secs(10), |v| {
            let mut names = entry_names(v);
            names.sort();
            active_with(v, "node-a")
                && names == want
                && v["status"]["virtualRouterId"].as_u64() == Some(u64::from(vrid))
        });
    }
    std::thread::sleep(Duration::from_secs(1));
    let requests = c.status_requests_since(mark);
    eprintln!(
        "12 VirtualIPs in one instance settled {} after the apply; status writes by user: {requests:?}",
        ms(grown.elapsed())
    );
    for (node, most) in [("node-a", 12), ("node-b", 4), ("node-c", 4)] {
        let wrote = requests
            .get(&format!("ferrovip:{node}"))
            .copied()
            .unwrap_or(0);
        // node-a: the 9 new VirtualIPs, and a rewrite or two; a backup: its entries dropped
        // from shared-2 and shared-3, perhaps its entry on shared-1 again.
        findings.check(wrote <= most, || {
            format!("{node} wrote {wrote} statuses for 9 new VirtualIPs of a large instance (at most {most})")
        });
    }

    // --- 6. Deletion: every node releases the addresses within a second.
    let before = c.all_transitions();
    let deleted = Instant::now();
    // The first member names the instance: deleting it must not restart the others.
    c.kubectl(&["delete", "vip", "shared-1"]);
    let released = c.wait_holders(shared[0], &[], Duration::from_secs(1));
    eprintln!(
        "delete shared-1 → {} released {} after kubectl returned ({} after it started)",
        shared[0],
        ms(released),
        ms(deleted.elapsed())
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(c.holders(shared[1]), [0]);
    assert_eq!(c.holders(shared[2]), [0]);
    assert_eq!(
        c.all_transitions(),
        before,
        "removing the first member restarted the shared instance"
    );
    assert_eq!(c.masters_since(vrid, deleted), [c.ip(0)]);
    assert!(active_with(&c.vip("shared-2"), "node-a"));
    // The backups now list themselves on the first VirtualIP left (by name: shared-10).
    c.wait_vip(
        "shared-10",
        "all three entries",
        Duration::from_secs(10),
        |v| entry_names(v).len() == 3,
    );

    let deleted = Instant::now();
    c.kubectl(&["delete", "vip", "web"]);
    let released = c.wait_holders(web, &[], Duration::from_secs(1));
    eprintln!(
        "delete web → {web} released {} after kubectl returned ({} after it started)",
        ms(released),
        ms(deleted.elapsed())
    );
    // With web gone, VRID 51 is free for web-dup: the refused resource runs now (the
    // instance carries on with web-dup's address instead of web's).
    let (_, took) = c.wait_vip("web-dup", "Active on node-a", Duration::from_secs(5), |v| {
        active_with(v, "node-a") && condition(v, "Conflict").is_some_and(|c| c["status"] == "False")
    });
    c.wait_holders("192.0.2.101", &[0], Duration::from_secs(2));
    eprintln!(
        "web-dup took over VRID 51 {} after web was deleted",
        ms(took)
    );

    let deleted = Instant::now();
    c.kubectl(&["delete", "vip", "--all"]);
    for addr in ["192.0.2.101", shared[1], shared[2], "192.0.2.132"] {
        c.wait_holders(addr, &[], Duration::from_secs(1));
    }
    eprintln!(
        "delete --all → every address released {} after kubectl started",
        ms(deleted.elapsed())
    );
    // A master that stops serving leaves with priority 0, so backups need not time out.
    for vrid in [51, vrid] {
        let goodbye = c.sniffer.wait_for(
            |e| {
                e.at >= deleted
                    && e.advert()
                        .is_some_and(|a| a.vrid == vrid && a.source == c.ip(0) && a.priority == 0)
            },
            Duration::from_secs(1),
        );
        assert!(
            goodbye.is_some(),
            "node-a left VRID {vrid} without a priority-0 advert"
        );
    }
    std::thread::sleep(Duration::from_millis(400));
    let late = Instant::now() - Duration::from_millis(300);
    assert!(
        c.sniffer
            .events_since(late)
            .iter()
            .all(|e| e.advert().is_none()),
        "adverts after every VirtualIP was deleted"
    );
    for i in 0..c.node_count() {
        c.assert_running(i);
        // v1.20 serves no EndpointSlice v1: worth one warning, not one per retry.
        let unserved = c
            .log(i)
            .iter()
            .filter(|l| text(&l["message"]).contains("does not serve this resource"))
            .count();
        findings.check(unserved <= 1, || {
            format!(
                "{} logged the EndpointSlice v1 warning {unserved} times in {:?} (the 404 list \
                 is retried about once a second)",
                c.name(i),
                started.elapsed()
            )
        });
    }
    eprintln!(
        "status requests over the whole test ({:?}): {:?}",
        started.elapsed(),
        c.status_requests_since(0)
    );
    findings.finish();
}

/// A master's agent killed: failover on the wire, status follows. Then an API outage: failover
/// still happens, and after the API server returns the agents resync status without any
/// further VRRP transition.
#[test]
fn e2e_k8s_failover_and_api_outage() {
    let mut c = K8sLab::running(3);
    let web = "192.0.2.100";
    c.apply(&web_doc());
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_vip("web", "Active on node-a", Duration::from_secs(5), |v| {
        active_with(v, "node-a")
    });
    let mdi_b = master_down_interval(PRIO_B, INTERVAL);

    // --- 2. SIGKILL the master's agent: node-b takes over and status.master follows.
    let stopped_at = c.signal(0, Signal::SIGKILL);
    let query = FailoverQuery {
        vrid: 51,
        old_master: c.ip(0),
        stopped_at,
        vip: Some(ip(web)),
    };
    let failover = measure_failover(&c.sniffer, &query, Duration::from_secs(3)).expect("takeover");
    let gap = failover
        .last_advert_to_takeover
        .expect("node-a's last advert");
    c.wait_vip("web", "master node-b", Duration::from_secs(10), |v| {
        active_with(v, "node-b") && node_entry(v, "node-b").is_some_and(|e| e["state"] == "Master")
    });
    let status_followed = stopped_at.elapsed();
    eprintln!(
        "SIGKILL node-a: node-b advertised {} after the kill (last advert → takeover {}, \
         Master_Down_Interval {}), GARP {:?}; status.master = node-b {} after the kill",
        ms(failover.death_to_advert),
        ms(gap),
        ms(mdi_b),
        failover.death_to_garp.map(ms),
        ms(status_followed)
    );
    assert_eq!(failover.new_master, c.ip(1));
    assert!(
        gap + Duration::from_millis(5) >= mdi_b && gap <= mdi_b + LATE,
        "takeover after {gap:?}, Master_Down_Interval {mdi_b:?}"
    );
    assert!(c.has(1, web));

    // node-a's agent comes back and preempts (150 > 140).
    c.start_agent(0);
    c.wait_listed(0);
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_holders(web, &[0], Duration::from_secs(2));
    c.wait_vip(
        "web",
        "master node-a again",
        Duration::from_secs(10),
        led_by_node_a_of_three,
    );

    // --- 7. API outage: VRRP does not need the API server.
    let stop_took = c.api.stop().expect("stop kube-apiserver");
    eprintln!("kube-apiserver stopped (etcd kept) in {stop_took:?}");
    for i in 0..3 {
        c.assert_running(i);
    }
    c.wait_master(51, 0, Duration::from_secs(2));
    let stopped_at = c.signal(0, Signal::SIGKILL);
    let failover = measure_failover(
        &c.sniffer,
        &FailoverQuery {
            stopped_at,
            ..query
        },
        Duration::from_secs(3),
    )
    .expect("takeover during the outage");
    let gap = failover
        .last_advert_to_takeover
        .expect("node-a's last advert");
    eprintln!(
        "API down, SIGKILL node-a: node-b advertised {} after the kill (last advert → \
         takeover {}, Master_Down_Interval {})",
        ms(failover.death_to_advert),
        ms(gap),
        ms(mdi_b)
    );
    assert_eq!(failover.new_master, c.ip(1));
    assert!(
        gap + Duration::from_millis(5) >= mdi_b && gap <= mdi_b + LATE,
        "takeover after {gap:?}, Master_Down_Interval {mdi_b:?}"
    );
    c.wait_master(51, 1, Duration::from_secs(2));
    let settled = c.all_transitions();
    assert_eq!(
        settled[1].last().map(|t| t.to.as_str()),
        Some("MASTER"),
        "node-b's last transition"
    );
    assert!(
        c.vip("web").is_null(),
        "the API server still answers while stopped"
    );

    let restart_took = c.api.restart().expect("restart kube-apiserver");
    let restarted = Instant::now();
    let mark = c.audit_mark();
    let (_, took) = c.wait_vip("web", "master node-b", Duration::from_secs(30), |v| {
        active_with(v, "node-b") && node_entry(v, "node-b").is_some_and(|e| e["state"] == "Master")
    });
    eprintln!(
        "kube-apiserver ready again after {restart_took:?}; status.master = node-b {} later",
        ms(took)
    );
    // Leave the watchers time to re-list everything and the planner to run on it.
    std::thread::sleep(Duration::from_secs(2));
    // node-a's agent is dead; node-b's and node-c's must not have moved.
    for (i, log) in settled.iter().enumerate().skip(1) {
        c.assert_running(i);
        assert_eq!(
            &c.transitions(i),
            log,
            "{} changed VRRP state after the API server came back",
            c.name(i)
        );
    }
    assert_eq!(c.masters_since(51, restarted), [c.ip(1)]);
    assert!(c.has(1, web) && !c.has(2, web));
    eprintln!(
        "status requests in the {:?} after the restart: {:?}",
        restarted.elapsed(),
        c.status_requests_since(mark)
    );
}

/// Node conditions, health checks and node eligibility move (or never give) the addresses;
/// `unicastPeers: auto` elects without multicast.
#[test]
fn e2e_k8s_node_health_checks_eligibility_and_unicast_auto() {
    let mut c = K8sLab::running(3);
    let web = "192.0.2.100";
    c.apply(&web_doc());
    c.wait_master(51, 0, Duration::from_secs(5));

    // --- 4a. The master's Node turns NotReady: its priority drops by the notReady weight (50).
    let patched = Instant::now();
    c.set_node_ready(0, false);
    let takeover = c
        .sniffer
        .wait_for(
            |e| {
                e.at >= patched
                    && e.advert()
                        .is_some_and(|a| a.vrid == 51 && a.source == c.ip(1) && a.priority > 0)
            },
            Duration::from_secs(5),
        )
        .expect("node-b takes over");
    eprintln!(
        "node-a NotReady: node-b master {} after kubectl patch started",
        ms(takeover.at.duration_since(patched))
    );
    c.wait_master(51, 1, Duration::from_secs(2));
    c.wait_holders(web, &[1], Duration::from_secs(1));
    let (vip, _) = c.wait_vip("web", "node-b master", Duration::from_secs(5), |v| {
        active_with(v, "node-b")
            && node_entry(v, "node-a")
                .is_some_and(|e| e["state"] == "Backup" && e["priority"] == 100)
    });
    assert_eq!(
        reasons(&vip, "node-a"),
        ["base 100", "preferred node +50", "node not Ready -50"]
    );
    assert_eq!(
        node_entry(&vip, "node-b").expect("node-b")["priority"],
        PRIO_B
    );

    // Ready again: node-a preempts.
    c.set_node_ready(0, true);
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_holders(web, &[0], Duration::from_secs(1));
    c.wait_vip("web", "node-a master again", Duration::from_secs(5), |v| {
        active_with(v, "node-a") && node_entry(v, "node-a").is_some_and(|e| e["priority"] == PRIO_A)
    });

    // --- 4b. A TCP check that passes only where the service runs (node-a). node-b's small
    // preference orders the failing nodes: node-a 100 while healthy, node-b 60, node-c 50;
    // node-a 50 once its check fails.
    let http = c
        .lab
        .spawn(
            0,
            &[
                "python3",
                "-m",
                "http.server",
                "8080",
                "--bind",
                "127.0.0.1",
            ],
            "http-node-a.log",
        )
        .expect("start a listener on node-a");
    let listening = Instant::now();
    while !c
        .lab
        .exec(0, &["bash", "-c", "echo > /dev/tcp/127.0.0.1/8080"])
        .expect("probe")
        .status
        .success()
    {
        assert!(
            listening.elapsed() < Duration::from_secs(10),
            "no listener on node-a"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let checked = "192.0.2.102";
    let (interval, fall) = (Duration::from_millis(200), 2u32);
    let mut doc = vip_doc("checked", &["192.0.2.102/24"], Some(52));
    doc["spec"]["priority"] = json!({
        "base": 100,
        "preferredNodes": [{"nodeName": "node-b", "weight": 10}],
        "checks": [{
            "name": "port-8080",
            "tcp": {"port": 8080},
            "interval": "200ms",
            "timeout": "100ms",
            "fall": fall,
            "rise": 2,
            "weight": 50,
        }],
    });
    c.apply(&doc);
    c.wait_master(52, 0, Duration::from_secs(10));
    c.wait_holders(checked, &[0], Duration::from_secs(1));
    let (vip, _) = c.wait_vip("checked", "node-a master", Duration::from_secs(5), |v| {
        active_with(v, "node-a")
            && [("node-a", 100), ("node-b", 60), ("node-c", 50)]
                .iter()
                .all(|(n, p)| node_entry(v, n).is_some_and(|e| e["priority"] == *p))
    });
    assert_eq!(reasons(&vip, "node-a"), ["base 100"]);
    assert_eq!(
        reasons(&vip, "node-b"),
        [
            "base 100",
            "preferred node +10",
            "check port-8080 failing -50"
        ]
    );

    let stopped_at = Instant::now();
    c.lab
        .kill(http, Signal::SIGKILL)
        .expect("stop the listener");
    let failover = measure_failover(
        &c.sniffer,
        &FailoverQuery {
            vrid: 52,
            old_master: c.ip(0),
            stopped_at,
            vip: Some(ip(checked)),
        },
        Duration::from_secs(5),
    )
    .expect("node-b takes over");
    let mdi = master_down_interval(60, INTERVAL);
    let bound = interval * fall + mdi + LATE;
    eprintln!(
        "listener stopped: node-b master after {} (fall × interval + Master_Down_Interval = {})",
        ms(failover.death_to_advert),
        ms(interval * fall + mdi)
    );
    assert_eq!(failover.new_master, c.ip(1));
    assert!(
        failover.death_to_advert <= bound,
        "took {:?}, bound {bound:?}",
        failover.death_to_advert
    );
    c.wait_holders(checked, &[1], Duration::from_secs(1));
    let (vip, _) = c.wait_vip("checked", "node-b master", Duration::from_secs(5), |v| {
        active_with(v, "node-b") && node_entry(v, "node-a").is_some_and(|e| e["priority"] == 50)
    });
    assert_eq!(
        reasons(&vip, "node-a"),
        ["base 100", "check port-8080 failing -50"]
    );
    c.kubectl(&["delete", "vip", "web", "checked"]);
    c.wait_holders(web, &[], Duration::from_secs(2));
    c.wait_holders(checked, &[], Duration::from_secs(2));

    // --- 4c. A node outside the selector, and one with the exclusion label, never hold it,
    // even though node-a has the highest preference.
    let edge = "192.0.2.103";
    let mut doc = vip_doc("edge", &["192.0.2.103/24"], Some(53));
    doc["spec"]["nodeSelector"] = json!({"matchExpressions": [{
        "key": "kubernetes.io/hostname", "operator": "NotIn", "values": ["node-a"],
    }]});
    let since = Instant::now();
    c.apply(&doc);
    c.wait_master(53, 1, Duration::from_secs(5));
    c.wait_holders(edge, &[1], Duration::from_secs(1));
    c.wait_vip("edge", "node-b master", Duration::from_secs(5), |v| {
        active_with(v, "node-b") && entries_are(v, &[("node-b", "Master"), ("node-c", "Backup")])
    });
    let labelled = Instant::now();
    c.label_node(
        1,
        "node.kubernetes.io/exclude-from-external-load-balancers=true",
    );
    c.wait_holders(edge, &[2], Duration::from_secs(2));
    eprintln!(
        "exclusion label on node-b: {edge} on node-c only {} after kubectl label started",
        ms(labelled.elapsed())
    );
    c.wait_master(53, 2, Duration::from_secs(5));
    c.wait_vip("edge", "node-c master alone", Duration::from_secs(5), |v| {
        active_with(v, "node-c") && entries_are(v, &[("node-c", "Master")])
    });
    let advertisers: Vec<IpAddr> = c
        .sniffer
        .events_since(since)
        .iter()
        .filter_map(|e| e.advert().filter(|a| a.vrid == 53).map(|a| a.source))
        .collect();
    assert!(
        !advertisers.contains(&c.ip(0)),
        "node-a, outside the selector, advertised VRID 53"
    );
    assert!(!c.has(0, edge) && !c.has(1, edge));
    c.kubectl(&["delete", "vip", "edge"]);
    c.wait_holders(edge, &[], Duration::from_secs(2));
    c.label_node(
        1,
        "node.kubernetes.io/exclude-from-external-load-balancers-",
    );

    // --- 9. No multicast on the segment: `unicastPeers: auto` advertises to the InternalIPs
    // of the eligible Nodes. The counter shows whether an agent still tried multicast VRRP.
    let rules = c.write_file(
        "no-multicast.nft",
        "table inet fvtest {
  chain out {
    type filter hook output priority 0;
    ip protocol 112 ip daddr 224.0.0.0/4 counter drop
    ip daddr 224.0.0.0/4 drop
  }
  chain in {
    type filter hook input priority 0;
    ip daddr 224.0.0.0/4 drop
  }
}
",
    );
    for i in 0..3 {
        c.exec_ok(i, &["nft", "-f", &rules]);
    }
    let uni = "192.0.2.104";
    let mut doc = vip_doc("uni", &["192.0.2.104/24"], Some(54));
    doc["spec"]["vrrp"]["unicastPeers"] = json!("auto");
    let since = Instant::now();
    c.apply(&doc);
    c.wait_master(54, 0, Duration::from_secs(5));
    c.wait_holders(uni, &[0], Duration::from_secs(1));
    assert!(c.ping(uni), "{uni} does not answer");
    c.wait_vip(
        "uni",
        "node-a master",
        Duration::from_secs(5),
        led_by_node_a_of_three,
    );
    let adverts: Vec<(IpAddr, IpAddr)> = c
        .sniffer
        .events_since(since)
        .iter()
        .filter_map(|e| {
            e.advert()
                .filter(|a| a.vrid == 54)
                .map(|a| (a.source, a.destination))
        })
        .collect();
    let nodes: Vec<IpAddr> = (0..3).map(|i| c.ip(i)).collect();
    assert!(
        adverts
            .iter()
            .all(|(src, dst)| src != dst && nodes.contains(dst)),
        "adverts not unicast to other Nodes: {adverts:?}"
    );
    let mut from_a: Vec<IpAddr> = adverts
        .iter()
        .filter(|(src, _)| *src == c.ip(0))
        .map(|(_, dst)| *dst)
        .collect();
    from_a.sort();
    from_a.dedup();
    assert_eq!(
        from_a,
        [c.ip(1), c.ip(2)],
        "node-a advertises to both other Nodes"
    );
    for i in 0..3 {
        let counters = c.exec_ok(i, &["nft", "list", "chain", "inet", "fvtest", "out"]);
        assert!(
            counters.contains("counter packets 0 "),
            "{} sent multicast VRRP: {counters}",
            c.name(i)
        );
    }
    // --- 3 (issue 9). The allowlist fails closed: the Nodes have IPv4 InternalIPs only, so
    // `auto` has no IPv6 peer. A dual-stack VirtualIP runs its IPv4 instance only, and says
    // why in its Degraded condition and an Event; an IPv6-only one is refused outright.
    let closed = "192.0.2.105";
    let mut doc = vip_doc("closed", &["192.0.2.105/24", "2001:db8::105/64"], Some(55));
    doc["spec"]["vrrp"]["unicastPeers"] = json!("auto");
    let since = Instant::now();
    c.apply(&doc);
    c.wait_master(55, 0, Duration::from_secs(5));
    c.wait_holders(closed, &[0], Duration::from_secs(1));
    let why = "spec.vrrp.unicastPeers: auto found no eligible node with an ipv6 InternalIP \
               address; the ipv6 instance is not run (an empty allowlist would accept \
               advertisements from anyone): give the nodes ipv6 InternalIP addresses or list \
               the peers";
    let (vip, _) = c.wait_vip(
        "closed",
        "IPv4 active, IPv6 refused",
        Duration::from_secs(5),
        |v| {
            active_with(v, "node-a")
                && condition(v, "Degraded").is_some_and(|d| d["reason"] == "NoUnicastPeers")
        },
    );
    let degraded = condition(&vip, "Degraded").expect("Degraded");
    eprintln!("Degraded condition: {degraded}");
    assert_eq!(degraded["status"], "True");
    assert_eq!(text(&degraded["message"]), why);
    let warning = c.wait_event("closed", "NoUnicastPeers", Duration::from_secs(5));
    eprintln!("Event: {} {}", warning["type"], warning["note"]);
    assert_eq!(warning["type"], "Warning");
    assert_eq!(text(&warning["note"]), why);
    let v6_adverts = c
        .sniffer
        .events_since(since)
        .iter()
        .filter(|e| {
            e.advert()
                .is_some_and(|a| a.vrid == 55 && a.source.is_ipv6())
        })
        .count();
    assert_eq!(v6_adverts, 0, "an IPv6 instance advertised without peers");
    for i in 0..3 {
        assert!(
            !c.exec_ok(i, &["ip", "-6", "addr", "show", "dev", "eth0"])
                .contains("2001:db8::105"),
            "{} holds the refused IPv6 address",
            c.name(i)
        );
    }
    let mut doc = vip_doc("closed6", &["2001:db8::106/64"], Some(56));
    doc["spec"]["vrrp"]["unicastPeers"] = json!("auto");
    c.apply(&doc);
    let (vip, _) = c.wait_vip("closed6", "refused", Duration::from_secs(5), |v| {
        condition(v, "Ready").is_some_and(|r| r["status"] == "False")
    });
    let ready = condition(&vip, "Ready").expect("Ready");
    assert_eq!(ready["reason"], "NoUnicastPeers");
    assert!(text(&ready["message"]).starts_with("spec.vrrp.unicastPeers: auto found no"));
    assert!(
        vip["status"]["nodes"]
            .as_array()
            .is_none_or(|n| n.is_empty())
    );
    c.wait_event("closed6", "NoUnicastPeers", Duration::from_secs(5));
    // The refusals are the same on every node: no node overwrites another's status.
    std::thread::sleep(Duration::from_secs(2));
    let mark = c.audit_mark();
    std::thread::sleep(Duration::from_secs(3));
    let requests = c.status_requests_since(mark);
    eprintln!("status writes in 3 s with closed and closed6 refused: {requests:?}");
    assert!(requests.is_empty(), "status churn: {requests:?}");
    c.kubectl(&["delete", "vip", "closed", "closed6"]);
    c.wait_holders(closed, &[], Duration::from_secs(2));

    // A prefix wider than eth0's /24 is every node's own refusal: each entry says Fault and
    // why, naming the address and the field that would allow it.
    c.apply(&vip_doc("wide", &["192.0.2.107/16"], Some(57)));
    let (vip, _) = c.wait_vip(
        "wide",
        "refused on every node",
        Duration::from_secs(5),
        |v| {
            ["node-a", "node-b", "node-c"]
                .iter()
                .all(|n| node_entry(v, n).is_some_and(|e| e["state"] == "Fault"))
        },
    );
    for (i, node) in ["node-a", "node-b", "node-c"].iter().enumerate() {
        let fault = text(&node_entry(&vip, node).expect("entry")["fault"]);
        eprintln!("wide prefix: {node} fault: {fault}");
        assert_eq!(
            fault,
            format!(
                "spec.addresses: 192.0.2.107/16 has a shorter prefix than interface eth0's \
                 subnet {}/24 and would route the whole range through it; use /24 or longer, \
                 or set spec.allowWidePrefix: true",
                c.ip(i)
            )
        );
    }
    for i in 0..3 {
        assert!(
            !c.has(i, "192.0.2.107"),
            "{} holds the wide address",
            c.name(i)
        );
    }
    // Every node refusing it does not make the nodes overwrite each other's status.
    std::thread::sleep(Duration::from_secs(2));
    let mark = c.audit_mark();
    std::thread::sleep(Duration::from_secs(3));
    let requests = c.status_requests_since(mark);
    eprintln!("status writes in 3 s with every node refusing wide: {requests:?}");
    assert!(requests.is_empty(), "status churn: {requests:?}");
    c.kubectl(&["delete", "vip", "wide"]);

    let stopped_at = c.signal(0, Signal::SIGKILL);
    let failover = measure_failover(
        &c.sniffer,
        &FailoverQuery {
            vrid: 54,
            old_master: c.ip(0),
            stopped_at,
            vip: Some(ip(uni)),
        },
        Duration::from_secs(3),
    )
    .expect("takeover over unicast");
    eprintln!(
        "unicast auto, SIGKILL node-a: node-b advertised after {}",
        ms(failover.death_to_advert)
    );
    assert_eq!(failover.new_master, c.ip(1));
    let mdi_b = master_down_interval(PRIO_B, INTERVAL);
    assert!(failover.death_to_advert <= mdi_b + LATE);
    c.wait_master(54, 1, Duration::from_secs(2));
}

/// Virtual services in Kubernetes mode, on an API server of 1.20 (EndpointSlice v1beta1) and a
/// kernel without IPVS: the backends come from the Service's ready endpoints, every eligible
/// node says in its status entry what it would program and why it cannot, a bad scheduler is
/// refused by field, and VRRP is unaffected.
#[test]
fn e2e_k8s_virtual_services_from_endpoint_slices() {
    let mut c = K8sLab::running(2);
    c.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "frontend", "namespace": "default"},
        "spec": {"clusterIP": "None", "ports": [
            {"name": "http", "port": 80, "targetPort": 8080},
            {"name": "metrics", "port": 9090},
        ]},
    }));
    let endpoint = |addr: &str, ready: bool| {
        json!({"addresses": [addr], "conditions": {"ready": ready},
               "topology": {"kubernetes.io/hostname": "node-a"}})
    };
    let slice = |endpoints: Vec<Value>| {
        json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "frontend-1", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "frontend"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"},
                      {"name": "metrics", "port": 9090, "protocol": "TCP"}],
            "endpoints": endpoints,
        })
    };
    c.apply(&slice(vec![
        endpoint("10.1.0.1", true),
        endpoint("10.1.0.2", true),
        endpoint("10.1.0.3", false),
    ]));
    let mut web = web_doc();
    web["spec"]["services"] = json!([
        {"port": 80, "scheduler": "wlc",
         "backends": {"serviceRef": {"namespace": "default", "name": "frontend", "port": "http"}}},
        {"port": 9090, "protocol": "UDP",
         "backends": {"serviceRef": {"namespace": "default", "name": "missing"}}},
    ]);
    c.apply(&web);
    c.wait_master(51, 0, Duration::from_secs(5));

    let ipvs = std::path::Path::new("/proc/net/ip_vs").exists();
    let expect = |backends: usize| {
        if ipvs {
            format!("ipvs: 2 services, {backends} backends programmed")
        } else {
            format!(
                "ipvs: 2 services, {backends} backends not programmed: IPVS is not available in \
                 this kernel (module ip_vs not loaded?); spec.services[1].backends.serviceRef: \
                 Service default/missing not found (no backends)"
            )
        }
    };
    let each_node_says = |v: &Value, want: &str| {
        ["node-a", "node-b"]
            .iter()
            .all(|n| node_entry(v, n).is_some_and(|e| e["services"] == want))
    };
    let want = expect(2);
    let (_, took) = c.wait_vip(
        "web",
        "the services in status",
        Duration::from_secs(10),
        |v| active_with(v, "node-a") && each_node_says(v, &want),
    );
    eprintln!("services reported in status after {}", ms(took));

    // An endpoint turns ready, another one not: the backends follow.
    let changed = Instant::now();
    c.apply(&slice(vec![
        endpoint("10.1.0.1", false),
        endpoint("10.1.0.2", true),
        endpoint("10.1.0.3", true),
        endpoint("10.1.0.4", true),
    ]));
    let want = expect(3);
    c.wait_vip(
        "web",
        "the new endpoints in status",
        Duration::from_secs(10),
        |v| each_node_says(v, &want),
    );
    eprintln!(
        "endpoint change reflected in status after {}",
        ms(changed.elapsed())
    );

    // A scheduler IPVS does not have is refused, naming the resource's field.
    let mut bad = vip_doc("bad", &["192.0.2.110/24"], Some(52));
    bad["spec"]["services"] = json!([
        {"port": 80, "scheduler": "fastest", "backends": {"endpoints": [{"address": "10.1.0.1"}]}},
    ]);
    c.apply(&bad);
    let (vip, _) = c.wait_vip("bad", "Invalid", Duration::from_secs(10), |v| {
        v["status"]["state"] == "Invalid"
    });
    let message = condition(&vip, "Ready").expect("Ready condition")["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        message.starts_with("spec.services[0].scheduler: \"fastest\" is not an IPVS scheduler"),
        "{message}"
    );
    // And a forwarding method the schema does not know never gets in.
    let mut worse = vip_doc("worse", &["192.0.2.120/24"], Some(53));
    worse["spec"]["services"] = json!([
        {"port": 80, "forwarding": "teleport", "backends": {"endpoints": [{"address": "10.1.0.1"}]}},
    ]);
    let path = std::env::temp_dir().join(format!("ferrovip-worse-{}.json", std::process::id()));
    std::fs::write(&path, worse.to_string()).expect("write manifest");
    let out = c.kubectl_output(&["apply", "-f", &path.display().to_string()]);
    let _ = std::fs::remove_file(&path);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        // 1.20 names the field without the list index: spec.services.forwarding.
        !out.status.success()
            && stderr.contains("\"worse\"")
            && stderr.contains("spec.services")
            && stderr.contains("forwarding: Unsupported value: \"teleport\""),
        "{stderr}"
    );

    // None of it disturbed the election.
    for i in 0..2 {
        c.assert_running(i);
    }
    c.wait_master(51, 0, Duration::from_secs(1));
}

/// Restarts and an API outage (issue 9, items 1 and 6): an agent restarted with the API server
/// up hands the dataplane nothing before every watch has listed (its first plan has the
/// Service's backends); agents restarted while the API server is down rejoin the election from
/// the snapshot saved in their state directory, each in the state its priority gives; when the
/// API server returns, the resync moves nothing and status is written again. Then the master
/// removes the status entry of a node that left, and every agent says `Ready=False` when no
/// node may hold the addresses.
#[test]
fn e2e_k8s_restarts_during_an_api_outage_rejoin_from_the_saved_snapshot() {
    let mut c = K8sLab::running(3);
    c.apply(&json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "frontend", "namespace": "default"},
        "spec": {"clusterIP": "None", "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }));
    c.apply(&json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "frontend-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "frontend"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.1.0.1"], "conditions": {"ready": true}},
            {"addresses": ["10.1.0.2"], "conditions": {"ready": true}},
        ],
    }));
    let mut web = web_doc();
    web["spec"]["services"] = json!([{"port": 80,
        "backends": {"serviceRef": {"namespace": "default", "name": "frontend", "port": "http"}}}]);
    c.apply(&web);
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_vip(
        "web",
        "node-a master of three",
        Duration::from_secs(10),
        led_by_node_a_of_three,
    );
    let first_plan = "first complete plan: converging the kernel to it";
    let snapshot_file = |i: usize| c.state_dir(i).join("cluster-snapshot.json");
    for i in 0..3 {
        assert!(
            snapshot_file(i).is_file(),
            "{} saved no cluster snapshot",
            c.name(i)
        );
    }

    // --- 1. node-c restarts with the API server up: the dataplane's first plan comes after
    // every watch (Services and EndpointSlices too) has listed, with the Service's backends.
    c.signal(2, Signal::SIGTERM);
    c.wait_exit(2);
    c.start_agent(2);
    c.wait_listed(2);
    let first = c.wait_log(
        2,
        "the dataplane's first plan",
        Duration::from_secs(10),
        |l| l["message"] == first_plan,
    );
    assert_eq!(
        (first["services"].as_u64(), first["backends"].as_u64()),
        (Some(1), Some(2)),
        "node-c's first dataplane plan: {first}"
    );
    let log = c.log(2);
    let at = |message: &str| log.iter().position(|l| l["message"] == message);
    assert!(
        at("cluster state listed") < at(first_plan),
        "the dataplane got a plan before every watch listed"
    );
    assert_eq!(
        log.iter().filter(|l| l["message"] == first_plan).count(),
        1,
        "node-c's dataplane was handed more than one first plan"
    );

    // --- 1b. The master's agent restarts with `--restart-hold` (API server up): the new
    // agent adopts the held VIP, which never moves; nobody else changes state.
    c.signal(0, Signal::SIGTERM);
    c.wait_exit(0);
    c.start_agent_with(0, &["--restart-hold", "10s"]);
    c.wait_listed(0);
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_vip(
        "web",
        "node-a master of three",
        Duration::from_secs(10),
        led_by_node_a_of_three,
    );
    let before_hold = c.all_transitions();
    let hold_at = Instant::now();
    c.signal(0, Signal::SIGTERM);
    c.wait_exit(0);
    c.start_agent(0);
    c.wait_listed(0);
    let first = c.wait_log(
        0,
        "the dataplane's first plan",
        Duration::from_secs(10),
        |l| l["message"] == first_plan,
    );
    assert_eq!(
        (first["services"].as_u64(), first["backends"].as_u64()),
        (Some(1), Some(2)),
        "node-a's first dataplane plan after a held restart: {first}"
    );
    c.wait_log(0, "MASTER", Duration::from_secs(10), |l| {
        l["event"] == "transition" && l["to"] == "MASTER"
    });
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.holders("192.0.2.100"), [0]);
    for i in [1, 2] {
        assert_eq!(
            c.transitions(i),
            before_hold[i],
            "{} changed state during node-a's held restart",
            c.name(i)
        );
    }
    let masters = c.masters_since(51, hold_at);
    assert!(
        masters.iter().all(|m| *m == c.ip(0)),
        "another node advertised as master during node-a's held restart: {masters:?}"
    );
    eprintln!("node-a restarted with --restart-hold: the VIP stayed, first plan after every list");

    // --- 2. The API server stops; node-b's and then the master's agent restart. Both start
    // from their saved snapshot, within the grace period, and take the state their priority
    // gives them: node-b backup, node-a master again (it preempts node-b, which took over
    // when node-a's agent left).
    let stop_took = c.api.stop().expect("stop kube-apiserver");
    eprintln!("kube-apiserver stopped in {stop_took:?}");
    let saved_snapshot = |l: &Value| {
        l["message"]
            == "the API server cannot be listed: starting from the saved cluster snapshot until it can"
    };
    for i in [1, 0] {
        c.signal(i, Signal::SIGTERM);
        c.wait_exit(i);
        let started = Instant::now();
        c.start_agent(i);
        let line = c.wait_log(
            i,
            "the start from the snapshot",
            Duration::from_secs(10),
            saved_snapshot,
        );
        let want = if i == 0 { "MASTER" } else { "BACKUP" };
        c.wait_log(i, want, Duration::from_secs(10), |l| {
            l["event"] == "transition" && l["to"] == want
        });
        eprintln!(
            "{} restarted during the outage: from the snapshot ({} VirtualIPs, {} nodes), {want} \
             {} after its start",
            c.name(i),
            line["virtual_ips"],
            line["nodes"],
            ms(started.elapsed())
        );
        let first = c.wait_log(
            i,
            "the dataplane's first plan",
            Duration::from_secs(5),
            |l| l["message"] == first_plan,
        );
        assert_eq!(
            (first["services"].as_u64(), first["backends"].as_u64()),
            (Some(1), Some(2)),
            "{}: the saved snapshot carries the Service's backends: {first}",
            c.name(i)
        );
    }
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_holders("192.0.2.100", &[0], Duration::from_secs(2));
    for i in 0..3 {
        c.assert_running(i);
    }
    let settled = c.all_transitions();
    assert_eq!(settled[1].last().map(|t| t.to.as_str()), Some("BACKUP"));

    // --- 3. The API server returns: status is written again, and the resync (every
    // watch listing again, the planner switching from the snapshots to the stores) moves
    // nothing.
    c.api.restart().expect("restart kube-apiserver");
    let restarted = Instant::now();
    let (_, took) = c.wait_vip(
        "web",
        "node-a master of three again",
        Duration::from_secs(30),
        led_by_node_a_of_three,
    );
    eprintln!(
        "status written again {} after the API server returned",
        ms(took)
    );
    for i in [0, 1] {
        c.wait_log(
            i,
            "the switch to the stores",
            Duration::from_secs(30),
            |l| l["message"] == "cluster state listed",
        );
    }
    std::thread::sleep(Duration::from_secs(2));
    for (i, log) in settled.iter().enumerate() {
        c.assert_running(i);
        assert_eq!(
            &c.transitions(i),
            log,
            "{} changed VRRP state after the API server came back",
            c.name(i)
        );
    }
    assert_eq!(c.masters_since(51, restarted), [c.ip(0)]);

    // --- 4. node-c leaves the cluster (its agent dies, its Node is deleted): the master
    // removes its status entry; node-b's stays.
    c.signal(2, Signal::SIGKILL);
    c.wait_exit(2);
    c.kubectl(&["delete", "node", c.name(2)]);
    let (_, took) = c.wait_vip(
        "web",
        "node-c's entry removed",
        Duration::from_secs(15),
        |v| {
            active_with(v, "node-a")
                && entries_are(v, &[("node-a", "Master"), ("node-b", "Backup")])
        },
    );
    eprintln!(
        "node-c's status entry removed {} after its Node was deleted",
        ms(took)
    );

    // --- 5. No node may hold the addresses: the agents, none of them eligible, say so.
    let mut nowhere = c.vip("web");
    nowhere["spec"]["nodeSelector"] = json!({"matchLabels": {"ferrovip-test": "nowhere"}});
    for key in ["status", "metadata"] {
        nowhere.as_object_mut().unwrap().remove(key);
    }
    nowhere["metadata"] = json!({"name": "web"});
    c.apply(&nowhere);
    let (vip, took) = c.wait_vip(
        "web",
        "Ready=False NoEligibleNode",
        Duration::from_secs(15),
        |v| {
            condition(v, "Ready")
                .is_some_and(|r| r["status"] == "False" && r["reason"] == "NoEligibleNode")
                && v["status"]["state"] == "NoMaster"
                && entry_names(v).is_empty()
        },
    );
    eprintln!(
        "Ready=False ({}) {} after the selector matched no node",
        text(&condition(&vip, "Ready").unwrap()["message"]),
        ms(took)
    );
    c.wait_holders("192.0.2.100", &[], Duration::from_secs(5));
}

/// A node's leftovers of ferrovip: IPv4 addresses on eth0 besides the node's own, an
/// nftables table `inet ferrovip`, and the files of its state directory but node-setup's
/// record (an agent cannot put back sysctls through a read-only /proc/sys).
fn leftovers(c: &K8sLab, i: usize) -> Vec<String> {
    let mut found = Vec::new();
    let shown = c.exec_ok(i, &["ip", "-4", "-j", "addr", "show", "dev", "eth0"]);
    let links: Value = serde_json::from_str(&shown).expect("ip -j");
    for info in links[0]["addr_info"].as_array().into_iter().flatten() {
        if info["local"].as_str() != Some(&c.ip(i).to_string()) {
            found.push(format!("address {}", info["local"]));
        }
    }
    if c.lab
        .exec(i, &["nft", "list", "table", "inet", "ferrovip"])
        .expect("nft")
        .status
        .success()
    {
        found.push("nft table inet ferrovip".into());
    }
    if let Ok(entries) = std::fs::read_dir(c.state_dir(i)) {
        for entry in entries.flatten() {
            if entry.file_name() != "sysctls-node-setup" {
                found.push(format!("state file {}", entry.path().display()));
            }
        }
    }
    found
}

/// SIGTERM with `--daemonset`: the agent reads its DaemonSet. Present: a restart, the VIP is
/// held for the next agent. Being deleted (a finalizer keeps it), gone, or no longer readable
/// by an agent that could read it at start (`helm uninstall` deletes the RoleBinding and the
/// ServiceAccount right after the DaemonSet): ferrovip leaves the node, which releases at once
/// (priority 0) and keeps nothing: no address, no nft table, no state file. API server down:
/// a restart again (keep), with the reason logged. The agents run as the chart's container
/// (NET_ADMIN and NET_RAW only, read-only root and /proc/sys, after node-setup): what
/// node-setup set stays, with its record, for a `ferrovip cleanup` that can write.
#[test]
fn e2e_k8s_sigterm_holds_for_a_restart_and_removes_everything_on_uninstall() {
    const NS: &str = "ferrovip-system";
    // The names of config/rbac (generated by `ferrovip rbacgen`): Role `ferrovip-agent` may
    // get DaemonSet `ferrovip-agent` only.
    const DS: &str = "ferrovip-agent";
    let mut c = K8sLab::new(4);
    c.install();
    let setup = c.restrict();
    eprintln!("node-setup on node-a: {}", setup[0].trim());
    // The Role of config/rbac, bound to the agents' identities as the chart binds it to
    // the ServiceAccount: a missing rule fails the lookups below.
    c.apply(&json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "agents-daemonset", "namespace": NS},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "ferrovip-agent"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": ferrovip_e2e::AGENT_GROUP}],
    }));
    c.apply(&json!({
        "apiVersion": "apps/v1",
        "kind": "DaemonSet",
        "metadata": {"name": DS, "namespace": NS, "finalizers": ["ferrovip.io/test"]},
        "spec": {
            "selector": {"matchLabels": {"app": "ferrovip"}},
            "template": {
                "metadata": {"labels": {"app": "ferrovip"}},
                "spec": {"containers": [{"name": "agent", "image": "ferrovip/ferrovip:test"}]},
            },
        },
    }));
    let pod_args = ["--daemonset", DS, "--namespace", NS, "--restart-hold", "6s"];
    for i in 0..4 {
        c.start_agent_with(i, &pod_args);
    }
    for i in 0..4 {
        c.wait_listed(i);
    }
    let web = "192.0.2.100";
    c.apply(&web_doc());
    c.wait_master(51, 0, Duration::from_secs(5));
    c.wait_holders(web, &[0], Duration::from_secs(3));

    // --- 1. DaemonSet present: a restart. node-a holds the VIP through its exit, nobody
    // takes over, and the next agent adopts it.
    let before = c.all_transitions();
    let at = c.signal(0, Signal::SIGTERM);
    c.wait_exit(0);
    let decision = c
        .log(0)
        .into_iter()
        .find(|l| l["decision"].is_string())
        .expect("node-a logged its decision");
    assert_eq!(decision["decision"], "restart", "{decision}");
    assert!(c.has(0, web), "node-a released the VIP on a restart");
    assert!(
        std::fs::read_dir(c.state_dir(0))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("addresses-")),
        "node-a's address record is gone after a restart"
    );
    c.start_agent_with(0, &pod_args);
    c.wait_listed(0);
    c.wait_master(51, 0, Duration::from_secs(5));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.holders(web), [0]);
    assert!(
        c.masters_since(51, at).iter().all(|m| *m == c.ip(0)),
        "another node became master during node-a's restart"
    );
    for i in [1, 2, 3] {
        assert_eq!(c.transitions(i), before[i], "{} moved", c.name(i));
    }
    eprintln!("DaemonSet present: SIGTERM held the VIP, the next agent adopted it");

    // --- 2. DaemonSet being deleted (the finalizer keeps it with a deletionTimestamp): node-a
    // is uninstalled. An nft table as the NAT return path leaves it (this host has no IPVS, so
    // the agent never makes one here) must go too.
    c.kubectl(&["delete", "daemonset", "-n", NS, DS, "--wait=false"]);
    let deleting = c.kubectl(&[
        "get",
        "daemonset",
        "-n",
        NS,
        DS,
        "-o",
        "jsonpath={.metadata.deletionTimestamp}",
    ]);
    assert!(
        !deleting.is_empty(),
        "the DaemonSet has no deletionTimestamp"
    );
    c.exec_ok(0, &["nft", "add", "table", "inet", "ferrovip"]);
    let at = c.signal(0, Signal::SIGTERM);
    c.wait_exit(0);
    let took = at.elapsed();
    let log = c.log(0);
    let decision = log
        .iter()
        .find(|l| l["decision"].is_string())
        .expect("node-a logged its decision");
    assert_eq!(decision["decision"], "uninstall", "{decision}");
    assert!(
        decision["why"]
            .as_str()
            .unwrap_or("")
            .contains("being deleted"),
        "{decision}"
    );
    let left = leftovers(&c, 0);
    assert!(left.is_empty(), "node-a after its uninstall: {left:?}");
    assert!(
        log.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.contains("record kept"))
            && text(&l["path"]).ends_with("sysctls-node-setup")),
        "node-a did not say that node-setup's sysctls stay"
    );
    let node_setup = c.state_dir(0).join("sysctls-node-setup");
    let cleanup = c.exec_ok(
        0,
        &[
            k8s_util::AGENT,
            "cleanup",
            "--state-dir",
            &c.state_dir(0).display().to_string(),
        ],
    );
    assert!(
        cleanup.contains("promote_secondaries restored to 0") && !node_setup.exists(),
        "ferrovip cleanup after the uninstall: {cleanup}"
    );
    // Released with priority 0: node-b takes over at once, not after a hold.
    c.wait_master(51, 1, Duration::from_secs(2));
    c.wait_holders(web, &[1], Duration::from_secs(2));
    // Events about the Node: in `default`, or `kube-system` where v1.20 takes them.
    let events = c.kubectl(&["get", "events.events.k8s.io", "-A", "-o", "json"]);
    let events: Value = serde_json::from_str(&events).expect("events");
    let reasons: Vec<(String, String)> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["regarding"]["kind"] == "Node")
        .map(|e| (text(&e["regarding"]["name"]), text(&e["reason"])))
        .collect();
    assert!(
        reasons.contains(&("node-a".into(), "AgentUninstalling".into()))
            && reasons.contains(&("node-a".into(), "AgentRestarting".into())),
        "Events: {reasons:?}"
    );
    eprintln!("DaemonSet being deleted: node-a uninstalled in {took:?}, nothing left");

    // --- 3. DaemonSet gone: node-b (the master now) is uninstalled too.
    c.kubectl(&[
        "patch",
        "daemonset",
        "-n",
        NS,
        DS,
        "--type=merge",
        "-p",
        r#"{"metadata":{"finalizers":null}}"#,
    ]);
    let started = Instant::now();
    while c
        .kubectl_output(&["get", "daemonset", "-n", NS, DS])
        .status
        .success()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the DaemonSet stays"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.signal(1, Signal::SIGTERM);
    c.wait_exit(1);
    let decision = c
        .log(1)
        .into_iter()
        .find(|l| l["decision"].is_string())
        .expect("node-b logged its decision");
    assert_eq!(decision["decision"], "uninstall", "{decision}");
    assert!(
        decision["why"].as_str().unwrap_or("").contains("not found"),
        "{decision}"
    );
    let left = leftovers(&c, 1);
    assert!(left.is_empty(), "node-b after its uninstall: {left:?}");
    // node-d (base 100) and node-c (60): node-d.
    c.wait_holders(web, &[3], Duration::from_secs(2));

    // --- 4. The agents' RoleBinding removed (as `helm uninstall` removes it right after the
    // DaemonSet): node-d, which could read the DaemonSet at start, may not any more.
    c.kubectl(&["delete", "rolebinding", "-n", NS, "agents-daemonset"]);
    c.signal(3, Signal::SIGTERM);
    c.wait_exit(3);
    let decision = c
        .log(3)
        .into_iter()
        .find(|l| l["decision"].is_string())
        .expect("node-d logged its decision");
    assert_eq!(decision["decision"], "uninstall", "{decision}");
    assert!(
        decision["why"]
            .as_str()
            .unwrap_or("")
            .contains("may no longer be read"),
        "{decision}"
    );
    let left = leftovers(&c, 3);
    assert!(left.is_empty(), "node-d after its uninstall: {left:?}");
    c.wait_holders(web, &[2], Duration::from_secs(2));

    // --- 5. API server down: node-c cannot tell, so it keeps (a restart) and says why.
    c.api.stop().expect("stop kube-apiserver");
    c.signal(2, Signal::SIGTERM);
    c.wait_exit(2);
    let decision = c
        .log(2)
        .into_iter()
        .find(|l| l["decision"].is_string())
        .expect("node-c logged its decision");
    assert_eq!(decision["decision"], "restart", "{decision}");
    assert!(
        decision["why"]
            .as_str()
            .unwrap_or("")
            .contains("could not be read"),
        "{decision}"
    );
    assert!(
        c.has(2, web),
        "node-c released the VIP although it could not tell"
    );
    eprintln!(
        "API server down: SIGTERM kept the VIP ({})",
        decision["why"]
    );
}
