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

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const HAPROXY: &str = "/usr/sbin/haproxy";
/// Long enough for HAProxy to see two failed checks 500 ms apart, with room for a busy machine.
const DRAIN_DELAY: &str = "2s";
const GRACE_PERIOD: &str = "5s";
/// One request through HAProxy every `LOAD_INTERVAL` (200 per second), on a new connection.
const LOAD_INTERVAL: Duration = Duration::from_millis(5);
/// HAProxy waits min(timeout connect, 1s) before retrying a refused connection, so a request that
/// takes this long was retried at least once.
const SLOW: Duration = Duration::from_millis(900);
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
    let haproxy_bin = Path::new(HAPROXY);
    assert!(
        haproxy_bin.is_file(),
        "HAProxy is not installed at {HAPROXY}: this end-to-end test needs it (Debian/Ubuntu: \
         `apt-get install haproxy`; CI installs it). It fails rather than skips on purpose."
    );
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

    let haproxy = Haproxy::start(haproxy_bin, mode, frontend, &replicas, &clock);
    for ports in &replicas {
        haproxy.wait_until_up(ports.server, Duration::from_secs(15), &running);
    }
    clock.event(format!(
        "{label}: both servers UP in HAProxy, starting the load"
    ));

    let load = Load::start(SocketAddr::from(([127, 0, 0, 1], frontend)), &clock);
    thread::sleep(Duration::from_millis(700));

    let mut steps = Vec::new();
    for (i, ports) in replicas.iter().enumerate() {
        steps.push(replace(mode, &mut running[i], ports, &haproxy, &clock));
        // Let traffic spread over both replicas again before the next one goes.
        thread::sleep(Duration::from_millis(500));
    }
    let (requests, failures, latency) = load.stop();
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

fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()))
}

// ---------------------------------------------------------------------------------------------
// Replicas

struct Ports {
    server: &'static str,
    app: u16,
    health: u16,
}

fn drainit_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_drainit"))
}

fn demo_app_bin() -> PathBuf {
    let path = drainit_bin()
        .parent()
        .expect("drainit binary has a parent directory")
        .join("examples")
        .join("demo_app");
    assert!(
        path.is_file(),
        "demo_app example not found at {}: a plain `cargo test` builds examples, but `cargo test \
         --test haproxy` does not; build it first with `cargo build --example demo_app` (with \
         --release for a release run)",
        path.display()
    );
    path
}

/// A control socket name no other drainit on this machine uses.
fn unique_control(server: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "@drainit-e2e-{}-{server}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Starts one replica and waits until its app listens (and, with drainit, its probe server).
fn start_replica(mode: Mode, ports: &Ports, clock: &Clock) -> Proc {
    let listen = format!("127.0.0.1:{}", ports.app);
    let app_args = [
        "--listen".to_owned(),
        listen.clone(),
        "--name".to_owned(),
        ports.server.to_owned(),
    ];
    let (name, mut command) = match mode {
        Mode::Drainit => {
            let mut command = Command::new(drainit_bin());
            command
                .arg("--health-listen")
                .arg(format!("127.0.0.1:{}", ports.health))
                .arg("--control")
                .arg(unique_control(ports.server))
                .args(["--log-format", "json"])
                .args(["--drain-delay", DRAIN_DELAY])
                .args(["--grace-period", GRACE_PERIOD])
                .arg("--")
                .arg(demo_app_bin())
                .args(&app_args);
            (format!("drainit({})", ports.server), command)
        }
        Mode::Bare => {
            let mut command = Command::new(demo_app_bin());
            command.args(&app_args);
            (format!("demo_app({})", ports.server), command)
        }
    };
    let proc = Proc::spawn(&name, &mut command, None);
    let timeout = Duration::from_secs(10);
    if proc
        .wait_line(timeout, |l| l == format!("demo-app: listening on {listen}"))
        .is_none()
    {
        panic!(
            "{name}: the app did not report listening on {listen} within {timeout:?}:\n{}",
            proc.output()
        );
    }
    if mode == Mode::Drainit {
        let probe = format!("127.0.0.1:{}", ports.health);
        let line = proc
            .wait_line(timeout, |l| l.contains("probe server listening"))
            .unwrap_or_else(|| {
                panic!(
                    "{name}: no 'probe server listening' log:\n{}",
                    proc.output()
                )
            });
        let log: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("{name}: log line is not JSON ({e}): {line}"));
        let addr = log["fields"]["addr"]
            .as_str()
            .or_else(|| log["addr"].as_str())
            .unwrap_or_else(|| panic!("{name}: no addr in {line}"));
        assert_eq!(addr, probe, "{name}: probe server on the wrong address");
    }
    clock.event(format!("{} started (pid {})", name, proc.pid()));
    proc
}

// ---------------------------------------------------------------------------------------------
// HAProxy

struct Haproxy {
    // Declared first so HAProxy is killed before its directory goes.
    proc: Proc,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

/// Counters of one server, from `show stat`.
#[derive(Debug)]
struct Counters {
    econ: u64,
    eresp: u64,
    wretr: u64,
    hrsp_5xx: u64,
    chkdown: u64,
}

impl Haproxy {
    fn start(bin: &Path, mode: Mode, frontend: u16, replicas: &[Ports], clock: &Clock) -> Self {
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let socket = dir.path().join("admin.sock");
        let check = match mode {
            Mode::Drainit => "/ready",
            Mode::Bare => "/healthz",
        };
        let mut servers = String::new();
        for p in replicas {
            let port = match mode {
                Mode::Drainit => format!(" port {}", p.health),
                Mode::Bare => String::new(),
            };
            servers.push_str(&format!(
                "    server {} 127.0.0.1:{} check{port} inter 500ms fall 2 rise 2\n",
                p.server, p.app
            ));
        }
        let config = format!(
            "global
    stats socket {socket} level admin
    log stderr format short local0 info

defaults
    mode http
    log global
    # Log the requests that go wrong, and every server state change.
    option httplog
    option dontlog-normal
    # HAProxy's default, written out: a refused connection is retried on the same server (no
    # option redispatch: like a real LB that has already routed the request).
    retries 3
    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend fe
    bind 127.0.0.1:{frontend}
    default_backend be

backend be
    balance roundrobin
    option httpchk GET {check}
{servers}",
            socket = socket.display()
        );
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, &config).expect("cannot write the HAProxy configuration");

        let check = Command::new(bin)
            .arg("-c")
            .arg("-f")
            .arg(&config_path)
            .output()
            .expect("cannot run haproxy -c");
        assert!(
            check.status.success(),
            "HAProxy rejects the configuration:\n{config}\n{}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );

        let proc = Proc::spawn(
            "haproxy",
            Command::new(bin).arg("-db").arg("-f").arg(&config_path),
            Some(clock),
        );
        let haproxy = Haproxy {
            proc,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while haproxy.try_command("show info").is_err() {
            assert!(
                Instant::now() < deadline,
                "HAProxy did not come up within 10 s:\n{}",
                haproxy.proc.output()
            );
            thread::sleep(Duration::from_millis(50));
        }
        clock.event(format!("HAProxy started (pid {})", haproxy.proc.pid()));
        haproxy
    }

    fn try_command(&self, command: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// `show stat` for one server, by column name.
    fn stat(&self, server: &str) -> HashMap<String, String> {
        let answer = self
            .try_command("show stat")
            .unwrap_or_else(|e| panic!("HAProxy stats socket: {e}\n{}", self.proc.output()));
        let mut lines = answer.lines();
        let header: Vec<&str> = lines
            .next()
            .and_then(|l| l.strip_prefix("# "))
            .unwrap_or_else(|| panic!("unexpected `show stat` answer: {answer}"))
            .split(',')
            .collect();
        lines
            .map(|l| {
                header
                    .iter()
                    .zip(l.split(','))
                    .map(|(k, v)| ((*k).to_owned(), v.to_owned()))
                    .collect::<HashMap<_, _>>()
            })
            .find(|row| {
                row.get("pxname").map(String::as_str) == Some("be")
                    && row.get("svname").map(String::as_str) == Some(server)
            })
            .unwrap_or_else(|| panic!("server {server} not in `show stat`: {answer}"))
    }

    /// "UP", "UP 1/2" (one check failed), "DOWN", "DOWN 1/2" (one check passed), ...
    fn server_status(&self, server: &str) -> String {
        self.stat(server)["status"].clone()
    }

    fn counters(&self, server: &str) -> Counters {
        let row = self.stat(server);
        let n = |k: &str| row.get(k).and_then(|v| v.parse().ok()).unwrap_or(0);
        Counters {
            econ: n("econ"),
            eresp: n("eresp"),
            wretr: n("wretr"),
            hrsp_5xx: n("hrsp_5xx"),
            chkdown: n("chkdown"),
        }
    }

    fn wait_until_up(&self, server: &str, timeout: Duration, replicas: &[Proc]) {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.stat(server);
            if row["status"] == "UP" && row["check_status"].starts_with("L7OK") {
                return;
            }
            if Instant::now() > deadline {
                let outputs: Vec<String> = replicas
                    .iter()
                    .map(|r| format!("{}:\n{}", r.name, r.output()))
                    .collect();
                panic!(
                    "HAProxy did not mark {server} UP within {timeout:?} (status {}, check {}):\n\
                     HAProxy:\n{}\n{}",
                    row["status"],
                    row["check_status"],
                    self.proc.output(),
                    outputs.join("\n")
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// Open-loop load: a request every `LOAD_INTERVAL` whatever happened to the previous ones, each on
/// its own short-lived thread. (Closed-loop clients would stall on the first request HAProxy
/// holds for 3 s of retries and stop sending during exactly the outage the test measures.)
struct Load {
    stop: Arc<AtomicBool>,
    dispatcher: Option<JoinHandle<()>>,
    stats: Arc<LoadStats>,
}

impl Drop for Load {
    /// A failed test stops its load too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct LoadStats {
    requests: AtomicU64,
    slow: AtomicU64,
    max_latency_us: AtomicU64,
    failures: Mutex<Vec<(Duration, String)>>,
}

struct Latency {
    max: Duration,
    slow: u64,
}

impl Load {
    fn start(addr: SocketAddr, clock: &Clock) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let dispatcher = {
            let (stop, stats, clock) = (stop.clone(), stats.clone(), clock.clone());
            thread::spawn(move || {
                let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let (stats, clock) = (stats.clone(), clock.clone());
                    let worker = thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || one_load_request(addr, &stats, &clock))
                        .expect("cannot start a load thread");
                    in_flight.push(worker);
                    in_flight.retain(|t| !t.is_finished());
                    // A fixed rate; after a stall (a busy machine), go on from now, no burst.
                    next = (next + LOAD_INTERVAL).max(Instant::now());
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
                for worker in in_flight {
                    worker.join().expect("a load thread panicked");
                }
            })
        };
        Load {
            stop,
            dispatcher: Some(dispatcher),
            stats,
        }
    }

    /// Stops sending and waits for the requests in flight.
    fn stop(mut self) -> (u64, Vec<(Duration, String)>, Latency) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.join().expect("the load dispatcher panicked");
        }
        let mut failures = std::mem::take(&mut *self.stats.failures.lock().unwrap());
        failures.sort_by_key(|(at, _)| *at);
        let latency = Latency {
            max: Duration::from_micros(self.stats.max_latency_us.load(Ordering::Relaxed)),
            slow: self.stats.slow.load(Ordering::Relaxed),
        };
        (
            self.stats.requests.load(Ordering::Relaxed),
            failures,
            latency,
        )
    }
}

fn one_load_request(addr: SocketAddr, stats: &LoadStats, clock: &Clock) {
    let started = Instant::now();
    let result = request(addr);
    let took = started.elapsed();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats
        .max_latency_us
        .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    if took >= SLOW {
        stats.slow.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = result {
        let at = clock.since_start(started);
        let message = format!(
            "{e} (sent at +{} ms, after {} ms)",
            at.as_millis(),
            took.as_millis()
        );
        clock.event_at(at, format!("request failed: {message}"));
        stats.failures.lock().unwrap().push((at, message));
    }
}

/// One `GET /` on a new connection; Ok only for a 200 from the demo app.
fn request(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    // Longer than HAProxy's own timeouts, so that HAProxy reports its errors as status codes.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(|e| format!("socket options: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e} (got {} bytes)", response.len()))?;
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.1 200 ") {
        let first = if status_line.is_empty() {
            "empty response".to_owned()
        } else {
            status_line.to_owned()
        };
        return Err(format!(
            "{first}: {:?}",
            response.lines().last().unwrap_or("")
        ));
    }
    if !response.contains("hello from ") {
        return Err(format!("200 without the demo app's body: {response:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Processes, ports, time

/// A child process with its stdout and stderr collected line by line; killed on drop, with the
/// processes it started (drainit's app), so that nothing outlives a failed test.
struct Proc {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// With `timeline`, every line also goes to the test's timeline (for HAProxy's log).
    fn spawn(name: &str, command: &mut Command, timeline: Option<&Clock>) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let timeline = timeline.map(|clock| (clock.clone(), name.to_owned()));
        collect_lines(stdout, lines.clone(), timeline.clone());
        collect_lines(stderr, lines.clone(), timeline);
        Proc {
            name: name.to_owned(),
            child,
            lines,
            exited: None,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait failed");
        }
        self.exited
    }

    /// The first line (so far or within `timeout`) that matches.
    fn wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(line) = self.lines.lock().unwrap().iter().find(|l| matches(l)) {
                return Some(line.clone());
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn output(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let start = lines.len().saturating_sub(200);
        lines[start..]
            .iter()
            .map(|l| format!("    | {l}\n"))
            .collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.try_exit().is_some() {
            return;
        }
        // drainit's app leads its own process group: kill that group first and let drainit reap
        // it and exit (killing drainit first would leave the app to init, a zombie at best).
        let children = children_of(self.pid());
        for child in &children {
            let _ = kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
            let _ = kill(*child, Signal::SIGKILL);
        }
        if !children.is_empty() {
            let deadline = Instant::now() + Duration::from_secs(3);
            while self.try_exit().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if self.exited.is_some() {
                return;
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn collect_lines(
    pipe: impl Read + Send + 'static,
    lines: Arc<Mutex<Vec<String>>>,
    timeline: Option<(Clock, String)>,
) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            // HAProxy prints each state change twice: on stderr ("[WARNING] ...") and through
            // its log ("<1>Server ..."); the timeline takes the log.
            if let Some((clock, name)) = timeline.as_ref().filter(|_| line.starts_with('<')) {
                clock.event(format!("{name}: {line}"));
            }
            lines.lock().unwrap().push(line);
        }
    });
}

/// Direct children of `parent`, from /proc/*/stat.
fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            let after_comm = &stat[stat.rfind(')')? + 1..];
            let ppid: i32 = after_comm.split_whitespace().nth(1)?.parse().ok()?;
            (ppid == parent.as_raw()).then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// `N` distinct free ports on 127.0.0.1 (all bound at once, then released).
fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    ports.try_into().unwrap()
}

/// The test's clock and a timeline of what happened, for the report.
#[derive(Clone)]
struct Clock {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Clock {
    fn new() -> Self {
        Clock {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    fn event(&self, what: String) {
        self.event_at(self.start.elapsed(), what);
    }

    fn event_at(&self, at: Duration, what: String) {
        self.events.lock().unwrap().push((at, what));
    }

    fn timeline(&self) -> Vec<String> {
        let mut events = self.events.lock().unwrap().clone();
        events.sort_by_key(|(at, _)| *at);
        let mut lines = Vec::new();
        let mut failures_in_a_row = 0;
        for (at, what) in events {
            // Keep the timeline readable when many requests fail in a burst.
            if what.starts_with("request failed") || what.starts_with("haproxy: <6>") {
                failures_in_a_row += 1;
                if failures_in_a_row > 5 {
                    continue;
                }
            } else {
                if failures_in_a_row > 5 {
                    lines.push(format!(
                        "       ... {} more failed requests and their HAProxy logs",
                        failures_in_a_row - 5
                    ));
                }
                failures_in_a_row = 0;
            }
            lines.push(format!("{:>6} {what}", at.as_millis()));
        }
        if failures_in_a_row > 5 {
            lines.push(format!(
                "       ... {} more failed requests and their HAProxy logs",
                failures_in_a_row - 5
            ));
        }
        lines
    }
}
