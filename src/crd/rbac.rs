//! The RBAC rules of the agent and of the roles for people: the one source of `config/rbac`
//! and of the Helm chart's roles (`ferrovip rbacgen` writes both; CI fails on drift).
//!
//! Each role is a table of rules with the reason for each. [`rbac_files`] renders them as the
//! plain manifests of `config/rbac` (fixed names, namespace `ferrovip-system`) and as the rule
//! lists the chart's templates include (`charts/ferrovip/files/rbac/*.rules.yaml`; names there
//! are Helm expressions, the chart's templates pass them through `tpl`).

use std::fmt::Write as _;

/// One RBAC rule and why the agent (or a person) needs it.
pub struct Rule {
    /// Comment lines above the rule (empty: none).
    pub why: &'static [&'static str],
    pub api_groups: &'static [&'static str],
    pub resources: &'static [&'static str],
    /// Names the rule is narrowed to; [`DAEMONSET`] stands for the agent's DaemonSet.
    pub resource_names: &'static [&'static str],
    pub verbs: &'static [&'static str],
}

/// Placeholder in [`Rule::resource_names`] for the agent's own DaemonSet.
pub const DAEMONSET: &str = "$daemonset";

/// Whether a role is a ClusterRole or a Role in the agent's namespace.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Cluster,
    Namespace,
}

/// Who a role is for.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The agent's ServiceAccount (bound by a binding of the same name).
    Agent,
    /// People (bound by the cluster's admins; aggregated where labelled).
    People,
}

/// One ClusterRole or Role.
pub struct RoleDef {
    /// The role's file in `charts/ferrovip/files/rbac/` (`<key>.rules.yaml`).
    pub key: &'static str,
    /// Its name in `config/rbac`.
    pub config_name: &'static str,
    /// Its name in the chart: the chart's fullname followed by this.
    pub chart_suffix: &'static str,
    pub scope: Scope,
    pub holder: Holder,
    /// Comment lines above the role.
    pub about: &'static [&'static str],
    /// Extra labels (aggregation).
    pub labels: &'static [(&'static str, &'static str)],
    pub rules: &'static [Rule],
}

/// The agent's ServiceAccount, namespace and DaemonSet in `config/rbac`.
pub const CONFIG_SERVICE_ACCOUNT: &str = "ferrovip-agent";
pub const CONFIG_NAMESPACE: &str = "ferrovip-system";
pub const CONFIG_DAEMONSET: &str = "ferrovip-agent";

const READ: &[&str] = &["get", "list", "watch"];

/// Every role, in the order of their files.
pub const ROLES: &[RoleDef] = &[
    RoleDef {
        key: "agent",
        config_name: "ferrovip-agent",
        chart_suffix: "",
        scope: Scope::Cluster,
        holder: Holder::Agent,
        about: &["What the ferrovip agent (one pod per node) may do, and nothing more."],
        labels: &[],
        rules: &[
            Rule {
                why: &[
                    "Desired state: which addresses to elect a master for, on which nodes, for which backends.",
                ],
                api_groups: &["ferrovip.io"],
                resources: &["virtualips"],
                resource_names: &[],
                verbs: READ,
            },
            Rule {
                why: &[],
                api_groups: &[""],
                resources: &["nodes", "services"],
                resource_names: &[],
                verbs: READ,
            },
            Rule {
                why: &[
                    "Addresses for Services of type LoadBalancer, and the namespaces' labels that pools select.",
                ],
                api_groups: &["ferrovip.io"],
                resources: &["loadbalancerpools"],
                resource_names: &[],
                verbs: READ,
            },
            Rule {
                why: &[],
                api_groups: &[""],
                resources: &["namespaces"],
                resource_names: &[],
                verbs: READ,
            },
            Rule {
                why: &["Same group for v1beta1 (Kubernetes 1.20) and v1 (1.21 and later)."],
                api_groups: &["discovery.k8s.io"],
                resources: &["endpointslices"],
                resource_names: &[],
                verbs: READ,
            },
            Rule {
                why: &[
                    "Observed state: each agent server-side applies (a patch) its own entry of status.nodes.",
                    "No write on the VirtualIP itself: users own the spec.",
                ],
                api_groups: &["ferrovip.io"],
                resources: &["virtualips/status"],
                resource_names: &[],
                verbs: &["patch"],
            },
            Rule {
                why: &[
                    "The Service controller (whichever agent holds its Lease) writes the allocation record",
                    "(annotation `ferrovip.io/allocated`, a merge patch carrying the resourceVersion), masters",
                    "write `ferrovip.io/master`; no update, no create or delete: users own Services.",
                ],
                api_groups: &[""],
                resources: &["services"],
                resource_names: &[],
                verbs: &["patch"],
            },
            Rule {
                why: &[
                    "... and status.loadBalancer.ingress, and each pool's counters and conditions.",
                ],
                api_groups: &[""],
                resources: &["services/status"],
                resource_names: &[],
                verbs: &["patch"],
            },
            Rule {
                why: &[],
                api_groups: &["ferrovip.io"],
                resources: &["loadbalancerpools/status"],
                resource_names: &[],
                verbs: &["patch"],
            },
            Rule {
                why: &[
                    "Transitions and allocations as Events, each one created (rate-limited by the agent, never patched).",
                ],
                api_groups: &["events.k8s.io"],
                resources: &["events"],
                resource_names: &[],
                verbs: &["create"],
            },
        ],
    },
    RoleDef {
        key: "controller-lease",
        config_name: "ferrovip-controller-lease",
        chart_suffix: "-controller-lease",
        scope: Scope::Namespace,
        holder: Holder::Agent,
        about: &[
            "The Service controller's leader election: one Lease, `ferrovip-controller`, in the agent's",
            "own namespace (a Role, not a ClusterRole: no Lease elsewhere, e.g. kube-system's, is the",
            "agent's business). get to read it, create the first time, update to renew and take over",
            "(a compare-and-swap on its resourceVersion). Lease creation cannot be narrowed by name",
            "(RBAC cannot restrict create by resourceNames), so create is granted in the namespace.",
        ],
        labels: &[],
        rules: &[
            Rule {
                why: &[],
                api_groups: &["coordination.k8s.io"],
                resources: &["leases"],
                resource_names: &[],
                verbs: &["create"],
            },
            Rule {
                why: &[],
                api_groups: &["coordination.k8s.io"],
                resources: &["leases"],
                resource_names: &["ferrovip-controller"],
                verbs: &["get", "update"],
            },
        ],
    },
    RoleDef {
        key: "agent-namespace",
        config_name: "ferrovip-agent",
        chart_suffix: "",
        scope: Scope::Namespace,
        holder: Holder::Agent,
        about: &[
            "On SIGTERM the agent reads its own DaemonSet: gone or being deleted means the node is",
            "being uninstalled (release the VIPs at priority 0 and remove what it put in the kernel),",
            "present means a restart or a rolling update (hold the VIPs for --restart-hold). Only that",
            "one DaemonSet, only get.",
        ],
        labels: &[],
        rules: &[Rule {
            why: &[],
            api_groups: &["apps"],
            resources: &["daemonsets"],
            resource_names: &[DAEMONSET],
            verbs: &["get"],
        }],
    },
    RoleDef {
        key: "view",
        config_name: "ferrovip-view",
        chart_suffix: "-view",
        scope: Scope::Cluster,
        holder: Holder::People,
        about: &[
            "Roles for people, not for the agent. Writing a VirtualIP is cluster-admin power: it makes",
            "every eligible node put an address on a host interface (any address: a gateway's, another",
            "node's, the API server's), answer ARP/ND for it, program IPVS and nftables, and run health",
            "probes from the host network. So writes are never aggregated into the built-in roles.",
            "",
            "ferrovip-view joins the built-in `view` role (and through it `edit` and `admin`, which",
            "aggregate `view`): whoever may read the cluster may read VirtualIPs and their status.",
        ],
        labels: &[("rbac.authorization.k8s.io/aggregate-to-view", "\"true\"")],
        rules: &[Rule {
            why: &[],
            api_groups: &["ferrovip.io"],
            resources: &["virtualips", "virtualips/status"],
            resource_names: &[],
            verbs: READ,
        }],
    },
    RoleDef {
        key: "admin",
        config_name: "ferrovip-admin",
        chart_suffix: "-admin",
        scope: Scope::Cluster,
        holder: Holder::People,
        about: &[
            "ferrovip-admin is deliberately NOT aggregated into `edit` or `admin`: many clusters bind",
            "`edit` cluster-wide to developers, and a VirtualIP is cluster-scoped, so aggregation would",
            "quietly let them take over addresses on every node. Bind it explicitly (a",
            "ClusterRoleBinding) to the few who may run the cluster's addresses.",
        ],
        labels: &[],
        rules: &[
            Rule {
                why: &[],
                api_groups: &["ferrovip.io"],
                resources: &["virtualips"],
                resource_names: &[],
                verbs: &[
                    "get",
                    "list",
                    "watch",
                    "create",
                    "update",
                    "patch",
                    "delete",
                    "deletecollection",
                ],
            },
            Rule {
                why: &[],
                api_groups: &["ferrovip.io"],
                resources: &["virtualips/status"],
                resource_names: &[],
                verbs: READ,
            },
        ],
    },
];

const GENERATED: &str =
    "# Generated by `ferrovip rbacgen --write .` from src/crd/rbac.rs: edit the tables there.";

fn flow(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| format!("\"{s}\"")).collect();
    format!("[{}]", quoted.join(", "))
}

fn comment(out: &mut String, indent: &str, lines: &[&str]) {
    for line in lines {
        if line.is_empty() {
            let _ = writeln!(out, "{indent}#");
        } else {
            let _ = writeln!(out, "{indent}# {line}");
        }
    }
}

/// The rules list (`- apiGroups: ...` items at column 2), `daemonset` standing for
/// [`DAEMONSET`].
fn rules_yaml(role: &RoleDef, daemonset: &str) -> String {
    let mut out = String::new();
    for rule in role.rules {
        comment(&mut out, "  ", rule.why);
        let _ = writeln!(out, "  - apiGroups: {}", flow(rule.api_groups));
        let _ = writeln!(out, "    resources: {}", flow(rule.resources));
        if !rule.resource_names.is_empty() {
            let names: Vec<&str> = rule
                .resource_names
                .iter()
                .map(|n| if *n == DAEMONSET { daemonset } else { n })
                .collect();
            let _ = writeln!(out, "    resourceNames: {}", flow(&names));
        }
        let _ = writeln!(out, "    verbs: {}", flow(rule.verbs));
    }
    out
}

fn config_role(role: &RoleDef) -> String {
    let mut out = String::new();
    comment(&mut out, "", role.about);
    out.push_str("apiVersion: rbac.authorization.k8s.io/v1\n");
    let kind = match role.scope {
        Scope::Cluster => "ClusterRole",
        Scope::Namespace => "Role",
    };
    let _ = writeln!(out, "kind: {kind}\nmetadata:\n  name: {}", role.config_name);
    if role.scope == Scope::Namespace {
        let _ = writeln!(out, "  namespace: {CONFIG_NAMESPACE}");
    }
    out.push_str("  labels:\n    app.kubernetes.io/name: ferrovip\n");
    if role.holder == Holder::Agent {
        out.push_str("    app.kubernetes.io/component: agent\n");
    }
    for (k, v) in role.labels {
        let _ = writeln!(out, "    {k}: {v}");
    }
    out.push_str("rules:\n");
    out.push_str(&rules_yaml(role, CONFIG_DAEMONSET));
    if role.scope == Scope::Namespace && role.holder == Holder::Agent {
        let _ = write!(
            out,
            "---\n# Grants the Role `{name}` to the agent's ServiceAccount.\n\
             apiVersion: rbac.authorization.k8s.io/v1\nkind: RoleBinding\nmetadata:\n  \
             name: {name}\n  namespace: {CONFIG_NAMESPACE}\n  labels:\n    \
             app.kubernetes.io/name: ferrovip\n    app.kubernetes.io/component: agent\n\
             roleRef:\n  apiGroup: rbac.authorization.k8s.io\n  kind: Role\n  name: {name}\n\
             subjects:\n  - kind: ServiceAccount\n    name: {CONFIG_SERVICE_ACCOUNT}\n    \
             namespace: {CONFIG_NAMESPACE}\n",
            name = role.config_name
        );
    }
    out
}

/// The generated files, as (path relative to the repository's root, contents).
pub fn rbac_files() -> Vec<(String, String)> {
    let mut files = Vec::new();
    let config = [
        ("config/rbac/cluster_role.yaml", &["agent"][..]),
        (
            "config/rbac/role.yaml",
            &["controller-lease", "agent-namespace"][..],
        ),
        ("config/rbac/user_roles.yaml", &["view", "admin"][..]),
    ];
    for (path, keys) in config {
        let docs: Vec<String> = keys
            .iter()
            .filter_map(|k| ROLES.iter().find(|r| r.key == *k))
            .map(config_role)
            .collect();
        files.push((
            path.to_owned(),
            format!("{GENERATED}\n{}", docs.join("---\n")),
        ));
    }
    for role in ROLES {
        let mut out = format!("{GENERATED}\n");
        comment(&mut out, "", role.about);
        out.push_str(&rules_yaml(role, "{{ include \"ferrovip.fullname\" . }}"));
        files.push((
            format!("charts/ferrovip/files/rbac/{}.rules.yaml", role.key),
            out,
        ));
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_is_written_once_and_keys_are_unique() {
        let files = rbac_files();
        let mut keys: Vec<&str> = ROLES.iter().map(|r| r.key).collect();
        keys.sort_unstable();
        keys.dedup();
        assert_eq!(keys.len(), ROLES.len());
        let config: String = files
            .iter()
            .filter(|(p, _)| p.starts_with("config/"))
            .map(|(_, c)| c.as_str())
            .collect();
        for role in ROLES {
            let kind = match role.scope {
                Scope::Cluster => "ClusterRole",
                Scope::Namespace => "Role",
            };
            assert_eq!(
                config
                    .matches(&format!(
                        "kind: {kind}\nmetadata:\n  name: {}\n",
                        role.config_name
                    ))
                    .count(),
                1,
                "{}",
                role.key
            );
        }
        // The DaemonSet placeholder never reaches a file.
        assert!(files.iter().all(|(_, c)| !c.contains(DAEMONSET)));
        assert!(config.contains("resourceNames: [\"ferrovip-agent\"]"));
    }
}
