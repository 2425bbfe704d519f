//! The words every layer shares: address family, VRRP version, checksum form, and the
//! protocol's limits (virtual router IDs, priorities, advertisement intervals).
//!
//! A leaf module: it imports nothing from the crate, so the API contract (`crd`), the planner
//! (`model`), the engines and the dataplane can all name these without pointing at each other.
//! Each limit is stated here once: the contract validates with it, the planner clamps to it and
//! the state machine quantises to it, so they cannot drift apart.

use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

/// Virtual router IDs (RFC 5798 §5.2.3): 0 is not one.
pub const VRIDS: RangeInclusive<u8> = 1..=255;

/// Priorities a router that does not own the addresses advertises (RFC 5798 §5.2.4): 255 is
/// the address owner's, 0 a leaving master's.
pub const NON_OWNER_PRIORITIES: RangeInclusive<u8> = 1..=254;

/// The VRRP protocol version spoken by one virtual router.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    V2,
    V3,
}

impl Version {
    pub fn number(self) -> u8 {
        match self {
            Version::V2 => 2,
            Version::V3 => 3,
        }
    }

    /// Whether this version can carry addresses of `family`: version 2 is IPv4 only.
    pub fn carries(self, family: Family) -> bool {
        self == Version::V3 || family == Family::V4
    }

    /// What the advertisement's interval field counts: centiseconds (v3's 12-bit Max Adver
    /// Int) or seconds (v2's 8-bit Adver Int).
    pub fn interval_unit(self) -> Duration {
        match self {
            Version::V3 => Duration::from_millis(10),
            Version::V2 => Duration::from_secs(1),
        }
    }

    /// The values of the advertisement's interval field, in [`Version::interval_unit`]s
    /// (0 is invalid in both versions).
    pub fn wire_intervals(self) -> RangeInclusive<u16> {
        match self {
            Version::V3 => 1..=4095,
            Version::V2 => 1..=255,
        }
    }

    /// The interval a field value stands for.
    pub fn interval_from_wire(self, wire: u16) -> Duration {
        self.interval_unit() * u32::from(wire)
    }

    /// The field value carrying `interval`: truncated to whole units, clamped to the field.
    pub fn interval_to_wire(self, interval: Duration) -> u16 {
        let range = self.wire_intervals();
        let units = interval.as_nanos() / self.interval_unit().as_nanos();
        let clamped = units.clamp(u128::from(*range.start()), u128::from(*range.end()));
        u16::try_from(clamped).unwrap_or(*range.end())
    }

    /// Shortest and longest advertisement interval: v3 10ms to 40.95s, v2 1s to 255s.
    pub fn interval_limits(self) -> RangeInclusive<Duration> {
        let wire = self.wire_intervals();
        self.interval_from_wire(*wire.start())..=self.interval_from_wire(*wire.end())
    }

    /// Whether `interval` can be this version's advertisement interval: within
    /// [`Version::interval_limits`] and a whole number of [`Version::interval_unit`]s, so
    /// that our timers agree with what the backups learn from the wire.
    pub fn check_interval(self, interval: Duration) -> Result<(), IntervalError> {
        if !self.interval_limits().contains(&interval) {
            Err(IntervalError::OutOfRange(self))
        } else if !interval
            .as_nanos()
            .is_multiple_of(self.interval_unit().as_nanos())
        {
            Err(IntervalError::NotWholeUnits(self))
        } else {
            Ok(())
        }
    }
}

/// Why a duration cannot be a version's advertisement interval. Displays as what follows
/// "`<interval>` is", e.g. `100ms is not whole seconds (VRRPv2)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntervalError {
    OutOfRange(Version),
    NotWholeUnits(Version),
}

impl fmt::Display for IntervalError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntervalError::OutOfRange(Version::V3) => {
                f.write_str("out of range: VRRPv3 allows 10ms to 40.95s")
            }
            IntervalError::OutOfRange(Version::V2) => {
                f.write_str("out of range: VRRPv2 allows 1s to 255s")
            }
            IntervalError::NotWholeUnits(Version::V3) => {
                f.write_str("not a multiple of 10ms (VRRPv3 counts in centiseconds)")
            }
            IntervalError::NotWholeUnits(Version::V2) => f.write_str("not whole seconds (VRRPv2)"),
        }
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.number())
    }
}

/// Address family of a virtual router: IPv4 and IPv6 are separate instances on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &std::net::IpAddr) -> Family {
        match addr {
            std::net::IpAddr::V4(_) => Family::V4,
            std::net::IpAddr::V6(_) => Family::V6,
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        })
    }
}

/// How the VRRPv3-over-IPv4 checksum is computed when sending.
/// On receive both forms are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ChecksumMode {
    /// Message plus IPv4 pseudo-header (keepalived's default, Wireshark's expectation).
    #[default]
    PseudoHeader,
    /// Message only (RFC 9568 text; keepalived `v3_checksum_as_v2`).
    MessageOnly,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_limits_follow_the_wire_fields() {
        assert_eq!(
            Version::V3.interval_limits(),
            Duration::from_millis(10)..=Duration::from_millis(40_950)
        );
        assert_eq!(
            Version::V2.interval_limits(),
            Duration::from_secs(1)..=Duration::from_secs(255)
        );
        assert_eq!(Version::V3.interval_to_wire(Duration::from_millis(105)), 10);
        assert_eq!(Version::V3.interval_to_wire(Duration::from_secs(60)), 4095);
        assert_eq!(Version::V2.interval_to_wire(Duration::from_millis(100)), 1);
    }

    #[test]
    fn interval_errors_say_why() {
        let check = |v: Version, ms: u64| {
            v.check_interval(Duration::from_millis(ms))
                .map_err(|e| e.to_string())
        };
        assert_eq!(check(Version::V3, 10), Ok(()));
        assert_eq!(check(Version::V3, 40_950), Ok(()));
        assert_eq!(
            check(Version::V3, 5),
            Err("out of range: VRRPv3 allows 10ms to 40.95s".into())
        );
        assert_eq!(
            check(Version::V3, 105),
            Err("not a multiple of 10ms (VRRPv3 counts in centiseconds)".into())
        );
        assert_eq!(check(Version::V2, 255_000), Ok(()));
        assert_eq!(
            check(Version::V2, 256_000),
            Err("out of range: VRRPv2 allows 1s to 255s".into())
        );
        assert_eq!(
            check(Version::V2, 1_500),
            Err("not whole seconds (VRRPv2)".into())
        );
    }
}
