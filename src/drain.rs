//! Drain policy: how long the app keeps serving, not ready, before it gets the stop signal.

use std::time::{Duration, Instant};

/// After a `drainit prestop` drain the kubelet sends SIGTERM as soon as the hook returns. If none
/// arrives by this long after the drain (the hook was run by hand), drainit stops the app itself.
pub const PRESTOP_HANDOFF: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainPolicy {
    /// Keep serving for a fixed time (`--drain-delay`).
    Fixed(Duration),
}

/// Why the drain ended, for the timeline in the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainEnd {
    pub reason: &'static str,
    pub elapsed: Duration,
}

impl DrainPolicy {
    /// The longest the drain can last: what the shutdown budget must make room for.
    pub fn longest(&self) -> Duration {
        match self {
            DrainPolicy::Fixed(delay) => *delay,
        }
    }

    /// Resolves when the drain that began at `started` is over.
    pub async fn run(self, started: Instant) -> DrainEnd {
        match self {
            DrainPolicy::Fixed(delay) => {
                tokio::time::sleep_until((started + delay).into()).await;
                DrainEnd {
                    reason: "drain delay elapsed",
                    elapsed: started.elapsed(),
                }
            }
        }
    }
}
