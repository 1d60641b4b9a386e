//! A stderr nobody reads (a stuck log collector) costs log lines, never drainit's time: lines are
//! dropped and counted, the log says so once writing resumes, and a start-up error still exits
//! promptly. (As PID 1 under a signal storm: see pid1.rs.)

mod common;

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Drainit, drainit_bin, wait_timeout};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, kill};

const SECS: fn(u64) -> Duration = Duration::from_secs;

#[test]
fn lines_lost_to_a_stuck_stderr_are_counted_and_reported_when_it_moves_again() {
    let app = "trap '' TERM USR1 USR2; echo trapped; while :; do sleep 1; done";
    let drainit = Drainit::start(&["--drain-delay", "0"], &["sh", "-c", app]);
    // A signal before the traps are set would end the app, and the test.
    drainit.app_line("trapped");
    drainit.logs.stop_reading();
    for signal in [Signal::SIGUSR1, Signal::SIGUSR2].iter().cycle().take(1500) {
        kill(drainit.pid(), *signal).unwrap();
        std::thread::sleep(Duration::from_micros(100));
    }
    let dropped = drainit.metric("drainit_log_lines_dropped_total");
    assert!(dropped > 0.0, "nothing dropped: stderr was never stuck");

    drainit.logs.resume_reading();
    let notice = drainit.event("log_lines_dropped");
    let reported = notice["dropped"].as_f64().unwrap();
    assert!(
        reported > 0.0 && reported <= dropped,
        "reported {reported}, counted {dropped}: {notice}"
    );
    assert_eq!(notice["level"], "WARN");
}

/// A pipe whose buffer is full: a blocking write to it waits for a reader.
fn full_pipe() -> (OwnedFd, OwnedFd) {
    // Close-on-exec: a drainit of another test must not hold this pipe open.
    let (read, write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).unwrap();
    fcntl(&write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
    let mut writer = std::fs::File::from(write.try_clone().unwrap());
    while writer.write(&[b'x'; 4096]).is_ok() {}
    fcntl(&write, FcntlArg::F_SETFL(OFlag::empty())).unwrap();
    (read, write)
}

fn spawn_with_stderr(args: &[&str], stderr: OwnedFd) -> Child {
    Command::new(drainit_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(stderr))
        .spawn()
        .unwrap()
}

#[test]
fn a_start_up_error_waits_briefly_for_a_stuck_stderr_then_exits() {
    let (_unread, stuck) = full_pipe();
    let started = Instant::now();
    let mut drainit = spawn_with_stderr(&["--grace-period", "soon", "--", "true"], stuck);
    let status = wait_timeout(&mut drainit, SECS(5)).expect("drainit hung on a stuck stderr");
    assert_eq!(status.code(), Some(2));
    assert!(
        started.elapsed() < SECS(3),
        "exit took {:?}",
        started.elapsed()
    );
}

#[test]
fn a_start_up_error_reaches_a_slow_stderr_even_with_log_level_off() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().to_string();
    let (unread, slow) = full_pipe();
    let args = ["--log-level", "off", "--health-listen", &port, "--", "true"];
    let mut drainit = spawn_with_stderr(&args, slow);
    // The collector catches up 200 ms later: the error is still in drainit's queue.
    std::thread::sleep(Duration::from_millis(200));
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = std::fs::File::from(unread).read_to_end(&mut text);
        String::from_utf8_lossy(&text).into_owned()
    });
    let status = wait_timeout(&mut drainit, SECS(5)).expect("drainit did not exit");
    assert_eq!(status.code(), Some(71));
    let text = reader.join().unwrap();
    assert!(
        text.trim_start_matches('x').starts_with("drainit: ") && text.contains(&port),
        "the error did not come out: {:?}",
        text.trim_start_matches('x')
    );
}
