//! `ferrovip node-setup`: sets, once and with privilege (the chart's init container), exactly
//! the sysctls the agent would otherwise set itself for the features the flags name, so that
//! the agent runs with a read-only `/proc/sys` (an unprivileged container's). The values found
//! before are recorded in the state directory (`sysctls-node-setup`, the format of
//! [`Sysctls`]), apart from the agent's own record, and `ferrovip cleanup` (or an uninstalling
//! agent, where it can write) puts them back. Idempotent: a sysctl already at the wanted
//! value is neither written nor recorded; one set by an earlier run keeps the value recorded
//! then; one an earlier run set and the flags no longer name is put back.
//!
//! What the agent sets, and therefore what this sets:
//! - `--ipvs`: `net.ipv4.vs.expire_nodest_conn=1` and `net.ipv4.vs.expire_quiescent_template=1`
//!   (while the node has virtual services), `net.ipv4.vs.conntrack=1` and
//!   `net.ipv4.ip_forward=1` (while a service masquerades: the NAT return path). The IPVS
//!   module is loaded first (the kernel loads it when its netlink family is asked for), since
//!   its sysctls exist only then.
//! - `--ipv6-forwarding`: `net.ipv6.conf.all.forwarding=1` (while an IPv6 service
//!   masquerades), after `accept_ra=2` on interfaces with `accept_ra=1` (see
//!   [`crate::dataplane::sysctl`]).
//! - `--interface NAME`: `net.ipv4.conf.NAME.promote_secondaries=1` (before the agent adds an
//!   IPv4 VIP, so that removing a primary address never takes the VIP with it); not needed
//!   where `net.ipv4.conf.all.promote_secondaries` is 1 already.
//! - `--promote-secondaries`: `net.ipv4.conf.all.promote_secondaries=1`, which the kernel ORs
//!   with every interface's own (most distributions set it already): for a DaemonSet that
//!   cannot know which interfaces VirtualIPs will name.

use std::path::{Path, PathBuf};

use super::ipvs::{NAT_SYSCTLS, NAT6_FORWARDING, SERVICE_SYSCTLS};
use super::sysctl::{NODE_SETUP_FILE, Sysctls, is_net_sysctl};

/// What `ferrovip node-setup` is asked for.
#[derive(Debug, Clone, Default)]
pub struct NodeSetup {
    pub state_dir: PathBuf,
    pub ipvs: bool,
    pub ipv6_forwarding: bool,
    pub interfaces: Vec<String>,
    pub promote_secondaries: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("--interface {0:?} is not an interface name")]
    InterfaceName(String),
    #[error("{0}")]
    Sysctl(String),
}

/// The sysctls `setup` wants, in order.
pub fn wanted(setup: &NodeSetup) -> Result<Vec<(String, String)>, SetupError> {
    let mut wanted: Vec<(String, String)> = Vec::new();
    if setup.ipvs {
        for (p, v) in SERVICE_SYSCTLS.iter().chain(NAT_SYSCTLS) {
            wanted.push((p.to_string(), v.to_string()));
        }
    }
    if setup.ipv6_forwarding {
        wanted.push((NAT6_FORWARDING.0.to_string(), NAT6_FORWARDING.1.to_string()));
    }
    if setup.promote_secondaries {
        wanted.push((ALL_PROMOTE_SECONDARIES.into(), "1".into()));
    }
    for name in &setup.interfaces {
        let valid = !name.is_empty()
            && name.len() < 16
            && !name.contains(['/', ' ', '\0'])
            && name != "."
            && name != "..";
        if !valid {
            return Err(SetupError::InterfaceName(name.clone()));
        }
        let path = format!("/proc/sys/net/ipv4/conf/{name}/promote_secondaries");
        if !setup.promote_secondaries && !all_promote_secondaries() {
            wanted.push((path, "1".into()));
        }
    }
    Ok(wanted)
}

const ALL_PROMOTE_SECONDARIES: &str = "/proc/sys/net/ipv4/conf/all/promote_secondaries";

fn all_promote_secondaries() -> bool {
    std::fs::read_to_string(ALL_PROMOTE_SECONDARIES).is_ok_and(|v| v.trim() == "1")
}

/// Sets what `setup` names; returns one line per sysctl (what was changed, or found right).
pub fn run(setup: &NodeSetup) -> Result<Vec<String>, SetupError> {
    let mut lines = Vec::new();
    if setup.ipvs {
        // Asking for the IPVS family makes the kernel load the module, whose sysctls exist
        // only once it is loaded.
        match super::ipvs::client::IpvsClient::connect() {
            Ok(_) => {}
            Err(e) => lines.push(format!("ipvs: {e}")),
        }
    }
    let wanted = wanted(setup)?;
    let before: Vec<Option<String>> = wanted.iter().map(|(p, _)| read(p)).collect();
    let mut sysctls = Sysctls::load_file(&setup.state_dir, NODE_SETUP_FILE, is_net_sysctl);
    let pairs: Vec<(&str, &str)> = wanted
        .iter()
        .filter(|(p, _)| !(setup.ipvs && p.contains("/vs/") && !Path::new(p).exists()))
        .map(|(p, v)| (p.as_str(), v.as_str()))
        .collect();
    let recorded_before = sysctls.recorded();
    let result = sysctls.set(&pairs);
    for ((path, value), found) in wanted.iter().zip(before) {
        let now = read(path);
        lines.push(match (found, now) {
            (None, _) => format!("{path}: not present (module not loaded?), not set"),
            (Some(f), Some(n)) if f == *value && n == *value => {
                format!("{path} = {value} (already)")
            }
            (Some(f), Some(n)) if n == *value => format!("{path} = {value} (was {f})"),
            (_, n) => format!(
                "{path}: not set to {value} (now {})",
                n.unwrap_or_else(|| "unreadable".into())
            ),
        });
    }
    // What an earlier run set and these flags no longer name.
    for (path, value) in recorded_before {
        if !wanted.iter().any(|(p, _)| *p == path) && !sysctls.is_set(&path) {
            lines.push(format!("{path} restored to {value}"));
        }
    }
    result.map_err(SetupError::Sysctl)?;
    Ok(lines)
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|v| v.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_name_the_sysctls_the_agent_would_set() {
        let setup = NodeSetup {
            ipvs: true,
            ipv6_forwarding: true,
            promote_secondaries: true,
            interfaces: vec!["eth0".into()],
            ..NodeSetup::default()
        };
        let paths: Vec<String> = wanted(&setup)
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            paths,
            [
                "/proc/sys/net/ipv4/vs/expire_nodest_conn",
                "/proc/sys/net/ipv4/vs/expire_quiescent_template",
                "/proc/sys/net/ipv4/vs/conntrack",
                "/proc/sys/net/ipv4/ip_forward",
                "/proc/sys/net/ipv6/conf/all/forwarding",
                // `all` covers eth0: its own is not set.
                "/proc/sys/net/ipv4/conf/all/promote_secondaries",
            ]
        );
        assert!(wanted(&NodeSetup::default()).unwrap().is_empty());
        for bad in ["../x", "a/b", "", "averyveryverylongname"] {
            let setup = NodeSetup {
                interfaces: vec![bad.into()],
                ..NodeSetup::default()
            };
            assert!(
                matches!(wanted(&setup), Err(SetupError::InterfaceName(_))),
                "{bad}"
            );
        }
        assert!(is_net_sysctl(
            "/proc/sys/net/ipv4/conf/eth0/promote_secondaries"
        ));
        assert!(!is_net_sysctl("/proc/sys/net/../kernel/panic"));
        assert!(!is_net_sysctl("/proc/sys/kernel/panic"));
    }
}
