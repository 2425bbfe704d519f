//! A user-space IPv6 Neighbour Discovery responder for addresses held by `local` routes.
//!
//! Thousands of IPv6 VIPs are made local with `local` routes (AnyIP) rather than interface
//! addresses. The kernel accepts traffic for them but answers Neighbour Solicitations only
//! for its interface addresses (and proxy entries), so nobody on the link could resolve a
//! route-held VIP. [`NdpResponder`] does: one `AF_PACKET` socket on every interface of the
//! namespace, filtered in the kernel to ICMPv6 Neighbour Solicitations, read by one thread
//! that answers, with a solicited Neighbour Advertisement, each valid solicitation whose
//! target the address manager's [`Lookup`] says is held on the receiving interface.
//!
//! Parsing ([`parse_solicitation`]) and the answer ([`solicited_na_frame`]) are pure; the
//! `unsafe` socket set-up is [`super::socket`]'s.
//!
//! A solicitation for an address goes to its solicited-node multicast group. The kernel joins
//! that group for each interface address, and so reports it (MLD) to switches that forward
//! multicast only to ports that asked for it (MLD snooping); for route-held addresses nobody
//! would. The responder therefore also joins the groups of the addresses it answers for
//! ([`NdpResponder::memberships`]): a second thread ("ferrovip-mld")
//! applies those changes with `IPV6_ADD_MEMBERSHIP` on plain UDP sockets, off the failover
//! path, and the kernel sends the reports and answers the queries. Closing the sockets (the
//! responder dropped, the process gone) leaves every group.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::io;
use std::net::Ipv6Addr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{LinkAddr, MsgFlags, recvfrom, sendto};
use pnet_packet::ip::IpNextHeaderProtocols;
use socket2::{Domain, Socket, Type};

use super::announce::{
    ALL_NODES, ALL_NODES_MAC, ETHERTYPE_IPV6, ICMPV6_NEIGHBOR_ADVERTISEMENT, NA_FLAG_OVERRIDE,
    NA_ICMPV6_LEN, ND_OPT_TARGET_LINK_LAYER_ADDRESS,
};
use super::socket::{NDP_RECEIVE_TIMEOUT, link_address, ndp_listener, packet_allmulti};

/// Answers for one target: the MAC to advertise, if `target` is held on interface `ifindex` now.
pub type Lookup = Arc<dyn Fn(u32, Ipv6Addr) -> Option<[u8; 6]> + Send + Sync>;

/// Solicitations answered by every responder of the process (exported as
/// `ferrovip_ndp_answers_total`).
static ANSWERED_TOTAL: AtomicU64 = AtomicU64::new(0);

/// Neighbour solicitations answered by this process's responders so far.
pub fn answers_total() -> u64 {
    ANSWERED_TOTAL.load(Ordering::Relaxed)
}

/// Solicited-node groups (per interface) the responders of this process are members of now
/// (exported as `ferrovip_ndp_groups`).
static GROUPS_JOINED: AtomicU64 = AtomicU64::new(0);

/// Solicited-node groups this process's responders have joined, summed over interfaces.
pub fn groups_joined() -> u64 {
    GROUPS_JOINED.load(Ordering::Relaxed)
}

/// Memberships per socket. Each takes socket option memory (about 64 bytes), bounded per
/// socket by `net.core.optmem_max`: 20 KiB on kernels before 6.9, so at most ~300 there.
/// Another socket is opened for more, and on `ENOBUFS` before this many.
const GROUPS_PER_SOCKET: usize = 256;

const ICMPV6_NEIGHBOR_SOLICITATION: u8 = 135;
const ND_OPT_SOURCE_LINK_LAYER_ADDRESS: u8 = 1;
/// NA flags word: Solicited (bit 30).
const NA_FLAG_SOLICITED: u32 = 1 << 30;
const ETHERNET_HEADER: usize = 14;
const IPV6_HEADER: usize = 40;
/// ICMPv6 header (4) + reserved (4) + target (16): the smallest valid solicitation.
const NS_MIN_LEN: usize = 24;
/// The largest frame read; a longer one is truncated, and then rejected as short.
const RECEIVE_BUFFER: usize = 1500;
/// The sll_pkttype of frames this host sent, and of unicast frames for another host's MAC
/// (seen in promiscuous mode only; the kernel ignores those too).
const PACKET_OUTGOING: u8 = libc::PACKET_OUTGOING;
const PACKET_OTHERHOST: u8 = libc::PACKET_OTHERHOST;
/// At most one warning per this long about failing receives or sends.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A Neighbour Solicitation that passed the checks of RFC 4861 §7.1.1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Solicitation {
    /// The frame's Ethernet source.
    pub ethernet_source: [u8; 6],
    /// The IPv6 source; unspecified (::) for duplicate address detection.
    pub source: Ipv6Addr,
    pub destination: Ipv6Addr,
    /// The address whose link-layer address is asked for.
    pub target: Ipv6Addr,
    /// The source link-layer address option, if present.
    pub source_link_layer: Option<[u8; 6]>,
}

impl Solicitation {
    /// Duplicate address detection: a node probing whether `target` is free.
    pub fn is_dad(&self) -> bool {
        self.source.is_unspecified()
    }

    /// Where a unicast answer goes: the source link-layer address option, else the
    /// frame's Ethernet source.
    pub fn reply_mac(&self) -> [u8; 6] {
        self.source_link_layer.unwrap_or(self.ethernet_source)
    }
}

/// Why a frame is not a valid Neighbour Solicitation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    #[error("frame too short")]
    Short,
    #[error("not an ICMPv6 Neighbour Solicitation")]
    NotSolicitation,
    #[error("hop limit {0}, not 255")]
    HopLimit(u8),
    #[error("ICMPv6 code {0}, not 0")]
    Code(u8),
    #[error("bad ICMPv6 checksum")]
    Checksum,
    #[error("multicast target")]
    MulticastTarget,
    #[error("option of length 0 or past the end")]
    BadOption,
    #[error("duplicate address detection not sent to a solicited-node group")]
    DadDestination,
    #[error("duplicate address detection with a source link-layer address option")]
    DadWithLinkLayer,
}

/// Checks an Ethernet frame as a Neighbour Solicitation (RFC 4861 §7.1.1): IPv6 with ICMPv6
/// directly after the header, hop limit 255, type 135 code 0, at least 24 bytes, a correct
/// checksum, a target that is not multicast, options of nonzero length inside the message;
/// from the unspecified address only to a solicited-node group and without a source
/// link-layer address option. Bytes past the IPv6 payload length (Ethernet padding) are
/// ignored.
pub fn parse_solicitation(frame: &[u8]) -> Result<Solicitation, Rejected> {
    let ip_start = ETHERNET_HEADER;
    let icmp_start = ip_start + IPV6_HEADER;
    if frame.len() < icmp_start + NS_MIN_LEN {
        return Err(Rejected::Short);
    }
    if frame[12..14] != ETHERTYPE_IPV6.to_be_bytes()
        || frame[ip_start] >> 4 != 6
        || frame[ip_start + 6] != IpNextHeaderProtocols::Icmpv6.0
        || frame[icmp_start] != ICMPV6_NEIGHBOR_SOLICITATION
    {
        return Err(Rejected::NotSolicitation);
    }
    let payload = usize::from(u16::from_be_bytes([
        frame[ip_start + 4],
        frame[ip_start + 5],
    ]));
    if payload < NS_MIN_LEN || frame.len() < icmp_start + payload {
        return Err(Rejected::Short);
    }
    let hop_limit = frame[ip_start + 7];
    if hop_limit != 255 {
        return Err(Rejected::HopLimit(hop_limit));
    }
    let icmp = &frame[icmp_start..icmp_start + payload];
    if icmp[1] != 0 {
        return Err(Rejected::Code(icmp[1]));
    }
    let source = ipv6_at(frame, ip_start + 8);
    let destination = ipv6_at(frame, ip_start + 24);
    // Summed with the checksum field included, a correct message complements to zero.
    let residue = pnet_packet::util::ipv6_checksum(
        icmp,
        usize::MAX,
        &[],
        &source,
        &destination,
        IpNextHeaderProtocols::Icmpv6,
    );
    if residue != 0 {
        return Err(Rejected::Checksum);
    }
    let target = ipv6_at(icmp, 8);
    if target.is_multicast() {
        return Err(Rejected::MulticastTarget);
    }
    let mut source_link_layer = None;
    let mut options = &icmp[NS_MIN_LEN..];
    while !options.is_empty() {
        let len = usize::from(*options.get(1).ok_or(Rejected::BadOption)?) * 8;
        if len == 0 || len > options.len() {
            return Err(Rejected::BadOption);
        }
        if options[0] == ND_OPT_SOURCE_LINK_LAYER_ADDRESS && source_link_layer.is_none() {
            let mut mac = [0; 6];
            mac.copy_from_slice(&options[2..8]);
            source_link_layer = Some(mac);
        }
        options = &options[len..];
    }
    if source.is_unspecified() {
        if !is_solicited_node(&destination) {
            return Err(Rejected::DadDestination);
        }
        if source_link_layer.is_some() {
            return Err(Rejected::DadWithLinkLayer);
        }
    }
    let mut ethernet_source = [0; 6];
    ethernet_source.copy_from_slice(&frame[6..12]);
    Ok(Solicitation {
        ethernet_source,
        source,
        destination,
        target,
        source_link_layer,
    })
}

fn ipv6_at(bytes: &[u8], at: usize) -> Ipv6Addr {
    let mut octets = [0; 16];
    octets.copy_from_slice(&bytes[at..at + 16]);
    Ipv6Addr::from(octets)
}

/// ff02::1:ffXX:XXXX (RFC 4291 §2.7.1).
fn is_solicited_node(addr: &Ipv6Addr) -> bool {
    addr.octets()[..13] == SOLICITED_NODE_PREFIX
}

const SOLICITED_NODE_PREFIX: [u8; 13] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff];

/// The solicited-node multicast group of `addr` (RFC 4291 §2.7.1): ff02::1:ff00:0/104 and
/// the address's low 24 bits. Solicitations for `addr` are sent there.
pub fn solicited_node_group(addr: Ipv6Addr) -> Ipv6Addr {
    let mut octets = [0u8; 16];
    octets[..13].copy_from_slice(&SOLICITED_NODE_PREFIX);
    octets[13..].copy_from_slice(&addr.octets()[13..]);
    Ipv6Addr::from(octets)
}

/// The solicited Neighbour Advertisement (RFC 4861 §7.2.4) answering `ns` for its target,
/// which is held at `mac`.
///
/// ```text
/// Ethernet: ns.reply_mac() (DAD: 33:33:00:00:00:01) | mac | 0x86dd
/// IPv6:     version 6 | payload 32 | next header 58 | hop limit 255
///           source = the target | destination = ns.source (DAD: ff02::1)
/// ICMPv6:   type 136 | code 0 | checksum | R=0 S=1 (DAD: 0) O=1 | target
///           option type 2 (target link-layer address) | length 1 (8 bytes) | mac
/// ```
///
/// The source is the target itself, as the kernel answers for its own addresses.
pub fn solicited_na_frame(mac: [u8; 6], ns: &Solicitation) -> Vec<u8> {
    let dad = ns.is_dad();
    let (destination, destination_mac) = if dad {
        (ALL_NODES, ALL_NODES_MAC)
    } else {
        (ns.source, ns.reply_mac())
    };
    let flags = if dad {
        NA_FLAG_OVERRIDE
    } else {
        NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE
    };
    let mut icmp = Vec::with_capacity(NA_ICMPV6_LEN);
    icmp.push(ICMPV6_NEIGHBOR_ADVERTISEMENT);
    icmp.push(0);
    icmp.extend_from_slice(&[0, 0]);
    icmp.extend_from_slice(&flags.to_be_bytes());
    icmp.extend_from_slice(&ns.target.octets());
    icmp.push(ND_OPT_TARGET_LINK_LAYER_ADDRESS);
    icmp.push(1);
    icmp.extend_from_slice(&mac);
    // Word 1 is the checksum field itself, which the sum must skip.
    let checksum = pnet_packet::util::ipv6_checksum(
        &icmp,
        1,
        &[],
        &ns.target,
        &destination,
        IpNextHeaderProtocols::Icmpv6,
    );
    icmp[2..4].copy_from_slice(&checksum.to_be_bytes());

    let mut frame = Vec::with_capacity(ETHERNET_HEADER + IPV6_HEADER + NA_ICMPV6_LEN);
    frame.extend_from_slice(&destination_mac);
    frame.extend_from_slice(&mac);
    frame.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&(NA_ICMPV6_LEN as u16).to_be_bytes());
    frame.push(IpNextHeaderProtocols::Icmpv6.0);
    frame.push(255);
    frame.extend_from_slice(&ns.target.octets());
    frame.extend_from_slice(&destination.octets());
    frame.extend_from_slice(&icmp);
    frame
}

/// The responder: a socket and the thread answering on it, stopped and joined on drop, and
/// the thread keeping the solicited-node group memberships.
pub struct NdpResponder {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    fd: Arc<OwnedFd>,
    answered: Arc<AtomicU64>,
    /// Interfaces whose all-multicast membership this socket holds.
    listening: Mutex<BTreeSet<u32>>,
    memberships: Memberships,
    memberships_thread: Option<JoinHandle<()>>,
}

/// Where the solicited-node groups of answered addresses are joined and left: a handle to
/// the responder's membership thread, to keep beside the addresses. Changes sent after the
/// responder stopped are dropped (its sockets are closed, every group left).
#[derive(Debug, Clone)]
pub struct Memberships {
    tx: mpsc::Sender<Membership>,
}

impl Memberships {
    /// Joins the solicited-node groups of `addresses` on interface `ifindex`, once each
    /// however many addresses (here or in other calls) share one, in the background.
    pub fn join(&self, ifindex: u32, addresses: Vec<Ipv6Addr>) {
        self.change(ifindex, addresses, Vec::new());
    }

    /// Undoes [`Memberships::join`] for `addresses`: a group is left when no address joined
    /// for it remains.
    pub fn leave(&self, ifindex: u32, addresses: Vec<Ipv6Addr>) {
        self.change(ifindex, Vec::new(), addresses);
    }

    /// Both at once: the groups of `join` first, so that an address in both keeps its group
    /// without a leave and a join on the wire.
    pub fn change(&self, ifindex: u32, join: Vec<Ipv6Addr>, leave: Vec<Ipv6Addr>) {
        if join.is_empty() && leave.is_empty() {
            return;
        }
        // Fails only once the thread is gone: nothing is joined then.
        let _ = self.tx.send(Membership {
            ifindex,
            join,
            leave,
        });
    }
}

#[cfg(test)]
impl Memberships {
    /// A handle whose changes arrive at the returned receiver, for tests.
    pub(crate) fn for_test() -> (Memberships, mpsc::Receiver<Membership>) {
        let (tx, rx) = mpsc::channel();
        (Memberships { tx }, rx)
    }
}

/// A change of the addresses answered for on one interface: their solicited-node groups are
/// joined for `join`, then left for `leave` (so that an address in both keeps its group).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Membership {
    pub(crate) ifindex: u32,
    pub(crate) join: Vec<Ipv6Addr>,
    pub(crate) leave: Vec<Ipv6Addr>,
}

impl fmt::Debug for NdpResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NdpResponder")
            .field("fd", &self.fd.as_raw_fd())
            .field("answered", &self.answered())
            .finish()
    }
}

impl NdpResponder {
    /// Opens the socket in the calling thread's network namespace and starts a thread
    /// (named "ferrovip-ndp") that answers solicitations while the responder lives, and one
    /// ("ferrovip-mld") that keeps the group memberships of [`NdpResponder::memberships`].
    pub fn start(lookup: Lookup) -> io::Result<NdpResponder> {
        let fd = Arc::new(ndp_listener()?);
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let thread = {
            let (fd, stop, answered) = (fd.clone(), stop.clone(), answered.clone());
            std::thread::Builder::new()
                .name("ferrovip-ndp".into())
                .spawn(move || serve(&fd, &*lookup, &stop, &answered))?
        };
        // Threads start in the spawning thread's network namespace: the membership sockets
        // are opened there, as the listener was.
        let (tx, changes) = mpsc::channel();
        let memberships_thread = {
            let stop = stop.clone();
            std::thread::Builder::new()
                .name("ferrovip-mld".into())
                .spawn(move || keep_memberships(&changes, &stop))
        };
        let mut responder = NdpResponder {
            stop,
            thread: Some(thread),
            fd,
            answered,
            listening: Mutex::new(BTreeSet::new()),
            memberships: Memberships { tx },
            memberships_thread: None,
        };
        // On failure, dropping the responder stops its first thread.
        responder.memberships_thread = Some(memberships_thread?);
        Ok(responder)
    }

    /// The handle through which the groups of the addresses answered for are joined.
    pub fn memberships(&self) -> Memberships {
        self.memberships.clone()
    }

    /// Makes interface `ifindex` pass every multicast frame to the socket (PACKET_MR_ALLMULTI
    /// membership, released by the kernel when the socket closes). Idempotent per ifindex.
    pub fn listen_on(&self, ifindex: u32) -> io::Result<()> {
        let mut listening = self.listening.lock().unwrap_or_else(|e| e.into_inner());
        if listening.contains(&ifindex) {
            return Ok(());
        }
        packet_allmulti(self.fd.as_fd(), ifindex)?;
        listening.insert(ifindex);
        Ok(())
    }

    /// Solicitations answered so far (for metrics/tests).
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for NdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Its sockets close with it, leaving every group.
        if let Some(thread) = self.memberships_thread.take() {
            let _ = thread.join();
        }
        if let Some(thread) = self.thread.take() {
            // The receive times out within NDP_RECEIVE_TIMEOUT; a panicking lookup has
            // already ended the thread, and there is nothing left to do about it.
            let _ = thread.join();
        }
    }
}

/// At most one warning per [`WARN_EVERY`], with the number of failures in between.
struct Warner {
    last: Option<Instant>,
    suppressed: u64,
}

impl Warner {
    fn warn(&mut self, what: &str, error: &dyn fmt::Display) {
        let now = Instant::now();
        if self.last.is_some_and(|last| now - last < WARN_EVERY) {
            self.suppressed += 1;
            tracing::debug!(%error, "NDP responder: {what}");
            return;
        }
        tracing::warn!(%error, suppressed = self.suppressed, "NDP responder: {what}");
        self.last = Some(now);
        self.suppressed = 0;
    }
}

/// Solicited-node group memberships, counted per (interface, group) over the addresses that
/// need them, on as many sockets as the kernel's per-socket option memory needs.
#[derive(Default)]
struct Groups {
    sockets: Vec<(Socket, usize)>,
    /// (interface, group) → (addresses needing it, the socket holding it: `None` when the
    /// join failed).
    joined: HashMap<(u32, Ipv6Addr), (usize, Option<usize>)>,
}

impl Groups {
    fn join(&mut self, ifindex: u32, group: Ipv6Addr, warner: &mut Warner) {
        let entry = self.joined.entry((ifindex, group)).or_insert((0, None));
        entry.0 += 1;
        if entry.0 > 1 {
            return;
        }
        match join_on(&mut self.sockets, ifindex, group) {
            Ok(socket) => {
                entry.1 = Some(socket);
                GROUPS_JOINED.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => warner.warn(
                &format!("cannot join the solicited-node group {group} on interface {ifindex}"),
                &e,
            ),
        }
    }

    fn leave(&mut self, ifindex: u32, group: Ipv6Addr, warner: &mut Warner) {
        let Some(entry) = self.joined.get_mut(&(ifindex, group)) else {
            return;
        };
        entry.0 -= 1;
        if entry.0 > 0 {
            return;
        }
        let socket = entry.1;
        self.joined.remove(&(ifindex, group));
        let Some(i) = socket else { return };
        GROUPS_JOINED.fetch_sub(1, Ordering::Relaxed);
        let (socket, count) = &mut self.sockets[i];
        *count -= 1;
        match socket.leave_multicast_v6(&group, ifindex) {
            Ok(()) => {}
            // The interface went away, and its memberships with it.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {}
            Err(e) => warner.warn(
                &format!("cannot leave the solicited-node group {group} on interface {ifindex}"),
                &e,
            ),
        }
    }
}

impl Drop for Groups {
    fn drop(&mut self) {
        let held = self.joined.values().filter(|(_, s)| s.is_some()).count();
        GROUPS_JOINED.fetch_sub(held as u64, Ordering::Relaxed);
    }
}

/// Joins `group` on a socket with room, opening one when none has (or the kernel says the
/// one tried is full); returns the socket's index.
fn join_on(sockets: &mut Vec<(Socket, usize)>, ifindex: u32, group: Ipv6Addr) -> io::Result<usize> {
    if let Some(i) = sockets.iter().position(|(_, n)| *n < GROUPS_PER_SOCKET) {
        let (socket, count) = &mut sockets[i];
        match socket.join_multicast_v6(&group, ifindex) {
            Ok(()) => {
                *count += 1;
                return Ok(i);
            }
            // This socket's option memory is used up: full from now on; a fresh one below.
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => *count = GROUPS_PER_SOCKET,
            Err(e) => return Err(e),
        }
    }
    let socket = Socket::new(Domain::IPV6, Type::DGRAM, None)?;
    socket.join_multicast_v6(&group, ifindex)?;
    sockets.push((socket, 1));
    Ok(sockets.len() - 1)
}

/// The membership thread: applies changes until `stop` is set.
fn keep_memberships(changes: &mpsc::Receiver<Membership>, stop: &AtomicBool) {
    let mut groups = Groups::default();
    let mut warner = Warner {
        last: None,
        suppressed: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        let change = match changes.recv_timeout(NDP_RECEIVE_TIMEOUT) {
            Ok(change) => change,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        for addr in change.join {
            groups.join(change.ifindex, solicited_node_group(addr), &mut warner);
        }
        for addr in change.leave {
            groups.leave(change.ifindex, solicited_node_group(addr), &mut warner);
        }
    }
}

/// The responder thread: reads solicitations until `stop` is set.
fn serve(
    fd: &OwnedFd,
    lookup: &(dyn Fn(u32, Ipv6Addr) -> Option<[u8; 6]> + Send + Sync),
    stop: &AtomicBool,
    answered: &AtomicU64,
) {
    let mut buf = [0u8; RECEIVE_BUFFER];
    let mut warner = Warner {
        last: None,
        suppressed: 0,
    };
    while !stop.load(Ordering::Relaxed) {
        let (len, from) = match recvfrom::<LinkAddr>(fd.as_raw_fd(), &mut buf) {
            Ok(received) => received,
            // The receive timeout (EAGAIN) or a signal: look at the stop flag again.
            Err(Errno::EAGAIN | Errno::EINTR) => continue,
            Err(e) => {
                warner.warn("receive failed", &e);
                // Do not spin on a persistent error.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(from) = from else { continue };
        if matches!(from.pkttype(), PACKET_OUTGOING | PACKET_OTHERHOST) {
            continue;
        }
        let Ok(ifindex) = u32::try_from(from.ifindex()) else {
            continue;
        };
        let ns = match parse_solicitation(&buf[..len]) {
            Ok(ns) => ns,
            Err(reason) => {
                tracing::debug!(ifindex, %reason, "NDP responder: ignored a frame");
                continue;
            }
        };
        let Some(mac) = lookup(ifindex, ns.target) else {
            continue;
        };
        let frame = solicited_na_frame(mac, &ns);
        let sent = link_address(ifindex, ETHERTYPE_IPV6).and_then(|to| {
            sendto(fd.as_raw_fd(), &frame, &to, MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
        });
        match sent {
            Ok(_) => {
                answered.fetch_add(1, Ordering::Relaxed);
                ANSWERED_TOTAL.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(
                    ifindex,
                    target = %ns.target,
                    source = %ns.source,
                    "NDP responder: answered"
                );
            }
            Err(e) => warner.warn("sending an advertisement failed", &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::announce::ones_complement_sum;

    const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
    const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
    const SLLA_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0xbb];

    fn addr(s: &str) -> Ipv6Addr {
        s.parse().unwrap()
    }

    /// The solicited-node group of `target` and its Ethernet mapping.
    fn solicited_node(target: Ipv6Addr) -> (Ipv6Addr, [u8; 6]) {
        let t = target.octets();
        let group = Ipv6Addr::from([
            0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
        ]);
        (group, [0x33, 0x33, 0xff, t[13], t[14], t[15]])
    }

    /// The sum over pseudo-header and ICMPv6 message: 0xffff when the checksum is right.
    fn icmp_sum(source: Ipv6Addr, destination: Ipv6Addr, icmp: &[u8]) -> u16 {
        ones_complement_sum(&[
            &source.octets(),
            &destination.octets(),
            &(icmp.len() as u32).to_be_bytes(),
            &[0, 0, 0, 58],
            icmp,
        ])
    }

    /// A Neighbour Solicitation as a host sends it, with the checksum computed here
    /// (independently of the code under test) and `options` after the target.
    fn ns_frame(
        ethernet_source: [u8; 6],
        source: Ipv6Addr,
        destination: Ipv6Addr,
        target: Ipv6Addr,
        options: &[u8],
    ) -> Vec<u8> {
        let mut icmp = vec![135, 0, 0, 0, 0, 0, 0, 0];
        icmp.extend_from_slice(&target.octets());
        icmp.extend_from_slice(options);
        let checksum = !icmp_sum(source, destination, &icmp);
        icmp[2..4].copy_from_slice(&checksum.to_be_bytes());
        let (_, group_mac) = solicited_node(target);
        let mut frame = Vec::new();
        frame.extend_from_slice(&group_mac);
        frame.extend_from_slice(&ethernet_source);
        frame.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
        frame.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
        frame.extend_from_slice(&[58, 255]);
        frame.extend_from_slice(&source.octets());
        frame.extend_from_slice(&destination.octets());
        frame.extend_from_slice(&icmp);
        frame
    }

    fn slla(mac: [u8; 6]) -> Vec<u8> {
        let mut option = vec![1, 1];
        option.extend_from_slice(&mac);
        option
    }

    /// An address resolution solicitation from fd00::2 for fd00::100:5, with `options`.
    fn resolution(options: &[u8]) -> Vec<u8> {
        let target = addr("fd00::100:5");
        ns_frame(
            MAC_B,
            addr("fd00::2"),
            solicited_node(target).0,
            target,
            options,
        )
    }

    #[test]
    fn address_resolution_with_source_link_layer_option_parses() {
        let target = addr("fd00::100:5");
        let ns = parse_solicitation(&resolution(&slla(SLLA_B))).unwrap();
        assert_eq!(
            ns,
            Solicitation {
                ethernet_source: MAC_B,
                source: addr("fd00::2"),
                destination: addr("ff02::1:ff00:5"),
                target,
                source_link_layer: Some(SLLA_B),
            }
        );
        assert!(!ns.is_dad());
        assert_eq!(ns.reply_mac(), SLLA_B);
    }

    #[test]
    fn solicitation_without_option_replies_to_the_ethernet_source() {
        // A unicast NUD probe: to the target itself, no options.
        let target = addr("fd00::100:5");
        let frame = ns_frame(MAC_B, addr("fd00::2"), target, target, &[]);
        let ns = parse_solicitation(&frame).unwrap();
        assert_eq!(ns.source_link_layer, None);
        assert_eq!(ns.destination, target);
        assert_eq!(ns.reply_mac(), MAC_B);
    }

    #[test]
    fn unknown_options_are_skipped_and_padding_ignored() {
        // A nonce option (type 14, RFC 3971) before the source link-layer address, then
        // Ethernet padding past the payload.
        let mut options = vec![14, 1, 1, 2, 3, 4, 5, 6];
        options.extend_from_slice(&slla(SLLA_B));
        let mut frame = resolution(&options);
        frame.extend_from_slice(&[0; 6]);
        let ns = parse_solicitation(&frame).unwrap();
        assert_eq!(ns.source_link_layer, Some(SLLA_B));
    }

    #[test]
    fn duplicate_address_detection_parses_and_is_checked() {
        let target = addr("fd00::100:5");
        let (group, _) = solicited_node(target);
        let frame = ns_frame(MAC_B, Ipv6Addr::UNSPECIFIED, group, target, &[]);
        let ns = parse_solicitation(&frame).unwrap();
        assert!(ns.is_dad());
        assert_eq!(ns.target, target);
        // From :: only to a solicited-node group, and without a link-layer address.
        let to_all_nodes = ns_frame(MAC_B, Ipv6Addr::UNSPECIFIED, ALL_NODES, target, &[]);
        assert_eq!(
            parse_solicitation(&to_all_nodes),
            Err(Rejected::DadDestination)
        );
        let with_slla = ns_frame(MAC_B, Ipv6Addr::UNSPECIFIED, group, target, &slla(MAC_B));
        assert_eq!(
            parse_solicitation(&with_slla),
            Err(Rejected::DadWithLinkLayer)
        );
    }

    #[test]
    fn invalid_solicitations_are_rejected() {
        let good = resolution(&slla(SLLA_B));
        assert!(parse_solicitation(&good).is_ok());

        let mut hop = good.clone();
        hop[21] = 64;
        assert_eq!(parse_solicitation(&hop), Err(Rejected::HopLimit(64)));

        let mut checksum = good.clone();
        checksum[56] ^= 0x01;
        assert_eq!(parse_solicitation(&checksum), Err(Rejected::Checksum));
        // Any change to what the checksum covers breaks it too: here the source address.
        let mut source = good.clone();
        source[37] ^= 0x01;
        assert_eq!(parse_solicitation(&source), Err(Rejected::Checksum));

        assert_eq!(parse_solicitation(&good[..70]), Err(Rejected::Short));
        assert_eq!(parse_solicitation(&[]), Err(Rejected::Short));
        // The payload length says more than the frame holds.
        assert_eq!(
            parse_solicitation(&good[..good.len() - 2]),
            Err(Rejected::Short)
        );
        // A payload length under 24.
        let mut tiny = good.clone();
        tiny[18..20].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(parse_solicitation(&tiny), Err(Rejected::Short));

        let target = addr("fd00::100:5");
        let (group, _) = solicited_node(target);
        let code = {
            let mut f = ns_frame(MAC_B, addr("fd00::2"), group, target, &[]);
            // Rebuild with code 1 and a matching checksum.
            f[55] = 1;
            f[56..58].copy_from_slice(&[0, 0]);
            let sum = !icmp_sum(addr("fd00::2"), group, &f[54..]);
            f[56..58].copy_from_slice(&sum.to_be_bytes());
            f
        };
        assert_eq!(parse_solicitation(&code), Err(Rejected::Code(1)));

        let multicast = ns_frame(MAC_B, addr("fd00::2"), group, addr("ff02::1"), &[]);
        assert_eq!(
            parse_solicitation(&multicast),
            Err(Rejected::MulticastTarget)
        );

        let zero_length = resolution(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_solicitation(&zero_length), Err(Rejected::BadOption));
        let past_end = resolution(&[1, 2, 0, 0, 0, 0, 0, 0]);
        assert_eq!(parse_solicitation(&past_end), Err(Rejected::BadOption));

        let mut advert = good.clone();
        advert[54] = 136;
        assert_eq!(parse_solicitation(&advert), Err(Rejected::NotSolicitation));
        let mut udp = good.clone();
        udp[20] = 17;
        assert_eq!(parse_solicitation(&udp), Err(Rejected::NotSolicitation));
        let mut ipv4 = good;
        ipv4[12..14].copy_from_slice(&[0x08, 0x00]);
        assert_eq!(parse_solicitation(&ipv4), Err(Rejected::NotSolicitation));
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn solicited_node_groups_keep_the_low_24_bits() {
        // RFC 4291 §2.7.1's own example.
        assert_eq!(
            solicited_node_group(addr("4037::1:800:200e:8c6c")),
            addr("ff02::1:ff0e:8c6c")
        );
        assert_eq!(
            solicited_node_group(addr("2001:db8:1::7d0")),
            addr("ff02::1:ff00:7d0")
        );
        // Addresses differing only above the low 24 bits share a group.
        assert_eq!(
            solicited_node_group(addr("fd00::100:5")),
            solicited_node_group(addr("fd00::1:100:5"))
        );
        assert!(is_solicited_node(&solicited_node_group(addr("::1"))));
    }

    #[test]
    fn solicited_na_matches_hand_built_vector() {
        let ns = parse_solicitation(&resolution(&slla(SLLA_B))).unwrap();
        let frame = solicited_na_frame(MAC_A, &ns);
        let expected = hex("0200000000bb 02000000000a 86dd \
             60000000 0020 3a ff \
             fd000000000000000000000001000005 \
             fd000000000000000000000000000002 \
             88 00 0000 60000000 \
             fd000000000000000000000001000005 \
             02 01 02000000000a");
        assert_eq!(frame.len(), expected.len());
        // Everything but the checksum (bytes 56..58, zero above) is as written by hand.
        assert_eq!(frame[..56], expected[..56]);
        assert_eq!(frame[58..], expected[58..]);
        assert_eq!(
            icmp_sum(addr("fd00::100:5"), addr("fd00::2"), &frame[54..]),
            0xffff
        );
    }

    #[test]
    fn solicited_na_without_option_goes_to_the_ethernet_source() {
        let target = addr("fd00::100:5");
        let ns =
            parse_solicitation(&ns_frame(MAC_B, addr("fd00::2"), target, target, &[])).unwrap();
        let frame = solicited_na_frame(MAC_A, &ns);
        assert_eq!(frame[..6], MAC_B);
        assert_eq!(frame[6..12], MAC_A);
        assert_eq!(frame[58], 0x60, "S and O");
        assert_eq!(icmp_sum(target, addr("fd00::2"), &frame[54..]), 0xffff);
    }

    #[test]
    fn dad_is_answered_to_all_nodes_without_the_solicited_flag() {
        let target = addr("fd00::100:5");
        let (group, _) = solicited_node(target);
        let ns = parse_solicitation(&ns_frame(MAC_B, Ipv6Addr::UNSPECIFIED, group, target, &[]))
            .unwrap();
        let frame = solicited_na_frame(MAC_A, &ns);
        let expected = hex("333300000001 02000000000a 86dd \
             60000000 0020 3a ff \
             fd000000000000000000000001000005 \
             ff020000000000000000000000000001 \
             88 00 0000 20000000 \
             fd000000000000000000000001000005 \
             02 01 02000000000a");
        assert_eq!(frame[..56], expected[..56]);
        assert_eq!(frame[58..], expected[58..]);
        assert_eq!(icmp_sum(target, ALL_NODES, &frame[54..]), 0xffff);
    }

    #[test]
    fn our_advertisement_is_not_taken_for_a_solicitation() {
        let ns = parse_solicitation(&resolution(&slla(SLLA_B))).unwrap();
        let na = solicited_na_frame(MAC_A, &ns);
        assert_eq!(parse_solicitation(&na), Err(Rejected::NotSolicitation));
    }
}
