//! What the real-cluster rig (`ferrovip_e2e::cluster::Cluster`) costs: how long a start takes
//! (etcd, kube-apiserver, controller-manager, scheduler, three nodes with containerd and
//! kubelet, until every Node is Ready), and what the idle cluster uses (CPU of all its
//! processes, their resident memory). Needs root and the binaries of e2e/cluster/build.sh and
//! e2e/apiserver/build.sh.
//!
//! `cargo bench --bench cluster_rig [-- --starts 3 --settle 10 --idle 20]` starts the cluster
//! `starts` times; after each start it waits `settle` seconds, then samples CPU time (user +
//! system, from /proc) of every rig process over `idle` seconds, and the sum of their RSS.
//! Reports each start and the medians.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ferrovip_e2e::cluster::{Cluster, ClusterOptions, RigProcess};

const BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/cluster/build.sh");
const APISERVER_BUILD_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/e2e/apiserver/build.sh");

struct Options {
    starts: usize,
    settle: u64,
    idle: u64,
}

fn options() -> Result<Options, String> {
    let mut o = Options {
        starts: 3,
        settle: 10,
        idle: 20,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            args.next()
                .and_then(|v| v.parse().ok())
                .ok_or(format!("{name} needs a number"))
        };
        match arg.as_str() {
            "--starts" => o.starts = value("--starts")?.max(1) as usize,
            "--settle" => o.settle = value("--settle")?,
            "--idle" => o.idle = value("--idle")?.max(1),
            // cargo bench passes --bench.
            "--bench" => {}
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// utime + stime in clock ticks, and RSS in kB.
fn usage(pid: u32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based, whole line).
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    Some((ticks, rss))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// Per group (process name): CPU share of one core over `idle`, and RSS in MB at the end.
fn idle_cost(processes: &[RigProcess], idle: Duration) -> BTreeMap<String, (f64, f64)> {
    let ticks_per_second = 100.0;
    let before: BTreeMap<u32, u64> = processes
        .iter()
        .filter_map(|p| Some((p.pid, usage(p.pid)?.0)))
        .collect();
    std::thread::sleep(idle);
    let mut groups: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for p in processes {
        let (Some(start), Some((end, rss))) = (before.get(&p.pid), usage(p.pid)) else {
            continue;
        };
        let group = if p.place == "container" {
            "containers".to_owned()
        } else if p.name.starts_with("containerd-shim") {
            "containerd-shim".to_owned()
        } else {
            p.name.clone()
        };
        let entry = groups.entry(group).or_default();
        entry.0 += (end - start) as f64 / ticks_per_second / idle.as_secs_f64() * 100.0;
        entry.1 += rss as f64 / 1024.0;
    }
    groups
}

fn main() -> ExitCode {
    let o = match options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let mut starts = Vec::new();
    let mut totals_cpu = Vec::new();
    let mut totals_rss = Vec::new();
    let mut per_group: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for run in 1..=o.starts {
        let wall = Instant::now();
        let mut cluster = match Cluster::start(ClusterOptions {
            build_script: Some(BUILD_SCRIPT.into()),
            apiserver_build_script: Some(APISERVER_BUILD_SCRIPT.into()),
            ..ClusterOptions::default()
        }) {
            Ok(cluster) => cluster,
            Err(e) => {
                eprintln!("start {run}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let start = cluster.start_time();
        std::thread::sleep(Duration::from_secs(o.settle));
        let processes = cluster.processes();
        let groups = idle_cost(&processes, Duration::from_secs(o.idle));
        let cpu: f64 = groups.values().map(|g| g.0).sum();
        let rss: f64 = groups.values().map(|g| g.1).sum();
        println!(
            "start {run}: Ready after {:.1} s ({:.1} s wall); idle: {cpu:.1} % of a core, {rss:.0} MB RSS, {} processes",
            start.as_secs_f64(),
            wall.elapsed().as_secs_f64() - o.settle as f64 - o.idle as f64,
            processes.len()
        );
        for (name, (c, r)) in &groups {
            println!("    {name:<26} {c:5.1} % {r:6.0} MB");
            per_group.entry(name.clone()).or_default().push((*c, *r));
        }
        starts.push(start.as_secs_f64());
        totals_cpu.push(cpu);
        totals_rss.push(rss);
        drop(cluster);
    }
    println!(
        "median over {} starts: Ready after {:.1} s; idle {:.1} % of a core, {:.0} MB RSS",
        o.starts,
        median(starts),
        median(totals_cpu),
        median(totals_rss)
    );
    for (name, values) in per_group {
        let cpu = median(values.iter().map(|v| v.0).collect());
        let rss = median(values.iter().map(|v| v.1).collect());
        println!("    {name:<26} {cpu:5.1} % {rss:6.0} MB");
    }
    ExitCode::SUCCESS
}
