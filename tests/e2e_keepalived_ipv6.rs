//! IPv6 interoperability with keepalived (Debian's build, as root in network namespaces),
//! v6-only and dual-stack, with keepalived configured both ways its users write it.
//!
//! What keepalived sends and checks (read in its sources, `keepalived/vrrp/vrrp.c`, and seen
//! here): its IPv6 advertisement lists exactly its `virtual_ipaddress` entries, in order; it
//! adds no link-local of its own (it only logs "the first IPv6 VIP address should be link
//! local", an error under `vrrp_strict`). Up to 2.3.2 (Debian 12 ships 2.2.7) it drops every
//! advertisement whose address count differs from its list ("received an unexpected ip
//! number count") or that lacks one of its addresses; 2.3.3 and later only log the count.
//! Our agent lists the link-local first only when the VirtualIP lists one or a peer's
//! advertisement did (see ARCHITECTURE.md, "IPv6 address list"), and accepts any list.
//!
//! Every test builds a two-node lab (our agent on node-a, keepalived on node-b, VRID 51,
//! fd66:7670::100/64 and, dual-stack, 192.0.2.100/24) that its `Drop` removes, also on panic.

mod keepalived_util;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use ferrovip::lab::{master_down_interval, masters_since, skew_time};
use ferrovip::vocab::Family;
use keepalived_util::*;
use nix::sys::signal::Signal;

const INTERVAL: Duration = Duration::from_millis(100);
const STARTUP: Duration = Duration::from_secs(5);
const V6: &[Family] = &[Family::V6];
const DUAL: &[Family] = &[Family::V4, Family::V6];

fn vip6() -> IpAddr {
    IpAddr::V6(VIP6)
}

fn ll6() -> IpAddr {
    IpAddr::V6(LL6)
}

/// What keepalived logs when it drops an advertisement for its address count (≤ 2.3.2, then
/// ≥ 2.3.3) or for a missing address.
const KEEPALIVED_LIST_ERRORS: [&str; 3] = [
    "unexpected ip number count",
    "VIPs but received",
    "not present in",
];

fn assert_no_list_errors(log: &str) {
    for needle in KEEPALIVED_LIST_ERRORS {
        assert!(
            !log.contains(needle),
            "keepalived rejected our address list:\n{log}"
        );
    }
}

/// The address lists of the live IPv6 adverts `node` sent at or after `since`.
fn v6_lists(ix: &Interop, node: usize, since: Instant) -> BTreeSet<Vec<IpAddr>> {
    let source = ix.source(node, Family::V6);
    ix.sniffer
        .events()
        .iter()
        .filter(|e| e.at >= since)
        .filter_map(|e| e.advert())
        .filter(|a| a.vrid == VRID && a.source == source && a.priority > 0)
        .map(|a| a.addresses.clone())
        .collect()
}

/// How many times our agent logged that it learned a link-local.
fn learned_lines(ix: &Interop, id: ferrovip::lab::ProcId) -> Vec<String> {
    ix.log(id)
        .lines()
        .filter(|l| l.contains("link_local_learned"))
        .map(str::to_owned)
        .collect()
}

/// Phase one: keepalived (priority 150) and our agent (100) start together and keepalived
/// must end up the only master of every family, which needs our agent to accept its adverts.
/// Returns (keepalived, our agent).
fn keepalived_leads(
    ix: &Interop,
    ka: &KeepalivedConf,
    ours: &AgentConf,
    families: &[Family],
) -> (ferrovip::lab::ProcId, ferrovip::lab::ProcId) {
    let started = Instant::now();
    let ka_id = ix.start_keepalived(ka);
    let our_id = ix.start_agent(ours);
    assert!(
        ix.wait_log(our_id, "INIT -> BACKUP", STARTUP),
        "agent did not start"
    );
    let our_timer_ends = Instant::now() + master_down_interval(ours.priority, INTERVAL);
    for family in families {
        ix.wait_master_of(
            THEIRS,
            *family,
            started,
            STARTUP + master_down_interval(ka.priority, INTERVAL),
        );
    }
    std::thread::sleep(INTERVAL / 2);
    let until = our_timer_ends + 2 * INTERVAL;
    ix.assert_sole_master_of(
        THEIRS,
        families,
        until
            .saturating_duration_since(Instant::now())
            .max(2 * INTERVAL),
    );
    (ka_id, our_id)
}

/// Phase two: keepalived leaves (SIGTERM, priority-0 adverts); we take over every family
/// Skew_Time after its priority 0 of that family. Returns when SIGTERM was sent.
fn graceful_handover_to_us(
    ix: &Interop,
    ka_id: ferrovip::lab::ProcId,
    families: &[Family],
) -> Instant {
    let stopped_at = Instant::now();
    ix.lab.kill(ka_id, Signal::SIGTERM).expect("signal");
    for family in families {
        let takeover = ix.wait_master_of(OURS, *family, stopped_at, Duration::from_secs(3));
        let theirs = ix.source(THEIRS, *family);
        let release = ix
            .sniffer
            .events()
            .into_iter()
            .filter(|e| e.at >= stopped_at && e.at <= takeover.at)
            .find(|e| {
                e.advert()
                    .is_some_and(|a| a.vrid == VRID && a.source == theirs && a.priority == 0)
            })
            .unwrap_or_else(|| panic!("no {family} priority-0 advert from keepalived"));
        let gap = takeover.at.duration_since(release.at);
        let skew = skew_time(100, INTERVAL);
        assert!(
            within(gap, skew),
            "we took over {family} {} after keepalived's priority 0; Skew_Time is {}",
            ms(gap),
            ms(skew)
        );
        println!(
            "{family}: our takeover {} after keepalived's priority-0 advert (Skew_Time {})",
            ms(gap),
            ms(skew)
        );
        ix.wait_address(OURS, vip_of(*family), true, Duration::from_secs(1));
    }
    assert!(
        ix.lab
            .wait(ka_id, Duration::from_secs(5))
            .unwrap()
            .is_some(),
        "keepalived did not exit on SIGTERM"
    );
    stopped_at
}

/// Phase three: keepalived restarts at priority 50. If it accepts our adverts it stays backup
/// past its Master_Down_Interval; if it drops them it becomes a second master.
fn keepalived_stays_backup_below_us(ix: &Interop, ka: &KeepalivedConf, families: &[Family]) {
    let ka_id = ix.start_keepalived(&ka.clone().priority(50));
    assert!(
        ix.wait_log(ka_id, "Entering BACKUP STATE", STARTUP),
        "keepalived did not start"
    );
    let from = Instant::now();
    std::thread::sleep(master_down_interval(50, INTERVAL) + 3 * INTERVAL);
    let masters = masters_since(&ix.sniffer.events(), VRID, from);
    let log = ix.log(ka_id);
    for family in families {
        let of_family: Vec<IpAddr> = masters
            .iter()
            .copied()
            .filter(|m| Family::of(m) == *family)
            .collect();
        assert_eq!(
            of_family,
            vec![ix.source(OURS, *family)],
            "keepalived (priority 50) did not stay {family} backup behind us:\n{log}"
        );
        assert!(ix.lab.has_address(OURS, vip_of(*family)).unwrap());
        assert!(!ix.lab.has_address(THEIRS, vip_of(*family)).unwrap());
    }
    assert!(!log.contains("Entering MASTER STATE"), "{log}");
    assert_no_list_errors(&log);
}

#[test]
fn netns_keepalived_plain_ipv6_peer_interoperates_both_ways() {
    // keepalived as its users write it: `virtual_ipaddress { fd66:7670::100/64 }`.
    let ix = Interop::new(true);
    let ka = KeepalivedConf::v3(150).ipv6_only();
    let (ka_id, our_id) = keepalived_leads(&ix, &ka, &AgentConf::v3(100).ipv6_only(), V6);
    assert_eq!(
        v6_lists(&ix, THEIRS, ix.sniffer.started_at()),
        [vec![vip6()]].into()
    );
    let stopped_at = graceful_handover_to_us(&ix, ka_id, V6);
    keepalived_stays_backup_below_us(&ix, &ka, V6);
    // We listed the VIP alone, as keepalived does, and learned no link-local.
    assert_eq!(v6_lists(&ix, OURS, stopped_at), [vec![vip6()]].into());
    assert!(learned_lines(&ix, our_id).is_empty());
}

#[test]
fn netns_keepalived_plain_dual_stack_peer_interoperates_both_ways() {
    // One VirtualIP with an IPv4 and an IPv6 address (two instances, VRID 51 each) against
    // keepalived with two vrrp_instances, as a user writes a dual-stack pair.
    let ix = Interop::new(true);
    let ka = KeepalivedConf::v3(150).dual_stack();
    let (ka_id, _) = keepalived_leads(&ix, &ka, &AgentConf::v3(100).ipv6(), DUAL);
    let stopped_at = graceful_handover_to_us(&ix, ka_id, DUAL);
    keepalived_stays_backup_below_us(&ix, &ka, DUAL);
    assert_eq!(v6_lists(&ix, OURS, stopped_at), [vec![vip6()]].into());
}

#[test]
fn netns_keepalived_with_the_ipv6_link_local_teaches_it_to_us() {
    // keepalived configured RFC-style, our VirtualIP without the link-local: we learn it from
    // keepalived's first advert and list it first from then on.
    let ix = Interop::new(true);
    let ka = KeepalivedConf::v3(150).ipv6_only().with_link_local();
    let (ka_id, our_id) = keepalived_leads(&ix, &ka, &AgentConf::v3(100).ipv6_only(), V6);
    assert_eq!(
        v6_lists(&ix, THEIRS, ix.sniffer.started_at()),
        [vec![ll6(), vip6()]].into()
    );
    let learned = learned_lines(&ix, our_id);
    assert_eq!(learned.len(), 1, "logged once: {learned:?}");
    assert!(learned[0].contains(&LL6.to_string()), "{}", learned[0]);
    println!("our agent: {}", learned[0]);
    let stopped_at = graceful_handover_to_us(&ix, ka_id, V6);
    keepalived_stays_backup_below_us(&ix, &ka, V6);
    assert_eq!(
        v6_lists(&ix, OURS, stopped_at),
        [vec![ll6(), vip6()]].into()
    );
    // Learned for the wire, not held: the VirtualIP did not ask for it.
    assert!(!ix.lab.has_address(OURS, ll6()).unwrap());
    assert_eq!(learned_lines(&ix, our_id).len(), 1);
}

#[test]
fn netns_keepalived_dual_stack_with_the_link_local_listed_on_both_sides() {
    // Both sides list the link-local: the lists agree from the first advert, so keepalived
    // joining below us never becomes master, and takes over both families when we crash.
    let ix = Interop::new(true);
    let started = Instant::now();
    let our_id = ix.start_agent(&AgentConf::v3(150).ipv6().with_link_local());
    for family in DUAL {
        ix.wait_master_of(OURS, *family, started, STARTUP);
    }
    // A listed link-local is held like the other addresses.
    ix.wait_address(OURS, ll6(), true, Duration::from_secs(1));
    let ka = KeepalivedConf::v3(100).dual_stack().with_link_local();
    let ka_id = ix.start_keepalived(&ka);
    assert!(ix.wait_log(ka_id, "Entering BACKUP STATE", STARTUP));
    ix.assert_sole_master_of(
        OURS,
        DUAL,
        master_down_interval(100, INTERVAL) + 3 * INTERVAL,
    );
    let log = ix.log(ka_id);
    assert!(!log.contains("Entering MASTER STATE"), "{log}");
    assert_no_list_errors(&log);
    assert_eq!(v6_lists(&ix, OURS, started), [vec![ll6(), vip6()]].into());
    assert!(learned_lines(&ix, our_id).is_empty());

    // We crash: keepalived takes over both families after its Master_Down_Interval.
    let crashed = Instant::now();
    ix.lab.kill(our_id, Signal::SIGKILL).expect("signal");
    for family in DUAL {
        ix.wait_master_of(THEIRS, *family, crashed, Duration::from_secs(2));
        ix.wait_address(THEIRS, vip_of(*family), true, Duration::from_secs(1));
    }
    ix.wait_address(THEIRS, ll6(), true, Duration::from_secs(1));
}

#[test]
fn netns_keepalived_with_the_ipv6_link_local_joining_a_plain_master_yields_once_taught() {
    // The one case the learning cannot make seamless: we are master with the VIP alone and
    // keepalived (configured with the link-local, below us) joins. keepalived ≤ 2.3.2 drops
    // our one-address adverts and becomes master after its Master_Down_Interval; its first
    // advert teaches us the link-local, we advertise it at once and announce the VIP again,
    // and keepalived yields. Listing the link-local in the VirtualIP avoids the overlap (test
    // above).
    let ix = Interop::new(true);
    let started = Instant::now();
    let our_id = ix.start_agent(&AgentConf::v3(150).ipv6_only());
    ix.wait_master_of(OURS, Family::V6, started, STARTUP);
    let ka_id = ix.start_keepalived(&KeepalivedConf::v3(100).ipv6_only().with_link_local());
    assert!(ix.wait_log(ka_id, "Entering BACKUP STATE", STARTUP));
    let joined = Instant::now();
    let settle = master_down_interval(100, INTERVAL) + 5 * INTERVAL;
    std::thread::sleep(settle);
    let theirs = ix.source(THEIRS, Family::V6);
    let their_live: Vec<Instant> = ix
        .sniffer
        .events()
        .iter()
        .filter(|e| e.at >= joined)
        .filter(|e| {
            e.advert()
                .is_some_and(|a| a.vrid == VRID && a.source == theirs && a.priority > 0)
        })
        .map(|e| e.at)
        .collect();
    let old_keepalived = keepalived_version() < (2, 3, 3);
    if old_keepalived {
        assert!(
            !their_live.is_empty(),
            "keepalived {:?} should have dropped our list and advertised",
            keepalived_version()
        );
        // From its first advert as master to our first advert listing the link-local it
        // taught us (sent at once; it accepts it and yields).
        let taught = ix
            .sniffer
            .events()
            .into_iter()
            .filter(|e| e.at >= their_live[0])
            .find(|e| {
                e.advert().is_some_and(|a| {
                    a.vrid == VRID
                        && a.source == ix.source(OURS, Family::V6)
                        && a.addresses == [ll6(), vip6()]
                })
            })
            .expect("our advert with the learned link-local");
        let overlap = taught.at.duration_since(their_live[0]);
        println!(
            "keepalived {:?} was a second master for {} ({} adverts) until our taught advert",
            keepalived_version(),
            ms(overlap),
            their_live.len()
        );
        assert!(
            overlap <= INTERVAL / 2,
            "keepalived stayed master {}",
            ms(overlap)
        );
        ix.wait_address(THEIRS, vip6(), false, Duration::from_secs(1));
        // Its unsolicited NAs (sent before it reads our answer) moved the neighbours to it;
        // ours, sent again 250 ms and 1 s after it taught us, bring them back.
        let their_mac = ix.lab.node(THEIRS).mac.octets();
        let our_mac = ix.lab.node(OURS).mac.octets();
        let theirs_at = ix
            .sniffer
            .events()
            .into_iter()
            .filter(|e| e.at >= joined && e.announced() == Some(vip6()))
            .filter(|e| e.src_mac.octets() == their_mac)
            .map(|e| e.at)
            .max()
            .expect("keepalived announced the VIP as master");
        let ours_after = ix
            .sniffer
            .wait_for(
                |e| {
                    e.at > theirs_at
                        && e.announced() == Some(vip6())
                        && e.src_mac.octets() == our_mac
                },
                Duration::from_secs(2),
            )
            .expect("an NA from us after keepalived's last one");
        println!(
            "our NA for the VIP {} after keepalived's last one",
            ms(ours_after.at.duration_since(theirs_at))
        );
    } else {
        assert!(their_live.is_empty(), "{:?}", their_live.len());
    }
    let learned = learned_lines(&ix, our_id);
    assert_eq!(learned.len(), usize::from(old_keepalived), "{learned:?}");
    // Settled: we alone are master from here on, and keepalived is backup.
    ix.assert_sole_master_of(OURS, V6, master_down_interval(100, INTERVAL) + 3 * INTERVAL);
    let log = ix.log(ka_id);
    assert!(
        log.trim_end()
            .rsplit_once("Entering ")
            .is_some_and(|(_, last)| last.starts_with("BACKUP STATE")),
        "{log}"
    );
}
