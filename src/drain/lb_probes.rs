//! The `lb-probes` watcher: the load balancers' own health checks of `/ready`, one record per
//! checker. Once every load balancer that was checking has seen enough 503s to take the pod out
//! of rotation (or has stopped checking), it no longer sends traffic here.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// The kubelet's User-Agent: its probes decide the pod's Ready condition, not a load balancer's
/// rotation, so it is tracked apart and never waited for.
pub const KUBELET_AGENT: &str = "kube-probe/";
/// A checker silent for this long before the drain began is gone, not waited for.
const RECENT: Duration = Duration::from_secs(60);
/// A checker whose gap since its last probe exceeds this many of its intervals has stopped
/// checking (twice, not once: real checkers jitter).
const STOPPED_AFTER_INTERVALS: u32 = 2;
/// A client that probed once and not again for this long is not a health checker (a one-off
/// script), and neither holds a drain nor the start-up gate: twice the longest common interval
/// (AWS ALB/NLB check every 30 s by default).
const ONE_OFF_AFTER: Duration = Duration::from_secs(60);
/// User-Agents of tools people and scripts use, never of a load balancer: their requests do not
/// make a checker (a `curl` of /ready while debugging, a monitoring script).
const TOOL_AGENTS: [&str; 7] = [
    "curl/",
    "Wget/",
    "Mozilla/",
    "python-requests/",
    "Python-urllib/",
    "HTTPie/",
    "PostmanRuntime/",
];

/// One health checker: a source address and the User-Agent it sends (HAProxy and some LBs send
/// none; several LB nodes each check from their own address).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CheckerId {
    pub addr: IpAddr,
    pub agent: String,
}

impl CheckerId {
    pub fn is_kubelet(&self) -> bool {
        is_kubelet(&self.agent)
    }

    pub fn is_tool(&self) -> bool {
        is_tool(&self.agent)
    }

    pub fn may_be_load_balancer(&self) -> bool {
        may_be_load_balancer(&self.agent)
    }
}

pub fn is_kubelet(agent: &str) -> bool {
    agent.starts_with(KUBELET_AGENT)
}

pub fn is_tool(agent: &str) -> bool {
    TOOL_AGENTS.iter().any(|tool| agent.starts_with(tool))
}

/// A client that might be routing traffic here: not the kubelet, not a tool.
pub fn may_be_load_balancer(agent: &str) -> bool {
    !is_kubelet(agent) && !is_tool(agent)
}

#[derive(Debug, Clone)]
struct Checker {
    last_seen: Instant,
    probes: u64,
    /// Smoothed gap between its probes, once it has probed twice.
    interval: Option<Duration>,
    /// Consecutive 503s it received since the drain began.
    failures_since_drain: u32,
    /// Consecutive 200s it received (the start-up gate waits for these).
    successes: u32,
}

/// Where one load balancer stands in the drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckerState {
    /// Still checking and has not seen enough 503s.
    Pending,
    /// Has seen the threshold of consecutive 503s.
    SawUnhealthy,
    /// Stopped checking (silent for more than twice its interval).
    Stopped,
}

/// Every checker seen on `/ready`.
#[derive(Debug, Default)]
pub struct Checkers {
    checkers: HashMap<CheckerId, Checker>,
}

impl Checkers {
    /// Records one `/ready` probe and its answer; `draining` tells whether 503s count yet.
    pub fn record(&mut self, id: CheckerId, at: Instant, ready: bool, draining: bool) {
        let checker = self.checkers.entry(id).or_insert(Checker {
            last_seen: at,
            probes: 0,
            interval: None,
            failures_since_drain: 0,
            successes: 0,
        });
        if checker.probes > 0 {
            let gap = at.saturating_duration_since(checker.last_seen);
            checker.interval = Some(match checker.interval {
                // An exponential average follows a changed interval within a few probes.
                Some(interval) => (interval * 3 + gap) / 4,
                None => gap,
            });
        }
        checker.probes += 1;
        checker.last_seen = at;
        checker.successes = if ready { checker.successes + 1 } else { 0 };
        checker.failures_since_drain = match (ready, draining) {
            (false, true) => checker.failures_since_drain + 1,
            _ => 0,
        };
    }

    fn state(checker: &Checker, now: Instant, threshold: u32) -> CheckerState {
        if checker.failures_since_drain >= threshold {
            return CheckerState::SawUnhealthy;
        }
        let silent = now.saturating_duration_since(checker.last_seen);
        match checker.interval {
            Some(interval) if silent > interval * STOPPED_AFTER_INTERVALS => CheckerState::Stopped,
            None if silent > ONE_OFF_AFTER => CheckerState::Stopped,
            _ => CheckerState::Pending,
        }
    }

    fn is_one_off(checker: &Checker, now: Instant) -> bool {
        checker.probes == 1 && now.saturating_duration_since(checker.last_seen) > ONE_OFF_AFTER
    }

    /// The load balancers (not the kubelet) that were checking around the drain.
    fn load_balancers(
        &self,
        drain_started: Instant,
    ) -> impl Iterator<Item = (&CheckerId, &Checker)> {
        self.checkers.iter().filter(move |(id, checker)| {
            id.may_be_load_balancer() && checker.last_seen + RECENT >= drain_started
        })
    }

    /// Drained when no load balancer is still pending. With none seen at all, there is nothing
    /// to wait for.
    pub fn drained(&self, now: Instant, drain_started: Instant, threshold: u32) -> bool {
        self.load_balancers(drain_started)
            .all(|(_, c)| Self::state(c, now, threshold) != CheckerState::Pending)
    }

    /// Start-up: whether load balancers have taken the pod into rotation, as of `now`: at least
    /// one is checking, and every one seen in the last minute has had `needed` consecutive 200s.
    pub fn all_healthy(&self, now: Instant, needed: u32) -> bool {
        let mut recent = self
            .load_balancers(now)
            .filter(|(_, c)| !Self::is_one_off(c, now))
            .peekable();
        recent.peek().is_some() && recent.all(|(_, c)| c.successes >= needed)
    }

    /// The load balancers still holding the drain, as `address User-Agent`, for the log.
    pub fn holding_the_drain(
        &self,
        now: Instant,
        drain_started: Instant,
        threshold: u32,
    ) -> Vec<String> {
        self.named(
            self.load_balancers(drain_started)
                .filter(|(_, c)| Self::state(c, now, threshold) == CheckerState::Pending),
        )
    }

    /// The load balancers still holding the start-up gate, for the log.
    pub fn holding_the_gate(&self, now: Instant, needed: u32) -> Vec<String> {
        self.named(
            self.load_balancers(now)
                .filter(|(_, c)| !Self::is_one_off(c, now) && c.successes < needed),
        )
    }

    fn named<'a>(
        &self,
        checkers: impl Iterator<Item = (&'a CheckerId, &'a Checker)>,
    ) -> Vec<String> {
        let mut names: Vec<String> = checkers
            .map(|(id, _)| format!("{} {}", id.addr, id.agent).trim_end().to_owned())
            .collect();
        names.sort();
        names
    }

    /// How many load balancers were checking around the drain.
    pub fn load_balancer_count(&self, drain_started: Instant) -> usize {
        self.load_balancers(drain_started).count()
    }

    /// The last probe from any load balancer.
    pub fn last_load_balancer_probe(&self) -> Option<Instant> {
        self.checkers
            .iter()
            .filter(|(id, _)| id.may_be_load_balancer())
            .map(|(_, c)| c.last_seen)
            .max()
    }

    /// Every checker, for `/status`.
    pub fn status(&self, now: Instant, drain_started: Option<Instant>, threshold: u32) -> Value {
        let mut list: Vec<Value> = self
            .checkers
            .iter()
            .map(|(id, c)| {
                let state = match drain_started {
                    Some(_) if id.is_kubelet() => "kubelet",
                    Some(_) if id.is_tool() => "tool",
                    Some(_) => match Self::state(c, now, threshold) {
                        CheckerState::Pending => "pending",
                        CheckerState::SawUnhealthy => "saw-unhealthy",
                        CheckerState::Stopped => "stopped",
                    },
                    None => "checking",
                };
                json!({
                    "addr": id.addr.to_string(),
                    "user_agent": id.agent,
                    "kubelet": id.is_kubelet(),
                    "probes": c.probes,
                    "interval_ms": c.interval.map(|i| i.as_millis() as u64),
                    "last_seen_ms_ago": now.saturating_duration_since(c.last_seen).as_millis() as u64,
                    "failures_since_drain": c.failures_since_drain,
                    "consecutive_ready": c.successes,
                    "state": state,
                })
            })
            .collect();
        list.sort_by_key(|v| (v["addr"].to_string(), v["user_agent"].to_string()));
        Value::Array(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn id(addr: &str, agent: &str) -> CheckerId {
        CheckerId {
            addr: addr.parse().unwrap(),
            agent: agent.into(),
        }
    }

    /// Probes from `checker` every `every` from `from`, `n` times, answered `ready` before
    /// `drain` and 503 after it.
    fn probe(
        checkers: &mut Checkers,
        checker: &CheckerId,
        from: Instant,
        every: Duration,
        n: u32,
        drain: Instant,
    ) {
        for i in 0..n {
            let at = from + every * i;
            checkers.record(checker.clone(), at, at < drain, at >= drain);
        }
    }

    #[test]
    fn drained_once_every_load_balancer_saw_the_threshold_of_503s() {
        let t0 = Instant::now();
        let drain = t0 + MS(5000);
        let (alb_a, alb_b) = (
            id("10.0.0.1", "ELB-HealthChecker/2.0"),
            id("10.0.0.2", "ELB-HealthChecker/2.0"),
        );
        let mut checkers = Checkers::default();
        // a checks every 1 s and has seen two 503s by 6.0 s; b checks every 2 s, one 503 at 6.0 s.
        probe(&mut checkers, &alb_a, t0, MS(1000), 7, drain);
        probe(&mut checkers, &alb_b, t0, MS(2000), 4, drain);
        assert_eq!(checkers.load_balancer_count(drain), 2);
        assert!(
            !checkers.drained(t0 + MS(6100), drain, 2),
            "b has seen only one 503"
        );
        checkers.record(alb_b.clone(), t0 + MS(8000), false, true);
        assert!(checkers.drained(t0 + MS(8100), drain, 2));
        assert!(
            !checkers.drained(t0 + MS(8100), drain, 3),
            "threshold 3 needs a third 503 from each"
        );
    }

    #[test]
    fn a_ready_answer_resets_the_count() {
        let t0 = Instant::now();
        let lb = id("10.0.0.1", "HAProxy");
        let mut checkers = Checkers::default();
        checkers.record(lb.clone(), t0, false, true);
        checkers.record(lb.clone(), t0 + MS(500), true, true);
        checkers.record(lb.clone(), t0 + MS(1000), false, true);
        assert!(!checkers.drained(t0 + MS(1100), t0, 2));
    }

    #[test]
    fn a_checker_that_stopped_checking_is_drained() {
        let t0 = Instant::now();
        let lb = id("10.0.0.9", "");
        let mut checkers = Checkers::default();
        probe(&mut checkers, &lb, t0, MS(500), 10, t0 + MS(10_000));
        let last = t0 + MS(4500);
        assert!(
            !checkers.drained(last + MS(900), t0 + MS(4600), 2),
            "within twice its interval"
        );
        assert!(
            checkers.drained(last + MS(1100), t0 + MS(4600), 2),
            "silent for over twice its interval"
        );
    }

    #[test]
    fn the_kubelet_is_tracked_apart_and_never_waited_for() {
        let t0 = Instant::now();
        let mut checkers = Checkers::default();
        probe(
            &mut checkers,
            &id("10.0.0.5", "kube-probe/1.31"),
            t0,
            MS(1000),
            20,
            t0 + MS(5000),
        );
        assert_eq!(checkers.load_balancer_count(t0 + MS(5000)), 0);
        assert!(checkers.drained(t0 + MS(5001), t0 + MS(5000), 2));
        assert_eq!(checkers.last_load_balancer_probe(), None);
        let status = checkers.status(t0 + MS(6000), Some(t0 + MS(5000)), 2);
        assert_eq!(status[0]["state"], "kubelet");
    }

    #[test]
    fn a_checker_gone_long_before_the_drain_is_not_waited_for() {
        let t0 = Instant::now();
        let mut checkers = Checkers::default();
        probe(
            &mut checkers,
            &id("10.0.0.7", "HAProxy"),
            t0,
            MS(1000),
            3,
            t0 + MS(999_999),
        );
        let drain = t0 + MS(120_000);
        assert_eq!(checkers.load_balancer_count(drain), 0);
        assert!(checkers.drained(drain, drain, 2));
    }

    #[test]
    fn start_up_waits_for_every_load_balancer_to_see_enough_200s() {
        let t0 = Instant::now();
        let (a, b) = (id("10.0.0.1", "HAProxy"), id("10.0.0.2", "HAProxy"));
        let mut checkers = Checkers::default();
        assert!(
            !checkers.all_healthy(t0, 2),
            "no load balancer checking yet"
        );
        checkers.record(id("10.0.0.9", "kube-probe/1.31"), t0, true, false);
        assert!(
            !checkers.all_healthy(t0, 2),
            "the kubelet is no load balancer"
        );
        checkers.record(a.clone(), t0, true, false);
        checkers.record(b.clone(), t0, false, false);
        checkers.record(a.clone(), t0 + MS(1000), true, false);
        assert!(!checkers.all_healthy(t0 + MS(1000), 2), "b has no 200 yet");
        checkers.record(b.clone(), t0 + MS(1000), true, false);
        checkers.record(b.clone(), t0 + MS(2000), true, false);
        assert!(checkers.all_healthy(t0 + MS(2000), 2));
    }

    #[test]
    fn a_single_probe_holds_the_drain_only_until_it_looks_like_a_one_off() {
        let t0 = Instant::now();
        let script = id("10.0.0.3", "");
        let mut checkers = Checkers::default();
        checkers.record(script.clone(), t0, true, false);
        assert!(
            !checkers.drained(t0 + MS(30_000), t0 + MS(100), 2),
            "may be an ALB"
        );
        assert!(checkers.drained(t0 + MS(60_100), t0 + MS(100), 2));
    }

    #[test]
    fn tools_are_never_load_balancers() {
        let t0 = Instant::now();
        let lb = id("10.0.0.1", "ELB-HealthChecker/2.0");
        let mut checkers = Checkers::default();
        checkers.record(id("10.0.0.9", "curl/8.5.0"), t0, true, false);
        checkers.record(id("10.0.0.8", "Mozilla/5.0 (X11)"), t0, true, false);
        assert!(
            !checkers.all_healthy(t0, 2),
            "nothing but tools: no load balancer yet"
        );
        probe(&mut checkers, &lb, t0, MS(1000), 2, t0 + MS(60_000));
        assert!(checkers.all_healthy(t0 + MS(1000), 2));
        assert_eq!(checkers.load_balancer_count(t0), 1);
    }

    #[test]
    fn a_one_off_request_holds_the_start_up_gate_for_a_minute_at_most() {
        let t0 = Instant::now();
        let lb = id("10.0.0.1", "HAProxy");
        let script = id("10.0.0.9", "");
        let mut checkers = Checkers::default();
        checkers.record(script, t0, true, false);
        probe(&mut checkers, &lb, t0, MS(1000), 62, t0 + MS(100_000));
        assert!(
            !checkers.all_healthy(t0 + MS(2000), 2),
            "may be an ALB node"
        );
        assert!(checkers.all_healthy(t0 + MS(60_100), 2));
    }
}
