//! What a health check probes, and the rules a spec must follow before it runs.

use std::fmt;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::HealthError;

/// HTTP statuses that pass when a check names none: 2xx and 3xx, as HAProxy's `httpchk`.
pub const DEFAULT_EXPECT_STATUS: RangeInclusive<u16> = 200..=399;

/// Identifies a running check: the VirtualIP it belongs to and its name within it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CheckKey {
    pub resource: String,
    pub check: String,
}

impl CheckKey {
    pub fn new(resource: impl Into<String>, check: impl Into<String>) -> Self {
        CheckKey {
            resource: resource.into(),
            check: check.into(),
        }
    }
}

impl fmt::Display for CheckKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.resource, self.check)
    }
}

/// One check: what to probe, how often, and how many results in a row change its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckSpec {
    pub name: String,
    pub kind: CheckKind,
    /// Time between the starts of two probes.
    pub interval: Duration,
    /// A probe that takes longer fails.
    pub timeout: Duration,
    /// Consecutive successes that make a failing check pass.
    pub rise: u32,
    /// Consecutive failures that make a passing check fail.
    pub fall: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Passes when a TCP connection is established.
    Tcp { host: IpAddr, port: u16 },
    /// `GET path` over HTTP/1.1; passes when the status is in `expect_status`.
    Http {
        host: IpAddr,
        port: u16,
        path: String,
        /// Refused for now: TLS would need a new dependency.
        https: bool,
        /// [`DEFAULT_EXPECT_STATUS`] when `None`.
        expect_status: Option<RangeInclusive<u16>>,
        /// `Host` header; `host:port` when `None`.
        host_header: Option<String>,
    },
}

impl CheckKind {
    pub fn target(&self) -> (IpAddr, u16) {
        match self {
            CheckKind::Tcp { host, port } | CheckKind::Http { host, port, .. } => (*host, *port),
        }
    }
}

impl CheckSpec {
    /// Refuses what cannot run: zero durations or thresholds (a zero interval would spin),
    /// port 0, https, and HTTP fields that could break or inject into the request.
    pub fn validate(&self) -> Result<(), HealthError> {
        let invalid = |field, reason| HealthError::InvalidSpec {
            check: self.name.clone(),
            field,
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("name", "must not be empty"));
        }
        if self.interval.is_zero() {
            return Err(invalid("interval", "must be greater than zero"));
        }
        if self.timeout.is_zero() {
            return Err(invalid("timeout", "must be greater than zero"));
        }
        if self.rise == 0 {
            return Err(invalid("rise", "must be at least 1"));
        }
        if self.fall == 0 {
            return Err(invalid("fall", "must be at least 1"));
        }
        if self.kind.target().1 == 0 {
            return Err(invalid("port", "must be 1-65535"));
        }
        if let CheckKind::Http {
            path,
            https,
            expect_status,
            host_header,
            ..
        } = &self.kind
        {
            if *https {
                return Err(HealthError::HttpsUnsupported {
                    check: self.name.clone(),
                });
            }
            if !path.starts_with('/') {
                return Err(invalid("path", "must start with '/'"));
            }
            if !is_request_token(path) {
                return Err(invalid(
                    "path",
                    "must be printable ASCII without spaces (percent-encode them)",
                ));
            }
            if let Some(range) = expect_status
                && (range.is_empty() || *range.start() < 100 || *range.end() > 599)
            {
                return Err(invalid(
                    "expectStatus",
                    "must be a non-empty range within 100-599",
                ));
            }
            if let Some(header) = host_header
                && !is_request_token(header)
            {
                return Err(invalid(
                    "hostHeader",
                    "must be non-empty printable ASCII without spaces",
                ));
            }
        }
        Ok(())
    }
}

/// Request-line and header values go on the wire verbatim: CR, LF or a space would let a
/// spec split the request or smuggle headers.
fn is_request_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    fn http(path: &str) -> CheckSpec {
        CheckSpec {
            name: "web".into(),
            kind: CheckKind::Http {
                host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 8080,
                path: path.into(),
                https: false,
                expect_status: None,
                host_header: None,
            },
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }

    fn field_of(spec: &CheckSpec) -> Option<&'static str> {
        match spec.validate() {
            Ok(()) => None,
            Err(HealthError::InvalidSpec { field, .. }) => Some(field),
            Err(HealthError::HttpsUnsupported { .. }) => Some("https"),
            Err(other) => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_plain_http_check_is_valid() {
        assert_eq!(field_of(&http("/healthz?full=1")), None);
    }

    #[test]
    fn invalid_specs_name_the_field() {
        let mutate = |f: fn(&mut CheckSpec)| {
            let mut spec = http("/");
            f(&mut spec);
            field_of(&spec)
        };
        let cases: Vec<(Option<&str>, Option<&str>)> = vec![
            (mutate(|s| s.name.clear()), Some("name")),
            (mutate(|s| s.interval = Duration::ZERO), Some("interval")),
            (mutate(|s| s.timeout = Duration::ZERO), Some("timeout")),
            (mutate(|s| s.rise = 0), Some("rise")),
            (mutate(|s| s.fall = 0), Some("fall")),
            (
                mutate(|s| {
                    s.kind = CheckKind::Tcp {
                        host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                        port: 0,
                    }
                }),
                Some("port"),
            ),
            (field_of(&http("healthz")), Some("path")),
            (field_of(&http("/a b")), Some("path")),
            (field_of(&http("/a\r\nX-Evil: 1")), Some("path")),
            (field_of(&http("/caf\u{e9}")), Some("path")),
        ];
        for (got, want) in cases {
            assert_eq!(got, want);
        }

        let with = |f: &dyn Fn(&mut CheckKind)| {
            let mut spec = http("/");
            f(&mut spec.kind);
            field_of(&spec)
        };
        let https = |k: &mut CheckKind| {
            if let CheckKind::Http { https, .. } = k {
                *https = true;
            }
        };
        assert_eq!(with(&https), Some("https"));
        for (range, want) in [
            (200..=299, None),
            (100..=599, None),
            (RangeInclusive::new(300, 200), Some("expectStatus")),
            (99..=200, Some("expectStatus")),
            (200..=600, Some("expectStatus")),
        ] {
            let set = move |k: &mut CheckKind| {
                if let CheckKind::Http { expect_status, .. } = k {
                    *expect_status = Some(range.clone());
                }
            };
            assert_eq!(with(&set), want);
        }
        for (header, want) in [
            ("example.com", None),
            ("", Some("hostHeader")),
            ("a\r\nb", Some("hostHeader")),
        ] {
            let set = move |k: &mut CheckKind| {
                if let CheckKind::Http { host_header, .. } = k {
                    *host_header = Some(header.to_owned());
                }
            };
            assert_eq!(with(&set), want);
        }
    }

    #[test]
    fn keys_order_by_resource_then_check() {
        let mut keys = [
            CheckKey::new("b", "a"),
            CheckKey::new("a", "z"),
            CheckKey::new("a", "b"),
        ];
        keys.sort();
        let shown: Vec<String> = keys.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["a/b", "a/z", "b/a"]);
    }
}
