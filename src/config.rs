//! The validated configuration of a run: everything the command line says, checked as a whole
//! (the budget) before anything starts.

use std::net::SocketAddr;

use nix::sys::signal::Signal;

use crate::app::AppCommand;
use crate::budget::Budget;
use crate::cli::RunArgs;
use crate::drain::traffic::QuietPeriod;
use crate::drain::{DrainPolicy, WatchedDrain};
use crate::exit::StartupError;

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub command: AppCommand,
    pub health_listen: SocketAddr,
    pub drain: DrainPolicy,
    pub budget: Budget,
    pub stop_signal: Signal,
    pub forward_to_group: bool,
    /// The app's serving ports, if given (`--app-port`); discovered otherwise.
    pub app_ports: Vec<u16>,
}

impl RunConfig {
    pub fn from_args(args: RunArgs) -> Result<Self, StartupError> {
        let drain = drain_policy(&args)?;
        let budget = Budget::new(args.grace_period, drain.longest(), drain.longest_flag())?;
        Ok(Self {
            command: AppCommand::from_argv(args.command)?,
            health_listen: args.health_listen,
            drain,
            budget,
            stop_signal: args.stop_signal,
            forward_to_group: args.group,
            app_ports: args.app_ports,
        })
    }
}

/// The fixed delay, or the watched drain when `--drain-watch` names watchers. Options of the
/// watched drain without `--drain-watch` are an error rather than silently ignored.
fn drain_policy(args: &RunArgs) -> Result<DrainPolicy, StartupError> {
    let mut watchers: Vec<_> = Vec::new();
    for watcher in &args.drain_watch {
        if !watchers.contains(watcher) {
            watchers.push(*watcher);
        }
    }
    if watchers.is_empty() {
        let stray = [
            ("--drain-max", args.drain_max.is_some()),
            ("--quiet-period", args.quiet_period.is_some()),
            (
                "--lb-unhealthy-threshold",
                args.lb_unhealthy_threshold.is_some(),
            ),
        ];
        if let Some((flag, _)) = stray.iter().find(|(_, given)| *given) {
            return Err(StartupError::usage(format!(
                "{flag} only applies to a watched drain: add --drain-watch traffic,lb-probes (or drop {flag})"
            )));
        }
        return Ok(DrainPolicy::Fixed(args.drain_delay));
    }
    let max = args.drain_max.unwrap_or(args.drain_delay);
    if args.drain_min > max {
        return Err(StartupError::usage(format!(
            "--drain-min {} is longer than --drain-max {}: raise --drain-max (default: the drain delay) or lower --drain-min",
            humantime::format_duration(args.drain_min),
            humantime::format_duration(max),
        )));
    }
    Ok(DrainPolicy::Watched(WatchedDrain {
        watchers,
        min: args.drain_min,
        max,
        quiet_period: args.quiet_period.unwrap_or(QuietPeriod::Auto),
        lb_unhealthy_threshold: args.lb_unhealthy_threshold.unwrap_or(2),
    }))
}
