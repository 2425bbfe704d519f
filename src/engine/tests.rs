//! Unit tests of the node engine: what only the root tests on two cores covered before
//! (demultiplexing, the shared deadline set, converging a plan, parking and retrying,
//! adoption, the restart hold, virtual MACs), on a virtual clock.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use super::*;
use crate::model::{InstanceKey, InstanceSpec};
use crate::vocab::{ChecksumMode, Family, Version};
use crate::vrrp::instance::{Reason, State};
use crate::vrrp::packet::Advertisement;

const OWN: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
const ETH0_INDEX: u32 = 2;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A VirtualIP's instance as the planner makes it: VRRPv3, 100 ms, IPv4 on eth0.
fn spec(name: &str, vrid: u8, priority: u8) -> InstanceSpec {
    InstanceSpec {
        resource: name.into(),
        members: vec![name.into()],
        interface: "eth0".into(),
        family: Family::V4,
        vrid,
        version: Version::V3,
        priority,
        priority_reasons: vec![format!("base {priority}")],
        advert_interval: ms(100),
        preempt: true,
        preempt_delay: Duration::ZERO,
        addresses: vec![net(&format!("192.0.2.{}/24", 100 + vrid))],
        unicast_peers: None,
        checksum: ChecksumMode::PseudoHeader,
        virtual_mac: false,
        allow_wide_prefix: false,
    }
}

fn key(vrid: u8) -> InstanceKey {
    InstanceKey {
        family: Family::V4,
        vrid,
    }
}

fn facts(index: u32, primary: Option<Ipv4Addr>) -> LinkFacts {
    LinkFacts {
        index,
        mac: [2, 0, 0, 0, 0, 1],
        primary_v4: primary,
        link_local_v6: None,
        subnet_v4: primary.map(|p| ipnet::Ipv4Net::new(p, 24).unwrap()),
        subnet_v6: None,
    }
}

/// eth0 as the driver reads it, with an open IPv4 socket and the given virtual MACs.
fn env(link: LinkFacts, vmacs: &[(u8, VmacFacts)]) -> Environment {
    Environment {
        links: BTreeMap::from([(
            Arc::from("eth0"),
            LinkEnv {
                facts: Ok(link),
                sockets: BTreeMap::from([(Family::V4, Ok(()))]),
                vmacs: vmacs
                    .iter()
                    .map(|(vrid, v)| ((Family::V4, *vrid), Ok(v.clone())))
                    .collect(),
            },
        )]),
    }
}

fn eth0() -> Environment {
    env(facts(ETH0_INDEX, Some(OWN)), &[])
}

fn plan(specs: &[InstanceSpec]) -> Instances {
    let mut instances = Instances::new();
    for s in specs {
        instances
            .entry(s.interface.clone())
            .or_default()
            .insert(key(s.vrid), s.clone());
    }
    instances
}

fn advert(vrid: u8, priority: u8) -> Advertisement {
    Advertisement {
        version: Version::V3,
        vrid,
        priority,
        interval: 10,
        addresses: vec![IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100 + vrid))],
    }
}

/// One engine on a virtual clock.
struct Rig {
    engine: NodeEngine,
    epoch: Instant,
    now: Instant,
}

impl Rig {
    fn new() -> Rig {
        Rig::with_held(HashSet::new())
    }

    fn with_held(held: HashSet<(u32, IpNet)>) -> Rig {
        let epoch = Instant::now();
        Rig {
            engine: NodeEngine::new(
                "node-a".into(),
                held,
                Arc::new(Stats::default()),
                (epoch, SystemTime::UNIX_EPOCH),
            ),
            epoch,
            now: epoch,
        }
    }

    fn input(&mut self, input: Input) -> Vec<Output> {
        let mut out = Vec::new();
        self.engine.handle(self.now, input, &mut out);
        out
    }

    fn apply(&mut self, specs: &[InstanceSpec]) -> Vec<Output> {
        self.apply_in(specs, eth0())
    }

    fn apply_in(&mut self, specs: &[InstanceSpec], env: Environment) -> Vec<Output> {
        self.input(Input::Apply {
            instances: plan(specs),
            env,
        })
    }

    fn hear(&mut self, source: Ipv4Addr, advertisement: Advertisement) -> Vec<Output> {
        self.input(Input::Advertisement {
            interface: Arc::from("eth0"),
            family: Family::V4,
            source: IpAddr::V4(source),
            advertisement,
        })
    }

    /// Moves the clock to `at` (from the epoch) and fires what is due.
    fn at(&mut self, at: Duration) -> Vec<Output> {
        self.now = self.epoch + at;
        self.input(Input::Timer)
    }

    /// Runs until `vrid` is master (its Master_Down_Interval at most 400 ms).
    fn make_master(&mut self, vrid: u8) {
        let deadline = self.engine.deadline().expect("a timer");
        self.at(deadline - self.epoch);
        assert_eq!(self.state(vrid), State::Master);
    }

    fn state(&self, vrid: u8) -> State {
        self.engine
            .instance("eth0", key(vrid))
            .map_or(State::Initialize, |i| i.state())
    }

    fn dropped(&self, label: &str) -> u64 {
        self.engine
            .stats()
            .dropped()
            .into_iter()
            .find(|(l, _)| *l == label)
            .map(|(_, n)| n)
            .unwrap()
    }
}

fn sends(out: &[Output]) -> Vec<&Transmit> {
    out.iter()
        .filter_map(|o| match o {
            Output::Send(t) => Some(t),
            _ => None,
        })
        .collect()
}

fn transitions(out: &[Output]) -> Vec<(u8, State, State, Reason)> {
    out.iter()
        .filter_map(|o| match o {
            Output::Transition {
                key,
                from,
                to,
                reason,
                ..
            } => Some((key.vrid, *from, *to, *reason)),
            _ => None,
        })
        .collect()
}

fn position(out: &[Output], pred: impl Fn(&Output) -> bool) -> usize {
    out.iter().position(pred).expect("output present")
}

#[test]
fn instances_share_one_deadline_set_and_the_earliest_is_the_engines() {
    let mut rig = Rig::new();
    let slow = InstanceSpec {
        advert_interval: ms(1000),
        ..spec("slow", 1, 100)
    };
    let out = rig.apply(&[slow, spec("fast", 2, 100)]);
    assert_eq!(
        transitions(&out)
            .iter()
            .map(|t| (t.0, t.2))
            .collect::<Vec<_>>(),
        vec![(1, State::Backup), (2, State::Backup)]
    );
    let fast = rig.engine.instance("eth0", key(2)).unwrap();
    assert_eq!(rig.engine.deadline(), fast.deadline());
    assert_eq!(
        rig.engine.deadline(),
        Some(rig.epoch + fast.master_down_interval())
    );
    // The fast one takes over; the slow one is untouched and still waits.
    rig.make_master(2);
    assert_eq!(rig.state(1), State::Backup);
    let slow = rig.engine.instance("eth0", key(1)).unwrap();
    assert_eq!(
        slow.deadline(),
        Some(rig.epoch + slow.master_down_interval())
    );
}

#[test]
fn taking_over_adds_before_announcing_and_advertises_to_the_group() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 7, 100)]);
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    let add = position(
        &out,
        |o| matches!(o, Output::AddAddresses { ifindex: ETH0_INDEX, nets } if **nets == [net("192.0.2.107/24")]),
    );
    let announce = position(&out, |o| matches!(o, Output::Announce { .. }));
    assert!(add < announce, "address before its announcement: {out:?}");
    let sent = sends(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].source, IpAddr::V4(OWN));
    assert_eq!(&*sent[0].destinations, &[crate::vrrp::group(Family::V4)]);
    assert_eq!(sent[0].advertisement.priority, 100);
    let observed = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    assert_eq!(observed.state, State::Master);
    assert_eq!(observed.master, Some(IpAddr::V4(OWN)));
    assert_eq!(observed.reason_code, "master_down");
    assert!(rig.engine.take_observed_change());
    assert!(!rig.engine.take_observed_change());
    // Nobody held the addresses: the advert need not wait for the announcement.
    assert!(!sent[0].after_announcement);
}

/// A preempting master's first advert is marked to go out after its announcement (the
/// master it preempts keeps the addresses until that advert); its later adverts are not.
#[test]
fn a_preempting_master_advertises_after_announcing() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 7, 100)]);
    // A lower-priority master: discarded (preemption), so the timer runs out.
    assert!(rig.hear(PEER, advert(7, 50)).is_empty());
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    assert_eq!(
        transitions(&out).last().map(|t| (t.2, t.3.code())),
        Some((State::Master, "preempt"))
    );
    let announce = position(&out, |o| matches!(o, Output::Announce { .. }));
    let send = position(&out, |o| matches!(o, Output::Send(_)));
    assert!(announce < send, "{out:?}");
    assert!(sends(&out)[0].after_announcement);
    let next = rig.at(deadline + ms(100));
    assert_eq!(sends(&next).len(), 1);
    assert!(!sends(&next)[0].after_announcement);
    // A master announcing addresses it gained holds no advert back.
    let grown = InstanceSpec {
        addresses: vec![net("192.0.2.107/24"), net("192.0.2.108/24")],
        ..spec("web", 7, 120)
    };
    let out = rig.apply(&[grown]);
    assert!(
        out.iter().any(|o| matches!(o, Output::Announce { .. })),
        "{out:?}"
    );
    assert!(sends(&out).iter().all(|t| !t.after_announcement), "{out:?}");
}

#[test]
fn advertisements_are_demultiplexed_by_vrid_through_the_node_filters() {
    let mut rig = Rig::new();
    let unicast = InstanceSpec {
        unicast_peers: Some(vec![IpAddr::V4(PEER)]),
        ..spec("unicast", 2, 100)
    };
    rig.apply(&[spec("web", 1, 100), unicast]);
    let before = rig.engine.instance("eth0", key(1)).unwrap().deadline();

    assert!(rig.hear(OWN, advert(1, 200)).is_empty());
    assert_eq!(rig.dropped("own"), 1);
    assert!(rig.hear(PEER, advert(9, 200)).is_empty());
    assert_eq!(rig.dropped("unknown_vrid"), 1);
    let v2 = Advertisement {
        version: Version::V2,
        interval: 1,
        ..advert(1, 200)
    };
    assert!(rig.hear(PEER, v2).is_empty());
    assert_eq!(rig.dropped("version_mismatch"), 1);
    assert!(
        rig.hear(Ipv4Addr::new(192, 0, 2, 66), advert(2, 200))
            .is_empty()
    );
    assert_eq!(rig.dropped("unexpected_source"), 1);
    assert_eq!(
        rig.engine.instance("eth0", key(1)).unwrap().deadline(),
        before,
        "no filtered packet reached the instance"
    );

    // A master's advertisement reaches its VRID only, and restarts that backup's timer.
    rig.now += ms(50);
    rig.hear(PEER, advert(1, 200));
    let web = rig.engine.instance("eth0", key(1)).unwrap();
    assert_eq!(web.master(), Some(IpAddr::V4(PEER)));
    assert_eq!(web.deadline(), Some(rig.now + web.master_down_interval()));
    assert_eq!(rig.engine.instance("eth0", key(2)).unwrap().master(), None);
    rig.hear(PEER, advert(2, 200));
    assert_eq!(
        rig.engine.instance("eth0", key(2)).unwrap().master(),
        Some(IpAddr::V4(PEER))
    );
}

#[test]
fn a_timer_late_within_the_slack_keeps_the_advertisement_schedule() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let first = rig.engine.deadline().unwrap();
    // Woken 3 ms late: the next advertisement is due one interval after the deadline.
    let out = rig.at(first - rig.epoch + ms(3));
    assert_eq!(sends(&out).len(), 1);
    assert_eq!(rig.engine.deadline(), Some(first + ms(100)));
    // After a real stall, one advertisement and the schedule restarts from now: no burst.
    let stalled = first + ms(100) + ms(250) - rig.epoch;
    let out = rig.at(stalled);
    assert_eq!(sends(&out).len(), 1);
    assert_eq!(rig.engine.deadline(), Some(rig.now + ms(100)));
}

#[test]
fn every_election_is_numbered_and_the_number_outlives_the_mastership() {
    // Master for a moment, then preempted by a higher priority: a status writer that looks
    // after both inputs still sees that this node was elected.
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 7, 100), spec("api", 8, 100)]);
    let elected = |rig: &Rig, name: &str| {
        rig.engine.observed().instances[&(name.to_string(), Family::V4)].elected
    };
    assert_eq!(elected(&rig, "web"), 0, "not elected yet");
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    rig.at(deadline);
    assert_eq!(rig.state(7), State::Master);
    let (web, api) = (elected(&rig, "web"), elected(&rig, "api"));
    assert!(
        web > 0 && api > 0 && web != api,
        "one number each: {web} {api}"
    );
    rig.hear(PEER, advert(7, 200));
    assert_eq!(rig.state(7), State::Backup);
    assert_eq!(elected(&rig, "web"), web, "kept after the mastership ended");
    // Elected again: a newer number, larger than any before.
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    rig.at(deadline + ms(1000));
    assert_eq!(rig.state(7), State::Master);
    assert!(elected(&rig, "web") > web.max(api));
}

#[test]
fn after_a_stall_an_advertisement_heard_before_the_timer_keeps_the_backup() {
    // What the driver's drain-before-fire relies on: the master's advertisement and the
    // master-down timer are both pending after a stall; heard first, the advertisement wins.
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.hear(PEER, advert(1, 200));
    let deadline = rig.engine.deadline().unwrap();
    rig.now = deadline + ms(40);
    rig.hear(PEER, advert(1, 200));
    let out = rig.input(Input::Timer);
    assert!(transitions(&out).is_empty(), "{out:?}");
    assert_eq!(rig.state(1), State::Backup);
    assert!(rig.engine.deadline().unwrap() > rig.now);
}

#[test]
fn an_unchanged_plan_does_nothing_and_a_priority_change_applies_in_place() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    rig.engine.take_observed_change();
    assert!(rig.apply(&[spec("web", 1, 100)]).is_empty());
    assert!(!rig.engine.take_observed_change());

    let out = rig.apply(&[spec("web", 1, 150)]);
    assert!(transitions(&out).is_empty(), "{out:?}");
    assert_eq!(rig.state(1), State::Master);
    let instance = rig.engine.instance("eth0", key(1)).unwrap();
    assert_eq!(instance.config().priority, 150);
    assert!(rig.engine.take_observed_change());
    assert_eq!(
        rig.engine.observed().instances[&("web".to_string(), Family::V4)].priority,
        150
    );
}

#[test]
fn a_new_first_member_renames_the_observed_entry_and_leaves_none_behind() {
    let mut rig = Rig::new();
    let shared = |resource: &str, members: &[&str]| InstanceSpec {
        resource: resource.into(),
        members: members.iter().map(|m| m.to_string()).collect(),
        ..spec("web-2", 1, 100)
    };
    // Created in the order the watch delivered them: web-2 first, then web-1 joins.
    rig.apply(&[shared("web-2", &["web-2"])]);
    rig.make_master(1);
    let elected = rig.engine.observed().instances[&("web-2".to_string(), Family::V4)].elected;
    let out = rig.apply(&[shared("web-1", &["web-1", "web-2"])]);
    assert!(transitions(&out).is_empty(), "not restarted: {out:?}");
    let keys: Vec<_> = rig.engine.observed().instances.keys().cloned().collect();
    assert_eq!(
        keys,
        [("web-1".to_string(), Family::V4)],
        "one entry, renamed"
    );
    let entry = &rig.engine.observed().instances[&("web-1".to_string(), Family::V4)];
    assert_eq!(entry.state, State::Master);
    assert_eq!(entry.elected, elected);
    assert_eq!(*entry.members, ["web-1".to_string(), "web-2".to_string()]);
    // And back (web-1 deleted).
    rig.apply(&[shared("web-2", &["web-2"])]);
    let keys: Vec<_> = rig.engine.observed().instances.keys().cloned().collect();
    assert_eq!(keys, [("web-2".to_string(), Family::V4)]);
}

#[test]
fn a_changed_version_restarts_the_instance_and_other_changes_reconfigure_it() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let moved = InstanceSpec {
        addresses: vec![net("192.0.2.200/24")],
        ..spec("web", 1, 100)
    };
    let out = rig.apply(std::slice::from_ref(&moved));
    assert!(
        transitions(&out).is_empty(),
        "reconfigured in place: {out:?}"
    );
    assert!(out.contains(&Output::RemoveAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.101/24")].into()
    }));
    assert!(out.contains(&Output::AddAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.200/24")].into()
    }));

    let v2 = InstanceSpec {
        version: Version::V2,
        advert_interval: Duration::from_secs(1),
        ..moved
    };
    let out = rig.apply(&[v2]);
    assert_eq!(
        transitions(&out)
            .iter()
            .map(|t| (t.1, t.2))
            .collect::<Vec<_>>(),
        vec![
            (State::Master, State::Initialize),
            (State::Initialize, State::Backup)
        ]
    );
}

#[test]
fn a_removed_master_leaves_with_priority_zero_and_releases_its_addresses() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100), spec("api", 2, 100)]);
    rig.make_master(1);
    assert_eq!(rig.state(2), State::Master);
    let out = rig.apply(&[spec("api", 2, 100)]);
    let sent = sends(&out);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        (sent[0].advertisement.vrid, sent[0].advertisement.priority),
        (1, 0)
    );
    assert!(out.contains(&Output::RemoveAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.101/24")].into()
    }));
    assert_eq!(rig.state(1), State::Initialize);
    assert_eq!(rig.state(2), State::Master);
    assert!(
        !rig.engine
            .observed()
            .instances
            .contains_key(&("web".to_string(), Family::V4))
    );
    // Only api's timer is left.
    assert_eq!(
        rig.engine.deadline(),
        rig.engine.instance("eth0", key(2)).unwrap().deadline()
    );
    rig.apply(&[]);
    assert_eq!(rig.engine.deadline(), None);
    assert!(rig.engine.interfaces().is_empty());
}

#[test]
fn the_restart_hold_keeps_master_addresses_with_a_lifetime_and_stops_the_rest() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    rig.apply(&[spec("web", 1, 100), spec("api", 2, 100)]);
    assert_eq!(rig.state(2), State::Backup);
    let out = rig.input(Input::Hold(Duration::from_secs(9)));
    assert!(out.contains(&Output::HoldAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.101/24")],
        hold: Duration::from_secs(9),
    }));
    assert!(
        !out.iter()
            .any(|o| matches!(o, Output::RemoveAddresses { .. })),
        "{out:?}"
    );
    let sent = sends(&out);
    assert_eq!(sent.len(), 1, "the master announces the hold: {out:?}");
    assert_eq!(sent[0].advertisement.interval, 225, "a quarter of 9 s");
    assert_ne!(sent[0].advertisement.priority, 0);
    assert_eq!(
        transitions(&out)
            .iter()
            .map(|t| (t.0, t.2))
            .collect::<Vec<_>>(),
        vec![(1, State::Initialize), (2, State::Initialize)],
        "both stop; only the master's addresses stay, for the next agent"
    );
    assert_eq!(rig.engine.deadline(), None);
}

#[test]
fn held_addresses_are_adopted_without_an_election_and_the_others_released() {
    let held = HashSet::from([
        (ETH0_INDEX, net("192.0.2.101/24")),
        (ETH0_INDEX, net("192.0.2.250/24")),
    ]);
    let mut rig = Rig::with_held(held);
    let out = rig.apply(&[spec("web", 1, 100)]);
    let adopt = position(
        &out,
        |o| matches!(o, Output::SetLifetime { nets, lifetime: None, .. } if nets == &[net("192.0.2.101/24")]),
    );
    assert_eq!(
        transitions(&out),
        vec![(1, State::Initialize, State::Master, Reason::Adopted)]
    );
    let release = position(
        &out,
        |o| matches!(o, Output::RemoveAddresses { nets, .. } if **nets == [net("192.0.2.250/24")]),
    );
    assert!(adopt < release);
    assert_eq!(rig.state(1), State::Master);
    // Adoption happens once: the next plan releases nothing.
    assert!(rig.apply(&[spec("web", 1, 100)]).is_empty());
}

#[test]
fn an_instance_waits_for_its_interface_and_starts_when_it_appears() {
    let mut rig = Rig::new();
    let missing = Environment {
        links: BTreeMap::from([(
            Arc::from("eth0"),
            LinkEnv {
                facts: Err("no such device".into()),
                sockets: BTreeMap::new(),
                vmacs: BTreeMap::new(),
            },
        )]),
    };
    assert!(rig.apply_in(&[spec("web", 1, 100)], missing).is_empty());
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    assert_eq!(
        status.fault.as_deref(),
        Some("interface eth0: no such device")
    );
    assert_eq!(rig.engine.deadline(), None);
    // The driver keeps the interface's requirements alive while it waits.
    assert_eq!(rig.engine.requirements().len(), 1);

    // Up, but without an address yet.
    let bare = env(facts(ETH0_INDEX, None), &[]);
    rig.input(Input::Refresh(bare));
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    assert_eq!(
        status.fault.as_deref(),
        Some("interface eth0 has no usable IPv4 address")
    );

    let out = rig.input(Input::Refresh(eth0()));
    assert_eq!(
        transitions(&out),
        vec![(1, State::Initialize, State::Backup, Reason::Startup)]
    );
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    assert_eq!(status.fault, None);
    assert!(rig.engine.deadline().is_some());
}

#[test]
fn a_changed_primary_address_reconfigures_and_a_lost_one_parks_the_instance() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let renumbered = Ipv4Addr::new(192, 0, 2, 9);
    rig.input(Input::Refresh(env(
        facts(ETH0_INDEX, Some(renumbered)),
        &[],
    )));
    assert_eq!(rig.state(1), State::Master);
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    assert_eq!(sends(&out)[0].source, IpAddr::V4(renumbered));
    // An advertisement from our old address is someone else's now.
    rig.hear(OWN, advert(1, 50));
    assert_eq!(rig.dropped("own"), 0);

    let out = rig.input(Input::Refresh(env(facts(ETH0_INDEX, None), &[])));
    assert!(out.contains(&Output::RemoveAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.101/24")].into()
    }));
    assert_eq!(rig.state(1), State::Initialize);
    assert!(
        rig.engine.observed().instances[&("web".to_string(), Family::V4)]
            .fault
            .is_some()
    );
}

#[test]
fn a_recreated_interface_restarts_its_instances_on_the_new_index() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let out = rig.input(Input::Refresh(env(facts(7, Some(OWN)), &[])));
    let removed = position(&out, |o| {
        matches!(
            o,
            Output::RemoveAddresses {
                ifindex: ETH0_INDEX,
                ..
            }
        )
    });
    let restarted = position(&out, |o| {
        matches!(
            o,
            Output::Transition {
                to: State::Backup,
                ..
            }
        )
    });
    assert!(removed < restarted, "{out:?}");
    rig.make_master(1);
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    assert!(sends(&out).len() == 1);
    assert!(
        rig.engine.requirements()[0].interface.as_ref() == "eth0",
        "still on eth0"
    );
}

#[test]
fn virtual_mac_instances_use_their_macvlan_and_it_goes_with_the_last_of_them() {
    let vmac = VmacFacts {
        name: Arc::from("fv4.2.1"),
        index: 40,
        mac: [0, 0, 0x5e, 0, 1, 1],
    };
    let with_vmac = env(facts(ETH0_INDEX, Some(OWN)), &[(1, vmac.clone())]);
    let web = InstanceSpec {
        virtual_mac: true,
        ..spec("web", 1, 100)
    };
    let mut rig = Rig::new();
    rig.apply_in(std::slice::from_ref(&web), with_vmac.clone());
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    assert!(out.contains(&Output::AddAddresses {
        ifindex: 40,
        nets: vec![net("192.0.2.101/24")].into()
    }));
    assert!(out.iter().any(|o| matches!(
        o,
        Output::Announce { interface, mac, .. } if &**interface == "fv4.2.1" && *mac == vmac.mac
    )));
    assert_eq!(sends(&out)[0].vmac.as_deref(), Some("fv4.2.1"));
    assert_eq!(sends(&out)[0].source, IpAddr::V4(OWN));

    // A restart of the instance (new version) keeps its macvlan.
    let v2 = InstanceSpec {
        version: Version::V2,
        advert_interval: Duration::from_secs(1),
        ..web
    };
    let out = rig.apply_in(std::slice::from_ref(&v2), with_vmac.clone());
    assert!(
        !out.iter().any(|o| matches!(o, Output::DeleteVmac { .. })),
        "{out:?}"
    );
    // Removed: the macvlan goes after the instance released its addresses.
    rig.make_master(1);
    let out = rig.apply_in(&[], with_vmac);
    let removed = position(&out, |o| {
        matches!(o, Output::RemoveAddresses { ifindex: 40, .. })
    });
    let deleted = position(
        &out,
        |o| matches!(o, Output::DeleteVmac { name } if &**name == "fv4.2.1"),
    );
    assert!(removed < deleted, "{out:?}");
}

#[test]
fn a_virtual_mac_that_cannot_be_set_up_parks_the_instance_with_the_reason() {
    let mut rig = Rig::new();
    let mut broken = eth0();
    broken
        .links
        .get_mut("eth0")
        .unwrap()
        .vmacs
        .insert((Family::V4, 1), Err("operation not supported".into()));
    let web = InstanceSpec {
        virtual_mac: true,
        ..spec("web", 1, 100)
    };
    rig.apply_in(&[web], broken);
    assert_eq!(rig.state(1), State::Initialize);
    assert_eq!(
        rig.engine.observed().instances[&("web".to_string(), Family::V4)]
            .fault
            .as_deref(),
        Some("virtual MAC: operation not supported")
    );
}

#[test]
fn unicast_advertisements_go_to_the_other_peers_only() {
    let mut rig = Rig::new();
    let third = Ipv4Addr::new(192, 0, 2, 3);
    let web = InstanceSpec {
        unicast_peers: Some(vec![IpAddr::V4(OWN), IpAddr::V4(PEER), IpAddr::V4(third)]),
        ..spec("web", 1, 100)
    };
    rig.apply(&[web]);
    let deadline = rig.engine.deadline().unwrap() - rig.epoch;
    let out = rig.at(deadline);
    assert_eq!(
        &*sends(&out)[0].destinations,
        &[IpAddr::V4(PEER), IpAddr::V4(third)]
    );
}

#[test]
fn a_shared_instance_reports_every_member_under_its_first_name() {
    let mut rig = Rig::new();
    let shared = InstanceSpec {
        members: vec!["a".into(), "b".into(), "c".into()],
        addresses: vec![
            net("192.0.2.101/24"),
            net("192.0.2.102/24"),
            net("192.0.2.103/24"),
        ],
        ..spec("a", 1, 100)
    };
    rig.apply(std::slice::from_ref(&shared));
    rig.make_master(1);
    let status = &rig.engine.observed().instances[&("a".to_string(), Family::V4)];
    assert_eq!(&*status.members, &["a", "b", "c"]);
    // A member joins: the instance keeps running, the members are updated.
    let grown = InstanceSpec {
        members: vec!["a".into(), "b".into(), "c".into(), "d".into()],
        addresses: [shared.addresses.clone(), vec![net("192.0.2.104/24")]].concat(),
        ..shared
    };
    let out = rig.apply(&[grown]);
    assert!(transitions(&out).is_empty());
    assert!(out.contains(&Output::AddAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![net("192.0.2.104/24")].into()
    }));
    let status = &rig.engine.observed().instances[&("a".to_string(), Family::V4)];
    assert_eq!(status.members.len(), 4);
}

#[test]
fn requirements_name_what_the_driver_must_set_up() {
    let web = InstanceSpec {
        virtual_mac: true,
        ..spec("web", 3, 100)
    };
    let reqs = requirements(&plan(&[spec("api", 1, 100), web]));
    assert_eq!(
        reqs,
        vec![
            Requirement {
                interface: Arc::from("eth0"),
                family: Family::V4,
                vrid: 1,
                virtual_mac: false
            },
            Requirement {
                interface: Arc::from("eth0"),
                family: Family::V4,
                vrid: 3,
                virtual_mac: true
            },
        ]
    );
}

// ---------------------------------------------------------------------------------------------
// Address lifetimes, repair and step-down

fn renewals(out: &[Output]) -> Vec<(Duration, Vec<(u32, IpNet)>)> {
    out.iter()
        .filter_map(|o| match o {
            Output::RenewAddresses {
                lifetime,
                addresses,
            } => Some((*lifetime, addresses.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn masters_renew_their_addresses_every_third_of_the_lifetime_in_one_batch() {
    let mut rig = Rig::new();
    rig.engine.set_address_lifetime(Some(ms(1500)));
    assert_eq!(
        rig.engine.address_lifetime(),
        Some(Duration::from_secs(1)),
        "whole seconds, as IFA_CACHEINFO carries them"
    );
    rig.apply(&[spec("web", 1, 100), spec("api", 2, 100)]);
    // Backups hold nothing: no renewal is due.
    let backup_deadline = rig.engine.deadline().unwrap();
    assert_eq!(
        Some(backup_deadline),
        rig.engine.instance("eth0", key(1)).unwrap().deadline()
    );
    rig.make_master(1);
    rig.make_master(2);
    let became = rig.now;
    let renew = became + Duration::from_secs(1) / 3;
    let out = rig.at(renew - rig.epoch);
    assert_eq!(
        renewals(&out),
        vec![(
            Duration::from_secs(1),
            vec![
                (ETH0_INDEX, net("192.0.2.101/24")),
                (ETH0_INDEX, net("192.0.2.102/24"))
            ]
        )],
        "one batch for every master"
    );
    // And again a period later, without drift.
    let out = rig.at(renew + Duration::from_secs(1) / 3 - rig.epoch);
    assert_eq!(renewals(&out).len(), 1);

    // Once no instance is master, renewals stop and leave the deadline set.
    rig.hear(PEER, advert(1, 200));
    rig.hear(PEER, advert(2, 200));
    assert_eq!(rig.state(1), State::Backup);
    let out = rig.at(renew + 2 * (Duration::from_secs(1) / 3) - rig.epoch);
    assert!(renewals(&out).is_empty(), "{out:?}");
    assert_eq!(
        rig.engine.deadline(),
        rig.engine.instance("eth0", key(1)).unwrap().deadline()
    );
    rig.apply(&[]);
    assert_eq!(rig.engine.deadline(), None);
}

#[test]
fn without_a_lifetime_nothing_is_renewed_and_adoption_makes_addresses_permanent() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let out = rig.at(Duration::from_secs(5));
    assert!(renewals(&out).is_empty());

    let held = HashSet::from([(ETH0_INDEX, net("192.0.2.101/24"))]);
    let mut rig = Rig::with_held(held);
    rig.engine
        .set_address_lifetime(Some(Duration::from_secs(2)));
    let out = rig.apply(&[spec("web", 1, 100)]);
    assert!(
        out.contains(&Output::SetLifetime {
            ifindex: ETH0_INDEX,
            nets: vec![net("192.0.2.101/24")],
            lifetime: Some(Duration::from_secs(2)),
        }),
        "an adopted address joins the renewal: {out:?}"
    );
}

#[test]
fn a_master_adds_back_and_announces_an_address_that_disappeared() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    rig.apply(&[spec("web", 1, 100), spec("api", 2, 100)]);
    assert_eq!(rig.state(2), State::Backup);
    let vip = net("192.0.2.101/24");
    let out = rig.input(Input::AddressRemoved {
        ifindex: ETH0_INDEX,
        net: vip,
    });
    let add = position(&out, |o| {
        *o == Output::AddAddresses {
            ifindex: ETH0_INDEX,
            nets: vec![vip].into(),
        }
    });
    let announce = position(
        &out,
        |o| matches!(o, Output::Announce { addrs, .. } if **addrs == [vip.addr()]),
    );
    assert!(add < announce);
    assert!(transitions(&out).is_empty(), "{out:?}");
    assert_eq!(rig.state(1), State::Master);

    // A backup's address, another interface's, or a foreign address: nothing to repair.
    for (ifindex, gone) in [
        (ETH0_INDEX, net("192.0.2.102/24")),
        (ETH0_INDEX + 1, vip),
        (ETH0_INDEX, net("192.0.2.50/24")),
    ] {
        let out = rig.input(Input::AddressRemoved { ifindex, net: gone });
        assert!(out.is_empty(), "{gone} on {ifindex}: {out:?}");
    }
}

#[test]
fn a_master_whose_address_keeps_disappearing_steps_down_and_runs_again_after_a_back_off() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100)]);
    rig.make_master(1);
    let vip = net("192.0.2.101/24");
    for _ in 0..MAX_REPAIRS {
        rig.now += ms(500);
        let out = rig.input(Input::AddressRemoved {
            ifindex: ETH0_INDEX,
            net: vip,
        });
        assert!(transitions(&out).is_empty());
    }
    rig.now += ms(500);
    let stepped_down = rig.now;
    let out = rig.input(Input::AddressRemoved {
        ifindex: ETH0_INDEX,
        net: vip,
    });
    // Priority 0 so that a backup takes over at once, the address released, and why.
    let sent = sends(&out);
    assert_eq!(sent.len(), 1, "{out:?}");
    assert_eq!(sent[0].advertisement.priority, 0);
    assert!(out.contains(&Output::RemoveAddresses {
        ifindex: ETH0_INDEX,
        nets: vec![vip].into(),
    }));
    assert_eq!(
        transitions(&out),
        vec![(1, State::Master, State::Initialize, Reason::AddressFault)]
    );
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    let fault = status.fault.as_deref().unwrap();
    assert!(
        fault.contains("192.0.2.101/24 keeps disappearing (4 times within 10s)"),
        "{fault}"
    );
    assert!(fault.contains("running again in 10s"), "{fault}");
    assert_eq!(status.reason_code, "fault");

    // Refreshes do not cut the back-off short; its timer ends it.
    rig.input(Input::Refresh(eth0()));
    assert_eq!(rig.state(1), State::Initialize);
    assert_eq!(rig.engine.deadline(), Some(stepped_down + FAULT_BACKOFF));
    let out = rig.at(stepped_down + FAULT_BACKOFF - rig.epoch);
    assert_eq!(
        transitions(&out),
        vec![(1, State::Initialize, State::Backup, Reason::Startup)]
    );
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    assert_eq!(status.fault, None);

    // A second fault soon after waits twice as long.
    rig.make_master(1);
    let out = rig.input(Input::AddressFailed {
        ifindex: ETH0_INDEX,
        net: vip,
        error: "Permission denied".into(),
    });
    assert_eq!(
        transitions(&out),
        vec![(1, State::Master, State::Initialize, Reason::AddressFault)]
    );
    let status = &rig.engine.observed().instances[&("web".to_string(), Family::V4)];
    let fault = status.fault.as_deref().unwrap();
    assert!(
        fault.contains("cannot add address 192.0.2.101/24: Permission denied")
            && fault.contains("running again in 20s"),
        "{fault}"
    );
    assert_eq!(rig.engine.deadline(), Some(rig.now + 2 * FAULT_BACKOFF));
}

#[test]
fn a_failed_add_on_a_master_steps_down_at_once_and_lost_notifications_reassert_everything() {
    let mut rig = Rig::new();
    rig.apply(&[spec("web", 1, 100), spec("api", 2, 100)]);
    rig.make_master(1);
    rig.make_master(2);
    let out = rig.input(Input::AddressEventsLost);
    let added: Vec<&Output> = out
        .iter()
        .filter(|o| matches!(o, Output::AddAddresses { .. }))
        .collect();
    assert_eq!(added.len(), 2, "{out:?}");
    assert!(transitions(&out).is_empty());

    let out = rig.input(Input::AddressFailed {
        ifindex: ETH0_INDEX,
        net: net("192.0.2.102/24"),
        error: "No such device".into(),
    });
    assert_eq!(
        transitions(&out),
        vec![(2, State::Master, State::Initialize, Reason::AddressFault)]
    );
    assert_eq!(
        rig.state(1),
        State::Master,
        "the other instance is untouched"
    );
    // A failure for an address no master holds changes nothing.
    let out = rig.input(Input::AddressFailed {
        ifindex: ETH0_INDEX,
        net: net("192.0.2.102/24"),
        error: "No such device".into(),
    });
    assert!(out.is_empty());
}

#[test]
fn losses_are_counted_per_address_so_a_flushed_interface_is_repaired_not_abandoned() {
    let mut rig = Rig::new();
    let many = InstanceSpec {
        addresses: (1..=20)
            .map(|i| net(&format!("198.51.100.{i}/32")))
            .collect(),
        ..spec("many", 1, 100)
    };
    rig.apply(std::slice::from_ref(&many));
    rig.make_master(1);
    // `ip addr flush`: every address goes once.
    for gone in &many.addresses {
        let out = rig.input(Input::AddressRemoved {
            ifindex: ETH0_INDEX,
            net: *gone,
        });
        assert!(transitions(&out).is_empty(), "{out:?}");
        assert!(out.contains(&Output::AddAddresses {
            ifindex: ETH0_INDEX,
            nets: vec![*gone].into(),
        }));
    }
    assert_eq!(rig.state(1), State::Master);
}

#[test]
fn a_group_that_vanished_at_once_is_repaired_in_one_add_and_one_announcement() {
    let mut rig = Rig::new();
    let many = InstanceSpec {
        addresses: (0..2000u32)
            .map(|i| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 9, 0, 0)) + i);
                IpNet::new(IpAddr::V4(ip), 32).unwrap()
            })
            .collect(),
        ..spec("many", 1, 100)
    };
    rig.apply(std::slice::from_ref(&many));
    rig.make_master(1);
    // Not ours (no master holds it): ignored within the batch.
    let mut gone = many.addresses.clone();
    gone.push(net("203.0.113.1/32"));
    let out = rig.input(Input::AddressesRemoved {
        ifindex: ETH0_INDEX,
        nets: gone.clone(),
    });
    let adds: Vec<&Output> = out
        .iter()
        .filter(|o| matches!(o, Output::AddAddresses { .. }))
        .collect();
    assert_eq!(
        adds,
        vec![&Output::AddAddresses {
            ifindex: ETH0_INDEX,
            nets: many.addresses.clone().into(),
        }]
    );
    let announced: Vec<usize> = out
        .iter()
        .filter_map(|o| match o {
            Output::Announce { addrs, ifindex, .. } => {
                assert_eq!(*ifindex, ETH0_INDEX);
                Some(addrs.len())
            }
            _ => None,
        })
        .collect();
    assert_eq!(announced, vec![2000]);
    // Counted per address as before: three repairs, and the fourth loss within the window
    // steps down.
    for _ in 0..2 {
        let out = rig.input(Input::AddressesRemoved {
            ifindex: ETH0_INDEX,
            nets: many.addresses.clone(),
        });
        assert!(transitions(&out).is_empty(), "{out:?}");
    }
    assert_eq!(rig.state(1), State::Master);
    let out = rig.input(Input::AddressesRemoved {
        ifindex: ETH0_INDEX,
        nets: vec![many.addresses[7]],
    });
    assert!(!transitions(&out).is_empty(), "{out:?}");
    assert!(fault_of(&rig, "many").unwrap().contains("10.9.0.7/32"));
}

fn fault_of(rig: &Rig, name: &str) -> Option<String> {
    rig.engine.observed().instances[&(name.to_string(), Family::V4)]
        .fault
        .clone()
}

fn touches(out: &[Output], vrid: u8) -> bool {
    let addr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 100 + vrid));
    out.iter().any(|o| match o {
        Output::Send(t) => t.advertisement.vrid == vrid,
        Output::AddAddresses { nets, .. } => nets.iter().any(|n| n.addr() == addr),
        Output::Transition { key, .. } => key.vrid == vrid,
        _ => false,
    })
}

#[test]
fn an_empty_requested_allowlist_is_never_run() {
    let mut rig = Rig::new();
    let closed = InstanceSpec {
        unicast_peers: Some(Vec::new()),
        ..spec("closed", 2, 200)
    };
    let out = rig.apply(&[spec("web", 1, 100), closed]);
    assert!(!touches(&out, 2), "{out:?}");
    assert!(rig.engine.instance("eth0", key(2)).is_none());
    assert!(rig.engine.instance("eth0", key(1)).is_some());
    let fault = fault_of(&rig, "closed").expect("a fault in status");
    assert!(
        fault.contains("spec.vrrp.unicastPeers: no ipv4 peer"),
        "{fault}"
    );
    assert_eq!(fault_of(&rig, "web"), None);
    // Advertisements from anyone are dropped, and it never takes over, however long.
    assert!(rig.hear(PEER, advert(2, 50)).is_empty());
    assert_eq!(rig.dropped("unexpected_source"), 1);
    for second in 1..=5 {
        let out = rig.at(Duration::from_secs(second));
        assert!(!touches(&out, 2), "{out:?}");
        let out = rig.input(Input::Refresh(eth0()));
        assert!(!touches(&out, 2), "{out:?}");
    }
    assert_eq!(rig.state(1), State::Master);
    // A running instance whose allowlist becomes empty stops and gives up its addresses.
    let emptied = InstanceSpec {
        unicast_peers: Some(Vec::new()),
        ..spec("web", 1, 100)
    };
    let out = rig.apply(&[emptied]);
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::RemoveAddresses { .. })),
        "{out:?}"
    );
    assert!(rig.engine.instance("eth0", key(1)).is_none());
    assert!(fault_of(&rig, "web").is_some());
}

#[test]
fn an_address_wider_than_the_interface_subnet_is_refused_unless_allowed() {
    let mut rig = Rig::new();
    let wide = InstanceSpec {
        addresses: vec![net("192.0.2.102/16")],
        ..spec("wide", 2, 200)
    };
    let out = rig.apply(&[spec("web", 1, 100), wide.clone()]);
    assert!(!touches(&out, 2), "{out:?}");
    assert!(rig.engine.instance("eth0", key(2)).is_none());
    assert_eq!(
        fault_of(&rig, "wide").unwrap(),
        "spec.addresses: 192.0.2.102/16 has a shorter prefix than interface eth0's subnet \
         192.0.2.1/24 and would route the whole range through it; use /24 or longer, or set \
         spec.allowWidePrefix: true"
    );
    // Allowed explicitly: runs.
    let allowed = InstanceSpec {
        allow_wide_prefix: true,
        ..wide
    };
    rig.apply(&[spec("web", 1, 100), allowed]);
    assert!(rig.engine.instance("eth0", key(2)).is_some());
    assert_eq!(fault_of(&rig, "wide"), None);

    // The interface renumbered to a longer prefix: the running master of a /24 steps down.
    rig.at(Duration::from_secs(1));
    assert_eq!(rig.state(1), State::Master);
    let mut narrower = facts(ETH0_INDEX, Some(OWN));
    narrower.subnet_v4 = Some("192.0.2.1/28".parse().unwrap());
    let out = rig.input(Input::Refresh(env(narrower, &[])));
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::RemoveAddresses { nets, .. } if **nets == [net("192.0.2.101/24")])),
        "{out:?}"
    );
    assert!(rig.engine.instance("eth0", key(1)).is_none());
    assert!(fault_of(&rig, "web").unwrap().contains("use /28 or longer"));
    assert!(
        rig.engine.instance("eth0", key(2)).is_some(),
        "allowed one keeps running"
    );
}
