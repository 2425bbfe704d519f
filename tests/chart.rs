//! The Helm chart (`charts/ferrovip`) with the real Helm engine (the helm 3.9 CLI of
//! `e2e/helm/install.sh`, or `FERROVIP_HELM`) and the real API server: `helm lint --strict`,
//! renders with the default values and with every value on (`ci/all-on-values.yaml`), a typo
//! in values failing with the key named, the DaemonSet's contract with the agent, CRDs equal
//! to `crds/`, RBAC equal to `config/rbac` (both generated from src/crd/rbac.rs), server-side
//! dry runs of the renders against kube-apiserver, and Helm's real install, upgrade,
//! uninstall and reinstall there (CRDs and the user's objects kept). The metrics the
//! dashboard and the alerts query are checked against running agents (IPVS, the Service
//! controller, a failover) in tests/vm_dataplane.rs, case
//! k8s_service_load_balancer_through_ipvs_and_failover.

use std::path::Path;
use std::process::{Command, Output};

use ferrovip_e2e::{ApiServer, ApiServerOptions};
use serde_json::Value;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const CHART: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/charts/ferrovip");
const ALL_ON: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/charts/ferrovip/ci/all-on-values.yaml"
);
const NAMESPACE: &str = "ferrovip-system";
const RELEASE: &str = "ferrovip";

// The Helm CLI (`FERROVIP_HELM`, else the one `e2e/helm/install.sh` caches), as the cluster
// tests find it.
mod cluster_util;
use cluster_util::{helm_binary as helm, helm_succeeded};

fn run_helm(args: &[&str]) -> Output {
    Command::new(helm())
        .args(args)
        // No user configuration or repositories: the test sees the chart alone.
        .env(
            "HELM_CONFIG_HOME",
            std::env::temp_dir().join("ferrovip-helm-config"),
        )
        .env(
            "HELM_CACHE_HOME",
            std::env::temp_dir().join("ferrovip-helm-cache"),
        )
        .output()
        .expect("run helm")
}

fn helm_ok(args: &[&str]) -> String {
    helm_succeeded(args, run_helm(args))
}

/// `helm template` of release `ferrovip` in `ferrovip-system` with these extra arguments.
fn render(extra: &[&str]) -> String {
    let mut args = vec!["template", RELEASE, CHART, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    helm_ok(&args)
}

/// `helm template` with one `--set`, whatever the outcome.
fn try_render_with(set: &str) -> Output {
    run_helm(&[
        "template",
        RELEASE,
        CHART,
        "--namespace",
        NAMESPACE,
        "--set",
        set,
    ])
}

fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .expect("the render is YAML")
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in the render"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    docs.iter()
        .map(|d| d["kind"].as_str().unwrap_or("?").to_owned())
        .collect()
}

#[test]
fn lint_strict_passes_with_default_and_all_on_values() {
    let out = helm_ok(&["lint", "--strict", CHART]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
    let out = helm_ok(&["lint", "--strict", CHART, "-f", ALL_ON]);
    assert!(out.contains("0 chart(s) failed"), "{out}");
}

#[test]
fn the_all_on_values_set_every_key_of_the_defaults() {
    // The all-on file must keep up with values.yaml: every key path of the defaults is set.
    let defaults: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(Path::new(CHART).join("values.yaml")).unwrap(),
    )
    .unwrap();
    let all_on: Value = serde_saphyr::from_str(&std::fs::read_to_string(ALL_ON).unwrap()).unwrap();
    fn missing(path: &str, d: &Value, a: &Value, out: &mut Vec<String>) {
        if let Value::Object(map) = d {
            for (k, v) in map {
                let p = format!("{path}.{k}");
                match a.get(k) {
                    None => out.push(p),
                    Some(sub) => missing(&p, v, sub, out),
                }
            }
        }
    }
    let mut out = Vec::new();
    missing("", &defaults, &all_on, &mut out);
    // Free-form maps are set with keys of their own; only the top of them must be present.
    assert!(out.is_empty(), "ci/all-on-values.yaml lacks {out:?}");
}

#[test]
fn a_typo_in_values_fails_with_the_key_named() {
    for (set, key) in [
        ("metrics.prot=1", "prot"),
        ("restartHodl=5s", "restartHodl"),
        ("metrics.serviceMonitor.enabeld=true", "enabeld"),
        ("image.pullpolicy=Never", "pullpolicy"),
    ] {
        let out = try_render_with(set);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "--set {set} rendered");
        assert!(
            stderr.contains(&format!("Additional property {key} is not allowed")),
            "--set {set}: {stderr}"
        );
    }
    // Wrong shapes too.
    for set in ["logFormat=xml", "restartHold=10", "dataplane=iptables"] {
        let out = try_render_with(set);
        let stderr = String::from_utf8_lossy(&out.stderr);
        let key = set.split('=').next().unwrap();
        assert!(!out.status.success(), "--set {set} rendered");
        assert!(stderr.contains(key), "--set {set}: {stderr}");
    }
}

#[test]
fn the_daemonset_keeps_its_contract_with_the_agent() {
    let rendered = docs(&render(&[]));
    let ds = find(&rendered, "DaemonSet", "ferrovip");
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "ferrovip");
    assert_eq!(labels["app.kubernetes.io/instance"], RELEASE);
    assert_eq!(labels["app.kubernetes.io/component"], "agent");
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(pod["serviceAccountName"], "ferrovip");
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    // Default restartHold 10s: the kubelet waits longer than the hold.
    assert_eq!(pod["terminationGracePeriodSeconds"], 20);
    let tolerated: Vec<&str> = pod["tolerations"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["key"].as_str())
        .collect();
    assert!(tolerated.contains(&"node-role.kubernetes.io/control-plane"));

    let agent = &pod["containers"][0];
    assert_eq!(agent["name"], "agent");
    // The tag defaults to appVersion, which follows the crate's version.
    assert_eq!(
        agent["image"],
        format!("ferrovip/ferrovip:{}", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(agent["args"][0], "agent");
    let sc = &agent["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "NET_RAW"])
    );
    let env = |name: &str| -> Value {
        agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("no env {name}"))
            .clone()
    };
    assert_eq!(
        env("NODE_NAME")["valueFrom"]["fieldRef"]["fieldPath"],
        "spec.nodeName"
    );
    assert_eq!(
        env("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );
    assert_eq!(env("FERROVIP_DAEMONSET")["value"], "ferrovip");
    assert_eq!(env("FERROVIP_RESTART_HOLD")["value"], "10s");
    // The agent's own defaults (--announce-*), spelled out.
    assert_eq!(env("FERROVIP_ANNOUNCE_REPEAT")["value"], "5");
    assert_eq!(env("FERROVIP_ANNOUNCE_INTERVAL")["value"], "10ms");
    assert_eq!(env("FERROVIP_ANNOUNCE_RATE")["value"], "10000");
    assert_eq!(env("FERROVIP_LOG_FORMAT")["value"], "json");
    assert_eq!(env("FERROVIP_STATE_DIR")["value"], "/run/ferrovip");
    assert_eq!(
        env("FERROVIP_CLUSTER_SNAPSHOT")["value"],
        "/var/lib/ferrovip/cluster-snapshot.json"
    );
    assert_eq!(env("FERROVIP_METRICS_ADDR")["value"], "0.0.0.0:9646");
    assert!(
        agent["env"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["name"] != "KUBERNETES_SERVICE_HOST"),
        "apiServer.host is empty by default"
    );
    assert_eq!(agent["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(agent["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(agent["ports"][0]["containerPort"], 9646);
    // The state directory survives the container on the host, under /run (tmpfs).
    let volumes = pod["volumes"].as_array().unwrap();
    let host = |path: &str| {
        volumes
            .iter()
            .find(|v| v["hostPath"]["path"] == path)
            .unwrap_or_else(|| panic!("no hostPath {path}"))
    };
    assert_eq!(
        host("/run/ferrovip")["hostPath"]["type"],
        "DirectoryOrCreate"
    );
    assert_eq!(
        host("/var/lib/ferrovip")["hostPath"]["type"],
        "DirectoryOrCreate"
    );
    // The one privileged thing: the init container's node setup.
    let init = &pod["initContainers"][0];
    assert_eq!(init["args"][0], "node-setup");
    // The agent adds VIPs on interfaces the chart cannot know: all.promote_secondaries covers
    // every one (the kernel ORs it with the interface's own).
    assert!(
        init["args"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "--promote-secondaries")),
        "node-setup without --promote-secondaries: {}",
        init["args"]
    );
    assert_eq!(init["securityContext"]["privileged"], true);
    assert!(!kinds(&rendered).iter().any(|k| k == "ServiceMonitor"
        || k == "PodMonitor"
        || k == "PrometheusRule"
        || k == "ConfigMap"
        || k == "VirtualIP"));

    // Every value on: each reaches the objects.
    let all = docs(&render(&["-f", ALL_ON]));
    let ds = find(&all, "DaemonSet", "ferrovip");
    let pod = &ds["spec"]["template"]["spec"];
    let agent = &pod["containers"][0];
    let args: Vec<&str> = agent["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        [
            "agent",
            "--ignore-classless-services",
            "--address-lifetime=2s",
            "--vrrp-rt-priority=50"
        ]
    );
    assert_eq!(agent["image"], "localhost/ferrovip:test");
    assert_eq!(agent["imagePullPolicy"], "Never");
    assert_eq!(pod["terminationGracePeriodSeconds"], 40);
    assert_eq!(pod["serviceAccountName"], "ferrovip-agent");
    let env: Vec<(String, String)> = agent["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    for want in [
        ("KUBERNETES_SERVICE_HOST", "192.0.2.1"),
        ("KUBERNETES_SERVICE_PORT", "6443"),
        ("FERROVIP_METRICS_ADDR", "0.0.0.0:9647"),
        ("FERROVIP_LOG", "debug"),
    ] {
        assert!(
            env.contains(&(want.0.to_owned(), want.1.to_owned())),
            "{want:?} not in {env:?}"
        );
    }
    let kinds = kinds(&all);
    for kind in [
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "LoadBalancerPool",
        "VirtualIP",
    ] {
        assert!(kinds.iter().any(|k| k == kind), "no {kind} in {kinds:?}");
    }
    let dashboard = find(&all, "ConfigMap", "ferrovip-dashboard");
    let json: Value =
        serde_json::from_str(dashboard["data"]["ferrovip.json"].as_str().unwrap()).unwrap();
    assert_eq!(json["uid"], "ferrovip");
    let vip = find(&all, "VirtualIP", "web");
    assert_eq!(
        vip["metadata"]["annotations"]["helm.sh/hook"],
        "post-install,post-upgrade"
    );
}

/// The weight of a hook document.
fn hook_weight(doc: &Value) -> i64 {
    doc["metadata"]["annotations"]["helm.sh/hook-weight"]
        .as_str()
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no hook weight in {doc}"))
}

#[test]
fn the_initial_objects_of_unserved_kinds_wait_for_the_crds_first() {
    // `helm template` knows no ferrovip kinds, as a first install: the Job runs before the
    // objects' hooks (Helm waits for a hook Job; it cannot map a kind its discovery does not
    // list yet).
    let all = docs(&render(&["-f", ALL_ON]));
    let job = find(&all, "Job", "ferrovip-wait-for-crds");
    let annotations = &job["metadata"]["annotations"];
    assert_eq!(annotations["helm.sh/hook"], "post-install,post-upgrade");
    assert_eq!(
        annotations["helm.sh/hook-delete-policy"],
        "before-hook-creation,hook-succeeded"
    );
    for (kind, name) in [("LoadBalancerPool", "default"), ("VirtualIP", "web")] {
        assert!(
            hook_weight(job) < hook_weight(find(&all, kind, name)),
            "the Job does not run before {kind} {name}"
        );
    }
    let pod = &job["spec"]["template"]["spec"];
    assert_eq!(pod["restartPolicy"], "Never");
    let ds = find(&all, "DaemonSet", "ferrovip");
    assert_eq!(
        pod["serviceAccountName"],
        ds["spec"]["template"]["spec"]["serviceAccountName"]
    );
    assert_eq!(pod["hostNetwork"], true);
    let labels = &job["spec"]["template"]["metadata"]["labels"];
    assert_eq!(
        labels["app.kubernetes.io/component"], "wait-for-crds",
        "the Job's pod must not match the DaemonSet's selector"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0], "wait-for-crds");
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let env: Vec<&str> = container["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(env.contains(&"KUBERNETES_SERVICE_HOST"), "{env:?}");
    // The tolerations of the agents: it runs where they can.
    assert_eq!(
        pod["tolerations"],
        ds["spec"]["template"]["spec"]["tolerations"]
    );

    // Served kinds (an upgrade, or CRDs managed elsewhere): no Job.
    let served = docs(&render(&[
        "-f",
        ALL_ON,
        "--api-versions",
        "ferrovip.io/v1alpha1/VirtualIP",
        "--api-versions",
        "ferrovip.io/v1alpha1/LoadBalancerPool",
    ]));
    assert!(!kinds(&served).contains(&"Job".to_owned()));
    assert!(kinds(&served).contains(&"VirtualIP".to_owned()));
    // No initial objects (the default): no Job.
    assert!(!kinds(&docs(&render(&[]))).contains(&"Job".to_owned()));
}

/// The CRD documents of a render.
fn crds_of(docs: &[Value]) -> Vec<Value> {
    docs.iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .cloned()
        .collect()
}

#[test]
fn the_charts_crds_are_those_of_crds_and_are_kept() {
    // Byte copies: `ferrovip crdgen --check charts/ferrovip/files/crds` (e2e/test.sh) too.
    let mut committed = Vec::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("crds")).unwrap() {
        let path = entry.unwrap().path();
        let copy = Path::new(CHART)
            .join("files/crds")
            .join(path.file_name().unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            std::fs::read_to_string(&copy).unwrap_or_default(),
            text,
            "{} is not a copy of {}",
            copy.display(),
            path.display()
        );
        committed.push(serde_saphyr::from_str::<Value>(&text).unwrap());
    }
    assert_eq!(
        std::fs::read_dir(Path::new(CHART).join("files/crds"))
            .unwrap()
            .count(),
        committed.len(),
        "files/crds holds a CRD that crds/ does not"
    );
    // Rendered: the same objects, plus Helm's keep policy and the chart's labels.
    let rendered = crds_of(&docs(&render(&[])));
    assert_eq!(rendered.len(), committed.len());
    for mut crd in rendered {
        let name = crd["metadata"]["name"].as_str().unwrap().to_owned();
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "{name}"
        );
        let meta = crd["metadata"].as_object_mut().unwrap();
        meta.remove("annotations");
        meta.remove("labels");
        assert!(
            committed.contains(&crd),
            "the rendered CRD {name} differs from crds/"
        );
    }
    // Turning the value off leaves them out of the render (Helm keeps them in the cluster).
    assert!(crds_of(&docs(&render(&["--set", "crds.install=false"]))).is_empty());
}

/// The rules of the ClusterRole or Role `name` in these documents.
fn rules(docs: &[Value], kind: &str, name: &str) -> Value {
    find(docs, kind, name)["rules"].clone()
}

#[test]
fn rbac_comes_from_one_source() {
    // config/rbac and the chart's rule files are what src/crd/rbac.rs generates ...
    let out = Command::new(env!("CARGO_BIN_EXE_ferrovip"))
        .args(["rbacgen", "--check", ROOT])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the chart renders the same rules as config/rbac, names aside.
    let mut config = Vec::new();
    for file in ["cluster_role.yaml", "role.yaml", "user_roles.yaml"] {
        config.extend(docs(
            &std::fs::read_to_string(Path::new(ROOT).join("config/rbac").join(file)).unwrap(),
        ));
    }
    let chart = docs(&render(&[]));
    for (kind, config_name, chart_name) in [
        ("ClusterRole", "ferrovip-agent", "ferrovip"),
        (
            "Role",
            "ferrovip-controller-lease",
            "ferrovip-controller-lease",
        ),
        ("ClusterRole", "ferrovip-view", "ferrovip-view"),
        ("ClusterRole", "ferrovip-admin", "ferrovip-admin"),
    ] {
        assert_eq!(
            rules(&config, kind, config_name),
            rules(&chart, kind, chart_name),
            "{kind} {chart_name}"
        );
    }
    // The DaemonSet rule names each one's own DaemonSet.
    let daemonset = |docs: &[Value], role: &str, ds: &str| {
        let r = rules(docs, "Role", role);
        assert_eq!(r[0]["resources"], serde_json::json!(["daemonsets"]));
        assert_eq!(r[0]["resourceNames"], serde_json::json!([ds]));
        assert_eq!(r[0]["verbs"], serde_json::json!(["get"]));
    };
    daemonset(&config, "ferrovip-agent", "ferrovip-agent");
    daemonset(&chart, "ferrovip", "ferrovip");
    let view = find(&chart, "ClusterRole", "ferrovip-view");
    assert_eq!(
        view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"],
        "true"
    );
    // Every Role and ClusterRole of the agent is bound to the chart's ServiceAccount.
    for (binding, role) in [
        ("ClusterRoleBinding", "ferrovip"),
        ("RoleBinding", "ferrovip"),
        ("RoleBinding", "ferrovip-controller-lease"),
    ] {
        let b = find(&chart, binding, role);
        assert_eq!(b["roleRef"]["name"], role);
        assert_eq!(b["subjects"][0]["name"], "ferrovip");
        assert_eq!(b["subjects"][0]["namespace"], NAMESPACE);
    }
}

/// A YAML stream of these documents (JSON is YAML).
fn stream(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| format!("---\n{d}\n"))
        .collect::<String>()
}

#[test]
fn renders_pass_the_real_api_servers_validation() {
    let api = ApiServer::start(ApiServerOptions {
        port: 0,
        build_script: Some(Path::new(ROOT).join("e2e/apiserver/build.sh")),
        ..ApiServerOptions::default()
    })
    .expect("start etcd and kube-apiserver");
    let dir = api.dir().to_owned();
    let apply = |what: &str, docs: &[Value], dry_run: bool| {
        let path = dir.join(format!("{what}.yaml"));
        std::fs::write(&path, stream(docs)).unwrap();
        let path = path.display().to_string();
        let mut args = vec!["apply", "-f", path.as_str()];
        if dry_run {
            args.push("--dry-run=server");
        }
        let out = api.kubectl(&args).unwrap();
        assert!(
            out.status.success(),
            "kubectl apply {what} ({}): {}{}",
            if dry_run { "server dry run" } else { "real" },
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    api.kubectl_ok(&["create", "namespace", NAMESPACE]).unwrap();

    // Default values: every object, validated by the server (and kubectl's schema validation of
    // the built-in kinds, which names unknown fields) without being stored.
    let default = docs(&render(&[]));
    let out = apply("default", &default, true);
    assert!(
        out.contains("daemonset.apps/ferrovip created (server dry run)"),
        "{out}"
    );

    // Every value on: the CRDs for real first, so that the initial pool and VirtualIP are
    // validated against them; the monitoring kinds need prometheus-operator's CRDs, which this
    // server does not have (their rendering is checked in the_daemonset_keeps_its_contract).
    let all = docs(&render(&["-f", ALL_ON]));
    apply("crds", &crds_of(&all), false);
    api.kubectl_ok(&[
        "wait",
        "--for=condition=established",
        "--timeout=30s",
        "crd/virtualips.ferrovip.io",
        "crd/loadbalancerpools.ferrovip.io",
    ])
    .unwrap();
    let served: Vec<Value> = all
        .into_iter()
        .filter(|d| d["apiVersion"] != "monitoring.coreos.com/v1")
        .collect();
    let out = apply("all-on", &served, true);
    for want in [
        "virtualip.ferrovip.io/web created (server dry run)",
        "loadbalancerpool.ferrovip.io/default created (server dry run)",
        "configmap/ferrovip-dashboard created (server dry run)",
        "job.batch/ferrovip-wait-for-crds created (server dry run)",
    ] {
        assert!(out.contains(want), "{want}: {out}");
    }

    // A bad spec in the initial objects is refused by the CRD's schema, naming the field.
    let bad = docs(&render(&[
        "-f",
        ALL_ON,
        "--set",
        "virtualIPs[0].spec.vrrp.advertisementInterval=fast",
    ]));
    let bad: Vec<Value> = bad
        .into_iter()
        .filter(|d| d["kind"] == "VirtualIP")
        .collect();
    let path = dir.join("bad.yaml");
    std::fs::write(&path, stream(&bad)).unwrap();
    let out = api
        .kubectl(&[
            "apply",
            "--dry-run=server",
            "-f",
            &path.display().to_string(),
        ])
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("spec.vrrp.advertisementInterval"),
        "{stderr}"
    );
}

/// `helm` against the test's API server.
fn helm_on(api: &ApiServer, args: &[&str]) -> Output {
    let kubeconfig = api.admin_kubeconfig().display().to_string();
    let mut all = args.to_vec();
    all.extend_from_slice(&["--kubeconfig", &kubeconfig]);
    run_helm(&all)
}

fn helm_on_ok(api: &ApiServer, args: &[&str]) -> String {
    helm_succeeded(args, helm_on(api, args))
}

fn names(api: &ApiServer, kind: &str) -> Vec<String> {
    api.kubectl_ok(&["get", kind, "-o", "jsonpath={.items[*].metadata.name}"])
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn install_upgrade_uninstall_keep_the_crds_and_the_users_objects() {
    // Helm's real install, upgrade and uninstall against kube-apiserver (no kubelet: the pods
    // are never scheduled; tests/e2e_cluster.rs runs them).
    let api = ApiServer::start(ApiServerOptions {
        port: 0,
        build_script: Some(Path::new(ROOT).join("e2e/apiserver/build.sh")),
        ..ApiServerOptions::default()
    })
    .expect("start etcd and kube-apiserver");
    let crds = || names(&api, "crd");
    let both = ["loadbalancerpools.ferrovip.io", "virtualips.ferrovip.io"];
    // All on, except the prometheus-operator kinds this server does not serve.
    let values = [
        "-f",
        ALL_ON,
        "--set",
        "metrics.serviceMonitor.enabled=false,metrics.podMonitor.enabled=false,metrics.prometheusRule.enabled=false",
    ];
    let install = |extra: &[&str]| {
        let mut args = vec![
            "install",
            RELEASE,
            CHART,
            "--namespace",
            NAMESPACE,
            "--create-namespace",
        ];
        args.extend_from_slice(&values);
        args.extend_from_slice(extra);
        helm_on_ok(&api, &args)
    };
    let upgrade = |extra: &[&str]| {
        let mut args = vec!["upgrade", RELEASE, CHART, "--namespace", NAMESPACE];
        args.extend_from_slice(&values);
        args.extend_from_slice(extra);
        helm_on_ok(&api, &args)
    };
    let jobs = || {
        api.kubectl_ok(&["get", "jobs", "-n", NAMESPACE, "-o", "name"])
            .unwrap()
    };
    // The Job's command, on this server: before the CRDs it fails naming what is missing.
    let wait_for_crds = |timeout: &str| {
        Command::new(env!("CARGO_BIN_EXE_ferrovip"))
            .args(["wait-for-crds", "--timeout", timeout])
            .env("KUBECONFIG", api.admin_kubeconfig())
            .output()
            .expect("run ferrovip wait-for-crds")
    };
    let out = wait_for_crds("1s");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not served yet: ferrovip.io/v1alpha1 in /apis"),
        "{stderr}"
    );
    // Without initial objects first: with them, a first install runs the wait-for-crds Job,
    // which needs a kubelet (tests/e2e_cluster.rs installs that way).
    let notes = install(&["--set", "virtualIPs=null,loadBalancerPools=null"]);
    assert!(
        notes.contains("kubectl -n ferrovip-system rollout status daemonset/ferrovip"),
        "{notes}"
    );
    assert_eq!(crds(), both);
    assert!(names(&api, "virtualips").is_empty());
    let out = wait_for_crds("30s");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("virtualips and loadbalancerpools served"),
    );
    // The initial objects, created by the post-upgrade hook; their kinds are served, so no
    // Job waits for the CRDs.
    upgrade(&[]);
    assert_eq!(names(&api, "virtualips"), ["web"]);
    assert_eq!(names(&api, "loadbalancerpools"), ["default"]);
    assert_eq!(jobs().trim(), "");
    let hold = |api: &ApiServer| {
        api.kubectl_ok(&[
            "get",
            "daemonset",
            "ferrovip",
            "-n",
            NAMESPACE,
            "-o",
            "jsonpath={.spec.template.spec.containers[0].env[?(@.name==\"FERROVIP_RESTART_HOLD\")].value}",
        ])
        .unwrap()
    };
    assert_eq!(hold(&api), "30s");

    // The user changes the initial VirtualIP and adds one; an upgrade changes the DaemonSet
    // and leaves both alone (the hook creates only what is absent).
    api.kubectl_ok(&[
        "patch",
        "virtualip",
        "web",
        "--type=merge",
        "-p",
        r#"{"spec":{"virtualRouterId":52}}"#,
    ])
    .unwrap();
    let mine = api.dir().join("mine.yaml");
    std::fs::write(
        &mine,
        "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata: {name: mine}\n\
         spec: {addresses: [\"192.0.2.200/32\"], interface: eth0}\n",
    )
    .unwrap();
    api.kubectl_ok(&["apply", "-f", &mine.display().to_string()])
        .unwrap();
    upgrade(&["--set", "restartHold=20s"]);
    assert_eq!(hold(&api), "20s");
    let vrid = || {
        api.kubectl_ok(&[
            "get",
            "virtualip",
            "web",
            "-o",
            "jsonpath={.spec.virtualRouterId}",
        ])
        .unwrap()
    };
    assert_eq!(vrid(), "52", "the upgrade overwrote the user's VirtualIP");

    // Turning the CRDs off keeps them (resource policy keep).
    upgrade(&["--set", "crds.install=false"]);
    assert_eq!(crds(), both);

    // Uninstall: the agent's objects go, the CRDs and every VirtualIP and pool stay.
    helm_on_ok(&api, &["uninstall", RELEASE, "--namespace", NAMESPACE]);
    let left = api
        .kubectl(&["get", "daemonset", "ferrovip", "-n", NAMESPACE])
        .unwrap();
    assert!(
        !left.status.success(),
        "the DaemonSet outlived the uninstall"
    );
    assert_eq!(crds(), both);
    assert_eq!(names(&api, "virtualips"), ["mine", "web"]);
    assert_eq!(names(&api, "loadbalancerpools"), ["default"]);
    assert_eq!(vrid(), "52");

    // A new install under the same name adopts the kept CRDs and keeps the objects.
    install(&[]);
    assert_eq!(crds(), both);
    assert_eq!(names(&api, "virtualips"), ["mine", "web"]);
    assert_eq!(vrid(), "52");
    assert_eq!(jobs().trim(), "", "a Job for kinds that were served");
}
