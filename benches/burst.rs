//! Idle cost of one huge VRRP group: CPU and RSS of each agent in a 3-node namespace lab
//! holding N addresses (default 10,000 IPv4) in one shared instance at 10 ms adverts.
//!
//! Run as root: `cargo bench --bench burst [-- --vips 10000 --interval 10ms --window 10s
//! --rounds 3 --ipv6]`. The addresses are split into VirtualIPs of at most 1,024 addresses
//! with identical settings and no explicit VRID, so they share one instance (one election).
//! node-a is preferred (the master) and starts first; node-b and node-c (backups) start once
//! it holds the group. Once node-a holds every
//! address and the wire shows its adverts, each round reads user + system CPU time and RSS of
//! every agent from /proc over a window; the figures are medians over the rounds.
//!
//! The master's figure includes the renewal of its addresses' lifetimes (default 1 s), which
//! is the node layer's cost (see "Bulk address install"), not the advert path's.

#[allow(dead_code)]
mod common;
use common::*;

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferrovip::lab::{Lab, LabSpec, ProcId, Sniffer, log_tail};
use ipnet::{Ipv4Net, Ipv6Net};

const PER_VIP: usize = 1000;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Idle CPU and RSS per agent with one huge group.
#[derive(Parser, Debug)]
#[command(name = "burst")]
struct Args {
    /// Addresses in the group.
    #[arg(long, default_value_t = 10_000)]
    vips: usize,
    /// VRRPv3 advertisement interval.
    #[arg(long, default_value = "10ms", value_parser = parse_duration)]
    interval: Duration,
    /// Length of one measurement window.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    window: Duration,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// IPv6 addresses instead of IPv4.
    #[arg(long)]
    ipv6: bool,
    /// Extra agent arguments (e.g. `--address-lifetime=0s`), repeatable.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// The agent to run (default: the one built with this benchmark), e.g. an older build
    /// to compare with.
    #[arg(long)]
    agent_binary: Option<String>,
    /// Ignored (cargo bench passes it).
    #[arg(long, hide = true)]
    bench: bool,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    ferrovip::crd::parse_duration(s).map_err(|e| e.to_string())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    watch_for_interrupts()?;
    let lab = Lab::create(LabSpec {
        nodes: 3,
        subnet_v4: Ipv4Net::new(Ipv4Addr::new(10, 20, 0, 0), 16)?,
        ipv6: args.ipv6,
        ..LabSpec::default()
    })?;
    let addresses = addresses(&args);
    let names: Vec<String> = lab.nodes().iter().map(|n| n.name.clone()).collect();
    let manifest = lab.dir().join("burst.yaml");
    std::fs::write(&manifest, manifests(&names, &addresses, args.interval))?;
    let sniffer = Sniffer::start(&lab)?;
    // node-a first, the backups once it holds the group: a backup that found no master at
    // start would take the group for a moment and then remove it again, which is the node
    // layer's cost, not the idle cost measured here.
    let spawn = |node: usize| -> anyhow::Result<ProcId> {
        let name = &names[node];
        let manifest = manifest.to_string_lossy().into_owned();
        let mut argv: Vec<&str> = vec![
            args.agent_binary.as_deref().unwrap_or(AGENT_BINARY),
            "agent",
            "--node-name",
            name,
            "--manifests",
            &manifest,
        ];
        argv.extend(args.agent_args.iter().map(String::as_str));
        Ok(lab.spawn(node, &argv, format!("{name}.log"))?)
    };
    let mut agents = vec![spawn(0)?];
    let started = Instant::now();
    settle(&lab, &sniffer, &agents, &addresses, started).with_context(|| {
        format!(
            "node-a log:\n{}",
            log_tail(&lab.dir().join("node-a.log"), 20)
        )
    })?;
    println!(
        "settled: node-a holds {} addresses after {:.1} s",
        addresses.len(),
        started.elapsed().as_secs_f64()
    );
    for node in 1..names.len() {
        agents.push(spawn(node)?);
    }
    sleep(Duration::from_secs(5))?;
    let master = lab.node(0).ipv4;
    let mut per_node: Vec<Vec<(f64, u64)>> = vec![Vec::new(); agents.len()];
    for round in 0..args.rounds {
        check_interrupted()?;
        let before: Vec<(Duration, Instant)> = agents
            .iter()
            .map(|&id| Ok((cpu_time(lab.pid(id)?)?, Instant::now())))
            .collect::<anyhow::Result<_>>()?;
        sleep(args.window)?;
        for (n, &id) in agents.iter().enumerate() {
            let pid = lab.pid(id)?;
            let cpu = cpu_time(pid)? - before[n].0;
            let wall = before[n].1.elapsed();
            let share = 100.0 * cpu.as_secs_f64() / wall.as_secs_f64();
            per_node[n].push((share, rss_kib(pid)?));
        }
        let adverts = sniffer
            .events_since(Instant::now() - args.window)
            .iter()
            .filter(|e| {
                e.advert()
                    .is_some_and(|a| a.source == IpAddr::V4(master) || a.source.is_ipv6())
            })
            .count();
        let mut line = format!("round {round}: adverts on the wire {adverts}");
        for (n, name) in names.iter().enumerate() {
            let (share, rss) = per_node[n][round];
            let _ = write!(
                line,
                "; {name} {share:.1}% CPU {:.1} MB",
                rss as f64 / 1024.0
            );
        }
        println!("{line}");
    }
    println!(
        "\nidle, {} {} addresses in one instance, {} ms adverts, {} × {:?} (median):",
        addresses.len(),
        if args.ipv6 { "IPv6" } else { "IPv4" },
        args.interval.as_millis(),
        args.rounds,
        args.window
    );
    for (n, name) in names.iter().enumerate() {
        let role = if n == 0 { "master" } else { "backup" };
        let mut shares: Vec<u64> = per_node[n]
            .iter()
            .map(|(s, _)| (s * 1000.0) as u64)
            .collect();
        shares.sort();
        let rss = median(per_node[n].iter().map(|(_, r)| *r).collect());
        println!(
            "  {name} ({role}): {:.1}% of a core, RSS {:.1} MB",
            median(shares) as f64 / 1000.0,
            rss as f64 / 1024.0
        );
    }
    for &id in &agents {
        let _ = lab.kill(id, nix::sys::signal::Signal::SIGTERM);
    }
    for &id in &agents {
        let _ = lab.wait(id, Duration::from_secs(10));
    }
    Ok(())
}

fn addresses(args: &Args) -> Vec<IpAddr> {
    (0..args.vips)
        .map(|i| {
            if args.ipv6 {
                IpAddr::V6(Ipv6Addr::new(0xfd00, 0xb, 0, 0, 0, 0, 1, i as u16))
            } else {
                // 10.20.16.0 onwards: above the nodes (10.20.0.11-13).
                IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 20, 16, 0)) + i as u32,
                ))
            }
        })
        .collect()
}

/// VirtualIPs of `PER_VIP` addresses each, identical settings, no VRID: one shared instance.
fn manifests(nodes: &[String], addresses: &[IpAddr], interval: Duration) -> String {
    let mut out = String::new();
    for (i, chunk) in addresses.chunks(PER_VIP).enumerate() {
        let list: Vec<String> = chunk
            .iter()
            .map(|a| match a {
                IpAddr::V4(v4) => format!("\"{}\"", Ipv4Net::new(*v4, 16).unwrap()),
                IpAddr::V6(v6) => format!("\"{}\"", Ipv6Net::new(*v6, 64).unwrap()),
            })
            .collect();
        let _ = write!(
            out,
            "---\napiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata:\n  name: burst-{i}\n\
             spec:\n  addresses: [{}]\n  interface: eth0\n  vrrp:\n    version: 3\n    \
             advertisementInterval: {}ms\n    preempt: true\n  priority:\n    base: 100\n    \
             preferredNodes:\n      - {{nodeName: {}, weight: 50}}\n",
            list.join(", "),
            interval.as_millis(),
            nodes[0]
        );
    }
    out
}

/// Waits until node-a holds the last address and every agent still runs.
fn settle(
    lab: &Lab,
    sniffer: &Sniffer,
    agents: &[ProcId],
    addresses: &[IpAddr],
    since: Instant,
) -> anyhow::Result<()> {
    let last = *addresses.last().context("no addresses")?;
    loop {
        check_interrupted()?;
        for &id in agents {
            if let Some(status) = lab.exit_status(id)? {
                bail!("agent {id} exited: {status}");
            }
        }
        // Announced on the wire, or on node-a's interface (route-held addresses of a bulk
        // install are not interface addresses).
        let announced = sniffer
            .events()
            .iter()
            .any(|e| e.announced() == Some(last) && e.src_mac == lab.node(0).mac);
        if announced || lab.has_address(0, last)? {
            // Let the backups see a few rounds and the first renewals pass.
            sleep(Duration::from_secs(3))?;
            return Ok(());
        }
        if since.elapsed() > SETTLE_TIMEOUT {
            bail!("node-a does not hold {last} after {SETTLE_TIMEOUT:?}");
        }
        sleep(Duration::from_millis(500))?;
    }
}

/// User + system CPU time of `pid` (all threads), from /proc (USER_HZ = 100).
fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = &stat[stat.rfind(')').context("comm")? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    Ok(Duration::from_millis(ticks * 10))
}

/// VmRSS of `pid` in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("VmRSS value")?
        .parse()?)
}
