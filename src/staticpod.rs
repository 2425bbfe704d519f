//! `ferrovip static-pod`: the manifests of a control-plane VIP. A kubeadm cluster's API server
//! address cannot depend on the API server, so the agent that holds it runs in standalone
//! mode as a static pod (the kubelet starts it from /etc/kubernetes/manifests before any API
//! server exists) and reads its VirtualIP from a host directory (/etc/ferrovip), not from
//! the cluster. The pod runs as the chart's DaemonSet does: host network, NET_ADMIN and
//! NET_RAW only, read-only root filesystem; a privileged init container runs `ferrovip
//! node-setup` for the one sysctl the VIP's interface needs.

use std::time::Duration;

use serde_json::{Value, json};

/// The arguments of `ferrovip static-pod`.
#[derive(Debug, Clone, clap::Args)]
pub struct StaticPodArgs {
    /// The image holding the ferrovip binary at /usr/bin/ferrovip.
    #[arg(long, default_value = concat!("ferrovip/ferrovip:", env!("CARGO_PKG_VERSION")))]
    pub image: String,
    /// This node's name (as the kubelet registers it).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// The interface that carries the VIP (and the VRRP advertisements).
    #[arg(long)]
    pub interface: String,
    /// The VIP with its prefix length, e.g. 192.0.2.10/24: the address kubeadm's
    /// `controlPlaneEndpoint` names.
    #[arg(long)]
    pub address: String,
    /// The VRRP virtual router ID (1-255), unique on the network segment.
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=255))]
    pub vrid: u8,
    /// Advertise to these addresses (the other control-plane nodes) instead of the multicast
    /// group (repeatable; for networks without multicast).
    #[arg(long = "unicast-peer")]
    pub unicast_peers: Vec<String>,
    /// The VRRP advertisement interval.
    #[arg(long, default_value = "100ms")]
    pub advertisement_interval: String,
    /// The VirtualIP's name.
    #[arg(long, default_value = "control-plane")]
    pub name: String,
    /// The host directory the agent reads VirtualIP manifests from (mounted read-only at
    /// /etc/ferrovip in the pod).
    #[arg(long, default_value = "/etc/ferrovip")]
    pub manifests_dir: String,
    /// The agent's state directory on the host (tmpfs: /run). Not the chart DaemonSet's
    /// /run/ferrovip: an agent takes the addresses recorded there as its own, so two agents on
    /// one node need two directories.
    #[arg(long, default_value = "/run/ferrovip-cp")]
    pub state_dir: String,
    /// The agent's `--restart-hold` (a restart of the static pod keeps the VIP where it is).
    #[arg(long, default_value = "0s")]
    pub restart_hold: String,
    /// Port of the metrics and health endpoints (the kubelet probes them). Not the chart
    /// DaemonSet's 9646: both use the host network.
    #[arg(long, default_value_t = 9647)]
    pub metrics_port: u16,
    /// Print the VirtualIP manifest to put in the manifests directory instead of the pod.
    #[arg(long)]
    pub virtualip: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum StaticPodError {
    #[error("--address {0:?} is not an address with a prefix length (e.g. 192.0.2.10/24)")]
    Address(String),
    #[error("--unicast-peer {0:?} is not an IP address")]
    Peer(String),
    #[error("--{flag} {value:?}: {message}")]
    Duration {
        flag: &'static str,
        value: String,
        message: String,
    },
    #[error("cannot write YAML: {0}")]
    Yaml(String),
}

/// The YAML `ferrovip static-pod` prints: the pod, or with `--virtualip` the VirtualIP.
pub fn render(args: &StaticPodArgs) -> Result<String, StaticPodError> {
    let doc = if args.virtualip {
        virtual_ip(args)?
    } else {
        pod(args)?
    };
    serde_saphyr::to_string(&doc).map_err(|e| StaticPodError::Yaml(e.to_string()))
}

fn duration(flag: &'static str, value: &str) -> Result<Duration, StaticPodError> {
    crate::crd::parse_duration(value).map_err(|e| StaticPodError::Duration {
        flag,
        value: value.into(),
        message: e.to_string(),
    })
}

/// The VirtualIP for the manifests directory.
pub fn virtual_ip(args: &StaticPodArgs) -> Result<Value, StaticPodError> {
    args.address
        .parse::<ipnet::IpNet>()
        .map_err(|_| StaticPodError::Address(args.address.clone()))?;
    for peer in &args.unicast_peers {
        peer.parse::<std::net::IpAddr>()
            .map_err(|_| StaticPodError::Peer(peer.clone()))?;
    }
    duration("advertisement-interval", &args.advertisement_interval)?;
    let mut vrrp = json!({"advertisementInterval": args.advertisement_interval});
    if !args.unicast_peers.is_empty() {
        vrrp["unicastPeers"] = json!(args.unicast_peers);
    }
    Ok(json!({
        "apiVersion": "ferrovip.io/v1alpha1",
        "kind": "VirtualIP",
        "metadata": {"name": args.name},
        "spec": {
            "addresses": [args.address],
            "interface": args.interface,
            "virtualRouterId": args.vrid,
            "vrrp": vrrp,
        },
    }))
}

/// The static pod.
pub fn pod(args: &StaticPodArgs) -> Result<Value, StaticPodError> {
    // The same checks as the VirtualIP's, so that a pod is never printed for a VIP that
    // cannot be.
    virtual_ip(args)?;
    duration("restart-hold", &args.restart_hold)?;
    let labels = json!({
        "app.kubernetes.io/name": "ferrovip",
        "app.kubernetes.io/component": "control-plane-vip",
    });
    let probe = |path: &str| {
        json!({
            "httpGet": {"path": path, "port": args.metrics_port},
            "periodSeconds": 5,
            "failureThreshold": 3,
        })
    };
    Ok(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": "ferrovip",
            "namespace": "kube-system",
            "labels": labels,
        },
        "spec": {
            "hostNetwork": true,
            "priorityClassName": "system-node-critical",
            "terminationGracePeriodSeconds": 30,
            "initContainers": [{
                "name": "node-setup",
                "image": args.image,
                "command": ["/usr/bin/ferrovip", "node-setup"],
                "args": ["--interface", args.interface, "--state-dir", "/run/ferrovip"],
                "securityContext": {"privileged": true},
                "volumeMounts": [{"name": "state", "mountPath": "/run/ferrovip"}],
            }],
            "containers": [{
                "name": "ferrovip",
                "image": args.image,
                "command": ["/usr/bin/ferrovip", "agent"],
                "args": [
                    "--node-name", args.node_name,
                    "--manifests", "/etc/ferrovip",
                    "--state-dir", "/run/ferrovip",
                    "--dataplane", "none",
                    "--restart-hold", args.restart_hold,
                    "--metrics-addr", format!("0.0.0.0:{}", args.metrics_port),
                ],
                "env": [{"name": "FERROVIP_LOG_FORMAT", "value": "json"}],
                "securityContext": {
                    "privileged": false,
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
                },
                "livenessProbe": probe("/healthz"),
                "readinessProbe": probe("/readyz"),
                "resources": {
                    "requests": {"cpu": "50m", "memory": "32Mi"},
                    "limits": {"memory": "128Mi"},
                },
                "volumeMounts": [
                    {"name": "manifests", "mountPath": "/etc/ferrovip", "readOnly": true},
                    {"name": "state", "mountPath": "/run/ferrovip"},
                ],
            }],
            "volumes": [
                {"name": "manifests", "hostPath": {"path": args.manifests_dir, "type": "Directory"}},
                {"name": "state", "hostPath": {"path": args.state_dir, "type": "DirectoryOrCreate"}},
            ],
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use k8s_openapi::api::core::v1::Pod;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: StaticPodArgs,
    }

    fn args(extra: &[&str]) -> StaticPodArgs {
        let mut argv = vec![
            "static-pod",
            "--image",
            "localhost/ferrovip:test",
            "--node-name",
            "cp-1",
            "--interface",
            "eth0",
            "--address",
            "192.0.2.10/24",
            "--vrid",
            "42",
        ];
        argv.extend_from_slice(extra);
        Cli::try_parse_from(argv).expect("arguments").args
    }

    #[test]
    fn the_pod_is_yaml_of_a_least_privilege_host_network_agent_reading_the_host_directory() {
        let yaml = render(&args(&["--unicast-peer", "192.0.2.12"])).unwrap();
        let pod: Pod = serde_saphyr::from_str(&yaml).expect("a Pod");
        assert_eq!(pod.metadata.name.as_deref(), Some("ferrovip"));
        assert_eq!(pod.metadata.namespace.as_deref(), Some("kube-system"));
        let spec = pod.spec.expect("spec");
        assert_eq!(spec.host_network, Some(true));
        assert_eq!(
            spec.priority_class_name.as_deref(),
            Some("system-node-critical")
        );
        let agent = &spec.containers[0];
        assert_eq!(agent.image.as_deref(), Some("localhost/ferrovip:test"));
        assert_eq!(
            agent.command.as_deref(),
            Some(&["/usr/bin/ferrovip".to_string(), "agent".to_string()][..])
        );
        let argv = agent.args.clone().unwrap();
        let flag = |name: &str| {
            let i = argv.iter().position(|a| a == name).expect(name);
            argv[i + 1].clone()
        };
        assert_eq!(flag("--node-name"), "cp-1");
        assert_eq!(flag("--manifests"), "/etc/ferrovip");
        assert_eq!(flag("--state-dir"), "/run/ferrovip");
        let sc = agent.security_context.clone().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        let caps = sc.capabilities.unwrap();
        assert_eq!(caps.add.unwrap(), ["NET_ADMIN", "NET_RAW"]);
        assert_eq!(caps.drop.unwrap(), ["ALL"]);
        let volumes = spec.volumes.unwrap();
        let manifests = volumes.iter().find(|v| v.name == "manifests").unwrap();
        assert_eq!(
            manifests.host_path.as_ref().unwrap().path,
            "/etc/ferrovip",
            "{yaml}"
        );
        let state = volumes.iter().find(|v| v.name == "state").unwrap();
        assert_eq!(
            state.host_path.as_ref().unwrap().path,
            "/run/ferrovip-cp",
            "not the chart DaemonSet's state directory"
        );
        assert_eq!(
            flag("--metrics-addr"),
            "0.0.0.0:9647",
            "not the DaemonSet's port"
        );
        let mount = agent
            .volume_mounts
            .as_ref()
            .unwrap()
            .iter()
            .find(|m| m.name == "manifests")
            .unwrap();
        assert_eq!(mount.read_only, Some(true));
        let init = &spec.init_containers.unwrap()[0];
        assert_eq!(
            init.args.clone().unwrap(),
            ["--interface", "eth0", "--state-dir", "/run/ferrovip"]
        );
        assert_eq!(
            init.security_context.as_ref().unwrap().privileged,
            Some(true)
        );
        assert_eq!(
            agent
                .liveness_probe
                .as_ref()
                .unwrap()
                .http_get
                .as_ref()
                .unwrap()
                .path
                .as_deref(),
            Some("/healthz")
        );
    }

    #[test]
    fn the_virtualip_loads_as_the_standalone_agent_reads_it() {
        let yaml = render(&args(&[
            "--virtualip",
            "--unicast-peer",
            "192.0.2.12",
            "--unicast-peer",
            "192.0.2.13",
        ]))
        .unwrap();
        let mut out = crate::crd::manifest::Manifests::default();
        crate::crd::manifest::parse_into(std::path::Path::new("cp.yaml"), &yaml, &mut out);
        assert!(out.errors.is_empty(), "{:?}\n{yaml}", out.errors);
        let vip = &out.virtual_ips[0];
        assert_eq!(vip.metadata.name.as_deref(), Some("control-plane"));
        assert_eq!(vip.spec.addresses, ["192.0.2.10/24"]);
        assert_eq!(vip.spec.interface, "eth0");
        assert_eq!(vip.spec.virtual_router_id, Some(42));
        assert_eq!(
            vip.spec.vrrp.unicast_peers,
            crate::crd::UnicastPeers::List(vec!["192.0.2.12".into(), "192.0.2.13".into()])
        );
    }

    #[test]
    fn bad_input_names_the_flag() {
        let e = render(&args(&["--unicast-peer", "nope"])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--unicast-peer \"nope\" is not an IP address"
        );
        let mut a = args(&[]);
        a.address = "192.0.2.10".into();
        assert!(render(&a).unwrap_err().to_string().starts_with("--address"));
    }
}
