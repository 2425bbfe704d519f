//! The real API server harness (`ferrovip_e2e::ApiServer`): kube-apiserver v1.20.2 with etcd,
//! running in a lab's switch namespace at the bridge address, reached from node namespaces with
//! per-node token identities limited by the agent's RBAC (config/rbac).
//!
//! Needs root (network namespaces) and the kube-apiserver binary, which
//! e2e/apiserver/build.sh builds once (minutes) when it is missing. One test at a time
//! (`--test-threads=1`, as e2e/test.sh runs them): each starts its own server, and the default
//! port of every server is 6443 on its own bridge.

use std::future::Future;
use std::path::Path;
use std::process::Output;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferrovip::lab::{Lab, LabSpec};
use ferrovip_e2e::{ApiServer, ApiServerOptions, in_netns};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use serde_json::{Value, json};

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_virtualips.yaml"
);
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
/// The ClusterRole in config/rbac.
const AGENT_ROLE: &str = "ferrovip-agent";
/// The lab's default subnet is 192.0.2.0/24 with nodes from .11; the server takes .1.
const BRIDGE: &str = "192.0.2.1/24";
const VIP_NAME: &str = "api";
const VIP_MANIFEST: &str = "apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: api
spec:
  addresses: [\"192.0.2.100/24\"]
  interface: eth0
  virtualRouterId: 51
";

// ---------------------------------------------------------------------------------------------
// Helpers

struct Cluster {
    // Field order is drop order: the server stops before its namespace goes.
    api: ApiServer,
    lab: Lab,
    started_in: Duration,
}

/// A lab whose bridge holds 192.0.2.1, and the API server in its switch namespace there.
fn cluster(nodes: usize) -> Cluster {
    let lab = Lab::create(LabSpec {
        nodes,
        ipv6: false,
        bridge_ipv4: Some(BRIDGE.parse().unwrap()),
        ..LabSpec::default()
    })
    .expect("build the lab (needs root)");
    let started = Instant::now();
    let api = ApiServer::start(ApiServerOptions {
        netns: Some(lab.switch_netns().to_owned()),
        bind: lab.bridge_ipv4().expect("bridge address").into(),
        dir: lab.dir().join("apiserver"),
        node_users: lab.nodes().iter().map(|n| n.name.clone()).collect(),
        build_script: Some(BUILD_SCRIPT.into()),
        ..ApiServerOptions::default()
    })
    .expect("start etcd and kube-apiserver");
    let started_in = started.elapsed();
    eprintln!(
        "API server at {} ready {:?} after spawn, {started_in:?} after start() (certificates, etcd)",
        api.url(),
        api.startup_time()
    );
    Cluster {
        api,
        lab,
        started_in,
    }
}

fn stdout(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_forbidden(out: Output, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && (stderr.contains("Forbidden") || stderr.contains("forbidden")),
        "{what} should be refused by RBAC, got {}: {stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

impl Cluster {
    /// kubectl as node `index`'s identity, from inside that node's namespace.
    fn node_kubectl(&self, index: usize, args: &[&str]) -> Output {
        let node = self.lab.node(index);
        self.api
            .kubectl_with(
                Some(&node.netns),
                self.api.node_kubeconfig(&node.name),
                args,
            )
            .expect("run kubectl")
    }

    fn admin(&self, args: &[&str]) -> String {
        self.api
            .kubectl_ok(args)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// The CRD, the agent's RBAC bound to the node identities, two Nodes, one VirtualIP.
    fn install(&self) {
        self.admin(&["apply", "-f", CRD]);
        self.admin(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/virtualips.ferrovip.io",
        ]);
        self.admin(&["apply", "-f", RBAC]);
        self.api
            .bind_agent_group(AGENT_ROLE)
            .expect("bind the agent group");
        for node in self.lab.nodes() {
            let manifest = self.api.dir().join(format!("node-{}.json", node.name));
            let doc = json!({
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {"name": node.name, "labels": {"kubernetes.io/hostname": node.name}},
            });
            std::fs::write(&manifest, doc.to_string()).unwrap();
            self.admin(&["apply", "-f", &manifest.display().to_string()]);
        }
        let vip = self.api.dir().join("vip.yaml");
        std::fs::write(&vip, VIP_MANIFEST).unwrap();
        self.admin(&["apply", "-f", &vip.display().to_string()]);
    }

    /// Runs `f` with a client of node `index`'s identity, inside that node's namespace.
    fn as_node<T, F, Fut>(&self, index: usize, f: F) -> T
    where
        F: FnOnce(Client) -> Fut + Send,
        Fut: Future<Output = T>,
        T: Send,
    {
        let node = self.lab.node(index);
        with_client(Some(&node.netns), self.api.node_kubeconfig(&node.name), f)
    }
}

/// A kube client from `kubeconfig` whose sockets live in `netns`, on a runtime of its own.
fn with_client<T, F, Fut>(netns: Option<&str>, kubeconfig: &Path, f: F) -> T
where
    F: FnOnce(Client) -> Fut + Send,
    Fut: Future<Output = T>,
    T: Send,
{
    in_netns(netns, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(async move { f(client_from(kubeconfig).await).await })
    })
    .expect("enter the namespace")
}

async fn client_from(kubeconfig: &Path) -> Client {
    let kubeconfig = Kubeconfig::read_from(kubeconfig).expect("read the kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig to client config");
    Client::try_from(config).expect("kube client")
}

fn virtualips(client: Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("ferrovip.io", "v1alpha1", "VirtualIP");
    Api::all_with(
        client,
        &ApiResource::from_gvk_with_plural(&gvk, "virtualips"),
    )
}

fn field_manager(node: &str) -> String {
    format!("ferrovip-agent-{node}")
}

/// What one agent applies: its own entry of `status.nodes` and nothing else.
fn own_entry(node: &str, state: &str, priority: i64) -> Value {
    json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": VIP_NAME},
        "status": {"nodes": [{"name": node, "state": state, "priority": priority}]},
    })
}

async fn apply_own_entry(
    client: Client,
    node: &str,
    state: &str,
    priority: i64,
) -> Result<DynamicObject, kube::Error> {
    virtualips(client)
        .patch_status(
            VIP_NAME,
            &PatchParams::apply(&field_manager(node)),
            &Patch::Apply(own_entry(node, state, priority)),
        )
        .await
}

/// `status.nodes` as (name, state, priority), in the server's order.
fn node_entries(vip: &DynamicObject) -> Vec<(String, String, i64)> {
    vip.data["status"]["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|entry| {
            (
                entry["name"].as_str().unwrap_or_default().to_owned(),
                entry["state"].as_str().unwrap_or_default().to_owned(),
                entry["priority"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

fn entries(list: &[(&str, &str, i64)]) -> Vec<(String, String, i64)> {
    list.iter()
        .map(|(n, s, p)| (n.to_string(), s.to_string(), *p))
        .collect()
}

fn status_code(result: Result<impl Sized, kube::Error>) -> Option<u16> {
    match result {
        Err(kube::Error::Api(status)) => Some(status.code),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests

/// What kube-controller-manager's ClusterRole aggregation controller does (this harness runs
/// the API server alone): sets an aggregated role's rules to the union of the rules of the
/// ClusterRoles its own `aggregationRule` selects, as the server returns them.
fn aggregate(c: &Cluster, role: &str) {
    let json = |args: &[&str]| -> Value { serde_json::from_str(&c.admin(args)).unwrap() };
    let target = json(&["get", "clusterrole", role, "-o", "json"]);
    let selectors = target["aggregationRule"]["clusterRoleSelectors"]
        .as_array()
        .unwrap_or_else(|| panic!("{role} is an aggregated role"))
        .clone();
    let mut rules: Vec<Value> = Vec::new();
    for selector in selectors {
        let labels: Vec<String> = selector["matchLabels"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap()))
            .collect();
        let selected = json(&["get", "clusterroles", "-l", &labels.join(","), "-o", "json"]);
        for r in selected["items"].as_array().unwrap() {
            for rule in r["rules"].as_array().into_iter().flatten() {
                if !rules.contains(rule) {
                    rules.push(rule.clone());
                }
            }
        }
    }
    let patch = json!({ "rules": rules }).to_string();
    c.admin(&["patch", "clusterrole", role, "--type=merge", "-p", &patch]);
}

/// config/rbac's roles for people: `ferrovip-view` reaches the built-in `view` (and `edit`,
/// `admin`) through the labels the real server's aggregation rules select; writing VirtualIPs
/// is never aggregated, only granted by binding `ferrovip-admin`.
fn people_roles_delegate_reading_only(c: &Cluster) {
    // view first: edit aggregates view, admin aggregates edit.
    for role in ["view", "edit", "admin"] {
        aggregate(c, role);
    }
    for (user, role) in [
        ("viewer", "view"),
        ("editor", "edit"),
        ("namespace-admin", "admin"),
        ("vip-admin", "ferrovip-admin"),
    ] {
        c.admin(&[
            "create",
            "clusterrolebinding",
            &format!("test-{user}"),
            &format!("--clusterrole={role}"),
            &format!("--user={user}"),
        ]);
    }
    let vips = "virtualips.ferrovip.io";
    for (user, verb, resource, allowed) in [
        ("viewer", "list", vips, "yes"),
        ("viewer", "watch", vips, "yes"),
        (
            "viewer",
            "get",
            "virtualips.ferrovip.io --subresource=status",
            "yes",
        ),
        ("viewer", "create", vips, "no"),
        ("viewer", "delete", vips, "no"),
        ("viewer", "patch", vips, "no"),
        ("editor", "list", vips, "yes"),
        ("editor", "create", vips, "no"),
        ("namespace-admin", "get", vips, "yes"),
        ("namespace-admin", "update", vips, "no"),
        ("vip-admin", "create", vips, "yes"),
        ("vip-admin", "delete", vips, "yes"),
        (
            "vip-admin",
            "patch",
            "virtualips.ferrovip.io --subresource=status",
            "no",
        ),
    ] {
        let as_user = format!("--as={user}");
        let mut args = vec!["auth", "can-i", verb, as_user.as_str()];
        args.extend(resource.split(' '));
        let out = c.api.kubectl(&args).expect("run kubectl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can {user} ({verb} {resource})? {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // And for real: the viewer lists, and is refused a create.
    let listed = c.admin(&["get", "vip", "-o", "name", "--as=viewer"]);
    assert_eq!(listed.trim(), "virtualip.ferrovip.io/api");
    let other = c.api.dir().join("viewer-vip.yaml");
    std::fs::write(&other, VIP_MANIFEST.replace("name: api", "name: viewers")).unwrap();
    let out = c
        .api
        .kubectl(&["create", "--as=viewer", "-f", &other.display().to_string()])
        .expect("run kubectl");
    assert_forbidden(out, "a viewer creating a VirtualIP");
}

#[test]
fn netns_apiserver_serves_lab_nodes_within_the_agent_rbac() {
    let c = cluster(2);

    // Authenticated, but nothing is granted before the agent's RBAC is applied.
    assert_forbidden(
        c.node_kubectl(0, &["get", "nodes"]),
        "listing nodes without RBAC",
    );
    let whoami = c.node_kubectl(0, &["get", "nodes"]);
    assert!(
        String::from_utf8_lossy(&whoami.stderr).contains("\"ferrovip:node-a\""),
        "the node's token maps to its own user: {}",
        String::from_utf8_lossy(&whoami.stderr)
    );

    c.install();
    let nodes = stdout(
        c.node_kubectl(0, &["get", "nodes", "-o", "name"]),
        "kubectl get nodes as node-a",
    );
    assert_eq!(
        nodes.lines().collect::<Vec<_>>(),
        ["node/node-a", "node/node-b"]
    );
    for resource in [
        "virtualips.ferrovip.io",
        "services",
        "endpointslices.discovery.k8s.io",
    ] {
        stdout(
            c.node_kubectl(1, &["get", resource, "--all-namespaces"]),
            &format!("node-b listing {resource}"),
        );
    }
    let vips = stdout(
        c.node_kubectl(1, &["get", "vip", "-o", "name"]),
        "node-b listing VirtualIPs",
    );
    assert_eq!(vips.trim(), "virtualip.ferrovip.io/api");

    // Users own VirtualIPs and Nodes; the agent only reads them.
    assert_forbidden(
        c.node_kubectl(0, &["delete", "vip", VIP_NAME]),
        "deleting a VirtualIP",
    );
    let other = c.api.dir().join("other-vip.yaml");
    std::fs::write(&other, VIP_MANIFEST.replace("name: api", "name: other")).unwrap();
    assert_forbidden(
        c.node_kubectl(0, &["create", "-f", &other.display().to_string()]),
        "creating a VirtualIP",
    );
    assert_forbidden(
        c.node_kubectl(
            0,
            &[
                "patch",
                "vip",
                VIP_NAME,
                "--type=merge",
                "-p",
                r#"{"spec":{"interface":"eth1"}}"#,
            ],
        ),
        "patching a VirtualIP's spec",
    );
    assert_forbidden(
        c.node_kubectl(0, &["label", "node", "node-a", "ferrovip.io/test=yes"]),
        "labelling a Node",
    );
    assert_forbidden(
        c.node_kubectl(
            0,
            &[
                "patch",
                "node",
                "node-a",
                "--subresource=status",
                "--type=merge",
                "-p",
                r#"{"status":{"phase":"Running"}}"#,
            ],
        ),
        "writing a Node's status",
    );
    assert_forbidden(
        c.node_kubectl(0, &["delete", "node", "node-b"]),
        "deleting a Node",
    );
    assert_forbidden(
        c.node_kubectl(0, &["get", "secrets", "-A"]),
        "reading Secrets",
    );
    assert_forbidden(
        c.node_kubectl(0, &["get", "events", "-A"]),
        "reading Events",
    );

    // The ServiceAccount the DaemonSet runs as holds the same rights through
    // config/rbac's own binding.
    let sa = "--as=system:serviceaccount:ferrovip-system:ferrovip-agent";
    for (verb, resource, allowed) in [
        ("watch", "virtualips.ferrovip.io", "yes"),
        (
            "patch",
            "virtualips.ferrovip.io --subresource=status",
            "yes",
        ),
        ("create", "events.events.k8s.io", "yes"),
        // Only what the code uses: status is applied (a patch), Events are created.
        (
            "update",
            "virtualips.ferrovip.io --subresource=status",
            "no",
        ),
        ("get", "virtualips.ferrovip.io --subresource=status", "no"),
        ("patch", "events.events.k8s.io", "no"),
        ("list", "endpointslices.discovery.k8s.io", "yes"),
        ("delete", "virtualips.ferrovip.io", "no"),
        ("update", "nodes", "no"),
    ] {
        let mut args = vec!["auth", "can-i", verb, sa];
        args.extend(resource.split(' '));
        let out = c.api.kubectl(&args).expect("run kubectl");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            allowed,
            "can the agent's ServiceAccount {verb} {resource}? {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    people_roles_delegate_reading_only(&c);

    // The kubeconfigs name the CA, not insecure-skip-tls-verify.
    let kubeconfig = std::fs::read_to_string(c.api.node_kubeconfig("node-a")).unwrap();
    assert!(kubeconfig.contains("certificate-authority") && !kubeconfig.contains("insecure"));
    assert!(c.started_in < Duration::from_secs(60));
}

#[test]
fn netns_apiserver_node_identities_apply_their_own_status_and_publish_events() {
    let c = cluster(2);
    c.install();

    // Each node applies only its own entry; the entries merge by name.
    let a = c
        .as_node(0, |client| apply_own_entry(client, "node-a", "Master", 150))
        .expect("node-a applies its status entry");
    assert_eq!(node_entries(&a), entries(&[("node-a", "Master", 150)]));
    let b = c
        .as_node(1, |client| apply_own_entry(client, "node-b", "Backup", 140))
        .expect("node-b applies its status entry next to node-a's");
    assert_eq!(
        node_entries(&b),
        entries(&[("node-a", "Master", 150), ("node-b", "Backup", 140)])
    );

    // A later apply changes only the applier's entry.
    let a = c
        .as_node(0, |client| apply_own_entry(client, "node-a", "Backup", 90))
        .expect("node-a updates its entry");
    assert_eq!(
        node_entries(&a),
        entries(&[("node-a", "Backup", 90), ("node-b", "Backup", 140)])
    );
    let managers: Vec<String> = a
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager.clone())
        .collect();
    assert!(
        managers.contains(&field_manager("node-a")) && managers.contains(&field_manager("node-b")),
        "one field manager per node: {managers:?}"
    );

    // An agent that no longer serves the VirtualIP applies an empty status: its entry goes,
    // the other stays.
    let gone = c
        .as_node(0, |client| async move {
            virtualips(client)
                .patch_status(
                    VIP_NAME,
                    &PatchParams::apply(&field_manager("node-a")),
                    &Patch::Apply(json!({
                        "apiVersion": "ferrovip.io/v1alpha1",
                        "kind": "VirtualIP",
                        "metadata": {"name": VIP_NAME},
                        "status": {},
                    })),
                )
                .await
        })
        .expect("node-a withdraws its entry");
    assert_eq!(node_entries(&gone), entries(&[("node-b", "Backup", 140)]));

    // The node identity reads but may not delete, and may not touch Nodes.
    let (delete, node_patch, get) = c.as_node(0, |client| async move {
        let delete = virtualips(client.clone())
            .delete(VIP_NAME, &DeleteParams::default())
            .await
            .map(drop);
        let node_patch = Api::<Node>::all(client.clone())
            .patch(
                "node-a",
                &PatchParams::apply(&field_manager("node-a")),
                &Patch::Apply(json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {"name": "node-a", "labels": {"ferrovip.io/test": "yes"}},
                })),
            )
            .await
            .map(drop);
        let get = virtualips(client).get(VIP_NAME).await.map(drop);
        (delete, node_patch, get)
    });
    assert_eq!(
        status_code(delete),
        Some(403),
        "deleting a VirtualIP as a node"
    );
    assert_eq!(
        status_code(node_patch),
        Some(403),
        "applying a Node as a node"
    );
    assert!(get.is_ok(), "reading the VirtualIP as a node: {get:?}");

    // Events (events.k8s.io/v1). v1.20 accepts an Event about a cluster-scoped object only in
    // `kube-system` (later versions also take `default`), so kube's Recorder, which files
    // those in `default`, is refused there; namespaced objects are fine.
    let (recorder_on_vip, recorder_on_service) = c.as_node(0, |client| async move {
        let vip = virtualips(client.clone()).get(VIP_NAME).await.expect("get");
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "ferrovip.io/agent".into(),
                instance: Some("node-a".into()),
            },
        );
        let event = Event {
            type_: EventType::Normal,
            reason: "BecameMaster".into(),
            note: Some("node-a holds 192.0.2.100".into()),
            action: "Transition".into(),
            secondary: None,
        };
        let on_vip = recorder.publish(&event, &vip_reference(&vip)).await;
        let service = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Service".into()),
            namespace: Some("default".into()),
            name: Some("kubernetes".into()),
            ..ObjectReference::default()
        };
        let first = recorder.publish(&event, &service).await;
        // The repeat is a patch of the first Event's series, which the agent may not do: it
        // only creates Events (rate-limited), so its role grants no patch.
        let repeat = recorder.publish(&event, &service).await;
        (on_vip, (first, repeat))
    });
    assert_eq!(
        status_code(recorder_on_vip),
        Some(422),
        "Recorder on a VirtualIP"
    );
    let (first, repeat) = recorder_on_service;
    assert!(first.is_ok(), "Recorder on a Service: {first:?}");
    assert_eq!(
        status_code(repeat),
        Some(403),
        "a repeated Event is a patch, forbidden to the agent"
    );

    let published = c.as_node(0, |client| async move {
        let vip = virtualips(client.clone()).get(VIP_NAME).await?;
        let events = Api::<K8sEvent>::namespaced(client, "kube-system");
        let now = k8s_openapi::jiff::Timestamp::now();
        let event: K8sEvent = serde_json::from_value(json!({
            "metadata": {"name": "api.node-a.1", "namespace": "kube-system"},
            "eventTime": MicroTime(now),
            "reportingController": "ferrovip.io/agent",
            "reportingInstance": "node-a",
            "action": "Transition",
            "reason": "BecameMaster",
            "note": "node-a holds 192.0.2.100",
            "type": "Normal",
            "regarding": vip_reference(&vip),
        }))
        .expect("an events.k8s.io/v1 Event");
        events.create(&Default::default(), &event).await?;
        // Counting a repeat into the series would be a patch: not the agent's to do.
        let counted = events
            .patch(
                "api.node-a.1",
                &PatchParams::default(),
                &Patch::Merge(json!({"series": {"count": 2, "lastObservedTime": MicroTime(now)}})),
            )
            .await;
        Ok::<_, kube::Error>(status_code(counted))
    });
    assert_eq!(
        published.expect("node-a creates its Event in kube-system"),
        Some(403),
        "patching an Event's series is forbidden to the agent"
    );
    let (vip_events, service_events) =
        with_client(None, c.api.host_admin_kubeconfig(), |client| async move {
            let list = |ns: &'static str| {
                let api = Api::<K8sEvent>::namespaced(client.clone(), ns);
                async move {
                    api.list(&Default::default())
                        .await
                        .expect("list events")
                        .items
                }
            };
            (list("kube-system").await, list("default").await)
        });
    for (events, regarding) in [(&vip_events, VIP_NAME), (&service_events, "kubernetes")] {
        let ours: Vec<&K8sEvent> = events
            .iter()
            .filter(|e| e.reason.as_deref() == Some("BecameMaster"))
            .collect();
        assert_eq!(ours.len(), 1, "one Event: {events:?}");
        assert_eq!(ours[0].reporting_instance.as_deref(), Some("node-a"));
        assert_eq!(
            ours[0].regarding.as_ref().and_then(|r| r.name.as_deref()),
            Some(regarding)
        );
        assert_eq!(ours[0].series, None, "the repeat was not counted");
    }
}

fn vip_reference(vip: &DynamicObject) -> ObjectReference {
    ObjectReference {
        api_version: Some("ferrovip.io/v1alpha1".into()),
        kind: Some("VirtualIP".into()),
        name: vip.metadata.name.clone(),
        uid: vip.metadata.uid.clone(),
        ..ObjectReference::default()
    }
}

#[test]
fn netns_apiserver_watch_sees_status_changes_and_survives_a_restart() {
    let mut c = cluster(1);
    c.install();

    // A watcher from the harness's namespace (through the relay), as the agent keeps one.
    let (tx, rx) = mpsc::channel::<(Instant, Vec<(String, String, i64)>)>();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let host_kubeconfig = c.api.host_admin_kubeconfig().to_owned();
    let watcher_thread = std::thread::spawn(move || {
        with_client(None, &host_kubeconfig, |client| async move {
            let stream = watcher(virtualips(client), watcher::Config::default())
                .default_backoff()
                .applied_objects();
            let forward = stream
                .filter_map(|item| async move { item.ok() })
                .for_each(|vip| {
                    let _ = tx.send((Instant::now(), node_entries(&vip)));
                    async {}
                });
            tokio::select! {
                _ = forward => {}
                _ = stop_rx => {}
            }
        })
    });
    let wait_for = |want: &[(&str, &str, i64)], timeout: Duration| -> Instant {
        let want = entries(want);
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((at, seen)) if seen == want => return at,
                Ok(_) => {}
                Err(_) => panic!("the watcher did not see {want:?} within {timeout:?}"),
            }
        }
    };
    wait_for(&[], Duration::from_secs(10));

    // One node client, five applies: when each was sent and acknowledged.
    let rounds: Vec<(&str, i64)> = vec![
        ("Master", 101),
        ("Backup", 102),
        ("Master", 103),
        ("Backup", 104),
        ("Master", 105),
    ];
    let stamps = c.as_node(0, |client| {
        let rounds = rounds.clone();
        async move {
            let mut stamps = Vec::new();
            for (state, priority) in rounds {
                let sent = Instant::now();
                apply_own_entry(client.clone(), "node-a", state, priority)
                    .await
                    .expect("node-a applies its entry");
                stamps.push((sent, Instant::now()));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            stamps
        }
    });
    let mut apply_times = Vec::new();
    let mut watch_delays = Vec::new();
    for ((state, priority), (sent, acked)) in rounds.iter().zip(stamps) {
        let seen = wait_for(&[("node-a", state, *priority)], Duration::from_secs(10));
        apply_times.push(acked - sent);
        watch_delays.push(seen.saturating_duration_since(acked));
    }
    eprintln!("node-a apply round trips: {apply_times:?}");
    eprintln!("watch event after the apply returned: {watch_delays:?}");
    assert!(watch_delays.iter().all(|d| *d < Duration::from_secs(2)));

    // Outage with the watch open: new connections are refused at once.
    let stop_took = c.api.stop().expect("stop kube-apiserver");
    assert!(!c.api.is_running());
    let down = c
        .api
        .kubectl(&["get", "vip", "--request-timeout=3s"])
        .unwrap();
    assert!(!down.status.success(), "kubectl reached a stopped server");
    let refused = c.as_node(0, |client| apply_own_entry(client, "node-a", "Fault", 1));
    assert!(refused.is_err(), "applied to a stopped server: {refused:?}");

    let restart_took = c.api.restart().expect("restart kube-apiserver");
    let restarted = Instant::now();
    eprintln!("stop with a watch open took {stop_took:?}; restart ready after {restart_took:?}");
    // The data survived in etcd.
    let status = c.admin(&[
        "get",
        "vip",
        VIP_NAME,
        "-o",
        "jsonpath={.status.nodes[0].state}",
    ]);
    assert_eq!(status, "Master");
    // The watcher reconnects by itself (within its backoff) and sees later changes.
    c.as_node(0, |client| apply_own_entry(client, "node-a", "Backup", 42))
        .expect("node-a applies after the restart");
    let seen = wait_for(&[("node-a", "Backup", 42)], Duration::from_secs(60));
    eprintln!(
        "watcher (default backoff) delivered the first change {:?} after the restart",
        seen.saturating_duration_since(restarted)
    );
    let _ = stop_tx.send(());
    watcher_thread.join().expect("watcher thread");

    // Dropping the server leaves nothing running in the namespace and removes its files.
    let dir = c.api.dir().to_owned();
    let Cluster { api, lab, .. } = c;
    drop(api);
    let pids = std::process::Command::new("ip")
        .args(["netns", "pids", lab.switch_netns()])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&pids.stdout).trim(),
        "",
        "leftover processes"
    );
    assert!(!dir.exists(), "{} was not removed", dir.display());
}

#[test]
fn netns_apiserver_runs_without_a_namespace_on_a_free_port() {
    // No namespace: the server listens on loopback where the harness runs.
    let dir = std::env::temp_dir().join(format!("ferrovip-apiserver-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut api = ApiServer::start(ApiServerOptions {
        port: 0,
        dir: dir.clone(),
        node_users: vec!["node-x".into()],
        build_script: Some(BUILD_SCRIPT.into()),
        ..ApiServerOptions::default()
    })
    .expect("start etcd and kube-apiserver");
    eprintln!(
        "API server at {} ready after {:?}",
        api.url(),
        api.startup_time()
    );
    assert_ne!(api.port(), 0);
    assert_eq!(api.host_url(), api.url());
    let version = api.kubectl_ok(&["version", "-o", "json"]).unwrap();
    let version: Value = serde_json::from_str(&version).unwrap();
    assert_eq!(version["serverVersion"]["gitVersion"], "v1.20.2");
    let namespaces = with_client(None, api.admin_kubeconfig(), |client| async move {
        Api::<k8s_openapi::api::core::v1::Namespace>::all(client)
            .list(&Default::default())
            .await
            .expect("list namespaces")
            .items
            .into_iter()
            .filter_map(|ns| ns.metadata.name)
            .collect::<Vec<_>>()
    });
    assert!(namespaces.contains(&"default".to_owned()), "{namespaces:?}");
    // The node identity authenticates but holds nothing here.
    let out = api
        .kubectl_with(None, api.node_kubeconfig("node-x"), &["get", "namespaces"])
        .unwrap();
    assert_forbidden(out, "listing namespaces as a node");

    // Without open watches a graceful stop is quick; a crash is immediate. etcd keeps the data.
    api.kubectl_ok(&["create", "configmap", "kept", "--from-literal=k=v"])
        .unwrap();
    let stop_took = api.stop().unwrap();
    let restart_took = api.restart().unwrap();
    api.kill().unwrap();
    assert!(!api.is_running());
    let after_kill = api.restart().unwrap();
    eprintln!(
        "idle stop took {stop_took:?}; ready again after {restart_took:?}; after a kill {after_kill:?}"
    );
    assert!(
        stop_took < Duration::from_secs(5),
        "idle stop took {stop_took:?}"
    );
    let kept = api
        .kubectl_ok(&["get", "configmap", "kept", "-o", "jsonpath={.data.k}"])
        .unwrap();
    assert_eq!(kept, "v");

    // A directory with content is refused: drop would delete it.
    let taken = ApiServer::start(ApiServerOptions {
        port: 0,
        dir: dir.clone(),
        ..ApiServerOptions::default()
    });
    assert_eq!(
        taken.map(drop).map_err(|e| e.metric_label()),
        Err("invalid_options")
    );
    drop(api);
    assert!(!dir.exists());
}

#[test]
fn netns_apiserver_lab_bridge_address_is_reachable_and_not_a_node_address() {
    let clash = Lab::create(LabSpec {
        nodes: 2,
        ipv6: false,
        bridge_ipv4: Some("192.0.2.12/24".parse().unwrap()),
        ..LabSpec::default()
    });
    assert_eq!(
        clash.map(drop).map_err(|e| e.metric_label()),
        Err("invalid_spec")
    );

    let lab = Lab::create(LabSpec {
        nodes: 2,
        ipv6: false,
        bridge_ipv4: Some(BRIDGE.parse().unwrap()),
        ..LabSpec::default()
    })
    .expect("build the lab (needs root)");
    assert_eq!(lab.bridge_ipv4(), Some("192.0.2.1".parse().unwrap()));
    for node in 0..2 {
        let ping = lab
            .exec(node, &["ping", "-c", "1", "-W", "2", "192.0.2.1"])
            .unwrap();
        assert!(ping.status.success(), "node {node} cannot reach the bridge");
    }
}
