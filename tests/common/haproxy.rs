//! A real HAProxy in the test's network namespace, configured for the end-to-end tests, with its
//! runtime API and `show stat` read by column name.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use super::clock::{Clock, poll_until};
use super::process::Proc;

pub const HAPROXY: &str = "/usr/sbin/haproxy";
/// HAProxy waits min(timeout connect, 1s) before retrying a refused connection, so a request that
/// takes this long was retried at least once.
pub const SLOW: Duration = Duration::from_millis(900);

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
        let up = poll_until(Duration::from_secs(10), Duration::from_millis(50), || {
            haproxy.try_command("show info").is_ok()
        });
        assert!(
            up.is_some(),
            "HAProxy did not come up within 10 s:\n{}",
            haproxy.proc.output()
        );
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

    /// `show stat` for one server of backend `be`, by column name.
    pub fn stat(&self, server: &str) -> HashMap<String, String> {
        let answer = self
            .try_command("show stat")
            .unwrap_or_else(|e| panic!("HAProxy stats socket: {e}\n{}", self.proc.output()));
        stat_row(&answer, server)
            .unwrap_or_else(|| panic!("server {server} not in `show stat`: {answer}"))
    }

    /// `stat`, or None when HAProxy does not answer (it may be going away at the end of a
    /// failed test).
    pub fn try_stat(&self, server: &str) -> Option<HashMap<String, String>> {
        stat_row(&self.try_command("show stat").ok()?, server)
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

/// One server's row of backend `be` in a `show stat` answer, by column name.
pub fn stat_row(answer: &str, server: &str) -> Option<HashMap<String, String>> {
    let mut lines = answer.lines();
    let header: Vec<&str> = lines.next()?.strip_prefix("# ")?.split(',').collect();
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
}
