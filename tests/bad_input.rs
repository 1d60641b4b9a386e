//! Every kind of bad input gets one clear line, the documented exit code, and nothing started.

mod common;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use common::{Drainit, assert_refused, command, drainit_bin, refused_with};

/// Asserts the exit code and a single stderr line containing `says`.
fn assert_output(args: &[&str], code: i32, says: &str) {
    refused_with(args, &[], code, says);
}

#[test]
fn no_command() {
    assert_output(&[], 2, "no command to run: put the app after --");
    assert_output(&["--"], 2, "no command to run");
    assert_output(&["--drain-delay", "1s"], 2, "no command to run");
}

#[test]
fn command_not_found_is_127() {
    assert_output(
        &["--", "/nonexistent/app"],
        127,
        "cannot run '/nonexistent/app'",
    );
    assert_output(&["--", "no-such-command-anywhere"], 127, "No such file");
    // Silencing the log does not silence why nothing started.
    assert_output(
        &["--log-level", "off", "--", "/nonexistent/app"],
        127,
        "cannot run '/nonexistent/app'",
    );
}

#[test]
fn command_not_executable_is_126() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("app.sh");
    std::fs::write(&script, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o644)).unwrap();
    assert_output(&["--", script.to_str().unwrap()], 126, "chmod +x");
    assert_output(&["--", dir.path().to_str().unwrap()], 126, "cannot run");
}

#[test]
fn bad_flags_and_values_are_usage_errors() {
    for (args, says) in [
        (
            &["--no-such-flag"][..],
            "unexpected argument '--no-such-flag'",
        ),
        (
            &["--drain-delay", "soon"],
            "expected a duration like 500ms, 15s, 2m",
        ),
        (&["--grace-period=-3s"], "expected a duration"),
        (&["--grace-period", "300000000000y"], "limit of 10 years"),
        (&["--grace-period", "1h1h"], "gives the unit 'h' twice"),
        (&["--stop-signal", "SIGNOPE"], "expected a signal like TERM"),
        (&["--stop-signal", "99"], "expected a signal like TERM"),
        (&["--stop-signal", "STOP"], "cannot ask the app to stop"),
        (&["--drain-delay", "-5s"], "cannot be negative"),
        (&["sleep", "1"], "put the app after --"),
        (&["--health-listen", "localhost"], "expected IP:PORT"),
        (&["--health-listen", "1.2.3.4:70000"], "expected IP:PORT"),
        (&["--control", "@"], "expected @name"),
        (&["--log-format", "xml"], "invalid value 'xml'"),
        (&["--log-level", "info,=="], "invalid --log-level"),
    ] {
        assert_refused(args, 2, says);
    }
}

#[test]
fn watched_drain_options_are_checked() {
    assert_refused(
        &["--drain-watch", "endpoints"],
        2,
        "use traffic, lb-probes or both",
    );
    assert_refused(
        &[
            "--drain-watch",
            "traffic",
            "--drain-min",
            "5s",
            "--drain-max",
            "3s",
        ],
        2,
        "--drain-min 5s is longer than --drain-max 3s",
    );
    assert_refused(
        &["--drain-watch", "traffic", "--drain-max", "40s"],
        2,
        "use --drain-max 28s or less",
    );
    assert_refused(
        &["--drain-watch", "traffic", "--quiet-period", "often"],
        2,
        "or auto",
    );
    assert_refused(
        &[
            "--drain-watch",
            "lb-probes",
            "--lb-unhealthy-threshold",
            "0",
        ],
        2,
        "--lb-unhealthy-threshold",
    );
    assert_refused(&["--app-port", "http"], 2, "--app-port");
    // Options of a watched drain without --drain-watch would be silently ignored: refused instead.
    assert_refused(
        &["--drain-max", "10s"],
        2,
        "--drain-max only applies to a watched drain",
    );
    assert_refused(
        &["--quiet-period", "2s"],
        2,
        "--quiet-period only applies to a watched drain",
    );
    for (args, says) in [
        (
            &["--drain-min", "40s"][..],
            "--drain-min only applies to a watched drain",
        ),
        (
            &["--drain-watch", "lb-probes", "--quiet-period", "2s"],
            "--quiet-period only applies to --drain-watch traffic",
        ),
        (
            &["--drain-watch", "traffic", "--lb-unhealthy-threshold", "3"],
            "--lb-unhealthy-threshold only applies to --drain-watch lb-probes",
        ),
        (
            &[
                "--drain-watch",
                "traffic",
                "--drain-max",
                "3s",
                "--quiet-period",
                "10s",
            ],
            "traffic could never count as quiet",
        ),
        (
            &[
                "--drain-watch",
                "traffic",
                "--drain-delay",
                "20s",
                "--drain-max",
                "10s",
            ],
            "--drain-delay and --drain-max both set the longest watched drain",
        ),
        // --drain-max defaults to --drain-delay: the error names the flag the user set.
        (
            &["--drain-watch", "traffic", "--drain-delay", "40s"],
            "use --drain-delay 28s or less",
        ),
        (&["--app-port", "0"], "--app-port 0 is not a port"),
    ] {
        assert_refused(args, 2, says);
    }
}

#[test]
fn readiness_options_are_checked() {
    assert_refused(
        &["--ready-http", "https://x/healthz"],
        2,
        "only http:// is supported",
    );
    assert_refused(
        &["--ready-http", "localhost:8080/healthz"],
        2,
        "invalid --ready-http",
    );
    assert_refused(&["--ready-tcp", "localhost"], 2, "expected HOST:PORT");
    assert_refused(
        &["--ready-exec", "check 'unterminated"],
        2,
        "invalid --ready-exec",
    );
    assert_refused(
        &["--ready-tcp", "a:1", "--ready-http", "http://a/"],
        2,
        "cannot be used with",
    );
    assert_refused(
        &["--ready-tcp", "a:1", "--ready-interval", "0"],
        2,
        "busy loop",
    );
    assert_refused(
        &["--ready-tcp", "a:1", "--ready-timeout", "0"],
        2,
        "no time to answer",
    );
    assert_refused(
        &["--ready-tcp", "none", "--ready-timeout", "2s"],
        2,
        "--ready-timeout only applies to an app check: drop --ready-tcp none",
    );
    assert_refused(
        &["--ready-tcp", "none", "--min-ready", "5s"],
        2,
        "--min-ready only applies to an app check",
    );
    assert_refused(
        &["--ready-tcp", "auto", "--ready-exec", "/bin/true"],
        2,
        "cannot be used with",
    );
    assert_refused(&["--ready-tcp", "maybe"], 2, "auto or none");
    assert_refused(
        &["--health-listen", "127.0.0.1:9000", "--app-port", "9000"],
        2,
        "--app-port 9000 is drainit's own probe port",
    );
    assert_refused(&["--ready-tcp", "a:0"], 2, "expected HOST:PORT");
    assert_refused(
        &["--ready-http", "http://127.0.0.1:99999/"],
        2,
        "the port must be 1-65535",
    );
    assert_refused(
        &["--ready-exec", "/nonexistent/check"],
        127,
        "--ready-exec: cannot run",
    );
    assert_refused(&["--ready-exec", "/etc/passwd --ready"], 126, "chmod +x");
    assert_refused(
        &["--ready-after-lb-probes", "2", "--ready-lb-timeout", "0s"],
        2,
        "opens the gate at once",
    );
    assert_refused(
        &["--ready-lb-timeout", "10s"],
        2,
        "add --ready-after-lb-probes",
    );
    assert_refused(
        &["--ready-after-lb-probes", "0"],
        2,
        "--ready-after-lb-probes",
    );
}

#[test]
fn bad_environment_values_are_usage_errors_too() {
    refused_with(
        &["--", "true"],
        &[("DRAINIT_DRAIN_DELAY", "forever")],
        2,
        "forever",
    );
}

#[test]
fn a_variable_with_no_effect_is_a_warning_where_the_flag_is_an_error() {
    // A ConfigMap shared by pods that do and do not watch their drain must not crash-loop some.
    let mut drainit = Drainit::builder()
        .env("DRAINIT_DRAIN_MIN", "500ms")
        .env("DRAINIT_DRAIN_DELAY", "20s")
        .options(&["--drain-watch", "traffic", "--drain-max", "2s"])
        .grace_period("10s")
        .app(command(&["sleep", "30"]))
        .start();
    let ignored = drainit.event("drain_delay_ignored");
    assert_eq!(ignored["level"], "WARN", "{ignored}");
    drainit.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(drainit.exit_code(Duration::from_secs(10)), 143);
    let mut lonely = Drainit::builder()
        .env("DRAINIT_QUIET_PERIOD", "2s")
        .app(command(&["true"]))
        .start();
    let ignored = lonely.event("variable_ignored");
    assert!(
        ignored["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("DRAINIT_QUIET_PERIOD is ignored")),
        "{ignored}"
    );
    assert_eq!(lonely.exit_code(Duration::from_secs(5)), 0);
}

#[test]
fn a_drain_that_does_not_fit_the_grace_period_says_what_would() {
    assert_refused(
        &["--drain-delay", "40s", "--grace-period", "30s"],
        2,
        "use --drain-delay 28s or less, or --grace-period 42s or more",
    );
    assert_refused(&["--drain-delay", "29s"], 2, "--drain-delay 28s or less");
    assert_refused(
        &["--drain-delay", "0", "--grace-period", "1s"],
        2,
        "--grace-period 2s or more",
    );
}

#[test]
fn a_busy_health_port_fails_before_the_app_starts() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_refused(
        &["--health-listen", &addr],
        71,
        "cannot listen for probes on",
    );
}

#[test]
fn a_control_socket_in_use_fails_before_the_app_starts() {
    let running = Drainit::demo(&[], &[]);
    assert_refused(
        &["--control", &running.control],
        71,
        "another drainit already runs in this pod",
    );
}

#[test]
fn a_control_path_that_is_not_a_socket_is_never_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("notes.txt");
    std::fs::write(&file, "keep me").unwrap();
    assert_refused(
        &["--control", file.to_str().unwrap()],
        71,
        "a file that is not a socket is in the way",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

#[test]
fn help_and_version_exit_0() {
    for flag in ["--help", "--version"] {
        let output = Command::new(drainit_bin()).arg(flag).output().unwrap();
        assert!(output.status.success(), "{flag}");
        assert!(!output.stdout.is_empty(), "{flag}");
    }
    let help = Command::new(drainit_bin()).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for documented in [
        "DRAINIT_DRAIN_DELAY",
        "--grace-period",
        "--stop-signal",
        "prestop",
        "--control",
    ] {
        assert!(
            help.contains(documented),
            "--help does not mention {documented}"
        );
    }
}
