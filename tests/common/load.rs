//! An open-loop load generator through the load balancer, counting what fails and when.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::clock::Clock;
use super::haproxy::SLOW;

/// When the load generator sends.
#[derive(Debug, Clone, Copy)]
pub enum Arrivals {
    /// One request every interval.
    Fixed(Duration),
    /// A Poisson process with this mean gap (exponential gaps), as independent clients send.
    Poisson(Duration),
}

impl Arrivals {
    pub fn mean_gap(self) -> Duration {
        match self {
            Arrivals::Fixed(gap) | Arrivals::Poisson(gap) => gap,
        }
    }
}

/// Open-loop load: requests go out on schedule whatever happened to the previous ones, each on
/// its own short-lived thread. (Closed-loop clients would stall on the first request HAProxy
/// holds for 3 s of retries and stop sending during exactly the outage the test measures.)
pub struct Load {
    stop: Arc<AtomicBool>,
    dispatcher: Option<JoinHandle<()>>,
    stats: Arc<LoadStats>,
}

impl Drop for Load {
    /// A failed test stops its load too.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct LoadStats {
    requests: AtomicU64,
    slow: AtomicU64,
    max_latency_us: AtomicU64,
    failures: Mutex<Vec<(Duration, String)>>,
}

pub struct Latency {
    pub max: Duration,
    pub slow: u64,
}

/// What the load saw: requests sent, failures (when sent, on the test's clock, and why), latency.
pub struct LoadReport {
    pub requests: u64,
    pub failures: Vec<(Duration, String)>,
    pub latency: Latency,
}

impl Load {
    pub fn start(addr: SocketAddr, arrivals: Arrivals, clock: &Clock) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(LoadStats::default());
        let dispatcher = {
            let (stop, stats, clock) = (stop.clone(), stats.clone(), clock.clone());
            thread::spawn(move || {
                let mut random = XorShift::seeded();
                let mut in_flight: Vec<JoinHandle<()>> = Vec::new();
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let (stats, clock) = (stats.clone(), clock.clone());
                    let worker = thread::Builder::new()
                        .stack_size(256 * 1024)
                        .spawn(move || one_load_request(addr, &stats, &clock))
                        .expect("cannot start a load thread");
                    in_flight.push(worker);
                    in_flight.retain(|t| !t.is_finished());
                    let gap = match arrivals {
                        Arrivals::Fixed(interval) => interval,
                        Arrivals::Poisson(mean) => mean.mul_f64(random.exponential()),
                    };
                    // After a stall (a busy machine), go on from now, no burst.
                    next = (next + gap).max(Instant::now());
                    // Sleep in slices, so that a slow Poisson load stops promptly.
                    while !stop.load(Ordering::Relaxed) && Instant::now() < next {
                        let left = next.saturating_duration_since(Instant::now());
                        thread::sleep(left.min(Duration::from_millis(50)));
                    }
                }
                for worker in in_flight {
                    worker.join().expect("a load thread panicked");
                }
            })
        };
        Load {
            stop,
            dispatcher: Some(dispatcher),
            stats,
        }
    }

    /// Requests sent so far.
    pub fn requests(&self) -> u64 {
        self.stats.requests.load(Ordering::Relaxed)
    }

    /// Stops sending and waits for the requests in flight.
    pub fn stop(mut self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(dispatcher) = self.dispatcher.take() {
            dispatcher.join().expect("the load dispatcher panicked");
        }
        let mut failures = std::mem::take(&mut *self.stats.failures.lock().unwrap());
        failures.sort_by_key(|(at, _)| *at);
        LoadReport {
            requests: self.stats.requests.load(Ordering::Relaxed),
            failures,
            latency: Latency {
                max: Duration::from_micros(self.stats.max_latency_us.load(Ordering::Relaxed)),
                slow: self.stats.slow.load(Ordering::Relaxed),
            },
        }
    }
}

/// xorshift64*: enough randomness for arrival times, no dependency.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        XorShift((nanos ^ (u64::from(std::process::id()) << 32)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Exponentially distributed with mean 1.
    fn exponential(&mut self) -> f64 {
        // Uniform in (0, 1]: never ln(0).
        let uniform = ((self.next() >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
        -uniform.ln()
    }
}

fn one_load_request(addr: SocketAddr, stats: &LoadStats, clock: &Clock) {
    let started = Instant::now();
    let result = request(addr);
    let took = started.elapsed();
    stats.requests.fetch_add(1, Ordering::Relaxed);
    stats
        .max_latency_us
        .fetch_max(took.as_micros() as u64, Ordering::Relaxed);
    if took >= SLOW {
        stats.slow.fetch_add(1, Ordering::Relaxed);
    }
    if let Err(e) = result {
        let at = clock.since_start(started);
        let message = format!(
            "{e} (sent at +{} ms, after {} ms)",
            at.as_millis(),
            took.as_millis()
        );
        clock.event_at(at, format!("request failed: {message}"));
        stats.failures.lock().unwrap().push((at, message));
    }
}

/// One `GET /` on a new connection; Ok only for a 200 from the demo app.
fn request(addr: SocketAddr) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    // Longer than HAProxy's own timeouts, so that HAProxy reports its errors as status codes.
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| stream.set_write_timeout(Some(Duration::from_secs(2))))
        .map_err(|e| format!("socket options: {e}"))?;
    let _ = stream.set_nodelay(true);
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = Vec::new();
    stream
        .read_to_end(&mut response)
        .map_err(|e| format!("read: {e} (got {} bytes)", response.len()))?;
    let response = String::from_utf8_lossy(&response);
    let status_line = response.lines().next().unwrap_or("");
    if !status_line.starts_with("HTTP/1.1 200 ") {
        let first = if status_line.is_empty() {
            "empty response".to_owned()
        } else {
            status_line.to_owned()
        };
        return Err(format!(
            "{first}: {:?}",
            response.lines().last().unwrap_or("")
        ));
    }
    if !response.contains("hello from ") {
        return Err(format!("200 without the demo app's body: {response:?}"));
    }
    Ok(())
}
