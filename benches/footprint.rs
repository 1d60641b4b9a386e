//! How tiny drainit is, measured beside the inits it competes with (tini, dumb-init, catatonit,
//! Debian packages) in one run: own resident memory while supervising `sleep`, drainit's again
//! after probe load, file size, and `X -- /bin/true` start-up. `cargo bench --bench footprint`
//! (CI points DRAINIT_BIN at the static musl binary users ship).
//!
//! Numbers, not assertions: the report marks each bar so a regression is plain to see.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::binaries::is_static;
use common::{Drainit, drainit_bin};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const STARTS: usize = 60;
const READY_REQUESTS: usize = 100_000;
const IDLE_CONNECTIONS: usize = 1_000;
const MIB: f64 = 1024.0 * 1024.0;
const MB: f64 = 1_000_000.0;

/// An init to compare: its binary and the arguments that put it in front of a command.
struct Init {
    name: &'static str,
    binary: PathBuf,
    args: Vec<String>,
}

impl Init {
    fn command(&self, app: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(&self.args).arg("--").args(app);
        command.stdin(Stdio::null()).stdout(Stdio::null());
        command.stderr(Stdio::null());
        command
    }
}

/// The Debian peers that are installed (`.ci/run` installs them), then drainit.
fn inits() -> Vec<Init> {
    // Outside a PID namespace drainit makes itself a child subreaper; tini does with -s.
    let peer = |name: &'static str| Init {
        name,
        binary: PathBuf::from("/usr/bin").join(name),
        args: if name.starts_with("tini") {
            vec!["-s".into()]
        } else {
            Vec::new()
        },
    };
    let mut inits: Vec<Init> = ["tini", "tini-static", "dumb-init", "catatonit"]
        .into_iter()
        .map(peer)
        .filter(|init| {
            let found = init.binary.is_file();
            if !found {
                println!("{}: not installed, skipped", init.name);
            }
            found
        })
        .collect();
    inits.push(Init {
        name: "drainit",
        binary: drainit_bin(),
        args: ["--health-listen", "127.0.0.1:0", "--control"]
            .into_iter()
            .map(String::from)
            .chain([common::unique_control()])
            .collect(),
    });
    inits
}

/// Resident memory of `pid` itself (not its children), in bytes, with the file-backed part.
fn own_rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb = |field: &str| -> f64 {
        let line = status.lines().find(|l| l.starts_with(field)).unwrap();
        let value: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        value * 1024.0
    };
    (kb("VmRSS:"), kb("RssFile:"))
}

/// Resident memory once `child` has started the app and settled.
fn rss_at_rest(pid: u32) -> (f64, f64) {
    thread::sleep(Duration::from_millis(500));
    own_rss(pid)
}

/// Kills an init and the app it runs: the peers put their app in a group or session of its own,
/// so killing the init alone would leave the app behind.
fn kill_with_app(init: &mut Child) {
    let pid = init.id();
    let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    for app in children.split_whitespace() {
        let app = Pid::from_raw(app.parse().unwrap());
        kill(app, Signal::SIGKILL).unwrap();
    }
    init.kill().unwrap();
    init.wait().unwrap();
}

/// CPU time (user + system) of every waited-for child so far.
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: nix::libc::rusage = std::mem::zeroed();
        nix::libc::getrusage(nix::libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let time = |t: nix::libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// `init -- /bin/true`, STARTS times: median wall time until it exited, median CPU (the init's
/// and /bin/true's).
fn start_up(init: &Init) -> (Duration, Duration) {
    let (mut walls, mut cpus) = (Vec::new(), Vec::new());
    for _ in 0..STARTS {
        let cpu_before = children_cpu();
        let started = Instant::now();
        let status = init.command(&["/bin/true"]).status().unwrap();
        walls.push(started.elapsed());
        cpus.push(children_cpu() - cpu_before);
        assert!(
            status.success(),
            "{} -- /bin/true failed: {status}",
            init.name
        );
    }
    (median(walls), median(cpus))
}

/// 100,000 /ready requests over kept-alive connections, then 1,000 connections opened at once,
/// left idle, and closed.
fn probe_load(health: SocketAddr) {
    let clients = 4;
    let workers: Vec<_> = (0..clients)
        .map(|_| {
            thread::spawn(move || {
                let mut stream = TcpStream::connect(health).unwrap();
                stream.set_nodelay(true).unwrap();
                let mut buf = [0u8; 512];
                for _ in 0..READY_REQUESTS / clients {
                    stream
                        .write_all(b"GET /ready HTTP/1.1\r\nHost: bench\r\n\r\n")
                        .unwrap();
                    let n = stream.read(&mut buf).unwrap();
                    // 200 or 503 alike (an app that listens nowhere may never be ready): the
                    // memory a probe costs is the point.
                    assert!(buf[..n].starts_with(b"HTTP/1.1 "), "/ready did not answer");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().unwrap();
    }
    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
        .filter_map(|_| TcpStream::connect(health).ok())
        .collect();
    thread::sleep(Duration::from_secs(1));
    drop(idle);
    thread::sleep(Duration::from_secs(1));
}

fn file_size(path: &Path) -> f64 {
    std::fs::metadata(path).unwrap().len() as f64
}

fn bar(ok: bool) -> &'static str {
    if ok { "ok" } else { "OVER" }
}

fn main() {
    println!(
        "{:<12} {:>10} {:>8} {:>14} {:>16} {:>16} {:>12} {:>10}",
        "init", "file", "linking", "own RSS (file)", "RSS after load", "start-up wall", "CPU", ""
    );
    let mut tini_wall = None;
    for init in inits() {
        let (rss, after) = if init.name == "drainit" {
            let drainit = Drainit::start(&[], &["sleep", "1000"]);
            let at_rest = rss_at_rest(drainit.pid().as_raw() as u32);
            probe_load(drainit.health);
            (at_rest, Some(own_rss(drainit.pid().as_raw() as u32)))
        } else {
            let mut child = init.command(&["sleep", "1000"]).spawn().unwrap();
            let at_rest = rss_at_rest(child.id());
            kill_with_app(&mut child);
            (at_rest, None)
        };
        let (wall, cpu) = start_up(&init);
        if init.name == "tini" {
            tini_wall = Some(wall);
        }
        let size = file_size(&init.binary);
        println!(
            "{:<12} {:>6.2} MiB {:>8} {:>6.2} MB ({:.2}) {:>13} {:>13.2?} {:>12.2?}",
            init.name,
            size / MIB,
            if is_static(&init.binary) {
                "static"
            } else {
                "dynamic"
            },
            rss.0 / MB,
            rss.1 / MB,
            after.map_or("-".into(), |a| format!("{:.2} MB", a.0 / MB)),
            wall,
            cpu,
        );
        if init.name == "drainit" {
            let growth = after.unwrap().0 - rss.0;
            println!(
                "bars: file {:.2} MiB <= 1.5 MiB: {}; own RSS {:.2} MB <= 1.4 MB: {}; growth after \
                 {READY_REQUESTS} /ready and {IDLE_CONNECTIONS} idle connections {:.2} MB <= 0.2 MB: {}; \
                 start-up {wall:.2?} <= tini + 1 ms: {}",
                size / MIB,
                bar(size <= 1.5 * MIB),
                rss.0 / MB,
                bar(rss.0 <= 1.4 * MB),
                growth / MB,
                bar(growth <= 0.2 * MB),
                tini_wall.map_or("no tini to compare", |t| bar(
                    wall <= t + Duration::from_millis(1)
                )),
            );
        }
    }
}
