//! Drain policy: how long the app keeps serving, not ready, before it gets the stop signal.
//! Either a fixed delay, or watched: until the evidence says load balancers have stopped sending
//! (see the watchers), never before `--drain-min` and never after `--drain-max`.

pub mod arrivals;
pub mod evidence;
pub mod lb_probes;
pub mod sampling;
pub mod traffic;
pub mod view;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use tracing::warn;

use crate::lifecycle::State;

use self::evidence::{DrainedAt, Judged, LastRequestSource, Quiet, Seen};
use self::traffic::{QuietPeriod, SharedTraffic};
use self::view::{DrainView, LbVerdict, PolicyView, TrafficVerdict};
use crate::checkers::Checkers;

pub use self::evidence::{Evidence, Watcher};

/// How often a watched drain looks at its watchers.
const WATCH_TICK: Duration = Duration::from_millis(50);
/// How often, before the drain, what it would be judged on is published again (the auto quiet
/// period follows the traffic).
const PREVIEW_EVERY: Duration = Duration::from_secs(1);
/// `--lb-unhealthy-threshold` when not given; load-balancer checkers are shown against it when
/// the drain does not watch them.
pub const DEFAULT_LB_UNHEALTHY_THRESHOLD: u32 = 2;

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
    pub evidence: Evidence,
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
    /// What the drain decided, or would be judged on before it starts.
    view: Arc<watch::Sender<DrainView>>,
}

impl Observers {
    /// `app_ports` as given on the command line; empty means discover them.
    pub fn new(app_ports: Vec<u16>, policy: &DrainPolicy) -> Self {
        let now = Instant::now();
        let traffic = traffic::Traffic::new(app_ports, now);
        let view = policy.view(policy.quiet_period(&traffic, now), None);
        Self {
            checkers: Arc::default(),
            traffic: Arc::new(Mutex::new(traffic)),
            own_accepts: Arc::default(),
            view: Arc::new(watch::Sender::new(view)),
        }
    }

    /// The end, now, of the drain that began at `started`, for `reason`, with what was seen (no
    /// watcher's verdict: a fixed delay, a drain cut short, a drain with nothing to wait for).
    pub fn end_now(&self, reason: EndReason, started: Instant) -> DrainEnd {
        DrainEnd {
            reason,
            elapsed: started.elapsed(),
            evidence: self.evidence(started),
        }
    }

    /// What was seen of load balancers and requests around the drain that began at `started`.
    pub fn evidence(&self, started: Instant) -> Evidence {
        Evidence {
            seen: self.seen(started),
            judged: None,
        }
    }

    fn seen(&self, started: Instant) -> Seen {
        let since_start = |t: Option<Instant>| t.map(|t| signed_ms(t, started));
        let checkers = self.checkers();
        let traffic = traffic::lock(&self.traffic);
        Seen {
            load_balancers: checkers.load_balancer_count(started),
            last_lb_probe_ms: since_start(checkers.last_load_balancer_probe()),
            last_request_ms: since_start(traffic.last_activity),
            last_new_connection_ms: since_start(traffic.last_new_connection),
            open_connections: traffic.open_connections,
            last_app_arrival_ms: since_start(traffic.last_app_arrival),
            last_request_measured_by: traffic.last_activity.map(|last| {
                if traffic.last_app_arrival == Some(last) {
                    LastRequestSource::SocketAges
                } else {
                    LastRequestSource::Readings
                }
            }),
            unattributed_connections: traffic.unattributed_connections,
        }
    }

    pub fn checkers(&self) -> std::sync::MutexGuard<'_, Checkers> {
        crate::sync::lock(&self.checkers)
    }

    /// What the drain decided (or would be judged on), for `/status`.
    pub fn drain_view(&self) -> watch::Receiver<DrainView> {
        self.view.subscribe()
    }

    fn publish(&self, view: DrainView) {
        self.view.send_replace(view);
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
                observers.end_now(EndReason::Delay, started)
            }
            DrainPolicy::Watched(watched) => watched.run(started, observers).await,
        }
    }

    /// The quiet period a drain starting at `at` would use.
    fn quiet_period(&self, traffic: &traffic::Traffic, at: Instant) -> Option<Quiet> {
        match self {
            DrainPolicy::Fixed(_) => None,
            DrainPolicy::Watched(watched) => watched.quiet_period(traffic, at),
        }
    }

    /// What `/status` shows of this policy: the quiet period it uses and, once the drain has
    /// started, each watcher's verdict.
    fn view(&self, quiet: Option<Quiet>, drained: Option<&DrainedAt>) -> DrainView {
        match self {
            DrainPolicy::Fixed(delay) => DrainView {
                policy: PolicyView::Fixed { delay: *delay },
                traffic: TrafficVerdict::default(),
                lb_probes: LbVerdict {
                    unhealthy_threshold: None,
                    drained: None,
                    states_against: DEFAULT_LB_UNHEALTHY_THRESHOLD,
                },
            },
            DrainPolicy::Watched(watched) => watched.view(quiet, drained),
        }
    }

    /// Until a drain starts, publishes what it would be judged on: the auto quiet period follows
    /// the traffic so far. The drain publishes its own verdicts from then on.
    pub async fn preview(self, observers: Observers, mut state: watch::Receiver<State>) {
        loop {
            if state.borrow_and_update().drain_has_started() {
                return;
            }
            let now = Instant::now();
            let quiet = self.quiet_period(&traffic::lock(&observers.traffic), now);
            observers.publish(self.view(quiet, None));
            if let Ok(Err(_)) = tokio::time::timeout(PREVIEW_EVERY, state.changed()).await {
                return;
            }
        }
    }
}

impl WatchedDrain {
    pub fn watches_traffic(&self) -> bool {
        self.watchers.contains(&Watcher::Traffic)
    }

    fn watches_lb_probes(&self) -> bool {
        self.watchers.contains(&Watcher::LbProbes)
    }

    /// Sized from the traffic before `at`, with the `traffic` watcher.
    fn quiet_period(&self, traffic: &traffic::Traffic, at: Instant) -> Option<Quiet> {
        self.watches_traffic()
            .then(|| self.quiet_period.resolve(traffic.rate(at), self.max))
    }

    fn view(&self, quiet: Option<Quiet>, drained: Option<&DrainedAt>) -> DrainView {
        let verdict = |watcher| drained.and_then(|d| d.verdict(watcher));
        let unhealthy_threshold = self
            .watches_lb_probes()
            .then_some(self.lb_unhealthy_threshold);
        DrainView {
            policy: PolicyView::Watched {
                watch: self.watchers.clone(),
                min: self.min,
                max: self.max,
            },
            traffic: TrafficVerdict {
                quiet,
                drained: verdict(Watcher::Traffic),
            },
            lb_probes: LbVerdict {
                unhealthy_threshold,
                drained: verdict(Watcher::LbProbes),
                states_against: unhealthy_threshold.unwrap_or(DEFAULT_LB_UNHEALTHY_THRESHOLD),
            },
        }
    }

    async fn run(self, started: Instant, observers: Observers) -> DrainEnd {
        // Sized once, from the traffic before the drain: traffic during it is what is judged.
        let quiet = self.quiet_period(&traffic::lock(&observers.traffic), started);
        let quiet_for = quiet.as_ref().map_or(Duration::ZERO, |q| q.period);
        let mut drained = DrainedAt::new(&self.watchers);
        let mut all_drained_since: Option<Instant> = None;
        let mut tick = tokio::time::interval_at(started, WATCH_TICK);
        loop {
            tick.tick().await;
            let now = Instant::now();
            let elapsed = now - started;
            let all = drained.update(elapsed, |watcher| {
                self.is_drained(watcher, &observers, quiet_for, started, now)
            });
            all_drained_since = all.then(|| all_drained_since.unwrap_or(now));
            observers.publish(self.view(quiet.clone(), Some(&drained)));
            if let Some(reason) = self.verdict(elapsed, all_drained_since.map(|t| t - started)) {
                let seen = observers.seen(started);
                let mut judged = self.judged(&observers, started, now, quiet, drained);
                if matches!(reason, EndReason::Watchers | EndReason::Floor) {
                    judged.margin_ms = seen
                        .last_request_ms
                        .map(|last| elapsed.as_millis() as i64 - last);
                }
                let evidence = Evidence {
                    seen,
                    judged: Some(judged),
                };
                self.warn_if_never_quiet(reason, &evidence);
                return DrainEnd {
                    reason,
                    elapsed,
                    evidence,
                };
            }
        }
    }

    /// A drain capped while requests kept arriving: say so, the cap is no proof of a drain.
    fn warn_if_never_quiet(&self, reason: EndReason, evidence: &Evidence) {
        if reason == EndReason::Cap
            && self.watches_traffic()
            && !evidence.drained(Watcher::Traffic)
            && evidence.seen.requests_while_draining()
        {
            warn!(
                event = "traffic_never_quiet",
                // Rendered as before the evidence was typed: the log's fields keep their shape.
                last_request_ms = %serde_json::json!(evidence.seen.last_request_ms),
                open_connections = %evidence.seen.open_connections,
                "traffic never went quiet: requests still arrive (a long-lived stream, or a load balancer still routing here); the drain ends at --drain-max"
            );
        }
    }

    /// What this drain was judged on, as of `now`.
    fn judged(
        &self,
        observers: &Observers,
        started: Instant,
        now: Instant,
        quiet: Option<Quiet>,
        drained: DrainedAt,
    ) -> Judged {
        Judged {
            min: self.min,
            max: self.max,
            quiet,
            pending_checkers: self.watches_lb_probes().then(|| {
                observers
                    .checkers()
                    .holding_the_drain(now, started, self.lb_unhealthy_threshold)
            }),
            drained,
            margin_ms: None,
        }
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
            lb_unhealthy_threshold: 3,
        }
    }

    fn observers(policy: &WatchedDrain) -> Observers {
        Observers::new(vec![8080], &DrainPolicy::Watched(policy.clone()))
    }

    fn judged(end: &DrainEnd) -> &Judged {
        end.evidence
            .judged
            .as_ref()
            .expect("a watched drain's verdict")
    }

    /// A load balancer checking `/ready` every second until the drain, answered 200.
    fn load_balancer_until(observers: &Observers, started: Instant) {
        let lb = CheckerId {
            addr: IpAddr::from([10, 0, 0, 1]),
            agent: "HAProxy".into(),
        };
        for before in [2000, 1000, 0] {
            let at = started - MS(before);
            observers.checkers().record(lb.clone(), at, true, false);
        }
    }

    // On tokio's paused clock: the drain's timeline is exact, in no real time.

    #[tokio::test(start_paused = true)]
    async fn no_load_balancer_seen_ends_at_the_floor() {
        let started = Instant::now();
        let policy = watched(&[Watcher::LbProbes], 300, 5000);
        let end = policy.clone().run(started, observers(&policy)).await;
        assert_eq!(end.reason, EndReason::Floor);
        assert_eq!(end.elapsed, MS(300));
        assert_eq!(Instant::now() - started, MS(300));
        assert_eq!(
            judged(&end).drained.since(Watcher::LbProbes),
            Some(Duration::ZERO),
            "drained from the start"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_load_balancer_that_keeps_seeing_200s_is_capped() {
        let policy = watched(&[Watcher::LbProbes], 100, 500);
        let observers = observers(&policy);
        let started = Instant::now();
        load_balancer_until(&observers, started);
        let end = policy.run(started, observers.clone()).await;
        assert_eq!(end.reason, EndReason::Cap);
        assert_eq!(end.elapsed, MS(500));
        assert!(!end.evidence.drained(Watcher::LbProbes));
        assert_eq!(end.evidence.seen.load_balancers, 1);
        assert_eq!(end.evidence.seen.last_lb_probe_ms, Some(0));
        assert_eq!(
            judged(&end).pending_checkers,
            Some(vec!["10.0.0.1 HAProxy".to_owned()])
        );
        let view = observers.drain_view().borrow().clone();
        assert_eq!(view.lb_probes.drained, Some(false));
        assert_eq!(view.lb_probes.unhealthy_threshold, Some(3));
    }

    /// Samples the traffic counter every 100 ms, 50 ms off the drain's ticks, as the watcher
    /// does: one new connection a sample until `busy_until`, then none.
    async fn simulated_sampler(traffic: SharedTraffic, started: Instant, busy_until: Duration) {
        let mut sample = tokio::time::interval_at(started + MS(50), MS(100));
        let mut opens = 0;
        loop {
            let at = sample.tick().await;
            if at - started <= busy_until {
                opens += 1;
            }
            let observation = traffic::Observation {
                passive_opens: Some(opens),
                ..Default::default()
            };
            traffic::lock(&traffic).observe(observation, at);
        }
    }

    /// A drain watching traffic (300 ms quiet period) that arrives until `busy_until`.
    async fn traffic_drain(min: u64, max: u64, busy_until: Duration) -> (DrainEnd, Observers) {
        let started = Instant::now();
        let policy = watched(&[Watcher::Traffic], min, max);
        let observers = observers(&policy);
        let traffic = observers.traffic.clone();
        let sampler = tokio::spawn(simulated_sampler(traffic, started, busy_until));
        let end = policy.run(started, observers.clone()).await;
        sampler.abort();
        assert_eq!(Instant::now() - started, end.elapsed);
        (end, observers)
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_ends_the_drain_a_quiet_period_after_the_last_request() {
        let (end, observers) = traffic_drain(500, 10_000, MS(1050)).await;
        assert_eq!(end.reason, EndReason::Watchers);
        // The last request seen at 1,050 ms; quiet vouched for up to the 1,350 ms sample: the
        // 1,400 ms tick ends it.
        assert_eq!(end.evidence.seen.last_request_ms, Some(1050));
        assert_eq!(end.elapsed, MS(1400));
        let judged = judged(&end);
        assert_eq!(judged.quiet.as_ref().unwrap().period, MS(300));
        assert_eq!(judged.drained.since(Watcher::Traffic), Some(MS(1400)));
        let view = observers.drain_view().borrow().clone();
        assert_eq!(view.traffic.drained, Some(true));
        assert_eq!(view.traffic.quiet.unwrap().period, MS(300));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_quiet_before_the_floor_ends_at_the_floor() {
        let (end, _) = traffic_drain(2000, 10_000, MS(150)).await;
        assert_eq!(end.reason, EndReason::Floor);
        assert_eq!(end.elapsed, MS(2000));
        assert_eq!(judged(&end).drained.since(Watcher::Traffic), Some(MS(500)));
    }

    #[tokio::test(start_paused = true)]
    async fn traffic_that_never_stops_is_capped() {
        let (end, _) = traffic_drain(0, 3000, Duration::MAX).await;
        assert_eq!(end.reason, EndReason::Cap);
        assert_eq!(end.elapsed, MS(3000));
        assert!(!end.evidence.drained(Watcher::Traffic));
        assert!(end.evidence.seen.requests_while_draining());
        assert_eq!(end.evidence.seen.last_request_ms, Some(2950));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fixed_delay_ends_at_the_delay_with_what_was_seen() {
        let policy = DrainPolicy::Fixed(MS(1500));
        let observers = Observers::new(vec![], &policy);
        let started = Instant::now();
        load_balancer_until(&observers, started);
        let end = policy.run(started, observers).await;
        assert_eq!(end.reason, EndReason::Delay);
        assert_eq!(end.elapsed, MS(1500));
        assert_eq!(end.evidence.judged, None);
        assert_eq!(end.evidence.seen.load_balancers, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_drain_the_view_shows_what_it_would_be_judged_on() {
        let policy = DrainPolicy::Watched(WatchedDrain {
            quiet_period: QuietPeriod::Auto,
            ..watched(&[Watcher::Traffic], 1000, 30_000)
        });
        let observers = Observers::new(vec![8080], &policy);
        let view = observers.drain_view().borrow().clone();
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            serde_json::json!({
                "policy": {"watch": ["traffic"], "min_ms": 1000, "max_ms": 30_000},
                "traffic": {
                    "quiet_period_ms": 30_000,
                    "quiet_period_reason": "auto: too little traffic before the drain to measure, using --drain-max",
                    "arrival_rate_per_s": null,
                    "arrival_rate_measured_by": null,
                },
                "lb_probes": {"unhealthy_threshold": null, "drained": null},
            })
        );
        assert_eq!(
            view.lb_probes.states_against, DEFAULT_LB_UNHEALTHY_THRESHOLD,
            "checkers are still shown against the default"
        );
        // Traffic arrives before any drain: the published quiet period follows it.
        let (lifecycle, state) = watch::channel(State::Ready {
            since: Instant::now(),
            gate: crate::lifecycle::Gate::Open,
        });
        tokio::spawn(policy.preview(observers.clone(), state));
        let opens = |n| traffic::Observation {
            passive_opens: Some(n),
            ..Default::default()
        };
        traffic::lock(&observers.traffic).observe(opens(0), Instant::now());
        tokio::time::advance(MS(10_000)).await;
        traffic::lock(&observers.traffic).observe(opens(30), Instant::now());
        let mut views = observers.drain_view();
        let view = views
            .wait_for(|v| v.traffic.quiet.as_ref().unwrap().period < MS(30_000))
            .await
            .unwrap()
            .clone();
        let quiet = view.traffic.quiet.unwrap();
        assert!(
            quiet
                .reason
                .contains("arrivals/s before the drain (arrival_count)"),
            "{quiet:?}"
        );
        assert_eq!(
            quiet.rate_measured_by,
            Some(arrivals::RateSource::ArrivalCount)
        );
        drop(lifecycle);
    }

    #[test]
    fn a_fixed_delay_shows_no_verdicts() {
        let policy = DrainPolicy::Fixed(MS(5000));
        let view = policy.view(None, None);
        assert_eq!(
            serde_json::to_value(&view).unwrap(),
            serde_json::json!({
                "policy": {"fixed_delay_ms": 5000},
                "traffic": {
                    "quiet_period_ms": null,
                    "quiet_period_reason": null,
                    "arrival_rate_per_s": null,
                    "arrival_rate_measured_by": null,
                },
                "lb_probes": {"unhealthy_threshold": null, "drained": null},
            })
        );
    }
}
