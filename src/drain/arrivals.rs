//! The arrival rate from socket ages: requests counted, not readings.
//!
//! Counting readings that saw bytes counts a kept-alive connection at most once per reading, so
//! a busy pod looks quiet and gets a long quiet period. The kernel keeps, for every socket, how
//! long ago it last received data (`tcpi_last_data_recv`). The youngest of those ages among the
//! app's sockets is the pod's *age*: the time since the last request reached it. For any
//! stationary arrival process of rate r with gaps X, the age read at times unrelated to the
//! arrivals averages E[X²] / (2 E[X]) >= E[X] / 2 = 1 / (2r) (the inspection paradox; equality
//! only for perfectly periodic arrivals). So r̂ = 1 / (2 · mean age) never overstates r: it is r
//! for periodic arrivals, r/2 for Poisson ones, less for bursty ones. Every error is on the safe
//! side: a lower rate only makes the auto quiet period longer.
//!
//! - A connection that closed before a reading hides its last arrival: the age read is older,
//!   the rate lower. Idle kept-alive connections are never the youngest. A new connection's age
//!   counts from its handshake, itself an arrival.
//! - Readings are at times unrelated to the arrivals: the looks before the drain are jittered
//!   (`sampling::Jitter`), so periodic traffic (health checks) is not read at one phase.
//! - The kernel's ages are whole jiffies (HZ 100 to 1000, unknown): each is read `TICK` older
//!   than the kernel says, so rounding never makes it younger.
//! - A window holds a limited number of readings (one per socket dump, at most one per
//!   `SAMPLE_EVERY`; dumps come every 500 ms per 250 open connections): the estimate is lowered by three
//!   standard errors of a periodic process's mean age (the only process without slack), so
//!   sampling noise does not overstate it either.
//! - One long transfer (an upload, a stream) keeps its socket's age near zero while it lasts:
//!   it cannot be told from many small requests. The estimate never exceeds `CEILING` (20/s),
//!   the rate from which the auto quiet period is its 1 s floor anyway for any `--drain-max` up
//!   to 10 minutes: a transfer can make the quiet period no shorter than what 20 requests/s
//!   would. That is the stated bound: r̂ <= min(r, 20/s) for request traffic, r̂ <= 20/s always.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::tcp::Connection;

/// The longest jiffy (HZ = 100): what a kernel age may be short of the truth.
pub const TICK: Duration = Duration::from_millis(10);
/// The highest rate socket ages can show (see the module's doc).
pub const CEILING: f64 = 20.0;
/// One age reading per this long, whatever the sampling cadence, so that every stretch of time
/// weighs the same.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// Fewer readings say nothing reliable.
const MIN_SAMPLES: usize = 5;
/// Standard errors of the mean age taken off (see the module's doc).
const STANDARD_ERRORS: f64 = 3.0;

/// How a rate was measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateSource {
    /// The youngest socket's age, averaged over readings.
    SocketAges,
    /// Readings that saw arrivals: new connections, connections that received bytes (at most
    /// one per connection per reading).
    ArrivalCount,
}

impl RateSource {
    pub fn label(self) -> &'static str {
        match self {
            RateSource::SocketAges => "socket_ages",
            RateSource::ArrivalCount => "arrival_count",
        }
    }
}

/// An arrival rate and how it was measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_s: f64,
    pub source: RateSource,
}

impl Rate {
    /// The higher of two rates that each never overstate: still one that never does.
    pub fn max(a: Option<Rate>, b: Option<Rate>) -> Option<Rate> {
        match (a, b) {
            (Some(a), Some(b)) => Some(if b.per_s > a.per_s { b } else { a }),
            (a, b) => a.or(b),
        }
    }
}

/// The pod's age at a reading: the youngest inbound data among `connections` (that received any),
/// read `TICK` older. None when no connection has an age to give.
pub fn youngest(connections: &[Connection]) -> Option<Duration> {
    connections
        .iter()
        .filter(|c| c.bytes_received != Some(0))
        .filter_map(|c| c.last_data_recv)
        .min()
        .map(|age| age + TICK)
}

/// When data last arrived on a socket whose age `age` was read at `at`: the latest it can have
/// been (jiffy rounding may make an age look `TICK` older), never after the reading.
pub fn arrived(at: Instant, age: Duration) -> Instant {
    at.checked_sub(age).map_or(at, |t| (t + TICK).min(at))
}

/// The pod's age readings over a window.
#[derive(Debug, Default)]
pub struct AgeSamples {
    samples: VecDeque<(Instant, Duration)>,
}

impl AgeSamples {
    /// When the last reading was taken.
    pub fn last(&self) -> Option<Instant> {
        self.samples.back().map(|(t, _)| *t)
    }

    /// Whether a reading at `at` is due.
    pub fn due(&self, at: Instant) -> bool {
        self.last().is_none_or(|t| at - t >= SAMPLE_EVERY)
    }

    /// Takes in the pod's age read at `at`; forgets readings older than `window`.
    pub fn record(&mut self, at: Instant, age: Duration, window: Duration) {
        self.samples.push_back((at, age));
        while self.samples.front().is_some_and(|(t, _)| *t + window < at) {
            self.samples.pop_front();
        }
    }

    /// The rate over readings in `from..=until`, if there are enough (see the module's doc).
    pub fn rate(&self, from: Instant, until: Instant) -> Option<Rate> {
        let ages: Vec<f64> = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= from && *t <= until)
            .map(|(_, age)| age.as_secs_f64())
            .collect();
        estimate(&ages).map(|per_s| Rate {
            per_s,
            source: RateSource::SocketAges,
        })
    }
}

/// r̂ = 1 / (2 · mean age), lowered for sampling error, capped at `CEILING`.
fn estimate(ages: &[f64]) -> Option<f64> {
    if ages.len() < MIN_SAMPLES {
        return None;
    }
    let n = ages.len() as f64;
    let mean = ages.iter().sum::<f64>() / n;
    // A periodic process's ages are uniform: their mean has a relative standard error 1/√(3n).
    let margin = 1.0 + STANDARD_ERRORS / (3.0 * n).sqrt();
    (mean > 0.0).then(|| (1.0 / (2.0 * mean * margin)).min(CEILING))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64*, seeded: reproducible synthetic traffic.
    struct Random(u64);

    impl Random {
        fn next(&mut self) -> f64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
        }

        fn exponential(&mut self, mean: f64) -> f64 {
            -mean * (1.0 - self.next()).ln()
        }
    }

    /// Synthetic traffic over `WINDOW` s: for each socket, (open, close, arrival times). Data
    /// arriving continuously (an upload) is a dense run of arrivals.
    type Socket = (f64, f64, Vec<f64>);

    const WINDOW: f64 = 60.0;

    /// What the estimator reports for `sockets`, read about every 2 s (jittered, unrelated to
    /// the arrivals) as the kernel would: youngest open socket, in whole 4 ms jiffies (HZ 250),
    /// `TICK` added. A reading with no open socket that ever received data reads the time since
    /// the last arrival seen, as the watcher does.
    fn estimated(sockets: &[Socket], random: &mut Random) -> Option<f64> {
        let mut ages = vec![];
        let mut t = random.next() * 2.0;
        let mut last_seen: Option<f64> = None;
        while t < WINDOW {
            let youngest = sockets
                .iter()
                .filter(|(open, close, _)| *open <= t && t < *close)
                .filter_map(|(_, _, arrivals)| arrivals.iter().rev().find(|a| **a <= t))
                .map(|a| t - a)
                .fold(None, |m: Option<f64>, age| {
                    Some(m.map_or(age, |m| m.min(age)))
                });
            let age = match youngest {
                Some(age) => {
                    let jiffies = (age / 0.004).floor() * 0.004;
                    last_seen = Some(t - age);
                    Some(jiffies + TICK.as_secs_f64())
                }
                None => last_seen.map(|seen| t - seen),
            };
            ages.extend(age);
            t += 1.5 + random.next();
        }
        estimate(&ages)
    }

    fn true_rate(sockets: &[Socket]) -> f64 {
        sockets.iter().map(|(_, _, a)| a.len()).sum::<usize>() as f64 / WINDOW
    }

    fn periodic(gap: f64, phase: f64) -> Vec<f64> {
        (0..)
            .map(|i| phase + i as f64 * gap)
            .take_while(|t| *t < WINDOW)
            .collect()
    }

    fn poisson(mean_gap: f64, random: &mut Random) -> Vec<f64> {
        let mut t = random.exponential(mean_gap);
        let mut arrivals = vec![];
        while t < WINDOW {
            arrivals.push(t);
            t += random.exponential(mean_gap);
        }
        arrivals
    }

    fn kept_alive(arrivals: Vec<f64>) -> Socket {
        (0.0, f64::INFINITY, arrivals)
    }

    /// Runs `traffic` over 300 seeds; returns the estimates over the true rates.
    fn ratios(traffic: impl Fn(&mut Random) -> Vec<Socket>) -> Vec<f64> {
        (1..=300)
            .map(|seed| {
                let mut random = Random(seed * 0x9E37_79B9_7F4A_7C15);
                let sockets = traffic(&mut random);
                let truth = true_rate(&sockets);
                estimated(&sockets, &mut random).map_or(0.0, |r| r / truth.min(CEILING))
            })
            .collect()
    }

    /// No estimate above the truth, and the median one at least `median_at_least` of it.
    fn never_overstated(what: &str, ratios: &[f64], median_at_least: f64) {
        let (worst, median) = (worst(ratios), median(ratios));
        println!("{what}: estimate / truth worst {worst:.2}, median {median:.2}");
        assert!(worst <= 1.0, "{what}: {ratios:?}");
        assert!(
            median >= median_at_least,
            "{what}: too pessimistic: {ratios:?}"
        );
    }

    fn worst(ratios: &[f64]) -> f64 {
        ratios.iter().copied().fold(0.0, f64::max)
    }

    fn median(ratios: &[f64]) -> f64 {
        let mut sorted = ratios.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    }

    #[test]
    fn steady_arrivals_are_never_overstated() {
        // 4 requests/s on one connection, and 4/s spread evenly over 20 (each every 5 s).
        for sockets in [1, 20] {
            let gap = sockets as f64 / 4.0;
            let r = ratios(|random| {
                (0..sockets)
                    .map(|i| kept_alive(periodic(gap, (i as f64 + random.next()) * 0.25)))
                    .collect()
            });
            never_overstated(&format!("steady 4/s over {sockets}"), &r, 0.6);
        }
    }

    #[test]
    fn poisson_arrivals_are_never_overstated_and_read_a_third_to_a_half() {
        for rate in [0.5, 3.0, 15.0] {
            let r = ratios(|random| {
                (0..20)
                    .map(|_| kept_alive(poisson(20.0 / rate, random)))
                    .collect()
            });
            never_overstated(&format!("Poisson {rate}/s over 20"), &r, 0.25);
        }
    }

    #[test]
    fn bursts_after_idle_are_never_overstated() {
        // 30 requests within 0.3 s every 10 s, over 5 connections: 3/s on average.
        let r = ratios(|random| {
            let phase = random.next() * 10.0;
            (0..5)
                .map(|c| {
                    let arrivals = (0..6)
                        .flat_map(|burst| {
                            (0..6).map(move |i| {
                                phase + burst as f64 * 10.0 + (i * 5 + c) as f64 * 0.01
                            })
                        })
                        .filter(|t| *t < WINDOW)
                        .collect();
                    kept_alive(arrivals)
                })
                .collect()
        });
        never_overstated("bursts", &r, 0.0);
    }

    #[test]
    fn short_connections_that_close_are_never_overstated() {
        // 2 requests/s, each on a connection of its own that closes 50 ms later.
        let r = ratios(|random| {
            poisson(0.5, random)
                .into_iter()
                .map(|t| (t, t + 0.05, vec![t]))
                .collect()
        });
        never_overstated("short connections", &r, 0.0);
    }

    #[test]
    fn one_connection_carrying_everything_reads_up_to_the_ceiling() {
        // 150 requests/s multiplexed on one connection: the estimate reaches the ceiling.
        let mut random = Random(7);
        let sockets = vec![kept_alive(poisson(1.0 / 150.0, &mut random))];
        let rate = estimated(&sockets, &mut random).unwrap();
        assert!(rate <= CEILING && rate > CEILING * 0.9, "{rate}");
        // 6 requests/s: read below the truth.
        let sockets = vec![kept_alive(poisson(1.0 / 6.0, &mut random))];
        let rate = estimated(&sockets, &mut random).unwrap();
        assert!(rate <= 6.0 && rate > 1.5, "{rate}");
    }

    #[test]
    fn one_big_upload_is_bounded_by_the_ceiling() {
        // 0.2 requests/s, and one upload that streams for 40 s: the upload's data looks like
        // arrivals; the estimate stays at or under the ceiling (the stated bound), no more.
        let mut random = Random(11);
        let upload: Vec<f64> = (0..40_000).map(|i| 5.0 + i as f64 * 0.001).collect();
        let sockets = vec![kept_alive(poisson(5.0, &mut random)), (5.0, 45.1, upload)];
        let rate = estimated(&sockets, &mut random).unwrap();
        println!("upload: {rate:.2}/s");
        assert!(rate <= CEILING, "{rate}");
    }

    /// Real sockets read through sock_diag: 12 requests/s over 3 loopback connections, read 40
    /// times at jittered intervals, as the watcher reads them.
    #[test]
    fn real_socket_readings_never_overstate_the_rate() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients: Vec<std::net::TcpStream> = (0..3)
            .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
            .collect();
        let servers: Vec<std::net::TcpStream> =
            (0..3).map(|_| listener.accept().unwrap().0).collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let sender = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut sent = 0u32;
                let start = std::time::Instant::now();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    (&clients[sent as usize % 3])
                        .write_all(b"GET / HTTP/1.1\r\n\r\n")
                        .unwrap();
                    sent += 1;
                    let next = start + Duration::from_millis(u64::from(sent) * 1000 / 12);
                    std::thread::sleep(next.saturating_duration_since(std::time::Instant::now()));
                }
                (sent, start.elapsed())
            })
        };
        let mut sampler = crate::tcp::TcpSampler::new().unwrap();
        let mut random = Random(3);
        let mut samples = AgeSamples::default();
        let t0 = Instant::now();
        let mut at = t0;
        for _ in 0..40 {
            std::thread::sleep(Duration::from_millis(60 + (random.next() * 80.0) as u64));
            let connections = sampler.connections(&[port]).unwrap();
            at += SAMPLE_EVERY;
            if let Some(age) = youngest(&connections) {
                samples.record(at, age, Duration::from_secs(3600));
            }
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (sent, took) = sender.join().unwrap();
        // Never read by the server: the kernel counts what it received all the same.
        drop(servers);
        let truth = f64::from(sent) / took.as_secs_f64();
        let rate = samples.rate(t0, at).expect("40 readings").per_s;
        println!("real sockets: {rate:.2}/s estimated, {truth:.2}/s sent");
        assert!(rate <= truth, "{rate} > {truth}");
        assert!(rate > truth / 4.0, "{rate} far under {truth}");
    }

    #[test]
    fn too_few_readings_give_no_rate() {
        assert_eq!(estimate(&[0.1; MIN_SAMPLES - 1]), None);
        assert!(estimate(&[0.1; MIN_SAMPLES]).is_some());
        assert_eq!(estimate(&[0.0; MIN_SAMPLES]), None);
    }

    #[test]
    fn arrival_times_are_the_latest_the_age_allows() {
        let at = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            arrived(at, Duration::from_millis(300)),
            at - Duration::from_millis(290)
        );
        assert_eq!(
            arrived(at, Duration::from_millis(4)),
            at,
            "never after the reading"
        );
        let conn = |bytes, age: u64| Connection {
            local_port: 80,
            remote: "10.0.0.1:1".parse().unwrap(),
            inode: 1,
            cookie: age,
            bytes_received: Some(bytes),
            last_data_recv: Some(Duration::from_millis(age)),
        };
        // An idle connection that never received a byte is no arrival.
        assert_eq!(
            youngest(&[conn(0, 5), conn(10, 300), conn(10, 40)]),
            Some(Duration::from_millis(50))
        );
        assert_eq!(youngest(&[conn(0, 5)]), None);
    }

    #[test]
    fn the_higher_of_two_safe_rates_is_kept() {
        let ages = Rate {
            per_s: 9.0,
            source: RateSource::SocketAges,
        };
        let count = Rate {
            per_s: 4.0,
            source: RateSource::ArrivalCount,
        };
        assert_eq!(Rate::max(Some(count), Some(ages)), Some(ages));
        assert_eq!(Rate::max(Some(count), None), Some(count));
        assert_eq!(Rate::max(None, None), None);
    }
}
