//! End to end: the start-up gate (`--ready-after-lb-probes`) in a rolling restart through a real
//! HAProxy under load, when the old replica stops at once.
//!
//! A Deployment of one replica with `maxSurge: 1`, as Kubernetes rolls it: the new replica starts
//! beside the old one, and as soon as the kubelet sees the new one ready, the old one goes. The
//! test plays the kubelet and the Deployment controller: it probes the new replica's `/ready`
//! every 100 ms with a `kube-probe/1.31` User-Agent and SIGKILLs the old replica (drainit and its
//! app's process group: no drain at all) the moment a probe gets 200.
//!
//! HAProxy health-checks drainit's `/ready` on each server slot (`old`, `new`) every second and
//! needs two passed checks (`inter 1s rise 2 fall 1`) to put a server in rotation. It retries a
//! request that found its server dead on the other one (`option redispatch 1`, `retry-on
//! conn-failure empty-response`), so the only requests that can fail are those that arrive
//! while HAProxy has no server in rotation: 503 "no server available".
//!
//! - With the gate (`--ready-after-lb-probes 2`), the kubelet is told 503 until HAProxy's checker
//!   has had two 200s in a row, that is until HAProxy puts the new server in rotation: stopping
//!   the old one then loses no request.
//! - Without it (the baseline, which proves the test can fail), the kubelet sees the new replica
//!   ready as soon as its app is, at least a second before HAProxy uses it, and the requests that
//!   arrive in between fail.
//!
//! The replicas run on 127.0.0.1 with ports of their own: the traffic watcher, which needs a
//! network namespace per replica, is not used. HAProxy is not optional: CI installs it, and a test
//! that skipped itself would be a test that cannot fail.

mod common;

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::process::ExitStatus;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use common::{
    Arrivals, Backend, Clock, Drainit, Haproxy, HealthCheck, Load, LoadReport, Retries, SLOW,
    Tuning, demo, free_ports, get_request, haproxy_bin, is_phase, opt_ms, try_request,
};

/// The load balancer of the issue: two passed checks 1 s apart to take a server in, one failed
/// check to take it out.
const HEALTH_CHECKS: &str = "inter 1s fall 1 rise 2";
/// HAProxy's check interval (`inter`).
const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The gate waits for the same two checks.
const GATE_PROBES: &str = "2";
const GATE_TIMEOUT: &str = "30s";
/// The kubelet's `periodSeconds`, shortened: the faster the kubelet notices, the earlier the old
/// replica goes, the harder for the gate.
const KUBELET_PERIOD: Duration = Duration::from_millis(100);
/// The kubelet's default `timeoutSeconds`.
const KUBELET_TIMEOUT: Duration = Duration::from_secs(1);
const KUBELET_AGENT: &str = "kube-probe/1.31";
/// One request through HAProxy every 5 ms (200 per second), each on a new connection.
const LOAD: Arrivals = Arrivals::Fixed(Duration::from_millis(5));
/// Load through the old replica alone before the rollout starts.
const WARMUP: Duration = Duration::from_secs(1);
/// Load after the old replica is gone: HAProxy notices within a check (1 s) and the new replica
/// serves alone.
const AFTER_STOP: Duration = Duration::from_secs(3);
/// How long the new replica may take to be seen ready by the kubelet (the gate itself should
/// open ~1-2.5 s after the app is ready); far below `GATE_TIMEOUT`, so a gate that only opened by
/// its timeout fails the test.
const READY_WITHIN: Duration = Duration::from_secs(15);

#[test]
fn rolling_restart_with_startup_gate_loses_no_request_when_the_old_replica_stops_at_once() {
    let outcome = rolling_restart(Gate::On);
    assert!(
        outcome.failures.is_empty(),
        "{} of {} requests failed in the rolling restart with the start-up gate: the kubelet saw \
         the new replica ready at +{} ms, HAProxy marked it UP at {} (see the report above)",
        outcome.failures.len(),
        outcome.requests,
        outcome.kubelet_ready.as_millis(),
        opt_ms(outcome.new_up)
    );
    outcome.assert_the_rollout_happened();
    // The gate opened on HAProxy's second passed check: the kubelet saw the replica ready once
    // HAProxy had passed it twice, and HAProxy put it in rotation before its next check.
    assert!(
        outcome.lb_passes_at_ready >= 2,
        "with the gate, the kubelet saw the new replica ready after {} passed HAProxy checks in a \
         row: the gate opened before HAProxy's second passed check",
        outcome.lb_passes_at_ready
    );
    assert!(
        outcome
            .new_up
            .is_some_and(|up| up <= outcome.kubelet_ready + CHECK_INTERVAL),
        "with the gate, HAProxy marked the new server UP at {}, not before its next check after \
         the kubelet saw it ready (+{} ms)",
        opt_ms(outcome.new_up),
        outcome.kubelet_ready.as_millis()
    );
    assert!(
        outcome.kubelet_held > 0,
        "the kubelet never got the start-up gate's 503 from the new replica: the gate did not \
         hold, so the test did not exercise it"
    );
}

#[test]
fn rolling_restart_without_startup_gate_loses_requests_when_the_old_replica_stops_at_once() {
    let outcome = rolling_restart(Gate::Off);
    outcome.assert_the_rollout_happened();
    assert!(
        outcome.new_up.is_none_or(|up| up > outcome.kubelet_ready),
        "without the gate the kubelet saw the new replica ready at +{} ms, not before HAProxy \
         marked it UP at {}: the baseline no longer has the window the gate closes",
        outcome.kubelet_ready.as_millis(),
        opt_ms(outcome.new_up)
    );
    assert!(
        !outcome.failures.is_empty(),
        "no request failed in the rolling restart without the start-up gate: the baseline no \
         longer shows the problem the gate solves, so the gated test proves nothing ({} \
         requests; kubelet saw ready at +{} ms, HAProxy marked the new server UP at {}, the old \
         one DOWN at {})",
        outcome.requests,
        outcome.kubelet_ready.as_millis(),
        opt_ms(outcome.new_up),
        opt_ms(outcome.old_down)
    );
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Gate {
    /// Both replicas run with `--ready-after-lb-probes 2 --ready-lb-timeout 30s`.
    On,
    /// The same replicas without the gate.
    Off,
}

impl Gate {
    fn label(self) -> &'static str {
        match self {
            Gate::On => "with the start-up gate",
            Gate::Off => "without the start-up gate",
        }
    }
}

/// What one rolling restart looked like; times are on the test's clock.
struct Outcome {
    requests: u64,
    failures: Vec<(Duration, String)>,
    /// Requests sent after the old replica was killed.
    requests_after_stop: u64,
    /// Probes on which the new replica's app was ready but the gate told the kubelet 503.
    kubelet_held: u32,
    /// HAProxy's passed checks in a row, as the new replica counted them when the kubelet first
    /// saw it ready.
    lb_passes_at_ready: u64,
    kubelet_ready: Duration,
    stopped: Duration,
    /// The old server's status in HAProxy when it was killed.
    old_status_at_stop: String,
    new_up: Option<Duration>,
    old_down: Option<Duration>,
}

impl Outcome {
    /// What both scenarios need to mean anything: traffic ran throughout, HAProxy was using the
    /// old server when it died, took it out, and the new one carried the load afterwards.
    fn assert_the_rollout_happened(&self) {
        assert!(
            self.requests > 300,
            "only {} requests went through HAProxy: the load did not run",
            self.requests
        );
        assert_eq!(
            self.old_status_at_stop, "UP",
            "the old server was not in rotation in HAProxy when the test killed it"
        );
        assert!(
            self.old_down.is_some_and(|down| down >= self.stopped),
            "HAProxy did not mark the old server DOWN after it was killed (DOWN at {}, killed at \
             +{} ms)",
            opt_ms(self.old_down),
            self.stopped.as_millis()
        );
        assert!(
            self.new_up.is_some(),
            "HAProxy never marked the new server UP"
        );
        assert!(
            self.requests_after_stop > 100,
            "only {} requests were sent after the old replica was killed",
            self.requests_after_stop
        );
    }
}

fn rolling_restart(gate: Gate) -> Outcome {
    haproxy_bin();
    let clock_started = SystemTime::now();
    let clock = Clock::new();
    let label = gate.label();
    let [frontend, old_app, old_health, new_app, new_health] = free_ports();
    let old_ports = Ports {
        server: "old",
        app: old_app,
        health: old_health,
    };
    let new_ports = Ports {
        server: "new",
        app: new_app,
        health: new_health,
    };

    let mut old = start_replica(gate, &old_ports, &clock);
    old.wait_serving();
    let backends: Vec<Backend> = [&old_ports, &new_ports]
        .iter()
        .map(|p| Backend {
            name: p.server.to_owned(),
            app: p.app_addr(),
            health_port: p.health,
        })
        .collect();
    let tuning = Tuning {
        check_timing: HEALTH_CHECKS.to_owned(),
        retries: Retries::Redispatch,
    };
    let haproxy = Haproxy::start_tuned(
        HealthCheck::DrainitReady,
        frontend,
        &backends,
        &tuning,
        &clock,
    );

    let statuses = Statuses::default();
    let stop_watching = AtomicBool::new(false);
    thread::scope(|scope| {
        // Stops the watcher however this closure ends, panics included: the scope joins it.
        let _stop_watching = SetOnDrop(&stop_watching);
        scope.spawn(|| statuses.watch(&haproxy, &clock, &stop_watching));

        // Before the rollout: the old server in rotation (checked, not only HAProxy's initial
        // state), the new slot empty and DOWN.
        let deadline = Instant::now() + Duration::from_secs(15);
        let checked = |server| haproxy.stat(server)["check_status"].starts_with("L7OK");
        while !(statuses.current("old") == "UP"
            && checked("old")
            && statuses.current("new").starts_with("DOWN"))
        {
            assert!(
                Instant::now() < deadline,
                "{label}: HAProxy did not get to old UP and new DOWN within 15 s (old {}, new \
                 {}):\nHAProxy:\n{}\nold replica:\n{}",
                statuses.current("old"),
                statuses.current("new"),
                haproxy.proc.output(),
                old.drainit.proc.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
        clock.event(format!(
            "{label}: old UP, new DOWN in HAProxy: starting the load"
        ));
        let load = Load::start(SocketAddr::from(([127, 0, 0, 1], frontend)), LOAD, &clock);
        thread::sleep(WARMUP);

        // The rollout: the new replica starts, the kubelet probes it.
        let new_started = clock.since_start(Instant::now());
        let new = start_replica(gate, &new_ports, &clock);
        let kubelet = Kubelet::probe_until_ready(&new_ports, &new, &clock, label);
        let kubelet_ready = clock.since_start(kubelet.ready_at);

        // The Deployment controller: the new replica is available, the old one goes at once.
        let stopped_at = Instant::now();
        let old_status_at_stop = statuses.current("old");
        old.kill_at_once();
        clock.event(format!(
            "{label}: old replica SIGKILLed (HAProxy had it {old_status_at_stop})"
        ));
        let requests_at_stop = load.requests();
        let exit = old.wait_exit(Duration::from_secs(5));
        clock.event(format!("{label}: old replica gone ({exit})"));
        assert!(
            TcpStream::connect_timeout(&old_ports.app_addr(), Duration::from_secs(1)).is_err(),
            "{label}: the old replica's app still accepts connections after its SIGKILL"
        );

        thread::sleep(AFTER_STOP.saturating_sub(stopped_at.elapsed()));
        let requests_after_stop = load.requests() - requests_at_stop;
        let LoadReport {
            requests,
            failures,
            latency,
        } = load.stop();
        clock.event(format!("{label}: load stopped"));
        stop_watching.store(true, Ordering::Relaxed);

        // HAProxy had the new slot DOWN when the new replica started, and the old server UP
        // when it was killed.
        let new_up = statuses.first("new", new_started, |s| s == "UP");
        let new_first_pass = statuses.first("new", new_started, |s| s.starts_with("DOWN 1/"));
        let stopped = clock.since_start(stopped_at);
        let old_down = statuses.first("old", stopped, |s| s.starts_with("DOWN"));
        let app_ready = new.app_ready_at(clock_started);

        let mut report = String::new();
        let r = &mut report;
        let _ = writeln!(
            r,
            "==== rolling restart behind HAProxy ({HEALTH_CHECKS}), {label} ===="
        );
        let _ = writeln!(r, "timeline (ms since the test started):");
        for line in clock.timeline() {
            let _ = writeln!(r, "  {line}");
        }
        let since = |at: Option<Duration>| {
            at.map_or_else(
                || "never".to_owned(),
                |at| {
                    format!(
                        "{:+} ms",
                        at.as_millis() as i64 - kubelet_ready.as_millis() as i64
                    )
                },
            )
        };
        let _ = writeln!(
            r,
            "{label}: relative to the kubelet seeing the new replica ready (+{} ms): its app \
             ready {}, HAProxy's first passed check of it {}, HAProxy marked it UP {}; old \
             replica killed {}, HAProxy marked it DOWN {}",
            kubelet_ready.as_millis(),
            since(app_ready),
            since(new_first_pass),
            since(new_up),
            since(Some(stopped)),
            since(old_down),
        );
        let _ = writeln!(
            r,
            "{label}: the kubelet probed {} times: {} unreachable, {} not ready, {} held by the \
             start-up gate, then ready",
            kubelet.probes, kubelet.unreachable, kubelet.not_ready, kubelet.held
        );
        for server in ["old", "new", "BACKEND"] {
            let row = haproxy.stat(server);
            let get = |k: &str| row.get(k).map_or("?", String::as_str);
            let _ = writeln!(
                r,
                "{label}: HAProxy {server}: sessions {} econ {} eresp {} retries {} redispatches \
                 {} 5xx {}",
                get("stot"),
                get("econ"),
                get("eresp"),
                get("wretr"),
                get("wredis"),
                get("hrsp_5xx")
            );
        }
        let _ = writeln!(
            r,
            "{label}: {requests} requests ({requests_after_stop} after the old replica was \
             killed), {} failed; latency max {} ms, {} took >= {} ms",
            failures.len(),
            latency.max.as_millis(),
            latency.slow,
            SLOW.as_millis()
        );
        for (_, failure) in failures.iter().take(10) {
            let _ = writeln!(r, "  failure: {failure}");
        }
        if failures.len() > 10 {
            let _ = writeln!(r, "  ... and {} more", failures.len() - 10);
        }
        if gate == Gate::On && !failures.is_empty() {
            let _ = writeln!(r, "HAProxy output:\n{}", haproxy.proc.output());
            let _ = writeln!(r, "old replica output:\n{}", old.drainit.proc.output());
            let _ = writeln!(r, "new replica output:\n{}", new.drainit.proc.output());
        }
        // One print: the two scenarios run in parallel and must not interleave their reports.
        print!("{report}");
        Outcome {
            requests,
            failures,
            requests_after_stop,
            kubelet_held: kubelet.held,
            lb_passes_at_ready: kubelet.lb_passes_at_ready,
            kubelet_ready,
            stopped,
            old_status_at_stop,
            new_up,
            old_down,
        }
    })
}

/// Sets the flag when dropped.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// HAProxy's view

/// Every status change of every server, from HAProxy's stats socket, polled every 20 ms.
#[derive(Default)]
struct Statuses {
    changes: Mutex<Vec<(Duration, String, String)>>,
}

impl Statuses {
    fn watch(&self, haproxy: &Haproxy, clock: &Clock, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            for server in ["old", "new"] {
                // HAProxy may be going away at the end of a failed test: no panic here.
                let Some(status) = haproxy.try_stat(server).map(|row| row["status"].clone()) else {
                    continue;
                };
                let previous = self.current(server);
                if previous != status {
                    let first = if previous.is_empty() {
                        " (its state before any check)"
                    } else {
                        ""
                    };
                    clock.event(format!("HAProxy stats: {server} is {status}{first}"));
                    let at = clock.since_start(Instant::now());
                    self.changes
                        .lock()
                        .unwrap()
                        .push((at, server.to_owned(), status));
                }
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last status seen, "" before the first.
    fn current(&self, server: &str) -> String {
        let changes = self.changes.lock().unwrap();
        changes
            .iter()
            .rev()
            .find(|(_, s, _)| s == server)
            .map(|(_, _, status)| status.clone())
            .unwrap_or_default()
    }

    /// When `server` first changed to a status that matches, from `since` on.
    fn first(
        &self,
        server: &str,
        since: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Option<Duration> {
        let changes = self.changes.lock().unwrap();
        changes
            .iter()
            .find(|(at, s, status)| *at >= since && s == server && matches(status))
            .map(|(at, _, _)| *at)
    }
}

// ---------------------------------------------------------------------------------------------
// The kubelet

/// What the kubelet saw of the new replica until it was ready.
struct Kubelet {
    probes: u32,
    /// No answer: drainit not listening yet.
    unreachable: u32,
    /// 503 because the app is not ready yet.
    not_ready: u32,
    /// 503 from the start-up gate: the app is ready, the load balancers have not confirmed.
    held: u32,
    ready_at: Instant,
    /// The most passed checks in a row of any load balancer, in the replica's `/status` right
    /// after the kubelet's first 200.
    lb_passes_at_ready: u64,
}

impl Kubelet {
    /// Probes `/ready` every `KUBELET_PERIOD` from the replica's start, as the kubelet does,
    /// until it answers 200.
    fn probe_until_ready(ports: &Ports, replica: &Replica, clock: &Clock, label: &str) -> Self {
        let started = Instant::now();
        let (mut probes, mut unreachable, mut not_ready, mut held) = (0, 0, 0, 0);
        let mut first_held = None;
        loop {
            let sent = Instant::now();
            probes += 1;
            match kubelet_probe(ports.health_addr()) {
                Ok((200, _)) => {
                    let ready_at = Instant::now();
                    clock.event(format!("kubelet: new replica ready (probe {probes})"));
                    let status = replica.drainit.status();
                    let lb_passes_at_ready = status["lb_probes"]["checkers"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter(|c| c["kubelet"] == false)
                        .filter_map(|c| c["consecutive_ready"].as_u64())
                        .max()
                        .unwrap_or(0);
                    return Kubelet {
                        lb_passes_at_ready,
                        probes,
                        unreachable,
                        not_ready,
                        held,
                        ready_at,
                    };
                }
                Ok((503, body)) if body.contains("start-up gate") => {
                    held += 1;
                    if first_held.is_none() {
                        first_held = Some(sent);
                        clock.event(format!(
                            "kubelet: held by the start-up gate: {}",
                            body.trim()
                        ));
                    }
                }
                Ok((503, _)) => not_ready += 1,
                Ok((code, body)) => panic!(
                    "{label}: the kubelet's /ready probe got {code}: {body}\nnew replica:\n{}",
                    replica.drainit.proc.output()
                ),
                Err(_) => unreachable += 1,
            }
            assert!(
                started.elapsed() < READY_WITHIN,
                "{label}: the kubelet did not see the new replica ready within {READY_WITHIN:?} \
                 ({probes} probes: {unreachable} unreachable, {not_ready} not ready, {held} held \
                 by the start-up gate):\nnew replica:\n{}",
                replica.drainit.proc.output()
            );
            thread::sleep((sent + KUBELET_PERIOD).saturating_duration_since(Instant::now()));
        }
    }
}

/// One kubelet HTTP probe: a new connection, HTTP/1.1, the kubelet's headers and timeout.
fn kubelet_probe(addr: SocketAddr) -> Result<(u16, String), String> {
    try_request(addr, &get_request("/ready", KUBELET_AGENT), KUBELET_TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// Replicas

struct Ports {
    server: &'static str,
    app: u16,
    health: u16,
}

impl Ports {
    fn app_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.app))
    }

    fn health_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.health))
    }
}

/// drainit around demo_app; killed with its app on drop.
struct Replica {
    drainit: Drainit,
    app: SocketAddr,
}

impl Replica {
    /// Waits until the app listens, drainit's probe server too, and the app is ready.
    fn wait_serving(&self) {
        self.drainit
            .app_line(&format!("demo-app: listening on {}", self.app));
        self.drainit.event("probe_server_listening");
        self.drainit.wait_ready();
    }

    /// When drainit logged the app ready (its lifecycle's move to `ready`), on the test's clock.
    fn app_ready_at(&self, clock_started: SystemTime) -> Option<Duration> {
        let line = self
            .drainit
            .logs
            .wait_for(Duration::ZERO, |l| is_phase(l, "ready"))?;
        let log: Value = serde_json::from_str(&line.text).ok()?;
        let at = humantime::parse_rfc3339(log["timestamp"].as_str()?).ok()?;
        at.duration_since(clock_started).ok()
    }

    /// Stops the replica at once, as a container runtime killing the pod does: SIGKILL to the
    /// app's process group and to drainit, no drain.
    fn kill_at_once(&self) {
        self.drainit.proc.kill_all();
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.drainit.proc.expect_exit(timeout, "its SIGKILL")
    }
}

/// drainit's log lines worth a place in the timeline.
fn drainit_events(line: &str) -> Option<String> {
    let log: Value = serde_json::from_str(line).ok()?;
    match log["event"].as_str()? {
        "phase_changed" => Some(format!(
            "{} -> {}",
            log["from"].as_str().unwrap_or("?"),
            log["to"].as_str().unwrap_or("?")
        )),
        event @ ("gate_opened" | "gate_timed_out" | "app_check_passed") => Some(event.to_owned()),
        _ => None,
    }
}

/// Starts one replica (the same flags for old and new, as one Deployment's pods), with the app's
/// own `/healthz` as its readiness check.
fn start_replica(gate: Gate, ports: &Ports, clock: &Clock) -> Replica {
    let healthz = format!("http://{}/healthz", ports.app_addr());
    let mut builder = Drainit::builder()
        .name(&format!("drainit({})", ports.server))
        .health(ports.health_addr())
        .options(&["--ready-http", &healthz, "--ready-interval", "200ms"]);
    if gate == Gate::On {
        builder = builder.options(&[
            "--ready-after-lb-probes",
            GATE_PROBES,
            "--ready-lb-timeout",
            GATE_TIMEOUT,
        ]);
    }
    let listen = ports.app_addr().to_string();
    let drainit = builder
        .app(demo(&["--listen", &listen, "--name", ports.server]))
        .timeline(clock, drainit_events)
        .spawn();
    clock.event(format!(
        "{} started (pid {})",
        drainit.proc.name,
        drainit.pid()
    ));
    Replica {
        drainit,
        app: ports.app_addr(),
    }
}
