//! `drainit prestop` as the kubelet runs it: exec'd in the container, blocking until the drain is
//! over, followed by the kubelet's SIGTERM.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{Drainit, drainit_bin, time_until};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn prestop(control: &str, extra: &[&str]) -> Command {
    let mut cmd = Command::new(drainit_bin());
    cmd.args(["prestop", "--control", control])
        .args(extra)
        .stdin(Stdio::null());
    cmd
}

fn run(mut cmd: Command) -> (Output, Duration) {
    let start = Instant::now();
    let output = cmd.output().expect("run drainit prestop");
    (output, start.elapsed())
}

#[test]
fn prestop_drains_then_returns_and_the_kubelets_sigterm_stops_the_app_at_once() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "1s", "--grace-period", "6s"],
        &["--exit-code", "7"],
    );
    let hook = prestop(&drainit.control, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let flip = time_until(SECS(5), || drainit.get("/ready").0 == 503)
        .expect("prestop did not start the drain");
    // The flip's timing bar is the benchmark's; here, its order: 503 once the drain started.
    println!("/ready flipped {flip:?} after prestop started");
    assert_eq!(drainit.event("drain_started")["trigger"], "prestop");
    assert_eq!(drainit.get("/ready").0, 503);

    let output = hook.wait_with_output().unwrap();
    let hook_returned = Instant::now();
    assert!(
        output.status.success(),
        "prestop failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // The drain is over and drainit waits for the kubelet: the app is not stopped.
    drainit.event("waiting_for_sigterm");
    assert_eq!(
        drainit.count_events("stop_signal_sent"),
        0,
        "the app was stopped before the kubelet's SIGTERM"
    );
    assert_eq!(drainit.get("/alive").0, 200);
    assert_eq!(drainit.get("/ready").0, 503);
    assert!(hook_returned.elapsed() < SECS(2));

    let sigterm = drainit.signal_at(Signal::SIGTERM);
    let stop = drainit.app_line("demo-app: signal TERM");
    println!(
        "stop signal {:?} after the kubelet's SIGTERM",
        stop.at - sigterm
    );
    drainit.event("sigterm_after_prestop");
    assert_eq!(drainit.exit_code(SECS(5)), 7);
    assert_eq!(drainit.count_events("drain_started"), 1, "a second drain");
}

#[test]
fn prestop_blocks_for_the_drain_delay() {
    let mut drainit = Drainit::demo(&["--drain-delay", "1200ms"], &[]);
    let (output, took) = run(prestop(&drainit.control, &[]));
    assert!(output.status.success());
    assert!(
        took >= Duration::from_millis(1200) && took < SECS(3),
        "prestop returned after {took:?}"
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn prestop_after_sigterm_joins_the_drain_under_way() {
    let mut drainit = Drainit::demo(&["--drain-delay", "1s"], &[]);
    let sigterm = drainit.signal_at(Signal::SIGTERM);
    drainit.event("drain_started");
    let (output, _) = run(prestop(&drainit.control, &[]));
    assert!(output.status.success());
    let returned = sigterm.elapsed();
    assert!(
        returned >= SECS(1) && returned < SECS(3),
        "prestop returned {returned:?} after SIGTERM"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    assert_eq!(drainit.app.count(|l| l.contains("signal TERM")), 1);
}

#[test]
fn sigterm_during_a_prestop_drain_waits_for_the_drain() {
    let mut drainit = Drainit::demo(&["--drain-delay", "1500ms"], &[]);
    let hook = prestop(&drainit.control, &[]).spawn().unwrap();
    let started = Instant::now();
    drainit.event("drain_started");
    drainit.signal(Signal::SIGTERM);
    let stop = drainit.app_line("demo-app: signal TERM");
    assert!(
        stop.at - started >= Duration::from_millis(1500),
        "SIGTERM cut the prestop drain short"
    );
    drainit.event("sigterm_during_prestop");
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    let _ = hook.wait_with_output();
}

#[test]
fn without_the_kubelets_sigterm_the_app_is_stopped_after_the_handoff_window() {
    let mut drainit = Drainit::demo(&["--drain-delay", "200ms"], &[]);
    let (output, _) = run(prestop(&drainit.control, &[]));
    let returned = Instant::now();
    assert!(output.status.success());
    let stop = drainit.app_line("demo-app: signal TERM");
    let waited = stop.at - returned;
    assert!(
        waited >= Duration::from_millis(4500) && waited < SECS(8),
        "stopped {waited:?} after prestop returned"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn prestop_with_no_drainit_says_so_and_fails() {
    let (output, took) = run(prestop("@drainit-nobody-listens-here", &[]));
    assert_eq!(output.status.code(), Some(69));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no drainit is listening on @drainit-nobody-listens-here"),
        "{stderr}"
    );
    assert!(took < SECS(2));
}

#[test]
fn prestop_timeout_gives_up_with_124() {
    let mut drainit = Drainit::demo(&["--drain-delay", "20s"], &[]);
    let (output, took) = run(prestop(&drainit.control, &["--timeout", "300ms"]));
    assert_eq!(
        output.status.code(),
        Some(124),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(took < SECS(2));
    drainit.signal(Signal::SIGINT);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn prestop_after_the_app_exited_returns_at_once() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "20s"],
        &["--ignore-term", "--exit-after", "800"],
    );
    let hook = prestop(&drainit.control, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    let output = hook.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_socket_file_control_channel_works_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("drainit.sock");
    let path = path.to_str().unwrap();
    // A stale socket file from a previous run must not stop a new drainit.
    drop(std::os::unix::net::UnixListener::bind(path).unwrap());
    let mut drainit = Drainit::demo(&["--control", path, "--drain-delay", "300ms"], &[]);
    let (output, _) = run(prestop(path, &[]));
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    assert!(
        !std::path::Path::new(path).exists(),
        "drainit left its socket file behind"
    );
}

#[test]
fn a_malformed_control_request_is_refused_and_starts_no_drain() {
    use std::io::{BufRead, BufReader, Write};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};

    let mut drainit = Drainit::demo(&["--drain-delay", "300ms"], &[]);
    let name = drainit.control.strip_prefix('@').unwrap().to_owned();
    for request in ["stop\n".to_owned(), format!("{}\n", "drain".repeat(40))] {
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let mut stream = UnixStream::connect_addr(&addr).unwrap();
        stream.write_all(request.as_bytes()).unwrap();
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply).unwrap();
        assert_eq!(reply, "error: expected 'drain'\n", "for {request:?}");
    }
    assert_eq!(
        drainit.get("/ready").0,
        200,
        "a bad request started a drain"
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn prestop_from_another_user_is_refused_and_starts_no_drain() {
    let drainit = Drainit::demo(&["--drain-delay", "1s"], &[]);
    for _ in 0..3 {
        let (output, took) = run(as_nobody(prestop(&drainit.control, &[])));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(77), "{stderr}");
        assert!(stderr.contains("uid 65534"), "{stderr}");
        assert!(took < SECS(2), "refused after {took:?}");
    }
    let refused = drainit.event("drain_request_refused");
    assert!(refused["message"].as_str().unwrap().contains("uid 65534"));
    assert_eq!(drainit.get("/ready").0, 200, "a stranger started the drain");
    assert_eq!(
        drainit.count_events("drain_started"),
        0,
        "a stranger started the drain"
    );
    assert_eq!(
        drainit.count_events("drain_request_refused"),
        1,
        "repeated refusals are logged once per interval"
    );
    // drainit's own user still may.
    let (output, _) = run(prestop(&drainit.control, &[]));
    assert!(output.status.success());
    drainit.event("drain_started");
}

/// `cmd` run as uid and gid 65534 (nobody), another user than drainit's.
fn as_nobody(mut cmd: Command) -> Command {
    use std::os::unix::process::CommandExt;

    cmd.uid(65534).gid(65534);
    cmd
}
