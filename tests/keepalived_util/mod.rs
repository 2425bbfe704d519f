//! A two-node lab for interoperability tests: our agent on node-a, keepalived (Debian's, the
//! reference VRRP peer) on node-b, a capture on the bridge, and the waits and checks the
//! tests share. Everything here needs root.
//!
//! Facts copied from the project's VRRP notes (the tests must not read them at run time):
//! keepalived needs `vrrp_version 3` (its default is 2), takes fractional `advert_int` in v3,
//! `v3_checksum_as_v2` switches its IPv4 VRRPv3 checksum to the message-only form, and
//! `unicast_src_ip` / `unicast_peer {}` replace multicast. It runs in the foreground with
//! `keepalived -n -l -D -f CONF -p PIDFILE -r VRRP_PIDFILE`.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferrovip::lab::{Event, Lab, LabSpec, ProcId, Sniffer, log_tail, masters_since};
use ferrovip::vocab::Family;

pub const VRID: u8 = 51;
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd66, 0x7670, 0, 0, 0, 0, 0, 0x100);
/// The virtual router's link-local for VRID 51 (modified EUI-64 of 00:00:5e:00:02:33), the one
/// RFC 5798 §5.2.9 users list first in keepalived's `virtual_ipaddress`.
pub const LL6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0x0200, 0x5eff, 0xfe00, 0x0233);
/// Node index of our agent (node-a, 192.0.2.11).
pub const OURS: usize = 0;
/// Node index of keepalived (node-b, 192.0.2.12).
pub const THEIRS: usize = 1;

/// Scheduling slack on a busy 2-core machine: a timer may fire a little early relative to
/// the capture's clock (the frame is stamped after it crossed the bridge) and late by a
/// context switch or two.
pub const EARLY: Duration = Duration::from_millis(15);
pub const LATE: Duration = Duration::from_millis(200);

/// One keepalived `vrrp_instance`, always `state BACKUP` with preemption on (keepalived's
/// default), so it elects like our agent does.
#[derive(Debug, Clone)]
pub struct KeepalivedConf {
    pub version: u8,
    pub priority: u8,
    /// keepalived's `advert_int`, in seconds (`0.1` is legal in v3 only).
    pub advert_int: &'static str,
    pub checksum_as_v2: bool,
    /// `unicast_src_ip` = its own address, `unicast_peer { our address }` (IPv4 only).
    pub unicast: bool,
    /// Which `vrrp_instance`s: `interop` (IPv4, [`VIP`]) and/or `interop6` (IPv6, [`VIP6`]),
    /// both VRID 51, as a user writes a dual-stack pair.
    pub families: &'static [Family],
    /// `interop6` lists [`LL6`] before [`VIP6`] (RFC style) rather than [`VIP6`] alone (the
    /// usual keepalived configuration).
    pub link_local: bool,
}

impl KeepalivedConf {
    /// VRRPv3, 100 ms adverts, multicast, pseudo-header checksum (keepalived's defaults
    /// apart from the version and interval).
    pub fn v3(priority: u8) -> Self {
        KeepalivedConf {
            version: 3,
            priority,
            advert_int: "0.1",
            checksum_as_v2: false,
            unicast: false,
            families: &[Family::V4],
            link_local: false,
        }
    }

    /// The IPv6 instance only.
    pub fn ipv6_only(self) -> Self {
        KeepalivedConf {
            families: &[Family::V6],
            ..self
        }
    }

    /// Both instances.
    pub fn dual_stack(self) -> Self {
        KeepalivedConf {
            families: &[Family::V4, Family::V6],
            ..self
        }
    }

    /// [`LL6`] first in the IPv6 instance's `virtual_ipaddress`.
    pub fn with_link_local(self) -> Self {
        KeepalivedConf {
            link_local: true,
            ..self
        }
    }

    pub fn priority(self, priority: u8) -> Self {
        KeepalivedConf { priority, ..self }
    }

    /// VRRPv2 with `advert_int 1` (whole seconds only).
    pub fn version_2(self) -> Self {
        KeepalivedConf {
            version: 2,
            advert_int: "1",
            ..self
        }
    }

    pub fn checksum_as_v2(self) -> Self {
        KeepalivedConf {
            checksum_as_v2: true,
            ..self
        }
    }

    pub fn unicast(self) -> Self {
        KeepalivedConf {
            unicast: true,
            ..self
        }
    }

    fn render(&self, own: Ipv4Addr, peer: Ipv4Addr) -> String {
        assert!(
            !self.unicast || self.families == [Family::V4],
            "unicast is written for IPv4 only"
        );
        let mut extra = String::new();
        if self.checksum_as_v2 {
            extra.push_str("  v3_checksum_as_v2\n");
        }
        if self.unicast {
            let _ = write!(
                extra,
                "  unicast_src_ip {own}\n  unicast_peer {{\n    {peer}\n  }}\n"
            );
        }
        let mut text = format!(
            "global_defs {{
  router_id interop
  vrrp_version {version}
}}
",
            version = self.version,
        );
        for family in self.families {
            let (name, addresses) = match family {
                Family::V4 => ("interop", format!("    {VIP}/24 dev eth0\n")),
                Family::V6 if self.link_local => (
                    "interop6",
                    format!("    {LL6}/64 dev eth0\n    {VIP6}/64 dev eth0\n"),
                ),
                Family::V6 => ("interop6", format!("    {VIP6}/64 dev eth0\n")),
            };
            let _ = write!(
                text,
                "vrrp_instance {name} {{
  state BACKUP
  interface eth0
  virtual_router_id {VRID}
  priority {priority}
  advert_int {advert_int}
{extra}  virtual_ipaddress {{
{addresses}  }}
}}
",
                priority = self.priority,
                advert_int = self.advert_int,
            );
        }
        text
    }
}

/// Our agent's VirtualIP: `base` priority on every node (only node-a runs it).
#[derive(Debug, Clone)]
pub struct AgentConf {
    pub version: u8,
    pub priority: u8,
    /// `spec.vrrp.advertisementInterval`.
    pub interval: &'static str,
    pub message_only: bool,
    /// `spec.vrrp.unicastPeers: [keepalived's address]`.
    pub unicast: bool,
    /// Hold [`VIP`] (an IPv4 instance).
    pub ipv4: bool,
    /// Also hold [`VIP6`] (a second, IPv6, VRRPv3 instance with the same VRID).
    pub ipv6: bool,
    /// List [`LL6`] among the addresses too.
    pub link_local: bool,
}

impl AgentConf {
    pub fn v3(priority: u8) -> Self {
        AgentConf {
            version: 3,
            priority,
            interval: "100ms",
            message_only: false,
            unicast: false,
            ipv4: true,
            ipv6: false,
            link_local: false,
        }
    }

    /// VRRPv2 every second (whole seconds only).
    pub fn version_2(self) -> Self {
        AgentConf {
            version: 2,
            interval: "1s",
            ..self
        }
    }

    /// `ipv4Checksum: MessageOnly`.
    pub fn message_only(self) -> Self {
        AgentConf {
            message_only: true,
            ..self
        }
    }

    pub fn unicast(self) -> Self {
        AgentConf {
            unicast: true,
            ..self
        }
    }

    pub fn ipv6(self) -> Self {
        AgentConf { ipv6: true, ..self }
    }

    /// [`VIP6`] alone.
    pub fn ipv6_only(self) -> Self {
        AgentConf {
            ipv4: false,
            ipv6: true,
            ..self
        }
    }

    /// [`LL6`] listed after [`VIP6`] (the plan puts it first).
    pub fn with_link_local(self) -> Self {
        AgentConf {
            link_local: true,
            ..self
        }
    }

    fn render(&self, peer: Ipv4Addr) -> String {
        let mut addresses = Vec::new();
        if self.ipv4 {
            addresses.push(format!("\"{VIP}/24\""));
        }
        if self.ipv6 {
            addresses.push(format!("\"{VIP6}/64\""));
        }
        if self.link_local {
            addresses.push(format!("\"{LL6}/64\""));
        }
        let addresses = addresses.join(", ");
        let mut vrrp = format!(
            "    version: {}\n    advertisementInterval: {}\n",
            self.version, self.interval
        );
        if self.message_only {
            vrrp.push_str("    ipv4Checksum: MessageOnly\n");
        }
        if self.unicast {
            let _ = writeln!(vrrp, "    unicastPeers: [\"{peer}\"]");
        }
        format!(
            "apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: interop
spec:
  addresses: [{addresses}]
  interface: eth0
  virtualRouterId: {VRID}
  vrrp:
{vrrp}  priority:
    base: {priority}
",
            priority = self.priority
        )
    }
}

/// The lab, its capture, and every process started in it (for failure reports).
pub struct Interop {
    // Declared before the lab so the capture thread stops before the namespaces go.
    pub sniffer: Sniffer,
    pub lab: Lab,
    procs: Mutex<Vec<(String, ProcId)>>,
    captures: AtomicUsize,
}

impl Interop {
    pub fn new(ipv6: bool) -> Interop {
        let lab = Lab::create(LabSpec {
            nodes: 2,
            ipv6,
            ..LabSpec::default()
        })
        .expect("lab (needs root)");
        let sniffer = Sniffer::start(&lab).expect("capture on the lab bridge");
        Interop {
            sniffer,
            lab,
            procs: Mutex::new(Vec::new()),
            captures: AtomicUsize::new(0),
        }
    }

    pub fn ours(&self) -> IpAddr {
        IpAddr::V4(self.lab.node(OURS).ipv4)
    }

    pub fn theirs(&self) -> IpAddr {
        IpAddr::V4(self.lab.node(THEIRS).ipv4)
    }

    /// The source of `node`'s adverts of `family`: its IPv4 address, its IPv6 link-local.
    pub fn source(&self, node: usize, family: Family) -> IpAddr {
        match family {
            Family::V4 => IpAddr::V4(self.lab.node(node).ipv4),
            Family::V6 => IpAddr::V6(self.lab.node(node).ipv6_ll.expect("an IPv6 lab")),
        }
    }

    fn procs(&self) -> std::sync::MutexGuard<'_, Vec<(String, ProcId)>> {
        self.procs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_name(&self, stem: &str) -> String {
        let n = self
            .procs()
            .iter()
            .filter(|(name, _)| name.starts_with(stem))
            .count();
        format!("{stem}-{}", n + 1)
    }

    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.lab.dir().join(file);
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        path
    }

    /// Starts our agent on node-a with its own manifest file.
    pub fn start_agent(&self, conf: &AgentConf) -> ProcId {
        let name = self.next_name("agent");
        let manifest = self.write(
            &format!("{name}.yaml"),
            &conf.render(self.lab.node(THEIRS).ipv4),
        );
        let node = self.lab.node(OURS).name.clone();
        let id = self
            .lab
            .spawn(
                OURS,
                &[
                    "env",
                    "FERROVIP_LOG=debug",
                    env!("CARGO_BIN_EXE_ferrovip"),
                    "agent",
                    "--node-name",
                    &node,
                    "--manifests",
                    &manifest.to_string_lossy(),
                ],
                format!("{name}.log"),
            )
            .expect("spawn the agent");
        self.procs().push((name, id));
        id
    }

    /// Starts keepalived (VRRP subsystem only, foreground, logging to its log file) on
    /// node-b.
    pub fn start_keepalived(&self, conf: &KeepalivedConf) -> ProcId {
        let name = self.next_name("keepalived");
        let own = self.lab.node(THEIRS).ipv4;
        let peer = self.lab.node(OURS).ipv4;
        let config = self.write(&format!("{name}.conf"), &conf.render(own, peer));
        let dir = self.lab.dir();
        let pid = dir.join(format!("{name}.pid"));
        let vrrp_pid = dir.join(format!("{name}.vrrp.pid"));
        let id = self
            .lab
            .spawn(
                THEIRS,
                &[
                    "keepalived",
                    "--dont-fork",
                    "--log-console",
                    "--log-detail",
                    "--vrrp",
                    "-f",
                    &config.to_string_lossy(),
                    "-p",
                    &pid.to_string_lossy(),
                    "-r",
                    &vrrp_pid.to_string_lossy(),
                ],
                format!("{name}.log"),
            )
            .expect("spawn keepalived");
        self.procs().push((name, id));
        id
    }

    pub fn log(&self, id: ProcId) -> String {
        let (_, path) = self.lab.proc_info(id).expect("known process");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits until the log of `id` contains `needle`.
    pub fn wait_log(&self, id: ProcId, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log(id).contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The first advert with priority > 0 from `node` captured at or after `since`.
    pub fn wait_master(&self, node: usize, since: Instant, timeout: Duration) -> Event {
        self.wait_master_of(node, Family::V4, since, timeout)
    }

    /// The first advert of `family` with priority > 0 from `node` captured at or after `since`.
    pub fn wait_master_of(
        &self,
        node: usize,
        family: Family,
        since: Instant,
        timeout: Duration,
    ) -> Event {
        let source = self.source(node, family);
        self.sniffer
            .wait_for(
                |e| {
                    e.at >= since
                        && e.advert()
                            .is_some_and(|a| a.vrid == VRID && a.priority > 0 && a.source == source)
                },
                timeout,
            )
            .unwrap_or_else(|| {
                panic!(
                    "{} did not advertise as {family} master within {timeout:?}",
                    self.lab.node(node).name
                )
            })
    }

    /// Polls the kernel until `addr` is (or is no longer) on node `node`; returns when.
    pub fn wait_address(
        &self,
        node: usize,
        addr: IpAddr,
        present: bool,
        timeout: Duration,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if self.lab.has_address(node, addr).expect("ip addr show") == present {
                return Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "{addr} still {} on {} after {timeout:?}",
                if present { "missing" } else { "present" },
                self.lab.node(node).name
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The sources advertising as master (priority > 0) during the next `window`.
    pub fn masters_during(&self, window: Duration) -> Vec<IpAddr> {
        let start = Instant::now();
        std::thread::sleep(window);
        masters_since(&self.sniffer.events(), VRID, start)
    }

    /// Asserts that for `window` only `node` advertises as master, and that it alone holds
    /// the VIP at the end.
    pub fn assert_sole_master(&self, node: usize, window: Duration) {
        self.assert_sole_master_of(node, &[Family::V4], window);
    }

    /// [`Interop::assert_sole_master`] for the instances of each of `families` (one window).
    pub fn assert_sole_master_of(&self, node: usize, families: &[Family], window: Duration) {
        let masters = self.masters_during(window);
        for family in families {
            let expected = self.source(node, *family);
            let of_family: Vec<IpAddr> = masters
                .iter()
                .copied()
                .filter(|m| Family::of(m) == *family)
                .collect();
            assert_eq!(
                of_family,
                vec![expected],
                "expected only {} as {family} master for {window:?}",
                self.lab.node(node).name
            );
            let vip = vip_of(*family);
            let other = 1 - node;
            assert!(
                self.lab.has_address(node, vip).unwrap(),
                "master {} lacks {vip}",
                self.lab.node(node).name
            );
            assert!(
                !self.lab.has_address(other, vip).unwrap(),
                "backup {} holds {vip}",
                self.lab.node(other).name
            );
        }
    }

    /// The tail of every process log, for assertion messages.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for (name, id) in self.procs().iter() {
            if let Ok((_, path)) = self.lab.proc_info(*id) {
                let _ = write!(out, "--- {name} ---\n{}\n", log_tail(&path, 25));
            }
        }
        out
    }

    /// Captures on the lab bridge with tshark (dumpcap) for `seconds`, VRRP only. Blocking.
    pub fn tshark_capture(&self, seconds: u32) -> PathBuf {
        let n = self.captures.fetch_add(1, Ordering::Relaxed);
        let file = self.lab.dir().join(format!("capture-{n}.pcapng"));
        let out = self
            .lab
            .exec_switch(&[
                "tshark",
                "-q",
                "-i",
                self.lab.bridge(),
                "-f",
                "ip proto 112 or ip6 proto 112",
                "-a",
                &format!("duration:{seconds}"),
                "-w",
                &file.to_string_lossy(),
            ])
            .expect("run tshark");
        assert!(
            out.status.success(),
            "tshark capture failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        file
    }
}

impl Drop for Interop {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("process logs at failure:\n{}", self.report());
        }
    }
}

/// The VIP of `family`: [`VIP`] or [`VIP6`].
pub fn vip_of(family: Family) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(VIP),
        Family::V6 => IpAddr::V6(VIP6),
    }
}

/// `tshark -r FILE -Y vrrp -T fields -e F…` with extra `-o` preferences: one row per VRRP
/// packet, one column per field (multi-valued fields joined with `,`).
pub fn tshark_fields(file: &Path, prefs: &[&str], fields: &[&str]) -> Vec<Vec<String>> {
    let mut args: Vec<String> = vec!["-r".into(), file.to_string_lossy().into_owned()];
    for pref in prefs {
        args.push("-o".into());
        args.push((*pref).into());
    }
    args.extend(
        [
            "-Y",
            "vrrp",
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "aggregator=,",
        ]
        .map(String::from),
    );
    for field in fields {
        args.push("-e".into());
        args.push((*field).into());
    }
    let out = Command::new("tshark")
        .args(&args)
        .output()
        .expect("run tshark");
    assert!(
        out.status.success(),
        "tshark {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| !line.is_empty())
        .map(|line| line.split('|').map(str::to_owned).collect())
        .collect()
}

/// `within(actual, expected)`: no earlier than [`EARLY`] before, no later than [`LATE`] after.
pub fn within(actual: Duration, expected: Duration) -> bool {
    actual + EARLY >= expected && actual <= expected + LATE
}

pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// RFC 1071 one's-complement sum over `chunks` (each of even length but the last), complemented.
/// Written here rather than taken from the agent's codec so the tests do not share its bugs.
pub fn internet_checksum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.concat();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|pair| u32::from(pair[0]) << 8 | u32::from(*pair.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A whole Ethernet frame carrying a VRRPv3 advertisement over IPv4 to 224.0.0.18 (TTL 255,
/// TOS 0xc0 like keepalived), with the pseudo-header or the message-only checksum.
pub fn v3_ipv4_advert_frame(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    vrid: u8,
    priority: u8,
    centiseconds: u16,
    addresses: &[Ipv4Addr],
    message_only: bool,
) -> Vec<u8> {
    let group = Ipv4Addr::new(224, 0, 0, 18);
    let mut vrrp = vec![0x31, vrid, priority, addresses.len() as u8];
    vrrp.extend_from_slice(&(centiseconds & 0x0fff).to_be_bytes());
    vrrp.extend_from_slice(&[0, 0]);
    for address in addresses {
        vrrp.extend_from_slice(&address.octets());
    }
    let len = vrrp.len() as u16;
    let checksum = if message_only {
        internet_checksum(&[&vrrp])
    } else {
        let mut pseudo = Vec::with_capacity(12);
        pseudo.extend_from_slice(&src.octets());
        pseudo.extend_from_slice(&group.octets());
        pseudo.extend_from_slice(&[0, 112]);
        pseudo.extend_from_slice(&len.to_be_bytes());
        internet_checksum(&[&pseudo, &vrrp])
    };
    vrrp[6..8].copy_from_slice(&checksum.to_be_bytes());

    let mut ip = vec![0x45, 0xc0];
    ip.extend_from_slice(&(20 + len).to_be_bytes());
    ip.extend_from_slice(&[0, 0, 0, 0, 255, 112, 0, 0]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&group.octets());
    let header_checksum = internet_checksum(&[&ip]);
    ip[10..12].copy_from_slice(&header_checksum.to_be_bytes());

    let mut frame = vec![0x01, 0x00, 0x5e, 0x00, 0x00, 0x12];
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ip);
    frame.extend_from_slice(&vrrp);
    frame
}

/// keepalived's version as (major, minor, patch), from `keepalived --version`.
pub fn keepalived_version() -> (u32, u32, u32) {
    let out = Command::new("keepalived")
        .arg("--version")
        .output()
        .expect("run keepalived --version");
    // It prints to stderr; accept either stream.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = text
        .split_whitespace()
        .find_map(|word| {
            word.strip_prefix('v')
                .filter(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
        })
        .unwrap_or_else(|| panic!("no version in {text:?}"));
    let mut parts = version.split('.').map(|p| {
        p.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .unwrap_or_else(|_| panic!("bad version {version:?}"))
    });
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}
