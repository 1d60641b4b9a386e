//! The drain timeline on the real binary: SIGTERM, the 503 flip, the app kept serving, the stop
//! signal after the delay, the exit code; and what interrupts that timeline.

mod common;

use std::time::Duration;

use common::{Drainit, command, demo, http_get, is_event, time_until};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn sigterm_flips_ready_keeps_serving_then_stops_the_app_and_exits_with_its_code() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "1s", "--grace-period", "6s"],
        &["--exit-code", "3"],
    );
    let app = drainit.app_addr();
    assert_eq!(drainit.get("/ready").0, 200);
    assert_eq!(drainit.get("/alive").0, 200);

    let sigterm = drainit.signal_at(Signal::SIGTERM);
    let flip =
        time_until(SECS(5), || drainit.get("/ready").0 == 503).expect("/ready never turned 503");
    // The flip's timing bar is the benchmark's (benches/timeline.rs); here, its order: /ready
    // answers 503 once drainit says the drain started, before it sends the stop signal.
    println!("/ready flipped {flip:?} after SIGTERM");
    drainit.event("drain_started");
    assert_eq!(
        drainit.get("/ready").0,
        503,
        "drain started, /ready still 200"
    );
    assert_eq!(
        drainit.count_events("stop_signal_sent"),
        0,
        "stopped before the delay"
    );

    // Draining: not ready, still alive, and the app still answers its own traffic.
    assert_eq!(drainit.get("/alive").0, 200);
    assert_eq!(http_get(app, "/").0, 200);

    let stop = drainit.app_line("demo-app: signal TERM");
    let delay = stop.at - sigterm;
    assert!(
        delay >= SECS(1) && delay < SECS(4),
        "stop signal {delay:?} after SIGTERM, due at 1s"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 3);
    assert_eq!(
        drainit.app.count(|l| l.contains("signal TERM")),
        1,
        "exactly one stop signal"
    );

    // The timeline is in the logs, with elapsed milliseconds.
    let over = drainit.event("drain_over");
    assert!(over["elapsed_ms"].as_u64().unwrap() >= 1000, "{over}");
}

#[test]
fn stop_signal_is_configurable() {
    let mut drainit = Drainit::demo(&["--drain-delay", "200ms", "--stop-signal", "QUIT"], &[]);
    drainit.signal(Signal::SIGTERM);
    drainit.app_line("demo-app: signal QUIT");
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    assert_eq!(drainit.app.count(|l| l.contains("signal TERM")), 0);
}

#[test]
fn a_real_time_stop_signal_reaches_the_app() {
    // What systemd running as the app stops on.
    let script =
        "trap 'echo got-rtmin3; exit 0' RTMIN+3; echo trapped; while :; do sleep 0.05; done";
    let mut drainit = Drainit::start(
        &["--drain-delay", "100ms", "--stop-signal", "SIGRTMIN+3"],
        &["bash", "-c", script],
    );
    drainit.app_line("trapped");
    drainit.signal(Signal::SIGTERM);
    drainit.app_line("got-rtmin3");
    assert_eq!(drainit.event("stop_signal_sent")["signal"], "SIGRTMIN+3");
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn a_second_sigterm_during_the_drain_is_ignored() {
    let mut drainit = Drainit::demo(&["--drain-delay", "1500ms"], &[]);
    let first = drainit.signal_at(Signal::SIGTERM);
    // Sent before drainit took in the first, the two could merge into one.
    drainit.event("drain_started");
    drainit.signal(Signal::SIGTERM);
    let stop = drainit.app_line("demo-app: signal TERM");
    assert!(
        stop.at - first >= Duration::from_millis(1500),
        "second SIGTERM cut the drain short"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
    assert_eq!(drainit.app.count(|l| l.contains("signal TERM")), 1);
    drainit.event("sigterm_ignored");
}

#[test]
fn sigint_and_sigquit_cut_the_drain_short() {
    for (signal, name) in [(Signal::SIGINT, "INT"), (Signal::SIGQUIT, "QUIT")] {
        let mut drainit = Drainit::demo(&["--drain-delay", "20s"], &["--exit-code", "4"]);
        drainit.signal(Signal::SIGTERM);
        drainit.event("drain_started");
        let interrupt = drainit.signal_at(signal);
        let forwarded = drainit.app_line(&format!("demo-app: signal {name}"));
        // Long before the 20 s drain would have ended.
        assert!(
            forwarded.at - interrupt < SECS(5),
            "{name} took {:?}",
            forwarded.at - interrupt
        );
        drainit.event("drain_interrupted");
        let over = drainit.event("drain_over");
        assert_eq!(over["reason"], "cut short by SIGINT or SIGQUIT", "{over}");
        assert_eq!(drainit.exit_code(SECS(5)), 4);
        assert_eq!(
            drainit.app.count(|l| l.contains("signal TERM")),
            0,
            "{name}: app also got TERM"
        );
    }
}

#[test]
fn the_app_exiting_during_the_drain_ends_it_at_once_with_the_apps_code() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "20s"],
        &["--exit-after", "1000", "--exit-code", "9"],
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 9);
}

#[test]
fn an_app_that_ignores_the_stop_signal_is_killed_with_its_group_before_the_grace_period_ends() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "500ms", "--grace-period", "2500ms"],
        &["--ignore-term", "--spawn-grandchild"],
    );
    let grandchild: i32 = drainit
        .app_line("demo-app: grandchild pid")
        .text
        .rsplit(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!(common::is_running(grandchild));
    let sigterm = drainit.signal_at(Signal::SIGTERM);
    drainit.app_line("demo-app: signal TERM");
    assert_eq!(drainit.exit_code(SECS(10)), 137, "budget kill exits 137");
    let killed_after = sigterm.elapsed();
    // grace 2.5s - 1s margin = 1.5s after SIGTERM (generous upper bound for a loaded machine).
    assert!(
        killed_after >= Duration::from_millis(1500) && killed_after < SECS(3),
        "killed after {killed_after:?}"
    );
    assert!(
        time_until(SECS(2), || !common::is_running(grandchild)).is_some(),
        "the grandchild {grandchild} survived the budget kill"
    );
    drainit.event("budget_kill");
}

#[test]
fn exit_codes_and_deaths_by_signal_propagate() {
    for (script, expected, signal) in [
        ("exit 0", 0, None),
        ("exit 5", 5, None),
        ("kill -KILL $$", 137, Some("SIGKILL")),
        ("kill -USR1 $$", 138, Some("SIGUSR1")),
    ] {
        let mut drainit = Drainit::start(&[], &["sh", "-c", script]);
        assert_eq!(drainit.exit_code(SECS(5)), expected, "sh -c '{script}'");
        // A death by signal (a crash, the OOM killer) is a warning that names the signal.
        let exited = drainit.event("app_exited");
        assert_eq!(exited["signal"].as_str(), signal, "{exited}");
        let level = if signal.is_some() { "WARN" } else { "INFO" };
        assert_eq!(exited["level"], level, "{exited}");
    }
}

#[test]
fn other_signals_are_forwarded_to_the_app_untouched() {
    let mut drainit = Drainit::demo(&[], &[]);
    for (signal, name) in [
        (Signal::SIGHUP, "HUP"),
        (Signal::SIGUSR1, "USR1"),
        (Signal::SIGUSR2, "USR2"),
        (Signal::SIGWINCH, "WINCH"),
        (Signal::SIGALRM, "ALRM"),
        (Signal::SIGCONT, "CONT"),
    ] {
        drainit.signal(signal);
        drainit.app_line(&format!("demo-app: signal {name}"));
    }
    assert_eq!(
        drainit.get("/ready").0,
        200,
        "forwarding must not start a drain"
    );
    drainit.signal(Signal::SIGINT);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn with_group_signals_reach_every_process_of_the_app() {
    let script = r#"trap 'echo parent-hup' HUP
sh -c 'trap "echo child-hup" HUP; echo child-up; while :; do sleep 0.05; done' &
while :; do sleep 0.05; done"#;
    for (group, expect_child) in [(true, true), (false, false)] {
        let options: &[&str] = if group {
            &["--group", "--grace-period", "3s", "--drain-delay", "0"]
        } else {
            &["--grace-period", "3s", "--drain-delay", "0"]
        };
        let mut drainit = Drainit::start(options, &["sh", "-c", script]);
        drainit.app_line("child-up");
        drainit.signal(Signal::SIGHUP);
        drainit.app_line("parent-hup");
        if expect_child {
            drainit.app_line("child-hup");
        } else {
            drainit
                .app
                .assert_none_within(SECS(1), "without --group the child got HUP", |l| {
                    l == "child-hup"
                });
        }
        drainit.signal(Signal::SIGTERM);
        assert_eq!(
            drainit.exit_code(SECS(5)),
            143,
            "sh dies of the stop signal"
        );
        if !group {
            // Only the parent got the stop signal: drainit cleans up what is left of the group.
            drainit.event("leftovers_killed");
        }
    }
}

#[test]
fn environment_variables_configure_and_flags_win() {
    let mut drainit = Drainit::builder()
        .env("DRAINIT_DRAIN_DELAY", "20s")
        .env("DRAINIT_STOP_SIGNAL", "USR2")
        .drain_delay("300ms")
        .app(demo(&[]))
        .start_serving();
    let sigterm = drainit.signal_at(Signal::SIGTERM);
    let stop = drainit.app_line("demo-app: signal USR2");
    assert!(
        stop.at - sigterm < SECS(3),
        "the flag's 300ms must win over DRAINIT_DRAIN_DELAY=20s"
    );
    drainit.signal(Signal::SIGINT);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn losing_the_log_reader_neither_kills_drainit_nor_orphans_the_app() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let script = "trap 'echo usr1' USR1; echo trapped; sleep 1 & wait; wait; exit 3";
    let mut child = Drainit::builder()
        .drain_delay("200ms")
        .app(command(&["sh", "-c", script]))
        .command()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Read up to the probe server's start (signals are handled by then), then go away: every
    // later log line fails to write (EPIPE).
    let listening = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .map_while(Result::ok)
        .any(|l| is_event(&l, "probe_server_listening"));
    assert!(listening, "drainit never said its probe server listens");
    // The app's trap is set (a USR1 before it would end the app, and the test).
    let mut app = BufReader::new(child.stdout.take().unwrap());
    let mut trapped = String::new();
    app.read_line(&mut trapped).unwrap();
    assert_eq!(trapped, "trapped\n");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        Signal::SIGUSR1,
    )
    .unwrap();
    let status = common::wait_timeout(&mut child, SECS(10)).expect("drainit did not exit");
    assert_eq!(status.code(), Some(3), "drainit died instead: {status:?}");
}

#[test]
fn abrt_sys_trap_and_stkflt_reach_the_app_and_do_not_kill_drainit() {
    let script = "for s in ABRT SYS TRAP STKFLT; do trap \"echo got-$s\" $s; done; \
                  echo trapped; while :; do sleep 0.05; done";
    let mut drainit = Drainit::start(&["--drain-delay", "0"], &["bash", "-c", script]);
    drainit.app_line("trapped");
    for (signal, name) in [
        (Signal::SIGABRT, "ABRT"),
        (Signal::SIGSYS, "SYS"),
        (Signal::SIGTRAP, "TRAP"),
        (Signal::SIGSTKFLT, "STKFLT"),
    ] {
        drainit.signal(signal);
        drainit.app_line(&format!("got-{name}"));
    }
    assert_eq!(drainit.get("/alive").0, 200);
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 128 + 15);
}

#[test]
fn requests_after_the_stop_signal_are_logged_as_late_arrivals() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "200ms", "--grace-period", "10s"],
        &["--ignore-term"],
    );
    let app = drainit.app_addr();
    drainit.signal(Signal::SIGTERM);
    drainit.app_line("demo-app: signal TERM");
    // Requests until drainit reports one: the first readings after the stop signal may still
    // hold earlier arrivals, so no single request is sure to count.
    let mut late = None;
    time_until(SECS(10), || {
        assert_eq!(http_get(app, "/").0, 200, "the app stopped serving");
        late = drainit.wait_event("late_arrival", Duration::from_millis(200));
        late.is_some()
    });
    let late = late.unwrap_or_else(|| panic!("no late_arrival; logs:\n{}", drainit.logs.text()));
    assert!(late["events"].as_u64().unwrap() >= 1, "{late}");
    drainit.signal(Signal::SIGINT);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn traffic_that_never_goes_quiet_ends_the_drain_at_its_cap_and_the_log_says_why() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let mut drainit = Drainit::demo(
        &[
            "--drain-watch",
            "traffic",
            "--quiet-period",
            "1s",
            "--drain-max",
            "2s",
            "--grace-period",
            "10s",
        ],
        &[],
    );
    let app = drainit.app_addr();
    let done = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let client = {
        let (done, served) = (done.clone(), served.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                http_get(app, "/");
                served.fetch_add(1, Ordering::Relaxed);
                // A client's pace: a request every 150 ms, never 1 s of quiet.
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    assert!(time_until(SECS(5), || served.load(Ordering::Relaxed) >= 3).is_some());
    drainit.signal(Signal::SIGTERM);
    let why = drainit.event("traffic_never_quiet");
    assert!(why["last_request_ms"].as_str().is_some(), "{why}");
    let over = drainit.event("drain_over");
    assert_eq!(
        over["reason"],
        "--drain-max reached before the watchers reported drained"
    );
    done.store(true, Ordering::Relaxed);
    client.join().unwrap();
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn a_stopped_app_is_continued_with_its_stop_signal_and_exits_cleanly() {
    let mut drainit = Drainit::demo(
        &["--drain-delay", "0", "--grace-period", "5s"],
        &["--exit-code", "7"],
    );
    let app = nix::unistd::Pid::from_raw(drainit.app_pid());
    nix::sys::signal::kill(app, Signal::SIGSTOP).unwrap();
    drainit.signal(Signal::SIGTERM);
    drainit.app_line("demo-app: signal TERM");
    // Left stopped, the app would only die at the budget kill, 4 s on, with 137.
    assert_eq!(drainit.exit_code(SECS(3)), 7);
}
