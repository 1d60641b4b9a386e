//! drainit: a PID-1 wrapper that drains a Kubernetes pod before stopping its app.
//!
//! Start-up, in order: parse and check the command line ([`cli`], [`config`], [`budget`]), install
//! signal handlers ([`signals`]) so none is lost, bind the probe port ([`probes`]) and the control
//! socket ([`control`]) so a taken one fails before the app runs, spawn the app ([`app`]; none for
//! `drainit sidecar`, whose app is another container of the pod), then hand
//! everything to the [`supervisor`], which feeds the [`lifecycle`] state machine and carries out
//! what it decides: reaping ([`reaper`]), draining ([`drain`]), the shutdown budget and the
//! start-up [`gate`]. The probe port also serves the [`admin`] endpoints.

pub mod admin;
pub mod app;
pub mod budget;
pub mod checkers;
pub mod cidr;
pub mod cli;
pub mod config;
pub mod control;
pub mod drain;
pub mod exit;
pub mod gate;
pub mod lifecycle;
pub mod listening;
pub mod log_writer;
pub mod logging;
pub mod metrics;
pub mod prestop;
pub mod probes;
pub mod process_tree;
pub mod readiness;
pub mod reaper;
pub mod signals;
pub mod supervisor;
pub mod sync;
pub mod tasks;
pub mod tcp;
pub mod throttle;

use std::os::fd::AsFd;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use nix::unistd::Pid;
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc};
use tracing::{error, info};

use crate::app::App;
use crate::cli::{Cli, Command, SharedArgs};
use crate::config::RunConfig;
use crate::drain::{Observers, traffic};
use crate::exit::StartupError;
use crate::lifecycle::{Event, Gate, Lifecycle};
use crate::metrics::Metrics;
use crate::readiness::{RunningCheck, SharedCheckLog};
use crate::reaper::Reaper;
use crate::supervisor::{Inputs, Supervisor};

/// The whole program: `main.rs` only calls this.
pub fn main() -> ExitCode {
    let code = parse_and_run();
    // The last lines (why drainit exits) are worth a short wait for stderr, never a long one.
    log_writer::flush(LAST_LINES_WAIT);
    ExitCode::from(code)
}

/// How long drainit waits at exit for a stuck stderr to take its last log lines.
const LAST_LINES_WAIT: Duration = Duration::from_millis(500);

/// How long drainit waits at exit for `/drain/wait` clients to get their answer.
const WAITERS_ANSWER_WAIT: Duration = Duration::from_millis(500);

fn parse_and_run() -> u8 {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) if e.code == 0 => {
            println!("{e}");
            return 0;
        }
        Err(e) => {
            log_writer::print_line(&format!("drainit: {e}"));
            return e.code;
        }
    };
    if let Err(e) = logging::init(&cli.shared) {
        log_writer::print_line(&format!("drainit: {e}"));
        return e.code;
    }
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if tracing::enabled!(tracing::Level::ERROR) {
                error!(event = "startup_failed", exit_code = e.code, "{e}");
            } else {
                // Even with --log-level off, why nothing started must be said.
                log_writer::print_line(&format!("drainit: {e}"));
            }
            e.code
        }
    }
}

fn run(cli: Cli) -> Result<u8, StartupError> {
    let Cli {
        subcommand,
        run,
        shared,
    } = cli;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        // The epoll buffer (12-16 bytes an event) lives as long as drainit: tokio's 1,024 are 12 KiB
        // for a handful of sockets at rest. A burst of probe connections takes a few more turns.
        .max_io_events_per_tick(128)
        .build()
        .map_err(|e| StartupError::setup(format!("cannot start the async runtime: {e}")))?;
    let code = match subcommand {
        Some(Command::Prestop(args)) => {
            Ok(runtime.block_on(prestop::run(&shared.control, args.timeout)))
        }
        Some(Command::Sidecar(args)) => RunConfig::sidecar_from_args(args.run)
            .and_then(|config| runtime.block_on(supervise(config, shared))),
        None => {
            RunConfig::from_args(run).and_then(|config| runtime.block_on(supervise(config, shared)))
        }
    };
    // Dropping the runtime would wait, unbounded, for blocking work still in flight (a DNS
    // lookup of an app check, a socket dump): the app is gone, so drainit must not linger.
    runtime.shutdown_background();
    code
}

/// Sets everything up in the order that leaves nothing half-started on failure, then supervises
/// the app until it exits.
async fn supervise(config: RunConfig, shared: SharedArgs) -> Result<u8, StartupError> {
    let started = Instant::now();
    let signals = signals::install()
        .map_err(|e| StartupError::setup(format!("cannot install signal handlers: {e}")))?;
    // A signal mask inherited from whoever started drainit would hold back SIGTERM or SIGCHLD for
    // good. Cleared only now that handlers are in place, so a signal held pending until here is
    // handled, not met with its default action. (The runtime's blocking threads start later, from
    // this thread, and inherit the cleared mask.)
    let _ = nix::sys::signal::SigSet::empty().thread_set_mask();
    let probes = probes::bind(config.health_listen)?;
    let control = shared.control.bind()?;
    Reaper::adopt_orphans();
    let reaper = Reaper::default();
    let app = match &config.command {
        Some(command) => Some(
            App::spawn(command, config.forward_to_group)
                .inspect_err(|_| shared.control.remove_socket_file())?,
        ),
        None => {
            info!(
                event = "sidecar_started",
                "sidecar mode: no app to run; the drain starts with drainit prestop or SIGTERM"
            );
            None
        }
    };
    let app_pid = app.map(|app| app.pid);
    probes::announce(&probes);

    let metrics = Arc::new(Metrics::new());
    let gate = match config.startup_gate {
        Some(_) => Gate::Holding,
        None => Gate::Open,
    };
    let mut lifecycle = Lifecycle::new(gate);
    let phase = lifecycle.subscribe();
    metrics.read_phase_from(move || phase.borrow().kind());
    let observers = observe_traffic(&config, app_pid, &probes, &lifecycle, metrics.clone());
    let (verdicts, readiness) = mpsc::channel(8);
    let check_log = watch_readiness(
        &config,
        app_pid,
        &probes,
        &mut lifecycle,
        &reaper,
        &metrics,
        verdicts.clone(),
    );
    let checker_recorded = Arc::new(Notify::new());
    if let Some(gate) = config.startup_gate {
        tasks::spawn(gate::run(
            gate,
            observers.checkers.clone(),
            checker_recorded.clone(),
            lifecycle.subscribe(),
            verdicts,
        ));
    }
    let (drain_tx, drain_rx) = mpsc::channel(8);
    let waiters = Arc::new(probes::drain_wait::Waiters::default());
    let context = probes::Context {
        checker_recorded,
        metrics: metrics.clone(),
        lb_sources: config.lb_sources.clone(),
        waiters: waiters.clone(),
    };
    let admin = admin::Context {
        started,
        app_pid: app_pid.map(Pid::as_raw),
        readiness: config.readiness.clone(),
        check_log,
        startup_gate: config.startup_gate,
        metrics: metrics.clone(),
    };
    tasks::spawn(probes::serve(
        probes,
        lifecycle.subscribe(),
        observers.clone(),
        context,
        admin,
    ));
    tasks::spawn(control::serve(control, drain_tx, lifecycle.subscribe()));

    let supervisor = Supervisor::new(app, lifecycle, reaper, observers, &config, metrics);
    let inputs = Inputs {
        signals,
        drain_requests: drain_rx,
        readiness,
    };
    let code = supervisor.run(inputs).await;
    // The app's preStop hook waits on /drain/wait for the end drainit has just reached.
    waiters.answered(WAITERS_ANSWER_WAIT).await;
    shared.control.remove_socket_file();
    Ok(code)
}

/// Starts the app check, whose `verdicts` the supervisor applies; with `--ready-tcp none` there
/// is nothing to wait for and the app is ready at once, before the first probe can arrive.
fn watch_readiness(
    config: &RunConfig,
    app: Option<Pid>,
    probes: &TcpListener,
    lifecycle: &mut Lifecycle,
    reaper: &Reaper,
    metrics: &Arc<Metrics>,
    verdicts: mpsc::Sender<Event>,
) -> SharedCheckLog {
    let check_log = SharedCheckLog::default();
    let Some(check) = config.readiness.check.clone() else {
        let actions = lifecycle.apply(Event::AppReady);
        debug_assert!(actions.is_empty(), "becoming ready does nothing else");
        return check_log;
    };
    let probes = probes.local_addr().unwrap_or(config.health_listen);
    let running = RunningCheck::new(check, reaper.waiters(), app, probes);
    let metrics = metrics.clone();
    tasks::spawn(readiness::run(
        running,
        config.readiness.clone(),
        check_log.clone(),
        verdicts,
        lifecycle.subscribe(),
        move |check, outcome| metrics.app_check(check.kind(), outcome.verdict, outcome.duration),
    ));
    check_log
}

/// Starts observing what the drain is judged on, from start-up on: the arrival rate before the
/// drain is what sizes the quiet period, and late arrivals are worth knowing in every mode.
fn observe_traffic(
    config: &RunConfig,
    app: Option<Pid>,
    probes: &TcpListener,
    lifecycle: &Lifecycle,
    metrics: Arc<Metrics>,
) -> Observers {
    let observers = Observers::new(config.app_ports.clone(), &config.drain);
    tasks::spawn(
        config
            .drain
            .clone()
            .preview(observers.clone(), lifecycle.subscribe()),
    );
    let own_port = traffic::OwnPort {
        port: probes.local_addr().map_or(0, |a| a.port()),
        listener: probes.as_fd().try_clone_to_owned().ok().map(Arc::new),
        accepts: observers.own_accepts.clone(),
    };
    tasks::spawn(traffic::monitor(
        observers.traffic.clone(),
        app,
        config.app_ports.clone(),
        own_port,
        lifecycle.subscribe(),
        metrics.late_arrivals(),
    ));
    observers
}
