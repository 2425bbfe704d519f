//! The raw IP socket (protocol 112) of one interface and address family.
//!
//! One socket carries every VRID of its interface; the driver demultiplexes by VRID. It is
//! bound to the device, joins the VRRP group, sends with TTL / hop limit 255 and reports the
//! received TTL so the driver can drop packets that crossed a router (RFC 5798 §7.1). Our own
//! multicast is not looped back. Options and messages go through socket2's and nix's safe
//! wrappers; the `unsafe` is tokio's fd registration, and `sched_setscheduler`, `mlockall`
//! and `mallopt` for the engine thread's real-time priority, `malloc_trim` to give freed
//! memory back after a large plan (neither nix nor std wraps them),
//! and building the `sockaddr_ll` that binds an announcement socket ([`packet_sender`]; nix
//! has no safe constructor for it). The NDP responder's packet socket ([`ndp_listener`],
//! [`packet_allmulti`]) needs `setsockopt` calls nix does not wrap: a classic BPF filter,
//! a `PACKET_ADD_MEMBERSHIP` and `PACKET_IGNORE_OUTGOING`.
#![allow(unsafe_code)]

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use nix::cmsg_space;
use nix::sys::socket::{
    ControlMessage, ControlMessageOwned, LinkAddr, MsgFlags, SockaddrIn, SockaddrIn6, SockaddrLike,
    recvmsg, sendmsg, setsockopt, sockopt,
};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use crate::vocab::Family;
use crate::vrrp::packet::parse_ipv4;
use crate::vrrp::{IPPROTO_VRRP, MULTICAST_V4, MULTICAST_V6};

/// DSCP CS6 ("network control"), as keepalived and routers send VRRP.
const TOS_NETWORK_CONTROL: u8 = 0xc0;
const HOP_LIMIT: u8 = 255;

/// One received VRRP message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub source: IpAddr,
    pub destination: IpAddr,
    /// TTL (IPv4) or hop limit (IPv6) as received; must be 255.
    pub ttl: u8,
    /// Offset and length of the VRRP message inside the caller's buffer.
    pub offset: usize,
    pub len: usize,
}

/// Errors of the raw socket.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot open the VRRP socket for {family} on {interface}: {source}")]
    Open {
        interface: String,
        family: Family,
        #[source]
        source: io::Error,
    },
    #[error("receive failed: {0}")]
    Receive(#[source] io::Error),
    #[error("a received datagram is malformed: {0}")]
    Malformed(String),
    #[error("send to {destination} failed: {source}")]
    Send {
        destination: IpAddr,
        #[source]
        source: io::Error,
    },
}

impl SocketError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            SocketError::Open { .. } => "open",
            SocketError::Receive(_) => "receive",
            SocketError::Malformed(_) => "malformed",
            SocketError::Send { .. } => "send",
        }
    }
}

/// The VRRP socket of one interface and family.
pub struct VrrpSocket {
    fd: AsyncFd<Socket>,
    family: Family,
    ifindex: u32,
}

impl VrrpSocket {
    /// Opens, binds to `interface` and joins the VRRP group. Must run inside a tokio runtime.
    pub fn open(interface: &str, ifindex: u32, family: Family) -> Result<Self, SocketError> {
        let open_err = |source| SocketError::Open {
            interface: interface.to_string(),
            family,
            source,
        };
        let socket = match family {
            Family::V4 => open_v4(interface, ifindex),
            Family::V6 => open_v6(interface, ifindex),
        }
        .map_err(open_err)?;
        // SAFETY: `socket` is an owned socket2::Socket moved into the AsyncFd, so its file
        // descriptor stays open and is not reused for as long as the registration exists.
        let fd = unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
            .map_err(|e| open_err(io::Error::from(e)))?;
        Ok(VrrpSocket {
            fd,
            family,
            ifindex,
        })
    }

    /// Opens a send-only socket on a virtual-MAC macvlan: advertisements leave with the
    /// virtual MAC as their source (RFC 5798 §7.3). It joins no group, so it receives nothing.
    pub fn open_sender(interface: &str, ifindex: u32, family: Family) -> Result<Self, SocketError> {
        let open_err = |source| SocketError::Open {
            interface: interface.to_string(),
            family,
            source,
        };
        let socket = sender_socket(interface, ifindex, family)
            .and_then(|s| s.set_recv_buffer_size(0).map(|()| s))
            .map_err(open_err)?;
        // SAFETY: as in `open`: the AsyncFd owns the socket and so its descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
            .map_err(|e| open_err(io::Error::from(e)))?;
        Ok(VrrpSocket {
            fd,
            family,
            ifindex,
        })
    }

    pub fn family(&self) -> Family {
        self.family
    }

    /// Waits for the next datagram. For IPv4 the buffer holds the IP header too; the returned
    /// offset points at the VRRP message either way.
    pub async fn recv(&self, buf: &mut [u8]) -> Result<Received, SocketError> {
        loop {
            let mut guard = self.fd.readable().await.map_err(SocketError::Receive)?;
            match guard.try_io(|inner| self.recv_now(inner.get_ref(), buf)) {
                Ok(result) => return result.map_err(SocketError::Receive)?,
                Err(_would_block) => continue,
            }
        }
    }

    /// Reads one datagram if one is queued, without waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> Option<Result<Received, SocketError>> {
        match self.recv_now(self.fd.get_ref(), buf) {
            Ok(result) => Some(result),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => Some(Err(SocketError::Receive(e))),
        }
    }

    fn recv_now(
        &self,
        socket: &Socket,
        buf: &mut [u8],
    ) -> io::Result<Result<Received, SocketError>> {
        let fd = socket.as_raw_fd();
        match self.family {
            Family::V4 => {
                let n = {
                    let mut iov = [IoSliceMut::new(buf)];
                    let msg = recvmsg::<SockaddrIn>(fd, &mut iov, None, MsgFlags::MSG_DONTWAIT)
                        .map_err(io::Error::from)?;
                    msg.bytes
                };
                Ok(match parse_ipv4(&buf[..n]) {
                    Ok((info, payload)) => Ok(Received {
                        source: IpAddr::V4(info.src),
                        destination: IpAddr::V4(info.dst),
                        ttl: info.ttl,
                        offset: n - payload.len(),
                        len: payload.len(),
                    }),
                    Err(e) => Err(SocketError::Malformed(e.to_string())),
                })
            }
            Family::V6 => {
                let mut space = cmsg_space!(libc::c_int, libc::in6_pktinfo);
                let mut iov = [IoSliceMut::new(buf)];
                let msg =
                    recvmsg::<SockaddrIn6>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_DONTWAIT)
                        .map_err(io::Error::from)?;
                let mut ttl = None;
                let mut destination = None;
                for cmsg in msg.cmsgs().map_err(io::Error::from)? {
                    match cmsg {
                        ControlMessageOwned::Ipv6HopLimit(h) => ttl = u8::try_from(h).ok(),
                        ControlMessageOwned::Ipv6PacketInfo(info) => {
                            destination = Some(Ipv6Addr::from(info.ipi6_addr.s6_addr))
                        }
                        _ => {}
                    }
                }
                let n = msg.bytes;
                let source = msg.address.map(|a| a.ip());
                Ok(match (source, destination, ttl) {
                    (Some(s), Some(d), Some(t)) => Ok(Received {
                        source: IpAddr::V6(s),
                        destination: IpAddr::V6(d),
                        ttl: t,
                        offset: 0,
                        len: n,
                    }),
                    _ => Err(SocketError::Malformed(
                        "IPv6 datagram without source, packet info or hop limit".into(),
                    )),
                })
            }
        }
    }

    /// Sends one VRRP message from `source` to `destination` (the group or a unicast peer).
    /// Never blocks: when the socket buffer is full the message is dropped with an error.
    pub fn send(
        &self,
        source: IpAddr,
        destination: IpAddr,
        message: &[u8],
    ) -> Result<(), SocketError> {
        let send_err = |source| SocketError::Send {
            destination,
            source,
        };
        let fd = self.fd.get_ref().as_raw_fd();
        let iov = [IoSlice::new(message)];
        let result = match (source, destination) {
            (IpAddr::V4(src), IpAddr::V4(dst)) => {
                let info = libc::in_pktinfo {
                    ipi_ifindex: self.ifindex as libc::c_int,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(src).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                };
                let to = SockaddrIn::from(SocketAddrV4::new(dst, 0));
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::Ipv4PacketInfo(&info)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&to),
                )
            }
            (IpAddr::V6(src), IpAddr::V6(dst)) => {
                let info = libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: src.octets(),
                    },
                    ipi6_ifindex: self.ifindex,
                };
                let scope = if needs_scope(&dst) { self.ifindex } else { 0 };
                let to = SockaddrIn6::from(SocketAddrV6::new(dst, 0, 0, scope));
                sendmsg(
                    fd,
                    &iov,
                    &[ControlMessage::Ipv6PacketInfo(&info)],
                    MsgFlags::MSG_DONTWAIT,
                    Some(&to),
                )
            }
            _ => {
                return Err(send_err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "source and destination families differ",
                )));
            }
        };
        result.map(drop).map_err(|e| send_err(io::Error::from(e)))
    }
}

fn needs_scope(dst: &Ipv6Addr) -> bool {
    let s0 = dst.segments()[0];
    s0 & 0xffc0 == 0xfe80 || (s0 & 0xff00 == 0xff00 && s0 & 0x000f == 0x2)
}

/// Receiving socket: the sending options, plus group membership and (IPv6) the ancillary
/// data that carries hop limit and destination.
fn open_v4(interface: &str, ifindex: u32) -> io::Result<Socket> {
    let socket = sender_socket(interface, ifindex, Family::V4)?;
    socket.join_multicast_v4_n(
        &MULTICAST_V4,
        &socket2::InterfaceIndexOrAddress::Index(ifindex),
    )?;
    // Big enough for bursts of thousands of advertisements after a failover.
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_send_buffer_size(4 << 20)?;
    Ok(socket)
}

fn open_v6(interface: &str, ifindex: u32) -> io::Result<Socket> {
    let socket = sender_socket(interface, ifindex, Family::V6)?;
    socket.set_recv_hoplimit_v6(true)?;
    setsockopt(&socket, sockopt::Ipv6RecvPacketInfo, &true).map_err(io::Error::from)?;
    socket.join_multicast_v6(&MULTICAST_V6, ifindex)?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_send_buffer_size(4 << 20)?;
    Ok(socket)
}

/// Bound to the device, TTL / hop limit 255, DSCP CS6, no multicast loopback; joins no group.
fn sender_socket(interface: &str, ifindex: u32, family: Family) -> io::Result<Socket> {
    let domain = match family {
        Family::V4 => Domain::IPV4,
        Family::V6 => Domain::IPV6,
    };
    let socket = Socket::new(
        domain,
        Type::RAW,
        Some(Protocol::from(i32::from(IPPROTO_VRRP))),
    )?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_nonblocking(true)?;
    match family {
        Family::V4 => {
            socket.set_multicast_ttl_v4(u32::from(HOP_LIMIT))?;
            socket.set_ttl_v4(u32::from(HOP_LIMIT))?;
            socket.set_tos_v4(u32::from(TOS_NETWORK_CONTROL))?;
            socket.set_multicast_loop_v4(false)?;
        }
        Family::V6 => {
            socket.set_multicast_hops_v6(u32::from(HOP_LIMIT))?;
            socket.set_unicast_hops_v6(u32::from(HOP_LIMIT))?;
            socket.set_multicast_if_v6(ifindex)?;
            socket.set_multicast_loop_v6(false)?;
            socket.set_tclass_v6(u32::from(TOS_NETWORK_CONTROL))?;
        }
    }
    Ok(socket)
}

/// Puts the calling thread (only it: Linux schedules threads, and `pid` 0 names the caller)
/// in the real-time class SCHED_FIFO at `priority` (1-99), as keepalived's
/// `vrrp_rt_priority` does for its VRRP process: it then runs as soon as it wakes, ahead of
/// every normal thread, so CPU-bound work elsewhere cannot delay an advertisement.
pub fn set_realtime_priority(priority: u8) -> io::Result<()> {
    let param = libc::sched_param {
        sched_priority: i32::from(priority),
    };
    // SAFETY: sched_setscheduler reads the sched_param it is given for the duration of the
    // call only, and `param` lives until the call returns.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Puts the calling thread back in the normal class (SCHED_OTHER), e.g. a helper thread
/// started by a real-time thread, which it would otherwise inherit.
pub fn set_normal_priority() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in set_realtime_priority.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_OTHER, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// For a real-time engine thread, as keepalived does with its realtime priority: locks the
/// process's pages in memory as they are touched (`mlockall(MCL_CURRENT | MCL_FUTURE |
/// MCL_ONFAULT)`, so nothing the engine uses is swapped out, without faulting in every
/// mapping up front) and keeps glibc from handing freed memory back to the kernel
/// ([`keep_freed_memory`]). Unmapping and trimming take the process's memory-map lock for
/// writing; a normal-priority thread preempted while holding it stalls a real-time thread
/// that page-faults or allocates meanwhile. Returns what could not be done.
pub fn pin_memory() -> Vec<String> {
    let mut failed = Vec::new();
    // SAFETY: mlockall takes flags only and touches no memory of ours.
    let locked =
        unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT) };
    if locked != 0 {
        failed.push(format!(
            "mlockall: {} (needs CAP_IPC_LOCK or a large RLIMIT_MEMLOCK)",
            io::Error::last_os_error()
        ));
    }
    failed.extend(keep_freed_memory());
    failed
}

/// Fixes glibc's mmap and trim thresholds high (32 MiB, its maximum, and 64 MiB), so that
/// memory freed stays in the process for the next use: large blocks come from the heap
/// instead of fresh mappings, and the heap's top is not cut back on every free. A plan of
/// 10,000 Services allocates and frees megabytes each time; with glibc's adaptive defaults
/// the agents spent 7 % of this machine zeroing pages the kernel handed them again (perf,
/// `clear_page_erms`). What stays is handed back once the agent is quiet
/// ([`release_free_memory`]), unless [`pin_memory`] locked it. Returns what was refused.
pub fn keep_freed_memory() -> Vec<String> {
    let mut failed = Vec::new();
    #[cfg(target_env = "gnu")]
    for (param, name) in [
        (libc::M_TRIM_THRESHOLD, "M_TRIM_THRESHOLD"),
        (libc::M_MMAP_THRESHOLD, "M_MMAP_THRESHOLD"),
    ] {
        // 64 MiB: glibc caps the mmap threshold at 32 MiB on 64-bit (HEAP_MAX/2) and refuses
        // more, so that one is set to its maximum.
        let value = if param == libc::M_MMAP_THRESHOLD {
            32 << 20
        } else {
            64 << 20
        };
        // SAFETY: mallopt takes two integers; glibc serialises it with its arena locks.
        if unsafe { libc::mallopt(param, value) } != 1 {
            failed.push(format!("mallopt({name}) refused"));
        }
    }
    failed
}

/// The trim threshold alone: glibc's default (128 KiB) with `eager`, else back to the 64 MiB
/// [`keep_freed_memory`] sets. `malloc_trim` ([`release_free_memory`]) releases the top of
/// the main arena's heap and the free pages inside every arena, but not the top of another
/// thread's arena: glibc trims that only as it frees, and only past this threshold. The
/// agent's runtime thread, which writes 10,000 statuses after a burst, kept ~10 MiB that
/// way at the 64 MiB threshold. So a quiet agent trims eagerly, and a busy one keeps what
/// it frees. False when glibc refused it.
pub fn trim_eagerly(eager: bool) -> bool {
    #[cfg(target_env = "gnu")]
    {
        let value = if eager { 128 << 10 } else { 64 << 20 };
        // SAFETY: mallopt takes two integers; glibc serialises it with its arena locks.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, value) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        let _ = eager;
        false
    }
}

/// Hands the C allocator's free memory back to the kernel (`malloc_trim(0)`: the top of every
/// arena and the free pages inside them). glibc keeps what a burst freed (its trim threshold
/// grows with the largest block freed, up to 64 MiB per arena): after 10,000 Services were
/// planned, 30 MiB of an idle agent's resident memory was such free memory. Not for a process
/// whose memory [`pin_memory`] locked (trimming takes the memory-map lock the real-time
/// engine must not wait for, and locked pages cannot be released). True when memory was
/// released.
pub fn release_free_memory() -> bool {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: malloc_trim takes an integer and works on glibc's own arenas under their
        // locks; it touches no memory of ours.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

/// A timer with microsecond precision on the monotonic clock (a timerfd), for the engine's
/// next deadline. tokio's timers round up to whole milliseconds, which would make every
/// takeover up to a millisecond late.
pub struct PreciseTimer {
    fd: AsyncFd<TimerFdHandle>,
}

struct TimerFdHandle(nix::sys::timerfd::TimerFd);

impl AsRawFd for TimerFdHandle {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsFd;
        self.0.as_fd().as_raw_fd()
    }
}

impl PreciseTimer {
    /// Must run inside a tokio runtime.
    pub fn new() -> io::Result<Self> {
        use nix::sys::timerfd::{ClockId, TimerFd, TimerFlags};
        let timer = TimerFd::new(
            ClockId::CLOCK_MONOTONIC,
            TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
        )
        .map_err(io::Error::from)?;
        // SAFETY: the AsyncFd owns the TimerFd and so its descriptor, which stays open and
        // unchanged for as long as the registration exists.
        let fd = unsafe {
            AsyncFd::register_with_interest(TimerFdHandle(timer), tokio::io::Interest::READABLE)
        }
        .map_err(io::Error::from)?;
        Ok(PreciseTimer { fd })
    }

    /// Fires at `deadline` (at once if it has passed); `None` disarms.
    pub fn arm(&self, deadline: Option<std::time::Instant>) -> io::Result<()> {
        use nix::sys::time::TimeSpec;
        use nix::sys::timerfd::{Expiration, TimerSetTimeFlags};
        use nix::time::{ClockId, clock_gettime};
        let timer = &self.fd.get_ref().0;
        let Some(deadline) = deadline else {
            return timer.unset().map_err(io::Error::from);
        };
        // std's Instant is CLOCK_MONOTONIC on Linux; translate through "now" on both.
        let now = std::time::Instant::now();
        let mono = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
        let ahead = deadline.saturating_duration_since(now);
        let mut at = std::time::Duration::new(mono.tv_sec() as u64, mono.tv_nsec() as u32) + ahead;
        // An all-zero expiration would disarm instead of firing.
        at = at.max(std::time::Duration::from_nanos(1));
        timer
            .set(
                Expiration::OneShot(TimeSpec::from_duration(at)),
                TimerSetTimeFlags::TFD_TIMER_ABSTIME,
            )
            .map_err(io::Error::from)
    }

    /// Waits until the armed deadline has passed.
    pub async fn wait(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|inner| {
                let mut expirations = [0u8; 8];
                nix::unistd::read(&inner.get_ref().0, &mut expirations)
                    .map(drop)
                    .map_err(io::Error::from)
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

/// An `AF_PACKET` raw socket bound to interface `ifindex` with protocol 0: it sends whole
/// Ethernet frames out of that interface (also with `sendmmsg`, which takes no address) and,
/// hooked to no ethertype, receives nothing (a socket kept open for `ETH_P_ALL` would get a
/// copy of every frame on the interface).
pub fn packet_sender(ifindex: u32) -> io::Result<OwnedFd> {
    let fd = packet_socket()?;
    nix::sys::socket::bind(fd.as_raw_fd(), &link_address(ifindex, 0)?)?;
    Ok(fd)
}

/// An `AF_PACKET` raw socket with protocol 0: it receives nothing until bound to a protocol.
fn packet_socket() -> io::Result<OwnedFd> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    Ok(nix::sys::socket::socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

/// The `sockaddr_ll` of interface `ifindex` (0: every interface, for `bind`) and ethertype
/// `protocol` (host order; 0: none), to bind a packet socket or to address `sendto`.
pub fn link_address(ifindex: u32, protocol: u16) -> io::Result<LinkAddr> {
    let index = i32::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    // SAFETY: an all-zero sockaddr_ll is a valid value (plain integers and a byte array).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = protocol.to_be();
    sll.sll_ifindex = index;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the pointer is to a live, initialised sockaddr_ll of `len` bytes, whose family
    // field says AF_PACKET, which is what LinkAddr wraps.
    unsafe {
        LinkAddr::from_raw(
            (&sll as *const libc::sockaddr_ll).cast::<libc::sockaddr>(),
            Some(len),
        )
    }
    .ok_or_else(|| io::Error::other("cannot build the link-layer address"))
}

/// How long a receive on [`ndp_listener`]'s socket waits before it returns EAGAIN, so that
/// the thread reading it notices a stop request.
pub const NDP_RECEIVE_TIMEOUT: Duration = Duration::from_millis(200);

/// Classic BPF, run by the kernel on every IPv6 frame before it is queued: accepts an
/// ICMPv6 (next header 58, without extension headers) Neighbour Solicitation (type 135)
/// and drops everything else, so the reader wakes for solicitations only. Offsets are from
/// the Ethernet header: ethertype at 12, next header at 14 + 6, ICMPv6 type at 14 + 40.
const NS_FILTER: [libc::sock_filter; 8] = [
    bpf(BPF_LDH_ABS, 0, 0, 12),
    bpf(BPF_JEQ_K, 0, 5, 0x86dd),
    bpf(BPF_LDB_ABS, 0, 0, 20),
    bpf(BPF_JEQ_K, 0, 3, 58),
    bpf(BPF_LDB_ABS, 0, 0, 54),
    bpf(BPF_JEQ_K, 0, 1, 135),
    // Accept: the whole frame (at most this many bytes).
    bpf(BPF_RET_K, 0, 0, 0xffff),
    bpf(BPF_RET_K, 0, 0, 0),
];
const BPF_LDH_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
const BPF_LDB_ABS: u16 = (libc::BPF_LD | libc::BPF_B | libc::BPF_ABS) as u16;
const BPF_JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const BPF_RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;

const fn bpf(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// The Neighbour Solicitation listener: an `AF_PACKET` raw socket for IPv6 frames on every
/// interface of the calling thread's network namespace, filtered to ICMPv6 Neighbour
/// Solicitations ([`NS_FILTER`]), with a receive timeout of [`NDP_RECEIVE_TIMEOUT`] and, where
/// the kernel has it (4.20+), without the frames this host sends. The filter is attached
/// before the socket is bound to the IPv6 ethertype, so no other frame is ever queued.
/// Multicast solicitations reach it only from interfaces that pass them up
/// ([`packet_allmulti`]).
pub fn ndp_listener() -> io::Result<OwnedFd> {
    let fd = packet_socket()?;
    let program = libc::sock_fprog {
        len: NS_FILTER.len() as libc::c_ushort,
        // The kernel only reads the program (it copies it in).
        filter: NS_FILTER.as_ptr().cast_mut(),
    };
    set_option(
        fd.as_fd(),
        libc::SOL_SOCKET,
        libc::SO_ATTACH_FILTER,
        &program,
    )?;
    // Best effort (Linux 4.20+): the reader skips PACKET_OUTGOING frames anyway.
    let _ = set_option(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_IGNORE_OUTGOING,
        &(1 as libc::c_int),
    );
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, NDP_RECEIVE_TIMEOUT.as_micros() as _),
    )
    .map_err(io::Error::from)?;
    nix::sys::socket::bind(fd.as_raw_fd(), &link_address(0, libc::ETH_P_IPV6 as u16)?)?;
    Ok(fd)
}

/// Makes interface `ifindex` pass every multicast frame up to the stack while the packet
/// socket `fd` is open (a `PACKET_MR_ALLMULTI` membership, which the kernel drops when the
/// socket closes or the interface goes away): a NIC otherwise filters out the
/// solicited-node groups of addresses the kernel does not know it has. Each call adds one
/// membership reference on the socket.
pub fn packet_allmulti(fd: BorrowedFd<'_>, ifindex: u32) -> io::Result<()> {
    let mr_ifindex = libc::c_int::try_from(ifindex)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface index too large"))?;
    let request = libc::packet_mreq {
        mr_ifindex,
        mr_type: libc::PACKET_MR_ALLMULTI as libc::c_ushort,
        mr_alen: 0,
        mr_address: [0; 8],
    };
    set_option(fd, libc::SOL_PACKET, libc::PACKET_ADD_MEMBERSHIP, &request)
}

/// `setsockopt(fd, level, name, value)` for an option nix does not wrap, `value` passed by
/// pointer with its size.
fn set_option<T>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &T) -> io::Result<()> {
    // SAFETY: `value` is a live, initialised T for the whole call and optlen is its size;
    // the kernel copies the option in and keeps no pointer to it. `fd` is borrowed.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *const T).cast::<libc::c_void>(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
