//! `ferrovip lab`: start a few agents in namespaces, kill the master, watch the failover.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ipnet::Ipv4Net;
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::signal::unix::SignalKind;

use super::LabError;
use super::measure::{
    Failover, FailoverQuery, Preemption, analyze_preemption, current_master, master_down_interval,
    masters_since, measure_failover_async, skew_time,
};
use super::netns::{Lab, LabSpec, ProcId, log_tail, require_ip};
use super::sniffer::Sniffer;

const VRID: u8 = 51;
const VIP_HOST: u32 = 100;
const BASE_PRIORITY: u8 = 100;
const MASTER_TIMEOUT: Duration = Duration::from_secs(10);
const LOG_TAIL_LINES: usize = 15;
/// How long a new master may take to add the VIP after its first advert.
const VIP_PATIENCE: Duration = Duration::from_secs(1);

/// What `ferrovip lab` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabOptions {
    /// Number of nodes (2..=26).
    pub nodes: usize,
    /// VRRP advertisement interval: a multiple of 10 ms, 10 ms to 40.95 s.
    pub interval: Duration,
    /// The `ferrovip` executable run as `BINARY agent --node-name N --manifests PATH`.
    pub binary: PathBuf,
    /// Leave the lab running after the rounds (or after an error) until Ctrl-C.
    pub keep: bool,
    /// Crash rounds (SIGKILL of the master); a graceful round (SIGTERM) always follows.
    pub rounds: usize,
    /// Print nothing (the benchmark reads the report instead).
    pub quiet: bool,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            nodes: 3,
            interval: Duration::from_millis(100),
            binary: PathBuf::from("ferrovip"),
            keep: false,
            rounds: 3,
            quiet: false,
        }
    }
}

/// The figures of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LabReport {
    pub prefix: String,
    pub vip: Ipv4Addr,
    pub vrid: u8,
    pub interval: Duration,
    pub nodes: Vec<NodeSummary>,
    pub initial_master: String,
    /// From starting the agents to the first advert of the master that then stayed.
    pub time_to_first_master: Duration,
    pub vip_answers_ping: bool,
    pub failovers: Vec<FailoverRound>,
    pub graceful: Option<GracefulRound>,
    /// Deviations that did not stop the run (no GARP, VIP on the wrong node, no preemption…).
    pub warnings: Vec<String>,
}

impl LabReport {
    pub fn is_clean(&self) -> bool {
        self.warnings.is_empty() && self.vip_answers_ping
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeSummary {
    pub name: String,
    pub ipv4: Ipv4Addr,
    /// Priority the manifest gives this node.
    pub priority: u8,
}

/// One crash: SIGKILL of the master, takeover, restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailoverRound {
    pub round: usize,
    pub killed: String,
    pub new_master: String,
    pub failover: Failover,
    /// Master_Down_Interval for the new master's priority: what `last_advert_to_takeover`
    /// should be.
    pub expected: Duration,
    pub rejoin: Rejoin,
}

/// SIGTERM of the master: priority-0 release, takeover after Skew_Time, restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GracefulRound {
    pub stopped: String,
    pub new_master: String,
    pub failover: Failover,
    /// Skew_Time for the new master's priority.
    pub expected: Duration,
    pub rejoin: Rejoin,
}

/// The stopped node's agent started again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rejoin {
    pub node: String,
    /// Its priority beats the current master's, so it should preempt.
    pub should_preempt: bool,
    pub preemption: Option<Preemption>,
}

/// Runs the lab demonstration: builds `opts.nodes` namespaces, starts one agent in each,
/// kills the master `opts.rounds` times and once gracefully, and reports the timings.
/// Async because it races the whole run against SIGINT/SIGTERM: on either, the lab is torn
/// down (agents stopped, namespaces deleted) and `Err(LabError::Interrupted)` returned.
/// Needs a Tokio runtime with I/O and time enabled. Blocking `ip` calls are short.
pub async fn run_lab(opts: LabOptions) -> Result<LabReport, LabError> {
    validate(&opts)?;
    // Before cleaning up stale labs, which already runs `ip`.
    require_ip()?;
    // Installed before anything exists, so a Ctrl-C during setup is not lost.
    let mut signals = Signals::install()?;
    let out = Out { quiet: opts.quiet };
    let lab = clean_and_create(
        LabSpec {
            nodes: opts.nodes,
            ..LabSpec::default()
        },
        &out,
    )?;
    let sniffer = Sniffer::start(&lab)?;
    let result = tokio::select! {
        result = drive(&lab, &sniffer, &opts, &out) => result,
        name = signals.recv() => {
            out.line(format!("\n{name}: stopping the lab"));
            Err(LabError::Interrupted)
        }
    };
    // Quiet callers (tests, the benchmark) get the log tails inside the error instead.
    let failed = !matches!(result, Ok(_) | Err(LabError::Interrupted));
    if let (Err(e), true) = (&result, failed && !opts.quiet) {
        lab.keep_dir(true);
        out.line(format!("lab failed: {e}"));
        out.line(format!("logs kept in {}", lab.dir().display()));
    }
    if opts.keep && !matches!(result, Err(LabError::Interrupted)) {
        lab.keep_dir(true);
        out.line(format!(
            "lab kept: e.g. `ip netns exec {} ip addr`; logs in {}; Ctrl-C removes it",
            lab.node(1).netns,
            lab.dir().display()
        ));
        signals.recv().await;
    }
    drop(sniffer);
    drop(lab);
    out.line("lab removed");
    result
}

fn validate(opts: &LabOptions) -> Result<(), LabError> {
    validate_nodes_and_interval(opts.nodes, opts.interval)?;
    if !opts.binary.exists() {
        return Err(LabError::InvalidSpec(format!(
            "agent binary {} does not exist",
            opts.binary.display()
        )));
    }
    Ok(())
}

/// What every lab checks: 2 to 26 nodes, and an advertisement interval VRRPv3 can carry.
pub(super) fn validate_nodes_and_interval(
    nodes: usize,
    interval: Duration,
) -> Result<(), LabError> {
    if !(2..=26).contains(&nodes) {
        return Err(LabError::InvalidSpec(format!(
            "a lab needs 2 to 26 nodes, got {nodes}"
        )));
    }
    let ms = interval.as_millis();
    if !interval.subsec_nanos().is_multiple_of(10_000_000) || !(10..=40_950).contains(&ms) {
        return Err(LabError::InvalidSpec(format!(
            "the advertisement interval must be a multiple of 10 ms between 10 ms and 40.95 s, got {interval:?}"
        )));
    }
    Ok(())
}

/// Removes what earlier labs left behind (saying so), then builds `spec`.
pub(super) fn clean_and_create(spec: LabSpec, out: &Out) -> Result<Lab, LabError> {
    let stale = Lab::cleanup_stale()?;
    if !stale.is_empty() {
        out.line(format!(
            "removed {} namespaces left behind by earlier labs",
            stale.len()
        ));
    }
    Lab::create(spec)
}

/// Preference weights: node-a is the first master and every node has a distinct priority,
/// so the winner of each election is known in advance.
fn configured_priority(index: usize) -> u8 {
    BASE_PRIORITY + weight(index)
}

fn weight(index: usize) -> u8 {
    50u8.saturating_sub(10 * index.min(5) as u8)
}

/// The VirtualIP manifest every agent reads.
pub fn manifest(nodes: &[String], vip: Ipv4Net, interval: Duration) -> String {
    let mut preferred = String::new();
    for (i, name) in nodes.iter().enumerate().filter(|(i, _)| weight(*i) > 0) {
        let _ = writeln!(
            preferred,
            "      - {{nodeName: {name}, weight: {}}}",
            weight(i)
        );
    }
    format!(
        "apiVersion: ferrovip.io/v1alpha1
kind: VirtualIP
metadata:
  name: lab
spec:
  addresses: [\"{vip}\"]
  interface: eth0
  virtualRouterId: {VRID}
  vrrp:
    version: 3
    advertisementInterval: {}ms
    preempt: true
  priority:
    base: {BASE_PRIORITY}
    preferredNodes:
{preferred}",
        interval.as_millis()
    )
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, LabError> {
        let handler = |kind, signal: &'static str| {
            tokio::signal::unix::signal(kind)
                .map_err(|source| LabError::SignalHandler { signal, source })
        };
        Ok(Signals {
            interrupt: handler(SignalKind::interrupt(), "SIGINT")?,
            terminate: handler(SignalKind::terminate(), "SIGTERM")?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.interrupt.recv() => "SIGINT",
            _ = self.terminate.recv() => "SIGTERM",
        }
    }
}

/// Prints a line unless quiet (tests and benchmarks read the report instead).
pub(super) struct Out {
    pub(super) quiet: bool,
}

impl Out {
    pub(super) fn line(&self, text: impl std::fmt::Display) {
        if !self.quiet {
            println!("{text}");
        }
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn signed_ms(actual: Duration, expected: Duration) -> String {
    let diff = actual.as_secs_f64() - expected.as_secs_f64();
    format!("{:+.1} ms", diff * 1000.0)
}

struct Driver<'a> {
    lab: &'a Lab,
    sniffer: &'a Sniffer,
    opts: &'a LabOptions,
    out: &'a Out,
    manifest: PathBuf,
    vip: Ipv4Addr,
    agents: Vec<ProcId>,
    starts: Vec<usize>,
    warnings: Vec<String>,
}

async fn drive(
    lab: &Lab,
    sniffer: &Sniffer,
    opts: &LabOptions,
    out: &Out,
) -> Result<LabReport, LabError> {
    let first = lab.node(0);
    let subnet = Ipv4Net::new(first.ipv4, first.ipv4_prefix_len)
        .map_err(|e| LabError::InvalidSpec(e.to_string()))?
        .trunc();
    let vip = Ipv4Addr::from(u32::from(subnet.network()) + VIP_HOST);
    let vip_net =
        Ipv4Net::new(vip, subnet.prefix_len()).map_err(|e| LabError::InvalidSpec(e.to_string()))?;
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    let manifest_path = lab.dir().join("virtualip.yaml");
    std::fs::write(&manifest_path, manifest(&names, vip_net, opts.interval)).map_err(|source| {
        LabError::Io {
            context: "writing the lab manifest",
            path: manifest_path.clone(),
            source,
        }
    })?;
    out.line(format!(
        "ferrovip lab: {} nodes on {subnet}, VIP {vip}, VRID {VRID}, VRRPv3 adverts every {} ms",
        opts.nodes,
        opts.interval.as_millis()
    ));
    out.line(format!(
        "namespaces {}node-a…, logs in {}",
        lab.prefix(),
        lab.dir().display()
    ));
    let mut driver = Driver {
        lab,
        sniffer,
        opts,
        out,
        manifest: manifest_path,
        vip,
        agents: Vec::new(),
        starts: vec![0; opts.nodes],
        warnings: Vec::new(),
    };
    driver.run().await
}

impl Driver<'_> {
    async fn run(&mut self) -> Result<LabReport, LabError> {
        let started = Instant::now();
        for node in 0..self.opts.nodes {
            let id = self.spawn_agent(node)?;
            self.agents.push(id);
        }
        let master = self.wait_single_master(started).await?;
        let initial_master = master;
        let master_addr = IpAddr::V4(self.lab.node(master).ipv4);
        let time_to_first_master = self
            .sniffer
            .events_since(started)
            .iter()
            .find(|e| {
                e.advert()
                    .is_some_and(|a| a.vrid == VRID && a.priority > 0 && a.source == master_addr)
            })
            .map_or_else(|| started.elapsed(), |e| e.at.duration_since(started));
        self.out.line(format!(
            "{} is master after {:.2} s\n",
            self.lab.node(master).name,
            time_to_first_master.as_secs_f64()
        ));
        self.print_table(master)?;
        let vip_answers_ping = self.ping_vip(master)?;

        let mut failovers = Vec::new();
        let mut master = master;
        for round in 1..=self.opts.rounds {
            let (record, next) = self.crash_round(round, master).await?;
            failovers.push(record);
            master = next;
        }
        let graceful = Some(self.graceful_round(master).await?);
        self.summarize(&failovers);
        Ok(LabReport {
            prefix: self.lab.prefix().to_owned(),
            vip: self.vip,
            vrid: VRID,
            interval: self.opts.interval,
            nodes: self
                .lab
                .nodes()
                .iter()
                .map(|n| NodeSummary {
                    name: n.name.clone(),
                    ipv4: n.ipv4,
                    priority: configured_priority(n.index),
                })
                .collect(),
            initial_master: self.lab.node(initial_master).name.clone(),
            time_to_first_master,
            vip_answers_ping,
            failovers,
            graceful,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn spawn_agent(&mut self, node: usize) -> Result<ProcId, LabError> {
        self.starts[node] += 1;
        let name = self.lab.node(node).name.clone();
        let log = match self.starts[node] {
            1 => format!("{name}.log"),
            n => format!("{name}.{n}.log"),
        };
        let binary = self.opts.binary.to_string_lossy().into_owned();
        let manifest = self.manifest.to_string_lossy().into_owned();
        self.lab.spawn(
            node,
            &[
                &binary,
                "agent",
                "--node-name",
                &name,
                "--manifests",
                &manifest,
            ],
            log,
        )
    }

    fn warn(&mut self, warning: String) {
        self.out.line(format!("  warning: {warning}"));
        self.warnings.push(warning);
    }

    fn agent_log(&self, node: usize) -> Result<PathBuf, LabError> {
        Ok(self.lab.proc_info(self.agents[node])?.1)
    }

    fn check_agents_alive(&self) -> Result<(), LabError> {
        for (node, id) in self.agents.iter().enumerate() {
            if let Some(status) = self.lab.exit_status(*id)? {
                return Err(LabError::AgentExited {
                    node: self.lab.node(node).name.clone(),
                    status,
                    log_tail: log_tail(&self.agent_log(node)?, LOG_TAIL_LINES),
                });
            }
        }
        if let Some(failure) = self.sniffer.failure() {
            return Err(LabError::SnifferDied(failure));
        }
        Ok(())
    }

    fn all_log_tails(&self) -> String {
        let mut logs = String::new();
        for node in self.lab.nodes() {
            let path = self
                .agent_log(node.index)
                .unwrap_or_else(|_| Path::new("").to_path_buf());
            let _ = writeln!(
                logs,
                "--- {} ({}) ---\n{}",
                node.name,
                path.display(),
                log_tail(&path, LOG_TAIL_LINES)
            );
        }
        logs
    }

    /// Waits until exactly one node advertised with priority > 0 over a whole window after
    /// `since`, and that node is the one with the highest priority. The window spans the
    /// longest Master_Down_Interval plus an interval, so a backup that is about to preempt has
    /// done so before the window can pass. If the single master is another node when the time
    /// is up, that is reported as a warning (preemption did not happen) and the run goes on.
    async fn wait_single_master(&mut self, since: Instant) -> Result<usize, LabError> {
        let interval = self.opts.interval;
        let window = master_down_interval(1, interval) + interval;
        let timeout = MASTER_TIMEOUT.max(window * 3);
        let deadline = Instant::now() + timeout;
        // Every agent runs whenever this is called, so the preferred node should win.
        let expected = 0;
        loop {
            self.check_agents_alive()?;
            let now = Instant::now();
            let window_start = now.checked_sub(window).unwrap_or(since);
            let masters =
                masters_since(&self.sniffer.events_since(window_start), VRID, window_start);
            let single = match masters[..] {
                [only] if window_start >= since => Some(
                    self.lab
                        .node_by_addr(only)
                        .ok_or(LabError::StrangerOnTheWire(only))?
                        .index,
                ),
                _ => None,
            };
            if single == Some(expected) {
                return Ok(expected);
            }
            if now >= deadline {
                if let Some(node) = single {
                    self.warn(format!(
                        "{} stayed master although {} has a higher priority",
                        self.lab.node(node).name,
                        self.lab.node(expected).name
                    ));
                    return Ok(node);
                }
                let masters = masters
                    .iter()
                    .map(IpAddr::to_string)
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(LabError::NoSingleMaster {
                    waited: timeout,
                    masters: if masters.is_empty() {
                        "none".into()
                    } else {
                        masters
                    },
                    logs: self.all_log_tails(),
                });
            }
            tokio::time::sleep(interval / 2).await;
        }
    }

    fn print_table(&mut self, master: usize) -> Result<(), LabError> {
        let wire_master = current_master(self.sniffer, VRID, self.opts.interval * 3);
        self.out.line("  node     address       wire     VIP");
        let mut holders = Vec::new();
        for node in self.lab.nodes() {
            let wire = if Some(IpAddr::V4(node.ipv4)) == wire_master {
                "master"
            } else if self.lab.exit_status(self.agents[node.index])?.is_none() {
                "backup"
            } else {
                "down"
            };
            let patience = if node.index == master {
                VIP_PATIENCE
            } else {
                Duration::ZERO
            };
            let holds = self.holds_vip(node.index, patience)?;
            if holds {
                holders.push(node.index);
            }
            self.out.line(format!(
                "  {:<8} {:<13} {:<8} {}",
                node.name,
                node.ipv4.to_string(),
                wire,
                if holds { "held" } else { "-" }
            ));
        }
        self.out.line("");
        if holders != [master] {
            let names: Vec<&str> = holders
                .iter()
                .map(|i| self.lab.node(*i).name.as_str())
                .collect();
            self.warn(format!(
                "the VIP should be on {} only, `ip addr` shows it on [{}]",
                self.lab.node(master).name,
                names.join(", ")
            ));
        }
        Ok(())
    }

    /// Whether node `node` holds the VIP per `ip addr`. For a fresh master, polls up to
    /// `patience`: the address may land just after its first advert.
    fn holds_vip(&self, node: usize, patience: Duration) -> Result<bool, LabError> {
        let deadline = Instant::now() + patience;
        loop {
            if self.lab.has_address(node, IpAddr::V4(self.vip))? {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn ping_vip(&mut self, master: usize) -> Result<bool, LabError> {
        let from = (master + 1) % self.opts.nodes;
        let vip = self.vip.to_string();
        for _ in 0..3 {
            if self
                .lab
                .ping(from, IpAddr::V4(self.vip), Duration::from_secs(1))?
            {
                self.out.line(format!(
                    "VIP {vip} answers ping from {}\n",
                    self.lab.node(from).name
                ));
                return Ok(true);
            }
        }
        self.warn(format!(
            "VIP {vip} does not answer ping from {}",
            self.lab.node(from).name
        ));
        Ok(false)
    }

    fn takeover_timeout(&self) -> Duration {
        master_down_interval(1, self.opts.interval) * 3 + Duration::from_secs(2)
    }

    async fn stop_master(
        &mut self,
        master: usize,
        signal: Signal,
    ) -> Result<(Failover, usize), LabError> {
        let old = self.lab.node(master).clone();
        let query = FailoverQuery {
            vrid: VRID,
            old_master: IpAddr::V4(old.ipv4),
            stopped_at: Instant::now(),
            vip: Some(IpAddr::V4(self.vip)),
        };
        self.lab.kill(self.agents[master], signal)?;
        let failover = measure_failover_async(self.sniffer, &query, self.takeover_timeout()).await;
        let failover = match failover {
            Ok(failover) => failover,
            Err(LabError::NoTakeover { .. }) => {
                return Err(LabError::NoSingleMaster {
                    waited: self.takeover_timeout(),
                    masters: "none after the master stopped".into(),
                    logs: self.all_log_tails(),
                });
            }
            Err(e) => return Err(e),
        };
        let new = self
            .lab
            .node_by_addr(failover.new_master)
            .ok_or(LabError::StrangerOnTheWire(failover.new_master))?
            .index;
        if self
            .lab
            .wait(self.agents[master], Duration::from_secs(3))?
            .is_none()
        {
            self.warn(format!(
                "the agent on {} did not exit after {signal}",
                old.name
            ));
            self.lab.kill(self.agents[master], Signal::SIGKILL)?;
            self.lab.wait(self.agents[master], Duration::from_secs(1))?;
        }
        if !self.holds_vip(new, VIP_PATIENCE)? {
            self.warn(format!(
                "{} took over but `ip addr` does not show the VIP on it",
                self.lab.node(new).name
            ));
        }
        Ok((failover, new))
    }

    fn announce_line(&mut self, failover: &Failover, new_name: &str) -> String {
        match failover.death_to_garp {
            Some(garp) => format!("gratuitous ARP after {}", ms(garp)),
            None => {
                self.warn(format!("no gratuitous ARP for the VIP from {new_name}"));
                "no gratuitous ARP".into()
            }
        }
    }

    async fn crash_round(
        &mut self,
        round: usize,
        master: usize,
    ) -> Result<(FailoverRound, usize), LabError> {
        let old_name = self.lab.node(master).name.clone();
        self.out.line(format!(
            "round {round}: SIGKILL the agent on {old_name} (master)"
        ));
        let (failover, new) = self.stop_master(master, Signal::SIGKILL).await?;
        let new_name = self.lab.node(new).name.clone();
        let expected = master_down_interval(failover.new_master_priority, failover.advert_interval);
        let announce = self.announce_line(&failover, &new_name);
        self.out.line(format!(
            "  {new_name} (priority {}) took over: first advert {} after the kill, {announce}",
            failover.new_master_priority,
            ms(failover.death_to_advert),
        ));
        if let Some(gap) = failover.last_advert_to_takeover {
            self.out.line(format!(
                "  {old_name}'s last advert → {new_name}'s first: {} (Master_Down_Interval {}, {})",
                ms(gap),
                ms(expected),
                signed_ms(gap, expected)
            ));
        }
        let rejoin = self.rejoin(master, failover.new_master_priority).await?;
        let next = self.wait_single_master(Instant::now()).await?;
        self.out.line("");
        Ok((
            FailoverRound {
                round,
                killed: old_name,
                new_master: new_name,
                failover,
                expected,
                rejoin,
            },
            next,
        ))
    }

    async fn graceful_round(&mut self, master: usize) -> Result<GracefulRound, LabError> {
        let old_name = self.lab.node(master).name.clone();
        self.out.line(format!(
            "graceful: SIGTERM the agent on {old_name} (master)"
        ));
        let (failover, new) = self.stop_master(master, Signal::SIGTERM).await?;
        let new_name = self.lab.node(new).name.clone();
        let expected = skew_time(failover.new_master_priority, failover.advert_interval);
        let announce = self.announce_line(&failover, &new_name);
        match failover.death_to_release {
            Some(release) => {
                let gap = failover.last_advert_to_takeover.unwrap_or_default();
                self.out.line(format!(
                    "  {old_name} sent priority 0 after {}; {new_name} (priority {}) took over {} later (Skew_Time {}, {})",
                    ms(release),
                    failover.new_master_priority,
                    ms(gap),
                    ms(expected),
                    signed_ms(gap, expected)
                ));
            }
            None => {
                self.warn(format!(
                    "{old_name} left without a priority-0 advert; {new_name} took over {} after SIGTERM",
                    ms(failover.death_to_advert)
                ));
            }
        }
        self.out.line(format!("  {announce}"));
        let rejoin = self.rejoin(master, failover.new_master_priority).await?;
        self.wait_single_master(Instant::now()).await?;
        self.out.line("");
        Ok(GracefulRound {
            stopped: old_name,
            new_master: new_name,
            failover,
            expected,
            rejoin,
        })
    }

    /// Restarts the agent on `node` and, if its priority beats the current master's, times
    /// its preemption.
    async fn rejoin(&mut self, node: usize, master_priority: u8) -> Result<Rejoin, LabError> {
        let name = self.lab.node(node).name.clone();
        let address = IpAddr::V4(self.lab.node(node).ipv4);
        let priority = configured_priority(node);
        let should_preempt = priority > master_priority;
        let restarted_at = Instant::now();
        self.agents[node] = self.spawn_agent(node)?;
        if !should_preempt {
            self.out.line(format!(
                "  {name} restarted; its priority {priority} does not preempt"
            ));
            return Ok(Rejoin {
                node: name,
                should_preempt,
                preemption: None,
            });
        }
        let mdi = master_down_interval(priority, self.opts.interval);
        let limit = mdi + Duration::from_secs(5);
        let seen = self
            .sniffer
            .wait_for_async(
                |e| {
                    e.at >= restarted_at
                        && e.advert().is_some_and(|a| {
                            a.vrid == VRID && a.priority > 0 && a.source == address
                        })
                },
                limit,
            )
            .await;
        let preemption = seen
            .and_then(|_| analyze_preemption(&self.sniffer.events(), VRID, address, restarted_at));
        match &preemption {
            Some(p) => self.out.line(format!(
                "  {name} restarted and preempted after {} (start-up + Master_Down_Interval {})",
                ms(p.restart_to_master),
                ms(mdi)
            )),
            None => {
                self.check_agents_alive()?;
                self.warn(format!(
                    "{name} (priority {priority}) restarted but did not preempt within {:.1} s",
                    limit.as_secs_f64()
                ));
            }
        }
        Ok(Rejoin {
            node: name,
            should_preempt,
            preemption,
        })
    }

    fn summarize(&self, failovers: &[FailoverRound]) {
        if failovers.is_empty() {
            return;
        }
        let n = failovers.len() as u32;
        let mean =
            |f: &dyn Fn(&FailoverRound) -> Duration| failovers.iter().map(f).sum::<Duration>() / n;
        let to_advert = mean(&|r| r.failover.death_to_advert);
        let gap = mean(&|r| r.failover.last_advert_to_takeover.unwrap_or_default());
        let expected = mean(&|r| r.expected);
        self.out.line(format!(
            "{n} crash failover{}: mean kill → new master {}, mean advert gap {} (Master_Down_Interval {})",
            if n == 1 { "" } else { "s" },
            ms(to_advert),
            ms(gap),
            ms(expected)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_is_accepted_by_the_agent_parser_and_prefers_node_a() {
        let names: Vec<String> = ["node-a", "node-b", "node-c"].map(String::from).to_vec();
        let text = manifest(
            &names,
            "192.0.2.100/24".parse().unwrap(),
            Duration::from_millis(100),
        );
        let mut parsed = crate::crd::manifest::Manifests::default();
        crate::crd::manifest::parse_into(Path::new("lab.yaml"), &text, &mut parsed);
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(parsed.virtual_ips.len(), 1);
        let spec = parsed.virtual_ips[0].spec.validate().unwrap();
        assert_eq!(spec.addresses, vec!["192.0.2.100/24".parse().unwrap()]);
        assert_eq!(spec.interface, "eth0");
        assert_eq!(spec.vrid, Some(VRID));
        assert_eq!(spec.advert_interval, Duration::from_millis(100));
        assert!(spec.preempt);
        assert_eq!(
            spec.preferred_nodes,
            vec![
                ("node-a".to_owned(), 50),
                ("node-b".to_owned(), 40),
                ("node-c".to_owned(), 30)
            ]
        );
        assert_eq!(
            (0..3).map(configured_priority).collect::<Vec<_>>(),
            vec![150, 140, 130]
        );
        assert_eq!(configured_priority(7), 100);
    }

    #[test]
    fn options_are_validated() {
        let ok = LabOptions {
            binary: PathBuf::from("/bin/sh"),
            ..LabOptions::default()
        };
        assert!(validate(&ok).is_ok());
        for bad in [
            LabOptions {
                nodes: 1,
                ..ok.clone()
            },
            LabOptions {
                interval: Duration::from_millis(105),
                ..ok.clone()
            },
            LabOptions {
                interval: Duration::from_secs(41),
                ..ok.clone()
            },
            LabOptions {
                binary: PathBuf::from("/nonexistent/ferrovip"),
                ..ok.clone()
            },
        ] {
            assert!(
                matches!(validate(&bad), Err(LabError::InvalidSpec(_))),
                "{bad:?}"
            );
        }
    }
}
