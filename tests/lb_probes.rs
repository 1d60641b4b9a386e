//! `--drain-watch lb-probes` on the real binary: load-balancer checkers on /ready, told apart by
//! address and User-Agent, end the drain once each has seen it fail; the kubelet does not count.

mod common;

use std::thread;
use std::time::Duration;

use common::{Checker, Drainit, http_request, json};
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

fn evidence(drainit: &mut Drainit) -> (String, serde_json::Value) {
    let over = drainit.log("drain over");
    let reason = over["reason"].as_str().unwrap().to_owned();
    (reason, json(over["evidence"].as_str().unwrap()))
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
    thread::sleep(Duration::from_millis(800));
    let drained_after = drainit.drain_time();
    // Two 503s 200 ms apart: about 0.4 s; the 20 s cap would mean the watcher never decided.
    assert!(drained_after < SECS(3), "drain took {drained_after:?}");
    let (reason, evidence) = evidence(&mut drainit);
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
    thread::sleep(Duration::from_millis(1000));
    let drained_after = drainit.drain_time();
    assert!(
        drained_after >= Duration::from_millis(400) && drained_after < SECS(4),
        "drain took {drained_after:?}"
    );
    assert_eq!(drainit.exit_code(SECS(5)), 0);
}

#[test]
fn a_slow_checker_holds_the_drain_until_its_second_503() {
    // Checking every 0.9 s, it cannot have seen two 503s sooner than 0.9 s after SIGTERM.
    let mut drainit = watching_lb_probes("0", "2s", "5s", &[]);
    let _slow = Checker::start(&drainit, "HAProxy", Duration::from_millis(900), false);
    thread::sleep(Duration::from_millis(2000));
    let drained_after = drainit.drain_time();
    // Its second 503 comes 0.9-1.8 s after SIGTERM: never before 0.9 s.
    assert!(
        drained_after >= Duration::from_millis(900),
        "ended after {drained_after:?}"
    );
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
    thread::sleep(Duration::from_millis(500));
    let status = || {
        let (code, response) = http_request(drainit.health, "GET /status HTTP/1.0\r\n\r\n");
        assert_eq!(code, 200);
        json(response.split("\r\n\r\n").nth(1).unwrap().trim())
    };
    let ports_found = common::time_until(SECS(5), || {
        status()["traffic"]["ports"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    assert!(
        ports_found.is_some(),
        "the app's port was never discovered: {}",
        status()
    );
    let status = status();
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
    thread::sleep(Duration::from_millis(1000));
    drainit.signal(Signal::SIGTERM);
    let (reason, evidence) = evidence(&mut drainit);
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
        let request = format!(
            "GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(http_request(drainit.health, &request).0, 200);
        thread::sleep(Duration::from_millis(500));
    }
    let drained_after = drainit.drain_time();
    let (reason, evidence) = evidence(&mut drainit);
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
    let _outsider = Checker::start(&drainit, "HAProxy", Duration::from_millis(200), false);
    thread::sleep(Duration::from_millis(1000));
    let drained_after = drainit.drain_time();
    let (reason, evidence) = evidence(&mut drainit);
    assert!(
        drained_after < SECS(3),
        "drain took {drained_after:?}: {reason}"
    );
    assert_eq!(evidence["load_balancers"], 0, "{evidence}");
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}
