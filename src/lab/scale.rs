//! `ferrovip lab --vips N`: thousands of VIPs in a few sharing groups on one segment, and what
//! a crash or a graceful stop of one master costs, address by address.
//!
//! The VIPs are split into `groups` sharing groups (VirtualIPs of at most 1,000 addresses with
//! identical settings share one VRRP instance); group `g` prefers node `g mod nodes`, so the
//! masters are spread and stopping one node moves only its groups. Each round stops the agent
//! that masters group 0 and measures, relative to the moment the signal was sent:
//!
//! - when each of the group's addresses was **configured** on the new master: the rtnetlink
//!   notifications (`RTM_NEWADDR` for an interface address, `RTM_NEWROUTE` for a `local` route
//!   covering many) that `ip -ts monitor` prints in that node's namespace;
//! - when each address was **announced** on the wire: the first gratuitous ARP (unsolicited NA)
//!   for it that crossed the bridge, from `dumpcap`'s kernel timestamps (a TPACKET ring that
//!   keeps up with a burst of 10,000 frames, which a plain socket read in user space would not);
//! - whether any other group changed master (it must not), and whether a sample of the moved
//!   addresses answers ping from a third node.
//!
//! The same code measures keepalived ([`Daemon::Keepalived`]) on the same lab for comparison.
//! Timestamps are wall-clock (`CLOCK_REALTIME`) on both sides: the kill, `ip -ts` and pcap.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ipnet::{IpNet, Ipv4Net};
use nix::sys::signal::Signal;
use serde::Serialize;

use super::LabError;
use super::measure::{master_down_interval, skew_time};
use super::netns::{Lab, LabSpec, ProcId, log_tail};
use super::run::{Out, clean_and_create, validate_nodes_and_interval};
use super::sniffer::Sniffer;
use super::wire::{EventKind, MacAddr, parse_frame};

/// Addresses per VirtualIP (the CRD allows 1,024).
const PER_VIRTUALIP: usize = 1000;
/// IPv4 VIPs start at 10.80.1.0 in the lab's 10.80.0.0/16 (nodes are .0.11, .0.12, …).
const SUBNET_V4: [u8; 4] = [10, 80, 0, 0];
const SUBNET_V4_LEN: u8 = 16;
const FIRST_VIP_V4: u32 = 256;
/// IPv6 VIPs are fd66:7670::1:0 onwards in the lab's ULA /64.
const FIRST_VIP_V6: u128 = 0xfd66_7670_0000_0000_0000_0000_0001_0000;
const BASE_PRIORITY: u8 = 50;
/// After the takeover, how long the announcements of 10,000 addresses may take to finish.
const ANNOUNCE_WINDOW: Duration = Duration::from_secs(3);
const LOG_LINES: usize = 20;
/// How long the groups may take to settle again after the stopped daemon restarts.
const RESETTLE: Duration = Duration::from_secs(30);
/// What the pcap capture keeps: VRRP adverts, ARP, ICMPv6.
const CAPTURE_FILTER: &str = "arp or icmp6 or ip proto 112 or ip6 proto 112";

/// What runs on the nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Daemon {
    /// `BINARY agent --node-name N --manifests PATH EXTRA…`.
    Ferrovip {
        binary: PathBuf,
        extra_args: Vec<String>,
    },
    /// Debian's keepalived (`/usr/sbin/keepalived`), one `vrrp_instance` per group with the
    /// group's addresses in `virtual_ipaddress_excluded` (not listed in adverts) but the first.
    Keepalived,
}

impl Daemon {
    pub fn label(&self) -> &'static str {
        match self {
            Daemon::Ferrovip { .. } => "ferrovip",
            Daemon::Keepalived => "keepalived",
        }
    }
}

/// A scale run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScaleOptions {
    pub nodes: usize,
    pub interval: Duration,
    /// Total VIPs over all groups.
    pub vips: usize,
    /// IPv6 VIPs instead of IPv4.
    pub ipv6: bool,
    /// Sharing groups (one VRRP instance each), spread over the nodes.
    pub groups: usize,
    /// Crash rounds (SIGKILL of group 0's master).
    pub crash_rounds: usize,
    /// Graceful rounds (SIGTERM: priority 0, takeover after Skew_Time).
    pub graceful_rounds: usize,
    /// Measure idle CPU and RSS of every node over this window once settled.
    pub idle_window: Option<Duration>,
    pub daemon: Daemon,
    pub quiet: bool,
    /// Keep the lab's directory (logs, manifests, monitor output) after the run.
    pub keep_logs: bool,
}

impl Default for ScaleOptions {
    fn default() -> Self {
        ScaleOptions {
            nodes: 3,
            interval: Duration::from_millis(10),
            vips: 10_000,
            ipv6: false,
            groups: 3,
            crash_rounds: 1,
            graceful_rounds: 1,
            idle_window: Some(Duration::from_secs(10)),
            daemon: Daemon::Ferrovip {
                binary: PathBuf::from("ferrovip"),
                extra_args: Vec::new(),
            },
            quiet: false,
            keep_logs: false,
        }
    }
}

/// First, median and last of a set of delays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Spread {
    pub first: Duration,
    pub median: Duration,
    pub last: Duration,
}

impl Spread {
    pub fn of(mut values: Vec<Duration>) -> Option<Spread> {
        if values.is_empty() {
            return None;
        }
        values.sort();
        Some(Spread {
            first: values[0],
            median: values[values.len() / 2],
            last: values[values.len() - 1],
        })
    }
}

/// One stop of group 0's master.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScaleRound {
    /// `crash` (SIGKILL) or `graceful` (SIGTERM).
    pub kind: &'static str,
    pub stopped: String,
    pub new_master: Option<String>,
    /// Addresses of the group that moved.
    pub addresses: usize,
    /// Master_Down_Interval (crash) or Skew_Time (graceful) for the new master's priority.
    pub expected: Duration,
    /// Signal → the new master's first advert on the wire.
    pub takeover: Option<Duration>,
    /// Signal → each address configured on the new master.
    pub configured: Option<Spread>,
    /// Signal → the first announcement of each address on the wire.
    pub announced: Option<Spread>,
    /// Addresses never seen configured / announced within the window.
    pub not_configured: usize,
    pub not_announced: usize,
    /// Announcement frames for the group's addresses on the wire in the window (all rounds).
    pub announcement_frames: usize,
    /// Groups other than group 0 whose master changed (must be none).
    pub others_moved: Vec<usize>,
    /// First, middle and last moved address answered ping from a node not involved.
    pub reachable: bool,
}

/// Idle cost of one node's daemon (its whole process group).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeCost {
    pub node: String,
    /// Groups it masters.
    pub masters: usize,
    pub cpu_percent_of_one_core: f64,
    pub rss_mib: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScaleReport {
    pub daemon: &'static str,
    pub nodes: usize,
    pub vips: usize,
    pub family: &'static str,
    pub groups: usize,
    pub interval: Duration,
    /// Agents started → every group mastered by its preferred node alone.
    pub time_to_settle: Duration,
    pub idle: Vec<NodeCost>,
    pub rounds: Vec<ScaleRound>,
    pub warnings: Vec<String>,
}

/// The VIPs of the run and their groups.
#[derive(Debug, Clone)]
pub struct Layout {
    pub groups: Vec<Vec<IpAddr>>,
    pub prefix_len: u8,
    group_of: HashMap<IpAddr, usize>,
}

impl Layout {
    pub fn new(vips: usize, groups: usize, ipv6: bool) -> Layout {
        let groups = groups.clamp(1, vips.max(1));
        let prefix_len = if ipv6 { 64 } else { SUBNET_V4_LEN };
        let address = |i: usize| -> IpAddr {
            if ipv6 {
                IpAddr::V6(Ipv6Addr::from(FIRST_VIP_V6 + i as u128))
            } else {
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::from(SUBNET_V4)) + FIRST_VIP_V4 + i as u32,
                ))
            }
        };
        let mut out = vec![Vec::new(); groups];
        let mut group_of = HashMap::with_capacity(vips);
        // Contiguous blocks: group g holds the g-th share of the range.
        for i in 0..vips {
            let g = i * groups / vips;
            let a = address(i);
            out[g].push(a);
            group_of.insert(a, g);
        }
        Layout {
            groups: out,
            prefix_len,
            group_of,
        }
    }

    pub fn group_of(&self, address: &IpAddr) -> Option<usize> {
        self.group_of.get(address).copied()
    }
}

/// The preferred node of group `g` gets priority 250, the next 150, the others 50: far enough
/// apart that at 10 ms adverts (Skew_Time differs by 3.9 ms between 250 and 150) the
/// expected backup wins the race after a crash, and no preemption follows.
fn group_priority(group: usize, node: usize, nodes: usize) -> u8 {
    match (node + nodes - group % nodes) % nodes {
        0 => BASE_PRIORITY + 200,
        1 => BASE_PRIORITY + 100,
        _ => BASE_PRIORITY,
    }
}

/// The VirtualIP manifest of the run (every agent reads the same file).
pub fn scale_manifest(layout: &Layout, node_names: &[String], interval: Duration) -> String {
    let mut text = String::new();
    for (g, addresses) in layout.groups.iter().enumerate() {
        let mut preferred = String::new();
        for (n, name) in node_names.iter().enumerate() {
            let weight = group_priority(g, n, node_names.len()) - BASE_PRIORITY;
            if weight > 0 {
                let _ = writeln!(preferred, "      - {{nodeName: {name}, weight: {weight}}}");
            }
        }
        for (k, chunk) in addresses.chunks(PER_VIRTUALIP).enumerate() {
            let list: Vec<String> = chunk
                .iter()
                .map(|a| format!("\"{a}/{}\"", layout.prefix_len))
                .collect();
            let _ = write!(
                text,
                "---
apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: scale-g{g}-{k}
spec:
  addresses: [{}]
  interface: eth0
  vrrp:
    version: 3
    advertisementInterval: {}ms
    preempt: true
  priority:
    base: {BASE_PRIORITY}
    preferredNodes:
{preferred}",
                list.join(", "),
                interval.as_millis()
            );
        }
    }
    text
}

/// keepalived's configuration for node `node`: one instance per group, VRID 10 + g.
pub fn keepalived_conf(
    layout: &Layout,
    node: usize,
    nodes: usize,
    name: &str,
    interval: Duration,
) -> String {
    let mut text = format!("global_defs {{\n  router_id {name}\n  vrrp_version 3\n}}\n");
    for (g, addresses) in layout.groups.iter().enumerate() {
        let Some((first, rest)) = addresses.split_first() else {
            continue;
        };
        let _ = write!(
            text,
            "vrrp_instance g{g} {{\n  state BACKUP\n  interface eth0\n  virtual_router_id {}\n  priority {}\n  advert_int {}\n  virtual_ipaddress {{\n    {first}/{} dev eth0\n  }}\n  virtual_ipaddress_excluded {{\n",
            keepalived_vrid(g),
            group_priority(g, node, nodes),
            interval.as_secs_f64(),
            layout.prefix_len,
        );
        for a in rest {
            let _ = writeln!(text, "    {a}/{} dev eth0", layout.prefix_len);
        }
        text.push_str("  }\n}\n");
    }
    text
}

fn keepalived_vrid(group: usize) -> u8 {
    10 + (group % 240) as u8
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs a scale lab: builds it, starts the daemons, waits for every group's preferred master,
/// measures idle cost, then the crash and graceful rounds. The lab is removed at the end
/// (also on error).
pub fn run_scale(opts: &ScaleOptions) -> Result<ScaleReport, LabError> {
    validate(opts)?;
    super::netns::require_ip()?;
    require_program("dumpcap", "tshark")?;
    if opts.daemon == Daemon::Keepalived {
        require_program("keepalived", "keepalived")?;
    }
    let out = Out { quiet: opts.quiet };
    let lab = clean_and_create(
        LabSpec {
            nodes: opts.nodes,
            subnet_v4: Ipv4Net::new(Ipv4Addr::from(SUBNET_V4), SUBNET_V4_LEN)
                .map_err(|e| LabError::InvalidSpec(e.to_string()))?,
            ipv6: opts.ipv6,
            ..LabSpec::default()
        },
        &out,
    )?;
    let sniffer = Sniffer::start(&lab)?;
    let layout = Layout::new(opts.vips, opts.groups, opts.ipv6);
    let mut run = ScaleRun {
        lab: &lab,
        sniffer: &sniffer,
        opts,
        out,
        layout,
        daemons: vec![None; opts.nodes],
        starts: vec![0; opts.nodes],
        monitors: Vec::new(),
        vrids: BTreeMap::new(),
        warnings: Vec::new(),
    };
    let result = run.run();
    if result.is_err() || opts.keep_logs {
        lab.keep_dir(true);
        run.out
            .line(format!("logs kept in {}", lab.dir().display()));
    }
    result
}

fn validate(opts: &ScaleOptions) -> Result<(), LabError> {
    validate_nodes_and_interval(opts.nodes, opts.interval)?;
    let max = if opts.ipv6 { 1 << 20 } else { 60_000 };
    if !(1..=max).contains(&opts.vips) {
        return Err(LabError::InvalidSpec(format!(
            "--vips must be 1 to {max}, got {}",
            opts.vips
        )));
    }
    if opts.groups == 0 || opts.groups > opts.vips || opts.groups > 200 {
        return Err(LabError::InvalidSpec(format!(
            "--groups must be 1 to min(200, --vips), got {}",
            opts.groups
        )));
    }
    if let Daemon::Ferrovip { binary, .. } = &opts.daemon
        && !binary.exists()
    {
        return Err(LabError::InvalidSpec(format!(
            "agent binary {} does not exist",
            binary.display()
        )));
    }
    Ok(())
}

fn require_program(program: &'static str, package: &'static str) -> Result<(), LabError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
        || Path::new("/usr/sbin").join(program).is_file();
    if found {
        Ok(())
    } else {
        Err(LabError::MissingTool { program, package })
    }
}

struct ScaleRun<'a> {
    lab: &'a Lab,
    sniffer: &'a Sniffer,
    opts: &'a ScaleOptions,
    out: Out,
    layout: Layout,
    daemons: Vec<Option<ProcId>>,
    starts: Vec<usize>,
    /// `ip -ts monitor` per node, with its log.
    monitors: Vec<(ProcId, PathBuf)>,
    /// Group → VRID, learned from the adverts (ferrovip derives VRIDs from the settings).
    vrids: BTreeMap<usize, u8>,
    warnings: Vec<String>,
}

impl ScaleRun<'_> {
    fn run(&mut self) -> Result<ScaleReport, LabError> {
        let opts = self.opts;
        let names: Vec<String> = self.lab.nodes().iter().map(|n| n.name.clone()).collect();
        let family = if opts.ipv6 { "IPv6" } else { "IPv4" };
        self.out.line(format!(
            "ferrovip lab (scale): {} nodes, {} {family} VIPs in {} groups, {}, adverts every {} ms",
            opts.nodes,
            opts.vips,
            self.layout.groups.len(),
            opts.daemon.label(),
            opts.interval.as_millis()
        ));
        match &opts.daemon {
            Daemon::Ferrovip { .. } => {
                let path = self.lab.dir().join("virtualips.yaml");
                write_file(&path, &scale_manifest(&self.layout, &names, opts.interval))?;
            }
            Daemon::Keepalived => {
                for (n, name) in names.iter().enumerate() {
                    let path = self.lab.dir().join(format!("{name}.keepalived.conf"));
                    let conf = keepalived_conf(&self.layout, n, opts.nodes, name, opts.interval);
                    write_file(&path, &conf)?;
                }
            }
        }
        for (node, name) in names.iter().enumerate() {
            let id = self.lab.spawn(
                node,
                &["env", "TZ=UTC", "ip", "-ts", "monitor", "address", "route"],
                format!("{name}.monitor.log"),
            )?;
            let log = self.lab.proc_info(id)?.1;
            self.monitors.push((id, log));
        }
        let started = Instant::now();
        for node in 0..opts.nodes {
            self.start(node)?;
        }
        self.wait_settled(started, self.settle_timeout())?;
        let time_to_settle = started.elapsed();
        self.out.line(format!(
            "every group mastered by its preferred node after {:.2} s",
            time_to_settle.as_secs_f64()
        ));
        let idle = match opts.idle_window {
            Some(window) => self.idle(window)?,
            None => Vec::new(),
        };
        let mut rounds = Vec::new();
        let signals = std::iter::repeat_n(Signal::SIGKILL, opts.crash_rounds)
            .chain(std::iter::repeat_n(Signal::SIGTERM, opts.graceful_rounds));
        for signal in signals {
            let round = self.round(signal)?;
            let taken_over = round.new_master.is_some();
            rounds.push(round);
            if !taken_over {
                break;
            }
            // Restart the stopped daemon and wait for it to preempt its group back. A daemon
            // that never settles again (keepalived with 10,000 addresses) ends the run with
            // the rounds measured so far.
            let restarted = Instant::now();
            self.start(0)?;
            if self.wait_settled(restarted, RESETTLE).is_err() {
                self.warn(format!(
                    "the groups did not settle again within {} s of the restart; no more rounds",
                    RESETTLE.as_secs()
                ));
                break;
            }
        }
        Ok(ScaleReport {
            daemon: opts.daemon.label(),
            nodes: opts.nodes,
            vips: opts.vips,
            family,
            groups: self.layout.groups.len(),
            interval: opts.interval,
            time_to_settle,
            idle,
            rounds,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn settle_timeout(&self) -> Duration {
        Duration::from_secs(60) + Duration::from_millis(self.opts.vips as u64 * 2)
    }

    fn warn(&mut self, warning: String) {
        self.out.line(format!("  warning: {warning}"));
        self.warnings.push(warning);
    }

    fn start(&mut self, node: usize) -> Result<(), LabError> {
        self.starts[node] += 1;
        let name = self.lab.node(node).name.clone();
        let log = format!("{name}.{}.log", self.starts[node]);
        let dir = self.lab.dir().to_path_buf();
        let id = match &self.opts.daemon {
            Daemon::Ferrovip { binary, extra_args } => {
                let binary = binary.to_string_lossy().into_owned();
                let manifest = dir.join("virtualips.yaml").to_string_lossy().into_owned();
                // The state directory is the lab's per-node one (Lab::state_dir).
                let mut args = vec![
                    binary.as_str(),
                    "agent",
                    "--node-name",
                    &name,
                    "--manifests",
                    &manifest,
                ];
                args.extend(extra_args.iter().map(String::as_str));
                self.lab.spawn(node, &args, log)?
            }
            Daemon::Keepalived => {
                let conf = dir.join(format!("{name}.keepalived.conf"));
                self.lab.spawn_keepalived(node, &conf, log)?
            }
        };
        self.daemons[node] = Some(id);
        Ok(())
    }

    fn daemon(&self, node: usize) -> Result<ProcId, LabError> {
        self.daemons[node].ok_or_else(|| LabError::InvalidSpec(format!("no daemon on node {node}")))
    }

    fn check_alive(&self) -> Result<(), LabError> {
        for (node, id) in self.daemons.iter().enumerate() {
            let Some(id) = id else { continue };
            if let Some(status) = self.lab.exit_status(*id)? {
                return Err(LabError::AgentExited {
                    node: self.lab.node(node).name.clone(),
                    status,
                    log_tail: log_tail(&self.lab.proc_info(*id)?.1, LOG_LINES),
                });
            }
        }
        Ok(())
    }

    fn logs(&self) -> String {
        self.lab
            .log_tails(self.daemons.iter().flatten().copied(), LOG_LINES)
    }

    /// The group an advert belongs to: by its first listed address (ferrovip), or by its
    /// VRID (keepalived's fixed VRIDs).
    fn advert_group(&self, vrid: u8, addresses: &[IpAddr]) -> Option<usize> {
        match self.opts.daemon {
            Daemon::Keepalived => {
                (0..self.layout.groups.len()).find(|g| keepalived_vrid(*g) == vrid)
            }
            Daemon::Ferrovip { .. } => addresses.iter().find_map(|a| self.layout.group_of(a)),
        }
    }

    /// Per group, the sources of adverts with priority > 0 since `since`.
    fn masters_since(&mut self, since: Instant) -> BTreeMap<usize, BTreeSet<IpAddr>> {
        let mut masters: BTreeMap<usize, BTreeSet<IpAddr>> = BTreeMap::new();
        for event in self.sniffer.events_since(since) {
            let Some(advert) = event.advert() else {
                continue;
            };
            if advert.priority == 0 {
                continue;
            }
            let group = match self.vrids.iter().find(|(_, v)| **v == advert.vrid) {
                Some((g, _)) => Some(*g),
                None => {
                    let g = self.advert_group(advert.vrid, &advert.addresses);
                    if let Some(g) = g {
                        self.vrids.insert(g, advert.vrid);
                    }
                    g
                }
            };
            if let Some(g) = group {
                masters.entry(g).or_default().insert(advert.source);
            }
        }
        masters
    }

    fn preferred_addr(&self, group: usize) -> IpAddr {
        self.node_addr(group % self.opts.nodes)
    }

    fn node_addr(&self, node: usize) -> IpAddr {
        let n = self.lab.node(node);
        if self.opts.ipv6 {
            // IPv6 adverts come from the link-local.
            IpAddr::V6(n.ipv6_ll.unwrap_or(Ipv6Addr::UNSPECIFIED))
        } else {
            IpAddr::V4(n.ipv4)
        }
    }

    fn node_of(&self, addr: IpAddr) -> Option<usize> {
        (0..self.opts.nodes).find(|n| self.node_addr(*n) == addr)
    }

    /// Waits until, over one whole window, every group was advertised by its preferred node
    /// alone.
    fn wait_settled(&mut self, since: Instant, timeout: Duration) -> Result<(), LabError> {
        let window = master_down_interval(1, self.opts.interval) + self.opts.interval * 2;
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            let now = Instant::now();
            if let Some(start) = now.checked_sub(window).filter(|s| *s >= since) {
                let masters = self.masters_since(start);
                let settled = (0..self.layout.groups.len()).all(|g| {
                    masters
                        .get(&g)
                        .is_some_and(|m| m.len() == 1 && m.contains(&self.preferred_addr(g)))
                });
                if settled {
                    return Ok(());
                }
                if now >= deadline {
                    let described: Vec<String> = (0..self.layout.groups.len())
                        .map(|g| {
                            let m = masters.get(&g).map(|m| {
                                m.iter()
                                    .map(IpAddr::to_string)
                                    .collect::<Vec<_>>()
                                    .join("+")
                            });
                            format!("group {g}: {}", m.unwrap_or_else(|| "none".into()))
                        })
                        .collect();
                    return Err(LabError::NoSingleMaster {
                        waited: timeout,
                        masters: described.join(", "),
                        logs: self.logs(),
                    });
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn idle(&mut self, window: Duration) -> Result<Vec<NodeCost>, LabError> {
        // Let the takeover bursts and the first renewals pass.
        std::thread::sleep(Duration::from_secs(2));
        let groups: Vec<i32> = (0..self.opts.nodes)
            .map(|n| Ok(self.lab.pid(self.daemon(n)?)? as i32))
            .collect::<Result<_, LabError>>()?;
        let before: Vec<u64> = groups.iter().map(|g| group_usage(*g).0).collect();
        let t0 = Instant::now();
        std::thread::sleep(window);
        let elapsed = t0.elapsed().as_secs_f64();
        let ticks = clock_ticks();
        let mut costs = Vec::new();
        self.out.line("idle:");
        for (n, pgid) in groups.iter().enumerate() {
            let (after, rss_kib) = group_usage(*pgid);
            let cpu = (after.saturating_sub(before[n])) as f64 / ticks / elapsed * 100.0;
            let masters = (0..self.layout.groups.len())
                .filter(|g| g % self.opts.nodes == n)
                .count();
            let cost = NodeCost {
                node: self.lab.node(n).name.clone(),
                masters,
                cpu_percent_of_one_core: (cpu * 10.0).round() / 10.0,
                rss_mib: (rss_kib as f64 / 1024.0 * 10.0).round() / 10.0,
            };
            self.out.line(format!(
                "  {}: master of {} groups, {:.1} % of a core, {:.1} MiB RSS",
                cost.node, cost.masters, cost.cpu_percent_of_one_core, cost.rss_mib
            ));
            costs.push(cost);
        }
        self.check_alive()?;
        Ok(costs)
    }

    fn round(&mut self, signal: Signal) -> Result<ScaleRound, LabError> {
        let kind = if signal == Signal::SIGKILL {
            "crash"
        } else {
            "graceful"
        };
        let victim = 0;
        let victim_name = self.lab.node(victim).name.clone();
        self.out.line(format!(
            "{kind}: {} the {} on {victim_name} (master of group 0, {} addresses)",
            if signal == Signal::SIGKILL {
                "SIGKILL"
            } else {
                "SIGTERM"
            },
            self.opts.daemon.label(),
            self.layout.groups[0].len()
        ));
        let before = self.masters_since(
            Instant::now() - (self.opts.interval * 4).max(Duration::from_millis(300)),
        );
        let capture = Capture::start(self.lab, kind)?;
        let monitor_marks: Vec<u64> = self
            .monitors
            .iter()
            .map(|(_, log)| std::fs::metadata(log).map(|m| m.len()).unwrap_or(0))
            .collect();
        let killed_at = SystemTime::now();
        let killed_instant = Instant::now();
        self.lab.kill(self.daemon(victim)?, signal)?;
        // The takeover, then the announcements.
        let vrid = self.vrids.get(&0).copied();
        let victim_addr = self.node_addr(victim);
        let limit = master_down_interval(1, self.opts.interval) * 3 + Duration::from_secs(3);
        let seen = self.sniffer.wait_for(
            |e| {
                e.at >= killed_instant
                    && e.advert().is_some_and(|a| {
                        Some(a.vrid) == vrid && a.priority > 0 && a.source != victim_addr
                    })
            },
            limit,
        );
        std::thread::sleep(ANNOUNCE_WINDOW);
        let frames = capture.stop(self.lab)?;
        if self
            .lab
            .wait(self.daemon(victim)?, Duration::from_secs(3))?
            .is_none()
        {
            self.warn(format!(
                "the {} on {victim_name} did not exit",
                self.opts.daemon.label()
            ));
            self.lab.kill(self.daemon(victim)?, Signal::SIGKILL)?;
            self.lab
                .wait(self.daemon(victim)?, Duration::from_secs(2))?;
        }
        let new_master = seen
            .as_ref()
            .and_then(|e| e.advert())
            .and_then(|a| self.node_of(a.source));
        let group: Vec<IpAddr> = self.layout.groups[0].clone();
        let members: BTreeSet<IpAddr> = group.iter().copied().collect();
        let since = |t: SystemTime| t.duration_since(killed_at).ok();
        let takeover = frames.iter().find_map(|f| match &f.kind {
            EventKind::Advert(a)
                if Some(a.vrid) == vrid && a.priority > 0 && a.source != victim_addr =>
            {
                since(f.at)
            }
            _ => None,
        });
        let expected_priority =
            new_master.map_or(BASE_PRIORITY, |n| group_priority(0, n, self.opts.nodes));
        let expected = if signal == Signal::SIGKILL {
            master_down_interval(expected_priority, self.opts.interval)
        } else {
            skew_time(expected_priority, self.opts.interval)
        };
        let mut announced: HashMap<IpAddr, Duration> = HashMap::new();
        let mut announcement_frames = 0;
        let new_mac = new_master.map(|n| self.lab.node(n).mac);
        for f in &frames {
            let target = match &f.kind {
                EventKind::GratuitousArp { sender_ip, .. } => IpAddr::V4(*sender_ip),
                EventKind::UnsolicitedNa { target, .. } => IpAddr::V6(*target),
                EventKind::Advert(_) => continue,
            };
            if !members.contains(&target)
                || Some(f.src_mac) != new_mac && new_mac.is_some() && !virtual_mac(f.src_mac)
            {
                continue;
            }
            let Some(d) = since(f.at) else { continue };
            announcement_frames += 1;
            announced.entry(target).or_insert(d);
        }
        let configured = match new_master {
            Some(n) => {
                let (_, log) = &self.monitors[n];
                let changes = read_monitor(log, monitor_marks[n])?;
                configured_times(&changes, &members, killed_at)
            }
            None => HashMap::new(),
        };
        // Groups other than 0: the same single master before and after.
        let after = self.masters_since(killed_instant + Duration::from_millis(500));
        let others_moved: Vec<usize> = (1..self.layout.groups.len())
            .filter(|g| before.get(g) != after.get(g))
            .collect();
        let reachable = match new_master {
            Some(n) => self.ping_sample(&group, victim, n)?,
            None => false,
        };
        let round = ScaleRound {
            kind,
            stopped: victim_name.clone(),
            new_master: new_master.map(|n| self.lab.node(n).name.clone()),
            addresses: group.len(),
            expected,
            takeover,
            configured: Spread::of(configured.values().copied().collect()),
            announced: Spread::of(announced.values().copied().collect()),
            not_configured: group.len() - configured.len(),
            not_announced: group.len() - announced.len(),
            announcement_frames,
            others_moved,
            reachable,
        };
        self.print_round(&round);
        if round.new_master.is_none() {
            self.warn(format!(
                "no other node advertised group 0 within {:.1} s of the signal",
                limit.as_secs_f64()
            ));
        }
        if !round.others_moved.is_empty() {
            self.warn(format!(
                "groups {:?} changed master although their master was not stopped",
                round.others_moved
            ));
        }
        if !round.reachable {
            self.warn("moved addresses do not answer ping from another node".into());
        }
        if round.not_configured > 0 || round.not_announced > 0 {
            self.warn(format!(
                "{} addresses not seen configured and {} not announced within {} s",
                round.not_configured,
                round.not_announced,
                ANNOUNCE_WINDOW.as_secs()
            ));
        }
        Ok(round)
    }

    fn print_round(&self, r: &ScaleRound) {
        let show = |s: &Option<Spread>| match s {
            Some(s) => format!(
                "first {}, median {}, last {}",
                ms(s.first),
                ms(s.median),
                ms(s.last)
            ),
            None => "none seen".into(),
        };
        self.out.line(format!(
            "  {} took over: first advert {} after the signal ({} {})",
            r.new_master.as_deref().unwrap_or("nobody"),
            r.takeover.map_or("-".into(), ms),
            if r.kind == "crash" {
                "Master_Down_Interval"
            } else {
                "Skew_Time"
            },
            ms(r.expected)
        ));
        self.out.line(format!(
            "  {} addresses configured: {}",
            r.addresses,
            show(&r.configured)
        ));
        self.out.line(format!(
            "  announced on the wire: {} ({} frames)",
            show(&r.announced),
            r.announcement_frames
        ));
        self.out.line(format!(
            "  other groups kept their master: {}; moved addresses answer ping: {}",
            if r.others_moved.is_empty() {
                "yes"
            } else {
                "NO"
            },
            if r.reachable { "yes" } else { "NO" }
        ));
    }

    fn ping_sample(&self, group: &[IpAddr], victim: usize, new: usize) -> Result<bool, LabError> {
        let from = (0..self.opts.nodes)
            .find(|n| *n != victim && *n != new)
            .unwrap_or(victim);
        let sample = [group[0], group[group.len() / 2], group[group.len() - 1]];
        for target in sample {
            let mut ok = false;
            for _ in 0..3 {
                if self.lab.ping(from, target, Duration::from_secs(1))? {
                    ok = true;
                    break;
                }
            }
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }
}

/// keepalived with `use_vmac` and ferrovip's virtual MAC mode announce from 00:00:5e:00:01:XX
/// (IPv4) or 00:00:5e:00:02:XX (IPv6).
fn virtual_mac(mac: MacAddr) -> bool {
    mac.0 == 0 && mac.1 == 0 && mac.2 == 0x5e && mac.3 == 0 && (mac.4 == 1 || mac.4 == 2)
}

fn write_file(path: &Path, text: &str) -> Result<(), LabError> {
    std::fs::write(path, text).map_err(|source| LabError::Io {
        context: "writing a lab file",
        path: path.to_path_buf(),
        source,
    })
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU ticks (utime + stime) and RSS (KiB) summed over the processes of process group `pgid`.
pub fn group_usage(pgid: i32) -> (u64, u64) {
    let (mut ticks, mut rss) = (0, 0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (0, 0);
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // After the command: state ppid pgrp session … utime(12) stime(13) … rss(22, pages).
        let field = |i: usize| fields.get(i).and_then(|f| f.parse::<i64>().ok());
        if field(2) != Some(i64::from(pgid)) {
            continue;
        }
        ticks += (field(11).unwrap_or(0) + field(12).unwrap_or(0)) as u64;
        rss += field(21).unwrap_or(0) as u64 * 4;
    }
    (ticks, rss)
}

/// One frame of a pcap file, stamped by the kernel.
#[derive(Debug, Clone)]
pub struct Frame {
    pub at: SystemTime,
    pub src_mac: MacAddr,
    pub kind: EventKind,
}

/// `dumpcap` on the lab bridge, writing a pcap file.
struct Capture {
    id: ProcId,
    path: PathBuf,
}

impl Capture {
    fn start(lab: &Lab, label: &str) -> Result<Capture, LabError> {
        static SEQUENCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SEQUENCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = lab.dir().join(format!("{label}-{n}.pcap"));
        let file = path.to_string_lossy().into_owned();
        let id = lab.spawn_switch(
            &[
                "dumpcap",
                "-q",
                "-i",
                lab.bridge(),
                "-B",
                "64",
                "-P",
                "-f",
                CAPTURE_FILTER,
                "-w",
                &file,
            ],
            format!("{label}-{n}.dumpcap.log"),
        )?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::fs::metadata(&path).is_ok_and(|m| m.len() >= 24) {
                break;
            }
            if lab.exit_status(id)?.is_some() || Instant::now() >= deadline {
                return Err(LabError::Output {
                    command: "dumpcap".into(),
                    detail: log_tail(&lab.proc_info(id)?.1, LOG_LINES),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // dumpcap writes the header before its filter is attached.
        std::thread::sleep(Duration::from_millis(300));
        Ok(Capture { id, path })
    }

    fn stop(self, lab: &Lab) -> Result<Vec<Frame>, LabError> {
        lab.kill(self.id, Signal::SIGINT)?;
        if lab.wait(self.id, Duration::from_secs(5))?.is_none() {
            lab.kill(self.id, Signal::SIGKILL)?;
            lab.wait(self.id, Duration::from_secs(2))?;
        }
        let bytes = std::fs::read(&self.path).map_err(|source| LabError::Io {
            context: "reading the capture",
            path: self.path.clone(),
            source,
        })?;
        let _ = std::fs::remove_file(&self.path);
        parse_pcap(&bytes).ok_or_else(|| LabError::Output {
            command: "dumpcap".into(),
            detail: format!("{} is not a pcap file", self.path.display()),
        })
    }
}

/// The frames of a classic pcap file (microsecond or nanosecond stamps, either byte order)
/// that [`parse_frame`] recognises. A truncated last record is ignored.
pub fn parse_pcap(bytes: &[u8]) -> Option<Vec<Frame>> {
    let magic: [u8; 4] = bytes.get(0..4)?.try_into().ok()?;
    let (little, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (true, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (true, true),
        [0xa1, 0xb2, 0xc3, 0xd4] => (false, false),
        [0xa1, 0xb2, 0x3c, 0x4d] => (false, true),
        _ => return None,
    };
    let u32_at = |o: usize| -> Option<u32> {
        let b: [u8; 4] = bytes.get(o..o + 4)?.try_into().ok()?;
        Some(if little {
            u32::from_le_bytes(b)
        } else {
            u32::from_be_bytes(b)
        })
    };
    let mut frames = Vec::new();
    let mut offset = 24;
    while let (Some(sec), Some(frac), Some(len)) =
        (u32_at(offset), u32_at(offset + 4), u32_at(offset + 8))
    {
        let start = offset + 16;
        let Some(data) = bytes.get(start..start + len as usize) else {
            break;
        };
        offset = start + len as usize;
        let nanos = if nanos {
            frac
        } else {
            frac.saturating_mul(1000)
        };
        let at = UNIX_EPOCH + Duration::new(u64::from(sec), nanos);
        if let Some((src_mac, kind)) = parse_frame(data) {
            frames.push(Frame { at, src_mac, kind });
        }
    }
    Some(frames)
}

/// One change `ip -ts monitor address route` printed: an address or a `local` route added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub at: SystemTime,
    pub net: IpNet,
    /// A `local` route (every address it covers), not an interface address (that one only,
    /// whatever its prefix length).
    pub route: bool,
}

fn read_monitor(path: &Path, from: u64) -> Result<Vec<Change>, LabError> {
    let bytes = std::fs::read(path).map_err(|source| LabError::Io {
        context: "reading the address monitor",
        path: path.to_path_buf(),
        source,
    })?;
    let text = String::from_utf8_lossy(bytes.get(from as usize..).unwrap_or_default());
    Ok(text.lines().filter_map(parse_monitor_line).collect())
}

/// Parses `[2026-12-03T17:53:27.930027] 3: eth0    inet 10.80.1.5/16 scope global …` (an
/// address) or `[…] local 10.80.1.0/24 dev eth0 proto 70 scope host src …` (a route in table
/// main); deletions, the kernel's own local routes and everything else give `None`.
pub fn parse_monitor_line(line: &str) -> Option<Change> {
    let rest = line.strip_prefix('[')?;
    let (stamp, rest) = rest.split_once(']')?;
    let at = parse_stamp(stamp)?;
    let words: Vec<&str> = rest.split_whitespace().collect();
    if words.first() == Some(&"Deleted") {
        return None;
    }
    if let Some(i) = words.iter().position(|w| *w == "inet" || *w == "inet6") {
        let net: IpNet = words.get(i + 1)?.parse().ok()?;
        return Some(Change {
            at,
            net,
            route: false,
        });
    }
    if words.first() == Some(&"local") && !words.contains(&"table") {
        let dst = words.get(1)?;
        let net: IpNet = dst
            .parse()
            .ok()
            .or_else(|| dst.parse::<IpAddr>().ok().map(IpNet::from))?;
        return Some(Change {
            at,
            net,
            route: true,
        });
    }
    None
}

/// `2026-12-03T17:53:27.930027` (UTC) as a time.
fn parse_stamp(stamp: &str) -> Option<SystemTime> {
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let micros: u32 = format!("{frac:0<6}").get(0..6)?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + min * 60 + s;
    Some(UNIX_EPOCH + Duration::new(u64::try_from(secs).ok()?, micros * 1000))
}

/// For each member, the first change at or after `since` that made it local.
fn configured_times(
    changes: &[Change],
    members: &BTreeSet<IpAddr>,
    since: SystemTime,
) -> HashMap<IpAddr, Duration> {
    let mut out = HashMap::new();
    for change in changes {
        let Ok(d) = change.at.duration_since(since) else {
            continue;
        };
        if !change.route {
            if members.contains(&change.net.addr()) {
                out.entry(change.net.addr()).or_insert(d);
            }
            continue;
        }
        let (first, last) = match change.net {
            IpNet::V4(net) => (IpAddr::V4(net.network()), IpAddr::V4(net.broadcast())),
            IpNet::V6(net) => (IpAddr::V6(net.network()), IpAddr::V6(net.broadcast())),
        };
        for a in members.range(first..=last) {
            out.entry(*a).or_insert(d);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_splits_contiguous_blocks_and_the_manifest_loads() {
        let layout = Layout::new(10_000, 3, false);
        assert_eq!(
            layout.groups.iter().map(Vec::len).collect::<Vec<_>>(),
            [3334, 3333, 3333]
        );
        assert_eq!(layout.groups[0][0], "10.80.1.0".parse::<IpAddr>().unwrap());
        assert_eq!(layout.group_of(&"10.80.40.15".parse().unwrap()), Some(2));
        assert_eq!(layout.group_of(&"10.80.40.16".parse().unwrap()), None);
        let names: Vec<String> = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
        let text = scale_manifest(&layout, &names, Duration::from_millis(10));
        let mut parsed = crate::crd::manifest::Manifests::default();
        crate::crd::manifest::parse_into(Path::new("scale.yaml"), &text, &mut parsed);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors.first());
        assert_eq!(parsed.virtual_ips.len(), 12);
        // Group 1 prefers node-b, then node-c.
        assert_eq!(group_priority(1, 1, 3), 250);
        assert_eq!(group_priority(1, 2, 3), 150);
        assert_eq!(group_priority(1, 0, 3), 50);
        let v6 = Layout::new(2000, 2, true);
        assert_eq!(
            v6.groups[1][0],
            "fd66:7670::1:3e8".parse::<IpAddr>().unwrap()
        );
        let conf = keepalived_conf(&layout, 0, 3, "node-a", Duration::from_millis(10));
        assert!(conf.contains("virtual_router_id 10\n  priority 250\n  advert_int 0.01"));
        assert_eq!(conf.matches("dev eth0").count(), 10_000);
    }

    #[test]
    fn monitor_lines_parse() {
        let a = parse_monitor_line(
            "[2026-12-03T17:53:27.930027] 3: eth0    inet 10.80.1.5/16 scope global secondary eth0",
        )
        .unwrap();
        assert_eq!(a.net, "10.80.1.5/16".parse::<IpNet>().unwrap());
        assert_eq!(
            a.at.duration_since(UNIX_EPOCH).unwrap(),
            Duration::new(1_796_320_407, 930_027_000)
        );
        let r = parse_monitor_line("[2026-12-03T17:53:27.938357] local 10.9.1.0/24 dev va proto 70 scope host src 10.9.0.1 ").unwrap();
        assert_eq!(r.net, "10.9.1.0/24".parse::<IpNet>().unwrap());
        assert!(parse_monitor_line("[2026-12-03T17:53:27.930196] local 10.9.0.1 dev va table local proto kernel scope host src 10.9.0.1").is_none());
        assert!(parse_monitor_line("[2026-12-03T17:53:27.930196] Deleted 3: eth0    inet 10.80.1.5/16 scope global eth0").is_none());
        assert!(parse_monitor_line("       valid_lft forever preferred_lft forever").is_none());
        let v6 = parse_monitor_line(
            "[2026-12-03T17:53:27.000001] 3: eth0    inet6 fd66:7670::1:0/64 scope global nodad",
        )
        .unwrap();
        assert_eq!(v6.net.addr(), "fd66:7670::1:0".parse::<IpAddr>().unwrap());

        let members: BTreeSet<IpAddr> = ["10.9.1.1", "10.9.1.2", "10.9.2.1"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let since = a.at - Duration::from_millis(10);
        let times = configured_times(&[a.clone(), r.clone()], &members, since);
        assert_eq!(
            times.len(),
            2,
            "the /24 covers two members, the /16 address only itself"
        );
        assert!(times.values().all(|d| *d > Duration::from_millis(10)));
    }

    #[test]
    fn pcap_frames_carry_kernel_stamps() {
        let garp =
            crate::node::announce::garp_frame([2, 0, 0, 0, 0, 1], Ipv4Addr::new(10, 80, 1, 7));
        let mut file = vec![0xd4, 0xc3, 0xb2, 0xa1, 2, 0, 4, 0];
        file.extend([0; 8]);
        file.extend(65535u32.to_le_bytes());
        file.extend(1u32.to_le_bytes());
        for (sec, usec) in [(100u32, 5u32), (101, 999_999)] {
            file.extend(sec.to_le_bytes());
            file.extend(usec.to_le_bytes());
            file.extend((garp.len() as u32).to_le_bytes());
            file.extend((garp.len() as u32).to_le_bytes());
            file.extend(&garp);
        }
        file.extend([1, 2, 3]);
        let frames = parse_pcap(&file).unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1].at, UNIX_EPOCH + Duration::new(101, 999_999_000));
        assert!(
            matches!(frames[0].kind, EventKind::GratuitousArp { sender_ip, .. } if sender_ip == Ipv4Addr::new(10, 80, 1, 7))
        );
        assert!(parse_pcap(b"not a pcap").is_none());
    }
}
