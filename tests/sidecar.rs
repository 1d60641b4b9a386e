//! `drainit sidecar` beside an app it did not start, in a "pod": a network namespace holding the
//! demo app and drainit as separate processes, deleted by a test kubelet as Kubernetes deletes a
//! pod, and `GET /drain/wait`, the app's preStop hook.

mod common;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::hostile::{connect_from, kubelet_probes};
use common::{
    Arrivals, Backend, Clock, Drainit, Haproxy, HealthCheck, Load, LoadReport, Netns, Proc,
    START_TIMEOUT, demo_app_bin, drainit_bin, free_ports, haproxy_bin, try_request, unique_control,
};
use nix::sys::signal::Signal;

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The app container's preStop hook, as the kubelet sends it.
const HOOK_REQUEST: &str =
    "GET /drain/wait HTTP/1.1\r\nHost: pod\r\nUser-Agent: kube-lifecycle/1.31\r\n\r\n";

/// The answer to the app's hook, and when it came.
type HookReturn = (Result<(u16, String), String>, Instant);

/// A pod: the demo app and `drainit sidecar`, separate processes in one network namespace.
struct Pod {
    // Declared first: the processes go before their namespace.
    app: Proc,
    drainit: Drainit,
    netns: Netns,
}

impl Pod {
    /// Starts the app, then drainit with `options`, and waits until drainit has it ready.
    fn start(options: &[&str]) -> Self {
        Self::start_in(Netns::create(), options)
    }

    /// `start`, in `netns`.
    fn start_in(netns: Netns, options: &[&str]) -> Self {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &netns.name])
            .arg(demo_app_bin())
            .args(["--listen", "0.0.0.0:8080", "--name", "app"]);
        let app = Proc::spawn("app", &mut command, None);
        app.wait_line(START_TIMEOUT, |l| l.starts_with("demo-app: listening on"))
            .unwrap_or_else(|| panic!("the app did not start:\n{}", app.output()));
        let drainit = Drainit::builder()
            .sidecar()
            .health("0.0.0.0:8099")
            .in_netns(&netns)
            .options(options)
            .start();
        drainit.wait_ready();
        Pod {
            app,
            drainit,
            netns,
        }
    }

    /// drainit's own preStop hook: `drainit prestop`, exec'd in its container.
    fn prestop(&self) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.netns.name])
            .arg(drainit_bin())
            .args(["prestop", "--control", &self.drainit.control])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run drainit prestop")
    }

    /// The app's preStop hook, `GET /drain/wait` at the pod's address; its answer and when.
    fn app_hook(&self) -> thread::JoinHandle<HookReturn> {
        let health = self.drainit.health;
        thread::spawn(move || {
            let answer = try_request(health, HOOK_REQUEST, SECS(30));
            (answer, Instant::now())
        })
    }

    /// How long the drain lasted, by drainit's `drain_over` line (drainit's own clock: the time
    /// the test reads the line at lags behind under load).
    fn drain_lasted(&self) -> Duration {
        let over = self.drainit.event("drain_over");
        Duration::from_millis(over["elapsed_ms"].as_u64().expect("elapsed_ms"))
    }

    /// The kubelet's SIGTERM to the app once its hook returned; the app exits.
    fn stop_app(&mut self) {
        self.app.signal(Signal::SIGTERM);
        self.app.expect_exit(SECS(5), "its SIGTERM");
    }
}

/// A pod of a rollout, replaced once: the kubelet deletes it, then a new one starts at the same
/// address once the old one has been gone for [`OLD_ADDRESS_DEAD_FOR`].
struct Replica {
    server: String,
    pod: Pod,
}

/// What the test kubelet runs at deletion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hooks {
    /// A native sidecar: `drainit prestop` and the app's `GET /drain/wait` together.
    Both,
    /// `drainit prestop` only: the app gets its SIGTERM at once (the baseline that must lose
    /// requests).
    DrainitOnly,
}

const APP_PORT: u16 = 8080;
const HEALTH_PORT: u16 = 8099;
/// ~140 requests/s, each on a new connection.
const STEADY: Arrivals = Arrivals::Fixed(Duration::from_millis(7));
/// Load before the first pod is deleted (the traffic watcher sizes its quiet period from it).
const WARMUP: Duration = Duration::from_secs(3);
/// How long after the deletion the load balancer takes the pod out (as kube-proxy or an
/// ingress following the endpoints would): the late end of the 0.5-8 s.
const LB_LAG: Duration = Duration::from_secs(6);
/// As in tests/watched_drain.rs: longer than HAProxy's retries of a refused connection on the
/// same server, so that a replacement at the same address cannot hide failures.
const OLD_ADDRESS_DEAD_FOR: Duration = Duration::from_secs(4);

/// Every replica of a two-pod deployment behind HAProxy under steady load, deleted by the test
/// kubelet as a native sidecar's pod is (with `hooks`) and replaced, one after the other. HAProxy
/// checks the app's own `/healthz` (healthy while it drains), so only the runtime API takes a
/// pod out, `LB_LAG` after its deletion. Returns the load's report.
fn rollout(label: &str, options: &[&str], hooks: Hooks) -> LoadReport {
    haproxy_bin();
    let clock = Clock::new();
    let mut replicas: Vec<Replica> = ["s1", "s2"]
        .iter()
        .map(|server| Replica {
            server: (*server).to_owned(),
            pod: Pod::start(options),
        })
        .collect();
    let [frontend] = free_ports();
    let backends: Vec<Backend> = replicas.iter().map(Replica::backend).collect();
    let haproxy = Haproxy::start(HealthCheck::AppHealthz, frontend, &backends, &clock);
    for r in &replicas {
        haproxy.wait_until_up(&r.server, SECS(15), || r.pod.drainit.proc.output());
    }
    let load = Load::start(SocketAddr::from(([127, 0, 0, 1], frontend)), STEADY, &clock);
    thread::sleep(WARMUP);
    for _ in 0..replicas.len() {
        let replica = replicas.remove(0);
        replicas.push(replica.delete_and_replace(&haproxy, hooks, options, &clock));
        thread::sleep(Duration::from_millis(500));
    }
    let report = load.stop();
    println!(
        "==== {label}: drainit sidecar {}; hooks {hooks:?} ====",
        options.join(" ")
    );
    for line in clock.timeline() {
        println!("  {line}");
    }
    println!(
        "{label}: {} requests, {} failed; latency max {} ms",
        report.requests,
        report.failures.len(),
        report.latency.max.as_millis()
    );
    for (_, failure) in report.failures.iter().take(10) {
        println!("  failure: {failure}");
    }
    assert!(report.requests > 1000, "{label}: the load did not run");
    report
}

impl Replica {
    fn backend(&self) -> Backend {
        Backend {
            name: self.server.clone(),
            app: SocketAddr::from((self.pod.netns.ip, APP_PORT)),
            health_port: HEALTH_PORT,
        }
    }

    /// The test kubelet deletes the pod: both preStop hooks at once (or drainit's only); SIGTERM
    /// to the app when its hook returns, to drainit once the app has exited (drainit exits 0 at
    /// once). The runtime API takes it out `LB_LAG` after the deletion. Then a new pod.
    fn delete_and_replace(
        self,
        haproxy: &Haproxy,
        hooks: Hooks,
        options: &[&str],
        clock: &Clock,
    ) -> Self {
        let Replica { server, mut pod } = self;
        let deleted = Instant::now();
        clock.event(format!("{server}: deleted"));
        let mut prestop = pod.prestop();
        let mut hook = (hooks == Hooks::Both).then(|| pod.app_hook());
        let (mut removed, mut app_stopped, mut drainit_stopped) = (None, false, false);
        loop {
            if removed.is_none() && deleted.elapsed() >= LB_LAG {
                haproxy.set_state(&server, "maint");
                removed = Some(Instant::now());
                clock.event(format!("{server}: taken out of rotation"));
            }
            if !app_stopped && hook.as_ref().is_none_or(|h| h.is_finished()) {
                if let Some((answer, _)) = hook.take().map(|h| h.join().unwrap()) {
                    assert_eq!(
                        answer.map(|(code, _)| code),
                        Ok(200),
                        "{server}: the app's hook"
                    );
                }
                pod.app.signal(Signal::SIGTERM);
                app_stopped = true;
                clock.event(format!("{server}: SIGTERM to the app"));
            }
            if app_stopped && !drainit_stopped && pod.app.try_exit().is_some() {
                pod.drainit.signal(Signal::SIGTERM);
                drainit_stopped = true;
                clock.event(format!("{server}: SIGTERM to drainit"));
            }
            if drainit_stopped && removed.is_some() {
                break;
            }
            assert!(
                deleted.elapsed() < SECS(30),
                "{server}: not gone 30 s after its deletion:\n{}",
                pod.drainit.proc.output()
            );
            thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(
            pod.drainit.exit_code(SECS(5)),
            0,
            "{server}: drainit's exit"
        );
        assert!(
            prestop.wait().unwrap().success(),
            "{server}: drainit prestop failed"
        );
        let drain = pod.drainit.event("drain_over");
        clock.event(format!(
            "{server}: drain over after {} ms ({})",
            drain["elapsed_ms"], drain["reason"]
        ));
        while removed.unwrap().elapsed() < OLD_ADDRESS_DEAD_FOR {
            thread::sleep(Duration::from_millis(20));
        }
        let Pod {
            app,
            drainit,
            netns,
        } = pod;
        drop((app, drainit));
        let pod = Pod::start_in(netns, options);
        haproxy.set_state(&server, "ready");
        haproxy.wait_until_up(&server, SECS(12), || pod.drainit.proc.output());
        clock.event(format!("{server}: replaced, in rotation again"));
        Replica { server, pod }
    }
}

/// A fixed drain longer than the load balancer's lag.
const FIXED: &str = "--drain-delay 8s --grace-period 12s";
/// A watched drain, ended a quiet period after the last request.
const WATCHED: &str = "--drain-watch traffic --drain-max 15s --grace-period 20s";

/// The rollout with drainit's `options` (space-separated) and `hooks`; whether requests were lost.
fn rollout_lost_requests(label: &str, options: &str, hooks: Hooks) -> bool {
    let options: Vec<&str> = options.split(' ').collect();
    let report = rollout(label, &options, hooks);
    !report.failures.is_empty()
}

#[test]
fn rollout_with_both_hooks_and_a_fixed_drain_loses_no_request() {
    assert!(!rollout_lost_requests("fixed drain", FIXED, Hooks::Both));
}

#[test]
fn rollout_with_both_hooks_and_a_watched_drain_loses_no_request() {
    assert!(!rollout_lost_requests(
        "watched drain",
        WATCHED,
        Hooks::Both
    ));
}

/// Without the app's hook the app stops at deletion while the load balancer still sends to it:
/// requests are lost (the test can fail).
#[test]
fn rollout_without_the_apps_hook_loses_requests() {
    assert!(rollout_lost_requests(
        "no app hook",
        FIXED,
        Hooks::DrainitOnly
    ));
}

/// Native sidecar (an init container with restartPolicy: Always): at deletion the kubelet runs
/// both preStop hooks at once; the app gets SIGTERM when its hook returns, drainit only once the
/// app has exited, and drainit then exits 0 at once.
#[test]
fn native_sidecar_deletion_holds_the_app_until_the_drain_is_over() {
    let mut pod = Pod::start(&["--drain-delay", "2s", "--grace-period", "10s"]);
    let status = pod.drainit.status();
    assert_eq!(status["app_pid"], serde_json::Value::Null);
    assert_eq!(
        status["app_check"]["target"],
        "every TCP port listening in the pod but drainit's own"
    );
    let deleted = Instant::now();
    let mut prestop = pod.prestop();
    let hook = pod.app_hook();

    let (answer, returned) = hook.join().unwrap();
    let (code, response) = answer.expect("the app's hook failed");
    assert_eq!(code, 200, "{response}");
    assert_eq!(pod.drainit.event("drain_started")["trigger"], "prestop");
    // The deletion came before the drain's start: a hook that returned with the drain over held
    // the app at least as long as the drain lasted.
    assert!(
        returned - deleted >= pod.drain_lasted(),
        "the app's hook returned before the drain was over"
    );
    println!("the app's hook held it {:?}", returned - deleted);
    let prestop_status = prestop.wait().unwrap();
    assert!(
        prestop_status.success(),
        "drainit prestop: {prestop_status:?}"
    );

    // The drain is over, the app not yet gone: drainit waits for its SIGTERM, not ready.
    pod.drainit.event("waiting_for_sigterm");
    assert_eq!(pod.drainit.get("/ready").0, 503);
    assert!(pod.drainit.proc.try_exit().is_none(), "drainit left early");
    pod.stop_app();

    let term = Instant::now();
    pod.drainit.signal(Signal::SIGTERM);
    assert_eq!(pod.drainit.exit_code(SECS(5)), 0);
    println!("drainit exited {:?} after its late SIGTERM", term.elapsed());
    pod.drainit.event("sidecar_done");
    assert_eq!(pod.drainit.count_events("budget_kill"), 0);
}

/// A sidecar as a regular container (clusters before 1.29): drainit's SIGTERM comes at deletion
/// with the app's hook; drainit drains, answers the hook, then exits 0.
#[test]
fn regular_container_sidecar_drains_on_sigterm_then_exits_0() {
    let mut pod = Pod::start(&["--drain-delay", "2s", "--grace-period", "10s"]);
    let deleted = Instant::now();
    let hook = pod.app_hook();
    pod.drainit.signal(Signal::SIGTERM);

    let (answer, returned) = hook.join().unwrap();
    let (code, response) = answer.expect("the app's hook failed");
    assert_eq!(code, 200, "{response}");
    assert_eq!(pod.drainit.event("drain_started")["trigger"], "SIGTERM");
    assert!(returned - deleted >= pod.drain_lasted());
    assert_eq!(pod.drainit.exit_code(SECS(10)), 0);
    pod.drainit.event("sidecar_done");
    pod.stop_app();
}

/// With no drain under way, `/drain/wait` gives one a few seconds to begin, then answers at
/// once and says why; it never starts one. (Wrapper mode serves it too.)
#[test]
fn drain_wait_with_no_drain_answers_after_the_short_wait() {
    let drainit = Drainit::demo(&[], &[]);
    let asked = Instant::now();
    let (code, response) = try_request(drainit.health, HOOK_REQUEST, SECS(30)).unwrap();
    assert_eq!(code, 409, "{response}");
    println!("answered after {:?}", asked.elapsed());
    drainit.event("drain_wait_no_drain");
    assert_eq!(drainit.get("/ready").0, 200, "the wait changed the drain");
    assert_eq!(drainit.count_events("drain_started"), 0);
    assert_eq!(
        drainit.metric("drainit_drain_waits_total{outcome=\"no_drain\"}"),
        1.0
    );
}

/// 1,000 concurrent `/drain/wait` requests from 40 addresses: at most 128 wait, the rest get 503
/// at once, and kubelet probes are answered all along.
#[test]
fn a_thousand_waiters_are_bounded_and_do_not_delay_ready() {
    let drainit = Drainit::demo(&[], &[]);
    let mut crowd = Vec::new();
    for i in 0..1000 {
        let source = Ipv4Addr::new(127, 0, 4, 1 + (i % 40) as u8);
        let mut stream = connect_from(source, drainit.health).expect("connect");
        std::io::Write::write_all(&mut stream, HOOK_REQUEST.as_bytes()).unwrap();
        crowd.push(stream);
    }
    let probes = kubelet_probes(drainit.health, SECS(2));
    let failed = probes.iter().filter(|p| p.is_none()).count();
    let slowest = probes.iter().flatten().max().copied().unwrap_or_default();
    println!(
        "{} kubelet probes under 1,000 waiters: {failed} failed, slowest {slowest:?}",
        probes.len()
    );
    assert_eq!(failed, 0, "kubelet probes failed under the waiters");

    let mut answers = std::collections::BTreeMap::new();
    for mut stream in crowd {
        stream.set_read_timeout(Some(SECS(15))).unwrap();
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        let code = response
            .split_whitespace()
            .nth(1)
            .unwrap_or("none")
            .to_owned();
        *answers.entry(code).or_insert(0) += 1;
    }
    println!("answers: {answers:?}");
    assert_eq!(answers.get("409"), Some(&128), "{answers:?}");
    assert_eq!(answers.get("503"), Some(&872), "{answers:?}");
    drainit.event("drain_wait_refused");
    assert_eq!(
        drainit.metric("drainit_drain_waits_total{outcome=\"refused\"}"),
        872.0
    );
}

/// One client cannot take every place: from one address only a few wait, and the kubelet's hook
/// from another address still waits (here for the drain that never begins: 409 after the wait).
#[test]
fn one_address_cannot_take_every_waiting_place() {
    let drainit = Drainit::demo(&[], &[]);
    let send_hook = |source: Ipv4Addr| {
        let mut stream = connect_from(source, drainit.health).expect("connect");
        std::io::Write::write_all(&mut stream, HOOK_REQUEST.as_bytes()).unwrap();
        stream.set_read_timeout(Some(SECS(15))).unwrap();
        stream
    };
    let crowd: Vec<_> = (0..200)
        .map(|_| send_hook(Ipv4Addr::new(127, 0, 5, 1)))
        .collect();
    let kubelet = send_hook(Ipv4Addr::new(127, 0, 5, 2));
    let code = |mut stream: std::net::TcpStream| {
        let mut response = String::new();
        let _ = std::io::Read::read_to_string(&mut stream, &mut response);
        response
            .split_whitespace()
            .nth(1)
            .unwrap_or("none")
            .to_owned()
    };
    let mut answers = std::collections::BTreeMap::new();
    for stream in crowd {
        *answers.entry(code(stream)).or_insert(0) += 1;
    }
    println!("one address, 200 waiters: {answers:?}");
    // The rest get 503 at once, or are cut unanswered by the per-address connection limit (64)
    // when they pile up faster than their 503s are read: neither waits.
    assert_eq!(answers.get("409"), Some(&4), "{answers:?}");
    let refused = answers.get("503").copied().unwrap_or(0);
    let cut = answers.get("none").copied().unwrap_or(0);
    assert!(refused > 0 && refused + cut == 196, "{answers:?}");
    assert_eq!(
        code(kubelet),
        "409",
        "the other address's hook waited its turn"
    );
}

#[test]
fn a_command_or_a_wrapper_only_option_in_sidecar_mode_is_refused() {
    for (args, says) in [
        (
            &["--", "/bin/true"][..],
            "drainit sidecar runs no app, but got '/bin/true' after --",
        ),
        (&["--group"], "--group only applies to drainit -- app"),
        (
            &["--stop-signal", "QUIT"],
            "--stop-signal only applies to drainit -- app",
        ),
    ] {
        let output = Command::new(drainit_bin())
            .args(["sidecar", "--health-listen", "127.0.0.1:0"])
            .args(["--control", &unique_control()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
        assert!(!stderr.contains("probe_server_listening"), "{stderr}");
    }
}
