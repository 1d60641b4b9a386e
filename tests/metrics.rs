//! `/metrics` scraped over HTTP from the real binary, mid-lifecycle, and checked by the real
//! `promtool` (Debian package `prometheus`, installed by .ci/run).

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Drainit, drainit_bin, http_request, metric_value as value, time_until};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn scrape(drainit: &Drainit) -> String {
    let (code, response) = http_request(drainit.health, "GET /metrics HTTP/1.0\r\n\r\n");
    assert_eq!(code, 200);
    assert!(
        response
            .to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{response}"
    );
    response.split("\r\n\r\n").nth(1).unwrap().to_owned()
}

fn promtool_check(metrics: &str) {
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool not found: install the Debian package `prometheus` (.ci/run does)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics:\n{metrics}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn metrics_follow_the_lifecycle_and_pass_promtool() {
    // An app check that keeps failing (nothing listens on port 1) keeps the app `starting`.
    let mut drainit = Drainit::demo(
        &[
            "--drain-delay",
            "300ms",
            "--ready-tcp",
            "127.0.0.1:1",
            "--ready-interval",
            "100ms",
        ],
        &[],
    );
    drainit.get("/ready");
    http_request(
        drainit.health,
        "GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n",
    );
    drainit.signal(Signal::SIGHUP);
    drainit.app_line("demo-app: signal HUP");
    assert!(
        time_until(SECS(3), || value(
            &scrape(&drainit),
            r#"drainit_app_checks_total{kind="tcp",result="fail"}"#
        )
        .is_some_and(|v| v >= 2.0))
        .is_some()
    );

    let before = scrape(&drainit);
    promtool_check(&before);
    assert_eq!(
        value(&before, r#"drainit_lifecycle_state{state="starting"}"#),
        Some(1.0),
        "{before}"
    );
    assert_eq!(
        value(&before, r#"drainit_lifecycle_state{state="ready"}"#),
        Some(0.0)
    );
    assert_eq!(
        value(
            &before,
            r#"drainit_signals_forwarded_total{signal="SIGHUP"}"#
        ),
        Some(1.0)
    );
    assert!(
        before.contains(
            r#"drainit_probe_requests_total{path="/ready",code="503",checker="kubelet"}"#
        ),
        "{before}"
    );
    assert!(
        before.contains("drainit_app_check_duration_seconds_bucket"),
        "{before}"
    );
    assert!(
        before.contains(r#"drainit_build_info{version=""#),
        "{before}"
    );

    // A prestop drain leaves the app running in `drained` until SIGTERM: scrape it there.
    let prestop = Command::new(drainit_bin())
        .args(["prestop", "--control", &drainit.control])
        .output()
        .unwrap();
    assert!(prestop.status.success());
    let drained = scrape(&drainit);
    promtool_check(&drained);
    assert_eq!(
        value(&drained, r#"drainit_lifecycle_state{state="drained"}"#),
        Some(1.0),
        "{drained}"
    );
    // Never ready: with no request seen the drain is skipped ("never_ready"); the connections
    // other tests open in this network namespace can count as requests ("delay"). Either way,
    // one drain, under one reason.
    let drains = |reason: &str| {
        value(
            &drained,
            &format!(r#"drainit_drains_total{{reason="{reason}"}}"#),
        )
        .unwrap()
    };
    assert_eq!(drains("never_ready") + drains("delay"), 1.0, "{drained}");
    assert_eq!(
        value(&drained, "drainit_drain_duration_seconds_count"),
        Some(1.0),
        "{drained}"
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}
