//! Repeated warnings, one per interval: a failing syscall in a loop (fd exhaustion on accept) or a
//! local client retrying must not flood the log with the same line.

use std::time::{Duration, Instant};

/// Lets one warning of a kind through per interval and counts the ones it holds back.
#[derive(Debug)]
pub struct RateLimit {
    interval: Duration,
    next: Option<Instant>,
    held_back: u64,
}

impl RateLimit {
    pub const fn new(interval: Duration) -> Self {
        Self {
            interval,
            next: None,
            held_back: 0,
        }
    }

    /// `Some(n)` when the warning may be logged now, `n` being how many were held back since the
    /// last one; `None` when it is held back.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self.next.is_some_and(|next| now < next) {
            self.held_back += 1;
            return None;
        }
        self.next = Some(now + self.interval);
        Some(std::mem::take(&mut self.held_back))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_per_interval_and_the_count_of_the_rest() {
        let mut limit = RateLimit::new(Duration::from_millis(50));
        assert_eq!(limit.allow(), Some(0));
        assert_eq!(limit.allow(), None);
        assert_eq!(limit.allow(), None);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(limit.allow(), Some(2));
        assert_eq!(limit.allow(), None);
    }
}
