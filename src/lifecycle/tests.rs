//! `step`, phase by event: every sample state meets every sample event in the table below, once.

use super::*;

use nix::libc::{SIGINT, SIGQUIT};

const KILL_AFTER: Duration = Duration::from_secs(29);

/// A fixed origin: every instant of a case is this plus whole seconds.
struct Clock(Instant);

impl Clock {
    fn new() -> Self {
        Clock(Instant::now())
    }

    fn at(&self, secs: u64) -> Instant {
        self.0 + Duration::from_secs(secs)
    }

    /// When each event of the table happens: every deadline of the samples is due.
    fn now(&self) -> Instant {
        self.at(100)
    }

    fn shutdown(&self) -> Shutdown {
        Shutdown {
            drain_started: self.at(10),
            kill_at: Some(self.now()),
            gate: Gate::Open,
            mode: Mode::Wrapper,
        }
    }

    fn ready(&self) -> State {
        State::Ready {
            since: self.at(0),
            gate: Gate::Open,
        }
    }

    /// Ready since 0 s, then a drain `request` (`Event::Sigterm` or `Event::DrainRequest`) at 1 s.
    fn drain(&self, request: fn(DrainFacts) -> Event) -> State {
        step(self.ready(), request(facts(true)), self.at(1)).0
    }

    fn draining(&self, trigger: DrainTrigger, stop_when_over: bool) -> State {
        State::Draining {
            trigger,
            shutdown: self.shutdown(),
            stop_when_over,
        }
    }

    /// What a drain started now looks like.
    fn drain_started_now(&self, trigger: DrainTrigger, gate: Gate) -> State {
        State::Draining {
            trigger,
            shutdown: Shutdown {
                drain_started: self.now(),
                kill_at: Some(self.now() + KILL_AFTER),
                gate,
                mode: Mode::Wrapper,
            },
            stop_when_over: false,
        }
    }

    fn stopping_now(&self) -> State {
        State::Stopping {
            shutdown: self.shutdown(),
            since: self.now(),
        }
    }

    fn killed(&self, state: State) -> State {
        let mut state = state;
        state.shutdown_mut().unwrap().kill_at = None;
        state
    }
}

/// One of each phase, and the variants that decide differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sample {
    Starting,
    Ready,
    ReadyGated,
    Unready,
    DrainingSigterm,
    DrainingPrestop,
    DrainingPrestopSigterm,
    Drained,
    Stopping,
    Exited,
}

const SAMPLES: [Sample; 10] = [
    Sample::Starting,
    Sample::Ready,
    Sample::ReadyGated,
    Sample::Unready,
    Sample::DrainingSigterm,
    Sample::DrainingPrestop,
    Sample::DrainingPrestopSigterm,
    Sample::Drained,
    Sample::Stopping,
    Sample::Exited,
];

impl Sample {
    fn state(self, clock: &Clock) -> State {
        match self {
            Sample::Starting => State::Starting { gate: Gate::Open },
            Sample::Ready => State::Ready {
                since: clock.at(1),
                gate: Gate::Open,
            },
            Sample::ReadyGated => State::Ready {
                since: clock.at(1),
                gate: Gate::Holding,
            },
            Sample::Unready => State::Unready { gate: Gate::Open },
            Sample::DrainingSigterm => clock.draining(DrainTrigger::Sigterm, false),
            Sample::DrainingPrestop => clock.draining(DrainTrigger::Prestop, false),
            Sample::DrainingPrestopSigterm => clock.draining(DrainTrigger::Prestop, true),
            Sample::Drained => State::Drained {
                shutdown: clock.shutdown(),
                handoff_by: Some(clock.now()),
            },
            Sample::Stopping => State::Stopping {
                shutdown: clock.shutdown(),
                since: clock.at(50),
            },
            Sample::Exited => State::Exited {
                code: 3,
                drain_started: Some(clock.at(10)),
            },
        }
    }
}

/// `event` at `at` changes nothing and does nothing.
#[track_caller]
fn assert_ignored(state: State, event: Event, at: Instant) {
    let outcome = step(state, event.clone(), at);
    assert_eq!(outcome, (state, vec![]), "{state:?} + {event:?}");
}

fn facts(had_traffic: bool) -> DrainFacts {
    DrainFacts {
        had_traffic,
        kill_after: KILL_AFTER,
        mode: Mode::Wrapper,
    }
}

fn opened() -> GateVerdict {
    GateVerdict::Opened { probes: 3 }
}

/// One of each event.
fn events() -> Vec<Event> {
    vec![
        Event::AppReady,
        Event::AppUnready,
        Event::Sigterm(facts(false)),
        Event::DrainRequest(facts(false)),
        Event::Interrupt {
            signal: SIGINT,
            mode: Mode::Wrapper,
        },
        Event::DrainOver,
        Event::HandoffDue,
        Event::BudgetSpent,
        Event::AppExited {
            code: 0,
            signal: None,
        },
        Event::Gate(opened()),
    ]
}

/// What `sample` does with `event`: the next state and the actions; `None`: ignored.
fn expected(clock: &Clock, sample: Sample, event: &Event) -> Option<(State, Vec<Action>)> {
    use Sample as S;
    let state = sample.state(clock);
    let now = clock.now();
    let pre_drain = matches!(sample, S::Starting | S::Ready | S::ReadyGated | S::Unready);
    let draining = matches!(
        sample,
        S::DrainingSigterm | S::DrainingPrestop | S::DrainingPrestopSigterm
    );
    let start = |trigger, never_ready| {
        let gate = if sample == S::ReadyGated {
            Gate::Holding
        } else {
            Gate::Open
        };
        Some((
            clock.drain_started_now(trigger, gate),
            vec![Action::StartDrain {
                trigger,
                never_ready,
            }],
        ))
    };
    let stop = |before: Vec<Action>| {
        let mut actions = before;
        actions.push(Action::SendStopSignal);
        Some((clock.stopping_now(), actions))
    };
    let log = |note| vec![Action::Log(note)];
    match (sample, event) {
        (S::Exited, _) => None,
        (S::Starting | S::Unready, Event::AppReady) => Some((
            State::Ready {
                since: now,
                gate: Gate::Open,
            },
            vec![],
        )),
        (S::Ready, Event::AppUnready) => Some((State::Unready { gate: Gate::Open }, vec![])),
        (S::ReadyGated, Event::AppUnready) => Some((
            State::Unready {
                gate: Gate::Holding,
            },
            vec![],
        )),
        (S::Starting, Event::Sigterm(_)) => start(DrainTrigger::Sigterm, true),
        (_, Event::Sigterm(_)) if pre_drain => start(DrainTrigger::Sigterm, false),
        (S::DrainingSigterm, Event::Sigterm(_)) => Some((state, log(Note::SigtermIgnoredDraining))),
        (S::DrainingPrestop | S::DrainingPrestopSigterm, Event::Sigterm(_)) => Some((
            clock.draining(DrainTrigger::Prestop, true),
            log(Note::SigtermDuringPrestop),
        )),
        (S::Drained, Event::Sigterm(_)) => stop(log(Note::SigtermAfterPrestop)),
        (S::Stopping, Event::Sigterm(_)) => Some((state, log(Note::SigtermIgnoredStopping))),
        (S::Starting, Event::DrainRequest(_)) => start(DrainTrigger::Prestop, true),
        (_, Event::DrainRequest(_)) if pre_drain => start(DrainTrigger::Prestop, false),
        (_, Event::Interrupt { signal, .. }) if draining => Some((
            clock.stopping_now(),
            vec![
                Action::Log(Note::DrainInterrupted { signal: *signal }),
                Action::InterruptDrain,
                Action::Forward(*signal),
                Action::Resume,
            ],
        )),
        (S::Drained, Event::Interrupt { signal, .. }) => Some((
            clock.stopping_now(),
            vec![
                Action::Log(Note::DrainInterrupted { signal: *signal }),
                Action::Forward(*signal),
                Action::Resume,
            ],
        )),
        (_, Event::Interrupt { signal, .. }) => Some((state, vec![Action::Forward(*signal)])),
        (S::DrainingSigterm | S::DrainingPrestopSigterm, Event::DrainOver) => {
            stop(vec![Action::ReportDrainEnd])
        }
        (S::DrainingPrestop, Event::DrainOver) => Some((
            State::Drained {
                shutdown: clock.shutdown(),
                handoff_by: Some(now + PRESTOP_HANDOFF),
            },
            vec![Action::ReportDrainEnd, Action::Log(Note::WaitingForSigterm)],
        )),
        (S::Drained, Event::HandoffDue) => stop(log(Note::HandoffTimedOut)),
        (_, Event::BudgetSpent) if !pre_drain => {
            Some((clock.killed(state), vec![Action::KillGroup]))
        }
        (_, Event::AppExited { code, signal }) => Some((
            State::Exited {
                code: *code,
                drain_started: (!pre_drain).then(|| clock.at(10)),
            },
            vec![Action::AppGone {
                code: *code,
                signal: *signal,
                unexpected: false,
                stop_took: (sample == S::Stopping).then(|| Duration::from_secs(50)),
            }],
        )),
        (S::ReadyGated, Event::Gate(verdict)) => Some((
            State::Ready {
                since: clock.at(1),
                gate: Gate::Open,
            },
            log(Note::Gate(verdict.clone())),
        )),
        _ => None,
    }
}

#[test]
fn every_phase_meets_every_event() {
    let clock = Clock::new();
    let mut changed = 0;
    for sample in SAMPLES {
        for event in events() {
            let state = sample.state(&clock);
            let got = step(state, event.clone(), clock.now());
            let want = expected(&clock, sample, &event).unwrap_or((state, vec![]));
            assert_eq!(got, want, "{sample:?} + {event:?}");
            changed += usize::from(got.0 != state || !got.1.is_empty());
        }
    }
    // 100 pairs: the ones that do something, the rest ignored (counted so the table cannot
    // silently turn into "everything ignored").
    assert_eq!(changed, 45);
}

#[test]
fn a_sigterm_rollout() {
    let clock = Clock::new();
    let mut state = State::new(Gate::Open);
    let mut log = Vec::new();
    for (secs, event) in [
        (1, Event::AppReady),
        (5, Event::Sigterm(facts(true))),
        (10, Event::DrainOver),
        (
            11,
            Event::AppExited {
                code: 0,
                signal: Some(Signal::SIGTERM),
            },
        ),
    ] {
        let (next, actions) = step(state, event, clock.at(secs));
        log.push((next.kind(), actions));
        state = next;
    }
    assert_eq!(
        log,
        [
            (PhaseKind::Ready, vec![]),
            (
                PhaseKind::Draining,
                vec![Action::StartDrain {
                    trigger: DrainTrigger::Sigterm,
                    never_ready: false
                }]
            ),
            // A SIGTERM drain stops the app at once: `drained` is the prestop drain's wait.
            (
                PhaseKind::Stopping,
                vec![Action::ReportDrainEnd, Action::SendStopSignal]
            ),
            (
                PhaseKind::Exited,
                vec![Action::AppGone {
                    code: 0,
                    signal: Some(Signal::SIGTERM),
                    unexpected: false,
                    stop_took: Some(Duration::from_secs(1)),
                }]
            ),
        ]
    );
    assert_eq!(state.drain_started(), Some(clock.at(5)));
}

#[test]
fn the_drain_sets_the_budget_and_the_kill_comes_once() {
    let clock = Clock::new();
    let ready = clock.ready();
    let (draining, _) = step(ready, Event::Sigterm(facts(true)), clock.at(2));
    let kill_at = clock.at(2) + KILL_AFTER;
    assert_eq!(draining.kill_at(), Some(kill_at));
    let early = kill_at - Duration::from_millis(1);
    assert_ignored(draining, Event::BudgetSpent, early);
    // The deadline carries into the stop: the kill is the budget's, not the phase's.
    let (stopping, _) = step(draining, Event::DrainOver, clock.at(7));
    assert_eq!(stopping.kill_at(), Some(kill_at));
    let (killed, actions) = step(stopping, Event::BudgetSpent, kill_at);
    assert_eq!(actions, [Action::KillGroup]);
    assert_eq!(killed.kind(), PhaseKind::Stopping);
    assert_eq!(killed.kill_at(), None);
    assert_ignored(killed, Event::BudgetSpent, kill_at); // one kill
    let (exited, _) = step(
        killed,
        Event::AppExited {
            code: 137,
            signal: Some(Signal::SIGKILL),
        },
        kill_at,
    );
    assert_eq!(exited.kind(), PhaseKind::Exited);
    assert_eq!(exited.kill_at(), None);
}

#[test]
fn prestop_then_sigterm_during_the_drain_stops_when_it_is_over() {
    let clock = Clock::new();
    let draining = clock.drain(Event::DrainRequest);
    let (waiting, actions) = step(draining, Event::Sigterm(facts(true)), clock.at(2));
    assert_eq!(actions, [Action::Log(Note::SigtermDuringPrestop)]);
    assert!(!waiting.drain_is_over(), "the drain goes on");
    // A second prestop is ignored.
    assert_ignored(waiting, Event::DrainRequest(facts(true)), clock.at(3));
    let (stopping, actions) = step(waiting, Event::DrainOver, clock.at(4));
    assert_eq!(actions, [Action::ReportDrainEnd, Action::SendStopSignal]);
    assert_eq!(stopping.kind(), PhaseKind::Stopping);
    assert_eq!(stopping.handoff_by(), None);
}

#[test]
fn prestop_drain_over_waits_for_sigterm_until_the_handoff_deadline() {
    let clock = Clock::new();
    let draining = clock.drain(Event::DrainRequest);
    let (drained, actions) = step(draining, Event::DrainOver, clock.at(6));
    assert_eq!(
        actions,
        [Action::ReportDrainEnd, Action::Log(Note::WaitingForSigterm)]
    );
    let handoff_by = clock.at(6) + PRESTOP_HANDOFF;
    assert_eq!(drained.handoff_by(), Some(handoff_by));
    assert!(drained.drain_is_over() && drained.is_alive() && !drained.is_ready());
    let early = handoff_by - Duration::from_millis(1);
    assert_ignored(drained, Event::HandoffDue, early);
    let (stopping, actions) = step(drained, Event::HandoffDue, handoff_by);
    assert_eq!(
        actions,
        [Action::Log(Note::HandoffTimedOut), Action::SendStopSignal]
    );
    assert_eq!(stopping.kind(), PhaseKind::Stopping);
    assert_eq!(
        stopping.handoff_by(),
        None,
        "the handoff ends with the stop"
    );
    assert_ignored(stopping, Event::HandoffDue, handoff_by);
}

#[test]
fn an_interrupt_reports_the_drain_once() {
    let clock = Clock::new();
    let ready = clock.ready();
    let reports = |actions: &[Action]| {
        actions
            .iter()
            .filter(|a| matches!(a, Action::InterruptDrain | Action::ReportDrainEnd))
            .count()
    };
    // Cut short while draining: the drain's evidence, once; a second interrupt only forwards.
    let draining = clock.drain(Event::Sigterm);
    let (stopping, first) = step(
        draining,
        Event::Interrupt {
            signal: SIGQUIT,
            mode: Mode::Wrapper,
        },
        clock.at(2),
    );
    let (_, second) = step(
        stopping,
        Event::Interrupt {
            signal: SIGINT,
            mode: Mode::Wrapper,
        },
        clock.at(3),
    );
    assert_eq!(reports(&first) + reports(&second), 1);
    assert_eq!(second, [Action::Forward(SIGINT)]);
    // Cut short once a prestop drain is over: that drain already reported.
    let draining = clock.drain(Event::DrainRequest);
    let (drained, over) = step(draining, Event::DrainOver, clock.at(2));
    let (_, cut) = step(
        drained,
        Event::Interrupt {
            signal: SIGINT,
            mode: Mode::Wrapper,
        },
        clock.at(3),
    );
    assert_eq!(reports(&over) + reports(&cut), 1);
    // Before any drain it is the app's business.
    assert_eq!(
        step(
            ready,
            Event::Interrupt {
                signal: SIGINT,
                mode: Mode::Wrapper
            },
            clock.at(1)
        ),
        (ready, vec![Action::Forward(SIGINT)])
    );
}

#[test]
fn an_app_killed_by_a_signal_before_its_stop_is_unexpected() {
    let clock = Clock::new();
    let killed = Event::AppExited {
        code: 137,
        signal: Some(Signal::SIGKILL),
    };
    let unexpected = |state: State| match step(state, killed.clone(), clock.now()).1[..] {
        [Action::AppGone { unexpected, .. }] => unexpected,
        ref other => panic!("{other:?}"),
    };
    for sample in [
        Sample::Starting,
        Sample::Ready,
        Sample::DrainingSigterm,
        Sample::Drained,
    ] {
        assert!(unexpected(sample.state(&clock)), "{sample:?}");
    }
    assert!(!unexpected(Sample::Stopping.state(&clock)));
}

#[test]
fn the_never_ready_drain_needs_a_pod_that_never_was_ready_nor_had_traffic() {
    let clock = Clock::new();
    let never_ready = |state: State, had_traffic| match step(
        state,
        Event::Sigterm(facts(had_traffic)),
        clock.now(),
    )
    .1[..]
    {
        [Action::StartDrain { never_ready, .. }] => never_ready,
        ref other => panic!("{other:?}"),
    };
    let starting = State::new(Gate::Open);
    assert!(never_ready(starting, false));
    assert!(!never_ready(starting, true));
    // Unready was ready once: load balancers may still send to it.
    assert!(!never_ready(Sample::Unready.state(&clock), false));
}

#[test]
fn the_gate_holds_the_ready_phase_until_its_verdict_and_stays_open() {
    let clock = Clock::new();
    let (ready, _) = step(State::new(Gate::Holding), Event::AppReady, clock.at(1));
    assert!(ready.gate_holds() && ready.is_ready() && !ready.gate_is_open());
    assert_eq!(ready.ready_since(), Some(clock.at(1)));
    let verdict = GateVerdict::TimedOut {
        timeout: Duration::from_secs(90),
        waiting_for: vec!["10.0.0.1 HAProxy".into()],
    };
    let (open, actions) = step(ready, Event::Gate(verdict.clone()), clock.at(91));
    assert_eq!(actions, [Action::Log(Note::Gate(verdict))]);
    assert!(!open.gate_holds() && open.gate_is_open());
    assert_eq!(open.ready_since(), Some(clock.at(1)), "still ready since");
    assert_ignored(open, Event::Gate(opened()), clock.at(92)); // opens once
    // Once open, for good: an app check failing and passing again does not close it.
    let (unready, _) = step(open, Event::AppUnready, clock.at(93));
    let (ready_again, _) = step(unready, Event::AppReady, clock.at(94));
    assert!(!ready_again.gate_holds());
    // A verdict that comes while the app is not ready is not the gate's to take.
    let held_unready = State::Unready {
        gate: Gate::Holding,
    };
    assert_ignored(held_unready, Event::Gate(opened()), clock.at(95));
    let (drain, _) = step(ready, Event::Sigterm(facts(true)), clock.at(96));
    assert!(
        !drain.gate_holds() && !drain.gate_is_open(),
        "as the drain found it"
    );
}

#[test]
fn kinds_label_every_phase_and_answer_the_probes() {
    let clock = Clock::new();
    let labels: Vec<_> = PhaseKind::ALL.iter().map(|k| k.label()).collect();
    assert_eq!(
        labels,
        [
            "starting", "ready", "unready", "draining", "drained", "stopping", "exited"
        ]
    );
    for sample in SAMPLES {
        let state = sample.state(&clock);
        assert!(PhaseKind::ALL.contains(&state.kind()));
        assert_eq!(state.to_string(), state.kind().label());
        let kind = state.kind();
        assert_eq!(state.is_ready(), kind == PhaseKind::Ready, "{sample:?}");
        assert_eq!(state.is_alive(), kind != PhaseKind::Exited, "{sample:?}");
        assert_eq!(
            state.drain_has_started(),
            state.drain_started().is_some(),
            "{sample:?}"
        );
    }
}

#[test]
fn the_writer_publishes_each_change_and_returns_the_actions() {
    let mut lifecycle = Lifecycle::new(Gate::Open);
    let reader = lifecycle.subscribe();
    assert!(lifecycle.apply(Event::AppReady).is_empty());
    assert_eq!(reader.borrow().kind(), PhaseKind::Ready);
    let actions = lifecycle.apply(Event::Sigterm(facts(true)));
    assert_eq!(
        actions,
        [Action::StartDrain {
            trigger: DrainTrigger::Sigterm,
            never_ready: false
        }]
    );
    let started = reader.borrow().drain_started().unwrap();
    assert!(lifecycle.apply(Event::DrainRequest(facts(true))).is_empty());
    assert_eq!(reader.borrow().drain_started(), Some(started));
    assert_eq!(
        lifecycle.drain_elapsed_ms().map(|ms| ms < 60_000),
        Some(true)
    );
}

/// `drainit sidecar`, the three ways a pod is deleted, and the operator's interrupt: the drain
/// runs as in wrapper mode, nothing is ever stopped or killed, and drainit exits 0 once the drain
/// is over and SIGTERM has come.
mod sidecar {
    use super::*;

    fn facts() -> DrainFacts {
        DrainFacts {
            had_traffic: true,
            kill_after: KILL_AFTER,
            mode: Mode::Sidecar,
        }
    }

    /// Steps through `events` (at whole seconds) from a ready pod; the phase and actions of each.
    fn run(clock: &Clock, events: Vec<(u64, Event)>) -> (State, Vec<(PhaseKind, Vec<Action>)>) {
        let mut state = clock.ready();
        let mut log = Vec::new();
        for (secs, event) in events {
            let (next, actions) = step(state, event, clock.at(secs));
            log.push((next.kind(), actions));
            state = next;
        }
        (state, log)
    }

    fn start(trigger: DrainTrigger) -> (PhaseKind, Vec<Action>) {
        let start = Action::StartDrain {
            trigger,
            never_ready: false,
        };
        (PhaseKind::Draining, vec![start])
    }

    fn exited_0() -> (PhaseKind, Vec<Action>) {
        (PhaseKind::Exited, vec![Action::Log(Note::SidecarDone)])
    }

    /// The drain is over: reported, then drainit exits 0.
    fn drain_over_exits_0() -> (PhaseKind, Vec<Action>) {
        let (exited, mut actions) = exited_0();
        actions.insert(0, Action::ReportDrainEnd);
        (exited, actions)
    }

    #[test]
    fn a_sidecar_drain_has_no_kill_deadline() {
        let clock = Clock::new();
        let (draining, _) = run(&clock, vec![(1, Event::Sigterm(facts()))]);
        assert_eq!(draining.drain_started(), Some(clock.at(1)));
        assert_eq!(draining.kill_at(), None);
        assert_ignored(draining, Event::BudgetSpent, clock.at(99));
    }

    /// Native sidecar: the preStop hook starts the drain; the late SIGTERM (after the app
    /// exited) ends drainit at once, whenever it comes: no handoff deadline stops anything.
    #[test]
    fn native_prestop_then_late_sigterm_exits_0_at_once() {
        let clock = Clock::new();
        let (exited, log) = run(
            &clock,
            vec![
                (1, Event::DrainRequest(facts())),
                (6, Event::DrainOver),
                (60, Event::HandoffDue),
                (70, Event::Sigterm(facts())),
            ],
        );
        let waiting = vec![
            Action::ReportDrainEnd,
            Action::Log(Note::SidecarWaitingForSigterm),
        ];
        assert_eq!(
            log,
            [
                start(DrainTrigger::Prestop),
                (PhaseKind::Drained, waiting),
                (PhaseKind::Drained, vec![]),
                exited_0(),
            ]
        );
        assert_eq!(
            exited,
            State::Exited {
                code: 0,
                drain_started: Some(clock.at(1))
            }
        );
    }

    /// Regular-container sidecar (clusters before 1.29): SIGTERM starts the drain, drainit serves
    /// on and exits 0 when it is over.
    #[test]
    fn sigterm_drains_then_exits_0() {
        let clock = Clock::new();
        let (exited, log) = run(
            &clock,
            vec![
                (1, Event::Sigterm(facts())),
                (2, Event::Sigterm(facts())),
                (6, Event::DrainOver),
            ],
        );
        let again = vec![Action::Log(Note::SigtermIgnoredDraining)];
        assert_eq!(
            log,
            [
                start(DrainTrigger::Sigterm),
                (PhaseKind::Draining, again),
                drain_over_exits_0()
            ]
        );
        assert_eq!(exited.drain_started(), Some(clock.at(1)));
    }

    /// SIGTERM while the prestop drain runs: drainit exits when it is over, not before.
    #[test]
    fn sigterm_during_the_prestop_drain_exits_when_it_is_over() {
        let clock = Clock::new();
        let (_, log) = run(
            &clock,
            vec![
                (1, Event::DrainRequest(facts())),
                (2, Event::Sigterm(facts())),
                (6, Event::DrainOver),
            ],
        );
        let during = vec![Action::Log(Note::SidecarSigtermDuringPrestop)];
        assert_eq!(
            log,
            [
                start(DrainTrigger::Prestop),
                (PhaseKind::Draining, during),
                drain_over_exits_0()
            ]
        );
    }

    /// SIGINT or SIGQUIT: nothing to forward to; drainit exits now with 128 + the signal,
    /// reporting a drain under way as cut short.
    #[test]
    fn an_interrupt_exits_at_once() {
        let clock = Clock::new();
        let interrupt = |signal| Event::Interrupt {
            signal,
            mode: Mode::Sidecar,
        };
        let (exited, actions) = step(clock.ready(), interrupt(SIGINT), clock.at(2));
        assert_eq!(
            actions,
            [Action::Log(Note::SidecarInterrupted { signal: SIGINT })]
        );
        assert_eq!(
            exited,
            State::Exited {
                code: 128 + SIGINT as u8,
                drain_started: None
            }
        );
        let (draining, _) = run(&clock, vec![(1, Event::DrainRequest(facts()))]);
        let (exited, actions) = step(draining, interrupt(SIGQUIT), clock.at(2));
        assert_eq!(
            actions,
            [
                Action::Log(Note::SidecarInterrupted { signal: SIGQUIT }),
                Action::InterruptDrain
            ]
        );
        assert_eq!(exited.drain_started(), Some(clock.at(1)));
    }
}
