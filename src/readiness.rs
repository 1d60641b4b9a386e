//! The app's own readiness: an HTTP, TCP or exec check on its own schedule, `--min-ready`, and
//! the start-up gate that holds the kubelet back until the load balancers use the pod.
//!
//! Checks never run inside a probe request: `/ready` answers from the lifecycle, which this task
//! moves through `AppReady`/`AppUnready` events, so a hung check cannot make a probe time out.

use std::ffi::OsString;
use std::fmt;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::Uri;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::app;
use crate::exit::StartupError;
use crate::lifecycle::{Event, State};
use crate::listening::{self, ListenCheck};
use crate::reaper::Waiters;
use crate::tasks;

/// How the app says it is ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppCheck {
    /// GET this URL; any 2xx is ready.
    Http(Uri),
    /// A TCP connection to HOST:PORT succeeds.
    Tcp(String),
    /// This command (argv, no shell) exits 0.
    Exec(Vec<OsString>),
    /// The app listens on TCP (`--ready-tcp auto`, the default): on these ports, or with none
    /// given, on the ports its processes hold listening sockets for (`pod_wide`, `drainit
    /// sidecar`: on every port listening in the pod but drainit's own).
    Listen { ports: Vec<u16>, pod_wide: bool },
}

/// What `--ready-tcp` says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpOption {
    /// `auto`: the app listens (the default, spelled out).
    Auto,
    /// `none`: no check, ready once started (a worker that serves no TCP).
    None,
    /// HOST:PORT accepts a connection.
    Connect(AppCheck),
}

impl AppCheck {
    pub fn http(url: &str) -> Result<Self, StartupError> {
        let bad = |why: &str| {
            StartupError::usage(format!(
                "invalid --ready-http '{url}': {why} (e.g. http://127.0.0.1:8080/healthz)"
            ))
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(_) => {
                return Err(bad(
                    "only http:// is supported: check the app on its plain-HTTP port",
                ));
            }
            None => return Err(bad("give the scheme and host")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        let authority = uri.authority().map_or("", |a| a.as_str());
        if authority.contains('@') {
            return Err(bad(
                "credentials are not sent: check an unauthenticated health path",
            ));
        }
        // The URI parser drops a port it cannot read (99999), which would mean port 80.
        let after_host = authority
            .rsplit_once(']')
            .map_or(authority, |(_, rest)| rest);
        if let Some((_, port)) = after_host.rsplit_once(':')
            && !port.parse::<u16>().is_ok_and(|p| p > 0)
        {
            return Err(bad("the port must be 1-65535"));
        }
        Ok(AppCheck::Http(uri))
    }

    /// `--ready-tcp`: `auto`, `none` or HOST:PORT.
    pub fn tcp_option(value: &str) -> Result<TcpOption, StartupError> {
        match value {
            "auto" => Ok(TcpOption::Auto),
            "none" => Ok(TcpOption::None),
            target => Self::tcp(target).map(TcpOption::Connect),
        }
    }

    pub fn tcp(target: &str) -> Result<Self, StartupError> {
        let valid = target.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(StartupError::usage(format!(
                "invalid --ready-tcp '{target}': expected HOST:PORT (e.g. 127.0.0.1:5432), auto or none"
            )));
        }
        Ok(AppCheck::Tcp(target.to_owned()))
    }

    /// Split like a shell would split words, but never run by a shell.
    pub fn exec(command: &str) -> Result<Self, StartupError> {
        let words = shell_words::split(command)
            .map_err(|e| StartupError::usage(format!("invalid --ready-exec '{command}': {e}")))?;
        if words.is_empty() {
            return Err(StartupError::usage(
                "--ready-exec is empty: give the check command, e.g. --ready-exec '/app/check --ready'",
            ));
        }
        let argv: Vec<OsString> = words.into_iter().map(OsString::from).collect();
        app::check_runnable(&argv[0]).map_err(|e| {
            let error = app::spawn_error(&argv[0], e);
            StartupError {
                message: format!("--ready-exec: {}", error.message),
                ..error
            }
        })?;
        Ok(AppCheck::Exec(argv))
    }

    pub fn kind(&self) -> CheckKind {
        match self {
            AppCheck::Http(_) => CheckKind::Http,
            AppCheck::Tcp(_) => CheckKind::Tcp,
            AppCheck::Exec(_) => CheckKind::Exec,
            AppCheck::Listen { .. } => CheckKind::Listen,
        }
    }
}

/// The kind of an [`AppCheck`]: the `kind` label of the app check metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckKind {
    Http,
    Tcp,
    Exec,
    Listen,
}

impl CheckKind {
    pub const ALL: [CheckKind; 4] = [
        CheckKind::Http,
        CheckKind::Tcp,
        CheckKind::Exec,
        CheckKind::Listen,
    ];

    pub fn label(self) -> &'static str {
        match self {
            CheckKind::Http => "http",
            CheckKind::Tcp => "tcp",
            CheckKind::Exec => "exec",
            CheckKind::Listen => "listen",
        }
    }
}

/// A check with what it needs to run: the reaper's waiters (exec) and what it has seen of the
/// app's listeners (listen).
pub struct RunningCheck {
    check: AppCheck,
    waiters: Waiters,
    listening: ListenCheck,
}

impl RunningCheck {
    /// `app` and `probes` (where drainit's probe server listens) tell the app's listeners from
    /// others.
    pub fn new(check: AppCheck, waiters: Waiters, app: Option<Pid>, probes: SocketAddr) -> Self {
        let given = match &check {
            AppCheck::Listen { ports, .. } => ports.clone(),
            _ => Vec::new(),
        };
        Self {
            check,
            waiters,
            listening: ListenCheck::new(given, app, probes),
        }
    }

    pub fn check(&self) -> &AppCheck {
        &self.check
    }

    /// Nothing listens the moment the app is spawned: the default check's first look waits one
    /// start-up interval, which also spares a short-lived command (`drainit -- true`) a blocking
    /// thread. Other checks ask the app itself, at once.
    fn first_look_after(&self) -> Duration {
        match self.check {
            AppCheck::Listen { .. } => LISTEN_STARTUP_INTERVAL,
            _ => Duration::ZERO,
        }
    }

    /// How long until the next check. The default check costs one listener dump: while the app
    /// starts it looks more often than `--ready-interval`, so that a pod turns ready within a
    /// fraction of a second of its app; an app that has not listened for a while (a worker
    /// without --ready-tcp none) is looked at as often as any other.
    fn interval(&self, configured: Duration, ever_ready: bool, waited: Duration) -> Duration {
        match self.check {
            AppCheck::Listen { .. } if !ever_ready && waited < LISTEN_STARTUP => {
                configured.min(LISTEN_STARTUP_INTERVAL)
            }
            _ => configured,
        }
    }

    /// Runs the check once, within `timeout`.
    async fn run(&mut self, timeout: Duration) -> Outcome {
        let started = Instant::now();
        let passed = |result: Result<(), String>| result.map(|()| String::new());
        let result = match &self.check {
            AppCheck::Http(uri) => tokio::time::timeout(timeout, http_get(uri))
                .await
                .ok()
                .map(passed),
            AppCheck::Tcp(target) => tokio::time::timeout(timeout, async {
                TcpStream::connect(target.as_str())
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            })
            .await
            .ok()
            .map(passed),
            AppCheck::Exec(argv) => exec(argv, timeout, &self.waiters).await.ok().map(passed),
            AppCheck::Listen { .. } => self.listening.run(timeout).await,
        };
        let (verdict, detail) = match result {
            Some(Ok(detail)) => (Verdict::Pass, detail),
            Some(Err(why)) => (Verdict::Fail, why),
            None => (Verdict::Timeout, format!("no answer within {timeout:?}")),
        };
        Outcome {
            verdict,
            detail,
            duration: started.elapsed(),
            at: Instant::now(),
        }
    }
}

impl fmt::Display for AppCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AppCheck::Http(uri) => write!(f, "{uri}"),
            AppCheck::Tcp(target) => f.write_str(target),
            AppCheck::Exec(argv) => {
                let words: Vec<_> = argv.iter().map(|w| w.to_string_lossy()).collect();
                f.write_str(&words.join(" "))
            }
            AppCheck::Listen { ports, pod_wide } => {
                f.write_str(&listening::describe(ports, *pod_wide))
            }
        }
    }
}

async fn http_get(uri: &Uri) -> Result<(), String> {
    let host = uri.host().unwrap_or_default();
    let port = uri.port_u16().unwrap_or(80);
    let stream = TcpStream::connect((host.trim_matches(['[', ']']), port))
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tasks::spawn(async move {
        let _ = connection.await;
    });
    let authority = uri
        .authority()
        .map_or_else(|| host.to_owned(), ToString::to_string);
    let request = hyper::Request::get(uri.path_and_query().map_or("/", |p| p.as_str()))
        .header(hyper::header::HOST, authority)
        .header(
            hyper::header::USER_AGENT,
            concat!("drainit/", env!("CARGO_PKG_VERSION")),
        )
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    match response.status() {
        status if status.is_success() => Ok(()),
        status => Err(format!("HTTP {status}")),
    }
}

/// Runs the command in its own process group (a timeout kills all it started) and awaits its
/// exit code from the reaper.
async fn exec(
    argv: &[OsString],
    timeout: Duration,
    waiters: &Waiters,
) -> Result<Result<(), String>, tokio::time::error::Elapsed> {
    let spawned = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .process_group(0)
        .spawn();
    let child = match spawned {
        Ok(child) => child,
        Err(e) => {
            return Ok(Err(format!(
                "cannot run {}: {e}",
                argv[0].to_string_lossy()
            )));
        }
    };
    let pid = Pid::from_raw(child.id() as i32);
    // Registered before any await: the reaper cannot have collected it yet.
    let exited = waiters.wait_for(pid);
    drop(child);
    match tokio::time::timeout(timeout, exited).await {
        Ok(Ok(0)) => Ok(Ok(())),
        Ok(Ok(code)) => Ok(Err(format!("exit code {code}"))),
        Ok(Err(_)) => Ok(Err("its exit status was lost".into())),
        Err(elapsed) => {
            let _ = killpg(pid, Signal::SIGKILL);
            Err(elapsed)
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Pass,
    Fail,
    Timeout,
}

impl Verdict {
    pub const ALL: [Verdict; 3] = [Verdict::Pass, Verdict::Fail, Verdict::Timeout];

    /// The `result` label of the app check metrics, and the word in logs and `/status`.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "pass",
            Verdict::Fail => "fail",
            Verdict::Timeout => "timeout",
        }
    }
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub verdict: Verdict,
    pub detail: String,
    pub duration: Duration,
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct ReadinessConfig {
    pub check: Option<AppCheck>,
    pub interval: Duration,
    pub timeout: Duration,
    pub min_ready: Duration,
}

/// The last check and since when the check has passed without a break, for `/status`.
#[derive(Debug, Default)]
pub struct CheckLog {
    pub last: Option<Outcome>,
    pub passing_since: Option<Instant>,
}

pub type SharedCheckLog = Arc<Mutex<CheckLog>>;

pub fn lock(log: &SharedCheckLog) -> std::sync::MutexGuard<'_, CheckLog> {
    crate::sync::lock(log)
}

impl CheckLog {
    pub fn status(&self, config: &ReadinessConfig, now: Instant) -> Value {
        let Some(check) = &config.check else {
            return json!({ "kind": "none", "min_ready_ms": config.min_ready.as_millis() as u64 });
        };
        json!({
            "kind": check.kind().label(),
            "target": check.to_string(),
            "interval_ms": config.interval.as_millis() as u64,
            "min_ready_ms": config.min_ready.as_millis() as u64,
            "passing_for_ms": self.passing_since.map(|t| now.saturating_duration_since(t).as_millis() as u64),
            "last": self.last.as_ref().map(|o| json!({
                "result": o.verdict.label(),
                "detail": o.detail,
                "duration_ms": o.duration.as_secs_f64() * 1000.0,
                "ms_ago": now.saturating_duration_since(o.at).as_millis() as u64,
            })),
        })
    }
}

/// Runs the app check until the drain starts, sending `AppReady` once it has passed for
/// `--min-ready` and `AppUnready` when it fails after that. While the app is not ready it says
/// every [`NOT_READY_REMINDER`] what it waits for: a pod that stays unready must say why.
pub async fn run(
    mut running: RunningCheck,
    config: ReadinessConfig,
    log: SharedCheckLog,
    events: mpsc::Sender<Event>,
    mut state: watch::Receiver<State>,
    on_check: impl Fn(&AppCheck, &Outcome),
) {
    let started = Instant::now();
    let mut ready = false;
    let mut ever_ready = false;
    let mut reminded = started;
    let _ = tokio::time::timeout(running.first_look_after(), state.changed()).await;
    loop {
        if state.borrow_and_update().drain_has_started() {
            return;
        }
        let outcome = running.run(config.timeout).await;
        let check = running.check();
        on_check(check, &outcome);
        if !ready && outcome.verdict != Verdict::Pass && reminded.elapsed() >= NOT_READY_REMINDER {
            reminded = Instant::now();
            warn!(event = "app_not_ready",
                check = %check,
                waited_s = started.elapsed().as_secs(),
                ever_ready,
                result = outcome.verdict.label(),
                detail = outcome.detail,
                "app not ready: /ready answers 503 until the app check passes"
            );
        }
        let passing_since = {
            let mut log = lock(&log);
            let previous = log.last.as_ref().map(|o| o.verdict);
            if previous != Some(outcome.verdict) {
                report_change(check, &outcome, ever_ready);
            }
            log.passing_since = match outcome.verdict {
                Verdict::Pass => Some(log.passing_since.unwrap_or(outcome.at)),
                _ => None,
            };
            log.last = Some(outcome);
            log.passing_since
        };
        let now_ready = passing_since.is_some_and(|since| since.elapsed() >= config.min_ready);
        if now_ready != ready {
            ready = now_ready;
            ever_ready |= ready;
            reminded = Instant::now();
            let event = if ready {
                Event::AppReady
            } else {
                Event::AppUnready
            };
            let _ = events.send(event).await;
        }
        // The next check, or the moment --min-ready is reached, whichever comes first.
        let until_min_ready = passing_since
            .filter(|_| !ready)
            .map(|since| config.min_ready.saturating_sub(since.elapsed()));
        let interval = running.interval(config.interval, ever_ready, started.elapsed());
        let pause = until_min_ready.map_or(interval, |d| d.min(interval));
        let _ = tokio::time::timeout(pause, state.changed()).await;
    }
}

/// How often the default check looks while the app starts, and for how long at most.
const LISTEN_STARTUP_INTERVAL: Duration = Duration::from_millis(250);
const LISTEN_STARTUP: Duration = Duration::from_secs(30);

/// How often a pod that has not been ready yet says what it waits for.
pub const NOT_READY_REMINDER: Duration = Duration::from_secs(10);

/// A check that has not passed yet is the normal state of an app starting up; one that fails
/// after the app was ready takes it out of rotation and is worth a warning.
fn report_change(check: &AppCheck, outcome: &Outcome, ever_ready: bool) {
    let (result, detail) = (outcome.verdict.label(), outcome.detail.as_str());
    match outcome.verdict {
        Verdict::Pass => {
            info!(event = "app_check_passed", check = %check, duration_ms = outcome.duration.as_millis() as u64, detail, "app check passes")
        }
        _ if !ever_ready => {
            info!(event = "app_not_ready_yet", check = %check, result, detail, "app not ready yet")
        }
        _ => warn!(event = "app_check_failed", check = %check, result, detail, "app check fails"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_check_is_named_as_it_is_spelled() {
        for (check, label) in [
            (AppCheck::http("http://127.0.0.1:8080/").unwrap(), "http"),
            (AppCheck::tcp("localhost:1").unwrap(), "tcp"),
            (AppCheck::exec("true").unwrap(), "exec"),
            (
                AppCheck::Listen {
                    ports: vec![],
                    pod_wide: false,
                },
                "listen",
            ),
        ] {
            assert_eq!(check.kind().label(), label, "{check}");
        }
        assert_eq!(AppCheck::tcp_option("auto").unwrap(), TcpOption::Auto);
        assert_eq!(AppCheck::tcp_option("none").unwrap(), TcpOption::None);
        assert!(AppCheck::tcp_option("nonsense").is_err());
    }

    #[test]
    fn check_targets_are_validated() {
        assert!(AppCheck::http("http://127.0.0.1:8080/healthz").is_ok());
        assert!(AppCheck::http("http://[::1]:8080/").is_ok());
        for bad in [
            "https://x/",
            "127.0.0.1:8080/healthz",
            "http:///x",
            "not a url",
            "http://127.0.0.1:99999/",
            "http://[::1]:0/",
            "http://user:pass@127.0.0.1:8080/healthz",
        ] {
            assert!(AppCheck::http(bad).is_err(), "{bad}");
        }
        assert!(AppCheck::tcp("localhost:5432").is_ok());
        for bad in ["localhost", ":80", "host:http", "host:99999", "host:0"] {
            assert!(AppCheck::tcp(bad).is_err(), "{bad}");
        }
        assert_eq!(
            AppCheck::exec("true --name 'a b'").unwrap(),
            AppCheck::Exec(vec!["true".into(), "--name".into(), "a b".into()])
        );
        assert_eq!(AppCheck::exec("/no/such/check").unwrap_err().code, 127);
        assert!(AppCheck::exec("  ").is_err());
        assert!(AppCheck::exec("unterminated 'quote").is_err());
    }
}
