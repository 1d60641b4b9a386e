//! The command line: every option, its `DRAINIT_*` variable and its `--help` text.
//!
//! Field docs are the `--help`; value parsers turn text into typed values so that a bad value is
//! a usage error (exit 2) before anything starts.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cidr::Cidr;
use crate::control::ControlAddr;
use crate::drain::Watcher;
use crate::drain::traffic::QuietPeriod;
use crate::exit::{self, StartupError};

/// PID-1 wrapper that drains a Kubernetes pod before stopping the app: on SIGTERM (or
/// `drainit prestop`) /ready turns 503 at once, the app keeps serving for the drain delay, then it
/// gets the stop signal; drainit SIGKILLs it 1 s before the grace period ends.
#[derive(Debug, Parser)]
#[command(
    name = "drainit",
    version,
    args_conflicts_with_subcommands = true,
    args_override_self = true,
    override_usage = "drainit [OPTIONS] -- <COMMAND> [ARGS]...\n       drainit sidecar [OPTIONS]\n       drainit prestop [--control <ADDR>] [--timeout <DURATION>]"
)]
pub struct Cli {
    #[command(subcommand)]
    pub subcommand: Option<Command>,

    #[command(flatten)]
    pub run: RunArgs,

    #[command(flatten)]
    pub shared: SharedArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start the drain of the running drainit and wait until it is over (the preStop hook).
    Prestop(PrestopArgs),
    /// Run with no app, as a sidecar container sharing the app's pod: the same probes and drain,
    /// started by `drainit prestop` or SIGTERM; the app's preStop hook `GET /drain/wait` holds the
    /// app until the drain is over. Takes the same options, but no command.
    Sidecar(Box<SidecarArgs>),
}

#[derive(Debug, Args)]
#[command(
    override_usage = "drainit sidecar [OPTIONS]",
    mut_arg("command", |arg| arg.hide(true))
)]
pub struct SidecarArgs {
    #[command(flatten)]
    pub run: RunArgs,
}

/// Options of the wrapper itself.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Where the probe server (/alive, /ready) listens: IP:PORT, :PORT or PORT.
    #[arg(long, env = "DRAINIT_HEALTH_LISTEN", value_name = "ADDR",
          default_value = "[::]:8099", value_parser = parse_listen_addr)]
    pub health_listen: SocketAddr,

    /// How long the app keeps serving after the drain starts, before it gets the stop signal
    /// [default: 5s].
    #[arg(long, env = "DRAINIT_DRAIN_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_delay: Option<Duration>,

    /// The pod's terminationGracePeriodSeconds, counted from the start of the drain. drainit
    /// SIGKILLs the app's process group 1 s before it ends and exits 137.
    #[arg(long, env = "DRAINIT_GRACE_PERIOD", value_name = "DURATION",
          default_value = "30s", value_parser = parse_duration)]
    pub grace_period: Duration,

    /// Signal sent to the app when the drain is over: TERM, SIGTERM or 15 (nginx wants QUIT,
    /// systemd RTMIN+3).
    #[arg(long, env = "DRAINIT_STOP_SIGNAL", value_name = "SIG",
          default_value = "SIGTERM", value_parser = crate::signals::parse_signal)]
    pub stop_signal: i32,

    /// Forward signals to the app's whole process group instead of the app alone (the final
    /// SIGKILL always hits the whole group).
    #[arg(long, env = "DRAINIT_GROUP", action = clap::ArgAction::SetTrue,
          value_parser = clap::builder::BoolishValueParser::new())]
    pub group: bool,

    /// End the drain when these watchers report it done, instead of after the fixed drain delay:
    /// `traffic` (no new request for the quiet period), `lb-probes` (every load balancer checking
    /// /ready saw it fail), or both, comma-separated.
    #[arg(
        long,
        env = "DRAINIT_DRAIN_WATCH",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub drain_watch: Vec<Watcher>,

    /// With --drain-watch: the shortest drain, whatever the watchers say [default: 1s].
    #[arg(long, env = "DRAINIT_DRAIN_MIN", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_min: Option<Duration>,

    /// With --drain-watch: the longest drain, instead of --drain-delay [default: the drain delay].
    #[arg(long, env = "DRAINIT_DRAIN_MAX", value_name = "DURATION", value_parser = parse_duration)]
    pub drain_max: Option<Duration>,

    /// With --drain-watch traffic: how long no request may arrive before the drain is done.
    /// `auto` derives it from the arrival rate before the drain: a 0.1 % chance that a replica
    /// still in rotation sees a gap that long within the drain [default: auto].
    #[arg(long, env = "DRAINIT_QUIET_PERIOD", value_name = "auto|DURATION", value_parser = parse_quiet_period)]
    pub quiet_period: Option<QuietPeriod>,

    /// The app's serving ports, where traffic is observed and, by default, readiness too: ready
    /// once all of them listen (repeatable) [default: the ports the app's processes listen on;
    /// drainit sidecar: every TCP port listening in the pod but drainit's own].
    #[arg(
        long = "app-port",
        env = "DRAINIT_APP_PORT",
        value_name = "PORT",
        value_delimiter = ','
    )]
    pub app_ports: Vec<u16>,

    /// With --drain-watch lb-probes: consecutive 503s a load balancer must get from /ready
    /// before it counts as having taken the pod out [default: 2].
    #[arg(long, env = "DRAINIT_LB_UNHEALTHY_THRESHOLD", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub lb_unhealthy_threshold: Option<u32>,

    /// Only clients from these address ranges can count as load balancers (for --drain-watch
    /// lb-probes and --ready-after-lb-probes), e.g. the load balancers' subnets 10.0.0.0/16
    /// [default: any address].
    #[arg(
        long,
        env = "DRAINIT_LB_SOURCE",
        value_name = "CIDR,...",
        value_delimiter = ','
    )]
    pub lb_source: Vec<Cidr>,

    /// Ready only while GET on this URL answers 2xx (plain http://, e.g. http://127.0.0.1:8080/healthz).
    #[arg(
        long,
        env = "DRAINIT_READY_HTTP",
        value_name = "URL",
        group = "app_check"
    )]
    pub ready_http: Option<String>,

    /// Ready only while a TCP connection to HOST:PORT succeeds. `auto` (the default, with no
    /// other check): ready only while the app listens on TCP, on --app-port or else on the ports
    /// its processes listen on. `none`: ready as soon as the app started (a worker that serves no
    /// TCP) [default: auto].
    #[arg(
        long,
        env = "DRAINIT_READY_TCP",
        value_name = "auto|none|HOST:PORT",
        group = "app_check"
    )]
    pub ready_tcp: Option<String>,

    /// Ready only while this command exits 0 (split into words like a shell would, never run by
    /// one), e.g. '/app/check --ready'.
    #[arg(
        long,
        env = "DRAINIT_READY_EXEC",
        value_name = "CMD",
        group = "app_check"
    )]
    pub ready_exec: Option<String>,

    /// How often the app check runs; /ready answers from the last result, never waits for one
    /// [default: 1s].
    #[arg(long, env = "DRAINIT_READY_INTERVAL", value_name = "DURATION", value_parser = parse_duration)]
    pub ready_interval: Option<Duration>,

    /// How long one app check may take before it counts as failed [default: 1s].
    #[arg(long, env = "DRAINIT_READY_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub ready_timeout: Option<Duration>,

    /// Ready only after the app check has passed without a break for this long.
    #[arg(long, env = "DRAINIT_MIN_READY", value_name = "DURATION",
          default_value = "0s", value_parser = parse_duration)]
    pub min_ready: Duration,

    /// Start-up gate: tell the kubelet (kube-probe/) "not ready" until every load balancer
    /// checking /ready has seen it 200 this many times in a row; load balancers are told the
    /// truth at once.
    #[arg(long, env = "DRAINIT_READY_AFTER_LB_PROBES", value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub ready_after_lb_probes: Option<u32>,

    /// With --ready-after-lb-probes: after this long ready, open the gate anyway (with a warning)
    /// [default: 90s].
    #[arg(long, env = "DRAINIT_READY_LB_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub ready_lb_timeout: Option<Duration>,

    /// The app and its arguments, after `--`.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<OsString>,

    /// The options that came from `DRAINIT_*` variables rather than the command line, by id
    /// (`drain_min`): a variable with no effect here is a warning (a ConfigMap shared by several
    /// pods), a flag with no effect an error.
    #[arg(skip)]
    pub from_env: Vec<String>,
}

impl RunArgs {
    /// Whether `flag` (`--drain-min`) was set by its `DRAINIT_*` variable.
    pub fn is_from_env(&self, flag: &str) -> bool {
        self.from_env.contains(&option_id(flag))
    }
}

/// The variable that sets `flag`: `--drain-min` is `DRAINIT_DRAIN_MIN`.
pub fn env_variable(flag: &str) -> String {
    format!("DRAINIT_{}", option_id(flag).to_uppercase())
}

/// clap's id of `flag`: `--drain-min` is `drain_min`.
fn option_id(flag: &str) -> String {
    flag.trim_start_matches('-').replace('-', "_")
}

/// Options that both `drainit` and `drainit prestop` take.
#[derive(Debug, Args)]
pub struct SharedArgs {
    /// Control channel between `drainit prestop` and the running drainit: `@name` is an abstract
    /// Unix socket (needs no writable filesystem), anything else a socket file path.
    #[arg(long, global = true, env = "DRAINIT_CONTROL", value_name = "ADDR",
          default_value = "@drainit", value_parser = parse_control_addr)]
    pub control: ControlAddr,

    /// Log format on stderr.
    #[arg(long, global = true, env = "DRAINIT_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, RUST_LOG style: `info`, `debug`, `drainit=debug,hyper=info`.
    #[arg(
        long,
        global = true,
        env = "DRAINIT_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    pub log_level: String,
}

#[derive(Debug, Args)]
pub struct PrestopArgs {
    /// Give up after this long (exit 124); by default wait as long as the drain lasts (the kubelet
    /// bounds the hook by the grace period anyway).
    #[arg(long, env = "DRAINIT_PRESTOP_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Parses the command line, or returns the one-line error (or the help text) to print and its
/// exit code.
pub fn parse<I, T>(args: I) -> Result<Cli, StartupError>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    use clap::parser::ValueSource;
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command()
        .try_get_matches_from(args)
        .map_err(one_line_error)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(one_line_error)?;
    let from_env = |matches: &clap::ArgMatches| {
        matches
            .ids()
            .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::EnvVariable))
            .map(|id| id.as_str().to_owned())
            .collect()
    };
    cli.run.from_env = from_env(&matches);
    if let (Some(Command::Sidecar(sidecar)), Some(("sidecar", matches))) =
        (&mut cli.subcommand, matches.subcommand())
    {
        sidecar.run.from_env = from_env(matches);
    }
    Ok(cli)
}

/// clap's errors span several lines with usage and tips; a container log wants one line that says
/// what is wrong and how to fix it. Help and version requests keep their full text and exit 0.
fn one_line_error(error: clap::Error) -> StartupError {
    use clap::error::ErrorKind;
    let rendered = error.render().to_string();
    if matches!(
        error.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion
    ) {
        return StartupError {
            code: 0,
            message: rendered.trim_end().to_owned(),
        };
    }
    let mut lines = rendered.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or("bad command line");
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let fix = match error.kind() {
        ErrorKind::UnknownArgument => unknown_argument_fix(&error),
        _ => lines
            .find_map(|l| l.strip_prefix("tip: "))
            .map_or_else(|| "see drainit --help".to_owned(), str::to_owned),
    };
    StartupError {
        code: exit::USAGE,
        message: format!("{first} ({fix})"),
    }
}

fn unknown_argument_fix(error: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue};
    let arg = match error.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.as_str(),
        _ => "",
    };
    if arg.starts_with('-') && arg[1..].starts_with(|c: char| c.is_ascii_digit()) {
        "durations, ports and counts cannot be negative".to_owned()
    } else if !arg.is_empty() && !arg.starts_with('-') {
        format!("put the app after --, e.g. drainit [OPTIONS] -- {arg} ...")
    } else {
        "see drainit --help; the app's own flags go after --".to_owned()
    }
}

/// `500ms`, `15s`, `2m`, `1m30s`; a bare number means seconds (`15`, `1.5`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let bare_seconds = !text.is_empty() && text.chars().all(|c| c.is_ascii_digit() || c == '.');
    let parsed = if bare_seconds {
        text.parse::<f64>()
            .ok()
            .and_then(|secs| Duration::try_from_secs_f64(secs).ok())
            .ok_or(())
    } else {
        humantime::parse_duration(text).map_err(drop)
    };
    let duration = parsed.map_err(|()| {
        format!("expected a duration like 500ms, 15s, 2m or a number of seconds, got '{text}'")
    })?;
    if let Some(unit) = repeated_unit(text) {
        // humantime adds them up: `1h1h` would be 2 h, more likely a typo than a wish.
        return Err(format!(
            "'{text}' gives the unit '{unit}' twice: give each unit once, e.g. 1m30s"
        ));
    }
    if duration > MAX_DURATION {
        return Err(format!(
            "'{text}' is longer than drainit's limit of 10 years: give a shorter duration"
        ));
    }
    Ok(duration)
}

/// The first unit of a humantime duration that repeats an earlier one, spelled the same or not
/// (`1m1min`): units are the same when one of each is the same duration.
fn repeated_unit(text: &str) -> Option<&str> {
    let units: Vec<&str> = text
        .split(|c: char| !c.is_alphabetic())
        .filter(|unit| !unit.is_empty())
        .collect();
    let one = |unit: &str| humantime::parse_duration(&format!("1{unit}")).ok();
    units.iter().enumerate().find_map(|(i, unit)| {
        let this = one(unit)?;
        units[..i]
            .iter()
            .any(|earlier| one(earlier) == Some(this))
            .then_some(*unit)
    })
}

/// A duration as a user would type it back on the command line: `28s`, `28500ms`.
pub fn format_duration(duration: Duration) -> String {
    if duration.subsec_millis() == 0 {
        format!("{}s", duration.as_secs())
    } else {
        format!("{}ms", duration.as_millis())
    }
}

/// Far beyond any grace period (Kubernetes' own limit is far lower in practice), and small enough
/// that deadlines computed from it can never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// `IP:PORT`, or `:PORT` / `PORT` for all interfaces: `[::]`, which takes IPv4 as well (and falls
/// back to `0.0.0.0` where the pod has no IPv6).
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let port_only = text.strip_prefix(':').unwrap_or(text);
    if let Ok(port) = port_only.parse::<u16>() {
        return Ok(SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)));
    }
    text.parse().map_err(|_| {
        format!(
            "expected IP:PORT, :PORT or PORT (e.g. 0.0.0.0:8099, [::]:8099, :8099), got '{text}'"
        )
    })
}

fn parse_quiet_period(text: &str) -> Result<QuietPeriod, String> {
    match text.trim() {
        "auto" => Ok(QuietPeriod::Auto),
        other => parse_duration(other)
            .map(QuietPeriod::Fixed)
            .map_err(|e| format!("{e}, or auto")),
    }
}

fn parse_control_addr(text: &str) -> Result<ControlAddr, String> {
    text.parse()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_accept_units_and_bare_seconds() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("1h 1m 1s"), Ok(Duration::from_secs(3661)));
        assert_eq!(parse_duration("1M1m"), Ok(Duration::from_secs(2_630_076)));
    }

    #[test]
    fn durations_print_as_they_are_typed() {
        for text in ["0s", "28s", "28500ms", "120s", "300ms"] {
            let duration = parse_duration(text).unwrap();
            assert_eq!(format_duration(duration), text);
        }
    }

    #[test]
    fn durations_reject_garbage() {
        for bad in [
            "",
            "abc",
            "15x",
            "-1",
            "1..5",
            "s",
            "11years",
            "1e30",
            "300000000000y",
            "1h1h",
            "1m30s1m",
            "1m 1min",
            "2s500ms3s",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen_addr("8099").unwrap().to_string(), "[::]:8099");
        assert_eq!(parse_listen_addr(":8099").unwrap().to_string(), "[::]:8099");
        assert_eq!(parse_listen_addr("[::]:9").unwrap().to_string(), "[::]:9");
        assert_eq!(
            parse_listen_addr("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        for bad in ["", "host", "1.2.3.4", "1.2.3.4:99999", ":x"] {
            assert!(parse_listen_addr(bad).is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn command_after_double_dash() {
        let cli = parse(["drainit", "--drain-delay", "1s", "--", "app", "--flag"]).unwrap();
        assert!(cli.subcommand.is_none());
        assert_eq!(cli.run.command, ["app", "--flag"]);
        assert_eq!(cli.run.drain_delay, Some(Duration::from_secs(1)));
    }

    #[test]
    fn prestop_subcommand_takes_shared_flags() {
        let cli = parse(["drainit", "prestop", "--control", "@x", "--timeout", "3s"]).unwrap();
        let Some(Command::Prestop(args)) = cli.subcommand else {
            panic!("expected prestop");
        };
        assert_eq!(args.timeout, Some(Duration::from_secs(3)));
        assert_eq!(cli.shared.control, "@x".parse().unwrap());
    }

    #[test]
    fn sidecar_subcommand_takes_the_run_options() {
        let cli = parse([
            "drainit",
            "sidecar",
            "--drain-delay",
            "3s",
            "--app-port",
            "8080",
        ])
        .unwrap();
        let Some(Command::Sidecar(args)) = cli.subcommand else {
            panic!("expected sidecar");
        };
        assert_eq!(args.run.drain_delay, Some(Duration::from_secs(3)));
        assert_eq!(args.run.app_ports, [8080]);
        assert!(args.run.command.is_empty());
    }

    #[test]
    fn errors_fit_on_one_line_and_exit_2() {
        for argv in [
            &["drainit", "--bogus", "--", "app"][..],
            &["drainit", "--drain-delay", "soon", "--", "app"],
            &["drainit", "--stop-signal", "SIGNOPE", "--", "app"],
            &["drainit", "--health-listen", "nowhere", "--", "app"],
        ] {
            let err = parse(argv.iter().copied()).unwrap_err();
            assert_eq!(err.code, exit::USAGE, "{argv:?}");
            assert!(!err.message.contains('\n'), "{argv:?}: {}", err.message);
        }
    }
}
