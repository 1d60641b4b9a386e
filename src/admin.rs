//! The admin endpoints, for operators: `GET /status`, what drainit sees and decided as JSON (and
//! for tuning drains), and `GET /metrics` for Prometheus. They render what others publish; the
//! probe server accepts their requests and hands them here.

use std::sync::Arc;

use tokio::time::Instant;

use serde::Serialize;
use serde_json::{Value, json};

use crate::drain::{Observers, traffic};
use crate::gate::StartupGate;
use crate::lifecycle::State;
use crate::metrics::{self, Metrics};
use crate::readiness::{self, ReadinessConfig, SharedCheckLog};

/// What the admin endpoints render besides the lifecycle and the observers: fixed at start-up,
/// or shared state they read.
#[derive(Debug)]
pub struct Context {
    pub started: Instant,
    /// `None` for a sidecar, whose app is another container.
    pub app_pid: Option<i32>,
    pub readiness: ReadinessConfig,
    pub check_log: SharedCheckLog,
    pub startup_gate: Option<StartupGate>,
    pub metrics: Arc<Metrics>,
}

/// One admin page, ready to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub content_type: &'static str,
    pub body: String,
}

/// The page at `path`, or `None` when `path` is not an admin endpoint.
pub fn page(path: &str, state: State, observers: &Observers, context: &Context) -> Option<Page> {
    match path {
        "/status" => Some(Page {
            content_type: "application/json",
            body: render(state, observers, context).to_string() + "\n",
        }),
        "/metrics" => Some(Page {
            content_type: metrics::CONTENT_TYPE,
            body: context.metrics.render(),
        }),
        _ => None,
    }
}

/// `/status`: the live state of drainit, its app check and its watchers.
pub fn render(state: State, observers: &Observers, context: &Context) -> Value {
    let now = Instant::now();
    let view = observers.drain_view().borrow().clone();
    let checkers = observers.checkers();
    let traffic = traffic::lock(&observers.traffic);
    json!({
        "phase": state.kind().label(),
        "uptime_ms": context.started.elapsed().as_millis() as u64,
        "app_pid": context.app_pid,
        "drain_elapsed_ms": state.drain_started().map(|t| t.elapsed().as_millis() as u64),
        "drain_policy": view.policy,
        "traffic": merged(traffic.status(now), &view.traffic),
        "app_check": readiness::lock(&context.check_log).status(&context.readiness, now),
        "startup_gate": context.startup_gate.map(|gate| json!({
            "probes": gate.probes,
            "timeout_ms": gate.timeout.as_millis() as u64,
            "open": state.gate_is_open(),
        })),
        "lb_probes": {
            "unhealthy_threshold": view.lb_probes.unhealthy_threshold,
            "drained": view.lb_probes.drained,
            "checkers": checkers.status(now, state.drain_started(), view.lb_probes.states_against),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::drain::DrainPolicy;
    use crate::lifecycle::{DrainTrigger, Gate, Mode, Shutdown};

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn context() -> Context {
        Context {
            started: Instant::now(),
            app_pid: Some(42),
            readiness: ReadinessConfig {
                check: None,
                interval: MS(1000),
                timeout: MS(1000),
                min_ready: Duration::ZERO,
            },
            check_log: SharedCheckLog::default(),
            startup_gate: Some(StartupGate {
                probes: 2,
                timeout: MS(60_000),
            }),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn draining_since(since: Instant) -> State {
        State::Draining {
            trigger: DrainTrigger::Sigterm,
            shutdown: Shutdown {
                drain_started: since,
                kill_at: None,
                gate: Gate::Open,
                mode: Mode::Wrapper,
            },
            stop_when_over: false,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn status_renders_the_published_state_on_tokios_clock() {
        let (context, observers) = (
            context(),
            Observers::new(vec![], &DrainPolicy::Fixed(MS(5000))),
        );
        tokio::time::advance(MS(1500)).await;
        let state = draining_since(Instant::now());
        tokio::time::advance(MS(700)).await;
        let page = page("/status", state, &observers, &context).unwrap();
        assert_eq!(page.content_type, "application/json");
        let status: Value = serde_json::from_str(&page.body).unwrap();
        assert_eq!(status["phase"], "draining");
        assert_eq!(status["app_pid"], 42);
        assert_eq!(status["uptime_ms"], 2200);
        assert_eq!(status["drain_elapsed_ms"], 700);
        assert_eq!(status["drain_policy"]["fixed_delay_ms"], 5000);
        assert_eq!(status["startup_gate"]["open"], true);
        assert_eq!(status["lb_probes"]["drained"], Value::Null, "a fixed delay");
    }

    #[test]
    fn metrics_are_an_admin_page_probes_are_not() {
        let (context, observers) = (
            context(),
            Observers::new(vec![], &DrainPolicy::Fixed(MS(5000))),
        );
        let state = draining_since(Instant::now());
        let metrics = page("/metrics", state, &observers, &context).unwrap();
        assert_eq!(metrics.content_type, metrics::CONTENT_TYPE);
        assert!(metrics.body.ends_with("# EOF\n"), "{}", metrics.body);
        for probe in ["/alive", "/ready", "/", "/status/"] {
            assert_eq!(page(probe, state, &observers, &context), None, "{probe}");
        }
    }
}
