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
    /// One request every `gap` in all, from `connections` kept-alive clients taking turns (each
    /// sends every `connections * gap`, on its own connection, reconnecting if it breaks).
    KeptAlive { connections: u32, gap: Duration },
}

impl Arrivals {
    pub fn mean_gap(self) -> Duration {
        match self {
            Arrivals::Fixed(gap) | Arrivals::Poisson(gap) | Arrivals::KeptAlive { gap, .. } => gap,
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
        if let Arrivals::KeptAlive { connections, gap } = arrivals {
            let dispatcher = {
                let (stop, stats, clock) = (stop.clone(), stats.clone(), clock.clone());
                thread::spawn(move || {
                    let clients: Vec<JoinHandle<()>> = (0..connections)
                        .map(|i| {
                            let (stop, stats, clock) = (stop.clone(), stats.clone(), clock.clone());
                            let first = Instant::now() + gap * i;
                            thread::spawn(move || {
                                KeptAlive::new(addr).run(
                                    first,
                                    gap * connections,
                                    &stop,
                                    &stats,
                                    &clock,
                                )
                            })
                        })
                        .collect();
                    for client in clients {
                        client.join().expect("a kept-alive client panicked");
                    }
                })
            };
            return Load {
                stop,
                dispatcher: Some(dispatcher),
                stats,
            };
        }
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
                        Arrivals::Fixed(interval) | Arrivals::KeptAlive { gap: interval, .. } => {
                            interval
                        }
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

/// A client that keeps its connection to the load balancer alive across requests.
struct KeptAlive {
    addr: SocketAddr,
    stream: Option<TcpStream>,
}

impl KeptAlive {
    fn new(addr: SocketAddr) -> Self {
        KeptAlive { addr, stream: None }
    }

    /// Sends a request every `period` from `first` until `stop`; after a stall, goes on from now.
    fn run(
        mut self,
        first: Instant,
        period: Duration,
        stop: &AtomicBool,
        stats: &LoadStats,
        clock: &Clock,
    ) {
        let mut next = first;
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            if now < next {
                thread::sleep((next - now).min(Duration::from_millis(50)));
                continue;
            }
            record(stats, clock, now, self.request());
            next = (next + period).max(Instant::now());
        }
    }

    fn request(&mut self) -> Result<(), String> {
        let result = self.try_request();
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn try_request(&mut self) -> Result<(), String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(2))
                .map_err(|e| format!("connect: {e}"))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .map_err(|e| format!("socket options: {e}"))?;
            let _ = stream.set_nodelay(true);
            self.stream = Some(stream);
        }
        let stream = self.stream.as_mut().expect("connected");
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: e2e\r\n\r\n")
            .map_err(|e| format!("write: {e}"))?;
        let response = read_response(stream)?;
        check_response(&response)
    }
}

/// One HTTP/1.1 response with a Content-Length body, read off a kept-alive connection.
fn read_response(stream: &mut TcpStream) -> Result<String, String> {
    let mut bytes = Vec::new();
    let mut chunk = [0; 4096];
    loop {
        if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&bytes[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if bytes.len() >= end + 4 + length {
                return Ok(String::from_utf8_lossy(&bytes).into_owned());
            }
        }
        let n = stream
            .read(&mut chunk)
            .map_err(|e| format!("read: {e} (got {} bytes)", bytes.len()))?;
        if n == 0 {
            return Err(format!("connection closed (got {} bytes)", bytes.len()));
        }
        bytes.extend_from_slice(&chunk[..n]);
    }
}

fn one_load_request(addr: SocketAddr, stats: &LoadStats, clock: &Clock) {
    let started = Instant::now();
    record(stats, clock, started, request(addr));
}

/// Counts one request sent at `started`, and its failure if it failed.
fn record(stats: &LoadStats, clock: &Clock, started: Instant, result: Result<(), String>) {
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
    check_response(&String::from_utf8_lossy(&response))
}

/// Ok only for a 200 from the demo app.
fn check_response(response: &str) -> Result<(), String> {
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
