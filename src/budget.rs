//! The shutdown budget: everything from the start of the drain to the kubelet's SIGKILL must fit
//! in the pod's grace period, and drainit kills the app itself just before the kubelet would, so
//! the kill is logged and the exit code is drainit's to report.

use std::time::Duration;

use crate::cli::format_duration;
use crate::exit::StartupError;

/// drainit kills the app's group this long before the grace period ends.
pub const KILL_MARGIN: Duration = Duration::from_secs(1);
/// The least time the app must have between its stop signal and the kill.
pub const MIN_STOP_TIME: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budget {
    grace_period: Duration,
}

impl Budget {
    /// Checks that a drain of at most `longest_drain` (given on the command line as `drain_flag`)
    /// leaves the app at least `MIN_STOP_TIME` before the kill; the error says which numbers fit.
    pub fn new(
        grace_period: Duration,
        longest_drain: Duration,
        drain_flag: &str,
    ) -> Result<Self, StartupError> {
        let reserved = KILL_MARGIN + MIN_STOP_TIME;
        if longest_drain + reserved <= grace_period {
            return Ok(Self { grace_period });
        }
        let grace = format_duration(grace_period);
        // terminationGracePeriodSeconds takes whole seconds.
        let needed = (longest_drain + reserved).as_millis().div_ceil(1000);
        let needed = format_duration(Duration::from_secs(needed as u64));
        let message = match grace_period.checked_sub(reserved) {
            Some(max_drain) => format!(
                "{drain_flag} {} leaves the app no time to stop inside --grace-period {grace}: \
                 use {drain_flag} {} or less, or --grace-period {needed} or more (and the same \
                 terminationGracePeriodSeconds)",
                format_duration(longest_drain),
                format_duration(max_drain),
            ),
            None => format!(
                "--grace-period {grace} is too short: drainit kills the app {} before it ends and \
                 the app needs {} to stop; use --grace-period {needed} or more",
                format_duration(KILL_MARGIN),
                format_duration(MIN_STOP_TIME),
            ),
        };
        Err(StartupError::usage(message))
    }

    /// How long after the start of the drain the app's process group is SIGKILLed.
    pub fn kill_after(&self) -> Duration {
        // `new` checked the grace period is longer than the margin.
        self.grace_period - KILL_MARGIN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn defaults_fit() {
        assert!(Budget::new(S(30), S(5), "--drain-delay").is_ok());
        assert!(Budget::new(S(30), S(28), "--drain-delay").is_ok());
        assert!(Budget::new(S(2), S(0), "--drain-delay").is_ok());
    }

    #[test]
    fn a_drain_longer_than_the_grace_period_names_the_numbers_that_fit() {
        let err = Budget::new(S(30), S(40), "--drain-delay").unwrap_err();
        assert_eq!(err.code, crate::exit::USAGE);
        assert!(
            err.message.contains("--drain-delay 28s or less"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("--grace-period 42s or more"),
            "{}",
            err.message
        );
        assert!(Budget::new(S(30), S(29), "--drain-delay").is_err());
    }

    #[test]
    fn a_grace_period_too_short_for_anything() {
        let err = Budget::new(Duration::from_millis(1500), S(0), "--drain-delay").unwrap_err();
        assert!(
            err.message.contains("--grace-period 2s or more"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_kill_lands_one_second_before_the_grace_period_ends() {
        assert_eq!(Budget::new(S(30), S(5), "-").unwrap().kill_after(), S(29));
    }
}
