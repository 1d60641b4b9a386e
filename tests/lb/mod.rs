//! Shared harness of the end-to-end tests through a real load balancer (`tests/haproxy.rs`,
//! `tests/watched_drain.rs`): child processes with their output, a timeline, HAProxy with its
//! admin socket, an open-loop load generator, and network namespaces that give each replica its
//! own TCP counters, as a pod has.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// HAProxy waits min(timeout connect, 1s) before retrying a refused connection, so a request that
/// takes this long was retried at least once.
pub const SLOW: Duration = Duration::from_millis(900);

// ---------------------------------------------------------------------------------------------
// Binaries

#[path = "../binaries/mod.rs"]
mod binaries;
pub use binaries::{demo_app_bin, drainit_bin};
#[path = "../procfs/mod.rs"]
mod procfs;

/// Fails (rather than skips) when HAProxy is missing: a test that skipped itself would be a test
/// that cannot fail.
pub fn haproxy_bin() -> &'static Path {
    let bin = Path::new(HAPROXY);
    assert!(
        bin.is_file(),
        "HAProxy is not installed at {HAPROXY}: this end-to-end test needs it (Debian/Ubuntu: \
         `apt-get install haproxy`; CI installs it). It fails rather than skips on purpose."
    );
    bin
}

/// A control socket name no other drainit on this machine uses.
pub fn unique_control(server: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!(
        "@drainit-e2e-{}-{server}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------------
// Processes

/// Turns an output line into a timeline event, or None to leave it out of the timeline.
pub type LineFilter = fn(&str) -> Option<String>;

/// A child process with its stdout and stderr collected line by line; killed on drop, with the
/// processes it started (drainit's app), so that nothing outlives a failed test.
pub struct Proc {
    pub name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// With `timeline`, the lines its filter keeps also go to the test's timeline.
    pub fn spawn(
        name: &str,
        command: &mut Command,
        timeline: Option<(&Clock, LineFilter)>,
    ) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let timeline = timeline.map(|(clock, filter)| (clock.clone(), name.to_owned(), filter));
        collect_lines(stdout, lines.clone(), timeline.clone());
        collect_lines(stderr, lines.clone(), timeline);
        Proc {
            name: name.to_owned(),
            child,
            lines,
            exited: None,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait failed");
        }
        self.exited
    }

    /// The first line (so far or within `timeout`) that matches.
    pub fn wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
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

    /// Every line so far.
    pub fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// The last 200 lines, indented, for failure messages.
    pub fn output(&self) -> String {
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
    timeline: Option<(Clock, String, LineFilter)>,
) {
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            if let Some((clock, name, filter)) = timeline.as_ref() {
                if let Some(event) = filter(&line) {
                    clock.event(format!("{name}: {event}"));
                }
            }
            lines.lock().unwrap().push(line);
        }
    });
}

/// Direct children of `parent`, from /proc/*/stat.
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            (procfs::parent_of(pid)? == parent.as_raw()).then(|| Pid::from_raw(pid))
        })
        .collect()
}

/// `N` distinct free ports on 127.0.0.1 (all bound at once, then released).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").expect("cannot bind 127.0.0.1:0"))
        .collect();
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    ports.try_into().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Time

/// The test's clock and a timeline of what happened, for the report.
#[derive(Clone)]
pub struct Clock {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    pub fn event(&self, what: String) {
        self.event_at(self.start.elapsed(), what);
    }

    pub fn event_at(&self, at: Duration, what: String) {
        self.events.lock().unwrap().push((at, what));
    }

    pub fn timeline(&self) -> Vec<String> {
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

pub fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()))
}

// ---------------------------------------------------------------------------------------------
// HAProxy

/// How HAProxy decides whether a server is in rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCheck {
    /// `option httpchk GET /ready` on drainit's probe port.
    DrainitReady,
    /// `option httpchk GET /healthz` on the app's own port: the app stays healthy while it
    /// drains, so only the runtime API takes it out of rotation.
    AppHealthz,
    /// No checks: only the runtime API (`set server ... state maint|ready`) takes servers out and
    /// back, as kube-proxy follows the endpoints.
    None,
}

/// One `server` line of the backend.
pub struct Backend {
    pub name: String,
    pub app: SocketAddr,
    pub health_port: u16,
}

/// Counters of one server, from `show stat`.
#[derive(Debug)]
pub struct Counters {
    pub econ: u64,
    pub eresp: u64,
    pub wretr: u64,
    pub hrsp_5xx: u64,
    pub chkdown: u64,
}

impl Counters {
    /// No connection error, lost response, retry or 5xx: no failure, not even one hidden by
    /// HAProxy's retries.
    pub fn clean(&self) -> bool {
        (self.econ, self.eresp, self.wretr, self.hrsp_5xx) == (0, 0, 0, 0)
    }
}

/// What `Haproxy::start_tuned` may change in the configuration.
#[derive(Debug, Clone)]
pub struct Tuning {
    /// The check parameters of every `server` line, after `check` (and its port).
    pub check_timing: String,
    pub retries: Retries,
}

/// What HAProxy does with a request whose connection to the server failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retries {
    /// HAProxy's default: retry a refused connection on the same server, up to 3 times.
    SameServer,
    /// Retry on another server (`option redispatch 1`), a refused connection and a connection
    /// closed before any response alike.
    Redispatch,
    /// No retry (`retries 0`): the client gets the error, as behind kube-proxy (a refused
    /// connection is the client's) or an AWS ALB (502).
    Never,
}

impl Default for Tuning {
    /// What `Haproxy::start` uses.
    fn default() -> Self {
        Tuning {
            check_timing: "inter 500ms fall 2 rise 2".to_owned(),
            retries: Retries::SameServer,
        }
    }
}

const NO_REDISPATCH: &str =
    "    # HAProxy's default, written out: a refused connection is retried on the same server (no
    # option redispatch: like a real LB that has already routed the request).
    retries 3
";

const REDISPATCH: &str = "    # A refused connection, or one closed before any response (a server killed with requests in
    # its accept queue), is retried on another server (at once if one is in rotation, else
    # after 1 s): what a load balancer does for idempotent requests to a server that died.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response
";

const NO_RETRIES: &str =
    "    # A failed connection is the client's error, as behind kube-proxy or an AWS ALB.
    retries 0
";

/// With retries on another server, a request that succeeded after one would be logged (and
/// shown in the timeline as if it had failed): count it in the stats (`wretr`, `wredis`) only.
const QUIET_RETRIES: &str = "    http-response set-log-level silent if { status 200 }
";

pub struct Haproxy {
    // Declared first so HAProxy is killed before its directory goes.
    pub proc: Proc,
    socket: PathBuf,
    pub check: HealthCheck,
    _dir: tempfile::TempDir,
}

impl Haproxy {
    /// HAProxy in the test's network namespace, its frontend on 127.0.0.1:`frontend`, one
    /// round-robin backend `be`; every server line logs to the timeline.
    pub fn start(check: HealthCheck, frontend: u16, backends: &[Backend], clock: &Clock) -> Self {
        Self::start_tuned(check, frontend, backends, &Tuning::default(), clock)
    }

    /// `start` with other check timings or retry policy.
    pub fn start_tuned(
        check: HealthCheck,
        frontend: u16,
        backends: &[Backend],
        tuning: &Tuning,
        clock: &Clock,
    ) -> Self {
        let bin = haproxy_bin();
        let timing = tuning.check_timing.as_str();
        let dir = tempfile::tempdir().expect("cannot create a temporary directory");
        let socket = dir.path().join("admin.sock");
        let option = match check {
            HealthCheck::DrainitReady => "    option httpchk GET /ready\n",
            HealthCheck::AppHealthz => "    option httpchk GET /healthz\n",
            HealthCheck::None => "",
        };
        let mut servers = String::new();
        for b in backends {
            let checks = match check {
                HealthCheck::DrainitReady => format!(" check port {} {timing}", b.health_port),
                HealthCheck::AppHealthz => format!(" check {timing}"),
                HealthCheck::None => String::new(),
            };
            servers.push_str(&format!("    server {} {}{checks}\n", b.name, b.app));
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
{retries}    timeout connect 1s
    timeout client 5s
    timeout server 5s

frontend fe
    bind 127.0.0.1:{frontend}
    default_backend be

backend be
    balance roundrobin
{quiet}{option}{servers}",
            socket = socket.display(),
            quiet = if tuning.retries == Retries::Redispatch {
                QUIET_RETRIES
            } else {
                ""
            },
            retries = match tuning.retries {
                Retries::SameServer => NO_REDISPATCH,
                Retries::Redispatch => REDISPATCH,
                Retries::Never => NO_RETRIES,
            },
        );
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, &config).expect("cannot write the HAProxy configuration");

        let verdict = Command::new(bin)
            .arg("-c")
            .arg("-f")
            .arg(&config_path)
            .output()
            .expect("cannot run haproxy -c");
        assert!(
            verdict.status.success(),
            "HAProxy rejects the configuration:\n{config}\n{}{}",
            String::from_utf8_lossy(&verdict.stdout),
            String::from_utf8_lossy(&verdict.stderr)
        );

        // HAProxy prints each state change twice: on stderr ("[WARNING] ...") and through its
        // log ("<1>Server ..."); the timeline takes the log.
        let proc = Proc::spawn(
            "haproxy",
            Command::new(bin).arg("-db").arg("-f").arg(&config_path),
            Some((clock, |l: &str| l.starts_with('<').then(|| l.to_owned()))),
        );
        let haproxy = Haproxy {
            proc,
            socket,
            check,
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

    pub fn try_command(&self, command: &str) -> std::io::Result<String> {
        let mut stream = UnixStream::connect(&self.socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    }

    /// `set server be/<server> state maint|drain|ready`: the runtime API, as a controller
    /// following the endpoints would use it.
    pub fn set_state(&self, server: &str, state: &str) {
        let command = format!("set server be/{server} state {state}");
        let answer = self
            .try_command(&command)
            .unwrap_or_else(|e| panic!("HAProxy admin socket: {e}\n{}", self.proc.output()));
        assert!(
            answer.trim().is_empty(),
            "HAProxy refused `{command}`: {answer}"
        );
    }

    /// `show stat` for one server, by column name.
    pub fn stat(&self, server: &str) -> HashMap<String, String> {
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

    /// "UP", "UP 1/2" (one check failed), "DOWN", "DOWN 1/2" (one check passed), "MAINT",
    /// "no check" (in rotation, unchecked), ...
    pub fn server_status(&self, server: &str) -> String {
        self.stat(server)["status"].clone()
    }

    /// Fully in rotation: UP with no failed check (or unchecked and not in maintenance).
    pub fn in_rotation(&self, status: &str) -> bool {
        match self.check {
            HealthCheck::None => status == "no check" || status == "UP",
            _ => status == "UP",
        }
    }

    pub fn counters(&self, server: &str) -> Counters {
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

    /// Waits until `server` is in rotation (with a passed check, when checked); `diagnostics`
    /// adds the replicas' output to the failure message.
    pub fn wait_until_up(&self, server: &str, timeout: Duration, diagnostics: impl Fn() -> String) {
        let deadline = Instant::now() + timeout;
        loop {
            let row = self.stat(server);
            let checked =
                self.check == HealthCheck::None || row["check_status"].starts_with("L7OK");
            if self.in_rotation(&row["status"]) && checked {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "HAProxy did not mark {server} UP within {timeout:?} (status {}, check {}):\n\
                     HAProxy:\n{}\n{}",
                    row["status"],
                    row["check_status"],
                    self.proc.output(),
                    diagnostics()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Load

/// When the load generator sends.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    /// One request every interval.
    Fixed(Duration),
    /// A Poisson process with this mean gap (exponential gaps), as independent clients send.
    Poisson(Duration),
}

impl Arrivals {
    pub fn mean_gap(self) -> Duration {
        match self {
            Arrivals::Fixed(gap) | Arrivals::Poisson(gap) => gap,
        }
    }
}

/// Open-loop load: requests go out on schedule whatever happened to the previous ones, each on
/// its own short-lived thread. (Closed-loop clients would stall on the first request HAProxy
/// holds for 3 s of retries and stop sending during exactly the outage the test measures.)
pub struct Load {
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

pub struct Latency {
    pub max: Duration,
    pub slow: u64,
}

/// What the load saw: requests sent, failures (when sent, on the test's clock, and why), latency.
pub struct LoadReport {
    pub requests: u64,
    pub failures: Vec<(Duration, String)>,
    pub latency: Latency,
}

impl Load {
    pub fn start(addr: SocketAddr, arrivals: Arrivals, clock: &Clock) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let dispatcher = {
            let (stop, stats, clock) = (stop.clone(), stats.clone(), clock.clone());
            thread::spawn(move || {
                let mut random = XorShift::seeded();
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
                    let gap = match arrivals {
                        Arrivals::Fixed(interval) => interval,
                        Arrivals::Poisson(mean) => mean.mul_f64(random.exponential()),
                    };
                    // After a stall (a busy machine), go on from now, no burst.
                    next = (next + gap).max(Instant::now());
                    // Sleep in slices, so that a slow Poisson load stops promptly.
                    while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                        let left = next.saturating_duration_since(Instant::now());
                        thread::sleep(left.min(Duration::from_millis(50)));
                    }
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

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Stops sending and waits for the requests in flight.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.join().expect("the load dispatcher panicked");
        }
        let mut failures = std::mem::take(&mut *self.stats.failures.lock().unwrap());
        failures.sort_by_key(|(at, _)| *at);
        LoadReport {
            requests: self.stats.requests.load(Ordering::Relaxed),
            failures,
            latency: Latency {
                max: Duration::from_micros(self.stats.max_latency_us.load(Ordering::Relaxed)),
                slow: self.stats.slow.load(Ordering::Relaxed),
            },
        }
    }
}

/// xorshift64*: enough randomness for arrival times, no dependency.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        XorShift((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Exponentially distributed with mean 1.
    fn exponential(&mut self) -> f64 {
        // Uniform in (0, 1]: never ln(0).
        let uniform = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -uniform.ln()
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

/// One HTTP/1.0 GET (the test's own look at a replica, e.g. drainit's `/status`): the status
/// code and the body.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let request = format!("GET {path} HTTP/1.0\r\nUser-Agent: drainit-e2e-test\r\n\r\n");
    http_exchange(addr, &request, Duration::from_secs(5))
}

/// Sends `request` on a new connection and reads the whole answer within `timeout`: the status
/// code and the body.
pub fn http_exchange(
    addr: SocketAddr,
    request: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(2)))
        .map_err(|e| format!("connect to {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .and_then(|()| stream.set_write_timeout(Some(timeout)))
        .map_err(|e| format!("socket options: {e}"))?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {response:?}"))?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status code in {head:?}"))?;
    Ok((code, body.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// Network namespaces

/// Prefix of every namespace these tests create; the pid of the test process follows.
const NETNS_PREFIX: &str = "drainit-e2e-";
/// Prefix of the host end of every veth pair (interface names are at most 15 bytes).
const VETH_PREFIX: &str = "dre";
/// The private range replicas get addresses in: /30 blocks, host end .1, replica end .2.
const SUBNET: [u8; 2] = [10, 213];
const BLOCKS: u32 = 1 << 14;

/// A network namespace of its own for one replica, as a pod has: its own TCP counters
/// (`/proc/net/snmp`), sockets and ports. A veth pair links it to the test's namespace: the
/// replica is reachable at `ip` from there (HAProxy runs in the test's namespace). Deleted on
/// drop, panics included; drop the processes running inside first.
pub struct Netns {
    pub name: String,
    host_if: String,
    pub host_ip: Ipv4Addr,
    pub ip: Ipv4Addr,
}

impl Netns {
    /// Needs root (CI runs as root) and iproute2's `ip`.
    pub fn create() -> Self {
        static CLEANUP: Once = Once::new();
        CLEANUP.call_once(remove_stale_namespaces);
        // One allocation at a time in this process, so two replicas never pick the same block.
        static ALLOCATE: Mutex<u32> = Mutex::new(0);
        let mut next = ALLOCATE.lock().unwrap_or_else(|p| p.into_inner());
        let n = *next;
        *next += 1;
        let pid = std::process::id();
        let name = format!("{NETNS_PREFIX}{pid}-{n}");
        let host_if = format!("{VETH_PREFIX}{pid}h{n}");
        let peer_if = format!("{VETH_PREFIX}{pid}p{n}");
        assert!(host_if.len() <= 15, "interface name too long: {host_if}");
        // Left over by an earlier run that crashed with the same pid.
        let _ = ip_quiet(&["netns", "del", &name]);
        let _ = ip_quiet(&["link", "del", &host_if]);

        let block = free_block(pid);
        let base = u32::from(Ipv4Addr::new(SUBNET[0], SUBNET[1], 0, 0)) + block * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let ip = Ipv4Addr::from(base + 2);
        run_ip(&["netns", "add", &name]);
        // From here on, Drop cleans up whatever the next steps leave half done.
        let netns = Netns {
            name,
            host_if,
            host_ip,
            ip,
        };
        let name = netns.name.as_str();
        run_ip(&[
            "link",
            "add",
            &netns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer_if,
            "netns",
            name,
        ]);
        run_ip(&[
            "addr",
            "add",
            &format!("{host_ip}/30"),
            "dev",
            &netns.host_if,
        ]);
        run_ip(&["link", "set", &netns.host_if, "up"]);
        run_ip(&[
            "-n",
            name,
            "addr",
            "add",
            &format!("{ip}/30"),
            "dev",
            &peer_if,
        ]);
        run_ip(&["-n", name, "link", "set", &peer_if, "up"]);
        run_ip(&["-n", name, "link", "set", "lo", "up"]);
        drop(next);
        netns
    }

    /// `program` to be run inside the namespace (`ip netns exec` execs it: the child is the
    /// program itself, and signals sent to the child reach it).
    pub fn command(&self, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name]).arg(program);
        command
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting the namespace destroys its end of the veth pair and so the pair; deleting the
        // host end as well covers a namespace kept alive by a process still inside.
        let _ = ip_quiet(&["netns", "del", &self.name]);
        let _ = ip_quiet(&["link", "del", &self.host_if]);
    }
}

/// One replica slot: a network namespace of its own, as a pod has, and what runs in it. A
/// replacement starts in the same namespace, at the same address (HAProxy's configuration is
/// static).
pub struct Replica {
    // Declared first: the processes inside go before their namespace.
    pub proc: Proc,
    pub server: String,
    pub netns: Netns,
}

impl Replica {
    /// `start` runs the replica's processes in a new namespace.
    pub fn start(server: &str, start: impl FnOnce(&Netns) -> Proc) -> Self {
        let netns = Netns::create();
        Replica {
            proc: start(&netns),
            server: server.to_owned(),
            netns,
        }
    }

    /// Its HAProxy `server` line: the app's port, checks on `health_port`.
    pub fn backend(&self, app_port: u16, health_port: u16) -> Backend {
        Backend {
            name: self.server.clone(),
            app: SocketAddr::from((self.netns.ip, app_port)),
            health_port,
        }
    }
}

/// The output of every replica but the `skip`th, for failure messages.
pub fn outputs_but(replicas: &[Replica], skip: Option<usize>) -> String {
    replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, r)| format!("{} output:\n{}", r.proc.name, r.proc.output()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs `ip` and panics with its output if it fails.
fn run_ip(args: &[&str]) {
    if let Err(e) = ip_quiet(args) {
        panic!("`ip {}` failed: {e}", args.join(" "));
    }
}

fn ip_quiet(args: &[&str]) -> Result<String, String> {
    let output = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| {
            format!(
                "cannot run `ip` ({e}): these tests need iproute2 (Debian: apt-get install \
                 iproute2) and root, to give each replica its own network namespace"
            )
        })?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ))
    }
}

/// A /30 block of 10.213.0.0/16 no interface of this namespace uses yet, searched from a point
/// that depends on the pid, so that test processes running at once start apart.
fn free_block(pid: u32) -> u32 {
    let listing = ip_quiet(&["-4", "-o", "addr", "show"]).unwrap_or_else(|e| panic!("{e}"));
    let used: BTreeSet<u32> = listing
        .split_whitespace()
        .filter_map(|word| word.split_once('/').map(|(addr, _)| addr))
        .filter_map(|addr| addr.parse::<Ipv4Addr>().ok())
        .filter(|addr| addr.octets()[..2] == SUBNET)
        .map(|addr| (u32::from(addr) & 0xffff) / 4)
        .collect();
    let start = (pid % 1024) * 16;
    (0..BLOCKS)
        .map(|i| (start + i) % BLOCKS)
        .find(|block| *block != 0 && !used.contains(block))
        .expect("no free /30 block left in 10.213.0.0/16")
}

/// Namespaces and veths of test processes that no longer run (a run that crashed or was killed
/// before its Drop guards ran).
fn remove_stale_namespaces() {
    let alive = |pid: &str| Path::new("/proc").join(pid).exists();
    if let Ok(list) = ip_quiet(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or("");
            if !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()) && !alive(pid) {
                // What that run left running inside (drainit, the app) goes first, or the
                // namespace would outlive its name.
                if let Ok(pids) = ip_quiet(&["netns", "pids", name]) {
                    for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                let _ = ip_quiet(&["netns", "del", name]);
            }
        }
    }
    if let Ok(list) = ip_quiet(&["-o", "link", "show"]) {
        for line in list.lines() {
            // "12: dre1234h0@if11: <...>"
            let Some(name) = line.split_whitespace().nth(1) else {
                continue;
            };
            let name = name.trim_end_matches(':');
            let name = name.split('@').next().unwrap_or(name);
            let Some(rest) = name.strip_prefix(VETH_PREFIX) else {
                continue;
            };
            let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let tail = &rest[pid.len()..];
            if !pid.is_empty() && (tail.starts_with('h') || tail.starts_with('p')) && !alive(&pid) {
                let _ = ip_quiet(&["link", "del", name]);
            }
        }
    }
}
