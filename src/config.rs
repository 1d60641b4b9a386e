//! The validated configuration of a run: everything the command line says, checked as a whole
//! (the budget) before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::app::AppCommand;
use crate::budget::Budget;
use crate::cli::RunArgs;
use crate::drain::traffic::QuietPeriod;
use crate::drain::{DrainPolicy, WatchedDrain};
use crate::exit::StartupError;
use crate::readiness::{AppCheck, ReadinessConfig, StartupGate};

/// How long the start-up gate waits for load balancers by default: two checks at AWS ALB's
/// default 30 s interval, with room to spare.
const DEFAULT_LB_GATE_TIMEOUT: Duration = Duration::from_secs(90);

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
    pub readiness: ReadinessConfig,
    pub startup_gate: Option<StartupGate>,
}

impl RunConfig {
    pub fn from_args(args: RunArgs) -> Result<Self, StartupError> {
        let drain = drain_policy(&args)?;
        let budget = Budget::new(args.grace_period, drain.longest(), drain.longest_flag())?;
        let readiness = readiness(&args)?;
        let startup_gate = startup_gate(&args)?;
        Ok(Self {
            command: AppCommand::from_argv(args.command)?,
            health_listen: args.health_listen,
            drain,
            budget,
            stop_signal: args.stop_signal,
            forward_to_group: args.group,
            readiness,
            startup_gate,
            app_ports: args.app_ports,
        })
    }
}

fn readiness(args: &RunArgs) -> Result<ReadinessConfig, StartupError> {
    let check = match (&args.ready_http, &args.ready_tcp, &args.ready_exec) {
        (Some(url), _, _) => Some(AppCheck::http(url)?),
        (_, Some(target), _) => Some(AppCheck::tcp(target)?),
        (_, _, Some(command)) => Some(AppCheck::exec(command)?),
        _ => None,
    };
    if args.ready_interval.is_zero() {
        return Err(StartupError::usage(
            "--ready-interval 0 would check in a busy loop: use e.g. 1s",
        ));
    }
    Ok(ReadinessConfig {
        check,
        interval: args.ready_interval,
        timeout: args.ready_timeout,
        min_ready: args.min_ready,
    })
}

fn startup_gate(args: &RunArgs) -> Result<Option<StartupGate>, StartupError> {
    match (args.ready_after_lb_probes, args.ready_lb_timeout) {
        (Some(probes), timeout) => Ok(Some(StartupGate {
            probes,
            timeout: timeout.unwrap_or(DEFAULT_LB_GATE_TIMEOUT),
        })),
        (None, Some(_)) => Err(StartupError::usage(
            "--ready-lb-timeout only applies to the start-up gate: add --ready-after-lb-probes N (or drop it)",
        )),
        (None, None) => Ok(None),
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
