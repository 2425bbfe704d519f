//! The kernel settings the dataplane changes (`/proc/sys`), with the values found before,
//! recorded in the state directory (`<state dir>/sysctls`, one `path value` per line) so that
//! a restarted agent, or `ferrovip cleanup` on a node without IPVS, puts them back.
//!
//! Turning IPv6 forwarding on has a side effect the kernel does not announce: `accept_ra=1`
//! means "accept router advertisements unless forwarding", so every interface would stop
//! accepting them (SLAAC addresses and RA-learned default routes age out). Before forwarding
//! goes on, interfaces with `accept_ra=1` (and `default`, for interfaces created later) get
//! `accept_ra=2` ("accept even when forwarding"); they get 1 back once forwarding is put back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tracing::{debug, warn};

/// IPv6 forwarding for every interface.
pub const IPV6_FORWARDING: &str = "/proc/sys/net/ipv6/conf/all/forwarding";

/// Per-interface IPv6 settings (`<dir>/<interface>/accept_ra`).
const IPV6_CONF: &str = "/proc/sys/net/ipv6/conf";

/// The file in the state directory.
const FILE: &str = "sysctls";

/// The record `ferrovip node-setup` keeps (same format), apart from the agent's: the agent
/// puts back what it no longer needs, and must never put back what node-setup set for it.
pub const NODE_SETUP_FILE: &str = "sysctls-node-setup";

/// Every sysctl record in the state directory (`ferrovip cleanup` restores them all).
pub const RECORD_FILES: &[&str] = &[FILE, NODE_SETUP_FILE];

/// What to do when a sysctl cannot be written, for the error messages.
pub const READ_ONLY_HINT: &str = "/proc/sys is read-only in an unprivileged container: run `ferrovip node-setup` (the chart's init container) with the same flags, or set it on the host";

/// Whether the record at `path` holds no entry (or cannot be read).
pub fn record_is_empty(path: &Path) -> bool {
    std::fs::read_to_string(path).map_or(true, |t| t.trim().is_empty())
}

/// Sysctls set by the dataplane, and what they were before.
#[derive(Debug)]
pub struct Sysctls {
    file: PathBuf,
    /// Path → the value before we changed it: the fixed paths the dataplane sets, and the
    /// `accept_ra` of interfaces while IPv6 forwards.
    saved: BTreeMap<String, String>,
    /// Paths whose restore failed (warned once).
    unrestorable: std::collections::BTreeSet<String>,
}

impl Sysctls {
    /// What an earlier run recorded in `state_dir`, for the paths in `known` and the
    /// interfaces' `accept_ra` (anything else in the file is ignored, never written).
    pub fn load(state_dir: &Path, known: &[&str]) -> Sysctls {
        Sysctls::load_file(state_dir, FILE, |p| known.contains(&p))
    }

    /// [`Sysctls::load`] from another record file of the state directory, taking the paths
    /// `accept` accepts (and interfaces' `accept_ra`).
    pub fn load_file(state_dir: &Path, file: &str, accept: impl Fn(&str) -> bool) -> Sysctls {
        let file = state_dir.join(file);
        let saved = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (p, v) = l.split_once(' ')?;
                (accept(p) || is_accept_ra(p)).then(|| (p.to_string(), v.to_string()))
            })
            .collect();
        Sysctls {
            file,
            saved,
            unrestorable: Default::default(),
        }
    }

    /// Whether `path` is set by us now.
    pub fn is_set(&self, path: &str) -> bool {
        self.saved.contains_key(path)
    }

    /// What is recorded to be put back: (path, value before).
    pub fn recorded(&self) -> Vec<(String, String)> {
        self.saved
            .iter()
            .map(|(p, v)| (p.clone(), v.clone()))
            .collect()
    }

    /// Sets the sysctls in `wanted` (remembering the values found, on disk too) and puts back
    /// the others we changed. `set(&[])` puts everything back. A sysctl that already has the
    /// wanted value is neither written nor recorded (it is not ours: `ferrovip node-setup` or
    /// the host set it), so an agent whose `/proc/sys` is read-only works on a prepared host.
    /// An error means a wanted value could not be set. A value that cannot be put back is
    /// warned about once and stays recorded (see [`Sysctls::recorded`]), for a `ferrovip
    /// cleanup` that can write.
    pub fn set(&mut self, wanted: &[(&str, &str)]) -> Result<(), String> {
        let before = self.saved.clone();
        let result = self.converge(wanted);
        if self.saved != before {
            self.record();
        }
        result
    }

    fn converge(&mut self, wanted: &[(&str, &str)]) -> Result<(), String> {
        for (path, value) in wanted {
            if self.saved.contains_key(*path) {
                continue;
            }
            let found =
                std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
            if found.trim() == *value {
                continue;
            }
            if *path == IPV6_FORWARDING {
                self.keep_slaac();
            }
            std::fs::write(path, value)
                .map_err(|e| format!("cannot set {path} to {value}: {e}; {READ_ONLY_HINT}"))?;
            self.saved
                .insert(path.to_string(), found.trim().to_string());
        }
        let stale: Vec<String> = self
            .saved
            .keys()
            .filter(|p| !is_accept_ra(p) && !wanted.iter().any(|(w, _)| w == p))
            .cloned()
            .collect();
        for path in stale {
            self.restore(&path);
        }
        // Router advertisements as before, once IPv6 forwarding is back off.
        if !self.saved.contains_key(IPV6_FORWARDING) {
            let ra: Vec<String> = self
                .saved
                .keys()
                .filter(|p| is_accept_ra(p))
                .cloned()
                .collect();
            for path in ra {
                self.restore(&path);
            }
        }
        // What could not be put back stays recorded (warned once in `restore`): it never
        // stops the caller from converging the rest.
        Ok(())
    }

    /// Puts `path` back; on failure keeps it recorded (and warns once).
    fn restore(&mut self, path: &str) {
        let Some(before) = self.saved.get(path).cloned() else {
            return;
        };
        // An interface's settings go with the interface.
        let gone = is_accept_ra(path) && !Path::new(path).exists();
        let current = std::fs::read_to_string(path).ok();
        if gone || current.as_deref().map(str::trim) == Some(before.as_str()) {
            self.saved.remove(path);
            return;
        }
        match std::fs::write(path, &before) {
            Ok(()) => {
                self.saved.remove(path);
            }
            Err(e) => {
                if self.unrestorable.insert(path.to_string()) {
                    warn!(path, error = %e, "cannot restore a sysctl (kept in the record); {READ_ONLY_HINT}");
                }
            }
        }
    }

    /// Where `accept_ra` is 1 (and on `default`): records 1, first on disk, then sets 2.
    fn keep_slaac(&mut self) {
        let Ok(dirs) = std::fs::read_dir(IPV6_CONF) else {
            return;
        };
        let mut found = Vec::new();
        for dir in dirs.flatten() {
            let Some(path) = dir.path().join("accept_ra").to_str().map(str::to_string) else {
                continue;
            };
            if !is_accept_ra(&path) || self.saved.contains_key(&path) {
                continue;
            }
            if std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1") {
                found.push(path);
            }
        }
        if found.is_empty() {
            return;
        }
        for path in &found {
            self.saved.insert(path.clone(), "1".to_string());
        }
        self.record();
        for path in found {
            match std::fs::write(&path, "2") {
                Ok(()) => debug!(
                    path,
                    "accept_ra=2: router advertisements still accepted while forwarding"
                ),
                Err(e) => {
                    warn!(path, error = %e, "cannot keep accepting router advertisements; SLAAC stops on this interface while IPv6 forwards");
                    self.saved.remove(&path);
                }
            }
        }
    }

    fn record(&self) {
        if self.saved.is_empty() {
            // Nothing to put back: no record (an uninstall leaves none behind).
            match std::fs::remove_file(&self.file) {
                Ok(()) => return,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(_) => {}
            }
        }
        let text: String = self
            .saved
            .iter()
            .map(|(p, v)| format!("{p} {v}\n"))
            .collect();
        if let Err(e) = write_atomically(&self.file, &text) {
            warn!(path = %self.file.display(), error = %e, "cannot record the sysctls to restore");
        }
    }
}

/// Whether `path` is a network sysctl (`/proc/sys/net/...`, no `..`): what a node-setup
/// record may name.
pub fn is_net_sysctl(path: &str) -> bool {
    path.strip_prefix("/proc/sys/net/").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .split('/')
                .all(|c| !c.is_empty() && c != "." && c != "..")
    })
}

/// Whether `path` is one interface's `accept_ra` (`all` is not a setting the kernel uses for
/// it; `default` is, for interfaces created later).
fn is_accept_ra(path: &str) -> bool {
    path.strip_prefix(IPV6_CONF)
        .and_then(|rest| rest.strip_prefix('/'))
        .and_then(|rest| rest.strip_suffix("/accept_ra"))
        .is_some_and(|name| {
            !name.is_empty() && !name.contains('/') && name != "." && name != ".." && name != "all"
        })
}

/// Written aside and renamed, so a crash never leaves half a file.
pub(crate) fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_interface_accept_ra_paths_are_taken_from_the_file() {
        assert!(is_accept_ra("/proc/sys/net/ipv6/conf/eth0/accept_ra"));
        assert!(is_accept_ra("/proc/sys/net/ipv6/conf/default/accept_ra"));
        for not in [
            "/proc/sys/net/ipv6/conf/all/accept_ra",
            "/proc/sys/net/ipv6/conf/../accept_ra",
            "/proc/sys/net/ipv6/conf/a/b/accept_ra",
            "/proc/sys/net/ipv6/conf//accept_ra",
            "/proc/sys/net/ipv6/conf/eth0/forwarding",
            "/etc/passwd",
        ] {
            assert!(!is_accept_ra(not), "{not}");
        }
        let dir = std::env::temp_dir().join(format!("fv-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join(FILE),
            "/proc/sys/net/ipv4/ip_forward 0\n/proc/sys/net/ipv6/conf/eth0/accept_ra 1\n/etc/shadow x\n/proc/sys/kernel/panic 0\n",
        )
        .unwrap();
        let s = Sysctls::load(&dir, &["/proc/sys/net/ipv4/ip_forward"]);
        assert_eq!(
            s.recorded(),
            [
                ("/proc/sys/net/ipv4/ip_forward".to_string(), "0".to_string()),
                (
                    "/proc/sys/net/ipv6/conf/eth0/accept_ra".to_string(),
                    "1".to_string()
                )
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
