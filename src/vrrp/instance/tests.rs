//! Single-instance tests: one input at a time, every output and timer checked exactly.
//! Multi-router behaviour (elections, failover, partitions) is in `vrrp::sim`.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::*;

const OWN: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10));
const LOWER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 9));
const HIGHER: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 11));
const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 100));

fn vip_net() -> IpNet {
    "192.168.1.100/24".parse().unwrap()
}

fn config(priority: u8) -> Config {
    Config {
        vrid: 51,
        version: Version::V3,
        priority,
        advert_interval: Duration::from_millis(100),
        preempt: true,
        preempt_delay: Duration::ZERO,
        accept_mode: false,
        addresses: vec![vip_net()],
        primary_address: OWN,
    }
}

fn v2_config(priority: u8, interval_secs: u64) -> Config {
    Config {
        version: Version::V2,
        advert_interval: Duration::from_secs(interval_secs),
        ..config(priority)
    }
}

fn advert(priority: u8, interval: u16) -> Advertisement {
    Advertisement {
        version: Version::V3,
        vrid: 51,
        priority,
        interval,
        addresses: vec![VIP],
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// One instance on a virtual clock.
struct Harness {
    epoch: Instant,
    instance: Instance,
    out: Vec<Output>,
}

impl Harness {
    fn new(config: Config) -> Self {
        Harness {
            epoch: Instant::now(),
            instance: Instance::new(config),
            out: Vec::new(),
        }
    }

    fn started(config: Config) -> Self {
        let mut harness = Harness::new(config);
        harness.input(Duration::ZERO, Input::Startup);
        harness
    }

    fn at(&self, offset: Duration) -> Instant {
        self.epoch + offset
    }

    /// Handles one input at `offset` from the epoch and returns its outputs.
    fn input(&mut self, offset: Duration, input: Input) -> Vec<Output> {
        self.out.clear();
        let now = self.at(offset);
        self.instance.handle(now, input, &mut self.out);
        self.out.clone()
    }

    fn receive(
        &mut self,
        offset: Duration,
        source: IpAddr,
        advertisement: Advertisement,
    ) -> Vec<Output> {
        self.input(
            offset,
            Input::Advertisement {
                source,
                advertisement,
            },
        )
    }

    fn deadline(&self) -> Option<Duration> {
        self.instance.deadline().map(|d| d - self.epoch)
    }
}

fn sent_priority(outputs: &[Output]) -> Vec<u8> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send(a) => Some(a.priority),
            _ => None,
        })
        .collect()
}

fn transition(from: State, to: State, reason: Reason) -> Output {
    Output::Transition {
        from,
        to,
        reason,
        unannounced: None,
    }
}

/// Backup → Master, `unannounced` after the last advertisement heard.
fn takeover(reason: Reason, unannounced: Duration) -> Output {
    Output::Transition {
        from: State::Backup,
        to: State::Master,
        reason,
        unannounced: Some(unannounced),
    }
}

#[test]
fn new_instance_waits_in_initialize() {
    let mut h = Harness::new(config(100));
    assert_eq!(h.instance.state(), State::Initialize);
    assert_eq!(h.instance.deadline(), None);
    assert_eq!(h.instance.master(), None);
    assert!(h.input(ms(5), Input::Timer).is_empty());
    assert!(h.receive(ms(5), HIGHER, advert(200, 10)).is_empty());
    assert_eq!(h.instance.counters().discarded_not_running, 1);
    assert!(h.input(ms(5), Input::Shutdown).is_empty());
    assert_eq!(h.instance.state(), State::Initialize);
}

#[test]
fn startup_below_owner_waits_master_down_interval_as_backup() {
    let mut h = Harness::new(config(100));
    let out = h.input(ms(7), Input::Startup);
    assert_eq!(
        out,
        vec![transition(
            State::Initialize,
            State::Backup,
            Reason::Startup
        )]
    );
    assert_eq!(h.instance.state(), State::Backup);
    assert_eq!(
        h.deadline(),
        Some(ms(7) + Duration::from_nanos(360_937_500))
    );
    // A second Startup is not a restart.
    assert!(h.input(ms(8), Input::Startup).is_empty());
}

#[test]
fn owner_starts_as_master_and_advertises_at_once() {
    let mut h = Harness::new(config(255));
    let out = h.input(ms(3), Input::Startup);
    assert_eq!(
        out,
        vec![
            Output::Send(advert(255, 10)),
            Output::AddAddresses(vec![vip_net()].into()),
            Output::Announce(vec![VIP].into()),
            transition(State::Initialize, State::Master, Reason::Owner),
        ]
    );
    assert_eq!(h.instance.master(), Some(OWN));
    assert_eq!(h.deadline(), Some(ms(103)));
    assert_eq!(h.instance.counters().adverts_sent, 1);
}

#[test]
fn timers_follow_the_rfc_formulas_exactly() {
    let cases = [
        // (version, priority, interval, skew, master down interval)
        (Version::V3, 100, ms(100), 60_937_500, 360_937_500),
        (Version::V3, 100, ms(1000), 609_375_000, 3_609_375_000),
        (Version::V3, 200, ms(100), 21_875_000, 321_875_000),
        (Version::V3, 254, ms(10), 78_125, 30_078_125),
        (Version::V3, 1, ms(40_950), 40_790_039_062, 163_640_039_062),
        // v2 skew is (256 - priority)/256 s whatever the interval.
        (Version::V2, 100, ms(1000), 609_375_000, 3_609_375_000),
        (Version::V2, 100, ms(2000), 609_375_000, 6_609_375_000),
        (Version::V2, 254, ms(1000), 7_812_500, 3_007_812_500),
    ];
    for (version, priority, interval, skew, mdi) in cases {
        let instance = Instance::new(Config {
            version,
            advert_interval: interval,
            ..config(priority)
        });
        assert_eq!(
            instance.skew_time(),
            Duration::from_nanos(skew),
            "{version} {priority} {interval:?}"
        );
        assert_eq!(
            instance.master_down_interval(),
            Duration::from_nanos(mdi),
            "{version} {priority} {interval:?}"
        );
    }
}

#[test]
fn intervals_are_quantised_to_the_wire_field() {
    let with = |version, interval| Config {
        version,
        advert_interval: interval,
        ..config(100)
    };
    let v3 = |interval| with(Version::V3, interval);
    let v2 = |interval| with(Version::V2, interval);
    assert_eq!(v3(ms(100)).wire_interval(), 10);
    assert_eq!(v3(ms(1000)).wire_interval(), 100);
    assert_eq!(v3(ms(105)).wire_interval(), 10);
    assert_eq!(v3(ms(105)).effective_advert_interval(), ms(100));
    assert_eq!(v3(ms(1)).wire_interval(), 1);
    assert_eq!(v3(Duration::from_secs(100)).wire_interval(), 4095);
    assert_eq!(v2(ms(1000)).wire_interval(), 1);
    assert_eq!(v2(ms(1500)).effective_advert_interval(), ms(1000));
    assert_eq!(v2(ms(100)).wire_interval(), 1);
    assert_eq!(v2(Duration::from_secs(1000)).wire_interval(), 255);
}

#[test]
fn backup_accepts_higher_and_learns_the_masters_interval() {
    let mut h = Harness::started(config(100));
    assert!(h.receive(ms(50), HIGHER, advert(200, 100)).is_empty());
    assert_eq!(h.instance.master(), Some(HIGHER));
    assert_eq!(h.instance.master_adver_interval(), ms(1000));
    assert_eq!(h.instance.skew_time(), ms(609) + Duration::from_micros(375));
    assert_eq!(
        h.deadline(),
        Some(ms(50) + ms(3609) + Duration::from_micros(375))
    );
    // Equal priority also keeps us backup (no tie-break between a backup and the master).
    h.receive(ms(60), LOWER, advert(100, 10));
    assert_eq!(h.instance.master(), Some(LOWER));
    assert_eq!(h.instance.master_adver_interval(), ms(100));
    assert_eq!(
        h.deadline(),
        Some(ms(60) + Duration::from_nanos(360_937_500))
    );
    assert_eq!(h.instance.state(), State::Backup);
}

/// The kinds of `out`, in order.
fn output_kinds(out: &[Output]) -> Vec<&'static str> {
    out.iter()
        .map(|o| match o {
            Output::Send(_) => "send",
            Output::AddAddresses(_) => "add",
            Output::RemoveAddresses(_) => "remove",
            Output::Announce(_) => "announce",
            Output::Transition { .. } => "transition",
        })
        .collect()
}

#[test]
fn backup_with_preemption_discards_lower_priority_and_takes_over() {
    let mut h = Harness::started(config(100));
    let initial = h.deadline();
    assert!(h.receive(ms(50), HIGHER, advert(50, 100)).is_empty());
    assert_eq!(
        h.deadline(),
        initial,
        "a discarded advert must not reset the timer"
    );
    assert_eq!(
        h.instance.master_adver_interval(),
        ms(100),
        "nor teach its interval"
    );
    assert_eq!(h.instance.counters().discarded_lower_priority, 1);
    let out = h.input(initial.unwrap(), Input::Timer);
    assert_eq!(sent_priority(&out), vec![100]);
    // The preempted master still holds the addresses: ours and our announcement come
    // before the advert that makes it let go.
    assert_eq!(
        output_kinds(&out),
        ["add", "announce", "send", "transition"]
    );
    assert_eq!(
        out.last(),
        Some(&takeover(
            Reason::Preempt {
                from: HIGHER,
                priority: 50
            },
            // From the discarded advert at 50 ms to Master_Down_Interval after startup.
            Duration::from_nanos(360_937_500) - ms(50)
        ))
    );
}

#[test]
fn backup_without_preemption_accepts_lower_priority() {
    let mut h = Harness::started(Config {
        preempt: false,
        ..config(100)
    });
    h.receive(ms(50), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(50) + Duration::from_nanos(360_937_500))
    );
    assert_eq!(h.instance.counters().discarded_lower_priority, 0);
}

#[test]
fn backup_on_priority_zero_waits_only_skew_time() {
    let mut h = Harness::started(config(100));
    h.receive(ms(50), HIGHER, advert(200, 10));
    h.receive(ms(80), HIGHER, advert(0, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(80) + Duration::from_nanos(60_937_500))
    );
    assert_eq!(h.instance.master(), None, "the master left");
    assert_eq!(h.instance.counters().priority_zero_received, 1);
    let out = h.input(h.deadline().unwrap(), Input::Timer);
    assert_eq!(
        out.last(),
        Some(&takeover(
            Reason::PriorityZero { from: HIGHER },
            // Skew_Time after the priority 0.
            Duration::from_nanos(60_937_500)
        ))
    );
}

#[test]
fn backup_master_down_reports_the_last_master() {
    let mut h = Harness::started(config(100));
    h.receive(ms(50), HIGHER, advert(200, 10));
    let down = h.deadline().unwrap();
    assert!(
        h.input(down - Duration::from_nanos(1), Input::Timer)
            .is_empty()
    );
    assert_eq!(
        h.instance.state(),
        State::Backup,
        "an early timer is ignored"
    );
    let out = h.input(down, Input::Timer);
    assert_eq!(
        out,
        vec![
            Output::Send(advert(100, 10)),
            Output::AddAddresses(vec![vip_net()].into()),
            Output::Announce(vec![VIP].into()),
            takeover(
                Reason::MasterDown {
                    last_master: Some(HIGHER)
                },
                // Master_Down_Interval after its last advertisement.
                Duration::from_nanos(360_937_500)
            ),
        ]
    );
    assert_eq!(h.instance.master(), Some(OWN));
    assert_eq!(h.deadline(), Some(down + ms(100)));
}

#[test]
fn takeover_time_counts_from_the_last_advert_heard_and_only_from_backup() {
    // No advertisement ever heard: no figure.
    let mut h = Harness::started(config(100));
    let down = h.deadline().unwrap();
    let out = h.input(down, Input::Timer);
    assert_eq!(
        out.last(),
        Some(&transition(
            State::Backup,
            State::Master,
            Reason::MasterDown { last_master: None }
        ))
    );
    // Yielding to a higher master is hearing it; when it goes silent, the figure runs from
    // that advertisement (and later ones) to the takeover.
    let yielded = down + ms(10);
    h.receive(yielded, HIGHER, advert(200, 10));
    assert_eq!(h.instance.state(), State::Backup);
    h.receive(yielded + ms(100), HIGHER, advert(200, 10));
    let down = h.deadline().unwrap();
    assert_eq!(down, yielded + ms(100) + Duration::from_nanos(360_937_500));
    let out = h.input(down, Input::Timer);
    assert_eq!(
        out.last(),
        Some(&takeover(
            Reason::MasterDown {
                last_master: Some(HIGHER)
            },
            Duration::from_nanos(360_937_500)
        ))
    );
    // Leaving and starting again forgets what was heard.
    h.input(down + ms(1), Input::Shutdown);
    h.input(down + ms(2), Input::Startup);
    let again = h.deadline().unwrap();
    let out = h.input(again, Input::Timer);
    assert!(
        matches!(
            out.last(),
            Some(Output::Transition {
                unannounced: None,
                ..
            })
        ),
        "{out:?}"
    );
}

/// A Master after its master-down timer fired with no other router around.
fn master(priority: u8) -> Harness {
    let mut h = Harness::started(config(priority));
    let down = h.deadline().unwrap();
    h.input(down, Input::Timer);
    assert_eq!(h.instance.state(), State::Master);
    h
}

#[test]
fn master_advertises_on_every_timer() {
    let mut h = master(100);
    let first = h.deadline().unwrap();
    let out = h.input(first, Input::Timer);
    assert_eq!(out, vec![Output::Send(advert(100, 10))]);
    assert_eq!(h.deadline(), Some(first + ms(100)));
    // A late timer advertises once and re-arms from now, without a burst.
    let late = first + ms(250);
    assert_eq!(h.input(late, Input::Timer).len(), 1);
    assert_eq!(h.deadline(), Some(late + ms(100)));
}

#[test]
fn master_answers_priority_zero_at_once() {
    let mut h = master(100);
    let now = h.deadline().unwrap() - ms(40);
    let out = h.receive(now, LOWER, advert(0, 10));
    assert_eq!(out, vec![Output::Send(advert(100, 10))]);
    assert_eq!(h.deadline(), Some(now + ms(100)));
    assert_eq!(h.instance.state(), State::Master);
}

#[test]
fn master_yields_to_higher_priority_and_learns_its_interval() {
    let mut h = master(100);
    let now = h.deadline().unwrap() - ms(10);
    let out = h.receive(now, LOWER, advert(150, 20));
    assert_eq!(
        out,
        vec![
            Output::RemoveAddresses(vec![vip_net()].into()),
            transition(
                State::Master,
                State::Backup,
                Reason::HigherPriority {
                    from: LOWER,
                    priority: 150
                }
            ),
        ]
    );
    assert_eq!(h.instance.master(), Some(LOWER));
    assert_eq!(h.instance.master_adver_interval(), ms(200));
    assert_eq!(h.deadline(), Some(now + Duration::from_nanos(721_875_000)));
}

#[test]
fn master_tie_break_compares_primary_addresses() {
    let mut h = master(100);
    let now = h.deadline().unwrap() - ms(10);
    assert!(h.receive(now, LOWER, advert(100, 10)).is_empty());
    assert!(h.receive(now, HIGHER, advert(99, 10)).is_empty());
    assert_eq!(h.instance.counters().discarded_lower_priority, 2);
    assert_eq!(h.instance.state(), State::Master);
    let out = h.receive(now, HIGHER, advert(100, 10));
    assert_eq!(
        out.last(),
        Some(&transition(
            State::Master,
            State::Backup,
            Reason::TieBreak { from: HIGHER }
        ))
    );
}

#[test]
fn address_compare_is_unsigned_per_family() {
    let v4 = |s: &str| s.parse::<IpAddr>().unwrap();
    assert!(address_above(v4("192.168.1.10"), v4("10.255.255.255")));
    assert!(address_above(v4("10.0.1.0"), v4("10.0.0.255")));
    assert!(!address_above(v4("10.0.0.1"), v4("10.0.0.1")));
    assert!(address_above(v4("fe80::1:0"), v4("fe80::ffff")));
    assert!(address_above(
        v4("ff02::1"),
        v4("fe80::ffff:ffff:ffff:ffff")
    ));
    assert!(!address_above(v4("fe80::1"), v4("10.0.0.1")));
}

#[test]
fn owner_ignores_every_advertisement() {
    let mut h = Harness::started(config(255));
    assert!(h.receive(ms(10), HIGHER, advert(255, 10)).is_empty());
    assert!(h.receive(ms(10), HIGHER, advert(0, 10)).is_empty());
    assert!(h.receive(ms(10), HIGHER, advert(254, 10)).is_empty());
    assert_eq!(h.instance.counters().discarded_as_owner, 3);
    assert_eq!(h.instance.state(), State::Master);
    assert_eq!(h.deadline(), Some(ms(100)));
}

#[test]
fn owner_preempts_even_with_preemption_off_and_a_delay() {
    let mut h = Harness::started(config(100));
    h.input(
        ms(10),
        Input::Reconfigure(Config {
            preempt: false,
            preempt_delay: Duration::from_secs(60),
            ..config(100)
        }),
    );
    h.receive(ms(20), HIGHER, advert(50, 10));
    let accepted = h.deadline();
    assert_eq!(accepted, Some(ms(20) + Duration::from_nanos(360_937_500)));
    h.input(ms(30), Input::SetPriority(255));
    h.receive(ms(40), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        accepted,
        "the owner discards the lower master"
    );
    let out = h.input(accepted.unwrap(), Input::Timer);
    assert_eq!(sent_priority(&out), vec![255]);
    assert_eq!(h.instance.state(), State::Master);
}

#[test]
fn shutdown_as_master_sends_priority_zero_and_releases() {
    let mut h = master(100);
    let now = h.deadline().unwrap();
    let out = h.input(now, Input::Shutdown);
    assert_eq!(
        out,
        vec![
            Output::Send(advert(0, 10)),
            Output::RemoveAddresses(vec![vip_net()].into()),
            transition(State::Master, State::Initialize, Reason::Shutdown),
        ]
    );
    assert_eq!(h.instance.state(), State::Initialize);
    assert_eq!(h.instance.deadline(), None);
    assert_eq!(h.instance.master(), None);
    assert_eq!(h.instance.counters().priority_zero_sent, 1);
    // It can start again.
    h.input(now + ms(1), Input::Startup);
    assert_eq!(h.instance.state(), State::Backup);
}

#[test]
fn an_address_fault_leaves_with_priority_zero_and_a_backup_only_stops() {
    let mut h = master(100);
    let now = h.deadline().unwrap();
    let out = h.input(now, Input::Fault);
    assert_eq!(
        out,
        vec![
            Output::Send(advert(0, 10)),
            Output::RemoveAddresses(vec![vip_net()].into()),
            transition(State::Master, State::Initialize, Reason::AddressFault),
        ]
    );
    assert_eq!(h.instance.deadline(), None);
    assert_eq!(Reason::AddressFault.code(), "address_fault");
    let mut b = Harness::started(config(100));
    assert_eq!(
        b.input(ms(1), Input::Fault),
        vec![transition(
            State::Backup,
            State::Initialize,
            Reason::AddressFault
        )]
    );
}

#[test]
fn shutdown_as_backup_only_transitions() {
    let mut h = Harness::started(config(100));
    assert_eq!(
        h.input(ms(1), Input::Shutdown),
        vec![transition(
            State::Backup,
            State::Initialize,
            Reason::Shutdown
        )]
    );
    assert_eq!(h.instance.deadline(), None);
}

#[test]
fn preempt_delay_holds_from_startup() {
    let mut h = Harness::started(Config {
        preempt_delay: ms(1000),
        ..config(100)
    });
    h.receive(ms(999), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(999) + Duration::from_nanos(360_937_500))
    );
    let held = h.deadline();
    h.receive(ms(1000), HIGHER, advert(50, 10));
    assert_eq!(h.deadline(), held, "the hold ends exactly after the delay");
    assert_eq!(h.instance.counters().discarded_lower_priority, 1);
}

#[test]
fn preempt_delay_restarts_when_a_lower_master_follows_a_higher_one() {
    let mut h = Harness::started(Config {
        preempt_delay: ms(500),
        ..config(100)
    });
    // The startup hold has long expired, but a higher master resets it.
    h.receive(ms(2000), HIGHER, advert(200, 10));
    h.receive(ms(3000), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(3000) + Duration::from_nanos(360_937_500))
    );
    h.receive(ms(3499), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(3499) + Duration::from_nanos(360_937_500))
    );
    // Equal priority does not restart it.
    h.receive(ms(3499), LOWER, advert(100, 10));
    h.receive(ms(3500), HIGHER, advert(50, 10));
    assert_eq!(
        h.deadline(),
        Some(ms(3499) + Duration::from_nanos(360_937_500))
    );
}

#[test]
fn priority_change_applies_to_the_next_advertisement() {
    let mut h = master(100);
    let next = h.deadline().unwrap();
    assert!(h.input(next - ms(1), Input::SetPriority(42)).is_empty());
    assert_eq!(h.deadline(), Some(next));
    assert_eq!(sent_priority(&h.input(next, Input::Timer)), vec![42]);
    h.input(next, Input::SetPriority(0));
    assert_eq!(h.instance.config().priority, 1, "0 is reserved for leaving");
}

#[test]
fn raised_backup_preempts_the_master_it_used_to_accept() {
    let mut h = Harness::started(config(100));
    h.receive(ms(10), HIGHER, advert(150, 10));
    let accepted = h.deadline();
    h.input(ms(20), Input::SetPriority(200));
    assert_eq!(h.instance.skew_time(), Duration::from_nanos(21_875_000));
    h.receive(ms(110), HIGHER, advert(150, 10));
    assert_eq!(h.deadline(), accepted);
    let out = h.input(accepted.unwrap(), Input::Timer);
    assert_eq!(sent_priority(&out), vec![200]);
}

#[test]
fn reconfigure_as_master_changes_only_the_address_difference() {
    let a: IpNet = "192.168.1.100/24".parse().unwrap();
    let b: IpNet = "192.168.1.101/24".parse().unwrap();
    let c: IpNet = "192.168.1.102/24".parse().unwrap();
    let mut h = Harness::started(Config {
        addresses: vec![a, b],
        ..config(255)
    });
    let next = h.deadline().unwrap();
    let out = h.input(
        ms(10),
        Input::Reconfigure(Config {
            addresses: vec![b, c],
            priority: 200,
            ..config(255)
        }),
    );
    assert_eq!(
        out,
        vec![
            Output::RemoveAddresses(vec![a].into()),
            Output::AddAddresses(vec![c].into()),
            Output::Announce(vec![c.addr()].into()),
        ]
    );
    assert_eq!(h.instance.state(), State::Master);
    assert_eq!(h.deadline(), Some(next));
    let out = h.input(next, Input::Timer);
    assert_eq!(
        out,
        vec![Output::Send(Advertisement {
            addresses: vec![b.addr(), c.addr()],
            ..advert(200, 10)
        })]
    );
    // Same addresses: no address output at all; a shorter interval applies at once.
    let out = h.input(
        next + ms(1),
        Input::Reconfigure(Config {
            addresses: vec![b, c],
            advert_interval: ms(20),
            ..config(200)
        }),
    );
    assert!(out.is_empty());
    assert_eq!(h.deadline(), Some(next + ms(21)));
    assert_eq!(h.instance.master_adver_interval(), ms(20));
}

#[test]
fn reconfigure_as_backup_keeps_the_timer_and_learned_interval() {
    let mut h = Harness::started(config(100));
    h.receive(ms(10), HIGHER, advert(200, 50));
    let deadline = h.deadline();
    let out = h.input(
        ms(20),
        Input::Reconfigure(Config {
            advert_interval: ms(30),
            addresses: vec!["192.168.1.101/24".parse().unwrap()],
            ..config(150)
        }),
    );
    assert!(out.is_empty());
    assert_eq!(h.deadline(), deadline);
    assert_eq!(h.instance.master_adver_interval(), ms(500));
    assert_eq!(h.instance.config().priority, 150);
}

#[test]
fn reconfigure_of_vrid_starts_a_new_router() {
    let mut h = master(100);
    let now = h.deadline().unwrap();
    let out = h.input(
        now,
        Input::Reconfigure(Config {
            vrid: 52,
            ..config(100)
        }),
    );
    assert_eq!(
        out,
        vec![
            Output::Send(advert(0, 10)),
            Output::RemoveAddresses(vec![vip_net()].into()),
            transition(State::Master, State::Initialize, Reason::Reconfigured),
            transition(State::Initialize, State::Backup, Reason::Startup),
        ]
    );
    assert_eq!(h.instance.config().vrid, 52);
    assert_eq!(h.instance.counters().transitions, 4, "counters survive");
    // Not running: it stays in Initialize.
    let mut idle = Harness::new(config(100));
    assert!(
        idle.input(ms(1), Input::Reconfigure(v2_config(100, 1)))
            .is_empty()
    );
    assert_eq!(idle.instance.config().version, Version::V2);
}

#[test]
fn v2_discards_a_different_interval_and_does_not_learn() {
    let mut h = Harness::started(v2_config(100, 1));
    let v2 = |priority, interval| Advertisement {
        version: Version::V2,
        interval,
        ..advert(priority, 0)
    };
    let initial = h.deadline();
    h.receive(ms(10), HIGHER, v2(200, 2));
    assert_eq!(h.deadline(), initial);
    assert_eq!(h.instance.counters().discarded_interval_mismatch, 1);
    h.receive(ms(10), HIGHER, v2(200, 1));
    assert_eq!(
        h.deadline(),
        Some(ms(10) + Duration::from_nanos(3_609_375_000))
    );
    assert_eq!(h.instance.master_adver_interval(), ms(1000));
}

#[test]
fn malformed_or_foreign_adverts_are_counted_and_dropped() {
    let mut h = Harness::started(config(100));
    let initial = h.deadline();
    h.receive(
        ms(1),
        HIGHER,
        Advertisement {
            vrid: 52,
            ..advert(200, 10)
        },
    );
    h.receive(
        ms(1),
        HIGHER,
        Advertisement {
            version: Version::V2,
            ..advert(200, 1)
        },
    );
    h.receive(ms(1), HIGHER, advert(200, 0));
    assert_eq!(h.deadline(), initial);
    assert_eq!(h.instance.counters().discarded_invalid, 3);
    assert_eq!(h.instance.counters().adverts_received, 3);
    // A different address list is accepted and only counted.
    h.receive(
        ms(2),
        HIGHER,
        Advertisement {
            addresses: vec![VIP, LOWER],
            ..advert(200, 10)
        },
    );
    assert_eq!(h.instance.counters().address_list_mismatch, 1);
    assert_eq!(h.instance.master(), Some(HIGHER));
}

#[test]
fn counters_track_transitions() {
    let mut h = master(100);
    h.receive(ms(1000), HIGHER, advert(200, 10));
    h.input(ms(2000), Input::Timer);
    let c = *h.instance.counters();
    assert_eq!((c.transitions, c.became_master, c.became_backup), (4, 2, 2));
    assert_eq!(c.adverts_sent, 2);
}

#[test]
fn names_and_codes_are_stable() {
    assert_eq!(State::Initialize.to_string(), "INIT");
    assert_eq!(State::Backup.to_string(), "BACKUP");
    assert_eq!(State::Master.to_string(), "MASTER");
    let reasons = [
        (Reason::Startup, "startup", "startup"),
        (Reason::Owner, "owner", "address owner (priority 255)"),
        (
            Reason::MasterDown {
                last_master: Some(HIGHER),
            },
            "master_down",
            "master 192.168.1.11 down",
        ),
        (
            Reason::MasterDown { last_master: None },
            "master_down",
            "no master seen",
        ),
        (
            Reason::PriorityZero { from: HIGHER },
            "priority_zero",
            "master 192.168.1.11 left (priority 0)",
        ),
        (
            Reason::Preempt {
                from: LOWER,
                priority: 50,
            },
            "preempt",
            "preempted lower-priority master 192.168.1.9 (priority 50)",
        ),
        (
            Reason::HigherPriority {
                from: HIGHER,
                priority: 200,
            },
            "higher_priority",
            "higher-priority master 192.168.1.11 (priority 200)",
        ),
        (
            Reason::TieBreak { from: HIGHER },
            "tie_break",
            "master 192.168.1.11 has equal priority and a higher address",
        ),
        (Reason::Shutdown, "shutdown", "shutdown"),
        (
            Reason::Reconfigured,
            "reconfigured",
            "VRID or version reconfigured",
        ),
    ];
    for (reason, code, text) in reasons {
        assert_eq!(reason.code(), code);
        assert_eq!(reason.to_string(), text);
    }
}

#[test]
fn validate_reports_each_problem() {
    let check = |config: Config| config.validate().map_err(|e| e.metric_label());
    assert_eq!(check(config(100)), Ok(()));
    assert_eq!(check(v2_config(100, 1)), Ok(()));
    assert_eq!(
        check(Config {
            vrid: 0,
            ..config(100)
        }),
        Err("invalid_vrid")
    );
    assert_eq!(check(config(0)), Err("invalid_priority"));
    assert_eq!(
        check(Config {
            addresses: vec![],
            ..config(100)
        }),
        Err("no_addresses")
    );
    assert_eq!(
        check(Config {
            addresses: vec!["2001:db8::1/64".parse().unwrap()],
            ..config(100)
        }),
        Err("mixed_families")
    );
    assert_eq!(
        check(Config {
            primary_address: "fe80::1".parse().unwrap(),
            addresses: vec!["fe80::100/64".parse().unwrap()],
            ..v2_config(100, 1)
        }),
        Err("v2_ipv4_only")
    );
    assert_eq!(
        check(Config {
            advert_interval: ms(5),
            ..config(100)
        }),
        Err("interval_out_of_range")
    );
    assert_eq!(
        check(Config {
            advert_interval: ms(40_960),
            ..config(100)
        }),
        Err("interval_out_of_range")
    );
    assert_eq!(
        check(Config {
            advert_interval: ms(105),
            ..config(100)
        }),
        Err("interval_not_representable")
    );
    assert_eq!(check(v2_config(100, 256)), Err("interval_out_of_range"));
    let err = Config {
        addresses: vec!["2001:db8::1/64".parse().unwrap()],
        ..config(100)
    }
    .validate()
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "virtual address 2001:db8::1/64 is not ipv4 like the primary address 192.168.1.10"
    );
}

#[test]
fn handle_only_appends() {
    let mut instance = Instance::new(config(255));
    let mut out = vec![Output::Announce(vec![].into())];
    instance.handle(Instant::now(), Input::Startup, &mut out);
    assert_eq!(out.len(), 5);
    assert_eq!(out[0], Output::Announce(vec![].into()));
}

#[test]
fn hold_keeps_the_addresses_and_announces_a_long_interval() {
    let mut h = Harness::started(config(150));
    h.input(ms(400), Input::Timer);
    assert_eq!(h.instance.state(), State::Master);
    let out = h.input(ms(450), Input::Hold(Duration::from_secs(9)));
    assert_eq!(out.len(), 2, "{out:?}");
    match &out[0] {
        // 9 s / 4 = 2.25 s = 225 cs; priority unchanged, not 0.
        Output::Send(a) => assert_eq!((a.priority, a.interval), (150, 225)),
        other => panic!("expected an advertisement, got {other:?}"),
    }
    assert_eq!(
        out[1],
        transition(State::Master, State::Initialize, Reason::Held)
    );
    assert!(!out.iter().any(|o| matches!(o, Output::RemoveAddresses(_))));
    assert_eq!(h.instance.deadline(), None);
}

#[test]
fn a_backup_learns_the_held_interval_and_waits_for_the_next_agent() {
    let mut h = Harness::started(config(100));
    let mut held = advert(150, 225);
    held.addresses = vec![VIP];
    h.receive(ms(50), HIGHER, held);
    // Master_Down_Interval = 3 × 2.25 s + skew (156/256 × 2.25 s = 1.37109375 s).
    assert_eq!(
        h.deadline(),
        Some(ms(50) + Duration::from_nanos(8_121_093_750))
    );
}

#[test]
fn every_backup_takes_over_before_the_held_addresses_expire() {
    // A next agent slower than the hold must find a backup master, never a gap: for every
    // hold and every backup priority, Master_Down_Interval learned from the hold's advert
    // ends within the hold (the addresses' lifetime), and not before ¾ of it.
    for hold_ms in [
        1_000u64, 2_000, 6_000, 9_000, 10_000, 10_010, 30_000, 163_800,
    ] {
        let hold = Duration::from_millis(hold_ms);
        let mut master = Harness::started(config(254));
        master.input(ms(400), Input::Timer);
        assert_eq!(master.instance.state(), State::Master);
        let out = master.input(ms(450), Input::Hold(hold));
        let Some(Output::Send(sent)) = out.first() else {
            panic!("no advert for the hold: {out:?}")
        };
        for priority in [1u8, 100, 253] {
            let mut backup = Harness::started(config(priority));
            let mut held = sent.clone();
            held.addresses = vec![VIP];
            backup.receive(ms(50), HIGHER, held);
            let waits = backup.deadline().expect("a deadline") - ms(50);
            assert!(
                waits <= hold && waits >= hold * 3 / 4 - Duration::from_millis(40),
                "hold {hold:?}, priority {priority}: the backup takes over after {waits:?}"
            );
        }
    }
}

#[test]
fn hold_as_backup_or_with_v2_is_an_ordinary_departure() {
    let mut h = Harness::started(config(100));
    let out = h.input(ms(10), Input::Hold(Duration::from_secs(9)));
    assert_eq!(
        out,
        [transition(State::Backup, State::Initialize, Reason::Held)]
    );

    let mut v2 = Harness::started(v2_config(150, 1));
    v2.input(Duration::from_secs(4), Input::Timer);
    assert_eq!(v2.instance.state(), State::Master);
    let out = v2.input(Duration::from_secs(4), Input::Hold(Duration::from_secs(9)));
    assert_eq!(sent_priority(&out), [0]);
    assert!(out.iter().any(|o| matches!(o, Output::RemoveAddresses(_))));
}

#[test]
fn adopt_starts_as_master_at_once() {
    let mut h = Harness::new(config(100));
    let out = h.input(ms(3), Input::Adopt);
    assert_eq!(h.instance.state(), State::Master);
    assert_eq!(sent_priority(&out), [100]);
    assert_eq!(
        out.last(),
        Some(&transition(
            State::Initialize,
            State::Master,
            Reason::Adopted
        ))
    );
    assert_eq!(h.deadline(), Some(ms(103)));
    // Adopt only applies to a fresh instance.
    assert!(h.input(ms(4), Input::Adopt).is_empty());
}

// ---------------------------------------------------------------------------------------------
// IPv6: the advertisement's address list and the virtual router's link-local.

const OWN6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x10));
const PEER6: IpAddr = IpAddr::V6(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0x0b));
const GLOBAL6: &str = "2001:db8::100";
/// fe80::200:5eff:fe00:233, the link-local of virtual MAC 00:00:5e:00:02:33 (VRID 51).
const VIRTUAL_LL: &str = "fe80::200:5eff:fe00:233";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// IPv6 router configured like keepalived's users write it: the global address only.
fn v6_config(priority: u8) -> Config {
    Config {
        addresses: vec![format!("{GLOBAL6}/64").parse().unwrap()],
        primary_address: OWN6,
        ..config(priority)
    }
}

/// IPv6 router that lists a link-local, first (as the plan orders a listed one).
fn v6_config_with_link_local(priority: u8, link_local: &str) -> Config {
    Config {
        addresses: vec![
            format!("{link_local}/64").parse().unwrap(),
            format!("{GLOBAL6}/64").parse().unwrap(),
        ],
        ..v6_config(priority)
    }
}

fn v6_advert(priority: u8, addresses: &[&str]) -> Advertisement {
    Advertisement {
        addresses: addresses.iter().map(|a| ip(a)).collect(),
        ..advert(priority, 10)
    }
}

fn sent_lists(outputs: &[Output]) -> Vec<Vec<IpAddr>> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Send(a) => Some(a.addresses.clone()),
            _ => None,
        })
        .collect()
}

fn v6_master(config: Config) -> Harness {
    let mut h = Harness::started(config);
    let down = h.deadline().unwrap();
    h.input(down, Input::Timer);
    assert_eq!(h.instance.state(), State::Master);
    h
}

#[test]
fn ipv6_without_a_configured_link_local_advertises_the_configured_list_only() {
    // keepalived ≤ 2.3.2 with `virtual_ipaddress { 2001:db8::100/64 }` drops any other count.
    let mut h = v6_master(v6_config(100));
    let out = h.input(h.deadline().unwrap(), Input::Timer);
    assert_eq!(sent_lists(&out), vec![vec![ip(GLOBAL6)]]);
    assert_eq!(h.instance.learned_link_local(), None);
    // A peer listing no link-local teaches nothing and matches our list.
    h.receive(
        h.deadline().unwrap() - ms(1),
        PEER6,
        v6_advert(50, &[GLOBAL6]),
    );
    assert_eq!(h.instance.learned_link_local(), None);
    assert_eq!(h.instance.counters().address_list_mismatch, 0);
    assert_eq!(h.instance.counters().link_local_learned, 0);
}

#[test]
fn ipv6_a_configured_link_local_goes_first_and_is_never_replaced() {
    let mut h = v6_master(v6_config_with_link_local(100, "fe80::1"));
    let out = h.input(h.deadline().unwrap(), Input::Timer);
    assert_eq!(sent_lists(&out), vec![vec![ip("fe80::1"), ip(GLOBAL6)]]);
    // A peer with another link-local (or none) does not change what we send.
    h.receive(
        h.deadline().unwrap() - ms(1),
        PEER6,
        v6_advert(50, &[VIRTUAL_LL, GLOBAL6]),
    );
    assert_eq!(h.instance.learned_link_local(), None);
    let out = h.input(h.deadline().unwrap(), Input::Timer);
    assert_eq!(sent_lists(&out), vec![vec![ip("fe80::1"), ip(GLOBAL6)]]);
    assert_eq!(h.instance.counters().address_list_mismatch, 1);
}

#[test]
fn ipv6_backup_learns_the_masters_link_local_and_lists_it_first_when_it_takes_over() {
    let mut h = Harness::started(v6_config(100));
    // keepalived configured with the link-local, as master: accepted (timer reset) although
    // its list differs from ours at the time.
    assert!(
        h.receive(ms(50), PEER6, v6_advert(150, &[VIRTUAL_LL, GLOBAL6]))
            .is_empty()
    );
    assert_eq!(h.instance.master(), Some(PEER6));
    assert_eq!(
        h.deadline(),
        Some(ms(50) + Duration::from_nanos(360_937_500))
    );
    assert_eq!(
        h.instance.learned_link_local(),
        Some(VIRTUAL_LL.parse().unwrap())
    );
    assert_eq!(h.instance.counters().link_local_learned, 1);
    // Learned before the comparison: its list is ours now.
    assert_eq!(h.instance.counters().address_list_mismatch, 0);
    h.receive(ms(150), PEER6, v6_advert(150, &[VIRTUAL_LL, GLOBAL6]));
    assert_eq!(h.instance.counters().address_list_mismatch, 0);
    // It crashes; we take over and advertise the learned link-local first. Held and announced
    // are the configured addresses only: the link-local is the virtual router's name on the
    // wire, not an address the user asked this node to hold.
    let down = h.deadline().unwrap();
    let out = h.input(down, Input::Timer);
    assert_eq!(sent_lists(&out), vec![vec![ip(VIRTUAL_LL), ip(GLOBAL6)]]);
    assert!(out.contains(&Output::AddAddresses(
        vec![format!("{GLOBAL6}/64").parse().unwrap()].into()
    )));
    assert!(out.contains(&Output::Announce(vec![ip(GLOBAL6)].into())));
}

#[test]
fn ipv6_a_master_learns_from_a_lower_priority_peer_that_drops_its_adverts() {
    // keepalived (with the link-local) joined below us, dropped our one-address adverts and
    // became master too: its lower-priority advert is discarded, but teaches us the
    // link-local; we advertise the list it accepts at once (it steps down) and announce our
    // addresses again (its announcements had moved the neighbours to it).
    let mut h = v6_master(v6_config(200));
    let now = h.deadline().unwrap() - ms(30);
    let out = h.receive(now, PEER6, v6_advert(100, &[VIRTUAL_LL, GLOBAL6]));
    assert_eq!(
        out,
        vec![
            Output::Send(v6_advert(200, &[VIRTUAL_LL, GLOBAL6])),
            Output::Announce(vec![ip(GLOBAL6)].into()),
        ]
    );
    assert_eq!(h.instance.state(), State::Master);
    assert_eq!(h.instance.counters().discarded_lower_priority, 1);
    assert_eq!(h.deadline(), Some(now + ms(100)));
    // Once only: its next advert (still lower) is simply discarded.
    assert!(
        h.receive(now + ms(1), PEER6, v6_advert(100, &[VIRTUAL_LL, GLOBAL6]))
            .is_empty()
    );
    let out = h.input(now + ms(100), Input::Timer);
    assert_eq!(
        out,
        vec![Output::Send(v6_advert(200, &[VIRTUAL_LL, GLOBAL6]))]
    );
    // keepalived announces before it reads our answer: we announce again with the first
    // adverts 250 ms and 1 s after, then no more.
    let announced_at: Vec<Duration> = (2..=15)
        .filter_map(|n| {
            let at = now + ms(100) * n;
            let out = h.input(at, Input::Timer);
            assert_eq!(sent_priority(&out), vec![200]);
            out.contains(&Output::Announce(vec![ip(GLOBAL6)].into()))
                .then_some(at - now)
        })
        .collect();
    assert_eq!(announced_at, vec![ms(300), ms(1000)]);
}

#[test]
fn ipv6_later_announcements_stop_when_the_master_steps_down() {
    let mut h = v6_master(v6_config(200));
    let now = h.deadline().unwrap() - ms(30);
    h.receive(now, PEER6, v6_advert(100, &[VIRTUAL_LL, GLOBAL6]));
    h.receive(now + ms(50), PEER6, v6_advert(250, &[VIRTUAL_LL, GLOBAL6]));
    assert_eq!(h.instance.state(), State::Backup);
    h.receive(now + ms(60), PEER6, v6_advert(0, &[VIRTUAL_LL, GLOBAL6]));
    let out = h.input(h.deadline().unwrap(), Input::Timer);
    assert_eq!(h.instance.state(), State::Master);
    assert_eq!(
        out.iter()
            .filter(|o| matches!(o, Output::Announce(_)))
            .count(),
        1,
        "the takeover's own announcement only: {out:?}"
    );
    for n in 1..=12 {
        let out = h.input(h.deadline().unwrap(), Input::Timer);
        assert!(
            !out.iter().any(|o| matches!(o, Output::Announce(_))),
            "advert {n}: {out:?}"
        );
    }
}

#[test]
fn ipv6_a_master_taught_by_a_leaving_peer_announces_after_its_usual_answer() {
    let mut h = v6_master(v6_config(200));
    let now = h.deadline().unwrap() - ms(30);
    let out = h.receive(now, PEER6, v6_advert(0, &[VIRTUAL_LL, GLOBAL6]));
    assert_eq!(
        out,
        vec![
            Output::Send(v6_advert(200, &[VIRTUAL_LL, GLOBAL6])),
            Output::Announce(vec![ip(GLOBAL6)].into()),
        ]
    );
}

#[test]
fn ipv6_the_learned_link_local_is_kept_for_the_life_of_the_instance() {
    let mut h = Harness::started(v6_config(100));
    h.receive(ms(10), PEER6, v6_advert(150, &["fe80::1", GLOBAL6]));
    // A later peer with another link-local, or none, changes nothing: learned once, logged
    // once (the engine logs on the first).
    h.receive(ms(20), PEER6, v6_advert(150, &["fe80::2", GLOBAL6]));
    h.receive(ms(30), PEER6, v6_advert(150, &[GLOBAL6]));
    assert_eq!(
        h.instance.learned_link_local(),
        Some("fe80::1".parse().unwrap())
    );
    assert_eq!(h.instance.counters().link_local_learned, 1);
    // Across a restart of the state machine and a reconfiguration of the same router.
    h.input(ms(40), Input::Shutdown);
    h.input(ms(50), Input::Startup);
    let mut more = v6_config(120);
    more.addresses.push("2001:db8::101/64".parse().unwrap());
    h.input(ms(60), Input::Reconfigure(more));
    assert_eq!(
        h.instance.advertised_addresses(),
        vec![ip("fe80::1"), ip(GLOBAL6), ip("2001:db8::101")]
    );
    // A configured link-local takes precedence over the learned one.
    h.input(
        ms(70),
        Input::Reconfigure(v6_config_with_link_local(120, "fe80::9")),
    );
    assert_eq!(
        h.instance.advertised_addresses(),
        vec![ip("fe80::9"), ip(GLOBAL6)]
    );
    // A new VRID is a new virtual router: nothing learned.
    h.input(
        ms(80),
        Input::Reconfigure(Config {
            vrid: 52,
            ..v6_config(120)
        }),
    );
    assert_eq!(h.instance.learned_link_local(), None);
    assert_eq!(h.instance.advertised_addresses(), vec![ip(GLOBAL6)]);
}

#[test]
fn ipv6_an_owner_learns_too_and_a_full_list_stays_within_the_limit() {
    let mut config = v6_config(PRIORITY_OWNER);
    config.addresses = (0..100)
        .map(|i| format!("2001:db8::{:x}/64", 0x100 + i).parse().unwrap())
        .collect();
    let mut h = v6_master(config);
    let out = h.receive(ms(5), PEER6, v6_advert(100, &[VIRTUAL_LL, GLOBAL6]));
    assert_eq!(h.instance.counters().discarded_as_owner, 1);
    assert_eq!(
        sent_priority(&out),
        vec![PRIORITY_OWNER],
        "reasserted at once"
    );
    let list = h.instance.advertised_addresses();
    assert_eq!(list.len(), max_advertised(Family::V6));
    assert_eq!(list[0], ip(VIRTUAL_LL));
    assert_eq!(list[1], ip("2001:db8::100"));
}

#[test]
fn ipv4_never_learns_a_link_local() {
    let mut h = Harness::started(config(100));
    let mut odd = advert(150, 10);
    odd.addresses = vec![ip(VIRTUAL_LL)];
    h.receive(ms(10), HIGHER, odd);
    assert_eq!(h.instance.learned_link_local(), None);
    assert_eq!(h.instance.advertised_addresses(), vec![VIP]);
}

#[test]
fn a_huge_group_advertises_its_first_addresses_and_compares_lists_in_any_order() {
    let nets: Vec<IpNet> = (0..10_000u32)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 0, 0)) + i);
            IpNet::new(IpAddr::V4(ip), 32).unwrap()
        })
        .collect();
    let mut h = Harness::started(Config {
        addresses: nets.clone(),
        ..config(100)
    });
    let ours: Vec<IpAddr> = nets.iter().take(255).map(IpNet::addr).collect();
    assert_eq!(h.instance.advertised_addresses(), ours);
    assert!(h.instance.holds(&nets[9999]));
    assert!(!h.instance.holds(&vip_net()));
    assert_eq!(h.instance.addresses().len(), 10_000);
    // The master's list in our order, reversed, or one address different.
    let mut reversed = ours.clone();
    reversed.reverse();
    let mut other = ours.clone();
    other[100] = VIP;
    for (list, mismatches) in [(ours.clone(), 0), (reversed, 0), (other, 1)] {
        h.receive(
            ms(1),
            HIGHER,
            Advertisement {
                addresses: list,
                ..advert(200, 10)
            },
        );
        assert_eq!(h.instance.counters().address_list_mismatch, mismatches);
    }
    // Becoming master adds and announces all 10,000, shared rather than copied.
    let mut h = Harness::started(Config {
        addresses: nets.clone(),
        ..config(PRIORITY_OWNER)
    });
    let shared = h.instance.addresses().clone();
    let add = h.out.iter().find_map(|o| match o {
        Output::AddAddresses(nets) => Some(nets.clone()),
        _ => None,
    });
    assert!(Arc::ptr_eq(&add.unwrap(), &shared));
    h.out.clear();
}
