//! Starting the app and signalling it. Waiting for it is the reaper's job alone (see reaper.rs).

use std::ffi::{OsStr, OsString};
use std::io::{self, IsTerminal};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::{self, Pid};
use tracing::{debug, info, warn};

use crate::exit::{self, StartupError};
use crate::process_tree;
use crate::throttle::Throttle;

/// How long drainit keeps killing what the app left behind before it gives up and exits.
pub const LEFTOVERS_LIMIT: Duration = Duration::from_secs(2);

/// The app's program and arguments, as given after `--`.
#[derive(Debug, Clone)]
pub struct AppCommand {
    pub program: OsString,
    pub args: Vec<OsString>,
}

impl AppCommand {
    pub fn from_argv(mut argv: Vec<OsString>) -> Result<Self, StartupError> {
        if argv.is_empty() {
            return Err(StartupError::usage(
                "no command to run: put the app after --, e.g. drainit -- /app/server --port 8080",
            ));
        }
        let program = argv.remove(0);
        Ok(Self {
            program,
            args: argv,
        })
    }
}

/// The running app. Its pid is also its process-group id: the app leads its own group so that
/// the budget kill reaches every process it started, and never drainit.
#[derive(Debug, Clone, Copy)]
pub struct App {
    pub pid: Pid,
    /// Forward signals to the whole group (`--group`) rather than the app alone.
    forward_to_group: bool,
}

impl App {
    /// Spawns the app in its own process group; on a terminal, that group becomes the terminal's
    /// foreground so that Ctrl-C and job control reach the app as they would without drainit.
    ///
    /// Must run before the reaper first polls: std reaps a child whose exec failed, and a reaper
    /// running in between would take that status (and make std panic).
    pub fn spawn(command: &AppCommand, forward_to_group: bool) -> Result<Self, StartupError> {
        let mut builder = Command::new(&command.program);
        builder.args(&command.args).process_group(0);
        if owns_terminal_foreground() {
            // SAFETY: the closure runs in the forked child before exec and only makes
            // async-signal-safe calls (setpgid, sigaction, tcsetpgrp) on fd 0, allocating nothing.
            unsafe { builder.pre_exec(take_terminal_foreground) };
        }
        let child = builder
            .spawn()
            .map_err(|e| spawn_error(&command.program, e))?;
        let pid = Pid::from_raw(child.id() as i32);
        // Dropping a std Child neither waits nor kills: the reaper collects its status.
        drop(child);
        info!(event = "app_started", pid = pid.as_raw(), program = %command.program.to_string_lossy(), "app started");
        Ok(Self {
            pid,
            forward_to_group,
        })
    }

    /// Forwards `signal` to the app (or its group, with `--group`).
    pub fn forward(&self, signal: i32) {
        send(self.signal_target(), signal);
    }

    /// Continues the app (or its group) in case it is stopped (SIGSTOP, a debugger): a stopped
    /// process keeps its stop signal pending, and every stop would end in the budget kill.
    pub fn resume(&self) {
        send(self.signal_target(), Signal::SIGCONT as i32);
    }

    fn signal_target(&self) -> Pid {
        if self.forward_to_group {
            self.group()
        } else {
            self.pid
        }
    }

    /// SIGKILLs the app's whole process group, grandchildren included.
    pub fn kill_group(&self) {
        send(self.group(), Signal::SIGKILL as i32);
        // An app that moved itself to another group still dies.
        send(self.pid, Signal::SIGKILL as i32);
    }

    /// After the app exited: SIGKILLs what it left behind, the rest of its process group and
    /// every process drainit adopted (a daemon that left the group with setsid), as the kernel
    /// does to a container's processes when its PID 1 exits. So drainit leaves no stragglers
    /// when it is not PID 1 either: it kills again until none is left, since a daemon may fork
    /// between one look and the kill (`reap` collects the dead in between), for at most
    /// [`LEFTOVERS_LIMIT`]. As PID 1 one round does: the kernel kills the rest when drainit exits.
    /// drainit's `own` processes (app checks) are killed too, but are not the app's leftovers.
    /// Returns whether the app left anything.
    pub fn kill_leftovers(&self, own: &[Pid], mut reap: impl FnMut()) -> bool {
        let deadline = Instant::now() + LEFTOVERS_LIMIT;
        let apps_own = |pid: &Pid| !own.contains(pid);
        let mut left_any = false;
        loop {
            let killed = self.kill_leftovers_once();
            left_any |= killed.iter().any(apps_own);
            if killed.is_empty() || unistd::getpid().as_raw() == 1 {
                return left_any;
            }
            if Instant::now() >= deadline {
                warn!(
                    event = "leftovers_survived",
                    left = killed.len(),
                    "processes the app left behind still run after {LEFTOVERS_LIMIT:?} of SIGKILLs"
                );
                return left_any;
            }
            reap();
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// SIGKILLs the app's group and every live descendant of drainit; returns the descendants
    /// that were alive.
    fn kill_leftovers_once(&self) -> Vec<Pid> {
        // Who is alive is read before anything is killed: a process SIGKILLed a moment earlier
        // may already be a zombie when /proc is read, and would go uncounted.
        let me = std::process::id() as i32;
        let alive: Vec<Pid> = process_tree::descendants_and_self(me)
            .into_iter()
            .filter(|pid| *pid != me && !process_tree::is_zombie(*pid))
            .map(Pid::from_raw)
            .collect();
        // The group in one call: its members are drainit's descendants too (drainit is their
        // subreaper).
        let _ = signal::killpg(self.pid, Signal::SIGKILL);
        alive
            .into_iter()
            .filter(|pid| signal::kill(*pid, Signal::SIGKILL).is_ok())
            .collect()
    }

    fn group(&self) -> Pid {
        Pid::from_raw(-self.pid.as_raw())
    }
}

/// Failures to signal the app, logged at most once per 10 s: refused once (EPERM, the app
/// changed its uid), a signal is refused every time after, and a storm of them would flood the
/// log.
static SIGNAL_FAILURES: Mutex<Throttle> = Mutex::new(Throttle::new(Duration::from_secs(10)));

fn send(target: Pid, signal: i32) {
    // SAFETY: kill(2) takes plain integers; no memory is shared with the callee.
    let sent = Errno::result(unsafe { nix::libc::kill(target.as_raw(), signal) });
    match sent {
        Ok(_) => debug!(
            event = "signal_sent",
            target = target.as_raw(),
            signal,
            "signal sent"
        ),
        // Already gone: its exit status is on its way to the reaper.
        Err(Errno::ESRCH) => debug!(
            event = "signal_target_gone",
            target = target.as_raw(),
            signal,
            "no such process"
        ),
        Err(e) => {
            if let Some(held_back) =
                crate::sync::lock(&SIGNAL_FAILURES).occurred(tokio::time::Instant::now())
            {
                let target = target.as_raw();
                warn!(event = "signal_failed", target, signal, error = %e, held_back, "could not signal the app");
            }
        }
    }
}

/// Whether `program` (a path, or a name looked up in PATH as exec does) can be run, for commands
/// drainit only runs later (`--ready-exec`): the mistake is reported at start-up, not hours on.
pub fn check_runnable(program: &OsStr) -> io::Result<()> {
    let bytes = program.as_bytes();
    if bytes.contains(&b'/') {
        return check_executable_file(Path::new(program));
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    let mut found = Err(io::Error::from_raw_os_error(nix::libc::ENOENT));
    for dir in std::env::split_paths(&path) {
        match check_executable_file(&dir.join(program)) {
            Ok(()) => return Ok(()),
            // As execvp: a match that cannot be run is reported if nothing later can be.
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => found = Err(e),
            Err(_) => {}
        }
    }
    found
}

fn check_executable_file(path: &Path) -> io::Result<()> {
    if !std::fs::metadata(path)?.is_file() {
        return Err(io::Error::from_raw_os_error(nix::libc::EACCES));
    }
    unistd::access(path, unistd::AccessFlags::X_OK).map_err(io::Error::from)
}

/// The start-up error for a `program` that cannot be run, with the exit code of a shell.
pub fn spawn_error(program: &OsStr, error: io::Error) -> StartupError {
    let program = program.to_string_lossy();
    let (code, fix) = match error.kind() {
        io::ErrorKind::NotFound => (
            exit::NOT_FOUND,
            "check the path, PATH inside the image, or a script's #! interpreter",
        ),
        io::ErrorKind::PermissionDenied => (
            exit::NOT_EXECUTABLE,
            "make it executable (chmod +x) and check the volume is not mounted noexec",
        ),
        _ => (
            exit::NOT_EXECUTABLE,
            "check it is a binary or script for this platform",
        ),
    };
    StartupError {
        code,
        message: format!("cannot run '{program}': {error}; {fix}"),
    }
}

/// drainit was started in the foreground of a terminal (interactive `docker run -it`, a shell).
fn owns_terminal_foreground() -> bool {
    let stdin = io::stdin();
    stdin.is_terminal() && unistd::tcgetpgrp(&stdin).is_ok_and(|fg| fg == unistd::getpgrp())
}

/// In the child, before exec: make the app's new group the terminal's foreground. A background
/// group changing the foreground gets SIGTTOU unless it ignores it, so it is ignored for the call
/// and restored after (exec keeps ignored signals ignored).
fn take_terminal_foreground() -> io::Result<()> {
    // Not io::stdin(): a forked child must not initialise Rust's stdin (it allocates).
    // SAFETY: fd 0 is open for the whole call: the parent found a terminal on it just before
    // forking, and the child inherits it.
    let stdin = unsafe { std::os::fd::BorrowedFd::borrow_raw(0) };
    unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
    // SAFETY: SIG_IGN and SIG_DFL install no Rust code as a handler.
    unsafe { signal::signal(Signal::SIGTTOU, SigHandler::SigIgn) }?;
    let foreground = unistd::tcsetpgrp(stdin, unistd::getpgrp());
    // SAFETY: as above.
    unsafe { signal::signal(Signal::SIGTTOU, SigHandler::SigDfl) }?;
    foreground.map_err(io::Error::from)
}
