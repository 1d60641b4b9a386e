//! The validated configuration of a run: everything the command line says, checked as a whole
//! (the budget) before anything starts.

use std::net::SocketAddr;
use std::time::Duration;

use tracing::warn;

use crate::app::AppCommand;
use crate::budget::Budget;
use crate::cidr::Cidr;
use crate::cli::{RunArgs, env_variable, format_duration};
use crate::drain::traffic::QuietPeriod;
use crate::drain::{DEFAULT_LB_UNHEALTHY_THRESHOLD, DrainPolicy, WatchedDrain, Watcher};
use crate::exit::StartupError;
use crate::gate::StartupGate;
use crate::lifecycle::Mode;
use crate::readiness::{AppCheck, ReadinessConfig, TcpOption};

/// How long the start-up gate waits for load balancers by default: two checks at AWS ALB's
/// default 30 s interval, with room to spare.
const DEFAULT_LB_GATE_TIMEOUT: Duration = Duration::from_secs(90);
const DEFAULT_DRAIN_DELAY: Duration = Duration::from_secs(5);
const DEFAULT_DRAIN_MIN: Duration = Duration::from_secs(1);
const DEFAULT_CHECK_INTERVAL: Duration = Duration::from_secs(1);
const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The app to run; `None` for `drainit sidecar`, whose app is another container.
    pub command: Option<AppCommand>,
    pub health_listen: SocketAddr,
    pub drain: DrainPolicy,
    pub budget: Budget,
    /// A signal number: real-time signals have no `Signal` variant.
    pub stop_signal: i32,
    pub forward_to_group: bool,
    /// The app's serving ports, if given (`--app-port`); discovered otherwise.
    pub app_ports: Vec<u16>,
    pub readiness: ReadinessConfig,
    pub startup_gate: Option<StartupGate>,
    /// Where load balancers check from (`--lb-source`); empty: anywhere.
    pub lb_sources: Vec<Cidr>,
}

impl RunConfig {
    pub fn from_args(args: RunArgs) -> Result<Self, StartupError> {
        let mut config = Self::checked(&args)?;
        config.command = Some(AppCommand::from_argv(args.command)?);
        Ok(config)
    }

    /// `drainit sidecar`: the same options, with no app to run, signal or kill.
    pub fn sidecar_from_args(args: RunArgs) -> Result<Self, StartupError> {
        if let Some(program) = args.command.first() {
            return Err(StartupError::usage(format!(
                "drainit sidecar runs no app, but got '{}' after --: drop the command (the app runs in its own container), or run drainit [OPTIONS] -- {0} as the app's ENTRYPOINT",
                program.to_string_lossy()
            )));
        }
        let wrapper_only = [
            ("--stop-signal", args.stop_signal != nix::libc::SIGTERM),
            ("--group", args.group),
        ];
        refuse_stray(
            &args,
            &wrapper_only,
            "drainit -- app, not drainit sidecar (the kubelet stops the app's container)",
        )?;
        let mut config = Self::checked(&args)?;
        // No app process to scope the default check's ports to: every listener in the pod.
        if let Some(AppCheck::Listen { pod_wide, .. }) = &mut config.readiness.check {
            *pod_wide = true;
        }
        Ok(config)
    }

    pub fn mode(&self) -> Mode {
        match self.command {
            Some(_) => Mode::Wrapper,
            None => Mode::Sidecar,
        }
    }

    /// Everything but the command, checked as a whole.
    fn checked(args: &RunArgs) -> Result<Self, StartupError> {
        let drain = drain_policy(args)?;
        let budget = Budget::new(
            args.grace_period,
            drain.longest(),
            &longest_drain_flag(args),
        )?;
        let app_ports = app_ports(args)?;
        let readiness = readiness(args)?;
        let startup_gate = startup_gate(args)?;
        let lb_sources = lb_sources(args, &drain, startup_gate.is_some())?;
        Ok(Self {
            command: None,
            health_listen: args.health_listen,
            drain,
            budget,
            stop_signal: args.stop_signal,
            forward_to_group: args.group,
            readiness,
            startup_gate,
            lb_sources,
            app_ports,
        })
    }
}

/// The app check: the one given, or by default `--ready-tcp auto` (the app listens): drainit
/// never calls an app ready that cannot take a connection yet. `--ready-tcp none` turns checks
/// off, and with them every option that tunes one.
fn readiness(args: &RunArgs) -> Result<ReadinessConfig, StartupError> {
    let listen = || AppCheck::Listen {
        ports: args.app_ports.clone(),
        pod_wide: false,
    };
    let check = match (&args.ready_http, &args.ready_tcp, &args.ready_exec) {
        (Some(url), _, _) => Some(AppCheck::http(url)?),
        (_, Some(value), _) => match AppCheck::tcp_option(value)? {
            TcpOption::Auto => Some(listen()),
            TcpOption::None => None,
            TcpOption::Connect(check) => Some(check),
        },
        (_, _, Some(command)) => Some(AppCheck::exec(command)?),
        _ => Some(listen()),
    };
    let mut min_ready = args.min_ready;
    if check.is_none() {
        let stray = [
            ("--ready-interval", args.ready_interval.is_some()),
            ("--ready-timeout", args.ready_timeout.is_some()),
            ("--min-ready", !args.min_ready.is_zero()),
        ];
        let none = if args.is_from_env("--ready-tcp") {
            "DRAINIT_READY_TCP=none"
        } else {
            "--ready-tcp none"
        };
        refuse_stray(
            args,
            &stray,
            &format!("an app check: drop {none} for the default one (the app listens)"),
        )?;
        min_ready = Duration::ZERO;
    }
    let interval = args.ready_interval.unwrap_or(DEFAULT_CHECK_INTERVAL);
    let timeout = args.ready_timeout.unwrap_or(DEFAULT_CHECK_TIMEOUT);
    if interval.is_zero() {
        return Err(StartupError::usage(
            "--ready-interval 0 would check in a busy loop: use e.g. 1s",
        ));
    }
    if timeout.is_zero() {
        return Err(StartupError::usage(
            "--ready-timeout 0 leaves the check no time to answer: use e.g. 1s",
        ));
    }
    Ok(ReadinessConfig {
        check,
        interval,
        timeout,
        min_ready,
    })
}

/// `--lb-source` only matters where load balancers are told apart from other clients.
fn lb_sources(args: &RunArgs, drain: &DrainPolicy, gate: bool) -> Result<Vec<Cidr>, StartupError> {
    let applies = drain.watches(Watcher::LbProbes) || gate;
    refuse_stray(
        args,
        &[("--lb-source", !args.lb_source.is_empty() && !applies)],
        "--drain-watch lb-probes and --ready-after-lb-probes",
    )?;
    Ok(if applies {
        args.lb_source.clone()
    } else {
        Vec::new()
    })
}

/// An app port that is drainit's own probe port would make drainit's listener the app's.
fn app_ports(args: &RunArgs) -> Result<Vec<u16>, StartupError> {
    if args.app_ports.contains(&0) {
        return Err(StartupError::usage(
            "--app-port 0 is not a port: give the port the app serves on (1-65535)",
        ));
    }
    let own = args.health_listen.port();
    if own != 0 && args.app_ports.contains(&own) {
        return Err(StartupError::usage(format!(
            "--app-port {own} is drainit's own probe port (--health-listen): give the port the app serves on, or move the probes"
        )));
    }
    Ok(args.app_ports.clone())
}

fn startup_gate(args: &RunArgs) -> Result<Option<StartupGate>, StartupError> {
    if args.ready_lb_timeout.is_some_and(|t| t.is_zero()) {
        return Err(StartupError::usage(
            "--ready-lb-timeout 0 opens the gate at once: give the load balancers time, e.g. 90s (or drop --ready-after-lb-probes)",
        ));
    }
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
    let delay = args.drain_delay.unwrap_or(DEFAULT_DRAIN_DELAY);
    if watchers.is_empty() {
        let stray = [
            ("--drain-min", args.drain_min.is_some()),
            ("--drain-max", args.drain_max.is_some()),
            ("--quiet-period", args.quiet_period.is_some()),
            (
                "--lb-unhealthy-threshold",
                args.lb_unhealthy_threshold.is_some(),
            ),
        ];
        refuse_stray(
            args,
            &stray,
            "a watched drain: add --drain-watch traffic,lb-probes",
        )?;
        return Ok(DrainPolicy::Fixed(delay));
    }
    refuse_stray(
        args,
        &[(
            "--quiet-period",
            args.quiet_period.is_some() && !watchers.contains(&Watcher::Traffic),
        )],
        "--drain-watch traffic",
    )?;
    refuse_stray(
        args,
        &[(
            "--lb-unhealthy-threshold",
            args.lb_unhealthy_threshold.is_some() && !watchers.contains(&Watcher::LbProbes),
        )],
        "--drain-watch lb-probes",
    )?;
    if args.drain_delay.is_some() && args.drain_max.is_some() {
        let message = "--drain-delay and --drain-max both set the longest watched drain";
        if !args.is_from_env("--drain-delay") && !args.is_from_env("--drain-max") {
            return Err(StartupError::usage(format!(
                "{message}: keep --drain-max (or drop --drain-watch for a fixed delay)"
            )));
        }
        warn!(
            event = "drain_delay_ignored",
            "{message}: --drain-max wins, --drain-delay is ignored"
        );
    }
    let max = args.drain_max.unwrap_or(delay);
    let min = args.drain_min.unwrap_or(DEFAULT_DRAIN_MIN);
    let max_flag = longest_drain_flag(args);
    if min > max {
        return Err(StartupError::usage(format!(
            "--drain-min {} is longer than {max_flag} {}: raise {max_flag} or lower --drain-min",
            format_duration(min),
            format_duration(max),
        )));
    }
    let quiet_period = args.quiet_period.unwrap_or(QuietPeriod::Auto);
    if let QuietPeriod::Fixed(quiet) = quiet_period
        && quiet >= max
    {
        return Err(StartupError::usage(format!(
            "--quiet-period {} is not shorter than {max_flag} {}: traffic could never count as quiet; lower it or use auto",
            format_duration(quiet),
            format_duration(max),
        )));
    }
    Ok(DrainPolicy::Watched(WatchedDrain {
        watchers,
        min,
        max,
        quiet_period,
        lb_unhealthy_threshold: args
            .lb_unhealthy_threshold
            .unwrap_or(DEFAULT_LB_UNHEALTHY_THRESHOLD),
    }))
}

/// The flag that sets the longest drain, as the user gave it: a watched drain's `--drain-max`
/// defaults to `--drain-delay`, and an error should name the flag they actually set.
fn longest_drain_flag(args: &RunArgs) -> String {
    match (args.drain_watch.is_empty(), args.drain_max.is_some()) {
        (false, true) => "--drain-max".into(),
        _ => "--drain-delay".into(),
    }
}

/// An option given where it has no effect is never silently ignored: on the command line it is
/// an error; from a `DRAINIT_*` variable (perhaps shared by several pods) a warning.
fn refuse_stray(
    args: &RunArgs,
    options: &[(&str, bool)],
    applies_to: &str,
) -> Result<(), StartupError> {
    for (flag, _) in options.iter().filter(|(_, given)| *given) {
        if !args.is_from_env(flag) {
            return Err(StartupError::usage(format!(
                "{flag} only applies to {applies_to} (or drop {flag})"
            )));
        }
        let variable = env_variable(flag);
        warn!(
            event = "variable_ignored",
            "{variable} is ignored: {flag} only applies to {applies_to}"
        );
    }
    Ok(())
}
