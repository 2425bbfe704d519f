//! Root tests against the real kernel: namespaces, bridge, capture, and keepalived (from apt)
//! standing in for the agent so the measurements are checked against a known-good VRRP peer.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::wire::{EventKind, MacAddr};
use super::*;

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn lab_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn netns_lab_create_wires_nodes_and_drop_removes_everything() {
    let lab = Lab::create(LabSpec::default()).unwrap();
    let prefix = lab.prefix().to_owned();
    let dir = lab.dir().to_path_buf();
    assert!(prefix.starts_with(&format!("fvlab{}-", std::process::id())));
    assert!(netns_exists(lab.switch_netns()));

    let names: Vec<&str> = lab.nodes().iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node-a", "node-b", "node-c"]);
    let c = lab.node(2);
    assert_eq!(c.ipv4, Ipv4Addr::new(192, 0, 2, 13));
    assert_eq!(c.ipv6, Some("fd66:7670::13".parse().unwrap()));
    assert_eq!(c.mac, MacAddr::new(0x02, 0x66, 0x76, 0, 0, 13));
    let ll = c.ipv6_ll.expect("link-local learned");
    assert_eq!(ll.segments()[0], 0xfe80);
    for node in lab.nodes() {
        assert!(netns_exists(&node.netns), "{}", node.netns);
    }

    // IPv4, the ULA and the link-local all work at once (no DAD delay) across the bridge,
    // checked with the lab's own ICMP echo (what `ferrovip lab` pings the VIP with).
    let answers = |target: IpAddr| lab.ping(0, target, Duration::from_secs(2)).unwrap();
    assert!(answers(IpAddr::V4(c.ipv4)), "IPv4 {}", c.ipv4);
    let ula = c.ipv6.unwrap();
    assert!(answers(IpAddr::V6(ula)), "ULA {ula}");
    assert!(answers(IpAddr::V6(ll)), "link-local {ll} via eth0");
    assert!(lab.has_address(2, IpAddr::V4(c.ipv4)).unwrap());
    assert!(!lab.has_address(2, "192.0.2.100".parse().unwrap()).unwrap());
    // An address nobody holds does not answer, and the echo gives up after its timeout.
    let asked = Instant::now();
    assert!(
        !lab.ping(
            0,
            "192.0.2.100".parse().unwrap(),
            Duration::from_millis(300)
        )
        .unwrap()
    );
    assert!(
        asked.elapsed() < Duration::from_secs(2),
        "{:?}",
        asked.elapsed()
    );

    // A process that ignores SIGTERM must still be gone after drop (SIGKILL after grace).
    let stubborn = lab
        .spawn(1, &["sh", "-c", "trap '' TERM; sleep 600"], "stubborn.log")
        .unwrap();
    let plain = lab.spawn(1, &["sleep", "600"], "plain.log").unwrap();
    // Every node's processes get their own state directory inside the lab's.
    let env = lab
        .spawn(1, &["sh", "-c", "echo $FERROVIP_STATE_DIR"], "env.log")
        .unwrap();
    lab.wait(env, Duration::from_secs(5)).unwrap();
    let said = std::fs::read_to_string(lab.proc_info(env).unwrap().1).unwrap();
    assert_eq!(said.trim(), lab.state_dir(1).display().to_string());
    assert!(lab.state_dir(1).starts_with(&dir));
    assert_ne!(lab.state_dir(0), lab.state_dir(1));
    let pids = [lab.pid(stubborn).unwrap(), lab.pid(plain).unwrap()];
    std::thread::sleep(Duration::from_millis(100));
    let in_ns = lab.exec(1, &["ip", "netns", "identify"]).unwrap();
    assert_eq!(
        String::from_utf8_lossy(&in_ns.stdout).trim(),
        lab.node(1).netns
    );
    assert_eq!(lab.exit_status(plain).unwrap(), None);

    drop(lab);
    assert_eq!(lab_namespaces(&prefix), Vec::<String>::new());
    for pid in pids {
        assert_eq!(
            kill(Pid::from_raw(pid as i32), None),
            Err(Errno::ESRCH),
            "pid {pid}"
        );
    }
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[test]
fn netns_lab_is_removed_when_the_test_panics() {
    let prefix = std::sync::Mutex::new(String::new());
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let lab = Lab::create(LabSpec {
            nodes: 2,
            ipv6: false,
            ..LabSpec::default()
        })
        .unwrap();
        *prefix.lock().unwrap() = lab.prefix().to_owned();
        lab.spawn(0, &["sleep", "600"], "sleep.log").unwrap();
        panic!("test failure while the lab runs");
    }));
    assert!(result.is_err());
    let prefix = prefix.into_inner().unwrap();
    assert!(!prefix.is_empty());
    assert_eq!(lab_namespaces(&prefix), Vec::<String>::new());
}

#[test]
fn netns_lab_kill_and_wait_follow_the_process() {
    let lab = Lab::create(LabSpec {
        nodes: 1,
        ipv6: false,
        ..LabSpec::default()
    })
    .unwrap();
    let id = lab
        .spawn(0, &["sh", "-c", "echo started; exec sleep 600"], "p.log")
        .unwrap();
    assert_eq!(lab.wait(id, Duration::from_millis(200)).unwrap(), None);
    lab.kill(id, Signal::SIGKILL).unwrap();
    let status = lab
        .wait(id, Duration::from_secs(2))
        .unwrap()
        .expect("exited");
    assert!(!status.success());
    // Signalling a process that is gone is not an error.
    lab.kill(id, Signal::SIGTERM).unwrap();
    let (node, log) = lab.proc_info(id).unwrap();
    assert_eq!(node, 0);
    assert_eq!(log_tail(&log, 5), "started");
}

#[test]
fn netns_lab_sniffer_sees_a_gratuitous_arp() {
    let lab = Lab::create(LabSpec {
        nodes: 2,
        ipv6: false,
        ..LabSpec::default()
    })
    .unwrap();
    let sniffer = Sniffer::start(&lab).unwrap();
    let a = lab.node(0).clone();
    let before = Instant::now();
    // arping exits 1 when nobody answers, which is expected for an announcement.
    let out = lab
        .exec(
            0,
            &["arping", "-U", "-c", "1", "-i", "eth0", &a.ipv4.to_string()],
        )
        .unwrap();
    let after = Instant::now();
    let garp = sniffer
        .wait_for(
            |e| e.announced() == Some(IpAddr::V4(a.ipv4)),
            Duration::from_secs(3),
        )
        .unwrap_or_else(|| panic!("no GARP seen; arping said {out:?}"));
    assert_eq!(
        garp.kind,
        EventKind::GratuitousArp {
            sender_ip: a.ipv4,
            sender_mac: a.mac
        }
    );
    assert_eq!(garp.src_mac, a.mac);
    assert!(
        before <= garp.at && garp.at <= after,
        "timestamp outside the exec"
    );
    assert_eq!(
        sniffer.events_since(after + Duration::from_secs(60)),
        vec![]
    );
    assert!(!sniffer.events_since(before).is_empty());
}

#[test]
fn netns_lab_sniffer_decodes_injected_vrrp_and_neighbor_adverts() {
    let lab = Lab::create(LabSpec {
        nodes: 2,
        ..LabSpec::default()
    })
    .unwrap();
    let sniffer = Sniffer::start(&lab).unwrap();
    let hex = |s: &str| -> Vec<u8> {
        let s = s.replace(' ', "");
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    // Golden vectors A (v3/IPv4) and B (v3/IPv6), and an unsolicited NA from node-b's MAC.
    let v4 = hex(
        "01005e00001200005e000133080045c0002000000000ff7018e9c0a8010ae00000123133640100640619c0a80164",
    );
    let v6 = hex("333300000012 00005e00020a 86dd \
         60000000002870fffe80000000000000000000000000000aff020000000000000000000000000012 \
         310ac8020064db1bfe80000000000000000000000000000120010db8000000000000000000000100");
    let na = hex("333300000001 02667600000c 86dd 6000000000203aff \
         fe800000000000000000000000000001 ff020000000000000000000000000001 \
         88000000 20000000 fd667670000000000000000000000100 0201 02667600000c");
    lab.send_frame(1, &v4).unwrap();
    lab.send_frame(1, &v6).unwrap();
    lab.send_frame(1, &na).unwrap();

    let advert_v4 = sniffer
        .wait_for(
            |e| e.advert().is_some_and(|a| a.vrid == 51),
            Duration::from_secs(2),
        )
        .expect("v4 advert");
    let a = advert_v4.advert().unwrap();
    assert_eq!(a.source, "192.168.1.10".parse::<IpAddr>().unwrap());
    assert_eq!((a.version, a.priority, a.ttl), (3, 100, 255));
    assert_eq!(a.interval, Duration::from_secs(1));

    let advert_v6 = sniffer
        .wait_for(
            |e| e.advert().is_some_and(|a| a.vrid == 10),
            Duration::from_secs(2),
        )
        .expect("v6 advert");
    assert_eq!(advert_v6.advert().unwrap().priority, 200);
    assert!(advert_v6.at >= advert_v4.at);

    let target: IpAddr = "fd66:7670::100".parse().unwrap();
    let na = sniffer
        .wait_for(|e| e.announced() == Some(target), Duration::from_secs(2))
        .expect("unsolicited NA");
    assert!(matches!(
        na.kind,
        EventKind::UnsolicitedNa {
            target_mac: Some(mac),
            override_flag: true,
            ..
        } if mac == lab.node(1).mac
    ));
    assert_eq!(
        current_master(&sniffer, 51, Duration::from_secs(30)),
        Some(a.source)
    );
    assert_eq!(current_master(&sniffer, 52, Duration::from_secs(30)), None);
}

/// keepalived playing `ferrovip agent --node-name NAME --manifests PATH`: it reads the VIP,
/// interval and preference weights from the lab's manifest, so `run_lab` drives it exactly
/// as it will drive the agent.
const KEEPALIVED_AGENT: &str = r#"#!/bin/sh
set -e
name=$3
manifest=$5
dir=$(dirname "$manifest")
vip=$(sed -n 's/.*addresses: \["\(.*\)"\].*/\1/p' "$manifest")
ms=$(sed -n 's/.*advertisementInterval: \([0-9]*\)ms.*/\1/p' "$manifest")
weight=$(sed -n "s/.*nodeName: $name, weight: \([0-9]*\).*/\1/p" "$manifest")
prio=$((100 + ${weight:-0}))
# The lab's 140 and 130 put the two backups' timers 3.9 ms apart, which a loaded machine
# reorders; the test asserts which backup wins, so the third node is given a clearly lower
# priority (60: its Master_Down_Interval is 31 ms longer).
[ "$prio" -lt 140 ] && prio=60
interval=$(awk "BEGIN { print $ms / 1000 }")
conf="$dir/$name.keepalived.conf"
cat > "$conf" <<EOF
global_defs {
  router_id $name
  vrrp_version 3
}
vrrp_instance lab {
  state BACKUP
  interface eth0
  virtual_router_id 51
  priority $prio
  advert_int $interval
  virtual_ipaddress {
    $vip dev eth0
  }
}
EOF
# A SIGKILLed predecessor's VRRP child may linger as a zombie for a moment; its pid files
# would make keepalived refuse to start.
rm -f "$dir/$name.pid" "$dir/$name.vrrp.pid"
exec keepalived --dont-fork --log-console --log-detail --vrrp -f "$conf" \
  -p "$dir/$name.pid" -r "$dir/$name.vrrp.pid"
"#;

/// The stand-in script, removed when dropped.
struct FakeAgent(PathBuf);

impl FakeAgent {
    fn install() -> FakeAgent {
        let path = std::env::temp_dir().join(format!(
            "ferrovip-lab-keepalived-agent-{}.sh",
            std::process::id()
        ));
        std::fs::write(&path, KEEPALIVED_AGENT).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        FakeAgent(path)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn within(actual: Duration, expected: Duration, early: Duration, late: Duration) -> bool {
    actual + early >= expected && actual <= expected + late
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_lab_run_lab_measures_keepalived_failovers() {
    let agent = FakeAgent::install();
    let report = run_lab(LabOptions {
        nodes: 3,
        interval: Duration::from_millis(100),
        binary: agent.0.clone(),
        keep: false,
        rounds: 2,
        quiet: false,
    })
    .await
    .unwrap();

    assert!(lab_namespaces(&report.prefix).is_empty(), "lab not removed");
    assert_eq!(report.initial_master, "node-a");
    assert!(report.vip_answers_ping);
    assert_eq!(report.vip, Ipv4Addr::new(192, 0, 2, 100));
    assert_eq!(report.failovers.len(), 2);
    let interval = Duration::from_millis(100);
    for round in &report.failovers {
        assert_eq!(round.killed, "node-a");
        assert_eq!(round.new_master, "node-b");
        let f = &round.failover;
        assert_eq!(f.new_master_priority, 140);
        assert_eq!(f.advert_interval, interval);
        assert_eq!(round.expected, master_down_interval(140, interval));
        // The backup's timer runs from the last advert it heard: Master_Down_Interval,
        // give or take scheduling on a busy 2-core machine.
        let gap = f.last_advert_to_takeover.unwrap();
        assert!(
            within(
                gap,
                round.expected,
                Duration::from_millis(15),
                Duration::from_millis(150)
            ),
            "gap {gap:?} vs {:?}",
            round.expected
        );
        // The kill lands somewhere inside an advert interval.
        assert!(f.death_to_advert <= gap);
        assert!(f.death_to_advert + interval + Duration::from_millis(15) >= gap);
        assert!(f.death_to_garp.is_some());
        assert_eq!(f.death_to_release, None);
        assert!(round.rejoin.should_preempt);
        assert_eq!(round.rejoin.preemption.as_ref().unwrap().priority, 150);
    }
    let graceful = report.graceful.as_ref().unwrap();
    assert_eq!(
        (graceful.stopped.as_str(), graceful.new_master.as_str()),
        ("node-a", "node-b")
    );
    let f = &graceful.failover;
    assert!(
        f.death_to_release.is_some(),
        "keepalived releases with priority 0"
    );
    assert_eq!(graceful.expected, skew_time(140, interval));
    let gap = f.last_advert_to_takeover.unwrap();
    assert!(
        within(
            gap,
            graceful.expected,
            Duration::from_millis(15),
            Duration::from_millis(150)
        ),
        "gap {gap:?} vs skew {:?}",
        graceful.expected
    );
    assert!(report.is_clean(), "{:?}", report.warnings);
}

#[tokio::test]
async fn netns_lab_run_lab_reports_an_agent_that_dies() {
    let agent = std::env::temp_dir().join(format!(
        "ferrovip-lab-broken-agent-{}.sh",
        std::process::id()
    ));
    std::fs::write(
        &agent,
        "#!/bin/sh\necho \"bad manifest for $3\" >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&agent, std::fs::Permissions::from_mode(0o755)).unwrap();
    let result = run_lab(LabOptions {
        binary: agent.clone(),
        quiet: true,
        ..LabOptions::default()
    })
    .await;
    let _ = std::fs::remove_file(&agent);
    match result {
        Err(LabError::AgentExited { log_tail, .. }) => {
            assert!(log_tail.contains("bad manifest for node-"), "{log_tail}")
        }
        other => panic!("expected AgentExited, got {other:?}"),
    }
}

#[test]
fn netns_lab_cleanup_stale_removes_orphans_only() {
    // A namespace named like a lab of a dead process (pid above pid_max), with a process in it.
    let orphan = "fvlab99999998-0-node-a";
    let _ = super::netns::ip(&["netns", "del", orphan]);
    super::netns::ip(&["netns", "add", orphan]).unwrap();
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", orphan, "sleep", "600"])
        .spawn()
        .unwrap();
    let live = Lab::create(LabSpec {
        nodes: 1,
        ipv6: false,
        ..LabSpec::default()
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));

    // A concurrent `run_lab` test may sweep the orphan first, so only the outcome is checked.
    Lab::cleanup_stale().unwrap();
    assert!(!netns_exists(orphan));
    assert!(
        sleeper.wait().unwrap().code().is_none(),
        "killed by a signal"
    );
    assert!(netns_exists(live.switch_netns()));
    assert!(netns_exists(&live.node(0).netns));
}
