//! Interoperability with keepalived (Debian's build, the reference VRRP peer) and with
//! Wireshark's VRRP dissector (tshark). Needs root, keepalived and tshark; e2e/test.sh
//! installs them and runs these one at a time.
//!
//! Every test builds a two-node lab (our agent on node-a 192.0.2.11, keepalived on node-b
//! 192.0.2.12, VRID 51, VIP 192.0.2.100/24) that its `Drop` removes, also on panic.
//!
//! What keepalived accepts, as observed with Debian's 2.2.7 (and as its source reads): for
//! VRRPv3 over IPv4 it verifies exactly one checksum form, the one it sends: the IPv4
//! pseudo-header form. Anything else is logged as "Invalid VRRPv3 checksum" and dropped;
//! there is no fallback (its only retry is for unicast adverts whose pseudo-header used the
//! multicast group). `v3_checksum_as_v2` (message-only, the RFC 9568 reading) only exists
//! from keepalived 2.2.8 on: 2.2.7 logs "Unknown keyword" and keeps the pseudo-header form.
//! Our agent accepts both forms. So with our `ipv4Checksum: MessageOnly` the pair works one
//! way only: we follow a keepalived master, but keepalived never hears us and becomes a
//! second master. Our acceptance of message-only adverts is checked with hand-built frames
//! (what keepalived ≥ 2.2.8 with `v3_checksum_as_v2`, FRR or Cisco send).

mod keepalived_util;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ferrovip::lab::{
    Failover, FailoverQuery, ProcId, analyze_preemption, master_down_interval, masters_since,
    measure_failover, skew_time,
};
use keepalived_util::*;
use nix::sys::signal::Signal;

const V3_INTERVAL: Duration = Duration::from_millis(100);
const STARTUP: Duration = Duration::from_secs(5);

/// Signals the process `id` running on `node` (the master) and measures the takeover by
/// the other node on the wire.
fn stop_and_measure(ix: &Interop, id: ProcId, node: usize, signal: Signal) -> Failover {
    let query = FailoverQuery {
        vrid: VRID,
        old_master: IpAddr::V4(ix.lab.node(node).ipv4),
        stopped_at: Instant::now(),
        vip: Some(IpAddr::V4(VIP)),
    };
    ix.lab.kill(id, signal).expect("signal");
    let failover =
        measure_failover(&ix.sniffer, &query, Duration::from_secs(8)).unwrap_or_else(|e| {
            panic!("{e}");
        });
    assert!(
        ix.lab.wait(id, Duration::from_secs(5)).unwrap().is_some(),
        "{signal} did not stop {}",
        ix.lab.node(node).name
    );
    failover
}

/// SIGKILLs the master, process `id` on `node`; the other node (priority 100) must take over
/// after its Master_Down_Interval, announce the VIP and hold it.
fn crash_takeover(ix: &Interop, id: ProcId, node: usize) -> Failover {
    let (new_node, new_addr) = if node == OURS {
        (THEIRS, ix.theirs())
    } else {
        (OURS, ix.ours())
    };
    // Who is who in the messages.
    let (old_who, old_whose, new_who, new_whom) = if node == OURS {
        ("we", "our", "keepalived", "keepalived")
    } else {
        ("keepalived", "keepalived's", "we", "us")
    };
    let f = stop_and_measure(ix, id, node, Signal::SIGKILL);
    assert_eq!(f.new_master, new_addr);
    assert_eq!(f.new_master_priority, 100);
    assert_eq!(f.advert_interval, V3_INTERVAL, "{old_who} advertised 10 cs");
    let gap = f.last_advert_to_takeover.unwrap();
    let expected = master_down_interval(100, V3_INTERVAL);
    assert!(
        within(gap, expected),
        "{new_who} took over {} after {old_whose} last advert; Master_Down_Interval is {}",
        ms(gap),
        ms(expected)
    );
    assert!(
        f.death_to_garp.is_some(),
        "no gratuitous ARP for the VIP from {new_whom}"
    );
    ix.wait_address(new_node, IpAddr::V4(VIP), true, Duration::from_secs(1));
    f
}

/// Phase one of the two-way checks: keepalived (priority 150) and our agent (100) start
/// together and keepalived must end up the only master. That needs our agent to accept its
/// adverts: otherwise our Master_Down_Interval expires and we stay master next to it, so the
/// check runs until our timer would have expired and two adverts beyond.
fn keepalived_leads(
    ix: &Interop,
    ka: &KeepalivedConf,
    ours: &AgentConf,
    interval: Duration,
) -> ProcId {
    let started = Instant::now();
    let ka_id = ix.start_keepalived(ka);
    let our_id = ix.start_agent(ours);
    assert!(
        ix.wait_log(our_id, "INIT -> BACKUP", STARTUP),
        "agent did not start"
    );
    let our_timer_ends = Instant::now() + master_down_interval(ours.priority, interval);
    ix.wait_master(
        THEIRS,
        started,
        STARTUP + master_down_interval(ka.priority, interval),
    );
    // If we won the first election (keepalived started slower), we yield on its first
    // advert; one of ours may already be on its way.
    std::thread::sleep(interval / 2);
    let until = our_timer_ends + 2 * interval;
    ix.assert_sole_master(
        THEIRS,
        until
            .saturating_duration_since(Instant::now())
            .max(2 * interval),
    );
    ka_id
}

/// Phase two: keepalived leaves gracefully (SIGTERM, priority-0 advert) and our agent takes
/// over after Skew_Time.
fn graceful_handover_to_us(ix: &Interop, ka_id: ProcId, interval: Duration) -> Failover {
    let f = stop_and_measure(ix, ka_id, THEIRS, Signal::SIGTERM);
    assert_eq!(f.new_master, ix.ours());
    assert!(
        f.death_to_release.is_some(),
        "keepalived sent no priority-0 advert"
    );
    let gap = f.last_advert_to_takeover.unwrap();
    let expected = skew_time(100, interval);
    assert!(
        within(gap, expected),
        "we took over {} after keepalived's priority-0 advert; Skew_Time is {}",
        ms(gap),
        ms(expected)
    );
    assert!(f.death_to_garp.is_some(), "no gratuitous ARP from us");
    ix.wait_address(OURS, IpAddr::V4(VIP), true, Duration::from_secs(1));
    f
}

/// What happened after keepalived restarted below our priority while we were master.
struct Rejoin {
    /// Sources advertising as master from keepalived's entry into BACKUP until its
    /// Master_Down_Interval would have expired, plus two adverts.
    masters: Vec<IpAddr>,
    log: String,
}

/// Phase three: keepalived restarts with priority 50. If it accepts our adverts it stays
/// backup; if it drops them its Master_Down_Interval expires and it becomes master too.
/// `during` runs while the window is open (a tshark capture, say).
fn keepalived_rejoins_below_us(
    ix: &Interop,
    ka: &KeepalivedConf,
    interval: Duration,
    during: impl FnOnce(),
) -> Rejoin {
    assert!(ka.priority < 100);
    let ka_id = ix.start_keepalived(ka);
    assert!(
        ix.wait_log(ka_id, "Entering BACKUP STATE", STARTUP),
        "keepalived did not start"
    );
    let from = Instant::now();
    let until = from + master_down_interval(ka.priority, interval) + 2 * interval;
    during();
    std::thread::sleep(until.saturating_duration_since(Instant::now()));
    Rejoin {
        masters: masters_since(&ix.sniffer.events(), VRID, from),
        log: ix.log(ka_id),
    }
}

/// The three phases in a row: keepalived (`ka`, above us) leads, hands over gracefully, and
/// rejoins at priority 50. Returns our takeover and what happened at the rejoin.
fn keepalived_leads_leaves_and_rejoins_below_us(
    ix: &Interop,
    ka: &KeepalivedConf,
    ours: &AgentConf,
    interval: Duration,
    during_rejoin: impl FnOnce(),
) -> (Failover, Rejoin) {
    let ka_id = keepalived_leads(ix, ka, ours, interval);
    let takeover = graceful_handover_to_us(ix, ka_id, interval);
    let rejoin = keepalived_rejoins_below_us(ix, &ka.clone().priority(50), interval, during_rejoin);
    (takeover, rejoin)
}

fn assert_keepalived_stayed_backup(ix: &Interop, rejoin: &Rejoin) {
    assert_eq!(
        rejoin.masters,
        vec![ix.ours()],
        "keepalived (priority 50) did not stay backup behind us"
    );
    assert!(
        !rejoin.log.contains("Entering MASTER STATE"),
        "{}",
        rejoin.log
    );
    assert!(!rejoin.log.contains("Invalid VRRP"), "{}", rejoin.log);
    assert!(!ix.lab.has_address(THEIRS, IpAddr::V4(VIP)).unwrap());
    assert!(ix.lab.has_address(OURS, IpAddr::V4(VIP)).unwrap());
}

/// keepalived dropped our adverts as badly checksummed and became a second master; we stay
/// master too, since a master ignores adverts of lower priority.
fn assert_keepalived_rejected_our_checksum(ix: &Interop, rejoin: &Rejoin) {
    assert!(
        rejoin.log.contains("Invalid VRRPv3 checksum"),
        "keepalived did not report our checksum:\n{}",
        rejoin.log
    );
    assert!(
        rejoin.log.contains("Entering MASTER STATE"),
        "{}",
        rejoin.log
    );
    assert!(
        rejoin.masters.contains(&ix.ours()) && rejoin.masters.contains(&ix.theirs()),
        "expected two masters, saw {:?}",
        rejoin.masters
    );
    assert!(ix.lab.has_address(OURS, IpAddr::V4(VIP)).unwrap());
}

/// Checksum statuses tshark gives the VRRP packets from `source` (1 = Good, 0 = Bad), with
/// the IPv4 VRRPv3 checksum read as message-only (`as_v2`) or with the pseudo-header.
fn checksum_statuses(capture: &std::path::Path, source: IpAddr, as_v2: bool) -> Vec<String> {
    let pref = format!(
        "vrrp.v3_checksum_as_in_v2:{}",
        if as_v2 { "TRUE" } else { "FALSE" }
    );
    tshark_fields(
        capture,
        &[&pref],
        &["ip.src", "ipv6.src", "vrrp.checksum.status"],
    )
    .into_iter()
    .filter(|row| row[0] == source.to_string() || row[1] == source.to_string())
    .map(|row| row[2].clone())
    .collect()
}

#[test]
fn advert_frame_builder_matches_golden_vector_a() {
    // vectors.md A: v3/IPv4, VRID 51, priority 100, 100 cs, VIP 192.168.1.100,
    // 192.168.1.10 → 224.0.0.18 from the virtual MAC; checksum 0x0619 with the pseudo-header,
    // 0xa85a message-only.
    let hex = |bytes: &[u8]| -> String { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let build = |message_only| {
        v3_ipv4_advert_frame(
            [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33],
            Ipv4Addr::new(192, 168, 1, 10),
            51,
            100,
            100,
            &[Ipv4Addr::new(192, 168, 1, 100)],
            message_only,
        )
    };
    assert_eq!(
        hex(&build(false)),
        "01005e00001200005e000133080045c0002000000000ff7018e9c0a8010ae00000123133640100640619c0a80164"
    );
    assert_eq!(hex(&build(true)[34..]), "313364010064a85ac0a80164");
}

#[test]
fn netns_keepalived_master_crash_fails_over_to_us_and_preempts_back() {
    let ix = Interop::new(false);
    let ka = KeepalivedConf::v3(150);
    let ka_id = keepalived_leads(&ix, &ka, &AgentConf::v3(100), V3_INTERVAL);

    let f = crash_takeover(&ix, ka_id, THEIRS);
    assert_eq!(
        f.death_to_release, None,
        "SIGKILL leaves no priority-0 advert"
    );
    println!(
        "our takeover after keepalived's SIGKILL: {} after its last advert (MDI {}), {} after the kill, GARP {} after the kill",
        ms(f.last_advert_to_takeover.unwrap()),
        ms(master_down_interval(100, V3_INTERVAL)),
        ms(f.death_to_advert),
        ms(f.death_to_garp.unwrap())
    );

    // keepalived comes back with the higher priority: it preempts, we yield and release.
    let restarted = Instant::now();
    ix.start_keepalived(&ka);
    let back = ix.wait_master(THEIRS, restarted, STARTUP);
    let released = ix.wait_address(OURS, IpAddr::V4(VIP), false, Duration::from_secs(1));
    ix.assert_sole_master(THEIRS, 3 * V3_INTERVAL);
    let preemption = analyze_preemption(&ix.sniffer.events(), VRID, ix.theirs(), restarted)
        .expect("keepalived advertised");
    assert_eq!(preemption.priority, 150);
    println!(
        "keepalived restart to master: {} (start-up + its MDI {}); we released the VIP {} after its first advert",
        ms(preemption.restart_to_master),
        ms(master_down_interval(150, V3_INTERVAL)),
        ms(released.saturating_duration_since(back.at))
    );
}

#[test]
fn netns_keepalived_takes_over_when_we_crash_or_leave_and_we_preempt_back() {
    let ix = Interop::new(false);
    let ours = AgentConf::v3(150);
    let started = Instant::now();
    let our_id = ix.start_agent(&ours);
    ix.wait_master(OURS, started, STARTUP);
    // keepalived joins behind us and stays backup past its own Master_Down_Interval: it
    // accepts our adverts.
    let ka_id = ix.start_keepalived(&KeepalivedConf::v3(100));
    assert!(ix.wait_log(ka_id, "Entering BACKUP STATE", STARTUP));
    ix.assert_sole_master(
        OURS,
        master_down_interval(100, V3_INTERVAL) + 2 * V3_INTERVAL,
    );

    // Crash: keepalived takes over after its Master_Down_Interval.
    let f = crash_takeover(&ix, our_id, OURS);
    println!(
        "keepalived takeover after our SIGKILL: {} after our last advert (MDI {})",
        ms(f.last_advert_to_takeover.unwrap()),
        ms(master_down_interval(100, V3_INTERVAL))
    );

    // We come back with the higher priority and preempt; keepalived releases the VIP.
    let restarted = Instant::now();
    let our_id = ix.start_agent(&ours);
    ix.wait_master(OURS, restarted, STARTUP);
    ix.wait_address(THEIRS, IpAddr::V4(VIP), false, Duration::from_secs(1));
    ix.assert_sole_master(OURS, 3 * V3_INTERVAL);
    assert!(
        ix.log(our_id)
            .contains("removed addresses left behind by a previous agent"),
        "the crashed agent's VIP was not cleaned up at restart"
    );
    let preemption = analyze_preemption(&ix.sniffer.events(), VRID, ix.ours(), restarted).unwrap();
    assert_eq!(preemption.priority, 150);
    println!(
        "our restart to master: {} (start-up + our MDI {})",
        ms(preemption.restart_to_master),
        ms(master_down_interval(150, V3_INTERVAL))
    );

    // Graceful: keepalived honours our priority-0 advert and takes over after Skew_Time.
    let f = stop_and_measure(&ix, our_id, OURS, Signal::SIGTERM);
    assert_eq!(f.new_master, ix.theirs());
    assert!(f.death_to_release.is_some(), "no priority-0 advert from us");
    let gap = f.last_advert_to_takeover.unwrap();
    let skew = skew_time(100, V3_INTERVAL);
    assert!(
        within(gap, skew),
        "keepalived took over {} after our priority-0 advert; Skew_Time is {}",
        ms(gap),
        ms(skew)
    );
    let status = ix.lab.exit_status(our_id).unwrap().expect("exited");
    assert!(status.success(), "agent exit on SIGTERM: {status}");
    assert!(
        !ix.lab.has_address(OURS, IpAddr::V4(VIP)).unwrap(),
        "VIP left behind after SIGTERM"
    );
    ix.wait_address(THEIRS, IpAddr::V4(VIP), true, Duration::from_secs(1));
    println!(
        "keepalived takeover after our SIGTERM: {} after our priority-0 advert (Skew_Time {}), which we sent {} after the signal",
        ms(gap),
        ms(skew),
        ms(f.death_to_release.unwrap())
    );
}

#[test]
fn netns_keepalived_rejects_our_message_only_checksum_but_we_follow_it() {
    let ix = Interop::new(false);
    let ours = AgentConf::v3(100).message_only();
    // We accept keepalived's pseudo-header adverts while sending message-only ones.
    let (_, rejoin) = keepalived_leads_leaves_and_rejoins_below_us(
        &ix,
        &KeepalivedConf::v3(150),
        &ours,
        V3_INTERVAL,
        || (),
    );
    assert_keepalived_rejected_our_checksum(&ix, &rejoin);
}

#[test]
fn netns_we_accept_message_only_adverts_from_a_peer() {
    let ix = Interop::new(false);
    let peer = ix.lab.node(THEIRS).clone();
    let advert = |priority| {
        v3_ipv4_advert_frame(
            peer.mac.octets(),
            peer.ipv4,
            VRID,
            priority,
            10,
            &[VIP],
            true,
        )
    };
    let stop = AtomicBool::new(false);
    let (capture, our_id, masters, query) = std::thread::scope(|scope| {
        // Ends the sender when this closure returns or unwinds, before the scope joins it.
        struct StopOnDrop<'a>(&'a AtomicBool);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.store(true, Ordering::Relaxed);
            }
        }
        let guard = StopOnDrop(&stop);
        // A strict RFC 9568 peer at priority 200 every 100 ms, leaving with priority 0.
        let sender = scope.spawn(|| {
            let frame = advert(200);
            while !stop.load(Ordering::Relaxed) {
                ix.lab.send_frame(THEIRS, &frame).expect("send advert");
                std::thread::sleep(V3_INTERVAL);
            }
            ix.lab.send_frame(THEIRS, &advert(0)).expect("send advert");
        });
        ix.wait_master(THEIRS, Instant::now(), STARTUP);
        let our_id = ix.start_agent(&AgentConf::v3(100));
        assert!(ix.wait_log(our_id, "INIT -> BACKUP", STARTUP));
        // Our timer would have expired by the end of this if we dropped the adverts.
        let window = Instant::now();
        let capture = ix.tshark_capture(1);
        std::thread::sleep(
            (window + master_down_interval(100, V3_INTERVAL) + 2 * V3_INTERVAL)
                .saturating_duration_since(Instant::now()),
        );
        let masters = masters_since(&ix.sniffer.events(), VRID, window);
        let query = FailoverQuery {
            vrid: VRID,
            old_master: ix.theirs(),
            stopped_at: Instant::now(),
            vip: Some(IpAddr::V4(VIP)),
        };
        drop(guard);
        sender.join().expect("sender thread");
        (capture, our_id, masters, query)
    });
    assert_eq!(masters, vec![ix.theirs()], "we did not stay backup");

    // Its message-only priority 0 hands over after Skew_Time.
    let f = measure_failover(&ix.sniffer, &query, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(f.new_master, ix.ours());
    assert!(
        f.death_to_release.is_some(),
        "the peer's priority 0 was not captured"
    );
    let gap = f.last_advert_to_takeover.unwrap();
    assert!(
        within(gap, skew_time(100, V3_INTERVAL)),
        "we took over {} after a message-only priority 0",
        ms(gap)
    );
    assert!(
        ix.log(our_id).contains("reason=\"priority_zero\""),
        "{}",
        ix.log(our_id)
    );

    // The frames really carry the message-only form, as Wireshark reads it.
    let as_v2 = checksum_statuses(&capture, ix.theirs(), true);
    assert!(as_v2.len() >= 5, "{as_v2:?}");
    assert!(as_v2.iter().all(|s| s == "1"), "{as_v2:?}");
    let pseudo = checksum_statuses(&capture, ix.theirs(), false);
    assert!(pseudo.iter().all(|s| s == "0"), "{pseudo:?}");
}

#[test]
fn netns_keepalived_v3_checksum_as_v2_matches_our_message_only() {
    let ix = Interop::new(false);
    let ka = KeepalivedConf::v3(150).checksum_as_v2();
    let ours = AgentConf::v3(100).message_only();
    if keepalived_version() < (2, 2, 8) {
        // Debian bookworm's 2.2.7 predates the keyword: it says so, ignores it, and keeps
        // sending the pseudo-header form, so the two-way check cannot run against it.
        eprintln!(
            "reduced coverage: keepalived {:?} < 2.2.8 has no v3_checksum_as_v2; checking only \
             that it ignores the keyword and keeps the pseudo-header form",
            keepalived_version()
        );
        let ka_id = ix.start_keepalived(&ka);
        ix.wait_master(THEIRS, Instant::now(), STARTUP);
        assert!(
            ix.log(ka_id)
                .contains("Unknown keyword 'v3_checksum_as_v2'"),
            "{}",
            ix.log(ka_id)
        );
        let capture = ix.tshark_capture(1);
        let pseudo = checksum_statuses(&capture, ix.theirs(), false);
        assert!(pseudo.len() >= 5, "{pseudo:?}");
        assert!(pseudo.iter().all(|s| s == "1"), "{pseudo:?}");
        return;
    }
    let (_, rejoin) =
        keepalived_leads_leaves_and_rejoins_below_us(&ix, &ka, &ours, V3_INTERVAL, || ());
    assert_keepalived_stayed_backup(&ix, &rejoin);
}

#[test]
fn netns_keepalived_unicast_interoperates_both_ways() {
    let ix = Interop::new(false);
    let (_, rejoin) = keepalived_leads_leaves_and_rejoins_below_us(
        &ix,
        &KeepalivedConf::v3(150).unicast(),
        &AgentConf::v3(100).unicast(),
        V3_INTERVAL,
        || (),
    );
    assert_keepalived_stayed_backup(&ix, &rejoin);

    // Both sides sent every advert (priority 0 included) to the other's address only.
    let adverts: Vec<_> = ix
        .sniffer
        .events()
        .into_iter()
        .filter_map(|e| e.advert().cloned())
        .collect();
    assert!(adverts.iter().any(|a| a.source == ix.ours()));
    assert!(
        adverts
            .iter()
            .any(|a| a.source == ix.theirs() && a.priority == 0)
    );
    for advert in &adverts {
        let peer = if advert.source == ix.ours() {
            ix.theirs()
        } else {
            ix.ours()
        };
        assert_eq!(advert.destination, peer, "{advert:?}");
        assert_eq!(advert.ttl, 255, "{advert:?}");
    }
}

#[test]
fn netns_keepalived_vrrpv2_interoperates_and_tshark_decodes_v2() {
    let interval = Duration::from_secs(1);
    let ix = Interop::new(false);
    let mut capture = None;
    let (f, rejoin) = keepalived_leads_leaves_and_rejoins_below_us(
        &ix,
        &KeepalivedConf::v3(150).version_2(),
        &AgentConf::v3(100).version_2(),
        interval,
        || capture = Some(ix.tshark_capture(3)),
    );
    println!(
        "v2: our takeover {} after keepalived's priority-0 advert (Skew_Time {})",
        ms(f.last_advert_to_takeover.unwrap()),
        ms(skew_time(100, interval))
    );
    assert_keepalived_stayed_backup(&ix, &rejoin);

    let rows = tshark_fields(
        &capture.expect("captured"),
        &[],
        &[
            "ip.src",
            "ip.ttl",
            "vrrp.version",
            "vrrp.type",
            "vrrp.virt_rtr_id",
            "vrrp.prio",
            "vrrp.addr_count",
            "vrrp.auth_type",
            "vrrp.adver_int",
            "vrrp.ip_addr",
            "vrrp.checksum.status",
        ],
    );
    let ours: Vec<_> = rows
        .iter()
        .filter(|r| r[0] == ix.ours().to_string())
        .collect();
    assert!(ours.len() >= 2, "too few v2 adverts captured: {rows:?}");
    for row in ours {
        assert_eq!(
            row[1..],
            [
                "255",
                "2",
                "1",
                "51",
                "100",
                "1",
                "0",
                "1",
                "192.0.2.100",
                "1"
            ],
            "tshark decoded {row:?} (last column: checksum status, 1 = Good)"
        );
    }
}

#[test]
fn netns_tshark_decodes_our_v3_adverts_with_good_checksums() {
    let ix = Interop::new(true);
    let started = Instant::now();
    ix.start_agent(&AgentConf::v3(100).ipv6());
    ix.wait_master(OURS, started, STARTUP);
    // 3 s so the capture spans one of the agent's periodic interface refreshes (every 2 s)
    // after it took the VIPs: the advert source must survive it.
    let capture = ix.tshark_capture(3);
    let rows = tshark_fields(
        &capture,
        &["vrrp.v3_checksum_as_in_v2:FALSE"],
        &[
            "ip.src",
            "ipv6.src",
            "ip.ttl",
            "ipv6.hlim",
            "vrrp.version",
            "vrrp.type",
            "vrrp.virt_rtr_id",
            "vrrp.prio",
            "vrrp.addr_count",
            "vrrp.short_adver_int",
            "vrrp.ip_addr",
            "vrrp.ipv6_addr",
            "vrrp.checksum.status",
        ],
    );
    let v4: Vec<_> = rows.iter().filter(|r| !r[0].is_empty()).collect();
    let v6: Vec<_> = rows.iter().filter(|r| !r[1].is_empty()).collect();
    assert_eq!(v4.len() + v6.len(), rows.len(), "{rows:?}");
    // 3 s at 100 ms, less tshark's start-up.
    assert!(
        v4.len() >= 15 && v6.len() >= 15,
        "v4 {} v6 {}: {rows:?}",
        v4.len(),
        v6.len()
    );
    for row in &v4 {
        assert_eq!(row[0], ix.ours().to_string());
        assert_eq!(
            row[2..],
            [
                "255",
                "",
                "3",
                "1",
                "51",
                "100",
                "1",
                "10",
                "192.0.2.100",
                "",
                "1"
            ],
            "IPv4 advert decoded as {row:?} (last column: checksum status, 1 = Good)"
        );
    }
    // The VirtualIP lists no link-local and no peer taught one: the VIP alone (what keepalived
    // configured the usual way sends and expects; see e2e_keepalived_ipv6.rs).
    for row in &v6 {
        assert_eq!(
            row[2..],
            [
                "",
                "255",
                "3",
                "1",
                "51",
                "100",
                "1",
                "10",
                "",
                "fd66:7670::100",
                "1"
            ],
            "IPv6 advert decoded as {row:?} (last column: checksum status, 1 = Good)"
        );
    }
    // The message-only reading must fail on our IPv4 adverts: the preference is honoured
    // and we send the pseudo-header form by default.
    let as_v2 = checksum_statuses(&capture, ix.ours(), true);
    assert_eq!(as_v2.len(), v4.len());
    assert!(as_v2.iter().all(|s| s == "0"), "{as_v2:?}");

    // RFC 5798 §5.1.2.1: IPv6 adverts come from the interface's own link-local address,
    // never from the virtual one the master holds (it would make every master look alike).
    let own_ll = ix.lab.node(OURS).ipv6_ll.expect("link-local").to_string();
    let sources: std::collections::BTreeSet<&str> = v6.iter().map(|r| r[1].as_str()).collect();
    assert_eq!(
        sources,
        [own_ll.as_str()].into(),
        "IPv6 advert sources over 3 s"
    );
}
