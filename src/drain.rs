//! Drain policy: how long the app keeps serving, not ready, before it gets the stop signal.
//! Either a fixed delay, or watched: until the evidence says load balancers have stopped sending
//! (see the watchers), never before `--drain-min` and never after `--drain-max`.

pub mod lb_probes;
pub mod traffic;

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};
use tracing::warn;

use self::traffic::{QuietPeriod, SharedTraffic};
use crate::checkers::Checkers;

/// How often a watched drain looks at its watchers.
const WATCH_TICK: Duration = Duration::from_millis(100);

/// A source of evidence that the drain is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Watcher {
    /// No new connection and no inbound bytes on the app's ports for the quiet period.
    Traffic,
    /// Every load balancer checking `/ready` has seen it fail, or stopped checking.
    LbProbes,
}

impl FromStr for Watcher {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.trim() {
            "traffic" => Ok(Watcher::Traffic),
            "lb-probes" => Ok(Watcher::LbProbes),
            other => Err(format!(
                "unknown drain watcher '{other}': use traffic, lb-probes or both, comma-separated"
            )),
        }
    }
}

impl fmt::Display for Watcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Watcher::Traffic => "traffic",
            Watcher::LbProbes => "lb-probes",
        })
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct WatchedDrain {
    pub watchers: Vec<Watcher>,
    pub min: Duration,
    pub max: Duration,
    pub quiet_period: QuietPeriod,
    pub lb_unhealthy_threshold: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DrainPolicy {
    /// Keep serving for a fixed time (`--drain-delay`).
    Fixed(Duration),
    Watched(WatchedDrain),
}

/// Why the drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The fixed drain delay elapsed.
    Delay,
    /// Every watcher reported drained.
    Watchers,
    /// Every watcher had reported drained before `--drain-min`: ended at the floor.
    Floor,
    /// `--drain-max` was reached first.
    Cap,
    /// SIGINT or SIGQUIT cut it short.
    Interrupted,
    /// The app was never ready: no load balancer can be sending it traffic.
    NeverReady,
}

impl EndReason {
    pub const ALL: [EndReason; 6] = [
        EndReason::Delay,
        EndReason::Watchers,
        EndReason::Floor,
        EndReason::Cap,
        EndReason::Interrupted,
        EndReason::NeverReady,
    ];

    /// The `reason` label of the drain metrics.
    pub fn label(self) -> &'static str {
        match self {
            EndReason::Delay => "delay",
            EndReason::Watchers => "watchers",
            EndReason::Floor => "floor",
            EndReason::Cap => "cap",
            EndReason::Interrupted => "interrupted",
            EndReason::NeverReady => "never_ready",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Delay => "drain delay elapsed",
            EndReason::Watchers => "watchers report drained",
            EndReason::Floor => "watchers drained before --drain-min: ended at the floor",
            EndReason::Cap => "--drain-max reached before the watchers reported drained",
            EndReason::Interrupted => "cut short by SIGINT or SIGQUIT",
            EndReason::NeverReady => "the app was never ready: no load balancer sends it traffic",
        }
    }
}

/// The end of a drain and the evidence behind it, logged as one line.
#[derive(Debug, Clone, PartialEq)]
pub struct DrainEnd {
    pub reason: EndReason,
    pub elapsed: Duration,
    pub report: Value,
}

/// What the watchers observe, shared with the probe server (which records load-balancer checks
/// and counts its own connections) and `/status`. Observed in every mode: with a fixed delay the
/// same evidence tells whether the delay was long enough.
#[derive(Debug, Clone)]
pub struct Observers {
    pub checkers: Arc<Mutex<Checkers>>,
    pub traffic: SharedTraffic,
    /// Connections the probe server accepted: not the app's traffic.
    pub own_accepts: Arc<AtomicU64>,
}

impl Observers {
    /// `app_ports` as given on the command line; empty means discover them.
    pub fn new(app_ports: Vec<u16>) -> Self {
        Self {
            checkers: Arc::default(),
            traffic: Arc::new(Mutex::new(traffic::Traffic::new(app_ports, Instant::now()))),
            own_accepts: Arc::default(),
        }
    }

    /// What was seen of load balancers and requests around the drain that began at `started`
    /// (times in ms since then).
    pub fn evidence(&self, started: Instant) -> Value {
        let since_start = |t: Option<Instant>| t.map(|t| signed_ms(t, started));
        let checkers = self.checkers();
        let traffic = traffic::lock(&self.traffic);
        json!({
            "load_balancers": checkers.load_balancer_count(started),
            "last_lb_probe_ms": since_start(checkers.last_load_balancer_probe()),
            "last_request_ms": since_start(traffic.last_activity),
            "last_new_connection_ms": since_start(traffic.last_new_connection),
            "open_connections": traffic.open_connections,
        })
    }

    pub fn checkers(&self) -> std::sync::MutexGuard<'_, Checkers> {
        crate::sync::lock(&self.checkers)
    }
}

impl DrainPolicy {
    /// The longest the drain can last: what the shutdown budget must make room for.
    pub fn longest(&self) -> Duration {
        match self {
            DrainPolicy::Fixed(delay) => *delay,
            DrainPolicy::Watched(watched) => watched.max,
        }
    }

    pub fn watches(&self, watcher: Watcher) -> bool {
        matches!(self, DrainPolicy::Watched(w) if w.watchers.contains(&watcher))
    }

    /// Resolves when the drain that began at `started` is over.
    pub async fn run(self, started: Instant, observers: Observers) -> DrainEnd {
        match self {
            DrainPolicy::Fixed(delay) => {
                tokio::time::sleep_until(started + delay).await;
                DrainEnd {
                    reason: EndReason::Delay,
                    elapsed: started.elapsed(),
                    report: observers.evidence(started),
                }
            }
            DrainPolicy::Watched(watched) => watched.run(started, observers).await,
        }
    }
}

impl WatchedDrain {
    pub fn watches_traffic(&self) -> bool {
        self.watchers.contains(&Watcher::Traffic)
    }

    async fn run(self, started: Instant, observers: Observers) -> DrainEnd {
        // Sized once, from the traffic before the drain: traffic during it is what is judged.
        let rate = traffic::lock(&observers.traffic).rate(started);
        let quiet = self.quiet_period.resolve(rate, self.max);
        let mut all_drained_since: Option<Instant> = None;
        let mut drained_at: Vec<(Watcher, Option<Duration>)> =
            self.watchers.iter().map(|w| (*w, None)).collect();
        let mut tick = tokio::time::interval_at(started, WATCH_TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let elapsed = now - started;
            let mut all = true;
            for (watcher, at) in &mut drained_at {
                let drained = self.is_drained(*watcher, &observers, quiet.0, started, now);
                // A watcher can change its mind (traffic came back): keep when it last became drained.
                *at = drained.then(|| at.unwrap_or(elapsed));
                all &= drained;
            }
            all_drained_since = all.then(|| all_drained_since.unwrap_or(now));
            if let Some(reason) = self.verdict(elapsed, all_drained_since.map(|t| t - started)) {
                let report = self.report(&observers, started, now, &quiet, &drained_at);
                // Requests during the drain, not merely too little traffic to size the period.
                let arrived_while_draining =
                    report["last_request_ms"].as_i64().is_some_and(|ms| ms >= 0);
                if reason == EndReason::Cap
                    && self.watches_traffic()
                    && !report["traffic_drained_ms"].is_u64()
                    && arrived_while_draining
                {
                    warn!(event = "traffic_never_quiet",
                        last_request_ms = %report["last_request_ms"],
                        open_connections = %report["open_connections"],
                        "traffic never went quiet: requests still arrive (a long-lived stream, or a load balancer still routing here); the drain ends at --drain-max"
                    );
                }
                return DrainEnd {
                    reason,
                    elapsed,
                    report,
                };
            }
        }
    }

    /// The evidence behind the end of a drain: see [`Observers::evidence`], plus this policy's
    /// bounds, the quiet period and when each watcher became drained (null: it never did).
    fn report(
        &self,
        observers: &Observers,
        started: Instant,
        now: Instant,
        quiet: &(Duration, String),
        drained_at: &[(Watcher, Option<Duration>)],
    ) -> Value {
        let mut report = observers.evidence(started);
        report["drain_min_ms"] = json!(self.min.as_millis() as u64);
        report["drain_max_ms"] = json!(self.max.as_millis() as u64);
        if self.watches_traffic() {
            report["quiet_period_ms"] = json!(quiet.0.as_millis() as u64);
            report["quiet_period_reason"] = json!(quiet.1);
        }
        if self.watchers.contains(&Watcher::LbProbes) {
            report["lb_checkers_pending"] = json!(observers.checkers().holding_the_drain(
                now,
                started,
                self.lb_unhealthy_threshold
            ));
        }
        for (watcher, at) in drained_at {
            let key = format!("{watcher}_drained_ms").replace('-', "_");
            report[key] = json!(at.map(|d| d.as_millis() as u64));
        }
        report
    }

    /// Whether the drain ends now, `elapsed` into it, with every watcher drained since
    /// `all_drained_at` (if they are).
    fn verdict(&self, elapsed: Duration, all_drained_at: Option<Duration>) -> Option<EndReason> {
        match all_drained_at {
            _ if elapsed >= self.max => Some(EndReason::Cap),
            Some(at) if elapsed >= self.min && at < self.min => Some(EndReason::Floor),
            Some(_) if elapsed >= self.min => Some(EndReason::Watchers),
            _ => None,
        }
    }

    fn is_drained(
        &self,
        watcher: Watcher,
        observers: &Observers,
        quiet: Duration,
        started: Instant,
        now: Instant,
    ) -> bool {
        match watcher {
            Watcher::Traffic => traffic::lock(&observers.traffic).quiet_for(started) >= quiet,
            Watcher::LbProbes => {
                observers
                    .checkers()
                    .drained(now, started, self.lb_unhealthy_threshold)
            }
        }
    }
}

/// Milliseconds from `origin` to `t`, negative when `t` came first.
fn signed_ms(t: Instant, origin: Instant) -> i64 {
    match t.checked_duration_since(origin) {
        Some(after) => after.as_millis() as i64,
        None => -((origin - t).as_millis() as i64),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    use crate::checkers::CheckerId;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn watched(watchers: &[Watcher], min: u64, max: u64) -> WatchedDrain {
        WatchedDrain {
            watchers: watchers.to_vec(),
            min: MS(min),
            max: MS(max),
            quiet_period: QuietPeriod::Fixed(MS(300)),
            lb_unhealthy_threshold: 2,
        }
    }

    #[test]
    fn watcher_names() {
        assert_eq!("traffic".parse(), Ok(Watcher::Traffic));
        assert_eq!(" lb-probes".parse(), Ok(Watcher::LbProbes));
        assert!(
            "endpoints"
                .parse::<Watcher>()
                .unwrap_err()
                .contains("use traffic, lb-probes")
        );
    }

    // Real time (the watchers use std's clock), generous bounds.

    #[tokio::test]
    async fn no_load_balancer_seen_ends_at_the_floor() {
        let started = Instant::now();
        let end = watched(&[Watcher::LbProbes], 300, 5000)
            .run(started, Observers::new(vec![]))
            .await;
        assert_eq!(end.reason, EndReason::Floor);
        assert!(
            end.elapsed >= MS(300) && end.elapsed < MS(1000),
            "{:?}",
            end.elapsed
        );
        assert!(
            end.report["lb_probes_drained_ms"].as_u64().unwrap() < 100,
            "drained from the start"
        );
    }

    #[tokio::test]
    async fn a_load_balancer_that_keeps_seeing_200s_is_capped() {
        let observers = Observers::new(vec![]);
        let lb = CheckerId {
            addr: IpAddr::from([10, 0, 0, 1]),
            agent: "HAProxy".into(),
        };
        let started = Instant::now();
        for before in [2000, 1000, 0] {
            let at = started - Duration::from_millis(before);
            observers.checkers().record(lb.clone(), at, true, false);
        }
        let end = watched(&[Watcher::LbProbes], 100, 500)
            .run(started, observers)
            .await;
        assert_eq!(end.reason, EndReason::Cap);
        assert!(
            end.elapsed >= MS(500) && end.elapsed < MS(1200),
            "{:?}",
            end.elapsed
        );
        assert_eq!(end.report["lb_probes_drained_ms"], Value::Null);
        assert_eq!(end.report["load_balancers"], 1);
    }

    #[tokio::test]
    async fn traffic_ends_the_drain_a_quiet_period_after_the_last_request() {
        let started = Instant::now();
        let observers = Observers::new(vec![8080]);
        let traffic = observers.traffic.clone();
        let feeder = tokio::spawn(async move {
            // Requests keep arriving for 1 s, then stop; the counter is read on.
            for i in 0..=40u64 {
                let observation = traffic::Observation {
                    passive_opens: Some(i.min(10)),
                    ..Default::default()
                };
                traffic::lock(&traffic).observe(observation, Instant::now());
                tokio::time::sleep(MS(100)).await;
            }
        });
        let end = watched(&[Watcher::Traffic], 500, 10_000)
            .run(started, observers)
            .await;
        feeder.abort();
        assert_eq!(end.reason, EndReason::Watchers);
        assert!(
            end.elapsed >= MS(1300) && end.elapsed <= MS(2000),
            "{:?}",
            end.elapsed
        );
        assert_eq!(end.report["quiet_period_ms"], 300);
        let last = end.report["last_request_ms"].as_i64().unwrap();
        assert!((900..=1500).contains(&last), "{last}");
    }
}
