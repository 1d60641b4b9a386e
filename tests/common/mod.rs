//! Test harness: runs the real drainit binary around the demo app (or any command) and observes
//! it from outside, as a user would: signals, HTTP probes, its JSON logs and the app's stdout.
#![allow(dead_code)] // each test binary uses its own part of the harness

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

#[path = "../binaries/mod.rs"]
pub mod binaries;
pub use binaries::{demo_app_bin, drainit_bin};
#[path = "../procfs/mod.rs"]
mod procfs;

/// A control socket name no other test uses.
pub fn unique_control() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "@drainit-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// One line from a child's stream, with the time the test saw it.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// Reads a stream line by line on a thread, timestamping each line, except while `reading` is
/// off: then the stream is left unread, as by a stuck log collector.
fn collect_lines(stream: impl Read + Send + 'static, reading: Arc<AtomicBool>) -> Receiver<Line> {
    let (tx, rx) = channel();
    thread::spawn(move || {
        let mut lines = BufReader::new(stream).lines();
        loop {
            while !reading.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(5));
            }
            let Some(Ok(text)) = lines.next() else { break };
            let line = Line {
                at: Instant::now(),
                text,
            };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Lines seen so far plus the ones still to come.
pub struct LineLog {
    rx: Receiver<Line>,
    reading: Arc<AtomicBool>,
    pub seen: Vec<Line>,
}

impl LineLog {
    fn new(stream: impl Read + Send + 'static) -> Self {
        let reading = Arc::new(AtomicBool::new(true));
        Self {
            rx: collect_lines(stream, reading.clone()),
            reading,
            seen: Vec::new(),
        }
    }

    /// Stops reading the stream (the lines in the test's read buffer still arrive): the writer
    /// blocks once the pipe is full.
    pub fn stop_reading(&self) {
        self.reading.store(false, Ordering::Relaxed);
    }

    pub fn resume_reading(&self) {
        self.reading.store(true, Ordering::Relaxed);
    }

    /// The first line (seen or to come within `timeout`) that matches.
    pub fn wait_for(&mut self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<Line> {
        if let Some(line) = self.seen.iter().find(|l| matches(&l.text)) {
            return Some(line.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line.text) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Takes in whatever has arrived, waiting up to `timeout` for the stream to end.
    pub fn drain(&mut self, timeout: Duration) -> &[Line] {
        let deadline = Instant::now() + timeout;
        while let Ok(line) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line);
        }
        &self.seen
    }

    pub fn count(&self, matches: impl Fn(&str) -> bool) -> usize {
        self.seen.iter().filter(|l| matches(&l.text)).count()
    }

    pub fn text(&self) -> String {
        self.seen
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// A running drainit, killed (with its app's group) if the test ends early.
pub struct Drainit {
    pub child: Child,
    pub health: SocketAddr,
    pub control: String,
    /// drainit's JSON log lines (stderr).
    pub logs: LineLog,
    /// The app's stdout (drainit passes it through untouched).
    pub app: LineLog,
    status: Option<ExitStatus>,
}

pub const START_TIMEOUT: Duration = Duration::from_secs(10);

impl Drainit {
    /// drainit `options` around `command`, with a free probe port and its own control socket.
    pub fn start(options: &[&str], command: &[&str]) -> Self {
        Self::start_with(Command::new(drainit_bin()), options, command)
    }

    /// drainit around the demo app on a free port, plus `app_options`.
    pub fn demo(options: &[&str], app_options: &[&str]) -> Self {
        let app = demo_app_bin();
        let mut command = vec![app.to_str().unwrap(), "--listen", "127.0.0.1:0"];
        command.extend_from_slice(app_options);
        let mut drainit = Self::start(options, &command);
        drainit.app_line("demo-app: listening on");
        // Ready by drainit's default check, unless the test manages readiness itself.
        let own_readiness = options
            .iter()
            .any(|o| ["--ready-http", "--ready-tcp", "--ready-exec", "--min-ready"].contains(o));
        if !own_readiness {
            drainit.wait_ready();
        }
        drainit
    }

    /// As `start`, from a prepared `Command` (a wrapper like unshare, environment variables).
    pub fn start_with(mut cmd: Command, options: &[&str], command: &[&str]) -> Self {
        let given = options
            .iter()
            .position(|o| *o == "--control")
            .map(|i| options[i + 1].to_owned());
        let control = given.unwrap_or_else(unique_control);
        // Options given later on the command line win over these defaults.
        cmd.args([
            "--log-format",
            "json",
            "--health-listen",
            "127.0.0.1:0",
            "--control",
            &control,
        ])
        .args(options)
        .arg("--")
        .args(command)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn drainit");
        let mut logs = LineLog::new(child.stderr.take().unwrap());
        let app = LineLog::new(child.stdout.take().unwrap());
        let listening = logs
            .wait_for(START_TIMEOUT, |l| l.contains("probe server listening"))
            .unwrap_or_else(|| panic!("drainit did not start; logs:\n{}", logs.text()));
        let health = json(&listening.text)["addr"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        Self {
            child,
            health,
            control,
            logs,
            app,
            status: None,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).expect("signal drainit");
    }

    /// Sends `signal` and returns when it was sent.
    pub fn signal_at(&self, signal: Signal) -> Instant {
        let at = Instant::now();
        self.signal(signal);
        at
    }

    /// Sends SIGTERM to the demo app's drainit; returns how long the drain took, until the app
    /// reported its stop signal.
    pub fn drain_time(&mut self) -> Duration {
        let sigterm = self.signal_at(Signal::SIGTERM);
        self.app_line("demo-app: signal TERM").at - sigterm
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.health, path)
    }

    /// `/status`, parsed.
    pub fn status(&self) -> Value {
        let (code, response) = self.get("/status");
        assert_eq!(code, 200, "{response}");
        let body = response.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// Waits until the app is ready (the lifecycle says so), for tests that need it ready.
    pub fn wait_ready(&mut self) {
        let ready = |l: &str| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["message"] == "lifecycle transition" && v["to"] == "ready")
        };
        if self.logs.wait_for(START_TIMEOUT, ready).is_none() {
            panic!(
                "the app never became ready; drainit logged:\n{}",
                self.logs.text()
            );
        }
    }

    /// The value of one series of `/metrics`, e.g. `drainit_budget_kills_total`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    /// The first app stdout line starting with `prefix`; panics after a generous timeout.
    pub fn app_line(&mut self, prefix: &str) -> Line {
        self.app
            .wait_for(START_TIMEOUT, |l| l.starts_with(prefix))
            .unwrap_or_else(|| {
                panic!(
                    "no app line '{prefix}'; app said:\n{}\ndrainit logged:\n{}",
                    self.app.text(),
                    self.logs.text()
                )
            })
    }

    /// The first log line whose message contains `message` (the app's own stderr lines, in the
    /// same stream, are skipped).
    pub fn log(&mut self, message: &str) -> Value {
        let is_it = |l: &str| {
            serde_json::from_str::<Value>(l)
                .is_ok_and(|v| v["message"].as_str().is_some_and(|m| m.contains(message)))
        };
        let line = self
            .logs
            .wait_for(START_TIMEOUT, is_it)
            .unwrap_or_else(|| panic!("no log '{message}'; drainit logged:\n{}", self.logs.text()));
        json(&line.text)
    }

    /// Waits for drainit to exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.status {
            return status;
        }
        let status = wait_timeout(&mut self.child, timeout).unwrap_or_else(|| {
            panic!(
                "drainit still running after {timeout:?}; logs:\n{}",
                self.logs.text()
            )
        });
        self.status = Some(status);
        // Both pipes close once drainit and the app are gone: take in their last lines.
        self.app.drain(Duration::from_secs(1));
        self.logs.drain(Duration::from_secs(1));
        status
    }

    /// drainit's exit code; panics if it was killed by a signal or is still running.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait(timeout);
        status
            .code()
            .unwrap_or_else(|| panic!("drainit died of a signal: {status:?}"))
    }

    /// The app's pid, from drainit's log.
    pub fn app_pid(&mut self) -> i32 {
        self.log("app started")["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Drainit {
    /// A test that ends early (or fails) must not leave the app behind: it leads its own process
    /// group, which killing drainit alone would orphan.
    fn drop(&mut self) {
        if self.status.is_some() || !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        self.logs.drain(Duration::ZERO);
        let app = self.logs.seen.iter().find_map(|l| {
            let v: Value = serde_json::from_str(&l.text).ok()?;
            (v["message"] == "app started").then(|| v["pid"].as_i64())?
        });
        // Under `unshare --pid` the logged pid is the namespace's: on the host that number is
        // some other process group, never to be killed.
        if let Some(app) = app.map(|pid| pid as i32)
            && procfs::parent_of(app) == Some(self.child.id() as i32)
        {
            let _ = kill(Pid::from_raw(-app), Signal::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// The value of the one series of `metrics` whose line starts with `series` followed by a space.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

pub fn json(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
}

/// A raw request; returns the status code and the whole response.
pub fn http_request(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {response:?}"));
    (code, response)
}

pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"),
    )
}

/// Polls `check` every 2 ms until it holds; returns how long that took. (Timing bars are
/// measured by the benchmark, not here: this only has to be fine-grained enough for generous
/// bounds, without flooding a 2-core CI machine with connections.)
pub fn time_until(timeout: Duration, check: impl Fn() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if check() {
            return Some(start.elapsed());
        }
        thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Whether `pid` is still a live (not zombie) process.
pub fn is_running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(") ")
                .next()
                .and_then(|rest| rest.chars().next());
            !matches!(state, Some('Z' | 'X'))
        }
        Err(_) => false,
    }
}

/// Probes /ready every `every` with `agent` until told to stop (or, with `stop_on_drain`, as soon
/// as it sees the first 503: a load balancer that removed the pod by other means).
pub struct Checker {
    running: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Checker {
    pub fn start(
        drainit: &Drainit,
        agent: &'static str,
        every: Duration,
        stop_on_drain: bool,
    ) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let (addr, flag) = (drainit.health, running.clone());
        let thread = thread::spawn(move || {
            while flag.load(Ordering::Relaxed) {
                let request = format!(
                    "GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\nConnection: close\r\n\r\n"
                );
                if http_request(addr, &request).0 == 503 && stop_on_drain {
                    return;
                }
                thread::sleep(every);
            }
        });
        Self {
            running,
            thread: Some(thread),
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
