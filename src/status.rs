//! `GET /status`: what drainit sees and decided, as JSON, for operators (and for tuning drains).

use std::sync::atomic::Ordering;
use tokio::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::drain::{Observers, traffic};
use crate::health::Context;
use crate::lifecycle::State;
use crate::readiness;

/// The live state of drainit, its app check and its watchers.
pub fn render(state: State, observers: &Observers, context: &Context) -> Value {
    let now = Instant::now();
    let view = observers.drain_view().borrow().clone();
    let checkers = observers.checkers();
    let traffic = traffic::lock(&observers.traffic);
    json!({
        "phase": state.phase.name(),
        "uptime_ms": context.started.elapsed().as_millis() as u64,
        "app_pid": context.app_pid,
        "drain_elapsed_ms": state.drain_started.map(|t| t.elapsed().as_millis() as u64),
        "drain_policy": view.policy,
        "traffic": merged(traffic.status(now), &view.traffic),
        "app_check": readiness::lock(&context.check_log).status(&context.readiness, now),
        "startup_gate": context.startup_gate.map(|gate| json!({
            "probes": gate.probes,
            "timeout_ms": gate.timeout.as_millis() as u64,
            "open": context.gate_opened.load(Ordering::Relaxed),
        })),
        "lb_probes": {
            "unhealthy_threshold": view.lb_probes.unhealthy_threshold,
            "drained": view.lb_probes.drained,
            "checkers": checkers.status(now, state.drain_started, view.lb_probes.states_against),
            "checkers_dropped": checkers.dropped,
        },
    })
}

/// What a watcher sees, with what the drain decided from it.
fn merged(mut seen: Value, decided: &impl Serialize) -> Value {
    if let (Value::Object(seen), Ok(Value::Object(decided))) =
        (&mut seen, serde_json::to_value(decided))
    {
        seen.extend(decided);
    }
    seen
}
