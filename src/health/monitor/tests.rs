//! The runner against real sockets on 127.0.0.1 ephemeral ports: listeners that accept,
//! refuse, stay silent, or answer with canned HTTP responses.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use super::*;
use crate::health::check::CheckKind;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
const INTERVAL: Duration = Duration::from_millis(50);
const TIMEOUT: Duration = Duration::from_millis(100);
/// Generous bound for "eventually": the machine is shared with parallel builds.
const EVENTUALLY: Duration = Duration::from_secs(3);

fn key(check: &str) -> CheckKey {
    CheckKey::new("vip", check)
}

fn tcp(name: &str, port: u16) -> CheckSpec {
    CheckSpec {
        name: name.into(),
        kind: CheckKind::Tcp {
            host: LOCALHOST,
            port,
        },
        interval: INTERVAL,
        timeout: TIMEOUT,
        rise: 2,
        fall: 2,
    }
}

fn http(name: &str, port: u16, path: &str) -> CheckSpec {
    CheckSpec {
        kind: CheckKind::Http {
            host: LOCALHOST,
            port,
            path: path.into(),
            https: false,
            expect_status: None,
            host_header: None,
        },
        ..tcp(name, port)
    }
}

fn checks(specs: &[&CheckSpec]) -> BTreeMap<CheckKey, CheckSpec> {
    specs
        .iter()
        .map(|spec| (key(&spec.name), (*spec).clone()))
        .collect()
}

fn start(monitor: &mut HealthMonitor, specs: &[&CheckSpec]) {
    let refused = monitor.set_checks(checks(specs));
    assert!(refused.is_empty(), "{refused:?}");
}

/// Waits until `check` is in `state` and returns its status.
async fn wait_state(
    rx: &mut watch::Receiver<HealthReport>,
    check: &str,
    state: CheckState,
) -> CheckStatus {
    let key = key(check);
    let found = tokio::time::timeout(
        EVENTUALLY,
        rx.wait_for(|report| report.get(&key).is_some_and(|s| s.state == state)),
    )
    .await
    .map(|report| report.expect("monitor alive").get(&key).cloned());
    match found {
        Ok(status) => status.unwrap(),
        Err(_) => panic!(
            "{check} not {state} within {EVENTUALLY:?}: {:?}",
            rx.borrow().get(&key)
        ),
    }
}

/// A listener that accepts and closes every connection, counting them.
struct Accepting {
    port: u16,
    accepted: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl Accepting {
    async fn new() -> Self {
        let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while listener.accept().await.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        });
        Accepting {
            port,
            accepted,
            task,
        }
    }

    fn count(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Closes the listening socket: connections are refused from then on.
    async fn close(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// A port nothing listens on.
async fn refused_port() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    listener.local_addr().unwrap().port()
}

/// An HTTP server that reads each request, sends it to the returned channel, answers with
/// `response` verbatim and closes.
async fn http_server(response: &'static [u8]) -> (u16, mpsc::UnboundedReceiver<String>) {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (requests, received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream, response, requests.clone()));
        }
    });
    (port, received)
}

async fn answer(mut stream: TcpStream, response: &[u8], requests: mpsc::UnboundedSender<String>) {
    let mut request = Vec::new();
    let mut buf = [0u8; 512];
    while !request.ends_with(b"\r\n\r\n") && request.len() < 4096 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => request.extend_from_slice(&buf[..n]),
        }
    }
    let _ = requests.send(String::from_utf8_lossy(&request).into_owned());
    let _ = stream.write_all(response).await;
    let _ = stream.shutdown().await;
}

/// Accepts connections and never answers, holding them open.
async fn silent_server() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    port
}

#[tokio::test]
async fn tcp_check_starts_unknown_then_passes_against_a_listener() {
    let listener = Accepting::new().await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&tcp("tcp", listener.port)]);
    {
        let report = rx.borrow_and_update();
        assert_eq!(report.get(&key("tcp")).unwrap().state, CheckState::Unknown);
        assert!(!report.all_known());
    }
    let status = wait_state(&mut rx, "tcp", CheckState::Passing).await;
    assert!(status.is_passing() && !status.is_failing());
    assert_eq!(status.last_error, None);
    assert_eq!(status.consecutive_successes, 1);
    assert!(rx.borrow().all_known());
}

#[tokio::test]
async fn tcp_check_fails_on_a_refused_connection_with_a_clear_error() {
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&tcp("tcp", refused_port().await)]);
    let status = wait_state(&mut rx, "tcp", CheckState::Failing).await;
    assert!(status.is_failing());
    assert_eq!(status.last_error_kind, Some("connect"));
    let error = status.last_error.unwrap();
    assert!(
        error.starts_with("connect failed: ") && error.contains("refused"),
        "{error}"
    );
}

#[tokio::test]
async fn http_200_passes_and_the_request_is_minimal_http_1_1() {
    let (port, mut requests) = http_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&http("web", port, "/healthz?full=1")]);
    wait_state(&mut rx, "web", CheckState::Passing).await;
    let request = requests.recv().await.unwrap();
    assert_eq!(
        request,
        format!(
            "GET /healthz?full=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             User-Agent: ferrovip-health\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        )
    );
}

#[tokio::test]
async fn http_500_fails_unless_expected() {
    let (port, mut requests) = http_server(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    let mut expects_500 = http("expects-500", port, "/");
    if let CheckKind::Http {
        expect_status,
        host_header,
        ..
    } = &mut expects_500.kind
    {
        *expect_status = Some(500..=500);
        *host_header = Some("app.example".into());
    }
    start(&mut monitor, &[&http("web", port, "/"), &expects_500]);

    let status = wait_state(&mut rx, "web", CheckState::Failing).await;
    assert_eq!(status.last_error_kind, Some("unexpected_status"));
    assert_eq!(
        status.last_error.as_deref(),
        Some("HTTP status 500, expected 200-399")
    );
    wait_state(&mut rx, "expects-500", CheckState::Passing).await;
    let mut saw_custom_host = false;
    while let Ok(request) = requests.try_recv() {
        saw_custom_host |= request.contains("\r\nHost: app.example\r\n");
    }
    assert!(saw_custom_host);
}

#[tokio::test]
async fn http_garbage_fails_with_an_excerpt_of_what_came_back() {
    let (port, _requests) = http_server(b"SSH-2.0-OpenSSH_9.6\r\n").await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&http("web", port, "/")]);
    let status = wait_state(&mut rx, "web", CheckState::Failing).await;
    assert_eq!(status.last_error_kind, Some("malformed_status_line"));
    assert_eq!(
        status.last_error.as_deref(),
        Some("not an HTTP status line: \"SSH-2.0-OpenSSH_9.6\"")
    );
}

#[tokio::test]
async fn http_connection_closed_without_an_answer_fails() {
    let (port, _requests) = http_server(b"").await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&http("web", port, "/")]);
    let status = wait_state(&mut rx, "web", CheckState::Failing).await;
    assert_eq!(status.last_error_kind, Some("no_status_line"));
    assert_eq!(
        status.last_error.as_deref(),
        Some("connection closed before an HTTP status line")
    );
}

#[tokio::test]
async fn http_silent_server_times_out() {
    let port = silent_server().await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    let started = Instant::now();
    start(&mut monitor, &[&http("web", port, "/")]);
    let status = wait_state(&mut rx, "web", CheckState::Failing).await;
    assert!(started.elapsed() >= TIMEOUT, "{:?}", started.elapsed());
    assert_eq!(status.last_error_kind, Some("timeout"));
    assert_eq!(status.last_error.as_deref(), Some("no answer within 100ms"));
}

#[tokio::test]
async fn failure_is_reported_within_fall_intervals_and_recovery_within_rise() {
    let listener = Accepting::new().await;
    let port = listener.port;
    let mut spec = tcp("tcp", port);
    spec.fall = 3;
    spec.rise = 2;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&spec]);
    let passing = wait_state(&mut rx, "tcp", CheckState::Passing).await;

    listener.close().await;
    let closed = Instant::now();
    let failing = wait_state(&mut rx, "tcp", CheckState::Failing).await;
    let took = closed.elapsed();
    // Hysteresis: the first failed probe may come right away, the third two intervals later.
    assert!(took >= INTERVAL * (spec.fall - 1), "failed after {took:?}");
    assert!(
        took <= INTERVAL * spec.fall + TIMEOUT,
        "failure reported after {took:?}"
    );
    assert_eq!(failing.consecutive_failures, spec.fall);
    assert!(failing.since_instant > passing.since_instant);

    // The port is free again: listen on it and the check rises after `rise` successes.
    let listener = TcpListener::bind((LOCALHOST, port)).await.unwrap();
    let reopened = Instant::now();
    tokio::spawn(async move { while listener.accept().await.is_ok() {} });
    let passing = wait_state(&mut rx, "tcp", CheckState::Passing).await;
    let took = reopened.elapsed();
    assert!(
        took <= INTERVAL * spec.rise + TIMEOUT,
        "rose after {took:?}"
    );
    assert_eq!(passing.consecutive_successes, spec.rise);
}

#[tokio::test]
async fn a_steady_check_publishes_nothing_while_it_keeps_probing() {
    let listener = Accepting::new().await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&tcp("tcp", listener.port)]);
    wait_state(&mut rx, "tcp", CheckState::Passing).await;
    rx.borrow_and_update();
    let probes_before = listener.count();
    tokio::time::sleep(INTERVAL * 8).await;
    assert!(listener.count() >= probes_before + 4, "the probes stopped");
    assert!(!rx.has_changed().unwrap(), "{:?}", *rx.borrow());
}

#[tokio::test]
async fn a_failing_check_republishes_when_the_kind_of_failure_changes() {
    // Answers 503 until `silent` is set, then accepts and never answers.
    let listener = TcpListener::bind((LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let silent = Arc::new(AtomicBool::new(false));
    let go_silent = Arc::clone(&silent);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            if go_silent.load(Ordering::SeqCst) {
                held.push(stream);
            } else {
                let (requests, _) = mpsc::unbounded_channel();
                tokio::spawn(answer(
                    stream,
                    b"HTTP/1.1 503 Unavailable\r\n\r\n",
                    requests,
                ));
            }
        }
    });
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&http("web", port, "/")]);
    let first = wait_state(&mut rx, "web", CheckState::Failing).await;
    assert_eq!(first.last_error_kind, Some("unexpected_status"));

    silent.store(true, Ordering::SeqCst);
    let key = key("web");
    let report = tokio::time::timeout(
        EVENTUALLY,
        rx.wait_for(|r| {
            r.get(&key)
                .is_some_and(|s| s.last_error_kind == Some("timeout"))
        }),
    )
    .await
    .expect("the timeout is reported")
    .unwrap()
    .clone();
    let status = report.get(&key).unwrap();
    assert!(status.is_failing());
    // Still the same failing period.
    assert_eq!(status.since, first.since);
    assert_eq!(status.last_error.as_deref(), Some("no answer within 100ms"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_checks_converges_and_keeps_unchanged_checks() {
    let a = Accepting::new().await;
    let b = Accepting::new().await;
    let refused = refused_port().await;
    let spec_a = tcp("a", a.port);
    let spec_b = tcp("b", b.port);
    let spec_c = tcp("c", refused);
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&spec_a, &spec_b, &spec_c]);
    let status_a = wait_state(&mut rx, "a", CheckState::Passing).await;
    wait_state(&mut rx, "b", CheckState::Passing).await;
    let status_c = wait_state(&mut rx, "c", CheckState::Failing).await;

    // a unchanged, b removed, c retuned (same target), d new.
    let mut retuned_c = spec_c.clone();
    retuned_c.interval = INTERVAL * 2;
    retuned_c.rise = 5;
    let d = Accepting::new().await;
    let spec_d = tcp("d", d.port);
    start(&mut monitor, &[&spec_a, &retuned_c, &spec_d]);
    {
        let report = rx.borrow_and_update();
        assert_eq!(report.get(&key("a")), Some(&status_a));
        assert_eq!(report.get(&key("b")), None);
        assert_eq!(report.get(&key("c")).unwrap().state, CheckState::Failing);
        assert_eq!(report.get(&key("c")).unwrap().since, status_c.since);
        assert_eq!(report.get(&key("d")).unwrap().state, CheckState::Unknown);
    }
    wait_state(&mut rx, "d", CheckState::Passing).await;

    // b's task is gone: no more connections, and it never writes its entry back.
    tokio::time::sleep(INTERVAL * 2).await;
    let b_count = b.count();
    let a_count = a.count();
    tokio::time::sleep(INTERVAL * 6).await;
    assert_eq!(b.count(), b_count, "the removed check still probes");
    assert!(a.count() >= a_count + 3, "the unchanged check stopped");
    {
        let report = rx.borrow();
        assert_eq!(report.get(&key("b")), None);
        assert_eq!(report.get(&key("a")), Some(&status_a));
        assert_eq!(
            report
                .of_resource("vip")
                .map(|(name, _)| name)
                .collect::<Vec<_>>(),
            ["a", "c", "d"]
        );
    }

    // A new target for c starts over from unknown and follows the new target.
    let new_c = tcp("c", a.port);
    start(&mut monitor, &[&spec_a, &new_c, &spec_d]);
    assert_eq!(
        rx.borrow_and_update().get(&key("c")).unwrap().state,
        CheckState::Unknown
    );
    wait_state(&mut rx, "c", CheckState::Passing).await;

    start(&mut monitor, &[]);
    assert!(rx.borrow().checks.is_empty());
}

#[tokio::test]
async fn refused_specs_are_returned_and_the_others_run() {
    let listener = Accepting::new().await;
    let mut injecting = http("injecting", listener.port, "/");
    if let CheckKind::Http { host_header, .. } = &mut injecting.kind {
        *host_header = Some("a\r\nX-Evil: 1".into());
    }
    let mut spinning = tcp("spinning", listener.port);
    spinning.interval = Duration::ZERO;
    let (mut monitor, mut rx) = HealthMonitor::new();
    let refused = monitor.set_checks(checks(&[&tcp("ok", listener.port), &injecting, &spinning]));
    let refused: Vec<(String, &str)> = refused
        .iter()
        .map(|(key, error)| (key.check.clone(), error.metric_label()))
        .collect();
    assert_eq!(
        refused,
        [
            ("injecting".to_owned(), "invalid_spec"),
            ("spinning".to_owned(), "invalid_spec")
        ]
    );
    wait_state(&mut rx, "ok", CheckState::Passing).await;
    let names: Vec<String> = rx.borrow().checks.keys().map(|k| k.check.clone()).collect();
    assert_eq!(names, ["ok"]);
}

#[tokio::test]
async fn dropping_the_monitor_stops_the_probes() {
    let listener = Accepting::new().await;
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &[&tcp("tcp", listener.port)]);
    wait_state(&mut rx, "tcp", CheckState::Passing).await;
    drop(monitor);
    tokio::time::sleep(INTERVAL * 2).await;
    let count = listener.count();
    tokio::time::sleep(INTERVAL * 4).await;
    assert_eq!(listener.count(), count);
    assert!(rx.has_changed().is_err(), "the sender is gone");
}

#[tokio::test]
async fn checks_validated_from_a_resource_probe_with_their_http_options() {
    let (port, mut requests) = http_server(b"HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
    let mut resource = crate::crd::sample_spec(&["192.0.2.100/24"], 51);
    resource.priority.checks = serde_saphyr::from_str(&format!(
        "- name: maintenance\n  http: {{port: {port}, path: /ready, expectStatus: \"500-503\", hostHeader: app.example}}\n  interval: 50ms\n  timeout: 50ms\n  rise: 1\n  fall: 1\n\
         - name: plain\n  http: {{port: {port}, path: /ready}}\n  interval: 50ms\n  timeout: 50ms\n  rise: 1\n  fall: 1\n"
    ))
    .unwrap();
    let valid = resource.validate().unwrap();
    let specs: Vec<&CheckSpec> = valid.checks.iter().map(|c| &c.spec).collect();
    let (mut monitor, mut rx) = HealthMonitor::new();
    start(&mut monitor, &specs);

    wait_state(&mut rx, "maintenance", CheckState::Passing).await;
    let status = wait_state(&mut rx, "plain", CheckState::Failing).await;
    assert_eq!(
        status.last_error.as_deref(),
        Some("HTTP status 503, expected 200-399")
    );
    let mut host_headers = BTreeSet::new();
    while let Ok(request) = requests.try_recv() {
        assert!(request.starts_with("GET /ready HTTP/1.1\r\n"), "{request}");
        let host = request.lines().find_map(|l| l.strip_prefix("Host: "));
        host_headers.insert(host.unwrap().to_owned());
    }
    assert_eq!(
        host_headers,
        BTreeSet::from(["app.example".to_owned(), format!("127.0.0.1:{port}")])
    );
}
