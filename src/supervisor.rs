//! The supervisor: one loop that turns signals, prestop requests, deadlines and the app's exit into
//! lifecycle events, and carries out the actions the lifecycle's `step` decides. It is the only
//! writer of the lifecycle, and keeps no lifecycle fact of its own.
//!
//! Signals pending together are taken in signal-number order, and one kind sent twice before
//! drainit looks counts once (signal-hook merges them, as the kernel does for standard signals).

use std::future::{Future, pending};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use futures_util::StreamExt;
use nix::sys::signal::Signal;
use signal_hook_tokio::Signals;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::app::App;
use crate::budget::Budget;
use crate::config::RunConfig;
use crate::drain::{DrainEnd, DrainPolicy, EndReason, Observers, traffic};
use crate::lifecycle::{Action, DrainFacts, DrainTrigger, Event, Lifecycle, Mode, State};
use crate::metrics::Metrics;
use crate::reaper::Reaper;
use crate::signals::{self, Meaning};

type DrainFuture = Pin<Box<dyn Future<Output = DrainEnd>>>;

/// What the supervisor reacts to, besides its own timers.
pub struct Inputs {
    pub signals: Signals,
    /// `drainit prestop` asked for the drain.
    pub drain_requests: mpsc::Receiver<()>,
    /// The app check's verdicts (`AppReady`, `AppUnready`) and the start-up gate's (`Gate`).
    pub readiness: mpsc::Receiver<Event>,
}

pub struct Supervisor {
    /// `None` for a sidecar: its app is another container, the kubelet's to stop.
    app: Option<App>,
    mode: Mode,
    lifecycle: Lifecycle,
    reaper: Reaper,
    drain_policy: DrainPolicy,
    observers: Observers,
    budget: Budget,
    stop_signal: i32,
    /// The drain under way, if any: the effect of the `Draining` phase.
    drain: Option<DrainFuture>,
    /// The end of the drain that just resolved, until `ReportDrainEnd` logs it.
    ended: Option<DrainEnd>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(
        app: Option<App>,
        lifecycle: Lifecycle,
        reaper: Reaper,
        observers: Observers,
        config: &RunConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            app,
            mode: config.mode(),
            lifecycle,
            reaper,
            drain_policy: config.drain.clone(),
            observers,
            budget: config.budget,
            stop_signal: config.stop_signal,
            drain: None,
            ended: None,
            metrics,
        }
    }

    /// Runs until the app has exited (a sidecar: until its drain is over and SIGTERM came);
    /// returns drainit's exit code (the app's; a sidecar's own).
    pub async fn run(mut self, inputs: Inputs) -> u8 {
        let Inputs {
            mut signals,
            mut drain_requests,
            mut readiness,
        } = inputs;
        loop {
            let state = self.lifecycle.state();
            if let State::Exited { code, .. } = state {
                return code;
            }
            tokio::select! {
                // Deadlines first: they fire once and cost nothing, while a stream of SIGCHLDs (an
                // app forking short-lived children) must not hold back the budget kill. Then
                // signals: an exit or a SIGTERM never waits behind anything else.
                biased;
                () = at(state.kill_at()) => self.on_budget_spent(),
                () = at(state.handoff_by()) => self.handle(Event::HandoffDue),
                Some(signal) = signals.next() => self.on_signal(signal),
                end = drain_over(&mut self.drain) => {
                    self.drain = None;
                    self.ended = Some(end);
                    self.handle(Event::DrainOver);
                }
                Some(()) = drain_requests.recv() => self.handle(Event::DrainRequest(self.drain_facts())),
                Some(event) = readiness.recv() => self.handle(event),
            }
        }
    }

    /// Steps the lifecycle and carries out what it decided.
    fn handle(&mut self, event: Event) {
        for action in self.lifecycle.apply(event) {
            self.execute(action);
        }
    }

    fn execute(&mut self, action: Action) {
        match action {
            Action::StartDrain {
                trigger,
                never_ready,
            } => self.start_drain(trigger, never_ready),
            Action::ReportDrainEnd => {
                if let Some(end) = self.ended.take() {
                    self.report_drain_end(&end);
                }
            }
            Action::InterruptDrain => self.interrupt_drain(),
            Action::Forward(signal) => self.forward(signal),
            Action::SendStopSignal => self.stop_app(),
            Action::Resume => self.with_app(App::resume),
            Action::KillGroup => self.kill_group(),
            Action::AppGone {
                code,
                signal,
                unexpected,
                stop_took,
            } => self.on_app_gone(code, signal, unexpected, stop_took),
            Action::Log(note) => note.log(self.elapsed_ms()),
        }
    }

    fn on_signal(&mut self, signal: i32) {
        match signals::meaning(signal) {
            Meaning::ChildExited => {
                self.reap();
            }
            Meaning::Drain => self.handle(Event::Sigterm(self.drain_facts())),
            Meaning::Interrupt(signal) => self.handle(Event::Interrupt {
                signal,
                mode: self.mode,
            }),
            Meaning::Forward(signal) => self.forward(signal),
        }
    }

    /// What a drain request needs to know now.
    fn drain_facts(&self) -> DrainFacts {
        DrainFacts {
            had_traffic: traffic::lock(&self.observers.traffic)
                .last_activity
                .is_some(),
            kill_after: self.budget.kill_after(),
            mode: self.mode,
        }
    }

    /// Collects every exited child; returns whether the app was one of them.
    fn reap(&mut self) -> bool {
        let orphans_before = self.reaper.orphans_reaped();
        let app_exit = self.reaper.reap(self.app.map(|app| app.pid));
        self.metrics
            .zombies_reaped(self.reaper.orphans_reaped() - orphans_before);
        if let Some(exit) = &app_exit {
            self.handle(Event::AppExited {
                code: exit.code,
                signal: exit.signal,
            });
        }
        app_exit.is_some()
    }

    fn forward(&mut self, signal: i32) {
        let name = signals::name(signal);
        info!(
            event = "signal_forwarded",
            signal = name,
            elapsed_ms = self.elapsed_ms(),
            "forwarding signal to the app"
        );
        self.metrics.signal_forwarded(signal);
        self.with_app(|app| app.forward(signal));
    }

    /// Does `what` to the app; a sidecar has none (its lifecycle never asks).
    fn with_app(&self, what: impl FnOnce(&App)) {
        if let Some(app) = &self.app {
            what(app);
        }
    }

    fn start_drain(&mut self, trigger: DrainTrigger, never_ready: bool) {
        let state = self.lifecycle.state();
        let Some(started) = state.drain_started() else {
            return;
        };
        // A sidecar kills nothing: no kill deadline.
        let kill_after = state.kill_at().map(|kill_at| kill_at - started);
        info!(event = "drain_started",
            trigger = %trigger,
            drain_ms = self.drain_policy.longest().as_millis() as u64,
            kill_after_ms = kill_after.map(|after| after.as_millis() as u64),
            elapsed_ms = 0u64,
            "drain started: /ready answers 503, the app keeps serving"
        );
        self.drain = Some(if never_ready {
            let end = self.observers.end_now(EndReason::NeverReady, started);
            Box::pin(std::future::ready(end))
        } else {
            Box::pin(
                self.drain_policy
                    .clone()
                    .run(started, self.observers.clone()),
            )
        });
    }

    /// SIGINT or SIGQUIT cut the drain short: it ends here, with what it saw so far.
    fn interrupt_drain(&mut self) {
        if self.drain.take().is_none() {
            return;
        }
        let started = self
            .lifecycle
            .state()
            .drain_started()
            .unwrap_or_else(Instant::now);
        self.report_drain_end(&self.observers.end_now(EndReason::Interrupted, started));
    }

    /// Every drain, however it ended, gets one `drain over` line with its evidence.
    fn report_drain_end(&self, end: &DrainEnd) {
        info!(event = "drain_over",
            reason = end.reason.as_str(),
            elapsed_ms = end.elapsed.as_millis() as u64,
            evidence = %end.evidence,
            "drain over"
        );
        self.metrics.drain_ended(end.reason, end.elapsed);
    }

    /// The stop signal. A stopped app is continued, so that it acts on it.
    fn stop_app(&mut self) {
        info!(
            event = "stop_signal_sent",
            signal = signals::name(self.stop_signal),
            elapsed_ms = self.elapsed_ms(),
            "sending the stop signal to the app"
        );
        self.with_app(|app| {
            app.forward(self.stop_signal);
            app.resume();
        });
    }

    fn on_budget_spent(&mut self) {
        // Deadlines are polled before signals: the app may have exited just in time.
        if !self.reap() {
            self.handle(Event::BudgetSpent);
        }
    }

    fn kill_group(&mut self) {
        warn!(
            event = "budget_kill",
            elapsed_ms = self.elapsed_ms(),
            pgid = self.app.map(|app| app.pid.as_raw()),
            "shutdown budget spent (grace period - 1s): SIGKILL to the app's process group"
        );
        let open = traffic::lock(&self.observers.traffic).open_connections;
        if open > 0 {
            warn!(
                event = "open_at_kill",
                open_connections = open,
                "connections to the app still open when it was killed"
            );
        }
        self.with_app(App::kill_group);
        self.metrics.budget_kill();
    }

    fn on_app_gone(
        &mut self,
        code: u8,
        signal: Option<Signal>,
        unexpected: bool,
        stop_took: Option<Duration>,
    ) {
        if let Some(took) = stop_took {
            self.metrics.app_stopped(took);
        }
        self.drain = None;
        match signal {
            Some(signal) if unexpected => warn!(
                event = "app_exited",
                code,
                signal = signal.as_str(),
                elapsed_ms = self.elapsed_ms(),
                orphans_reaped = self.reaper.orphans_reaped(),
                "app exited"
            ),
            _ => info!(
                event = "app_exited",
                code,
                signal = signal.map(Signal::as_str),
                elapsed_ms = self.elapsed_ms(),
                orphans_reaped = self.reaper.orphans_reaped(),
                "app exited"
            ),
        }
        let (Some(app), reaper) = (self.app, &mut self.reaper) else {
            return;
        };
        if app.kill_leftovers(&reaper.waiters().pids(), || {
            reaper.reap(Some(app.pid));
        }) {
            warn!(
                event = "leftovers_killed",
                "the app left processes behind: killed them"
            );
        }
    }

    fn elapsed_ms(&self) -> Option<u64> {
        self.lifecycle.drain_elapsed_ms()
    }
}

/// Resolves with the end of the drain under way; never, if there is none.
async fn drain_over(drain: &mut Option<DrainFuture>) -> DrainEnd {
    match drain {
        Some(drain) => drain.await,
        None => pending().await,
    }
}

/// Resolves at `deadline`; never, if there is none.
async fn at(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lifecycle::{Gate, step};

    const KILL_AFTER: Duration = Duration::from_secs(29);

    /// A ready pod asked to drain (`Event::Sigterm` or `Event::DrainRequest`) now.
    fn drain_now(request: fn(DrainFacts) -> Event) -> State {
        let facts = DrainFacts {
            had_traffic: true,
            kill_after: KILL_AFTER,
            mode: Mode::Wrapper,
        };
        let ready = step(State::new(Gate::Open), Event::AppReady, Instant::now()).0;
        step(ready, request(facts), Instant::now()).0
    }

    /// What the supervisor's loop waits on, on the paused clock: the kill lands at the budget's
    /// deadline to the millisecond, once.
    #[tokio::test(start_paused = true)]
    async fn the_budget_kill_lands_at_its_deadline() {
        let started = Instant::now();
        let draining = drain_now(Event::Sigterm);
        assert_eq!(draining.handoff_by(), None);
        at(draining.kill_at()).await;
        assert_eq!(Instant::now() - started, KILL_AFTER);
        let (killed, actions) = step(draining, Event::BudgetSpent, Instant::now());
        assert_eq!(actions, [Action::KillGroup]);
        let never = tokio::time::timeout(KILL_AFTER, at(killed.kill_at())).await;
        assert!(never.is_err(), "no deadline left");
    }

    #[tokio::test(start_paused = true)]
    async fn a_prestop_drain_over_hands_off_at_its_deadline() {
        let started = Instant::now();
        let draining = drain_now(Event::DrainRequest);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (drained, _) = step(draining, Event::DrainOver, Instant::now());
        // The handoff deadline comes before the kill: it is the one the loop wakes for.
        tokio::select! {
            biased;
            () = at(drained.kill_at()) => panic!("the kill came first"),
            () = at(drained.handoff_by()) => {}
        }
        assert_eq!(
            Instant::now() - started,
            Duration::from_secs(3) + crate::lifecycle::PRESTOP_HANDOFF
        );
    }
}
