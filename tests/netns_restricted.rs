//! The agent as the chart's DaemonSet runs it: capabilities NET_ADMIN and NET_RAW only (the
//! bounding set, hence permitted and effective, of a root process; no_new_privs), the root
//! filesystem read-only, `/proc/sys` read-only (runc mounts it so for unprivileged
//! containers), and only the state directory writable (a host directory, as the chart's
//! hostPath). Standalone mode in a lab of network namespaces, with the real binary.
//!
//! A host that nobody prepared (`promote_secondaries` off on the VIP's interface): the agent
//! cannot add the VIP and says which sysctl and what to run. After `ferrovip node-setup
//! --interface eth0` (privileged, as the chart's init container): the VIP comes up on the
//! master and fails over; so does a `virtualMac` VIP, whose macvlan's settings the agent makes
//! over rtnetlink. `ferrovip cleanup` then puts the sysctl back from node-setup's record.
//!
//! Needs root (network and mount namespaces).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ferrovip::lab::{Lab, LabSpec, ProcId, log_tail};
use nix::sys::signal::Signal;

const AGENT: &str = env!("CARGO_BIN_EXE_ferrovip");
const VIP: &str = "192.0.2.100";

/// Runs the rest of its arguments in a new mount namespace where every mount but /proc, /dev
/// and the state directory (its first argument) is read-only, /proc/sys too, with only
/// CAP_NET_ADMIN and CAP_NET_RAW and no_new_privs: the chart's container.
const RESTRICTED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/restricted.sh");

const MANIFEST: &str = r#"apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: web
spec:
  addresses: ["192.0.2.100/24"]
  interface: eth0
  virtualRouterId: 51
  vrrp:
    advertisementInterval: 100ms
  priority:
    base: 100
    preferredNodes:
      - nodeName: node-a
        weight: 50
---
apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: vmac
spec:
  addresses: ["192.0.2.101/24"]
  interface: eth0
  virtualRouterId: 52
  vrrp:
    advertisementInterval: 100ms
    virtualMac: true
  priority:
    base: 100
    preferredNodes:
      - nodeName: node-a
        weight: 50
"#;

/// The virtual-MAC VIP: on a macvlan `fv4.<eth0 index>.52`, whose sysctls the agent cannot
/// prepare through /proc/sys (the link is made at run time) and sets over rtnetlink.
const VMAC_VIP: &str = "192.0.2.101";

struct Env {
    lab: Lab,
    script: PathBuf,
    manifest: PathBuf,
    agents: Vec<Option<ProcId>>,
    logs: Vec<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for id in self.agents.iter().flatten() {
            let _ = self.lab.kill(*id, Signal::SIGKILL);
            let _ = self.lab.wait(*id, Duration::from_secs(2));
        }
        if std::thread::panicking() {
            for log in &self.logs {
                eprintln!("---- {}:\n{}", log.display(), log_tail(log, 30));
            }
        }
    }
}

impl Env {
    fn new() -> Env {
        let _ = Lab::cleanup_stale();
        let lab = Lab::create(LabSpec {
            nodes: 2,
            ipv6: false,
            ..LabSpec::default()
        })
        .expect("build the lab (needs root)");
        let script = PathBuf::from(RESTRICTED);
        let manifest = lab.dir().join("web.yaml");
        std::fs::write(&manifest, MANIFEST).unwrap();
        for i in 0..2 {
            std::fs::create_dir_all(state_dir(&lab, i)).unwrap();
        }
        Env {
            lab,
            script,
            manifest,
            agents: vec![None, None],
            logs: Vec::new(),
        }
    }

    fn name(&self, i: usize) -> String {
        self.lab.node(i).name.clone()
    }

    /// The agent on node `i`, restricted.
    fn start(&mut self, i: usize, round: usize) {
        let name = self.name(i);
        let state = state_dir(&self.lab, i).display().to_string();
        let script = self.script.display().to_string();
        let manifest = self.manifest.display().to_string();
        let log = format!("{name}.{round}.log");
        let id = self
            .lab
            .spawn(
                i,
                &[
                    "sh",
                    &script,
                    &state,
                    "--",
                    AGENT,
                    "--log-format",
                    "json",
                    "agent",
                    "--node-name",
                    &name,
                    "--manifests",
                    &manifest,
                    "--state-dir",
                    &state,
                ],
                &log,
            )
            .expect("spawn the agent");
        self.logs.push(self.lab.dir().join(&log));
        self.agents[i] = Some(id);
    }

    fn stop(&mut self, i: usize, signal: Signal) {
        let id = self.agents[i].take().expect("agent");
        self.lab.kill(id, signal).unwrap();
        let status = self.lab.wait(id, Duration::from_secs(5)).unwrap();
        assert!(
            status.is_some(),
            "the agent on {} did not exit",
            self.name(i)
        );
    }

    fn log(&self, i: usize) -> String {
        let (_, path) = self
            .lab
            .proc_info(self.agents[i].expect("agent"))
            .expect("proc info");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    fn wait_log(&self, i: usize, what: &str, needle: &str, timeout: Duration) -> String {
        let started = Instant::now();
        loop {
            let log = self.log(i);
            if let Some(line) = log.lines().find(|l| l.contains(needle)) {
                return line.to_string();
            }
            assert!(
                started.elapsed() < timeout,
                "{} did not log {what} within {timeout:?}",
                self.name(i)
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn has(&self, i: usize) -> bool {
        self.lab
            .has_address(i, VIP.parse::<IpAddr>().unwrap())
            .unwrap()
    }

    /// The nodes holding `addr` on any interface.
    fn holders_anywhere(&self, addr: &str) -> Vec<usize> {
        (0..2)
            .filter(|i| {
                let out = self
                    .lab
                    .exec(*i, &["ip", "-4", "-o", "addr", "show"])
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).contains(&format!(" {addr}/"))
            })
            .collect()
    }

    fn wait_vmac_holders(&self, expected: &[usize], timeout: Duration) {
        let started = Instant::now();
        loop {
            let holders = self.holders_anywhere(VMAC_VIP);
            if holders == expected {
                return;
            }
            assert!(
                started.elapsed() < timeout,
                "{VMAC_VIP}: expected on {expected:?} within {timeout:?}, held by {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn wait_holders(&self, expected: &[usize], timeout: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let holders: Vec<usize> = (0..2).filter(|i| self.has(*i)).collect();
            if holders == expected {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < timeout,
                "{VIP}: expected on {expected:?} within {timeout:?}, held by {holders:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs `ferrovip args...` in node `i`, unrestricted (root with every capability).
    fn ferrovip(&self, i: usize, args: &[&str]) -> String {
        let mut argv = vec![AGENT];
        argv.extend_from_slice(args);
        let out = self.lab.exec(i, &argv).expect("run ferrovip");
        assert!(
            out.status.success(),
            "ferrovip {} on {}: {}",
            args.join(" "),
            self.name(i),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn sysctl(&self, i: usize, key: &str) -> String {
        let path = format!("/proc/sys/net/ipv4/conf/{key}/promote_secondaries");
        let out = self.lab.exec(i, &["cat", &path]).unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn set_sysctl(&self, i: usize, key: &str, value: &str) {
        let path = format!("/proc/sys/net/ipv4/conf/{key}/promote_secondaries");
        let out = self
            .lab
            .exec(i, &["sh", "-c", &format!("echo {value} > {path}")])
            .unwrap();
        assert!(out.status.success());
    }
}

fn state_dir(lab: &Lab, i: usize) -> PathBuf {
    lab.dir().join(format!("state-{}", lab.node(i).name))
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[test]
fn netns_restricted_agent_needs_node_setup_for_its_sysctls_and_nothing_else() {
    assert!(
        Command::new("setpriv").arg("--version").output().is_ok(),
        "setpriv (util-linux) is needed"
    );
    let mut env = Env::new();
    // A host nobody prepared: promote_secondaries off on the VIP's interface.
    for i in 0..2 {
        env.set_sysctl(i, "all", "0");
        env.set_sysctl(i, "eth0", "0");
    }

    // --- 1. Without node-setup: the master cannot add the VIP, and says what to do.
    env.start(0, 1);
    let line = env.wait_log(
        0,
        "the failed add",
        "promote_secondaries",
        Duration::from_secs(10),
    );
    eprintln!("without node-setup, node-a logs: {line}");
    assert!(
        line.contains("Read-only file system") && line.contains("ferrovip node-setup"),
        "the failure names neither the cause nor the remedy: {line}"
    );
    assert!(
        !env.has(0),
        "node-a holds the VIP without promote_secondaries"
    );
    assert_eq!(env.sysctl(0, "eth0"), "0");
    env.stop(0, Signal::SIGINT);

    // --- 2. node-setup (privileged, like the chart's init container): sets exactly the
    // sysctl its flags name (node-a: the interface's own; node-b: `all`, which the kernel ORs
    // with every interface's), records the value before, and is idempotent.
    for (i, flag, key) in [
        (0, ["--interface", "eth0"].as_slice(), "eth0"),
        (1, ["--promote-secondaries"].as_slice(), "all"),
    ] {
        let state = state_dir(&env.lab, i).display().to_string();
        let mut args = vec!["node-setup", "--state-dir", &state];
        args.extend_from_slice(flag);
        let path = format!("/proc/sys/net/ipv4/conf/{key}/promote_secondaries");
        let out = env.ferrovip(i, &args);
        assert_eq!(
            out.trim(),
            format!("{path} = 1 (was 0)"),
            "node-setup on {}",
            env.name(i)
        );
        let again = env.ferrovip(i, &args);
        assert_eq!(again.trim(), format!("{path} = 1 (already)"));
        let record =
            std::fs::read_to_string(state_dir(&env.lab, i).join("sysctls-node-setup")).unwrap();
        assert_eq!(record, format!("{path} 0\n"));
    }
    assert_eq!(
        env.sysctl(1, "eth0"),
        "0",
        "node-b's eth0 is covered by all"
    );

    // --- 3. Restricted agents after node-setup: node-a master, then failover to node-b.
    env.start(0, 2);
    env.start(1, 2);
    let took = env.wait_holders(&[0], Duration::from_secs(10));
    eprintln!("after node-setup: the VIP on node-a {took:?} after the start");
    env.wait_vmac_holders(&[0], Duration::from_secs(5));
    let links = env.lab.exec(0, &["ip", "-o", "link", "show"]).unwrap();
    let links = String::from_utf8_lossy(&links.stdout).into_owned();
    let vmac = links
        .lines()
        .find_map(|l| l.split(": ").nth(1).filter(|n| n.starts_with("fv4.")))
        .map(|n| n.split('@').next().unwrap().to_string())
        .unwrap_or_else(|| panic!("no virtual-MAC link on node-a: {links}"));
    assert!(links.contains("00:00:5e:00:01:34"), "{links}");
    // Set over rtnetlink, /proc/sys being read-only: the macvlan's, and the parent's.
    let ipv4 = |dev: &str, key: &str| format!("/proc/sys/net/ipv4/conf/{dev}/{key}");
    for (path, want) in [
        (ipv4(&vmac, "arp_ignore"), "1"),
        (ipv4(&vmac, "accept_local"), "1"),
        (ipv4(&vmac, "rp_filter"), "0"),
        (ipv4(&vmac, "promote_secondaries"), "1"),
        (format!("/proc/sys/net/ipv6/conf/{vmac}/addr_gen_mode"), "1"),
        (ipv4("eth0", "arp_ignore"), "1"),
        (ipv4("eth0", "arp_filter"), "1"),
        (ipv4("eth0", "arp_announce"), "2"),
    ] {
        let out = env.lab.exec(0, &["cat", &path]).unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), want, "{path}");
    }
    assert!(
        env.lab
            .ping(1, VIP.parse().unwrap(), Duration::from_secs(2))
            .unwrap(),
        "the VIP does not answer from node-b"
    );
    let killed = Instant::now();
    env.stop(0, Signal::SIGKILL);
    env.wait_holders(&[1], Duration::from_secs(3));
    eprintln!(
        "SIGKILL node-a: the VIP on node-b after {:?}",
        killed.elapsed()
    );
    env.wait_vmac_holders(&[1], Duration::from_secs(3));
    // Nothing was written, or tried, outside the state directory and /proc/sys.
    let log = env.log(1);
    for needle in ["Read-only file system", "\"level\":\"ERROR\""] {
        assert!(!log.contains(needle), "node-b logged {needle:?}:\n{log}");
    }
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("\"WARN\"")).collect();
    assert!(warnings.is_empty(), "node-b warned: {warnings:#?}");
    env.stop(1, Signal::SIGINT);
    env.wait_holders(&[], Duration::from_secs(3));

    // --- 4. `ferrovip cleanup` (where /proc/sys is writable) puts the sysctl back and
    // removes the record.
    for (i, key) in [(0, "eth0"), (1, "all")] {
        let state = state_dir(&env.lab, i).display().to_string();
        let out = env.ferrovip(i, &["cleanup", "--state-dir", &state]);
        assert!(
            out.contains(&format!(
                "sysctl /proc/sys/net/ipv4/conf/{key}/promote_secondaries restored to 0"
            )),
            "{out}"
        );
        assert_eq!(env.sysctl(i, key), "0");
        let left = files(&state_dir(&env.lab, i));
        assert!(left.is_empty(), "{}: {left:?}", env.name(i));
    }
}
