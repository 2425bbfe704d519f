//! Link carrier from sysfs: one small file read, cheap enough to poll with the checks.
//!
//! sysfs shows the interfaces of the network namespace it was mounted in (the agent runs in
//! the host's), not that of the calling thread.

use std::io;
use std::path::Path;

const SYS_CLASS_NET: &str = "/sys/class/net";

/// Linux interface names hold at most 15 bytes (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;

/// Whether `ifname` has carrier: `Some(false)` when the cable is out, the peer is down or the
/// interface itself is down; `None` when there is no such interface or its state is unknown
/// (`operstate` "unknown", as on some virtual interfaces that do not report carrier).
pub fn carrier_up(ifname: &str) -> Option<bool> {
    carrier_in(Path::new(SYS_CLASS_NET), ifname)
}

fn carrier_in(sys_class_net: &Path, ifname: &str) -> Option<bool> {
    if !is_interface_name(ifname) {
        return None;
    }
    let dir = sys_class_net.join(ifname);
    match std::fs::read_to_string(dir.join("carrier")) {
        Ok(value) => match value.trim() {
            "1" => Some(true),
            "0" => Some(false),
            _ => operstate_up(&dir),
        },
        // The kernel refuses to report carrier for an administratively down interface.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Some(false),
        Err(e) if e.kind() == io::ErrorKind::NotFound && !dir.exists() => None,
        Err(_) => operstate_up(&dir),
    }
}

fn operstate_up(dir: &Path) -> Option<bool> {
    let state = std::fs::read_to_string(dir.join("operstate")).ok()?;
    match state.trim() {
        "up" => Some(true),
        "down" | "lowerlayerdown" | "notpresent" | "dormant" => Some(false),
        _ => None,
    }
}

/// Names go into a path: refuse anything that could leave `/sys/class/net/<name>`.
fn is_interface_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_IFNAME_LEN
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b.is_ascii_whitespace() || b == 0)
}

#[cfg(test)]
mod tests {
    use std::fs;
    use std::path::PathBuf;
    use std::process::Command;
    use std::time::{Duration, Instant};

    use super::*;

    /// A fake `/sys/class/net` in a temporary directory, removed on drop.
    struct FakeSysfs(PathBuf);

    impl FakeSysfs {
        fn new(tag: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("ferrovip-health-{tag}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            FakeSysfs(dir)
        }

        fn interface(&self, name: &str, files: &[(&str, &str)]) {
            let dir = self.0.join(name);
            fs::create_dir_all(&dir).unwrap();
            for (file, content) in files {
                fs::write(dir.join(file), content).unwrap();
            }
        }
    }

    impl Drop for FakeSysfs {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn carrier_file_decides_and_operstate_is_the_fallback() {
        let sys = FakeSysfs::new("carrier");
        sys.interface("up0", &[("carrier", "1\n"), ("operstate", "up\n")]);
        sys.interface("down0", &[("carrier", "0\n"), ("operstate", "down\n")]);
        sys.interface(
            "odd0",
            &[("carrier", "x\n"), ("operstate", "lowerlayerdown\n")],
        );
        sys.interface("nocarrier", &[("operstate", "up\n")]);
        sys.interface("unknown0", &[("operstate", "unknown\n")]);
        let cases = [
            ("up0", Some(true)),
            ("down0", Some(false)),
            ("odd0", Some(false)),
            ("nocarrier", Some(true)),
            ("unknown0", None),
            ("missing0", None),
        ];
        for (name, want) in cases {
            assert_eq!(carrier_in(&sys.0, name), want, "{name}");
        }
    }

    #[test]
    fn names_that_would_leave_the_directory_are_refused() {
        let sys = FakeSysfs::new("names");
        sys.interface("eth0", &[("carrier", "1\n")]);
        assert_eq!(carrier_in(&sys.0, "eth0"), Some(true));
        for name in [
            "",
            ".",
            "..",
            "../eth0",
            "eth0/..",
            "a b",
            "sixteen-chars-xx",
        ] {
            assert!(!is_interface_name(name), "{name:?}");
            assert_eq!(carrier_in(&sys.0, name), None, "{name:?}");
        }
    }

    #[test]
    fn loopback_has_carrier() {
        assert_eq!(carrier_up("lo"), Some(true));
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A veth pair: `host` in this namespace (sysfs shows it), `peer` in a fresh namespace.
    /// Deleting the namespace deletes the peer, and with it `host`.
    struct VethInNetns {
        netns: String,
        host: String,
    }

    impl VethInNetns {
        fn new() -> Self {
            let pid = std::process::id();
            let pair = VethInNetns {
                netns: format!("fvhealth-{pid}"),
                host: format!("hc{pid}a"),
            };
            ip(&["netns", "add", &pair.netns]);
            ip(&[
                "link",
                "add",
                &pair.host,
                "type",
                "veth",
                "peer",
                "name",
                "peer0",
                "netns",
                &pair.netns,
            ]);
            pair
        }

        fn peer(&self, updown: &str) {
            ip(&["-n", &self.netns, "link", "set", "peer0", updown]);
        }
    }

    impl Drop for VethInNetns {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.netns])
                .output();
            let _ = Command::new("ip")
                .args(["link", "del", &self.host])
                .output();
        }
    }

    fn wait_for_carrier(name: &str, want: Option<bool>) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while carrier_up(name) != want {
            assert!(
                Instant::now() < deadline,
                "{name}: carrier {:?}, want {want:?}",
                carrier_up(name)
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn netns_health_carrier_follows_the_veth_peer() {
        let veth = VethInNetns::new();
        // Administratively down: the kernel has no carrier to report.
        assert_eq!(carrier_up(&veth.host), Some(false));

        ip(&["link", "set", &veth.host, "up"]);
        veth.peer("up");
        wait_for_carrier(&veth.host, Some(true));

        veth.peer("down");
        wait_for_carrier(&veth.host, Some(false));

        veth.peer("up");
        wait_for_carrier(&veth.host, Some(true));

        ip(&["link", "set", &veth.host, "down"]);
        wait_for_carrier(&veth.host, Some(false));

        let host = veth.host.clone();
        drop(veth);
        assert_eq!(carrier_up(&host), None);
    }
}
