//! Exit codes and the error types of drainit's own failures.
//!
//! The app's exit code always wins when there is one: drainit's own codes only appear when the app
//! never started, or when drainit had to kill it. They are documented in the README.

use std::fmt;

/// Bad command line or environment: unknown flag, bad value, impossible budget, no command.
pub const USAGE: u8 = 2;
/// drainit could not set itself up (health port or control socket taken): the app never ran.
pub const SETUP_FAILED: u8 = 71;
/// `drainit prestop` found no drainit on the control channel.
pub const PRESTOP_UNREACHABLE: u8 = 69;
/// `drainit prestop` was refused: it runs as another user than drainit, and not as root
/// (sysexits' EX_NOPERM).
pub const PRESTOP_REFUSED: u8 = 77;
/// `drainit prestop` gave up waiting (its `--timeout`), like timeout(1).
pub const PRESTOP_TIMEOUT: u8 = 124;
/// The command exists but cannot be executed, as in POSIX shells.
pub const NOT_EXECUTABLE: u8 = 126;
/// The command was not found, as in POSIX shells.
pub const NOT_FOUND: u8 = 127;

/// Exit code of a process killed by `signal`, as shells report it.
pub fn killed_by(signal: i32) -> u8 {
    128u8.saturating_add(u8::try_from(signal).unwrap_or(u8::MAX - 128))
}

/// A failure before the app runs: printed as one line, then drainit exits with `code`.
#[derive(Debug)]
pub struct StartupError {
    pub code: u8,
    pub message: String,
}

impl StartupError {
    pub fn usage(message: impl Into<String>) -> Self {
        Self {
            code: USAGE,
            message: message.into(),
        }
    }

    pub fn setup(message: impl Into<String>) -> Self {
        Self {
            code: SETUP_FAILED,
            message: message.into(),
        }
    }
}

impl fmt::Display for StartupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for StartupError {}
