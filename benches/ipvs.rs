//! IPVS dataplane benchmark, on a real IPVS kernel in the test VM (`e2e/vm/build.sh`).
//!
//! `cargo bench --bench ipvs [-- --rounds 5 --services 10000 --backends 10]` boots the VM with
//! this binary inside and measures, in the same VM and run:
//! - programming `services` × `backends` from an empty table: `ipvsadm -R` (the reference)
//!   against the dataplane's first `apply`, medians over the rounds;
//! - one backend changed in that table: the `apply` time and its write count (target < 10 ms,
//!   one write);
//! - nothing changed: the `apply` time and its write count (target: no writes);
//! - a restarted agent adopting the table: one full read, no writes.
//!
//! Every table is checked against `ipvsadm -Sn` before its figures count.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use ferrovip::dataplane::Dataplane;
use ferrovip::dataplane::ipvs::{IpvsDataplane, IpvsOptions};
use ferrovip::model::service::{
    BackendKey, Forwarding, ServiceKey, ServiceProtocol, ServiceSet, ServiceSpec,
};
use ferrovip_e2e::vm::{GUEST_BIN_DIR, GuestNetns, IN_VM_ENV, VmImage, VmRun, in_guest};

struct Options {
    rounds: usize,
    services: usize,
    backends: usize,
    changes: usize,
}

fn options() -> Options {
    let mut o = Options {
        rounds: 5,
        services: 10_000,
        backends: 10,
        changes: 21,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a number"))
        };
        match a.as_str() {
            "--rounds" => o.rounds = value("--rounds"),
            "--services" => o.services = value("--services"),
            "--backends" => o.backends = value("--backends"),
            "--changes" => o.changes = value("--changes"),
            _ => {} // cargo bench's own flags
        }
    }
    o
}

fn main() -> ExitCode {
    let o = options();
    if in_guest() {
        return match guest(&o) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                println!("BENCH FAILED: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let image = match VmImage::locate() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let me = std::env::current_exe().expect("own path");
    let guest_me = format!("{GUEST_BIN_DIR}/ipvs-bench");
    let command = format!(
        "{guest_me} --rounds {} --services {} --backends {} --changes {}",
        o.rounds, o.services, o.backends, o.changes
    );
    eprintln!(
        "booting {} with the benchmark ({} services x {} backends, {} rounds)",
        image.kernel_version(),
        o.services,
        o.backends,
        o.rounds
    );
    let run = VmRun::new(&image)
        .binary(&me, &guest_me)
        .env(IN_VM_ENV, "1")
        .memory_mib(2048)
        .timeout(Duration::from_secs(3600))
        .echo_console(true)
        .run(&command);
    match run {
        Ok(out) if out.success() => ExitCode::SUCCESS,
        Ok(out) => {
            eprintln!("benchmark failed in the VM (exit code {})", out.exit_code);
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("vm: {e}");
            ExitCode::FAILURE
        }
    }
}

fn service_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, (i / 250) as u8, (i % 250 + 1) as u8)
}

fn backend_addr(i: usize, j: usize) -> Ipv4Addr {
    let n = i * 16 + j;
    Ipv4Addr::new(10, 200 + (n >> 16) as u8, (n >> 8) as u8, n as u8)
}

fn desired(o: &Options) -> ServiceSet {
    (0..o.services)
        .map(|i| {
            let key = ServiceKey::Port {
                addr: IpAddr::V4(service_addr(i)),
                protocol: ServiceProtocol::TCP,
                port: 80,
            };
            let backends = (0..o.backends)
                .map(|j| {
                    (
                        BackendKey {
                            addr: IpAddr::V4(backend_addr(i, j)),
                            port: 8080,
                        },
                        1,
                    )
                })
                .collect();
            let spec = ServiceSpec {
                owner: "bench".into(),
                scheduler: "rr".into(),
                scheduler_flags: [false; 3],
                persistence: None,
                forwarding: Forwarding::Masquerade,
                // ipvsadm sets up no return path: compare like with like.
                source_nat: false,
                tunnel: None,
                connection_limit: (0, 0),
                backends,
            };
            (key, spec)
        })
        .collect()
}

/// The same table as `ipvsadm -R` input.
fn restore_script(o: &Options) -> String {
    let mut s = String::with_capacity(o.services * (o.backends + 1) * 48);
    for i in 0..o.services {
        let svc = service_addr(i);
        s.push_str(&format!("-A -t {svc}:80 -s rr\n"));
        for j in 0..o.backends {
            s.push_str(&format!(
                "-a -t {svc}:80 -r {}:8080 -m -w 1\n",
                backend_addr(i, j)
            ));
        }
    }
    s
}

/// Runs `program` in network namespace `netns`.
fn sh(netns: &str, program: &str, args: &[&str], input: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, program])
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{program}: {e}"))?;
    if let Some(input) = input {
        child
            .stdin
            .take()
            .expect("piped")
            .write_all(input.as_bytes())
            .map_err(|e| format!("{program} stdin: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("{program}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ipvsadm -Sn`, sorted, for comparing tables.
fn table(netns: &str) -> Result<Vec<String>, String> {
    let mut lines: Vec<String> = sh(netns, "ipvsadm", &["-Sn"], None)?
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    Ok(lines)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn guest(o: &Options) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let state_root = std::path::PathBuf::from("/run/ferrovip-bench");
    let desired = desired(o);
    let script = restore_script(o);
    let entries = o.services * (o.backends + 1);
    println!(
        "table: {} services x {} backends = {entries} entries",
        o.services, o.backends
    );

    // First the steady state of a node: one table, programmed once, then a restarted agent
    // adopts it, and the small changes follow. (Before the rounds, whose namespaces would
    // otherwise share the kernel and the VM's memory with these measurements.) The
    // dataplane's netlink socket lives in that namespace from here on.
    let steady_state = std::path::PathBuf::from("/run/ferrovip-bench-steady");
    let netns = GuestNetns::create("steady").map_err(|e| e.to_string())?;
    let mut first = IpvsDataplane::new(IpvsOptions {
        state_dir: steady_state.clone(),
        ..IpvsOptions::default()
    });
    let programmed = netns
        .run(|| runtime.block_on(first.apply(&desired)))
        .map_err(|e| e.to_string())?;
    if !programmed.failures.is_empty() || programmed.unavailable.is_some() {
        return Err(format!("apply failed: {programmed:?}"));
    }
    let mut dp = IpvsDataplane::new(IpvsOptions {
        state_dir: steady_state.clone(),
        ..IpvsOptions::default()
    });
    let (adopt, adopt_took) = netns
        .run(|| {
            let t = Instant::now();
            let r = runtime.block_on(dp.apply(&desired));
            (r, t.elapsed())
        })
        .map_err(|e| e.to_string())?;
    if adopt.writes != 0 || !adopt.failures.is_empty() {
        return Err(format!("adopting the table wrote: {adopt:?}"));
    }

    let mut noop = Vec::new();
    for _ in 0..o.changes {
        let t = Instant::now();
        let r = runtime.block_on(dp.apply(&desired));
        noop.push(t.elapsed());
        if r.writes != 0 {
            return Err(format!("a no-op apply wrote {} times", r.writes));
        }
    }

    let mut change = Vec::new();
    let mut changed = desired.clone();
    let mut writes = BTreeMap::new();
    for n in 0..o.changes {
        let i = (n * 7919) % o.services;
        let key = ServiceKey::Port {
            addr: IpAddr::V4(service_addr(i)),
            protocol: ServiceProtocol::TCP,
            port: 80,
        };
        let backend = BackendKey {
            addr: IpAddr::V4(backend_addr(i, n % o.backends)),
            port: 8080,
        };
        let spec = changed.get_mut(&key).expect("service");
        let weight = spec.backends.get_mut(&backend).expect("backend");
        *weight = if *weight == 0 { 1 } else { 0 };
        let t = Instant::now();
        let r = runtime.block_on(dp.apply(&changed));
        change.push(t.elapsed());
        *writes.entry(r.writes).or_insert(0) += 1;
        if !r.failures.is_empty() {
            return Err(format!("a one-backend change failed: {r:?}"));
        }
    }
    // The kernel must show the last state.
    let expected_weight_zero = changed
        .values()
        .flat_map(|s| s.backends.values())
        .filter(|w| **w == 0)
        .count();
    let listed = sh(netns.name(), "ipvsadm", &["-Sn"], None)?;
    let zero = listed.lines().filter(|l| l.ends_with(" -w 0")).count();
    if zero != expected_weight_zero {
        return Err(format!(
            "{zero} destinations at weight 0 in the kernel, {expected_weight_zero} expected"
        ));
    }

    // Every measurement gets a fresh network namespace, i.e. a fresh IPVS instance: the
    // kernel keeps deleted destinations in a trash list that each add searches linearly for
    // minutes, so a table programmed after a flush would measure that list, not the tool.
    let mut restore = Vec::new();
    let mut ours = Vec::new();
    // Namespaces stay until the end: deleting one with 110,000 destinations keeps the
    // kernel busy for a while, which would land in the next measurement.
    let mut namespaces = Vec::new();
    for round in 0..o.rounds {
        let theirs_ns =
            GuestNetns::create(&format!("ipvsadm-{round}")).map_err(|e| e.to_string())?;
        let t = Instant::now();
        sh(theirs_ns.name(), "ipvsadm", &["-R"], Some(&script))?;
        let took = t.elapsed();
        restore.push(took);
        let their = table(theirs_ns.name())?;
        if their.len() != entries {
            return Err(format!("ipvsadm -R left {} entries", their.len()));
        }
        namespaces.push(theirs_ns);

        let ours_ns =
            GuestNetns::create(&format!("ferrovip-{round}")).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_dir_all(&state_root);
        let mut dp = IpvsDataplane::new(IpvsOptions {
            state_dir: state_root.clone(),
            ..IpvsOptions::default()
        });
        let (report, took_ours) = ours_ns
            .run(|| {
                let t = Instant::now();
                let report = runtime.block_on(dp.apply(&desired));
                (report, t.elapsed())
            })
            .map_err(|e| e.to_string())?;
        if !report.failures.is_empty() || report.unavailable.is_some() {
            return Err(format!("apply failed: {report:?}"));
        }
        ours.push(took_ours);
        let mine = table(ours_ns.name())?;
        if mine != their {
            return Err("the dataplane's table differs from ipvsadm -R's".into());
        }
        println!(
            "round {}: ipvsadm -R {}, apply {} ({} writes)",
            round + 1,
            ms(took),
            ms(took_ours),
            report.writes
        );
        namespaces.push(ours_ns);
    }
    let r = median(restore.clone());
    let a = median(ours.clone());
    println!();
    println!(
        "RESULT from empty to {entries} entries (median of {} rounds):",
        o.rounds
    );
    println!(
        "RESULT   ipvsadm -R          {}   [{} - {}]",
        ms(r),
        ms(*restore.iter().min().unwrap()),
        ms(*restore.iter().max().unwrap())
    );
    println!(
        "RESULT   ferrovip apply      {}   [{} - {}]",
        ms(a),
        ms(*ours.iter().min().unwrap()),
        ms(*ours.iter().max().unwrap())
    );
    println!(
        "RESULT   ratio ferrovip/ipvsadm = {:.3} ({:.1}x faster)",
        a.as_secs_f64() / r.as_secs_f64(),
        r.as_secs_f64() / a.as_secs_f64()
    );
    println!(
        "RESULT one backend changed: median {} [max {}] over {} changes; writes per apply: {:?}",
        ms(median(change.clone())),
        ms(*change.iter().max().unwrap()),
        o.changes,
        writes
    );
    println!(
        "RESULT nothing changed: median {} [max {}], 0 writes",
        ms(median(noop.clone())),
        ms(*noop.iter().max().unwrap())
    );
    println!(
        "RESULT restart adoption (read the whole table, no writes): {}",
        ms(adopt_took)
    );
    let _ = std::fs::remove_dir_all(&state_root);
    Ok(())
}
