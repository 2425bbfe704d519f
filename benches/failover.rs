//! Failover and idle-cost benchmark: the ferrovip agent against keepalived (Debian's, VRRPv3,
//! 100 ms adverts) in the network-namespace lab, on the same wire and the same priorities.
//!
//! Run as root: `cargo bench --bench failover [-- --rounds N --only ours|keepalived
//! --skip-idle]`. Prints a table and writes the same figures to `target/bench-failover.json`.
//!
//! 1. Crash: SIGKILL the master (priority 150); the backup (priority 100) must take over one
//!    Master_Down_Interval after the last advert it heard.
//! 2. Graceful: SIGTERM the master; it advertises priority 0 and the backup takes over after
//!    Skew_Time.
//! 3. Idle: 100 VirtualIPs (VRIDs 1-100) on two nodes; CPU and RSS of both daemons over 10 s.
//!
//! Every timing comes from the lab's capture on the bridge, never from the daemons' logs, so
//! both implementations are measured by the same clock.

// Shared with the other benchmarks; this one uses part of it.
#[allow(dead_code)]
mod common;
use common::*;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::{Parser, ValueEnum};
use ferrovip::lab::{
    Failover, FailoverQuery, Lab, LabSpec, ProcId, Sniffer, log_tail, master_down_interval,
    masters_since, measure_failover, skew_time,
};
use nix::sys::signal::Signal;
use serde::Serialize;

const INTERVAL: Duration = Duration::from_millis(100);
const MASTER: usize = 0;
const BACKUP: usize = 1;
const MASTER_PRIORITY: u8 = 150;
const BACKUP_PRIORITY: u8 = 100;
const FAILOVER_VRID: u8 = 51;
const FAILOVER_VIP_HOST: u8 = 100;
const IDLE_VIPS: u8 = 100;
/// Idle VIPs are .101 to .200, next to the nodes' .11 and .12.
const IDLE_VIP_BASE: u8 = 100;
const IDLE_SETTLE: Duration = Duration::from_secs(3);
const IDLE_WINDOW: Duration = Duration::from_secs(10);
const MASTER_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(3);
const LOG_LINES: usize = 20;
/// Both daemons may add up to this much to what the RFC timers say (scheduling, a busy
/// 2-core machine); the targets.
const CRASH_TOLERANCE: Duration = Duration::from_millis(10);
const GRACEFUL_TOLERANCE: Duration = Duration::from_millis(10);
const CPU_TARGET_PERCENT: f64 = 2.0;
const RSS_TARGET_KIB: u64 = 20 * 1024;

/// Failover timings and idle cost of the ferrovip agent and of keepalived in the netns lab.
#[derive(Parser, Debug)]
#[command(name = "failover")]
struct Args {
    /// Crash and graceful rounds per implementation.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Measure only one implementation.
    #[arg(long, value_enum)]
    only: Option<Implementation>,
    /// Skip the 100-VIP idle measurement.
    #[arg(long)]
    skip_idle: bool,
    /// Added by `cargo bench`; `cargo test --benches` runs the binary without it.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
enum Implementation {
    Ours,
    Keepalived,
}

impl Implementation {
    fn label(self) -> &'static str {
        match self {
            Implementation::Ours => "ours",
            Implementation::Keepalived => "keepalived",
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.bench {
        println!(
            "failover: a root benchmark of real daemons; run it with `cargo bench --bench failover`"
        );
        return Ok(());
    }
    ensure!(args.rounds > 0, "--rounds must be at least 1");
    watch_for_interrupts()?;
    let implementations: Vec<Implementation> = match args.only {
        Some(only) => vec![only],
        None => vec![Implementation::Ours, Implementation::Keepalived],
    };
    if implementations.contains(&Implementation::Keepalived) {
        ensure!(
            Path::new("/usr/sbin/keepalived").exists(),
            "keepalived is not installed (apt-get install keepalived), or pass --only ours"
        );
    }
    let removed = Lab::cleanup_stale()?;
    if !removed.is_empty() {
        println!(
            "removed {} namespaces left behind by earlier labs",
            removed.len()
        );
    }
    let clock_ticks = clock_ticks_per_second();
    println!(
        "ferrovip failover benchmark: 2 nodes, priorities {MASTER_PRIORITY} (master) / {BACKUP_PRIORITY} (backup), VRRPv3, adverts every {} ms, {} rounds",
        INTERVAL.as_millis(),
        args.rounds
    );
    println!(
        "theory: Master_Down_Interval({BACKUP_PRIORITY}) = {}, Skew_Time({BACKUP_PRIORITY}) = {}",
        ms(master_down_interval(BACKUP_PRIORITY, INTERVAL)),
        ms(skew_time(BACKUP_PRIORITY, INTERVAL))
    );

    let mut results = BTreeMap::new();
    for &implementation in &implementations {
        println!("\n== {}", implementation.label());
        let mut result = ImplementationReport::default();
        let errors = &mut result.errors;
        let crash = failover_rounds(
            implementation,
            Signal::SIGKILL,
            args.rounds,
            &mut result.crash,
        );
        note_failure(errors, "crash", crash)?;
        let graceful = failover_rounds(
            implementation,
            Signal::SIGTERM,
            args.rounds,
            &mut result.graceful,
        );
        note_failure(errors, "graceful", graceful)?;
        if !args.skip_idle {
            result.idle = note_failure(errors, "idle", idle_cost(implementation, clock_ticks))?;
        }
        results.insert(implementation.label(), result);
    }

    let failures: Vec<String> = results
        .iter()
        .flat_map(|(name, r)| r.errors.iter().map(move |e| format!("{name} {e}")))
        .collect();
    let report = Report::new(&args, results);
    println!("\n{}", report.table());
    let json_path = json_path();
    let json = serde_json::to_string_pretty(&report)?;
    std::fs::write(&json_path, json + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("figures written to {}", json_path.display());
    if !failures.is_empty() {
        let first_lines: Vec<&str> = failures.iter().filter_map(|e| e.lines().next()).collect();
        bail!(
            "{} phase(s) failed:\n  {}",
            failures.len(),
            first_lines.join("\n  ")
        );
    }
    Ok(())
}

/// `target/bench-failover.json`, found from the agent binary Cargo built for this bench
/// (`target/<profile>/ferrovip`), so CARGO_TARGET_DIR is honoured.
fn json_path() -> PathBuf {
    let binary = Path::new(AGENT_BINARY);
    binary
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("target"))
        .join("bench-failover.json")
}

fn clock_ticks_per_second() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(100)
}

/// One virtual router of the setup.
#[derive(Debug, Clone, Copy)]
struct Vip {
    vrid: u8,
    address: Ipv4Addr,
    prefix_len: u8,
}

/// A two-node lab running one implementation on the same VIPs.
struct Bed {
    lab: Lab,
    sniffer: Sniffer,
    implementation: Implementation,
    vips: Vec<Vip>,
    agents: [Option<ProcId>; 2],
    starts: [usize; 2],
}

impl Bed {
    fn create(implementation: Implementation, vrids: &[(u8, u8)]) -> anyhow::Result<Bed> {
        let lab = Lab::create(LabSpec {
            nodes: 2,
            // Only IPv4 VIPs are measured; without IPv6 the wire carries nothing but VRRP
            // and ARP.
            ipv6: false,
            ..LabSpec::default()
        })?;
        let node = lab.node(MASTER);
        let vips = vrids
            .iter()
            .map(|&(vrid, host)| {
                let [a, b, c, _] = node.ipv4.octets();
                Vip {
                    vrid,
                    address: Ipv4Addr::new(a, b, c, host),
                    prefix_len: node.ipv4_prefix_len,
                }
            })
            .collect::<Vec<_>>();
        let sniffer = Sniffer::start(&lab)?;
        let bed = Bed {
            lab,
            sniffer,
            implementation,
            vips,
            agents: [None, None],
            starts: [0, 0],
        };
        bed.write_config()?;
        Ok(bed)
    }

    fn node_name(&self, node: usize) -> &str {
        &self.lab.node(node).name
    }

    fn node_addr(&self, node: usize) -> IpAddr {
        IpAddr::V4(self.lab.node(node).ipv4)
    }

    fn priority(node: usize) -> u8 {
        if node == MASTER {
            MASTER_PRIORITY
        } else {
            BACKUP_PRIORITY
        }
    }

    fn manifest_path(&self) -> PathBuf {
        self.lab.dir().join("virtualips.yaml")
    }

    fn keepalived_conf_path(&self, node: usize) -> PathBuf {
        let name = self.node_name(node);
        self.lab.dir().join(format!("{name}.keepalived.conf"))
    }

    fn write_config(&self) -> anyhow::Result<()> {
        match self.implementation {
            Implementation::Ours => {
                let path = self.manifest_path();
                std::fs::write(&path, self.manifest())
                    .with_context(|| format!("writing {}", path.display()))
            }
            Implementation::Keepalived => {
                for node in [MASTER, BACKUP] {
                    let conf = self.keepalived_conf_path(node);
                    std::fs::write(&conf, self.keepalived_conf(node))
                        .with_context(|| format!("writing {}", conf.display()))?;
                }
                Ok(())
            }
        }
    }

    /// Base priority 100 (the backup's) and a weight of 50 for the master's node.
    fn manifest(&self) -> String {
        let weight = MASTER_PRIORITY - BACKUP_PRIORITY;
        let master = self.node_name(MASTER);
        let mut text = String::new();
        for vip in &self.vips {
            let _ = write!(
                text,
                "---
apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: bench-{vrid}
spec:
  addresses: [\"{address}/{prefix_len}\"]
  interface: eth0
  virtualRouterId: {vrid}
  vrrp:
    version: 3
    advertisementInterval: {interval}ms
    preempt: true
  priority:
    base: {BACKUP_PRIORITY}
    preferredNodes:
      - {{nodeName: {master}, weight: {weight}}}
",
                vrid = vip.vrid,
                address = vip.address,
                prefix_len = vip.prefix_len,
                interval = INTERVAL.as_millis(),
            );
        }
        text
    }

    fn keepalived_conf(&self, node: usize) -> String {
        let mut text = format!(
            "global_defs {{\n  router_id {}\n  vrrp_version 3\n}}\n",
            self.node_name(node)
        );
        for vip in &self.vips {
            let _ = write!(
                text,
                "vrrp_instance bench{vrid} {{
  state BACKUP
  interface eth0
  virtual_router_id {vrid}
  priority {priority}
  advert_int {interval}
  virtual_ipaddress {{
    {address}/{prefix_len} dev eth0
  }}
}}
",
                vrid = vip.vrid,
                priority = Bed::priority(node),
                interval = INTERVAL.as_secs_f64(),
                address = vip.address,
                prefix_len = vip.prefix_len,
            );
        }
        text
    }

    fn start(&mut self, node: usize) -> anyhow::Result<()> {
        self.starts[node] += 1;
        let name = self.node_name(node).to_owned();
        let log = format!("{name}.{}.log", self.starts[node]);
        let id = match self.implementation {
            Implementation::Ours => {
                let manifest = self.manifest_path().to_string_lossy().into_owned();
                self.lab.spawn(
                    node,
                    &[
                        AGENT_BINARY,
                        "agent",
                        "--node-name",
                        &name,
                        "--manifests",
                        &manifest,
                    ],
                    log,
                )?
            }
            Implementation::Keepalived => {
                let conf = self.keepalived_conf_path(node);
                self.lab.spawn_keepalived(node, &conf, log)?
            }
        };
        self.agents[node] = Some(id);
        Ok(())
    }

    fn agent(&self, node: usize) -> anyhow::Result<ProcId> {
        self.agents[node].with_context(|| format!("no daemon runs on {}", self.node_name(node)))
    }

    fn check_alive(&self) -> anyhow::Result<()> {
        for node in [MASTER, BACKUP] {
            let Some(id) = self.agents[node] else {
                continue;
            };
            if let Some(status) = self.lab.exit_status(id)? {
                bail!(
                    "{} on {} exited ({status})\n{}",
                    self.implementation.label(),
                    self.node_name(node),
                    self.logs()
                );
            }
        }
        if let Some(failure) = self.sniffer.failure() {
            bail!("the capture stopped: {failure}");
        }
        Ok(())
    }

    /// The tails of both daemons' logs, for an error message. Failing runs keep the lab's
    /// directory (configs and whole logs) for the post-mortem.
    fn logs(&self) -> String {
        self.lab.keep_dir(true);
        let mut logs = format!("(logs and configs kept in {})\n", self.lab.dir().display());
        for node in [MASTER, BACKUP] {
            if let Some(Ok((_, log))) = self.agents[node].map(|id| self.lab.proc_info(id)) {
                let _ = writeln!(
                    logs,
                    "--- {} ({}) ---\n{}",
                    self.node_name(node),
                    log.display(),
                    log_tail(&log, LOG_LINES)
                );
            }
        }
        logs
    }

    /// Waits until `node` alone advertised (priority > 0) for every VRID over a whole window
    /// after `since`. The window spans the longest Master_Down_Interval plus an interval, so
    /// a backup about to take over has done so before it can pass.
    fn wait_master(&self, node: usize, since: Instant) -> anyhow::Result<Settling> {
        let window = master_down_interval(1, INTERVAL) + INTERVAL;
        let expected = [self.node_addr(node)];
        let deadline = Instant::now() + MASTER_TIMEOUT;
        loop {
            check_interrupted()?;
            self.check_alive()?;
            let now = Instant::now();
            if let Some(start) = now.checked_sub(window).filter(|start| *start >= since) {
                let events = self.sniffer.events_since(start);
                let wrong: Vec<(u8, Vec<IpAddr>)> = self
                    .vips
                    .iter()
                    .map(|vip| (vip.vrid, masters_since(&events, vip.vrid, start)))
                    .filter(|(_, masters)| masters[..] != expected)
                    .collect();
                if wrong.is_empty() {
                    return Ok(Settling::Settled);
                }
                if now >= deadline {
                    return Ok(Settling::NotSettled(format!(
                        "{} is not the single master after {MASTER_TIMEOUT:?}: {} of {} VRIDs have other masters, e.g. VRID {} has {:?}",
                        self.node_name(node),
                        wrong.len(),
                        self.vips.len(),
                        wrong[0].0,
                        wrong[0].1,
                    )));
                }
            }
            std::thread::sleep(INTERVAL / 2);
        }
    }

    /// Sleeps until `offset` after the master's next advert, so that every round kills the
    /// master at a chosen phase of its advert timer, the same phases for both daemons.
    fn align_to_advert(&self, node: usize, vrid: u8, offset: Duration) -> anyhow::Result<()> {
        let source = self.node_addr(node);
        let now = Instant::now();
        let advert = self
            .sniffer
            .wait_for(
                |e| {
                    e.at >= now
                        && e.advert()
                            .is_some_and(|a| a.vrid == vrid && a.source == source && a.priority > 0)
                },
                INTERVAL * 5,
            )
            .with_context(|| format!("no advert from {}", self.node_name(node)))?;
        let target = advert.at + offset;
        std::thread::sleep(target.saturating_duration_since(Instant::now()));
        Ok(())
    }

    fn stop(&mut self, node: usize, signal: Signal) -> anyhow::Result<Instant> {
        let id = self.agent(node)?;
        let stopped_at = Instant::now();
        self.lab.kill(id, signal)?;
        Ok(stopped_at)
    }

    fn wait_exit(&mut self, node: usize) -> anyhow::Result<()> {
        let id = self.agent(node)?;
        if self.lab.wait(id, EXIT_TIMEOUT)?.is_none() {
            eprintln!(
                "  warning: {} on {} still runs {EXIT_TIMEOUT:?} after the signal; killing it",
                self.implementation.label(),
                self.node_name(node)
            );
            self.lab.kill(id, Signal::SIGKILL)?;
            self.lab.wait(id, EXIT_TIMEOUT)?;
        }
        self.agents[node] = None;
        Ok(())
    }
}

/// Whether one node became the only master of every VRID in time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Settling {
    Settled,
    NotSettled(String),
}

impl Settling {
    fn require(self, bed: &Bed) -> anyhow::Result<()> {
        match self {
            Settling::Settled => Ok(()),
            Settling::NotSettled(why) => bail!("{why}\n{}", bed.logs()),
        }
    }
}

/// One takeover as the bridge saw it, in milliseconds.
#[derive(Debug, Clone, Serialize)]
struct Round {
    /// Phase of the master's advert timer at which the signal was sent.
    phase_ms: f64,
    new_master_priority: u8,
    signal_to_advert_ms: f64,
    signal_to_garp_ms: Option<f64>,
    /// Graceful only: the signal to the old master's priority-0 advert.
    signal_to_release_ms: Option<f64>,
    /// The old master's last advert (priority 0 after SIGTERM) to the new master's first.
    gap_ms: Option<f64>,
    /// Master_Down_Interval after a crash, Skew_Time after a release.
    expected_gap_ms: f64,
}

impl Round {
    fn new(phase: Duration, failover: &Failover) -> Round {
        Round {
            phase_ms: millis(phase),
            new_master_priority: failover.new_master_priority,
            signal_to_advert_ms: millis(failover.death_to_advert),
            signal_to_garp_ms: failover.death_to_garp.map(millis),
            signal_to_release_ms: failover.death_to_release.map(millis),
            gap_ms: failover.last_advert_to_takeover.map(millis),
            expected_gap_ms: millis(failover.expected_gap()),
        }
    }
}

/// Appends each completed round to `results` as it goes, so a failure keeps the earlier ones.
fn failover_rounds(
    implementation: Implementation,
    signal: Signal,
    rounds: usize,
    results: &mut Vec<Round>,
) -> anyhow::Result<()> {
    let kind = if signal == Signal::SIGKILL {
        "crash"
    } else {
        "graceful"
    };
    let mut bed = Bed::create(implementation, &[(FAILOVER_VRID, FAILOVER_VIP_HOST)])?;
    let vip = IpAddr::V4(bed.vips[0].address);
    let started = Instant::now();
    bed.start(MASTER)?;
    bed.start(BACKUP)?;
    bed.wait_master(MASTER, started)?.require(&bed)?;
    let takeover_timeout = master_down_interval(1, INTERVAL) * 3 + Duration::from_secs(2);
    for round in 0..rounds {
        check_interrupted()?;
        // Phases spread evenly over one interval: the signal-to-advert time depends on it,
        // the advert gap does not.
        let phase = INTERVAL * (2 * round as u32 + 1) / (2 * rounds as u32);
        bed.align_to_advert(MASTER, FAILOVER_VRID, phase)?;
        let stopped_at = bed.stop(MASTER, signal)?;
        let query = FailoverQuery {
            vrid: FAILOVER_VRID,
            old_master: bed.node_addr(MASTER),
            stopped_at,
            vip: Some(vip),
        };
        let failover = measure_failover(&bed.sniffer, &query, takeover_timeout)
            .map_err(|e| anyhow::anyhow!("{kind} round {}: {e}\n{}", round + 1, bed.logs()))?;
        ensure!(
            failover.new_master == bed.node_addr(BACKUP),
            "{kind} round {}: {} took over, not the backup",
            round + 1,
            failover.new_master
        );
        let record = Round::new(phase, &failover);
        println!(
            "  {kind} {}/{rounds}: phase {:>5.1}  signal→advert {:>6.1}  signal→GARP {:>6}  release {:>5}  gap {:>6} (expected {:.1})",
            round + 1,
            record.phase_ms,
            record.signal_to_advert_ms,
            opt_ms(record.signal_to_garp_ms),
            opt_ms(record.signal_to_release_ms),
            opt_ms(record.gap_ms),
            record.expected_gap_ms,
        );
        results.push(record);
        bed.wait_exit(MASTER)?;
        let restarted = Instant::now();
        bed.start(MASTER)?;
        bed.wait_master(MASTER, restarted)?.require(&bed)?;
    }
    Ok(())
}

/// CPU and memory of one daemon (its whole process group: keepalived forks a VRRP child).
#[derive(Debug, Clone, Serialize)]
struct DaemonCost {
    node: String,
    role: &'static str,
    cpu_percent_of_one_core: f64,
    rss_kib: u64,
    processes: Vec<ProcessCost>,
}

#[derive(Debug, Clone, Serialize)]
struct ProcessCost {
    pid: i32,
    comm: String,
    exe: Option<String>,
    cpu_percent_of_one_core: f64,
    rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct IdleReport {
    vips: usize,
    settle_s: f64,
    window_s: f64,
    master: DaemonCost,
    backup: DaemonCost,
    /// Adverts with priority > 0 per second over the window, by source node.
    adverts_per_second: BTreeMap<String, f64>,
    /// From starting both daemons to the master node advertising alone for every VRID.
    time_to_settle_s: Option<f64>,
    /// Why the daemons did not settle within the timeout (then measured anyway).
    settle_problem: Option<String>,
    /// The master node was the only one advertising, for every VRID, over the whole window.
    stable: bool,
    /// VRIDs for which another node advertised (priority > 0) during the window, or none did.
    unstable_vrids: usize,
    /// For our agent: the pid `ip netns exec` was started as is the agent itself (ip execs).
    agent_pid_is_the_daemon: bool,
}

#[derive(Debug, Clone)]
struct ProcSample {
    comm: String,
    ticks: u64,
}

/// The processes whose process group is `pgid`, with their CPU ticks (utime + stime).
fn sample_group(pgid: i32) -> BTreeMap<i32, ProcSample> {
    let mut samples = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return samples;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if let Some((comm, pgrp, ticks)) = parse_stat(&stat)
            && pgrp == pgid
        {
            samples.insert(pid, ProcSample { comm, ticks });
        }
    }
    samples
}

/// `(comm, pgrp, utime + stime)` from a /proc/PID/stat line. The command name sits in
/// parentheses and may itself contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_stat(stat: &str) -> Option<(String, i32, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // fields[0] is field 3 (state): pgrp is field 5, utime 14, stime 15.
    let pgrp = fields.get(2)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, pgrp, utime + stime))
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn exe_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

fn daemon_cost(
    node: String,
    role: &'static str,
    before: &BTreeMap<i32, ProcSample>,
    after: &BTreeMap<i32, ProcSample>,
    elapsed: Duration,
    clock_ticks: u64,
) -> DaemonCost {
    let percent =
        |ticks: u64| round3(ticks as f64 / clock_ticks as f64 / elapsed.as_secs_f64() * 100.0);
    let processes: Vec<ProcessCost> = after
        .iter()
        .map(|(pid, sample)| {
            let start = before.get(pid).map_or(0, |s| s.ticks);
            ProcessCost {
                pid: *pid,
                comm: sample.comm.clone(),
                exe: exe_of(*pid),
                cpu_percent_of_one_core: percent(sample.ticks.saturating_sub(start)),
                rss_kib: rss_kib(*pid),
            }
        })
        .collect();
    DaemonCost {
        node,
        role,
        cpu_percent_of_one_core: round3(processes.iter().map(|p| p.cpu_percent_of_one_core).sum()),
        rss_kib: processes.iter().map(|p| p.rss_kib).sum(),
        processes,
    }
}

fn idle_cost(implementation: Implementation, clock_ticks: u64) -> anyhow::Result<IdleReport> {
    let vrids: Vec<(u8, u8)> = (1..=IDLE_VIPS).map(|v| (v, IDLE_VIP_BASE + v)).collect();
    let mut bed = Bed::create(implementation, &vrids)?;
    let started = Instant::now();
    bed.start(MASTER)?;
    bed.start(BACKUP)?;
    // A daemon that cannot settle 100 VIPs is still measured: its cost while flapping is a
    // figure too, flagged as such.
    let settling = bed.wait_master(MASTER, started)?;
    let time_to_settle = started.elapsed();
    let settle_problem = match settling {
        Settling::Settled => {
            println!(
                "  idle: {} VIPs, {} master of all after {:.2} s; settling {:?}, then measuring {:?}",
                vrids.len(),
                bed.node_name(MASTER),
                time_to_settle.as_secs_f64(),
                IDLE_SETTLE,
                IDLE_WINDOW
            );
            None
        }
        Settling::NotSettled(why) => {
            eprintln!("  warning: {why}; measuring anyway\n{}", bed.logs());
            Some(why)
        }
    };
    sleep(IDLE_SETTLE)?;
    bed.check_alive()?;

    let master_pid = bed.lab.pid(bed.agent(MASTER)?)? as i32;
    let backup_pid = bed.lab.pid(bed.agent(BACKUP)?)? as i32;
    let window_start = Instant::now();
    let before = [sample_group(master_pid), sample_group(backup_pid)];
    sleep(IDLE_WINDOW)?;
    let after = [sample_group(master_pid), sample_group(backup_pid)];
    let elapsed = window_start.elapsed();
    bed.check_alive()?;

    let [before_master, before_backup] = before;
    let [after_master, after_backup] = after;
    let master = daemon_cost(
        bed.node_name(MASTER).to_owned(),
        "master",
        &before_master,
        &after_master,
        elapsed,
        clock_ticks,
    );
    let backup = daemon_cost(
        bed.node_name(BACKUP).to_owned(),
        "backup",
        &before_backup,
        &after_backup,
        elapsed,
        clock_ticks,
    );

    let wire = WireWindow::capture(&bed.sniffer, &bed.lab, window_start, window_start + elapsed);
    let unstable_vrids = wire
        .unstable_vrids(
            &bed.lab,
            bed.vips.iter().map(|vip| vip.vrid),
            window_start,
            bed.node_addr(MASTER),
        )
        .len();
    let stable = unstable_vrids == 0;
    let agent_pid_is_the_daemon = match implementation {
        // `ip netns exec` execs the program, so the spawned pid must be the agent itself.
        Implementation::Ours => [&master, &backup].iter().all(|cost| {
            cost.processes.len() == 1
                && cost.processes[0].exe.as_deref()
                    == Some(
                        Path::new(AGENT_BINARY)
                            .canonicalize()
                            .map(|p| p.to_string_lossy().into_owned())
                            .unwrap_or_default()
                            .as_str(),
                    )
        }),
        Implementation::Keepalived => [&master, &backup]
            .iter()
            .all(|cost| cost.processes.iter().all(|p| p.comm == "keepalived")),
    };
    for cost in [&master, &backup] {
        let processes: Vec<String> = cost
            .processes
            .iter()
            .map(|p| {
                format!(
                    "{} {} {:.2}% {} KiB",
                    p.pid, p.comm, p.cpu_percent_of_one_core, p.rss_kib
                )
            })
            .collect();
        println!(
            "  idle {:<6} ({}): CPU {:.2}% of one core, RSS {} KiB [{}]",
            cost.role,
            cost.node,
            cost.cpu_percent_of_one_core,
            cost.rss_kib,
            processes.join("; ")
        );
    }
    if !stable {
        eprintln!(
            "  warning: mastership moved for {unstable_vrids} VRIDs during the idle window\n{}",
            bed.logs()
        );
    }
    if !agent_pid_is_the_daemon {
        eprintln!("  warning: the measured pids are not the daemons themselves");
    }
    Ok(IdleReport {
        vips: vrids.len(),
        settle_s: IDLE_SETTLE.as_secs_f64(),
        window_s: round3(elapsed.as_secs_f64()),
        time_to_settle_s: settle_problem
            .is_none()
            .then(|| round3(time_to_settle.as_secs_f64())),
        settle_problem,
        master,
        backup,
        adverts_per_second: wire.adverts_per_second,
        stable,
        unstable_vrids,
        agent_pid_is_the_daemon,
    })
}

#[derive(Debug, Clone, Default, Serialize)]
struct ImplementationReport {
    crash: Vec<Round>,
    graceful: Vec<Round>,
    idle: Option<IdleReport>,
    /// Phases that failed (with the daemons' log tails); their figures are partial.
    errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
struct CrashSummary {
    signal_to_advert: Option<Stats>,
    signal_to_garp: Option<Stats>,
    gap: Option<Stats>,
    /// Rounds in which no gratuitous ARP for the VIP was seen.
    missing_garp: usize,
    gap_median_minus_mdi_ms: Option<f64>,
    within_target: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct GracefulSummary {
    signal_to_release: Option<Stats>,
    signal_to_advert: Option<Stats>,
    signal_to_garp: Option<Stats>,
    /// From the priority-0 advert to the new master's first advert.
    release_to_takeover: Option<Stats>,
    /// Rounds in which no priority-0 advert was seen.
    missing_release: usize,
    release_to_takeover_median_minus_skew_ms: Option<f64>,
    within_target: Option<bool>,
}

#[derive(Debug, Clone, Serialize)]
struct Targets {
    crash_gap_minus_mdi_ms: f64,
    graceful_gap_minus_skew_ms: f64,
    ratio_ours_over_keepalived: f64,
    idle_cpu_percent_of_one_core: f64,
    idle_rss_kib: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Comparison {
    crash_signal_to_advert: Option<f64>,
    crash_gap: Option<f64>,
    crash_signal_to_garp: Option<f64>,
    graceful_signal_to_advert: Option<f64>,
    graceful_release_to_takeover: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
struct Report {
    command: String,
    rounds: usize,
    interval_ms: f64,
    master_priority: u8,
    backup_priority: u8,
    master_down_interval_ms: f64,
    skew_time_ms: f64,
    targets: Targets,
    crash: BTreeMap<&'static str, CrashSummary>,
    graceful: BTreeMap<&'static str, GracefulSummary>,
    /// Medians, ours / keepalived (both measured in this run).
    ratio_ours_over_keepalived: Option<Comparison>,
    idle: BTreeMap<&'static str, IdleReport>,
    raw: BTreeMap<&'static str, ImplementationReport>,
}

fn crash_summary(rounds: &[Round], mdi: Duration) -> CrashSummary {
    let gap = Stats::of(rounds.iter().filter_map(|r| r.gap_ms));
    let over = gap.as_ref().map(|g| round3(g.median_ms - millis(mdi)));
    CrashSummary {
        signal_to_advert: Stats::of(rounds.iter().map(|r| r.signal_to_advert_ms)),
        signal_to_garp: Stats::of(rounds.iter().filter_map(|r| r.signal_to_garp_ms)),
        gap,
        missing_garp: rounds
            .iter()
            .filter(|r| r.signal_to_garp_ms.is_none())
            .count(),
        gap_median_minus_mdi_ms: over,
        within_target: over.map(|o| o.abs() <= millis(CRASH_TOLERANCE)),
    }
}

fn graceful_summary(rounds: &[Round], skew: Duration) -> GracefulSummary {
    let released: Vec<&Round> = rounds
        .iter()
        .filter(|r| r.signal_to_release_ms.is_some())
        .collect();
    let gap = Stats::of(released.iter().filter_map(|r| r.gap_ms));
    let over = gap.as_ref().map(|g| round3(g.median_ms - millis(skew)));
    GracefulSummary {
        signal_to_release: Stats::of(released.iter().filter_map(|r| r.signal_to_release_ms)),
        signal_to_advert: Stats::of(rounds.iter().map(|r| r.signal_to_advert_ms)),
        signal_to_garp: Stats::of(rounds.iter().filter_map(|r| r.signal_to_garp_ms)),
        release_to_takeover: gap,
        missing_release: rounds.len() - released.len(),
        release_to_takeover_median_minus_skew_ms: over,
        // Taking over before Skew_Time is not late; only the upper bound is a target.
        within_target: over.map(|o| o <= millis(GRACEFUL_TOLERANCE)),
    }
}

fn ratio(ours: Option<&Stats>, theirs: Option<&Stats>) -> Option<f64> {
    Some((ours?.median_ms / theirs?.median_ms * 10_000.0).round() / 10_000.0)
}

impl Report {
    fn new(args: &Args, raw: BTreeMap<&'static str, ImplementationReport>) -> Report {
        let mdi = master_down_interval(BACKUP_PRIORITY, INTERVAL);
        let skew = skew_time(BACKUP_PRIORITY, INTERVAL);
        let crash: BTreeMap<_, _> = raw
            .iter()
            .map(|(name, r)| (*name, crash_summary(&r.crash, mdi)))
            .collect();
        let graceful: BTreeMap<_, _> = raw
            .iter()
            .map(|(name, r)| (*name, graceful_summary(&r.graceful, skew)))
            .collect();
        let idle = raw
            .iter()
            .filter_map(|(name, r)| Some((*name, r.idle.clone()?)))
            .collect();
        let ratio_ours_over_keepalived = match (
            crash.get("ours"),
            crash.get("keepalived"),
            graceful.get("ours"),
            graceful.get("keepalived"),
        ) {
            (Some(co), Some(ck), Some(go), Some(gk)) => Some(Comparison {
                crash_signal_to_advert: ratio(
                    co.signal_to_advert.as_ref(),
                    ck.signal_to_advert.as_ref(),
                ),
                crash_gap: ratio(co.gap.as_ref(), ck.gap.as_ref()),
                crash_signal_to_garp: ratio(co.signal_to_garp.as_ref(), ck.signal_to_garp.as_ref()),
                graceful_signal_to_advert: ratio(
                    go.signal_to_advert.as_ref(),
                    gk.signal_to_advert.as_ref(),
                ),
                graceful_release_to_takeover: ratio(
                    go.release_to_takeover.as_ref(),
                    gk.release_to_takeover.as_ref(),
                ),
            }),
            _ => None,
        };
        let mut command = String::from("cargo bench --bench failover");
        let mut extra = vec![format!("--rounds {}", args.rounds)];
        if let Some(only) = args.only {
            extra.push(format!("--only {}", only.label()));
        }
        if args.skip_idle {
            extra.push("--skip-idle".into());
        }
        let _ = write!(command, " -- {}", extra.join(" "));
        Report {
            command,
            rounds: args.rounds,
            interval_ms: millis(INTERVAL),
            master_priority: MASTER_PRIORITY,
            backup_priority: BACKUP_PRIORITY,
            master_down_interval_ms: millis(mdi),
            skew_time_ms: millis(skew),
            targets: Targets {
                crash_gap_minus_mdi_ms: millis(CRASH_TOLERANCE),
                graceful_gap_minus_skew_ms: millis(GRACEFUL_TOLERANCE),
                ratio_ours_over_keepalived: 1.0,
                idle_cpu_percent_of_one_core: CPU_TARGET_PERCENT,
                idle_rss_kib: RSS_TARGET_KIB,
            },
            crash,
            graceful,
            ratio_ours_over_keepalived,
            idle,
            raw,
        }
    }

    /// The human table: one column per implementation (ours first), median [min–max] in
    /// milliseconds.
    fn table(&self) -> String {
        let mut names: Vec<&'static str> = self.raw.keys().copied().collect();
        names.sort_by_key(|name| *name != Implementation::Ours.label());
        let mut t = Table::new(26);

        t.heading(
            &format!(
                "Crash failover (SIGKILL), {} rounds, ms: median [min–max]; Master_Down_Interval = {:.1}",
                self.rounds, self.master_down_interval_ms
            ),
            &names,
        );
        let crash: Vec<&CrashSummary> = names.iter().map(|n| &self.crash[n]).collect();
        t.row("kill → new master's first advert", &crash, |c| {
            stats_cell(c.signal_to_advert.as_ref())
        });
        t.row("kill → first GARP", &crash, |c| {
            stats_cell(c.signal_to_garp.as_ref())
        });
        t.row("last advert → first advert (gap)", &crash, |c| {
            stats_cell(c.gap.as_ref())
        });
        t.row("median gap − MDI", &crash, |c| {
            signed(c.gap_median_minus_mdi_ms)
        });
        let label = format!("within ±{:.0} ms of MDI", millis(CRASH_TOLERANCE));
        t.row(&label, &crash, |c| verdict(c.within_target));
        t.row("rounds measured / without GARP", &crash, |c| {
            format!(
                "{} / {}",
                c.signal_to_advert.as_ref().map_or(0, |s| s.n),
                c.missing_garp
            )
        });

        t.heading(
            &format!(
                "\nGraceful handover (SIGTERM), {} rounds, ms; Skew_Time = {:.1}",
                self.rounds, self.skew_time_ms
            ),
            &names,
        );
        let graceful: Vec<&GracefulSummary> = names.iter().map(|n| &self.graceful[n]).collect();
        t.row("signal → priority-0 advert", &graceful, |g| {
            stats_cell(g.signal_to_release.as_ref())
        });
        t.row("priority 0 → new master's first advert", &graceful, |g| {
            stats_cell(g.release_to_takeover.as_ref())
        });
        t.row("signal → new master's first advert", &graceful, |g| {
            stats_cell(g.signal_to_advert.as_ref())
        });
        t.row("signal → first GARP", &graceful, |g| {
            stats_cell(g.signal_to_garp.as_ref())
        });
        t.row("median handover − Skew_Time", &graceful, |g| {
            signed(g.release_to_takeover_median_minus_skew_ms)
        });
        let label = format!("within Skew_Time + {:.0} ms", millis(GRACEFUL_TOLERANCE));
        t.row(&label, &graceful, |g| verdict(g.within_target));
        t.row("rounds measured / without priority 0", &graceful, |g| {
            format!(
                "{} / {}",
                g.signal_to_advert.as_ref().map_or(0, |s| s.n),
                g.missing_release
            )
        });

        if let Some(ratio) = &self.ratio_ours_over_keepalived {
            t.heading(
                "\nRatio of medians, ours / keepalived (target ≤ 1.0 within noise)",
                &[],
            );
            let r = |v: Option<f64>| [v.map_or_else(|| "—".into(), |v| format!("{v:.3}"))];
            t.row(
                "crash kill → advert",
                &r(ratio.crash_signal_to_advert),
                String::clone,
            );
            t.row("crash gap", &r(ratio.crash_gap), String::clone);
            t.row(
                "crash kill → GARP",
                &r(ratio.crash_signal_to_garp),
                String::clone,
            );
            t.row(
                "graceful signal → advert",
                &r(ratio.graceful_signal_to_advert),
                String::clone,
            );
            t.row(
                "graceful priority 0 → advert",
                &r(ratio.graceful_release_to_takeover),
                String::clone,
            );
        }

        let mut idle_names: Vec<&'static str> = self.idle.keys().copied().collect();
        idle_names.sort_by_key(|name| *name != Implementation::Ours.label());
        let idle: Vec<&IdleReport> = idle_names.iter().map(|n| &self.idle[n]).collect();
        if let Some(first) = idle.first() {
            t.heading(
                &format!(
                    "\nIdle cost: {} VIPs at {} ms, over {:.1} s (targets: CPU < {CPU_TARGET_PERCENT}% of one core, RSS < {} MiB)",
                    first.vips,
                    self.interval_ms,
                    first.window_s,
                    RSS_TARGET_KIB / 1024
                ),
                &idle_names,
            );
            let cpu = |c: &DaemonCost| format!("{:.2}%", c.cpu_percent_of_one_core);
            let rss = |c: &DaemonCost| format!("{:.1} MiB", c.rss_kib as f64 / 1024.0);
            t.row("master CPU (% of one core)", &idle, |i| cpu(&i.master));
            t.row("master RSS", &idle, |i| rss(&i.master));
            t.row("backup CPU (% of one core)", &idle, |i| cpu(&i.backup));
            t.row("backup RSS", &idle, |i| rss(&i.backup));
            t.row("processes (master + backup)", &idle, |i| {
                format!(
                    "{} + {}",
                    i.master.processes.len(),
                    i.backup.processes.len()
                )
            });
            t.row("master adverts / s on the wire", &idle, |i| {
                let rate = i.adverts_per_second.get(&i.master.node);
                format!("{:.0}", rate.copied().unwrap_or(0.0))
            });
            t.row("start → single master of all VIPs", &idle, |i| {
                i.time_to_settle_s
                    .map_or_else(|| "not settled".into(), |s| format!("{s:.2} s"))
            });
            t.row("VRIDs that moved during the window", &idle, |i| {
                i.unstable_vrids.to_string()
            });
            t.row("pid measured is the daemon", &idle, |i| {
                verdict(Some(i.agent_pid_is_the_daemon))
            });
            if let Some(ours) = self.idle.get(Implementation::Ours.label()) {
                let ok = [&ours.master, &ours.backup].iter().all(|c| {
                    c.cpu_percent_of_one_core < CPU_TARGET_PERCENT && c.rss_kib < RSS_TARGET_KIB
                });
                t.row("ours within the idle targets", &[ok], |ok| {
                    verdict(Some(*ok))
                });
            }
        }
        t.out
    }
}

fn signed(value: Option<f64>) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:+.1}"))
}

fn verdict(ok: Option<bool>) -> String {
    match ok {
        Some(true) => "yes".into(),
        Some(false) => "NO".into(),
        None => "—".into(),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", millis(d))
}
