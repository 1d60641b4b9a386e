//! The one and only reaper: as PID 1 (or a child subreaper) drainit inherits every orphan in the
//! container and must collect each one, or zombies pile up.
//!
//! Nothing else in drainit waits on a child. A second waiter (say `Child::wait()` on the app)
//! races this one, and the loser gets ECHILD: the app's exit status would be lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nix::errno::Errno;
use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{self, Pid};
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use crate::exit;

/// A child that was collected, with the exit code a shell would report for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reaped {
    pub pid: Pid,
    pub code: u8,
    /// The signal that killed it, if one did (`code` is then 128 + its number).
    pub signal: Option<Signal>,
}

#[derive(Debug, Default)]
pub struct Reaper {
    orphans_reaped: u64,
    waiters: Waiters,
}

/// Processes drainit started besides the app (`--ready-exec` checks) whose exit codes someone
/// awaits: the reaper hands each code over instead of waiting twice.
#[derive(Debug, Clone, Default)]
pub struct Waiters(Arc<Mutex<HashMap<Pid, oneshot::Sender<u8>>>>);

impl Waiters {
    /// Registers `pid` for its exit code. Call it right after spawning, before any `.await`: on
    /// drainit's single-threaded runtime the reaper cannot run in between.
    pub fn wait_for(&self, pid: Pid) -> oneshot::Receiver<u8> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(pid, tx);
        rx
    }

    /// drainit's own processes still running (app checks), so they are not mistaken for the app's.
    pub fn pids(&self) -> Vec<Pid> {
        self.lock().keys().copied().collect()
    }

    fn deliver(&self, reaped: Reaped) -> bool {
        match self.lock().remove(&reaped.pid) {
            Some(waiter) => {
                let _ = waiter.send(reaped.code);
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Pid, oneshot::Sender<u8>>> {
        crate::sync::lock(&self.0)
    }
}

impl Reaper {
    /// Becomes the reaper of orphaned descendants when drainit is not PID 1 (then the kernel
    /// would hand them to the real init, and the app's daemons would escape the budget).
    pub fn adopt_orphans() {
        if unistd::getpid().as_raw() == 1 {
            return;
        }
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            warn!(event = "subreaper_unavailable", error = %e, "cannot become a child subreaper: orphans will go to the real init");
        }
    }

    /// Collects every child that has exited, without blocking; returns the one that is `app`,
    /// if it is among them (a sidecar has none). Called on each SIGCHLD (signals coalesce: one
    /// may stand for many).
    pub fn reap(&mut self, app: Option<Pid>) -> Option<Reaped> {
        let mut app_exit = None;
        while let Some(reaped) = reap_one() {
            if Some(reaped.pid) == app {
                app_exit = Some(reaped);
            } else if !self.waiters.deliver(reaped) {
                self.orphans_reaped += 1;
                debug!(
                    event = "zombie_reaped",
                    pid = reaped.pid.as_raw(),
                    code = reaped.code,
                    "reaped a zombie"
                );
            }
        }
        app_exit
    }

    pub fn orphans_reaped(&self) -> u64 {
        self.orphans_reaped
    }

    /// Where other tasks register the processes they wait for.
    pub fn waiters(&self) -> Waiters {
        self.waiters.clone()
    }
}

fn reap_one() -> Option<Reaped> {
    loop {
        return match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => Some(Reaped {
                pid,
                code: code as u8,
                signal: None,
            }),
            Ok(WaitStatus::Signaled(pid, signal, _)) => Some(Reaped {
                pid,
                code: exit::killed_by(signal as i32),
                signal: Some(signal),
            }),
            // Stopped/continued children are not reported without WUNTRACED/WCONTINUED.
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => None,
            Ok(other) => {
                info!(event = "unexpected_wait_status", status = ?other, "unexpected wait status");
                continue;
            }
            Err(Errno::EINTR) => continue,
            Err(e) => {
                warn!(event = "waitpid_failed", error = %e, "waitpid failed");
                None
            }
        };
    }
}
