//! A child process with its stdout and stderr kept line by line; killed on drop, with the
//! process groups of its own children (drainit's app), so that nothing outlives a failed test.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::clock::{Clock, poll_until};
use super::lines::{LineFilter, Lines, TimelineSink};
use super::procfs::children_of;

pub struct Proc {
    pub name: String,
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
    exited: Option<ExitStatus>,
}

impl Proc {
    /// With `timeline`, the lines its filter keeps (from either stream) also go to the test's
    /// timeline.
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
        let sink = timeline.map(|(clock, filter)| TimelineSink {
            clock: clock.clone(),
            name: name.to_owned(),
            filter,
        });
        let stdout = Lines::read(child.stdout.take().expect("piped stdout"), sink.clone());
        let stderr = Lines::read(child.stderr.take().expect("piped stderr"), sink);
        Proc {
            name: name.to_owned(),
            child,
            stdout,
            stderr,
            exited: None,
        }
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, signal: Signal) {
        kill(self.pid(), signal).unwrap_or_else(|e| panic!("cannot signal {}: {e}", self.name));
    }

    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait failed");
        }
        self.exited
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        poll_until(timeout, Duration::from_millis(5), || {
            self.try_exit().is_some()
        });
        self.exited
    }

    /// Waits for the exit; panics with the output after `timeout`.
    pub fn expect_exit(&mut self, timeout: Duration, why: &str) -> ExitStatus {
        self.wait_exit(timeout).unwrap_or_else(|| {
            panic!(
                "{} still running {timeout:?} after {why}:\n{}",
                self.name,
                self.output()
            )
        })
    }

    /// The first line of either stream (so far or within `timeout`) that matches.
    pub fn wait_line(&self, timeout: Duration, matches: impl Fn(&str) -> bool) -> Option<String> {
        let found = poll_until(timeout, Duration::from_millis(10), || {
            self.stdout.count(&matches) + self.stderr.count(&matches) > 0
        });
        found?;
        self.lines().into_iter().find(|l| matches(l))
    }

    /// Every line of both streams so far, in the order the test saw them.
    pub fn lines(&self) -> Vec<String> {
        let mut all = self.stdout.all();
        all.extend(self.stderr.all());
        all.sort_by_key(|l| l.at);
        all.into_iter().map(|l| l.text).collect()
    }

    /// The last 200 lines, indented, for failure messages.
    pub fn output(&self) -> String {
        let lines = self.lines();
        let start = lines.len().saturating_sub(200);
        lines[start..]
            .iter()
            .map(|l| format!("    | {l}\n"))
            .collect()
    }

    /// SIGKILL to the process groups its children lead (drainit's app) and to the process: a
    /// container runtime killing the pod.
    pub fn kill_all(&self) {
        for child in children_of(self.pid()) {
            let _ = kill(Pid::from_raw(-child.as_raw()), Signal::SIGKILL);
            let _ = kill(child, Signal::SIGKILL);
        }
        let _ = kill(self.pid(), Signal::SIGKILL);
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
        if !children.is_empty() && self.wait_exit(Duration::from_secs(3)).is_some() {
            return;
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits up to `timeout` for a child the test spawned itself.
pub fn wait_timeout(child: &mut std::process::Child, timeout: Duration) -> Option<ExitStatus> {
    let mut status = None;
    poll_until(timeout, Duration::from_millis(5), || {
        status = child.try_wait().expect("try_wait failed");
        status.is_some()
    });
    status
}
