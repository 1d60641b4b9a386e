//! The start-up gate, `--ready-after-lb-probes`: the kubelet is told "not ready" until the load
//! balancers checking `/ready` have each seen it healthy `probes` times in a row (they are told
//! the truth at once), so a rollout does not stop an old pod before the load balancers use the
//! new one.
//!
//! The gate's state is part of the lifecycle's `Ready` phase; the probe server answers the
//! kubelet from it. This task decides when it opens: each time the probe server records a
//! `/ready` check (so the kubelet's next probe already sees it open), at the timeout, and now and
//! then in between (a load balancer that goes away stops holding the gate).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::checkers::Checkers;
use crate::lifecycle::{Event, GateVerdict, State};

/// How often the gate looks again with no new check recorded.
const RECHECK: Duration = Duration::from_secs(1);

/// `--ready-after-lb-probes` and `--ready-lb-timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupGate {
    pub probes: u32,
    /// After this long ready, the gate opens anyway (with a warning).
    pub timeout: Duration,
}

impl StartupGate {
    /// The verdict for the lifecycle, once the gate no longer waits: open when every load
    /// balancer saw the pod ready `probes` times in a row, timed out after `timeout` ready.
    fn verdict(
        &self,
        checkers: &Checkers,
        ready_since: Instant,
        now: Instant,
    ) -> Option<GateVerdict> {
        if checkers.all_healthy(now, self.probes) {
            Some(GateVerdict::Opened {
                probes: self.probes,
            })
        } else if now.saturating_duration_since(ready_since) >= self.timeout {
            Some(GateVerdict::TimedOut {
                timeout: self.timeout,
                waiting_for: checkers.holding_the_gate(now, self.probes),
            })
        } else {
            None
        }
    }
}

/// Watches the gate while the app is ready and the gate holds, and tells the supervisor when it
/// opens. `recorded` is notified by the probe server after each `/ready` check it records. Ends
/// once the gate is open or the drain has started.
pub async fn run(
    gate: StartupGate,
    checkers: Arc<Mutex<Checkers>>,
    recorded: Arc<Notify>,
    mut state: watch::Receiver<State>,
    events: mpsc::Sender<Event>,
) {
    loop {
        let current = *state.borrow_and_update();
        if current.gate_is_open() || current.drain_has_started() {
            return;
        }
        let Some(since) = current.ready_since().filter(|_| current.gate_holds()) else {
            if state.changed().await.is_err() {
                return;
            }
            continue;
        };
        let now = Instant::now();
        let verdict = gate.verdict(&crate::sync::lock(&checkers), since, now);
        if let Some(verdict) = verdict {
            // The supervisor opens the gate (or ignores it, if the app is no longer ready).
            if events.send(Event::Gate(verdict)).await.is_err() || state.changed().await.is_err() {
                return;
            }
            continue;
        }
        let next_look = (now + RECHECK).min(since + gate.timeout);
        tokio::select! {
            changed = state.changed() => if changed.is_err() { return },
            () = recorded.notified() => {}
            () = tokio::time::sleep_until(next_look) => {}
        }
    }
}

#[cfg(test)]
mod tests;
