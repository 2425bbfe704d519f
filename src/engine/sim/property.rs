//! Property-style test: random crashes, restarts, graceful shutdowns, partitions, heals and
//! priority changes, driven by a seeded PRNG on a LAN with jitter. Whenever things are left
//! alone long enough, every connected group of running routers has exactly one master, it is
//! the one with the highest (priority, address), only it holds the virtual address, and nothing
//! changes any more.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::{Lan, NodeId, Rng};
use crate::vocab::Version;
use crate::vrrp::instance::{Config, Input, State};

const VIP: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 9, 0, 100));
const STEPS: usize = 1500;
const SEEDS: [u64; 4] = [1, 2, 0x5eed, 0xdead_beef];
/// Long enough for a few successive takeovers (each at most one Master_Down_Interval).
const SETTLE: Duration = Duration::from_secs(4);
const QUIET: Duration = Duration::from_secs(2);

fn router(node: NodeId, priority: u8) -> Config {
    Config {
        vrid: 9,
        version: Version::V3,
        priority,
        advert_interval: Duration::from_millis(100),
        preempt: true,
        preempt_delay: Duration::ZERO,
        accept_mode: false,
        addresses: vec![IpNet::new(VIP, 24).unwrap()],
        primary_address: IpAddr::V4(Ipv4Addr::new(10, 9, 0, 1 + node as u8)),
    }
}

/// A priority in 1..=254 that no router has: with ties, RFC 5798 keeps whichever master came
/// first, so the "highest wins" property only holds for distinct priorities.
fn unused_priority(rng: &mut Rng, priorities: &[u8]) -> u8 {
    loop {
        let candidate = 1 + rng.below(254) as u8;
        if !priorities.contains(&candidate) {
            return candidate;
        }
    }
}

fn pick(rng: &mut Rng, candidates: &[NodeId]) -> Option<NodeId> {
    if candidates.is_empty() {
        None
    } else {
        Some(candidates[rng.below(candidates.len() as u64) as usize])
    }
}

#[test]
fn random_faults_always_settle_on_the_best_master() {
    for seed in SEEDS {
        run(seed);
    }
}

fn run(seed: u64) {
    let mut rng = Rng::new(seed);
    let mut lan = Lan::with_jitter(Duration::from_millis(1), Duration::from_millis(3), seed);
    let count = 3 + rng.below(3) as usize;
    let mut priorities: Vec<u8> = Vec::new();
    for node in 0..count {
        let priority = unused_priority(&mut rng, &priorities);
        priorities.push(priority);
        lan.add(router(node, priority));
    }
    for node in 0..count {
        lan.run_for(Duration::from_millis(rng.below(500)));
        lan.start(node);
    }
    let mut checks = 0;
    for step in 0..STEPS {
        lan.run_for(Duration::from_millis(rng.below(300)));
        let running: Vec<NodeId> = (0..count)
            .filter(|&n| lan.is_alive(n) && lan.state(n) != State::Initialize)
            .collect();
        let stopped: Vec<NodeId> = (0..count).filter(|n| !running.contains(n)).collect();
        match rng.below(100) {
            0..10 => {
                if let Some(node) = pick(&mut rng, &running) {
                    lan.crash(node);
                }
            }
            10..22 => {
                if let Some(node) = pick(&mut rng, &stopped) {
                    lan.restart(node);
                }
            }
            22..26 => {
                if let Some(node) = pick(&mut rng, &running) {
                    lan.input(node, Input::Shutdown);
                }
            }
            26..34 => {
                let segments = 1 + rng.below(3) as usize;
                let mut groups = vec![Vec::new(); segments];
                for node in 0..count {
                    groups[rng.below(segments as u64) as usize].push(node);
                }
                let groups: Vec<&[NodeId]> = groups.iter().map(Vec::as_slice).collect();
                lan.partition(&groups);
            }
            34..42 => lan.heal(),
            42..50 => {
                if let Some(node) = pick(&mut rng, &running) {
                    let priority = unused_priority(&mut rng, &priorities);
                    priorities[node] = priority;
                    lan.input(node, Input::SetPriority(priority));
                }
            }
            _ => {}
        }
        if step % 50 == 49 {
            check_settled(&mut lan, &priorities, seed, step);
            checks += 1;
        }
    }
    check_settled(&mut lan, &priorities, seed, STEPS);
    assert_eq!(checks, STEPS / 50);
    // The run really exercised elections, not one static master.
    let elections = lan
        .transitions()
        .iter()
        .filter(|t| t.to == State::Master)
        .count();
    assert!(elections > 20, "seed {seed}: only {elections} elections");
}

fn check_settled(lan: &mut Lan, priorities: &[u8], seed: u64, step: usize) {
    lan.run_for(SETTLE);
    let before = lan.transitions().len();
    lan.run_for(QUIET);
    assert_eq!(
        lan.transitions().len(),
        before,
        "seed {seed} step {step}: still changing: {:?}",
        &lan.transitions()[before..]
    );
    let holders: BTreeSet<NodeId> = lan.holders(VIP).into_iter().collect();
    for component in lan.components() {
        let running: Vec<NodeId> = component
            .into_iter()
            .filter(|&n| lan.state(n) != State::Initialize)
            .collect();
        let Some(&best) = running
            .iter()
            .max_by_key(|&&n| (priorities[n], lan.instance(n).config().primary_address))
        else {
            continue;
        };
        let masters: Vec<NodeId> = running
            .iter()
            .copied()
            .filter(|&n| lan.state(n) == State::Master)
            .collect();
        assert_eq!(
            masters,
            vec![best],
            "seed {seed} step {step}: group {running:?} priorities {priorities:?}"
        );
        let group_holders: Vec<NodeId> = running
            .iter()
            .copied()
            .filter(|n| holders.contains(n))
            .collect();
        assert_eq!(group_holders, vec![best], "seed {seed} step {step}");
        for &node in &running {
            assert_eq!(lan.instance(node).config().priority, priorities[node]);
        }
    }
}
