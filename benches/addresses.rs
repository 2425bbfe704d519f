//! What renewing the masters' address lifetimes costs, and how precisely the kernel expires
//! an address that is no longer renewed. Needs root (a network namespace of its own).
//!
//! `cargo bench --bench addresses [-- --vips 1000 --rounds 5 --seconds 5]` adds `vips`
//! addresses (nine in ten IPv4 /32, one in ten IPv6 /128) with a one-second lifetime to a veth
//! in a fresh namespace, with the agent's notification reader running, then renews them as
//! the engine does (every third of the lifetime, one batch: many requests per `sendmsg`) for
//! `rounds` × `seconds`, and reports per round: renewals, `sendmsg` calls and requests per
//! second, the time one renewal takes, and the process's CPU (user + system, which includes
//! the kernel's work on the requests and on the notifications they cause); medians over the
//! rounds. Then, `expiry-trials` times (default 5, the last renewal at a different phase each
//! time), it stops renewing and reports, per family, when each address disappeared after the
//! start of its last renewal (the kernel's expiry granularity). Addresses are interface
//! addresses here (`--bulk-threshold 0`): the cost of renewing each.
//!
//! `cargo bench --bench addresses -- --install [--v4 10000 --v6 2000 --rounds 5]` times
//! installing and removing `v4` IPv4 /32s on one interface as a bulk set (anchor + `local`
//! routes, the agent's default above 64 addresses) and as interface addresses added in
//! batches (`--bulk-threshold 0`), and `v6` IPv6 /128s in batches and one round trip each
//! (`add_with_lifetime` / `remove` per address, the path before batching); medians over
//! `rounds`.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferrovip::node::addr::{AddressManager, AddressWatcher};
use ipnet::IpNet;

const LIFETIME: Duration = Duration::from_secs(1);
const INNER: &str = "--inner";

struct Options {
    vips: usize,
    rounds: usize,
    seconds: u64,
    expiry_trials: usize,
    inner: bool,
    install: bool,
    v4: usize,
    v6: usize,
}

fn options() -> Options {
    let mut o = Options {
        vips: 1000,
        rounds: 5,
        seconds: 5,
        expiry_trials: 5,
        inner: false,
        install: false,
        v4: 10_000,
        v6: 2_000,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> u64 {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--vips" => o.vips = value("--vips") as usize,
            "--rounds" => o.rounds = value("--rounds") as usize,
            "--seconds" => o.seconds = value("--seconds"),
            "--expiry-trials" => o.expiry_trials = value("--expiry-trials") as usize,
            INNER => o.inner = true,
            "--install" => o.install = true,
            "--v4" => o.v4 = value("--v4") as usize,
            "--v6" => o.v6 = value("--v6") as usize,
            _ => {} // cargo bench's own flags
        }
    }
    o
}

fn main() -> ExitCode {
    let o = options();
    if o.inner {
        let result = if o.install { install(&o) } else { inner(&o) };
        return match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("BENCH FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let ns = format!("fvbench-addr-{}", std::process::id());
    let ip = |args: &[&str]| {
        let status = Command::new("ip").args(args).status().expect("ip");
        assert!(status.success(), "ip {}", args.join(" "));
    };
    ip(&["netns", "add", &ns]);
    let run = || -> bool {
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n", &ns, "link", "add", "bench0", "type", "veth", "peer", "name", "bench1",
        ]);
        ip(&["-n", &ns, "link", "set", "bench0", "up"]);
        ip(&["-n", &ns, "link", "set", "bench1", "up"]);
        let me = std::env::current_exe().expect("own path");
        let (vips, rounds, seconds, v4, v6) = (
            o.vips.to_string(),
            o.rounds.to_string(),
            o.seconds.to_string(),
            o.v4.to_string(),
            o.v6.to_string(),
        );
        let mut args = vec![
            INNER,
            "--vips",
            &vips,
            "--rounds",
            &rounds,
            "--seconds",
            &seconds,
            "--v4",
            &v4,
            "--v6",
            &v6,
        ];
        if o.install {
            args.push("--install");
        }
        Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(me)
            .args(args)
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let ok = run();
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn vip(i: usize) -> IpNet {
    if i % 10 == 9 {
        let ip = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, i as u16);
        IpNet::new(IpAddr::V6(ip), 128).unwrap()
    } else {
        let ip = Ipv4Addr::new(198, 18, (i / 250) as u8, (i % 250 + 1) as u8);
        IpNet::new(IpAddr::V4(ip), 32).unwrap()
    }
}

/// User + system CPU time of this process (all threads), from /proc (USER_HZ = 100).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    Duration::from_millis(ticks * 10)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[values.len() / 2]
}

fn inner(o: &Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let dir = std::env::temp_dir().join(format!("fvbench-addr-{}", std::process::id()));
        let manager = AddressManager::connect_with_record(&dir, None)
            .await
            .map_err(|e| e.to_string())?
            .with_bulk_threshold(0);
        let index = manager.link("bench0").await.map_err(|e| e.to_string())?.index;
        let wanted: Vec<(u32, IpNet)> = (0..o.vips).map(|i| (index, vip(i))).collect();
        // Added as a new master adds them (one request each, with the lifetime).
        let nets: Vec<IpNet> = wanted.iter().map(|(_, n)| *n).collect();
        let began = Instant::now();
        let failed = manager.add_all(index, &nets, Some(LIFETIME)).await;
        let took = began.elapsed();
        if let Some((net, e)) = failed.first() {
            return Err(format!("add {net}: {e}"));
        }
        println!("added {} addresses in {took:?}", nets.len());
        // The agent's notification reader runs too: every renewal is one notification.
        let notified = Arc::new(AtomicU64::new(0));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        AddressWatcher::spawn(tx).map_err(|e| e.to_string())?;
        let counter = notified.clone();
        tokio::spawn(async move {
            while rx.recv().await.is_some() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        println!(
            "{} addresses ({} IPv4, {} IPv6), lifetime {LIFETIME:?}, renewed every {:?}, ownership {}",
            wanted.len(),
            wanted.iter().filter(|(_, n)| n.addr().is_ipv4()).count(),
            wanted.iter().filter(|(_, n)| n.addr().is_ipv6()).count(),
            LIFETIME / 3,
            manager.mode().as_str()
        );
        let mut sendmsg_rate = Vec::new();
        let mut request_rate = Vec::new();
        let mut cpu_share = Vec::new();
        let mut renew_ms = Vec::new();
                for round in 0..o.rounds {
            let cpu0 = cpu_time();
            let start = Instant::now();
            let (mut writes, mut requests, mut renewals) = (0usize, 0usize, 0usize);
            let mut times = Vec::new();
            let mut tick = tokio::time::interval(LIFETIME / 3);
            while start.elapsed() < Duration::from_secs(o.seconds) {
                tick.tick().await;
                let m = manager.clone();
                let batch = wanted.clone();
                let began = Instant::now();
                let report = tokio::task::spawn_blocking(move || m.renew(&batch, LIFETIME))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                times.push(began.elapsed().as_secs_f64() * 1e3);
                if !report.failed.is_empty() {
                    return Err(format!("renewal failures: {:?}", report.failed));
                }
                writes += report.writes;
                requests += report.renewed;
                renewals += 1;
            }
            let wall = start.elapsed().as_secs_f64();
            let cpu = (cpu_time() - cpu0).as_secs_f64();
            let t = median(&mut times);
            println!(
                "round {round}: {renewals} renewals, {:.1} sendmsg/s, {:.0} requests/s, renewal {t:.2} ms (median), CPU {:.1}% of one core",
                writes as f64 / wall,
                requests as f64 / wall,
                100.0 * cpu / wall
            );
            sendmsg_rate.push(writes as f64 / wall);
            request_rate.push(requests as f64 / wall);
            cpu_share.push(100.0 * cpu / wall);
            renew_ms.push(t);
        }
        println!(
            "median of {} rounds: {:.1} sendmsg/s, {:.0} requests/s, renewal {:.2} ms, CPU {:.1}% of one core",
            o.rounds,
            median(&mut sendmsg_rate),
            median(&mut request_rate),
            median(&mut renew_ms),
            median(&mut cpu_share),
        );
        let present: HashSet<(u32, IpNet)> = manager
            .list_owned()
            .await
            .map_err(|e| e.to_string())?
            .into_iter()
            .collect();
        if present.len() != wanted.len() {
            return Err(format!("{} of {} addresses present", present.len(), wanted.len()));
        }

        // Expiry: no more renewals; when does each address go? Several trials, the last
        // renewal at a different phase each time (the kernel rounds its checks to whole
        // seconds), timed from the start of that renewal.
        let mut gone_after: Vec<(bool, f64)> = Vec::new();
        for trial in 0..o.expiry_trials {
            if trial > 0 {
                if let Some((net, e)) = manager.add_all(index, &nets, None).await.first() {
                    return Err(format!("add {net}: {e}"));
                }
                tokio::time::sleep(Duration::from_millis(97 * trial as u64 % 1000)).await;
            }
            let m = manager.clone();
            let batch = wanted.clone();
            let began = Instant::now();
            tokio::task::spawn_blocking(move || m.renew(&batch, LIFETIME))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let mut gone: BTreeMap<(u32, IpNet), Duration> = BTreeMap::new();
            while gone.len() < wanted.len() && began.elapsed() < Duration::from_secs(5) {
                let present: HashSet<(u32, IpNet)> = manager
                    .list_owned()
                    .await
                    .map_err(|e| e.to_string())?
                    .into_iter()
                    .collect();
                let at = began.elapsed();
                for w in &wanted {
                    if !present.contains(w) {
                        gone.entry(*w).or_insert(at);
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if gone.len() != wanted.len() {
                return Err(format!(
                    "trial {trial}: {} of {} expired within 5 s",
                    gone.len(),
                    wanted.len()
                ));
            }
            gone_after.extend(
                gone.iter()
                    .map(|((_, n), d)| (n.addr().is_ipv6(), d.as_secs_f64() * 1e3)),
            );
        }
        for (family, v6) in [("IPv4", false), ("IPv6", true)] {
            let mut times: Vec<f64> = gone_after
                .iter()
                .filter(|(is_v6, _)| *is_v6 == v6)
                .map(|(_, t)| *t)
                .collect();
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            println!(
                "{family} expiry after the start of the last renewal (lifetime {LIFETIME:?}, {} trials, {} addresses): min {:.0} ms, median {:.0} ms, max {:.0} ms",
                o.expiry_trials,
                times.len(),
                times[0],
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        println!(
            "the notification reader reported {} removals",
            notified.load(Ordering::Relaxed)
        );
        let _ = std::fs::remove_dir_all(&dir);
        Ok(())
    })
}

/// Install and removal times: bulk vs batched interface addresses (IPv4), batched vs one
/// round trip each (IPv6).
fn install(o: &Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let bulk = AddressManager::connect().map_err(|e| e.to_string())?;
        let index = bulk.link("bench0").await.map_err(|e| e.to_string())?.index;
        let batched = AddressManager::connect()
            .map_err(|e| e.to_string())?
            .with_bulk_threshold(0);
        let v4: Vec<IpNet> = (0..o.v4 as u32)
            .map(|i| {
                IpNet::new(
                    IpAddr::V4(Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i)),
                    32,
                )
                .unwrap()
            })
            .collect();
        let v6: Vec<IpNet> = (0..o.v6 as u32)
            .map(|i| {
                IpNet::new(
                    IpAddr::V6(Ipv6Addr::from(
                        u128::from(Ipv6Addr::new(0x2001, 0xdb8, 0x64, 0, 0, 0, 0, 1))
                            + u128::from(i),
                    )),
                    128,
                )
                .unwrap()
            })
            .collect();
        let check = |failed: Vec<(IpNet, ferrovip::node::addr::AddrError)>| -> Result<(), String> {
            match failed.first() {
                Some((net, e)) => Err(format!("{net}: {e}")),
                None => Ok(()),
            }
        };
        let mut figures: BTreeMap<&str, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
        for round in 0..o.rounds {
            let mut time = |name: &'static str, add: f64, remove: f64| {
                println!("round {round}: {name}: install {add:.1} ms, removal {remove:.1} ms");
                let entry = figures.entry(name).or_default();
                entry.0.push(add);
                entry.1.push(remove);
            };
            let ms = |since: Instant| since.elapsed().as_secs_f64() * 1e3;

            let t = Instant::now();
            check(bulk.add_all(index, &v4, Some(LIFETIME * 60)).await)?;
            let add = ms(t);
            let t = Instant::now();
            check(bulk.remove_all(index, &v4).await)?;
            time("IPv4 bulk (anchor + local routes)", add, ms(t));

            let t = Instant::now();
            check(batched.add_all(index, &v4, Some(LIFETIME * 60)).await)?;
            let add = ms(t);
            let t = Instant::now();
            check(batched.remove_all(index, &v4).await)?;
            time("IPv4 interface addresses, batched", add, ms(t));

            let t = Instant::now();
            check(batched.add_all(index, &v6, Some(LIFETIME * 60)).await)?;
            let add = ms(t);
            let t = Instant::now();
            check(batched.remove_all(index, &v6).await)?;
            time("IPv6 interface addresses, batched", add, ms(t));

            let t = Instant::now();
            for net in &v6 {
                batched
                    .add_with_lifetime(index, *net, Some(LIFETIME * 60))
                    .await
                    .map_err(|e| format!("{net}: {e}"))?;
            }
            let add = ms(t);
            let t = Instant::now();
            for net in &v6 {
                batched
                    .remove(index, *net)
                    .await
                    .map_err(|e| format!("{net}: {e}"))?;
            }
            time("IPv6 interface addresses, one round trip each", add, ms(t));

            let left = batched.list_owned().await.map_err(|e| e.to_string())?;
            if !left.is_empty() {
                return Err(format!("{} addresses left after round {round}", left.len()));
            }
        }
        println!(
            "{} IPv4 /32 and {} IPv6 /128 on one veth, medians of {} rounds:",
            o.v4, o.v6, o.rounds
        );
        for (name, (mut add, mut remove)) in figures {
            println!(
                "  {name}: install {:.1} ms, removal {:.1} ms",
                median(&mut add),
                median(&mut remove)
            );
        }
        Ok(())
    })
}
