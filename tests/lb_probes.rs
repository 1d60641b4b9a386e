//! `--drain-watch lb-probes` on the real binary: load-balancer checkers on /ready, told apart by
//! address and User-Agent, end the drain once each has seen it fail; the kubelet does not count.

mod common;

use std::time::Duration;

use common::{Checker, Drainit, evidence, get_request, http_request};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// drainit around the demo app, its drain watched by `lb-probes` between `min` and `max`, plus
/// `options`.
fn watching_lb_probes(min: &str, max: &str, grace_period: &str, options: &[&str]) -> Drainit {
    let mut all = vec![
        "--drain-watch",
        "lb-probes",
        "--drain-min",
        min,
        "--drain-max",
        max,
        "--grace-period",
        grace_period,
    ];
    all.extend_from_slice(options);
    Drainit::demo(&all, &[])
}

/// Why the drain ended, and what it saw.
fn drain_over(drainit: &Drainit) -> (String, serde_json::Value) {
    let over = drainit.event("drain_over");
    let reason = over["reason"].as_str().unwrap().to_owned();
    (reason, evidence(&over))
}

#[test]
fn the_drain_ends_once_every_load_balancer_saw_two_503s_and_the_kubelet_does_not_count() {
    let mut drainit = watching_lb_probes("200ms", "20s", "25s", &[]);
    let _lb = Checker::start(&drainit, "HAProxy", Duration::from_millis(200), false);
    let _kubelet = Checker::start(
        &drainit,
        "kube-probe/1.31",
        Duration::from_millis(300),
        false,
    );
    drainit.wait_checker("HAProxy");
    let drained_after = drainit.drain_time();
    // Two 503s 200 ms apart: about 0.4 s; the 20 s cap would mean the watcher never decided.
    assert!(drained_after < SECS(3), "drain took {drained_after:?}");
    let (reason, evidence) = drain_over(&drainit);
    assert_eq!(reason, "watchers report drained");
    assert_eq!(
        evidence["load_balancers"], 1,
        "the kubelet is not a load balancer: {evidence}"
    );
    assert!(
        evidence["last_lb_probe_ms"].as_i64().unwrap() >= 0,
        "{evidence}"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn a_load_balancer_that_stops_checking_counts_as_drained() {
    let mut drainit = Drainit::demo(
        &[
            "--drain-watch",
            "lb-probes",
            "--drain-min",
            "0",
            "--drain-max",
            "20s",
            "--grace-period",
            "25s",
            "--lb-unhealthy-threshold",
            "5",
        ],
        &[],
    );
    // Stops at its first 503, long before it could see five.
    let _lb = Checker::start(
        &drainit,
        "ELB-HealthChecker/2.0",
        Duration::from_millis(250),
        true,
    );
    drainit.wait_checker("ELB-HealthChecker/2.0");
    let drained_after = drainit.drain_time();
    // Drained because it stopped, long before it could have seen five 503s.
    assert!(drained_after < SECS(4), "drain took {drained_after:?}");
    let (reason, evidence) = drain_over(&drainit);
    assert_eq!(reason, "watchers report drained", "{evidence}");
    assert_eq!(evidence["load_balancers"], 1, "{evidence}");
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn a_slow_checker_holds_the_drain_until_its_second_503() {
    // Checking every 0.9 s, it cannot have seen two 503s sooner than 0.9 s after SIGTERM.
    let mut drainit = watching_lb_probes("0", "2s", "5s", &[]);
    let slow = Checker::start(&drainit, "HAProxy", Duration::from_millis(900), false);
    drainit.wait_checker("HAProxy");
    drainit.signal(Signal::SIGTERM);
    let stop = drainit.app_line("demo-app: signal TERM");
    // The drain ended after the checker was sent its second 503 (or, on a machine too slow for
    // that within 2 s, at its cap), never before.
    let (reason, evidence) = drain_over(&drainit);
    if !reason.contains("--drain-max") {
        let second = slow.nth_answer_sent(503, 2);
        assert!(
            second.is_some_and(|second| stop.at > second),
            "the drain ended before the checker's second 503: {reason}: {evidence}"
        );
    }
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn status_shows_each_checker_and_the_policy() {
    let drainit = Drainit::demo(
        &[
            "--drain-watch",
            "lb-probes,traffic",
            "--drain-max",
            "10s",
            "--grace-period",
            "15s",
        ],
        &[],
    );
    let _lb = Checker::start(&drainit, "HAProxy", Duration::from_millis(100), false);
    drainit.wait_checker("HAProxy");
    let status = drainit.wait_status(SECS(5), "the app's port was never discovered", |s| {
        s["traffic"]["ports"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    assert_eq!(status["phase"], "ready");
    assert_eq!(
        status["drain_policy"]["watch"],
        serde_json::json!(["lb-probes", "traffic"])
    );
    let checkers = status["lb_probes"]["checkers"].as_array().unwrap();
    let lb = checkers
        .iter()
        .find(|c| c["user_agent"] == "HAProxy")
        .expect("the checker is listed");
    assert!(lb["probes"].as_u64().unwrap() >= 3, "{lb}");
    assert!(lb["interval_ms"].as_u64().is_some(), "{lb}");
    drainit.signal(Signal::SIGINT);
}

#[test]
fn a_drain_held_to_its_cap_names_the_checker_that_held_it() {
    let options = ["--lb-unhealthy-threshold", "100"];
    let mut drainit = watching_lb_probes("200ms", "2s", "10s", &options);
    let _lb = Checker::start(&drainit, "NLB-probe", Duration::from_millis(200), false);
    drainit.wait_checker("NLB-probe");
    drainit.signal(Signal::SIGTERM);
    let (reason, evidence) = drain_over(&drainit);
    assert!(reason.contains("--drain-max"), "{reason}: {evidence}");
    assert_eq!(
        evidence["lb_checkers_pending"],
        serde_json::json!(["127.0.0.1 NLB-probe"]),
        "{evidence}"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

/// Issue 9: one request from anyone used to hold the drain to its cap (20 s for a drain of 1 s).
#[test]
fn a_one_off_request_does_not_hold_the_drain() {
    let mut drainit = watching_lb_probes("200ms", "20s", "25s", &[]);
    for agent in ["x", "NLB-probe"] {
        assert_eq!(
            http_request(drainit.health, &get_request("/ready", agent)).0,
            200
        );
        drainit.wait_status(SECS(5), &format!("{agent} not listed"), |s| {
            common::checker(s, agent).is_some()
        });
    }
    let drained_after = drainit.drain_time();
    let (reason, evidence) = drain_over(&drainit);
    assert!(
        drained_after < SECS(3),
        "drain took {drained_after:?}: {evidence}"
    );
    assert!(!reason.contains("--drain-max"), "{reason}: {evidence}");
    assert_eq!(evidence["load_balancers"], 0, "{evidence}");
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

/// Issue 9: `--lb-source` names the load balancers' ranges; a steady checker from elsewhere
/// (it would hold the drain to its cap) does not count.
#[test]
fn only_checkers_from_lb_source_count() {
    let options = [
        "--lb-unhealthy-threshold",
        "100",
        "--lb-source",
        "10.0.0.0/8,fd00::/8",
    ];
    let mut drainit = watching_lb_probes("200ms", "10s", "15s", &options);
    let outsider = Checker::start(&drainit, "HAProxy", Duration::from_millis(200), false);
    // drainit does not even list it: wait until it has checked steadily, five times.
    let checked = common::time_until(SECS(5), || outsider.answered(200) >= 5);
    assert!(checked.is_some(), "the outsider's checks were not answered");
    let drained_after = drainit.drain_time();
    let (reason, evidence) = drain_over(&drainit);
    assert!(
        drained_after < SECS(3),
        "drain took {drained_after:?}: {reason}"
    );
    assert_eq!(evidence["load_balancers"], 0, "{evidence}");
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}
