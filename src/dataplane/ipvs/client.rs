//! A blocking IPVS client on a generic netlink socket, meant to run on a thread of its own.
//!
//! Writes are pipelined: many requests, each with its own sequence number, go out in one
//! `sendmsg`. The kernel (`netlink_rcv_skb`) handles every message of the datagram in order,
//! synchronously inside that `sendmsg`, carries on after failures, and reports each failure
//! with an `NLMSG_ERROR` even when no acknowledgement was asked for. So only the last message
//! of a batch asks for one: when it arrives, every earlier message without an error has
//! succeeded. A batch of N messages thus costs one `sendmsg` and, on success, one `recvmsg`
//! (`ipvsadm -R` pays a new socket, a family lookup and a request-reply round trip per line).
//!
//! Errors and the final acknowledgement are queued while `sendmsg` runs, before anything is
//! read, so a batch is limited to as many messages as the receive buffer holds error messages
//! (`SO_RCVBUFFORCE` raises it). Should the buffer still overflow, the kernel drops the tail of
//! the replies and reports `ENOBUFS`; everything up to the last reply that arrived is known,
//! and each later message is sent again on its own to learn its outcome, before anything else
//! of the call is sent.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
    NLMSG_DONE, NLMSG_ERROR, NLMSG_NOOP, NLMSG_OVERRUN, NetlinkBuffer, NetlinkMessage,
    NlasIterator,
};
use netlink_packet_generic::GenlHeader;
use netlink_packet_generic::GenlMessage;
use netlink_packet_generic::constants::GENL_ID_CTRL;
use netlink_packet_generic::ctrl::nlas::GenlCtrlAttrs;
use netlink_packet_generic::ctrl::{GenlCtrl, GenlCtrlCmd};
use netlink_sys::protocols::NETLINK_GENERIC;
use netlink_sys::{Socket, SocketAddr};
use nix::sys::socket::{setsockopt, sockopt};
use nix::sys::time::{TimeVal, TimeValLike};

use super::netlink::{
    CodecError, DestEntry, DestKey, Destination, FAMILY_NAME, GENL_HEADER_LEN, IpvsInfo,
    IpvsMessage, Service, ServiceKey, encode_message,
};

/// Bytes per `sendmsg`: well below the default `wmem_default` the kernel checks against.
const BATCH_BYTES: usize = 60 * 1024;
/// An upper bound on one encoded request (names are at most 15 bytes).
const MAX_MESSAGE: usize = 512;
/// Receive buffer asked for; `SO_RCVBUFFORCE` needs `CAP_NET_ADMIN`, which IPVS needs anyway.
const RCVBUF: usize = 8 << 20;
const SNDBUF: usize = 1 << 20;
/// Buffer space one queued error message takes in the kernel's accounting (`skb->truesize`
/// of a capped ack is about 768 bytes); the batch size follows from it.
const ACK_TRUESIZE: usize = 2048;
const MAX_BATCH: usize = 4096;
const RECV_BUFFER: usize = 64 * 1024;
const RECV_TIMEOUT_SECS: i64 = 5;
const DUMP_ATTEMPTS: usize = 4;
/// `NLMSGERR_ATTR_MSG` in an extended acknowledgement.
const NLMSGERR_ATTR_MSG: u16 = 1;
const CTRL_ATTR_FAMILY_ID: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum IpvsError {
    #[error("IPVS is not available in this kernel (module ip_vs not loaded?)")]
    Unavailable,
    #[error("{op}: netlink I/O error: {source}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    #[error("{op}: {reason} ({name}){}", detail_suffix(.detail))]
    Kernel {
        /// What was asked, e.g. "add destination 10.1.0.1:8080 to TCP 10.0.0.1:80".
        op: String,
        /// Positive errno.
        errno: i32,
        name: &'static str,
        /// What the errno means for this request, per `ip_vs_ctl.c`.
        reason: &'static str,
        /// The kernel's extended-acknowledgement message, when it sent one.
        detail: Option<String>,
    },
    #[error("{op}: {source}")]
    Invalid {
        op: String,
        #[source]
        source: CodecError,
    },
    #[error("{op}: cannot decode the kernel's reply: {source}")]
    Decode {
        op: String,
        #[source]
        source: CodecError,
    },
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl IpvsError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::Unavailable => "unavailable",
            Self::Io { .. } => "io",
            Self::Kernel { errno, .. } => errno_names(*errno).1,
            Self::Invalid { .. } => "invalid",
            Self::Decode { .. } => "decode",
        }
    }

    /// Worth retrying unchanged after a backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Kernel { errno, .. } => is_transient_errno(*errno),
            Self::Io { source, .. } => {
                source.raw_os_error().is_some_and(is_transient_errno)
                    || matches!(
                        source.kind(),
                        io::ErrorKind::TimedOut
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::Interrupted
                    )
            }
            Self::Unavailable | Self::Invalid { .. } | Self::Decode { .. } => false,
        }
    }

    /// The kernel's errno (positive) when it refused the request.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Self::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

fn is_transient_errno(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOBUFS | libc::ENOMEM | libc::EBUSY | libc::EAGAIN | libc::EINTR
    )
}

/// Name and metric label of the errnos IPVS and netlink answer with.
fn errno_names(errno: i32) -> (&'static str, &'static str) {
    match errno {
        libc::EPERM => ("EPERM", "eperm"),
        libc::ENOENT => ("ENOENT", "enoent"),
        libc::ESRCH => ("ESRCH", "esrch"),
        libc::EINTR => ("EINTR", "eintr"),
        libc::EIO => ("EIO", "eio"),
        libc::EAGAIN => ("EAGAIN", "eagain"),
        libc::ENOMEM => ("ENOMEM", "enomem"),
        libc::EACCES => ("EACCES", "eacces"),
        libc::EFAULT => ("EFAULT", "efault"),
        libc::EBUSY => ("EBUSY", "ebusy"),
        libc::EEXIST => ("EEXIST", "eexist"),
        libc::ENODEV => ("ENODEV", "enodev"),
        libc::EINVAL => ("EINVAL", "einval"),
        libc::ERANGE => ("ERANGE", "erange"),
        libc::EMSGSIZE => ("EMSGSIZE", "emsgsize"),
        libc::ENOPROTOOPT => ("ENOPROTOOPT", "enoprotoopt"),
        libc::EOPNOTSUPP => ("EOPNOTSUPP", "eopnotsupp"),
        libc::EAFNOSUPPORT => ("EAFNOSUPPORT", "eafnosupport"),
        libc::ENOBUFS => ("ENOBUFS", "enobufs"),
        libc::ETIMEDOUT => ("ETIMEDOUT", "etimedout"),
        _ => ("errno", "kernel_other"),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OpKind {
    AddService,
    EditService,
    DelService,
    AddDest,
    EditDest,
    DelDest,
    Read,
}

/// What an errno means for a request, from `ip_vs_genl_set_cmd` and the functions it calls.
fn reason(kind: OpKind, errno: i32) -> &'static str {
    use OpKind::*;
    match (kind, errno) {
        (AddService, libc::EEXIST) => "the service already exists",
        (AddDest, libc::EEXIST) => "the destination already exists",
        (_, libc::ESRCH) => "no such service",
        (AddService | EditService, libc::ENOENT) => {
            "scheduler or persistence engine not found (no ip_vs_<name> module?)"
        }
        (EditDest | DelDest, libc::ENOENT) => "no such destination",
        (AddDest | EditDest, libc::ERANGE) => {
            "weight negative or lower threshold above upper threshold"
        }
        (AddDest, libc::EINVAL) => {
            "destination refused (not a unicast address, or another address family without tunnel forwarding)"
        }
        (AddService | EditService, libc::EINVAL) => "service parameters refused",
        (_, libc::EAFNOSUPPORT) => "address family not supported (IPv6 disabled?)",
        (_, libc::EPERM) => "not permitted (CAP_NET_ADMIN needed)",
        (_, libc::ENOMEM | libc::ENOBUFS) => "the kernel is short of memory",
        (_, libc::EBUSY | libc::EAGAIN | libc::EINTR) => "the kernel was busy; try again",
        (_, libc::EINVAL) => "invalid argument",
        _ => "refused by the kernel",
    }
}

/// One write to the IPVS table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    AddService(Service),
    /// Changes scheduler, flags, timeout, netmask and persistence engine in place.
    EditService(Service),
    /// Also removes its destinations.
    DelService(ServiceKey),
    AddDest(ServiceKey, Destination),
    /// Changes forwarding method, weight, thresholds and tunnel parameters in place.
    EditDest(ServiceKey, Destination),
    DelDest(ServiceKey, DestKey),
}

impl Op {
    /// A description of the request for logs, e.g. "add destination 10.1.0.1:8080 to TCP
    /// 10.0.0.1:80".
    pub fn describe(&self) -> String {
        match self {
            Self::AddService(s) => {
                format!("add service {} (scheduler {})", s.key, s.config.scheduler)
            }
            Self::EditService(s) => {
                format!("edit service {} (scheduler {})", s.key, s.config.scheduler)
            }
            Self::DelService(key) => format!("delete service {key}"),
            Self::AddDest(key, d) => format!(
                "add destination {} to {key} ({}, weight {})",
                d.key, d.config.forwarding, d.config.weight
            ),
            Self::EditDest(key, d) => format!(
                "edit destination {} of {key} ({}, weight {})",
                d.key, d.config.forwarding, d.config.weight
            ),
            Self::DelDest(key, dest) => format!("delete destination {dest} from {key}"),
        }
    }

    fn kind(&self) -> OpKind {
        match self {
            Self::AddService(_) => OpKind::AddService,
            Self::EditService(_) => OpKind::EditService,
            Self::DelService(_) => OpKind::DelService,
            Self::AddDest(..) => OpKind::AddDest,
            Self::EditDest(..) => OpKind::EditDest,
            Self::DelDest(..) => OpKind::DelDest,
        }
    }

    fn validate(&self) -> Result<(), CodecError> {
        match self {
            Self::AddService(s) | Self::EditService(s) => s.validate(),
            Self::AddDest(key, d) | Self::EditDest(key, d) => d.validate(key),
            Self::DelService(_) | Self::DelDest(..) => Ok(()),
        }
    }

    fn message(&self) -> IpvsMessage {
        match self {
            Self::AddService(s) => IpvsMessage::NewService(s.clone()),
            Self::EditService(s) => IpvsMessage::SetService(s.clone()),
            Self::DelService(key) => IpvsMessage::DelService(*key),
            Self::AddDest(key, d) => IpvsMessage::NewDest(*key, *d),
            Self::EditDest(key, d) => IpvsMessage::SetDest(*key, *d),
            Self::DelDest(key, dest) => IpvsMessage::DelDest(*key, *dest),
        }
    }

    /// Whether a resent request failing with `errno` finds the table as the first attempt,
    /// whose reply was lost, left it: the object exists after an add, is gone after a delete.
    fn already_done(&self, errno: i32) -> bool {
        match self {
            Self::AddService(_) | Self::AddDest(..) => errno == libc::EEXIST,
            Self::DelService(_) => errno == libc::ESRCH,
            Self::DelDest(..) => errno == libc::ENOENT || errno == libc::ESRCH,
            Self::EditService(_) | Self::EditDest(..) => false,
        }
    }
}

fn kernel_error(op: String, kind: OpKind, errno: i32, detail: Option<String>) -> IpvsError {
    IpvsError::Kernel {
        op,
        errno,
        name: errno_names(errno).0,
        reason: reason(kind, errno),
        detail,
    }
}

fn copy_io(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(errno) => io::Error::from_raw_os_error(errno),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Datagram transport to the kernel; a fake kernel stands in for it in tests.
pub(crate) trait Transport: Send {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()>;
    /// One datagram into `buf`. Without `wait`, an empty queue is `WouldBlock`.
    fn recv(&mut self, buf: &mut Vec<u8>, wait: bool) -> io::Result<()>;
}

struct NetlinkTransport {
    socket: Socket,
}

impl NetlinkTransport {
    /// The socket, and how many error messages its receive buffer holds.
    fn open() -> io::Result<(Self, usize)> {
        let mut socket = Socket::new(NETLINK_GENERIC)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        if setsockopt(&socket, sockopt::RcvBufForce, &RCVBUF).is_err() {
            // Unprivileged: capped at rmem_max; batches shrink to match.
            socket.set_rx_buf_sz(RCVBUF as libc::c_int)?;
        }
        if setsockopt(&socket, sockopt::SndBufForce, &SNDBUF).is_err() {
            setsockopt(&socket, sockopt::SndBuf, &SNDBUF).map_err(io::Error::from)?;
        }
        // Errors then echo only the request's header, and may carry a message.
        let capped = socket.set_cap_ack(true).is_ok();
        let _ = socket.set_ext_ack(true);
        setsockopt(
            &socket,
            sockopt::ReceiveTimeout,
            &TimeVal::seconds(RECV_TIMEOUT_SECS),
        )
        .map_err(io::Error::from)?;
        let per_error = if capped {
            ACK_TRUESIZE
        } else {
            2 * ACK_TRUESIZE
        };
        let room = socket.get_rx_buf_sz()? / per_error;
        Ok((Self { socket }, room.clamp(1, MAX_BATCH)))
    }
}

impl Transport for NetlinkTransport {
    fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
        let sent = self.socket.send(datagram, 0)?;
        if sent != datagram.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("sent {sent} of {} bytes", datagram.len()),
            ));
        }
        Ok(())
    }

    fn recv(&mut self, buf: &mut Vec<u8>, wait: bool) -> io::Result<()> {
        buf.clear();
        buf.reserve(RECV_BUFFER);
        let flags = libc::MSG_TRUNC | if wait { 0 } else { libc::MSG_DONTWAIT };
        let len = match self.socket.recv(buf, flags) {
            Err(e) if wait && e.kind() == io::ErrorKind::WouldBlock => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no reply from the kernel within {RECV_TIMEOUT_SECS} s"),
                ));
            }
            result => result?,
        };
        if len > buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("netlink datagram of {len} bytes truncated to {}", buf.len()),
            ));
        }
        Ok(())
    }
}

/// One netlink message of a received datagram.
struct Frame<'a> {
    msg_type: u16,
    flags: u16,
    seq: u32,
    body: Body<'a>,
}

enum Body<'a> {
    Ack,
    Error {
        errno: i32,
        detail: Option<String>,
    },
    Done {
        code: i32,
    },
    /// The payload after the netlink header.
    Data(&'a [u8]),
    Ignored,
}

struct Frames<'a> {
    datagram: &'a [u8],
    pos: usize,
}

fn frames(datagram: &[u8]) -> Frames<'_> {
    Frames { datagram, pos: 0 }
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<Frame<'a>, CodecError>;

    fn next(&mut self) -> Option<Self::Item> {
        let rest = self.datagram.get(self.pos..).filter(|r| !r.is_empty())?;
        let buffer = match NetlinkBuffer::new_checked(rest) {
            Ok(buffer) => buffer,
            Err(e) => {
                self.pos = self.datagram.len();
                return Some(Err(CodecError::Netlink(e)));
            }
        };
        let len = buffer.length() as usize;
        self.pos = self.pos.saturating_add((len + 3) & !3);
        let (msg_type, flags, seq) = (
            buffer.message_type(),
            buffer.flags(),
            buffer.sequence_number(),
        );
        let payload = buffer.payload();
        let body = match msg_type {
            NLMSG_ERROR => {
                let Some(code) = payload.get(..4) else {
                    return Some(Err(CodecError::Length {
                        attr: "NLMSG_ERROR",
                        len: payload.len(),
                        expected: 4,
                    }));
                };
                let code = i32::from_ne_bytes([code[0], code[1], code[2], code[3]]);
                if code == 0 {
                    Body::Ack
                } else {
                    Body::Error {
                        errno: code.saturating_neg(),
                        detail: extended_ack_message(flags, payload),
                    }
                }
            }
            NLMSG_DONE => Body::Done {
                code: payload
                    .get(..4)
                    .map_or(0, |c| i32::from_ne_bytes([c[0], c[1], c[2], c[3]])),
            },
            NLMSG_NOOP | NLMSG_OVERRUN => Body::Ignored,
            _ => Body::Data(payload),
        };
        Some(Ok(Frame {
            msg_type,
            flags,
            seq,
            body,
        }))
    }
}

/// `NLMSGERR_ATTR_MSG` of an error: the TLVs follow the errno and the echoed request (only its
/// header when capped).
fn extended_ack_message(flags: u16, payload: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let echoed = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        let len = payload.get(4..8)?;
        (u32::from_ne_bytes([len[0], len[1], len[2], len[3]]) as usize + 3) & !3
    };
    let tlvs = payload.get(4usize.checked_add(echoed)?..)?;
    NlasIterator::new(tlvs)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == NLMSGERR_ATTR_MSG)
        .map(|nla| {
            let value = nla.value();
            let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
            String::from_utf8_lossy(&value[..end]).into_owned()
        })
}

/// What the replies to one batch told.
struct Acks {
    /// Batch positions the kernel refused, with errno and extended-ack message.
    errors: Vec<(usize, i32, Option<String>)>,
    /// The furthest batch position a reply arrived for.
    seen: Option<usize>,
    end: AckEnd,
}

enum AckEnd {
    /// The last message's reply arrived: every position has its outcome.
    Complete,
    /// Replies after `seen` were dropped for want of receive buffer.
    Overrun,
    Failed(io::Error),
    Garbled(CodecError),
}

pub struct IpvsClient {
    transport: Box<dyn Transport>,
    family_id: u16,
    seq: u32,
    writes: u64,
    max_batch: usize,
    send_buf: Vec<u8>,
    recv_buf: Vec<u8>,
}

impl IpvsClient {
    /// Opens a generic netlink socket and resolves the `IPVS` family.
    pub fn connect() -> Result<Self, IpvsError> {
        let (transport, room) = NetlinkTransport::open().map_err(|source| IpvsError::Io {
            op: "open a generic netlink socket".into(),
            source,
        })?;
        Self::with_transport(Box::new(transport), room)
    }

    pub(crate) fn with_transport(
        transport: Box<dyn Transport>,
        max_batch: usize,
    ) -> Result<Self, IpvsError> {
        let mut client = Self {
            transport,
            family_id: 0,
            seq: 1,
            writes: 0,
            max_batch: max_batch.clamp(1, MAX_BATCH),
            send_buf: Vec::with_capacity(BATCH_BYTES),
            recv_buf: Vec::with_capacity(RECV_BUFFER),
        };
        client.family_id = client.resolve_family()?;
        Ok(client)
    }

    /// The generic netlink family id the kernel gave IPVS.
    pub fn family_id(&self) -> u16 {
        self.family_id
    }

    /// Write requests sent so far (resends included).
    pub fn writes(&self) -> u64 {
        self.writes
    }

    fn next_seq(&mut self) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        seq
    }

    fn resolve_family(&mut self) -> Result<u16, IpvsError> {
        const OP: &str = "resolve the IPVS generic netlink family";
        let seq = self.next_seq();
        let mut genl = GenlMessage::from_payload(GenlCtrl {
            cmd: GenlCtrlCmd::GetFamily,
            nlas: vec![GenlCtrlAttrs::FamilyName(FAMILY_NAME.to_owned())],
        });
        genl.finalize();
        let mut request = NetlinkMessage::from(genl);
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
        request.header.sequence_number = seq;
        request.finalize();
        self.send_buf.clear();
        self.send_buf.resize(request.buffer_len(), 0);
        request.serialize(&mut self.send_buf);
        let io_error = |source| IpvsError::Io {
            op: OP.into(),
            source,
        };
        self.transport.send(&self.send_buf).map_err(io_error)?;
        let mut family = None;
        loop {
            self.transport
                .recv(&mut self.recv_buf, true)
                .map_err(io_error)?;
            for frame in frames(&self.recv_buf) {
                let frame = frame.map_err(|source| IpvsError::Decode {
                    op: OP.into(),
                    source,
                })?;
                if frame.seq != seq {
                    continue;
                }
                match frame.body {
                    // The controller's reply is parsed by hand: GenlCtrl refuses attributes
                    // it does not know, and newer kernels add some.
                    Body::Data(payload) if frame.msg_type == GENL_ID_CTRL => {
                        family = family.or_else(|| ctrl_family_id(payload));
                    }
                    Body::Error {
                        errno: libc::ENOENT,
                        ..
                    } => return Err(IpvsError::Unavailable),
                    Body::Error { errno, detail } => {
                        return Err(kernel_error(OP.into(), OpKind::Read, errno, detail));
                    }
                    Body::Ack => {
                        return family.ok_or_else(|| IpvsError::Decode {
                            op: OP.into(),
                            source: CodecError::Missing {
                                context: "CTRL_CMD_NEWFAMILY",
                                attr: "CTRL_ATTR_FAMILY_ID",
                            },
                        });
                    }
                    _ => {}
                }
            }
        }
    }

    /// `GET_INFO`: IPVS version and connection table size.
    pub fn info(&mut self) -> Result<IpvsInfo, IpvsError> {
        let what = || "read IPVS info".to_owned();
        let replies = self.transact(IpvsMessage::GetInfo, NLM_F_REQUEST | NLM_F_ACK, &what)?;
        replies
            .into_iter()
            .find_map(|m| match m {
                IpvsMessage::Info(info) => Some(info),
                _ => None,
            })
            .ok_or_else(|| IpvsError::Decode {
                op: what(),
                source: CodecError::Missing {
                    context: "GET_INFO reply",
                    attr: "IPVS_CMD_SET_INFO",
                },
            })
    }

    /// Every service of this network namespace (a dump; not atomic across dump chunks).
    pub fn services(&mut self) -> Result<Vec<Service>, IpvsError> {
        let what = || "list services".to_owned();
        Ok(self
            .dump(IpvsMessage::GetServices, &what)?
            .into_iter()
            .filter_map(|m| match m {
                IpvsMessage::NewService(s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// The destinations of one service; a service that does not exist has none.
    pub fn destinations(&mut self, key: &ServiceKey) -> Result<Vec<Destination>, IpvsError> {
        Ok(self
            .destination_entries(key)?
            .into_iter()
            .map(|e| e.destination)
            .collect())
    }

    /// The destinations of one service with their connection counters.
    pub fn destination_entries(&mut self, key: &ServiceKey) -> Result<Vec<DestEntry>, IpvsError> {
        let what = || format!("list destinations of {key}");
        Ok(self
            .dump(IpvsMessage::GetDests(*key), &what)?
            .into_iter()
            .filter_map(|m| match m {
                IpvsMessage::DestEntry(e) => Some(e),
                _ => None,
            })
            .collect())
    }

    fn dump(
        &mut self,
        request: IpvsMessage,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        for _ in 0..DUMP_ATTEMPTS {
            match self.transact(request.clone(), NLM_F_REQUEST | NLM_F_DUMP, what) {
                Err(IpvsError::Kernel {
                    errno: libc::EINTR, ..
                }) => continue,
                result => return result,
            }
        }
        Err(kernel_error(what(), OpKind::Read, libc::EINTR, None))
    }

    /// Sends one request and collects its replies until the acknowledgement (or the end of
    /// the dump). An interrupted dump is reported as `EINTR`.
    fn transact(
        &mut self,
        request: IpvsMessage,
        flags: u16,
        what: &dyn Fn() -> String,
    ) -> Result<Vec<IpvsMessage>, IpvsError> {
        let seq = self.next_seq();
        self.send_buf.clear();
        encode_message(request, self.family_id, flags, seq, &mut self.send_buf);
        let io_error = |source| IpvsError::Io { op: what(), source };
        let decode_error = |source| IpvsError::Decode { op: what(), source };
        self.transport.send(&self.send_buf).map_err(io_error)?;
        let mut replies = Vec::new();
        let mut interrupted = false;
        // A reply that does not decode still lets the rest of a dump be read: the kernel keeps
        // the dump running (and refuses the next one with EBUSY) until it is read to the end.
        let mut undecodable = None;
        loop {
            self.transport
                .recv(&mut self.recv_buf, true)
                .map_err(io_error)?;
            for frame in frames(&self.recv_buf) {
                let frame = frame.map_err(decode_error)?;
                if frame.seq != seq {
                    continue;
                }
                interrupted |= frame.flags & NLM_F_DUMP_INTR != 0;
                match frame.body {
                    Body::Data(payload) if frame.msg_type == self.family_id => {
                        let decoded = GenlHeader::parse(payload)
                            .map_err(CodecError::Netlink)
                            .and_then(|header| {
                                let attrs = payload.get(GENL_HEADER_LEN..).unwrap_or_default();
                                IpvsMessage::decode(&header, attrs)
                            });
                        match decoded {
                            Ok(message) => replies.push(message),
                            Err(e) => {
                                undecodable.get_or_insert(e);
                            }
                        }
                    }
                    Body::Error { errno, detail } => {
                        return Err(kernel_error(what(), OpKind::Read, errno, detail));
                    }
                    Body::Done { code } if code < 0 => {
                        return Err(kernel_error(
                            what(),
                            OpKind::Read,
                            code.saturating_neg(),
                            None,
                        ));
                    }
                    Body::Done { .. } | Body::Ack => {
                        if let Some(e) = undecodable {
                            return Err(decode_error(e));
                        }
                        if interrupted {
                            return Err(kernel_error(what(), OpKind::Read, libc::EINTR, None));
                        }
                        return Ok(replies);
                    }
                    Body::Data(_) | Body::Ignored => {}
                }
            }
        }
    }

    /// Runs `ops` in order and returns one result per op. A refused op does not stop the
    /// ones after it (an op that depends on it fails in turn, e.g. `ESRCH`).
    pub fn execute(&mut self, ops: &[Op]) -> Vec<Result<(), IpvsError>> {
        let mut results: Vec<Result<(), IpvsError>> = Vec::with_capacity(ops.len());
        let mut pending = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match op.validate() {
                Ok(()) => {
                    pending.push(i);
                    results.push(Ok(()));
                }
                Err(source) => results.push(Err(IpvsError::Invalid {
                    op: op.describe(),
                    source,
                })),
            }
        }
        let mut next = 0;
        while next < pending.len() {
            let (base, count) = self.fill_batch(ops, &pending[next..]);
            self.run_batch(ops, &pending[next..next + count], base, &mut results);
            next += count;
        }
        results
    }

    /// Encodes as many of `pending` as fit one batch; returns the first sequence number and
    /// how many were encoded (at least one).
    fn fill_batch(&mut self, ops: &[Op], pending: &[usize]) -> (u32, usize) {
        self.send_buf.clear();
        let base = self.seq;
        let mut count = 0;
        let mut last = 0;
        for &i in pending {
            if count == self.max_batch || self.send_buf.len() + MAX_MESSAGE > BATCH_BYTES {
                break;
            }
            last = self.send_buf.len();
            let seq = base.wrapping_add(count as u32);
            encode_message(
                ops[i].message(),
                self.family_id,
                NLM_F_REQUEST,
                seq,
                &mut self.send_buf,
            );
            count += 1;
        }
        // Only the last message asks for an acknowledgement; see the module comment.
        let flags = &mut self.send_buf[last + 6..last + 8];
        let acked = u16::from_ne_bytes([flags[0], flags[1]]) | NLM_F_ACK;
        flags.copy_from_slice(&acked.to_ne_bytes());
        self.seq = base.wrapping_add(count as u32);
        (base, count)
    }

    fn run_batch(
        &mut self,
        ops: &[Op],
        batch: &[usize],
        base: u32,
        results: &mut [Result<(), IpvsError>],
    ) {
        if let Err(e) = self.transport.send(&self.send_buf) {
            for &i in batch {
                results[i] = Err(IpvsError::Io {
                    op: ops[i].describe(),
                    source: copy_io(&e),
                });
            }
            return;
        }
        self.writes += batch.len() as u64;
        let acks = self.collect_acks(base, batch.len());
        let mut refused = vec![false; batch.len()];
        for (k, errno, detail) in acks.errors {
            let op = &ops[batch[k]];
            refused[k] = true;
            results[batch[k]] = Err(kernel_error(op.describe(), op.kind(), errno, detail));
        }
        let known = match acks.end {
            AckEnd::Complete => batch.len(),
            _ => acks.seen.map_or(0, |k| k + 1),
        };
        if let AckEnd::Overrun = acks.end {
            // As many replies as did fit, at most half the batch that did not.
            let fitted = refused.iter().filter(|r| **r).count();
            self.max_batch = fitted.min(self.max_batch / 2).max(1);
        }
        for k in known..batch.len() {
            if refused[k] {
                continue;
            }
            let op = &ops[batch[k]];
            results[batch[k]] = match &acks.end {
                AckEnd::Complete => Ok(()),
                AckEnd::Overrun => self.resend(op),
                AckEnd::Failed(e) => Err(IpvsError::Io {
                    op: op.describe(),
                    source: copy_io(e),
                }),
                AckEnd::Garbled(e) => Err(IpvsError::Decode {
                    op: op.describe(),
                    source: CodecError::Invalid {
                        field: "reply",
                        reason: e.to_string(),
                    },
                }),
            };
        }
    }

    /// Sends one op whose first reply was lost. The first attempt did reach the kernel, so
    /// "already exists" after an add and "no such" after a delete mean it took effect.
    fn resend(&mut self, op: &Op) -> Result<(), IpvsError> {
        let base = self.next_seq();
        self.send_buf.clear();
        encode_message(
            op.message(),
            self.family_id,
            NLM_F_REQUEST | NLM_F_ACK,
            base,
            &mut self.send_buf,
        );
        self.transport
            .send(&self.send_buf)
            .map_err(|source| IpvsError::Io {
                op: op.describe(),
                source,
            })?;
        self.writes += 1;
        let acks = self.collect_acks(base, 1);
        match (acks.end, acks.errors.into_iter().next()) {
            (AckEnd::Complete, Some((_, errno, _))) if op.already_done(errno) => Ok(()),
            (AckEnd::Complete, Some((_, errno, detail))) => {
                Err(kernel_error(op.describe(), op.kind(), errno, detail))
            }
            (AckEnd::Complete, None) => Ok(()),
            (AckEnd::Overrun, _) => {
                Err(kernel_error(op.describe(), op.kind(), libc::ENOBUFS, None))
            }
            (AckEnd::Failed(source), _) => Err(IpvsError::Io {
                op: op.describe(),
                source,
            }),
            (AckEnd::Garbled(source), _) => Err(IpvsError::Decode {
                op: op.describe(),
                source,
            }),
        }
    }

    /// Reads the replies to the batch `base .. base + count` until the last one's.
    fn collect_acks(&mut self, base: u32, count: usize) -> Acks {
        let mut acks = Acks {
            errors: Vec::new(),
            seen: None,
            end: AckEnd::Complete,
        };
        let mut overrun = false;
        loop {
            match self.transport.recv(&mut self.recv_buf, !overrun) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Reported before the replies still queued; those are all there is,
                    // since the kernel queued them during sendmsg.
                    overrun = true;
                    continue;
                }
                Err(e) if overrun && e.kind() == io::ErrorKind::WouldBlock => {
                    acks.end = AckEnd::Overrun;
                    return acks;
                }
                Err(e) => {
                    acks.end = AckEnd::Failed(e);
                    return acks;
                }
            }
            for frame in frames(&self.recv_buf) {
                let frame = match frame {
                    Ok(frame) => frame,
                    Err(e) => {
                        acks.end = AckEnd::Garbled(e);
                        return acks;
                    }
                };
                let k = frame.seq.wrapping_sub(base) as usize;
                if k >= count {
                    continue;
                }
                match frame.body {
                    Body::Ack => {}
                    Body::Error { errno, detail } => acks.errors.push((k, errno, detail)),
                    _ => continue,
                }
                acks.seen = Some(acks.seen.map_or(k, |s| s.max(k)));
                if k == count - 1 {
                    return acks;
                }
            }
        }
    }
}

fn ctrl_family_id(payload: &[u8]) -> Option<u16> {
    NlasIterator::new(payload.get(GENL_HEADER_LEN..)?)
        .filter_map(Result::ok)
        .find(|nla| nla.kind() == CTRL_ATTR_FAMILY_ID)
        .and_then(|nla| <[u8; 2]>::try_from(nla.value()).ok())
        .map(u16::from_ne_bytes)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, VecDeque};
    use std::net::IpAddr;
    use std::sync::{Arc, Mutex};

    use netlink_packet_core::NLM_F_MULTIPART;

    use super::super::netlink::{
        AddrFamily, DestConfig, DestCounters, Forwarding, Protocol, ServiceConfig, decode_message,
    };
    use super::*;

    const FAMILY: u16 = 0x21;

    type Dests = BTreeMap<DestKey, DestConfig>;

    /// The kernel as far as the client can tell: `ip_vs_genl_set_cmd`'s answers, and a
    /// receive queue of `room` datagrams that drops what does not fit and then reports
    /// `ENOBUFS` once, ahead of what it still holds.
    struct FakeKernel {
        family: Option<u16>,
        table: BTreeMap<ServiceKey, (ServiceConfig, Dests)>,
        queue: VecDeque<Vec<u8>>,
        room: usize,
        overrun: bool,
        /// Drops replies without reporting it, like a kernel that never answers.
        silent: bool,
        datagrams_in: usize,
        dumps: usize,
        interrupt_dumps: usize,
        /// Starts the next dump with an entry that does not decode.
        garble_dump: bool,
        dump_chunk: usize,
    }

    #[derive(Clone)]
    struct Fake(Arc<Mutex<FakeKernel>>);

    impl Fake {
        fn new() -> Self {
            Self(Arc::new(Mutex::new(FakeKernel {
                family: Some(FAMILY),
                table: BTreeMap::new(),
                queue: VecDeque::new(),
                room: 10_000,
                overrun: false,
                silent: false,
                datagrams_in: 0,
                dumps: 0,
                interrupt_dumps: 0,
                garble_dump: false,
                dump_chunk: 3,
            })))
        }

        fn kernel(&self) -> std::sync::MutexGuard<'_, FakeKernel> {
            self.0.lock().unwrap()
        }

        fn client(&self) -> IpvsClient {
            IpvsClient::with_transport(Box::new(self.clone()), 64).unwrap()
        }
    }

    impl Transport for Fake {
        fn send(&mut self, datagram: &[u8]) -> io::Result<()> {
            self.kernel().receive(datagram);
            Ok(())
        }

        fn recv(&mut self, buf: &mut Vec<u8>, wait: bool) -> io::Result<()> {
            let mut kernel = self.kernel();
            if std::mem::take(&mut kernel.overrun) {
                return Err(io::Error::from_raw_os_error(libc::ENOBUFS));
            }
            match kernel.queue.pop_front() {
                Some(datagram) => {
                    buf.clear();
                    buf.extend_from_slice(&datagram);
                    Ok(())
                }
                None if wait => Err(io::Error::new(io::ErrorKind::TimedOut, "nothing queued")),
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
    }

    fn header(len: usize, msg_type: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(len);
        out.extend_from_slice(&(len as u32).to_ne_bytes());
        out.extend_from_slice(&msg_type.to_ne_bytes());
        out.extend_from_slice(&flags.to_ne_bytes());
        out.extend_from_slice(&seq.to_ne_bytes());
        out.extend_from_slice(&77u32.to_ne_bytes());
        out
    }

    /// An acknowledgement or error as `netlink_ack` writes it with `NETLINK_CAP_ACK`.
    fn ack(request: &[u8], errno: i32) -> Vec<u8> {
        let seq = u32::from_ne_bytes(request[8..12].try_into().unwrap());
        let flags = if errno == 0 { 0 } else { NLM_F_CAPPED };
        let mut out = header(36, NLMSG_ERROR, flags, seq);
        out.extend_from_slice(&(-errno).to_ne_bytes());
        out.extend_from_slice(&request[..16]);
        out
    }

    fn done(seq: u32, flags: u16) -> Vec<u8> {
        let mut out = header(20, NLMSG_DONE, NLM_F_MULTIPART | flags, seq);
        out.extend_from_slice(&0i32.to_ne_bytes());
        out
    }

    impl FakeKernel {
        fn queue(&mut self, datagram: Vec<u8>) {
            if self.silent {
                return;
            }
            if self.queue.len() >= self.room {
                self.overrun = true;
            } else {
                self.queue.push_back(datagram);
            }
        }

        fn receive(&mut self, datagram: &[u8]) {
            self.datagrams_in += 1;
            let mut pos = 0;
            while pos + 16 <= datagram.len() {
                let len = u32::from_ne_bytes(datagram[pos..pos + 4].try_into().unwrap()) as usize;
                let request = &datagram[pos..pos + len];
                pos += (len + 3) & !3;
                let msg_type = u16::from_ne_bytes([request[4], request[5]]);
                let flags = u16::from_ne_bytes([request[6], request[7]]);
                let seq = u32::from_ne_bytes(request[8..12].try_into().unwrap());
                if msg_type == GENL_ID_CTRL {
                    self.resolve(request);
                    continue;
                }
                let (_, message) = decode_message(request, FAMILY).unwrap();
                if flags & NLM_F_DUMP != 0 {
                    self.dump(&message, seq);
                    continue;
                }
                if message == IpvsMessage::GetInfo {
                    let mut reply = Vec::new();
                    let info = IpvsMessage::Info(IpvsInfo {
                        version: 0x010201,
                        conn_tab_size: 4096,
                    });
                    encode_message(info, FAMILY, 0, seq, &mut reply);
                    self.queue(reply);
                }
                let errno = self.apply(&message);
                if errno != 0 || flags & NLM_F_ACK != 0 {
                    self.queue(ack(request, errno));
                }
            }
        }

        fn resolve(&mut self, request: &[u8]) {
            let Some(id) = self.family else {
                self.queue(ack(request, libc::ENOENT));
                return;
            };
            let seq = u32::from_ne_bytes(request[8..12].try_into().unwrap());
            // CTRL_CMD_NEWFAMILY with the id, a name, and an attribute GenlCtrl would refuse.
            let attrs: Vec<u8> = [
                [6u8, 0, 1, 0].as_slice(),
                &id.to_ne_bytes(),
                &[0, 0],
                &[9, 0, 2, 0],
                b"IPVS\0",
                &[0, 0, 0],
                &[8, 0, 99, 0, 1, 2, 3, 4],
            ]
            .concat();
            let mut reply = header(20 + attrs.len(), GENL_ID_CTRL, 0, seq);
            reply.extend_from_slice(&[1, 2, 0, 0]);
            reply.extend_from_slice(&attrs);
            self.queue(reply);
            self.queue(ack(request, 0));
        }

        fn apply(&mut self, message: &IpvsMessage) -> i32 {
            let table = &mut self.table;
            match message {
                IpvsMessage::GetInfo => 0,
                IpvsMessage::NewService(s) if table.contains_key(&s.key) => libc::EEXIST,
                IpvsMessage::NewService(s) => {
                    table.insert(s.key, (s.config.clone(), Dests::new()));
                    0
                }
                IpvsMessage::SetService(s) => match table.get_mut(&s.key) {
                    Some(entry) => {
                        entry.0 = s.config.clone();
                        0
                    }
                    None => libc::ESRCH,
                },
                IpvsMessage::DelService(key) => match table.remove(key) {
                    Some(_) => 0,
                    None => libc::ESRCH,
                },
                IpvsMessage::NewDest(key, d) => match table.get_mut(key) {
                    None => libc::ESRCH,
                    Some((_, dests)) if dests.contains_key(&d.key) => libc::EEXIST,
                    Some((_, dests)) => {
                        dests.insert(d.key, d.config);
                        0
                    }
                },
                IpvsMessage::SetDest(key, d) => match table.get_mut(key) {
                    None => libc::ESRCH,
                    Some((_, dests)) => match dests.get_mut(&d.key) {
                        Some(config) => {
                            *config = d.config;
                            0
                        }
                        None => libc::ENOENT,
                    },
                },
                IpvsMessage::DelDest(key, d) => match table.get_mut(key) {
                    None => libc::ESRCH,
                    Some((_, dests)) => match dests.remove(d) {
                        Some(_) => 0,
                        None => libc::ENOENT,
                    },
                },
                other => panic!("the fake kernel does not take {other:?}"),
            }
        }

        fn dump(&mut self, request: &IpvsMessage, seq: u32) {
            self.dumps += 1;
            let entries: Vec<IpvsMessage> = match request {
                IpvsMessage::GetServices => self
                    .table
                    .iter()
                    .map(|(key, (config, _))| {
                        IpvsMessage::NewService(Service {
                            key: *key,
                            config: config.clone(),
                        })
                    })
                    .collect(),
                IpvsMessage::GetDests(key) => self
                    .table
                    .get(key)
                    .map(|(_, dests)| {
                        dests
                            .iter()
                            .map(|(k, c)| {
                                IpvsMessage::DestEntry(DestEntry {
                                    destination: Destination {
                                        key: *k,
                                        config: *c,
                                    },
                                    counters: DestCounters {
                                        active_conns: 1,
                                        ..DestCounters::default()
                                    },
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                other => panic!("no dump of {other:?}"),
            };
            let flags = if self.interrupt_dumps > 0 {
                self.interrupt_dumps -= 1;
                NLM_F_MULTIPART | NLM_F_DUMP_INTR
            } else {
                NLM_F_MULTIPART
            };
            let mut chunks: Vec<Vec<u8>> = entries
                .chunks(self.dump_chunk)
                .map(|chunk| {
                    let mut datagram = Vec::new();
                    for entry in chunk {
                        encode_message(entry.clone(), FAMILY, flags, seq, &mut datagram);
                    }
                    datagram
                })
                .collect();
            if std::mem::take(&mut self.garble_dump) {
                let mut bogus = header(20, FAMILY, flags, seq);
                bogus.extend_from_slice(&[1, 1, 0, 0]); // NEW_SERVICE without a service
                chunks.insert(0, bogus);
            }
            // netlink_dump appends NLMSG_DONE to the last chunk when it fits.
            match chunks.last_mut() {
                Some(last) => last.extend_from_slice(&done(seq, flags & NLM_F_DUMP_INTR)),
                None => chunks.push(done(seq, 0)),
            }
            for chunk in chunks {
                self.queue(chunk);
            }
        }
    }

    fn service(n: u32) -> Service {
        Service {
            key: ServiceKey::Addr {
                protocol: Protocol::Tcp,
                addr: IpAddr::V4((0x0a00_0000 + n).into()),
                port: 80,
            },
            config: ServiceConfig::new("rr", AddrFamily::V4),
        }
    }

    fn destination(n: u32, weight: u32) -> Destination {
        Destination {
            key: DestKey {
                addr: IpAddr::V4((0x0a01_0000 + n).into()),
                port: 8080,
            },
            config: DestConfig::new(Forwarding::Masquerade, weight),
        }
    }

    #[test]
    fn connect_here_matches_whether_the_kernel_has_ipvs() {
        // This host's kernel has no IPVS; the VM's has.
        let loaded = std::path::Path::new("/proc/net/ip_vs").exists();
        match IpvsClient::connect() {
            Err(IpvsError::Unavailable) if !loaded => {}
            Ok(client) if loaded => assert_ne!(client.family_id(), 0),
            Err(e) => panic!("ip_vs loaded: {loaded}; {e}"),
            Ok(_) => panic!("IPVS resolved though /proc/net/ip_vs is missing"),
        }
        assert_eq!(
            IpvsError::Unavailable.to_string(),
            "IPVS is not available in this kernel (module ip_vs not loaded?)"
        );
        assert_eq!(IpvsError::Unavailable.metric_label(), "unavailable");
    }

    #[test]
    fn resolves_the_family_tolerating_new_controller_attributes() {
        let fake = Fake::new();
        assert_eq!(fake.client().family_id(), FAMILY);
        fake.kernel().family = None;
        assert!(matches!(
            IpvsClient::with_transport(Box::new(fake.clone()), 64),
            Err(IpvsError::Unavailable)
        ));
    }

    #[test]
    fn programs_a_large_table_in_few_datagrams() {
        let fake = Fake::new();
        let mut client = fake.client();
        let mut ops = Vec::new();
        for s in 0..1000 {
            ops.push(Op::AddService(service(s)));
            for d in 0..10 {
                ops.push(Op::AddDest(service(s).key, destination(s * 10 + d, 1)));
            }
        }
        let before = fake.kernel().datagrams_in;
        let results = client.execute(&ops);
        assert_eq!(results.len(), ops.len());
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(client.writes(), ops.len() as u64);
        let datagrams = fake.kernel().datagrams_in - before;
        // 64 messages per batch here (the receive-buffer bound a real socket computes).
        assert_eq!(datagrams, ops.len().div_ceil(64), "{datagrams} datagrams");
        assert!(
            fake.kernel().queue.is_empty(),
            "every acknowledgement consumed"
        );

        let mut services = client.services().unwrap();
        services.sort();
        let expected: Vec<Service> = (0..1000).map(service).collect();
        let mut expected_sorted = expected.clone();
        expected_sorted.sort();
        assert_eq!(services, expected_sorted);
        let dests = client.destinations(&service(7).key).unwrap();
        assert_eq!(
            dests,
            (70..80).map(|n| destination(n, 1)).collect::<Vec<_>>()
        );
        let entries = client.destination_entries(&service(7).key).unwrap();
        assert_eq!(entries[0].counters.active_conns, 1);

        // Reads are no writes; an empty execute sends nothing.
        let datagrams = fake.kernel().datagrams_in;
        assert!(client.execute(&[]).is_empty());
        assert_eq!(client.writes(), ops.len() as u64);
        assert_eq!(fake.kernel().datagrams_in, datagrams);
    }

    #[test]
    fn a_refused_op_does_not_block_the_others() {
        let fake = Fake::new();
        let mut client = fake.client();
        let a = service(1);
        let missing = service(2).key;
        let mut fwmark0 = service(3);
        fwmark0.key = ServiceKey::Fwmark {
            family: AddrFamily::V4,
            mark: 0,
        };
        let ops = [
            Op::AddService(a.clone()),
            Op::AddService(a.clone()),
            Op::AddDest(missing, destination(1, 1)),
            Op::AddService(fwmark0),
            Op::AddDest(a.key, destination(2, 1)),
            Op::DelDest(a.key, destination(3, 1).key),
            Op::EditService(service(4)),
            Op::EditDest(a.key, destination(2, 0)),
        ];
        let results = client.execute(&ops);
        let errnos: Vec<Option<i32>> = results
            .iter()
            .map(|r| r.as_ref().err().map(|e| e.errno().unwrap_or(-1)))
            .collect();
        assert_eq!(
            errnos,
            [
                None,
                Some(libc::EEXIST),
                Some(libc::ESRCH),
                Some(-1),
                None,
                Some(libc::ENOENT),
                Some(libc::ESRCH),
                None
            ]
        );
        assert_eq!(client.writes(), 7, "the invalid op is not sent");
        assert_eq!(
            fake.kernel().table[&a.key].1[&destination(2, 0).key].weight,
            0,
            "the edit after the failures took effect"
        );
        let text: Vec<String> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(ToString::to_string))
            .collect();
        assert_eq!(
            text,
            [
                "add service TCP 10.0.0.1:80 (scheduler rr): the service already exists (EEXIST)",
                "add destination 10.1.0.1:8080 to TCP 10.0.0.2:80 (masquerade, weight 1): no such service (ESRCH)",
                "add service fwmark 0 (IPv4) (scheduler rr): fwmark: must not be 0 (the kernel reads mark 0 as no mark)",
                "delete destination 10.1.0.3:8080 from TCP 10.0.0.1:80: no such destination (ENOENT)",
                "edit service TCP 10.0.0.4:80 (scheduler rr): no such service (ESRCH)",
            ]
        );
        let labels: Vec<&str> = results
            .iter()
            .filter_map(|r| r.as_ref().err().map(IpvsError::metric_label))
            .collect();
        assert_eq!(labels, ["eexist", "esrch", "invalid", "enoent", "esrch"]);
        assert!(results.iter().flatten().count() == 3);
        assert!(!results[1].as_ref().unwrap_err().is_transient());
    }

    #[test]
    fn lost_replies_are_recovered_by_sending_again() {
        let fake = Fake::new();
        let mut client = fake.client();
        let existing: Vec<Service> = (1..=3).map(service).collect();
        let setup: Vec<Op> = existing.iter().cloned().map(Op::AddService).collect();
        assert!(client.execute(&setup).iter().all(Result::is_ok));
        let writes = client.writes();

        // Room for two replies: the errors of ops 0 and 1 arrive, the rest is dropped.
        fake.kernel().room = 2;
        let mut ops: Vec<Op> = existing.iter().cloned().map(Op::AddService).collect();
        ops.extend((0..6).map(|n| Op::AddDest(existing[0].key, destination(n, 1))));
        let results = client.execute(&ops);
        assert_eq!(results[0].as_ref().unwrap_err().errno(), Some(libc::EEXIST));
        assert_eq!(results[1].as_ref().unwrap_err().errno(), Some(libc::EEXIST));
        // Op 2 failed too, but its error was lost; sent again, "exists" is what an add wants.
        assert!(results[2..].iter().all(Result::is_ok), "{results:?}");
        assert_eq!(fake.kernel().table[&existing[0].key].1.len(), 6);
        assert_eq!(client.writes() - writes, 9 + 7, "ops 2..9 were sent twice");
        assert_eq!(
            client.max_batch, 2,
            "batches shrink to the replies that fitted"
        );
        assert!(fake.kernel().queue.is_empty());

        // A delete whose reply is lost and whose second attempt finds nothing has succeeded.
        fake.kernel().room = 0;
        let results = client.execute(&[Op::DelService(existing[2].key)]);
        assert!(matches!(
            &results[0],
            Err(IpvsError::Kernel {
                errno: libc::ENOBUFS,
                ..
            })
        ));
        fake.kernel().room = 1;
        let results = client.execute(&[
            Op::DelService(existing[1].key),
            Op::DelService(existing[1].key),
        ]);
        assert!(results[0].is_ok());
        assert_eq!(results[1].as_ref().unwrap_err().errno(), Some(libc::ESRCH));
    }

    #[test]
    fn interrupted_dumps_start_over() {
        let fake = Fake::new();
        let mut client = fake.client();
        let ops: Vec<Op> = (0..10).map(|n| Op::AddService(service(n))).collect();
        assert!(client.execute(&ops).iter().all(Result::is_ok));
        fake.kernel().interrupt_dumps = 2;
        assert_eq!(client.services().unwrap().len(), 10);
        assert_eq!(fake.kernel().dumps, 3);
        fake.kernel().interrupt_dumps = DUMP_ATTEMPTS;
        let err = client.services().unwrap_err();
        assert_eq!(err.errno(), Some(libc::EINTR));
        assert!(err.is_transient());
        // An entry that does not decode fails the listing, which is still read to its end.
        fake.kernel().garble_dump = true;
        let err = client.services().unwrap_err();
        assert_eq!(err.metric_label(), "decode", "{err}");
        assert!(fake.kernel().queue.is_empty());
        assert_eq!(client.services().unwrap().len(), 10);
        // A missing service has no destinations rather than an error, as in the kernel.
        assert!(client.destinations(&service(99).key).unwrap().is_empty());
    }

    #[test]
    fn info_reports_the_version() {
        let fake = Fake::new();
        let info = fake.client().info().unwrap();
        assert_eq!(info.version_string(), "1.2.1");
        assert_eq!(info.conn_tab_size, 4096);
    }

    #[test]
    fn reads_time_out_instead_of_hanging() {
        let fake = Fake::new();
        let mut client = fake.client();
        // A reply dropped for want of buffer space is reported, and worth a retry.
        fake.kernel().room = 0;
        let err = client.info().unwrap_err();
        assert!(err.is_transient(), "{err}");
        fake.kernel().room = 10;
        assert!(client.info().is_ok());
        // A request nobody answers.
        fake.kernel().silent = true;
        let err = client.info().unwrap_err();
        assert!(
            matches!(&err, IpvsError::Io { source, .. } if source.kind() == io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(err.is_transient());
        assert_eq!(err.metric_label(), "io");
    }

    #[test]
    fn errors_classify_for_retries_and_metrics() {
        let kernel = |errno| kernel_error("op".into(), OpKind::AddDest, errno, None);
        for errno in [
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EBUSY,
            libc::EAGAIN,
            libc::EINTR,
        ] {
            assert!(kernel(errno).is_transient(), "{errno}");
        }
        for errno in [
            libc::EEXIST,
            libc::ENOENT,
            libc::EINVAL,
            libc::ESRCH,
            libc::EPERM,
        ] {
            assert!(!kernel(errno).is_transient(), "{errno}");
        }
        assert_eq!(kernel(libc::EINVAL).metric_label(), "einval");
        assert_eq!(kernel(4095).metric_label(), "kernel_other");
        assert_eq!(
            kernel_error(
                "add service TCP 10.0.0.1:80".into(),
                OpKind::AddService,
                libc::ENOENT,
                Some("hint".into())
            )
            .to_string(),
            "add service TCP 10.0.0.1:80: scheduler or persistence engine not found \
             (no ip_vs_<name> module?) (ENOENT): hint"
        );
    }

    #[test]
    fn frames_read_extended_acks_and_survive_garbage() {
        // An uncapped error: errno, the whole request echoed, then NLMSGERR_ATTR_MSG.
        let request = header(24, FAMILY, NLM_F_REQUEST, 5)
            .into_iter()
            .chain([1, 1, 0, 0, 0, 0, 0, 0])
            .collect::<Vec<u8>>();
        let message = b"Attribute failed policy validation\0";
        let tlv_len = 4 + message.len();
        let mut error = header(
            16 + 4 + request.len() + ((tlv_len + 3) & !3),
            NLMSG_ERROR,
            NLM_F_ACK_TLVS,
            5,
        );
        error.extend_from_slice(&(-libc::EINVAL).to_ne_bytes());
        error.extend_from_slice(&request);
        error.extend_from_slice(&(tlv_len as u16).to_ne_bytes());
        error.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        error.extend_from_slice(message);
        error.resize((error.len() + 3) & !3, 0);
        let frame = frames(&error).next().unwrap().unwrap();
        match frame.body {
            Body::Error { errno, detail } => {
                assert_eq!(errno, libc::EINVAL);
                assert_eq!(
                    detail.as_deref(),
                    Some("Attribute failed policy validation")
                );
            }
            _ => panic!("not an error"),
        }
        let mut rng = 0x1234_5678_9abc_def0u64;
        for round in 0..20_000 {
            let mut bytes = if round % 2 == 0 {
                error.clone()
            } else {
                done(3, 0)
            };
            for _ in 0..3 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng as usize) % bytes.len();
                bytes[i] = (rng >> 32) as u8;
            }
            bytes.truncate((rng >> 40) as usize % (bytes.len() + 1));
            // Bounded: a frame always advances, and errors end the walk.
            assert!(frames(&bytes).take(100).count() < 100);
        }
    }
}
