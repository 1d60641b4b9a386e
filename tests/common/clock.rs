//! The test's clock: a timeline of what happened (for the end-to-end reports) and the one way
//! to wait for a condition.

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// The test's clock and a timeline of what happened, for the report.
#[derive(Clone)]
pub struct Clock {
    start: Instant,
    events: Arc<Mutex<Vec<(Duration, String)>>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            start: Instant::now(),
            events: Arc::default(),
        }
    }

    pub fn since_start(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.start)
    }

    pub fn event(&self, what: String) {
        self.event_at(self.start.elapsed(), what);
    }

    pub fn event_at(&self, at: Duration, what: String) {
        self.events.lock().unwrap().push((at, what));
    }

    pub fn timeline(&self) -> Vec<String> {
        let mut events = self.events.lock().unwrap().clone();
        events.sort_by_key(|(at, _)| *at);
        let mut lines = Vec::new();
        let mut failures_in_a_row = 0;
        let elided = |n: usize| {
            format!(
                "       ... {} more failed requests and their HAProxy logs",
                n - 5
            )
        };
        for (at, what) in events {
            // Keep the timeline readable when many requests fail in a burst.
            if what.starts_with("request failed") || what.starts_with("haproxy: <6>") {
                failures_in_a_row += 1;
                if failures_in_a_row > 5 {
                    continue;
                }
            } else {
                if failures_in_a_row > 5 {
                    lines.push(elided(failures_in_a_row));
                }
                failures_in_a_row = 0;
            }
            lines.push(format!("{:>6} {what}", at.as_millis()));
        }
        if failures_in_a_row > 5 {
            lines.push(elided(failures_in_a_row));
        }
        lines
    }
}

pub fn opt_ms(d: Option<Duration>) -> String {
    d.map_or_else(|| "never".to_owned(), |d| format!("{} ms", d.as_millis()))
}

/// Polls `check` every 2 ms until it holds; returns how long that took. (Timing bars are
/// measured by the benchmark, not here: this only has to be fine-grained enough for generous
/// bounds, without flooding a 2-core CI machine with connections.)
pub fn time_until(timeout: Duration, check: impl FnMut() -> bool) -> Option<Duration> {
    poll_until(timeout, Duration::from_millis(2), check)
}

/// Polls `check` every `every` until it holds; returns how long that took.
pub fn poll_until(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> bool,
) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if check() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        thread::sleep(every);
    }
}
