//! End-to-end tests of the standalone agent: the real `ferrovip agent` binary, one per node of
//! a lab of network namespaces (`ferrovip::lab`), observed three ways: on the wire (a capture
//! on the lab bridge), through the kernel (`ip addr`, `ip neigh`), and through the agents' own
//! JSON log lines (every transition is one line with `event = "transition"`).
//!
//! Needs root (namespaces, veth, AF_PACKET) and runs one test at a time
//! (`--test-threads=1`, as e2e/test.sh does): the timing bounds assume the two cores are not
//! shared with another lab. Each test builds its own lab; dropping it stops the agents and
//! deletes the namespaces, also when an assertion fails (the agents' logs are printed then).
//!
//! Timing bounds, from RFC 5798 (facts copied from the VRRP notes into this file):
//! - Skew_Time = ((256 − Priority) × Master_Adver_Interval) / 256
//! - Master_Down_Interval = 3 × Master_Adver_Interval + Skew_Time
//! - At 100 ms and priority 140: skew 45.3 ms, down interval 345.3 ms.
//!
//! A takeover timer must never fire early (5 ms allowed for the capture's timestamps) and may
//! fire late by scheduling noise (60 ms allowed: debug build, 2 cores, 3 agents).
//!
//! Priorities are spread so that scheduling noise cannot reorder the backups: node-b (140)
//! times out 31 ms before node-c (60) at 100 ms adverts (the `ferrovip lab` default of 130
//! for node-c leaves only 3.9 ms, which a loaded 2-core machine exceeds). A backup that takes
//! over next to the rightful one is reported as a failure: it announces the VIP too.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant, SystemTime};

use ferrovip::lab::{
    Event, EventKind, Failover, FailoverQuery, Lab, LabSpec, NodeInfo, PingTally, ProcId,
    SeenAdvert, Sniffer, log_tail, master_down_interval, masters_since, measure_failover,
    ping_command, skew_time,
};
use ferrovip::vocab::{ChecksumMode, Version};
use ferrovip::vrrp::MULTICAST_V4;
use ferrovip::vrrp::packet::{
    Advertisement, ETHERTYPE_IPV4, ethernet_frame, ipv4_header, multicast_mac,
};
use nix::sys::signal::Signal;
use serde_json::Value;

const AGENT: &str = env!("CARGO_BIN_EXE_ferrovip");
const FAST: Duration = Duration::from_millis(100);
const EARLY: Duration = Duration::from_millis(5);
const LATE: Duration = Duration::from_millis(60);
/// The lab's default subnet is 192.0.2.0/24 with nodes at .11, .12, …
const VIP: &str = "192.0.2.100";
const VIP_NET: &str = "192.0.2.100/24";
const VRID: u8 = 51;
/// Priorities with the default preferences: node-a 150, node-b 140, node-c 60.
const PRIO_A: u8 = 150;
const PRIO_B: u8 = 140;
const VMAC_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, VRID];

// ---------------------------------------------------------------------------------------------
// Manifests

/// One VirtualIP document, with the lab defaults: VRRPv3 at 100 ms, preempt on, base 100,
/// node-a +50, node-b +40, node-c −40.
#[derive(Debug, Clone)]
struct VipDoc {
    name: String,
    addresses: Vec<String>,
    vrid: i64,
    version: i64,
    interval: String,
    preempt: bool,
    preferred: Vec<(String, i64)>,
    unicast_peers: Vec<String>,
    virtual_mac: bool,
    /// Raw YAML appended to the spec (e.g. `  services: ...`).
    extra: String,
}

impl VipDoc {
    fn new(name: &str, address: &str, vrid: i64) -> VipDoc {
        VipDoc {
            name: name.to_owned(),
            addresses: vec![address.to_owned()],
            vrid,
            version: 3,
            interval: "100ms".into(),
            preempt: true,
            preferred: vec![
                ("node-a".into(), 50),
                ("node-b".into(), 40),
                ("node-c".into(), -40),
            ],
            unicast_peers: Vec::new(),
            virtual_mac: false,
            extra: String::new(),
        }
    }

    /// `web`: 192.0.2.100/24 on VRID 51, the VirtualIP most tests run.
    fn web() -> VipDoc {
        VipDoc::new("web", VIP_NET, i64::from(VRID))
    }

    /// VRRPv2, whose intervals are whole seconds: one second.
    fn version_2(mut self) -> VipDoc {
        self.version = 2;
        self.interval = "1s".into();
        self
    }

    fn virtual_mac(mut self) -> VipDoc {
        self.virtual_mac = true;
        self
    }

    fn unicast_peers(mut self, peers: Vec<String>) -> VipDoc {
        self.unicast_peers = peers;
        self
    }

    fn without_preemption(mut self) -> VipDoc {
        self.preempt = false;
        self
    }

    fn also(mut self, address: &str) -> VipDoc {
        self.addresses.push(address.to_owned());
        self
    }

    /// Raw YAML appended to the spec.
    fn extra(mut self, yaml: &str) -> VipDoc {
        self.extra = yaml.to_owned();
        self
    }

    fn preferring(mut self, preferred: &[(&str, i64)]) -> VipDoc {
        self.preferred = preferred
            .iter()
            .map(|(n, w)| ((*n).to_owned(), *w))
            .collect();
        self
    }

    fn yaml(&self) -> String {
        let list = |items: &[String]| {
            items
                .iter()
                .map(|i| format!("{i:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut text = format!(
            "apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: {}
spec:
  addresses: [{}]
  interface: eth0
  virtualRouterId: {}
  vrrp:
    version: {}
    advertisementInterval: {}
    preempt: {}
    virtualMac: {}
",
            self.name,
            list(&self.addresses),
            self.vrid,
            self.version,
            self.interval,
            self.preempt,
            self.virtual_mac,
        );
        if !self.unicast_peers.is_empty() {
            text += &format!("    unicastPeers: [{}]\n", list(&self.unicast_peers));
        }
        text += "  priority:\n    base: 100\n";
        if !self.preferred.is_empty() {
            text += "    preferredNodes:\n";
            for (node, weight) in &self.preferred {
                text += &format!("      - {{nodeName: {node}, weight: {weight}}}\n");
            }
        }
        text += &self.extra;
        text
    }
}

fn manifest(docs: &[&VipDoc]) -> String {
    docs.iter()
        .map(|d| d.yaml())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// Replaces `path` in one step (write + rename), so that a polling agent never reads a
/// half-written file: a torn write would be the test's fault, not the agent's.
fn write_atomic(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write manifest");
    std::fs::rename(&tmp, path).expect("rename manifest");
}

// ---------------------------------------------------------------------------------------------
// The cluster: a lab, a capture, and agents

/// One transition log line.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Transition {
    vip: String,
    family: String,
    vrid: u64,
    from: String,
    to: String,
    reason: String,
}

struct Cluster {
    // Declared first so that the capture stops before the lab deletes its namespace.
    sniffer: Sniffer,
    lab: Lab,
    manifests: PathBuf,
    agents: Vec<Option<ProcId>>,
    /// Every agent ever started, for the log dump of a failed test.
    history: Vec<(usize, ProcId)>,
    poll: String,
    debug: bool,
    /// Sources of hand-made adverts, left out of the mastership checks.
    rogues: Vec<IpAddr>,
    /// Extra agent arguments per node.
    extra: Vec<Vec<String>>,
}

impl Cluster {
    fn new(nodes: usize, ipv6: bool) -> Cluster {
        // Namespaces of earlier runs that were killed before their Drop ran.
        let _ = Lab::cleanup_stale();
        let built = Instant::now();
        let lab = Lab::create(LabSpec {
            nodes,
            ipv6,
            ..LabSpec::default()
        })
        .expect("build the lab (needs root)");
        eprintln!(
            "lab {} with {nodes} nodes built in {:?}",
            lab.prefix(),
            built.elapsed()
        );
        let sniffer = Sniffer::start(&lab).expect("capture on the lab bridge");
        let manifests = lab.dir().join("virtualips.yaml");
        Cluster {
            sniffer,
            lab,
            manifests,
            agents: vec![None; nodes],
            history: Vec::new(),
            poll: "200ms".into(),
            debug: false,
            rogues: Vec::new(),
            extra: vec![Vec::new(); nodes],
        }
    }

    /// A cluster whose agents read one manifest file holding `docs`.
    fn with(nodes: usize, ipv6: bool, docs: &[&VipDoc]) -> Cluster {
        let cluster = Cluster::new(nodes, ipv6);
        cluster.write(docs);
        cluster
    }

    fn write(&self, docs: &[&VipDoc]) {
        write_atomic(&self.manifests, &manifest(docs));
    }

    fn node(&self, i: usize) -> &NodeInfo {
        self.lab.node(i)
    }

    fn v4(&self, i: usize) -> IpAddr {
        IpAddr::V4(self.node(i).ipv4)
    }

    fn mac(&self, i: usize) -> [u8; 6] {
        self.node(i).mac.octets()
    }

    fn start(&mut self, node: usize) -> ProcId {
        let name = self.node(node).name.clone();
        let starts = self.history.iter().filter(|(n, _)| *n == node).count();
        let log = format!("{name}.{}.log", starts + 1);
        let filter = if self.debug {
            "FERROVIP_LOG=info,ferrovip=debug"
        } else {
            "FERROVIP_LOG=info"
        };
        let manifests = self.manifests.to_string_lossy().into_owned();
        let mut args = vec![
            "env",
            filter,
            AGENT,
            "--log-format",
            "json",
            "agent",
            "--node-name",
            &name,
            "--manifests",
            &manifests,
            "--manifest-poll",
            &self.poll,
        ];
        args.extend(self.extra[node].iter().map(String::as_str));
        let id = self.lab.spawn(node, &args, log).expect("spawn agent");
        self.agents[node] = Some(id);
        self.history.push((node, id));
        id
    }

    fn start_nodes(&mut self, nodes: &[usize]) {
        for &n in nodes {
            self.start(n);
        }
    }

    fn start_all(&mut self) {
        for n in 0..self.agents.len() {
            self.start(n);
        }
    }

    /// The usual opening: every agent started, node-a (the preferred node) the only master
    /// of VRID 51 within 5 s.
    fn start_all_and_elect_node_a(&mut self) {
        self.start_all();
        self.wait_master(VRID, self.v4(0), FAST, Duration::from_secs(5));
    }

    fn agent(&self, node: usize) -> ProcId {
        self.agents[node].unwrap_or_else(|| panic!("no agent on node {node}"))
    }

    /// Signals the agent on `node`; returns the instant just before the signal.
    fn signal(&self, node: usize, signal: Signal) -> Instant {
        let at = Instant::now();
        self.lab.kill(self.agent(node), signal).expect("signal");
        at
    }

    fn wait_exit(&self, node: usize, timeout: Duration) -> ExitStatus {
        self.lab
            .wait(self.agent(node), timeout)
            .expect("wait")
            .unwrap_or_else(|| panic!("agent on node {node} still running after {timeout:?}"))
    }

    fn assert_running(&self, node: usize) {
        let status = self.lab.exit_status(self.agent(node)).expect("status");
        assert!(
            status.is_none(),
            "agent on {} exited ({status:?})",
            self.node(node).name
        );
    }

    /// Every JSON line the current agent on `node` logged so far.
    fn log(&self, node: usize) -> Vec<Value> {
        let (_, path) = self.lab.proc_info(self.agent(node)).expect("proc info");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    fn transitions(&self, node: usize) -> Vec<Transition> {
        self.log(node)
            .iter()
            .filter(|l| l["event"] == "transition")
            .map(|l| Transition {
                vip: str_field(l, "vip"),
                family: str_field(l, "family"),
                vrid: l["vrid"].as_u64().unwrap_or(0),
                from: str_field(l, "from"),
                to: str_field(l, "to"),
                reason: str_field(l, "reason"),
            })
            .collect()
    }

    fn transitions_of(&self, node: usize, vip: &str) -> Vec<Transition> {
        self.transitions(node)
            .into_iter()
            .filter(|t| t.vip == vip)
            .collect()
    }

    /// Per node with an agent, how many transitions of `vip` it logged.
    fn transition_counts(&self, vip: &str) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|n| self.agents[*n].is_some())
            .map(|n| self.transitions_of(n, vip).len())
            .collect()
    }

    fn count_log(&self, node: usize, pred: &dyn Fn(&Value) -> bool) -> usize {
        self.log(node).iter().filter(|l| pred(l)).count()
    }

    /// Waits until the agent on `node` logged a line matching `pred`; returns it.
    fn wait_log(
        &self,
        node: usize,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.log(node).into_iter().find(|l| pred(l)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {what} within {timeout:?}",
                self.node(node).name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the agent on `node` logged one more line matching `pred` than `before`.
    fn wait_more_logs(
        &self,
        node: usize,
        what: &str,
        before: usize,
        pred: &dyn Fn(&Value) -> bool,
    ) {
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.count_log(node, pred) <= before {
            assert!(
                Instant::now() < deadline,
                "{} did not log {what}",
                self.node(node).name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `source` is the only node advertising `vrid` with priority > 0 over a
    /// whole window of four intervals; returns when that window ended.
    fn wait_master(&self, vrid: u8, source: IpAddr, interval: Duration, timeout: Duration) {
        let window = interval * 4 + Duration::from_millis(50);
        let start = Instant::now();
        loop {
            let now = Instant::now();
            let since = now - window;
            let masters = masters_since(&self.wire(since), vrid, since);
            if now >= start + window && masters == [source] {
                return;
            }
            assert!(
                now < start + timeout,
                "VRID {vrid}: expected {source} alone as master within {timeout:?}, the wire shows {masters:?}"
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// What the agents sent since `since`: the capture without the hand-made adverts.
    fn wire(&self, since: Instant) -> Vec<Event> {
        self.sniffer
            .events_since(since)
            .into_iter()
            .filter(|e| e.advert().is_none_or(|a| !self.rogues.contains(&a.source)))
            .collect()
    }

    /// Adverts for `vrid` from `source` captured at or after `since`.
    fn adverts(&self, vrid: u8, source: IpAddr, since: Instant) -> Vec<(Instant, SeenAdvert)> {
        self.sniffer
            .events_since(since)
            .into_iter()
            .filter_map(|e| {
                let a = e.advert()?.clone();
                (a.vrid == vrid && a.source == source).then_some((e.at, a))
            })
            .collect()
    }

    /// `source` was the only master of `vrid` since `since` and advertised without a gap:
    /// no interval between its adverts above interval + 60 ms, and no extra adverts (none
    /// closer than half an interval, and no more than the elapsed time allows). The lower
    /// bound is loose on purpose: the capture thread's timestamps jitter under load, which
    /// shortens one gap by as much as it lengthens the previous one.
    fn assert_steady(&self, vrid: u8, source: IpAddr, interval: Duration, since: Instant) {
        let events = self.wire(since);
        assert_eq!(
            masters_since(&events, vrid, since),
            vec![source],
            "VRID {vrid}: mastership changed since the reference instant"
        );
        // With unicast peers every advert goes out once per peer: follow one destination.
        let mut adverts = self.adverts(vrid, source, since);
        if let Some((_, first)) = adverts.first() {
            let destination = first.destination;
            adverts.retain(|(_, a)| a.destination == destination);
        }
        let covered = Instant::now().duration_since(since);
        let periods = (covered.as_millis() / interval.as_millis()) as usize;
        assert!(
            adverts.len() + 1 >= periods && adverts.len() <= periods + 1,
            "VRID {vrid}: {} adverts in {covered:?} at {interval:?}",
            adverts.len()
        );
        let gaps: Vec<Duration> = adverts
            .windows(2)
            .map(|w| w[1].0.duration_since(w[0].0))
            .collect();
        let (min, max) = (gaps.iter().min().copied(), gaps.iter().max().copied());
        eprintln!(
            "VRID {vrid} from {source}: {} adverts, gaps {min:?}..{max:?}",
            adverts.len()
        );
        for gap in gaps {
            assert!(
                gap >= interval / 2 && gap <= interval + LATE,
                "VRID {vrid}: advert gap {gap:?} outside [{:?}, {:?}]",
                interval / 2,
                interval + LATE
            );
        }
    }

    fn has(&self, node: usize, addr: &str) -> bool {
        self.lab
            .has_address(node, addr.parse().expect("address"))
            .expect("ip addr")
    }

    /// Polls `ip addr` on `node` until `addr` is (or is not) on eth0.
    fn wait_address(&self, node: usize, addr: &str, present: bool, timeout: Duration) {
        wait_until(
            &format!(
                "{addr} {} on {}",
                if present { "present" } else { "absent" },
                self.node(node).name
            ),
            timeout,
            || self.has(node, addr) == present,
        );
    }

    /// Exactly `holder` among all nodes has `addr` on eth0.
    fn assert_only_holder(&self, holder: usize, addr: &str) {
        self.wait_address(holder, addr, true, Duration::from_secs(1));
        for n in (0..self.agents.len()).filter(|n| *n != holder) {
            assert!(
                !self.has(n, addr),
                "{addr} is also on {}",
                self.node(n).name
            );
        }
    }

    fn exec_ok(&self, node: usize, args: &[&str]) -> String {
        let out = self.lab.exec(node, args).expect("exec");
        assert!(
            out.status.success(),
            "`{}` on {} failed: {}",
            args.join(" "),
            self.node(node).name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ping(&self, from: usize, addr: &str) -> bool {
        (0..3).any(|_| {
            self.lab
                .exec(from, &["ping", "-c", "1", "-W", "1", addr])
                .expect("ping")
                .status
                .success()
        })
    }

    /// The link-layer address `node` has cached for `addr`.
    fn neighbour_mac(&self, node: usize, addr: &str) -> Option<String> {
        let out = self.exec_ok(node, &["ip", "-j", "neigh", "show", addr, "dev", "eth0"]);
        let neigh: Value = serde_json::from_str(&out).ok()?;
        neigh.as_array()?.first()?["lladdr"]
            .as_str()
            .map(str::to_owned)
    }

    /// Waits up to 500 ms for `node`'s neighbour cache to map `addr` to `mac`.
    fn wait_neighbour(&self, node: usize, addr: &str, mac: &str) {
        let deadline = Instant::now() + Duration::from_millis(500);
        loop {
            let cached = self.neighbour_mac(node, addr);
            if cached.as_deref() == Some(mac) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: {addr} still cached at {cached:?}, expected {mac}",
                self.node(node).name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Every (interface, link kind, MAC, address) on `node`.
    fn all_addresses(&self, node: usize) -> Vec<(String, String, String, IpAddr)> {
        let out = self.exec_ok(node, &["ip", "-d", "-j", "addr", "show"]);
        let links: Value = serde_json::from_str(&out).expect("ip -j addr");
        let mut all = Vec::new();
        for link in links.as_array().into_iter().flatten() {
            let name = str_field(link, "ifname");
            let kind = link["linkinfo"]["info_kind"]
                .as_str()
                .unwrap_or("")
                .to_owned();
            let mac = str_field(link, "address");
            for info in link["addr_info"].as_array().into_iter().flatten() {
                if let Some(ip) = info["local"].as_str().and_then(|s| s.parse().ok()) {
                    all.push((name.clone(), kind.clone(), mac.clone(), ip));
                }
            }
        }
        all
    }

    fn links(&self, node: usize) -> Vec<String> {
        let out = self.exec_ok(node, &["ip", "-j", "link", "show"]);
        let links: Value = serde_json::from_str(&out).expect("ip -j link");
        links
            .as_array()
            .into_iter()
            .flatten()
            .map(|l| str_field(l, "ifname"))
            .collect()
    }

    fn send(&self, node: usize, frame: &[u8]) {
        self.lab.send_frame(node, frame).expect("send frame");
    }

    /// After `since`, only `new` advertised as master and only `mac` announced `vip`: no
    /// other backup briefly took over (its GARP would point neighbours at a node that drops
    /// the address a moment later).
    fn assert_clean_takeover(
        &self,
        vrid: u8,
        since: Instant,
        new: IpAddr,
        mac: [u8; 6],
        vip: IpAddr,
    ) {
        let events = self.wire(since);
        let masters = masters_since(&events, vrid, since);
        let firsts: Vec<String> = masters
            .iter()
            .filter_map(|m| {
                let (at, a) = self
                    .adverts(vrid, *m, since)
                    .into_iter()
                    .find(|(_, a)| a.priority > 0)?;
                Some(format!(
                    "{m} (priority {}) at +{:?}",
                    a.priority,
                    at.duration_since(since)
                ))
            })
            .collect();
        assert_eq!(
            masters,
            vec![new],
            "VRID {vrid}: more than one node took over: {firsts:?}"
        );
        let announcers: BTreeSet<String> = events
            .iter()
            .filter(|e| e.announced() == Some(vip))
            .map(|e| e.src_mac.to_string())
            .collect();
        assert_eq!(
            announcers,
            BTreeSet::from([mac_string(mac)]),
            "{vip} was announced by other MACs than the new master's"
        );
    }

    /// SIGKILLs the master on `master` and measures the takeover; also returns the instant
    /// of the kill.
    fn crash_failover(&self, master: usize, vrid: u8, vip: Option<IpAddr>) -> (Failover, Instant) {
        let old = self.v4(master);
        let stopped_at = self.signal(master, Signal::SIGKILL);
        let query = FailoverQuery {
            vrid,
            old_master: old,
            stopped_at,
            vip,
        };
        let failover =
            measure_failover(&self.sniffer, &query, Duration::from_secs(3)).expect("a takeover");
        (failover, stopped_at)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for (node, id) in &self.history {
                if let Ok((_, path)) = self.lab.proc_info(*id) {
                    eprintln!(
                        "--- {} ({id}) log tail ---\n{}",
                        self.lab.node(*node).name,
                        log_tail(&path, 40)
                    );
                }
            }
        }
    }
}

/// The human-readable message of a log line.
fn msg(line: &Value) -> &str {
    line["message"].as_str().unwrap_or_default()
}

fn str_field(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_owned()
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if cond() {
            return start.elapsed();
        }
        assert!(start.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sleep_until(t: Instant) {
    if let Some(d) = t.checked_duration_since(Instant::now()) {
        std::thread::sleep(d);
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The takeover's advert gap lies in [expected − 5 ms, expected + `late`].
fn assert_gap(failover: &Failover, expected: Duration, late: Duration) {
    let gap = failover
        .last_advert_to_takeover
        .expect("the capture saw the old master's adverts");
    assert!(
        gap + EARLY >= expected && gap <= expected + late,
        "takeover {gap:?} after the old master's last advert; expected {expected:?} (−{EARLY:?}/+{late:?})"
    );
}

// ---------------------------------------------------------------------------------------------
// Hand-made VRRP packets (playing a peer, or a broken one)

/// An advertisement of VRID `vrid` for the lab VIP at 100 ms.
fn advert(version: Version, vrid: u8, priority: u8) -> Advertisement {
    Advertisement {
        version,
        vrid,
        priority,
        interval: if version == Version::V3 { 10 } else { 1 },
        addresses: vec![ip(VIP)],
    }
}

/// The VRRP message of `advert` from `src` to `dst`, with the keepalived checksum form.
fn message(advert: &Advertisement, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    advert
        .encode(IpAddr::V4(src), IpAddr::V4(dst), ChecksumMode::PseudoHeader)
        .expect("encode")
}

/// Recomputes the checksum of a (deliberately altered) message, so that the alteration is
/// the only thing wrong with it: RFC 1071 over the IPv4 pseudo-header and the message (v3),
/// or the message alone (v2). Independent of the agent's codec.
fn fix_checksum(msg: &mut [u8], src: Ipv4Addr, dst: Ipv4Addr) {
    msg[6] = 0;
    msg[7] = 0;
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let hi = u32::from(pair[0]) << 8;
            let lo = pair.get(1).map_or(0, |b| u32::from(*b));
            sum += hi | lo;
        }
    };
    if msg[0] >> 4 != 2 {
        add(&src.octets());
        add(&dst.octets());
        add(&[0, 112]);
        add(&(msg.len() as u16).to_be_bytes());
    }
    add(msg);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !(sum as u16);
    msg[6..8].copy_from_slice(&checksum.to_be_bytes());
}

/// An Ethernet frame carrying `msg` in an IPv4 packet from `from` to `dst`.
fn frame(from: &NodeInfo, dst: Ipv4Addr, dst_mac: [u8; 6], ttl: u8, msg: &[u8]) -> Vec<u8> {
    let mut packet = ipv4_header(from.ipv4, dst, msg.len() as u16, ttl, 0xc0).to_vec();
    packet.extend_from_slice(msg);
    ethernet_frame(dst_mac, from.mac.octets(), ETHERTYPE_IPV4, &packet)
}

fn multicast_frame(from: &NodeInfo, ttl: u8, msg: &[u8]) -> Vec<u8> {
    let group_mac = multicast_mac(IpAddr::V4(MULTICAST_V4)).expect("group MAC");
    frame(from, MULTICAST_V4, group_mac, ttl, msg)
}

// ---------------------------------------------------------------------------------------------
// 1. Election

#[test]
fn agents_elect_the_preferred_node_which_alone_holds_and_answers_for_the_vip() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    let started = Instant::now();
    c.start_all_and_elect_node_a();
    let first = c.adverts(VRID, c.v4(0), started)[0]
        .0
        .duration_since(started);
    eprintln!("node-a master {first:?} after the agents started");
    // Start-up plus one Master_Down_Interval (≈ 0.34 s), with room for a debug build.
    assert!(first < Duration::from_millis(1500), "{first:?}");
    c.assert_only_holder(0, VIP);

    // What the master sends: RFC 5798 §5 fields, its real MAC, a gratuitous ARP.
    let (_, seen) = c.adverts(VRID, c.v4(0), started).pop().expect("adverts");
    assert_eq!(seen.destination, IpAddr::V4(MULTICAST_V4));
    assert_eq!(seen.ttl, 255);
    assert_eq!(seen.version, 3);
    assert_eq!(seen.priority, PRIO_A);
    assert_eq!(seen.interval, FAST);
    assert_eq!(seen.addresses, vec![ip(VIP)]);
    // node-b may win the first timeout by start-up jitter (the skews of 150 and 140 differ
    // by 3.9 ms) before node-a preempts it: look for node-a's GARP.
    let a_mac = c.mac(0);
    c.sniffer
        .wait_for(
            |e| e.at >= started && e.announced() == Some(ip(VIP)) && e.src_mac.octets() == a_mac,
            Duration::from_secs(1),
        )
        .expect("a gratuitous ARP for the VIP from node-a");
    // Backups stay silent: no advert from node-b or node-c once node-a is master.
    let settled = Instant::now();

    // The VIP answers, from node-a's MAC.
    for from in [1, 2] {
        assert!(
            c.ping(from, VIP),
            "VIP does not answer ping from node {from}"
        );
        assert_eq!(
            c.neighbour_mac(from, VIP).as_deref(),
            Some(mac_string(c.mac(0)).as_str())
        );
    }
    sleep_until(settled + Duration::from_secs(1));
    c.assert_steady(VRID, c.v4(0), FAST, settled);
    for n in [1, 2] {
        assert!(c.adverts(VRID, c.v4(n), settled).is_empty());
    }

    // The logs agree with the wire: node-a ends MASTER, the others BACKUP.
    let last = |n: usize| {
        c.transitions_of(n, "web")
            .last()
            .cloned()
            .expect("a transition")
    };
    assert_eq!(last(0).to, "MASTER");
    assert_eq!(last(1).to, "BACKUP");
    assert_eq!(last(2).to, "BACKUP");
    for n in 0..3 {
        c.assert_running(n);
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Failover and handover

#[test]
fn a_crashed_master_is_replaced_within_the_master_down_interval_and_preempts_on_return() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    // node-c talks to the VIP, so its neighbour cache holds node-a's MAC.
    assert!(c.ping(2, VIP));
    assert_eq!(c.neighbour_mac(2, VIP), Some(mac_string(c.mac(0))));

    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    let expected = master_down_interval(PRIO_B, FAST);
    eprintln!("crash failover: {f:?}, Master_Down_Interval {expected:?}");
    assert_eq!(f.new_master, c.v4(1), "node-b has the next priority");
    assert_eq!(f.new_master_priority, PRIO_B);
    assert_eq!(f.advert_interval, FAST);
    assert!(f.death_to_advert < Duration::from_secs(1));
    assert_gap(&f, expected, LATE);
    let garp = f.death_to_garp.expect("the new master announces the VIP");
    assert!(garp <= f.death_to_advert + Duration::from_millis(100));
    c.wait_address(1, VIP, true, Duration::from_millis(500));
    c.assert_clean_takeover(VRID, killed_at, c.v4(1), c.mac(1), ip(VIP));
    // The gratuitous ARP moved node-c's cache entry to node-b.
    let b_mac = mac_string(c.mac(1));
    c.wait_neighbour(2, VIP, &b_mac);
    let takeover = Instant::now();
    let b = c.transitions_of(1, "web");
    assert_eq!(
        b.last()
            .map(|t| (t.from.as_str(), t.to.as_str(), t.reason.as_str())),
        Some(("BACKUP", "MASTER", "master_down"))
    );
    std::thread::sleep(Duration::from_millis(500));
    c.assert_steady(VRID, c.v4(1), FAST, takeover);
    assert!(!c.transitions_of(2, "web").iter().any(|t| t.to == "MASTER"));
    c.wait_exit(0, Duration::from_secs(1));

    // node-a comes back with the highest priority and preempts; node-b lets go of the VIP.
    let restarted = Instant::now();
    c.start(0);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    let back = c.adverts(VRID, c.v4(0), restarted)[0].0;
    eprintln!(
        "node-a restarted and preempted after {:?}",
        back.duration_since(restarted)
    );
    c.assert_only_holder(0, VIP);
    let a = c.transitions_of(0, "web");
    assert!(
        a.iter().any(|t| t.to == "MASTER" && t.reason == "preempt"),
        "{a:?}"
    );
    // node-b held the VIP until node-a's advert reached it: node-a's gratuitous ARP went
    // out before that advert, so traffic moved before node-b let go.
    let a_mac = c.node(0).mac;
    let seen = c.sniffer.events_since(restarted);
    let first_advert = seen
        .iter()
        .position(|e| {
            e.advert()
                .is_some_and(|ad| ad.vrid == VRID && ad.source == c.v4(0))
        })
        .expect("node-a's advert");
    let first_garp = seen
        .iter()
        .position(|e| e.src_mac == a_mac && e.announced() == Some(ip(VIP)))
        .expect("node-a's gratuitous ARP");
    assert!(
        first_garp < first_advert,
        "node-a advertised (frame {first_advert}) before announcing the VIP (frame {first_garp})"
    );
    let b = c.transitions_of(1, "web");
    assert_eq!(
        b.last().map(|t| (t.to.as_str(), t.reason.as_str())),
        Some(("BACKUP", "higher_priority"))
    );
}

#[test]
fn sigterm_hands_over_with_priority_zero_after_skew_time_and_releases_the_vip() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    assert!(c.ping(2, VIP));
    assert_eq!(c.neighbour_mac(2, VIP), Some(mac_string(c.mac(0))));

    let stopped_at = c.signal(0, Signal::SIGTERM);
    let query = FailoverQuery {
        vrid: VRID,
        old_master: c.v4(0),
        stopped_at,
        vip: Some(ip(VIP)),
    };
    let f = measure_failover(&c.sniffer, &query, Duration::from_secs(3)).expect("takeover");
    let skew = skew_time(PRIO_B, FAST);
    eprintln!("graceful handover: {f:?}, Skew_Time {skew:?}");
    let release = f.death_to_release.expect("a priority-0 advert from node-a");
    assert!(release < Duration::from_millis(250), "{release:?}");
    assert_eq!(f.new_master, c.v4(1));
    // Measured from the priority-0 advert: the backup waits Skew_Time, not the down interval.
    assert_gap(&f, skew, Duration::from_millis(30));
    assert!(f.death_to_garp.is_some(), "no GARP from the new master");

    let status = c.wait_exit(0, Duration::from_secs(2));
    assert!(status.success(), "agent exited with {status}");
    assert!(!c.has(0, VIP), "node-a kept the VIP after a graceful exit");
    c.assert_only_holder(1, VIP);
    assert_eq!(c.neighbour_mac(2, VIP), Some(mac_string(c.mac(1))));
    assert!(c.ping(2, VIP), "the VIP does not answer after the handover");
    let a = c.transitions_of(0, "web");
    assert_eq!(
        a.last()
            .map(|t| (t.from.as_str(), t.to.as_str(), t.reason.as_str())),
        Some(("MASTER", "INIT", "shutdown"))
    );
    c.wait_log(0, "the release", Duration::ZERO, |l| {
        msg(l).contains("addresses released")
    });
    // The priority-0 advert really is one: same VRID, the VIP, TTL 255.
    let zero = c
        .adverts(VRID, c.v4(0), stopped_at)
        .into_iter()
        .find(|(_, a)| a.priority == 0)
        .expect("priority 0 advert")
        .1;
    assert_eq!(zero.ttl, 255);
    assert_eq!(zero.addresses, vec![ip(VIP)]);
}

// ---------------------------------------------------------------------------------------------
// 3. Reload without disturbance

#[test]
fn editing_the_manifest_file_adds_a_vip_without_disturbing_the_first_and_moves_priority() {
    let web = VipDoc::web();
    let api = VipDoc::new("api", "192.0.2.101/24", 52).preferring(&[("node-b", 50)]);
    let mut c = Cluster::with(3, false, &[&web]);
    c.start_all_and_elect_node_a();
    let web_before = c.transition_counts("web");

    let edited = Instant::now();
    c.write(&[&web, &api]);
    c.wait_master(52, c.v4(1), FAST, Duration::from_secs(3));
    let up = c.adverts(52, c.v4(1), edited)[0].0;
    eprintln!(
        "second VIP mastered {:?} after the edit",
        up.duration_since(edited)
    );
    c.assert_only_holder(1, "192.0.2.101");
    sleep_until(edited + Duration::from_millis(1200));
    c.assert_steady(VRID, c.v4(0), FAST, edited);
    assert_eq!(
        c.transition_counts("web"),
        web_before,
        "the reload disturbed VirtualIP web"
    );
    for n in 0..3 {
        assert_eq!(
            c.count_log(n, &|l| msg(l).contains("configuration changed")
                && l["vip"] == "web"),
            0
        );
    }
    c.assert_only_holder(0, VIP);

    // Give node-c the highest priority for web: with preempt on it takes over.
    let raised = web
        .clone()
        .preferring(&[("node-a", 50), ("node-b", 40), ("node-c", 80)]);
    let api_before = c.transition_counts("api");
    let edited = Instant::now();
    c.write(&[&raised, &api]);
    c.wait_master(VRID, c.v4(2), FAST, Duration::from_secs(3));
    let moved = c.adverts(VRID, c.v4(2), edited)[0].0.duration_since(edited);
    eprintln!(
        "priority change moved mastership {moved:?} after the edit (poll 200 ms + Master_Down_Interval {:?})",
        master_down_interval(180, FAST)
    );
    assert!(moved < Duration::from_millis(1500));
    c.assert_only_holder(2, VIP);
    let last = |n: usize| {
        c.transitions_of(n, "web")
            .last()
            .cloned()
            .expect("transition")
    };
    assert_eq!(
        (last(2).to.as_str(), last(2).reason.as_str()),
        ("MASTER", "preempt")
    );
    assert_eq!(
        (last(0).to.as_str(), last(0).reason.as_str()),
        ("BACKUP", "higher_priority")
    );
    c.wait_log(2, "the new priority", Duration::ZERO, |l| {
        msg(l).contains("configuration changed") && l["vip"] == "web" && l["priority"] == 180
    });
    c.assert_steady(52, c.v4(1), FAST, edited);
    assert_eq!(c.transition_counts("api"), api_before);

    // With preempt off, a backup raised above the master does not take over, and turning
    // preemption off does not disturb the running master either.
    let calm = web
        .clone()
        .preferring(&[("node-a", 50), ("node-b", 100), ("node-c", 80)])
        .without_preemption();
    c.wait_master(VRID, c.v4(2), FAST, Duration::from_secs(2));
    let web_before = c.transition_counts("web");
    let edited = Instant::now();
    c.write(&[&calm, &api]);
    c.wait_log(1, "the new priority", Duration::from_secs(2), |l| {
        msg(l).contains("configuration changed") && l["vip"] == "web" && l["priority"] == 200
    });
    sleep_until(edited + Duration::from_millis(1200));
    c.assert_steady(VRID, c.v4(2), FAST, edited);
    assert_eq!(c.transition_counts("web"), web_before);
    c.assert_only_holder(2, VIP);
}

#[test]
fn sighup_reloads_a_manifest_directory_without_disturbing_running_vips() {
    let web = VipDoc::web();
    let api = VipDoc::new("api", "192.0.2.102/24", 53);
    let mut c = Cluster::new(3, false);
    let dir = c.lab.dir().join("manifests.d");
    std::fs::create_dir(&dir).expect("mkdir");
    write_atomic(&dir.join("10-web.yaml"), &web.yaml());
    c.manifests = dir.clone();
    // Only SIGHUP may reload: the poll would come after the test ends.
    c.poll = "60m".into();
    c.start_all_and_elect_node_a();
    let web_before = c.transition_counts("web");

    let written = Instant::now();
    write_atomic(&dir.join("20-api.yaml"), &api.yaml());
    std::thread::sleep(Duration::from_millis(600));
    assert!(
        c.sniffer
            .events_since(written)
            .iter()
            .all(|e| e.advert().is_none_or(|a| a.vrid != 53)),
        "VRID 53 started without a reload"
    );

    let hup = Instant::now();
    for n in 0..3 {
        c.signal(n, Signal::SIGHUP);
    }
    c.wait_master(53, c.v4(0), FAST, Duration::from_secs(3));
    let up = c.adverts(53, c.v4(0), hup)[0].0.duration_since(hup);
    eprintln!("VIP of the new file mastered {up:?} after SIGHUP");
    for n in 0..3 {
        c.wait_log(n, "the SIGHUP", Duration::ZERO, |l| {
            msg(l).contains("SIGHUP")
        });
        c.assert_running(n);
    }
    assert_eq!(c.transition_counts("web"), web_before);
    c.assert_only_holder(0, "192.0.2.102");
    c.assert_only_holder(0, VIP);
    sleep_until(written + Duration::from_millis(1500));
    c.assert_steady(VRID, c.v4(0), FAST, written);
}

// ---------------------------------------------------------------------------------------------
// 4. Bad input

#[test]
fn invalid_virtual_ips_are_refused_by_name_and_field_and_the_valid_one_runs() {
    let bad_vrid = VipDoc::new("bad-vrid", "192.0.2.101/24", 300);
    let web = VipDoc::web();
    let dup_vrid = VipDoc::new("dup-vrid", "192.0.2.102/24", 51);
    let v6_on_v2 = VipDoc::new("v6-on-v2", "fd66:7670::100/64", 60).version_2();
    let mut c = Cluster::with(2, false, &[&bad_vrid, &web, &dup_vrid, &v6_on_v2]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    // A few polls, so that a refusal logged on every poll would show.
    std::thread::sleep(Duration::from_millis(700));

    for n in 0..2 {
        c.assert_running(n);
        for (name, field, detail) in [
            ("bad-vrid", "spec.virtualRouterId", "300"),
            // Names the VirtualIP that already has the VRID.
            ("dup-vrid", "spec.virtualRouterId", "\"web\""),
            ("v6-on-v2", "spec.vrrp.version", "IPv6"),
        ] {
            let refusals = c.count_log(n, &|l| {
                l["level"] == "WARN"
                    && l["resource"] == name
                    && msg(l).contains(field)
                    && msg(l).contains(detail)
            });
            assert_eq!(
                refusals,
                1,
                "{}: expected one refusal of {name} naming {field}",
                c.node(n).name
            );
        }
        for addr in ["192.0.2.101", "192.0.2.102", "fd66:7670::100"] {
            assert!(!c.has(n, addr), "refused {addr} is on {}", c.node(n).name);
        }
    }
    // Nothing but VRID 51 on the wire: not VRID 60, nor 44 (300 truncated to a byte).
    let vrids: BTreeSet<u8> = c
        .sniffer
        .events()
        .iter()
        .filter_map(|e| e.advert().map(|a| a.vrid))
        .collect();
    assert_eq!(vrids, BTreeSet::from([VRID]));
    assert!(
        c.sniffer
            .events()
            .iter()
            .filter_map(Event::advert)
            .all(|a| a.version == 3)
    );

    // The file stops being YAML: the VIPs loaded before keep running.
    let web_before = c.transition_counts("web");
    let broken = Instant::now();
    write_atomic(
        &c.manifests,
        "apiVersion: [ferrovip.io/v1alpha1\nkind: VirtualIP\n",
    );
    for n in 0..2 {
        c.wait_log(n, "the YAML error", Duration::from_secs(2), |l| {
            l["level"] == "WARN" && l["error"].as_str().is_some_and(|e| e.contains("YAML"))
        });
    }
    sleep_until(broken + Duration::from_millis(1000));
    c.assert_steady(VRID, c.v4(0), FAST, broken);
    c.assert_only_holder(0, VIP);
    for n in 0..2 {
        c.assert_running(n);
    }
    assert_eq!(c.transition_counts("web"), web_before);
}

// ---------------------------------------------------------------------------------------------
// 5. Bad packets

#[test]
fn malformed_or_foreign_adverts_are_dropped_and_logged_without_disturbing_the_master() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    c.debug = true;
    // node-c runs no agent: it plays a rogue peer.
    c.start_nodes(&[0, 1]);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    let rogue = c.node(2).clone();
    c.rogues.push(c.v4(2));
    let src = rogue.ipv4;
    let dst = MULTICAST_V4;
    let before = c.transition_counts("web");
    let injected = Instant::now();

    // Each would make the master step down (priority 254 > 150) if it were accepted.
    let good = || message(&advert(Version::V3, VRID, 254), src, dst);
    let altered = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut m = good();
        f(&mut m);
        fix_checksum(&mut m, src, dst);
        m
    };
    let decode_drop = |label: &'static str| {
        move |l: &Value| {
            msg(l).contains("dropped") && l["reason"] == label && l["source"] == src.to_string()
        }
    };
    let mut bad_checksum = good();
    bad_checksum[6] ^= 0x5a;
    let mut truncated = good();
    truncated.truncate(6);
    type Check = Box<dyn Fn(&Value) -> bool>;
    let cases: Vec<(&str, Vec<u8>, u8, Check)> = vec![
        (
            "TTL 64",
            good(),
            64,
            Box::new(move |l: &Value| msg(l).contains("TTL") && l["ttl"] == 64),
        ),
        (
            "bad checksum",
            bad_checksum,
            255,
            Box::new(decode_drop("bad_checksum")),
        ),
        (
            "version 4",
            altered(&|m| m[0] = 0x41),
            255,
            Box::new(decode_drop("unsupported_version")),
        ),
        (
            "type 2",
            altered(&|m| m[0] = 0x32),
            255,
            Box::new(decode_drop("unsupported_type")),
        ),
        (
            "truncated",
            truncated,
            255,
            Box::new(decode_drop("truncated")),
        ),
        (
            "count 2 with one address",
            altered(&|m| m[3] = 2),
            255,
            Box::new(decode_drop("length_mismatch")),
        ),
        (
            "count 0",
            altered(&|m| {
                m[3] = 0;
                m.truncate(8);
            }),
            255,
            Box::new(decode_drop("zero_count")),
        ),
        (
            "interval 0",
            altered(&|m| {
                m[4] = 0;
                m[5] = 0;
            }),
            255,
            Box::new(decode_drop("zero_interval")),
        ),
        (
            "unknown VRID",
            message(&advert(Version::V3, 99, 254), src, dst),
            255,
            Box::new(move |l: &Value| msg(l).contains("VRID not configured") && l["vrid"] == 99),
        ),
        (
            "VRRPv2 for a v3 VRID",
            message(&advert(Version::V2, VRID, 254), src, dst),
            255,
            Box::new(move |l: &Value| msg(l).contains("dropped") && msg(l).contains("version 2")),
        ),
    ];
    for (what, msg, ttl, check) in &cases {
        let counts: Vec<usize> = (0..2).map(|n| c.count_log(n, check.as_ref())).collect();
        c.send(2, &multicast_frame(&rogue, *ttl, msg));
        for (n, count) in counts.iter().enumerate() {
            c.wait_more_logs(
                n,
                &format!("the drop of the {what} packet"),
                *count,
                check.as_ref(),
            );
        }
    }
    eprintln!(
        "{} bad packets dropped and logged in {:?}",
        cases.len(),
        injected.elapsed()
    );
    std::thread::sleep(Duration::from_millis(300));
    for n in 0..2 {
        c.assert_running(n);
    }
    assert_eq!(
        c.transition_counts("web"),
        before,
        "an agent changed state on a bad packet"
    );
    c.assert_steady(VRID, c.v4(0), FAST, injected);
    c.assert_only_holder(0, VIP);

    // The same higher-priority advert, well-formed: the master steps down at once, which
    // proves that the packets above did reach the agents.
    let stepped = Instant::now();
    c.send(2, &multicast_frame(&rogue, 255, &good()));
    let line = c.wait_log(0, "the step-down", Duration::from_millis(500), |l| {
        l["event"] == "transition" && l["to"] == "BACKUP" && l["reason"] == "higher_priority"
    });
    eprintln!(
        "master stepped down {:?} after the injection",
        stepped.elapsed()
    );
    assert!(msg(&line).contains(&src.to_string()), "{line}");
    c.wait_address(0, VIP, false, Duration::from_millis(500));
    // The rogue never speaks again: node-a takes the VIP back after a down interval.
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(3));
    c.assert_only_holder(0, VIP);
}

// ---------------------------------------------------------------------------------------------
// 6. Leftovers

#[test]
fn a_new_agent_removes_marked_leftovers_and_never_touches_foreign_addresses() {
    let mut c = Cluster::with(1, false, &[&VipDoc::web()]);
    // iproute2 6.1 cannot set an address protocol (`ip addr add … proto` came later), so the
    // marked leftover comes from the real thing: an agent killed while master, one that keeps
    // its addresses forever (a renewed lifetime would let the kernel remove it within 1 s).
    c.extra[0] = vec!["--address-lifetime".into(), "0s".into()];
    c.start(0);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    c.wait_address(0, VIP, true, Duration::from_secs(1));
    c.signal(0, Signal::SIGKILL);
    c.wait_exit(0, Duration::from_secs(1));
    assert!(c.has(0, VIP), "a killed agent cannot release its VIP");

    // Foreign addresses: one unrelated, one equal to an address the next agent serves.
    c.exec_ok(0, &["ip", "addr", "add", "192.0.2.200/24", "dev", "eth0"]);
    c.exec_ok(0, &["ip", "addr", "add", "192.0.2.201/24", "dev", "eth0"]);
    let other = VipDoc::new("other", "192.0.2.101/24", 52).also("192.0.2.201/24");
    c.write(&[&other]);
    c.extra[0].clear();
    c.start(0);
    let line = c.wait_log(0, "the cleanup", Duration::from_secs(2), |l| {
        msg(l).contains("left behind")
    });
    assert_eq!(line["count"], 1, "{line}");
    c.wait_address(0, VIP, false, Duration::from_millis(500));
    c.wait_master(52, c.v4(0), FAST, Duration::from_secs(5));
    c.wait_address(0, "192.0.2.101", true, Duration::from_secs(1));
    assert!(c.has(0, "192.0.2.200"));
    assert!(c.has(0, "192.0.2.201"));
    // The foreign twin of a VIP is never given our renewed lifetime.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(c.has(0, "192.0.2.201"), "foreign address expired");
    let shown = c.exec_ok(0, &["ip", "addr", "show", "dev", "eth0"]);
    let twin = shown
        .split("inet ")
        .find(|s| s.starts_with("192.0.2.201/24"))
        .expect("the foreign twin");
    assert!(twin.contains("valid_lft forever"), "{twin}");

    c.signal(0, Signal::SIGTERM);
    assert!(c.wait_exit(0, Duration::from_secs(2)).success());
    assert!(!c.has(0, "192.0.2.101"), "own VIP not released");
    assert!(!c.has(0, VIP));
    assert!(c.has(0, "192.0.2.200"), "foreign address removed");
    assert!(
        c.has(0, "192.0.2.201"),
        "foreign address removed because a VIP had the same value"
    );
}

// ---------------------------------------------------------------------------------------------
// 7. Unicast peers

#[test]
fn unicast_peers_elect_and_fail_over_without_multicast_and_ignore_strangers() {
    let mut c = Cluster::new(4, false);
    c.debug = true;
    let web = VipDoc::web().unicast_peers((0..3).map(|n| c.node(n).ipv4.to_string()).collect());
    c.write(&[&web]);
    // No VRRP multicast in or out of any node.
    for n in 0..4 {
        c.exec_ok(
            n,
            &[
                "nft",
                "add table ip novrrp; \
                 add chain ip novrrp out { type filter hook output priority 0; }; \
                 add chain ip novrrp in { type filter hook input priority 0; }; \
                 add rule ip novrrp out ip daddr 224.0.0.18 counter drop; \
                 add rule ip novrrp in ip daddr 224.0.0.18 counter drop",
            ],
        );
        assert!(
            c.exec_ok(n, &["nft", "list", "ruleset"])
                .contains("224.0.0.18")
        );
    }
    let started = Instant::now();
    c.start_nodes(&[0, 1, 2]);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    c.assert_only_holder(0, VIP);
    let destinations: BTreeSet<IpAddr> = c
        .adverts(VRID, c.v4(0), started)
        .iter()
        .map(|(_, a)| a.destination)
        .collect();
    assert_eq!(
        destinations,
        BTreeSet::from([c.v4(1), c.v4(2)]),
        "adverts go to every peer but the sender itself"
    );

    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    eprintln!("unicast crash failover: {f:?}");
    assert_eq!(f.new_master, c.v4(1));
    assert!(f.death_to_advert < Duration::from_secs(1));
    assert_gap(&f, master_down_interval(PRIO_B, FAST), LATE);
    c.wait_address(1, VIP, true, Duration::from_millis(500));
    std::thread::sleep(Duration::from_millis(300));
    c.assert_clean_takeover(VRID, killed_at, c.v4(1), c.mac(1), ip(VIP));
    assert!(
        c.sniffer
            .events()
            .iter()
            .filter_map(Event::advert)
            .all(|a| a.destination != IpAddr::V4(MULTICAST_V4)),
        "an advert went to the multicast group"
    );

    // node-d is not a peer: its higher-priority advert to the master is dropped.
    let stranger = c.node(3).clone();
    c.rogues.push(c.v4(3));
    let b = c.node(1).ipv4;
    let before = c.transitions(1).len();
    let injected = Instant::now();
    let check = |l: &Value| {
        msg(l).contains("not a configured unicast peer") && l["source"] == stranger.ipv4.to_string()
    };
    let msg = message(&advert(Version::V3, VRID, 254), stranger.ipv4, b);
    c.send(3, &frame(&stranger, b, c.mac(1), 255, &msg));
    c.wait_more_logs(1, "the stranger's advert", 0, &check);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(c.transitions(1).len(), before, "the stranger moved node-b");
    c.assert_steady(VRID, c.v4(1), FAST, injected);

    // The same advert from a listed peer's address is obeyed (the injection path works).
    let mut spoofed = stranger.clone();
    spoofed.ipv4 = c.node(2).ipv4;
    let msg = message(&advert(Version::V3, VRID, 254), spoofed.ipv4, b);
    c.send(3, &frame(&spoofed, b, c.mac(1), 255, &msg));
    c.wait_log(1, "the step-down", Duration::from_millis(500), |l| {
        l["event"] == "transition" && l["to"] == "BACKUP" && l["reason"] == "higher_priority"
    });
}

// ---------------------------------------------------------------------------------------------
// 8. IPv6

#[test]
fn an_ipv6_vip_elects_fails_over_and_is_announced_with_an_unsolicited_na() {
    const VIP6: &str = "fd66:7670::100";
    let web6 = VipDoc::new("web6", "fd66:7670::100/64", 51);
    let mut c = Cluster::with(3, true, &[&web6]);
    let ll = |c: &Cluster, n: usize| IpAddr::V6(c.node(n).ipv6_ll.expect("link-local"));
    c.start_all();
    c.wait_master(VRID, ll(&c, 0), FAST, Duration::from_secs(5));
    c.assert_only_holder(0, VIP6);
    let (_, seen) = c
        .adverts(VRID, ll(&c, 0), c.sniffer.started_at())
        .pop()
        .expect("adverts");
    assert_eq!(seen.destination, ip("ff02::12"));
    assert_eq!(seen.ttl, 255);
    assert_eq!(seen.priority, PRIO_A);
    // No link-local is listed or learned, so none is made up (keepalived configured without
    // one drops a longer list): the advert lists the VIP alone.
    assert_eq!(seen.addresses, vec![ip(VIP6)]);
    assert!(c.ping(2, VIP6), "the IPv6 VIP does not answer ping");
    assert_eq!(c.neighbour_mac(2, VIP6), Some(mac_string(c.mac(0))));

    let old = ll(&c, 0);
    let stopped_at = c.signal(0, Signal::SIGKILL);
    let query = FailoverQuery {
        vrid: VRID,
        old_master: old,
        stopped_at,
        vip: Some(ip(VIP6)),
    };
    let f = measure_failover(&c.sniffer, &query, Duration::from_secs(3)).expect("takeover");
    eprintln!("IPv6 crash failover: {f:?}");
    assert_eq!(f.new_master, ll(&c, 1));
    assert!(f.death_to_advert < Duration::from_secs(1));
    assert_gap(&f, master_down_interval(PRIO_B, FAST), LATE);
    let na = c
        .sniffer
        .events_since(stopped_at)
        .into_iter()
        .find(|e| e.announced() == Some(ip(VIP6)))
        .expect("an unsolicited NA for the VIP from the new master");
    match na.kind {
        EventKind::UnsolicitedNa {
            target,
            target_mac,
            override_flag,
            ..
        } => {
            assert_eq!(target, VIP6.parse::<Ipv6Addr>().unwrap());
            assert_eq!(target_mac.map(|m| m.octets()), Some(c.mac(1)));
            assert!(override_flag);
            assert_eq!(na.src_mac.octets(), c.mac(1));
        }
        other => panic!("expected an NA, got {other:?}"),
    }
    c.wait_address(1, VIP6, true, Duration::from_millis(500));
    assert!(!c.has(2, VIP6));
    // The NA's override flag moved node-c's cache entry to node-b.
    let b_mac = mac_string(c.mac(1));
    c.wait_neighbour(2, VIP6, &b_mac);
    c.assert_clean_takeover(VRID, stopped_at, ll(&c, 1), c.mac(1), ip(VIP6));
    let took_over = c.transitions_of(1, "web6").pop().expect("a transition");
    assert_eq!(
        (
            took_over.family.as_str(),
            took_over.vrid,
            took_over.to.as_str()
        ),
        ("ipv6", u64::from(VRID), "MASTER")
    );
}

// ---------------------------------------------------------------------------------------------
// 9. VRRPv2

#[test]
fn vrrp_version_2_at_one_second_elects_and_fails_over() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web().version_2()]);
    let second = Duration::from_secs(1);
    let started = Instant::now();
    c.start_all();
    c.wait_master(VRID, c.v4(0), second, Duration::from_secs(10));
    eprintln!("VRRPv2 master elected after {:?}", started.elapsed());
    c.assert_only_holder(0, VIP);
    let (_, seen) = c.adverts(VRID, c.v4(0), started).pop().expect("adverts");
    assert_eq!((seen.version, seen.interval, seen.ttl), (2, second, 255));

    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    let expected = master_down_interval(PRIO_B, second);
    eprintln!("VRRPv2 crash failover: {f:?}, Master_Down_Interval {expected:?}");
    assert_eq!(f.new_master, c.v4(1));
    assert!(f.death_to_advert < Duration::from_millis(3700));
    assert_gap(&f, expected, LATE);
    c.wait_address(1, VIP, true, Duration::from_millis(500));
    c.assert_clean_takeover(VRID, killed_at, c.v4(1), c.mac(1), ip(VIP));
}

// ---------------------------------------------------------------------------------------------
// 10. Virtual MAC

#[test]
fn a_virtual_mac_vip_lives_on_a_macvlan_that_follows_the_master() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web().virtual_mac()]);
    c.start_all_and_elect_node_a();
    let vmac = mac_string(VMAC_51);
    let holders = |c: &Cluster, n: usize| -> Vec<(String, String, String)> {
        c.all_addresses(n)
            .into_iter()
            .filter(|(_, _, _, a)| *a == ip(VIP))
            .map(|(name, kind, mac, _)| (name, kind, mac))
            .collect()
    };
    let on_macvlan = |c: &Cluster, n: usize| {
        let h = holders(c, n);
        h.len() == 1 && h[0].1 == "macvlan" && h[0].2 == vmac
    };
    wait_until(
        "the VIP on node-a's macvlan",
        Duration::from_secs(1),
        || on_macvlan(&c, 0),
    );
    assert!(!c.has(0, VIP), "the VIP must not be on eth0 itself");
    assert!(holders(&c, 1).is_empty() && holders(&c, 2).is_empty());

    let from_a = c.adverts(VRID, c.v4(0), c.sniffer.started_at());
    assert!(!from_a.is_empty());
    let events = c.sniffer.events();
    let a_adverts: Vec<&Event> = events
        .iter()
        .filter(|e| {
            e.advert()
                .is_some_and(|a| a.vrid == VRID && a.source == c.v4(0))
        })
        .collect();
    assert!(a_adverts.iter().all(|e| e.src_mac.octets() == VMAC_51));
    let garp_from = |since: Instant| {
        c.sniffer
            .wait_for(
                |e| e.at >= since && e.announced() == Some(ip(VIP)),
                Duration::from_secs(1),
            )
            .expect("a GARP for the VIP")
    };
    let garp = garp_from(c.sniffer.started_at());
    assert_eq!(garp.src_mac.octets(), VMAC_51);
    assert!(
        matches!(garp.kind, EventKind::GratuitousArp { sender_mac, .. } if sender_mac.octets() == VMAC_51)
    );
    assert!(c.ping(2, VIP));
    assert_eq!(c.neighbour_mac(2, VIP), Some(vmac.clone()));

    // Crash: node-b takes over with the same MAC, its macvlan now holds the VIP.
    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    eprintln!("virtual-MAC crash failover: {f:?}");
    assert_eq!(f.new_master, c.v4(1));
    assert!(f.death_to_advert < Duration::from_secs(1));
    assert_gap(&f, master_down_interval(PRIO_B, FAST), LATE);
    let takeover = killed_at;
    let b_advert = c.adverts(VRID, c.v4(1), takeover);
    assert!(!b_advert.is_empty());
    let events = c.sniffer.events_since(takeover);
    assert!(
        events
            .iter()
            .filter(|e| e.advert().is_some_and(|a| a.source == c.v4(1)))
            .all(|e| e.src_mac.octets() == VMAC_51)
    );
    let garp = garp_from(takeover);
    assert_eq!(garp.src_mac.octets(), VMAC_51);
    wait_until(
        "the VIP on node-b's macvlan",
        Duration::from_secs(1),
        || on_macvlan(&c, 1),
    );
    c.assert_clean_takeover(VRID, takeover, c.v4(1), VMAC_51, ip(VIP));
    let b_macvlan = holders(&c, 1)[0].0.clone();
    assert!(b_macvlan.starts_with("fv4."), "{b_macvlan}");

    // Graceful stop of node-b: node-c takes over and node-b's macvlan is gone.
    c.signal(1, Signal::SIGTERM);
    assert!(c.wait_exit(1, Duration::from_secs(2)).success());
    assert!(
        !c.links(1).contains(&b_macvlan),
        "{b_macvlan} left behind after SIGTERM: {:?}",
        c.links(1)
    );
    assert!(holders(&c, 1).is_empty());
    c.wait_master(VRID, c.v4(2), FAST, Duration::from_secs(3));
    wait_until(
        "the VIP on node-c's macvlan",
        Duration::from_secs(1),
        || on_macvlan(&c, 2),
    );
}

// ---------------------------------------------------------------------------------------------
// 11. Restart hand-off

#[test]
fn a_restart_with_hold_keeps_the_vip_on_the_master_and_the_next_agent_adopts_it() {
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    c.extra[0] = vec!["--restart-hold".into(), "6s".into()];
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    let before: Vec<usize> = [1, 2]
        .iter()
        .map(|&n| c.transitions_of(n, "web").len())
        .collect();

    let stopped_at = c.signal(0, Signal::SIGTERM);
    let status = c.wait_exit(0, Duration::from_secs(2));
    assert!(status.success(), "agent exited with {status}");
    // The last word of the old agent: its own priority with a 1.5 s interval (6 s / 4), not 0.
    let last = c.adverts(VRID, c.v4(0), stopped_at);
    let (_, held) = last.last().expect("an advert after SIGTERM");
    assert_eq!(held.priority, PRIO_A);
    assert_eq!(held.interval, Duration::from_millis(1500));
    assert!(last.iter().all(|(_, a)| a.priority != 0), "{last:?}");
    // The address stays, with a finite lifetime, and nobody takes over meanwhile.
    assert!(c.has(0, VIP), "the held VIP was released");
    let shown = c
        .lab
        .exec(0, &["ip", "-d", "addr", "show", "dev", "eth0"])
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("dynamic"), "no finite lifetime: {shown}");
    std::thread::sleep(Duration::from_millis(1500));
    let others = masters_since(&c.wire(stopped_at), VRID, stopped_at);
    assert!(
        others.iter().all(|m| *m == c.v4(0)),
        "a backup took over during the hold: {others:?}"
    );

    let restarted = Instant::now();
    c.start(0);
    c.wait_log(0, "the adoption", Duration::from_secs(3), |l| {
        l["event"] == "transition" && l["reason"] == "adopted"
    });
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(3));
    c.assert_only_holder(0, VIP);
    // Adopted: back to the renewed one-second lifetime, not the hold's.
    let shown = c.exec_ok(0, &["ip", "addr", "show", "dev", "eth0"]);
    let vip = shown
        .split("inet ")
        .find(|s| s.starts_with(VIP_NET))
        .expect("the VIP");
    assert!(
        vip.contains("valid_lft 1sec") || vip.contains("valid_lft 0sec"),
        "lifetime not back to the renewed one: {vip}"
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.has(0, VIP), "the adopted VIP is not renewed");
    // The backups never left Backup, and the new agent's adverts are back to 100 ms.
    for (node, before) in [1, 2].into_iter().zip(before) {
        let t = c.transitions_of(node, "web");
        assert_eq!(
            t.len(),
            before,
            "node {node} moved during the restart: {t:?}"
        );
    }
    let fresh = c.adverts(VRID, c.v4(0), restarted);
    assert!(fresh.iter().any(|(_, a)| a.interval == FAST), "{fresh:?}");
}

#[test]
fn a_restart_slower_than_the_hold_moves_the_vip_before_the_held_address_expires() {
    // node-a (preferred) and node-b run agents; node-c only pings the VIP every 10 ms.
    let hold = Duration::from_secs(2);
    let mut c = Cluster::with(3, false, &[&VipDoc::web()]);
    c.extra[0] = vec!["--restart-hold".into(), "2s".into()];
    c.start_nodes(&[0, 1]);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    c.assert_only_holder(0, VIP);
    assert!(c.ping(2, VIP));
    let command = ping_command(Duration::from_millis(10), ip(VIP));
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let pinger = c.lab.spawn(2, &command, "ping.log").expect("spawn ping");
    let pings_started = SystemTime::now();
    std::thread::sleep(Duration::from_millis(300));

    // The next agent does not come within the hold.
    let stopped_at = c.signal(0, Signal::SIGTERM);
    let status = c.wait_exit(0, Duration::from_secs(2));
    assert!(status.success(), "agent exited with {status}");
    let query = FailoverQuery {
        vrid: VRID,
        old_master: c.v4(0),
        stopped_at,
        vip: Some(ip(VIP)),
    };
    let f = measure_failover(&c.sniffer, &query, hold * 2).expect("a takeover");
    let gone = time_until_gone(&c, 0, VIP, stopped_at, hold * 3);
    c.assert_only_holder(1, VIP);
    // Learned from the hold's advert: 3 × 500 ms + Skew_Time(140, 500 ms) ≈ 1.73 s.
    let expected = master_down_interval(PRIO_B, hold / 4);
    eprintln!(
        "hold {hold:?}: node-b master {:?} after SIGTERM (expected {expected:?}), its GARP at {:?}; the held VIP left node-a after {gone:?}",
        f.death_to_advert, f.death_to_garp
    );
    assert_eq!(f.new_master, c.v4(1));
    assert_eq!(f.advert_interval, hold / 4, "the hold's advert");
    assert_gap(&f, expected, LATE);
    let garp = f.death_to_garp.expect("node-b announced the VIP");
    assert!(
        garp < hold && garp <= gone,
        "a gap: node-b announced the VIP {garp:?} after SIGTERM, the held one expired after {gone:?}"
    );

    // The agent comes back late: nothing recorded is still held, and as the preferred node
    // it takes the VIP back the ordinary way.
    c.start(0);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(3));
    c.assert_only_holder(0, VIP);
    std::thread::sleep(Duration::from_millis(300));
    c.lab.kill(pinger, Signal::SIGINT).expect("stop ping");
    c.lab
        .wait(pinger, Duration::from_secs(2))
        .expect("wait")
        .expect("ping stopped");
    let (_, log) = c.lab.proc_info(pinger).expect("proc info");
    let text = std::fs::read_to_string(log).expect("ping log");
    let pings = PingTally::parse(&text).unwrap_or_else(|| panic!("no ping summary in {text}"));
    eprintln!(
        "pings every 10 ms from node-c: {} sent, {} lost",
        pings.sent,
        pings.lost()
    );
    assert!(
        pings.sent > 150,
        "the ping did not run throughout: {pings:?}"
    );
    assert_eq!(
        pings.lost(),
        0,
        "pings lost: {} (since the ping began; SIGTERM at +0.30 s)",
        pings.loss_windows(pings_started)
    );
}

// ---------------------------------------------------------------------------------------------
// Virtual services where the kernel has no IPVS (this host's kernel; the VM tests have it)

#[test]
fn without_ipvs_the_agent_says_so_once_reports_it_in_metrics_and_keeps_vrrp_running() {
    // The agent must report what the kernel really offers.
    let ipvs = Path::new("/proc/net/ip_vs").exists();
    let web = VipDoc::web().extra("  services:\n    - port: 80\n      scheduler: wrr\n      backends:\n        endpoints: [{address: 10.1.0.1, port: 8080, weight: 2}]\n");
    let mut c = Cluster::with(2, false, &[&web]);
    c.start_all_and_elect_node_a();

    // A manifest change plans again: still one warning.
    let mut changed = web;
    changed.extra = changed.extra.replace("weight: 2", "weight: 3");
    c.write(&[&changed]);
    std::thread::sleep(Duration::from_millis(800));
    let scrape = |n: usize| c.exec_ok(n, &["curl", "-sf", "http://127.0.0.1:9646/metrics"]);
    for n in 0..2 {
        let warnings: Vec<String> = c
            .log(n)
            .iter()
            .filter(|l| l["level"] == "WARN" && msg(l).contains("IPVS is not available"))
            .map(|l| msg(l).to_owned())
            .collect();
        let metrics = scrape(n);
        if ipvs {
            assert!(warnings.is_empty(), "{warnings:?}");
            assert!(metrics.contains("ferrovip_dataplane_available{dataplane=\"ipvs\"} 1"));
        } else {
            assert_eq!(
                warnings,
                [
                    "IPVS is not available in this kernel (module ip_vs not loaded?): virtual \
                  services are not forwarded on this node (VRRP keeps running)"
                ],
                "node {n}"
            );
            assert!(
                metrics.contains("ferrovip_dataplane_available{dataplane=\"ipvs\"} 0"),
                "{metrics}"
            );
        }
        assert!(metrics.contains("ferrovip_vrrp_state{"), "{metrics}");
    }
    let master = scrape(0);
    assert!(
        master
            .lines()
            .any(|l| l.starts_with("ferrovip_vrrp_state{") && l.ends_with(" 2")),
        "node-a's metrics do not show it as master:\n{master}"
    );

    // VRRP goes on regardless: the master's crash still fails over.
    let (failover, _) = c.crash_failover(0, VRID, Some(ip(VIP)));
    assert_eq!(failover.new_master, c.v4(1));
    c.assert_running(1);
}

// ---------------------------------------------------------------------------------------------
// Addresses: repair, expiry of a dead or hung agent's addresses, ownership without the mark

/// When `vip` was last seen on `node` after `since`: polls until it is gone (at most
/// `timeout`) and returns the time from `since`.
fn time_until_gone(
    c: &Cluster,
    node: usize,
    vip: &str,
    since: Instant,
    timeout: Duration,
) -> Duration {
    loop {
        if !c.has(node, vip) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < timeout,
            "{vip} still on {} {timeout:?} after the agent stopped",
            c.node(node).name
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_deleted_vip_is_added_back_and_announced_within_one_advert_interval() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    let before = c.transitions_of(0, "web").len();
    for round in 0..2 {
        let deleted = Instant::now();
        c.exec_ok(0, &["ip", "addr", "del", VIP_NET, "dev", "eth0"]);
        let mut back = None;
        while deleted.elapsed() < Duration::from_secs(1) {
            if c.has(0, VIP) {
                back = Some(deleted.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let back = back.expect("the VIP back on node-a");
        eprintln!("round {round}: VIP back {back:?} after `ip addr del` started");
        assert!(back <= FAST, "the VIP came back after {back:?}");
        // Announced again, from node-a.
        let a_mac = c.mac(0);
        c.sniffer
            .wait_for(
                |e| {
                    e.at >= deleted && e.announced() == Some(ip(VIP)) && e.src_mac.octets() == a_mac
                },
                Duration::from_secs(1),
            )
            .expect("a gratuitous ARP for the VIP after its repair");
        c.wait_log(0, "the repair", Duration::from_secs(1), |l| {
            msg(l).contains("disappeared; adding it again")
        });
        std::thread::sleep(Duration::from_millis(500));
        c.assert_steady(VRID, c.v4(0), FAST, deleted);
    }
    assert_eq!(c.transitions_of(0, "web").len(), before, "no transition");
    assert!(c.ping(1, VIP), "the VIP does not answer after its repair");
}

#[test]
fn a_vip_that_keeps_disappearing_makes_the_master_step_down_and_the_backup_take_over() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    // Something on node-a keeps deleting the VIP (say, a network manager that owns eth0).
    let started = Instant::now();
    let deleter = c
        .lab
        .spawn(
            0,
            &[
                "sh",
                "-c",
                "for i in $(seq 1 40); do ip addr del 192.0.2.100/24 dev eth0 2>/dev/null; sleep 0.05; done",
            ],
            "deleter.log",
        )
        .expect("spawn the deleter");
    let line = c.wait_log(0, "the step-down", Duration::from_secs(5), |l| {
        l["event"] == "transition" && l["reason"] == "address_fault"
    });
    assert_eq!(line["from"], "MASTER", "{line}");
    let warning = c.wait_log(0, "why", Duration::ZERO, |l| {
        msg(l).contains("stepped down: the virtual addresses cannot be held")
    });
    assert!(
        str_field(&warning, "reason").contains("192.0.2.100/24 keeps disappearing"),
        "{warning}"
    );
    // It left with priority 0, so node-b took over within Skew_Time, not Master_Down_Interval.
    // Waited for: the capture may still be decoding it when the log line is read.
    let node_a = c.v4(0);
    let zero = c
        .sniffer
        .wait_for(
            |e| {
                e.at >= started
                    && e.advert()
                        .is_some_and(|a| a.vrid == VRID && a.source == node_a && a.priority == 0)
            },
            Duration::from_secs(2),
        )
        .map(|e| (e.at, ()))
        .expect("a priority-0 advert from node-a");
    let b_first = c
        .sniffer
        .wait_for(
            |e| {
                e.at >= zero.0
                    && e.advert()
                        .is_some_and(|a| a.source == c.v4(1) && a.priority > 0)
            },
            Duration::from_secs(2),
        )
        .expect("node-b takes over");
    let gap = b_first.at.duration_since(zero.0);
    eprintln!("step-down to takeover: {gap:?}");
    assert!(gap < skew_time(PRIO_B, FAST) + LATE, "{gap:?}");
    c.lab
        .wait(deleter, Duration::from_secs(5))
        .expect("deleter");
    c.wait_master(VRID, c.v4(1), FAST, Duration::from_secs(2));
    c.assert_only_holder(1, VIP);
    // node-a waits out its back-off (10 s) instead of preempting back at once.
    let after = Instant::now();
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        c.adverts(VRID, c.v4(0), after).is_empty(),
        "node-a advertised during its back-off"
    );
    c.assert_running(0);
}

#[test]
fn a_killed_masters_vip_expires_within_two_seconds_while_the_backup_takes_over() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    // Renewed with a one-second lifetime, as the kernel shows it.
    let shown = c.exec_ok(0, &["ip", "addr", "show", "dev", "eth0"]);
    assert!(
        shown.contains("valid_lft 1sec") || shown.contains("valid_lft 0sec"),
        "{shown}"
    );

    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    assert_eq!(f.new_master, c.v4(1));
    let gone = time_until_gone(&c, 0, VIP, killed_at, Duration::from_secs(3));
    eprintln!("SIGKILL: VIP gone from node-a {gone:?} after the kill; takeover {f:?}");
    assert!(gone < Duration::from_secs(2), "{gone:?}");
    c.wait_address(1, VIP, true, Duration::from_millis(500));
}

#[test]
fn a_stopped_masters_vip_expires_and_after_sigcont_one_master_holds_it() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    assert!(c.ping(1, VIP));

    let stopped_at = c.signal(0, Signal::SIGSTOP);
    let query = FailoverQuery {
        vrid: VRID,
        old_master: c.v4(0),
        stopped_at,
        vip: Some(ip(VIP)),
    };
    let f = measure_failover(&c.sniffer, &query, Duration::from_secs(3)).expect("a takeover");
    assert_eq!(f.new_master, c.v4(1));
    let gone = time_until_gone(&c, 0, VIP, stopped_at, Duration::from_secs(3));
    eprintln!("SIGSTOP: VIP gone from node-a {gone:?} after the stop; takeover {f:?}");
    assert!(gone < Duration::from_secs(2), "{gone:?}");
    c.wait_address(1, VIP, true, Duration::from_millis(500));
    // node-b's neighbour entry for the VIP is its own; node-a's stale one would be a black hole.
    std::thread::sleep(Duration::from_millis(500));

    // node-a resumes with the higher priority: it advertises at once, node-b yields at that
    // advert, and node-a puts its expired VIP back and announces it.
    let resumed = c.signal(0, Signal::SIGCONT);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(3));
    let a_first = c
        .adverts(VRID, c.v4(0), resumed)
        .into_iter()
        .find(|(_, a)| a.priority > 0)
        .expect("node-a advertises after SIGCONT")
        .0;
    let b_last = c
        .adverts(VRID, c.v4(1), resumed)
        .into_iter()
        .filter(|(_, a)| a.priority > 0)
        .map(|(at, _)| at)
        .next_back();
    if let Some(b_last) = b_last {
        let overlap = b_last.saturating_duration_since(a_first);
        eprintln!("two masters for {overlap:?} after SIGCONT");
        assert!(overlap <= FAST + LATE, "two masters for {overlap:?}");
    }
    c.assert_only_holder(0, VIP);
    let a_mac = c.mac(0);
    c.sniffer
        .wait_for(
            |e| e.at >= resumed && e.announced() == Some(ip(VIP)) && e.src_mac.octets() == a_mac,
            Duration::from_secs(1),
        )
        .expect("node-a announces the VIP it put back");
    c.wait_neighbour(1, VIP, &mac_string(a_mac));
    assert!(c.ping(1, VIP), "the VIP does not answer after SIGCONT");
    let t = c.transitions_of(1, "web");
    assert_eq!(
        t.last().map(|t| (t.to.as_str(), t.reason.as_str())),
        Some(("BACKUP", "higher_priority"))
    );
}

#[test]
fn with_state_dir_ownership_a_demoted_master_releases_and_a_restart_removes_only_its_leftovers() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    let state = |n: usize| c.lab.dir().join(format!("state-{n}"));
    let (state_a, state_b) = (state(0), state(1));
    // The fallback for kernels before 6.1, forced on this one: no IFA_PROTO mark at all.
    // node-a keeps its addresses forever so that its crash leaves one behind.
    c.extra[0] = [
        "--address-ownership",
        "state-dir",
        "--state-dir",
        state_a.to_str().unwrap(),
        "--address-lifetime",
        "0s",
    ]
    .map(String::from)
    .to_vec();
    c.extra[1] = [
        "--address-ownership",
        "state-dir",
        "--state-dir",
        state_b.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();

    // node-b starts alone and becomes master; node-a, preferred, preempts it: the demoted
    // master finds its address through the record and removes it.
    c.start(1);
    c.wait_master(VRID, c.v4(1), FAST, Duration::from_secs(5));
    c.wait_address(1, VIP, true, Duration::from_secs(1));
    let line = c.wait_log(1, "the ownership mode", Duration::ZERO, |l| {
        msg(l).contains("recognises its addresses")
    });
    assert_eq!(line["ownership"], "state-dir", "{line}");
    c.start(0);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    c.wait_address(1, VIP, false, Duration::from_secs(1));
    c.assert_only_holder(0, VIP);
    let record = |dir: &Path| -> String {
        std::fs::read_dir(dir)
            .expect("state dir")
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("addresses-"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect()
    };
    assert!(
        record(&state_a).contains(" 192.0.2.100/24"),
        "{}",
        record(&state_a)
    );
    assert!(
        !record(&state_b).contains("192.0.2.100"),
        "{}",
        record(&state_b)
    );

    // node-a crashes and leaves its VIP; node-b takes over and then leaves too.
    c.signal(0, Signal::SIGKILL);
    c.wait_exit(0, Duration::from_secs(1));
    assert!(
        c.has(0, VIP),
        "a killed agent without lifetimes cannot release its VIP"
    );
    c.wait_master(VRID, c.v4(1), FAST, Duration::from_secs(3));
    c.signal(1, Signal::SIGTERM);
    assert!(c.wait_exit(1, Duration::from_secs(2)).success());
    assert!(!c.has(1, VIP));

    // Foreign addresses: one unrelated, one equal to an address the next agent serves.
    c.exec_ok(0, &["ip", "addr", "add", "192.0.2.200/24", "dev", "eth0"]);
    c.exec_ok(0, &["ip", "addr", "add", "192.0.2.201/24", "dev", "eth0"]);
    let other = VipDoc::new("other", "192.0.2.101/24", 52).also("192.0.2.201/24");
    c.write(&[&other]);
    c.start(0);
    let line = c.wait_log(0, "the cleanup", Duration::from_secs(2), |l| {
        msg(l).contains("left behind")
    });
    assert_eq!(line["count"], 1, "{line}");
    c.wait_address(0, VIP, false, Duration::from_millis(500));
    c.wait_master(52, c.v4(0), FAST, Duration::from_secs(5));
    c.wait_address(0, "192.0.2.101", true, Duration::from_secs(1));
    assert!(c.has(0, "192.0.2.200"));
    assert!(c.has(0, "192.0.2.201"));
    let now = record(&state_a);
    assert!(now.contains(" 192.0.2.101/24"), "{now}");
    assert!(
        !now.contains("192.0.2.201"),
        "a foreign address was recorded: {now}"
    );

    c.signal(0, Signal::SIGTERM);
    assert!(c.wait_exit(0, Duration::from_secs(2)).success());
    assert!(!c.has(0, "192.0.2.101"), "own VIP not released");
    assert!(c.has(0, "192.0.2.200"), "foreign address removed");
    assert!(
        c.has(0, "192.0.2.201"),
        "foreign address removed because a VIP had the same value"
    );
    assert_eq!(record(&state_a), "", "a clean exit leaves no record");
}

#[test]
fn with_state_dir_ownership_a_restart_hold_is_adopted_and_a_crash_leftover_is_not() {
    let mut c = Cluster::with(2, false, &[&VipDoc::web()]);
    let state_a = c.lab.dir().join("state-0");
    c.extra[0] = [
        "--address-ownership",
        "state-dir",
        "--state-dir",
        state_a.to_str().unwrap(),
        "--restart-hold",
        "6s",
    ]
    .map(String::from)
    .to_vec();
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    let b_before = c.transitions_of(1, "web").len();

    // Held: the record says until when, and the next agent adopts without an election.
    let stopped_at = c.signal(0, Signal::SIGTERM);
    assert!(c.wait_exit(0, Duration::from_secs(2)).success());
    assert!(c.has(0, VIP), "the held VIP was released");
    let record: String = std::fs::read_dir(&state_a)
        .expect("state dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("addresses-"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let line = record
        .lines()
        .find(|l| l.contains(" 192.0.2.100/24 "))
        .unwrap_or_else(|| panic!("no held entry: {record}"));
    let until: u64 = line
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .expect("held-until");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(
        until > now_ms && until <= now_ms + 6_000,
        "held until {until}, now {now_ms}"
    );
    c.start(0);
    c.wait_log(0, "the adoption", Duration::from_secs(3), |l| {
        l["event"] == "transition" && l["reason"] == "adopted"
    });
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(3));
    c.assert_only_holder(0, VIP);
    assert_eq!(
        c.transitions_of(1, "web").len(),
        b_before,
        "node-b moved during the hold"
    );
    let masters = masters_since(&c.wire(stopped_at), VRID, stopped_at);
    assert_eq!(masters, vec![c.v4(0)], "a backup took over during the hold");

    // Crashed: its VIP still has most of its one-second lifetime when the next agent starts,
    // but nothing says it was held, so it is removed at once, not adopted.
    c.signal(0, Signal::SIGKILL);
    c.wait_exit(0, Duration::from_secs(1));
    c.start(0);
    let line = c.wait_log(0, "the cleanup", Duration::from_secs(2), |l| {
        msg(l).contains("left behind")
    });
    assert_eq!(line["count"], 1, "{line}");
    assert!(
        c.count_log(0, &|l: &Value| l["reason"] == "adopted") == 0,
        "a crash leftover was adopted"
    );
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));
    c.assert_only_holder(0, VIP);
}

// ---------------------------------------------------------------------------------------------
// Refusals that keep the node safe (issue 9)

/// A node refuses, and logs by field, an address with a shorter prefix than eth0's own /24
/// (it would route a /16 through eth0) unless `allowWidePrefix` says it is meant; and a
/// dual-stack VirtualIP whose unicast allowlist lists IPv4 peers only runs its IPv4 instance
/// alone: the IPv6 one is not run, rather than falling back to multicast and accepting
/// advertisements from anyone.
#[test]
fn wide_prefixes_and_allowlists_without_a_peer_of_a_family_are_refused_and_logged() {
    let web = VipDoc::web();
    let wide = VipDoc::new("wide", "192.0.2.101/16", 52);
    let allowed = VipDoc::new("allowed", "192.0.2.102/16", 53).extra("  allowWidePrefix: true\n");
    let closed = VipDoc::new("closed", "192.0.2.103/24", 54)
        .also("fd66:7670::103/64")
        .unicast_peers(vec!["192.0.2.11".into(), "192.0.2.12".into()]);
    let mut c = Cluster::with(2, true, &[&web, &wide, &allowed, &closed]);
    let since = Instant::now();
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    c.assert_only_holder(0, "192.0.2.102");
    c.assert_only_holder(0, "192.0.2.103");
    // A few refreshes, so that a refusal logged on every retry would show.
    std::thread::sleep(Duration::from_millis(3000));
    for n in 0..2 {
        c.assert_running(n);
        let wide_refusals = c.count_log(n, &|l| {
            l["level"] == "WARN"
                && l["vip"] == "wide"
                && msg(l)
                    == "refused on this node: spec.addresses: 192.0.2.101/16 has a shorter \
                        prefix than interface eth0's subnet 192.0.2.0/24 and would route the \
                        whole range through it; use /24 or longer, or set \
                        spec.allowWidePrefix: true"
                        .replace("192.0.2.0/24", &format!("{}/24", c.node(n).ipv4))
        });
        assert_eq!(wide_refusals, 1, "{}: one refusal of wide", c.node(n).name);
        let closed_refusals = c.count_log(n, &|l| {
            l["level"] == "WARN"
                && l["resource"] == "closed"
                && msg(l).contains(
                    "spec.vrrp.unicastPeers: lists no ipv6 peer; the ipv6 instance is not run",
                )
                && msg(l).contains("its other address family keeps running")
        });
        assert_eq!(
            closed_refusals,
            1,
            "{}: one refusal of closed's IPv6",
            c.node(n).name
        );
        for addr in ["192.0.2.101", "fd66:7670::103"] {
            assert!(!c.has(n, addr), "refused {addr} is on {}", c.node(n).name);
        }
    }
    let vrids: BTreeSet<(u8, bool)> = c
        .sniffer
        .events_since(since)
        .iter()
        .filter_map(|e| e.advert().map(|a| (a.vrid, a.source.is_ipv6())))
        .collect();
    assert!(
        vrids.contains(&(53, false)) && !vrids.iter().any(|v| v.0 == 52 || *v == (54, true)),
        "no advert of the refused wide VIP nor of closed's IPv6 instance: {vrids:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Probes and the engine thread

/// Status and body of one GET to the agent's endpoint on `node`, with its latency.
fn probe(c: &Cluster, node: usize, path: &str) -> (String, String, Duration) {
    let started = Instant::now();
    let out = c
        .lab
        .exec(
            node,
            &[
                "curl",
                "-s",
                "-m",
                "5",
                "-w",
                "\n%{http_code}",
                &format!("http://127.0.0.1:9646{path}"),
            ],
        )
        .expect("curl");
    let took = started.elapsed();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.to_owned(), body.to_owned(), took)
}

/// The scheduling policy and real-time priority of the agent's thread named `name`
/// (/proc/<pid>/task/<tid>/stat fields 41 and 40).
fn thread_policy(pid: u32, name: &str) -> Option<(u32, u32)> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).ok()?;
        if comm.trim() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
        // Fields after the parenthesised command name, which may hold spaces.
        let rest = &stat[stat.rfind(')')? + 2..];
        let fields: Vec<&str> = rest.split(' ').collect();
        // `rest` starts at field 3 (state): field n is fields[n - 3].
        return Some((fields[41 - 3].parse().ok()?, fields[40 - 3].parse().ok()?));
    }
    None
}

#[test]
fn probes_reflect_sockets_outlast_idle_clients_and_the_engine_thread_runs_at_rt_priority() {
    let web = VipDoc::web();
    // A second VirtualIP on an interface the node does not have yet.
    let side = VipDoc::new("side", "198.51.100.10/24", 52)
        .yaml()
        .replace("interface: eth0", "interface: eth1");
    let mut c = Cluster::new(1, false);
    write_atomic(&c.manifests, &format!("{}---\n{side}", web.yaml()));
    c.extra[0] = vec!["--vrrp-rt-priority".into(), "10".into()];
    c.start(0);
    c.wait_master(VRID, c.v4(0), FAST, Duration::from_secs(5));

    // The engine thread, and only it, is SCHED_FIFO (policy 1) at priority 10.
    let pid = c.lab.pid(c.agent(0)).expect("agent pid");
    assert_eq!(thread_policy(pid, "vrrp-engine"), Some((1, 10)));
    assert_eq!(thread_policy(pid, "ferrovip"), Some((0, 0)));
    // The runtime runs on a thread of its own, the main thread computes (source::offload).
    assert_eq!(thread_policy(pid, "ferrovip-io"), Some((0, 0)));
    // What enters the kernel's rtnl lock runs on threads of normal priority (a preempted
    // holder of that lock must not hold the real-time thread back): address changes and link
    // reads, the latter including the refresh that finds eth1 below.
    assert_eq!(thread_policy(pid, "vrrp-effects"), Some((0, 0)));
    assert_eq!(thread_policy(pid, "vrrp-links"), Some((0, 0)));
    assert_eq!(
        c.count_log(0, &|l| msg(l)
            == "VRRP engine thread runs at SCHED_FIFO priority"),
        1
    );

    // Live, but not ready: eth1 has no VRRP socket.
    let (code, body, _) = probe(&c, 0, "/healthz");
    assert_eq!((code.as_str(), body.as_str()), ("200", "ok\n"));
    let (code, body, _) = probe(&c, 0, "/readyz");
    assert_eq!(code, "503", "{body}");
    assert!(body.starts_with("no VRRP socket on eth1 ipv4: "), "{body}");
    // Once eth1 exists, the next link refresh opens its socket: ready.
    c.exec_ok(
        0,
        &[
            "ip", "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p",
        ],
    );
    c.exec_ok(0, &["ip", "addr", "add", "198.51.100.1/24", "dev", "eth1"]);
    c.exec_ok(0, &["ip", "link", "set", "eth1p", "up"]);
    c.exec_ok(0, &["ip", "link", "set", "eth1", "up"]);
    wait_until("/readyz turns 200", Duration::from_secs(6), || {
        probe(&c, 0, "/readyz").0 == "200"
    });

    // Clients holding idle connections (silent, half a request head, or kept alive after a
    // request), five times the server's 64 slots, do not keep probes out.
    let netns = c.node(0).netns.clone();
    let (held_tx, held_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let ns = ferrovip::lab::netns::open_netns(&netns).expect("open the node's netns");
        nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut held = Vec::new();
        for i in 0..320 {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9646").expect("connect");
            match i % 3 {
                0 => {}
                1 => s.write_all(b"GET /metrics HTTP/1.1\r\nHo").unwrap(),
                _ => {
                    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                        .unwrap();
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).unwrap();
                }
            }
            held.push(s);
        }
        held_tx.send(held.len()).unwrap();
        let _ = release_rx.recv();
    });
    assert_eq!(held_rx.recv().unwrap(), 320);
    for _ in 0..5 {
        let (code, body, took) = probe(&c, 0, "/healthz");
        assert_eq!((code.as_str(), body.as_str()), ("200", "ok\n"));
        // curl's own start in the namespace is most of this.
        assert!(took < Duration::from_millis(1500), "probe took {took:?}");
    }
    assert_eq!(probe(&c, 0, "/readyz").0, "200");
    release_tx.send(()).unwrap();
    holder.join().unwrap();
    c.assert_running(0);
}

// ---------------------------------------------------------------------------------------------
// Bulk address install (a large group: one anchor address and `local` routes)

fn bulk_routes(c: &Cluster, node: usize) -> usize {
    c.exec_ok(
        node,
        &["ip", "route", "show", "table", "main", "proto", "0x46"],
    )
    .lines()
    .count()
}

#[test]
fn a_large_group_is_held_by_local_routes_that_follow_the_master_and_expire_with_its_anchor() {
    // 192.0.2.100/24 (alone with its prefix: an interface address) and 200 /32s: a bulk set.
    let mut web = VipDoc::web();
    web.addresses
        .extend((1..=200).map(|i| format!("198.18.0.{i}/32")));
    let mut c = Cluster::with(2, false, &[&web]);
    c.start_all_and_elect_node_a();
    c.assert_only_holder(0, VIP);
    wait_until("node-a's bulk routes", Duration::from_secs(2), || {
        bulk_routes(&c, 0) > 0
    });
    let addresses = c.exec_ok(0, &["ip", "-o", "addr", "show", "dev", "eth0"]);
    assert!(
        addresses.contains(" 198.18.0.1/"),
        "the anchor is an interface address: {addresses}"
    );
    assert!(
        !addresses.contains(" 198.18.0.150/"),
        "a member is an interface address: {addresses}"
    );
    for addr in ["198.18.0.2", "198.18.0.150", "198.18.0.200"] {
        assert!(c.has(0, addr), "{addr} not local on node-a");
        assert!(!c.has(1, addr), "{addr} local on the backup");
    }
    assert!(!c.has(0, "198.18.0.201"));
    // Renewed: still there after several lifetimes.
    std::thread::sleep(Duration::from_secs(3));
    assert!(c.has(0, "198.18.0.150"), "the set was not renewed");
    // The anchor deleted by hand takes the routes with it; the master puts the whole set back.
    let routes = bulk_routes(&c, 0);
    c.exec_ok(0, &["ip", "addr", "del", "198.18.0.1/32", "dev", "eth0"]);
    let back = wait_until("the set put back", Duration::from_secs(1), || {
        c.has(0, "198.18.0.1") && bulk_routes(&c, 0) == routes
    });
    eprintln!("bulk set repaired {back:?} after its anchor was deleted");
    assert!(c.has(0, "198.18.0.150"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bulk_routes(&c, 0),
        routes,
        "the repaired set was not renewed"
    );

    let (f, killed_at) = c.crash_failover(0, VRID, Some(ip(VIP)));
    assert_eq!(f.new_master, c.v4(1));
    wait_until("the set on node-b", Duration::from_secs(1), || {
        c.has(1, "198.18.0.150") && bulk_routes(&c, 1) > 0
    });
    // The dead agent's anchor expires and takes every route with it.
    wait_until("node-a's routes gone", Duration::from_secs(3), || {
        bulk_routes(&c, 0) == 0 && !c.has(0, "198.18.0.150")
    });
    eprintln!(
        "bulk set of node-a gone {:?} after the kill",
        killed_at.elapsed()
    );
}

#[test]
fn a_restart_with_hold_keeps_a_large_group_and_the_next_agent_adopts_its_routes() {
    let mut web = VipDoc::web();
    web.addresses
        .extend((1..=200).map(|i| format!("198.18.0.{i}/32")));
    let mut c = Cluster::with(2, false, &[&web]);
    c.extra[0] = vec!["--restart-hold".into(), "6s".into()];
    c.start_all_and_elect_node_a();
    wait_until("node-a's bulk routes", Duration::from_secs(2), || {
        bulk_routes(&c, 0) > 0
    });
    let routes = bulk_routes(&c, 0);
    let before = c.transitions_of(1, "web").len();
    c.signal(0, Signal::SIGTERM);
    let status = c.wait_exit(0, Duration::from_secs(2));
    assert!(status.success(), "agent exited with {status}");
    // Held: the anchor keeps the hold as its lifetime, so the routes stay past 1 s.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(bulk_routes(&c, 0), routes, "the held set went");
    assert!(c.has(0, "198.18.0.150"));
    c.start(0);
    c.wait_log(0, "the adoption", Duration::from_secs(3), |l| {
        l["event"] == "transition" && l["reason"] == "adopted"
    });
    // Adopted, not reinstalled: back on the renewed lifetime (the effects run just after the
    // transition), and still there later.
    wait_until(
        "the anchor back on the renewed lifetime",
        Duration::from_secs(1),
        || {
            let anchor = c.exec_ok(
                0,
                &["ip", "addr", "show", "dev", "eth0", "to", "198.18.0.1/32"],
            );
            anchor.contains("valid_lft 1sec") || anchor.contains("valid_lft 0sec")
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(bulk_routes(&c, 0), routes);
    assert!(c.has(0, "198.18.0.150"));
    assert_eq!(
        c.transitions_of(1, "web").len(),
        before,
        "node-b moved during the restart"
    );
}
