//! The app's own readiness on the real binary, against real local servers: one that becomes
//! ready late, one that flaps, one that hangs; an exec check; --min-ready; the start-up gate.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::{Checker, Drainit, command, get_request, http_request, time_until};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;

/// A tiny HTTP health endpoint: 200 while `healthy`, else 500; with `hang`, it accepts and
/// never answers.
struct HealthServer {
    addr: SocketAddr,
    healthy: Arc<AtomicBool>,
    /// Connections accepted so far: checks made (or, hanging, in flight).
    checks: Arc<AtomicUsize>,
}

impl HealthServer {
    fn start(healthy: bool, hang: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let flag = Arc::new(AtomicBool::new(healthy));
        let checks = Arc::new(AtomicUsize::new(0));
        let (state, count) = (flag.clone(), checks.clone());
        thread::spawn(move || {
            let mut held = Vec::new();
            for mut conn in listener.incoming().map_while(Result::ok) {
                count.fetch_add(1, Ordering::Relaxed);
                if hang {
                    held.push(conn);
                    continue;
                }
                let mut buf = [0u8; 1024];
                let _ = conn.read(&mut buf);
                let status = if state.load(Ordering::Relaxed) {
                    "200 OK"
                } else {
                    "500 Oops"
                };
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        Self {
            addr,
            healthy: flag,
            checks,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/healthz", self.addr)
    }
}

/// drainit in a new namespace of `kind` (`--net`, `--mount`), once `setup` has run there.
/// drainit in a new namespace of `kind`, set up by `setup` first.
fn in_new_namespace(kind: &str, setup: &str) -> common::Builder {
    let setup = format!("{setup} && exec \"$@\"");
    Drainit::builder().under(&["unshare", kind, "--", "sh", "-c", &setup, "sh"])
}

/// A kubelet's `/ready` probe.
fn kubelet(drainit: &Drainit) -> u16 {
    http_request(drainit.health, &get_request("/ready", "kube-probe/1.31")).0
}

fn ready(drainit: &Drainit) -> u16 {
    drainit.get("/ready").0
}

#[test]
fn an_app_that_becomes_ready_late_is_not_ready_until_then() {
    // A port nobody listens on yet: the TCP check fails until the "app" binds it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let target = format!("127.0.0.1:{port}");
    let mut drainit = Drainit::start(
        &["--ready-tcp", &target, "--ready-interval", "200ms"],
        &["sleep", "30"],
    );
    drainit.event("app_not_ready_yet");
    assert_eq!(ready(&drainit), 503, "not ready before the app listens");
    assert_eq!(drainit.get("/alive").0, 200);
    let listener = TcpListener::bind(&target).unwrap();
    let became_ready = time_until(SECS(3), || ready(&drainit) == 200);
    assert!(
        became_ready.is_some_and(|t| t < SECS(1)),
        "ready {became_ready:?} after the app listened"
    );
    drainit.event("app_check_passed");
    drop(listener);
    drainit.signal(Signal::SIGINT);
    drainit.wait(SECS(5));
}

#[test]
fn a_flapping_app_check_takes_the_pod_out_and_back_in() {
    let server = HealthServer::start(true, false);
    let url = server.url();
    let mut drainit = Drainit::start(
        &["--ready-http", &url, "--ready-interval", "100ms"],
        &["sleep", "30"],
    );
    assert!(
        time_until(SECS(3), || ready(&drainit) == 200).is_some(),
        "never ready"
    );
    server.healthy.store(false, Ordering::Relaxed);
    assert!(
        time_until(SECS(3), || ready(&drainit) == 503).is_some(),
        "still ready with a failing check"
    );
    drainit.event("app_check_failed");
    let (_, status) = http_request(drainit.health, "GET /status HTTP/1.0\r\n\r\n");
    assert!(status.contains(r#""phase":"unready""#), "{status}");
    assert!(
        status.contains("HTTP 500"),
        "the failure is explained: {status}"
    );
    server.healthy.store(true, Ordering::Relaxed);
    assert!(
        time_until(SECS(3), || ready(&drainit) == 200).is_some(),
        "not ready again"
    );
    drainit.signal(Signal::SIGINT);
    drainit.wait(SECS(5));
}

#[test]
fn a_hanging_app_check_never_slows_a_probe() {
    let server = HealthServer::start(true, true);
    let url = server.url();
    let drainit = Drainit::start(
        &[
            "--ready-http",
            &url,
            "--ready-interval",
            "200ms",
            "--ready-timeout",
            "2s",
        ],
        &["sleep", "30"],
    );
    // A check hangs from here on.
    assert!(time_until(SECS(5), || server.checks.load(Ordering::Relaxed) > 0).is_some());
    let mut slowest = Duration::ZERO;
    for _ in 0..100 {
        let t = Instant::now();
        assert_eq!(
            ready(&drainit),
            503,
            "a check that never answers is not a pass"
        );
        slowest = slowest.max(t.elapsed());
    }
    // The timing bar is the benchmark's; a probe that waited for the check would take its
    // 2 s timeout.
    println!("slowest probe while the check hung: {slowest:?}");
    assert!(
        slowest < SECS(1),
        "a probe took {slowest:?} while the check hung"
    );
    drainit.signal(Signal::SIGINT);
}

#[test]
fn an_exec_check_runs_without_a_shell_and_leaves_no_zombie() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ready");
    let check = format!("test -e '{}'", marker.display());
    let mut drainit = Drainit::start(
        &["--ready-exec", &check, "--ready-interval", "100ms"],
        &["sleep", "30"],
    );
    drainit.event("app_not_ready_yet");
    assert_eq!(ready(&drainit), 503);
    std::fs::write(&marker, "").unwrap();
    assert!(
        time_until(SECS(3), || ready(&drainit) == 200).is_some(),
        "exec check never passed"
    );
    // Every check process is collected: any child besides the app is a check in flight (or
    // one exited an instant ago), gone a moment later; a leaked zombie would stay.
    let app = drainit.app_pid();
    let children = || -> Vec<String> {
        let list =
            std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", drainit.pid())).unwrap();
        list.split_whitespace()
            .filter(|c| *c != app.to_string())
            .map(str::to_owned)
            .collect()
    };
    for _ in 0..10 {
        for check in children() {
            let gone = time_until(SECS(2), || {
                !std::path::Path::new(&format!("/proc/{check}")).exists()
            });
            assert!(gone.is_some(), "check process {check} left behind");
        }
        // Samples spread over a few checks (every 100 ms).
        thread::sleep(MS(50));
    }
    drainit.signal(Signal::SIGINT);
    drainit.wait(SECS(5));
}

#[test]
fn min_ready_waits_for_the_check_to_pass_that_long() {
    let server = HealthServer::start(true, false);
    let url = server.url();
    let drainit = Drainit::start(
        &[
            "--ready-http",
            &url,
            "--ready-interval",
            "100ms",
            "--min-ready",
            "1500ms",
        ],
        &["sleep", "30"],
    );
    let started = Instant::now();
    let became_ready = time_until(SECS(5), || ready(&drainit) == 200).expect("never ready");
    assert!(
        started.elapsed() >= MS(1400),
        "ready after {became_ready:?}, before --min-ready"
    );
    drainit.signal(Signal::SIGINT);
}

#[test]
fn the_start_up_gate_holds_the_kubelet_until_the_load_balancer_saw_the_pod_healthy() {
    let drainit = Drainit::start(
        &[
            "--ready-after-lb-probes",
            "3",
            "--ready-lb-timeout",
            "30s",
            "--ready-tcp",
            "none",
        ],
        &["sleep", "30"],
    );
    assert_eq!(kubelet(&drainit), 503, "no load balancer has checked yet");
    let lb = Checker::start(&drainit, "HAProxy", MS(300), false);
    let open = time_until(SECS(5), || kubelet(&drainit) == 200).expect("the gate never opened");
    println!("the gate opened {open:?} after the load balancer's first check");
    // Not before the load balancer's third healthy check was sent.
    let sent = lb.sent();
    assert!(sent >= 3, "opened after {sent} checks, before the third");
    drainit.event("gate_opened");
    // Latched: the kubelet's view does not flap with the load balancer's.
    drop(lb);
    assert_eq!(kubelet(&drainit), 200);
    drainit.signal(Signal::SIGINT);
}

#[test]
fn without_any_load_balancer_the_gate_opens_at_its_timeout_with_a_warning() {
    let drainit = Drainit::start(
        &[
            "--ready-after-lb-probes",
            "2",
            "--ready-lb-timeout",
            "1s",
            "--ready-tcp",
            "none",
        ],
        &["sleep", "30"],
    );
    assert_eq!(kubelet(&drainit), 503);
    assert!(
        time_until(SECS(3), || kubelet(&drainit) == 200).is_some(),
        "the gate never timed out"
    );
    // Opened by its timeout, with the warning, not by a load balancer.
    let timed_out = drainit.event("gate_timed_out");
    assert_eq!(timed_out["timeout_ms"], 1000, "{timed_out}");
    assert_eq!(drainit.count_events("gate_opened"), 0);
    drainit.signal(Signal::SIGINT);
}

#[test]
fn a_check_stuck_in_a_dns_lookup_does_not_hold_up_drainits_exit() {
    use std::os::unix::fs::PermissionsExt;

    // A name server that never answers, seen only by this drainit (its own mount namespace).
    let silent_dns = std::net::UdpSocket::bind("127.0.0.77:53").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "nameserver 127.0.0.77\noptions timeout:30 attempts:1\n",
    )
    .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let unshare = in_new_namespace(
        "--mount",
        &format!("mount --bind {} /etc/resolv.conf", resolv.display()),
    );
    let mut drainit = unshare
        .options(&["--ready-tcp", "app.example:80", "--ready-timeout", "1s"])
        .app(command(&["sh", "-c", "sleep 1; exit 5"]))
        .start();
    let exited = drainit.event("app_exited");
    assert_eq!(exited["code"], 5);
    let started = Instant::now();
    assert_eq!(drainit.exit_code(SECS(20)), 5);
    assert!(
        started.elapsed() < SECS(5),
        "drainit lingered {:?} after the app exited",
        started.elapsed()
    );
    drop(silent_dns);
}

#[test]
fn a_pod_that_was_never_ready_is_stopped_without_a_drain() {
    // Its own network namespace: connections of other tests would count as requests to it.
    let unshare = in_new_namespace("--net", "ip link set lo up");
    // Nothing listens on port 1: the app check never passes.
    let mut drainit = unshare
        .options(&["--ready-tcp", "127.0.0.1:1", "--drain-delay", "20s"])
        .app(common::demo(&[]))
        .start_serving();
    let drained_after = drainit.drain_time();
    assert!(drained_after < SECS(2), "drained for {drained_after:?}");
    let over = drainit.event("drain_over");
    assert_eq!(
        over["reason"],
        "the app was never ready: no load balancer sends it traffic"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn an_app_check_still_running_when_the_app_exits_is_not_called_a_leftover() {
    let mut drainit = Drainit::start(
        &["--ready-exec", "sleep 3", "--ready-timeout", "5s"],
        &["sh", "-c", "sleep 0.5; exit 2"],
    );
    assert_eq!(drainit.exit_code(SECS(5)), 2);
    assert_eq!(
        drainit.count_events("leftovers_killed") + drainit.count_events("leftovers_survived"),
        0,
        "{}",
        drainit.logs.text()
    );
}

/// The demo app listening on `listen`, plus `more` options.
fn slow_demo<'a>(app: &'a str, listen: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    let mut command = vec![app, "--listen", listen];
    command.extend_from_slice(more);
    command
}

#[test]
fn with_no_option_the_app_is_ready_only_once_it_listens() {
    let app = common::demo_app_bin();
    let app = app.to_str().unwrap();
    let mut drainit = Drainit::start(
        &[],
        &slow_demo(app, "127.0.0.1:0", &["--listen-after", "1500"]),
    );
    let waiting = drainit.event("app_not_ready_yet");
    let detail = waiting["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("no TCP port yet") && detail.contains("--ready-tcp none"),
        "{waiting}"
    );
    let status = drainit.status();
    assert_eq!(status["app_check"]["kind"], "listen", "{status}");
    assert_eq!(ready(&drainit), 503, "ready before the app listens");

    let listening = drainit.app_line("demo-app: listening on");
    let ready_after = time_until(SECS(5), || ready(&drainit) == 200);
    assert!(
        ready_after.is_some(),
        "not ready 5 s after the app listened; logs:\n{}",
        drainit.logs.text()
    );
    let passes = drainit.event("app_check_passed");
    let port = listening.text.rsplit(':').next().unwrap().to_owned();
    assert_eq!(
        passes["detail"].as_str(),
        Some(format!("listening on {port}").as_str()),
        "{passes}"
    );
    let (_, metrics) = drainit.get("/metrics");
    for series in [
        r#"drainit_app_checks_total{kind="listen",result="fail"}"#,
        r#"drainit_app_checks_total{kind="listen",result="pass"}"#,
    ] {
        assert!(metrics.contains(series), "no {series} in:\n{metrics}");
    }
    drainit.signal(Signal::SIGINT);
    drainit.wait(SECS(5));
}

#[test]
fn an_app_that_closes_its_listener_is_no_longer_ready() {
    let app = common::demo_app_bin();
    let app = app.to_str().unwrap();
    let mut drainit = Drainit::start(
        &["--ready-interval", "200ms"],
        &slow_demo(app, "127.0.0.1:0", &["--close-listener-after", "1500"]),
    );
    assert!(
        time_until(SECS(5), || ready(&drainit) == 200).is_some(),
        "never ready; logs:\n{}",
        drainit.logs.text()
    );
    drainit.app_line("demo-app: closed the listener");
    let unready_after = time_until(SECS(5), || ready(&drainit) == 503);
    assert!(
        unready_after.is_some_and(|t| t < SECS(2)),
        "/ready {unready_after:?} after the app closed its listener (check interval 200 ms)"
    );
    let fails = drainit.event("app_check_failed");
    assert!(
        fails["detail"]
            .as_str()
            .is_some_and(|d| d.contains("stopped listening on port")),
        "{fails}"
    );
    drainit.signal(Signal::SIGINT);
    drainit.wait(SECS(5));
}

#[test]
fn a_worker_is_ready_with_ready_tcp_none_and_without_it_says_why_it_is_not() {
    let worker = Drainit::builder()
        .ready_tcp("none")
        .app(command(&["sleep", "30"]))
        .start();
    assert_eq!(ready(&worker), 200, "--ready-tcp none: ready once started");

    let stalled = Drainit::start(&[], &["sleep", "30"]);
    assert_eq!(ready(&stalled), 503);
    // The reminder comes every 10 s while the pod waits.
    let log = stalled
        .wait_event("app_not_ready", SECS(20))
        .unwrap_or_else(|| {
            panic!(
                "no reminder within 20 s; drainit logged:\n{}",
                stalled.logs.text()
            )
        });
    assert_eq!(log["level"], "WARN", "{log}");
    assert_eq!(log["check"], "the TCP ports the app's processes listen on");
    assert!(
        log["detail"]
            .as_str()
            .is_some_and(|d| d.contains("a worker that serves no TCP wants --ready-tcp none")),
        "{log}"
    );
    assert_eq!(ready(&stalled), 503, "a misconfigured worker stays unready");
}

#[test]
fn an_app_port_that_never_listens_keeps_the_pod_unready_and_names_what_does() {
    let wrong = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let app = common::demo_app_bin();
    let app = app.to_str().unwrap();
    let drainit = Drainit::start(
        &["--app-port", &wrong, "--ready-interval", "200ms"],
        &slow_demo(app, "127.0.0.1:0", &[]),
    );
    let listening = drainit.app_line("demo-app: listening on");
    let port = listening.text.rsplit(':').next().unwrap().to_owned();
    let waiting = drainit.event("app_not_ready_yet");
    let detail = waiting["detail"].as_str().unwrap_or_default().to_owned();
    assert!(
        detail.starts_with(&format!("nothing listens on --app-port {wrong} yet")),
        "{detail}"
    );
    // Once a check ran with the app listening, it names what does listen.
    drainit.wait_status(SECS(5), "the check never named the app's port", |status| {
        let last = status["app_check"]["last"]["detail"].as_str().unwrap_or("");
        last.contains("listening in the pod") && (last.contains(&port) || last.contains("more"))
    });
    assert_eq!(ready(&drainit), 503);
}

#[test]
fn an_app_reachable_only_on_loopback_is_not_ready_in_a_pod() {
    let app = common::demo_app_bin();
    let app = app.to_str().unwrap();
    // Probes on every interface, as in a pod; the app on loopback only.
    let all_interfaces = ["--health-listen", "0.0.0.0:0"];
    let unreachable = Drainit::start(&all_interfaces, &slow_demo(app, "127.0.0.1:0", &[]));
    unreachable.app_line("demo-app: listening on");
    unreachable.wait_status(SECS(5), "the check never said why", |status| {
        status["app_check"]["last"]["detail"]
            .as_str()
            .is_some_and(|d| d.contains("listens only on loopback"))
    });
    assert_eq!(ready(&unreachable), 503);

    let reachable = Drainit::start(&all_interfaces, &slow_demo(app, "0.0.0.0:0", &[]));
    reachable.wait_ready();
    assert_eq!(ready(&reachable), 200);
}
