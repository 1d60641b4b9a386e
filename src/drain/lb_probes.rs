//! The `lb-probes` drain watcher's verdict: once every load balancer that was checking `/ready`
//! around the drain has seen enough 503s to take the pod out of rotation (or has stopped
//! checking), it no longer sends traffic here. The checkers themselves are in [`crate::checkers`].

use tokio::time::Instant;

use crate::checkers::{CheckerState, Checkers};

impl Checkers {
    /// Drained when no load balancer is still pending. With none seen at all, there is nothing
    /// to wait for.
    pub fn drained(&self, now: Instant, drain_started: Instant, threshold: u32) -> bool {
        self.load_balancers(drain_started)
            .all(|(_, c)| c.state(now, threshold) != CheckerState::Pending)
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
                .filter(|(_, c)| c.state(now, threshold) == CheckerState::Pending),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkers::MAX_NAMED;
    use crate::checkers::tests::{MS, id, one_haproxy, probe};

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
        let (t0, lb, mut checkers) = one_haproxy();
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
    fn one_or_two_probes_or_a_burst_never_hold_the_drain() {
        let t0 = Instant::now();
        let (script, burst) = (id("10.0.0.3", ""), id("10.0.0.4", "x"));
        let mut checkers = Checkers::default();
        checkers.record(script.clone(), t0, true, false);
        checkers.record(script.clone(), t0 + MS(1000), true, false);
        probe(&mut checkers, &burst, t0, MS(5), 20, t0 + MS(100_000));
        assert!(checkers.drained(t0 + MS(1100), t0 + MS(1100), 2));
        assert_eq!(checkers.load_balancer_count(t0 + MS(1100)), 0);
        let status = checkers.status(t0 + MS(1100), Some(t0 + MS(1100)), 2);
        assert_eq!(status[0]["state"], "not-a-load-balancer");
    }

    #[test]
    fn log_lists_name_a_few_and_count_the_rest() {
        let t0 = Instant::now();
        let mut checkers = Checkers::default();
        for i in 0..30 {
            let lb = id(&format!("10.3.0.{i}"), "HAProxy");
            probe(&mut checkers, &lb, t0, MS(1000), 3, t0 + MS(100_000));
        }
        let pending = checkers.holding_the_drain(t0 + MS(2100), t0 + MS(2050), 2);
        assert_eq!(pending.len(), MAX_NAMED + 1);
        assert_eq!(pending[MAX_NAMED], "and 20 more");
    }
}
