//! The traffic watcher's sampling plan: what to read at each look and when to look next, from the
//! lifecycle's stage and the last readings. Pure: the watcher's loop carries it out.
//!
//! The namespace's connection counter is a cheap file read, taken at every look. A socket dump
//! walks the kernel's whole connection table, shared by every namespace of the node (about 2.6 ms
//! on a 24 GiB node, however few sockets the pod has): taken less often, and skipped before the
//! drain while it could show nothing new. Finding the app's ports reads every file descriptor of
//! its processes (about 8 us each): only before the drain, and rarely once they are known.

use std::time::Duration;

use tokio::time::Instant;

use crate::lifecycle::PhaseKind;

/// Where the lifecycle stands, as far as sampling goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    BeforeDrain,
    Draining,
    /// The app has its stop signal: arrivals from now on are late.
    AfterStop,
    /// The app is gone: one last look, then none.
    Exited,
}

/// What the accounting knows that the plan depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Known {
    pub ports_known: bool,
    pub open_connections: usize,
    /// Connections were open at the last dump, or the app accepted some since.
    pub sockets_may_have_changed: bool,
}

/// What one look reads, besides the connection counter (always read).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Look {
    /// The first look after the stop signal: it closes the window that straddles the signal, so
    /// that later readings count as late.
    pub marks_stop: bool,
    pub discover_ports: bool,
    pub dump_sockets: bool,
}

/// The plan and when each source was last read.
#[derive(Debug)]
pub struct Plan {
    /// No ports given on the command line: the watcher finds them.
    discovers_ports: bool,
    ports_looked_up: Option<Instant>,
    sockets_read: Option<Instant>,
    stop_seen: bool,
}

/// How often each source is read.
struct Cadence {
    counter: Duration,
    sockets: Duration,
}

/// Before the drain only the arrival rate is needed: each socket dump is one reading of the
/// sockets' ages (see `drain::arrivals`), every 500 ms per 250 open connections.
const BEFORE_DRAIN: Cadence = Cadence {
    counter: Duration::from_millis(250),
    sockets: Duration::from_millis(500),
};
/// Connections one dump interval before the drain pays for.
const CONNECTIONS_PER_INTERVAL: usize = 250;
/// During the drain, every look reads both: quiet is vouched for only up to the older of the
/// two readings, and the drain ends one quiet period after the last arrival, read from the
/// sockets' ages, as soon as a look confirms nothing came since (a few seconds of dumps at
/// 10/s: about 1-3 % of a core on a busy node, for the drain only).
const DURING_DRAIN: Cadence = Cadence {
    counter: Duration::from_millis(100),
    sockets: Duration::from_millis(100),
};
/// After the stop signal, until the app exits (seconds at most): late arrivals are worth seeing
/// before the app is gone.
const AFTER_STOP: Cadence = Cadence {
    counter: Duration::from_millis(100),
    sockets: Duration::from_millis(200),
};
/// Before the drain, the longest an idle app goes without a socket dump.
const SKIPPED_DUMPS_AT_MOST: Duration = Duration::from_secs(10);
/// Until the app listens somewhere, look often: it is just starting and has few descriptors.
const DISCOVER_PORTS: Duration = Duration::from_millis(500);
const REDISCOVER_PORTS: Duration = Duration::from_secs(30);

/// Nothing arrives at an app the moment it is spawned: the first look waits one reading interval,
/// and a command that is gone by then (`drainit -- true`) costs no blocking thread.
pub const FIRST_LOOK_AFTER: Duration = BEFORE_DRAIN.counter;

impl Stage {
    pub fn of(phase: PhaseKind) -> Self {
        match phase {
            PhaseKind::Starting | PhaseKind::Ready | PhaseKind::Unready => Stage::BeforeDrain,
            PhaseKind::Draining | PhaseKind::Drained => Stage::Draining,
            PhaseKind::Stopping => Stage::AfterStop,
            PhaseKind::Exited => Stage::Exited,
        }
    }

    fn cadence(self) -> Cadence {
        match self {
            Stage::BeforeDrain => BEFORE_DRAIN,
            Stage::Draining => DURING_DRAIN,
            Stage::AfterStop | Stage::Exited => AFTER_STOP,
        }
    }

    /// When to look again (sooner if the stage changes).
    pub fn next_look_in(self) -> Duration {
        self.cadence().counter
    }
}

impl Plan {
    pub fn new(discovers_ports: bool) -> Self {
        Self {
            discovers_ports,
            ports_looked_up: None,
            sockets_read: None,
            stop_seen: false,
        }
    }

    /// What to read at the look made `now`.
    pub fn look(&mut self, stage: Stage, known: Known, now: Instant) -> Look {
        let due = |last: Option<Instant>, every| last.is_none_or(|t| now - t >= every);
        let marks_stop = stage == Stage::AfterStop && !self.stop_seen;
        self.stop_seen |= marks_stop;
        let rediscover = if known.ports_known {
            REDISCOVER_PORTS
        } else {
            DISCOVER_PORTS
        };
        let discover_ports = self.discovers_ports
            && stage == Stage::BeforeDrain
            && due(self.ports_looked_up, rediscover);
        // Before the drain, skip a dump while the app has no connection and has accepted none (a
        // probe racing the counter can hide one briefly, hence the bound). During it, always look.
        let dump_sockets = marks_stop
            || match stage {
                Stage::BeforeDrain => {
                    due(
                        self.sockets_read,
                        dump_interval_before_drain(known.open_connections),
                    ) && (known.sockets_may_have_changed
                        || due(self.sockets_read, SKIPPED_DUMPS_AT_MOST))
                }
                _ => due(self.sockets_read, stage.cadence().sockets),
            };
        Look {
            marks_stop,
            discover_ports,
            dump_sockets,
        }
    }

    /// The app's ports were looked up at `at`.
    pub fn ports_looked_up(&mut self, at: Instant) {
        self.ports_looked_up = Some(at);
    }

    /// The app's sockets were dumped at `at`.
    pub fn sockets_read(&mut self, at: Instant) {
        self.sockets_read = Some(at);
    }
}

/// Spreads the looks before the drain uniformly over 50-150 % of their interval. Socket ages
/// must be read at times unrelated to the arrivals: at a fixed cadence they would alias with
/// periodic traffic (a health check every 500 ms read at the same phase every time).
#[derive(Debug)]
pub struct Jitter(u64);

impl Jitter {
    pub fn seeded() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Jitter((nanos ^ u64::from(std::process::id()).rotate_left(32)) | 1)
    }

    /// When to look again at `stage` (sooner if the stage changes).
    pub fn next_look_in(&mut self, stage: Stage) -> Duration {
        let interval = stage.next_look_in();
        if stage == Stage::BeforeDrain {
            interval.mul_f64(0.5 + self.unit())
        } else {
            interval
        }
    }

    /// xorshift64*, uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Before the drain, a dump costs more the more connections it returns (each with its tcp_info):
/// keep it near the cost of 250 connections every 500 ms (500 a second, about 2 ms of dumping a
/// second with tcp_info), so watching stays under 1 % CPU.
fn dump_interval_before_drain(open_connections: usize) -> Duration {
    let shares = u32::try_from(open_connections.div_ceil(CONNECTIONS_PER_INTERVAL))
        .unwrap_or(u32::MAX)
        .max(1);
    BEFORE_DRAIN
        .sockets
        .saturating_mul(shares)
        .min(SKIPPED_DUMPS_AT_MOST)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    const IDLE: Known = Known {
        ports_known: true,
        open_connections: 0,
        sockets_may_have_changed: false,
    };

    /// The looks a fresh plan makes over `span` ms at the stage's cadence, with what each read.
    fn looks(discovers_ports: bool, stage: Stage, known: Known, span: u64) -> Vec<Look> {
        let mut plan = Plan::new(discovers_ports);
        let every = stage.next_look_in();
        let mut looks = vec![];
        let t0 = Instant::now();
        let mut at = t0;
        while at <= t0 + MS(span) {
            let look = plan.look(stage, known, at);
            if look.dump_sockets {
                plan.sockets_read(at);
            }
            if look.discover_ports {
                plan.ports_looked_up(at);
            }
            looks.push(look);
            at += every;
        }
        looks
    }

    fn dumps(looks: &[Look]) -> usize {
        looks.iter().filter(|l| l.dump_sockets).count()
    }

    fn discoveries(looks: &[Look]) -> usize {
        looks.iter().filter(|l| l.discover_ports).count()
    }

    #[test]
    fn every_phase_has_its_stage() {
        let stages: Vec<Stage> = PhaseKind::ALL.into_iter().map(Stage::of).collect();
        use Stage::*;
        assert_eq!(
            stages,
            [
                BeforeDrain,
                BeforeDrain,
                BeforeDrain,
                Draining,
                Draining,
                AfterStop,
                Exited
            ]
        );
    }

    #[test]
    fn looks_speed_up_with_the_drain() {
        assert_eq!(Stage::BeforeDrain.next_look_in(), MS(250));
        assert_eq!(Stage::Draining.next_look_in(), MS(100));
        assert_eq!(Stage::AfterStop.next_look_in(), MS(100));
        assert_eq!(FIRST_LOOK_AFTER, MS(250));
    }

    #[test]
    fn looks_before_the_drain_are_jittered_during_it_not() {
        let mut jitter = Jitter::seeded();
        let before: Vec<Duration> = (0..200)
            .map(|_| jitter.next_look_in(Stage::BeforeDrain))
            .collect();
        assert!(
            before.iter().all(|d| *d >= MS(125) && *d < MS(375)),
            "{before:?}"
        );
        let early = before.iter().filter(|d| **d < MS(250)).count();
        assert!((60..140).contains(&early), "{early} of 200 under 250 ms");
        assert_eq!(jitter.next_look_in(Stage::Draining), MS(100));
    }

    #[test]
    fn before_the_drain_an_idle_app_is_dumped_every_10_s_at_most() {
        let looks = looks(false, Stage::BeforeDrain, IDLE, 20_000);
        assert!(looks[0].dump_sockets, "the first look dumps");
        assert_eq!(dumps(&looks), 3, "at 0, 10 s and 20 s");
        assert_eq!(discoveries(&looks), 0, "ports were given");
    }

    #[test]
    fn before_the_drain_connections_are_dumped_every_500_ms_more_per_250() {
        let busy = Known {
            open_connections: 10,
            sockets_may_have_changed: true,
            ..IDLE
        };
        assert_eq!(dumps(&looks(false, Stage::BeforeDrain, busy, 9_999)), 20);
        let crowded = Known {
            open_connections: 1500,
            ..busy
        };
        let looks = looks(false, Stage::BeforeDrain, crowded, 11_999);
        assert_eq!(dumps(&looks), 4, "every 3 s");
        assert_eq!(
            dump_interval_before_drain(usize::MAX),
            SKIPPED_DUMPS_AT_MOST
        );
    }

    #[test]
    fn during_the_drain_sockets_are_dumped_at_every_look_idle_or_not() {
        let looks = looks(true, Stage::Draining, IDLE, 1_900);
        assert_eq!(dumps(&looks), 20);
        assert_eq!(discoveries(&looks), 0, "not during the drain");
        assert!(looks.iter().all(|l| !l.marks_stop));
    }

    #[test]
    fn the_first_look_after_the_stop_marks_it_and_dumps() {
        let mut plan = Plan::new(false);
        let t0 = Instant::now();
        plan.sockets_read(t0);
        let first = plan.look(Stage::AfterStop, IDLE, t0 + MS(10));
        assert!(first.marks_stop && first.dump_sockets, "{first:?}");
        plan.sockets_read(t0 + MS(10));
        let next = plan.look(Stage::AfterStop, IDLE, t0 + MS(110));
        assert_eq!(next, Look::default(), "marked once; dumps every 200 ms");
        assert!(plan.look(Stage::AfterStop, IDLE, t0 + MS(210)).dump_sockets);
    }

    #[test]
    fn ports_are_looked_for_often_until_found_then_rarely() {
        let unknown = Known {
            ports_known: false,
            ..IDLE
        };
        assert_eq!(
            discoveries(&looks(true, Stage::BeforeDrain, unknown, 1_999)),
            4
        );
        assert_eq!(
            discoveries(&looks(true, Stage::BeforeDrain, IDLE, 59_999)),
            2
        );
    }
}
