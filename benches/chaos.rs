//! Chaos benchmark: random faults on a three-node lab in Kubernetes mode, and after each heal
//! the invariants an operator relies on.
//!
//! Run as root: `cargo bench --bench chaos -- --cycles 200 [--seed N] [--faults kill,stop,...]
//! [--keep]`. About 7 s per cycle (cycles that stop the API server take 10-25 s); prints a
//! line per cycle, then a report, and writes the figures to `target/bench-chaos.json`. Exits
//! non-zero when any invariant was violated.
//!
//! The rig: the real `ferrovip agent` on three lab nodes (network namespaces on a bridge),
//! each with its node's least-privilege identity, against a real kube-apiserver v1.20 with
//! etcd in the switch namespace. One dual-stack VirtualIP (192.0.2.100/24 and
//! fd66:7670::100/64, VRID 51, VRRPv3 every 100 ms, preempt): priorities 150 / 140 / 60, so
//! node-a is the expected master whenever every node is healthy, which is the case after
//! every heal. The capture on the bridge tells who advertises; `ip -j addr` in each
//! namespace tells who holds the addresses; the API tells what status says.
//!
//! Each cycle picks (seeded RNG) a fault and a node (the master half of the time), injects
//! it, holds it for a random short time, heals it, then checks:
//!
//! 1. single master: from the *effective heal* H plus one Master_Down_Interval of node-a
//!    (341 ms) plus a tolerance of [`TOLERANCE`], and then over an observation window of
//!    [`WINDOW`], exactly one node advertises each family, without a gap of more than
//!    3.5 intervals, and it is node-a (`wrong_master` otherwise). "Time to single master"
//!    is from H to the last disturbance (another node's advert, or the end of a gap).
//! 2. addresses, sampled every ~100 ms over the same window: each VIP on the master alone
//!    (`vip_missing`, `vip_on_backup`), no other address than the node's own
//!    (`stray_address`).
//! 3. kernel leftovers: no nft table `inet ferrovip` on any node, the forwarding sysctls as
//!    the lab set them, and none of the bench's own fault state (its `inet chaos` table).
//! 4. status converged within [`STATUS_BOUND`] of H (the API server being up by then):
//!    `status.master` is the node holding the address, `state: Active`, one entry per node,
//!    the master's `Master` and the others' `Backup`.
//! 5. agents alive (`agent_exited`), restarted agents running VRRP within
//!    [`AGENT_READY_BOUND`] (`agent_not_ready`).
//!
//! Two checks run during a fault, for issue 9 items 5 and 6: at the end of a kill or stop
//! held past 2 s (+ tolerance), the stopped node must hold no VIP any more
//! (`dead_agent_address`: a dead or hung agent's addresses expire); an agent started during
//! an API outage must run VRRP within 1 s, from its last snapshot (`agent_waits_for_api`).
//!
//! What H is, per fault (the moment from which the agents have all they need):
//! - `kill` (SIGKILL, agent restarted after the hold) and every restart: the first VRRP
//!   transition the new agent logs (its instance exists; RFC 5798 makes a starting router
//!   wait Master_Down_Interval before it takes over, preemption included).
//! - `stop` (SIGSTOP … SIGCONT): SIGCONT. A stopped master wakes with stale state: its
//!   advert timer is overdue, so it advertises at once and, having the highest priority,
//!   stays master while the node that took over steps down on that advert (RFC 5798
//!   6.4.3); a stopped backup drains the adverts queued meanwhile and stays backup.
//! - `link` (the node's switch port down … up, a cable pull): link up, or the last priority
//!   change ("configuration changed") the node's agent logs within its carrier poll (1 s)
//!   after it: the agent reads carrier only that often and lowers its priority (to the base,
//!   100) while the carrier is down, so a node-a that noticed the outage preempts only once
//!   it has noticed the return. Until then node-b is the single master.
//! - `partition` (nft drop of VRRP in and out of the node): the rules deleted. Both sides
//!   were masters; the lower one steps down on the first advert it hears.
//! - `apiserver` (stop or crash, same etcd data; half the time an agent is restarted during
//!   the outage): the API server ready again (and the restarted agent's first transition).
//!   VRRP must not notice the outage at all.
//! - `restart-in-partition` (the node partitioned, its agent SIGTERMed and started again,
//!   with or without `--restart-hold` on the outgoing agent, then the partition healed):
//!   the rules deleted.
//!
//! Opt-in with `--faults addr-del,...` (not in the list, so not drawn by default):
//! `addr-del` deletes the VIPs on the master (`ip addr del`); H is the deletion, and the VIPs
//! must be back on a single master (node-a repairing them, or a failover) within the same
//! bound (issue 9 item 4). A VIP left missing is re-established by restarting the agent after
//! the check, so that one failure is not counted again by the next cycles.
//!
//! This host kernel has no IPVS: no IPVS service can exist, and the agents run the default
//! `ipvs` dataplane, which reports it unavailable and then programs nothing (no IPVS, no nft
//! table, no sysctls). The nft and sysctl checks therefore only prove that nothing was
//! written; on an IPVS kernel they become meaningful. The report says so.

// The other benchmarks use what this one does not (the wire window, the tables).
#[allow(dead_code)]
mod common;
use common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use ferrovip::crd::VirtualIP;
use ferrovip::lab::{Lab, LabSpec, ProcId, Sniffer, log_tail, master_down_interval};
use ferrovip_e2e::{ApiServer, ApiServerOptions, node_object};
use kube::api::Api;
use kube::config::{KubeConfigOptions, Kubeconfig};
use nix::sys::signal::Signal;
use serde::Serialize;
use serde_json::{Value, json};

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");
const CRD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/crds/ferrovip.io_virtualips.yaml"
);
const RBAC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/rbac");
const AGENT_ROLE: &str = "ferrovip-agent";
/// The lab's subnet is 192.0.2.0/24 with nodes from .11; the API server takes .1 on the bridge.
const BRIDGE: &str = "192.0.2.1/24";
const NODES: usize = 3;
const VIP_NAME: &str = "chaos";
const VIP4: &str = "192.0.2.100";
const VIP6: &str = "fd66:7670::100";
/// The IPv6 instance's virtual link-local (RFC 5798 7.3 form for VRID 51), which the agent
/// may hold with the IPv6 VIP: allowed on the IPv6 master only, not required.
const VIP6_LL: &str = "fe80::200:5eff:fe00:233";
const VRID: u8 = 51;
const INTERVAL: Duration = Duration::from_millis(100);
/// base 100, node-a +50, node-b +40, node-c −40.
const PRIORITIES: [u8; NODES] = [150, 140, 60];
/// node-a: the highest priority, with preemption the master after every heal.
const EXPECTED: usize = 0;
/// Added to Master_Down_Interval for the deadline of a single master: scheduling of the
/// agents and of the capture thread on a shared two-core machine, and the 10 ms log polling
/// that dates a restarted agent's start. The wire timestamps themselves are not polled.
const TOLERANCE: Duration = Duration::from_millis(150);
/// How long the invariants must hold after the deadline.
const WINDOW: Duration = Duration::from_millis(1200);
/// A gap in the master's adverts longer than this counts as no master (backups with the
/// lab's priorities take over after 3 intervals plus their skew, 3.4-3.8 intervals).
const GAP: Duration = Duration::from_millis(350);
/// The agent reads interface carrier this often (`CARRIER_POLL` in src/agent.rs).
const CARRIER_POLL: Duration = Duration::from_secs(1);
/// Status must converge this long after the heal (the agents retry status writes every 1 s).
const STATUS_BOUND: Duration = Duration::from_secs(10);
/// A restarted agent must run VRRP this long after it was started (or after the API server
/// came back, when it was started during an outage).
const AGENT_READY_BOUND: Duration = Duration::from_secs(30);
/// During a fault: a killed or stopped agent's addresses must be gone this long after it
/// stopped (issue 9 item 5), checked at the end of holds at least this long (+ tolerance).
const DEAD_ADDRESS_BOUND: Duration = Duration::from_secs(2);
/// During an API outage: an agent started then must run VRRP (from its last snapshot) within
/// this (issue 9 item 6); checked when the outage lasts that long after the start.
const OUTAGE_START_BOUND: Duration = Duration::from_secs(1);
/// `--restart-hold` given to about half of the agents started.
const RESTART_HOLD: &str = "2s";
const SAMPLE: Duration = Duration::from_millis(100);
const POLL: Duration = Duration::from_millis(10);
const LOG_LINES: usize = 30;
/// Sysctls the agent's dataplane would change; each node's must stay as the lab set it.
const SYSCTLS: [&str; 4] = [
    "/proc/sys/net/ipv4/ip_forward",
    "/proc/sys/net/ipv6/conf/all/forwarding",
    "/proc/sys/net/ipv4/vs/conntrack",
    "/proc/sys/net/ipv6/conf/eth0/accept_ra",
];
/// The bench's own table for partitions.
const PARTITION_TABLE: &str = "inet chaos";
const PARTITION_RULES: &str = "table inet chaos {
  chain in { type filter hook input priority -300; policy accept; meta l4proto 112 drop; }
  chain out { type filter hook output priority -300; policy accept; meta l4proto 112 drop; }
}
";

/// Random faults on a three-node Kubernetes-mode lab; invariants after each heal.
#[derive(Parser, Debug)]
#[command(name = "chaos")]
struct Args {
    /// Fault cycles to run.
    #[arg(long, default_value_t = 200)]
    cycles: usize,
    /// Seed of the fault sequence (printed; default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// Only these faults (comma-separated): kill, stop, link, partition, apiserver,
    /// restart-in-partition, and the opt-in addr-del (`ip addr del` of the VIPs on the master).
    #[arg(long, value_delimiter = ',')]
    faults: Vec<String>,
    /// Copy the agents' and the API server's logs to target/chaos-logs/<pid> (done anyway
    /// when an invariant was violated).
    #[arg(long)]
    keep: bool,
    /// Added by `cargo bench`; `cargo test --benches` runs the binary without it.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.bench {
        wire_verdict_self_check();
        println!(
            "chaos: wire verdict self-check passed; a root benchmark of real daemons, run it with `cargo bench --bench chaos`"
        );
        return Ok(());
    }
    let faults: Vec<FaultKind> = if args.faults.is_empty() {
        FaultKind::ALL.to_vec()
    } else {
        args.faults
            .iter()
            .map(|f| FaultKind::from_str(f))
            .collect::<anyhow::Result<_>>()?
    };
    ensure!(args.cycles > 0, "--cycles must be positive");
    let seed = args.seed.unwrap_or_else(|| {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        nanos ^ u64::from(std::process::id()).rotate_left(32)
    });
    let mut rng = Rng::new(seed);
    std::sync::LazyLock::force(&ANCHOR);
    watch_for_interrupts()?;
    let started = Instant::now();
    let removed = Lab::cleanup_stale()?;
    if !removed.is_empty() {
        println!(
            "removed {} namespaces left behind by earlier labs",
            removed.len()
        );
    }
    let ipvs = Path::new("/proc/net/ip_vs").exists();
    println!(
        "ferrovip chaos benchmark: {} cycles, seed {seed} (rerun with --seed {seed}), faults {}",
        args.cycles,
        faults
            .iter()
            .map(|f| f.label())
            .collect::<Vec<_>>()
            .join(",")
    );
    println!(
        "{NODES} nodes, kube-apiserver {}, VRRPv3 every {} ms, VIPs {VIP4} and {VIP6}, priorities 150 / 140 / 60; \
         Master_Down_Interval of node-a {:.0} ms, tolerance {} ms",
        ferrovip_e2e::APISERVER_VERSION,
        INTERVAL.as_millis(),
        millis(mdi()),
        TOLERANCE.as_millis()
    );
    println!("{}", ipvs_note(ipvs));
    let mut cluster = Cluster::create(&mut rng)?;
    if args.keep {
        println!("logs will be copied to {}", logs_dir().display());
    }
    let mut report = Report::new(seed, args.cycles, ipvs);
    let setup = cluster.settle_check(0, "setup", Instant::now(), None)?;
    report.record(setup);
    let mut interrupted = false;
    for cycle in 1..=args.cycles {
        if check_interrupted().is_err() {
            interrupted = true;
            break;
        }
        let fault = Fault::pick(&mut rng, &faults);
        let cycle_started = Instant::now();
        match cluster.run_cycle(cycle, &fault, &mut rng) {
            Ok(outcome) => {
                println!("{}", outcome.line(args.cycles, cycle_started.elapsed()));
                report.record(outcome);
            }
            Err(e) => {
                if check_interrupted().is_err() {
                    interrupted = true;
                    break;
                }
                // The harness itself failed (not an invariant): stop with what was measured.
                eprintln!("cycle {cycle} ({}): harness error: {e:#}", fault.label());
                report.harness_error = Some(format!("cycle {cycle} ({}): {e:#}", fault.label()));
                break;
            }
        }
    }
    report.runtime_s = round3(started.elapsed().as_secs_f64());
    report.restarts_with_hold = cluster.restarts_with_hold;
    report.restarts = cluster.restarts;
    if args.keep || !report.violations.is_empty() || report.harness_error.is_some() {
        // Copied out of the lab directory, which the next lab's stale clean-up removes.
        let saved = logs_dir();
        match save_logs(&cluster, &saved) {
            Ok(()) => report.logs = Some(saved.display().to_string()),
            Err(e) => eprintln!("could not save the logs: {e:#}"),
        }
    }
    drop(cluster);

    println!("\n{}", report.table());
    let json_path = json_path();
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    println!("figures written to {}", json_path.display());
    if interrupted {
        bail!("interrupted after {} cycles", report.cycles_run);
    }
    if let Some(e) = &report.harness_error {
        bail!("the harness failed: {e}");
    }
    if !report.violations.is_empty() || report.leftovers > 0 {
        bail!(
            "{} invariant violation(s), {} leftover(s) (target 0)",
            report.violations.len(),
            report.leftovers
        );
    }
    Ok(())
}

fn ipvs_note(ipvs: bool) -> String {
    if ipvs {
        "IPVS: available in this kernel; the agents run the ipvs dataplane (the VirtualIP \
         declares no service, so no IPVS service, nft table or forwarding sysctl may appear)"
            .into()
    } else {
        "IPVS: not in this kernel (no /proc/net/ip_vs), so no IPVS service can exist; the agents \
         run the default ipvs dataplane, which reports it unavailable and programs nothing, so \
         the nft-table and sysctl checks only show that nothing was written"
            .into()
    }
}

/// Master_Down_Interval of the expected master.
fn mdi() -> Duration {
    master_down_interval(PRIORITIES[EXPECTED], INTERVAL)
}

/// `target/chaos-logs/<pid>`: the agents' and the API server's logs of a run with violations.
fn logs_dir() -> PathBuf {
    json_path()
        .with_file_name("chaos-logs")
        .join(std::process::id().to_string())
}

/// Copies every agent log and the API server's and etcd's logs (not etcd's data) to `to`.
fn save_logs(cluster: &Cluster, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for dir in [cluster.lab.dir(), cluster.api.dir()] {
        for entry in std::fs::read_dir(dir)?.filter_map(Result::ok) {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                std::fs::copy(&path, to.join(entry.file_name()))
                    .with_context(|| format!("copying {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// `target/bench-chaos.json`, next to the agent binary's profile directory.
fn json_path() -> PathBuf {
    Path::new(AGENT_BINARY)
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("target"))
        .join("bench-chaos.json")
}

// ---------------------------------------------------------------------------------------------
// Clocks

/// One instant and the wall clock at the same moment: agent logs carry wall-clock time.
static ANCHOR: std::sync::LazyLock<(Instant, SystemTime)> =
    std::sync::LazyLock::new(|| (Instant::now(), SystemTime::now()));

/// The instant of wall-clock time `t`.
fn instant_of(t: SystemTime) -> Instant {
    let (instant, system) = *ANCHOR;
    match t.duration_since(system) {
        Ok(after) => instant + after,
        Err(e) => instant.checked_sub(e.duration()).unwrap_or(instant),
    }
}

fn ms_since(t: Instant, from: Instant) -> f64 {
    if t >= from {
        millis(t - from)
    } else {
        -millis(from - t)
    }
}

// ---------------------------------------------------------------------------------------------
// A small seeded generator (SplitMix64): reproducible fault sequences without a dependency.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// Uniform in [lo, hi] milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

// ---------------------------------------------------------------------------------------------
// Faults

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
enum FaultKind {
    Kill,
    Stop,
    Link,
    Partition,
    Apiserver,
    RestartInPartition,
    /// Opt-in (not in the list): `ip addr del` of the VIPs on the master.
    AddrDel,
}

impl FaultKind {
    const ALL: [FaultKind; 6] = [
        FaultKind::Kill,
        FaultKind::Stop,
        FaultKind::Link,
        FaultKind::Partition,
        FaultKind::Apiserver,
        FaultKind::RestartInPartition,
    ];
    /// Chosen only when named in `--faults`.
    const OPTIONAL: [FaultKind; 1] = [FaultKind::AddrDel];

    fn label(self) -> &'static str {
        match self {
            FaultKind::Kill => "kill",
            FaultKind::Stop => "stop",
            FaultKind::Link => "link",
            FaultKind::Partition => "partition",
            FaultKind::Apiserver => "apiserver",
            FaultKind::RestartInPartition => "restart-in-partition",
            FaultKind::AddrDel => "addr-del",
        }
    }
}

impl FromStr for FaultKind {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<FaultKind> {
        FaultKind::ALL
            .into_iter()
            .chain(FaultKind::OPTIONAL)
            .find(|f| f.label() == s)
            .with_context(|| {
                format!("unknown fault {s:?}: kill, stop, link, partition, apiserver, restart-in-partition, addr-del")
            })
    }
}

/// One fault as drawn: kind, node, durations and variant.
#[derive(Debug, Clone)]
struct Fault {
    kind: FaultKind,
    node: usize,
    hold: Duration,
    /// apiserver: crash (SIGKILL) rather than stop; with an agent restarted during it.
    crash: bool,
    restart_during: bool,
    /// restart-in-partition: partitioned this long before the restart.
    before_restart: Duration,
}

impl Fault {
    fn pick(rng: &mut Rng, kinds: &[FaultKind]) -> Fault {
        let kind = kinds[rng.below(kinds.len())];
        // The master half of the time, else one of the backups.
        let node = if rng.chance() {
            EXPECTED
        } else {
            1 + rng.below(NODES - 1)
        };
        let hold = match kind {
            // Around Master_Down_Interval and past the 2 s an address of a dead agent may
            // live (issue 9 item 5).
            FaultKind::Link | FaultKind::Partition => rng.millis(100, 2500),
            FaultKind::Kill | FaultKind::Stop => rng.millis(100, 3500),
            FaultKind::Apiserver => rng.millis(1000, 6000),
            FaultKind::RestartInPartition => rng.millis(200, 1500),
            FaultKind::AddrDel => Duration::ZERO,
        };
        Fault {
            kind,
            // The VIPs are on the master.
            node: if kind == FaultKind::AddrDel {
                EXPECTED
            } else {
                node
            },
            hold,
            crash: rng.chance(),
            restart_during: rng.chance(),
            before_restart: rng.millis(200, 1000),
        }
    }

    fn label(&self) -> String {
        let node = node_letter(self.node);
        match self.kind {
            FaultKind::Apiserver => format!(
                "apiserver {}{}",
                if self.crash { "crash" } else { "stop" },
                if self.restart_during {
                    format!(" + restart node-{node}")
                } else {
                    String::new()
                }
            ),
            kind => format!("{} node-{node}", kind.label()),
        }
    }
}

fn node_letter(i: usize) -> char {
    char::from(b'a' + i as u8)
}

fn name_of(i: usize) -> String {
    format!("node-{}", node_letter(i))
}

// ---------------------------------------------------------------------------------------------
// Outcomes

#[derive(Debug, Clone, Serialize)]
struct Violation {
    cycle: usize,
    kind: &'static str,
    fault: String,
    detail: String,
}

impl Violation {
    /// Kinds that are something left behind rather than a wrong state.
    fn is_leftover(&self) -> bool {
        matches!(
            self.kind,
            "vip_on_backup" | "stray_address" | "nft_table" | "sysctl_changed" | "bench_leftover"
        )
    }

    /// Kinds checked during a fault rather than after its heal.
    fn during_fault(&self) -> bool {
        matches!(self.kind, "dead_agent_address" | "agent_waits_for_api")
    }
}

#[derive(Debug, Clone, Serialize)]
struct CycleOutcome {
    cycle: usize,
    fault: String,
    kind: Option<FaultKind>,
    hold_ms: f64,
    /// Effective heal relative to the heal action.
    heal_delay_ms: f64,
    /// Per family (IPv4, IPv6): time from the effective heal to a single master.
    single_master_ms: [Option<f64>; 2],
    status_ms: Option<f64>,
    /// The outgoing agent ran with `--restart-hold` (restart faults only).
    restart_hold: Option<bool>,
    violations: Vec<Violation>,
}

impl CycleOutcome {
    fn line(&self, cycles: usize, took: Duration) -> String {
        let single = self
            .single_master_ms
            .iter()
            .map(|v| opt_ms(*v))
            .collect::<Vec<_>>()
            .join("/");
        let mut line = format!(
            "cycle {:>3}/{cycles} {:<34} hold {:>5.0} ms  single master after {:>11} ms  status {:>6} ms  ({:.1} s)",
            self.cycle,
            self.fault,
            self.hold_ms,
            single,
            opt_ms(self.status_ms),
            took.as_secs_f64()
        );
        if self.heal_delay_ms >= 1.0 {
            let _ = write!(line, "  (effective heal +{:.0} ms)", self.heal_delay_ms);
        }
        if self.violations.is_empty() {
            line.push_str("  ok");
        }
        for v in &self.violations {
            let _ = write!(line, "\n    VIOLATION {}: {}", v.kind, v.detail);
        }
        line
    }
}

// ---------------------------------------------------------------------------------------------
// The cluster: lab, API server, capture, agents, an admin client

/// Addresses on a node other than its own, with their interface.
type NodeAddresses = Vec<(IpAddr, String)>;

struct AgentRun {
    id: ProcId,
    log: PathBuf,
    restart_hold: bool,
}

struct Cluster {
    // Field order is drop order: the client before the server, the capture and the server
    // before the namespaces. Drop (below) first continues stopped agents.
    client: kube::Client,
    runtime: tokio::runtime::Runtime,
    sniffer: Sniffer,
    api: ApiServer,
    lab: Lab,
    agents: Vec<Option<AgentRun>>,
    starts: Vec<usize>,
    rules: PathBuf,
    manifests: usize,
    sysctls: Vec<String>,
    restarts: usize,
    restarts_with_hold: usize,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // A stopped agent would sit out SIGTERM until the lab kills it; the lab's teardown
        // does the rest (processes, namespaces with their nft rules and links), then the API
        // server's (kube-apiserver, etcd, its data directory).
        for run in self.agents.iter().flatten() {
            let _ = self.lab.kill(run.id, Signal::SIGCONT);
        }
    }
}

impl Cluster {
    fn create(rng: &mut Rng) -> anyhow::Result<Cluster> {
        let started = Instant::now();
        let lab = Lab::create(LabSpec {
            nodes: NODES,
            ipv6: true,
            bridge_ipv4: Some(BRIDGE.parse().context("bridge prefix")?),
            ..LabSpec::default()
        })?;
        let api = ApiServer::start(ApiServerOptions {
            netns: Some(lab.switch_netns().to_owned()),
            bind: lab.bridge_ipv4().context("bridge address")?.into(),
            dir: lab.dir().join("apiserver"),
            node_users: lab.nodes().iter().map(|n| n.name.clone()).collect(),
            build_script: Some(BUILD_SCRIPT.into()),
            ..ApiServerOptions::default()
        })?;
        let sniffer = Sniffer::start(&lab)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("harness runtime")?;
        let kubeconfig = api.host_admin_kubeconfig().to_owned();
        let client = runtime.block_on(async move {
            let kubeconfig = Kubeconfig::read_from(&kubeconfig)?;
            let config =
                kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                    .await?;
            anyhow::Ok(kube::Client::try_from(config)?)
        })?;
        let rules = lab.dir().join("partition.nft");
        std::fs::write(&rules, PARTITION_RULES).context("writing the partition rules")?;
        let mut cluster = Cluster {
            client,
            runtime,
            sniffer,
            api,
            lab,
            agents: (0..NODES).map(|_| None).collect(),
            starts: vec![0; NODES],
            rules,
            manifests: 0,
            sysctls: Vec::new(),
            restarts: 0,
            restarts_with_hold: 0,
        };
        cluster.sysctls = (0..NODES)
            .map(|i| cluster.read_sysctls(i))
            .collect::<anyhow::Result<_>>()?;
        cluster.install()?;
        for i in 0..NODES {
            cluster.start_agent(i, rng.chance())?;
        }
        for i in 0..NODES {
            cluster.wait_vrrp(i, Instant::now())?;
        }
        println!(
            "lab {} and API server {} ready, agents running, after {:.1} s",
            cluster.lab.prefix(),
            cluster.api.url(),
            started.elapsed().as_secs_f64()
        );
        Ok(cluster)
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        Ok(self.api.kubectl_ok(args)?)
    }

    fn apply(&mut self, doc: &Value) -> anyhow::Result<()> {
        self.manifests += 1;
        let path = self
            .api
            .dir()
            .join(format!("manifest-{}.json", self.manifests));
        std::fs::write(&path, doc.to_string())?;
        self.kubectl(&["apply", "-f", &path.display().to_string()])?;
        Ok(())
    }

    /// The CRD, the agent's RBAC bound to the node identities, one Ready Node per lab node,
    /// and the VirtualIP.
    fn install(&mut self) -> anyhow::Result<()> {
        self.kubectl(&["apply", "-f", CRD])?;
        self.kubectl(&[
            "wait",
            "--for=condition=established",
            "--timeout=30s",
            "crd/virtualips.ferrovip.io",
        ])?;
        self.kubectl(&["apply", "-f", RBAC])?;
        self.api.bind_agent_group(AGENT_ROLE)?;
        let nodes: Vec<Value> = self.lab.nodes().iter().map(node_object).collect();
        self.apply(&json!({"apiVersion": "v1", "kind": "List", "items": nodes}))?;
        self.apply(&json!({
            "apiVersion": "ferrovip.io/v1alpha1",
            "kind": "VirtualIP",
            "metadata": {"name": VIP_NAME},
            "spec": {
                "addresses": [format!("{VIP4}/24"), format!("{VIP6}/64")],
                "interface": "eth0",
                "virtualRouterId": VRID,
                "vrrp": {
                    "version": 3,
                    "advertisementInterval": format!("{}ms", INTERVAL.as_millis()),
                    "preempt": true,
                },
                "priority": {
                    "base": 100,
                    "preferredNodes": [
                        {"nodeName": "node-a", "weight": 50},
                        {"nodeName": "node-b", "weight": 40},
                        {"nodeName": "node-c", "weight": -40},
                    ],
                },
            },
        }))?;
        Ok(())
    }

    fn start_agent(&mut self, i: usize, restart_hold: bool) -> anyhow::Result<()> {
        self.starts[i] += 1;
        let name = name_of(i);
        let state_dir = self.lab.dir().join(format!("state-{name}"));
        std::fs::create_dir_all(&state_dir)?;
        let kubeconfig = format!("KUBECONFIG={}", self.api.node_kubeconfig(&name).display());
        let state_dir = state_dir.display().to_string();
        let mut args = vec![
            "env",
            &kubeconfig,
            "FERROVIP_LOG=info",
            AGENT_BINARY,
            "--log-format",
            "json",
            "agent",
            "--node-name",
            &name,
            "--state-dir",
            &state_dir,
        ];
        if restart_hold {
            args.extend(["--restart-hold", RESTART_HOLD]);
        }
        let id = self
            .lab
            .spawn(i, &args, format!("{name}.{}.log", self.starts[i]))?;
        let log = self.lab.proc_info(id)?.1;
        self.agents[i] = Some(AgentRun {
            id,
            log,
            restart_hold,
        });
        Ok(())
    }

    fn run(&self, i: usize) -> anyhow::Result<&AgentRun> {
        self.agents[i]
            .as_ref()
            .with_context(|| format!("no agent runs on {}", name_of(i)))
    }

    /// Stops node `i`'s agent with `signal` and waits until it is gone (SIGKILL after 10 s).
    fn stop_agent(&mut self, i: usize, signal: Signal) -> anyhow::Result<()> {
        let id = self.run(i)?.id;
        self.lab.kill(id, signal)?;
        if self.lab.wait(id, Duration::from_secs(10))?.is_none() {
            self.lab.kill(id, Signal::SIGKILL)?;
            self.lab.wait(id, Duration::from_secs(5))?;
        }
        self.agents[i] = None;
        Ok(())
    }

    /// SIGTERM (the outgoing agent releases, or holds with `--restart-hold`) and a new agent.
    /// Returns whether the outgoing one held its addresses.
    fn restart_agent(&mut self, i: usize, rng: &mut Rng) -> anyhow::Result<bool> {
        let held = self.run(i)?.restart_hold;
        self.stop_agent(i, Signal::SIGTERM)?;
        self.start_agent(i, rng.chance())?;
        self.restarts += 1;
        self.restarts_with_hold += usize::from(held);
        Ok(held)
    }

    /// Transitions node `i`'s current agent logged (wall clock → instant, to state).
    fn transitions(&self, i: usize) -> Vec<(Instant, String)> {
        self.logged(i, |l| l["event"] == "transition")
            .map(|(at, l)| (at, l["to"].as_str().unwrap_or("?").to_owned()))
            .collect()
    }

    /// When node `i`'s current agent logged a new configuration of its instance (a priority
    /// change, e.g. on carrier loss and return).
    fn priority_changes(&self, i: usize) -> Vec<Instant> {
        self.logged(i, |l| l["message"] == "configuration changed")
            .map(|(at, _)| at)
            .collect()
    }

    /// The lines of node `i`'s current agent's JSON log that `wanted` picks, with when they
    /// were logged.
    fn logged(
        &self,
        i: usize,
        wanted: impl Fn(&Value) -> bool,
    ) -> impl Iterator<Item = (Instant, Value)> {
        let text = match &self.agents[i] {
            Some(run) => std::fs::read_to_string(&run.log).unwrap_or_default(),
            None => String::new(),
        };
        let lines: Vec<Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|l| wanted(l))
            .collect();
        lines.into_iter().filter_map(|l| {
            let at = l["timestamp"]
                .as_str()
                .and_then(|t| k8s_openapi::jiff::Timestamp::from_str(t).ok())
                .map(SystemTime::from)?;
            Some((instant_of(at), l))
        })
    }

    /// Waits until node `i`'s agent logged its first transition (its VRRP instance runs), at
    /// most [`AGENT_READY_BOUND`] from `from`. Returns when (from the log's timestamp), or
    /// `None` on timeout or when the agent exited.
    fn wait_vrrp(&self, i: usize, from: Instant) -> anyhow::Result<Option<Instant>> {
        let deadline = from + AGENT_READY_BOUND;
        loop {
            check_interrupted()?;
            if let Some((at, _)) = self.transitions(i).first() {
                return Ok(Some(*at));
            }
            if self.exited(i)?.is_some() || Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(POLL);
        }
    }

    fn exited(&self, i: usize) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match &self.agents[i] {
            Some(run) => Ok(self.lab.exit_status(run.id)?),
            None => Ok(None),
        }
    }

    fn log_tail(&self, i: usize) -> String {
        self.agents[i]
            .as_ref()
            .map(|run| log_tail(&run.log, LOG_LINES))
            .unwrap_or_default()
    }

    fn port(i: usize) -> String {
        format!("port-{}", node_letter(i))
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .context("running ip")?;
        ensure!(
            out.status.success(),
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn set_link(&self, i: usize, up: bool) -> anyhow::Result<()> {
        let sw = self.lab.switch_netns().to_owned();
        self.ip(&[
            "-n",
            &sw,
            "link",
            "set",
            &Cluster::port(i),
            if up { "up" } else { "down" },
        ])
        .map(drop)
    }

    fn partition(&self, i: usize, on: bool) -> anyhow::Result<()> {
        let rules = self.rules.display().to_string();
        let args: Vec<&str> = if on {
            vec!["nft", "-f", &rules]
        } else {
            vec!["nft", "delete", "table", "inet", "chaos"]
        };
        let out = self.lab.exec(i, &args)?;
        ensure!(
            out.status.success(),
            "nft {} on {} failed: {}",
            if on { "partition" } else { "heal" },
            name_of(i),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Addresses on node `i` other than its own (loopback, eth0's IPv4, ULA and link-local),
    /// as `address@interface`.
    fn extra_addresses(&self, i: usize) -> anyhow::Result<NodeAddresses> {
        let node = self.lab.node(i);
        let text = self.ip(&["-n", &node.netns, "-j", "addr", "show"])?;
        let links: Value = serde_json::from_str(&text).context("ip -j addr")?;
        let mut extra = Vec::new();
        for link in links.as_array().into_iter().flatten() {
            let ifname = link["ifname"].as_str().unwrap_or("?");
            for info in link["addr_info"].as_array().into_iter().flatten() {
                let Some(addr) = info["local"]
                    .as_str()
                    .and_then(|a| a.parse::<IpAddr>().ok())
                else {
                    continue;
                };
                if addr.is_loopback() || node.owns(addr) {
                    continue;
                }
                extra.push((addr, ifname.to_owned()));
            }
        }
        Ok(extra)
    }

    fn nft_tables(&self, i: usize) -> anyhow::Result<Vec<String>> {
        let out = self.lab.exec(i, &["nft", "list", "tables"])?;
        ensure!(
            out.status.success(),
            "nft list tables on {} failed: {}",
            name_of(i),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("table "))
            .map(str::to_owned)
            .collect())
    }

    fn read_sysctls(&self, i: usize) -> anyhow::Result<String> {
        let mut values = Vec::new();
        for path in SYSCTLS {
            let out = self.lab.exec(i, &["cat", path])?;
            values.push(if out.status.success() {
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            } else {
                "absent".to_owned()
            });
        }
        Ok(values.join(" "))
    }

    /// The VirtualIP's status as the API server has it (`None` while it is unreachable).
    fn status(&self) -> Option<Value> {
        let api: Api<VirtualIP> = Api::all(self.client.clone());
        self.runtime.block_on(async {
            let got = tokio::time::timeout(Duration::from_secs(1), api.get_opt(VIP_NAME)).await;
            match got {
                Ok(Ok(Some(vip))) => serde_json::to_value(vip.status.unwrap_or_default()).ok(),
                _ => None,
            }
        })
    }

    // -----------------------------------------------------------------------------------------
    // One cycle

    fn run_cycle(
        &mut self,
        cycle: usize,
        fault: &Fault,
        rng: &mut Rng,
    ) -> anyhow::Result<CycleOutcome> {
        let x = fault.node;
        let mut early = Vec::new();
        let mut restart_hold = None;
        // `heal`: the heal action done; `ready`: a restarted agent's first transition;
        // `react`: how long after `heal` the node's agent may take to notice.
        let (heal, ready, react) = match fault.kind {
            FaultKind::Kill => {
                self.stop_agent(x, Signal::SIGKILL)?;
                let stopped = Instant::now();
                sleep(fault.hold)?;
                self.check_dead_addresses(cycle, fault, stopped, &mut early)?;
                let hold = rng.chance();
                self.start_agent(x, hold)?;
                let heal = Instant::now();
                (
                    heal,
                    Some(self.await_vrrp(cycle, fault, x, heal, &mut early)?),
                    None,
                )
            }
            FaultKind::Stop => {
                let id = self.run(x)?.id;
                self.lab.kill(id, Signal::SIGSTOP)?;
                let stopped = Instant::now();
                let slept = sleep(fault.hold)
                    .and_then(|()| self.check_dead_addresses(cycle, fault, stopped, &mut early));
                self.lab.kill(id, Signal::SIGCONT)?;
                slept?;
                (Instant::now(), None, None)
            }
            FaultKind::Link => {
                self.set_link(x, false)?;
                let slept = sleep(fault.hold);
                self.set_link(x, true)?;
                slept?;
                (Instant::now(), None, Some(CARRIER_POLL + TOLERANCE))
            }
            FaultKind::Partition => {
                self.partition(x, true)?;
                let slept = sleep(fault.hold);
                self.partition(x, false)?;
                slept?;
                (Instant::now(), None, None)
            }
            FaultKind::RestartInPartition => {
                self.partition(x, true)?;
                let result = (|| {
                    sleep(fault.before_restart)?;
                    restart_hold = Some(self.restart_agent(x, rng)?);
                    let started = Instant::now();
                    let ready = self.await_vrrp(cycle, fault, x, started, &mut early)?;
                    sleep(fault.hold)?;
                    anyhow::Ok(ready)
                })();
                self.partition(x, false)?;
                let ready = result?;
                (Instant::now(), Some(ready), None)
            }
            FaultKind::AddrDel => {
                // Someone deletes the VIPs on the master; nothing heals it but the agent, which
                // must put them back or fail over (issue 9 item 4).
                let netns = self.lab.node(x).netns.clone();
                for vip in [format!("{VIP4}/24"), format!("{VIP6}/64")] {
                    self.ip(&["-n", &netns, "addr", "del", &vip, "dev", "eth0"])?;
                }
                (Instant::now(), None, None)
            }
            FaultKind::Apiserver => {
                if fault.crash {
                    self.api.kill()?;
                } else {
                    self.api.stop()?;
                }
                let result = (|| {
                    if fault.restart_during {
                        sleep(fault.hold / 4)?;
                        restart_hold = Some(self.restart_agent(x, rng)?);
                        let started = Instant::now();
                        sleep(fault.hold - fault.hold / 4)?;
                        if started.elapsed() >= OUTAGE_START_BOUND && self.transitions(x).is_empty()
                        {
                            early.push(Violation {
                                cycle,
                                kind: "agent_waits_for_api",
                                fault: fault.label(),
                                detail: format!(
                                    "the agent started on {} during the API outage ran no VRRP \
                                     instance in {:.1} s (bound {:.1} s)",
                                    name_of(x),
                                    started.elapsed().as_secs_f64(),
                                    OUTAGE_START_BOUND.as_secs_f64()
                                ),
                            });
                        }
                    } else {
                        sleep(fault.hold)?;
                    }
                    anyhow::Ok(())
                })();
                // Same address, certificates and etcd data; returns once ready.
                self.api.restart()?;
                result?;
                let heal = Instant::now();
                let ready = if fault.restart_during {
                    Some(self.await_vrrp(cycle, fault, x, heal, &mut early)?)
                } else {
                    None
                };
                (heal, ready, None)
            }
        };
        let mut outcome =
            self.settle_check(cycle, &fault.label(), heal, Some((ready, react, x)))?;
        if fault.kind == FaultKind::AddrDel
            && outcome.violations.iter().any(|v| v.kind == "vip_missing")
        {
            // Not repaired: a fresh agent puts the addresses back, so that the next cycle
            // starts from a sane state instead of counting this violation again.
            self.restart_agent(x, rng)?;
            let started = Instant::now();
            self.wait_vrrp(x, started)?;
            sleep(2 * mdi() + WINDOW)?;
        }
        outcome.kind = Some(fault.kind);
        outcome.hold_ms = millis(fault.hold);
        outcome.restart_hold = restart_hold;
        early.append(&mut outcome.violations);
        outcome.violations = early;
        Ok(outcome)
    }

    /// During a kill or stop of node `x`'s agent held past [`DEAD_ADDRESS_BOUND`]: the node
    /// must no longer hold a VIP (issue 9 item 5: a dead or hung agent's addresses expire).
    fn check_dead_addresses(
        &self,
        cycle: usize,
        fault: &Fault,
        stopped: Instant,
        violations: &mut Vec<Violation>,
    ) -> anyhow::Result<()> {
        let x = fault.node;
        let since = stopped.elapsed();
        if since < DEAD_ADDRESS_BOUND + TOLERANCE {
            return Ok(());
        }
        let held: Vec<String> = self
            .extra_addresses(x)?
            .into_iter()
            .map(|(a, _)| a.to_string())
            .filter(|a| [VIP4, VIP6, VIP6_LL].contains(&a.as_str()))
            .collect();
        if !held.is_empty() {
            let others: Vec<usize> = (0..NODES)
                .filter(|i| *i != x)
                .filter(|i| {
                    self.extra_addresses(*i)
                        .is_ok_and(|a| a.iter().any(|(a, _)| a.to_string() == VIP4))
                })
                .collect();
            violations.push(Violation {
                cycle,
                kind: "dead_agent_address",
                fault: fault.label(),
                detail: format!(
                    "{:.1} s after its agent was {}, {} still holds {} ({VIP4} also on {}); bound {:.0} s",
                    since.as_secs_f64(),
                    if fault.kind == FaultKind::Kill { "killed" } else { "stopped" },
                    name_of(x),
                    held.join(", "),
                    names(&others),
                    DEAD_ADDRESS_BOUND.as_secs_f64()
                ),
            });
        }
        Ok(())
    }

    /// Waits for node `x`'s new agent to run VRRP; on timeout records `agent_not_ready` and
    /// returns `from`, so that the other checks still run.
    fn await_vrrp(
        &self,
        cycle: usize,
        fault: &Fault,
        x: usize,
        from: Instant,
        violations: &mut Vec<Violation>,
    ) -> anyhow::Result<Instant> {
        match self.wait_vrrp(x, from)? {
            Some(at) => Ok(at),
            None => {
                violations.push(Violation {
                    cycle,
                    kind: "agent_not_ready",
                    fault: fault.label(),
                    detail: format!(
                        "the agent started on {} ran no VRRP instance within {AGENT_READY_BOUND:?}; log:\n{}",
                        name_of(x),
                        indent(&self.log_tail(x))
                    ),
                });
                Ok(Instant::now())
            }
        }
    }

    /// Observes the wire, the addresses, the kernel and the status after a heal at `heal`
    /// and checks the invariants. `target`: (a restarted agent's first transition, how long
    /// the node's agent may take to react, the node).
    fn settle_check(
        &mut self,
        cycle: usize,
        fault: &str,
        heal: Instant,
        target: Option<(Option<Instant>, Option<Duration>, usize)>,
    ) -> anyhow::Result<CycleOutcome> {
        let mut violations = Vec::new();
        let mut violation = |kind: &'static str, detail: String| {
            violations.push(Violation {
                cycle,
                kind,
                fault: fault.to_owned(),
                detail,
            })
        };
        let (ready, react, x) = target.unwrap_or((None, None, EXPECTED));
        // The latest the effective heal can be; the exact one is read from the logs below.
        let heal_max = ready.map_or(heal, |r| r.max(heal)) + react.unwrap_or_default();
        let end = heal_max + mdi() + TOLERANCE + WINDOW;

        // Sample addresses and status until the end of the window.
        let mut samples: Vec<(Instant, Vec<NodeAddresses>)> = Vec::new();
        let mut statuses: Vec<(Instant, bool, Option<Value>)> = Vec::new();
        loop {
            check_interrupted()?;
            let at = Instant::now();
            let per_node = (0..NODES)
                .map(|i| self.extra_addresses(i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let holder = holder_of(&per_node, VIP4);
            let status = self.status();
            let converged = status.as_ref().is_some_and(|s| status_converged(s, holder));
            samples.push((at, per_node));
            statuses.push((at, converged, status));
            if at >= end {
                break;
            }
            let next = at + SAMPLE;
            let now = Instant::now();
            if next > now {
                std::thread::sleep(next - now);
            }
        }

        // Effective heal.
        let mut effective = ready.map_or(heal, |r| r.max(heal));
        if let Some(react) = react {
            // The agent derives priority from carrier, read every CARRIER_POLL: the last
            // priority change it logged in that time after the heal is when it knew.
            if let Some(at) = self
                .priority_changes(x)
                .into_iter()
                .filter(|at| *at >= heal && *at <= heal + react)
                .max()
            {
                effective = effective.max(at);
            }
        }
        let deadline = effective + mdi() + TOLERANCE;

        // 1. The wire.
        let events = self
            .sniffer
            .events_since(effective.checked_sub(GAP).unwrap_or(effective));
        let mut single_master_ms = [None, None];
        let mut masters = [None, None];
        for (f, family) in ["IPv4", "IPv6"].into_iter().enumerate() {
            let adverts: Vec<(Instant, Option<usize>)> = events
                .iter()
                .filter(|e| e.at <= end)
                .filter_map(|e| {
                    let a = e.advert()?;
                    (a.vrid == VRID && a.priority > 0 && a.source.is_ipv4() == (f == 0))
                        .then(|| (e.at, self.lab.node_by_addr(a.source).map(|n| n.index)))
                })
                .collect();
            let verdict = wire_verdict(&adverts, effective, end);
            masters[f] = verdict.master;
            single_master_ms[f] = verdict.single_at.map(|t| ms_since(t, effective));
            match verdict.single_at {
                None => violation(
                    "no_master",
                    format!("{family}: {}", verdict.describe(effective)),
                ),
                Some(t) if t > deadline => violation(
                    "no_single_master",
                    format!(
                        "{family}: single master only {:.0} ms after the heal (bound {:.0} ms): {}",
                        ms_since(t, effective),
                        millis(deadline - effective),
                        verdict.describe(effective)
                    ),
                ),
                Some(_) => {}
            }
            // After a deleted address, a failover is as good as a repair.
            if let Some(m) = verdict.master
                && m != Some(EXPECTED)
                && !fault.starts_with("addr-del")
            {
                violation(
                    "wrong_master",
                    format!(
                        "{family}: {} is master at the end, {} has the highest priority",
                        m.map_or_else(|| "a stranger".into(), name_of),
                        name_of(EXPECTED)
                    ),
                );
            }
        }

        // 2. Addresses, from the deadline on.
        let mut seen: BTreeSet<&'static str> = BTreeSet::new();
        for (at, per_node) in samples.iter().filter(|(at, _)| *at >= deadline) {
            let when = ms_since(*at, effective);
            for (f, vip) in [VIP4, VIP6].into_iter().enumerate() {
                let master = masters[f].flatten().unwrap_or(EXPECTED);
                let vip: IpAddr = vip.parse().expect("valid VIP");
                let holders: Vec<usize> = (0..NODES)
                    .filter(|i| per_node[*i].iter().any(|(a, _)| *a == vip))
                    .collect();
                if !holders.contains(&master) && seen.insert(["vip_missing4", "vip_missing6"][f]) {
                    violation(
                        "vip_missing",
                        format!(
                            "{vip} not on the master {} at +{when:.0} ms (held by {})",
                            name_of(master),
                            names(&holders)
                        ),
                    );
                }
                let backups: Vec<usize> = holders.into_iter().filter(|i| *i != master).collect();
                if !backups.is_empty() && seen.insert(["vip_on_backup4", "vip_on_backup6"][f]) {
                    violation(
                        "vip_on_backup",
                        format!(
                            "{vip} also on {} (master {}) at +{when:.0} ms",
                            names(&backups),
                            name_of(master)
                        ),
                    );
                }
            }
            let ll: IpAddr = VIP6_LL.parse().expect("valid address");
            let master6 = masters[1].flatten().unwrap_or(EXPECTED);
            let ll_elsewhere: Vec<usize> = (0..NODES)
                .filter(|i| *i != master6 && per_node[*i].iter().any(|(a, _)| *a == ll))
                .collect();
            if !ll_elsewhere.is_empty() && seen.insert("vip_on_backup_ll") {
                violation(
                    "vip_on_backup",
                    format!(
                        "{ll} on {} (IPv6 master {}) at +{when:.0} ms",
                        names(&ll_elsewhere),
                        name_of(master6)
                    ),
                );
            }
            for (i, extra) in per_node.iter().enumerate() {
                let strays: Vec<String> = extra
                    .iter()
                    .filter(|(a, _)| ![VIP4, VIP6, VIP6_LL].contains(&a.to_string().as_str()))
                    .map(|(a, dev)| format!("{a}@{dev}"))
                    .collect();
                if !strays.is_empty() && seen.insert("stray") {
                    violation(
                        "stray_address",
                        format!(
                            "{} holds {} at +{when:.0} ms",
                            name_of(i),
                            strays.join(", ")
                        ),
                    );
                }
            }
        }

        // 3. The kernel: nft tables, sysctls; the bench's own fault state.
        for i in 0..NODES {
            let tables = self.nft_tables(i)?;
            if tables.iter().any(|t| t == "inet ferrovip") {
                violation(
                    "nft_table",
                    format!("{} has table inet ferrovip", name_of(i)),
                );
            }
            if tables.iter().any(|t| t == PARTITION_TABLE) {
                violation(
                    "bench_leftover",
                    format!("{} still has the bench's partition table", name_of(i)),
                );
            }
            let sysctls = self.read_sysctls(i)?;
            if sysctls != self.sysctls[i] {
                violation(
                    "sysctl_changed",
                    format!(
                        "{}: {} was {} (of {})",
                        name_of(i),
                        sysctls,
                        self.sysctls[i],
                        SYSCTLS.join(" ")
                    ),
                );
            }
        }

        // 4. Status: converged from some poll on, up to the bound.
        let mut status_at = converged_since(&statuses);
        while status_at.is_none() && Instant::now() < effective + STATUS_BOUND {
            check_interrupted()?;
            std::thread::sleep(Duration::from_millis(200));
            let per_node = (0..NODES)
                .map(|i| self.extra_addresses(i))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let holder = holder_of(&per_node, VIP4);
            let status = self.status();
            let converged = status.as_ref().is_some_and(|s| status_converged(s, holder));
            statuses.push((Instant::now(), converged, status));
            status_at = converged_since(&statuses);
        }
        let status_ms = status_at.map(|t| ms_since(t, effective).max(0.0));
        if status_at.is_none() {
            let last = statuses.last().and_then(|(_, _, s)| s.clone());
            violation(
                "status_not_converged",
                format!(
                    "not converged {:.1} s after the heal; status: {}",
                    STATUS_BOUND.as_secs_f64(),
                    last.map_or_else(|| "unreadable".into(), |s| s.to_string())
                ),
            );
        }

        // 5. Agents alive.
        for i in 0..NODES {
            if let Some(status) = self.exited(i)? {
                violation(
                    "agent_exited",
                    format!(
                        "the agent on {} exited ({status}); log:\n{}",
                        name_of(i),
                        indent(&self.log_tail(i))
                    ),
                );
                // Keep the run going with a fresh agent.
                self.agents[i] = None;
                self.start_agent(i, false)?;
                self.wait_vrrp(i, Instant::now())?;
            }
        }

        Ok(CycleOutcome {
            cycle,
            fault: fault.to_owned(),
            kind: None,
            hold_ms: 0.0,
            heal_delay_ms: millis(effective - heal),
            single_master_ms,
            status_ms,
            restart_hold: None,
            violations,
        })
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("      {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn names(nodes: &[usize]) -> String {
    if nodes.is_empty() {
        return "no node".into();
    }
    nodes
        .iter()
        .map(|i| name_of(*i))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one node holding `vip` in a sample, if exactly one does.
fn holder_of(per_node: &[NodeAddresses], vip: &str) -> Option<usize> {
    let holders: Vec<usize> = (0..per_node.len())
        .filter(|i| per_node[*i].iter().any(|(a, _)| a.to_string() == vip))
        .collect();
    match holders[..] {
        [one] => Some(one),
        _ => None,
    }
}

/// Status says what the kernels say: `master` is the node holding the address, `Active`,
/// one entry per node, the master's `Master` and the others' `Backup`.
fn status_converged(status: &Value, holder: Option<usize>) -> bool {
    let Some(holder) = holder else {
        return false;
    };
    let master = name_of(holder);
    if status["master"].as_str() != Some(&master) || status["state"].as_str() != Some("Active") {
        return false;
    }
    let Some(nodes) = status["nodes"].as_array() else {
        return false;
    };
    let entries: BTreeMap<&str, &str> = nodes
        .iter()
        .filter_map(|n| Some((n["name"].as_str()?, n["state"].as_str()?)))
        .collect();
    entries.len() == NODES
        && (0..NODES).all(|i| {
            let want = if i == holder { "Master" } else { "Backup" };
            entries.get(name_of(i).as_str()) == Some(&want)
        })
}

/// The first poll from which every later poll was converged.
fn converged_since(statuses: &[(Instant, bool, Option<Value>)]) -> Option<Instant> {
    let tail = statuses.iter().rev().take_while(|(_, ok, _)| *ok).count();
    (tail > 0).then(|| statuses[statuses.len() - tail].0)
}

/// What the capture says about one family after a heal.
struct WireVerdict {
    /// The node advertising at the end (`Some(None)`: a stranger); `None`: nobody.
    master: Option<Option<usize>>,
    /// From when the final master advertised alone without gaps; `None` when nobody
    /// advertised at the end.
    single_at: Option<Instant>,
    /// (first advert, last advert, node) runs since the heal, for messages.
    runs: Vec<(Instant, Instant, Option<usize>)>,
}

impl WireVerdict {
    fn describe(&self, from: Instant) -> String {
        if self.runs.is_empty() {
            return "no adverts after the heal".into();
        }
        self.runs
            .iter()
            .map(|(first, last, node)| {
                format!(
                    "{} {:+.0}..{:+.0} ms",
                    node.map_or_else(|| "stranger".into(), name_of),
                    ms_since(*first, from),
                    ms_since(*last, from)
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `adverts`: (time, node) of every advert with priority > 0 of one family, oldest first,
/// from a little before `heal` to `end`. The final master is the last advert's node; it is
/// single since the last disturbance after `heal`: another node's advert, or the end of a
/// gap longer than [`GAP`] in its own. With no disturbance it was single at `heal`.
fn wire_verdict(adverts: &[(Instant, Option<usize>)], heal: Instant, end: Instant) -> WireVerdict {
    let mut runs: Vec<(Instant, Instant, Option<usize>)> = Vec::new();
    for (at, node) in adverts.iter().filter(|(at, _)| *at >= heal) {
        match runs.last_mut() {
            Some((_, last, n)) if n == node => *last = *at,
            _ => runs.push((*at, *at, *node)),
        }
    }
    let Some(&(last_at, master)) = adverts.last() else {
        return WireVerdict {
            master: None,
            single_at: None,
            runs,
        };
    };
    if end.saturating_duration_since(last_at) > GAP {
        return WireVerdict {
            master: None,
            single_at: None,
            runs,
        };
    }
    // Walk back from the end while the master advertises alone without a gap.
    let mut single_at = None;
    let mut next = end;
    for (at, node) in adverts.iter().rev() {
        if *node != master {
            // Another node's advert: single after it (or at the heal if it came before).
            single_at = Some((*at).max(heal));
            break;
        }
        if next.saturating_duration_since(*at) > GAP {
            // A gap ending at `next`: nobody was master until then.
            single_at = Some(next.max(heal));
            break;
        }
        if *at < heal {
            // Advertising alone, without a gap, from before the heal.
            single_at = Some(heal);
            break;
        }
        next = *at;
    }
    let single_at = single_at.or_else(|| {
        // Every advert since the capture started is the master's: single from its first,
        // or from the heal if that came before.
        adverts.first().map(|(at, _)| (*at).max(heal))
    });
    WireVerdict {
        master: Some(master),
        single_at,
        runs,
    }
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Debug, Default, Serialize)]
struct FaultStats {
    cycles: usize,
    violations: usize,
    single_master: Option<Stats>,
    status: Option<Stats>,
}

#[derive(Debug, Serialize)]
struct Report {
    seed: u64,
    cycles_asked: usize,
    cycles_run: usize,
    ipvs_available: bool,
    interval_ms: f64,
    master_down_interval_ms: f64,
    tolerance_ms: f64,
    status_bound_ms: f64,
    violations: Vec<Violation>,
    violations_by_kind: BTreeMap<&'static str, usize>,
    leftovers: usize,
    single_master: Option<Stats>,
    /// (cycle, fault) of the worst time to a single master.
    single_master_worst: Option<(usize, String, f64)>,
    status: Option<Stats>,
    per_fault: BTreeMap<&'static str, FaultStats>,
    restarts: usize,
    restarts_with_hold: usize,
    runtime_s: f64,
    seconds_per_cycle: f64,
    harness_error: Option<String>,
    logs: Option<String>,
    cycles: Vec<CycleOutcome>,
}

impl Report {
    fn new(seed: u64, cycles: usize, ipvs: bool) -> Report {
        Report {
            seed,
            cycles_asked: cycles,
            cycles_run: 0,
            ipvs_available: ipvs,
            interval_ms: millis(INTERVAL),
            master_down_interval_ms: millis(mdi()),
            tolerance_ms: millis(TOLERANCE),
            status_bound_ms: millis(STATUS_BOUND),
            violations: Vec::new(),
            violations_by_kind: BTreeMap::new(),
            leftovers: 0,
            single_master: None,
            single_master_worst: None,
            status: None,
            per_fault: BTreeMap::new(),
            restarts: 0,
            restarts_with_hold: 0,
            runtime_s: 0.0,
            seconds_per_cycle: 0.0,
            harness_error: None,
            logs: None,
            cycles: Vec::new(),
        }
    }

    fn record(&mut self, outcome: CycleOutcome) {
        if outcome.kind.is_some() {
            self.cycles_run += 1;
        }
        for v in &outcome.violations {
            *self.violations_by_kind.entry(v.kind).or_default() += 1;
            if v.is_leftover() {
                self.leftovers += 1;
            }
            self.violations.push(v.clone());
        }
        self.cycles.push(outcome);
        self.summarize();
    }

    fn summarize(&mut self) {
        let single = |c: &CycleOutcome| {
            c.single_master_ms
                .iter()
                .flatten()
                .copied()
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let faulted = || self.cycles.iter().filter(|c| c.kind.is_some());
        self.single_master = Stats::of(faulted().filter_map(single));
        self.single_master_worst = faulted()
            .filter_map(|c| single(c).map(|v| (c.cycle, c.fault.clone(), v)))
            .max_by(|a, b| a.2.total_cmp(&b.2));
        self.status = Stats::of(faulted().filter_map(|c| c.status_ms));
        let mut per_fault: BTreeMap<&'static str, FaultStats> = BTreeMap::new();
        for kind in FaultKind::ALL.into_iter().chain(FaultKind::OPTIONAL) {
            let cycles: Vec<&CycleOutcome> = faulted().filter(|c| c.kind == Some(kind)).collect();
            if cycles.is_empty() {
                continue;
            }
            per_fault.insert(
                kind.label(),
                FaultStats {
                    cycles: cycles.len(),
                    violations: cycles.iter().map(|c| c.violations.len()).sum(),
                    single_master: Stats::of(cycles.iter().filter_map(|c| single(c))),
                    status: Stats::of(cycles.iter().filter_map(|c| c.status_ms)),
                },
            );
        }
        self.per_fault = per_fault;
    }

    fn table(&mut self) -> String {
        self.seconds_per_cycle = if self.cycles_run > 0 {
            round3(self.runtime_s / self.cycles_run as f64)
        } else {
            0.0
        };
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos: {} of {} cycles, seed {}, {:.0} s ({:.1} s per cycle)",
            self.cycles_run, self.cycles_asked, self.seed, self.runtime_s, self.seconds_per_cycle
        );
        let _ = writeln!(out, "{}", ipvs_note(self.ipvs_available));
        let _ = writeln!(
            out,
            "bound for a single master: Master_Down_Interval {:.0} ms + tolerance {:.0} ms after the effective heal; status within {:.0} s",
            self.master_down_interval_ms,
            self.tolerance_ms,
            self.status_bound_ms / 1000.0
        );
        let _ = writeln!(
            out,
            "\n{:<22}{:>8}{:>12}{:>30}{:>30}",
            "per fault", "cycles", "violations", "single master ms", "status converged ms"
        );
        for (fault, stats) in &self.per_fault {
            let _ = writeln!(
                out,
                "{fault:<22}{:>8}{:>12}{:>30}{:>30}",
                stats.cycles,
                stats.violations,
                stats_cell(stats.single_master.as_ref()),
                stats_cell(stats.status.as_ref())
            );
        }
        let _ = writeln!(
            out,
            "\ntime to a single master after heal (worst family per cycle): median {} ms, worst {}",
            self.single_master
                .as_ref()
                .map_or_else(|| "—".into(), |s| format!("{:.1}", s.median_ms)),
            self.single_master_worst.as_ref().map_or_else(
                || "—".into(),
                |(c, f, v)| format!("{v:.1} ms (cycle {c}, {f})")
            )
        );
        let _ = writeln!(
            out,
            "status converged after heal: {}",
            stats_cell(self.status.as_ref())
        );
        let _ = writeln!(
            out,
            "agent restarts (SIGTERM + start): {}, {} of them with --restart-hold {RESTART_HOLD}",
            self.restarts, self.restarts_with_hold
        );
        let during = self.violations.iter().filter(|v| v.during_fault()).count();
        let _ = writeln!(
            out,
            "\nviolations: {} (target 0): {} after a heal, {during} during a fault; leftovers after a heal: {} (target 0)",
            self.violations.len(),
            self.violations.len() - during,
            self.leftovers
        );
        for (kind, n) in &self.violations_by_kind {
            let _ = writeln!(out, "  {kind}: {n}");
        }
        for v in &self.violations {
            let first = v.detail.lines().next().unwrap_or("");
            let _ = writeln!(out, "  cycle {} [{}] {}: {first}", v.cycle, v.fault, v.kind);
        }
        if let Some(logs) = &self.logs {
            let _ = writeln!(out, "agent and API server logs copied to {logs}");
        }
        out
    }
}

/// Table test of [`wire_verdict`], run by `cargo test --benches` (a harness-less bench runs its
/// `main` there, without `--bench`): the verdicts the invariants rest on.
fn wire_verdict_self_check() {
    let heal = Instant::now() + Duration::from_secs(10);
    let at = |ms: i64| {
        if ms >= 0 {
            heal + Duration::from_millis(ms as u64)
        } else {
            heal - Duration::from_millis(ms.unsigned_abs())
        }
    };
    // Adverts of `node` every 100 ms over [from, to].
    let run = |node: usize, from: i64, to: i64| -> Vec<(Instant, Option<usize>)> {
        (0..)
            .map(|k| from + 100 * k)
            .take_while(|t| *t <= to)
            .map(|t| (at(t), Some(node)))
            .collect()
    };
    let merged = |parts: Vec<Vec<(Instant, Option<usize>)>>| {
        let mut all: Vec<_> = parts.into_iter().flatten().collect();
        all.sort_by_key(|(t, _)| *t);
        all
    };
    let end = at(1500);
    let ms = |v: &WireVerdict| v.single_at.map(|t| ms_since(t, heal).round() as i64);

    // The master advertised alone through the heal: single at the heal.
    let v = wire_verdict(&run(0, -300, 1500), heal, end);
    assert_eq!((v.master, ms(&v)), (Some(Some(0)), Some(0)));
    // Preemption: node-b until +300, node-a from +341: single after node-b's last advert.
    let v = wire_verdict(
        &merged(vec![run(1, -300, 300), run(0, 341, 1441)]),
        heal,
        end,
    );
    assert_eq!((v.master, ms(&v)), (Some(Some(0)), Some(300)));
    // Nobody from -50 to +400: single from the advert that ended the gap.
    let v = wire_verdict(
        &merged(vec![run(0, -250, -50), run(0, 400, 1500)]),
        heal,
        end,
    );
    assert_eq!((v.master, ms(&v)), (Some(Some(0)), Some(400)));
    // Silence at the end: no master.
    let v = wire_verdict(&run(0, -300, 100), heal, end);
    assert_eq!((v.master, ms(&v)), (None, None));
    // Two masters to the end (node-b's last at +1350): single only after it.
    let v = wire_verdict(
        &merged(vec![run(0, -300, 1450), run(1, -250, 1400)]),
        heal,
        end,
    );
    assert_eq!((v.master, ms(&v)), (Some(Some(0)), Some(1350)));
    // The other side's last advert before the heal does not count.
    let v = wire_verdict(
        &merged(vec![run(1, -300, -20), run(0, -290, 1500)]),
        heal,
        end,
    );
    assert_eq!((v.master, ms(&v)), (Some(Some(0)), Some(0)));
    // Nothing before the heal, a master from +150: single from its first advert.
    let v = wire_verdict(&run(2, 150, 1450), heal, end);
    assert_eq!((v.master, ms(&v)), (Some(Some(2)), Some(150)));
}
