//! The checks the monitor runs: what to probe is the contract's [`CheckSpec`] (built by the
//! VirtualIP's validation), identified here by a [`CheckKey`], and refused by [`validate`] when
//! it breaks one of the contract's rules.

use std::fmt;

use super::HealthError;
use crate::crd::CheckProblem;
pub use crate::crd::{CheckKind, CheckSpec, DEFAULT_EXPECT_STATUS};

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

/// Refuses what cannot run (the rules of [`CheckSpec::problem`]): zero durations or
/// thresholds (a zero interval would spin), port 0, and HTTP fields that could break or
/// inject into the request.
pub fn validate(spec: &CheckSpec) -> Result<(), HealthError> {
    match spec.problem() {
        None => Ok(()),
        Some(CheckProblem { field, reason }) => Err(HealthError::InvalidSpec {
            check: spec.name.clone(),
            field,
            reason,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};
    use std::ops::RangeInclusive;
    use std::time::Duration;

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
        match validate(spec) {
            Ok(()) => None,
            Err(HealthError::InvalidSpec { field, .. }) => Some(field),
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
        assert_eq!(with(&https), None, "https checks run");
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
