//! The load balancers seen checking `/ready`: one record per checker, in bounded room, and only
//! credible ones (clients that probe like a load balancer) count. The probe server fills it; the
//! `lb-probes` drain watcher ([`crate::drain::lb_probes`]) and the start-up gate read it.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{Value, json};

/// The kubelet's User-Agent: its probes decide the pod's Ready condition, not a load balancer's
/// rotation, so it is tracked apart and never waited for.
pub const KUBELET_AGENT: &str = "kube-probe/";
/// A checker silent for this long before the drain began is gone, not waited for.
const RECENT: Duration = Duration::from_secs(60);
/// A checker whose gap since its last probe exceeds this many of its intervals has stopped
/// checking (twice, not once: real checkers jitter).
const STOPPED_AFTER_INTERVALS: u32 = 2;
/// A checker with a single probe, silent for this long, shows as stopped in `/status`: twice the
/// longest common interval (AWS ALB/NLB check every 30 s by default).
const ONE_OFF_AFTER: Duration = Duration::from_secs(60);
/// A client counts as a load balancer (holds a drain, opens or holds the start-up gate) only once
/// it behaves like one: this many probes at a steady interval. One-off requests, scripts and
/// strangers with a fresh User-Agent each time never do.
pub const CREDIBLE_PROBES: u32 = 3;
/// Steady: each gap within this factor of the interval so far (load balancers jitter a little;
/// Envoy and HAProxy spread their checks by up to half an interval).
const STEADY_FACTOR: u32 = 2;
/// Gaps shorter than this are bursts or retries, not a health-check interval.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(100);
/// User-Agents are kept to this many bytes: enough to tell checkers apart.
pub const MAX_AGENT_BYTES: usize = 128;
/// The checker table's room: far more load-balancer nodes than a pod is checked by.
pub const MAX_CHECKERS: usize = 64;
/// One address may hold this many entries (one per User-Agent it sends).
const MAX_CHECKERS_PER_ADDRESS: usize = 8;
/// The kubelet is tracked apart, in a table of its own this size (only shown in `/status`).
const MAX_KUBELETS: usize = 8;
/// Lists of checkers in the log name this many, then how many more.
pub const MAX_NAMED: usize = 10;
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
    /// The User-Agent is cut to [`MAX_AGENT_BYTES`]: a client cannot grow drainit's memory.
    pub fn new(addr: IpAddr, agent: &str) -> Self {
        let mut end = agent.len().min(MAX_AGENT_BYTES);
        while !agent.is_char_boundary(end) {
            end -= 1;
        }
        Self {
            addr,
            agent: agent[..end].to_owned(),
        }
    }

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

/// Who sent a request, as the probe metrics count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckerKind {
    Kubelet,
    LoadBalancer,
    /// Tools, scripts, and anything asking for a path a load balancer does not check.
    Other,
}

impl CheckerKind {
    pub const ALL: [CheckerKind; 3] = [
        CheckerKind::Kubelet,
        CheckerKind::LoadBalancer,
        CheckerKind::Other,
    ];

    /// The sender of `agent`, asking a probe path (`/alive`, `/ready`) or not.
    pub fn of(agent: &str, probe_path: bool) -> Self {
        if is_kubelet(agent) {
            CheckerKind::Kubelet
        } else if probe_path && may_be_load_balancer(agent) {
            CheckerKind::LoadBalancer
        } else {
            CheckerKind::Other
        }
    }

    /// The `checker` label of the probe metrics.
    pub fn label(self) -> &'static str {
        match self {
            CheckerKind::Kubelet => "kubelet",
            CheckerKind::LoadBalancer => "load_balancer",
            CheckerKind::Other => "other",
        }
    }
}

/// What drainit knows of one checker: its probes, their rhythm and what it was told.
#[derive(Debug, Clone)]
pub struct Checker {
    last_seen: Instant,
    probes: u64,
    /// Smoothed gap between its probes, once it has probed twice.
    interval: Option<Duration>,
    /// Consecutive 503s it received since the drain began.
    failures_since_drain: u32,
    /// Consecutive 200s it received (the start-up gate waits for these).
    successes: u32,
    /// Consecutive gaps consistent with its interval.
    steady_gaps: u32,
    /// Has probed like a load balancer (see [`CREDIBLE_PROBES`]); for good once it has.
    credible: bool,
}

impl Checker {
    fn new(at: Instant) -> Self {
        Self {
            last_seen: at,
            probes: 0,
            interval: None,
            failures_since_drain: 0,
            successes: 0,
            steady_gaps: 0,
            credible: false,
        }
    }

    /// Takes in a probe at `at`: its interval, and whether it keeps a steady one.
    fn probed(&mut self, at: Instant) {
        if self.probes > 0 {
            let gap = at.saturating_duration_since(self.last_seen);
            let steady = gap >= MIN_CHECK_INTERVAL
                && self.interval.is_none_or(|interval| {
                    gap <= interval * STEADY_FACTOR && gap * STEADY_FACTOR >= interval
                });
            self.steady_gaps = if steady { self.steady_gaps + 1 } else { 0 };
            self.interval = Some(match self.interval {
                // An exponential average follows a changed interval within a few probes.
                Some(interval) if steady => (interval * 3 + gap) / 4,
                _ => gap,
            });
        }
        self.probes += 1;
        self.last_seen = at;
        self.credible |= self.steady_gaps + 1 >= CREDIBLE_PROBES;
    }

    /// Where it stands in a drain, as of `now`: `threshold` consecutive 503s take it out.
    pub fn state(&self, now: Instant, threshold: u32) -> CheckerState {
        if self.failures_since_drain >= threshold {
            return CheckerState::SawUnhealthy;
        }
        let silent = now.saturating_duration_since(self.last_seen);
        match self.interval {
            Some(interval) if silent > interval * STOPPED_AFTER_INTERVALS => CheckerState::Stopped,
            None if silent > ONE_OFF_AFTER => CheckerState::Stopped,
            _ => CheckerState::Pending,
        }
    }
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

/// Every checker seen on `/ready`, in bounded room: see [`Checkers::record`].
#[derive(Debug, Default)]
pub struct Checkers {
    checkers: HashMap<CheckerId, Checker>,
    kubelets: HashMap<CheckerId, Checker>,
    /// Checkers evicted or not taken in for lack of room.
    pub dropped: u64,
}

impl Checkers {
    /// Records one `/ready` probe and its answer; `draining` tells whether 503s count yet.
    ///
    /// The table is bounded: a newcomer takes the place of a checker gone for a minute, else of
    /// the stalest one that never probed like a load balancer; when every other entry (of its
    /// address, or of the table) is a live load balancer, the newcomer is not recorded: strangers
    /// cannot push a real load balancer out.
    pub fn record(&mut self, id: CheckerId, at: Instant, ready: bool, draining: bool) {
        let Some(checker) = self.room_for(id, at) else {
            self.dropped += 1;
            return;
        };
        checker.probed(at);
        checker.successes = if ready { checker.successes + 1 } else { 0 };
        checker.failures_since_drain = match (ready, draining) {
            (false, true) => checker.failures_since_drain + 1,
            _ => 0,
        };
    }

    fn room_for(&mut self, id: CheckerId, at: Instant) -> Option<&mut Checker> {
        let kubelet = id.is_kubelet();
        let (table, room) = if kubelet {
            (&mut self.kubelets, MAX_KUBELETS)
        } else {
            (&mut self.checkers, MAX_CHECKERS)
        };
        if !table.contains_key(&id) {
            let same_address = table.keys().filter(|k| k.addr == id.addr).count();
            let full = if same_address >= MAX_CHECKERS_PER_ADDRESS {
                Some(id.addr)
            } else if table.len() >= room {
                None
            } else {
                table.insert(id.clone(), Checker::new(at));
                return table.get_mut(&id);
            };
            let evict = evictable(table, full, at, kubelet)?;
            table.remove(&evict);
            self.dropped += 1;
            table.insert(id.clone(), Checker::new(at));
        }
        table.get_mut(&id)
    }

    /// The load balancers (not the kubelet, not a tool, only clients that probed like one) that
    /// were checking around the drain.
    pub fn load_balancers(
        &self,
        drain_started: Instant,
    ) -> impl Iterator<Item = (&CheckerId, &Checker)> {
        self.checkers.iter().filter(move |(id, checker)| {
            is_load_balancer(id, checker) && checker.last_seen + RECENT >= drain_started
        })
    }

    /// Start-up: whether load balancers have taken the pod into rotation, as of `now`: at least
    /// one is checking, and every one seen in the last minute has had `needed` consecutive 200s.
    pub fn all_healthy(&self, now: Instant, needed: u32) -> bool {
        let mut recent = self.load_balancers(now).peekable();
        recent.peek().is_some() && recent.all(|(_, c)| c.successes >= needed)
    }

    /// The load balancers still holding the start-up gate, for the log.
    pub fn holding_the_gate(&self, now: Instant, needed: u32) -> Vec<String> {
        self.named(
            self.load_balancers(now)
                .filter(|(_, c)| c.successes < needed),
        )
    }

    /// `address User-Agent` of each, sorted; past [`MAX_NAMED`], how many more.
    pub fn named<'a>(
        &self,
        checkers: impl Iterator<Item = (&'a CheckerId, &'a Checker)>,
    ) -> Vec<String> {
        let mut names: Vec<String> = checkers
            .map(|(id, _)| format!("{} {}", id.addr, id.agent).trim_end().to_owned())
            .collect();
        names.sort();
        if names.len() > MAX_NAMED {
            let more = names.len() - MAX_NAMED;
            names.truncate(MAX_NAMED);
            names.push(format!("and {more} more"));
        }
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
            .filter(|(id, c)| is_load_balancer(id, c))
            .map(|(_, c)| c.last_seen)
            .max()
    }

    /// Every checker, for `/status`.
    pub fn status(&self, now: Instant, drain_started: Option<Instant>, threshold: u32) -> Value {
        let mut list: Vec<Value> = self
            .checkers
            .iter()
            .chain(&self.kubelets)
            .map(|(id, c)| {
                let state = match drain_started {
                    Some(_) if id.is_kubelet() => "kubelet",
                    Some(_) if id.is_tool() => "tool",
                    Some(_) if !c.credible => "not-a-load-balancer",
                    Some(_) => match c.state(now, threshold) {
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
                    "credible": c.credible,
                    "state": state,
                })
            })
            .collect();
        list.sort_by_key(|v| (v["addr"].to_string(), v["user_agent"].to_string()));
        Value::Array(list)
    }
}

/// Counts as a load balancer: not the kubelet, not a tool, and has probed like one.
fn is_load_balancer(id: &CheckerId, checker: &Checker) -> bool {
    checker.credible && id.may_be_load_balancer()
}

/// The entry to give up for a newcomer (among those of `addr`, if given): one silent for a
/// minute, else the stalest that is not a load balancer (any, for the kubelet's table); none
/// when all are live load balancers.
fn evictable(
    table: &HashMap<CheckerId, Checker>,
    addr: Option<IpAddr>,
    now: Instant,
    kubelets: bool,
) -> Option<CheckerId> {
    table
        .iter()
        .filter(|(id, _)| addr.is_none_or(|a| id.addr == a))
        .filter(|(id, c)| kubelets || !is_load_balancer(id, c) || c.last_seen + RECENT < now)
        .min_by_key(|(_, c)| c.last_seen)
        .map(|(id, _)| id.clone())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) const MS: fn(u64) -> Duration = Duration::from_millis;

    pub(crate) fn id(addr: &str, agent: &str) -> CheckerId {
        CheckerId {
            addr: addr.parse().unwrap(),
            agent: agent.into(),
        }
    }

    /// An empty table, and HAProxy on 10.0.0.1 yet to probe, as of now.
    pub(crate) fn one_haproxy() -> (Instant, CheckerId, Checkers) {
        let haproxy = id("10.0.0.1", "HAProxy");
        (Instant::now(), haproxy, Checkers::default())
    }

    /// Probes from `checker` every `every` from `from`, `n` times, answered `ready` before
    /// `drain` and 503 after it.
    pub(crate) fn probe(
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
        checkers.record(a.clone(), t0 + MS(2000), true, false);
        checkers.record(b.clone(), t0 + MS(2000), true, false);
        assert!(checkers.all_healthy(t0 + MS(2000), 2));
    }

    #[test]
    fn a_checker_counts_after_three_probes_at_a_steady_interval() {
        let (t0, lb, mut checkers) = one_haproxy();
        probe(&mut checkers, &lb, t0, MS(2000), 2, t0 + MS(100_000));
        assert_eq!(checkers.load_balancer_count(t0), 0, "two probes");
        checkers.record(lb.clone(), t0 + MS(4100), true, false);
        assert_eq!(checkers.load_balancer_count(t0), 1, "three, steady");

        let erratic = id("10.0.0.2", "HAProxy");
        for at in [0, 200, 5000, 5300, 20_000] {
            checkers.record(erratic.clone(), t0 + MS(at), true, false);
        }
        assert_eq!(checkers.load_balancer_count(t0), 1, "erratic gaps");
    }

    #[test]
    fn a_one_off_request_never_holds_the_start_up_gate() {
        let (t0, lb, mut checkers) = one_haproxy();
        checkers.record(id("10.0.0.9", ""), t0, true, false);
        checkers.record(id("10.0.0.8", "fresh-1"), t0 + MS(900), true, false);
        assert!(!checkers.all_healthy(t0 + MS(1000), 2), "no load balancer");
        probe(&mut checkers, &lb, t0, MS(1000), 3, t0 + MS(100_000));
        assert!(checkers.all_healthy(t0 + MS(2000), 2));
    }

    #[test]
    fn strangers_cannot_push_a_load_balancer_out_of_the_table() {
        let (t0, lb, mut checkers) = one_haproxy();
        probe(&mut checkers, &lb, t0, MS(1000), 3, t0 + MS(100_000));
        for i in 0..10_000u32 {
            let addr = format!("10.1.{}.{}", i / 250, i % 250);
            checkers.record(id(&addr, &format!("agent-{i}")), t0 + MS(2000), true, false);
        }
        assert_eq!(checkers.checkers.len(), MAX_CHECKERS);
        assert!(checkers.checkers.contains_key(&lb));
        assert_eq!(checkers.load_balancer_count(t0), 1);
        assert!(checkers.dropped >= 10_000 - MAX_CHECKERS as u64);
    }

    #[test]
    fn one_address_holds_a_few_entries_and_live_load_balancers_keep_theirs() {
        let t0 = Instant::now();
        let mut checkers = Checkers::default();
        for i in 0..20 {
            let fake = id("10.0.0.5", &format!("steady-{i}"));
            probe(&mut checkers, &fake, t0, MS(1000), 3, t0 + MS(100_000));
        }
        let from_5 = checkers
            .checkers
            .keys()
            .filter(|k| k.addr.to_string() == "10.0.0.5");
        assert_eq!(from_5.count(), MAX_CHECKERS_PER_ADDRESS);
        // Every entry of 10.0.0.5 is a live load balancer: a newcomer there is not taken in...
        checkers.record(id("10.0.0.5", "new"), t0 + MS(2500), true, false);
        assert!(!checkers.checkers.contains_key(&id("10.0.0.5", "new")));
        // ...until one has been silent for a minute.
        checkers.record(id("10.0.0.5", "new"), t0 + MS(63_000), true, false);
        assert!(checkers.checkers.contains_key(&id("10.0.0.5", "new")));
    }

    #[test]
    fn the_kubelet_table_is_bounded_too() {
        let t0 = Instant::now();
        let mut checkers = Checkers::default();
        for i in 0..100 {
            let kubelet = id(&format!("10.2.0.{i}"), "kube-probe/1.31");
            checkers.record(kubelet, t0 + MS(i), true, false);
        }
        assert_eq!(checkers.kubelets.len(), MAX_KUBELETS);
        assert!(checkers.checkers.is_empty());
    }

    #[test]
    fn who_asked_for_the_probe_metrics() {
        use CheckerKind::*;
        for (agent, probe_path, kind) in [
            ("kube-probe/1.31", true, Kubelet),
            ("kube-probe/1.31", false, Kubelet),
            ("ELB-HealthChecker/2.0", true, LoadBalancer),
            ("", true, LoadBalancer),
            ("ELB-HealthChecker/2.0", false, Other),
            ("curl/8.5.0", true, Other),
            ("Prometheus/2.53", false, Other),
        ] {
            assert_eq!(
                CheckerKind::of(agent, probe_path),
                kind,
                "{agent} {probe_path}"
            );
        }
        let labels = CheckerKind::ALL.map(CheckerKind::label);
        assert_eq!(labels, ["kubelet", "load_balancer", "other"]);
    }

    #[test]
    fn user_agents_are_kept_short() {
        let long = "é".repeat(1000);
        let checker = CheckerId::new("10.0.0.1".parse().unwrap(), &long);
        assert!(checker.agent.len() <= MAX_AGENT_BYTES);
        assert!(checker.agent.len() >= MAX_AGENT_BYTES - 1);
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
        probe(&mut checkers, &lb, t0, MS(1000), 3, t0 + MS(60_000));
        assert!(checkers.all_healthy(t0 + MS(2000), 2));
        assert_eq!(checkers.load_balancer_count(t0), 1);
    }
}
