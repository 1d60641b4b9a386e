//! Hostile clients of the probe port, for the tests and the benchmark: crowds of idle, slow and
//! never-ending connections that reopen as soon as drainit closes them, and kubelet-style probes
//! timed from a separate client.
#![allow(dead_code)] // each user takes its own part

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const MS: fn(u64) -> Duration = Duration::from_millis;
const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Hostile connections of one kind, each reopened as soon as drainit closes it.
#[derive(Clone, Copy, Debug)]
pub enum Hostile {
    /// Connects and sends nothing.
    Idle,
    /// Sends a request line, then a header byte now and then.
    Slowloris,
    /// Sends 3 KB of a header that never ends.
    Unterminated,
}

/// A connection from `source` (any 127.x.y.z reaches loopback), as another pod would make.
pub fn connect_from(source: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    use nix::libc;
    // SAFETY: plain socket calls on a descriptor this function owns; on success it is handed to
    // a TcpStream, which closes it.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let stream = TcpStream::from_raw_fd(fd);
        let sockaddr = |addr: SocketAddrV4| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(*addr.ip()).to_be(),
            },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let from = sockaddr(SocketAddrV4::new(source, 0));
        let SocketAddr::V4(to) = to else { return None };
        let to = sockaddr(to);
        let bound = libc::bind(stream.as_raw_fd(), (&raw const from).cast(), len) == 0;
        let connected =
            bound && libc::connect(stream.as_raw_fd(), (&raw const to).cast(), len) == 0;
        connected.then_some(stream)
    }
}

/// Holds `count` hostile connections of `kind` from 40 addresses until dropped.
pub struct Crowd {
    running: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<u64>>,
}

impl Crowd {
    pub fn hold(kind: Hostile, count: usize, to: SocketAddr) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let threads = (0..2)
            .map(|t| {
                let running = running.clone();
                thread::spawn(move || hold_connections(kind, count / 2, t, to, &running))
            })
            .collect();
        Self { running, threads }
    }

    /// Stops; returns how many connections were opened in all.
    pub fn stop(mut self) -> u64 {
        self.running.store(false, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap()).sum()
    }
}

fn hold_connections(
    kind: Hostile,
    count: usize,
    thread: usize,
    to: SocketAddr,
    running: &AtomicBool,
) -> u64 {
    let mut slots: Vec<Option<TcpStream>> = (0..count).map(|_| None).collect();
    let mut opened = 0u64;
    let mut buffer = [0u8; 512];
    while running.load(Ordering::Relaxed) {
        for (i, slot) in slots.iter_mut().enumerate() {
            // Open while reading would block (an answer means drainit is done with it).
            let closed = match slot {
                Some(stream) => match stream.read(&mut buffer) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if let Hostile::Slowloris = kind {
                            let _ = stream.write(b"a");
                        }
                        false
                    }
                    _ => true,
                },
                None => true,
            };
            if closed {
                let source = Ipv4Addr::new(127, 0, 1 + thread as u8, 2 + (i % 20) as u8);
                *slot = connect_from(source, to).map(|mut stream| {
                    stream.set_nonblocking(true).unwrap();
                    let _ = match kind {
                        Hostile::Idle => Ok(0),
                        Hostile::Slowloris => stream.write(b"GET /ready HTTP/1.1\r\nX-A: "),
                        Hostile::Unterminated => stream.write(
                            format!("GET /ready HTTP/1.1\r\nX-A: {}", "c".repeat(3000)).as_bytes(),
                        ),
                    };
                    opened += 1;
                    stream
                });
            }
        }
        thread::sleep(MS(20));
    }
    opened
}

/// Kubelet-style probes (a new connection each, `kube-probe/` User-Agent, 1 s timeout as the
/// kubelet's default) every 10 ms for `duration`; returns each one's latency, None if it failed.
pub fn kubelet_probes(addr: SocketAddr, duration: Duration) -> Vec<Option<Duration>> {
    let started = Instant::now();
    let mut results = Vec::new();
    while started.elapsed() < duration {
        let path = if results.len() % 2 == 0 {
            "/alive"
        } else {
            "/ready"
        };
        let asked = Instant::now();
        let answered = (|| {
            let mut stream = TcpStream::connect_timeout(&addr, SECS(1)).ok()?;
            stream.set_read_timeout(Some(SECS(1))).ok()?;
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.31\r\nConnection: close\r\n\r\n"
            );
            stream.write_all(request.as_bytes()).ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            response
                .starts_with("HTTP/1.1 200")
                .then(|| asked.elapsed())
        })();
        results.push(answered);
        thread::sleep(MS(10));
    }
    results
}

/// `per_source` `/ready` requests with a distinct User-Agent each, kept alive from each of
/// `sources` addresses (127.0.3.x) in turn: every one a would-be load balancer for the checker
/// table. Returns how many were answered; stops early at the first connection drainit closes.
pub fn distinct_user_agents(addr: SocketAddr, sources: u8, per_source: usize, tag: &str) -> usize {
    let mut answered = 0;
    let mut buffer = [0u8; 4096];
    for s in 0..sources {
        let Some(mut stream) = connect_from(Ipv4Addr::new(127, 0, 3, 1 + s), addr) else {
            return answered;
        };
        let _ = stream.set_read_timeout(Some(SECS(5)));
        for i in 0..per_source {
            let request = format!(
                "GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: {tag}-{s}-{i}-{}\r\n\r\n",
                "x".repeat(100)
            );
            if stream.write_all(request.as_bytes()).is_err() {
                return answered;
            }
            match stream.read(&mut buffer) {
                Ok(n) if n > 0 => answered += 1,
                _ => return answered,
            }
        }
    }
    answered
}

/// Clients that poll `/status` and `/metrics` back to back (each a new connection), plus one
/// that keeps adding distinct User-Agents so the full checker table keeps changing, until
/// dropped: the renders and the table's churn that once froze drainit's single thread.
pub struct StatusPollers {
    running: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<usize>>,
}

impl StatusPollers {
    pub fn start(addr: SocketAddr, pollers: usize) -> Self {
        let running = Arc::new(AtomicBool::new(true));
        let mut threads: Vec<_> = (0..pollers)
            .map(|_| {
                let running = running.clone();
                thread::spawn(move || poll_status(addr, &running))
            })
            .collect();
        let churning = running.clone();
        threads.push(thread::spawn(move || {
            let mut round = 0;
            while churning.load(Ordering::Relaxed) {
                if distinct_user_agents(addr, 4, 50, &format!("churn{round}")) == 0 {
                    break;
                }
                round += 1;
            }
            0
        }));
        Self { running, threads }
    }

    /// Stops; returns how many `/status` and `/metrics` renders were answered.
    pub fn stop(mut self) -> usize {
        self.running.store(false, Ordering::Relaxed);
        self.threads.drain(..).map(|t| t.join().unwrap()).sum()
    }
}

fn poll_status(addr: SocketAddr, running: &AtomicBool) -> usize {
    let mut answered = 0;
    for path in ["/status", "/metrics"].iter().cycle() {
        if !running.load(Ordering::Relaxed) {
            break;
        }
        let rendered = (|| {
            let mut stream = TcpStream::connect_timeout(&addr, SECS(1)).ok()?;
            stream.set_read_timeout(Some(SECS(5))).ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).ok()?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).ok()?;
            response.starts_with(b"HTTP/1.1 200").then_some(())
        })();
        match rendered {
            Some(()) => answered += 1,
            // drainit is gone (the budget kill's exit): nothing left to poll.
            None => thread::sleep(MS(5)),
        }
    }
    answered
}

/// The grace period of `budget_kill_while_status_is_polled`: the kill is due 1 s before it.
pub const POLLED_GRACE: Duration = Duration::from_secs(3);

/// What `budget_kill_while_status_is_polled` saw.
pub struct PolledKill {
    /// From SIGTERM until the app was gone.
    pub killed_after: Duration,
    pub exit_code: Option<i32>,
    /// Entries in `/status`'s checker table before SIGTERM.
    pub checkers: usize,
    /// `/status` and `/metrics` renders answered meanwhile.
    pub renders: usize,
}

/// Issue 9's freeze: an app that ignores SIGTERM, the checker table filled with 10,000 distinct
/// User-Agents from 20 addresses, then 2 clients polling `/status` and `/metrics` (and one
/// churning the table) through SIGTERM until the budget kill.
pub fn budget_kill_while_status_is_polled() -> PolledKill {
    use super::{Drainit, is_running};
    use nix::sys::signal::Signal;
    let grace = format!("{}s", POLLED_GRACE.as_secs());
    let mut drainit = Drainit::demo(
        &["--drain-delay", "0", "--grace-period", &grace],
        &["--ignore-term"],
    );
    let app = drainit.app_pid();
    let health = drainit.health;
    assert_eq!(distinct_user_agents(health, 20, 500, "fill"), 10_000);
    let status = drainit.status();
    let checkers = status["lb_probes"]["checkers"]
        .as_array()
        .map_or(0, Vec::len);
    let pollers = StatusPollers::start(health, 2);
    // The pollers load drainit half a second before SIGTERM (a load, not a wait).
    thread::sleep(MS(500));
    let sigterm = drainit.signal_at(Signal::SIGTERM);
    while is_running(app) && sigterm.elapsed() < POLLED_GRACE * 3 {
        thread::sleep(MS(1));
    }
    let killed_after = sigterm.elapsed();
    let exit_code = drainit.wait(SECS(10)).code();
    PolledKill {
        killed_after,
        exit_code,
        checkers,
        renders: pollers.stop(),
    }
}
