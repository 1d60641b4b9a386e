//! The pod's lifecycle as one pure state machine, published through a `watch` channel.
//!
//! [`step`] holds every transition: the supervisor feeds it events (a signal, the drain's end, a
//! deadline, the app's exit, the app check's and the start-up gate's verdicts) and executes the
//! [`Action`]s it returns. Each phase carries its own facts (when the drain began, when the budget
//! kills, whether the gate still holds), so nothing about the lifecycle lives anywhere else. The
//! supervisor is the only writer; the probe server, the control channel, the gate and the drain
//! read the current state from the channel and never keep a copy.

use std::fmt;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::signals;

/// After a `drainit prestop` drain the kubelet sends SIGTERM as soon as the hook returns. If none
/// arrives by this long after the drain (the hook was run by hand), drainit stops the app itself.
pub const PRESTOP_HANDOFF: Duration = Duration::from_secs(5);

/// What started the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainTrigger {
    /// SIGTERM from the kubelet, the runtime or an operator.
    Sigterm,
    /// `drainit prestop`, the preStop hook; the kubelet's SIGTERM follows once it returns.
    Prestop,
}

/// What drainit runs beside: its own child (`drainit -- app`), or nothing (`drainit sidecar`: the
/// app is another container of the pod, which the kubelet stops; drainit only drains).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Wrapper,
    Sidecar,
}

/// The start-up gate (`--ready-after-lb-probes`): whether it still holds the kubelet back from a
/// ready app. It opens once, for good: the kubelet's view must not flap with the load balancers'.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Holding,
    Open,
}

/// What every phase from the drain on keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shutdown {
    /// The origin of the drain timeline and of the shutdown budget.
    pub drain_started: Instant,
    /// When the app's group gets SIGKILL; `None` once it has.
    pub kill_at: Option<Instant>,
    /// The start-up gate as the drain found it (for `/status`).
    pub gate: Gate,
    /// A sidecar has no app to stop or kill: its drain's end is its own.
    pub mode: Mode,
}

/// The lifecycle: what the channel publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The app is being started and is not ready yet.
    Starting { gate: Gate },
    /// The app runs and may receive traffic, `since` it last became ready.
    Ready { since: Instant, gate: Gate },
    /// The app's readiness check fails (it passed before): no traffic until it passes again.
    Unready { gate: Gate },
    /// Not ready any more; the app keeps serving while load balancers stop sending to it.
    /// `stop_when_over`: SIGTERM came during a prestop drain, so the app is stopped at its end.
    Draining {
        trigger: DrainTrigger,
        shutdown: Shutdown,
        stop_when_over: bool,
    },
    /// A prestop drain is over; the app runs until the kubelet's SIGTERM, or `handoff_by` (a
    /// sidecar has none: the kubelet stops the app, and drainit after it).
    Drained {
        shutdown: Shutdown,
        handoff_by: Option<Instant>,
    },
    /// The app has been told to stop (its stop signal, or an operator's SIGINT or SIGQUIT) `since`.
    Stopping { shutdown: Shutdown, since: Instant },
    /// The app is gone (or, for a sidecar, its drain is over and SIGTERM came); drainit exits
    /// with `code`.
    Exited {
        code: u8,
        drain_started: Option<Instant>,
    },
}

/// The phases without their data: metric labels, log fields, probe answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    Starting,
    Ready,
    Unready,
    Draining,
    Drained,
    Stopping,
    Exited,
}

/// What the supervisor saw, with the facts `step` needs to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The app's readiness check passed (for `--min-ready`), or there is none.
    AppReady,
    /// The app's readiness check failed.
    AppUnready,
    /// SIGTERM.
    Sigterm(DrainFacts),
    /// `drainit prestop` asked for the drain.
    DrainRequest(DrainFacts),
    /// SIGINT or SIGQUIT: an operator's "now".
    Interrupt {
        signal: i32,
        mode: Mode,
    },
    /// The drain under way is over (the supervisor holds its end and evidence).
    DrainOver,
    /// The prestop handoff deadline passed.
    HandoffDue,
    /// The kill deadline passed and the app had not exited.
    BudgetSpent,
    AppExited {
        code: u8,
        signal: Option<Signal>,
    },
    /// The start-up gate's verdict.
    Gate(GateVerdict),
}

/// What a drain request needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainFacts {
    /// The app ever had a request: a pod never ready with no traffic has nothing to drain.
    pub had_traffic: bool,
    /// The shutdown budget: from the start of the drain to the kill.
    pub kill_after: Duration,
    pub mode: Mode,
}

/// Why the start-up gate opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateVerdict {
    /// Every load balancer saw the pod ready `probes` times in a row.
    Opened { probes: u32 },
    /// `--ready-lb-timeout` passed first, with these load balancers still holding the gate.
    TimedOut {
        timeout: Duration,
        waiting_for: Vec<String>,
    },
}

/// What the supervisor does for a transition, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start the drain; with `never_ready`, there is nothing to wait for.
    StartDrain {
        trigger: DrainTrigger,
        never_ready: bool,
    },
    /// Report how the drain that just ended ended.
    ReportDrainEnd,
    /// Stop the drain under way and report it cut short.
    InterruptDrain,
    /// Forward this signal to the app as is.
    Forward(i32),
    /// Send the app its stop signal.
    SendStopSignal,
    /// Continue the app, in case it is stopped, so that it acts on what it was sent.
    Resume,
    /// SIGKILL to the app's process group.
    KillGroup,
    /// The app is gone: report it, and kill what it left behind.
    AppGone {
        code: u8,
        signal: Option<Signal>,
        /// Killed by a signal before drainit stopped it: a crash, the OOM killer, an operator.
        unexpected: bool,
        /// From its stop signal to its exit.
        stop_took: Option<Duration>,
    },
    /// Log a line that needs nothing but the state.
    Log(Note),
}

/// Log lines about a transition, rendered by [`Note::log`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Note {
    SigtermDuringPrestop,
    SigtermAfterPrestop,
    SigtermIgnoredDraining,
    SigtermIgnoredStopping,
    DrainInterrupted { signal: i32 },
    WaitingForSigterm,
    SidecarSigtermDuringPrestop,
    SidecarWaitingForSigterm,
    SidecarDone,
    SidecarInterrupted { signal: i32 },
    HandoffTimedOut,
    Gate(GateVerdict),
}

/// The transition table: the next state and what to do, for `event` at `now`. An event that does
/// not apply (a second drain request, a stale deadline, anything after the exit) leaves the state
/// as it is and does nothing.
pub fn step(state: State, event: Event, now: Instant) -> (State, Vec<Action>) {
    use State::*;
    let ignored = (state, Vec::new());
    match (state, event) {
        (Exited { .. }, _) => ignored,
        (_, Event::AppExited { code, signal }) => app_exited(state, code, signal, now),
        (Starting { gate } | Unready { gate }, Event::AppReady) => {
            (Ready { since: now, gate }, Vec::new())
        }
        (Ready { gate, .. }, Event::AppUnready) => (Unready { gate }, Vec::new()),
        (
            Ready {
                since,
                gate: Gate::Holding,
            },
            Event::Gate(verdict),
        ) => (
            Ready {
                since,
                gate: Gate::Open,
            },
            vec![Action::Log(Note::Gate(verdict))],
        ),
        (Starting { .. } | Ready { .. } | Unready { .. }, Event::Sigterm(facts)) => {
            start_drain(state, DrainTrigger::Sigterm, facts, now)
        }
        (Starting { .. } | Ready { .. } | Unready { .. }, Event::DrainRequest(facts)) => {
            start_drain(state, DrainTrigger::Prestop, facts, now)
        }
        (Draining { .. } | Drained { .. } | Stopping { .. }, Event::Sigterm(_)) => {
            sigterm_again(state, now)
        }
        (_, Event::Interrupt { signal, mode }) => interrupt(state, signal, mode, now),
        (
            Draining {
                trigger,
                shutdown,
                stop_when_over,
            },
            Event::DrainOver,
        ) => drain_over(
            trigger == DrainTrigger::Sigterm || stop_when_over,
            shutdown,
            now,
        ),
        (
            Drained {
                shutdown,
                handoff_by,
            },
            Event::HandoffDue,
        ) if handoff_by.is_some_and(|by| now >= by) => {
            stop(shutdown, now, [Action::Log(Note::HandoffTimedOut)])
        }
        (mut state, Event::BudgetSpent) if state.kill_at().is_some_and(|at| now >= at) => {
            if let Some(shutdown) = state.shutdown_mut() {
                shutdown.kill_at = None;
            }
            (state, vec![Action::KillGroup])
        }
        _ => ignored,
    }
}

/// A drain request before any drain: not ready at once, the budget starts.
fn start_drain(
    state: State,
    trigger: DrainTrigger,
    facts: DrainFacts,
    now: Instant,
) -> (State, Vec<Action>) {
    // /ready never answered 200 and the app never had a request: nothing routes traffic here, so
    // there is nothing to drain. (A load balancer that checks the app's own port instead of
    // /ready may route to it all the same: its requests are what rules that out.)
    let never_ready = matches!(state, State::Starting { .. }) && !facts.had_traffic;
    let draining = State::Draining {
        trigger,
        shutdown: Shutdown {
            drain_started: now,
            // Cannot overflow: durations are capped when parsed (`cli::MAX_DURATION`). A sidecar
            // kills nothing: the kubelet owns the app's container.
            kill_at: (facts.mode == Mode::Wrapper).then(|| now + facts.kill_after),
            gate: state.gate(),
            mode: facts.mode,
        },
        stop_when_over: false,
    };
    let start = Action::StartDrain {
        trigger,
        never_ready,
    };
    (draining, vec![start])
}

/// The drain's end is reported; the app is stopped, or after a prestop drain with no SIGTERM yet,
/// waits for the kubelet's (`stop_now` says which). A sidecar has no app to stop: with SIGTERM
/// in, it is done (exit 0); without, it keeps answering until the kubelet's SIGTERM, which comes
/// once the app has exited, however long that takes (no handoff deadline).
fn drain_over(stop_now: bool, shutdown: Shutdown, now: Instant) -> (State, Vec<Action>) {
    match (shutdown.mode, stop_now) {
        (Mode::Wrapper, true) => stop(shutdown, now, [Action::ReportDrainEnd]),
        (Mode::Sidecar, true) => sidecar_done(shutdown, [Action::ReportDrainEnd]),
        (mode, false) => {
            let (handoff_by, note) = match mode {
                Mode::Wrapper => (Some(now + PRESTOP_HANDOFF), Note::WaitingForSigterm),
                Mode::Sidecar => (None, Note::SidecarWaitingForSigterm),
            };
            let drained = State::Drained {
                shutdown,
                handoff_by,
            };
            (drained, vec![Action::ReportDrainEnd, Action::Log(note)])
        }
    }
}

/// A sidecar's drain is over and SIGTERM has come: drainit exits 0.
fn sidecar_done<const N: usize>(shutdown: Shutdown, before: [Action; N]) -> (State, Vec<Action>) {
    let mut actions = Vec::from(before);
    actions.push(Action::Log(Note::SidecarDone));
    let exited = State::Exited {
        code: 0,
        drain_started: Some(shutdown.drain_started),
    };
    (exited, actions)
}

/// SIGTERM once the drain has started: after a prestop drain it is the kubelet's go-ahead.
fn sigterm_again(state: State, now: Instant) -> (State, Vec<Action>) {
    let note = |note| vec![Action::Log(note)];
    match state {
        State::Draining {
            trigger: DrainTrigger::Prestop,
            shutdown,
            ..
        } => (
            State::Draining {
                trigger: DrainTrigger::Prestop,
                shutdown,
                stop_when_over: true,
            },
            note(match shutdown.mode {
                Mode::Wrapper => Note::SigtermDuringPrestop,
                Mode::Sidecar => Note::SidecarSigtermDuringPrestop,
            }),
        ),
        State::Draining { .. } => (state, note(Note::SigtermIgnoredDraining)),
        State::Drained { shutdown, .. } => match shutdown.mode {
            Mode::Wrapper => stop(shutdown, now, [Action::Log(Note::SigtermAfterPrestop)]),
            Mode::Sidecar => sidecar_done(shutdown, []),
        },
        _ => (state, note(Note::SigtermIgnoredStopping)),
    }
}

/// SIGINT and SIGQUIT end a drain early and reach the app as is; the drain's evidence is reported
/// once (a drain already over has reported it). A sidecar has no app to reach: it exits at once,
/// with 128 + the signal, as a process stopped by it would.
fn interrupt(state: State, signal: i32, mode: Mode, now: Instant) -> (State, Vec<Action>) {
    if mode == Mode::Sidecar {
        let mut actions = vec![Action::Log(Note::SidecarInterrupted { signal })];
        if state.kind() == PhaseKind::Draining {
            actions.push(Action::InterruptDrain);
        }
        let exited = State::Exited {
            code: 128u8.saturating_add(u8::try_from(signal).unwrap_or(0)),
            drain_started: state.drain_started(),
        };
        return (exited, actions);
    }
    let (shutdown, cut_short) = match state {
        State::Draining { shutdown, .. } => (shutdown, vec![Action::InterruptDrain]),
        State::Drained { shutdown, .. } => (shutdown, Vec::new()),
        _ => return (state, vec![Action::Forward(signal)]),
    };
    let mut actions = vec![Action::Log(Note::DrainInterrupted { signal })];
    actions.extend(cut_short);
    actions.extend([Action::Forward(signal), Action::Resume]);
    (
        State::Stopping {
            shutdown,
            since: now,
        },
        actions,
    )
}

/// The app gets its stop signal after `before`.
fn stop<const N: usize>(
    shutdown: Shutdown,
    now: Instant,
    before: [Action; N],
) -> (State, Vec<Action>) {
    let mut actions = Vec::from(before);
    actions.push(Action::SendStopSignal);
    (
        State::Stopping {
            shutdown,
            since: now,
        },
        actions,
    )
}

fn app_exited(
    state: State,
    code: u8,
    signal: Option<Signal>,
    now: Instant,
) -> (State, Vec<Action>) {
    let stop_sent = match state {
        State::Stopping { since, .. } => Some(since),
        _ => None,
    };
    let gone = Action::AppGone {
        code,
        signal,
        unexpected: signal.is_some() && stop_sent.is_none(),
        stop_took: stop_sent.map(|since| now.saturating_duration_since(since)),
    };
    let exited = State::Exited {
        code,
        drain_started: state.drain_started(),
    };
    (exited, vec![gone])
}

impl State {
    /// Where every pod starts; `gate` holds when `--ready-after-lb-probes` is given.
    pub fn new(gate: Gate) -> Self {
        State::Starting { gate }
    }

    pub fn kind(&self) -> PhaseKind {
        match self {
            State::Starting { .. } => PhaseKind::Starting,
            State::Ready { .. } => PhaseKind::Ready,
            State::Unready { .. } => PhaseKind::Unready,
            State::Draining { .. } => PhaseKind::Draining,
            State::Drained { .. } => PhaseKind::Drained,
            State::Stopping { .. } => PhaseKind::Stopping,
            State::Exited { .. } => PhaseKind::Exited,
        }
    }

    fn shutdown(&self) -> Option<Shutdown> {
        let mut state = *self;
        state.shutdown_mut().copied()
    }

    /// When the drain began, whatever happened since.
    pub fn drain_started(&self) -> Option<Instant> {
        match *self {
            State::Exited { drain_started, .. } => drain_started,
            _ => self.shutdown().map(|s| s.drain_started),
        }
    }

    /// When the app last became ready, while it is (the start-up gate's timeout counts from it).
    pub fn ready_since(&self) -> Option<Instant> {
        match *self {
            State::Ready { since, .. } => Some(since),
            _ => None,
        }
    }

    /// When the app's group gets SIGKILL, if a drain started and the kill is still to come.
    pub fn kill_at(&self) -> Option<Instant> {
        self.shutdown().and_then(|s| s.kill_at)
    }

    /// When drainit stops the app itself if the kubelet's SIGTERM has not come after a prestop
    /// drain.
    pub fn handoff_by(&self) -> Option<Instant> {
        match *self {
            State::Drained { handoff_by, .. } => handoff_by,
            _ => None,
        }
    }

    fn gate(&self) -> Gate {
        match *self {
            State::Starting { gate } | State::Ready { gate, .. } | State::Unready { gate } => gate,
            State::Exited { .. } => Gate::Open,
            _ => self.shutdown().map_or(Gate::Open, |s| s.gate),
        }
    }

    /// The start-up gate holds the kubelet back from this ready app.
    pub fn gate_holds(&self) -> bool {
        matches!(
            self,
            State::Ready {
                gate: Gate::Holding,
                ..
            }
        )
    }

    /// The start-up gate has opened (or there is none).
    pub fn gate_is_open(&self) -> bool {
        self.gate() == Gate::Open
    }

    fn shutdown_mut(&mut self) -> Option<&mut Shutdown> {
        match self {
            State::Draining { shutdown, .. }
            | State::Drained { shutdown, .. }
            | State::Stopping { shutdown, .. } => Some(shutdown),
            _ => None,
        }
    }

    /// The phase as the app's traffic sees it: once a sidecar's drain is over, the app's own
    /// preStop hook (`GET /drain/wait`) returns and the kubelet stops it, so arrivals from then on
    /// are late as after a wrapper's stop signal.
    pub fn traffic_phase(&self) -> PhaseKind {
        match self {
            State::Drained { shutdown, .. } if shutdown.mode == Mode::Sidecar => {
                PhaseKind::Stopping
            }
            _ => self.kind(),
        }
    }

    /// `/alive`: the app process exists (draining and stopping included).
    pub fn is_alive(&self) -> bool {
        self.kind().is_alive()
    }

    /// `/ready`: the app runs and drainit is not draining.
    pub fn is_ready(&self) -> bool {
        self.kind().is_ready()
    }

    /// The drain has started, whatever happened since.
    pub fn drain_has_started(&self) -> bool {
        self.kind().drain_has_started()
    }

    /// Nothing is left to wait for before the app may be stopped.
    pub fn drain_is_over(&self) -> bool {
        self.kind().drain_is_over()
    }
}

impl PhaseKind {
    pub const ALL: [PhaseKind; 7] = [
        PhaseKind::Starting,
        PhaseKind::Ready,
        PhaseKind::Unready,
        PhaseKind::Draining,
        PhaseKind::Drained,
        PhaseKind::Stopping,
        PhaseKind::Exited,
    ];

    /// The phase's name in logs, `/status`, probe answers and metric labels.
    pub fn label(self) -> &'static str {
        match self {
            PhaseKind::Starting => "starting",
            PhaseKind::Ready => "ready",
            PhaseKind::Unready => "unready",
            PhaseKind::Draining => "draining",
            PhaseKind::Drained => "drained",
            PhaseKind::Stopping => "stopping",
            PhaseKind::Exited => "exited",
        }
    }

    pub fn is_alive(self) -> bool {
        self != PhaseKind::Exited
    }

    pub fn is_ready(self) -> bool {
        self == PhaseKind::Ready
    }

    pub fn drain_has_started(self) -> bool {
        !matches!(
            self,
            PhaseKind::Starting | PhaseKind::Ready | PhaseKind::Unready
        )
    }

    pub fn drain_is_over(self) -> bool {
        matches!(
            self,
            PhaseKind::Drained | PhaseKind::Stopping | PhaseKind::Exited
        )
    }
}

impl fmt::Display for DrainTrigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DrainTrigger::Sigterm => "SIGTERM",
            DrainTrigger::Prestop => "prestop",
        })
    }
}

impl fmt::Display for PhaseKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.kind().fmt(f)
    }
}

impl Note {
    /// The lines with nothing to say but where the drain is.
    fn plain(&self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Note::SigtermDuringPrestop => (
                "sigterm_during_prestop",
                "SIGTERM during the prestop drain: the app is stopped when the drain is over",
            ),
            Note::SigtermAfterPrestop => {
                ("sigterm_after_prestop", "SIGTERM after the prestop drain")
            }
            Note::SigtermIgnoredDraining => (
                "sigterm_ignored",
                "SIGTERM again: ignored (SIGINT or SIGQUIT stop the app now)",
            ),
            Note::SigtermIgnoredStopping => (
                "sigterm_ignored",
                "SIGTERM again: ignored, the app already has its stop signal",
            ),
            Note::WaitingForSigterm => (
                "waiting_for_sigterm",
                "waiting for the kubelet's SIGTERM to stop the app",
            ),
            Note::SidecarSigtermDuringPrestop => (
                "sigterm_during_prestop",
                "SIGTERM during the prestop drain: drainit exits when the drain is over",
            ),
            Note::SidecarWaitingForSigterm => (
                "waiting_for_sigterm",
                "drain over: /ready stays 503 until the kubelet's SIGTERM (after the app exits)",
            ),
            Note::SidecarDone => (
                "sidecar_done",
                "drain over and SIGTERM received: the sidecar exits",
            ),
            _ => return None,
        })
    }

    /// Logs the line, `elapsed_ms` into the drain.
    pub fn log(&self, elapsed_ms: Option<u64>) {
        if let Some((event, message)) = self.plain() {
            info!(event, elapsed_ms, "{message}");
            return;
        }
        match self {
            Note::DrainInterrupted { signal } => info!(
                event = "drain_interrupted",
                signal = signals::name(*signal),
                elapsed_ms,
                "drain cut short: forwarding to the app now"
            ),
            Note::SidecarInterrupted { signal } => info!(
                event = "sidecar_interrupted",
                signal = signals::name(*signal),
                elapsed_ms,
                "interrupted: the sidecar exits now (the app is the kubelet's to stop)"
            ),
            Note::HandoffTimedOut => warn!(
                event = "handoff_timed_out",
                elapsed_ms,
                "no SIGTERM within {PRESTOP_HANDOFF:?} of the prestop drain: stopping the app anyway"
            ),
            Note::Gate(GateVerdict::Opened { probes }) => info!(
                event = "gate_opened",
                probes,
                "start-up gate open: every load balancer has seen the pod ready; so will the kubelet"
            ),
            Note::Gate(GateVerdict::TimedOut {
                timeout,
                waiting_for,
            }) => warn!(event = "gate_timed_out",
                timeout_ms = timeout.as_millis() as u64,
                waiting_for = ?waiting_for,
                "start-up gate timed out: no load balancer confirmed the pod (--ready-lb-timeout); the kubelet sees it ready anyway"
            ),
            _ => {}
        }
    }
}

/// The writer's side: steps the state machine, logs each change of phase, publishes the state.
pub struct Lifecycle {
    state: watch::Sender<State>,
}

impl Lifecycle {
    pub fn new(gate: Gate) -> Self {
        Self {
            state: watch::Sender::new(State::new(gate)),
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// Time since the drain began, for the timeline in the logs.
    pub fn drain_elapsed_ms(&self) -> Option<u64> {
        self.state()
            .drain_started()
            .map(|start| start.elapsed().as_millis() as u64)
    }

    /// Applies `event` now, publishes the new state, and returns what the supervisor must do.
    #[must_use]
    pub fn apply(&mut self, event: Event) -> Vec<Action> {
        let from = self.state();
        let (to, actions) = step(from, event, Instant::now());
        if to == from {
            return actions;
        }
        self.state.send_replace(to);
        if to.kind() != from.kind() {
            info!(
                event = "phase_changed",
                from = from.kind().label(),
                to = to.kind().label(),
                elapsed_ms = self.drain_elapsed_ms(),
                "lifecycle transition"
            );
        }
        actions
    }
}

#[cfg(test)]
mod tests;
