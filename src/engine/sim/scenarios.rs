//! Multi-router scenarios on the simulated LAN, with exact virtual-clock timings.
//!
//! Unless a test says otherwise: VRRPv3, 100 ms adverts, preemption on, 1 ms LAN latency.
//! Timer figures (RFC 5798 §6.1): Master_Down_Interval = 300 ms + (256 − priority)/256 × 100 ms,
//! i.e. 321.875 ms at priority 200, 341.40625 ms at 150, 360.9375 ms at 100.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::{Lan, NodeId};
use crate::vocab::Version;
use crate::vrrp::instance::{Config, Input, Reason, State};

const LATENCY: Duration = Duration::from_millis(1);
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 100));

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn ns(n: u64) -> Duration {
    Duration::from_nanos(n)
}

/// Master_Down_Interval at 100 ms adverts.
fn mdi(priority: u8) -> Duration {
    ms(300) + skew(priority)
}

/// Skew_Time at 100 ms adverts.
fn skew(priority: u8) -> Duration {
    ms(100) * (256 - u32::from(priority)) / 256
}

fn router(last: u8, priority: u8) -> Config {
    Config {
        vrid: 7,
        version: Version::V3,
        priority,
        advert_interval: ms(100),
        preempt: true,
        preempt_delay: Duration::ZERO,
        accept_mode: false,
        addresses: vec![IpNet::new(VIP, 24).unwrap()],
        primary_address: ip(last),
    }
}

/// Every router started at once.
fn started(configs: impl IntoIterator<Item = Config>) -> Lan {
    let mut lan = lan_of(configs);
    lan.start_all();
    lan
}

/// Router 0 alone until `at`, when router 1 joins it.
fn joining(configs: impl IntoIterator<Item = Config>, at: Duration) -> Lan {
    let mut lan = lan_of(configs);
    lan.start(0);
    lan.run_until(at);
    lan.start(1);
    lan
}

/// A router that does not preempt a lower-priority master.
fn patient(last: u8, priority: u8) -> Config {
    Config {
        preempt: false,
        ..router(last, priority)
    }
}

fn lan_of(configs: impl IntoIterator<Item = Config>) -> Lan {
    let mut lan = Lan::new(LATENCY);
    for config in configs {
        lan.add(config);
    }
    lan
}

#[track_caller]
fn assert_sole_master(lan: &Lan, master: NodeId) {
    assert_eq!(lan.masters(), vec![master], "masters");
    assert_eq!(lan.holders(VIP), vec![master], "VIP holders");
    assert_eq!(lan.instance(master).master(), Some(ip_of(lan, master)));
    for node in 0..lan.len() {
        if node != master && lan.is_alive(node) && lan.state(node) != State::Initialize {
            assert_eq!(lan.state(node), State::Backup, "node {node}");
            assert_eq!(
                lan.instance(node).master(),
                Some(ip_of(lan, master)),
                "node {node} knows the master"
            );
        }
    }
}

fn ip_of(lan: &Lan, node: NodeId) -> IpAddr {
    lan.instance(node).config().primary_address
}

/// When `to` last received an advertisement from `from` strictly before `before` (constant
/// latency, so arrival = send + latency).
fn last_arrival(lan: &Lan, from: NodeId, before: Duration) -> Duration {
    lan.sent_by(from)
        .iter()
        .map(|s| s.at + LATENCY)
        .filter(|&arrival| arrival < before)
        .max()
        .expect("an advertisement arrived")
}

/// The times `node` became Master, with the reasons.
fn became_master(lan: &Lan, node: NodeId) -> Vec<(Duration, Reason)> {
    lan.transitions_to(node, State::Master)
        .iter()
        .map(|t| (t.at, t.reason))
        .collect()
}

fn became_backup(lan: &Lan, node: NodeId) -> Vec<(Duration, Reason)> {
    lan.transitions_to(node, State::Backup)
        .iter()
        .map(|t| (t.at, t.reason))
        .filter(|(_, reason)| *reason != Reason::Startup)
        .collect()
}

#[test]
fn timer_figures_match_the_rfc_example() {
    assert_eq!(mdi(100), ns(360_937_500));
    assert_eq!(mdi(150), ns(341_406_250));
    assert_eq!(mdi(200), ns(321_875_000));
    assert_eq!(skew(150), ns(41_406_250));
}

#[test]
fn election_highest_priority_wins() {
    let mut lan = started([router(1, 100), router(2, 200), router(3, 150)]);
    lan.run_for(ms(5000));
    assert_sole_master(&lan, 1);
    // The best backup's timer fires first and its advert stops the others: one election only.
    assert_eq!(
        became_master(&lan, 1),
        vec![(mdi(200), Reason::MasterDown { last_master: None })]
    );
    let masters = lan
        .transitions()
        .iter()
        .filter(|t| t.to == State::Master)
        .count();
    assert_eq!(masters, 1);
    assert_eq!(lan.announcements(1), 1);
    // 100 ms adverts from 321.875 ms on.
    assert_eq!(lan.sent_by(1).len(), 47);
}

#[test]
fn election_equal_priority_highest_address_wins() {
    let mut lan = started([router(1, 100), router(3, 100), router(2, 100)]);
    lan.run_for(ms(5000));
    assert_sole_master(&lan, 1);
    // All three timers fire together; the two lower addresses yield on the first advert.
    for loser in [0, 2] {
        assert_eq!(became_master(&lan, loser).len(), 1);
        assert_eq!(
            became_backup(&lan, loser),
            vec![(mdi(100) + LATENCY, Reason::TieBreak { from: ip(3) })]
        );
    }
}

#[test]
fn equal_priority_does_not_preempt_an_established_master() {
    let mut lan = joining([router(1, 100), router(3, 100)], ms(2000));
    lan.run_for(ms(8000));
    // RFC 5798 §6.4.2: a backup accepts adverts of priority >= its own; the address only
    // breaks ties between two masters.
    assert_sole_master(&lan, 0);
    assert!(became_master(&lan, 1).is_empty());
}

#[test]
fn crash_failover_at_last_advert_plus_master_down_interval() {
    let mut lan = started([router(1, 200), router(2, 100)]);
    lan.run_until(ms(1050));
    assert_sole_master(&lan, 0);
    assert_eq!(lan.instance(1).master_down_interval(), ns(360_937_500));
    lan.crash(0);
    lan.run_until(ms(3000));
    let last = last_arrival(&lan, 0, ms(1050));
    assert_eq!(last, mdi(200) + ms(700) + LATENCY);
    let takeover = last + ns(360_937_500);
    assert_eq!(takeover, ns(1_383_812_500));
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            takeover,
            Reason::MasterDown {
                last_master: Some(ip(1))
            }
        )]
    );
    assert_sole_master(&lan, 1);
    assert_eq!(lan.announcements(1), 1);
}

#[test]
fn higher_priority_backup_preempts() {
    let mut lan = lan_of([router(1, 100), router(2, 200)]);
    lan.start(0);
    lan.run_until(ms(1000));
    assert_sole_master(&lan, 0);
    lan.start(1);
    lan.run_until(ms(3000));
    // Every lower advert is discarded, so the startup timer runs out untouched.
    let takeover = ms(1000) + mdi(200);
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            takeover,
            Reason::Preempt {
                from: ip(1),
                priority: 100
            }
        )]
    );
    assert_eq!(
        became_backup(&lan, 0),
        vec![(
            takeover + LATENCY,
            Reason::HigherPriority {
                from: ip(2),
                priority: 200
            }
        )]
    );
    assert_sole_master(&lan, 1);
    assert!(lan.instance(1).counters().discarded_lower_priority >= 3);
}

#[test]
fn higher_priority_backup_without_preemption_waits_for_a_failure() {
    let mut lan = joining([router(1, 100), patient(2, 200)], ms(1000));
    lan.run_until(ms(10_000));
    assert_sole_master(&lan, 0);
    assert_eq!(lan.instance(1).counters().discarded_lower_priority, 0);
    lan.crash(0);
    lan.run_until(ms(11_000));
    assert_sole_master(&lan, 1);
    // Back from the crash, the old master is now the lower one and stays backup.
    lan.restart(0);
    lan.run_until(ms(15_000));
    assert_sole_master(&lan, 1);
}

#[test]
fn preempt_delay_holds_off_from_startup() {
    let mut lan = joining(
        [
            router(1, 100),
            Config {
                preempt_delay: ms(2000),
                ..router(2, 200)
            },
        ],
        ms(1000),
    );
    lan.run_until(ms(6000));
    let hold_ends = ms(3000);
    let last_accepted = last_arrival(&lan, 0, hold_ends);
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            last_accepted + mdi(200),
            Reason::Preempt {
                from: ip(1),
                priority: 100
            }
        )]
    );
    assert!(last_accepted + mdi(200) > hold_ends);
    assert_sole_master(&lan, 1);
}

#[test]
fn preempt_delay_restarts_on_first_seeing_a_lower_master() {
    // A (250) is master; B (200) has a 1 s preempt delay; C (100) preempts at once.
    let mut lan = started([
        router(1, 250),
        Config {
            preempt_delay: ms(1000),
            ..router(2, 200)
        },
        router(3, 100),
    ]);
    lan.run_until(ms(5000));
    assert_sole_master(&lan, 0);
    // B's startup hold has long expired, but seeing A (higher) reset it.
    lan.input(0, Input::SetPriority(50));
    lan.run_until(ms(9000));
    let first_lower_sent = lan
        .sent_by(0)
        .iter()
        .find(|s| s.advertisement.priority == 50)
        .unwrap()
        .at;
    let last_high = last_arrival(&lan, 0, first_lower_sent + LATENCY);
    // C takes over first, on its own timer.
    assert_eq!(
        became_master(&lan, 2),
        vec![(
            last_high + mdi(100),
            Reason::Preempt {
                from: ip(1),
                priority: 50
            }
        )]
    );
    // B waits one second from the first lower advert it saw, then preempts C.
    let hold_ends = first_lower_sent + LATENCY + ms(1000);
    let b = became_master(&lan, 1);
    assert_eq!(b.len(), 1);
    let (at, reason) = b[0];
    assert_eq!(
        reason,
        Reason::Preempt {
            from: ip(3),
            priority: 100
        }
    );
    assert!(
        at > hold_ends && at <= hold_ends + ms(100) + mdi(200),
        "{at:?}"
    );
    assert_sole_master(&lan, 1);
}

#[test]
fn graceful_shutdown_hands_over_within_skew_time() {
    let mut lan = started([router(1, 200), router(2, 150), router(3, 100)]);
    lan.run_until(ms(2050));
    assert_sole_master(&lan, 0);
    lan.input(0, Input::Shutdown);
    assert_eq!(lan.state(0), State::Initialize);
    assert!(lan.holders(VIP).is_empty());
    lan.run_until(ms(5000));
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            ms(2050) + LATENCY + skew(150),
            Reason::PriorityZero { from: ip(1) }
        )]
    );
    assert!(skew(150) < ms(42));
    assert!(became_master(&lan, 2).is_empty());
    assert_sole_master(&lan, 1);
    // The restarted router preempts again.
    lan.start(0);
    lan.run_until(ms(6000));
    assert_sole_master(&lan, 0);
}

/// The takeover histogram's (count, sum) of one node and cause on `eth0`, IPv4.
fn takeovers(lan: &Lan, node: NodeId, cause: &str) -> Option<(u64, f64)> {
    lan.stats(node)
        .takeovers()
        .into_iter()
        .find(|((interface, family, c), _)| {
            &**interface == "eth0" && *family == crate::vocab::Family::V4 && *c == cause
        })
        .map(|(_, figures)| (figures.count, figures.sum))
}

#[test]
fn takeover_time_is_master_down_interval_after_a_crash_and_skew_time_after_priority_zero() {
    let mut lan = started([router(1, 200), router(2, 150), router(3, 100)]);
    lan.run_until(ms(1050));
    assert_sole_master(&lan, 0);
    // Became master from init with no advert heard: no takeover figure.
    let first = lan.transitions_to(0, State::Master);
    assert_eq!(first.len(), 1);
    assert_eq!(first[0].unannounced, None);
    assert!(lan.stats(0).takeovers().is_empty());

    // The master crashes: the best backup waits Master_Down_Interval from its last advert.
    lan.crash(0);
    lan.run_until(ms(3050));
    assert_sole_master(&lan, 1);
    let crash = lan.transitions_to(1, State::Master);
    assert_eq!(crash.len(), 1);
    assert_eq!(
        crash[0].at,
        last_arrival(&lan, 0, ms(1050)) + mdi(150),
        "the takeover comes Master_Down_Interval after the last advert"
    );
    assert_eq!(crash[0].unannounced, Some(mdi(150)));
    let (count, sum) = takeovers(&lan, 1, "master_down").expect("a master_down observation");
    assert_eq!(count, 1);
    assert!((sum - mdi(150).as_secs_f64()).abs() < 1e-9, "{sum}");

    // The new master leaves with priority 0: the last backup takes over after Skew_Time.
    lan.input(1, Input::Shutdown);
    lan.run_until(ms(5000));
    assert_sole_master(&lan, 2);
    let release = lan.transitions_to(2, State::Master);
    assert_eq!(release.len(), 1);
    assert_eq!(release[0].reason, Reason::PriorityZero { from: ip(2) });
    assert_eq!(release[0].at, ms(3050) + LATENCY + skew(100));
    assert_eq!(release[0].unannounced, Some(skew(100)));
    let (count, sum) = takeovers(&lan, 2, "priority_zero").expect("a priority_zero observation");
    assert_eq!(count, 1);
    assert!((sum - skew(100).as_secs_f64()).abs() < 1e-9, "{sum}");
    assert_eq!(lan.stats(2).takeovers().len(), 1, "nothing else observed");
}

#[test]
fn partition_makes_two_masters_and_healing_keeps_the_right_one() {
    let mut lan = started([router(1, 200), router(2, 150), router(3, 100)]);
    lan.run_until(ms(2000));
    assert_sole_master(&lan, 0);
    lan.partition(&[&[0], &[1, 2]]);
    lan.run_until(ms(4000));
    assert_eq!(lan.masters(), vec![0, 1]);
    assert_eq!(lan.holders(VIP), vec![0, 1]);
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            last_arrival(&lan, 0, ms(2000)) + mdi(150),
            Reason::MasterDown {
                last_master: Some(ip(1))
            }
        )]
    );
    assert_eq!(lan.state(2), State::Backup);
    assert_eq!(lan.instance(2).master(), Some(ip(2)));
    lan.heal();
    lan.run_until(ms(6000));
    assert_sole_master(&lan, 0);
    let demoted = became_backup(&lan, 1);
    assert_eq!(demoted.len(), 1);
    assert_eq!(
        demoted[0].1,
        Reason::HigherPriority {
            from: ip(1),
            priority: 200
        }
    );
    assert!(demoted[0].0 <= ms(4000) + ms(100) + LATENCY);
}

#[test]
fn isolating_everyone_makes_everyone_master() {
    let mut lan = started([router(1, 200), router(2, 150), router(3, 100)]);
    lan.run_until(ms(1000));
    lan.partition(&[]);
    lan.run_until(ms(2000));
    assert_eq!(lan.masters(), vec![0, 1, 2]);
    lan.heal();
    lan.run_until(ms(3000));
    assert_sole_master(&lan, 0);
}

#[test]
fn raising_a_backup_moves_mastership_within_master_down_interval() {
    let mut lan = started([router(1, 200), router(2, 100)]);
    lan.run_until(ms(2000));
    lan.input(1, Input::SetPriority(250));
    lan.run_until(ms(4000));
    // The timer armed by the last accepted advert keeps running; later ones are discarded.
    let takeover = last_arrival(&lan, 0, ms(2000)) + mdi(100);
    assert!(takeover < ms(2000) + mdi(100));
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            takeover,
            Reason::Preempt {
                from: ip(1),
                priority: 200
            }
        )]
    );
    assert_eq!(
        became_backup(&lan, 0),
        vec![(
            takeover + LATENCY,
            Reason::HigherPriority {
                from: ip(2),
                priority: 250
            }
        )]
    );
    assert_sole_master(&lan, 1);
}

#[test]
fn lowering_the_master_moves_mastership_to_a_preempting_backup() {
    let mut lan = started([router(1, 200), router(2, 100)]);
    lan.run_until(ms(2000));
    lan.input(0, Input::SetPriority(50));
    lan.run_until(ms(4000));
    let lowered = lan
        .sent_by(0)
        .iter()
        .find(|s| s.advertisement.priority == 50)
        .unwrap()
        .at;
    assert_eq!(
        lowered,
        ms(2000) + ns(21_875_000),
        "the next advert carries it"
    );
    let takeover = last_arrival(&lan, 0, lowered + LATENCY) + mdi(100);
    assert_eq!(
        became_master(&lan, 1),
        vec![(
            takeover,
            Reason::Preempt {
                from: ip(1),
                priority: 50
            }
        )]
    );
    assert_sole_master(&lan, 1);
}

#[test]
fn lowering_the_master_changes_nothing_without_preemption() {
    let mut lan = started([router(1, 200), patient(2, 100)]);
    lan.run_until(ms(2000));
    lan.input(0, Input::SetPriority(50));
    lan.run_until(ms(5000));
    assert_sole_master(&lan, 0);
}

#[test]
fn owner_takes_over_at_once_and_never_yields_to_lower() {
    let mut lan = joining([router(1, 100), patient(2, 255)], ms(1000));
    assert_eq!(became_master(&lan, 1), vec![(ms(1000), Reason::Owner)]);
    lan.run_until(ms(2000));
    assert_eq!(
        became_backup(&lan, 0),
        vec![(
            ms(1000) + LATENCY,
            Reason::HigherPriority {
                from: ip(2),
                priority: 255
            }
        )]
    );
    // A higher address with the highest backup priority still cannot win a tie or preempt.
    lan.input(0, Input::SetPriority(254));
    lan.run_until(ms(4000));
    assert_sole_master(&lan, 1);
    assert_eq!(lan.instance(1).counters().discarded_lower_priority, 0);
    // Failover away from the owner and straight back when it returns.
    lan.crash(1);
    lan.run_until(ms(5000));
    assert_sole_master(&lan, 0);
    lan.restart(1);
    assert_eq!(lan.state(1), State::Master);
    lan.run_until(ms(5100));
    assert_sole_master(&lan, 1);
}

#[test]
fn v2_failover_uses_seconds_and_the_v2_skew() {
    let v2 = |last, priority| Config {
        version: Version::V2,
        advert_interval: ms(1000),
        ..router(last, priority)
    };
    let mut lan = started([v2(1, 200), v2(2, 100)]);
    lan.run_until(ms(10_500));
    // Priority 200 in v2: 3 s + 56/256 s.
    assert_eq!(became_master(&lan, 0)[0].0, ns(3_218_750_000));
    assert_sole_master(&lan, 0);
    lan.crash(0);
    lan.run_until(ms(20_000));
    let takeover = last_arrival(&lan, 0, ms(10_500)) + ns(3_609_375_000);
    assert_eq!(became_master(&lan, 1)[0].0, takeover);
    assert_sole_master(&lan, 1);
}

#[test]
fn v2_interval_mismatch_is_discarded_on_both_sides() {
    let mut lan = started([
        Config {
            version: Version::V2,
            advert_interval: ms(1000),
            ..router(1, 200)
        },
        Config {
            version: Version::V2,
            advert_interval: ms(2000),
            ..router(2, 100)
        },
    ]);
    lan.run_until(ms(20_000));
    // RFC 3768 §7.1: misconfigured peers do not see each other, so both are master.
    assert_eq!(lan.masters(), vec![0, 1]);
    for node in [0, 1] {
        let counters = lan.instance(node).counters();
        assert!(counters.discarded_interval_mismatch > 0, "node {node}");
        assert_eq!(
            counters.discarded_interval_mismatch,
            counters.adverts_received
        );
    }
}

#[test]
fn v3_backup_learns_a_slower_masters_interval() {
    let mut lan = joining(
        [
            Config {
                advert_interval: ms(1000),
                ..router(1, 200)
            },
            router(2, 100),
        ],
        ms(5000),
    );
    lan.run_until(ms(20_500));
    // With its own 100 ms it would declare the master down between every pair of adverts.
    assert_sole_master(&lan, 0);
    assert!(became_master(&lan, 1).is_empty());
    assert_eq!(lan.instance(1).master_adver_interval(), ms(1000));
    assert_eq!(lan.instance(1).master_down_interval(), ns(3_609_375_000));
    lan.crash(0);
    lan.run_until(ms(30_000));
    let takeover = last_arrival(&lan, 0, ms(20_500)) + ns(3_609_375_000);
    assert_eq!(became_master(&lan, 1)[0].0, takeover);
    // As master it advertises at its own interval again.
    assert_eq!(lan.instance(1).master_adver_interval(), ms(100));
    let sent = lan.sent_by(1);
    assert_eq!(sent[1].at - sent[0].at, ms(100));
}

#[test]
fn four_routers_fail_over_in_priority_order_and_recover() {
    let priorities = [250, 200, 150, 100];
    let mut lan = started(
        priorities
            .iter()
            .zip(1..)
            .map(|(&priority, last)| router(last, priority)),
    );
    lan.run_until(ms(1000));
    assert_sole_master(&lan, 0);
    for failed in 0..3 {
        let now = lan.now();
        lan.crash(failed);
        lan.run_until(now + ms(1000));
        let next = failed + 1;
        assert_eq!(
            became_master(&lan, next),
            vec![(
                last_arrival(&lan, failed, now) + mdi(priorities[next]),
                Reason::MasterDown {
                    last_master: Some(ip_of(&lan, failed))
                }
            )]
        );
        assert_sole_master(&lan, next);
    }
    // Coming back lowest first, each returning router preempts the current master.
    for back in (0..3).rev() {
        let now = lan.now();
        lan.restart(back);
        lan.run_until(now + ms(1000));
        assert_sole_master(&lan, back);
        assert_eq!(
            became_master(&lan, back).last().unwrap().0,
            now + mdi(priorities[back])
        );
    }
}

#[test]
fn ipv6_link_local_tie_break() {
    let v6 = |last: u16| Config {
        addresses: vec![
            "fe80::100/64".parse().unwrap(),
            "2001:db8::100/64".parse().unwrap(),
        ],
        primary_address: IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last)),
        ..router(1, 100)
    };
    let mut lan = started([v6(0x10), v6(0x0a), v6(0x0f)]);
    lan.run_until(ms(3000));
    assert_eq!(lan.masters(), vec![0]);
    let global: IpAddr = "2001:db8::100".parse().unwrap();
    assert_eq!(lan.holders(global), vec![0]);
    let advert = &lan.sent_by(0)[0].advertisement;
    assert_eq!(advert.addresses[0], "fe80::100".parse::<IpAddr>().unwrap());
}

/// The IPvX lists of every advert `node` sent at or after `since`.
fn lists_sent(lan: &Lan, node: NodeId, since: Duration) -> BTreeSet<Vec<IpAddr>> {
    lan.sent_by(node)
        .iter()
        .filter(|s| s.at >= since && s.advertisement.priority > 0)
        .map(|s| s.advertisement.addresses.clone())
        .collect()
}

#[test]
fn ipv6_a_link_local_is_listed_first_only_once_a_router_of_the_lan_is_configured_with_it() {
    let global: IpAddr = "2001:db8::100".parse().unwrap();
    // fe80::200:5eff:fe00:207: VRID 7's virtual link-local, as an older ferrovip made it up
    // and as keepalived users who follow the RFC list it.
    let virtual_ll: IpAddr = "fe80::200:5eff:fe00:207".parse().unwrap();
    let v6 = |last: u16, priority: u8, link_local: bool| {
        let mut addresses = vec![IpNet::new(global, 64).unwrap()];
        if link_local {
            addresses.insert(0, IpNet::new(virtual_ll, 64).unwrap());
        }
        Config {
            addresses,
            primary_address: IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, last)),
            ..router(1, priority)
        }
    };
    // Plain routers (the default plan): every advert lists the global address alone.
    let mut lan = started([
        v6(0x10, 200, false),
        v6(0x0a, 150, false),
        v6(0x0f, 100, false),
    ]);
    lan.run_until(ms(1000));
    assert_eq!(lan.masters(), vec![0]);
    assert_eq!(lan.holders(global), vec![0]);
    assert_eq!(lists_sent(&lan, 0, ms(0)), [vec![global]].into());

    // A router configured with the link-local joins above them and preempts: the others
    // accept its longer list, and learn the link-local from it.
    let joined = lan.add(v6(0x20, 250, true));
    lan.start(joined);
    lan.run_until(ms(2000));
    assert_eq!(lan.masters(), vec![joined]);
    assert_eq!(lan.holders(global), vec![joined]);
    assert_eq!(
        lan.holders(virtual_ll),
        vec![joined],
        "it holds what it lists"
    );
    for node in 0..3 {
        assert_eq!(
            lan.instance(node).learned_link_local(),
            Some("fe80::200:5eff:fe00:207".parse().unwrap()),
            "node {node}"
        );
    }

    // It crashes: the highest plain router takes over listing the link-local first (so a
    // keepalived peer configured like the crashed one accepts it), holding only its own
    // addresses; every election stayed single-mastered.
    let crashed = lan.now();
    lan.crash(joined);
    lan.run_until(crashed + ms(1000));
    assert_eq!(lan.masters(), vec![0]);
    assert_eq!(lan.holders(global), vec![0]);
    assert!(lan.holders(virtual_ll).is_empty());
    assert_eq!(
        lists_sent(&lan, 0, crashed),
        [vec![virtual_ll, global]].into()
    );
    assert_eq!(became_master(&lan, 0).len(), 2);
    assert_eq!(became_master(&lan, joined).len(), 1);
    assert!(became_master(&lan, 1).is_empty() && became_master(&lan, 2).is_empty());
}

#[test]
fn reconfiguring_the_master_moves_addresses_without_an_election() {
    let mut lan = started([router(1, 200), router(2, 100)]);
    lan.run_until(ms(1000));
    let extra: IpAddr = "10.0.0.101".parse().unwrap();
    let mut config = router(1, 200);
    config.addresses.push(IpNet::new(extra, 24).unwrap());
    lan.input(0, Input::Reconfigure(config));
    assert_eq!(lan.holders(extra), vec![0]);
    assert_eq!(lan.announcements(0), 2);
    lan.run_until(ms(3000));
    assert_sole_master(&lan, 0);
    // The backup sees the new list (and would log the difference until it is reconfigured).
    assert!(lan.instance(1).counters().address_list_mismatch > 0);
    assert_eq!(lan.transitions().len(), 3);
}

// ---------------------------------------------------------------------------------------------
// Address lifetimes and repair

fn vip_net() -> IpNet {
    IpNet::new(VIP, 24).unwrap()
}

#[test]
fn a_hung_masters_address_expires_within_its_lifetime_and_after_resuming_one_master_holds_it() {
    let mut lan = lan_of([router(1, 200), router(2, 100)]);
    lan.set_address_lifetime(Some(Duration::from_secs(1)));
    lan.start_all();
    lan.run_for(ms(2000));
    assert_sole_master(&lan, 0);

    let hung_at = lan.now();
    lan.hang(0);
    // The backup takes over after Master_Down_Interval; meanwhile the hung node still holds
    // the address: no more than a lifetime after its last renewal.
    lan.run_until(hung_at + mdi(100) + ms(2));
    assert_eq!(lan.masters(), vec![1]);
    assert_eq!(lan.holders(VIP), vec![0, 1]);
    lan.run_until(hung_at + Duration::from_secs(1));
    assert_eq!(lan.holders(VIP), vec![1], "the hung node's address expired");

    // Resumed with the higher priority: it reasserts at once, the backup yields, and the
    // expired address is added back and announced.
    lan.run_until(hung_at + Duration::from_secs(3));
    let announced = lan.announcements(0);
    lan.resume(0);
    lan.run_for(ms(500));
    assert_sole_master(&lan, 0);
    assert!(
        lan.announcements(0) > announced,
        "the address put back was announced"
    );
    assert!(
        became_master(&lan, 0).len() == 1,
        "no new election on resume"
    );
    assert_eq!(
        became_backup(&lan, 1).last().map(|(_, r)| r.code()),
        Some("higher_priority")
    );
}

#[test]
fn a_deleted_address_is_put_back_and_one_that_keeps_vanishing_hands_over_to_the_backup() {
    let mut lan = started([router(1, 200), router(2, 100)]);
    lan.run_for(ms(1000));
    assert_sole_master(&lan, 0);
    let announced = lan.announcements(0);
    lan.delete_address(0, vip_net());
    assert_eq!(lan.holders(VIP), vec![0], "put back at once");
    assert_eq!(lan.announcements(0), announced + 1);
    lan.run_for(ms(300));
    assert_sole_master(&lan, 0);

    // Three more within the window: the master steps down with priority 0 and the backup
    // takes over after Skew_Time.
    for _ in 0..2 {
        lan.delete_address(0, vip_net());
        lan.run_for(ms(100));
    }
    let stepped_down = lan.now();
    lan.delete_address(0, vip_net());
    assert_eq!(lan.state(0), State::Initialize);
    lan.run_until(stepped_down + skew(100) + LATENCY + ms(1));
    assert_eq!(lan.masters(), vec![1]);
    let took_over = became_master(&lan, 1);
    assert_eq!(
        took_over.last().map(|(_, r)| r.code()),
        Some("priority_zero")
    );
    assert_eq!(lan.holders(VIP), vec![1]);
    assert!(
        lan.transitions()
            .iter()
            .any(|t| t.node == 0 && t.reason == Reason::AddressFault)
    );

    // Node 0 sits out its back-off, then runs again and, preferred, preempts.
    lan.run_until(stepped_down + Duration::from_secs(9));
    assert_eq!(lan.masters(), vec![1]);
    lan.run_until(stepped_down + Duration::from_secs(11));
    assert_sole_master(&lan, 0);
}
