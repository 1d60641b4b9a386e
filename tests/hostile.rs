//! The probe port faces every client in the cluster (issue 9): each attack on the real binary,
//! with its limit asserted. Memory is drainit's resident set (/proc/<pid>/status VmRSS); probes
//! are answered to a separate client. Timing bars (10 ms per probe) are printed by the benchmark.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::hostile::{Crowd, Hostile, POLLED_GRACE, distinct_user_agents, kubelet_probes};
use common::{
    Checker, Drainit, first_child, get_request, http_request, json, refused_with, resident_kb,
};
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const SECS: fn(u64) -> Duration = Duration::from_secs;
const MS: fn(u64) -> Duration = Duration::from_millis;
/// The bar: no sequence of requests raises drainit's resident memory past this.
const MAX_RSS_KB: u64 = 8 * 1024;
/// Under 2,000 held connections, the most drainit's memory may grow: the idle connections'
/// 3 MB, the serving ones' 0.4 MB and the allocator's slack. (drainit starts at about 4 MB built
/// against glibc, as here, and at about 1.2 MB as the static musl build that ships: under 8 MB
/// there.)
const CROWD_GROWTH_KB: u64 = 6 * 1024;
/// ...and it comes back to within this of where it started once the clients are gone.
const RETURNS_WITHIN_KB: u64 = 1024;

fn rss_kb(pid: i32) -> u64 {
    resident_kb(pid).expect("VmRSS in /proc/<pid>/status")
}

/// Samples drainit's resident memory every 5 ms until dropped; `peak` is the highest seen.
struct RssWatch {
    peak: Arc<AtomicU64>,
    running: Arc<AtomicBool>,
}

impl RssWatch {
    fn start(pid: i32) -> Self {
        let peak = Arc::new(AtomicU64::new(rss_kb(pid)));
        let running = Arc::new(AtomicBool::new(true));
        let (p, r) = (peak.clone(), running.clone());
        thread::spawn(move || {
            while r.load(Ordering::Relaxed) {
                let Some(now) = resident_kb(pid) else { return };
                p.fetch_max(now, Ordering::Relaxed);
                thread::sleep(MS(5));
            }
        });
        Self { peak, running }
    }

    fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.running.store(false, Ordering::Relaxed);
    }
}

/// drainit around the demo app, warmed up: its memory as a probed pod's.
fn probed_demo(options: &[&str]) -> (Drainit, u64) {
    let drainit = Drainit::demo(options, &[]);
    for _ in 0..50 {
        assert_eq!(kubelet_probe(drainit.health, "/ready").0, 200);
    }
    // Memory settles after the warm-up before the baseline is read (a measurement, no event).
    thread::sleep(MS(200));
    let start = rss_kb(drainit.pid().as_raw());
    (drainit, start)
}

fn kubelet_probe(addr: SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, &get_request(path, "kube-probe/1.31"))
}

/// Sends `request` and reads the status code, if the server answered one.
fn try_request(addr: SocketAddr, request: &str) -> Option<u16> {
    common::try_request(addr, request, SECS(5))
        .ok()
        .map(|(code, _)| code)
}

/// Runs `work(i)` for `0..n` on `threads` threads.
fn in_parallel(threads: usize, n: usize, work: impl Fn(usize) + Send + Sync + 'static) {
    let work = Arc::new(work);
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let work = work.clone();
            thread::spawn(move || (t..n).step_by(threads).for_each(|i| work(i)))
        })
        .collect();
    handles.into_iter().for_each(|h| h.join().unwrap());
}

/// Waits for drainit's memory to settle back near `start`; returns where it settled.
fn settled_rss(pid: i32, start: u64) -> u64 {
    let mut rss = rss_kb(pid);
    for _ in 0..40 {
        if rss <= start + RETURNS_WITHIN_KB {
            break;
        }
        thread::sleep(MS(100));
        rss = rss_kb(pid);
    }
    rss
}

/// 2,000 `/ready` requests with 100 KB User-Agents, from 8 threads; returns how many were
/// answered 431.
fn huge_user_agents(health: SocketAddr) -> u64 {
    let answered_431 = Arc::new(AtomicU64::new(0));
    let counted = answered_431.clone();
    in_parallel(8, 2000, move |_| {
        let agent = "a".repeat(100 * 1024);
        let request = format!("GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n\r\n");
        if try_request(health, &request) == Some(431) {
            counted.fetch_add(1, Ordering::Relaxed);
        }
    });
    answered_431.load(Ordering::Relaxed)
}

/// `count` connections at once, each sending 400 KB of headers that never end (as much as
/// drainit takes in), held until dropped.
fn unterminated_headers(health: SocketAddr, count: usize) -> Vec<TcpStream> {
    let held: Vec<TcpStream> = (0..count)
        .filter_map(|_| TcpStream::connect(health).ok())
        .collect();
    let chunk = format!("GET /ready HTTP/1.1\r\nX-Pad: {}", "b".repeat(4096));
    for _ in 0..100 {
        for mut stream in &held {
            let _ = stream.set_nonblocking(true);
            let _ = stream.write(chunk.as_bytes());
        }
    }
    held
}

#[test]
fn huge_user_agents_and_unterminated_headers_get_431_and_leave_no_memory_behind() {
    let (mut drainit, start) = probed_demo(&[]);
    let pid = drainit.pid().as_raw();
    let health = drainit.health;
    let watch = RssWatch::start(pid);

    // Measured before: +191 MB, never freed.
    assert!(
        huge_user_agents(health) > 0,
        "oversized headers are answered 431"
    );
    // Measured before: 4 MB -> 205 MB resident.
    let held = unterminated_headers(health, 500);
    assert_eq!(
        kubelet_probe(health, "/alive").0,
        200,
        "PID 1 still answers"
    );
    // The peak is sampled (every 5 ms) while the connections are held.
    thread::sleep(MS(300));
    let peak = watch.peak();
    drop(held);

    let settled = settled_rss(pid, start);
    eprintln!("resident: {start} kB at start, peak {peak} kB, {settled} kB after");
    assert!(peak <= MAX_RSS_KB, "peak {peak} kB (start {start} kB)");
    assert!(
        settled <= start + RETURNS_WITHIN_KB,
        "{settled} kB after the clients left, {start} kB at start"
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}

#[test]
fn many_distinct_user_agents_keep_the_checker_table_and_status_small() {
    let (mut drainit, start) = probed_demo(&[]);
    let pid = drainit.pid().as_raw();
    let health = drainit.health;
    let watch = RssWatch::start(pid);
    // 20,000 distinct User-Agents of 2 KB each, on kept-alive connections from 4 threads
    // (measured before: 100,000 short ones took 17 MB and made /status 21 MB, 4.3 s to render).
    in_parallel(4, 4, move |t| {
        let mut stream = TcpStream::connect(health).unwrap();
        stream.set_read_timeout(Some(SECS(5))).unwrap();
        let mut buffer = [0u8; 4096];
        for i in 0..5000 {
            let agent = format!("agent-{t}-{i}-{}", "x".repeat(2000));
            let request = format!("GET /ready HTTP/1.1\r\nHost: x\r\nUser-Agent: {agent}\r\n\r\n");
            stream.write_all(request.as_bytes()).unwrap();
            let n = stream.read(&mut buffer).unwrap();
            assert!(buffer[..n].starts_with(b"HTTP/1.1 200"));
        }
    });
    let asked = Instant::now();
    let (code, body) = http_request(
        health,
        "GET /status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let took = asked.elapsed();
    assert_eq!(code, 200);
    let status = json(body.split("\r\n\r\n").nth(1).unwrap());
    let checkers = status["lb_probes"]["checkers"].as_array().unwrap();
    eprintln!(
        "/status: {} bytes, {} checkers, {} dropped, {took:?}; resident {start} kB at start, peak {} kB",
        body.len(),
        checkers.len(),
        status["lb_probes"]["checkers_dropped"],
        watch.peak()
    );
    assert!(checkers.len() <= 64 + 8, "{} checkers", checkers.len());
    assert!(
        checkers
            .iter()
            .all(|c| c["user_agent"].as_str().unwrap().len() <= 128)
    );
    assert!(status["lb_probes"]["checkers_dropped"].as_u64().unwrap() > 19_000);
    assert!(body.len() < 64 * 1024, "/status is {} bytes", body.len());
    assert!(took < SECS(1), "/status took {took:?}");
    assert!(watch.peak() <= MAX_RSS_KB, "peak {} kB", watch.peak());
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}

#[test]
fn the_budget_kill_is_on_time_while_clients_poll_status_with_a_full_checker_table() {
    // Measured before: with 100,000 checkers and 2 clients polling /status, the kill came
    // 1,157 ms late. The precise bar (300 ms) is the benchmark's.
    let run = common::hostile::budget_kill_while_status_is_polled();
    let due = POLLED_GRACE - SECS(1);
    eprintln!(
        "budget kill {:?} after SIGTERM ({:?} from grace - 1 s), {} checkers, {} renders",
        run.killed_after,
        run.killed_after.abs_diff(due),
        run.checkers,
        run.renders
    );
    assert_eq!(run.exit_code, Some(137), "the budget kill's exit code");
    assert_eq!(run.checkers, 64, "the checker table was full");
    assert!(run.renders > 0, "the clients were answered while polling");
    // Never early (a loaded machine only makes it later), and under 1 s late.
    assert!(
        run.killed_after > due - MS(100) && run.killed_after < due + SECS(1),
        "budget kill {:?} after SIGTERM, due at {due:?}",
        run.killed_after
    );
}

#[test]
fn two_thousand_idle_and_slow_connections_never_keep_the_kubelet_out() {
    let (mut drainit, start) = probed_demo(&[]);
    let health = drainit.health;
    let watch = RssWatch::start(drainit.pid().as_raw());
    // Measured before: 520 idle connections made 134-169 of 200 kubelet probes fail.
    let crowds = [
        Crowd::hold(Hostile::Idle, 800, health),
        Crowd::hold(Hostile::Slowloris, 600, health),
        Crowd::hold(Hostile::Unterminated, 600, health),
    ];
    // The crowd holds its connections a second before the kubelet probes (a measured load).
    thread::sleep(SECS(1));
    let results = kubelet_probes(health, SECS(4));
    let opened: u64 = crowds.into_iter().map(Crowd::stop).sum();
    let failed = results.iter().filter(|r| r.is_none()).count();
    let mut latencies: Vec<Duration> = results.iter().flatten().copied().collect();
    latencies.sort();
    let slowest = latencies.last().copied().unwrap_or_default();
    eprintln!(
        "{} kubelet probes, {failed} failed, slowest {slowest:?}; {opened} hostile connections \
         opened; resident {start} kB at start, peak {} kB",
        results.len(),
        watch.peak()
    );
    assert!(opened >= 2000, "the crowd held its connections: {opened}");
    assert!(results.len() >= 100);
    assert_eq!(failed, 0, "every kubelet probe answered 200 within 1 s");
    assert!(
        watch.peak() <= start + CROWD_GROWTH_KB,
        "peak {} kB, start {start} kB",
        watch.peak()
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}

/// Whether the kubelet is told ready (the start-up gate applies to it alone).
fn kubelet_ready(drainit: &Drainit) -> bool {
    kubelet_probe(drainit.health, "/ready").0 == 200
}

fn stranger(drainit: &Drainit, agent: &str) {
    assert_eq!(
        http_request(drainit.health, &get_request("/ready", agent)).0,
        200
    );
}

#[test]
fn strangers_neither_open_nor_hold_the_start_up_gate() {
    let mut drainit = Drainit::demo(
        &["--ready-after-lb-probes", "2", "--ready-lb-timeout", "30s"],
        &[],
    );
    // Measured before: two requests from anyone opened the gate at 0.5 s.
    stranger(&drainit, "x");
    // A stranger's pace: twice, 300 ms apart, as a checker would.
    thread::sleep(MS(300));
    stranger(&drainit, "x");
    stranger(&drainit, "y");
    drainit.wait_status(SECS(5), "the strangers are not listed", |s| {
        common::checker(s, "x").is_some_and(|c| c["probes"].as_u64() >= Some(2))
            && common::checker(s, "y").is_some()
    });
    assert!(!kubelet_ready(&drainit), "the gate opened for strangers");
    // Measured before: a fresh User-Agent every 20 s held the gate to its timeout. Here one
    // every 100 ms, while a real load balancer checks every 200 ms.
    let running = Arc::new(AtomicBool::new(true));
    let (flag, health) = (running.clone(), drainit.health);
    let fresh = thread::spawn(move || {
        let mut i = 0;
        while flag.load(Ordering::Relaxed) {
            http_request(health, &get_request("/ready", &format!("fresh-{i}")));
            i += 1;
            thread::sleep(MS(100));
        }
    });
    let lb = Checker::start(&drainit, "HAProxy", MS(200), false);
    let opened = common::time_until(SECS(10), || kubelet_ready(&drainit));
    running.store(false, Ordering::Relaxed);
    fresh.join().unwrap();
    drop(lb);
    // Three probes 200 ms apart make a load balancer: about 0.4 s.
    assert!(
        opened.is_some_and(|t| t < SECS(5)),
        "gate opened after {opened:?}: {}",
        drainit.logs.text()
    );
    drainit.signal(Signal::SIGTERM);
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}

#[test]
fn lb_source_must_be_address_ranges_where_load_balancers_count() {
    let bad = [
        "--drain-watch",
        "lb-probes",
        "--lb-source",
        "10.0.0.0/33",
        "--",
        "true",
    ];
    refused_with(&bad, &[], 2, "10.0.0.0/33");
    let stray = ["--lb-source", "10.0.0.0/8", "--", "true"];
    refused_with(&stray, &[], 2, "--lb-source only applies to");
}

/// Connects to `port` on the loopback of `pid`'s network namespace as fast as it can (each
/// connection closed at once) until `running` is cleared; returns how many it made.
fn flood_from_inside(pid: i32, port: u16, running: Arc<AtomicBool>) -> thread::JoinHandle<u64> {
    thread::spawn(move || {
        let netns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
        // SAFETY: joins this thread (only) to the namespace of an open descriptor.
        let joined = unsafe { nix::libc::setns(netns.as_raw_fd(), nix::libc::CLONE_NEWNET) };
        assert_eq!(joined, 0, "setns: {}", std::io::Error::last_os_error());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut made = 0;
        let started = Instant::now();
        while running.load(Ordering::Relaxed) {
            // About 3,000 a second, as in the issue.
            let due = started + Duration::from_micros(333) * made as u32;
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
            if TcpStream::connect(addr).is_ok() {
                made += 1;
            }
        }
        made
    })
}

#[test]
fn a_flood_of_connections_to_the_probe_port_is_not_app_traffic() {
    // A network namespace of its own, as a pod has: the kernel's counters are its alone.
    let own_netns = [
        "unshare",
        "--net",
        "--",
        "sh",
        "-c",
        "ip link set lo up && exec \"$@\"",
        "sh",
    ];
    let mut drainit = Drainit::builder()
        .under(&own_netns)
        .options(&[
            "--drain-watch",
            "traffic",
            "--quiet-period",
            "1s",
            "--drain-min",
            "0",
            "--drain-max",
            "8s",
            "--grace-period",
            "12s",
        ])
        .app(common::demo(&[]))
        .start_serving();
    let running = Arc::new(AtomicBool::new(true));
    let flood = flood_from_inside(
        drainit.pid().as_raw(),
        drainit.health.port(),
        running.clone(),
    );
    // The flood runs 2 s before the drain, as in the issue.
    thread::sleep(SECS(2));
    // Measured before: the drain was held to its cap.
    let drained_after = drainit.drain_time();
    running.store(false, Ordering::Relaxed);
    let made = flood.join().unwrap();
    let over = drainit.event("drain_over");
    eprintln!("{made} connections to the probe port; drain {drained_after:?}: {over}");
    assert!(made > 3000, "the flood ran: {made} connections");
    assert_eq!(over["reason"], "watchers report drained", "{over}");
    assert!(drained_after < SECS(4), "drain took {drained_after:?}");
    assert_eq!(drainit.exit_code(SECS(10)), 0);
}

/// Where cgroup v1 mounts the memory controller.
const MEMORY_CONTROLLER: &str = "/sys/fs/cgroup/memory";
/// The memory limit of the pod in issue 9's OOM kills.
const POD_LIMIT: u64 = 128 << 20;
/// "Far below the limit": drainit, the demo app, unshare and the kernel's socket buffers of
/// hundreds of hostile connections.
const POD_USAGE_BAR: u64 = 32 << 20;

/// A fresh child cgroup of the memory controller with a memory (and memory+swap) limit; on
/// drop, even after a panic, its processes are killed and it is removed.
struct MemoryCgroup {
    dir: PathBuf,
}

impl MemoryCgroup {
    /// None where the machine has no v1 memory controller.
    fn create(limit: u64) -> Option<Self> {
        let controller = Path::new(MEMORY_CONTROLLER);
        if !controller.join("memory.limit_in_bytes").exists() {
            return None;
        }
        let dir = controller.join(format!("drainit-test-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let cgroup = Self { dir };
        cgroup.write("memory.limit_in_bytes", limit);
        if cgroup.dir.join("memory.memsw.limit_in_bytes").exists() {
            cgroup.write("memory.memsw.limit_in_bytes", limit);
        }
        Some(cgroup)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn write(&self, name: &str, value: u64) {
        std::fs::write(self.file(name), value.to_string())
            .unwrap_or_else(|e| panic!("write {name}: {e}"));
    }

    /// A counter file's value, if the kernel has that file.
    fn read(&self, name: &str) -> Option<u64> {
        std::fs::read_to_string(self.file(name))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `key`'s value in a flat keyed file such as memory.oom_control, if there.
    fn keyed(&self, name: &str, key: &str) -> Option<u64> {
        let text = std::fs::read_to_string(self.file(name)).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.parse().ok())
    }

    fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.file("cgroup.procs"))
            .unwrap_or_default()
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }
}

impl Drop for MemoryCgroup {
    fn drop(&mut self) {
        for _ in 0..500 {
            let pids = self.pids();
            if pids.is_empty() {
                break;
            }
            for pid in pids {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            thread::sleep(MS(10));
        }
        if let Err(e) = std::fs::remove_dir(&self.dir) {
            eprintln!("could not remove {}: {e}", self.dir.display());
        }
    }
}

/// drainit as PID 1 of a new PID namespace (as in a container) inside `cgroup`: the shell
/// joins the cgroup, then becomes unshare, whose child is drainit.
fn as_pid1_in(cgroup: &MemoryCgroup) -> Drainit {
    let procs = cgroup.file("cgroup.procs");
    let join = format!(
        "echo $$ > {} && exec unshare --pid --fork --mount-proc \"$@\"",
        procs.display()
    );
    Drainit::builder()
        .under(&["sh", "-c", &join, "sh"])
        .app(common::demo(&[]))
        .start_serving()
}

#[test]
fn as_pid1_in_a_128_mib_memory_cgroup_it_survives_the_memory_attacks() {
    let Some(cgroup) = MemoryCgroup::create(POD_LIMIT) else {
        eprintln!("skipped: no cgroup v1 memory controller at {MEMORY_CONTROLLER}");
        return;
    };
    let mut unshare = as_pid1_in(&cgroup);
    let init = first_child(unshare.pid().as_raw()).expect("unshare has no child");
    let app = first_child(init).expect("drainit has no child");
    assert!(cgroup.pids().contains(&init), "drainit is in the cgroup");
    let health = unshare.health;
    // Measured before, in a 128 MiB cgroup: 200 KB User-Agents, or 400 connections of
    // unterminated headers, got PID 1 OOM-killed.
    assert!(
        huge_user_agents(health) > 0,
        "oversized headers answered 431"
    );
    let held = unterminated_headers(health, 400);
    assert_eq!(distinct_user_agents(health, 20, 500, "cgroup"), 10_000);
    assert_eq!(kubelet_probe(health, "/alive").0, 200, "PID 1 answers");
    drop(held);

    let max_usage = cgroup.read("memory.max_usage_in_bytes").unwrap();
    let failcnt = cgroup.read("memory.failcnt");
    let oom_kills = cgroup.keyed("memory.oom_control", "oom_kill");
    eprintln!(
        "cgroup peak {:.1} MiB of {} MiB; failcnt {failcnt:?}, oom_kill {oom_kills:?}",
        max_usage as f64 / 1048576.0,
        POD_LIMIT >> 20
    );
    assert!(common::is_running(init), "drainit (PID 1) is alive");
    assert!(common::is_running(app), "the app is alive");
    assert_eq!(
        kubelet_probe(health, "/alive").0,
        200,
        "PID 1 still answers"
    );
    assert!(failcnt.is_some() || oom_kills.is_some(), "no OOM counter");
    assert_eq!(failcnt.unwrap_or(0), 0, "the cgroup hit its limit");
    assert_eq!(
        oom_kills.unwrap_or(0),
        0,
        "the kernel OOM-killed in the cgroup"
    );
    assert!(
        max_usage < POD_USAGE_BAR,
        "cgroup peak {max_usage} bytes, bar {POD_USAGE_BAR}"
    );
    // unshare passes no signals on: signal PID 1 itself.
    nix::sys::signal::kill(Pid::from_raw(init), Signal::SIGTERM).unwrap();
    assert_eq!(unshare.exit_code(SECS(10)), 0);
}
