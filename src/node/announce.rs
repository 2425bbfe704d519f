//! Gratuitous ARP and unsolicited neighbour advertisements.
//!
//! A new VRRP master tells the LAN that the virtual addresses moved to its (virtual) MAC:
//! switches relearn the port from the frame's source MAC, and hosts update their ARP / ND
//! caches from the sender hardware address (ARP) or the target link-layer option (NA).
//!
//! The frame builders are pure; [`Announcer`] sends them through one `AF_PACKET` socket per
//! burst, with `sendmmsg`: the first round at once, the later rounds paced.

use std::io::{self, IoSlice};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::ops::Range;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, sendmmsg, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use pnet_packet::ip::IpNextHeaderProtocols;

use super::socket::packet_sender;

pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

const ARP_HTYPE_ETHERNET: u16 = 1;
const ARP_PTYPE_IPV4: u16 = 0x0800;
const ARP_OP_REQUEST: u16 = 1;

pub(crate) const ICMPV6_NEIGHBOR_ADVERTISEMENT: u8 = 136;
/// Neighbour advertisement flags word: Router (bit 31), Solicited (30), Override (29).
pub(crate) const NA_FLAG_OVERRIDE: u32 = 1 << 29;
pub(crate) const ND_OPT_TARGET_LINK_LAYER_ADDRESS: u8 = 2;
/// ICMPv6 header (4) + flags/reserved (4) + target (16) + link-layer option (8).
pub(crate) const NA_ICMPV6_LEN: usize = 32;

/// All-nodes multicast, and its Ethernet mapping (RFC 2464: 33:33 + low 32 bits).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub(crate) const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0x00, 0x00, 0x00, 0x01];

/// Gratuitous ARP as keepalived sends it: a broadcast ARP request whose sender and target
/// protocol addresses are both the VIP, and whose sender and target hardware addresses are
/// both `src_mac`.
///
/// ```text
/// Ethernet: ff:ff:ff:ff:ff:ff | src_mac | 0x0806
/// ARP:      htype 1 | ptype 0x0800 | hlen 6 | plen 4 | op 1 (request)
///           sha = src_mac | spa = ip | tha = src_mac | tpa = ip
/// ```
///
/// A request rather than a reply because some hosts only update existing cache entries
/// from requests; no padding to 60 bytes, the NIC pads short frames.
pub fn garp_frame(src_mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut frame = Vec::with_capacity(42);
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    frame.extend_from_slice(&ARP_HTYPE_ETHERNET.to_be_bytes());
    frame.extend_from_slice(&ARP_PTYPE_IPV4.to_be_bytes());
    frame.push(6);
    frame.push(4);
    frame.extend_from_slice(&ARP_OP_REQUEST.to_be_bytes());
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ip.octets());
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ip.octets());
    frame
}

/// Unsolicited neighbour advertisement (RFC 4861 §7.2.6) for `target`, sent from `source`
/// to all nodes.
///
/// ```text
/// Ethernet: 33:33:00:00:00:01 | src_mac | 0x86dd
/// IPv6:     version 6 | payload 32 | next header 58 | hop limit 255 | source | ff02::1
/// ICMPv6:   type 136 | code 0 | checksum | R=0 S=0 O=1 | target
///           option type 2 (target link-layer address) | length 1 (8 bytes) | src_mac
/// ```
///
/// R=0: a VIP is a host address, so the master must not claim to be a router for it.
/// S=0: nobody solicited it. O=1: replace whatever MAC the neighbours cached.
pub fn unsolicited_na_frame(src_mac: [u8; 6], target: Ipv6Addr, source: Ipv6Addr) -> Vec<u8> {
    let mut icmp = Vec::with_capacity(NA_ICMPV6_LEN);
    icmp.push(ICMPV6_NEIGHBOR_ADVERTISEMENT);
    icmp.push(0);
    icmp.extend_from_slice(&[0, 0]);
    icmp.extend_from_slice(&NA_FLAG_OVERRIDE.to_be_bytes());
    icmp.extend_from_slice(&target.octets());
    icmp.push(ND_OPT_TARGET_LINK_LAYER_ADDRESS);
    icmp.push(1);
    icmp.extend_from_slice(&src_mac);
    // Word 1 is the checksum field itself, which the sum must skip.
    let checksum = pnet_packet::util::ipv6_checksum(
        &icmp,
        1,
        &[],
        &source,
        &ALL_NODES,
        IpNextHeaderProtocols::Icmpv6,
    );
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = Vec::with_capacity(14 + 40 + NA_ICMPV6_LEN);
    frame.extend_from_slice(&ALL_NODES_MAC);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(NA_ICMPV6_LEN as u16).to_be_bytes());
    frame.push(IpNextHeaderProtocols::Icmpv6.0);
    // Receivers drop ND messages with any other hop limit (RFC 4861 §7.1.2).
    frame.push(255);
    frame.extend_from_slice(&source.octets());
    frame.extend_from_slice(&ALL_NODES.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// The frames announcing `addrs`: one GARP per IPv4 address, one NA per IPv6 address.
///
/// An NA must come from an address of the interface; without `source_v6` (normally the
/// interface's link-local address) the target itself is used, which the master holds by
/// the time it announces.
pub fn announcement_frames(
    src_mac: [u8; 6],
    addrs: &[IpAddr],
    source_v6: Option<Ipv6Addr>,
) -> Vec<Vec<u8>> {
    addrs
        .iter()
        .map(|addr| match *addr {
            IpAddr::V4(v4) => garp_frame(src_mac, v4),
            IpAddr::V6(v6) => unsolicited_na_frame(src_mac, v6, source_v6.unwrap_or(v6)),
        })
        .collect()
}

#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    #[error("interface {name} not found")]
    InterfaceNotFound {
        name: String,
        #[source]
        source: nix::Error,
    },
    #[error("cannot open an AF_PACKET socket on {name}")]
    Socket {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("sending an announcement on {name} failed after {sent} frames")]
    Send {
        name: String,
        sent: usize,
        #[source]
        source: io::Error,
    },
}

impl AnnounceError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InterfaceNotFound { .. } => "interface_not_found",
            Self::Socket { .. } => "socket",
            Self::Send { .. } => "send",
        }
    }
}

/// keepalived's `garp_master_repeat`: rounds per burst.
pub const DEFAULT_REPEAT: u32 = 5;
/// Pause between rounds.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(10);
/// Frames per second in the rounds after the first: 10,000 addresses take 1 s per round,
/// so a default burst for them ends about 4 s after its first round.
pub const DEFAULT_RATE: u32 = 10_000;
/// Most frames per `sendmmsg` call (the kernel's UIO_MAXIOV).
pub const BATCH: usize = 1024;
/// A paced round sends a batch about this often (fewer, larger batches at high rates).
const PACING_TICK: Duration = Duration::from_millis(1);
/// How long a send may make no progress (the device queue full) before the burst fails.
const STALL_LIMIT: Duration = Duration::from_secs(1);
const STALL_PAUSE: Duration = Duration::from_micros(200);

/// How a burst is sent: `repeat` rounds of one frame per address. The first round goes out
/// at once (in `sendmmsg` batches of [`BATCH`]), since the addresses are unreachable until
/// the neighbours learn where they moved; the later rounds are repetitions for frames a
/// switch or host missed, `interval` apart and paced to at most `rate` frames per second,
/// so that a group of thousands does not flood the segment with broadcasts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Announcer {
    /// Rounds per burst; each round sends every frame once (keepalived `garp_master_repeat`).
    pub repeat: u32,
    /// Pause between the end of one round and the start of the next (keepalived
    /// `garp_interval`).
    pub interval: Duration,
    /// Frames per second in the rounds after the first; 0: no cap.
    pub rate: u32,
}

impl Default for Announcer {
    fn default() -> Self {
        Self {
            repeat: DEFAULT_REPEAT,
            interval: DEFAULT_INTERVAL,
            rate: DEFAULT_RATE,
        }
    }
}

/// One `sendmmsg` batch of the rounds after the first: frames `frames` of round `round`,
/// `at` after the first round ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub round: u32,
    pub at: Duration,
    pub frames: Range<usize>,
}

impl Announcer {
    /// Frames per batch in a paced round: about one batch per millisecond.
    pub fn paced_batch(&self) -> usize {
        if self.rate == 0 {
            return BATCH;
        }
        let per_tick = u128::from(self.rate) * PACING_TICK.as_nanos() / 1_000_000_000;
        (per_tick as usize).clamp(1, BATCH)
    }

    /// How long one paced round of `frames` frames takes.
    pub fn round_time(&self, frames: usize) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        nanos(frames as u128 * 1_000_000_000 / u128::from(self.rate))
    }

    /// When the batches of the rounds after the first are due, relative to the end of the
    /// first round: round k (1-based after the first) starts k × interval + (k − 1) × the
    /// round time, and its batches follow each other at the rate.
    pub fn schedule(&self, frames: usize) -> Vec<Step> {
        let mut steps = Vec::new();
        if frames == 0 {
            return steps;
        }
        let batch = self.paced_batch();
        let round_time = self.round_time(frames);
        for round in 1..self.repeat {
            let start = self.interval * round + round_time * (round - 1);
            for first in (0..frames).step_by(batch) {
                let at = if self.rate == 0 {
                    start
                } else {
                    start + nanos(first as u128 * 1_000_000_000 / u128::from(self.rate))
                };
                steps.push(Step {
                    round,
                    at,
                    frames: first..(first + batch).min(frames),
                });
            }
        }
        steps
    }

    /// The time a whole burst of `frames` frames takes after its first round.
    pub fn later_rounds_take(&self, frames: usize) -> Duration {
        let rounds = self.repeat.saturating_sub(1);
        (self.interval + self.round_time(frames)) * rounds
    }

    /// Announces `addrs` on `ifname` from `src_mac`, every round, blocking until the last
    /// one; returns the number of frames sent.
    pub fn announce(
        &self,
        ifname: &str,
        src_mac: [u8; 6],
        addrs: &[IpAddr],
        source_v6: Option<Ipv6Addr>,
    ) -> Result<usize, AnnounceError> {
        match self.start(ifname, src_mac, addrs, source_v6)? {
            Some(burst) => burst.finish(&AtomicBool::new(false)),
            None => Ok(0),
        }
    }

    /// Opens the burst's socket and sends the first round; the rest is [`Burst::finish`]'s.
    /// `None` when there is nothing to send.
    pub fn start(
        &self,
        ifname: &str,
        src_mac: [u8; 6],
        addrs: &[IpAddr],
        source_v6: Option<Ipv6Addr>,
    ) -> Result<Option<Burst>, AnnounceError> {
        if addrs.is_empty() || self.repeat == 0 {
            return Ok(None);
        }
        let index = nix::net::if_::if_nametoindex(ifname).map_err(|source| {
            AnnounceError::InterfaceNotFound {
                name: ifname.to_owned(),
                source,
            }
        })?;
        let socket = burst_socket(index).map_err(|source| AnnounceError::Socket {
            name: ifname.to_owned(),
            source,
        })?;
        let mut burst = Burst {
            name: ifname.to_owned(),
            socket,
            frames: announcement_frames(src_mac, addrs, source_v6),
            announcer: *self,
            sent: 0,
        };
        burst.first_round(index)?;
        Ok(Some(burst))
    }
}

const SEND_BUFFER: usize = 4 << 20;

/// A burst's socket on interface `index`: [`packet_sender`] with a large send buffer (best
/// effort: a whole batch then queues without blocking) and a send timeout.
fn burst_socket(index: u32) -> io::Result<OwnedFd> {
    let socket = packet_sender(index)?;
    let _ = setsockopt(&socket, sockopt::SndBufForce, &SEND_BUFFER);
    let _ = setsockopt(
        &socket,
        sockopt::SendTimeout,
        &TimeVal::new(STALL_LIMIT.as_secs() as _, 0),
    );
    Ok(socket)
}

fn nanos(n: u128) -> Duration {
    Duration::from_nanos(u64::try_from(n).unwrap_or(u64::MAX))
}

/// A burst whose first round went out: its socket and frames, for the later rounds.
pub struct Burst {
    name: String,
    socket: OwnedFd,
    frames: Vec<Vec<u8>>,
    announcer: Announcer,
    sent: usize,
}

impl std::fmt::Debug for Burst {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Burst")
            .field("name", &self.name)
            .field("frames", &self.frames.len())
            .field("sent", &self.sent)
            .finish()
    }
}

impl Burst {
    /// Frames sent so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// Sends the rounds after the first as [`Announcer::schedule`] says, sleeping in
    /// between; stops early (without error) once `cancel` is set, e.g. because the
    /// addresses were removed. Returns the number of frames sent by the whole burst.
    pub fn finish(mut self, cancel: &AtomicBool) -> Result<usize, AnnounceError> {
        let origin = Instant::now();
        for step in self.announcer.schedule(self.frames.len()) {
            let due = origin + step.at;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if cancel.load(Ordering::Relaxed) {
                break;
            }
            self.send(step.frames)?;
        }
        Ok(self.sent)
    }

    /// The first round, at once. A large one is split between this thread and a second one
    /// with its own socket: on a veth or bridge the receivers' handling of each frame runs in
    /// the sender's softirq, on the sender's CPU, so two senders use two CPUs (a NIC with
    /// several transmit queues likewise).
    fn first_round(&mut self, index: u32) -> Result<(), AnnounceError> {
        let total = self.frames.len();
        if total < PARALLEL_FIRST_ROUND || !several_cpus() {
            return self.send(0..total);
        }
        let half = total / 2;
        let Ok(helper) = burst_socket(index) else {
            return self.send(0..total);
        };
        let (frames, rest) = self.frames.split_at(half);
        let (own, other) = std::thread::scope(|scope| {
            let other = std::thread::Builder::new()
                .name("ferrovip-announce".into())
                .spawn_scoped(scope, || send_frames(&helper, rest));
            let own = send_frames(&self.socket, frames);
            let other = match other {
                Ok(thread) => thread
                    .join()
                    .unwrap_or(Err((0, io::Error::other("panicked")))),
                Err(e) => Err((0, e)),
            };
            (own, other)
        });
        let (own_sent, own_error) = match own {
            Ok(n) => (n, None),
            Err((n, e)) => (n, Some(e)),
        };
        self.sent += own_sent;
        let other_error = match other {
            Ok(n) => {
                self.sent += n;
                None
            }
            Err((n, e)) if n == 0 && own_error.is_none() => {
                // The second sender did nothing (it could not start): this thread sends
                // its half.
                tracing::debug!(error = %e, "second announcement sender failed; sending its half here");
                return self.send(half..total);
            }
            Err((n, e)) => {
                self.sent += n;
                Some(e)
            }
        };
        match own_error.or(other_error) {
            None => Ok(()),
            Some(source) => Err(AnnounceError::Send {
                name: self.name.clone(),
                sent: self.sent,
                source,
            }),
        }
    }

    /// Sends `frames` with `sendmmsg`, [`BATCH`] per call; waits out a full device queue
    /// (ENOBUFS) for up to [`STALL_LIMIT`] without progress.
    fn send(&mut self, frames: Range<usize>) -> Result<(), AnnounceError> {
        match send_frames(&self.socket, &self.frames[frames]) {
            Ok(n) => {
                self.sent += n;
                Ok(())
            }
            Err((n, source)) => {
                self.sent += n;
                Err(AnnounceError::Send {
                    name: self.name.clone(),
                    sent: self.sent,
                    source,
                })
            }
        }
    }
}

/// A first round of at least this many frames is sent by two threads.
const PARALLEL_FIRST_ROUND: usize = 512;

/// Whether this process may run on more than one CPU (asked once: it reads cgroup files).
fn several_cpus() -> bool {
    static SEVERAL: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SEVERAL.get_or_init(|| std::thread::available_parallelism().map_or(1, usize::from) > 1)
}

/// Sends `frames` on `socket` with `sendmmsg`, [`BATCH`] per call; waits out a full device
/// queue (ENOBUFS) for up to [`STALL_LIMIT`] without progress. Returns the frames sent, or
/// those sent before the error and the error.
fn send_frames(socket: &OwnedFd, frames: &[Vec<u8>]) -> Result<usize, (usize, io::Error)> {
    let mut next = 0;
    let mut sent = 0;
    let mut stalled: Option<Instant> = None;
    let no_address: [Option<()>; BATCH] = [None; BATCH];
    let mut headers = MultiHeaders::preallocate(BATCH.min(frames.len().max(1)), None);
    while next < frames.len() {
        let end = frames.len().min(next + BATCH);
        let iovs: Vec<[IoSlice<'_>; 1]> = frames[next..end]
            .iter()
            .map(|frame| [IoSlice::new(frame)])
            .collect();
        let result = sendmmsg(
            socket.as_raw_fd(),
            &mut headers,
            &iovs,
            &no_address[..end - next],
            [],
            MsgFlags::empty(),
        )
        .map(Iterator::count);
        match result {
            Ok(count) if count > 0 => {
                next += count;
                sent += count;
                stalled = None;
            }
            Ok(_) | Err(Errno::ENOBUFS | Errno::EAGAIN | Errno::EINTR) => {
                let since = *stalled.get_or_insert_with(Instant::now);
                if since.elapsed() > STALL_LIMIT {
                    return Err((sent, io::Error::from(Errno::ENOBUFS)));
                }
                std::thread::sleep(STALL_PAUSE);
            }
            Err(e) => return Err((sent, e.into())),
        }
    }
    Ok(sent)
}

/// [`Announcer::announce`] with the default burst.
pub fn announce(
    ifname: &str,
    src_mac: [u8; 6],
    addrs: &[IpAddr],
    source_v6: Option<Ipv6Addr>,
) -> Result<usize, AnnounceError> {
    Announcer::default().announce(ifname, src_mac, addrs, source_v6)
}

/// RFC 1071 one's-complement sum, written independently of pnet's (the frame tests here and
/// in `super::ndp`).
#[cfg(test)]
pub(crate) fn ones_complement_sum(chunks: &[&[u8]]) -> u16 {
    let bytes: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(w[0]) << 8 | u32::from(*w.get(1).unwrap_or(&0)))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    const VMAC_51: [u8; 6] = [0x00, 0x00, 0x5e, 0x00, 0x01, 0x33];

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn garp_matches_golden_vector_e() {
        let expected = hex(
            "ffffffffffff00005e0001330806000108000604000100005e000133c0a80164\
             00005e000133c0a80164",
        );
        assert_eq!(
            garp_frame(VMAC_51, Ipv4Addr::new(192, 168, 1, 100)),
            expected
        );
    }

    #[test]
    fn unsolicited_na_matches_hand_built_vector() {
        let source: Ipv6Addr = "fe80::a".parse().unwrap();
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frame = unsolicited_na_frame(VMAC_51, target, source);
        let expected = hex("333300000001 00005e000133 86dd \
             60000000 0020 3a ff \
             fe80000000000000000000000000000a \
             ff020000000000000000000000000001 \
             88 00 0000 20000000 \
             20010db8000000000000000000000100 \
             02 01 00005e000133");
        assert_eq!(frame.len(), expected.len());
        // Everything but the checksum (bytes 56..58, zero above) is as written by hand.
        assert_eq!(frame[..56], expected[..56]);
        assert_eq!(frame[58..], expected[58..]);

        // A correct checksum makes the sum over pseudo-header and message all ones.
        let icmp = &frame[54..];
        let pseudo_len = (icmp.len() as u32).to_be_bytes();
        let sum = ones_complement_sum(&[
            &source.octets(),
            &ALL_NODES.octets(),
            &pseudo_len,
            &[0, 0, 0, 58],
            icmp,
        ]);
        assert_eq!(sum, 0xffff);
        // The same value as a one-off Python computation of RFC 1071 over these bytes.
        assert_eq!(&frame[56..58], &[0xca, 0x28]);
    }

    #[test]
    fn na_checksum_depends_on_source_address() {
        let target: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let a = unsolicited_na_frame(VMAC_51, target, "fe80::a".parse().unwrap());
        let b = unsolicited_na_frame(VMAC_51, target, "fe80::b".parse().unwrap());
        assert_ne!(a[56..58], b[56..58]);
    }

    #[test]
    fn announcement_frames_pick_builder_per_family_and_default_na_source() {
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 168, 1, 100));
        let v6: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let frames = announcement_frames(VMAC_51, &[v4, IpAddr::V6(v6)], None);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            frames[0],
            garp_frame(VMAC_51, Ipv4Addr::new(192, 168, 1, 100))
        );
        assert_eq!(frames[1], unsolicited_na_frame(VMAC_51, v6, v6));
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let frames = announcement_frames(VMAC_51, &[IpAddr::V6(v6)], Some(ll));
        assert_eq!(frames[0], unsolicited_na_frame(VMAC_51, v6, ll));
    }

    fn paced(repeat: u32, interval_ms: u64, rate: u32) -> Announcer {
        Announcer {
            repeat,
            interval: Duration::from_millis(interval_ms),
            rate,
        }
    }

    #[test]
    fn paced_rounds_follow_the_interval_and_never_exceed_the_rate() {
        // 3 rounds of 10,000 frames at 10,000 frames/s, 50 ms apart: rounds 2 and 3 start
        // 50 ms and 1.1 s after the first ended, each lasting 1 s in batches of 10 per ms.
        let a = paced(3, 50, 10_000);
        assert_eq!(a.paced_batch(), 10);
        assert_eq!(a.round_time(10_000), Duration::from_secs(1));
        let steps = a.schedule(10_000);
        assert_eq!(steps.len(), 2 * 1000);
        assert_eq!(steps[0].round, 1);
        assert_eq!(steps[0].at, Duration::from_millis(50));
        assert_eq!(steps[0].frames, 0..10);
        assert_eq!(steps[999].at, Duration::from_millis(50 + 999));
        assert_eq!(steps[999].frames, 9990..10_000);
        assert_eq!(steps[1000].round, 2);
        assert_eq!(steps[1000].at, Duration::from_millis(1100));
        // Every round covers every frame once, in order.
        for round in 1..3 {
            let covered: Vec<usize> = steps
                .iter()
                .filter(|s| s.round == round)
                .flat_map(|s| s.frames.clone())
                .collect();
            assert_eq!(covered, (0..10_000).collect::<Vec<_>>());
        }
        // Over any window, no more frames than the rate allows (plus one batch).
        for (i, step) in steps.iter().enumerate() {
            let window = Duration::from_millis(100);
            let frames: usize = steps[i..]
                .iter()
                .take_while(|s| s.at < step.at + window)
                .map(|s| s.frames.len())
                .sum();
            assert!(
                frames <= 1000 + a.paced_batch(),
                "{frames} frames in 100 ms"
            );
        }
        assert_eq!(a.later_rounds_take(10_000), Duration::from_millis(2100));
    }

    #[test]
    fn default_burst_costs_four_seconds_for_ten_thousand_addresses() {
        let a = Announcer::default();
        assert_eq!((a.repeat, a.rate), (5, 10_000));
        assert_eq!(a.later_rounds_take(10_000), Duration::from_millis(4040));
        // A small group is repeated as quickly as the interval allows.
        assert_eq!(a.later_rounds_take(1), Duration::from_micros(40_400));
    }

    #[test]
    fn uncapped_rounds_go_out_whole_in_batches_and_tiny_rates_one_frame_at_a_time() {
        let a = paced(2, 0, 0);
        assert_eq!(a.round_time(5000), Duration::ZERO);
        let steps = a.schedule(2500);
        assert_eq!(
            steps.iter().map(|s| s.frames.clone()).collect::<Vec<_>>(),
            vec![0..1024, 1024..2048, 2048..2500]
        );
        assert!(steps.iter().all(|s| s.at.is_zero() && s.round == 1));
        let slow = paced(2, 0, 10);
        assert_eq!(slow.paced_batch(), 1);
        let steps = slow.schedule(3);
        assert_eq!(
            steps.iter().map(|s| s.at).collect::<Vec<_>>(),
            vec![
                Duration::ZERO,
                Duration::from_millis(100),
                Duration::from_millis(200)
            ]
        );
        // Huge rates are capped at one sendmmsg batch per step.
        assert_eq!(paced(2, 0, u32::MAX).paced_batch(), BATCH);
    }

    #[test]
    fn one_round_or_nothing_to_send_schedules_nothing() {
        assert!(paced(1, 10, 100).schedule(10_000).is_empty());
        assert!(paced(0, 10, 100).schedule(10_000).is_empty());
        assert!(Announcer::default().schedule(0).is_empty());
        assert_eq!(paced(1, 10, 100).later_rounds_take(10_000), Duration::ZERO);
    }

    #[test]
    fn nothing_to_announce_sends_nothing_and_needs_no_interface() {
        let sent = Announcer::default()
            .announce("no-such-if0", VMAC_51, &[], None)
            .unwrap();
        assert_eq!(sent, 0);
    }

    #[test]
    fn unknown_interface_is_a_typed_error() {
        let err = announce(
            "no-such-if0",
            VMAC_51,
            &[IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))],
            None,
        )
        .unwrap_err();
        assert_eq!(err.metric_label(), "interface_not_found");
    }
}
