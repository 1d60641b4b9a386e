//! End to end: drainit's default readiness, with no readiness option, in a rolling restart
//! through a real HAProxy under load, with an app that starts listening 2 s after it is spawned
//! (a small service; a JVM takes far longer).
//!
//! Each replica runs in a network namespace of its own, as in a pod: drainit and the demo app
//! (`--listen-after 2000`). HAProxy checks drainit's `/ready` on each replica (`inter 500ms fall 2
//! rise 2`) and does not retry a failed connection (`retries 0`: the client gets the error, as
//! behind kube-proxy or an AWS ALB). Each replica in turn gets SIGTERM, drains for 3 s
//! (`--drain-delay 3s`, enough for HAProxy's two failed checks), exits, and is replaced by a new
//! one in the same namespace at once; the next replica goes once HAProxy has the new one in
//! rotation.
//!
//! - With no readiness option, `/ready` answers 503 until the app listens: HAProxy takes the new
//!   replica into rotation only then, and no request fails.
//! - With `--ready-tcp none` (ready as soon as the app is spawned: the baseline, which proves the
//!   test can fail), HAProxy takes the new replica in about a second before its app listens, and
//!   the requests it routes there meanwhile are refused.
//!
//! Needs root, iproute2 (`ip netns`) and HAProxy; fails rather than skips without them.

mod common;

use std::net::SocketAddr;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use common::{
    Arrivals, Clock, Counters, Drainit, Haproxy, HealthCheck, Load, LoadReport, Netns, Replica,
    Retries, Tuning, demo, free_ports, haproxy_bin, opt_ms, outputs_but,
};

const APP_PORT: u16 = 8080;
const HEALTH_PORT: u16 = 8099;
/// The app listens this long after it is spawned.
const LISTEN_AFTER_MS: &str = "2000";
const DRAIN_DELAY: &str = "3s";
/// 200 requests/s, each on a new connection.
const LOAD: Arrivals = Arrivals::Fixed(Duration::from_millis(5));

#[test]
fn rolling_restart_with_a_slow_starting_app_loses_no_request_with_no_option() {
    let outcome = rolling_restart(&[]);
    outcome.assert_the_rollout_happened();
    assert!(
        outcome.load.failures.is_empty(),
        "{} of {} requests failed with drainit's default readiness (see the report above)",
        outcome.load.failures.len(),
        outcome.load.requests
    );
    for (server, counters) in &outcome.counters {
        assert!(
            counters.clean(),
            "HAProxy counted connection errors or 5xx on {server}: {counters:?}"
        );
    }
    for step in &outcome.steps {
        assert!(
            step.app_listening_after.is_some(),
            "HAProxy took {} into rotation {} ms after its replacement started, before its app \
             listened",
            step.server,
            step.up_after.as_millis(),
        );
    }
}

#[test]
fn rolling_restart_with_a_slow_starting_app_loses_requests_with_ready_tcp_none() {
    let outcome = rolling_restart(&["--ready-tcp", "none"]);
    outcome.assert_the_rollout_happened();
    assert!(
        !outcome.load.failures.is_empty(),
        "no request failed with --ready-tcp none: the baseline no longer shows the start-up \
         window that the default readiness closes, so the other test proves nothing ({} \
         requests; steps: {:?})",
        outcome.load.requests,
        outcome.steps
    );
}

/// One replica replaced; times from the start of its replacement.
#[derive(Debug)]
struct Step {
    server: String,
    /// None: the app did not listen yet when HAProxy took it in.
    app_listening_after: Option<Duration>,
    up_after: Duration,
}

struct Outcome {
    load: LoadReport,
    steps: Vec<Step>,
    counters: Vec<(String, Counters)>,
}

impl Outcome {
    fn assert_the_rollout_happened(&self) {
        assert!(
            self.load.requests > 1000,
            "only {} requests went through HAProxy: the load did not run",
            self.load.requests
        );
        assert_eq!(self.steps.len(), 2, "not every replica was replaced");
    }
}

fn rolling_restart(options: &[&str]) -> Outcome {
    haproxy_bin();
    let label = if options.is_empty() {
        "no readiness option".to_owned()
    } else {
        options.join(" ")
    };
    let clock = Clock::new();
    let mut replicas = Replica::start_all(&["r1", "r2"], |server, netns| {
        start_replica(server, netns, options, &clock)
    });
    let [frontend] = free_ports();
    let backends = Replica::backends(&replicas, APP_PORT, HEALTH_PORT);
    let tuning = Tuning {
        retries: Retries::Never,
        ..Tuning::default()
    };
    let haproxy = Haproxy::start_tuned(
        HealthCheck::DrainitReady,
        frontend,
        &backends,
        &tuning,
        &clock,
    );
    for r in &replicas {
        haproxy.wait_until_up(&r.server, Duration::from_secs(20), || outputs(&replicas));
    }
    clock.event(format!("{label}: both servers UP, starting the load"));
    let load = Load::start(SocketAddr::from(([127, 0, 0, 1], frontend)), LOAD, &clock);
    thread::sleep(Duration::from_millis(700));

    let mut steps = Vec::new();
    for replica in &mut replicas {
        steps.push(replace(replica, options, &haproxy, &clock));
        thread::sleep(Duration::from_millis(500));
    }
    let load = load.stop();
    let counters = replicas
        .iter()
        .map(|r| (r.server.clone(), haproxy.counters(&r.server)))
        .collect();

    println!("==== rolling restart, app listening {LISTEN_AFTER_MS} ms after spawn, {label} ====");
    for line in clock.timeline() {
        println!("  {line}");
    }
    for step in &steps {
        println!(
            "{label}: {} replaced: app listening at {}, HAProxy had it UP at {} ms after it started",
            step.server,
            opt_ms(step.app_listening_after),
            step.up_after.as_millis()
        );
    }
    println!(
        "{label}: {} requests, {} failed",
        load.requests,
        load.failures.len()
    );
    for (_, failure) in load.failures.iter().take(5) {
        println!("  failure: {failure}");
    }
    if options.is_empty() && !load.failures.is_empty() {
        println!(
            "HAProxy:\n{}\n{}",
            haproxy.proc.output(),
            outputs(&replicas)
        );
    }
    Outcome {
        load,
        steps,
        counters,
    }
}

/// SIGTERM to the replica's drainit; once it exited 0, starts the replacement in the same
/// namespace and waits until HAProxy has it in rotation.
fn replace(replica: &mut Replica, options: &[&str], haproxy: &Haproxy, clock: &Clock) -> Step {
    let server = replica.server.clone();
    kill(replica.drainit.proc.pid(), Signal::SIGTERM).expect("cannot SIGTERM the replica");
    clock.event(format!("SIGTERM to {}", replica.drainit.proc.name));
    let status = replica
        .drainit
        .proc
        .wait_exit(Duration::from_secs(12))
        .unwrap_or_else(|| {
            panic!(
                "{} did not exit within 12 s of its SIGTERM:\n{}",
                replica.drainit.proc.name,
                replica.drainit.proc.output()
            )
        });
    assert_eq!(
        status.code(),
        Some(0),
        "{} exited with {status}:\n{}",
        replica.drainit.proc.name,
        replica.drainit.proc.output()
    );
    clock.event(format!("{} exited", replica.drainit.proc.name));
    let out = haproxy.server_status(&server);
    assert!(
        !haproxy.in_rotation(&out),
        "HAProxy still has {server} in rotation ({out}) after a {DRAIN_DELAY} drain"
    );

    let started = Instant::now();
    let replacement = start_replica(&server, &replica.netns, options, clock);
    drop(std::mem::replace(&mut replica.drainit, replacement));
    // Polled together, so that the order of the two is measured, not assumed.
    let listening = format!("demo-app: listening on 0.0.0.0:{APP_PORT}");
    let mut app_listening_after = None;
    let deadline = started + Duration::from_secs(20);
    let up_after = loop {
        if app_listening_after.is_none()
            && replica
                .drainit
                .app
                .wait_for(Duration::ZERO, |l| l == listening)
                .is_some()
        {
            app_listening_after = Some(started.elapsed());
        }
        if haproxy.in_rotation(&haproxy.server_status(&server)) {
            break started.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy did not take {server} back into rotation within 20 s:
{}
HAProxy:
{}",
            replica.drainit.proc.output(),
            haproxy.proc.output()
        );
        thread::sleep(Duration::from_millis(10));
    };
    clock.event(format!("HAProxy: {server} is UP again"));
    Step {
        server,
        app_listening_after,
        up_after,
    }
}

/// drainit around the slow-starting demo app in `netns`; waits for drainit's probe server only
/// (the app listens later).
fn start_replica(server: &str, netns: &Netns, options: &[&str], clock: &Clock) -> Drainit {
    let listen = format!("0.0.0.0:{APP_PORT}");
    let app = [
        "--listen",
        &listen,
        "--listen-after",
        LISTEN_AFTER_MS,
        "--name",
        server,
    ];
    Drainit::builder()
        .name(&format!("drainit({server})"))
        .in_netns(netns)
        .health(format!("0.0.0.0:{HEALTH_PORT}"))
        .drain_delay(DRAIN_DELAY)
        .grace_period("10s")
        .options(options)
        .app(demo(&app))
        .timeline(clock, timeline_event)
        .start()
}

/// What goes into the timeline: the app's start and drainit's readiness and drain steps.
fn timeline_event(line: &str) -> Option<String> {
    if line.starts_with("demo-app: listening") {
        return Some(line.to_owned());
    }
    let log: serde_json::Value = serde_json::from_str(line).ok()?;
    match log["event"].as_str()? {
        "phase_changed" => Some(format!("phase_changed {} {}", log["from"], log["to"])),
        event @ ("app_check_passed" | "drain_started") => Some(event.to_owned()),
        _ => None,
    }
}

fn outputs(replicas: &[Replica]) -> String {
    outputs_but(replicas, None)
}
