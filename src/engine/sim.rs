//! An in-memory LAN of VRRP instances on a virtual clock, for tests.
//!
//! Deterministic: one event queue ordered by (time, sequence number); advertisements reach every
//! other live node of the sender's segment after `latency` (plus a seeded-random `jitter`);
//! instance deadlines are merged into the same timeline (packets first at equal times, then
//! timers by node id). A partition assigns nodes to segments; a packet is delivered only when
//! sender and receiver share a segment both when it is sent and when it arrives.
//!
//! Every node runs the real [`NodeEngine`] with one instance on `eth0`; the LAN plays the
//! driver: it executes every [`Output`] (addresses held per node, announce bursts counted,
//! transitions and sends logged) and checks the engine's consistency: transitions chain, an
//! announcement never precedes its address, and a timer always moves the deadline forward.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ipnet::IpNet;

use super::{Environment, Input as EngineInput, LinkEnv, LinkFacts, NodeEngine, Output, Stats};
use crate::model::{InstanceKey, InstanceSpec};
use crate::vocab::{ChecksumMode, Family};
use crate::vrrp::instance::{Config, Input, Instance, Reason, State};
use crate::vrrp::packet::Advertisement;

mod property;
mod scenarios;

pub(crate) type NodeId = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TransitionRecord {
    pub at: Duration,
    pub node: NodeId,
    pub from: State,
    pub to: State,
    pub reason: Reason,
    pub unannounced: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentRecord {
    pub at: Duration,
    pub node: NodeId,
    pub advertisement: Advertisement,
}

/// The one interface of every simulated node.
const INTERFACE: &str = "eth0";

struct Node {
    /// Kept up to date by [`Lan::input`] so that a restart comes back with the latest one.
    config: Config,
    engine: NodeEngine,
    alive: bool,
    /// Stopped (SIGSTOP, a hung agent): no inputs, but its addresses stay until they expire.
    hung: bool,
    segment: usize,
    held: BTreeSet<IpNet>,
    /// When each held address expires, as the kernel would remove it (finite lifetimes).
    expires: BTreeMap<IpNet, Duration>,
    announcements: usize,
    /// Addresses the kernel removed while the agent was hung, reported on resume.
    expired_while_hung: Vec<IpNet>,
    /// The state the transition log says the instance is in, checked against each transition.
    logged_state: State,
}

#[derive(Debug)]
struct InFlight {
    at: Duration,
    seq: u64,
    from: NodeId,
    to: NodeId,
    source: IpAddr,
    advertisement: Advertisement,
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}

impl Eq for InFlight {}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

enum Next {
    Packet,
    Timer(NodeId),
}

/// SplitMix64: tiny, seeded, and good enough to drive test scenarios reproducibly.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0), with negligible modulo bias for test-sized `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

pub(crate) struct Lan {
    epoch: Instant,
    now: Duration,
    latency: Duration,
    jitter: Duration,
    rng: Rng,
    nodes: Vec<Node>,
    queue: BinaryHeap<Reverse<InFlight>>,
    next_seq: u64,
    transitions: Vec<TransitionRecord>,
    sent: Vec<SentRecord>,
    scratch: Vec<Output>,
    address_lifetime: Option<Duration>,
}

impl Lan {
    /// A LAN where every packet takes exactly `latency`.
    pub fn new(latency: Duration) -> Self {
        Lan::with_jitter(latency, Duration::ZERO, 0)
    }

    /// A LAN where every packet takes `latency` plus a uniform random extra of up to `jitter`,
    /// drawn from a PRNG seeded with `seed` (so packets may overtake each other).
    pub fn with_jitter(latency: Duration, jitter: Duration, seed: u64) -> Self {
        Lan {
            epoch: Instant::now(),
            now: Duration::ZERO,
            latency,
            jitter,
            rng: Rng::new(seed),
            nodes: Vec::new(),
            queue: BinaryHeap::new(),
            next_seq: 0,
            transitions: Vec::new(),
            sent: Vec::new(),
            scratch: Vec::new(),
            address_lifetime: None,
        }
    }

    /// Engines created from now on give their addresses this lifetime and renew it; the LAN
    /// expires addresses that are not renewed in time, as the kernel does.
    pub fn set_address_lifetime(&mut self, lifetime: Option<Duration>) {
        self.address_lifetime = lifetime;
        for node in &mut self.nodes {
            node.engine.set_address_lifetime(lifetime);
        }
    }

    /// Adds a powered-on node in segment 0 whose instance waits for [`Lan::start`].
    pub fn add(&mut self, config: Config) -> NodeId {
        self.nodes.push(Node {
            engine: self.engine(self.nodes.len()),
            config,
            alive: true,
            hung: false,
            segment: 0,
            held: BTreeSet::new(),
            expires: BTreeMap::new(),
            announcements: 0,
            expired_while_hung: Vec::new(),
            logged_state: State::Initialize,
        });
        self.nodes.len() - 1
    }

    pub fn start(&mut self, node: NodeId) {
        self.apply(node);
    }

    pub fn start_all(&mut self) {
        for node in 0..self.nodes.len() {
            self.start(node);
        }
    }

    /// Power loss: no priority-0 advert, addresses gone with the machine, packets to it lost.
    pub fn crash(&mut self, node: NodeId) {
        let node = &mut self.nodes[node];
        node.alive = false;
        node.held.clear();
        node.expires.clear();
    }

    /// The agent stops (SIGSTOP, a hang): it neither hears nor sends, and does nothing, while
    /// its addresses stay on the interface until their lifetime runs out.
    pub fn hang(&mut self, node: NodeId) {
        let node = &mut self.nodes[node];
        node.alive = false;
        node.hung = true;
    }

    /// The hung agent runs again (SIGCONT): it learns, as from the kernel's notifications,
    /// which of its addresses expired meanwhile, then its overdue timers fire.
    pub fn resume(&mut self, node: NodeId) {
        self.expire(node);
        let n = &mut self.nodes[node];
        n.alive = true;
        n.hung = false;
        let expired = std::mem::take(&mut n.expired_while_hung);
        for net in expired {
            self.handle(node, EngineInput::AddressRemoved { ifindex: 2, net });
        }
    }

    /// Someone deletes `net` from the node's interface; the engine hears of it.
    pub fn delete_address(&mut self, node: NodeId, net: IpNet) {
        self.nodes[node].held.remove(&net);
        self.nodes[node].expires.remove(&net);
        self.handle(node, EngineInput::AddressRemoved { ifindex: 2, net });
    }

    /// Drops the node's addresses whose lifetime ran out.
    fn expire(&mut self, node: NodeId) {
        let now = self.now;
        let n = &mut self.nodes[node];
        let expired: Vec<IpNet> = n
            .expires
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(net, _)| *net)
            .collect();
        for net in expired {
            n.held.remove(&net);
            n.expires.remove(&net);
            n.expired_while_hung.push(net);
        }
    }

    /// Boots a crashed (or running) node with a fresh instance and its latest config.
    pub fn restart(&mut self, node: NodeId) {
        let n = &mut self.nodes[node];
        n.alive = true;
        n.held.clear();
        n.logged_state = State::Initialize;
        let engine = self.engine(node);
        self.nodes[node].engine = engine;
        self.start(node);
    }

    /// Delivers one input at the current time, as the agent would: a new priority or
    /// configuration is a new plan for the engine, `Shutdown` stops the node's engine.
    pub fn input(&mut self, node: NodeId, input: Input) {
        match input {
            Input::SetPriority(priority) => {
                self.nodes[node].config.priority = priority;
                self.apply(node);
            }
            Input::Reconfigure(config) => {
                self.nodes[node].config = config;
                self.apply(node);
            }
            Input::Shutdown => self.handle(node, EngineInput::Shutdown),
            other => panic!("the simulated agent does not send {other:?}"),
        }
    }

    /// A fresh engine for `node` (what a (re)started agent has).
    fn engine(&self, node: NodeId) -> NodeEngine {
        let mut engine = NodeEngine::new(
            format!("node-{node}"),
            HashSet::new(),
            Arc::new(Stats::default()),
            (self.epoch, SystemTime::UNIX_EPOCH),
        );
        engine.set_address_lifetime(self.address_lifetime);
        engine
    }

    /// Hands the node's engine the plan of its current configuration.
    fn apply(&mut self, node: NodeId) {
        let config = &self.nodes[node].config;
        let spec = spec_of(config);
        let key = InstanceKey {
            family: spec.family,
            vrid: spec.vrid,
        };
        let instances = BTreeMap::from([(INTERFACE.to_string(), BTreeMap::from([(key, spec)]))]);
        let env = environment(node, config);
        self.handle(node, EngineInput::Apply { instances, env });
    }

    fn handle(&mut self, node: NodeId, input: EngineInput) {
        assert!(self.nodes[node].alive, "input to crashed node {node}");
        let mut out = std::mem::take(&mut self.scratch);
        let now = self.instant(self.now);
        self.nodes[node].engine.handle(now, input, &mut out);
        self.execute(node, &mut out);
        self.scratch = out;
    }

    /// Splits the LAN: each group becomes its own segment; unlisted nodes are isolated.
    pub fn partition(&mut self, groups: &[&[NodeId]]) {
        let isolated = groups.len();
        for (id, node) in self.nodes.iter_mut().enumerate() {
            node.segment = isolated + id;
        }
        for (segment, group) in groups.iter().enumerate() {
            for &node in *group {
                self.nodes[node].segment = segment;
            }
        }
    }

    pub fn heal(&mut self) {
        for node in &mut self.nodes {
            node.segment = 0;
        }
    }

    pub fn run_for(&mut self, duration: Duration) {
        self.run_until(self.now + duration);
    }

    /// Processes every packet and timer due up to and including `until`.
    pub fn run_until(&mut self, until: Duration) {
        let mut last = self.now;
        let mut events_at_last = 0u32;
        loop {
            let packet = self.queue.peek().map(|Reverse(p)| p.at);
            let timer = self.next_timer();
            let (at, next) = match (packet, timer) {
                (Some(p), Some((t, _))) if p <= t => (p, Next::Packet),
                (Some(p), None) => (p, Next::Packet),
                (_, Some((t, node))) => (t, Next::Timer(node)),
                (None, None) => break,
            };
            if at > until {
                break;
            }
            if at == last {
                events_at_last += 1;
                assert!(events_at_last < 100_000, "livelock at {at:?}");
            } else {
                last = at;
                events_at_last = 0;
            }
            self.now = at;
            match next {
                Next::Packet => self.deliver(),
                Next::Timer(node) => {
                    self.handle(node, EngineInput::Timer);
                    let deadline = self.nodes[node].engine.deadline();
                    assert!(
                        deadline.is_none_or(|d| d > self.instant(at)),
                        "node {node}: Timer at {at:?} left the deadline at {deadline:?}"
                    );
                }
            }
        }
        self.now = self.now.max(until);
    }

    pub fn now(&self) -> Duration {
        self.now
    }

    pub fn instant(&self, offset: Duration) -> Instant {
        self.epoch + offset
    }

    pub fn offset(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.epoch)
    }

    /// The node's instance (it must be running).
    /// The node's engine counters (a restart starts new ones).
    pub fn stats(&self, node: NodeId) -> &Arc<Stats> {
        self.nodes[node].engine.stats()
    }

    pub fn instance(&self, node: NodeId) -> &Instance {
        self.running(node)
            .unwrap_or_else(|| panic!("node {node} runs no instance"))
    }

    fn running(&self, node: NodeId) -> Option<&Instance> {
        let n = &self.nodes[node];
        let key = InstanceKey {
            family: n.config.family(),
            vrid: n.config.vrid,
        };
        n.engine.instance(INTERFACE, key)
    }

    pub fn state(&self, node: NodeId) -> State {
        self.running(node)
            .map_or(State::Initialize, Instance::state)
    }

    pub fn is_alive(&self, node: NodeId) -> bool {
        self.nodes[node].alive
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Live nodes in Master, by id.
    pub fn masters(&self) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&n| self.nodes[n].alive && self.state(n) == State::Master)
            .collect()
    }

    /// Live nodes that hold `address` on their interface.
    /// A hung node still holds its addresses until they expire.
    pub fn holders(&self, address: IpAddr) -> Vec<NodeId> {
        (0..self.nodes.len())
            .filter(|&n| {
                let node = &self.nodes[n];
                (node.alive || node.hung)
                    && node.held.iter().any(|net| {
                        net.addr() == address
                            && node.expires.get(net).is_none_or(|at| *at > self.now)
                    })
            })
            .collect()
    }

    pub fn announcements(&self, node: NodeId) -> usize {
        self.nodes[node].announcements
    }

    /// Live nodes grouped by segment (the connected components of the LAN).
    pub fn components(&self) -> Vec<Vec<NodeId>> {
        let mut segments: Vec<usize> = self
            .nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.segment)
            .collect();
        segments.sort_unstable();
        segments.dedup();
        segments
            .into_iter()
            .map(|segment| {
                (0..self.nodes.len())
                    .filter(|&n| self.nodes[n].alive && self.nodes[n].segment == segment)
                    .collect()
            })
            .collect()
    }

    pub fn transitions(&self) -> &[TransitionRecord] {
        &self.transitions
    }

    /// Transitions of `node` into `to`, oldest first.
    pub fn transitions_to(&self, node: NodeId, to: State) -> Vec<&TransitionRecord> {
        self.transitions
            .iter()
            .filter(|t| t.node == node && t.to == to)
            .collect()
    }

    pub fn sent_by(&self, node: NodeId) -> Vec<&SentRecord> {
        self.sent.iter().filter(|s| s.node == node).collect()
    }

    fn connected(&self, a: NodeId, b: NodeId) -> bool {
        self.nodes[a].segment == self.nodes[b].segment
    }

    fn next_timer(&self) -> Option<(Duration, NodeId)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(id, n)| {
                let deadline = n.engine.deadline()?;
                Some((self.offset(deadline).max(self.now), id))
            })
            .min()
    }

    fn deliver(&mut self) {
        let Some(Reverse(packet)) = self.queue.pop() else {
            return;
        };
        if !self.nodes[packet.to].alive || !self.connected(packet.from, packet.to) {
            return;
        }
        let family = Family::of(&packet.source);
        self.handle(
            packet.to,
            EngineInput::Advertisement {
                interface: Arc::from(INTERFACE),
                family,
                source: packet.source,
                advertisement: packet.advertisement,
            },
        );
    }

    fn execute(&mut self, node: NodeId, out: &mut Vec<Output>) {
        for output in out.drain(..) {
            match output {
                Output::Send(transmit) => {
                    assert_eq!(transmit.source, self.nodes[node].config.primary_address);
                    self.broadcast(node, transmit.advertisement)
                }
                Output::AddAddresses { nets, .. } => {
                    let lifetime = self.nodes[node].engine.address_lifetime();
                    for &net in nets.iter() {
                        // Adding an address that is there already changes nothing.
                        if self.nodes[node].held.insert(net)
                            && let Some(lifetime) = lifetime
                        {
                            self.nodes[node].expires.insert(net, self.now + lifetime);
                        }
                    }
                }
                Output::RemoveAddresses { nets, .. } => {
                    for &net in nets.iter() {
                        self.nodes[node].held.remove(&net);
                        self.nodes[node].expires.remove(&net);
                    }
                }
                Output::Announce { addrs, .. } => {
                    let held = &self.nodes[node].held;
                    for &address in addrs.iter() {
                        assert!(
                            held.iter().any(|net| net.addr() == address),
                            "node {node} announced {address} before adding it"
                        );
                    }
                    self.nodes[node].announcements += 1;
                }
                Output::Transition {
                    from,
                    to,
                    reason,
                    unannounced,
                    ..
                } => {
                    let logged = self.nodes[node].logged_state;
                    assert_eq!(from, logged, "node {node}: transition from {from}");
                    self.nodes[node].logged_state = to;
                    self.transitions.push(TransitionRecord {
                        at: self.now,
                        node,
                        from,
                        to,
                        reason,
                        unannounced,
                    });
                }
                Output::RenewAddresses {
                    lifetime,
                    addresses,
                } => {
                    // A renewal re-creates an address that vanished, as the kernel does.
                    for (_, net) in addresses {
                        self.nodes[node].held.insert(net);
                        self.nodes[node].expires.insert(net, self.now + lifetime);
                    }
                }
                Output::SetLifetime { .. }
                | Output::HoldAddresses { .. }
                | Output::DeleteVmac { .. } => {
                    panic!("node {node}: unexpected {output:?}")
                }
            }
        }
        let state = self.state(node);
        assert_eq!(
            self.nodes[node].logged_state, state,
            "node {node}: state changed without a transition"
        );
        let holds_all = self.nodes[node]
            .config
            .addresses
            .iter()
            .all(|net| self.nodes[node].held.contains(net));
        match state {
            State::Master => assert!(holds_all, "node {node}: master without its addresses"),
            _ => assert!(
                self.nodes[node].held.is_empty(),
                "node {node}: {state} still holds addresses"
            ),
        }
    }

    fn broadcast(&mut self, from: NodeId, advertisement: Advertisement) {
        let source = self.nodes[from].config.primary_address;
        self.sent.push(SentRecord {
            at: self.now,
            node: from,
            advertisement: advertisement.clone(),
        });
        for to in 0..self.nodes.len() {
            if to == from || !self.nodes[to].alive || !self.connected(from, to) {
                continue;
            }
            let jitter = if self.jitter.is_zero() {
                Duration::ZERO
            } else {
                let nanos = u64::try_from(self.jitter.as_nanos()).unwrap_or(u64::MAX);
                Duration::from_nanos(self.rng.below(nanos.saturating_add(1)))
            };
            self.next_seq += 1;
            self.queue.push(Reverse(InFlight {
                at: self.now + self.latency + jitter,
                seq: self.next_seq,
                from,
                to,
                source,
                advertisement: advertisement.clone(),
            }));
        }
    }
}

/// The plan an agent makes of one router's configuration.
fn spec_of(config: &Config) -> InstanceSpec {
    InstanceSpec {
        resource: "vip".into(),
        members: vec!["vip".into()],
        interface: INTERFACE.into(),
        family: config.family(),
        vrid: config.vrid,
        version: config.version,
        priority: config.priority,
        priority_reasons: Vec::new(),
        advert_interval: config.advert_interval,
        preempt: config.preempt,
        preempt_delay: config.preempt_delay,
        addresses: config.addresses.clone(),
        unicast_peers: None,
        checksum: ChecksumMode::default(),
        virtual_mac: false,
        allow_wide_prefix: false,
    }
}

/// `eth0` of a simulated node, with its address and an open socket.
fn environment(node: NodeId, config: &Config) -> Environment {
    let (primary_v4, link_local_v6) = match config.primary_address {
        IpAddr::V4(a) => (Some(a), None),
        IpAddr::V6(a) => (None, Some(a)),
    };
    let link = LinkEnv {
        facts: Ok(LinkFacts {
            index: 2,
            mac: [2, 0, 0, 0, 0, u8::try_from(node).unwrap_or(u8::MAX)],
            primary_v4,
            link_local_v6,
            subnet_v4: None,
            subnet_v6: None,
        }),
        sockets: BTreeMap::from([(config.family(), Ok(()))]),
        vmacs: BTreeMap::new(),
    };
    Environment {
        links: BTreeMap::from([(Arc::from(INTERFACE), link)]),
    }
}
