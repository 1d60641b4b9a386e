//! The supervisor: one loop that turns signals, prestop requests, timers and the app's exit into
//! lifecycle events. It is the only writer of the lifecycle.
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
use crate::drain::{DrainEnd, DrainPolicy, EndReason, Observers, PRESTOP_HANDOFF, traffic};
use crate::lifecycle::{DrainTrigger, Event, Lifecycle, Phase};
use crate::metrics::Metrics;
use crate::reaper::Reaper;
use crate::signals::{self, Meaning};

type DrainFuture = Pin<Box<dyn Future<Output = DrainEnd>>>;

/// What the supervisor reacts to, besides its own timers.
pub struct Inputs {
    pub signals: Signals,
    /// `drainit prestop` asked for the drain.
    pub drain_requests: mpsc::Receiver<()>,
    /// The app check's verdicts: `AppReady` and `AppUnready`.
    pub readiness: mpsc::Receiver<Event>,
}

pub struct Supervisor {
    app: App,
    lifecycle: Lifecycle,
    reaper: Reaper,
    drain_policy: DrainPolicy,
    observers: Observers,
    budget: Budget,
    stop_signal: i32,
    /// The drain under way, if any.
    drain: Option<DrainFuture>,
    /// SIGTERM arrived while a prestop drain was under way: stop as soon as it is over.
    sigterm_during_prestop: bool,
    /// A prestop drain is over and the kubelet's SIGTERM has not come yet.
    handoff_deadline: Option<Instant>,
    /// When the app's group gets SIGKILL.
    kill_deadline: Option<Instant>,
    /// When the app was sent its stop signal, for the time it took to exit.
    stop_sent: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl Supervisor {
    pub fn new(
        app: App,
        lifecycle: Lifecycle,
        reaper: Reaper,
        observers: Observers,
        config: &RunConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            app,
            lifecycle,
            reaper,
            drain_policy: config.drain.clone(),
            observers,
            budget: config.budget,
            stop_signal: config.stop_signal,
            drain: None,
            sigterm_during_prestop: false,
            handoff_deadline: None,
            kill_deadline: None,
            stop_sent: None,
            metrics,
        }
    }

    /// Runs until the app has exited; returns drainit's exit code (the app's).
    pub async fn run(mut self, inputs: Inputs) -> u8 {
        let Inputs {
            mut signals,
            mut drain_requests,
            mut readiness,
        } = inputs;
        loop {
            if let Phase::Exited { code } = self.lifecycle.phase() {
                return code;
            }
            tokio::select! {
                // Deadlines first: they fire once and cost nothing, while a stream of SIGCHLDs (an
                // app forking short-lived children) must not hold back the budget kill. Then
                // signals: an exit or a SIGTERM never waits behind anything else.
                biased;
                () = at(self.kill_deadline) => self.on_budget_spent(),
                () = at(self.handoff_deadline) => self.on_handoff_timeout(),
                Some(signal) = signals.next() => self.on_signal(signal),
                end = drain_over(&mut self.drain) => self.on_drain_over(end),
                Some(()) = drain_requests.recv() => self.start_drain(DrainTrigger::Prestop),
                Some(event) = readiness.recv() => {
                    self.lifecycle.apply(event);
                }
            }
        }
    }

    fn on_signal(&mut self, signal: i32) {
        match signals::meaning(signal) {
            Meaning::ChildExited => {
                self.reap();
            }
            Meaning::Drain => self.on_sigterm(),
            Meaning::Interrupt(signal) => self.on_interrupt(signal),
            Meaning::Forward(signal) => {
                self.forward(signal);
            }
        }
    }

    /// Collects every exited child; returns whether the app was one of them.
    fn reap(&mut self) -> bool {
        let orphans_before = self.reaper.orphans_reaped();
        let app_exit = self.reaper.reap(self.app.pid);
        self.metrics
            .zombies_reaped(self.reaper.orphans_reaped() - orphans_before);
        if let Some(exit) = &app_exit {
            self.on_app_exit(exit.code, exit.signal);
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
        self.metrics.signal_forwarded(&name);
        self.app.forward(signal);
    }

    fn on_sigterm(&mut self) {
        match self.lifecycle.phase() {
            Phase::Starting | Phase::Ready | Phase::Unready => {
                self.start_drain(DrainTrigger::Sigterm)
            }
            Phase::Draining {
                trigger: DrainTrigger::Prestop,
            } => {
                self.sigterm_during_prestop = true;
                info!(
                    event = "sigterm_during_prestop",
                    elapsed_ms = self.elapsed_ms(),
                    "SIGTERM during the prestop drain: the app is stopped when the drain is over"
                );
            }
            Phase::Drained => {
                info!(
                    event = "sigterm_after_prestop",
                    elapsed_ms = self.elapsed_ms(),
                    "SIGTERM after the prestop drain"
                );
                self.stop_app();
            }
            Phase::Draining { .. } => {
                info!(
                    event = "sigterm_ignored",
                    elapsed_ms = self.elapsed_ms(),
                    "SIGTERM again: ignored (SIGINT or SIGQUIT stop the app now)"
                );
            }
            Phase::Stopping => {
                info!(
                    event = "sigterm_ignored",
                    elapsed_ms = self.elapsed_ms(),
                    "SIGTERM again: ignored, the app already has its stop signal"
                );
            }
            Phase::Exited { .. } => {}
        }
    }

    /// SIGINT and SIGQUIT are an operator's "now": they end a drain early and reach the app as is.
    fn on_interrupt(&mut self, signal: i32) {
        let phase = self.lifecycle.phase();
        if matches!(phase, Phase::Draining { .. } | Phase::Drained) {
            info!(
                event = "drain_interrupted",
                signal = signals::name(signal),
                elapsed_ms = self.elapsed_ms(),
                "drain cut short: forwarding to the app now"
            );
            if self.drain.take().is_some() {
                let started = self.lifecycle.drain_started().unwrap_or_else(Instant::now);
                self.report_drain_end(&DrainEnd {
                    reason: EndReason::Interrupted,
                    elapsed: started.elapsed(),
                    evidence: self.observers.evidence(started),
                });
            }
            self.forward(signal);
            self.stop_signal_sent();
        } else {
            self.forward(signal);
        }
    }

    fn start_drain(&mut self, trigger: DrainTrigger) {
        // /ready never answered 200 and the app never had a request: nothing routes traffic here,
        // so there is nothing to drain. (A load balancer that checks the app's own port instead
        // of /ready may route to it all the same: its requests are what rules that out.)
        let never_ready = self.lifecycle.phase() == Phase::Starting
            && traffic::lock(&self.observers.traffic)
                .last_activity
                .is_none();
        if !self.lifecycle.apply(Event::DrainStarted(trigger)) {
            return;
        }
        let started = self.lifecycle.drain_started().unwrap_or_else(Instant::now);
        let kill_at = self.budget.kill_at(started);
        info!(event = "drain_started",
            trigger = %trigger,
            drain_ms = self.drain_policy.longest().as_millis() as u64,
            kill_after_ms = (kill_at - started).as_millis() as u64,
            elapsed_ms = 0u64,
            "drain started: /ready answers 503, the app keeps serving"
        );
        self.drain = Some(if never_ready {
            let end = DrainEnd {
                reason: EndReason::NeverReady,
                elapsed: Duration::ZERO,
                evidence: self.observers.evidence(started),
            };
            Box::pin(std::future::ready(end))
        } else {
            Box::pin(
                self.drain_policy
                    .clone()
                    .run(started, self.observers.clone()),
            )
        });
        self.kill_deadline = Some(kill_at);
    }

    fn on_drain_over(&mut self, end: DrainEnd) {
        self.drain = None;
        let trigger = match self.lifecycle.phase() {
            Phase::Draining { trigger } => trigger,
            _ => return,
        };
        self.report_drain_end(&end);
        self.lifecycle.apply(Event::DrainOver);
        if trigger == DrainTrigger::Sigterm || self.sigterm_during_prestop {
            self.stop_app();
        } else {
            info!(
                event = "waiting_for_sigterm",
                elapsed_ms = self.elapsed_ms(),
                "waiting for the kubelet's SIGTERM to stop the app"
            );
            self.handoff_deadline = Some(Instant::now() + PRESTOP_HANDOFF);
        }
    }

    /// Every drain, however it ended, gets one `drain over` line with its evidence.
    fn report_drain_end(&self, end: &DrainEnd) {
        info!(event = "drain_over",
            reason = end.reason.as_str(),
            elapsed_ms = end.elapsed.as_millis() as u64,
            evidence = %end.evidence,
            "drain over"
        );
        self.metrics.drain_ended(end.reason.label(), end.elapsed);
    }

    fn on_handoff_timeout(&mut self) {
        warn!(
            event = "handoff_timed_out",
            elapsed_ms = self.elapsed_ms(),
            "no SIGTERM within {PRESTOP_HANDOFF:?} of the prestop drain: stopping the app anyway"
        );
        self.stop_app();
    }

    fn stop_app(&mut self) {
        info!(
            event = "stop_signal_sent",
            signal = signals::name(self.stop_signal),
            elapsed_ms = self.elapsed_ms(),
            "sending the stop signal to the app"
        );
        self.app.forward(self.stop_signal);
        self.stop_signal_sent();
    }

    /// The app has been told to stop (the stop signal, or an operator's INT or QUIT). A stopped
    /// app is continued, so that it acts on it.
    fn stop_signal_sent(&mut self) {
        self.app.resume();
        self.handoff_deadline = None;
        self.stop_sent = Some(Instant::now());
        self.lifecycle.apply(Event::StopSignalSent);
    }

    fn on_budget_spent(&mut self) {
        self.kill_deadline = None;
        // Deadlines are polled before signals: the app may have exited just in time.
        if self.reap() {
            return;
        }
        warn!(
            event = "budget_kill",
            elapsed_ms = self.elapsed_ms(),
            pgid = self.app.pid.as_raw(),
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
        self.app.kill_group();
        self.metrics.budget_kill();
    }

    fn on_app_exit(&mut self, code: u8, signal: Option<Signal>) {
        if let Some(stop_sent) = self.stop_sent {
            self.metrics.app_stopped(stop_sent.elapsed());
        }
        self.drain = None;
        self.kill_deadline = None;
        self.handoff_deadline = None;
        match signal {
            // Killed by a signal before drainit stopped it: a crash, the OOM killer, an operator.
            Some(signal) if self.stop_sent.is_none() => warn!(
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
        self.lifecycle.apply(Event::AppExited { code });
        let (app, reaper) = (self.app, &mut self.reaper);
        if app.kill_leftovers(&reaper.waiters().pids(), || {
            reaper.reap(app.pid);
        }) {
            warn!(
                event = "leftovers_killed",
                "the app left processes behind: killed them"
            );
        }
    }

    fn elapsed_ms(&self) -> Option<u64> {
        self.lifecycle.drain_elapsed().map(|e| e.as_millis() as u64)
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
