//! The Service controller against a real kube-apiserver v1.20 with etcd
//! (`ferrovip_e2e::ApiServer`, on loopback: the controller needs no network namespace): the
//! real `ferrovip controller` binary, several instances contending for the Lease, each with a
//! least-privilege identity (config/rbac: the agent's ClusterRole and the Lease Role, bound to
//! the harness's agent group). Observed through the API (Lease, Services, Events, pools).
//!
//! v1.20 drops `spec.loadBalancerClass` and `ipMode`: the class and ipMode paths are
//! unit-tested (`crd::service_lb`, `ipam`, `controller::write`), not here.
//!
//! Needs root only for the API server harness's conventions; one API server per test.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrovip_e2e::{AGENT_GROUP, ApiServer, ApiServerOptions};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

const BINARY: &str = env!("CARGO_BIN_EXE_ferrovip");
const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
const AGENT_ROLE: &str = "ferrovip-agent";
const LEASE_ROLE: &str = "ferrovip-controller-lease";
const NAMESPACE: &str = "ferrovip-system";
const LEASE: &str = "ferrovip-controller";
const LEASE_DURATION: Duration = Duration::from_secs(2);
const LEASE_RENEW: Duration = Duration::from_millis(500);
const POLL: Duration = Duration::from_millis(20);
const RECORD: &str = "ferrovip.io/allocated";

struct Env {
    // Field order is drop order: the controllers stop before the server.
    controllers: BTreeMap<String, Child>,
    api: ApiServer,
    admin: Client,
    rt: tokio::runtime::Runtime,
    logs: PathBuf,
    manifests: usize,
}

impl Drop for Env {
    fn drop(&mut self) {
        for child in self.controllers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for id in ["ctl-a", "ctl-b", "ctl-c"] {
                let path = self.logs.join(format!("{id}.log"));
                if let Ok(text) = std::fs::read_to_string(&path) {
                    let lines: Vec<&str> = text.lines().collect();
                    let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                    eprintln!("---- controller {id}:\n{tail}");
                }
            }
        }
    }
}

impl Env {
    fn start() -> Env {
        let started = Instant::now();
        let api = ApiServer::start(ApiServerOptions {
            port: 0,
            node_users: vec!["ctl-a".into(), "ctl-b".into(), "ctl-c".into()],
            build_script: Some(BUILD_SCRIPT.into()),
            ..ApiServerOptions::default()
        })
        .expect("start etcd and kube-apiserver");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let admin = rt.block_on(client_from(api.admin_kubeconfig()));
        let logs = api.dir().join("controllers");
        std::fs::create_dir_all(&logs).unwrap();
        let mut env = Env {
            controllers: BTreeMap::new(),
            api,
            admin,
            rt,
            logs,
            manifests: 0,
        };
        env.kubectl(&["apply", "-f", CRDS]);
        env.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/loadbalancerpools.ferrovip.io",
            "crd/virtualips.ferrovip.io",
        ]);
        env.kubectl(&["apply", "-f", RBAC]);
        env.api.bind_agent_group(AGENT_ROLE).unwrap();
        env.apply(&json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "agents-lease", "namespace": NAMESPACE},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LEASE_ROLE},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": AGENT_GROUP}],
        }));
        eprintln!(
            "API server {} ready after {:?}",
            env.api.url(),
            started.elapsed()
        );
        env
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.api
            .kubectl_ok(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    fn apply(&mut self, doc: &Value) {
        self.manifests += 1;
        let path = self
            .api
            .dir()
            .join(format!("manifest-{}.json", self.manifests));
        std::fs::write(&path, doc.to_string()).unwrap();
        self.kubectl(&["apply", "-f", &path.display().to_string()]);
    }

    fn start_controller(&mut self, id: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{id}.log")))
            .unwrap();
        let child = Command::new(BINARY)
            .args([
                "controller",
                "--identity",
                id,
                "--lease-duration",
                "2s",
                "--lease-renew",
                "500ms",
            ])
            .env("KUBECONFIG", self.api.node_kubeconfig(id))
            .env("FERROVIP_LOG", "info,ferrovip=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("start ferrovip controller");
        self.controllers.insert(id.to_string(), child);
    }

    /// SIGKILL (a crash: the Lease is not released).
    fn kill_controller(&mut self, id: &str) {
        let mut child = self.controllers.remove(id).expect("running controller");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// SIGTERM (graceful: the Lease is released); waits for the exit.
    fn stop_controller(&mut self, id: &str) -> Duration {
        let mut child = self.controllers.remove(id).expect("running controller");
        let started = Instant::now();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "controller {id} exited with {status}");
        started.elapsed()
    }

    fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.logs.join(format!("{id}.log"))).unwrap_or_default()
    }

    fn lease(&self) -> Option<Lease> {
        let api: Api<Lease> = Api::namespaced(self.admin.clone(), NAMESPACE);
        self.rt.block_on(api.get_opt(LEASE)).unwrap()
    }

    fn holder(&self) -> Option<String> {
        self.lease()
            .and_then(|l| l.spec?.holder_identity)
            .filter(|h| !h.is_empty())
    }

    fn wait_holder(&self, want: Option<&str>, timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let holder = self.holder();
            if holder.as_deref() == want {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "Lease holder is {holder:?}, not {want:?} after {timeout:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Overwrites the Lease's holder (not a compare-and-swap: a hostile or buggy writer).
    fn steal_lease(&self, holder: &str) {
        let api: Api<Lease> = Api::namespaced(self.admin.clone(), NAMESPACE);
        let now = MicroTime(k8s_openapi::jiff::Timestamp::now());
        let patch = json!({"spec": {"holderIdentity": holder, "renewTime": now, "leaseDurationSeconds": 2}});
        self.rt
            .block_on(api.patch(LEASE, &PatchParams::default(), &Patch::Merge(&patch)))
            .unwrap();
    }

    fn pool(&mut self, name: &str, addresses: &[&str]) {
        self.apply(&json!({
            "apiVersion": "ferrovip.io/v1alpha1",
            "kind": "LoadBalancerPool",
            "metadata": {"name": name},
            "spec": {"addresses": addresses, "template": {"interface": "eth0"}},
        }));
    }

    fn create_service(&self, name: &str) {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        let svc: Service = serde_json::from_value(service_doc(name)).unwrap();
        self.rt
            .block_on(api.create(&PostParams::default(), &svc))
            .unwrap();
    }

    fn delete_service(&self, name: &str) {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        self.rt
            .block_on(api.delete(name, &DeleteParams::default()))
            .unwrap();
    }

    /// Every Service in `default`: name → (record, ingress addresses).
    fn services(&self) -> BTreeMap<String, Allocation> {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        let list = self.rt.block_on(api.list(&ListParams::default())).unwrap();
        list.items
            .into_iter()
            .filter(|s| s.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("LoadBalancer"))
            .map(|s| (s.metadata.name.clone().unwrap(), Allocation::of(&s)))
            .collect()
    }

    fn wait_services(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, Allocation>) -> bool,
    ) -> BTreeMap<String, Allocation> {
        let started = Instant::now();
        loop {
            let services = self.services();
            if done(&services) {
                return services;
            }
            assert!(
                started.elapsed() < timeout,
                "not {what} after {timeout:?}: {services:#?}"
            );
            std::thread::sleep(POLL);
        }
    }

    /// Events about Service `name` in `default`: (reason, note).
    fn events(&self, name: &str) -> Vec<(String, String)> {
        let api: Api<K8sEvent> = Api::namespaced(self.admin.clone(), "default");
        let list = self.rt.block_on(api.list(&ListParams::default())).unwrap();
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .map(|e| (e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
            .collect()
    }

    /// (status, reason, message) of ferrovip's condition on a Service, waited for until it
    /// has `status`.
    fn wait_condition(&self, name: &str, status: &str, timeout: Duration) -> (String, String) {
        let api: Api<Service> = Api::namespaced(self.admin.clone(), "default");
        let started = Instant::now();
        loop {
            let svc = self.rt.block_on(api.get(name)).unwrap();
            let found = svc
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .into_iter()
                .find(|c| c.type_ == "ferrovip.io/AddressAllocated");
            if let Some(c) = &found
                && c.status == status
            {
                return (c.reason.clone(), c.message.clone());
            }
            assert!(
                started.elapsed() < timeout,
                "Service {name}: no ferrovip.io/AddressAllocated={status} after {timeout:?}: {found:?}"
            );
            std::thread::sleep(POLL);
        }
    }

    fn wait_event(&self, name: &str, reason: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some((_, note)) = self.events(name).into_iter().find(|(r, _)| r == reason) {
                return note;
            }
            assert!(
                started.elapsed() < timeout,
                "no {reason} Event about {name} after {timeout:?}: {:?}",
                self.events(name)
            );
            std::thread::sleep(POLL);
        }
    }
}

fn service_doc(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "type": "LoadBalancer",
            "selector": {"app": name},
            "ports": [{"port": 80, "protocol": "TCP"}],
        },
    })
}

async fn client_from(kubeconfig: &std::path::Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to client config");
    Client::try_from(config).expect("kube client")
}

/// A Service's allocation as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Allocation {
    record: Option<String>,
    ingress: Vec<String>,
}

impl Allocation {
    fn of(svc: &Service) -> Allocation {
        Allocation {
            record: svc
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RECORD).cloned()),
            ingress: svc
                .status
                .as_ref()
                .and_then(|s| s.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .into_iter()
                .flatten()
                .filter_map(|i| i.ip.clone())
                .collect(),
        }
    }

    /// Allocated and shown: one address, recorded from `pool`, and the same in the status.
    fn is(&self, address: &str, pool: &str) -> bool {
        self.record.as_deref() == Some(&format!("{address}@{pool}")) && self.ingress == [address]
    }

    /// Recorded and shown alike (whatever the address).
    fn settled(&self) -> bool {
        let Some(record) = &self.record else {
            return false;
        };
        let addresses: Vec<&str> = record
            .split(',')
            .filter_map(|e| e.split('@').next())
            .collect();
        !addresses.is_empty() && addresses == self.ingress
    }

    fn pending(&self) -> bool {
        self.record.is_none() && self.ingress.is_empty()
    }
}

/// Addresses held by more than one Service, in records or in status.
fn duplicates(services: &BTreeMap<String, Allocation>) -> Vec<String> {
    let mut seen: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, a) in services {
        let recorded = a
            .record
            .iter()
            .flat_map(|r| r.split(','))
            .filter_map(|e| e.split('@').next().map(str::to_string));
        for address in recorded.chain(a.ingress.iter().cloned()) {
            seen.entry(address).or_default().insert(name.clone());
        }
    }
    seen.into_iter()
        .filter(|(_, holders)| holders.len() > 1)
        .map(|(address, holders)| format!("{address}: {holders:?}"))
        .collect()
}

// ---------------------------------------------------------------------------------------------

/// The Lease: the first instance leads; a crashed leader is replaced after about the lease
/// duration, a gracefully stopped one at once; a stolen Lease ends the old leader's term.
#[test]
fn lease_election_takeover_release_and_theft() {
    let mut env = Env::start();
    env.start_controller("ctl-a");
    env.wait_holder(Some("ctl-a"), Duration::from_secs(10));
    env.start_controller("ctl-b");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        env.holder().as_deref(),
        Some("ctl-a"),
        "a contender took a live Lease"
    );

    // Crash: ctl-b takes over once the last renewal is a lease duration old.
    let renewed = env.lease().unwrap().spec.unwrap().renew_time.unwrap().0;
    env.kill_controller("ctl-a");
    let killed = k8s_openapi::jiff::Timestamp::now();
    let took = env.wait_holder(Some("ctl-b"), Duration::from_secs(6));
    let since_renewal = killed.duration_since(renewed).unsigned_abs() + took;
    eprintln!(
        "crash takeover: {took:?} after the kill, {since_renewal:?} after the last renewal (lease {LEASE_DURATION:?}, renew {LEASE_RENEW:?})"
    );
    assert!(
        since_renewal >= LEASE_DURATION - Duration::from_millis(50),
        "taken over {since_renewal:?} after the last renewal: before the lease expired"
    );
    assert!(
        took <= LEASE_DURATION + LEASE_RENEW + Duration::from_millis(700),
        "takeover took {took:?}"
    );
    let transitions = env.lease().unwrap().spec.unwrap().lease_transitions;
    assert_eq!(transitions, Some(1));

    // Graceful stop: released (holder cleared), ctl-a takes over within one look.
    env.start_controller("ctl-a");
    std::thread::sleep(Duration::from_millis(700));
    let stop_took = env.stop_controller("ctl-b");
    assert!(
        env.log("ctl-b").contains("Lease released"),
        "ctl-b did not release the Lease"
    );
    let took = env.wait_holder(Some("ctl-a"), Duration::from_secs(3));
    eprintln!("graceful handover: stop took {stop_took:?}, ctl-a leads {took:?} after it");
    assert!(
        took < LEASE_DURATION,
        "a released Lease waited for expiry ({took:?})"
    );

    // Theft: the holder is overwritten; the old leader notices at its next renewal.
    let stolen = Instant::now();
    env.steal_lease("thief");
    let started = Instant::now();
    while !env.log("ctl-a").contains("the Lease was taken over")
        && !env.log("ctl-a").contains("renewing the Lease failed")
    {
        assert!(
            started.elapsed() < LEASE_RENEW * 3,
            "ctl-a did not notice that its Lease was stolen"
        );
        std::thread::sleep(POLL);
    }
    eprintln!("stolen Lease noticed after {:?}", stolen.elapsed());
    // Nobody renews for the thief: ctl-a takes it back after expiry.
    env.wait_holder(Some("ctl-a"), Duration::from_secs(5));
}

/// Allocation: addresses and Events; a full pool survives a leader restart unchanged;
/// deleting one Service changes no other; shrinking a pool renumbers nothing still valid; a
/// stolen Lease stops the old leader's writes; two leaders fighting while Services are
/// created produce no duplicate.
#[test]
fn allocation_survives_restarts_edits_deletions_and_fights() {
    let mut env = Env::start();
    // The samples are accepted by this server (v1.20 knows no loadBalancerClass: the Service
    // sample is checked without client-side validation, and the server drops the field).
    let samples = concat!(env!("CARGO_MANIFEST_DIR"), "/config/samples");
    env.kubectl(&[
        "apply",
        "--dry-run=server",
        "-f",
        &format!("{samples}/lbpool.yaml"),
    ]);
    env.kubectl(&[
        "apply",
        "--dry-run=server",
        "--validate=false",
        "-f",
        &format!("{samples}/service-lb.yaml"),
    ]);
    // The schema refuses what it can at `kubectl apply`, naming the field.
    let bad = env.api.dir().join("bad-pool.json");
    std::fs::write(
        &bad,
        json!({
            "apiVersion": "ferrovip.io/v1alpha1",
            "kind": "LoadBalancerPool",
            "metadata": {"name": "bad"},
            "spec": {"addresses": ["192.0.2.0/28", "ten dot one"], "template": {"interface": "eth0"}},
        })
        .to_string(),
    )
    .unwrap();
    let refused = env
        .api
        .kubectl_ok(&["apply", "-f", &bad.display().to_string()])
        .expect_err("a pool with a garbage address entry was accepted");
    assert!(
        refused.to_string().contains("spec.addresses"),
        "the refusal names the field: {refused}"
    );
    env.pool("small", &["198.51.100.10-198.51.100.12"]);
    env.start_controller("ctl-a");
    env.wait_holder(Some("ctl-a"), Duration::from_secs(10));
    env.start_controller("ctl-b");

    // --- A Service gets the lowest free address, its record, status and an Event.
    let created = Instant::now();
    env.create_service("svc-1");
    let services = env.wait_services("svc-1 allocated", Duration::from_secs(10), |s| {
        s["svc-1"].settled()
    });
    eprintln!("svc-1 allocated {:?} after create", created.elapsed());
    assert!(
        services["svc-1"].is("198.51.100.10", "small"),
        "{services:?}"
    );
    let note = env.wait_event("svc-1", "AddressAllocated", Duration::from_secs(5));
    assert!(
        note.contains("198.51.100.10") && note.contains("small"),
        "{note}"
    );
    let (reason, message) = env.wait_condition("svc-1", "True", Duration::from_secs(5));
    assert_eq!(reason, "Allocated");
    assert!(
        message.contains("198.51.100.10 from pool small"),
        "{message}"
    );

    // --- Fill the pool; one more Service stays pending with a reason.
    for name in ["svc-2", "svc-3", "svc-4"] {
        env.create_service(name);
    }
    let full = env.wait_services("the pool full", Duration::from_secs(10), |s| {
        ["svc-1", "svc-2", "svc-3"]
            .iter()
            .all(|n| s.get(*n).is_some_and(Allocation::settled))
    });
    assert!(full["svc-2"].is("198.51.100.11", "small"), "{full:?}");
    assert!(full["svc-3"].is("198.51.100.12", "small"), "{full:?}");
    let note = env.wait_event("svc-4", "AllocationFailed", Duration::from_secs(5));
    assert!(note.contains("small"), "the failure names the pool: {note}");
    // The same reason on the Service itself, so `<pending>` is never unexplained.
    let (reason, message) = env.wait_condition("svc-4", "False", Duration::from_secs(5));
    assert_eq!(reason, "PoolExhausted");
    assert!(message.contains("small"), "{message}");
    assert!(env.services()["svc-4"].pending());

    // --- Restart of the leader with a full pool: the new leader swaps nothing.
    env.kill_controller("ctl-a");
    env.wait_holder(Some("ctl-b"), Duration::from_secs(6));
    env.start_controller("ctl-a");
    // Give the new leader its fence and a pass, then check nothing moved.
    std::thread::sleep(LEASE_RENEW * 4);
    assert_eq!(env.services(), full, "the new leader changed allocations");

    // --- Deleting one Service changes no other; the pending one gets the freed address.
    env.delete_service("svc-2");
    let after = env.wait_services("svc-4 allocated", Duration::from_secs(10), |s| {
        s["svc-4"].settled()
    });
    assert!(after["svc-4"].is("198.51.100.11", "small"), "{after:?}");
    env.wait_condition("svc-4", "True", Duration::from_secs(5));
    for name in ["svc-1", "svc-3"] {
        assert_eq!(after[name], full[name], "{name} changed");
    }

    // --- Shrinking and editing the pool: only the Service whose address left is renumbered.
    env.pool(
        "small",
        &["198.51.100.10-198.51.100.11", "198.51.100.20-198.51.100.21"],
    );
    let shrunk = env.wait_services("svc-3 renumbered", Duration::from_secs(10), |s| {
        s["svc-3"].settled() && !s["svc-3"].ingress.contains(&"198.51.100.12".to_string())
    });
    assert!(shrunk["svc-3"].is("198.51.100.20", "small"), "{shrunk:?}");
    assert_eq!(shrunk["svc-1"], after["svc-1"]);
    assert_eq!(shrunk["svc-4"], after["svc-4"]);
    env.wait_event("svc-3", "AddressReleased", Duration::from_secs(5));
    // The pool's status counts what it holds (written by the leader, at most once a second
    // for counts alone).
    let started = Instant::now();
    loop {
        let pool: Value =
            serde_json::from_str(&env.kubectl(&["get", "lbpool", "small", "-o", "json"])).unwrap();
        let status = &pool["status"];
        let ready = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready
            && status["inUse"] == 3
            && status["ipv4"]["total"] == 4
            && status["ipv4"]["available"] == 1
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "pool status: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // --- A stolen Lease stops the old leader's writes: with a thief holding it, nobody
    // allocates.
    env.pool("big", &["198.51.100.128/25"]);
    let leader = env.holder().unwrap();
    env.steal_lease("thief");
    std::thread::sleep(LEASE_RENEW * 2);
    env.create_service("svc-stolen");
    let watch_until = Instant::now() + LEASE_RENEW * 3;
    while Instant::now() < watch_until {
        // Keep the thief's Lease fresh.
        env.steal_lease("thief");
        assert!(
            env.services()["svc-stolen"].pending(),
            "{leader} wrote after its Lease was stolen"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    env.wait_services(
        "svc-stolen allocated after the thief left",
        Duration::from_secs(10),
        |s| s["svc-stolen"].settled(),
    );

    // --- Two leaders fighting: the Lease handed to the other instance by force while
    // Services are being created. No address is given twice.
    let mut names = Vec::new();
    for i in 0..40 {
        let name = format!("fight-{i:02}");
        env.create_service(&name);
        names.push(name);
        if i == 10 || i == 25 {
            let other = if env.holder().as_deref() == Some("ctl-a") {
                "ctl-b"
            } else {
                "ctl-a"
            };
            env.steal_lease(other);
        }
    }
    let fought = env.wait_services(
        "every fight Service allocated",
        Duration::from_secs(20),
        |s| {
            names
                .iter()
                .all(|n| s.get(n).is_some_and(Allocation::settled))
        },
    );
    let lease = env.lease().unwrap().spec.unwrap();
    eprintln!(
        "after the fight: Lease held by {:?}, {:?} transitions",
        lease.holder_identity, lease.lease_transitions
    );
    let dups = duplicates(&fought);
    assert!(dups.is_empty(), "duplicate addresses: {dups:?}");
    // And it stays so once everything settles.
    std::thread::sleep(LEASE_RENEW * 4);
    let settled = env.services();
    assert!(duplicates(&settled).is_empty(), "{settled:#?}");
    for (name, a) in &fought {
        assert_eq!(
            settled.get(name),
            Some(a),
            "{name} renumbered after the fight"
        );
    }
}
