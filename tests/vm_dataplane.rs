//! The IPVS dataplane and the agent on a real IPVS kernel (the VM of `e2e/vm/build.sh`; see
//! tests/vm/mod.rs for how the binary reruns itself there). `cargo test --test vm_dataplane --
//! converge` runs the cases matching "converge".

mod vm;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrovip::dataplane::ipvs::client::{IpvsClient, IpvsError, Op};
use ferrovip::dataplane::ipvs::netlink;
use ferrovip::dataplane::ipvs::{IpvsDataplane, IpvsOptions};
use ferrovip::dataplane::{ApplyReport, Dataplane};
use ferrovip::model::service::{
    BackendKey, Forwarding, ServiceKey, ServiceProtocol, ServiceSet, ServiceSpec,
};
use ferrovip::source::cache::CACHE_FILE;
use ferrovip::vocab::Family;
use ferrovip_e2e::vm::{
    GuestBridge, GuestNetns, TcpNameServer, attach_uplink, tcp_request, tcp_spread,
};
use vm::{Case, CaseResult, ensure};

const CASES: &[Case] = &[
    ("client_speaks_every_kind", client_speaks_every_kind),
    (
        "dataplane_converges_by_difference",
        dataplane_converges_by_difference,
    ),
    (
        "dataplane_isolates_a_bad_service",
        dataplane_isolates_a_bad_service,
    ),
    (
        "dataplane_nat_traffic_tcp_udp_ipv4_ipv6",
        dataplane_nat_traffic_tcp_udp_ipv4_ipv6,
    ),
    (
        "dataplane_tunnel_and_fwmark_traffic",
        dataplane_tunnel_and_fwmark_traffic,
    ),
    (
        "cleanup_removes_what_an_earlier_run_left",
        cleanup_removes_what_an_earlier_run_left,
    ),
    (
        "tunnel_options_and_connection_limits_round_trip",
        tunnel_options_and_connection_limits_round_trip,
    ),
    (
        "agent_forwards_through_changes_and_failover",
        agent_forwards_through_changes_and_failover,
    ),
    (
        "agent_restarts_adopt_the_dataplane_without_a_write",
        agent_restarts_adopt_the_dataplane_without_a_write,
    ),
    (
        "k8s_agent_restarts_adopt_the_dataplane_without_a_write",
        k8s_agent_restarts_adopt_the_dataplane_without_a_write,
    ),
    (
        "k8s_service_load_balancer_through_ipvs_and_failover",
        k8s_service_load_balancer_through_ipvs_and_failover,
    ),
];

/// The cases that run agents against the host's API server, and their nodes.
const KUBE: vm::Kube = vm::Kube {
    cases: &[
        "k8s_agent_restarts_adopt_the_dataplane_without_a_write",
        "k8s_service_load_balancer_through_ipvs_and_failover",
    ],
    nodes: &["d1", "d2"],
};

fn main() -> ExitCode {
    vm::main_with_kube(CASES, &KUBE)
}

const TIMEOUT: Duration = Duration::from_secs(3);

fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
}

fn tcp(addr: IpAddr, port: u16) -> ServiceKey {
    ServiceKey::Port {
        addr,
        protocol: ServiceProtocol::TCP,
        port,
    }
}

fn spec(forwarding: Forwarding, backends: &[(IpAddr, u16, u32)]) -> ServiceSpec {
    ServiceSpec {
        owner: "test".into(),
        scheduler: "rr".into(),
        scheduler_flags: [false; 3],
        persistence: None,
        forwarding,
        source_nat: false,
        tunnel: None,
        connection_limit: (0, 0),
        backends: backends
            .iter()
            .map(|&(addr, port, w)| (BackendKey { addr, port }, w))
            .collect(),
    }
}

/// `ipvsadm -Sn` of a namespace, sorted.
fn saved(ns: &GuestNetns) -> Result<Vec<String>, vm::CaseError> {
    let mut lines: Vec<String> = ns
        .exec("ipvsadm", &["-Sn"])?
        .lines()
        .map(str::to_owned)
        .collect();
    lines.sort();
    Ok(lines)
}

fn apply(
    ns: &GuestNetns,
    dp: &mut IpvsDataplane,
    set: &ServiceSet,
) -> Result<ApplyReport, vm::CaseError> {
    let report = ns.run(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(dp.apply(set))
    })?;
    Ok(report)
}

/// [`apply`], which must program every service.
fn apply_cleanly(
    ns: &GuestNetns,
    dp: &mut IpvsDataplane,
    set: &ServiceSet,
) -> Result<ApplyReport, vm::CaseError> {
    let report = apply(ns, dp, set)?;
    ensure(report.failures.is_empty(), || format!("{report:?}"))?;
    Ok(report)
}

/// A dataplane keeping its record of owned services in `state_dir`.
fn dataplane(state_dir: impl Into<PathBuf>) -> IpvsDataplane {
    IpvsDataplane::new(IpvsOptions {
        state_dir: state_dir.into(),
        ..IpvsOptions::default()
    })
}

/// The client programs every service kind, forwarding method, scheduler flag and
/// persistence through netlink, and ipvsadm (libnl, the reference reader) lists exactly that
/// back; kernel errors arrive typed.
fn client_speaks_every_kind() -> CaseResult {
    let ns = GuestNetns::create("client")?;
    let svc = |key: netlink::ServiceKey,
               scheduler: &str,
               flags: netlink::ServiceFlags,
               timeout: u32,
               netmask: u32| netlink::Service {
        key,
        config: netlink::ServiceConfig {
            scheduler: scheduler.into(),
            flags,
            timeout,
            netmask,
            pe_name: None,
        },
    };
    let dest = |addr: IpAddr, port: u16, forwarding: netlink::Forwarding, weight: u32| {
        netlink::Destination {
            key: netlink::DestKey { addr, port },
            config: netlink::DestConfig {
                forwarding,
                weight,
                upper_threshold: 0,
                lower_threshold: 0,
            },
        }
    };
    let tcp4 = netlink::ServiceKey::Addr {
        protocol: netlink::Protocol::Tcp,
        addr: v4(10, 0, 0, 1),
        port: 80,
    };
    let udp4 = netlink::ServiceKey::Addr {
        protocol: netlink::Protocol::Udp,
        addr: v4(10, 0, 0, 1),
        port: 53,
    };
    let sctp4 = netlink::ServiceKey::Addr {
        protocol: netlink::Protocol::Sctp,
        addr: v4(10, 0, 0, 1),
        port: 3868,
    };
    let tcp6 = netlink::ServiceKey::Addr {
        protocol: netlink::Protocol::Tcp,
        addr: "2001:db8::1".parse().unwrap(),
        port: 443,
    };
    let mark = netlink::ServiceKey::Fwmark {
        family: netlink::AddrFamily::V4,
        mark: 7,
    };
    let persistent = netlink::ServiceFlags {
        persistent: true,
        ..Default::default()
    };
    let sh_flags = netlink::ServiceFlags {
        sched_flag_1: true,
        sched_flag_2: true,
        ..Default::default()
    };
    let ops = vec![
        Op::AddService(svc(tcp4, "rr", Default::default(), 0, u32::MAX)),
        Op::AddService(svc(udp4, "wlc", persistent, 300, u32::MAX)),
        Op::AddService(svc(sctp4, "lc", Default::default(), 0, u32::MAX)),
        Op::AddService(svc(tcp6, "sh", sh_flags, 0, 128)),
        Op::AddService(svc(mark, "mh", Default::default(), 0, u32::MAX)),
        Op::AddDest(
            tcp4,
            dest(v4(10, 1, 0, 1), 8080, netlink::Forwarding::Masquerade, 3),
        ),
        Op::AddDest(
            tcp4,
            dest(v4(10, 1, 0, 2), 80, netlink::Forwarding::DirectRoute, 1),
        ),
        Op::AddDest(
            tcp4,
            dest(
                v4(10, 1, 0, 3),
                80,
                netlink::Forwarding::Tunnel(Default::default()),
                0,
            ),
        ),
        Op::AddDest(
            udp4,
            dest(v4(10, 1, 0, 1), 53, netlink::Forwarding::Masquerade, 1),
        ),
        Op::AddDest(
            tcp6,
            dest(
                "2001:db8::10".parse().unwrap(),
                8443,
                netlink::Forwarding::Masquerade,
                2,
            ),
        ),
        Op::AddDest(
            mark,
            dest(v4(10, 1, 0, 5), 0, netlink::Forwarding::DirectRoute, 1),
        ),
    ];
    let results = ns.run(|| -> Result<Vec<Result<(), IpvsError>>, IpvsError> {
        let mut c = IpvsClient::connect()?;
        Ok(c.execute(&ops))
    })??;
    for (op, r) in ops.iter().zip(&results) {
        ensure(r.is_ok(), || format!("{op:?}: {r:?}"))?;
    }
    let got = saved(&ns)?;
    let mut want: Vec<String> = [
        "-A -t 10.0.0.1:80 -s rr",
        "-a -t 10.0.0.1:80 -r 10.1.0.1:8080 -m -w 3",
        "-a -t 10.0.0.1:80 -r 10.1.0.2:80 -g -w 1",
        "-a -t 10.0.0.1:80 -r 10.1.0.3:80 -i -w 0",
        "-A -u 10.0.0.1:53 -s wlc -p 300",
        "-a -u 10.0.0.1:53 -r 10.1.0.1:53 -m -w 1",
        "--sctp-service 10.0.0.1:3868 -s lc",
        "-A -t [2001:db8::1]:443 -s sh -b sh-fallback,sh-port",
        "-a -t [2001:db8::1]:443 -r [2001:db8::10]:8443 -m -w 2",
        "-A -f 7 -s mh",
        "-a -f 7 -r 10.1.0.5:0 -g -w 1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    want.sort();
    // ipvsadm prints the SCTP service with -A; compare what both say.
    let normal = |l: &str| l.replace("-A --sctp-service", "--sctp-service");
    let got_n: Vec<String> = got.iter().map(|l| normal(l)).collect();
    let missing: Vec<&String> = want
        .iter()
        .filter(|w| {
            !got_n
                .iter()
                .any(|g| g == *w || g.starts_with(&format!("{w} ")))
        })
        .collect();
    ensure(missing.is_empty(), || {
        format!("ipvsadm -Sn lacks {missing:#?}\ngot {got:#?}")
    })?;

    // Every scheduler the kernel has, through the client, and read back by name. (twos is
    // newer than 6.1: the kernel refuses it with ENOENT, which the planner's list allows.)
    let schedulers = ferrovip::crd::SCHEDULERS;
    let other = ns.run(|| -> Result<_, IpvsError> {
        let mut c = IpvsClient::connect()?;
        let ops: Vec<Op> = schedulers
            .iter()
            .enumerate()
            .map(|(i, name)| {
                Op::AddService(svc(
                    netlink::ServiceKey::Addr {
                        protocol: netlink::Protocol::Tcp,
                        addr: v4(10, 0, 9, 1),
                        port: 1000 + i as u16,
                    },
                    name,
                    Default::default(),
                    0,
                    u32::MAX,
                ))
            })
            .collect();
        let results = c.execute(&ops);
        let read: Vec<String> = c
            .services()?
            .into_iter()
            .filter(|s| matches!(s.key, netlink::ServiceKey::Addr { addr, .. } if addr == v4(10, 0, 9, 1)))
            .map(|s| s.config.scheduler)
            .collect();
        Ok((results, read))
    })??;
    let (results, read) = other;
    for (name, result) in schedulers.iter().zip(&results) {
        let missing_module = matches!(result, Err(IpvsError::Kernel { name: "ENOENT", .. }));
        ensure(
            result.is_ok() || (*name == "twos" && missing_module),
            || format!("scheduler {name}: {result:?}"),
        )?;
        ensure(result.is_err() || read.iter().any(|r| r == name), || {
            format!("scheduler {name} not read back: {read:?}")
        })?;
    }
    for key in 0..schedulers.len() {
        let _ = ns.exec(
            "ipvsadm",
            &["-D", "-t", &format!("10.0.9.1:{}", 1000 + key)],
        );
    }

    // Read back with the client: the same services and destinations.
    let (services, dests) = ns.run(|| -> Result<_, IpvsError> {
        let mut c = IpvsClient::connect()?;
        let services = c.services()?;
        let dests = c.destinations(&tcp4)?;
        Ok((services, dests))
    })??;
    ensure(services.len() == 5, || {
        format!("read {} services", services.len())
    })?;
    let udp = services
        .iter()
        .find(|s| s.key == udp4)
        .ok_or("udp service not read")?;
    ensure(
        udp.config.flags.persistent && udp.config.timeout == 300,
        || format!("persistence read back as {:?}", udp.config),
    )?;
    ensure(dests.len() == 3, || {
        format!("read {} destinations", dests.len())
    })?;

    // Typed kernel errors, one per failing request; the others in the batch still apply.
    let errors = ns.run(|| -> Result<_, IpvsError> {
        let mut c = IpvsClient::connect()?;
        Ok(c.execute(&[
            Op::AddService(svc(tcp4, "rr", Default::default(), 0, u32::MAX)),
            Op::DelDest(
                tcp4,
                netlink::DestKey {
                    addr: v4(10, 9, 9, 9),
                    port: 1,
                },
            ),
            Op::AddService(svc(
                netlink::ServiceKey::Addr {
                    protocol: netlink::Protocol::Tcp,
                    addr: v4(10, 0, 0, 2),
                    port: 80,
                },
                "nosuch",
                Default::default(),
                0,
                u32::MAX,
            )),
            Op::DelService(tcp6),
        ]))
    })??;
    let names: Vec<Option<&'static str>> = errors
        .iter()
        .map(|r| match r {
            Ok(()) => None,
            Err(IpvsError::Kernel { name, .. }) => Some(*name),
            Err(_) => Some("other"),
        })
        .collect();
    ensure(
        names == [Some("EEXIST"), Some("ENOENT"), Some("ENOENT"), None],
        || format!("kernel errors: {errors:?}"),
    )?;
    let msg = errors[0].as_ref().unwrap_err().to_string();
    ensure(msg.contains("10.0.0.1:80"), || {
        format!("error does not name the object: {msg}")
    })
}

/// apply() writes only the difference, adopts its own services after a restart, repairs
/// what was changed behind its back after invalidate(), and never touches a foreign service.
fn dataplane_converges_by_difference() -> CaseResult {
    let ns = GuestNetns::create("converge")?;
    ns.exec("ipvsadm", &["-A", "-t", "10.9.9.9:80", "-s", "rr"])?;
    ns.exec(
        "ipvsadm",
        &["-a", "-t", "10.9.9.9:80", "-r", "10.1.9.1:80", "-m"],
    )?;
    let state = PathBuf::from("/run/converge-state");
    let new_dp = || dataplane(&state);

    let vip = v4(192, 0, 2, 100);
    let mut set: ServiceSet = BTreeMap::new();
    set.insert(
        tcp(vip, 80),
        spec(
            Forwarding::Masquerade,
            &[(v4(10, 1, 0, 1), 8080, 1), (v4(10, 1, 0, 2), 8080, 1)],
        ),
    );
    let mut dr = spec(Forwarding::Direct, &[(v4(10, 1, 0, 3), 443, 5)]);
    dr.scheduler = "wlc".into();
    dr.persistence = Some(600);
    set.insert(tcp(vip, 443), dr);
    set.insert(
        ServiceKey::Port {
            addr: "2001:db8::100".parse().unwrap(),
            protocol: ServiceProtocol::UDP,
            port: 53,
        },
        spec(
            Forwarding::Masquerade,
            &[("2001:db8:1::1".parse().unwrap(), 53, 1)],
        ),
    );
    let mut mh = spec(Forwarding::Tunnel, &[(v4(10, 1, 0, 4), 0, 1)]);
    mh.scheduler = "mh".into();
    mh.scheduler_flags = [true, true, false];
    set.insert(
        ServiceKey::Fwmark {
            family: Family::V4,
            mark: 42,
        },
        mh,
    );

    let mut dp = new_dp();
    let r = apply(&ns, &mut dp, &set)?;
    ensure(
        r.failures.is_empty() && r.writes == 9 && r.services == 4 && r.backends == 5,
        || format!("first apply: {r:?}"),
    )?;
    let first = saved(&ns)?;
    ensure(
        first
            .iter()
            .any(|l| l == "-A -t 192.0.2.100:443 -s wlc -p 600"),
        || format!("{first:#?}"),
    )?;
    ensure(
        first
            .iter()
            .any(|l| l == "-A -f 42 -s mh -b mh-fallback,mh-port"),
        || format!("{first:#?}"),
    )?;

    let r = apply(&ns, &mut dp, &set)?;
    ensure(r.writes == 0, || {
        format!("a second identical apply wrote: {r:?}")
    })?;

    // One backend drained, one removed, one added: three writes, one each.
    let web = set.get_mut(&tcp(vip, 80)).unwrap();
    web.backends.insert(
        BackendKey {
            addr: v4(10, 1, 0, 1),
            port: 8080,
        },
        0,
    );
    web.backends.remove(&BackendKey {
        addr: v4(10, 1, 0, 2),
        port: 8080,
    });
    web.backends.insert(
        BackendKey {
            addr: v4(10, 1, 0, 7),
            port: 8080,
        },
        2,
    );
    let r = apply(&ns, &mut dp, &set)?;
    ensure(r.writes == 3 && r.failures.is_empty(), || {
        format!("three backend changes: {r:?}")
    })?;
    let now = saved(&ns)?;
    for want in [
        "-a -t 192.0.2.100:80 -r 10.1.0.1:8080 -m -w 0",
        "-a -t 192.0.2.100:80 -r 10.1.0.7:8080 -m -w 2",
    ] {
        ensure(now.iter().any(|l| l == want), || {
            format!("{want} missing: {now:#?}")
        })?;
    }
    ensure(!now.iter().any(|l| l.contains("10.1.0.2:8080")), || {
        "removed backend still there".into()
    })?;

    // A restarted agent adopts its services: nothing is recreated.
    let mut dp = new_dp();
    let before_adoption = saved(&ns)?;
    let r = apply(&ns, &mut dp, &set)?;
    let after_adoption = saved(&ns)?;
    ensure(r.writes == 0 && r.services == 4, || {
        format!(
            "adoption after restart: {r:?}\nbefore {before_adoption:#?}\nafter {after_adoption:#?}"
        )
    })?;

    // Somebody deletes one of ours: the next resync repairs exactly that.
    ns.exec(
        "ipvsadm",
        &["-d", "-t", "192.0.2.100:80", "-r", "10.1.0.7:8080"],
    )?;
    dp.invalidate();
    let r = apply(&ns, &mut dp, &set)?;
    ensure(r.writes == 1, || format!("repair after tampering: {r:?}"))?;

    // A desired service whose key a foreign service holds is reported and left alone.
    set.insert(
        tcp(v4(10, 9, 9, 9), 80),
        spec(Forwarding::Masquerade, &[(v4(10, 1, 0, 1), 80, 1)]),
    );
    let r = apply(&ns, &mut dp, &set)?;
    ensure(
        r.writes == 0 && r.failures.len() == 1 && r.failures[0].reason == "foreign_service",
        || format!("foreign clash: {r:?}"),
    )?;
    set.remove(&tcp(v4(10, 9, 9, 9), 80));

    // Everything gone: ours are deleted, the foreign service stays as it was.
    let r = apply(&ns, &mut dp, &BTreeMap::new())?;
    ensure(r.writes == 4 && r.services == 0, || {
        format!("removal: {r:?}")
    })?;
    let left = saved(&ns)?;
    ensure(
        left == [
            "-A -t 10.9.9.9:80 -s rr",
            "-a -t 10.9.9.9:80 -r 10.1.9.1:80 -m -w 1",
        ],
        || format!("left behind: {left:#?}"),
    )
}

/// A service the kernel refuses (no such scheduler module) fails alone: the others are
/// programmed, the failure names the service and the kernel's error, and it converges once
/// it is fixed. The masquerade rules and sysctls follow the services.
fn dataplane_isolates_a_bad_service() -> CaseResult {
    let ns = GuestNetns::create("isolate")?;
    let state = PathBuf::from("/run/isolate-state");
    let mut dp = dataplane(state);
    let vip = v4(192, 0, 2, 50);
    let mut set: ServiceSet = (1..=5u16)
        .map(|p| {
            let mut s = spec(Forwarding::Masquerade, &[(v4(10, 1, 0, 1), 8000 + p, 1)]);
            s.source_nat = true;
            (tcp(vip, p), s)
        })
        .collect();
    set.get_mut(&tcp(vip, 3)).unwrap().scheduler = "no-such".into();
    let r = apply(&ns, &mut dp, &set)?;
    ensure(r.failures.len() == 1 && r.services == 4, || {
        format!("{r:?}")
    })?;
    let f = &r.failures[0];
    ensure(
        f.key == tcp(vip, 3) && f.error.contains("192.0.2.50:3") && f.error.contains("ENOENT"),
        || format!("failure: {f:?}"),
    )?;
    let ruleset = ns.exec("nft", &["list", "table", "inet", "ferrovip"])?;
    ensure(
        ruleset.contains("192.0.2.50 . tcp . 1") && ruleset.contains("masquerade"),
        || ruleset.clone(),
    )?;
    let conntrack = ns.exec("cat", &["/proc/sys/net/ipv4/vs/conntrack"])?;
    ensure(conntrack.trim() == "1", || {
        format!("vs.conntrack is {conntrack}")
    })?;

    set.get_mut(&tcp(vip, 3)).unwrap().scheduler = "rr".into();
    let r = apply(&ns, &mut dp, &set)?;
    ensure(
        r.failures.is_empty() && r.services == 5 && r.writes == 2,
        || format!("after the fix: {r:?}"),
    )?;

    let r = apply(&ns, &mut dp, &BTreeMap::new())?;
    ensure(r.services == 0, || format!("{r:?}"))?;
    let gone = ns.exec("nft", &["list", "tables"])?;
    ensure(!gone.contains("ferrovip"), || {
        format!("table left behind: {gone}")
    })?;
    let conntrack = ns.exec("cat", &["/proc/sys/net/ipv4/vs/conntrack"])?;
    ensure(conntrack.trim() == "0", || {
        format!("vs.conntrack left at {conntrack}")
    })
}

struct Agent {
    child: Child,
    log: PathBuf,
}

/// Where an agent reads its VirtualIPs from.
#[derive(Debug, Clone, Copy)]
enum Source<'a> {
    /// Standalone mode: this manifest file.
    Manifests(&'a str),
    /// Kubernetes mode: the host's API server, as the node's identity.
    Kubernetes,
}

impl Agent {
    fn start(ns: &GuestNetns, node: &str, manifest: &str) -> Result<Agent, vm::CaseError> {
        Agent::start_with(ns, node, Source::Manifests(manifest), &[], "")
    }

    /// An agent with extra arguments; `run` tells the log files of restarts apart.
    fn start_with(
        ns: &GuestNetns,
        node: &str,
        source: Source,
        extra: &[&str],
        run: &str,
    ) -> Result<Agent, vm::CaseError> {
        let log = PathBuf::from(format!("/tmp/agent-{}-{node}{run}.log", ns.name()));
        let mut command = Command::new("ip");
        command.args([
            "netns",
            "exec",
            ns.name(),
            &vm::agent(),
            "agent",
            "--node-name",
            node,
        ]);
        match source {
            Source::Manifests(path) => command.args(["--manifests", path]),
            Source::Kubernetes => command.env("KUBECONFIG", vm::cluster::node_kubeconfig(node)),
        };
        let child = command
            .args(["--metrics-addr", "127.0.0.1:9646", "--log-format", "json"])
            // Per namespace: a state directory describes one kernel's tables and sysctls.
            .args(["--state-dir", &format!("/run/ferrovip-{}", ns.name())])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        Ok(Agent { child, log })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (a restart: with `--restart-hold` the addresses are held), then waits.
    fn terminate(&mut self) -> CaseResult {
        let pid = self.child.id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        ensure(status.success(), || format!("kill -TERM {pid} failed"))?;
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if self.child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(format!("the agent did not exit after SIGTERM:\n{}", self.log()).into())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The transition lines of every agent log whose path starts with `prefix`, by file.
fn transitions_logged(prefix: &str) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.to_string_lossy().starts_with(prefix))
        .collect();
    files.sort();
    let mut out = String::new();
    for file in files {
        out.push_str(&format!("{}:\n", file.display()));
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("\"transition\"")) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The agent's metrics, fetched over HTTP inside its namespace.
fn scrape(ns: &GuestNetns) -> Result<String, vm::CaseError> {
    let text = ns
        .run(|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, 9646));
            let mut stream = std::net::TcpStream::connect_timeout(&addr, TIMEOUT)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut text = String::new();
            stream.read_to_string(&mut text)?;
            Ok(text)
        })?
        .map_err(|e| format!("scraping the metrics of the agent in {}: {e}", ns.name()))?;
    Ok(text)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> CaseResult {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(format!("timed out after {timeout:?} waiting for {what}").into())
}

fn manifest(backends: &[(&str, u32)]) -> String {
    let mut eps = String::new();
    for (addr, w) in backends {
        eps.push_str(&format!(
            "          - {{address: {addr}, port: 8080, weight: {w}}}\n"
        ));
    }
    format!(
        "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata: {{name: web}}\nspec:\n  addresses: [198.51.100.100/24]\n  interface: eth0\n  virtualRouterId: 51\n  vrrp: {{advertisementInterval: 100ms}}\n  priority:\n    preferredNodes: [{{nodeName: d1, weight: 50}}]\n  services:\n    - port: 80\n      scheduler: wrr\n      backends:\n        endpoints:\n{eps}"
    )
}

/// The two-director segment of the agent cases, named `<prefix>-…`: a client (.2) and
/// directors d1 (.11) and d2 (.12) on a front bridge (198.51.100.0/24); the directors (.1,
/// .2) and `n` backends (.11, …) on a back bridge (203.0.113.0/24), each backend answering TCP
/// port 8080 with its name. Dropped in reverse field order, servers first.
struct Directors {
    servers: Vec<TcpNameServer>,
    back: GuestBridge,
    front: GuestBridge,
    backends: Vec<GuestNetns>,
    d2: GuestNetns,
    d1: GuestNetns,
    client: GuestNetns,
}

impl Directors {
    fn create(prefix: &str, n: usize) -> Result<Directors, vm::CaseError> {
        let client = GuestNetns::create(&format!("{prefix}-client"))?;
        let d1 = GuestNetns::create(&format!("{prefix}-d1"))?;
        let d2 = GuestNetns::create(&format!("{prefix}-d2"))?;
        let backends = (1..=n)
            .map(|i| GuestNetns::create(&format!("{prefix}-b{i}")))
            .collect::<Result<Vec<_>, _>>()?;
        let front = GuestBridge::create(&format!("{prefix}-front"))?;
        let back = GuestBridge::create(&format!("{prefix}-back"))?;
        front.attach(&client, "eth0", &["198.51.100.2/24"])?;
        front.attach(&d1, "eth0", &["198.51.100.11/24"])?;
        front.attach(&d2, "eth0", &["198.51.100.12/24"])?;
        back.attach(&d1, "eth1", &["203.0.113.1/24"])?;
        back.attach(&d2, "eth1", &["203.0.113.2/24"])?;
        for (i, b) in backends.iter().enumerate() {
            back.attach(b, "eth0", &[&format!("203.0.113.{}/24", 11 + i)])?;
        }
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 8080);
        let servers = backends
            .iter()
            .map(|b| TcpNameServer::start(b, any, b.name()))
            .collect::<Result<_, _>>()?;
        Ok(Directors {
            servers,
            back,
            front,
            backends,
            d2,
            d1,
            client,
        })
    }
}

/// Two directors run the agent: both program the service, the master holds the VIP.
/// Traffic through the VIP reaches every backend by weight; backends change while a client
/// keeps connecting; the master is killed and the backup forwards at once.
fn agent_forwards_through_changes_and_failover() -> CaseResult {
    let Directors {
        client,
        d1,
        d2,
        backends: _backends,
        front: _front,
        back: _back,
        servers: _servers,
    } = Directors::create("af", 3)?;

    let path = "/tmp/af-web.yaml";
    std::fs::write(
        path,
        manifest(&[
            ("203.0.113.11", 1),
            ("203.0.113.12", 1),
            ("203.0.113.13", 2),
        ]),
    )?;
    let a1 = Agent::start(&d1, "d1", path)?;
    let a2 = Agent::start(&d2, "d2", path)?;
    let vip = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 100), 80));
    let has_vip = |ns: &GuestNetns| {
        ns.ip(&["-4", "addr", "show", "dev", "eth0"])
            .is_ok_and(|o| o.contains("198.51.100.100/"))
    };
    wait_for("d1 to hold the VIP", Duration::from_secs(10), || {
        has_vip(&d1)
    })
    .map_err(|e| format!("{e}\nd1 log:\n{}", a1.log()))?;
    // Both directors program the service; only the master holds the address.
    for ns in [&d1, &d2] {
        wait_for(
            "the service on both directors",
            Duration::from_secs(10),
            || {
                saved(ns).is_ok_and(|l| {
                    l.iter()
                        .filter(|l| l.starts_with("-a -t 198.51.100.100:80"))
                        .count()
                        == 3
                })
            },
        )
        .map_err(|e| format!("{e} ({}): {:?}\nlog:\n{}", ns.name(), saved(ns), a2.log()))?;
    }
    ensure(!has_vip(&d2), || "both directors hold the VIP".into())?;
    // Both export the table they programmed; d1 is master.
    for (ns, state) in [(&d1, "2"), (&d2, "1")] {
        let metrics = scrape(ns)?;
        for want in [
            "ferrovip_dataplane_available{dataplane=\"ipvs\"} 1",
            "ferrovip_ipvs_services 1",
            "ferrovip_ipvs_destinations 3",
        ] {
            ensure(metrics.contains(want), || {
                format!("{}: {want} missing:\n{metrics}", ns.name())
            })?;
        }
        ensure(
            metrics.lines().any(|l| {
                l.starts_with("ferrovip_vrrp_state{") && l.ends_with(&format!(" {state}"))
            }),
            || format!("{}: VRRP state {state} missing:\n{metrics}", ns.name()),
        )?;
    }

    let mut a1 = a1;
    // wrr with weights 1:1:2 over 40 connections.
    let replies = tcp_spread(&client, vip, 40, TIMEOUT)?;
    ensure(
        replies.get("af-b1") == Some(&10)
            && replies.get("af-b2") == Some(&10)
            && replies.get("af-b3") == Some(&20),
        || format!("wrr 1:1:2 gave {replies:?}"),
    )?;

    // A client connects all the time while the backends change and the master dies.
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let mut changed_at = Duration::ZERO;
    let (applied, killed_at, takeover, (ok, failed)) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut ok = 0usize;
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match tcp_request(&client, vip, Duration::from_millis(500)) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push((started.elapsed(), e.to_string())),
                }
            }
            (ok, failed)
        });
        let result = (|| -> Result<(Duration, Duration, Duration), vm::CaseError> {
            std::thread::sleep(Duration::from_millis(500));
            // b3 leaves, b1 drains (weight 0): new connections go to b2 only.
            let changed = Instant::now();
            changed_at = changed.duration_since(started);
            std::fs::write(path, manifest(&[("203.0.113.11", 0), ("203.0.113.12", 1)]))?;
            wait_for("the change on d1", Duration::from_secs(5), || {
                saved(&d1).is_ok_and(|l| {
                    l.iter()
                        .filter(|l| l.starts_with("-a -t 198.51.100.100:80"))
                        .count()
                        == 2
                })
            })?;
            let applied = changed.elapsed();
            std::thread::sleep(Duration::from_millis(500));
            // Kill the master: the backup already has the service and forwards as soon as it
            // holds the address.
            let killed = Instant::now();
            a1.kill();
            wait_for("d2 to take over", Duration::from_secs(5), || has_vip(&d2))?;
            let takeover = killed.elapsed();
            std::thread::sleep(Duration::from_millis(1000));
            Ok((applied, killed.duration_since(started), takeover))
        })();
        stop.store(true, Ordering::Relaxed);
        let traffic = traffic.join().expect("traffic thread");
        result.map(|(a, k, t)| (a, k, t, traffic))
    })?;
    let after = tcp_spread(&client, vip, 10, TIMEOUT)?;
    ensure(after.get("af-b2") == Some(&10), || {
        format!("through d2 after the change: {after:?}")
    })?;
    println!(
        "config change on d1 applied after {applied:.2?}; d2 took over {takeover:.2?} after the kill; \
         {ok} connections served, {} failed at {:?}",
        failed.len(),
        failed.iter().map(|(t, _)| *t).collect::<Vec<_>>()
    );
    ensure(ok > 20, || format!("only {ok} connections succeeded"))?;
    // Connections may fail only when they were in flight to the removed backend as it left,
    // and between the kill and the takeover (each window plus one attempt's timeout).
    let slack = Duration::from_millis(600);
    let windows = [
        changed_at..changed_at + applied + slack,
        killed_at..killed_at + takeover + slack,
    ];
    let outside: Vec<&(Duration, String)> = failed
        .iter()
        .filter(|(t, _)| !windows.iter().any(|w| w.contains(t)))
        .collect();
    ensure(outside.is_empty(), || {
        format!(
            "connections failed outside the change and failover windows {windows:?}: {outside:?}"
        )
    })?;
    drop(a2);
    Ok(())
}

/// Restarts of the backup's and the master's agent (with and without `--restart-hold`) while
/// a client connects through the VIP all the time: the new agent adopts the IPVS services,
/// the nft table and the sysctls its predecessor left with no write at all (its write counter
/// stays 0; the kernel's table, the nft table's handle and the services' connection counters
/// show the same), and no connection fails. The one exception allowed (and counted) is the
/// master's restart without a hold: VRRP then hands the VIP to the backup and takes it back
/// by design, and on a loaded emulated guest a connection may fail while the address moves.
/// Standalone mode: the backends are listed in the manifest.
fn agent_restarts_adopt_the_dataplane_without_a_write() -> CaseResult {
    restarts_adopt_the_dataplane_without_a_write(false)
}

/// [`agent_restarts_adopt_the_dataplane_without_a_write`] in Kubernetes mode (issue 9, item
/// 1): the agents run against the host's API server (v1.20) with their nodes' identities,
/// and the backends come from a `serviceRef` (a Service and its EndpointSlice, v1beta1).
/// A restarted agent must hand the dataplane nothing before every watch (Services and
/// EndpointSlices included) has listed: a plan made earlier resolves the `serviceRef` to no
/// backends, which would delete both (writes, a changed table, failed connections, and the
/// sampler seeing the backends gone).
fn k8s_agent_restarts_adopt_the_dataplane_without_a_write() -> CaseResult {
    restarts_adopt_the_dataplane_without_a_write(true)
}

/// The Kubernetes objects of the restart test: Nodes, the backends' Service and EndpointSlice,
/// and the VirtualIP `web` forwarding to them through a `serviceRef`; deleted by `cleanup`.
fn restart_objects(admin: &vm::cluster::Admin, cleanup: &mut vm::cluster::Cleanup) -> CaseResult {
    admin.create_if_absent(&vm::cluster::node("d1", "198.51.100.11"))?;
    admin.create_if_absent(&vm::cluster::node("d2", "198.51.100.12"))?;
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-backends", "namespace": "default"},
        "spec": {"clusterIP": "None",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    })))?;
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "web-backends-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web-backends"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["203.0.113.11"], "conditions": {"ready": true}},
            {"addresses": ["203.0.113.12"], "conditions": {"ready": true}},
        ],
    })))?;
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "ferrovip.io/v1alpha1", "kind": "VirtualIP",
        "metadata": {"name": "web"},
        "spec": {
            "addresses": ["198.51.100.100/24"],
            "interface": "eth0",
            "virtualRouterId": 51,
            // Not 100 ms as in standalone mode: an agent starting in Kubernetes mode (TLS,
            // lists) starves the emulated CPUs enough that a backup sometimes misses 350 ms of
            // adverts, and a false failover moves the VIP, which is not what this measures.
            "vrrp": {"advertisementInterval": "500ms"},
            "priority": {"preferredNodes": [{"nodeName": "d1", "weight": 50}]},
            "services": [{"port": 80, "scheduler": "wrr", "backends": {"serviceRef":
                {"namespace": "default", "name": "web-backends", "port": "http"}}}],
        },
    })))?;
    Ok(())
}

fn restarts_adopt_the_dataplane_without_a_write(kubernetes: bool) -> CaseResult {
    let p = if kubernetes { "rk" } else { "rs" };
    let Directors {
        client,
        d1,
        d2,
        backends: _backends,
        front: _front,
        back: _back,
        servers: _servers,
    } = Directors::create(p, 2)?;
    let path = "/tmp/rs-web.yaml";
    let admin = kubernetes.then(vm::cluster::Admin::connect).transpose()?;
    let mut cleanup = admin.as_ref().map(vm::cluster::Cleanup::new);
    let source = if let (Some(admin), Some(cleanup)) = (&admin, &mut cleanup) {
        // The directors reach the host's API server through the uplink.
        attach_uplink(&d1, "eth2", "100.64.0.11/24")?;
        attach_uplink(&d2, "eth2", "100.64.0.12/24")?;
        restart_objects(admin, cleanup)?;
        Source::Kubernetes
    } else {
        std::fs::write(path, manifest(&[("203.0.113.11", 1), ("203.0.113.12", 1)]))?;
        Source::Manifests(path)
    };
    let vip = SocketAddr::from((Ipv4Addr::new(198, 51, 100, 100), 80));
    let has_vip = |ns: &GuestNetns| {
        ns.ip(&["-4", "addr", "show", "dev", "eth0"])
            .is_ok_and(|o| o.contains("198.51.100.100/"))
    };
    let programmed = |ns: &GuestNetns| {
        saved(ns).is_ok_and(|l| {
            l.iter()
                .filter(|l| l.starts_with("-a -t 198.51.100.100:80"))
                .count()
                == 2
        })
    };
    // Long enough for a debug agent to start on a loaded TCG guest (5-9 s seen).
    let hold = ["--restart-hold", "15s"];
    let mut d1_agent = Agent::start_with(&d1, "d1", source, &hold, ".0")?;
    let mut d2_agent = Agent::start_with(&d2, "d2", source, &hold, ".0")?;
    wait_for("d1 to hold the VIP", Duration::from_secs(30), || {
        has_vip(&d1)
    })
    .map_err(|e| format!("{e}\nd1 log:\n{}", d1_agent.log()))?;
    for ns in [&d1, &d2] {
        wait_for(
            "the service on both directors",
            Duration::from_secs(30),
            || programmed(ns),
        )?;
    }
    // The kernel's view, to compare after each restart: the table, the nft table with its
    // handle (a rewritten table gets a new one) and the sysctls.
    let kernel_view = |ns: &GuestNetns| -> Result<String, vm::CaseError> {
        let mut view = saved(ns)?.join("\n");
        view.push('\n');
        view.push_str(&ns.exec("nft", &["-a", "list", "table", "inet", "ferrovip"])?);
        for sysctl in [
            "/proc/sys/net/ipv4/vs/conntrack",
            "/proc/sys/net/ipv4/vs/expire_nodest_conn",
            "/proc/sys/net/ipv4/ip_forward",
        ] {
            view.push_str(&format!("{sysctl} {}", ns.exec("cat", &[sysctl])?));
        }
        Ok(view)
    };
    // Connections the service counted so far (reset if it were deleted and re-added).
    let connections = |ns: &GuestNetns| -> Result<u64, vm::CaseError> {
        let stats = ns.exec("ipvsadm", &["-Ln", "--stats", "-t", "198.51.100.100:80"])?;
        stats
            .lines()
            .find(|l| l.starts_with("TCP"))
            .and_then(|l| l.split_whitespace().nth(2))
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("no service stats in {stats}").into())
    };
    let metric = |ns: &GuestNetns, name: &str| -> Result<Option<f64>, vm::CaseError> {
        Ok(scrape(ns)?
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok()))
    };

    let connect_timeout = Duration::from_secs(if kubernetes { 4 } else { 2 });
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    // What happened, when (from the SIGTERM to the VIP settled back on d1), whether the VIP
    // moves by design.
    type Restart = (String, std::ops::Range<Duration>, bool);
    let (restarts, (ok, failed), gaps) = std::thread::scope(|scope| {
        // Both directors' tables, sampled throughout over netlink (cheaper than ipvsadm on
        // the emulated CPUs): the service with both backends.
        let sampler = scope.spawn(|| {
            let key = netlink::ServiceKey::Addr {
                protocol: netlink::Protocol::Tcp,
                addr: v4(198, 51, 100, 100),
                port: 80,
            };
            let backends = |ns: &GuestNetns| {
                ns.run(|| {
                    IpvsClient::connect()
                        .and_then(|mut c| c.destinations(&key))
                        .map_or(0, |d| d.len())
                })
                .unwrap_or(0)
            };
            let mut gaps = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for ns in [&d1, &d2] {
                    let n = backends(ns);
                    if n != 2 {
                        gaps.push((started.elapsed(), ns.name().to_owned(), n));
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            gaps
        });
        let traffic = scope.spawn(|| {
            let mut ok = 0usize;
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                // A client with a usual connect timeout: a SYN lost and retransmitted after
                // 1 s (an emulated guest starved of CPU) is not a failed connection. In
                // Kubernetes mode a starting agent (TLS, lists) starves the emulated CPUs
                // longer, and restart windows are longer: the second retransmission (3 s) is
                // waited for too. A dataplane that dropped the backends for a while is caught
                // by the sampler, the write counter and the table comparison instead.
                // Failures are timed by when the attempt began: a restart can fail only the
                // attempts made while it is under way.
                let attempt = started.elapsed();
                match tcp_request(&client, vip, connect_timeout) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        let cause = std::error::Error::source(&e)
                            .map(|c| format!(": {c}"))
                            .unwrap_or_default();
                        failed.push((attempt, format!("{e}{cause}")))
                    }
                }
            }
            (ok, failed)
        });
        let result = (|| -> Result<Vec<Restart>, vm::CaseError> {
            let mut restarts = Vec::new();
            std::thread::sleep(Duration::from_millis(500));
            let steps: [(&str, bool); 4] =
                [("d2", true), ("d1", true), ("d2", false), ("d1", false)];
            for (run, (node, with_hold)) in steps.into_iter().enumerate() {
                let (ns, agent) = if node == "d1" {
                    (&d1, &mut d1_agent)
                } else {
                    (&d2, &mut d2_agent)
                };
                let before = kernel_view(ns)?;
                let counted = connections(ns)?;
                // From just before the SIGTERM (an attempt a few milliseconds old is still in
                // flight) to the VIP settled on d1 again.
                let window_start = started.elapsed().saturating_sub(Duration::from_millis(100));
                agent.terminate()?;
                let args: &[&str] = if with_hold { &hold } else { &[] };
                if kubernetes && !with_hold {
                    // Without a saved snapshot the new agent must wait until every watch has
                    // listed (the path of issue 9); with one it may start from it when listing
                    // takes longer than its grace, as it often does on this emulated guest.
                    let saved = format!("/run/ferrovip-{}/{CACHE_FILE}", ns.name());
                    std::fs::remove_file(&saved).map_err(|e| format!("{saved}: {e}"))?;
                }
                let restarted = Instant::now();
                *agent = Agent::start_with(ns, node, source, args, &format!(".{}", run + 1))?;
                let applied = r#"ferrovip_dataplane_apply_total{dataplane="ipvs",result="ok"}"#;
                wait_for(
                    "the new agent's first apply",
                    Duration::from_secs(30),
                    || metric(ns, applied).is_ok_and(|v| v.is_some_and(|v| v >= 1.0)),
                )
                .map_err(|e| format!("{e}\n{node} log:\n{}", agent.log()))?;
                let took = restarted.elapsed();
                let planned_from = if kubernetes {
                    // A plan from a saved snapshot comes before the lists: the plan from the
                    // listed state must write nothing either.
                    wait_for(
                        "the new agent to list the cluster state",
                        Duration::from_secs(30),
                        || agent.log().contains("cluster state listed"),
                    )
                    .map_err(|e| format!("{e}\n{node} log:\n{}", agent.log()))?;
                    std::thread::sleep(Duration::from_secs(3));
                    if agent
                        .log()
                        .contains("starting from the saved cluster snapshot")
                    {
                        "the saved snapshot, then the lists"
                    } else {
                        "the lists"
                    }
                } else {
                    "the manifest"
                };
                let writes = metric(ns, r#"ferrovip_dataplane_writes_total{dataplane="ipvs"}"#)?;
                ensure(writes == Some(0.0), || {
                    format!(
                        "{node} restarted (hold {with_hold}): {writes:?} IPVS writes\nlog:\n{}",
                        agent.log()
                    )
                })?;
                let after = kernel_view(ns)?;
                ensure(before == after, || {
                    format!("{node}'s kernel changed across the restart:\n{before}\n----\n{after}")
                })?;
                let counted_after = connections(ns)?;
                ensure(counted_after >= counted, || {
                    format!(
                        "{node}: the service's counters went from {counted} to {counted_after}: it was re-created"
                    )
                })?;
                ensure(!agent.log().contains("dataplane applied"), || {
                    format!("{node} logged a dataplane write:\n{}", agent.log())
                })?;
                // Let VRRP settle (the master preempts back after a restart without hold).
                wait_for("d1 to hold the VIP again", Duration::from_secs(30), || {
                    has_vip(&d1) && !has_vip(&d2)
                })?;
                let window = window_start..started.elapsed();
                std::thread::sleep(Duration::from_millis(700));
                restarts.push((
                    format!(
                        "{node} (restart-hold {with_hold}): first apply {took:.2?} after the start, planned from {planned_from}, 0 writes, window {window:.2?}"
                    ),
                    window,
                    // The master's agent leaving without a hold hands the VIP over (priority
                    // 0) and takes it back: the one restart where VRRP moves the address.
                    node == "d1" && !with_hold,
                ));
            }
            Ok(restarts)
        })();
        stop.store(true, Ordering::Relaxed);
        let traffic = traffic.join().expect("traffic thread");
        let gaps = sampler.join().expect("sampler thread");
        result.map(|r| (r, traffic, gaps))
    })?;
    let during = |t: &Duration, moves: bool| {
        restarts
            .iter()
            .any(|(_, window, m)| *m == moves && window.contains(t))
    };
    let moved = failed.iter().filter(|(t, _)| during(t, true)).count();
    let unexpected: Vec<_> = failed.iter().filter(|(t, _)| during(t, false)).collect();
    println!(
        "restarts: {}; {ok} connections served, {} failed, attempts begun at {:?} ({moved} while \
         VRRP moved the VIP for the master's restart without a hold, the others outside every \
         restart)",
        restarts
            .iter()
            .map(|(s, _, _)| s.as_str())
            .collect::<Vec<_>>()
            .join("; "),
        failed.len(),
        failed.iter().map(|(t, _)| *t).collect::<Vec<_>>(),
    );
    ensure(ok > 20, || format!("only {ok} connections succeeded"))?;
    ensure(gaps.is_empty(), || {
        format!("a director's table lacked a backend at (time, director, backends): {gaps:?}")
    })?;
    ensure(unexpected.is_empty(), || {
        format!(
            "connections failed during restarts that keep the VIP in place: {unexpected:?}\n\
             VRRP transitions of every agent:\n{}",
            transitions_logged(&format!("/tmp/agent-{p}-"))
        )
    })?;
    Ok(())
}

/// Issue 10's whole traffic path on real components: a LoadBalancerPool (`forwarding: IPVS`)
/// and a Service of `type: LoadBalancer` created on the host's API server (v1.20), its
/// allocation record, two agents in Kubernetes mode in guest namespaces: the master holds the
/// address, and a client's TCP connections through it reach the Service's endpoints (from its
/// EndpointSlice) through the guest's real IPVS, before and after the master's agent is killed
/// (the backup takes the address over and forwards at once).
fn k8s_service_load_balancer_through_ipvs_and_failover() -> CaseResult {
    let Directors {
        client,
        d1,
        d2,
        backends: _backends,
        front: _front,
        back: _back,
        servers: _servers,
    } = Directors::create("lb", 2)?;
    attach_uplink(&d1, "eth2", "100.64.0.11/24")?;
    attach_uplink(&d2, "eth2", "100.64.0.12/24")?;

    // For the metrics: a standalone agent on a segment of its own. Once it has recorded its
    // (empty) IPVS table, a service at its VIP is created by hand, then the VirtualIP asks for
    // that service: the kernel refuses it (EEXIST), a dataplane error.
    let alone_ns = GuestNetns::create("lb-m")?;
    let alone = GuestBridge::create("lb-alone")?;
    alone.attach(&alone_ns, "eth0", &["192.0.2.2/24"])?;
    let alone_manifest = "/tmp/lb-m.yaml";
    let alone_vip = "apiVersion: ferrovip.io/v1alpha1\nkind: VirtualIP\nmetadata:\n  name: foreign\n\
                     spec:\n  addresses: [\"192.0.2.150/32\"]\n  interface: eth0\n  virtualRouterId: 77\n";
    std::fs::write(alone_manifest, alone_vip)?;
    let alone_agent = Agent::start(&alone_ns, "m", alone_manifest)?;
    wait_for(
        "the standalone agent's first apply",
        Duration::from_secs(20),
        || {
            alone_agent.log().contains("dataplane applied")
                || alone_agent.log().contains("first complete plan")
        },
    )
    .map_err(|e| format!("{e}\n{}", alone_agent.log()))?;
    std::thread::sleep(Duration::from_millis(500));
    alone_ns.exec("ipvsadm", &["-A", "-t", "192.0.2.150:80", "-s", "rr"])?;
    std::fs::write(
        alone_manifest,
        format!(
            "{alone_vip}  services:\n    - port: 80\n      backends:\n        \
             endpoints: [{{address: 192.0.2.5, port: 8080}}]\n"
        ),
    )?;

    let admin = vm::cluster::Admin::connect()?;
    let mut cleanup = vm::cluster::Cleanup::new(&admin);
    admin.create_if_absent(&vm::cluster::node("d1", "198.51.100.11"))?;
    admin.create_if_absent(&vm::cluster::node("d2", "198.51.100.12"))?;
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "ferrovip.io/v1alpha1", "kind": "LoadBalancerPool",
        "metadata": {"name": "vm-pool"},
        "spec": {
            "addresses": ["198.51.100.200-198.51.100.209"],
            "template": {
                "interface": "eth0",
                // 500 ms as in the restart test: emulator starvation is not what this measures.
                "vrrp": {"advertisementInterval": "500ms"},
                "priority": {"preferredNodes": [{"nodeName": "d1", "weight": 50}]},
                "forwarding": "IPVS",
                "scheduler": "rr",
            },
        },
    })))?;
    // Class-less: v1.20 drops spec.loadBalancerClass, and class-less Services are served.
    let service = cleanup.track(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-lb", "namespace": "default"},
        "spec": {"type": "LoadBalancer",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    }));
    admin.apply(&service)?;
    let created = Instant::now();
    // A Service asking for a pool that does not exist: an allocation failure for the metrics.
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-lb-nopool", "namespace": "default",
                     "annotations": {"ferrovip.io/pool": "vm-no-such-pool"}},
        "spec": {"type": "LoadBalancer",
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
    })))?;
    // No controller manager: the EndpointSlice is written as it would.
    admin.apply(&cleanup.track(serde_json::json!({
        "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
        "metadata": {"name": "web-lb-1", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "web-lb"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["203.0.113.11"], "conditions": {"ready": true}},
            {"addresses": ["203.0.113.12"], "conditions": {"ready": true}},
        ],
    })))?;
    // The agents run the Service controller too: one of them takes its Lease and allocates.
    let mut d1_agent = Agent::start_with(&d1, "d1", Source::Kubernetes, &[], ".lb")?;
    let d2_agent = Agent::start_with(&d2, "d2", Source::Kubernetes, &[], ".lb")?;
    let address = allocated_by_the_controller(&admin, &service).map_err(|e| {
        format!(
            "{e}\nd1 log:\n{}\nd2 log:\n{}",
            d1_agent.log(),
            d2_agent.log()
        )
    })?;
    let allocated = created.elapsed();
    // The lowest free address of the pool.
    ensure(address == v4(198, 51, 100, 200), || {
        format!("allocated {address}, not the pool's first address")
    })?;
    let vip = SocketAddr::new(address, 80);
    let has_vip = |ns: &GuestNetns| {
        ns.ip(&["-4", "addr", "show", "dev", "eth0"])
            .is_ok_and(|o| o.contains(&format!("{address}/32")))
    };
    let programmed = |ns: &GuestNetns| {
        saved(ns).is_ok_and(|l| {
            l.iter()
                .filter(|l| l.starts_with(&format!("-a -t {address}:80 -r 203.0.113.1")))
                .count()
                == 2
        })
    };
    wait_for(
        "d1 to hold the Service's address",
        Duration::from_secs(60),
        || has_vip(&d1),
    )
    .map_err(|e| format!("{e}\nd1 log:\n{}", d1_agent.log()))?;
    let held = created.elapsed();
    for ns in [&d1, &d2] {
        wait_for(
            "the Service's port in IPVS with both endpoints",
            Duration::from_secs(30),
            || programmed(ns),
        )
        .map_err(|e| {
            format!(
                "{e} ({})\n{}",
                ns.name(),
                saved(ns).unwrap_or_default().join("\n")
            )
        })?;
    }
    ensure(!has_vip(&d2), || "d2 holds the address too".into())?;
    let spread = tcp_spread(&client, vip, 10, TIMEOUT)?;
    ensure(
        spread.get("lb-b1") == Some(&5) && spread.get("lb-b2") == Some(&5),
        || format!("connections through {vip} before the failover: {spread:?}"),
    )?;
    // The master says so on the Service (kubectl shows which node holds the address).
    admin.wait(
        &service,
        "the master annotation naming d1",
        Duration::from_secs(30),
        |s| s["metadata"]["annotations"]["ferrovip.io/master"] == format!("{address}=d1"),
    )?;

    // What the agents export, for the dashboard's and alerts' names (checked at the end).
    let mut exported = exported_names(&scrape(&d1)?);
    exported.extend(exported_names(&scrape(&d2)?));

    // The master's agent dies; a client keeps connecting.
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let (killed_at, took_over, (ok, failed)) = std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut ok = BTreeMap::<String, usize>::new();
            let mut failed = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let attempt = started.elapsed();
                match tcp_request(&client, vip, Duration::from_secs(2)) {
                    Ok(reply) => *ok.entry(reply).or_insert(0) += 1,
                    Err(e) => failed.push((attempt, e.to_string())),
                }
            }
            (ok, failed)
        });
        let result = (|| -> Result<(Duration, Duration), vm::CaseError> {
            std::thread::sleep(Duration::from_secs(1));
            let killed_at = started.elapsed();
            d1_agent.kill();
            let killed = Instant::now();
            wait_for(
                "d2 to take the address over",
                Duration::from_secs(10),
                || has_vip(&d2),
            )?;
            let took_over = killed.elapsed();
            // The dead agent's address expires by its lifetime (1 s by default).
            wait_for("the address to leave d1", Duration::from_secs(10), || {
                !has_vip(&d1)
            })?;
            std::thread::sleep(Duration::from_secs(2));
            Ok((killed_at, took_over))
        })();
        stop.store(true, Ordering::Relaxed);
        let traffic = traffic.join().expect("traffic thread");
        result.map(|(k, t)| (k, t, traffic))
    })?;
    // Connections may fail only between the kill and the takeover (plus one attempt's
    // timeout and the address leaving the dead master).
    let window = killed_at..killed_at + took_over + Duration::from_secs(3);
    let outside: Vec<_> = failed.iter().filter(|(t, _)| !window.contains(t)).collect();
    println!(
        "Service {address} allocated {allocated:.2?} after its creation (agents started \
         alongside), held by d1 after {held:.2?}; d1 killed, d2 took over after \
         {took_over:.2?}; replies by backend {ok:?}, {} failed at {:?}",
        failed.len(),
        failed.iter().map(|(t, _)| *t).collect::<Vec<_>>()
    );
    ensure(outside.is_empty(), || {
        format!("connections failed outside the failover window {window:?}: {outside:?}")
    })?;
    ensure(
        ok.get("lb-b1").is_some_and(|n| *n > 3) && ok.get("lb-b2").is_some_and(|n| *n > 3),
        || format!("both endpoints must serve through the failover: {ok:?}"),
    )?;
    let after = tcp_spread(&client, vip, 10, TIMEOUT)?;
    ensure(
        after.get("lb-b1") == Some(&5) && after.get("lb-b2") == Some(&5),
        || format!("connections through {vip} after the failover: {after:?}"),
    )?;
    admin.wait(
        &service,
        "the master annotation naming d2",
        Duration::from_secs(30),
        |s| s["metadata"]["annotations"]["ferrovip.io/master"] == format!("{address}=d2"),
    )?;
    // d2 after the failover (a master change seen, the controller's Lease taken over).
    wait_for(
        "d2 to lead the Service controller",
        Duration::from_secs(30),
        || scrape(&d2).is_ok_and(|m| m.lines().any(|l| l == "ferrovip_controller_leading 1")),
    )?;
    let metrics = scrape(&d2)?;
    exported.extend(exported_names(&metrics));
    wait_for(
        "the standalone agent's dataplane error",
        Duration::from_secs(10),
        || scrape(&alone_ns).is_ok_and(|m| m.contains("ferrovip_dataplane_errors_total{")),
    )
    .map_err(|e| format!("{e}\n{}", alone_agent.log()))?;
    exported.extend(exported_names(&scrape(&alone_ns)?));
    drop(alone_agent);
    let queried = chart_queried_names();
    ensure(queried.len() > 20, || {
        format!("too few names found in the chart's queries: {queried:?}")
    })?;
    let missing: Vec<&String> = queried.iter().filter(|n| !exported.contains(*n)).collect();
    ensure(missing.is_empty(), || {
        format!(
            "the chart's dashboard or alerts query metrics no agent exports: {missing:?}\n\
             exported: {exported:?}"
        )
    })?;
    println!(
        "all {} metric names of the chart's dashboard and alerts are exported",
        queried.len()
    );
    drop(d2_agent);
    Ok(())
}

/// The metric names of a Prometheus text exposition: every sample's name, and each declared
/// family (`# TYPE`; a histogram declares `_bucket`, `_sum` and `_count`).
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut words = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (words.next(), words.next())
                && name.starts_with("ferrovip_")
            {
                names.insert(name.to_owned());
                if kind == "histogram" {
                    for suffix in ["_bucket", "_sum", "_count"] {
                        names.insert(format!("{name}{suffix}"));
                    }
                }
            }
        } else if !line.starts_with('#') {
            let name: String = line
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
                .collect();
            if name.starts_with("ferrovip_") {
                names.insert(name);
            }
        }
    }
    names
}

/// Every `ferrovip_*` name in a PromQL text.
fn promql_names(expr: &str, into: &mut std::collections::BTreeSet<String>) {
    let mut rest = expr;
    while let Some(at) = rest.find("ferrovip_") {
        let before_ok = rest[..at]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if before_ok {
            into.insert(name.clone());
        }
        rest = &rest[at + name.len()..];
    }
}

/// The metric names the chart's Grafana dashboard (every panel's `expr` and every templating
/// query) and its PrometheusRule (every rule's `expr`) query, read from the chart's files.
fn chart_queried_names() -> std::collections::BTreeSet<String> {
    const DASHBOARD: &str = include_str!("../charts/ferrovip/files/dashboard.json");
    const ALERTS: &str = include_str!("../charts/ferrovip/files/alerts.yaml");
    let mut names = std::collections::BTreeSet::new();
    fn walk(v: &serde_json::Value, names: &mut std::collections::BTreeSet<String>) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                            promql_names(s, names)
                        }
                        _ => walk(v, names),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, names)),
            _ => {}
        }
    }
    let dashboard: serde_json::Value =
        serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    walk(&dashboard, &mut names);
    // The alerts are a Helm template: its `{{ ... }}` are thresholds, not names.
    let mut plain = String::new();
    let mut rest = ALERTS;
    while let Some(open) = rest.find("{{") {
        plain.push_str(&rest[..open]);
        let close = rest[open..].find("}}").expect("a closed template action") + open + 2;
        plain.push('0');
        rest = &rest[close..];
    }
    plain.push_str(rest);
    let alerts: serde_json::Value = serde_saphyr::from_str(&plain).expect("the alerts are YAML");
    for group in alerts["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            promql_names(rule["expr"].as_str().expect("an expr"), &mut names);
        }
    }
    names
}

/// Waits until the Service controller (the agents' elected leader) has allocated an address
/// of pool `vm-pool` to `service`: the record, then the ingress status with the same address.
fn allocated_by_the_controller(
    admin: &vm::cluster::Admin,
    service: &serde_json::Value,
) -> Result<IpAddr, vm::CaseError> {
    let svc = admin.wait(
        service,
        "an address of vm-pool in the record and the status",
        Duration::from_secs(60),
        |s| {
            let record = s["metadata"]["annotations"]["ferrovip.io/allocated"].as_str();
            let ingress = s["status"]["loadBalancer"]["ingress"][0]["ip"].as_str();
            matches!((record, ingress), (Some(r), Some(i)) if r == format!("{i}@vm-pool"))
        },
    )?;
    Ok(svc["status"]["loadBalancer"]["ingress"][0]["ip"]
        .as_str()
        .unwrap_or_default()
        .parse()?)
}

/// A UDP server in a namespace answering every datagram with its name.
fn udp_name_server(
    ns: &GuestNetns,
    name: &str,
) -> Result<std::thread::JoinHandle<()>, vm::CaseError> {
    let socket = ns.run(|| std::net::UdpSocket::bind("[::]:5353"))??;
    socket.set_read_timeout(Some(Duration::from_secs(20)))?;
    let reply = name.to_owned();
    Ok(std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, peer)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(reply.as_bytes(), peer);
        }
    }))
}

fn udp_spread(
    ns: &GuestNetns,
    target: SocketAddr,
    n: usize,
) -> Result<BTreeMap<String, usize>, vm::CaseError> {
    let replies = ns.run(|| -> std::io::Result<BTreeMap<String, usize>> {
        let mut replies = BTreeMap::new();
        for _ in 0..n {
            // A new source port per query: IPVS schedules each as a new connection.
            let any: SocketAddr = if target.is_ipv4() {
                "0.0.0.0:0"
            } else {
                "[::]:0"
            }
            .parse()
            .unwrap();
            let socket = std::net::UdpSocket::bind(any)?;
            socket.set_read_timeout(Some(TIMEOUT))?;
            socket.send_to(b"who", target)?;
            let mut buf = [0u8; 64];
            let (len, _) = socket.recv_from(&mut buf)?;
            *replies
                .entry(String::from_utf8_lossy(&buf[..len]).into_owned())
                .or_insert(0) += 1;
        }
        Ok(replies)
    })??;
    Ok(replies)
}

/// Traffic through services the dataplane programmed, over a NAT return path it set up
/// itself (nftables masquerade and sysctls): TCP over IPv4 and IPv6 and UDP, to backends
/// that have no route to the client, spread evenly by rr.
fn dataplane_nat_traffic_tcp_udp_ipv4_ipv6() -> CaseResult {
    let client = GuestNetns::create("nt-client")?;
    let director = GuestNetns::create("nt-director")?;
    let backends = (1..=2)
        .map(|i| GuestNetns::create(&format!("nt-b{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let lan = GuestBridge::create("nt-lan")?;
    client.veth("eth0", &director, "eth0")?;
    for (ns, cidr) in [
        (&client, "198.51.100.2/24"),
        (&client, "2001:db8:c::2/64"),
        (&director, "198.51.100.1/24"),
        (&director, "2001:db8:c::1/64"),
        (&director, "198.51.100.100/32"),
        (&director, "2001:db8:c::100/128"),
    ] {
        ns.add_address(cidr, "eth0")?;
    }
    lan.attach(&director, "eth1", &["203.0.113.1/24", "fd00:b::1/64"])?;
    for (i, b) in backends.iter().enumerate() {
        lan.attach(
            b,
            "eth0",
            &[
                &format!("203.0.113.{}/24", 11 + i),
                &format!("fd00:b::{}/64", 11 + i),
            ],
        )?;
    }
    let any = SocketAddr::new("::".parse().unwrap(), 8080);
    let _tcp: Vec<TcpNameServer> = backends
        .iter()
        .map(|b| TcpNameServer::start(b, any, b.name()))
        .collect::<Result<_, _>>()?;
    for b in &backends {
        udp_name_server(b, b.name())?;
    }

    let nat = |backends: Vec<(IpAddr, u16)>| {
        let mut s = spec(
            Forwarding::Masquerade,
            &backends.iter().map(|&(a, p)| (a, p, 1)).collect::<Vec<_>>(),
        );
        s.source_nat = true;
        s
    };
    let v4b = |port| vec![(v4(203, 0, 113, 11), port), (v4(203, 0, 113, 12), port)];
    let v6b = |port| {
        vec![
            ("fd00:b::11".parse().unwrap(), port),
            ("fd00:b::12".parse().unwrap(), port),
        ]
    };
    let vip4 = v4(198, 51, 100, 100);
    let vip6: IpAddr = "2001:db8:c::100".parse()?;
    let set: ServiceSet = [
        (tcp(vip4, 80), nat(v4b(8080))),
        (tcp(vip6, 80), nat(v6b(8080))),
        (
            ServiceKey::Port {
                addr: vip4,
                protocol: ServiceProtocol::UDP,
                port: 53,
            },
            nat(v4b(5353)),
        ),
    ]
    .into();
    let mut dp = dataplane("/run/nt-state");
    let r = apply_cleanly(&director, &mut dp, &set)?;
    ensure(r.services == 3, || format!("{r:?}"))?;

    let even = |replies: &BTreeMap<String, usize>, n: usize| {
        replies.get("nt-b1") == Some(&(n / 2)) && replies.get("nt-b2") == Some(&(n / 2))
    };
    let tcp4 = tcp_spread(&client, SocketAddr::new(vip4, 80), 20, TIMEOUT)?;
    ensure(even(&tcp4, 20), || format!("TCP over IPv4: {tcp4:?}"))?;
    let tcp6 = tcp_spread(&client, SocketAddr::new(vip6, 80), 20, TIMEOUT)?;
    ensure(even(&tcp6, 20), || format!("TCP over IPv6: {tcp6:?}"))?;
    let udp4 = udp_spread(&client, SocketAddr::new(vip4, 53), 20)?;
    ensure(even(&udp4, 20), || format!("UDP over IPv4: {udp4:?}"))?;

    // Without the return path the same traffic dies: remove the services, and a fresh set
    // without source NAT leaves replies with no route back.
    let r = apply(&director, &mut dp, &BTreeMap::new())?;
    ensure(r.services == 0, || format!("{r:?}"))?;
    let mut plain = set.clone();
    for s in plain.values_mut() {
        s.source_nat = false;
    }
    apply_cleanly(&director, &mut dp, &plain)?;
    let lost = tcp_request(&client, SocketAddr::new(vip4, 80), Duration::from_secs(1));
    ensure(lost.is_err(), || {
        format!("a reply came back without source NAT: {lost:?}")
    })?;
    apply(&director, &mut dp, &BTreeMap::new())?;
    Ok(())
}

/// IP-in-IP tunnelling keeps the client's address (backends answer it directly, holding the
/// VIP on tunl0), and a fwmark service balances what the director's own nftables rule marks,
/// masqueraded through the dataplane's fwmark rule.
fn dataplane_tunnel_and_fwmark_traffic() -> CaseResult {
    let client = GuestNetns::create("tf-client")?;
    let director = GuestNetns::create("tf-director")?;
    let backends = (1..=2)
        .map(|i| GuestNetns::create(&format!("tf-b{i}")))
        .collect::<Result<Vec<_>, _>>()?;
    let lan = GuestBridge::create("tf-lan")?;
    lan.attach(&client, "eth0", &["192.0.2.2/24"])?;
    lan.attach(&director, "eth0", &["192.0.2.1/24", "192.0.2.100/32"])?;
    for (i, b) in backends.iter().enumerate() {
        lan.attach(b, "eth0", &[&format!("192.0.2.{}/24", 11 + i)])?;
        for key in [
            "net.ipv4.conf.all.rp_filter",
            "net.ipv4.conf.default.rp_filter",
            "net.ipv4.conf.eth0.rp_filter",
        ] {
            b.sysctl(key, "0")?;
        }
        b.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        b.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        b.ip(&["link", "set", "tunl0", "up"])?;
        b.sysctl("net/ipv4/conf/tunl0/rp_filter", "0")?;
        b.ip(&["addr", "add", "192.0.2.100/32", "dev", "tunl0"])?;
    }
    let servers: Vec<TcpNameServer> = backends
        .iter()
        .flat_map(|b| [80u16, 8080].map(|port| (b, port)))
        .map(|(b, port)| {
            TcpNameServer::start(b, SocketAddr::new("::".parse().unwrap(), port), b.name())
        })
        .collect::<Result<_, _>>()?;

    // The director marks what reaches the VIP on port 8080.
    std::fs::write(
        "/tmp/tf-mark.nft",
        "table ip tf-mark {\n\tchain pre {\n\t\ttype filter hook prerouting priority mangle; policy accept;\n\t\tip daddr 192.0.2.100 tcp dport 8080 meta mark set 5\n\t}\n}\n",
    )?;
    director.exec("nft", &["-f", "/tmp/tf-mark.nft"])?;

    let vip = v4(192, 0, 2, 100);
    let backends_at = |port| [(v4(192, 0, 2, 11), port, 1), (v4(192, 0, 2, 12), port, 1)];
    let mut marked = spec(Forwarding::Masquerade, &backends_at(0));
    marked.source_nat = true;
    let set: ServiceSet = [
        (tcp(vip, 80), spec(Forwarding::Tunnel, &backends_at(80))),
        (
            ServiceKey::Fwmark {
                family: Family::V4,
                mark: 5,
            },
            marked,
        ),
    ]
    .into();
    let mut dp = dataplane("/run/tf-state");
    let r = apply_cleanly(&director, &mut dp, &set)?;
    ensure(r.services == 2, || format!("{r:?}"))?;

    let even = |replies: &BTreeMap<String, usize>| {
        replies.get("tf-b1") == Some(&10) && replies.get("tf-b2") == Some(&10)
    };
    let tunnelled = tcp_spread(&client, SocketAddr::new(vip, 80), 20, TIMEOUT)?;
    ensure(even(&tunnelled), || format!("tunnel: {tunnelled:?}"))?;
    let by_mark = tcp_spread(&client, SocketAddr::new(vip, 8080), 20, TIMEOUT)?;
    ensure(even(&by_mark), || format!("fwmark: {by_mark:?}"))?;
    let sources = |port: u16| -> Vec<IpAddr> {
        servers
            .iter()
            .filter(|s| s.local_addr().port() == port)
            .flat_map(|s| s.peers())
            .map(|p| p.ip().to_canonical())
            .collect()
    };
    let through_tunnel = sources(80);
    ensure(
        through_tunnel.iter().all(|ip| *ip == v4(192, 0, 2, 2)),
        || format!("tunnelled connections should keep the client's address: {through_tunnel:?}"),
    )?;
    let marked_sources = sources(8080);
    ensure(
        marked_sources.iter().all(|ip| *ip == v4(192, 0, 2, 1)),
        || format!("marked connections should be masqueraded to the director: {marked_sources:?}"),
    )?;
    apply(&director, &mut dp, &BTreeMap::new())?;
    Ok(())
}

/// An agent leaves IPVS, its nftables table and the sysctls in place when it stops (so
/// forwarding survives a restart); `ferrovip cleanup` removes exactly that afterwards, from
/// the state directory alone, and leaves a foreign service alone.
fn cleanup_removes_what_an_earlier_run_left() -> CaseResult {
    let ns = GuestNetns::create("cleanup")?;
    ns.exec("ipvsadm", &["-A", "-u", "10.9.9.9:53", "-s", "rr"])?;
    let read = |path: &str| -> Result<String, vm::CaseError> {
        Ok(ns.exec("cat", &[path])?.trim().to_owned())
    };
    let sysctls = [
        "/proc/sys/net/ipv4/vs/conntrack",
        "/proc/sys/net/ipv4/ip_forward",
        "/proc/sys/net/ipv4/vs/expire_nodest_conn",
        "/proc/sys/net/ipv6/conf/all/forwarding",
        // IPv6 forwarding must not end SLAAC: accept_ra 1 becomes 2 meanwhile.
        "/proc/sys/net/ipv6/conf/lo/accept_ra",
        "/proc/sys/net/ipv6/conf/default/accept_ra",
    ];
    let before: Vec<String> = sysctls.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
    ensure(before[3..] == ["0", "1", "1"], || {
        format!("a fresh namespace's IPv6 settings: {before:?}")
    })?;
    let state = "/run/cleanup-state";
    {
        let mut dp = dataplane(state);
        let mut web = spec(Forwarding::Masquerade, &[(v4(10, 1, 0, 1), 8080, 1)]);
        web.source_nat = true;
        let v6: IpAddr = "2001:db8::7".parse().unwrap();
        let mut web6 = spec(
            Forwarding::Masquerade,
            &[("2001:db8:1::1".parse().unwrap(), 8080, 1)],
        );
        web6.source_nat = true;
        let set: ServiceSet = [(tcp(v4(192, 0, 2, 7), 80), web), (tcp(v6, 80), web6)].into();
        apply_cleanly(&ns, &mut dp, &set)?;
    }
    let during: Vec<String> = sysctls.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
    ensure(during == ["1", "1", "1", "1", "2", "2"], || {
        format!("sysctls while forwarding: {during:?}")
    })?;
    ensure(
        ns.exec("nft", &["list", "tables"])?
            .contains("inet ferrovip"),
        || "no masquerade table while forwarding".into(),
    )?;

    let out = ns.exec(&vm::agent(), &["cleanup", "--state-dir", state])?;
    let left = saved(&ns)?;
    ensure(left == ["-A -u 10.9.9.9:53 -s rr"], || {
        format!("after cleanup ({out}): {left:#?}")
    })?;
    let tables = ns.exec("nft", &["list", "tables"])?;
    ensure(!tables.contains("ferrovip"), || {
        format!("table left: {tables}")
    })?;
    let after: Vec<String> = sysctls.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
    ensure(after == before, || {
        format!("sysctls not restored: before {before:?}, after {after:?} ({out})")
    })
}

/// GUE and GRE encapsulation and connection thresholds are programmed as asked, read back
/// equal (a second apply and a restarted dataplane write nothing), and edited in place.
fn tunnel_options_and_connection_limits_round_trip() -> CaseResult {
    use ferrovip::model::service::{Encapsulation, TunnelKind};
    let ns = GuestNetns::create("tunopts")?;
    let state = PathBuf::from("/run/tunopts-state");
    let new_dp = || dataplane(&state);
    let mut gue = spec(Forwarding::Tunnel, &[(v4(10, 1, 0, 1), 80, 1)]);
    gue.tunnel = Some(Encapsulation {
        kind: TunnelKind::Gue,
        port: 6080,
        checksum: true,
        remote_checksum: false,
    });
    gue.connection_limit = (100, 50);
    let mut gre = spec(Forwarding::Tunnel, &[(v4(10, 1, 0, 2), 443, 1)]);
    gre.tunnel = Some(Encapsulation {
        kind: TunnelKind::Gre,
        ..Encapsulation::default()
    });
    let vip = v4(192, 0, 2, 9);
    let mut set: ServiceSet = [(tcp(vip, 80), gue), (tcp(vip, 443), gre)].into();
    let mut dp = new_dp();
    let r = apply_cleanly(&ns, &mut dp, &set)?;
    ensure(r.writes == 4, || format!("{r:?}"))?;
    let listed = saved(&ns)?;
    for want in [
        "-a -t 192.0.2.9:80 -r 10.1.0.1:80 -i -w 1 --tun-type gue --tun-port 6080 --tun-csum",
        "-a -t 192.0.2.9:443 -r 10.1.0.2:443 -i -w 1 --tun-type gre --tun-nocsum",
    ] {
        ensure(listed.iter().any(|l| l == want), || {
            format!("{want:?} not in {listed:#?}")
        })?;
    }
    let r = apply(&ns, &mut dp, &set)?;
    ensure(r.writes == 0, || {
        format!("the settings do not read back equal: {r:?}")
    })?;
    let mut restarted = new_dp();
    let r = apply(&ns, &mut restarted, &set)?;
    ensure(r.writes == 0, || format!("adoption rewrote: {r:?}"))?;
    set.get_mut(&tcp(vip, 80)).unwrap().connection_limit = (0, 0);
    let r = apply(&ns, &mut restarted, &set)?;
    ensure(r.writes == 1, || format!("one edit expected: {r:?}"))?;
    apply(&ns, &mut restarted, &BTreeMap::new())?;
    Ok(())
}
