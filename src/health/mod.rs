//! Health facts that feed a node's VRRP priority: user-defined TCP and HTTP checks and the
//! interface carrier. Kubernetes-free: the model turns these facts (plus Node conditions and
//! local endpoints from the API) into priority penalties and reasons.
//!
//! - [`check`]: what to probe ([`CheckSpec`], [`CheckKind`]: the contract's, `crate::crd`) and
//!   the refusal of what cannot run.
//! - [`tracker`]: the pure rise/fall state machine ([`CheckTracker`]).
//! - [`probe`]: one TCP connect or hand-written HTTP/1.1 GET.
//! - [`monitor`]: the async runner ([`HealthMonitor`]) publishing a [`HealthReport`].
//! - [`carrier`]: [`carrier_up`], the link carrier read from sysfs.
//!
//! # Initial state of a check
//!
//! A check starts [`CheckState::Unknown`] and its first result decides: one success makes it
//! passing, one failure failing; from then on it changes only after `rise` consecutive
//! successes or `fall` consecutive failures. This is keepalived's default for track scripts
//! (without `init_fail`: "one success is enough", and a failure before that counts). Unknown
//! is not a failure: adding a check to a running VirtualIP must not move the address because
//! the master happened to learn about the check before a backup. The first probe runs as soon
//! as the check starts, so the unknown window is one probe (at most `timeout`): a refused
//! connection is known in microseconds, long before a starting node leaves Backup after
//! Master_Down_Interval. [`HealthReport::all_known`] lets a caller that prefers keepalived's
//! `init_fail` behaviour wait for every check's first result.

pub mod carrier;
pub mod check;
pub mod monitor;
pub mod probe;
pub mod tracker;

use std::io;
use std::ops::RangeInclusive;
use std::time::Duration;

pub use carrier::carrier_up;
pub use check::{CheckKey, CheckKind, CheckSpec, DEFAULT_EXPECT_STATUS};
pub use monitor::{CheckStatus, HealthMonitor, HealthReport};
pub use tracker::{CheckState, CheckTracker};

/// Why a check spec was refused or a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("check {check:?}: {field}: {reason}")]
    InvalidSpec {
        check: String,
        field: &'static str,
        reason: &'static str,
    },
    #[error("connect failed")]
    Connect(#[source] io::Error),
    #[error("no answer within {}ms", .after.as_millis())]
    Timeout { after: Duration },
    #[error("TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("sending the request failed")]
    Send(#[source] io::Error),
    #[error("reading the response failed")]
    Receive(#[source] io::Error),
    #[error("connection closed before an HTTP status line")]
    NoStatusLine,
    #[error("not an HTTP status line: {excerpt:?}")]
    MalformedStatusLine { excerpt: String },
    #[error("HTTP status {status}, expected {}-{}", .expected.start(), .expected.end())]
    UnexpectedStatus {
        status: u16,
        expected: RangeInclusive<u16>,
    },
}

impl HealthError {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidSpec { .. } => "invalid_spec",
            Self::Tls(_) => "tls",
            Self::Connect(_) => "connect",
            Self::Timeout { .. } => "timeout",
            Self::Send(_) => "send",
            Self::Receive(_) => "receive",
            Self::NoStatusLine => "no_status_line",
            Self::MalformedStatusLine { .. } => "malformed_status_line",
            Self::UnexpectedStatus { .. } => "unexpected_status",
        }
    }

    /// The message with its causes, e.g. `connect failed: Connection refused (os error 111)`:
    /// what a user reads in `last_error` and in priority reasons.
    pub fn chain(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_includes_the_io_cause() {
        let err = HealthError::Connect(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(err.metric_label(), "connect");
        assert!(
            err.chain().starts_with("connect failed: "),
            "{}",
            err.chain()
        );
        assert!(err.chain().len() > "connect failed: ".len());
    }

    #[test]
    fn unexpected_status_names_the_range() {
        let err = HealthError::UnexpectedStatus {
            status: 500,
            expected: 200..=399,
        };
        assert_eq!(err.chain(), "HTTP status 500, expected 200-399");
        let err = HealthError::Timeout {
            after: Duration::from_millis(250),
        };
        assert_eq!(err.chain(), "no answer within 250ms");
    }
}
