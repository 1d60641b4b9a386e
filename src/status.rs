//! `GET /status`: what drainit sees and decided, as JSON, for operators (and for tuning drains).

use tokio::time::Instant;

use serde_json::{Value, json};

use crate::drain::{DrainPolicy, Observers, traffic};
use crate::health::Context;
use crate::lifecycle::State;
use crate::readiness;

/// The live state of drainit, its app check and its watchers.
pub fn render(state: State, observers: &Observers, context: &Context) -> Value {
    let now = Instant::now();
    let (policy, threshold, quiet) = match &context.drain {
        DrainPolicy::Fixed(delay) => (
            json!({ "fixed_delay_ms": delay.as_millis() as u64 }),
            None,
            None,
        ),
        DrainPolicy::Watched(watched) => {
            let watchers: Vec<String> = watched.watchers.iter().map(ToString::to_string).collect();
            let policy = json!({
                "watch": watchers,
                "min_ms": watched.min.as_millis() as u64,
                "max_ms": watched.max.as_millis() as u64,
            });
            let quiet = watched
                .watches_traffic()
                .then_some((watched.quiet_period, watched.max));
            (policy, Some(watched.lb_unhealthy_threshold), quiet)
        }
    };
    let threshold_or_default = threshold.unwrap_or(2);
    let checkers = observers.checkers();
    let traffic = traffic::lock(&observers.traffic);
    let origin = state.drain_started().unwrap_or(now);
    let quiet = quiet.map(|(period, max)| period.resolve(traffic.rate(origin), max));
    let mut traffic_view = traffic.status(now, quiet.as_ref().map(|(d, why)| (*d, why.as_str())));
    if let (Some((period, _)), Some(started)) = (&quiet, state.drain_started()) {
        traffic_view["drained"] = json!(traffic.quiet_for(started) >= *period);
    }
    json!({
        "phase": state.kind().label(),
        "uptime_ms": context.started.elapsed().as_millis() as u64,
        "app_pid": context.app_pid,
        "drain_elapsed_ms": state.drain_started().map(|t| t.elapsed().as_millis() as u64),
        "drain_policy": policy,
        "traffic": traffic_view,
        "app_check": readiness::lock(&context.check_log).status(&context.readiness, now),
        "startup_gate": context.startup_gate.map(|gate| json!({
            "probes": gate.probes,
            "timeout_ms": gate.timeout.as_millis() as u64,
            "open": state.gate_is_open(),
        })),
        "lb_probes": {
            "unhealthy_threshold": threshold,
            "drained": threshold.and(state.drain_started()).map(|t| checkers.drained(now, t, threshold_or_default)),
            "checkers": checkers.status(now, state.drain_started(), threshold_or_default),
            "checkers_dropped": checkers.dropped,
        },
    })
}
