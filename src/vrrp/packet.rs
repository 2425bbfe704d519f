//! VRRP advertisement codec (RFC 5798 / RFC 9568 version 3, RFC 3768 version 2).
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |Version| Type  | Virtual Rtr ID|   Priority    |Count IPvX Addr|
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |(rsvd) |     Max Adver Int     |          Checksum             |   (v3)
//! |   Auth Type   |   Adver Int   |          Checksum             |   (v2)
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                       IPvX Address(es)                        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! |                 Authentication Data (v2 only, 8 bytes)        |
//! +-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+-+
//! ```

use std::net::IpAddr;
use std::time::Duration;

use super::Version;

/// One decoded (or to-be-encoded) VRRP advertisement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertisement {
    pub version: Version,
    /// Virtual router identifier, 1-255.
    pub vrid: u8,
    /// 0 = master leaving, 1-254 backup, 255 = address owner.
    pub priority: u8,
    /// v3: Max Adver Int in centiseconds (12 bits, 1-4095). v2: Adver Int in seconds.
    pub interval: u16,
    /// Virtual addresses, all of one family.
    pub addresses: Vec<IpAddr>,
}

impl Advertisement {
    /// The advertisement interval as a duration (centiseconds in v3, seconds in v2).
    pub fn interval_duration(&self) -> Duration {
        match self.version {
            Version::V3 => Duration::from_millis(u64::from(self.interval) * 10),
            Version::V2 => Duration::from_secs(u64::from(self.interval)),
        }
    }
}
