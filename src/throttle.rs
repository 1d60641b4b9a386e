//! Repeated identical warnings, rate-limited: one line per period with the count of the ones
//! left out, so that a condition that repeats thousands of times a second (accept failing with
//! EMFILE) neither floods the log nor hides that it is still going on.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug)]
pub struct Throttle {
    every: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    pub const fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            suppressed: 0,
        }
    }

    /// One more occurrence at `now`: `Some(n)` when it is to be logged, `n` being how many were
    /// left out since the last line; `None` when it is left out.
    pub fn occurred(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_period_with_the_count_left_out() {
        let t0 = Instant::now();
        let mut throttle = Throttle::new(Duration::from_secs(10));
        assert_eq!(throttle.occurred(t0), Some(0));
        for i in 1..=1000 {
            assert_eq!(throttle.occurred(t0 + Duration::from_millis(i)), None);
        }
        assert_eq!(throttle.occurred(t0 + Duration::from_secs(10)), Some(1000));
        assert_eq!(throttle.occurred(t0 + Duration::from_secs(11)), None);
    }
}
