//! Health checks in the contract: the validated check ([`ValidCheck`]: the [`CheckSpec`] the
//! health monitor runs, and the weight the planner subtracts while it fails), and the rules a
//! check must follow, stated once for the resource's validation and for the monitor.

use std::collections::HashSet;
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use super::duration::parse_duration;
use super::field::{Collector, check_weight, is_dns_label, port};
use super::virtualip::{HealthCheck, HttpCheck};

/// HTTP statuses that pass when a check names none: 2xx and 3xx, as HAProxy's `httpchk`
/// (and kubelet's probes).
pub const DEFAULT_EXPECT_STATUS: RangeInclusive<u16> = 200..=399;

/// The statuses an HTTP check may expect.
const HTTP_STATUSES: RangeInclusive<u16> = 100..=599;

/// Where a check probes when the resource names no host.
const DEFAULT_HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

/// Bounds of a check's interval and timeout.
const CHECK_DURATIONS: RangeInclusive<Duration> =
    Duration::from_millis(10)..=Duration::from_secs(3600);

/// Bounds of `rise` and `fall`.
const THRESHOLDS: RangeInclusive<u32> = 1..=100;

/// A validated entry of `spec.priority.checks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidCheck {
    /// What the health monitor runs.
    pub spec: CheckSpec,
    /// Subtracted from the node's priority while the check fails.
    pub weight: i64,
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

/// What a check probes.
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

/// A rule that a [`CheckSpec`] breaks: `field` (named as in the resource, e.g.
/// `expectStatus`) and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckProblem {
    pub field: &'static str,
    pub reason: &'static str,
}

impl CheckSpec {
    /// The first rule the spec breaks, if any: what cannot run, such as zero durations or
    /// thresholds (a zero interval would spin), port 0, and HTTP fields that could
    /// break or inject into the request. A spec built by [`crate::crd::VirtualIPSpec::validate`]
    /// breaks none.
    pub fn problem(&self) -> Option<CheckProblem> {
        let invalid = |field, reason| Some(CheckProblem { field, reason });
        if self.name.is_empty() {
            return invalid("name", "must not be empty");
        }
        if self.interval.is_zero() {
            return invalid("interval", "must be greater than zero");
        }
        if self.timeout.is_zero() {
            return invalid("timeout", "must be greater than zero");
        }
        if self.rise == 0 {
            return invalid("rise", "must be at least 1");
        }
        if self.fall == 0 {
            return invalid("fall", "must be at least 1");
        }
        if self.kind.target().1 == 0 {
            return invalid("port", "must be 1-65535");
        }
        if let CheckKind::Http {
            path,
            expect_status,
            host_header,
            ..
        } = &self.kind
        {
            if let Some(reason) = path_problem(path) {
                return invalid("path", reason);
            }
            if let Some(reason) = expect_status.as_ref().and_then(expect_status_problem) {
                return invalid("expectStatus", reason);
            }
            if let Some(reason) = host_header.as_deref().and_then(host_header_problem) {
                return invalid("hostHeader", reason);
            }
        }
        None
    }
}

/// The rule of an HTTP check's path: it goes on the request line verbatim.
fn path_problem(path: &str) -> Option<&'static str> {
    if !path.starts_with('/') {
        Some("must start with '/'")
    } else if !is_request_token(path) {
        Some("must be printable ASCII without spaces (percent-encode them)")
    } else {
        None
    }
}

/// The rule of the statuses an HTTP check expects.
fn expect_status_problem(range: &RangeInclusive<u16>) -> Option<&'static str> {
    let within = HTTP_STATUSES.contains(range.start()) && HTTP_STATUSES.contains(range.end());
    (range.is_empty() || !within).then_some("must be a non-empty range within 100-599")
}

/// The rule of an HTTP check's `Host` header: it goes into the request verbatim.
fn host_header_problem(header: &str) -> Option<&'static str> {
    (!is_request_token(header)).then_some("must be non-empty printable ASCII without spaces")
}

/// Request-line and header values go on the wire verbatim: CR, LF or a space would let a
/// spec split the request or smuggle headers.
fn is_request_token(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_graphic())
}

/// `spec.priority.checks`: every entry, with unique names.
pub(super) fn validate_checks(checks: &[HealthCheck], errors: &mut Collector) -> Vec<ValidCheck> {
    let mut names = HashSet::new();
    checks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            validate_check(&format!("spec.priority.checks[{i}]"), c, &mut names, errors)
        })
        .collect()
}

/// One entry of `spec.priority.checks`, at `field`, whose name must not be in `names` yet;
/// `None` without exactly one of tcp, http.
fn validate_check<'a>(
    field: &str,
    c: &'a HealthCheck,
    names: &mut HashSet<&'a str>,
    errors: &mut Collector,
) -> Option<ValidCheck> {
    let at = |f: &str| format!("{field}.{f}");
    if !is_dns_label(&c.name) {
        errors.push(
            at("name"),
            format!("{:?} is not a lowercase DNS label", c.name),
        );
    } else if !names.insert(&c.name) {
        errors.push(at("name"), format!("{:?} is used twice", c.name));
    }
    check_weight(&at("weight"), c.weight, errors);
    let interval = check_duration(at("interval"), &c.interval, errors);
    let timeout = check_duration(at("timeout"), &c.timeout, errors);
    if timeout > interval {
        errors.push(
            at("timeout"),
            format!("{} is longer than the interval {}", c.timeout, c.interval),
        );
    }
    let rise = threshold(at("rise"), c.rise, errors);
    let fall = threshold(at("fall"), c.fall, errors);
    let kind = match (&c.tcp, &c.http) {
        (Some(t), None) => CheckKind::Tcp {
            host: host(at("tcp.host"), &t.host, errors),
            port: port(at("tcp.port"), t.port, errors).unwrap_or(1),
        },
        (None, Some(h)) => http_kind(&at("http"), h, errors),
        _ => {
            errors.push(field, "set exactly one of tcp, http");
            return None;
        }
    };
    Some(ValidCheck {
        spec: CheckSpec {
            name: c.name.clone(),
            kind,
            interval,
            timeout,
            rise,
            fall,
        },
        weight: c.weight,
    })
}

/// `http` of a check, at `field`.
fn http_kind(field: &str, h: &HttpCheck, errors: &mut Collector) -> CheckKind {
    let at = |f: &str| format!("{field}.{f}");
    if let Some(reason) = path_problem(&h.path) {
        errors.push(at("path"), format!("{:?} {reason}", h.path));
    }
    let expect_status = h.expect_status.as_deref().and_then(|text| {
        parse_expect_status(text)
            .map_err(|message| errors.push(at("expectStatus"), message))
            .ok()
    });
    if let Some(header) = &h.host_header
        && let Some(reason) = host_header_problem(header)
    {
        errors.push(at("hostHeader"), format!("{header:?} {reason}"));
    }
    CheckKind::Http {
        host: host(at("host"), &h.host, errors),
        port: port(at("port"), h.port, errors).unwrap_or(1),
        path: h.path.clone(),
        https: h.https,
        expect_status,
        host_header: h.host_header.clone(),
    }
}

/// `expectStatus`: a status (`200`) or an inclusive range (`200-299`) within 100-599.
fn parse_expect_status(text: &str) -> Result<RangeInclusive<u16>, String> {
    let status = |s: &str| {
        s.parse::<u16>()
            .ok()
            .filter(|_| s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()))
    };
    let range = match text.split_once('-') {
        None => status(text).map(|s| s..=s),
        Some((low, high)) => status(low).zip(status(high)).map(|(l, h)| l..=h),
    };
    let Some(range) = range else {
        return Err(format!(
            "{text:?} is not a status or a range of statuses, e.g. 200 or 200-299"
        ));
    };
    match expect_status_problem(&range) {
        Some(reason) => Err(format!("{text} {reason}")),
        None => Ok(range),
    }
}

/// A check's interval or timeout: 10ms to 1h.
fn check_duration(field: String, text: &str, errors: &mut Collector) -> Duration {
    match parse_duration(text) {
        Ok(d) if CHECK_DURATIONS.contains(&d) => d,
        Ok(_) => {
            errors.push(field, format!("{text} is out of range (10ms to 1h)"));
            Duration::from_secs(1)
        }
        Err(e) => {
            errors.push(field, e.to_string());
            Duration::from_secs(1)
        }
    }
}

/// `rise` or `fall`: 1 to 100.
fn threshold(field: String, value: i64, errors: &mut Collector) -> u32 {
    match u32::try_from(value) {
        Ok(v) if THRESHOLDS.contains(&v) => v,
        _ => {
            errors.push(field, format!("must be between 1 and 100, got {value}"));
            1
        }
    }
}

/// The address a check probes: 127.0.0.1 when absent.
fn host(field: String, host: &Option<String>, errors: &mut Collector) -> IpAddr {
    match host {
        None => DEFAULT_HOST,
        Some(h) => h.parse().unwrap_or_else(|_| {
            errors.push(field, format!("{h:?} is not an IP address"));
            DEFAULT_HOST
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{HttpCheck, TcpCheck, VirtualIPSpec};

    fn with_check(http: HttpCheck) -> VirtualIPSpec {
        let mut spec = crate::crd::sample_spec(&["192.0.2.100/24"], 51);
        spec.priority.checks = vec![HealthCheck {
            name: "web".into(),
            tcp: None,
            http: Some(http),
            weight: 30,
            interval: "2s".into(),
            timeout: "1s".into(),
            rise: 2,
            fall: 3,
        }];
        spec
    }

    fn http_check() -> HttpCheck {
        serde_json::from_str(r#"{"port": 8080}"#).unwrap()
    }

    fn errors(spec: &VirtualIPSpec) -> Vec<String> {
        match spec.validate() {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn http_options_reach_the_check_spec() {
        let mut http = http_check();
        http.path = "/healthz".into();
        http.expect_status = Some("200-204".into());
        http.host_header = Some("app.example:8443".into());
        let valid = with_check(http).validate().unwrap();
        assert_eq!(
            valid.checks,
            [ValidCheck {
                spec: CheckSpec {
                    name: "web".into(),
                    kind: CheckKind::Http {
                        host: DEFAULT_HOST,
                        port: 8080,
                        path: "/healthz".into(),
                        https: false,
                        expect_status: Some(200..=204),
                        host_header: Some("app.example:8443".into()),
                    },
                    interval: Duration::from_secs(2),
                    timeout: Duration::from_secs(1),
                    rise: 2,
                    fall: 3,
                },
                weight: 30,
            }]
        );
        assert_eq!(valid.checks[0].spec.problem(), None);

        let mut http = http_check();
        http.expect_status = Some("503".into());
        let valid = with_check(http).validate().unwrap();
        let CheckKind::Http { expect_status, .. } = &valid.checks[0].spec.kind else {
            panic!("not http")
        };
        assert_eq!(expect_status, &Some(503..=503));
    }

    #[test]
    fn bad_http_options_name_the_field() {
        for (status, message) in [
            (
                "2xx",
                "\"2xx\" is not a status or a range of statuses, e.g. 200 or 200-299",
            ),
            (
                "200-",
                "\"200-\" is not a status or a range of statuses, e.g. 200 or 200-299",
            ),
            (
                "+200",
                "\"+200\" is not a status or a range of statuses, e.g. 200 or 200-299",
            ),
            (
                "299-200",
                "299-200 must be a non-empty range within 100-599",
            ),
            (
                "099-200",
                "099-200 must be a non-empty range within 100-599",
            ),
            ("600", "600 must be a non-empty range within 100-599"),
        ] {
            let mut http = http_check();
            http.expect_status = Some(status.into());
            assert_eq!(
                errors(&with_check(http)),
                [format!(
                    "spec.priority.checks[0].http.expectStatus: {message}"
                )]
            );
        }

        let mut http = http_check();
        http.host_header = Some("a.example\r\nX-Evil: 1".into());
        http.path = "/caf\u{e9}".into();
        assert_eq!(
            errors(&with_check(http)),
            [
                "spec.priority.checks[0].http.path: \"/café\" must be printable ASCII without spaces (percent-encode them)",
                "spec.priority.checks[0].http.hostHeader: \"a.example\\r\\nX-Evil: 1\" must be non-empty printable ASCII without spaces",
            ]
        );
    }

    #[test]
    fn check_entries_are_validated_field_by_field() {
        let mut spec = with_check(http_check());
        let mut second = spec.priority.checks[0].clone();
        second.http = None;
        second.tcp = Some(TcpCheck {
            host: Some("localhost".into()),
            port: 0,
        });
        second.interval = "5ms".into();
        second.timeout = "2h".into();
        second.rise = 0;
        second.weight = 255;
        let mut third = spec.priority.checks[0].clone();
        third.name = "Web".into();
        third.tcp = Some(TcpCheck {
            host: None,
            port: 80,
        });
        spec.priority.checks.extend([second, third]);
        assert_eq!(
            errors(&spec),
            [
                "spec.priority.checks[1].name: \"web\" is used twice",
                "spec.priority.checks[1].weight: must be between 0 and 254, got 255",
                "spec.priority.checks[1].interval: 5ms is out of range (10ms to 1h)",
                "spec.priority.checks[1].timeout: \"2h\" is not a duration: write a number with a unit, e.g. 100ms, 1s, 1.5s or 2m",
                "spec.priority.checks[1].rise: must be between 1 and 100, got 0",
                "spec.priority.checks[1].tcp.host: \"localhost\" is not an IP address",
                "spec.priority.checks[1].tcp.port: must be between 1 and 65535, got 0",
                "spec.priority.checks[2].name: \"Web\" is not a lowercase DNS label",
                "spec.priority.checks[2]: set exactly one of tcp, http",
            ]
        );
    }

    #[test]
    fn a_built_spec_breaks_no_rule_the_validation_kept() {
        let spec = |kind| CheckSpec {
            name: "web".into(),
            kind,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        };
        let http = |https, expect_status| CheckKind::Http {
            host: DEFAULT_HOST,
            port: 80,
            path: "/".into(),
            https,
            expect_status,
            host_header: None,
        };
        assert_eq!(spec(http(false, Some(100..=599))).problem(), None);
        assert_eq!(spec(http(true, None)).problem(), None);
        assert_eq!(
            spec(http(false, Some(200..=600))).problem(),
            Some(CheckProblem {
                field: "expectStatus",
                reason: "must be a non-empty range within 100-599"
            })
        );
    }
}
