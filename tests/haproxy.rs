//! End to end through a real load balancer: a rolling restart of two replicas behind HAProxy
//! under steady load.
//!
//! HAProxy health-checks each replica every 500 ms and needs two failed checks (`fall 2`) to take
//! it out of rotation, so it keeps routing to a replica for up to ~1.5 s after that replica starts
//! to go away. With drainit in front of each replica, `/ready` turns 503 on SIGTERM while the app
//! keeps serving for the drain delay: HAProxy marks the server DOWN before the app closes its
//! listener, and no client sees an error. Without drainit (the baseline, which proves the test can
//! fail), the app closes its listener at once on SIGTERM and the requests HAProxy still routes to
//! it fail (HAProxy has no `option redispatch`: a request is not moved to the other server).
//!
//! HAProxy is not optional: CI installs it (`apt-get install haproxy`), and a test that skipped
//! itself without it would be a test that cannot fail.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};

use common::{
    Arrivals, Backend, Clock, Counters, Drainit, Haproxy, HealthCheck, Load, LoadReport, Proc,
    SLOW, demo, demo_app_bin, free_ports, opt_ms,
};

/// Long enough for HAProxy to see two failed checks 500 ms apart, with room for a busy machine.
const DRAIN_DELAY: &str = "2s";
const GRACE_PERIOD: &str = "5s";
/// One request through HAProxy every `LOAD_INTERVAL` (200 per second), on a new connection.
const LOAD_INTERVAL: Duration = Duration::from_millis(5);
/// How long a replaced replica's address stays dead before its replacement listens there.
///
/// In a real rolling restart the replacement comes up elsewhere and the old address never answers
/// again. Here it comes back on the same ports (HAProxy's configuration is static), and HAProxy's
/// default `retries 3` retries a refused connection on the same server after 1 s, up to 3 s: a
/// replacement listening within that window would answer the retries and hide every failure of
/// the baseline. Longer than the retry window, so that the old address is as dead as in
/// production; the same in both scenarios.
const OLD_ADDRESS_DEAD_FOR: Duration = Duration::from_secs(4);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// `drainit ... -- demo_app`, HAProxy checks drainit's `/ready`.
    Drainit,
    /// `demo_app` alone, HAProxy checks the app's `/healthz`.
    Bare,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Drainit => "with drainit",
            Mode::Bare => "without drainit",
        }
    }

    /// What HAProxy checks, and its servers: the replicas on 127.0.0.1.
    fn backends(self, replicas: &[Ports]) -> (HealthCheck, Vec<Backend>) {
        let check = match self {
            Mode::Drainit => HealthCheck::DrainitReady,
            Mode::Bare => HealthCheck::AppHealthz,
        };
        let backends = replicas
            .iter()
            .map(|p| Backend {
                name: p.server.to_owned(),
                app: SocketAddr::from(([127, 0, 0, 1], p.app)),
                health_port: p.health,
            })
            .collect();
        (check, backends)
    }
}

#[test]
fn rolling_restart_behind_haproxy_with_drainit_drops_no_request() {
    let outcome = rolling_restart(Mode::Drainit);
    assert!(
        outcome.failures.is_empty(),
        "{} of {} requests failed during the rolling restart with drainit (see the timeline above)",
        outcome.failures.len(),
        outcome.requests
    );
    assert!(
        outcome.requests > 200,
        "only {} requests went through HAProxy: the load did not run",
        outcome.requests
    );
    for step in &outcome.steps {
        assert!(
            step.down_after.is_some(),
            "HAProxy never marked {} DOWN while drainit drained it",
            step.server
        );
    }
    // Exact, from HAProxy's own counters: it never hit a closed port (econ, wretr) nor lost a
    // response (eresp), so no failure was hidden by its retries either.
    for (server, counters) in &outcome.counters {
        assert_eq!(
            (
                counters.econ,
                counters.eresp,
                counters.wretr,
                counters.hrsp_5xx
            ),
            (0, 0, 0, 0),
            "HAProxy counted errors or retries on {server} (econ, eresp, wretr, 5xx)"
        );
    }
}

#[test]
fn rolling_restart_behind_haproxy_without_drainit_drops_requests() {
    let outcome = rolling_restart(Mode::Bare);
    assert!(
        outcome.requests > 200,
        "only {} requests went through HAProxy: the load did not run",
        outcome.requests
    );
    assert!(
        !outcome.failures.is_empty(),
        "no request failed during the rolling restart without drainit: the baseline no longer \
         shows the problem drainit solves, so the drainit test proves nothing ({} requests)",
        outcome.requests
    );
}

/// What a rolling restart looked like from the clients and from HAProxy.
struct Outcome {
    requests: u64,
    failures: Vec<(Duration, String)>,
    steps: Vec<Step>,
    counters: Vec<(String, Counters)>,
}

/// One replica replaced: times are from the SIGTERM.
#[derive(Debug)]
struct Step {
    server: String,
    /// When the SIGTERM was sent, on the test's clock.
    sigterm_at: Duration,
    first_failed_check_after: Option<Duration>,
    down_after: Option<Duration>,
    exited_after: Duration,
    up_again_after: Duration,
}

fn rolling_restart(mode: Mode) -> Outcome {
    common::haproxy_bin();
    let clock = Clock::new();
    let label = mode.label();

    let [frontend, app1, app2, health1, health2] = free_ports();
    let replicas = [
        Ports {
            server: "r1",
            app: app1,
            health: health1,
        },
        Ports {
            server: "r2",
            app: app2,
            health: health2,
        },
    ];
    let mut running: Vec<Proc> = replicas
        .iter()
        .map(|ports| start_replica(mode, ports, &clock))
        .collect();

    let (check, backends) = mode.backends(&replicas);
    let haproxy = Haproxy::start(check, frontend, &backends, &clock);
    for ports in &replicas {
        haproxy.wait_until_up(ports.server, Duration::from_secs(15), || {
            running
                .iter()
                .map(|r| format!("{}:\n{}", r.name, r.output()))
                .collect::<Vec<_>>()
                .join("\n")
        });
    }
    clock.event(format!(
        "{label}: both servers UP in HAProxy, starting the load"
    ));

    let load = Load::start(
        SocketAddr::from(([127, 0, 0, 1], frontend)),
        Arrivals::Fixed(LOAD_INTERVAL),
        &clock,
    );
    thread::sleep(Duration::from_millis(700));

    let mut steps = Vec::new();
    for (i, ports) in replicas.iter().enumerate() {
        steps.push(replace(mode, &mut running[i], ports, &haproxy, &clock));
        // Let traffic spread over both replicas again before the next one goes.
        thread::sleep(Duration::from_millis(500));
    }
    let LoadReport {
        requests,
        failures,
        latency,
    } = load.stop();
    clock.event(format!("{label}: load stopped"));

    let counters: Vec<(String, Counters)> = replicas
        .iter()
        .map(|p| (p.server.to_owned(), haproxy.counters(p.server)))
        .collect();

    println!("==== rolling restart behind HAProxy, {label} ====");
    println!("timeline (ms since the test started):");
    for line in clock.timeline() {
        println!("  {line}");
    }
    for step in &steps {
        let window = step.sigterm_at..step.sigterm_at + step.up_again_after;
        let failed = failures
            .iter()
            .filter(|(at, _)| window.contains(at))
            .count();
        println!(
            "{label}: replaced {}: first failed check {}, DOWN {}, old replica exited {} ms, \
             new one UP {} ms after the SIGTERM; {failed} requests sent meanwhile failed",
            step.server,
            opt_ms(step.first_failed_check_after),
            opt_ms(step.down_after),
            step.exited_after.as_millis(),
            step.up_again_after.as_millis()
        );
    }
    for (server, c) in &counters {
        println!(
            "{label}: HAProxy counters for {server}: econ {} eresp {} wretr {} 5xx {} chkdown {}",
            c.econ, c.eresp, c.wretr, c.hrsp_5xx, c.chkdown
        );
    }
    println!(
        "{label}: {requests} requests, {} failed; latency max {} ms, {} took >= {} ms",
        failures.len(),
        latency.max.as_millis(),
        latency.slow,
        SLOW.as_millis()
    );
    for (_, failure) in failures.iter().take(20) {
        println!("  failure: {failure}");
    }
    if failures.len() > 20 {
        println!("  ... and {} more", failures.len() - 20);
    }
    if mode == Mode::Drainit && !failures.is_empty() {
        println!("HAProxy output:\n{}", haproxy.proc.output());
        for replica in &running {
            println!("{} output:\n{}", replica.name, replica.output());
        }
    }
    Outcome {
        requests,
        failures,
        steps,
        counters,
    }
}

/// SIGTERM to the replica, wait for it to exit 0, start its replacement on the same ports once the
/// old address has been dead for `OLD_ADDRESS_DEAD_FOR`, wait for HAProxy to have it UP again.
fn replace(
    mode: Mode,
    replica: &mut Proc,
    ports: &Ports,
    haproxy: &Haproxy,
    clock: &Clock,
) -> Step {
    let server = ports.server;
    let label = mode.label();
    let sigterm = Instant::now();
    kill(replica.pid(), Signal::SIGTERM).expect("cannot SIGTERM the replica");
    clock.event(format!("{label}: SIGTERM to {}", replica.name));

    let mut watch = StatusWatch {
        server,
        label,
        sigterm,
        first_failed_check: None,
        down: None,
    };
    let deadline = sigterm + Duration::from_secs(12);
    let status = loop {
        watch.poll(haproxy, clock);
        if let Some(status) = replica.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{} did not exit within 12 s of its SIGTERM (grace period {GRACE_PERIOD}):\n{}",
            replica.name,
            replica.output()
        );
        thread::sleep(Duration::from_millis(20));
    };
    let exited = Instant::now();
    let exited_after = sigterm.elapsed();
    clock.event(format!("{label}: {} exited: {status}", replica.name));
    assert_eq!(
        status.code(),
        Some(0),
        "{} exited with {status}, expected 0:\n{}",
        replica.name,
        replica.output()
    );

    while exited.elapsed() < OLD_ADDRESS_DEAD_FOR {
        watch.poll(haproxy, clock);
        thread::sleep(Duration::from_millis(20));
    }
    let replacement = start_replica(mode, ports, clock);
    drop(std::mem::replace(replica, replacement));

    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let status = watch.poll(haproxy, clock);
        // HAProxy has long noticed the old replica is gone (its address was dead for seconds):
        // UP now means the replacement passed its checks.
        if status == "UP" && watch.down.is_some() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "HAProxy did not mark {server} UP within 12 s of its replacement starting (status \
             {status}, DOWN seen: {}):\nreplacement output:\n{}\nHAProxy output:\n{}",
            watch.down.is_some(),
            replica.output(),
            haproxy.proc.output()
        );
        thread::sleep(Duration::from_millis(20));
    }
    let up_again_after = sigterm.elapsed();
    clock.event(format!("{label}: HAProxy: {server} is UP again"));
    Step {
        server: server.to_owned(),
        sigterm_at: clock.since_start(sigterm),
        first_failed_check_after: watch.first_failed_check,
        down_after: watch.down,
        exited_after,
        up_again_after,
    }
}

/// Follows one server's status in HAProxy from the SIGTERM of its replica.
struct StatusWatch<'a> {
    server: &'a str,
    label: &'a str,
    sigterm: Instant,
    first_failed_check: Option<Duration>,
    down: Option<Duration>,
}

impl StatusWatch<'_> {
    fn poll(&mut self, haproxy: &Haproxy, clock: &Clock) -> String {
        let status = haproxy.server_status(self.server);
        let (server, label) = (self.server, self.label);
        if self.first_failed_check.is_none() && status != "UP" {
            self.first_failed_check = Some(self.sigterm.elapsed());
            clock.event(format!("{label}: HAProxy: {server} is {status}"));
        }
        if self.down.is_none() && status.starts_with("DOWN") {
            self.down = Some(self.sigterm.elapsed());
            clock.event(format!("{label}: HAProxy: {server} is {status}"));
        }
        status
    }
}

// ---------------------------------------------------------------------------------------------
// Replicas

struct Ports {
    server: &'static str,
    app: u16,
    health: u16,
}

/// Starts one replica and waits until its app listens (and, with drainit, its probe server).
fn start_replica(mode: Mode, ports: &Ports, clock: &Clock) -> Proc {
    let listen = format!("127.0.0.1:{}", ports.app);
    let app_args = ["--listen", &listen, "--name", ports.server];
    let proc = match mode {
        Mode::Drainit => {
            let drainit = Drainit::builder()
                .name(&format!("drainit({})", ports.server))
                .health(format!("127.0.0.1:{}", ports.health))
                .drain_delay(DRAIN_DELAY)
                .grace_period(GRACE_PERIOD)
                .app(demo(&app_args))
                .start();
            let probe = format!("127.0.0.1:{}", ports.health);
            let listening = drainit.event("probe_server_listening");
            assert_eq!(
                listening["addr"], probe,
                "probe server on the wrong address"
            );
            drainit.proc
        }
        Mode::Bare => {
            let mut command = Command::new(demo_app_bin());
            command.args(app_args);
            Proc::spawn(&format!("demo_app({})", ports.server), &mut command, None)
        }
    };
    let timeout = Duration::from_secs(10);
    if proc
        .wait_line(timeout, |l| l == format!("demo-app: listening on {listen}"))
        .is_none()
    {
        panic!(
            "{}: the app did not report listening on {listen} within {timeout:?}:\n{}",
            proc.name,
            proc.output()
        );
    }
    clock.event(format!("{} started (pid {})", proc.name, proc.pid()));
    proc
}
