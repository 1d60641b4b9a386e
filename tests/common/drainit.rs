//! drainit under test: the one way to build its command line (`Drainit::builder()`), and the
//! running process seen from outside, as a user sees it: signals, probes, its JSON log events and
//! the app's stdout.

use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use serde_json::Value;

use super::binaries::{demo_app_bin, drainit_bin};
use super::clock::Clock;
use super::http::{body_of, http_get, metric_value};
use super::lines::{LineFilter, Lines};
use super::logs::{is_event, is_phase, json};
use super::netns::Netns;
use super::process::Proc;

/// How long drainit gets to start, and a line that is due to come.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// A control socket name no other test uses.
pub fn unique_control() -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "@drainit-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Options with which the test manages readiness itself: the app is not waited ready.
const READINESS_OPTIONS: [&str; 4] = ["--ready-http", "--ready-tcp", "--ready-exec", "--min-ready"];

/// What drainit runs.
pub struct App {
    argv: Vec<OsString>,
    /// The demo app, whose "listening on" line `start_serving` waits for.
    demo: bool,
}

/// The demo app with `args`, on a free loopback port unless they name one (`--listen`).
pub fn demo(args: &[&str]) -> App {
    let mut argv = vec![demo_app_bin().into_os_string()];
    if !args.contains(&"--listen") {
        argv.extend(["--listen".into(), "127.0.0.1:0".into()]);
    }
    argv.extend(args.iter().map(OsString::from));
    App { argv, demo: true }
}

/// Any command.
pub fn command(argv: &[impl AsRef<OsStr>]) -> App {
    App {
        argv: argv.iter().map(|a| a.as_ref().to_owned()).collect(),
        demo: false,
    }
}

/// drainit's command line, built: `--log-format json`, a free probe port on 127.0.0.1 and a
/// control socket of its own unless set otherwise.
pub struct Builder {
    name: String,
    prefix: Vec<OsString>,
    envs: Vec<(String, String)>,
    health: String,
    reach: Option<IpAddr>,
    control: String,
    options: Vec<String>,
    app: Option<App>,
    /// `drainit sidecar`: no app.
    sidecar: bool,
    timeline: Option<(Clock, LineFilter)>,
}

impl Builder {
    /// `drainit sidecar`: drainit with no app (the test runs it beside one).
    pub fn sidecar(mut self) -> Self {
        self.sidecar = true;
        self
    }

    /// The name in failure messages and the timeline.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_owned();
        self
    }

    /// `--health-listen`.
    pub fn health(mut self, listen: impl ToString) -> Self {
        self.health = listen.to_string();
        self
    }

    /// `--control`.
    pub fn control(mut self, control: &str) -> Self {
        self.control = control.to_owned();
        self
    }

    /// `--drain-delay`.
    pub fn drain_delay(self, delay: &str) -> Self {
        self.options(&["--drain-delay", delay])
    }

    /// `--grace-period`.
    pub fn grace_period(self, grace: &str) -> Self {
        self.options(&["--grace-period", grace])
    }

    /// `--ready-tcp`.
    pub fn ready_tcp(self, ports: &str) -> Self {
        self.options(&["--ready-tcp", ports])
    }

    /// Any other options, as given on the command line (after the harness's defaults: a later
    /// `--health-listen` or `--control` wins).
    pub fn options(mut self, options: &[&str]) -> Self {
        if let Some(at) = options.iter().position(|o| *o == "--control") {
            self.control = options[at + 1].to_owned();
        }
        self.options.extend(options.iter().map(|o| (*o).to_owned()));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Runs drainit under `wrapper`, e.g. `unshare --pid --fork --mount-proc`.
    pub fn under(mut self, wrapper: &[&str]) -> Self {
        self.prefix = wrapper.iter().map(OsString::from).collect();
        self
    }

    /// Runs drainit in `netns`, reached at the namespace's address (`ip netns exec` execs it: the
    /// process is drainit itself, and signals sent to it reach it).
    pub fn in_netns(self, netns: &Netns) -> Self {
        let mut built = self.under(&["ip", "netns", "exec", &netns.name]);
        built.reach = Some(IpAddr::V4(netns.ip));
        built
    }

    /// The lines `filter` keeps go to `clock`'s timeline.
    pub fn timeline(mut self, clock: &Clock, filter: LineFilter) -> Self {
        self.timeline = Some((clock.clone(), filter));
        self
    }

    pub fn app(mut self, app: App) -> Self {
        self.app = Some(app);
        self
    }

    /// The whole command line.
    pub fn command(&self) -> Command {
        let drainit = drainit_bin();
        let mut argv: Vec<&OsStr> = self.prefix.iter().map(OsString::as_os_str).collect();
        argv.push(drainit.as_os_str());
        if self.sidecar {
            argv.push(OsStr::new("sidecar"));
        }
        let mut cmd = Command::new(argv[0]);
        cmd.args(&argv[1..])
            .args(["--log-format", "json", "--health-listen", &self.health])
            .args(["--control", &self.control])
            .args(&self.options)
            .envs(self.envs.iter().map(|(k, v)| (k, v)));
        if !self.sidecar {
            cmd.arg("--")
                .args(&self.app.as_ref().expect("no app: call .app()").argv);
        }
        cmd
    }

    /// Starts drainit and returns at once (the probe address is known from the options, unless
    /// the port is 0: then drainit's log says it).
    pub fn spawn(self) -> Drainit {
        self.spawn_adjusted(|_| {})
    }

    /// `spawn`, with the command adjusted first (e.g. a `pre_exec` hook).
    pub fn spawn_adjusted(self, adjust: impl FnOnce(&mut Command)) -> Drainit {
        let mut command = self.command();
        adjust(&mut command);
        let proc = Proc::spawn(
            &self.name,
            &mut command,
            self.timeline
                .as_ref()
                .map(|(clock, filter)| (clock, *filter)),
        );
        let mut drainit = Drainit {
            logs: proc.stderr.clone(),
            app: proc.stdout.clone(),
            proc,
            health: SocketAddr::from(([127, 0, 0, 1], 0)),
            control: self.control.clone(),
        };
        let configured: SocketAddr = self.health.parse().expect("--health-listen address");
        drainit.health = if configured.port() == 0 {
            drainit.listening_at()
        } else if configured.ip().is_unspecified() {
            SocketAddr::new(
                self.reach.unwrap_or(Ipv4Addr::LOCALHOST.into()),
                configured.port(),
            )
        } else {
            configured
        };
        drainit
    }

    /// Starts drainit and waits until its probe server listens.
    pub fn start(self) -> Drainit {
        let drainit = self.spawn();
        drainit.listening_at();
        drainit
    }

    /// `start`, then waits until the demo app listens and, unless the options manage readiness,
    /// until drainit has it ready.
    pub fn start_serving(self) -> Drainit {
        let demo = self.app.as_ref().is_some_and(|a| a.demo);
        let own_readiness = self
            .options
            .iter()
            .any(|o| READINESS_OPTIONS.contains(&o.as_str()));
        let drainit = self.start();
        if demo {
            drainit.app_line("demo-app: listening on");
        }
        if !own_readiness {
            drainit.wait_ready();
        }
        drainit
    }
}

/// A running drainit, killed (with its app's group) if the test ends early.
pub struct Drainit {
    // Declared first: the process goes before the rest.
    pub proc: Proc,
    /// Where the test reaches its probe server.
    pub health: SocketAddr,
    pub control: String,
    /// drainit's JSON log lines (stderr, with the app's own stderr lines).
    pub logs: Lines,
    /// The app's stdout (drainit passes it through untouched).
    pub app: Lines,
}

impl Drainit {
    pub fn builder() -> Builder {
        Builder {
            name: "drainit".to_owned(),
            prefix: Vec::new(),
            envs: Vec::new(),
            health: "127.0.0.1:0".to_owned(),
            reach: None,
            control: unique_control(),
            options: Vec::new(),
            app: None,
            sidecar: false,
            timeline: None,
        }
    }

    /// Shorthand: drainit `options` around `command`, started.
    pub fn start(options: &[&str], argv: &[&str]) -> Self {
        Self::builder().options(options).app(command(argv)).start()
    }

    /// Shorthand: drainit `options` around the demo app with `app_options`, serving.
    pub fn demo(options: &[&str], app_options: &[&str]) -> Self {
        Self::builder()
            .options(options)
            .app(demo(app_options))
            .start_serving()
    }

    /// The probe server's address, from its `probe_server_listening` event.
    fn listening_at(&self) -> SocketAddr {
        let listening = self
            .wait_event("probe_server_listening", START_TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "{} did not start; output:\n{}",
                    self.proc.name,
                    self.proc.output()
                )
            });
        listening["addr"].as_str().unwrap().parse().unwrap()
    }

    pub fn pid(&self) -> Pid {
        self.proc.pid()
    }

    pub fn signal(&self, signal: Signal) {
        self.proc.signal(signal);
    }

    /// Sends `signal` and returns when it was sent.
    pub fn signal_at(&self, signal: Signal) -> Instant {
        let at = Instant::now();
        self.signal(signal);
        at
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http_get(self.health, path)
    }

    /// `/status`, parsed.
    pub fn status(&self) -> Value {
        let (code, response) = self.get("/status");
        assert_eq!(code, 200, "{response}");
        let body = body_of(&response);
        serde_json::from_str(body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
    }

    /// The value of one series of `/metrics`, e.g. `drainit_budget_kills_total`.
    pub fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        metric_value(&text, series).unwrap_or_else(|| panic!("no {series} in /metrics:\n{text}"))
    }

    /// Waits until the lifecycle has the app ready.
    pub fn wait_ready(&self) {
        self.phase("ready");
    }

    /// The first move of the lifecycle to phase `to` (so far, or within `START_TIMEOUT`).
    pub fn phase(&self, to: &str) -> Value {
        let line = self
            .logs
            .wait_for(START_TIMEOUT, |l| is_phase(l, to))
            .unwrap_or_else(|| {
                panic!(
                    "the lifecycle never got to {to}; drainit logged:\n{}",
                    self.logs.text()
                )
            });
        json(&line.text)
    }

    /// The first log line with this `event` slug (so far, or within `START_TIMEOUT`), parsed.
    pub fn event(&self, slug: &str) -> Value {
        self.wait_event(slug, START_TIMEOUT)
            .unwrap_or_else(|| panic!("no {slug} event; drainit logged:\n{}", self.logs.text()))
    }

    /// The first log line with this `event` slug, so far or within `timeout`.
    pub fn wait_event(&self, slug: &str, timeout: Duration) -> Option<Value> {
        self.logs
            .wait_for(timeout, |l| is_event(l, slug))
            .map(|l| json(&l.text))
    }

    /// How many log lines so far have this `event` slug.
    pub fn count_events(&self, slug: &str) -> usize {
        self.logs.count(|l| is_event(l, slug))
    }

    /// The first app stdout line starting with `prefix`; panics after `START_TIMEOUT`.
    pub fn app_line(&self, prefix: &str) -> super::lines::Line {
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

    /// The address the demo app reported listening on.
    pub fn app_addr(&self) -> std::net::SocketAddr {
        let line = self.app_line("demo-app: listening on");
        line.text.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// Sends SIGTERM to the demo app's drainit; returns how long the drain took, until the app
    /// reported its stop signal.
    pub fn drain_time(&self) -> Duration {
        let sigterm = self.signal_at(Signal::SIGTERM);
        self.app_line("demo-app: signal TERM").at - sigterm
    }

    /// The app's pid, from drainit's log.
    pub fn app_pid(&self) -> i32 {
        self.event("app_started")["pid"].as_i64().unwrap() as i32
    }

    /// Waits for drainit to exit, then for the last lines of both streams; panics after
    /// `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let status = self.proc.expect_exit(timeout, "the wait began");
        // Both pipes close once drainit and the app are gone: take in their last lines.
        self.app.wait_closed(Duration::from_secs(1));
        self.logs.wait_closed(Duration::from_secs(1));
        status
    }

    /// drainit's exit code; panics if it was killed by a signal or is still running.
    pub fn exit_code(&mut self, timeout: Duration) -> i32 {
        let status = self.wait(timeout);
        status
            .code()
            .unwrap_or_else(|| panic!("drainit died of a signal: {status:?}"))
    }
}

impl Drainit {
    /// Polls `/status` until `holds`; returns the status that held.
    pub fn wait_status(
        &self,
        timeout: Duration,
        what: &str,
        holds: impl Fn(&Value) -> bool,
    ) -> Value {
        let mut last = Value::Null;
        let held = super::clock::poll_until(timeout, Duration::from_millis(20), || {
            last = self.status();
            holds(&last)
        });
        assert!(
            held.is_some(),
            "{what} within {timeout:?}; /status:\n{last:#}"
        );
        last
    }

    /// Waits until `/status` lists the checker with this User-Agent as credible (it probed like
    /// a load balancer: steadily, enough times).
    pub fn wait_checker(&self, agent: &str) -> Value {
        let status = self.wait_status(
            START_TIMEOUT,
            &format!("no credible checker {agent}"),
            |s| checker(s, agent).is_some_and(|c| c["credible"] == true),
        );
        checker(&status, agent).unwrap().clone()
    }
}

/// The checker with this User-Agent in a `/status`.
pub fn checker<'s>(status: &'s Value, agent: &str) -> Option<&'s Value> {
    status["lb_probes"]["checkers"]
        .as_array()?
        .iter()
        .find(|c| c["user_agent"] == agent)
}
