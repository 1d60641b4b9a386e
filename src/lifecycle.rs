//! The pod's lifecycle as one state machine, published through a `watch` channel.
//!
//! The supervisor is the only writer; the probe server, the control channel and the drain read the
//! current phase from the channel and never keep a copy, so `/ready` cannot disagree with what the
//! supervisor decided.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::watch;

use crate::metrics::Metrics;
use tracing::info;

/// What started the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainTrigger {
    /// SIGTERM from the kubelet, the runtime or an operator.
    Sigterm,
    /// `drainit prestop`, the preStop hook; the kubelet's SIGTERM follows once it returns.
    Prestop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The app is being started and is not ready yet.
    Starting,
    /// The app runs and may receive traffic.
    Ready,
    /// The app's readiness check fails (it passed before): no traffic until it passes again.
    Unready,
    /// Not ready any more; the app keeps serving while load balancers stop sending to it.
    Draining { trigger: DrainTrigger },
    /// A `prestop` drain is over; the app still runs until the kubelet's SIGTERM arrives.
    Drained,
    /// The app has been sent its stop signal.
    Stopping,
    /// The app is gone; drainit exits with `code`.
    Exited { code: u8 },
}

/// Things that move the lifecycle forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The app's readiness check passed (for `--min-ready`), or there is none.
    AppReady,
    /// The app's readiness check failed.
    AppUnready,
    DrainStarted(DrainTrigger),
    DrainOver,
    StopSignalSent,
    AppExited {
        code: u8,
    },
}

impl Phase {
    /// The transition table: the next phase, or `None` when the event does not apply now (a second
    /// SIGTERM during a drain, a drain request after the app exited, ...).
    pub fn next(self, event: Event) -> Option<Phase> {
        use Phase::*;
        match (self, event) {
            (Exited { .. }, _) => None,
            (_, Event::AppExited { code }) => Some(Exited { code }),
            (Starting | Unready, Event::AppReady) => Some(Ready),
            (Ready, Event::AppUnready) => Some(Unready),
            (Starting | Ready | Unready, Event::DrainStarted(trigger)) => {
                Some(Draining { trigger })
            }
            (Draining { .. }, Event::DrainOver) => Some(Drained),
            (Starting | Ready | Unready | Draining { .. } | Drained, Event::StopSignalSent) => {
                Some(Stopping)
            }
            _ => None,
        }
    }

    /// `/alive`: the app process exists (draining and stopping included).
    pub fn is_alive(&self) -> bool {
        !matches!(self, Phase::Exited { .. })
    }

    /// `/ready`: the app runs and drainit is not draining.
    pub fn is_ready(&self) -> bool {
        matches!(self, Phase::Ready)
    }

    /// The drain has started, whatever happened since.
    pub fn drain_has_started(&self) -> bool {
        !matches!(self, Phase::Starting | Phase::Ready | Phase::Unready)
    }

    /// Nothing is left to wait for before the app may be stopped.
    pub fn drain_is_over(&self) -> bool {
        matches!(
            self,
            Phase::Drained | Phase::Stopping | Phase::Exited { .. }
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Unready => "unready",
            Phase::Draining { .. } => "draining",
            Phase::Drained => "drained",
            Phase::Stopping => "stopping",
            Phase::Exited { .. } => "exited",
        }
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

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the lifecycle channel publishes: the phase, and when the drain began (the origin of the
/// drain timeline and of the shutdown budget).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub phase: Phase,
    pub drain_started: Option<Instant>,
    /// When the app last became ready (the start-up gate's timeout counts from it).
    pub ready_since: Option<Instant>,
}

/// The phase without its data: what readers of the lifecycle branch on.
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
}

impl State {
    pub fn kind(&self) -> PhaseKind {
        match self.phase {
            Phase::Starting => PhaseKind::Starting,
            Phase::Ready => PhaseKind::Ready,
            Phase::Unready => PhaseKind::Unready,
            Phase::Draining { .. } => PhaseKind::Draining,
            Phase::Drained => PhaseKind::Drained,
            Phase::Stopping => PhaseKind::Stopping,
            Phase::Exited { .. } => PhaseKind::Exited,
        }
    }

    pub fn is_alive(&self) -> bool {
        self.phase.is_alive()
    }

    pub fn drain_has_started(&self) -> bool {
        self.phase.drain_has_started()
    }

    pub fn drain_started(&self) -> Option<Instant> {
        self.drain_started
    }
}

/// The writer's side: applies events, logs each transition, publishes the state.
pub struct Lifecycle {
    state: watch::Sender<State>,
    metrics: Arc<Metrics>,
}

impl Lifecycle {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        metrics.set_phase(Phase::Starting.name());
        Self {
            state: watch::Sender::new(State {
                phase: Phase::Starting,
                drain_started: None,
                ready_since: None,
            }),
            metrics,
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<State> {
        self.state.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.state.borrow().phase
    }

    pub fn drain_started(&self) -> Option<Instant> {
        self.state.borrow().drain_started
    }

    /// Time since the drain began, for the timeline in the logs.
    pub fn drain_elapsed(&self) -> Option<Duration> {
        self.drain_started().map(|start| start.elapsed())
    }

    /// Applies `event`; returns whether the phase changed.
    pub fn apply(&mut self, event: Event) -> bool {
        let from = self.phase();
        let Some(to) = from.next(event) else {
            return false;
        };
        let before = *self.state.borrow();
        let now = Instant::now();
        self.metrics.set_phase(to.name());
        self.state.send_replace(State {
            phase: to,
            drain_started: match event {
                Event::DrainStarted(_) => Some(now),
                _ => before.drain_started,
            },
            ready_since: match to {
                Phase::Ready => Some(now),
                _ => before.ready_since,
            },
        });
        info!(
            event = "phase_changed",
            from = from.name(),
            to = to.name(),
            elapsed_ms = self.drain_elapsed().map(|e| e.as_millis() as u64),
            "lifecycle transition"
        );
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DrainTrigger::*;
    use Event::*;

    #[test]
    fn sigterm_rollout_path() {
        let mut phase = Phase::Starting;
        for (event, expected) in [
            (AppReady, Phase::Ready),
            (DrainStarted(Sigterm), Phase::Draining { trigger: Sigterm }),
            (StopSignalSent, Phase::Stopping),
            (AppExited { code: 0 }, Phase::Exited { code: 0 }),
        ] {
            phase = phase.next(event).unwrap();
            assert_eq!(phase, expected);
        }
    }

    #[test]
    fn prestop_drain_waits_in_drained() {
        let phase = Phase::Ready.next(DrainStarted(Prestop)).unwrap();
        let phase = phase.next(DrainOver).unwrap();
        assert_eq!(phase, Phase::Drained);
        assert!(phase.drain_is_over() && !phase.is_ready() && phase.is_alive());
        assert_eq!(phase.next(StopSignalSent), Some(Phase::Stopping));
    }

    #[test]
    fn a_second_drain_or_anything_after_exit_is_ignored() {
        let draining = Phase::Draining { trigger: Sigterm };
        assert_eq!(draining.next(DrainStarted(Prestop)), None);
        assert_eq!(Phase::Stopping.next(DrainStarted(Sigterm)), None);
        let exited = Phase::Exited { code: 3 };
        for event in [
            AppReady,
            DrainStarted(Sigterm),
            DrainOver,
            StopSignalSent,
            AppExited { code: 1 },
        ] {
            assert_eq!(exited.next(event), None);
        }
    }

    #[test]
    fn the_app_can_exit_in_any_phase() {
        for phase in [
            Phase::Starting,
            Phase::Ready,
            Phase::Draining { trigger: Prestop },
            Phase::Drained,
            Phase::Stopping,
        ] {
            assert_eq!(
                phase.next(AppExited { code: 9 }),
                Some(Phase::Exited { code: 9 })
            );
        }
    }

    #[test]
    fn a_failing_app_check_takes_the_app_out_and_back() {
        let unready = Phase::Ready.next(AppUnready).unwrap();
        assert_eq!(unready, Phase::Unready);
        assert!(!unready.is_ready() && unready.is_alive() && !unready.drain_has_started());
        assert_eq!(unready.next(AppReady), Some(Phase::Ready));
        assert_eq!(
            unready.next(DrainStarted(Sigterm)),
            Some(Phase::Draining { trigger: Sigterm })
        );
        assert_eq!(
            Phase::Starting.next(AppUnready),
            None,
            "not ready yet is not unready"
        );
        assert_eq!(
            Phase::Draining { trigger: Sigterm }.next(AppReady),
            None,
            "a drain is final"
        );
    }

    #[test]
    fn probes_follow_the_phase() {
        assert!(Phase::Ready.is_ready());
        for phase in [
            Phase::Starting,
            Phase::Draining { trigger: Sigterm },
            Phase::Drained,
            Phase::Stopping,
            Phase::Exited { code: 0 },
        ] {
            assert!(!phase.is_ready(), "{phase}");
        }
        assert!(Phase::Stopping.is_alive());
        assert!(!Phase::Exited { code: 0 }.is_alive());
    }

    #[test]
    fn the_writer_records_the_drain_start_once() {
        let mut lifecycle = Lifecycle::new(Arc::new(Metrics::new()));
        let reader = lifecycle.subscribe();
        assert!(lifecycle.apply(AppReady));
        assert!(lifecycle.drain_started().is_none());
        assert!(lifecycle.apply(DrainStarted(Sigterm)));
        let started = lifecycle.drain_started().unwrap();
        assert!(!lifecycle.apply(DrainStarted(Prestop)));
        assert_eq!(lifecycle.drain_started(), Some(started));
        assert_eq!(reader.borrow().phase, Phase::Draining { trigger: Sigterm });
        assert_eq!(reader.borrow().drain_started, Some(started));
    }
}
