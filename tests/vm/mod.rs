//! The runner of VM test binaries (harness = false): on the host it boots the VM image with
//! this very binary and the agent inside and reruns itself there; in the guest it runs the
//! cases one by one and prints PASS/FAIL with timings.
//!
//! A VM test binary is `mod vm;` plus a case table:
//! ```ignore
//! const CASES: &[vm::Case] = &[("ipvsadm_smoke", ipvsadm_smoke)];
//! fn main() -> std::process::ExitCode { vm::main(CASES) }
//! ```
//! Arguments select cases by substring (`cargo test --test vm_ipvs -- nat`); `--list` lists
//! them; other flags (cargo's `--test-threads=1`, ...) are ignored.
//!
//! Cases that need the Kubernetes API server are named in a [`Kube`] given to
//! [`main_with_kube`]: when one of them is selected, the host starts a real kube-apiserver
//! (v1.20) in a [`VmNetwork`] with the CRDs and the agents' RBAC installed, boots the guest on
//! that network, and hands it kubeconfigs ([`cluster`] is the guest's side).

#![allow(dead_code)]

pub mod cluster;

use std::error::Error;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferrovip_e2e::vm::{GUEST_BIN_DIR, UPLINK_HOST, VmImage, VmNetwork, VmRun, in_guest};
use ferrovip_e2e::{AGENT_GROUP, ApiServer, ApiServerOptions};

/// What a case returns: any error, or a message (`Err("...".into())`).
pub type CaseError = Box<dyn Error + Send + Sync>;
pub type CaseResult = Result<(), CaseError>;
pub type Case = (&'static str, fn() -> CaseResult);

/// Where the agent binary is in the guest; cases read it from this variable.
pub const AGENT_ENV: &str = "FERROVIP_AGENT";
/// The case filter, handed from the host run to the guest run.
const FILTER_ENV: &str = "FERROVIP_VM_CASES";
/// The whole VM run, boot included, on the TCG emulator.
const VM_TIMEOUT: Duration = Duration::from_secs(900);

/// The agent's path inside the guest.
pub fn agent() -> String {
    std::env::var(AGENT_ENV).unwrap_or_else(|_| format!("{GUEST_BIN_DIR}/ferrovip"))
}

/// Fails the case with `message` unless `condition` holds.
pub fn ensure(condition: bool, message: impl FnOnce() -> String) -> CaseResult {
    if condition {
        Ok(())
    } else {
        Err(message().into())
    }
}

/// The cases that need the API server, and the node identities they run agents as.
pub struct Kube {
    /// Case names; the host starts the API server only when one of them is selected.
    pub cases: &'static [&'static str],
    /// Nodes to make identities for (`ferrovip:<node>` in the agents' group): the guest
    /// finds each one's kubeconfig at [`cluster::node_kubeconfig`].
    pub nodes: &'static [&'static str],
}

const NO_KUBE: Kube = Kube {
    cases: &[],
    nodes: &[],
};

pub fn main(cases: &[Case]) -> ExitCode {
    main_with_kube(cases, &NO_KUBE)
}

pub fn main_with_kube(cases: &[Case], kube: &Kube) -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}: test");
        }
        return ExitCode::SUCCESS;
    }
    if in_guest() {
        let filters: Vec<String> = std::env::var(FILTER_ENV)
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        return run_guest(cases, &filters);
    }
    let filters: Vec<String> = args.into_iter().filter(|a| !a.starts_with('-')).collect();
    let wants_kube = cases
        .iter()
        .any(|(name, _)| selected(name, &filters) && kube.cases.contains(name));
    run_host(&filters, wants_kube.then_some(kube))
}

fn selected(name: &str, filters: &[String]) -> bool {
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// The guest's connection-tracking table, as on a director of a few GiB (the kernel sizes it
/// from memory: 8,192 entries in this 1 GiB guest). Each connection through IPVS (with
/// `conntrack=1`) holds an entry for 2 minutes after it closes; a traffic loop makes hundreds a
/// second, and once a namespace's table is full the kernel drops every new connection's first
/// packet there, a scrape of the agent's metrics on loopback included (seen in CI: the scrape
/// timed out after 127 s of SYN retries).
const CONNTRACK_MAX: &str = "262144";

fn run_guest(cases: &[Case], filters: &[String]) -> ExitCode {
    let limit = "/proc/sys/net/netfilter/nf_conntrack_max";
    if let Err(e) = std::fs::write(limit, CONNTRACK_MAX) {
        println!("guest: cannot raise {limit} to {CONNTRACK_MAX}: {e}");
        return ExitCode::FAILURE;
    }
    let (mut passed, mut failed) = (0, 0);
    for (name, case) in cases.iter().filter(|(name, _)| selected(name, filters)) {
        println!("---- {name}");
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(case);
        let took = started.elapsed();
        match outcome {
            Ok(Ok(())) => {
                passed += 1;
                println!("PASS {name} ({took:.2?})");
            }
            Ok(Err(error)) => {
                failed += 1;
                let mut message = error.to_string();
                let mut cause = error.source();
                while let Some(inner) = cause {
                    message.push_str(&format!(": {inner}"));
                    cause = inner.source();
                }
                println!("FAIL {name} ({took:.2?}): {message}");
            }
            Err(_) => {
                failed += 1;
                println!("FAIL {name} ({took:.2?}): panicked");
            }
        }
    }
    println!("guest: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_host(filters: &[String], kube: Option<&Kube>) -> ExitCode {
    let started = Instant::now();
    let outcome = boot(filters, kube);
    let total = started.elapsed();
    match outcome {
        Ok(output) => {
            let summary = output
                .console
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("guest: "))
                .unwrap_or("0 passed, 1 failed")
                .to_owned();
            println!(
                "vm: kernel ready after {}, qemu ran {:.2?}, whole test {total:.2?}, guest exit code {}",
                output
                    .ready_after
                    .map_or("(never)".to_owned(), |d| format!("{d:.2?}")),
                output.elapsed,
                output.exit_code
            );
            println!("{summary}");
            if output.success() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("vm: {error}");
            println!("0 passed, 1 failed");
            ExitCode::FAILURE
        }
    }
}

/// The API server on a VM network, ready for agents: CRDs, RBAC bound to the node identities.
struct HostCluster {
    // Field order is drop order: the server stops before its namespace goes.
    api: ApiServer,
    network: VmNetwork,
}

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
/// The agent's ClusterRole in config/rbac.
const AGENT_ROLE: &str = "ferrovip-agent";
/// The agents' namespace in config/rbac (Roles there are bound to the node identities too).
const AGENT_NAMESPACE: &str = "ferrovip-system";

impl HostCluster {
    fn start(kube: &Kube) -> Result<HostCluster, Box<dyn Error>> {
        let started = Instant::now();
        let network = VmNetwork::create()?;
        let api = ApiServer::start(ApiServerOptions {
            netns: Some(network.netns().to_owned()),
            bind: UPLINK_HOST.into(),
            node_users: kube.nodes.iter().map(|n| n.to_string()).collect(),
            build_script: Some(BUILD_SCRIPT.into()),
            ..ApiServerOptions::default()
        })?;
        api.kubectl_ok(&["apply", "-f", CRDS])?;
        api.kubectl_ok(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/virtualips.ferrovip.io",
            "crd/loadbalancerpools.ferrovip.io",
        ])?;
        api.kubectl_ok(&["apply", "-f", RBAC])?;
        api.bind_agent_group(AGENT_ROLE)?;
        // The agents' Roles in their namespace (the Service controller's Lease), bound to the
        // node identities as config/rbac binds them to the ServiceAccount.
        let roles = api.kubectl_ok(&[
            "get",
            "roles",
            "-n",
            AGENT_NAMESPACE,
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ])?;
        for role in roles.split_whitespace() {
            let binding = serde_json::json!({
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": {"name": format!("{AGENT_GROUP}-{role}"), "namespace": AGENT_NAMESPACE},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group",
                              "name": AGENT_GROUP}],
            });
            let path = api.dir().join(format!("binding-role-{role}.json"));
            std::fs::write(&path, binding.to_string())?;
            api.kubectl_ok(&["apply", "-f", &path.display().to_string()])?;
        }
        eprintln!(
            "vm: API server {} in {} ready with CRDs and RBAC after {:.2?}",
            api.url(),
            network.netns(),
            started.elapsed()
        );
        Ok(HostCluster { api, network })
    }

    /// A kubeconfig for the guest: the CA where [`cluster::CA`] puts it.
    fn guest_kubeconfig(&self, host: &Path) -> Result<String, Box<dyn Error>> {
        let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(host)?)?;
        for c in config["clusters"].as_array_mut().into_iter().flatten() {
            c["cluster"]["certificate-authority"] = cluster::ca().into();
        }
        Ok(config.to_string())
    }
}

fn boot(
    filters: &[String],
    kube: Option<&Kube>,
) -> Result<ferrovip_e2e::vm::VmOutput, Box<dyn Error>> {
    let image = VmImage::locate()?;
    let host_cluster = kube.map(HostCluster::start).transpose()?;
    let me = std::env::current_exe()?;
    let name = me
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("test binary has no name")?
        .to_owned();
    let guest_me = format!("{GUEST_BIN_DIR}/{name}");
    let guest_agent = format!("{GUEST_BIN_DIR}/ferrovip");
    eprintln!(
        "vm: booting {} ({}) with {name}",
        image.dir().display(),
        image.kernel_version()
    );
    let mut run = VmRun::new(&image);
    if let (Some(host), Some(kube)) = (&host_cluster, kube) {
        run = run
            .network(&host.network)
            .file(&cluster::ca(), std::fs::read(host.api.ca_cert())?)
            .file(
                &cluster::admin_kubeconfig(),
                host.guest_kubeconfig(host.api.admin_kubeconfig())?,
            );
        for node in kube.nodes {
            run = run.file(
                &cluster::node_kubeconfig(node),
                host.guest_kubeconfig(host.api.node_kubeconfig(node))?,
            );
        }
    }
    let output = run
        .binary(&me, &guest_me)
        .binary(env!("CARGO_BIN_EXE_ferrovip"), &guest_agent)
        .env(AGENT_ENV, &guest_agent)
        .env(FILTER_ENV, &filters.join(" "))
        .env("RUST_BACKTRACE", "1")
        .timeout(VM_TIMEOUT)
        .echo_console(true)
        .run(&guest_me);
    if let (Some(host), Err(_)) = (&host_cluster, &output) {
        eprintln!(
            "---- kube-apiserver:\n{}",
            ferrovip::lab::log_tail(&host.api.apiserver_log(), 15)
        );
    }
    Ok(output?)
}
