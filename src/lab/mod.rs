//! A real multi-node VRRP lab in network namespaces (`ferrovip lab`, e2e tests, benchmarks).
//!
//! - [`netns`]: [`Lab`] builds a switch namespace holding a Linux bridge and N node namespaces
//!   wired to it with veth pairs, runs processes inside the nodes, and tears everything down
//!   on drop (also when a test panics).
//! - [`wire`]: decoding of the frames the lab watches (VRRP adverts, gratuitous ARP,
//!   unsolicited NA) into [`Event`]s.
//! - [`sniffer`]: [`Sniffer`] captures on the bridge from a thread that alone enters the switch
//!   namespace, and timestamps every frame when it is received.
//! - [`measure`]: who is master on the wire, failover and preemption timings, and the RFC 5798
//!   timer figures to compare them with.
//! - [`run`]: [`run_lab`], the human-facing demonstration behind `ferrovip lab`.
//! - [`scale`]: [`run_scale`], `ferrovip lab --vips N`: thousands of VIPs in sharing groups,
//!   each address's takeover measured (configured on the new master, announced on the wire).
//!
//! Everything here needs root (network namespaces, AF_PACKET). The harness drives the
//! `ip` binary from iproute2 because it is the harness, not the agent; it is the only program
//! the lab itself runs (sysctls are written through /proc/sys, pings are the lab's own ICMP
//! echo), and [`Lab::create`] says which package to install when it is missing.
//!
//! The harnesses only tests and benchmarks use (a real kube-apiserver, a qemu VM with IPVS)
//! are not here but in the dev-only crate `ferrovip-e2e` (`e2e/harness`), so release builds
//! do not compile them.

pub mod measure;
pub mod netns;
pub mod ping;
pub mod run;
pub mod scale;
pub mod sniffer;
pub mod wire;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use measure::{
    Failover, FailoverQuery, Preemption, analyze_failover, analyze_preemption, current_master,
    master_down_interval, masters_since, measure_failover, measure_failover_async, skew_time,
};
pub use netns::{Lab, LabSpec, NodeInfo, ProcId, log_tail};
pub use ping::{PingTally, ping_command};
pub use run::{FailoverRound, GracefulRound, LabOptions, LabReport, NodeSummary, Rejoin, run_lab};
pub use scale::{Daemon, ScaleOptions, ScaleReport, ScaleRound, Spread, run_scale};
pub use sniffer::Sniffer;
pub use wire::{Event, EventKind, SeenAdvert, parse_frame};

/// Everything that can go wrong while building, driving or measuring a lab.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (network namespaces, veth, AF_PACKET); run it with sudo")]
    NotRoot,
    #[error("the lab needs `{program}` on PATH: install the Debian/Ubuntu package {package}")]
    MissingTool {
        program: &'static str,
        package: &'static str,
    },
    #[error("invalid lab setup: {0}")]
    InvalidSpec(String),
    #[error("could not run `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("unexpected output from `{command}`: {detail}")]
    Output { command: String, detail: String },
    #[error("{context}: {}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not enter network namespace {netns}")]
    Setns {
        netns: String,
        #[source]
        source: nix::Error,
    },
    #[error("packet socket on {interface} in {netns} failed")]
    PacketSocket {
        netns: String,
        interface: String,
        #[source]
        source: std::io::Error,
    },
    #[error("ICMP echo socket in {netns} failed")]
    Icmp {
        netns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not signal process {pid}")]
    Signal {
        pid: i32,
        #[source]
        source: nix::Error,
    },
    #[error("unknown process {0} (not started by this lab)")]
    UnknownProcess(ProcId),
    #[error("could not install the {signal} handler")]
    SignalHandler {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent on {node} exited ({status}); its log ends with:\n{log_tail}")]
    AgentExited {
        node: String,
        status: ExitStatus,
        log_tail: String,
    },
    #[error(
        "no single master after {waited:?} (masters seen on the wire: {masters}); agent logs:\n{logs}"
    )]
    NoSingleMaster {
        waited: Duration,
        masters: String,
        logs: String,
    },
    #[error("no backup took over VRID {vrid} from {old_master} within {timeout:?}")]
    NoTakeover {
        vrid: u8,
        old_master: std::net::IpAddr,
        timeout: Duration,
    },
    #[error("advert from {0}, which is not a lab node")]
    StrangerOnTheWire(std::net::IpAddr),
    #[error("the packet capture stopped: {0}")]
    SnifferDied(String),
    #[error("interrupted")]
    Interrupted,
}

impl LabError {
    /// A bounded label for metrics and benchmark summaries.
    pub fn metric_label(&self) -> &'static str {
        match self {
            LabError::NotRoot => "not_root",
            LabError::MissingTool { .. } => "missing_tool",
            LabError::InvalidSpec(_) => "invalid_spec",
            LabError::Spawn { .. } => "spawn",
            LabError::Command { .. } => "command",
            LabError::Output { .. } => "output",
            LabError::Io { .. } => "io",
            LabError::Setns { .. } => "setns",
            LabError::PacketSocket { .. } => "packet_socket",
            LabError::Icmp { .. } => "icmp",
            LabError::Signal { .. } => "signal",
            LabError::UnknownProcess(_) => "unknown_process",
            LabError::SignalHandler { .. } => "signal_handler",
            LabError::AgentExited { .. } => "agent_exited",
            LabError::NoSingleMaster { .. } => "no_single_master",
            LabError::NoTakeover { .. } => "no_takeover",
            LabError::StrangerOnTheWire(_) => "stranger",
            LabError::SnifferDied(_) => "sniffer_died",
            LabError::Interrupted => "interrupted",
        }
    }
}
